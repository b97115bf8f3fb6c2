"""The engine protocol: what a storage backend must do for :class:`m3search.Collection`.

Why a protocol of our own: the collection (ids, manifest, encoding, modes, fusion,
explain) is the same whatever stores the vectors; an engine only stores points and
answers three kinds of query. Qdrant Edge (embedded, the default), a Qdrant server and
Milvus are one module each. The Collection is the only caller; engines never encode,
never fuse and never see a model.

Data model. A point is ``(id: str, text: str, metadata: dict, dense, sparse, colbert)``:

* ``dense``   float32 ``(dense_dim,)``, L2-normalized; similarity = dot product.
* ``sparse``  lexical weights over the vocabulary; similarity = sum over shared token
  ids of ``w_q * w_d`` (no shared token: 0).
* ``colbert`` float32 ``(n_tokens, colbert_dim)`` normalized token vectors; similarity
  = FlagEmbedding's: MEAN over query vectors of the max dot product over document
  vectors. Qdrant's MaxSim is a SUM, so a Qdrant engine divides by the query length.

Batches travel as :class:`PointBatch` (arrays for a whole batch: ``dense (n, d)``, a CSR
``sparse (n, vocab)``, ``colbert (T, d)`` plus ``colbert_offsets (n + 1,)``), which is the
layout :class:`m3search.M3Embeddings` already has.

Contract every engine keeps:

* ``upsert(batch)`` is ATOMIC and DURABLE per call: after a crash (kill -9) a batch is
  either fully present or absent. The Collection writes each ingest batch with one call.
* Filters (:mod:`m3search.filters` AST) address the document metadata and run inside
  the engine's queries, so ``k`` hits come back even when few documents match.
* ``score(ids, query)`` computes EXACT scores of given candidates (no HNSW, no
  "missing = 0" shortcuts other than sparse-without-overlap = 0). Engines do it where the
  vectors live when they can (Qdrant: a query filtered to the candidate ids with
  ``exact=True``); :func:`score_records` is the pure-NumPy fallback over fetched vectors.
* The manifest is a JSON-able dict the Collection owns; where it is kept is the engine's
  business (embedded: a file in the folder; remote: collection metadata or a reserved point).
* One writer: an embedded engine locks its storage exclusively and raises
  :class:`CollectionInUseError` when another process holds it.
"""

from __future__ import annotations

import hashlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from m3search.filters import Filter
from m3search.pooling import check_pool_factor

__all__ = [
    "SCHEMA_VERSION",
    "MODES",
    "COLBERT_DTYPES",
    "COLBERT_QUANTIZATIONS",
    "Schema",
    "PointBatch",
    "Record",
    "QueryVectors",
    "Hits",
    "Engine",
    "CollectionInUseError",
    "CollectionNotFoundError",
    "CollectionExistsError",
    "point_uuid",
    "score_records",
    "finish_maxsim_scores",
]

#: Version of the stored layout (payload keys, vector names, manifest keys). Bump on change.
#: 2: ColBERT codecs and token pooling (``colbert_quantization``, ``colbert_rescore``,
#: ``colbert_pool_factor``, turbo storage types); a version-1 manifest reads as their defaults.
SCHEMA_VERSION = 2

#: Storage types of ColBERT token vectors (Qdrant's ``VectorStorageDatatype``): float32 and
#: float16 are the lossless references; turbo16 / turbo8 / turbo4 are Qdrant's TurboQuant
#: codecs (16, 8 and 4 bits per component). Qdrant's uint8 is absent on purpose: it stores
#: integer components 0-255, so unit-length token vectors would be stored as zeros.
COLBERT_DTYPES = ("float32", "float16", "turbo16", "turbo8", "turbo4")

#: Quantized copies of the token vectors an engine may keep next to the stored ones (built
#: when segments are optimized) and score candidates on: binary (1, 1.5, 2 bits per
#: component), TurboQuant (1-8 bits), scalar int8, product quantization (compression x4-x64).
COLBERT_QUANTIZATIONS = (
    "binary1",
    "binary1.5",
    "binary2",
    "turbo1",
    "turbo1.5",
    "turbo2",
    "turbo4",
    "turbo8",
    "int8",
    "pq4",
    "pq8",
    "pq16",
    "pq32",
    "pq64",
)

#: The three representations, in the order weights are given.
MODES = ("dense", "sparse", "colbert")

#: Namespace for mapping caller string ids to UUIDs (engines that only take UUID/int ids).
ID_NAMESPACE = uuid.UUID("6b1f3a52-7c1e-5b8e-9a43-2f0d9e3c1a77")

#: Per-query ranked list: ``[(id, score), ...]``, best first.
Hits = list


class CollectionInUseError(RuntimeError):
    """Another process holds the collection's storage (one process per embedded collection)."""


class CollectionNotFoundError(FileNotFoundError):
    """No collection at this location."""


class CollectionExistsError(FileExistsError):
    """``create`` was asked for a location that already holds a collection."""


_NS_BYTES = ID_NAMESPACE.bytes


def point_uuid(id: str) -> str:
    """Deterministic UUID5 of a caller id (same in every engine and process).

    Equal to ``str(uuid.uuid5(ID_NAMESPACE, id))`` (RFC 4122: SHA-1 of namespace + name,
    version and variant bits set), without building ``UUID`` objects: it runs for every
    candidate of every query, where ``uuid.uuid5`` cost ~3 ms per query at 400 candidates.
    """
    h = bytearray(hashlib.sha1(_NS_BYTES + id.encode("utf-8")).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


@dataclass(frozen=True)
class Schema:
    """Shapes and storage choices fixed at creation (recorded in the manifest).

    ``colbert_dtype``: storage type of token vectors (:data:`COLBERT_DTYPES`), ``"float16"``
    (default: half the bytes, score error ~1e-3), ``"float32"`` (exact) or a lossy turbo
    codec. ``colbert_on_disk``: token vectors are only read for re-ranking candidates, and at
    scale exceed RAM, so they live on disk (memory-mapped) by default.
    ``colbert_quantization``: None, or a quantized copy (:data:`COLBERT_QUANTIZATIONS`) kept in
    RAM and used to score candidates; ``colbert_rescore`` then says whether the engine rescores
    them on the stored vectors (True: the stored vectors' scores are returned) or returns the
    quantized scores (False). ``colbert_pool_factor``: documents keep ``ceil(n / factor)``
    token vectors (:mod:`m3search.pooling`; 1 = every token).
    """

    dense_dim: int
    colbert_dim: int
    vocab_size: int
    colbert_dtype: str = "float16"
    colbert_on_disk: bool = True
    dense_on_disk: bool = False
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    colbert_quantization: str | None = None
    colbert_rescore: bool = True
    colbert_pool_factor: int = 1

    def __post_init__(self) -> None:
        for name in ("dense_dim", "colbert_dim", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Schema.{name} must be a positive integer, got {v!r}")
        if self.colbert_dtype == "uint8":
            raise ValueError(
                "colbert_dtype 'uint8' stores integer components 0-255 (Qdrant's Uint8), which turns unit-length "
                f"token vectors into zeros; for 8 bits per component use 'turbo8'. Choose one of {COLBERT_DTYPES}"
            )
        if self.colbert_dtype not in COLBERT_DTYPES:
            raise ValueError(f"colbert_dtype must be one of {COLBERT_DTYPES}, got {self.colbert_dtype!r}")
        if self.colbert_quantization is not None and self.colbert_quantization not in COLBERT_QUANTIZATIONS:
            raise ValueError(
                f"colbert_quantization must be None or one of {COLBERT_QUANTIZATIONS}, got {self.colbert_quantization!r}"
            )
        if not isinstance(self.colbert_rescore, bool):
            raise ValueError(f"colbert_rescore must be True or False, got {self.colbert_rescore!r}")
        check_pool_factor(self.colbert_pool_factor)
        if self.hnsw_m < 0 or self.hnsw_ef_construct <= 0:
            raise ValueError("hnsw_m must be >= 0 and hnsw_ef_construct > 0")

    @property
    def colbert_lossless(self) -> bool:
        """Whether ColBERT scores are computed on every token's float16/float32 vector (today's layouts)."""
        return (
            self.colbert_dtype in ("float32", "float16")
            and (self.colbert_quantization is None or self.colbert_rescore)
            and self.colbert_pool_factor == 1
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schema:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown schema keys {sorted(unknown)} (written by a newer m3search?)")
        return cls(**dict(d))


@dataclass
class PointBatch:
    """A batch of documents with all three representations, as whole-batch arrays.

    ``dense`` float32 ``(n, dense_dim)``; ``sparse`` CSR float32 ``(n, vocab_size)``;
    ``colbert`` float32 ``(T, colbert_dim)`` with ``colbert_offsets`` int64 ``(n + 1,)``
    (doc i = ``colbert[o[i]:o[i+1]]``). Vectors are None in batches read without vectors.
    """

    ids: list[str]
    texts: list[str]
    metadata: list[dict]
    dense: np.ndarray | None = None
    sparse: sp.csr_matrix | None = None
    colbert: np.ndarray | None = None
    colbert_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_vectors(self) -> bool:
        return self.dense is not None

    def validate(self, schema: Schema | None = None) -> None:
        """Check lengths, shapes and dtypes (raises ValueError naming the mismatch)."""
        n = len(self.ids)
        if len(self.texts) != n or len(self.metadata) != n:
            raise ValueError(f"batch has {n} ids, {len(self.texts)} texts, {len(self.metadata)} metadata")
        if len(set(self.ids)) != n:
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise ValueError(f"duplicate ids in one batch: {dup[:10]}")
        if not self.has_vectors:
            return
        if self.sparse is None or self.colbert is None or self.colbert_offsets is None:
            raise ValueError("a batch with vectors needs dense, sparse, colbert and colbert_offsets")
        if self.dense.ndim != 2 or self.dense.shape[0] != n:
            raise ValueError(f"dense must be (n={n}, d), got {self.dense.shape}")
        if self.sparse.shape[0] != n:
            raise ValueError(f"sparse must have {n} rows, got {self.sparse.shape}")
        o = self.colbert_offsets
        if o.shape != (n + 1,) or o[0] != 0 or o[-1] != self.colbert.shape[0] or np.any(np.diff(o) < 0):
            raise ValueError("colbert_offsets must be (n + 1,), start at 0, be non-decreasing and end at len(colbert)")
        if schema is not None:
            if self.dense.shape[1] != schema.dense_dim:
                raise ValueError(f"dense dim {self.dense.shape[1]} != collection's {schema.dense_dim}")
            if self.colbert.ndim != 2 or self.colbert.shape[1] != schema.colbert_dim:
                raise ValueError(f"colbert dim {self.colbert.shape[-1]} != collection's {schema.colbert_dim}")
            if self.sparse.shape[1] > schema.vocab_size:
                raise ValueError(f"sparse width {self.sparse.shape[1]} > vocab size {schema.vocab_size}")

    def sparse_row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices int64, values float32)`` of document i."""
        s = self.sparse
        a, b = s.indptr[i], s.indptr[i + 1]
        return s.indices[a:b].astype(np.int64), s.data[a:b].astype(np.float32)

    def colbert_rows(self, i: int) -> np.ndarray:
        o = self.colbert_offsets
        return self.colbert[o[i] : o[i + 1]]

    @classmethod
    def from_records(cls, records: Sequence[Record], vocab_size: int) -> PointBatch:
        """Stack records (with vectors) back into a batch (used by engines' ``iter_batches``)."""
        ids = [r.id for r in records]
        texts = [r.text for r in records]
        meta = [r.metadata for r in records]
        if not records or records[0].dense is None:
            return cls(ids, texts, meta)
        dense = np.stack([r.dense for r in records]).astype(np.float32, copy=False)
        lens = [len(r.sparse[0]) for r in records]
        indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        ind = np.concatenate([r.sparse[0] for r in records]).astype(np.int64) if indptr[-1] else np.zeros(0, np.int64)
        val = (
            np.concatenate([r.sparse[1] for r in records]).astype(np.float32) if indptr[-1] else np.zeros(0, np.float32)
        )
        sparse = sp.csr_matrix((val, ind, indptr), shape=(len(records), vocab_size))
        offs = np.concatenate([[0], np.cumsum([len(r.colbert) for r in records])]).astype(np.int64)
        colbert = np.concatenate([r.colbert for r in records]).astype(np.float32, copy=False)
        return cls(ids, texts, meta, dense, sparse, colbert, offs)


@dataclass
class Record:
    """One stored document; vectors only when asked for (``get(..., with_vectors=True)``)."""

    id: str
    text: str
    metadata: dict = field(default_factory=dict)
    dense: np.ndarray | None = None
    sparse: tuple[np.ndarray, np.ndarray] | None = None  # (indices int64, values float32)
    colbert: np.ndarray | None = None


@dataclass
class QueryVectors:
    """One query's representations (any may be None when its mode is not used).

    ``dense`` float32 ``(d,)``; ``sparse_indices`` int64 / ``sparse_values`` float32;
    ``colbert`` float32 ``(t, d)``.
    """

    dense: np.ndarray | None = None
    sparse_indices: np.ndarray | None = None
    sparse_values: np.ndarray | None = None
    colbert: np.ndarray | None = None

    @classmethod
    def from_embeddings(cls, emb: Any, i: int = 0) -> QueryVectors:
        """Row ``i`` of an :class:`m3search.M3Embeddings` (fields that were not computed stay None)."""
        dense = None if emb.dense is None else np.ascontiguousarray(emb.dense[i], dtype=np.float32)
        si = sv = None
        if emb.sparse is not None:
            s = emb.sparse
            a, b = s.indptr[i], s.indptr[i + 1]
            si, sv = s.indices[a:b].astype(np.int64), s.data[a:b].astype(np.float32)
        col = None
        if emb.colbert is not None:
            o = emb.colbert_offsets
            col = np.ascontiguousarray(emb.colbert[o[i] : o[i + 1]], dtype=np.float32)
        return cls(dense, si, sv, col)


@dataclass
class Pool:
    """One query's re-ranking candidates: the union of its dense and sparse top-C lists.

    ``known``: exact scores already in hand (``{mode: {id: score}}``, the first-stage hits'
    own scores); ``colbert``: exact M3 ColBERT scores aligned with the pool when the engine
    computed them while gathering it (None otherwise); ``found_by``: which first-stage list
    held each id (None when the engine did not report it).

    ``keys``: the engine's own point keys (opaque, hashable), aligned with the pool, when the engine returned
    those instead of the caller's ids (``ids`` is then None). Why: a caller id lives in the
    payload, and Qdrant Edge reads a payload per point (at 100k documents its pool request
    took 62 ms with the 400 candidates' ids, 57 ms without), while fusion needs ids only
    for the hits. :meth:`Engine.score` and :meth:`Engine.get_by_keys` take such keys.
    """

    ids: list[str] | None
    known: dict[str, dict[str, float]] = field(default_factory=dict)
    colbert: np.ndarray | None = None
    found_by: dict[str, set[str]] | None = None
    keys: list[Any] | None = None


def score_records(
    records: Sequence[Record | None], query: QueryVectors, modes: Iterable[str] = MODES
) -> dict[str, np.ndarray]:
    """Exact per-mode scores of fetched records (with vectors) for one query; NaN for None records.

    The reference semantics of :meth:`Engine.score`, and the fallback for engines that
    cannot score candidates where the vectors live.
    """
    modes = tuple(modes)
    n = len(records)
    out = {m: np.full(n, np.nan, dtype=np.float64) for m in modes}
    present = [i for i, r in enumerate(records) if r is not None]
    if not present:
        return out
    if "dense" in modes:
        D = np.stack([records[i].dense for i in present]).astype(np.float32)
        out["dense"][present] = D @ query.dense.astype(np.float32)
    if "sparse" in modes:
        q = dict(zip(query.sparse_indices.tolist(), query.sparse_values.tolist()))
        qi = np.asarray(sorted(q), dtype=np.int64)
        qv = np.asarray([q[t] for t in qi.tolist()], dtype=np.float64)
        for i in present:
            di, dv = records[i].sparse
            common, a, b = np.intersect1d(qi, di, assume_unique=False, return_indices=True)
            out["sparse"][i] = float(np.dot(qv[a], dv[b].astype(np.float64))) if len(common) else 0.0
    if "colbert" in modes:
        Q = query.colbert.astype(np.float32)
        for i in present:
            d = records[i].colbert.astype(np.float32)
            out["colbert"][i] = float((Q @ d.T).max(axis=1).mean()) if len(d) and len(Q) else 0.0
    return out


class Engine(ABC):
    """A storage backend. Implementations register a location scheme in :mod:`m3search.engines`.

    All ids are the caller's strings. Methods taking ``ids`` accept any sequence of str.
    """

    #: Short name shown in manifests and errors ("qdrant-edge", "qdrant", "milvus").
    name: ClassVar[str] = "engine"

    location: str
    schema: Schema

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
        """Persist everything written so far to the engine's main storage (blocking).

        Called by the Collection at the end of an ingest call. Engines that persist on
        their own keep this default no-op.
        """

    def optimize(self) -> bool:
        """Build pending indexes / merge segments now (blocking); True if anything changed.

        Called by the Collection after an ingest call. Engines that index on their own
        keep this default no-op.
        """
        return False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- manifest --------------------------------------------------------------------
    @abstractmethod
    def read_manifest(self) -> dict | None:
        """The manifest dict last written, or None."""

    @abstractmethod
    def write_manifest(self, manifest: dict) -> None:
        """Replace the manifest atomically (JSON-able dict)."""

    # --- writes ----------------------------------------------------------------------
    @abstractmethod
    def upsert(self, batch: PointBatch) -> None:
        """Insert or overwrite every point of ``batch`` in ONE atomic, durable write."""

    @abstractmethod
    def set_metadata(self, ids: Sequence[str], metadata: Sequence[dict]) -> None:
        """Replace the metadata of existing points (vectors and text untouched), atomically."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Delete the points that exist among ``ids`` (unknown ids are ignored)."""

    # --- reads -----------------------------------------------------------------------
    @abstractmethod
    def existing(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` that is stored."""

    @abstractmethod
    def get(self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        """Records in input order, None for unknown ids.

        ``with_vectors``: False, True (all three) or a list of names from :data:`MODES`.
        """

    def get_by_keys(self, keys: Sequence[Any], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        """:meth:`get` by the engine's point keys (:attr:`Pool.keys`); needed only by engines
        whose :meth:`candidates_batch` returns keyed pools."""
        raise NotImplementedError(f"{type(self).__name__} does not return keyed pools")

    @abstractmethod
    def count(self, filter: Filter | None = None) -> int:
        """Number of stored points (matching ``filter``), exact."""

    @abstractmethod
    def iter_batches(self, batch_size: int = 256, *, with_vectors: bool = True) -> Iterator[PointBatch]:
        """Every stored point, in batches (for export and migration between engines)."""

    # --- queries ---------------------------------------------------------------------
    @abstractmethod
    def search_dense(self, q: np.ndarray, k: int, filter: Filter | None = None, *, exact: bool = False) -> list[Hits]:
        """Top-k by dense dot product for each row of ``q`` (float32 ``(nq, d)``).

        Returns one ``[(id, score), ...]`` list per query, best first. ``exact=True``
        forces a full scan instead of the ANN index.
        """

    @abstractmethod
    def search_sparse(
        self, q: sp.csr_matrix, k: int, filter: Filter | None = None, *, exact: bool = False
    ) -> list[Hits]:
        """Top-k by sparse dot product for each row of ``q`` (CSR ``(nq, vocab)``).

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
        """The re-ranking pool of each query: dense top-``depth`` ∪ sparse top-``depth``.

        ``colbert=True`` says the caller will need the pool's ColBERT scores; an engine that
        can compute them while gathering the pool (Qdrant: prefetch + MaxSim in one request)
        returns them in :attr:`Pool.colbert`. This default runs the two first-stage
        searches and returns the hits' own scores as ``known``.
        """
        dense_lists = self.search_dense(dense, depth, filter, exact=exact)
        sparse_lists = self.search_sparse(sparse, depth, filter, exact=exact)
        pools = []
        for d, s in zip(dense_lists, sparse_lists):
            ids = list(dict.fromkeys([i for i, _ in d] + [i for i, _ in s]))
            pools.append(
                Pool(
                    ids,
                    {"dense": dict(d), "sparse": dict(s)},
                    found_by={"dense": {i for i, _ in d}, "sparse": {i for i, _ in s}},
                )
            )
        return pools

    @abstractmethod
    def score(
        self,
        ids: Sequence[str] | None,
        query: QueryVectors,
        modes: Sequence[str] = MODES,
        known: Mapping[str, Mapping[str, float]] | None = None,
        *,
        keys: Sequence[Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Exact scores of the given points for one query.

        Returns ``{mode: float64 array aligned with ids}`` for each mode in ``modes``
        (semantics in the module docstring; NaN for ids that are not stored).
        ``known``: ``{mode: {id: score}}`` that the caller already holds exactly (the
        first-stage hits); an engine may return those instead of recomputing them.
        ``keys``: the points' engine keys (:attr:`Pool.keys`), used instead of ``ids``
        (which may then be None) by engines that return keyed pools.
        """


def prefill_known(
    ids: Sequence[str], modes: Sequence[str], known: Mapping[str, Mapping[str, float]] | None
) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Score arrays (NaN) with the caller's already-exact scores filled in, and per mode the
    positions still to compute.

    Why: the first-stage lists already hold exact dense scores of the dense candidates
    and exact sparse scores of the sparse ones; re-scoring them would repeat the work.
    """
    if known and "colbert" in known:
        raise ValueError("known scores are for dense and sparse only (ColBERT is always computed)")
    out = {m: np.full(len(ids), np.nan, dtype=np.float64) for m in modes}
    todo: dict[str, list[int]] = {}
    for m in modes:
        have = (known or {}).get(m)
        if not have:
            todo[m] = list(range(len(ids)))
            continue
        arr, need = out[m], []
        for j, doc_id in enumerate(ids):
            v = have.get(doc_id)
            if v is None:
                need.append(j)
            else:
                arr[j] = v
        todo[m] = need
    return out, todo


def scoring_jobs(
    ids: Sequence[str] | None,
    query: QueryVectors,
    modes: Sequence[str],
    known: Mapping[str, Mapping[str, float]] | None,
    keys: Sequence[Any] | None = None,
) -> tuple[dict[str, np.ndarray], list[tuple[str, tuple[int, ...]]], dict[int, Any]]:
    """What an engine that scores candidates where the vectors live (Qdrant) still has to ask.

    Returns the score arrays (``known`` filled in, NaN elsewhere), the ``(mode, positions)``
    queries to run, each filtered to those candidates, and the point UUID of every position
    a query needs (results come back by UUID, no payload read): ``keys`` when given (then
    ``ids`` may be None), else derived from ``ids``. An empty sparse query is not run:
    nothing shares a token with it (:func:`finish_maxsim_scores` sets the zeros).
    """
    if ids is None:
        if keys is None:
            raise ValueError("score needs ids or keys")
        if known:
            raise ValueError("known scores are keyed by id: pass ids with them")
        ids = keys
    out, todo = prefill_known(ids, modes, known)
    jobs: list[tuple[str, tuple[int, ...]]] = []
    uuids: dict[int, Any] = {}  # str UUIDs from ids, or the engine's own key objects
    for m in modes:
        need = todo[m]
        if not need:
            continue
        if m == "sparse" and (query.sparse_indices is None or len(query.sparse_indices) == 0):
            continue
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}")
        for j in need:
            if j not in uuids:
                uuids[j] = keys[j] if keys is not None else point_uuid(ids[j])
        jobs.append((m, tuple(need)))
    return out, jobs, uuids


def fill_by_uuid(
    out: dict[str, np.ndarray],
    jobs: Sequence[tuple[str, Any]],
    results: Sequence[Sequence[Any]],
    uuids: Mapping[int, Any],
) -> None:
    """Write each job's returned point scores (``.id``, ``.score``) into ``out`` at their positions.

    ``uuids`` holds strings (derived from ids) or ``uuid.UUID`` objects (Qdrant Edge's pool
    keys, compared by their 128-bit ``.int``: hashing a UUID is a Python-level call, and
    this runs for every candidate of every query).
    """
    as_str = isinstance(next(iter(uuids.values()), ""), str)
    pos = {(u if as_str else u.int): j for j, u in uuids.items()}
    for (m, _), res in zip(jobs, results):
        if res:
            at = [pos[str(p.id)] for p in res] if as_str else [pos[p.id.int] for p in res]
            out[m][at] = [p.score for p in res]


def finish_maxsim_scores(
    out: dict[str, np.ndarray], ids: Sequence[str], query: QueryVectors, existing
) -> dict[str, np.ndarray]:
    """Turn raw Qdrant candidate scores (NaN = not returned) into M3 scores, in place.

    Qdrant's MaxSim sums over query vectors, M3 takes the mean; and a sparse query does
    not return points sharing no token with it, whose exact score is 0 if they exist.
    ``existing(ids) -> set`` is only called when no dense/colbert score proves existence.
    """
    if "colbert" in out:
        out["colbert"] /= max(len(query.colbert), 1)
    if "sparse" in out:
        missing = np.isnan(out["sparse"])
        if missing.any():
            known = next((out[m] for m in ("dense", "colbert") if m in out), None)
            if known is not None:
                exists = ~np.isnan(known)
            else:
                present = existing([ids[j] for j in np.flatnonzero(missing)])
                exists = np.array([(i in present) or not missing[j] for j, i in enumerate(ids)])
            out["sparse"][missing & exists] = 0.0
    return out
