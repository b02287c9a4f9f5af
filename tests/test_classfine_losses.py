"""ClassFine/VocabFine losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from custom_nets.classification_losses import (
    CTCLIP_LIPRO_POS_WEIGHT,
    AsymmetricLoss,
    FocalLoss,
    VocabFineLoss,
    WeightedBCEWithLogitsLoss,
    build_classification_loss,
    pos_weight_from_labels,
)


def _bce(x: float, y: float, w: float = 1.0) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))


def test_pos_weight_from_prevalence():
    labels = [[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 1]]
    # class 0: 2 pos / 2 neg -> 1; class 1: no positive -> fallback; class 2: 3 pos / 1 neg -> 1/3
    assert pos_weight_from_labels(labels) == pytest.approx([1.0, 1.0, 1 / 3])
    assert pos_weight_from_labels(labels, max_weight=5.0) == pytest.approx([1.0, 5.0, 1 / 3])
    assert pos_weight_from_labels([[0], [0], [0], [1]], max_weight=2.0) == pytest.approx([2.0])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        pos_weight_from_labels([1, 0, 1])


def test_weighted_bce_matches_formula():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = WeightedBCEWithLogitsLoss(pos_weight=[3.0, 0.5])(logits, target)
    expected = (_bce(0.3, 1, 3.0) + _bce(-1.2, 0, 0.5) + _bce(2.0, 0, 3.0) + _bce(0.1, 1, 0.5)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="3 pos_weight values for 2 classes"):
        WeightedBCEWithLogitsLoss([1.0, 1.0, 1.0])(logits, target)
    with pytest.raises(ValueError, match="no target"):
        WeightedBCEWithLogitsLoss()(logits, None)


def test_focal_loss_hand_values():
    x, y = 0.7, 1.0
    p = 1 / (1 + math.exp(-x))
    expected = -0.25 * (1 - p) ** 2 * math.log(p)
    got = FocalLoss(alpha=0.25, gamma=2.0)(torch.tensor([[x]]), torch.tensor([[y]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # a negative: weight 1 - alpha and (p)^gamma
    expected_neg = -0.75 * p**2 * math.log(1 - p)
    got_neg = FocalLoss(alpha=0.25, gamma=2.0)(torch.tensor([[x]]), torch.tensor([[0.0]]))
    assert got_neg.item() == pytest.approx(expected_neg, rel=1e-6)
    # gamma 0 and no alpha is plain BCE
    logits, target = torch.randn(4, 18), (torch.rand(4, 18) > 0.7).float()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert FocalLoss(alpha=None, gamma=0.0)(logits, target).item() == pytest.approx(plain.item(), rel=1e-6)


def test_asymmetric_loss_hand_values():
    logits, target = torch.randn(4, 18), (torch.rand(4, 18) > 0.7).float()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    asl0 = AsymmetricLoss(gamma_pos=0.0, gamma_neg=0.0, clip=0.0)(logits, target)
    assert asl0.item() == pytest.approx(plain.item(), rel=1e-5)
    # an easy negative (p < clip) contributes nothing; a hard one is p_m^gamma_neg * -log(1 - p_m)
    easy = AsymmetricLoss(clip=0.05)(torch.tensor([[-5.0]]), torch.tensor([[0.0]]))
    assert easy.item() == 0.0
    x = 1.0
    pm = 1 / (1 + math.exp(-x)) - 0.05
    hard = AsymmetricLoss(gamma_neg=4.0, clip=0.05)(torch.tensor([[x]]), torch.tensor([[0.0]]))
    assert hard.item() == pytest.approx(-(pm**4) * math.log(1 - pm), rel=1e-5)


def test_vocabfine_loss_is_mse_on_the_prompt_pair():
    # reference: for each pathology, softmax([s_correct, s_wrong]) vs [1, 0]
    s_present = torch.tensor([[2.0, -1.0, 0.5]])
    s_absent = torch.tensor([[0.5, 1.0, 0.5]])
    label = torch.tensor([[1.0, 1.0, 0.0]])
    prob_present = torch.softmax(torch.stack([s_present, s_absent], -1), -1)[..., 0]
    expected = []
    for c in range(3):
        pair = [s_present[0, c], s_absent[0, c]] if label[0, c] else [s_absent[0, c], s_present[0, c]]
        sm = torch.softmax(torch.stack(pair), 0)
        expected.append(torch.nn.functional.mse_loss(sm, torch.tensor([1.0, 0.0])).item())
    got = VocabFineLoss(reduction="none")(prob_present, label)
    assert got[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert VocabFineLoss()(prob_present, label).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="probabilities"):
        VocabFineLoss()(torch.tensor([[3.0]]), torch.tensor([[1.0]]))


def test_loss_factory():
    labels = [[1, 0], [0, 0], [0, 1], [0, 1]]
    bce = build_classification_loss("bce", pos_weight="prevalence", train_labels=labels)
    assert bce.pos_weight.tolist() == pytest.approx([3.0, 1.0])
    assert build_classification_loss("bce", pos_weight="ctclip").pos_weight.tolist() == pytest.approx(
        list(CTCLIP_LIPRO_POS_WEIGHT))
    assert isinstance(build_classification_loss("focal", focal_gamma=1.0), FocalLoss)
    assert isinstance(build_classification_loss("asl"), AsymmetricLoss)
    assert isinstance(build_classification_loss("vocabfine"), VocabFineLoss)
    with pytest.raises(ValueError, match="unknown classification loss"):
        build_classification_loss("hinge")
    with pytest.raises(ValueError, match="train_labels"):
        build_classification_loss("bce", pos_weight="prevalence")
