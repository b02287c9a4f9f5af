"""The MONAI datasets the training and evaluation engines read (the items come from
:func:`transforms.discovery.load_datalist`)."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from torch import nn

__all__ = ["make_dataset", "LatentCacheDataset", "datalist_labels"]


def make_dataset(data: Sequence[Mapping[str, Any]], transform: Callable, cache: str = "none",
                 cache_dir: Optional[str | os.PathLike] = None, num_workers: int = 0, cache_rate: float = 1.0,
                 item_bytes: Optional[int] = None, max_memory_gb: float = 4.0):
    """A MONAI dataset with the chosen cache.

    Args:
        data: datalist items.
        transform: the preprocessing ``Compose``.
        cache: ``"none"`` (read every epoch), ``"memory"`` (``CacheDataset``), ``"disk"``
            (``PersistentDataset`` in ``cache_dir``: survives restarts; delete it when the transforms change) or
            ``"auto"``: memory when ``len(data) * item_bytes`` fits in ``max_memory_gb``, else none.
        cache_dir: folder of the persistent cache.
        num_workers: workers that fill a memory cache.
        cache_rate: fraction cached in memory.
        item_bytes: memory of one cached item (the model-input volume), for ``"auto"``.
        max_memory_gb: memory budget of ``"auto"``.
    """
    if hasattr(transform, "flatten"):
        transform = transform.flatten()  # a nested Compose counts as random: flatten so the cache covers the loading
    if cache == "auto":
        if item_bytes is None:
            raise ValueError("cache='auto' needs item_bytes")
        cache = "memory" if len(data) * item_bytes <= max_memory_gb * 2**30 else "none"
    if cache == "none":
        return Dataset(data, transform)
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers or None, progress=False)
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    raise ValueError(f"cache must be 'none', 'memory', 'disk' or 'auto', got {cache!r}")


class LatentCacheDataset(CacheDataset):
    """A ``CacheDataset`` that skips reading volumes whose latents the network already holds.

    Once every volume of the dataset is in :class:`ClassFineNetwork`'s latent cache, items are returned without
    their image (a ``(0,)`` placeholder): an epoch then costs no disk reads and no preprocessing. The decision is
    all-or-nothing per dataset (a batch never mixes images and placeholders) and is re-checked whenever the
    network's cache changes. With a network that has no latent cache (e.g. VocabFine) it is a plain
    ``CacheDataset``.

    Args:
        data: datalist items with a unique ``name``.
        transform: the full preprocessing (used when the image is needed).
        network: the network whose cache is consulted.
        label_key: key of the label vector (converted to a float32 tensor on the placeholder path).
        name_key: key of the volume name.
        **kwargs: ``CacheDataset`` arguments (``cache_rate``, ``num_workers``, ...).
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], transform: Any, network: nn.Module, label_key: str = "label",
                 name_key: str = "name", **kwargs) -> None:
        super().__init__(data=data, transform=transform, **kwargs)
        self.network = network
        self.label_key, self.name_key = label_key, name_key
        self._names = [str(d.get(name_key)) for d in data]
        self._memo: Optional[tuple] = None

    def all_cached(self) -> bool:
        """Whether every volume of the dataset can be served from the network's latent cache."""
        net = self.network
        if not hasattr(net, "is_cached") or len(set(self._names)) != len(self._names):
            return False
        state = net.cache_state()
        if self._memo is None or self._memo[0] != state:
            self._memo = (state, all(net.is_cached(n) for n in self._names))
        return self._memo[1]

    def _transform(self, index: int):
        if not self.all_cached():
            return super()._transform(index)
        item = self.data[index]
        out = {self.name_key: item[self.name_key], "image": torch.zeros(0)}
        if item.get(self.label_key) is not None:
            out[self.label_key] = torch.as_tensor(item[self.label_key], dtype=torch.float32)
        return out


def datalist_labels(items: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``(N, C)`` label matrix of datalist items."""
    return np.asarray([it["label"] for it in items], dtype=np.float64)


# ------------------------------------------------------------------------------------------------ thresholds
