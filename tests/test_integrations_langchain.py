"""LangChain integration: LangChain's own standard test suites, plus rankings, filters and writes
checked against the collection itself (embedded, and through a served collection over HTTP)."""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from integration_helpers import (
    IDS,
    META,
    MODES,
    QUERIES,
    RANKING_CASES,
    TEXTS,
    exact_seen,
    make_collection,
    same_hits,
    served,
    told_apart,
)  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_tests.integration_tests import (  # noqa: E402
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)

from m3search.integrations.langchain import M3SearchEmbeddings, M3SearchRetriever, M3SearchVectorStore  # noqa: E402


@pytest.fixture(scope="module")
def col(tmp_path_factory, tiny_encoder):
    c = make_collection(tmp_path_factory.mktemp("lc") / "col", tiny_encoder)
    yield c
    c.close()


# ------------------------------------------------------------------------------ LangChain's standard suites


class TestStandardEmbeddings(EmbeddingsIntegrationTests):
    @pytest.fixture(autouse=True)
    def _encoder(self, tiny_encoder):
        type(self).encoder = tiny_encoder

    @property
    def embeddings_class(self) -> type[M3SearchEmbeddings]:
        return M3SearchEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"encoder": self.encoder}


class TestStandardRetriever(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _collection(self, col):
        type(self).collection = col

    @property
    def retriever_constructor(self) -> type[M3SearchRetriever]:
        return M3SearchRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"collection": self.collection, "mode": "all"}

    @property
    def retriever_query_example(self) -> str:
        return "boundary layer transition"


class TestStandardVectorStore(VectorStoreIntegrationTests):
    """Every standard test runs on a fresh, empty collection of the tiny model. The suite's
    ``get_embeddings`` (a fake embedder) is not used: the collection encodes with its own model."""

    @pytest.fixture
    def vectorstore(self, tmp_path, tiny_encoder):
        store = M3SearchVectorStore(location=tmp_path / "col", model=tiny_encoder)
        try:
            yield store
        finally:
            store.collection.close()


# ------------------------------------------------------------------------------ ours


def test_embeddings_are_the_encoders_dense_vectors(tiny_encoder, col):
    want = tiny_encoder.encode(TEXTS[:3], sparse=False, colbert=False).dense
    got = np.array(M3SearchEmbeddings(encoder=tiny_encoder).embed_documents(TEXTS[:3]))
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(M3SearchEmbeddings(collection=col).embed_query(TEXTS[0]), want[0], atol=1e-6)
    with served(col) as client:  # POST /v1/embeddings
        np.testing.assert_allclose(M3SearchEmbeddings(collection=client).embed_documents(TEXTS[:3]), want, atol=1e-6)


def test_embeddings_need_one_source(tiny_encoder, col, monkeypatch):
    monkeypatch.delenv("M3SEARCH_MODEL", raising=False)
    with pytest.raises(ValueError, match="no model given"):
        M3SearchEmbeddings()
    with pytest.raises(ValueError, match="give one of"):
        M3SearchEmbeddings(encoder=tiny_encoder, collection=col)


@pytest.mark.parametrize("mode, fusion", RANKING_CASES)
def test_retriever_ranking_equals_collection_search(col, mode, fusion):
    for q in QUERIES[:2]:
        want = col.search(q, k=5, mode=mode, fusion=fusion, weights=(0.5, 0.3, 0.2))
        docs = M3SearchRetriever(collection=col, k=5, mode=mode, fusion=fusion, weights=(0.5, 0.3, 0.2)).invoke(q)
        same_hits([(d.id, d.metadata["m3search"]["score"]) for d in docs], want)
        for d, h in zip(docs, want):
            assert d.page_content == h.text
            assert d.metadata["m3search"]["scores"] == h.scores
            assert {k: v for k, v in d.metadata.items() if k != "m3search"} == h.metadata


def test_retriever_over_http_equals_collection_search(col):
    with served(col) as client:
        for mode in MODES:
            want = col.search(QUERIES[0], k=4, mode=mode, filter={"topic": "flow"})
            docs = M3SearchRetriever(collection=client, k=4, mode=mode, filter={"topic": "flow"}).invoke(QUERIES[0])
            same_hits([(d.id, d.metadata["m3search"]["score"]) for d in docs], want)


def test_retriever_per_call_overrides_and_bad_arguments(col):
    r = M3SearchRetriever(collection=col, k=5)
    docs = r.invoke(QUERIES[0], k=2, mode="sparse", filter={"year": {"gte": 1960}})
    assert [d.id for d in docs] == [
        h.id for h in col.search(QUERIES[0], k=2, mode="sparse", filter={"year": {"gte": 1960}})
    ]
    assert all(d.metadata["year"] >= 1960 for d in docs)
    with pytest.raises(TypeError, match="unsupported argument"):
        r.invoke(QUERIES[0], score_threshold=0.5)
    with pytest.raises(ValueError, match="unknown mode"):
        M3SearchRetriever(collection=col, mode="bm25")
    with pytest.raises(ValueError, match="unknown operator"):
        M3SearchRetriever(collection=col, filter={"year": {"between": [1, 2]}})
    with pytest.raises(TypeError, match="Collection or M3SearchClient"):
        M3SearchRetriever(collection="not a collection")


def test_unknown_keyword_arguments_raise_type_error(col):
    """Not pydantic's ValidationError (a ValueError): the same TypeError as the store and the methods."""
    with pytest.raises(TypeError, match=r"M3SearchRetriever got unexpected keyword argument\(s\) \['foo'\]"):
        M3SearchRetriever(collection=col, foo=1)
    with pytest.raises(TypeError, match=r"M3SearchEmbeddings got unexpected keyword argument\(s\) \['foo'\]"):
        M3SearchEmbeddings(collection=col, foo=1)
    with pytest.raises(TypeError, match="foo"):
        M3SearchVectorStore(col, foo=1)
    assert M3SearchRetriever(collection=col, k=2, tags=["t"]).tags == ["t"]  # LangChain's own fields pass


def test_async_retrieval_does_not_block_the_event_loop(col, monkeypatch):
    """While a (slowed) search runs, other coroutines keep running."""
    search = col.search

    def slow_search(*a, **kw):
        time.sleep(0.5)
        return search(*a, **kw)

    monkeypatch.setattr(col, "search", slow_search)
    store = M3SearchVectorStore(col)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        t = asyncio.create_task(ticker())
        docs = await M3SearchRetriever(collection=col, k=2).ainvoke(QUERIES[0])
        found = await store.asimilarity_search(QUERIES[0], k=2)
        t.cancel()
        return docs, found, ticks

    docs, found, ticks = asyncio.run(main())
    assert len(docs) == 2 and len(found) == 2
    assert ticks >= 20  # ~1 s of searches; a blocked loop would count ~0


def test_vector_store_writes_are_visible_in_the_collection(tmp_path, tiny_encoder):
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder)
    col = store.collection
    ids = store.add_documents([Document(page_content=t, metadata=m) for t, m in zip(TEXTS, META)])
    assert col.count() == len(TEXTS)
    assert [r.text for r in col.get(ids)] == TEXTS
    assert store.add_texts(["replaced text"], [{"year": 1}], ids=[ids[0]]) == [ids[0]]
    assert col.get(ids[0])[0].text == "replaced text" and col.count() == len(TEXTS)
    store.delete(ids[:3])
    assert col.count() == len(TEXTS) - 3 and col.get(ids[:3]) == [None] * 3
    docs = store.similarity_search(TEXTS[5], k=10, filter={"year": {"gte": 1959}})
    assert {d.id for d in docs} == {i for i, m in zip(ids, META) if m["year"] >= 1959} - set(ids[:3])
    store.delete()  # LangChain: ids=None deletes everything
    assert col.count() == 0


def test_a_lone_string_is_one_text_or_id_not_its_letters(tmp_path, tiny_encoder):
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder)
    col = store.collection
    store.add_texts(["one", "two", "three", "all"], ids=["a", "b", "c", "abc"])
    store.delete("abc")
    assert [r and r.id for r in col.get(["a", "b", "c", "abc"])] == ["a", "b", "c", None]  # not a, b and c
    assert [d.id for d in store.get_by_ids("a")] == ["a"]
    assert store.add_texts("hello", ids=["h"]) == ["h"] and col.get("h")[0].text == "hello"
    assert col.count() == 4  # one document, not five of one letter each
    assert len(store.embeddings.embed_documents("hello")) == 1
    with pytest.raises(ValueError, match="2 texts but 1 ids"):  # the ids were "p" and "q"
        store.add_texts(["one", "two"], ids="pq")
    assert col.count() == 4


def test_empty_ids_are_none_given_as_in_langchains_own_store(tmp_path, tiny_encoder):
    """``ids=[]`` is "no ids" to LangChain's InMemoryVectorStore (generated, or each Document's own id in
    add_documents), and ``ids=None`` in add_documents keeps the Documents' ids too; was: "2 texts but 0 ids",
    and add_documents(ids=[] or None) dropped the Documents' ids. Each store's outcome, with ids it generated
    written "new", is compared with the reference's."""
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    def outcome(store) -> list:
        got = []
        for write in (
            lambda: store.add_texts([], ids=[]),
            lambda: store.add_texts(["one", "two"], ids=[]),
            lambda: store.add_documents([Document("kept", id="d1"), Document("no id")], ids=[]),
            lambda: store.add_documents([Document("kept too", id="d2")], ids=None),
            lambda: store.add_texts([], ids=["x"]),
        ):
            try:
                ids = write()
            except ValueError:
                got.append("ValueError")
                continue
            texts = [d.page_content for d in store.get_by_ids(ids)]
            got.append([(i if i in ("d1", "d2") else "new", t) for i, t in zip(ids, texts, strict=True)])
        return got

    ours = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder)
    try:
        assert (
            outcome(ours)
            == outcome(InMemoryVectorStore(DeterministicFakeEmbedding(size=8)))
            == [
                [],
                [("new", "one"), ("new", "two")],
                [("d1", "kept"), ("new", "no id")],
                [("d2", "kept too")],
                "ValueError",
            ]
        )
        assert ours.collection.count() == 5
    finally:
        ours.collection.close()


def test_vector_store_over_http(col):
    with served(col) as client:
        store = M3SearchVectorStore(client, mode="dense+sparse")
        new = store.add_texts(["a document added over http"], [{"year": 2024}], ids=["http-1"])
        assert new == ["http-1"] and col.get("http-1")[0].metadata == {"year": 2024}
        got = store.similarity_search_with_score(QUERIES[1], k=3, filter={"year": {"lt": 2000}})
        same_hits(
            [(d.id, s) for d, s in got], col.search(QUERIES[1], k=3, mode="dense+sparse", filter={"year": {"lt": 2000}})
        )
        assert store.get_by_ids(["http-1", "nope"]) == [
            Document(id="http-1", page_content="a document added over http", metadata={"year": 2024})
        ]
        store.delete(["http-1"])
        assert col.get("http-1") == [None]


def test_from_texts_and_as_retriever(tmp_path, tiny_encoder):
    store = M3SearchVectorStore.from_texts(
        TEXTS, M3SearchEmbeddings(encoder=tiny_encoder), META, ids=IDS, location=tmp_path / "c", mode="dense"
    )
    try:
        docs = store.as_retriever(search_kwargs={"k": 3, "filter": {"topic": "structures"}}).invoke(QUERIES[2])
        want = store.collection.search(QUERIES[2], k=3, mode="dense", filter={"topic": "structures"})
        assert [d.id for d in docs] == [h.id for h in want]
        scored = store.similarity_search_with_relevance_scores(QUERIES[2], k=2)  # dense: cosine
        assert [(d.id, s) for d, s in scored] == [
            (h.id, h.score) for h in store.collection.search(QUERIES[2], k=2, mode="dense")
        ]
        with pytest.raises(ValueError, match="encodes with its collection"):
            M3SearchVectorStore.from_texts(["x"], _OtherEmbeddings(), location=tmp_path / "d")
    finally:
        store.collection.close()


class _OtherEmbeddings(Embeddings):
    def embed_documents(self, texts):
        return [[0.0] for _ in texts]

    def embed_query(self, text):
        return [0.0]


def test_unsupported_options_raise(col):
    store = M3SearchVectorStore(col)
    with pytest.raises(NotImplementedError, match="MMR"):
        store.max_marginal_relevance_search(QUERIES[0])
    with pytest.raises(NotImplementedError, match="MMR"):
        store.as_retriever(search_type="mmr")
    with pytest.raises(NotImplementedError, match="mode='dense'"):
        store.similarity_search_with_relevance_scores(QUERIES[0])
    with pytest.raises(NotImplementedError, match="query text"):
        store.similarity_search_by_vector([0.0] * 64)
    with pytest.raises(TypeError, match="unsupported argument"):
        store.similarity_search(QUERIES[0], where={"a": 1})
    with pytest.raises(TypeError, match=r"filter must be a JSON object \(dict\), got function"):
        store.similarity_search(QUERIES[0], filter=lambda doc: True)  # InMemoryVectorStore's kind of filter


def test_missing_framework_gives_the_install_hint(monkeypatch):
    for name in [m for m in sys.modules if m == "langchain_core" or m.startswith("langchain_core.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "import fails"
    monkeypatch.delitem(sys.modules, "m3search.integrations.langchain", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'm3search\[langchain\]'"):
        import m3search.integrations.langchain  # noqa: F401


def test_best_passage_reported_by_the_collection_reaches_the_metadata(col):
    """The collection's best window of each hit (offsets and its text) reaches the document's metadata unchanged."""
    hit = col.search(QUERIES[0], k=1)[0]
    doc = M3SearchRetriever(collection=col, k=1).invoke(QUERIES[0])[0]
    meta = doc.metadata["m3search"]
    assert meta["window"] == hit.window and set(hit.window) == {"start", "end"}
    assert meta["passage"] == doc.page_content[hit.window["start"] : hit.window["end"]] == hit.passage


def test_delete_all_takes_several_rounds(tmp_path, tiny_encoder, monkeypatch):
    from m3search.integrations import _backend

    monkeypatch.setattr(_backend, "_ROUND", 3)  # 8 documents: rounds of 3, 3, 2, then an empty search
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder)
    store.add_texts(TEXTS, META, ids=IDS)
    store.delete()
    assert store.collection.count() == 0
    store.collection.close()


def test_vector_store_on_an_engine_url(tmp_path, tiny_encoder):
    pytest.importorskip("qdrant_client")
    store = M3SearchVectorStore(location=f"qdrant+local://{tmp_path}/q/lc", model=tiny_encoder, mode="dense+sparse")
    try:
        store.add_texts(TEXTS, META, ids=IDS)
        got = store.similarity_search_with_score(QUERIES[0], k=3, filter={"topic": "flow"})
        want = store.collection.search(QUERIES[0], k=3, mode="dense+sparse", filter={"topic": "flow"})
        same_hits([(d.id, s) for d, s in got], want)
        store.delete(IDS[:2])
        assert store.collection.count() == len(IDS) - 2
    finally:
        store.collection.close()


def test_store_options_that_would_be_ignored_raise(col, tmp_path, tiny_encoder):
    with pytest.raises(TypeError, match="apply only when"):
        M3SearchVectorStore(col, candidates=10, colbert_dtype="float16")
    with pytest.raises(TypeError, match="has its model"):
        M3SearchVectorStore(col, model=tiny_encoder)
    with pytest.raises(TypeError, match="api_key"):
        M3SearchVectorStore(col, api_key="k")
    with pytest.raises(ValueError, match="exactly one"):
        M3SearchVectorStore()
    with pytest.raises(TypeError, match="apply only when creating"):
        M3SearchVectorStore(location=col.location, colbert_dtype="float16")


# ------------------------------------------------------------------------------ a tuned collection's defaults

TUNED = {"mode": "sparse", "fusion": "weighted", "weights": [0.4, 0.2, 0.4], "candidates": 50}


def test_a_tuned_collections_defaults_reach_the_retriever_and_the_store(tmp_path, tiny_encoder):
    with make_collection(tmp_path / "tuned", tiny_encoder) as tuned:
        tuned.set_search_defaults(TUNED, tuning={"why": "test"})
        builtin = {q: tuned.search(q, k=5, mode="all", fusion="weighted") for q in QUERIES}
        want = {q: tuned.search(q, k=5) for q in QUERIES}
        assert all(told_apart(want[q], builtin[q]) for q in QUERIES)  # the tuned mode scores differently
        with served(tuned) as client:
            for backend in (tuned, client):
                retriever = M3SearchRetriever(collection=backend, k=5)
                store = M3SearchVectorStore(backend)
                for q in QUERIES:
                    docs = retriever.invoke(q)
                    same_hits([(d.id, d.metadata["m3search"]["score"]) for d in docs], want[q])
                    same_hits([(d.id, s) for d, s in store.similarity_search_with_score(q, k=5)], want[q])
                    # an explicit argument still wins, at construction and per call
                    explicit = M3SearchRetriever(collection=backend, k=5, mode="all", fusion="weighted")
                    same_hits([(d.id, d.metadata["m3search"]["score"]) for d in explicit.invoke(q)], builtin[q])
                    docs = retriever.invoke(q, mode="all")
                    same_hits([(d.id, d.metadata["m3search"]["score"]) for d in docs], builtin[q])
                    assert [d.id for d in store.similarity_search(q, k=5, mode="all")] == [h.id for h in builtin[q]]
                    scored = store.similarity_search_with_score(q, k=5, mode="all")
                    same_hits([(d.id, s) for d, s in scored], builtin[q])
            assert client.search_defaults() == tuned.search_defaults()
        tuned.set_search_defaults({**TUNED, "mode": "dense"})  # relevance scores follow the tuned mode
        assert M3SearchVectorStore(tuned).similarity_search_with_relevance_scores(QUERIES[0], k=2)
        tuned.set_search_defaults(None)
        with pytest.raises(NotImplementedError, match="mode='all'"):
            M3SearchVectorStore(tuned).similarity_search_with_relevance_scores(QUERIES[0], k=2)


def test_relevance_scores_follow_the_search_actually_run(tmp_path, tiny_encoder):
    """The relevance function looked only at the store's mode: a per-call mode or any fusion but weighted
    gave unbounded scores (RRF 0.0066 for a cosine of 0.80) as if they were relevances in [0, 1]."""
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder)  # mode "all"
    try:
        store.add_texts(TEXTS, META, ids=IDS)
        got = store.similarity_search_with_relevance_scores(QUERIES[0], k=3, mode="dense")
        want = store.collection.search(QUERIES[0], k=3, mode="dense")
        assert [(d.id, s) for d, s in got] == [(h.id, h.score) for h in want]
        for store_args, call_args in [
            ({"mode": "dense", "fusion": "rrf"}, {}),
            ({"mode": "dense"}, {"mode": "sparse"}),
        ]:
            with pytest.raises(NotImplementedError, match="fusion='weighted'"):
                M3SearchVectorStore(store.collection, **store_args).similarity_search_with_relevance_scores(
                    QUERIES[0], k=3, **call_args
                )
        retriever = M3SearchVectorStore(store.collection, mode="dense").as_retriever(
            search_type="similarity_score_threshold", search_kwargs={"score_threshold": 0.5, "fusion": "dbsf"}
        )
        with pytest.raises(NotImplementedError, match="fusion='dbsf'"):
            retriever.invoke(QUERIES[0])
    finally:
        store.collection.close()


def test_async_relevance_scores_follow_the_search_actually_run(tmp_path, tiny_encoder):
    """Only the sync path looked at the per-call mode: the async one took the store-wide function, so
    mode='dense' on an 'all' store raised, and mode='all' on a dense store passed fused scores (3.9) off as
    relevances in [0, 1] (a score_threshold retriever then kept everything)."""
    with make_collection(tmp_path / "c", tiny_encoder) as col:  # mode "all"
        store = M3SearchVectorStore(col)
        got = asyncio.run(store.asimilarity_search_with_relevance_scores(QUERIES[0], k=3, mode="dense"))
        want = store.similarity_search_with_relevance_scores(QUERIES[0], k=3, mode="dense")
        assert [(d.id, s) for d, s in got] == [(d.id, s) for d, s in want]
        dense = M3SearchVectorStore(col, mode="dense")
        with pytest.raises(NotImplementedError, match="mode='all'"):
            asyncio.run(dense.asimilarity_search_with_relevance_scores(QUERIES[0], k=3, mode="all"))
        retriever = dense.as_retriever(
            search_type="similarity_score_threshold", search_kwargs={"score_threshold": 0.5, "fusion": "rrf"}
        )
        with pytest.raises(NotImplementedError, match="fusion='rrf'"):
            asyncio.run(retriever.ainvoke(QUERIES[0]))


def test_relevance_scores_in_dense_mode_on_a_collection_tuned_to_another_fusion(tmp_path, tiny_encoder):
    """A tuned fusion belongs to the tuned mode, so mode='dense' on a collection tuned to all / rrf is a
    weighted (cosine) search; the relevance check took the tuned 'rrf' and refused it, over HTTP too,
    telling the caller to use mode='dense', which they had."""
    with make_collection(tmp_path / "c", tiny_encoder) as col:
        col.set_search_defaults({**TUNED, "mode": "all", "fusion": "rrf"})
        want = col.search(QUERIES[0], k=3, mode="dense")
        with served(col) as client:
            for backend in (col, client):
                for store, args in [
                    (M3SearchVectorStore(backend), {"mode": "dense"}),
                    (M3SearchVectorStore(backend, mode="dense"), {}),
                    (M3SearchVectorStore(backend), {"mode": "Dense"}),  # the search reads it as dense
                ]:
                    got = store.similarity_search_with_relevance_scores(QUERIES[0], k=3, **args)
                    assert [(d.id, s) for d, s in got] == [(h.id, h.score) for h in want]
                with pytest.raises(NotImplementedError, match="fusion='rrf'"):  # the tuned mode keeps its fusion
                    M3SearchVectorStore(backend).similarity_search_with_relevance_scores(QUERIES[0], k=3)


def test_relevance_scores_with_a_per_call_none(tmp_path, tiny_encoder):
    """A per-call None is the collection's default in the search (as filter=None clears the filter), but the
    relevance check took the store's value instead: mode=None on a dense store passed the fused 'all' scores
    (4.98) off as relevances in [0, 1], and fusion=None on a dense / rrf store refused a cosine search."""
    with make_collection(tmp_path / "c", tiny_encoder) as col:  # mode "all", fusion "weighted"
        with pytest.raises(NotImplementedError, match="mode='all'"):
            M3SearchVectorStore(col, mode="dense").similarity_search_with_relevance_scores(QUERIES[0], k=3, mode=None)
        got = M3SearchVectorStore(col, mode="dense", fusion="rrf").similarity_search_with_relevance_scores(
            QUERIES[0], k=3, fusion=None
        )
        want = col.search(QUERIES[0], k=3, mode="dense")
        assert [(d.id, s) for d, s in got] == [(h.id, h.score) for h in want]


def test_a_bad_search_argument_creates_no_collection(tmp_path, tiny_encoder):
    with pytest.raises(ValueError, match="unknown mode"):
        M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder, mode="bogus")
    assert not (tmp_path / "c").exists()


def test_from_texts_with_embeddings_over_a_collection(tmp_path, tiny_encoder):
    """The docstring's 'its model creates a new collection' failed with 'no model given' for an embedding
    made from a collection; without a location it now stores into that collection."""
    from m3search import Collection

    with Collection.create(tmp_path / "a", model=tiny_encoder) as col:
        emb = M3SearchEmbeddings(collection=col)
        store = M3SearchVectorStore.from_texts(TEXTS[:2], emb, ids=IDS[:2])
        assert store.collection is col and col.count() == 2
        new = M3SearchVectorStore.from_texts(TEXTS, emb, META, ids=IDS, location=tmp_path / "b")
        try:
            assert new.collection.count() == len(TEXTS)
            assert new.collection.manifest["model"] == col.manifest["model"]
        finally:
            new.collection.close()


def test_delete_all_over_a_server_with_a_lower_max_k(col, monkeypatch):
    """Rounds of k=1000 failed with HTTP 413 on a server whose max_k is lower. Its searches were not exact (the
    client had no exact): a filtered HNSW search may miss matches, and a round that found none ended the delete."""
    store_col = col
    ids = [f"tmp-{i}" for i in range(5)]
    with served(store_col, max_k=3) as client:
        store = M3SearchVectorStore(client)
        before = client.count()
        store.add_texts([f"temporary text {i}" for i in ids], [{"tmp": 1}] * 5, ids=ids)
        from m3search.integrations._backend import delete_matching

        seen = exact_seen(monkeypatch, store_col)
        assert sorted(delete_matching(client, {"tmp": 1})) == ids
        assert client.count() == before and seen == [True] * 3  # rounds of 3, 2, then none found
