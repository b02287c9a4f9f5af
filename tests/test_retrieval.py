"""Retrieval metrics on hand-made examples whose ranks were counted by hand."""

import json
import math

import numpy as np
import pytest

from workflows.retrieval import (
    alignment,
    cross_modal_retrieval,
    expected_ranks,
    label_relevance,
    mean_average_precision_at_k,
    retrieval_metrics,
    similarity_matrix,
    uniformity,
)

# rows = volumes, columns = reports; the match of volume i is report i.
SIM = np.array(
    [
        [0.9, 0.1, 0.3, 0.2],  # match 0.9: rank 1
        [0.8, 0.5, 0.6, 0.1],  # match 0.5: 0.8 and 0.6 above -> rank 3
        [0.2, 0.7, 0.4, 0.3],  # match 0.4: 0.7 above -> rank 2
        [0.1, 0.2, 0.3, 0.6],  # match 0.6: rank 1
    ]
)


def test_volume_to_report_by_hand():
    r = cross_modal_retrieval(SIM, ks=(1, 2, 3))
    assert r["recall@1"] == pytest.approx(2 / 4)
    assert r["recall@2"] == pytest.approx(3 / 4)
    assert r["recall@3"] == pytest.approx(1.0)
    assert r["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1) / 4)
    assert r["ndcg"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(3) + 1) / 4)
    assert r["ndcg@10"] == pytest.approx(r["ndcg"])
    assert r["median_rank"] == pytest.approx(1.5) and r["mean_rank"] == pytest.approx(7 / 4)
    assert r["random_recall@1"] == pytest.approx(1 / 4) and r["random_recall@3"] == pytest.approx(3 / 4)


def test_report_to_volume_uses_the_transpose_by_hand():
    # columns as queries: ranks 1, 2 (0.7 > 0.5), 2 (0.6 > 0.4), 1
    r = retrieval_metrics(similarity=SIM, ks=(1, 2))["report_to_volume"]
    assert r["recall@1"] == pytest.approx(0.5)
    assert r["recall@2"] == pytest.approx(1.0)
    assert r["mrr"] == pytest.approx(0.75)


def test_ties_give_expected_value_of_random_tie_break():
    n = 10
    const = cross_modal_retrieval(np.zeros((n, n)), ks=(1, 5, 10))
    assert const["recall@1"] == pytest.approx(0.1) and const["recall@5"] == pytest.approx(0.5)
    assert const["recall@10"] == pytest.approx(1.0)
    assert const["mrr"] == pytest.approx(const["random_mrr"])
    # the match tied with one other item and nothing above: rank 1 or 2 with equal chance
    sim = np.eye(3)
    sim[0, 1] = 1.0
    higher, tied = expected_ranks(sim)
    assert list(higher) == [0, 0, 0] and list(tied) == [2, 1, 1]
    r = cross_modal_retrieval(sim, ks=(1,))
    assert r["recall@1"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert r["mrr"] == pytest.approx(((1 + 0.5) / 2 + 1 + 1) / 3)


LABELS = np.array([[1, 0], [1, 0], [0, 1], [1, 0]])  # A, B, C, D
VV = np.array(
    [
        [1.0, 0.9, 0.8, 0.1],  # A: B(rel) C D(rel)
        [0.2, 1.0, 0.5, 0.3],  # B: C D(rel) A(rel)
        [0.3, 0.2, 1.0, 0.1],  # C: no relevant volume -> left out
        [0.7, 0.6, 0.65, 1.0],  # D: A(rel) C B(rel)
    ]
)


def test_map_at_k_by_hand():
    rel = label_relevance(LABELS, "exact")
    m3, n = mean_average_precision_at_k(VV, rel, 3)
    assert n == 3
    # AP@3: A (1 + 2/3)/2, B (1/2 + 2/3)/2, D (1 + 2/3)/2
    assert m3 == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2 + (1 + 2 / 3) / 2) / 3)
    m1, _ = mean_average_precision_at_k(VV, rel, 1)
    assert m1 == pytest.approx(2 / 3)  # A hit, B miss, D hit; divided by min(1, R) = 1
    m2, _ = mean_average_precision_at_k(VV, rel, 2)
    assert m2 == pytest.approx((1 / 2 + (1 / 2) / 2 + 1 / 2) / 3)


def test_relevance_rules():
    y = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    exact = label_relevance(y, "exact")
    overlap = label_relevance(y, "overlap")
    assert not exact[0, 1] and overlap[0, 1]  # share a finding, different vectors
    assert exact[2, 3] and not overlap[2, 3]  # two normal scans
    assert not exact.diagonal().any() and not overlap.diagonal().any()
    with pytest.raises(ValueError):
        label_relevance(y, "jaccard0.5")


def test_alignment_and_uniformity_closed_forms():
    x = np.eye(3)
    assert alignment(x, x) == pytest.approx(0.0)
    assert alignment(x, -x) == pytest.approx(4.0)  # antipodal pairs: squared distance 4
    assert uniformity(x) == pytest.approx(-4.0)  # every pair at squared distance 2, t = 2
    assert uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    # scale does not matter: latents are normalised
    assert uniformity(5 * x) == pytest.approx(-4.0)


def test_retrieval_metrics_from_latents():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(60, 16))
    txt = img + 0.05 * rng.normal(size=(60, 16))  # nearly aligned pairs
    labels = rng.integers(0, 2, (60, 3))
    r = retrieval_metrics(img, txt, labels=labels, ks=(1, 5, 100))
    json.dumps(r, allow_nan=False)
    assert r["report_to_volume"]["recall@1"] > 0.9 > r["report_to_volume"]["random_recall@5"]
    assert r["report_to_volume"]["random_recall@5"] == pytest.approx(5 / 60)
    assert r["volume_to_report"]["recall@100"] == 1.0 and any("k >= N" in n for n in r["notes"])
    assert r["embedding"]["alignment"] < 0.05
    vv = r["volume_to_volume"]
    assert vv["relevance"] == "exact" and 0 <= vv["map@10"] <= 1 and vv["n_queries"] > 0
    # random image latents: recall sits near the k/N baseline
    far = retrieval_metrics(rng.normal(size=(200, 16)), rng.normal(size=(200, 16)), ks=(10,))
    assert abs(far["report_to_volume"]["recall@10"] - 0.05) < 0.05
    np.testing.assert_allclose(similarity_matrix(img, img).diagonal(), 1.0)
    with pytest.raises(ValueError, match="one report per volume"):
        retrieval_metrics(img, txt[:-1])
