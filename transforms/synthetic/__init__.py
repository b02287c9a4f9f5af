"""Procedural chest-CT phantom and synthetic CT-RATE-style cohort (PHANTOM_SPEC.md)."""
