"""mmgm-ray: multimeasurement generative models (MMGM / USSF), trained and sampled on Ray.

The math core (noise models, score models, oracles, integrators, the walk-jump engine) is pure
PyTorch; importing ``mmgm_ray`` never imports Ray. The Ray layers live in ``mmgm_ray.train`` and
``mmgm_ray.pool``.
"""
__version__ = "0.1.0"
