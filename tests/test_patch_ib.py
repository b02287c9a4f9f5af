"""Patch-IB: the salience mask, L_sparse, the soft and hard top-K, local alignment (padding and stop words left out,
reports as sentences), on the registered encoders that give tokens; the presets A-E through the pretraining bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import custom_nets as cn
from custom_nets.losses import PretrainingLoss
from custom_nets.patch_ib import (LocalAlignmentHead, PatchIBHead, keep_count, local_skip_token_ids,
                                  soft_topk_weights)
from custom_nets.pretraining import PretrainingNetwork

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_clip_pretrain"
TRAIN = BUNDLE / "configs" / "train.json"


def _reports(tokenizer, texts, length=16):
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("config", ["ctclip_tiny", "slicefusion_tiny"])
def test_mask_is_in_0_1_with_one_value_per_token(config):
    torch.manual_seed(0)
    model = cn.create_model(config)
    x = torch.randn(2, 1, 16, 32, 32)
    tokens = model.image_encoding(x).tokens
    head = PatchIBHead(model.visual_transformer.token_dim, model.dim_latent)
    with torch.no_grad():  # w such that tokens 0 and 1 of volume 0 differ by 4 in logit
        d = tokens[0, 0] - tokens[0, 1]
        head.salience.weight.copy_(4 * d / d.dot(d))
        head.salience.bias.fill_(-float(head.salience.weight[0].dot(tokens[0, 0] + tokens[0, 1])) / 2)
        latent, sel = head(tokens)
    assert sel.salience.shape == tokens.shape[:2]
    assert bool((sel.salience > 0).all() and (sel.salience < 1).all())
    assert float(sel.salience[0, 0] - sel.salience[0, 1]) > 0.7, "the mask depends on the token"
    assert latent.shape == (2, model.dim_latent)
    torch.testing.assert_close(latent.norm(dim=-1), torch.ones(2))


def test_sparse_loss_moves_the_keep_ratio_to_its_target():
    torch.manual_seed(0)
    model = cn.create_model("ctclip_tiny")
    tokenizer = cn.build_tokenizer("ctclip_tiny")
    loss = PretrainingLoss(clip_weight=1.0, sparse_weight=1.0, keep_ratio=0.1)
    net = PretrainingNetwork(model, loss)
    head = net.heads["salience"].salience
    assert float(torch.sigmoid(head.bias)) == pytest.approx(0.1), "a new mask starts at its target"
    with torch.no_grad():
        head.bias.zero_()  # a mask away from its target (0.5), as after other terms moved it
    opt = torch.optim.Adam(net.heads.parameters(), lr=0.1)  # the mask alone learns: the ratio moves by L_sparse
    x = torch.randn(2, 1, 16, 32, 32)
    ids, mask = _reports(tokenizer, ["a nodule in the left lung.", "no pleural effusion."])
    ratios = []
    for _ in range(10):
        out = net(x, ids, mask)
        ratios.append(float(out["salience"].detach().mean()))
        opt.zero_grad()
        loss(out).backward()
        opt.step()
    assert abs(ratios[0] - 0.5) < 1e-6, "the mask starts at 0.5"
    assert abs(ratios[-1] - 0.1) < abs(ratios[0] - 0.1) / 2, ratios
    assert all(b < a for a, b in zip(ratios, ratios[1:])), ratios
    assert loss.last_terms["kept_ratio"] == pytest.approx(ratios[-1], abs=1e-6)


def test_l1_mode_pushes_the_mask_down():
    from custom_nets.patch_ib import sparsity_loss

    z = torch.full((2, 8), 0.5, requires_grad=True)
    sparsity_loss(z, "l1").backward()
    assert bool((z.grad > 0).all())
    with pytest.raises(ValueError, match="sparse_mode"):
        sparsity_loss(z, "l2")


def test_hard_drop_keeps_exactly_k_tokens_and_equals_the_soft_path_when_k_is_n():
    torch.manual_seed(0)
    tokens = torch.randn(3, 20, 8)
    head = PatchIBHead(8, 6, selection="hard_topk", topk_ratio=0.25)
    torch.nn.init.normal_(head.salience.weight)
    latent, sel = head(tokens)
    k = keep_count(20, 0.25)
    assert k == 5 and sel.tokens.shape == (3, 5, 8) and sel.index.shape == (3, 5)
    assert float(sel.kept_ratio) == 0.25
    # the kept ones are the most salient
    logits = head.salience(tokens).squeeze(-1)
    for b in range(3):
        assert set(sel.index[b].tolist()) == set(logits[b].topk(5).indices.tolist())
    # K = N: the hard drop keeps every token and gives the soft path's embedding (plain mask, soft top-K)
    head.topk_ratio = 1.0
    full_hard, sel_hard = head(tokens, "hard_topk")
    assert sel_hard.tokens.shape == tokens.shape
    torch.testing.assert_close(full_hard, head(tokens, "none")[0])
    torch.testing.assert_close(full_hard, head(tokens, "soft_topk")[0])
    # and with K < N the drop changes the embedding
    assert not torch.allclose(latent, full_hard)


def test_soft_topk_is_a_relaxation_with_gradients_to_every_token():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]], requires_grad=True)
    w = soft_topk_weights(logits, 2, temperature=0.01)
    torch.testing.assert_close(w.detach(), torch.tensor([[1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    w = soft_topk_weights(logits, 2, temperature=1.0)
    assert bool((w > 0).all() and (w < 1).all())
    w.sum().backward()
    assert bool((logits.grad != 0).all())
    assert bool((soft_topk_weights(logits, 4, 0.1) == 1).all())


def test_local_alignment_ignores_padding_and_stop_words():
    torch.manual_seed(0)
    head = LocalAlignmentHead(token_dim=8, dim_latent=6)
    image = torch.randn(2, 10, 8)
    words = torch.nn.functional.normalize(torch.randn(2, 5, 6), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    scores = head(image, words, mask)
    assert scores.shape == (2, 2)
    # whatever sits in the masked places (padding, stop words) changes nothing
    noisy = words.clone()
    noisy[0, 3:] = torch.nn.functional.normalize(torch.randn(2, 6), dim=-1)
    noisy[1, 2:] = -words[1, 2:]
    torch.testing.assert_close(head(image, noisy, mask), scores)
    # and a masked place that is made visible does change it
    assert not torch.allclose(head(image, noisy, torch.ones_like(mask)), scores)


def test_local_skip_ids_are_special_tokens_stop_words_and_punctuation():
    tokenizer = cn.build_tokenizer("ctclip_tiny")
    skip = set(local_skip_token_ids(tokenizer))
    assert set(tokenizer.all_special_ids) <= skip
    ids = tokenizer("the nodule is in the lung .", add_special_tokens=False)["input_ids"]
    kept = [tokenizer.convert_ids_to_tokens(i) for i in ids if i not in skip]
    assert kept == ["nodule", "lung"]
    no = tokenizer("no", add_special_tokens=False)["input_ids"]
    assert not set(no) & skip, "negations decide a finding sentence: never skipped"


def test_network_local_scores_skip_padding_through_the_network():
    torch.manual_seed(0)
    model = cn.create_model("ctclip_tiny").eval()
    tokenizer = cn.build_tokenizer("ctclip_tiny")
    net = PretrainingNetwork(model, PretrainingLoss(local_weight=1.0), trim_padding=False,
                             local_skip_token_ids=local_skip_token_ids(tokenizer)).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    ids, mask = _reports(tokenizer, ["a nodule in the lung.", "cardiomegaly."], length=16)
    with torch.no_grad():
        a = net(x, ids, mask)["local_scores"]
        ids2 = ids.clone()
        ids2[mask == 0] = tokenizer.convert_tokens_to_ids("nodule")  # real words in the padded places, masked off
        b = net(x, ids2, mask)["local_scores"]
    torch.testing.assert_close(a, b)


def _sentences(tokenizer, reports, s=3, length=8):
    ids = torch.zeros(len(reports), s, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, sentences in enumerate(reports):
        for i, sentence in enumerate(sentences):
            enc = tokenizer(sentence, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
            ids[b, i], mask[b, i] = enc["input_ids"][0], enc["attention_mask"][0]
    return ids, mask


def test_local_alignment_takes_reports_sentence_by_sentence():
    torch.manual_seed(0)
    model = cn.create_model("ctclip_tiny", text={"pooling": "sentence_mean", "max_sentences": 3}).eval()
    tokenizer = cn.build_tokenizer("ctclip_tiny")
    loss = PretrainingLoss(local_weight=1.0, sparse_weight=1.0, cons_weight=1.0, token_selection="soft_topk")
    net = PretrainingNetwork(model, loss, local_skip_token_ids=local_skip_token_ids(tokenizer)).eval()
    ids, mask = _sentences(tokenizer, [["nodule in lung.", "effusion."], ["normal heart."]])
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        out = net(x, ids, mask)
        # the report embedding is CT-CLIP's own sentence mean (one text-encoder pass serves both)
        torch.testing.assert_close(out["text_latents"], model.encode_text(ids, mask))
    assert out["local_scores"].shape == (2, 2) and torch.isfinite(loss(out))
    # FILIP still refuses sentences
    with pytest.raises(ValueError, match="local alignment"):
        PretrainingNetwork(model, PretrainingLoss(filip_weight=1.0))(x, ids, mask)


def test_selection_needs_the_mask_and_token_heads_need_tokens():
    with pytest.raises(ValueError, match="salience mask"):
        PretrainingLoss(token_selection="soft_topk")
    with pytest.raises(ValueError, match="topk_ratio"):
        PretrainingLoss(sparse_weight=1.0, topk_ratio=0.0)

    class NoTokens(torch.nn.Module):
        token_dim = None

    class Fake(torch.nn.Module):
        visual_transformer = NoTokens()
        dim_latent = 4
        temperature = torch.nn.Parameter(torch.tensor(1.0))

    with pytest.raises(ValueError, match="local alignment need"):
        PretrainingNetwork(Fake(), PretrainingLoss(local_weight=1.0))


def _env():
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _train(dataset_dir, out, preset, extra=()):
    files = f"['{TRAIN}','{BUNDLE / 'configs' / f'patch_ib_{preset}.json'}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file", files,
           "--dataset_dir", str(dataset_dir), "--output_dir", str(out), "--epochs", "1", "--num_workers", "0",
           "--progress", "False", "--batch_size", "2", "--val_batch_size", "4", "--max_train_items", "2",
           "--max_val_items", "4", "--cache", "none", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((Path(out) / "eval" / "metrics_per_epoch.json").read_text())[0]


@pytest.mark.parametrize("preset", ["A", "B", "C", "D", "E"])
def test_each_preset_runs_a_pretraining_step_through_the_bundle(preset, tiny_preprocessed_dir, tmp_path):
    row = _train(tiny_preprocessed_dir, tmp_path / preset, preset, ["--model_config", "ctclip_tiny"])
    terms = {"A": set(), "B": {"clip", "local"}}.get(preset, {"clip", "local", "sparse", "cons"})  # A: one term
    logged = {k[len("train_"):] for k in row if k.startswith("train_")} - {"loss", "samples_per_s"}
    assert terms <= logged and not ({"local", "sparse", "cons"} - terms) & logged, row
    heads = tmp_path / preset / "models" / "heads.pt"
    assert heads.exists() == (preset != "A")
    if preset in ("C", "D", "E"):
        state = torch.load(heads, map_location="cpu", weights_only=True)
        assert "salience.salience.weight" in state and "local.to_key.weight" in state
        assert 0.0 < row["train_kept_ratio"] <= 1.0
        if preset == "E":
            assert row["train_kept_ratio"] == 0.25  # exactly K / N: 16 of ctclip_tiny's 64 tokens


def test_preset_b_runs_on_reports_sentence_by_sentence(tiny_preprocessed_dir, tmp_path):
    raw = json.loads((ROOT / "ctclip_contract" / "configs" / "ctclip_tiny.json").read_text())
    raw["name"] = "ctclip_tiny_sentences"
    raw["text"].update(pooling="sentence_mean", max_sentences=4, max_length=16)
    config = tmp_path / "ctclip_tiny_sentences.json"
    config.write_text(json.dumps(raw))
    row = _train(tiny_preprocessed_dir, tmp_path / "B_sentences", "B", ["--model_config", str(config)])
    assert row["train_local"] > 0


def test_the_demo_pretrains_with_a_preset():
    from workflows import demo

    stages = {s.name: s for s in demo.demo_stages(Path("/tmp/demo"), 10, 0, "ctclip_small", 1, 1, 1, False, 0.0,
                                                 pretrain_preset="d")}
    files = stages["pretrain"].config_files
    assert files == ["train.json", "patch_ib_D.json"] and (BUNDLE / "configs" / files[1]).is_file()
    assert stages["classfine_train"].config_files == ["train.json"]  # only pretraining takes the preset


def test_patch_ib_heads_learn_at_their_own_rate():
    from workflows.optim import decay_param_groups

    net = PretrainingNetwork(cn.create_model("ctclip_tiny"), PretrainingLoss(sparse_weight=1.0))
    groups = decay_param_groups(net, 0.05, lr=1e-4, lr_scales={"heads.salience.": 10.0})
    salience = {id(p) for p in net.heads["salience"].parameters()}
    scaled = [g for g in groups if "lr" in g]
    assert {id(p) for g in scaled for p in g["params"]} == salience
    assert all(g["lr"] == pytest.approx(1e-3) for g in scaled)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in net.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="base lr"):
        decay_param_groups(net, 0.05, lr_scales={"heads.salience.": 10.0})
