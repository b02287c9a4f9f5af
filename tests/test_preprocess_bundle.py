"""End-to-end tests of the ct_preprocess bundle on a tiny hand-made cohort (phantom in every encoding
and orientation, plus every kind of bad input): geometry, encoding invariance, structure positions,
qc reasons, containment, kill-and-resume, torchrun sharding."""

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_preprocess_phantom import (  # noqa: E402
    NODULE_LPS,
    write_dicom_series,
    write_mr_like,
    write_nifti,
)

from transforms import CTRATE_PATHOLOGIES  # noqa: E402
from ctclip_contract import METADATA_COLUMNS, REPORT_COLUMNS  # noqa: E402
from workflows.preprocess_cohort import CTPreprocessor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bundles" / "ct_preprocess" / "configs" / "preprocess.json"
PY = sys.executable
GOOD = {  # name -> (writer, kwargs, metadata slope/intercept)
    "train_1_a_1": ("nifti", {"axcodes": "RAS", "stored": "hu"}, ("1", "0")),
    "train_1_a_2": ("nifti", {"axcodes": "LAS", "stored": "raw_scl"}, ("1", "-1024")),
    "train_2_a_1": ("nifti", {"axcodes": "LPS", "stored": "raw"}, ("1", "-1024")),  # rescale only in the CSV
    "train_2_b_1": ("nifti", {"axcodes": "RAS", "stored": "slope2"}, ("2", "-2048")),
    "train_3_a_1": ("dicom", {"descending": True}, ("1", "-1024")),
    "train_4_a_1": ("nifti", {"axcodes": "LPS", "stored": "hu"}, ("1", "-1024")),  # CT-RATE _fixed trap
    "train_5_a_1": ("nifti", {"axcodes": "LAS", "stored": "hu"}, None),  # no report, no metadata
}


def _volume_path(root: Path, name: str) -> Path:
    split, pid, scan, _ = name.split("_")
    return root / "volumes" / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / name


def make_cohort(root: Path, bad: bool = True, good=GOOD) -> Path:
    meta_rows, rep_rows, lab_rows = [], [], []
    for i, (name, (kind, kw, rescale)) in enumerate(sorted(good.items())):
        p = _volume_path(root, name)
        if kind == "nifti":
            write_nifti(p.with_name(name + ".nii.gz"), **kw)
        else:
            write_dicom_series(p, seed=i, **kw)
        if rescale is not None:
            row = {c: "" for c in METADATA_COLUMNS}
            row.update(VolumeName=name + ".nii.gz", XYSpacing="[5.0, 5.0]", ZSpacing="6.0", RescaleSlope=rescale[0],
                       RescaleIntercept=rescale[1], ImageOrientationPatient="[1, 0, 0, 0, 1, 0]")
            meta_rows.append(list(row.values()))
            rep_rows.append([name + ".nii.gz", "Screening.", "Non-contrast.", f"Findings of {name}.", ""])
            lab_rows.append([name + ".nii.gz", *[(i + k) % 2 for k in range(18)]])
    if bad:
        vdir = root / "volumes" / "bad"
        vdir.mkdir(parents=True)
        good_bytes = write_nifti(vdir / "tmp.nii.gz").read_bytes()
        (vdir / "tmp.nii.gz").unlink()
        (vdir / "bad_truncated.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 2])
        nib.save(nib.Nifti1Image(np.zeros((40, 36), np.int16), np.eye(4)), str(vdir / "bad_2d.nii.gz"))
        nan = np.full((40, 36, 24), 40.0, np.float32)
        nan[5, 5, 5] = np.nan
        nib.save(nib.Nifti1Image(nan, np.diag([5.0, 5.0, 6.0, 1.0])), str(vdir / "bad_nan.nii.gz"))
        write_dicom_series(vdir / "bad_gap", gap_at=9)
        (vdir / "bad_notimage.nii.gz").write_bytes(gzip.compress(b"this is not an image\n" * 50))
        (vdir / "scanner_log.bin").write_bytes(b"\x00\x01binary")
        write_mr_like(vdir / "bad_mr.nii.gz")
        for sub in ("x", "y"):
            write_nifti(root / "volumes" / "dup" / sub / "dup_1_a_1.nii.gz")
        rep_rows.append(["train_8_a_1.nii.gz", "", "", "A report without a volume.", ""])
        rep_rows.append(["../../escape_1_a_1.nii.gz", "", "", "Escaping name.", ""])
        row = {c: "" for c in METADATA_COLUMNS}
        row.update(VolumeName="../../escape_1_a_1.nii.gz", XYSpacing="[1, 1]", ZSpacing="1", RescaleSlope="1",
                   RescaleIntercept="0")
        meta_rows.append(list(row.values()))
    for fname, header, rows in (("metadata.csv", METADATA_COLUMNS, meta_rows),
                                ("reports.csv", REPORT_COLUMNS, rep_rows),
                                ("labels.csv", ["VolumeName", *CTRATE_PATHOLOGIES], lab_rows)):
        with open(root / fname, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return root


def _bundle_cmd(inp, out, *extra):
    return [PY, "-m", "monai.bundle", "run", "--config_file", str(CONFIG), "--bundle_root", str(CONFIG.parents[1]),
            "--input_dir", str(inp), "--output_dir", str(out), "--model_config", "ctclip_tiny", "--num_workers", "0",
            "--progress", "False", *extra]


def _all_files(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pre")
    inp = make_cohort(base / "in")
    before = _all_files(base)
    out = base / "out"
    res = subprocess.run(_bundle_cmd(inp, out, "--num_workers", "1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return base, inp, out, before


def _load(out: Path, name: str):
    img = nib.load(str(out / "volumes" / f"{name}.nii.gz"))
    return np.asarray(img.dataobj), img


def test_every_good_volume_lands_in_ras_at_target_geometry(cohort_run):
    _, _, out, _ = cohort_run
    written = sorted(p.name for p in (out / "volumes").iterdir())
    assert written == sorted(f"{n}.nii.gz" for n in GOOD)  # no partial/temp files, no bad volumes
    for name in GOOD:
        arr, img = _load(out, name)
        assert arr.dtype == np.int16 and arr.shape == (32, 32, 16)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [8.0, 8.0, 10.0])
        assert int(img.header["sform_code"]) == 1 and int(arr.min()) >= -1024


def test_same_phantom_same_volume_in_every_encoding(cohort_run):
    _, _, out, _ = cohort_run
    ref, ref_img = _load(out, "train_1_a_1")
    for name in GOOD:
        arr, img = _load(out, name)
        np.testing.assert_allclose(img.affine, ref_img.affine, atol=1e-4)
        mad = np.abs(arr.astype(np.float64) - ref).mean()
        assert mad <= 2.0, (name, mad)


def test_ground_truth_structure_lands_where_it_should(cohort_run):
    _, _, out, _ = cohort_run
    for name in GOOD:
        arr, img = _load(out, name)
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij"), -1).reshape(-1, 3)
        ras = nib.affines.apply_affine(img.affine, ijk)
        lps = ras * [-1, -1, 1]
        near = np.linalg.norm(lps - NODULE_LPS, axis=1) < 30
        bright = (arr.reshape(-1) > 150) & near
        assert bright.sum() >= 3, name
        centre = lps[bright].mean(0)
        assert np.linalg.norm(centre - NODULE_LPS) < 6.0, (name, centre)
        mirrored = np.linalg.norm(lps - NODULE_LPS * [-1, 1, 1], axis=1) < 8
        assert arr.reshape(-1)[mirrored].max() < 150, name  # not left-right flipped


def test_qc_lists_every_input_with_its_reason(cohort_run):
    _, _, out, _ = cohort_run
    with open(out / "qc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r)
    for name in GOOD:
        assert by[name][0]["status"] == "ok", by[name]
    assert by["train_4_a_1"][0]["hu_decision"] == "header"  # _fixed trap detected, -1024 not applied twice
    assert by["train_2_a_1"][0]["hu_decision"] == "metadata"
    assert "no report" in by["train_5_a_1"][0]["warning"]
    expected = {
        "bad_truncated": "truncated",
        "bad_2d": "not a 3-D",
        "bad_nan": "non-finite",
        "bad_gap": "non-uniform slice spacing",
        "bad_notimage": "not a readable NIfTI",
        "scanner_log.bin": "not a recognised image file",
        "bad_mr": "no plausible HU mapping",
        "train_8_a_1": "without a volume",
        "../../escape_1_a_1": "unsafe VolumeName",
    }
    for name, why in expected.items():
        assert name in by, name
        assert all(r["status"] == "rejected" and why in r["reason"] for r in by[name]), by[name]
    assert len(by["dup_1_a_1"]) == 2 and all("duplicate volume name" in r["reason"] for r in by["dup_1_a_1"])


def test_datalist_and_manifest(cohort_run):
    _, _, out, _ = cohort_run
    dl = json.loads((out / "datalist.json").read_text())
    assert set(dl) == {"training", "validation", "test"}
    items = [it for v in dl.values() for it in v]
    assert sorted(it["name"] for it in items) == sorted(GOOD)
    patients = {}
    for split, v in dl.items():
        for it in v:
            assert (out / it["image"]).is_file() and not any(k.startswith("image_") for k in it)
            assert patients.setdefault(it["patient"], split) == split
    one = next(it for it in items if it["name"] == "train_1_a_2")
    assert one["patient"] == "train_1" and one["findings"] == "Findings of train_1_a_2."
    assert one["impressions"] == "Not given." and len(one["label"]) == 18 and set(one["label"]) <= {0, 1}
    five = next(it for it in items if it["name"] == "train_5_a_1")
    assert five["findings"] == "Not given." and "label" not in five
    man = json.loads((out / "manifest.json").read_text())
    assert man["parameters"]["spacing_mm"] == [8.0, 8.0, 10.0] and man["versions"]["monai"]
    assert man["volumes"]["train_2_a_1"]["hu"]["decision"] == "metadata"


def test_nothing_written_outside_out(cohort_run):
    base, _, _, before = cohort_run
    after = {f for f in _all_files(base) if not f.startswith("out")}
    assert after == before


def test_strict_mode_fails_on_first_bad_input(tmp_path):
    inp = make_cohort(tmp_path / "in", good={"train_1_a_1": GOOD["train_1_a_1"]})
    with pytest.raises(Exception, match="rejected|not a recognised|duplicate|without a volume|unsafe"):
        CTPreprocessor(str(inp), str(tmp_path / "out"), "ctclip_tiny", strict=True, progress=False).run()


def _records(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


def _volumes(out: Path) -> dict:
    res = {}
    for p in sorted((out / "volumes").glob("*.nii.gz")):
        img = nib.load(str(p))
        res[p.name] = (np.asarray(img.dataobj), img.affine)
    return res


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    good = {f"train_{p}_a_{r}": ("nifti", {"axcodes": "LAS" if r == 1 else "RAS", "stored": "raw_scl"}, ("1", "-1024"))
            for p in range(1, 7) for r in (1, 2)}
    inp = make_cohort(tmp_path / "in", bad=False, good=good)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_bundle_cmd(inp, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "records").is_dir() and len(list((out / "records").glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _records(out)
    assert 3 <= len(done) < len(good), "the run must be killed half-way"
    assert not (out / "qc.csv").exists()
    # a killed write leaves at most a hidden temp file: every visible volume is complete
    for p in (out / "volumes").iterdir():
        if not p.name.startswith("."):
            assert np.asarray(nib.load(str(p)).dataobj).shape == (32, 32, 16), p.name
    finished_mtimes = {n: (out / "volumes" / f"{n}.nii.gz").stat().st_mtime_ns for n in done}
    # the rerun and the reference run in this process (same code path as the bundle, less start-up)
    summary = CTPreprocessor(str(inp), str(out), "ctclip_tiny", progress=False).run()
    assert summary["resumed"] == len(done) and summary["ok"] == len(good)
    for n, mtime in finished_mtimes.items():  # verified and skipped, not rewritten
        assert (out / "volumes" / f"{n}.nii.gz").stat().st_mtime_ns == mtime
    ref = tmp_path / "ref"
    assert CTPreprocessor(str(inp), str(ref), "ctclip_tiny", progress=False).run()["resumed"] == 0
    a, b = _volumes(out), _volumes(ref)
    assert sorted(a) == sorted(b) == sorted(f"{n}.nii.gz" for n in good)
    assert not [p for p in (out / "volumes").iterdir() if p.name.startswith(".")]
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0])
        np.testing.assert_allclose(a[k][1], b[k][1])
    assert (out / "qc.csv").read_text() == (ref / "qc.csv").read_text()
    assert (out / "datalist.json").read_text() == (ref / "datalist.json").read_text()
    ma, mb = json.loads((out / "manifest.json").read_text()), json.loads((ref / "manifest.json").read_text())
    assert {k: v["hu"] for k, v in ma["volumes"].items()} == {k: v["hu"] for k, v in mb["volumes"].items()}


@pytest.mark.slow
def test_torchrun_two_ranks_split_without_duplicates_or_gaps(tmp_path):
    good = {f"train_{p}_a_1": ("nifti", {"axcodes": "RAS", "stored": "hu"}, ("1", "0")) for p in range(1, 6)}
    inp = make_cohort(tmp_path / "in", bad=False, good=good)
    out = tmp_path / "out"
    torchrun = str(Path(PY).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nnodes", "1", "--nproc_per_node", "2", *_bundle_cmd(inp, out)[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = _records(out)
    by_rank = {}
    for name, r in recs.items():
        by_rank.setdefault(r["rank"], []).append(name)
    assert sorted(by_rank) == [0, 1]
    assert not set(by_rank[0]) & set(by_rank[1])
    assert sorted(by_rank[0] + by_rank[1]) == sorted(good)
    assert sorted(len(v) for v in by_rank.values()) == [2, 3]
    with open(out / "qc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["name"] for r in rows) == sorted(good) and all(r["status"] == "ok" for r in rows)
