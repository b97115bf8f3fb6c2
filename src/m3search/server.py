"""HTTP service: OpenAI-compatible embeddings, all three M3 outputs, and a collection to search.

Why it looks like this: the app is a thin shell over :class:`m3search.M3Encoder` and
:class:`m3search.Collection` (datasette's rule), built by :func:`create_app` so tests and
``m3search serve`` run the same code. FastAPI conventions throughout: typed pydantic
models, the API key as a dependency on every route but ``/health``, the model loaded in
``lifespan``, settings from ``create_app``'s argument or a getter (``get_settings``) that tests override. Every
forward pass runs on one batching worker (:mod:`m3search.batching`): embedding and search
requests at interactive priority, ``/documents`` ingest (windows included, through the
collection's :class:`~m3search.batching.BatchedEncoder`) in background rounds behind them,
written in small batches between queries; its indexes are built when ingest pauses
(:class:`DeferredOptimize`).

Errors have one shape everywhere, ``{"error": {"type": ..., "message": ...}}``: request
validation -> 422, bad values caught by the library -> 400, unknown API key -> 401,
unknown document -> 404, duplicate ids or ids another client is writing -> 409, body, batch, ``k``, ``candidates`` or filter over
its limit -> 413; each route's OpenAPI entry lists the statuses it returns (``_errors``). Request models
are strict (``true`` is not an integer, ``"yes"`` not a boolean). A bug still answers the same shape with
500 and no stack trace (the log keeps it).

One process owns an embedded collection. ``serve`` (or uvicorn running the app itself) records its address in
``<collection>/server.json`` (pid, host, port, url, whether a key is needed) so the CLI
can route other commands through this server while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Annotated, Any, Literal

try:
    from fastapi import APIRouter, Depends, FastAPI, Request, Security
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
    from starlette.convertors import PathConvertor, register_url_convertor
    from starlette.exceptions import HTTPException
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("the HTTP server needs FastAPI and uvicorn: pip install 'm3search[server]'") from None

from . import serverfile
from .batching import BACKGROUND, BatchedEncoder, Batcher, ClientGone, QueueFull, RequestTimeout
from .errors import (
    ID_ERRORS,
    CollectionDamagedError,
    CollectionReadOnlyError,
    CollectionUnreadableError,
    DuplicateIdError,
    IngestInterrupted,
    InsufficientStorageError,
    M3SearchError,
    UnknownIdError,
    WriteConflictError,
)
from .filters import FilterTooComplexError
from .metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from .plan import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SEARCH_TIMEOUT,
    DEFAULT_SERVER_MAX_K,
    FUSIONS,
    GROUPS,
    MAX_CANDIDATES,
    MAX_K,
    PRESETS,
    DeadlineExceeded,
    LimitExceededError,
    check_api_key,
    check_device,
    check_dtype,
    check_fusion,
    check_limit,
    check_queries,
    check_text,
    deadline,
    repeated,
    timeout_fault,
)
from .tei import TextOrTexts
from .tei import make_router as tei_router

__all__ = ["Settings", "get_settings", "create_app", "serve", "error_body"]

log = logging.getLogger("m3search.server")


#: Documents per engine write of a /documents request: a query arriving mid-write waits for it (measured
#: without flush: 8 proxy documents 34 ms, the GIL held for up to 13 ms of it; 4 vs 8 with 20 vs 30 ms
#: background rounds: /search p95 during a 2,000-document ingest 154 vs 192 ms at the same ingest rate).
INGEST_WRITE_BATCH = 4


# ---------------------------------------------------------------------------------------------- settings


#: The integer limits of :class:`Settings`: each from 1 to this (None: no bound of its own). ``from_env`` reads all but
#: ``max_candidates`` from ``M3SEARCH_<NAME>``.
_LIMITS: dict[str, int | None] = {
    "max_batch": None,
    "max_body_bytes": None,
    "max_k": MAX_K,
    "max_candidates": None,
    "max_queue": None,
}


#: The time limits of :class:`Settings`, in seconds: each by the batcher's rule (:func:`~m3search.plan.timeout_fault`).
_TIMEOUTS = ("request_timeout", "search_timeout")


def _wrong(name: str, value: Any) -> str | None:
    """What makes ``value`` no value of the limit or time limit ``name``, or None."""
    if name in _TIMEOUTS:
        return timeout_fault(value)
    if value < 1:
        return "is not a positive integer"
    most = _LIMITS[name]
    return f"is over {most}" if most is not None and value > most else None


def _number(name: str, raw: str) -> int | float:
    """A limit or time limit from its variable's text: ValueError quoting the text, unless it is one."""
    try:
        value = (float if name in _TIMEOUTS else int)(raw)
    except ValueError:
        value = 0
    if wrong := _wrong(name, value):
        raise ValueError(f"{raw!r} {wrong}")
    return value


#: The settings ``from_env`` reads, each from ``M3SEARCH_<NAME>``, with how the variable's text becomes its value (a
#: ValueError: the variable is refused, named). ``max_candidates`` is set in code only.
_VARIABLES: dict[str, Callable[[str], Any]] = {
    "collection": str,
    "model": str,
    "device": check_device,
    "dtype": check_dtype,
    "api_key": check_api_key,
    **{
        name: partial(_number, name)
        for name in ("max_batch", "max_body_bytes", "max_k", "max_queue", "request_timeout", "search_timeout")
    },
}


class EnvironmentSettingError(ValueError):
    """An ``M3SEARCH_*`` variable holds a value its setting cannot take (``m3search serve``: a usage error, as a bad
    option value is)."""


@dataclass(frozen=True)
class Settings:
    """Server settings. ``from_env`` reads ``M3SEARCH_*`` variables; CLI options override them."""

    collection: str | None = None
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    api_key: str | None = None
    #: Most texts (or queries, documents, ids) in one request.
    max_batch: int = DEFAULT_MAX_BATCH
    #: Largest request body accepted, in bytes.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Largest ``k`` a search may ask for (at most :data:`~m3search.plan.MAX_K`).
    max_k: int = DEFAULT_SERVER_MAX_K
    #: Largest ``candidates`` a search may ask for.
    max_candidates: int = MAX_CANDIDATES
    #: Most texts waiting for the encoder (beyond it: 429 with Retry-After).
    max_queue: int = DEFAULT_MAX_QUEUE
    #: Seconds a request may wait for its encoding to start (beyond it: 503).
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    #: Seconds one search may take, from arrival to answer (beyond it: 504, the work stops at its next stage).
    search_timeout: float = DEFAULT_SEARCH_TIMEOUT

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """The settings of ``uvicorn --factory`` and ``m3search serve`` alike: the one place ``M3SEARCH_*``
        variables become settings. ``overrides`` (``serve``'s options given on its command line; None: not given)
        win over the variables, the variables over the defaults. A variable that is set but empty counts as unset.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        values: dict[str, Any] = {}
        for name, read in _VARIABLES.items():
            var = f"M3SEARCH_{name.upper()}"
            if name not in given and (raw := os.environ.get(var)):
                try:
                    values[name] = read(raw)
                except ValueError as exc:
                    raise EnvironmentSettingError(f"{var}: {exc}") from None
        settings = cls(**(values | given))
        settings.check()
        return settings

    def check(self) -> None:
        for name in (*_LIMITS, *_TIMEOUTS):
            if wrong := _wrong(name, getattr(self, name)):
                raise ValueError(f"{name} {wrong}: {getattr(self, name)}")
        check_dtype(self.dtype)
        check_device(self.device)
        if self.api_key is not None:
            check_api_key(self.api_key)


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once (tests swap it via ``app.dependency_overrides``)."""
    return Settings.from_env()


def _settings_of(app: FastAPI) -> Settings:
    """A test's override of ``get_settings``, else the settings given to ``create_app``, else the environment's."""
    override = app.dependency_overrides.get(get_settings)
    if override is not None:
        return override()
    return app.state.settings if app.state.settings is not None else get_settings()


async def _request_settings(request: Request) -> Settings:
    """``get_settings`` (or its override) as a dependency that runs on the event loop: a plain ``def``
    dependency costs a thread-pool hop per request, and this one is a dict lookup."""
    return _settings_of(request.app)


# ---------------------------------------------------------------------------------------------- errors


def error_body(type_: str, message: str, ids: list[str] | None = None, code: str | None = None) -> dict:
    """The one JSON error shape of this API. ``ids``: the ids a library id error (unknown: 404,
    already stored: 409) is about, so a client tells "no such document" from "no such route"
    (both 404) without reading the message. ``code``: the library error's class name, so a client tells
    errors of one status apart (409: an id stored, or being written) without reading the message either."""
    detail: dict[str, Any] = {"type": type_, "message": message}
    if ids is not None:
        detail["ids"] = list(ids)
    if code is not None:
        detail["code"] = code
    return {"error": detail}


_STATUS_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    499: "client_closed_request",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
    507: "insufficient_storage",
}


#: ``Retry-After`` of a write refused or stopped by the server shutting down: a restart takes about this long.
SHUTDOWN_RETRY_AFTER_S = 5


#: The library's typed errors as HTTP statuses: the one place they are mapped (anything else
#: the library rejects with ValueError / TypeError is a 400).
_ERROR_STATUS: dict[type[Exception], int] = {
    DuplicateIdError: 409,
    WriteConflictError: 409,
    UnknownIdError: 404,
    InsufficientStorageError: 507,
    CollectionUnreadableError: 500,  # the server's files, not the request: nothing the client can change
    CollectionReadOnlyError: 500,  # the same (a part made read-only while served; the message says what was stored)
    CollectionDamagedError: 500,  # the same: the operator restores the named file from a copy
}


def _code(exc: Exception) -> str | None:
    """``error.code``: the class name of an error the library raised on purpose; None for any other."""
    return type(exc).__name__ if isinstance(exc, M3SearchError) else None


class ErrorDetail(BaseModel):
    type: str
    message: str
    ids: list[str] | None = Field(
        None,
        description="The ids an unknown-id (404) or existing-id (409) error is about; for a Milvus row-key "
        "collision (400), the new id and the stored one; for a write stopped by the server shutting down (503), the "
        "documents it wrote.",
    )
    code: str | None = Field(
        None,
        description="For an error the library raised on purpose, its class in `m3search.errors` (e.g. "
        "`DuplicateIdError`, `WriteConflictError`, `IdCollisionError`): what tells apart errors of one status.",
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


#: What each error status means in this API, in the one error shape: a route declares the statuses it returns
#: (``_errors``), and the OpenAPI schema describes them from here.
_ERROR_MEANINGS = {
    400: "Bad value",
    401: "Missing or wrong API key",
    404: "Unknown document id (`error.ids` names it)",
    409: "Conflict: an id already exists (add; use upsert), another client is writing one of the ids (nothing was "
    "changed: retry once its write has ended; `error.ids` names them), or this server serves no collection",
    413: "Body, batch, input, `k`, `candidates` or filter over its limit",
    422: "Malformed request",
    429: "Queue full, nothing was done: retry after `Retry-After`",
    500: "Internal error: a bug, or the collection's files can no longer be read or written by the server, or are "
    "damaged (the message names them, and what a failed write left stored)",
    503: "Busy: the encoding did not start in time (`Retry-After`); or the server is shutting down (`Retry-After`): a "
    "write stopped between its batches (`error.ids`: the documents written, each whole; the others were not), or a "
    "write or delete refused before it started (nothing done)",
    504: "The search ran over its time limit",
    507: "Too little free disk for the write (embedded collection)",
}
#: What a route that encodes may return beyond every route's errors: its texts wait in the batching queue.
_ENCODING = (429, 503)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route's error statuses (each ``ErrorResponse``, described once above)."""
    return {status: {"model": ErrorResponse, "description": _ERROR_MEANINGS[status]} for status in statuses}


#: Every API route's errors (the TEI routes' too).
_ERRORS = _errors(400, 401, 413, 422)


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's "There was an error parsing the body"
            message = "body is not valid JSON: nested too deeply"
        elif isinstance(exc.__cause__, ValueError):  # e.g. an integer of more than 4300 digits
            message = f"body is not valid JSON: {' '.join(str(exc.__cause__).split())[:200]}"
        return JSONResponse(
            error_body(_STATUS_TYPES.get(exc.status_code, "error"), message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":  # loc is ("body", char offset)
                where = err.get("loc", ())[-1]
                reason = (err.get("ctx") or {}).get("error", "invalid JSON")
                parts.append(f"body is not valid JSON: {reason} at character {where}")
                continue
            if isinstance(err.get("input"), bytes):  # FastAPI reads a body as JSON only when its Content-Type says so
                given = request.headers.get("content-type")
                sent = f"not {given[:100]!r}" if given else "none was given"
                parts.append(f"body: send it as JSON, with 'Content-Type: application/json' ({sent})")
                continue
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        more = len(exc.errors()) - 5
        message = "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
        return JSONResponse(error_body("invalid_request", message), status_code=422)

    @app.exception_handler(LimitExceededError)
    @app.exception_handler(FilterTooComplexError)
    async def over_limit(request: Request, exc: Exception):
        return JSONResponse(error_body("too_large", str(exc)), status_code=413)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(error_body("overloaded", str(exc)), status_code=429, headers=headers)

    @app.exception_handler(RequestTimeout)
    async def timed_out(request: Request, exc: RequestTimeout):
        return JSONResponse(error_body("unavailable", f"request {exc}"), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(IngestInterrupted)
    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, exc: IngestInterrupted | ShuttingDown):
        ids = getattr(exc, "ids", None)
        if ids:
            done = f"the first {len(ids)} of {exc.total} documents were written (error.ids), the others not at all"
        else:
            done = str(exc) if isinstance(exc, ShuttingDown) else "no document was written"
        message = f"the server is shutting down; {done}: send them again once it is back"
        headers = {"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)}
        return JSONResponse(error_body("unavailable", message, ids, _code(exc)), status_code=503, headers=headers)

    @app.exception_handler(DeadlineExceeded)
    async def over_time(request: Request, exc: DeadlineExceeded):
        return JSONResponse(error_body("timeout", str(exc)), status_code=504)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):  # nobody reads it: for the log and metrics
        return JSONResponse(error_body("client_closed_request", str(exc)), status_code=499)

    @app.exception_handler(M3SearchError)
    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    async def library_error(request: Request, exc: Exception):
        status = next((code for cls, code in _ERROR_STATUS.items() if isinstance(exc, cls)), 400)
        if status >= 500:  # the operator's to fix: in the server's log too
            log.error("%s %s: %s", request.method, request.url.path, exc)
        ids = exc.ids if isinstance(exc, ID_ERRORS) else None
        return JSONResponse(error_body(_STATUS_TYPES[status], str(exc), ids, _code(exc)), status_code=status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # pragma: no cover - a bug by definition
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error (see the server log)"), 500)


class BodyLimitMiddleware:
    """Pure ASGI middleware: refuse bodies over the limit (by Content-Length, else while streaming)."""

    def __init__(self, app, limit: Any):
        self.app = app
        self.limit = limit  # int or a callable returning int (resolved per request: settings can be overridden)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit() if callable(self.limit) else self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False
            if too_big:
                return await _send_json(
                    send, 413, error_body("too_large", f"request body exceeds the limit of {limit} bytes")
                )
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge as exc:
            if not started:
                await _send_json(send, 413, error_body("too_large", exc.detail))


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------------------------- auth


class _IdConvertor(PathConvertor):
    """Any document id in a path, line breaks included (Starlette's ``path`` stops at one)."""

    regex = "[\\s\\S]*"


register_url_convertor("m3search_id", _IdConvertor())

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (or `Authorization: Bearer`)")
_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token (what OpenAI clients send)")


async def require_api_key(
    settings: Annotated[Settings, Depends(_request_settings)],
    key: Annotated[str | None, Security(_api_key_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> None:
    """401 unless the request carries the configured key (no key configured: open)."""
    if settings.api_key is None:
        return
    given = key or (bearer.credentials if bearer is not None else None)
    if not given or not secrets.compare_digest(given.encode(), settings.api_key.encode()):
        raise HTTPException(
            401,
            "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
            headers={"WWW-Authenticate": "Bearer"},
        )


# ---------------------------------------------------------------------------------------------- resources


class Resources:
    """What the app serves: the collection when one was given, and an encoder (the collection's)."""

    def __init__(self, *, encoder: Any = None, collection: Any = None):
        self._encoder = encoder
        self.collection = collection
        self.started = time.time()
        self.server_record: str | None = None  # the collection whose server record we wrote; removed on close
        #: the served folder's or file's (st_dev, st_ino), taken when opened: GET /info reports it, so the CLI
        #: checks that the server at a record's address serves the collection it was asked for
        self.collection_identity = serverfile.identity(collection.location) if collection is not None else None

    @property
    def encoder(self) -> Any:
        if self._encoder is None and self.collection is not None:
            self._encoder = self.collection.encoder  # loads the model recorded in the manifest
        return self._encoder

    def close(self) -> None:
        if self.server_record is not None:  # uvicorn re-raises SIGTERM after shutdown: remove it here
            serverfile.remove(self.server_record)
            self.server_record = None
        if self.collection is not None:
            self.collection.close()
            self.collection = None


class DeferredOptimize:
    """Build a served collection's indexes when its ingest pauses, not after every ``/documents`` request.

    Why: optimizing re-indexes the growing segment, so after every request it costs more than the
    write itself (measured at 10k proxy documents: ~2.4 s per request of 64 vs 0.64 s for the write)
    and takes the cores from queries; search is exact without it (unindexed points are scanned).
    It runs once no ingest request is writing and none ended for ``idle`` seconds, or after ``every``
    documents of continuous ingest (bounding what is scanned), each time when no query is in flight;
    and at close. A request in progress counts as ingest (:meth:`writing`): counting only ended ones
    built the indexes during every request of 64 documents that took longer than ``idle`` (~10 s at
    6.5 documents/s), a build per request, each followed by cold reads of the rebuilt token vectors.
    ``on_pending`` is told the documents written but not yet indexed whenever that changes (the
    ``m3search_unindexed_documents`` gauge: an operator, or a benchmark, sees when the build is done);
    ``on_built`` the seconds of each build (``m3search_index_build_seconds``). A build that fails
    (a nearly full disk) is logged and tried again after the next write or at close, not at once:
    retried at once, it failed in a loop that logged as fast as it could.
    """

    def __init__(
        self,
        collection: Any,
        batcher: Batcher,
        *,
        idle: float = 2.0,
        every: int = 20_000,
        on_pending: Callable[[int], None] | None = None,
        on_built: Callable[[float], None] | None = None,
    ) -> None:
        self.collection, self.batcher, self.idle, self.every = collection, batcher, idle, every
        self.on_pending, self.on_built = on_pending, on_built
        self._cond = threading.Condition()
        self._pending = 0  # documents written since the last optimize started
        self._writing = 0  # ingest requests in progress
        self._last = 0.0  # monotonic time the last ingest request ended
        self._failed = False  # the last build failed: none until the next write
        self._closed = False
        self.runs = 0
        self._thread = threading.Thread(target=self._run, name="m3search-optimize", daemon=True)
        self._thread.start()

    @contextmanager
    def writing(self, documents: int) -> Iterator[None]:
        """Mark an ingest request of ``documents`` in progress: no build starts (below ``every``)
        until it and every other one ended ``idle`` seconds ago; they count as written when it ends
        (a failed request may have written some)."""
        with self._cond:
            self._writing += 1
        try:
            yield
        finally:
            with self._cond:
                self._writing -= 1
            self.wrote(documents)

    def wrote(self, documents: int) -> None:
        with self._cond:
            self._pending += documents
            self._last = time.monotonic()
            self._failed = False
            self._cond.notify_all()
            self._report()

    def _report(self) -> None:
        if self.on_pending is not None:
            self.on_pending(self._pending)

    def _due(self) -> float:
        """Seconds until an optimize is due (0: now; inf: nothing pending)."""
        if not self._pending or self._failed:
            return math.inf
        if self._pending >= self.every:
            return 0.0
        if self._writing:
            return math.inf  # woken when it ends (wrote)
        return max(0.0, self._last + self.idle - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (wait := self._due()) > 0:
                    self._cond.wait(None if wait == math.inf else wait)
                if self._closed:
                    return
                done = self._pending
            self.batcher.wait_background_turn()
            self._optimize(done)

    def _optimize(self, done: int) -> None:
        t0, started = time.perf_counter(), time.monotonic()
        try:
            self.collection.optimize()
            self.runs += 1
        except Exception as exc:  # the next ingest (or close) tries again
            if isinstance(exc, InsufficientStorageError):  # its message says all: no traceback
                log.error("optimizing the collection failed: %s", exc)
            else:
                log.exception("optimizing the collection failed")
            with self._cond:
                self._failed = self._last <= started  # a write since: due as usual
            return
        if self.on_built is not None:
            self.on_built(time.perf_counter() - t0)
        with self._cond:
            self._pending -= done
            self._report()

    def close(self) -> None:
        """Wait for the ingest requests in progress to end (the server's shutdown asked them to stop at their
        next batch: the collection must not close under them, nor its encoder change), stop the thread, then
        optimize what is still pending (the collection is left as an ingest call leaves it)."""
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._pending:
            self._optimize(self._pending)


def open_resources(settings: Settings) -> Resources:
    """Open the collection (fast: takes the lock) or load a bare encoder, per ``settings``."""
    if settings.collection:
        from . import Collection

        return Resources(
            collection=Collection.open(
                settings.collection, model=settings.model, device=settings.device, dtype=settings.dtype
            )
        )
    from . import M3Encoder

    encoder = M3Encoder.from_pretrained(settings.model or "BAAI/bge-m3", device=settings.device, dtype=settings.dtype)
    return Resources(encoder=encoder)


def load_resources(settings: Settings) -> Resources:
    """:func:`open_resources`, then load the model too, so the first request does not wait for it."""
    res = open_resources(settings)
    try:
        _ = res.encoder  # load the model before serving
    except BaseException:
        res.close()
        raise
    return res


def _loaded(request: Request) -> Resources:
    res = getattr(request.app.state, "resources", None)
    if res is None:  # pragma: no cover - lifespan always sets it
        raise HTTPException(503, "the model is not loaded yet")
    return res


async def _resources(request: Request) -> Resources:  # async: no thread-pool hop for an attribute read
    return _loaded(request)


async def _collection_resources(request: Request) -> Resources:
    res = _loaded(request)
    if res.collection is None:
        raise HTTPException(409, "this server has no collection (start it with --collection DIR)")
    return res


ResourcesDep = Annotated[Resources, Depends(_resources)]
CollectionDep = Annotated[Resources, Depends(_collection_resources)]
SettingsDep = Annotated[Settings, Depends(_request_settings)]


# ---------------------------------------------------------------------------------------------- models


class _Strict(BaseModel):
    """Unknown fields refused; no coercion (``true`` is not 1, ``"yes"`` is not true, ``1.0`` is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingsRequest(BaseModel):
    """OpenAI's ``/v1/embeddings`` body. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore", strict=True)
    input: TextOrTexts = Field(description="A text or a list of texts (token-id arrays are not supported).")
    model: str = Field("bge-m3", description="Accepted whatever it names: this server serves one model.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(None, description="Must equal the model's size if given (no truncation).")
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class EmbedRequest(_Strict):
    input: TextOrTexts
    dense: bool = True
    sparse: bool = True
    colbert: bool = False
    tokens: bool = Field(False, description="Add readable tokens to each sparse vector.")
    max_length: int | None = Field(None, ge=2, description="Token cap per text (default: the model's limit).")
    colbert_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: each text's (tokens, dim) float32 matrix, row-major little-endian bytes."
    )


class SparseVector(BaseModel):
    indices: list[int]
    values: list[float]
    tokens: list[str] | None = None


class EmbedItem(BaseModel):
    index: int
    n_tokens: int
    dense: list[float] | None = None
    sparse: SparseVector | None = None
    colbert: list[list[float]] | str | None = None


class EmbedResponse(BaseModel):
    data: list[EmbedItem]
    model: str
    usage: Usage
    truncated: int


class DocumentIn(_Strict):
    id: str | None = Field(None, min_length=1, description="Your id; generated when absent.")
    text: str
    metadata: dict[str, Any] | None = None


class DocumentsRequest(_Strict):
    documents: list[DocumentIn] = Field(min_length=1)
    upsert: bool = Field(False, description="Overwrite existing ids (default: an existing id is a 409 error).")


class DocumentsResponse(BaseModel):
    ids: list[str]
    count: int


class DeleteRequest(_Strict):
    ids: list[str] = Field(min_length=1)


class DeleteResponse(BaseModel):
    deleted: list[str]
    missing: list[str]


class DocumentOut(BaseModel):
    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class GetRequest(_Strict):
    ids: list[str] = Field(min_length=1, description="At most the server's max_batch (413).")


class GetResponse(BaseModel):
    documents: list[DocumentOut | None] = Field(description="In the order of ids; null for an id not stored.")


def _document_out(doc: Any) -> DocumentOut:
    return DocumentOut(id=str(doc.id), text=doc.text or "", metadata=doc.metadata or {})


class _SearchOptions(_Strict):
    """Every argument of ``Collection.search`` but the query: ``/search`` and ``/search/batch`` share them."""

    k: int = Field(10, ge=1, description=f"Hits to return (at most {MAX_K}; the server may set a lower limit: 413).")
    # mode / fusion / weights / candidates left out: the collection's defaults (`m3search tune` may set them)
    mode: str | None = Field(  # checked by the library (parse_mode): "ALL" and "dense + sparse" are modes there too
        None, description=f"{', '.join(PRESETS)} (or any '+'-joined subset); default: the collection's (all)."
    )
    # any case, through the library's check: "RRF" goes on as rrf (as "Dense" is a mode)
    fusion: Annotated[Literal[FUSIONS], BeforeValidator(check_fusion)] | None = Field(  # type: ignore[valid-type]
        None, description=f"{', '.join(FUSIONS)} (default: the collection's, weighted)."
    )
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None, min_length=3, max_length=3, description="(dense, sparse, colbert); default: the collection's."
    )
    candidates: int | None = Field(
        None,
        ge=1,
        description=f"Per first-stage list in re-ranking modes (default: the collection's; at most {MAX_CANDIDATES}).",
    )
    filter: dict[str, Any] | None = Field(None, description='e.g. {"lang": "en", "year": {"gte": 2020}}')
    explain: bool = False
    exact: bool = Field(
        False, description="Find the dense candidates by a full scan, not the HNSW index (slower, never misses one)."
    )
    group: Literal[GROUPS] = Field(  # type: ignore[valid-type]
        "document", description="document: documents with their best window; passage: the best windows themselves."
    )


class SearchRequest(_SearchOptions):
    query: str = Field(min_length=1)


class BatchSearchRequest(_SearchOptions):
    queries: list[Annotated[str, Field(min_length=1)]] = Field(
        description="Encoded together; at most the server's max_batch (413)."
    )


class CountRequest(_Strict):
    filter: dict[str, Any] | None = Field(None, description="Count the documents it matches (none: all).")


class HitOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    score: float
    scores: dict[str, float | None] = Field(default_factory=dict)
    text: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    window: dict[str, int] | None = Field(
        default=None, description="Character [start, end) of the document's best-matching window."
    )


class SearchResponse(BaseModel):
    hits: list[HitOut]


class BatchSearchResponse(BaseModel):
    hits: list[list[HitOut]] = Field(description="One hit list per query, in the order of `queries`.")


class CountResponse(BaseModel):
    count: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


# ---------------------------------------------------------------------------------------------- helpers


def _texts(value: TextOrTexts, settings: Settings) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise HTTPException(422, "input is empty: send a string or a non-empty list of strings")
    _check_batch(len(texts), settings, "texts")
    return [check_text(t, f"input[{i}]") for i, t in enumerate(texts)]


def _check_batch(n: int, settings: Settings, what: str) -> None:
    if n > settings.max_batch:
        raise HTTPException(413, f"{n} {what} in one request exceed the limit of {settings.max_batch}")


class ShuttingDown(Exception):
    """A write refused because the server is shutting down (its message says what was not done): it came to its
    turn after the shutdown began, or the shutdown cancelled it while it waited for its turn. Nothing of it was done."""


def _handled(task: asyncio.Task) -> None:
    """Tell ``task`` its cancellation is handled: the request goes on to send our answer (Python >= 3.11 counts
    cancellations until then; 3.10 does not)."""
    if hasattr(task, "uncancel"):
        task.uncancel()


async def _write(request: Request, work: Callable[[], Any], *, documents: int, refused: str) -> Any:
    """``work()`` (a write of ``documents``; a delete: 0) in a worker thread, in its turn at the write gate, and to
    its end even when the server's shutdown cancels the request: the thread goes on either way (a long
    document's write ends whole), so its client gets the write's own answer, not uvicorn's plain-text 500.
    Refused cleanly with :class:`ShuttingDown` (``refused``: what was not done) when the shutdown cancels it
    while it waits, or began before its turn. The indexer counts it as in progress, so the lifespan closes the
    collection only after it; the lifespan also waits for its answer (``app.state.answering``) before the
    server stops."""
    state = request.app.state
    task = asyncio.current_task()
    state.answering.add(task)
    task.add_done_callback(state.answering.discard)  # once the answer is sent

    def guarded() -> Any:
        with state.indexer.writing(documents):  # (the lifespan sets stopping before it waits for the writes)
            if state.stopping.is_set():
                raise ShuttingDown(refused)
            return work()

    try:
        await state.write_gate.acquire()  # a write waiting on the collection's lock would hold a thread
    except asyncio.CancelledError:
        _handled(task)
        raise ShuttingDown(refused) from None
    try:
        job = asyncio.ensure_future(run_in_threadpool(guarded))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            _handled(task)
            return await job
    finally:
        state.write_gate.release()


async def _encode(request: Request, texts: list[str], **options: Any):
    """Encode through the app's batching worker; the work is cancelled if the client disconnects."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    batcher = request.app.state.batcher
    with batcher.foreground():
        return await batcher.encode_async(texts, gone=gone, **options)


async def _search(
    request: Request, res: Resources, settings: Settings, body: _SearchOptions, queries: list[str]
) -> list[list[HitOut]]:
    """``Collection.search_batch`` of ``queries`` with ``body``'s options: the one path of both search routes.
    Every argument is checked before the queries are queued; the queries are encoded together, at query
    priority, and no ingest round or write starts until the hits are ready."""
    check_limit("k", body.k, settings.max_k)
    if body.candidates is not None:
        check_limit("candidates", body.candidates, settings.max_candidates)
    coll = res.collection
    options = body.model_dump(include=set(_SearchOptions.model_fields))
    check_queries(queries)
    coll.search_batch([], **options)  # checks every option (no query: no work) before the queries are queued
    if not queries:
        return []
    started = time.monotonic()  # the encoding's wait and work count too

    def run(emb: Any) -> list[list]:
        with deadline(settings.search_timeout, since=started):
            return coll.search_batch(queries, query_embeddings=emb, **options)

    with request.app.state.batcher.foreground():
        try:  # the search's time limit bounds the wait for the encoder too
            emb = await _encode(
                request,
                queries,
                max_length=coll.settings["query_max_length"],
                timeout=min(settings.request_timeout, settings.search_timeout),
            )
        except RequestTimeout:
            if settings.request_timeout < settings.search_timeout:
                raise  # the server's queue bound came first: 503, busy
            raise DeadlineExceeded(
                f"search stopped before encoding: it ran over its time limit of {settings.search_timeout:g} s"
            ) from None
        lists = await run_in_threadpool(run, emb)
    return [[HitOut(**_finite(h.to_dict())) for h in hits] for hits in lists]


def _b64(rows: Any) -> str:
    """Little-endian float32 bytes, base64 (a quarter of the JSON floats' size: about 5.3 characters per float, not 20)."""
    return base64.b64encode(rows.astype("<f4", copy=False).tobytes()).decode("ascii")


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: map them to None (never reached with valid vectors, but never a 500 either)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None, *, resources: Resources | None = None) -> FastAPI:
    """Build the FastAPI app. ``settings`` overrides ``get_settings``; ``resources`` skips loading."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        res = resources if resources is not None else load_resources(_settings_of(app))
        app.state.resources = res
        s = _settings_of(app)
        app.state.batcher = Batcher(res.encoder, max_queue=s.max_queue, timeout=s.request_timeout, observer=metrics)
        app.state.indexer = None
        # Writes wait their turn here, in the event loop: a write waiting on the collection's lock in a
        # worker thread holds that thread, and 40 waiting deletes took every one (/health, /search hung).
        app.state.write_gate = asyncio.Lock()
        app.state.answering = set()  # write requests, answered even after a shutdown cancelled them (_write)
        app.state.stopping.clear()
        recording = None
        if resources is None and s.collection and serverfile.record_path(s.collection):  # not serve's: uvicorn's
            recording = asyncio.create_task(_record_when_listening(s, res))
        if res.collection is not None:  # its ingest (/documents) runs on the worker too, behind queries
            res.collection.use_encoder(BatchedEncoder(app.state.batcher, BACKGROUND))
            app.state.indexer = DeferredOptimize(
                res.collection,
                app.state.batcher,
                on_pending=metrics.unindexed.set,
                on_built=metrics.index_builds.observe,
            )
        try:
            yield
        finally:
            if recording is not None:
                recording.cancel()
            app.state.stopping.set()  # (already set by serve's signal handler) a write in progress stops
            if app.state.indexer is not None:  # waits for it: uvicorn may have cancelled its request, not its thread
                await run_in_threadpool(app.state.indexer.close)
            if res.collection is not None:
                res.collection.use_encoder(res.encoder)
            app.state.batcher.close()
            app.state.resources = None
            res.close()
            if app.state.answering:  # their writes ended (indexer.close): their answers go out before the loop ends
                await asyncio.wait(app.state.answering)

    from . import __version__

    app = FastAPI(
        title="m3search",
        version=__version__,
        summary="BGE-M3 embeddings (dense, sparse, ColBERT) and hybrid search over a collection.",
        lifespan=lifespan,
        responses=_errors(500),
    )
    if settings is not None:
        settings.check()
    #: Set when the server begins to shut down: ``/documents`` writes stop at their next batch (IngestInterrupted).
    app.state.stopping = threading.Event()
    # Kept on the app, not in dependency_overrides: with any override installed FastAPI rebuilds
    # every dependency's signature on every request (py-spy: 12 % of the event loop's time).
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, limit=lambda: _settings_of(app).max_body_bytes)
    metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _install_error_handlers(app)

    @app.get("/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        """Liveness: answers without an API key, in the event loop (no worker thread: it answers while
        every thread is busy)."""
        return Health()

    # HEAD for load balancers and `curl -I`; a route of its own (one operation id per route in the schema)
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    api = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)

    @api.get("/info", tags=["service"])
    def info(res: ResourcesDep, settings: SettingsDep) -> dict[str, Any]:
        """Model, limits and (when served) the collection's counts, sizes and settings."""
        enc = res.encoder
        out: dict[str, Any] = {
            "model": {
                "name_or_path": str(enc.name_or_path),
                "identity": enc.identity,
                "weights_fingerprint": enc.weights_fingerprint,
                "hidden_size": enc.hidden_size,
                "vocab_size": enc.vocab_size,
                "max_length": enc.max_length,
                "device": str(enc.device),
                "dtype": str(enc.dtype).replace("torch.", ""),
            },
            "limits": {
                "max_batch": settings.max_batch,
                "max_body_bytes": settings.max_body_bytes,
                "max_k": settings.max_k,
                "max_candidates": settings.max_candidates,
                "max_queue": settings.max_queue,
                "request_timeout": settings.request_timeout,
                "search_timeout": settings.search_timeout,
            },
            "api_key_required": settings.api_key is not None,
            "uptime_seconds": round(time.time() - res.started, 1),
            "collection": None,
            "collection_identity": res.collection_identity,
        }
        if res.collection is not None:
            out["collection"] = _finite(res.collection.info())
        return out

    @api.post("/v1/embeddings", response_model=EmbeddingsResponse, tags=["embeddings"], responses=_errors(*_ENCODING))
    async def openai_embeddings(
        body: EmbeddingsRequest, request: Request, res: ResourcesDep, settings: SettingsDep
    ) -> EmbeddingsResponse:
        """OpenAI-compatible dense embeddings (existing OpenAI clients work unchanged)."""
        texts = _texts(body.input, settings)
        model = check_text(body.model, "model")  # echoed in the answer: JSON cannot carry a lone surrogate
        enc = res.encoder
        if body.dimensions is not None and body.dimensions != enc.hidden_size:
            raise HTTPException(
                400, f"dimensions={body.dimensions} is not supported: this model returns {enc.hidden_size}"
            )
        emb = await _encode(request, texts, dense=True, sparse=False, colbert=False)
        dense = emb.dense.astype("<f4", copy=False)
        if body.encoding_format == "base64":
            vectors: list[Any] = [_b64(row) for row in dense]
        else:
            vectors = dense.tolist()
        tokens = int(emb.n_tokens.sum())
        return EmbeddingsResponse(
            data=[EmbeddingItem(index=i, embedding=v) for i, v in enumerate(vectors)],
            model=model,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    @api.post(
        "/embed",
        response_model=EmbedResponse,
        response_model_exclude_none=True,
        tags=["embeddings"],
        responses=_errors(*_ENCODING),
    )
    async def embed(body: EmbedRequest, request: Request, res: ResourcesDep, settings: SettingsDep) -> EmbedResponse:
        """Dense, sparse (token ids + weights, optionally readable tokens) and ColBERT vectors, each selectable."""
        texts = _texts(body.input, settings)
        if not (body.dense or body.sparse or body.colbert):
            raise HTTPException(400, "request at least one of dense, sparse, colbert")
        enc = res.encoder
        emb = await _encode(
            request, texts, dense=body.dense, sparse=body.sparse, colbert=body.colbert, max_length=body.max_length
        )
        items = []
        for i in range(len(texts)):
            item = EmbedItem(index=i, n_tokens=int(emb.n_tokens[i]))
            if body.dense:
                item.dense = emb.dense[i].tolist()
            if body.sparse:
                row = emb.sparse[i]
                ids = row.indices.tolist()
                item.sparse = SparseVector(
                    indices=ids, values=row.data.tolist(), tokens=enc.convert_id_to_token(ids) if body.tokens else None
                )
            if body.colbert:
                o = emb.colbert_offsets
                rows = emb.colbert[o[i] : o[i + 1]]
                item.colbert = _b64(rows) if body.colbert_format == "base64" else rows.tolist()
            items.append(item)
        tokens = int(emb.n_tokens.sum())
        return EmbedResponse(
            data=items,
            model=str(enc.name_or_path),
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
            truncated=int(emb.truncated),
        )

    @api.post(
        "/documents",
        response_model=DocumentsResponse,
        tags=["documents"],
        responses=_errors(409, 503, 507),
    )
    async def add_documents(
        body: DocumentsRequest, request: Request, res: CollectionDep, settings: SettingsDep
    ) -> DocumentsResponse:
        """Add documents (409 if an id exists) or, with ``upsert: true``, add or overwrite them."""
        _check_batch(len(body.documents), settings, "documents")
        texts = [d.text for d in body.documents]
        ids = [d.id for d in body.documents]
        if any(i is None for i in ids) and not all(i is None for i in ids):
            raise HTTPException(422, "give an id for every document or for none")
        if ids[0] is not None and (dups := sorted(repeated(ids))):
            raise HTTPException(422, f"duplicate ids in the request: {dups[:10]}")
        metadata = [d.metadata or {} for d in body.documents]
        coll = res.collection

        def store() -> DocumentsResponse:
            write = coll.upsert if body.upsert else coll.add  # add: DuplicateIdError (409) when an id exists
            out = write(
                texts,
                ids=None if ids[0] is None else ids,
                metadata=metadata,
                batch_size=INGEST_WRITE_BATCH,
                optimize=False,
                stop=request.app.state.stopping.is_set,  # shutdown: IngestInterrupted (503) at the next batch
            )
            return DocumentsResponse(ids=list(out), count=coll.count())  # (the collection closes after)

        # The collection encodes (windows included) through the batching worker at ingest priority
        # (its encoder is a BatchedEncoder, see lifespan); this thread only waits and writes, in
        # small batches, each when no query is in flight; indexes are built when ingest pauses.
        return await _write(request, store, documents=len(texts), refused="nothing of it was written")

    @api.delete("/documents", response_model=DeleteResponse, tags=["documents"], responses=_errors(409, 503, 507))
    async def delete_documents(
        body: DeleteRequest, request: Request, res: CollectionDep, settings: SettingsDep
    ) -> DeleteResponse:
        """Delete by id; unknown ids are reported in ``missing``."""
        _check_batch(len(body.ids), settings, "ids")
        delete = partial(res.collection.delete, body.ids)
        out = await _write(request, delete, documents=0, refused="nothing of it was deleted")
        return DeleteResponse(deleted=list(out["deleted"]), missing=list(out["missing"]))

    @api.get(
        "/documents/{doc_id:m3search_id}",
        response_model=DocumentOut,
        tags=["documents"],
        responses=_errors(404, 409),
    )
    def get_document(doc_id: str, res: CollectionDep) -> DocumentOut:
        """One stored document (text and metadata)."""
        doc = res.collection.get([doc_id])[0]
        if doc is None:
            raise UnknownIdError(f"no document with id {doc_id!r}", [doc_id])
        return _document_out(doc)

    @api.post("/documents/get", response_model=GetResponse, tags=["documents"], responses=_errors(409))
    def get_documents(body: GetRequest, res: CollectionDep, settings: SettingsDep) -> GetResponse:
        """Stored documents in the order of ``ids``, null for one not stored: many in one request, and ids too long
        for a URL (``GET /documents/{id}`` puts the id in the path)."""
        _check_batch(len(body.ids), settings, "ids")
        return GetResponse(documents=[None if d is None else _document_out(d) for d in res.collection.get(body.ids)])

    @api.post("/search", response_model=SearchResponse, tags=["search"], responses=_errors(409, *_ENCODING, 504))
    async def search(
        body: SearchRequest, request: Request, res: CollectionDep, settings: SettingsDep
    ) -> SearchResponse:
        """Hybrid search: every argument of ``Collection.search`` (mode, fusion, weights, candidates, filter, explain,
        exact, group)."""
        return SearchResponse(hits=(await _search(request, res, settings, body, [body.query]))[0])

    @api.post(
        "/search/batch", response_model=BatchSearchResponse, tags=["search"], responses=_errors(409, *_ENCODING, 504)
    )
    async def search_batch(
        body: BatchSearchRequest, request: Request, res: CollectionDep, settings: SettingsDep
    ) -> BatchSearchResponse:
        """``Collection.search_batch``: several queries with one set of ``/search``'s arguments, encoded together
        (at most ``max_batch``; the search's time limit is the whole batch's)."""
        _check_batch(len(body.queries), settings, "queries")
        return BatchSearchResponse(hits=await _search(request, res, settings, body, body.queries))

    @api.post("/count", response_model=CountResponse, tags=["search"], responses=_errors(409))
    def count(body: CountRequest, res: CollectionDep) -> CountResponse:
        """Documents matching ``filter`` (``Collection.count``; without one, ``GET /info`` counts them too)."""
        return CountResponse(count=res.collection.count(body.filter))

    @api.get("/metrics", tags=["service"], response_class=Response)
    def prometheus_metrics() -> Response:
        """Prometheus text format: requests, latency per route, queue depth, batch sizes, tokens."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api)
    app.include_router(
        tei_router(
            encode=_encode,
            texts_of=_texts,
            resources_dep=ResourcesDep,
            settings_dep=SettingsDep,
            dependencies=[Depends(require_api_key)],
            responses=_ERRORS,
            encoding_responses=_errors(*_ENCODING),
        )
    )
    return app


# ---------------------------------------------------------------------------------------------- serving


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    # proto=IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY)
    # only on sockets that say they are TCP. Without it a response written in two parts (headers,
    # then body) waits for the client's delayed ACK: +40 ms on every small response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process (``mallopt(M_ARENA_MAX, n)``; a no-op off glibc, or when
    ``MALLOC_ARENA_MAX`` is set, which wins).

    Why: glibc gives each thread that allocates concurrently an arena of its own (up to 8 per core),
    and a server's request, worker and engine threads fragment them, so its memory creeps up under
    steady load (benchmarks/RESULTS.md, serving rounds 5 and 7). Call it before the threads start.
    """
    import ctypes
    import ctypes.util

    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(getattr(libc, "mallopt", None)) and libc.mallopt(-8, n) == 1  # -8: M_ARENA_MAX
    except OSError:
        return False


def _url(host: str, port: int) -> str:
    """Where clients on this machine reach a server bound to ``host:port`` (an any-address bind: loopback)."""
    url_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{url_host}]:{port}" if ":" in url_host else f"http://{url_host}:{port}"


def _record(settings: Settings, resources: Resources, host: str, port: int) -> None:
    """Record this process as the server of ``settings.collection`` (``server.json``, removed when ``resources``
    close), so the CLI sends that collection's commands here: nothing to record for a bare encoder or a server
    location."""
    url, keyed = _url(host, port), settings.api_key is not None
    if settings.collection and serverfile.write(
        settings.collection, host=host, port=port, url=url, api_key_required=keyed
    ):
        resources.server_record = settings.collection


async def _record_when_listening(settings: Settings, resources: Resources) -> None:
    """The app started by uvicorn itself (``uvicorn --factory m3search.server:create_app``), not by :func:`serve`:
    record its address once uvicorn listens, as ``serve`` does, else the CLI found the collection "in use".
    uvicorn tells an app nothing of its address: its server is the owner of the SIGTERM handler (uvicorn
    >= 0.29 installs its ``handle_exit`` in the main thread). Elsewhere a warning says what is lost."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    address = None
    if hasattr(server, "started") and hasattr(server, "config"):
        while not server.started:
            await asyncio.sleep(0.05)
        sockets = [s for srv in getattr(server, "servers", ()) for s in srv.sockets]
        address = next((s.getsockname()[:2] for s in sockets if s.family in (socket.AF_INET, socket.AF_INET6)), None)
    if address is None:
        log.warning(
            "no server.json for %s (this server's address is unknown here): m3search commands on it say it is in "
            "use; serve it with `m3search serve -c %s` to have them sent to the server",
            settings.collection,
            settings.collection,
        )
        return
    _record(settings, resources, *address)


class _AccessLog(logging.Handler):
    """uvicorn's access lines, on standard output as uvicorn writes them. Where it cannot be written (a full disk,
    a reader gone), one warning says so and the lines are dropped from then on: logging reported each failure
    with a traceback of its own, some 100 lines on stderr per request. The stream is ``sys.stdout`` at each line,
    not the one of the moment logging was configured (uvicorn's handler kept the CLI's output guard after the
    command)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.dropped:
            return
        line = self.format(record) + "\n"
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except Exception as exc:  # OSError, the CLI's output error; AttributeError where stdout is closed (None)
            self.dropped = True
            why = "it is closed" if sys.stdout is None else exc
            log.warning("the access log cannot be written to standard output (%s); its lines are dropped", why)


def _uvicorn_server() -> type:
    """uvicorn's ``Server`` class, adapted (uvicorn is imported only to serve)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, telling the app at SIGTERM / Ctrl-C, and exiting 0 after a clean stop.

        Why: uvicorn tells an app nothing until the requests in progress have ended or, ``timeout_graceful_shutdown``
        later, been cancelled: a client then got uvicorn's plain-text 500 while its write went on in its thread.
        ``stopping``, set at the signal, stops a ``/documents`` write at its next batch, answered with our 503; one
        batch that outlasts the grace period (a long document) ends whole and is answered, as does a delete, and a
        write still waiting for its turn is refused whole (:func:`_write`).
        """

        def __init__(self, config: Any, stopping: threading.Event) -> None:
            super().__init__(config)
            self.stopping = stopping

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.stopping.set()
            super().handle_exit(sig, frame)

        def run(self, sockets: list[socket.socket] | None = None) -> None:
            """Around uvicorn's run, SIGINT / SIGTERM go to :meth:`handle_exit` too: uvicorn raises the signal it
            stopped for again once its own handlers are gone, and with Python's back, that killed the process by
            SIGTERM (Ctrl-C: "Aborted!", exit 1) after a clean stop. A stop asked for is a success: exit 0."""
            with _stop_signals_to(self.handle_exit):
                super().run(sockets=sockets)

    return Server


@contextmanager
def _stop_signals_to(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` inside the block (signals are the main thread's: elsewhere nothing
    changes), and back to what they were after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def serve(
    settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", on_ready: Any = None
) -> bool:
    """Bind ``host:port`` (0 = any free port), open the collection, load the model, serve until SIGINT/SIGTERM.

    Order matters: the address is recorded in ``<collection>/server.json`` as soon as the
    collection is locked, so other commands find the server (their requests wait in the
    listen backlog while the model loads) instead of an unexplained lock. Loading happens
    before uvicorn starts so that a bad model or a held collection is a one-line error, not
    a lifespan traceback. ``on_ready(url)`` is called when requests are about to be served.
    At SIGINT / SIGTERM no new request is taken; a ``/documents`` write in progress stops at its next batch
    (503 naming the documents it wrote; a long document's write ends whole and is answered), the collection
    closes after it, and this returns True (exit 0). Either signal before serving began closes the collection
    (removing its server.json) and returns False.
    """
    import uvicorn

    settings.check()
    limit_malloc_arenas()
    sock = _bind(host, port)
    resources: Resources | None = None
    stopped: list[int] = []

    def stop(sig: int, frame: Any) -> None:
        """SIGTERM's default killed the process while it loaded its model: server.json stayed, exit 143. Both
        signals end the startup through the ``finally`` below; ``stopped`` also tells of a KeyboardInterrupt
        that Python swallowed (raised inside a ``__del__``)."""
        stopped.append(sig)
        raise KeyboardInterrupt

    try:
        with _stop_signals_to(stop):
            try:
                actual = sock.getsockname()[1]
                resources = open_resources(settings)
                _record(settings, resources, host, actual)
                _ = resources.encoder  # load the model now
            except KeyboardInterrupt:
                if not stopped:
                    raise
        if stopped:
            return False
        if on_ready is not None:
            on_ready(_url(host, actual))
        app = create_app(settings, resources=resources)
        logs = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
        logs["handlers"]["access"] = {"()": _AccessLog, "formatter": "access"}
        config = uvicorn.Config(
            app,
            log_config=logs,
            log_level=log_level,
            use_colors=False if sys.stdout is None else None,  # uvicorn asks a closed stdout (None) isatty()
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        _uvicorn_server()(config, app.state.stopping).run(sockets=[sock])
        return True
    finally:
        if resources is not None:
            resources.close()
        sock.close()
