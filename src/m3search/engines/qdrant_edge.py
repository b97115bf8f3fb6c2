"""Embedded engine on Qdrant Edge: one folder, the real Qdrant storage engine in-process.

Why Qdrant Edge: it brings Qdrant's write-ahead log (an ``update()`` is atomic and
durable when it returns), HNSW, the sparse inverted index, multivector MaxSim and
payload filters, without a server to start.

Folder layout::

    <path>/manifest.json   the collection manifest (written atomically: tmp + fsync + rename)
    <path>/lock            flock()ed by the process that holds the collection
    <path>/owner.pid       pid of that process (for the error message)
    <path>/shard/          the Qdrant Edge shard (WAL, segments, edge_config.json)

Points: one per window of a document (layout and crash rule in
:mod:`~m3search.engines.qdrant_common`); filters are one nested condition over ``m`` (see there). Named vectors:

* ``dense``   float32, Dot (vectors are L2-normalized already), HNSW graph;
* ``sparse``  Qdrant sparse vector (dot product, inverted index);
* ``colbert`` multivector with MaxSim, NO HNSW graph (``m=0``: token vectors are only
  read to re-rank candidates), stored as TurboQuant 8-bit (``turbo8``) by default (a
  collection that names ``colbert_dtype`` gets that: float16, float32, turbo16, turbo4) and
  kept on disk (``Memory.Cold``, memory-mapped; ``Memory.Cached``, read at open, when
  ``colbert_on_disk`` is False): at 100k documents of ~136 tokens they are ~14 GB in turbo8,
  ~28 GB in float16, at 1024 dims. ``Schema.colbert_quantization`` adds a quantized copy in
  RAM that MaxSim queries score on (``QuantizationSearchParams(rescore=Schema.colbert_rescore)``).
  Closing the shard drops its files from the page cache (Qdrant's doing, measured with
  ``fincore``): a new process's first queries read their candidates from disk.

ONE PROCESS PER COLLECTION. The holder keeps an exclusive ``flock`` on ``<path>/lock``
(released by the kernel when the process dies, even by kill -9); a second process (or a
second open in the same process) gets :class:`CollectionInUseError` naming the holder's
pid BEFORE any Qdrant code runs. Qdrant Edge's own WAL lock is not enough: loading a
shard replays segment journals before it tries that lock, and a failed second load
was seen to truncate the live holder's sparse-vector tracker journal, whose next flush
then failed. Share a collection between clients
through one process (the HTTP server), not by opening the folder twice. Within the
process, Qdrant Edge serves concurrent reads; writes should come from one thread.

NO READ-ONLY OPEN. Qdrant Edge maps its segments for writing even to search (qdrant-edge-py 0.9 has no
read-only mode), so a folder this process cannot write is refused at open with
:class:`CollectionReadOnlyError` (:func:`~m3search.engines.files.writable`): search a copy in a writable place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe
import scipy.sparse as sp

from m3search.engines import FOLDER_LOCK
from m3search.engines.files import (
    TEMPORARY,
    Probed,
    allocated_bytes,
    has_file,
    lock_exclusive,
    readable,
    refuse_a_file_in_the_way,
    refuse_the_wrong_kind,
    refuse_uncreatable,
    refuse_unreadable,
    remove_dead_temporaries,
    walk,
    writable,
    write_durably,
)
from m3search.engines.qdrant_common import QdrantEngine
from m3search.engines.shapes import Pool, QueryVectors, Schema, damaged, read_stored
from m3search.errors import (
    CollectionDamagedError,
    CollectionExistsError,
    CollectionInUseError,
    CollectionNotFoundError,
    InsufficientStorageError,
)
from m3search.filters import Filter
from m3search.plan import MODES, check_deadline, check_options

__all__ = ["QdrantEdgeEngine"]

MANIFEST = "manifest.json"
PIDFILE = "owner.pid"
SHARD = "shard"
_ID_ONLY = qe.PayloadSelector.Include(["id", "gen"])  # gen: see QdrantEngine._committed
#: Flush (persist segments, truncate the WAL) after this many vector bytes written.
WAL_FLUSH_BYTES = 1 << 30
#: Free disk a write needs: DISK_SAFETY x its bytes (vectors as float32 and payload, ``_write``'s estimate; the WAL
#: record and the segment storage each take up to that once; measured on tmpfs: 1.3x with turbo8, 1.9x with float32
#: ColBERT) + DISK_RESERVE, kept for what is not proportional to a write: an optimize's new segment allocates its
#: ColBERT and sparse storage in 32 MiB files (whole on tmpfs: 68 MB at peak to optimize 11 MB of segments), which
#: Qdrant's own check (twice the size of the segments it rebuilds) leaves out; new WAL files, flush, manifest.
DISK_SAFETY = 3
DISK_RESERVE = 128 << 20


_COLBERT_DTYPES = {
    "float32": qe.VectorStorageDatatype.Float32,
    "float16": qe.VectorStorageDatatype.Float16,
    "turbo16": qe.VectorStorageDatatype.Turbo16,
    "turbo8": qe.VectorStorageDatatype.Turbo8,
    "turbo4": qe.VectorStorageDatatype.Turbo4,
}


def _quantization(name: str | None):
    """Qdrant Edge's quantization config for a :data:`~m3search.engines.shapes.COLBERT_QUANTIZATIONS` name.

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

    has_vector = staticmethod(qe.HasVectorCondition)
    is_empty = staticmethod(qe.IsEmptyCondition)
    nested = staticmethod(qe.NestedCondition)

    @staticmethod
    def range(key: str, **bounds: float | None) -> qe.FieldCondition:
        return qe.FieldCondition(key, range=qe.RangeFloat(**bounds))


#: What a failed call that writes left stored, by the shard's method (a read's: :data:`_READ_LEFT`), said by the
#: probe's errors (:meth:`QdrantEdgeEngine._probed`). Measured: a flush failing after an ``add`` (a segment file made
#: 444) left the add's documents searchable, and in the collection opened again once write access was back, though
#: the close's flush had failed too: Qdrant Edge's write-ahead log keeps every update that returned until a flush
#: succeeds.
_LEFT = {
    "update": "Qdrant Edge's update failed: what it was changing may have been stored, the writes before it are",
    **{
        name: f"Qdrant Edge's {name} failed, not the writes before it: they are stored in its write-ahead log, and "
        "the collection has them when opened again where this process may write"
        for name in ("flush", "optimize")
    },
}
_READ_LEFT = "Qdrant Edge's {} failed; nothing was changed"


def _holder(root: Path) -> int | None:
    """The pid the process holding the collection wrote, or None when there is none to read."""
    try:
        return int((root / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _in_use(root: Path) -> CollectionInUseError:
    pid = _holder(root)
    who = f"process {pid}" if pid is not None else "another process"
    return CollectionInUseError(
        f"collection at {root} is in use by {who}; a collection is opened by one process at a time "
        "(stop that process, or send requests to it, e.g. through `m3search serve`)"
    )


def _lock(root: Path) -> int:
    """Take the collection's exclusive lock (non-blocking) or raise CollectionInUseError; returns the fd."""
    fd = lock_exclusive(root / FOLDER_LOCK)
    if fd is None:
        raise _in_use(root)
    return fd


def wait_until_free(root: Path, waiting: str | None = None) -> None:
    """Block until no process holds the collection at ``root`` (``waiting`` printed first if it must wait),
    for a caller that would rather queue than get :class:`CollectionInUseError` (eval's cached index). The
    lock is let go at once: whoever opens the collection next takes it as usual. Held by this very process,
    it is :class:`CollectionInUseError` still: that wait would never end."""
    if _holder(root) == os.getpid():
        raise _in_use(root)
    os.close(lock_exclusive(root / FOLDER_LOCK, wait=True, waiting=waiting))


def _has_manifest(root: Path) -> bool:
    """Whether ``root`` holds a manifest; where this process may not look, :class:`CollectionUnreadableError`, not
    False: that said "no collection at ..." of another user's collection, and let a create go on there."""
    with readable(root):
        return has_file(root / MANIFEST)


def _load_manifest(root: Path) -> dict:
    """The manifest, or an error saying it is damaged (a hand edit, a disk fault) rather than the JSON
    parser's or a KeyError's words, or that it may not be read."""
    try:
        with readable(root):
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _damaged(root, str(exc)) from None
    if not isinstance(manifest, dict):
        raise _damaged(root, f"a JSON {type(manifest).__name__}, not an object")
    return manifest


def _refuse_a_file(root: Path, error: type[Exception]) -> None:
    """A location that is a file holds no collection (:func:`~m3search.engines.files.refuse_the_wrong_kind`)."""
    refuse_the_wrong_kind(root, error, folder=True, what="a collection folder")


def _damaged(root: Path, why: str) -> CollectionDamagedError:
    return damaged(str(root), why, MANIFEST)


def free_bytes(path: Path) -> int:
    """Free disk space where ``path`` is (what an unprivileged process may use)."""
    return shutil.disk_usage(path).free


def _check_free(root: Path, what: str, nbytes: int = 0) -> None:
    """Refuse ``what`` unless the disk has room for ``nbytes`` written (DISK_SAFETY and DISK_RESERVE).

    Why: Qdrant Edge writes through memory-mapped files, so a write that meets a full disk kills the
    process with SIGBUS instead of raising (the collection reopens intact, but the caller learns nothing
    and loses its process). One statvfs call per write batch.
    """
    need = DISK_SAFETY * nbytes + DISK_RESERVE
    free = free_bytes(root)
    if free < need:
        mib = 1 << 20
        raise InsufficientStorageError(
            f"not enough free disk for {what} at {root}: {free / mib:.1f} MiB free, about {need / mib:.1f} MiB "
            f"needed ({DISK_SAFETY} x ~{nbytes / mib:.1f} MiB written + {DISK_RESERVE // mib} MiB reserve); "
            "refused before it started, stored documents are intact: free some space and try again"
        )


class QdrantEdgeEngine(QdrantEngine):
    """Qdrant Edge shard in a folder (see the module docstring for layout and the lock rule)."""

    name = "qdrant-edge"
    #: turbo8: half float16's bytes, `all` 0.58x its warm latency at 10k documents, and inside the
    #: fidelity targets on every proxy collection (benchmarks/RESULTS.md, "ColBERT layouts").
    default_colbert_dtype = "turbo8"
    _dialect = _EdgeDialect
    _sparse_vector = qe.SparseVector
    _search_params, _quantization_params = qe.SearchParams, qe.QuantizationSearchParams

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
        self._shard_dir = root / SHARD  # made once: joined at every shard access, it doubled a probed call's cost

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def _config(schema: Schema) -> qe.EdgeConfig:
        def hnsw(m: int) -> qe.HnswIndexConfig:
            return qe.HnswIndexConfig(m=m, ef_construct=schema.hnsw_ef_construct, full_scan_threshold=10000)

        dense_hnsw = hnsw(schema.hnsw_m)
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
                    hnsw_config=hnsw(0),
                    memory=qe.Memory.Cold if schema.colbert_on_disk else qe.Memory.Cached,
                ),
            },
            sparse_vectors={"sparse": qe.EdgeSparseVectorParams()},
            hnsw_config=dense_hnsw,
        )

    @classmethod
    def exists(cls, location: str, **options: Any) -> bool:
        """Whether ``location`` holds a manifest, which is what makes a collection there: True even where a part of
        it this process may not read (the manifest itself, a shard file), which opening says, naming it. Raises
        :class:`CollectionUnreadableError` only where it cannot tell (a folder it may not look into)."""
        cls._options(options)
        return _has_manifest(Path(location).expanduser())  # as open reads it: "~/c" was False, open found it

    @classmethod
    def _options(cls, options: dict) -> dict:
        """The one engine option (``hnsw_ef``), checked before anything is opened: given to open, an unknown one
        failed in the constructor with the lock taken and the shard loaded, both left held (the next open in this
        process: "in use by another process")."""
        unknown = set(options) - {"hnsw_ef"}
        if unknown:
            raise ValueError(
                f"the embedded engine does not take {sorted(unknown)} (one folder, one shard); "
                "shards and replicas apply to qdrant:// locations"
            )
        return check_options(options, cls._OPTION_RULES)

    @classmethod
    def create(cls, location: str, schema: Schema, **options: Any) -> QdrantEdgeEngine:
        options = cls._options(options)
        root = Path(location).expanduser()
        if _has_manifest(root):
            raise CollectionExistsError(f"a collection already exists at {root}")
        _refuse_a_file(root, CollectionExistsError)
        # what a create that died before its manifest leaves (its lock file first): removed, no collection yet;
        # a folder without our lock file holds someone else's files, whatever their names
        ours = (root / FOLDER_LOCK).is_file()

        def leftover(name: str) -> bool:
            return ours and (name in (PIDFILE, FOLDER_LOCK, SHARD) or name.startswith(MANIFEST + TEMPORARY))

        with readable(root):  # a folder this process may not list may hold anything: never created over
            if root.is_dir() and not all(leftover(p.name) for p in root.iterdir()):
                raise CollectionExistsError(f"{root} is not empty; choose a new folder for a collection")
        refuse_uncreatable(root, root)
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock(root)
        try:
            if (root / SHARD).exists():  # a leftover (above)
                shutil.rmtree(root / SHARD)
            _check_free(root, "creating a collection")
            shard = qe.EdgeShard.create(str(root / SHARD), cls._config(schema))
        except BaseException:
            os.close(lock)
            raise
        engine = cls(root, shard, schema, lock=lock, **options)
        engine._started()
        return engine

    @classmethod
    def open(cls, location: str, **options: Any) -> QdrantEdgeEngine:
        options = cls._options(options)
        root = Path(location).expanduser()
        if not _has_manifest(root):
            _refuse_a_file(root, CollectionNotFoundError)
            refuse_a_file_in_the_way(root, root)
            if (root / SHARD).is_dir():
                raise CollectionNotFoundError(f"{root} holds an incomplete collection (no {MANIFEST}); create it again")
            raise CollectionNotFoundError(f"no collection at {root} (no {MANIFEST})")
        manifest = _load_manifest(root)
        schema, bound = read_stored(manifest, str(root), MANIFEST)
        with writable(root, "Qdrant Edge", "the folder", "cp -r"):
            lock = _lock(root)
            try:
                shard = qe.EdgeShard.load(str(root / SHARD))
            except Exception as exc:
                os.close(lock)
                if "WouldBlock" in str(exc):  # a holder without our lock file (an older m3search)
                    raise _in_use(root) from None
                refuse_unreadable(root, root / SHARD)  # Qdrant's words for it: a Rust PermissionDenied, os error 13
                raise RuntimeError(f"could not open the Qdrant Edge shard at {root / SHARD}: {exc}") from exc
            remove_dead_temporaries(root / MANIFEST)
            engine = cls(root, shard, schema, lock=lock, **options)
            engine._started(bound)
        return engine

    def _started(self, max_windows_stored: int | None = None) -> None:
        """The owner's pid written (and, on open, the stored state read), or the shard and lock released:
        a failure here (disk full) must not leave this process holding a collection nobody can open."""
        try:
            self._write_pid()
            if max_windows_stored is not None:
                self._opened(max_windows_stored)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.close()
            raise

    def _write_pid(self) -> None:
        (self.root / PIDFILE).write_text(f"{os.getpid()}\n")

    def close(self) -> None:
        if self._shard is None:
            return
        shard, self._shard = self._shard, None
        try:
            self._probed(shard).flush()
        finally:
            shard.close()
            with contextlib.suppress(OSError):
                if _holder(self.root) == os.getpid():
                    (self.root / PIDFILE).unlink()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise RuntimeError(f"collection at {self.location} is closed")
        return self._probed(self._shard)

    def _probed(self, shard: qe.EdgeShard) -> qe.EdgeShard:
        """The shard with every call probed (:class:`~m3search.engines.files.Probed`): a part of it made unreadable
        or read-only after open is named, not left to Qdrant's bare Exception, its Rust text the only sign."""
        return Probed(shard, self.root, self._shard_dir, _LEFT, reads=_READ_LEFT)  # type: ignore[return-value]

    def optimize(self) -> bool:
        """Run Qdrant's segment optimizers (builds the dense HNSW graph); True if anything changed.

        Qdrant refuses an optimization itself when the disk has less than twice the size of the segments
        it rebuilds (when it can measure both); that refusal becomes :class:`InsufficientStorageError`, and
        only the reserve is checked here, for what its check leaves out (its temporary segment, the flush).
        """
        shard = self.shard
        _check_free(self.root, "optimizing")
        try:
            return bool(shard.optimize())
        except Exception as exc:
            if "Not enough space available for optimization" not in str(exc):
                raise
            raise InsufficientStorageError(
                f"not enough free disk for optimizing at {self.root} ({exc}); stored documents are intact and "
                "searchable, unoptimized: free some space and optimize again"
            ) from None

    def flush(self) -> None:
        """Persist the segments and truncate the write-ahead log.

        Qdrant Edge never does this on its own (a Qdrant server flushes every 5 s): without
        it the WAL keeps every upsert in float32, ~560 KB per 136-token document, 2x the
        float16 ColBERT storage itself, until close (measured: 2,000 documents left a
        1.3 GB WAL after add + optimize; 140 MB after flush).
        """
        self.shard.flush()
        self._unflushed = 0

    def disk_usage(self) -> dict[str, int]:
        """Allocated bytes by part, from Qdrant's segment layout: ``vector_storage-<name>`` /
        ``vector_index-<name>`` folders are dense / sparse / colbert, ``payload_*`` the
        texts and metadata, ``wal`` the write-ahead log; the rest (manifest, lock, id
        trackers) is ``other``; plus ``total``."""
        parts = dict.fromkeys((*MODES, "payload", "wal", "other", "total"), 0)
        for dirpath, _, names in walk(self.root):
            rel = Path(dirpath).relative_to(self.root).parts
            part = next((m for m in MODES for d in rel if d.endswith(f"-{m}")), None)
            if part is None:
                part = "payload" if any(d.startswith("payload_") for d in rel) else "wal" if "wal" in rel else "other"
            size = sum(allocated_bytes(Path(dirpath) / n) for n in names)
            parts[part] += size
            parts["total"] += size
        return parts

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict | None:
        return _load_manifest(self.root) if _has_manifest(self.root) else None

    def write_manifest(self, manifest: dict) -> None:
        write_durably(self.root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    # -------------------------------------------------------------- client hooks
    def _write(self, points: list[tuple[str, dict | None, dict]], sizes: list[int]) -> None:
        nbytes = sum(sizes) // 3  # ~bytes of float32 vectors and payload
        _check_free(self.root, f"writing {len(points)} points", nbytes)
        out = [qe.Point(uid, self._point_vectors(vec), payload) for uid, vec, payload in points]
        self.shard.update(qe.UpdateOperation.upsert_points(out))  # one WAL record: all or nothing
        self._unflushed += nbytes
        if self._unflushed >= WAL_FLUSH_BYTES:  # bound the WAL during long ingests
            self.flush()

    def _delete_points(self, uuids: list[str]) -> None:
        _check_free(self.root, f"deleting {len(uuids)} points")
        self.shard.update(qe.UpdateOperation.delete_points(uuids))

    def _set_payload(self, ops: list[tuple[dict, list[str]]]) -> None:
        _check_free(self.root, "updating metadata", sum(len(json.dumps(p, default=str)) * len(u) for p, u in ops))
        for payload, uuids in ops:
            self.shard.update(qe.UpdateOperation.set_payload(uuids, payload))

    def _delete_where(self, filter: qe.Filter) -> None:
        _check_free(self.root, "deleting documents")
        self.shard.update(qe.UpdateOperation.delete_points_by_filter(filter))

    def _retrieve(self, uuids: list[str], payload: bool | list[str], vectors: bool | list[str]) -> list[Any]:
        if not uuids:
            return []
        check_deadline("reading points")
        sel = payload if isinstance(payload, bool) else qe.PayloadSelector.Include(payload)
        return self.shard.retrieve(uuids, with_payload=sel, with_vector=vectors)

    def _scroll(self, offset: Any, limit: int, docs_only: bool, with_vectors: bool) -> tuple[list[Any], Any]:
        flt = self._filter(None, docs_only)
        return self.shard.scroll(
            qe.ScrollRequest(offset=offset, limit=limit, filter=flt, with_payload=True, with_vector=with_vectors)
        )

    def _count(self, filter: Filter | None, docs_only: bool) -> int:
        return int(self.shard.count(qe.CountRequest(exact=True, filter=self._filter(filter, docs_only))))

    def _run(self, requests: list) -> list[list]:
        if not requests:
            return []
        check_deadline("an engine query")
        return self.shard.query_batch(qe.QueryBatchRequest(requests))

    def _request(self, mode: str, vector: Any, limit: int, filter: Any, params: Any, with_id: bool) -> qe.QueryRequest:
        payload = _ID_ONLY if with_id else False
        query = qe.Query.Nearest(vector, using=mode)
        return qe.QueryRequest(limit=limit, query=query, filter=filter, params=params, with_payload=payload)

    def _vector(self, mode: str, v: Any) -> Any:
        # a dense query as an array; a multivector as nested lists, taken in half the time of a 2-D array (0.45
        # vs 0.98 ms at 11 x 1024)
        return np.ascontiguousarray(v, dtype=np.float32) if mode == "dense" else super()._vector(mode, v)

    def _has_ids(self, uuids: list[str]) -> qe.Filter:
        return qe.Filter(must=[qe.HasIdCondition(set(uuids))])

    # ------------------------------------------------------------------- queries
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
        Only while every document is one window (a window's MaxSim is then its document's)."""
        if not colbert or self.max_windows > 1:
            return super().candidates_batch(dense, sparse, queries, depth, filter, exact=exact)
        flt, params, maxsim = self._filter(filter), self._params(exact), self._colbert_params()
        reqs = []
        for qv in queries:
            first = ("dense", "sparse") if qv.sparse_indices is not None and len(qv.sparse_indices) else ("dense",)
            near = {m: qe.Query.Nearest(self._query_vector(qv, m), using=m) for m in (*first, "colbert")}
            pre = [qe.Prefetch(limit=depth, query=near[m], params=params, filter=flt) for m in first]
            reqs.append(
                qe.QueryRequest(
                    limit=2 * depth, prefetches=pre, params=maxsim, with_payload=_ID_ONLY, query=near["colbert"]
                )
            )
        pools = []
        for qv, res in zip(queries, self._run(reqs)):
            ids = [p.payload["id"] for p in res]
            scores = np.fromiter((p.score for p in res), dtype=np.float64, count=len(res))
            pools.append(Pool(ids, colbert=scores * self._maxsim_scale(qv)))
        return pools
