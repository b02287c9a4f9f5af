"""The fast preprocessing path against the MONAI/ITK path it replaces: the nibabel reader (stored dtype,
header rescale, geometry identical to ITK's), the resampler with the reorientation and crop/pad folded
in (grid, affine and values of Orientation + Spacing + ResizeWithPadOrCrop), the in-place HU mapping,
the geometry restore from CT-RATE metadata rows and DICOM PixelPaddingValue masking."""

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage, Orientation, ResizeWithPadOrCrop, Spacing

sys.path.insert(0, str(Path(__file__).parent))
from test_preprocess_phantom import (  # noqa: E402
    NODULE_LPS,
    ORIGIN_LPS,
    SHAPE,
    SPACING,
    lps_grid,
    phantom_hu,
    truth_lps_volume,
    write_dicom_series,
    write_nifti,
)

from transforms.hu import RescaleToHU  # noqa: E402
from transforms.io import CTVolumeReader, ITKVolumeReader, ResampleToSpacing, linear_resample_axes  # noqa: E402
from workflows.preprocess_cohort import CTPreprocessor, _geometry_from_metadata  # noqa: E402

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _load(path, reader):
    return EnsureChannelFirst()(LoadImage(reader=reader, image_only=True, dtype=None)(str(path)))


@pytest.mark.parametrize("axcodes,stored,dtype", [
    ("RAS", "hu", np.int16), ("LAS", "raw_scl", np.int16), ("LPS", "raw", np.int16),
    ("RAS", "slope2", np.int16), ("LPS", "raw_scl", np.uint16), (">RAS", "hu", np.int16),
])
def test_nifti_reader_matches_itk_geometry_and_values(tmp_path, axcodes, stored, dtype):
    p = write_nifti(tmp_path / "v.nii.gz", axcodes.lstrip(">"), stored, dtype=dtype)
    if axcodes.startswith(">"):  # a big-endian file
        img = nib.load(str(p))
        big = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header.as_byteswapped(">"))
        p = tmp_path / "big.nii.gz"
        nib.save(big, str(p))
        assert nib.load(str(p)).header.endianness == ">"
    ours, ref = _load(p, CTVolumeReader()), _load(p, ITKVolumeReader())
    assert ours.shape == ref.shape  # both (1, k, j, i)
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ours.numpy().astype(np.float64), ref.numpy().astype(np.float64))
    assert ours.dtype == torch.int16  # header rescale applied without leaving int16
    assert ours.as_tensor().is_contiguous()  # no transposing copy needed downstream
    if stored == "hu" or stored.startswith("raw_scl") or stored == "slope2":
        np.testing.assert_array_equal(
            Orientation("LPS", labels=RAS_LABELS)(ours)[0].numpy(), truth_lps_volume())


def test_nifti_reader_scaled_float_and_nan(tmp_path):
    # a non-integral slope becomes float32 (never float64), NaN stays NaN (ITK reads it as 0)
    data = np.arange(40 * 36 * 24, dtype=np.uint16).reshape(40, 36, 24) % 3000
    img = nib.Nifti1Image(data, np.diag([5.0, 5.0, 6.0, 1.0]))
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, str(tmp_path / "half.nii.gz"))
    out = _load(tmp_path / "half.nii.gz", CTVolumeReader())
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy().T, data * 0.5 - 1024.0)
    nan = np.full((12, 10, 9), 40.0, np.float32)
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii"))
    out = _load(tmp_path / "nan.nii", CTVolumeReader())
    assert out.dtype == torch.float32 and int(torch.isnan(out).sum()) == 1


def test_dicom_reader_is_itk_geometry_in_int16(tmp_path):
    folder = write_dicom_series(tmp_path / "s", descending=True)
    ours, ref = _load(folder, CTVolumeReader()), _load(folder, ITKVolumeReader())
    assert ours.dtype == torch.int16 and ref.dtype == torch.int32
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy())
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())


def _monai_reference(img, pixdim, size, pad):
    o = Orientation("RAS", labels=RAS_LABELS)(img)
    r = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border")(o)
    return ResizeWithPadOrCrop(size, mode="constant", value=pad)(r)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PLI"])
@pytest.mark.parametrize("size", [(20, 15, 40), (9, 7, 5)])  # pad, crop
def test_resampler_folds_orientation_and_crop_pad(axcodes, size):
    rng = np.random.default_rng(0)
    vol = MetaTensor(torch.from_numpy(rng.normal(size=(1, 23, 19, 13)).astype(np.float32)),
                     affine=torch.diag(torch.tensor([0.7, 0.8, 1.3, 1.0], dtype=torch.float64)))
    vol.affine[:3, 3] = torch.tensor([-5.0, 3.0, 10.0], dtype=torch.float64)
    img = Orientation(axcodes, labels=RAS_LABELS)(vol)  # the same anatomy stored in another orientation
    img = MetaTensor(img.as_tensor().contiguous(), affine=img.affine)
    pixdim = (1.1, 0.9, 2.0)
    ref = _monai_reference(img, pixdim, size, -7.0)
    ours = ResampleToSpacing(pixdim, axcodes="RAS", spatial_size=size, pad_value=-7.0)(img)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-4)
    # int16 output: the float result rounded (threads and slab size do not change it)
    ref16 = ResampleToSpacing(pixdim, axcodes="RAS", spatial_size=size, pad_value=-7.0)(img * 100)
    out16 = ResampleToSpacing(pixdim, "int16", slab=2, axcodes="RAS", spatial_size=size, pad_value=-7.0,
                              threads=2)(img * 100)
    assert out16.dtype == torch.int16
    np.testing.assert_array_equal(out16.numpy(), np.round(ref16.numpy()))


def test_linear_resample_axes_any_layout_and_errors():
    x = torch.randn(9, 8, 7)
    scales, shifts = [0.6, 1.3, -1.0], [0.2, -0.4, 6.0]  # the last axis read backwards (a flip)
    ref = linear_resample_axes(x.contiguous(), (14, 6, 7), scales, shifts)
    for y in (x.permute(2, 1, 0).contiguous().permute(2, 1, 0), x.transpose(0, 1).contiguous().transpose(0, 1)):
        np.testing.assert_allclose(linear_resample_axes(y, (14, 6, 7), scales, shifts).numpy(), ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(ref[:, :, 0].numpy(), linear_resample_axes(x, (14, 6, 1), scales[:2] + [1.0],
                                                                          shifts[:2] + [6.0])[:, :, 0].numpy(),
                               atol=1e-5)


def test_rescale_in_place_keeps_int16_and_never_touches_input_otherwise():
    raw = torch.from_numpy(truth_lps_volume().astype(np.int16) + 1024)[None]
    img = MetaTensor(raw.clone(), affine=torch.diag(torch.tensor([5.0, 5.0, 6.0, 1.0])))
    img[0, 0, 0, :] = -1000  # stored -1000 -> -2024 HU: floored
    before = img.clone()
    out, prov = RescaleToHU("metadata")(img, 1.0, -1024.0)
    assert out.dtype == torch.int16 and torch.equal(img, before)
    assert int(out.min()) == -1024 and prov["floored_fraction"] > 0
    out2, _ = RescaleToHU("metadata", inplace=True)(img, 1.0, -1024.0)
    assert out2.dtype == torch.int16 and out2.data_ptr() == img.data_ptr()
    assert torch.equal(out2.as_tensor(), out.as_tensor())


# ------------------------------------------------------------------ geometry restore from metadata (gap a)
def _metadata_row(name, geometry):
    from ctclip_contract import METADATA_COLUMNS

    row = {c: "" for c in METADATA_COLUMNS}
    row.update(VolumeName=f"{name}.nii.gz", RescaleSlope="1", RescaleIntercept="-1024", **geometry)
    return row


def test_geometry_restored_from_metadata_row_for_nifti_without_orientation(tmp_path):
    """A CT-RATE-release style file (sform_code = qform_code = 0, LPS-ordered array, 1 mm pixdim)
    plus its metadata row -> the same RAS volume as the correctly written file."""
    enc = pytest.importorskip("chest_phantom.encoding")
    hu = phantom_hu(lps_grid()).astype(np.float32)
    q = enc.quantise(hu, "int16_offset_raw")
    grid = {"shape": list(SHAPE), "spacing_mm": list(SPACING), "origin_mm": list(ORIGIN_LPS)}
    stored, a_lps = enc.orient(q["stored"], grid, "ctrate_broken")
    inp = tmp_path / "in"
    (inp / "volumes").mkdir(parents=True)
    facts = enc.write_nifti(inp / "volumes" / "train_1_a_1.nii.gz", stored, a_lps, "int16_offset_raw",
                            broken_geometry=True)
    assert facts["sform_code"] == 0 and facts["qform_code"] == 0
    write_nifti(inp / "volumes" / "train_2_a_1.nii.gz", "LAS", "raw_scl")  # the truth, correctly written
    geometry = {  # DICOM conventions: PixelSpacing = [between rows, between columns]; IPP of voxel (0, 0, 0)
        "XYSpacing": f"[{SPACING[1]}, {SPACING[0]}]", "ZSpacing": str(SPACING[2]),
        "ImagePositionPatient": json.dumps([float(v) for v in ORIGIN_LPS]),
        "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
    }
    rows = [_metadata_row("train_1_a_1", geometry), _metadata_row("train_2_a_1", geometry)]
    with open(inp / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    summary = CTPreprocessor(str(inp), str(out), "ctclip_tiny", spatial_size=[32, 32, 16], progress=False).run()
    assert summary["ok"] == 2, json.loads((out / "records" / "train_1_a_1.json").read_text())
    restored, truth = nib.load(str(out / "volumes" / "train_1_a_1.nii.gz")), nib.load(str(out / "volumes" / "train_2_a_1.nii.gz"))
    assert nib.aff2axcodes(restored.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(restored.affine)[:3], [8.0, 8.0, 10.0])
    np.testing.assert_allclose(restored.affine, truth.affine, atol=1e-4)
    a, b = np.asarray(restored.dataobj).astype(np.float64), np.asarray(truth.dataobj).astype(np.float64)
    assert np.abs(a - b).mean() < 0.5
    ijk = np.round(np.linalg.solve(restored.affine, [*(NODULE_LPS * [-1, -1, 1]), 1.0])[:3]).astype(int)
    assert a[tuple(ijk)] > 150  # the nodule on the patient's left, where the metadata says
    with open(out / "qc.csv", newline="") as f:
        qc = {r["name"]: r for r in csv.DictReader(f)}
    assert "geometry restored from metadata" in qc["train_1_a_1"]["warning"]
    assert qc["train_1_a_1"]["input_orientation"] == "LPS" and qc["train_1_a_1"]["hu_decision"] == "metadata"
    assert qc["train_1_a_1"]["input_spacing_mm"] == "5x5x6" and qc["train_1_a_1"]["input_shape"] == "40x36x24"
    # without the row the file is rejected with the reason
    rows[0]["ImageOrientationPatient"] = ""
    with open(inp / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    CTPreprocessor(str(inp), str(tmp_path / "out2"), "ctclip_tiny", spatial_size=[32, 32, 16], progress=False).run()
    rec = json.loads((tmp_path / "out2" / "records" / "train_1_a_1.json").read_text())
    assert rec["status"] == "rejected" and "no orientation in the NIfTI header" in rec["reason"]


def test_geometry_from_metadata_conventions():
    # voxel i along the IOP row direction with the between-columns spacing, k along the normal
    aff = _geometry_from_metadata({"XYSpacing": [0.7, 0.6], "ZSpacing": 1.5, "ImagePositionPatient": [-10, 20, 30],
                                   "ImageOrientationPatient": [1, 0, 0, 0, 1, 0]})
    np.testing.assert_allclose(aff, [[-0.6, 0, 0, 10], [0, -0.7, 0, -20], [0, 0, 1.5, 30], [0, 0, 0, 1]])
    assert _geometry_from_metadata({"XYSpacing": [0.7, 0.7], "ZSpacing": 1.5}) is None
    assert _geometry_from_metadata({"XYSpacing": [0.7, 0.7], "ZSpacing": 1.5, "ImagePositionPatient": [0, 0, 0],
                                    "ImageOrientationPatient": [1, 0, 0, 1, 0, 0]}) is None  # degenerate


# ------------------------------------------------------------------ DICOM PixelPaddingValue (gap b)
def _padded_series(folder, encoding, padding_hu):
    """The phantom with outside-FOV padding beyond a circle, written by the synthetic cohort's writers."""
    enc = pytest.importorskip("chest_phantom.encoding")
    dcm = pytest.importorskip("chest_phantom.dicom")
    grid = lps_grid()
    hu = phantom_hu(grid).astype(np.float32)
    outside = grid[..., 0] ** 2 + grid[..., 1] ** 2 > 85.0 ** 2
    hu[outside] = padding_hu
    q = enc.quantise(hu, encoding, padding_value_hu=padding_hu)
    a = {"shape": list(SHAPE), "spacing_mm": list(SPACING), "origin_mm": list(ORIGIN_LPS)}
    stored, a_lps = enc.orient(q["stored"], a, "LPS")
    meta = {"PatientID": "pad", "SliceThickness": SPACING[2]}
    dcm.write_dicom_series(folder, stored, a_lps, encoding, meta, f"pad-{encoding}", np.random.default_rng(0),
                           padding_stored=q["padding_stored"])
    return q, outside


@pytest.mark.parametrize("encoding,padding_hu", [("int16_offset", -3024.0), ("uint16_12bit", -2048.0),
                                                 ("uint16_slope_half", -3024.0)])
def test_dicom_pixel_padding_becomes_air(tmp_path, encoding, padding_hu):
    q, outside = _padded_series(tmp_path / "in" / "volumes" / "pad_1_a_1", encoding, padding_hu)
    assert q["padding_stored"] is not None and q["num_padding"] == int(outside.sum())
    out = tmp_path / "out"
    # spacing unchanged, no crop: every output voxel is an input voxel, so padding can be checked exactly
    pre = CTPreprocessor(str(tmp_path / "in"), str(out), "ctclip_tiny", spacing_mm=list(SPACING),
                         spatial_size=list(SHAPE), progress=False)
    assert pre.run()["ok"] == 1
    img = nib.load(str(out / "volumes" / "pad_1_a_1.nii.gz"))
    arr = Orientation("LPS", labels=RAS_LABELS)(MetaTensor(torch.from_numpy(np.asarray(img.dataobj))[None],
                                                           affine=torch.as_tensor(img.affine)))[0].numpy()
    assert np.all(arr[outside] == -1000)  # air (the model config's pad_hu), not the rescaled padding value
    inside_truth = np.clip(np.round(phantom_hu(lps_grid())), -1024, 3071)[~outside]
    assert np.abs(arr[~outside] - inside_truth).max() <= (1 if "slope" in encoding else 0)
    rec = json.loads((out / "records" / "pad_1_a_1.json").read_text())
    assert rec["hu"]["padding"]["fraction"] == pytest.approx(outside.mean())
    assert rec["hu"]["padding"]["hu"] == -1000.0


def test_bogus_unsigned_padding_value_is_masked(tmp_path):
    """GE-style unsigned padding 63536 (= -2000 as int16) with intercept -1024 rescales to 62512 "HU":
    without the mask the field of view edge would be metal-bright (and the HU decision implausible)."""
    pydicom = pytest.importorskip("pydicom")
    folder = write_dicom_series(tmp_path / "in" / "volumes" / "ge_1_a_1")
    outside = lps_grid()[..., 0] ** 2 + lps_grid()[..., 1] ** 2 > 85.0 ** 2  # (L, P, S)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        k = int(round((float(ds.ImagePositionPatient[2]) - ORIGIN_LPS[2]) / SPACING[2]))
        px = ds.pixel_array.astype(np.int32)  # (rows = P, columns = L), stored HU + 1024
        px[outside[:, :, k].T] = 63536
        ds.PixelRepresentation = 0
        ds.PixelData = px.astype(np.uint16).tobytes()
        ds.add_new(0x00280120, "US", 63536)  # PixelPaddingValue
        ds.save_as(f)
    from transforms.qc import check_dicom_series, padding_range

    info = check_dicom_series(folder)
    assert info["padding_value"] == 63536 and padding_range(info) == (62512.0, 62512.0)
    out = tmp_path / "out"
    CTPreprocessor(str(tmp_path / "in"), str(out), "ctclip_tiny", spacing_mm=list(SPACING), spatial_size=list(SHAPE),
                   progress=False).run()
    rec = json.loads((out / "records" / "ge_1_a_1.json").read_text())
    assert rec["status"] == "ok", rec["reason"]
    arr = np.asarray(nib.load(str(out / "volumes" / "ge_1_a_1.nii.gz")).dataobj)
    assert int(arr.max()) <= 3071 and int((arr == -1000).sum()) >= int(outside.sum())
    # inference on the raw series (ClassFine/zero-shot "one scan in") masks the padding the same way
    from monai.transforms import Compose

    from transforms import ToModelInputd, raw_to_model_input_transforms

    model_out = tmp_path / "out_model_geometry"
    CTPreprocessor(str(tmp_path / "in"), str(model_out), "ctclip_tiny", progress=False).run()
    stored = LoadImage(image_only=True, ensure_channel_first=True)(str(model_out / "volumes" / "ge_1_a_1.nii.gz"))
    stored = ToModelInputd.from_model_config("image", "ctclip_tiny")({"image": stored.float()})["image"]
    raw = Compose(raw_to_model_input_transforms("ctclip_tiny"))({"image": str(folder)})["image"]
    assert raw.shape == stored.shape
    assert float((raw - stored).abs().max()) <= 0.5 / 1000 + 1e-6  # int16 rounding of the stored volume, in model units


def test_integral_rescale_edge_cases_stay_exact():
    from transforms.io import _apply_scaling

    raw = np.asfortranarray(np.full((4, 5, 6), 20000, np.int16))
    raw[0, 0, 0] = 30000
    # the product overflows int16 in place but the result fits: exact through wrap-around
    out = _apply_scaling(raw.copy(order="F"), 2.0, -40000.0)
    assert out.dtype == np.int16 and (out.min(), out.max()) == (0, 20000)
    # an intercept outside int16: slab path, still int16 and exact
    out = _apply_scaling(raw.copy(order="F"), 1.0, -40000.0)
    assert out.dtype == np.int16 and (out.min(), out.max()) == (-20000, -10000)
    # a result outside int16: float32, exact for integers
    out = _apply_scaling(raw.copy(order="F"), 3.0, 0.0)
    assert out.dtype == np.float32 and out.max() == 90000.0
    hu = RescaleToHU._apply(torch.from_numpy(raw.copy()), 1.0, -40000.0, inplace=True)
    assert int(hu.min()) == -20000 and int(hu.max()) == -10000


@pytest.mark.parametrize("axcodes", ["RAS", "LPS"])
def test_model_input_through_ct_reader_equals_nibabel_reader(tmp_path, axcodes):
    """The training loader reads stored volumes with CTVolumeReader (no transposing copy) instead of MONAI's
    NibabelReader: the model input, windowed or deferred int16, and its affine are the same."""
    from transforms import ToModelInput

    p = write_nifti(tmp_path / "v.nii.gz", axcodes, "hu", dtype=np.int16)
    for window in (True, False):
        to_input = ToModelInput.from_model_config("ctclip_tiny", window=window)
        ours, ref = to_input(_load(p, CTVolumeReader())), to_input(_load(p, "NibabelReader"))
        assert ours.dtype == ref.dtype and torch.equal(ours.as_tensor(), ref.as_tensor())
        np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy(), atol=1e-6)
