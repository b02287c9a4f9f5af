"""ClassFine as trained by the ClassFine bundle: a frozen-backbone latent cache, progressive unfreezing of the
image side, and a VQ codebook kept fixed while the encoder trains.

- :class:`ClassFineNetwork`: :class:`~custom_nets.ClassFineClassifier` (same ``trained_model.*`` + ``classifier.*``
  keys) that caches the frozen backbone's per-volume output. With a frozen image encoder and no augmentation the
  image latents of a volume never change, so after the first epoch an epoch costs one small linear layer per
  volume instead of a CTViT pass.
- :func:`freeze_vq_codebook`: keeps the VQ codebook fixed while the encoder trains (the reference lets the EMA
  codebook drift during fine-tuning).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .classifiers import ClassFineClassifier
from .ctvit import CosineSimCodebook, param_versions

__all__ = ["ClassFineNetwork", "freeze_vq_codebook", "backbone_state", "UNFREEZE_PARTS"]

#: what :meth:`ClassFineNetwork.unfreeze` can make trainable
UNFREEZE_PARTS = ("projection", "image_encoder")


def _requires_grad(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class ClassFineNetwork(ClassFineClassifier):
    """ClassFine with an optional per-volume cache of the frozen backbone's output.

    What is cached depends on what is frozen: the l2-normalised image latent when the whole image side
    (CTViT and ``to_visual_latent``) is frozen, the pooled CTViT embedding when only the CTViT is frozen
    (``ProgressiveUnfreezing(parts="projection")``); nothing once the CTViT trains. Entries are keyed by
    volume name and dropped as soon as a cached module's weights change (loaded or stepped), so a stale
    latent is never used. The cache lives on the model's device; memory per volume is ``dim_latent`` floats
    (or ``dim_image`` for the embedding: 1.2 MB at CT-CLIP v2 size).

    Args:
        clip_model: the CTCLIP backbone (``trained_model``).
        num_classes: number of labels.
        dropout: dropout before the linear head.
        freeze_backbone: start frozen (no gradients, eval mode, no codebook update).
        cache_latents: enable the cache (only used when ``forward`` gets the volume ``names``; turn it off when
            the training transforms are random).
        freeze_codebook: keep the VQ codebook fixed even when the encoder trains (see :func:`freeze_vq_codebook`).
        head_input: ``"latent"`` (the reference) or ``"embedding"`` (see :class:`ClassFineClassifier`; the cache then
            holds the embedding whenever the CTViT is frozen).
    """

    def __init__(self, clip_model: nn.Module, num_classes: int = 18, dropout: float = 0.3,
                 freeze_backbone: bool = True, cache_latents: bool = True, freeze_codebook: bool = True,
                 head_input: str = "latent") -> None:
        super().__init__(clip_model, num_classes=num_classes, dropout=dropout, freeze_backbone=freeze_backbone,
                         head_input=head_input)
        self.cache_latents = bool(cache_latents)
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_key: Optional[tuple] = None
        if freeze_codebook:
            freeze_vq_codebook(self)

    # -- cache --------------------------------------------------------------------------------------
    def _cache_stage(self) -> Optional[str]:
        """``"latent"``, ``"embedding"`` or None: the deepest frozen output of the image side."""
        clip = self.trained_model
        if _requires_grad(clip.visual_transformer):
            return None
        return "embedding" if self.head_input == "embedding" or _requires_grad(clip.to_visual_latent) else "latent"

    def clear_cache(self) -> None:
        """Forget every cached latent."""
        self._cache, self._cache_key = {}, None

    @property
    def cache_size(self) -> int:
        """Number of cached volumes."""
        return len(self._cache)

    def _current_key(self, stage: str, device) -> tuple:
        clip = self.trained_model
        frozen = [clip.visual_transformer] + ([clip.to_visual_latent] if stage == "latent" else [])
        return (stage, str(device)) + tuple(param_versions(m) for m in frozen)

    def is_cached(self, name: str) -> bool:
        """Whether ``forward`` can serve volume ``name`` without its image (used by :class:`LatentCacheDataset`)."""
        if not self.cache_latents or name not in self._cache:
            return False
        stage = self._cache_stage()
        return stage is not None and self._cache_key == self._current_key(stage, self.classifier.weight.device)

    def cache_state(self) -> tuple:
        """A token that changes whenever the set of cached volumes may have changed."""
        return (id(self._cache), len(self._cache), self._cache_key)

    def _cached(self, image: torch.Tensor, names: Sequence[str], stage: str) -> torch.Tensor:
        key = self._current_key(stage, image.device)
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        missing = [i for i, n in enumerate(names) if n not in self._cache]
        if missing and image.numel() == 0:
            raise RuntimeError(f"ClassFineNetwork: the batch came without images (LatentCacheDataset placeholders) "
                               f"but the latents of {[names[i] for i in missing][:5]} are not cached (the backbone "
                               "weights changed since they were cached?)")
        if missing:
            clip = self.trained_model
            idx = torch.as_tensor(missing, device=image.device)
            with torch.no_grad():
                sub = image.index_select(0, idx)
                out = clip.encode_image(sub) if stage == "latent" else clip.image_embedding(sub)
            for j, i in enumerate(missing):
                self._cache[names[i]] = out[j].detach()
        return torch.stack([self._cache[n] for n in names])

    def head_features(self, image: torch.Tensor, names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """What the head reads (:meth:`encode`: l2-normalised image latents or embeddings), from the cache where
        allowed.

        Args:
            image: ``(B, 1, D, H, W)`` model input.
            names: volume names (cache keys), one per image; None disables the cache for this call.
        """
        clip = self.trained_model
        stage = self._cache_stage()
        if names is not None and isinstance(names, str):
            names = [names]
        use_cache = self.cache_latents and stage is not None and names is not None and len(names) == image.shape[0]
        if use_cache:
            names = [str(n) for n in names]
            if len(set(names)) != len(names):
                use_cache = False  # duplicate names in one batch: the names are not volume identities
        if not use_cache:
            # everything the head reads is frozen: no graph
            if stage is not None and (stage == "latent" or self.freeze_backbone or self.head_input == "embedding"):
                with torch.no_grad():
                    return self.encode(image)
            if stage == "embedding":  # the latent head with only the projection training
                with torch.no_grad():
                    emb = clip.image_embedding(image)
                return F.normalize(clip.to_visual_latent(emb), dim=-1)
            return self.encode(image)
        out = self._cached(image, names, stage)
        if stage == "embedding" and self.head_input == "latent":
            return F.normalize(clip.to_visual_latent(out), dim=-1)
        return out

    def forward(self, image: torch.Tensor, names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Class logits ``(B, num_classes)``.

        Args:
            image: ``(B, 1, D, H, W)`` model input.
            names: optional volume names (from ``PrepareBatchExtraInput(extra_keys={"names": "name"})``) that
                enable the latent cache.
        """
        return self.head(self.head_features(image, names))

    # -- freezing -----------------------------------------------------------------------------------
    def unfreeze(self, parts: str = "image_encoder") -> list[nn.Parameter]:
        """Make the image side trainable (the text encoder, unused by ClassFine, stays frozen).

        Args:
            parts: ``"projection"`` (``to_visual_latent`` only) or ``"image_encoder"`` (CTViT and projection).

        Returns:
            The parameters that became trainable.
        """
        if parts not in UNFREEZE_PARTS:
            raise ValueError(f"parts must be one of {UNFREEZE_PARTS}, got {parts!r}")
        if parts == "projection" and self.head_input == "embedding":
            raise ValueError("unfreeze_parts 'projection': a head on the embedding (head_input 'embedding') does not "
                             "read the projection; unfreeze 'image_encoder' or use head_input 'latent'")
        clip = self.trained_model
        modules = [clip.to_visual_latent] + ([clip.visual_transformer] if parts == "image_encoder" else [])
        params = [p for m in modules for p in m.parameters() if not p.requires_grad]
        for m in modules:
            m.requires_grad_(True)
        self.freeze_backbone = False
        self.clear_cache()
        self.train(self.training)
        return params


def _codebook_eval(module: nn.Module, args: tuple) -> None:
    module.train(False)


def freeze_vq_codebook(module: nn.Module) -> nn.Module:
    """Keep every VQ codebook inside ``module`` fixed, also while its encoder trains.

    The codebook is put in eval mode right before each of its forwards (a forward pre-hook), so the EMA
    update never runs; the enclosing ``VectorQuantize`` still uses the straight-through estimator in train
    mode, so gradients reach the encoder. Without this, every training forward moves the codebook (decay 0.8).

    Args:
        module: a model containing :class:`~custom_nets.ctvit.CosineSimCodebook` modules.

    Returns:
        ``module`` (for config chaining).
    """
    for m in module.modules():
        if isinstance(m, CosineSimCodebook) and not getattr(m, "_codebook_frozen", False):
            m.register_forward_pre_hook(_codebook_eval)
            m._codebook_frozen = True
    return module


def backbone_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every backbone parameter and buffer (VQ codebook included), for bit-identity checks."""
    clip = network.trained_model if isinstance(network, ClassFineClassifier) else network
    return {k: v.detach().clone() for k, v in clip.state_dict().items()}
