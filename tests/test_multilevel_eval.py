"""Region alignment accuracy and localisation of the multi-level alignment (#23 §4): the pointing game and the region
ranking on hand-built cases, the sentences that count, the bootstrap, the heads file, and one run of the zero-shot
bundle's configs/multilevel_eval.json on the tiny cohort (random weights: the mechanics, not the scores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctclip_contract import CTRATE_PATHOLOGIES
from ctclip_contract.anatomy import REGION_IDS, finding_bit
from ctclip_contract.anatomy_lexicon import sentence_regions
from custom_nets.image_encoders import grid_positions
from workflows.multilevel_eval import (bootstrap_rate, load_multilevel_heads, pointing_game, region_ranks,
                                       single_region_sentences, token_cells)

ROOT = Path(__file__).resolve().parents[1]
ZEROSHOT = ROOT / "bundles" / "ct_clip_zeroshot"


def _cells():
    """A 2 x 2 x 2 token grid of 2 x 2 x 2-voxel patches over a 4 x 4 x 4 model input."""
    positions = grid_positions((2, 2, 2), (2.0, 2.0, 2.0))
    return positions, token_cells(positions, (4, 4, 4))


def test_token_cells_are_the_patches():
    positions, cells = _cells()
    assert cells.shape == (4, 4, 4) and sorted(np.unique(cells)) == list(range(8))
    assert (cells[:2, :2, :2] == 0).all() and (cells[2:, 2:, 2:] == 7).all() and (cells[:2, :2, 2:] == 1).all()


def test_the_pointing_game_hits_inside_the_mask_and_misses_outside():
    _, cells = _cells()
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[3, 3, 3] = True  # one voxel in the last patch (token 7)
    inside = torch.full((8,), 0.1).index_fill_(0, torch.tensor([7]), 0.3)
    outside = torch.full((8,), 0.1).index_fill_(0, torch.tensor([0]), 0.3)
    hit, miss = pointing_game(inside, cells, mask), pointing_game(outside, cells, mask)
    assert hit["hit"] and hit["peak_token"] == 7
    assert not miss["hit"] and miss["peak_token"] == 0
    assert hit["chance"] == pytest.approx(1 / 8) and hit["chance_voxels"] == pytest.approx(1 / 64)
    # a patch that holds one voxel of the mask is a hit: the half-patch tolerance
    mask[1, 1, 2] = True  # the corner of token 1's patch
    peak_on_1 = torch.full((8,), 0.1).index_fill_(0, torch.tensor([1]), 0.3)
    game = pointing_game(peak_on_1, cells, mask)
    assert game["hit"] and game["chance"] == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match="empty"):
        pointing_game(inside, cells, np.zeros((4, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="not on one grid"):
        pointing_game(inside, cells, np.ones((4, 4, 2), dtype=bool))


def test_region_ranking_uses_only_the_regions_present():
    r = len(REGION_IDS)
    regions = torch.zeros(r, 4)
    regions[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # the best match of the sentence
    regions[1] = torch.tensor([0.8, 0.6, 0.0, 0.0])  # the sentence's own region, second best
    regions[2] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    regions = F.normalize(regions + 1e-6, dim=-1)
    sentence = F.normalize(torch.tensor([[1.0, 0.1, 0.0, 0.0]]), dim=-1)
    target = torch.tensor([1])
    present = torch.zeros(r, dtype=torch.bool)
    present[[0, 1, 2]] = True
    assert region_ranks(sentence, regions, present, target).tolist() == [2]
    present[0] = False  # the better region is not in this volume's mask: no candidate
    assert region_ranks(sentence, regions, present, target).tolist() == [1]
    tie = regions.clone()
    tie[2] = tie[1]
    present[2] = True
    assert region_ranks(sentence, tie, present, target).tolist() == [2]  # a tie is not a hit
    present[1] = False
    with pytest.raises(ValueError, match="present"):
        region_ranks(sentence, regions, present, target)


def test_only_sentences_naming_one_region_count():
    text = ("Enlarged mediastinal lymph nodes. Pacemaker. Findings within normal limits.\n"
            "Atelectasis in the right lower lobe. Passive atelectasis secondary to the pleural effusion is observed "
            "in the right lower lobe.")
    got = single_region_sentences(text)
    assert got == [("Enlarged mediastinal lymph nodes.", "mediastinum"),
                   ("Atelectasis in the right lower lobe.", "lung_lower_lobe_right")]
    assert len(sentence_regions("Pacemaker.")) == 2  # heart and body wall: left out


def test_bootstrap_rate_pooled_and_macro():
    hits, counts = np.array([1, 0, 2, 1]), np.array([1, 1, 2, 2])
    rate, low, high = bootstrap_rate(hits, counts, n_bootstrap=200)
    assert rate == pytest.approx(4 / 6) and low <= rate <= high and 0.0 <= low and high <= 1.0
    # two classes: class 0 always hit (1/1 per volume), class 1 in half the volumes that have it
    h = np.array([[1, 1], [1, 0], [1, 0], [0, 0]])
    c = np.array([[1, 1], [1, 1], [1, 0], [0, 0]])
    macro, lo, hi = bootstrap_rate(h, c, n_bootstrap=200, macro=True)
    assert macro == pytest.approx((3 / 3 + 1 / 2) / 2) and lo <= macro <= hi
    assert bootstrap_rate(h, c, n_bootstrap=200)[0] == pytest.approx(4 / 5)  # pooled
    assert np.isnan(bootstrap_rate(np.zeros(3), np.zeros(3))[0])


def _sentences_config(tmp_path):
    raw = json.loads((ROOT / "ctclip_contract" / "configs" / "ctspecialised_tiny.json").read_text())
    raw["name"] = "ctspecialised_tiny_sentences"
    raw["text"].update(pooling="sentence_mean", max_sentences=4, max_length=16)
    path = tmp_path / "ctspecialised_tiny_sentences.json"
    path.write_text(json.dumps(raw))
    return path


def _pretrained(tmp_path):
    """A random CT-CLIP with the region and sentence heads, saved as a pretraining run saves them."""
    import custom_nets as cn
    from custom_nets.losses import PretrainingLoss
    from custom_nets.pretraining import PretrainingNetwork

    config = _sentences_config(tmp_path)
    torch.manual_seed(0)
    model = cn.create_model(str(config))
    net = PretrainingNetwork(model, PretrainingLoss(region_weight=1.0, sentence_weight=1.0))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(net.heads.state_dict(), tmp_path / "heads.pt")
    return config, model, net


def test_the_heads_file_says_what_is_missing(tmp_path):
    _, model, net = _pretrained(tmp_path)
    heads = load_multilevel_heads(tmp_path / "heads.pt", model)
    torch.testing.assert_close(heads["regions"].weight, net.heads["regions"].weight)
    with pytest.raises(FileNotFoundError, match="no heads file"):
        load_multilevel_heads(tmp_path / "none.pt", model)
    torch.save({"salience.score.weight": torch.zeros(1)}, tmp_path / "patch_ib.pt")
    with pytest.raises(ValueError, match="patch_ib.pt: holds no multi-level heads"):
        load_multilevel_heads(tmp_path / "patch_ib.pt", model)


def _expected_counts(dataset_dir: Path):
    """From the stored files alone: the single-region sentences whose region is in the volume's seg, and the
    positive findings with voxels in the finding mask (the model-input reorientation keeps both counts)."""
    from transforms import ReportTextd

    items = json.loads((dataset_dir / "datalist.json").read_text())["test"]
    text = ReportTextd(("findings", "impressions"))
    sentences = findings = 0
    for item in items:
        ids = set(np.unique(np.asarray(nib.load(dataset_dir / item["seg"]).dataobj)).tolist())
        bits = np.asarray(nib.load(dataset_dir / item["findings_mask"]).dataobj).astype(np.int64)
        sentences += sum(REGION_IDS[r] in ids for _, r in single_region_sentences(text(item)["text"]))
        findings += sum(bool(label) and bool((bits & finding_bit(name)).any())
                        for name, label in zip(CTRATE_PATHOLOGIES, item["label"]))
    return len(items), sentences, findings


def test_the_evaluation_through_the_zeroshot_bundle_on_the_tiny_cohort(tiny_preprocessed_dir, tmp_path):
    config, _, _ = _pretrained(tmp_path)
    out = tmp_path / "zeroshot"
    files = f"['{ZEROSHOT / 'configs' / 'inference.json'}','{ZEROSHOT / 'configs' / 'multilevel_eval.json'}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(ZEROSHOT), "--config_file", files,
           "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(out), "--model_config", str(config),
           "--pretrained", str(tmp_path / "model.pt"), "--heads_path", str(tmp_path / "heads.pt"),
           "--num_workers", "0", "--batch_size", "2", "--n_bootstrap", "50", "--multilevel_png_cases", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "regions off" not in proc.stdout + proc.stderr  # every test volume came with its mask
    metrics = json.loads((out / "eval" / "multilevel" / "metrics.json").read_text())
    n_volumes, n_sentences, n_findings = _expected_counts(tiny_preprocessed_dir)
    assert metrics["n_volumes"] == metrics["n_volumes_with_mask"] == n_volumes

    region = metrics["region_alignment"]
    assert region["n_sentences"] == n_sentences > 0
    ranks = [s for v in metrics["volumes"] for s in v["sentences"]]
    assert region["accuracy"] == pytest.approx(np.mean([s["rank"] == 1 for s in ranks]))
    assert all(1 <= s["rank"] <= s["n_regions"] <= len(REGION_IDS) for s in ranks)
    assert region["chance"] == pytest.approx(np.mean([1 / s["n_regions"] for s in ranks]))
    assert region["ci_low"] <= region["accuracy"] <= region["ci_high"]
    assert all(len(sentence_regions(s["sentence"])) == 1 for s in ranks)

    loc = metrics["localisation"]
    assert loc["n_findings"] == n_findings > 0
    assert loc["prompt_template"] == "{} is present."  # the model config's zero-shot positive prompt
    for name, row in loc["per_class"].items():
        assert 0.0 <= row["hit_rate"] <= 1.0 and 0.0 < row["chance"] <= 1.0 and row["n"] >= 1, name
        assert 0.0 < row["chance_voxels"] <= row["chance"]  # a patch holding one voxel counts whole
    assert loc["ci_low"] <= loc["hit_rate_macro"] <= loc["ci_high"]
    assert loc["chance_macro"] == pytest.approx(np.mean([r["chance"] for r in loc["per_class"].values()]))

    assert len(metrics["figures"]) == 2
    for name in metrics["figures"]:
        png = out / "eval" / "multilevel" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "eval" / "test").exists()  # no zero-shot scores: evaluate.json writes those


def test_the_demo_evaluates_and_tabulates_a_model_pretrained_with_the_three_levels(tmp_path):
    from workflows import demo

    names = [s.name for s in demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, False, 0.0,
                                              compare_model_config="ctspecialised_small")]
    assert names[-2:] == ["zeroshot_evaluate_ctspecialised_small", "multilevel_evaluate_ctspecialised_small"]
    stage = demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, False, 0.0,
                             compare_model_config="ctspecialised_small")[-1]
    assert stage.config_files == ["inference.json", "multilevel_eval.json"]
    second = tmp_path / "compare" / "ctspecialised_small"
    assert stage.overrides["heads_path"] == str(second / "pretrain" / "models" / "heads.pt")
    assert stage.overrides["output_dir"] == str(second / "zeroshot")  # beside its zero-shot scores
    assert not any(s.name.startswith("multilevel_evaluate") for s in demo.demo_stages(
        tmp_path, 10, 0, "ctclip_small", 1, 1, 1, False, 0.0, compare_model_config="slicefusion_small"))

    # the table: the comparison model's row carries both scores with their chance levels, the others a dash
    zeroshot = {"auroc": {"macro": 0.61, "macro_ci_low": 0.55, "macro_ci_high": 0.67}}
    levels = {"region_alignment": {"accuracy": 0.6, "ci_low": 0.5, "ci_high": 0.7, "chance": 0.1, "n_sentences": 12},
              "localisation": {"hit_rate_macro": 0.25, "ci_low": 0.125, "ci_high": 0.375, "chance_macro": 0.2,
                               "n_findings": 8},
              "figures": ["v1_lung_nodule_attention.png"]}
    for rel, obj in (("zeroshot/eval/test/metrics.json", zeroshot),
                     ("compare/ctspecialised_small/zeroshot/eval/test/metrics.json", zeroshot),
                     ("compare/ctspecialised_small/zeroshot/eval/multilevel/metrics.json", levels)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(obj))
    (tmp_path / "compare/ctspecialised_small/zeroshot/eval/multilevel/v1_lung_nodule_attention.png").write_bytes(b"")
    results = demo.collect_results(tmp_path)
    table = demo.summary_table(results).splitlines()
    assert "region alignment accuracy" in table[0] and "pointing game" in table[0]
    assert table[0].count("|") == table[1].count("|")
    compare = next(line for line in table if line.startswith("| Zero-shot, ctspecialised_small"))
    assert "0.600 [0.500, 0.700] (chance 0.100, 12 sentences)" in compare
    assert "0.250 [0.125, 0.375] (chance 0.200, 8 findings)" in compare
    plain = next(line for line in table if line.startswith("| Zero-shot |"))
    assert plain.count("|") == compare.count("|") and plain.rstrip(" |").endswith("–")
    report = demo.write_report(tmp_path, results, []).read_text()
    assert "compare/ctspecialised_small/zeroshot/eval/multilevel/v1_lung_nodule_attention.png" in report
    # without a multi-level model the table is as before
    assert "pointing game" not in demo.summary_table({"zeroshot_test": zeroshot})


def test_token_cells_match_the_patches_the_encoder_pools_the_mask_over():
    """The voxels the pointing game gives each token are the ones the encoder read for it: the region fractions
    of each token's cells equal the encoder's own patch_regions (a wrong axis order or flip would not)."""
    import custom_nets as cn

    torch.manual_seed(0)
    model = cn.create_model("ctspecialised_tiny").eval()
    shape = cn.image_input_shape("ctspecialised_tiny")  # (1, D, H, W)
    seg = torch.randint(0, len(REGION_IDS) + 1, (1, *shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        encoding = model.image_encoding(torch.rand(1, *shape), seg.to(torch.uint8))
    cells = token_cells(encoding.positions, shape[1:])
    ids = seg[0, 0].numpy()
    n = encoding.positions.shape[0]
    fractions = np.stack([np.bincount(ids[cells == t], minlength=len(REGION_IDS) + 1) for t in range(n)]).astype(float)
    fractions /= fractions.sum(1, keepdims=True)
    np.testing.assert_allclose(fractions, encoding.patch_regions[0].numpy(), atol=1e-6)
