"""The last step before a model: its HU window and scaling, its axis codes and ``(C, D, H, W)`` layout.

Preprocessed volumes are stored once as int16 HU in RAS; each model applies its own contract when it
reads them, from the input contract of its model config (:class:`ctclip_contract.InputContract`). The HU window can
be deferred (``window=False``): the loader then hands over the stored int16 in the model's axis order, half the bytes
of the float32 input, and :class:`HUWindow` applies the same window where the batch lands (a GPU). The masks stored
beside a volume (``seg``, ``findings_mask``: :data:`ctclip_contract.anatomy.MASK_KEYS`) take the same reorientation,
without the HU window, when a model reads them (:class:`ToModelInputd` ``mask_keys``).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Orientation, Transform

from ctclip_contract import InputContract, load_model_config
from ctclip_contract.anatomy import FINDINGS_DTYPE, MASK_KEYS, SEG_DTYPE

__all__ = ["HUWindow", "ToModelInput", "ToModelInputd", "MASK_INPUT_DTYPES"]

logger = logging.getLogger(__name__)

#: The dtype of each mask in the model input (the stored one: region ids, finding bits).
MASK_INPUT_DTYPES = {MASK_KEYS["seg"]: getattr(torch, SEG_DTYPE), MASK_KEYS["findings"]: getattr(torch, FINDINGS_DTYPE)}


class HUWindow(Transform):
    """HU values to a model's input units: ``float32 (clip(HU, *hu_window) - hu_offset) / hu_scale``.

    Runs on the tensor's device and keeps its layout, so the same window serves the loader (inside
    :class:`ToModelInput`) and a batch of stored int16 already on a GPU (``window=False`` loaders); the results are
    bitwise equal. A floating-point input with NaN or inf is refused: a clip keeps NaN, and a model turns it into
    plausible-looking probabilities.

    Args:
        hu_window: (low, high) clip range in HU.
        hu_offset: subtracted after clipping.
        hu_scale: divisor after the offset.
    """

    def __init__(self, hu_window: Sequence[float] = (-1000.0, 1000.0), hu_offset: float = 0.0,
                 hu_scale: float = 1000.0) -> None:
        if len(hu_window) != 2 or hu_window[0] >= hu_window[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {hu_window}")
        if hu_scale == 0:
            raise ValueError("hu_scale must not be 0")
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.hu_offset = float(hu_offset)
        self.hu_scale = float(hu_scale)

    @classmethod
    def from_model_config(cls, config: Mapping | str | InputContract) -> HUWindow:
        """Build from a model config (name, JSON path, dict or ModelConfig) or its input contract."""
        inp = config if isinstance(config, InputContract) else load_model_config(config).input
        return cls(inp.hu_window, inp.hu_offset, inp.hu_scale)

    def __call__(self, img: torch.Tensor, source: str | None = None) -> torch.Tensor:  # type: ignore[override]
        """The windowed float32 copy of ``img`` (a plain tensor; contiguous in ``img``'s axis order).

        Args:
            img: HU values of any dtype and shape, on any device.
            source: the volume's name for the error message (default: the MetaTensor's file name).
        """
        if isinstance(img, MetaTensor):
            source = source or img.meta.get("filename_or_obj")
            img = img.as_tensor()
        # one pass from the stored dtype (int16 when read as stored) into a contiguous float32 copy, then the window
        # in place: at 240x480x480 each extra pass over the 221 MB float32 volume costs a loader worker ~0.1-0.5 s
        t = torch.empty(img.shape, dtype=torch.float32, device=img.device)
        t.copy_(img)
        if img.is_floating_point() and not bool(torch.isfinite(t).all()):  # an integer volume cannot hold NaN/inf
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{source or 'volume'}: {n_bad} non-finite voxels (NaN/inf) in the model input")
        t.clamp_(*self.hu_window)
        if self.hu_offset:
            t.sub_(self.hu_offset)
        return t.div_(self.hu_scale)


class ToModelInput(Transform):
    """HU volume (channel-first, any orientation with an affine) to a model's float32 input.

    ``out = (clip(HU, *hu_window) - hu_offset) / hu_scale``, reoriented so that the spatial axes
    carry ``axis_codes`` (e.g. ``"SLP"``: D = superior, H = left, W = posterior). Orientation uses the
    affine, so a volume in any stored orientation lands the same way; a plain tensor without an
    affine is taken as RAS.

    Args:
        hu_window: (low, high) clip range in HU.
        hu_offset: subtracted after clipping.
        hu_scale: divisor after the offset.
        axis_codes: anatomical codes of the output (D, H, W) axes, three letters from L/R, A/P, S/I.
        window: apply the HU window here (float32 output). ``False``: the output keeps the stored dtype (int16 HU
            from ct_preprocess), contiguous in the model's axis order, and :class:`HUWindow` of the same contract
            must follow, e.g. on the GPU in the trainer's ``prepare_batch``.
    """

    def __init__(
        self,
        hu_window: Sequence[float] = (-1000.0, 1000.0),
        hu_offset: float = 0.0,
        hu_scale: float = 1000.0,
        axis_codes: str = "SLP",
        window: bool = True,
    ) -> None:
        self.hu = HUWindow(hu_window, hu_offset, hu_scale)
        self.window = bool(window)
        self.axis_codes = axis_codes.upper()
        self.orient = Orientation(axcodes=self.axis_codes, labels=(("L", "R"), ("P", "A"), ("I", "S")))

    @classmethod
    def from_model_config(cls, config: Mapping | str | InputContract, window: bool = True) -> ToModelInput:
        """Build from a model config (name, JSON path, dict or ModelConfig) or its input contract."""
        inp = config if isinstance(config, InputContract) else load_model_config(config).input
        return cls(inp.hu_window, inp.hu_offset, inp.hu_scale, inp.axis_codes, window=window)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first 3-D volume (C, X, Y, Z), got shape {tuple(img.shape)}")
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)  # identity affine: RAS in MONAI's convention
        out = self.orient(img)
        src = out.as_tensor()
        # the reorientation is a strided view: the window's float32 copy or (deferred) contiguous() gathers it once
        t = self.hu(src, source=img.meta.get("filename_or_obj")) if self.window else src.contiguous()
        meta = {k: v for k, v in out.meta.items() if k != "affine"}
        return MetaTensor(t, affine=out.affine, meta=meta)


class ToModelInputd(MapTransform):
    """Dictionary form of :class:`ToModelInput`, and the masks beside the volume on the same grid.

    Each key of ``mask_keys`` (channel-first label maps on the image's grid and affine, e.g. ``seg``) takes exactly
    the image's reorientation, and nothing else: no HU window, no scaling, values kept as integers
    (:data:`MASK_INPUT_DTYPES`; a float map from a reader is rounded). A mask whose grid differs from the image's
    after reorientation is refused, naming the item. An item without a mask (the key absent or None) gets an
    all-background map (zeros) of the image's shape, so that a batch collates: an encoder that reads masks runs
    regions-off for it (:class:`custom_nets.ct_specialised.CTSpecialisedEncoder`), the region-level losses leave
    it out; said once in the log.

    Args:
        keys: image keys.
        hu_window, hu_offset, hu_scale, axis_codes, window: see :class:`ToModelInput`.
        allow_missing_keys: don't raise if a key is missing.
        mask_keys: mask keys that follow the (first) image key's reorientation; empty: masks are not touched.
    """

    def __init__(
        self,
        keys: KeysCollection,
        hu_window: Sequence[float] = (-1000.0, 1000.0),
        hu_offset: float = 0.0,
        hu_scale: float = 1000.0,
        axis_codes: str = "SLP",
        allow_missing_keys: bool = False,
        mask_keys: KeysCollection = (),
        window: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ToModelInput(hu_window, hu_offset, hu_scale, axis_codes, window=window)
        self.mask_keys = (mask_keys,) if isinstance(mask_keys, str) else tuple(mask_keys)
        self._said_missing: set[str] = set()  # each mask key's absence is said once

    def _mask(self, d: Mapping[Hashable, Any], key: Hashable, image: torch.Tensor) -> torch.Tensor:
        dtype = MASK_INPUT_DTYPES.get(str(key), torch.int64)
        name = d.get("name", "item")
        if d.get(key) is None:
            if str(key) not in self._said_missing:
                effect = " (regions off for this volume)" if str(key) == MASK_KEYS["seg"] else ""
                logger.warning(f"{name}: no {key!r} mask; an all-background map stands in{effect}; said once per "
                               "mask key")
                self._said_missing.add(str(key))
            return torch.zeros(image.shape, dtype=dtype)
        mask = d[key]
        if not isinstance(mask, MetaTensor):
            mask = MetaTensor(mask)
        if mask.ndim != 4:
            raise ValueError(f"{name}: mask {key!r}: expected a channel-first 3-D map (1, X, Y, Z), got shape "
                             f"{tuple(mask.shape)}")
        out = self.converter.orient(mask)
        if tuple(out.shape[1:]) != tuple(image.shape[1:]) or (
                isinstance(image, MetaTensor) and not torch.allclose(out.affine.double(), image.affine.double(),
                                                                     atol=1e-3)):
            raise ValueError(f"{name}: mask {key!r} of shape {tuple(out.shape[1:])} is not on the volume's grid "
                             f"{tuple(image.shape[1:])} (same affine expected; ct_preprocess writes them so)")
        values = out.as_tensor()
        return (values.round() if values.is_floating_point() else values).to(dtype).contiguous()

    @classmethod
    def from_model_config(cls, keys: KeysCollection, config: Mapping | str | InputContract, **kwargs) -> ToModelInputd:
        """Build from a model config (name, JSON path, dict or ModelConfig) or its input contract; ``kwargs``
        override it."""
        inp = config if isinstance(config, InputContract) else load_model_config(config).input
        params = dict(hu_window=inp.hu_window, hu_offset=inp.hu_offset, hu_scale=inp.hu_scale, axis_codes=inp.axis_codes)
        params.update(kwargs)
        return cls(keys, **params)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = None
        for key in self.key_iterator(d):
            try:
                d[key] = self.converter(d[key])
            except ValueError as err:
                if "name" in d and str(d["name"]) not in str(err):
                    raise ValueError(f"{d['name']}: {err}") from None
                raise
            first = d[key] if first is None else first
        if self.mask_keys and first is not None:
            for key in self.mask_keys:
                d[key] = self._mask(d, key, first)
        return d
