"""LlamaIndex: BGE-M3 hybrid search over an m3search collection, as LlamaIndex's own interfaces.

* :class:`M3SearchEmbedding` -- ``BaseEmbedding``: BGE-M3's dense vector.
* :class:`M3SearchRetriever` -- ``BaseRetriever`` over a collection, returning ``NodeWithScore``.
* :class:`M3SearchVectorStore` -- ``BasePydanticVectorStore``: ``VectorStoreIndex.from_vector_store``
  inserts, deletes by ref doc and queries through it, metadata filters mapped to m3search's grammar.

The store keeps each node LlamaIndex's usual way (its JSON in ``_node_content``, user metadata and
``ref_doc_id`` at the top level, so filters address them) and encodes the node's text with the
collection's own model: it searches by query text (``is_embedding_query = False``), so LlamaIndex
computes no query embedding. Per-mode scores (and any best passage) are in
``node.metadata["m3search"]``, hidden from the LLM and the embedder. Async methods run the
blocking work in a thread. Options the store cannot honour raise (``ValueError`` for filter
operators, as LlamaIndex's own stores do; ``NotImplementedError`` for MMR and learner modes).
"""

from __future__ import annotations

import asyncio
import operator
import os
from collections.abc import Sequence
from typing import Any

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TextNode
    from llama_index.core.vector_stores.types import (
        BasePydanticVectorStore,
        FilterCondition,
        FilterOperator,
        MetadataFilter,
        MetadataFilters,
        VectorStoreQuery,
        VectorStoreQueryMode,
        VectorStoreQueryResult,
    )
    from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "m3search.integrations.llama_index needs llama-index-core: pip install 'm3search[llama-index]'"
    ) from None

from m3search.integrations._backend import (
    SCORES_KEY,
    as_list,
    check_search_args,
    delete_matching,
    dense_vectors,
    hit_details,
    is_server_url,
    open_backend,
    refuse_unknown,
)

__all__ = ["M3SearchEmbedding", "M3SearchRetriever", "M3SearchVectorStore", "to_m3search_filter"]


# ---------------------------------------------------------------------------------------------- filters

_RANGE = {FilterOperator.GT: "gt", FilterOperator.GTE: "gte", FilterOperator.LT: "lt", FilterOperator.LTE: "lte"}
_SUPPORTED = (FilterOperator.EQ, FilterOperator.NE, *_RANGE, FilterOperator.IN, FilterOperator.NIN)
_SUPPORTED += (FilterOperator.ANY, FilterOperator.ALL, FilterOperator.CONTAINS)
#: m3search's comparisons as Python makes them, which is how LlamaIndex's reference filter compares.
_PYTHON = {"eq": operator.eq, "gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _cond(key: str, op: str, value: Any) -> dict:
    """``{key: {op: value}}``, also holding for the booleans it holds for in Python (``True == 1``,
    ``False < 0.5``), as in LlamaIndex's reference filter. Why: ``MetadataFilter`` refuses a bool value,
    so ``== 1`` is the only way to filter a boolean field, and m3search's grammar keeps booleans apart."""
    if op == "in" and any(isinstance(v, float) for v in value):  # m3search's "in" takes strings or integers
        return {"or": [_cond(key, "eq", v) for v in value]}
    holds = (lambda b: b in value) if op == "in" else (lambda b: _PYTHON[op](b, value))
    leaf = {key: {op: value}}
    bools = [{key: {"eq": b}} for b in (False, True) if holds(b)]
    return {"or": [leaf, *bools]} if bools else leaf


def _leaf(f: MetadataFilter) -> dict:
    from m3search.filters import LOGICAL_KEYS

    key, op, value = f.key, FilterOperator(f.operator), f.value
    many = isinstance(value, list)
    if op not in _SUPPORTED:
        names = ", ".join(o.value for o in _SUPPORTED)
        raise ValueError(f"filter on {key!r}: operator {op.value!r} is not supported by m3search (supported: {names})")
    if key in LOGICAL_KEYS:  # {"not": {"eq": 2}} would parse as a logical "not", a different filter
        raise ValueError(
            f"filter on {key!r}: the name is reserved in m3search filters ({', '.join(LOGICAL_KEYS)}), "
            "so a metadata field of that name cannot be filtered on"
        )
    if "." in key:  # LlamaIndex's reference looks up the key as it is; m3search's grammar splits it
        raise ValueError(
            f"filter on {key!r}: m3search reads '.' as a path into nested metadata, where LlamaIndex names one "
            "top-level key, so a key with '.' cannot be filtered on (use M3SearchRetriever's filter grammar)"
        )
    if value is None:
        raise ValueError(f"filter on {key!r}: a None value cannot be matched (m3search filters have no null)")
    if op in (FilterOperator.EQ, FilterOperator.NE, FilterOperator.CONTAINS):
        if many:
            raise ValueError(f"filter on {key!r}: operator {op.value!r} takes one value, got a list (use 'in')")
        leaf = _cond(key, "eq", value)
        return {"not": leaf} if op == FilterOperator.NE else leaf
    if op in _RANGE:
        if many or isinstance(value, str):
            raise ValueError(f"filter on {key!r}: operator {op.value!r} compares numbers, got {value!r}")
        return _cond(key, _RANGE[op], value)
    if not many or not value:
        raise ValueError(f"filter on {key!r}: operator {op.value!r} needs a non-empty list, got {value!r}")
    if op == FilterOperator.ALL:  # a list-valued field holding every value
        return {"and": [_cond(key, "eq", v) for v in value]}
    leaf = _cond(key, "in", list(value))  # ANY: a list-valued field holding one of them (same grammar)
    return {"not": leaf} if op == FilterOperator.NIN else leaf


def to_m3search_filter(filters: MetadataFilters | None) -> dict | None:
    """LlamaIndex ``MetadataFilters`` as an m3search filter (validated); None for no filter.

    ``==`` / ``!=`` / ``>`` / ``>=`` / ``<`` / ``<=`` / ``in`` / ``nin`` map one to one, ``any``
    to ``in`` and ``contains`` to ``eq`` (a condition on a list-valued field holds when an element
    satisfies it), ``all`` to an ``and`` of ``eq``: on a string field these test equality, not
    substrings as LlamaIndex's reference filter does (engines have no substring match). A number
    also matches the booleans Python equates with it (``== 1`` holds for ``True``). Conditions
    ``and`` / ``or`` / ``not`` (none of the filters holds) nest; a nested group must not be empty.
    ``!=`` and ``nin`` hold for documents without the field, as in LlamaIndex's own store. Text
    match, ``is_empty``, and a key with ``.`` or named ``and`` / ``or`` / ``not`` raise ``ValueError``.
    """
    from m3search.filters import parse_filter

    if filters is None:
        return None
    if not isinstance(filters, MetadataFilters):
        raise TypeError(f"filters must be llama_index MetadataFilters, not {type(filters).__name__}")

    def group(fs: MetadataFilters, nested: bool) -> dict | None:
        parts = [group(f, True) if isinstance(f, MetadataFilters) else _leaf(f) for f in fs.filters]
        if not parts:
            if nested:  # "no filter" at the top; inside and / or / not it has no one meaning
                raise ValueError("a nested MetadataFilters has no filters: leave it out")
            return None
        cond = FilterCondition(fs.condition or FilterCondition.AND)
        if cond == FilterCondition.NOT:
            return {"not": {"or": parts}}
        return parts[0] if len(parts) == 1 else {cond.value: parts}

    out = group(filters, False)
    parse_filter(out)  # m3search's own checks (e.g. an 'in' list mixing strings and numbers)
    return out


def _search_filter(filter: Any) -> Any:
    return to_m3search_filter(filter) if isinstance(filter, MetadataFilters) else filter


def _and(*filters: Any) -> Any:
    parts = [f for f in filters if f]
    return None if not parts else parts[0] if len(parts) == 1 else {"and": parts}


# ---------------------------------------------------------------------------------------------- nodes


def _node_of_record(record: Any) -> BaseNode:
    """The node as LlamaIndex stored it, or a TextNode for a document added another way."""
    if "_node_content" in record.metadata:
        return metadata_dict_to_node(record.metadata, text=record.text)
    return TextNode(id_=record.id, text=record.text, metadata=dict(record.metadata))


def _node(hit: Any) -> BaseNode:
    """The stored node (as LlamaIndex wrote it, or a TextNode for documents added otherwise),
    with m3search's scores in its metadata, hidden from the LLM and the embedder."""
    node = _node_of_record(hit)
    node.metadata[SCORES_KEY] = hit_details(hit)
    for keys in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
        if SCORES_KEY not in keys:
            keys.append(SCORES_KEY)
    return node


# ---------------------------------------------------------------------------------------------- embedding


class M3SearchEmbedding(BaseEmbedding):
    """BGE-M3's dense vector (normalized [CLS]) as a LlamaIndex embedding.

    Give one source: ``model_name`` (a hub id or local folder in bge-m3's layout, loaded on
    first use, or the ``http(s)://`` URL of a running ``m3search serve``; default
    ``$M3SEARCH_MODEL``), ``encoder`` (an :class:`~m3search.M3Encoder`), or ``collection`` (a
    :class:`~m3search.Collection`, or an :class:`~m3search.client.M3SearchClient` whose server
    encodes; recorded as its URL, so ``to_dict`` / ``from_dict`` reach the same server, without
    the API key, which is not serialized). Queries and documents are encoded alike (BGE-M3 has
    no instruction).
    """

    device: str = "auto"
    dtype: str = "auto"
    _source: Any = PrivateAttr(default=None)

    def __init__(
        self, model_name: str | None = None, *, encoder: Any = None, collection: Any = None, **kwargs: Any
    ) -> None:
        given = [
            n
            for n, v in (("model_name", model_name), ("encoder", encoder), ("collection", collection))
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one of model_name, encoder, collection (got {', '.join(given)})")
        kwargs.pop("class_name", None)  # what LlamaIndex's own serializer adds to every dump (model_validate)
        refuse_unknown(type(self), kwargs)  # BaseEmbedding would ignore them (extra="ignore")
        if encoder is not None:  # recorded, so that to_dict / from_dict reload the same model the same way
            model_name = str(encoder.name_or_path)
            kwargs.setdefault("dtype", str(encoder.dtype).replace("torch.", ""))
        elif collection is not None:
            model_name = getattr(collection, "url", None) or str(collection.manifest["model"]["name_or_path"])
        else:
            model_name = model_name or os.environ.get("M3SEARCH_MODEL")
            if not model_name:
                raise ValueError("no model given: pass model_name=, encoder= or collection=, or set M3SEARCH_MODEL")
        super().__init__(model_name=model_name, **kwargs)
        self._source = collection if collection is not None else encoder

    @classmethod
    def class_name(cls) -> str:
        return "M3SearchEmbedding"

    def _backend(self) -> Any:
        if self._source is None:
            from m3search import M3Encoder

            if is_server_url(self.model_name):  # a client's URL (from_dict): not a model folder to load
                self._source = open_backend(location=self.model_name)
            else:
                self._source = M3Encoder.from_pretrained(self.model_name, device=self.device, dtype=self.dtype)
        return self._source

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return dense_vectors(self._backend(), texts).astype(float).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embeddings([query])[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)


# ---------------------------------------------------------------------------------------------- retriever


class M3SearchRetriever(BaseRetriever):
    """Hybrid search over a collection, as a LlamaIndex retriever (``NodeWithScore``, fused score).

    ``collection``: a :class:`~m3search.Collection` or :class:`~m3search.client.M3SearchClient`.
    ``k`` (LlamaIndex's ``similarity_top_k``, default 2), ``mode``, ``fusion``, ``weights``,
    ``candidates`` are those of :meth:`m3search.Collection.search`; ``filter`` is m3search's filter
    grammar or LlamaIndex ``MetadataFilters``. The ranking is exactly ``Collection.search``'s.
    ``mode``, ``fusion``, ``weights``, ``candidates`` left None are the collection's defaults
    (those ``m3search tune`` stored, else all / weighted / (0.4, 0.2, 0.4) / 200).
    """

    def __init__(
        self,
        collection: Any,
        *,
        k: int = DEFAULT_SIMILARITY_TOP_K,
        mode: str | None = None,
        fusion: str | None = None,
        weights: Sequence[float] | None = None,
        candidates: int | None = None,
        filter: Any = None,
        **kwargs: Any,
    ) -> None:
        self.collection = open_backend(collection)
        filter = _search_filter(filter)
        check_search_args(k, mode, fusion, weights, candidates, filter)
        self.search_args = {
            "k": k,
            "mode": mode,
            "fusion": fusion,
            "weights": weights,
            "candidates": candidates,
            "filter": filter,
        }
        super().__init__(**kwargs)

    @property
    def similarity_top_k(self) -> int:
        return self.search_args["k"]

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.collection.search(query_bundle.query_str, **self.search_args)
        return [NodeWithScore(node=_node(h), score=float(h.score)) for h in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


# ---------------------------------------------------------------------------------------------- vector store

_TEXT_MODES = (VectorStoreQueryMode.SPARSE, VectorStoreQueryMode.TEXT_SEARCH)


class M3SearchVectorStore(BasePydanticVectorStore):
    """An m3search collection as a LlamaIndex vector store.

    ``collection``: a :class:`~m3search.Collection` or :class:`~m3search.client.M3SearchClient`;
    or ``location``: a folder or engine URL (opened if it holds a collection, else created for
    ``model``), or ``http(s)://...`` of a running ``m3search serve`` (``api_key`` for it).
    ``mode``, ``fusion``, ``weights`` and ``candidates`` are the search defaults (None: the
    collection's own, tuned by ``m3search tune`` or built-in).

    Query modes: ``default`` and ``hybrid`` search with ``mode``; ``sparse`` and ``text_search``
    with m3search's sparse (lexical) mode; ``hybrid`` with ``alpha`` weighs dense ``alpha`` and
    sparse ``1 - alpha`` (mode ``dense+sparse``). ``hybrid_top_k`` sets a hybrid query's k and
    ``sparse_top_k`` the candidates per first-stage list. MMR and the learner modes raise
    ``NotImplementedError``.
    """

    stores_text: bool = True
    is_embedding_query: bool = False
    flat_metadata: bool = False
    mode: str | None = None
    fusion: str | None = None
    weights: tuple[float, float, float] | None = None
    candidates: int | None = None
    _collection: Any = PrivateAttr(default=None)

    def __init__(
        self,
        collection: Any = None,
        *,
        location: str | os.PathLike | None = None,
        model: Any = None,
        api_key: str | None = None,
        mode: str | None = None,
        fusion: str | None = None,
        weights: Sequence[float] | None = None,
        candidates: int | None = None,
        **create_settings: Any,
    ) -> None:
        check_search_args(DEFAULT_SIMILARITY_TOP_K, mode, fusion, weights, candidates, None)
        super().__init__(
            mode=mode, fusion=fusion, weights=None if weights is None else tuple(weights), candidates=candidates
        )
        self._collection = open_backend(collection, location, model=model, api_key=api_key, **create_settings)

    @classmethod
    def class_name(cls) -> str:
        return "M3SearchVectorStore"

    @property
    def client(self) -> Any:
        """The backend: a :class:`~m3search.Collection` or :class:`~m3search.client.M3SearchClient`."""
        return self._collection

    # --------------------------------------------------------------------- writes
    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Store nodes (upsert by node id), encoding each node's text with the collection's model.

        The embedding LlamaIndex computed for a node (``node.embedding``) is not used: the
        collection needs all three BGE-M3 representations, from its own model.
        """
        if add_kwargs:
            raise TypeError(f"add got unsupported argument(s) {sorted(add_kwargs)}")
        if not nodes:
            return []
        texts = [n.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        metadata = [node_to_metadata_dict(n, remove_text=True, flat_metadata=self.flat_metadata) for n in nodes]
        return list(self._collection.upsert(texts, ids=[n.node_id for n in nodes], metadata=metadata))

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id``."""
        if delete_kwargs:
            raise TypeError(f"delete got unsupported argument(s) {sorted(delete_kwargs)}")
        delete_matching(self._collection, {"ref_doc_id": ref_doc_id})

    def delete_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None, **delete_kwargs: Any
    ) -> None:
        """Delete nodes by id, by filters, or the nodes among ``node_ids`` that match ``filters``."""
        if delete_kwargs:
            raise TypeError(f"delete_nodes got unsupported argument(s) {sorted(delete_kwargs)}")
        if node_ids is None:
            if filters is None:
                raise ValueError("give node_ids and/or filters (clear() deletes everything)")
            delete_matching(self._collection, to_m3search_filter(filters))
            return
        ids = [n.node_id for n in self.get_nodes(node_ids, filters)] if filters is not None else node_ids
        if ids:
            self._collection.delete(ids)

    def clear(self) -> None:
        delete_matching(self._collection, None)

    # --------------------------------------------------------------------- reads
    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        """Nodes by id (unknown ids skipped), optionally only those matching ``filters``."""
        from m3search.filters import matches, parse_filter

        if node_ids is None:
            raise NotImplementedError(
                "get_nodes needs node_ids: m3search's public API cannot list the documents matching a filter"
            )
        keep = parse_filter(to_m3search_filter(filters))
        return [_node_of_record(r) for r in self._collection.get(as_list(node_ids)) if r and matches(keep, r.metadata)]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if kwargs:
            raise TypeError(f"query got unsupported argument(s) {sorted(kwargs)}")
        args = self._query_args(query)
        hits = self._collection.search(query.query_str, **args)
        return VectorStoreQueryResult(
            nodes=[_node(h) for h in hits], similarities=[float(h.score) for h in hits], ids=[h.id for h in hits]
        )

    def _query_args(self, query: VectorStoreQuery) -> dict[str, Any]:
        """m3search search arguments for a LlamaIndex query; anything it cannot honour raises."""
        qmode = VectorStoreQueryMode(query.mode)
        if qmode == VectorStoreQueryMode.MMR or query.mmr_threshold is not None:
            raise NotImplementedError("maximal marginal relevance (MMR) is not implemented by M3SearchVectorStore")
        if qmode not in (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.HYBRID, *_TEXT_MODES):
            raise NotImplementedError(
                f"query mode {qmode.value!r} is not supported by M3SearchVectorStore (default, hybrid, sparse, text_search)"
            )
        if not query.query_str:
            raise ValueError(
                "M3SearchVectorStore searches by query text (its model encodes all three representations): "
                "VectorStoreQuery.query_str is required"
            )
        if query.node_ids:  # [] is no restriction: VectorStoreIndex.as_retriever's, for a store keeping the text
            raise NotImplementedError(
                "restricting a query to node_ids is not supported; filter on metadata instead. A VectorStoreIndex "
                "sends the ids of the nodes it also keeps in its own docstore: all of them where it was made with "
                "store_nodes_override=True (leave that out: this store keeps each node whole), and any IndexNode or "
                "ImageNode inserted"
            )
        if query.output_fields or query.embedding_field:
            raise NotImplementedError("output_fields / embedding_field are not supported by M3SearchVectorStore")
        if query.alpha is not None and qmode != VectorStoreQueryMode.HYBRID:
            raise ValueError(f"alpha applies to mode='hybrid' only, not {qmode.value!r}")
        if query.alpha is not None and not 0.0 <= query.alpha <= 1.0:  # else a "negative weight" it did not give
            raise ValueError(f"alpha weighs dense against sparse, so it is in [0, 1]; got {query.alpha}")
        mode, weights = self.mode, self.weights
        if qmode in _TEXT_MODES:  # the store's weights belong to its mode: (0.5, 0, 0.5) would refuse sparse
            mode, weights = "sparse", None
        elif query.alpha is not None:
            mode, weights = "dense+sparse", (float(query.alpha), 1.0 - float(query.alpha), 0.0)
        doc_filter = {"ref_doc_id": {"in": list(query.doc_ids)}} if query.doc_ids else None
        return {
            "k": (qmode == VectorStoreQueryMode.HYBRID and query.hybrid_top_k) or query.similarity_top_k,
            "mode": mode,
            "fusion": self.fusion,
            "weights": weights,
            "candidates": query.sparse_top_k or self.candidates,
            "filter": _and(to_m3search_filter(query.filters), doc_filter),
        }

    # --------------------------------------------------------------------- async: the same work in a thread
    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        return await asyncio.to_thread(self.add, nodes, **kwargs)

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await asyncio.to_thread(self.delete, ref_doc_id, **delete_kwargs)

    async def adelete_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None, **delete_kwargs: Any
    ) -> None:
        await asyncio.to_thread(self.delete_nodes, node_ids, filters, **delete_kwargs)

    async def aclear(self) -> None:
        await asyncio.to_thread(self.clear)

    async def aget_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        return await asyncio.to_thread(self.get_nodes, node_ids, filters)

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        return await asyncio.to_thread(self.query, query, **kwargs)
