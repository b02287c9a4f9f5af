"""Case-record contract of the synthetic phantom: vocabulary, label/finding consistency, prevalence."""

import json

import numpy as np
import pytest

from chest_phantom import sample_case_record
from chest_phantom.anatomy import LOBES, NODE_STATIONS
from chest_phantom.record import CTRATE_PREVALENCE, INCIDENTAL_FINDINGS, SEVERITIES, SUBTYPES
from ctclip_contract import CTRATE_PATHOLOGIES

LATENTS = {"smoker", "heart_failure", "infection", "airway_disease", "post_op", "prior_infection"}


def _records(n, **kw):
    return [sample_case_record(f"train_{i}", "a", 10_000 + i, **kw) for i in range(n)]


def test_record_contract_and_json_round_trip():
    for rec in _records(60, balanced=True):
        assert json.loads(json.dumps(rec)) == rec
        assert set(rec["latent"]) == LATENTS and all(isinstance(v, bool) for v in rec["latent"].values())
        assert list(rec["labels"]) == list(CTRATE_PATHOLOGIES)
        assert rec["sex"] in ("M", "F") and 18 <= rec["age"] <= 95
        listed = {f["label"] for f in rec["findings"]}
        assert {k for k, v in rec["labels"].items() if v == 1} == listed
        assert len(listed) == len(rec["findings"])  # one entry per label
        assert set(rec["incidental"]) <= set(INCIDENTAL_FINDINGS)
        for f in rec["findings"]:
            assert f["severity"] in SEVERITIES
            assert f["side"] in ("right", "left", "bilateral", "midline")
            if f["label"] in SUBTYPES:
                assert f["subtype"] in SUBTYPES[f["label"]], f
            else:
                assert f["subtype"] is None, f
            assert isinstance(f["count"], int) and f["count"] >= 1
            for c in f["centers_mm"]:
                assert len(c) == 3 and all(np.isfinite(c))
            lobes = [s for s in f["sites"] if s.endswith("lobe") or s == "lingula"]
            assert set(lobes) <= set(LOBES.values())
            if f["label"] == "Lymphadenopathy":
                assert set(f["sites"]) <= set(NODE_STATIONS) and f["size_mm"] >= 10
            if f["label"] in ("Lung nodule", "Pleural effusion", "Pericardial effusion", "Lymphadenopathy", "Hiatal hernia"):
                assert f["size_mm"] and f["size_mm"] > 0


def test_record_is_a_pure_function_of_the_seed():
    a = sample_case_record("valid_3", "b", 42, balanced=0.5)
    b = sample_case_record("valid_3", "b", 42, balanced=0.5)
    c = sample_case_record("valid_3", "b", 43, balanced=0.5)
    assert a == b
    assert a != c


def test_unknown_prevalence_labels_are_named():
    with pytest.raises(ValueError, match="Lung nodules.*Pneumothorax|Pneumothorax.*Lung nodules"):
        sample_case_record("x", "a", 1, prevalence={"Lung nodules": 0.2, "Pneumothorax": 0.1, "Emphysema": 0.3})
    with pytest.raises(ValueError):
        sample_case_record("x", "a", 1, prevalence="mimic")


def test_balanced_prevalence_and_explicit_zero():
    recs = _records(300, balanced=True)
    rates = np.array([[r["labels"][n] for n in CTRATE_PATHOLOGIES] for r in recs]).mean(0)
    assert np.all(np.abs(rates - 0.4) < 0.09), dict(zip(CTRATE_PATHOLOGIES, rates.round(2)))
    none = _records(30, prevalence={n: 0.0 for n in CTRATE_PATHOLOGIES})
    assert all(not r["findings"] for r in none)


def test_ctrate_prevalence_and_couplings():
    recs = _records(1000)
    Y = np.array([[r["labels"][n] for n in CTRATE_PATHOLOGIES] for r in recs])
    rates = Y.mean(0)
    target = np.array([CTRATE_PREVALENCE[n] for n in CTRATE_PATHOLOGIES])
    assert np.all(np.abs(rates - target) < 0.055), dict(zip(CTRATE_PATHOLOGIES, rates.round(3)))
    idx = {n: i for i, n in enumerate(CTRATE_PATHOLOGIES)}

    def cond(child, parent):
        m = Y[:, idx[parent]] == 1
        return Y[m, idx[child]].mean()

    assert abs(cond("Arterial wall calcification", "Coronary artery wall calcification") - 0.86) < 0.07
    assert abs(cond("Lung opacity", "Consolidation") - 0.63) < 0.1
    assert abs(cond("Atelectasis", "Pleural effusion") - 0.63) < 0.1
    assert abs(cond("Pleural effusion", "Cardiomegaly") - 0.42) < 0.12
    # latent factors couple labels: emphysema is commoner in smokers
    smoker = np.array([r["latent"]["smoker"] for r in recs])
    assert Y[smoker, idx["Emphysema"]].mean() > 1.5 * Y[~smoker, idx["Emphysema"]].mean()
    assert 2.8 < Y.sum(1).mean() < 4.4


def test_label_noise_flips_only_labels():
    rec = sample_case_record("x", "a", 5, balanced=True, label_noise=0.5)
    flips = rec["label_noise_flips"]
    assert flips, "p=0.5 over 18 labels flips something"
    listed = {f["label"] for f in rec["findings"]}
    for n in CTRATE_PATHOLOGIES:
        assert rec["labels"][n] == (int(n in listed) ^ int(n in flips))
