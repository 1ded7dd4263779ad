"""`mmgm compare` (every parametrization at the same budget, one table) and `mmgm denoise`."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mmgm_ray.cli import main as mmgm_main
from mmgm_ray.compare import COLUMNS, run_compare
from mmgm_ray.config import CompareConfig, DataConfig, load_config
from mmgm_ray.data import load_dataset
from mmgm_ray.denoise import evaluate_denoiser, measure_and_denoise
from mmgm_ray.factory import load_artifact
from mmgm_ray.train.loop import train_local
from pinned import CPU_PINS, cpu_config

# CI-size budget shared by every variant: tiny training, a few chains, FID at N = 8; 8 jumps per
# chain leave 4 after burn-in, the fewest the diagnostics (and so the class transitions) accept.
# The list replaces digits_compare's own ``set``, so its sampler settings are repeated here.
TINY = ["train.steps=30", "train.checkpoint_every=30", "train.log_every=10", "train.preview.chains=0",
        "train.batch_size=32", "sampler.block_size=32", "sampler.jump_every=10",
        "sampler.delta=0.5", "sampler.gamma=0.5", "sampler.jump_at=half",
        "pool.num_chains=32", "pool.num_steps=80", "pool.checkpoint_every=20", "evaluate.fid_samples=8",
        "evaluate.fid_reference=16", "evaluate.grid_samples=16"]


@pytest.mark.ray
@pytest.mark.slow
def test_compare_runs_every_variant_and_fills_the_table(ray_session, tmp_path):
    cc = load_config("digits_compare", [f"output={tmp_path}", "name=cmp", "denoise_examples=64",
                                        "set=" + json.dumps([*CPU_PINS, *TINY])], cls=CompareConfig)
    assert sorted(cc.variants) == ["mdae", "mem2", "muvb", "universal"]
    res = run_compare(cc, progress=False)
    rows = {r["variant"]: r for r in res["rows"]}
    assert sorted(rows) == sorted(cc.variants)
    for v, r in rows.items():
        assert r["model"] == cc.variant_config(v).model.kind
        # every measured column is a number (digits has no oracle: mse_oracle stays empty)
        for c in ("mse", "mse_identity", "fid", "fid_floor", "train_s", "sample_s", "switch_rate", "class_tv"):
            assert isinstance(r[c], float) and math.isfinite(r[c]), (v, c, r[c])
        assert r["mse_oracle"] is None and r["fid_n"] == 8
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and len(table) == 2 + len(rows)
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"] == res["rows"]


def test_compare_refuses_bad_variants_before_training(tmp_path):
    # unpinned on purpose below: both configs are refused before anything runs
    cc = load_config("digits_compare", [f"output={tmp_path}", "name=cmp"], cls=CompareConfig)  # unpinned on purpose
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['nope'\]"):
        run_compare(cc, variants=["nope"])
    bad = load_config("digits_compare", [f"output={tmp_path}", "name=cmp",  # unpinned on purpose
                                         'variants={"muvb": ["model.kind=muvb", "sampler.walk=reduced"]}'],
                      cls=CompareConfig)
    with pytest.raises(ValueError, match="reduced"):
        run_compare(bad)
    assert not any(tmp_path.iterdir())     # nothing was trained or written


def test_denoise_cli_scores_a_trained_model_and_writes_estimates(tmp_path, capsys):
    cfg = cpu_config("gmm", f"output={tmp_path}", "name=g", "train.steps=200", "train.preview.chains=0",
                     "data.gmm_samples=2000")
    res = train_local(cfg, progress=False)
    out = tmp_path / "denoised.parquet"
    assert mmgm_main(["denoise", "--model", res.artifact, "--limit", "300", "--json", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    model, _, _ = load_artifact(res.artifact)
    assert rep["n"] == 300 and rep["mse"] < 0.7 * rep["mse_identity"]   # a learned denoiser beats the identity
    xs = load_dataset(cfg.data).x[-300:]      # the CLI's held-out rows: the last 300 training examples
    assert rep == {**rep, **evaluate_denoiser(model, xs, seed=0)}     # the library's figures, same measurements
    est = load_dataset(DataConfig(name="parquet", path=str(out))).x
    torch.testing.assert_close(est, measure_and_denoise(model, xs, seed=0))
    assert mmgm_main(["denoise", "--model", str(tmp_path / "missing.pt")]) == 2
