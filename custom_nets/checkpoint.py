"""Checkpoint loading that accepts the published CT-CLIP files as they are, and our own bundle checkpoints.

Accepted sources (always read with ``torch.load(..., weights_only=True)``):

* ``CT-CLIP_v2.pt`` / ``CT_VocabFine_v2.pt``: a bare CTCLIP state dict, with or without
  ``text_transformer.embeddings.position_ids`` (transformers<4.31 wrote it; CT-CLIP issue #47);
* ``CT_LiPro_v2.pt``: ClassFine keys ``trained_model.*`` + ``classifier.*``;
* MONAI ``CheckpointSaver`` files: ``{"model": state_dict, "optimizer": ..., ...}`` or a bare state dict;
* any of these with a DDP ``module.`` prefix, or under ``model.`` (the zero-shot bundle's exported wrapper).

Loading a ClassFine checkpoint into a :class:`~custom_nets.CTCLIP` takes its ``trained_model.`` part; loading
a CTCLIP checkpoint into a :class:`~custom_nets.ClassFineClassifier` loads the backbone and, unless
``strict=False``, fails because the classifier head is missing.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ctclip_contract import atomic_path

from .classifiers import ClassFineClassifier

__all__ = ["load_state_dict_file", "extract_state_dict", "load_checkpoint", "save_reference_checkpoint"]

CONTAINER_KEYS = ("model", "state_dict", "network", "net", "model_state_dict")


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Read a checkpoint file with ``weights_only=True`` (memory-mapped when the format allows, so tensors
    that get dropped, like the 604 MB ``to_visual_latent_extra``, are never read into memory)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path}: a folder, not a weights file (give the .pt file inside it)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path}: empty file (0 bytes; an interrupted copy or download?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj, source: str = "checkpoint") -> dict:
    """The model state dict inside a loaded checkpoint object (bare, or a saver dict), ``module.`` stripped."""
    if not _is_state_dict(obj):
        inner = None
        if isinstance(obj, Mapping):
            for key in CONTAINER_KEYS:
                if _is_state_dict(obj.get(key)):
                    inner = obj[key]
                    break
        if inner is None:
            keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{source}: no model state dict found (top-level entries: {keys}); expected a state "
                             f"dict or a dict with one of {CONTAINER_KEYS}")
        obj = inner
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _adapt_prefix(state_dict: dict, model: nn.Module) -> dict:
    """The one checkpoint key map: the layouts we accept onto the target model's.

    ``model.*`` (an exported zero-shot wrapper: a CTCLIP under ``model.``) is unwrapped first; then ClassFine
    (``trained_model.*`` + ``classifier.*``) and bare CTCLIP keys are mapped either way.
    """
    if any(k.startswith("model.") for k in state_dict) and not any(k.startswith("text_transformer.")
                                                                    for k in state_dict):
        state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    is_classfine_ckpt = any(k.startswith("trained_model.") for k in state_dict)
    if isinstance(model, ClassFineClassifier):
        if not is_classfine_ckpt:
            return {f"trained_model.{k}": v for k, v in state_dict.items()}
    elif is_classfine_ckpt:
        return {k[len("trained_model."):]: v for k, v in state_dict.items() if k.startswith("trained_model.")}
    return state_dict


def load_checkpoint(model: nn.Module, source, strict: bool = True, map_location: Optional[str] = None) -> dict:
    """Load a checkpoint file (or an already loaded object) into ``model``.

    Args:
        model: a :class:`~custom_nets.CTCLIP` or :class:`~custom_nets.ClassFineClassifier` (any module works
            for bare state dicts).
        source: a path, or a loaded checkpoint object / state dict.
        strict: fail on missing or unexpected keys (``position_ids`` and the ``*_extra`` copies are always
            accepted).
        map_location: unused for files (tensors are copied into the model's own device and dtype).

    Returns:
        ``{"missing_keys": [...], "unexpected_keys": [...]}`` (empty lists when strict).

    Raises:
        RuntimeError: naming the file and listing missing/unexpected keys or shape mismatches.
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint object"
    obj = load_state_dict_file(source) if isinstance(source, (str, os.PathLike)) else source
    state_dict = _adapt_prefix(extract_state_dict(obj, name), model)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:
        raise RuntimeError(f"{name} does not fit {type(model).__name__}: {err}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        def listing(keys):
            return ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
        raise RuntimeError(f"{name} does not fit {type(model).__name__} ({'; '.join(parts)}). Check that the "
                           "model config matches the checkpoint (e.g. ctclip_v2 for the published weights).")
    return {"missing_keys": missing, "unexpected_keys": unexpected}


def save_reference_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a checkpoint the reference CT-CLIP code loads with ``strict=True`` (``*_extra`` entries share storage
    with the used projections, so the file stays small;
    ``position_ids`` included; ClassFine models keep their ``trained_model.``/``classifier.`` layout)."""
    if isinstance(model, ClassFineClassifier):
        if model.head_input != "latent":
            raise ValueError(f"a ClassFine head on the {model.head_input} has no reference layout (CT_LiPro_v2.pt's "
                             "head reads the latent): save its state_dict() instead")
        sd = {f"trained_model.{k}": v for k, v in model.trained_model.reference_state_dict().items()}
        sd.update({f"classifier.{k}": v for k, v in model.classifier.state_dict().items()})
    else:
        sd = model.reference_state_dict()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a Python file: a full disk is an OSError, not C++'s
        torch.save(sd, f)
