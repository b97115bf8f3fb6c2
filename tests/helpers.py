"""Test helpers shared by the exactness suites (test_exactness.py, test_engines.py):
a random corpus with built-in traps, the exhaustive oracle, the reference fusion and the
tie-tolerant ranking check. One copy, so a fix to the oracle reaches every suite.

The oracle is written independently of :mod:`m3search.fusion` and :mod:`m3search.collection`:
whole-corpus score matrices from :mod:`m3search.scoring` (itself checked against
``compute_score``), fused by the formulas as the README states them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from m3search.fusion import RRF_K
from m3search.plan import DEFAULT_WEIGHTS, MODES, PRESETS
from m3search.scoring import colbert_scores, dense_scores, lexical_scores
from m3search.testing import BUILTIN_TEXTS

#: Scores from float32 storage agree with the oracle to float32 rounding: measured at most 1.7e-7 on every
#: engine, mode and fusion (Qdrant Edge 1.6e-7, qdrant-client local mode and Milvus Lite 1.2e-7), 5e-8 of the
#: score beyond 1 (:func:`exact`). The 1e-4 the suites allowed before let an engine score a float16-rounded
#: query (2e-5 off) unnoticed.
EXACT_TOL = 1e-6

#: DBSF divides each list by six standard deviations, which magnifies the per-mode scores' float32 noise in the
#: fused score (measured 1.1e-6 between engines, 1.0e-6 against the oracle).
DBSF_TOL = 10 * EXACT_TOL


def exact(want, tol: float = EXACT_TOL):
    """``want`` (a number or a sequence) for ``==``: within ``tol``, relative to it beyond 1, as float32 rounding
    is relative (the built-in texts' tokenizer, without ../shared, gives sparse scores above 30)."""
    return pytest.approx(want, rel=tol, abs=tol)


#: The engines every windowed suite runs on (their collections at :func:`location`).
ENGINES = ["qdrant-edge", "qdrant-local", "milvus-lite"]
#: Every named mode, and the representations each one fuses.
ALL_MODES = list(PRESETS)
MODE_PARTS: dict[str, tuple[str, ...]] = {"all": MODES, **{m: tuple(m.split("+")) for m in ALL_MODES if m != "all"}}


def location(engine: str, folder) -> str:
    """Where ``engine`` keeps a collection under ``folder`` (the test skips when its client is not installed)."""
    if engine == "qdrant-edge":
        return str(folder / "col")
    if engine == "qdrant-local":
        pytest.importorskip("qdrant_client")
        return f"qdrant+local://{folder}/store/col"
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    folder.mkdir(parents=True, exist_ok=True)  # a Milvus Lite file's folder must exist
    return str(folder / "col.db")


def random_corpus(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """``n`` random word sequences over the built-in multilingual sentences; the last six are
    traps: two empty documents, two duplicates of earlier texts and a duplicated sentence
    (exact score ties by design)."""
    rng = np.random.default_rng(seed)
    words = " ".join(BUILTIN_TEXTS).split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, max_words)))) for _ in range(n - 6)]
    return texts + ["", "", texts[0], texts[1], BUILTIN_TEXTS[0], BUILTIN_TEXTS[0]]


def random_queries(n: int, seed: int = 1) -> list[str]:
    """``n`` short random queries plus one that shares no token with anything (``"zzqx"``)."""
    rng = np.random.default_rng(seed)
    words = " ".join(BUILTIN_TEXTS).split()
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 9)))) for _ in range(n)] + ["zzqx"]


def oracle_scores(qemb, emb) -> dict[str, np.ndarray]:
    """Exhaustive (n_queries, n_docs) float64 score matrices of the three representations."""
    return {
        "dense": dense_scores(qemb.dense, emb.dense).astype(np.float64),
        "sparse": lexical_scores(qemb.sparse, emb.sparse).astype(np.float64),
        "colbert": colbert_scores(qemb.colbert, qemb.colbert_offsets, emb.colbert, emb.colbert_offsets).astype(
            np.float64
        ),
    }


def fused_oracle(
    oracle: Mapping[str, np.ndarray],
    qi: int,
    mode: str,
    fusion: str,
    ids: Sequence[str],
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> np.ndarray:
    """Exhaustive fusion of query ``qi`` over the whole corpus: BGE-M3's weighted mean, RRF
    (1-based ranks by score then id, constant ``RRF_K``) or DBSF (mean ± 3 sample sigma)."""
    parts = MODE_PARTS[mode]
    w = dict(zip(MODES, weights))
    if fusion == "weighted":
        return sum(w[m] * oracle[m][qi] for m in parts) / sum(w[m] for m in parts)
    out = np.zeros(len(ids))
    for m in parts:
        s = oracle[m][qi]
        if fusion == "rrf":
            rank = np.empty(len(ids))
            rank[sorted(range(len(ids)), key=lambda j: (-s[j], ids[j]))] = np.arange(1, len(ids) + 1)
            out += w[m] / (RRF_K + rank)
        else:  # dbsf
            mu, sd = s.mean(), s.std(ddof=1)
            out += w[m] * (s - (mu - 3 * sd)) / (6 * sd)
    return out


def expected_ranking(
    fused: np.ndarray, ids: Sequence[str], k: int, allowed: Sequence[bool] | None = None, positive_only: bool = False
) -> list[int]:
    """Corpus positions of the top ``k`` by fused score, then id (optionally only ``allowed`` / > 0)."""
    order = sorted(range(len(ids)), key=lambda j: (-fused[j], ids[j]))
    if allowed is not None:
        order = [j for j in order if allowed[j]]
    if positive_only:
        order = [j for j in order if fused[j] > 0]
    return order[:k]


def check_ranking(
    got_ids: Sequence[str], fused: np.ndarray, ids: Sequence[str], want: Sequence[int], tie_tol: float = 1e-6
) -> None:
    """Same documents in the same order, no repeats; a position may differ only between
    documents whose oracle scores are within ``tie_tol`` (a tie at storage precision)."""
    pos = {d: j for j, d in enumerate(ids)}
    got = [pos[h] for h in got_ids]
    assert len(set(got)) == len(got), f"repeated hits: {got_ids}"
    assert len(got) == len(want), (len(got), len(want))
    for r, (g, e) in enumerate(zip(got, want)):
        if g != e:
            assert abs(fused[g] - fused[e]) <= tie_tol, (
                f"rank {r}: got {ids[g]!r} ({fused[g]:.6f}), want {ids[e]!r} ({fused[e]:.6f})"
            )


def dense_doc_scores(encoder, queries: list[str], texts: list[str], window: int = 512, stride: int = 384) -> np.ndarray:
    """Exact dense scores ``(n_queries, n_texts)`` as a windowed collection ranks documents: each
    text scores its best window (collection defaults for 512 positions: window 512, stride 384)."""
    from m3search.scoring import dense_scores

    w = encoder.encode_windows(texts, window=window, stride=stride, sparse=False, colbert=False)
    q = encoder.encode(queries, sparse=False, colbert=False, max_length=512).dense
    starts = np.searchsorted(w.doc, np.arange(len(texts)))  # a text's windows are consecutive
    return np.maximum.reduceat(dense_scores(q, w.embeddings.dense), starts, axis=1)


def fail_second_upsert(monkeypatch, engine_cls=None) -> None:
    """Make an engine's (default: Qdrant Edge's) second upsert raise OSError("disk full (simulated)"): a
    migration interrupted after its first batch was written (the destination must then not exist)."""
    from m3search.engines.qdrant_edge import QdrantEdgeEngine

    engine_cls = engine_cls or QdrantEdgeEngine
    real, calls = engine_cls.upsert, []

    def failing(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(self, batch)

    monkeypatch.setattr(engine_cls, "upsert", failing)


def deny_inside(monkeypatch, folder) -> None:
    """Make every path strictly inside ``folder`` one this process may not look at (stat, list: EACCES), as in a
    folder of another user's with mode 700. Simulated: these tests may run as root, whom permissions do not stop."""
    import errno
    import os

    inside = os.path.join(os.fspath(folder), "")

    def denied(real):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(inside):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    for name in ("stat", "listdir", "scandir"):
        monkeypatch.setattr(os, name, denied(getattr(os, name)))


def deny_opening(monkeypatch, path, *, writing: bool = False) -> None:
    """Make the file ``path`` one this process may not open (with ``writing``, may not open to write), as a file
    of another user's: ``open`` fails with EACCES and ``os.access`` says so, while ``stat`` still answers.
    Simulated, as :func:`deny_inside`."""
    import builtins
    import errno
    import os

    denied, real_open, real_access = os.fspath(path), builtins.open, os.access
    refused = os.W_OK if writing else os.R_OK | os.W_OK

    def guarded(file, mode="r", *args, **kwargs):
        if (
            isinstance(file, (str, os.PathLike))
            and os.fspath(file) == denied
            and (not writing or set(mode) & set("wa+"))
        ):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), denied)
        return real_open(file, mode, *args, **kwargs)

    def access(file, mode, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == denied and mode & refused:
            return False
        return real_access(file, mode, *args, **kwargs)

    monkeypatch.setattr("io.open", guarded)
    monkeypatch.setattr("builtins.open", guarded)
    monkeypatch.setattr(os, "access", access)
