"""What both framework integrations share: where the documents live and how a hit is described.

A *backend* is a :class:`~m3search.Collection` (embedded folder or any engine URL) or a
:class:`~m3search.client.M3SearchClient` (a running ``m3search serve``): both answer
``search``, ``upsert``, ``delete``, ``get`` and ``count`` with the same types, so the
integrations never ask which one they hold.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: Key of the metadata entry that carries m3search's scores (and best passage) on retrieved documents.
SCORES_KEY = "m3search"

#: Ids removed per round by :func:`delete_matching` (the server's default ``max_k``; a server set lower says so).
_ROUND = 1000


def open_backend(
    collection: Any = None,
    location: str | os.PathLike | None = None,
    *,
    model: Any = None,
    api_key: str | None = None,
    **create_settings: Any,
) -> Any:
    """The backend given, or the one at ``location``.

    ``location``: ``http(s)://...`` is a running ``m3search serve``; anything else is a
    collection location (folder, ``qdrant://``, ``milvus://``, ...), opened if it exists,
    else created for ``model`` with ``create_settings``.
    """
    if (collection is None) == (location is None):
        raise ValueError("give exactly one of collection= (a Collection or M3SearchClient) and location=")
    location = None if location is None else os.fspath(location)
    remote = location is not None and is_server_url(location)
    if create_settings and (collection is not None or remote):
        raise TypeError(f"collection settings {sorted(create_settings)} apply only when a location is created")
    if model is not None and (collection is not None or remote):
        raise TypeError("model= applies to a collection location; a Collection or a server has its model")
    if api_key is not None and not remote:
        raise TypeError("api_key= applies to an http(s):// server location")
    if collection is not None:
        missing = [m for m in ("search", "upsert", "delete", "get") if not callable(getattr(collection, m, None))]
        if missing:
            raise TypeError(
                f"collection must be an m3search Collection or M3SearchClient, not {type(collection).__name__}"
            )
        return collection
    if remote:
        from m3search.client import M3SearchClient

        return M3SearchClient(location, api_key=api_key)
    from m3search import Collection

    if Collection.exists(location):
        if create_settings:
            raise TypeError(
                f"a collection exists at {location}: settings {sorted(create_settings)} apply only when creating one"
            )
        return Collection.open(location, model=model)
    return Collection.create(location, model=model, **create_settings)


def is_server_url(location: str) -> bool:
    """Whether ``location`` names a running ``m3search serve`` (``http(s)://...``), not a collection."""
    return location.startswith(("http://", "https://"))


def refuse_unknown(model_cls: Any, given: dict[str, Any]) -> None:
    """Keyword arguments a pydantic-based constructor does not know raise ``TypeError``, as a Python
    function's do: left to pydantic they would be ignored (LlamaIndex's models) or raise a
    ``ValidationError``, a ``ValueError`` (``extra="forbid"``)."""
    known = set()
    for name, field in model_cls.model_fields.items():
        known.add(name)
        known.update(a for a in (field.alias, field.validation_alias) if isinstance(a, str))
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{model_cls.__name__} got unexpected keyword argument(s) {unknown}")


def is_remote(backend: Any) -> bool:
    from m3search.client import M3SearchClient

    return isinstance(backend, M3SearchClient)


def check_search_args(k: int, mode: str | None, fusion: str | None, weights: Any, candidates: Any, filter: Any) -> None:
    """Validate search arguments when a retriever is built, with the library's own errors.

    ``None`` (mode, fusion, weights, candidates) is the collection's default at search time,
    which ``m3search tune`` may have set; the values given are checked against the built-in ones.
    """
    from m3search.plan import SearchPlan

    SearchPlan.build(
        k=k,
        mode="all" if mode is None else mode,
        fusion="weighted" if fusion is None else fusion,
        weights=weights,
        candidates=candidates,
        filter=filter,
    )


def hit_details(hit: Any) -> dict[str, Any]:
    """The ``m3search`` metadata entry of a retrieved document: fused score, per-mode scores,
    and the best passage / window when the collection reports one."""
    out: dict[str, Any] = {"id": hit.id, "score": float(hit.score), "scores": dict(hit.scores)}
    for name in ("passage", "window"):
        value = getattr(hit, name, None)
        if value is not None:
            out[name] = value
    return out


def as_list(values: str | Iterable[Any]) -> list[Any]:
    """Texts or ids as a list, a lone string as one item, as the library takes it. Why: ``list("abc")`` is
    ``["a", "b", "c"]``, so ``delete("abc")`` deleted documents ``a``, ``b`` and ``c``, and ``add_texts("hi")``
    stored two one-letter documents."""
    return [values] if isinstance(values, str) else list(values)


def dense_vectors(backend: Any, texts: str | Sequence[str]) -> np.ndarray:
    """Dense vectors ``(n, d)`` float32, from the backend's model (loaded here or on the server)."""
    texts = as_list(texts)
    if hasattr(backend, "embed"):  # M3SearchClient: POST /v1/embeddings
        return backend.embed(texts)
    encoder = getattr(backend, "encoder", backend)  # a Collection, or an M3Encoder itself
    return encoder.encode(texts, dense=True, sparse=False, colbert=False).dense


def delete_matching(backend: Any, filter: Any) -> list[str]:
    """Delete every document matching ``filter`` (None: all); returns their ids.

    The public API has no "ids matching a filter" (no scroll, no delete by filter), so this
    deletes the hits of filtered dense searches until one finds nothing. The search is exact
    (a full scan), so each round finds up to ``_ROUND`` matches (fewer on a server whose ``max_k`` is lower).
    """
    gone: list[str] = []
    seen: set[str] = set()
    k = min(_ROUND, int(backend.limits.get("max_k", _ROUND))) if is_remote(backend) else _ROUND
    while True:
        hits = backend.search("*", k=k, mode="dense", filter=filter, exact=True)
        ids = [h.id for h in hits if h.id not in seen]
        if not ids:
            if hits:
                raise RuntimeError(f"documents {[h.id for h in hits][:5]} were deleted but are still found")
            return gone
        backend.delete(ids)
        seen.update(ids)
        gone += ids
