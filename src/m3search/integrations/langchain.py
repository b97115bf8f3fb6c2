"""LangChain: BGE-M3 hybrid search over an m3search collection, as LangChain's own interfaces.

* :class:`M3SearchEmbeddings` -- ``Embeddings``: BGE-M3's dense vector, for any LangChain vector store.
* :class:`M3SearchRetriever` -- ``BaseRetriever`` over a collection: every mode, fusion, weights, filter.
* :class:`M3SearchVectorStore` -- ``VectorStore`` backed by a collection (folder, engine URL, or a
  running ``m3search serve``): add, upsert by id, delete, get by id, search, ``as_retriever``.

The collection encodes and scores with its own model (dense + sparse + ColBERT from one pass), so
no LangChain ``Embeddings`` drives the store. Retrieved documents carry the fused score, the three
per-mode scores and, when the collection reports one, the best passage under
``metadata["m3search"]``. Async methods run the blocking work in a thread (``run_in_executor``).
Options the store cannot honour (MMR, relevance scores of fused modes, search by vector) raise
``NotImplementedError`` naming what to use instead; unknown keyword arguments raise ``TypeError``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables.config import run_in_executor
    from langchain_core.vectorstores import VectorStore, VectorStoreRetriever
    from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "m3search.integrations.langchain needs langchain-core: pip install 'm3search[langchain]'"
    ) from None

from m3search.integrations._backend import (
    SCORES_KEY,
    as_list,
    check_search_args,
    delete_matching,
    dense_vectors,
    hit_details,
    is_remote,
    open_backend,
    refuse_unknown,
)

__all__ = ["M3SearchEmbeddings", "M3SearchRetriever", "M3SearchVectorStore"]

_SEARCH_ARGS = ("k", "mode", "fusion", "weights", "candidates", "filter")


def _search_args(defaults: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Per-call search arguments over the object's defaults; anything else is an error, never ignored."""
    overrides = {k: v for k, v in overrides.items() if k != "verbose"}  # LangChain's invoke passes it through
    unknown = sorted(set(overrides) - set(_SEARCH_ARGS))
    if unknown:
        raise TypeError(f"{where} got unsupported argument(s) {unknown}; it takes {', '.join(_SEARCH_ARGS)}")
    return {**defaults, **overrides}


def _document(hit: Any, details: bool) -> Document:
    metadata = dict(hit.metadata)
    if details:
        metadata[SCORES_KEY] = hit_details(hit)
    return Document(page_content=hit.text, metadata=metadata, id=hit.id)


class M3SearchEmbeddings(BaseModel, Embeddings):
    """BGE-M3's dense vector (normalized [CLS]) as LangChain ``Embeddings``.

    Give one source: ``model_name`` (a hub id or local folder in bge-m3's layout, loaded on
    first use; default ``$M3SEARCH_MODEL``), ``encoder`` (an :class:`~m3search.M3Encoder`),
    or ``collection`` (a :class:`~m3search.Collection`, whose model is used, or an
    :class:`~m3search.client.M3SearchClient`, whose server encodes via ``/v1/embeddings``).
    BGE-M3 uses no query instruction, so queries and documents are encoded alike.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    encoder: Any = None
    collection: Any = None
    _source: Any = PrivateAttr(default=None)

    def __init__(self, **data: Any) -> None:
        refuse_unknown(type(self), data)  # TypeError, not pydantic's ValidationError (a ValueError)
        super().__init__(**data)

    @model_validator(mode="after")
    def _one_source(self) -> M3SearchEmbeddings:
        given = [n for n in ("model_name", "encoder", "collection") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of model_name, encoder, collection (got {', '.join(given)})")
        if not given and not os.environ.get("M3SEARCH_MODEL"):
            raise ValueError("no model given: pass model_name=, encoder= or collection=, or set M3SEARCH_MODEL")
        return self

    def _backend(self) -> Any:
        if self._source is None:
            if self.collection is not None:
                self._source = self.collection
            elif self.encoder is not None:
                self._source = self.encoder
            else:
                from m3search import M3Encoder

                name = self.model_name or os.environ["M3SEARCH_MODEL"]
                self._source = M3Encoder.from_pretrained(name, device=self.device, dtype=self.dtype)
        return self._source

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return dense_vectors(self._backend(), texts).astype(float).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class M3SearchRetriever(BaseRetriever):
    """Hybrid search over a collection, as a LangChain retriever.

    ``collection``: a :class:`~m3search.Collection` or an :class:`~m3search.client.M3SearchClient`.
    ``k``, ``mode`` (dense, sparse, colbert, dense+sparse, dense+colbert, all), ``fusion``
    (weighted, rrf, dbsf), ``weights`` (dense, sparse, colbert), ``candidates`` and ``filter``
    (m3search's filter grammar) are those of :meth:`m3search.Collection.search`, and each can be
    overridden per call: ``retriever.invoke("query", k=3, filter={"year": {"gte": 2020}})``.
    ``mode``, ``fusion``, ``weights``, ``candidates`` left None are the collection's defaults
    (those ``m3search tune`` stored, else all / weighted / (0.4, 0.2, 0.4) / 200).
    The ranking is exactly ``Collection.search``'s; each document's ``metadata["m3search"]``
    holds ``id``, ``score`` (fused), ``scores`` (dense, sparse, colbert) and any best passage.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    collection: Any
    k: int = 4
    mode: str | None = None
    fusion: str | None = None
    weights: tuple[float, float, float] | None = None
    candidates: int | None = None
    filter: dict[str, Any] | None = None

    def __init__(self, **data: Any) -> None:
        refuse_unknown(type(self), data)  # TypeError, not pydantic's ValidationError (a ValueError)
        super().__init__(**data)

    @model_validator(mode="after")
    def _check(self) -> M3SearchRetriever:
        open_backend(self.collection)  # type check
        check_search_args(self.k, self.mode, self.fusion, self.weights, self.candidates, self.filter)
        return self

    def _defaults(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SEARCH_ARGS}

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        args = _search_args(self._defaults(), kwargs, type(self).__name__)
        return [_document(h, details=True) for h in self.collection.search(query, **args)]


class M3SearchVectorStore(VectorStore):
    """A LangChain ``VectorStore`` whose documents live in an m3search collection.

    ``collection``: a :class:`~m3search.Collection` or :class:`~m3search.client.M3SearchClient`;
    or ``location``: a folder or engine URL (``qdrant://``, ``milvus://``, ``*.db``), opened if it
    holds a collection, else created for ``model``; or ``http(s)://...`` of a running
    ``m3search serve`` (``api_key`` for it). ``mode``, ``fusion``, ``weights`` and ``candidates``
    are the search defaults, each overridable per call; None (the default) is the collection's
    own (tuned by ``m3search tune``, else built-in).

    Writes are upserts by id (LangChain's contract: adding an existing id replaces it). Scores
    returned by ``similarity_search_with_score`` are m3search's fused scores, higher is better.
    """

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
        check_search_args(4, mode, fusion, weights, candidates, None)  # before a location is created
        self.collection = open_backend(collection, location, model=model, api_key=api_key, **create_settings)
        self.mode, self.fusion, self.candidates = mode, fusion, candidates
        self.weights = None if weights is None else tuple(weights)

    def __repr__(self) -> str:
        return f"M3SearchVectorStore({self.collection!r}, mode={self.mode!r}, fusion={self.fusion!r})"

    @property
    def embeddings(self) -> Embeddings:
        """The collection's model as dense ``Embeddings`` (for code that asks a store for its embedder)."""
        return M3SearchEmbeddings(collection=self.collection)

    # --------------------------------------------------------------------- writes
    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Encode and store ``texts`` (upsert by id); ids missing, None or ``[]`` (none given, as LangChain's
        ``InMemoryVectorStore`` reads it) are generated."""
        if kwargs:
            raise TypeError(f"add_texts got unsupported argument(s) {sorted(kwargs)}")
        texts = as_list(texts)
        ids = _given(ids) or [None] * len(texts)
        if len(ids) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
        ids = [i if i else uuid.uuid4().hex for i in ids]
        if not texts:
            return []
        return list(self.collection.upsert(texts, ids=ids, metadata=metadatas))

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """LangChain's, but ``ids=None`` or ``[]`` is none given, so each document's own ``id`` is used (or one
        generated), as ``InMemoryVectorStore`` does; the base class passed them on and dropped the documents' ids."""
        ids = _given(kwargs.pop("ids", None))
        if ids:
            kwargs["ids"] = ids
        return super().add_documents(documents, **kwargs)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete by id (unknown ids are ignored); ``ids=None`` deletes every document."""
        if kwargs:
            raise TypeError(f"delete got unsupported argument(s) {sorted(kwargs)}")
        if ids is None:
            delete_matching(self.collection, None)
        elif ids:
            self.collection.delete(as_list(ids))
        return True

    # --------------------------------------------------------------------- reads
    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [
            Document(page_content=r.text, metadata=r.metadata, id=r.id) for r in self.collection.get(as_list(ids)) if r
        ]

    def _search(self, query: str, k: int, kwargs: dict[str, Any]) -> list[Any]:
        defaults = {"mode": self.mode, "fusion": self.fusion, "weights": self.weights, "candidates": self.candidates}
        args = _search_args({**defaults, "filter": None}, {**kwargs, "k": k}, type(self).__name__)
        return self.collection.search(query, **args)

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """The ``k`` best documents; ``filter``, ``mode``, ``fusion``, ``weights``, ``candidates`` per call."""
        return [_document(h, details=False) for h in self._search(query, k, kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """Documents with m3search's fused score (higher is more similar)."""
        return [(_document(h, details=False), float(h.score)) for h in self._search(query, k, kwargs)]

    def _relevance_fn(self, kwargs: dict[str, Any]) -> Callable[[float], float]:
        """Scores -> relevance in [0, 1] for a search with ``kwargs``: the cosine itself for dense mode
        with weighted fusion (LangChain's 1 - cosine distance); any other mode or fusion has no bound."""
        from m3search.collection import SEARCH_DEFAULTS, request_defaults
        from m3search.plan import parse_mode

        given = {"mode": self.mode, "fusion": self.fusion, "weights": self.weights, **kwargs}  # None per call wins
        # the search's own rule; the untuned fusion is the built-in one (create takes none; a server's /info
        # does not show what the collection had before tuning)
        mode, fusion, _ = request_defaults(
            self.collection.search_defaults(), lambda: SEARCH_DEFAULTS, given["mode"], given["fusion"], given["weights"]
        )
        if parse_mode(mode) == ("dense",) and fusion == "weighted":  # as the search reads it: "DENSE" is dense
            return lambda score: score
        raise NotImplementedError(
            f"relevance scores in [0, 1] exist for mode='dense' with fusion='weighted' (cosine) only; mode={mode!r}, "
            f"fusion={fusion!r} gives unbounded scores: use similarity_search_with_score, or mode='dense'"
        )

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return self._relevance_fn({})

    def _similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Relevance of the search actually run: a per-call ``mode`` / ``fusion`` decides, not only the store's."""
        fn = self._relevance_fn(kwargs)
        return [(doc, fn(score)) for doc, score in self.similarity_search_with_score(query, k, **kwargs)]

    async def _asimilarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The sync method in a thread: LangChain's base async path takes the store-wide
        ``_select_relevance_score_fn()`` and would pass fused scores of a per-call mode off as relevances."""
        return await run_in_executor(None, self._similarity_search_with_relevance_scores, query, k, **kwargs)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        raise NotImplementedError(
            "M3SearchVectorStore searches by query text (its model encodes all three representations); "
            "use similarity_search(query)"
        )

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, **kwargs: Any):
        raise NotImplementedError(
            "maximal marginal relevance (MMR) is not implemented by M3SearchVectorStore; "
            "use similarity search (search_type='similarity')"
        )

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any):
        self.max_marginal_relevance_search("", k)

    async def amax_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, **kwargs: Any):
        self.max_marginal_relevance_search(query, k)

    def as_retriever(self, **kwargs: Any) -> VectorStoreRetriever:
        """LangChain's ``VectorStoreRetriever`` over this store (``search_type='mmr'`` raises at once)."""
        if kwargs.get("search_type") == "mmr":
            self.max_marginal_relevance_search("", 1)
        return super().as_retriever(**kwargs)

    # --------------------------------------------------------------------- constructors
    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        collection: Any = None,
        location: str | os.PathLike | None = None,
        model: Any = None,
        **kwargs: Any,
    ) -> M3SearchVectorStore:
        """A store over ``collection`` / ``location`` (see the class), with ``texts`` added.

        ``embedding`` may be an :class:`M3SearchEmbeddings` or None; another ``Embeddings`` is an
        error, since the collection encodes with BGE-M3. Without ``collection`` / ``location``, an
        embedding over a collection stores into that collection; with a new ``location``, the
        embedding's model (its encoder, its collection's, or its ``model_name``) creates it.
        """
        if embedding is not None:
            if not isinstance(embedding, M3SearchEmbeddings):
                raise ValueError(
                    f"M3SearchVectorStore encodes with its collection's BGE-M3 model; got {type(embedding).__name__} "
                    "(pass M3SearchEmbeddings, or embedding=None and model=...)"
                )
            if collection is None and location is None and embedding.collection is not None:
                collection = embedding.collection
            elif model is None and collection is None:
                model = _model_of(embedding)
        store = cls(collection, location=location, model=model, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store


def _given(ids: str | Iterable[str | None] | None) -> list[str | None]:
    """The ids a write was given as a list; ``[]`` for None or an empty list, both "no ids" to LangChain's own
    ``InMemoryVectorStore`` (it generates them, or takes each document's)."""
    return [] if ids is None else as_list(ids)


def _model_of(embedding: M3SearchEmbeddings) -> Any:
    """What creates a collection with ``embedding``'s model (None: nothing given, the caller's error says so)."""
    if embedding.collection is not None:
        if is_remote(embedding.collection):
            raise ValueError(
                "an M3SearchEmbeddings over a server has no local model to create a collection with: pass model="
            )
        return embedding.collection.encoder
    return embedding.encoder or embedding.model_name or os.environ.get("M3SEARCH_MODEL") or None
