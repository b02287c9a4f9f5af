"""Unit tests of the preprocessing transforms: resampler, HU decision, QC, model input, CT-RATE tables."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

sys.path.insert(0, str(Path(__file__).parent))
from test_preprocess_phantom import lps_grid, phantom_hu  # noqa: E402

from transforms import (  # noqa: E402
    CTRATE_PATHOLOGIES,
    CTQualityCheck,
    HUDecisionError,
    HUWindow,
    QualityCheckError,
    RescaleToHU,
    RescaleToHUd,
    ResampleToSpacing,
    ToModelInput,
    ToModelInputd,
    check_dicom_series,
    read_labels_csv,
    read_metadata_csv,
    read_reports_csv,
    split_patients,
)
from transforms.ctrate import CTRATETableError, datalist_from_records, parse_list, patient_id  # noqa: E402
from transforms.hu import _value_counts, hu_evidence  # noqa: E402


def _ct(offset=0.0):
    hu = phantom_hu(lps_grid()).astype(np.float32) + offset
    return MetaTensor(torch.from_numpy(hu)[None], affine=torch.diag(torch.tensor([5.0, 5.0, 6.0, 1.0])))


@pytest.mark.parametrize("pixdim", [(8.0, 7.0, 10.0), (3.0, 4.5, 2.0)])
def test_resampler_matches_monai_spacing(pixdim):
    rng = np.random.default_rng(1)
    aff = np.diag([0.7, 0.8, 1.3, 1.0])
    aff[:3, 3] = [-5, 3, 10]
    img = MetaTensor(torch.from_numpy(rng.normal(size=(1, 21, 17, 13)).astype(np.float32)), affine=torch.as_tensor(aff))
    ref = Spacing(pixdim=tuple(p / 5 for p in pixdim), mode="bilinear", padding_mode="border")(img)
    ours = ResampleToSpacing(tuple(p / 5 for p in pixdim))(img)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-5)


def test_hu_auto_picks_the_plausible_candidate_and_records_why():
    hu, prov = RescaleToHU("auto")(_ct(0))
    assert prov["decision"] == "header" and prov["slope"] == 1.0 and prov["intercept"] == 0.0
    assert prov["evidence"]["raw_offset_1024"]["plausible"] is False
    raw, prov = RescaleToHU("auto")(_ct(1024), slope=1.0, intercept=-1024.0)
    assert prov["decision"] == "metadata"
    np.testing.assert_allclose(raw.numpy(), _ct(0).numpy())
    # the CT-RATE _fixed trap: values already HU while the metadata row says -1024
    _, prov = RescaleToHU("auto")(_ct(0), slope=1.0, intercept=-1024.0)
    assert prov["decision"] == "header"
    assert "below air" in prov["evidence"]["metadata"]["why_not"] or "soft tissue" in prov["evidence"]["metadata"]["why_not"]


def test_hu_sources_and_padding_floor():
    img = _ct(0)
    img[0, 0, 0, :] = -8192  # outside-FOV padding
    out = RescaleToHUd("image", source="metadata")({"image": img, "rescale_slope": "1", "rescale_intercept": "0"})
    assert out["hu_provenance"]["decision"] == "metadata"
    assert float(out["image"].min()) == -1024.0
    with pytest.raises(HUDecisionError, match="no RescaleSlope"):
        RescaleToHU("metadata")(img, name="vol7")
    mr = MetaTensor(torch.linspace(0, 1500, 40 * 36 * 24).reshape(1, 40, 36, 24))
    with pytest.raises(HUDecisionError, match="no plausible HU mapping"):
        RescaleToHU("auto")(mr, name="mr_volume")


@pytest.mark.parametrize("padding", ["none", "constant", "scattered"])
def test_hu_evidence_from_value_counts_equals_the_sample(padding):
    """Integer volumes are judged on their sample's distinct values and counts (one bincount for every candidate):
    the same evidence as the sample itself, ties, padding below air and a falling mapping included."""
    rng = np.random.default_rng(3)
    sample = rng.normal(-300, 500, 20000).round()
    if padding == "constant":
        sample[:4000] = -3024  # one padding constant: left out of the fractions
    elif padding == "scattered":
        sample[:4000] = rng.integers(-3000, -1600, 4000)  # not one constant: counted as below air
    sample = sample.astype(np.float32)
    values, counts = _value_counts(sample)
    assert counts.sum() == sample.size and np.all(np.diff(values) > 0)
    for slope, intercept in ((1.0, 0.0), (1.0, -1024.0), (-1.0, 0.0), (0.5, -10.0)):
        assert hu_evidence(values * slope + intercept, counts) == hu_evidence(sample * slope + intercept)
    assert _value_counts(sample + 0.5) is None  # fractions: judged on the sample itself


def test_quality_check_reasons():
    qc = CTQualityCheck(min_slices=8)
    assert qc(_ct(0)) is not None
    with pytest.raises(QualityCheckError, match="not a 3-D"):
        qc(torch.zeros(1, 30, 30))
    with pytest.raises(QualityCheckError, match="too few slices"):
        qc(_ct(0)[:, :, :, :3])
    bad = _ct(0).clone()
    bad[0, 3, 3, 3] = float("nan")
    with pytest.raises(QualityCheckError, match="non-finite"):
        qc(bad, name="nan_vol")
    with pytest.raises(QualityCheckError, match="absurd voxel spacing"):
        qc(MetaTensor(_ct(0).as_tensor(), affine=torch.diag(torch.tensor([5.0, 5.0, 60.0, 1.0]))))
    rot = np.eye(4)
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    rot[:2, :2] = [[c, -s], [s, c]]
    with pytest.raises(QualityCheckError, match="oblique"):
        qc(MetaTensor(_ct(0).as_tensor(), affine=torch.as_tensor(rot @ np.diag([5.0, 5.0, 6.0, 1.0]))))
    shear = np.diag([5.0, 5.0, 6.0, 1.0])
    shear[1, 2] = 1.0
    with pytest.raises(QualityCheckError, match="non-orthogonal"):
        qc(MetaTensor(_ct(0).as_tensor(), affine=torch.as_tensor(shear)))
    with pytest.raises(QualityCheckError, match="implausible HU"):
        qc(MetaTensor(torch.linspace(0, 1500, 40 * 36 * 24).reshape(1, 40, 36, 24)))


def test_dicom_series_checks(tmp_path):
    from test_preprocess_phantom import write_dicom_series

    info = check_dicom_series(write_dicom_series(tmp_path / "ok", descending=True))
    assert info["n_slices"] == 24 and info["slice_spacing"] == pytest.approx(6.0) and info["intercept"] == -1024
    with pytest.raises(QualityCheckError, match="non-uniform slice spacing"):
        check_dicom_series(write_dicom_series(tmp_path / "gap", gap_at=7))
    with pytest.raises(QualityCheckError, match="gantry tilt"):
        check_dicom_series(write_dicom_series(tmp_path / "tilt", tilt=0.5))
    with pytest.raises(QualityCheckError, match="modality 'MR'"):
        check_dicom_series(write_dicom_series(tmp_path / "mr", modality="MR"))


def test_model_input_slp_layout_and_scaling():
    # RAS volume with a marker at (x=R..L index 1, y=P..A index 2, z=I..S index 3)
    vol = torch.full((1, 6, 7, 8), -2000.0)
    vol[0, 1, 2, 3] = 500.0
    out = ToModelInputd.from_model_config("image", "ctclip_tiny")({"image": MetaTensor(vol)})["image"]
    assert out.dtype == torch.float32 and tuple(out.shape) == (1, 8, 6, 7)  # (C, D=S, H=L, W=P)
    # S keeps z order; L flips x (R->L); P flips y (A->P)
    assert float(out[0, 3, 6 - 1 - 1, 7 - 1 - 2]) == pytest.approx(0.5)
    assert float(out.min()) == pytest.approx(-1.0)  # clipped at -1000 HU, /1000
    t = ToModelInput(hu_window=(-500, 500), hu_offset=-500, hu_scale=1000, axis_codes="RAS")(MetaTensor(vol))
    assert tuple(t.shape) == (1, 6, 7, 8) and float(t.max()) == pytest.approx(1.0) and float(t.min()) == 0.0
    with pytest.raises(ValueError, match="hu_window"):
        ToModelInput(hu_window=(10, -10))



@pytest.mark.parametrize("config", ["ctclip_tiny", "ctclip_small"])
def test_deferred_window_is_the_same_model_input(config):
    """``window=False`` hands over the stored int16 in the model's axis order (contiguous, half the bytes), and
    :class:`HUWindow` of the same contract then gives the fused path's float32 input bit for bit."""
    g = torch.Generator().manual_seed(0)
    affine = torch.diag(torch.tensor([-1.5, 2.0, 3.0, 1.0]))  # LAS stored, not RAS: the orientation must act
    vol = MetaTensor(torch.randint(-3000, 3000, (1, 9, 10, 11), generator=g, dtype=torch.int16), affine=affine,
                     meta={"filename_or_obj": "case.nii.gz"})
    fused = ToModelInput.from_model_config(config)(vol)
    stored = ToModelInput.from_model_config(config, window=False)(vol)
    assert stored.dtype == torch.int16 and stored.is_contiguous() and stored.shape == fused.shape
    assert torch.equal(stored.affine, fused.affine)
    windowed = HUWindow.from_model_config(config)(stored)
    assert windowed.dtype == torch.float32 and torch.equal(windowed, fused.as_tensor())
    # a batch of deferred items, windowed at once (what prepare_batch does on the device)
    batch = torch.stack([stored.as_tensor(), stored.as_tensor()])
    assert torch.equal(HUWindow.from_model_config(config)(batch)[1], fused.as_tensor())
    d = ToModelInputd.from_model_config("image", config, window=False)({"image": vol, "name": "case"})
    assert torch.equal(d["image"].as_tensor(), stored.as_tensor())


def test_hu_window_refuses_non_finite_naming_the_volume():
    vol = torch.zeros(1, 4, 4, 4)
    vol[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="scan_7.nii.gz: 1 non-finite"):
        HUWindow()(MetaTensor(vol, meta={"filename_or_obj": "scan_7.nii.gz"}))
    with pytest.raises(ValueError, match="hu_scale"):
        HUWindow(hu_scale=0)

def _write(path, header, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_ctrate_tables(tmp_path):
    from ctclip_contract import METADATA_COLUMNS

    row = {c: "" for c in METADATA_COLUMNS}
    row.update(VolumeName="train_1_a_1.nii.gz", XYSpacing="[0.341796875, 0.341796875]", ZSpacing="1.5",
               RescaleSlope="1", RescaleIntercept="-1024", ImageOrientationPatient="[1, 0, 0, 0, 1, 0]")
    meta, issues = read_metadata_csv(_write(tmp_path / "m.csv", METADATA_COLUMNS, [list(row.values())]))
    assert issues == [] and meta["train_1_a_1"]["XYSpacing"] == [0.341796875, 0.341796875]
    assert meta["train_1_a_1"]["RescaleIntercept"] == -1024.0
    with pytest.raises(CTRATETableError, match="RescaleSlope, XYSpacing"):
        read_metadata_csv(_write(tmp_path / "bad.csv", ["VolumeName", "RescaleIntercept", "ZSpacing"], []))
    assert parse_list("[-166, 9, 56.2998657]") == [-166.0, 9.0, 56.2998657]
    with pytest.raises(ValueError):
        parse_list("[1, 'a']")

    rep, issues = read_reports_csv(_write(tmp_path / "r.csv", ["VolumeName", "ClinicalInformation_EN", "Technique_EN",
                                                                  "Findings_EN", "Impressions_EN"],
                                          [["a_1_a_1.nii.gz", "", "", "Lungs clear.", ""],
                                           ["a_2_a_1.nii.gz", "", "", "x", "y"],
                                           ["a_2_a_1.nii.gz", "", "", "x", "y"],
                                           ["../../etc/passwd", "", "", "x", "y"]]))
    assert rep["a_1_a_1"]["Impressions_EN"] == "Not given." and rep["a_1_a_1"]["Findings_EN"] == "Lungs clear."
    assert "a_2_a_1" not in rep and any("duplicate" in why for _, why in issues)
    assert any("unsafe" in why for _, why in issues)
    with pytest.raises(CTRATETableError, match="duplicate"):
        read_reports_csv(tmp_path / "r.csv", strict=True)

    header = ["VolumeName", *reversed(CTRATE_PATHOLOGIES)]  # order in the file must not matter
    labels, issues = read_labels_csv(_write(tmp_path / "l.csv", header, [["v_1_a_1.nii.gz", *([0] * 17 + [1])],
                                                                        ["v_2_a_1.nii.gz", *([0] * 17 + [2])]]))
    assert labels["v_1_a_1"] == [1] + [0] * 17 and "v_2_a_1" not in labels
    assert "labels not 0/1" in issues[0][1]
    with pytest.raises(CTRATETableError, match="Medical material"):
        read_labels_csv(_write(tmp_path / "l2.csv", header[:-1], []))


def test_patient_split_is_deterministic_and_patient_wise():
    names = [f"train_{p}_{s}_{r}" for p in range(40) for s in "ab" for r in (1, 2)]
    pats = [patient_id(n) for n in names]
    assert pats[0] == "train_0" and patient_id("scan.nii") == "scan.nii"
    split = split_patients(pats, (0.7, 0.15, 0.15), seed=3)
    assert split == split_patients(list(reversed(pats)), (0.7, 0.15, 0.15), seed=3)
    assert sorted(list(split.values()).count(k) for k in ("training", "validation", "test")) == [6, 6, 28]
    recs = [{"image": f"volumes/{n}.nii.gz", "name": n, "patient": patient_id(n)} for n in names]
    dl = datalist_from_records(recs, split)
    seen = {}
    for key, items in dl.items():
        for it in items:
            assert seen.setdefault(it["patient"], key) == key
            assert it["findings"] == "Not given." and "label" not in it
    assert sum(len(v) for v in dl.values()) == len(names)


def test_centered_grid_equals_torch_trilinear():
    img = MetaTensor(torch.randn(1, 23, 19, 17), affine=torch.diag(torch.tensor([0.7, 0.8, 1.0, 1.0], dtype=torch.float64)))
    out = ResampleToSpacing((1.1, 1.3, 1.7), grid="centered")(img)
    r = np.array([1.1 / 0.7, 1.3 / 0.8, 1.7])
    ref = torch.nn.functional.interpolate(img.as_tensor()[None], scale_factor=tuple(1 / r), mode="trilinear",
                                          align_corners=False, recompute_scale_factor=False)[0]
    assert out.shape == ref.shape == (1, 14, 11, 10)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.diag(out.affine.numpy())[:3], [1.1, 1.3, 1.7])
    np.testing.assert_allclose(out.affine.numpy()[:3, 3], 0.5 * (r - 1) * [0.7, 0.8, 1.0])
