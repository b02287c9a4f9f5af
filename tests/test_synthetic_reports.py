"""Synthetic CT-RATE-style reports and the NegEx-style parser (chest_phantom/README.md, "Reports", "Report parser")."""

import re
from collections import Counter

import pytest

from chest_phantom.report_parser import find_mentions, labels_from_report
from chest_phantom.reports import format_mm, generate_report
from ctclip_contract import CTRATE_PATHOLOGIES, REPORT_COLUMNS

from synthetic_standin import standin_record


def _positives(text):
    return {k for k, v in labels_from_report(text).items() if v}


@pytest.mark.parametrize("text, expected", [
    ("No pleural effusion was detected.", set()),
    ("Pleural effusion was not observed.", set()),
    ("Pleural effusion-thickening was not detected.", set()),
    ("There is no pleural effusion.", set()),
    ("There is bilateral minimal pleural effusion.", {"Pleural effusion"}),
    ("No pleural or pericardial effusion was detected.", set()),
    ("Pleural and pericardial effusion was not observed.", set()),
    ("There is minimal pericardial effusion, which is 6 mm in its thickest part.", {"Pericardial effusion"}),
    # post-negation inside a two-part cue
    ("Calcification was not detected in the aorta and coronary arteries.", set()),
    ("There are calcific atheroma plaques in the aorta and coronary arteries.",
     {"Arterial wall calcification", "Coronary artery wall calcification"}),
    ("Calcified atheromas are observed along the course of the coronary arteries.", {"Coronary artery wall calcification"}),
    # hard negatives: other organs, normal-size nodes, hedges
    ("A hypodense nodule was observed in the right lobe of the thyroid gland.", set()),
    ("Costal cartilage calcifications were noted.", set()),
    ("Millimetric lymph nodes that did not reach pathological size were observed in the mediastinum.", set()),
    ("A few lymph nodes not reaching pathological size were observed.", set()),
    ("A 4 mm nodule is observed in the right lower lobe (intrapulmonary lymph node?).", {"Lung nodule"}),
    ("Lymph nodes with a short axis reaching 14 mm are observed in the subcarinal station.", {"Lymphadenopathy"}),
    # a contrastive conjunction ends the negation scope
    ("No consolidation was detected, but ground-glass opacities were observed in the right lower lobe.", {"Lung opacity"}),
    ("Heart size increased; no pericardial effusion was detected.", {"Cardiomegaly"}),
    ("No emphysema, bronchiectasis or consolidation was detected.", set()),
    ("Emphysema, bronchiectasis or consolidation were not observed.", set()),
    ("Aeration of both lung parenchyma is normal and no nodular or infiltrative lesion is detected in the lung parenchyma.", set()),
    ("Fibroatelectatic sequelae bands were observed in the left lung.", {"Pulmonary fibrotic sequela"}),
    ("A 7 mm ground-glass nodule was observed in the lingula.", {"Lung nodule"}),
    ("Mosaic attenuation pattern was observed in both lungs (small airway disease? small vessel disease?).",
     {"Mosaic attenuation pattern"}),
    ("Mediastinal structures cannot be evaluated optimally because contrast material is not given.", set()),
    ("Not given.", set()),
    ("", set()),
])
def test_parser_cues_and_negation_scopes(text, expected):
    assert _positives(text) == expected


def test_parser_returns_all_18_in_ctclip_order():
    out = labels_from_report("Hiatal hernia is observed.")
    assert list(out) == list(CTRATE_PATHOLOGIES)
    assert out["Hiatal hernia"] == 1 and sum(out.values()) == 1
    m = [x for x in find_mentions("No hiatal hernia was detected.") if x["label"] == "Hiatal hernia"]
    assert m and m[0]["negated"]


def test_parser_is_not_a_template_lookup():
    # sentences the generator never writes, in another register
    assert _positives("Small bilateral pleural effusions.") == {"Pleural effusion"}
    assert _positives("The heart is enlarged; there is no effusion in the pericardium.") == {"Cardiomegaly"}
    assert _positives("Without evidence of bronchiectasis.") == set()
    assert _positives("Bronchiectasis is absent.") == set()


def _report_text(rep):
    return rep["Findings_EN"] + " " + rep["Impressions_EN"]


def test_qa_parser_recovers_labels_on_real_records():
    """README "QA checks": the parser reproduces all 18 labels exactly on ≥ 200 generated reports."""
    from chest_phantom.record import sample_case_record

    mismatches = []
    positives = Counter()
    for i in range(220):
        rec = sample_case_record(f"train_{i}", "a", 1000 + i, balanced=0.35 if i % 2 else False)
        got = labels_from_report(_report_text(generate_report(rec)))
        positives.update(k for k, v in rec["labels"].items() if v)
        if got != rec["labels"]:
            mismatches.append((i, {k: (rec["labels"][k], got[k]) for k in got if got[k] != rec["labels"][k]}))
    assert not mismatches, mismatches[:5]
    assert all(positives[name] >= 10 for name in CTRATE_PATHOLOGIES), positives  # every label exercised


def test_report_follows_findings_not_noisy_labels():
    from chest_phantom.record import sample_case_record

    flipped = 0
    for i in range(40):
        rec = sample_case_record(f"train_{i}", "a", i, label_noise=0.2)
        truth = {n: int(any(f["label"] == n for f in rec["findings"])) for n in CTRATE_PATHOLOGIES}
        assert labels_from_report(_report_text(generate_report(rec))) == truth
        flipped += len(rec.get("label_noise_flips", []))
    assert flipped > 0


def test_reports_are_deterministic_and_ctrate_shaped():
    rec = standin_record(7)
    a, b = generate_report(rec), generate_report(rec)
    assert a == b
    assert set(a) == set(REPORT_COLUMNS) - {"VolumeName"}
    assert generate_report(rec, seed=123) != a
    assert all(isinstance(v, str) and v for v in a.values())
    # fixed order: airway → lymph nodes → lung window → lungs → bones
    text = a["Findings_EN"]
    window = re.search(r"lung parenchyma window", text)
    assert window is not None
    assert not re.search(r"\b(vertebral|bone structures)\b", text[: window.start()], re.I)


def test_paraphrase_variety_dropout_negation_forms_and_incidentals():
    reps = [generate_report(standin_record(i)) for i in range(200)]
    findings = [r["Findings_EN"] for r in reps]
    pleura_normals = Counter()
    for text in findings:
        for s in re.split(r"(?<=\.)\s+", text):
            if "pleural" in s.lower() and "effusion" in s.lower() and not _positives(s):
                pleura_normals[s] += 1
    assert len(pleura_normals) >= 3, pleura_normals
    # both negation forms are used
    assert sum("was not observed" in t or "was not detected" in t for t in findings) > 50
    assert sum(bool(re.search(r"(^|\. )No ", t)) for t in findings) > 50
    # dropout: the airway sentence is sometimes missing
    airway = sum(bool(re.search(r"[Tt]rachea", t)) for t in findings)
    assert 100 < airway < 200
    # incidental findings appear in the text without becoming labels
    with_thyroid = [t for t in findings if "thyroid" in t]
    assert with_thyroid
    # number formats: decimals and "AxB mm"
    joined = " ".join(findings)
    assert re.search(r"\b\d+\.\d mm\b", joined) and re.search(r"\b\d+x\d+(\.\d)? mm\b", joined)
    # "Not given." is used for missing sections
    assert any(r["ClinicalInformation_EN"] == "Not given." for r in reps)


def test_format_mm():
    assert format_mm(14.4) == "14"
    assert format_mm(3.0) == "3"
    assert format_mm(3.4) == "3.5"
    assert format_mm(3.2) == "3"
