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

Memory: nothing here holds an ``(N, N)`` array unless the caller passes one. The similarities are computed
(or read) in blocks of query rows, as many rows at a time as fit in ``block_bytes`` (default 256 MB, the
rows and the temporaries of the work on them together), and each block is reduced to per-query numbers
before the next: the match's rank (how many gallery items score higher and how many equal), the top-k of
volume→volume retrieval, the uniformity's log-sum-exp. A 50k gallery needs the block, not the 18.6 GB
matrix. :func:`similarity_matrix` and :func:`label_relevance` still return the full matrices, for small
sets and inspection.

Numerics: the similarities are the same float64 products as the full matrix's, computed by block. BLAS picks
its kernel by the shape of the product, so a similarity may differ from the one-shot product's by an ulp
(~1e-16); a rank can only change where two similarities of one query are that close, and results are
bitwise those of the full matrix whenever the products are exact (e.g. quantised latents). The uniformity
sums its terms by block (agreeing with a one-shot sum to ~1e-13 relative).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .metrics import to_jsonable

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "similarity_matrix",
    "expected_ranks",
    "cross_modal_retrieval",
    "blockwise_top_k",
    "label_relevance",
    "mean_average_precision_at_k",
    "alignment",
    "uniformity",
    "retrieval_metrics",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50, 100)

#: Working memory of one block of similarity rows and the work on it, in bytes.
DEFAULT_BLOCK_BYTES = 256 * 2**20

# How many arrays the size of the float64 similarity rows each kind of work holds at once.
_RANK_COPIES = 1.25  # the rows and a boolean comparison
_TOP_K_COPIES = 2.5  # the rows (a copy where the caller's matrix must not change), argpartition's int64 indices
_UNIFORMITY_COPIES = 1.25  # the rows, transformed in place, and a triangular mask
_OVERLAP_COPIES = 0.75  # float32 label products and their boolean
_MATCH_BLOCK_ROWS = 128  # rows of the diagonal blocks that give the matches ahead of the pass


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


def _pair(queries: Any, gallery: Any, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    q, g = _as_latents(queries), _as_latents(gallery)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"latent sizes differ: {q.shape[1]} vs {g.shape[1]}")
    if normalize:
        q, g = _l2_normalize(q), _l2_normalize(g)
    return q, g


def _block_bounds(n: int, width: int, block_bytes: int, copies: float = 1.0) -> list[tuple[int, int]]:
    """Row ranges of blocks of float64 rows ``width`` wide that fit ``block_bytes`` with ``copies`` such arrays.

    The rows are shared out evenly (sizes differ by at most one), so no block is a lone leftover row: BLAS
    computes a one-row product with another kernel (and other rounding) than the rest.
    """
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, not {block_bytes}")
    if n <= 0:
        return []
    rows = max(1, int(block_bytes // (copies * 8 * max(width, 1))))
    n_blocks = -(-n // rows)
    size, extra = divmod(n, n_blocks)
    bounds, start = [], 0
    for b in range(n_blocks):
        stop = start + size + (b < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _product_blocks(q: np.ndarray, g: np.ndarray, block_bytes: int, copies: float) -> Iterator[tuple[int, np.ndarray]]:
    bounds = _block_bounds(q.shape[0], g.shape[0], block_bytes, copies)
    if len(bounds) == 1 and np.may_share_memory(q, g):  # numpy computes x @ x.T with syrk (another rounding)
        g = g.copy()
    for start, stop in bounds:
        yield start, q[start:stop] @ g.T


def _matrix_blocks(sim: np.ndarray, block_bytes: int, copies: float,
                   copy: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Row blocks of a given matrix as float64: views where possible, copies when ``copy`` (to be written)."""
    for start, stop in _block_bounds(sim.shape[0], sim.shape[1], block_bytes, copies):
        block = sim[start:stop]
        yield start, np.array(block, dtype=np.float64) if copy else np.asarray(block, dtype=np.float64)


def _square(similarity: Any, what: str) -> np.ndarray:
    sim = similarity if isinstance(similarity, np.ndarray) else np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"need a square (N, N) {what}; got {sim.shape}")
    return sim


def similarity_matrix(image_latents: Any, text_latents: Any, normalize: bool = True) -> np.ndarray:
    """Cosine similarity between every volume and every report, as one matrix (for small sets).

    The metrics below never build it: they compute the same products by blocks of rows.

    Args:
        image_latents: ``(N, D)`` volume embeddings.
        text_latents: ``(M, D)`` report embeddings.
        normalize: L2-normalise both first (cosine similarity); CLIP latents usually already are.

    Returns:
        ``(N, M)`` matrix, row = volume, column = report.
    """
    img, txt = _pair(image_latents, text_latents, normalize)
    return img @ txt.T


# ------------------------------------------------------------------------------------------- match ranks
def _ranks_of_blocks(blocks: Iterable[tuple[int, np.ndarray]], n: int,
                     match_columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(higher, tied)`` per query from row blocks whose match of query ``i`` is column ``i`` (or
    ``match_columns[i]``)."""
    higher, tied = np.empty(n, dtype=np.intp), np.empty(n, dtype=np.intp)
    for start, block in blocks:
        rows = np.arange(block.shape[0])
        cols = start + rows if match_columns is None else match_columns[start + rows]
        match = block[rows, cols][:, None]
        higher[start:start + rows.size] = (block > match).sum(axis=1)
        tied[start:start + rows.size] = (block == match).sum(axis=1)
        del block  # before the next block is computed
    return higher, tied


def _ranks_both_ways(img: np.ndarray, txt: np.ndarray, block_bytes: int
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(higher, tied)`` of volume queries (rows of ``img @ txt.T``) and of report queries (its columns), in one
    pass over row blocks of the matrix: each block's rows give the volume queries' ranks, and its columns add to
    the report queries' counts against the matches ``d_j``, which must be known before the pass."""
    n = img.shape[0]
    if np.may_share_memory(img, txt):  # see _product_blocks
        txt = txt.copy()
    bounds = _block_bounds(n, n, block_bytes, _RANK_COPIES)
    # the matches from small diagonal blocks (N * 128 * D products) instead of a second N^2 D pass
    step = _MATCH_BLOCK_ROWS
    match = np.empty(n)
    for a in range(0, n, step):
        match[a:a + step] = np.diag(img[a:a + step] @ txt[a:a + step].T)
    higher, tied = np.empty(n, dtype=np.intp), np.empty(n, dtype=np.intp)
    col_higher, col_tied = np.zeros(n, dtype=np.intp), np.zeros(n, dtype=np.intp)
    redo = np.zeros(n, dtype=bool)
    for a, b in bounds:
        block = img[a:b] @ txt.T
        rows = np.arange(b - a)
        own = block[rows, a + rows]
        higher[a:b] = (block > own[:, None]).sum(axis=1)
        tied[a:b] = (block == own[:, None]).sum(axis=1)
        col_higher += (block > match).sum(axis=0)
        col_tied += (block == match).sum(axis=0)
        # BLAS picks its kernel by shape, so a diagonal block's product may differ from the pass's by an ulp:
        # those report queries are ranked again below, each against values of one product
        redo[a:b] = own != match[a:b]
        del block
    redo_idx = np.flatnonzero(redo)
    if redo_idx.size:
        h, t = _ranks_of_blocks(_product_blocks(txt[redo_idx], img, block_bytes, _RANK_COPIES), redo_idx.size,
                                match_columns=redo_idx)
        col_higher[redo_idx], col_tied[redo_idx] = h, t
    return (higher, tied), (col_higher, col_tied)


def expected_ranks(similarity: Any, block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Position of each query's match (the diagonal) among its row's gallery.

    Args:
        similarity: ``(N, N)`` matrix, row = query, column = gallery item, match of query ``i`` = item ``i``.
        block_bytes: working memory of the row blocks it is read in.

    Returns:
        ``(higher, tied)``: per query, the number of items scoring strictly higher than the match and
        the number scoring equal to it (the match included, so ``tied >= 1``).
    """
    sim = _square(similarity, "similarity matrix with matches on the diagonal")
    return _ranks_of_blocks(_matrix_blocks(sim, block_bytes, _RANK_COPIES), sim.shape[0])


def _recall_at_k(higher: np.ndarray, tied: np.ndarray, k: int) -> float:
    # P(rank <= k) with the rank uniform on higher+1 .. higher+tied
    return float(np.clip((k - higher) / tied, 0.0, 1.0).mean())


def _expected_over_ties(higher: np.ndarray, tied: np.ndarray, fn) -> float:
    vals = [fn(np.arange(h + 1, h + t + 1)).mean() for h, t in zip(higher, tied)]
    return float(np.mean(vals))


def _rank_metrics(higher: np.ndarray, tied: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
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


def cross_modal_retrieval(similarity: Any, ks: Sequence[int] = DEFAULT_KS,
                          block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, Any]:
    """Recall@k, MRR, nDCG and median rank for queries (rows) against a gallery (columns).

    Args:
        similarity: ``(N, N)`` similarity, row = query, match on the diagonal.
        ks: cut-offs for recall@k and nDCG@k.
        block_bytes: working memory of the row blocks it is read in.

    Returns:
        ``{"n_queries", "recall@k"..., "random_recall@k"..., "mrr", "random_mrr", "ndcg", "ndcg@10",
        "median_rank", "mean_rank"}``. With one relevant item, nDCG = 1 / log2(1 + rank). The
        ``random_*`` entries are the expected values of a random ranking (recall@k = min(k, N) / N).
    """
    return _rank_metrics(*expected_ranks(similarity, block_bytes), ks)


# ------------------------------------------------------------------------------------------------- top-k
def _stable_top_k(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest of each row, largest first, ties by column index: the first ``k`` of a stable argsort
    of ``-block``, in O(row) time per row instead of a sort."""
    rows, width = block.shape
    k = min(k, width)
    if k == 0:
        return np.empty((rows, 0)), np.empty((rows, 0), dtype=np.intp)
    if k == width:
        idx = np.argsort(-block, axis=1, kind="stable")
        return np.take_along_axis(block, idx, axis=1), idx
    idx = np.argpartition(block, width - k, axis=1)[:, width - k:].copy()  # a k-largest set, any tie order
    vals = np.take_along_axis(block, idx, axis=1)
    cut = vals.min(axis=1)
    # where items tied at the cut-off value were left out, the set must take the lowest-index ones instead
    spilled = (block == cut[:, None]).sum(axis=1) > (vals == cut[:, None]).sum(axis=1)
    for r in np.flatnonzero(spilled):
        above = idx[r][vals[r] > cut[r]]
        at = np.flatnonzero(block[r] == cut[r])[: k - above.size]
        idx[r] = np.concatenate([above, at])
        vals[r] = block[r, idx[r]]
    order = np.lexsort((idx, -vals), axis=-1)  # value down, then index up
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _top_k_of_blocks(blocks: Iterable[tuple[int, np.ndarray]], n: int, k: int,
                     exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    scores, indices = np.empty((n, k)), np.empty((n, k), dtype=np.intp)
    for start, block in blocks:
        if exclude_self:  # query i is gallery item i: it goes last, as in the full matrix with a -inf diagonal
            rows = np.arange(block.shape[0])
            block[rows, start + rows] = -np.inf
        s, i = _stable_top_k(block, k)
        del block  # before the next block is computed
        scores[start:start + len(s)], indices[start:start + len(s)] = s, i
    return scores, indices


def blockwise_top_k(queries: Any, gallery: Any, k: int = 10, block_bytes: int = DEFAULT_BLOCK_BYTES,
                    normalize: bool = True, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cosine similarities of each query in the gallery without the ``(Q, G)`` matrix.

    Memory ``O(block_bytes + Q k)``: the similarity rows of as many queries at a time as fit the budget, each
    block reduced to its top-k before the next. Ties are broken by gallery index (the order of a stable sort).

    Args:
        queries: ``(Q, D)`` embeddings (numpy or torch).
        gallery: ``(G, D)`` embeddings.
        k: how many per query (at most ``G``).
        block_bytes: working memory of one block.
        normalize: L2-normalise both first.
        exclude_self: self-retrieval (queries and gallery the same set): query ``i`` is not a result of
            itself (it ranks below every other item).

    Returns:
        ``(scores, indices)``, both ``(Q, min(k, G))``, best first.
    """
    q, g = _pair(queries, gallery, normalize)
    if k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    if exclude_self and q.shape[0] > g.shape[0]:
        raise ValueError("exclude_self needs query i to be gallery item i")
    k = min(k, g.shape[0])
    return _top_k_of_blocks(_product_blocks(q, g, block_bytes, _TOP_K_COPIES), q.shape[0], k, exclude_self)


# ---------------------------------------------------------------------------------------------- relevance
def label_relevance(labels: Any, relevance: str = "exact") -> np.ndarray:
    """Which volumes are relevant to which, from their multi-label vectors, as one matrix (for small sets).

    :func:`retrieval_metrics` does not build it: it looks up the relevance of each query's top-k only.

    Args:
        labels: ``(N, C)`` 0/1 label vectors.
        relevance: ``"exact"`` (identical vectors) or ``"overlap"`` (at least one shared positive
            label, i.e. Jaccard > 0).

    Returns:
        ``(N, N)`` boolean matrix with a False diagonal (a query is never its own result).
    """
    y = _label_matrix(labels, relevance)
    if relevance == "exact":
        rel = (y[:, None, :] == y[None, :, :]).all(axis=2)
    else:
        yi = y.astype(np.int64)
        rel = (yi @ yi.T) > 0
    np.fill_diagonal(rel, False)
    return rel


def _label_matrix(labels: Any, relevance: str) -> np.ndarray:
    y = np.asarray(labels).astype(bool)
    if y.ndim != 2:
        raise ValueError(f"labels must be (N, C); got {y.shape}")
    if relevance not in ("exact", "overlap"):
        raise ValueError(f"relevance must be 'exact' or 'overlap', not {relevance!r}")
    return y


def _relevance_of_top_k(y: np.ndarray, indices: np.ndarray, relevance: str, block_bytes: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``(hits, n_relevant)``: whether each query's retrieved items are relevant to it, ``(N, k)``, and how many
    relevant items each query has in all (itself left out), from the label rows: O(N k + block) memory."""
    n = y.shape[0]
    if relevance == "exact":
        _, group, size = np.unique(y, axis=0, return_inverse=True, return_counts=True)
        group = group.reshape(-1)
        return group[indices] == group[:, None], size[group] - 1
    hits = np.empty(indices.shape, dtype=bool)
    for start, stop in _block_bounds(n, indices.shape[1] * y.shape[1], block_bytes, 1 / 4):
        hits[start:stop] = (y[indices[start:stop]] & y[start:stop, None, :]).any(axis=2)
    yf = y.astype(np.float32)  # label counts are exact in float32
    n_rel = np.empty(n, dtype=np.intp)
    for start, stop in _block_bounds(n, n, block_bytes, _OVERLAP_COPIES):
        n_rel[start:stop] = ((yf[start:stop] @ yf.T) > 0).sum(axis=1)
    return hits, n_rel - y.any(axis=1)  # a volume with a finding overlaps itself


def _map_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> tuple[float, int]:
    """mAP@k from the relevance of each query's ranked results (at least ``min(k, N - 1)`` columns)."""
    used = n_rel > 0
    if not used.any():
        return float("nan"), 0
    h = np.ascontiguousarray(hits[:, : min(k, hits.shape[0] - 1)], dtype=np.float64)
    precision_at_i = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)
    ap = (precision_at_i * h).sum(axis=1)[used] / np.minimum(k, n_rel[used])
    return float(ap.mean()), int(used.sum())


def mean_average_precision_at_k(similarity: Any, relevant: Any, k: int,
                                block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[float, int]:
    """mAP@k of a self-retrieval (query set = gallery set, the query excluded from its own results).

    AP@k = (1 / min(k, R)) * sum over ranks i <= k of precision@i * rel(i), with R the number of
    relevant items of that query. Queries with R = 0 have no defined AP and are left out. Ties in
    similarity are broken by gallery index (stable sort). The matrices are read by blocks of rows, each
    reduced to its top-k.

    Args:
        similarity: ``(N, N)`` volume-volume similarity (finite).
        relevant: ``(N, N)`` boolean relevance (diagonal ignored).
        k: cut-off.
        block_bytes: working memory of the row blocks.

    Returns:
        ``(map_at_k, n_queries_used)``; NaN when no query has a relevant item.
    """
    sim, rel = np.asarray(similarity), np.asarray(relevant)
    n = sim.shape[0]
    if sim.shape != (n, n) or rel.shape != (n, n):
        raise ValueError("similarity and relevance must both be (N, N)")
    _, indices = _top_k_of_blocks(_matrix_blocks(sim, block_bytes, _TOP_K_COPIES, copy=True), n,
                                  min(k, max(n - 1, 0)), exclude_self=True)
    hits, n_rel = np.empty(indices.shape, dtype=bool), np.empty(n, dtype=np.intp)
    for start, stop in _block_bounds(n, n, block_bytes, 1 / 8):
        rows = np.array(rel[start:stop], dtype=bool)
        r = np.arange(stop - start)
        rows[r, start + r] = False
        hits[start:stop] = np.take_along_axis(rows, indices[start:stop], axis=1)
        n_rel[start:stop] = rows.sum(axis=1)
    return _map_at_k(hits, n_rel, k)


# -------------------------------------------------------------------------------------------- embeddings
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
    return _alignment(a, b, alpha, DEFAULT_BLOCK_BYTES)


def _alignment(a: np.ndarray, b: np.ndarray, alpha: float, block_bytes: int) -> float:
    distance = np.empty(a.shape[0])
    for start, stop in _block_bounds(a.shape[0], a.shape[1], block_bytes):  # a - b by blocks: 200 MB at 50k
        distance[start:stop] = np.linalg.norm(a[start:stop] - b[start:stop], axis=1)
    return float((distance ** alpha).mean())


def uniformity(x: Any, t: float = 2.0, block_bytes: int = DEFAULT_BLOCK_BYTES) -> float:
    """Uniformity on the hypersphere (Wang & Isola, 2020): log E exp(-t ||x_i - x_j||^2) over i != j.

    Lower is more uniform; the minimum for many points spread over the sphere approaches -t * 2
    in the limit of high dimension.

    Exact over every pair, without the ``(N, N)`` matrix: blocks of rows against the rows after them (each pair
    once, half the products of the full matrix), summed as a running log-sum-exp. The sum's order differs from a
    one-shot sum over the matrix, so the value agrees with that to ~1e-13 relative, not bitwise.

    Args:
        x: ``(N, D)`` embeddings (L2-normalised here), N >= 2.
        t: temperature.
        block_bytes: working memory of one block.

    Returns:
        The log of the mean Gaussian potential over distinct pairs.
    """
    return _uniformity(_l2_normalize(_as_latents(x)), t, block_bytes)


def _uniformity(a: np.ndarray, t: float, block_bytes: int) -> float:
    n = a.shape[0]
    if n < 2:
        return float("nan")
    peak, total = -np.inf, 0.0  # running max of the exponents and the sum of exp(v - peak)
    for start, stop in _block_bounds(n, n, block_bytes, _UNIFORMITY_COPIES):
        v = a[start:stop] @ a[start:].T  # the pairs (i, j >= start) of these rows
        v *= -2.0
        v += 2.0
        np.maximum(v, 0.0, out=v)  # squared distances of unit vectors
        v *= -t
        square = v[:, : stop - start]
        square[np.tri(stop - start, dtype=bool)] = -np.inf  # j <= i: not a pair, or counted in an earlier row
        block_peak = v.max()
        if block_peak == -np.inf:  # a last block of one row: no pair left
            continue
        if block_peak > peak:
            total *= np.exp(peak - block_peak)
            peak = block_peak
        v -= peak
        np.exp(v, out=v)
        total += float(v.sum())
        del v, square  # before the next block is computed
    return float(peak + np.log(total / (n * (n - 1) / 2)))


def retrieval_metrics(
    image_latents: Any = None,
    text_latents: Any = None,
    similarity: Any = None,
    labels: Any = None,
    ks: Sequence[int] = DEFAULT_KS,
    map_ks: Sequence[int] = (1, 5, 10, 50),
    relevance: str = "exact",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> dict[str, Any]:
    """All retrieval metrics of one split, JSON-serialisable (NaN → None), without an ``(N, N)`` array.

    From latents, each direction's similarities are computed by blocks of query rows that fit ``block_bytes``
    and reduced to the match's rank at once; volume→volume retrieval keeps only each query's top
    ``max(map_ks)`` (:func:`blockwise_top_k`) and looks up their relevance in the label rows. Peak memory is
    about ``block_bytes`` plus ``O(N (D + max(map_ks)))``.

    Args:
        image_latents: ``(N, D)`` volume embeddings (row ``i`` matches report ``i``).
        text_latents: ``(N, D)`` report embeddings.
        similarity: ``(N, N)`` volume×report similarity, used instead of the latents when given
            (then alignment, uniformity and volume→volume retrieval are not available).
        labels: ``(N, C)`` 0/1 label vectors for volume→volume mAP@k (optional).
        ks: cut-offs for recall@k.
        map_ks: cut-offs for volume→volume mAP@k.
        relevance: ``"exact"`` or ``"overlap"``, see :func:`label_relevance`.
        block_bytes: working memory of one block of similarity rows (256 MB by default; smaller is slower only
            when a block gets down to a few rows).

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
        img_n, txt_n = _pair(img, txt, normalize=True)
        n = img.shape[0]
        v2r, r2v = _ranks_both_ways(img_n, txt_n, block_bytes)
    else:
        sim = _square(similarity, "similarity matrix with matches on the diagonal")
        n = sim.shape[0]
        v2r = _ranks_of_blocks(_matrix_blocks(sim, block_bytes, _RANK_COPIES), n)
        r2v = _ranks_of_blocks(_matrix_blocks(sim.T, block_bytes, _RANK_COPIES), n)
    if any(k >= n for k in ks):
        notes.append(f"recall@k with k >= N={n} is 1 by construction")
    out: dict[str, Any] = {
        "n": int(n),
        "report_to_volume": _rank_metrics(*r2v, ks),
        "volume_to_report": _rank_metrics(*v2r, ks),
    }
    if img is not None:
        out["embedding"] = {
            "alignment": _alignment(img_n, txt_n, 2.0, block_bytes),
            "uniformity_image": _uniformity(img_n, 2.0, block_bytes),
            "uniformity_text": _uniformity(txt_n, 2.0, block_bytes),
        }
    if labels is not None:
        if img is None:
            notes.append("volume_to_volume needs image latents; skipped")
        else:
            y = _label_matrix(labels, relevance)
            if y.shape[0] != n:
                raise ValueError("labels and latents differ in length")
            k_max = min(max(map_ks, default=0), max(n - 1, 0))
            _, indices = blockwise_top_k(img_n, img_n, k_max, block_bytes, normalize=False, exclude_self=True)
            hits, n_rel = _relevance_of_top_k(y, indices, relevance, block_bytes)
            vv: dict[str, Any] = {"relevance": relevance}
            for k in map_ks:
                vv[f"map@{k}"], vv["n_queries"] = _map_at_k(hits, n_rel, k)
            # a random ranking retrieves relevant items at the base rate
            vv["random_precision"] = float(n_rel.sum() / (n * (n - 1))) if n > 1 else float("nan")
            out["volume_to_volume"] = vv
    out["notes"] = notes
    return to_jsonable(out)
