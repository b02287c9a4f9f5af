"""``create_model``: build a CT-CLIP model from a model config (``ctclip_contract/configs/<name>.json``).

Architecture sections of a config:

* ``ctvit``: :class:`~custom_nets.ctvit.CTViT` kwargs (the reference's names, plus our execution options);
* ``text_encoder``: see :mod:`custom_nets.text_encoder`;
* ``ctclip``: :class:`~custom_nets.CTCLIP` kwargs (``dim_image``, ``dim_text``, ``dim_latent``, options).

The config's ``input`` section (the preprocessing contract, validated by :mod:`ctclip_contract`) is checked
against ``ctvit`` so that a config whose crop size does not fit the encoder fails at build time, naming the
numbers.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from ctclip_contract import ModelConfig, ModelConfigError, load_model_config

from .checkpoint import load_checkpoint
from .ctclip import CTCLIP
from .ctvit import CTViT
from .text_encoder import build_text_encoder

__all__ = ["create_model", "ctvit_kwargs"]


def _check(cfg: ModelConfig) -> None:
    for section in ("ctvit", "text_encoder", "ctclip"):
        if section not in cfg:
            raise ModelConfigError(f"model config {cfg.source}: missing section {section!r} (architecture sections: "
                                   "ctvit, text_encoder, ctclip)")
    v = cfg["ctvit"]
    _, d, h, w = cfg.input.model_input_shape
    if h != v["image_size"] or w != v["image_size"] or d % v["temporal_patch_size"]:
        raise ModelConfigError(f"model config {cfg.source}: input (D, H, W) = {(d, h, w)} does not fit ctvit "
                               f"image_size {v['image_size']} / temporal_patch_size {v['temporal_patch_size']}")
    expected = (v["image_size"] // v["patch_size"]) ** 2 * v["dim"]
    if cfg["ctclip"]["dim_image"] != expected:
        raise ModelConfigError(f"model config {cfg.source}: ctclip.dim_image is {cfg['ctclip']['dim_image']} but "
                               f"the CTViT gives (image_size/patch_size)^2 * dim = {expected}")


def ctvit_kwargs(cfg: ModelConfig) -> dict:
    """CTViT constructor kwargs of a model config: its ``ctvit`` section, with ``hu_band_edges`` (in HU) turned
    into ``band_edges`` in model-input units, as the input contract scales HU."""
    kwargs = dict(cfg["ctvit"])
    edges = kwargs.pop("hu_band_edges", None)
    if edges is not None:
        kwargs["band_edges"] = [cfg.input.hu_to_model(e) for e in edges]
    return kwargs


def create_model(name_or_path: str | os.PathLike | Mapping[str, Any], checkpoint: Optional[str] = None,
                 **overrides) -> CTCLIP:
    """Build a :class:`~custom_nets.CTCLIP` from a model config.

    Args:
        name_or_path: shipped config name (``"ctclip_v2"``, ``"ctclip_small"``, ``"ctclip_tiny"``), JSON path, dict
            or :class:`~ctclip_contract.ModelConfig`.
        checkpoint: optional checkpoint file loaded with :func:`~custom_nets.load_checkpoint` (strict).
        **overrides: merged into the config, e.g. ``ctvit={"gradient_checkpointing": True}``,
            ``text_encoder={"pretrained": "/models/cxr-bert", "load_pretrained_weights": True}``.

    Returns:
        the model, with the merged :class:`~ctclip_contract.ModelConfig` as ``model.config``.
    """
    cfg = load_model_config(name_or_path, overrides)
    _check(cfg)
    image_encoder = CTViT(**ctvit_kwargs(cfg))
    text_encoder = build_text_encoder(cfg["text_encoder"])
    hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    if hidden is not None and hidden != cfg["ctclip"]["dim_text"]:
        raise ModelConfigError(f"model config {cfg.source}: ctclip.dim_text is {cfg['ctclip']['dim_text']} but the "
                               f"text encoder's hidden size is {hidden}")
    ctclip_kwargs = dict(cfg["ctclip"])
    ctclip_kwargs.setdefault("text_pooling", cfg.text.pooling)
    model = CTCLIP(image_encoder, text_encoder, **ctclip_kwargs)
    model.config = cfg
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
