"""Generate a synthetic chest-CT cohort in the CT-RATE layout (README, "The cohort on disk").

One call writes, under ``output_dir``::

    volumes/<split>_<p>/<split>_<p>_<scan>/<split>_<p>_<scan>_<r>.nii.gz   NIfTI reconstruction
    volumes/<split>_<p>/<split>_<p>_<scan>/<split>_<p>_<scan>_<r>/         DICOM series (one file per slice)
    volumes/.../<split>_<p>_<scan>_<r>_seg.nii.gz       anatomical label map (uint8, the volume's grid and affine;
                                                        anatomy_masks=True)
    volumes/.../<split>_<p>_<scan>_<r>_findings.nii.gz  finding masks (int32 bits, CT-CLIP order; finding_masks=True)
    anatomy_labels.json   region id -> name of the label maps (ctclip_contract.anatomy)
    metadata.csv      CT-RATE metadata header, one row per reconstruction
    reports.csv       VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
    labels.csv        VolumeName + the 18 labels in CT-CLIP order
    ground_truth/<split>_<p>_<scan>_<r>.json   case record + every encoding choice
    cohort.json       parameters, versions, summary

A *case* is one scan of one patient (a case record: findings, labels, report); it has one or two
reconstructions that share the record, the report and the labels. Some patients have a second
scan ``b``. Every random choice of case ``i`` comes from seeds derived from ``(seed, i)``, so the
files do not depend on the number of worker processes.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import fire
import numpy as np
from tqdm.auto import tqdm

from ctclip_contract import CTRATE_PATHOLOGIES, METADATA_COLUMNS, REPORT_COLUMNS, atomic_write_json, atomic_write_text
from ctclip_contract.anatomy import LABEL_TABLE_FILE, label_table, mask_paths

from .dicom import write_dicom_series
from .encoding import ENCODINGS, ORIENTATIONS, encoding_facts, orient, quantise, write_label_nifti, write_nifti
from .reports import generate_report

__all__ = ["generate_cohort", "plan_cases", "case_seed", "METADATA_COLUMNS", "LABEL_COLUMNS", "DEFAULT_ENCODINGS",
           "DEFAULT_ORIENTATIONS", "CohortConfigError"]

LABEL_COLUMNS = ["VolumeName", *CTRATE_PATHOLOGIES]

#: Default storage mix (weights): mostly int16 + intercept, a share of every trap.
DEFAULT_ENCODINGS = {
    "int16_offset": 0.35, "int16_hu": 0.15, "int16_offset_raw": 0.1, "hu_fixed_trap": 0.1,
    "uint16_12bit": 0.15, "uint16_slope2": 0.075, "uint16_slope_half": 0.075,
}
#: Default stored orientations (weights); each format draws from the ones it supports.
DEFAULT_ORIENTATIONS = {"RAS": 0.5, "LPS": 0.3, "LAS": 0.2, "prone": 0.2}

# (name, share, models, {kernel class: ConvolutionKernel}, source-detector, source-patient mm)
_MANUFACTURERS = (
    ("Philips", 0.615, ("Ingenuity CT", "Brilliance 64", "iCT 256"), {"soft": "YA", "sharp": "YC"}, 1040.0, 570.0),
    ("Siemens", 0.301, ("SOMATOM Definition Edge", "SOMATOM Definition AS"), {"soft": "B30f", "sharp": "B70f"}, 1085.6, 595.0),
    ("PNMS", 0.084, ("NeuViz 128", "NeuViz 64"), {"soft": "STANDARD", "sharp": "LUNG"}, 1040.0, 570.0),
)
_COHORT_ENTRIES = ("volumes", "ground_truth", "metadata.csv", "reports.csv", "labels.csv", "cohort.json", LABEL_TABLE_FILE)
_SPLIT = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,31}$")
_RENDERER_FUNCTIONS = ("sample_case_record", "default_grid", "sample_recon", "render_truth", "apply_scanner")
_RENDERER_MODULES = (".record", ".render", ".scanner")
_PACKAGE = "chest_phantom"


class CohortConfigError(ValueError):
    """A cohort parameter is invalid; raised before anything is written."""


# ------------------------------------------------------------------------------------------------
# Seeds and the case plan
# ------------------------------------------------------------------------------------------------


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a cohort generated with ``seed`` (independent of worker count).

    Args:
        seed: cohort seed.
        index: 0-based case index.

    Returns:
        a 32-bit integer seed (NumPy ``SeedSequence([seed, index])``).
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def plan_cases(num_cases: int, seed: int, two_scan_fraction: float = 0.2, split_prefix: str = "train") -> list[dict]:
    """Patients and scans of a cohort: case ``i`` → ``(patient_id, scan, seed)``.

    Patients are numbered from 1 (``train_1``); a patient gets a second scan ``b`` with
    probability ``two_scan_fraction`` (while cases remain).

    Args:
        num_cases: number of scans.
        seed: cohort seed.
        two_scan_fraction: probability that a patient has a second scan ``b``.
        split_prefix: first part of the patient ids.

    Returns:
        list of ``{"index", "patient_id", "scan", "seed"}`` in case order.
    """
    rng = np.random.default_rng([int(seed), 0x91A7])
    cases: list[dict] = []
    patient = 0
    while len(cases) < num_cases:
        patient += 1
        scans = ["a", "b"] if rng.random() < two_scan_fraction else ["a"]
        for scan in scans:
            if len(cases) < num_cases:
                i = len(cases)
                cases.append({"index": i, "patient_id": f"{split_prefix}_{patient}", "scan": scan, "seed": case_seed(seed, i)})
    return cases


# ------------------------------------------------------------------------------------------------
# Renderer side (written by the renderer engineer; located by name so the modules may move)
# ------------------------------------------------------------------------------------------------


def _renderer(module: str | None = None) -> dict[str, Callable]:
    found: dict[str, Callable] = {}
    candidates = [module] if module else [f"{_PACKAGE}{m}" for m in _RENDERER_MODULES]
    for name in candidates:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if module or (exc.name and not exc.name.startswith(_PACKAGE)):
                raise
            continue
        for fn in _RENDERER_FUNCTIONS:
            if fn not in found and callable(getattr(mod, fn, None)):
                found[fn] = getattr(mod, fn)
    missing = [fn for fn in _RENDERER_FUNCTIONS if fn not in found]
    if missing:
        raise ImportError(f"the phantom renderer is missing {', '.join(missing)} (looked in {', '.join(candidates)})")
    return found


def _geometry_presets() -> dict | None:
    path = Path(__file__).with_name("geometries.json")
    if not path.is_file():
        return None
    with open(path) as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if not k.startswith("_")} if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------------
# Validation (before any file is written)
# ------------------------------------------------------------------------------------------------


def _weights(value, valid: dict, what: str) -> dict[str, float]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        value = {v: 1.0 for v in value}
    if not isinstance(value, dict) or not value:
        raise CohortConfigError(f"{what}: expected a non-empty list of names or a dict name -> weight, got {value!r}")
    unknown = [k for k in value if k not in valid]
    if unknown:
        raise CohortConfigError(f"{what}: unknown name(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    bad = [k for k, w in value.items() if not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0]
    if bad or sum(float(w) for w in value.values()) <= 0:
        raise CohortConfigError(f"{what}: weights must be non-negative numbers with a positive sum, got {value!r}")
    return {k: float(w) for k, w in value.items() if w > 0}


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise CohortConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_writable(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise CohortConfigError(f"output_dir {str(output_dir)!r} exists and is not a folder")
    probe = output_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise CohortConfigError(f"output_dir {str(output_dir)!r} is not writable (no write permission on {str(probe)!r})")
    try:  # os.access can be wrong (read-only mounts, ACLs): really try
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise CohortConfigError(f"output_dir {str(output_dir)!r} is not writable: {exc}") from None


def _validate(output_dir, num_cases, seed, geometry, prevalence, balanced, encodings, orientations, dicom_fraction,
              two_recon_fraction, two_scan_fraction, anisotropic_fraction, label_noise, num_workers, split_prefix, renderer,
              finding_masks=True, anatomy_masks=True) -> dict:
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise CohortConfigError(f"num_cases must be a positive integer, got {num_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CohortConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
        raise CohortConfigError(f"num_workers must be a positive integer, got {num_workers!r}")
    for flag, value in (("finding_masks", finding_masks), ("anatomy_masks", anatomy_masks)):
        if not isinstance(value, bool):
            raise CohortConfigError(f"{flag} must be true or false, got {value!r}")
    if not isinstance(split_prefix, str) or not _SPLIT.match(split_prefix):
        raise CohortConfigError(f"split_prefix must be letters/digits starting with a letter (it becomes part of "
                                f"every file name), got {split_prefix!r}")
    cfg = {
        "dicom_fraction": _fraction(dicom_fraction, "dicom_fraction"),
        "two_recon_fraction": _fraction(two_recon_fraction, "two_recon_fraction"),
        "two_scan_fraction": _fraction(two_scan_fraction, "two_scan_fraction"),
        "anisotropic_fraction": _fraction(anisotropic_fraction, "anisotropic_fraction"),
        "label_noise": _fraction(label_noise, "label_noise"),
        "encodings": _weights(DEFAULT_ENCODINGS if encodings is None else encodings, ENCODINGS, "encodings"),
        "orientations": _weights(DEFAULT_ORIENTATIONS if orientations is None else orientations, ORIENTATIONS, "orientations"),
    }
    for fmt in ("nifti", "dicom"):
        needs = cfg["dicom_fraction"] > 0 if fmt == "dicom" else cfg["dicom_fraction"] < 1
        if not needs:
            continue
        if not any(fmt in ENCODINGS[e]["formats"] for e in cfg["encodings"]):
            raise CohortConfigError(f"encodings {list(cfg['encodings'])} include none that can be written as {fmt} "
                                    f"(dicom_fraction={cfg['dicom_fraction']})")
        if not any(fmt in ORIENTATIONS[o]["formats"] for o in cfg["orientations"]):
            raise CohortConfigError(f"orientations {list(cfg['orientations'])} include none that can be written as {fmt} "
                                    f"(dicom_fraction={cfg['dicom_fraction']})")
    if isinstance(prevalence, dict):
        unknown = [k for k in prevalence if k not in CTRATE_PATHOLOGIES]
        if unknown:
            raise CohortConfigError(f"prevalence: unknown finding name(s) {', '.join(map(repr, unknown))}; "
                                    f"valid names: {', '.join(CTRATE_PATHOLOGIES)}")
        bad = {k: v for k, v in prevalence.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1}
        if bad:
            raise CohortConfigError(f"prevalence: values must be probabilities in [0, 1], got {bad}")
    elif not isinstance(prevalence, str):
        raise CohortConfigError(f"prevalence must be a preset name or a dict label -> probability, got {prevalence!r}")
    if isinstance(geometry, str):
        presets = _geometry_presets()
        if presets is not None and geometry not in presets:
            raise CohortConfigError(f"geometry: unknown preset {geometry!r}; valid: {', '.join(sorted(presets))}")
    elif not isinstance(geometry, dict):
        raise CohortConfigError(f"geometry must be a preset name or a dict, got {geometry!r}")
    try:
        fns = _renderer(renderer)
    except ImportError as exc:
        raise CohortConfigError(str(exc)) from None
    # Dry run of the renderer's own checks on the first case (in memory only): unknown labels or
    # presets surface here, not in a worker after files were written.
    first = plan_cases(1, int(seed), 0.0, split_prefix)[0]
    try:
        record = fns["sample_case_record"](first["patient_id"], "a", first["seed"], prevalence=prevalence, balanced=balanced)
        fns["default_grid"](record, geometry, np.random.default_rng(0))
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CohortConfigError(f"invalid prevalence/balanced/geometry: {msg}") from None
    _check_writable(Path(output_dir))
    out = Path(output_dir)
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _COHORT_ENTRIES)
        if foreign:
            raise CohortConfigError(f"output_dir {str(out)!r} holds files that are not part of a generated cohort "
                                    f"({', '.join(foreign[:5])}); use an empty or new folder")
    return cfg


def _clear_previous(out: Path) -> None:
    """Remove an earlier cohort in ``out`` (only our own entries), so no stale volume survives."""
    for name in _COHORT_ENTRIES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ------------------------------------------------------------------------------------------------
# One case (runs in a worker process)
# ------------------------------------------------------------------------------------------------


def _choose(rng: np.random.Generator, weights: dict[str, float], allowed: Callable[[str], bool]) -> str:
    names = [n for n in weights if allowed(n)]
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _pylist(values) -> str:
    """Python-list string as CT-RATE writes it: "[0.75, 0.75]", "[1, 0, 0, 0, 1, 0]"."""
    return "[" + ", ".join(_num(v) for v in values) + "]"


def _num(v) -> str:
    v = float(v)
    if v.is_integer():
        return str(int(v))
    return f"{v:.6f}".rstrip("0").rstrip(".")


def _acquisition(record: dict, rng: np.random.Generator) -> dict:
    """Scanner and protocol of one scan (shared by its reconstructions)."""
    shares = np.array([m[1] for m in _MANUFACTURERS])
    m = _MANUFACTURERS[int(rng.choice(len(_MANUFACTURERS), p=shares / shares.sum()))]
    kvp = float(rng.choice([100, 120, 120, 120, 140]))
    ma = int(rng.integers(80, 320))
    exposure_time = int(rng.integers(400, 1200))
    rotation = float(rng.choice([0.5, 0.75, 1.0]))
    single = 0.625 if m[0] != "Siemens" else 0.6
    n_det = int(rng.choice([64, 128]))
    pitch = float(np.round(rng.uniform(0.8, 1.2), 3))
    total = single * n_det
    year = int(rng.integers(2018, 2021))
    day = int(rng.integers(0, 300))
    date = np.datetime64(f"{year}-01-01") + np.timedelta64(day + (90 if record.get("scan") == "b" else 0), "D")
    return {
        "Manufacturer": m[0], "ManufacturerModelName": str(rng.choice(m[2])), "kernels": m[3],
        "DistanceSourceToDetector": m[4], "DistanceSourceToPatient": m[5], "KVP": kvp, "XRayTubeCurrent": ma,
        "ExposureTime": exposure_time, "Exposure": int(round(ma * exposure_time / 1000)), "RevolutionTime": rotation,
        "SingleCollimationWidth": single, "TotalCollimationWidth": total, "SpiralPitchFactor": pitch,
        "TableFeedPerRotation": round(total * pitch, 3), "TableSpeed": round(total * pitch / rotation, 3),
        "TableHeight": round(float(rng.uniform(130, 190)), 1), "GeneratorPower": int(kvp * ma / 1000),
        "ExposureModulationType": str(rng.choice(["NONE", "DOM", "XYZ_EC"])), "CTDIvol": round(float(rng.uniform(2.5, 12.0)), 2),
        "FilterType": {"Philips": "B", "Siemens": "FLAT", "PNMS": "BODY"}[m[0]], "FocalSpots": "1.1",
        "StudyDate": str(date).replace("-", ""), "RescaleType": "HU" if rng.random() < 0.8 else "",
    }


def _metadata_row(name: str, record: dict, acq: dict, recon: dict, kernel: str, a_lps: np.ndarray, shape, enc_facts: dict,
                  patient_position: str, grid: dict) -> dict:
    spacing = np.linalg.norm(a_lps[:3, :3], axis=0)
    iop = _iop(a_lps)
    ipp = a_lps[:3, 3]
    centre = np.asarray(grid["origin_mm"], float) + (np.asarray(grid["shape"]) - 1) * np.asarray(grid["spacing_mm"]) / 2
    thickness = recon.get("slice_thickness_mm", spacing[2])
    return {
        "VolumeName": name,
        "Manufacturer": acq["Manufacturer"],
        "SeriesDescription": f"THORAX {_num(thickness)} {kernel}",
        "ManufacturerModelName": acq["ManufacturerModelName"],
        "PatientSex": record.get("sex", ""),
        "PatientAge": f"{int(record.get('age', 0)):03d}Y",
        "ReconstructionDiameter": _num(round(float(recon.get("fov_diameter_mm", spacing[0] * shape[0])), 3)),
        "DistanceSourceToDetector": _num(acq["DistanceSourceToDetector"]),
        "DistanceSourceToPatient": _num(acq["DistanceSourceToPatient"]),
        "GantryDetectorTilt": "0",
        "TableHeight": _num(acq["TableHeight"]),
        "RotationDirection": "CW",
        "ExposureTime": acq["ExposureTime"],
        "XRayTubeCurrent": acq["XRayTubeCurrent"],
        "Exposure": acq["Exposure"],
        "FilterType": acq["FilterType"],
        "GeneratorPower": acq["GeneratorPower"],
        "FocalSpots": acq["FocalSpots"],
        "ConvolutionKernel": kernel,
        "PatientPosition": patient_position,
        "RevolutionTime": _num(acq["RevolutionTime"]),
        "SingleCollimationWidth": _num(acq["SingleCollimationWidth"]),
        "TotalCollimationWidth": _num(acq["TotalCollimationWidth"]),
        "TableSpeed": _num(acq["TableSpeed"]),
        "TableFeedPerRotation": _num(acq["TableFeedPerRotation"]),
        "SpiralPitchFactor": _num(acq["SpiralPitchFactor"]),
        "DataCollectionCenterPatient": _pylist([0.0, round(centre[1], 3), round(centre[2], 3)]),
        "ReconstructionTargetCenterPatient": _pylist([round(c, 3) for c in centre]),
        "ExposureModulationType": acq["ExposureModulationType"],
        "CTDIvol": _num(acq["CTDIvol"]),
        "ImagePositionPatient": _pylist([round(v, 6) for v in ipp]),
        "ImageOrientationPatient": _pylist(iop),
        "SliceLocation": _num(round(float(ipp[2]), 6)),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": int(shape[1]),
        "Columns": int(shape[0]),
        "XYSpacing": _pylist([spacing[1], spacing[0]]),  # DICOM PixelSpacing order: between rows, between columns
        "RescaleIntercept": _num(enc_facts["row_intercept"]),
        "RescaleSlope": _num(enc_facts["row_slope"]),
        "RescaleType": acq["RescaleType"],
        "NumberofSlices": int(shape[2]),
        "ZSpacing": _num(spacing[2]),
        "StudyDate": acq["StudyDate"],
    }


def _iop(a_lps: np.ndarray) -> list[float]:
    spacing = np.linalg.norm(a_lps[:3, :2], axis=0)
    return [float(v) for v in np.concatenate([a_lps[:3, 0] / spacing[0], a_lps[:3, 1] / spacing[1]])]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_masks(out: Path, rel_volume: Path, truth: dict, grid: dict, orientation: str,
                 anatomy: bool = True) -> dict:
    """Write the case's label maps beside one stored volume, in its orientation; return where (sidecar entry).
    ``anatomy``: write the anatomical label map (the finding masks are in ``truth`` only when asked for)."""
    written = {}
    for key, array in (("seg", truth.get("anatomy") if anatomy else None), ("findings", truth.get("findings"))):
        if array is None:
            continue
        stored, a_lps = orient(array, grid, orientation)
        rel = mask_paths(rel_volume)[key]
        write_label_nifti(out / rel, stored, a_lps)
        written[key] = rel.as_posix()
    if "seg" in written:
        written["label_table"] = LABEL_TABLE_FILE
    return written


def _generate_case(task: dict) -> list[dict]:
    """Render, encode and write every reconstruction of one case; return its CSV rows."""
    try:
        return _generate_case_inner(task)
    except Exception as exc:  # name the case: a worker traceback alone does not say which
        raise RuntimeError(f"case {task['patient_id']}_{task['scan']} (index {task['index']}, seed {task['seed']}) "
                           f"failed: {type(exc).__name__}: {exc}") from exc


def _generate_case_inner(task: dict) -> list[dict]:
    fns = _renderer(task["renderer"])
    out = Path(task["output_dir"])
    cseed = int(task["seed"])
    pid, scan = task["patient_id"], task["scan"]
    rng = np.random.default_rng([cseed, 0xE2C0])
    noise = {"label_noise": task["label_noise"]} if task.get("label_noise") else {}
    record = fns["sample_case_record"](pid, scan, cseed, prevalence=task["prevalence"], balanced=task["balanced"], **noise)
    grid = fns["default_grid"](record, task["geometry"], np.random.default_rng([cseed, 0x6E1D]))
    grid = json.loads(json.dumps(_jsonable(grid)))  # own copy: the anisotropic variant edits it
    anisotropic = rng.random() < task["anisotropic_fraction"]
    if anisotropic:  # rare x != y pixel spacing: coarser rows, same extent
        extent = grid["shape"][1] * grid["spacing_mm"][1]
        grid["spacing_mm"][1] = float(round(grid["spacing_mm"][1] * rng.uniform(1.15, 1.3), 4))
        grid["shape"][1] = int(round(extent / grid["spacing_mm"][1]))
    # a stand-in renderer (tests) may know no finding masks: then there are none
    want_findings = bool(task.get("finding_masks")) and "finding_masks" in inspect.signature(fns["render_truth"]).parameters
    truth = fns["render_truth"](record, grid, finding_masks=True) if want_findings else fns["render_truth"](record, grid)
    n_recon = 2 if rng.random() < task["two_recon_fraction"] else 1
    # Reconstruction numbers are 1-based, as in CT-RATE names (train_12_a_1, train_12_a_2).
    recons = [fns["sample_recon"](record, np.random.default_rng([cseed, 0x7EC0, r]), r) for r in range(1, n_recon + 1)]
    acq = _acquisition(record, rng)
    report = generate_report(record, slice_thickness_mm=recons[0].get("slice_thickness_mm"))
    labels = {name: int(record["labels"][name]) for name in CTRATE_PATHOLOGIES}
    scan_dir = out / "volumes" / pid / f"{pid}_{scan}"
    scan_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for r, recon in enumerate(recons, start=1):
        stem = f"{pid}_{scan}_{r}"
        scanner_seed = int(np.random.SeedSequence([cseed, 0x5CA7, r]).generate_state(1)[0])
        hu = fns["apply_scanner"](truth, grid, recon, scanner_seed)
        fmt = "dicom" if rng.random() < task["dicom_fraction"] else "nifti"
        enc_name = _choose(rng, task["encodings"], lambda e: fmt in ENCODINGS[e]["formats"])
        ori_name = _choose(rng, task["orientations"], lambda o: fmt in ORIENTATIONS[o]["formats"])
        q = quantise(hu, enc_name, recon.get("padding_value_hu"))
        stored, a_lps = orient(q["stored"], grid, ori_name)
        del hu
        facts = encoding_facts(enc_name, q)
        kernel = acq["kernels"].get(recon.get("kernel", "soft"), str(recon.get("kernel")))
        patient_position = ORIENTATIONS[ori_name]["patient_position"]
        if fmt == "nifti":
            name = f"{stem}.nii.gz"
            rel = Path("volumes") / pid / f"{pid}_{scan}" / name
            header = write_nifti(out / rel, stored, a_lps, enc_name,
                                 broken_geometry=bool(ORIENTATIONS[ori_name].get("broken_geometry")))
            storage = {"format": "nifti", "path": rel.as_posix(), "nifti_header": header}
        else:
            name = stem
            rel = Path("volumes") / pid / f"{pid}_{scan}" / stem
            meta = {
                "PatientID": pid, "PatientSex": record.get("sex", ""), "PatientAge": f"{int(record.get('age', 0)):03d}Y",
                "StudyDate": acq["StudyDate"], "Manufacturer": acq["Manufacturer"],
                "ManufacturerModelName": acq["ManufacturerModelName"], "KVP": acq["KVP"],
                "XRayTubeCurrent": acq["XRayTubeCurrent"], "ExposureTime": acq["ExposureTime"], "ConvolutionKernel": kernel,
                "ReconstructionDiameter": recon.get("fov_diameter_mm", 0), "PatientPosition": patient_position,
                "SliceThickness": recon.get("slice_thickness_mm", grid["spacing_mm"][2]),
                "SeriesDescription": f"THORAX {_num(recon.get('slice_thickness_mm', grid['spacing_mm'][2]))} {kernel}",
                "SeriesNumber": r, "kernel": recon.get("kernel", ""),
            }
            series = write_dicom_series(out / rel, stored, a_lps, enc_name, meta, f"{stem}_{cseed}",
                                        np.random.default_rng([cseed, 0xD1C0, r]),
                                        padding_stored=q["padding_stored"] if q["num_padding"] else None,
                                        study_key=f"{pid}_{scan}_{cseed}")
            storage = {"format": "dicom", "path": rel.as_posix(), "dicom": series}
        storage["masks"] = _write_masks(out, rel, truth, grid, ori_name, anatomy=task.get("anatomy_masks", True))
        a_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ a_lps
        storage.update({
            "shape": [int(s) for s in stored.shape],
            "affine_lps": a_lps.tolist(),
            "affine_ras": a_ras.tolist(),
            "orientation": {"name": ori_name, "patient_position": patient_position, "flip_lps_axes": list(ORIENTATIONS[ori_name]["flip"]),
                            "image_orientation_patient": _iop(a_lps)},
            "anisotropic_pixel_spacing": bool(anisotropic),
            "broken_geometry": bool(ORIENTATIONS[ori_name].get("broken_geometry")),
        })
        row = _metadata_row(name, record, acq, recon, kernel, a_lps, stored.shape, facts, patient_position, grid)
        sidecar = {
            "VolumeName": name,
            "case_index": task["index"],
            "seeds": {"cohort": task["cohort_seed"], "case": cseed, "scanner": scanner_seed},
            "record": record,
            "grid": grid,
            "recon": recon,
            "acquisition": {k: v for k, v in acq.items() if k != "kernels"} | {"ConvolutionKernel": kernel},
            "encoding": facts,
            "hu_fixed_trap": facts["hu_fixed_trap"],
            "storage": storage,
            "labels": labels,
            "report": report,
            "metadata_row": row,
        }
        gt = out / "ground_truth" / f"{stem}.json"
        atomic_write_json(gt, _jsonable(sidecar), indent=1)
        rows.append({
            "metadata": row,
            "report": {"VolumeName": name, **report},
            "labels": {"VolumeName": name, **labels},
            "format": fmt, "encoding": enc_name, "orientation": ori_name, "masks": storage["masks"],
        })
    return rows


# ------------------------------------------------------------------------------------------------
# The cohort
# ------------------------------------------------------------------------------------------------


@contextmanager
def _single_threaded_children():
    """Workers inherit one BLAS/OpenMP thread each: the pool already uses every core asked for."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _write_csv(path: Path, columns, rows) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def generate_cohort(
    output_dir: str | os.PathLike,
    num_cases: int,
    seed: int = 0,
    geometry: str | dict = "demo",
    prevalence: str | dict = "ctrate",
    balanced: bool | float = False,
    encodings: list | dict | str | None = None,
    orientations: list | dict | str | None = None,
    dicom_fraction: float = 0.25,
    two_recon_fraction: float = 0.5,
    two_scan_fraction: float = 0.2,
    anisotropic_fraction: float = 0.05,
    label_noise: float = 0.0,
    num_workers: int = 2,
    split_prefix: str = "train",
    progress: bool = True,
    renderer: str | None = None,
    finding_masks: bool = True,
    anatomy_masks: bool = True,
) -> dict[str, Any]:
    """Generate a labelled synthetic chest-CT cohort in the CT-RATE layout.

    Every parameter is checked before anything is written: a bad value raises
    :class:`CohortConfigError` naming the parameter and leaves no file behind.

    Args:
        output_dir: cohort folder: new, empty, or an earlier generated cohort (which is replaced);
            a folder with other files is refused.
        num_cases: number of scans (case records); each has 1 or 2 reconstructions.
        seed: cohort seed; case ``i`` uses seeds derived from ``(seed, i)``.
        geometry: renderer geometry preset ("tests", "demo", "ctrate") or a grid dict.
        prevalence: "ctrate" or a dict CT-RATE label → probability (renderer's sampler).
        balanced: oversample findings (True or a per-label probability) for small test cohorts.
        encodings: storage encodings to draw from (names of :data:`ENCODINGS`, or name → weight);
            default :data:`DEFAULT_ENCODINGS`.
        orientations: stored orientations to draw from (names of :data:`ORIENTATIONS`, or name →
            weight); default :data:`DEFAULT_ORIENTATIONS`. Each format uses the ones it supports.
        dicom_fraction: share of reconstructions written as DICOM series.
        two_recon_fraction: share of scans with a second reconstruction.
        two_scan_fraction: share of patients with a second scan ``b``.
        anisotropic_fraction: share of scans with x ≠ y pixel spacing.
        label_noise: probability of flipping each label in labels.csv (the report still follows
            the findings, as CT-RATE's classifier-made labels do); the record lists the flips.
        num_workers: worker processes (1 = in this process); the output does not depend on it.
        split_prefix: first part of every name ("train" → ``train_12_a_1``).
        progress: show a tqdm progress bar.
        renderer: dotted module providing the renderer functions (default: found in
            ``chest_phantom``); lets tests substitute a stand-in.
        finding_masks: also write ``<stem>_findings.nii.gz`` beside every volume (int32, bit ``i`` = pathology ``i``
            of ``CTRATE_PATHOLOGIES``, the findings as drawn). The anatomical label map ``<stem>_seg.nii.gz`` and
            ``anatomy_labels.json`` are written unless ``anatomy_masks`` is off. The volumes are the same either way.
        anatomy_masks: write the anatomical label map ``<stem>_seg.nii.gz`` beside every volume and
            ``anatomy_labels.json`` (when the renderer draws anatomy). With both flags off the cohort has no masks
            and takes about 0.1 s less per case to write.

    Returns:
        summary dict: counts of patients/scans/volumes, formats, encodings, orientations, label
        counts per pathology, seconds, file paths. Also written to ``output_dir/cohort.json``.

    Raises:
        CohortConfigError: invalid parameter (named in the message); nothing written.
        RuntimeError: a case failed while rendering or writing (names the case and its seed).
    """
    t0 = time.perf_counter()
    cfg = _validate(output_dir, num_cases, seed, geometry, prevalence, balanced, encodings, orientations, dicom_fraction,
                    two_recon_fraction, two_scan_fraction, anisotropic_fraction, label_noise, num_workers, split_prefix,
                    renderer, finding_masks, anatomy_masks)
    out = Path(output_dir).resolve()
    _clear_previous(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    cases = plan_cases(int(num_cases), int(seed), cfg["two_scan_fraction"], split_prefix)
    common = {
        "output_dir": str(out), "geometry": geometry, "prevalence": prevalence, "balanced": balanced,
        "encodings": cfg["encodings"], "orientations": cfg["orientations"], "dicom_fraction": cfg["dicom_fraction"],
        "two_recon_fraction": cfg["two_recon_fraction"], "anisotropic_fraction": cfg["anisotropic_fraction"],
        "renderer": renderer, "cohort_seed": int(seed), "label_noise": cfg["label_noise"],
        "finding_masks": finding_masks, "anatomy_masks": anatomy_masks,
    }
    tasks = [dict(common, **c) for c in cases]
    results: dict[int, list[dict]] = {}
    bar = tqdm(total=len(tasks), desc="synthetic cohort", unit="scan", disable=not progress)
    try:
        if num_workers == 1:
            for t in tasks:
                results[t["index"]] = _generate_case(t)
                bar.update(1)
        else:
            # spawn: never fork a process that may hold torch/OpenMP threads (bundle runs import torch).
            with _single_threaded_children(), ProcessPoolExecutor(max_workers=min(int(num_workers), len(tasks)),
                                                                  mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_generate_case, t): t["index"] for t in tasks}
                try:
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                        bar.update(1)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()

    rows = [row for i in sorted(results) for row in results[i]]
    masks = Counter(k for r in rows for k in r["masks"] if k != "label_table")
    if masks.get("seg"):
        atomic_write_json(out / LABEL_TABLE_FILE, label_table(), indent=1)
    _write_csv(out / "metadata.csv", METADATA_COLUMNS, [r["metadata"] for r in rows])
    _write_csv(out / "reports.csv", REPORT_COLUMNS, [r["report"] for r in rows])
    _write_csv(out / "labels.csv", LABEL_COLUMNS, [r["labels"] for r in rows])
    label_counts = {name: int(sum(r["labels"][name] for r in rows)) for name in CTRATE_PATHOLOGIES}
    summary = {
        "output_dir": str(out),
        "num_patients": len({c["patient_id"] for c in cases}),
        "num_scans": len(cases),
        "num_volumes": len(rows),
        "formats": dict(Counter(r["format"] for r in rows)),
        "encodings": dict(Counter(r["encoding"] for r in rows)),
        "orientations": dict(Counter(r["orientation"] for r in rows)),
        "masks": {"seg": masks.get("seg", 0), "findings": masks.get("findings", 0)},
        "label_counts_per_volume": label_counts,
        "seconds": round(time.perf_counter() - t0, 2),
        "files": {"metadata": "metadata.csv", "reports": "reports.csv", "labels": "labels.csv",
                  "volumes": "volumes/", "ground_truth": "ground_truth/",
                  **({"label_table": LABEL_TABLE_FILE} if masks.get("seg") else {})},
    }
    manifest = {
        "parameters": {"num_cases": int(num_cases), "seed": int(seed), "geometry": geometry, "prevalence": prevalence,
                       "balanced": balanced, "split_prefix": split_prefix, "finding_masks": finding_masks,
                       "anatomy_masks": anatomy_masks,
                       **{k: cfg[k] for k in cfg}},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, **_versions()},
        "summary": {k: v for k, v in summary.items() if k not in ("seconds", "output_dir")},
    }
    atomic_write_json(out / "cohort.json", _jsonable(manifest), indent=1)
    return summary


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("nibabel", "isal", "pydicom", "ctclip-monai"):  # isal: it writes the .nii.gz bytes
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


if __name__ == "__main__":  # pragma: no cover - convenience: python -m chest_phantom.cohort OUT N
    fire.Fire(generate_cohort)
