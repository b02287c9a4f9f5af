"""CT-specialised image encoder (3D patches, slice-distance bias, region-aware cross-attention) on tiny CPU models."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import custom_nets as cn
from ctclip_contract import ModelConfigError, load_model_config
from ctclip_contract.anatomy import ANATOMY_REGIONS
from custom_nets.ct_specialised import (CTSpecialisedEncoder, RegionCrossAttention, patch_region_fractions,
                                        slice_distances)
from custom_nets.image_encoders import build_image_encoder

SMALL = dict(patch_size=(2, 8, 8), dim=16, depth=2, heads=2, mlp_ratio=2.0, max_slice_distance=2)
R = 4


def encoder(seed=0, **settings) -> CTSpecialisedEncoder:
    torch.manual_seed(seed)
    return CTSpecialisedEncoder(**{**SMALL, **settings})


def volume(d=8, h=16, w=16, b=2, seed=1) -> torch.Tensor:
    return torch.rand(b, 1, d, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def blocky_mask(d=8, h=16, w=16, b=2) -> torch.Tensor:
    """Region ids in blocks aligned to the (2, 8, 8) patches: depth rows 0-1 are region 1 (left half) and 2 (right
    half), rows 2-3 region 3, the rest background; region 4 is in no volume."""
    seg = torch.zeros(b, 1, d, h, w, dtype=torch.long)
    seg[:, :, :4, :, :8] = 1
    seg[:, :, :4, :, 8:] = 2
    seg[:, :, 4:6] = 3
    return seg


def test_shapes_positions_and_other_depths():
    enc = encoder().eval()
    out = enc.encode_volume(volume())
    assert out.embedding.shape == (2, 16) and out.tokens.shape == (2, 4 * 2 * 2, 16)
    assert enc.embedding_dim == enc.token_dim == 16 and enc.uses_segmentation
    assert out.regions is None and out.segmentation_logits is None
    # token (d=1, h=0, w=1) sits at the centre of its 2 x 8 x 8 patch, in model-input voxels
    assert out.positions[1 * 4 + 0 * 2 + 1].tolist() == [3.0, 4.0, 12.0]
    with torch.no_grad():
        assert enc.encode_volume(volume(d=14, b=1)).tokens.shape == (1, 7 * 4, 16)  # another depth: no fixed table
    with pytest.raises(ValueError, match=r"\(9, 16, 16\) voxels .* does not divide into patches of \(2, 8, 8\)"):
        enc.encode_volume(volume(d=9))
    with pytest.raises(ValueError, match="expects \\(B, 1, D, H, W\\)"):
        enc.encode_volume(volume()[:, 0])


def test_slice_distances_are_clamped_and_the_bias_is_a_gather():
    dist = slice_distances((5, 1, 2), max_distance=2)
    z = torch.arange(5).repeat_interleave(2)
    assert torch.equal(dist, (z[:, None] - z[None, :]).abs().clamp(max=2))
    assert dist.max() == 2 and dist[0, -1] == 2  # 4 rows apart shares the last entry
    block = encoder().blocks[0]
    bias = block.attention_bias(dist)
    assert bias.shape == (1, 2, 10, 10)
    for h in range(2):  # the same numbers as a loop over every token pair
        for i in range(10):
            for j in range(10):
                assert bias[0, h, i, j] == block.slice_bias[h, dist[i, j]]
    # initialised as a per-head linear decay with distance, heads with different slopes
    table = block.slice_bias.detach()
    assert torch.all(table[:, 0] == 0) and torch.all(table[:, 1:] < 0) and table[0, 1] != table[1, 1]


def test_the_slice_distance_bias_is_used():
    """Changing the bias changes the output; a bias that forbids attention across depth rows makes a row's tokens
    independent of every other row's voxels."""
    enc = encoder().eval()
    x = volume()
    with torch.no_grad():
        before = enc.encode_volume(x)
        enc.blocks[1].slice_bias[:, 1:] += 3.0
        after = enc.encode_volume(x)
    assert not torch.allclose(before.embedding, after.embedding, atol=1e-4)

    with torch.no_grad():
        for block in enc.blocks:
            block.slice_bias[:, 1:] = -1e4  # only tokens of the same depth row attend to each other
        other = x.clone()
        other[:, :, 2:] = torch.rand_like(other[:, :, 2:])  # every row but the first (slices 0-1) changes
        a, b = enc.encode_volume(x).tokens, enc.encode_volume(other).tokens
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-5, rtol=1e-5)  # row 0: 2 x 2 tokens
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


def test_patch_region_fractions():
    seg = blocky_mask()
    seg[0, 0, 0, 0, 0] = 3  # one voxel of patch 0 in region 3
    frac = patch_region_fractions(seg, (2, 8, 8), R)
    assert frac.shape == (2, 16, R + 1)
    torch.testing.assert_close(frac.sum(-1), torch.ones(2, 16))
    assert frac[0, 0, 1] == 127 / 128 and frac[0, 0, 3] == 1 / 128 and frac[1, 0, 1] == 1
    assert frac[0, 1, 2] == 1 and frac[0, 4 * 2, 3] == 1 and frac[0, -1, 0] == 1  # (d=2) region 3; last: background
    # a float map (nearest-neighbour resampled) is rounded; out-of-range ids and bad shapes are refused
    torch.testing.assert_close(patch_region_fractions(seg.float() + 0.2, (2, 8, 8), R), frac)
    with pytest.raises(ValueError, match=r"region ids 0\.\.5; the encoder knows 0\.\.4"):
        patch_region_fractions(seg + (seg == 3).long() * 2, (2, 8, 8), R)
    with pytest.raises(ValueError, match="does not tile into patches"):
        patch_region_fractions(seg[:, :, :7], (2, 8, 8), R)


def test_regions_off_and_on(caplog):
    enc = encoder(num_regions=R, aux_segmentation=True).eval()
    x, seg = volume(), blocky_mask()
    with caplog.at_level(logging.WARNING, logger="custom_nets.ct_specialised"), torch.no_grad():
        off = enc.encode_volume(x)
        enc.encode_volume(x)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "regions off" in caplog.records[0].getMessage()  # said once, not per batch
    assert off.regions is None and off.region_mask is None and off.patch_regions is None
    assert off.segmentation_logits.shape == (2, 16, R + 1)  # the head still predicts without a mask

    with torch.no_grad():
        on = enc.encode_volume(x, seg)
    assert on.regions.shape == (2, R, 16)
    assert on.region_mask.tolist() == [[True, True, True, False]] * 2  # region 4 is in no volume
    assert on.patch_regions.shape == (2, 16, R + 1)
    assert not torch.allclose(on.embedding, off.embedding, atol=1e-4)  # the cross-attention changes the tokens
    # a region embedding is its tokens' mean plus its id embedding, normed (these patches lie wholly inside)
    region1 = on.tokens[:, [0, 2, 4, 6]].mean(1) + enc.region_embedding.weight[1]
    torch.testing.assert_close(on.regions[:, 0], enc.region_norm(region1), atol=1e-5, rtol=1e-5)
    # no regions at all: nothing to read a mask with, nothing logged
    plain = encoder()
    assert not hasattr(plain, "region_embedding") and len(plain.region_attention) == 0
    with pytest.raises(ValueError, match="does not match the image"):
        enc.encode_volume(x, seg[:1])


def test_a_patch_reads_only_the_regions_it_overlaps():
    """With one-hot overlaps, the cross-attention output of the patches inside region 1 depends on region 1's
    tokens only: changing every token of region 2 leaves them unchanged."""
    torch.manual_seed(0)
    xattn = RegionCrossAttention(16, 2).eval()
    ids = torch.randn(3, 16)
    fractions = torch.zeros(1, 6, 3)
    fractions[0, :3, 1] = 1
    fractions[0, 3:, 2] = 1
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 3:] = torch.randn(1, 3, 16)
    with torch.no_grad():
        a, b = xattn(x, fractions, ids), xattn(y, fractions, ids)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_gradients_reach_every_head_and_checkpointing_keeps_them():
    enc = encoder(num_regions=R, aux_segmentation=True).train()
    x, seg = volume(), blocky_mask()
    grads = []
    for checkpointing in (False, True):
        enc.set_gradient_checkpointing(checkpointing)
        enc.zero_grad()
        out = enc.encode_volume(x, seg)
        loss = (out.embedding.square().sum() + out.regions[out.region_mask].square().sum() * 0.1
                + out.segmentation_logits.logsumexp(-1).sum() * 0.1)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)
    g = grads[0]
    # every parameter, and every head's share of every attention: the slice bias rows, the q/k/v rows, the
    # cross-attention query rows
    missing = [n for n, p in enc.named_parameters() if n not in g or not g[n].abs().sum() > 0]
    assert missing == []
    hd = 16 // 2
    for i in range(2):
        assert (g[f"blocks.{i}.slice_bias"].abs().sum(1) > 0).all()
        qkv = g[f"blocks.{i}.qkv.weight"].reshape(3, 2, hd, 16)
        assert (qkv.abs().sum((2, 3)) > 0).all()
        assert (g[f"region_attention.{i}.q.weight"].reshape(2, hd, 16).abs().sum((1, 2)) > 0).all()


def test_settings_are_checked_and_exported():
    with pytest.raises(ValueError, match=r"image_encoder.heads: expected a divisor of image_encoder.dim \(16\)"):
        encoder(heads=3)
    with pytest.raises(ValueError, match="image_encoder.aux_segmentation: expected false when num_regions is 0"):
        encoder(aux_segmentation=True)
    with pytest.raises(ValueError, match=r"image_encoder.region_layers: expected distinct block indices in 0\.\.1"):
        encoder(num_regions=R, region_layers=[2])
    enc = encoder(num_regions=R, region_layers=[1])
    assert list(enc.region_attention) == ["1"]
    settings = enc.exportable_settings()
    assert settings["patch_size"] == [2, 8, 8] and settings["region_layers"] == [1]
    rebuilt = CTSpecialisedEncoder(**settings)
    rebuilt.load_state_dict(enc.state_dict())  # the same architecture


def test_model_configs(tmp_path):
    for name in ("ctspecialised_tiny", "ctspecialised_small"):
        kind, settings = load_model_config(name).image_encoder
        assert kind == "ct_specialised" and settings["num_regions"] == len(ANATOMY_REGIONS)
    model = cn.create_model("ctspecialised_tiny").eval()
    assert isinstance(model.visual_transformer, CTSpecialisedEncoder) and model.dim_image == 32
    x = torch.rand(2, 1, 16, 32, 32) * 2 - 1
    seg = torch.randint(0, len(ANATOMY_REGIONS) + 1, (2, 1, 16, 32, 32))
    with torch.no_grad():
        enc = model.image_encoding(x, seg)
        assert enc.regions.shape == (2, len(ANATOMY_REGIONS), 32) and enc.region_mask.all()
        assert model.encode_image(x).shape == (2, model.dim_latent)  # the global contract, without a mask
    with pytest.raises(ValueError, match="CTViT takes no segmentation mask"):
        cn.create_model("ctclip_tiny").image_encoding(x, seg)

    raw = load_model_config("ctspecialised_tiny").to_dict()
    raw["image_encoder"]["patch_size"] = [3, 8, 8]
    path = tmp_path / "bad_patch.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=r"bad_patch.json: image_encoder.patch_size \[3, 8, 8\] .* does not "
                                               r"divide the model input"):
        build_image_encoder(load_model_config(path))
    raw["image_encoder"].update(patch_size=[4, 8, 8], pooling="cls")
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=r"bad_patch.json: image_encoder.pooling: expected one of"):
        build_image_encoder(load_model_config(path))


def test_an_empty_map_is_no_mask_even_in_a_mixed_batch():
    """The data side gives a volume without a mask an all-background map (so that a batch collates): that volume
    is encoded as with ``seg=None``, beside a masked one, and shows no region."""
    enc = encoder(num_regions=R, aux_segmentation=True).eval()
    x, seg = volume(), blocky_mask()
    mixed = seg.clone()
    mixed[1] = 0
    with torch.no_grad():
        alone_off = enc.encode_volume(x[1:])
        alone_on = enc.encode_volume(x[:1], seg[:1])
        both = enc.encode_volume(x, mixed)
        empty = enc.encode_volume(x, torch.zeros_like(seg))
    torch.testing.assert_close(both.tokens[1], alone_off.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.tokens[0], alone_on.tokens[0], atol=1e-5, rtol=1e-5)
    assert both.region_mask.tolist() == [[True, True, True, False], [False] * R]
    assert empty.regions is None and empty.region_mask is None  # only empty maps: regions off for the batch
