"""Every search mode equals an exhaustive oracle built from our pairwise scorers.

A few hundred texts are encoded ONCE with the tiny fp32 model; the collection gets the
same embeddings (``add(..., embeddings=emb)``), and with ``candidates`` >= corpus size
every mode's ranking must equal the oracle's, in the same order:

* float32 ColBERT storage: scores within 1e-4;
* float16 storage (the default): rankings kept except where the oracle's own scores are
  within 2e-3 (a tie at storage precision), and the largest score error is reported.

The oracle's pairwise scorers are themselves checked against ``compute_score`` (our
FlagEmbedding-compatible pair scorer) on a sample.
"""

from __future__ import annotations

import numpy as np
import pytest

from m3search.collection import Collection
from m3search.engines.base import MODES
from m3search.fusion import RRF_K
from m3search.scoring import colbert_scores, dense_scores, lexical_scores
from m3search.testing import BUILTIN_TEXTS

N_DOCS = 300
ALL_MODES = ["dense", "sparse", "colbert", "dense+sparse", "dense+colbert", "all"]
MODE_PARTS = {"all": MODES, **{m: tuple(m.split("+")) for m in ALL_MODES if m != "all"}}
WEIGHTS = (0.4, 0.2, 0.4)
K = 25


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """Random word sequences over the built-in multilingual sentences (+ empties and duplicates)."""
    rng = np.random.default_rng(seed)
    words = " ".join(BUILTIN_TEXTS).split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for _ in range(n - 6)]
    texts += ["", "", texts[0], texts[1], BUILTIN_TEXTS[0], BUILTIN_TEXTS[0]]  # exact ties by design
    return texts


def make_queries(n: int = 12, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    words = " ".join(BUILTIN_TEXTS).split()
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 9)))) for _ in range(n)] + ["zzqx"]


@pytest.fixture(scope="module")
def corpus(tiny_encoder):
    texts = make_corpus(N_DOCS)
    ids = [f"doc{i:04d}" for i in range(len(texts))]
    emb = tiny_encoder.encode(texts)
    queries = make_queries()
    qemb = tiny_encoder.encode(queries, max_length=512)
    oracle = {
        "dense": dense_scores(qemb.dense, emb.dense).astype(np.float64),
        "sparse": lexical_scores(qemb.sparse, emb.sparse).astype(np.float64),
        "colbert": colbert_scores(qemb.colbert, qemb.colbert_offsets, emb.colbert, emb.colbert_offsets).astype(
            np.float64
        ),
    }
    return texts, ids, emb, queries, qemb, oracle


def build(tmp_path_factory, encoder, corpus, dtype):
    texts, ids, emb, *_ = corpus
    col = Collection.create(tmp_path_factory.mktemp(f"exact-{dtype}") / "col", model=encoder, colbert_dtype=dtype)
    col.add(texts, ids=ids, metadata=[{"i": i} for i in range(len(texts))], embeddings=emb, batch_size=64)
    return col


@pytest.fixture(scope="module")
def col32(tmp_path_factory, tiny_encoder, corpus):
    col = build(tmp_path_factory, tiny_encoder, corpus, "float32")
    yield col
    col.close()


@pytest.fixture(scope="module")
def col16(tmp_path_factory, tiny_encoder, corpus):
    col = build(tmp_path_factory, tiny_encoder, corpus, "float16")
    yield col
    col.close()


def oracle_fused(oracle, qi: int, mode: str, fusion: str, ids: list[str]) -> np.ndarray:
    """Exhaustive fusion over the whole corpus, written independently of m3search.fusion."""
    parts = MODE_PARTS[mode]
    w = dict(zip(MODES, WEIGHTS))
    if fusion == "weighted":
        return sum(w[m] * oracle[m][qi] for m in parts) / sum(w[m] for m in parts)
    out = np.zeros(len(ids))
    for m in parts:
        s = oracle[m][qi]
        if fusion == "rrf":
            order = sorted(range(len(ids)), key=lambda j: (-s[j], ids[j]))
            rank = np.empty(len(ids))
            rank[order] = np.arange(1, len(ids) + 1)
            out += w[m] / (RRF_K + rank)
        else:  # dbsf
            mu, sd = s.mean(), s.std(ddof=1)
            out += w[m] * (s - (mu - 3 * sd)) / (6 * sd)
    return out


def expected_ranking(fused: np.ndarray, ids: list[str], k: int, positive_only: bool = False) -> list[int]:
    order = sorted(range(len(ids)), key=lambda j: (-fused[j], ids[j]))
    if positive_only:
        order = [j for j in order if fused[j] > 0]
    return order[:k]


def check_ranking(hits, fused, ids, expected, tie_tol: float) -> None:
    """Same ids in the same order; a position may differ only between oracle scores within ``tie_tol``."""
    pos = {d: j for j, d in enumerate(ids)}
    got = [pos[h.id] for h in hits]
    assert len(set(got)) == len(got)
    assert len(got) == len(expected), (len(got), len(expected))
    for r, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            assert abs(fused[g] - fused[e]) <= tie_tol, (
                f"rank {r}: got {ids[g]} ({fused[g]:.6f}), want {ids[e]} ({fused[e]:.6f})"
            )


def test_oracle_scorers_agree_with_compute_score(tiny_encoder, corpus):
    texts, ids, emb, queries, qemb, oracle = corpus
    rng = np.random.default_rng(3)
    pairs = [(int(rng.integers(len(queries))), int(rng.integers(len(texts)))) for _ in range(12)]
    ref = tiny_encoder.compute_score([(queries[q], texts[d]) for q, d in pairs], weights=WEIGHTS)
    for mode in MODES:
        got = [oracle[mode][q, d] for q, d in pairs]
        np.testing.assert_allclose(got, ref[mode], atol=1e-5)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_float32_storage_equals_oracle(col32, corpus, mode):
    texts, ids, emb, queries, qemb, oracle = corpus
    hits_all = col32.search_batch(queries, k=K, mode=mode, candidates=len(texts), exact=True, query_embeddings=qemb)
    for qi, hits in enumerate(hits_all):
        fused = oracle_fused(oracle, qi, mode, "weighted", ids)
        expected = expected_ranking(fused, ids, K, positive_only=(mode == "sparse"))
        check_ranking(hits, fused, ids, expected, tie_tol=1e-6)
        for h in hits:
            j = ids.index(h.id)
            assert abs(h.score - fused[j]) <= 1e-4
            for m in MODES:  # every hit carries all three exact scores
                assert abs(h.scores[m] - oracle[m][qi, j]) <= 1e-4, (m, h.id)
            assert h.text == texts[j] and h.metadata == {"i": j}


@pytest.mark.parametrize("fusion", ["rrf", "dbsf"])
@pytest.mark.parametrize("mode", ["dense+sparse", "all"])
def test_rank_fusions_equal_oracle(col32, corpus, mode, fusion):
    texts, ids, emb, queries, qemb, oracle = corpus
    hits_all = col32.search_batch(
        queries[:-1],
        k=K,
        mode=mode,
        fusion=fusion,
        candidates=len(texts),
        exact=True,
        query_embeddings=qemb[: len(queries) - 1],
    )
    for qi, hits in enumerate(hits_all):
        fused = oracle_fused(oracle, qi, mode, fusion, ids)
        # RRF ranks are integers, so its ties are exact; DBSF carries float32 score noise.
        expected = expected_ranking(fused, ids, K)
        check_ranking(hits, fused, ids, expected, tie_tol=1e-9 if fusion == "rrf" else 1e-6)
        for h in hits:
            assert abs(h.score - fused[ids.index(h.id)]) <= 1e-4


@pytest.mark.parametrize("mode", ALL_MODES)
def test_float16_storage_keeps_rankings(col16, corpus, mode):
    texts, ids, emb, queries, qemb, oracle = corpus
    hits_all = col16.search_batch(queries, k=K, mode=mode, candidates=len(texts), exact=True, query_embeddings=qemb)
    worst = 0.0
    for qi, hits in enumerate(hits_all):
        fused = oracle_fused(oracle, qi, mode, "weighted", ids)
        expected = expected_ranking(fused, ids, K, positive_only=(mode == "sparse"))
        check_ranking(hits, fused, ids, expected, tie_tol=2e-3)
        for h in hits:
            worst = max(worst, abs(h.score - fused[ids.index(h.id)]))
    print(f"\nfloat16 ColBERT storage, mode={mode}: largest fused-score error {worst:.2e}")
    assert worst < 2e-3


def test_engine_score_equals_numpy_fallback(col32, corpus):
    """Qdrant Edge's in-engine candidate scoring == the pure-NumPy reference (score_records)."""
    from m3search.engines.base import QueryVectors, score_records

    texts, ids, emb, queries, qemb, oracle = corpus
    eng = col32.engine
    cand = ids[::7] + ["not-stored"]
    recs = eng.get(cand, with_vectors=True)
    assert recs[-1] is None
    for qi in range(3):
        qv = QueryVectors.from_embeddings(qemb, qi)
        got, ref = eng.score(cand, qv), score_records(recs, qv)
        for m in MODES:
            assert np.isnan(got[m][-1]) and np.isnan(ref[m][-1])
            np.testing.assert_allclose(got[m][:-1], ref[m][:-1], atol=1e-5)
            np.testing.assert_allclose(got[m][:-1], oracle[m][qi, [ids.index(c) for c in cand[:-1]]], atol=1e-5)


def test_iter_batches_round_trips_vectors(col32, corpus):
    texts, ids, emb, *_ = corpus
    seen = {}
    for batch in col32.engine.iter_batches(64):
        batch.validate(col32.schema)
        for i, doc_id in enumerate(batch.ids):
            seen[doc_id] = (batch.texts[i], batch.dense[i], batch.sparse_row(i), batch.colbert_rows(i))
    assert sorted(seen) == sorted(ids)
    for j in (0, 1, len(ids) - 1):
        text, dense, (si, sv), colb = seen[ids[j]]
        assert text == texts[j]
        np.testing.assert_array_equal(dense, emb.dense[j])
        row = emb.sparse[j]
        np.testing.assert_array_equal(si, row.indices)
        np.testing.assert_array_equal(sv, row.data)
        np.testing.assert_array_equal(colb, emb.colbert[emb.colbert_offsets[j] : emb.colbert_offsets[j + 1]])
