"""Voxel canvas and analytic partial-volume primitives for the chest-CT phantom.

Coordinates follow the grid contract of :mod:`chest_phantom.scanner`: array index
``(i, j, k)`` maps to patient LPS millimetres ``origin + (i*sx, j*sy, k*sz)`` (x toward the
patient's left, y posterior, z superior).

Partial volume is analytic rather than supersampled: every primitive yields an approximate
signed distance ``d`` (mm, negative inside) and its voxel occupancy is the box-average of a
half-space across the voxel, approximated by the linear ramp ``clip(0.5 - d / w, 0, 1)`` where
``w`` is the voxel's width along the surface normal. Structures thinner than a voxel (small
vessels, wires, calcified plaques, septa) are mass-conserving: they are splatted trilinearly as
volume fractions, so a 1 mm plaque raises its voxel by ``volume fraction x contrast`` exactly as
box-averaging a supersampled rendering would. Evaluation is limited to each primitive's bounding
box so a case renders in well under a second at the demo geometry.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from scipy import ndimage

__all__ = ["Canvas", "ramp", "rotation_from_axes", "sample_polyline", "smooth_noise", "unit"]


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / max(float(np.linalg.norm(v)), 1e-9)


def rotation_from_axes(u) -> np.ndarray:
    """Orthonormal 3x3 matrix whose first row is ``u`` (the two others are any completion)."""
    u = unit(u)
    helper = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    v = unit(np.cross(u, helper))
    w = np.cross(u, v)
    return np.stack([u, v, w])


def ramp(d, w):
    """Occupancy of a voxel of width ``w`` whose centre is ``d`` mm outside a surface."""
    return np.clip(0.5 - d / w, 0.0, 1.0).astype(np.float32)


class Canvas:
    """A float32 HU volume on a grid plus the helpers that paint primitives into it.

    Args:
        grid: ``{"shape", "spacing_mm", "origin_mm"}`` (see module docstring).
        background: HU everywhere before painting (air).
    """

    def __init__(self, grid: dict, background: float = -1000.0):
        self.shape = tuple(int(n) for n in grid["shape"])
        self.spacing = np.asarray(grid["spacing_mm"], dtype=np.float64)
        self.origin = np.asarray(grid["origin_mm"], dtype=np.float64)
        self.axes = [
            (self.origin[a] + self.spacing[a] * np.arange(self.shape[a])).astype(np.float32)
            for a in range(3)
        ]
        self.hu = np.full(self.shape, background, dtype=np.float32)
        self.voxel_volume = float(np.prod(self.spacing))
        # width of a voxel seen by an oblique surface (used when the normal is not computed)
        self.h_iso = float(np.sqrt(np.mean(self.spacing**2)))
        # finding masks (track_findings): per finding, the fraction of each voxel's content it painted
        self.fractions: dict[str, np.ndarray] | None = None
        self._active: str | None = None

    # ------------------------------------------------------------------ finding masks
    def track_findings(self) -> None:
        """Record, from now on, which share of every voxel each finding painted (see :meth:`finding`)."""
        self.fractions = {}

    @contextmanager
    def finding(self, label: str):
        """Paints inside this block belong to the finding ``label``.

        While tracking (:meth:`track_findings`), every paint composites the finding's share of a voxel the way it
        composites the HU: ``share = share * (1 - occ) + occ`` for the finding being painted, ``share * (1 - occ)``
        for the others (what is painted over is no longer that finding). No cost without tracking.
        """
        if self.fractions is None:
            yield
            return
        self.fractions.setdefault(label, np.zeros(self.shape, np.float32))
        previous, self._active = self._active, label
        try:
            yield
        finally:
            self._active = previous

    def mark(self, label: str, sl, frac) -> None:
        """Record that ``frac`` of the voxels in ``sl`` belongs to ``label`` (for findings painted as part of a
        larger composite, e.g. the lung parenchyma); no HU change."""
        if self.fractions is None or sl is None:
            return
        t = self.fractions.setdefault(label, np.zeros(self.shape, np.float32))[sl]
        np.maximum(t, np.asarray(frac, np.float32), out=t)

    def _track(self, sl, occ) -> None:
        if not self.fractions:
            return
        for label, share in self.fractions.items():
            t = share[sl]
            if label == self._active:
                t += occ * (1.0 - t)
            else:
                t *= 1.0 - occ

    def finding_masks(self) -> dict[str, np.ndarray]:
        """Boolean mask per tracked finding: voxels at least half that finding, or, for a finding thinner than a
        voxel everywhere (a calcified plaque, a wire), at least half its largest share."""
        out = {}
        for label, share in (self.fractions or {}).items():
            peak = float(share.max()) if share.size else 0.0
            if peak > 0.0:
                out[label] = share >= min(0.5, 0.5 * peak)
        return out

    # ------------------------------------------------------------------ boxes and coordinates
    def box(self, lo, hi):
        """Index slices covering the mm box ``[lo, hi]`` (one voxel of margin), or None if empty."""
        sl = []
        for a in range(3):
            i0 = int(np.floor((lo[a] - self.origin[a]) / self.spacing[a])) - 1
            i1 = int(np.ceil((hi[a] - self.origin[a]) / self.spacing[a])) + 2
            i0, i1 = max(i0, 0), min(i1, self.shape[a])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl):
        """Broadcastable x, y, z coordinate arrays (mm) of the voxels in ``sl``."""
        x = self.axes[0][sl[0]][:, None, None]
        y = self.axes[1][sl[1]][None, :, None]
        z = self.axes[2][sl[2]][None, None, :]
        return x, y, z

    def full(self):
        return (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))

    # ------------------------------------------------------------------ painting
    def paint(self, sl, occ, value):
        """Alpha-composite ``value`` (scalar or array) with occupancy ``occ`` into the box ``sl``."""
        if sl is None:
            return
        h = self.hu[sl]
        h += occ * (np.asarray(value, dtype=np.float32) - h)
        self._track(sl, occ)

    def normal_width(self, nx, ny, nz):
        """Voxel width along a unit normal (exact for axis-aligned surfaces)."""
        sx, sy, sz = self.spacing
        return np.sqrt((nx * sx) ** 2 + (ny * sy) ** 2 + (nz * sz) ** 2) + 1e-3

    # ------------------------------------------------------------------ primitives
    def ellipsoid(self, center, semi, rot=None, grow: float = 0.0, sl=None):
        """Occupancy of a (rotated) ellipsoid.

        Args:
            center: centre (mm).
            semi: semi-axes (mm) along the rows of ``rot``.
            rot: 3x3 matrix whose rows are the ellipsoid axes in LPS (identity if None).
            grow: offset (mm) added to every semi-axis (shells, fat layers).
            sl: optional box to evaluate in (defaults to the ellipsoid's bounding box).

        Returns:
            ``(slices, occupancy)`` or ``(None, None)`` when outside the grid. Ellipsoids smaller
            than a voxel keep their volume (occupancy scaled down instead of vanishing).
        """
        c = np.asarray(center, dtype=np.float64)
        s = np.asarray(semi, dtype=np.float64) + grow
        s = np.maximum(s, 0.05)
        R = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
        ext = np.sqrt(((R * s[:, None]) ** 2).sum(axis=0))  # half extent along x, y, z
        if sl is None:
            sl = self.box(c - ext - self.spacing, c + ext + self.spacing)
        if sl is None:
            return None, None
        x, y, z = self.coords(sl)
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        # the box-average of a body thinner than a voxel is its volume fraction, not a ramp
        h_min = float(self.spacing.min())
        s_eff = np.maximum(s, 0.5 * h_min)
        mass = float(np.prod(s / s_eff))
        u = [(R[a, 0] * dx + R[a, 1] * dy + R[a, 2] * dz) / s_eff[a] for a in range(3)]
        q = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-6
        # gradient of q in LPS: sum_a R[a] * u_a / (s_a q)
        g = [sum(R[a, b] * u[a] / s_eff[a] for a in range(3)) / q for b in range(3)]
        gn = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) + 1e-9
        d = (q - 1.0) / gn
        w = self.normal_width(g[0] / gn, g[1] / gn, g[2] / gn)
        occ = ramp(d, w)
        if mass < 0.999:
            occ *= mass
        return sl, occ

    def paint_ellipsoid(self, value, center, semi, rot=None, grow=0.0):
        sl, occ = self.ellipsoid(center, semi, rot, grow)
        if sl is not None:
            self.paint(sl, occ, value)
        return sl, occ

    def _segment_distance(self, sl, p0, p1):
        """Distance of the voxel centres in ``sl`` to the segment ``p0``-``p1``.

        Returns:
            ``(t, dist, width)``: position along the segment (0..1), distance (mm), and the partial-volume
            ramp width of the voxel seen along the direction to the segment.
        """
        x, y, z = self.coords(sl)
        ax = p1 - p0
        L2 = float(ax @ ax) + 1e-9
        t = np.clip(((x - p0[0]) * ax[0] + (y - p0[1]) * ax[1] + (z - p0[2]) * ax[2]) / L2, 0, 1)
        ex, ey, ez = x - (p0[0] + t * ax[0]), y - (p0[1] + t * ax[1]), z - (p0[2] + t * ax[2])
        dist = np.sqrt(ex * ex + ey * ey + ez * ez) + 1e-6
        return t, dist, self.normal_width(ex / dist, ey / dist, ez / dist)

    def tube(self, p0, p1, r0, r1=None, sl=None):
        """Occupancy of a capsule from ``p0`` to ``p1`` with radius varying from ``r0`` to ``r1``."""
        r1 = r0 if r1 is None else r1
        p0 = np.asarray(p0, dtype=np.float64)
        p1 = np.asarray(p1, dtype=np.float64)
        rmax = max(r0, r1)
        if sl is None:
            sl = self.box(np.minimum(p0, p1) - rmax - 1, np.maximum(p0, p1) + rmax + 1)
        if sl is None:
            return None, None
        t, dist, w = self._segment_distance(sl, p0, p1)
        r = r0 + (r1 - r0) * t
        h_min = float(self.spacing.min())
        r_eff = np.maximum(r, 0.5 * h_min)
        occ = ramp(dist - r_eff, w)
        if min(r0, r1) < 0.5 * h_min:
            occ *= ((r / r_eff) ** 2).astype(np.float32)  # keep the cross-section area
        return sl, occ

    def paint_polyline(self, value, points, radii, grow: float = 0.0):
        """Paint a tube along a polyline (radius per point)."""
        pts = np.asarray(points, dtype=np.float64)
        rad = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),)) + grow
        for a in range(len(pts) - 1):
            sl, occ = self.tube(pts[a], pts[a + 1], rad[a], rad[a + 1])
            if sl is not None:
                self.paint(sl, occ, value)

    def paint_polyline_layers(self, points, layers):
        """Concentric tubes along a polyline in one distance evaluation per segment.

        Args:
            points: (N, 3) polyline (mm).
            layers: [(value, radius_mm), ...] painted outermost first (e.g. cortex then marrow).
        """
        pts = np.asarray(points, dtype=np.float64)
        rmax = max(r for _, r in layers)
        h_min = float(self.spacing.min())
        for a in range(len(pts) - 1):
            p0, p1 = pts[a], pts[a + 1]
            sl = self.box(np.minimum(p0, p1) - rmax - 1, np.maximum(p0, p1) + rmax + 1)
            if sl is None:
                continue
            _, dist, w = self._segment_distance(sl, p0, p1)
            for value, r in layers:
                r_eff = max(r, 0.5 * h_min)
                occ = ramp(dist - r_eff, w)
                if r < r_eff:
                    occ *= (r / r_eff) ** 2
                self.paint(sl, occ, value)

    # ------------------------------------------------------------------ thin structures
    def splat(self, points, volumes) -> np.ndarray:
        """Volume-fraction field of point masses (mm^3 each), trilinearly distributed.

        Args:
            points: (N, 3) LPS mm.
            volumes: (N,) volume carried by each point (mm^3).

        Returns:
            float32 array of the grid's shape; values are fractions of a voxel (not clipped).
        """
        out = np.zeros(self.shape, dtype=np.float32)
        self.splat_into(out, points, volumes)
        return out

    def splat_into(self, out, points, volumes):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if len(pts) == 0:
            return out
        vol = np.broadcast_to(np.asarray(volumes, dtype=np.float64), (len(pts),)) / self.voxel_volume
        f = (pts - self.origin) / self.spacing
        i0 = np.floor(f).astype(np.int64)
        fr = f - i0
        nx, ny, nz = self.shape
        idx_all, w_all = [], []
        for dx in (0, 1):
            wx = fr[:, 0] if dx else 1 - fr[:, 0]
            ix = i0[:, 0] + dx
            for dy in (0, 1):
                wy = fr[:, 1] if dy else 1 - fr[:, 1]
                iy = i0[:, 1] + dy
                for dz in (0, 1):
                    wz = fr[:, 2] if dz else 1 - fr[:, 2]
                    iz = i0[:, 2] + dz
                    ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (iz >= 0) & (iz < nz)
                    idx_all.append(((ix * ny + iy) * nz + iz)[ok])
                    w_all.append((vol * wx * wy * wz)[ok])
        idx = np.concatenate(idx_all)
        if len(idx):
            flat = out.reshape(-1)
            flat += np.bincount(idx, weights=np.concatenate(w_all), minlength=flat.size).astype(np.float32)
        return out

    def paint_fraction(self, frac, value, mask=None):
        """Composite ``value`` with a (clipped) volume-fraction field, optionally weighted."""
        f = np.clip(frac, 0.0, 1.0)
        if mask is not None:
            f = f * mask
        self.hu += f * (np.float32(value) - self.hu)
        self._track(self.full(), f)


def sample_polyline(points, step: float):
    """Resample a polyline at ~``step`` mm; returns (M, 3) points and (M,) arc-length steps."""
    pts = np.asarray(points, dtype=np.float64)
    out, ds = [], []
    for a in range(len(pts) - 1):
        seg = pts[a + 1] - pts[a]
        L = float(np.linalg.norm(seg))
        n = max(int(np.ceil(L / step)), 1)
        t = (np.arange(n) + 0.5) / n
        out.append(pts[a] + t[:, None] * seg)
        ds.append(np.full(n, L / n))
    if not out:
        return np.zeros((0, 3)), np.zeros(0)
    return np.concatenate(out), np.concatenate(ds)


def smooth_noise(canvas: Canvas, rng, corr_mm: float, sl=None) -> np.ndarray:
    """Unit-variance Gaussian field with correlation length ~``corr_mm`` (coarse grid, trilinear up)."""
    if sl is None:
        sl = canvas.full()
    shape = tuple(s.stop - s.start for s in sl)
    step = np.maximum(corr_mm / canvas.spacing, 1.0)
    coarse = tuple(int(np.ceil(n / st)) + 2 for n, st in zip(shape, step))
    g = rng.standard_normal(coarse).astype(np.float32)
    if min(coarse) > 2:
        g = ndimage.gaussian_filter(g, 0.7, mode="wrap")
        g /= g.std() + 1e-6
    idx = [np.arange(n, dtype=np.float32) / st + 0.5 for n, st in zip(shape, step)]
    return _trilinear(g, idx)


def _trilinear(g, idx):
    """Separable linear interpolation of ``g`` at fractional indices per axis (fast outer product)."""
    out = g
    for ax, t in enumerate(idx):
        i0 = np.clip(np.floor(t).astype(np.int64), 0, out.shape[ax] - 2)
        w = (t - i0).astype(np.float32)
        a = np.take(out, i0, axis=ax)
        b = np.take(out, i0 + 1, axis=ax)
        shp = [1, 1, 1]
        shp[ax] = -1
        w = w.reshape(shp)
        out = a + (b - a) * w
    return out.astype(np.float32)
