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
* :mod:`~mmgm_ray.diagnostics.fid`: Inception-v3 features, FID (eigendecomposition square root)
  and KID; reference statistics as .npz.
"""
from mmgm_ray.diagnostics.fid import (
    FeatureStats,
    InceptionFeatures,
    default_weights_path,
    fid_from_features,
    fid_from_store,
    frechet_distance,
    kid,
    load_stats,
    reference_stats,
    save_stats,
)
from mmgm_ray.diagnostics.mcmc import (
    autocorr,
    autocov,
    batch_means_ess,
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
    "integrated_autocorr_time", "batch_means_ess", "summarize",
    "transition_counts", "transition_matrix", "visit_fractions", "dwell_times", "class_occupancy",
    "transition_report",
    "chain_index", "iter_sample_batches", "functional_summary", "mixing_report", "format_report",
    "InceptionFeatures", "FeatureStats", "default_weights_path", "frechet_distance",
    "fid_from_features", "kid", "reference_stats", "fid_from_store", "load_stats", "save_stats",
]
