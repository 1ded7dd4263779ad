"""``mmgm generate``: a sample data set from many long-run chains, with burn-in and thinning.

The chains run on the pool (``run_pool``) into a normal run store, so generation is resumable and
exactly-once like any sampling run; then the kept jumps are read back (committed view) and written
as a Parquet image data set in the layout ``mmgm_ray.data.load_dataset(DataConfig(name='parquet',
path=...))`` reads (``write_parquet_dataset``), plus optional PNG files and a PNG grid.

Selection: walk steps ``1..burn_in`` are discarded (burn_in is rounded up to a multiple of
``jump_every``); of the later jumps every ``thin``-th per chain is kept (the last of each window of
``thin`` jumps); samples are taken round-robin over chains (ordered by step, then chain id), so
N samples from C chains use ceil(N / C) kept jumps per chain.
"""
from __future__ import annotations

import copy
import io
import math
import posixpath
from typing import Optional

import fsspec
import numpy as np
import torch
from PIL import Image

from mmgm_ray.config import RunConfig
from mmgm_ray.data import ImageDataset, write_parquet_dataset
from mmgm_ray.images import save_grid
from mmgm_ray.pool.driver import run_pool
from mmgm_ray.store import load_manifest, read_samples


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


def select(meta_steps: np.ndarray, meta_chains: np.ndarray, burn_in: int, thin: int, jump_every: int,
           n: int) -> np.ndarray:
    """Row indices kept by burn-in + thinning, round-robin over chains, at most ``n``."""
    rel = (meta_steps - burn_in) // jump_every          # 1, 2, ... after burn-in
    ok = np.flatnonzero((meta_steps > burn_in) & (rel % thin == 0))
    order = np.lexsort((meta_chains[ok], meta_steps[ok]))
    return ok[order][:n]


def _is_image(shape: tuple) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def generate_dataset(cfg: RunConfig, out: Optional[str] = None, *, num_samples: Optional[int] = None,
                     burn_in: Optional[int] = None, thin: Optional[int] = None, sample_dtype: str = "float32",
                     png_dir: Optional[str] = None, png_limit: int = 1000, grid: Optional[str] = None,
                     resume: bool = False, storage_options: Optional[dict] = None, progress: bool = True,
                     extend: bool = False, forward_credentials: bool = False) -> dict:
    """Run the chains of ``cfg`` on the pool and write ``num_samples`` kept jumps as a Parquet data set.

    Args:
        cfg: the run config (model or oracle, sampler, pool); ``pool.num_steps`` is replaced by the
            walk length the plan needs (see :func:`plan`).
        out: data set file (``.parquet``) or folder (gets ``part-00000.parquet``); default
            ``{output}/{name}/dataset``.
        num_samples, burn_in, thin: override ``generate.num_samples`` / ``burn_in`` / ``thin``.
        sample_dtype: uint8 (values clipped to [0, 1] first, as images), float16 or float32.
        png_dir: also write one PNG per sample (at most ``png_limit``) for image-shaped samples.
        grid: also write a PNG grid of the first 64 samples (image-shaped samples only).
        resume: continue an interrupted generation run.
        extend: with ``resume``, allow a walk longer than the run recorded (ValueError otherwise:
            a resume never extends a run silently).
        forward_credentials: see :func:`mmgm_ray.pool.run_pool`.

    Returns the pool summary plus {dataset, num_samples, written, burn_in, thin, pngs, grid}; when
    the pool was interrupted, ``status='interrupted'`` and no data set is written.
    """
    p = plan(cfg, num_samples, burn_in, thin)
    run_cfg = copy.deepcopy(cfg)
    run_cfg.pool.num_steps = p["num_steps"]
    run_cfg.generate.num_samples, run_cfg.generate.burn_in, run_cfg.generate.thin = (
        p["num_samples"], p["burn_in"], p["thin"])
    if resume and not extend:
        _refuse_extension(run_cfg, storage_options)
    summary = run_pool(run_cfg, resume=resume, storage_options=storage_options, progress=progress,
                       forward_credentials=forward_credentials)
    summary.update({k: p[k] for k in ("num_samples", "burn_in", "thin")})
    if summary["status"] != "done":
        return summary
    x, meta = read_samples(summary["url"], min_step=p["burn_in"] + 1, storage_options=storage_options)
    idx = select(meta.column("step").to_numpy(), meta.column("chain_id").to_numpy(), p["burn_in"], p["thin"],
                 cfg.sampler.jump_every, p["num_samples"])
    if len(idx) == 0:
        raise ValueError(f"generate: no sample survived burn-in/thinning in {summary['url']} "
                         f"(all chains diverged?)")
    xs = torch.from_numpy(np.ascontiguousarray(x[idx]))
    if sample_dtype == "uint8":
        xs = xs.clamp(0.0, 1.0)  # uint8 stores images in [0, 1]
    shape = tuple(xs.shape[1:])
    ds = ImageDataset(f"generate:{cfg.name}", xs.float(), None, shape, summary["url"])
    target = out or f"{summary['url']}/dataset"
    written = write_parquet_dataset(ds, target, sample_dtype=sample_dtype)
    summary.update({"dataset": target, "dataset_file": written, "written": len(idx),
                    "short": max(0, p["num_samples"] - len(idx)), "pngs": 0, "grid": None})
    if (png_dir or grid) and _is_image(shape):
        summary["pngs"], summary["grid"] = _write_pngs(xs, png_dir, png_limit, grid)
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
