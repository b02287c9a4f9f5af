"""Contrastive losses for CT-CLIP training, called by MONAI engines as ``loss(pred, target)``.

``pred`` is what :meth:`custom_nets.CTCLIP.forward` returns: the ``(B_image, B_text)`` similarity logits
already scaled by ``exp(temperature)``, with matching pairs on the diagonal. ``target`` is ignored.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["clip_loss", "ClipLoss"]


def _decoupled_ce(logits: torch.Tensor) -> torch.Tensor:
    # decoupled contrastive learning (Yeh et al. 2022): the positive is left out of the denominator
    pos = logits.diagonal()
    eye = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    neg = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
    return (neg - pos).mean()


def clip_loss(logits: torch.Tensor, decoupled: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE over a square logits matrix (pairs on the diagonal).

    Args:
        logits: ``(B, B)`` scaled similarities (rows: images, columns: texts), or ``(B, 2B)`` ``[main | extra]``
            from a model with ``extra_latent_projection`` (text-to-image from main, image-to-text from extra).
        decoupled: use the decoupled contrastive loss (positive removed from the denominator).
    """
    b = logits.shape[0]
    if logits.ndim != 2 or logits.shape[1] not in (b, 2 * b):
        raise ValueError(f"clip_loss expects (B, B) or (B, 2B) logits with pairs on the diagonal, got "
                         f"{tuple(logits.shape)}")
    main = logits[:, :b]
    image_to_text = logits[:, b:] if logits.shape[1] == 2 * b else main
    if decoupled:
        return (_decoupled_ce(image_to_text) + _decoupled_ce(main.t())) / 2
    labels = torch.arange(b, device=logits.device)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(main.t(), labels)) / 2


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) loss on the model's logits; ignores ``target``.

    Args:
        decoupled: decoupled contrastive loss (DCL): the positive pair is removed from each denominator,
            which removes the negative-positive coupling that hurts small batches (off by default).

    Note:
        Under DDP each rank sees its local ``(B, B)`` block only; global negatives need the latents gathered with
        gradient before the similarity is formed (``torch.distributed.nn.functional.all_gather``), which is not
        wired yet.
    """

    def __init__(self, decoupled: bool = False):
        super().__init__()
        self.decoupled = decoupled

    def forward(self, pred: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        return clip_loss(pred, decoupled=self.decoupled)
