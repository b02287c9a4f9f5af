"""Analytic adult chest anatomy (supine, inspiration) for the procedural CT phantom.

Everything is in patient LPS millimetres with ``z = 0`` at the carina (README, "Coordinates and grids"):
x grows toward the patient's left, y toward posterior, z toward superior. The rib cage's inner
outline is a super-ellipse centred on ``x = y = 0`` with half-width ``A`` and half-depth ``B``;
every other structure is placed relative to it, so the same parameters drive rendering
(:mod:`.render`), finding placement (:mod:`.record`) and the QA detectors (tests).

:func:`sample_anatomy` draws the per-case parameters (JSON-serialisable, stored in the case
record). :class:`ChestAnatomy` derives geometry from them: implicit lung/lobe functions that work on
point lists and on broadcast voxel grids, centrelines of the great vessels, coronary arteries,
oesophagus and trachea, lymph-node stations, and the bronchovascular tree.
"""

from __future__ import annotations

import numpy as np

from .canvas import rotation_from_axes, unit

__all__ = ["LOBES", "NODE_STATIONS", "ChestAnatomy", "sample_anatomy"]

#: Lobe ids used in the lobe label map (0 = not lung).
LOBES = {
    1: "right upper lobe",
    2: "right middle lobe",
    3: "right lower lobe",
    4: "left upper lobe",
    5: "lingula",
    6: "left lower lobe",
}
LOBE_IDS = {v: k for k, v in LOBES.items()}
LOBE_SIDE = {1: "right", 2: "right", 3: "right", 4: "left", 5: "left", 6: "left"}

#: Mediastinal/hilar node stations (IASLC names as CT-RATE reports use them).
NODE_STATIONS = (
    "right lower paratracheal",
    "left lower paratracheal",
    "prevascular",
    "aortopulmonary window",
    "subcarinal",
    "right hilar",
    "left hilar",
    "right upper paratracheal",
)


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def sample_anatomy(rng: np.random.Generator, age: int, sex: str, cardiothoracic_ratio: float) -> dict:
    """Draw the body-habitus and anatomy parameters of one patient.

    Args:
        rng: random generator (the record's).
        age: years.
        sex: "M" or "F".
        cardiothoracic_ratio: target CTR (normal 0.38–0.48, cardiomegaly 0.55–0.70).

    Returns:
        JSON-serialisable dict stored as ``record["anatomy"]``.
    """
    male = sex == "M"
    A = _u(rng, 122, 150) if male else _u(rng, 112, 136)
    B = _u(rng, 74, 94) if male else _u(rng, 68, 86)
    fat = float(np.clip(rng.gamma(4.0, 4.5) + (4 if not male else 0), 5, 45))
    z_apex = _u(rng, 110, 150)
    z_dome_r = -_u(rng, 120, 160)
    z_dome_l = z_dome_r - _u(rng, 10, 20)
    vert_r = _u(rng, 15, 19) + (1.5 if male else 0)
    trachea_r = _u(rng, 8.0, 10.5) if male else _u(rng, 7.0, 9.0)
    asc_r = float(np.clip(_u(rng, 13, 16) + 0.04 * (age - 50), 11.5, 19.5))
    desc_r = float(np.clip(_u(rng, 10, 12.5) + 0.03 * (age - 50), 9, 15))
    body_width = 2 * (A + 22 + 1.2 * fat)
    body_depth = 2 * (B + 28 + fat)
    return {
        "cage_half_width_mm": A,
        "cage_half_depth_mm": B,
        "subcutaneous_fat_mm": fat,
        "body_exponent": _u(rng, 2.2, 3.0),
        "body_width_mm": body_width,
        "body_depth_mm": body_depth,
        "z_lung_apex_mm": z_apex,
        "z_dome_right_mm": z_dome_r,
        "z_dome_left_mm": z_dome_l,
        "vertebral_radius_mm": vert_r,
        "vertebral_height_mm": _u(rng, 24, 28),
        "trachea_radius_mm": trachea_r,
        "aorta_ascending_radius_mm": asc_r,
        "aorta_descending_radius_mm": desc_r,
        "cardiothoracic_ratio": float(cardiothoracic_ratio),
        "heart_yaw_deg": _u(rng, 35, 55),
        "heart_tilt_deg": _u(rng, 20, 35),
        "lung_hu": _u(rng, -885, -845),
        "lung_gradient_hu": _u(rng, 50, 100),
        "fat_hu": _u(rng, -110, -90),
        "muscle_hu": _u(rng, 40, 60),
        "liver_hu": _u(rng, 55, 65),
        "spleen_hu": _u(rng, 40, 50),
        "blood_hu": _u(rng, 35, 50),
        "cancellous_hu": float(np.clip(_u(rng, 230, 320) - 2.0 * (age - 30), 90, 320)),
        "cortical_hu": _u(rng, 800, 1200),
        "breasts": bool(not male),
        "stomach_air_fraction": _u(rng, 0.2, 0.6),
        "esophageal_air": bool(rng.random() < 0.3),
        "table_gap_mm": _u(rng, 3, 15),
        "tree_seed": int(rng.integers(0, 2**31 - 1)),
    }


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


class ChestAnatomy:
    """Geometry derived from a record's ``anatomy`` dict (see :func:`sample_anatomy`).

    Args:
        params: ``record["anatomy"]``.
        incidental: the record's incidental findings (scoliosis bends the spine line).
    """

    def __init__(self, params: dict, incidental=()):
        p = params
        self.p = p
        self.A = p["cage_half_width_mm"]
        self.B = p["cage_half_depth_mm"]
        self.fat = p["subcutaneous_fat_mm"]
        self.m = 2.3  # cage super-ellipse exponent
        self.z_apex = p["z_lung_apex_mm"]
        self.z_dome_r = p["z_dome_right_mm"]
        self.z_dome_l = p["z_dome_left_mm"]
        self.scoliosis = 10.0 if "scoliosis" in incidental else 0.0
        # spine and the posterior mediastinum
        self.rv = p["vertebral_radius_mm"]
        self.yv = self.B - 0.9 * self.rv  # vertebral body centre
        self.rt = p["trachea_radius_mm"]
        self.yt = self.yv - self.rv - 16 - self.rt  # trachea in front of oesophagus in front of spine
        self.z_hiatus = self.z_dome_l - 25
        # body outline
        self.body_a = self.A + 22 + 1.2 * self.fat
        self.body_b = self.B + 28 + self.fat
        self.body_yc = 8.0
        self.body_n = p["body_exponent"]
        self._heart()
        self._great_vessels()

    # ------------------------------------------------------------------ cage, body, diaphragm
    def cage_ab(self, z):
        """Inner rib-cage half-width/half-depth at height z (narrower toward the apex)."""
        t = np.clip((z - (-40.0)) / (self.z_apex + 30 - (-40.0)), 0, 1)
        a = self.A * (1 - 0.28 * t**1.6)
        b = self.B * (1 - 0.12 * t**1.6)
        return a, b

    def spine_x(self, z):
        return self.scoliosis * np.sin((z - self.z_dome_r) / 180.0 * np.pi)

    def cage_distance(self, x, y, z, grow=0.0):
        """Approximate signed distance (mm) to the cage inner outline grown by ``grow``."""
        a, b = self.cage_ab(z)
        a = a + grow
        b = b + grow
        f = (np.abs(x / a) ** self.m + np.abs(y / b) ** self.m) ** (1.0 / self.m)
        rho = np.sqrt(x * x + y * y) + 1e-3
        return rho * (f - 1) / np.maximum(f, 0.05)

    def posterior_wall_y(self, x, z):
        """y of the posterior cage wall above the point (x, z) (the dependent pleural surface)."""
        a, b = self.cage_ab(z)
        u = np.clip(np.abs(x) / a, 0, 0.999)
        return b * (1 - u**self.m) ** (1.0 / self.m)

    def body_distance(self, x, y, z, grow=0.0):
        a, b = self.body_a + grow, self.body_b + grow
        n = self.body_n
        yy = y - self.body_yc
        f = (np.abs(x / a) ** n + np.abs(yy / b) ** n) ** (1.0 / n)
        rho = np.sqrt(x * x + yy * yy) + 1e-3
        return rho * (f - 1) / np.maximum(f, 0.05) + 0 * z

    def diaphragm_z(self, x, y):
        """Height of the diaphragm surface (domes, deeper costophrenic and posterior recesses)."""
        A, B = self.A, self.B
        u = (np.abs(x) - 0.42 * A) / (0.62 * A)
        v = np.clip((y + 0.1 * B) / (1.1 * B), 0, None)
        v_ant = np.clip(-(y + 0.1 * B) / (0.9 * B), 0, None)
        shape = 42 * np.clip(u, -1.2, 1.5) ** 2 + 55 * v**2 + 18 * v_ant**2
        s = 1 / (1 + np.exp(-np.asarray(x, dtype=np.float32) / 12.0))
        z0 = self.z_dome_r * (1 - s) + self.z_dome_l * s
        return z0 - shape

    def lung_top_z(self, x, y):
        """Height of each lung's apical dome."""
        u = (np.abs(x) - 0.42 * self.A) / (0.5 * self.A)
        v = (y - 0.25 * self.B) / self.B
        return self.z_apex - 55 * u**2 - 40 * v**2

    # ------------------------------------------------------------------ heart and vessels
    def _heart(self):
        p = self.p
        yaw, tilt = np.radians(p["heart_yaw_deg"]), np.radians(p["heart_tilt_deg"])
        # long axis: base (right-posterior-superior) to apex (left-anterior-inferior)
        u = unit([np.sin(yaw) * np.cos(tilt), -np.cos(yaw) * np.cos(tilt), -np.sin(tilt)])
        R = rotation_from_axes(u)
        base = np.array([60.0, 44.0, 40.0])
        ext_x = np.sqrt(((R * base[:, None]) ** 2).sum(axis=0))[0]
        target_half_width = p["cardiothoracic_ratio"] * self.A  # internal thoracic diameter = 2A
        scale = target_half_width / ext_x
        semi = base * scale
        # keep the heart between the sternum and the oesophagus: squash it antero-posteriorly if
        # needed (a linear map of an ellipsoid is an ellipsoid; the transverse width, hence the
        # CTR, is unchanged)
        ext = np.sqrt(((R * semi[:, None]) ** 2).sum(axis=0))
        y_esophagus = self.yv - self.rv - 8  # the left atrium lies directly in front of it
        e_max = 0.5 * ((y_esophagus - 14) - (-self.B + 8))
        if ext[1] > e_max:
            M = np.diag([1.0, e_max / ext[1], 1.0]) @ (R.T * semi[None, :])
            U, S, _ = np.linalg.svd(M)
            R, semi = U.T, S
            ext = np.sqrt(((R * semi[:, None]) ** 2).sum(axis=0))
        big = p["cardiothoracic_ratio"] > 0.52
        cx = ext[0] * (0.40 if big else 0.32)
        cy = -self.B + ext[1] + 10
        cz = self.z_dome_l + ext[2] * 0.92
        self.heart_rot = R
        self.heart_semi = semi
        self.heart_center = np.array([cx, cy, cz])
        self.heart_ext = ext

    def heart_surface_point(self, theta, phi, grow=0.0):
        """Point on the heart ellipsoid: theta=0 apex, theta=pi base; phi around the long axis."""
        s = self.heart_semi + grow
        R = self.heart_rot
        th, ph = np.atleast_1d(theta), np.atleast_1d(phi)
        loc = np.stack([s[0] * np.cos(th), s[1] * np.sin(th) * np.cos(ph), s[2] * np.sin(th) * np.sin(ph)], -1)
        return self.heart_center + loc @ R

    def _great_vessels(self):
        A, B = self.A, self.B
        hc, he = self.heart_center, self.heart_ext
        ra = self.p["aorta_ascending_radius_mm"]
        rd = self.p["aorta_descending_radius_mm"]
        root = np.array([hc[0] - 0.35 * he[0], hc[1] + 0.2 * he[1], hc[2] + 0.45 * he[2]])
        x_desc = self.rv + rd * 0.55
        y_desc = self.yv - 0.45 * self.rv
        arch_top = 30.0
        asc_top = np.array([-12.0, -0.45 * B, arch_top - 8])
        ctrl = [
            root,
            0.5 * (root + asc_top) + np.array([-4, -6, 0]),
            asc_top,
            np.array([-4.0, -0.3 * B, arch_top]),
            np.array([10.0, -0.02 * B, arch_top + 4]),
            np.array([x_desc + 2, y_desc - 12, arch_top - 4]),
            np.array([x_desc, y_desc, arch_top - 20]),
            np.array([x_desc, y_desc, -60.0]),
            np.array([0.6 * x_desc, y_desc - 0.3 * self.rv, self.z_hiatus]),
            np.array([0.2 * x_desc, self.yv - self.rv - rd, self.z_hiatus - 80]),
        ]
        self.aorta_points = _catmull_rom(np.array(ctrl), 6)
        n = len(self.aorta_points)
        zs = self.aorta_points[:, 2]
        r = np.where(np.arange(n) < n * 0.3, ra, np.where(zs > arch_top - 18, 0.5 * (ra + rd), rd))
        self.aorta_radii = r.astype(np.float64)
        self.arch_top = arch_top
        # pulmonary trunk and central arteries
        trunk0 = np.array([hc[0] + 0.1 * he[0], -B + 18, hc[2] + 0.55 * he[2]])
        bif = np.array([12.0, -0.2 * B, -12.0])
        self.pa_trunk = np.array([trunk0, 0.5 * (trunk0 + bif) + np.array([4, -4, 4]), bif])
        self.r_hilum = np.array([-0.42 * A, -0.02 * B, -18.0])
        self.l_hilum = np.array([0.42 * A, 0.04 * B, -8.0])
        self.rpa = np.array([bif, [-10, -0.1 * B, -14], [-30, -0.05 * B, -18], self.r_hilum])
        self.lpa = np.array([bif, [25, -0.05 * B, -2], [40, 0.05 * B, 0], self.l_hilum])
        self.pa_radius = 12.5 if self.p["cardiothoracic_ratio"] < 0.52 else 14.5
        # systemic veins
        self.svc = np.array([[-0.2 * A, -0.32 * B, 70], [-0.19 * A, -0.3 * B, 20], [-0.17 * A, -0.28 * B, hc[2] + 0.5 * he[2]]])
        self.svc_radius = 9.0
        self.lbcv = np.array([[0.4 * A, -0.45 * B, 85], [0.1 * A, -0.55 * B, 75], [-0.2 * A, -0.32 * B, 70]])
        self.rbcv = np.array([[-0.4 * A, -0.4 * B, 95], [-0.2 * A, -0.32 * B, 70]])
        # supra-aortic branches from the arch top
        ap = self.aorta_points
        top_idx = int(np.argmax(ap[:, 2]))
        self.arch_branches = [
            np.array([ap[max(top_idx - 3, 0)] + [0, 0, 4], [-0.15 * A, -0.32 * B, 70], [-0.3 * A, -0.25 * B, 200]]),
            np.array([ap[top_idx] + [0, 0, 4], [0.05 * A, -0.2 * B, 80], [0.1 * A, -0.25 * B, 200]]),
            np.array([ap[min(top_idx + 3, n - 1)] + [0, 0, 4], [0.15 * A, 0.05 * B, 70], [0.35 * A, 0.0, 200]]),
        ]
        self.branch_radii = [6.0, 4.5, 5.0]
        # oesophagus: behind the trachea, slightly left, then right-anterior of the descending aorta
        ye = self.yv - self.rv - 8
        self.esophagus = _catmull_rom(
            np.array(
                [
                    [4, ye, 220],
                    [6, ye, 0],
                    [2, ye - 4, -50],
                    [6, ye - 12, self.z_hiatus + 20],
                    [22, ye - 18, self.z_hiatus - 10],
                    [0.35 * A, -0.05 * B, self.z_dome_l - 40],
                ]
            ),
            5,
        )
        # coronary arteries on the heart surface (theta from apex)
        ring = 0.72 * np.pi  # atrioventricular groove
        phis = np.linspace(-np.pi, np.pi, 73)
        pts = self.heart_surface_point(np.full_like(phis, np.pi / 2), phis)
        phi_ant = float(phis[np.argmin(pts[:, 1])])
        left_sign = np.sign(self.heart_surface_point(np.pi / 2, phi_ant + 0.5)[0, 0] - self.heart_surface_point(np.pi / 2, phi_ant - 0.5)[0, 0])
        th = np.linspace(0.78 * np.pi, 0.12 * np.pi, 24)
        self.lad = self.heart_surface_point(th, np.full_like(th, phi_ant), grow=1.5)
        ph_l = phi_ant + left_sign * np.linspace(0.1, 2.2, 22)
        ph_r = phi_ant - left_sign * np.linspace(0.1, 2.6, 24)
        self.lcx = self.heart_surface_point(np.full_like(ph_l, ring), ph_l, grow=1.5)
        self.rca = self.heart_surface_point(np.full_like(ph_r, ring), ph_r, grow=1.5)

    # ------------------------------------------------------------------ node stations
    def node_station(self, name: str) -> np.ndarray:
        """Centre (mm) of a lymph-node station, placed in the mediastinal fat."""
        rt, yt = self.rt, self.yt
        B = self.B
        ap = self.aorta_points
        table = {
            "right upper paratracheal": [-rt - 11, yt - 2, 55],
            "right lower paratracheal": [-rt - 11, yt - 4, 16],
            "left lower paratracheal": [rt + 9, yt + 3, 6],
            "prevascular": [-2, -0.72 * B, 38],
            "aortopulmonary window": [24, -0.12 * B, 8],
            "subcarinal": [2, yt + 10, -24],
            "right hilar": self.r_hilum + np.array([-2, 14, -12]),
            "left hilar": self.l_hilum + np.array([2, 14, -14]),
        }
        del ap
        return np.asarray(table[name], dtype=np.float64)

    # ------------------------------------------------------------------ lungs and lobes
    def mediastinum_distance(self, x, y, z):
        """Approximate signed distance to the soft-tissue mediastinum (for lung carving)."""
        # central column: sternum to vertebrae, narrow above the heart, widening at the arch
        half_w = 20 + 14 * _smoothstep((z - 0.0) / 30.0) * _smoothstep((60.0 - z) / 30.0) + 4 * (z < 0)
        # the lungs nearly meet behind the sternum (anterior junction line): narrow anteriorly
        half_w = half_w * (0.35 + 0.65 * _smoothstep((y + 0.75 * self.B) / (0.6 * self.B)))
        xc = 4 + 0 * z
        d_col = np.abs(x - xc) - half_w
        d_ap = np.maximum(-(y + self.B + 5), y - (self.yv + 5))
        d = np.maximum(d_col, d_ap)
        # vertebral column + paravertebral tissue
        xs = self.spine_x(z)
        d_sp = np.sqrt((x - xs) ** 2 + (y - self.yv) ** 2) - (self.rv + 9)
        d = np.minimum(d, d_sp)
        # heart with pericardial fat
        hc = self.heart_center
        R = self.heart_rot
        s = self.heart_semi + 7
        dx, dy, dz = x - hc[0], y - hc[1], z - hc[2]
        q = np.sqrt(sum(((R[a, 0] * dx + R[a, 1] * dy + R[a, 2] * dz) / s[a]) ** 2 for a in range(3)))
        d = np.minimum(d, (q - 1) * float(s.min()))
        # descending aorta + oesophagus column behind the heart
        xd = self.rv + 0.55 * self.p["aorta_descending_radius_mm"]
        d_ao = np.sqrt((x - xd * 0.8) ** 2 + ((y - (self.yv - 0.45 * self.rv + 0)) * 0.8) ** 2) - (
            self.p["aorta_descending_radius_mm"] + 8
        )
        d = np.minimum(d, np.where(z < 20, d_ao, 1e3))
        return d

    def lung_distance(self, x, y, z):
        """Approximate signed distance (mm) to the lungs (both sides, normal anatomy)."""
        d = self.cage_distance(x, y, z)
        d = np.maximum(d, (z - self.lung_top_z(x, y)) / 1.6)
        d = np.maximum(d, (self.diaphragm_z(x, y) - z) / 1.4)
        d = np.maximum(d, -self.mediastinum_distance(x, y, z))
        return d

    def lobe_of(self, x, y, z):
        """Lobe id (see :data:`LOBES`) for points assumed inside a lung (right if x < midline)."""
        x, y, z = np.broadcast_arrays(x, y, z)
        right = x < 4
        B = self.B
        z_obl_r = 25 + (y - B) * (25 - (self.z_dome_r + 15)) / (1.6 * B)
        z_obl_l = 35 + (y - B) * (35 - (self.z_dome_l + 15)) / (1.6 * B)
        lower_r = z < z_obl_r
        lower_l = z < z_obl_l
        z_h = -30 + 0.1 * (y + B)
        out = np.where(
            right,
            np.where(lower_r, 3, np.where(z < z_h, 2, 1)),
            np.where(lower_l, 6, np.where((z < -45) & (y < 0.2 * B), 5, 4)),
        )
        return out.astype(np.uint8)

    def fissure_distances(self, x, y, z):
        """Signed distances to the oblique (both) and horizontal (right) fissure planes."""
        B = self.B
        kr = (25 - (self.z_dome_r + 15)) / (1.6 * B)
        kl = (35 - (self.z_dome_l + 15)) / (1.6 * B)
        d_r = (z - (25 + (y - B) * kr)) / np.sqrt(1 + kr * kr)
        d_l = (z - (35 + (y - B) * kl)) / np.sqrt(1 + kl * kl)
        d_h = z - (-30 + 0.1 * (y + B))
        return d_r, d_l, d_h

    def sample_points_in_lobe(self, rng, lobe: str, n: int, periphery_mm=None, max_tries=60):
        """Uniform random points inside a lobe (optionally within ``periphery_mm`` of the wall)."""
        lid = LOBE_IDS[lobe]
        right = LOBE_SIDE[lid] == "right"
        out = []
        A, B = self.A, self.B
        for _ in range(max_tries):
            m = max(300, 80 * n)
            x = rng.uniform(-A, 0, m) if right else rng.uniform(0, A, m)
            y = rng.uniform(-B, B, m)
            z = rng.uniform(min(self.z_dome_r, self.z_dome_l) - 70, self.z_apex, m)
            d = self.lung_distance(x, y, z)
            ok = (d < -4) & (self.lobe_of(x, y, z) == lid)
            if periphery_mm is not None:
                ok &= self.cage_distance(x, y, z) > -periphery_mm
            pts = np.stack([x[ok], y[ok], z[ok]], -1)
            out.append(pts)
            if sum(len(o) for o in out) >= n:
                break
        pts = np.concatenate(out)[:n]
        if len(pts) < n:  # tiny lobe (e.g. a very low horizontal fissure): fall back to any lung point
            pts = np.concatenate([pts, np.tile(self.lobe_centroid(lobe), (n - len(pts), 1))])
        return pts

    def lobe_centroid(self, lobe: str) -> np.ndarray:
        lid = LOBE_IDS[lobe]
        sx = -0.55 if LOBE_SIDE[lid] == "right" else 0.55
        zc = {1: 60, 2: -55, 3: -80, 4: 40, 5: -70, 6: -80}[lid]
        yc = {1: 0.0, 2: -0.5, 3: 0.4, 4: -0.1, 5: -0.5, 6: 0.4}[lid]
        return np.array([sx * self.A, yc * self.B, float(zc)])

    # ------------------------------------------------------------------ bronchovascular tree
    def bronchovascular_tree(self):
        """Airway, artery and vein segments of both lungs.

        Returns:
            dict of arrays: ``p0, p1`` (N, 3) segment ends, ``radius`` (N,) lumen radius for airways
            and vessel radius otherwise, ``kind`` (N,) 0 airway / 1 artery / 2 vein, ``generation``
            (N,), ``lobe`` (N,) lobe id, ``distal`` (N,) bool: airway generations beyond the normal
            visible airway tree (rendered only in bronchiectasis).
        """
        rng = np.random.default_rng(self.p["tree_seed"])
        segs = []
        rt = self.rt
        yt = self.yt
        carina = np.array([0.0, yt, 0.0])
        # main and lobar bronchi (drawn as exact tubes by the renderer, listed here for ROIs)
        rmb = carina + np.array([-24.0, 6.0, -18.0])
        lmb = carina + np.array([38.0, 10.0, -32.0])
        self.main_bronchi = [(carina, rmb, 0.72 * rt), (carina, lmb, 0.62 * rt)]
        lobar = [
            (rmb, unit([-0.8, 0.1, 0.6]), 0.48 * rt, 1),
            (rmb + [-6, 2, -26], unit([-0.45, -0.8, -0.4]), 0.38 * rt, 2),
            (rmb + [-6, 4, -26], unit([-0.3, 0.55, -0.8]), 0.5 * rt, 3),
            (lmb, unit([0.45, -0.5, 0.75]), 0.5 * rt, 4),
            (lmb + [4, -6, -6], unit([0.3, -0.8, -0.5]), 0.36 * rt, 5),
            (lmb + [4, 4, -10], unit([0.3, 0.55, -0.8]), 0.5 * rt, 6),
        ]
        self.lobar_bronchi = []
        for start, d, r, lobe in lobar:
            L = 14.0
            end = start + d * L
            self.lobar_bronchi.append((np.array(start, float), end, r))
            self._grow(rng, segs, end, d, r, 1, lobe)
        p0 = np.array([s[0] for s in segs])
        p1 = np.array([s[1] for s in segs])
        r = np.array([s[2] for s in segs])
        gen = np.array([s[3] for s in segs])
        lobe = np.array([s[4] for s in segs])
        distal = np.array([s[5] for s in segs])
        # arteries run alongside the bronchi (bronchoarterial ratio ~0.8) and continue distally
        dirs = p1 - p0
        side = np.cross(dirs, rng.normal(size=dirs.shape))
        side /= np.linalg.norm(side, axis=1, keepdims=True) + 1e-9
        off = side * (r * 1.35 + r / 0.8 + 0.5)[:, None]
        art_r = r / 0.8
        # veins: an independent tree from the same hila, interleaved between the bronchovascular bundles
        vsegs = []
        for start, d, r0, lobe_id in lobar:
            vd = unit(np.asarray(d) + rng.normal(0, 0.35, 3))
            vstart = np.asarray(start, float) + np.array([0, 8, -18])
            self._grow(rng, vsegs, vstart, vd, r0 * 1.1, 1, lobe_id, vein=True)
        vp0 = np.array([s[0] for s in vsegs])
        vp1 = np.array([s[1] for s in vsegs])
        vr = np.array([s[2] for s in vsegs])
        n_a, n_v = len(p0), len(vp0)
        return {
            "p0": np.concatenate([p0, p0 + off, vp0]),
            "p1": np.concatenate([p1, p1 + off, vp1]),
            "radius": np.concatenate([r, art_r, vr]),
            "kind": np.concatenate([np.zeros(n_a, np.int8), np.ones(n_a, np.int8), np.full(n_v, 2, np.int8)]),
            "generation": np.concatenate([gen, gen, np.array([s[3] for s in vsegs])]),
            "lobe": np.concatenate([lobe, lobe, np.array([s[4] for s in vsegs])]),
            "distal": np.concatenate([distal, np.zeros(n_a, bool), np.zeros(n_v, bool)]),
        }

    def _grow(self, rng, segs, start, direction, radius, gen, lobe, vein=False):
        """Dichotomous branching inside the lung, one generation at a time (vectorised).

        Children turn 22–38° away from the parent about a random axis, biased toward the lobe's
        centre; radii follow Murray's law (r_child = r_parent 2^(-1/3)). A branch that would leave
        the lung is shortened once, then dropped. Airway segments within 14 mm of the pleura (or
        thinner than 0.9 mm) are flagged ``distal``: normal airways are not visible there.
        """
        centroid = self.lobe_centroid(LOBES[lobe])
        P = np.asarray(start, float)[None]
        D = unit(direction)[None]
        R = np.array([radius], float)
        dist = np.array([False])
        g = gen
        r_min = 0.5
        while len(P) and g <= 12:
            L = np.clip(R * rng.uniform(7, 11, len(R)), 4, 30)
            Q = P + D * L[:, None]
            dq = self.lung_distance(Q[:, 0], Q[:, 1], Q[:, 2])
            if g > 2:  # the first generations may still cross the hilum
                Q2 = P + D * (0.4 * L)[:, None]
                dq2 = self.lung_distance(Q2[:, 0], Q2[:, 1], Q2[:, 2])
                Q = np.where((dq > -1.0)[:, None], Q2, Q)
                dq = np.where(dq > -1.0, dq2, dq)
                keep = dq <= -1.0
                P, D, R, dist, Q, dq = P[keep], D[keep], R[keep], dist[keep], Q[keep], dq[keep]
            near = (dq > -14.0) & (dq < 0.0)
            is_distal = dist | ((not vein) & near & (g >= 3)) | ((not vein) & (R < 0.9))
            for a in range(len(P)):
                segs.append((P[a], Q[a], float(R[a]), g, lobe, bool(is_distal[a])))
            grow = R >= r_min
            if not grow.any():
                break
            Q, D, R, is_distal = Q[grow], D[grow], R[grow], is_distal[grow]
            toward = centroid - Q
            tn = np.linalg.norm(toward, axis=1, keepdims=True)
            toward = np.where(tn > 10, toward / np.maximum(tn, 1e-6), D)
            base = D + 0.35 * toward
            base /= np.linalg.norm(base, axis=1, keepdims=True)
            perp = np.cross(base, rng.normal(size=base.shape))
            perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-9
            kids_P, kids_D, kids_R, kids_d = [], [], [], []
            for sgn in (1.0, -1.0):
                ang = np.radians(rng.uniform(22, 38, len(Q)))[:, None]
                cd = np.cos(ang) * base + sgn * np.sin(ang) * perp
                cd /= np.linalg.norm(cd, axis=1, keepdims=True)
                kids_P.append(Q)
                kids_D.append(cd)
                kids_R.append(R * 2 ** (-1 / 3) * rng.uniform(0.9, 1.05, len(R)))
                kids_d.append(is_distal)
            P, D = np.concatenate(kids_P), np.concatenate(kids_D)
            R, dist = np.concatenate(kids_R), np.concatenate(kids_d)
            g += 1


def _catmull_rom(ctrl: np.ndarray, n_per: int) -> np.ndarray:
    """Smooth curve through control points (uniform Catmull-Rom)."""
    P = np.concatenate([ctrl[:1], ctrl, ctrl[-1:]])
    out = []
    for i in range(1, len(P) - 2):
        p0, p1, p2, p3 = P[i - 1], P[i], P[i + 1], P[i + 2]
        for t in np.linspace(0, 1, n_per, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(
                0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3)
            )
    out.append(ctrl[-1])
    return np.array(out)
