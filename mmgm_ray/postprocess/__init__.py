"""Post-processing of a run's sample store at cluster scale (the Ray layer's read side).

* :mod:`~mmgm_ray.postprocess.source`: one read path over the committed view, in this process
  (pyarrow) or on the cluster (Ray Data), yielding the same rows.
* :mod:`~mmgm_ray.postprocess.table`: the functionals table next to the store, built
  incrementally from the committed view (Ray Data ``map_batches`` or a loop here).
* :mod:`~mmgm_ray.postprocess.reduce`: the chain layout and one reduction per functional, as Ray
  tasks or in this process.
* :mod:`~mmgm_ray.postprocess.diagnose`: ``mmgm diagnose RUN``, :func:`load_functionals` and the
  ArviZ export.
* :mod:`~mmgm_ray.postprocess.selection`: deterministic row selections (FID, generation).
* :mod:`~mmgm_ray.postprocess.fid`: FID / KID with Inception on a Ray Data actor pool (``mmgm fid``).
* :mod:`~mmgm_ray.postprocess.generate`: ``mmgm generate``'s data set, written by Ray Data.
"""
from mmgm_ray.postprocess.diagnose import DEFAULT_STATS, diagnose, export_functionals, load_functionals, run_request
from mmgm_ray.postprocess.reduce import Window
from mmgm_ray.postprocess.source import CommittedView, decode_samples, open_committed
from mmgm_ray.postprocess.table import FunctionalsTable, open_table, update_table

__all__ = ["CommittedView", "open_committed", "decode_samples", "diagnose", "run_request", "load_functionals",
           "export_functionals", "DEFAULT_STATS", "Window", "FunctionalsTable", "open_table", "update_table"]
