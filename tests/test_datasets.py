"""workflows.datasets.make_dataset's disk cache: memory-mapped hits, the cache key, a damaged file recomputed."""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Lambdad

from workflows.datasets import MappedPersistentDataset, make_dataset


def _counting_load(calls: list, scale: int = 1):
    def load(name):
        calls.append(name)
        return MetaTensor(torch.arange(4 * 5 * 6, dtype=torch.int16).reshape(1, 4, 5, 6) * scale,
                          meta={"filename_or_obj": name})
    return Compose([Lambdad("image", load)])


def test_disk_cache_hits_are_mapped_and_equal(tmp_path):
    calls = []
    data = [{"image": "a.nii.gz", "name": "a"}, {"image": "b.nii.gz", "name": "b"}]
    ds = make_dataset(data, _counting_load(calls), cache="disk", cache_dir=tmp_path, cache_key=["ctclip_tiny", True])
    assert isinstance(ds, MappedPersistentDataset)
    first = [ds[i] for i in range(2)]
    assert calls == ["a.nii.gz", "b.nii.gz"] and len(list(tmp_path.glob("*.pt"))) == 2
    again = [ds[i] for i in range(2)]
    assert calls == ["a.nii.gz", "b.nii.gz"], "a hit runs no transform"
    for x, y in zip(first, again):
        assert torch.equal(torch.as_tensor(x["image"]), y["image"]) and y["image"].dtype == torch.int16


def test_cache_key_keeps_settings_apart(tmp_path):
    data = [{"image": "a.nii.gz", "name": "a"}]
    calls = []
    old = make_dataset(data, _counting_load(calls), cache="disk", cache_dir=tmp_path, cache_key={"window": False})[0]
    new = make_dataset(data, _counting_load(calls, scale=2), cache="disk", cache_dir=tmp_path,
                       cache_key={"window": True})[0]
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2, "other settings: computed, not read back"
    assert torch.equal(torch.as_tensor(new["image"]), 2 * torch.as_tensor(old["image"]))


def test_damaged_cache_file_is_recomputed(tmp_path):
    calls = []
    data = [{"image": "a.nii.gz", "name": "a"}]
    ds = make_dataset(data, _counting_load(calls), cache="disk", cache_dir=tmp_path)
    want = torch.as_tensor(ds[0]["image"]).clone()
    (f,) = tmp_path.glob("*.pt")
    f.write_bytes(f.read_bytes()[:100])  # a kill mid-copy, a full disk at the time
    assert torch.equal(torch.as_tensor(ds[0]["image"]), want) and len(calls) == 2
    assert torch.equal(ds[0]["image"], want) and len(calls) == 2, "written again: the next read is a hit"
