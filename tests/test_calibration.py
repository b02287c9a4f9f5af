"""Calibrated probabilities: the expected calibration error, Platt and temperature scaling fitted on validation,
the calibration file (bad files named with their reason), the postprocessing transform, and the evaluation
handler's ECE before and after with its reliability diagram. The bundles' evaluate -> inference -> export path is
tested in test_classfine_bundle.py and test_zeroshot.py."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms import CTRATE_PATHOLOGIES
from workflows.calibration import (MIN_SCALE, CalibrateProbabilitiesd, Calibration, fit_calibration, load_calibration,
                                   save_validation_calibration)
from workflows.handlers import ClassificationEvaluationHandler, ece_summary
from workflows.metrics import (auroc_per_class, evaluate_classification, expected_calibration_error,
                               fit_thresholds_youden, reliability_bins)
from workflows.writers import write_predictions_csv


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _cohort(n, c=4, seed=0, slope=3.0, shift=1.5):
    """Labels drawn from true probabilities sigmoid(z - 0.5), and a model that reports sigmoid(slope * z + shift):
    overconfident and biased towards 'present', as ClassFine with a prevalence pos_weight is."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 1.5
    true_p = _sigmoid(z - 0.5)
    y = (rng.random((n, c)) < true_p).astype(float)
    return y, _sigmoid(slope * z + shift), true_p


# ------------------------------------------------------------------------------------------------ ECE
def test_ece_by_hand():
    # bin [0.1, 0.2): p 0.1, 0.1 with one positive -> |0.5 - 0.1| * 2/4; bin [0.9, 1]: p 0.9, 1.0, both positive ->
    # |1 - 0.95| * 2/4
    y = np.array([0, 1, 1, 1.0])
    p = np.array([0.1, 0.1, 0.9, 1.0])
    b = reliability_bins(y, p, n_bins=10)
    assert b["count"].tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert b["mean_prob"][9] == pytest.approx(0.95) and b["frac_pos"][1] == pytest.approx(0.5)
    ece = expected_calibration_error(y[:, None], p[:, None], 10, ["a"])
    assert ece["per_class"]["a"] == pytest.approx(0.4 * 0.5 + 0.05 * 0.5)
    assert ece["macro"] == ece["per_class"]["a"] and ece["n_bins"] == 10
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        reliability_bins(y, p * 2)
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(y, p, n_bins=0)


def test_ece_is_near_zero_for_calibrated_scores_and_large_for_miscalibrated_ones():
    y, raw, true_p = _cohort(20000, c=3, seed=1)
    calibrated = expected_calibration_error(y, true_p, 10)
    miscalibrated = expected_calibration_error(y, raw, 10)
    assert calibrated["macro"] < 0.015, calibrated
    assert miscalibrated["macro"] > 0.15, miscalibrated
    # a constant probability equal to the prevalence is calibrated too (and useless: ECE is not discrimination)
    prevalence = np.broadcast_to(y.mean(axis=0), y.shape)
    assert expected_calibration_error(y, prevalence, 10)["macro"] < 1e-9
    # more bins, same definition: still small for the calibrated scores
    assert expected_calibration_error(y, true_p, 20)["macro"] < 0.02


# ------------------------------------------------------------------------------------------------ fitting
@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_calibration_fitted_on_validation_lowers_ece_on_held_out_data(method):
    # temperature scaling cannot remove an offset: give it a scale-only miscalibration, Platt both
    shift = 1.5 if method == "platt" else -0.5 * 3.0
    yv, pv, _ = _cohort(400, seed=2, shift=shift)
    yt, pt, true_t = _cohort(4000, seed=3, shift=shift)
    cal = fit_calibration(yv, pv, method, list("abcd"))
    before = expected_calibration_error(yt, pt)["macro"]
    after = expected_calibration_error(yt, cal.apply(pt))["macro"]
    floor = expected_calibration_error(yt, true_t)["macro"]
    assert before > 0.1 and after < 0.5 * before and after < floor + 0.03, (before, after, floor)
    if method == "temperature":
        assert np.all(cal.bias == 0) and np.allclose(cal.scale, 1 / 3.0, rtol=0.25)


def test_platt_beats_temperature_when_the_model_is_biased():
    yv, pv, _ = _cohort(400, seed=4)
    yt, pt, _ = _cohort(4000, seed=5)
    platt = expected_calibration_error(yt, fit_calibration(yv, pv, "platt", list("abcd")).apply(pt))["macro"]
    temperature = expected_calibration_error(yt, fit_calibration(yv, pv, "temperature", list("abcd")).apply(pt))["macro"]
    assert platt < temperature


def test_calibration_is_monotone_auroc_and_decisions_unchanged():
    yv, pv, _ = _cohort(300, seed=6)
    yt, pt, _ = _cohort(2000, seed=7)
    for method in ("platt", "temperature", "none"):
        cal = fit_calibration(yv, pv, method, list("abcd"))
        ct = cal.apply(pt)
        np.testing.assert_array_equal(auroc_per_class(yt, pt), auroc_per_class(yt, ct))
        for c in range(4):  # strictly increasing: the same order of the cases
            order = np.argsort(pt[:, c], kind="mergesort")
            assert np.all(np.diff(ct[order, c]) >= 0)
        # the validation thresholds mapped through the calibration decide every test case as before
        thr = fit_thresholds_youden(yv, pv)
        np.testing.assert_array_equal(pt >= thr, ct >= cal.thresholds(thr))
        # and Youden's J on the calibrated validation probabilities splits validation the same way
        thr_cal = fit_thresholds_youden(yv, cal.apply(pv))
        np.testing.assert_array_equal(pv >= thr, cal.apply(pv) >= thr_cal)
    assert np.isnan(cal.thresholds([np.nan, 0.5, 0.5, 0.5])[0])


def test_a_finding_that_validation_cannot_calibrate_keeps_the_identity():
    yv, pv, _ = _cohort(200, seed=8)
    yv[:, 1] = 0  # no positives in validation
    yv[:, 2] = (pv[:, 2] > 0.5)  # perfectly separated: Platt's smoothed targets keep the fit finite
    cal = fit_calibration(yv, pv, "platt", list("abcd"))
    assert cal.scale[1] == 1 and cal.bias[1] == 0
    assert any(n.startswith("b:") for n in cal.info["notes"])
    assert np.all(np.isfinite(cal.scale)) and cal.scale[2] < 100
    # an anti-correlated finding is bounded below, not flipped
    yv[:, 3] = (pv[:, 3] < 0.5)
    assert fit_calibration(yv, pv, "platt", list("abcd")).scale[3] == pytest.approx(MIN_SCALE)


# ------------------------------------------------------------------------------------------------ the file
@pytest.fixture
def calibration_file(tmp_path):
    yv, pv, _ = _cohort(120, c=18, seed=9)
    names = [f"valid_{i}_a_1" for i in range(len(yv))]
    val = write_predictions_csv(tmp_path / "validation" / "predictions.csv", names, pv, CTRATE_PATHOLOGIES, labels=yv)
    path = tmp_path / "models" / "calibration.json"
    written = save_validation_calibration(val, path, CTRATE_PATHOLOGIES, "platt", n_bins=10)
    return path, written, pv


def test_written_file_round_trips(calibration_file, caplog):
    path, written, pv = calibration_file
    assert written["method"] == "platt" and written["n_validation"] == 120
    assert written["validation_ece_macro"]["calibrated"] < written["validation_ece_macro"]["uncalibrated"]
    on_disk = json.loads(path.read_text())
    assert set(on_disk["parameters"]) == set(CTRATE_PATHOLOGIES) and "Platt scaling" in on_disk["description"]
    with caplog.at_level(logging.INFO):
        cal = load_calibration(path, CTRATE_PATHOLOGIES)
    assert cal.source == str(path) and "platt calibration fitted on 120 validation volumes" in cal.describe()
    fitted = fit_calibration((pv > 2).astype(float), pv, "none")  # any object to compare shapes with
    assert cal.apply(pv).shape == fitted.apply(pv).shape
    # matched by name: a class the file does not know (added to a prompt file) stays uncalibrated, with one warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        more = load_calibration(path, [*CTRATE_PATHOLOGIES[:3], "Pneumothorax"])
    assert more.scale[3] == 1 and more.bias[3] == 0 and more.scale[0] == cal.scale[0]
    assert sum("Pneumothorax" in r.message for r in caplog.records) == 1


def test_a_missing_file_is_raw_probabilities_said_once_or_an_error_when_required(tmp_path, caplog):
    missing = tmp_path / "models" / "calibration.json"
    with caplog.at_level(logging.WARNING):
        assert load_calibration(missing, CTRATE_PATHOLOGIES) is None
    said = [r.message for r in caplog.records if "calibration" in r.message]
    assert len(said) == 1 and str(missing) in said[0] and "uncalibrated" in said[0]
    assert load_calibration("", CTRATE_PATHOLOGIES) is None  # no path: nothing to say
    with pytest.raises(FileNotFoundError, match=r"calibration file not found: .*models/calibration\.json"):
        load_calibration(missing, CTRATE_PATHOLOGIES, required=True)


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"method": "isotonic", "parameters": {"a": {"scale": 1, "bias": 0}}}), "'method' is 'isotonic'"),
    (json.dumps({"method": "platt"}), "'parameters' must be"),
    (json.dumps({"method": "platt", "parameters": {"Cardiomegaly": {"scale": "x", "bias": 0}}}),
     "'Cardiomegaly' scale is 'x', expected a finite number"),
    (json.dumps({"method": "platt", "parameters": {"Cardiomegaly": {"scale": 1.0}}}),
     "'Cardiomegaly' bias is None"),
    (json.dumps({"method": "platt", "parameters": {"Cardiomegaly": {"scale": -2.0, "bias": 0}}}),
     "'Cardiomegaly' scale is -2.0; it must be >= 0.001"),
    (json.dumps({"method": "platt", "parameters": {"Pneumothorax": {"scale": 1.0, "bias": 0}}}),
     "none of this model's classes"),
])
def test_a_corrupt_file_is_named_with_its_reason(tmp_path, content, reason):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_calibration(path, CTRATE_PATHOLOGIES)
    assert str(path) in str(err.value) and reason in str(err.value), str(err.value)


def test_postprocessing_transform_keeps_type_and_passes_through_without_calibration(calibration_file):
    path, _, pv = calibration_file
    cal = load_calibration(path, CTRATE_PATHOLOGIES)
    pred = MetaTensor(torch.as_tensor(pv[0], dtype=torch.float32))
    out = CalibrateProbabilitiesd("pred", cal)({"pred": pred, "other": 1})
    assert isinstance(out["pred"], MetaTensor) and out["pred"].dtype == torch.float32 and out["other"] == 1
    np.testing.assert_allclose(out["pred"].numpy(), cal.apply(pred.numpy()), atol=1e-7)
    assert CalibrateProbabilitiesd("pred", None)({"pred": pred})["pred"] is pred
    with pytest.raises(ValueError, match="is for 18 classes"):
        cal.apply(pv[:, :5])


# ------------------------------------------------------------------------------------------------ evaluation
def test_metrics_json_reports_ece_before_and_after(calibration_file):
    path, _, _ = calibration_file
    cal = load_calibration(path, CTRATE_PATHOLOGIES)
    yt, pt, _ = _cohort(150, c=18, seed=10)
    res = evaluate_classification(yt, pt, n_bootstrap=0, calibrated_scores=cal.apply(pt), n_bins=10)
    block = res["calibration"]
    assert block["n_bins"] == 10 and "equal-width bins" in block["definition"]
    assert block["uncalibrated"]["ece_macro"] == pytest.approx(expected_calibration_error(yt, pt)["macro"])
    assert block["calibrated"]["ece_macro"] < 0.6 * block["uncalibrated"]["ece_macro"]
    assert set(block["calibrated"]["ece"]) == set(CTRATE_PATHOLOGIES)
    # the other metrics are those of the uncalibrated scores, which rank the same
    assert res["auroc"]["macro"] == pytest.approx(np.nanmean(auroc_per_class(yt, cal.apply(pt))))
    # scores that are not probabilities: no ECE, a note
    res = evaluate_classification(yt, pt * 3 - 1, n_bootstrap=0)
    assert "uncalibrated" not in res["calibration"] and any("not probabilities" in n for n in res["notes"])


def test_handler_writes_reliability_and_the_summary_line(calibration_file, tmp_path, caplog):
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator

    path, _, _ = calibration_file
    yt, pt, _ = _cohort(40, c=18, seed=11)
    data = [{"image": torch.as_tensor(pt[i], dtype=torch.float32), "label": torch.as_tensor(yt[i]),
             "name": f"test_{i}"} for i in range(len(pt))]
    out = tmp_path / "eval" / "test"
    handler = ClassificationEvaluationHandler(out, n_bootstrap=0, calibration=str(path), ece_bins=8, name="evaluation")
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), network=torch.nn.Identity(), val_handlers=[handler],
                                    val_data_loader=DataLoader(Dataset(data), batch_size=8, num_workers=0))
    with caplog.at_level(logging.INFO, logger="evaluation"):
        evaluator.run()
    metrics = json.loads((out / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["n_bins"] == 8 and cal["calibrated"]["method"] == "platt" and cal["calibrated"]["file"] == str(path)
    assert (out / "reliability.png").stat().st_size > 10_000 and (out / "roc_curves.png").is_file()
    line = next(r.message for r in caplog.records if r.message.startswith("macro AUROC"))
    assert ece_summary(metrics) in line and "uncalibrated ->" in line and "platt-calibrated" in line
    md = (out / "per_class.md").read_text()
    assert "## Calibration" in md and "ece_calibrated" in md
    # the file is read when the run ends; a path without a file is an error that names it
    handler = ClassificationEvaluationHandler(tmp_path / "x", n_bootstrap=0, calibration=str(tmp_path / "nope.json"))
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), network=torch.nn.Identity(), val_handlers=[handler],
                                    val_data_loader=DataLoader(Dataset(data), batch_size=8, num_workers=0))
    with pytest.raises(Exception, match=r"calibration file not found: .*nope\.json"):
        evaluator.run()


def test_calibration_object_checks_its_parameters():
    with pytest.raises(ValueError, match="not be strictly increasing"):
        Calibration("platt", ["a"], [0.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        Calibration("platt", ["a"], [np.inf], [0.0])
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration(np.zeros((3, 1)), np.zeros((3, 1)), "isotonic", ["a"])
