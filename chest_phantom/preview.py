"""Picture of a few generated cases: axial and coronal slices with the findings marked.

    python -m chest_phantom.preview --cohort OUT --output docs/images/synthetic_cases.png --num_cases 4

Each volume is read back from its file the way any reader sees it (nibabel for NIfTI with the
header's scl_slope/scl_inter applied; pydicom for a DICOM series, slices sorted by position along
the slice normal, RescaleSlope/RescaleIntercept applied), turned to RAS index order, then HU from
the sidecar's storage facts; so the picture also checks the stored orientation and rescale.
Finding centres come from the sidecar (patient LPS mm) and are mapped to voxels through the
sidecar's affine; a mismatch with the affine read from the file is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pydicom

from ctclip_contract import atomic_path

from .encoding import decode_hu

__all__ = ["preview_cohort", "ras_canonical_affine", "read_volume"]

_SHORT = {
    "Medical material": "device", "Arterial wall calcification": "aortic Ca", "Cardiomegaly": "cardiomegaly",
    "Pericardial effusion": "pericardial eff.", "Coronary artery wall calcification": "coronary Ca",
    "Hiatal hernia": "hiatal hernia", "Lymphadenopathy": "node", "Emphysema": "emphysema", "Atelectasis": "atelectasis",
    "Lung nodule": "nodule", "Lung opacity": "GGO", "Pulmonary fibrotic sequela": "sequela", "Pleural effusion": "pleural eff.",
    "Mosaic attenuation pattern": "mosaic", "Peribronchial thickening": "peribronchial", "Consolidation": "consolidation",
    "Bronchiectasis": "bronchiectasis", "Interlobular septal thickening": "septal",
}


def ras_canonical_affine(affine_ras: np.ndarray, shape) -> np.ndarray:
    """Affine of a stored volume after reorientation to RAS index order.

    The cohort stores axis-aligned volumes whose axes already follow x, y, z; reorienting to RAS
    only reverses the axes that point toward L, P or I.
    """
    a = np.array(affine_ras, dtype=float)
    for axis in range(3):
        if a[axis, axis] < 0:
            a[:3, 3] += a[:3, axis] * (shape[axis] - 1)
            a[:3, axis] *= -1
    return a


def _best_slice(positions: list[float], spacing: float, n: int) -> int:
    if not positions:
        return n // 2
    pos = np.asarray(positions)
    counts = [(np.sum(np.abs(pos - p) * spacing <= 12), -abs(p - (n - 1) / 2)) for p in pos]
    return int(round(pos[max(range(len(pos)), key=lambda i: counts[i])]))


def _pick_sidecars(cohort: Path, num_cases: int) -> list[dict]:
    sidecars = []
    for path in sorted((cohort / "ground_truth").glob("*.json")):
        with open(path) as f:
            sidecars.append(json.load(f))
    if not sidecars:
        raise FileNotFoundError(f"no ground-truth sidecars in {cohort / 'ground_truth'}: is {cohort} a generated cohort?")
    # one reconstruction per scan, cases with marked findings first, then in case order; within a
    # scan prefer a storage format not shown yet, so the picture covers NIfTI and DICOM
    by_scan: dict[tuple, list[dict]] = {}
    for sc in sidecars:
        if not sc["storage"].get("broken_geometry"):  # its header geometry is wrong on purpose
            by_scan.setdefault((sc["case_index"],), []).append(sc)
    scans = sorted(by_scan.values(), key=lambda group: (not any(f.get("centers_mm") for f in group[0]["record"]["findings"]),
                                                         group[0]["case_index"]))
    chosen, formats = [], set()
    for group in scans[:num_cases]:
        group = sorted(group, key=lambda s: (s["storage"]["format"] in formats, s["VolumeName"]))
        chosen.append(group[0])
        formats.add(group[0]["storage"]["format"])
    return sorted(chosen, key=lambda s: s["case_index"])


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Values (the file's own rescale applied) and index → RAS mm affine of a stored volume, as stored.

    Args:
        path: a ``*.nii.gz`` file, or a folder holding one DICOM series (one file per slice).

    Returns:
        ``(float32 array, 4x4 affine)``; DICOM arrays are indexed (column, row, slice), slices in
        ascending position along the slice normal.
    """
    path = Path(path)
    if not path.is_dir():
        img = nib.load(str(path))
        return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, dtype=float)
    slices = [pydicom.dcmread(p) for p in sorted(path.iterdir()) if p.is_file()]
    if not slices:
        raise FileNotFoundError(f"no DICOM files in {path}")
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, dtype=float)))
    between_rows, between_columns = (float(v) for v in slices[0].PixelSpacing)
    planes = [ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
              for ds in slices]
    values = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, columns, slices) -> (column, row, slice)
    first = np.asarray(slices[0].ImagePositionPatient, dtype=float)
    if len(slices) > 1:
        step = (np.asarray(slices[-1].ImagePositionPatient, dtype=float) - first) / (len(slices) - 1)
    else:
        step = normal * float(slices[0].get("SliceThickness", 1.0))
    a_lps = np.eye(4)
    a_lps[:3, 0] = row_dir * between_columns
    a_lps[:3, 1] = col_dir * between_rows
    a_lps[:3, 2] = step
    a_lps[:3, 3] = first
    return np.ascontiguousarray(values), np.diag([-1.0, -1.0, 1.0, 1.0]) @ a_lps


def _to_ras(values: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder the voxel axes to RAS (nibabel's closest-canonical orientation)."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(values, ornt)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(ornt, values.shape)


def _load_hu(cohort: Path, sidecar: dict) -> tuple[np.ndarray, np.ndarray]:
    values, affine = _to_ras(*read_volume(cohort / sidecar["storage"]["path"]))
    expected = ras_canonical_affine(np.array(sidecar["storage"]["affine_ras"]), sidecar["storage"]["shape"])
    if not np.allclose(affine, expected, atol=1e-2):
        raise ValueError(f"{sidecar['VolumeName']}: affine read from the file\n{affine}\ndiffers from the sidecar's\n{expected}")
    return decode_hu(values, sidecar["encoding"]), expected


def preview_cohort(cohort: str | Path, output: str | Path, num_cases: int = 4, window: tuple[float, float] = (-1100.0, 400.0),
                   dpi: int = 80) -> Path:
    """Draw ``num_cases`` generated cases (axial + coronal) with their findings marked.

    Args:
        cohort: folder written by :func:`chest_phantom.cohort.generate_cohort`.
        output: PNG path (folders created).
        num_cases: number of scans shown (one reconstruction each).
        window: display window in HU (low, high).
        dpi: resolution of the PNG.

    Returns:
        the PNG path.
    """
    # matplotlib is the optional `plots`/`demo` extra: only the picture needs it, not the generator
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohort = Path(cohort)
    if not isinstance(num_cases, int) or num_cases < 1:
        raise ValueError(f"num_cases must be a positive integer, got {num_cases!r}")
    chosen = _pick_sidecars(cohort, num_cases)
    fig, axes = plt.subplots(len(chosen), 2, figsize=(9, 4.3 * len(chosen)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1]})
    for row, sc in enumerate(chosen):
        hu, affine = _load_hu(cohort, sc)
        inv = np.linalg.inv(affine)
        nx, ny, nz = hu.shape
        sx, sy, sz = np.abs(np.diag(affine)[:3])
        marks = []  # (i, j, k, label, size)
        for f in sc["record"]["findings"]:
            for c in f.get("centers_mm") or []:
                ras = np.array([-c[0], -c[1], c[2], 1.0])  # patient LPS → RAS world
                i, j, k = (inv @ ras)[:3]
                marks.append((i, j, k, f["label"], f.get("size_mm") or 8.0))
        inside = [m for m in marks if 0 <= m[0] < nx and 0 <= m[1] < ny and 0 <= m[2] < nz]
        # slices through the finding centre that has the most other centres within 12 mm
        k0 = _best_slice([m[2] for m in inside], sz, nz)
        j0 = _best_slice([m[1] for m in inside], sy, ny)
        # Radiological convention: patient right on the viewer's left, anterior / superior up.
        ax_img = hu[::-1, :, k0].T
        co_img = hu[::-1, j0, :].T
        ax, co = axes[row]
        ax.imshow(ax_img, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=sy / sx, interpolation="nearest")
        co.imshow(co_img, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=sz / sx, interpolation="nearest")
        named_ax, named_co = set(), set()  # one caption per label and panel
        for i, j, k, label, size in inside:
            r_px = max(3.0, 0.6 * size / sx + 2)
            if abs(k - k0) * sz <= 12:
                ax.add_patch(plt.Circle((nx - 1 - i, j), r_px, fill=False, color="#ff3b30", lw=1.2))
                if label not in named_ax:
                    named_ax.add(label)
                    ax.annotate(_SHORT.get(label, label), (nx - 1 - i, j + r_px), color="#ffd60a", fontsize=7, ha="center", va="bottom")
            if abs(j - j0) * sy <= 12:
                co.add_patch(matplotlib.patches.Ellipse((nx - 1 - i, k), 2 * r_px, 2 * r_px * sx / sz, fill=False, color="#ff3b30", lw=1.2))
                if label not in named_co:
                    named_co.add(label)
                    co.annotate(_SHORT.get(label, label), (nx - 1 - i, k + r_px * sx / sz), color="#ffd60a", fontsize=7, ha="center", va="bottom")
        enc = sc["encoding"]["name"]
        st = sc["storage"]
        positives = [_SHORT[n] for n, v in sc["labels"].items() if v]
        ax.set_title(f"{sc['VolumeName']}  axial z={affine[2, 2] * k0 + affine[2, 3]:.0f} mm\n"
                     f"{st['format']}, {enc}, stored {st['orientation']['name']}", fontsize=8)
        co.set_title(f"coronal y={affine[1, 1] * j0 + affine[1, 3]:.0f} mm (RAS)\n"
                     f"labels: {', '.join(positives) or 'none'}"[:110], fontsize=8)
        for a in (ax, co):
            a.set_xticks([])
            a.set_yticks([])
            a.text(0.01, 0.98, "R", color="w", fontsize=8, transform=a.transAxes, va="top")
            a.text(0.99, 0.98, "L", color="w", fontsize=8, transform=a.transAxes, va="top", ha="right")
    fig.suptitle("Synthetic chest CT cohort: findings from the ground-truth sidecars (red)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    output = Path(output)
    try:
        with atomic_path(output, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return output


def main(cohort: str, output: str = "docs/images/synthetic_cases.png", num_cases: int = 4) -> str:
    """Command line: ``python -m chest_phantom.preview --cohort OUT --output PNG --num_cases 4``."""
    return str(preview_cohort(cohort, output, num_cases))


if __name__ == "__main__":
    fire.Fire(main)
