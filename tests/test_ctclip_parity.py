"""CT-CLIP against the reference implementation (fixture made with the unmodified reference classes) and
against the state-dict manifest of the published full-size model."""

import json
from pathlib import Path

import pytest
import torch

import custom_nets
from custom_nets import CTCLIP, clip_loss

DATA = Path(__file__).parent / "data"
TOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    return torch.load(DATA / "parity_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(fixture):
    cfg = fixture["configs"]
    m = CTCLIP.from_reference_config(ctvit=cfg["ctvit"], bert=cfg["bert"], ctclip=cfg["ctclip"])
    m.load_state_dict(fixture["state_dict"], strict=True)
    return m.eval()


def assert_close(name, actual, expected):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= TOL, f"{name}: max abs error {err:.3g} > {TOL}"


def test_fixture_documents_what_we_compare(fixture):
    doc = fixture["configs"]["fixture"]["output_doc"]
    assert set(doc) == set(fixture["outputs"]), "every reference output is documented and compared below"
    assert "position_ids" in " ".join(fixture["state_dict"])  # written like the published checkpoints


@torch.no_grad()
def test_every_reference_output_is_reproduced(model, fixture):
    i, o = fixture["inputs"], fixture["outputs"]
    vt = model.visual_transformer
    patch = vt.to_patch_emb(i["volume"])
    assert_close("patch_tokens", patch, o["patch_tokens"])
    pre_vq = vt.encode(patch)
    assert_close("encoded_tokens_pre_vq", pre_vq, o["encoded_tokens_pre_vq"])
    indices = vt(i["volume"], return_only_codebook_ids=True).reshape(1, -1)
    assert torch.equal(indices, o["vq_indices"]), "VQ codebook indices differ from the reference"
    assert_close("encoded_image_tokens", vt(i["volume"], return_encoded_tokens=True), o["encoded_image_tokens"])
    assert_close("image_embed_pooled", model.image_embedding(i["volume"]), o["image_embed_pooled"])
    hidden = model.encode_text_tokens(i["input_ids"], i["attention_mask"])
    assert_close("text_last_hidden_state", hidden, o["text_last_hidden_state"])
    assert_close("text_cls_embed", model.text_embedding(i["input_ids"], i["attention_mask"]), o["text_cls_embed"])
    assert_close("text_latents", model.encode_text(input_ids=i["input_ids"], attention_mask=i["attention_mask"]),
                 o["text_latents"])
    assert_close("image_latents", model.encode_image(i["volume"]), o["image_latents"])
    assert_close("temperature_exp", model.temperature.exp(), o["temperature_exp"])

    sim = model.reference_forward(i["input_ids"], i["volume"], text_attention_mask=i["attention_mask"])
    assert_close("sim_logits", sim, o["sim_logits"])
    assert_close("zero_shot_prob_present", sim.softmax(dim=0)[0], o["zero_shot_prob_present"])
    pair = dict(text_input_ids=i["input_ids_pair"], image=i["volume_pair"], text_attention_mask=i["attention_mask_pair"])
    assert_close("sim_logits_pair", model.reference_forward(**pair), o["sim_logits_pair"])
    assert_close("loss_pair", model.reference_forward(**pair, return_loss=True), o["loss_pair"])
    # the training forward: (B_image, B_text) logits; the reference matrix is (texts, images)
    logits = model(i["volume_pair"], text_input_ids=i["input_ids_pair"], text_attention_mask=i["attention_mask_pair"])
    assert_close("sim_matrix_pair", logits.t(), o["sim_matrix_pair"])
    assert_close("loss_pair (ClipLoss)", clip_loss(logits), o["loss_pair"])


@torch.no_grad()
def test_reference_semantics_path_gives_the_same_numbers(model, fixture):
    i, o = fixture["inputs"], fixture["outputs"]
    vt = model.visual_transformer
    try:
        vt.set_options(reference_semantics=True)
        assert_close("image_latents (plain attention, recomputed bias)", model.encode_image(i["volume"]),
                     o["image_latents"])
    finally:
        vt.set_options(reference_semantics=False)


def test_published_checkpoint_without_position_ids_loads_strictly(fixture):
    cfg = fixture["configs"]
    sd = {k: v for k, v in fixture["state_dict"].items() if not k.endswith("position_ids")}
    m = CTCLIP.from_reference_config(ctvit=cfg["ctvit"], bert=cfg["bert"], ctclip=cfg["ctclip"])
    m.load_state_dict(sd, strict=True)
    with pytest.raises(RuntimeError, match="to_text_latent.weight"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "to_text_latent.weight"}, strict=True)


def test_full_size_ctclip_v2_has_exactly_the_published_keys_and_shapes():
    manifest = json.loads((DATA / "ctclip_v2_state_dict_manifest.json").read_text())["state_dict"]
    with torch.device("meta"):
        model = custom_nets.create_model("ctclip_v2")
    expected = {k: tuple(v["shape"]) for k, v in manifest.items()}
    ours = {k: tuple(v.shape) for k, v in model.reference_state_dict().items()}
    assert list(ours) == list(expected)  # same keys in the same order
    assert ours == expected
    plain = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert plain == {k: s for k, s in expected.items() if not k.endswith("position_ids")}
    # the 151 M-parameter to_visual_latent_extra (and the text extra) are not held as parameters
    held = sum(p.numel() for p in model.parameters())
    assert held == 438_148_761 - 150_994_944 - 393_216
