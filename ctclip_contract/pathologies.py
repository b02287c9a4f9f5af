"""The 18 CT-RATE abnormality labels: the one definition the whole project uses.

The order is CT-CLIP's (and the label-column order of CT-RATE's ``*_predicted_labels.csv``), so a
probability vector, a label vector and a classifier row ``i`` always mean the same pathology.
"""

CTRATE_PATHOLOGIES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

NUM_PATHOLOGIES = len(CTRATE_PATHOLOGIES)


def pathology_index(name: str) -> int:
    """Position of ``name`` in :data:`CTRATE_PATHOLOGIES` (case-insensitive).

    Raises:
        KeyError: naming the unknown pathology and listing the valid ones.
    """
    lowered = [p.lower() for p in CTRATE_PATHOLOGIES]
    try:
        return lowered.index(name.strip().lower())
    except ValueError:
        raise KeyError(f"unknown pathology {name!r}; valid names: {', '.join(CTRATE_PATHOLOGIES)}") from None
