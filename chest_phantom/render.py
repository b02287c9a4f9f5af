"""Noiseless partial-volume truth volume of one case: ``render_truth(record, grid)``.

Contract::

    render_truth(record: dict, grid: dict, finding_masks: bool = False)
        -> {"hu": float32 (nx, ny, nz), "masks": {...}, "anatomy": uint8 (nx, ny, nz),
            "geometry": {...}, "metal": bool[, "findings": int32 (nx, ny, nz)]}

``grid = {"shape": [nx, ny, nz], "spacing_mm": [sx, sy, sz], "origin_mm": [x0, y0, z0]}``; index
``(i, j, k)`` is patient LPS ``origin + (i*sx, j*sy, k*sz)``. ``masks`` holds boolean arrays of the
*normal* anatomy (what a QA detector may know without seeing the findings): ``body``, ``lung``
(normal lung field), ``lobes`` (uint8 ids of :data:`.anatomy.LOBES`), ``bone``, ``heart_region``,
``aorta``, ``aorta_wall``, ``coronary``, ``vessels`` (bronchovascular tree), ``airway_roi``,
``mediastinal_vessels`` (great vessels, trachea, oesophagus), ``liver``. ``geometry`` has key
points and centrelines in mm (carina, node stations, hiatus, cage half-width...).

``anatomy`` is the anatomical label map of the case (ids of ``ctclip_contract.anatomy.ANATOMY_LABELS``; the
regions are drawn from the same geometry as the HU, each voxel taking the region that holds most of it, with the
later layer of the list in :func:`anatomy_label_map` winning where two overlap). With ``finding_masks``,
``findings`` is the int32 bit field of the findings actually drawn (bit ``i`` = pathology ``i`` of
``CTRATE_PATHOLOGIES``): the canvas tracks the share of each voxel every finding painted
(:meth:`.canvas.Canvas.finding`); a voxel belongs to a finding when at least half of it is that finding.
Tracking does not change the HU.

Painting order (later layers overwrite earlier ones, each with its partial-volume occupancy):
air/table → body fat, skin, breasts, muscles → bones → cavity fat → upper abdomen → lungs
(parenchyma with its findings, then the splatted bronchovascular tree) → lung lesions → mediastinum
(heart, pericardium, great vessels, airways, oesophagus, nodes, hernia, calcifications) → pleural
effusion → devices → soft-tissue texture.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctclip_contract import CTRATE_PATHOLOGIES
from ctclip_contract.anatomy import REGION_IDS

from . import findings as F
from .anatomy import LOBES, NODE_STATIONS, ChestAnatomy
from .canvas import Canvas, ramp, rotation_from_axes, sample_polyline, smooth_noise

__all__ = ["render_truth", "anatomy_label_map"]

#: Phantom lobe ids (:data:`.anatomy.LOBES`) -> regions (the lingula is part of the left upper lobe, as in
#: TotalSegmentator)
_LOBE_REGIONS = {1: "lung_upper_lobe_right", 2: "lung_middle_lobe_right", 3: "lung_lower_lobe_right",
                 4: "lung_upper_lobe_left", 5: "lung_upper_lobe_left", 6: "lung_lower_lobe_left"}


def render_truth(record: dict, grid: dict, finding_masks: bool = False) -> dict:
    """Render the noiseless partial-volume HU volume of a case record on a grid.

    Args:
        record: a case record from :func:`.record.sample_case_record`.
        grid: ``{"shape", "spacing_mm", "origin_mm"}`` (LPS, see module docstring).
        finding_masks: also return ``"findings"``, the int32 bit field of the drawn findings.

    Returns:
        dict with ``"hu"`` (float32, shape ``grid["shape"]``), ``"masks"`` (normal-anatomy
        boolean/uint8 arrays for QA), ``"geometry"`` (key points in mm) and ``"metal"`` (whether
        metal devices are present), ``"anatomy"`` (uint8 anatomical label map), with metal ``"metal_map"`` (float32
        HU excess of the devices per voxel, which drives the scanner's streak artefacts) and with ``finding_masks``
        ``"findings"`` (int32 bit field).
    """
    anat = ChestAnatomy(record["anatomy"], record.get("incidental", ()))
    cv = Canvas(grid, background=-1000.0)
    if finding_masks:
        cv.track_findings()
    rng = np.random.default_rng([int(record["seed"]) & 0xFFFFFFFF, 0xD1CE])
    p = anat.p
    fnd = {f["label"]: f for f in record["findings"]}
    inc = set(record.get("incidental", ()))
    masks = {}

    _paint_table(cv, anat)
    _paint_body_wall(cv, anat)
    masks["body"] = cv.hu > -500
    bone = _paint_bones(cv, anat, inc, rng)
    # thoracic cavity (mediastinal fat everywhere inside the cage; organs are painted on top)
    X, Y, Z = cv.coords(cv.full())
    d_cage = anat.cage_distance(X, Y, Z)
    cv.paint(cv.full(), ramp(d_cage, cv.h_iso), p["fat_hu"])
    masks.update(_paint_abdomen(cv, anat, inc, rng))

    # ---- lungs
    lung = F.LungContext(cv, anat, rng)
    masks["lung"] = lung.occ_full() > 0.5
    masks["lobes"] = lung.lobes_full()
    F.parenchymal_findings(lung, fnd)
    tree = anat.bronchovascular_tree()
    vessels_mask = lung.composite(tree, fnd)
    masks["vessels"] = vessels_mask
    masks["airway_roi"] = lung.airway_roi
    F.lung_lesions(lung, fnd)

    # ---- mediastinum
    med = _paint_mediastinum(cv, anat, fnd, inc, rng)
    masks.update(med)
    masks["bone"] = bone
    fluid = F.pleural_effusion(lung, fnd)
    masks["pleural_fluid"] = fluid if fluid is not None else np.zeros(cv.shape, bool)
    with cv.finding("Medical material"):
        metal_map = F.devices(cv, anat, fnd)

    # pure-tissue masks for HU QA: voxels still holding exactly their tissue's value
    hu0 = cv.hu
    inner_wall = anat.cage_distance(X, Y, Z, grow=18.0) > 3.0
    masks["subcutaneous_fat"] = masks["body"] & (np.abs(hu0 - p["fat_hu"]) < 0.5) & inner_wall
    masks["muscle"] = np.abs(hu0 - p["muscle_hu"]) < 0.5
    masks["liver"] = np.abs(hu0 - p["liver_hu"]) < 0.5
    masks["cancellous_bone"] = np.abs(hu0 - p["cancellous_hu"]) < 0.5
    masks["abdomen"] = (Z < anat.diaphragm_z(X, Y)) & (d_cage < 0)

    # ---- soft-tissue texture (organs are not piecewise constant)
    soft = (cv.hu > -200) & (cv.hu < 200)
    tex = smooth_noise(cv, rng, 3.0)
    cv.hu += np.where(soft, 5.0 * tex, 0.0).astype(np.float32)

    geometry = {
        "carina_mm": [0.0, float(anat.yt), 0.0],
        "cage_half_width_mm": float(anat.A),
        "cage_half_depth_mm": float(anat.B),
        "z_dome_right_mm": float(anat.z_dome_r),
        "z_dome_left_mm": float(anat.z_dome_l),
        "z_hiatus_mm": float(anat.z_hiatus),
        "z_lung_apex_mm": float(anat.z_apex),
        "heart_center_mm": [float(v) for v in anat.heart_center],
        "esophagus_mm": anat.esophagus.tolist(),
        "aorta_mm": anat.aorta_points.tolist(),
        "node_stations_mm": {s: anat.node_station(s).tolist() for s in NODE_STATIONS},
        "liver_center_mm": list(map(float, anat.liver_center)),
        "vertebra_center_yx_mm": [float(anat.yv), 0.0],
        "lobes": LOBES,
    }
    out = {"hu": cv.hu, "masks": masks, "geometry": geometry, "metal": metal_map is not None,
           "anatomy": anatomy_label_map(cv, anat, masks)}
    if finding_masks:
        if "Cardiomegaly" in fnd:  # the finding is the heart's size: the whole heart
            cv.mark("Cardiomegaly", cv.full(), masks["heart_region"])
        bits = np.zeros(cv.shape, np.int32)
        for label, m in cv.finding_masks().items():
            if label in CTRATE_PATHOLOGIES:
                bits[m] |= np.int32(1 << CTRATE_PATHOLOGIES.index(label))
        out["findings"] = bits
    if metal_map is not None:
        out["metal_map"] = metal_map
    return out


# ---------------------------------------------------------------------------------------------
def _paint_table(cv: Canvas, anat: ChestAnatomy):
    y_top = anat.body_yc + anat.body_b + anat.p["table_gap_mm"]
    x, y, z = cv.coords(cv.full())
    curve = y_top + 0.0009 * x**2  # slightly curved couch
    pad = (y >= curve) & (y < curve + 8) & (np.abs(x) < 240)
    shell = (y >= curve + 8) & (y < curve + 12) & (np.abs(x) < 230)
    occ_pad = np.broadcast_to(ramp(np.maximum(curve - y, y - curve - 8), cv.spacing[1]) * (np.abs(x) < 240), cv.shape)
    cv.paint(cv.full(), occ_pad, -850.0)
    occ_shell = np.broadcast_to(ramp(np.maximum(curve + 8 - y, y - curve - 12), cv.spacing[1]) * (np.abs(x) < 230), cv.shape)
    cv.paint(cv.full(), occ_shell, 250.0)
    del pad, shell


def _paint_body_wall(cv: Canvas, anat: ChestAnatomy):
    p = anat.p
    full = cv.full()
    X, Y, Z = cv.coords(full)
    d_body = anat.body_distance(X, Y, Z)
    w = float(np.sqrt(cv.spacing[0] * cv.spacing[1]))
    cv.paint(full, ramp(d_body, w), 35.0)  # skin
    cv.paint(full, ramp(d_body + 2.0, w), p["fat_hu"])
    if p["breasts"]:
        for s in (-1, 1):
            c = [s * 0.48 * anat.A, -anat.B - 20 - anat.fat, -45.0]
            semi = [58.0, 30 + 0.6 * anat.fat, 55.0]
            cv.paint_ellipsoid(35.0, c, semi)
            cv.paint_ellipsoid(p["fat_hu"], c, semi, grow=-2.0)
            cv.paint_ellipsoid(-20.0, np.add(c, [0, 8, 0]), [35.0, 15 + 0.3 * anat.fat, 32.0])
    # chest-wall muscle ring (intercostals, serratus, latissimus), pectorals, paraspinals
    d_wall = anat.cage_distance(X, Y, Z, grow=15.0)
    cv.paint(full, ramp(d_wall, w), p["muscle_hu"])
    for s in (-1, 1):
        cv.paint_ellipsoid(p["muscle_hu"], [s * 0.42 * anat.A, -anat.B - 14, 45.0], [0.45 * anat.A, 9.0, 75.0])
        cv.paint_ellipsoid(p["muscle_hu"], [s * 0.62 * anat.A, 0.88 * anat.B + 14, 75.0], [0.34 * anat.A, 14.0, 75.0],
                           rot=rotation_from_axes([np.cos(0.5), -s * np.sin(0.5), 0]))
        sl = cv.box([s * 36 - 28, anat.yv + anat.rv - 5, -1e4], [s * 36 + 28, anat.yv + anat.rv + 60, 1e4])
        if sl is not None:
            x, y, z = cv.coords(sl)
            d = np.sqrt(((x - s * 36) / 24) ** 2 + ((y - (anat.yv + anat.rv + 27)) / 26) ** 2) - 1
            cv.paint(sl, np.broadcast_to(ramp(d * 24, w), cv.hu[sl].shape), p["muscle_hu"])


def _paint_bones(cv: Canvas, anat: ChestAnatomy, inc, rng):
    p = anat.p
    cort, canc = p["cortical_hu"], p["cancellous_hu"]
    bone_before = cv.hu.copy()
    # vertebral column: bodies with discs, canal with cord, neural arch and spinous processes
    h = p["vertebral_height_mm"]
    zlo, zhi = cv.axes[2][0] - 5, cv.axes[2][-1] + 5
    sl = cv.box([-anat.rv - 30, anat.yv - anat.rv - 2, zlo], [anat.rv + 30, anat.yv + anat.rv + 62, zhi])
    x, y, z = cv.coords(sl)
    xs = anat.spine_x(z)
    r = anat.rv * (1 + 0.15 * np.clip(-z / 200, -0.3, 1))  # wider caudally
    d_body = np.sqrt((x - xs) ** 2 + (y - anat.yv) ** 2) - r
    phase = np.mod(z - 2.0, h)
    disc = (phase < 6.0).astype(np.float32)
    w = cv.h_iso
    body_val = (1 - disc) * canc + disc * 90.0
    if "degenerative osteophytes" in inc:
        d_body = d_body - 4.0 * np.exp(-((phase - 6.0) ** 2) / 6.0) - 4.0 * np.exp(-((phase - h) ** 2) / 6.0)
    cv.paint(sl, ramp(d_body, w), np.float32(cort))
    cv.paint(sl, ramp(d_body + 1.5, w), body_val)
    yc = anat.yv + anat.rv + 11
    d_arch = np.sqrt((x - xs) ** 2 + (y - yc) ** 2)
    cv.paint(sl, ramp(np.abs(d_arch - 12.0) - 3.5, w), np.float32(0.5 * (cort + canc)))
    cv.paint(sl, ramp(d_arch - 8.5, w), 10.0)  # CSF
    cv.paint(sl, ramp(d_arch - 5.0, w), 30.0)  # cord
    spin = np.maximum(np.abs(x - xs) - 3.5, np.maximum(yc + 12 - y, y - (yc + 45)))
    cv.paint(sl, ramp(spin, w), np.float32(0.5 * (cort + canc)))
    trans = np.maximum(np.abs(y - yc) - 4.0, np.maximum(np.abs(x - xs) - 30, 12 - np.abs(x - xs)))
    cv.paint(sl, ramp(trans, w) * (phase > 8), np.float32(0.5 * (cort + canc)))
    # ribs: 12 pairs, from the costovertebral joints around the cage, descending anteriorly
    z_t1 = 3.5 * h
    calc_cart = "costal cartilage calcification" in inc
    for i in range(12):
        z0 = z_t1 - i * h
        reach = np.pi * (1.0 if i < 7 else (0.85 if i < 10 else 0.55))
        th = np.linspace(0.12, reach, 12)
        drop = (45 + 25 * (i > 4)) * (th / np.pi) ** 1.3 - 8 * np.sin(th)  # rises, then runs anterior-inferior
        for s in (-1, 1):
            zz = z0 - drop
            a, b = anat.cage_ab(zz)
            pts = np.stack([s * (a + 6) * np.sin(th), (b + 6) * np.cos(th), zz], -1)
            bone_part = th < 0.78 * np.pi if i < 10 else np.ones_like(th, bool)
            pb = pts[bone_part]
            cv.paint_polyline_layers(pb, [(np.float32(cort), 5.0), (np.float32(canc + 100), 3.2)])
            if i < 10:
                pc = pts[~bone_part]
                pc = np.concatenate([pb[-1:], pc, [[s * 14.0, -anat.B - 6, pc[-1, 2] if len(pc) else zz[-1]]]])
                cv.paint_polyline(150.0, pc, 4.5)  # costal cartilage
                if calc_cart:
                    q, _ = sample_polyline(pc, 6.0)
                    sel = q[rng.random(len(q)) < 0.4]
                    for c in sel:
                        cv.paint_ellipsoid(450.0, c, [1.8, 1.8, 1.8])
    # sternum (manubrium + body)
    ztop, zbot = 60.0, -135.0
    sl = cv.box([-22, -anat.B - 20, zbot - 3], [22, -anat.B + 2, ztop + 3])
    if sl is not None:
        x, y, z = cv.coords(sl)
        half_w = 14 + 6 * (z > 25)
        yc_s = -anat.B - 8
        d = np.maximum(np.maximum(np.abs(x) - half_w, np.abs(y - yc_s) - 6.5), np.maximum(z - ztop, zbot - z))
        cv.paint(sl, ramp(d, w), np.float32(cort * 0.8))
        cv.paint(sl, ramp(d + 1.5, w), np.float32(canc + 30))
    # clavicles and scapulae
    for s in (-1, 1):
        cl = np.array([[s * 20.0, -anat.B - 12, 62], [s * 0.55 * anat.A, -anat.B - 5, 75], [s * (anat.A + 10), -0.45 * anat.B, 92]])
        cv.paint_polyline_layers(cl, [(np.float32(cort), 6.5), (np.float32(canc + 80), 4.5)])
        # scapula: a thin plate on the posterolateral chest wall, tangent to the ribs
        R = rotation_from_axes([np.cos(0.5), -s * np.sin(0.5), 0.0])
        c = [s * 0.62 * anat.A, 0.88 * anat.B + 14, 75.0]
        cv.paint_ellipsoid(np.float32(cort * 0.8), c, [0.28 * anat.A, 3.0, 60.0], rot=R)
    bone = (cv.hu - bone_before) > 60
    bone &= cv.hu > 120
    return bone


def _paint_abdomen(cv: Canvas, anat: ChestAnatomy, inc, rng):
    p = anat.p
    full = cv.full()
    X, Y, Z = cv.coords(full)
    zlo = min(anat.z_dome_r, anat.z_dome_l)
    sl = cv.box([-anat.A - 5, -anat.B - 5, cv.axes[2][0]], [anat.A + 5, anat.B + 5, anat.z_dome_r + 5])
    if sl is None:
        anat.liver_center = np.array([-0.35 * anat.A, 0.05 * anat.B, anat.z_dome_r - 75])
        return {}
    organs = {}
    x, y, z = cv.coords(sl)
    below = ramp(z - anat.diaphragm_z(x, y), cv.spacing[2])
    inside = ramp(anat.cage_distance(x, y, z), cv.h_iso)
    base = below * inside
    cv.paint(sl, base, -40.0)  # mixed abdominal fat/soft tissue
    # liver under the right dome
    lc = np.array([-0.32 * anat.A, 0.05 * anat.B, anat.z_dome_r - 80])
    anat.liver_center = lc
    s_l, occ = cv.ellipsoid(lc, [0.85 * anat.A, 0.98 * anat.B, 100.0], sl=sl)
    cv.paint(sl, occ * base, p["liver_hu"])
    organs["liver_region"] = _full_mask(cv, sl, occ * base > 0.5)
    # spleen posterior-left, stomach under the left dome with an air-fluid level (air anterior in supine)
    s_s, occ = cv.ellipsoid([0.62 * anat.A, 0.45 * anat.B, anat.z_dome_l - 60], [26, 0.5 * anat.B, 50], sl=sl)
    cv.paint(sl, occ * base, p["spleen_hu"])
    sc = np.array([0.38 * anat.A, -0.12 * anat.B, anat.z_dome_l - 48])
    semi = np.array([42.0, 38.0, 44.0])
    _, occ = cv.ellipsoid(sc, semi, sl=sl)
    cv.paint(sl, occ * base, 40.0)
    organs["stomach"] = _full_mask(cv, sl, occ * base > 0.5)
    _, occ = cv.ellipsoid(sc, semi - 4, sl=sl)
    level = sc[1] + semi[1] * (1 - 2 * p["stomach_air_fraction"])
    content = np.where(y < level, -1000.0, 12.0).astype(np.float32)
    cv.paint(sl, occ * base, content)
    for s in (-1, 1):
        kc = [s * 0.45 * anat.A, 0.7 * anat.B, zlo - 120]
        _, occ = cv.ellipsoid(kc, [28, 30, 50], sl=sl)
        cv.paint(sl, occ * base, 32.0)
        if "renal cyst" in inc and s == 1:
            _, occ = cv.ellipsoid(np.add(kc, [12, 0, 25]), [11, 11, 11], sl=sl)
            cv.paint(sl, occ * base, 8.0)
    del X, Y, Z
    return organs


def _full_mask(cv: Canvas, sl, local) -> np.ndarray:
    out = np.zeros(cv.shape, bool)
    out[sl] = local
    return out


def _polyline_mask(cv: Canvas, points, radii, out=None) -> np.ndarray:
    """Voxels mostly inside a tube along a polyline (radius per point)."""
    out = np.zeros(cv.shape, bool) if out is None else out
    pts = np.asarray(points, dtype=np.float64)
    rad = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
    for a in range(len(pts) - 1):
        sl, occ = cv.tube(pts[a], pts[a + 1], rad[a], rad[a + 1])
        if sl is not None:
            out[sl] |= occ > 0.5
    return out


def anatomy_label_map(cv: Canvas, anat: ChestAnatomy, masks: dict) -> np.ndarray:
    """The anatomical label map of a rendered case (uint8 ids of ``ctclip_contract.anatomy.ANATOMY_LABELS``).

    Layers, each painted over the ones before it: body wall (the body outline, without the table) → upper abdomen
    (inside the cage below the diaphragm) → mediastinum (inside the cage above the diaphragm, outside the lungs) →
    liver, stomach → lung lobes → pleural space (pleural fluid) → heart (with the pericardium) → pulmonary artery,
    superior vena cava, aorta → oesophagus → thyroid → trachea → bronchi → bone.

    Args:
        cv: the canvas after painting.
        anat: the case anatomy.
        masks: the normal-anatomy masks of :func:`render_truth` (``body``, ``lobes``, ``heart_region``, ``aorta``,
            ``bone``, ``abdomen``, ``liver_region``, ``stomach``, ``pleural_fluid``).
    """
    X, Y, Z = cv.coords(cv.full())
    y_table = anat.body_yc + anat.body_b + anat.p["table_gap_mm"]
    in_cage = anat.cage_distance(X, Y, Z) < 0
    lung = masks["lobes"] > 0
    layers = [
        ("body_wall", masks["body"] & (Y < y_table)),
        ("abdomen", masks["abdomen"]),
        ("mediastinum", in_cage & (Z >= anat.diaphragm_z(X, Y)) & ~lung),
        ("liver", masks.get("liver_region")),
        ("stomach", masks.get("stomach")),
        *[(name, masks["lobes"] == lobe) for lobe, name in _LOBE_REGIONS.items()],
        ("pleural_space", masks.get("pleural_fluid")),
        ("heart", masks["heart_region"]),
        ("pulmonary_artery", _polyline_mask(cv, anat.rpa, 0.75 * anat.pa_radius,
                                            _polyline_mask(cv, anat.lpa, 0.72 * anat.pa_radius,
                                                           _polyline_mask(cv, anat.pa_trunk, anat.pa_radius)))),
        ("superior_vena_cava", _polyline_mask(cv, anat.svc, anat.svc_radius)),
        ("aorta", masks["aorta"]),
        ("esophagus", _polyline_mask(cv, anat.esophagus, 8.0)),
        ("thyroid_gland", _thyroid_mask(cv, anat)),
        ("trachea", _polyline_mask(cv, [[0.0, anat.yt, cv.axes[2][-1] + 10], [0.0, anat.yt, 0.0]], anat.rt + 1.6)),
        ("bronchi", _bronchi_mask(cv, anat)),
        ("bone", masks["bone"]),
    ]
    out = np.zeros(cv.shape, np.uint8)
    for name, m in layers:
        if m is not None:
            out[np.broadcast_to(m, cv.shape)] = REGION_IDS[name]
    return out


def _thyroid_mask(cv: Canvas, anat: ChestAnatomy) -> np.ndarray:
    out = np.zeros(cv.shape, bool)
    for s in (-1, 1):
        sl, occ = cv.ellipsoid([s * 18.0, anat.yt - 8, anat.z_apex + 25], [10, 10, 22])
        if sl is not None:
            out[sl] |= occ > 0.5
    return out


def _bronchi_mask(cv: Canvas, anat: ChestAnatomy) -> np.ndarray:
    out = np.zeros(cv.shape, bool)
    for a, b, r in anat.main_bronchi + anat.lobar_bronchi:
        _polyline_mask(cv, [a, b], r * 1.35 + 0.6, out)
    return out


def _paint_mediastinum(cv: Canvas, anat: ChestAnatomy, fnd, inc, rng):
    """Heart, pericardium, great vessels, trachea, oesophagus, nodes; returns QA masks."""
    p = anat.p
    blood = p["blood_hu"]
    fat = p["fat_hu"]
    masks = {}
    hc, hs, hr = anat.heart_center, anat.heart_semi, anat.heart_rot
    t_eff = float(fnd["Pericardial effusion"]["size_mm"]) if "Pericardial effusion" in fnd else 0.0
    # pericardium (1.5 mm line) → effusion (dependent-heavy) → epicardial fat → myocardium/blood
    sl, _ = cv.ellipsoid(hc, hs, hr, grow=6 + t_eff + 4)
    masks["heart_region"] = np.zeros(cv.shape, bool)
    _, o = cv.ellipsoid(hc, hs, hr, grow=6.0, sl=sl)
    masks["heart_region"][sl] = o > 0.5
    cv.paint_ellipsoid(fat, hc, hs, hr, grow=6.0 + t_eff + 1.5)
    cv.paint_ellipsoid(30.0, hc, hs, hr, grow=4.5 + t_eff)
    if t_eff > 0:
        with cv.finding("Pericardial effusion"):
            F.pericardial_effusion(cv, anat, fnd["Pericardial effusion"])
    cv.paint_ellipsoid(fat, hc, hs, hr, grow=3.0)
    cv.paint_ellipsoid(blood, hc, hs, hr)
    # coronary arteries in the epicardial fat
    cor = np.zeros(cv.shape, np.float32)
    for curve, r in ((anat.lad, 1.6), (anat.lcx, 1.5), (anat.rca, 1.7)):
        q, ds = sample_polyline(curve, 1.0)
        cv.splat_into(cor, q, np.pi * r * r * ds)
    cv.paint_fraction(cor, blood)
    masks["coronary"] = ndimage.binary_dilation(cor > 0.02, iterations=1)
    # great vessels
    ves = cv.hu.copy()
    cv.paint_polyline(blood, anat.aorta_points, anat.aorta_radii)
    for br, r in zip(anat.arch_branches, anat.branch_radii):
        cv.paint_polyline(blood, br, r)
    cv.paint_polyline(blood, anat.pa_trunk, anat.pa_radius)
    cv.paint_polyline(blood, anat.rpa, 0.75 * anat.pa_radius)
    cv.paint_polyline(blood, anat.lpa, 0.72 * anat.pa_radius)
    cv.paint_polyline(blood, anat.svc, anat.svc_radius)
    cv.paint_polyline(blood, anat.lbcv, 6.5)
    cv.paint_polyline(blood, anat.rbcv, 7.0)
    ao = np.zeros(cv.shape, bool)
    wall = np.zeros(cv.shape, bool)
    for a in range(len(anat.aorta_points) - 1):
        s_, o = cv.tube(anat.aorta_points[a], anat.aorta_points[a + 1], anat.aorta_radii[a], anat.aorta_radii[a + 1])
        if s_ is not None:
            ao[s_] |= o > 0.5
        s2, o2 = cv.tube(anat.aorta_points[a], anat.aorta_points[a + 1], anat.aorta_radii[a] + 4.0, anat.aorta_radii[a + 1] + 4.0)
        if s2 is not None:
            wall[s2] |= o2 > 0.05
    masks["aorta"] = ao
    masks["aorta_wall"] = wall & ~ndimage.binary_erosion(ao, iterations=2)
    # trachea and main/lobar bronchi: wall then air lumen (exact tubes)
    top = cv.axes[2][-1] + 10
    tr = np.array([[0.0, anat.yt, top], [0.0, anat.yt, 0.0]])
    cv.paint_polyline(40.0, tr, anat.rt + 1.6)
    for a, b, r in anat.main_bronchi + anat.lobar_bronchi:
        cv.paint_polyline(40.0, [a, b], r * 1.35 + 0.6)
    cv.paint_polyline(-1000.0, tr, anat.rt)
    for a, b, r in anat.main_bronchi + anat.lobar_bronchi:
        cv.paint_polyline(-1000.0, [a, b], r)
    # oesophagus (collapsed, optional air) and the thyroid at the top of the scan
    cv.paint_polyline(42.0, anat.esophagus, 8.0)
    if p["esophageal_air"]:
        i = len(anat.esophagus) // 3
        cv.paint_ellipsoid(-1000.0, anat.esophagus[i], [3.0, 2.5, 6.0])
    for s in (-1, 1):
        tc = [s * 18.0, anat.yt - 8, anat.z_apex + 25]
        cv.paint_ellipsoid(95.0, tc, [10, 10, 22])
        if s < 0 and "thyroid nodule" in inc:
            cv.paint_ellipsoid(25.0, np.add(tc, [0, 0, 4]), [6.0, 6.0, 6.0])
    masks["mediastinal_vessels"] = np.abs(cv.hu - ves) > 20
    # normal nodes 3–8 mm with a fatty hilum at every station (the hard negatives)
    node_rng = np.random.default_rng(p["tree_seed"] + 1)
    for s in NODE_STATIONS:
        c = anat.node_station(s) + node_rng.normal(0, 2.0, 3)
        sa = node_rng.uniform(2.0, 4.0)
        cv.paint_ellipsoid(40.0, c, [sa, sa * 1.3, sa * 1.6])
        cv.paint_ellipsoid(fat, c, [sa * 0.4, sa * 0.5, sa * 0.6])
    for label, draw in (("Lymphadenopathy", F.lymphadenopathy), ("Hiatal hernia", F.hiatal_hernia),
                        ("Arterial wall calcification", F.arterial_calcification),
                        ("Coronary artery wall calcification", F.coronary_calcification)):
        if label in fnd:
            with cv.finding(label):
                draw(cv, anat, fnd[label])
    return masks
