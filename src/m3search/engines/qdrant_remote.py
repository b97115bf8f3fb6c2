"""Qdrant server / cluster engine through qdrant-client: ``qdrant://host:port/name``, and
qdrant-client's local mode ``qdrant+local://PATH/name`` (same client API, no server).

Why: a collection that outgrows one machine moves to a Qdrant cluster unchanged. The
schema is the embedded engine's (:mod:`m3search.engines.qdrant_edge`), so the same
queries return the same hits, and ``m3search migrate`` copies points between them:

* named vector ``dense``: float32, Dot, HNSW (``Schema.hnsw_m`` / ``hnsw_ef_construct``);
* sparse vector ``sparse`` (dot product, inverted index);
* ``colbert``: multivector, MaxSim comparator, NO HNSW graph (``HnswConfigDiff(m=0)``),
  float16 or float32 (``Schema.colbert_dtype``; on a server also the turbo codecs and a
  quantized copy, ``Schema.colbert_quantization``, as in the embedded engine), on disk by default;
* point id = UUID5 of the caller's id; payload ``{"id", "text", "metadata"}``; filters
  address ``metadata.<field>``.

Where the manifest lives: in the collection's own metadata (``metadata["m3search"]``,
Qdrant >= 1.16; qdrant-client local mode keeps it in its ``meta.json``). It travels with
the collection (snapshots, cluster moves) and needs no reserved point that searches
would have to skip. ``create`` first writes ``metadata["m3search_schema"]``, so a create
that died before its manifest is recognised (and replaced when it holds no points). A
server that drops collection metadata (older than 1.16) is refused with a clear error.

Writes: each point is written whole (vectors and payload in one point). A batch goes
in requests of at most ``max_request_bytes`` (16 MiB of JSON by default, under Qdrant's
32 MiB request limit); each request is atomic per shard (Qdrant's WAL), so a batch that
fits one request on a one-shard collection is all-or-nothing. Transient failures
(connection errors, timeouts, HTTP 429/5xx, gRPC UNAVAILABLE) are retried with
exponential backoff (``retries``, ``backoff`` seconds doubling, capped at 30 s); upserts
are idempotent, so a retry never duplicates. Other errors are raised at once.

Connection: ``qdrant://host[:port]/name`` (port 6333 by default); ``engine_options``:
``api_key`` (default: the ``QDRANT_API_KEY`` environment variable), ``https``,
``prefer_grpc``, ``timeout``, ``retries``, ``backoff``, ``max_request_bytes``, and at
create ``shards`` / ``replicas`` (``shard_number`` / ``replication_factor``). An
unreachable server raises ConnectionError naming the URL; a collection whose vectors do
not match the manifest's schema raises ValueError.

Local mode (``qdrant+local://PATH/name``; the last segment is the collection name, or
``m3search`` when the location has a single segment) stores points in SQLite and keeps
them all in memory: for tests and small collections. It locks ``PATH`` (a second
process gets CollectionInUseError) and ignores float16 storage, so token vectors are
rounded to float16 on our side before they are sent: local mode and a server then
score the same values. Its filtered queries score every stored point before filtering,
so in local mode candidates are scored in NumPy from their fetched vectors
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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp

from m3search.engines.base import (
    MODES,
    CollectionExistsError,
    CollectionInUseError,
    CollectionNotFoundError,
    Engine,
    Hits,
    PointBatch,
    QueryVectors,
    Record,
    Schema,
    fill_by_uuid,
    finish_maxsim_scores,
    point_uuid,
    prefill_known,
    score_records,
    scoring_jobs,
)
from m3search.engines.qdrant_filter import to_qdrant
from m3search.filters import Filter

try:
    from qdrant_client import QdrantClient
    from qdrant_client import models as qm
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the Qdrant server engine needs qdrant-client: pip install 'm3search[qdrant]' ({exc})") from exc

__all__ = ["QdrantRemoteEngine", "to_client_filter", "parse_qdrant_location"]

META_KEY = "m3search"
SCHEMA_KEY = "m3search_schema"
DEFAULT_COLLECTION = "m3search"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
T = TypeVar("T")


def _quantization(name: str | None) -> qm.QuantizationConfig | None:
    """qdrant-client's config for a :data:`~m3search.engines.base.COLBERT_QUANTIZATIONS` name (kept in RAM,
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
        if "/" in path.strip("/"):
            head, _, name = path.rpartition("/")
            kind, target = "local", head
        else:
            kind, target, name = "local", path, DEFAULT_COLLECTION
        target = str(Path(target).expanduser())
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
    def range(key: str, **bounds: float | None) -> qm.FieldCondition:
        return qm.FieldCondition(key=key, range=qm.Range(**bounds))


def to_client_filter(f: Filter | None, prefix: str = "metadata.") -> qm.Filter | None:
    """The shared filter AST as a qdrant-client ``Filter`` (same mapping as Qdrant Edge)."""
    return to_qdrant(f, _ClientDialect, prefix)


# ---------------------------------------------------------------------------- retries
def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ResponseHandlingException):  # connection refused/reset, timeouts
        return True
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in _TRANSIENT_HTTP
    try:
        import grpc

        if isinstance(exc, grpc.RpcError):
            return exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
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
class QdrantRemoteEngine(Engine):
    """A collection on a Qdrant server (or qdrant-client local mode); see the module docstring."""

    name = "qdrant"

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
        # Local mode computes a filtered MaxSim over EVERY stored point before filtering
        # (seconds per query at a few hundred documents); there, candidates are scored
        # from their fetched vectors instead. ``server_scoring=True`` forces the server path.
        self.server_scoring = (not local) if server_scoring is None else bool(server_scoring)

    # ----------------------------------------------------------------- connection
    _ENGINE_OPTS = ("retries", "backoff", "max_request_bytes", "hnsw_ef", "server_scoring")
    _CLIENT_OPTS = ("api_key", "https", "prefer_grpc", "timeout")

    @classmethod
    def _split_options(cls, options: dict) -> tuple[dict, dict]:
        unknown = set(options) - set(cls._ENGINE_OPTS) - set(cls._CLIENT_OPTS)
        if unknown:
            allowed = ", ".join(cls._ENGINE_OPTS + cls._CLIENT_OPTS + ("shards", "replicas"))
            raise TypeError(f"unknown Qdrant engine option(s) {sorted(unknown)}; allowed: {allowed}")
        return (
            {k: options[k] for k in cls._ENGINE_OPTS if k in options},
            {k: options[k] for k in cls._CLIENT_OPTS if k in options},
        )

    @classmethod
    def _connect(cls, location: str, client_opts: dict, *, must_exist: bool) -> tuple[QdrantClient, str, bool, str]:
        kind, target, name = parse_qdrant_location(location)
        if kind == "local":
            if must_exist and not (Path(target) / "meta.json").is_file():
                raise CollectionNotFoundError(f"no qdrant-client local storage at {target}")
            try:
                client = QdrantClient(path=target, force_disable_check_same_thread=True)
            except RuntimeError as exc:
                if "already accessed" in str(exc):
                    raise CollectionInUseError(
                        f"Qdrant local storage {target} is in use by another process (local mode locks its folder; "
                        "use a Qdrant server for several processes)"
                    ) from None
                raise
            return client, name, True, target
        https = bool(client_opts.get("https", False))
        url = ("https://" if https else "http://") + target
        api_key = client_opts.get("api_key", os.environ.get("QDRANT_API_KEY") or None)
        if api_key and not https and target.split(":")[0] not in ("localhost", "127.0.0.1"):
            import warnings

            warnings.warn(
                f"sending a Qdrant API key over plain http to {url}; pass engine_options={{'https': True}}",
                stacklevel=4,
            )
        client = QdrantClient(
            url=url,
            api_key=api_key,
            prefer_grpc=bool(client_opts.get("prefer_grpc", False)),
            timeout=int(client_opts.get("timeout", 60)),
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
            raise ConnectionError(f"cannot reach Qdrant at {url}: {exc}") from None
        return client, name, False, url

    @classmethod
    def exists(cls, location: str, **options: Any) -> bool:
        options = {k: v for k, v in options.items() if k not in ("shards", "replicas")}
        _, client_opts = cls._split_options(options)
        kind, target, name = parse_qdrant_location(location)
        if kind == "local" and not (Path(target) / "meta.json").is_file():
            return False
        client, name, _, _ = cls._connect(location, client_opts, must_exist=False)
        try:
            return bool(client.collection_exists(name))
        finally:
            client.close()

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
    def create(
        cls, location: str, schema: Schema, *, shards: int | None = None, replicas: int | None = None, **options: Any
    ) -> QdrantRemoteEngine:
        engine_opts, client_opts = cls._split_options(options)
        if parse_qdrant_location(location)[0] == "local" and (
            schema.colbert_dtype not in ("float16", "float32") or schema.colbert_quantization is not None
        ):
            raise ValueError(
                "qdrant-client local mode keeps float32 vectors and scores them in NumPy: it cannot honour "
                f"colbert_dtype={schema.colbert_dtype!r} / colbert_quantization={schema.colbert_quantization!r} "
                "(a Qdrant server or the embedded engine can)"
            )
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
                    shard_number=shards,
                    replication_factor=replicas,
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
            client.close()
            raise
        return engine

    @classmethod
    def open(cls, location: str, **options: Any) -> QdrantRemoteEngine:
        engine_opts, client_opts = cls._split_options(options)
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
            schema = Schema.from_dict(meta[META_KEY]["schema"])
            engine = cls(client, location, name, schema, local=local, where=where, **engine_opts)
            engine._check_schema(info)
        except BaseException:
            client.close()
            raise
        return engine

    def _check_schema(self, info: Any) -> None:
        """Refuse a collection whose vectors do not match the manifest's schema."""
        vectors = info.config.params.vectors or {}
        sparse = info.config.params.sparse_vectors or {}
        problems = []
        want = self._vectors_config()
        for vname in ("dense", "colbert"):
            got = vectors.get(vname) if isinstance(vectors, dict) else None
            if got is None:
                problems.append(f"no {vname!r} vector")
                continue
            if got.size != want[vname].size or got.distance != qm.Distance.DOT:
                problems.append(f"{vname!r} is {got.size}-d {got.distance}, expected {want[vname].size}-d Dot")
        col = vectors.get("colbert") if isinstance(vectors, dict) else None
        if col is not None and (
            col.multivector_config is None or col.multivector_config.comparator != qm.MultiVectorComparator.MAX_SIM
        ):
            problems.append("'colbert' is not a MaxSim multivector")
        if "sparse" not in sparse:
            problems.append("no 'sparse' sparse vector")
        if problems:
            raise ValueError(
                f"Qdrant collection {self.collection!r} at {self.where} does not match its m3search schema: "
                + "; ".join(problems)
            )

    def close(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        client.close()

    @property
    def client(self) -> QdrantClient:
        if self._client is None:
            raise RuntimeError(f"collection at {self.location} is closed")
        return self._client

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return _with_retries(fn, what=what, where=self.where, retries=self.retries, backoff=self.backoff)

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict | None:
        meta = self._call("read manifest", lambda: self.client.get_collection(self.collection)).config.metadata or {}
        m = meta.get(META_KEY)
        return json.loads(json.dumps(m)) if m is not None else None

    def write_manifest(self, manifest: dict) -> None:
        value = json.loads(json.dumps(manifest))
        self._call("write manifest", lambda: self.client.update_collection(self.collection, metadata={META_KEY: value}))

    # -------------------------------------------------------------------- writes
    def _points(self, batch: PointBatch) -> tuple[list[qm.PointStruct], list[int]]:
        sparse = batch.sparse.tocsr()
        dense = np.ascontiguousarray(batch.dense, dtype=np.float32)
        colbert = np.ascontiguousarray(batch.colbert, dtype=np.float32)
        if self.schema.colbert_dtype == "float16":
            # Local mode keeps float32 whatever the datatype: round here so every Qdrant scores the same values.
            colbert = colbert.astype(np.float16).astype(np.float32)
        offs = batch.colbert_offsets
        points, sizes = [], []
        for i, doc_id in enumerate(batch.ids):
            a, b = sparse.indptr[i], sparse.indptr[i + 1]
            if offs[i + 1] == offs[i]:
                raise ValueError(f"document {doc_id!r} has no ColBERT vectors (every encoded text has at least </s>)")
            vec = {
                "dense": dense[i].tolist(),
                "sparse": qm.SparseVector(
                    indices=sparse.indices[a:b].tolist(), values=sparse.data[a:b].astype(np.float32).tolist()
                ),
                "colbert": colbert[offs[i] : offs[i + 1]].tolist(),
            }
            payload = {"id": doc_id, "text": batch.texts[i], "metadata": batch.metadata[i] or {}}
            points.append(qm.PointStruct(id=point_uuid(doc_id), vector=vec, payload=payload))
            n_floats = dense.shape[1] + 2 * (b - a) + (offs[i + 1] - offs[i]) * colbert.shape[1]
            sizes.append(14 * int(n_floats) + len(batch.texts[i].encode("utf-8")) * 2 + 512)  # JSON bytes, generously
        return points, sizes

    def upsert(self, batch: PointBatch) -> None:
        batch.validate(self.schema)
        if not batch.has_vectors:
            raise ValueError("upsert needs a batch with vectors")
        points, sizes = self._points(batch)
        start, acc = 0, 0
        for j, size in enumerate(sizes + [self.max_request_bytes + 1]):
            if j == len(points) or (acc + size > self.max_request_bytes and j > start):
                chunk = points[start:j]
                if chunk:
                    self._call(
                        "upload", lambda chunk=chunk: self.client.upsert(self.collection, points=chunk, wait=True)
                    )
                start, acc = j, 0
            acc += size

    def set_metadata(self, ids: Sequence[str], metadata: Sequence[dict]) -> None:
        if len(ids) != len(metadata):
            raise ValueError(f"{len(ids)} ids but {len(metadata)} metadata dicts")
        groups: dict[str, list[str]] = {}
        for doc_id, meta in zip(ids, metadata):
            groups.setdefault(json.dumps(meta, sort_keys=True), []).append(point_uuid(doc_id))
        ops = [
            qm.SetPayloadOperation(set_payload=qm.SetPayload(payload={"metadata": json.loads(key)}, points=uuids))
            for key, uuids in groups.items()
        ]
        if ops:  # one request: applied together
            self._call(
                "set metadata",
                lambda: self.client.batch_update_points(self.collection, update_operations=ops, wait=True),
            )

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            sel = qm.PointIdsList(points=[point_uuid(i) for i in ids])
            self._call("delete", lambda: self.client.delete(self.collection, points_selector=sel, wait=True))

    # --------------------------------------------------------------------- reads
    def existing(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        back = {point_uuid(i): i for i in ids}
        found = self._call(
            "retrieve",
            lambda: self.client.retrieve(self.collection, ids=list(back), with_payload=False, with_vectors=False),
        )
        return {back[str(r.id)] for r in found}

    def get(self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        if not ids:
            return []
        vec = with_vectors if isinstance(with_vectors, bool) else list(with_vectors)
        uuids = [point_uuid(i) for i in ids]
        found = self._call(
            "retrieve", lambda: self.client.retrieve(self.collection, ids=uuids, with_payload=True, with_vectors=vec)
        )
        by_id = {r.payload["id"]: self._record(r) for r in found}
        return [by_id.get(i) for i in ids]

    @staticmethod
    def _record(r: Any) -> Record:
        p = r.payload or {}
        rec = Record(p["id"], p.get("text", ""), p.get("metadata") or {})
        v = r.vector if isinstance(r.vector, dict) else {}
        if "dense" in v:
            rec.dense = np.asarray(v["dense"], dtype=np.float32)
        if "sparse" in v:
            s = v["sparse"]
            rec.sparse = (np.asarray(s.indices, dtype=np.int64), np.asarray(s.values, dtype=np.float32))
        if "colbert" in v:
            rec.colbert = np.asarray(v["colbert"], dtype=np.float32)
        return rec

    def count(self, filter: Filter | None = None) -> int:
        flt = to_client_filter(filter)
        return int(self._call("count", lambda: self.client.count(self.collection, count_filter=flt, exact=True)).count)

    def iter_batches(self, batch_size: int = 256, *, with_vectors: bool = True) -> Iterator[PointBatch]:
        offset = None
        while True:
            records, offset = self._call(
                "scroll",
                lambda off=offset: self.client.scroll(
                    self.collection, limit=batch_size, offset=off, with_payload=True, with_vectors=with_vectors
                ),
            )
            if records:
                yield PointBatch.from_records([self._record(r) for r in records], self.schema.vocab_size)
            if offset is None or not records:
                return

    # ------------------------------------------------------------------- queries
    def _run(self, requests: list) -> list[list]:
        if not requests:
            return []
        res = self._call("query", lambda: self.client.query_batch_points(self.collection, requests=requests))
        return [r.points for r in res]

    @staticmethod
    def _hits(points: Any) -> Hits:
        return [(p.payload["id"], float(p.score)) for p in points]

    def _params(self, exact: bool) -> qm.SearchParams | None:
        if self.local:  # local mode always scans exactly (and warns about any params)
            return None
        return qm.SearchParams(hnsw_ef=self.hnsw_ef, exact=exact)

    def _colbert_params(self) -> qm.SearchParams | None:
        """MaxSim params: with a quantized copy, score on it (``exact=False``: Qdrant ignores quantization
        in exact searches; no graph, so every candidate is still scanned) and rescore as the schema says."""
        if self.local or self.schema.colbert_quantization is None:
            return self._params(True)
        return qm.SearchParams(
            exact=False, quantization=qm.QuantizationSearchParams(ignore=False, rescore=self.schema.colbert_rescore)
        )

    def search_dense(self, q: np.ndarray, k: int, filter: Filter | None = None, *, exact: bool = False) -> list[Hits]:
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        flt, params = to_client_filter(filter), self._params(exact)
        reqs = [
            qm.QueryRequest(query=row.tolist(), using="dense", limit=k, filter=flt, params=params, with_payload=["id"])
            for row in q
        ]
        return [self._hits(r) for r in self._run(reqs)]

    def search_sparse(
        self, q: sp.csr_matrix, k: int, filter: Filter | None = None, *, exact: bool = False
    ) -> list[Hits]:
        q = sp.csr_matrix(q)
        flt, params = to_client_filter(filter), self._params(exact)
        out: list[Hits] = [[] for _ in range(q.shape[0])]
        reqs, rows = [], []
        for i in range(q.shape[0]):
            a, b = q.indptr[i], q.indptr[i + 1]
            if a == b:
                continue  # an empty query shares no token with anything
            vec = qm.SparseVector(indices=q.indices[a:b].tolist(), values=q.data[a:b].astype(np.float32).tolist())
            reqs.append(
                qm.QueryRequest(query=vec, using="sparse", limit=k, filter=flt, params=params, with_payload=["id"])
            )
            rows.append(i)
        for i, res in zip(rows, self._run(reqs)):
            out[i] = self._hits(res)
        return out

    def score(
        self,
        ids: Sequence[str],
        query: QueryVectors,
        modes: Sequence[str] = MODES,
        known: Mapping[str, Mapping[str, float]] | None = None,
        *,
        keys: Sequence[Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Exact scores where the vectors live: one query per mode, filtered to the candidates
        whose score in that mode is not ``known``, ``exact=True`` (local mode: NumPy over
        the candidates' fetched vectors, see ``server_scoring``)."""
        if keys is not None:
            raise NotImplementedError(f"{type(self).__name__} scores by id (its pools carry no keys)")
        ids = list(ids)
        if not self.server_scoring:
            out, todo = prefill_known(ids, modes, known)
            need = sorted({j for m in modes for j in todo[m]})
            if need:
                got = score_records(self.get([ids[j] for j in need], with_vectors=list(modes)), query, modes)
                for m in modes:
                    fill = np.isnan(out[m][need])
                    out[m][np.asarray(need)[fill]] = got[m][fill]
            return out
        out, jobs, uuids = scoring_jobs(ids, query, modes, known)
        if not ids:
            return out
        exact = self._params(True)
        filters: dict[tuple, qm.Filter] = {}  # one per distinct candidate set
        reqs = []
        for m, need in jobs:
            if m == "sparse":
                vec: Any = qm.SparseVector(
                    indices=np.asarray(query.sparse_indices, np.int64).tolist(),
                    values=np.asarray(query.sparse_values, np.float32).tolist(),
                )
            else:
                vec = np.asarray(query.dense if m == "dense" else query.colbert, dtype=np.float32).tolist()
            only = filters.get(need)
            if only is None:
                only = filters[need] = qm.Filter(must=[qm.HasIdCondition(has_id=[uuids[j] for j in need])])
            params = exact if m != "colbert" else self._colbert_params()
            reqs.append(
                qm.QueryRequest(query=vec, using=m, limit=len(need), filter=only, params=params, with_payload=False)
            )
        fill_by_uuid(out, jobs, self._run(reqs), uuids)
        return finish_maxsim_scores(out, ids, query, self.existing)
