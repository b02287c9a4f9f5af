"""A tiny analytic chest phantom written in several encodings (shared by the preprocessing tests).

The phantom lives in patient LPS millimetres; every writer samples it on its own voxel grid, so the
same anatomy stored as RAS/LAS/LPS NIfTI, raw+1024 with or without ``scl_*`` or a DICOM series
must preprocess to the same volume. A 25 mm "nodule" at ``NODULE_LPS`` (+300 HU) is the structure
whose position the tests track.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

NODULE_LPS = np.array([40.0, 10.0, 15.0])
SHAPE = (40, 36, 24)  # voxels along L, P, S
SPACING = (5.0, 5.0, 6.0)
ORIGIN_LPS = np.array([-97.5, -87.5, -69.0])  # centre of voxel (0, 0, 0)


def phantom_hu(lps: np.ndarray) -> np.ndarray:
    """HU at LPS points (..., 3): air, body ellipse (soft tissue), fat rim, two lungs, spine, nodule."""
    x, y, z = lps[..., 0], lps[..., 1], lps[..., 2]
    hu = np.full(x.shape, -1000.0)
    body = (x / 90.0) ** 2 + (y / 70.0) ** 2 <= 1.0
    inner = (x / 80.0) ** 2 + (y / 62.0) ** 2 <= 1.0
    hu[body] = -100.0
    hu[inner] = 40.0
    for cx in (-40.0, 40.0):
        lung = ((x - cx) / 30.0) ** 2 + ((y + 5.0) / 42.0) ** 2 + (z / 70.0) ** 2 <= 1.0
        hu[lung] = -850.0
    spine = (x / 12.0) ** 2 + ((y - 45.0) / 12.0) ** 2 <= 1.0
    hu[spine] = 700.0
    nodule = np.sum((lps - NODULE_LPS) ** 2, axis=-1) <= 12.5**2
    hu[nodule] = 300.0
    return hu


def lps_grid() -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).astype(np.float64)
    return ORIGIN_LPS + idx * np.asarray(SPACING)


def truth_lps_volume() -> np.ndarray:
    """int16 HU on the LPS-ordered grid (axis 0 = L, 1 = P, 2 = S)."""
    return np.round(phantom_hu(lps_grid())).astype(np.int16)


def _lps_affine_ras() -> np.ndarray:
    """RAS affine of the LPS-ordered grid (nibabel/NIfTI affines are RAS)."""
    a = np.diag([*SPACING, 1.0])
    a[:3, 3] = ORIGIN_LPS
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


def write_nifti(path, axcodes: str = "RAS", stored: str = "hu", dtype=np.int16) -> Path:
    """Write the phantom as NIfTI with voxel axes ``axcodes`` and a storage encoding.

    Args:
        axcodes: storage orientation, e.g. ``"RAS"``, ``"LAS"``, ``"LPS"``.
        stored: ``"hu"``; ``"raw_scl"`` (HU+1024 with scl_slope 1, scl_inter -1024);
            ``"raw"`` (HU+1024, no scaling in the header); ``"slope2"`` (stored (HU+2048)/2, scl 2/-2048).
    """
    data = truth_lps_volume()
    affine = _lps_affine_ras()
    img = nib.Nifti1Image(data, affine)
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    current = nib.orientations.io_orientation(affine)
    xform = nib.orientations.ornt_transform(current, target)
    img = img.as_reoriented(xform)
    arr = np.asarray(img.dataobj).astype(np.int32)
    slope, inter = 1.0, 0.0
    if stored in ("raw", "raw_scl"):
        arr = arr + 1024
        if stored == "raw_scl":
            inter = -1024.0
    elif stored == "slope2":
        arr = np.round((arr + 2048) / 2.0)
        slope, inter = 2.0, -2048.0
    out = nib.Nifti1Image(arr.astype(dtype), img.affine)
    out.set_sform(img.affine, code=1)
    out.set_qform(img.affine, code=1)
    if (slope, inter) != (1.0, 0.0):
        out.header.set_slope_inter(slope, inter)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))
    return path


def write_dicom_series(folder, descending: bool = False, gap_at: int | None = None, tilt: float = 0.0,
                       modality: str = "CT", seed: int = 0) -> Path:
    """Write the phantom as a CT DICOM series (stored HU+1024, intercept -1024), shuffled file names.

    Args:
        descending: write slices from head to feet (order must not matter).
        gap_at: drop this slice (a series with a gap).
        tilt: in-plane drift per slice in mm along y (a gantry-tilted series).
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vol = truth_lps_volume()  # (L, P, S) = (column index, row index, slice)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    ks = [k for k in range(SHAPE[2]) if k != gap_at]
    if descending:
        ks = ks[::-1]
    names = rng.permutation(len(ks))
    for inst, (k, fname) in enumerate(zip(ks, names), start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{fname:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = modality
        ds.PatientID = "phantom"
        ds.InstanceNumber = inst
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        pos = ORIGIN_LPS + np.array([0.0, tilt * k, k * SPACING[2]])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]  # row spacing (along P), column spacing (along L)
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = SHAPE[1], SHAPE[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (vol[:, :, k].T.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return folder


def write_mr_like(path) -> Path:
    """An MR-like volume: positive intensities 0-1500 with a smooth, non-CT histogram."""
    grid = lps_grid()
    r = np.sqrt((grid[..., 0] / 90.0) ** 2 + (grid[..., 1] / 70.0) ** 2)
    arr = np.where(r <= 1.0, 300 + 900 * (1 - r) + 100 * np.sin(grid[..., 2] / 7.0), 5.0)
    img = nib.Nifti1Image(arr.astype(np.int16), _lps_affine_ras())
    nib.save(img, str(path))
    return Path(path)


def test_phantom_has_ct_histogram():
    vol = truth_lps_volume()
    assert vol.shape == SHAPE
    for hu in (-1000, -850, 40, 700, 300):
        assert (vol == hu).sum() > 10, hu
    # the nodule is on patient left (+x in LPS) and its voxel count matches a 25 mm sphere roughly
    assert (vol == 300).sum() * np.prod(SPACING) > 0.5 * 4 / 3 * np.pi * 12.5**3


def test_writers_round_trip(tmp_path):
    p = write_nifti(tmp_path / "a.nii.gz", "LAS", "raw_scl")
    img = nib.load(str(p))
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    back = img.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))))
    np.testing.assert_array_equal(np.asarray(back.get_fdata()), truth_lps_volume())
    folder = write_dicom_series(tmp_path / "s")
    assert len(os.listdir(folder)) == SHAPE[2]
