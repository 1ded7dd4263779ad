"""Mixing diagnostics and sample quality for long-run walk-jump chains (pure numpy / torch).

* :mod:`~mmgm_ray.diagnostics.mcmc`: rank-normalized split-R-hat, bulk/tail ESS (Vehtari et al.
  2021), FFT autocorrelation, integrated autocorrelation time (Geyer 1992), batch-means ESS
  (Vats, Flegal & Jones 2019), nested R-hat (Margossian et al. 2024); vectorized for 10^4 chains.
* :mod:`~mmgm_ray.diagnostics.transitions`: class transition counts, visits, dwell, occupancy.
* :mod:`~mmgm_ray.diagnostics.functionals`: per-jump functionals (score norm, kinetic energy,
  mean intensity, principal components, random projections, class) computed batch by batch,
  exactly whatever the batching; :mod:`~mmgm_ray.diagnostics.classifier`: the small classifier.
* :mod:`~mmgm_ray.diagnostics.mixing`: one functional's figures and the mixing report behind
  ``mmgm diagnose RUN`` (the table and the reductions that feed it: ``mmgm_ray.postprocess``).
* :mod:`~mmgm_ray.diagnostics.store_stats`: streaming sample reads for single-process consumers.
* :mod:`~mmgm_ray.diagnostics.inception`: TF Inception-v3 pool3 features under the
  ``"uint8-nv-bilinear-299"`` preprocessing (uint8, NVIDIA/TF1 bilinear resize), a callable class
  for Ray Data ``map_batches``.
* :mod:`~mmgm_ray.diagnostics.fid`: mergeable feature statistics, FID (eigendecomposition square
  root), FID per jump window, KID; reference statistics cached as .npz.
"""
from mmgm_ray.diagnostics.fid import (
    PREPROCESSING,
    FeatureStats,
    InceptionFeatures,
    cached_reference_stats,
    default_weights_path,
    feature_stats,
    fid_between,
    fid_from_features,
    fid_from_store,
    fid_per_window,
    frechet_distance,
    jump_windows,
    kid,
    load_stats,
    reference_cache_path,
    reference_stats,
    save_stats,
    window_stats_from_store,
)
from mmgm_ray.diagnostics.mcmc import (
    autocorr,
    autocov,
    batch_means_ess,
    default_workers,
    ess,
    integrated_autocorr_time,
    nested_rhat,
    rank_normalize,
    rhat,
    split_chains,
    summarize,
)
from mmgm_ray.diagnostics.mixing import format_report, functional_summary, mixing_report
from mmgm_ray.diagnostics.store_stats import chain_index, iter_sample_batches
from mmgm_ray.diagnostics.transitions import (
    class_occupancy,
    dwell_times,
    transition_counts,
    transition_matrix,
    transition_report,
    visit_fractions,
)

__all__ = [
    "split_chains", "rank_normalize", "autocov", "autocorr", "ess", "rhat", "nested_rhat",
    "integrated_autocorr_time", "batch_means_ess", "summarize", "default_workers",
    "transition_counts", "transition_matrix", "visit_fractions", "dwell_times", "class_occupancy",
    "transition_report",
    "chain_index", "iter_sample_batches", "functional_summary", "mixing_report", "format_report",
    "InceptionFeatures", "FeatureStats", "default_weights_path", "frechet_distance",
    "fid_from_features", "kid", "reference_stats", "fid_from_store", "load_stats", "save_stats",
    "PREPROCESSING", "feature_stats", "fid_between", "cached_reference_stats", "reference_cache_path",
    "fid_per_window", "jump_windows", "window_stats_from_store",
]
