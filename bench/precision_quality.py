"""Does bf16 sampling change a digits run's quality? bf16 vs float32 against float32's own seed noise.

    python bench/precision_quality.py --model runs/digits/model.pt [--chains 256] [--steps 1000]

Three sampling runs of one trained digits model (from ``mmgm run --config digits`` or ``mmgm
train``) with the shipped digits sampler, each followed by the main job's diagnostics and FID
(``mmgm_ray.pipeline`` stages, on a local Ray cluster):

- ``fp32``: float32 eager (``sampler.fast=off``), seed 0;
- ``fp32_seed1``: the same with seed 1: how far two float32 runs' figures fall apart by chance;
- ``bf16``: bf16 autocast for every score evaluation (``sampler.fast=on, autocast=bfloat16``;
  chain state stays float32), seed 0.

bf16 is "within noise" of float32 on a figure when |bf16 - fp32| is at most twice |fp32_seed1 - fp32|
(plus a small floor for figures that agree closely by chance). The figures: FID of the last jumps
and its real-data floor, class switch rate, class total variation against the data, max R-hat and
min bulk ESS. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmgm_ray.cluster import ensure_ray, shutdown_ray  # noqa: E402
from mmgm_ray.config import load_config  # noqa: E402
from mmgm_ray.pipeline import check_main_job, sample_config, stage_diagnose, stage_sample, stage_score  # noqa: E402

RUNS = {"fp32": ("0", ["sampler.fast=off"]),
        "fp32_seed1": ("1", ["sampler.fast=off"]),
        "bf16": ("0", ["sampler.fast=on", "sampler.autocast=bfloat16", "sampler.compile=off"])}
# absolute floors under which a difference is not counted (figures that agree by chance to a hair)
FLOORS = {"fid": 0.5, "switch_rate": 0.01, "class_tv": 0.01, "max_rhat": 0.005, "min_ess_bulk": 50.0}


def one_run(name: str, seed: str, sets: list[str], args, out: str) -> dict:
    """Sample, diagnose and score one run; its figures."""
    cfg = load_config("digits", [f"name=prec-{name}", f"output={out}", f"seed={seed}",
                                 f"pool.num_chains={args.chains}", f"pool.num_steps={args.steps}",
                                 f"evaluate.fid_samples={args.chains}", "evaluate.fid_windows=0", *sets])
    plan = check_main_job(cfg)
    scfg = sample_config(cfg, os.path.abspath(args.model))
    sample = stage_sample(scfg, progress=False)
    diag = stage_diagnose(scfg, plan.dataset, progress=False)
    fid = stage_score(cfg, scfg, plan.dataset, progress=False) or {}
    tr = diag.get("transitions") or {}
    res = {"fid": fid.get("fid"), "real_floor": fid.get("real_floor"), "switch_rate": tr.get("switch_rate"),
           "class_tv": tr.get("tv"), "max_rhat": diag.get("max_rhat"), "min_ess_bulk": diag.get("min_ess_bulk"),
           "chain_steps_per_s": sample.get("chain_steps_per_s")}
    print(f"{name:11s} " + "  ".join(f"{k} {v:.4g}" for k, v in res.items() if v is not None), flush=True)
    return res


def verdicts(runs: dict) -> dict:
    """Per figure: bf16 - fp32, fp32_seed1 - fp32 and whether bf16 is within noise."""
    out = {}
    for key, floor in FLOORS.items():
        a, b, s = runs["fp32"][key], runs["bf16"][key], runs["fp32_seed1"][key]
        if None in (a, b, s):
            continue
        out[key] = {"bf16_minus_fp32": b - a, "seed_minus_fp32": s - a,
                    "within_noise": abs(b - a) <= max(2 * abs(s - a), floor)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained digits model artifact (model.pt)")
    ap.add_argument("--chains", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.model):
        raise SystemExit(f"precision_quality: no model file at {args.model!r} (train one with `mmgm run --config digits`)")
    out = args.out or tempfile.mkdtemp(prefix="mmgm-precision-")
    ensure_ray(None, log_to_driver=False)
    try:
        runs = {name: one_run(name, seed, sets, args, out) for name, (seed, sets) in RUNS.items()}
    finally:
        shutdown_ray()
    res = {"bench": "precision_quality", "chains": args.chains, "steps": args.steps, "runs": runs,
           "compare": verdicts(runs)}
    for key, v in res["compare"].items():
        print(f"{key:13s} bf16 - fp32 {v['bf16_minus_fp32']:+.4g}   seed 1 - seed 0 (fp32) {v['seed_minus_fp32']:+.4g}"
              f"   {'within noise' if v['within_noise'] else 'OUTSIDE NOISE'}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
