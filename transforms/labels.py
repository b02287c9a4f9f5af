"""Label vectors for evaluation: keep the columns of the evaluated classes."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["SelectLabelsd"]


class SelectLabelsd(MapTransform):
    """Keep the label columns of the evaluated classes, as float32 ``(C,)`` tensors.

    Args:
        keys: label entries (18-element CT-RATE vectors).
        indices: columns to keep, in output order (:func:`label_indices`); None keeps all.
        drop: remove the label entries instead (classes without labels: predictions only).
        allow_missing_keys: don't raise if a key is missing (unlabelled inference).
    """

    def __init__(self, keys: KeysCollection, indices: Sequence[int] | None = None, drop: bool = False,
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.indices = None if indices is None else list(indices)
        self.drop = bool(drop)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.drop:
                del d[key]
                continue
            y = torch.as_tensor(np.asarray(d[key], dtype=np.float32))
            d[key] = y if self.indices is None else y[self.indices]
        return d
