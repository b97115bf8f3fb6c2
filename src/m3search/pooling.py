"""Token pooling: fewer ColBERT vectors per document, chosen by clustering its own tokens.

Why: a document's token vectors are the 97% of a collection's bytes and the whole cost of
MaxSim re-ranking. Clavié et al. 2024 (arXiv 2409.14683, "Reducing the Footprint of
Multi-Vector Retrieval with Minimal Performance Impact via Token Pooling") cluster each
document's token vectors hierarchically (Ward) into ``n / pool_factor`` groups and keep
each group's mean; pool factor 2 is reported as near lossless. Queries are untouched.

What this module does, and where it departs from the reference implementation
(``pool_embeddings_hierarchical`` in stanford-futuredata/ColBERT, also in RAGatouille and
PyLate):

* Ward linkage on the token vectors themselves (Euclidean distance between unit vectors is
  a monotone function of their cosine), where the reference clusters the rows of the
  ``1 - cosine`` matrix. Same criterion, the vectors' own geometry.
* ``ceil(n / pool_factor)`` clusters (the reference takes ``max(n // pool_factor, 1)``), so
  a document keeps at least one vector and ``pool_factor=1`` is the identity.
* Each cluster's plain MEAN, NOT re-normalized, as in the reference: the mean of a spread
  cluster is shorter than 1, so its dot product with a query token is the average of its
  members' dot products (a matched token is not over-credited by a merged neighbour).
* No protected tokens: BGE-M3's ColBERT output already drops [CLS].
* Deterministic: scipy's Ward linkage is deterministic for a given input; cluster ids are
  renumbered in order of their first token, so pooled vectors keep the document's order.

The per-document work is one Gram matrix (BLAS), scipy's O(n^2) Ward linkage and one
averaging product; the means of a
cluster means are one small matrix product per document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.cluster.hierarchy import linkage

__all__ = ["pool_tokens", "pooled_length", "check_pool_factor"]


def check_pool_factor(pool_factor: object) -> int:
    """``pool_factor`` as an int >= 1, or ValueError (one definition of the rule)."""
    if isinstance(pool_factor, bool) or not isinstance(pool_factor, (int, np.integer)) or pool_factor < 1:
        raise ValueError(f"colbert_pool_factor must be an integer >= 1 (1 = no pooling), got {pool_factor!r}")
    return int(pool_factor)


def pooled_length(n_tokens: int, pool_factor: int) -> int:
    """Number of vectors a document of ``n_tokens`` keeps: ``ceil(n / pool_factor)``."""
    return math.ceil(n_tokens / pool_factor)


def _distances(x: np.ndarray) -> np.ndarray:
    """Condensed Euclidean distances between the rows of ``x`` (one Gram matrix), float64, in ``x``'s precision."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows in the result: _labels redoes it in float64
        g = x @ x.T
        sq = np.diag(g)
        iu = np.triu_indices(len(x), 1)
        return np.sqrt(np.maximum(sq[iu[0]] + sq[iu[1]] - 2.0 * g[iu], 0.0), dtype=np.float64)


def _labels(x: np.ndarray, k: int) -> np.ndarray:
    """Cluster ids 0..k-1 of the rows of ``x`` (Ward, cut at k clusters), numbered by first appearance."""
    n = len(x)
    if k >= n:
        return np.arange(n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    dist = _distances(x)
    if not np.isfinite(dist).all():  # squares past float32's range (vectors given with values ~1e19 and up)
        dist = _distances(x.astype(np.float64))  # (only then: float64 breaks ties of equal tokens differently)
    z = linkage(dist, method="ward")
    # The k-cluster cut is the first n - k merges (Ward's merge heights never decrease). Each
    # merged node points at the node it became; pointer jumping finds every leaf's root.
    m = n - k
    parent = np.arange(2 * n - 1)
    parent[z[:m, :2].astype(np.int64)] = (n + np.arange(m))[:, None]
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    _, first, inverse = np.unique(parent[:n], return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]


def pool_tokens(
    colbert: np.ndarray, offsets: np.ndarray, pool_factor: int, *, names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pool each document's token vectors into ``ceil(n / pool_factor)`` cluster means.

    ``colbert`` float32 ``(T, d)`` with ``offsets`` int64 ``(n_docs + 1,)`` (document i =
    ``colbert[offsets[i]:offsets[i + 1]]``), the layout of :class:`m3search.M3Embeddings`.
    Returns ``(pooled (T', d) float32, offsets' (n_docs + 1,) int64)``. ``pool_factor=1``
    returns the input unchanged (no copy). A NaN or infinite value is a ValueError naming its
    document (``names[i]`` where given: the caller's id), not SciPy's "condensed distance matrix".
    """
    pool_factor = check_pool_factor(pool_factor)
    offsets = np.asarray(offsets, dtype=np.int64)
    if pool_factor == 1:
        return colbert, offsets
    x = np.ascontiguousarray(colbert, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        i = int(np.searchsorted(offsets, bad[0], side="right")) - 1
        doc = f"document {i}" if names is None else f"document {names[i]!r}"
        raise ValueError(f"the ColBERT vectors of {doc} hold NaN or infinite values: they cannot be pooled")
    parts, counts = [], np.zeros(len(offsets) - 1, dtype=np.int64)
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        doc = x[a:b]
        lab = _labels(doc, pooled_length(b - a, pool_factor))
        k = int(lab.max()) + 1 if b > a else 0
        # Cluster means as one small product: (k x n) averaging matrix @ (n x d) tokens.
        avg = np.zeros((k, b - a), dtype=np.float32)
        avg[lab, np.arange(b - a)] = 1.0
        avg /= avg.sum(axis=1, keepdims=True)
        parts.append(avg @ doc)
        counts[i] = k
    pooled = np.concatenate(parts) if parts else x[:0]
    return pooled, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
