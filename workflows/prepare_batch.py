"""prepare_batch functions for MONAI engines with several network inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from monai.engines import PrepareBatchExtraInput, default_prepare_batch

__all__ = ["PrepareBatchOptionalExtraInput"]


class PrepareBatchOptionalExtraInput(PrepareBatchExtraInput):
    """``PrepareBatchExtraInput`` whose extra inputs are passed only when the batch has them.

    The same config then serves runs with and without optional inputs (e.g. a second augmented view that only
    the multiview and visual-SSL losses need): ``network(image, **{kwarg: batch[key] for present keys})``.

    Args:
        extra_keys: ``{network kwarg: batch key}``.
        image_transform: applied to the image once it is on the device, e.g. :class:`transforms.HUWindow` when the
            loader hands over stored int16 (``window_on_device``).
    """

    def __init__(self, extra_keys: Mapping[str, str], image_transform: Optional[Callable] = None):
        if not isinstance(extra_keys, Mapping):
            raise TypeError(f"extra_keys must map network kwargs to batch keys, got {type(extra_keys).__name__}")
        super().__init__(dict(extra_keys))
        self.image_transform = image_transform

    def __call__(self, batchdata: dict[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if self.image_transform is not None:
            image = self.image_transform(image)
        extra = {}
        for kwarg, key in self.extra_keys.items():
            if key not in batchdata:
                continue
            value = batchdata[key]
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, non_blocking=non_blocking, **kwargs)
            extra[kwarg] = value
        return image, label, (), extra
