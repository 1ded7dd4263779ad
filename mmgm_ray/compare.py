"""``mmgm compare``: the parametrizations of the papers side by side, at the same budget.

Every variant of a :class:`~mmgm_ray.config.CompareConfig` is the same base run with its own model
overrides (universal, MDAE, MEM^2, MUVB, ...); each runs the whole main job (``pipeline.run_pipeline``:
Ray Train, the chain pool, diagnostics, FID at the same N) and its trained artifact is scored as a
denoiser on held-out data. One table comes out, ``{output}/{name}/compare.json`` and ``compare.md``:

- denoising MSE per coordinate next to the identity estimator's (mean of the M measurements) and,
  where the data set has a closed-form posterior mean (the synthetic ``gmm``), the Bayes risk;
- mixing: the largest R-hat and the smallest bulk ESS over the functionals;
- class-based quality (labelled data): class switch rate and the total variation between the chains'
  class occupancy and the data's;
- FID and the real-data floor at the same N; training and sampling time.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

import fsspec

from mmgm_ray.cluster import require_ray
from mmgm_ray.config import CompareConfig, DataConfig, RunConfig, from_dict, to_dict
from mmgm_ray.data import ImageDataset, load_dataset
from mmgm_ray.denoise import evaluate_denoiser
from mmgm_ray.factory import build_oracle, load_artifact
from mmgm_ray.pipeline import check_main_job, run_pipeline

COLUMNS = ("variant", "model", "mse", "mse_identity", "mse_oracle", "max_rhat", "min_ess_bulk", "switch_rate",
           "class_tv", "fid", "fid_floor", "fid_n", "train_s", "sample_s")


def heldout(cfg: RunConfig, n: int) -> tuple[ImageDataset, str]:
    """Up to ``n`` examples the model did not train on: the test split where the data set has one,
    else the last ``n`` training examples (said so in the table: 'in-sample')."""
    if cfg.data.name in ("mnist", "fashion_mnist", "cifar10"):
        ds = load_dataset(from_dict(DataConfig, {**to_dict(cfg.data), "split": "test", "limit": n}))
        return ds, f"{cfg.data.name} test split"
    ds = load_dataset(cfg.data)
    return ImageDataset(ds.name, ds.x[-n:], None, ds.event_shape, ds.source), f"last {min(n, len(ds))} training examples (in-sample)"


def denoising_row(cfg: RunConfig, artifact: str, n: int) -> dict:
    """Denoising MSE of the trained artifact on held-out data, with the Bayes risk when an oracle exists."""
    model, _, _ = load_artifact(artifact, "cpu")
    data, source = heldout(cfg, n)
    oracle = None
    if cfg.data.name == "gmm":  # the mixture's exact posterior mean: the Bayes-risk floor
        gmm = build_oracle(from_dict(RunConfig, {**to_dict(cfg), "oracle": {"kind": "gmm"}}), data.event_shape)
        oracle = lambda y: gmm.double().score(y.double()).xhat  # noqa: E731
    rep = evaluate_denoiser(model, data.x, seed=cfg.seed, oracle=oracle)
    return {**rep, "denoise_data": source}


def variant_row(name: str, cfg: RunConfig, report: dict, denoising: dict) -> dict:
    diag = report.get("diagnostics") or {}
    trans = diag.get("transitions") or {}
    fid = report.get("fid") or {}
    return {"variant": name, "model": cfg.model.kind, "mse": denoising["mse"],
            "mse_identity": denoising["mse_identity"], "mse_oracle": denoising.get("mse_oracle"),
            "max_rhat": diag.get("max_rhat"), "min_ess_bulk": diag.get("min_ess_bulk"),
            "switch_rate": trans.get("switch_rate"), "class_tv": trans.get("tv"),
            "fid": fid.get("fid"), "fid_floor": fid.get("real_floor"), "fid_n": fid.get("n"),
            "train_s": report["train"]["seconds"], "sample_s": report["sample"]["seconds"],
            "report": f"{cfg.run_dir}-samples/report.json", "denoise_data": denoising["denoise_data"]}


def markdown_table(rows: list[dict]) -> str:
    def cell(v) -> str:
        return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_compare(cc: CompareConfig, progress: bool = True, variants: Optional[list[str]] = None) -> dict:
    """Run every variant (or the named ones) and write the table; returns {"rows", "table", "json"}."""
    names = variants or list(cc.variants)
    unknown = sorted(set(names) - set(cc.variants))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the config has {sorted(cc.variants)}")
    cfgs = {v: cc.variant_config(v) for v in names}
    for cfg in cfgs.values():   # every variant is checked before the first one trains
        check_main_job(cfg)
    require_ray("mmgm compare")
    rows = []
    for v, cfg in cfgs.items():
        if progress:
            print(f"[mmgm compare] variant {v}: model.kind={cfg.model.kind}", file=sys.stderr, flush=True)
        report = run_pipeline(cfg, progress=progress)
        if report["sample"]["status"] != "done":
            raise RuntimeError(f"variant {v}: sampling did not finish; rerun the same command to resume")
        rows.append(variant_row(v, cfg, report, denoising_row(cfg, report["train"]["artifact"],
                                                              cc.denoise_examples)))
    out = f"{cc.output.rstrip('/')}/{cc.name}"
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/compare.json", json.dumps({"config": to_dict(cc), "rows": rows}, indent=2).encode())
    fs.pipe_file(f"{root}/compare.md", markdown_table(rows).encode())
    return {"rows": rows, "table": f"{out}/compare.md", "json": f"{out}/compare.json"}
