"""Multi-label classification metrics for the 18 CT-RATE abnormalities (numpy only).

Three threshold protocols are reported side by side, because published CT-RATE numbers mix them
(docs/ctclip_reference.md#metrics-and-threshold-protocols):

- ``val_youden``: one threshold per class fitted on a *validation* split (Youden's J) and applied to
  the evaluated split. The honest protocol; needs validation predictions.
- ``ctclip_paper``: the CT-CLIP scripts' protocol. Thresholds are tuned on the evaluated set itself
  (ROC point closest to (0, 1) over ``linspace(0, 1, 100)``, decision ``score > t``); F1 is the
  support-weighted average over both classes, precision is for the positive class. Optimistic by
  construction and labelled so in every output.
- ``vlm3d``: the VLM3D challenge protocol: fixed threshold 0.5 (decision ``score >= 0.5``), binary
  F1 / precision / recall / accuracy per class, macro-averaged.

AUROC is threshold-free: the Mann-Whitney U statistic with average ranks (ties count one half),
with a real case-resampling bootstrap for confidence intervals.

Calibration (whether a probability of 0.3 means the finding is present in 30% of such scans) is the expected
calibration error of :func:`expected_calibration_error` (``ECE_DEFINITION``) with its bins from
:func:`reliability_bins`; the calibration maps themselves are fitted in :mod:`workflows.calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctclip_contract import CTRATE_PATHOLOGIES

__all__ = [
    "auroc",
    "auroc_per_class",
    "macro_auroc",
    "bootstrap_auroc",
    "roc_curve",
    "fit_thresholds_youden",
    "fit_thresholds_ctclip",
    "binary_decision_metrics",
    "threshold_protocol_metrics",
    "evaluate_classification",
    "to_jsonable",
    "PROTOCOLS",
    "ECE_DEFINITION",
    "macro_ece",
    "reliability_bins",
    "expected_calibration_error",
]

#: Human-readable description of each threshold protocol, copied into every metrics.json.
PROTOCOLS: dict[str, str] = {
    "val_youden": (
        "thresholds fitted on the validation split (Youden's J, midpoint between adjacent scores), "
        "applied to the evaluated split; decision score >= threshold"
    ),
    "ctclip_paper": (
        "CT-CLIP paper protocol, OPTIMISTIC: thresholds tuned on the evaluated set itself (ROC point "
        "closest to (0, 1) over linspace(0, 1, 100), decision score > threshold); f1 is support-weighted "
        "over both classes, precision is for the positive class"
    ),
    "vlm3d": (
        "VLM3D challenge protocol: fixed threshold 0.5 (decision score >= 0.5); binary f1, precision, "
        "recall, accuracy per class, macro-averaged"
    ),
}


#: What ``ece`` means in every metrics.json, copied into it.
ECE_DEFINITION = (
    "expected calibration error per finding: the probabilities of the finding are put into n_bins equal-width bins "
    "over [0, 1] ([k/n, (k+1)/n), the last bin closed); ECE = sum over bins of (cases in bin / all cases) * "
    "|observed frequency of the finding in the bin - mean probability in the bin|; empty bins add nothing. "
    "Macro ECE = unweighted mean over the findings. 0 is perfect; with few cases per bin even a calibrated model "
    "scores above 0 (sampling noise)"
)


def _check_pair(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(N, C)`` (or ``(N,)``) binary labels and finite scores; return 2-D float arrays."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"labels and scores must both be (N, C); got {y.shape} and {s.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1 (missing labels are not supported)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of one binary class (Mann-Whitney U with average ranks).

    Args:
        labels: ``(N,)`` 0/1 ground truth.
        scores: ``(N,)`` scores, higher meaning more likely positive.

    Returns:
        The AUROC, where a positive and a negative with equal scores count one half; NaN when
        ``labels`` has a single value (AUROC is undefined).
    """
    y, s = _check_pair(labels, scores)
    y, s = y[:, 0], s[:, 0]
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_per_class(labels: Any, scores: Any) -> np.ndarray:
    """AUROC of every column of ``(N, C)`` labels/scores; NaN for a class with a single label value.

    Args:
        labels: ``(N, C)`` 0/1 ground truth.
        scores: ``(N, C)`` scores.

    Returns:
        ``(C,)`` float array.
    """
    y, s = _check_pair(labels, scores)
    return np.array([auroc(y[:, c], s[:, c]) for c in range(y.shape[1])])


def macro_auroc(labels: Any, scores: Any, class_names: Sequence[str] | None = None) -> tuple[float, list[str]]:
    """Unweighted mean AUROC over the classes where it is defined.

    Args:
        labels: ``(N, C)`` 0/1 ground truth.
        scores: ``(N, C)`` scores.
        class_names: names used in the notes (default ``class_<i>``).

    Returns:
        ``(macro, notes)``: the macro AUROC (NaN if no class is defined) and one note per excluded class.
    """
    per_class = auroc_per_class(labels, scores)
    names = _names(class_names, per_class.size)
    notes = [
        f"{names[c]}: excluded from the macro AUROC (only one label value in the evaluated set)"
        for c in np.flatnonzero(np.isnan(per_class))
    ]
    defined = per_class[~np.isnan(per_class)]
    return (float(defined.mean()) if defined.size else float("nan")), notes


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    if class_names is None:
        return [f"class_{i}" for i in range(n)]
    names = [str(c) for c in class_names]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for {n} columns")
    return names


def _weighted_auroc(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one class under many case weightings at once.

    A bootstrap resample is a multinomial count per case, so the resampled AUROC equals the
    Mann-Whitney statistic with every pair (positive i, negative j) weighted by ``w_i * w_j``.
    Sorting once and summing weights per tie group makes ``B`` resamples cost O(B * N).

    Args:
        y: ``(N,)`` 0/1 labels.
        s: ``(N,)`` scores.
        weights: ``(B, N)`` non-negative case counts.

    Returns:
        ``(B,)`` AUROC per weighting, NaN where the weighted sample lacks positives or negatives.
    """
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    w_pos = np.add.reduceat(w * y_sorted, starts, axis=1)  # (B, G) positive weight per tie group
    w_neg = np.add.reduceat(w * (1.0 - y_sorted), starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg  # negatives with a strictly lower score
    u = (w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1)
    denom = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, u / np.where(denom > 0, denom, 1.0), np.nan)


def percentile_ci(values: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval ``(low, high)`` at confidence ``ci`` of bootstrap replicates (NaN replicates left out;
    NaNs when none is left)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_auroc(
    labels: Any,
    scores: Any,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-class and macro AUROC with percentile bootstrap confidence intervals.

    Cases (volumes) are resampled with replacement, the same resample for every class so that the
    macro is computed on one consistent resample. A resample in which a class has a single label
    value is skipped for that class. The macro of a resample is the mean over the classes that enter
    the point-estimate macro, and it is skipped when any of them is undefined in that resample (so
    every macro replicate estimates the same quantity).

    Args:
        labels: ``(N, C)`` 0/1 ground truth.
        scores: ``(N, C)`` scores.
        n_bootstrap: number of resamples.
        seed: seed of the ``numpy.random.default_rng`` that draws the resamples.
        ci: confidence level of the percentile interval.
        class_names: names of the ``C`` classes (default ``class_<i>``).

    Returns:
        ``{"n_bootstrap", "seed", "ci", "method", "per_class": {name: {"auroc", "ci_low", "ci_high",
        "n_valid"}}, "macro": {"auroc", "ci_low", "ci_high", "n_valid"}, "notes": [...]}``; the point
        estimates are computed on the full data.
    """
    if n_bootstrap < 1:
        raise ValueError("n_bootstrap must be >= 1")
    if not 0.0 < ci < 1.0:
        raise ValueError("ci must be in (0, 1)")
    y, s = _check_pair(labels, scores)
    n, n_classes = y.shape
    names = _names(class_names, n_classes)
    point = auroc_per_class(y, s)
    macro_point, notes = macro_auroc(y, s, names)

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    # case counts per resample: (B, N)
    counts = np.bincount((idx + n * np.arange(n_bootstrap)[:, None]).ravel(), minlength=n_bootstrap * n)
    counts = counts.reshape(n_bootstrap, n).astype(np.float64)

    replicates = np.full((n_bootstrap, n_classes), np.nan)
    for c in range(n_classes):
        if not np.isnan(point[c]):
            replicates[:, c] = _weighted_auroc(y[:, c], s[:, c], counts)

    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        low, high = percentile_ci(replicates[:, c], ci)
        per_class[name] = {
            "auroc": float(point[c]),
            "ci_low": low,
            "ci_high": high,
            "n_valid": int(np.sum(~np.isnan(replicates[:, c]))),
        }
    included = ~np.isnan(point)
    if included.any():
        sub = replicates[:, included]
        valid = ~np.isnan(sub).any(axis=1)
        macro_reps = np.where(valid, np.where(np.isnan(sub), 0.0, sub).mean(axis=1), np.nan)
    else:
        macro_reps = np.full(n_bootstrap, np.nan)
    low, high = percentile_ci(macro_reps, ci)
    n_valid_macro = int(np.sum(~np.isnan(macro_reps)))
    if n_valid_macro < n_bootstrap:
        notes.append(
            f"macro AUROC: {n_bootstrap - n_valid_macro} of {n_bootstrap} resamples skipped "
            "(an included class had a single label value in the resample)"
        )
    return {
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "ci": float(ci),
        "method": "percentile bootstrap over cases (resampled with replacement)",
        "per_class": per_class,
        "macro": {"auroc": macro_point, "ci_low": low, "ci_high": high, "n_valid": n_valid_macro},
        "notes": notes,
    }


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of one binary class at every distinct score.

    Args:
        labels: ``(N,)`` 0/1 ground truth with both values present.
        scores: ``(N,)`` scores.

    Returns:
        ``(fpr, tpr, thresholds)``: the point ``k`` is the decision ``score >= thresholds[k]``;
        thresholds decrease and start at ``+inf`` (nothing positive, the point (0, 0)).
    """
    y, s = _check_pair(labels, scores)
    y, s = y[:, 0], s[:, 0]
    n_pos, n_neg = y.sum(), y.size - y.sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve needs both label values")
    order = np.argsort(-s, kind="mergesort")
    s_desc, y_desc = s[order], y[order]
    # last index of each run of equal scores: the ROC moves once per distinct score
    last = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])
    tp = np.cumsum(y_desc)[last]
    fp = (last + 1) - tp
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, s_desc[last]]


def fit_thresholds_youden(labels_val: Any, scores_val: Any) -> np.ndarray:
    """Per-class thresholds maximising Youden's J = sensitivity + specificity - 1 on a validation split.

    The threshold is placed halfway between the chosen score and the next lower distinct score, so
    the same validation decisions hold while unseen test scores near the boundary are split fairly.
    Among equal J the highest threshold (fewest positive calls) wins.

    Args:
        labels_val: ``(N, C)`` 0/1 validation labels.
        scores_val: ``(N, C)`` validation scores.

    Returns:
        ``(C,)`` thresholds for the decision ``score >= threshold``; NaN for a class with a single
        label value in the validation split.
    """
    y, s = _check_pair(labels_val, scores_val)
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        if y[:, c].min() == y[:, c].max():
            continue
        fpr, tpr, thr = roc_curve(y[:, c], s[:, c])
        j = tpr - fpr
        k = int(np.flatnonzero(j >= j.max() - 1e-12)[0])  # first (near-)maximum = highest threshold
        if k == 0:  # (0, 0) is never better than a real point with J >= 0, but guard anyway
            out[c] = float(thr[1])
            continue
        # last point = everything positive: the lowest score itself keeps that decision
        out[c] = float((thr[k] + thr[k + 1]) / 2.0) if k + 1 < thr.size else float(thr[k])
    return out


def fit_thresholds_ctclip(labels: Any, scores: Any, grid: Any = None) -> np.ndarray:
    """Per-class thresholds as the CT-CLIP scripts choose them (on the set being evaluated).

    For each ``t`` in ``linspace(0, 1, 100)`` the decision is ``score > t``; the chosen ``t``
    minimises the distance of ``(FPR, TPR)`` to ``(0, 1)``, the last ``t`` winning ties (the
    reference's ``<=`` comparison).

    Args:
        labels: ``(N, C)`` 0/1 labels of the evaluated set.
        scores: ``(N, C)`` scores of the evaluated set.
        grid: candidate thresholds (default ``numpy.linspace(0, 1, 100)``).

    Returns:
        ``(C,)`` thresholds for the decision ``score > threshold``; NaN for a class with a single label value.
    """
    y, s = _check_pair(labels, scores)
    grid = np.linspace(0.0, 1.0, 100) if grid is None else np.asarray(grid, dtype=np.float64)
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        pos = y[:, c] == 1
        if pos.all() or not pos.any():
            continue
        pred = s[:, c][None, :] > grid[:, None]  # (T, N)
        tpr = pred[:, pos].mean(axis=1)
        fpr = pred[:, ~pos].mean(axis=1)
        dist = np.sqrt((1.0 - tpr) ** 2 + fpr**2)
        k = int(np.flatnonzero(dist <= dist.min())[-1])  # last minimum, like the reference
        out[c] = float(grid[k])
    return out


def _safe_div(a: float, b: float) -> float:
    # zero denominators give 0, the convention the reference (scikit-learn's default) reports
    return float(a / b) if b > 0 else 0.0


def binary_decision_metrics(labels: Any, decisions: Any) -> dict[str, float]:
    """Confusion-matrix metrics of one class's 0/1 decisions.

    Args:
        labels: ``(N,)`` 0/1 ground truth.
        decisions: ``(N,)`` 0/1 predicted labels.

    Returns:
        ``tp, fp, tn, fn``; ``precision`` (positive class), ``recall`` (= sensitivity),
        ``specificity``, ``f1`` (binary, positive class), ``f1_weighted`` (F1 of each of the two
        classes weighted by its support), ``accuracy`` and ``positive_rate`` (fraction called
        positive). Zero denominators give 0.
    """
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(decisions).astype(bool).ravel()
    if y.shape != p.shape:
        raise ValueError("labels and decisions differ in length")
    tp = int(np.sum(y & p))
    fp = int(np.sum(~y & p))
    tn = int(np.sum(~y & ~p))
    fn = int(np.sum(y & ~p))
    n = y.size
    f1_pos = _safe_div(2 * tp, 2 * tp + fp + fn)
    f1_neg = _safe_div(2 * tn, 2 * tn + fn + fp)  # the negative class taken as "positive"
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "f1": f1_pos,
        "f1_weighted": _safe_div((tp + fn) * f1_pos + (tn + fp) * f1_neg, n),
        "accuracy": _safe_div(tp + tn, n),
        "positive_rate": _safe_div(tp + fp, n),
    }


def threshold_protocol_metrics(
    labels: Any,
    scores: Any,
    thresholds: Any,
    class_names: Sequence[str] | None = None,
    strict: bool = False,
    f1_key: str = "f1",
) -> dict[str, Any]:
    """Apply one threshold per class and summarise the decisions.

    Args:
        labels: ``(N, C)`` 0/1 ground truth.
        scores: ``(N, C)`` scores.
        thresholds: ``(C,)`` thresholds; a NaN threshold leaves that class out (noted).
        class_names: names of the ``C`` classes.
        strict: decision ``score > t`` when True (CT-CLIP scripts), ``score >= t`` otherwise.
        f1_key: which F1 the protocol reports as ``f1`` (``"f1"`` binary or ``"f1_weighted"``).

    Returns:
        ``{"per_class": {name: {"threshold", ...binary_decision_metrics}}, "macro": {metric: mean over
        classes}, "hamming_accuracy", "positive_rate", "notes"}``. ``hamming_accuracy`` is the fraction
        of correct (case, class) decisions; ``positive_rate`` the fraction of positive calls.
    """
    y, s = _check_pair(labels, scores)
    thr = np.asarray(thresholds, dtype=np.float64).ravel()
    if thr.size != y.shape[1]:
        raise ValueError(f"{thr.size} thresholds for {y.shape[1]} classes")
    names = _names(class_names, y.shape[1])
    per_class: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    used = ~np.isnan(thr)
    decisions = np.zeros_like(y, dtype=bool)
    for c, name in enumerate(names):
        if not used[c]:
            notes.append(f"{name}: no threshold (single label value where it was fitted); left out")
            per_class[name] = {"threshold": float("nan")}
            continue
        decisions[:, c] = s[:, c] > thr[c] if strict else s[:, c] >= thr[c]
        m = binary_decision_metrics(y[:, c], decisions[:, c])
        m["f1_binary"] = m["f1"]
        m["f1"] = m[f1_key]
        per_class[name] = {"threshold": float(thr[c]), **m}
    keys = ("f1", "f1_binary", "f1_weighted", "precision", "recall", "specificity", "accuracy", "positive_rate")
    rows = [per_class[n] for n, u in zip(names, used) if u]
    macro = {k: (float(np.mean([r[k] for r in rows])) if rows else float("nan")) for k in keys}
    correct = decisions[:, used] == (y[:, used] == 1)
    return {
        "per_class": per_class,
        "macro": macro,
        "hamming_accuracy": float(correct.mean()) if correct.size else float("nan"),
        "positive_rate": float(decisions[:, used].mean()) if used.any() else float("nan"),
        "notes": notes,
    }


def evaluate_classification(
    labels: Any,
    scores: Any,
    class_names: Sequence[str] | None = None,
    val_labels: Any = None,
    val_scores: Any = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    val_thresholds: Any = None,
    calibrated_scores: Any = None,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Every classification metric of one evaluated split, as a JSON-serialisable dict.

    Args:
        labels: ``(N, C)`` 0/1 ground truth of the evaluated split.
        scores: ``(N, C)`` probabilities of the evaluated split.
        class_names: the ``C`` class names (default: the 18 CT-RATE pathologies when ``C == 18``).
        val_labels: ``(M, C)`` validation labels used to fit the ``val_youden`` thresholds.
        val_scores: ``(M, C)`` validation probabilities (with ``val_labels``).
        n_bootstrap: bootstrap resamples for the AUROC confidence intervals (0 disables them).
        seed: bootstrap seed.
        ci: confidence level.
        val_thresholds: ``(C,)`` thresholds already fitted on validation (instead of val_labels/val_scores).
        calibrated_scores: ``(N, C)`` the same cases' probabilities after a calibration fitted on validation
            (:mod:`workflows.calibration`); their ECE is reported next to that of ``scores``. Everything else
            (AUROC, the threshold protocols) is computed on ``scores``.
        n_bins: equal-width bins of the expected calibration error.

    Returns:
        ``{"n_cases", "class_names", "prevalence", "auroc": {"macro", "macro_ci_low", "macro_ci_high",
        "per_class", "excluded_classes"}, "bootstrap": {...}, "protocols": {"val_youden" (when
        validation data is given), "ctclip_paper", "vlm3d"}, "calibration": {"definition", "n_bins",
        "uncalibrated": {"ece_macro", "ece"}, "calibrated" (with ``calibrated_scores``): {"ece_macro", "ece"}},
        "notes"}``; NaN is stored as None.
    """
    y, s = _check_pair(labels, scores)
    n, n_classes = y.shape
    if class_names is None and n_classes == 18:
        class_names = CTRATE_PATHOLOGIES
    names = _names(class_names, n_classes)
    notes: list[str] = []

    per_auc = auroc_per_class(y, s)
    macro, auc_notes = macro_auroc(y, s, names)
    notes += auc_notes
    auroc_block: dict[str, Any] = {
        "macro": macro,
        "macro_ci_low": float("nan"),
        "macro_ci_high": float("nan"),
        "per_class": {
            name: {
                "auroc": float(per_auc[c]),
                "ci_low": float("nan"),
                "ci_high": float("nan"),
                "n_positive": int(y[:, c].sum()),
                "n_negative": int(n - y[:, c].sum()),
            }
            for c, name in enumerate(names)
        },
        "excluded_classes": [names[c] for c in np.flatnonzero(np.isnan(per_auc))],
    }
    boot_block: dict[str, Any] | None = None
    if n_bootstrap > 0:
        boot = bootstrap_auroc(y, s, n_bootstrap=n_bootstrap, seed=seed, ci=ci, class_names=names)
        for name, b in boot["per_class"].items():
            auroc_block["per_class"][name].update(ci_low=b["ci_low"], ci_high=b["ci_high"], n_valid=b["n_valid"])
        auroc_block["macro_ci_low"] = boot["macro"]["ci_low"]
        auroc_block["macro_ci_high"] = boot["macro"]["ci_high"]
        notes += [m for m in boot["notes"] if m not in notes]
        boot_block = {k: boot[k] for k in ("n_bootstrap", "seed", "ci", "method")}
        boot_block["macro_n_valid"] = boot["macro"]["n_valid"]

    protocols: dict[str, Any] = {}
    if val_thresholds is None and (val_labels is not None) != (val_scores is not None):
        raise ValueError("give both val_labels and val_scores, or neither")
    if val_thresholds is None and val_labels is not None:
        yv, sv = _check_pair(val_labels, val_scores)
        if yv.shape[1] != n_classes:
            raise ValueError("validation and evaluated splits have different numbers of classes")
        val_thresholds = fit_thresholds_youden(yv, sv)
    if val_thresholds is not None:
        res = threshold_protocol_metrics(y, s, val_thresholds, names)
        protocols["val_youden"] = {"description": PROTOCOLS["val_youden"], "optimistic": False, **res}
    else:
        notes.append("val_youden protocol not computed: no validation predictions given")
    res = threshold_protocol_metrics(y, s, fit_thresholds_ctclip(y, s), names, strict=True, f1_key="f1_weighted")
    protocols["ctclip_paper"] = {"description": PROTOCOLS["ctclip_paper"], "optimistic": True, **res}
    res = threshold_protocol_metrics(y, s, np.full(n_classes, 0.5), names)
    protocols["vlm3d"] = {"description": PROTOCOLS["vlm3d"], "optimistic": False, **res}
    for p in protocols.values():
        p["macro"]["auroc"] = macro

    calibration: dict[str, Any] = {"definition": ECE_DEFINITION, "n_bins": int(n_bins)}
    sets = {"uncalibrated": s}
    if calibrated_scores is not None:
        _, sc = _check_pair(y, calibrated_scores)
        sets["calibrated"] = sc
    for key, values in sets.items():
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            notes.append(f"calibration ({key}): not computed, the scores are not probabilities (outside [0, 1])")
            continue
        ece = expected_calibration_error(y, values, n_bins, names)
        calibration[key] = {"ece_macro": ece["macro"], "ece": ece["per_class"]}

    return to_jsonable(
        {
            "n_cases": n,
            "n_classes": n_classes,
            "class_names": names,
            "prevalence": {name: float(y[:, c].mean()) for c, name in enumerate(names)},
            "auroc": auroc_block,
            "bootstrap": boot_block,
            "protocols": protocols,
            "calibration": calibration,
            "notes": notes,
        }
    )


def macro_ece(results: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    """``(uncalibrated, calibrated)`` macro ECE of an evaluation's results or its ``metrics.json`` (the
    ``calibration`` block of :func:`evaluate_classification`); None where it has none."""
    cal = (results or {}).get("calibration") or {}
    return (cal.get("uncalibrated") or {}).get("ece_macro"), (cal.get("calibrated") or {}).get("ece_macro")


def reliability_bins(labels: Any, probs: Any, n_bins: int = 10) -> dict[str, np.ndarray]:
    """The equal-width bins of one finding's probabilities: what a reliability diagram draws and ECE sums.

    Args:
        labels: ``(N,)`` 0/1 ground truth.
        probs: ``(N,)`` probabilities in [0, 1].
        n_bins: number of equal-width bins over [0, 1]; bin ``k`` is ``[k/n_bins, (k+1)/n_bins)``, the last
            one also holds 1.0.

    Returns:
        ``{"edges": (n_bins + 1,), "count": (n_bins,), "mean_prob": (n_bins,), "frac_pos": (n_bins,)}``;
        ``mean_prob`` and ``frac_pos`` are NaN for an empty bin.

    Raises:
        ValueError: a probability outside [0, 1], or ``n_bins < 1``.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    y, p = _check_pair(labels, probs)
    y, p = y[:, 0], p[:, 0]
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"calibration needs probabilities in [0, 1]; got values in [{p.min():.4g}, {p.max():.4g}]")
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(count > 0, sum_p / np.maximum(count, 1.0), np.nan)
        frac_pos = np.where(count > 0, sum_y / np.maximum(count, 1.0), np.nan)
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "mean_prob": mean_prob, "frac_pos": frac_pos}


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = 10,
                               class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Expected calibration error of every finding and their macro mean (``ECE_DEFINITION``).

    This is the calibration of the probability of each finding being present (one binary problem per finding,
    the multi-label reading), not of the top-label confidence of a multi-class model.

    Args:
        labels: ``(N, C)`` 0/1 ground truth.
        probs: ``(N, C)`` probabilities in [0, 1].
        n_bins: equal-width bins over [0, 1].
        class_names: the ``C`` names (default ``class_<i>``).

    Returns:
        ``{"n_bins", "macro", "per_class": {name: ece}}``; every finding counts in the macro (ECE is defined
        with a single label value too); NaN for an empty split.
    """
    y, p = _check_pair(labels, probs)
    names = _names(class_names, y.shape[1])
    per_class: dict[str, float] = {}
    for c, name in enumerate(names):
        b = reliability_bins(y[:, c], p[:, c], n_bins)
        n = b["count"].sum()
        gap = np.abs(np.nan_to_num(b["frac_pos"]) - np.nan_to_num(b["mean_prob"]))
        per_class[name] = float((b["count"] * gap).sum() / n) if n > 0 else float("nan")
    values = np.array(list(per_class.values()), dtype=np.float64)
    macro = float(values.mean()) if values.size and not np.isnan(values).all() else float("nan")
    return {"n_bins": int(n_bins), "macro": macro, "per_class": per_class}


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and NaN/inf floats to plain JSON types (NaN, inf → None).

    Args:
        obj: nested dicts/lists of numbers, strings and numpy values.

    Returns:
        The same structure with only ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` and ``None``.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if hasattr(obj, "item") and callable(obj.item):  # 0-d torch tensors
        return to_jsonable(obj.item())
    return obj
