"""Image encoders as pluggable parts of a model config: the contract, and a registry of builders.

A model config names its image encoder in an ``image_encoder`` section whose ``type`` is a registered name (the
rest of the section is that encoder's settings)::

    "image_encoder": {"type": "slice_fusion", "backbone": {...}, "fusion": {...}}

A config with a ``ctvit`` section and no ``image_encoder`` section is a CTViT, as every config and published
checkpoint before the registry (:meth:`ctclip_contract.ModelConfig.image_encoder`).

The contract between an encoder and :class:`~custom_nets.CTCLIP` is small:

* **input**: ``(B, 1, D, H, W)`` in the layout and value range of the config's ``input`` section
  (:class:`ctclip_contract.InputContract`);
* ``encode_volume(image) -> ImageEncoding``: a global ``embedding`` ``(B, embedding_dim)`` (what
  ``to_visual_latent`` projects) and, optionally, ``tokens`` ``(B, N, token_dim)`` with their ``positions``
  ``(N, 3)``: token centres in voxels of the model input, ``(d, h, w)`` order (multiply by the input spacing for
  mm). Region pooling, local alignment and token-level similarity read the tokens;
* attributes ``embedding_dim`` and ``token_dim`` (None without tokens);
* optional ``set_gradient_checkpointing(enabled)``;
* optional anatomical masks: an encoder with ``uses_segmentation = True`` takes
  ``encode_volume(image, seg=None)``, ``seg`` a ``(B, 1, D, H, W)`` region-id map on the image's grid, and may fill
  the region fields of :class:`ImageEncoding` (:class:`~custom_nets.CTCLIP` ``image_encoding(image, seg)``
  refuses a mask for any other encoder);
* an encoder without trainable parameters stays in eval mode through ``train()`` (frozen means frozen).

Registering a new encoder is one decorated builder; the CLIP model, pretraining, zero-shot, ClassFine, retrieval,
the bundle export and the MONAI Label app need nothing else::

    @register_image_encoder("my_encoder")
    def build_my_encoder(settings: dict, config: ModelConfig) -> nn.Module: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ctclip_contract import ModelConfig, ModelConfigError

__all__ = ["ImageEncoding", "IMAGE_ENCODERS", "register_image_encoder", "build_image_encoder", "grid_positions",
           "reads_segmentation"]


@dataclass
class ImageEncoding:
    """What an image encoder gives for a batch of volumes.

    Attributes:
        embedding: global embedding ``(B, embedding_dim)``, before the latent projection.
        tokens: optional ``(B, N, token_dim)`` tokens.
        positions: ``(N, 3)`` token centres in model-input voxels, ``(d, h, w)``; given with ``tokens``.
        regions: optional per-region embeddings ``(B, R, token_dim)`` of an encoder that reads an anatomical
            mask; row ``r`` is region id ``r + 1`` (id 0, the background, has none).
        region_mask: ``(B, R)`` bool, given with ``regions``: True where the volume's mask holds the region
            (an absent region's row is only its learned id embedding and carries nothing of the image).
        patch_regions: optional ``(B, N, R + 1)`` soft assignment of each token's patch to the region ids
            ``0..R`` (the fraction of its voxels with each id; rows sum to 1).
        segmentation_logits: optional ``(B, N, R + 1)`` logits of an auxiliary head predicting each token's
            region id (target: :attr:`patch_regions`).
    """

    embedding: torch.Tensor
    tokens: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    regions: Optional[torch.Tensor] = None
    region_mask: Optional[torch.Tensor] = None
    patch_regions: Optional[torch.Tensor] = None
    segmentation_logits: Optional[torch.Tensor] = None

    def float(self) -> "ImageEncoding":
        """The same encoding in float32 (encoders may run under autocast); masks and positions unchanged."""
        def f(t):
            return None if t is None else t.float()

        return ImageEncoding(f(self.embedding), f(self.tokens), self.positions, f(self.regions), self.region_mask,
                             f(self.patch_regions), f(self.segmentation_logits))


#: name -> builder(settings, config) -> nn.Module
IMAGE_ENCODERS: dict[str, Callable[[dict, ModelConfig], nn.Module]] = {}


def register_image_encoder(name: str):
    """Decorator registering ``builder(settings: dict, config: ModelConfig) -> nn.Module`` under ``name``."""

    def register(builder):
        if name in IMAGE_ENCODERS and IMAGE_ENCODERS[name] is not builder:
            raise ValueError(f"image encoder type {name!r} is already registered")
        IMAGE_ENCODERS[name] = builder
        return builder

    return register


def build_image_encoder(config: ModelConfig) -> nn.Module:
    """The image encoder a model config names (its ``image_encoder`` type and settings).

    Raises:
        ModelConfigError: naming the config file and the registered types when the type is unknown.
    """
    kind, settings = config.image_encoder
    if kind not in IMAGE_ENCODERS:
        raise ModelConfigError(f"model config {config.source}: image_encoder.type {kind!r} is not registered; "
                               f"registered: {sorted(IMAGE_ENCODERS)}")
    return IMAGE_ENCODERS[kind](settings, config)


def grid_positions(shape: tuple[int, int, int], step: tuple[float, float, float],
                   device=None) -> torch.Tensor:
    """Centres ``(n_d * n_h * n_w, 3)`` of a regular token grid in model-input voxels, ``(d, h, w)`` order, in the
    order of a row-major flatten of ``(n_d, n_h, n_w)``; ``step`` is the voxels per token along each axis."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) * s for n, s in zip(shape, step)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def reads_segmentation(module: nn.Module) -> bool:
    """Whether a model (a CTCLIP, a network holding one, or an encoder) has an image encoder that reads anatomical
    masks: ``uses_segmentation`` and, where it says, ``num_regions > 0``. The bundles load the ``seg`` mask, and
    hand it to ``image_encoding(image, seg=...)``, only then: an encoder that reads none costs no extra reads."""
    return any(getattr(m, "uses_segmentation", False) and getattr(m, "num_regions", 1) > 0 for m in module.modules())
