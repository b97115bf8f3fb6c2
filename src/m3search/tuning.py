"""Fit a collection's search defaults (mode, fusion, weights, candidates) to a few judged queries.

Why: BGE-M3's fixed weights (0.4, 0.2, 0.4) are not right everywhere, and which head is weak
depends on the domain. Tuning answers it from the user's own judged queries, honestly:

* **Cached scores.** Every setting of a re-ranking mode ranks a subset of one pool, dense
  top-C ∪ sparse top-C at the largest depth C tried, with the exact scores the collection
  computes anyway (:meth:`Collection.candidate_scores`). Queries are encoded and the pool
  scored ONCE; the pool at a smaller depth c is its members within the top c of the dense or
  sparse scores (every member of a first-stage list is in the pool, so the list is the pool's
  top c by that score). Every setting is then whole-array maths over ``(queries, pool)``
  arrays, the metric too (trec_eval's nDCG / recall / reciprocal rank re-done in NumPy,
  checked equal to pytrec_eval in the tests).
* **Honest.** The choice is made by k-fold cross-validation over queries: each fold is
  scored with the setting that is best on the other folds. The mean of those held-out
  scores is compared with the defaults' on the same queries, with a paired bootstrap
  interval of the difference; the tuned setting is adopted only when the interval's lower
  bound is above 0. Fixed seeds: the same input gives the same output.
* **Ties.** Settings are tried in a fixed order, the defaults first, then cheaper ones
  (smaller candidate depths) first; the first of equally good settings wins.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from m3search.filters import python_value
from m3search.fusion import FUSIONS, RRF_K, id_ranks
from m3search.plan import (
    DEFAULT_CANDIDATES,
    DEFAULT_WEIGHTS,
    MAX_CANDIDATES,
    MODES,
    check_fusion,
    check_int,
    check_limit,
    check_mode_total,
    check_weights,
    mode_name,
    parse_mode,
)

__all__ = [
    "CANDIDATE_GRID",
    "Setting",
    "DEFAULT_SETTING",
    "ScoreCache",
    "parse_metric",
    "settings_grid",
    "evaluate_settings",
    "cross_validate",
    "paired_bootstrap",
    "choose",
    "tune",
]

#: Candidate depths tried (per first-stage list); the pool is scored once at the largest.
CANDIDATE_GRID = (50, 100, 200, 400)
#: Weight grid step over the simplex (0.1: 66 points, the 3 single modes and 27 two-mode mixes included).
WEIGHT_STEP = 0.1
#: Finest weight step (0.01: 5,151 weight points): the grid grows with 1 / step squared, a step of 1e-300 never ended.
MIN_WEIGHT_STEP = 0.01
FOLDS = 5
SEED = 0
BOOTSTRAP = 2000
CONFIDENCE = 0.95
METRICS = ("ndcg", "recall", "mrr")


@dataclass(frozen=True)
class Setting:
    """One search setting: what ``Collection.search`` takes as mode / fusion / weights / candidates."""

    mode: str
    fusion: str
    weights: tuple[float, float, float]
    candidates: int

    def __post_init__(self) -> None:  # "RRF" was scored as dbsf (the fusion no other branch names), "Dense" re-ranked
        modes = parse_mode(self.mode)
        object.__setattr__(self, "mode", mode_name(modes))
        object.__setattr__(self, "fusion", check_fusion(self.fusion))
        # a setting's weights say which scores it fuses (evaluate_settings fuses all three by them): a weight on a
        # mode the setting leaves out was scored, but a search with the setting drops it
        weights = check_weights(self.weights)
        if extra := [m for m, w in zip(MODES, weights) if w > 0 and m not in modes]:
            raise ValueError(
                f"weights {weights} give weight to {', '.join(extra)}, which mode {self.mode!r} leaves out "
                "(a setting's weights say which scores it fuses: give it 0)"
            )
        check_mode_total(weights, self.mode)
        object.__setattr__(self, "weights", weights)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "fusion": self.fusion, "weights": list(self.weights), "candidates": self.candidates}

    def __str__(self) -> str:
        w = ",".join(f"{x:g}" for x in self.weights)
        return f"{self.mode} {self.fusion} ({w}) C={self.candidates}"


#: The built-in defaults (``mode="all"``, weighted, the paper's weights, 200 candidates).
DEFAULT_SETTING = Setting("all", "weighted", DEFAULT_WEIGHTS, DEFAULT_CANDIDATES)


def setting_of(defaults: Mapping[str, Any]) -> Setting:
    """A collection's search defaults as a :class:`Setting`, with zero weight on the modes its mode leaves
    out (the grid's form: a setting's weights say which scores it fuses)."""
    modes = parse_mode(defaults["mode"])
    weights = tuple(float(w) if m in modes else 0.0 for m, w in zip(MODES, defaults["weights"]))
    return Setting(defaults["mode"], defaults["fusion"], weights, int(defaults["candidates"]))


def parse_metric(metric: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; also ``recall@K`` and ``mrr@K``."""
    name, _, cut = str(metric).strip().lower().partition("@")
    shown = repr(metric) if len(str(metric)) <= 40 else repr(str(metric)[:40]) + "..."
    # ASCII digits ("²".isdigit() failed in int() with Python's own message)
    if name not in METRICS or not (cut.isascii() and cut.isdigit()) or not cut.strip("0"):
        raise ValueError(f"unknown metric {shown}: use ndcg@K, recall@K or mrr@K (e.g. ndcg@10)")
    # the lists scored are that deep (it was refused as "candidates=..."); int() refuses over 4,300 digits
    if len(cut.lstrip("0")) > len(str(MAX_CANDIDATES)) or int(cut) > MAX_CANDIDATES:
        raise ValueError(f"metric {shown}: K must be at most {MAX_CANDIDATES}, the deepest list a search scores")
    return name, int(cut)


def _mode_of(weights: Sequence[float]) -> str:
    return mode_name([m for m, w in zip(MODES, weights) if w > 0])


_SINGLE_LISTS = {"dense": (1.0, 0.0, 0.0), "sparse": (0.0, 1.0, 0.0)}


def settings_grid(
    step: float = WEIGHT_STEP,
    candidates: Sequence[int] = CANDIDATE_GRID,
    fusions: Sequence[str] = FUSIONS,
    baseline: Setting = DEFAULT_SETTING,
) -> list[Setting]:
    """Every setting tried, ``baseline`` (what searches use now) first, then the built-in defaults: weights
    over the simplex (zero weights = fewer modes) x fusion x candidate depth, without duplicates (``dense``
    and ``sparse`` alone do not re-rank, so fusion and depth do not matter to them; ``colbert`` alone ranks
    alike in every fusion)."""
    n, candidates = _check_grid(step, candidates)
    simplex = [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)]
    # dense / sparse alone keep the default depth: it does not change their ranking
    out = [baseline, DEFAULT_SETTING] + [
        Setting(m, "weighted", w, DEFAULT_CANDIDATES) for m, w in _SINGLE_LISTS.items()
    ]
    for c in sorted(candidates):
        out.append(Setting("colbert", "weighted", (0.0, 0.0, 1.0), c))
        for fusion in fusions:
            out.extend(Setting(_mode_of(w), fusion, w, c) for w in simplex if sum(x > 0 for x in w) >= 2)
    seen: set[Setting] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


def _check_grid(step: Any, candidates: Sequence[Any]) -> tuple[int, tuple[int, ...]]:
    """``1 / step``, the weight grid's steps, and ``candidates`` as Python ints, once ``step`` (a number dividing
    1) and the depths (a search's) are checked. Why: step=0 failed deep inside (ZeroDivisionError), a depth of 0
    was tuned, then refused only when stored, and a NumPy depth failed the stored setting's JSON."""
    if isinstance(step, bool) or not isinstance(step, Real) or not MIN_WEIGHT_STEP <= step <= 1:
        raise ValueError(f"step must be a number in [{MIN_WEIGHT_STEP}, 1] that divides 1, got {step!r}")
    n = round(1 / step)
    if not math.isclose(n * step, 1.0):
        raise ValueError(f"step must divide 1, got {step}")
    candidates = python_value(candidates)  # a NumPy array of depths: a list
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise ValueError(f"candidates must be a list of depths such as (50, 100, 200), got {candidates!r}"[:200])
    return n, tuple(check_limit("candidates", check_int("candidates", c), MAX_CANDIDATES) for c in candidates)


# ---------------------------------------------------------------------------------------------- cache


def _sort_desc(values: np.ndarray, idrank: np.ndarray, ids_desc: bool = False) -> np.ndarray:
    """Row-wise order by value descending, ties by id ascending (search) or descending (trec_eval)."""
    return np.lexsort((-idrank if ids_desc else idrank, -values), axis=-1)


@dataclass
class ScoreCache:
    """Exact per-mode scores of each query's pool, padded to ``(queries, pool)`` arrays.

    ``scores``: ``(3, Q, N)`` dense / sparse / ColBERT (padding -inf); ``valid``: real
    candidates; ``idrank``: each candidate's place among its pool's ids (sorted), for the
    "then id" tie-breaks; ``dense_rank`` / ``sparse_rank``: 0-based place in the dense /
    sparse first-stage list (a sparse list holds only documents sharing a token with the
    query); ``gains``: the qrels grade of each candidate; ``grades``: ``(Q, G)`` each query's
    judged grades, best first (the ideal ranking), padded with 0.
    """

    qids: list[str]
    depth: int
    scores: np.ndarray
    valid: np.ndarray
    idrank: np.ndarray
    dense_rank: np.ndarray
    sparse_rank: np.ndarray
    gains: np.ndarray
    grades: np.ndarray

    @classmethod
    def build(
        cls,
        collection: Any,
        queries: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        *,
        depth: int = max(CANDIDATE_GRID),
        query_embeddings: Any = None,
    ) -> ScoreCache:
        """Score every query's pool at ``depth`` once (queries encoded once)."""
        qids = list(queries)
        pools = collection.candidate_scores(
            [queries[q] for q in qids], candidates=depth, query_embeddings=query_embeddings
        )
        return cls.from_pools(qids, pools, qrels, depth)

    @classmethod
    def from_pools(
        cls,
        qids: Sequence[str],
        pools: Sequence[tuple[Sequence[str], Mapping[str, np.ndarray]]],
        qrels: Mapping[str, Mapping[str, int]],
        depth: int,
    ) -> ScoreCache:
        q, n = len(qids), max((len(ids) for ids, _ in pools), default=0)
        scores = np.full((3, q, max(n, 1)), -np.inf)
        valid = np.zeros((q, max(n, 1)), bool)
        idrank = np.zeros((q, max(n, 1)), np.int64)
        gains = np.zeros((q, max(n, 1)))
        for i, (qid, (ids, s)) in enumerate(zip(qids, pools)):
            m = len(ids)
            for j, mode in enumerate(MODES):
                scores[j, i, :m] = s[mode]
            valid[i, :m] = True
            idrank[i, :m] = id_ranks(ids)  # as the search breaks ties
            idrank[i, m:] = np.arange(m, idrank.shape[1])  # padding after every real id
            rel = qrels.get(qid, {})
            gains[i, :m] = [rel.get(d, 0) for d in ids]
        big = idrank.shape[1]
        dense_rank = np.empty_like(idrank)
        np.put_along_axis(dense_rank, _sort_desc(scores[0], idrank), np.arange(big)[None, :], axis=-1)
        sparse = np.where(valid & (scores[1] > 0), scores[1], -np.inf)
        sparse_rank = np.empty_like(idrank)
        np.put_along_axis(sparse_rank, _sort_desc(sparse, idrank), np.arange(big)[None, :], axis=-1)
        sparse_rank[~np.isfinite(sparse)] = big  # not in the sparse list at any depth
        dense_rank[~valid] = big
        judged = [sorted(qrels.get(qid, {}).values(), reverse=True) for qid in qids]
        grades = np.zeros((q, max(map(len, judged), default=0) or 1))  # padding 0: no gain, not relevant
        for i, g in enumerate(judged):
            grades[i, : len(g)] = g
        return cls(list(qids), depth, scores, valid, idrank, dense_rank, sparse_rank, gains, grades)


# ---------------------------------------------------------------------------------------------- metric


def _metric_of_top(cache: ScoreCache, top: np.ndarray, fused: np.ndarray, metric: tuple[str, int]) -> np.ndarray:
    """Per-query metric of ranked hit lists ``top`` (``(B, Q, K)`` pool positions, -1 = no hit),
    as trec_eval computes it: hits re-sorted by float32 score, ties by document id descending."""
    name, k = metric
    q = np.arange(top.shape[1])[None, :, None]
    hit = top >= 0
    pos = np.where(hit, top, 0)
    val = np.where(hit, fused[np.arange(top.shape[0])[:, None, None], q, pos], -np.inf)
    idr = np.where(hit, cache.idrank[q, pos], -1)
    # trec_eval's own order of the same hits: it keeps scores as C floats, so float64 near-ties become ties
    again = _sort_desc(val.astype(np.float32), idr, ids_desc=True)
    pos, hit = np.take_along_axis(pos, again, -1), np.take_along_axis(hit, again, -1)
    gain = np.where(hit, cache.gains[q, pos], 0.0)
    if name == "ndcg":
        disc = 1.0 / np.log2(np.arange(2, gain.shape[-1] + 2))
        dcg = (np.maximum(gain, 0) * disc).sum(-1)
        best = np.maximum(cache.grades[:, :k], 0)  # the ideal ranking, cut at k
        ideal = (best / np.log2(np.arange(2, best.shape[1] + 2))).sum(-1)
        return np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)
    rel = (gain >= 1) & hit
    if name == "recall":
        n_rel = (cache.grades >= 1).sum(-1).astype(float)
        return np.divide(rel.sum(-1), n_rel, out=np.zeros(rel.shape[:2]), where=n_rel > 0)
    first = np.argmax(rel, axis=-1)
    return np.where(rel.any(-1), 1.0 / (first + 1), 0.0)


def _top_k(fused: np.ndarray, idrank: np.ndarray, k: int) -> np.ndarray:
    """Row-wise top ``k`` positions by (score desc, id asc) of ``(B, Q, N)`` scores; -1 where a row
    has fewer than ``k`` candidates (-inf). argpartition picks them; rows where equal scores
    straddle the cut are re-done with a full sort, so the result equals a full sort's."""
    n = fused.shape[-1]
    if n <= k:
        top = _sort_desc(fused, np.broadcast_to(idrank, fused.shape))
    else:
        part = np.argpartition(-fused, k - 1, axis=-1)[..., :k]
        vals = np.take_along_axis(fused, part, -1)
        cut = vals.min(-1, keepdims=True)
        straddle = ((fused == cut).sum(-1) > (vals == cut).sum(-1)) & np.isfinite(cut[..., 0])
        idr = np.broadcast_to(idrank, fused.shape)
        top = np.take_along_axis(part, _sort_desc(vals, np.take_along_axis(idr, part, -1)), -1)
        for b, r in zip(*np.nonzero(straddle)):
            top[b, r] = _sort_desc(fused[b, r], idr[b, r])[:k]
    top = top[..., :k]
    return np.where(np.isfinite(np.take_along_axis(fused, top, -1)), top, -1)


def _normalized(cache: ScoreCache, fusion: str, members: np.ndarray) -> np.ndarray:
    """``(3, Q, N)`` per-mode terms of ``fusion`` over the pool ``members`` (other entries: 0)."""
    s = np.where(members, cache.scores, 0.0)
    if fusion == "weighted":
        return s
    if fusion == "rrf":  # 1 / (k + rank among the members), rank by score then id
        out = np.zeros_like(s)
        for j in range(3):
            order = _sort_desc(np.where(members, cache.scores[j], -np.inf), cache.idrank)
            rank = np.empty(members.shape, np.int64)
            np.put_along_axis(rank, order, np.arange(1, members.shape[1] + 1)[None, :], axis=-1)
            out[j] = np.where(members, 1.0 / (RRF_K + rank), 0.0)
        return out
    # dbsf: (s - (mean - 3 sd)) / 6 sd over the members (sample sd; one member or sd = 0 gives 0.5)
    n = members.sum(-1, keepdims=True)
    mean = s.sum(-1, keepdims=True) / np.maximum(n, 1)
    var = (np.where(members, s - mean, 0.0) ** 2).sum(-1, keepdims=True) / np.maximum(n - 1, 1)
    sd = np.sqrt(var)
    flat = (n <= 1) | (sd == 0)
    norm = np.where(flat, 0.5, (s - (mean - 3 * sd)) / np.where(flat, 1.0, 6 * sd))
    return np.where(members, norm, 0.0)


def evaluate_settings(
    cache: ScoreCache, settings: Sequence[Setting], metric: str = "ndcg@10", *, chunk_elems: int = 1 << 23
) -> np.ndarray:
    """Per-query metric of each setting: ``(len(settings), Q)``, as searching with it would give
    (retrieval depth = the metric's cutoff; a re-ranking mode's depth is max(candidates, cutoff))."""
    name, k = parse_metric(metric)
    out = np.zeros((len(settings), len(cache.qids)))
    if not len(cache.qids):
        return out
    too_deep = [s for s in settings if (k if s.mode in _SINGLE_LISTS else max(s.candidates, k)) > cache.depth]
    if too_deep:
        raise ValueError(f"setting {too_deep[0]} with {metric} needs lists of {cache.depth} or fewer")
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(settings):
        if s.mode in _SINGLE_LISTS:  # no re-ranking: the top k of one list
            col = MODES.index(s.mode)
            ok = cache.valid & (cache.scores[col] > 0 if s.mode == "sparse" else True)
            fused = np.where(ok, cache.scores[col], -np.inf)[None]
            out[i] = _metric_of_top(cache, _top_k(fused, cache.idrank, k), fused, (name, k))[0]
        else:
            groups.setdefault((s.fusion, s.candidates), []).append(i)
    for (fusion, c), idx in groups.items():
        depth = max(c, k)
        members = cache.valid & ((cache.dense_rank < depth) | (cache.sparse_rank < depth))
        terms = _normalized(cache, fusion, members)
        w = np.array([settings[i].weights for i in idx], float)
        if fusion == "weighted":
            w = w / w.sum(1, keepdims=True)
        step = max(1, chunk_elems // terms[0].size)
        for a in range(0, len(idx), step):
            fused = np.einsum("bm,mqn->bqn", w[a : a + step], terms)
            fused[:, ~members] = -np.inf
            out[idx[a : a + step]] = _metric_of_top(cache, _top_k(fused, cache.idrank, k), fused, (name, k))
    return out


# ---------------------------------------------------------------------------------------------- choice


def _best(per_query: np.ndarray) -> int:
    """The first setting with the best mean (settings are ordered defaults first, cheaper first)."""
    means = per_query.mean(1)
    return int(np.flatnonzero(means >= means.max() - 1e-12)[0])


def cross_validate(per_query: np.ndarray, folds: int = FOLDS, seed: int = SEED) -> dict[str, Any]:
    """k-fold CV over queries of "choose the best setting": each fold scored with the setting best
    on the other folds. Returns the held-out per-query scores and each fold's choice."""
    n = per_query.shape[1]
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if n < folds:
        raise ValueError(
            f"{n} judged queries are fewer than the {folds} folds; use --folds {max(2, n)} or more queries"
        )
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    held_out = np.empty(n)
    choices = []
    for test in parts:
        train = np.setdiff1d(np.arange(n), test)
        best = _best(per_query[:, train])
        held_out[test] = per_query[best, test]
        choices.append(best)
    return {"per_query": held_out, "choices": choices, "folds": [p.tolist() for p in parts]}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, n: int = BOOTSTRAP, confidence: float = CONFIDENCE, seed: int = SEED
) -> tuple[float, float]:
    """Percentile interval of mean(a - b) over queries resampled with replacement (paired)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if not len(d):
        raise ValueError("no queries to bootstrap")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for s in range(0, n, 256):  # bounded memory at thousands of queries
        m = min(256, n - s)
        means[s : s + m] = d[rng.integers(0, len(d), size=(m, len(d)))].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def choose(
    per_query: np.ndarray,
    settings: Sequence[Setting],
    *,
    folds: int = FOLDS,
    seed: int = SEED,
    bootstrap: int = BOOTSTRAP,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Cross-validate the choice, compare it with the defaults in use (``settings[0]``, see
    :func:`settings_grid`) on the same folds, and adopt the best setting on all queries only if
    the interval's lower bound is above 0."""
    cv = cross_validate(per_query, folds, seed)
    default = per_query[0]
    lo, hi = paired_bootstrap(cv["per_query"], default, n=bootstrap, confidence=confidence, seed=seed)
    best = settings[_best(per_query)]
    adopted = lo > 0 and best != settings[0]
    return {
        "setting": best if adopted else settings[0],
        "adopted": adopted,
        "best": best,
        "cv": {
            "folds": folds,
            "seed": seed,
            "tuned": float(cv["per_query"].mean()),
            "default": float(default.mean()),
            "gain": float(cv["per_query"].mean() - default.mean()),
            "interval": [lo, hi],
            "confidence": confidence,
            "bootstrap": bootstrap,
            "fold_choices": [settings[i].to_dict() for i in cv["choices"]],
        },
        "best_in_sample": float(per_query[_best(per_query)].mean()),
    }


# ---------------------------------------------------------------------------------------------- entry


def tune(
    data_dir: str | Path,
    *,
    queries_dir: str | Path | None = None,
    collection: str | Path | None = None,
    save: bool = False,
    model: Any = None,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    metric: str = "ndcg@10",
    folds: int = FOLDS,
    seed: int = SEED,
    step: float = WEIGHT_STEP,
    candidates: Sequence[int] = CANDIDATE_GRID,
    progress: bool = True,
    split: str = "test",
) -> dict[str, Any]:
    """Choose mode, fusion, weights and candidates for BEIR-judged queries (see the module docstring).

    ``split``: the judgements tuned on, ``qrels/<split>.tsv`` (e.g. ``dev``, keeping ``test`` for eval).

    Searches ``collection`` when given (it must hold the judged documents), else eval's cached
    index of ``data_dir``'s corpus. ``save=True`` stores the adopted setting (or the defaults,
    when nothing beat them) as ``collection``'s search defaults. Returns ``{"mode", "fusion",
    "weights", "candidates", "adopted", "best", "cv": {...}, ...}``.
    """
    from m3search.eval import (
        _cached_index,
        cache_folder,
        has_relevant,
        load_beir,
        load_encoder,
        unqueried_fields,
    )

    parse_metric(metric)  # every argument checked before the data is read and the queries encoded
    check_int("folds", folds, 2)
    check_int("seed", seed, 0)
    _, candidates = _check_grid(step, candidates)
    if save and collection is None:
        raise ValueError("save=True needs a collection to store the setting in")
    t_start = time.perf_counter()
    data = load_beir(data_dir, queries_dir=queries_dir, split=split)
    judged = {q: rel for q, rel in data.qrels.items() if has_relevant(rel)}  # eval counts the others as 0
    if not judged:
        raise ValueError(f"no query of {data.name} has a relevant (grade > 0) judgement to tune on")
    if len(judged) < 2:  # cross-validation holds out at least one query per fold, and --folds is at least 2
        raise ValueError(
            f"{data.name} has {len(judged)} query with a relevant (grade > 0) judgement; tuning needs at least 2"
        )
    if len(judged) < folds:
        raise ValueError(
            f"{len(judged)} judged queries are fewer than the {folds} folds; use --folds {max(2, len(judged))} or more queries"
        )
    queries = {q: data.queries[q] for q in judged}
    cache = cache_folder(cache_dir) if collection is None else None  # before a model is loaded
    col = _open(collection, model, dtype, device) if collection is not None else None
    info: dict[str, Any] = {}
    try:
        # the baseline is what the collection's searches use now (tuned before, or set at creation)
        baseline = DEFAULT_SETTING if col is None else setting_of(col.search_defaults())
        settings = settings_grid(step, candidates, baseline=baseline)
        # every setting's pool, and the metric's cutoff (a search returns max(candidates, k) per list)
        depth = max(*candidates, baseline.candidates, DEFAULT_CANDIDATES, parse_metric(metric)[1])
        if col is None:
            encoder = load_encoder(model, device=device, dtype=dtype)
            col, info = _cached_index(data, encoder, cache, batch_size=None, progress=progress)
        else:
            _check_judged_present(col, judged)
        t0 = time.perf_counter()
        emb = col.encoder.encode(list(queries.values()), max_length=col.settings["query_max_length"])
        t1 = time.perf_counter()
        cache = ScoreCache.build(col, queries, judged, depth=depth, query_embeddings=emb)
        t2 = time.perf_counter()
        per_query = evaluate_settings(cache, settings, metric)
        t3 = time.perf_counter()
        result = choose(per_query, settings, folds=folds, seed=seed)
        chosen: Setting = result["setting"]
        out: dict[str, Any] = {
            **chosen.to_dict(),
            "adopted": result["adopted"],
            "best": result["best"].to_dict(),
            "default": baseline.to_dict(),
            "metric": metric,
            "cv": result["cv"],
            "best_in_sample": result["best_in_sample"],
            "dataset": data.name,
            "data_dir": str(Path(data_dir).resolve()),
            "queries_dir": str(Path(queries_dir).resolve()) if queries_dir is not None else None,
            "split": split,
            "n_queries": len(queries),
            "n_queries_without_relevant": len(data.qrels) - len(judged),
            **unqueried_fields(data),
            "n_settings": len(settings),
            "collection": str(collection) if collection is not None else info.get("path"),
            "seconds": {
                "encode_queries": round(t1 - t0, 3),
                "score_pools": round(t2 - t1, 3),
                "settings": round(t3 - t2, 3),
                "total": round(time.perf_counter() - t_start, 3),
            },
        }
        out["summary"] = _summary(out)
        if save:
            tuning = {
                k: out[k]
                for k in ("metric", "cv", "adopted", "best", "dataset", "data_dir", "queries_dir", "split", "n_queries")
            }
            tuning["tuned_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            # not adopted: the defaults in use are stored again as they are (the searches use what they used)
            col.set_search_defaults(chosen.to_dict() if out["adopted"] else col.search_defaults(), tuning=tuning)
            out["saved"] = True
    finally:
        if col is not None:
            col.close()
    return out


def _open(location: str | Path, model: Any, dtype: str, device: str) -> Any:
    from m3search import Collection

    return Collection.open(location, model=model, dtype=dtype, device=device)


def _check_judged_present(col: Any, qrels: Mapping[str, Mapping[str, int]]) -> None:
    docs = sorted({d for rel in qrels.values() for d, g in rel.items() if g > 0})
    present = set()
    for a in range(0, len(docs), 1000):
        present |= {r.id for r in col.get(docs[a : a + 1000]) if r is not None}
    missing = [d for d in docs if d not in present]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(docs)} judged document id(s) are not in the collection {col.location}: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )


def _summary(out: Mapping[str, Any]) -> str:
    from m3search.eval import unqueried_note

    cv = out["cv"]
    lo, hi = cv["interval"]
    head = (
        f"{out['metric']} by {cv['folds']}-fold CV over {out['n_queries']} queries: tuned {cv['tuned']:.4f}, "
        f"defaults {cv['default']:.4f}, gain {cv['gain']:+.4f} ({cv['confidence']:.0%} interval {lo:+.4f} .. {hi:+.4f})"
    )
    best = Setting(out["best"]["mode"], out["best"]["fusion"], tuple(out["best"]["weights"]), out["best"]["candidates"])
    if out["n_queries_without_relevant"]:
        head += (
            f"\n{out['n_queries_without_relevant']} judged queries without a relevant document (no grade > 0) left "
            "out: they score 0 under every setting (m3search eval counts them as 0 in its means)"
        )
    if note := unqueried_note(out):
        head += f"\n{note}"
    if out["adopted"]:
        return f"{head}\nadopted: {best}"
    if out["best"] == out["default"]:
        return f"{head}\nthe defaults are the best setting: keeping them"
    return f"{head}\nbest setting {best} does not beat the defaults beyond noise: keeping the defaults"
