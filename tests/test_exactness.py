"""Every search mode equals an exhaustive oracle built from our pairwise scorers.

A few hundred texts are encoded ONCE with the tiny fp32 model; the collection gets the
same embeddings (``add(..., embeddings=emb)``), and with ``candidates`` >= corpus size
every mode's ranking must equal the oracle's, in the same order:

* float32 ColBERT storage: scores within ``EXACT_TOL`` (1e-6);
* float16 storage: rankings kept except where the oracle's own scores are within 2e-3
  (a tie at storage precision), the largest score error is reported, and the dense and
  sparse scores, which float16 ColBERT storage does not touch, stay within ``EXACT_TOL``.

The oracle's pairwise scorers are themselves checked against ``compute_score`` (our
FlagEmbedding-compatible pair scorer) on a sample.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    ALL_MODES,
    DBSF_TOL,
    EXACT_TOL,
    check_ranking,
    exact,
    expected_ranking,
    oracle_scores,
    random_corpus,
    random_queries,
)
from helpers import fused_oracle as oracle_fused

from m3search.collection import Collection
from m3search.plan import DEFAULT_WEIGHTS as WEIGHTS
from m3search.plan import MODES

N_DOCS = 300
K = 25


@pytest.fixture(scope="module")
def corpus(tiny_encoder):
    texts = random_corpus(N_DOCS, max_words=60)
    ids = [f"doc{i:04d}" for i in range(len(texts))]
    emb = tiny_encoder.encode(texts)
    queries = random_queries(12)
    qemb = tiny_encoder.encode(queries, max_length=512)
    oracle = oracle_scores(qemb, emb)
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
        check_ranking([h.id for h in hits], fused, ids, expected, tie_tol=1e-6)
        for h in hits:
            j = ids.index(h.id)
            assert h.score == exact(fused[j])
            for m in MODES:  # every hit carries all three exact scores
                assert h.scores[m] == exact(oracle[m][qi, j]), (m, h.id)
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
        check_ranking([h.id for h in hits], fused, ids, expected, tie_tol=1e-9 if fusion == "rrf" else 1e-6)
        for h in hits:
            assert h.score == exact(fused[ids.index(h.id)], DBSF_TOL if fusion == "dbsf" else EXACT_TOL)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_float16_storage_keeps_rankings(col16, corpus, mode):
    texts, ids, emb, queries, qemb, oracle = corpus
    hits_all = col16.search_batch(queries, k=K, mode=mode, candidates=len(texts), exact=True, query_embeddings=qemb)
    worst = 0.0
    for qi, hits in enumerate(hits_all):
        fused = oracle_fused(oracle, qi, mode, "weighted", ids)
        expected = expected_ranking(fused, ids, K, positive_only=(mode == "sparse"))
        check_ranking([h.id for h in hits], fused, ids, expected, tie_tol=2e-3)
        for h in hits:
            j = ids.index(h.id)
            worst = max(worst, abs(h.score - fused[j]))
            for m in ("dense", "sparse"):  # stored in float32 whatever the ColBERT layout
                assert h.scores[m] == exact(oracle[m][qi, j]), (m, h.id)
    print(f"\nfloat16 ColBERT storage, mode={mode}: largest fused-score error {worst:.2e}")
    assert worst < 2e-3


def test_engine_score_equals_numpy_fallback(col32, corpus):
    """Qdrant Edge's in-engine candidate scoring == the pure-NumPy reference (score_records)."""
    from m3search.engines.shapes import QueryVectors, score_records

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
            np.testing.assert_allclose(got[m][:-1], ref[m][:-1], atol=EXACT_TOL, rtol=EXACT_TOL)
            np.testing.assert_allclose(
                got[m][:-1], oracle[m][qi, [ids.index(c) for c in cand[:-1]]], atol=EXACT_TOL, rtol=EXACT_TOL
            )


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
