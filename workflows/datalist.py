"""Reading the ``datalist.json`` that the ct_preprocess bundle writes (one definition for every stage)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


def load_datalist(dataset_dir: str | os.PathLike, split: str, datalist: str = "datalist.json",
                  max_items: Optional[int] = None, require_labels: bool = False) -> list[dict[str, Any]]:
    """One split of a ct_preprocess ``datalist.json``, with absolute image paths.

    Args:
        dataset_dir: the preprocessed folder (``datalist.json`` and ``volumes/``).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        datalist: file name inside ``dataset_dir`` (or an absolute path).
        max_items: keep only the first items (quick runs).
        require_labels: fail when an entry has no 18-label vector (supervised stages).

    Raises:
        FileNotFoundError, KeyError, ValueError: naming the file and the reason.
    """
    path = Path(datalist) if os.path.isabs(str(datalist)) else Path(dataset_dir) / datalist
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path} (run bundles/ct_preprocess first or pass --dataset_dir)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if split not in data:
        raise KeyError(f"{path}: no {split!r} split (has {sorted(data)})")
    items = []
    for entry in data[split][: max_items if max_items else None]:
        item = dict(entry)
        if "image" not in item:
            raise ValueError(f"{path}: an item of split {split!r} has no 'image' entry: {entry}")
        image = Path(item["image"])
        item["image"] = str(image if image.is_absolute() else (path.parent / image).resolve())
        if not os.path.exists(item["image"]):
            raise FileNotFoundError(f"{path}: volume {item['image']} of {item.get('name')!r} does not exist")
        if require_labels and item.get("label") is None:
            raise ValueError(f"{path}: {item.get('name')!r} in split {split!r} has no label vector")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: split {split!r} is empty")
    return items
