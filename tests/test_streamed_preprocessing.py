"""``StreamedPreprocessing``: the resampling follows the read of a NIfTI volume plane by plane, and its result,
provenance and errors are the chain's own (``process(load(data))``), bit for bit."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from ctclip_contract.errors import root_cause
from transforms.hu import HUDecisionError
from transforms.preprocessing import StreamedPreprocessing, build_preprocessing

SHAPE = (96, 80, 60)  # (i, j, k) as stored
SPACING = (0.8, 0.8, 1.25)


def _phantom(seed: int = 0) -> np.ndarray:
    """HU: air with noise (some voxels below the -1024 floor), a body, two lungs, a bone."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n) - n / 2 for n in SHAPE), indexing="ij")
    vol = np.full(SHAPE, -1000.0)
    vol[(i / 40) ** 2 + (j / 30) ** 2 <= 1] = 40.0
    for c in (-18, 18):
        vol[((i - c) / 14) ** 2 + (j / 20) ** 2 + (k / 40) ** 2 <= 1] = -850.0
    vol[(i / 5) ** 2 + ((j - 22) / 5) ** 2 <= 1] = 700.0
    return np.round(vol + rng.normal(0, 15, SHAPE)).astype(np.int16)


def _write(path, data: np.ndarray, flipped: bool = False) -> str:
    affine = np.diag([*SPACING, 1.0])
    if flipped:  # LPS-like: i and j run right-to-left and front-to-back, the slices from head to feet
        data = data[::-1, ::-1, ::-1]
        affine = np.diag([-SPACING[0], -SPACING[1], -SPACING[2], 1.0])
        affine[:3, 3] = [(n - 1) * s for n, s in zip(SHAPE, SPACING)]
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


@pytest.fixture(scope="module")
def chains():
    return build_preprocessing((1.5, 1.5, 2.0), (48, 48, 32), -1000.0, "auto", {})


def _streamed(chains, monkeypatch, **kwargs):
    """A StreamedPreprocessing with small chunks (many hand-overs) and a record of its resampling calls."""
    sp = StreamedPreprocessing(*chains, min_planes=8, chunk_bytes=SHAPE[0] * SHAPE[1] * 2 * 5 + 6, **kwargs)
    calls = []
    resampler = sp.resample.resampler
    original = resampler.resample

    def resample(img, plan, value_map=None, planes_ready=None, threads=None):
        calls.append({"value_map": value_map, "streamed": planes_ready is not None})
        return original(img, plan, value_map, planes_ready, threads)

    monkeypatch.setattr(resampler, "resample", resample)
    return sp, calls


def _inputs(path, slope=None, intercept=None):
    return {"image": path, "name": "case", "rescale_slope": slope, "rescale_intercept": intercept,
            "pixel_padding": None}


def _assert_same(a: dict, b: dict) -> None:
    assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
    assert a["image"].dtype == b["image"].dtype == torch.int16
    assert torch.equal(a["image"].affine, b["image"].affine)
    assert a["hu_provenance"] == b["hu_provenance"]
    assert set(a["image"].meta) == set(b["image"].meta)
    assert a["image"].meta["hu_provenance"] == b["image"].meta["hu_provenance"]
    assert set(a) == set(b)


@pytest.mark.parametrize("case, offset, slope, intercept, decision", [
    ("RAS, HU stored", 0, None, None, "header"),
    ("LPS, slices head to feet", 0, None, None, "header"),
    ("raw values (HU + 1024)", 1024, None, None, "raw_offset_1024"),
    ("raw values with a CT-RATE metadata row", 1024, 1.0, -1024.0, "metadata"),
])
def test_the_streamed_result_is_the_chains_own(chains, tmp_path, monkeypatch, case, offset, slope, intercept,
                                               decision):
    path = _write(tmp_path / "v.nii.gz", (_phantom().astype(np.int32) + offset).astype(np.int16),
                  flipped=case.startswith("LPS"))
    load, process = chains
    expected = process(load(_inputs(path, slope, intercept)))
    sp, calls = _streamed(chains, monkeypatch)
    got = sp(_inputs(path, slope, intercept))
    _assert_same(got, expected)
    assert got["hu_provenance"]["decision"] == decision
    assert got["hu_provenance"]["floored_fraction"] > 0  # the air noise below -1024 HU was floored, both ways
    # one resampling, fed plane by plane while the file was read, mapping the stored values itself
    assert calls == [{"value_map": (1.0, -float(offset), -1024.0), "streamed": True}]


def test_a_wrong_guess_is_dropped_and_the_chain_resamples(chains, tmp_path, monkeypatch):
    """The mapping guessed from the first planes is checked on the whole volume's sample; when the two differ the
    streamed resampling is called off and the chain's own runs."""
    path = _write(tmp_path / "v.nii.gz", _phantom())
    load, process = chains
    expected = process(load(_inputs(path)))
    sp, calls = _streamed(chains, monkeypatch)
    to_hu = sp.to_hu.rescaler
    decide, seen = to_hu.decide, []

    def wrong_first(sample, *args, **kwargs):
        seen.append(sample.size)
        chosen, evidence = decide(sample, *args, **kwargs)
        return (("raw_offset_1024", 1.0, -1024.0), evidence) if len(seen) == 1 else (chosen, evidence)

    monkeypatch.setattr(to_hu, "decide", wrong_first)
    got = sp(_inputs(path))
    _assert_same(got, expected)
    assert calls[0] == {"value_map": (1.0, -1024.0, -1024.0), "streamed": True}
    assert calls[-1] == {"value_map": None, "streamed": False} and len(calls) == 2


def _error_of(fn) -> BaseException:
    """The innermost error ``fn()`` raised (MONAI's Compose wraps what a transform raises in a RuntimeError)."""
    with pytest.raises(Exception) as info:
        fn()
    return root_cause(info.value)


def test_a_volume_that_is_not_ct_fails_as_in_the_chain(chains, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    path = _write(tmp_path / "mr.nii.gz", rng.integers(0, 1800, SHAPE).astype(np.int16))
    load, process = chains
    chain_error = _error_of(lambda: process(load(_inputs(path))))
    sp, _ = _streamed(chains, monkeypatch)
    streamed_error = _error_of(lambda: sp(_inputs(path)))
    assert isinstance(streamed_error, HUDecisionError) and isinstance(chain_error, HUDecisionError)
    assert str(streamed_error) == str(chain_error)


def test_a_truncated_file_stops_the_streamed_resampling(chains, tmp_path, monkeypatch):
    path = tmp_path / "cut.nii.gz"
    _write(path, _phantom())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    load, process = chains
    chain_error = _error_of(lambda: process(load(_inputs(str(path)))))
    sp, calls = _streamed(chains, monkeypatch)
    streamed_error = _error_of(lambda: sp(_inputs(str(path))))
    assert type(streamed_error) is type(chain_error) and str(streamed_error) == str(chain_error)
    assert calls and calls[0]["streamed"]  # it had started, and the read's error ended it (no hang)


def test_what_is_not_streamed_runs_the_chain(chains, tmp_path, monkeypatch):
    """Scaled stored values (the reader rescales them after the read), ``stream=False`` and a volume of fewer than
    ``min_chunks`` chunks take the chain as is."""
    data = _phantom()
    img = nib.Nifti1Image(data, np.diag([*SPACING, 1.0]))
    img.header.set_slope_inter(1.0, -1.0)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    load, process = chains
    plain = _write(tmp_path / "v.nii.gz", data)
    for path, stream, kwargs in ((str(tmp_path / "scaled.nii.gz"), True, {}), (plain, False, {}),
                                 (plain, True, {"min_chunks": data.nbytes // (SHAPE[0] * SHAPE[1] * 2 * 5) + 2})):
        expected = process(load(_inputs(path)))
        with monkeypatch.context() as patch:
            sp, calls = _streamed(chains, patch, **kwargs)
            _assert_same(sp(_inputs(path), stream=stream), expected)
        assert calls == [{"value_map": None, "streamed": False}]
