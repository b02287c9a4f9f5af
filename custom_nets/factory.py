"""``create_model``: build a CT-CLIP model from an architecture config (``custom_nets/configs/<name>.json``).

Architecture sections of a config:

* ``ctvit``: :class:`~custom_nets.ctvit.CTViT` kwargs (the reference's names, plus our execution options);
* ``text_encoder``: see :mod:`custom_nets.text`;
* ``ctclip``: :class:`~custom_nets.CTCLIP` kwargs (``dim_image``, ``dim_text``, ``dim_latent``, options).

The config's ``input`` section (the preprocessing contract) is checked against ``ctvit`` so that a config
whose crop size does not fit the encoder fails at build time, naming the numbers.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Optional

from torch import nn

from .checkpoint import load_checkpoint
from .ctclip import CTCLIP
from .ctvit import CTViT
from .model_config import load_model_config
from .text import build_text_encoder

__all__ = ["create_model", "merge_config", "image_input_shape"]


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Recursive merge: dict values merge into dict values, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def image_input_shape(config: Mapping[str, Any] | str) -> tuple[int, int, int, int]:
    """``(1, D, H, W)`` model-input shape of a config: ``input.spatial_size`` is (x, y, z) in RAS and with axis
    codes ``"SLP"`` D = z, H = x, W = y."""
    cfg = load_model_config(config) if not isinstance(config, Mapping) else config
    inp = cfg["input"]
    codes = inp.get("axis_codes", "SLP")
    size_by_axis = {"L": inp["spatial_size"][0], "R": inp["spatial_size"][0], "A": inp["spatial_size"][1],
                    "P": inp["spatial_size"][1], "S": inp["spatial_size"][2], "I": inp["spatial_size"][2]}
    return (1,) + tuple(size_by_axis[c] for c in codes)


def _check(cfg: Mapping[str, Any], name: str) -> None:
    for section in ("ctvit", "text_encoder", "ctclip"):
        if section not in cfg:
            raise KeyError(f"model config {name!r} has no {section!r} section (architecture sections: ctvit, "
                           "text_encoder, ctclip)")
    v = cfg["ctvit"]
    if "input" in cfg:
        _, d, h, w = image_input_shape(cfg)
        if h != v["image_size"] or w != v["image_size"] or d % v["temporal_patch_size"]:
            raise ValueError(f"model config {name!r}: input (D, H, W) = {(d, h, w)} does not fit ctvit image_size "
                             f"{v['image_size']} / temporal_patch_size {v['temporal_patch_size']}")
    expected = (v["image_size"] // v["patch_size"]) ** 2 * v["dim"]
    if cfg["ctclip"]["dim_image"] != expected:
        raise ValueError(f"model config {name!r}: ctclip.dim_image is {cfg['ctclip']['dim_image']} but the CTViT "
                         f"gives (image_size/patch_size)^2 * dim = {expected}")


def ctvit_kwargs(cfg: Mapping[str, Any]) -> dict:
    """CTViT constructor kwargs of a model config: its ``ctvit`` section, with ``hu_band_edges`` (in HU) turned
    into ``band_edges`` in model-input units by the ``input`` section's ``hu_offset`` / ``hu_scale``."""
    kwargs = dict(cfg["ctvit"])
    edges = kwargs.pop("hu_band_edges", None)
    if edges is not None:
        inp = cfg.get("input", {})
        offset, scale = float(inp.get("hu_offset", 0.0)), float(inp.get("hu_scale", 1000.0))
        kwargs["band_edges"] = [(float(e) - offset) / scale for e in edges]  # as ToModelInput scales HU
    return kwargs


def create_model(name_or_path: str | os.PathLike | Mapping[str, Any], checkpoint: Optional[str] = None,
                 **overrides) -> CTCLIP:
    """Build a :class:`~custom_nets.CTCLIP` from an architecture config.

    Args:
        name_or_path: shipped config name (``"ctclip_v2"``, ``"ctclip_small"``, ``"ctclip_tiny"``), JSON path or dict.
        checkpoint: optional checkpoint file loaded with :func:`~custom_nets.load_checkpoint` (strict).
        **overrides: merged into the config, e.g. ``ctvit={"gradient_checkpointing": True}``,
            ``text_encoder={"pretrained": "/models/cxr-bert", "load_pretrained_weights": True}``.

    Returns:
        the model, with the merged config as ``model.config`` (the transforms read ``input``/``text`` from it).
    """
    cfg = merge_config(load_model_config(name_or_path), overrides)
    name = cfg.get("name", str(name_or_path))
    _check(cfg, name)
    image_encoder = CTViT(**ctvit_kwargs(cfg))
    text_encoder = build_text_encoder(cfg["text_encoder"])
    hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    if hidden is not None and hidden != cfg["ctclip"]["dim_text"]:
        raise ValueError(f"model config {name!r}: ctclip.dim_text is {cfg['ctclip']['dim_text']} but the text "
                         f"encoder's hidden size is {hidden}")
    ctclip_kwargs = dict(cfg["ctclip"])
    ctclip_kwargs.setdefault("text_pooling", cfg.get("text", {}).get("pooling", "cls"))
    model = CTCLIP(image_encoder, text_encoder, **ctclip_kwargs)
    model.config = cfg
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
