"""The anatomy lexicon: which anatomical regions a report sentence mentions (region-level alignment's pairing)."""

from __future__ import annotations

import re

import pytest

from ctclip_contract.anatomy import ANATOMY_REGIONS, REGION_IDS
from ctclip_contract.anatomy_lexicon import (ANATOMY_TERMS, FINDING_TERMS, LUNG_LOBES, region_sentence_mask,
                                             sentence_region_ids, sentence_regions)

RUL, RML, RLL = "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"
LUL, LLL = "lung_upper_lobe_left", "lung_lower_lobe_left"
LUNGS = {RUL, RML, RLL, LUL, LLL}

EXAMPLES = [
    # laterality and lobes, in every wording the reports use
    ("A 6 mm solid nodule is observed in the right lower lobe.", {RLL}),
    ("A nodule measuring 5 mm is observed in the lower lobe of the right lung.", {RLL}),
    ("Ground-glass opacities were observed in the right lung middle lobe.", {RML}),
    ("Consolidation with air bronchograms was observed in the left upper lobe.", {LUL}),
    ("Plate-like atelectasis is observed in the lingula and left lung lower lobe.", {LUL, LLL}),
    ("Linear atelectasis was observed in the lower lobes of both lungs.", {RLL, LLL}),
    ("There are slight paraseptal emphysematous changes in the subpleural areas of the bilateral upper lobes.",
     {RUL, LUL}),
    ("Mild centrilobular emphysematous changes were observed, predominantly in the upper lobes.", {RUL, LUL}),
    ("Solid nodules, the largest measuring 12 mm, were observed in the right lung upper lobe and lower lobe of the "
     "left lung.", {RUL, LLL}),
    ("There is a mosaic attenuation pattern in the right lung.", {RUL, RML, RLL}),
    ("Mosaic attenuation areas were observed in both lungs.", LUNGS),
    ("No mass, nodule or infiltrative lesion was observed in either lung.", LUNGS),
    # apical / basal narrow a side-level mention to the upper / lower lobes
    ("Sequelae changes are observed at the apical level in both lungs.", {RUL, LUL}),
    ("Reticular fibrotic changes are observed in the basal segments of the left lung.", {LLL}),
    # the other regions
    ("There is mild pericardial effusion.", {"heart"}),
    ("No lymph node was detected in mediastinal and bilateral hilar regions in pathological size and appearance.",
     {"mediastinum"}),
    ("Enlarged lymph nodes were observed in the aorticopulmonary window station.", {"mediastinum"}),  # not the aorta
    ("Calcified plaques are observed in the wall of the aortic arch and descending aorta.", {"aorta"}),
    ("Atherosclerotic calcifications were observed in the thoracic aorta and coronary arteries.", {"aorta", "heart"}),
    ("Bilateral moderate pleural effusion was observed.", {"pleural_space"}),  # "bilateral" alone is not the lungs
    ("Pneumothorax was not observed.", {"pleural_space"}),
    ("No pathological lesion was detected in the tracheal and bronchial lumens.", {"trachea", "bronchi"}),
    ("Trachea, both main bronchi are open.", {"trachea", "bronchi"}),
    ("The pulmonary artery is of normal calibre.", {"pulmonary_artery"}),  # not the lungs
    ("Liver density decreased in favor of hepatosteatosis.", {"liver"}),
    ("Hepatic contours are smooth.", {"liver"}),
    ("Degenerative osteophytes were observed at the vertebral corners.", {"bone"}),
    ("No fracture of the right 5th rib was detected.", {"bone"}),
    ("Herniation of the stomach through the esophageal hiatus (hiatal hernia) was observed.", {"esophagus", "stomach"}),
    ("Thyroid gland lobes are of normal size and density.", {"thyroid_gland"}),
    ("A thyroid nodule is observed in the left lobe of the thyroid gland.", {"thyroid_gland"}),  # not a lung nodule
    ("Upper abdominal organs included in the sections are natural.", {"abdomen", "liver", "stomach"}),
    ("A port catheter is observed in the right anterior chest wall, its tip extending to the superior vena cava.",
     {"body_wall", "superior_vena_cava"}),
    ("Passive atelectasis secondary to the pleural effusion is observed in the right lower lobe.",
     {RLL, "pleural_space"}),
    # a finding that names its organ by itself counts only when nothing else is named
    ("Emphysema.", LUNGS),
    ("Apical sequelae changes.", {RUL, LUL}),
    ("Lymphadenopathy.", {"mediastinum"}),
    ("Bronchial wall thickening.", LUNGS),  # the lungs' bronchi, not the central airways region
    ("Bronchial wall thickening is observed in the left lung lower lobe.", {LLL}),
    # no region
    ("When examined in the lung parenchyma window;", set()),  # a display setting, not the lungs
    ("Findings within normal limits.", set()),
    ("The thickest part of the effusion was 12 mm.", set()),
    ("Both hemidiaphragms are in normal position and contour.", set()),  # no diaphragm region
]


@pytest.mark.parametrize("sentence, regions", EXAMPLES)
def test_example_sentences(sentence, regions):
    assert sentence_regions(sentence) == regions
    assert sentence_region_ids(sentence) == tuple(sorted(REGION_IDS[r] for r in regions))


def test_case_and_spacing_do_not_matter():
    assert sentence_regions("  PERICARDIAL   effusion ") == {"heart"}
    assert sentence_regions("RIGHT  Lower LOBE") == {RLL}


def test_every_lexicon_entry_is_a_region_of_the_table():
    named = set(LUNG_LOBES.values()) | {r for v in ANATOMY_TERMS.values() for r in v}
    named |= {r for v in FINDING_TERMS.values() for r in v if r != "lungs"}
    assert named <= set(ANATOMY_REGIONS), named - set(ANATOMY_REGIONS)
    # every region but the ones no chest report names by itself has a word
    assert set(ANATOMY_REGIONS) - named == set()


def test_region_sentence_mask():
    sentences = ["There is mild pericardial effusion.", "Findings within normal limits.",
                 "Pleural effusion in the right hemithorax with passive atelectasis in the right lower lobe."]
    mask = region_sentence_mask(sentences)
    assert len(mask) == 3 and all(len(row) == len(ANATOMY_REGIONS) for row in mask)
    assert [ANATOMY_REGIONS[i] for i, m in enumerate(mask[0]) if m] == ["heart"]
    assert not any(mask[1])
    assert {ANATOMY_REGIONS[i] for i, m in enumerate(mask[2]) if m} == {RLL, "pleural_space"}
    assert region_sentence_mask(sentences, ["heart", "aorta"]) == [[True, False], [False, False], [False, False]]
    with pytest.raises(KeyError, match="unknown anatomical regions \\['pericardium'\\]"):
        region_sentence_mask(sentences, ["heart", "pericardium"])


def test_the_synthetic_reports_are_covered():
    """Sentences of the demo cohort's reports (balanced findings, as the demo draws them): nearly all map to a
    region, and the few that do not are the kinds that name none (the diaphragm, surgical clips, an effusion's
    thickness, the tail of a split parenthesis)."""
    from chest_phantom.cohort import plan_cases
    from chest_phantom.record import sample_case_record
    from chest_phantom.reports import generate_report
    from transforms.report_text import split_sentences

    sentences = []
    for case in plan_cases(60, seed=0):
        record = sample_case_record(case["patient_id"], case["scan"], case["seed"], balanced=0.4)
        report = generate_report(record)
        sentences += split_sentences(report["Findings_EN"]) + split_sentences(report["Impressions_EN"])
    unmapped = [s for s in sentences if not sentence_regions(s)]
    assert len(unmapped) / len(sentences) < 0.05
    expected = re.compile(r"diaphragm|surgical clips|thickest part of the effusion|small vessel disease|"
                          r"normal limits|Not given", re.IGNORECASE)
    assert [s for s in unmapped if not expected.search(s)] == []
