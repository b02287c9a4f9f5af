"""Procedural chest-CT phantom and synthetic CT-RATE-style cohort.

What is modelled, and how, is written down in ``chest_phantom/README.md``. The package depends on NumPy,
SciPy, nibabel, pydicom and ``ctclip_contract`` only (no torch, no MONAI).
"""

from .record import sample_case_record  # (phantom: case records)
from .render import render_truth  # (phantom: truth volume)
from .scanner import apply_scanner, default_grid, sample_recon  # (phantom: scanner model)
from .reports import generate_report  # (cohort: CT-RATE-style report text)
from .report_parser import labels_from_report  # (cohort: NegEx-style labels from text)
from .cohort import generate_cohort  # (cohort: CT-RATE layout on disk)

__all__ = ["sample_case_record", "render_truth", "apply_scanner", "default_grid", "sample_recon", "generate_report",
           "labels_from_report", "generate_cohort"]
