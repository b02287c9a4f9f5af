"""Anatomical regions and finding masks: the one definition of the label maps that travel beside a CT volume.

Files beside a volume ``<stem>.nii.gz`` (or a DICOM series folder ``<stem>``), on the volume's grid and affine::

    <stem>_seg.nii.gz        uint8 anatomical label map, ids of :data:`ANATOMY_LABELS` (0 = outside every region)
    <stem>_findings.nii.gz   int32 bit field: bit i set = the voxel belongs to pathology i of CTRATE_PATHOLOGIES

One label table ``anatomy_labels.json`` (:data:`LABEL_TABLE_FILE`, ``{"<id>": "<name>"}``, the layout of
TotalSegmentator's class map) lies at the cohort root. Region names are TotalSegmentator's where the region exists
there (:data:`TOTALSEGMENTATOR_TASK` says in which task); the regions TotalSegmentator does not segment carry our
names (:data:`OWN_REGIONS` says what each holds). Findings overlap (an effusion with passive atelectasis beside it, a
nodule in an emphysematous lobe), hence bits rather than ids.

Pure Python (no numpy): every layer reads it. A user's own TotalSegmentator output is mapped onto these regions with a
JSON mapping file (:func:`read_region_mapping`, :data:`TOTALSEGMENTATOR_TO_REGION` is the default).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .pathologies import CTRATE_PATHOLOGIES

__all__ = [
    "ANATOMY_REGIONS", "ANATOMY_LABELS", "REGION_IDS", "OWN_REGIONS", "TOTALSEGMENTATOR_TASK", "LABEL_TABLE_FILE",
    "SEG_SUFFIX", "FINDINGS_SUFFIX", "FINDINGS_DTYPE", "SEG_DTYPE", "MASK_KEYS", "TOTALSEGMENTATOR_TO_REGION", "MaskError",
    "region_id", "label_table", "read_label_table", "mask_paths", "is_mask_file", "finding_bit", "findings_of_value",
    "read_region_mapping",
]

#: Regions in id order (id = position + 1; 0 is background: air, the table, anything outside the body).
ANATOMY_REGIONS: tuple[str, ...] = (
    "lung_upper_lobe_left",     # 1  with the lingula, as in TotalSegmentator
    "lung_lower_lobe_left",     # 2
    "lung_upper_lobe_right",    # 3
    "lung_middle_lobe_right",   # 4
    "lung_lower_lobe_right",    # 5
    "trachea",                  # 6
    "bronchi",                  # 7  ours
    "esophagus",                # 8
    "thyroid_gland",            # 9
    "heart",                    # 10
    "aorta",                    # 11
    "pulmonary_artery",         # 12
    "superior_vena_cava",       # 13
    "mediastinum",              # 14 ours
    "pleural_space",            # 15 ours
    "bone",                     # 16 ours
    "liver",                    # 17
    "stomach",                  # 18
    "abdomen",                  # 19 ours
    "body_wall",                # 20 ours
)

#: Region id -> name (the content of ``anatomy_labels.json``, with integer keys).
ANATOMY_LABELS: dict[int, str] = {i + 1: name for i, name in enumerate(ANATOMY_REGIONS)}
REGION_IDS: dict[str, int] = {name: i for i, name in ANATOMY_LABELS.items()}

#: The TotalSegmentator task whose multi-label output holds each shared region under the same name.
TOTALSEGMENTATOR_TASK: dict[str, str] = {
    **{name: "total" for name in ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                                  "lung_middle_lobe_right", "lung_lower_lobe_right", "trachea", "esophagus",
                                  "thyroid_gland", "heart", "aorta", "superior_vena_cava", "liver", "stomach")},
    "pulmonary_artery": "heartchambers_highres",
}

#: Our regions (TotalSegmentator has no region of that extent), with what each holds.
OWN_REGIONS: dict[str, str] = {
    "bronchi": "main and lobar bronchi, lumen and wall (TotalSegmentator's lung_vessels task has them, with the "
               "trachea, as lung_trachea_bronchia)",
    "mediastinum": "the rest of the thoracic cavity outside the lungs: mediastinal fat, lymph nodes, the smaller "
                   "great vessels (brachiocephalic veins, supra-aortic arteries), paravertebral tissue",
    "pleural_space": "pleural fluid where a pleural effusion fills the space (empty without one: the normal pleural "
                     "space is thinner than a voxel; TotalSegmentator's pleural_pericard_effusion task labels the "
                     "fluid as pleural_effusion)",
    "bone": "every bone and the costal cartilages (TotalSegmentator splits them into vertebrae_*, rib_*, sternum, "
            "costal_cartilages, scapula_*, clavicula_*, humerus_*)",
    "abdomen": "the upper abdomen below the diaphragm outside the liver and stomach (spleen, kidneys, bowel, fat)",
    "body_wall": "skin, subcutaneous fat, breasts and the chest-wall and back muscles",
}

LABEL_TABLE_FILE = "anatomy_labels.json"
SEG_SUFFIX = "_seg"
FINDINGS_SUFFIX = "_findings"
SEG_DTYPE = "uint8"
FINDINGS_DTYPE = "int32"
#: Keys of the masks in items, records and datalist entries (preprocessing, training). The finding masks are
#: ``findings_mask`` there: an entry's ``findings`` is the report's Findings text.
MASK_KEYS = {"seg": "seg", "findings": "findings_mask"}

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_MASK = re.compile(rf"({SEG_SUFFIX}|{FINDINGS_SUFFIX})\.nii(\.gz)?$", re.IGNORECASE)

#: Default mapping of TotalSegmentator structure names onto our regions (a user's mapping file replaces it).
TOTALSEGMENTATOR_TO_REGION: dict[str, str] = {
    **{name: name for name in TOTALSEGMENTATOR_TASK},
    "lung_trachea_bronchia": "bronchi",
    "pleural_effusion": "pleural_space",
    **{f"vertebrae_{v}": "bone" for v in ["C1", "C2", "C3", "C4", "C5", "C6", "C7", *[f"T{i}" for i in range(1, 13)],
                                          "L1", "L2", "L3", "L4", "L5", "S1"]},
    **{f"rib_{side}_{i}": "bone" for side in ("left", "right") for i in range(1, 13)},
    **{name: "bone" for name in ("sternum", "costal_cartilages", "scapula_left", "scapula_right", "clavicula_left",
                                 "clavicula_right", "humerus_left", "humerus_right", "sacrum")},
    **{name: "mediastinum" for name in ("brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
                                        "common_carotid_artery_right", "common_carotid_artery_left",
                                        "brachiocephalic_vein_left", "brachiocephalic_vein_right",
                                        "pulmonary_vein", "atrial_appendage_left")},
    **{name: "abdomen" for name in ("spleen", "kidney_right", "kidney_left", "gallbladder", "pancreas",
                                    "adrenal_gland_right", "adrenal_gland_left", "small_bowel", "duodenum", "colon",
                                    "inferior_vena_cava", "portal_vein_and_splenic_vein", "kidney_cyst_left",
                                    "kidney_cyst_right")},
    **{name: "body_wall" for name in ("autochthon_left", "autochthon_right", "spinal_cord")},
}


class MaskError(ValueError):
    """A label table, mapping file or mask that cannot be used (the message names the file and the reason)."""


def region_id(name: str) -> int:
    """Id of a region name of :data:`ANATOMY_REGIONS`.

    Raises:
        KeyError: naming the unknown region and listing the valid ones.
    """
    try:
        return REGION_IDS[name]
    except KeyError:
        raise KeyError(f"unknown anatomical region {name!r}; valid: {', '.join(ANATOMY_REGIONS)}") from None


def label_table() -> dict[str, str]:
    """The content of ``anatomy_labels.json``: ``{"<id>": "<name>"}`` in id order (JSON keys are strings)."""
    return {str(i): name for i, name in ANATOMY_LABELS.items()}


def read_label_table(path: str | os.PathLike) -> dict[int, str]:
    """Read a label table ``{"<id>": "<name>"}`` (ids 1..255; 0 is background and may be listed as such).

    Raises:
        MaskError: naming the file and what is wrong (not JSON, not an object, a key that is not an id in 1..255,
            a name that is not a non-empty string, a name used twice).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MaskError(f"{path}: not a readable label table ({e})") from None
    if not isinstance(data, dict) or not data:
        raise MaskError(f"{path}: a label table is a JSON object {{\"<id>\": \"<name>\"}}, got {type(data).__name__}")
    table: dict[int, str] = {}
    for key, name in data.items():
        if not (isinstance(key, str) and key.strip().isdigit() and 0 <= int(key) <= 255):
            raise MaskError(f"{path}: label id {key!r} is not an integer in 0..255")
        if not isinstance(name, str) or not name.strip():
            raise MaskError(f"{path}: label {key} has no name ({name!r})")
        if int(key) == 0:
            continue  # background, if the table lists it
        if name in table.values():
            raise MaskError(f"{path}: region name {name!r} is used by two ids")
        table[int(key)] = name.strip()
    return table


def mask_paths(volume: str | os.PathLike) -> dict[str, Path]:
    """Where the masks of a volume lie: ``{"seg": <stem>_seg.nii.gz, "findings": <stem>_findings.nii.gz}`` beside
    the NIfTI file ``<stem>.nii[.gz]`` or the DICOM series folder ``<stem>`` (whether or not they exist)."""
    volume = Path(volume)
    stem = _NIFTI.sub("", volume.name)
    return {"seg": volume.with_name(f"{stem}{SEG_SUFFIX}.nii.gz"),
            "findings": volume.with_name(f"{stem}{FINDINGS_SUFFIX}.nii.gz")}


def is_mask_file(name: str | os.PathLike) -> bool:
    """True for a file named like a mask of :func:`mask_paths` (``*_seg.nii[.gz]``, ``*_findings.nii[.gz]``)."""
    return bool(_MASK.search(Path(name).name))


def finding_bit(pathology: str) -> int:
    """The bit value (``1 << index``) of a CT-RATE pathology in a findings mask.

    Raises:
        KeyError: the name is not one of :data:`CTRATE_PATHOLOGIES`.
    """
    try:
        return 1 << CTRATE_PATHOLOGIES.index(pathology)
    except ValueError:
        raise KeyError(f"unknown pathology {pathology!r}; valid: {', '.join(CTRATE_PATHOLOGIES)}") from None


def findings_of_value(value: int) -> list[str]:
    """The pathologies whose bits are set in one findings-mask value."""
    return [name for i, name in enumerate(CTRATE_PATHOLOGIES) if int(value) >> i & 1]


def read_region_mapping(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """A mapping file for a user's own segmentation (e.g. TotalSegmentator output) onto our regions.

    The file is JSON::

        {"regions": {"<their structure name>": "<our region name>", ...},
         "labels":  {"<their id>": "<their structure name>", ...}}

    ``regions`` says which of our regions each of their structures belongs to (structures not listed are dropped:
    background); ``labels`` is the label table of their multi-label file (not needed for a folder of one file per
    structure, where the file name is the structure name). Without a file: :data:`TOTALSEGMENTATOR_TO_REGION` and no
    ``labels``.

    Returns:
        ``{"regions": {name: our_id}, "labels": {their_id: name} or None, "path": str or None}``.

    Raises:
        MaskError: naming the file and the reason (unknown region, malformed entries).
    """
    if path is None:
        return {"regions": {k: REGION_IDS[v] for k, v in TOTALSEGMENTATOR_TO_REGION.items()}, "labels": None,
                "path": None}
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MaskError(f"{path}: not a readable mapping file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("regions"), Mapping) or not data["regions"]:
        raise MaskError(f"{path}: a mapping file is a JSON object with a non-empty \"regions\" object "
                        "{\"<their structure name>\": \"<our region name>\"}")
    regions = {}
    for theirs, ours in data["regions"].items():
        if ours not in REGION_IDS:
            raise MaskError(f"{path}: {theirs!r} is mapped to {ours!r}, not one of our regions "
                            f"({', '.join(ANATOMY_REGIONS)})")
        regions[str(theirs)] = REGION_IDS[ours]
    labels = None
    if data.get("labels") is not None:
        if not isinstance(data["labels"], Mapping):
            raise MaskError(f"{path}: \"labels\" must be an object {{\"<id>\": \"<name>\"}}")
        labels = {}
        for key, name in data["labels"].items():
            if not (isinstance(key, str) and key.strip().isdigit()) or not isinstance(name, str):
                raise MaskError(f"{path}: label entry {key!r}: {name!r} is not \"<integer id>\": \"<name>\"")
            if int(key) != 0:
                labels[int(key)] = name
    return {"regions": regions, "labels": labels, "path": str(path)}
