"""Procedural chest-CT phantom and synthetic CT-RATE-style cohort (PHANTOM_SPEC.md)."""

from .record import sample_case_record  # noqa: E402  (phantom: case records)
from .render import render_truth  # noqa: E402  (phantom: truth volume)
from .scanner import apply_scanner, default_grid, sample_recon  # noqa: E402  (phantom: scanner model)
