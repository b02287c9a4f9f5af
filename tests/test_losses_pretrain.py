"""Pretraining loss terms: finite losses with gradients in both encoders, exact global negatives under DDP."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from custom_nets import ClipLoss, clip_loss, create_model
from custom_nets.losses import CloobLoss, PretrainingLoss, filip_similarity, gather_with_grad
from custom_nets.pretraining import PretrainingNetwork
from workflows.distributed import free_port


def _batch(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 1, 16, 32, 32)
    image = torch.rand(shape, generator=g) * 2 - 1
    vocab = model.text_transformer.get_input_embeddings().weight.shape[0]
    ids = torch.randint(5, vocab, (b, 12), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # one padded report
    ids[0, 8:] = 0
    view = image + 0.05 * torch.randn(shape, generator=g)
    return image, ids, mask, view


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


OPTIONS = {
    "clip": dict(),
    "decoupled": dict(decoupled=True),
    "cloob": dict(clip_weight=0.0, cloob_weight=1.0),
    "filip": dict(clip_weight=0.0, filip_weight=1.0),
    "multiview": dict(clip_weight=0.0, multiview_weight=1.0),
    "mlm": dict(mlm_weight=1.0),
    "simsiam": dict(visual_ssl="simsiam", visual_ssl_weight=1.0),
    "simclr": dict(visual_ssl="simclr", visual_ssl_weight=1.0),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_loss_option_trains_both_encoders(option):
    torch.manual_seed(0)
    model = create_model("ctclip_tiny")
    loss = PretrainingLoss(**OPTIONS[option])
    net = PretrainingNetwork(model, loss, mask_token_id=4, special_token_ids=[0, 1, 2, 3, 4]).train()
    image, ids, mask, view = _batch(model)
    out = net(image, ids, mask, image_view=view if "view" in loss.needs() else None)
    value = loss(out)
    assert value.ndim == 0 and torch.isfinite(value), (option, value)
    value.backward()
    assert _grad_norm(model.visual_transformer) > 0, f"{option}: no gradient in the image encoder"
    if option in ("simsiam", "simclr"):
        # visual SSL alone cannot reach the text encoder; the CLIP term that goes with it does
        assert loss.last_terms.keys() == {"clip", "visual_ssl"}
    assert _grad_norm(model.text_transformer) > 0, f"{option}: no gradient in the text encoder"
    if net.heads:
        assert _grad_norm(net.heads) > 0, f"{option}: no gradient in the auxiliary heads"


def test_mlm_gradient_reaches_text_encoder_without_clip():
    torch.manual_seed(0)
    model = create_model("ctclip_tiny")
    loss = PretrainingLoss(clip_weight=0.0, mlm_weight=1.0, mlm_probability=0.5)
    net = PretrainingNetwork(model, loss, mask_token_id=4, special_token_ids=[0, 1, 2, 3, 4]).train()
    image, ids, mask, _ = _batch(model)
    out = net(image, ids, mask)
    assert (out["mlm_labels"] != -100).any()
    assert bool((out["mlm_labels"][mask == 0] == -100).all()), "padding must never be a masked target"
    loss(out).backward()
    assert _grad_norm(model.text_transformer.encoder) > 0


def test_network_latents_equal_model_encoders_and_padding_trim_is_exact():
    torch.manual_seed(0)
    model = create_model("ctclip_tiny").eval()
    net = PretrainingNetwork(model, PretrainingLoss(filip_weight=1.0)).eval()
    image, ids, mask, _ = _batch(model)
    with torch.no_grad():
        out = net(image, ids, mask)
        torch.testing.assert_close(out["image_latents"], model.encode_image(image), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["text_latents"], model.encode_text(ids, mask), rtol=1e-5, atol=1e-6)
        # extra padding columns do not change the report latents (trimmed away or masked)
        pad = torch.zeros(ids.shape[0], 20, dtype=ids.dtype)
        out2 = net(image, torch.cat([ids, pad], 1), torch.cat([mask, pad], 1))
        torch.testing.assert_close(out2["text_latents"], out["text_latents"], rtol=1e-5, atol=1e-6)
        logits = model(image, ids, mask)
    # the dict path of ClipLoss equals the logits path
    torch.testing.assert_close(ClipLoss()(out), clip_loss(logits), rtol=1e-5, atol=1e-6)


def test_temperature_init_and_clamp():
    model = create_model("ctclip_tiny")
    net = PretrainingNetwork(model, PretrainingLoss(), temperature_init=math.log(1 / 0.07),
                             temperature_range=(math.log(1 / 30), math.log(100)))
    assert math.isclose(float(model.temperature.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        model.temperature.fill_(10.0)
    image, ids, mask, _ = _batch(model)
    out = net.train()(image, ids, mask)
    assert math.isclose(float(out["logit_scale"]), 100.0, rel_tol=1e-5)


def test_filip_ignores_padding_tokens_and_cloob_prefers_aligned_pairs():
    img = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    i2t, t2i = filip_similarity(img, txt, mask)
    txt2 = txt.clone()
    txt2[0, 3:] = img[0, 0]  # padding made to match perfectly: must not matter
    i2t2, t2i2 = filip_similarity(img, txt2, mask)
    torch.testing.assert_close(i2t, i2t2)
    torch.testing.assert_close(t2i, t2i2)
    x = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    aligned = CloobLoss()({"image_latents": x, "text_latents": x})
    shuffled = CloobLoss()({"image_latents": x, "text_latents": x.roll(1, 0)})
    assert aligned < shuffled


def test_weights_are_validated():
    with pytest.raises(ValueError, match="nothing to train"):
        PretrainingLoss(clip_weight=0.0)
    with pytest.raises(ValueError, match="visual_ssl"):
        PretrainingLoss(visual_ssl="byol")


def _ddp_worker(rank, world, port, x, y, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    enc_i, enc_t = torch.nn.Linear(5, 4), torch.nn.Linear(6, 4)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.ModuleDict({"i": enc_i, "t": enc_t}))
    b = x.shape[0] // world
    xi, yt = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
    pred = {"image_latents": torch.nn.functional.normalize(net.module["i"](xi), dim=-1),
            "text_latents": torch.nn.functional.normalize(net.module["t"](yt), dim=-1),
            "logit_scale": torch.tensor(3.0)}
    assert gather_with_grad(pred["image_latents"]).shape[0] == x.shape[0]
    loss = ClipLoss()(pred)
    # DDP's reducer only runs through the wrapper's forward; here gradients are averaged by hand like DDP does
    loss.backward()
    for p in net.module.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    out[rank] = torch.cat([p.grad.reshape(-1) for p in net.module.parameters()] + [loss.detach().reshape(1)])
    dist.destroy_process_group()


def test_global_negatives_under_gloo_ddp_give_the_full_batch_gradient():
    torch.manual_seed(1)
    x, y = torch.randn(6, 5), torch.randn(6, 6)
    out = torch.zeros(2, 5 * 4 + 4 + 6 * 4 + 4 + 1).share_memory_()
    mp.spawn(_ddp_worker, args=(2, free_port(), x, y, out), nprocs=2, join=True)
    torch.manual_seed(0)
    enc_i, enc_t = torch.nn.Linear(5, 4), torch.nn.Linear(6, 4)
    pred = {"image_latents": torch.nn.functional.normalize(enc_i(x), dim=-1),
            "text_latents": torch.nn.functional.normalize(enc_t(y), dim=-1), "logit_scale": torch.tensor(3.0)}
    loss = ClipLoss()(pred)
    loss.backward()
    ref = torch.cat([p.grad.reshape(-1) for p in (*enc_i.parameters(), *enc_t.parameters())] + [loss.detach().reshape(1)])
    torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[1], ref, rtol=1e-4, atol=1e-6)


def test_sentence_rows_train_the_image_side_and_refuse_token_losses():
    """With ``text.pooling = "sentence_mean"`` the network takes ``(B, S, L)`` reports: latents as the model's,
    padding rows and columns change nothing, and FILIP / MLM (one sequence per report) are refused by name."""
    torch.manual_seed(0)
    model = create_model("ctclip_tiny", text={"pooling": "sentence_mean"})
    net = PretrainingNetwork(model, PretrainingLoss()).eval()
    image, ids, mask, _ = _batch(model)
    rows_ids = torch.stack([ids, torch.zeros_like(ids)], 1)  # (B, 2, L): one sentence and an empty row each
    rows_mask = torch.stack([mask, torch.zeros_like(mask)], 1)
    with torch.no_grad():
        out = net(image, rows_ids, rows_mask)
        torch.testing.assert_close(out["text_latents"], model.encode_text(rows_ids, rows_mask), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["text_latents"], model.encode_text(ids, mask), rtol=1e-5, atol=1e-6)
    ClipLoss()(net.train()(image, rows_ids, rows_mask)).backward()
    assert _grad_norm(model.visual_transformer) > 0 and _grad_norm(model.text_transformer) > 0
    for option in ("filip", "mlm"):
        net = PretrainingNetwork(model, PretrainingLoss(**OPTIONS[option]), mask_token_id=4,
                                 special_token_ids=[0, 1, 2, 3, 4])
        with pytest.raises(ValueError, match="sentence_mean"):
            net(image, rows_ids, rows_mask)


def test_mlm_loss_value_is_the_cross_entropy_of_the_masked_tokens_only():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])  # (B=1, L=3, V=3)
    labels = torch.tensor([[0, -100, 2]])  # the middle token was not masked
    loss = PretrainingLoss(clip_weight=0.0, mlm_weight=1.0)({"mlm_logits": logits, "mlm_labels": labels})
    first = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0 + math.exp(-1.0)))
    assert abs(float(loss) - (first + math.log(3.0)) / 2) < 1e-6
    nothing = PretrainingLoss(clip_weight=0.0, mlm_weight=1.0)({"mlm_logits": logits, "mlm_labels": labels * 0 - 100})
    assert float(nothing) == 0.0


def test_reference_options_use_all_token_embeds_is_filip_and_the_others_point_elsewhere():
    image, ids, mask, _ = _batch(create_model("ctclip_tiny"))
    torch.manual_seed(0)
    filip = create_model("ctclip_tiny", ctclip={"token_level_similarity": True}).eval()
    torch.manual_seed(0)
    reference_name = create_model("ctclip_tiny", ctclip={"use_all_token_embeds": True}).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference_name(image, ids, mask), filip(image, ids, mask))
    with pytest.raises(ValueError, match="mlm_weight"):
        create_model("ctclip_tiny", ctclip={"use_mlm": True})
    with pytest.raises(ValueError, match=r"downsample_image_embeds=True\) is not offered"):
        create_model("ctclip_tiny", ctclip={"downsample_image_embeds": True})
