"""The slice-fusion encoder through the bundles' existing entry points, chosen by ``--model_config`` alone:
pretraining (a command, as a user types it), zero-shot evaluation, retrieval, ClassFine, and an export whose
embedded model config rebuilds the encoder with no download and reproduces its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctclip_contract import read_json
from custom_nets import create_model, load_checkpoint
from custom_nets.ctclip import POSITION_IDS_KEY
from received_bundle import nifti_scans
from workflows.served_bundle import ServedBundle

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
MODEL = "slicefusion_tiny"


def _bundle_run(bundle: str, configs: list[str], **overrides) -> None:
    """In this process, what ``python -m monai.bundle run`` calls."""
    from monai.bundle import run

    folder = BUNDLES / bundle / "configs"
    run(config_file=[str(folder / c) for c in configs], meta_file=str(folder / "metadata.json"),
        logging_file=str(folder / "logging.conf"), bundle_root=str(BUNDLES / bundle), model_config=MODEL,
        num_workers=0, **overrides)


@pytest.fixture(scope="module")
def pretrained(tiny_preprocessed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("slice_fusion_pretrain")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLES / "ct_clip_pretrain"),
           "--config_file", str(BUNDLES / "ct_clip_pretrain" / "configs" / "train.json"),
           "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(out), "--model_config", MODEL,
           "--epochs", "1", "--batch_size", "2", "--val_batch_size", "4", "--num_workers", "0", "--progress", "False"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def test_pretraining_trains_the_slice_fusion_encoder(pretrained):
    rows = json.loads((pretrained / "eval" / "metrics_per_epoch.json").read_text())
    assert [r["epoch"] for r in rows] == [1] and 0.0 <= rows[0]["macro_auroc"] <= 1.0
    trained = torch.load(pretrained / "models" / "model.pt", map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    fresh = create_model(MODEL).state_dict()
    backbone = [k for k in trained if k.startswith("visual_transformer.backbone.")]
    assert backbone and set(trained) - {POSITION_IDS_KEY} == set(fresh)  # CT-CLIP's key set, as for CTViT
    model = create_model(MODEL)
    load_checkpoint(model, pretrained / "models" / "model.pt")  # strict


def test_zero_shot_retrieval_and_classfine_take_it_by_model_config(pretrained, tiny_preprocessed_dir, tmp_path):
    common = dict(dataset_dir=str(tiny_preprocessed_dir), pretrained=str(pretrained / "models" / "model.pt"))
    _bundle_run("ct_clip_zeroshot", ["inference.json", "evaluate.json"], output_dir=str(tmp_path / "zs"),
                n_bootstrap=50, **common)
    metrics = json.loads((tmp_path / "zs" / "eval" / "test" / "metrics.json").read_text())
    assert 0.0 <= metrics["auroc"]["macro"] <= 1.0
    _bundle_run("ct_clip_zeroshot", ["inference.json", "retrieval.json"], output_dir=str(tmp_path / "zs"),
                split="all", batch_size=2, **common)
    assert "report_to_volume" in json.dumps(read_json(tmp_path / "zs" / "retrieval" / "metrics.json"))
    _bundle_run("ct_clip_classfine", ["train.json"], output_dir=str(tmp_path / "cf"), epochs=1, batch_size=4,
                val_batch_size=4, **common)
    assert (tmp_path / "cf" / "models" / "model.pt").is_file()


def test_the_export_rebuilds_the_encoder_offline_and_serves_it(pretrained, tiny_cohort_dir, tmp_path):
    export = tmp_path / "exported"
    _bundle_run("ct_clip_zeroshot", ["inference.json", "export.json"], pretrained=str(pretrained / "models" / "model.pt"),
                export_dir=str(export), make_zip=False)
    embedded = read_json(export / "configs" / "inference.json")["model_config"]
    backbone = embedded["image_encoder"]["backbone"]
    assert embedded["image_encoder"]["type"] == "slice_fusion"
    assert backbone["load_pretrained_weights"] is False and backbone["config"]["hidden_size"] == 32
    original = create_model(MODEL)
    load_checkpoint(original, pretrained / "models" / "model.pt")
    rebuilt = create_model(embedded, text_encoder={"pretrained": str(export / "models" / "text_encoder"),
                                                   "tokenizer": str(export / "models" / "text_encoder")})
    sd = torch.load(export / "models" / "model.pt", map_location="cpu", weights_only=True)
    rebuilt.load_state_dict(sd, strict=True)
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().encode_image(x), original.eval().encode_image(x))
    # what the MONAI Label app serves: the exported bundle held in memory, one raw scan per call
    scan = nifti_scans(tiny_cohort_dir)[0]
    result = ServedBundle(export).predict(scan)
    assert len(result["probabilities"]) == 18 and all(0 <= v <= 1 for v in result["probabilities"].values())
