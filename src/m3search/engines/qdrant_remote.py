"""Qdrant server / cluster engine through qdrant-client: ``qdrant://host:port/name``, and
qdrant-client's local mode ``qdrant+local://PATH/name`` (same client API, no server).

Why: a collection that outgrows one machine moves to a Qdrant cluster unchanged. Vectors
and points are the embedded engine's (named vectors in :mod:`~m3search.engines.qdrant_edge`;
point layout, filters and crash rule in :mod:`~m3search.engines.qdrant_common`), so the same
queries return the same hits, and ``m3search migrate`` copies points between them.

Where the manifest lives: in the collection's own metadata (``metadata["m3search"]``,
Qdrant >= 1.16; qdrant-client local mode keeps it in its ``meta.json``). It travels with
the collection (snapshots, cluster moves) and needs no reserved point that searches
would have to skip. A raise of the window bound is also a key of its own there
(``max_windows_stored:N``, :meth:`~QdrantRemoteEngine.record_window_bound`): Qdrant merges a
metadata update into the stored keys, so another client's manifest write never removes it. ``create`` first writes ``metadata["m3search_schema"]``, so a create
that died before its manifest is recognised (and replaced when it holds no points). A
server that drops collection metadata (older than 1.16) is refused with a clear error.

Writes: each point is written whole (vectors and payload in one point). A batch goes
in requests of at most ``max_request_bytes`` (16 MiB of JSON by default, under Qdrant's
32 MiB request limit), never splitting a document's windows; each request is atomic per
shard (Qdrant's WAL), so a batch that fits one request on a one-shard collection is
all-or-nothing (on several shards a document's windows may land on different shards). Transient failures
(connection errors, timeouts, HTTP 429/5xx, gRPC UNAVAILABLE) are retried with
exponential backoff (``retries``, ``backoff`` seconds doubling, capped at 30 s); upserts
are idempotent, so a retry never duplicates. Other errors are raised at once.

Connection: ``qdrant://host[:port]/name`` (port 6333 by default); ``engine_options``:
``api_key`` (default: the ``QDRANT_API_KEY`` environment variable), ``https``,
``prefer_grpc``, ``timeout``, ``retries``, ``backoff``, ``max_request_bytes``, and at
create ``shards`` / ``replicas`` (``shard_number`` / ``replication_factor``); all but the
API key may also follow the location as a query (``qdrant://host/name?https=true&timeout=30``,
:func:`m3search.engines.location_options`: the CLI's way to give them). An
unreachable server raises EngineUnreachableError (a ConnectionError) naming the URL; a collection whose vectors do
not match the manifest's schema raises ValueError.

Local mode (``qdrant+local://PATH/name``; the last segment is the collection name, or
``m3search`` when the location has a single segment) stores points in SQLite and keeps
them all in memory: for tests and small collections. It locks ``PATH`` (a second
process gets CollectionInUseError) and ignores float16 storage, so token vectors are
rounded to float16 on our side before they are sent: local mode and a server then
score the same values. Its filtered queries score every stored point before filtering (seconds per
query at a few hundred documents), so in local mode candidates are scored in NumPy from their fetched vectors
(``score_records``); a server scores them itself (one ``exact`` query per mode
filtered to the candidate ids, as the embedded engine does). ``server_scoring=True``
runs the server path in local mode too (the tests check both agree). No Qdrant server binary can be installed on the machines this
project is tested on: the test suite covers the server code path only through local
mode, which speaks the same client API.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from m3search.engines.base import BOUND_RECORD, CREATE_OPTION_RULES, bound_records, split_requests, with_bound
from m3search.engines.files import (
    has_file,
    readable,
    refuse_a_file_in_the_way,
    refuse_uncreatable,
    refuse_unreadable,
    writable,
)
from m3search.engines.qdrant_common import QdrantEngine, Stored, is_head, record_from_point
from m3search.engines.shapes import LOSSLESS_COLBERT_DTYPES, QueryVectors, Schema, read_stored, score_records
from m3search.errors import (
    CollectionExistsError,
    CollectionInUseError,
    CollectionNotFoundError,
    EngineUnreachableError,
)
from m3search.filters import Filter
from m3search.plan import check_deadline, check_options

try:
    from qdrant_client import QdrantClient
    from qdrant_client import models as qm
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the Qdrant server engine needs qdrant-client: pip install 'm3search[qdrant]' ({exc})") from exc

__all__ = ["QdrantRemoteEngine", "parse_qdrant_location"]

#: A Qdrant server rejects a longer multivector (MAX_MULTIVECTOR_FLATTENED_LEN, qdrant
#: lib/common/common/src/validation.rs); longer windows are stored as parts (see qdrant_common).
MAX_MULTIVECTOR_FLOATS = 1_048_576
META_KEY = "m3search"
SCHEMA_KEY = "m3search_schema"
DEFAULT_COLLECTION = "m3search"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
T = TypeVar("T")


def _manifest(meta: dict) -> dict | None:
    """The manifest kept in collection metadata ``meta`` (a copy), raised by the bound records beside it."""
    m = meta.get(META_KEY)
    return None if m is None else with_bound(json.loads(json.dumps(m)), meta)


def _quantization(name: str | None) -> qm.QuantizationConfig | None:
    """qdrant-client's config for a :data:`~m3search.engines.shapes.COLBERT_QUANTIZATIONS` name (kept in RAM,
    like the embedded engine's)."""
    if name is None:
        return None
    if name.startswith("binary"):
        enc = {"1": "ONE_BIT", "1.5": "ONE_AND_HALF_BITS", "2": "TWO_BITS"}[name[len("binary") :]]
        return qm.BinaryQuantization(
            binary=qm.BinaryQuantizationConfig(encoding=qm.BinaryQuantizationEncoding[enc], always_ram=True)
        )
    if name.startswith("turbo"):
        bits = "BITS" + name[len("turbo") :].replace(".", "_")
        return qm.TurboQuantization(
            turbo=qm.TurboQuantQuantizationConfig(bits=qm.TurboQuantBitSize[bits], always_ram=True)
        )
    if name == "int8":
        return qm.ScalarQuantization(scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, always_ram=True))
    ratio = qm.CompressionRatio["X" + name[len("pq") :]]
    return qm.ProductQuantization(product=qm.ProductQuantizationConfig(compression=ratio, always_ram=True))


def parse_qdrant_location(location: str) -> tuple[str, str, str]:
    """``(kind, target, collection)``: kind ``"remote"`` (target = URL without scheme) or
    ``"local"`` (target = storage folder)."""
    loc = os.fspath(location)
    scheme, sep, rest = loc.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("qdrant", "qdrant+local"):
        raise ValueError(f"not a Qdrant location: {loc!r} (qdrant://host:port/name or qdrant+local://PATH/name)")
    if scheme == "qdrant":
        host, _, name = rest.partition("/")
        name = name.strip("/")
        if not host or not name or "/" in name:
            raise ValueError(f"Qdrant location must be qdrant://host[:port]/name, got {loc!r}")
        if ":" not in host:
            host += ":6333"
        kind, target = "remote", host
    else:
        path = rest.rstrip("/")
        if not path:
            raise ValueError(f"Qdrant local location needs a path: qdrant+local://PATH[/name], got {loc!r}")
        target, _, name = path.rpartition("/") if "/" in path.strip("/") else (path, "", DEFAULT_COLLECTION)
        kind, target = "local", str(Path(target).expanduser())
    if not _NAME.match(name):
        raise ValueError(f"Qdrant collection name {name!r} must be 1-255 letters, digits, '_', '-' or '.'")
    return kind, target, name


# ----------------------------------------------------------------------------- filters
class _ClientDialect:
    """qdrant-client's filter models (see :mod:`m3search.engines.qdrant_filter`)."""

    filter = staticmethod(qm.Filter)

    @staticmethod
    def is_filter(node: Any) -> bool:
        return isinstance(node, qm.Filter)

    @staticmethod
    def match(key: str, value: Any) -> qm.FieldCondition:
        return qm.FieldCondition(key=key, match=qm.MatchValue(value=value))

    @staticmethod
    def match_any(key: str, values: list) -> qm.FieldCondition:
        return qm.FieldCondition(key=key, match=qm.MatchAny(any=values))

    @staticmethod
    def has_vector(name: str) -> qm.HasVectorCondition:
        return qm.HasVectorCondition(has_vector=name)

    @staticmethod
    def is_empty(key: str) -> qm.IsEmptyCondition:
        return qm.IsEmptyCondition(is_empty=qm.PayloadField(key=key))

    @staticmethod
    def nested(key: str, filter: qm.Filter) -> qm.NestedCondition:
        return qm.NestedCondition(nested=qm.Nested(key=key, filter=filter))

    @staticmethod
    def range(key: str, **bounds: float | None) -> qm.FieldCondition:
        return qm.FieldCondition(key=key, range=qm.Range(**bounds))


# ---------------------------------------------------------------------------- local mode
#: qdrant-client's local mode locks its folder per client, so two collections of one folder (a migration
#: between them, an existence check beside an open collection) share one client per process. Weak values:
#: a client no engine holds any more is collected (and closed) as before; ``_USERS`` counts its engines.
_LOCAL: weakref.WeakValueDictionary[str, QdrantClient] = weakref.WeakValueDictionary()
_USERS = "_m3search_users"
#: The shared local client's own lock (an attribute of the client, like ``_USERS``): qdrant-client's local
#: mode is not thread-safe (two threads' collection updates both rename its ``meta.json.tmp``:
#: FileNotFoundError), and the handles sharing it may be used from different threads.
_CALLS = "_m3search_calls"
_LOCAL_LOCK = threading.Lock()


def _local_client(target: str) -> QdrantClient:
    key = str(Path(target).resolve())
    with _LOCAL_LOCK:
        client = _LOCAL.get(key)
        if client is None:
            try:
                with writable(target, "qdrant-client local mode", "the folder", "cp -r"):  # it opens .lock to write
                    try:
                        client = QdrantClient(path=target, force_disable_check_same_thread=True)
                    except (sqlite3.OperationalError, OSError):  # sqlite's "unable to open database file"
                        refuse_unreadable(target, Path(target))  # a file it may not read, else one it may not write
                        raise
            except RuntimeError as exc:
                if "already accessed" in str(exc):
                    raise CollectionInUseError(
                        f"Qdrant local storage {target} is in use by another process (local mode locks its folder; "
                        "use a Qdrant server for several processes)"
                    ) from None
                raise
            setattr(client, _USERS, 0)
            setattr(client, _CALLS, threading.RLock())
            _LOCAL[key] = client
        setattr(client, _USERS, getattr(client, _USERS) + 1)
        return client


def _serialized(client: QdrantClient) -> AbstractContextManager:
    """What a call on ``client`` is made under: a shared local client's lock (one call at a time), else nothing
    (a server client is thread-safe)."""
    return getattr(client, _CALLS, None) or nullcontext()


def _release(client: QdrantClient) -> None:
    """Close ``client``, or for a shared local one, drop one user (closed with the last)."""
    with _LOCAL_LOCK:
        users = getattr(client, _USERS, 1) - 1
        if users > 0:
            setattr(client, _USERS, users)
            return
        for key in [k for k, c in _LOCAL.items() if c is client]:
            del _LOCAL[key]
    client.close()


# ---------------------------------------------------------------------------- retries
def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ResponseHandlingException):  # connection refused/reset, timeouts
        return True
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in _TRANSIENT_HTTP
    try:
        import grpc

        if isinstance(exc, grpc.RpcError):
            code = grpc.StatusCode
            return exc.code() in (code.UNAVAILABLE, code.DEADLINE_EXCEEDED, code.RESOURCE_EXHAUSTED)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


def _with_retries(call: Callable[[], T], *, what: str, where: str, retries: int, backoff: float) -> T:
    """Run ``call``; on a transient error wait ``backoff * 2**attempt`` (+ jitter) and retry."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if not _transient(exc):
                raise
            if attempt == retries:
                raise ConnectionError(f"Qdrant at {where}: {what} failed after {retries + 1} attempts: {exc}") from exc
            time.sleep(min(30.0, backoff * 2**attempt) * (1 + 0.25 * random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------- engine
class QdrantRemoteEngine(QdrantEngine):
    """A collection on a Qdrant server (or qdrant-client local mode); see the module docstring."""

    name = "qdrant"
    shared = True  # a server's collection has other clients (local mode: other handles in this process)
    _dialect = _ClientDialect
    _sparse_vector = qm.SparseVector
    _search_params, _quantization_params = qm.SearchParams, qm.QuantizationSearchParams

    def __init__(
        self,
        client: QdrantClient,
        location: str,
        collection: str,
        schema: Schema,
        *,
        local: bool,
        where: str,
        retries: int = 5,
        backoff: float = 0.5,
        max_request_bytes: int = 16 << 20,
        hnsw_ef: int | None = None,
        server_scoring: bool | None = None,
        multivector_limit: int | None = MAX_MULTIVECTOR_FLOATS,
    ) -> None:
        self._client: QdrantClient | None = client
        self.location = location
        self.collection = collection
        self.schema = schema
        self.local = local
        self.where = where
        self.retries = retries
        self.backoff = backoff
        self.max_request_bytes = max_request_bytes
        self.hnsw_ef = hnsw_ef
        self.server_scoring = (not local) if server_scoring is None else server_scoring
        # Local mode stands in for a server, so it splits long windows into parts just the same.
        self.multivector_limit = multivector_limit

    # ----------------------------------------------------------------- connection
    _ENGINE_OPTS = ("retries", "backoff", "max_request_bytes", "hnsw_ef", "server_scoring", "multivector_limit")
    _CLIENT_OPTS = ("api_key", "https", "prefer_grpc", "timeout")
    #: Read by create only (its arguments), ignored elsewhere as Milvus does: the location that created a
    #: collection, its query included (``?shards=2``), opens it too.
    _CREATE_OPTS = ("shards", "replicas")
    _OPTION_GROUPS = (_ENGINE_OPTS, _CLIENT_OPTS, _CREATE_OPTS)
    #: ``timeout`` in whole seconds, as qdrant-client takes it; the switches Python bools; the key a string.
    _OPTION_RULES: ClassVar[dict[str, dict[str, bool]]] = {
        **QdrantEngine._OPTION_RULES,
        **CREATE_OPTION_RULES,
        "timeout": {"integer": True},
        "retries": {"integer": True, "zero": True},
        "backoff": {"zero": True},
        "max_request_bytes": {"integer": True, "none": True},
        "multivector_limit": {"integer": True, "none": True},
        "https": {"bool": True},
        "prefer_grpc": {"bool": True},
        "api_key": {"text": True, "none": True},
        "server_scoring": {"bool": True, "none": True},
    }

    @classmethod
    def _split_options(cls, options: dict) -> tuple[dict, dict, dict]:
        """``options`` checked, as the engine's, the client's and create's."""
        known = [k for names in cls._OPTION_GROUPS for k in names]
        unknown = set(options) - set(known)
        if unknown:
            raise TypeError(f"unknown Qdrant engine option(s) {sorted(unknown)}; allowed: {', '.join(known)}")
        options = check_options(options, cls._OPTION_RULES)
        engine, client, create = ({k: options[k] for k in names if k in options} for names in cls._OPTION_GROUPS)
        return engine, client, create

    @classmethod
    def _connect(cls, location: str, client_opts: dict, *, must_exist: bool) -> tuple[QdrantClient, str, bool, str]:
        kind, target, name = parse_qdrant_location(location)
        if kind == "local":
            with readable(target):  # the client's own reads too: a meta.json stat shows but open refuses
                if must_exist and not has_file(Path(target) / "meta.json"):
                    refuse_a_file_in_the_way(location, Path(target))
                    raise CollectionNotFoundError(f"no qdrant-client local storage at {target}")
                return _local_client(target), name, True, target
        https = client_opts.get("https", False)
        url = ("https://" if https else "http://") + target
        api_key = client_opts.get("api_key", os.environ.get("QDRANT_API_KEY") or None)
        if api_key and not https and target.split(":")[0] not in ("localhost", "127.0.0.1"):
            warnings.warn(
                f"sending a Qdrant API key over plain http to {url}; pass engine_options={{'https': True}} "
                "(or add ?https=true to the location)",
                stacklevel=4,
            )
        client = QdrantClient(
            url=url,
            api_key=api_key,
            prefer_grpc=client_opts.get("prefer_grpc", False),
            timeout=client_opts.get("timeout", 60),
            check_compatibility=False,
        )
        try:
            client.get_collections()
        except Exception as exc:
            client.close()
            if isinstance(exc, UnexpectedResponse) and exc.status_code in (401, 403):
                raise PermissionError(
                    f"Qdrant at {url} refused the API key (HTTP {exc.status_code}); set QDRANT_API_KEY"
                ) from None
            raise EngineUnreachableError(f"cannot reach Qdrant at {url}: {exc}") from None
        return client, name, False, url

    @classmethod
    def exists(cls, location: str, **options: Any) -> bool:
        _, client_opts, _ = cls._split_options(options)
        kind, target, _ = parse_qdrant_location(location)
        with readable(target):
            if kind == "local" and not has_file(Path(target) / "meta.json"):
                return False
        client, name, _, _ = cls._connect(location, client_opts, must_exist=False)
        try:
            return bool(client.collection_exists(name))
        finally:
            _release(client)

    def _vectors_config(self) -> dict[str, qm.VectorParams]:
        s = self.schema
        return {
            "dense": qm.VectorParams(
                size=s.dense_dim,
                distance=qm.Distance.DOT,
                datatype=qm.Datatype.FLOAT32,
                on_disk=s.dense_on_disk,
                hnsw_config=qm.HnswConfigDiff(m=s.hnsw_m, ef_construct=s.hnsw_ef_construct, full_scan_threshold=10000),
            ),
            "colbert": qm.VectorParams(
                size=s.colbert_dim,
                distance=qm.Distance.DOT,
                multivector_config=qm.MultiVectorConfig(comparator=qm.MultiVectorComparator.MAX_SIM),
                # m=0: no graph over token vectors; they are read only to re-rank candidates.
                hnsw_config=qm.HnswConfigDiff(m=0, ef_construct=s.hnsw_ef_construct, full_scan_threshold=10000),
                datatype=qm.Datatype(s.colbert_dtype),
                quantization_config=_quantization(s.colbert_quantization),
                on_disk=s.colbert_on_disk,
            ),
        }

    @classmethod
    def create(cls, location: str, schema: Schema, **options: Any) -> QdrantRemoteEngine:
        engine_opts, client_opts, create_opts = cls._split_options(options)
        kind, target, _ = parse_qdrant_location(location)
        if kind == "local":
            if schema.colbert_dtype not in LOSSLESS_COLBERT_DTYPES or schema.colbert_quantization is not None:
                raise ValueError(
                    "qdrant-client local mode keeps float32 vectors and scores them in NumPy: it cannot honour "
                    f"colbert_dtype={schema.colbert_dtype!r} / colbert_quantization={schema.colbert_quantization!r} "
                    "(a Qdrant server or the embedded engine can)"
                )
            refuse_uncreatable(location, Path(target))
        client, name, local, where = cls._connect(location, client_opts, must_exist=False)
        engine = cls(client, location, name, schema, local=local, where=where, **engine_opts)
        try:
            if client.collection_exists(name):
                info = client.get_collection(name)
                meta = info.config.metadata or {}
                if SCHEMA_KEY in meta and META_KEY not in meta and not (info.points_count or 0):
                    client.delete_collection(name)  # a create that died before writing its manifest
                else:
                    raise CollectionExistsError(f"Qdrant collection {name!r} already exists at {where}")
            engine._call(
                "create collection",
                lambda: client.create_collection(
                    name,
                    vectors_config=engine._vectors_config(),
                    sparse_vectors_config={"sparse": qm.SparseVectorParams(index=qm.SparseIndexParams(on_disk=False))},
                    shard_number=create_opts.get("shards"),
                    replication_factor=create_opts.get("replicas"),
                    metadata={SCHEMA_KEY: schema.to_dict()},
                ),
            )
            if SCHEMA_KEY not in (client.get_collection(name).config.metadata or {}):
                client.delete_collection(name)
                raise RuntimeError(
                    f"Qdrant at {where} does not keep collection metadata, where m3search stores its manifest "
                    "(needs Qdrant >= 1.16)"
                )
        except BaseException:
            _release(client)
            raise
        return engine

    @classmethod
    def open(cls, location: str, **options: Any) -> QdrantRemoteEngine:
        engine_opts, client_opts, _ = cls._split_options(options)
        client, name, local, where = cls._connect(location, client_opts, must_exist=True)
        try:
            if not client.collection_exists(name):
                raise CollectionNotFoundError(f"no Qdrant collection {name!r} at {where}")
            info = client.get_collection(name)
            meta = info.config.metadata or {}
            if META_KEY not in meta:
                what = (
                    "an incomplete m3search collection (no manifest)"
                    if SCHEMA_KEY in meta
                    else "not an m3search collection"
                )
                raise CollectionNotFoundError(f"Qdrant collection {name!r} at {where} is {what}")
            schema, bound = read_stored(_manifest(meta), location)
            engine = cls(client, location, name, schema, local=local, where=where, **engine_opts)
            engine._check_schema(info)
            engine._opened(bound)
        except BaseException:
            _release(client)
            raise
        return engine

    def _check_schema(self, info: Any) -> None:
        """Refuse a collection whose vectors do not match the manifest's schema."""
        vectors = info.config.params.vectors
        vectors = vectors if isinstance(vectors, dict) else {}  # (one unnamed vector: not ours)
        problems = []
        want = self._vectors_config()
        for vname in ("dense", "colbert"):
            got = vectors.get(vname)
            if got is None:
                problems.append(f"no {vname!r} vector")
            elif got.size != want[vname].size or got.distance != qm.Distance.DOT:
                problems.append(f"{vname!r} is {got.size}-d {got.distance}, expected {want[vname].size}-d Dot")
        col = vectors.get("colbert")
        if col is not None and (
            col.multivector_config is None or col.multivector_config.comparator != qm.MultiVectorComparator.MAX_SIM
        ):
            problems.append("'colbert' is not a MaxSim multivector")
        if "sparse" not in (info.config.params.sparse_vectors or {}):
            problems.append("no 'sparse' sparse vector")
        if problems:
            raise ValueError(
                f"Qdrant collection {self.collection!r} at {self.where} does not match its m3search schema: "
                + "; ".join(problems)
            )

    @property
    def process_store(self) -> str | None:
        """Local mode's folder is locked against other processes (``_local_client``); a server is not."""
        return f"{Path(self.where).resolve()}/{self.collection}" if self.local else None

    def close(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        _release(client)

    @property
    def client(self) -> QdrantClient:
        if self._client is None:
            raise RuntimeError(f"collection at {self.location} is closed")
        return self._client

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        check_deadline(what)
        client = self.client

        def once() -> T:
            with _serialized(client):
                return fn()

        return _with_retries(once, what=what, where=self.where, retries=self.retries, backoff=self.backoff)

    # ------------------------------------------------------------------ manifest
    def _metadata(self) -> dict:
        return self._call("read manifest", lambda: self.client.get_collection(self.collection)).config.metadata or {}

    def read_manifest(self) -> dict | None:
        return _manifest(self._metadata())

    def write_manifest(self, manifest: dict) -> None:
        value = json.loads(json.dumps(manifest))
        self._call("write manifest", lambda: self.client.update_collection(self.collection, metadata={META_KEY: value}))

    def record_window_bound(self, most: int) -> None:
        """A metadata key of its own, in one update with the removal (a null) of the lower records."""
        lower = {f"{BOUND_RECORD}{n}": None for n in bound_records(self._metadata()) if n < most}
        metadata = {f"{BOUND_RECORD}{most}": most, **lower}
        self._call("write manifest", lambda: self.client.update_collection(self.collection, metadata=metadata))

    # -------------------------------------------------------------- client hooks
    def _write(self, points: list[tuple[str, dict | None, dict]], sizes: list[int]) -> None:
        """Requests of at most ``max_request_bytes``, cut only between documents (every other
        point of a document, tombstones included, stays with its head before it)."""
        structs = [qm.PointStruct(id=u, vector=self._point_vectors(v), payload=p) for u, v, p in points]
        for r in split_requests(sizes, [is_head(payload) for _, _, payload in points], self.max_request_bytes):
            self._call("upload", lambda r=r: self.client.upsert(self.collection, points=structs[r], wait=True))

    def _delete(self, ids: Sequence[str], stored: Mapping[str, Stored]) -> None:
        """Documents stored as several points: every point carrying their id, by filter, in one
        request (windows, parts and tombstones alike), of the generations read in their heads (one read
        first: :meth:`_generations_read`). Else by point id (a filter on ``id`` scans every point); the bound
        is current, as the Collection re-reads it before each call (``shared``)."""
        if self.max_windows <= 1:
            return super()._delete(ids, stored)
        self._delete_documents(list(ids), must=[self._generations_read(stored)])

    def _delete_where(self, filter: qm.Filter) -> None:
        sel = qm.FilterSelector(filter=filter)
        self._call("delete", lambda: self.client.delete(self.collection, points_selector=sel, wait=True))

    def _delete_points(self, uuids: list[str]) -> None:
        sel = qm.PointIdsList(points=uuids)
        self._call("delete", lambda: self.client.delete(self.collection, points_selector=sel, wait=True))

    def _set_payload(self, ops: list[tuple[dict, list[str]]]) -> None:
        ops = [qm.SetPayloadOperation(set_payload=qm.SetPayload(payload=p, points=u)) for p, u in ops]
        self._call(  # one request: applied together
            "set metadata", lambda: self.client.batch_update_points(self.collection, update_operations=ops, wait=True)
        )

    def _retrieve(self, uuids: list[str], payload: bool | list[str], vectors: bool | list[str]) -> list[Any]:
        if not uuids:
            return []
        return self._call(
            "retrieve",
            lambda: self.client.retrieve(self.collection, ids=uuids, with_payload=payload, with_vectors=vectors),
        )

    def _scroll(self, offset: Any, limit: int, docs_only: bool, with_vectors: bool) -> tuple[list[Any], Any]:
        args = {"scroll_filter": self._filter(None, docs_only), "limit": limit, "offset": offset}
        return self._call(
            "scroll", lambda: self.client.scroll(self.collection, **args, with_payload=True, with_vectors=with_vectors)
        )

    def _count(self, filter: Filter | None, docs_only: bool) -> int:
        flt = self._filter(filter, docs_only)
        return int(self._call("count", lambda: self.client.count(self.collection, count_filter=flt, exact=True)).count)

    def _run(self, requests: list) -> list[list]:
        if not requests:
            return []
        res = self._call("query", lambda: self.client.query_batch_points(self.collection, requests=requests))
        return [r.points for r in res]

    def _params(self, exact: bool, rescore: bool | None = None) -> qm.SearchParams | None:
        # local mode always scans exactly (and warns about any params)
        return None if self.local else super()._params(exact, rescore)

    def _request(self, mode: str, vector: Any, limit: int, filter: Any, params: Any, with_id: bool) -> qm.QueryRequest:
        payload = ["id", "gen", "window"] if with_id else False  # (QdrantEngine._committed)
        return qm.QueryRequest(
            query=vector, using=mode, limit=limit, filter=filter, params=params, with_payload=payload
        )

    def _has_ids(self, uuids: list[str]) -> qm.Filter:
        return qm.Filter(must=[qm.HasIdCondition(has_id=uuids)])

    def _exact_scores(self, uuids: list[str], todo: dict[str, list[int]], query: QueryVectors) -> dict[str, np.ndarray]:
        """Local mode: NumPy over the candidates' fetched vectors (see ``server_scoring``)."""
        if self.server_scoring:
            return super()._exact_scores(uuids, todo, query)
        modes = list(todo)
        need = sorted({j for m in modes for j in todo[m]})
        by_uuid = {str(r.id): record_from_point(r) for r in self._retrieve([uuids[j] for j in need], True, modes)}
        got = score_records([by_uuid.get(uuids[j]) for j in need], query, modes)
        out = {m: np.full(len(uuids), np.nan) for m in modes}
        for m in modes:
            out[m][need] = got[m]
        return out
