"""Resampling and writing for the preprocessing stage.

``ResampleToSpacingd`` produces exactly the output grid of MONAI's ``Spacingd`` (same affine, same
shape, trilinear, border padding) but, for axis-aligned volumes (always the case after
``Orientationd`` to RAS and the obliquity check), computes it as three separable 1-D linear
interpolations on slabs. ``Spacingd`` builds a dense sampling grid of 3 floats per output voxel
(546 MB for a 477x477x200 output) and converts the whole input to float; the slab path never holds
more than the input, the int16 output and a few slabs. Oblique inputs fall back to ``Spacingd``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
import itk
from monai.data import ITKReader, MetaTensor
from monai.data.utils import compute_shape_offset, zoom_affine
from monai.transforms import MapTransform, Spacing, Transform

__all__ = ["ITKVolumeReader", "ResampleToSpacing", "ResampleToSpacingd", "CastToHUInt16d", "save_nifti_atomic", "linear_resample_axes"]


class ITKVolumeReader(ITKReader):
    """MONAI's ``ITKReader`` (NIfTI files, DICOM series folders) without the transposing copy.

    ``ITKReader`` returns ITK's (z, y, x) buffer transposed to (x, y, z), and MONAI then makes it
    C-contiguous: a full strided copy that costs more than decompressing the file. This reader
    keeps ITK's memory order, as an owned copy (``reverse_indexing=True`` in MONAI 1.6.1 returns a
    view of a buffer ITK frees: use-after-free), and reverses the voxel axes of the affine to
    match, so the array is (z, y, x) with a correct affine; ``Orientationd`` then makes it RAS by a
    permutation view. Single-channel images only (CT).
    """

    def _get_array_data(self, img):
        arr = itk.array_view_from_image(img, keep_axes=False)
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("ITKVolumeReader reads single-channel images only")
        return np.array(arr, copy=True)

    def _get_affine(self, img, lps_to_ras: bool = True):
        affine = super()._get_affine(img, lps_to_ras)
        sr = affine.shape[0] - 1
        affine[:, :sr] = affine[:, :sr][:, ::-1]
        return affine

    def _get_spatial_shape(self, img):
        return super()._get_spatial_shape(img)[::-1].copy()


def _axis_plan(n_in: int, n_out: int, scale: float, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower neighbour index and weight per output voxel for ``src = scale * j + shift`` (border clamp)."""
    src = np.arange(n_out, dtype=np.float64) * scale + shift
    src = np.clip(src, 0.0, n_in - 1.0)
    i0 = np.floor(src).astype(np.int64)
    if n_in > 1:
        i0 = np.minimum(i0, n_in - 2)
    w = src - i0
    return torch.from_numpy(i0), torch.from_numpy(w.astype(np.float32))


def _interp(x: torch.Tensor, dim: int, i0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a = torch.index_select(x, dim, i0).to(torch.float32)
    if x.shape[dim] == 1:
        return a
    b = torch.index_select(x, dim, i0 + 1).to(torch.float32)
    shape = [1] * x.ndim
    shape[dim] = -1
    w = w.view(shape)
    return torch.lerp(a, b, w)


def linear_resample_axes(
    x: torch.Tensor,
    out_shape: Sequence[int],
    scales: Sequence[float],
    shifts: Sequence[float],
    out_dtype: torch.dtype = torch.float32,
    slab: int = 16,
) -> torch.Tensor:
    """Separable trilinear resampling of a 3-D tensor, output slab by output slab along the last axis.

    Output voxel ``(j0, j1, j2)`` samples input coordinate ``scales[k] * j_k + shifts[k]`` per axis
    (voxel-centre indices, border clamp). Integer ``out_dtype`` rounds to nearest.

    Args:
        x: (X, Y, Z) tensor of any real dtype.
        out_shape: (X', Y', Z').
        scales, shifts: per-axis affine map from output to input index.
        out_dtype: dtype of the result.
        slab: output slices computed at a time (bounds the temporary memory).
    """
    # Work in the tensor's memory order (slowest axis first) and slab along the slowest axis: the
    # gathers then read contiguous planes, and the result keeps the input's memory layout.
    order = sorted(range(3), key=lambda k: -x.stride(k))
    xm = x.permute(order)
    shape_m = [int(out_shape[k]) for k in order]
    plans = [_axis_plan(xm.shape[i], shape_m[i], float(scales[k]), float(shifts[k])) for i, k in enumerate(order)]
    out = torch.empty(shape_m, dtype=out_dtype)
    info = torch.iinfo(out_dtype) if not out_dtype.is_floating_point else None
    # In-plane (the two fastest memory axes) torch's bilinear kernel is several times faster than
    # gathers; it samples at (j + 0.5) * scale - 0.5 with floor(n / scale) outputs, so it is used
    # only when the requested grid is exactly that one (the "centered" grid of ResampleToSpacing).
    k1, k2 = order[1], order[2]
    fast = all(
        abs(float(shifts[k]) - (0.5 * float(scales[k]) - 0.5)) < 1e-9
        and int(out_shape[k]) == int(np.floor(x.shape[k] / float(scales[k]) + 1e-9))
        for k in (k1, k2)
    )
    i0, w0 = plans[0]
    for start in range(0, shape_m[0], slab):
        stop = min(start + slab, shape_m[0])
        t = _interp(xm, 0, i0[start:stop], w0[start:stop])
        if fast:
            t = torch.nn.functional.interpolate(
                t.unsqueeze(1), scale_factor=(1.0 / float(scales[k1]), 1.0 / float(scales[k2])), mode="bilinear",
                align_corners=False, recompute_scale_factor=False,
            )[:, 0]
            if tuple(t.shape[1:]) != (shape_m[1], shape_m[2]):  # float rounding of the size: exact path
                fast = False
                t = _interp(_interp(xm, 0, i0[start:stop], w0[start:stop]), 1, *plans[1])
                t = _interp(t, 2, *plans[2])
        else:
            t = _interp(t, 1, *plans[1])
            t = _interp(t, 2, *plans[2])
        if info is not None:
            t = t.round_().clamp_(info.min, info.max)
        out[start:stop] = t
    inverse = [order.index(k) for k in range(3)]
    return out.permute(inverse)


class ResampleToSpacing(Transform):
    """Resample a channel-first volume to ``pixdim`` on the grid MONAI's ``Spacing`` would produce.

    Args:
        pixdim: output voxel spacing (x, y, z) in mm.
        out_dtype: dtype of the result (``torch.int16`` keeps HU storage small; rounded).
        slab: output slices computed at a time.
        max_obliquity: largest off-diagonal element (relative) of the direction for the fast path;
            beyond it MONAI's ``Spacing`` (dense grid) is used.
        grid: ``"spacingd"``: exactly ``Spacing``'s output grid (first voxel centre kept, shape from
            the extent). ``"centered"``: the field-of-view-centred grid of ``F.interpolate`` with
            ``align_corners=False`` (what CT-CLIP's loader does, but at exactly ``pixdim``):
            output voxel ``j`` samples input ``(j + 0.5) * r - 0.5``; in-plane it runs torch's
            bilinear kernel. Both are trilinear with border clamping; they differ by a sub-voxel
            shift of ``(r - 1) / 2`` input voxels.
    """

    def __init__(
        self,
        pixdim: Sequence[float],
        out_dtype: torch.dtype | str = torch.float32,
        slab: int = 16,
        max_obliquity: float = 1e-4,
        grid: str = "spacingd",
    ) -> None:
        if grid not in ("spacingd", "centered"):
            raise ValueError(f"grid must be 'spacingd' or 'centered', got {grid!r}")
        self.grid = grid
        self.pixdim = np.asarray(pixdim, dtype=np.float64)
        self.out_dtype = getattr(torch, out_dtype) if isinstance(out_dtype, str) else out_dtype
        self.slab = slab
        self.max_obliquity = max_obliquity
        self.fallback = Spacing(pixdim=tuple(self.pixdim), mode="bilinear", padding_mode="border")

    def __call__(self, img: torch.Tensor) -> MetaTensor:  # type: ignore[override]
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)
        affine = np.asarray(img.affine, dtype=np.float64)
        spatial = tuple(int(s) for s in img.shape[1:])
        if self.grid == "centered":
            # Field-of-view-centred grid (torch/CT-CLIP convention, align_corners=False): output voxel
            # j samples input voxel (j + 0.5) * r - 0.5, r = target / input spacing, floor(n / r) voxels.
            r = self.pixdim / np.linalg.norm(affine[:3, :3], axis=0)
            out_shape = np.floor(np.asarray(spatial) / r + 1e-9).astype(int)
            xform = np.eye(4)
            xform[:3, :3] = np.diag(r)
            xform[:3, 3] = 0.5 * r - 0.5
            new_affine = affine @ xform
        else:
            new_affine = zoom_affine(affine, self.pixdim, diagonal=False)
            out_shape, offset = compute_shape_offset(spatial, affine, new_affine, False)
            new_affine[:3, 3] = offset[:3]
            xform = np.linalg.solve(affine, new_affine)  # output voxel -> input voxel
        diag = np.diag(xform[:3, :3])
        if np.abs(xform[:3, :3] - np.diag(diag)).max() > self.max_obliquity * np.abs(diag).max():
            out = self.fallback(img)
            t = out.as_tensor()
            if not self.out_dtype.is_floating_point:
                t = t.round()
            meta = {k: v for k, v in out.meta.items() if k != "affine"}
            return MetaTensor(t.to(self.out_dtype), affine=out.affine, meta=meta)
        t = img.as_tensor()
        chans = [
            linear_resample_axes(t[c], out_shape, diag, xform[:3, 3], self.out_dtype, self.slab)
            for c in range(t.shape[0])
        ]
        meta = {k: v for k, v in img.meta.items() if k != "affine"}
        meta["spatial_shape"] = np.asarray(out_shape)
        return MetaTensor(torch.stack(chans), affine=torch.as_tensor(new_affine), meta=meta)


class ResampleToSpacingd(MapTransform):
    """Dictionary form of :class:`ResampleToSpacing`.

    Args:
        keys: image keys.
        pixdim: output voxel spacing (x, y, z) in mm.
        out_dtype: output dtype (``"int16"`` rounds).
        slab: output slices computed at a time.
        grid: ``"spacingd"`` (MONAI ``Spacingd``'s grid, origin kept) or ``"centered"`` (field of view
            centred, CT-CLIP/torch convention; several times faster in-plane).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float],
        out_dtype: torch.dtype | str = torch.float32,
        slab: int = 16,
        grid: str = "spacingd",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resampler = ResampleToSpacing(pixdim, out_dtype, slab, grid=grid)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler(d[key])
        return d


class CastToHUInt16d(MapTransform):
    """Round and clamp HU to int16 (the storage type of preprocessed volumes).

    Args:
        keys: image keys.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            t = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            if t.dtype != torch.int16:
                if t.is_floating_point():
                    t = t.round()
                t = t.clamp(-32768, 32767).to(torch.int16)
            if isinstance(img, MetaTensor):
                t = MetaTensor(t, affine=img.affine, meta={k: v for k, v in img.meta.items() if k != "affine"})
            d[key] = t
        return d


def save_nifti_atomic(img: torch.Tensor, affine: np.ndarray, path: str | os.PathLike, dtype=np.int16) -> None:
    """Write a channel-first single-channel volume as NIfTI through a temp file and ``os.replace``.

    A run killed mid-write leaves at most a hidden ``.<name>.<pid>.tmp`` file, never a partial
    ``<name>.nii.gz``; ``sform``/``qform`` codes are 1 (scanner).
    """
    import nibabel as nib

    path = Path(path)
    arr = img[0] if img.ndim == 4 else img
    arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    nii = nib.Nifti1Image(np.asarray(arr, dtype=dtype), np.asarray(affine, dtype=np.float64))
    nii.set_sform(nii.affine, code=1)
    nii.set_qform(nii.affine, code=1)
    nii.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    try:
        nib.save(nii, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
