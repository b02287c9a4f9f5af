"""The one preprocessing definition: raw chest CT (NIfTI file or DICOM folder) to int16 HU in RAS at a
target spacing and size, used by the ct_preprocess bundle and by every "one scan in" inference path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ResizeWithPadOrCropd,
    SelectItemsd,
    Spacingd,
)

from ctclip_contract import load_model_config

from .hu import RescaleToHUd
from .io import CastToHUInt16d, CTVolumeReader, ResampleToSpacingd
from .model_input import ToModelInputd
from .qc import DEFAULT_MAX_READ_BYTES, CheckInputd, CTQualityCheckd

__all__ = ["build_preprocessing", "raw_to_model_input_transforms", "inference_transforms", "MASK_DTYPES"]

#: Optional mask keys carried through the image's geometry (nearest neighbour), with their stored dtype:
#: ``seg`` the anatomical label map, ``findings_mask`` the bit field of the findings (ctclip_contract.anatomy;
#: not ``findings``, an item's report text).
MASK_DTYPES = {"seg": "uint8", "findings_mask": "int32"}


def build_preprocessing(
    spacing_mm: Sequence[float],
    spatial_size: Sequence[int],
    pad_hu: float = -1000.0,
    hu_source: str = "auto",
    qc: Mapping[str, Any] | None = None,
    resampler: str = "separable",
) -> tuple[Compose, Compose]:
    """The MONAI transform chains (before and after the geometry fix-up point).

    Returns:
        ``(load, process)``: ``load`` reads the volume (:class:`transforms.io.CTVolumeReader`: NIfTI with
        nibabel in its stored dtype, DICOM folders with ITK) channel-first, voxel axes ``(k, j, i)``;
        ``process`` maps to HU (in place; DICOM padding from a ``pixel_padding`` entry becomes
        ``pad_hu``), checks quality, resamples to ``spacing_mm`` in RAS (trilinear; the reorientation
        folded into the sampling plan), crops/pads to ``spatial_size`` with ``pad_hu`` (folded into the
        resampling too) and stores int16. ``resampler="monai"`` uses ``Orientationd`` + ``Spacingd`` +
        ``ResizeWithPadOrCropd`` instead (same grid and affine).

        The optional mask keys of :data:`MASK_DTYPES` (``seg``, ``findings_mask``: channel-first, on the image's grid and
        affine when ``process`` starts) go through exactly the image's reorientation, spacing and crop/pad, by
        nearest neighbour, padded with 0 and stored as uint8 / int32. Without them the chain does what it did.
    """
    qc = dict(qc or {})
    load = Compose([
        LoadImaged(keys="image", reader=CTVolumeReader(), image_only=True, dtype=None),
        EnsureChannelFirstd(keys="image"),
    ])
    masks = list(MASK_DTYPES)
    if resampler == "monai":
        resample = [
            Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys="image", pixdim=tuple(spacing_mm), mode="bilinear", padding_mode="border"),
            ResizeWithPadOrCropd(keys="image", spatial_size=tuple(spatial_size), mode="constant", value=pad_hu),
            # the masks: the same three steps on the same grid, nearest neighbour
            Orientationd(keys=masks, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
            Spacingd(keys=masks, pixdim=tuple(spacing_mm), mode="nearest", padding_mode="border",
                     allow_missing_keys=True),
            ResizeWithPadOrCropd(keys=masks, spatial_size=tuple(spatial_size), mode="constant", value=0,
                                 allow_missing_keys=True),
            CastToTyped(keys=masks, dtype=[getattr(torch, MASK_DTYPES[k]) for k in masks], allow_missing_keys=True),
        ]
    else:  # the same grid, affine and crop/pad in one pass
        resample = [ResampleToSpacingd(keys="image", pixdim=tuple(spacing_mm), out_dtype="int16", axcodes="RAS",
                                       spatial_size=tuple(spatial_size), pad_value=pad_hu),
                    *[ResampleToSpacingd(keys=k, pixdim=tuple(spacing_mm), out_dtype=dtype, axcodes="RAS",
                                         spatial_size=tuple(spatial_size), pad_value=0, mode="nearest",
                                         allow_missing_keys=True) for k, dtype in MASK_DTYPES.items()]]
    check_hu = qc.pop("check_hu", True)
    qc.pop("max_bytes", None)  # a bound on reading, checked from the header before the read (CheckInputd)
    process = Compose([
        CTQualityCheckd(keys="image", check_hu=False, **qc),  # structure first: a 2-D image is "not 3-D"
        RescaleToHUd(keys="image", source=hu_source, padding_hu=pad_hu, inplace=True),
        CTQualityCheckd(keys="image", check_hu=check_hu, check_structure=False),
        *resample,
        CastToHUInt16d(keys="image"),
    ])
    return load, process


def raw_to_model_input_transforms(config: Mapping | str, hu_source: str = "auto", qc: Mapping[str, Any] | None = None,
                                  resampler: str = "separable", model_input: bool = True) -> list:
    """Transforms that take a raw volume (``"image"``: NIfTI path or DICOM folder) to a model's input.

    :class:`~transforms.qc.CheckInputd` (header checks, DICOM padding range, orientation-less NIfTI refused)
    then :func:`build_preprocessing` at the model config's spacing, size and ``pad_hu`` — the int16 volume the
    ct_preprocess bundle would store — then :class:`~transforms.ToModelInputd` (unless ``model_input`` is
    False). For inference bundles that accept raw scans ("one scan in, probabilities out").

    Args:
        config: model config (name, JSON path, dict or :class:`~ctclip_contract.ModelConfig`).
        hu_source: see :class:`transforms.RescaleToHUd`; the decision lands in ``hu_provenance``.
        qc: keyword arguments of :class:`transforms.CTQualityCheckd` (``max_voxels`` also applies before the read),
            and ``max_bytes``, the bound on what reading one input may allocate (:func:`transforms.qc.check_input`).
        resampler: ``"separable"`` or ``"monai"`` (see :func:`build_preprocessing`).
        model_input: end with the model's :class:`~transforms.ToModelInputd`.
    """
    config = load_model_config(config)
    inp = config.input
    load, process = build_preprocessing(inp.spacing_mm, inp.spatial_size, inp.pad_hu, hu_source, qc, resampler)
    limits = dict(qc or {})
    chain = [CheckInputd(keys="image", max_voxels=limits.get("max_voxels"),
                         max_bytes=limits.get("max_bytes", DEFAULT_MAX_READ_BYTES)), load, process]
    return chain + [ToModelInputd.from_model_config("image", config)] if model_input else chain


def inference_transforms(model_config: str | Mapping[str, Any], raw: bool = True, hu_source: str = "auto",
                         qc: Optional[Mapping[str, Any]] = None, resampler: str = "separable"):
    """The transform chain of "one scan in, probabilities out".

    ``raw=True``: :func:`raw_to_model_input_transforms` (header checks, then the ct_preprocess chain
    at the model config's spacing and size, then :class:`~transforms.ToModelInputd`). ``raw=False``: for volumes
    already written by ct_preprocess at this model's geometry (the same header checks, loader, channel first,
    ToModelInputd only). Both end with a plain float32 tensor (no metadata) and keep only ``image``, ``name`` (and
    ``label`` when present).

    Args:
        model_config: model config name, path or dict (its ``input`` section is the contract).
        raw: run the full preprocessing.
        hu_source: see :class:`~transforms.RescaleToHUd`.
        qc: ``CTQualityCheckd`` keyword arguments.
        resampler: ``"separable"`` or ``"monai"`` (see ct_preprocess).
    """
    cfg = load_model_config(model_config)
    if raw:
        head = raw_to_model_input_transforms(cfg, hu_source, qc, resampler)
    else:
        # a stored volume passes the raw inputs' header checks before it is read: a file that is not an image,
        # a truncated one or one whose header promises more voxels than it holds ends in one line naming it
        head = [CheckInputd(keys="image", padding_key=None,
                            max_bytes=dict(qc or {}).get("max_bytes", DEFAULT_MAX_READ_BYTES)),
                LoadImaged(keys="image", reader=CTVolumeReader(), image_only=True, dtype=None),
                EnsureChannelFirstd(keys="image"),
                ToModelInputd.from_model_config("image", cfg)]
    return Compose(head + [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        SelectItemsd(keys=["image", "name", "label"], allow_missing_keys=True),
    ])
