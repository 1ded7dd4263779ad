"""report.html, its verdict, the ArviZ export and the progress helper.

The page is rendered from :func:`mmgm_ray.report.synthetic_inputs` (scikit-learn's digits, AR(1)
functionals) in four variants (complete, no labels, no FID, in progress), checked as HTML and then
opened in headless Chromium (Debian's chromium + chromium-driver, scripts/bootstrap.sh).
"""
from __future__ import annotations

import base64
import io
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import fsspec
import numpy as np
import pytest

from mmgm_ray.diagnostics import mcmc
from mmgm_ray.progress import Stage, track
from mmgm_ray.report import (SECTION_IDS, FunctionalSummary, ReportInputs, draws_factor, export_arviz,
                             functional_summaries, mixing_verdict, render_html, render_report, synthetic_inputs,
                             to_inference_data)

VARIANTS = {
    "complete": {},
    "no_labels": {"labels": False},
    "no_fid": {"fid": False},
    "in_progress": {"in_progress": True},
}
# what each degraded variant must say in place of its missing section: (section id, words)
MISSING = {
    "no_labels": ("classes", "no class labels"),
    "no_fid": ("fid", "FID was not computed"),
    "in_progress": ("fid", "still in progress"),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """report.html of every variant: {variant: path}."""
    root = tmp_path_factory.mktemp("report")
    return {v: render_report(synthetic_inputs(**kw), str(root / v)) for v, kw in VARIANTS.items()}


# ---- the verdict ----------------------------------------------------------------------------------

def _stats_inputs(stats: dict, draws: int = 50, chains: int = 64) -> ReportInputs:
    return ReportInputs(report={"sample": {"status": "done"},
                                "diagnostics": {"stats": stats, "draws": draws, "chains_used": chains}})


def test_verdict_not_mixed_names_the_worst_functional_and_the_draws_needed():
    # closed form (verdict module docstring): factor = max((R^2 - 1)/(1.05^2 - 1), 400 / ESS_bulk)
    inp = _stats_inputs({"score_norm": {"rhat": 1.27, "ess_bulk": 1000.0, "ess_tail": 900.0},
                         "proj": {"rhat": [1.01, 1.02], "ess_bulk": [100.0, 500.0], "ess_tail": [90.0, 450.0]}})
    summ = functional_summaries(inp)
    assert [s.name for s in summ] == ["score_norm", "proj_0", "proj_1"]  # list-valued stats flattened
    assert all(s.source == "report" and s.draws == 50 and s.chains == 64 for s in summ)
    v = mixing_verdict(inp, summ)
    expected = max((1.27 ** 2 - 1) / (1.05 ** 2 - 1), 400 / 100.0)   # 5.98 (R-hat) vs 4.0 (ESS)
    assert v.mixed is False
    assert v.factor == pytest.approx(expected, rel=1e-12)
    assert "run longer: max R-hat 1.27 on score_norm with 50 draws per chain" in v.headline
    assert f"~{math.ceil(expected)}x as many draws (~{math.ceil(expected * 50)} per chain)" in v.headline
    assert v.advice[0] == "2 of 3 functionals fail the criterion (64 chains \u00d7 50 draws)"
    assert any("min bulk ESS 100 on proj_0 < 400" in a for a in v.advice)


def test_verdict_mixed_and_unknown():
    ok = _stats_inputs({"a": {"rhat": 1.004, "ess_bulk": 2500.0, "ess_tail": 1800.0},
                        "b": {"rhat": 1.010, "ess_bulk": 450.0, "ess_tail": 700.0}})
    v = mixing_verdict(ok, functional_summaries(ok))
    assert v.mixed is True and v.factor is None
    assert v.headline.startswith("Mixed: every functional has R-hat < 1.05 and bulk ESS \u2265 400")
    assert "max R-hat 1.010 on b" in v.headline and "min bulk ESS 450 on b" in v.headline
    # ESS below the minimum alone fails too, with its own advice
    low = _stats_inputs({"a": {"rhat": 1.01, "ess_bulk": 200.0, "ess_tail": 300.0}})
    v = mixing_verdict(low, functional_summaries(low))
    assert v.mixed is False and v.factor == pytest.approx(2.0)
    assert "too few effective draws: min bulk ESS 200 on a < 400" in v.headline
    # an undefined R-hat (constant functional) never passes
    const = _stats_inputs({"a": {"rhat": None, "ess_bulk": 3200.0, "ess_tail": 3200.0}})
    assert mixing_verdict(const, functional_summaries(const)).mixed is False
    # nothing to judge
    empty = ReportInputs(report={"sample": {"status": "running"}})
    v = mixing_verdict(empty, functional_summaries(empty))
    assert v.mixed is None and "in progress" in v.headline


def test_verdict_on_synthetic_runs():
    mixed = synthetic_inputs()
    assert mixing_verdict(mixed, functional_summaries(mixed)).mixed is True
    stuck = synthetic_inputs(mixed=False)  # chains never leave their first class
    v = mixing_verdict(stuck, functional_summaries(stuck))
    assert v.mixed is False and "run longer" in v.headline
    assert any("never switch class" in a for a in v.advice)


def test_computed_summaries_equal_the_projects_figures_without_incomplete_chains():
    inp = synthetic_inputs(mixed=False, chains=6, draws=120)
    x = inp.functionals["proj_1"].copy()
    x[2, 50:] = np.nan  # a chain that stopped early is left out, as diagnose does
    inp = ReportInputs(report=inp.report, functionals={"proj_1": x})
    (s,) = functional_summaries(inp)
    ref = mcmc.summarize(np.delete(x, 2, axis=0))
    assert (s.source, s.chains, s.draws) == ("computed", 5, 120)
    assert (s.rhat, s.ess_bulk, s.ess_tail) == (ref["rhat"], ref["ess_bulk"], ref["ess_tail"])


def _ar1(rng, rows: int, n: int, rho: float) -> np.ndarray:
    x = np.empty((rows, n))
    x[:, 0] = rng.standard_normal(rows)
    e = rng.standard_normal((rows, n)) * math.sqrt(1 - rho ** 2)
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    return x


def test_draws_factor_predicts_the_rhat_of_a_longer_run():
    # stationary AR(1), rho = 0.9 (tau = 19), 4 chains: the factor from 100 draws, applied, should
    # bring mean(R-hat^2 - 1) to the threshold's (1.05^2 - 1) since R-hat^2 - 1 ~ (tau - 1)/n.
    # 400 replications: per-replication R-hat^2 - 1 has a relative sd ~0.6 (chi^2 with 7 dof), so
    # the mean is known to ~3%; 20% leaves room for the O(1/n) bias of short chains.
    rng = np.random.default_rng(11)
    reps, chains, n, thr = 400, 4, 100, 1.05
    short = _ar1(rng, reps * chains, n, 0.9).reshape(reps, chains, n)
    mean_short = np.mean([mcmc.rhat(r) ** 2 - 1 for r in short])
    f = draws_factor(FunctionalSummary("x", math.sqrt(1 + mean_short), 1e9, 1e9, chains, n, "computed"), thr, 1.0)
    longer = _ar1(rng, reps * chains, int(round(f * n)), 0.9).reshape(reps, chains, -1)
    mean_long = np.mean([mcmc.rhat(r) ** 2 - 1 for r in longer])
    assert 3 < f < 30
    assert mean_long == pytest.approx(thr ** 2 - 1, rel=0.2)


def test_inputs_reject_bad_shapes_with_one_clear_line():
    with pytest.raises(ValueError, match=r"functionals must share one shape"):
        ReportInputs(functionals={"a": np.zeros((3, 10)), "b": np.zeros((3, 11))})
    with pytest.raises(ValueError, match=r"filmstrip must be \(chains, frames, C, H, W\)"):
        ReportInputs(filmstrip=np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"filmstrip_labels must be int \(2, 3\)"):
        ReportInputs(filmstrip=np.zeros((2, 3, 1, 8, 8)), filmstrip_labels=np.zeros((2, 4), dtype=int))
    with pytest.raises(ValueError, match=r"chain_ids must have shape \(3,\)"):
        ReportInputs(functionals={"a": np.zeros((3, 10))}, chain_ids=[1, 2])
    with pytest.raises(ValueError, match=r"rhat_threshold must be > 1"):
        ReportInputs(rhat_threshold=1.0)


# ---- the page as HTML -----------------------------------------------------------------------------

class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.sections, self.urls = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(a.get("id"))
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_page_is_self_contained_with_every_section(pages, variant):
    with open(pages[variant], encoding="utf-8") as f:
        html = f.read()
    page = _Page()
    page.feed(html)
    assert page.sections == list(SECTION_IDS)
    assert "script" not in page.tags
    for url in page.urls:  # nothing fetched: only data URIs and in-page anchors
        assert url.startswith(("data:", "#")), url
    images = [u for u in page.urls if u.startswith("data:image/png;base64,")]
    assert len(images) >= 4
    assert all(base64.b64decode(u.split(",", 1)[1]).startswith(PNG_MAGIC) for u in images)
    assert "s3cr3t" not in html and "&lt;redacted&gt;" in html  # storage options never shown
    if variant in MISSING:
        section, words = MISSING[variant]
        start = html.index(f'<section id="{section}"')
        assert words in html[start:html.index("</section>", start)]


def test_render_report_writes_atomically_and_returns_the_path(tmp_path):
    inp = synthetic_inputs(chains=4, draws=60, frames=4, n_final=8, labels=False, fid=False)
    html = render_html(inp)
    path = render_report(inp, str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / "report.html")
    assert os.listdir(tmp_path / "out") == ["report.html"]  # no temporary file left behind
    assert open(path, encoding="utf-8").read().count("<section") == html.count("<section") == len(SECTION_IDS)
    # any fsspec URL works (object stores get one PUT of the whole page)
    url = render_report(inp, "memory://report-test/run")
    with fsspec.open(url, "r", encoding="utf-8") as f:
        assert url == "memory://report-test/run/report.html" and f.read().count("<section") == len(SECTION_IDS)


def test_report_package_never_imports_ray():
    code = "import sys, mmgm_ray.report, mmgm_ray.progress; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


# ---- the page in a browser ------------------------------------------------------------------------

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _full_page_screenshot(driver, path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, int(height) + 40)
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_page_in_headless_chromium(pages, browser, variant, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get_log("browser")  # drop messages of an earlier page
    browser.get("file://" + pages[variant])
    for sid in SECTION_IDS:
        section = browser.find_element(By.ID, sid)
        assert section.is_displayed() and section.find_element(By.TAG_NAME, "h2").text
    imgs = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
    assert len(imgs) >= 4
    for alt, complete, w, h in imgs:
        assert complete and w > 0 and h > 0, f"image {alt!r} did not load"
    # nothing was fetched: data URIs make no resource entries
    assert browser.execute_script("return performance.getEntriesByType('resource').length;") == 0
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    if variant in MISSING:
        section, words = MISSING[variant]
        assert words in browser.find_element(By.CSS_SELECTOR, f"#{section} .missing").text
    if variant == "in_progress":
        assert browser.find_element(By.CSS_SELECTOR, "#verdict .badge").text == "in progress"
    shot = tmp_path / f"report-{variant}.png"
    _full_page_screenshot(browser, shot)
    assert shot.read_bytes().startswith(PNG_MAGIC)
    if os.environ.get("MMGM_TEST_ARTIFACTS"):
        os.makedirs(os.environ["MMGM_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(shot, os.path.join(os.environ["MMGM_TEST_ARTIFACTS"], shot.name))


# ---- ArviZ export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mixed", [True, False])
def test_arviz_export_round_trips_and_matches_the_projects_figures(tmp_path, mixed):
    import arviz as az

    inp = synthetic_inputs(mixed=mixed)
    funcs = {k: v for k, v in inp.functionals.items() if k != "score_norm"}
    stats = {"score_norm": inp.functionals["score_norm"], "kinetic": inp.functionals["score_norm"] ** 2}
    path = export_arviz(str(tmp_path / "sub" / "run.nc"), funcs, stats, chain_ids=inp.chain_ids,
                        jump_index=inp.jump_index + 7, attrs={"run": "synthetic", "model_hash": "sha256:00"})
    idata = az.from_netcdf(path)
    assert set(idata.posterior.data_vars) == set(funcs)
    assert set(idata.sample_stats.data_vars) == {"score_norm", "kinetic"}
    np.testing.assert_array_equal(idata.posterior["chain"].values, inp.chain_ids)
    np.testing.assert_array_equal(idata.posterior["draw"].values, inp.jump_index + 7)
    assert idata.attrs["run"] == "synthetic" and idata.attrs["model_hash"] == "sha256:00"
    for name, x in stats.items():
        np.testing.assert_array_equal(idata.sample_stats[name].values, x)
    rhat, bulk, tail = az.rhat(idata), az.ess(idata, method="bulk"), az.ess(idata, method="tail")
    for name, x in funcs.items():
        assert idata.posterior[name].dims == ("chain", "draw")
        np.testing.assert_array_equal(idata.posterior[name].values, x)  # float64, bit for bit
        # the same estimators on the same numbers: equal up to floating-point summation order
        assert float(rhat[name]) == pytest.approx(mcmc.rhat(x), rel=1e-10, abs=0)
        assert float(bulk[name]) == pytest.approx(mcmc.ess(x, "bulk"), rel=1e-10, abs=0)
        assert float(tail[name]) == pytest.approx(mcmc.ess(x, "tail"), rel=1e-10, abs=0)
    assert (float(rhat["proj_0"]) < 1.05) is mixed


def test_arviz_export_rejects_bad_input(tmp_path):
    x = np.zeros((2, 10))
    with pytest.raises(ValueError, match=r"must end in \.nc"):
        export_arviz(str(tmp_path / "run.zarr"), {"a": x})
    with pytest.raises(ValueError, match=r"sample_stats\['e'\] has shape \(2, 9\), expected \(2, 10\)"):
        to_inference_data({"a": x}, {"e": np.zeros((2, 9))})
    with pytest.raises(ValueError, match=r"the chain coordinate has shape \(3,\)"):
        to_inference_data({"a": x}, chain_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"at least one functional"):
        to_inference_data({})
    assert not os.listdir(tmp_path)


# ---- progress -------------------------------------------------------------------------------------

class _Clock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    with Stage("FID features", total=500, unit="img", stream=out, clock=_Clock(10.0, 22.5)) as st:
        for _ in range(5):
            st.update(100)
    assert out.getvalue().splitlines() == ["[mmgm] FID features: start (500 img)",
                                           "[mmgm] FID features: done 500/500 img in 12.5 s (40.0 img/s)"]
    assert (st.count, st.seconds) == (500, 12.5)
    out = io.StringIO()
    with pytest.raises(KeyError):
        with Stage("read", stream=out, clock=_Clock(0.0, 2.0)) as st:
            st.update(3)
            raise KeyError("x")
    assert out.getvalue().splitlines()[-1] == "[mmgm] read: failed after 3 it in 2.0 s (KeyError)"
    out = io.StringIO()
    for i in track(range(10), "rows", stream=out, clock=_Clock(0.0, 1.0)):
        if i == 3:
            break
    assert out.getvalue().splitlines() == ["[mmgm] rows: start (10 it)", "[mmgm] rows: stopped after 3/10 it in 1.0 s"]
    out = io.StringIO()
    assert list(track([1, 2], "quiet", stream=out, enabled=False)) == [1, 2] and out.getvalue() == ""


def test_progress_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    assert sum(track(range(7), "sampling", unit="chain", stream=out)) == 21
    text = out.getvalue()
    assert "\r" in text and "sampling" in text and "7/7" in text  # tqdm's bar, redrawn in place
    assert "[mmgm]" not in text


def test_sample_grids_have_no_ragged_last_row():
    """64 final jumps tile 8 x 8 (a 12-wide grid left 4 alone on a sixth row); counts with no divisor
    in [6, 12] fall back to 12 per row, and few images sit in one row. The PNG's size is the tiling's."""
    from PIL import Image

    from mmgm_ray.report.figures import grid_columns, grid_png

    assert [grid_columns(n) for n in (1, 5, 12, 16, 36, 64, 100, 13)] == [1, 5, 12, 8, 12, 8, 10, 12]
    png = grid_png(np.zeros((64, 1, 28, 28), dtype=np.float32))
    w, h = Image.open(io.BytesIO(png)).size
    assert w == h   # 8 columns x 8 rows of square tiles with equal padding
