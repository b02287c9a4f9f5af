"""Rendering of the 18 CT-RATE findings into the phantom (README, "The 18 findings").

Lung findings act in three places of the lung composite (:class:`LungContext`):

1. the *parenchyma* field (HU of alveolar tissue without the bronchovascular tree): emphysema
   (destroyed fraction → −990 HU), mosaic attenuation (lobular patches), ground-glass and
   dependent opacity, consolidation (+35 HU, so vessels vanish in it while the splatted airway
   lumens stay black: air bronchograms), interlobular septal thickening and basal reticulation
   (Voronoi cell walls as mass-conserving 1–2 mm sheets);
2. the *bronchovascular tree* (bronchiectasis: dilated, non-tapering lumens reaching the pleura;
   peribronchial thickening: thick walls with a soft cuff; emphysema and mosaic prune vessels);
3. *lesions* painted over the composite (nodules, fibrotic bands, plate atelectasis), and the
   pleural effusion crescent with passive atelectasis of the lung it compresses.

Mediastinal findings (pericardial effusion, lymphadenopathy, hiatal hernia, arterial and coronary
calcification) and devices are called by :mod:`.render` at their place in the painting order.
Every size, count and site comes from the finding dict of the case record; anything random here
is seeded from the record, so rendering is deterministic.
"""

from __future__ import annotations

import numpy as np

from .anatomy import LOBE_IDS, ChestAnatomy
from .canvas import Canvas, ramp, rotation_from_axes, sample_polyline, smooth_noise, unit

__all__ = ["LungContext"]

STEEL_HU = 14000.0  # attenuation of steel in HU before clipping (saturates any 12-bit scale)
TITANIUM_HU = 7000.0
FLUID_HU = 10.0


def _sev(f) -> int:
    return ("minimal", "mild", "moderate", "marked").index(f["severity"])


def _frng(f, key="seed"):
    """Per-finding generator (from its own seed field or its centres)."""
    s = f.get(key)
    if s is None:
        s = int(abs(hash(tuple(tuple(c) for c in f.get("centers_mm", [])))) % (2**31))
    return np.random.default_rng(int(s))


class LungContext:
    """The lung region of a case being rendered: occupancy, lobes, parenchyma field, fractions.

    Args:
        cv: the canvas.
        anat: the case anatomy.
        rng: the render generator (texture).
    """

    def __init__(self, cv: Canvas, anat: ChestAnatomy, rng):
        self.cv, self.anat, self.rng = cv, anat, rng
        A, B = anat.A, anat.B
        zlo = min(anat.z_dome_r, anat.z_dome_l) - 110
        self.sl = cv.box([-A - 4, -B - 4, zlo], [A + 4, B + 4, anat.z_apex + 4])
        if self.sl is None:
            raise ValueError("the grid does not contain the lungs")
        x, y, z = cv.coords(self.sl)
        self.x, self.y, self.z = x, y, z
        self.shape = cv.hu[self.sl].shape
        d = anat.lung_distance(x, y, z)
        self.occ = np.broadcast_to(ramp(d, cv.h_iso), self.shape).copy()
        inside = self.occ > 0.5
        self.lobes = np.where(inside, anat.lobe_of(x, y, z), 0).astype(np.uint8)
        p = anat.p
        # dependent (posterior) lung is denser: the gravity gradient of a supine patient
        t = np.clip((y + B) / (2 * B), 0, 1)
        par = p["lung_hu"] + p["lung_gradient_hu"] * (t**1.5 - 0.4)
        self.par = np.broadcast_to(par, self.shape).astype(np.float32).copy()
        self.par += 14.0 * smooth_noise(cv, rng, 4.0, self.sl)
        self.soft = np.zeros(self.shape, np.float32)  # volume fraction of soft tissue (vessels, walls, septa)
        self.air = np.zeros(self.shape, np.float32)  # volume fraction of airway lumen air
        self.emph = None
        self.mosaic_dark = None
        # finding masks (when the canvas tracks them): share of each lung-box voxel that a parenchymal finding
        # changed, marked on the canvas when the parenchyma is composited
        self.parenchyma_findings: dict[str, np.ndarray] = {}
        # fissures: 0.7 mm sheets (mass-conserving tent of one voxel width)
        d_r, d_l, d_h = anat.fissure_distances(x, y, z)
        h = float(np.sqrt(cv.spacing[1] * cv.spacing[2]))
        tent = lambda d: np.clip(1 - np.abs(d) / h, 0, None) * (0.7 / h)  # noqa: E731
        right = x < 4
        self.soft += np.where(right, tent(d_r), tent(d_l)) * inside
        self.soft += np.where(right & (self.lobes != 3), tent(d_h), 0) * inside

    def occ_full(self):
        out = np.zeros(self.cv.shape, np.float32)
        out[self.sl] = self.occ
        return out

    def lobes_full(self):
        out = np.zeros(self.cv.shape, np.uint8)
        out[self.sl] = self.lobes
        return out

    def in_lobes(self, sites):
        ids = [LOBE_IDS[s] for s in sites if s in LOBE_IDS]
        return np.isin(self.lobes, ids) if ids else np.zeros(self.shape, bool)

    def local_ellipsoid(self, center, semi, rot=None, grow=0.0):
        """Ellipsoid occupancy on the lung box (zeros outside the ellipsoid's own box)."""
        sl, occ = self.cv.ellipsoid(center, semi, rot, grow)
        out = np.zeros(self.shape, np.float32)
        if sl is None:
            return out
        loc = tuple(slice(max(a.start, b.start) - b.start, min(a.stop, b.stop) - b.start) for a, b in zip(sl, self.sl))
        src = tuple(slice(max(a.start, b.start) - a.start, min(a.stop, b.stop) - a.start) for a, b in zip(sl, self.sl))
        if all(s.stop > s.start for s in loc):
            out[loc] = occ[src]
        return out

    def voronoi(self, cell_mm, seed):
        """Polygonal lobule-like cells on the lung box: (cell id, distance to the nearest wall, mm).

        A randomly rotated lattice of ``cell_mm`` cells whose coordinates are warped by a smooth
        noise field (a third of a cell), so the walls are irregular polygons like secondary
        pulmonary lobules; far cheaper than an exact Voronoi diagram and just as convincing at CT
        resolution.
        """
        rng = np.random.default_rng(seed)
        L = float(cell_mm)
        R = rotation_from_axes(rng.normal(size=3))
        x, y, z = self.x, self.y, self.z
        wall = None
        cid = np.zeros(self.shape, np.int64)
        for a in range(3):
            u = R[a, 0] * x + R[a, 1] * y + R[a, 2] * z + rng.uniform(0, L)
            u = u + (0.33 * L) * _local_noise(self, rng, 1.5 * L)
            w = (L / np.pi) * np.abs(np.sin(np.pi * u / L))
            wall = w if wall is None else np.minimum(wall, w)
            cid = cid * 7919 + np.floor(u / L).astype(np.int64)
        return (cid & 4095), wall.astype(np.float32)

    def sheet(self, wall_dist, thickness_mm):
        """Mass-conserving volume fraction of sheets of ``thickness_mm`` at ``wall_dist == 0``."""
        h = self.cv.h_iso
        return np.clip(1 - np.abs(wall_dist) / h, 0, None) * (thickness_mm / h)

    # ------------------------------------------------------------------ composite
    def composite(self, tree: dict, fnd: dict) -> np.ndarray:
        """Splat the bronchovascular tree (with airway findings) and paint the lungs.

        Returns:
            boolean mask (full grid) of the normal bronchovascular tree, for QA.
        """
        cv = self.cv
        kind = tree["kind"]
        r = tree["radius"].copy()
        wall = np.where(kind == 0, np.maximum(0.35 * r, 0.25), 0.0)
        cuff = np.zeros_like(r)
        show = ~tree["distal"]
        gen = tree["generation"]
        lobe_names = {v: k for k, v in LOBE_IDS.items()}
        seg_lobe = np.array([lobe_names[int(l)] for l in tree["lobe"]])
        if "Bronchiectasis" in fnd:
            f = fnd["Bronchiectasis"]
            sel = (kind == 0) & np.isin(seg_lobe, f["sites"]) & (gen >= 2)
            r_seg = np.maximum(r, 1.4)  # no tapering beyond the segmental level
            r = np.where(sel, r_seg * f["dilation"], r)
            wall = np.where(sel, np.maximum(wall * 1.3, 0.6), wall)
            show = show | sel
        if "Peribronchial thickening" in fnd:
            f = fnd["Peribronchial thickening"]
            k = 1.6 + 0.3 * _sev(f)
            sel = (kind == 0) & np.isin(seg_lobe, f["sites"]) & show & (gen >= 1)
            wall = np.where(sel, wall * k + 0.4, wall)
            cuff = np.where(sel, 1.0 + 0.4 * _sev(f), cuff)
        # sample the segments as point masses
        p0, p1 = tree["p0"], tree["p1"]
        step = 0.5 * float(cv.spacing.min())
        L = np.linalg.norm(p1 - p0, axis=1)
        n = np.maximum(np.ceil(L / step).astype(int), 1)
        seg = np.repeat(np.arange(len(L)), n)
        frac = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + 0.5) / np.repeat(n, n)
        pts = p0[seg] + (p1 - p0)[seg] * frac[:, None]
        ds = (L / n)[seg]
        rr, ww, cc, kk, sh = r[seg], wall[seg], cuff[seg], kind[seg], show[seg]
        prune = np.ones(len(pts))
        if self.emph is not None or self.mosaic_dark is not None:
            idx = np.round((pts - cv.origin) / cv.spacing).astype(int)
            loc = idx - np.array([s.start for s in self.sl])
            ok = np.all((loc >= 0) & (loc < np.array(self.shape)), axis=1)
            if self.emph is not None:
                prune[ok] *= 1 - 0.8 * np.clip(self.emph[tuple(loc[ok].T)], 0, 1)
            if self.mosaic_dark is not None:
                prune[ok] *= np.where(self.mosaic_dark[tuple(loc[ok].T)] > 0.5, 0.5, 1.0)
        vessel = kk > 0
        soft_vol = np.where(vessel, np.pi * rr**2 * prune, np.where(sh, np.pi * ((rr + ww) ** 2 - rr**2), 0.0)) * ds
        cuff_vol = np.where(sh & (cc > 0), np.pi * ((rr + ww + cc) ** 2 - (rr + ww) ** 2) * 0.45, 0.0) * ds
        air_vol = np.where((~vessel) & sh, np.pi * rr**2, 0.0) * ds
        soft = cv.splat(pts, soft_vol + cuff_vol)
        air = cv.splat(pts[~vessel & sh], air_vol[~vessel & sh])
        airway_findings = {}
        if cv.fractions is not None:  # the airways each airway finding changed, walls and cuffs included
            for label in ("Bronchiectasis", "Peribronchial thickening"):
                if label in fnd:
                    chosen = (kind == 0) & np.isin(seg_lobe, fnd[label]["sites"]) & show & (gen >= 1)
                    pick = chosen[seg]
                    airway_findings[label] = np.clip(cv.splat(pts[pick], (np.pi * (rr + ww + cc + 0.5) ** 2 * ds)[pick]),
                                                     0, 1)
        self.soft += soft[self.sl]
        self.air += air[self.sl]
        # QA masks from the normal tree (what a reader knows without the findings)
        normal = ~tree["distal"][seg]
        vmask = cv.splat(pts[normal], (np.pi * (tree["radius"][seg] + 0.8) ** 2 * ds)[normal]) > 0.15
        aw = normal & (kind[seg] == 0) & (tree["generation"][seg] >= 1)
        self.airway_roi = cv.splat(pts[aw], (np.pi * (tree["radius"][seg] * 1.8 + 1.5) ** 2 * ds)[aw]) > 0.1
        # composite: parenchyma + soft tissue + air, then paint into the canvas with lung occupancy
        fa = np.clip(self.air, 0, 1)
        fs = np.clip(self.soft, 0, 1 - fa)
        value = self.par * (1 - fs - fa) + fs * 40.0 + fa * (-1000.0)
        cv.paint(self.sl, self.occ, value)
        for label, share in self.parenchyma_findings.items():
            cv.mark(label, self.sl, self.occ * share)
        for label, frac in airway_findings.items():
            cv.mark(label, cv.full(), frac)
        return vmask

    def paint_local(self, occ, value):
        """Paint into the canvas on the lung box, limited to the lung occupancy."""
        self.cv.paint(self.sl, occ * self.occ, value)


# ---------------------------------------------------------------------------------------------
#: A parenchymal finding's mask: where it moved the parenchyma by more than this (HU) or added this much soft tissue
PARENCHYMA_MASK_HU = 30.0
PARENCHYMA_MASK_SOFT = 0.1


def parenchymal_findings(lung: LungContext, fnd: dict):
    """Findings that change the parenchyma field (before the tree is composited)."""
    steps = (
        ("Emphysema", _emphysema, True),
        ("Mosaic attenuation pattern", _mosaic, True),
        ("Lung opacity", _ground_glass, True),
        ("Interlobular septal thickening", _septal, True),
        ("Pulmonary fibrotic sequela", _reticular,
         fnd.get("Pulmonary fibrotic sequela", {}).get("subtype") == "basal reticular"),
        ("Consolidation", _consolidation, True),
    )
    track = lung.cv.fractions is not None
    for label, draw, applies in steps:
        if label not in fnd or not applies:
            continue
        before = (lung.par.copy(), lung.soft.copy()) if track else None
        draw(lung, fnd[label])
        if track:
            changed = (np.abs(lung.par - before[0]) > PARENCHYMA_MASK_HU) | (lung.soft - before[1] > PARENCHYMA_MASK_SOFT)
            share = lung.parenchyma_findings.get(label)
            lung.parenchyma_findings[label] = changed.astype(np.float32) if share is None else np.maximum(share, changed)
    if "Atelectasis" in fnd and fnd["Atelectasis"]["subtype"] == "passive" and "Pleural effusion" not in fnd:
        pass  # passive atelectasis is drawn with the effusion that causes it


def _emphysema(lung: LungContext, f):
    rng = _frng(f, "emphysema_seed")
    anat, cv = lung.anat, lung.cv
    emph = np.zeros(lung.shape, np.float32)
    region = lung.in_lobes(f["sites"])
    vol_region = float(region.sum()) * cv.voxel_volume
    target = f["laa_fraction"] * vol_region
    sub = f["subtype"]
    if sub == "panlobular":
        noise = 0.5 + 0.5 * np.tanh(2.0 * _local_noise(lung, rng, 6.0))
        lvl = 0.55 + 0.1 * _sev(f)
        emph = np.where(region, np.clip(lvl + 0.45 * (noise - 0.5), 0, 0.98), 0).astype(np.float32)
    else:
        done, tries = 0.0, 0
        big = sub == "bullous"
        while done < target and tries < 2000:
            tries += 1
            site = f["sites"][tries % len(f["sites"])]
            periph = 14.0 if sub in ("paraseptal", "bullous") else None
            c = anat.sample_points_in_lobe(rng, site, 1, periphery_mm=periph)[0]
            if big:
                dmm = float(rng.uniform(12, f.get("size_mm") or 30)) if done == 0 else float(rng.uniform(10, 25))
            elif sub == "paraseptal":
                dmm = float(rng.uniform(8, 16))
            else:
                dmm = float(rng.uniform(8, 18))  # confluent centrilobular lucencies
            o = lung.local_ellipsoid(c, np.array([dmm, dmm, dmm]) / 2 * rng.uniform(0.8, 1.2, 3))
            emph = np.maximum(emph, o * (0.99 if big else rng.uniform(0.93, 0.99)))
            done += np.pi / 6 * dmm**3
            if big and done > target * 0.6:
                break
    emph *= lung.occ > 0.05
    lung.emph = emph
    lung.par += emph * (-990.0 - lung.par)


def _local_noise(lung: LungContext, rng, corr):
    return smooth_noise(lung.cv, rng, corr, lung.sl)


def _mosaic(lung: LungContext, f):
    rng = _frng(f, "mosaic_seed")
    cid, _ = lung.voronoi(rng.uniform(14, 20), int(rng.integers(1 << 30)))
    patch = _local_noise(lung, rng, 28.0)
    # each secondary lobule takes one patch value: geographic borders follow lobular walls
    lut = rng.standard_normal(4096).astype(np.float32)
    val = 0.75 * patch + 0.45 * lut[cid]
    frac_dark = 0.35 + 0.06 * _sev(f)
    thr = np.quantile(val[lung.occ > 0.5], [frac_dark, 1 - 0.3]) if (lung.occ > 0.5).any() else (0, 1)
    dark = (val < thr[0]).astype(np.float32)
    bright = (val > thr[1]).astype(np.float32)
    base = lung.anat.p["lung_hu"]
    lung.par += dark * (base - 45 - 6 * _sev(f) - lung.par) * 0.9
    lung.par += bright * (base + 45 - lung.par) * 0.8
    lung.mosaic_dark = dark


def _ground_glass(lung: LungContext, f):
    rng = _frng(f)
    anat = lung.anat
    if f["subtype"] == "dependent":
        band = 10.0 + 6 * _sev(f)
        yw = anat.posterior_wall_y(lung.x, lung.z)
        occ = ramp(band - (yw - lung.y), lung.cv.spacing[1]) * lung.in_lobes(f["sites"])
        lung.par += occ * (-520.0 + 30 * _sev(f) - lung.par)
    for c, size in zip(f["centers_mm"], f["patch_mm"]):
        semi = np.array([size, size, size]) / 2 * rng.uniform(0.7, 1.2, 3)
        o = lung.local_ellipsoid(c, semi, rotation_from_axes(rng.normal(size=3)))
        n = _local_noise(lung, rng, 8.0)
        # irregular margins, but a confluent hazy core (noise holes made small patches vanish)
        o = np.clip(o * (1.3 + 0.5 * n), 0, 1)
        hu = float(rng.uniform(-520, -380))  # the dense, clearly hazy part of the ground-glass range (-700..-300)
        lung.par += o * (hu - lung.par)


def _consolidation(lung: LungContext, f):
    rng = _frng(f)
    for c, size, site in zip(f["centers_mm"], f["extent_mm"], f["sites"]):
        semi = np.array([size, size * 0.8, size]) / 2 * rng.uniform(0.8, 1.2, 3)
        rot = rotation_from_axes(rng.normal(size=3))
        lobe = lung.lobes == LOBE_IDS[site]  # consolidation respects the fissures
        core = lung.local_ellipsoid(c, semi, rot) * lobe
        rim = lung.local_ellipsoid(c, semi, rot, grow=7.0) * lobe
        lung.par += np.clip(rim - core, 0, 1) * (-480.0 - lung.par)
        lung.par += core * (float(rng.uniform(35, 50)) - lung.par)  # soft tissue, well above fluid


def _septal(lung: LungContext, f):
    rng = _frng(f, "septal_seed")
    anat = lung.anat
    _, wall = lung.voronoi(rng.uniform(12, 18), int(rng.integers(1 << 30)))
    d_cage = anat.cage_distance(lung.x, lung.y, lung.z)
    region = lung.in_lobes(f["sites"]) & (d_cage > -(30 + 10 * _sev(f)))
    t = 1.0 + 0.35 * _sev(f)
    lung.soft += lung.sheet(wall, t) * region
    lung.par += region * 25.0  # interstitial oedema raises the background slightly


def _reticular(lung: LungContext, f):
    rng = _frng(f, "fibrosis_seed")
    anat = lung.anat
    # coarse subpleural reticulation: small (5-8 mm) cells with thick (2.5 mm) walls over
    # ground-glass background, confined to a 10-19 mm subpleural rim of the bases. Septal
    # thickening, by contrast, is a sparser 12-18 mm mesh of thin walls reaching 30-60 mm deep.
    _, wall = lung.voronoi(rng.uniform(5, 8), int(rng.integers(1 << 30)))
    d_cage = anat.cage_distance(lung.x, lung.y, lung.z)
    region = lung.in_lobes(f["sites"]) & (d_cage > -(10 + 3 * _sev(f))) & (lung.z < -30)
    lung.soft += lung.sheet(wall, 2.5) * region
    lung.par += region * 150.0


# ---------------------------------------------------------------------------------------------
def lung_lesions(lung: LungContext, fnd: dict):
    """Nodules, fibrotic bands and plate atelectasis painted over the lung composite."""
    cv = lung.cv
    if "Lung nodule" in fnd:
        with cv.finding("Lung nodule"):
            _nodules(cv, fnd["Lung nodule"])
    if "Pulmonary fibrotic sequela" in fnd and fnd["Pulmonary fibrotic sequela"]["subtype"] == "apical":
        with cv.finding("Pulmonary fibrotic sequela"):
            _apical_fibrosis(lung, fnd["Pulmonary fibrotic sequela"])
    if "Atelectasis" in fnd and fnd["Atelectasis"]["subtype"] == "subsegmental":
        with cv.finding("Atelectasis"):
            _plate_atelectasis(lung, fnd["Atelectasis"])


def _nodules(cv: Canvas, f):
    """Solid, ground-glass or calcified nodules at the record's centres and diameters."""
    rng = _frng(f)
    for c, dmm in zip(f["centers_mm"], f["diameters_mm"]):
        semi = dmm / 2 * np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)])
        rot = rotation_from_axes(rng.normal(size=3))
        sub = f["subtype"]
        hu = {"solid": 38.0, "ground-glass": -360.0, "calcified": 650.0}[sub]
        if sub == "calcified" and dmm > 10:
            hu = 38.0  # large nodules of a 'calcified' record: solid with a dense core
            cv.paint_ellipsoid(hu, c, semi, rot)
            cv.paint_ellipsoid(650.0, c, semi * 0.4, rot)
        else:
            cv.paint_ellipsoid(hu, c, semi, rot)


def _apical_fibrosis(lung: LungContext, f):
    """Apical fibrotic bands toward the pleura and the apical cap."""
    rng = _frng(f, "fibrosis_seed")
    for c in f["centers_mm"]:
        _fibrotic_band(lung, np.asarray(c, float), rng, _sev(f))
    # apical cap: pleuroparenchymal thickening over the apex of the affected lung(s)
    anat = lung.anat
    top = lung.z > anat.z_apex - 25
    if top.any():
        k0 = int(np.argmax(top))
        sub = (slice(None), slice(None), slice(k0, None))
        d = anat.lung_distance(lung.x, lung.y, lung.z[..., k0:])
        cap = ramp(-(d + 3.0 + 1.0 * _sev(f)), lung.cv.h_iso) * lung.in_lobes(f["sites"])[sub]
        occ = np.zeros(lung.shape, np.float32)
        occ[sub] = cap
        lung.paint_local(occ, 30.0)


def _plate_atelectasis(lung: LungContext, f):
    """Subsegmental (plate-like) atelectasis: thin dense plates at the record's centres."""
    rng = _frng(f)
    for c, L in zip(f["centers_mm"], f["band_lengths_mm"]):
        radial = unit([c[0], c[1], 0.0])
        u = unit(np.cross(radial, [0, 0, 1.0]) + rng.normal(0, 0.3, 3))
        w = unit(np.array([0, 0, 1.0]) + rng.normal(0, 0.25, 3))
        v = unit(np.cross(w, u))
        rot = np.stack([u, v, unit(np.cross(u, v))])
        # plate-like collapse: 5-8 mm thick, 20-30 mm tall, at collapsed-lung density
        o = lung.local_ellipsoid(c, [L / 2, 10.0 + 2 * _sev(f), 2.5 + 0.5 * _sev(f)], rot)
        lung.paint_local(o, 45.0)


def _fibrotic_band(lung: LungContext, c, rng, sev):
    """Irregular scar: a random-walk tube toward the nearest pleura, with pleural tenting."""
    anat = lung.anat
    d = unit(np.array([c[0], c[1] - 0.2 * anat.B, 0.6 * abs(c[0])]) + rng.normal(0, 0.4, 3))
    p = c - d * rng.uniform(8, 18)
    pts = [p]
    for _ in range(int(rng.integers(4, 8))):
        d = unit(d + rng.normal(0, 0.35, 3))
        p = p + d * rng.uniform(4, 9)
        pts.append(p)
    r = 1.7 + 0.3 * sev  # fibroatelectatic bands 3.5–5 mm thick
    for a in range(len(pts) - 1):
        sl, occ = lung.cv.tube(pts[a], pts[a + 1], r * rng.uniform(0.8, 1.3))
        if sl is not None:
            lung.cv.paint(sl, occ, 30.0)
    lung.cv.paint_ellipsoid(20.0, pts[-1], [7.0, 7.0, 4.0])  # pleural tag / apical cap


def pleural_effusion(lung: LungContext, fnd: dict):
    """Dependent fluid crescent (+ passive atelectasis of the compressed lung).

    Returns:
        boolean mask (full grid) of the voxels that are mostly pleural fluid, or None without an effusion.
    """
    if "Pleural effusion" not in fnd:
        return None
    cv = lung.cv
    fluid_mask = np.zeros(cv.shape, bool)
    f = fnd["Pleural effusion"]
    anat = lung.anat
    x, y, z = lung.x, lung.y, lung.z
    yw = anat.posterior_wall_y(x, z)
    passive = fnd.get("Atelectasis", {}).get("subtype") == "passive"
    band = float(fnd["Atelectasis"].get("band_mm", 12.0)) if passive else 0.0
    sides = {"bilateral": (-1, 1), "right": (-1,), "left": (1,)}[f["side"]]
    for s in sides:
        t_max = float(f["size_mm"]) * (1.0 if s == sides[0] else f.get("thickness_ratio_other_side", 0.8))
        z_base = (anat.z_dome_r if s < 0 else anat.z_dome_l) + 10
        z_top = z_base + 2.2 * t_max + 70
        t = t_max * np.clip((z_top - z) / (z_top - z_base), 0, 1) ** 0.8
        depth = yw - y  # distance in front of the posterior wall (gravity is +y)
        side = (x < 4) if s < 0 else (x >= 4)
        fluid = ramp(depth - t, lung.cv.spacing[1]) * side
        with cv.finding("Pleural effusion"):
            lung.paint_local(fluid, FLUID_HU)
        fluid_mask[lung.sl] |= fluid * lung.occ > 0.5
        if passive and (f["side"] == "bilateral" or any(st.startswith("right" if s < 0 else "left") for st in fnd["Atelectasis"]["sites"])):
            comp = np.clip(ramp(depth - t - band, lung.cv.spacing[1]) - fluid, 0, 1) * side * (t > 2)
            with cv.finding("Atelectasis"):
                lung.paint_local(comp, 50.0)  # collapsed lung: ~40 HU denser than the fluid beside it
    return fluid_mask


# ---------------------------------------------------------------------------------------------
def pericardial_effusion(cv: Canvas, anat: ChestAnatomy, f):
    """Fluid between the epicardial fat and the pericardium, thickest posterior-inferiorly."""
    t = float(f["size_mm"])
    shift = np.array([0.0, 0.3 * t, -0.2 * t])
    cv.paint_ellipsoid(FLUID_HU + 5, anat.heart_center + shift, anat.heart_semi, anat.heart_rot, grow=3.0 + 0.7 * t)


def lymphadenopathy(cv: Canvas, anat: ChestAnatomy, f):
    """Enlarged nodes without fatty hilum; short axis from the record."""
    sizes = f.get("node_sizes_mm", [f["size_mm"]] * len(f["centers_mm"]))
    rng = _frng(f)
    for c, s in zip(f["centers_mm"], sizes):
        semi = np.array([s / 2, s / 2 * rng.uniform(1.1, 1.3), s / 2 * rng.uniform(1.2, 1.6)])
        cv.paint_ellipsoid(42.0, c, semi)


def hiatal_hernia(cv: Canvas, anat: ChestAnatomy, f):
    """Stomach above the hiatus: walled sac with an air-fluid level, continuous with the stomach."""
    d = float(f["size_mm"])
    c = np.asarray(f["centers_mm"][0], float)
    semi = np.array([d / 2, d / 2 * 0.85, d / 2 * 0.9])
    stomach_top = np.array([0.38 * anat.A, -0.12 * anat.B, anat.z_dome_l - 10])
    cv.paint_polyline(40.0, [c, stomach_top], 11.0)
    cv.paint_ellipsoid(40.0, c, semi)
    sl, occ = cv.ellipsoid(c, semi - 3.5)
    if sl is not None:
        x, y, z = cv.coords(sl)
        level = c[1] - 0.2 * semi[1]
        cv.paint(sl, occ, np.where(y < level, -1000.0, 15.0).astype(np.float32))


def arterial_calcification(cv: Canvas, anat: ChestAnatomy, f):
    """Curvilinear intimal plaques on the aortic wall (arch and descending aorta)."""
    rng = _frng(f, "plaque_seed")
    pts_all, vol_all = [], []
    ap, rad = anat.aorta_points, anat.aorta_radii
    n0 = int(0.3 * len(ap))
    for _ in range(int(f["count"])):
        i = int(rng.integers(n0, len(ap) - 2))
        tng = unit(ap[i + 1] - ap[i])
        R = rotation_from_axes(tng)
        # the conspicuous end of aortic plaques (1-3 mm thick, 2-20 mm long) so they survive 3-4 mm voxels
        L = float(rng.uniform(6, 18))  # arc length around the wall
        width = float(rng.uniform(3, 8))  # extent along the vessel
        thick = float(rng.uniform(1.5, 3.0))
        r = rad[i] - 0.5 * thick
        a0 = rng.uniform(0, 2 * np.pi)
        ang = a0 + np.arange(0, L / r, 0.4 / r)
        for s in np.arange(-width / 2, width / 2 + 1e-6, 0.5):
            q = ap[i] + tng * s + r * (np.cos(ang)[:, None] * R[1] + np.sin(ang)[:, None] * R[2])
            pts_all.append(q)
            vol_all.append(np.full(len(q), thick * 0.5 * 0.4))
    pts = np.concatenate(pts_all)
    frac = cv.splat(pts, np.concatenate(vol_all))
    cv.paint_fraction(frac, float(rng.uniform(500, 1000)))


def coronary_calcification(cv: Canvas, anat: ChestAnatomy, f):
    """Calcified foci on the coronary centrelines (LAD > LCx > RCA)."""
    rng = _frng(f)
    pts, vols = [], []
    for c in f["centers_mm"]:
        dmm = float(rng.uniform(4.5, 6.0))  # real foci are 1-6 mm; smaller ones vanish at 3-4 mm voxels
        for k in range(int(rng.integers(2, 4))):  # a plaque: a short cluster along the artery
            pts.append(np.asarray(c) + rng.normal(0, 1.5, 3))
            vols.append(np.pi / 6 * dmm**3)
    frac = cv.splat(np.array(pts), np.array(vols))
    cv.paint_fraction(frac, float(rng.uniform(650, 900)))  # the dense end of coronary calcium (+200..+900)


def devices(cv: Canvas, anat: ChestAnatomy, fnd: dict):
    """Medical material: wires, catheters, ports, pacemakers, clips.

    Returns:
        float32 volume of metal attenuation excess (HU x volume fraction above +1000) that drives
        the scanner's streak artefacts, or None without metal. Thin metal (wires, clips) is
        partial-volumed far below its true HU on coarse grids but still streaks.
    """
    if "Medical material" not in fnd:
        return None
    before = cv.hu.copy()
    f = fnd["Medical material"]
    rng = _frng(f, "device_seed")
    metal = False
    A, B = anat.A, anat.B
    for dev, c in zip(f.get("devices", [f["subtype"]]), f["centers_mm"]):
        c = np.asarray(c, float)
        if dev == "sternotomy wires":
            pts, vols = [], []
            for zz in np.linspace(40, -110, int(rng.integers(4, 7))):
                th = np.linspace(0, 2 * np.pi, 80)
                q = np.stack([17 * np.cos(th), -B - 8 + 9 * np.sin(th), zz + 2 * np.sin(2 * th)], -1)
                pts.append(q)
                vols.append(np.full(len(q), np.pi * 0.5**2 * (2 * np.pi * 13 / 80) * 1.6))
            cv.paint_fraction(cv.splat(np.concatenate(pts), np.concatenate(vols)), STEEL_HU)
            metal = True
        elif dev in ("central venous catheter", "port catheter"):
            top = np.array([-0.3 * A, -0.35 * B, 140.0])
            path = [top, anat.rbcv[0], anat.rbcv[-1], anat.svc[1], anat.svc[-1] + [0, 0, -10]]
            if dev == "port catheter":
                port = np.array([-0.5 * A, -B - 20 - 0.5 * anat.fat, 55.0])
                path = [port, port + [15, 0, 25], anat.rbcv[0]] + path[1:]
                cv.paint_ellipsoid(TITANIUM_HU, port, [13.0, 6.0, 13.0])
                cv.paint_ellipsoid(20.0, port, [7.0, 3.0, 7.0])
                metal = True
            q, ds = sample_polyline(path, 1.0)
            cv.paint_fraction(cv.splat(q, np.pi * 1.3**2 * ds), 900.0)
            cv.paint_fraction(cv.splat(q[-4:], np.pi * 1.3**2 * ds[-4:]), TITANIUM_HU * 0.3)
        elif dev == "pacemaker":
            box = np.array([0.55 * A, -B - 22 - 0.5 * anat.fat, 60.0])
            cv.paint_ellipsoid(TITANIUM_HU, box, [24.0, 4.5, 22.0])
            ra = anat.heart_surface_point(0.8 * np.pi, 0.0, grow=-10)[0]
            rv = anat.heart_surface_point(0.15 * np.pi, 0.0, grow=-10)[0]
            for tip in (ra, rv):
                path = [box, anat.lbcv[0], anat.lbcv[-1], anat.svc[1], anat.svc[-1], tip]
                q, ds = sample_polyline(path, 1.0)
                cv.paint_fraction(cv.splat(q, np.pi * 0.9**2 * ds), STEEL_HU)
            metal = True
        else:  # surgical clips
            for _ in range(int(rng.integers(3, 7))):
                p = c + rng.normal(0, 12, 3)
                d = unit(rng.normal(size=3))
                q, ds = sample_polyline([p - 2.5 * d, p + 2.5 * d], 0.5)
                cv.paint_fraction(cv.splat(q, np.pi * 0.6**2 * ds * 2), STEEL_HU)
            metal = True
    if not metal:
        return None
    return np.clip(cv.hu - before, 0, None) * (cv.hu > before + 150)
