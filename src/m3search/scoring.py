"""BGE-M3's three relevance scores, as whole-array maths.

FlagEmbedding's semantics, exact over real tokens:

* dense: inner product of the normalized [CLS] vectors;
* lexical (sparse): sum over shared token ids of ``w_q * w_d``;
* ColBERT: mean over the query's vectors of the max dot product with the document's
  vectors. FlagEmbedding's *batched* ``compute_score`` pads shorter documents with zero
  vectors, which floors every best match at 0; here only real tokens count, so the two
  differ exactly when a query vector's best real match is negative (possible with random
  weights, essentially never with trained ones). Its per-pair ``colbert_score`` agrees.

Every function takes plain arrays (``(n, d)`` float32, CSR matrices, ragged token arrays
with ``(n + 1,)`` offsets) and returns a plain ``(n_queries, n_docs)`` float32 array, or
``(n,)`` for the row-wise ``pair_*`` variants.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = [
    "dense_scores",
    "lexical_scores",
    "colbert_scores",
    "colbert_score",
    "pair_dense_scores",
    "pair_lexical_scores",
    "pair_colbert_scores",
    "segment_max",
]


def dense_scores(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """``(nq, d) x (nd, d) -> (nq, nd)`` inner products."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    d = np.ascontiguousarray(docs, dtype=np.float32)
    return np.atleast_2d(q) @ np.atleast_2d(d).T


def lexical_scores(queries: sp.spmatrix, docs: sp.spmatrix) -> np.ndarray:
    """``(nq, V) x (nd, V) -> (nq, nd)``: sum of ``w_q * w_d`` over shared token ids."""
    q, d = sp.csr_matrix(queries), sp.csr_matrix(docs)
    width = max(q.shape[1], d.shape[1])
    q.resize((q.shape[0], width))
    d.resize((d.shape[0], width))
    return np.asarray((q @ d.T).toarray(), dtype=np.float32)


def segment_max(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Max over column segments ``[offsets[j], offsets[j+1])`` of a ``(m, T)`` array.

    Empty segments give 0 (an empty document matches nothing).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    out = np.zeros((values.shape[0], len(lengths)), dtype=np.float32)
    nonempty = lengths > 0
    if values.shape[1] and nonempty.any():
        # reduceat needs strictly valid starts; take them only for non-empty segments.
        out[:, nonempty] = np.maximum.reduceat(values, offsets[:-1][nonempty], axis=1)
    return out


def colbert_scores(
    q_vecs: np.ndarray,
    q_offsets: np.ndarray,
    d_vecs: np.ndarray,
    d_offsets: np.ndarray,
    *,
    block_elems: int = 1 << 25,
) -> np.ndarray:
    """ColBERT late-interaction scores of every query against every document.

    All queries' vectors in one matmul against a block of documents' tokens (blocks keep
    the ``(query tokens, doc tokens)`` similarity matrix under ``block_elems`` floats,
    128 MiB by default), a segmented max over each document's tokens, then a segmented
    mean over each query's vectors. One large matmul instead of one per query.
    """
    q_vecs = np.ascontiguousarray(q_vecs, dtype=np.float32)
    d_vecs = np.ascontiguousarray(d_vecs, dtype=np.float32)
    q_offsets = np.asarray(q_offsets, dtype=np.int64)
    d_offsets = np.asarray(d_offsets, dtype=np.int64)
    q_len = np.diff(q_offsets)
    n_q, n_d = len(q_len), len(d_offsets) - 1
    out = np.zeros((n_q, n_d), dtype=np.float32)
    live = q_len > 0  # an empty query scores 0 against everything
    if not live.any() or n_d == 0:
        return out
    q_all = q_vecs[q_offsets[0] : q_offsets[-1]]
    q_starts = q_offsets[:-1][live] - q_offsets[0]
    tokens_per_block = max(1, block_elems // max(len(q_all), 1))
    j0 = 0
    while j0 < n_d:
        t0 = d_offsets[j0]
        j1 = int(np.searchsorted(d_offsets, t0 + tokens_per_block, side="right")) - 1
        j1 = min(max(j1, j0 + 1), n_d)
        sims = q_all @ d_vecs[t0 : d_offsets[j1]].T
        best = segment_max(sims, d_offsets[j0 : j1 + 1] - t0)  # (query tokens, docs in block)
        sums = np.add.reduceat(best.astype(np.float64), q_starts, axis=0)
        out[live, j0:j1] = sums / q_len[live, None]
        j0 = j1
    return out


def colbert_score(query: np.ndarray, doc: np.ndarray) -> float:
    """One pair: mean over query vectors of the max dot product over the doc's vectors."""
    if len(query) == 0 or len(doc) == 0:
        return 0.0
    return float((np.asarray(query, np.float32) @ np.asarray(doc, np.float32).T).max(axis=1).mean())


def pair_dense_scores(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Row-wise dense scores of aligned ``(n, d)`` arrays."""
    return np.einsum("ij,ij->i", np.asarray(queries, np.float32), np.asarray(docs, np.float32))


def pair_lexical_scores(queries: sp.spmatrix, docs: sp.spmatrix) -> np.ndarray:
    """Row-wise lexical scores of aligned CSR matrices."""
    q, d = sp.csr_matrix(queries), sp.csr_matrix(docs)
    width = max(q.shape[1], d.shape[1])
    q.resize((q.shape[0], width))
    d.resize((d.shape[0], width))
    return np.asarray(q.multiply(d).sum(axis=1), dtype=np.float32).ravel()


def pair_colbert_scores(
    q_vecs: np.ndarray,
    q_offsets: np.ndarray,
    d_vecs: np.ndarray,
    d_offsets: np.ndarray,
    *,
    block_elems: int = 1 << 25,
) -> np.ndarray:
    """Row-wise ColBERT scores of aligned ragged arrays (pair i = query i, document i).

    Pairs go longest document first in blocks, each padded into ``(m, L, d)`` arrays of at
    most about ``block_elems`` floats (with its similarities) and run as one batched matmul;
    padded document positions are masked to -inf so only real tokens can be the max. Why
    blocks: padding every pair to the call's longest document cost ``n x 8192 x d`` floats
    when one passage of ``compute_score``'s many was long.
    """
    import torch

    q_offsets = np.asarray(q_offsets, np.int64)
    d_offsets = np.asarray(d_offsets, np.int64)
    q_len, d_len = np.diff(q_offsets), np.diff(d_offsets)
    out = np.zeros(len(q_len), np.float32)
    order = np.argsort(-d_len, kind="stable")
    dim = q_vecs.shape[1] if q_vecs.ndim == 2 else 0
    lq = int(q_len.max(initial=0))
    i = 0
    while i < len(order):
        ld = int(d_len[order[i]])  # the longest document left: this block's width
        rows = order[i : i + max(1, block_elems // max((lq + ld) * dim + lq * ld, 1))]
        i += len(rows)
        q, d = _pad(q_vecs, q_offsets, rows), _pad(d_vecs, d_offsets, rows)
        sims = torch.bmm(torch.from_numpy(q), torch.from_numpy(d).transpose(1, 2))  # (m, Lq, Ld)
        d_mask = torch.from_numpy(np.arange(d.shape[1])[None, :] < d_len[rows, None])
        sims = sims.masked_fill(~d_mask[:, None, :], float("-inf"))
        best = sims.max(dim=2).values if d.shape[1] else torch.zeros(q.shape[:2])
        q_mask = torch.from_numpy(np.arange(q.shape[1])[None, :] < q_len[rows, None])
        best = torch.where(q_mask & torch.isfinite(best), best, torch.zeros(()))
        out[rows] = (best.sum(dim=1) / torch.from_numpy(np.maximum(q_len[rows], 1).astype(np.float32))).numpy()
    return out


def _pad(vecs: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Segments ``rows`` of ragged ``(T, d)`` + offsets -> zero-padded ``(len(rows), L_max, d)``, no per-row loop."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    total = int(lengths.sum())
    out = np.zeros((len(rows), int(lengths.max(initial=0)), vecs.shape[1] if vecs.ndim == 2 else 0), np.float32)
    if total:
        cols = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[np.repeat(np.arange(len(rows)), lengths), cols] = vecs[np.repeat(starts, lengths) + cols]
    return out
