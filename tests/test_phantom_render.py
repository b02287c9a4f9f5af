"""Phantom rendering and scanner model: grids, determinism, orientation through MONAI readers, HU per tissue."""

import nibabel as nib
import numpy as np
import pytest

from chest_phantom import apply_scanner, default_grid, render_truth, sample_case_record, sample_recon
from ctclip_contract import CTRATE_PATHOLOGIES


def _only(*labels, seed=3, **kw):
    prev = {n: (1.0 if n in labels else 0.0) for n in CTRATE_PATHOLOGIES}
    return sample_case_record("train_1", "a", seed, prevalence=prev, **kw)


@pytest.fixture(scope="module")
def normal_case():
    rec = _only(seed=11)
    rec["incidental"] = []  # no steatosis: liver HU is checked
    rec["anatomy"]["liver_hu"] = 60.0
    grid = default_grid(rec, "qa", np.random.default_rng(0))
    truth = render_truth(rec, grid)
    recon = dict(sample_recon(rec, np.random.default_rng(0), 1), padding_value_hu=-3024.0)
    img = apply_scanner(truth, grid, recon, seed=1)
    return rec, grid, truth, img


def test_grid_presets_and_overrides():
    rec = _only()
    rng = np.random.default_rng(0)
    demo = default_grid(rec, "demo", rng)
    assert demo["shape"][:2] == [128, 128]
    assert 2.5 <= demo["spacing_mm"][2] <= 3.5 and 360 / 128 <= demo["spacing_mm"][0] <= 460 / 128
    z0 = demo["origin_mm"][2]
    z1 = z0 + (demo["shape"][2] - 1) * demo["spacing_mm"][2]
    a = rec["anatomy"]
    assert z1 > a["z_lung_apex_mm"] and z0 < min(a["z_dome_right_mm"], a["z_dome_left_mm"]) - 40
    assert 300 <= z1 - z0 <= 400
    tests = default_grid(rec, "tests", rng)
    assert tests["shape"][0] == 64 and 6.0 <= tests["spacing_mm"][2] <= 8.0
    over = default_grid(rec, {"preset": "tests", "matrix": 48, "slice_spacing_mm": 5.0}, rng)
    assert over["shape"][0] == 48 and over["spacing_mm"][2] == 5.0
    fixed = {"shape": [10, 11, 12], "spacing_mm": [1.0, 1.0, 2.0], "origin_mm": [0.0, 0.0, 0.0]}
    assert default_grid(rec, fixed, rng) == fixed
    with pytest.raises(ValueError):
        default_grid(rec, "cinema", rng)


def test_recon_parameters_agree_within_a_scan():
    rec = _only()
    r1 = sample_recon(rec, np.random.default_rng(1), 1)
    r2 = sample_recon(rec, np.random.default_rng(2), 2)
    assert (r1["kernel"], r2["kernel"]) == ("soft", "sharp")
    assert r1["padding_value_hu"] == r2["padding_value_hu"] and r1["fov_diameter_mm"] == r2["fov_diameter_mm"]
    assert r2["noise_sd_hu"] > r1["noise_sd_hu"]
    assert r1["padding_value_hu"] in (-1024, -2048, -3024, -8192)


def test_render_and_scanner_are_deterministic(normal_case):
    rec, grid, truth, img = normal_case
    again = render_truth(rec, grid)
    assert np.array_equal(again["hu"], truth["hu"])
    recon = dict(sample_recon(rec, np.random.default_rng(0), 1), padding_value_hu=-3024.0, fov_diameter_mm=300.0)
    a = apply_scanner(truth, grid, recon, seed=7)
    b = apply_scanner(truth, grid, recon, seed=7)
    c = apply_scanner(truth, grid, recon, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == tuple(grid["shape"])
    assert np.array_equal(a, np.rint(a))
    # outside the reconstruction circle: the padding value; inside: never
    nx, ny, _ = grid["shape"]
    sx, sy, _ = grid["spacing_mm"]
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    r2 = x[:, None] ** 2 + y[None, :] ** 2
    assert np.all(a[r2 > 150.0**2] == -3024.0)
    assert np.all(a[r2 < 140.0**2] > -1500.0)


def test_sharp_kernel_is_noisier_and_metal_streaks(normal_case):
    rec, grid, truth, _ = normal_case
    air = ~truth["masks"]["body"] & (truth["hu"] < -990)
    big = dict(fov_diameter_mm=600.0, padding_value_hu=-1024.0)
    soft = apply_scanner(truth, grid, dict(sample_recon(rec, np.random.default_rng(0), 1), **big), 3)
    sharp = apply_scanner(truth, grid, dict(sample_recon(rec, np.random.default_rng(0), 2), **big), 3)
    assert sharp[air].std() > 1.5 * soft[air].std()
    dev = _only("Medical material", seed=5)
    dev["findings"][0]["devices"] = ["pacemaker"]
    dev["findings"][0]["subtype"] = "pacemaker"
    t_dev = render_truth(dev, grid)
    assert t_dev["metal"] and t_dev["hu"].max() > 3000
    recon = dict(sample_recon(dev, np.random.default_rng(0), 1), noise_sd_hu=0.0, **big)
    with_metal = apply_scanner(t_dev, grid, recon, 3)
    # streaks: soft tissue near the device deviates by hundreds of HU from the noiseless truth
    soft_tissue = (t_dev["hu"] > -150) & (t_dev["hu"] < 150)
    assert np.abs(with_metal - t_dev["hu"])[soft_tissue].max() > 150


def _lps_to_ras_affine(grid):
    sx, sy, sz = grid["spacing_mm"]
    x0, y0, z0 = grid["origin_mm"]
    return np.array([[-sx, 0, 0, -x0], [0, -sy, 0, -y0], [0, 0, sz, z0], [0, 0, 0, 1.0]])


def test_orientation_in_ras_through_monai_itk_reader(normal_case, tmp_path):
    from monai.transforms import LoadImage, Orientation

    rec, grid, truth, img = normal_case
    m = truth["masks"]
    labels = np.zeros(grid["shape"], np.uint8)
    z = grid["origin_mm"][2] + grid["spacing_mm"][2] * np.arange(grid["shape"][2])
    labels[m["heart_region"]] = 1
    labels[m["aorta"] & (z > 15)[None, None, :]] = 2  # aortic arch
    labels[m["liver"]] = 3
    bone = m["bone"]
    y = grid["origin_mm"][1] + grid["spacing_mm"][1] * np.arange(grid["shape"][1])
    labels[bone & (y < -40)[None, :, None] & (np.abs(np.arange(grid["shape"][0]) - grid["shape"][0] / 2) < 5)[:, None, None]] = 4  # sternum
    labels[m["cancellous_bone"] & (y > 0)[None, :, None]] = 5  # vertebral bodies
    aff = _lps_to_ras_affine(grid)
    nib.save(nib.Nifti1Image(labels, aff), tmp_path / "labels.nii.gz")
    nib.save(nib.Nifti1Image(img.astype(np.int16), aff), tmp_path / "ct.nii.gz")
    loader = LoadImage(reader="ITKReader", ensure_channel_first=True)
    orient = Orientation(axcodes="RAS")
    lab = orient(loader(str(tmp_path / "labels.nii.gz")))
    ct = orient(loader(str(tmp_path / "ct.nii.gz")))
    affine = np.asarray(lab.affine)
    assert np.allclose(np.diag(affine)[:3], np.abs(np.diag(affine)[:3]))  # RAS: positive diagonal
    arr = np.asarray(lab[0])

    def centroid(v):
        idx = np.argwhere(arr == v)
        assert len(idx), v
        return (affine[:3, :3] @ idx.mean(0)) + affine[:3, 3]

    heart, arch, liver, sternum, spine = (centroid(v) for v in (1, 2, 3, 4, 5))
    assert heart[0] < -5 and arch[0] < 0, (heart, arch)  # patient left = RAS -x
    assert liver[0] > 20  # patient right = RAS +x
    assert sternum[1] > heart[1] > spine[1]  # anterior = RAS +y
    assert arch[2] > heart[2]  # superior = RAS +z
    # the image follows the same geometry: lungs (air-like, inside the body) on both sides of the heart
    ctv = np.asarray(ct[0])
    k = int(np.round(np.linalg.solve(affine[:3, :3], heart - affine[:3, 3]))[2])
    row = ctv[:, :, k].mean(axis=1)
    assert row.min() < -500


def test_hu_per_tissue(normal_case):
    rec, grid, truth, img = normal_case
    from scipy import ndimage

    inside_fov = img > -1500  # a large patient may be truncated by the reconstruction circle
    m = {k: (v & inside_fov if v.dtype == bool else v) for k, v in truth["masks"].items()}

    lung = ndimage.binary_erosion(m["lung"], iterations=1) & ~ndimage.binary_dilation(m["vessels"])
    assert -900 <= img[lung].mean() <= -820, img[lung].mean()
    fat = ndimage.binary_erosion(m["subcutaneous_fat"])
    assert -120 <= img[fat].mean() <= -80, img[fat].mean()
    muscle = ndimage.binary_erosion(m["muscle"])
    assert 35 <= img[muscle].mean() <= 65, img[muscle].mean()
    liver = ndimage.binary_erosion(m["liver"])
    assert 50 <= img[liver].mean() <= 70, img[liver].mean()
    canc = m["cancellous_bone"]
    assert 90 <= img[canc].mean() <= 350, img[canc].mean()
    assert np.percentile(img[m["bone"]], 99) > 350
    outside = ~m["body"] & (truth["hu"] < -990) & (img > -1500)
    assert -1030 <= img[outside].mean() <= -970
    assert np.isfinite(img).all()
