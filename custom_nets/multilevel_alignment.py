"""Multi-level image-report alignment: region ↔ sentence, sentence ↔ patch, and the auxiliary segmentation loss.

Global alignment (volume ↔ report) is :class:`~custom_nets.losses.ContrastiveTerm`. The terms here read the
multi-level outputs of an encoder with anatomical masks (:class:`~custom_nets.ct_specialised.CTSpecialisedEncoder`:
``regions``, ``region_mask``, ``tokens``, ``patch_regions``, ``segmentation_logits``) and the report's sentences,
each encoded on its own (``(B, S, D)`` sentence latents, ``S`` rows per report with a validity mask: the
``sentence_mean`` layout of the text side). Which sentence mentions which region is
:func:`ctclip_contract.anatomy_lexicon.region_sentence_mask`.

Each term is a small module of tensors with documented shapes; the latents are l2-normalised by the caller (the
CLIP model's projections), ``logit_scale`` is its ``exp(temperature)``.

Synthetic and real reports repeat sentences word for word ("No pleural effusion was observed."): a repeated text is
not a negative of itself. In both contrastive terms every candidate whose text latent is the positive's (cosine
above ``same_text_threshold``) counts as a positive (multi-positive InfoNCE: ``-log`` of the softmax mass on the
positives).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["multi_positive_infonce", "region_texts", "sentence_contrast", "RegionSentenceLoss", "SentencePatchLoss",
           "PatchSegmentationLoss"]


def multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE over a square ``(M, M)`` logits matrix.

    Args:
        logits: ``(M, M)`` scaled similarities (rows: images, columns: texts); pair ``i`` on the diagonal.
        positives: ``(M, M)`` bool, True on the diagonal and wherever a column is as good as the row's own pair.

    Returns:
        the mean over rows and columns of ``logsumexp(all) - logsumexp(positives)``.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1] or positives.shape != logits.shape:
        raise ValueError(f"multi_positive_infonce expects square logits and a positives mask of the same shape, got "
                         f"{tuple(logits.shape)} and {tuple(positives.shape)}")
    positives = positives | torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    neg_inf = torch.finfo(logits.dtype).min

    def rows(x, p):
        return (torch.logsumexp(x, dim=1) - torch.logsumexp(x.masked_fill(~p, neg_inf), dim=1)).mean()

    return (rows(logits, positives) + rows(logits.t(), positives.t())) / 2


def _same_text(texts: torch.Tensor, threshold: float) -> torch.Tensor:
    return texts @ texts.t() >= threshold


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    # a zero that keeps the graph: a batch without a pair still runs backward through every caller alike
    return sum(t.sum() * 0.0 for t in tensors)


def region_texts(sentence_latents: torch.Tensor, sentence_mask: torch.Tensor, mentions: torch.Tensor) -> tuple:
    """Each region's text: the mean of the latents of its report's sentences that mention it, l2-normalised.

    Args:
        sentence_latents: ``(B, S, D)`` l2-normalised sentence latents.
        sentence_mask: ``(B, S)`` bool, True for real sentences (False: padding rows).
        mentions: ``(B, S, R)`` bool, sentence ``s`` mentions region ``r``.

    Returns:
        ``(texts (B, R, D), has_text (B, R) bool)``; a region without a sentence has a zero text.
    """
    weights = (mentions & sentence_mask.unsqueeze(-1)).to(sentence_latents.dtype)  # (B, S, R)
    summed = weights.transpose(1, 2) @ sentence_latents  # (B, R, D)
    has_text = weights.sum(1) > 0
    return F.normalize(summed, dim=-1), has_text


def sentence_contrast(summaries: torch.Tensor, sentence_latents: torch.Tensor, sentence_mask: torch.Tensor,
                      logit_scale, same_text_threshold: float = 0.9999) -> torch.Tensor:
    """Multi-positive InfoNCE of each real sentence's attended patch summary against the batch's real sentences
    (its own, and any identical one, positive): the loss of :class:`SentencePatchLoss` from its summaries.

    Args:
        summaries: ``(B, S, D)`` l2-normalised summaries (:meth:`SentencePatchLoss.attend`).
        sentence_latents: ``(B, S, D)`` l2-normalised sentence latents.
        sentence_mask: ``(B, S)`` bool, real sentences.
        logit_scale: scalar, ``exp(temperature)``.
        same_text_threshold: cosine at or above which two sentences count as the same text.

    Returns:
        scalar loss (zero, with the graph kept, when fewer than two real sentences).
    """
    valid = sentence_mask.bool()
    if int(valid.sum()) < 2:
        return _zero(summaries, sentence_latents)
    texts = sentence_latents[valid]
    logits = summaries[valid] @ texts.t() * logit_scale
    return multi_positive_infonce(logits, _same_text(texts.detach(), same_text_threshold))


class RegionSentenceLoss(nn.Module):
    """Region-level alignment: each region embedding of a volume against the sentences of its report that mention
    that region (their mean latent), contrasted over every (volume, region) pair of the batch that has both a
    region in the mask and a sentence: the negatives are the other regions of the same volume and the regions of
    the other volumes. A region absent from the mask or without a sentence is left out of the loss.

    Args:
        same_text_threshold: cosine at or above which two region texts count as the same text (both positives).
    """

    def __init__(self, same_text_threshold: float = 0.9999):
        super().__init__()
        self.same_text_threshold = same_text_threshold

    def forward(self, region_latents: torch.Tensor, region_mask: torch.Tensor, sentence_latents: torch.Tensor,
                sentence_mask: torch.Tensor, mentions: torch.Tensor, logit_scale) -> torch.Tensor:
        """
        Args:
            region_latents: ``(B, R, D)`` l2-normalised region latents (the encoder's ``regions``, projected).
            region_mask: ``(B, R)`` bool, the region is in the volume's mask (the encoder's ``region_mask``).
            sentence_latents: ``(B, S, D)`` l2-normalised sentence latents.
            sentence_mask: ``(B, S)`` bool, real sentences.
            mentions: ``(B, S, R)`` bool, sentence ``s`` of report ``b`` mentions region ``r``.
            logit_scale: scalar, ``exp(temperature)``.

        Returns:
            scalar loss (zero, with the graph kept, when fewer than two pairs are left).
        """
        b, r, _ = region_latents.shape
        if region_mask.shape != (b, r) or mentions.shape != (b, sentence_latents.shape[1], r):
            raise ValueError(f"RegionSentenceLoss: regions {tuple(region_latents.shape)}, region_mask "
                             f"{tuple(region_mask.shape)}, sentences {tuple(sentence_latents.shape)} and mentions "
                             f"{tuple(mentions.shape)} do not fit (B, R, D), (B, R), (B, S, D), (B, S, R)")
        texts, has_text = region_texts(sentence_latents, sentence_mask.bool(), mentions.bool())
        valid = region_mask.bool() & has_text
        if int(valid.sum()) < 2:
            return _zero(region_latents, sentence_latents)
        images, texts = region_latents[valid], texts[valid]  # (M, D)
        logits = images @ texts.t() * logit_scale
        return multi_positive_infonce(logits, _same_text(texts.detach(), self.same_text_threshold))


class SentencePatchLoss(nn.Module):
    """Sentence-level alignment through attention pooling: each sentence's latent gives a query that attends over
    its volume's patch tokens; the attended summary is contrasted with the sentence latents of the batch (its own
    sentence, and any identical one, are the positives).

    Args:
        token_dim: width of the patch tokens.
        dim_latent: width of the sentence latents (and of the summaries).
        same_text_threshold: cosine at or above which two sentences count as the same text.
    """

    def __init__(self, token_dim: int, dim_latent: int, same_text_threshold: float = 0.9999):
        super().__init__()
        self.same_text_threshold = same_text_threshold
        self.to_query = nn.Linear(dim_latent, dim_latent)
        self.to_key = nn.Linear(token_dim, dim_latent)
        self.to_value = nn.Linear(token_dim, dim_latent)
        self.scale = dim_latent ** -0.5

    def attend(self, patch_tokens: torch.Tensor, sentence_latents: torch.Tensor) -> tuple:
        """Each sentence's attention over its volume's patches.

        Args:
            patch_tokens: ``(B, N, token_dim)``.
            sentence_latents: ``(B, S, dim_latent)``.

        Returns:
            ``(summaries (B, S, dim_latent) l2-normalised, weights (B, S, N))``: the weights say where in the volume
            each sentence looked (localisation).
        """
        q = self.to_query(sentence_latents)
        k, v = self.to_key(patch_tokens), self.to_value(patch_tokens)
        weights = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)  # (B, S, N)
        return F.normalize(weights @ v, dim=-1), weights

    def forward(self, patch_tokens: torch.Tensor, sentence_latents: torch.Tensor, sentence_mask: torch.Tensor,
                logit_scale) -> torch.Tensor:
        """
        Args:
            patch_tokens: ``(B, N, token_dim)`` the encoder's tokens.
            sentence_latents: ``(B, S, dim_latent)`` l2-normalised sentence latents.
            sentence_mask: ``(B, S)`` bool, real sentences.
            logit_scale: scalar, ``exp(temperature)``.

        Returns:
            scalar loss over the batch's real sentences (zero, with the graph kept, when fewer than two).
        """
        if patch_tokens.shape[0] != sentence_latents.shape[0] or sentence_mask.shape != sentence_latents.shape[:2]:
            raise ValueError(f"SentencePatchLoss: tokens {tuple(patch_tokens.shape)}, sentences "
                             f"{tuple(sentence_latents.shape)} and sentence_mask {tuple(sentence_mask.shape)} do not "
                             "fit (B, N, C), (B, S, D), (B, S)")
        summaries, _ = self.attend(patch_tokens, sentence_latents)
        return self.contrast(summaries, sentence_latents, sentence_mask, logit_scale)

    def contrast(self, summaries: torch.Tensor, sentence_latents: torch.Tensor, sentence_mask: torch.Tensor,
                 logit_scale) -> torch.Tensor:
        """The loss from the summaries of :meth:`attend` (the pretraining network attends, the loss contrasts).

        Args:
            summaries: ``(B, S, dim_latent)`` l2-normalised attended summaries.
            sentence_latents: ``(B, S, dim_latent)`` l2-normalised sentence latents.
            sentence_mask: ``(B, S)`` bool, real sentences.
            logit_scale: scalar, ``exp(temperature)``.
        """
        return sentence_contrast(summaries, sentence_latents, sentence_mask, logit_scale, self.same_text_threshold)


class PatchSegmentationLoss(nn.Module):
    """The auxiliary segmentation loss: cross-entropy of each patch's predicted region against its region in the
    mask.

    Args:
        target: ``"majority"``: the region id holding most of the patch's voxels (ties: the lower id); ``"soft"``:
            the overlap fractions themselves (soft cross-entropy).
    """

    TARGETS = ("majority", "soft")

    def __init__(self, target: str = "majority"):
        super().__init__()
        if target not in self.TARGETS:
            raise ValueError(f"PatchSegmentationLoss target must be one of {self.TARGETS}, got {target!r}")
        self.target = target

    def forward(self, segmentation_logits: torch.Tensor, patch_regions: torch.Tensor,
                volume_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            segmentation_logits: ``(B, N, R + 1)`` the encoder's ``segmentation_logits``.
            patch_regions: ``(B, N, R + 1)`` the encoder's ``patch_regions`` (fractions per region id).
            volume_mask: optional ``(B,)`` bool: volumes that have a mask (the others are left out).

        Returns:
            scalar, the mean over the patches of the volumes kept.
        """
        if segmentation_logits.shape != patch_regions.shape:
            raise ValueError(f"PatchSegmentationLoss: logits {tuple(segmentation_logits.shape)} and patch regions "
                             f"{tuple(patch_regions.shape)} differ (both (B, N, R + 1))")
        if volume_mask is not None:
            if not bool(volume_mask.any()):
                return _zero(segmentation_logits)
            segmentation_logits, patch_regions = segmentation_logits[volume_mask], patch_regions[volume_mask]
        logits = segmentation_logits.reshape(-1, segmentation_logits.shape[-1]).float()
        fractions = patch_regions.reshape(-1, patch_regions.shape[-1]).float()
        if self.target == "soft":
            return -(fractions * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        return F.cross_entropy(logits, fractions.argmax(dim=-1))
