"""Cross-modal and volume-to-volume retrieval metrics from CLIP latents (numpy only).

Conventions:

- One report per volume: volume ``i`` and report ``i`` are the only matching pair.
- Ranks with tied similarities are *expected values under a random tie break*: if ``g`` gallery items
  score strictly higher than the match and ``t`` items (the match included) score equally, the match
  is equally likely at any rank ``g+1 .. g+t``. A model that outputs a constant similarity therefore
  gets exactly the random baseline instead of a perfect (or zero) score.
- Volume→volume retrieval: a gallery volume is *relevant* to a query volume when their 18-label
  vectors are identical (``relevance="exact"``, the default: it also makes two normal scans relevant
  to each other). ``relevance="overlap"`` instead counts a volume as relevant when it shares at least
  one positive finding (Jaccard > 0); with it, queries without any finding have no relevant item.
  The query itself is removed from its gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import to_jsonable

__all__ = [
    "similarity_matrix",
    "expected_ranks",
    "cross_modal_retrieval",
    "label_relevance",
    "mean_average_precision_at_k",
    "alignment",
    "uniformity",
    "retrieval_metrics",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50, 100)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _as_latents(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"latents must be (N, D); got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("latents contain NaN or infinite values")
    return x


def similarity_matrix(image_latents: Any, text_latents: Any, normalize: bool = True) -> np.ndarray:
    """Cosine similarity between every volume and every report.

    Args:
        image_latents: ``(N, D)`` volume embeddings.
        text_latents: ``(M, D)`` report embeddings.
        normalize: L2-normalise both first (cosine similarity); CLIP latents usually already are.

    Returns:
        ``(N, M)`` matrix, row = volume, column = report.
    """
    img, txt = _as_latents(image_latents), _as_latents(text_latents)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"latent sizes differ: {img.shape[1]} vs {txt.shape[1]}")
    if normalize:
        img, txt = _l2_normalize(img), _l2_normalize(txt)
    return img @ txt.T


def expected_ranks(similarity: Any) -> tuple[np.ndarray, np.ndarray]:
    """Position of each query's match (the diagonal) among its row's gallery.

    Args:
        similarity: ``(N, N)`` matrix, row = query, column = gallery item, match of query ``i`` = item ``i``.

    Returns:
        ``(higher, tied)``: per query, the number of items scoring strictly higher than the match and
        the number scoring equal to it (the match included, so ``tied >= 1``).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"need a square (N, N) similarity matrix with matches on the diagonal; got {sim.shape}")
    match = np.diag(sim)[:, None]
    return (sim > match).sum(axis=1), (sim == match).sum(axis=1)


def _recall_at_k(higher: np.ndarray, tied: np.ndarray, k: int) -> float:
    # P(rank <= k) with the rank uniform on higher+1 .. higher+tied
    return float(np.clip((k - higher) / tied, 0.0, 1.0).mean())


def _expected_over_ties(higher: np.ndarray, tied: np.ndarray, fn) -> float:
    vals = [fn(np.arange(h + 1, h + t + 1)).mean() for h, t in zip(higher, tied)]
    return float(np.mean(vals))


def cross_modal_retrieval(similarity: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Recall@k, MRR, nDCG and median rank for queries (rows) against a gallery (columns).

    Args:
        similarity: ``(N, N)`` similarity, row = query, match on the diagonal.
        ks: cut-offs for recall@k and nDCG@k.

    Returns:
        ``{"n_queries", "recall@k"..., "random_recall@k"..., "mrr", "random_mrr", "ndcg", "ndcg@10",
        "median_rank", "mean_rank"}``. With one relevant item, nDCG = 1 / log2(1 + rank). The
        ``random_*`` entries are the expected values of a random ranking (recall@k = min(k, N) / N).
    """
    higher, tied = expected_ranks(similarity)
    n = higher.size
    out: dict[str, Any] = {"n_queries": int(n)}
    for k in ks:
        out[f"recall@{k}"] = _recall_at_k(higher, tied, k)
        out[f"random_recall@{k}"] = min(k, n) / n
    out["mrr"] = _expected_over_ties(higher, tied, lambda r: 1.0 / r)
    out["random_mrr"] = float(np.mean(1.0 / np.arange(1, n + 1)))
    out["ndcg"] = _expected_over_ties(higher, tied, lambda r: 1.0 / np.log2(1.0 + r))
    out["ndcg@10"] = _expected_over_ties(higher, tied, lambda r: np.where(r <= 10, 1.0 / np.log2(1.0 + r), 0.0))
    mean_rank = higher + (tied + 1) / 2.0
    out["median_rank"] = float(np.median(mean_rank))
    out["mean_rank"] = float(mean_rank.mean())
    return out


def label_relevance(labels: Any, relevance: str = "exact") -> np.ndarray:
    """Which volumes are relevant to which, from their multi-label vectors.

    Args:
        labels: ``(N, C)`` 0/1 label vectors.
        relevance: ``"exact"`` (identical vectors) or ``"overlap"`` (at least one shared positive
            label, i.e. Jaccard > 0).

    Returns:
        ``(N, N)`` boolean matrix with a False diagonal (a query is never its own result).
    """
    y = np.asarray(labels).astype(bool)
    if y.ndim != 2:
        raise ValueError(f"labels must be (N, C); got {y.shape}")
    if relevance == "exact":
        rel = (y[:, None, :] == y[None, :, :]).all(axis=2)
    elif relevance == "overlap":
        yi = y.astype(np.int64)
        rel = (yi @ yi.T) > 0
    else:
        raise ValueError(f"relevance must be 'exact' or 'overlap', not {relevance!r}")
    np.fill_diagonal(rel, False)
    return rel


def mean_average_precision_at_k(similarity: Any, relevant: Any, k: int) -> tuple[float, int]:
    """mAP@k of a self-retrieval (query set = gallery set, the query excluded from its own results).

    AP@k = (1 / min(k, R)) * sum over ranks i <= k of precision@i * rel(i), with R the number of
    relevant items of that query. Queries with R = 0 have no defined AP and are left out. Ties in
    similarity are broken by gallery index (stable sort).

    Args:
        similarity: ``(N, N)`` volume-volume similarity.
        relevant: ``(N, N)`` boolean relevance (diagonal ignored).
        k: cut-off.

    Returns:
        ``(map_at_k, n_queries_used)``; NaN when no query has a relevant item.
    """
    sim = np.array(similarity, dtype=np.float64)
    rel = np.array(relevant, dtype=bool)
    n = sim.shape[0]
    if sim.shape != (n, n) or rel.shape != (n, n):
        raise ValueError("similarity and relevance must both be (N, N)")
    np.fill_diagonal(sim, -np.inf)
    np.fill_diagonal(rel, False)
    order = np.argsort(-sim, axis=1, kind="stable")[:, : min(k, n - 1)]
    hits = np.take_along_axis(rel, order, axis=1).astype(np.float64)  # (N, k)
    n_rel = rel.sum(axis=1)
    used = n_rel > 0
    if not used.any():
        return float("nan"), 0
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    ap = (precision_at_i * hits).sum(axis=1)[used] / np.minimum(k, n_rel[used])
    return float(ap.mean()), int(used.sum())


def alignment(x: Any, y: Any, alpha: float = 2.0) -> float:
    """Alignment of paired embeddings (Wang & Isola, 2020): E ||x_i - y_i||^alpha, lower is better.

    Args:
        x: ``(N, D)`` embeddings (L2-normalised here).
        y: ``(N, D)`` embeddings of the matching items.
        alpha: exponent.

    Returns:
        The mean over pairs.
    """
    a, b = _l2_normalize(_as_latents(x)), _l2_normalize(_as_latents(y))
    if a.shape != b.shape:
        raise ValueError("paired embeddings must have the same shape")
    return float((np.linalg.norm(a - b, axis=1) ** alpha).mean())


def uniformity(x: Any, t: float = 2.0) -> float:
    """Uniformity on the hypersphere (Wang & Isola, 2020): log E exp(-t ||x_i - x_j||^2) over i != j.

    Lower is more uniform; the minimum for many points spread over the sphere approaches -t * 2
    in the limit of high dimension.

    Args:
        x: ``(N, D)`` embeddings (L2-normalised here), N >= 2.
        t: temperature.

    Returns:
        The log of the mean Gaussian potential over distinct pairs.
    """
    a = _l2_normalize(_as_latents(x))
    n = a.shape[0]
    if n < 2:
        return float("nan")
    sq = np.maximum(2.0 - 2.0 * (a @ a.T), 0.0)  # squared distances of unit vectors
    iu = np.triu_indices(n, k=1)
    v = -t * sq[iu]
    m = v.max()  # log-mean-exp, stabilised
    return float(m + np.log(np.mean(np.exp(v - m))))


def retrieval_metrics(
    image_latents: Any = None,
    text_latents: Any = None,
    similarity: Any = None,
    labels: Any = None,
    ks: Sequence[int] = DEFAULT_KS,
    map_ks: Sequence[int] = (1, 5, 10, 50),
    relevance: str = "exact",
) -> dict[str, Any]:
    """All retrieval metrics of one split, JSON-serialisable (NaN → None).

    Args:
        image_latents: ``(N, D)`` volume embeddings (row ``i`` matches report ``i``).
        text_latents: ``(N, D)`` report embeddings.
        similarity: ``(N, N)`` volume×report similarity, used instead of the latents when given
            (then alignment, uniformity and volume→volume retrieval are not available).
        labels: ``(N, C)`` 0/1 label vectors for volume→volume mAP@k (optional).
        ks: cut-offs for recall@k.
        map_ks: cut-offs for volume→volume mAP@k.
        relevance: ``"exact"`` or ``"overlap"``, see :func:`label_relevance`.

    Returns:
        ``{"n", "report_to_volume": {...}, "volume_to_report": {...}, "volume_to_volume": {...},
        "embedding": {"alignment", "uniformity_image", "uniformity_text"}, "notes"}``.
    """
    notes: list[str] = []
    img = txt = None
    if similarity is None:
        if image_latents is None or text_latents is None:
            raise ValueError("give image_latents and text_latents, or a similarity matrix")
        img, txt = _as_latents(image_latents), _as_latents(text_latents)
        if img.shape[0] != txt.shape[0]:
            raise ValueError("one report per volume is required: latents differ in length")
        sim = similarity_matrix(img, txt)
    else:
        sim = np.asarray(similarity, dtype=np.float64)
    n = sim.shape[0]
    if any(k >= n for k in ks):
        notes.append(f"recall@k with k >= N={n} is 1 by construction")
    out: dict[str, Any] = {
        "n": int(n),
        "report_to_volume": cross_modal_retrieval(sim.T, ks),
        "volume_to_report": cross_modal_retrieval(sim, ks),
    }
    if img is not None:
        out["embedding"] = {
            "alignment": alignment(img, txt),
            "uniformity_image": uniformity(img),
            "uniformity_text": uniformity(txt),
        }
    if labels is not None:
        if img is None:
            notes.append("volume_to_volume needs image latents; skipped")
        else:
            y = np.asarray(labels)
            if y.shape[0] != n:
                raise ValueError("labels and latents differ in length")
            rel = label_relevance(y, relevance)
            vv_sim = _l2_normalize(img) @ _l2_normalize(img).T
            vv: dict[str, Any] = {"relevance": relevance}
            for k in map_ks:
                vv[f"map@{k}"], vv["n_queries"] = mean_average_precision_at_k(vv_sim, rel, k)
            # a random ranking retrieves relevant items at the base rate
            vv["random_precision"] = float(rel.sum() / (n * (n - 1))) if n > 1 else float("nan")
            out["volume_to_volume"] = vv
    out["notes"] = notes
    return to_jsonable(out)
