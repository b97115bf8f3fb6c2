"""Score fusion: pure functions over per-mode score arrays of one candidate set.

Why arrays and not ranked lists: every candidate of a search gets all its scores
computed exactly (no "missing = 0"), so each mode's scores are one float array aligned
with the candidate ids, and fusion is whole-array maths.

* :func:`weighted` — BGE-M3's formula ``Σ w_m · s_m / Σ w_m`` over the modes used.
* :func:`rrf` — reciprocal rank fusion, ``Σ w_m / (k + rank_m)`` with 1-based ranks and
  ``k = 60`` (Cormack et al. 2009). qdrant-client's default constant is 2; ours is
  stated here and in :data:`RRF_K`.
* :func:`dbsf` — distribution-based score fusion as in Qdrant: each mode's scores are
  mapped with ``(s - (μ - 3σ)) / 6σ`` (sample σ; a single candidate or σ = 0 gives 0.5)
  and the weighted normalized scores are summed.

Ranks and final order break ties by id (ascending), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from m3search.plan import FUSIONS, check_fusion

__all__ = [
    "RRF_K",
    "FUSIONS",
    "weighted",
    "rrf",
    "dbsf",
    "fuse",
    "contributions",
    "total",
    "ranks",
    "order",
    "id_ranks",
]

#: The RRF constant used by m3search (qdrant-client uses 2 by default).
RRF_K = 60


def _as_arrays(scores: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    return {m: np.asarray(s, dtype=np.float64) for m, s in scores.items()}


def order(ids: Sequence[Any], fused: np.ndarray) -> np.ndarray:
    """Indices sorting candidates by fused score descending, then id ascending (ids: strings, or tuples Python
    orders, such as a passage's ``(id, window)``; one kind per call). The ids are ranked by Python's sort: a NumPy string
    array padded each to the longest (an id of a million characters made a search hold gigabytes) and dropped
    trailing NULs ("a" and "a\x00" tied)."""
    # lexsort's last key is primary; the ids' ranks break ties.
    return np.lexsort((id_ranks(ids), -np.asarray(fused, np.float64)))


def id_ranks(ids: Sequence[Any]) -> np.ndarray:
    """Each id's place among ``ids`` sorted (0-based; equal ids keep their order): the tie-break of every ranking
    here and in :mod:`m3search.tuning`, by Python's sort (see :func:`order`)."""
    ids = list(ids)
    out = np.empty(len(ids), dtype=np.int64)
    out[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return out


def ranks(ids: Sequence[Any], s: np.ndarray) -> np.ndarray:
    """1-based rank of each candidate in one mode's list (score desc, then id)."""
    r = np.empty(len(s), dtype=np.int64)
    r[order(ids, s)] = np.arange(1, len(s) + 1)
    return r


def weighted(scores: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> np.ndarray:
    """``Σ w_m · s_m / Σ w_m`` over the modes in ``scores`` (weights must not sum to 0)."""
    arrs = _as_arrays(scores)
    shares = _shares(weights, arrs)
    return np.asarray(sum(shares[m] * arrs[m] for m in arrs), dtype=np.float64)


def _shares(weights: Mapping[str, float], modes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each used mode's ``w_m / Σ w_m``. Divided before the scores are multiplied: ``w_m · s_m`` overflowed to inf
    for weights near float's largest (1e308, every hit's score inf) and lost the scores to rounding for subnormal
    ones (5e-324, every hit's score equal)."""
    total = float(sum(weights[m] for m in modes))
    if total <= 0:
        raise ValueError("the weights of the modes used sum to 0")
    return {m: weights[m] / total for m in modes}


def rrf(
    scores: Mapping[str, Sequence[float]], weights: Mapping[str, float], ids: Sequence[Any], k: int = RRF_K
) -> np.ndarray:
    """Weighted reciprocal rank fusion over the candidates: ``Σ w_m / (k + rank_m)``."""
    arrs = _as_arrays(scores)
    n = len(ids)
    out = np.zeros(n, dtype=np.float64)
    for m, s in arrs.items():
        out += weights[m] / (k + ranks(ids, s))
    return out


def _dbsf_normalize(s: np.ndarray) -> np.ndarray:
    if len(s) <= 1:
        return np.full(len(s), 0.5)
    std = float(np.std(s, ddof=1))
    if std == 0.0:
        return np.full(len(s), 0.5)
    low = float(np.mean(s)) - 3 * std
    return (s - low) / (6 * std)


def dbsf(scores: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> np.ndarray:
    """Distribution-based score fusion (Qdrant's mean ± 3σ normalization), weighted sum."""
    arrs = _as_arrays(scores)
    n = len(next(iter(arrs.values()))) if arrs else 0
    out = np.zeros(n, dtype=np.float64)
    for m, s in arrs.items():
        out += weights[m] * _dbsf_normalize(s)
    return out


def fuse(
    method: str, scores: Mapping[str, Sequence[float]], weights: Mapping[str, float], ids: Sequence[Any]
) -> np.ndarray:
    """Fused score of each candidate with ``method`` (one of :data:`FUSIONS`): the formulas as written, the oracle
    of :func:`contributions` (which the Collection sums with :func:`total`)."""
    method = check_fusion(method)
    if method == "weighted":
        return weighted(scores, weights)
    if method == "rrf":
        return rrf(scores, weights, ids)
    return dbsf(scores, weights)


def total(method: str, parts: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The fused scores: the sum of :func:`contributions`' ``parts``. A ValueError where weights near float's
    largest (their sum finite) make one infinite: DBSF's scores grow with its weights (a candidate far past 3 sigma
    maps above 2), and an inf score is no ranking (over HTTP it was a 400 quoting pydantic's answer model). Only
    the weights' ratios decide the ranking, so smaller ones in the same ratios rank the same."""
    with np.errstate(over="ignore", invalid="ignore"):  # told below, in words
        out = np.sum(list(parts.values()), axis=0)
    if np.isinf(out).any():
        used = ", ".join(f"{m}={weights[m]:g}" for m in parts)
        raise ValueError(f"weights ({used}) are too large: {method} scores overflow; scale them down (same ratios)")
    return out


def contributions(
    method: str, scores: Mapping[str, Sequence[float]], weights: Mapping[str, float], ids: Sequence[Any]
) -> dict[str, np.ndarray]:
    """Each mode's additive share of the fused score (they sum to :func:`fuse`'s result, up to rounding)."""
    method = check_fusion(method)
    arrs = _as_arrays(scores)
    if method == "weighted":
        shares = _shares(weights, arrs)
        return {m: shares[m] * s for m, s in arrs.items()}
    if method == "rrf":
        return {m: weights[m] / (RRF_K + ranks(ids, s)) for m, s in arrs.items()}
    with np.errstate(over="ignore"):  # dbsf; an inf part: :func:`total` says so
        return {m: weights[m] * _dbsf_normalize(s) for m, s in arrs.items()}
