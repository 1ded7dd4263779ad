"""A run report people look at: ``report.html`` (verdict, samples, filmstrips, mixing, classes,
FID, training, provenance) and the ArviZ export of the per-jump functionals.

Never imports Ray. Needs the ``report`` extra (jinja2, matplotlib, arviz, h5netcdf).

* :class:`ReportInputs`: what a report is made of (the run's JSON report plus arrays).
* :func:`render_report`: writes the self-contained ``report.html``.
* :func:`to_inference_data`, :func:`export_arviz`: functionals as ``arviz.InferenceData`` / netCDF.
* :func:`synthetic_inputs`: a small known run for tests.
"""
from mmgm_ray.report.arviz_export import export_arviz, to_inference_data
from mmgm_ray.report.inputs import ReportInputs
from mmgm_ray.report.render import SECTION_IDS, render_html, render_report
from mmgm_ray.report.synthetic import synthetic_inputs
from mmgm_ray.report.verdict import FunctionalSummary, Verdict, draws_factor, functional_summaries, mixing_verdict

__all__ = ["ReportInputs", "render_report", "render_html", "SECTION_IDS", "to_inference_data", "export_arviz",
           "synthetic_inputs", "FunctionalSummary", "Verdict", "draws_factor", "functional_summaries", "mixing_verdict"]
