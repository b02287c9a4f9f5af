"""Classification metrics against values computed by hand, and the bootstrap's statistical contract."""

import json
import math

import numpy as np
import pytest

from transforms import CTRATE_PATHOLOGIES
from workflows.metrics import (
    auroc,
    auroc_per_class,
    binary_decision_metrics,
    bootstrap_auroc,
    evaluate_classification,
    fit_thresholds_ctclip,
    fit_thresholds_youden,
    macro_auroc,
    roc_curve,
    threshold_protocol_metrics,
    _weighted_auroc,
)

# Six cases, one class. Positives score 0.9, 0.4, 0.4; negatives 0.4, 0.2, 0.6.
# Pairs (pos, neg): 0.9 beats all 3 -> 3; each 0.4 positive: tie 0.4 (1/2), beats 0.2 (1), loses to 0.6 (0)
# -> 1.5 each. U = 6 over 3 * 3 = 9 pairs: AUROC = 2/3.
Y1 = np.array([1, 1, 0, 0, 0, 1])
S1 = np.array([0.9, 0.4, 0.4, 0.2, 0.6, 0.4])


def test_auroc_with_ties_matches_hand_count():
    assert auroc(Y1, S1) == pytest.approx(6 / 9, abs=1e-12)
    # every score tied: exactly one half
    assert auroc(Y1, np.full(6, 0.3)) == pytest.approx(0.5)
    # perfect and reversed ranking
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0


def test_auroc_equals_pairwise_definition_on_random_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 7, 200) / 6.0  # few distinct values: many ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(y, s) == pytest.approx(pairwise, abs=1e-12)


def test_single_valued_class_is_nan_and_excluded_from_macro_with_note():
    y = np.stack([Y1, np.zeros(6, int), np.ones(6, int)], axis=1)
    s = np.stack([S1, S1, S1], axis=1)
    per = auroc_per_class(y, s)
    assert per[0] == pytest.approx(2 / 3) and np.isnan(per[1]) and np.isnan(per[2])
    macro, notes = macro_auroc(y, s, ["a", "b", "c"])
    assert macro == pytest.approx(2 / 3)
    assert len(notes) == 2 and notes[0].startswith("b:") and notes[1].startswith("c:")


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="must both be"):
        auroc_per_class(np.zeros((3, 2)), np.zeros((3, 3)))


def test_roc_curve_steps_through_tie_groups():
    fpr, tpr, thr = roc_curve(Y1, S1)
    # thresholds +inf, 0.9, 0.6, 0.4 (three cases tied), 0.2
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.6, 0.4, 0.2])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    # trapezoid area equals the Mann-Whitney AUROC
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(Y1, S1))


def test_support_weighted_f1_differs_from_binary_f1_as_by_hand():
    # decision score >= 0.5 -> [1, 0, 0, 0, 1, 0]: tp=1, fp=1, fn=2, tn=2
    m = binary_decision_metrics(Y1, S1 >= 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 2, 2)
    assert m["f1"] == pytest.approx(2 / 5)  # 2tp / (2tp + fp + fn)
    f1_negative = 4 / 7  # 2tn / (2tn + fn + fp)
    assert m["f1_weighted"] == pytest.approx((3 * 2 / 5 + 3 * f1_negative) / 6)  # = 0.48571...
    assert m["f1_weighted"] - m["f1"] == pytest.approx(0.0857142857, abs=1e-9)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1 / 3)
    assert m["specificity"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.5)
    assert m["positive_rate"] == pytest.approx(2 / 6)


def test_ctclip_threshold_rule_reproduces_reference_loop():
    # the reference: for t in linspace(0,1,100), pred = p > t, keep t when dist <= best (last minimum wins)
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (80, 3))
    s = np.clip(rng.random((80, 3)) * 0.7 + 0.3 * y, 0, 1)
    got = fit_thresholds_ctclip(y, s)
    for c in range(3):
        best, best_t = 1e9, 0.0
        for t in np.linspace(0, 1, 100):
            p = s[:, c] > t
            tpr = (p & (y[:, c] == 1)).sum() / (y[:, c] == 1).sum()
            fpr = (p & (y[:, c] == 0)).sum() / (y[:, c] == 0).sum()
            d = math.sqrt((1 - tpr) ** 2 + fpr**2)
            if d <= best:
                best, best_t = d, t
        assert got[c] == pytest.approx(best_t)


def test_youden_threshold_on_validation_by_hand():
    # J at decision s >= 0.9: 1/3 - 0; s >= 0.6: 1/3 - 1/3; s >= 0.4: 1 - 2/3; s >= 0.2: 0.
    # Best J = 1/3 at 0.9 and at 0.4 -> the higher threshold wins; midpoint between 0.9 and 0.6.
    thr = fit_thresholds_youden(Y1[:, None], S1[:, None])
    assert thr[0] == pytest.approx(0.75)
    y = np.array([0, 0, 1, 1])
    assert fit_thresholds_youden(y[:, None], np.array([[0.1], [0.3], [0.6], [0.8]]))[0] == pytest.approx(0.45)
    assert np.isnan(fit_thresholds_youden(np.zeros((4, 1)), np.random.rand(4, 1))[0])


def test_protocol_summary_hamming_and_positive_rate():
    y = np.stack([Y1, 1 - Y1], axis=1)
    s = np.stack([S1, 1 - S1], axis=1)
    res = threshold_protocol_metrics(y, s, [0.5, np.nan], ["a", "b"])
    assert res["per_class"]["a"]["f1"] == pytest.approx(0.4)
    assert res["notes"] and res["notes"][0].startswith("b:")
    assert res["hamming_accuracy"] == pytest.approx(0.5)  # only class a is used
    assert res["positive_rate"] == pytest.approx(2 / 6)
    assert res["macro"]["f1"] == pytest.approx(0.4)


def test_weighted_auroc_equals_auroc_of_explicit_resample():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50).astype(float)
    s = rng.integers(0, 10, 50) / 10.0
    idx = rng.integers(0, 50, (20, 50))
    counts = np.stack([np.bincount(i, minlength=50) for i in idx]).astype(float)
    fast = _weighted_auroc(y, s, counts)
    slow = [auroc(y[i], s[i]) if 0 < y[i].sum() < 50 else np.nan for i in idx]
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def _cohort(n=120, c=4, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(size=(n, c)) + 1.2 * y)))
    return y, s


def test_bootstrap_ci_non_degenerate_contains_point_and_reproducible():
    y, s = _cohort()
    a = bootstrap_auroc(y, s, n_bootstrap=300, seed=7)
    b = bootstrap_auroc(y, s, n_bootstrap=300, seed=7)
    c = bootstrap_auroc(y, s, n_bootstrap=300, seed=8)
    assert a == b
    assert a["macro"] != c["macro"]
    for block in [*a["per_class"].values(), a["macro"]]:
        assert block["ci_low"] < block["auroc"] < block["ci_high"]
        assert block["ci_high"] - block["ci_low"] > 0.02  # the reference's degenerate CI has width 0
        assert block["n_valid"] == 300
    # point estimates are the full-data AUROCs
    np.testing.assert_allclose([v["auroc"] for v in a["per_class"].values()], auroc_per_class(y, s))
    # a narrower level gives a narrower interval
    n90 = bootstrap_auroc(y, s, n_bootstrap=300, seed=7, ci=0.5)["macro"]
    assert n90["ci_high"] - n90["ci_low"] < a["macro"]["ci_high"] - a["macro"]["ci_low"]


def test_bootstrap_skips_resamples_where_a_rare_class_has_one_value():
    y, s = _cohort(n=40)
    y[:, 0] = 0
    y[3, 0] = 1  # a single positive: absent from about e^-1 of the resamples
    r = bootstrap_auroc(y, s, n_bootstrap=400, seed=0, class_names=list("abcd"))
    assert 200 < r["per_class"]["a"]["n_valid"] < 330
    assert r["per_class"]["b"]["n_valid"] == 400
    assert r["macro"]["n_valid"] == r["per_class"]["a"]["n_valid"]
    assert any("resamples skipped" in n for n in r["notes"])


def test_evaluate_classification_is_json_with_three_protocols():
    y, s = _cohort(n=90, c=18, seed=2)
    y[:, 5] = 0  # Hiatal hernia absent: AUROC undefined
    yv, sv = _cohort(n=60, c=18, seed=3)
    res = evaluate_classification(y, s, val_labels=yv, val_scores=sv, n_bootstrap=200, seed=0)
    text = json.dumps(res, allow_nan=False)  # NaN must have become null
    assert json.loads(text) == res
    assert res["class_names"] == list(CTRATE_PATHOLOGIES)
    assert res["auroc"]["per_class"]["Hiatal hernia"]["auroc"] is None
    assert res["auroc"]["excluded_classes"] == ["Hiatal hernia"]
    assert any(n.startswith("Hiatal hernia") for n in res["notes"])
    assert set(res["protocols"]) == {"val_youden", "ctclip_paper", "vlm3d"}
    assert res["protocols"]["ctclip_paper"]["optimistic"] is True
    assert "OPTIMISTIC" in res["protocols"]["ctclip_paper"]["description"]
    assert res["protocols"]["vlm3d"]["per_class"]["Cardiomegaly"]["threshold"] == 0.5
    # the paper protocol reports the support-weighted F1, the VLM3D one the binary F1
    pc = res["protocols"]["ctclip_paper"]["per_class"]["Cardiomegaly"]
    assert pc["f1"] == pc["f1_weighted"] != pc["f1_binary"]
    vc = res["protocols"]["vlm3d"]["per_class"]["Cardiomegaly"]
    assert vc["f1"] == vc["f1_binary"]
    expected_macro = np.nanmean(auroc_per_class(y, s))
    assert res["auroc"]["macro"] == pytest.approx(expected_macro)
    assert res["auroc"]["macro_ci_low"] < res["auroc"]["macro"] < res["auroc"]["macro_ci_high"]
    for p in res["protocols"].values():
        assert 0 <= p["hamming_accuracy"] <= 1 and 0 <= p["positive_rate"] <= 1


def test_evaluate_without_validation_notes_missing_protocol():
    y, s = _cohort(c=3)
    res = evaluate_classification(y, s, ["a", "b", "c"], n_bootstrap=0)
    assert "val_youden" not in res["protocols"]
    assert res["bootstrap"] is None and res["auroc"]["macro_ci_low"] is None
    assert any("val_youden" in n for n in res["notes"])
