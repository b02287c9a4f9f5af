"""Segmentation masks as data, end to end (#23 §1): the phantom's anatomical label map and finding masks, the
cohort's files beside each volume, and the preprocessing carrying them through the image's geometry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_preprocess_phantom import NODULE_LPS, SHAPE, lps_grid, phantom_hu, write_dicom_series, write_nifti

from chest_phantom import default_grid, render_truth, sample_case_record
from chest_phantom.cohort import generate_cohort
from ctclip_contract import CTRATE_PATHOLOGIES
from ctclip_contract.anatomy import (ANATOMY_LABELS, LABEL_TABLE_FILE, REGION_IDS, finding_bit, label_table,
                                     mask_paths)
from workflows.preprocess_cohort import QC_COLUMNS, CTPreprocessor

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _record(*labels, seed=3):
    prev = {n: (1.0 if n in labels else 0.0) for n in CTRATE_PATHOLOGIES}
    return sample_case_record("train_1", "a", seed, prevalence=prev)


# ------------------------------------------------------------------------------------------------ the phantom
@pytest.fixture(scope="module")
def effusion_case():
    rec = _record("Pleural effusion", "Lung nodule", "Cardiomegaly", "Emphysema", seed=8)
    assert "Pleural effusion" in {f["label"] for f in rec["findings"]}
    grid = default_grid(rec, "tests", np.random.default_rng(0))
    return rec, grid, render_truth(rec, grid, finding_masks=True)


def test_anatomy_label_map_holds_the_regions_where_the_phantom_draws_them(effusion_case):
    rec, grid, truth = effusion_case
    seg, hu = truth["anatomy"], truth["hu"]
    assert seg.dtype == np.uint8 and seg.shape == tuple(grid["shape"])
    present = {ANATOMY_LABELS[int(i)] for i in np.unique(seg) if i}
    for region in ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
                   "lung_lower_lobe_right", "trachea", "heart", "aorta", "esophagus", "bone", "liver", "body_wall",
                   "mediastinum", "pleural_space"):
        assert region in present, region
    # each region has the density of what it is (truth HU, before the scanner)
    lobes = np.isin(seg, [REGION_IDS[n] for n in ANATOMY_LABELS.values() if n.startswith("lung_")])
    assert np.median(hu[lobes]) < -700
    assert np.median(hu[seg == REGION_IDS["bone"]]) > 150
    assert 0 < np.median(hu[seg == REGION_IDS["liver"]]) < 100
    assert np.median(hu[seg == REGION_IDS["trachea"]]) < -500  # the lumen is the bulk of it
    assert np.all(seg[hu < -990] != REGION_IDS["body_wall"])
    # left lobes on the patient's left (LPS x > 0)
    x = (np.arange(grid["shape"][0]) * grid["spacing_mm"][0] + grid["origin_mm"][0])[:, None, None]
    assert np.all(np.broadcast_to(x, seg.shape)[seg == REGION_IDS["lung_lower_lobe_left"]] > 0)


def test_finding_masks_mark_what_was_drawn_and_change_no_hu(effusion_case):
    rec, grid, truth = effusion_case
    plain = render_truth(rec, grid)
    assert np.array_equal(plain["hu"], truth["hu"]) and "findings" not in plain
    assert np.array_equal(plain["anatomy"], truth["anatomy"])
    bits = truth["findings"]
    assert bits.dtype == np.int32
    drawn = {f["label"] for f in rec["findings"]}
    for i, name in enumerate(CTRATE_PATHOLOGIES):
        if name not in drawn:
            assert not np.any(bits & (1 << i)), name
    effusion = (bits & finding_bit("Pleural effusion")) > 0
    assert effusion.sum() > 20
    # the effusion is the anatomy's pleural space (where no rib or vessel lies over it), and fluid
    assert np.all(effusion[truth["anatomy"] == REGION_IDS["pleural_space"]])
    assert np.mean(truth["anatomy"][effusion] == REGION_IDS["pleural_space"]) > 0.7
    assert np.median(truth["hu"][effusion]) > -150  # mostly fluid (+10 HU), partial volume with fat and lung
    nodule = (bits & finding_bit("Lung nodule")) > 0
    f = next(f for f in rec["findings"] if f["label"] == "Lung nodule")
    centre = np.round((np.asarray(f["centers_mm"][0]) - grid["origin_mm"]) / grid["spacing_mm"]).astype(int)
    assert nodule[tuple(centre)]
    assert ((bits & finding_bit("Cardiomegaly")) > 0).sum() == (truth["anatomy"] == REGION_IDS["heart"]).sum() or \
        np.mean(truth["anatomy"][(bits & finding_bit("Cardiomegaly")) > 0] == REGION_IDS["heart"]) > 0.8
    assert ((bits & finding_bit("Emphysema")) > 0).sum() > 0


# ------------------------------------------------------------------------------------------------ the cohort
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort_masks")
    generate_cohort(out, 2, seed=5, geometry="tests", num_workers=1, progress=False, dicom_fraction=0.5,
                    two_recon_fraction=1.0, anisotropic_fraction=0.5, balanced=True)
    return out


def test_cohort_writes_masks_beside_every_volume_on_its_grid(cohort):
    assert json.loads((cohort / LABEL_TABLE_FILE).read_text()) == label_table()
    assert json.loads((cohort / "cohort.json").read_text())["parameters"]["finding_masks"] is True
    sidecars = sorted((cohort / "ground_truth").glob("*.json"))
    assert len(sidecars) >= 2
    formats = set()
    for path in sidecars:
        side = json.loads(path.read_text())
        storage = side["storage"]
        formats.add(storage["format"])
        assert storage["masks"] == {k: mask_paths(storage["path"])[k].as_posix() for k in ("seg", "findings")} | \
            {"label_table": LABEL_TABLE_FILE}
        for key, dtype in (("seg", np.uint8), ("findings", np.int32)):
            img = nib.load(str(cohort / storage["masks"][key]))
            assert img.get_data_dtype() == dtype
            assert list(img.shape) == storage["shape"]
            np.testing.assert_allclose(img.affine, storage["affine_ras"], atol=1e-4)
        seg = np.asarray(nib.load(str(cohort / storage["masks"]["seg"])).dataobj)
        assert set(np.unique(seg).tolist()) <= {0, *ANATOMY_LABELS}
        bits = np.asarray(nib.load(str(cohort / storage["masks"]["findings"])).dataobj)
        drawn = {f["label"] for f in side["record"]["findings"]}
        assert set(n for i, n in enumerate(CTRATE_PATHOLOGIES) if np.any(bits & (1 << i))) <= drawn
    assert formats == {"nifti", "dicom"}


@pytest.mark.parametrize("anatomy", [True, False])
def test_masks_off_leave_the_volumes_as_they_were(cohort, tmp_path, anatomy):
    out = tmp_path / "no_findings"
    generate_cohort(out, 2, seed=5, geometry="tests", num_workers=1, progress=False, dicom_fraction=0.5,
                    two_recon_fraction=1.0, anisotropic_fraction=0.5, balanced=True, finding_masks=False,
                    anatomy_masks=anatomy)
    assert not list(out.rglob("*_findings.nii.gz"))
    assert bool(list(out.rglob("*_seg.nii.gz"))) == anatomy == (out / LABEL_TABLE_FILE).exists()
    assert json.loads((out / "cohort.json").read_text())["parameters"]["anatomy_masks"] is anatomy
    if not anatomy:
        assert all(json.loads(p.read_text())["storage"]["masks"] == {} for p in (out / "ground_truth").glob("*.json"))
    for path in sorted((cohort / "volumes").rglob("*")):
        if path.is_file() and "_findings" not in path.name and (anatomy or "_seg" not in path.name):
            assert path.read_bytes() == (out / path.relative_to(cohort)).read_bytes(), path.name


def test_preprocessed_cohort_lists_its_masks(cohort, tmp_path):
    out = tmp_path / "pre"
    CTPreprocessor(str(cohort), str(out), "ctclip_tiny", progress=False).run()
    rows = list(csv.DictReader(open(out / "qc.csv")))
    assert rows and all(r["status"] == "ok" and r["mask_reason"] == "" for r in rows), rows
    assert all(r["seg"] == f"volumes/{r['name']}_seg.nii.gz" and r["findings_mask"] for r in rows)
    datalist = json.loads((out / "datalist.json").read_text())
    entries = [e for split in datalist.values() for e in split]
    assert len(entries) == len(rows)
    manifest = json.loads((out / "manifest.json").read_text())
    for e in entries:
        image = nib.load(str(out / e["image"]))
        assert e["findings"] != e["findings_mask"]  # the report's Findings text stays what it was
        for key, dtype in (("seg", np.uint8), ("findings_mask", np.int32)):
            m = nib.load(str(out / e[key]))
            assert m.shape == image.shape and m.get_data_dtype() == dtype
            np.testing.assert_allclose(m.affine, image.affine, atol=1e-5)
        assert manifest["volumes"][e["name"]]["seg"] == e["seg"]
        seg = np.asarray(nib.load(str(out / e["seg"])).dataobj)
        hu = np.asarray(image.dataobj)
        lungs = np.isin(seg, [REGION_IDS[n] for n in ANATOMY_LABELS.values() if n.startswith("lung_")])
        assert lungs.sum() > 50 and np.median(hu[lungs]) < -600  # still on the lungs after resampling
    # a resumed run redoes nothing (the mask inputs and outputs are verified with the volume)
    assert CTPreprocessor(str(cohort), str(out), "ctclip_tiny", progress=False).run()["resumed"] == len(rows)


# ------------------------------------------------------------------------------------------------ preprocessing
REGIONS = {"lung_upper_lobe_left": 1, "lung_upper_lobe_right": 3, "bone": 16, "heart": 10}


def _phantom_seg_lps() -> np.ndarray:
    """uint8 label map of the test phantom on its LPS grid: left/right lung, spine, 'nodule' as heart."""
    lps = lps_grid()
    hu = phantom_hu(lps)
    seg = np.zeros(SHAPE, np.uint8)
    seg[(hu == -850.0) & (lps[..., 0] > 0)] = REGION_IDS["lung_upper_lobe_left"]
    seg[(hu == -850.0) & (lps[..., 0] < 0)] = REGION_IDS["lung_upper_lobe_right"]
    seg[hu == 700.0] = REGION_IDS["bone"]
    seg[np.sum((lps - NODULE_LPS) ** 2, axis=-1) <= 12.5**2] = REGION_IDS["heart"]
    return seg


def _write_mask_like(volume: Path, data_lps: np.ndarray, key: str = "seg", axcodes: str = "RAS", shift=(0, 0, 0)):
    """Write a mask on the phantom's grid, stored in ``axcodes`` (as the volume beside it may not be)."""
    from test_preprocess_phantom import _lps_affine_ras

    affine = _lps_affine_ras()
    affine[:3, 3] += np.asarray(shift, float)
    img = nib.Nifti1Image(data_lps, affine)
    xform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                            nib.orientations.axcodes2ornt(tuple(axcodes)))
    img = img.as_reoriented(xform)
    path = mask_paths(volume)[key]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(path))
    return path


def _centroids_ras(seg: np.ndarray, affine_ras: np.ndarray) -> dict:
    out = {}
    for name, rid in REGIONS.items():
        idx = np.argwhere(seg == rid)
        out[name] = (affine_ras[:3, :3] @ idx.mean(axis=0) + affine_ras[:3, 3]) if len(idx) else None
    return out


@pytest.mark.parametrize("resampler", ["separable", "monai"])
def test_masks_survive_preprocessing_aligned(tmp_path, resampler):
    """#23's acceptance test: each region's centroid stays within one voxel after reorientation and resampling."""
    from test_preprocess_phantom import _lps_affine_ras

    inp = tmp_path / "in"
    seg_lps = _phantom_seg_lps()
    bits = np.zeros(SHAPE, np.int32)
    bits[seg_lps == REGION_IDS["heart"]] |= finding_bit("Lung nodule")
    bits[seg_lps == REGION_IDS["lung_upper_lobe_left"]] |= finding_bit("Emphysema")
    bits[(seg_lps == REGION_IDS["heart"]) | (seg_lps == REGION_IDS["lung_upper_lobe_left"])] |= finding_bit("Consolidation")
    vols = {"las": write_nifti(inp / "las.nii.gz", "LAS"), "lps": write_nifti(inp / "lps.nii.gz", "LPS", "raw_scl"),
            "dcm": write_dicom_series(inp / "dcm", descending=True)}
    for name, vol in vols.items():
        _write_mask_like(vol, seg_lps, "seg", "PIR" if name == "las" else "RAS")  # any storage order of the grid
        _write_mask_like(vol, bits, "findings", "LPS")
    out = tmp_path / "out"
    spacing, size = (4.0, 3.5, 5.0), (48, 48, 24)
    CTPreprocessor(str(inp), str(out), "ctclip_tiny", spacing_mm=spacing, spatial_size=size, progress=False,
                   resampler=resampler, strict=True).run()
    before = _centroids_ras(seg_lps, _lps_affine_ras())
    for name in vols:
        seg_img = nib.load(str(out / "volumes" / f"{name}_seg.nii.gz"))
        assert nib.aff2axcodes(seg_img.affine) == ("R", "A", "S") and seg_img.shape == size
        after = _centroids_ras(np.asarray(seg_img.dataobj), seg_img.affine)
        for region in REGIONS:
            assert np.all(np.abs(after[region] - before[region]) < np.asarray(spacing)), (name, region)
        bits_out = np.asarray(nib.load(str(out / "volumes" / f"{name}_findings.nii.gz")).dataobj)
        seg_out = np.asarray(seg_img.dataobj)
        # nearest neighbour: the bits are exactly those of the region each voxel landed in
        assert set(np.unique(bits_out).tolist()) <= {0, int(bits.max()), *np.unique(bits).tolist()}
        heart = seg_out == REGION_IDS["heart"]
        assert heart.any() and np.all(bits_out[heart] == finding_bit("Lung nodule") | finding_bit("Consolidation"))
        # and the image itself still shows the nodule (+300 HU) where the mask says
        hu = np.asarray(nib.load(str(out / "volumes" / f"{name}.nii.gz")).dataobj)
        assert np.median(hu[heart]) > 200


def test_bad_masks_get_a_reason_and_the_run_goes_on(tmp_path):
    inp = tmp_path / "in"
    seg = _phantom_seg_lps()
    good = write_nifti(inp / "good.nii.gz")
    _write_mask_like(good, seg)
    shifted = write_nifti(inp / "shifted.nii.gz")
    _write_mask_like(shifted, seg, shift=(2.5, 0, 0))  # half a voxel off: another grid
    outside = write_nifti(inp / "outside.nii.gz")
    bad_labels = seg.copy()
    bad_labels[0, 0, 0] = 77
    _write_mask_like(outside, bad_labels)
    write_nifti(inp / "missing.nii.gz")  # anatomy_labels.json promises a label map for it
    bad_bits = write_nifti(inp / "badbits.nii.gz")
    _write_mask_like(bad_bits, seg)
    _write_mask_like(bad_bits, np.full(SHAPE, 1 << 20, np.int32), "findings")
    (inp / "orphan_seg.nii.gz").write_bytes(mask_paths(good)["seg"].read_bytes())
    (inp / LABEL_TABLE_FILE).write_text(json.dumps(label_table()))
    out = tmp_path / "out"
    CTPreprocessor(str(inp), str(out), "ctclip_tiny", progress=False).run()
    rows = {r["name"]: r for r in csv.DictReader(open(out / "qc.csv"))}
    assert list(rows["good"]) == [*QC_COLUMNS, "seg", "findings_mask", "mask_reason"]
    for name in ("good", "shifted", "outside", "missing", "badbits"):
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["good"]["mask_reason"] == "" and rows["good"]["seg"] == "volumes/good_seg.nii.gz"
    assert rows["shifted"]["mask_reason"].startswith("shifted_seg.nii.gz: its grid (")
    assert "does not match the image's" in rows["shifted"]["mask_reason"] and rows["shifted"]["seg"] == ""
    assert rows["outside"]["mask_reason"] == "outside_seg.nii.gz: labels outside the table anatomy_labels.json: 77"
    assert rows["missing"]["mask_reason"].startswith("missing_seg.nii.gz: missing (anatomy_labels.json promises")
    assert rows["badbits"]["mask_reason"].startswith("badbits_findings.nii.gz: finding bits outside the 18")
    assert rows["orphan_seg"]["status"] == "rejected" and "a mask without its volume" in rows["orphan_seg"]["reason"]
    datalist = json.loads((out / "datalist.json").read_text())
    with_seg = sorted(e["name"] for split in datalist.values() for e in split if "seg" in e)
    assert with_seg == ["badbits", "good"]  # badbits: its label map was fine, its findings were not
    assert not (out / "volumes" / "shifted_seg.nii.gz").exists()
    (inp / "orphan_seg.nii.gz").unlink()
    with pytest.raises(Exception, match="badbits_findings.nii.gz: finding bits outside"):  # strict: the first one
        CTPreprocessor(str(inp), str(tmp_path / "strict"), "ctclip_tiny", progress=False, strict=True).run()


def test_without_masks_the_outputs_are_those_of_before(tmp_path):
    inp = tmp_path / "in"
    write_nifti(inp / "a.nii.gz", "LAS")
    out = tmp_path / "out"
    runner = CTPreprocessor(str(inp), str(out), "ctclip_tiny", progress=False)
    assert "seg_mapping" not in runner.params
    runner.run()
    assert next(csv.reader(open(out / "qc.csv"))) == list(QC_COLUMNS)
    entry = json.loads((out / "datalist.json").read_text())
    assert all(set(e) == {"image", "name", "patient", "findings", "impressions"} for s in entry.values() for e in s)
    record = json.loads((out / "records" / "a.json").read_text())
    assert not {"seg", "findings_mask", "mask_inputs", "mask_reason"} & set(record)
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["a.nii.gz"]


def test_totalsegmentator_layouts_map_onto_our_regions(tmp_path):
    """A user's own masks: one file per structure (TotalSegmentator's default) or one multi-label file + mapping."""
    inp = tmp_path / "in"
    seg = _phantom_seg_lps()
    write_nifti(inp / "folder.nii.gz")
    structures = inp / "folder_seg"
    structures.mkdir()
    from test_preprocess_phantom import _lps_affine_ras

    for name, mask in (("lung_upper_lobe_left", seg == 1), ("rib_left_3", seg == REGION_IDS["bone"]),
                       ("femur_left", seg == REGION_IDS["heart"])):  # femur: not ours, dropped
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), _lps_affine_ras()), str(structures / f"{name}.nii.gz"))
    multi_vol = write_nifti(inp / "multi.nii.gz")
    ts = np.zeros(SHAPE, np.uint8)  # TotalSegmentator's own ids: 10 upper left lobe, 51 heart, 92 rib_left_1
    ts[seg == 1], ts[seg == REGION_IDS["heart"]], ts[seg == REGION_IDS["bone"]] = 10, 51, 92
    _write_mask_like(multi_vol, ts)
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"labels": {"10": "lung_upper_lobe_left", "51": "heart", "92": "rib_left_1"},
                                   "regions": {"lung_upper_lobe_left": "lung_upper_lobe_left", "heart": "heart",
                                               "rib_left_1": "bone", "rib_left_3": "bone"}}))
    out = tmp_path / "out"
    runner = CTPreprocessor(str(inp), str(out), "ctclip_tiny", progress=False, seg_mapping=str(mapping), strict=True)
    assert runner.params["seg_mapping"]["sha256"]
    runner.run()
    got = {n: set(np.unique(np.asarray(nib.load(str(out / "volumes" / f"{n}_seg.nii.gz")).dataobj)).tolist())
           for n in ("folder", "multi")}
    assert got["folder"] == {0, 1, REGION_IDS["bone"]}
    assert got["multi"] == {0, 1, REGION_IDS["heart"], REGION_IDS["bone"]}
    # without a mapping, the folder's TotalSegmentator names map by the default table
    CTPreprocessor(str(inp), str(tmp_path / "default"), "ctclip_tiny", progress=False).run()
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "default" / "qc.csv"))}
    assert rows["folder"]["seg"] and rows["folder"]["mask_reason"] == ""
    assert rows["multi"]["mask_reason"].startswith("multi_seg.nii.gz: labels outside the table of our regions")
