"""The ct_clip_classfine bundle end to end on the tiny cohort: train (frozen backbone, one epoch), evaluate
(validation, test with validation thresholds, zero-shot baseline), progressive unfreezing, raw DICOM inference.

Runs the configs in-process with ``ConfigWorkflow`` (the code path of ``python -m monai.bundle run``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_nets import ClassFineClassifier, create_model
from received_bundle import dicom_series_folder, received_python, run_bundle, scan_folder, unzip, verify_offline
from workflows.served_bundle import ServedBundle, read_confirmed_labels
from transforms import CTRATE_PATHOLOGIES

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ct_clip_classfine"
CONFIGS = BUNDLE / "configs"
TINY = dict(model_config="ctclip_tiny", num_workers=0, batch_size=4, val_batch_size=4)


def workflow(files, workflow_type="train", **overrides):
    from monai.bundle import ConfigWorkflow

    files = [str(CONFIGS / f) for f in files]
    w = ConfigWorkflow(config_file=files if len(files) > 1 else files[0], meta_file=str(CONFIGS / "metadata.json"),
                       logging_file=str(CONFIGS / "logging.conf"), workflow_type=workflow_type,
                       bundle_root=str(BUNDLE), **overrides)
    w.initialize()
    return w


def run(w):
    w.run()
    w.finalize()
    return w


@pytest.fixture(scope="module")
def trained(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path_factory):
    """ClassFine with the frozen backbone: epoch 1 reads the volumes and caches their latents, epoch 2 runs on
    the cache alone (placeholder items, no disk reads); returns (workflow, output_dir, head weights before)."""
    out = tmp_path_factory.mktemp("classfine_run")
    w = workflow(["train.json"], dataset_dir=str(tiny_preprocessed_dir), output_dir=str(out),
                 pretrained=str(tiny_clip_checkpoint), epochs=2, **TINY)
    head_before = w.parser.get_parsed_content("network").classifier.weight.detach().clone()
    run(w)
    return w, out, head_before


@pytest.fixture(scope="module")
def evaluated(trained, tiny_preprocessed_dir, tiny_clip_checkpoint):
    _, out, _ = trained
    w = workflow(["train.json", "evaluate.json"], dataset_dir=str(tiny_preprocessed_dir), output_dir=str(out),
                 pretrained=str(tiny_clip_checkpoint), n_bootstrap=200, **TINY)
    run(w)
    return out


def test_properties_complete(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path):
    w = workflow(["train.json"], dataset_dir=str(tiny_preprocessed_dir), output_dir=str(tmp_path),
                 pretrained=str(tiny_clip_checkpoint), **TINY)
    assert w.check_properties() == []
    lipro = tmp_path / "lipro.pt"
    torch.save(ClassFineClassifier(create_model("ctclip_tiny")).state_dict(), lipro)
    w = workflow(["inference.json"], "infer", dataset_dir=str(tiny_preprocessed_dir / "datalist.json"),
                 output_dir=str(tmp_path), model_config="ctclip_tiny", ckpt_path=str(lipro))
    assert w.check_properties() == []


def test_metadata_has_required_fields():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright",
                "network_data_format", "intended_use", "references"):
        assert meta.get(key), key
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(CTRATE_PATHOLOGIES)


def test_frozen_backbone_is_bit_identical(trained, tiny_clip_checkpoint):
    w, out, head_before = trained
    pretrained = torch.load(tiny_clip_checkpoint, weights_only=True)
    network = w.parser.get_parsed_content("network")
    after = network.trained_model.state_dict()
    assert set(after) == set(pretrained)
    changed = [k for k in pretrained if not torch.equal(pretrained[k], after[k].cpu())]
    assert changed == [], f"backbone tensors changed during frozen training: {changed[:5]}"
    vq = [k for k in after if "vq._codebook" in k]
    assert {k.rsplit(".", 1)[-1] for k in vq} == {"embed", "cluster_size", "initted"}
    # the head did train, from cached latents after the first pass
    assert not torch.equal(head_before, network.classifier.weight.detach())
    n_train = len(w.parser.get_parsed_content("train#datalist"))
    n_val = len(w.parser.get_parsed_content("validate#datalist"))
    assert network.cache_size == n_train + n_val
    for split in ("train", "validate"):
        ds = w.parser.get_parsed_content(f"{split}#dataset")
        assert ds.all_cached() and ds[0]["image"].numel() == 0


def test_checkpoint_has_lipro_keys_and_loads(trained, tiny_clip_checkpoint):
    _, out, _ = trained
    sd = torch.load(out / "models" / "model.pt", weights_only=True)
    assert {k.split(".", 1)[0] for k in sd} == {"trained_model", "classifier"}
    assert sd["classifier.weight"].shape == (18, 32) and sd["classifier.bias"].shape == (18,)
    model = ClassFineClassifier(create_model("ctclip_tiny"), num_classes=18)
    model.load_state_dict(sd, strict=True)  # plain torch strict load: the CT_LiPro_v2.pt layout
    clip = create_model("ctclip_tiny", checkpoint=str(out / "models" / "model.pt"))  # backbone of a LiPro file
    pretrained = torch.load(tiny_clip_checkpoint, weights_only=True)
    assert torch.equal(clip.to_visual_latent.weight, pretrained["to_visual_latent.weight"])
    assert (out / "models" / "model_final.pt").is_file()
    rows = json.loads((out / "eval" / "metrics_per_epoch.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and "macro_auroc" in rows[0]


def test_evaluate_writes_every_result(evaluated):
    out = evaluated
    for sub in ("validation", "test", "zeroshot/validation", "zeroshot/test"):
        d = out / "eval" / sub
        for f in ("predictions.csv", "metrics.json", "per_class.csv", "per_class.md", "roc_curves.png"):
            assert (d / f).is_file(), d / f
    test = json.loads((out / "eval" / "test" / "metrics.json").read_text())
    assert set(test["protocols"]) == {"val_youden", "ctclip_paper", "vlm3d"}
    assert test["protocols"]["ctclip_paper"]["optimistic"] is True
    for proto in test["protocols"].values():
        assert 0 <= proto["hamming_accuracy"] <= 1 and 0 <= proto["positive_rate"] <= 1
    auc = test["auroc"]
    assert auc["macro_ci_low"] < auc["macro_ci_high"], "degenerate bootstrap CI"
    assert auc["macro_ci_low"] <= auc["macro"] <= auc["macro_ci_high"]
    # test thresholds are the ones fitted on validation, also saved next to the model for inference
    thr = json.loads((out / "models" / "thresholds.json").read_text())
    per_class = test["protocols"]["val_youden"]["per_class"]
    for name, t in zip(thr["class_names"], thr["thresholds"]):
        if t is not None:
            assert per_class[name]["threshold"] == pytest.approx(t)
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert set(comparison["test"]) == {"ClassFine", "Zero-shot (pretrained)"}
    assert (out / "eval" / "comparison.md").read_text().count("| ClassFine |") == 5  # 2 protocols val + 3 test
    with open(out / "eval" / "test" / "predictions.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:19] == ["VolumeName", *CTRATE_PATHOLOGIES]
    assert f"{CTRATE_PATHOLOGIES[0]}_pred_val_youden" in header and f"{CTRATE_PATHOLOGIES[0]}_label" in header


def test_inference_on_a_dicom_folder(evaluated, tiny_cohort_dir, tmp_path):
    out = evaluated
    series = dicom_series_folder(Path(tiny_cohort_dir))
    w = workflow(["inference.json"], "infer", dataset_dir=str(series), output_dir=str(tmp_path),
                 model_config="ctclip_tiny", ckpt_path=str(out / "models" / "model.pt"))
    run(w)
    with open(tmp_path / "inference" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["VolumeName"] == series.name
    probs = np.array([float(rows[0][c]) for c in CTRATE_PATHOLOGIES])
    assert np.all((probs >= 0) & (probs <= 1))
    thr = json.loads((out / "models" / "thresholds.json").read_text())["thresholds"]
    for c, t in zip(CTRATE_PATHOLOGIES, thr):
        cell, p = rows[0][f"{c}_pred_val_youden"], float(rows[0][c])
        if t is None:
            assert cell == ""
        elif abs(p - t) > 1e-6:  # the CSV keeps 6 digits: closer than that, it cannot tell the side
            assert cell == str(int(p >= t))
    # one scan in, the same probabilities as the evaluation of its preprocessed volume
    evaluated_rows = {}
    for split in ("validation", "test"):
        with open(out / "eval" / split / "predictions.csv", newline="") as f:
            evaluated_rows.update({r["VolumeName"]: r for r in csv.DictReader(f)})
    if series.name in evaluated_rows:
        ref = np.array([float(evaluated_rows[series.name][c]) for c in CTRATE_PATHOLOGIES])
        np.testing.assert_allclose(probs, ref, atol=2e-6)


def test_progressive_unfreezing(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path):
    w = workflow(["train.json"], dataset_dir=str(tiny_preprocessed_dir), output_dir=str(tmp_path),
                 pretrained=str(tiny_clip_checkpoint), epochs=2, freeze_epochs=1, backbone_lr=1e-3,
                 **{"train#trainer#epoch_length": 2, **TINY})
    run(w)
    network = w.parser.get_parsed_content("network")
    unfreezer = w.parser.get_parsed_content("train#handlers")[0]
    assert unfreezer.unfrozen_at == 2 and network.freeze_backbone is False
    groups = w.parser.get_parsed_content("optimizer").param_groups
    assert [g["name"] for g in groups] == ["head", "image_encoder"]
    pretrained = torch.load(tiny_clip_checkpoint, weights_only=True)
    after = {k: v.cpu() for k, v in network.trained_model.state_dict().items()}
    moved = {k for k in pretrained if not torch.equal(pretrained[k], after[k])}
    assert any(k.startswith("visual_transformer.enc_spatial_transformer") for k in moved)
    assert "to_visual_latent.weight" in moved
    assert not any(k.startswith("text_transformer.") for k in moved), "text encoder must stay frozen"
    assert not any("vq._codebook" in k for k in moved), "the VQ codebook must not drift"
    assert network.cache_size == 0  # nothing cached once the encoder trains


def test_evaluate_without_zeroshot_baseline(trained, tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path):
    _, out, _ = trained
    w = workflow(["train.json", "evaluate.json"], dataset_dir=str(tiny_preprocessed_dir), output_dir=str(tmp_path),
                 pretrained=str(tiny_clip_checkpoint), ckpt_path=str(out / "models" / "model.pt"), n_bootstrap=0,
                 skip_zeroshot=True, **TINY)
    run(w)
    assert (tmp_path / "eval" / "test" / "metrics.json").is_file()
    assert not (tmp_path / "eval" / "zeroshot").exists()
    assert set(json.loads((tmp_path / "eval" / "comparison.json").read_text())["test"]) == {"ClassFine"}


def test_the_trained_model_travels(evaluated, tiny_cohort_dir, tiny_preprocessed_dir, tmp_path):
    """The trained ClassFine model exported with export.json, unzipped outside the repository and run in a new
    environment with only the bundle's wheel (tests/received_bundle.py): the probabilities and decisions of the
    in-repository run on two NIfTI files and a DICOM series, its README quoting the evaluation."""
    out = evaluated
    ckpt = str(out / "models" / "model.pt")
    export = tmp_path / "export" / "ct_clip_classfine_tiny"
    run(workflow(["inference.json", "export.json"], "infer", model_config="ctclip_tiny", ckpt_path=ckpt,
                 export_dir=str(export), metrics_file=str(out / "eval" / "test" / "metrics.json"),
                 dataset_dir=str(tiny_preprocessed_dir)))
    bundle = unzip(export.with_name(export.name + ".zip"), tmp_path / "partner")
    assert (bundle / "models" / "thresholds.json").read_bytes() == (out / "models" / "thresholds.json").read_bytes()
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(state) == set(ClassFineClassifier(create_model("ctclip_tiny")).state_dict())
    metrics = json.loads((out / "eval" / "test" / "metrics.json").read_text())
    readme = (bundle / "docs" / "README.md").read_text()
    assert f"{metrics['auroc']['macro']:.3f}" in readme and "Research only" in readme

    python = received_python(tmp_path / "venv", next((bundle / "wheels").glob("*.whl")))
    scans, cache = scan_folder(Path(tiny_cohort_dir), tmp_path / "scans"), tmp_path / "cache"
    run_bundle(python, bundle, ["run", "--config_file", "configs/inference.json", "--input", scans,
                                "--output_dir", tmp_path / "theirs"], cache)
    run(workflow(["inference.json"], "infer", input=str(scans), output_dir=str(tmp_path / "ours"),
                 model_config="ctclip_tiny", ckpt_path=ckpt))
    rows = {}
    for side in ("theirs", "ours"):
        with open(tmp_path / side / "inference" / "predictions.csv", newline="") as f:
            rows[side] = list(csv.DictReader(f))
    assert len(rows["theirs"]) == 3 and [r["VolumeName"] for r in rows["theirs"]] == \
        [r["VolumeName"] for r in rows["ours"]]
    for theirs, ours in zip(rows["theirs"], rows["ours"]):
        np.testing.assert_allclose([float(theirs[c]) for c in CTRATE_PATHOLOGIES],
                                   [float(ours[c]) for c in CTRATE_PATHOLOGIES], rtol=0, atol=1e-6)
        assert {k: v for k, v in theirs.items() if k.endswith("_pred_val_youden")} == \
            {k: v for k, v in ours.items() if k.endswith("_pred_val_youden")}
    verify_offline(bundle)

    # the head fine-tuned from confirmed labels (the MONAI Label app's train task), in this environment
    served = ServedBundle(bundle, weights=tmp_path / "finetuned" / "model.pt")
    labels = tmp_path / "confirmed.json"
    labels.write_text(json.dumps({"Cardiomegaly": 1, "Emphysema": 0}))
    confirmed = read_confirmed_labels(labels, served.class_names)
    assert confirmed[CTRATE_PATHOLOGIES.index("Cardiomegaly")] == 1 and np.isnan(confirmed).sum() == 16
    scan = next(scans.glob("*.nii.gz"))
    before = served.predict(scan)["probabilities"]["Cardiomegaly"]
    summary = served.fine_tune_head([(scan, confirmed)], served.weights, epochs=50)
    assert summary["loss_after"] < summary["loss_before"] and summary["confirmed_labels"] == 2
    fresh = ServedBundle(bundle, weights=served.weights)  # a new process would load the written file strictly
    assert fresh.predict(scan)["probabilities"]["Cardiomegaly"] > before
    labels.write_text(json.dumps({"Cardiomegaly": 2}))
    with pytest.raises(ValueError, match="'Cardiomegaly' is 2, expected 0 or 1"):
        read_confirmed_labels(labels, served.class_names)
    labels.write_text(json.dumps({"Pneumothorax": 1}))
    with pytest.raises(ValueError, match="not classes of this model"):
        read_confirmed_labels(labels, served.class_names)
