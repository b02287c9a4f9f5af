"""Rule-based finding detectors: QA evidence that every rendered label is visible in the image.

Each detector scores the difference ``D = image - expected normal`` inside its finding's anatomical
ROI, with its own HU/shape signature. The expected normal (:func:`normal_reference`) is the same
record rendered without findings through the same scanner and noise seed, so ``D`` holds what the
findings changed (and metal streaks, whose slices are skipped); co-occurring findings then only
interfere where their own signatures overlap. Detectors also use the *normal* anatomy masks and
geometry of :func:`.render.render_truth`; none reads the findings' parameters. Cardiomegaly is
part of the anatomy and keeps its absolute cardiothoracic ratio. The AUROC targets are in the README,
"QA checks".
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctclip_contract import CTRATE_PATHOLOGIES

from .render import render_truth
from .scanner import apply_scanner

__all__ = ["DETECTORS", "detector_scores", "normal_reference"]


def _ball(r_vox):
    r = max(int(np.ceil(r_vox)), 1)
    g = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (g**2).sum(0) <= r_vox**2 + 1e-6


def c_free(c):
    return ~c.vessels & ~c.dilate_mm(c.m["airway_roi"], 0) & c.clean


class _Ctx:
    def __init__(self, img, truth, grid, reference=None):
        self.img = img
        self.ref = reference
        # difference to the finding-free rendering of the same anatomy (zero without a reference)
        self.D = img - reference if reference is not None else np.zeros_like(img)
        self.m = truth["masks"]
        self.geo = truth["geometry"]
        self.sp = np.asarray(grid["spacing_mm"], float)
        self.org = np.asarray(grid["origin_mm"], float)
        self.shape = img.shape
        self.vox = float(np.prod(self.sp))
        self.x = self.org[0] + self.sp[0] * np.arange(self.shape[0])
        self.y = self.org[1] + self.sp[1] * np.arange(self.shape[1])
        self.z = self.org[2] + self.sp[2] * np.arange(self.shape[2])
        self.smooth = ndimage.uniform_filter(img.astype(np.float32), 3) if min(self.sp) < 5 else ndimage.gaussian_filter(img, 0.6)
        lung = self.m["lung"]
        self.lung_core = ndimage.binary_erosion(lung, iterations=1)
        self.vessels = ndimage.binary_dilation(self.m["vessels"], iterations=1)
        self.bone = ndimage.binary_dilation(self.m["bone"], iterations=2)
        # slices crossed by metal streaks are unreadable for density measurements: skip them,
        # as a reader would (streak voxels: very bright outside bone, aorta and coronary course)
        calc = ndimage.binary_dilation(self.m["aorta_wall"] | self.m["coronary"], iterations=2)
        streak = (img > 800) & self.m["body"] & ~self.bone & ~calc
        bad = streak.sum(axis=(0, 1)) >= 3
        if reference is not None:
            # streaks also show as dark/bright rays in the lateral chest wall, where no finding lives
            # (its muscle and fat, away from the pericardium, which an effusion of an enlarged heart
            # pushes to the wall)
            wall = (self.m["muscle"] | self.m["subcutaneous_fat"]) & ~self.dilate_mm(self.m["lung"], 8)
            wall &= (np.abs(self.x) > 70)[:, None, None] & ~self.dilate_mm(self.m["heart_region"], 30)
            bad |= ((np.abs(self.D) > 100) & wall).sum(axis=(0, 1)) >= 2
        bad = ndimage.binary_dilation(bad, iterations=1)
        self.clean = ~bad[None, None, :]
        self.lung_roi = lung & c_free(self)
        self.Ds = ndimage.uniform_filter(self.D, 3)
        self.Dhp = self.D - ndimage.gaussian_filter(self.D, 1.0)
        # depth below the pleura (mm, in-plane steps) of every lung voxel
        self.depth = ndimage.distance_transform_edt(lung, sampling=self.sp)
        # density of the new dense tissue itself (mean over its own voxels in a 3-voxel window), so
        # that fluid (~+10) and collapsed or consolidated lung (+35..+50) separate despite the noise
        # and the aerated lung around them
        dm = (self.D > 500).astype(np.float32)
        self.dense_hu = ndimage.uniform_filter(self.img * dm, 3) / np.maximum(ndimage.uniform_filter(dm, 3), 1e-3)
        fl = (self.dense_hu > -25) & (self.dense_hu < 24) & (self.D > 500) & lung & self.clean
        self.fluid = fl & (self.y > -0.1 * self.geo["cage_half_depth_mm"])[None, :, None]

    def dilate_mm(self, mask, mm):
        it = max(int(round(mm / float(self.sp[:2].mean()))), 1)
        return ndimage.binary_dilation(mask, iterations=it)

    def erode_mm(self, mask, mm):
        it = max(int(round(mm / float(self.sp[:2].mean()))), 1)
        return ndimage.binary_erosion(mask, iterations=it)

    def sphere(self, c, r):
        X = (self.x - c[0])[:, None, None] ** 2
        Y = (self.y - c[1])[None, :, None] ** 2
        Z = (self.z - c[2])[None, None, :] ** 2
        return (X + Y + Z) <= r * r

    def zmask(self, lo, hi):
        return ((self.z >= lo) & (self.z <= hi))[None, None, :]


def _comp_stats(mask, c):
    """Connected components of ``mask``: label volume, sizes (voxels) and bounding-box extents (mm)."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return lab, np.zeros(0), np.zeros((0, 3))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(float)
    ext = np.array([[(s_.stop - s_.start) for s_ in sl] for sl in ndimage.find_objects(lab)], float) * c.sp
    return lab, sizes, ext


def medical_material(c: _Ctx):
    """Device voxels: metal (any bright excess outside calcified walls) and catheters in the veins."""
    body = c.m["body"]
    calc = c.dilate_mm(c.m["aorta_wall"] | c.m["coronary"], 4)
    # bright excess outside the lungs (effusion and consolidation add +900 HU of water in the lung)
    out = body & ~c.dilate_mm(c.m["lung"], 2) & ~calc
    metal = float(((c.D > 150) & (c.img > 250) & out).sum())
    cath = c.m["mediastinal_vessels"] & ~c.dilate_mm(c.m["aorta"], 4) & ~c.m["heart_region"] & ~c.m["lung"]
    return metal + float(((c.D > 60) & (c.img > 100) & cath).sum())


def _calcium(c: _Ctx, roi):
    """Calcium excess (HU x mm^3) of new bright foci that lie mostly inside ``roi``.

    Devices (catheters, leads, wires) are long bright structures that only cross the ROI; a
    plaque or coronary focus sits in it.
    """
    bright = (c.D > 80) & (c.img > 130) & ~c.m["lung"] & ~c.bone & c.clean
    lab, n = ndimage.label(bright)
    if n == 0:
        return 0.0
    idx = np.arange(1, n + 1)
    inside = ndimage.sum_labels(roi.astype(np.float32), lab, idx) / ndimage.sum_labels(np.ones(lab.shape, np.float32), lab, idx)
    keep = np.concatenate([[False], inside >= 0.6])[lab] & roi
    return float(np.clip(c.D[keep], 0, None).sum() * c.vox)


def arterial_calcification(c: _Ctx):
    # catheters and leads run in the SVC and brachiocephalic veins beside the aorta: not its wall
    veins = c.dilate_mm(c.m["mediastinal_vessels"] & ~c.dilate_mm(c.m["aorta"], 5), 2)
    return _calcium(c, c.m["aorta_wall"] & ~veins)


def coronary_calcification(c: _Ctx):
    return _calcium(c, c.dilate_mm(c.m["coronary"], 3) & ~c.dilate_mm(c.m["aorta"], 3))


def cardiomegaly(c: _Ctx):
    """Cardiothoracic ratio: widest soft-tissue run through the heart / internal thoracic width.

    Cardiomegaly is part of the anatomy (the heart itself is larger), so this one is absolute.
    """
    A = c.geo["cage_half_width_mm"]
    B = c.geo["cage_half_depth_mm"]
    zc = c.geo["z_dome_left_mm"]
    soft = (c.ref if c.ref is not None else c.smooth) > -250  # silhouette without effusions around it
    ks = np.nonzero((c.z > zc) & (c.z < -25))[0]
    rows = np.nonzero((c.y > -B) & (c.y < 0.15 * B))[0]
    i0 = int(np.argmin(np.abs(c.x - 10.0)))
    best = 0.0
    for k in ks:
        for j in rows:
            line = soft[:, j, k]
            if not line[i0]:
                continue
            lo = i0
            while lo > 0 and line[lo - 1]:
                lo -= 1
            hi = i0
            while hi < len(line) - 1 and line[hi + 1]:
                hi += 1
            w = (hi - lo + 1) * c.sp[0]
            if w < 1.6 * A:  # runs reaching the chest wall are not the heart
                best = max(best, w)
    return best / (2 * A)


def pericardial_effusion(c: _Ctx):
    """Fluid replacing epicardial/pericardial fat around the heart (fat -100 -> fluid ~+10)."""
    heart = c.m["heart_region"]
    roi = c.dilate_mm(heart, 24) & ~c.erode_mm(heart, 10) & ~c.bone & ~c.m["lung"]
    return float(((c.D > 40) & (c.img > -40) & (c.img < 60) & roi).sum() * c.vox / 1000.0)


def hiatal_hernia(c: _Ctx):
    """Changed tissue (sac wall, air, fluid) in the posterior mediastinum above the hiatus."""
    zh = c.geo["z_hiatus_mm"]
    eso = np.asarray(c.geo["esophagus_mm"])
    sel = (eso[:, 2] > zh - 5) & (eso[:, 2] < zh + 80)
    roi = np.zeros(c.shape, bool)
    for p in eso[sel]:
        roi |= c.sphere(p, 35.0)
    roi &= c.zmask(zh - 5, zh + 90) & ~c.m["lung"] & ~c.m["heart_region"] & ~c.bone
    # the sac's gas (D << 0 outside the lung) is what no other finding there makes; pericardial
    # fluid and nodes only add soft tissue
    gas = (c.D < -300) & (c.img < -500) & roi & c.clean
    soft = (np.abs(c.D) > 60) & roi & c.clean & ~c.dilate_mm(c.m["heart_region"], 12)
    return float((gas.sum() + 0.2 * soft.sum()) * c.vox / 1000.0)


def lymphadenopathy(c: _Ctx):
    """Node tissue replacing mediastinal fat at the stations (normal nodes are in the reference)."""
    # pericardial fluid collects around the heart and catheters run in the veins: both excluded
    excl = c.dilate_mm(c.m["mediastinal_vessels"] | c.m["aorta"], 2) | c.dilate_mm(c.m["heart_region"], 8) | c.bone | c.m["lung"]
    gain = (c.D > 50) & (c.img > -30) & (c.img < 90)
    best = 0.0
    for name, p in c.geo["node_stations_mm"].items():
        roi = c.sphere(p, 22.0) & ~excl & c.clean
        best = max(best, float((gain & roi).sum() * c.vox))
    return best


def emphysema(c: _Ctx):
    """LAA%-950 of the worst lobe: lung newly below -950 HU in clusters (mosaic lucency stays above)."""
    roi = c.lung_core & ~c.dilate_mm(c.m["airway_roi"], 0) & c.clean
    # lightly smoothed (the lucencies are 8-40 mm; single noise voxels are not areas)
    laa = (c.D < -90) & (ndimage.gaussian_filter(c.img, 0.6) < -950) & roi
    lab, sizes, _ = _comp_stats(laa, c)
    keep = np.concatenate([[False], sizes >= 2])[lab]
    best = float(keep.sum() / max(roi.sum(), 1))
    lobes = c.m["lobes"]
    for k in np.unique(lobes[roi]):  # emphysema sits in one or two lobes
        r = roi & (lobes == k)
        if r.sum() >= 50:
            best = max(best, float(keep[r].sum() / r.sum()))
    return 100.0 * best


def _lung_gain(c: _Ctx, lo):
    return (c.D > lo) & c.lung_roi


def _soft_dense(c: _Ctx):
    """New lung tissue at soft-tissue density (collapsed or consolidated lung, not fluid)."""
    return (c.D > 500) & (c.dense_hu > 27) & (c.dense_hu < 110) & c.m["lung"] & c.clean & (c.depth > 4)


def _fluid_distance(c: _Ctx):
    if not c.fluid.any():
        return np.full(c.shape, 1e3, np.float32)
    return ndimage.distance_transform_edt(~c.fluid, sampling=c.sp)


def atelectasis(c: _Ctx):
    """Dense plate-like bands (flat, long) or collapsed lung lying on a pleural effusion."""
    zlo = c.geo["z_dome_right_mm"] - 80
    # lung beside the heart is left out: a pericardial effusion pushes the sac into the lung field
    basal = c.m["lung"] & c.clean & c.zmask(zlo, 0) & ~c.dilate_mm(c.m["heart_region"], 28) & ~c.dilate_mm(c.m["airway_roi"], 0)
    # plates: components of new soft tissue below the pleural rim (where reticulation and fluid
    # lie) that are flat and long by their principal axes (oblique plates fill their boxes)
    lab, sizes, _ = _comp_stats((c.D > 300) & basal & (c.depth > 5), c)
    score = 0.0
    for i in range(len(sizes)):
        if not 4 <= sizes[i] <= 200:
            continue
        pts = np.argwhere(lab == i + 1) * c.sp
        sd = np.sqrt(np.maximum(np.linalg.eigvalsh(np.cov(pts.T)), 0))  # ascending
        thick, length = 3.46 * sd[0], 3.46 * sd[2]  # a uniform slab spans sd * sqrt(12)
        if length >= 20 and thick <= 9 and length >= 2.5 * thick:
            score += sizes[i]
    # passive: lung at collapsed-lung density (denser than the fluid) lying on the effusion
    dense = _soft_dense(c) & (_fluid_distance(c) <= 6)
    return float(score + dense.sum()) * c.vox / 1000.0


def lung_nodule(c: _Ctx):
    """Compact, round, dense new blobs inside the lung (5-30 mm)."""
    # the whole lesion footprint (D > 100) must be compact: this drops bands, scars and the
    # dense parts of consolidations, whose footprint continues into ground glass
    lab, sizes, ext = _comp_stats((c.D > 100) & (c.lung_roi | c.vessels) & c.m["lung"] & c.clean, c)
    if len(sizes) == 0:
        return 0.0
    idx = np.arange(1, len(sizes) + 1)
    peaks = ndimage.maximum(c.D, lab, index=idx)
    # thickened bronchial walls and cuffs are short dense pieces lying along the airway tree
    aw = ndimage.mean(c.dilate_mm(c.m["airway_roi"], 3).astype(np.float32), lab, index=idx)
    # pleural-based dense tissue (scars, caps, plates on the pleura) is not a nodule either
    rim = ndimage.mean((c.depth <= 5).astype(np.float32), lab, index=idx)
    score = 0.0
    for i in range(len(sizes)):
        e = np.sort(ext[i])
        if e[2] <= 28 and e[2] <= 1.8 * max(e[0], c.sp.min()) and peaks[i] > 350 and aw[i] < 0.5 and rim[i] < 0.5:
            score += 1.0 + float(peaks[i]) / 1000.0
    return score


def lung_opacity(c: _Ctx):
    """Hazy new density at ground-glass level (-750..-250 HU), not the rim of a dense lesion."""
    dense = c.dilate_mm((c.D > 500) & c.lung_roi, 8)
    # hazy = smooth: a septal or reticular line network raises the local mean too, but with a
    # strong high-pass texture, which ground glass lacks
    tex = ndimage.uniform_filter(np.abs(c.Dhp), 3)
    ggo = (c.Ds > 220) & (tex < 0.3 * c.Ds) & (c.smooth > -750) & (c.smooth < -250) & c.lung_roi & ~dense
    return float(ggo.sum() * c.vox / 1000.0)


def fibrotic_sequela(c: _Ctx):
    """Apical scar bands (new dense strands in the upper 75 mm) or basal reticulation."""
    ztop = c.geo["z_lung_apex_mm"]
    # apical: new dense tissue on the apical pleura (cap, pleural tags and the bands reaching them)
    apex = c.m["lung"] & c.zmask(ztop - 60, ztop + 10) & c.clean & ~c.dilate_mm(c.m["airway_roi"], 0)
    lab, sizes, ext = _comp_stats((c.D > 150) & apex, c)
    idx = np.arange(1, len(sizes) + 1)
    rim = ndimage.mean((c.depth <= 9).astype(np.float32), lab, idx) if len(sizes) else np.zeros(0)
    # pleural-based (mostly subpleural), not a deep patch (a consolidation or ground-glass area)
    band = float(sum(sizes[i] for i in range(len(sizes)) if rim[i] >= 0.6 and sizes[i] >= 2))
    # basal: a dense reticular subpleural rim (septal lines are sparser and reach deeper)
    lat = (c.y < 0.3 * c.geo["cage_half_depth_mm"])[None, :, None]  # dependent opacity is posterior
    rim_b = c.lung_roi & c.zmask(-1e3, -35) & (c.depth <= 9) & lat & (c.img < -150)
    if rim_b.sum() < 30:
        return band * c.vox / 1000.0
    lobes = c.m["lobes"]
    basal = 0.0
    for k in np.unique(lobes[rim_b]):
        r = rim_b & (lobes == k)
        if r.sum() >= 30:
            basal = max(basal, float(np.mean(c.D[r] > 250)))
    return float(band * c.vox / 1000.0 + 20.0 * basal)


def pleural_effusion(c: _Ctx):
    """Fluid-HU voxels where the normal anatomy has dependent lung."""
    return float(c.fluid.sum() * c.vox / 1000.0)


def mosaic(c: _Ctx):
    """Geographic patches both darker and brighter than expected by a few tens of HU."""
    roi = c.lung_roi & c.erode_mm(c.m["lung"], 8)
    if roi.sum() < 50:
        return 0.0
    d = c.Ds[roi]
    dark = np.mean((d < -25) & (d > -90))
    bright = np.mean((d > 25) & (d < 90))
    return float(min(dark, bright))


def peribronchial_thickening(c: _Ctx):
    """Bronchial walls denser than expected around the normal airway tree."""
    roi = c.m["airway_roi"] & c.m["lung"] & c.clean
    ref = c.lung_roi & ~c.dilate_mm(c.m["airway_roi"], 8)
    if not roi.any() or not ref.any():
        return 0.0
    # walls are fine structures (high-pass), ground-glass haze over the airways is not
    wall = (c.D > 80) & (c.D < 600) & (c.Dhp > 30)
    base = float(np.mean(wall[ref]))
    # per lobe: thickening is often confined to a few lobes and would be diluted over the tree
    best = float(np.mean(wall[roi])) - base
    lobes = c.m["lobes"]
    for k in np.unique(lobes[roi]):
        r = roi & (lobes == k)
        if r.sum() >= 20:
            best = max(best, float(np.mean(wall[r])) - base)
    return best


def consolidation(c: _Ctx):
    """Large confluent soft-tissue-density lung regions (> 15 mm in two axes)."""
    # consolidated lung is +35..+50 HU, a free effusion ~+10: the fluid is left out, and so is the
    # collapsed lung lying on it (atelectasis)
    dense = _soft_dense(c) & (_fluid_distance(c) > 12)  # vessels vanish in it: whole lung
    lab, sizes, ext = _comp_stats(dense, c)
    score = 0.0
    for i in range(len(sizes)):
        e = np.sort(ext[i])
        if e[1] >= 14:
            score += sizes[i]
    return score * c.vox / 1000.0


def bronchiectasis(c: _Ctx):
    """Airway-region voxels darker than expected (widened lumens) relative to the rest of the lung."""
    roi = c.m["airway_roi"] & c.m["lung"] & c.clean
    ref = c.lung_roi & ~c.dilate_mm(c.m["airway_roi"], 8)
    if not roi.any() or not ref.any():
        return 0.0
    wide = c.D < -60
    base = float(np.mean(wide[ref]))
    best = float(np.mean(wide[roi])) - base
    lobes = c.m["lobes"]
    for k in np.unique(lobes[roi]):  # per lobe, as for peribronchial thickening
        r = roi & (lobes == k)
        if r.sum() >= 20:
            best = max(best, float(np.mean(wide[r])) - base)
    return 100 * best


def septal_thickening(c: _Ctx):
    """Fine line network (high-pass of the difference) in the peripheral lung."""
    # below the subpleural rim (where basal reticulation sits), within the septal region
    # (away from dense lesions and fluid, whose edges are strong high-pass structures too)
    periph = c.lung_roi & (c.depth > 12) & (c.depth < 40) & ~c.dilate_mm(c.D > 500, 8)
    if not periph.any():
        return 0.0
    return float(np.mean(np.abs(c.Dhp[periph])))


DETECTORS = {
    "Medical material": medical_material,
    "Arterial wall calcification": arterial_calcification,
    "Cardiomegaly": cardiomegaly,
    "Pericardial effusion": pericardial_effusion,
    "Coronary artery wall calcification": coronary_calcification,
    "Hiatal hernia": hiatal_hernia,
    "Lymphadenopathy": lymphadenopathy,
    "Emphysema": emphysema,
    "Atelectasis": atelectasis,
    "Lung nodule": lung_nodule,
    "Lung opacity": lung_opacity,
    "Pulmonary fibrotic sequela": fibrotic_sequela,
    "Pleural effusion": pleural_effusion,
    "Mosaic attenuation pattern": mosaic,
    "Peribronchial thickening": peribronchial_thickening,
    "Consolidation": consolidation,
    "Bronchiectasis": bronchiectasis,
    "Interlobular septal thickening": septal_thickening,
}
assert tuple(DETECTORS) == CTRATE_PATHOLOGIES


def normal_reference(record: dict, grid: dict, recon: dict, seed: int) -> np.ndarray:
    """Expected normal image of a case: the same record rendered without findings, same scanner.

    Cardiomegaly lives in the anatomy, so the reference keeps the patient's heart; every other
    finding is absent. Same noise seed, so the difference image holds the findings (plus the
    metal streaks and a small change of the noise level with the patient's attenuation).

    Args:
        record: the case record.
        grid: the grid of the image.
        recon: the reconstruction parameters of the image.
        seed: the noise seed of the image.

    Returns:
        float32 HU volume of the grid's shape.
    """
    normal = dict(record, findings=[])
    return apply_scanner(render_truth(normal, grid), grid, recon, seed=seed)


def detector_scores(img: np.ndarray, truth: dict, grid: dict, reference: np.ndarray | None = None) -> dict:
    """Score of every finding detector on one reconstructed image.

    Args:
        img: reconstructed HU volume (grid layout, LPS).
        truth: the :func:`.render.render_truth` output of the same case (masks, geometry).
        grid: the grid.
        reference: the expected normal image (:func:`normal_reference`); detectors score the
            difference ``img - reference`` inside each finding's anatomical ROI. Without it the
            difference is zero and only the absolute measurements (cardiomegaly) carry signal.

    Returns:
        {CT-RATE label: float score}, higher = more likely present.
    """
    ref = None if reference is None else np.asarray(reference, np.float32)
    c = _Ctx(np.asarray(img, np.float32), truth, grid, ref)
    return {name: float(fn(c)) for name, fn in DETECTORS.items()}
