"""The evaluation handlers on a real MONAI SupervisedEvaluator running a tiny network."""

import csv
import json

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointSaver

from transforms import CTRATE_PATHOLOGIES
from workflows.handlers import ClassificationEvaluationHandler, MetricsPerEpochWriter, names_from_batch
from workflows.metrics import evaluate_classification
from workflows.writers import read_predictions_csv

N_CASES, N_FEATURES, N_CLASSES = 26, 6, len(CTRATE_PATHOLOGIES)


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, x):
        return torch.sigmoid(self.linear(x))


def _datalist(n=N_CASES, seed=0, with_labels=True, prefix="valid"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    proj = torch.randn(N_FEATURES, N_CLASSES, generator=torch.Generator().manual_seed(99))
    y = ((x @ proj + 0.8 * torch.randn(n, N_CLASSES, generator=g)) > 0.3).float()
    items = []
    for i in range(n):
        item = {"image": x[i], "name": f"{prefix}_{i}_a_1.nii.gz"}
        if with_labels:
            item["label"] = y[i]
        items.append(item)
    return items


def _evaluator(net, data, handlers, batch_size=4, decollate=True):
    loader = DataLoader(Dataset(data), batch_size=batch_size, shuffle=False, num_workers=0)
    return SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=net, decollate=decollate, val_handlers=handlers
    )


@pytest.mark.parametrize("decollate", [True, False])
def test_handler_writes_all_files_and_exposes_results(tmp_path, decollate):
    net = TinyClassifier().eval()
    data = _datalist()
    # the ROC figure costs ~2 s: draw it in one of the two runs
    handler = ClassificationEvaluationHandler(tmp_path / "eval", n_bootstrap=100, seed=1, write_plots=decollate)
    ckpt = CheckpointSaver(
        save_dir=str(tmp_path / "ckpt"), save_dict={"net": net}, save_key_metric=True, key_metric_name="macro_auroc"
    )
    evaluator = _evaluator(net, data, [handler, ckpt], decollate=decollate)
    evaluator.run()

    with torch.no_grad():
        expected_p = net(torch.stack([d["image"] for d in data])).numpy()
    labels = torch.stack([d["label"] for d in data]).numpy()

    out = tmp_path / "eval"
    files = ("predictions.csv", "metrics.json", "per_class.csv", "per_class.md") + (("roc_curves.png",) if decollate else ())
    for f in files:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary file behind
    with open(out / "predictions.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["VolumeName", *CTRATE_PATHOLOGIES]  # no validation thresholds -> no decision columns
    names, probs = read_predictions_csv(out / "predictions.csv")
    assert names == [d["name"] for d in data]  # every volume once, in loader order, across 7 batches
    np.testing.assert_allclose(probs, expected_p, atol=1e-6)

    reference = evaluate_classification(labels, expected_p, n_bootstrap=100, seed=1)
    written = json.loads((out / "metrics.json").read_text())
    assert written["auroc"]["macro"] == pytest.approx(reference["auroc"]["macro"], abs=1e-6)
    assert written["auroc"]["macro_ci_low"] == pytest.approx(reference["auroc"]["macro_ci_low"], abs=1e-6)
    assert written["n_cases"] == N_CASES and written["epoch"] == 1

    state = evaluator.state
    assert state.metrics["macro_auroc"] == pytest.approx(reference["auroc"]["macro"], abs=1e-6)
    assert state.metrics["macro_auroc_ci_low"] < state.metrics["macro_auroc"] < state.metrics["macro_auroc_ci_high"]
    assert state.classification_results["auroc"]["macro"] == written["auroc"]["macro"]
    # a best-checkpoint rule on macro AUROC sees the value in the same event
    saved = list((tmp_path / "ckpt").glob("net_key_metric=*.pt"))
    assert len(saved) == 1 and f"{state.metrics['macro_auroc']:.4f}" in saved[0].name


def test_repeated_runs_reset_buffers_and_per_epoch_writer_appends(tmp_path):
    net = TinyClassifier().eval()
    handler = ClassificationEvaluationHandler(tmp_path / "eval", n_bootstrap=0, write_plots=False)
    writer = MetricsPerEpochWriter(tmp_path / "eval")
    evaluator = _evaluator(net, _datalist(), [handler, writer])
    for epoch in (1, 2, 3):
        evaluator.run(global_epoch=epoch)  # what MONAI's ValidationHandler does after each training epoch
    names, _ = read_predictions_csv(tmp_path / "eval" / "predictions.csv")
    assert len(names) == N_CASES  # not 3 * N: buffers are cleared per run

    rows = json.loads((tmp_path / "eval" / "metrics_per_epoch.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["macro_auroc"] == pytest.approx(evaluator.state.metrics["macro_auroc"]) for r in rows)
    with open(tmp_path / "eval" / "metrics_per_epoch.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in csv_rows] == [1, 2, 3] and "macro_auroc" in csv_rows[0]

    # a resumed run re-validating epoch 2 replaces that row instead of duplicating it
    evaluator.run(global_epoch=2)
    assert [r["epoch"] for r in writer.read()] == [1, 2, 3]
    # a fresh writer on the same folder continues the file
    evaluator2 = _evaluator(net, _datalist(), [ClassificationEvaluationHandler(tmp_path / "e2", n_bootstrap=0, write_plots=False), MetricsPerEpochWriter(tmp_path / "eval")])
    evaluator2.run(global_epoch=4)
    assert [r["epoch"] for r in writer.read()] == [1, 2, 3, 4]
    # a run resuming a killed one at epoch 3 keeps the epochs before it; one that starts over keeps none of the
    # earlier run's (ClassFine has no resume: its rerun with fewer epochs must not show the killed run's tail)
    resumed = MetricsPerEpochWriter(tmp_path / "eval")
    _evaluator(net, _datalist(), [resumed]).run(global_epoch=3)
    assert [r["epoch"] for r in writer.read()] == [1, 2, 3]
    again = MetricsPerEpochWriter(tmp_path / "eval")
    _evaluator(net, _datalist(), [again]).run(global_epoch=1)
    assert [r["epoch"] for r in writer.read()] == [1]


def test_validation_predictions_give_val_youden_protocol_and_decision_columns(tmp_path):
    net = TinyClassifier().eval()
    val_dir, test_dir = tmp_path / "val", tmp_path / "test"
    _evaluator(net, _datalist(seed=1), [ClassificationEvaluationHandler(val_dir, n_bootstrap=0, write_plots=False, write_labels=True)]).run()
    _, _, val_labels = read_predictions_csv(val_dir / "predictions.csv", with_labels=True)
    assert val_labels.shape == (N_CASES, N_CLASSES) and set(np.unique(val_labels)) <= {0.0, 1.0}

    handler = ClassificationEvaluationHandler(test_dir, n_bootstrap=0, write_plots=False, val_predictions=val_dir / "predictions.csv")
    _evaluator(net, _datalist(seed=2, prefix="test"), [handler]).run()
    res = json.loads((test_dir / "metrics.json").read_text())
    assert set(res["protocols"]) == {"val_youden", "ctclip_paper", "vlm3d"}
    with open(test_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    c = CTRATE_PATHOLOGIES[0]
    t = res["protocols"]["val_youden"]["per_class"][c]["threshold"]
    assert t is not None
    for r in rows:  # decision columns follow p >= fitted validation threshold
        assert r[f"{c}_pred_val_youden"] == str(int(float(r[c]) >= t))


def test_inference_without_labels_writes_predictions_only(tmp_path):
    net = TinyClassifier().eval()
    handler = ClassificationEvaluationHandler(tmp_path, n_bootstrap=0)
    evaluator = _evaluator(net, _datalist(with_labels=False), [handler])
    evaluator.run()
    names, probs = read_predictions_csv(tmp_path / "predictions.csv")
    assert len(names) == N_CASES and probs.shape == (N_CASES, N_CLASSES)
    assert not (tmp_path / "metrics.json").exists()
    assert evaluator.state.classification_results is None


def test_missing_names_are_numbered_and_shape_mismatch_is_reported(tmp_path):
    data = [{"image": d["image"], "label": d["label"]} for d in _datalist(n=6)]
    _evaluator(TinyClassifier().eval(), data, [ClassificationEvaluationHandler(tmp_path, n_bootstrap=0, write_plots=False)]).run()
    names, _ = read_predictions_csv(tmp_path / "predictions.csv")
    assert names == [f"case_{i}" for i in range(6)]
    bad = ClassificationEvaluationHandler(tmp_path / "bad", class_names=["a", "b"], n_bootstrap=0)
    with pytest.raises(ValueError, match="expected \\(N, 2\\)"):
        _evaluator(TinyClassifier().eval(), data, [bad]).run()


def test_names_from_batch_forms():
    assert names_from_batch([{"name": "a"}, {"name": "b"}]) == ["a", "b"]
    assert names_from_batch({"name": ["a", "b"]}) == ["a", "b"]
    assert names_from_batch([{"image": 1}]) is None and names_from_batch(None) is None


class TinyDualEncoder(torch.nn.Module):
    """Image and 'report' latents that agree up to noise, so retrieval is far above chance."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(N_FEATURES, 8, bias=False)

    def forward(self, x):
        z = self.proj(x)
        noise = 0.05 * torch.sin(torch.arange(z.numel(), dtype=z.dtype)).reshape(z.shape)
        return {"image_latents": z, "text_latents": z + noise}


def test_retrieval_handler_writes_json_latents_and_map(tmp_path):
    from workflows.handlers import RetrievalEvaluationHandler
    from workflows.retrieval import retrieval_metrics

    data = _datalist()
    handler = RetrievalEvaluationHandler(tmp_path, ks=(1, 5), map_ks=(5,))
    evaluator = _evaluator(TinyDualEncoder().eval(), data, [handler, MetricsPerEpochWriter(tmp_path)])
    evaluator.run()
    res = json.loads((tmp_path / "retrieval.json").read_text())
    with torch.no_grad():
        out = TinyDualEncoder().eval()(torch.stack([d["image"] for d in data]))
    labels = torch.stack([d["label"] for d in data]).numpy()
    ref = retrieval_metrics(out["image_latents"].numpy(), out["text_latents"].numpy(), labels=labels, ks=(1, 5), map_ks=(5,))
    assert res["report_to_volume"]["recall@1"] == pytest.approx(ref["report_to_volume"]["recall@1"])
    assert res["report_to_volume"]["recall@1"] > res["report_to_volume"]["random_recall@1"] * 5
    assert res["volume_to_volume"]["map@5"] == pytest.approx(ref["volume_to_volume"]["map@5"])
    assert evaluator.state.metrics["report_to_volume_recall@5"] == pytest.approx(ref["report_to_volume"]["recall@5"])
    npz = np.load(tmp_path / "latents.npz")
    assert list(npz["names"]) == [d["name"] for d in data] and npz["image_latents"].shape == (N_CASES, 8)
    assert (tmp_path / "latent_map.png").stat().st_size > 0
    rows = json.loads((tmp_path / "metrics_per_epoch.json").read_text())
    assert rows[0]["report_to_volume_recall@1"] == pytest.approx(res["report_to_volume"]["recall@1"])
