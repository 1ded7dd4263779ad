"""Configs of the GPU tests: every one names its devices (never ``auto``)."""
from __future__ import annotations

from mmgm_ray.config import RunConfig, from_dict, load_config


def gmm_run(out, name: str, **pool) -> RunConfig:
    """A small oracle sampling run: 512 chains on 2 actors sharing the GPU (0.5 each), committing at
    every boundary (a run stopped after its first chunk must stop mid-run)."""
    return from_dict(RunConfig, {
        "name": name, "output": str(out), "seed": 5, "noise": {"sigma": 1.0, "M": 4},
        "oracle": {"kind": "gmm"}, "data": {"name": "gmm"}, "sampler": {"block_size": 64, "jump_every": 5},
        "store": {"rows_per_file": 500}, "train": {"device": "cuda"},
        "pool": {"num_chains": 512, "num_steps": 60, "checkpoint_every": 20, "num_actors": 2,
                 "device": "cuda", "gpus_per_actor": 0.5, "checkpoint_min_interval_s": 0.0, **pool}})


def digits_run(out, name: str, *overrides: str) -> RunConfig:
    """A tiny digits training run on the GPU."""
    return load_config("digits", ["train.device=cuda", "pool.device=cpu", "model.net.channels=16",
                                  "train.batch_size=32", "train.warmup_steps=5", "train.log_every=5",
                                  "train.checkpoint_every=10", "train.preview.chains=0", f"output={out}",
                                  f"name={name}", *overrides])
