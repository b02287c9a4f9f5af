"""The MONAI datasets the training and evaluation engines read (the items come from
:func:`transforms.discovery.load_datalist`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["make_dataset", "resolve_window_on_device", "MappedPersistentDataset", "LatentCacheDataset",
           "datalist_labels"]


def resolve_window_on_device(setting: bool | str = "auto", device: Optional[torch.device | str] = None,
                             augment: bool = False) -> bool:
    """Whether the training loader hands over the stored int16 volume (in the model's axis order) and the HU
    window runs on the device, in ``prepare_batch`` (:class:`transforms.HUWindow`).

    Per item that halves the bytes a loader worker converts, caches, collates and sends to the GPU, and leaves the
    int16 to float32 conversion, the costliest step of a full-size item after the read, to the GPU. The model's
    input is bitwise the same either way.

    Args:
        setting: ``"auto"`` (on a CUDA device, unless ``augment``), ``True`` or ``False``.
        device: the training device.
        augment: the loader augments the image (augmentation and views work in model-input units, after the
            window); ``True`` with augmentation is refused.
    """
    if isinstance(setting, str):
        if setting.lower() != "auto":
            raise ValueError(f"window_on_device must be 'auto', true or false, got {setting!r}")
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return dev.type == "cuda" and not augment
    if setting and augment:
        raise ValueError("window_on_device: true needs augment: false and no view loss (augmentation works in "
                         "model-input units, after the HU window); set window_on_device to 'auto' or false")
    return bool(setting)


class MappedPersistentDataset(PersistentDataset):
    """``PersistentDataset`` whose cache hits are memory-mapped (``torch.load(mmap=True, weights_only=True)``).

    A hit costs no copy of its own: the batch's collation reads the volume straight from the page cache, once. At
    full size (105 MB of int16 per item) that halves a loader worker's time per cached item (docs/performance.md).
    Cached items hold plain tensors (MONAI stores them without metadata). Misses and cache writes are MONAI's; an
    unreadable cache file is said, deleted and computed again.
    """

    def _cachecheck(self, item_transformed):
        if self.cache_dir is not None:
            # the name MONAI gives the item: the datalist entry's hash, then the transform (here: cache_key) hash
            hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
            if hashfile.is_file():
                try:
                    return torch.load(hashfile, mmap=True, weights_only=True)
                except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # damaged: computed and written again
                    logger.warning(f"{hashfile}: unreadable cache file ({str(err).splitlines()[0][:120]}); recomputing")
                    hashfile.unlink(missing_ok=True)
        return super()._cachecheck(item_transformed)


def make_dataset(data: Sequence[Mapping[str, Any]], transform: Callable, cache: str = "none",
                 cache_dir: Optional[str | os.PathLike] = None, num_workers: int = 0, cache_rate: float = 1.0,
                 item_bytes: Optional[int] = None, max_memory_gb: float = 4.0, cache_key: Any = None):
    """A MONAI dataset with the chosen cache.

    Args:
        data: datalist items.
        transform: the preprocessing ``Compose``.
        cache: ``"none"`` (read every epoch), ``"memory"`` (``CacheDataset``), ``"disk"``
            (:class:`MappedPersistentDataset` in ``cache_dir``: survives restarts, one uncompressed file per item) or
            ``"auto"``: memory when ``len(data) * item_bytes`` fits in ``max_memory_gb``, else none.
        cache_dir: folder of the persistent cache.
        num_workers: workers that fill a memory cache.
        cache_rate: fraction cached in memory.
        item_bytes: memory of one cached item (the model-input volume), for ``"auto"``.
        max_memory_gb: memory budget of ``"auto"``.
        cache_key: the settings the cached items depend on (JSON-serialisable; model config, window, report
            settings...). It is hashed into the disk cache's file names, so a run with other settings never reads
            another run's items; files of old settings stay until the folder is deleted.
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
        # MONAI names a cached item by the datalist item alone: without a key, changed settings read stale items
        key = json.dumps(cache_key, sort_keys=True, default=str).encode()
        return MappedPersistentDataset(data, transform, cache_dir=cache_dir,
                                       hash_transform=lambda _: hashlib.md5(key).hexdigest().encode())
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
