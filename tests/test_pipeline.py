"""The main job end to end (Ray Train -> chain pool -> Parquet -> diagnostics -> FID -> PNG), tiny."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from mmgm_ray.pipeline import run_pipeline
from pinned import cpu_config

TINY = ["train.steps=30", "train.checkpoint_every=30", "train.log_every=10", "train.preview.chains=0",
        "train.batch_size=32", "sampler.block_size=32", "sampler.jump_every=10",
        "pool.num_chains=64", "pool.num_steps=40", "pool.checkpoint_every=20",
        "evaluate.fid_samples=8", "evaluate.fid_reference=16", "evaluate.grid_samples=16"]


@pytest.mark.ray
@pytest.mark.slow
def test_main_job_end_to_end_and_rerun_resumes(ray_session, tmp_path):
    cfg = cpu_config("digits", *TINY, f"output={tmp_path}", "name=main")
    rep = run_pipeline(cfg, progress=False)
    assert rep["sample"]["status"] == "done"
    assert rep["sample"]["samples"] == 64 * 4                         # every (chain, jump) once
    assert rep["train"]["steps"] == 30
    assert rep["diagnostics"]["chains"] == 64
    assert math.isfinite(rep["fid"]["fid"]) and math.isfinite(rep["fid"]["real_floor"])
    assert rep["fid"]["n"] == 8
    run = tmp_path / "main-samples"
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["model_hash"] == rep["model_hash"] and on_disk["code_version"]
    with Image.open(run / "samples.png") as im:                      # 4x4 grid of 8x8 digits at 4x
        assert im.size[0] == im.size[1] and im.size[0] >= 4 * 8 * 4
    # a rerun resumes: training is complete, the finished sampling run is reused, nothing duplicated
    rep2 = run_pipeline(cfg, progress=False)
    assert rep2["sample"]["reused"] is True and rep2["train"]["steps"] == 30
    from mmgm_ray.store import read_samples
    x, meta = read_samples(str(run))
    keys = set(zip(meta.column("chain_id").to_pylist(), meta.column("jump_index").to_pylist()))
    assert len(keys) == len(x) == 64 * 4


def test_main_job_refuses_oracle_configs(tmp_path):
    cfg = cpu_config("gmm_sample", f"output={tmp_path}")
    with pytest.raises(ValueError, match="oracle"):
        run_pipeline(cfg, progress=False)
