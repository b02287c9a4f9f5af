"""VocabFine (configs/vocabfine.json over train.json): one image encoding per step for all 36 prompts, a finite
loss, every weight but the VQ codebook trained, CT-CLIP checkpoint keys."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from monai.handlers import from_engine

from custom_nets import create_model

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ct_clip_classfine"
CONFIGS = BUNDLE / "configs"


def _workflow(tiny_preprocessed_dir, tiny_clip_checkpoint, out, **overrides):
    from monai.bundle import ConfigWorkflow

    w = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "vocabfine.json")],
                       meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                       workflow_type="train", bundle_root=str(BUNDLE), dataset_dir=str(tiny_preprocessed_dir),
                       output_dir=str(out), pretrained=str(tiny_clip_checkpoint), model_config="ctclip_tiny",
                       num_workers=0, batch_size=2, val_batch_size=4, **overrides)
    w.initialize()
    return w


def test_vocabfine_step_encodes_each_volume_once(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path):
    w = _workflow(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path)
    network = w.parser.get_parsed_content("network")
    loss_fn = w.parser.get_parsed_content("loss")
    batch = next(iter(w.parser.get_parsed_content("train#dataloader")))
    calls = {"image": [], "text": []}
    h1 = network.model.visual_transformer.register_forward_hook(lambda m, a, o: calls["image"].append(a[0].shape[0]))
    h2 = network.model.text_transformer.register_forward_hook(
        lambda m, a, kw, o: calls["text"].append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    network.train()
    probs = network(batch["image"])
    loss = loss_fn(probs, batch["label"])
    loss.backward()
    h1.remove()
    h2.remove()
    assert calls["image"] == [2], "one CTViT pass for the whole batch"
    assert len(calls["text"]) == 1 and calls["text"][0][0] == 36, "all 36 prompts in one text pass"
    assert probs.shape == (2, 18) and math.isfinite(loss.item())
    assert network.model.text_transformer.embeddings.word_embeddings.weight.grad is not None


def test_vocabfine_run_trains_all_but_the_codebook(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path):
    w = _workflow(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path, epochs=1, lr=1e-3,
                  **{"train#trainer#epoch_length": 2})
    w.run()
    w.finalize()
    trainer = w.parser.get_parsed_content("train#trainer")
    assert math.isfinite(from_engine(["loss"], first=True)(trainer.state.output))
    sd = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith(("trained_model.", "classifier.", "model.")) for k in sd), "CT-CLIP keys expected"
    create_model("ctclip_tiny", checkpoint=str(tmp_path / "models" / "model.pt"))  # strict load
    before = torch.load(tiny_clip_checkpoint, weights_only=True)
    after = {k: v.cpu() for k, v in w.parser.get_parsed_content("network").model.state_dict().items()}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("text_transformer.") for k in moved)
    assert any(k.startswith("visual_transformer.enc_temporal_transformer") for k in moved)
    assert "temperature" in moved
    assert not any("vq._codebook" in k for k in moved)
