"""FID/KID over a run's store at scale (mmgm_ray.postprocess.fid, .selection): the selection against a
brute-force reading of its definition, the Ray Data path (actor pool, several blocks and partial
sums) against one-shot statistics and the in-process path, committed parts only, bad input, and
``mmgm fid`` / ``jobs/fid.py``.

The reduction is tested with exact pixel features (``image_stores.PixelFeatures``, 16-d for 4x4
images) at N > 16, where the covariances are well conditioned and FID is as stable as its inputs:
merged sums differ from one-shot sums only by float64 addition order (~1e-16 relative), so 1e-10
is a tolerance with six orders of margin. Inception itself runs in the slow tests at small N.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray.cloudpickle
import torch

import image_stores
from image_stores import PixelFeatures, add_uncommitted_part, image_run
from mmgm_ray import cli
from mmgm_ray.diagnostics.fid import FeatureStats, fid_between, kid, new_stats
from mmgm_ray.diagnostics.inception import PREPROCESSING, InceptionFeatures, require_weights, weights_sha256
from mmgm_ray.postprocess import open_committed
from mmgm_ray.postprocess.fid import FeatureSettings, run_feature_stats, score_run, select_run
from mmgm_ray.postprocess.selection import chain_index, plan_fid
from mmgm_ray.store import create_run, read_samples

ROOT = Path(__file__).resolve().parents[1]
ray.cloudpickle.register_pickle_by_value(image_stores)  # Ray workers get PixelFeatures by value


def pixels(**kw) -> FeatureSettings:
    """Pixel features, tiny batches, blocks and partial sums: many blocks and merges for few rows."""
    return FeatureSettings(extractor=PixelFeatures, batch_size=4, block_rows=5, stats_rows=7, progress=False, **kw)


def pixel_reference(n: int = 200, seed: int = 1) -> FeatureStats:
    x = np.random.default_rng(seed).uniform(0.0, 1.0, (n, 16))
    return FeatureStats(preprocessing="pixels", weights_sha256="0" * 64).update(x)


# ---- the selection, read straight from its definition ----------------------------------------------

def oracle(url: str, mode: str, n: int, lo: int = 0, hi: int = 0) -> dict:
    """{(chain_id, jump_index): rank} of the rows a selection keeps, from all committed rows at once:
    ``last``: the last jump of each of the first n chains (rank: the chain's position); ``spread``:
    cell floor(m G / n) (rank m) of the grid {k = ceil(n/C) jumps evenly up to hi} x {chains},
    where the store holds that row."""
    _, meta = read_samples(url)
    ch, jp = meta.column("chain_id").to_numpy(), meta.column("jump_index").to_numpy()
    ids = np.unique(ch)
    if mode == "last":
        return {(int(c), int(jp[ch == c].max())): i for i, c in enumerate(ids[:n])}
    c, k, width = len(ids), math.ceil(n / len(ids)), hi - lo + 1
    grid = [lo + (i * width) // k - 1 for i in range(1, k + 1)]
    held = set(zip(ch.tolist(), jp.tolist()))
    cells = {m: (m * k * c) // n for m in range(n)}
    ranked = {(int(ids[p % c]), grid[p // c]): m for m, p in cells.items()}
    return {key: m for key, m in ranked.items() if key in held}


def selected(url: str, plan) -> list[set]:
    """(chain_id, jump_index) of each group's rows, by the plan's filter and row test in this process."""
    view = open_committed(url)
    t = pa.concat_tables([plan.select(pa.Table.from_batches([b])) for b in
                          view.batches(["chain_id", "jump_index", "sample"], filter=plan.pushdown().to_pyarrow())])
    keys = list(zip(t["chain_id"].to_pylist(), t["jump_index"].to_pylist()))
    assert len(set(keys)) == len(keys)  # a row is read once, whatever the groups it is in
    return [{k for k, g in zip(keys, t["groups"].to_pylist()) if g >> i & 1} for i in range(len(plan.groups))]


def test_selection_is_its_definition(tmp_path):
    """last / spread / windows on a store with a diverged chain (chain 3 stops at jump 4): the rows the
    plan's filter + row test keep are the brute-force ones; ranks are unique; the KID subset is bounded."""
    url = image_run(tmp_path, chains=10, jumps=8)
    index = chain_index(open_committed(url), on_ray=False)
    assert index.chain_ids.tolist() == list(range(10)) and index.last_jump.tolist() == [7, 7, 7, 3] + [7] * 6
    assert index.rows == 10 * 8 - 4

    plan = plan_fid(index, 5, select="last")
    assert selected(url, plan) == [set(oracle(url, "last", 5))]
    assert {(3, 3), (0, 7)} <= set(oracle(url, "last", 5))  # a diverged chain contributes its last jump

    plan = plan_fid(index, 25, select="spread", windows=3, window_n=12, kid_max=6)
    assert plan.groups[0].grid == (1, 4, 7)  # k = 3 jumps: floor(i 8 / 3) - 1, i = 1..3, ending at the last
    assert [(g.lo, g.hi) for g in plan.groups[1:]] == [(0, 2), (3, 4), (5, 7)]
    got = selected(url, plan)
    assert got[0] == set(oracle(url, "spread", 25, 0, 7)) and len(got[0]) == 24  # chain 3 has no jump 4 or 7
    for g, rows in zip(plan.groups[1:], got[1:]):
        assert rows == set(oracle(url, "spread", 12, g.lo, g.hi)) and all(g.lo <= j <= g.hi for _, j in rows)
    assert plan.kid_stride == 5  # ceil(25 / 6): ranks 0, 5, 10, 15, 20 keep their features

    spread = plan_fid(index, 30, select="spread", min_jump=4)
    assert selected(url, spread) == [set(oracle(url, "spread", 30, 4, 7))]
    assert plan_fid(index, 10).groups[0].mode == "last" and plan_fid(index, 11).groups[0].mode == "spread"


def test_selection_bad_input_is_one_line(tmp_path):
    index = chain_index(open_committed(image_run(tmp_path, chains=4, jumps=3, diverge=None)), on_ray=False)
    for kw, needle in [({"n": 13}, "more than the 12 committed samples"), ({"n": 1}, "n must be >= 2"),
                       ({"n": 5, "select": "last"}, "more than the 4 chains"),
                       ({"n": 4, "windows": 4}, "n_windows (4) <= num_jumps (3)"),
                       ({"n": 6, "windows": 3}, "n=6 is more than the 4 chains x 1 jumps"),
                       ({"n": 6, "select": "spread", "min_jump": 3}, "min_jump must be in 0..2"),
                       ({"n": 4, "select": "random"}, "select must be one of")]:
        with pytest.raises(ValueError, match=re.escape(needle)) as e:
            plan_fid(index, **kw)
        assert "\n" not in str(e.value)
    clipped = plan_fid(index, 50, select="last", windows=5, clip=True)  # the main job's bounds
    assert clipped.groups[0].n == 4 and [g.n for g in clipped.groups[1:]] == [4, 4, 4]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_path_equals_one_shot_and_in_process(ray_session, tmp_path):
    """2 actors, blocks of 5 rows, partial sums every 7 rows: each group's merged statistics equal the
    one-shot statistics of the oracle's rows (1e-10), the distributed FID / window FIDs / KID equal the
    in-process ones (1e-10 relative); an uncommitted part on storage changes nothing."""
    url = image_run(tmp_path, chains=30, jumps=8)
    x, meta = read_samples(url)
    key = dict(zip(zip(meta.column("chain_id").to_pylist(), meta.column("jump_index").to_pylist()), x))
    add_uncommitted_part(url)  # after the oracle's read: neither path may see it
    kw = {"windows": 3, "window_n": 20, "kid_max": 10}
    ray_sel, local_sel = select_run(url, 40, **kw), select_run(url, 40, local=True, **kw)
    assert ray_sel.plan.groups == local_sel.plan.groups
    np.testing.assert_array_equal(ray_sel.plan.last_jump, local_sel.plan.last_jump)
    on_ray = pixels(actors=2, cpus_per_actor=1)
    stats, kid_x, images = run_feature_stats(ray_sel, on_ray)
    groups = ray_sel.plan.groups
    for g, st in zip(groups, stats):
        rows = sorted(oracle(url, g.mode, g.n, g.lo, g.hi))
        one = FeatureStats().update(np.stack([key[r] for r in rows]).reshape(len(rows), -1).astype(np.float64))
        assert st.n == one.n == len(rows) and st.labels() == {"preprocessing": "pixels", "weights_sha256": "0" * 64}
        np.testing.assert_allclose(st.mean, one.mean, rtol=1e-10, atol=0)
        np.testing.assert_allclose(st.cov, one.cov, rtol=1e-10, atol=1e-14)
    assert images == len(set().union(*[oracle(url, g.mode, g.n, g.lo, g.hi) for g in groups]))
    # KID keeps the features of ranks 0, 4, ..., 36 (stride ceil(40 / 10)), in rank order
    main = oracle(url, "spread", 40, 0, 7)
    kid_keys = sorted((m, r) for r, m in main.items() if m % 4 == 0)
    np.testing.assert_array_equal(kid_x, np.stack([key[r].reshape(-1) for _, r in kid_keys]))
    # score_run is run_feature_stats + FID / KID of the merged statistics: the in-process run agrees
    ref, kid_ref = pixel_reference(), np.random.default_rng(2).uniform(0.0, 1.0, (12, 16))
    local = score_run(local_sel, ref, pixels(local=True), kid_reference=kid_ref)
    assert local["executor"] == "local" and local["n"] == stats[0].n == len(main) == 39
    assert local["fid"] == pytest.approx(fid_between(stats[0], ref), rel=1e-10) and local["fid"] > 0.1
    assert [(w["name"], w["start"], w["end"]) for w in local["windows"]] == [("early", 0, 3), ("middle", 3, 5),
                                                                             ("late", 5, 8)]
    for w, st in zip(local["windows"], stats[1:]):
        assert w["n"] == st.n and w["fid"] == pytest.approx(fid_between(st, ref), rel=1e-10)
    k = kid(kid_x, kid_ref, n_subsets=100, subset_size=1000)
    assert local["kid"]["kid"] == pytest.approx(k["kid"], rel=1e-10) and local["kid"]["n"] == len(kid_keys)


# ---- mmgm fid: bad input, smoke, the job script ------------------------------------------------------------

@pytest.mark.ray
def test_actors_that_leave_no_cpu_for_the_readers_are_refused(ray_session, tmp_path):
    """Actors holding every CPU of a fixed cluster (the session's 4) would leave Ray Data's Parquet
    read tasks waiting forever; the request is refused in one line instead, before any actor starts."""
    url = image_run(tmp_path, chains=4, jumps=1)
    with pytest.raises(ValueError, match=r"2 x 2 CPU leave no CPU of this cluster's 4 .* at most 3 CPUs"):
        run_feature_stats(select_run(url, 4), pixels(actors=2, cpus_per_actor=2))


@pytest.fixture(scope="module")
def inception_reference(tmp_path_factory) -> str:
    """Statistics labelled as Inception's (preprocessing, weights hash) of made-up 2048-d features:
    a reference that needs no Inception pass."""
    x = np.random.default_rng(3).uniform(0.0, 1.0, (64, 2048))
    path = str(tmp_path_factory.mktemp("ref") / "ref.npz")
    FeatureStats(preprocessing=PREPROCESSING, weights_sha256=weights_sha256(require_weights())).update(x).save(path)
    return path


def test_fid_bad_input_one_line_nothing_written(tmp_path, capsys):
    """A reference of another feature dimension, a run with nothing committed, a run whose committed rows
    are all divergences, --n beyond the store: exit 2, one line naming the problem, no cache written."""
    url = image_run(tmp_path, chains=4, jumps=3, shape=(1, 8, 8), diverge=None)
    small = tmp_path / "small.npz"
    FeatureStats(preprocessing=PREPROCESSING, weights_sha256="0" * 64).update(np.eye(64)).save(str(small))
    empty = create_run(str(tmp_path), "empty", event_shape=(1, 8, 8)).url
    dead = image_run(tmp_path, "dead", chains=1, jumps=1, shape=(1, 8, 8), diverge=(0, 0))
    cache = tmp_path / "cache"
    cases = [([url, "--n", "4", "--ref", str(small)], f"{small}: dim is 64, expected 2048"),
             ([empty, "--n", "4"], "no committed rows yet"),
             ([dead, "--n", "4"], "no committed samples"),
             ([url, "--n", "13"], "n=13 is more than the 12 committed samples the store holds"),
             ([url, "--n", "4", "--batch-size", "0"], "batch_size must be >= 1")]
    for argv, needle in cases:
        assert cli.main(["fid", *argv, "--local", "--cache", str(cache), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("mmgm fid: error: ") and needle in err, err
    assert not cache.exists()


@pytest.mark.slow
def test_fid_cli_smoke_and_cache(tmp_path, capsys):
    """``mmgm fid RUN --local`` with Inception on 4 sampled 8x8 images, 2 windows and KID against the run's
    data set (digits, from its manifest): one JSON object; the reference statistics and KID features are
    cached, and a second call reuses them (no reference features computed)."""
    url = image_run(tmp_path, chains=4, jumps=2, shape=(1, 8, 8), diverge=None)
    argv = ["fid", url, "--n", "4", "--local", "--ref-n", "4", "--windows", "2", "--window-n", "2", "--kid",
            "--kid-max", "4", "--batch-size", "4", "--json"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    rep = json.loads(out)
    assert rep["n"] == 4 and rep["select"] == "last" and rep["fid"] > 0 and rep["n_reference"] == 4
    assert [w["n"] for w in rep["windows"]] == [2, 2] and rep["kid"]["n"] == rep["kid"]["n_reference"] == 4
    assert rep["preprocessing"] == PREPROCESSING and rep["weights_sha256"] == weights_sha256(require_weights())
    # the windows (jump 0, jump 1) take chains 0 and 2; at jump 1 those are rows of the main selection
    assert rep["images"] == 6 and rep["cache"] == str(tmp_path / "fid-cache")
    assert "FID reference features" in err and "KID reference features" in err
    key = f"digits-train-n4-{PREPROCESSING}-{rep['weights_sha256'][:16]}.npz"
    assert sorted(p.name for p in (tmp_path / "fid-cache").iterdir()) == [f"kid-features-{key}", f"ref-{key}"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    again = json.loads(out)
    # the cached reference is mu/sigma/n, whose sums differ from the computed ones by ~1e-16 relative,
    # which N = 4 (a singular covariance) amplifies to ~1e-9; the KID features are cached as they were
    assert again["fid"] == pytest.approx(rep["fid"], rel=1e-6) and again["kid"] == rep["kid"]
    assert "reference features" not in err


@pytest.mark.slow
def test_jobs_fid_runs_as_a_subprocess(tmp_path, inception_reference):
    url = image_run(tmp_path, chains=3, jumps=1, shape=(1, 8, 8), diverge=None)
    p = subprocess.run(  # unpinned on purpose: fid builds no run config; --device cpu pins Inception
        [sys.executable, str(ROOT / "jobs" / "fid.py"), url, "--n", "3", "--local", "--ref", inception_reference,
         "--batch-size", "3", "--json", "--device", "cpu"], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout)
    assert rep["n"] == 3 and rep["reference"] == inception_reference and rep["fid"] > 0 and rep["cache"] is None


@pytest.mark.slow
@pytest.mark.ray
def test_inception_on_the_actor_pool_equals_one_shot(ray_session, tmp_path, inception_reference, capsys):
    """Real Inception on 2 CPU actors, blocks of 3 rows, partial sums every 4: the merged statistics
    equal those of one in-process pass over the same images (1e-10: every forward pass holds
    batch_size images and runs on one thread in both), and ``mmgm fid`` on the cluster reports the FID of those statistics."""
    url = image_run(tmp_path, chains=6, jumps=2, shape=(1, 8, 8), diverge=None)
    settings = FeatureSettings(batch_size=2, block_rows=3, stats_rows=4, actors=2, cpus_per_actor=1, progress=False)
    sel = select_run(url, 6)
    (stats,), _, images = run_feature_stats(sel, settings)
    x, meta = read_samples(url, min_step=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the 1-CPU actors: oneDNN sums in another order with more threads (~1e-4)
    try:
        inception = InceptionFeatures(batch_size=2)  # labelled like the reference (preprocessing, weights)
        one = new_stats(inception).update(inception.features(x[np.argsort(meta.column("chain_id"))]))
    finally:
        torch.set_num_threads(threads)
    assert images == stats.n == one.n == 6
    np.testing.assert_allclose(stats.mean, one.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.cov, one.cov, rtol=1e-10, atol=1e-12)
    assert cli.main(["fid", url, "--n", "6", "--ref", inception_reference, "--batch-size", "2", "--actors", "1",
                     "--cpus-per-actor", "1", "--no-progress", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["executor"] == "ray" and rep["device"] == "cpu" and rep["n"] == 6 and rep["select"] == "last"
    # N = 6 < 2048: the singular covariance turns summation-order round-off into ~1e-9 relative
    assert rep["fid"] == pytest.approx(fid_between(one, FeatureStats.load(inception_reference)), rel=1e-6)
