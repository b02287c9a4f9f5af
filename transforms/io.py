"""Reading, resampling and writing for the preprocessing stage.

``CTVolumeReader`` reads NIfTI files with nibabel in their stored dtype (int16 stays int16; the
header's ``scl_slope``/``scl_inter`` are applied in place or slab by slab, never through a float64
volume) and DICOM series folders with ITK. Both hand out the array in reversed voxel order
``(k, j, i)`` (C-contiguous without a transposing copy) with the matching RAS affine.

``ResampleToSpacingd`` produces exactly the output grid of MONAI's ``Spacingd`` (same affine, same
shape, trilinear, border padding); with ``axcodes="RAS"`` also the grid of ``Orientationd`` followed
by ``Spacingd``, the reorientation being only a permutation and sign change of the sampling plan (no
flipped copy, no interpolation). For axis-aligned volumes it runs one 1-D linear interpolation
between whole planes along the slowest memory axis and a bilinear ``grid_sample`` in-plane, slab by
slab in float32: it never holds more than the input, the output and a few slabs. ``Spacingd`` builds
a dense sampling grid of 3 floats per output voxel (546 MB for a 477x477x200 output) and converts
the whole input to float. Oblique inputs fall back to ``Orientation`` + ``Spacing``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import itk
import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, ImageReader, MetaTensor
from monai.data.utils import compute_shape_offset, zoom_affine
from monai.transforms import MapTransform, Orientation, ResizeWithPadOrCrop, Spacing, Transform

from ctclip_contract import atomic_path, route_nibabel_gzip

# every .nii.gz nibabel opens in this package (raw inputs, header checks, stored volumes, MONAI's NibabelReader)
# inflates and deflates with ISA-L (ctclip_contract.files.gzip_open)
route_nibabel_gzip(nib.openers)

__all__ = ["CTVolumeReader", "ITKVolumeReader", "ResampleToSpacing", "ResampleToSpacingd", "CastToHUInt16d",
           "save_nifti_atomic", "linear_resample_axes", "nearest_resample_axes", "read_nifti_array",
           "read_label_volume", "reversed_axes_affine"]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class ITKVolumeReader(ITKReader):
    """MONAI's ``ITKReader`` (NIfTI files, DICOM series folders) without the transposing copy.

    ``ITKReader`` returns ITK's (z, y, x) buffer transposed to (x, y, z), and MONAI then makes it
    C-contiguous: a full strided copy that costs more than decompressing the file. This reader
    keeps ITK's memory order, as an owned copy (``reverse_indexing=True`` in MONAI 1.6.1 returns a
    view of a buffer ITK frees: use-after-free), and reverses the voxel axes of the affine to
    match, so the array is (z, y, x) with a correct affine; ``Orientationd`` then makes it RAS by a
    permutation view. Single-channel images only (CT). :class:`CTVolumeReader` uses it for DICOM
    series (and nibabel for NIfTI).
    """

    def _get_array_data(self, img):
        arr = itk.array_view_from_image(img, keep_axes=False)
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("ITKVolumeReader reads single-channel images only")
        return np.array(arr, copy=True)

    def _get_affine(self, img, lps_to_ras: bool = True):
        affine = super()._get_affine(img, lps_to_ras)
        return reversed_axes_affine(affine, affine.shape[0] - 1)

    def _get_spatial_shape(self, img):
        return super()._get_spatial_shape(img)[::-1].copy()


_INT16 = (-32768, 32767)


class _ITKInt16Reader(ITKVolumeReader):
    """:class:`ITKVolumeReader` that copies ITK's buffer straight to int16 when the values fit (ITK
    hands out rescaled DICOM as int32: a second int32 copy plus the int16 one would triple the peak)."""

    def _get_array_data(self, img):
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("ITKVolumeReader reads single-channel images only")
        view = itk.array_view_from_image(img, keep_axes=False)
        if view.dtype.kind in "iub" and view.size and _fits_int16(int(view.min()), int(view.max())):
            return np.array(view, dtype=np.int16, copy=True)
        return np.array(view, copy=True)


def _fits_int16(lo: float, hi: float) -> bool:
    return _INT16[0] <= lo and hi <= _INT16[1]


def _compact_dtype(arr: np.ndarray) -> np.ndarray:
    """Integers that fit int16 as int16 (int32 DICOM from ITK, uint8/uint16 storage), float64 as float32.

    int16 and float32 arrays are returned as they are (no copy)."""
    if arr.dtype in (np.int16, np.float32):
        return arr
    if arr.dtype.kind in "iub":
        if arr.size and _fits_int16(int(arr.min()), int(arr.max())):
            return arr.astype(np.int16, order="K")
        return arr.astype(np.float32, order="K")  # exact for |v| < 2**24
    return arr.astype(np.float32, order="K")


def read_nifti_array(img, on_chunk: Any = None, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """The voxels of a loaded ``nibabel`` NIfTI image in their stored dtype, read once into an owned array.

    ``np.asanyarray(img.dataobj)`` of a ``.nii.gz`` decompresses into a bytes object and then copies it
    (twice the volume in memory), and turns scaled integers into float64. Here the stream is
    decompressed straight into a Fortran-ordered array of the stored dtype, ``chunk_bytes`` (16 MiB) at a time.

    Args:
        img: the image (header loaded, voxels not read).
        on_chunk: called as ``on_chunk(out, nbytes)`` after each chunk, ``nbytes`` the bytes of ``out`` filled so
            far (ISA-L inflates without holding the GIL, so another thread can work on the part already read:
            :class:`transforms.preprocessing.StreamedPreprocessing`).
    """
    proxy = img.dataobj
    shape = tuple(int(s) for s in proxy.shape)
    dtype = np.dtype(proxy.dtype)
    out = np.empty(shape, dtype=dtype.newbyteorder("="), order="F")
    buf = memoryview(out.reshape(-1, order="F").view(np.uint8))
    with nib.openers.ImageOpener(proxy.file_like, "rb") as f:
        f.seek(int(proxy.offset))
        pos, step = 0, int(chunk_bytes)
        while pos < len(buf):
            n = f.readinto(buf[pos:pos + step])
            if not n:
                raise ValueError(f"{proxy.file_like}: truncated NIfTI data ({pos} of {len(buf)} bytes)")
            pos += n
            if on_chunk is not None:
                on_chunk(out, pos)
    if not dtype.isnative:
        out.byteswap(inplace=True)
    return out


def _apply_scaling(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """``raw * slope + inter`` without a float64 volume: in place for int16 when the result fits int16
    (two's-complement wrap-around of the intermediate product cancels out), slab by slab otherwise."""
    slope, inter = float(slope), float(inter)
    if slope == 1.0 and inter == 0.0:
        return _compact_dtype(raw)
    integral = raw.dtype.kind in "iu" and slope.is_integer() and inter.is_integer()
    if integral and raw.size:
        ends = sorted((int(raw.min()) * slope + inter, int(raw.max()) * slope + inter))
        if _fits_int16(*ends) and raw.dtype == np.int16 and abs(slope) <= _INT16[1] and _fits_int16(inter, inter):
            # int16 arithmetic wraps modulo 2**16; the final values fit int16, so they are exact
            if slope != 1.0:
                np.multiply(raw, np.int16(int(slope)), out=raw, casting="unsafe")
            np.add(raw, np.int16(int(inter)), out=raw, casting="unsafe")
            return raw
        dst = np.int16 if _fits_int16(*ends) else np.float32
    else:
        dst = np.float32
    out = np.empty(raw.shape, dtype=dst, order="F")
    flat_in = raw.reshape(raw.shape[:2] + (-1,), order="F") if raw.ndim >= 3 else raw.reshape(-1, 1, order="F")
    flat_out = out.reshape(flat_in.shape, order="F")
    step = max(1, (1 << 22) // max(1, flat_in.shape[0] * flat_in.shape[1]))
    work = np.int64 if integral else np.float32
    for k in range(0, flat_in.shape[-1], step):
        v = flat_in[..., k:k + step].astype(work)
        v *= work(slope) if integral else np.float32(slope)
        v += work(inter) if integral else np.float32(inter)
        flat_out[..., k:k + step] = v
    return out


def reversed_axes_affine(affine: np.ndarray, ndim: int = 3) -> np.ndarray:
    """A NIfTI affine for the ``(k, j, i)`` view of its voxels that :class:`CTVolumeReader` hands out (the first
    ``min(ndim, 3)`` voxel axes reversed)."""
    out = np.array(affine, dtype=np.float64, copy=True)
    sr = min(int(ndim), 3)
    out[:, :sr] = out[:, :sr][:, ::-1]
    return out


class CTVolumeReader(ImageReader):
    """NIfTI files with nibabel (stored dtype kept), DICOM series folders with ITK.

    Like :class:`ITKVolumeReader`, the array is handed out in reversed voxel order ``(k, j, i)``
    (C-contiguous, no transposing copy: MONAI's ``LoadImage`` would otherwise make the Fortran-ordered
    NIfTI data C-contiguous, a full strided copy that costs more than decompressing the file) with
    the voxel axes of the RAS affine reversed to match; ``Orientationd`` or
    ``ResampleToSpacingd(axcodes="RAS")`` take it from there without a copy.

    NIfTI: the affine is nibabel's (sform when ``sform_code > 0``, else qform, else the pixdim
    diagonal; for files with sform = qform, as scanners and converters write them, the same as
    ITK's), the header rescale is applied without a float copy: int16 stays int16 (also after an
    integral rescale that fits int16, e.g. uint16 with intercept -1024), other scaled data become
    float32. NaN stays NaN (ITK reads it as 0). DICOM: ITK's rescaled int32 is narrowed to int16
    when it fits. Single-channel images (trailing singleton dimensions of NIfTI are dropped).

    Args:
        on_chunk, chunk_bytes: NIfTI: called while the voxels are read, see :func:`read_nifti_array`.
        itk_kwargs: passed to :class:`ITKVolumeReader` for DICOM folders (e.g. ``series_name``).
    """

    def __init__(self, on_chunk: Any = None, chunk_bytes: int = 1 << 24, **itk_kwargs) -> None:
        super().__init__()
        self.on_chunk, self.chunk_bytes = on_chunk, chunk_bytes
        self.itk_kwargs = itk_kwargs

    def verify_suffix(self, filename) -> bool:
        names = [str(f) for f in (filename if isinstance(filename, (list, tuple)) else [filename])]
        return all(n.lower().endswith((".nii", ".nii.gz")) or os.path.isdir(n) for n in names)

    def read(self, data, **kwargs):
        names = [str(f) for f in (data if isinstance(data, (list, tuple)) else [data])]
        if len(names) != 1:
            raise ValueError("CTVolumeReader reads one volume (a NIfTI file or a DICOM folder) at a time")
        name = names[0]
        if os.path.isdir(name):
            reader = _ITKInt16Reader(**self.itk_kwargs)
            return ("dicom", name, reader, reader.read(name, **kwargs))
        return ("nifti", name, None, nib.load(name, **kwargs))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        kind, name, reader, obj = img
        if kind == "dicom":
            arr, meta = reader.get_data(obj)  # (k, j, i), C order, affine columns reversed
            arr = _compact_dtype(arr)
            affine = np.asarray(meta["affine"], dtype=np.float64).copy()
            meta = {k: v for k, v in meta.items() if k not in ("affine", "original_affine", "spatial_shape")}
        else:
            raw = read_nifti_array(obj, on_chunk=self.on_chunk, chunk_bytes=self.chunk_bytes)  # (i, j, k), F order
            while raw.ndim > 3 and raw.shape[-1] == 1:
                raw = raw[..., 0]
            slope, inter = obj.dataobj.slope, obj.dataobj.inter  # nibabel: 1/0 when the header has none
            arr = _apply_scaling(raw, float(slope), float(inter)).T  # (k, j, i) view, C order
            affine = reversed_axes_affine(obj.affine, arr.ndim)
            hdr = obj.header
            meta = {"sform_code": int(hdr["sform_code"]), "qform_code": int(hdr["qform_code"]),
                    "scl_slope": float(slope), "scl_inter": float(inter),
                    "stored_dtype": str(obj.get_data_dtype())}
        sr = min(arr.ndim, 3)
        meta.update({
            "affine": affine, "original_affine": affine.copy(), "spatial_shape": np.asarray(arr.shape[:sr]),
            "original_channel_dim": float("nan"), "space": "RAS", "reader": f"CTVolumeReader/{kind}",
        })
        return arr, meta

def read_label_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a label map or mask NIfTI in the layout of :class:`CTVolumeReader`: ``(k, j, i)`` voxels with the voxel
    axes of the RAS affine reversed to match, values as stored (integers; no rescale).

    Raises:
        ValueError: naming the file: not 3-D, scaled (``scl_slope``/``scl_inter``), or non-integer values.
    """
    img = nib.load(str(path))
    raw = read_nifti_array(img)
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise ValueError(f"{path}: a mask must be 3-D, got shape {tuple(raw.shape)}")
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if (slope, inter) != (1.0, 0.0):
        raise ValueError(f"{path}: a mask must hold its labels unscaled (scl_slope {slope}, scl_inter {inter})")
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise ValueError(f"{path}: a mask must hold integer labels (found non-integer values)")
        raw = raw.astype(np.int64)
    affine = np.array(img.affine, dtype=np.float64, copy=True)
    affine[:, :3] = affine[:, :3][:, ::-1]
    return raw.T, affine


def nearest_resample_axes(
    x: torch.Tensor,
    out_shape: Sequence[int],
    scales: Sequence[float],
    shifts: Sequence[float],
    out_dtype: torch.dtype,
    inside: Sequence[tuple[int, int]] | None = None,
    fill: float = 0,
) -> torch.Tensor:
    """Nearest-neighbour counterpart of :func:`linear_resample_axes` for label maps: the same sampling plan (output
    voxel ``j`` reads input ``scales[k] * j + shifts[k]`` per axis, border clamp, ``inside``/``fill`` for a folded
    crop/pad), each output voxel taking the label of the nearest input voxel (ties round up)."""
    out = torch.full([int(v) for v in out_shape], fill, dtype=out_dtype)
    box = [(0, int(m)) for m in out_shape] if inside is None else \
        [(max(0, int(lo)), min(int(m), int(hi))) for (lo, hi), m in zip(inside, out_shape)]
    if any(hi <= lo for lo, hi in box):
        return out
    idx = []
    for k, (lo, hi) in enumerate(box):
        src = np.arange(lo, hi, dtype=np.float64) * float(scales[k]) + float(shifts[k])
        idx.append(torch.from_numpy(np.clip(np.floor(src + 0.5), 0, x.shape[k] - 1).astype(np.int64)))
    out[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]] = \
        x[idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]].to(out_dtype)
    return out


def _axis_plan(n_in: int, n_out: int, scale: float, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weight per output voxel for ``src = scale * j + shift`` (border clamp)."""
    src = np.arange(n_out, dtype=np.float64) * scale + shift
    src = np.clip(src, 0.0, n_in - 1.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _grid_coords(n_in: int, src: np.ndarray) -> torch.Tensor:
    """Sampling positions (input voxel indices) in ``grid_sample``'s normalised coordinates
    (align_corners=True), clamped to the border."""
    src = np.clip(np.asarray(src, dtype=np.float64), 0.0, n_in - 1.0)
    g = src * (2.0 / (n_in - 1)) - 1.0 if n_in > 1 else np.zeros(len(src))
    return torch.from_numpy(g.astype(np.float32))


def linear_resample_axes(
    x: torch.Tensor,
    out_shape: Sequence[int],
    scales: Sequence[float],
    shifts: Sequence[float],
    out_dtype: torch.dtype = torch.float32,
    slab: int = 8,
    threads: int | None = None,
    inside: Sequence[tuple[int, int]] | None = None,
    fill: float = 0.0,
    value_map: tuple[float, float, float | None] | None = None,
    planes_ready: Any = None,
) -> torch.Tensor:
    """Separable trilinear resampling of a 3-D tensor, output slab by output slab along the slowest memory axis.

    Output voxel ``(j0, j1, j2)`` samples input coordinate ``scales[k] * j_k + shifts[k]`` per axis
    (voxel-centre indices, border clamp; a negative scale reads the axis backwards, which is how a
    flip is folded into the plan). Integer ``out_dtype`` rounds to nearest.

    In the input's memory order (slowest axis first): each output plane along the slowest axis is
    the linear blend of two whole input planes (float32), and the plane is then resampled in-plane
    by ``torch.nn.functional.grid_sample`` (bilinear, border, align_corners=True: several times
    faster than gathers along the fastest axis). Sampling positions are exact in float64 up to the
    float32 normalised grid (error below 1e-4 voxel for 1000-voxel axes).

    Args:
        x: (X, Y, Z) tensor of any real dtype, any strides.
        out_shape: (X', Y', Z').
        scales, shifts: per-axis affine map from output to input index.
        out_dtype: dtype of the result.
        slab: output planes computed at a time (bounds the temporary memory: a few slabs of float32).
        threads: worker threads, each computing whole slabs with single-threaded torch ops
            (default ``torch.get_num_threads()``).
        inside: per axis, the ``[start, stop)`` range of output indices that is sampled; the rest is
            set to ``fill`` (a crop/pad folded into the resampling). Default: everything.
        fill: value outside ``inside``.
        value_map: ``(slope, intercept, floor)``: the input's values are read as ``max(slope * v + intercept,
            floor)`` (floor None: no floor), in float32 as each slab reads its planes; ``fill`` is not mapped.
            Exactly :class:`transforms.RescaleToHU` with its floor, for a volume read as stored.
        planes_ready: called with ``n`` before a slab reads the input's planes ``[0, n)`` along its slowest memory
            axis; it returns once they hold their values (or raises to stop the resampling). Slabs are taken in
            the order their planes are stored, so a resampling can follow a read that is still going on.

    Returns:
        The (X', Y', Z') result, laid out in the input's memory order (a permuted view when the
        input is not C-ordered, e.g. Fortran-ordered NIfTI data).
    """
    order = sorted(range(3), key=lambda k: (-x.stride(k), k))
    xm = x.permute(order)
    if not xm.is_contiguous():
        if planes_ready is not None:
            raise ValueError("planes_ready needs an input whose memory order is the order of its axes' strides")
        xm = xm.contiguous()
    n = list(xm.shape)
    m = [int(out_shape[k]) for k in order]
    sc = [float(scales[k]) for k in order]
    sh = [float(shifts[k]) for k in order]
    box = [(0, m[i]) for i in range(3)] if inside is None else \
        [(max(0, int(inside[k][0])), min(m[i], int(inside[k][1]))) for i, k in enumerate(order)]
    out = torch.empty(m, dtype=out_dtype)
    if any(b != (0, mm) for b, mm in zip(box, m)):
        out.fill_(fill)
    if any(hi <= lo for lo, hi in box):
        return out.permute([order.index(k) for k in range(3)])
    info = None if out_dtype.is_floating_point else torch.iinfo(out_dtype)
    i0, i1, w0 = _axis_plan(n[0], m[0], sc[0], sh[0])
    (b1, e1), (b2, e2) = box[1], box[2]
    # in-plane: sampling positions of the box; a unit step at an integer offset is a plain slice
    src1 = np.arange(b1, e1) * sc[1] + sh[1]
    src2 = np.arange(b2, e2) * sc[2] + sh[2]
    sliced = all(abs(sc_i - 1.0) < 1e-9 and abs(src[0] - round(src[0])) < 1e-9 and round(src[0]) >= 0
                 and round(src[-1]) <= n_i - 1 for sc_i, src, n_i in ((sc[1], src1, n[1]), (sc[2], src2, n[2])))
    grid = None
    if sliced:
        c1, c2 = int(round(src1[0])), int(round(src2[0]))
        in_box = (slice(c1, c1 + e1 - b1), slice(c2, c2 + e2 - b2))
    else:
        in_box = (slice(None), slice(None))
        grid = torch.empty(1, e1 - b1, e2 - b2, 2, dtype=torch.float32)
        grid[0, :, :, 0] = _grid_coords(n[2], src2)[None, :]  # grid_sample's x is the last (fastest) axis
        grid[0, :, :, 1] = _grid_coords(n[1], src1)[:, None]
    # in the order of the planes they read (a flipped axis reads the last planes first)
    starts = sorted(range(box[0][0], box[0][1], slab), key=lambda s: int(i0[s:min(s + slab, box[0][1])].min()))
    n_planes = max(int(i1[s:min(s + slab, box[0][1])].max()) - int(i0[s:min(s + slab, box[0][1])].min()) + 1
                   for s in starts)
    i0_t, i1_t, w_t = torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(w0)
    pending = iter(starts)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        # Single-threaded ops, several slabs in flight (one per worker thread): an OpenMP-parallel op
        # on a plane-sized tensor ends in a barrier that waits for every thread, which costs more than
        # the op itself when another process holds one of the cores (measured: 0.3 s single-threaded
        # vs 3 s with two OpenMP threads on a busy 2-core machine). Python threads pick slabs as they
        # go, so a descheduled thread holds no one up; torch releases the GIL inside each op.
        try:
            _resample_slabs()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    def _resample_slabs() -> None:
        torch.set_num_threads(1)
        # Work buffers allocated once per thread: a fresh multi-megabyte tensor per slab costs a page
        # fault per 4 KiB on first touch, as much as the arithmetic.
        planes_buf = torch.empty((n_planes, n[1], n[2]), dtype=torch.float32)
        a_buf = torch.empty((min(slab, box[0][1] - box[0][0]), n[1], n[2]), dtype=torch.float32)
        b_buf = torch.empty_like(a_buf)
        while True:
            with lock:
                start = next(pending, None)
            if start is None:
                return
            stop = min(start + slab, box[0][1])
            s_n = stop - start
            lo, hi = int(i0[start:stop].min()), int(i1[start:stop].max())
            planes = planes_buf[: hi + 1 - lo]
            if planes_ready is not None:
                planes_ready(hi + 1)
            planes.copy_(xm[lo:hi + 1])  # to float32: just the planes this slab reads
            if value_map is not None:
                slope, intercept, floor = value_map
                if (slope, intercept) != (1.0, 0.0):
                    planes.mul_(slope).add_(intercept)
                if floor is not None:
                    planes.clamp_(min=floor)
            t = torch.index_select(planes, 0, i0_t[start:stop] - lo, out=a_buf[:s_n])
            if bool((w_t[start:stop] > 0).any()):
                b = torch.index_select(planes, 0, i1_t[start:stop] - lo, out=b_buf[:s_n])
                t = t.lerp_(b, w_t[start:stop].view(-1, 1, 1))
            if grid is not None:
                # the slab's planes as channels of one image: weights computed once per position
                # (8 channels is the fast size; 16 is several times slower per plane)
                t = torch.nn.functional.grid_sample(
                    t.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=True,
                )[0]
            else:
                t = t[(slice(None), *in_box)]
            if info is not None:
                t = t.round_().clamp_(info.min, info.max)
            out[start:stop, b1:e1, b2:e2].copy_(t)

    n_workers = max(1, min(int(threads) if threads else torch.get_num_threads(), len(starts)))
    prev_threads = torch.get_num_threads()
    try:
        if n_workers == 1:
            worker()
        else:
            pool = [threading.Thread(target=worker, daemon=True) for _ in range(n_workers)]
            for th in pool:
                th.start()
            for th in pool:
                th.join()
    finally:
        torch.set_num_threads(prev_threads)
    if errors:
        raise errors[0]
    inverse = [order.index(k) for k in range(3)]
    return out.permute(inverse)


def _oriented_affine(affine: np.ndarray, shape: Sequence[int], axcodes: str) -> tuple[np.ndarray, list[int]]:
    """The affine and shape ``Orientation(axcodes, labels=RAS labels)`` would produce (no data touched)."""
    src = nib.orientations.io_orientation(affine)
    dst = nib.orientations.axcodes2ornt(tuple(axcodes), labels=_RAS_LABELS)
    ornt = nib.orientations.ornt_transform(src, dst)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, tuple(shape))
    new_shape = [0, 0, 0]
    for i, (axis, _) in enumerate(ornt):
        new_shape[int(axis)] = int(shape[i])
    return new_affine, new_shape


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
            output voxel ``j`` samples input ``(j + 0.5) * r - 0.5``. Both are trilinear with border
            clamping; they differ by a sub-voxel shift of ``(r - 1) / 2`` input voxels.
        axcodes: ``None`` (resample in the input's axis order, as ``Spacing``) or e.g. ``"RAS"``: the
            output is in that orientation, on the grid of ``Orientation(axcodes)`` then ``Spacing``;
            the reorientation is a permutation and sign change of the sampling plan (no copy, no
            interpolation of its own).
        spatial_size: ``None`` or the output size: the grid is then centre-cropped/padded exactly as
            ``ResizeWithPadOrCrop(spatial_size)`` would (same affine), without computing the cropped
            part or copying the result again; padding takes ``pad_value``.
        pad_value: value of the padded voxels (HU).
        threads: worker threads of :func:`linear_resample_axes` (default ``torch.get_num_threads()``).
        mode: ``"bilinear"`` (trilinear, CT values) or ``"nearest"`` (label maps and masks: the same output grid,
            each voxel the label of the nearest input voxel, :func:`nearest_resample_axes`).
    """

    def __init__(
        self,
        pixdim: Sequence[float],
        out_dtype: torch.dtype | str = torch.float32,
        slab: int = 8,
        max_obliquity: float = 1e-4,
        grid: str = "spacingd",
        axcodes: str | None = None,
        spatial_size: Sequence[int] | None = None,
        pad_value: float = 0.0,
        threads: int | None = None,
        mode: str = "bilinear",
    ) -> None:
        if grid not in ("spacingd", "centered"):
            raise ValueError(f"grid must be 'spacingd' or 'centered', got {grid!r}")
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        self.mode = mode
        self.grid = grid
        self.pixdim = np.asarray(pixdim, dtype=np.float64)
        self.out_dtype = getattr(torch, out_dtype) if isinstance(out_dtype, str) else out_dtype
        self.slab = slab
        self.max_obliquity = max_obliquity
        self.axcodes = axcodes
        self.spatial_size = None if spatial_size is None else [int(v) for v in spatial_size]
        self.pad_value = float(pad_value)
        self.threads = threads
        self.fallback = Spacing(pixdim=tuple(self.pixdim), mode=mode, padding_mode="border")

    def _fallback(self, img: MetaTensor) -> MetaTensor:
        if self.axcodes is not None:
            img = Orientation(axcodes=self.axcodes, labels=_RAS_LABELS)(img)
        out = self.fallback(img)
        if self.spatial_size is not None:
            out = ResizeWithPadOrCrop(self.spatial_size, mode="constant", value=self.pad_value)(out)
        t = out.as_tensor()
        if not self.out_dtype.is_floating_point:
            t = t.round()
        meta = {k: v for k, v in out.meta.items() if k != "affine"}
        return MetaTensor(t.to(self.out_dtype), affine=out.affine, meta=meta)

    def __call__(self, img: torch.Tensor) -> MetaTensor:  # type: ignore[override]
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)
        if img.ndim != 4:
            raise ValueError(f"ResampleToSpacing expects a channel-first 3-D volume, got shape {tuple(img.shape)}")
        plan = self.plan(np.asarray(img.affine, dtype=np.float64), img.shape[1:])
        return self._fallback(img) if plan is None else self.resample(img, plan)

    def plan(self, in_affine: np.ndarray, in_shape: Sequence[int]) -> dict[str, Any] | None:
        """Where each output voxel samples a volume of this affine and spatial shape (no voxel read): ``{"perm",
        "scales", "shifts", "out_shape", "inside", "affine"}`` for :meth:`resample`, or None when the volume is too
        oblique for the fast path (``__call__`` then uses MONAI's ``Orientation`` + ``Spacing``)."""
        in_affine = np.asarray(in_affine, dtype=np.float64)
        in_shape = [int(s) for s in in_shape]
        affine, spatial = in_affine, in_shape
        if self.axcodes is not None:
            affine, spatial = _oriented_affine(in_affine, in_shape, self.axcodes)
        if self.grid == "centered":
            # Field-of-view-centred grid (torch/CT-CLIP convention, align_corners=False): output voxel
            # j samples input voxel (j + 0.5) * r - 0.5, r = target / input spacing, floor(n / r) voxels.
            r = self.pixdim / np.linalg.norm(affine[:3, :3], axis=0)
            out_shape = np.floor(np.asarray(spatial) / r + 1e-9).astype(int)
            step = np.eye(4)
            step[:3, :3] = np.diag(r)
            step[:3, 3] = 0.5 * r - 0.5
            new_affine = affine @ step
        else:
            new_affine = zoom_affine(affine, self.pixdim, diagonal=False)
            out_shape, offset = compute_shape_offset(spatial, affine, new_affine, False)
            new_affine[:3, 3] = offset[:3]
        xform = np.linalg.solve(in_affine, new_affine)  # output voxel -> input voxel
        lin = xform[:3, :3]
        perm = [int(np.argmax(np.abs(lin[:, k]))) for k in range(3)]  # input axis read by output axis k
        scales = np.array([lin[perm[k], k] for k in range(3)])
        off = lin.copy()
        for k in range(3):
            off[perm[k], k] = 0.0
        if sorted(perm) != [0, 1, 2] or np.abs(off).max() > self.max_obliquity * np.abs(scales).max():
            return None
        shifts = xform[perm, 3]
        inside = None
        if self.spatial_size is not None:
            if len(self.spatial_size) != 3:
                raise ValueError(f"spatial_size must have 3 values, got {self.spatial_size}")
            # ResizeWithPadOrCrop: centre crop (start n // 2 - s // 2), then symmetric pad (s - n) // 2 before
            grid_shape = [int(v) for v in out_shape]
            offset = np.array([g // 2 - s // 2 if g >= s else -((s - g) // 2)
                               for g, s in zip(grid_shape, self.spatial_size)], dtype=np.float64)
            inside = [(int(max(0, -o)), int(min(s, g - o))) for o, g, s in zip(offset, grid_shape, self.spatial_size)]
            step = np.eye(4)
            step[:3, 3] = offset
            new_affine = new_affine @ step
            shifts = shifts + scales * offset
            out_shape = np.asarray(self.spatial_size)
        return {"perm": perm, "scales": scales, "shifts": shifts, "out_shape": out_shape, "inside": inside,
                "affine": new_affine}

    def resample(self, img: MetaTensor, plan: Mapping[str, Any], value_map: tuple | None = None,
                 planes_ready: Any = None, threads: int | None = None) -> MetaTensor:
        """Resample ``img`` by a :meth:`plan` of its affine and shape.

        Args:
            img: the channel-first volume.
            plan: ``self.plan(img.affine, img.shape[1:])``.
            value_map, planes_ready: see :func:`linear_resample_axes` (bilinear mode only).
            threads: worker threads for this call (default: the transform's ``threads``).
        """
        t = img.as_tensor()
        perm, scales, shifts, out_shape = plan["perm"], plan["scales"], plan["shifts"], plan["out_shape"]
        if self.mode == "nearest":
            if value_map is not None or planes_ready is not None:
                raise ValueError("value_map and planes_ready are for the bilinear mode")
            chans = [nearest_resample_axes(t[c].permute(perm), out_shape, scales, shifts, self.out_dtype,
                                           plan["inside"], self.pad_value) for c in range(t.shape[0])]
        else:
            chans = [
                linear_resample_axes(t[c].permute(perm), out_shape, scales, shifts, self.out_dtype, self.slab,
                                     threads=threads or self.threads, inside=plan["inside"], fill=self.pad_value,
                                     value_map=value_map, planes_ready=planes_ready)
                for c in range(t.shape[0])
            ]
        meta = {k: v for k, v in img.meta.items() if k != "affine"}
        meta["spatial_shape"] = np.asarray(out_shape)
        out = chans[0].unsqueeze(0) if len(chans) == 1 else torch.stack(chans)
        return MetaTensor(out, affine=torch.as_tensor(plan["affine"]), meta=meta)


class ResampleToSpacingd(MapTransform):
    """Dictionary form of :class:`ResampleToSpacing`.

    Args:
        keys: image keys.
        pixdim: output voxel spacing (x, y, z) in mm.
        out_dtype: output dtype (``"int16"`` rounds).
        slab: output slices computed at a time.
        grid: ``"spacingd"`` (MONAI ``Spacingd``'s grid, origin kept) or ``"centered"`` (field of view
            centred, CT-CLIP/torch convention).
        axcodes: ``None`` or an orientation such as ``"RAS"`` (replaces an ``Orientationd`` before it).
        spatial_size, pad_value: crop/pad the output as ``ResizeWithPadOrCropd(spatial_size,
            value=pad_value)`` after it would (replaces it).
        threads: worker threads (default ``torch.get_num_threads()``).
        mode: ``"bilinear"`` or ``"nearest"`` (label maps; see :class:`ResampleToSpacing`).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float],
        out_dtype: torch.dtype | str = torch.float32,
        slab: int = 8,
        grid: str = "spacingd",
        axcodes: str | None = None,
        spatial_size: Sequence[int] | None = None,
        pad_value: float = 0.0,
        threads: int | None = None,
        mode: str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resampler = ResampleToSpacing(pixdim, out_dtype, slab, grid=grid, axcodes=axcodes,
                                           spatial_size=spatial_size, pad_value=pad_value, threads=threads, mode=mode)

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
    """Write a channel-first single-channel volume as NIfTI through the atomic writer
    (:func:`ctclip_contract.atomic_path`).

    A run killed mid-write leaves at most a hidden ``.<name>.*.tmp.nii.gz`` file, never a partial
    ``<name>.nii.gz``; ``sform``/``qform`` codes are 1 (scanner).
    """
    path = Path(path)
    arr = img[0] if img.ndim == 4 else img
    arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    nii = nib.Nifti1Image(np.asarray(arr, dtype=dtype), np.asarray(affine, dtype=np.float64))
    nii.set_sform(nii.affine, code=1)
    nii.set_qform(nii.affine, code=1)
    nii.header.set_xyzt_units("mm")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nii, str(tmp))
