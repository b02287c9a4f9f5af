"""Patch-IB salience maps: token salience to voxels, back onto the stored volume's grid with its affine, the mass on
finding regions against their volume share, and the zero-shot bundle's salience option end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_nets.image_encoders import grid_positions
from transforms import ToModelInput
from workflows.salience import (radiological_view, salience_mass_on_findings, salience_on_model_grid,
                                to_stored_grid, write_salience_nifti)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "ct_clip_zeroshot" / "configs"


def test_token_salience_fills_its_patch_on_the_model_grid():
    shape = (16, 32, 32)
    positions = grid_positions((4, 4, 4), (4, 8, 8))  # CTViT-like: 4 x 8 x 8 voxels per token
    salience = torch.arange(64, dtype=torch.float32)
    vol = salience_on_model_grid(salience, positions, shape)
    assert vol.shape == shape
    d, h, w = 13, 17, 30
    assert vol[d, h, w] == salience[(d // 4 * 4 + h // 8) * 4 + w // 8]
    # one token per slice (slice fusion) fills its slice; an irregular layout goes to the nearest centre
    per_slice = salience_on_model_grid(torch.arange(16.0), torch.stack(
        [torch.arange(16.0) + 0.5, torch.full((16,), 16.0), torch.full((16,), 16.0)], 1), shape)
    assert bool((per_slice[5] == 5).all())
    scattered = torch.tensor([[2.0, 2.0, 2.0], [14.0, 30.0, 30.0]])
    near = salience_on_model_grid(torch.tensor([1.0, 2.0]), scattered, shape)
    assert near[0, 0, 0] == 1 and near[15, 31, 31] == 2


def test_salience_goes_back_onto_the_stored_grid_with_its_affine(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=(20, 24, 12)).astype(np.int16)
    affine = np.array([[-8.0, 0, 0, 80], [0, 0, 10.0, -60], [0, -6.0, 0, 40], [0, 0, 0, 1]])  # not RAS-ordered
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), path)
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage

    image = Compose([LoadImage(reader="NibabelReader", image_only=True), EnsureChannelFirst()])(str(path))
    model_input = ToModelInput(axis_codes="SLP")(image)
    assert model_input.shape[1:] != hu.shape  # really reoriented
    back = to_stored_grid(model_input[0].numpy(), "SLP", affine)
    np.testing.assert_allclose(back, hu / 1000.0, rtol=0, atol=1e-6)  # every voxel where it came from
    out = write_salience_nifti(tmp_path / "case_salience.nii.gz", back, affine)
    written = nib.load(out)
    np.testing.assert_array_equal(written.affine, affine)
    assert written.shape == hu.shape and written.get_data_dtype() == np.float32


def test_overlay_slices_are_shown_as_radiologists_read_them():
    """Anterior at the top and the patient's right on the image's left, whatever the model input's axis codes."""
    hu = np.full((20, 24, 12), -1000, dtype=np.int16)  # RAS: i runs to the right, j to anterior, k to superior
    hu[19, 23, 5] = 1000  # the patient's right, most anterior
    hu[0, 0, 5] = 500     # the patient's left, most posterior
    image = MetaTensor(torch.from_numpy(hu)[None], affine=torch.eye(4))
    for codes in ("SLP", "SRA", "SAL"):
        slice_ = ToModelInput(axis_codes=codes)(image)[0, 5].numpy()
        view = radiological_view(slice_, codes)
        assert view.shape == (24, 20)
        assert view[0, 0] == view.max() and view[-1, -1] == np.sort(view.ravel())[-2], codes
    with pytest.raises(ValueError, match="L/R and A/P"):
        radiological_view(np.zeros((3, 3)), "ASL")


def test_salience_mass_on_findings_against_the_chance_level():
    findings = np.zeros((10, 10, 10), dtype=np.int32)
    findings[:2] |= 1 << 3            # pathology 3 fills 20% of the volume
    findings[1:3, :5] |= 1 << 7       # pathology 7 overlaps it
    uniform = salience_mass_on_findings(np.ones(findings.shape), findings)
    assert uniform["volume_fraction"] == pytest.approx(0.25)
    assert uniform["mass_fraction"] == pytest.approx(0.25) and uniform["lift"] == pytest.approx(1.0)
    focused = np.zeros(findings.shape)
    focused[:2] = 1.0  # on pathology 3 only, a quarter of it on pathology 7
    res = salience_mass_on_findings(focused, findings)
    assert res["mass_fraction"] == 1.0 and res["lift"] == pytest.approx(4.0)
    from ctclip_contract import CTRATE_PATHOLOGIES

    assert set(res["per_class"]) == {CTRATE_PATHOLOGIES[3], CTRATE_PATHOLOGIES[7]}
    assert res["per_class"][CTRATE_PATHOLOGIES[7]]["mass_fraction"] == pytest.approx(0.25)
    empty = salience_mass_on_findings(focused, np.zeros_like(findings))
    assert empty["mass_fraction"] is None and empty["per_class"] == {}
    with pytest.raises(ValueError, match="one grid"):
        salience_mass_on_findings(focused, findings[:5])


def test_the_zeroshot_bundle_writes_salience_niftis_with_the_volumes_affine(tiny_preprocessed_dir,
                                                                            tiny_clip_checkpoint, tmp_path):
    from custom_nets.patch_ib import PatchIBHead

    from monai.bundle import run

    torch.manual_seed(0)
    head = PatchIBHead(32, 32)  # ctclip_tiny: token_dim 32, dim_latent 32
    torch.nn.init.normal_(head.salience.weight)
    heads = tmp_path / "heads.pt"
    torch.save({f"salience.{k}": v for k, v in head.state_dict().items()}, heads)
    out = tmp_path / "out"
    run(config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "salience.json")],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(CONFIGS.parent), dataset_dir=str(tiny_preprocessed_dir), split="test",
        output_dir=str(out), model_config="ctclip_tiny", pretrained=str(tiny_clip_checkpoint),
        heads_path=str(heads), num_workers=0, n_bootstrap=10)
    test = json.loads((tiny_preprocessed_dir / "datalist.json").read_text())["test"]
    summary = json.loads((out / "salience" / "salience_summary.json").read_text())
    assert summary["n_volumes"] == len(test) > 0
    for item in test:
        stored = nib.load(tiny_preprocessed_dir / item["image"])
        row = next(r for r in summary["volumes"] if r["name"] == item["name"])
        sal = nib.load(out / "salience" / row["nifti"])
        np.testing.assert_allclose(sal.affine, stored.affine, rtol=0, atol=1e-6)
        assert sal.shape == stored.shape[:3]
        values = np.asarray(sal.dataobj)
        assert 0 < values.min() and values.max() < 1 and values.std() > 0
        assert (out / "salience" / row["png"]).stat().st_size > 0
    assert (out / "predictions.csv").exists() or any(out.glob("**/predictions.csv"))
