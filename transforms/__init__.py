"""Data side of the pipeline: MONAI dictionary transforms for chest CT and CT-RATE table readers."""

from .pathologies import CTRATE_PATHOLOGIES, NUM_PATHOLOGIES, pathology_index
