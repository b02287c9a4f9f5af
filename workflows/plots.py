"""Evaluation figures as PNG: ROC curves, reliability diagrams, a 2-D map of image latents, an AUROC learning curve.

matplotlib is optional for the project (extra ``plots``): it is imported inside each function with
the non-interactive Agg backend, so importing this module never needs it.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctclip_contract import CTRATE_PATHOLOGIES, atomic_path, read_json

from .metrics import _names, auroc, expected_calibration_error, reliability_bins, roc_curve

__all__ = ["plot_roc_curves", "plot_reliability", "embed_2d", "plot_latent_map", "plot_learning_curve",
           "read_metrics_per_epoch"]


def _pyplot():
    # matplotlib is the optional `plots` extra (also in `demo` and `test`): imported only when a picture is drawn
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return Path(path)


def plot_roc_curves(
    labels: Any,
    scores: Any,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One ROC panel per class plus a macro-average panel, in a grid.

    The macro curve averages the per-class TPR on a common FPR grid (classes with a single label
    value are skipped, as in the macro AUROC).

    Args:
        labels: ``(N, C)`` 0/1 ground truth.
        scores: ``(N, C)`` scores.
        path: PNG destination.
        class_names: panel titles (default: the 18 CT-RATE pathologies when ``C == 18``).
        title: figure title.

    Returns:
        The PNG path.
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_classes = y.shape[1]
    class_names = _class_names(class_names, n_classes)
    plt = _pyplot()
    fig, axes = _panels(plt, n_classes + 1)
    grid = np.linspace(0.0, 1.0, 201)
    tprs, aucs = [], []
    for c in range(n_classes):
        ax = axes.flat[c]
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
        if y[:, c].min() == y[:, c].max():
            ax.text(0.5, 0.5, "single label value\n(AUROC undefined)", ha="center", va="center", fontsize=8)
            ax.set_title(f"{class_names[c]}", fontsize=8)
        else:
            fpr, tpr, _ = roc_curve(y[:, c], s[:, c])
            a = auroc(y[:, c], s[:, c])
            aucs.append(a)
            # best TPR reachable at each FPR: the last ROC point with fpr <= grid value (tpr is monotone)
            tprs.append(tpr[np.searchsorted(fpr, grid, side="right") - 1])
            ax.plot(fpr, tpr, lw=1.4, color="C0")
            ax.set_title(f"{class_names[c]}\nAUROC {a:.3f} (n+={int(y[:, c].sum())})", fontsize=8)
        _style(ax)
    ax = axes.flat[n_classes]
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    if tprs:
        ax.plot(grid, np.mean(tprs, axis=0), lw=1.8, color="C3")
        ax.set_title(f"macro ({len(tprs)} classes)\nmean AUROC {np.mean(aucs):.3f}", fontsize=8, fontweight="bold")
    _style(ax)
    for ax in list(axes.flat)[n_classes + 1 :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _class_names(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    # the metrics' names, except that 18 unnamed columns are the CT-RATE findings in a figure's titles
    if class_names is None and n_classes == len(CTRATE_PATHOLOGIES):
        return list(CTRATE_PATHOLOGIES)
    return _names(class_names, n_classes)


def _panels(plt, n_panels: int, ncols: int = 5):
    """A grid of square panels, up to ``ncols`` per row."""
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    return plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.0 * nrows), squeeze=False)


def _style(ax, xlabel: str = "1 - specificity", ylabel: str = "sensitivity") -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_aspect("equal")


def plot_reliability(
    labels: Any,
    probs: Any,
    path: str | os.PathLike,
    calibrated: Any = None,
    class_names: Sequence[str] | None = None,
    n_bins: int = 10,
    worst: int | None = 5,
    title: str | None = None,
) -> Path:
    """Reliability diagram: observed frequency of each finding against the predicted probability, per bin.

    The first panel pools every (volume, finding) pair; then the ``worst`` findings with the largest ECE (of the
    calibrated probabilities when given, the ones a reader gets), or every finding with ``worst=None``. Each
    point is one of ``n_bins`` equal-width bins: x the mean probability in it, y the fraction of its cases with
    the finding, its area the number of cases; the dashed diagonal is perfect calibration (a point below it: the
    probabilities are too high). Uncalibrated in grey, calibrated in red.

    Args:
        labels: ``(N, C)`` 0/1 ground truth.
        probs: ``(N, C)`` uncalibrated probabilities.
        path: PNG destination.
        calibrated: ``(N, C)`` calibrated probabilities of the same cases (optional).
        class_names: panel titles (default: the 18 CT-RATE pathologies when ``C == 18``).
        n_bins: equal-width bins, as the ECE.
        worst: how many findings get a panel (None: all, in class order).
        title: figure title.

    Returns:
        The PNG path.
    """
    y = np.asarray(labels, dtype=np.float64)
    series = [("uncalibrated", np.asarray(probs, dtype=np.float64), "0.45")]
    if calibrated is not None:
        series.append(("calibrated", np.asarray(calibrated, dtype=np.float64), "C3"))
    n_classes = y.shape[1]
    names = _class_names(class_names, n_classes)
    eces = [expected_calibration_error(y, p, n_bins, names) for _, p, _ in series]
    ranking = eces[-1]["per_class"]
    if worst is None:
        shown = list(range(n_classes))
    else:
        shown = sorted(range(n_classes), key=lambda c: -np.nan_to_num(ranking[names[c]], nan=-1.0))[: int(worst)]
    plt = _pyplot()
    fig, axes = _panels(plt, len(shown) + 1, ncols=3 if worst is not None and len(shown) <= 5 else 5)
    panels = [(axes.flat[0], None)] + [(axes.flat[i + 1], c) for i, c in enumerate(shown)]
    for ax, c in panels:
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
        parts = []
        for (label, p, color), ece in zip(series, eces):
            yy, pp = (y.ravel(), p.ravel()) if c is None else (y[:, c], p[:, c])
            b = reliability_bins(yy, pp, n_bins)
            keep = b["count"] > 0
            sizes = 6 + 120 * b["count"][keep] / max(b["count"].sum(), 1.0)
            ax.plot(b["mean_prob"][keep], b["frac_pos"][keep], lw=1.2, color=color, label=label)
            ax.scatter(b["mean_prob"][keep], b["frac_pos"][keep], s=sizes, color=color, zorder=3)
            value = ece["macro"] if c is None else ece["per_class"][names[c]]
            parts.append("n/a" if value is None or value != value else f"{value:.3f}")
        if c is None:
            head = f"all findings pooled ({y.shape[0]} volumes x {n_classes})\nmacro ECE {' → '.join(parts)}"
            ax.legend(fontsize=6, loc="upper left")
        else:
            head = f"{names[c]} (n+={int(y[:, c].sum())})\nECE {' → '.join(parts)}"
        ax.set_title(head, fontsize=8, fontweight="bold" if c is None else "normal")
        _style(ax, "mean predicted probability", "observed frequency")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if worst is not None:
        which = "calibrated" if calibrated is not None else "uncalibrated"
        note = f"then the {len(shown)} findings with the largest ECE ({which}); {n_bins} equal-width bins"
        title = f"{title}\n{note}" if title else note
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def embed_2d(latents: Any, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """Project ``(N, D)`` latents to 2-D.

    Args:
        latents: ``(N, D)`` embeddings.
        method: ``"tsne"`` (needs scikit-learn), ``"pca"`` (numpy SVD), or ``"auto"`` (t-SNE when
            scikit-learn is installed and N > 5, else PCA).
        seed: t-SNE random state.

    Returns:
        ``((N, 2) coordinates, method used)``.
    """
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError("need (N, D) latents with N >= 2")
    if method not in ("auto", "tsne", "pca"):
        raise ValueError(f"unknown method {method!r}")
    n = x.shape[0]
    if method in ("auto", "tsne") and n > 5:
        try:
            from sklearn.manifold import TSNE  # scikit-learn is optional (not a dependency): PCA without it
        except ImportError:
            if method == "tsne":
                raise
        else:
            perplexity = float(min(30.0, (n - 1) / 3.0))
            xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
            return np.asarray(xy), "tsne"
    xc = x - x.mean(axis=0, keepdims=True)
    u, sv, _ = np.linalg.svd(xc, full_matrices=False)
    xy = u[:, :2] * sv[:2]
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy, "pca"


def plot_latent_map(
    latents: Any,
    n_findings: Any,
    path: str | os.PathLike,
    method: str = "auto",
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Scatter plot of image latents in 2-D, coloured by the number of positive findings per volume.

    Args:
        latents: ``(N, D)`` image embeddings.
        n_findings: ``(N,)`` count of positive labels per volume (or ``(N, C)`` labels, summed here).
        path: PNG destination.
        method: see :func:`embed_2d`.
        seed: t-SNE random state.
        title: figure title (the projection method is appended).

    Returns:
        The PNG path.
    """
    counts = np.asarray(n_findings)
    if counts.ndim == 2:
        counts = counts.sum(axis=1)
    xy, used = embed_2d(latents, method, seed)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=counts, cmap="viridis", s=18, edgecolors="none")
    cb = fig.colorbar(sc, ax=ax)
    cb.set_label("number of findings")
    ax.set_title(f"{title + ': ' if title else ''}image latents ({used.upper()}, N={len(counts)})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def read_metrics_per_epoch(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics-per-epoch file (JSON list of rows, or CSV with a header) as a list of dicts.

    Args:
        path: ``.json`` or ``.csv`` file (as written by :class:`~workflows.handlers.MetricsPerEpochWriter`).

    Returns:
        Rows with numeric values converted to float (empty cells → None).
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = read_json(path, "metrics file")
        return list(data["epochs"] if isinstance(data, dict) else data)
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v != "" else None
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def plot_learning_curve(
    metrics_file: str | os.PathLike,
    path: str | os.PathLike,
    keys: Sequence[str] = ("macro_auroc",),
    title: str | None = None,
) -> Path:
    """Validation metric(s) against epoch, from a metrics-per-epoch file.

    If ``macro_auroc_ci_low``/``_ci_high`` columns exist they are drawn as a band.

    Args:
        metrics_file: JSON or CSV per-epoch file with an ``epoch`` column.
        path: PNG destination.
        keys: metric columns to draw.
        title: figure title.

    Returns:
        The PNG path.
    """
    rows = [r for r in read_metrics_per_epoch(metrics_file) if r.get("epoch") is not None]
    rows.sort(key=lambda r: r["epoch"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    epochs = np.array([r["epoch"] for r in rows], dtype=float)
    for i, key in enumerate(keys):
        vals = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        ax.plot(epochs, vals, marker="o", color=f"C{i}", label=key)
        lo = np.array([np.nan if r.get(f"{key}_ci_low") is None else r[f"{key}_ci_low"] for r in rows], dtype=float)
        hi = np.array([np.nan if r.get(f"{key}_ci_high") is None else r[f"{key}_ci_high"] for r in rows], dtype=float)
        if np.isfinite(lo).any():
            ax.fill_between(epochs, lo, hi, color=f"C{i}", alpha=0.2, label=f"{key} CI")
    if any("auroc" in k for k in keys):
        ax.axhline(0.5, ls="--", lw=0.8, color="0.6", label="chance (0.5)")
    from matplotlib.ticker import MaxNLocator  # the `plots` extra, as in _pyplot

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(", ".join(keys))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "validation metrics per epoch", fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
