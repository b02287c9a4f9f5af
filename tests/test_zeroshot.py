"""Zero-shot bundle: the classifier against the reference procedure (parity fixture weights), the prompt
file, raw DICOM input through the same preprocessing as ct_preprocess, evaluation and the export."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_nets import CTCLIP, ZeroShotClassifier, build_tokenizer, create_model, load_model_config
from transforms import CTRATE_PATHOLOGIES
from workflows import zeroshot

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_clip_zeroshot"
CONFIGS = BUNDLE / "configs"
DATA = Path(__file__).parent / "data"
TOL = 1e-5


def run_bundle(*configs: str, **overrides) -> None:
    """Run bundle configs (merged in order) in this process, as ``python -m monai.bundle run`` does."""
    from monai.bundle import run

    run(config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(BUNDLE), **overrides)


def read_predictions(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0].keys())
    return header, {r["VolumeName"]: r for r in rows}


def probs_of(rows: dict, classes) -> dict[str, np.ndarray]:
    return {name: np.array([float(r[c]) for c in classes]) for name, r in rows.items()}


# ------------------------------------------------------------------------------------- parity fixture
@pytest.fixture(scope="module")
def parity():
    fx = torch.load(DATA / "parity_small.pt", weights_only=True)
    cfg = fx["configs"]
    model = CTCLIP.from_reference_config(ctvit=cfg["ctvit"], bert=cfg["bert"], ctclip=cfg["ctclip"])
    model.load_state_dict(fx["state_dict"], strict=True)
    tokenizer = build_tokenizer({"tokenizer": "builtin:wordpiece"})
    return fx, model.eval(), tokenizer


def reference_procedure(model, tokenizer, volume, names, template, max_length):
    """CT-CLIP's zero_shot.py: one full forward per pathology with the prompt pair padded to max_length."""
    out = []
    for name in names:
        tok = tokenizer([template[0].format(name), template[1].format(name)], padding="max_length",
                        truncation=True, max_length=max_length, return_tensors="pt")
        logits = model.reference_forward(tok["input_ids"], volume, text_attention_mask=tok["attention_mask"])
        out.append(logits.softmax(dim=0)[0])
    return torch.stack(out)


@torch.no_grad()
def test_classifier_gives_the_reference_procedures_probabilities(parity):
    fx, model, tokenizer = parity
    i, o = fx["inputs"], fx["outputs"]
    # our reference procedure is the reference: the fixture's own prompt pair gives its stored probability
    sim = model.reference_forward(i["input_ids"], i["volume"], text_attention_mask=i["attention_mask"])
    assert abs(float(sim.softmax(0)[0]) - float(o["zero_shot_prob_present"])) <= TOL

    prompts = zeroshot.load_prompt_file(CONFIGS / "prompts.json")
    assert prompts["classes"] == list(CTRATE_PATHOLOGIES)
    assert prompts["templates"] is None  # the shipped file takes the model config's templates
    templates = [tuple(t) for t in load_model_config("ctclip_v2")["prompts"]["templates"]]
    assert templates == [("{} is present.", "{} is not present.")]
    max_length = fx["configs"]["bert"]["max_position_embeddings"]  # the reference pads to 512; this BERT has 64
    clf = ZeroShotClassifier(model, tokenizer, prompts["prompt_names"], templates, max_length=max_length)
    volumes = torch.cat([i["volume"], i["volume_pair"]])  # three volumes in one batch
    ours = clf(volumes)
    assert ours.shape == (3, 18)
    for b in range(3):
        names = CTRATE_PATHOLOGIES if b == 0 else CTRATE_PATHOLOGIES[b::6]  # all 18 once, then a sample (time)
        cols = [CTRATE_PATHOLOGIES.index(n) for n in names]
        ref = reference_procedure(model, tokenizer, volumes[b:b + 1], names, templates[0], max_length)
        err = float((ours[b, cols] - ref).abs().max())
        assert err <= TOL, f"volume {b}: max |ours - reference| = {err:.2e}"
    # the volumes differ, so equal rows would mean the image did not reach the probabilities
    assert float((ours[0] - ours[1]).abs().max()) > 1e-4


@torch.no_grad()
def test_several_templates_are_averaged(parity, tmp_path):
    fx, model, tokenizer = parity
    volume = fx["inputs"]["volume"]
    pairs = [["{} is present.", "{} is not present."], ["There is {}.", "There is no {}."]]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"templates": pairs, "classes": ["Cardiomegaly", "Emphysema"]}))
    p = zeroshot.load_prompt_file(path)
    clf = ZeroShotClassifier(model, tokenizer, p["prompt_names"], p["templates"], max_length=64)
    got = clf(volume)[0]
    per_template = [reference_procedure(model, tokenizer, volume, p["prompt_names"], t, 64) for t in pairs]
    assert float((got - (per_template[0] + per_template[1]) / 2).abs().max()) <= TOL
    assert float((per_template[0] - per_template[1]).abs().max()) > 1e-4  # the templates do matter


@torch.no_grad()
def test_decomposed_scoring_gives_each_class_its_own_part_of_the_latent(parity):
    fx, model, tokenizer = parity
    names = ["Cardiomegaly", "Emphysema", "Pleural effusion", "Lung nodule"]
    pairwise = ZeroShotClassifier(model, tokenizer, names, max_length=64)
    decomposed = ZeroShotClassifier(model, tokenizer, names, max_length=64, scoring="decomposed", ridge=0.0)
    prompts = pairwise.prompt_latents()
    directions = prompts[0, 0] - prompts[0, 1]  # (classes, dim)
    # a latent made of cardiomegaly and effusion only: each class gets back its own part, the others nothing
    coef = torch.tensor([0.7, 0.0, 0.4, 0.0])
    latent = (coef[:, None] * directions).sum(0, keepdim=True)
    expected = coef * (directions * directions).sum(-1)
    assert torch.allclose(decomposed.evidence(latent)[0, 0], expected, rtol=1e-3, atol=1e-3 * float(expected.max()))
    # pairwise scoring credits the absent classes too: the prompt directions overlap
    absent = pairwise.evidence(latent)[0, 0, [1, 3]]
    assert float(absent.abs().max()) > 0.05 * float(expected.max())
    # the ridge shrinks the evidence towards 0 (probability 0.5)
    ridged = ZeroShotClassifier(model, tokenizer, names, max_length=64, scoring="decomposed", ridge=1.0)
    assert 0 < float(ridged.evidence(latent)[0, 0, 0]) < float(decomposed.evidence(latent)[0, 0, 0])
    # with orthogonal directions the decomposition is the pairwise evidence
    orthogonal = torch.linalg.qr(torch.randn(prompts.shape[-1], 4, generator=torch.Generator().manual_seed(0)))[0].T
    fake = torch.stack([orthogonal * 0.5, -orthogonal * 0.5], 0)[None]  # (1 template, 2, classes, dim)
    for clf in (pairwise, decomposed):
        clf.prompt_latents = lambda fake=fake: fake
    latents = torch.randn(3, prompts.shape[-1], generator=torch.Generator().manual_seed(1))
    assert torch.allclose(decomposed.probabilities(latents), pairwise.probabilities(latents), atol=1e-5)
    # the model config chooses the scoring
    cfg = {**load_model_config("ctclip_v2"), "prompts": {"templates": [["{} is seen.", "No {}."]],
                                                           "scoring": "decomposed", "ridge": 0.2}}
    built = ZeroShotClassifier.from_config(model, cfg, tokenizer=tokenizer, class_names=names)
    assert (built.scoring, built.ridge) == ("decomposed", 0.2)
    assert ZeroShotClassifier.from_config(model, "ctclip_v2", tokenizer=tokenizer).scoring == "pairwise"
    with pytest.raises(ValueError, match="scoring"):
        ZeroShotClassifier(model, tokenizer, names, scoring="joint")


def test_prompt_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        zeroshot.load_prompt_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"templates": [["{} is present.", "absent"]], "classes": ["Cardiomegaly"]}))
    with pytest.raises(ValueError, match="bad.json.*'absent'"):
        zeroshot.load_prompt_file(bad)
    bad.write_text(json.dumps({"templates": [["{} yes", "{} no"]], "classes": ["A", "A"]}))
    with pytest.raises(ValueError, match="duplicate"):
        zeroshot.load_prompt_file(bad)
    with pytest.raises(ValueError, match="Pneumothorax.*no CT-RATE label"):
        zeroshot.label_indices(["Cardiomegaly", "Pneumothorax"])
    assert zeroshot.label_indices(["emphysema", "Medical material"]) == [7, 0]


@pytest.mark.parametrize("configs", [["inference.json"], ["inference.json", "evaluate.json"],
                                     ["inference.json", "retrieval.json"]])
def test_configs_have_the_standard_inference_properties(configs, tiny_preprocessed_dir, tiny_clip_checkpoint):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=str(CONFIGS / "logging.conf"), workflow_type="infer", bundle_root=str(BUNDLE),
                        dataset_dir=str(tiny_preprocessed_dir), model_config="ctclip_tiny",
                        pretrained=str(tiny_clip_checkpoint), num_workers=0)
    wf.initialize()
    assert wf.check_properties() == []


def test_metadata_has_the_required_fields():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright", "intended_use",
                "references"):
        assert meta.get(key), key
    assert meta["version"] in meta["changelog"]
    assert set(meta["network_data_format"]) == {"inputs", "outputs"}
    assert len(meta["network_data_format"]["outputs"]["pred"]["channel_def"]) == len(CTRATE_PATHOLOGIES)


# ------------------------------------------------------------------------------------- bundle runs
@pytest.fixture(scope="module")
def stored_run(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path_factory):
    """inference.json on every preprocessed volume, with embeddings."""
    out = tmp_path_factory.mktemp("zs_stored")
    run_bundle("inference.json", dataset_dir=str(tiny_preprocessed_dir), split="all", output_dir=str(out),
               model_config="ctclip_tiny", pretrained=str(tiny_clip_checkpoint), save_embeddings=True, num_workers=0,
               n_bootstrap=50)
    return out


def test_inference_writes_predictions_metrics_and_embeddings(stored_run, tiny_preprocessed_dir, tiny_clip_checkpoint):
    header, rows = read_predictions(stored_run / "predictions.csv")
    assert header[:19] == ["VolumeName", *CTRATE_PATHOLOGIES]
    datalist = json.loads((tiny_preprocessed_dir / "datalist.json").read_text())
    names = sorted(it["name"] for split in datalist.values() for it in split)
    assert sorted(rows) == names
    probs = np.stack(list(probs_of(rows, CTRATE_PATHOLOGIES).values()))
    assert np.all((probs > 0) & (probs < 1)) and probs.std(axis=0).max() > 1e-4
    assert (stored_run / "metrics.json").is_file()  # the datalist has labels

    emb = np.load(stored_run / "embeddings.npz")
    assert sorted(emb.files) == names
    # the exported latent is the model's image latent of that volume, and gives the written probabilities
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from transforms import ToModelInputd

    model = create_model("ctclip_tiny", checkpoint=str(tiny_clip_checkpoint)).eval()
    item = datalist["test"][0]
    load = Compose([LoadImaged("image", reader="ITKReader", image_only=True), EnsureChannelFirstd("image"),
                    ToModelInputd.from_model_config("image", model.config)])
    image = load({"image": str(tiny_preprocessed_dir / item["image"])})["image"]
    with torch.no_grad():
        latent = model.encode_image(image.as_tensor()[None])[0]
        clf = ZeroShotClassifier.from_config(model, model.config)
        p = clf.probabilities(torch.as_tensor(emb[item["name"]])[None])[0].numpy()
    assert emb[item["name"]].shape == (model.dim_latent,)
    assert np.abs(emb[item["name"]] - latent.numpy()).max() <= TOL
    assert np.abs(p - probs_of(rows, CTRATE_PATHOLOGIES)[item["name"]]).max() <= TOL


def _raw_dicom_cohort(tiny_cohort_dir: Path, dest: Path) -> list[str]:
    """The DICOM series of the tiny cohort with the cohort's tables: a raw DICOM cohort."""
    from transforms.qc import is_dicom_file

    (dest / "volumes").mkdir(parents=True)
    names = []
    for folder in sorted(p for p in (tiny_cohort_dir / "volumes").rglob("*") if p.is_dir()):
        if any(is_dicom_file(f) for f in folder.iterdir() if f.is_file()):
            shutil.copytree(folder, dest / "volumes" / folder.name)
            names.append(folder.name)
    for table in tiny_cohort_dir.glob("*.csv"):
        shutil.copy(table, dest / table.name)
    return names


def test_raw_dicom_cohort_gives_the_same_probabilities_as_preprocessed_input(
        stored_run, tiny_cohort_dir, tiny_clip_checkpoint, tmp_path):
    names = _raw_dicom_cohort(Path(tiny_cohort_dir), tmp_path / "raw")
    assert len(names) >= 2, "the tiny cohort should contain DICOM series"
    out = tmp_path / "out"
    run_bundle("inference.json", input=str(tmp_path / "raw"), output_dir=str(out), model_config="ctclip_tiny",
               pretrained=str(tiny_clip_checkpoint), num_workers=0, n_bootstrap=0)
    _, raw_rows = read_predictions(out / "predictions.csv")
    assert sorted(raw_rows) == sorted(names)
    _, stored_rows = read_predictions(stored_run / "predictions.csv")
    raw, stored = probs_of(raw_rows, CTRATE_PATHOLOGIES), probs_of(stored_rows, CTRATE_PATHOLOGIES)
    for name in names:  # "one scan in, probabilities out" = ct_preprocess + inference on the stored volume
        err = np.abs(raw[name] - stored[name]).max()
        assert err <= TOL, f"{name}: raw DICOM path differs from the preprocessed path by {err:.2e}"
    assert (out / "metrics.json").is_file()  # labels came from the cohort's tables


def test_single_scan_input(stored_run, tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path):
    datalist = json.loads((tiny_preprocessed_dir / "datalist.json").read_text())
    item = datalist["validation"][0]
    run_bundle("inference.json", input=str(tiny_preprocessed_dir / item["image"]), output_dir=str(tmp_path),
               model_config="ctclip_tiny", pretrained=str(tiny_clip_checkpoint), num_workers=0)
    _, rows = read_predictions(tmp_path / "predictions.csv")
    _, stored = read_predictions(stored_run / "predictions.csv")
    assert list(rows) == [item["name"]]
    assert not (tmp_path / "metrics.json").exists()  # no labels for a lone scan
    a, b = probs_of(rows, CTRATE_PATHOLOGIES)[item["name"]], probs_of(stored, CTRATE_PATHOLOGIES)[item["name"]]
    assert np.abs(a - b).max() <= TOL


def test_added_pathology_in_the_prompt_file(stored_run, tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path):
    spec = json.loads((CONFIGS / "prompts.json").read_text())
    spec["classes"].append({"name": "Pneumothorax", "prompt": "pneumothorax"})
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(spec))
    out = tmp_path / "out"
    run_bundle("inference.json", dataset_dir=str(tiny_preprocessed_dir), split="test", output_dir=str(out),
               model_config="ctclip_tiny", pretrained=str(tiny_clip_checkpoint), prompt_file=str(prompt_file),
               num_workers=0)
    header, rows = read_predictions(out / "predictions.csv")
    assert header == ["VolumeName", *CTRATE_PATHOLOGIES, "Pneumothorax"]
    assert not (out / "metrics.json").exists()  # the new class has no label column: predictions only
    _, stored = read_predictions(stored_run / "predictions.csv")
    old, new = probs_of(stored, CTRATE_PATHOLOGIES), probs_of(rows, CTRATE_PATHOLOGIES)
    emb = np.load(stored_run / "embeddings.npz")
    model = create_model("ctclip_tiny", checkpoint=str(tiny_clip_checkpoint)).eval()
    tok = build_tokenizer(model.config)(["pneumothorax is present.", "pneumothorax is not present."],
                                        padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        text = model.encode_text(tok["input_ids"], tok["attention_mask"])
    for name, r in rows.items():
        assert np.abs(new[name] - old[name]).max() <= TOL  # the other classes are untouched
        logits = torch.as_tensor(emb[name]) @ text.t() * model.temperature.exp()
        expected = float(logits.softmax(0)[0])
        assert abs(float(r["Pneumothorax"]) - expected) <= TOL


def test_evaluate_command_fits_test_thresholds_on_validation(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path):
    from workflows.metrics import fit_thresholds_youden, macro_auroc
    from workflows.writers import read_predictions_csv

    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']",
           "--bundle_root", str(BUNDLE), "--dataset_dir", str(tiny_preprocessed_dir), "--output_dir", str(tmp_path),
           "--model_config", "ctclip_tiny", "--pretrained", str(tiny_clip_checkpoint), "--num_workers", "0",
           "--n_bootstrap", "100"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("validation", "test"):
        for f in ("predictions.csv", "metrics.json", "per_class.csv", "per_class.md", "roc_curves.png",
                  "reliability.png"):
            assert (tmp_path / "eval" / split / f).is_file(), f"{split}/{f}"
    _, vp, vy = read_predictions_csv(tmp_path / "eval" / "validation" / "predictions.csv", with_labels=True)
    _, tp, ty = read_predictions_csv(tmp_path / "eval" / "test" / "predictions.csv", with_labels=True)
    metrics = json.loads((tmp_path / "eval" / "test" / "metrics.json").read_text())
    assert set(metrics["protocols"]) == {"val_youden", "ctclip_paper", "vlm3d"}
    thresholds = fit_thresholds_youden(vy, vp)
    written = [metrics["protocols"]["val_youden"]["per_class"][c]["threshold"] for c in CTRATE_PATHOLOGIES]
    for t_fit, t_written in zip(thresholds, written):
        assert (t_written is None and np.isnan(t_fit)) or abs(t_fit - t_written) <= 1e-9
    assert abs(metrics["auroc"]["macro"] - macro_auroc(ty, tp)[0]) <= 1e-9
    assert metrics["n_cases"] == len(json.loads((tiny_preprocessed_dir / "datalist.json").read_text())["test"])
    assert "macro ECE (10 bins)" in proc.stdout + proc.stderr  # the summary line

    # the calibration fitted on validation (the test predictions stay uncalibrated), its ECE on test
    from workflows.calibration import fit_calibration, load_calibration
    from workflows.metrics import expected_calibration_error

    cal = load_calibration(tmp_path / "eval" / "calibration.json", CTRATE_PATHOLOGIES, required=True)
    refit = fit_calibration(vy, vp, "platt", CTRATE_PATHOLOGIES)
    np.testing.assert_allclose(cal.scale, refit.scale, rtol=1e-6)
    block = metrics["calibration"]
    assert block["calibrated"]["method"] == "platt"
    assert block["uncalibrated"]["ece_macro"] == pytest.approx(expected_calibration_error(ty, tp)["macro"], abs=1e-5)
    # predictions.csv keeps 6 decimals, and the map is steep where the softmax saturates: close, not equal
    assert block["calibrated"]["ece_macro"] == pytest.approx(
        expected_calibration_error(ty, cal.apply(tp))["macro"], abs=2e-3)
    # inference applies it: the test volumes' probabilities are the calibrated evaluation probabilities
    out = tmp_path / "calibrated"
    run_bundle("inference.json", dataset_dir=str(tiny_preprocessed_dir), split="test", output_dir=str(out),
               model_config="ctclip_tiny", pretrained=str(tiny_clip_checkpoint), num_workers=0, n_bootstrap=0,
               calibration_path=str(tmp_path / "eval" / "calibration.json"))
    _, calibrated = read_predictions_csv(out / "predictions.csv")
    # each written probability is within 5e-7 of the model's; the map is increasing, so it brackets the calibrated one
    low, high = cal.apply(np.clip(tp - 5e-7, 0, 1)), cal.apply(np.clip(tp + 5e-7, 0, 1))
    assert np.all((calibrated >= low - 1e-6) & (calibrated <= high + 1e-6))
    assert not np.allclose(calibrated, tp, atol=1e-3)


def test_export_keeps_the_model(tiny_preprocessed_dir, tiny_clip_checkpoint, stored_run, tmp_path):
    """The exported bundle's weights and TorchScript give this bundle's probabilities (tests/test_bundle_export.py
    runs the exported bundle itself, outside the repository)."""
    from workflows.calibration import Calibration

    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(Calibration("platt", CTRATE_PATHOLOGIES, [0.7] * 18, [-0.2] * 18).to_dict()))
    bundle = tmp_path / "bundle"
    run_bundle("inference.json", "export.json", model_config="ctclip_tiny", pretrained=str(tiny_clip_checkpoint),
               export_dir=str(bundle), calibration_path=str(calibration))
    models = bundle / "models"
    # the calibration travels (optional for zero-shot: given here), checked by sha256 like the weights
    assert (models / "calibration.json").read_bytes() == calibration.read_bytes()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert "models/calibration.json" in meta["files_sha256"]
    summary = json.loads((models / "export.json").read_text())
    assert "model.ts" in summary["files"], summary["skipped"]
    # MONAI Label loads models/model.pt into network_def with strict=False: every key must match
    net = zeroshot.build_zeroshot_network("ctclip_tiny", CONFIGS / "prompts.json")
    sd = torch.load(models / "model.pt", weights_only=True)
    assert set(sd) == set(net.state_dict())
    result = net.load_state_dict(sd, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    emb = np.load(stored_run / "embeddings.npz")
    _, stored = read_predictions(stored_run / "predictions.csv")
    name = sorted(emb.files)[0]
    with torch.no_grad():
        p = net.probabilities(torch.as_tensor(emb[name])[None])[0].numpy()
    assert np.abs(p - probs_of(stored, CTRATE_PATHOLOGIES)[name]).max() <= TOL
    # the TorchScript module gives the eager probabilities
    ts = torch.jit.load(str(models / "model.ts"))
    x = torch.rand(summary["files"]["model.ts"]["input_shape"]) * 2 - 1
    with torch.no_grad():
        assert float((ts(x) - net(x)).abs().max()) <= TOL
    # the exported inference.json carries the architecture (MONAI Label passes no overrides)
    assert json.loads((bundle / "configs" / "inference.json").read_text())["model_config"]["name"] == "ctclip_tiny"
