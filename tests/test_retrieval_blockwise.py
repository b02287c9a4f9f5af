"""The retrieval metrics by blocks of similarity rows against brute force over whole matrices, on latents with ties.

Ties make blocking easy to get wrong (a rank counted against the wrong match, a top-k cut in the middle of equal
scores), so most cases use *dyadic* latents: unit vectors whose entries are +-1/4 or +-1/2, drawn with repeats.
Their similarities are exact in float64 whatever order BLAS sums in, so every similarity has its exact value in
every block shape and the results must be bitwise those of the whole matrix. Gaussian latents (no ties) check the
same at ordinary rounding. Block budgets are a few rows, so that many blocks of uneven size are used.
"""

from __future__ import annotations

import math
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from workflows import retrieval
from workflows.retrieval import (
    blockwise_top_k,
    cross_modal_retrieval,
    expected_ranks,
    mean_average_precision_at_k,
    retrieval_metrics,
    uniformity,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

KS, MAP_KS = (1, 3, 10), (1, 2, 5, 50)


def dyadic_latents(rng: np.random.Generator, n: int, d: int = 16, distinct: int | None = None) -> np.ndarray:
    """Unit vectors with 16 entries of +-1/4 or 4 entries of +-1/2 (exact float64 products); ``distinct`` of them,
    repeated at random to ``n`` rows."""
    m = distinct or n
    x = np.zeros((m, d))
    quarter = rng.random(m) < 0.5
    x[quarter] = rng.choice([-0.25, 0.25], size=(int(quarter.sum()), d))
    for i in np.flatnonzero(~quarter):
        x[i, rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x[rng.integers(0, m, n)] if distinct else x


def rows_budget(n: int, rows: float) -> int:
    """A ``block_bytes`` of about ``rows`` float64 rows of an n-wide matrix."""
    return int(8 * n * rows)


# ------------------------------------------------------------------------------------------------ brute force
def brute_ranks(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    match = np.diag(sim)[:, None]
    return (sim > match).sum(axis=1), (sim == match).sum(axis=1)


def brute_rank_metrics(higher, tied, ks) -> dict:
    """The expected metrics under a random tie break, query by query."""
    n = len(higher)
    per_query = [np.arange(h + 1, h + t + 1) for h, t in zip(higher, tied)]
    out = {"n_queries": n}
    for k in ks:
        out[f"recall@{k}"] = np.mean([(r <= k).mean() for r in per_query])
        out[f"random_recall@{k}"] = min(k, n) / n
    out["mrr"] = np.mean([(1 / r).mean() for r in per_query])
    out["random_mrr"] = np.mean(1 / np.arange(1, n + 1))
    out["ndcg"] = np.mean([(1 / np.log2(1 + r)).mean() for r in per_query])
    out["ndcg@10"] = np.mean([np.where(r <= 10, 1 / np.log2(1 + r), 0).mean() for r in per_query])
    mean_rank = [r.mean() for r in per_query]
    out["median_rank"], out["mean_rank"] = np.median(mean_rank), np.mean(mean_rank)
    return out


def brute_relevance(labels: np.ndarray, relevance: str) -> np.ndarray:
    y = labels.astype(bool)
    n = len(y)
    rel = np.array([[(np.array_equal(y[i], y[j]) if relevance == "exact" else bool((y[i] & y[j]).any()))
                     for j in range(n)] for i in range(n)])
    np.fill_diagonal(rel, False)
    return rel


def brute_map(vv: np.ndarray, rel: np.ndarray, k: int) -> tuple[float, int]:
    """AP@k of each query from a stable sort of its whole row (the query itself last), averaged over queries with a
    relevant item."""
    n = len(vv)
    aps = []
    for q in range(n):
        r_count = rel[q].sum()
        if r_count == 0:
            continue
        scores = vv[q].copy()
        scores[q] = -np.inf
        ranked = np.argsort(-scores, kind="stable")[: min(k, n - 1)]
        hits = rel[q, ranked]
        aps.append(sum(hits[: i + 1].mean() for i in range(len(hits)) if hits[i]) / min(k, r_count))
    return (float(np.mean(aps)), len(aps)) if aps else (float("nan"), 0)


def brute_uniformity(a: np.ndarray, t: float = 2.0) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    i, j = np.triu_indices(len(a), k=1)
    v = -t * np.maximum(2.0 - 2.0 * np.einsum("pd,pd->p", a[i], a[j]), 0.0)
    return float(v.max() + np.log(np.mean(np.exp(v - v.max()))))


def brute_force(img, txt, labels, relevance) -> dict:
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt))
    sim = a @ b.T
    n = len(a)
    rel = brute_relevance(labels, relevance)
    vv = {"relevance": relevance}
    for k in MAP_KS:
        vv[f"map@{k}"], vv["n_queries"] = brute_map(a @ a.T, rel, k)
    vv["random_precision"] = rel.sum() / (n * (n - 1))
    return {"n": n, "report_to_volume": brute_rank_metrics(*brute_ranks(sim.T), KS),
            "volume_to_report": brute_rank_metrics(*brute_ranks(sim), KS),
            "embedding": {"alignment": np.mean(np.sum((a - b) ** 2, axis=1)),
                          "uniformity_image": brute_uniformity(img), "uniformity_text": brute_uniformity(txt)},
            "volume_to_volume": vv}


def assert_close(result: dict, expected: dict, rel: float = 1e-12, path: str = "") -> None:
    for key, want in expected.items():
        got = result[key]
        where = f"{path}/{key}"
        if isinstance(want, dict):
            assert_close(got, want, rel, where)
        elif isinstance(want, str):
            assert got == want, where
        elif isinstance(want, (int, np.integer)):
            assert got == want, where
        elif math.isnan(want):
            assert got is None, where
        else:
            assert got == pytest.approx(float(want), rel=rel, abs=1e-12), where


# ---------------------------------------------------------------------------------------------------- cases
def tied_case(seed: int, n: int, relevance: str):
    """Dyadic latents with repeated volumes and some reports equal to their volume, 3 labels (many repeats)."""
    rng = np.random.default_rng(seed)
    img = dyadic_latents(rng, n, distinct=n // 2)
    txt = dyadic_latents(rng, n)
    txt[: n // 3] = img[: n // 3]
    labels = (rng.random((n, 3)) < 0.3).astype(np.float32)
    return img, txt, labels


@pytest.mark.parametrize("relevance", ["exact", "overlap"])
@pytest.mark.parametrize("seed, n", [(0, 53), (1, 40), (2, 67)])
def test_blockwise_metrics_equal_brute_force_with_ties(seed, n, relevance):
    img, txt, labels = tied_case(seed, n, relevance)
    expected = brute_force(img, txt, labels, relevance)
    one_block = retrieval_metrics(img, txt, labels=labels, ks=KS, map_ks=MAP_KS, relevance=relevance,
                                  block_bytes=2 ** 30)
    assert_close(one_block, expected)
    # 1 to 7 rows a block (N = 53 and 67 are prime, so blocks are uneven): bitwise the one-block result,
    # the uniformity to its summation order
    for rows in (1, 2.5, 7):
        blocks = retrieval_metrics(img, txt, labels=labels, ks=KS, map_ks=MAP_KS, relevance=relevance,
                                   block_bytes=rows_budget(n, rows))
        assert blocks.pop("embedding") == pytest.approx(one_block["embedding"], rel=1e-13)
        assert blocks == {k: v for k, v in one_block.items() if k != "embedding"}, rows


def test_blockwise_metrics_equal_the_full_matrix_code_they_replace():
    """Bitwise against the full-matrix code they replace (kept in benchmarks/scaling.py as the baseline), with ties
    and at ordinary rounding; the uniformity sums in another order (1e-13)."""
    from scaling import full_matrix_retrieval_metrics

    rng = np.random.default_rng(3)
    gauss_img = rng.normal(size=(58, 24))
    cases = [tied_case(4, 61, "exact"), (gauss_img, gauss_img + 0.8 * rng.normal(size=(58, 24)),
                                         rng.random((58, 4)) < 0.3)]
    for img, txt, labels in cases:
        for relevance in ("exact", "overlap"):
            ref = full_matrix_retrieval_metrics(img, txt, labels, KS, MAP_KS, relevance)
            ref_embedding = ref.pop("embedding")
            for rows in (1, 3, 1e6):
                ours = retrieval_metrics(img, txt, labels=labels, ks=KS, map_ks=MAP_KS, relevance=relevance,
                                         block_bytes=rows_budget(len(img), rows))
                assert ours.pop("embedding") == pytest.approx(ref_embedding, rel=1e-13)
                assert ours == ref, (relevance, rows)


def test_gaussian_latents_equal_brute_force():
    rng = np.random.default_rng(5)
    img = rng.normal(size=(45, 32))
    txt = img + rng.normal(size=(45, 32))
    labels = rng.random((45, 5)) < 0.2
    for rows in (1, 4):
        result = retrieval_metrics(img, txt, labels=labels, ks=KS, map_ks=MAP_KS, relevance="overlap",
                                   block_bytes=rows_budget(45, rows))
        assert_close(result, brute_force(img, txt, labels, "overlap"))


def test_report_matches_ranked_again_when_the_diagonal_products_round_differently(monkeypatch):
    """The one pass for both directions takes the report queries' matches from small products ahead of it; where
    those round differently from the pass (one-row products here), those queries are ranked again."""
    calls = []
    ranks = retrieval._ranks_of_blocks

    def spy(*args, **kwargs):
        calls.append(kwargs.get("match_columns") is not None)
        return ranks(*args, **kwargs)

    monkeypatch.setattr(retrieval, "_MATCH_BLOCK_ROWS", 1)
    monkeypatch.setattr(retrieval, "_ranks_of_blocks", spy)
    rng = np.random.default_rng(6)
    img = rng.normal(size=(300, 512))
    txt = img + 0.5 * rng.normal(size=(300, 512))
    sim = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    result = retrieval_metrics(img, txt, ks=KS, block_bytes=rows_budget(300, 9))
    assert calls == [True]  # some one-row products differed in the last bit (BLAS's matrix-vector kernel)
    expected = brute_rank_metrics(*brute_ranks(sim.T), KS)
    assert_close(result["report_to_volume"], expected)


def test_constant_latents_give_the_random_baseline_in_every_block():
    n = 23
    x = np.ones((n, 4))
    r = retrieval_metrics(x, x, labels=np.zeros((n, 2)), ks=(1, 5), map_ks=(5,), block_bytes=rows_budget(n, 2))
    for direction in ("report_to_volume", "volume_to_report"):
        assert r[direction]["recall@1"] == pytest.approx(1 / n) and r[direction]["recall@5"] == pytest.approx(5 / n)
        assert r[direction]["mrr"] == pytest.approx(r[direction]["random_mrr"])
    assert r["volume_to_volume"]["map@5"] == 1.0  # every other scan is relevant (all normal)
    assert r["embedding"]["uniformity_image"] == 0.0  # every pair at distance 0


def test_given_similarity_matrix_by_blocks():
    rng = np.random.default_rng(7)
    n = 31
    sim = np.round(rng.normal(size=(n, n)), 1)  # one decimal: many ties
    sim[:, 4] = sim[:, 9]
    rel = rng.random((n, n)) < 0.3
    for rows in (1, 4, 100):
        budget = rows_budget(n, rows)
        r = retrieval_metrics(similarity=sim, ks=KS, block_bytes=budget)
        assert_close(r["volume_to_report"], brute_rank_metrics(*brute_ranks(sim), KS))
        assert_close(r["report_to_volume"], brute_rank_metrics(*brute_ranks(sim.T), KS))
        assert cross_modal_retrieval(sim, KS, block_bytes=budget) == cross_modal_retrieval(sim, KS)
        higher, tied = expected_ranks(sim, block_bytes=budget)
        np.testing.assert_array_equal(higher, brute_ranks(sim)[0])
        np.testing.assert_array_equal(tied, brute_ranks(sim)[1])
        for k in (1, 3, 10, n + 5):
            expected = brute_map(sim, np.where(np.eye(n, dtype=bool), False, rel), k)
            assert mean_average_precision_at_k(sim, rel, k, block_bytes=budget) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(sim[:, 4], sim[:, 9])  # the caller's matrix is left as it was


@pytest.mark.parametrize("exclude_self", [False, True])
def test_blockwise_top_k_is_a_stable_sort_of_the_whole_row(exclude_self):
    rng = np.random.default_rng(8)
    gallery = dyadic_latents(rng, 41, distinct=12)  # many equal scores, across block and top-k boundaries
    queries = gallery if exclude_self else dyadic_latents(rng, 19, distinct=7)
    full = queries @ gallery.T
    if exclude_self:
        np.fill_diagonal(full, -np.inf)
    order = np.argsort(-full, axis=1, kind="stable")
    for k in (1, 5, 13, 41, 60):
        for rows in (1, 2, 6):
            scores, indices = blockwise_top_k(queries, gallery, k, block_bytes=rows_budget(41, rows),
                                              exclude_self=exclude_self)
            np.testing.assert_array_equal(indices, order[:, :k])
            np.testing.assert_array_equal(scores, np.take_along_axis(full, order[:, :k], axis=1))


def test_blockwise_top_k_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    scores, indices = blockwise_top_k(queries, gallery, k=5, block_bytes=3 * 8 * 101)
    full = torch.nn.functional.normalize(queries.double(), dim=-1) @ torch.nn.functional.normalize(
        gallery.double(), dim=-1).t()
    ref_scores, ref_indices = full.topk(5, dim=-1)
    np.testing.assert_array_equal(indices, ref_indices.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-12)


@pytest.mark.parametrize("t", [2.0, 300.0])  # 300: exp(-t d^2) underflows without the running log-sum-exp
def test_uniformity_by_blocks_equals_all_pairs(t):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(57, 6))
    x[10:20] = x[:10]  # pairs at distance 0
    want = brute_uniformity(x, t)
    assert math.isfinite(want)
    for rows in (1, 2, 5, 100):
        assert uniformity(x, t, block_bytes=rows_budget(57, rows)) == pytest.approx(want, rel=1e-12)


def test_small_sets():
    one = retrieval_metrics(np.ones((1, 3)), np.ones((1, 3)), labels=np.ones((1, 2)), ks=(1,), map_ks=(1, 5))
    assert one["volume_to_report"]["recall@1"] == 1.0
    assert one["volume_to_volume"]["map@1"] is None and one["volume_to_volume"]["n_queries"] == 0
    assert one["embedding"]["uniformity_image"] is None
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    two = retrieval_metrics(img, img, labels=np.array([[1, 0], [1, 0]]), ks=(1,), map_ks=(1, 5), block_bytes=1)
    assert two["report_to_volume"]["recall@1"] == 1.0
    assert two["volume_to_volume"]["map@5"] == 1.0 and two["volume_to_volume"]["random_precision"] == 1.0
    assert two["embedding"]["uniformity_image"] == pytest.approx(-4.0)


def test_no_n_by_n_array_is_allocated():
    """At N = 3000 the (N, N) float64 matrix is 72 MB; with a 2 MB budget the metrics stay under a fifth of it."""
    rng = np.random.default_rng(10)
    n = 3000
    img = rng.normal(size=(n, 8))
    txt = img + rng.normal(size=(n, 8))
    labels = rng.random((n, 18)) < 0.1
    for relevance in ("exact", "overlap"):
        tracemalloc.start()
        try:
            retrieval_metrics(img, txt, labels=labels, relevance=relevance, block_bytes=2 * 2 ** 20)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < n * n * 8 / 5, (relevance, peak / 2 ** 20)


def test_block_bytes_must_be_positive():
    with pytest.raises(ValueError, match="block_bytes"):
        retrieval_metrics(np.eye(3), np.eye(3), block_bytes=0)
