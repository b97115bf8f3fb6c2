"""Embedded engine on Qdrant Edge: one folder, the real Qdrant storage engine in-process.

Why Qdrant Edge: it brings Qdrant's write-ahead log (an ``update()`` is atomic and
durable when it returns), HNSW, the sparse inverted index, multivector MaxSim and
payload filters, without a server to start.

Folder layout::

    <path>/manifest.json   the collection manifest (written atomically: tmp + fsync + rename)
    <path>/lock            flock()ed by the process that holds the collection
    <path>/owner.pid       pid of that process (for the error message)
    <path>/shard/          the Qdrant Edge shard (WAL, segments, edge_config.json)

Points: id = UUID5 of the caller's string id (:func:`~m3search.engines.base.point_uuid`);
payload ``{"id": str, "text": str, "metadata": {...}}``; filters address ``metadata.<field>``.
Named vectors:

* ``dense``   float32, Dot (vectors are L2-normalized already), HNSW graph;
* ``sparse``  Qdrant sparse vector (dot product, inverted index);
* ``colbert`` multivector with MaxSim, NO HNSW graph (``m=0``: token vectors are only
  read to re-rank candidates), stored as float16 by default and kept on disk
  (``Memory.Cold``, memory-mapped): at 100k documents of ~136 tokens they would be
  ~28 GB in float16 at 1024 dims. ``Schema.colbert_dtype`` may pick a TurboQuant storage
  codec instead, and ``Schema.colbert_quantization`` adds a quantized copy in RAM that
  MaxSim queries score on (``QuantizationSearchParams(rescore=Schema.colbert_rescore)``).

ONE PROCESS PER COLLECTION. The holder keeps an exclusive ``flock`` on ``<path>/lock``
(released by the kernel when the process dies, even by kill -9); a second process (or a
second open in the same process) gets :class:`CollectionInUseError` naming the holder's
pid BEFORE any Qdrant code runs. Qdrant Edge's own WAL lock is not enough: loading a
shard replays segment journals before it tries that lock, and a failed second load
was seen to truncate the live holder's sparse-vector tracker journal, whose next flush
then failed. Share a collection between clients
through one process (the HTTP server), not by opening the folder twice. Within the
process, Qdrant Edge serves concurrent reads; writes should come from one thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe
import scipy.sparse as sp

from m3search.engines.base import (
    MODES,
    CollectionExistsError,
    CollectionInUseError,
    CollectionNotFoundError,
    Engine,
    Hits,
    PointBatch,
    Pool,
    QueryVectors,
    Record,
    Schema,
    fill_by_uuid,
    finish_maxsim_scores,
    point_uuid,
    scoring_jobs,
)
from m3search.engines.qdrant_filter import to_qdrant
from m3search.filters import Filter

__all__ = ["QdrantEdgeEngine", "to_qdrant_filter"]

MANIFEST = "manifest.json"
PIDFILE = "owner.pid"
LOCKFILE = "lock"
SHARD = "shard"
_ID_ONLY = qe.PayloadSelector.Include(["id"])
#: Flush (persist segments, truncate the WAL) after this many vector bytes written.
WAL_FLUSH_BYTES = 1 << 30


_COLBERT_DTYPES = {
    "float32": qe.VectorStorageDatatype.Float32,
    "float16": qe.VectorStorageDatatype.Float16,
    "turbo16": qe.VectorStorageDatatype.Turbo16,
    "turbo8": qe.VectorStorageDatatype.Turbo8,
    "turbo4": qe.VectorStorageDatatype.Turbo4,
}


def _quantization(name: str | None):
    """Qdrant Edge's quantization config for a :data:`~m3search.engines.base.COLBERT_QUANTIZATIONS` name.

    The quantized copy is kept in RAM (``Memory.Cached``): it is what candidates are scored
    on, while the stored vectors stay where ``colbert_on_disk`` puts them. Qdrant builds it
    when a segment is optimized (the Collection optimizes after every ingest call).
    """
    if name is None:
        return None
    ram = qe.Memory.Cached
    if name.startswith("binary"):
        enc = {"1": "OneBit", "1.5": "OneAndHalfBits", "2": "TwoBits"}[name[len("binary") :]]
        return qe.BinaryQuantizationConfig(encoding=getattr(qe.BinaryQuantizationEncoding, enc), memory=ram)
    if name.startswith("turbo"):
        bits = "Bits" + name[len("turbo") :].replace(".", "_")
        return qe.TurboQuantQuantizationConfig(bits=getattr(qe.TurboQuantBitSize, bits), memory=ram)
    if name == "int8":
        return qe.ScalarQuantizationConfig(qe.ScalarType.Int8, memory=ram)
    return qe.ProductQuantizationConfig(getattr(qe.CompressionRatio, "X" + name[len("pq") :]), memory=ram)


class _EdgeDialect:
    """qdrant-edge-py's filter classes (see :mod:`m3search.engines.qdrant_filter`)."""

    filter = staticmethod(qe.Filter)

    @staticmethod
    def is_filter(node: Any) -> bool:
        return isinstance(node, qe.Filter)

    @staticmethod
    def match(key: str, value: Any) -> qe.FieldCondition:
        if isinstance(value, bool):
            # qdrant-edge-py 0.9 turns a Python bool into the integer 1/0 (which never matches
            # a stored JSON boolean); numpy's bool_ reaches Qdrant as a real bool.
            value = np.bool_(value)
        return qe.FieldCondition(key, match=qe.MatchValue(value))

    @staticmethod
    def match_any(key: str, values: list) -> qe.FieldCondition:
        return qe.FieldCondition(key, match=qe.MatchAny(values))

    @staticmethod
    def range(key: str, **bounds: float | None) -> qe.FieldCondition:
        return qe.FieldCondition(key, range=qe.RangeFloat(**bounds))


def to_qdrant_filter(f: Filter | None, prefix: str = "metadata.") -> qe.Filter | None:
    """The shared filter AST as a Qdrant Edge ``Filter`` over ``metadata.*``."""
    return to_qdrant(f, _EdgeDialect, prefix)


def _sparse_vector(indices: np.ndarray, values: np.ndarray) -> qe.SparseVector:
    return qe.SparseVector(np.asarray(indices, np.int64).tolist(), np.asarray(values, np.float32).tolist())


def _in_use(root: Path) -> CollectionInUseError:
    try:
        pid = int((root / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        pid = None
    who = f"process {pid}" if pid is not None else "another process"
    return CollectionInUseError(
        f"collection at {root} is in use by {who}; a collection is opened by one process at a time "
        "(stop that process, or send requests to it, e.g. through `m3search serve`)"
    )


def _lock(root: Path) -> int:
    """Take the collection's exclusive lock (non-blocking) or raise CollectionInUseError; returns the fd."""
    fd = os.open(root / LOCKFILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(root) from None
    return fd


def _fsync_write(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp file, fsync, rename, fsync dir)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class QdrantEdgeEngine(Engine):
    """Qdrant Edge shard in a folder (see the module docstring for layout and the lock rule)."""

    name = "qdrant-edge"

    def __init__(
        self, root: Path, shard: qe.EdgeShard, schema: Schema, *, lock: int | None = None, hnsw_ef: int | None = None
    ) -> None:
        self.root = root
        self._lock_fd = lock
        self.location = str(root)
        self._shard: qe.EdgeShard | None = shard
        self.schema = schema
        self.hnsw_ef = hnsw_ef
        self._unflushed = 0  # vector bytes written since the last flush (the WAL holds them)

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def _config(schema: Schema) -> qe.EdgeConfig:
        dense_hnsw = qe.HnswIndexConfig(
            m=schema.hnsw_m, ef_construct=schema.hnsw_ef_construct, full_scan_threshold=10000
        )
        return qe.EdgeConfig(
            vectors={
                "dense": qe.EdgeVectorParams(
                    schema.dense_dim,
                    qe.Distance.Dot,
                    datatype=qe.VectorStorageDatatype.Float32,
                    hnsw_config=dense_hnsw,
                    memory=qe.Memory.Cold if schema.dense_on_disk else qe.Memory.Cached,
                ),
                "colbert": qe.EdgeVectorParams(
                    schema.colbert_dim,
                    qe.Distance.Dot,
                    multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim),
                    datatype=_COLBERT_DTYPES[schema.colbert_dtype],
                    quantization_config=_quantization(schema.colbert_quantization),
                    # m=0: no graph over token vectors; they are read only to re-rank candidates.
                    hnsw_config=qe.HnswIndexConfig(
                        m=0, ef_construct=schema.hnsw_ef_construct, full_scan_threshold=10000
                    ),
                    memory=qe.Memory.Cold if schema.colbert_on_disk else qe.Memory.Cached,
                ),
            },
            sparse_vectors={"sparse": qe.EdgeSparseVectorParams()},
            hnsw_config=dense_hnsw,
        )

    @classmethod
    def exists(cls, location: str, **options: Any) -> bool:
        return (Path(location) / MANIFEST).is_file()

    @classmethod
    def create(cls, location: str, schema: Schema, **options: Any) -> QdrantEdgeEngine:
        unknown = set(options) - {"hnsw_ef"}
        if unknown:
            raise ValueError(
                f"the embedded engine does not take {sorted(unknown)} (one folder, one shard); "
                "shards and replicas apply to qdrant:// locations"
            )
        root = Path(location).expanduser()
        if (root / MANIFEST).is_file():
            raise CollectionExistsError(f"a collection already exists at {root}")
        if root.exists() and not root.is_dir():
            raise CollectionExistsError(f"{root} exists and is not a folder")
        if root.is_dir() and any(p.name not in (PIDFILE, LOCKFILE, SHARD) for p in root.iterdir()):
            raise CollectionExistsError(f"{root} is not empty; choose a new folder for a collection")
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock(root)
        try:
            if (root / SHARD).exists():
                # Left over by a create that died before its manifest was written: no collection yet.
                shutil.rmtree(root / SHARD)
            shard = qe.EdgeShard.create(str(root / SHARD), cls._config(schema))
        except BaseException:
            os.close(lock)
            raise
        engine = cls(root, shard, schema, lock=lock, **options)
        engine._write_pid()
        return engine

    @classmethod
    def open(cls, location: str, **options: Any) -> QdrantEdgeEngine:
        root = Path(location).expanduser()
        if not (root / MANIFEST).is_file():
            if (root / SHARD).is_dir():
                raise CollectionNotFoundError(f"{root} holds an incomplete collection (no {MANIFEST}); create it again")
            raise CollectionNotFoundError(f"no collection at {root} (no {MANIFEST})")
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        schema = Schema.from_dict(manifest["schema"])
        lock = _lock(root)
        try:
            shard = qe.EdgeShard.load(str(root / SHARD))
        except Exception as exc:
            os.close(lock)
            if "WouldBlock" in str(exc):  # a holder without our lock file (an older m3search)
                raise _in_use(root) from None
            raise RuntimeError(f"could not open the Qdrant Edge shard at {root / SHARD}: {exc}") from exc
        engine = cls(root, shard, schema, lock=lock, **options)
        engine._write_pid()
        return engine

    def _write_pid(self) -> None:
        (self.root / PIDFILE).write_text(f"{os.getpid()}\n")

    def close(self) -> None:
        if self._shard is None:
            return
        shard, self._shard = self._shard, None
        try:
            shard.flush()
        finally:
            shard.close()
            try:
                if (self.root / PIDFILE).read_text().strip() == str(os.getpid()):
                    (self.root / PIDFILE).unlink()
            except OSError:
                pass
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise RuntimeError(f"collection at {self.location} is closed")
        return self._shard

    def optimize(self) -> bool:
        """Run Qdrant's segment optimizers (builds the dense HNSW graph); True if anything changed."""
        return bool(self.shard.optimize())

    def flush(self) -> None:
        """Persist the segments and truncate the write-ahead log.

        Qdrant Edge never does this on its own (a Qdrant server flushes every 5 s): without
        it the WAL keeps every upsert in float32, ~560 KB per 136-token document, 2x the
        float16 ColBERT storage itself, until close (measured: 2,000 documents left a
        1.3 GB WAL after add + optimize; 140 MB after flush).
        """
        self.shard.flush()
        self._unflushed = 0

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict | None:
        p = self.root / MANIFEST
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def write_manifest(self, manifest: dict) -> None:
        _fsync_write(self.root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    # -------------------------------------------------------------------- writes
    def upsert(self, batch: PointBatch) -> None:
        batch.validate(self.schema)
        if not batch.has_vectors:
            raise ValueError("upsert needs a batch with vectors")
        sparse = batch.sparse.tocsr()
        offs = batch.colbert_offsets.tolist()
        indptr = sparse.indptr.tolist()
        # NumPy rows cross into Rust faster than Python lists: 80-85 vs 42-65 docs/s for 128-doc
        # batches of 1024-d x 16-256 tokens, alternating runs on an idle machine (qdrant-edge-py 0.9).
        dense = np.ascontiguousarray(batch.dense, dtype=np.float32)
        colbert = np.ascontiguousarray(batch.colbert, dtype=np.float32)
        indices, data = sparse.indices.tolist(), sparse.data.astype(np.float32).tolist()
        points = []
        for i, doc_id in enumerate(batch.ids):
            a, b = indptr[i], indptr[i + 1]
            if offs[i + 1] == offs[i]:
                raise ValueError(f"document {doc_id!r} has no ColBERT vectors (every encoded text has at least </s>)")
            vectors = {
                "dense": dense[i],
                "sparse": qe.SparseVector(indices[a:b], data[a:b]),
                "colbert": colbert[offs[i] : offs[i + 1]],
            }
            payload = {"id": doc_id, "text": batch.texts[i], "metadata": batch.metadata[i]}
            points.append(qe.Point(point_uuid(doc_id), vectors, payload))
        if points:
            self.shard.update(qe.UpdateOperation.upsert_points(points))  # one WAL record: all or nothing
            self._unflushed += dense.nbytes + colbert.nbytes + 8 * len(data)
            if self._unflushed >= WAL_FLUSH_BYTES:  # bound the WAL during long ingests
                self.flush()

    def set_metadata(self, ids: Sequence[str], metadata: Sequence[dict]) -> None:
        if len(ids) != len(metadata):
            raise ValueError(f"{len(ids)} ids but {len(metadata)} metadata dicts")
        # One write per distinct metadata value (a single write when all are equal).
        groups: dict[str, list[str]] = {}
        for doc_id, meta in zip(ids, metadata):
            groups.setdefault(json.dumps(meta, sort_keys=True), []).append(point_uuid(doc_id))
        for key, uuids in groups.items():
            self.shard.update(qe.UpdateOperation.set_payload(uuids, {"metadata": json.loads(key)}))

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self.shard.update(qe.UpdateOperation.delete_points([point_uuid(i) for i in ids]))

    # --------------------------------------------------------------------- reads
    def existing(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        back = {point_uuid(i): i for i in ids}
        found = self.shard.retrieve(list(back), with_payload=False, with_vector=False)
        return {back[str(r.id)] for r in found}

    def get(self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        # Qdrant Edge hands point ids back as uuid.UUID: ask by the same objects to match them.
        return self.get_by_keys([uuid.UUID(point_uuid(i)) for i in ids], with_vectors=with_vectors)

    def get_by_keys(self, keys: Sequence[Any], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        if not keys:
            return []
        vec = with_vectors if isinstance(with_vectors, bool) else list(with_vectors)
        found = self.shard.retrieve(list(keys), with_payload=True, with_vector=vec)
        by_key = {r.id: self._record(r) for r in found}
        return [by_key.get(k) for k in keys]

    def _existing_keys(self, keys: Sequence[Any]) -> set[Any]:
        return {r.id for r in self.shard.retrieve(list(keys), with_payload=False, with_vector=False)} if keys else set()

    @staticmethod
    def _record(r) -> Record:
        p = r.payload
        rec = Record(p["id"], p.get("text", ""), p.get("metadata") or {})
        v = r.vector or {}
        if "dense" in v:
            rec.dense = np.asarray(v["dense"], dtype=np.float32)
        if "sparse" in v:
            s = v["sparse"]
            rec.sparse = (np.asarray(s.indices, dtype=np.int64), np.asarray(s.values, dtype=np.float32))
        if "colbert" in v:
            rec.colbert = np.asarray(v["colbert"], dtype=np.float32)
        return rec

    def count(self, filter: Filter | None = None) -> int:
        return int(self.shard.count(qe.CountRequest(exact=True, filter=to_qdrant_filter(filter))))

    def iter_batches(self, batch_size: int = 256, *, with_vectors: bool = True) -> Iterator[PointBatch]:
        offset = None
        while True:
            records, offset = self.shard.scroll(
                qe.ScrollRequest(offset=offset, limit=batch_size, with_payload=True, with_vector=with_vectors)
            )
            if records:
                yield PointBatch.from_records([self._record(r) for r in records], self.schema.vocab_size)
            if offset is None or not records:
                return

    # ------------------------------------------------------------------- queries
    def _params(self, exact: bool) -> qe.SearchParams:
        return qe.SearchParams(hnsw_ef=self.hnsw_ef, exact=exact)

    def _colbert_params(self) -> qe.SearchParams:
        """MaxSim search params. Without a quantized copy: ``exact``. With one: NOT ``exact``, which
        makes Qdrant ignore quantization (measured, qdrant-edge 0.9); the token vectors have no
        graph (m=0), so the query still scans every candidate, on the quantized copy, rescored on
        the stored vectors when ``colbert_rescore`` (the limit covers all candidates: all are rescored).
        """
        if self.schema.colbert_quantization is None:
            return qe.SearchParams(exact=True)
        return qe.SearchParams(
            exact=False, quantization=qe.QuantizationSearchParams(ignore=False, rescore=self.schema.colbert_rescore)
        )

    def _run(self, requests: list) -> list[list]:
        if not requests:
            return []
        return self.shard.query_batch(qe.QueryBatchRequest(requests))

    @staticmethod
    def _hits(points) -> Hits:
        return [(p.payload["id"], float(p.score)) for p in points]

    def search_dense(self, q: np.ndarray, k: int, filter: Filter | None = None, *, exact: bool = False) -> list[Hits]:
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        flt, params = to_qdrant_filter(filter), self._params(exact)
        reqs = [
            qe.QueryRequest(
                limit=k, query=qe.Query.Nearest(row, using="dense"), filter=flt, params=params, with_payload=_ID_ONLY
            )
            for row in q
        ]
        return [self._hits(r) for r in self._run(reqs)]

    def search_sparse(
        self, q: sp.csr_matrix, k: int, filter: Filter | None = None, *, exact: bool = False
    ) -> list[Hits]:
        q = sp.csr_matrix(q)
        flt, params = to_qdrant_filter(filter), self._params(exact)
        out: list[Hits] = [[] for _ in range(q.shape[0])]
        reqs, rows = [], []
        for i in range(q.shape[0]):
            a, b = q.indptr[i], q.indptr[i + 1]
            if a == b:
                continue  # an empty query shares no token with anything
            vec = _sparse_vector(q.indices[a:b], q.data[a:b])
            reqs.append(
                qe.QueryRequest(
                    limit=k,
                    query=qe.Query.Nearest(vec, using="sparse"),
                    filter=flt,
                    params=params,
                    with_payload=_ID_ONLY,
                )
            )
            rows.append(i)
        for i, res in zip(rows, self._run(reqs)):
            out[i] = self._hits(res)
        return out

    def candidates_batch(
        self,
        dense: np.ndarray,
        sparse: sp.csr_matrix,
        queries: Sequence[QueryVectors],
        depth: int,
        filter: Filter | None = None,
        *,
        exact: bool = False,
        colbert: bool = False,
    ) -> list[Pool]:
        """With ``colbert``: ONE request per query, Qdrant's prefetch of dense top-``depth``
        and sparse top-``depth`` re-scored by MaxSim over their whole union (limit 2 x depth),
        so the pool and its exact ColBERT scores cost what Qdrant's own hybrid query costs.
        The pool holds point keys, not ids (no payload read, see :class:`Pool`)."""
        if not colbert:
            return super().candidates_batch(dense, sparse, queries, depth, filter, exact=exact)
        flt, params = to_qdrant_filter(filter), self._params(exact)
        reqs = []
        for qv in queries:
            pre = [
                qe.Prefetch(
                    limit=depth,
                    query=qe.Query.Nearest(self._query_vector(qv, "dense"), using="dense"),
                    params=params,
                    filter=flt,
                )
            ]
            if qv.sparse_indices is not None and len(qv.sparse_indices):
                pre.append(
                    qe.Prefetch(
                        limit=depth,
                        query=qe.Query.Nearest(self._query_vector(qv, "sparse"), using="sparse"),
                        params=params,
                        filter=flt,
                    )
                )
            reqs.append(
                qe.QueryRequest(
                    limit=2 * depth,
                    prefetches=pre,
                    params=self._colbert_params(),
                    with_payload=False,
                    query=qe.Query.Nearest(self._query_vector(qv, "colbert"), using="colbert"),
                )
            )
        pools = []
        for qv, res in zip(queries, self._run(reqs)):
            keys = [p.id for p in res]  # uuid.UUID as returned: str() would cost 0.6 us each
            maxsim = np.fromiter((p.score for p in res), dtype=np.float64, count=len(res))
            pools.append(Pool(None, colbert=maxsim / max(len(qv.colbert), 1), keys=keys))  # Qdrant sums, M3 averages
        return pools

    def score(
        self,
        ids: Sequence[str] | None,
        query: QueryVectors,
        modes: Sequence[str] = MODES,
        known: Mapping[str, Mapping[str, float]] | None = None,
        *,
        keys: Sequence[Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Exact scores where the vectors live: one query per mode (all in one batch call),
        each filtered to the candidates whose score in that mode is not ``known``."""
        ids = list(ids) if ids is not None else None
        out, jobs, uuids = scoring_jobs(ids, query, modes, known, keys)
        if not (ids if ids is not None else keys):
            return out
        exact = qe.SearchParams(exact=True)
        colbert_params = self._colbert_params()
        filters: dict[tuple, qe.Filter] = {}  # one per distinct candidate set (~0.5 ms each at 400 ids)
        reqs = []
        for m, need in jobs:
            only = filters.get(need)
            if only is None:
                only = filters[need] = qe.Filter(must=[qe.HasIdCondition({uuids[j] for j in need})])
            reqs.append(
                qe.QueryRequest(
                    limit=len(need),
                    query=qe.Query.Nearest(self._query_vector(query, m), using=m),
                    filter=only,
                    params=colbert_params if m == "colbert" else exact,
                    with_payload=False,
                )
            )
        fill_by_uuid(out, jobs, self._run(reqs), uuids)
        if ids is None:
            return finish_maxsim_scores(out, list(keys), query, self._existing_keys)
        return finish_maxsim_scores(out, ids, query, self.existing)

    @staticmethod
    def _query_vector(query: QueryVectors, mode: str):
        if mode == "sparse":
            return _sparse_vector(query.sparse_indices, query.sparse_values)
        if mode == "dense":
            return np.ascontiguousarray(query.dense, dtype=np.float32)
        # qdrant-edge takes nested lists of a multivector in half the time of a 2-D array (0.45 vs 0.98 ms at 11 x 1024)
        return np.asarray(query.colbert, dtype=np.float32).tolist()
