"""Bad inputs that used to be invented, fatal or silently mixed in: each now gets its reason and costs
nothing else (the good volume beside it still comes out, and nothing outside the output folder is written)."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_preprocess_phantom import SHAPE, SPACING, write_dicom_series, write_nifti  # noqa: E402

from transforms.qc import QualityCheckError, check_dicom_series, check_input  # noqa: E402
from workflows.preprocess_cohort import CTPreprocessor  # noqa: E402

PIXDIM_OFFSET = 76  # NIfTI-1 header: float32 pixdim[8] at byte 76


def _run(input_dir: Path, output_dir: Path) -> dict[str, dict]:
    CTPreprocessor(str(input_dir), str(output_dir), "ctclip_tiny", spacing_mm=list(SPACING),
                   spatial_size=list(SHAPE), progress=False).run()
    with open(output_dir / "qc.csv", newline="", encoding="utf-8") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def _with_pixdim(path: Path, axis: int, value: float) -> Path:
    raw = bytearray(path.read_bytes())
    raw[PIXDIM_OFFSET + 4 * axis: PIXDIM_OFFSET + 4 * axis + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("value", [0.0, -1.5])
def test_a_voxel_size_the_header_does_not_give_is_refused(tmp_path, value):
    good = write_nifti(tmp_path / "in" / "good_1_a_1.nii")
    bad = _with_pixdim(write_nifti(tmp_path / "in" / "bad_1_a_1.nii"), 2, value)
    assert float(nib.load(str(good)).header["pixdim"][2]) > 0
    with pytest.raises(QualityCheckError, match=r"bad_1_a_1\.nii: voxel size pixdim .* is not positive"):
        check_input(bad)
    rows = _run(tmp_path / "in", tmp_path / "out")
    assert rows["good_1_a_1"]["status"] == "ok"
    assert rows["bad_1_a_1"]["status"] == "rejected" and "pixdim" in rows["bad_1_a_1"]["reason"]
    assert not (tmp_path / "out" / "volumes" / "bad_1_a_1.nii.gz").exists()


def test_a_dicom_series_without_pixel_spacing_is_refused(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    folder = write_dicom_series(tmp_path / "in" / "volumes" / "nospacing_1_a_1")
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        del ds.PixelSpacing
        ds.save_as(f)
    with pytest.raises(QualityCheckError, match="no PixelSpacing"):
        check_dicom_series(folder)
    write_dicom_series(tmp_path / "in" / "volumes" / "good_1_a_1", seed=1)
    rows = _run(tmp_path / "in", tmp_path / "out")
    assert rows["good_1_a_1"]["status"] == "ok"
    assert rows["nospacing_1_a_1"]["status"] == "rejected" and "PixelSpacing" in rows["nospacing_1_a_1"]["reason"]


def test_stray_files_beside_the_slices_are_ignored_with_a_warning(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "clean" / "volumes" / "series_1_a_1")
    stray = write_dicom_series(tmp_path / "stray" / "volumes" / "series_1_a_1")
    (stray / "notes.txt").write_text("acquired on the old scanner\n")
    (stray / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 60)
    meta = pydicom.dataset.FileMetaDataset()  # a media index as a CD or PACS export writes it
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    index = pydicom.dataset.FileDataset(str(stray / "DICOMDIR"), {}, file_meta=meta, preamble=b"\0" * 128)
    index.FileSetID = "EXPORT"
    index.DirectoryRecordSequence = pydicom.sequence.Sequence()
    index.save_as(stray / "DICOMDIR", enforce_file_format=True)
    info = check_dicom_series(stray)
    assert info["ignored_files"] == ["DICOMDIR", "Thumbs.db", "notes.txt"] and info["n_slices"] == SHAPE[2]
    a = _run(tmp_path / "clean", tmp_path / "out_clean")["series_1_a_1"]
    b = _run(tmp_path / "stray", tmp_path / "out_stray")["series_1_a_1"]
    assert a["status"] == b["status"] == "ok", b["reason"]
    assert "ignored 3 file(s)" in b["warning"] and "notes.txt" in b["warning"]
    va = np.asarray(nib.load(str(tmp_path / "out_clean" / "volumes" / "series_1_a_1.nii.gz")).dataobj)
    vb = np.asarray(nib.load(str(tmp_path / "out_stray" / "volumes" / "series_1_a_1.nii.gz")).dataobj)
    np.testing.assert_array_equal(va, vb)


def test_a_gantry_tilt_refused_by_its_tag_says_so(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    folder = write_dicom_series(tmp_path / "tilted")
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.GantryDetectorTilt = 12.5
        ds.save_as(f)
    with pytest.raises(QualityCheckError, match=r"GantryDetectorTilt 12\.50 deg"):
        check_dicom_series(folder)


def test_a_report_table_that_is_not_utf8_costs_one_warning_not_the_run(tmp_path):
    write_nifti(tmp_path / "in" / "volumes" / "train_1_a_1.nii.gz")
    write_nifti(tmp_path / "in" / "volumes" / "train_2_a_1.nii.gz")
    header = "VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN\n"
    body = ("train_1_a_1.nii.gz,Cough.,Non-contrast.,Pleural effusion 12 mm \u00b1 2.,Effusion.\n"
            "train_2_a_1.nii.gz,Not given.,Non-contrast.,No finding.,Normal.\n")
    (tmp_path / "in" / "reports.csv").write_bytes((header + body).encode("cp1252"))  # \u00b1 is 0xb1
    rows = _run(tmp_path / "in", tmp_path / "out")
    assert rows["train_1_a_1"]["status"] == rows["train_2_a_1"]["status"] == "ok"
    assert "reports.csv line 2: not UTF-8 in Findings_EN: decoded as cp1252" in rows["train_1_a_1"]["warning"]
    assert rows["train_2_a_1"]["warning"] == ""
    items = {it["name"]: it for split in json.loads((tmp_path / "out" / "datalist.json").read_text()).values()
             for it in split}
    assert items["train_1_a_1"]["findings"] == "Pleural effusion 12 mm \u00b1 2."


def test_an_output_folder_inside_the_input_folder_is_not_taken_for_input(tmp_path):
    cohort = tmp_path / "cohort"
    write_nifti(cohort / "train_1_a_1.nii.gz")
    write_nifti(cohort / "train_2_a_1.nii.gz")
    first = _run(cohort, cohort / "preprocessed")
    second = _run(cohort, cohort / "preprocessed")  # the outputs of the first run now sit in the input folder
    assert set(first) == set(second) == {"train_1_a_1", "train_2_a_1"}
    assert all(r["status"] == "ok" for r in second.values())
    again = _run(cohort, tmp_path / "elsewhere")  # another run: the earlier output folder is still not input
    assert set(again) == {"train_1_a_1", "train_2_a_1"}


def test_an_input_name_is_not_run_as_a_spreadsheet_formula(tmp_path):
    write_nifti(tmp_path / "in" / "train_1_a_1.nii.gz")
    (tmp_path / "in" / "=HYPERLINK(1).nii.gz").write_bytes(b"not an image")
    rows = _run(tmp_path / "in", tmp_path / "out")
    bad = rows["'=HYPERLINK(1)"]  # the name cell itself is escaped
    assert bad["status"] == "rejected" and bad["input"] == "'=HYPERLINK(1).nii.gz"
    assert "unsafe volume name" in bad["reason"]
    assert rows["train_1_a_1"]["status"] == "ok" and rows["train_1_a_1"]["hu_slope"] == "1.0"


def test_an_empty_input_folder_warns(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    with caplog.at_level(logging.WARNING):
        _run(tmp_path / "in", tmp_path / "out")
    assert any("nothing to preprocess" in r.getMessage() for r in caplog.records)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs for the output folder (a real full disk); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_the_run_and_the_rerun_completes(tmp_path, small_disk):
    for i in range(3):
        write_nifti(tmp_path / "in" / f"train_{i}_a_1.nii.gz")
    out = small_disk / "out"
    out.mkdir()
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 8 * 1024))  # room for a record or two, not for the volumes
    with pytest.raises(OSError) as err:
        _run(tmp_path / "in", out)
    assert err.value.errno == errno.ENOSPC  # a fault of the machine, not a bad input
    leftovers = [p.name for p in out.rglob(".*")]
    assert leftovers == [], leftovers  # no temporary file is left behind
    assert not (out / "qc.csv").exists()
    for rec in (out / "records").glob("*.json"):
        assert json.loads(rec.read_text())["status"] == "ok"  # nothing was recorded as a bad input
    filler.unlink()
    rows = _run(tmp_path / "in", out)  # space freed: the rerun finishes the rest
    assert [r["status"] for r in rows.values()] == ["ok"] * 3


@pytest.mark.parametrize("fraction", [1.0, 0.01])
def test_a_volume_with_nan_never_reaches_a_model(tmp_path, fraction):
    """An all-NaN or partly NaN preprocessed volume gave plausible probabilities; the model input refuses it."""
    import torch
    from monai.data import MetaTensor

    from transforms import ToModelInputd

    vol = torch.full((1, 8, 8, 8), -1000.0)
    vol.view(-1)[: max(1, int(fraction * vol.numel()))] = float("nan")
    img = MetaTensor(vol, meta={"filename_or_obj": str(tmp_path / "valid_3_a_1.nii.gz")})
    to_input = ToModelInputd.from_model_config("image", "ctclip_tiny")
    with pytest.raises(ValueError, match=r"valid_3_a_1\.nii\.gz: \d+ non-finite voxels \(NaN/inf\)"):
        to_input({"image": img, "name": "valid_3_a_1"})
    with pytest.raises(ValueError, match=r"^valid_3_a_1: volume: \d+ non-finite voxels"):  # no file: the item's name
        to_input({"image": vol, "name": "valid_3_a_1"})
    ok = ToModelInputd.from_model_config("image", "ctclip_tiny")({"image": torch.full((1, 8, 8, 8), -1000.0)})
    assert torch.isfinite(ok["image"]).all()


def test_resume_redoes_an_input_that_changed_after_a_finished_run(tmp_path):
    for i in range(3):
        write_nifti(tmp_path / "in" / f"train_{i}_a_1.nii.gz", axcodes="RAS")
    out = tmp_path / "out"
    assert all(r["status"] == "ok" for r in _run(tmp_path / "in", out).values())
    replaced = tmp_path / "in" / "train_1_a_1.nii.gz"
    write_nifti(replaced, axcodes="LPS")  # another valid file under the same name
    truncated = tmp_path / "in" / "train_2_a_1.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    summary = CTPreprocessor(str(tmp_path / "in"), str(out), "ctclip_tiny", spacing_mm=list(SPACING),
                             spatial_size=list(SHAPE), progress=False).run()
    assert summary["resumed"] == 1 and sorted(summary["processed"]) == ["train_0_a_1", "train_1_a_1", "train_2_a_1"]
    with open(out / "qc.csv", newline="", encoding="utf-8") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["train_1_a_1"]["status"] == "ok" and rows["train_1_a_1"]["input_orientation"] == "LPS"
    assert rows["train_2_a_1"]["status"] == "rejected" and "truncated" in rows["train_2_a_1"]["reason"]
    assert not (out / "volumes" / "train_2_a_1.nii.gz").exists()  # no stale output of the old input


def test_a_second_run_into_a_held_output_folder_stops_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    from ctclip_contract import OutputFolderLocked

    write_nifti(tmp_path / "in" / "train_1_a_1.nii.gz")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, ctclip_contract; "
                               f"ctclip_contract.output_folder_lock({str(out)!r}); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputFolderLocked, match=rf"in use by pid {holder.pid} on .*\.lock"):
            _run(tmp_path / "in", out)
        assert not (out / "qc.csv").exists() and not (out / "volumes").exists()  # stopped before writing anything
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING):
        rows = _run(tmp_path / "in", out)  # the holder is gone: its lock is stale
    assert rows["train_1_a_1"]["status"] == "ok"
    assert any("taking over the lock of a run that is gone" in r.getMessage() for r in caplog.records)
    assert not (out / ".lock").exists()  # released when the run ended


REPO = Path(__file__).resolve().parents[1]


def _bundle_last_lines(args, env=None):
    cmd = [sys.executable, "-m", "monai.bundle", "run", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, **(env or {})))
    return res.returncode, [line for line in res.stderr.splitlines() if line.strip()]


def test_an_expected_error_ends_in_one_line_that_names_the_file_and_the_reason(tmp_path):
    """A bad model config under `python -m monai.bundle run`: the last line is the cause, not MONAI's wrapper;
    the traceback comes on request."""
    bad = tmp_path / "my_model.json"
    bad.write_text(json.dumps({"input": {"spacing_mm": [-3, 3, 4], "spatial_size": [32, 32, 16]}}))
    (tmp_path / "in").mkdir()
    args = ["--config_file", "bundles/ct_preprocess/configs/preprocess.json", "--bundle_root", "bundles/ct_preprocess",
            "--input", tmp_path / "in", "--output_dir", tmp_path / "out", "--model_config", bad]
    rc, lines = _bundle_last_lines(args)
    assert rc != 0
    assert lines[-1] == (f"error: ModelConfigError: model config {bad}: input.spacing_mm: expected three positive "
                         "numbers (x, y, z), got [-3, 3, 4]")
    assert not any(line.startswith("Traceback") for line in lines)
    rc, lines = _bundle_last_lines(args, env={"CTCLIP_TRACEBACK": "1"})
    assert rc != 0 and any(line.startswith("Traceback") for line in lines)  # MONAI's own printout
    assert any("input.spacing_mm: expected three positive numbers" in line for line in lines)


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), r"empty file \(0 bytes"),
    (lambda p: p.mkdir(), "a folder, not a weights file"),
    (lambda p: p.write_bytes(b"\x80\x02not a checkpoint"), "cannot read checkpoint"),
])
def test_a_bad_checkpoint_file_is_named_with_its_reason(tmp_path, make, reason):
    from custom_nets import load_state_dict_file

    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises((ValueError, OSError, RuntimeError), match=reason) as err:
        load_state_dict_file(path)
    assert str(path) in str(err.value)


def test_a_label_vector_of_the_wrong_length_names_the_item(tmp_path):
    from transforms import load_datalist

    write_nifti(tmp_path / "volumes" / "train_1_a_1.nii.gz")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [
        {"image": "volumes/train_1_a_1.nii.gz", "name": "train_1_a_1", "label": [0] * 17}]}))
    with pytest.raises(ValueError, match=r"datalist\.json: 'train_1_a_1' in split 'training' has 17 labels, not 18"):
        load_datalist(tmp_path, "training")


def test_a_header_that_would_need_more_memory_than_the_bound_is_refused_before_reading(tmp_path):
    """A float64 header just under the voxel limit (a sparse file on disk): refused from the header, in no time
    and without allocating; the bound is a qc option, and the good volume beside it still comes out."""
    write_nifti(tmp_path / "in" / "good_1_a_1.nii")
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float64)
    hdr.set_data_shape((1024, 1024, 2000))
    hdr.set_zooms((0.5, 0.5, 0.5))
    hdr.set_sform(np.diag([0.5, 0.5, 0.5, 1.0]), code=1)
    bomb = tmp_path / "in" / "bomb_1_a_1.nii"
    with open(bomb, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4)
        f.truncate(352 + 1024 * 1024 * 2000 * 8)  # sparse: nothing is really written
    with pytest.raises(QualityCheckError, match=r"bomb_1_a_1\.nii: reading 1024x1024x2000 voxels of 8 bytes .* "
                                                r"would take 23\.4 GiB, above the limit of 8\.0 GiB \(qc max_bytes\)"):
        check_input(bomb)
    with pytest.raises(QualityCheckError, match=r"above the limit of 0\.0 GiB"):
        check_input(tmp_path / "in" / "good_1_a_1.nii", max_bytes=1000)  # configurable
    rows = _run(tmp_path / "in", tmp_path / "out")
    assert rows["good_1_a_1"]["status"] == "ok" and "qc max_bytes" in rows["bomb_1_a_1"]["reason"]


def _stored_volume(path: Path, seed: int = 0) -> Path:
    """A volume as ct_preprocess stores it at the ctclip_tiny contract: int16 HU, RAS, 8x8x10 mm, 32x32x16."""
    rng = np.random.default_rng(seed)
    data = np.full((32, 32, 16), -1000, np.int16)
    data[6:26, 6:26, 2:14] = rng.integers(-900, 400, size=(20, 20, 12), dtype=np.int16)
    affine = np.diag([8.0, 8.0, 10.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """ctclip_tiny weights for the two inference bundles that read stored volumes: (ClassFine, CT-CLIP)."""
    import torch

    from custom_nets import ClassFineClassifier, create_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_weights")
    clip = create_model("ctclip_tiny")
    torch.save(clip.state_dict(), folder / "clip.pt")
    torch.save(ClassFineClassifier(clip, num_classes=18).state_dict(), folder / "classfine.pt")
    return folder / "classfine.pt", folder / "clip.pt"


_NOT_AN_IMAGE = {
    "text_renamed": (lambda good, bad: bad.write_bytes(b"VolumeName,Findings\nvalid_1_a_1,none\n"),
                     "not a readable NIfTI file"),
    "truncated": (lambda good, bad: bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
                  r"truncated or corrupt gzip stream \(\d+ of \d+ bytes\)"),
}


@pytest.mark.parametrize("kind, bundle", [("text_renamed", "ct_clip_classfine"), ("truncated", "ct_clip_zeroshot")])
def test_a_stored_volume_that_is_not_an_image_ends_in_one_line(tmp_path, tiny_weights, kind, bundle):
    """``--dataset_dir`` (volumes read as stored, by ITK): a text file under a .nii.gz name, or a truncated .nii.gz,
    listed in datalist.json. ITK reported the first with every reader MONAI tried and read the second without a
    word (predictions from a half-filled volume); the header checks of raw inputs now run first. ClassFine reads
    in the main process, zero-shot in two DataLoader workers (the error comes back as text and is read back).
    Both configs share the check (``transforms.CheckInputd``); one kind each keeps the test short."""
    make, reason = _NOT_AN_IMAGE[kind]
    data = tmp_path / "preprocessed"
    good = _stored_volume(data / "volumes" / "valid_1_a_1.nii.gz")
    bad = data / "volumes" / "valid_2_a_1.nii.gz"
    make(good, bad)
    labels = [0] * 17 + [1]
    (data / "datalist.json").write_text(json.dumps({"test": [
        {"image": "volumes/valid_1_a_1.nii.gz", "name": "valid_1_a_1", "label": labels},
        {"image": "volumes/valid_2_a_1.nii.gz", "name": "valid_2_a_1", "label": labels[::-1]}]}))
    classfine, clip = tiny_weights
    out = tmp_path / "out"
    args = ["--config_file", f"bundles/{bundle}/configs/inference.json", "--bundle_root", f"bundles/{bundle}",
            "--dataset_dir", data, "--output_dir", out, "--model_config", "ctclip_tiny"]
    args += (["--ckpt_path", classfine] if bundle == "ct_clip_classfine" else
             ["--pretrained", clip, "--num_workers", "2", "--n_bootstrap", "10"])
    rc, lines = _bundle_last_lines(args)
    assert rc != 0
    assert re.fullmatch(rf"error: QualityCheckError: {re.escape(str(bad))}: {reason}.*", lines[-1]), lines[-3:]
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == []  # no partial output


class _OneBadVolume:
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 1

    def __getitem__(self, i):
        from transforms import CheckInputd

        return CheckInputd(keys="image", padding_key=None)({"image": str(self.path)})


def test_an_error_from_a_dataloader_worker_is_summarised_by_its_own_cause(tmp_path):
    """torch re-raises a worker's error as text ("Caught ... in DataLoader worker process 0" and the worker's whole
    traceback); the one-line summary reads the worker's innermost exception back from it."""
    import torch

    from ctclip_contract.errors import raised_by_the_project, summary_line

    bad = tmp_path / "valid_1_a_1.nii.gz"
    bad.write_bytes(b"not an image")
    loader = torch.utils.data.DataLoader(_OneBadVolume(bad), batch_size=None, num_workers=1)
    with pytest.raises(Exception) as err:
        next(iter(loader))
    assert "DataLoader worker process 0" in str(err.value)
    assert raised_by_the_project(err.value)
    assert summary_line(err.value).startswith(f"QualityCheckError: {bad}: not a readable NIfTI file (")
    assert "\n" not in summary_line(err.value)
    plain = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"/usr/lib/python3/site-packages/lib.py\", line 3, in f\n    g()\n"
                         "ValueError: a library's own failure\n")
    assert not raised_by_the_project(plain) and summary_line(plain) == "ValueError: a library's own failure"
