"""Multi-label classification losses for ClassFine and VocabFine.

All losses take ``(logits_or_probs, target)`` with shapes ``(B, C)`` and ``target`` in {0, 1}, the call
signature of a MONAI ``SupervisedTrainer`` loss.

* :class:`WeightedBCEWithLogitsLoss`: the CT-CLIP ClassFine loss, BCE with a per-class ``pos_weight``
  (given, or ``(N - P) / P`` from the training labels as :func:`pos_weight_from_labels` computes it);
* :class:`FocalLoss`: sigmoid focal loss (Lin et al., 2017) with ``alpha`` and ``gamma``;
* :class:`AsymmetricLoss`: ASL (Ridnik et al., 2021): separate focusing for positives and negatives and a
  probability margin that discards easy negatives;
* :class:`VocabFineLoss`: the CT-CLIP VocabFine objective, ``MSE(softmax([s_correct, s_wrong]), [1, 0])``
  per pathology, computed from the pairwise-softmax probability of "present".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "pos_weight_from_labels",
    "WeightedBCEWithLogitsLoss",
    "FocalLoss",
    "AsymmetricLoss",
    "VocabFineLoss",
    "build_classification_loss",
    "CTCLIP_LIPRO_POS_WEIGHT",
]

#: ``pos_weight`` of the published ClassFine training (docs/ctclip_reference.md#classfine), CT-RATE pathology order.
CTCLIP_LIPRO_POS_WEIGHT = (9.21, 2.38, 8.30, 32.86, 2.99, 6.06, 3.18, 4.19, 3.02, 1.22, 1.68, 3.15, 7.12, 18.17,
                           13.85, 6.34, 10.82, 13.41)

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_pair(pred: torch.Tensor, target: Optional[torch.Tensor], who: str) -> torch.Tensor:
    if target is None:
        raise ValueError(f"{who}: no target; the batches need a 'label' entry (an 18-int vector per volume)")
    target = torch.as_tensor(target, device=pred.device).to(pred.dtype)
    if target.shape != pred.shape:
        raise ValueError(f"{who}: prediction shape {tuple(pred.shape)} and target shape {tuple(target.shape)} differ")
    return target


def pos_weight_from_labels(labels: Any, max_weight: Optional[float] = None, min_positives: int = 1) -> list[float]:
    """Per-class ``pos_weight = N_negative / N_positive`` from training labels (the reference's definition).

    Args:
        labels: ``(N, C)`` 0/1 labels (array, tensor or list of per-volume lists).
        max_weight: optional upper clip (a class with 1 positive in 500 volumes otherwise gets 499).
        min_positives: classes with fewer positives get ``max_weight`` (or 1.0 when no clip is given) instead of
            a division by (almost) zero.

    Returns:
        ``C`` floats.

    Raises:
        ValueError: empty or not two-dimensional labels.
    """
    y = torch.as_tensor(labels, dtype=torch.float64)
    if y.ndim != 2 or y.shape[0] == 0:
        raise ValueError(f"pos_weight_from_labels needs (N, C) labels with N > 0, got shape {tuple(y.shape)}")
    pos = y.sum(0)
    neg = y.shape[0] - pos
    weight = neg / pos.clamp(min=1)
    fallback = float(max_weight) if max_weight is not None else 1.0
    weight = torch.where(pos < min_positives, torch.full_like(weight, fallback), weight)
    if max_weight is not None:
        weight = weight.clamp(max=float(max_weight))
    return [float(w) for w in weight]


class WeightedBCEWithLogitsLoss(nn.Module):
    """BCE with logits and a per-class ``pos_weight`` (CT-CLIP ClassFine).

    Args:
        pos_weight: ``C`` weights of the positive term, or None (plain BCE). Use :func:`pos_weight_from_labels`
            for the training prevalence or :data:`CTCLIP_LIPRO_POS_WEIGHT` for the published values.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, pos_weight: Optional[Sequence[float]] = None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32).reshape(-1)
        if pw is not None and (pw <= 0).any():
            raise ValueError(f"pos_weight must be positive, got {pw.tolist()}")
        self.register_buffer("pos_weight", pw, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _check_pair(logits, target, type(self).__name__)
        pw = self.pos_weight
        if pw is not None and pw.numel() != logits.shape[-1]:
            raise ValueError(f"{type(self).__name__}: {pw.numel()} pos_weight values for {logits.shape[-1]} classes")
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=None if pw is None else pw.to(logits),
                                                  reduction=self.reduction)


class FocalLoss(nn.Module):
    """Sigmoid focal loss for multi-label logits: ``-alpha_t (1 - p_t)^gamma log(p_t)``.

    Args:
        alpha: weight of the positive term (negatives get ``1 - alpha``); None weighs both equally.
            A sequence gives one alpha per class.
        gamma: focusing exponent (0 gives (alpha-weighted) BCE).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, alpha: Optional[float | Sequence[float]] = 0.25, gamma: float = 2.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        a = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if a is not None and ((a < 0) | (a > 1)).any():
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.register_buffer("alpha", a, persistent=False)
        self.gamma = float(gamma)
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _check_pair(logits, target, type(self).__name__)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        loss = ce * (1 - p_t).pow(self.gamma) if self.gamma else ce
        if self.alpha is not None:
            a = self.alpha.to(logits)
            loss = (a * target + (1 - a) * (1 - target)) * loss
        return _reduce(loss, self.reduction)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL) for multi-label logits.

    ``L+ = (1 - p)^gamma_pos log(p)``, ``L- = p_m^gamma_neg log(1 - p_m)`` with the shifted probability
    ``p_m = max(p - clip, 0)``: easy negatives (``p < clip``) contribute nothing, hard ones are focused.

    Args:
        gamma_pos: focusing exponent of positives.
        gamma_neg: focusing exponent of negatives.
        clip: probability margin for negatives (0 disables it).
        eps: floor inside the logarithms.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8,
                 reduction: str = "mean") -> None:
        super().__init__()
        if gamma_pos < 0 or gamma_neg < 0 or not 0 <= clip < 1:
            raise ValueError(f"AsymmetricLoss needs gamma_pos, gamma_neg >= 0 and 0 <= clip < 1; got {gamma_pos}, "
                             f"{gamma_neg}, {clip}")
        self.gamma_pos, self.gamma_neg, self.clip, self.eps = float(gamma_pos), float(gamma_neg), float(clip), eps
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _check_pair(logits, target, type(self).__name__)
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = target * torch.log(p.clamp(min=self.eps))
        loss_neg = (1 - target) * torch.log((1 - p_neg).clamp(min=self.eps))
        if self.gamma_pos:
            loss_pos = loss_pos * (1 - p).pow(self.gamma_pos)
        if self.gamma_neg:
            loss_neg = loss_neg * p_neg.pow(self.gamma_neg)
        return _reduce(-(loss_pos + loss_neg), self.reduction)


class VocabFineLoss(nn.Module):
    """CT-CLIP VocabFine loss from the pairwise-softmax probability of "present".

    For each pathology the reference builds the prompt pair ``[correct statement, wrong statement]`` from the
    label and takes ``MSE(softmax([s_correct, s_wrong]), [1, 0])``. With ``p = softmax([s_present,
    s_absent])[0]`` (what :class:`~custom_nets.ZeroShotClassifier` returns) the pair is ``[p, 1 - p]`` for a
    positive label and ``[1 - p, p]`` for a negative one; this module builds exactly that pair.

    Args:
        reduction: ``"mean"`` (over batch, classes and the pair, as ``nn.MSELoss``), ``"sum"`` or ``"none"``
            (``(B, C)``: the per-pathology MSE).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, prob_present: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _check_pair(prob_present, target, type(self).__name__)
        if prob_present.detach().min() < 0 or prob_present.detach().max() > 1:
            raise ValueError("VocabFineLoss expects probabilities in [0, 1] (the pairwise softmax), got logits?")
        positive = target > 0.5
        correct = torch.where(positive, prob_present, 1 - prob_present)
        pair = torch.stack([correct, 1 - correct], dim=-1)
        wanted = torch.stack([torch.ones_like(correct), torch.zeros_like(correct)], dim=-1)
        per_class = F.mse_loss(pair, wanted, reduction="none").mean(-1)
        return _reduce(per_class, self.reduction)


def build_classification_loss(name: str = "bce", pos_weight: Any = None, focal_alpha: Optional[float] = 0.25,
                              focal_gamma: float = 2.0, asl_gamma_pos: float = 0.0, asl_gamma_neg: float = 4.0,
                              asl_clip: float = 0.05, train_labels: Any = None,
                              max_pos_weight: Optional[float] = None) -> nn.Module:
    """One entry point for bundle configs: pick a ClassFine loss by name.

    Args:
        name: ``"bce"`` (weighted BCE), ``"focal"``, ``"asl"`` (asymmetric) or ``"vocabfine"``.
        pos_weight: for ``"bce"``: ``"prevalence"`` (from ``train_labels``), ``"ctclip"`` (the published values),
            a sequence of ``C`` floats, or None (unweighted).
        focal_alpha, focal_gamma: :class:`FocalLoss` parameters.
        asl_gamma_pos, asl_gamma_neg, asl_clip: :class:`AsymmetricLoss` parameters.
        train_labels: ``(N, C)`` training labels for ``pos_weight="prevalence"``.
        max_pos_weight: clip of the prevalence-derived weights.

    Returns:
        The loss module.
    """
    key = str(name).lower()
    if key in ("bce", "weighted_bce", "wbce"):
        if isinstance(pos_weight, str):
            if pos_weight == "prevalence":
                if train_labels is None:
                    raise ValueError("pos_weight='prevalence' needs train_labels")
                pos_weight = pos_weight_from_labels(train_labels, max_weight=max_pos_weight)
            elif pos_weight == "ctclip":
                pos_weight = list(CTCLIP_LIPRO_POS_WEIGHT)
            else:
                raise ValueError(f"pos_weight must be 'prevalence', 'ctclip', a list or None; got {pos_weight!r}")
        return WeightedBCEWithLogitsLoss(pos_weight)
    if key == "focal":
        return FocalLoss(focal_alpha, focal_gamma)
    if key in ("asl", "asymmetric"):
        return AsymmetricLoss(asl_gamma_pos, asl_gamma_neg, asl_clip)
    if key == "vocabfine":
        return VocabFineLoss()
    raise ValueError(f"unknown classification loss {name!r}; choose bce, focal, asl or vocabfine")
