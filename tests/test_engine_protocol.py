"""The engine protocol is implementable from its docstring: a newcomer's engine that writes
only :class:`~m3search.engines.base.Engine`'s abstract methods (a dict of NumPy records,
one window per document, scores by brute force) runs under :class:`m3search.Collection`,
and the protocol's defaults (``existing``, ``get_windows``, ``candidates_batch``, exact
``score`` / ``score_windows`` in NumPy, ``upsert_long``, ``stored_units``) give the oracle's
ranking and scores in every mode."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from helpers import ALL_MODES, check_ranking, exact, fused_oracle, oracle_scores, random_corpus, random_queries
from helpers import expected_ranking as expected

from m3search.collection import Collection
from m3search.engines import ENGINES, register_engine
from m3search.engines.base import Engine
from m3search.engines.shapes import Hits, PointBatch, QueryVectors, Record, Schema, score_records
from m3search.errors import CollectionExistsError, CollectionNotFoundError
from m3search.filters import Filter, matches
from m3search.plan import MODES

N_DOCS, K = 60, 10


class MemoryEngine(Engine):
    """The abstract methods and nothing else; ``memory://name`` lives as long as the process."""

    name = "memory"
    stores: dict[str, MemoryEngine] = {}

    def __init__(self, location: str, schema: Schema) -> None:
        self.location, self.schema, self.docs, self.manifest = location, schema, {}, None

    @classmethod
    def create(cls, location: str, schema: Schema, **options) -> MemoryEngine:
        if location in cls.stores:
            raise CollectionExistsError(location)
        cls.stores[location] = cls(location, schema)
        return cls.stores[location]

    @classmethod
    def open(cls, location: str, **options) -> MemoryEngine:
        if location not in cls.stores:
            raise CollectionNotFoundError(location)
        return cls.stores[location]

    @classmethod
    def exists(cls, location: str, **options) -> bool:
        return location in cls.stores

    def close(self) -> None:
        pass

    def read_manifest(self) -> dict | None:
        return None if self.manifest is None else json.loads(self.manifest)

    def write_manifest(self, manifest: dict) -> None:
        self.manifest = json.dumps(manifest)

    def upsert(self, batch: PointBatch) -> None:
        batch.validate(self.schema)
        for i, doc_id in enumerate(batch.ids):  # one window per document: row i
            vectors = batch.dense[i].copy(), batch.sparse_row(i), batch.colbert_rows(i).copy()
            self.docs[doc_id] = Record(doc_id, batch.texts[i], dict(batch.metadata[i] or {}), *vectors)

    def set_metadata(self, ids: Sequence[str], metadata: Sequence[dict]) -> None:
        for doc_id, meta in zip(ids, metadata):
            self.docs[doc_id].metadata = dict(meta)

    def delete(self, ids: Sequence[str]) -> None:
        for doc_id in ids:
            self.docs.pop(doc_id, None)

    def get(self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        modes = MODES if with_vectors is True else tuple(with_vectors or ())
        out = []
        for doc_id in ids:
            r = self.docs.get(doc_id)
            vectors = [getattr(r, m) if m in modes else None for m in MODES] if r else []
            out.append(r and Record(r.id, r.text, dict(r.metadata), *vectors))
        return out

    def count(self, filter: Filter | None = None) -> int:
        return sum(matches(filter, r.metadata) for r in self.docs.values())

    def iter_batches(self, batch_size: int = 256, *, with_vectors: bool = True) -> Iterator[PointBatch]:
        ids = list(self.docs)
        for a in range(0, len(ids), batch_size):
            yield PointBatch.from_records(
                self.get(ids[a : a + batch_size], with_vectors=with_vectors), self.schema.vocab_size
            )

    def _top(self, mode: str, queries: list[QueryVectors], k: int, filter: Filter | None) -> list[Hits]:
        docs = [r for r in self.docs.values() if matches(filter, r.metadata)]
        out = []
        for q in queries:
            s = score_records(docs, q, [mode])[mode]
            hits = sorted(((r.id, float(v)) for r, v in zip(docs, s) if mode != "sparse" or v > 0), key=lambda h: -h[1])
            out.append(hits[:k])
        return out

    def search_dense(self, q: np.ndarray, k: int, filter: Filter | None = None, *, exact: bool = False) -> list[Hits]:
        return self._top("dense", [QueryVectors(dense=row) for row in np.atleast_2d(q)], k, filter)

    def search_sparse(self, q, k: int, filter: Filter | None = None, *, exact: bool = False) -> list[Hits]:
        q = q.tocsr()
        rows = [QueryVectors(sparse_indices=q[i].indices, sparse_values=q[i].data) for i in range(q.shape[0])]
        return self._top("sparse", rows, k, filter)


def test_a_newcomer_implements_only_the_abstract_methods():
    own = {n for n, v in vars(MemoryEngine).items() if callable(v) or isinstance(v, classmethod)}
    assert Engine.__abstractmethods__ <= own and not MemoryEngine.__abstractmethods__
    assert len(Engine.__abstractmethods__) == 14  # fewer than the 16 of a3130f8: the rest are hooks with defaults
    assert own - Engine.__abstractmethods__ == {"__init__", "_top"}


@pytest.fixture(scope="module")
def memory_collection(tiny_encoder):
    register_engine("memory", f"{__name__}:MemoryEngine")
    texts = random_corpus(N_DOCS, max_words=40)
    ids = [f"d{i:03d}" for i in range(N_DOCS)]
    meta = [{"i": i, "lang": ["en", "de"][i % 2]} for i in range(N_DOCS)]
    emb = tiny_encoder.encode(texts)
    queries = random_queries(4)
    qemb = tiny_encoder.encode(queries, max_length=512)
    col = Collection.create("memory://protocol", model=tiny_encoder, colbert_dtype="float32")  # stored as given
    col.add(texts, ids=ids, metadata=meta, embeddings=emb, batch_size=16)
    yield col, texts, ids, meta, queries, qemb, oracle_scores(qemb, emb)
    col.close()
    MemoryEngine.stores.clear()
    ENGINES.pop("memory")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_defaults_give_the_oracle_in_every_mode(memory_collection, mode):
    col, texts, ids, meta, queries, qemb, oracle = memory_collection
    hits_all = col.search_batch(queries, k=K, mode=mode, candidates=N_DOCS, query_embeddings=qemb, explain=True)
    pos = {d: j for j, d in enumerate(ids)}
    for qi, hits in enumerate(hits_all):
        fused = fused_oracle(oracle, qi, mode, "weighted", ids)
        check_ranking([h.id for h in hits], fused, ids, expected(fused, ids, K, positive_only=(mode == "sparse")))
        for h in hits:
            assert h.score == exact(fused[pos[h.id]])
            assert [h.scores[m] for m in MODES] == exact([oracle[m][qi, pos[h.id]] for m in MODES])
            assert h.text == texts[pos[h.id]] and h.metadata == meta[pos[h.id]]


def test_defaults_serve_passages_filters_and_writes(memory_collection, tiny_encoder):
    col, texts, ids, meta, queries, qemb, oracle = memory_collection
    passages = col.search(queries[0], k=5, mode="all", group="passage")
    documents = col.search(queries[0], k=5, mode="all")
    assert [h.id for h in passages] == [h.id for h in documents]  # one window each: a passage is its document
    assert col.count({"lang": "de"}) == N_DOCS // 2
    fused, german = fused_oracle(oracle, 0, "all", "weighted", ids), [m["lang"] == "de" for m in meta]
    hits = col.search(queries[0], k=5, mode="all", filter={"lang": "de"})
    check_ranking([h.id for h in hits], fused, ids, expected(fused, ids, 5, allowed=german))
    with pytest.raises(ValueError):
        col.add([texts[0]], ids=[ids[0]])  # `existing` (a default over `get`) finds it
    assert [[r.id for r in ws] for ws in col.engine.get_windows(ids[:2], windows=range(2))] == [ids[:1], ids[1:2]]
    assert col.engine.get_windows(ids[:2], windows=range(1, 4)) == [[], []]  # a range of windows past the one
    col.update_metadata(ids[0], {"lang": "fr"})
    col.delete(ids[1])
    assert col.get(ids[0])[0].metadata == {"lang": "fr"} and col.get(ids[1]) == [None]
    assert col.count() == N_DOCS - 1
