"""Slice-fusion image encoder (DINOv2 per slice, transformer over depth) on tiny CPU models."""

import json

import pytest
import torch

import custom_nets as cn
from ctclip_contract import ModelConfigError, load_model_config
from custom_nets.image_encoders import build_image_encoder
from custom_nets.slice_fusion import (IMAGENET_MEAN, IMAGENET_STD, DepthFusion, SliceFusionEncoder,
                                      build_slice_fusion, centred_positions)

DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)
FUSION = dict(dim=16, depth=1, heads=2)
LUNG_MEDIASTINAL_BONE = [[-1350, 150], [-160, 240], [-450, 1050]]


def encoder(backbone=None, fusion=None, windows=((-1.0, 1.0),), seed=0) -> SliceFusionEncoder:
    torch.manual_seed(seed)
    return SliceFusionEncoder(windows, {"config": DINO, **(backbone or {})}, {**FUSION, **(fusion or {})})


def volume(d=6, h=32, w=32, b=2, seed=1) -> torch.Tensor:
    return torch.rand(b, 1, d, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_config(tmp_path, **image_encoder):
    """The ctclip_tiny config with a slice_fusion image encoder, written to a file (errors name the file)."""
    raw = load_model_config("ctclip_tiny").to_dict()
    del raw["ctvit"]
    raw["image_encoder"] = {"type": "slice_fusion", "backbone": {"config": DINO}, "fusion": FUSION, **image_encoder}
    raw["ctclip"]["dim_image"] = FUSION["dim"]
    path = tmp_path / "slice_fusion_tiny.json"
    path.write_text(json.dumps(raw))
    return load_model_config(path)


def test_shapes_positions_and_other_slice_counts():
    enc = encoder().eval()
    out = enc.encode_volume(volume(d=6))
    assert out.embedding.shape == (2, 16) and out.tokens.shape == (2, 6, 16)
    assert enc.embedding_dim == enc.token_dim == 16
    assert torch.equal(out.positions, torch.tensor([[d + 0.5, 16.0, 16.0] for d in range(6)]))
    other = enc.encode_volume(volume(d=9, h=40, w=24, b=1))  # another depth, resized in-plane to the backbone's
    assert other.tokens.shape == (1, 9, 16) and torch.equal(other.positions[:, 1:], torch.tensor([[20.0, 12.0]] * 9))

    # a batch as the bundles' data loaders give it: MetaTensors with per-volume metadata, collated
    from monai.data import MetaTensor, list_data_collate

    vol = volume(d=6)
    batch = list_data_collate([{"image": MetaTensor(v, affine=torch.eye(4) * (i + 1))} for i, v in enumerate(vol)])
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_volume(batch["image"]).embedding, out.embedding)

    learned = encoder(fusion={"position": "learned", "max_slices": 8}).eval()
    assert learned.encode_volume(volume(d=8)).tokens.shape == (2, 8, 16)
    with pytest.raises(ValueError, match=r"max_slices = 8.*9-slice volume"):
        learned.encode_volume(volume(d=9))


def test_centred_positions_line_up_across_slice_counts():
    """Slices keep their learned position when the volume is padded symmetrically (what the centre crop/pad
    does), and not when it is padded on one side: positions are centred, not counted from the first slice."""
    enc = encoder(fusion={"position": "learned", "max_slices": 16, "depth": 0}).eval()
    vol = volume(d=6)
    air = torch.full_like(vol[:, :, :1], -1.0)
    with torch.no_grad():
        tokens = enc.encode_volume(vol).tokens
        centred = enc.encode_volume(torch.cat([air, vol, air], dim=2)).tokens[:, 1:-1]
        one_sided = enc.encode_volume(torch.cat([vol, air, air], dim=2)).tokens[:, :6]
    torch.testing.assert_close(centred, tokens, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one_sided, tokens, atol=1e-3)
    # 16 entries for positions -7.5..7.5: the centre of an odd-length volume falls between entries 7 and 8
    table = enc.fusion.position_table
    torch.testing.assert_close(enc.fusion.learned_positions(torch.tensor([0.0]))[0], (table[7] + table[8]) / 2)
    torch.testing.assert_close(enc.fusion.learned_positions(torch.tensor([-7.5]))[0], table[0])
    assert torch.equal(centred_positions(4), torch.tensor([-1.5, -0.5, 0.5, 1.5]))


def test_rotary_fusion_sees_relative_positions_only():
    """Rotary fusion: shifting every slice position (the CLS token sits at their centre) changes nothing; the
    learned table is absolute, so the same shift changes its output."""
    feats = torch.randn(2, 7, 24)
    positions = centred_positions(7)
    for position, invariant in (("rotary", True), ("learned", False)):
        torch.manual_seed(0)
        fusion = DepthFusion(24, dim=16, depth=2, heads=2, position=position, max_slices=32).eval()
        with torch.no_grad():
            emb, tok = fusion(feats)
            emb_shift, tok_shift = fusion(feats, positions + 5.5)
        same = torch.allclose(emb, emb_shift, atol=1e-5) and torch.allclose(tok, tok_shift, atol=1e-5)
        assert same == invariant, position
    # and rotary does see the spacing: a stretched volume is another volume
    with torch.no_grad():
        assert not torch.allclose(fusion(feats)[0], fusion(feats, positions * 2)[0], atol=1e-4)


@pytest.mark.parametrize("backbone", [{}, {"freeze": True, "unfreeze_top_blocks": 1, "slice_features": "cls_mean"}])
def test_chunked_equals_unchunked_and_checkpointing_keeps_gradients(backbone, monkeypatch):
    import custom_nets.slice_fusion as sf

    calls = []
    monkeypatch.setattr(sf, "checkpoint", lambda *a, **k: calls.append(k) or torch.utils.checkpoint.checkpoint(*a, **k))
    whole = encoder({**backbone, "slice_chunk": 64})
    chunked = encoder({**backbone, "slice_chunk": 2})
    chunked.load_state_dict(whole.state_dict())
    vol = volume(d=5)  # 10 slices: chunks of 2
    grads = []
    for enc, checkpointing in ((whole, False), (chunked, False), (chunked, True)):
        enc.set_gradient_checkpointing(checkpointing)
        enc.zero_grad()
        out = enc.encode_volume(vol)
        (out.embedding.square().sum() + out.tokens.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
        if enc is whole:
            reference = out.embedding.detach()
        else:
            torch.testing.assert_close(out.embedding.detach(), reference, atol=1e-5, rtol=1e-4)
    assert calls == [{"use_reentrant": False}] * 5  # one per chunk of 2 of the 10 slices, only when enabled
    assert grads[0].keys() == grads[1].keys() == grads[2].keys()
    assert any(n.startswith("backbone.encoder.layer.1.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[2][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_frozen_backbone_gets_no_gradient_and_stays_eval():
    enc = encoder({"freeze": True})
    enc.train()
    assert enc.training and enc.fusion.training
    assert not any(m.training for m in enc.backbone.modules())
    before = {n: p.detach().clone() for n, p in enc.backbone.named_parameters()}
    fusion_before = {n: p.detach().clone() for n, p in enc.fusion.named_parameters()}
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2, weight_decay=0.1)
    enc.encode_volume(volume()).embedding.square().sum().backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in enc.backbone.parameters())
    assert all(torch.equal(p, before[n]) for n, p in enc.backbone.named_parameters())
    assert any(not torch.equal(p, fusion_before[n]) for n, p in enc.fusion.named_parameters())
    # no trainable parameter at all: the whole encoder stays in eval
    enc.fusion.requires_grad_(False)
    assert not enc.train().training


def test_unfreeze_top_blocks_trains_only_the_top_block_and_final_layernorm():
    enc = encoder({"freeze": True, "unfreeze_top_blocks": 1}).train()
    keeps_graph = {}

    def record(module, args, out):
        keeps_graph.setdefault(list(enc.backbone.encoder.layer).index(module), out.requires_grad)

    for layer in enc.backbone.encoder.layer:
        layer.register_forward_hook(record)
    enc.encode_volume(volume()).embedding.sum().backward()
    assert keeps_graph == {0: False, 1: True}  # the frozen block ran without autograd
    with_grad = {n for n, p in enc.backbone.named_parameters() if p.grad is not None}
    top = {n for n, _ in enc.backbone.named_parameters() if n.startswith(("encoder.layer.1.", "layernorm."))}
    assert with_grad == top and top
    assert not enc.backbone.embeddings.training and not enc.backbone.encoder.layer[0].training
    assert enc.backbone.encoder.layer[1].training and enc.backbone.layernorm.training


def test_backbone_input_windows_and_imagenet_normalisation(tmp_path):
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    enc = encoder(windows=((-0.5, 0.5),))
    edges = torch.tensor([-0.5, 0.5, -3.0]).view(3, 1, 1, 1).expand(3, 1, 40, 40)  # low, high, below the window
    x = enc.backbone_input(edges)
    assert x.shape == (3, 3, 32, 32)
    for i, value in enumerate((0.0, 1.0, 0.0)):
        torch.testing.assert_close(x[i, :, 5, 5], (value - mean) / std)

    # three HU windows through the builder: HU 0 (model value 0.0) sits at a different place in each
    enc3 = build_slice_fusion({"hu_windows": LUNG_MEDIASTINAL_BONE, "backbone": {"config": DINO}, "fusion": FUSION},
                              tiny_config(tmp_path))
    x = enc3.backbone_input(torch.zeros(1, 1, 32, 32))
    expected = torch.tensor([1350 / 1500, 160 / 400, 450 / 1500])
    torch.testing.assert_close(x[0, :, 0, 0], (expected - mean) / std)
    assert len(set(x[0, :, 0, 0].tolist())) == 3


def test_pretrained_folder_and_package_round_trip_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = encoder().eval()
    folder = tmp_path / "fake_dino_pkg" / "model"
    original.backbone.save_pretrained(folder)
    (tmp_path / "fake_dino_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    vol = volume()
    with torch.no_grad():
        expected = original.encode_volume(vol).embedding
        for spec in (str(folder), "package:fake_dino_pkg/model"):
            loaded = SliceFusionEncoder([(-1.0, 1.0)], {"pretrained": spec}, FUSION).eval()
            loaded.fusion.load_state_dict(original.fusion.state_dict())
            torch.testing.assert_close(loaded.encode_volume(vol).embedding, expected)
        # the folder's architecture without its weights (they come from the CLIP checkpoint)
        bare = SliceFusionEncoder([(-1.0, 1.0)], {"pretrained": str(folder), "load_pretrained_weights": False}, FUSION)
    shapes = {k: v.shape for k, v in original.state_dict().items()}
    assert {k: v.shape for k, v in bare.state_dict().items()} == shapes
    fc1 = "backbone.encoder.layer.0.mlp.fc1.weight"
    assert not torch.equal(bare.state_dict()[fc1], original.state_dict()[fc1])


def test_exportable_settings_rebuild_the_same_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    encoder().backbone.save_pretrained(tmp_path / "dino")
    cfg = tiny_config(tmp_path, hu_windows=LUNG_MEDIASTINAL_BONE,
                      backbone={"pretrained": str(tmp_path / "dino"), "image_size": 24, "freeze": True,
                                "unfreeze_top_blocks": 1, "slice_features": "cls_mean"},
                      fusion={"dim": 16, "heads": 2, "position": "learned", "max_slices": 20})
    original = build_image_encoder(cfg).eval()
    settings = json.loads(json.dumps(original.exportable_settings()))
    backbone = settings["backbone"]
    assert "pretrained" not in backbone and backbone["load_pretrained_weights"] is False
    assert backbone["config"]["hidden_size"] == 32 and "_name_or_path" not in backbone["config"]
    assert backbone["image_size"] == 24 and backbone["unfreeze_top_blocks"] == 1
    assert settings["hu_windows"] == LUNG_MEDIASTINAL_BONE and settings["fusion"]["depth"] == 2  # default, resolved
    (tmp_path / "dino").rename(tmp_path / "gone")  # rebuilt offline without the folder
    rebuilt = build_slice_fusion(settings, cfg).eval()
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    vol = volume(d=16)
    with torch.no_grad():
        a, b = original.encode_volume(vol), rebuilt.encode_volume(vol)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.tokens, b.tokens)
    assert [n for n, p in rebuilt.named_parameters() if p.requires_grad] == \
        [n for n, p in original.named_parameters() if p.requires_grad]


def test_create_model_builds_a_ctclip_on_the_slice_fusion_encoder(tmp_path):
    torch.manual_seed(0)
    model = cn.create_model(tiny_config(tmp_path, _doc="comments are allowed",
                                        fusion={**FUSION, "_doc": "in every section"})).eval()
    assert isinstance(model.visual_transformer, SliceFusionEncoder)
    with torch.no_grad():
        latents = model.encode_image(volume(d=16, b=2))
    assert latents.shape == (2, model.dim_latent)


@pytest.mark.parametrize("settings, key", [
    ({"hu_windows": [[-1000, 400], [-160, 240]]}, "image_encoder.hu_windows"),
    ({"hu_windows": [[400, -1000]]}, "image_encoder.hu_windows"),
    ({"fusion": {**FUSION, "position": "sinusoidal"}}, "image_encoder.fusion.position"),
    ({"fusion": {**FUSION, "heads": 3}}, "image_encoder.fusion.heads"),
    ({"fusion": {**FUSION, "position": "learned", "max_slices": 8}}, "image_encoder.fusion.max_slices"),
    ({"fusion": {**FUSION, "dimm": 16}}, "image_encoder.fusion.dimm"),
    ({"backbone": {"config": DINO, "slice_features": "mean"}}, "image_encoder.backbone.slice_features"),
    ({"backbone": {"config": DINO, "unfreeze_top_blocks": 1}}, "image_encoder.backbone.unfreeze_top_blocks"),
    ({"backbone": {"config": DINO, "freeze": True, "unfreeze_top_blocks": 3}},
     "image_encoder.backbone.unfreeze_top_blocks"),
    ({"backbone": {"config": DINO, "slice_chunk": 0}}, "image_encoder.backbone.slice_chunk"),
    ({"backbone": {"config": {**DINO, "num_channels": 1}}}, "image_encoder.backbone.config.num_channels"),
    ({"backbone": {"freeze": True}}, "image_encoder.backbone:"),
    ({"backbone": {"load_pretrained_weights": True, "config": DINO}}, "image_encoder.backbone.pretrained"),
    ({"windows": [[-1000, 400]]}, "image_encoder.windows"),
])
def test_builder_errors_name_the_file_and_key(tmp_path, settings, key):
    cfg = tiny_config(tmp_path, **settings)
    with pytest.raises(ModelConfigError) as err:
        build_image_encoder(cfg)
    assert str(tmp_path / "slice_fusion_tiny.json") in str(err.value) and key in str(err.value)
