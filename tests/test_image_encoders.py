"""The image-encoder registry: a model config names its encoder; the older ``ctvit`` section still means CTViT;
a newly registered encoder works through the CLIP model, zero-shot, ClassFine and pretraining with no other code;
the shipped slice-fusion configs build (the full-size one on the meta device)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import custom_nets as cn
from ctclip_contract import ModelConfigError, load_model_config
from custom_nets.image_encoders import IMAGE_ENCODERS, ImageEncoding, register_image_encoder
from custom_nets.losses import PretrainingLoss
from custom_nets.pretraining import PretrainingNetwork


def test_a_ctvit_section_is_a_ctvit_and_both_sections_are_refused():
    kind, settings = load_model_config("ctclip_tiny").image_encoder
    assert kind == "ctvit" and settings["image_size"] == 32
    assert load_model_config("slicefusion_tiny").image_encoder[0] == "slice_fusion"
    raw = load_model_config("ctclip_tiny").to_dict()
    with pytest.raises(ModelConfigError, match="both a 'ctvit' and an 'image_encoder' section"):
        load_model_config(raw, {"image_encoder": {"type": "ctvit"}})
    raw.pop("ctvit")
    with pytest.raises(ModelConfigError, match="image_encoder.type"):
        load_model_config(raw, {"image_encoder": {"patch_size": 8}})
    with pytest.raises(ModelConfigError, match=r"'no_such_encoder' is not registered; registered: \[.*'ctvit'"):
        cn.create_model(raw, image_encoder={"type": "no_such_encoder"})


def test_ctvit_encoding_keeps_the_published_embedding_and_gives_all_tokens_with_positions():
    torch.manual_seed(0)
    model = cn.create_model("ctclip_tiny").eval()
    vt = model.visual_transformer
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        enc = model.image_encoding(x)
        grid = vt(x, return_encoded_tokens=True)  # (B, t, h, w, dim)
    assert enc.embedding.shape == (2, model.dim_image) == (2, vt.embedding_dim)
    torch.testing.assert_close(enc.embedding, grid.mean(1).flatten(1))  # the reference's depth mean, flattened
    assert enc.tokens.shape == (2, 4 * 4 * 4, vt.token_dim)
    # token (t=1, h=2, w=3) sits at the centre of its 4 x 8 x 8 patch, in model-input voxels (d, h, w)
    i = (1 * 4 + 2) * 4 + 3
    torch.testing.assert_close(enc.tokens[:, i], grid[:, 1, 2, 3])
    assert enc.positions[i].tolist() == [6.0, 20.0, 28.0]


class MeanPoolEncoder(nn.Module):
    """A minimal encoder of the contract: 4x4x4 average pooling into tokens, their mean as the embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(1, width)
        self.embedding_dim = self.token_dim = width

    def encode_volume(self, image: torch.Tensor) -> ImageEncoding:
        pooled = nn.functional.avg_pool3d(image, 4)  # (B, 1, d, h, w)
        tokens = self.proj(pooled.flatten(2).transpose(1, 2))
        return ImageEncoding(tokens.mean(1), tokens, None)


@pytest.fixture
def mean_pool_registered():
    """The encoder registered for one test and taken out after it: the registry is process-wide, and other tests
    (the GPU benchmark's coverage check) see what the library registers."""

    @register_image_encoder("test_mean_pool")
    def _build_mean_pool(settings: dict, config) -> MeanPoolEncoder:
        return MeanPoolEncoder(settings["width"])

    yield
    IMAGE_ENCODERS.pop("test_mean_pool", None)


def test_a_registered_encoder_needs_no_other_code(mean_pool_registered):
    assert "test_mean_pool" in IMAGE_ENCODERS
    raw = load_model_config("ctclip_tiny").to_dict()
    raw.pop("ctvit")
    raw["ctclip"].pop("dim_image")
    raw["image_encoder"] = {"type": "test_mean_pool", "width": 24}
    model = cn.create_model(raw)
    assert model.dim_image == 24 and isinstance(model.visual_transformer, MeanPoolEncoder)
    x = torch.randn(3, 1, 16, 32, 32)
    assert model.encode_image(x).shape == (3, model.dim_latent)
    tokenizer = cn.build_tokenizer("ctclip_tiny")
    assert cn.ZeroShotClassifier(model, tokenizer).eval()(x).shape == (3, 18)
    # pretraining, with token-level (FILIP) similarity on the encoder's own tokens
    net = PretrainingNetwork(model, PretrainingLoss(filip_weight=1.0))
    ids = tokenizer(["no effusion", "a small nodule"] * 2, padding=True, return_tensors="pt")
    out = net(torch.randn(4, 1, 16, 32, 32), ids["input_ids"], ids["attention_mask"])
    assert out["image_tokens"].shape == (4, 4 * 8 * 8, model.dim_latent)
    PretrainingLoss(filip_weight=1.0)(out).backward()
    assert model.visual_transformer.proj.weight.grad.abs().sum() > 0
    assert cn.ClassFineClassifier(model, freeze_backbone=True)(x).shape == (3, 18)
    with pytest.raises(ModelConfigError, match="dim_image is 99 but the test_mean_pool image encoder gives 24"):
        cn.create_model(raw, ctclip={"dim_image": 99})
    with pytest.raises(ValueError, match="image_pooling 'depth_max' is CTViT's depth pooling"):
        cn.create_model(raw, ctclip={"image_pooling": "depth_max"})


def test_slice_fusion_configs_build_and_the_full_size_one_fits_the_published_layout():
    tiny = cn.create_model("slicefusion_tiny")
    assert type(tiny.visual_transformer).__name__ == "SliceFusionEncoder"
    x = torch.randn(2, 1, 16, 32, 32)
    assert tiny.encode_image(x).shape == (2, 32)
    small = load_model_config("slicefusion_small")
    assert small.input == load_model_config("ctclip_small").input  # the demo's preprocessed volumes serve both
    with torch.device("meta"):
        base = cn.create_model("slicefusion_dinov2_base",
                               image_encoder={"backbone": {"load_pretrained_weights": False}})
    backbone = base.visual_transformer.backbone
    assert backbone.config.hidden_size == 768 and backbone.config.num_hidden_layers == 12
    assert 86_000_000 < sum(p.numel() for p in backbone.parameters()) < 87_000_000  # ViT-B/14
    assert not any(p.requires_grad for p in backbone.parameters())  # frozen, as the config says
    assert base.visual_transformer.embedding_dim == base.dim_image == 512
