"""``mmgm report RUN``: report.html from a run on disk (``mmgm_ray.postprocess.run_report``).

Runs are real sample stores (``test_diagnose.digits_run``: chains hopping between digit classes,
8x8 images) with the diagnose functionals table built in this process (no Ray), a ``report.json``
as ``mmgm run`` writes it and a training run's ``metrics.jsonl``. The page's inputs are checked
against the store read independently (``read_samples``, ``load_functionals``), then each missing
part (labels, FID, diagnostics / finished sampling) is checked to be explained in place.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from html.parser import HTMLParser

import numpy as np
import pytest

from mmgm_ray.cli import main
from mmgm_ray.diagnostics import transitions
from mmgm_ray.diagnostics.functionals import FunctionalsRequest
from mmgm_ray.pipeline import _score_or_record, write_report
from mmgm_ray.postprocess import Window, diagnose, load_functionals
from mmgm_ray.postprocess.run_report import run_inputs
from mmgm_ray.report import SECTION_IDS
from mmgm_ray.store import read_samples
import test_report
from test_diagnose import digits_run
from test_report import PNG_MAGIC

browser = test_report.browser  # the headless chromium fixture of the report tests

DIGITS = {"name": "digits"}
BURN_IN = 4
FID = {"fid": 31.5, "real_floor": 12.25, "n": 16, "n_reference": 64, "reference": "first 64 digits train images",
       "windows": [{"name": "early", "start": 0, "end": 12, "fid": 40.0, "n": 16},
                   {"name": "late", "start": 12, "end": 24, "fid": 33.0, "n": 16}]}
HISTORY = [{"step": s, "loss": 0.5 / s, "lr": 1e-3} for s in (10, 20, 30)]


class _Page(HTMLParser):
    """Sections (id -> their text), the texts of their ``.missing`` paragraphs and image counts."""

    def __init__(self, html: str):
        super().__init__()
        self.text, self.missing, self.images = {}, {}, {}
        self._sec, self._in_missing = None, False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._sec = a["id"]
            self.text[self._sec], self.images[self._sec] = "", 0
        elif tag == "p" and a.get("class") == "missing":
            self._in_missing = True
        elif tag == "img" and self._sec:
            assert a["src"].startswith("data:image/png;base64,")
            self.images[self._sec] += 1

    def handle_endtag(self, tag):
        if tag == "p":
            self._in_missing = False

    def handle_data(self, data):
        if self._sec:
            self.text[self._sec] += data
            if self._in_missing:
                self.missing[self._sec] = self.missing.get(self._sec, "") + data


def _report_page(capsys, run: str, *extra: str) -> tuple[str, _Page]:
    assert main(["report", run, *extra]) == 0
    path = json.loads(capsys.readouterr().out)["report"]
    with open(path, encoding="utf-8") as f:
        html = f.read()
    page = _Page(html)
    assert list(page.text) == list(SECTION_IDS)
    return path, page


def _finished_run(root, name: str, classes: bool, fid: bool, chains: int = 16, jumps: int = 24) -> str:
    """A finished digits run with its functionals table, report.json and training metrics."""
    url = digits_run(root, name, chains=chains, jumps=jumps)
    req = FunctionalsRequest(n_random=2, n_pcs=2, data=DIGITS, classes=classes)
    diag = diagnose(url, req, window=Window(burn_in=BURN_IN), executor="local", rhat_threshold=1.05,
                    progress=False)
    train = root / f"{name}-train"
    train.mkdir()
    (train / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in HISTORY))
    report = {"name": name, "code_version": {"package": "9.9.9", "git_commit": "f" * 40},
              "train": {"artifact": str(train / "model.pt"), "steps": 30},
              "sample": {"status": "done", "url": url}, "model_hash": "sha256:" + "ab" * 32, "diagnostics": diag}
    if fid:
        report["fid"] = FID
    write_report(url, report)
    return url


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return _finished_run(tmp_path_factory.mktemp("labelled"), "main-samples", classes=True, fid=True)


def test_inputs_of_a_labelled_run_are_what_the_store_holds(labelled):
    inp = run_inputs(labelled)
    assert not inp.in_progress and inp.report["sample"]["rows"] == 16 * 24
    # final jumps: the last jump (23) of each chain, as the store's reader returns them
    x, meta = read_samples(labelled, min_step=24, max_step=24)
    order = np.argsort(meta.column("chain_id").to_numpy())
    np.testing.assert_array_equal(inp.final_jumps, np.clip(x[order], 0, 1))
    # functionals: the diagnose table over the diagnostics' window, sans the classifier's columns
    ref, ids, jumps = load_functionals(labelled, window=Window(burn_in=BURN_IN))
    assert set(inp.functionals) == set(ref) - {"class_label", "class_conf"}
    for k, v in inp.functionals.items():
        np.testing.assert_array_equal(v, ref[k])
    assert inp.chain_ids.tolist() == ids.tolist() == list(range(16)) and jumps.tolist() == list(range(BURN_IN, 24))
    # filmstrip: 5 chains x 10 jumps from 0 to 23, images and classes at those (chain, jump)
    assert inp.filmstrip.shape == (5, 10, 1, 8, 8) and inp.filmstrip_jumps.tolist()[::9] == [0, 23]
    all_labels, _, _ = load_functionals(labelled, ["class_label"])
    x_all, m_all = read_samples(labelled)
    where = {(c, j): i for i, (c, j) in enumerate(zip(m_all.column("chain_id").to_pylist(),
                                                      m_all.column("jump_index").to_pylist()))}
    for r, c in enumerate(inp.filmstrip_chain_ids):
        for t, j in enumerate(inp.filmstrip_jumps):
            assert inp.filmstrip_labels[r, t] == all_labels["class_label"][c, j]
            np.testing.assert_array_equal(inp.filmstrip[r, t], x_all[where[(int(c), int(j))]])
    # the strip shows the chains that change class most (burn-in window labels)
    lab = ref["class_label"].astype(int)
    switches = (lab[:, 1:] != lab[:, :-1]).sum(1)
    assert switches[inp.filmstrip_chain_ids].min() >= np.sort(switches)[-5]
    assert inp.report["train"]["history"] == HISTORY and inp.rhat_threshold == 1.05


def test_report_of_a_labelled_run_has_every_section(labelled, capsys, tmp_path):
    out = str(tmp_path / "page" / "r.html")
    path, page = _report_page(capsys, labelled, "--out", out)
    assert path == out
    assert page.missing == {}, page.missing
    expect = {"samples": 1, "filmstrips": 1, "mixing": 3, "classes": 2, "fid": 1, "training": 1}
    assert {k: page.images[k] for k in expect} == expect
    assert "R-hat" in page.text["mixing"] and "pc_0" in page.text["mixing"]
    assert "31.50" in page.text["fid"] and "12.25" in page.text["fid"]
    assert "ab" * 32 in page.text["provenance"] and "f" * 40 in page.text["provenance"]
    # the default place is the run folder; the training run's name finds its -samples run
    assert not os.path.exists(f"{labelled}/report.html")
    path, _ = _report_page(capsys, labelled.removesuffix("-samples"))
    assert path == f"{labelled}/report.html"


def test_class_statistics_from_the_labels_when_the_report_has_none(labelled, tmp_path):
    # diagnose skips transitions below 4 draws per chain (and a run may lack report.json): the
    # page takes them from the table's class labels, over the complete chains of the window
    run = str(tmp_path / "copy")
    shutil.copytree(labelled, run)
    report = json.loads(open(f"{run}/report.json").read())
    recorded = report["diagnostics"].pop("transitions")
    write_report(run, report)
    inp = run_inputs(run)
    lab, _, _ = load_functionals(run, ["class_label"], window=Window(burn_in=BURN_IN), complete_only=True)
    lab = lab["class_label"].astype(np.int64)
    np.testing.assert_array_equal(inp.transition_matrix, transitions.transition_matrix(lab, 10))
    np.testing.assert_array_equal(inp.class_frequencies, np.bincount(lab.ravel(), minlength=10) / lab.size)
    # the same figures diagnose recorded from the same labels
    np.testing.assert_allclose(inp.transition_matrix, np.asarray(recorded["transition_matrix"], float),
                               rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(inp.class_frequencies, recorded["occupancy"], rtol=1e-12)
    np.testing.assert_allclose(inp.data_class_frequencies, recorded["reference"], rtol=1e-12)
    assert run_inputs(labelled).transition_matrix is None   # the recorded ones are used when there


def test_report_without_labels_or_fid_explains_the_missing_sections(tmp_path, capsys):
    run = _finished_run(tmp_path, "plain", classes=False, fid=False, chains=8, jumps=12)
    _, page = _report_page(capsys, run)
    assert set(page.missing) == {"classes", "fid"}
    assert "no class labels" in page.missing["classes"] and "FID was not computed" in page.missing["fid"]
    assert "without their class" in page.text["filmstrips"] and page.images["filmstrips"] == 1
    assert page.images["samples"] == 1 and page.images["mixing"] == 3


def test_report_of_a_run_in_progress(tmp_path, capsys):
    # a pool run that has committed some jumps and is still sampling: no report.json, no table
    run = digits_run(tmp_path, "live", chains=8, jumps=6)
    man = json.loads(open(f"{run}/manifest.json").read())
    man["status"] = "running"
    with open(f"{run}/manifest.json", "w") as f:
        json.dump(man, f)
    path, page = _report_page(capsys, run)
    for sid in ("mixing", "fid"):
        assert "still in progress" in page.missing[sid], sid
    assert "no training history" in page.missing["training"].lower()
    assert "in progress" in page.text["verdict"] and "No mixing verdict yet" in page.text["verdict"]
    assert page.images["samples"] == 1 and "latest jumps so far" in page.text["samples"]
    # nothing committed yet: still a page
    shutil.rmtree(f"{run}/samples")
    man["blocks"] = {}
    with open(f"{run}/manifest.json", "w") as f:
        json.dump(man, f)
    _, page = _report_page(capsys, run)
    assert "still in progress" in page.missing["samples"] and page.images["samples"] == 0


def test_fid_failure_keeps_the_diagnostics_and_the_page(labelled, tmp_path, monkeypatch):
    run = str(tmp_path / "copy")
    shutil.copytree(labelled, run)
    report = json.loads(open(f"{run}/report.json").read())
    report.pop("fid")

    def broken(*a, **k):
        raise RuntimeError("Inception weights missing\nsecond line")

    monkeypatch.setattr("mmgm_ray.pipeline.stage_score", broken)
    scfg = types.SimpleNamespace(run_dir=run)
    with pytest.raises(RuntimeError, match="Inception weights missing"):
        _score_or_record(None, scfg, types.SimpleNamespace(dataset=None), report, progress=False)
    saved = json.loads(open(f"{run}/report.json").read())
    assert saved["fid"] == {"error": "RuntimeError: Inception weights missing"}
    assert saved["diagnostics"] == report["diagnostics"] and saved["diagnostics"]["stats"]
    page = _Page(open(f"{run}/report.html", encoding="utf-8").read())
    assert page.missing == {"fid": "FID failed on this run: RuntimeError: Inception weights missing (the other "
                                   "sections are unaffected)."}


def test_bad_runs_give_one_line(tmp_path, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(  # unpinned on purpose: `mmgm report` builds no run config
        [sys.executable, os.path.join(root, "jobs", "report.py"), str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"mmgm report: error: no run at {tmp_path / 'empty'}: neither a manifest.json nor a report.json " \
                   f"there (nor in {tmp_path / 'empty'}-samples)"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{not json")
    assert main(["report", str(tmp_path / "bad")]) == 2
    assert main(["report", str(tmp_path / "bad"), "--frames", "0"]) == 2
    assert main(["report", str(tmp_path / "bad"), "--out", str(tmp_path / "bad" / "report.json" / "x.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"mmgm report: error: {tmp_path / 'bad'}/report.json is not valid JSON"), err
    assert err[1:] == ["mmgm report: error: --frames must be >= 1, got 0",
                       f"mmgm report: error: --out {tmp_path / 'bad' / 'report.json' / 'x.html'}: "
                       f"{tmp_path / 'bad' / 'report.json'} is a file, not a folder"]
    assert sorted(os.listdir(tmp_path / "bad")) == ["report.json"]   # nothing written


@pytest.mark.slow
def test_page_of_a_real_run_loads_every_image_in_chromium(labelled, browser, capsys):
    path, page = _report_page(capsys, labelled, "--out", f"{labelled}/browser.html")
    browser.get_log("browser")
    browser.get("file://" + path)
    imgs = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
    assert len(imgs) == sum(page.images.values()) >= 9
    for alt, complete, w, h in imgs:
        assert complete and w > 0 and h > 0, f"image {alt!r} did not load"
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    shot = browser.get_screenshot_as_png()
    assert shot.startswith(PNG_MAGIC)
    if os.environ.get("MMGM_TEST_ARTIFACTS"):
        os.makedirs(os.environ["MMGM_TEST_ARTIFACTS"], exist_ok=True)
        with open(os.path.join(os.environ["MMGM_TEST_ARTIFACTS"], "report-real-run.png"), "wb") as f:
            f.write(shot)
