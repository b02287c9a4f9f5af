"""ct_clip_pretrain bundle end to end on the tiny cohort: one-epoch run, properties, gloo DDP, SIGKILL + resume,
initialisation from a published-style checkpoint, test-split evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_clip_pretrain"
TRAIN = str(BUNDLE / "configs" / "train.json")
FAST = ["--model_config", "ctclip_tiny", "--num_workers", "0", "--progress", "False", "--batch_size", "2",
        "--val_batch_size", "4"]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _run(args, out_dir, timeout=240, torchrun=False):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun
           else [sys.executable]) + ["-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE)] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    (Path(out_dir) / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _latest(out):
    from workflows.checkpoints import list_checkpoints

    found = list_checkpoints(Path(out) / "checkpoints")
    return found[-1] if found else (None, None)


def test_one_epoch_run_writes_every_output(tiny_preprocessed_dir, tmp_path, tiny_clip_checkpoint):
    from custom_nets import create_model, load_checkpoint

    out = tmp_path / "run"
    _run(["--config_file", TRAIN, "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(out),
          "--epochs", "1", "--pretrained", str(tiny_clip_checkpoint)] + FAST, out)
    n_train = len(json.loads((tiny_preprocessed_dir / "datalist.json").read_text())["training"])
    it, path = _latest(out)
    assert it == n_train // 2, "one epoch of drop_last batches of 2"
    state = _state(path)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == it
    rows = json.loads((out / "eval" / "metrics_per_epoch.json").read_text())
    assert [r["epoch"] for r in rows] == [1]
    assert 0.0 <= rows[0]["macro_auroc"] <= 1.0 and "report_to_volume_recall@5" in rows[0]
    assert 0.0 <= rows[0]["report_prompt_macro_auroc"] <= 1.0  # the text-side ceiling, logged next to it
    assert (out / "eval" / "validation_report_prompts" / "per_class.csv").exists()
    assert rows[0]["train_loss"] > 0 and (out / "eval" / "learning_curve.png").stat().st_size > 0
    # initialised from the checkpoint: its temperature (1.0, CT-CLIP v2) is kept, not CLIP's log(1/0.07)
    assert abs(rows[0]["logit_scale"] - 2.718) < 0.05
    assert (out / "eval" / "best" / "predictions.csv").exists()
    # models/model.pt: CT-CLIP keys, strict load, and trained (differs from the initial weights)
    sd = _state(out / "models" / "model.pt")
    assert "temperature" in sd and "to_visual_latent_extra.weight" in sd
    model = create_model("ctclip_tiny")
    load_checkpoint(model, out / "models" / "model.pt")
    final = _state(out / "models" / "model_final.pt")
    trained = state["model"]  # the training state after the epoch, wrapper keys "model.*"
    torch.testing.assert_close(final["to_visual_latent.weight"], trained["model.to_visual_latent.weight"])



def test_window_on_device_trains_bitwise_the_same(tiny_preprocessed_dir, tmp_path):
    """``window_on_device``: the loader hands over stored int16 and prepare_batch windows it; one epoch gives the same
    weights to the bit. Both runs share one disk cache folder: the cache key keeps the int16 and float32 items
    apart (a float32 item windowed twice would train different weights)."""
    cache, weights = tmp_path / "cache", {}
    for deferred in (False, True):
        out = tmp_path / f"deferred_{deferred}"
        _run(["--config_file", TRAIN, "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(out),
              "--epochs", "1", "--cache", "disk", "--cache_dir", str(cache), "--window_on_device", str(deferred)]
             + FAST, out)
        weights[deferred] = _state(out / "models" / "model_final.pt")
    for k, v in weights[False].items():
        assert torch.equal(v, weights[True][k]), k
    from transforms import load_datalist

    n_items = sum(len(load_datalist(tiny_preprocessed_dir, split)) for split in ("training", "validation"))
    dtypes = sorted(str(torch.load(f, weights_only=True)["image"].dtype) for f in cache.glob("*.pt"))
    n_read = len(dtypes) // 2  # every item each run read (drop_last leaves at most batch_size - 1 unread)
    assert n_read >= n_items - 1 and dtypes == ["torch.float32"] * n_read + ["torch.int16"] * n_read


def test_window_on_device_refuses_augmentation():
    from workflows.datasets import resolve_window_on_device

    assert resolve_window_on_device("auto", "cpu") is False and resolve_window_on_device("auto", "cuda") is True
    assert resolve_window_on_device("auto", "cuda", augment=True) is False
    with pytest.raises(ValueError, match="augment: false"):
        resolve_window_on_device(True, "cpu", augment=True)

def test_properties_complete(tiny_preprocessed_dir, tmp_path):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=TRAIN, workflow_type="train", bundle_root=str(BUNDLE),
                        dataset_dir=str(tiny_preprocessed_dir), output_dir=str(tmp_path), model_config="ctclip_tiny",
                        num_workers=0)
    wf.initialize()
    assert wf.check_properties() == []


def test_init_from_published_style_checkpoint(tiny_preprocessed_dir, tmp_path):
    from monai.bundle import ConfigParser

    from custom_nets import create_model, save_reference_checkpoint

    torch.manual_seed(123)
    ref = create_model("ctclip_tiny")
    ckpt = tmp_path / "CT-CLIP_like.pt"
    save_reference_checkpoint(ref, ckpt)  # position_ids and *_extra keys like the published files
    assert "text_transformer.embeddings.position_ids" in _state(ckpt)
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(tiny_preprocessed_dir), "output_dir": str(tmp_path),
                   "model_config": "ctclip_tiny", "pretrained": str(ckpt)})
    net = parser.get_parsed_content("network_def")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(net.model.state_dict()[k], v, msg=k)


def test_ddp_two_gloo_ranks(tiny_preprocessed_dir, tmp_path):
    out = tmp_path / "ddp"
    log = _run(["--config_file", f"['{TRAIN}','{BUNDLE / 'configs' / 'multi_gpu_train.json'}']",
                "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(out), "--epochs", "1"] + FAST,
               out, timeout=300, torchrun=True)
    n_train = len(json.loads((tiny_preprocessed_dir / "datalist.json").read_text())["training"])
    per_rank = -(-n_train // 2)  # DistributedSampler pads to an even split
    it, path = _latest(out)
    assert it == per_rank // 2, "each rank runs its half of the data"
    assert log.count("training state saved") == 1, "only rank 0 writes checkpoints"
    rows = json.loads((out / "eval" / "metrics_per_epoch.json").read_text())
    assert [r["epoch"] for r in rows] == [1] and rows[0]["macro_auroc"] == rows[0]["macro_auroc"]
    assert (out / "models" / "model.pt").exists()


def test_sigkill_and_resume_continues_from_saved_iteration(tiny_preprocessed_dir, tmp_path):
    out = tmp_path / "kill"
    args = ["--config_file", TRAIN, "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(out),
            "--epochs", "3", "--save_interval", "1"] + FAST
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE)] + args
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            it, _ = _latest(out)
            if it is not None and it >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved, _ = _latest(out)
    n_train = len(json.loads((tiny_preprocessed_dir / "datalist.json").read_text())["training"])
    total = 3 * (n_train // 2)
    assert 2 <= saved < total
    _run(args, out)
    log = json.loads((out / "checkpoints" / "resume_log.json").read_text())
    assert log[-1]["iteration"] == saved, "resumed from the newest saved iteration"
    it, path = _latest(out)
    assert it == total and _state(path)["trainer"]["iteration"] == total
    rows = json.loads((out / "eval" / "metrics_per_epoch.json").read_text())
    assert [r["epoch"] for r in rows][-1] == 3


def test_evaluate_config_on_test_split(tiny_preprocessed_dir, tmp_path, tiny_clip_checkpoint):
    out = tmp_path / "eval_run"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.pt").write_bytes(Path(tiny_clip_checkpoint).read_bytes())
    _run(["--config_file", f"['{TRAIN}','{BUNDLE / 'configs' / 'evaluate.json'}']", "--dataset_dir",
          str(tiny_preprocessed_dir), "--output_dir", str(out), "--val_bootstrap", "50"] + FAST, out)
    metrics = json.loads((out / "eval" / "test" / "metrics.json").read_text())
    n_test = len(json.loads((tiny_preprocessed_dir / "datalist.json").read_text())["test"])
    assert metrics["auroc"]["macro"] is None or 0 <= metrics["auroc"]["macro"] <= 1
    assert (out / "eval" / "test" / "retrieval.json").exists()
    assert len((out / "eval" / "test" / "predictions.csv").read_text().strip().splitlines()) == n_test + 1


def test_report_prompt_probabilities_score_reports_like_images():
    """A report that *is* a class's "present" prompt scores above 0.5 for that class: the text-side ceiling
    uses the same prompt-pair softmax as the image zero-shot, with the report latent in the image's place."""
    from custom_nets import ZeroShotClassifier, build_tokenizer, create_model, image_input_shape
    from custom_nets.pretraining import ZeroShotValidationNetwork

    torch.manual_seed(0)
    model = create_model("ctclip_tiny").eval()
    tokenizer = build_tokenizer("ctclip_tiny")
    zero_shot = ZeroShotClassifier.from_config(model, "ctclip_tiny", tokenizer=tokenizer)
    net = ZeroShotValidationNetwork(zero_shot)
    reports = [zero_shot.templates[0][0].format(name) for name in zero_shot.class_names[:3]]
    tokens = tokenizer(reports, padding="longest", return_tensors="pt")
    image = torch.zeros((3, *image_input_shape("ctclip_tiny")))
    with torch.no_grad():
        out = net(image, tokens["input_ids"], tokens["attention_mask"])
        expected = zero_shot.probabilities(model.encode_text(tokens["input_ids"], tokens["attention_mask"]))
    torch.testing.assert_close(out["report_probs"], expected)
    assert (out["report_probs"][range(3), range(3)] > 0.5).all()
    assert "report_probs" not in net(image)
