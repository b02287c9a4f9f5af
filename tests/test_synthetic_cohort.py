"""The synthetic cohort: validation, CT-RATE layout, determinism across workers, bundle, preview."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from chest_phantom.cohort import METADATA_COLUMNS, CohortConfigError, generate_cohort, plan_cases
from chest_phantom.report_parser import labels_from_report
from ctclip_contract import CTRATE_PATHOLOGIES

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "synthetic_chest_ct"
SMALL = dict(geometry="tests", progress=False, two_recon_fraction=1.0, two_scan_fraction=1.0, dicom_fraction=0.5)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _csv(path: Path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """The same 2-case cohort (real renderer) written with 1 and with 2 worker processes."""
    one = tmp_path_factory.mktemp("one") / "cohort"
    two = tmp_path_factory.mktemp("two") / "cohort"
    s1 = generate_cohort(one, 2, seed=5, num_workers=1, balanced=0.5, **SMALL)
    s2 = generate_cohort(two, 2, seed=5, num_workers=2, balanced=0.5, **SMALL)
    return one, two, s1, s2


def test_one_and_two_workers_write_identical_files(cohorts):
    one, two, s1, s2 = cohorts
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert not different, different
    assert s1["num_volumes"] == s2["num_volumes"] == 4


def test_ctrate_layout_names_and_tables(cohorts):
    root = cohorts[0]
    header, meta = _csv(root / "metadata.csv")
    assert header == list(METADATA_COLUMNS)
    header, reports = _csv(root / "reports.csv")
    assert header == ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    header, labels = _csv(root / "labels.csv")
    assert header == ["VolumeName", *CTRATE_PATHOLOGIES]
    names = [r["VolumeName"] for r in meta]
    assert names == [r["VolumeName"] for r in reports] == [r["VolumeName"] for r in labels]
    # one patient with scans a and b, two reconstructions each (fractions forced to 1)
    stems = [n.removesuffix(".nii.gz") for n in names]
    assert stems == ["train_1_a_1", "train_1_a_2", "train_1_b_1", "train_1_b_2"]
    for name, stem in zip(names, stems):
        pid, scan = "_".join(stem.split("_")[:2]), stem.split("_")[2]
        path = root / "volumes" / pid / f"{pid}_{scan}" / name
        if name.endswith(".nii.gz"):
            assert path.is_file()
        else:  # a DICOM series folder: one file per slice
            files = list(path.iterdir())
            assert len(files) == int(next(r for r in meta if r["VolumeName"] == name)["NumberofSlices"])
        assert (root / "ground_truth" / f"{stem}.json").is_file()
    # reconstructions of a scan share report and labels
    by = {r["VolumeName"].removesuffix(".nii.gz"): r for r in reports}
    lab = {r["VolumeName"].removesuffix(".nii.gz"): r for r in labels}
    for scan in ("train_1_a", "train_1_b"):
        assert {k: v for k, v in by[f"{scan}_1"].items() if k != "VolumeName"} == \
               {k: v for k, v in by[f"{scan}_2"].items() if k != "VolumeName"}
        assert {k: v for k, v in lab[f"{scan}_1"].items() if k != "VolumeName"} == \
               {k: v for k, v in lab[f"{scan}_2"].items() if k != "VolumeName"}
    # the report and the labels agree (no label noise by default)
    for r in reports:
        got = labels_from_report(r["Findings_EN"] + " " + r["Impressions_EN"])
        row = lab[r["VolumeName"].removesuffix(".nii.gz")]
        assert got == {n: int(row[n]) for n in CTRATE_PATHOLOGIES}
    # list-valued cells are Python-list strings, as in CT-RATE
    for r in meta:
        for col in ("XYSpacing", "ImagePositionPatient", "ImageOrientationPatient"):
            assert r[col].startswith("[") and r[col].endswith("]")
        assert len(json.loads(r["ImageOrientationPatient"])) == 6
        assert r["PatientAge"].endswith("Y") and len(r["PatientAge"]) == 4


def test_sidecar_has_truth_and_every_encoding_choice(cohorts):
    root = cohorts[0]
    for path in (root / "ground_truth").glob("*.json"):
        sc = json.loads(path.read_text())
        rec = sc["record"]
        assert set(rec["labels"]) == set(CTRATE_PATHOLOGIES)
        for f in rec["findings"]:
            assert {"label", "severity", "side", "sites", "size_mm", "count", "subtype", "centers_mm"} <= set(f)
        enc = sc["encoding"]
        assert {"name", "dtype", "slope", "intercept", "row_slope", "row_intercept", "header_rescale",
                "padding_value_hu", "clip_hu", "hu_fixed_trap"} <= set(enc)
        assert sc["hu_fixed_trap"] == enc["hu_fixed_trap"]
        st = sc["storage"]
        assert st["format"] in ("nifti", "dicom") and (root / st["path"]).exists()
        assert np.array(st["affine_ras"]).shape == (4, 4)
        assert {"name", "patient_position", "image_orientation_patient"} <= set(st["orientation"])
        assert {"kernel", "noise_sd_hu", "slice_thickness_mm", "fov_diameter_mm", "padding_value_hu"} <= set(sc["recon"])
        assert sc["metadata_row"]["VolumeName"] == sc["VolumeName"]


def test_metadata_rows_describe_nifti_storage_honestly(tmp_path):
    """Row slope/intercept applied to the raw stored integers give HU; only the _fixed trap lies."""
    out = tmp_path / "c"
    generate_cohort(out, 6, seed=1, num_workers=1, renderer="synthetic_standin", geometry="tests", progress=False, dicom_fraction=0.0,
                    encodings=["int16_offset", "int16_offset_raw", "hu_fixed_trap", "uint16_12bit", "uint16_slope2"],
                    orientations=["RAS", "LAS", "LPS"], two_recon_fraction=1.0)
    _, meta = _csv(out / "metadata.csv")
    seen_trap = seen_honest = 0
    for row in meta:
        sc = json.loads((out / "ground_truth" / (row["VolumeName"].removesuffix(".nii.gz") + ".json")).read_text())
        img = nib.load(out / sc["storage"]["path"])
        raw = np.asarray(img.dataobj.get_unscaled()).astype(np.float64)
        from_row = raw * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
        hu = np.asarray(img.dataobj).astype(np.float64) if sc["encoding"]["header_rescale"] else None
        pad = sc["encoding"]["padding_stored"]
        fov = from_row[raw != pad] if pad is not None else from_row.ravel()  # inside the reconstruction circle
        air_and_lung = np.mean((fov >= -1100) & (fov <= -800))
        shifted = np.mean((fov >= -2124) & (fov <= -1824))
        if sc["hu_fixed_trap"]:
            seen_trap += 1
            assert float(row["RescaleIntercept"]) == -1024
            assert shifted > 0.3  # the naive reading puts air and lung near -2024...-1884
        else:
            seen_honest += 1
            if hu is not None:
                np.testing.assert_array_equal(from_row, hu)
            assert air_and_lung > 0.3 and shifted < 0.1
        spacing = json.loads(row["XYSpacing"])
        assert spacing == [img.header.get_zooms()[1], img.header.get_zooms()[0]]
        assert float(row["ZSpacing"]) == pytest.approx(img.header.get_zooms()[2])
        assert int(row["Rows"]) == img.shape[1] and int(row["Columns"]) == img.shape[0]
        assert int(row["NumberofSlices"]) == img.shape[2]
        # ImagePositionPatient is the LPS position of the first stored voxel
        ras0 = img.affine @ [0, 0, 0, 1]
        np.testing.assert_allclose(json.loads(row["ImagePositionPatient"]), [-ras0[0], -ras0[1], ras0[2]], atol=1e-4)
    assert seen_trap and seen_honest


def test_broken_geometry_is_restored_from_the_metadata_row(tmp_path):
    """The original CT-RATE release: header geometry is void, the metadata row holds the truth."""
    out = tmp_path / "c"
    generate_cohort(out, 2, seed=2, num_workers=1, renderer="synthetic_standin", geometry="tests", progress=False,
                    dicom_fraction=0.0, orientations=["ctrate_broken"], encodings=["int16_offset_raw"])
    _, meta = _csv(out / "metadata.csv")
    for row in meta:
        sc = json.loads((out / "ground_truth" / (row["VolumeName"].removesuffix(".nii.gz") + ".json")).read_text())
        assert sc["storage"]["broken_geometry"]
        img = nib.load(out / sc["storage"]["path"])
        assert int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        iop = np.array(json.loads(row["ImageOrientationPatient"]), dtype=float)
        row_spacing, col_spacing = json.loads(row["XYSpacing"])
        normal = np.cross(iop[:3], iop[3:])
        restored = np.eye(4)
        restored[:3, 0] = iop[:3] * col_spacing
        restored[:3, 1] = iop[3:] * row_spacing
        restored[:3, 2] = normal * float(row["ZSpacing"])
        restored[:3, 3] = json.loads(row["ImagePositionPatient"])
        np.testing.assert_allclose(restored, sc["storage"]["affine_lps"], atol=1e-5)
        raw = np.asarray(img.dataobj.get_unscaled()).astype(float)
        hu = raw * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
        pad = sc["encoding"]["padding_stored"]
        inside = raw != pad if pad is not None else np.ones(raw.shape, bool)
        assert np.mean((hu[inside] >= -1100) & (hu[inside] <= -800)) > 0.3  # air and lung where they belong


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_cases=0), "num_cases"),
    (dict(num_cases=-3), "num_cases"),
    (dict(prevalence={"Lung nodule": 0.5, "Pneumothorax": 0.2}), "Pneumothorax"),
    (dict(geometry="enormous"), "enormous"),
    (dict(encodings=["int16_offset", "int8"]), "int8"),
    (dict(orientations=["sideways"]), "sideways"),
    (dict(dicom_fraction=1.5), "dicom_fraction"),
    (dict(num_workers=0), "num_workers"),
    (dict(split_prefix="../evil"), "split_prefix"),
    (dict(encodings=["hu_fixed_trap"], dicom_fraction=0.5), "dicom"),
])
def test_bad_parameters_fail_before_any_file(tmp_path, kwargs, message):
    out = tmp_path / "cohort"
    args = dict(num_cases=2, geometry="tests", progress=False) | kwargs
    with pytest.raises(CohortConfigError, match=message):
        generate_cohort(out, **args)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(CohortConfigError, match="not writable|not a folder"):
        generate_cohort(blocker / "cohort", 1, geometry="tests", progress=False)
    with pytest.raises(CohortConfigError, match="not a folder"):
        generate_cohort(blocker, 1, geometry="tests", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_foreign_folder_is_refused_and_an_old_cohort_replaced(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CohortConfigError, match="notes.txt"):
        generate_cohort(foreign, 1, renderer="synthetic_standin", geometry="tests", progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "cohort"
    generate_cohort(out, 3, renderer="synthetic_standin", geometry="tests", progress=False, num_workers=1,
                    two_scan_fraction=0.0)
    assert (out / "volumes" / "train_3").is_dir()
    generate_cohort(out, 1, renderer="synthetic_standin", geometry="tests", progress=False, num_workers=1)
    assert [p.name for p in (out / "volumes").iterdir()] == ["train_1"]  # no stale patient left
    assert all(p.name.startswith("train_1_") for p in (out / "ground_truth").iterdir())


def test_failing_case_is_named_and_leaves_no_partial_file(tmp_path, monkeypatch):
    module = tmp_path / "mods" / "failing_renderer.py"
    module.parent.mkdir()
    module.write_text(
        "from synthetic_standin import *\n"
        "from synthetic_standin import apply_scanner as _ok\n"
        "def apply_scanner(truth, grid, recon, seed):\n"
        "    if recon['kernel'] == 'sharp':\n"
        "        raise MemoryError('simulated crash while rendering')\n"
        "    return _ok(truth, grid, recon, seed)\n")
    monkeypatch.syspath_prepend(str(module.parent))
    out = tmp_path / "cohort"
    with pytest.raises(RuntimeError, match=r"case train_1_a .*seed .*simulated crash"):
        generate_cohort(out, 2, num_workers=1, renderer="failing_renderer", two_recon_fraction=1.0,
                        geometry="tests", progress=False, dicom_fraction=0.0)
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not leftovers
    assert not (out / "metadata.csv").exists()  # tables only after every case succeeded
    # the first reconstruction was complete when the second failed: it is a whole, readable file
    assert nib.load(next(out.rglob("*.nii.gz"))).get_fdata().size > 0


def test_plan_is_patient_wise_and_seeded():
    a = plan_cases(50, seed=3, two_scan_fraction=0.3)
    assert a == plan_cases(50, seed=3, two_scan_fraction=0.3)
    assert a != plan_cases(50, seed=4, two_scan_fraction=0.3)
    assert [c["index"] for c in a] == list(range(50))
    assert len({c["seed"] for c in a}) == 50
    scans = {}
    for c in a:
        scans.setdefault(c["patient_id"], []).append(c["scan"])
    assert all(s in (["a"], ["a", "b"]) for s in scans.values())
    assert any(s == ["a", "b"] for s in scans.values())


def test_preview_draws_cases_with_marks(cohorts, tmp_path):
    import matplotlib.image as mpimg

    from chest_phantom.preview import preview_cohort

    png = preview_cohort(cohorts[0], tmp_path / "p.png", num_cases=2)
    assert png.stat().st_size < 1_000_000
    img = mpimg.imread(png)
    assert img.shape[0] > img.shape[1] * 0.8  # two rows of panels
    red = (img[..., 0] > 0.9) & (img[..., 1] < 0.35) & (img[..., 2] < 0.3)
    assert red.sum() > 20  # at least one finding marked


def test_bundle_files_are_complete():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "task", "description", "authors", "copyright", "intended_use", "references", "network_data_format"):
        assert meta.get(key), key
    assert meta["version"] in meta["changelog"]
    conf = (BUNDLE / "configs" / "logging.conf").read_text()
    classes = [line.split("=", 1)[1].strip() for line in conf.splitlines() if line.startswith("class=")]
    assert classes and all(c in ("StreamHandler", "FileHandler") or c.startswith("logging.") for c in classes)
    assert "Apache License" in (BUNDLE / "LICENSE").read_text() and "Version 2.0" in (BUNDLE / "LICENSE").read_text()
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file configs/generate.json" in readme  # from the bundle's folder
    assert "--bundle_root bundles/synthetic_chest_ct" in readme  # from elsewhere
    cfg = json.loads((BUNDLE / "configs" / "generate.json").read_text())
    for key in ("output_dir", "num_cases", "seed", "geometry", "prevalence", "balanced", "encodings", "orientations",
                "dicom_fraction", "two_recon_fraction", "two_scan_fraction", "label_noise", "num_workers", "run"):
        assert key in cfg, key


@pytest.mark.slow
def test_bundle_run_writes_a_cohort(tmp_path):
    out = tmp_path / "cohort"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "generate.json"),
           "--bundle_root", str(BUNDLE),
           "--output_dir", str(out), "--num_cases", "1", "--seed", "4", "--geometry", "tests", "--num_workers", "1",
           "--progress", "False"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"num_scans": 1' in proc.stdout
    assert (out / "metadata.csv").is_file() and (out / "labels.csv").is_file() and (out / "reports.csv").is_file()
    assert list((out / "ground_truth").glob("train_1_a_*.json"))
