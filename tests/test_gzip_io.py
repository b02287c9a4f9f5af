"""gzip at ISA-L speed (``ctclip_contract.files``: ``gzip_open`` and its siblings, nibabel routed through them): the
files stay standard gzip that any reader opens, with or without ``isal``, and the truncated-gzip check still fires."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from chest_phantom.encoding import write_nifti as write_cohort_nifti
from ctclip_contract import files
from transforms.io import CTVolumeReader, save_nifti_atomic
from transforms.qc import QualityCheckError, check_input

ROOT = Path(__file__).resolve().parents[1]


def _ct_like(shape=(96, 80, 24), seed=0) -> np.ndarray:
    """int16 HU: air outside a body ellipse, soft tissue 40 HU with noise, two lungs at -850, a spine at 700."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    sl = np.full(shape[:2], -1000.0)
    sl[(x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1] = 40.0
    for cx in (-0.4, 0.4):
        sl[((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 <= 1] = -850.0
    sl[(x / 0.1) ** 2 + ((y - 0.5) / 0.1) ** 2 <= 1] = 700.0
    vol = sl[..., None] + rng.normal(0, 15, size=shape)
    return np.round(vol).astype(np.int16)


def _raw_bytes(path: Path) -> bytes:
    return zlib.decompress(path.read_bytes(), wbits=31)


def test_isal_is_installed_and_used():
    """``isal`` is a core dependency (setup.cfg); this environment must have it, or every test below only tests
    the fallback."""
    assert files.HAVE_ISAL
    from isal import igzip

    assert files._gzip_class(None) == (igzip.IGzipFile, files.GZIP_LEVEL)


@pytest.mark.parametrize("isal", [True, False], ids=["isal", "zlib"])
def test_round_trip_through_the_helper_is_byte_exact(tmp_path, monkeypatch, isal):
    if not isal:
        monkeypatch.setattr(files, "HAVE_ISAL", False)
    data = _ct_like().tobytes() + bytes(range(256)) * 17 + np.random.default_rng(1).bytes(100_003)
    path = tmp_path / "x.bin.gz"
    with files.gzip_open(path, "wb") as f:
        for i in range(0, len(data), 65_536):  # in pieces, as nibabel writes
            f.write(data[i:i + 65_536])
    header = path.read_bytes()[:10]
    assert header[:4] == b"\x1f\x8b\x08\x00" and header[4:8] == bytes(4)  # deflate, no name or extras, mtime 0
    with files.gzip_open(path) as f:
        assert f.read() == data
    assert gzip.decompress(path.read_bytes()) == data  # zlib reads it
    assert files.gzip_decompress(files.gzip_compress(data)) == data
    assert files.gzip_compress(data) == files.gzip_compress(data)  # deterministic: mtime 0, no name
    labels = np.repeat(np.arange(20, dtype=np.int32), 40_000).tobytes()  # a mask: long runs of one value
    assert gzip.decompress(files.gzip_compress(labels, labels=True)) == labels
    if isal:  # ISA-L's level 1 beats its level 3 on runs (the reason for GZIP_LEVEL_LABELS)
        assert len(files.gzip_compress(labels, labels=True)) < len(files.gzip_compress(labels))
    # any gzip file reads back, a multi-member one too (what `cat a.gz b.gz` makes)
    multi = gzip.compress(data[:1000], compresslevel=9) + gzip.compress(data[1000:], compresslevel=1)
    assert files.gzip_decompress(multi) == data
    path.write_bytes(multi)
    with files.gzip_open(path) as f:
        assert f.read() == data
    with open(path, "rb") as f:
        assert files.gzip_stream_size(f, chunk=777) == (len(data), True)


def test_nibabel_goes_through_the_helper_and_our_volumes_round_trip(tmp_path):
    """nib.load/nib.save (and so MONAI's NibabelReader), our NIfTI writer and the cohort generator write and read
    through the helper; the voxels come back exactly through nibabel, our reader and ITK (which reads stored
    volumes in the ClassFine and zero-shot configs, with its own zlib)."""
    with nib.openers.ImageOpener(str(tmp_path / "probe.nii.gz"), "wb") as f:
        assert f.fobj.__class__.__module__.startswith("isal")
    assert nib.openers.Opener.compress_ext_map[".gz"][0] is files.gzip_open
    vol = _ct_like()
    affine = np.diag([0.7, 0.7, 1.5, 1.0])
    ours = tmp_path / "ours.nii.gz"
    save_nifti_atomic(torch.from_numpy(vol)[None], affine, ours)
    cohort = tmp_path / "cohort.nii.gz"
    write_cohort_nifti(cohort, vol, np.diag([0.7, 0.7, 1.5, 1.0]), "int16_hu")
    for path in (ours, cohort):
        raw = _raw_bytes(path)  # plain zlib
        offset = int(nib.load(str(path)).dataobj.offset)
        assert np.array_equal(np.frombuffer(raw[offset:], dtype="<i2").reshape(vol.shape, order="F"), vol)
        assert np.array_equal(np.asarray(nib.load(str(path)).dataobj), vol)
        arr, _ = CTVolumeReader().get_data(CTVolumeReader().read(str(path)))
        assert np.array_equal(arr.transpose(2, 1, 0), vol)  # the reader hands out (k, j, i)
        assert np.array_equal(itk.array_from_image(itk.imread(str(path))).transpose(2, 1, 0), vol)


_WITHOUT_ISAL = r"""
import sys
sys.modules["isal"] = None  # `import isal` raises ImportError from here on
import gzip, json
import nibabel as nib, numpy as np
from ctclip_contract import files
import chest_phantom  # routes nibabel through the helper, as the pipeline does
path, written = sys.argv[1], sys.argv[2]
assert not files.HAVE_ISAL and nib.openers.ImageOpener.compress_ext_map[".gz"][0] is files.gzip_open
arr = np.asarray(nib.load(path).dataobj)
with gzip.open(path) as f:
    raw = f.read()
img = nib.Nifti1Image(arr, np.eye(4))
nib.save(img, written)  # the fallback writer: zlib
print(json.dumps({"sum": int(arr.astype(np.int64).sum()), "shape": list(arr.shape), "raw": len(raw),
                  "modules": sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "isal" and v is not None)}))
"""


def test_a_file_we_write_opens_without_isal(tmp_path):
    """A volume written with ISA-L opens with plain ``gzip`` and nibabel in a process where ``isal`` cannot be
    imported, and the helper's zlib fallback writes a file that the ISA-L side reads back."""
    vol = _ct_like()
    path = tmp_path / "ours.nii.gz"
    save_nifti_atomic(torch.from_numpy(vol)[None], np.eye(4), path)
    written = tmp_path / "fallback.nii.gz"
    out = subprocess.run([sys.executable, "-c", _WITHOUT_ISAL, str(path), str(written)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"sum": int(vol.astype(np.int64).sum()), "shape": list(vol.shape), "raw": len(_raw_bytes(path)),
                   "modules": []}
    assert np.array_equal(np.asarray(nib.load(str(written)).dataobj), vol)


@pytest.mark.parametrize("isal", [True, False], ids=["isal", "zlib"])
def test_the_truncated_gzip_check_still_fires(tmp_path, monkeypatch, isal):
    """``check_input`` (the header checks before any reader, ITK's included) rejects a cut or corrupted
    ``.nii.gz`` that we wrote, whichever inflater counts the bytes; the intact file passes."""
    if not isal:
        monkeypatch.setattr(files, "HAVE_ISAL", False)
    good = tmp_path / "good.nii.gz"  # over 1 MB compressed: reading the header inflates only the start
    save_nifti_atomic(torch.from_numpy(_ct_like((256, 256, 24)))[None], np.eye(4), good)
    assert check_input(good)["kind"] == "nifti"
    blob = good.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(QualityCheckError, match=r"truncated or corrupt gzip stream \(\d+ of \d+ bytes\)"):
        check_input(cut)
    corrupt = tmp_path / "corrupt.nii.gz"
    assert len(blob) > 1 << 20
    corrupt.write_bytes(blob[:-6000] + bytes(b ^ 0x5A for b in blob[-6000:-4000]) + blob[-4000:-4] + bytes(4))
    with pytest.raises(QualityCheckError, match=r"truncated or corrupt gzip stream"):
        check_input(corrupt)
