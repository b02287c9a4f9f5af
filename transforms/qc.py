"""Quality control for chest CT volumes: reject with a reason instead of producing garbage.

Two stages: :func:`check_input` looks at headers only (cheap, before the voxels are read: not an
image, too large, DICOM series with a gap, gantry tilt, several series in one folder), and
:class:`CTQualityCheckd` looks at the loaded (and HU-rescaled) volume: 3-D, enough slices, finite
voxels, plausible HU, orthogonal axis-aligned direction, sane spacing, size limit.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from ctclip_contract import NUM_PATHOLOGIES, gzip_stream_size

from .hu import _plausible, _sample, _value_counts, hu_evidence

__all__ = ["QualityCheckError", "CTQualityCheck", "CTQualityCheckd", "CheckInputd", "check_input", "check_hu_sample",
           "check_dicom_series", "is_dicom_file", "padding_range", "NIFTI_SUFFIXES", "align_mask_to_image",
           "check_mask_labels", "check_finding_bits"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
#: what reading one input may allocate: the stored array plus a float32 working copy (qc ``max_bytes``). A voxel
#: limit alone let a 9 MB gzip of zeros take 3.5 GB, and a float64 header just under it would need about 26 GB.
DEFAULT_MAX_READ_BYTES = 8 * 2**30


def _check_read_bytes(source: Any, shape: tuple, stored_itemsize: int, max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    need = int(np.prod(shape, dtype=np.float64)) * (stored_itemsize + 4)
    if need > max_bytes:
        raise QualityCheckError(f"{source}: reading {'x'.join(map(str, shape))} voxels of {stored_itemsize} bytes "
                                f"(plus a float32 working copy) would take {need / 2**30:.1f} GiB, above the limit of "
                                f"{max_bytes / 2**30:.1f} GiB (qc max_bytes)")


class QualityCheckError(ValueError):
    """A volume failed quality control; the message names the file and the reason."""


def is_dicom_file(path: str | os.PathLike) -> bool:
    """DICOM Part-10 preamble check (``DICM`` at byte 128), or a ``.dcm`` suffix."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _direction_problem(affine: np.ndarray, max_obliquity_deg: float) -> str:
    """Why a voxel-to-world affine is not usable (non-orthogonal or oblique axes), or ''."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(m)):
        return "degenerate voxel axes in the affine"
    d = m / norms
    gram = d.T @ d
    off = np.abs(gram - np.eye(3)).max()
    if off > 1e-3:
        angle = float(np.degrees(np.arcsin(min(off, 1.0))))
        return f"non-orthogonal voxel axes (sheared by {angle:.2f} deg, e.g. gantry tilt)"
    worst = float(np.degrees(np.arccos(np.clip(np.abs(d).max(axis=0), -1, 1))).max())
    if worst > max_obliquity_deg:
        return f"oblique direction ({worst:.2f} deg from the nearest patient axis, limit {max_obliquity_deg})"
    return ""


def check_dicom_series(
    folder: str | os.PathLike,
    spacing_tolerance: float = 0.01,
    max_voxels: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_READ_BYTES,
) -> dict[str, Any]:
    """Header-level checks of a DICOM series folder (one file per slice).

    Args:
        folder: the series folder.
        spacing_tolerance: relative deviation allowed between consecutive slice gaps. ITK silently
            averages a gap into one spacing (docs/monai_notes.md#readers-and-transforms), so a gap must be caught here.
        max_voxels: reject series with more voxels than this.
        max_bytes: reject series whose reading would allocate more than this (ITK's int32 buffer and our int16 copy).

    Returns:
        ``{"n_slices", "slice_spacing", "rows", "columns", "slope", "intercept", "padding_value",
        "padding_range_limit", "pixel_representation", "modality"}`` (padding values as stored,
        signedness following PixelRepresentation; None when absent).

    Raises:
        QualityCheckError: naming the folder and the reason.
    """
    folder = Path(folder)
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    # what sits beside the slices and is not one (notes.txt, Thumbs.db, a DICOMDIR index) is ignored, not fatal
    files = [p for p in candidates if is_dicom_file(p) and p.name.upper() != "DICOMDIR"]
    if not files:
        raise QualityCheckError(f"{folder}: empty DICOM folder" if not candidates else
                                f"{folder}: no DICOM file among {len(candidates)} file(s)")
    headers, kept = [], []
    for p in files:
        try:
            h = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as e:  # pydicom raises several types for non-DICOM input
            raise QualityCheckError(f"{p}: not a readable DICOM file ({type(e).__name__}: {e})") from None
        if str(getattr(h, "SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            continue  # a DICOMDIR under another name
        headers.append(h)
        kept.append(p)
    if not headers:
        raise QualityCheckError(f"{folder}: no DICOM image among {len(candidates)} file(s)")
    ignored = sorted(p.name for p in set(candidates) - set(kept))
    series = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise QualityCheckError(f"{folder}: {len(series)} series in one folder")
    modality = str(getattr(headers[0], "Modality", "CT"))
    if modality not in ("CT", ""):
        raise QualityCheckError(f"{folder}: modality {modality!r}, not CT")
    try:
        iops = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        ipps = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError) as e:
        raise QualityCheckError(f"{folder}: missing or bad ImageOrientationPatient/ImagePositionPatient ({e})") from None
    if np.abs(iops - iops[0]).max() > 1e-4:
        raise QualityCheckError(f"{folder}: ImageOrientationPatient differs between slices")
    row, col = iops[0, :3], iops[0, 3:]
    if abs(np.dot(row, col)) > 1e-3:
        raise QualityCheckError(f"{folder}: non-orthogonal ImageOrientationPatient {iops[0].tolist()}")
    tilt = float(getattr(headers[0], "GantryDetectorTilt", 0) or 0)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    pos = ipps @ normal
    order = np.argsort(pos)
    pos, ipps = pos[order], ipps[order]
    if len(headers) > 1:
        gaps = np.diff(pos)
        if np.any(gaps < 1e-3):
            raise QualityCheckError(f"{folder}: two slices at the same position")
        # Slices must advance along the normal; an in-plane drift is a gantry tilt (sheared volume).
        drift = (ipps[-1] - ipps[0]) - (pos[-1] - pos[0]) * normal
        if np.linalg.norm(drift) > 0.01 * len(headers):
            angle = np.degrees(np.arctan2(np.linalg.norm(drift), pos[-1] - pos[0]))
            raise QualityCheckError(f"{folder}: gantry tilt / slices not along the normal ({angle:.2f} deg)")
        if abs(tilt) > 0.01:
            raise QualityCheckError(f"{folder}: gantry tilt (GantryDetectorTilt {tilt:.2f} deg)")
        med = float(np.median(gaps))
        bad = np.abs(gaps - med) > spacing_tolerance * med + 1e-3
        if bad.any():
            i = int(np.argmax(np.abs(gaps - med)))
            raise QualityCheckError(
                f"{folder}: non-uniform slice spacing (gap of {gaps[i]:.3f} mm between slices {i} and {i + 1}, "
                f"median {med:.3f} mm; {int(bad.sum())} irregular gaps)"
            )
    else:
        med = float(getattr(headers[0], "SliceThickness", 0) or 0)
    spacing = _pixel_spacing(headers, folder)
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    if max_voxels is not None and rows * cols * len(headers) > max_voxels:
        raise QualityCheckError(f"{folder}: {rows}x{cols}x{len(headers)} voxels exceeds the limit {max_voxels}")
    _check_read_bytes(folder, (cols, rows, len(headers)), 2, max_bytes)  # ITK's int32 buffer + the int16 copy
    pixel_rep = int(getattr(headers[0], "PixelRepresentation", 0))
    pad = _padding_value(getattr(headers[0], "PixelPaddingValue", None), pixel_rep)
    pad_limit = _padding_value(getattr(headers[0], "PixelPaddingRangeLimit", None), pixel_rep)
    return {
        "n_slices": len(headers),
        "slice_spacing": med,
        "pixel_spacing": spacing,
        "ignored_files": ignored,
        "rows": rows,
        "columns": cols,
        "slope": float(getattr(headers[0], "RescaleSlope", 1) or 1),
        "intercept": float(getattr(headers[0], "RescaleIntercept", 0) or 0),
        "padding_value": pad,
        "padding_range_limit": pad_limit,
        "pixel_representation": pixel_rep,
        "modality": modality,
    }


def _pixel_spacing(headers: list, folder: Path) -> list[float]:
    """PixelSpacing (row, column) in mm: required in a CT image, positive, the same on every slice. No
    fallback is invented: ImagerPixelSpacing is the detector's, not the patient's, in a CT series."""
    values = set()
    for h in headers:
        raw = getattr(h, "PixelSpacing", None)
        try:
            values.add(tuple(float(v) for v in raw))
        except (TypeError, ValueError):
            raise QualityCheckError(f"{folder}: no PixelSpacing in slice {getattr(h, 'InstanceNumber', '?')} "
                                    "(the in-plane voxel size is unknown)") from None
    if len(values) != 1:
        raise QualityCheckError(f"{folder}: PixelSpacing differs between slices ({sorted(values)[:3]})")
    spacing = list(values.pop())
    if len(spacing) != 2 or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise QualityCheckError(f"{folder}: PixelSpacing {spacing} is not two positive numbers")
    return spacing


def _padding_value(value, pixel_representation: int) -> int | None:
    """A stored padding value as the pixel data reads it: US/SS is ambiguous in implicit-VR files
    (63536 in a signed series is -2000, -2000 in an unsigned one 63536)."""
    if value is None or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):  # undecoded US/SS
        value = int.from_bytes(bytes(value[:2]), "little", signed=bool(pixel_representation))
    v = int(value)
    if pixel_representation == 1 and v > 32767:
        v -= 65536
    elif pixel_representation == 0 and v < 0:
        v += 65536
    return v


def padding_range(header: Mapping[str, Any]) -> tuple[float, float] | None:
    """The DICOM padding range of :func:`check_dicom_series` facts in reader units (stored values
    after RescaleSlope/RescaleIntercept, as ITK returns them), or None without PixelPaddingValue
    (always for NIfTI facts)."""
    pad = header.get("padding_value")
    if pad is None:
        return None
    limit = header.get("padding_range_limit")
    slope, inter = float(header.get("slope", 1.0)), float(header.get("intercept", 0.0))
    ends = [pad * slope + inter, (pad if limit is None else limit) * slope + inter]
    return float(min(ends)), float(max(ends))


def _check_complete(path: Path, expected: int) -> None:
    """Reject truncated files before ITK reads them (ITK fills a truncated gzip stream silently).

    ``.nii``: the file must hold ``expected`` bytes. ``.nii.gz``: the gzip trailer (ISIZE, the
    uncompressed size mod 2**32) must match; when it does not (a truncated file, or an unusual
    multi-member stream), the stream is decompressed once to count the bytes.
    """
    if not path.name.lower().endswith(".gz"):
        if path.stat().st_size < expected:
            raise QualityCheckError(f"{path}: truncated NIfTI ({path.stat().st_size} bytes, need {expected})")
        return
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if isize == expected % 2**32:
        return
    with open(path, "rb") as f:
        total, complete = gzip_stream_size(f)
    if not complete or total < expected:
        raise QualityCheckError(f"{path}: truncated or corrupt gzip stream ({total} of {expected} bytes)")


def check_input(path: str | os.PathLike, max_voxels: int | None = None, spacing_tolerance: float = 0.01,
                check_finite: bool = True, max_bytes: int | None = DEFAULT_MAX_READ_BYTES) -> dict:
    """Header-only checks before the voxels are read.

    Args:
        path: a NIfTI file or a DICOM series folder.
        max_voxels: reject inputs with more voxels than this (before reading them).
        spacing_tolerance: see :func:`check_dicom_series`.
        max_bytes: reject inputs whose reading would allocate more than this: the stored array plus a float32
            working copy, from the header (None: no limit).
        check_finite: scan float NIfTI files for NaN/inf here (needed before an ITK read, which
            turns NaN into 0; a reader that keeps NaN, like :class:`transforms.io.CTVolumeReader`,
            leaves it to :class:`CTQualityCheck` and saves a second read of the file).

    Returns:
        ``{"kind": "nifti" | "dicom", ...}`` with header facts (shape, DICOM rescale, padding value).

    Raises:
        QualityCheckError: not an image, unreadable header, too large, DICOM series problems.
    """
    path = Path(path)
    if path.is_dir():
        return {"kind": "dicom", **check_dicom_series(path, spacing_tolerance, max_voxels, max_bytes)}
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise QualityCheckError(f"{path}: not a recognised image file (expected .nii, .nii.gz or a DICOM folder)")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:
        raise QualityCheckError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if max_voxels is not None and int(np.prod(shape)) > max_voxels:
        raise QualityCheckError(f"{path}: {'x'.join(map(str, shape))} voxels exceeds the limit {max_voxels}")
    hdr = img.header
    _check_read_bytes(path, shape, hdr.get_data_dtype().itemsize, max_bytes)
    # nibabel repairs a zero pixdim to 1 mm and drops a sign on load (a warning on stderr at most): the voxel
    # size would be invented, so the header is read again as stored
    with nib.openers.ImageOpener(str(path)) as f:
        stored = type(hdr).from_fileobj(f, check=False)
    zooms = [float(v) for v in stored["pixdim"][1:1 + min(len(shape), 3)]]
    if not all(np.isfinite(v) and v > 0 for v in zooms):
        raise QualityCheckError(f"{path}: voxel size pixdim {zooms} is not positive (the header does not say how "
                                "large the voxels are)")
    # the data offset from the image proxy: nibabel's header["vox_offset"] reads 0 after loading, which
    # made every check of an intact .nii.gz miss the trailer test and decompress the whole file
    offset = int(getattr(img.dataobj, "offset", hdr["vox_offset"]))
    _check_complete(path, offset + int(np.prod(shape)) * hdr.get_data_dtype().itemsize)
    if check_finite and hdr.get_data_dtype().kind == "f":
        # ITK turns NaN into 0 when it reads float NIfTI, so non-finite voxels must be found here.
        n_bad = int((~np.isfinite(np.asarray(img.dataobj))).sum())
        if n_bad:
            raise QualityCheckError(f"{path}: {n_bad} non-finite voxels (NaN/inf)")
    return {
        "kind": "nifti",
        "shape": shape,
        "sform_code": int(hdr["sform_code"]),
        "qform_code": int(hdr["qform_code"]),
    }


def check_hu_sample(sample: np.ndarray, name: str = "volume") -> None:
    """:class:`CTQualityCheck`'s HU check on a volume's voxel sample (``transforms.hu._sample`` of the HU volume).

    Raises:
        QualityCheckError: the histogram is not a chest CT's.
    """
    ok, why = _plausible(hu_evidence(*(_value_counts(sample) or (sample,))))
    if not ok:
        raise QualityCheckError(f"{name}: implausible HU (not a chest CT, e.g. MR?): {why}")


class CTQualityCheck(Transform):
    """Check a loaded channel-first volume; return it unchanged or raise :class:`QualityCheckError`.

    Args:
        min_slices: fewest voxels along every spatial axis (a 2-D image stored as one slice fails).
        spacing_range_mm: allowed voxel spacing (min, max) in mm on every axis.
        max_voxels: largest number of spatial voxels.
        max_obliquity_deg: largest angle between a voxel axis and the nearest patient axis; the
            output is axis-aligned RAS, so an oblique volume would need a rotation we don't do.
        check_hu: require a chest-CT-like HU histogram (catches MR-like intensities).
        check_structure: run the shape/finite/geometry checks (turn off for a HU-only check placed
            after the rescale when the structural one ran before it).
    """

    def __init__(
        self,
        min_slices: int = 8,
        spacing_range_mm: tuple[float, float] = (0.05, 15.0),
        max_voxels: int = 1024 * 1024 * 2048,
        max_obliquity_deg: float = 1.0,
        check_hu: bool = True,
        check_structure: bool = True,
    ) -> None:
        self.check_structure = check_structure
        self.min_slices = min_slices
        self.spacing_range_mm = tuple(spacing_range_mm)
        self.max_voxels = max_voxels
        self.max_obliquity_deg = max_obliquity_deg
        self.check_hu = check_hu

    def __call__(self, img: torch.Tensor, name: str = "volume") -> torch.Tensor:  # type: ignore[override]
        t = img.as_tensor() if isinstance(img, MetaTensor) else img
        if self.check_structure:
            self._structure(img, t, name)
        if self.check_hu:
            check_hu_sample(_sample(t), name)
        return img

    def _structure(self, img, t, name) -> None:
        spatial = tuple(img.shape[1:])
        if len(spatial) != 3:
            raise QualityCheckError(f"{name}: not a 3-D volume (spatial shape {spatial})")
        if min(spatial) < self.min_slices:
            raise QualityCheckError(f"{name}: too few slices (shape {spatial}, need >= {self.min_slices} per axis)")
        if int(np.prod(spatial)) > self.max_voxels:
            raise QualityCheckError(f"{name}: {int(np.prod(spatial))} voxels exceeds the limit {self.max_voxels}")
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            n_bad = int(torch.count_nonzero(~torch.isfinite(t)))
            raise QualityCheckError(f"{name}: {n_bad} non-finite voxels (NaN/inf)")
        if isinstance(img, MetaTensor):
            affine = np.asarray(img.affine, dtype=np.float64)
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            lo, hi = self.spacing_range_mm
            if np.any(spacing < lo) or np.any(spacing > hi) or not np.all(np.isfinite(spacing)):
                raise QualityCheckError(f"{name}: absurd voxel spacing {np.round(spacing, 4).tolist()} mm")
            why = _direction_problem(affine, self.max_obliquity_deg)
            if why:
                raise QualityCheckError(f"{name}: {why}")


class CTQualityCheckd(MapTransform):
    """Dictionary form of :class:`CTQualityCheck`.

    Args:
        keys: image keys (channel-first, after HU rescale when ``check_hu``).
        name_key: entry that names the volume in the error message.
        kwargs: see :class:`CTQualityCheck`.
    """

    def __init__(self, keys: KeysCollection, name_key: str = "name", allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.checker = CTQualityCheck(**kwargs)
        self.name_key = name_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.checker(d[key], name=str(d.get(self.name_key, key)))
        return d


class CheckInputd(MapTransform):
    """Header-only checks of an input before its voxels are read (:func:`check_input`: DICOM series with a
    slice gap, gantry tilt or several series, files that are not images, truncated or corrupt files, a voxel size
    the header does not give, too many voxels; NIfTI without any orientation, whose axis layout would be a
    guess), and the DICOM padding range for :class:`transforms.RescaleToHUd` (``PixelPaddingValue`` voxels
    become air). The raw-scan inference chains use it; so does every chain that reads stored ct_preprocess
    volumes (``padding_key=None``): MONAI's ``ITKReader`` answers a file that is not an image with the failure of
    every reader it tried, and reads a truncated file, or a header that promises more voxels than the file holds,
    without a word (missing voxels filled). The ct_preprocess bundle runs the same checks itself (and can restore
    a missing orientation from a CT-RATE metadata row).

    Args:
        keys: entries holding a NIfTI path or a DICOM series folder (before ``LoadImaged``).
        padding_key: entry receiving the ``(low, high)`` padding range in reader units, or None (stored volumes:
            no entry is added).
        max_voxels: reject inputs with more voxels than this (before reading them).
        check_finite: see :func:`check_input`.
    """

    def __init__(self, keys: KeysCollection, padding_key: str | None = "pixel_padding", max_voxels: int | None = None,
                 check_finite: bool = False, allow_missing_keys: bool = False,
                 max_bytes: int | None = DEFAULT_MAX_READ_BYTES):
        super().__init__(keys, allow_missing_keys)
        self.padding_key, self.max_voxels, self.check_finite = padding_key, max_voxels, check_finite
        self.max_bytes = max_bytes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            header = check_input(d[key], max_voxels=self.max_voxels, check_finite=self.check_finite,
                                 max_bytes=self.max_bytes)
            if header["kind"] == "nifti" and header["sform_code"] == 0 and header["qform_code"] == 0:
                raise QualityCheckError(f"{d[key]}: no orientation in the NIfTI header (sform_code and qform_code "
                                        "0); preprocess it with the ct_preprocess bundle and its metadata table")
            if self.padding_key is not None:
                d[self.padding_key] = padding_range(header)
        return d


# ------------------------------------------------------------------------------------------------------------------
# Masks (anatomical label maps, finding bit fields) beside a volume
# ------------------------------------------------------------------------------------------------------------------
def _grid_words(shape, affine: np.ndarray) -> str:
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return (f"{'x'.join(str(int(n)) for n in shape[::-1])} voxels of "
            f"{'x'.join(f'{v:.4g}' for v in spacing[::-1])} mm at {np.round(affine[:3, 3], 2).tolist()}")


def align_mask_to_image(mask: np.ndarray, mask_affine: np.ndarray, shape, affine: np.ndarray, source: str,
                        tol_mm: float = 0.01) -> np.ndarray:
    """A mask in the voxel order of its image, when both cover the same voxel centres.

    The mask may store the image's grid in another axis order or direction (a DICOM series read bottom-up, a mask
    written in another orientation): it is transposed and flipped to the image's order, never interpolated.

    Args:
        mask: the mask's voxels, in the layout of ``mask_affine``.
        mask_affine, affine: voxel -> world matrices of the mask and of the image (same convention, e.g. both from
            :func:`transforms.io.read_label_volume` / :class:`transforms.io.CTVolumeReader`).
        shape: the image's spatial shape.
        source: the mask's name in messages.
        tol_mm: largest disagreement of voxel positions (mm).

    Raises:
        QualityCheckError: "``source``: its grid (...) does not match the image's (...)".
    """
    mask_affine = np.asarray(mask_affine, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(n) for n in shape)
    why = (f"{source}: its grid ({_grid_words(mask.shape, mask_affine)}) does not match the image's "
           f"({_grid_words(shape, affine)})")
    xform = np.linalg.solve(mask_affine, affine)  # image voxel -> mask voxel
    lin = xform[:3, :3]
    perm = [int(np.argmax(np.abs(lin[:, k]))) for k in range(3)]  # mask axis read by image axis k
    signs = [int(np.sign(lin[perm[k], k])) for k in range(3)]
    exact = np.zeros((3, 3))
    for k in range(3):
        exact[perm[k], k] = signs[k]
    spacing = np.linalg.norm(mask_affine[:3, :3], axis=0)
    if sorted(perm) != [0, 1, 2] or np.abs((lin - exact) * spacing[:, None]).max() * max(shape) > tol_mm:
        raise QualityCheckError(why)
    for k in range(3):
        n_mask = mask.shape[perm[k]]
        start = xform[perm[k], 3]
        want = 0 if signs[k] > 0 else n_mask - 1
        if n_mask != shape[k] or abs(start - want) * spacing[perm[k]] > tol_mm:
            raise QualityCheckError(why)
    out = np.transpose(mask, perm)
    flips = tuple(k for k in range(3) if signs[k] < 0)
    return np.ascontiguousarray(np.flip(out, flips) if flips else out)


def check_mask_labels(values, table: Mapping[int, str], source: str, table_name: str) -> None:
    """Every label of a label map is 0 (background) or an id of its label table.

    Args:
        values: the labels present (e.g. ``np.unique`` of the map).
        table: id -> name.
        source, table_name: named in the message.

    Raises:
        QualityCheckError: "``source``: labels outside the table ``table_name``: ...".
    """
    extra = sorted(int(v) for v in np.asarray(values).ravel() if int(v) != 0 and int(v) not in table)
    if extra:
        shown = ", ".join(map(str, extra[:10])) + (" ..." if len(extra) > 10 else "")
        raise QualityCheckError(f"{source}: labels outside the table {table_name}: {shown}")


def check_finding_bits(values, source: str) -> None:
    """Every value of a findings mask is a set of bits of the 18 pathologies (0 <= v < 2**18).

    Raises:
        QualityCheckError: naming the file and the values outside.
    """
    v = np.asarray(values)
    bad = v[(v < 0) | (v >= (1 << NUM_PATHOLOGIES))]
    if bad.size:
        raise QualityCheckError(f"{source}: finding bits outside the {NUM_PATHOLOGIES} pathologies "
                                f"(values {', '.join(map(str, np.unique(bad)[:5].tolist()))})")
