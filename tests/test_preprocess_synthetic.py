"""Preprocessing on data written by the synthetic generator (chest_phantom): its storage
writers (every NIfTI encoding and orientation, DICOM series) and a generated cohort at the "tests"
geometry with its sidecars."""

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_preprocess_phantom import NODULE_LPS, ORIGIN_LPS, SHAPE, SPACING, lps_grid, phantom_hu  # noqa: E402

enc = pytest.importorskip("chest_phantom.encoding")
from workflows.preprocess_cohort import CTPreprocessor  # noqa: E402


def _grid():
    return {"shape": list(SHAPE), "spacing_mm": list(SPACING), "origin_mm": list(ORIGIN_LPS)}


def test_generator_encodings_and_orientations_give_the_same_volume(tmp_path):
    """The same phantom through every NIfTI encoding x orientation of the generator (and the
    metadata CSV for encodings whose rescale lives only there) -> one preprocessed volume."""
    hu = phantom_hu(lps_grid()).astype(np.float32)
    inp = tmp_path / "in"
    (inp / "volumes").mkdir(parents=True)
    rows = []
    names = []
    for e, spec in enc.ENCODINGS.items():
        if "nifti" not in spec["formats"]:
            continue
        q = enc.quantise(hu, e)
        for o, ospec in enc.ORIENTATIONS.items():
            if "nifti" not in ospec["formats"]:
                continue
            name = f"{e}-{o}".replace("_", "")
            stored, aff = enc.orient(q["stored"], _grid(), o)
            enc.write_nifti(inp / "volumes" / f"{name}.nii.gz", stored, aff, e)
            rows.append({"VolumeName": f"{name}.nii.gz", "RescaleSlope": spec.get("row_slope", spec["slope"]),
                         "RescaleIntercept": spec.get("row_intercept", spec["intercept"]),
                         "XYSpacing": "[5.0, 5.0]", "ZSpacing": "6.0"})
            names.append((name, e))
    with open(inp / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    summary = CTPreprocessor(str(inp), str(out), "ctclip_tiny", spatial_size=[40, 36, 32], progress=False).run()
    assert summary["ok"] == len(names) and summary["rejected"] == 0
    ref = None
    for name, e in names:
        img = nib.load(str(out / "volumes" / f"{name}.nii.gz"))
        arr = np.asarray(img.dataobj).astype(np.float64)
        assert arr.shape == (40, 36, 32) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [8.0, 8.0, 10.0])
        if ref is None:
            ref, ref_aff = arr, img.affine
        np.testing.assert_allclose(img.affine, ref_aff, atol=1e-4)
        assert np.abs(arr - ref).mean() <= 2.0, name  # slope-2 encodings lose 1 HU
        # the nodule is where the "sidecar" says (patient left, LPS x = +40)
        ijk = np.round(np.linalg.solve(img.affine, [*(NODULE_LPS * [-1, -1, 1]), 1.0])[:3]).astype(int)
        assert arr[tuple(ijk)] > 150, name
    rec = json.loads((out / "manifest.json").read_text())["volumes"]
    for name, e in names:
        want = "metadata" if e == "int16_offset_raw" else "header"  # _fixed trap: header, not -1024 again
        assert rec[name]["hu"]["decision"] == want, (name, rec[name]["hu"])


def test_generated_cohort_preprocesses_to_ras_target_geometry(tmp_path):
    cohort = pytest.importorskip("chest_phantom.cohort")
    inp = tmp_path / "in"
    cohort.generate_cohort(str(inp), 3, seed=1, geometry="tests", dicom_fraction=0.4, num_workers=1, progress=False,
                           encodings=list(enc.ENCODINGS), orientations=list(enc.ORIENTATIONS))
    sidecars = {p.stem: json.loads(p.read_text()) for p in (inp / "ground_truth").glob("*.json")}
    out = tmp_path / "out"
    summary = CTPreprocessor(str(inp), str(out), "ctclip_tiny", spatial_size=[48, 48, 32], progress=False).run()
    assert summary["rejected"] == 0 and summary["ok"] == len(sidecars)
    with open(out / "qc.csv", newline="") as f:
        qc_rows = list(csv.DictReader(f))
    assert sorted(r["name"] for r in qc_rows) == sorted(sidecars) and {r["status"] for r in qc_rows} == {"ok"}
    man = json.loads((out / "manifest.json").read_text())["volumes"]
    dl = json.loads((out / "datalist.json").read_text())
    items = {it["name"]: it for v in dl.values() for it in v}
    assert sorted(items) == sorted(sidecars)
    for name, sc in sidecars.items():
        img = nib.load(str(out / "volumes" / f"{name}.nii.gz"))
        arr = np.asarray(img.dataobj)
        assert arr.dtype == np.int16 and arr.shape == (48, 48, 32)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [8.0, 8.0, 10.0])
        e = sc["encoding"]
        if e["hu_fixed_trap"]:
            assert man[name]["hu"]["decision"] == "header"
        elif not e["header_rescale"]:
            assert man[name]["hu"]["decision"] == "metadata"
        # the body sits where the sidecar's grid says: the centre of the scanned box is inside the
        # patient (soft tissue or lung, not air), in patient coordinates
        g = sc["grid"]
        centre_lps = np.asarray(g["origin_mm"]) + (np.asarray(g["shape"]) - 1) / 2 * np.asarray(g["spacing_mm"])
        ijk = np.round(np.linalg.solve(img.affine, [*(centre_lps * [-1, -1, 1]), 1.0])[:3]).astype(int)
        assert arr[tuple(ijk)] > -950, name
        assert items[name]["patient"] == name.rsplit("_", 2)[0]
        report = sc.get("report")
        if isinstance(report, dict) and "Findings_EN" in report:
            assert items[name]["findings"] == report["Findings_EN"]
