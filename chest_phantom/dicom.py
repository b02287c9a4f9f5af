"""Write a synthetic reconstruction as a real DICOM CT series with pydicom (README, "DICOM series").

One file per slice, CT Image Storage, Explicit VR Little Endian, one Study/Series/FrameOfReference
UID per series, correct geometry tags (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness, SpacingBetweenSlices) and pixel-encoding tags (RescaleSlope,
RescaleIntercept, PixelRepresentation, BitsStored). File names are random and InstanceNumber is
shuffled relative to position, as exports from PACS often are: readers must sort by position.
UIDs are derived from the volume name and seed, so reruns produce identical files.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from ctclip_contract import atomic_path

from .encoding import ENCODINGS

__all__ = ["write_dicom_series"]


def _ds(value: float) -> str:
    """Decimal String of at most 16 characters."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def write_dicom_series(folder: str | Path, stored: np.ndarray, affine_lps: np.ndarray, encoding: str,
                       meta: dict[str, Any], uid_key: str, rng: np.random.Generator,
                       padding_stored: int | None = None, study_key: str | None = None) -> dict[str, Any]:
    """Write ``stored`` (index (i, j, k) = (column, row, slice)) as one DICOM file per slice.

    The series is written into a hidden temporary folder beside ``folder`` and renamed into place
    at the end (:func:`ctclip_contract.atomic_path` with ``directory=True``), so an interrupted run
    never leaves a partial series under the final name.

    Args:
        folder: target series folder (created; replaced if it exists).
        stored: integer array (nx, ny, nz) in the encoding's dtype.
        affine_lps: index → patient LPS mm of ``stored``; its first two columns must be parallel
            to patient axes (no gantry tilt).
        encoding: a key of :data:`chest_phantom.encoding.ENCODINGS` with ``header_rescale``.
        meta: patient/acquisition attributes (PatientID, PatientSex, PatientAge, StudyDate,
            Manufacturer, ManufacturerModelName, KVP, XRayTubeCurrent, ExposureTime,
            ConvolutionKernel, ReconstructionDiameter, PatientPosition, SliceThickness,
            SeriesDescription, SeriesNumber).
        uid_key: text that makes the series and instance UIDs unique and reproducible
            (e.g. "train_12_a_2_<seed>").
        rng: generator for file names and instance numbers.
        padding_stored: raw PixelPaddingValue, written when given.
        study_key: text for the Study and FrameOfReference UIDs; reconstructions of one scan pass
            the same key so they share both (default: ``uid_key``).

    Returns:
        ``{"study_uid", "series_uid", "frame_of_reference_uid", "files", "image_orientation_patient",
        "pixel_spacing", "spacing_between_slices"}``.

    Raises:
        ValueError: encodings without a file-level rescale cannot be DICOM; tilted geometry.
    """
    enc = ENCODINGS[encoding]
    if not enc["header_rescale"] or "dicom" not in enc["formats"]:
        raise ValueError(f"encoding {encoding!r} has no DICOM form (its rescale is not in the file)")
    folder = Path(folder)
    nx, ny, nz = stored.shape
    a = np.asarray(affine_lps, dtype=float)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    row_dir, col_dir = a[:3, 0] / spacing[0], a[:3, 1] / spacing[1]
    normal = np.cross(row_dir, col_dir)
    if abs(abs(float(normal @ (a[:3, 2] / spacing[2]))) - 1) > 1e-6:
        raise ValueError(f"{folder.name}: slice axis is not perpendicular to the image plane (tilt)")
    iop = [float(v) for v in np.concatenate([row_dir, col_dir])]
    study_key = study_key or uid_key
    study_uid = generate_uid(entropy_srcs=[study_key, "study"])
    series_uid = generate_uid(entropy_srcs=[uid_key, "series"])
    for_uid = generate_uid(entropy_srcs=[study_key, "frame"])
    signed = enc["dtype"] == "int16"

    names: set[str] = set()
    while len(names) < nz:
        stem = f"{int(rng.integers(0, 2**32)):08X}"
        names.add(stem + (".dcm" if len(names) % 2 else ""))
    names_list = sorted(names)
    rng.shuffle(names_list)
    instance_numbers = rng.permutation(nz) + 1

    with atomic_path(folder, directory=True) as tmp:
        for k in range(nz):
            position = a[:3, :3] @ np.array([0.0, 0.0, float(k)]) + a[:3, 3]
            sop_uid = generate_uid(entropy_srcs=[uid_key, "instance", str(k)])
            fm = FileMetaDataset()
            fm.MediaStorageSOPClassUID = CTImageStorage
            fm.MediaStorageSOPInstanceUID = sop_uid
            fm.TransferSyntaxUID = ExplicitVRLittleEndian
            fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = FileDataset(names_list[k], {}, file_meta=fm, preamble=b"\0" * 128)
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = meta.get("StudyDate", "")
            ds.SeriesDate = meta.get("StudyDate", "")
            ds.StudyTime = "120000"
            ds.AccessionNumber = ""
            ds.Modality = "CT"
            ds.Manufacturer = meta.get("Manufacturer", "")
            ds.ManufacturerModelName = meta.get("ManufacturerModelName", "")
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = "THORAX"
            ds.SeriesDescription = meta.get("SeriesDescription", "")
            ds.PatientName = f"Synthetic^{meta.get('PatientID', '')}"
            ds.PatientID = meta.get("PatientID", "")
            ds.PatientBirthDate = ""
            ds.PatientSex = meta.get("PatientSex", "")
            ds.PatientAge = meta.get("PatientAge", "")
            ds.BodyPartExamined = "CHEST"
            ds.SliceThickness = _ds(meta["SliceThickness"])
            ds.KVP = _ds(meta.get("KVP", 120))
            ds.SpacingBetweenSlices = _ds(spacing[2])
            ds.ReconstructionDiameter = _ds(meta.get("ReconstructionDiameter", 0))
            ds.XRayTubeCurrent = int(meta.get("XRayTubeCurrent", 200))
            ds.ExposureTime = int(meta.get("ExposureTime", 500))
            ds.ConvolutionKernel = meta.get("ConvolutionKernel", "")
            ds.PatientPosition = meta.get("PatientPosition", "HFS")
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = int(meta.get("SeriesNumber", 1))
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = int(instance_numbers[k])
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = [_ds(v) for v in iop]
            ds.FrameOfReferenceUID = for_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = _ds(position[2])
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ny
            ds.Columns = nx
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # [between rows, between columns]
            ds.BitsAllocated = 16
            ds.BitsStored = int(enc["bits_stored"])
            ds.HighBit = int(enc["bits_stored"]) - 1
            ds.PixelRepresentation = 1 if signed else 0
            if padding_stored is not None:
                ds.PixelPaddingValue = int(padding_stored)
            ds.WindowCenter = "-600" if "sharp" in str(meta.get("kernel", "")) else "40"
            ds.WindowWidth = "1500" if "sharp" in str(meta.get("kernel", "")) else "400"
            ds.RescaleIntercept = _ds(enc["intercept"])
            ds.RescaleSlope = _ds(enc["slope"])
            ds.RescaleType = "HU"
            # Rows follow grid axis 1, columns grid axis 0.
            pixels = np.ascontiguousarray(stored[:, :, k].T).astype(np.dtype(enc["dtype"]).newbyteorder("<"))
            ds.PixelData = pixels.tobytes()
            ds["PixelData"].VR = "OW"
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            (tmp / names_list[k]).write_bytes(buf.getvalue())
    return {
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame_of_reference_uid": for_uid,
        "files": sorted(names_list),
        "image_orientation_patient": iop,
        "pixel_spacing": [float(spacing[1]), float(spacing[0])],
        "spacing_between_slices": float(spacing[2]),
    }
