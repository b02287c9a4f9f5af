"""``create_model``: build a CT-CLIP model from a model config (``ctclip_contract/configs/<name>.json``).

Architecture sections of a config:

* ``image_encoder``: ``{"type": <registered name>, ...settings}`` (:mod:`custom_nets.image_encoders`), or its older
  form, a ``ctvit`` section: :class:`~custom_nets.ctvit.CTViT` kwargs (the reference's names, plus our execution
  options);
* ``text_encoder``: see :mod:`custom_nets.text_encoder`;
* ``ctclip``: :class:`~custom_nets.CTCLIP` kwargs (``dim_latent``, ``dim_text``, options; ``dim_image`` may be left
  out, it is the image encoder's ``embedding_dim``).

The config's ``input`` section (the preprocessing contract, validated by :mod:`ctclip_contract`) is checked
against the image encoder so that a config whose crop size does not fit the encoder fails at build time, naming
the numbers.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from ctclip_contract import ModelConfig, ModelConfigError, load_model_config

from .checkpoint import load_checkpoint
from .ctclip import CTCLIP
from .ctvit import CTViT
from .image_encoders import build_image_encoder, register_image_encoder
from .text_encoder import build_text_encoder

__all__ = ["create_model", "ctvit_kwargs"]


@register_image_encoder("ctvit")
def build_ctvit(settings: dict, cfg: ModelConfig) -> CTViT:
    """The published encoder: a :class:`~custom_nets.ctvit.CTViT` from its settings, checked against the input
    contract, with ``hu_band_edges`` (in HU) turned into ``band_edges`` in model-input units."""
    _, d, h, w = cfg.input.model_input_shape
    if h != settings["image_size"] or w != settings["image_size"] or d % settings["temporal_patch_size"]:
        raise ModelConfigError(f"model config {cfg.source}: input (D, H, W) = {(d, h, w)} does not fit ctvit "
                               f"image_size {settings['image_size']} / temporal_patch_size "
                               f"{settings['temporal_patch_size']}")
    return CTViT(**ctvit_kwargs(settings, cfg))


def ctvit_kwargs(settings: Mapping[str, Any], cfg: ModelConfig) -> dict:
    """CTViT constructor kwargs from its settings: ``hu_band_edges`` (in HU) become ``band_edges`` in model-input
    units, as the config's input contract scales HU."""
    kwargs = dict(settings)
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
        **overrides: merged into the config, e.g. ``ctvit={"gradient_checkpointing": True}`` (a CTViT config),
            ``text_encoder={"pretrained": "/models/cxr-bert", "load_pretrained_weights": True}``.

    Returns:
        the model, with the merged :class:`~ctclip_contract.ModelConfig` as ``model.config``.
    """
    cfg = load_model_config(name_or_path, overrides)
    for section in ("text_encoder", "ctclip"):
        if section not in cfg:
            raise ModelConfigError(f"model config {cfg.source}: missing section {section!r} (architecture sections: "
                                   "image_encoder (or ctvit), text_encoder, ctclip)")
    image_encoder = build_image_encoder(cfg)
    ctclip_kwargs = dict(cfg["ctclip"])
    dim_image = ctclip_kwargs.setdefault("dim_image", image_encoder.embedding_dim)
    if dim_image != image_encoder.embedding_dim:
        raise ModelConfigError(f"model config {cfg.source}: ctclip.dim_image is {dim_image} but the "
                               f"{cfg.image_encoder[0]} image encoder gives {image_encoder.embedding_dim}")
    text_encoder = build_text_encoder(cfg["text_encoder"])
    hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    if hidden is not None and hidden != cfg["ctclip"]["dim_text"]:
        raise ModelConfigError(f"model config {cfg.source}: ctclip.dim_text is {cfg['ctclip']['dim_text']} but the "
                               f"text encoder's hidden size is {hidden}")
    ctclip_kwargs.setdefault("text_pooling", cfg.text.pooling)
    model = CTCLIP(image_encoder, text_encoder, **ctclip_kwargs)
    model.config = cfg
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
