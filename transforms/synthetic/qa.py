"""Rule-based finding detectors: QA evidence that every rendered label is visible in the image.

Each detector returns a score computed from the reconstructed image (HU) and what a reader knows
without the findings: the *normal* anatomy masks and geometry returned by
:func:`.render.render_truth` (lung field, lobes, bronchovascular tree, aorta, coronary course,
heart outline, node stations, hiatus). None of them reads the case record's findings. Classic
measurements where they exist (LAA%-950, cardiothoracic ratio, calcium >= 130 HU in the aortic
wall and coronary course, fluid-HU volume in the dependent pleural space, dense-lung volume);
simple intensity/texture rules otherwise. PHANTOM_SPEC.md §7 asks AUROC > 0.9 per label.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..pathologies import CTRATE_PATHOLOGIES

__all__ = ["DETECTORS", "detector_scores"]


def _ball(r_vox):
    r = max(int(np.ceil(r_vox)), 1)
    g = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (g**2).sum(0) <= r_vox**2 + 1e-6


class _Ctx:
    def __init__(self, img, truth, grid):
        self.img = img
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
        bad = ndimage.binary_dilation(streak.sum(axis=(0, 1)) >= 3, iterations=1)
        self.clean = ~bad[None, None, :]

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


def medical_material(c: _Ctx):
    body = c.m["body"]
    return float(((c.img > 1500) & body & ~c.bone).sum() + 0.2 * ((c.img > 400) & body & ~c.bone).sum())


def arterial_calcification(c: _Ctx):
    roi = c.m["aorta_wall"] & ~c.bone & c.clean
    return float(np.clip(c.img[roi] - 130, 0, None).sum() * c.vox)


def coronary_calcification(c: _Ctx):
    roi = c.dilate_mm(c.m["coronary"], 3) & ~c.bone & ~c.dilate_mm(c.m["aorta"], 3) & c.clean
    return float(np.clip(c.img[roi] - 130, 0, None).sum() * c.vox)


def cardiomegaly(c: _Ctx):
    """Cardiothoracic ratio: widest soft-tissue run through the heart / internal thoracic width."""
    A = c.geo["cage_half_width_mm"]
    B = c.geo["cage_half_depth_mm"]
    zc = c.geo["z_dome_left_mm"]
    soft = c.smooth > -250  # cardiac silhouette: heart, pericardium and its fat; lung ends the run
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
    heart = c.m["heart_region"]
    roi = c.dilate_mm(heart, 24) & ~c.erode_mm(heart, 10) & ~c.bone
    fluid = (c.smooth > -15) & (c.smooth < 24)
    return float((fluid & roi).sum() * c.vox / 1000.0)


def hiatal_hernia(c: _Ctx):
    zh = c.geo["z_hiatus_mm"]
    eso = np.asarray(c.geo["esophagus_mm"])
    yv = c.geo["vertebra_center_yx_mm"][0]
    sel = (eso[:, 2] > zh - 5) & (eso[:, 2] < zh + 80)
    roi = np.zeros(c.shape, bool)
    for p in eso[sel]:
        roi |= c.sphere(p, 30.0)
    roi &= (c.y < yv - 8)[None, :, None]
    excl = c.dilate_mm(c.m["mediastinal_vessels"] | c.m["aorta"], 3) | c.m["heart_region"] | c.bone | c.m["abdomen"]
    soft = (c.smooth > -60) & (c.smooth < 120)
    air = c.smooth < -930
    return float(((soft | air) & roi & ~excl).sum() * c.vox / 1000.0)


def lymphadenopathy(c: _Ctx):
    excl = c.dilate_mm(c.m["mediastinal_vessels"] | c.m["aorta"], 2) | c.m["heart_region"] | c.bone
    soft = (c.smooth > -20) & (c.smooth < 100)
    best = 0.0
    for name, p in c.geo["node_stations_mm"].items():
        roi = c.sphere(p, 18.0) & ~excl & c.clean
        best = max(best, float((soft & roi).sum() * c.vox))
    return best


def emphysema(c: _Ctx):
    core = c.lung_core & ~c.dilate_mm(c.m["airway_roi"], 0) & c.clean  # density mask, airways excluded
    if not core.any():
        return 0.0
    # opening drops tubular air (dilated distal airways) and isolated noise voxels, keeps lucent areas
    laa = ndimage.binary_opening((c.img < -950) & core)
    return float(laa.sum() / core.sum() * 100.0)


def _free_lung(c: _Ctx):
    return c.lung_core & ~c.vessels & ~c.dilate_mm(c.m["airway_roi"], 0)


def atelectasis(c: _Ctx):
    """Dense (collapsed) lung at the bases: plate-like bands and compressed lung beside fluid."""
    zlo = c.geo["z_dome_right_mm"] - 80
    basal = _free_lung(c) & c.zmask(zlo, -20)
    dense = (c.smooth > 18) & (c.smooth < 80)
    plate = (c.smooth > -550) & (c.smooth < -150)
    return float((dense & basal).sum() + 0.5 * (plate & basal & c.erode_mm(c.m["lung"], 12)).sum()) * c.vox / 1000.0


def lung_nodule(c: _Ctx):
    """Compact soft-tissue blobs inside the lung, away from the pleura and the normal vessel tree.

    Consolidations are too large and plate atelectasis or scars too elongated to count; small
    distal vessels and fissures never reach soft-tissue density after partial volume.
    """
    central = c.m["mediastinal_vessels"] | c.m["aorta"] | c.m["heart_region"]
    free = _free_lung(c) & c.erode_mm(c.m["lung"], 8) & ~c.dilate_mm(central, 10)
    lab, n = ndimage.label((c.img > -250) & free)
    if n == 0:
        return 0.0
    score = 0.0
    peaks = ndimage.maximum(c.img, lab, index=np.arange(1, n + 1))
    sizes = ndimage.sum_labels(np.ones(lab.shape, np.float32), lab, index=np.arange(1, n + 1))
    for i, sl in enumerate(ndimage.find_objects(lab)):
        if sizes[i] < 2:
            continue  # a lone voxel is a vessel seen end-on
        ext = np.array([(s.stop - s.start) for s in sl]) * c.sp
        if ext.max() > 32 or ext.max() > 2.5 * max(ext.min(), c.sp.min()):
            continue  # not round: band, plate or consolidation
        score += 1.0 + max(float(peaks[i]), -250.0) / 250.0
    return score


def lung_opacity(c: _Ctx):
    free = _free_lung(c) & c.erode_mm(c.m["lung"], 8)
    ggo = (c.smooth > -700) & (c.smooth < -300)
    return float((ggo & free).sum() * c.vox / 1000.0)


def fibrotic_sequela(c: _Ctx):
    ztop = c.geo["z_lung_apex_mm"]
    free = _free_lung(c)
    apical = free & c.zmask(ztop - 75, ztop)
    d_apex = ((c.img > -450) & apical).sum() / max(apical.sum(), 1)
    base = free & c.zmask(-1e3, -40) & ~c.erode_mm(c.m["lung"], 14)
    hp = c.img - ndimage.gaussian_filter(c.img, 1.0)
    reticular = float(np.mean(np.abs(hp[base]))) if base.any() else 0.0
    return float(100 * d_apex + 0.02 * reticular)


def pleural_effusion(c: _Ctx):
    lung = c.m["lung"] & ~c.m["abdomen"]  # thin crescents live at the lung's edge: no erosion
    fluid = (c.smooth > -25) & (c.smooth < 24)
    post = (c.y > -0.1 * c.geo["cage_half_depth_mm"])[None, :, None]
    return float((fluid & lung & post & c.clean).sum() * c.vox / 1000.0)


def mosaic(c: _Ctx):
    free = _free_lung(c)
    sm = ndimage.gaussian_filter(np.where(free, c.img, 0).astype(np.float32), 2.0)
    wt = ndimage.gaussian_filter(free.astype(np.float32), 2.0)
    sm = np.where(wt > 0.3, sm / np.maximum(wt, 1e-3), 0)
    vals = sm[free & (wt > 0.3)]
    ys = np.broadcast_to(c.y[None, :, None], c.shape)[free & (wt > 0.3)]
    if vals.size < 50:
        return 0.0
    coef = np.polyfit(ys, vals, 1)
    res = vals - np.polyval(coef, ys)
    dark = np.mean((res < -35) & (res > -110))
    bright = np.mean((res > 30) & (res < 150))
    return float(min(dark, bright))


def peribronchial_thickening(c: _Ctx):
    roi = c.m["airway_roi"] & c.m["lung"]
    ref = _free_lung(c)
    if not roi.any() or not ref.any():
        return 0.0
    return float(np.percentile(c.img[roi], 75) - np.median(c.img[ref]))


def consolidation(c: _Ctx):
    inner = c.erode_mm(c.m["lung"], 12) & ~c.vessels
    return float(((c.smooth > -120) & inner).sum() * c.vox / 1000.0)


def bronchiectasis(c: _Ctx):
    roi = c.m["airway_roi"] & c.m["lung"]
    ref = _free_lung(c)
    if not roi.any():
        return 0.0
    airy = lambda m: float((c.img[m] < -940).mean())  # noqa: E731
    periph = ref & ~c.erode_mm(c.m["lung"], 15)
    tub = (c.img < -940) & periph
    return 100 * (airy(roi) - airy(ref)) + 100 * float(tub.sum()) / max(periph.sum(), 1)


def septal_thickening(c: _Ctx):
    free = _free_lung(c)
    periph = free & ~c.erode_mm(c.m["lung"], 30)
    lower = periph & c.zmask(-1e3, -30)
    upper = free & c.zmask(20, 1e3)
    if not lower.any() or not upper.any():
        return 0.0
    hp = c.img - ndimage.gaussian_filter(c.img, 1.2)
    return float(np.mean(np.abs(hp[lower])) - np.mean(np.abs(hp[upper]))) + 0.05 * float(np.median(c.img[lower]) - np.median(c.img[upper]))


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


def detector_scores(img: np.ndarray, truth: dict, grid: dict) -> dict:
    """Score of every finding detector on one reconstructed image.

    Args:
        img: reconstructed HU volume (grid layout, LPS).
        truth: the :func:`.render.render_truth` output of the same case (masks, geometry).
        grid: the grid.

    Returns:
        {CT-RATE label: float score}, higher = more likely present.
    """
    c = _Ctx(np.asarray(img, np.float32), truth, grid)
    return {name: float(fn(c)) for name, fn in DETECTORS.items()}
