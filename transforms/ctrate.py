"""CT-RATE table readers and the patient-wise datalist (the table layout is :mod:`ctclip_contract.ctrate_format`).

Readers return ``(rows_by_volume_name, issues)``: ``issues`` is a list of ``(volume name, reason)``
for rows that cannot be used (duplicates, bad labels, unsafe names); with ``strict=True`` the first
problem raises instead. Missing columns always raise, naming every missing column.
"""

from __future__ import annotations

import ast
import csv
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ctclip_contract import CTRATE_PATHOLOGIES, NOT_GIVEN, REPORT_COLUMNS
from ctclip_contract.ctrate_format import METADATA_LIST_COLUMNS, METADATA_REQUIRED, REPORT_REQUIRED

__all__ = [
    "CTRATETableError",
    "volume_stem",
    "is_safe_name",
    "parse_list",
    "read_metadata_csv",
    "read_reports_csv",
    "read_labels_csv",
    "find_ctrate_tables",
    "patient_id",
    "split_patients",
    "datalist_from_records",
]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CTRATE_PATIENT = re.compile(r"^([A-Za-z]+_\d+)_[A-Za-z]+_\d+$")


class CTRATETableError(ValueError):
    """A CT-RATE table is unusable; the message names the file and the problem."""


def volume_stem(name: str) -> str:
    """``"train_1_a_1.nii.gz"`` -> ``"train_1_a_1"`` (also ``.nii``); other names unchanged."""
    name = str(name).strip()
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_safe_name(name: str) -> bool:
    """A volume name usable as a file name inside the output folder (no separators, no ``..``)."""
    return bool(_SAFE_NAME.match(name)) and ".." not in name and len(name) <= 200


def parse_list(value: Any) -> list[float] | None:
    """Parse a Python-list string such as ``"[0.341796875, 0.341796875]"`` into floats.

    Returns ``None`` for empty values; raises ``ValueError`` for anything that is not a flat list of
    numbers (a DICOM-style ``"a\\b"`` multi-value is accepted too).
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    s = str(value).strip()
    if not s or s.lower() in ("nan", "none"):
        return None
    if "\\" in s and not s.startswith("["):
        return [float(v) for v in s.split("\\")]
    parsed = ast.literal_eval(s)
    if isinstance(parsed, (int, float)):
        return [float(parsed)]
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(v, (int, float)) for v in parsed):
        raise ValueError(f"not a list of numbers: {s!r}")
    return [float(v) for v in parsed]


def _number(value: Any) -> float | None:
    s = "" if value is None else str(value).strip()
    if not s or s.lower() in ("nan", "none"):
        return None
    return float(s)


#: the decoding of a table cell that is not UTF-8 (CT-RATE's tables are UTF-8; a table edited in a Western
#: European spreadsheet program is Windows-1252): the row is kept, with a warning that names its line
FALLBACK_ENCODING = "cp1252"


def _redecode(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode(FALLBACK_ENCODING, errors="replace")


def _read_csv(path: str | os.PathLike, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            header = [_redecode(h).strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise CTRATETableError(f"{path}: cannot read CSV ({e})") from None
    for row in rows:
        bad = [k for k, v in row.items() if isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v)]
        for k in bad:
            row[k] = _redecode(row[k])
        if bad:
            row["_encoding_note"] = f"not UTF-8 in {', '.join(bad)}: decoded as {FALLBACK_ENCODING}"
    missing = [c for c in required if c not in header]
    if missing:
        raise CTRATETableError(f"{path}: missing column(s) {', '.join(missing)}")
    return header, rows


def _index_rows(path, rows, strict: bool) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """Key rows by volume stem; collect duplicates and unsafe names as issues."""
    table: dict[str, dict[str, str]] = {}
    issues: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):  # line numbers: header is line 1
        name = volume_stem(row.get("VolumeName") or "")
        problem = ""
        if not name:
            problem = f"{Path(path).name} line {i}: empty VolumeName"
        elif not is_safe_name(name):
            problem = f"{Path(path).name} line {i}: unsafe VolumeName {name!r} (path separators or '..')"
        elif name in seen:
            problem = f"{Path(path).name}: duplicate VolumeName {name!r} (lines {seen[name]} and {i})"
        if problem:
            if strict:
                raise CTRATETableError(problem)
            issues.append((name, problem))
            if name in seen:
                table.pop(name, None)  # ambiguous: neither duplicate row is trusted
            continue
        seen[name] = i
        row["_line"] = str(i)
        table[name] = row
        if "_encoding_note" in row:
            issues.append((name, f"{Path(path).name} line {i}: {row.pop('_encoding_note')}"))
    return table, issues


def read_metadata_csv(path: str | os.PathLike, strict: bool = False) -> tuple[dict[str, dict], list]:
    """Read a CT-RATE metadata table (one row per reconstruction).

    List-valued columns (``XYSpacing``, ``ImagePositionPatient``, ``ImageOrientationPatient`` ...) are
    parsed into lists of floats; ``RescaleSlope``/``RescaleIntercept``/``ZSpacing`` into floats
    (``None`` when empty).

    Args:
        path: the CSV file.
        strict: raise on the first bad row instead of listing it in ``issues``.

    Returns:
        ``(rows by volume name without extension, issues)``.

    Raises:
        CTRATETableError: unreadable file, missing columns (all named), or a bad row when strict.
    """
    _, rows = _read_csv(path, METADATA_REQUIRED)
    table, issues = _index_rows(path, rows, strict)
    for name, row in list(table.items()):
        try:
            for col in METADATA_LIST_COLUMNS:
                if col in row:
                    row[col] = parse_list(row[col])
            for col in ("RescaleSlope", "RescaleIntercept", "ZSpacing"):
                row[col] = _number(row.get(col))
        except (ValueError, SyntaxError) as e:
            problem = f"{Path(path).name} line {row['_line']}: bad value for {name!r} ({e})"
            if strict:
                raise CTRATETableError(problem) from None
            issues.append((name, problem))
            del table[name]
    return table, issues


def read_reports_csv(path: str | os.PathLike, strict: bool = False) -> tuple[dict[str, dict], list]:
    """Read a CT-RATE reports table; empty sections become ``"Not given."``.

    Args:
        path: the CSV file (``VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN``).
        strict: raise on the first bad row.

    Returns:
        ``(rows by volume name without extension, issues)``.
    """
    _, rows = _read_csv(path, REPORT_REQUIRED)
    table, issues = _index_rows(path, rows, strict)
    for row in table.values():
        for col in REPORT_COLUMNS[1:]:
            text = (row.get(col) or "").strip()
            row[col] = NOT_GIVEN if not text or text.lower() == "nan" else text
    return table, issues


def read_labels_csv(path: str | os.PathLike, strict: bool = False) -> tuple[dict[str, list[int]], list]:
    """Read a CT-RATE multi-abnormality label table into 18-int vectors in ``CTRATE_PATHOLOGIES`` order.

    Columns are matched by name (case-insensitive), so their order in the file does not matter.

    Args:
        path: the CSV file.
        strict: raise on the first bad row (labels not 0/1, duplicates).

    Returns:
        ``(label vectors by volume name without extension, issues)``.
    """
    header, rows = _read_csv(path, ("VolumeName",))
    lower = {h.lower(): h for h in header}
    missing = [p for p in CTRATE_PATHOLOGIES if p.lower() not in lower]
    if missing:
        raise CTRATETableError(f"{path}: missing column(s) {', '.join(missing)}")
    cols = [lower[p.lower()] for p in CTRATE_PATHOLOGIES]
    table, issues = _index_rows(path, rows, strict)
    out: dict[str, list[int]] = {}
    for name, row in table.items():
        values, bad = [], []
        for col in cols:
            s = (row.get(col) or "").strip()
            try:
                v = float(s)
            except ValueError:
                v = float("nan")
            if v not in (0.0, 1.0):
                bad.append(f"{col}={s!r}")
            values.append(int(v) if v in (0.0, 1.0) else -1)
        if bad:
            problem = f"{Path(path).name} line {row['_line']}: labels not 0/1 for {name!r}: {', '.join(bad)}"
            if strict:
                raise CTRATETableError(problem)
            issues.append((name, problem))
            continue
        out[name] = values
    return out, issues


def find_ctrate_tables(root: str | os.PathLike) -> dict[str, list[Path]]:
    """Locate metadata/report/label tables in a cohort folder.

    Recognises our synthetic layout (``metadata.csv``, ``reports.csv``, ``labels.csv`` at the root)
    and the real CT-RATE layout (``dataset/metadata/*_metadata.csv``,
    ``dataset/radiology_text_reports/*_reports.csv``, ``dataset/multi_abnormality_labels/*_labels.csv``).

    Returns:
        ``{"metadata": [...], "reports": [...], "labels": [...]}`` (sorted paths, possibly empty).
    """
    root = Path(root)
    found: dict[str, list[Path]] = {"metadata": [], "reports": [], "labels": []}
    patterns = {
        "metadata": ["metadata.csv", "*_metadata.csv", "metadata/*_metadata.csv", "dataset/metadata/*_metadata.csv"],
        "reports": ["reports.csv", "*_reports.csv", "radiology_text_reports/*_reports.csv",
                    "dataset/radiology_text_reports/*_reports.csv"],
        "labels": ["labels.csv", "*_labels.csv", "multi_abnormality_labels/*_labels.csv",
                   "dataset/multi_abnormality_labels/*_labels.csv"],
    }
    for kind, pats in patterns.items():
        paths = {p.resolve() for pat in pats for p in root.glob(pat) if p.is_file()}
        found[kind] = sorted(paths)
    return found


def patient_id(name: str, pattern: str | re.Pattern | None = None) -> str:
    """Patient of a volume: ``train_12_a_1`` -> ``train_12`` (CT-RATE naming); otherwise the name itself.

    Args:
        name: volume name without extension.
        pattern: regular expression whose first group is the patient (default: CT-RATE's
            ``<split>_<pid>_<scan>_<recon>``).
    """
    rx = re.compile(pattern) if isinstance(pattern, str) else (pattern or _CTRATE_PATIENT)
    m = rx.match(name)
    return m.group(1) if m else name


def split_patients(
    patients: Iterable[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, str]:
    """Deterministic patient-wise split into ``training``/``validation``/``test``.

    Patients are sorted, shuffled with ``seed`` and cut by ``fractions`` (rounded; every non-zero
    fraction gets at least one patient when there are enough patients). Independent of input order.

    Returns:
        ``{patient: split name}``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    fr = [f / total for f in fractions]
    pats = sorted(set(patients))
    random.Random(seed).shuffle(pats)
    n = len(pats)
    n_val = round(fr[1] * n)
    n_test = round(fr[2] * n)
    if n >= 3:
        n_val = max(n_val, 1 if fr[1] > 0 else 0)
        n_test = max(n_test, 1 if fr[2] > 0 else 0)
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    n_train = n - n_val - n_test
    names = ["training"] * n_train + ["validation"] * n_val + ["test"] * n_test
    return dict(zip(pats, names))


def datalist_from_records(
    records: Iterable[Mapping[str, Any]],
    split_of_patient: Mapping[str, str],
) -> dict[str, list[dict[str, Any]]]:
    """Datalist for the training/inference bundles from per-volume records.

    Args:
        records: dicts with ``image`` (path relative to the datalist's folder), ``name``, ``patient``,
            optional ``findings``/``impressions`` (default ``"Not given."``) and ``label`` (18 ints).
        split_of_patient: from :func:`split_patients`.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each list sorted by name.
    """
    out: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for r in records:
        item = {
            "image": r["image"],
            "name": r["name"],
            "patient": r["patient"],
            "findings": r.get("findings") or NOT_GIVEN,
            "impressions": r.get("impressions") or NOT_GIVEN,
        }
        if r.get("label") is not None:
            item["label"] = [int(v) for v in r["label"]]
        out[split_of_patient[r["patient"]]].append(item)
    for items in out.values():
        items.sort(key=lambda it: it["name"])
    return out
