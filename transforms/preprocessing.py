"""The one preprocessing definition: raw chest CT (NIfTI file or DICOM folder) to int16 HU in RAS at a
target spacing and size, used by the ct_preprocess bundle and by every "one scan in" inference path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
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

from .hu import HUDecisionError, RescaleToHUd, _sample, count_below
from .io import CastToHUInt16d, CTVolumeReader, ResampleToSpacingd, reversed_axes_affine
from .model_input import ToModelInputd
from .qc import DEFAULT_MAX_READ_BYTES, CheckInputd, CTQualityCheckd, check_hu_sample

__all__ = ["build_preprocessing", "StreamedPreprocessing", "raw_to_model_input_transforms", "inference_transforms",
           "MASK_DTYPES"]

#: Optional mask keys carried through the image's geometry (nearest neighbour), with their stored dtype:
#: ``seg`` the anatomical label map, ``findings_mask`` the bit field of the findings (ctclip_contract.anatomy;
#: not ``findings``, an item's report text).
MASK_DTYPES = {"seg": "uint8", "findings_mask": "int32"}


def _load_chain(reader: CTVolumeReader | None = None) -> Compose:
    """:func:`build_preprocessing`'s ``load``: the volume channel-first, voxel axes ``(k, j, i)``."""
    return Compose([
        LoadImaged(keys="image", reader=reader or CTVolumeReader(), image_only=True, dtype=None),
        EnsureChannelFirstd(keys="image"),
    ])


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
    load = _load_chain()
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


class _Stopped(Exception):
    """The streamed resampling was called off (its guess was wrong, or the volume failed)."""


class StreamedPreprocessing:
    """``process(load(data))`` of :func:`build_preprocessing`, with a NIfTI volume resampled while it is read.

    The read (ISA-L inflating the file into the array, without the GIL) is the floor of preprocessing a ``.nii.gz``;
    run after it, the HU mapping and the resampling add about 60% on 2 cores. Here the resampling follows the read
    plane by plane in other threads, mapping each plane to HU itself (:func:`transforms.io.linear_resample_axes`'s
    ``value_map``) with the mapping judged on the first planes read. Once the whole volume is in, the chain's own
    steps run in its order on the stored values: the structural QC, the HU decision on the whole volume's sample,
    the HU QC. When the decision is the guessed one the streamed result is kept; otherwise it is dropped and the
    chain resamples as usual. Either way the result, the provenance and the errors are the chain's own, bit for
    bit; only the wall time differs. The CPU time does not: a cohort run with a worker per core gains nothing.

    Streamed: a 3-D int16 NIfTI of at least ``min_chunks`` chunks without header scaling and with an orientation
    (sform or qform), no DICOM padding, the separable resampler on an axis-aligned grid, a guessed mapping
    ``HU = stored + integer``. Anything else is ``process(load(data))``.

    Args:
        load, process: the two chains of :func:`build_preprocessing` (``resampler="separable"``).
        min_planes: planes read before the mapping is guessed from them.
        chunk_bytes: bytes inflated between two hand-overs to the resampling (4 MiB: the last chunk's planes are
            all that is left to resample when the read ends).
        threads: resampling threads beside the read (one: on 2 cores a second one slows the read, which sets the
            pace; measured 0.40 s against 0.46 s for a 512x512x300 volume).
        min_chunks: smaller volumes take the chain: there is little read to overlap, and the chain resamples with
            every thread (the demo's 3 MB volumes: 0.040 s streamed against 0.033 s per volume in one process).
    """

    def __init__(self, load: Compose, process: Compose, min_planes: int = 16, chunk_bytes: int = 1 << 22,
                 threads: int = 1, min_chunks: int = 4) -> None:
        self.load, self.process, self.min_planes, self.chunk_bytes = load, process, int(min_planes), int(chunk_bytes)
        self.threads, self.min_chunks = int(threads), int(min_chunks)
        steps = list(process.transforms)
        kinds = [CTQualityCheckd, RescaleToHUd, CTQualityCheckd, ResampleToSpacingd]
        self.enabled = len(steps) > len(kinds) and all(isinstance(t, k) for t, k in zip(steps, kinds)) and \
            steps[3].resampler.mode == "bilinear"
        if self.enabled:
            self.qc_structure, self.to_hu, self.qc_hu, self.resample = steps[:4]
            self.rest = steps[4:]  # the masks' resampling, the int16 cast
            floor = self.to_hu.rescaler.floor_hu
            self.enabled = floor is None or float(floor).is_integer()

    def _plan(self, data: Mapping[str, Any]):
        """The stored image and the resampling plan, or None when this input is not streamed."""
        path = data.get("image")
        if not self.enabled or not isinstance(path, str) or not path.lower().endswith((".nii", ".nii.gz")) or \
                data.get(self.to_hu.padding_key) is not None:
            return None
        try:
            obj = nib.load(path)
        except Exception:  # noqa: BLE001 - not a NIfTI nibabel opens: the chain says why, in its own words
            return None
        hdr = obj.header
        if len(obj.shape) != 3 or np.prod(obj.shape) * 2 < self.min_chunks * self.chunk_bytes or \
                np.dtype(obj.get_data_dtype()) != np.dtype("<i2") or \
                (float(obj.dataobj.slope), float(obj.dataobj.inter)) != (1.0, 0.0) or \
                (int(hdr["sform_code"]) <= 0 and int(hdr["qform_code"]) <= 0):
            return None
        affine = reversed_axes_affine(obj.affine)
        plan = self.resample.resampler.plan(affine, obj.shape[::-1])
        return None if plan is None else (obj.shape, affine, plan)

    def __call__(self, data: Mapping[str, Any], loaded: Callable[[dict], None] | None = None,
                 stream: bool = True) -> dict:
        """Args:
            data: ``load``'s input (``image``: the path; the HU and name entries of the chain).
            loaded: called with the data as read, before ``process`` (e.g. to record the input's geometry, or to
                add what ``process`` should carry along; then pass ``stream=False``).
            stream: False: ``process(load(data))`` as it is.
        """
        planned = self._plan(data) if stream else None
        if planned is None:
            d = self.load(data)
            if loaded is not None:
                loaded(d)
            return self.process(d)
        shape, affine, plan = planned
        plane_bytes = shape[0] * shape[1] * 2
        cond = threading.Condition()
        progress = {"planes": 0, "stop": False}
        worker: dict[str, Any] = {}
        to_hu = self.to_hu.rescaler
        slope = self.to_hu._number(data.get(self.to_hu.slope_key))
        intercept = self.to_hu._number(data.get(self.to_hu.intercept_key))
        name = str(data.get(self.to_hu.name_key, "image"))

        def planes_ready(n: int) -> None:
            with cond:
                while progress["planes"] < n and not progress["stop"]:
                    cond.wait()
                if progress["stop"]:
                    raise _Stopped()

        def start(stored: np.ndarray) -> None:
            worker["started"] = True
            view = torch.from_numpy(stored.T)  # (k, j, i), C-contiguous: planes in the order they are read
            try:
                guess, _ = to_hu.decide(_sample(view[None, :progress["planes"]]), slope, intercept, name)
            except HUDecisionError:
                return  # no guess: the chain decides once everything is read
            if guess[1] != 1.0 or not float(guess[2]).is_integer():
                return
            floor = None if to_hu.floor_hu is None else float(to_hu.floor_hu)
            img = MetaTensor(view[None], affine=torch.as_tensor(affine))

            def run() -> None:
                try:
                    worker["out"] = self.resample.resampler.resample(img, plan, value_map=(1.0, guess[2], floor),
                                                                     planes_ready=planes_ready, threads=self.threads)
                except _Stopped:
                    pass
                except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                    worker["error"] = e

            worker["guess"] = guess
            worker["thread"] = threading.Thread(target=run, daemon=True)
            worker["thread"].start()

        def on_chunk(stored: np.ndarray, nbytes: int) -> None:
            with cond:
                progress["planes"] = nbytes // plane_bytes
                cond.notify_all()
            if "started" not in worker and (progress["planes"] >= self.min_planes or nbytes >= stored.nbytes):
                start(stored)

        def stop() -> None:
            with cond:
                progress["stop"] = True
                cond.notify_all()
            if "thread" in worker:
                worker["thread"].join()

        try:
            d = _load_chain(CTVolumeReader(on_chunk=on_chunk, chunk_bytes=self.chunk_bytes))(data)
            if loaded is not None:
                loaded(d)
            d = self.qc_structure(d)
            guess = worker.get("guess")
            stored = d["image"]
            sample = _sample(stored)
            chosen = evidence = None
            if guess is not None:
                chosen, evidence = to_hu.decide(sample, slope, intercept, name)
            if guess is None or chosen[1:] != guess[1:]:
                stop()
                for step in self.process.transforms[1:]:  # the chain after its structural QC
                    d = step(d)
                return d
            # the chain's floor count and HU check, on the stored values shifted by the chosen intercept
            shift, floored = int(chosen[2]), 0.0
            t = stored.as_tensor()
            if to_hu.floor_hu is not None:
                below = int(np.ceil(to_hu.floor_hu)) - shift  # HU < floor  <=>  stored < floor - intercept
                n_below = t.numel() if below > 32767 else 0 if below <= -32768 else count_below(t, below)
                floored = n_below / max(t.numel(), 1)
            provenance = to_hu.provenance(chosen, evidence, floored)
            if self.qc_hu.checker.check_hu:
                hu = sample + np.float32(shift)
                check_hu_sample(hu if to_hu.floor_hu is None else np.maximum(hu, np.float32(to_hu.floor_hu)),
                                str(d.get(self.qc_hu.name_key, "image")))
            worker["thread"].join()
            if "error" in worker:
                raise worker["error"]
            out = worker["out"]
            meta = {k: v for k, v in stored.meta.items() if k != "affine"}
            meta.update(hu_provenance=provenance, spatial_shape=np.asarray(plan["out_shape"]))
            d["image"] = MetaTensor(out.as_tensor(), affine=out.affine, meta=meta)
            d[self.to_hu.provenance_key] = provenance
            for step in self.rest:
                d = step(d)
            return d
        finally:
            stop()


def raw_to_model_input_transforms(config: Mapping | str, hu_source: str = "auto", qc: Mapping[str, Any] | None = None,
                                  resampler: str = "separable", model_input: bool = True) -> list:
    """Transforms that take a raw volume (``"image"``: NIfTI path or DICOM folder) to a model's input.

    :class:`~transforms.qc.CheckInputd` (header checks, DICOM padding range, orientation-less NIfTI refused)
    then :func:`build_preprocessing` at the model config's spacing, size and ``pad_hu`` — the int16 volume the
    ct_preprocess bundle would store, a NIfTI file resampled while it is read (:class:`StreamedPreprocessing`) —
    then :class:`~transforms.ToModelInputd` (unless ``model_input`` is False). For inference bundles that accept raw
    scans ("one scan in, probabilities out").

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
                         max_bytes=limits.get("max_bytes", DEFAULT_MAX_READ_BYTES)),
             StreamedPreprocessing(load, process)]
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
