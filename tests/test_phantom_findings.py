"""Every finding is visible: simple rule-based detectors recover the labels from the phantom images.

A small balanced cohort is rendered at the coarse "qa" geometry (96 matrix, ~4 mm). Each label's
detector (chest_phantom.qa) scores the difference between the image and the expected normal
image of the same anatomy (the record rendered without findings, same scanner and noise seed)
inside the finding's anatomical ROI and HU signature, and is scored by AUROC. Labels whose detector
stays below 0.9 are listed in the failure message; chest_phantom/README.md ("QA checks") calls a
label "not rendered" below 0.7. The issue's target, 14 labels at 0.9, is reached on this cohort
(seeds 5000+i) and on a second, independent 40-case cohort (14 each; all labels >= 0.71 / 0.76).
Below 0.9 on both: atelectasis
(0.71 / 0.76: plates merge with co-located consolidation or opacity, lingular plates lie beside the
heart, passive collapse hides under large effusions), lung nodule (0.89 / 0.82: nodules inside
consolidation, effusion or metal-streak slices), consolidation (0.88 / 0.84: overlapped by large
effusions); lung opacity (0.94 / 0.88) and bronchiectasis (0.86 / 0.92) each miss on one cohort.
"""

import numpy as np
import pytest

from chest_phantom import apply_scanner, default_grid, render_truth, sample_case_record, sample_recon
from chest_phantom.qa import detector_scores, normal_reference
from ctclip_contract import CTRATE_PATHOLOGIES

N_CASES = 40
MIN_PASSING = 14  # labels with AUROC >= 0.9 (of 18; 14 reached here and on a second cohort): the target
MIN_VISIBLE = 17  # labels with AUROC >= 0.75 (17 reached here, 18 on the second cohort)


def _auroc(score, y):
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def cohort_scores():
    scores, labels = [], []
    for i in range(N_CASES):
        rec = sample_case_record(f"qa_{i}", "a", 5000 + i, balanced=0.35)
        grid = default_grid(rec, "qa", np.random.default_rng(i))
        truth = render_truth(rec, grid)
        recon = sample_recon(rec, np.random.default_rng(i), 1)
        img = apply_scanner(truth, grid, recon, seed=i)
        s = detector_scores(img, truth, grid, normal_reference(rec, grid, recon, i))
        scores.append([s[n] for n in CTRATE_PATHOLOGIES])
        labels.append([rec["labels"][n] for n in CTRATE_PATHOLOGIES])
    return np.array(scores), np.array(labels)


def test_detectors_recover_the_labels(cohort_scores):
    S, Y = cohort_scores
    assert (Y.sum(0) >= 4).all(), "balanced cohort must have positives and negatives for every label"
    aurocs = {n: _auroc(S[:, j], Y[:, j]) for j, n in enumerate(CTRATE_PATHOLOGIES)}
    passing = [n for n, a in aurocs.items() if a >= 0.9]
    table = ", ".join(f"{n}: {a:.2f}" for n, a in aurocs.items())
    assert len(passing) >= MIN_PASSING, f"only {len(passing)} labels reach AUROC 0.9 ({table})"
    visible = [n for n, a in aurocs.items() if a >= 0.75]
    assert len(visible) >= MIN_VISIBLE, f"only {len(visible)} labels reach AUROC 0.75 ({table})"
    assert min(aurocs.values()) >= 0.65, table  # worst reached: 0.71 (atelectasis)


def _scores_for(labels, seed=77):
    prev = {n: (1.0 if n in labels else 0.0) for n in CTRATE_PATHOLOGIES}
    rec = sample_case_record("qa_normal", "a", seed, prevalence=prev)
    grid = default_grid(rec, "qa", np.random.default_rng(0))
    truth = render_truth(rec, grid)
    recon = sample_recon(rec, np.random.default_rng(0), 1)
    img = apply_scanner(truth, grid, recon, seed=0)
    return detector_scores(img, truth, grid, normal_reference(rec, grid, recon, 0))


def test_single_findings_move_their_own_measurement():
    normal = _scores_for(())
    assert normal["Emphysema"] < 1.0  # LAA%-950 of normal lungs
    assert normal["Medical material"] == 0.0
    assert normal["Lung nodule"] == 0.0  # nothing differs from the expected normal
    big_heart = _scores_for(("Cardiomegaly",))
    assert big_heart["Cardiomegaly"] > normal["Cardiomegaly"] + 0.04  # cardiac silhouette ratio
    fluid = _scores_for(("Pleural effusion",))
    assert fluid["Pleural effusion"] > 5 * max(normal["Pleural effusion"], 1.0)
