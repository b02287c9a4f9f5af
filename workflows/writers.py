"""Result files of an evaluation: metrics.json, per-class tables, predictions.csv.

Every file goes through the one atomic writer (:mod:`ctclip_contract.files`), so a reader or a crashed
run never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctclip_contract import CTRATE_PATHOLOGIES, atomic_write_text

from .metrics import to_jsonable

__all__ = [
    "write_json",
    "write_csv_rows",
    "per_class_rows",
    "write_per_class_tables",
    "auroc_table_markdown",
    "markdown_table",
    "write_predictions_csv",
    "read_predictions_csv",
]


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (numpy values converted, NaN/inf stored as null).

    Args:
        path: destination file.
        obj: JSON-like structure.

    Returns:
        The destination path.
    """
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_csv_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV (header from ``fieldnames`` or the union of keys in first-seen order).

    Args:
        path: destination file.
        rows: one mapping per row; missing keys and None/NaN are written as empty cells.
        fieldnames: column order.

    Returns:
        The destination path.
    """
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in fieldnames})
    return atomic_write_text(path, buf.getvalue())


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(v: Any) -> Any:
    """A CSV cell: None/NaN empty; text that a spreadsheet would run as a formula (an input named
    ``=HYPERLINK(...)``, and so a reason that quotes it) gets a leading apostrophe; numbers stay numbers."""
    v = to_jsonable(v)
    if v is None:
        return ""
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        try:
            float(v)
        except ValueError:
            return "'" + v
    return v


def per_class_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per class from an :func:`~workflows.metrics.evaluate_classification` result.

    Args:
        results: the dict returned by ``evaluate_classification``.

    Returns:
        Rows with ``class, n_positive, prevalence, auroc, auroc_ci_low, auroc_ci_high``, ``ece`` (uncalibrated)
        and ``ece_calibrated`` when the results have them and, for every protocol present, ``<protocol>_threshold,
        _f1, _precision, _recall, _specificity, _accuracy``; a last ``macro`` row averages them (AUROC: macro over
        the included classes).
    """
    auc = results["auroc"]
    protocols = results.get("protocols", {})
    cal = results.get("calibration") or {}
    ece_sets = [(col, cal[key]) for col, key in (("ece", "uncalibrated"), ("ece_calibrated", "calibrated"))
                if isinstance(cal.get(key), Mapping)]
    metrics = ("threshold", "f1", "precision", "recall", "specificity", "accuracy")
    rows: list[dict[str, Any]] = []
    for name in results["class_names"]:
        a = auc["per_class"][name]
        row: dict[str, Any] = {
            "class": name,
            "n_positive": a.get("n_positive"),
            "prevalence": results.get("prevalence", {}).get(name),
            "auroc": a.get("auroc"),
            "auroc_ci_low": a.get("ci_low"),
            "auroc_ci_high": a.get("ci_high"),
        }
        for col, e in ece_sets:
            row[col] = (e.get("ece") or {}).get(name)
        for pname, p in protocols.items():
            pc = p["per_class"].get(name, {})
            for m in metrics:
                row[f"{pname}_{m}"] = pc.get(m)
        rows.append(row)
    macro: dict[str, Any] = {
        "class": "macro",
        "n_positive": None,
        "prevalence": None,
        "auroc": auc.get("macro"),
        "auroc_ci_low": auc.get("macro_ci_low"),
        "auroc_ci_high": auc.get("macro_ci_high"),
    }
    for col, e in ece_sets:
        macro[col] = e.get("ece_macro")
    for pname, p in protocols.items():
        for m in metrics:
            macro[f"{pname}_{m}"] = None if m == "threshold" else p["macro"].get(m)
    rows.append(macro)
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    v = to_jsonable(v)
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns``.

    Args:
        rows: dict rows.
        columns: column keys in order.
        digits: decimals of floats.

    Returns:
        The table text (ending with a newline).
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def auroc_table_markdown(results: Mapping[str, Any], rows: Sequence[dict[str, Any]] | None = None) -> str:
    """The per-class and macro AUROC of ``evaluate_classification`` results as Markdown, each with its bootstrap
    confidence interval (and a line saying how it was computed).

    Args:
        results: the dict returned by ``evaluate_classification`` (a ``metrics.json``).
        rows: its :func:`per_class_rows`, when already computed (given an ``auroc_ci`` column here).
    """
    rows = per_class_rows(results) if rows is None else rows
    for r in rows:
        lo, hi = r.get("auroc_ci_low"), r.get("auroc_ci_high")
        r["auroc_ci"] = "n/a" if lo is None or hi is None or lo != lo or hi != hi else f"[{lo:.3f}, {hi:.3f}]"
    boot = results.get("bootstrap") or {}
    head = (f"AUROC with {int(boot['ci'] * 100)}% percentile bootstrap CI ({boot['n_bootstrap']} resamples, "
            f"seed {boot['seed']}).\n\n" if boot else "")
    return head + markdown_table(rows, ["class", "n_positive", "auroc", "auroc_ci"])


def write_per_class_tables(results: Mapping[str, Any], output_dir: str | os.PathLike, stem: str = "per_class") -> dict[str, Path]:
    """Write the per-class table as ``<stem>.csv`` (every column) and ``<stem>.md`` (readable summary).

    The Markdown file has one AUROC table with its confidence interval and one table per threshold
    protocol, each under its protocol description (so the optimistic CT-CLIP protocol is labelled).

    Args:
        results: the dict returned by ``evaluate_classification``.
        output_dir: folder for both files.
        stem: file name without extension.

    Returns:
        ``{"csv": path, "md": path}``.
    """
    output_dir = Path(output_dir)
    rows = per_class_rows(results)
    csv_path = write_csv_rows(output_dir / f"{stem}.csv", rows)
    parts = [f"# Classification results ({results.get('n_cases')} cases)\n", auroc_table_markdown(results, rows)]
    for pname, p in results.get("protocols", {}).items():
        title = f"## Protocol `{pname}`" + (" (optimistic)" if p.get("optimistic") else "")
        cols = ["class"] + [f"{pname}_{m}" for m in ("threshold", "f1", "precision", "recall", "specificity", "accuracy")]
        extra = f"Hamming accuracy {_fmt(p.get('hamming_accuracy'))}, positive prediction rate {_fmt(p.get('positive_rate'))}.\n"
        parts.append(f"\n{title}\n\n{p.get('description', '')}\n\n{extra}\n" + markdown_table(rows, cols))
    cal = results.get("calibration") or {}
    if isinstance(cal.get("uncalibrated"), Mapping):
        after = cal.get("calibrated") if isinstance(cal.get("calibrated"), Mapping) else None
        how = (f"ECE of the probabilities as the model gives them (`ece`) and after {after.get('description') or 'calibration'} "
               "(`ece_calibrated`), on this split" if after else "ECE of the probabilities as the model gives them")
        parts.append(f"\n## Calibration\n\n{how}. {cal.get('definition', '')}.\n\n"
                     + markdown_table(rows, ["class", "n_positive", "ece"] + (["ece_calibrated"] if after else [])))
    notes = results.get("notes") or []
    if notes:
        parts.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    md_path = atomic_write_text(output_dir / f"{stem}.md", "\n".join(parts))
    return {"csv": csv_path, "md": md_path}


def write_predictions_csv(
    path: str | os.PathLike,
    names: Sequence[str],
    probabilities: Any,
    class_names: Sequence[str] | None = None,
    thresholds: Mapping[str, Any] | Any = None,
    labels: Any = None,
    digits: int = 6,
) -> Path:
    """Write ``VolumeName`` + one probability column per class (CT-RATE order), one row per volume.

    Args:
        path: destination file.
        names: ``N`` volume names.
        probabilities: ``(N, C)`` probabilities.
        class_names: column names (default: the 18 CT-RATE pathologies).
        thresholds: optional decision columns: a ``(C,)`` array gives ``<class>_pred``; a mapping
            ``{protocol: (C,) array}`` gives ``<class>_pred_<protocol>``; decision = ``p >= t``
            (NaN threshold → empty cell).
        labels: optional ``(N, C)`` ground truth written as ``<class>_label`` columns.
        digits: decimals of the probabilities.

    Returns:
        The destination path.
    """
    if class_names is None:
        class_names = CTRATE_PATHOLOGIES
    class_names = list(class_names)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape != (len(names), len(class_names)):
        raise ValueError(f"probabilities must be ({len(names)}, {len(class_names)}); got {p.shape}")
    header = ["VolumeName", *class_names]
    blocks: list[np.ndarray] = [np.vectorize(lambda v: f"{v:.{digits}f}", otypes=[object])(p)] if p.size else []
    if thresholds is not None:
        named = thresholds.items() if isinstance(thresholds, Mapping) else [(None, thresholds)]
        for proto, thr in named:
            thr = np.asarray(thr, dtype=np.float64).ravel()
            if thr.size != len(class_names):
                raise ValueError(f"{thr.size} thresholds for {len(class_names)} classes")
            suffix = "_pred" if proto is None else f"_pred_{proto}"
            header += [f"{c}{suffix}" for c in class_names]
            dec = np.where(np.isnan(thr)[None, :], "", (p >= thr[None, :]).astype(int).astype(str)).astype(object)
            blocks.append(dec)
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != p.shape:
            raise ValueError("labels and probabilities differ in shape")
        header += [f"{c}_label" for c in class_names]
        blocks.append(y.astype(int).astype(str).astype(object))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    body = np.concatenate(blocks, axis=1) if blocks else np.empty((len(names), 0), dtype=object)
    for name, row in zip(names, body):
        w.writerow([name, *row])
    return atomic_write_text(path, buf.getvalue())


def read_predictions_csv(
    path: str | os.PathLike, class_names: Sequence[str] | None = None, with_labels: bool = False
) -> tuple[list[str], np.ndarray] | tuple[list[str], np.ndarray, np.ndarray]:
    """Read a predictions CSV back: volume names and the ``(N, C)`` probability columns.

    Args:
        path: file written by :func:`write_predictions_csv` (or any CSV with ``VolumeName`` and the class columns).
        class_names: columns to read (default: the 18 CT-RATE pathologies).
        with_labels: also read the ``<class>_label`` columns (written with ``labels=``).

    Returns:
        ``(names, probabilities)``, or ``(names, probabilities, labels)`` with ``with_labels``.

    Raises:
        KeyError: naming the missing column.
    """
    if class_names is None:
        class_names = CTRATE_PATHOLOGIES
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    wanted = ["VolumeName", *class_names] + ([f"{c}_label" for c in class_names] if with_labels else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise KeyError(f"{path}: missing column(s) {missing}")
    names = [r["VolumeName"] for r in rows]
    shape = (len(rows), len(class_names))
    probs = np.array([[float(r[c]) for c in class_names] for r in rows], dtype=np.float64).reshape(shape)
    if not with_labels:
        return names, probs
    labels = np.array([[float(r[f"{c}_label"]) for c in class_names] for r in rows], dtype=np.float64).reshape(shape)
    return names, probs, labels
