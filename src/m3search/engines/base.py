"""The engine protocol: what a storage backend must do for :class:`m3search.Collection`.

Why a protocol of our own: the collection (ids, manifest, encoding, modes, fusion, explain)
is the same whatever stores the vectors; an engine stores documents and answers three kinds
of query. Qdrant Edge (embedded, the default), a Qdrant server and Milvus are one module
each. The Collection is the only caller; engines never encode, never fuse, never see a model.

What an engine stores and returns (documents as one or more windows, each with dense,
sparse and ColBERT vectors; a document's score per mode = its best window's) is defined in
:mod:`m3search.engines.shapes`, with the storage choices fixed at creation (``Schema``) and the
NumPy reference scorer.

Writing an engine: subclass :class:`Engine`, implement its abstract methods (each docstring
is the contract), register a location scheme (:func:`m3search.engines.register_engine`) and
add the location to ``tests/test_engines.py``: the same suite runs on every engine. The
smallest complete engine (a dict of records, the abstract methods only) is ``MemoryEngine``
in ``tests/test_engine_protocol.py``. Every method keeps these rules:

1. Per document. Methods take and return the caller's DOCUMENT ids (str); ids, text and
   metadata are per document; how windows map to storage rows is the engine's business
   (Qdrant: one point per window, :mod:`.qdrant_common`).
2. Windows. An engine that keeps ``windowed = False`` stores one window per document (the
   Collection never gives it more) and may ignore :attr:`PointBatch.windows`; the hooks
   ``get_windows``, ``score_windows``, ``stored_units`` and ``upsert_long`` have defaults for it.
3. Crash rule. ``upsert`` is ONE atomic, durable write: after kill -9 a batch is fully there
   or absent, and a re-written document is its old or its new set of windows, never a mix (no
   old window stays visible to count, search or get). ``upsert_long`` keeps that rule, or at
   least leaves the document absent, never mixed (the default, the Qdrant and the Milvus
   engines keep the old version; Milvus leaves it absent only when its switch exceeds one
   request, :mod:`.milvus`).
4. Exactness. ``score`` / ``score_windows`` are EXACT (no ANN, no "missing = 0" beyond a
   sparse window sharing no token with the query); the defaults compute them in NumPy
   (:func:`score_records`) over fetched vectors, an engine may compute them where the vectors
   live. ``search_*`` may use an ANN index unless ``exact=True``.
5. Filters (:mod:`m3search.filters` AST) address the document metadata and run INSIDE the
   engine's queries and counts, so ``k`` hits come back even when few documents match.
6. One writer. An embedded engine locks its storage exclusively and raises
   :class:`CollectionInUseError` when another process holds it. The manifest is a JSON-able
   dict the Collection owns; where it is kept is the engine's business.
7. Shared storage. An engine whose storage other clients write at the same time (a server)
   sets :attr:`shared`: the Collection then re-reads the manifest's window bound
   (:attr:`max_windows`) before each call, since another client may have stored longer documents,
   and takes another client's pending long write for a crashed one's only when its lease has run out.
   Every manifest change is a read-modify-write, so a client holding an older copy could write a raised
   bound back down: such an engine also keeps each raise as a record of its own, named by its value
   (:meth:`record_window_bound`, :func:`with_bound`), which no manifest write touches.
   Where those clients can only be other handles in this process (the storage is locked against other
   processes: Milvus Lite's file, qdrant-client local mode's folder), the engine names the storage in
   :attr:`process_store`: a pending long write of a client that is no open handle of this process on it
   is then a crashed one's at once (a process killed part-way), with no lease to wait for.
"""

from __future__ import annotations

import hashlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from m3search.engines.files import allocated_bytes
from m3search.engines.shapes import (
    Hits,
    PointBatch,
    Pool,
    QueryVectors,
    Record,
    Schema,
    WindowScores,
    score_records,
)
from m3search.errors import CollectionExistsError, CollectionInUseError, CollectionNotFoundError
from m3search.filters import Filter
from m3search.plan import MODES  # the three representations, in the order weights are given

__all__ = [  # and, for an engine's author, the shapes and errors its methods take and raise
    "ID_NAMESPACE",
    "BOUND_RECORD",
    "Engine",
    "bound_records",
    "with_bound",
    "split_requests",
    "wanted_modes",
    "point_uuid",
    "Schema",
    "PointBatch",
    "Record",
    "QueryVectors",
    "Pool",
    "WindowScores",
    "Hits",
    "score_records",
    "CollectionExistsError",
    "CollectionInUseError",
    "CollectionNotFoundError",
]

#: Namespace for mapping caller string ids to UUIDs (engines that only take UUID/int ids).
ID_NAMESPACE = uuid.UUID("6b1f3a52-7c1e-5b8e-9a43-2f0d9e3c1a77")
#: The creation options of a distributed engine (Qdrant server, Milvus), as :func:`~m3search.plan.check_options`
#: checks them: shard and replica counts, None for the engine's default. In each engine's rules, so that every
#: way to a create (Collection.create, migrate's destination) checks them alike.
CREATE_OPTION_RULES: dict[str, dict[str, bool]] = {
    "shards": {"integer": True, "none": True},
    "replicas": {"integer": True, "none": True},
}
#: Name prefix of the window-bound records of shared storage (rule 7): ``max_windows_stored:3`` says a
#: stored document may have 3 rows. One record per value: two raisers never overwrite each other's.
BOUND_RECORD = "max_windows_stored:"


def bound_records(names: Iterable[str]) -> list[int]:
    """The values of the window-bound records among ``names`` (other names are ignored)."""
    cut = len(BOUND_RECORD)
    return [int(n[cut:]) for n in names if n.startswith(BOUND_RECORD) and n[cut:].isdigit()]


def with_bound(manifest: dict | None, names: Iterable[str]) -> dict | None:
    """``manifest`` with ``max_windows_stored`` raised to the largest bound record among ``names``: another
    client's manifest write may have put back an older, lower value. The manifest's own value is the floor
    (a collection from before the records has none)."""
    most = max(bound_records(names), default=0)
    floor = manifest.get("max_windows_stored", 1) if isinstance(manifest, dict) else None
    readable = isinstance(floor, (int, float)) and not isinstance(floor, bool)  # else damage: the open names it
    if readable and most > floor:  # (shapes.read_stored)
        manifest["max_windows_stored"] = most
    return manifest


def split_requests(sizes: Sequence[int], cut: Sequence[bool], limit: int | None) -> Iterator[slice]:
    """Consecutive slices of points for requests of about ``limit`` bytes at most (None: one request),
    cut only before a point where ``cut`` is True (so a request may exceed ``limit`` until the next cut)."""
    start, acc = 0, 0
    for j, size in enumerate(sizes):
        if limit is not None and j > start and cut[j] and acc + size > limit:
            yield slice(start, j)
            start, acc = j, 0
        acc += size
    if start < len(sizes):
        yield slice(start, len(sizes))


def wanted_modes(modes: bool | Iterable[str]) -> tuple[str, ...]:
    """The modes a ``with_vectors`` or ``score_windows`` argument names (True: all, falsy: none), each checked
    against :data:`MODES`: one message for an unknown name, whichever engine and call it came through."""
    if modes is True:
        return MODES
    if not modes:
        return ()
    modes = tuple(modes)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
    return modes


def point_uuid(id: str, namespace: bytes = ID_NAMESPACE.bytes) -> str:
    """Deterministic UUID5 of a caller id (same in every engine and process), in ``namespace``.

    Equal to ``str(uuid.uuid5(uuid.UUID(bytes=namespace), id))`` (RFC 4122: SHA-1 of namespace
    + name, version and variant bits set), without building ``UUID`` objects: it runs for every
    candidate of every query, where ``uuid.uuid5`` cost ~3 ms per query at 400 candidates.
    """
    h = bytearray(hashlib.sha1(namespace + id.encode("utf-8")).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


class Engine(ABC):
    """A storage backend (module docstring: data model and the rules every method keeps).

    Required: the abstract methods. Optional hooks have defaults that hold the contract for
    an engine that stores one window per document and answers exact scores from fetched
    vectors; override them where the engine can do better (windows, scoring where the
    vectors live, one-request candidate pools).
    """

    #: Short name shown in manifests and errors ("qdrant-edge", "qdrant", "milvus").
    name: ClassVar[str] = "engine"
    #: Whether a document may be stored as several windows (False: the Collection caps it at one).
    windowed: ClassVar[bool] = False
    #: ColBERT storage type of a new collection that names none (chosen per engine by measurement:
    #: benchmarks/RESULTS.md, "ColBERT layouts"); a collection keeps the one its manifest records.
    default_colbert_dtype: ClassVar[str] = "float16"
    #: Whether other clients may write this storage while it is open (rule 7): a server's. Such storage
    #: may also hold what an interrupted create left, which only the server can remove.
    shared: ClassVar[bool] = False

    location: str
    schema: Schema
    #: Most storage rows any stored document has had (the manifest's ``max_windows_stored``, kept
    #: by the Collection from :meth:`stored_units`). 1 lets engines skip all window work.
    max_windows: int = 1

    @property
    def process_store(self) -> str | None:
        """For ``shared`` storage that only this process can write (locked against other processes), a name
        of it, the same for every handle on it (rule 7); None where other processes may write (a server)."""
        return None

    # --- lifecycle -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def create(cls, location: str, schema: Schema, **options: Any) -> Engine:
        """Create empty storage at ``location`` (CollectionExistsError if one is there)."""

    @classmethod
    @abstractmethod
    def open(cls, location: str, **options: Any) -> Engine:
        """Open existing storage (CollectionNotFoundError if none; CollectionInUseError if locked)."""

    @classmethod
    @abstractmethod
    def exists(cls, location: str, **options: Any) -> bool:
        """Whether ``location`` holds a collection of this engine."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release storage and locks (idempotent)."""

    def flush(self) -> None:  # noqa: B027 (an optional hook, a no-op by default)
        """Persist everything written so far to the engine's main storage (blocking); called at the
        end of an ingest call. Default: nothing (the engine persists on its own)."""

    def optimize(self) -> bool:
        """Build pending indexes / merge segments now (blocking); True if anything changed. Called
        after an ingest call. Default: nothing (the engine indexes on its own)."""
        return False

    def disk_usage(self) -> dict[str, int] | None:
        """Bytes on disk, ``{"total": n}`` at least, or None when the storage is not local
        (a server). Engines that know their layout also split it by part (dense, sparse, ...)."""
        root = Path(self.location)
        return {"total": allocated_bytes(root)} if root.exists() else None

    # --- manifest --------------------------------------------------------------------
    @abstractmethod
    def read_manifest(self) -> dict | None:
        """The manifest dict last written, or None (raised by the bound records, :meth:`record_window_bound`)."""

    @abstractmethod
    def write_manifest(self, manifest: dict) -> None:
        """Replace the manifest atomically (JSON-able dict)."""

    def record_window_bound(self, most: int) -> None:  # noqa: B027 (an optional hook, a no-op by default)
        """Where other clients write the manifest too (``shared``): record, where no manifest write reaches,
        that a stored document may take ``most`` rows, so :meth:`read_manifest` returns at least that bound
        (:func:`with_bound`; records below ``most`` may go). Default: nothing, the manifest's key is enough
        (one writer)."""

    # --- writes ----------------------------------------------------------------------
    @abstractmethod
    def upsert(self, batch: PointBatch) -> None:
        """Insert or REPLACE every document of ``batch`` (all its windows) in ONE atomic, durable write.

        A document stored before with more windows than now must not keep any of them visible.
        """

    def upsert_long(self, pieces: Iterable[PointBatch], gen: int = 0) -> None:
        """Insert or replace ONE document whose windows arrive in pieces (one-document batches of
        consecutive windows, window 0 in the first), so memory is bounded by a piece, not the text.
        ``gen``: a number of this write's own (the Collection draws it at random and records it in its pending
        mark; 0: none), so an engine can keep its points apart from those of any other write of the document
        (another client's, begun at the same moment), and :meth:`tidy` can find them after a crash.

        Contract: count, get and search never see part of the new version; after a crash the
        document is its old version (or, where the engine says so, absent), never a mix. Default:
        every piece held, then one :meth:`upsert` (memory: the whole document).
        """
        self.upsert(PointBatch.join(list(pieces), one_document=True))

    def stored_units(self, batch: PointBatch) -> int:
        """Most storage rows one document of ``batch`` takes (the Collection records the maximum in the
        manifest before writing, as :attr:`max_windows`). Default: its windows."""
        return int(np.diff(batch.window_offsets).max(initial=1))

    @abstractmethod
    def set_metadata(self, ids: Sequence[str], metadata: Sequence[dict]) -> None:
        """Replace the metadata of existing documents (vectors and text untouched), atomically."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Delete the documents (all windows) that exist among ``ids`` (unknown ids are ignored)."""

    def purge(self, ids: Sequence[str], gens: Sequence[int] = ()) -> None:  # noqa: B027 (optional, no-op by default)
        """Remove what interrupted long writes (``gens``: theirs, see :meth:`upsert_long`; empty: any) of documents
        NOT stored left (crash recovery, rare: may scan the storage), but nothing an :meth:`upsert` or another
        long write writes: where others write (``shared``), another client may have begun writing such a document
        since the caller found it absent. Default: nothing (the default ``upsert_long`` is one :meth:`upsert`: it
        leaves nothing)."""

    def tidy(self, ids: Sequence[str], gens: Sequence[int] = ()) -> None:
        """Remove what interrupted long writes (``gens``: those of their pending marks that had one) left beside
        STORED documents, hidden from every read (crash recovery, rare: may scan the storage), such as the
        tombstones of a write stopped after its switch. Default: nothing (an engine whose ``upsert_long`` leaves
        nothing behind)."""
        return None

    # --- reads -----------------------------------------------------------------------
    @abstractmethod
    def get(self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        """Documents in input order (whole text, metadata, window spans), None for unknown ids.

        ``with_vectors``: False, True (all three) or a list of names from :data:`MODES`; the
        vectors are those of window 0.
        """

    def existing(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` that is stored. Default: :meth:`get` (reads the texts too)."""
        return {r.id for r in self.get(list(ids)) if r is not None}

    def get_windows(
        self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = True, windows: range | None = None
    ) -> list[list[Record]]:
        """All window records of each document, in window order ([] for unknown ids); ``windows``: only
        those whose index it holds (a long document read a piece at a time: migrate). Default for
        one-window engines: the document's own record."""
        if windows is not None and 0 not in windows:
            return [[] for _ in ids]
        return [[r] if r is not None else [] for r in self.get(ids, with_vectors=with_vectors)]

    @abstractmethod
    def count(self, filter: Filter | None = None) -> int:
        """Number of stored documents (matching ``filter``), exact."""

    @abstractmethod
    def iter_batches(self, batch_size: int = 256, *, with_vectors: bool = True) -> Iterator[PointBatch]:
        """Every stored document with all its windows, in batches (export, migration between engines)."""

    # --- queries ---------------------------------------------------------------------
    @abstractmethod
    def search_dense(self, q: np.ndarray, k: int, filter: Filter | None = None, *, exact: bool = False) -> list[Hits]:
        """Top-k DOCUMENTS by dense dot product (best window) for each row of ``q`` (float32 ``(nq, d)``).

        Returns one ``[(id, score), ...]`` list per query, best first. ``exact=True``
        forces a full scan instead of the ANN index.
        """

    @abstractmethod
    def search_sparse(
        self, q: sp.csr_matrix, k: int, filter: Filter | None = None, *, exact: bool = False
    ) -> list[Hits]:
        """Top-k documents by sparse dot product (best window) for each row of ``q`` (CSR ``(nq, vocab)``).

        Documents sharing no token with the query score 0 and need not be returned.
        """

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
        """The re-ranking pool of each query: dense top-``depth`` ∪ sparse top-``depth`` documents.

        ``colbert=True`` says the caller will need the pool's ColBERT scores; an engine that
        can compute them while gathering the pool (Qdrant: prefetch + MaxSim in one request)
        returns them in :attr:`Pool.colbert`. Default: the two first-stage searches, the
        hits' own scores as ``known``.
        """
        dense_lists = self.search_dense(dense, depth, filter, exact=exact)
        sparse_lists = self.search_sparse(sparse, depth, filter, exact=exact)
        return [
            Pool(
                list(dict.fromkeys(i for i, _ in [*d, *s])),
                {"dense": dict(d), "sparse": dict(s)},
                found_by={"dense": {i for i, _ in d}, "sparse": {i for i, _ in s}},
            )
            for d, s in zip(dense_lists, sparse_lists)
        ]

    def score(
        self,
        ids: Sequence[str],
        query: QueryVectors,
        modes: Sequence[str] = MODES,
        known: Mapping[str, Mapping[str, float]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Exact document scores (per mode, the maximum over the document's windows) for one query.

        Returns ``{mode: float64 array aligned with ids}`` for each mode in ``modes`` (NaN for
        ids that are not stored). ``known``: ``{mode: {id: score}}`` that the caller already
        holds exactly (the first-stage hits); an engine may return those instead of
        recomputing them. Default: the per-document maximum of :meth:`score_windows`.
        """
        return self.score_windows(ids, query, modes).doc_max()

    def score_windows(self, ids: Sequence[str], query: QueryVectors, modes: Sequence[str] = MODES) -> WindowScores:
        """Exact scores of EVERY window of the given documents (the best window of a hit, window-level
        fusion). Default: :func:`score_records` over :meth:`get_windows`' vectors (a document that is
        not stored: one NaN window)."""
        recs = self.get_windows(list(ids), with_vectors=list(modes))
        offsets = np.cumsum([0] + [max(len(rs), 1) for rs in recs], dtype=np.int64)
        return WindowScores(offsets, score_records([r for rs in recs for r in rs or [None]], query, modes))
