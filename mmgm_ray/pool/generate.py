"""``mmgm generate``: a sample data set from many long-run chains, with burn-in and thinning.

The chains run on the pool (``run_pool``) into a normal run store, so generation is resumable and
exactly-once like any sampling run; then Ray Data writes the kept jumps of the committed view as a
Parquet data set folder, streaming and without the driver
(:mod:`mmgm_ray.postprocess.generate`; ``mmgm_ray.data.load_dataset(DataConfig(name='parquet',
path=...))`` reads it), plus optional PNG files and a PNG grid of the first samples.

Selection (deterministic: the same rows whatever the number of workers or blocks): walk steps
``1..burn_in`` are discarded (burn_in is rounded up to a multiple of ``jump_every``); of the later
jumps every ``thin``-th per chain is kept (steps ``burn_in + i * thin * jump_every``, i >= 1);
samples are taken round-robin over chains: the first N kept jumps in (step, chain id) order, so N
samples from C chains use ceil(N / C) kept jumps per chain. The data set's rows are loaded in
that order (each row records its ``step`` and ``chain_id``).
"""
from __future__ import annotations

import copy
import io
import math
import posixpath
from typing import Optional

import fsspec
import torch
from PIL import Image

from mmgm_ray.config import RunConfig
from mmgm_ray.images import save_grid
from mmgm_ray.pool.driver import run_pool
from mmgm_ray.postprocess.generate import check_target, first_rows, write_generated
from mmgm_ray.postprocess.source import open_committed
from mmgm_ray.store import load_manifest


def plan(cfg: RunConfig, num_samples: Optional[int] = None, burn_in: Optional[int] = None,
         thin: Optional[int] = None) -> dict:
    """Resolve (num_samples, burn_in, thin) against ``cfg.generate``; return them with the walk length."""
    g = cfg.generate
    n = int(num_samples if num_samples is not None else (g.num_samples or cfg.pool.num_chains))
    b = int(burn_in if burn_in is not None else g.burn_in)
    t = int(thin if thin is not None else g.thin)
    if n < 1 or b < 0 or t < 1:
        raise ValueError(f"generate needs num_samples >= 1, burn_in >= 0, thin >= 1 (got {n}, {b}, {t})")
    k = cfg.sampler.jump_every
    b = math.ceil(b / k) * k
    per_chain = math.ceil(n / cfg.pool.num_chains)
    return {"num_samples": n, "burn_in": b, "thin": t, "jumps_per_chain": per_chain,
            "num_steps": b + per_chain * t * k}


def _is_image(shape: tuple) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def generate_dataset(cfg: RunConfig, out: Optional[str] = None, *, num_samples: Optional[int] = None,
                     burn_in: Optional[int] = None, thin: Optional[int] = None, sample_dtype: str = "float32",
                     png_dir: Optional[str] = None, png_limit: int = 1000, grid: Optional[str] = None,
                     resume: bool = False, storage_options: Optional[dict] = None, progress: bool = True,
                     allow_device_change: bool = False, extend: bool = False, forward_credentials: bool = False) -> dict:
    """Run the chains of ``cfg`` on the pool and write ``num_samples`` kept jumps as a Parquet data set.

    Args:
        cfg: the run config (model or oracle, sampler, pool); ``pool.num_steps`` is replaced by the
            walk length the plan needs (see :func:`plan`).
        out: data set folder (must not exist, or be empty; a name ending in ``.parquet`` is a folder
            too); default ``{output}/{name}/dataset``.
        num_samples, burn_in, thin: override ``generate.num_samples`` / ``burn_in`` / ``thin``.
        sample_dtype: uint8 (values clipped to [0, 1] first, as images), float16 or float32.
        png_dir: also write one PNG per sample (at most ``png_limit``) for image-shaped samples.
        grid: also write a PNG grid of the first 64 samples (image-shaped samples only).
        resume: continue an interrupted generation run.
        allow_device_change: resume on another device class than the run recorded (``run_pool``).
        extend: with ``resume``, allow a walk longer than the run recorded (ValueError otherwise:
            a resume never extends a run silently).
        forward_credentials: see :func:`mmgm_ray.pool.run_pool`.

    Returns the pool summary plus {dataset, dataset_files, num_samples, written, short, burn_in, thin,
    pngs, grid}; when the pool was interrupted, ``status='interrupted'`` and no data set is written.
    """
    p = plan(cfg, num_samples, burn_in, thin)
    run_cfg = copy.deepcopy(cfg)
    run_cfg.pool.num_steps = p["num_steps"]
    run_cfg.generate.num_samples, run_cfg.generate.burn_in, run_cfg.generate.thin = (
        p["num_samples"], p["burn_in"], p["thin"])
    if out:
        check_target(out)  # before any chain runs
    if resume and not extend:
        _refuse_extension(run_cfg, storage_options)
    summary = run_pool(run_cfg, resume=resume, storage_options=storage_options, progress=progress,
                       allow_device_change=allow_device_change, forward_credentials=forward_credentials)
    summary.update({k: p[k] for k in ("num_samples", "burn_in", "thin")})
    if summary["status"] != "done":
        return summary
    target = out or f"{summary['url']}/dataset"
    sel = (p["num_samples"], p["burn_in"], p["thin"], cfg.sampler.jump_every)
    res = write_generated(summary["url"], target, *sel, sample_dtype=sample_dtype, name=f"generate:{cfg.name}",
                          storage_options=storage_options)
    summary.update({"dataset": target, "dataset_files": res["files"], "written": res["written"],
                    "short": max(0, p["num_samples"] - res["written"]), "pngs": 0, "grid": None})
    view = open_committed(summary["url"], storage_options)
    shape = tuple(view.info["shape"])
    if (png_dir or grid) and _is_image(shape):
        k = min(res["written"], max(png_limit if png_dir else 0, 64 if grid else 0))
        xs = torch.from_numpy(first_rows(view, k, *sel[1:]))
        summary["pngs"], summary["grid"] = _write_pngs(xs.clamp(0.0, 1.0), png_dir, png_limit, grid)
    elif png_dir or grid:
        summary["png_note"] = f"samples of shape {list(shape)} are not images; no PNG written"
    return summary


def _refuse_extension(run_cfg: RunConfig, storage_options: Optional[dict]) -> None:
    """ValueError when resuming would walk the chains further than the run recorded."""
    man = load_manifest(run_cfg.run_dir, storage_options)
    recorded = ((man or {}).get("config") or {}).get("pool", {}).get("num_steps")
    if recorded is not None and run_cfg.pool.num_steps > int(recorded):
        g = run_cfg.generate
        raise ValueError(f"generate --resume {run_cfg.run_dir}: {g.num_samples} samples with burn-in {g.burn_in} and "
                         f"thin {g.thin} need {run_cfg.pool.num_steps} walk steps per chain, the run recorded "
                         f"{recorded}; pass --extend to walk the chains further, or the run's own --num-samples "
                         f"/ --burn-in / --thin")


def _write_pngs(x: torch.Tensor, png_dir: Optional[str], limit: int, grid: Optional[str]) -> tuple[int, Optional[str]]:
    count = 0
    if png_dir:
        fs, root = fsspec.core.url_to_fs(png_dir)
        fs.makedirs(root, exist_ok=True)
        arr = (x[:limit].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, a in enumerate(arr):
            buf = io.BytesIO()
            Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, format="PNG")
            fs.pipe_file(posixpath.join(root, f"sample-{i:06d}.png"), buf.getvalue())
            count += 1
    if grid:
        h = x.shape[2]
        save_grid(x[:64], grid, nrow=8, scale=max(1, 64 // max(h, 1)))
    return count, grid
