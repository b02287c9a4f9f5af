"""Multi-level alignment in pretraining (#23 §3): the anatomical mask through the model-input transform, the
region-sentence pairing per report, the three terms in the pretraining loss, and a tiny run through the bundle."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from ctclip_contract.anatomy import ANATOMY_REGIONS, REGION_IDS
from transforms import SentenceRegionsd, ToModelInputd
from transforms.report_text import TokenizeReportd

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_clip_pretrain"
TRAIN = str(BUNDLE / "configs" / "train.json")


def _affine_lps() -> torch.Tensor:
    # stored in LPS (x to the left, y to the back): a reorientation to the model's codes must flip axes
    return torch.diag(torch.tensor([-2.0, -2.0, 3.0, 1.0], dtype=torch.float64))


def test_the_mask_takes_the_images_reorientation_and_keeps_its_ids(caplog):
    ids = torch.randint(0, len(ANATOMY_REGIONS) + 1, (1, 6, 5, 4))
    image = MetaTensor(ids.float() * 10 - 500, affine=_affine_lps())  # HU that encode the id of each voxel
    seg = MetaTensor(ids.to(torch.uint8), affine=_affine_lps())
    t = ToModelInputd("image", axis_codes="SLP", mask_keys="seg")
    out = t({"image": image, "seg": seg, "name": "v1"})
    assert out["seg"].dtype == torch.uint8 and out["seg"].shape == out["image"].shape == (1, 4, 6, 5)
    # the same voxels land in the same places: the image (window not reached) still encodes the ids
    torch.testing.assert_close((out["image"].as_tensor() * 1000 + 500) / 10, out["seg"].float())
    # a float map (a reader's default dtype) is rounded, not truncated
    out_f = t({"image": image, "seg": MetaTensor(ids.float() - 0.2, affine=_affine_lps()), "name": "v1"})
    torch.testing.assert_close(out_f["seg"], out["seg"])
    # a volume without a mask gets an all-background map (regions off for it), said once
    with caplog.at_level(logging.WARNING, logger="transforms.model_input"):
        missing = t({"image": image, "name": "v2"})
        t({"image": image, "seg": None, "name": "v3"})
    assert missing["seg"].shape == (1, 4, 6, 5) and int(missing["seg"].max()) == 0
    assert sum("no 'seg' mask" in r.getMessage() for r in caplog.records) == 1
    # a mask on another grid is refused, naming the volume
    with pytest.raises(ValueError, match="v4: mask 'seg' .* not on the volume's grid"):
        t({"image": image, "seg": MetaTensor(ids[:, :5].to(torch.uint8), affine=_affine_lps()), "name": "v4"})
    shifted = _affine_lps().clone()
    shifted[0, 3] = 10.0
    with pytest.raises(ValueError, match="not on the volume's grid"):
        t({"image": image, "seg": MetaTensor(ids.to(torch.uint8), affine=shifted), "name": "v5"})
    # without mask_keys nothing but the image is touched
    assert "seg" not in ToModelInputd("image")({"image": image})


def test_sentence_regions_follow_the_tokenized_sentence_rows():
    from custom_nets import build_tokenizer

    text = ("Pleural effusion in the right lung. The heart is enlarged. Findings within normal limits. "
            "Atelectasis in the left lower lobe. Aorta is normal.")
    tok = TokenizeReportd(tokenizer=build_tokenizer("ctclip_tiny"), max_length=16, max_sentences=4)({"text": text})
    out = SentenceRegionsd(max_sentences=4)({"text": text})["sentence_regions"]
    assert out.shape == (4, len(ANATOMY_REGIONS)) and out.dtype == torch.bool
    rows = (tok["attention_mask"].sum(-1) > 0).tolist()
    assert rows == [True] * 4  # the fifth sentence is dropped by both
    col = {name: REGION_IDS[name] - 1 for name in ANATOMY_REGIONS}
    assert out[0, col["pleural_space"]] and out[0, col["lung_lower_lobe_right"]]
    assert out[1].nonzero().flatten().tolist() == [col["heart"]]
    assert not out[2].any()  # names no region
    assert out[3].nonzero().flatten().tolist() == [col["lung_lower_lobe_left"]]
    short = SentenceRegionsd(max_sentences=4)({"text": "Heart is normal."})["sentence_regions"]
    assert short[0, col["heart"]] and not short[1:].any()  # padding rows are all False
    with pytest.raises(ValueError, match="text.pooling must be 'sentence_mean'"):
        SentenceRegionsd.from_model_config("ctspecialised_tiny")
    assert SentenceRegionsd.from_model_config("ctspecialised_small").max_sentences == 16
