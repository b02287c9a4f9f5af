"""Architecture configs as data: ``custom_nets/configs/<name>.json``.

Each config names the encoders and their sizes *and* the input contract its weights expect
(``input``: spacing, crop/pad size, HU window and scaling, axis codes of the ``(D, H, W)`` tensor;
``text``: tokenizer length and pooling; ``prompts``: zero-shot templates and scoring). Preprocessing and
inference read these numbers from here instead of repeating them.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_model_configs() -> list[str]:
    """Names of the architecture configs shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: str | os.PathLike | dict) -> dict[str, Any]:
    """Load an architecture config by shipped name, by JSON path, or pass a dict through (copied).

    Args:
        name_or_path: a shipped config name (``"ctclip_v2"``), a path to a JSON file, or a dict.

    Raises:
        FileNotFoundError: naming the path or the unknown name and listing the shipped configs.
    """
    if isinstance(name_or_path, dict):
        return copy.deepcopy(name_or_path)
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.exists():
        if not candidate.is_file():
            raise FileNotFoundError(f"model config file not found: {candidate}")
        path = candidate
    else:
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"unknown model config {str(name_or_path)!r}; shipped configs: {', '.join(list_model_configs())}"
            )
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.setdefault("name", path.stem)
    return config
