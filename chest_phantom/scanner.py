"""Scanner model of the phantom: grids, reconstruction parameters and image formation.

Contracts (shared with the storage/encoding and cohort code)::

    grid = {"shape": [nx, ny, nz], "spacing_mm": [sx, sy, sz], "origin_mm": [x0, y0, z0]}

Array index ``(i, j, k)`` is patient LPS ``origin + (i*sx, j*sy, k*sz)``: axis 0 toward the
patient's Left, axis 1 toward Posterior, axis 2 toward Superior (supine, DICOM-like); z = 0 at the
carina.

    default_grid(record, geometry: str | dict, rng) -> grid
    sample_recon(record, rng, index) -> recon
    apply_scanner(truth, grid, recon, seed) -> float32 HU (nx, ny, nz)

``recon = {"kernel": "soft"|"sharp", "noise_sd_hu", "slice_thickness_mm", "fov_diameter_mm",
"padding_value_hu", "iterative", ...}``. Reconstruction 1 is the soft/mediastinal kernel, 2 the
sharp/lung kernel; both come from the same truth (one render per scan), like CT-RATE's two
reconstructions. ``noise_sd_hu`` is the noise SD in soft tissue at the centre of a reference-size
patient (250 mm water-equivalent lateral path); wider patients and shoulder levels are noisier.
``fov_diameter_mm`` is the reconstruction circle, centred on the grid's in-plane centre; outside it
the vendor padding value is written. Output is rounded to integers but not clipped: clipping and
quantisation to a storage range belong to the encoding step.

Image formation (README, "Scanner model"): in-plane Gaussian PSF per kernel (sharp kernels add edge
overshoot), z slice-sensitivity profile of width ``slice_thickness_mm`` beyond the grid's own
slice averaging, FBP-like correlated noise (ramp x Hann noise power spectrum per slice,
low-passed for iterative reconstruction) scaled by the water-equivalent path length, radial
bright/dark streaks around metal, the circular FOV, rounding.
"""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import ndimage

__all__ = ["GEOMETRIES", "apply_scanner", "default_grid", "load_geometries", "sample_recon"]

_GEOM_PATH = os.path.join(os.path.dirname(__file__), "geometries.json")
PADDING_VALUES = (-1024.0, -2048.0, -3024.0, -8192.0)


def load_geometries() -> dict:
    """Named geometry presets from ``geometries.json``."""
    with open(_GEOM_PATH) as fh:
        data = json.load(fh)
    return {k: v for k, v in data.items() if not k.startswith("_")}


GEOMETRIES = load_geometries()


def _draw(rng, v):
    if isinstance(v, (list, tuple)):
        return float(rng.uniform(v[0], v[1])) if len(v) == 2 else float(v[0])
    return float(v)


def default_grid(record: dict, geometry="demo", rng=None) -> dict:
    """Grid for a case at a named geometry ("demo", "tests", "qa", "ctrate") or a dict override.

    Args:
        record: case record (its anatomy sets the z range and the minimum field of view).
        geometry: preset name, or a dict. A dict with ``shape``, ``spacing_mm`` and ``origin_mm``
            is used as is; otherwise it overrides preset fields (``preset`` picks the base, default
            "demo"): ``matrix``, ``fov_mm``, ``pixel_mm``, ``slice_spacing_mm``, ``z_extent_mm``,
            ``z_top_margin_mm`` (numbers or [lo, hi] ranges), or any of ``shape``/``spacing_mm``/
            ``origin_mm`` to pin them.
        rng: numpy Generator (default: seeded from the record).

    Returns:
        ``{"shape": [nx, ny, nz], "spacing_mm": [sx, sy, sz], "origin_mm": [x0, y0, z0]}``.

    Raises:
        ValueError: unknown preset name.
    """
    if rng is None:
        rng = np.random.default_rng([int(record["seed"]) & 0xFFFFFFFF, 0x6E0])
    over = {}
    if isinstance(geometry, dict):
        if all(k in geometry for k in ("shape", "spacing_mm", "origin_mm")):
            return {
                "shape": [int(v) for v in geometry["shape"]],
                "spacing_mm": [float(v) for v in geometry["spacing_mm"]],
                "origin_mm": [float(v) for v in geometry["origin_mm"]],
            }
        over = dict(geometry)
        name = over.pop("preset", over.pop("name", "demo"))
    else:
        name = geometry
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; presets: {', '.join(GEOMETRIES)}")
    g = dict(GEOMETRIES[name])
    g.update({k: v for k, v in over.items() if k not in ("shape", "spacing_mm", "origin_mm")})
    a = record["anatomy"]
    n = int(g["matrix"])
    if "pixel_mm" in g and "fov_mm" not in over:
        px = _draw(rng, g["pixel_mm"])
    else:
        fov = _draw(rng, g["fov_mm"])
        fov = min(max(fov, a["body_width_mm"] + 20), float(g.get("fov_max_mm", 1e9)))
        px = fov / n
    sz = _draw(rng, g["slice_spacing_mm"])
    top = a["z_lung_apex_mm"] + _draw(rng, g.get("z_top_margin_mm", 15))
    extent = _draw(rng, g.get("z_extent_mm", 330))
    bottom_needed = min(a["z_dome_right_mm"], a["z_dome_left_mm"]) - 50
    extent = max(extent, top - bottom_needed)
    nz = int(np.ceil(extent / sz)) + 1
    ny = n
    y_center = 8.0 + float(rng.uniform(0, 15))  # body centre, table shows posteriorly
    x_center = float(rng.uniform(-8, 8))
    grid = {
        "shape": [n, ny, nz],
        "spacing_mm": [px, px, sz],
        "origin_mm": [x_center - (n - 1) / 2 * px, y_center - (ny - 1) / 2 * px, top - (nz - 1) * sz],
    }
    for k in ("shape", "spacing_mm", "origin_mm"):
        if k in over:
            grid[k] = list(over[k])
    grid["shape"] = [int(v) for v in grid["shape"]]
    grid["spacing_mm"] = [float(v) for v in grid["spacing_mm"]]
    grid["origin_mm"] = [float(v) for v in grid["origin_mm"]]
    return grid


def sample_recon(record: dict, rng, index: int) -> dict:
    """Reconstruction parameters: index 1 = soft/mediastinal kernel, 2 = sharp/lung kernel.

    The vendor-like choices shared by all reconstructions of a scan (padding value, FOV circle,
    iterative or FBP) derive from the record's seed, so reconstructions 1 and 2 agree on them.

    Args:
        record: case record.
        rng: numpy Generator for the per-reconstruction draws (noise level, PSF, thickness).
        index: 1-based reconstruction number.

    Returns:
        recon dict (see module docstring) with also ``psf_fwhm_mm`` and ``index``.
    """
    scan_rng = np.random.default_rng([int(record["seed"]) & 0xFFFFFFFF, 0x5CA7])
    padding = float(scan_rng.choice(PADDING_VALUES, p=[0.35, 0.3, 0.3, 0.05]))
    a = record["anatomy"]
    # the circle usually clears the body's corners; large patients get truncated like on real scanners
    fov = float(np.clip(np.hypot(a["body_width_mm"], a["body_depth_mm"]) * scan_rng.uniform(0.92, 1.05), 300, 500))
    iterative = bool(scan_rng.random() < 0.35)
    thick = float(scan_rng.choice([1.0, 1.25, 1.5, 2.0, 3.0, 5.0], p=[0.25, 0.1, 0.35, 0.1, 0.1, 0.1]))
    # 1-based as in CT-RATE volume names (…_1 soft, …_2 sharp); 0 is accepted as the first one
    sharp = int(index) >= 2 and int(index) % 2 == 0
    low_dose = scan_rng.random() < 0.2
    if sharp:
        sd = float(rng.uniform(30, 55)) * (1.3 if low_dose else 1.0)
        fwhm = float(rng.uniform(0.6, 0.9))
    else:
        sd = float(rng.uniform(10, 20)) * (1.4 if low_dose else 1.0)
        fwhm = float(rng.uniform(0.9, 1.3))
    return {
        "index": int(index),
        "kernel": "sharp" if sharp else "soft",
        "noise_sd_hu": round(sd, 2),
        "slice_thickness_mm": thick,
        "fov_diameter_mm": round(fov, 1),
        "padding_value_hu": padding,
        "iterative": iterative,
        "psf_fwhm_mm": round(fwhm, 3),
    }


def _noise_filter(shape_xy, spacing_xy, kernel: str, iterative: bool) -> np.ndarray:
    """sqrt(NPS) on the rfft2 frequency grid: ramp x Hann (peak ~0.3 lp/mm soft, ~0.65 sharp)."""
    fx = np.fft.fftfreq(shape_xy[0], d=spacing_xy[0])
    fy = np.fft.rfftfreq(shape_xy[1], d=spacing_xy[1])
    f = np.sqrt(fx[:, None] ** 2 + fy[None, :] ** 2)
    fc = 0.85 if kernel == "soft" else 1.8  # Hann cut-off (lp/mm)
    nps = f * (0.5 + 0.5 * np.cos(np.pi * np.clip(f / fc, 0, 1)))
    if iterative:
        nps *= np.exp(-((f / (0.35 * fc)) ** 2)) + 0.15  # blotchier texture
    nps[0, 0] = 0.0
    return np.sqrt(nps).astype(np.float32)


def apply_scanner(truth: dict, grid: dict, recon: dict, seed: int) -> np.ndarray:
    """One reconstruction of a rendered truth volume.

    Args:
        truth: output of :func:`.render.render_truth` (``"hu"`` float32, ``"metal"`` flag).
        grid: the grid the truth was rendered on.
        recon: reconstruction parameters (see :func:`sample_recon`).
        seed: noise seed of this reconstruction.

    Returns:
        float32 HU volume of the grid's shape, integer-valued, padding value outside the FOV circle.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(recon.get("index", 1)), 0xA11])
    hu = np.asarray(truth["hu"], dtype=np.float32)
    sx, sy, sz = (float(v) for v in grid["spacing_mm"])
    nx, ny, nz = hu.shape
    kernel = recon.get("kernel", "soft")
    fwhm = float(recon.get("psf_fwhm_mm", 1.1 if kernel == "soft" else 0.75))
    # 1. PSF in-plane and slice-sensitivity profile beyond the grid's own slice averaging
    sig = [fwhm / 2.355 / sx, fwhm / 2.355 / sy, 0.0]
    T = float(recon.get("slice_thickness_mm", sz))
    if T > sz:
        sig[2] = np.sqrt((T * T - sz * sz) / 12.0) / sz
    sig = [s if s >= 0.25 else 0.0 for s in sig]
    img = ndimage.gaussian_filter(hu, sig, truncate=3.0) if any(sig) else hu.copy()
    if kernel == "sharp":
        blur = ndimage.gaussian_filter(img, (0.8, 0.8, 0), truncate=2.5)
        img += 0.35 * (img - blur)  # edge overshoot of a lung kernel
    # 2. correlated quantum noise, scaled by the patient's water-equivalent path length
    white = rng.standard_normal((nx, ny, nz), dtype=np.float32)
    H = _noise_filter((nx, ny), (sx, sy), kernel, bool(recon.get("iterative", False)))
    noise = np.fft.irfft2(np.fft.rfft2(white, axes=(0, 1)) * H[:, :, None], s=(nx, ny), axes=(0, 1)).astype(np.float32)
    if sig[2] > 0:
        noise = ndimage.gaussian_filter1d(noise, sig[2], axis=2, truncate=3.0)
    noise /= noise.std() + 1e-6
    mu = np.clip((hu + 1000.0) / 1000.0, 0, 3)  # water-equivalent density
    ci, cj = nx // 2, ny // 2
    w_lat = mu[:, max(cj - 2, 0): cj + 3, :].mean(axis=1).sum(axis=0) * sx
    w_ap = mu[max(ci - 2, 0): ci + 3, :, :].mean(axis=0).sum(axis=0) * sy
    w_eff = 0.7 * w_lat + 0.3 * w_ap
    # sigma ∝ exp(mu L / 2) at fixed mAs; tube-current modulation recovers about half of it
    factor = np.clip(np.exp(0.5 * 0.019 * (w_eff - 250.0) / 2.0), 0.7, 1.8).astype(np.float32)
    img += noise * (float(recon["noise_sd_hu"]) * factor)[None, None, :]
    # 3. metal streaks
    metal = truth.get("metal_map")
    if metal is None and (hu > 2500).any():
        metal = np.where(hu > 2500, hu - 1000, 0).astype(np.float32)
    if metal is not None:
        _metal_streaks(img, metal, grid, rng)
    # 4. reconstruction circle with the vendor padding value
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    r = float(recon.get("fov_diameter_mm", max(nx * sx, ny * sy))) / 2
    outside = (x[:, None] ** 2 + y[None, :] ** 2) > r * r
    img[outside, :] = float(recon.get("padding_value_hu", -1024.0))
    np.rint(img, out=img)
    return img


def _metal_streaks(img, metal_map, grid, rng):
    """Bright and dark radial streaks from metal, decaying with distance (FBP photon starvation).

    ``metal_map`` is the metal's HU excess x volume fraction per voxel; the streak amplitude grows
    with the metal mass in the slice (HU x mm^3 / 1e4, so a 1 mm steel wire loop gives ~1).
    """
    sx, sy, sz = grid["spacing_mm"]
    nx, ny, nz = metal_map.shape
    metal = metal_map > 100
    per_slice = (metal_map * metal).sum(axis=(0, 1)) * sx * sy * sz / 1e5
    x = (np.arange(nx) * sx)[:, None]
    y = (np.arange(ny) * sy)[None, :]
    n_str = 10
    angles = rng.uniform(0, np.pi, n_str)
    signs = rng.choice([-1.0, 1.0], n_str, p=[0.55, 0.45])
    for k in np.nonzero(per_slice > 0.05)[0]:
        ii, jj = np.nonzero(metal[:, :, k])
        cx, cy = ii.mean() * sx, jj.mean() * sy
        amp = float(np.clip(250 * per_slice[k] ** 0.5, 60, 900))
        dx, dy = x - cx, y - cy
        rad = np.sqrt(dx * dx + dy * dy)
        acc = np.zeros((nx, ny), np.float32)
        for a, s in zip(angles, signs):
            perp = np.abs(-np.sin(a) * dx + np.cos(a) * dy)
            acc += s * np.exp(-(perp**2) / (2 * (1.2 * sx) ** 2)) * np.exp(-rad / 90.0)
        img[:, :, k] += amp * acc * (rad > 3 * sx)
