"""Storage encodings of the synthetic cohort read back through real readers (chest_phantom/README.md,
"Storage encodings and orientations", "QA checks")."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage, Orientation

from chest_phantom.dicom import write_dicom_series
from chest_phantom.encoding import (
    ENCODINGS, HU_CLIP, ORIENTATIONS, decode_hu, encoding_facts, orient, quantise, write_nifti,
)

from synthetic_standin import standin_volume

VARIANTS = [(e, f, o) for e in ENCODINGS for f in ("nifti", "dicom") for o in ORIENTATIONS
            if f in ENCODINGS[e]["formats"] and f in ORIENTATIONS[o]["formats"] and not ORIENTATIONS[o].get("broken_geometry")]


def _write(tmp: Path, hu, grid, enc, fmt, ori, padding=-3024.0):
    q = quantise(hu, enc, padding)
    stored, a = orient(q["stored"], grid, ori)
    if fmt == "nifti":
        path = tmp / f"{enc}_{ori}.nii.gz"
        write_nifti(path, stored, a, enc)
    else:
        path = tmp / f"{enc}_{ori}"
        write_dicom_series(path, stored, a, enc, {"SliceThickness": grid["spacing_mm"][2], "PatientID": "train_1",
                            "PatientPosition": ORIENTATIONS[ori]["patient_position"]},
                           f"train_1_a_{enc}_{ori}", np.random.default_rng(0),
                           padding_stored=q["padding_stored"] if q["num_padding"] else None)
    return path, q, stored, a


def _read_ras(path):
    img = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(path))
    img = Orientation("RAS", labels=None)(img)
    return img[0].numpy().astype(np.float32), np.asarray(img.affine, dtype=float)


def _grid_to_ras(array, grid):
    """The LPS grid array in RAS index order, and its RAS affine."""
    out, a = orient(array, grid, "RAS")
    return out, np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


@pytest.fixture(scope="module")
def standin():
    hu, grid = standin_volume()
    hu[:2][hu[:2] < -950] = -3024.0  # a band of outside-FOV padding
    return hu, grid


@pytest.mark.parametrize("enc, fmt, ori", VARIANTS)
def test_every_variant_reads_back_to_the_same_hu(tmp_path, standin, enc, fmt, ori):
    hu, grid = standin
    path, q, _, _ = _write(tmp_path, hu, grid, enc, fmt, ori)
    values, affine = _read_ras(path)
    got = decode_hu(values, encoding_facts(enc, q))
    expected, expected_affine = _grid_to_ras(q["hu"], grid)
    assert got.shape == expected.shape
    np.testing.assert_allclose(affine, expected_affine, atol=1e-3)
    np.testing.assert_array_equal(got, expected)  # the stored integers are read back exactly
    # against the 12-bit HU truth: exact for slope 1, within slope/2 otherwise (tissue voxels)
    truth, _ = _grid_to_ras(np.clip(np.rint(hu), *HU_CLIP), grid)
    tissue, _ = _grid_to_ras(hu > -3000, grid)
    err = np.abs(got - truth)[tissue].max()
    assert err <= ENCODINGS[enc]["slope"] / 2
    if ENCODINGS[enc]["slope"] == 1:
        assert err == 0
    # padding keeps the vendor value when the encoding can hold it, else the lowest storable HU
    pad = got[~tissue]
    assert pad.size and np.all(pad == q["padding_value_hu"])
    assert q["padding_value_hu"] == (-3024.0 if ENCODINGS[enc]["dtype"] == "int16" else
                                     ENCODINGS[enc]["intercept"])


def test_fixed_trap_shows_the_minus_1024_shift(tmp_path, standin):
    hu, grid = standin
    path, q, _, _ = _write(tmp_path, hu, grid, "hu_fixed_trap", "nifti", "RAS")
    facts = encoding_facts("hu_fixed_trap", q)
    assert facts["hu_fixed_trap"] and facts["row_intercept"] == -1024.0
    values, _ = _read_ras(path)
    expected, _ = _grid_to_ras(q["hu"], grid)
    np.testing.assert_array_equal(decode_hu(values, facts), expected)
    naive = decode_hu(values, facts, trust_metadata_row=True)  # what a user applying the CSV row gets
    np.testing.assert_array_equal(naive, expected - 1024)
    assert np.median(naive[expected < -990]) < -2000  # air at about -2024: the tell-tale


def test_raw_release_needs_the_metadata_row(tmp_path, standin):
    hu, grid = standin
    path, q, _, _ = _write(tmp_path, hu, grid, "int16_offset_raw", "nifti", "LPS")
    img = nib.load(path)
    assert float(img.dataobj.slope) == 1.0 and float(img.dataobj.inter) == 0.0
    raw = np.asarray(img.dataobj)
    np.testing.assert_array_equal(raw + -1024, q["hu"])  # stored = HU + 1024; the row says intercept -1024


@pytest.mark.parametrize("enc", ["int16_offset", "uint16_12bit", "uint16_slope2", "uint16_slope_half", "int16_hu"])
def test_nifti_header_carries_the_rescale(tmp_path, standin, enc):
    hu, grid = standin
    path, q, stored, a = _write(tmp_path, hu, grid, enc, "nifti", "LAS")
    img = nib.load(path)
    hdr = img.header
    assert hdr.get_data_dtype() == np.dtype(ENCODINGS[enc]["dtype"])
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    assert "".join(nib.aff2axcodes(img.affine)) == "LAS"
    with gzip.open(path, "rb") as f:  # nibabel moves scl_* into the data proxy on load: read the raw header
        raw = nib.Nifti1Header.from_fileobj(f)
    assert float(raw["scl_slope"]) == ENCODINGS[enc]["slope"] and float(raw["scl_inter"]) == ENCODINGS[enc]["intercept"]
    assert float(img.dataobj.slope) == ENCODINGS[enc]["slope"] and float(img.dataobj.inter) == ENCODINGS[enc]["intercept"]
    np.testing.assert_array_equal(np.asarray(img.dataobj.get_unscaled()), stored)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_dicom_series_is_real_ct_storage(tmp_path, standin):
    hu, grid = standin
    path, q, stored, a = _write(tmp_path, hu, grid, "uint16_12bit", "dicom", "prone")
    files = sorted(p for p in path.iterdir())
    assert len(files) == stored.shape[2]
    dss = [pydicom.dcmread(p) for p in files]
    assert {ds.file_meta.TransferSyntaxUID for ds in dss} == {pydicom.uid.ExplicitVRLittleEndian}
    assert {ds.SOPClassUID for ds in dss} == {pydicom.uid.CTImageStorage}
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({getattr(ds, tag) for ds in dss}) == 1
    assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
    ds = dss[0]
    assert [float(v) for v in ds.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
    assert ds.PatientPosition == "HFP"
    assert ds.PixelRepresentation == 0 and ds.BitsStored == 12 and ds.HighBit == 11
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert [float(v) for v in ds.PixelSpacing] == [grid["spacing_mm"][1], grid["spacing_mm"][0]]
    assert float(ds.SpacingBetweenSlices) == grid["spacing_mm"][2]
    # positions cover the grid's z range; instance numbers do not follow them
    by_z = sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))
    zs = [float(d.ImagePositionPatient[2]) for d in by_z]
    np.testing.assert_allclose(np.diff(zs), grid["spacing_mm"][2], atol=1e-4)
    inst = [int(d.InstanceNumber) for d in by_z]
    assert sorted(inst) == list(range(1, len(dss) + 1)) and inst != sorted(inst) and inst != sorted(inst)[::-1]
    # file names are not in slice order either
    assert [p.name for p in files] != [p.name for p in sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))]
    # pixel data decodes to the stored rows/columns of that slice
    k = int(round((zs[0] - a[2, 3]) / a[2, 2]))
    np.testing.assert_array_equal(by_z[0].pixel_array, stored[:, :, k].T)


def test_reconstructions_of_one_scan_share_study_and_frame_of_reference(tmp_path, standin):
    hu, grid = standin
    q = quantise(hu, "int16_offset", -2048.0)
    stored, a = orient(q["stored"], grid, "LPS")
    uids = [write_dicom_series(tmp_path / f"train_1_a_{r}", stored, a, "int16_offset", {"SliceThickness": 1},
                               f"train_1_a_{r}_99", np.random.default_rng(r), padding_stored=q["padding_stored"],
                               study_key="train_1_a_99") for r in (1, 2)]
    assert uids[0]["study_uid"] == uids[1]["study_uid"]
    assert uids[0]["frame_of_reference_uid"] == uids[1]["frame_of_reference_uid"]
    assert uids[0]["series_uid"] != uids[1]["series_uid"]
    ds = pydicom.dcmread(next((tmp_path / "train_1_a_2").iterdir()))
    assert ds.StudyInstanceUID == uids[0]["study_uid"] and ds.SeriesInstanceUID == uids[1]["series_uid"]
    assert ds.PixelPaddingValue == -1024 and ds["PixelPaddingValue"].VR == "SS"  # raw value of -2048 HU, signed


def test_quantise_rejects_unknown_encoding():
    with pytest.raises(KeyError, match="int8"):
        quantise(np.zeros((2, 2, 2)), "int8")


def test_real_phantom_round_trip(tmp_path):
    """The renderer's phantom (tests geometry), one reconstruction, every variant → the same HU."""
    from chest_phantom.record import sample_case_record
    from chest_phantom.render import render_truth
    from chest_phantom.scanner import apply_scanner, default_grid, sample_recon

    rec = sample_case_record("train_1", "a", 11, balanced=True)
    grid = default_grid(rec, "tests", np.random.default_rng(0))
    recon = dict(sample_recon(rec, np.random.default_rng(1), 1), padding_value_hu=-3024.0)
    hu = apply_scanner(render_truth(rec, grid), grid, recon, 5)
    truth = np.clip(np.rint(hu), *HU_CLIP)
    inside = hu > -3000
    assert (~inside).any() and inside.any()
    decoded = {}
    for enc, fmt, ori in VARIANTS:
        path, q, _, _ = _write(tmp_path, hu, grid, enc, fmt, ori)
        values, _ = _read_ras(path)
        got = decode_hu(values, encoding_facts(enc, q))
        expected, _ = _grid_to_ras(truth, grid)
        mask, _ = _grid_to_ras(inside, grid)
        err = np.abs(got - expected)[mask].max()
        assert err <= ENCODINGS[enc]["slope"] / 2, (enc, fmt, ori, err)
        decoded[(enc, fmt, ori)] = got
        if enc == "hu_fixed_trap":
            naive = decode_hu(values, encoding_facts(enc, q), trust_metadata_row=True)
            np.testing.assert_array_equal(naive[mask], expected[mask] - 1024)
    lossless = [v for (e, _, _), v in decoded.items() if ENCODINGS[e]["slope"] == 1]
    mask, _ = _grid_to_ras(inside, grid)
    for v in lossless[1:]:
        np.testing.assert_array_equal(v[mask], lossless[0][mask])
