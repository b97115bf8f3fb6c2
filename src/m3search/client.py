"""A collection served by ``m3search serve``, used from Python over HTTP.

Why: a RAG application should not have to load the model (GBs, seconds) in each of its
processes, and an embedded collection admits one process anyway. :class:`M3SearchClient`
speaks the server's routes and answers with the library's own types (:class:`~m3search.Hit`,
:class:`~m3search.collection.Record`), so code written against :class:`~m3search.Collection`
(the LangChain and LlamaIndex integrations among it) runs against a server unchanged.

Requests larger than the server's ``max_batch`` (items) or ``max_body_bytes`` (JSON body) are
split; each part is one server write, so a failure part-way leaves the earlier parts stored (an
embedded ``Collection.add`` batch has the same grain). A document too large for any request is
refused before anything is sent (:class:`~m3search.errors.RequestTooLargeError`, a ``ValueError``).
A search's or a write's arguments are checked by the library's own checks before any request, so a bad one
raises exactly what :class:`~m3search.Collection` raises. Errors keep the library's types: a bad value is
``ValueError``, a ``k`` or ``candidates`` over the server's (lower) limit ``LimitExceededError``, an existing id
:class:`~m3search.errors.DuplicateIdError` (a ``ValueError``, as from ``Collection.add``), an id
another client of a server collection is writing :class:`~m3search.errors.WriteConflictError`, every other
error the answer names by its library class (``error.code``: the server's damaged, unreadable or read-only files,
too little disk, a write stopped by its shutdown) that class (so a server's read-only or unreadable collection is
a ``PermissionError`` too, as in-process, and too little disk an ``OSError``: a RuntimeError before), a
wrong key ``PermissionError`` without a library class, an unreachable server ``ConnectionError``, as is a 404 that is not the
API's unknown-id answer (it names the ids): a wrong base URL such as ``.../v1``, or a server older than
this client (its unknown-id answer named none); the message says which route answered what.
A server that is busy (429: its queue is full, nothing was done) is asked again after its
``Retry-After``, ``retries`` times, then ``RuntimeError``; so is one whose encoder did not start a
read (search, count, get, embed) in time (503), never a write, which may have stored part of its documents.
"""

from __future__ import annotations

import base64
import json
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from m3search import errors
from m3search.errors import ID_ERRORS, IngestInterrupted, RequestTooLargeError
from m3search.plan import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, LimitExceededError, check_api_key

__all__ = ["M3SearchClient"]

#: The library's errors an answer names (``error.code``: the class's name), raised again as the same class.
_LIBRARY_ERRORS: dict[Any, type] = {name: getattr(errors, name) for name in errors.__all__}  # every error class


def _record(d: dict) -> Any:
    """A document of an answer as the library's Record."""
    from m3search.collection import Record

    return Record(id=d["id"], text=d["text"], metadata=d.get("metadata") or {})


def _library_error(cls: type, message: str, ids: list | None) -> Exception:
    """The library's error ``cls`` as the server raised it: with its ``ids`` where it carries them."""
    if cls is IngestInterrupted:
        return cls(message, ids or [], len(ids or []))  # the call's total: :meth:`M3SearchClient._write` knows it
    if cls in ID_ERRORS:
        return cls(message, ids or [])
    return cls(message)


def _json_bytes(value: Any) -> bytes:
    """``value`` as the request body sent (what the server's ``max_body_bytes`` counts): one
    serialization for both sending and measuring, so the split is exact."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _retry_after(value: str | None) -> float:
    """Seconds to wait before asking a busy server again (its ``Retry-After``, within 0.05-30 s)."""
    try:
        return min(30.0, max(0.05, float(value)))
    except (TypeError, ValueError):
        return 1.0


def _search_options(
    k: Any, mode: Any, fusion: Any, weights: Any, candidates: Any, filter: Any, explain: Any, exact: Any, group: Any
) -> dict[str, Any]:
    """A search's arguments checked by the library's checks, in its order, as the JSON the server takes (mode,
    fusion, weights, candidates left None are left out: the served collection's defaults)."""
    from m3search.filters import to_json
    from m3search.plan import SearchPlan, check_bool, check_group

    check_group(group, explain)
    exact = check_bool("exact", exact)
    given = {"mode": mode, "fusion": fusion, "weights": weights, "candidates": candidates}
    given = {key: value for key, value in given.items() if value is not None}
    plan = SearchPlan.build(k=k, filter=filter, explain=explain, **given)
    body: dict[str, Any] = {"k": plan.k, "explain": plan.explain, "group": group, **given}
    if exact:  # only when asked: a server older than exact refuses the field (422)
        body["exact"] = True
    if fusion is not None:  # by its lower-case name, which a server older than any case takes too
        body["fusion"] = plan.fusion
    if weights is not None:  # as checked: plain floats and ints (NumPy's are not JSON)
        body["weights"] = list(plan.weights)
    if candidates is not None:
        body["candidates"] = int(candidates)
    if plan.filter is not None:
        body["filter"] = to_json(plan.filter)
    return body


def _hits(answer: list[dict]) -> list:
    """A search answer's hits as the library's :class:`~m3search.Hit` objects."""
    from m3search.collection import Hit

    hits = []
    for h in answer:
        hit = Hit(
            id=h["id"],
            score=h["score"],
            text=h.get("text") or "",
            metadata=h.get("metadata") or {},
            scores=h.get("scores") or {},
            explain=h.get("explain"),
            window=h.get("window"),
        )
        for key, value in h.items():  # fields a newer server adds stay readable
            if not hasattr(hit, key):
                setattr(hit, key, value)
        hits.append(hit)
    return hits


class M3SearchClient:
    """Talk to ``m3search serve`` at ``url``.

    >>> client = M3SearchClient("http://127.0.0.1:8000", api_key="secret")   # doctest: +SKIP
    >>> [h.id for h in client.search("boundary layer", k=3, mode="all")]       # doctest: +SKIP

    ``http_client``: an ``httpx.Client`` to use instead of a new one (tests pass FastAPI's
    ``TestClient``; applications may pass one with their own timeouts or proxies).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        http_client: Any = None,
        retries: int = 3,
    ) -> None:
        try:
            import httpx
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("M3SearchClient needs httpx: pip install 'm3search[server]'") from None
        # checked here: a bad value failed deep inside the first request (-1: UnboundLocalError, 2.5: range)
        if isinstance(retries, bool) or not isinstance(retries, numbers.Integral):
            raise TypeError(f"retries must be an integer >= 0, not {type(retries).__name__}")
        if retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries}")
        self.url = url.rstrip("/")
        # sent with each request: a caller's http_client is borrowed, its own headers are not ours to change
        self._auth = {"Authorization": f"Bearer {check_api_key(api_key)}"} if api_key else {}
        if http_client is None:
            http_client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=5.0))
        self._http = http_client
        self._limits: dict[str, Any] | None = None
        self._get_route = True  # POST /documents/get: False once a server older than it answered 405
        self.retries = int(retries)

    def __repr__(self) -> str:
        return f"M3SearchClient({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> M3SearchClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------- transport
    def _call(self, method: str, path: str, *, idempotent: bool = False, new: bool = False, **kwargs: Any) -> Any:
        """One API call; busy answers are asked again after their ``Retry-After``, ``retries`` times:
        429 (the queue was full: nothing was done) always; 503 (the encoding did not start in time)
        only for an ``idempotent`` call (GET, search, embed), since a write may have stored part of
        its documents before the batch that timed out. ``new``: a route older servers lack, None where the
        server answers 405 (so the caller can ask as older servers are asked)."""
        import httpx

        kwargs["headers"] = {**kwargs.get("headers", {}), **self._auth}
        if "json" in kwargs:
            kwargs["content"] = _json_bytes(kwargs.pop("json"))
            kwargs["headers"]["Content-Type"] = "application/json"
        idempotent = idempotent or method == "GET"
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise ConnectionError(f"m3search server at {self.url} did not answer: {exc}") from None
            status = response.status_code
            busy = status == 429 or (status == 503 and idempotent and "Retry-After" in response.headers)
            if not busy or attempt == self.retries:
                break
            time.sleep(_retry_after(response.headers.get("Retry-After")))
        if new and response.status_code == 405:
            return None
        if response.status_code < 400:
            try:
                answer = response.json()
            except ValueError:  # e.g. a proxy's HTML login page
                answer = None
            if not isinstance(answer, dict):  # every answer of this API is a JSON object
                raise self._not_the_api(response, "not a JSON object")
            return answer
        try:
            error = response.json()["error"]
            message = str(error["message"])
        except (ValueError, KeyError, TypeError):
            error, message = {}, response.text[:300]
        if response.status_code == 404 and not isinstance(error.get("ids"), list):
            # only the server's unknown-id answer names ids; any other 404 (a wrong base URL such as
            # ".../v1", another service, an older server) must not read as "no such document"
            if not error:
                raise self._not_the_api(response, "not the API's unknown-id answer")
            request = response.request
            raise ConnectionError(
                f"m3search server {self.url}: {request.method} {request.url} answered {message!r} (HTTP 404) without "
                "the ids of the API's unknown-id answer (error.ids), so a missing document cannot be told from a "
                f"missing route: {self.url} is not the server's root (e.g. it ends in /v1), or the server is older "
                "than this client (upgrade it)"
            )
        message = f"m3search server {self.url}: {message} (HTTP {response.status_code})"
        if response.status_code == 401:
            raise PermissionError(message)
        if response.status_code == 404:  # the unknown-id answer (get turns it into None)
            raise KeyError(message)
        ids = error.get("ids") if isinstance(error.get("ids"), list) else None
        if (typed := _LIBRARY_ERRORS.get(error.get("code"))) is not None:  # the library's own error, by its name
            raise _library_error(typed, message, ids)
        if response.status_code == 413:  # k or candidates over the server's limit (the library's error there)
            raise LimitExceededError(message)
        if response.status_code < 500 and response.status_code != 429:
            raise ValueError(message)
        raise RuntimeError(message)

    def _not_the_api(self, response: Any, why: str) -> ConnectionError:
        """The error for an answer the m3search API never gives: the URL serves something else."""
        request, text = response.request, " ".join(response.text.split())[:200]
        kind = response.headers.get("content-type", "no content type")
        return ConnectionError(
            f"no m3search API at {self.url}: {request.method} {request.url} answered HTTP {response.status_code} "
            f"({kind}: {text!r}), {why}"
        )

    @property
    def limits(self) -> dict[str, Any]:
        """The server's limits (``max_batch``, ``max_k``, ...), from ``GET /info``, read once."""
        if self._limits is None:
            self._limits = dict(self.info().get("limits", {}))
        return self._limits

    @property
    def max_batch(self) -> int:
        """Most texts / queries / documents / ids per request, as the server reports it."""
        return int(self.limits.get("max_batch", DEFAULT_MAX_BATCH))

    @property
    def max_body_bytes(self) -> int:
        """Largest request body, in bytes, as the server reports it."""
        return int(self.limits.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES))

    def _parts(self, items: list, envelope: dict[str, Any], key: str, name: Callable[[int], str]) -> list[list]:
        """``items`` cut into consecutive parts, each sent as ``{**envelope, key: part}`` within the
        server's ``max_batch`` and ``max_body_bytes`` (a count alone let 256 documents of 70 KB
        fail with 413, after earlier parts were stored). An item that fits in no request is a
        :class:`~m3search.errors.RequestTooLargeError` (a ``ValueError``) naming it (``name(i)``) and the size of the
        rest of its request (a search's filter can be most of it), raised before anything is sent."""
        batch, limit = self.max_batch, self.max_body_bytes
        base = len(_json_bytes({**envelope, key: []}))
        parts: list[list] = []
        part: list = []
        size = base
        for i, item in enumerate(items):
            n = len(_json_bytes(item))
            if base + n > limit:
                raise RequestTooLargeError(
                    f"{name(i)} is {n:,} bytes as JSON ({base + n:,} with the rest of its request): more than the "
                    f"server at {self.url} accepts in one request (max_body_bytes {limit:,}); nothing was sent"
                )
            if part and (len(part) >= batch or size + 1 + n > limit):  # + 1: the comma
                parts.append(part)
                part, size = [], base
            size += n + (1 if part else 0)
            part.append(item)
        if part:
            parts.append(part)
        return parts

    # ---------------------------------------------------------------------- reads
    def info(self) -> dict:
        """``GET /info``: model, limits, and the served collection's counts and settings."""
        return self._call("GET", "/info")

    def count(self, filter: Any = None) -> int:
        """Number of documents (matching ``filter``: ``POST /count``). Without a filter ``GET /info`` counts them,
        so an older server, which has no ``/count``, still answers."""
        from m3search.filters import parse_filter, to_json

        checked = parse_filter(filter)  # the library's errors, before any request
        if checked is not None:
            return int(self._call("POST", "/count", json={"filter": to_json(checked)}, idempotent=True)["count"])
        collection = self.info().get("collection")
        if collection is None:
            raise ValueError(f"the server at {self.url} serves no collection (start it with --collection DIR)")
        return int(collection.get("count", 0))

    def search_defaults(self) -> dict[str, Any]:
        """What a search without mode / fusion / weights / candidates uses: the served collection's
        defaults (as :meth:`m3search.Collection.search_defaults`), from ``GET /info``."""
        from m3search.collection import SEARCH_DEFAULTS

        collection = self.info().get("collection")
        if collection is None:
            raise ValueError(f"the server at {self.url} serves no collection (start it with --collection DIR)")
        settings = collection.get("settings") or {}
        return {key: settings.get(key, value) for key, value in SEARCH_DEFAULTS.items()}

    def __len__(self) -> int:
        return self.count()

    def get(self, ids: str | Sequence[str]) -> list:
        """Stored documents in input order; None for unknown ids (``POST /documents/get``, in parts of the server's
        ``max_batch``; a server older than it: one ``GET /documents/{id}`` each)."""
        from m3search.collection import Record, _as_id_list

        ids = _as_id_list(ids)
        out: list[Record | None] = []
        if not ids:
            return out
        if not self._get_route:
            return self._get_each(ids)
        for part in self._parts(ids, {}, "ids", lambda j: f"id {ids[j][:80]!r}"):
            answer = self._call("POST", "/documents/get", json={"ids": part}, idempotent=True, new=True)
            if answer is None:  # an older server: asked as before, from now on
                self._get_route = False
                return out + self._get_each(ids[len(out) :])
            out += [None if d is None else _record(d) for d in answer["documents"]]
        return out

    def _get_each(self, ids: list[str]) -> list:
        from urllib.parse import quote

        out: list = []
        for doc_id in ids:
            try:
                # dots escaped too: an id "." or ".." would otherwise be a dot segment, removed from the path
                d = self._call("GET", f"/documents/{quote(doc_id, safe='').replace('.', '%2E')}")
            except KeyError:
                out.append(None)
                continue
            out.append(_record(d))
        return out

    def search(
        self,
        query: str,
        *,
        k: int = 10,
        mode: str | None = None,
        fusion: str | None = None,
        weights: Sequence[float] | None = None,
        candidates: int | None = None,
        filter: Any = None,
        explain: bool = False,
        exact: bool = False,
        group: str = "document",
    ) -> list:
        """``POST /search``; the same arguments and hits as :meth:`m3search.Collection.search`
        (mode, fusion, weights, candidates left None: the served collection's defaults)."""
        from m3search.plan import check_query

        check_query(query)  # the library's errors, in its order, before any request
        options = _search_options(k, mode, fusion, weights, candidates, filter, explain, exact, group)
        return _hits(self._call("POST", "/search", json={"query": query, **options}, idempotent=True)["hits"])

    def search_batch(
        self,
        queries: Sequence[str],
        *,
        k: int = 10,
        mode: str | None = None,
        fusion: str | None = None,
        weights: Sequence[float] | None = None,
        candidates: int | None = None,
        filter: Any = None,
        explain: bool = False,
        exact: bool = False,
        group: str = "document",
    ) -> list[list]:
        """``POST /search/batch``; one hit list per query, as :meth:`m3search.Collection.search_batch` (queries
        over the server's ``max_batch`` or ``max_body_bytes`` are sent in parts, each encoded together)."""
        from m3search.plan import check_queries

        queries = check_queries(queries)
        options = _search_options(k, mode, fusion, weights, candidates, filter, explain, exact, group)
        if not queries:  # as the library: the arguments checked, nothing to search
            return []
        out: list[list] = []
        for part in self._parts(queries, options, "queries", lambda j: f"queries[{j}]"):
            answer = self._call("POST", "/search/batch", json={**options, "queries": part}, idempotent=True)
            out += [_hits(hits) for hits in answer["hits"]]
        return out

    # ---------------------------------------------------------------------- writes
    def add(
        self, texts: str | Sequence[str], ids: Sequence[str] | None = None, metadata: Sequence[dict] | None = None
    ) -> list[str]:
        """``POST /documents``: new documents (an existing id is a ValueError); returns the ids."""
        return self._write(texts, ids, metadata, upsert=False)

    def upsert(
        self, texts: str | Sequence[str], ids: Sequence[str] | None = None, metadata: Sequence[dict] | None = None
    ) -> list[str]:
        """``POST /documents`` with ``upsert: true``: add or overwrite; returns the ids."""
        return self._write(texts, ids, metadata, upsert=True)

    def _write(self, texts: Any, ids: Any, metadata: Any, *, upsert: bool) -> list[str]:
        from m3search.collection import _check_documents

        # the library's errors, for the whole call before anything is sent: the server sees one part at a time
        texts, ids, meta = _check_documents(texts, ids, metadata)
        docs = [
            {"text": t, "metadata": m, **({"id": ids[j]} if ids is not None else {})}
            for j, (t, m) in enumerate(zip(texts, meta))
        ]
        envelope = {"upsert": upsert}
        name = (lambda j: f"document {ids[j]!r}") if ids is not None else (lambda j: f"document {j} (texts[{j}])")
        out: list[str] = []
        for part in self._parts(docs, envelope, "documents", name):
            try:
                out += self._call("POST", "/documents", json={**envelope, "documents": part})["ids"]
            except IngestInterrupted as exc:  # what the whole call wrote: the earlier parts too
                written = out + exc.ids
                raise IngestInterrupted(
                    f"{exc} (of this call's {len(docs)} documents, the first {len(written)} were written)",
                    written,
                    len(docs),
                ) from None
        return out

    def delete(self, ids: str | Sequence[str]) -> dict[str, list[str]]:
        """``DELETE /documents``; returns ``{"deleted": [...], "missing": [...]}``."""
        from m3search.collection import _as_id_list

        ids = list(dict.fromkeys(_as_id_list(ids)))
        out: dict[str, list[str]] = {"deleted": [], "missing": []}
        for part in self._parts(ids, {}, "ids", lambda j: f"id {ids[j][:80]!r}"):
            answer = self._call("DELETE", "/documents", json={"ids": part})
            out["deleted"] += answer["deleted"]
            out["missing"] += answer["missing"]
        return out

    # ---------------------------------------------------------------------- embeddings
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Dense vectors ``(n, d)`` float32 from ``POST /v1/embeddings`` (base64 on the wire)."""
        from m3search.plan import check_texts

        texts = check_texts(texts)
        rows: list[np.ndarray] = []
        envelope = {"encoding_format": "base64"}
        for part in self._parts(texts, envelope, "input", lambda j: f"texts[{j}]"):
            data = self._call("POST", "/v1/embeddings", json={**envelope, "input": part}, idempotent=True)["data"]
            for item in sorted(data, key=lambda d: d["index"]):
                rows.append(np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4"))
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)
