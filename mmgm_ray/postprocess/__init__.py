"""Post-processing of a run's sample store at cluster scale (the Ray layer's read side).

* :mod:`~mmgm_ray.postprocess.source`: one read path over the committed view, in this process
  (pyarrow) or on the cluster (Ray Data), yielding the same rows.
* :mod:`~mmgm_ray.postprocess.selection`: deterministic row selections (FID, generation).
* :mod:`~mmgm_ray.postprocess.fid`: FID / KID with Inception on a Ray Data actor pool (``mmgm fid``).
* :mod:`~mmgm_ray.postprocess.generate`: ``mmgm generate``'s data set, written by Ray Data.
"""
from mmgm_ray.postprocess.source import CommittedView, decode_samples, open_committed

__all__ = ["CommittedView", "open_committed", "decode_samples"]
