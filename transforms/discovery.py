"""Finding the volumes a user points at: a cohort folder, a ct_preprocess datalist, a file or a DICOM series.

One definition for every stage: preprocessing walks a cohort with :func:`discover_inputs`, the training and
evaluation stages read the preprocessed datalist with :func:`load_datalist`, and the inference entry points take
whatever the user gives with :func:`inference_items`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ctclip_contract import NOT_GIVEN, NUM_PATHOLOGIES, read_json
from ctclip_contract.anatomy import LABEL_TABLE_FILE, MASK_KEYS, SEG_SUFFIX, is_mask_file, mask_paths

from .ctrate import (find_ctrate_tables, is_safe_name, patient_id, read_labels_csv, read_metadata_csv,
                     read_reports_csv, volume_stem)
from .qc import NIFTI_SUFFIXES, is_dicom_file

__all__ = ["discover_inputs", "load_datalist", "inference_items", "evaluation_items"]

logger = logging.getLogger(__name__)

_IGNORED_SUFFIXES = (".csv", ".json", ".md", ".txt", ".yml", ".yaml", ".log")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _is_preprocessed(folder: Path) -> bool:
    """A ct_preprocess output folder: its volumes are outputs, not inputs, even when it sits in a cohort."""
    if (folder / "datalist.json").is_file() and (folder / "qc.csv").is_file():
        logger.warning(f"not searched for inputs: {folder} (a preprocessed output folder)")
        return True
    return False


def _is_structure_folder(folder: Path) -> bool:
    """``<stem>_seg/`` holding NIfTI files: one mask per structure (TotalSegmentator's layout), not a volume."""
    return folder.name.endswith(SEG_SUFFIX) and any(f.name.lower().endswith(NIFTI_SUFFIXES) for f in folder.iterdir())


def _promised_masks(root: Path) -> tuple[bool, bool]:
    """Whether every volume must have a label map (``anatomy_labels.json`` at the root) and finding masks (a
    generated cohort's ``cohort.json`` says ``finding_masks``)."""
    findings = False
    if (root / "cohort.json").is_file():
        try:
            findings = read_json(root / "cohort.json").get("parameters", {}).get("finding_masks") is True
        except (OSError, ValueError, AttributeError):
            findings = False
    return (root / LABEL_TABLE_FILE).is_file(), findings


def _attach_masks(item: dict, path: Path, root: Path, promised: tuple[bool, bool], used: set) -> None:
    """Add ``seg`` / ``findings_mask`` (absolute paths) to an item when its masks lie beside it; a promised mask that
    is missing becomes a ``mask_issues`` entry (the volume is still processed)."""
    issues = []
    beside = mask_paths(path)
    folder = beside["seg"].parent / beside["seg"].name.split(".nii")[0]
    for key, expected in zip(("seg", "findings"), promised):
        if beside[key].is_file():
            item[MASK_KEYS[key]] = str(beside[key])
            used.add(beside[key])
        elif key == "seg" and folder.is_dir():
            item[MASK_KEYS[key]] = str(folder)
            used.add(folder)
        elif expected:
            why = "anatomy_labels.json" if key == "seg" else "cohort.json (finding_masks)"
            issues.append(f"{_rel(beside[key], root)}: missing ({why} promises one for every volume)")
    if (root / LABEL_TABLE_FILE).is_file():
        item["label_table"] = str(root / LABEL_TABLE_FILE)
    if issues:
        item["mask_issues"] = issues


def discover_inputs(input_dir: str | os.PathLike, patient_pattern: str | None = None,
                    exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[dict], list[dict]]:
    """Find volumes and tables in a cohort folder and join them by volume name.

    Volumes: ``.nii``/``.nii.gz`` files and folders holding DICOM files (one series per folder),
    under ``volumes/`` (our layout), ``dataset/`` (CT-RATE) or the folder itself. Tables: see
    :func:`transforms.ctrate.find_ctrate_tables`. Masks beside a volume (``<stem>_seg.nii.gz``, a ``<stem>_seg/``
    folder of one file per structure, ``<stem>_findings.nii.gz``: :mod:`ctclip_contract.anatomy`) are not volumes:
    they become the item's ``seg`` / ``findings_mask``; a mask without its volume is a rejected row.

    Args:
        input_dir: the cohort folder.
        patient_pattern: regex whose first group is the patient id (default CT-RATE naming);
            a ``PatientID`` metadata column wins when present.
        exclude: folders not to search (the run's own output folder when it lies inside the input folder).
            A folder that holds a ct_preprocess output (``datalist.json`` and ``qc.csv``) is never searched.

    Returns:
        ``(items, rejected)``: items to process (``name``, ``path``, ``input``, ``patient``,
        metadata/report/label fields; ``seg``, ``findings_mask``, ``label_table`` and ``mask_issues`` where masks are
        present or promised) sorted by name, and qc rows for inputs rejected before
        reading (unsafe or duplicate names, files that are not images, table rows without volume).
    """
    root = Path(input_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir is not a folder: {root}")
    search = [root / "volumes"] if (root / "volumes").is_dir() else (
        [root / "dataset"] if (root / "dataset").is_dir() else [root])
    skip_dirs = {"ground_truth", "metadata", "radiology_text_reports", "multi_abnormality_labels"}
    excluded = {Path(p).resolve() for p in exclude}
    found: list[tuple[str, Path]] = []
    rejected: list[dict] = []
    masks: list[Path] = []
    for base in search:
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs
                                 and (here / d).resolve() not in excluded and not _is_preprocessed(here / d))
            for d in [d for d in dirnames if _is_structure_folder(here / d)]:
                dirnames.remove(d)
                masks.append(here / d)
            files = sorted(f for f in filenames if not f.startswith("."))
            dicoms = [f for f in files if not f.lower().endswith(NIFTI_SUFFIXES) and is_dicom_file(here / f)]
            if dicoms and here != base:
                found.append((here.name, here))
                files = [f for f in files if f not in dicoms]
            for f in files:
                p = here / f
                if is_mask_file(f):
                    masks.append(p)
                elif f.lower().endswith(NIFTI_SUFFIXES):
                    found.append((volume_stem(f), p))
                elif not f.lower().endswith(_IGNORED_SUFFIXES) or base != root:
                    if f.lower().endswith(_IGNORED_SUFFIXES) and here == root:
                        continue
                    rejected.append({"name": volume_stem(f), "input": _rel(p, root), "status": "rejected",
                                     "reason": f"{_rel(p, root)}: not a recognised image file"})
    by_name: dict[str, list[Path]] = {}
    for name, p in found:
        by_name.setdefault(name, []).append(p)

    tables = find_ctrate_tables(root)
    meta, reports, labels = {}, {}, {}
    table_issues: dict[str, list[str]] = {}
    for kind, reader, target in (("metadata", read_metadata_csv, meta), ("reports", read_reports_csv, reports),
                                 ("labels", read_labels_csv, labels)):
        for path in tables[kind]:
            rows, issues = reader(path)
            for name, why in issues:
                table_issues.setdefault(name, []).append(why)
            target.update(rows)

    items: list[dict] = []
    promised = _promised_masks(root)
    used: set[Path] = set()
    for name in sorted(by_name):
        paths = sorted(by_name[name])
        if not is_safe_name(name):
            for p in paths:
                rejected.append({"name": name, "input": _rel(p, root), "status": "rejected",
                                 "reason": f"unsafe volume name {name!r}"})
            continue
        if len(paths) > 1:
            where = ", ".join(_rel(p, root) for p in paths)
            for p in paths:
                rejected.append({"name": name, "input": _rel(p, root), "status": "rejected",
                                 "reason": f"duplicate volume name {name!r} ({where})"})
            continue
        p = paths[0]
        row = meta.get(name, {})
        warnings = list(table_issues.get(name, []))
        report = reports.get(name)
        if reports and report is None:
            warnings.append("no report: texts set to 'Not given.'")
        pid = str(row.get("PatientID") or "").strip() or patient_id(name, patient_pattern)
        items.append({
            "name": name,
            "path": str(p),
            "input": _rel(p, root),
            "patient": pid,
            "rescale_slope": row.get("RescaleSlope"),
            "rescale_intercept": row.get("RescaleIntercept"),
            "meta_geometry": {k: row.get(k) for k in ("XYSpacing", "ZSpacing", "ImagePositionPatient",
                                                      "ImageOrientationPatient") if row.get(k) is not None},
            "findings": report["Findings_EN"] if report else NOT_GIVEN,
            "impressions": report["Impressions_EN"] if report else NOT_GIVEN,
            "label": labels.get(name),
            "warning": "; ".join(warnings),
        })
        _attach_masks(items[-1], p, root, promised, used)
    beside_volumes = {q for _, p in found for q in (*mask_paths(p).values(), p.parent / f"{volume_stem(p.name)}{SEG_SUFFIX}")}
    for m in sorted(set(masks) - used - beside_volumes):
        stem = m.name.split(".nii")[0]
        rejected.append({"name": stem, "input": _rel(m, root), "status": "rejected",
                         "reason": f"{_rel(m, root)}: a mask without its volume (no image named like it beside it)"})
    on_disk = set(by_name)
    orphans = sorted((set(meta) | set(reports) | set(labels) | set(table_issues)) - on_disk)
    for name in orphans:
        whys = list(table_issues.get(name, []))
        kinds = [k for k, t in (("metadata", meta), ("report", reports), ("labels", labels)) if name in t]
        if kinds:
            whys.append(f"{'/'.join(kinds)} without a volume")
        rejected.append({"name": name, "input": "", "status": "rejected", "reason": "; ".join(whys)})
    return items, rejected


def load_datalist(dataset_dir: str | os.PathLike, split: str, datalist: str = "datalist.json",
                  max_items: Optional[int] = None, require_labels: bool = False) -> list[dict[str, Any]]:
    """One split of a ct_preprocess ``datalist.json``, with absolute image paths.

    Args:
        dataset_dir: the preprocessed folder (``datalist.json`` and ``volumes/``).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        datalist: file name inside ``dataset_dir`` (or an absolute path).
        max_items: keep only the first items (quick runs).
        require_labels: fail when an entry has no 18-label vector (supervised stages).

    Raises:
        FileNotFoundError, KeyError, ValueError: naming the file and the reason.
    """
    path = Path(datalist) if os.path.isabs(str(datalist)) else Path(dataset_dir) / datalist
    data = read_json(path, "datalist (run bundles/ct_preprocess first or pass --dataset_dir)")
    if split not in data:
        raise KeyError(f"{path}: no {split!r} split (has {sorted(data)})")
    items = []
    for entry in data[split][: max_items if max_items else None]:
        item = dict(entry)
        if "image" not in item:
            raise ValueError(f"{path}: an item of split {split!r} has no 'image' entry: {entry}")
        image = Path(item["image"])
        item["image"] = str(image if image.is_absolute() else (path.parent / image).resolve())
        for key in MASK_KEYS.values():  # masks written beside the preprocessed volume
            if item.get(key):
                mask = Path(item[key])
                item[key] = str(mask if mask.is_absolute() else (path.parent / mask).resolve())
            else:
                item.pop(key, None)  # an empty entry is no mask: loaders skip an absent key, not a None
        if not os.path.exists(item["image"]):
            raise FileNotFoundError(f"{path}: volume {item['image']} of {item.get('name')!r} does not exist")
        if require_labels and item.get("label") is None:
            raise ValueError(f"{path}: {item.get('name')!r} in split {split!r} has no label vector")
        if item.get("label") is not None and len(item["label"]) != NUM_PATHOLOGIES:
            raise ValueError(f"{path}: {item.get('name')!r} in split {split!r} has {len(item['label'])} labels, "
                             f"not {NUM_PATHOLOGIES}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: split {split!r} is empty")
    return items


# the entries inference keeps: everything else (geometry, warnings, paths relative to the cohort) stays behind
_INFERENCE_KEYS = ("image", "name", "patient", "label", "findings", "impressions", "rescale_slope",
                   "rescale_intercept")


def _inference_item(item: dict[str, Any]) -> dict[str, Any]:
    out = {k: item[k] for k in _INFERENCE_KEYS if item.get(k) is not None}
    for k in ("rescale_slope", "rescale_intercept"):  # numbers or absent: collation of mixed None fails
        if k in out:
            try:
                out[k] = float(out[k])
            except (TypeError, ValueError):
                out.pop(k)
    return out


def inference_items(input_path: str | os.PathLike, splits: Sequence[str] = ("training", "validation", "test"),
                    patient_pattern: Optional[str] = None) -> list[dict[str, Any]]:
    """Items ``{"image", "name", ...}`` for inference from whatever the user points at.

    Args:
        input_path: a NIfTI file; a DICOM series folder (or one file of it); a folder of NIfTI files and DICOM
            series folders, or a CT-RATE-layout cohort (its tables add reports, labels and rescale values); or a
            ct_preprocess ``datalist.json``.
        splits: the splits taken from a datalist.
        patient_pattern: see :func:`discover_inputs`.

    Returns:
        dicts with ``image`` (absolute path), ``name`` and, where known, ``label``, ``findings``, ``impressions``,
        ``patient`` and ``rescale_slope``/``rescale_intercept`` (floats).

    Raises:
        FileNotFoundError: naming the path, when it does not exist or holds no volume.
    """
    p = Path(input_path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    if p.is_file() and p.suffix == ".json":
        items = []
        for split in splits:
            try:
                items += load_datalist(p.parent, split, datalist=str(p))
            except KeyError:
                continue
        return [_inference_item(it) for it in items]
    if p.is_file():
        if is_dicom_file(p) and not p.name.lower().endswith(NIFTI_SUFFIXES):
            p = p.parent  # one file of a series: read the whole series
        elif p.name.lower().endswith(NIFTI_SUFFIXES):
            return [{"image": str(p), "name": volume_stem(p.name)}]
        else:
            raise FileNotFoundError(f"{p}: not a NIfTI file (.nii/.nii.gz), a DICOM series or a datalist.json")
    files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
    if any(is_dicom_file(f) for f in files if not f.name.lower().endswith(NIFTI_SUFFIXES)):
        return [{"image": str(p), "name": p.name}]
    found, rejected = discover_inputs(p, patient_pattern)
    for r in rejected:
        logger.warning(f"skipped {r.get('input') or r.get('name')}: {r.get('reason')}")
    if not found:
        raise FileNotFoundError(f"{p}: no NIfTI file or DICOM series found")
    return [_inference_item(dict(it, image=it["path"])) for it in found]


def evaluation_items(dataset_dir: str | os.PathLike | None = None, input: str | os.PathLike | None = None,
                     split: str = "test", datalist: str = "datalist.json",
                     mask_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The items an evaluation or inference run scores: raw ``input`` (:func:`inference_items`) when given, else
    one split (or ``"all"``) of the ct_preprocess datalist in ``dataset_dir``; ``mask_keys`` (e.g. ``["seg"]``, for
    a model whose encoder reads masks) keep those masks' paths in the stored items that have them.

    Raises:
        FileNotFoundError / KeyError / ValueError: naming the path and the reason.
    """
    if input:
        return inference_items(input)
    if not dataset_dir:
        raise ValueError("give --dataset_dir (a ct_preprocess output folder) or --input (raw NIfTI/DICOM)")
    splits = ["training", "validation", "test"] if split == "all" else [split]
    return [{**_inference_item(item), **{k: item[k] for k in mask_keys if item.get(k)}}
            for s in splits for item in load_datalist(dataset_dir, s, datalist)]
