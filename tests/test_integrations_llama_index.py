"""LlamaIndex integration: rankings equal Collection.search, MetadataFilters keep exactly what
LlamaIndex's own filter function keeps, and VectorStoreIndex inserts / deletes land in the collection.

llama-index-core ships no standard test suite for its interfaces (LangChain's is run in
tests/test_integrations_langchain.py), so LlamaIndex's own code is the reference here:
``build_metadata_filter_fn`` for filters, ``VectorStoreIndex`` for the index round trip.
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from integration_helpers import (
    IDS,
    META,
    QUERIES,
    RANKING_CASES,
    TEXTS,
    make_collection,
    same_hits,
    served,
    told_apart,
)  # noqa: E402
from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.schema import TextNode  # noqa: E402
from llama_index.core.vector_stores.types import (  # noqa: E402
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)
from llama_index.core.vector_stores.utils import build_metadata_filter_fn  # noqa: E402

from m3search.integrations.llama_index import (  # noqa: E402
    M3SearchEmbedding,
    M3SearchRetriever,
    M3SearchVectorStore,
    to_m3search_filter,
)


@pytest.fixture(scope="module")
def col(tmp_path_factory, tiny_encoder):
    c = make_collection(tmp_path_factory.mktemp("li") / "col", tiny_encoder)
    c.add(["a note without topic or tags"], ids=["bare"], metadata=[{"year": 1999}])
    yield c
    c.close()


def _splitter():
    # a whitespace tokenizer: LlamaIndex's default one (tiktoken) downloads its vocabulary
    return SentenceSplitter(chunk_size=16, chunk_overlap=0, tokenizer=str.split)


# ------------------------------------------------------------------------------ embedding


def test_embedding_is_the_encoders_dense_vector(tiny_encoder, col):
    want = tiny_encoder.encode(TEXTS[:3], sparse=False, colbert=False).dense
    emb = M3SearchEmbedding(encoder=tiny_encoder)
    np.testing.assert_allclose(emb.get_text_embedding_batch(TEXTS[:3]), want, atol=1e-6)
    np.testing.assert_allclose(emb.get_query_embedding(TEXTS[0]), want[0], atol=1e-6)
    np.testing.assert_allclose(asyncio.run(emb.aget_query_embedding(TEXTS[1])), want[1], atol=1e-6)
    with served(col) as client:
        np.testing.assert_allclose(
            M3SearchEmbedding(collection=client).get_text_embedding(TEXTS[2]), want[2], atol=1e-6
        )
    # LlamaIndex serialization: class name and fields; a model given by path reloads from the dict
    d = emb.to_dict()
    assert d["class_name"] == "M3SearchEmbedding" and d["model_name"] == str(tiny_encoder.name_or_path)
    again = M3SearchEmbedding.from_dict(d)
    np.testing.assert_allclose(again.get_query_embedding(TEXTS[0]), want[0], atol=1e-5)
    with pytest.raises(ValueError, match="give one of"):
        M3SearchEmbedding(encoder=tiny_encoder, collection=col)


def test_an_embedding_over_a_server_survives_to_dict(col, tiny_encoder, monkeypatch):
    """Its model_name is the server's URL, which from_dict then tried to load as a model folder
    (ModelLoadError); an http(s) model_name now means a client of that server."""
    import m3search.client

    want = tiny_encoder.encode(TEXTS[:1], sparse=False, colbert=False).dense
    with served(col) as client:
        d = M3SearchEmbedding(collection=client).to_dict()
        assert d["model_name"] == client.url == "http://m3search.test"
        opened = []  # the in-process server has no socket: a client made for its URL is the served one

        def at(url, **kwargs):
            opened.append(url)
            return client

        monkeypatch.setattr(m3search.client, "M3SearchClient", at)
        again = M3SearchEmbedding.from_dict(d)
        np.testing.assert_allclose(again.get_query_embedding(TEXTS[0]), want[0], atol=1e-6)
        assert opened == [client.url]


def test_unknown_keyword_arguments_raise_type_error(col):
    """BaseEmbedding's pydantic config ignores extra fields: a misspelt option was dropped silently."""
    with pytest.raises(TypeError, match=r"\['embed_batch_sise', 'modee'\]"):
        M3SearchEmbedding(collection=col, embed_batch_sise=5, modee="sparse")
    with pytest.raises(TypeError, match="foo"):
        M3SearchEmbedding("some/model", foo=1)
    e = M3SearchEmbedding(collection=col, embed_batch_size=5)
    assert e.embed_batch_size == 5  # its own fields pass, and pydantic's round trip (its dump adds class_name)
    assert M3SearchEmbedding.model_validate(e.model_dump()).embed_batch_size == 5
    assert M3SearchEmbedding.model_validate_json(e.model_dump_json()).model_name == e.model_name
    with pytest.raises(TypeError, match="foo"):
        M3SearchRetriever(col, foo=1)
    with pytest.raises(TypeError, match="foo"):
        M3SearchVectorStore(col, foo=1)


# ------------------------------------------------------------------------------ retriever


@pytest.mark.parametrize("mode, fusion", RANKING_CASES)
def test_retriever_ranking_equals_collection_search(col, mode, fusion):
    for q in QUERIES[:2]:
        want = col.search(q, k=5, mode=mode, fusion=fusion)
        got = M3SearchRetriever(col, k=5, mode=mode, fusion=fusion).retrieve(q)
        same_hits([(n.node.node_id, n.score) for n in got], want)
        for n, h in zip(got, want):
            assert n.node.get_content() == h.text
            assert n.node.metadata["m3search"]["scores"] == h.scores
            assert "m3search" not in n.node.get_content(metadata_mode="llm")


def test_retriever_over_http_and_with_metadata_filters(col):
    filters = MetadataFilters(filters=[MetadataFilter(key="year", value=1955, operator=FilterOperator.GTE)])
    want = col.search(QUERIES[0], k=4, mode="dense+colbert", filter={"year": {"gte": 1955}})
    with served(col) as client:
        got = M3SearchRetriever(client, k=4, mode="dense+colbert", filter=filters).retrieve(QUERIES[0])
    same_hits([(n.node.node_id, n.score) for n in got], want)


def test_aretrieve_does_not_block_the_event_loop(col, monkeypatch):
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
        got = await M3SearchRetriever(col, k=2).aretrieve(QUERIES[0])
        res = await store.aquery(VectorStoreQuery(query_str=QUERIES[0], similarity_top_k=2))
        t.cancel()
        return got, res, ticks

    got, res, ticks = asyncio.run(main())
    assert len(got) == 2 and len(res.ids) == 2
    assert ticks >= 20


# ------------------------------------------------------------------------------ filters

F = MetadataFilter
CASES = [
    MetadataFilters(filters=[F(key="topic", value="flow")]),
    MetadataFilters(filters=[F(key="topic", value="flow", operator="!=")]),
    MetadataFilters(filters=[F(key="year", value=1959, operator=">")]),
    MetadataFilters(filters=[F(key="year", value=1959, operator=">=")]),
    MetadataFilters(filters=[F(key="year", value=1959, operator="<")]),
    MetadataFilters(filters=[F(key="year", value=1959, operator="<=")]),
    MetadataFilters(filters=[F(key="year", value=[1950, 1956, 1999], operator="in")]),
    MetadataFilters(filters=[F(key="year", value=[1950, 1956], operator="nin")]),
    MetadataFilters(filters=[F(key="topic", value=["structures"], operator="nin")]),
    MetadataFilters(filters=[F(key="tags", value=["a", "x"], operator="any")]),
    MetadataFilters(filters=[F(key="tags", value=["a", "b"], operator="all")]),
    MetadataFilters(filters=[F(key="tags", value="c", operator="contains")]),
    MetadataFilters(
        filters=[F(key="topic", value="flow"), F(key="year", value=1960, operator=">")], condition=FilterCondition.OR
    ),
    MetadataFilters(
        filters=[F(key="topic", value="flow"), F(key="year", value=1960, operator=">")], condition=FilterCondition.AND
    ),
    MetadataFilters(
        filters=[F(key="topic", value="flow"), F(key="year", value=1960, operator=">")], condition=FilterCondition.NOT
    ),
    MetadataFilters(
        filters=[
            F(key="year", value=1952, operator=">"),
            MetadataFilters(
                filters=[F(key="topic", value="structures"), F(key="tags", value="a", operator="contains")],
                condition=FilterCondition.OR,
            ),
        ]
    ),
]


def _oracle(filters: MetadataFilters, metadata: dict[str, dict]) -> set[str]:
    """What LlamaIndex's own filter function keeps (it does not nest: nested groups are combined here)."""

    def keep(fs: MetadataFilters, m: dict) -> bool:
        flat = [f for f in fs.filters if not isinstance(f, MetadataFilters)]
        parts = [build_metadata_filter_fn(lambda _: m, MetadataFilters(filters=[f]))("x") for f in flat]
        parts += [keep(g, m) for g in fs.filters if isinstance(g, MetadataFilters)]
        cond = fs.condition or FilterCondition.AND
        return (
            all(parts) if cond == FilterCondition.AND else any(parts) if cond == FilterCondition.OR else not any(parts)
        )

    return {i for i, m in metadata.items() if keep(filters, m)}


@pytest.mark.parametrize("filters", CASES, ids=[str(i) for i in range(len(CASES))])
def test_metadata_filters_keep_what_llama_index_keeps(col, filters):
    metadata = {**dict(zip(IDS, META)), "bare": {"year": 1999}}
    want = _oracle(filters, metadata)
    mapped = to_m3search_filter(filters)
    got = {h.id for h in col.search("flow", k=50, mode="dense", filter=mapped, exact=True)}
    assert got == want, mapped
    store = M3SearchVectorStore(col, mode="dense")
    res = store.query(VectorStoreQuery(query_str="flow", similarity_top_k=50, filters=filters))
    assert set(res.ids) == want


def test_filter_mapping_is_the_grammar():
    assert to_m3search_filter(CASES[1]) == {"not": {"topic": {"eq": "flow"}}}
    assert to_m3search_filter(CASES[14]) == {"not": {"or": [{"topic": {"eq": "flow"}}, {"year": {"gt": 1960}}]}}
    assert to_m3search_filter(MetadataFilters(filters=[])) is None


def test_contains_any_all_on_a_string_field_are_equality_as_documented(col):
    """Where m3search departs from LlamaIndex's reference on purpose (docs/integrations.md): on a string
    field, contains / any / all test equality, where build_metadata_filter_fn tests substrings."""
    metadata = {**dict(zip(IDS, META)), "bare": {"year": 1999}}  # topic: "flow" or "structures"
    store = M3SearchVectorStore(col, mode="dense")
    for op, value, want in [
        ("contains", "low", set()),
        ("any", ["low", "struct"], set()),
        ("all", ["fl", "ow"], set()),
        ("contains", "flow", {i for i, m in metadata.items() if m.get("topic") == "flow"}),
    ]:
        filters = MetadataFilters(filters=[F(key="topic", value=value, operator=op)])
        res = store.query(VectorStoreQuery(query_str="flow", similarity_top_k=50, filters=filters))
        assert set(res.ids) == want, (op, value)
        if not want:  # the reference matches substrings here: the documented difference
            assert _oracle(filters, metadata), (op, value)


@pytest.mark.parametrize(
    "bad, match",
    [
        (F(key="topic", value="flo", operator="text_match"), "'text_match' is not supported"),
        (F(key="topic", value="flo", operator="text_match_insensitive"), "not supported"),
        (F(key="topic", value=None, operator="is_empty"), "'is_empty' is not supported"),  # was: "a None value"
        (F(key="year", value="1950", operator=">"), "compares numbers"),
        (F(key="year", value=[1950], operator="=="), "takes one value"),
        # m3search's logical keys: {"not": {"eq": 2}} was a different, always-true filter
        (F(key="not", value=2), "on 'not': the name is reserved"),
        (F(key="and", value=[1, 2], operator="any"), "on 'and': the name is reserved"),
        (F(key="or", value=1, operator="!="), "on 'or': the name is reserved"),
        # LlamaIndex looks the key up as it is, m3search's grammar as a path: {"a.b": 1} was missed, {"a": {"b": 1}} found
        (F(key="author.name", value="Ada"), "a key with '.' cannot be filtered on"),
        # an empty group was dropped: "year == 1950 or <no condition>" became "year == 1950"
        (
            MetadataFilters(filters=[F(key="year", value=1950), MetadataFilters(filters=[])], condition="or"),
            "no filters",
        ),
    ],
)
def test_unsupported_filters_raise_value_error(col, bad, match):
    store = M3SearchVectorStore(col)
    with pytest.raises(ValueError, match=match):
        store.query(VectorStoreQuery(query_str="flow", filters=MetadataFilters(filters=[bad])))


def test_a_number_matches_the_booleans_python_equates_with_it(tmp_path, tiny_encoder):
    """MetadataFilter refuses a bool value, so ``== 1`` is how LlamaIndex filters a boolean field, and its
    reference keeps True there (True == 1 in Python). m3search's grammar keeps booleans apart: == 1 found no
    boolean, and != 1 returned the True documents the caller excluded. A list of floats for ``in`` raised."""
    metadata = {"t": {"flag": True}, "f": {"flag": False}, "one": {"flag": 1}, "zero": {"flag": 0.0}}
    metadata |= {"two": {"flag": 2}, "none": {}}
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder, mode="dense")
    try:
        store.add([TextNode(text=f"note {i}", id_=i, metadata=m) for i, m in metadata.items()])
        for op, value in [
            *[("==", 1), ("!=", 1), ("==", 0), ("!=", 0.0), (">", 0), ("<=", 0.5), ("<", 2)],
            *[("in", [1, 2]), ("nin", [0, 2]), ("in", [0.0, 2.5]), ("nin", [1.0, 2.5])],
        ]:
            filters = MetadataFilters(filters=[F(key="flag", value=value, operator=op)])
            res = store.query(VectorStoreQuery(query_str="note", similarity_top_k=10, filters=filters))
            assert set(res.ids) == _oracle(filters, metadata), (op, value)
    finally:
        store.client.close()


def test_hybrid_top_k_is_the_k_of_hybrid_queries_only(col):
    """VectorStoreQuery.hybrid_top_k is "top k results from hybrid search": a default query returned
    hybrid_top_k hits, where LlamaIndex's reference store returns similarity_top_k."""
    store = M3SearchVectorStore(col, mode="all")
    for qmode, want in [("default", 2), ("sparse", 2), ("hybrid", 5)]:
        query = VectorStoreQuery(query_str=QUERIES[0], similarity_top_k=2, hybrid_top_k=5, mode=qmode)
        assert len(store.query(query).ids) == want, qmode


def test_unsupported_query_options_raise(col):
    store = M3SearchVectorStore(col)
    with pytest.raises(NotImplementedError, match="MMR"):
        store.query(VectorStoreQuery(query_str="flow", mode=VectorStoreQueryMode.MMR))
    with pytest.raises(NotImplementedError, match="'svm'"):
        store.query(VectorStoreQuery(query_str="flow", mode=VectorStoreQueryMode.SVM))
    with pytest.raises(ValueError, match="query_str is required"):
        store.query(VectorStoreQuery(query_embedding=[0.0] * 64))
    with pytest.raises(NotImplementedError, match="node_ids"):
        store.query(VectorStoreQuery(query_str="flow", node_ids=["d1"]))
    with pytest.raises(ValueError, match="give node_ids and/or filters"):  # SimpleVectorStore deletes everything
        store.delete_nodes()
    for qmode in ("default", "sparse", "text_search"):  # a sparse query ignored alpha, where a default one raised
        with pytest.raises(ValueError, match="alpha applies to mode='hybrid' only"):
            store.query(VectorStoreQuery(query_str="flow", mode=qmode, alpha=0.5))
    for alpha in (1.5, -0.2, float("nan")):  # was "weight for sparse must not be negative", a weight never given
        with pytest.raises(ValueError, match=r"alpha .* in \[0, 1\]"):
            store.query(VectorStoreQuery(query_str="flow", mode="hybrid", alpha=alpha))


def test_query_modes_map_to_search_modes(col):
    store = M3SearchVectorStore(col, mode="all")
    for qmode, kwargs, want in [
        ("default", {}, col.search(QUERIES[0], k=3, mode="all")),
        ("sparse", {}, col.search(QUERIES[0], k=3, mode="sparse")),
        ("hybrid", {"alpha": 0.7}, col.search(QUERIES[0], k=3, mode="dense+sparse", weights=(0.7, 0.3, 0.0))),
    ]:
        res = store.query(VectorStoreQuery(query_str=QUERIES[0], similarity_top_k=3, mode=qmode, **kwargs))
        same_hits(list(zip(res.ids, res.similarities)), want)


def test_text_query_modes_on_a_store_whose_weights_leave_out_sparse(col):
    """The store's weights belong to its mode: a store for dense+colbert with weights (0.5, 0, 0.5) refused
    LlamaIndex's sparse / text_search queries (zero total weight for 'sparse'), a mode the store chose itself."""
    store = M3SearchVectorStore(col, mode="dense+colbert", weights=(0.5, 0.0, 0.5))
    want = col.search(QUERIES[0], k=3, mode="sparse")
    for qmode in ("sparse", "text_search"):
        res = store.query(VectorStoreQuery(query_str=QUERIES[0], similarity_top_k=3, mode=qmode))
        same_hits(list(zip(res.ids, res.similarities)), want)


# ------------------------------------------------------------------------------ VectorStoreIndex round trip


def _documents():
    return [
        Document(
            text=" ".join(TEXTS[i : i + 3]) + ".",
            metadata={"year": 1950 + i, "topic": ["flow", "structures"][i % 2]},
            doc_id=f"doc{i}",
        )
        for i in range(0, len(TEXTS), 2)
    ]


def _index_round_trip(store, col):
    embed = M3SearchEmbedding(collection=store.client)
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed, transformations=[_splitter()])
    docs = _documents()
    for d in docs:
        index.insert(d)
    n = col.count()
    assert n >= len(docs)  # each document split into one or more nodes
    nodes_of = {
        d.doc_id: [h.id for h in col.search("*", k=100, mode="dense", filter={"ref_doc_id": d.doc_id}, exact=True)]
        for d in docs
    }
    assert all(nodes_of.values()) and sum(len(v) for v in nodes_of.values()) == n

    filters = MetadataFilters(filters=[F(key="topic", value="flow")])
    got = index.as_retriever(similarity_top_k=3, filters=filters).retrieve(QUERIES[1])
    want = col.search(QUERIES[1], k=3, mode=store.mode, filter={"topic": {"eq": "flow"}})
    same_hits([(n.node.node_id, n.score) for n in got], want)
    assert all(n.node.ref_doc_id in nodes_of and n.node.metadata["topic"] == "flow" for n in got)

    index.delete_ref_doc("doc0")
    assert col.get(nodes_of["doc0"]) == [None] * len(nodes_of["doc0"])
    assert col.count() == n - len(nodes_of["doc0"])
    store.delete_nodes(nodes_of["doc2"][:1])
    assert col.get(nodes_of["doc2"][:1]) == [None]
    store.delete_nodes(filters=MetadataFilters(filters=[F(key="year", value=1954)]))
    assert col.get(nodes_of["doc4"]) == [None] * len(nodes_of["doc4"])
    only = store.query(VectorStoreQuery(query_str=QUERIES[0], similarity_top_k=10, doc_ids=["doc6"]))
    assert sorted(only.ids) == sorted(nodes_of["doc6"])
    kept = store.get_nodes(nodes_of["doc6"])
    assert [x.node_id for x in kept] == nodes_of["doc6"] and all(x.ref_doc_id == "doc6" for x in kept)
    store.clear()
    assert col.count() == 0


def test_vector_store_index_inserts_and_deletes_reach_the_collection(tmp_path, tiny_encoder):
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder, mode="dense+sparse")
    try:
        _index_round_trip(store, store.client)
    finally:
        store.client.close()


def test_get_nodes_takes_a_lone_string_as_one_id(tmp_path, tiny_encoder):
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder)
    try:
        store.add([TextNode(text=t, id_=i) for t, i in (("one", "a"), ("two", "b"), ("both", "ab"))])
        assert [n.node_id for n in store.get_nodes("ab")] == ["ab"]  # not the nodes a and b
    finally:
        store.client.close()


def test_vector_store_index_over_http(tmp_path, tiny_encoder):
    col = make_collection(tmp_path / "c", tiny_encoder, docs=False)
    try:
        with served(col) as client:
            _index_round_trip(M3SearchVectorStore(client), col)
    finally:
        col.close()


def test_vector_store_serializes_and_rejects_other_nodes_fields(col):
    store = M3SearchVectorStore(col, mode="dense+colbert", weights=(1, 0, 1))
    d = store.to_dict()
    assert d["class_name"] == "M3SearchVectorStore" and d["mode"] == "dense+colbert" and d["weights"] == (1.0, 0.0, 1.0)
    assert d["stores_text"] is True and d["is_embedding_query"] is False
    with pytest.raises(ValueError, match="unknown mode"):
        M3SearchVectorStore(col, mode="bm25")
    plain = store.query(VectorStoreQuery(query_str=TEXTS[5], similarity_top_k=1)).nodes[0]
    assert isinstance(plain, TextNode) and plain.node_id == "d5"  # added outside LlamaIndex: a TextNode


def test_missing_framework_gives_the_install_hint(monkeypatch):
    for name in [m for m in sys.modules if m == "llama_index" or m.startswith("llama_index.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "m3search.integrations.llama_index", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'm3search\[llama-index\]'"):
        import m3search.integrations.llama_index  # noqa: F401


def _index_of_documents(store: M3SearchVectorStore, encoder, **options) -> VectorStoreIndex:
    """``_documents()`` split and indexed into ``store`` through a storage context."""
    return VectorStoreIndex.from_documents(
        _documents(),
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=M3SearchEmbedding(encoder=encoder),
        transformations=[_splitter()],
        **options,
    )


def test_from_documents_through_a_storage_context(tmp_path, tiny_encoder):
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder)
    try:
        index = _index_of_documents(store, tiny_encoder)
        col = store.client
        assert col.count() >= len(_documents())
        got = index.as_retriever(similarity_top_k=2).retrieve(QUERIES[0])
        same_hits([(n.node.node_id, n.score) for n in got], col.search(QUERIES[0], k=2))
    finally:
        store.client.close()


def test_an_index_keeping_its_own_copy_of_the_nodes_is_told_why_its_queries_are_refused(tmp_path, tiny_encoder):
    """VectorStoreIndex(store_nodes_override=True) keeps every node in its docstore too and sends all their ids with
    each query: retrieval then failed "restricting a query to node_ids is not supported; filter on metadata
    instead", naming nothing the user had done. The refusal now names the option (the inserts themselves work)."""
    store = M3SearchVectorStore(location=tmp_path / "c", model=tiny_encoder)
    try:
        index = _index_of_documents(store, tiny_encoder, store_nodes_override=True)
        assert store.client.count() == len(index.docstore.docs) >= len(_documents())
        with pytest.raises(NotImplementedError, match=r"node_ids .* store_nodes_override=True \(leave that out"):
            index.as_retriever(similarity_top_k=2).retrieve(QUERIES[0])
    finally:
        store.client.close()


# ------------------------------------------------------------------------------ a tuned collection's defaults


def test_a_tuned_collections_defaults_reach_the_retriever_and_the_store(tmp_path, tiny_encoder):
    tuned_setting = {"mode": "sparse", "fusion": "weighted", "weights": [0.4, 0.2, 0.4], "candidates": 50}
    with make_collection(tmp_path / "tuned", tiny_encoder) as tuned:
        tuned.set_search_defaults(tuned_setting, tuning={"why": "test"})
        builtin = {q: tuned.search(q, k=5, mode="all", fusion="weighted") for q in QUERIES}
        want = {q: tuned.search(q, k=5) for q in QUERIES}
        assert all(told_apart(want[q], builtin[q]) for q in QUERIES)  # the tuned mode scores differently
        with served(tuned) as client:
            for backend in (tuned, client):
                store = M3SearchVectorStore(backend)
                for q in QUERIES:
                    nodes = M3SearchRetriever(backend, k=5).retrieve(q)
                    same_hits([(n.node.node_id, n.score) for n in nodes], want[q])
                    res = store.query(VectorStoreQuery(query_str=q, similarity_top_k=5))
                    same_hits(list(zip(res.ids, res.similarities)), want[q])
                    explicit = M3SearchRetriever(backend, k=5, mode="all", fusion="weighted").retrieve(q)
                    same_hits([(n.node.node_id, n.score) for n in explicit], builtin[q])  # an explicit argument wins
                    res = M3SearchVectorStore(backend, mode="all").query(
                        VectorStoreQuery(query_str=q, similarity_top_k=5)
                    )
                    same_hits(list(zip(res.ids, res.similarities)), builtin[q])
