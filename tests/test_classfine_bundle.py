"""The ct_clip_classfine bundle end to end on the tiny cohort: train (frozen backbone, one epoch), evaluate
(validation, test with validation thresholds and calibration, zero-shot baseline), progressive unfreezing, raw DICOM
inference (calibrated, and without a calibration file).

Runs the configs in-process with ``ConfigWorkflow`` (the code path of ``python -m monai.bundle run``).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctclip_contract.errors import root_cause
from custom_nets import ClassFineClassifier, create_model
from received_bundle import dicom_series_folder, nifti_scans, received_python, run_bundle, scan_folder, unzip, verify_offline
from workflows.calibration import load_calibration
from workflows.served_bundle import ServedBundle, read_confirmed_labels
from workflows.writers import read_predictions_csv
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
        for f in ("predictions.csv", "metrics.json", "per_class.csv", "per_class.md", "roc_curves.png",
                  "reliability.png"):
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
    # 2 protocols val + 3 test, and one ECE row per split
    assert (out / "eval" / "comparison.md").read_text().count("| ClassFine |") == 7
    with open(out / "eval" / "test" / "predictions.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:19] == ["VolumeName", *CTRATE_PATHOLOGIES]
    assert f"{CTRATE_PATHOLOGIES[0]}_pred_val_youden" in header and f"{CTRATE_PATHOLOGIES[0]}_label" in header


def test_evaluate_fits_calibration_on_validation_and_reports_ece_on_test(evaluated):
    out = evaluated
    cal = load_calibration(out / "models" / "calibration.json", CTRATE_PATHOLOGIES, required=True)
    assert cal.method == "platt"  # the default of evaluate.json
    _, vp, vy = read_predictions_csv(out / "eval" / "validation" / "predictions.csv", with_labels=True)
    assert cal.info["n_validation"] == len(vp) and cal.info["source"].endswith("validation/predictions.csv")
    # the test split: ECE of the uncalibrated probabilities and of the calibrated ones, from the written predictions
    from workflows.metrics import expected_calibration_error

    _, tp, ty = read_predictions_csv(out / "eval" / "test" / "predictions.csv", with_labels=True)
    test = json.loads((out / "eval" / "test" / "metrics.json").read_text())
    block = test["calibration"]
    assert block["n_bins"] == 10 and block["calibrated"]["method"] == "platt"
    assert block["uncalibrated"]["ece_macro"] == pytest.approx(expected_calibration_error(ty, tp)["macro"], abs=1e-5)
    assert block["calibrated"]["ece_macro"] == pytest.approx(  # tp keeps 6 decimals
        expected_calibration_error(ty, cal.apply(tp))["macro"], abs=2e-3)
    validation = json.loads((out / "eval" / "validation" / "metrics.json").read_text())
    assert "calibrated" not in validation["calibration"]  # nothing is fitted yet when validation is evaluated
    assert "uncalibrated" in json.loads((out / "eval" / "zeroshot" / "test" / "metrics.json").read_text())["calibration"]
    # the thresholds file says what they decide on the calibrated probability: the same cases
    thr = json.loads((out / "models" / "thresholds.json").read_text())
    assert thr["calibration"] == "calibration.json"
    raw = np.array([np.nan if t is None else t for t in thr["thresholds"]])
    mapped = np.array([np.nan if t is None else t for t in thr["thresholds_calibrated"]])
    np.testing.assert_allclose(mapped, cal.thresholds(raw), rtol=1e-12)
    ok = ~np.isnan(raw)
    np.testing.assert_array_equal((tp >= raw)[:, ok], (cal.apply(tp) >= mapped)[:, ok])
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert comparison["test"]["ClassFine"]["ece_calibrated"] == pytest.approx(block["calibrated"]["ece_macro"])


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
    # the probabilities are calibrated, and decided at the validation thresholds mapped through the calibration
    thr = json.loads((out / "models" / "thresholds.json").read_text())["thresholds_calibrated"]
    for c, t in zip(CTRATE_PATHOLOGIES, thr):
        cell, p = rows[0][f"{c}_pred_val_youden"], float(rows[0][c])
        if t is None:
            assert cell == ""
        elif abs(p - t) > 1e-6:  # the CSV keeps 6 digits: closer than that, it cannot tell the side
            assert cell == str(int(p >= t))
    # one scan in, the same probabilities as the evaluation of its preprocessed volume, calibrated
    cal = load_calibration(out / "models" / "calibration.json", CTRATE_PATHOLOGIES)
    evaluated_rows = {}
    for split in ("validation", "test"):
        with open(out / "eval" / split / "predictions.csv", newline="") as f:
            evaluated_rows.update({r["VolumeName"]: r for r in csv.DictReader(f)})
    if series.name in evaluated_rows:
        ref = np.array([float(evaluated_rows[series.name][c]) for c in CTRATE_PATHOLOGIES])
        # ref keeps 6 decimals: within 5e-7 of the model's probability; the increasing map brackets the calibrated one
        low, high = cal.apply(np.clip(ref - 5e-7, 0, 1)), cal.apply(np.clip(ref + 5e-7, 0, 1))
        assert np.all((probs >= low - 1e-6) & (probs <= high + 1e-6))
        raw_thr = json.loads((out / "models" / "thresholds.json").read_text())["thresholds"]
        for c, t, r in zip(CTRATE_PATHOLOGIES, raw_thr, ref):
            if t is not None and abs(r - t) > 1e-6:  # the decision of the uncalibrated probability
                assert rows[0][f"{c}_pred_val_youden"] == str(int(r >= t))


def test_inference_without_a_calibration_file_gives_raw_probabilities_and_says_so_once(
        evaluated, tiny_preprocessed_dir, tmp_path, capsys):
    out = evaluated
    models = tmp_path / "models"
    models.mkdir()
    for name in ("model.pt", "thresholds.json"):  # a run evaluated before calibration existed
        shutil.copy(out / "models" / name, models / name)
    datalist = json.loads((tiny_preprocessed_dir / "datalist.json").read_text())
    capsys.readouterr()
    run(workflow(["inference.json"], "infer", dataset_dir=str(tiny_preprocessed_dir / "datalist.json"),
                 output_dir=str(tmp_path / "run"), model_config="ctclip_tiny", ckpt_path=str(models / "model.pt")))
    # the bundle's logging.conf sends the log to stdout
    said = [line for line in capsys.readouterr().out.splitlines() if "calibration file" in line]
    assert len(said) == 1 and str(models / "calibration.json") in said[0] and "uncalibrated" in said[0], said
    names, probs = read_predictions_csv(tmp_path / "run" / "inference" / "predictions.csv")
    test_names, test_probs = read_predictions_csv(out / "eval" / "test" / "predictions.csv")
    ref = dict(zip(test_names, test_probs))
    assert {it["name"] for it in datalist["test"]} <= set(names)
    for name, p in zip(names, probs):
        if name in ref:
            np.testing.assert_allclose(p, ref[name], atol=2e-6)  # the uncalibrated probabilities of evaluation
    # a corrupt calibration file stops the run with its name and the reason
    (models / "calibration.json").write_text('{"method": "platt", "parameters": {"Cardiomegaly": {"scale": 0}}}')
    with pytest.raises(Exception) as err:  # MONAI wraps it; the one-line summary is its cause
        run(workflow(["inference.json"], "infer", dataset_dir=str(tiny_preprocessed_dir / "datalist.json"),
                     output_dir=str(tmp_path / "run2"), model_config="ctclip_tiny", ckpt_path=str(models / "model.pt")))
    cause = str(root_cause(err.value))
    assert cause == f"calibration file {models / 'calibration.json'}: 'Cardiomegaly' bias is None, expected a finite " \
                    "number", cause
    assert not (tmp_path / "run2" / "inference" / "predictions.csv").exists()


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



def test_head_on_the_embedding_trains_evaluates_and_serves(tiny_preprocessed_dir, tiny_clip_checkpoint,
                                                           tiny_cohort_dir, tmp_path):
    """``--head_input embedding`` at training; evaluate.json, inference.json and the export read the head from the
    checkpoint; the MONAI Label app's bundle serves it and fine-tunes its head."""
    w = run(workflow(["train.json"], dataset_dir=str(tiny_preprocessed_dir), output_dir=str(tmp_path),
                     pretrained=str(tiny_clip_checkpoint), epochs=2, head_input="embedding", **TINY))
    assert w.parser.get_parsed_content("network").classifier.in_features == create_model("ctclip_tiny").dim_image
    ckpt = tmp_path / "models" / "model.pt"
    assert "embedding_norm.running_var" in torch.load(ckpt, weights_only=True)
    run(workflow(["train.json", "evaluate.json"], dataset_dir=str(tiny_preprocessed_dir), output_dir=str(tmp_path),
                 pretrained=str(tiny_clip_checkpoint), n_bootstrap=0, skip_zeroshot=True, **TINY))
    metrics = json.loads((tmp_path / "eval" / "test" / "metrics.json").read_text())
    assert 0.0 <= metrics["auroc"]["macro"] <= 1.0
    served = workflow(["inference.json"], workflow_type="infer", dataset_dir=str(tiny_preprocessed_dir),
                      output_dir=str(tmp_path / "infer"), ckpt_path=str(ckpt), model_config="ctclip_tiny")
    assert served.parser.get_parsed_content("network").head_input == "embedding"
    export = tmp_path / "export" / "ct_clip_classfine_tiny"
    run(workflow(["inference.json", "export.json"], "infer", model_config="ctclip_tiny", ckpt_path=str(ckpt),
                 export_dir=str(export), metrics_file=str(tmp_path / "eval" / "test" / "metrics.json"),
                 dataset_dir=str(tiny_preprocessed_dir), make_zip=False))
    assert "BatchNorm(image embedding)" in (export / "docs" / "README.md").read_text()  # the receiver is told
    scan = nifti_scans(scan_folder(Path(tiny_cohort_dir), tmp_path / "scans"))[0]
    app = ServedBundle(export, weights=tmp_path / "finetuned" / "model.pt")
    before = app.predict(scan)["probabilities"]["Cardiomegaly"]
    confirmed = np.full(len(CTRATE_PATHOLOGIES), np.nan)
    confirmed[CTRATE_PATHOLOGIES.index("Cardiomegaly")] = 1
    summary = app.fine_tune_head([(scan, confirmed)], app.weights, epochs=50)
    assert summary["loss_after"] < summary["loss_before"]
    assert ServedBundle(export, weights=app.weights).predict(scan)["probabilities"]["Cardiomegaly"] > before

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
    for name in ("thresholds.json", "calibration.json"):
        assert (bundle / "models" / name).read_bytes() == (out / "models" / name).read_bytes(), name
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

    # the MONAI Label app's in-memory bundle: the same calibrated probabilities and decisions
    scan = nifti_scans(scans)[0]
    ours_row = next(r for r in rows["ours"] if r["VolumeName"] == scan.name.split(".")[0])
    served_result = ServedBundle(bundle).predict(scan)
    assert served_result["calibration"].startswith("platt calibration fitted on")
    np.testing.assert_allclose([served_result["probabilities"][c] for c in CTRATE_PATHOLOGIES],
                               [float(ours_row[c]) for c in CTRATE_PATHOLOGIES], atol=1e-6)
    for c in CTRATE_PATHOLOGIES:
        if served_result["decisions"][c] is not None and \
                abs(served_result["probabilities"][c] - served_result["thresholds"][c]) > 1e-6:
            assert str(served_result["decisions"][c]) == ours_row[f"{c}_pred_val_youden"]

    # the head fine-tuned from confirmed labels (the MONAI Label app's train task), in this environment
    served = ServedBundle(bundle, weights=tmp_path / "finetuned" / "model.pt")
    labels = tmp_path / "confirmed.json"
    labels.write_text(json.dumps({"Cardiomegaly": 1, "Emphysema": 0}))
    confirmed = read_confirmed_labels(labels, served.class_names)
    assert confirmed[CTRATE_PATHOLOGIES.index("Cardiomegaly")] == 1 and np.isnan(confirmed).sum() == 16
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
