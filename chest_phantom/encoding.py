"""Storage layer of the synthetic cohort: HU → stored integers, orientation, NIfTI files.

README, "Storage encodings and orientations" and "NIfTI files".

The same HU volume can be written in every way real chest CT arrives, so that the preprocessing
has something to undo:

* **stored values** (:data:`ENCODINGS`): int16 with intercept −1024 (stored = HU + 1024), uint16
  12-bit with intercept −1024, uint16 with slope 2 or 0.5 and intercept −2048, stored = HU with
  intercept 0, the original CT-RATE release (raw values, rescale only in the metadata CSV) and the
  CT-RATE ``_fixed`` trap (stored = HU while the metadata row still says intercept −1024);
* **padding** outside the reconstruction circle (−2048, −3024, −8192 HU, or the lowest value the
  encoding can hold, as "raw 0" scanners do);
* **orientation** of the stored array (:data:`ORIENTATIONS`): RAS, LPS, LAS (dcm2niix style),
  prone (IOP ``[-1, 0, 0, 0, -1, 0]``, DICOM only) and the original CT-RATE release's broken
  NIfTI geometry (sform_code 0, identity qform; the metadata row holds the truth).

Arrays handed to this module are on the renderer's grid: index ``(i, j, k)`` → patient LPS mm
``origin + (i*sx, j*sy, k*sz)`` (axis 0 toward Left, 1 toward Posterior, 2 toward Superior).
All writes are atomic (:func:`ctclip_contract.atomic_write_bytes`: temporary name, then rename).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctclip_contract import atomic_write_bytes, gzip_compress, route_nibabel_gzip

# nibabel reads of the cohort (the preview, the tests' readers) inflate with ISA-L, as the pipeline's do
route_nibabel_gzip(nib.openers)

__all__ = [
    "ENCODINGS", "ORIENTATIONS", "HU_CLIP", "quantise", "orient", "write_nifti", "affine_lps",
    "decode_hu", "encoding_facts", "write_label_nifti",
]

#: Tissue values are clipped to the 12-bit CT range before storage; padding may lie below it.
HU_CLIP = (-1024.0, 3071.0)

#: Storage encodings. ``header_rescale``: the file itself carries slope/intercept (NIfTI
#: scl_slope/scl_inter, DICOM RescaleSlope/RescaleIntercept); when False the stored integers are
#: in the file unscaled and only the metadata row says how to get HU. ``row_*`` is what the
#: metadata CSV row says; it differs from the truth only for the deliberate ``hu_fixed_trap``.
ENCODINGS: dict[str, dict[str, Any]] = {
    "int16_offset": {"dtype": "int16", "slope": 1.0, "intercept": -1024.0, "bits_stored": 16, "header_rescale": True,
                     "formats": ("nifti", "dicom"), "description": "int16, stored = HU + 1024, intercept -1024 (most common DICOM)"},
    "int16_offset_raw": {"dtype": "int16", "slope": 1.0, "intercept": -1024.0, "bits_stored": 16, "header_rescale": False,
                         "formats": ("nifti",), "description": "int16, stored = HU + 1024, rescale only in the metadata CSV (original CT-RATE release)"},
    "int16_hu": {"dtype": "int16", "slope": 1.0, "intercept": 0.0, "bits_stored": 16, "header_rescale": True,
                 "formats": ("nifti", "dicom"), "description": "int16, stored = HU, intercept 0 (TCIA Pancreas-CT style)"},
    "uint16_12bit": {"dtype": "uint16", "slope": 1.0, "intercept": -1024.0, "bits_stored": 12, "header_rescale": True,
                     "formats": ("nifti", "dicom"), "description": "uint16, BitsStored 12, intercept -1024"},
    "uint16_slope2": {"dtype": "uint16", "slope": 2.0, "intercept": -2048.0, "bits_stored": 16, "header_rescale": True,
                      "formats": ("nifti", "dicom"), "description": "uint16, slope 2, intercept -2048 (lossy: 1 HU)"},
    "uint16_slope_half": {"dtype": "uint16", "slope": 0.5, "intercept": -2048.0, "bits_stored": 16, "header_rescale": True,
                          "formats": ("nifti", "dicom"), "description": "uint16, slope 0.5, intercept -2048"},
    "hu_fixed_trap": {"dtype": "int16", "slope": 1.0, "intercept": 0.0, "bits_stored": 16, "header_rescale": False,
                      "row_slope": 1.0, "row_intercept": -1024.0, "formats": ("nifti",),
                      "description": "CT-RATE _fixed trap: stored = HU, the metadata row still says intercept -1024"},
}

#: Stored-array orientations. ``flip``: which LPS grid axes are reversed in storage.
ORIENTATIONS: dict[str, dict[str, Any]] = {
    "RAS": {"flip": (True, True, False), "patient_position": "HFS", "formats": ("nifti",)},
    "LPS": {"flip": (False, False, False), "patient_position": "HFS", "formats": ("nifti", "dicom")},
    "LAS": {"flip": (False, True, False), "patient_position": "HFS", "formats": ("nifti",)},
    # Prone: rows run toward the patient's right, columns toward anterior (IOP [-1,0,0,0,-1,0]).
    # Only the encoding is prone; the rendered anatomy (gravity, table) stays supine.
    "prone": {"flip": (True, True, False), "patient_position": "HFP", "formats": ("dicom",)},
    # The original CT-RATE release: LPS-ordered array, sform_code 0 and an identity qform with
    # 1 mm voxels; the true geometry is only in the metadata row. Opt-in (not in the default mix).
    "ctrate_broken": {"flip": (False, False, False), "patient_position": "HFS", "formats": ("nifti",), "broken_geometry": True},
}

_DTYPE_RANGE = {"int16": (-32768, 32767), "uint16": (0, 65535)}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _storage_range(enc: dict) -> tuple[int, int]:
    lo, hi = _DTYPE_RANGE[enc["dtype"]]
    if enc["dtype"] == "uint16":
        hi = min(hi, 2 ** int(enc["bits_stored"]) - 1)
    return lo, hi


def quantise(hu: np.ndarray, encoding: str, padding_value_hu: float | None = None) -> dict[str, Any]:
    """Clip, round and encode a float HU volume the way a scanner stores it.

    Tissue is rounded and clipped to :data:`HU_CLIP`; voxels at the padding value (the renderer
    sets them outside the reconstruction circle) keep it when the encoding can hold it, otherwise
    they get the lowest HU the encoding can hold (a "raw 0" scanner).

    Args:
        hu: float HU array on the renderer's grid.
        encoding: a key of :data:`ENCODINGS`.
        padding_value_hu: the reconstruction's outside-FOV value; voxels at or below it (+0.5)
            are padding when it is below −1024.

    Returns:
        dict with ``stored`` (integer array in the encoding's dtype), ``hu`` (float32 HU that the
        stored integers represent — the ground truth a correct reader must reproduce),
        ``padding_value_hu`` (effective), ``padding_stored`` (raw value or None), ``num_padding``.

    Raises:
        KeyError: unknown encoding name.
    """
    if encoding not in ENCODINGS:
        raise KeyError(f"unknown encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    enc = ENCODINGS[encoding]
    slope, inter = float(enc["slope"]), float(enc["intercept"])
    lo, hi = _storage_range(enc)
    values = np.clip(np.rint(np.asarray(hu, dtype=np.float32)), *HU_CLIP)
    pad_mask = None
    pad_eff = pad_raw = None
    if padding_value_hu is not None and padding_value_hu < HU_CLIP[0]:
        pad_mask = np.asarray(hu) <= padding_value_hu + 0.5
        raw = (padding_value_hu - inter) / slope
        pad_raw = int(np.clip(np.ceil(raw), lo, hi))
        pad_eff = pad_raw * slope + inter
        values[pad_mask] = pad_eff
    stored = np.clip(np.rint((values - inter) / slope), lo, hi).astype(enc["dtype"])
    decoded = (stored.astype(np.float32) * np.float32(slope) + np.float32(inter)).astype(np.float32)
    return {
        "stored": stored,
        "hu": decoded,
        "padding_value_hu": pad_eff,
        "padding_stored": pad_raw,
        "num_padding": int(pad_mask.sum()) if pad_mask is not None else 0,
    }


def affine_lps(grid: dict) -> np.ndarray:
    """4×4 index → patient LPS mm matrix of a renderer grid.

    Args:
        grid: ``{"shape", "spacing_mm", "origin_mm"}``.
    """
    a = np.eye(4)
    a[:3, :3] = np.diag([float(s) for s in grid["spacing_mm"]])
    a[:3, 3] = [float(o) for o in grid["origin_mm"]]
    return a


def orient(array: np.ndarray, grid: dict, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a grid array into a stored orientation.

    Args:
        array: array on the renderer's LPS grid.
        grid: the grid (shape, spacing_mm, origin_mm).
        orientation: a key of :data:`ORIENTATIONS`.

    Returns:
        ``(stored_array, affine_lps)``: the flipped (contiguous) array and its index → LPS mm
        matrix. The NIfTI (RAS world) matrix is ``diag(-1, -1, 1, 1) @ affine_lps``.
    """
    if orientation not in ORIENTATIONS:
        raise KeyError(f"unknown orientation {orientation!r}; valid: {', '.join(ORIENTATIONS)}")
    a = affine_lps(grid)
    out = array
    for axis, flip in enumerate(ORIENTATIONS[orientation]["flip"]):
        if flip:
            out = np.flip(out, axis=axis)
            a[:3, 3] += a[:3, axis] * (array.shape[axis] - 1)
            a[:3, axis] *= -1
    return np.ascontiguousarray(out), a


def write_nifti(path: str | Path, stored: np.ndarray, affine_lps_matrix: np.ndarray, encoding: str,
                compresslevel: int | None = None, broken_geometry: bool = False) -> dict[str, Any]:
    """Write a stored array as a gzipped NIfTI-1 file with exact header control.

    nibabel recomputes scl_slope/scl_inter when it writes an array, so the header and the raw
    voxel bytes are written here directly (header 348 bytes, 4-byte extension flag, Fortran-order
    data). The gzip stream (:func:`ctclip_contract.gzip_compress`: ISA-L at the project's level) has mtime 0 and
    no file name, so the bytes depend on the data only.

    Args:
        path: target ``*.nii.gz``.
        stored: integer array in the encoding's dtype (from :func:`quantise` then :func:`orient`).
        affine_lps_matrix: index → LPS mm of ``stored``.
        encoding: a key of :data:`ENCODINGS`; decides whether scl_slope/scl_inter carry the rescale.
        compresslevel: None: the project's gzip level (``ctclip_contract.files.GZIP_LEVEL``, ISA-L); an int is a
            zlib level, written by zlib.
        broken_geometry: write the header like the original CT-RATE release (sform_code 0,
            qform_code 0, 1 mm voxels, no orientation); ``affine_ras`` still reports the truth.

    Returns:
        header facts for the sidecar: ``affine_ras`` (true geometry), ``scl_slope``, ``scl_inter``,
        ``qform_code``, ``sform_code``, ``axcodes``, ``broken_geometry``.
    """
    enc = ENCODINGS[encoding]
    affine = _LPS_TO_RAS @ affine_lps_matrix
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.dtype(enc["dtype"]))
    hdr.set_data_shape(stored.shape)
    if broken_geometry:
        hdr.set_qform(None, code=0)
        hdr.set_sform(np.eye(4), code=0)
        hdr.set_zooms((1.0, 1.0, 1.0))
    else:
        hdr.set_qform(affine, code=1)
        hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    slope, inter = (float(enc["slope"]), float(enc["intercept"])) if enc["header_rescale"] else (1.0, 0.0)
    hdr["scl_slope"] = slope
    hdr["scl_inter"] = inter
    hdr["vox_offset"] = 352
    hdr["descrip"] = b"synthetic chest CT phantom"
    raw = bytearray(hdr.binaryblock) + b"\x00\x00\x00\x00"
    raw += np.asarray(stored, dtype=np.dtype(enc["dtype"]).newbyteorder("<")).tobytes(order="F")
    buf = gzip_compress(raw, compresslevel=compresslevel, mtime=0)
    atomic_write_bytes(Path(path), buf)
    return {
        "affine_ras": affine.tolist(),
        "scl_slope": slope,
        "scl_inter": inter,
        "qform_code": 0 if broken_geometry else 1,
        "sform_code": 0 if broken_geometry else 1,
        "axcodes": "".join(nib.aff2axcodes(affine)),
        "broken_geometry": bool(broken_geometry),
    }


def write_label_nifti(path: str | Path, labels: np.ndarray, affine_lps_matrix: np.ndarray) -> dict[str, Any]:
    """Write a label map (uint8 anatomy, int32 finding bits) as a gzipped NIfTI-1 file on a volume's grid.

    Always with the true geometry (sform = qform, code 1), also beside a volume stored with the broken CT-RATE
    header: the mask file stands on its own, and the preprocessing compares it with the volume's restored grid.
    No scaling; the bytes depend on the data only (gzip without name or mtime), like :func:`write_nifti`'s.

    Args:
        path: target ``*.nii.gz``.
        labels: integer array in the orientation of the stored volume (from :func:`orient`).
        affine_lps_matrix: index → LPS mm (the stored volume's).

    Returns:
        ``{"dtype", "affine_ras", "axcodes"}``.
    """
    affine = _LPS_TO_RAS @ affine_lps_matrix
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(labels.dtype)
    hdr.set_data_shape(labels.shape)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    hdr["vox_offset"] = 352
    if labels.dtype == np.uint8:
        hdr["intent_code"] = 1002  # NIFTI_INTENT_LABEL (ids of a label table; the bit field of findings is not)
    hdr["descrip"] = b"synthetic chest CT phantom labels"
    raw = bytearray(hdr.binaryblock) + b"\x00\x00\x00\x00"
    raw += np.asarray(labels, dtype=labels.dtype.newbyteorder("<")).tobytes(order="F")
    atomic_write_bytes(Path(path), gzip_compress(raw, mtime=0, labels=True))
    return {"dtype": str(labels.dtype), "affine_ras": affine.tolist(), "axcodes": "".join(nib.aff2axcodes(affine))}


def decode_hu(values: np.ndarray, sidecar_encoding: dict, trust_metadata_row: bool = False) -> np.ndarray:
    """HU from what a reader returned, following the sidecar's storage facts.

    A reader that applies the file's own rescale (ITK, nibabel) already returns HU unless the
    rescale lives only in the metadata CSV (``header_rescale`` False): then the row's
    slope/intercept are applied. ``trust_metadata_row=True`` applies the row even when the values
    are already HU — what a naive user does with the CT-RATE ``_fixed`` trap.

    Args:
        values: reader output (rescale from the file header already applied).
        sidecar_encoding: the sidecar's ``encoding`` block.
        trust_metadata_row: apply the metadata row unconditionally.

    Returns:
        float32 array.
    """
    values = np.asarray(values, dtype=np.float32)
    if sidecar_encoding["header_rescale"] and not trust_metadata_row:
        return values
    if sidecar_encoding.get("hu_fixed_trap") and not trust_metadata_row:
        return values
    return values * np.float32(sidecar_encoding["row_slope"]) + np.float32(sidecar_encoding["row_intercept"])


def encoding_facts(encoding: str, q: dict) -> dict[str, Any]:
    """The sidecar's ``encoding`` block for a quantised volume.

    Args:
        encoding: a key of :data:`ENCODINGS`.
        q: the result of :func:`quantise` for that encoding.

    Returns:
        JSON-serialisable dict: dtype, slope/intercept in the file and in the metadata row,
        ``header_rescale``, ``hu_fixed_trap``, clip range, effective padding.
    """
    enc = ENCODINGS[encoding]
    return {
        "name": encoding,
        "description": enc["description"],
        "dtype": enc["dtype"],
        "pixel_representation": 1 if enc["dtype"] == "int16" else 0,
        "bits_stored": int(enc["bits_stored"]),
        "slope": float(enc["slope"]),
        "intercept": float(enc["intercept"]),
        "header_rescale": bool(enc["header_rescale"]),
        "row_slope": float(enc.get("row_slope", enc["slope"])),
        "row_intercept": float(enc.get("row_intercept", enc["intercept"])),
        "hu_fixed_trap": encoding == "hu_fixed_trap",
        "clip_hu": list(HU_CLIP),
        "padding_value_hu": q["padding_value_hu"],
        "padding_stored": q["padding_stored"],
        "num_padding_voxels": q["num_padding"],
    }
