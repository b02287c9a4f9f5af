"""Procedural chest-CT phantom and synthetic CT-RATE-style cohort (PHANTOM_SPEC.md)."""

from .record import sample_case_record  # noqa: E402  (phantom: case records)
from .render import render_truth  # noqa: E402  (phantom: truth volume)
from .scanner import apply_scanner, default_grid, sample_recon  # noqa: E402  (phantom: scanner model)
from .reports import generate_report  # noqa: E402  (cohort: CT-RATE-style report text)
from .report_parser import labels_from_report  # noqa: E402  (cohort: NegEx-style labels from text)
from .cohort import generate_cohort  # noqa: E402  (cohort: CT-RATE layout on disk)
