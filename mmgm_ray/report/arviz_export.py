"""Hand a run's per-jump functionals to ArviZ: an ``InferenceData`` in memory or a netCDF file.

The posterior group holds one variable per functional with dims ``(chain, draw)``: the chain
coordinate is the chain id, the draw coordinate the jump index, so ``arviz.rhat`` / ``arviz.ess``
/ ``arviz.plot_trace`` work on a run as on any other sampler's output and give the same figures
as :mod:`mmgm_ray.diagnostics.mcmc`. Per-jump sampler quantities that are not functionals of the
sample (the score norm, the kinetic energy of the walk's velocity) go to ``sample_stats``.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import arviz as az
import numpy as np

__all__ = ["to_inference_data", "export_arviz"]


def _arrays(group: str, arrays: Mapping[str, np.ndarray], shape: Optional[tuple]) -> tuple[dict, tuple]:
    out = {}
    for name, v in arrays.items():
        a = np.asarray(v, dtype=np.float64)
        if a.ndim != 2:
            raise ValueError(f"{group}[{name!r}] must be a (chains, draws) array, got shape {a.shape}")
        if shape is not None and a.shape != shape:
            raise ValueError(f"{group}[{name!r}] has shape {a.shape}, expected {shape} like the others")
        if not name or "/" in name:
            raise ValueError(f"{group} name {name!r} is not a valid variable name (empty or has '/')")
        shape = a.shape
        out[str(name)] = a
    return out, shape


def to_inference_data(functionals: Mapping[str, np.ndarray],
                      sample_stats: Optional[Mapping[str, np.ndarray]] = None, *,
                      chain_ids: Optional[np.ndarray] = None, jump_index: Optional[np.ndarray] = None,
                      attrs: Optional[Mapping[str, object]] = None) -> az.InferenceData:
    """An ``InferenceData`` with a ``posterior`` group (one variable per functional, dims
    ``(chain, draw)``) and, when given, a ``sample_stats`` group (e.g. ``score_norm``,
    ``kinetic``: the kinetic energy; deliberately not named ``energy``, which ArviZ reads as the
    Hamiltonian of HMC for its BFMI).

    Args:
        functionals: name -> ``(chains, draws)`` float array, every one the same shape.
        sample_stats: name -> ``(chains, draws)`` array of the same shape.
        chain_ids: ``(chains,)`` the ``chain`` coordinate (default 0..chains-1).
        jump_index: ``(draws,)`` the ``draw`` coordinate (default 0..draws-1).
        attrs: string/number attributes to record (run name, model hash, code version...).
    """
    if not functionals:
        raise ValueError("to_inference_data needs at least one functional")
    post, shape = _arrays("functionals", functionals, None)
    stats, _ = _arrays("sample_stats", sample_stats or {}, shape)
    coords = {"chain": np.arange(shape[0]) if chain_ids is None else np.asarray(chain_ids),
              "draw": np.arange(shape[1]) if jump_index is None else np.asarray(jump_index)}
    for dim, n in zip(("chain", "draw"), shape):
        if coords[dim].shape != (n,):
            raise ValueError(f"the {dim} coordinate has shape {coords[dim].shape}, expected ({n},)")
    return az.from_dict(posterior=post, sample_stats=stats or None, coords=coords,
                        attrs={str(k): v for k, v in (attrs or {}).items()})


def export_arviz(path: str, functionals: Mapping[str, np.ndarray],
                 sample_stats: Optional[Mapping[str, np.ndarray]] = None, **kwargs) -> str:
    """Write :func:`to_inference_data` to ``path`` (must end in ``.nc``: netCDF-4 through
    h5netcdf, read back with ``arviz.from_netcdf``); returns ``path``. Keyword arguments go to
    :func:`to_inference_data`."""
    if not str(path).endswith(".nc"):
        # ArviZ 0.23 writes zarr only with zarr < 3, which this project does not install
        raise ValueError(f"export_arviz writes netCDF: the path must end in .nc, got {path!r}")
    idata = to_inference_data(functionals, sample_stats, **kwargs)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    idata.to_netcdf(str(path), engine="h5netcdf")
    return str(path)
