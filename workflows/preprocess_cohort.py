"""The preprocessing stage: a cohort (CT-RATE layout or a folder of NIfTI files and DICOM series) to
int16 HU RAS volumes, ``datalist.json``, ``qc.csv`` and ``manifest.json``.

Masks found beside a volume (``<stem>_seg.nii.gz`` anatomical label map or a ``<stem>_seg/`` folder of one file per
structure, ``<stem>_findings.nii.gz`` finding bits: :mod:`ctclip_contract.anatomy`) go through exactly the volume's
reorientation, spacing (nearest neighbour) and crop/pad and are written beside it as ``<name>_seg.nii.gz`` (uint8, our
region ids) and ``<name>_findings.nii.gz`` (int32); the datalist entries, records, manifest and qc.csv name them
(``seg``, ``findings_mask``: an entry's ``findings`` is the report text). A
bad mask (missing, another grid, labels outside its table) is dropped with its reason; the volume goes on.

Run by an Ignite engine over a DataLoader (workers do the heavy lifting and write their outputs);
sharded by global rank under ``torchrun`` (rank ``r`` of ``w`` takes every ``w``-th volume of the
sorted list); resumable (a finished volume has a record whose parameters hash and output checksum
are verified before it is skipped); atomic (:func:`ctclip_contract.atomic_path`); bad inputs become qc rows,
or stop the run at the first one in strict mode.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from nibabel.orientations import aff2axcodes

from ctclip_contract import (atomic_write_json, file_sha256, is_environment_fault, load_model_config,
                             output_folder_lock)
from ctclip_contract.anatomy import (ANATOMY_LABELS, FINDINGS_SUFFIX, LABEL_TABLE_FILE, REGION_IDS, SEG_SUFFIX,
                                     read_label_table, read_region_mapping)
from transforms.ctrate import datalist_from_records, split_patients
from transforms.discovery import discover_inputs
from transforms.io import read_label_volume, save_nifti_atomic
from transforms.preprocessing import MASK_DTYPES, StreamedPreprocessing, build_preprocessing
from transforms.qc import (DEFAULT_MAX_READ_BYTES, QualityCheckError, align_mask_to_image, check_finding_bits,
                           check_input, check_mask_labels, padding_range)

from .writers import write_csv_rows

__all__ = ["build_preprocessing", "CTPreprocessor", "QC_COLUMNS", "PIPELINE_VERSION"]

PIPELINE_VERSION = "2"  # 2: nibabel NIfTI reader, DICOM padding masked to pad_hu, grid_sample in-plane
logger = logging.getLogger("ct_preprocess")

QC_COLUMNS = (
    "name", "input", "status", "reason", "hu_decision", "hu_slope", "hu_intercept",
    "air_lung_fraction", "soft_tissue_fraction", "input_shape", "input_spacing_mm", "input_orientation",
    "output", "warning",
)
#: qc.csv columns added when the cohort has masks (a cohort without them keeps the table it always had)
MASK_QC_COLUMNS = ("seg", "findings_mask", "mask_reason")
_MASK_SUFFIX = {"seg": SEG_SUFFIX, "findings_mask": FINDINGS_SUFFIX}



def input_identity(path: str | os.PathLike) -> str:
    """What a finished volume's record remembers of its input, to notice a changed input on resume: the name, size
    and modification time of the file, or of every file of a DICOM series folder (a slice added, removed or
    rewritten), and for a single file also the sha256 of its first and last 64 KiB. Cheap: a resume check reads no
    slice of a series and 128 KiB of a NIfTI file."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    if not path.is_dir():
        with open(path, "rb") as fh:
            h.update(fh.read(1 << 16))
            if files[0].stat().st_size > 2 << 16:
                fh.seek(-(1 << 16), os.SEEK_END)
                h.update(fh.read(1 << 16))
    return h.hexdigest()


def _geometry_from_metadata(geom: Mapping[str, Any], shape: Sequence[int] | None = None) -> np.ndarray | None:
    """RAS affine of voxel ``(i, j, k)`` from a CT-RATE metadata row, for NIfTI files written without
    orientation (sform_code and qform_code 0, as the original CT-RATE release): voxel i along the
    ImageOrientationPatient row direction (spacing ``XYSpacing[1]``, between columns), j along the
    column direction (``XYSpacing[0]``, between rows), k along their cross product (``ZSpacing``),
    voxel (0, 0, 0) at ImagePositionPatient. None when the row lacks any of these."""
    try:
        xy = [float(v) for v in geom["XYSpacing"]]
        z = float(geom["ZSpacing"])
        iop = np.asarray(geom["ImageOrientationPatient"], dtype=np.float64)
        ipp = np.asarray(geom["ImagePositionPatient"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if not xy or iop.shape != (6,) or ipp.shape != (3,) or not (np.all(np.isfinite(iop)) and np.all(np.isfinite(ipp))):
        return None
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 0.5:
        return None
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * xy[1 % len(xy)], col * xy[0], normal / np.linalg.norm(normal) * z
    lps[:3, 3] = ipp
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _compact_hu(prov: Mapping[str, Any]) -> dict[str, Any]:
    ev = prov["evidence"].get(prov["decision"], {})
    return {
        "source": prov["source"], "decision": prov["decision"], "slope": prov["slope"],
        "intercept": prov["intercept"], "floored_fraction": round(float(prov["floored_fraction"]), 6),
        "evidence": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                     for k, v in prov["evidence"].items()},
        "air_lung_fraction": round(float(ev.get("air_lung", float("nan"))), 4),
        "soft_tissue_fraction": round(float(ev.get("soft_tissue", float("nan"))), 4),
        **({"padding": {"range": prov["padding"]["range"], "fraction": round(float(prov["padding"]["fraction"]), 6),
                        "hu": prov["padding"]["hu"]}} if "padding" in prov else {}),
    }


class _VolumeDataset(torch.utils.data.Dataset):
    """Processes one volume per item (in the DataLoader worker) and returns its record."""

    def __init__(self, items: Sequence[dict], runner: CTPreprocessor) -> None:
        self.items, self.runner = list(items), runner

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.runner.process_item(self.items[i])


class CTPreprocessor:
    """Preprocess a cohort folder into ``output_dir`` (see module docstring).

    Args:
        input_dir: cohort in CT-RATE layout (tables + volumes) or a folder of NIfTI/DICOM inputs.
        output_dir: where ``volumes/``, ``datalist.json``, ``qc.csv``, ``manifest.json`` go.
        model_config: model config name/path/dict; its ``input`` section gives spacing, size, pad.
        spacing_mm, spatial_size, pad_hu: explicit overrides of the model config.
        hu_source: ``"auto"``, ``"header"`` or ``"metadata"`` (see ``RescaleToHUd``).
        qc: keyword arguments of ``CTQualityCheckd`` (``min_slices``, ``max_voxels`` ...).
        split_fractions: training/validation/test fractions, by patient.
        seed: split seed.
        patient_pattern: regex for the patient id in a volume name.
        num_workers: DataLoader workers per process.
        strict: stop at the first bad input instead of recording it.
        resume: skip volumes whose verified outputs already exist.
        progress: show a progress bar (rank 0).
        resampler: ``"separable"`` (fast, same grid as Spacingd) or ``"monai"`` (Spacingd).
        seg_mapping: JSON mapping file of a user's own segmentation onto our regions
            (:func:`ctclip_contract.anatomy.read_region_mapping`: ``{"regions": {their name: our region},
            "labels": {their id: their name}}``); default: label maps already in our regions (their
            ``anatomy_labels.json`` names them), or per-structure TotalSegmentator folders mapped by
            ``TOTALSEGMENTATOR_TO_REGION``.
    """

    def __init__(
        self,
        input_dir: str,
        output_dir: str,
        model_config: str | Mapping = "ctclip_v2",
        spacing_mm: Sequence[float] | None = None,
        spatial_size: Sequence[int] | None = None,
        pad_hu: float | None = None,
        hu_source: str = "auto",
        qc: Mapping[str, Any] | None = None,
        split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        patient_pattern: str | None = None,
        num_workers: int = 0,
        strict: bool = False,
        resume: bool = True,
        progress: bool = True,
        resampler: str = "separable",
        seg_mapping: str | None = None,
    ) -> None:
        cfg = load_model_config(model_config)
        inp = cfg.input
        self.input_dir = Path(input_dir).resolve()
        self.output_dir = Path(output_dir).resolve()
        self.params = {
            "model_config": cfg.name,
            "spacing_mm": [float(v) for v in (spacing_mm if spacing_mm is not None else inp.spacing_mm)],
            "spatial_size": [int(v) for v in (spatial_size if spatial_size is not None else inp.spatial_size)],
            "pad_hu": float(pad_hu if pad_hu is not None else inp.pad_hu),
            "hu_source": hu_source,
            # defaults filled in, so that spelling a default out does not change the parameters hash
            "qc": {"min_slices": 8, "spacing_range_mm": [0.05, 15.0], "max_voxels": 1024 * 1024 * 2048,
                   "max_obliquity_deg": 1.0, "check_hu": True,
                   **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(qc or {}).items()}},
            "resampler": resampler,
            "axes": "RAS",
            "dtype": "int16",
            "pipeline_version": PIPELINE_VERSION,
        }
        self.mapping = None
        if seg_mapping:  # only then in the parameters: a run without one hashes as it always did
            self.mapping = read_region_mapping(seg_mapping)
            self.params["seg_mapping"] = {"path": str(Path(seg_mapping).resolve()),
                                          "sha256": file_sha256(Path(seg_mapping))}
        self.split = {"fractions": [float(f) for f in split_fractions], "seed": int(seed),
                      "patient_pattern": patient_pattern}
        # the read bound only decides which inputs are refused (and refused inputs are always retried), never what an
        # accepted volume looks like: it stays out of the hash, so that finished volumes are not redone for it
        hashed = {**self.params, "qc": {k: v for k, v in self.params["qc"].items() if k != "max_bytes"}}
        self.params_hash = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
        self.num_workers = int(num_workers)
        self.strict = bool(strict)
        self.resume = bool(resume)
        self.progress = bool(progress)
        self._chains = None
        self._preprocessing = None
        self.rank = 0

    # -- one volume ----------------------------------------------------------------------------
    @property
    def chains(self):
        if self._chains is None:
            p = self.params
            self._chains = build_preprocessing(p["spacing_mm"], p["spatial_size"], p["pad_hu"], p["hu_source"],
                                               p["qc"], p["resampler"])
        return self._chains

    @property
    def preprocessing(self) -> StreamedPreprocessing:
        """``process(load(data))`` of :attr:`chains`, a NIfTI volume resampled while it is read."""
        if self._preprocessing is None:
            self._preprocessing = StreamedPreprocessing(*self.chains)
        return self._preprocessing

    def _paths(self, name: str) -> tuple[Path, Path]:
        vol_dir, rec_dir = self.output_dir / "volumes", self.output_dir / "records"
        vol, rec = (vol_dir / f"{name}.nii.gz").resolve(), (rec_dir / f"{name}.json").resolve()
        # Defence in depth: names are checked at discovery, but nothing may land outside OUT.
        if vol.parent != vol_dir.resolve() or rec.parent != rec_dir.resolve():
            raise QualityCheckError(f"{name!r}: output path escapes the output folder")
        return vol, rec

    def _finished(self, item: dict) -> dict | None:
        """The record of a volume finished by an earlier run, or None when it must be (re)done: no record, other
        parameters, a changed output, or a changed input (replaced, truncated, a slice added or removed)."""
        vol, rec = self._paths(item["name"])
        if not (self.resume and rec.is_file() and vol.is_file()):
            return None
        try:
            record = json.loads(rec.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if (record.get("status") != "ok" or record.get("params_hash") != self.params_hash
                or record.get("input") != item["input"] or record.get("input_identity") != input_identity(item["path"])
                or record.get("sha256") != file_sha256(vol)):
            return None
        if record.get("mask_inputs", {}) != self._mask_identities(item):
            return None
        for key in MASK_DTYPES:
            if record.get(key) and (not (self.output_dir / record[key]).is_file()
                                    or record.get(f"{key}_sha256") != file_sha256(self.output_dir / record[key])):
                return None
        return record

    @staticmethod
    def _mask_identities(item: dict) -> dict:
        """What a record remembers of the item's mask inputs (a mask added, replaced or removed redoes the volume)."""
        return {key: input_identity(item[key]) for key in MASK_DTYPES
                if item.get(key) and os.path.exists(item[key])}

    def _rel_input(self, path: str | os.PathLike) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.input_dir))
        except ValueError:
            return str(path)

    def _read_seg(self, path: str, rel: str, item: dict) -> tuple[np.ndarray, np.ndarray]:
        """A label map (file, or folder of one mask per structure) in our region ids: ``(uint8 (k, j, i), affine)``."""
        regions = (self.mapping or read_region_mapping())["regions"]
        if os.path.isdir(path):  # TotalSegmentator's layout: <structure>.nii.gz, one binary mask each
            out, affine, used = None, None, 0
            for f in sorted(Path(path).iterdir()):
                name = f.name.split(".nii")[0]
                if not f.name.lower().endswith((".nii", ".nii.gz")):
                    continue
                ours = regions.get(name, REGION_IDS.get(name) if self.mapping is None else None)
                arr, aff = read_label_volume(f)
                if out is None:
                    out, affine = np.zeros(arr.shape, np.uint8), aff
                else:
                    arr = align_mask_to_image(arr, aff, out.shape, affine, f"{rel}/{f.name}")
                if ours:
                    out[arr > 0] = ours
                    used += 1
            if out is None or not used:
                raise QualityCheckError(f"{rel}: no structure file maps to one of our regions (name them as "
                                        "TotalSegmentator does, or give a seg_mapping file)")
            return out, affine
        arr, affine = read_label_volume(path)
        if self.mapping is not None and self.mapping["labels"] is not None:
            table, table_name = self.mapping["labels"], Path(self.mapping["path"]).name
        elif item.get("label_table"):
            table, table_name = read_label_table(item["label_table"]), LABEL_TABLE_FILE
        else:
            table, table_name = ANATOMY_LABELS, f"of our regions ({LABEL_TABLE_FILE})"
        check_mask_labels(np.unique(arr), table, rel, table_name)
        if table == ANATOMY_LABELS:
            return arr.astype(np.uint8), affine
        lut = np.zeros(max(table) + 1, np.uint8)
        for their_id, name in table.items():
            ours = regions.get(name) if self.mapping is not None else REGION_IDS.get(name)
            if ours is None and self.mapping is None:
                raise QualityCheckError(f"{rel}: label {their_id} ({name}) of {table_name} is not one of our regions; "
                                        "map it with a seg_mapping file")
            lut[their_id] = ours or 0
        return lut[arr], affine

    def _load_masks(self, item: dict, img: MetaTensor) -> tuple[dict, list[str]]:
        """The item's masks on the image's grid (channel-first MetaTensors with the image's affine), and the reason
        of each mask that cannot be used."""
        issues = list(item.get("mask_issues", []))
        masks = {}
        affine = np.asarray(img.affine, dtype=np.float64)
        for key, dtype in MASK_DTYPES.items():
            path = item.get(key)
            if not path:
                continue
            rel = self._rel_input(path)
            try:
                if not os.path.exists(path):
                    raise QualityCheckError(f"{rel}: missing")
                if key == "seg":
                    arr, aff = self._read_seg(path, rel, item)
                else:
                    arr, aff = read_label_volume(path)
                    check_finding_bits(np.unique(arr), rel)
                arr = align_mask_to_image(arr.astype(dtype, copy=False), aff, img.shape[1:], affine, rel)
                masks[key] = MetaTensor(torch.from_numpy(arr)[None], affine=img.affine.clone(),
                                        meta={"filename_or_obj": path})
            except Exception as e:  # noqa: BLE001 - a bad mask is dropped with its reason, the volume goes on
                if is_environment_fault(e):
                    raise
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                msg = msg.replace(str(path), rel)
                issues.append(msg if rel in msg else f"{rel}: {msg}")
        return masks, issues

    def preprocess_volume(self, item: dict) -> tuple[MetaTensor, dict]:
        """Read, check and preprocess one volume (no file written).

        Returns:
            ``(volume, facts)``: the int16 ``(1, X, Y, Z)`` RAS volume and the record fields
            (``input_shape``, ``input_spacing_mm``, ``input_orientation``, ``hu``, ``warning``), with ``masks``
            (the item's masks on the output grid: ``{"seg": uint8, "findings_mask": int32}``, those that passed) and
            ``mask_issues`` (why the others were dropped).

        Raises:
            Exception: any failure of this input (header checks, reading, QC, HU decision).
        """
        facts: dict[str, Any] = {}
        warnings = [item.get("warning", "")]
        # the reader keeps NaN (ITK turned it into 0), so the structural QC finds it: no second read here
        header = check_input(item["path"], max_voxels=self.params["qc"].get("max_voxels"), check_finite=False,
                             max_bytes=self.params["qc"].get("max_bytes", DEFAULT_MAX_READ_BYTES))
        if header.get("ignored_files"):
            warnings.append(f"ignored {len(header['ignored_files'])} file(s) in the series folder that are not DICOM "
                            f"slices: {', '.join(header['ignored_files'][:5])}")
        restore_geometry = header["kind"] == "nifti" and header["sform_code"] == 0 and header["qform_code"] == 0
        with_masks = any(item.get(k) for k in (*MASK_DTYPES, "mask_issues"))
        masks: dict = {}
        facts["mask_issues"] = []

        def loaded(data: dict) -> None:
            img = data["image"]
            if restore_geometry:
                affine = _geometry_from_metadata(item.get("meta_geometry") or {})
                if affine is None:
                    raise QualityCheckError(f"{item['input']}: no orientation in the NIfTI header "
                                            "(sform_code and qform_code 0) and no metadata row to restore it")
                affine[:, :3] = affine[:, :3][:, ::-1]  # the reader's arrays are (k, j, i)
                img.affine = torch.as_tensor(affine.copy())
                warnings.append("geometry restored from metadata")
            # masks join the image here, on its (restored) grid, and follow it through the same geometry
            if with_masks:
                found, facts["mask_issues"] = self._load_masks(item, img)
                masks.update(found)
                data.update(found)
            # reported in the file's own voxel order (the reader hands out (k, j, i))
            facts["input_shape"] = "x".join(str(int(s)) for s in img.shape[1:][::-1])
            if isinstance(img, MetaTensor) and img.ndim == 4:
                aff = np.asarray(img.affine, dtype=np.float64)
                facts["input_spacing_mm"] = "x".join(f"{s:.4g}" for s in affine_to_spacing(aff, 3)[::-1])
                codes = aff2axcodes(aff, labels=(("L", "R"), ("P", "A"), ("I", "S")))
                facts["input_orientation"] = "".join(str(c) for c in codes[::-1])

        # the resampling follows the read (same result; see StreamedPreprocessing) unless the image's grid or the
        # data change between the two
        data = self.preprocessing({"image": item["path"], "name": item["name"],
                                   "rescale_slope": item.get("rescale_slope"),
                                   "rescale_intercept": item.get("rescale_intercept"),
                                   "pixel_padding": padding_range(header)},
                                  loaded=loaded, stream=not (restore_geometry or with_masks))
        facts["hu"] = _compact_hu(data["hu_provenance"])
        facts["warning"] = "; ".join(filter(None, warnings))
        facts["masks"] = {k: data[k] for k in masks}
        return data["image"], facts

    def process_item(self, item: dict) -> dict:
        """Preprocess one volume and write its outputs; never raises for bad input (status in record).

        Raises:
            OSError, MemoryError: a fault of the machine (full disk, read-only, no permission, out of memory,
                :func:`ctclip_contract.is_environment_fault`) stops the run: the input is not to blame, and a rerun
                once the machine is fixed resumes after the finished volumes.
        """
        record = self._finished(item)
        if record is not None:
            record["_resumed"] = True
            return record
        record = {"name": item["name"], "input": item["input"], "params_hash": self.params_hash,
                  "input_identity": input_identity(item["path"]), "warning": item.get("warning", ""),
                  "rank": self.rank}
        try:
            vol, rec = self._paths(item["name"])
            out, facts = self.preprocess_volume(item)
            masks, issues = facts.pop("masks"), facts.pop("mask_issues")
            if issues and self.strict:
                raise QualityCheckError(issues[0])
            record.update(facts)
            vol.parent.mkdir(parents=True, exist_ok=True)
            save_nifti_atomic(out, np.asarray(out.affine, dtype=np.float64), vol)
            record.update(status="ok", reason="", output=f"volumes/{vol.name}",
                          output_shape=list(int(s) for s in out.shape[1:]), sha256=file_sha256(vol))
            self._write_masks(item, record, out, masks, issues)
        except Exception as e:  # noqa: BLE001 - any failure of one input is a qc row, not a crash
            if is_environment_fault(e):
                raise
            while isinstance(e, RuntimeError) and e.__cause__ is not None:  # unwrap MONAI's wrapping
                e = e.__cause__
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = reason.replace(item["path"], item["input"])  # qc.csv independent of where IN lives
            if item["input"] not in reason and item["name"] not in reason:
                reason = f"{item['input']}: {reason}"
            record.update(status="rejected", reason=reason, output="")
            self._paths(item["name"])[0].unlink(missing_ok=True)  # an earlier run's volume of a now-bad input
            for key in MASK_DTYPES:
                self._mask_path(item["name"], key).unlink(missing_ok=True)
            if self.strict:
                raise QualityCheckError(reason) from e
        rec_path = self._paths(item["name"])[1]
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rec_path, record)
        return record

    def _mask_path(self, name: str, key: str) -> Path:
        return self._paths(name)[0].with_name(f"{name}{_MASK_SUFFIX[key]}.nii.gz")

    def _write_masks(self, item: dict, record: dict, out: MetaTensor, masks: dict, issues: list[str]) -> None:
        """Write the masks beside the volume and note them (and why any was dropped) in the record."""
        mask_inputs = self._mask_identities(item)
        if mask_inputs:
            record["mask_inputs"] = mask_inputs
        for key in MASK_DTYPES:
            path = self._mask_path(item["name"], key)
            t = masks.get(key)
            if t is None:
                path.unlink(missing_ok=True)  # an earlier run's mask of a now-bad or removed input
                continue
            if tuple(t.shape) != tuple(out.shape) or not np.allclose(np.asarray(t.affine), np.asarray(out.affine),
                                                                     atol=1e-4):
                raise RuntimeError(f"{item['input']}: the {key} mask left the image's grid (a pipeline bug)")
            save_nifti_atomic(t, np.asarray(out.affine, dtype=np.float64), path, dtype=np.dtype(MASK_DTYPES[key]))
            record[key] = f"volumes/{path.name}"
            record[f"{key}_sha256"] = file_sha256(path)
        if issues:
            record["mask_reason"] = "; ".join(issues)
            logger.warning("mask dropped: %s", record["mask_reason"])

    # -- the run -------------------------------------------------------------------------------
    @staticmethod
    def _dist() -> tuple[int, int]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
        return rank, world

    def run(self) -> dict[str, Any]:
        """Process this rank's share, then (rank 0) write ``qc.csv``, ``datalist.json``, ``manifest.json``.

        Returns:
            A summary: ``{"rank", "world_size", "processed", "resumed", "ok", "rejected"}`` (this rank).
        """
        rank, world = self._dist()
        self.rank = rank
        lock = output_folder_lock(self.output_dir, rank)  # a second run into this folder stops here, at once
        try:
            return self._run(rank, world)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, rank: int, world: int) -> dict[str, Any]:
        items, rejected = discover_inputs(self.input_dir, self.split["patient_pattern"], exclude=[self.output_dir])
        if not items and not rejected:
            logger.warning(f"no NIfTI file or DICOM series found in {self.input_dir}: nothing to preprocess")
        if self.strict and rejected:
            raise QualityCheckError(rejected[0]["reason"])
        mine = items[rank::world]
        for sub in ("volumes", "records"):
            (self.output_dir / sub).mkdir(parents=True, exist_ok=True)
        loader = torch.utils.data.DataLoader(
            _VolumeDataset(mine, self), batch_size=1, num_workers=self.num_workers, collate_fn=lambda b: b[0],
            shuffle=False,
        )
        summary = {"rank": rank, "world_size": world, "processed": [], "resumed": 0, "ok": 0, "rejected": 0}

        def step(engine, record):
            summary["processed"].append(record["name"])
            summary["resumed"] += int(bool(record.get("_resumed")))
            summary["ok" if record["status"] == "ok" else "rejected"] += 1
            if record["status"] != "ok":
                logger.warning("rejected %s", record["reason"])
            return record

        engine = Engine(step)
        if self.progress and rank == 0 and mine:
            ProgressBar(persist=True, desc=f"preprocess rank {rank}/{world}").attach(engine)
        if mine:
            engine.run(loader, max_epochs=1)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if rank == 0:
            self.finalize(items, rejected)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return summary

    def finalize(self, items: Sequence[dict], rejected: Sequence[dict]) -> None:
        """Merge the per-volume records into ``qc.csv``, ``datalist.json`` and ``manifest.json``."""
        rows, records = [], []
        for item in items:
            rec_path = self._paths(item["name"])[1]
            try:
                record = json.loads(rec_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                record = {"name": item["name"], "input": item["input"], "status": "rejected",
                          "reason": f"{item['input']}: not processed (no record; did a rank fail?)"}
            record.pop("_resumed", None)
            records.append((item, record))
        for row in rejected:
            rows.append({k: row.get(k, "") for k in QC_COLUMNS})
        for item, r in records:
            hu = r.get("hu", {})
            rows.append({
                "name": r["name"], "input": r["input"], "status": r["status"], "reason": r.get("reason", ""),
                "hu_decision": hu.get("decision", ""), "hu_slope": hu.get("slope", ""),
                "hu_intercept": hu.get("intercept", ""), "air_lung_fraction": hu.get("air_lung_fraction", ""),
                "soft_tissue_fraction": hu.get("soft_tissue_fraction", ""),
                "input_shape": r.get("input_shape", ""), "input_spacing_mm": r.get("input_spacing_mm", ""),
                "input_orientation": r.get("input_orientation", ""), "output": r.get("output", ""),
                "warning": r.get("warning", ""),
            })
        with_masks = any(r.get("mask_inputs") or r.get("mask_reason") for _, r in records) or \
            any(it.get(k) for it in items for k in (*MASK_DTYPES, "mask_issues"))
        if with_masks:
            by_name = {r["name"]: r for _, r in records}
            for row in rows:
                r = by_name.get(row["name"], {})
                row.update({k: r.get(k, "") for k in MASK_QC_COLUMNS})
        rows.sort(key=lambda r: (r["name"], r["input"]))
        write_csv_rows(self.output_dir / "qc.csv", rows, QC_COLUMNS + (MASK_QC_COLUMNS if with_masks else ()))

        # Split over every discovered patient, so a fixed input later does not reshuffle the others.
        split_of = split_patients([it["patient"] for it in items], self.split["fractions"], self.split["seed"])
        ok = [dict(item, image=r["output"]) for item, r in records if r["status"] == "ok"]
        datalist = datalist_from_records(ok, split_of)
        masks_of = {r["name"]: {k: r[k] for k in MASK_DTYPES if r.get(k)} for _, r in records if r["status"] == "ok"}
        for entries in datalist.values():
            for entry in entries:
                entry.update(masks_of.get(entry["name"], {}))
        atomic_write_json(self.output_dir / "datalist.json", datalist)
        atomic_write_json(self.output_dir / "manifest.json", self.manifest(records, rejected, datalist))
        for stale in (self.output_dir / "volumes").glob(".*.tmp*"):  # leftovers of killed runs
            stale.unlink(missing_ok=True)

    def manifest(self, records, rejected, datalist) -> dict[str, Any]:
        """Parameters, versions, counts and per-volume decisions (no timestamps: reruns compare equal)."""
        def version(pkg):
            try:
                return md.version(pkg)
            except md.PackageNotFoundError:
                return None

        return {
            "stage": "ct_preprocess",
            "input_dir": str(self.input_dir),
            "parameters": self.params,
            "params_hash": self.params_hash,
            "split": self.split,
            "versions": {"python": platform.python_version(), **{p: version(p) for p in (
                "ctclip-monai", "monai", "torch", "pytorch-ignite", "itk", "nibabel", "isal", "pydicom", "numpy")}},
            "counts": {
                "inputs": len(records) + len(rejected),
                "ok": sum(r["status"] == "ok" for _, r in records),
                "rejected": sum(r["status"] != "ok" for _, r in records) + len(rejected),
                **{k: len(v) for k, v in datalist.items()},
            },
            "volumes": {r["name"]: {"input": r["input"], "status": r["status"], "reason": r.get("reason", ""),
                                    "hu": r.get("hu"), "output_shape": r.get("output_shape"),
                                    "sha256": r.get("sha256"),
                                    **{k: r[k] for k in ("seg", "seg_sha256", "findings_mask", "findings_mask_sha256",
                                                         "mask_reason") if r.get(k)}} for _, r in records},
        }


def main(**kwargs) -> dict[str, Any]:
    """Command line: ``python -m workflows.preprocess_cohort --input_dir IN --output_dir OUT [...]``."""
    return CTPreprocessor(**kwargs).run()


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    fire.Fire(main)
