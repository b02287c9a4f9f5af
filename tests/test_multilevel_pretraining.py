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


def _sentences_config(tmp_path, **text):
    raw = json.loads((ROOT / "ctclip_contract" / "configs" / "ctspecialised_tiny.json").read_text())
    raw["name"] = "ctspecialised_tiny_sentences"
    raw["text"].update(pooling="sentence_mean", max_sentences=4, max_length=16, **text)
    path = tmp_path / "ctspecialised_tiny_sentences.json"
    path.write_text(json.dumps(raw))
    return path


def _batch(tokenizer, reports, seg_fill=(True, True)):
    from custom_nets import image_input_shape

    ids, mask, mentions = [], [], []
    for text in reports:
        tok = TokenizeReportd(tokenizer=tokenizer, max_length=16, max_sentences=4)({"text": text})
        ids.append(tok["input_ids"]), mask.append(tok["attention_mask"])
        mentions.append(SentenceRegionsd(max_sentences=4)({"text": text})["sentence_regions"])
    shape = image_input_shape("ctspecialised_tiny")
    image = torch.rand((len(reports), *shape), generator=torch.Generator().manual_seed(0))
    seg = torch.zeros((len(reports), *shape), dtype=torch.uint8)
    for b, filled in enumerate(seg_fill):  # lungs in the top half of the depth, heart below, pleura at the back
        if filled:
            seg[b, :, :8, :, :16] = REGION_IDS["lung_lower_lobe_right"]
            seg[b, :, :8, :, 16:] = REGION_IDS["lung_lower_lobe_left"]
            seg[b, :, 8:, :16] = REGION_IDS["heart"]
            seg[b, :, 8:, 16:] = REGION_IDS["pleural_space"]
    return image, torch.stack(ids), torch.stack(mask), seg, torch.stack(mentions)


REPORTS = ["Atelectasis in the right lower lobe. The heart is enlarged. Pleural effusion.",
           "Nodule in the left lower lobe. Heart is normal."]


def test_the_three_levels_are_terms_of_the_pretraining_loss(tmp_path):
    import custom_nets as cn
    from custom_nets.losses import PretrainingLoss
    from custom_nets.pretraining import PretrainingNetwork

    config = _sentences_config(tmp_path)
    torch.manual_seed(0)
    model = cn.create_model(str(config))
    loss = PretrainingLoss(region_weight=1.0, sentence_weight=0.5, segmentation_weight=0.25)
    assert loss.needs() == {"regions", "sentences", "segmentation"}
    net = PretrainingNetwork(model, loss)
    assert {"regions", "sentence"} <= set(net.heads)
    image, ids, mask, seg, mentions = _batch(cn.build_tokenizer(str(config)), REPORTS)
    out = net(image, ids, mask, seg=seg, sentence_regions=mentions)
    assert out["region_latents"].shape == (2, len(ANATOMY_REGIONS), 32)
    assert out["sentence_latents"].shape == out["sentence_summaries"].shape == (2, 4, 32)
    assert out["sentence_mask"].tolist() == [[True, True, True, False], [True, True, False, False]]
    assert out["segmented"].tolist() == [True, True]
    total = loss(out)
    terms = loss.last_terms
    assert set(terms) == {"clip", "region", "sentence", "segmentation"} and all(v > 0 for v in terms.values())
    expected = terms["clip"] + terms["region"] + 0.5 * terms["sentence"] + 0.25 * terms["segmentation"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    total.backward()
    for name in ("heads.regions.weight", "heads.sentence.to_query.weight",
                 "model.visual_transformer.segmentation_head.weight", "model.visual_transformer.region_embedding.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    # the region term: only (volume, region) pairs with a mask region and a sentence; the right lower lobe of
    # volume 1 (no sentence) and the pleura of volume 2 (no sentence) are out, the left lower lobe of volume 1
    # (in the mask, no sentence) too
    valid = out["region_mask"] & (out["sentence_regions"] & out["sentence_mask"][..., None]).any(1)
    col = {name: REGION_IDS[name] - 1 for name in ANATOMY_REGIONS}
    assert valid[0].nonzero().flatten().tolist() == sorted([col["lung_lower_lobe_right"], col["heart"],
                                                            col["pleural_space"]])
    assert valid[1].nonzero().flatten().tolist() == sorted([col["lung_lower_lobe_left"], col["heart"]])

    # a volume without a mask (all background) leaves the region and segmentation terms
    image, ids, mask, seg, mentions = _batch(cn.build_tokenizer(str(config)), REPORTS, seg_fill=(True, False))
    out = net(image, ids, mask, seg=seg, sentence_regions=mentions)
    assert out["segmented"].tolist() == [True, False] and not out["region_mask"][1].any()
    assert torch.isfinite(loss(out))
    # a batch of volumes without masks: the region and segmentation terms are zero, not NaN
    out = net(image, ids, mask, seg=torch.zeros_like(seg), sentence_regions=mentions)
    loss(out)
    assert loss.last_terms["region"] == 0.0 and loss.last_terms["segmentation"] == 0.0


def test_the_levels_say_what_they_need(tmp_path):
    import custom_nets as cn
    from custom_nets.losses import PretrainingLoss
    from custom_nets.pretraining import PretrainingNetwork

    with pytest.raises(ValueError, match="reads anatomical masks"):
        PretrainingNetwork(cn.create_model("ctclip_tiny"), PretrainingLoss(region_weight=1.0))
    with pytest.raises(ValueError, match="text.pooling must be 'sentence_mean'"):
        PretrainingNetwork(cn.create_model("ctspecialised_tiny"), PretrainingLoss(sentence_weight=1.0))
    raw = json.loads(_sentences_config(tmp_path).read_text())
    raw["image_encoder"]["aux_segmentation"] = False
    (tmp_path / "noaux.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="aux_segmentation"):
        PretrainingNetwork(cn.create_model(str(tmp_path / "noaux.json")), PretrainingLoss(segmentation_weight=1.0))
    net = PretrainingNetwork(cn.create_model(str(_sentences_config(tmp_path))), PretrainingLoss(region_weight=1.0))
    image, ids, mask, seg, mentions = _batch(cn.build_tokenizer(str(_sentences_config(tmp_path))), REPORTS)
    with pytest.raises(ValueError, match="need the anatomical mask"):
        net(image, ids, mask, sentence_regions=mentions)
    with pytest.raises(ValueError, match="sentence_regions"):
        net(image, ids, mask, seg=seg)


def _env():
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def test_a_tiny_pretraining_with_all_three_levels_through_the_bundle(tiny_preprocessed_dir, tmp_path):
    """Acceptance of #23: masks from the preprocessed cohort reach the encoder, the three levels train beside the
    global term, each is logged on its own, and the heads are saved."""
    datalist = json.loads((tiny_preprocessed_dir / "datalist.json").read_text())
    assert all(item.get("seg") for item in datalist["training"][:4]), "the tiny cohort carries anatomical masks"
    config = _sentences_config(tmp_path)
    out = tmp_path / "run"
    files = f"['{TRAIN}','{BUNDLE / 'configs' / 'multilevel.json'}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file", files,
           "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(out), "--model_config", str(config),
           "--epochs", "1", "--num_workers", "0", "--progress", "False", "--batch_size", "2", "--val_batch_size", "4",
           "--max_train_items", "4", "--max_val_items", "4", "--cache", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "regions off" not in proc.stdout + proc.stderr  # every volume came with its mask
    row = json.loads((out / "eval" / "metrics_per_epoch.json").read_text())[0]
    for term in ("clip", "region", "sentence", "segmentation"):
        assert row[f"train_{term}"] > 0, row
    assert 0.0 <= row["macro_auroc"] <= 1.0
    heads = torch.load(out / "models" / "heads.pt", map_location="cpu", weights_only=True)
    assert "regions.weight" in heads and "sentence.to_query.weight" in heads

    # zero-shot evaluation of the trained model reads the masks too (the encoder was trained with its regions on)
    zs = ROOT / "bundles" / "ct_clip_zeroshot"
    files = f"['{zs / 'configs' / 'inference.json'}','{zs / 'configs' / 'evaluate.json'}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(zs), "--config_file", files,
           "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(tmp_path / "zeroshot"),
           "--model_config", str(config), "--pretrained", str(out / "models" / "model.pt"), "--num_workers", "0",
           "--batch_size", "2", "--n_bootstrap", "20"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "regions off" not in proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "zeroshot" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["auroc"]["macro"] is None or 0.0 <= metrics["auroc"]["macro"] <= 1.0


def test_an_encoder_without_masks_reads_none(tiny_preprocessed_dir, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(tiny_preprocessed_dir), "output_dir": str(tmp_path),
                   "model_config": "ctclip_tiny", "num_workers": 0, "cache": "none", "max_train_items": 2})
    assert parser.get_parsed_content("mask_keys") == []
    item = parser.get_parsed_content("train#dataset")[0]
    assert set(item) == {"image", "label", "name", "input_ids", "attention_mask"}
    parser.update({"model_config": "ctspecialised_tiny"})
    parser.parse()  # a fresh parse: the model and the transforms follow the config
    assert parser.get_parsed_content("mask_keys") == ["seg"]
    item = parser.get_parsed_content("train#dataset")[0]
    assert item["seg"].shape == item["image"].shape and item["seg"].dtype == torch.uint8
    assert int(item["seg"].max()) > 0 and "sentence_regions" not in item  # no region term: no pairing


def test_the_demo_pretrains_a_mask_reading_comparison_model_with_the_three_levels():
    from workflows import demo

    assert demo.multilevel_alignment_applies("ctspecialised_small")
    assert not demo.multilevel_alignment_applies("ctclip_small")  # reads no masks
    assert not demo.multilevel_alignment_applies("ctspecialised_tiny")  # reports are not split into sentences
    stages = {s.name: s for s in demo.demo_stages(Path("/tmp/demo"), 10, 0, "ctclip_small", 1, 1, 1, False, 0.0,
                                                 compare_model_config="ctspecialised_small")}
    assert stages["pretrain_ctspecialised_small"].config_files == ["train.json", "multilevel.json"]
    assert (BUNDLE / "configs" / "multilevel.json").is_file()
    assert stages["pretrain"].config_files == ["train.json"]
    stages = {s.name: s for s in demo.demo_stages(Path("/tmp/demo"), 10, 0, "ctclip_small", 1, 1, 1, False, 0.0,
                                                 compare_model_config="slicefusion_small")}
    assert stages["pretrain_slicefusion_small"].config_files == ["train.json"]
