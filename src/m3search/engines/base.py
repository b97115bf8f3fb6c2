"""The engine protocol: what a storage backend must do for :class:`m3search.Collection`, and
the data shapes every engine shares.

Why a protocol of our own: the collection (ids, manifest, encoding, modes, fusion, explain)
is the same whatever stores the vectors; an engine stores documents and answers three kinds
of query. Qdrant Edge (embedded, the default), a Qdrant server and Milvus are one module
each. The Collection is the only caller; engines never encode, never fuse, never see a model.

Data model. A DOCUMENT ``(id: str, text: str, metadata: dict)`` is stored as one or more
WINDOWS (a text longer than the model reads is encoded as overlapping token windows; a text
that fits is one window), each with three representations:

* ``dense``   float32 ``(dense_dim,)``, L2-normalized; similarity = dot product.
* ``sparse``  lexical weights over the vocabulary; similarity = sum over shared token ids of
  ``w_q * w_d`` (no shared token: 0).
* ``colbert`` float32 ``(n_tokens, colbert_dim)`` normalized token vectors; similarity =
  FlagEmbedding's: MEAN over query vectors of the best dot product over the window's vectors
  (Qdrant's MaxSim is a SUM, so a Qdrant engine divides by the query length).

A document's score in a mode is the MAXIMUM over its windows, so a one-window document
scores exactly as before windows existed. Documents travel as :class:`PointBatch` (whole-batch
arrays, one row per window, ``windows`` saying which rows are whose) and come back as
:class:`Record`; queries as :class:`QueryVectors`.

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
"""

from __future__ import annotations

import hashlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from m3search.errors import CollectionExistsError, CollectionInUseError, CollectionNotFoundError
from m3search.filters import Filter
from m3search.plan import MODES  # the three representations, in the order weights are given
from m3search.pooling import check_pool_factor
from m3search.scoring import colbert_scores

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
    "Pool",
    "WindowScores",
    "point_uuid",
    "allocated_bytes",
    "score_records",
]

#: Version of the stored layout (payload keys, vector names, manifest keys). Bump on change.
#: 2: a document may be several windows (payload ``window`` / ``windows`` / ``spans``,
#: manifest ``max_windows_stored``; a version-1 point reads as window 0 of 1), and ColBERT codecs
#: and token pooling (``colbert_quantization``, ``colbert_rescore``, ``colbert_pool_factor``,
#: turbo storage types; a version-1 manifest reads as their defaults).
#: 3: Qdrant point layout with metadata as a one-element array and long texts on vector-less
#: points (engines/qdrant_common.py; schema 1-2 collections keep their layout); a document
#: re-written by a long write keeps its non-head points under a generation (``"gen"``, same module).
SCHEMA_VERSION = 3

#: Storage types of ColBERT token vectors (Qdrant's ``VectorStorageDatatype``): float32 and
#: float16 are the lossless references; turbo16 / turbo8 / turbo4 are Qdrant's TurboQuant
#: codecs (16, 8 and 4 bits per component). Qdrant's uint8 is absent on purpose: it stores
#: integer components 0-255, so unit-length token vectors would be stored as zeros.
COLBERT_DTYPES = ("float32", "float16", "turbo16", "turbo8", "turbo4")
#: The lossless ones: what every engine can store (Milvus and qdrant-client's local mode store nothing else).
LOSSLESS_COLBERT_DTYPES = COLBERT_DTYPES[:2]

#: Quantized copies of the token vectors an engine may keep next to the stored ones (built
#: when segments are optimized) and score candidates on: binary (1, 1.5, 2 bits per
#: component), TurboQuant (1-8 bits), scalar int8, product quantization (compression x4-x64).
COLBERT_QUANTIZATIONS = (
    *("binary1", "binary1.5", "binary2", "turbo1", "turbo1.5", "turbo2", "turbo4", "turbo8"),
    *("int8", "pq4", "pq8", "pq16", "pq32", "pq64"),
)

#: Namespace for mapping caller string ids to UUIDs (engines that only take UUID/int ids).
ID_NAMESPACE = uuid.UUID("6b1f3a52-7c1e-5b8e-9a43-2f0d9e3c1a77")

#: Per-query ranked list: ``[(id, score), ...]``, best first.
Hits = list


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


@dataclass(frozen=True)
class Schema:
    """Shapes and storage choices fixed at creation (recorded in the manifest).

    ``colbert_dtype``: storage type of token vectors (:data:`COLBERT_DTYPES`), ``"float16"``
    (score error ~1e-3; the default here, so manifests written before the field existed read
    as float16; a new collection gets its engine's :attr:`Engine.default_colbert_dtype`),
    ``"float32"`` (exact) or a lossy turbo codec. ``colbert_on_disk``: token vectors are only
    read for re-ranking candidates, and at scale exceed RAM, so they live on disk
    (memory-mapped) by default.
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
            self.colbert_dtype in LOSSLESS_COLBERT_DTYPES
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
    """A batch of documents with all three representations of each window, as whole-batch arrays.

    Per document: ``ids``, ``texts``, ``metadata``. Per window (row): ``dense`` float32
    ``(w, dense_dim)``; ``sparse`` CSR float32 ``(w, vocab_size)``; ``colbert`` float32
    ``(T, colbert_dim)`` with ``colbert_offsets`` int64 ``(w + 1,)`` (window j =
    ``colbert[o[j]:o[j+1]]``). ``windows`` int64 ``(n + 1,)``: document i owns rows
    ``windows[i]:windows[i+1]`` (None: one window per document, row i); ``spans`` int64
    ``(w, 2)``: each window's character ``[start, end)`` in its text (None: the whole text).
    Vectors are None in batches read without vectors.
    """

    ids: list[str]
    texts: list[str]
    metadata: list[dict]
    dense: np.ndarray | None = None
    sparse: sp.csr_matrix | None = None
    colbert: np.ndarray | None = None
    colbert_offsets: np.ndarray | None = None
    windows: np.ndarray | None = None
    spans: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_vectors(self) -> bool:
        return self.dense is not None

    @property
    def window_offsets(self) -> np.ndarray:
        """``(n + 1,)`` row offsets of each document's windows."""
        if self.windows is None:
            return np.arange(len(self.ids) + 1, dtype=np.int64)
        return np.asarray(self.windows, dtype=np.int64)

    def doc_spans(self, i: int) -> list[list[int]]:
        """Character ``[start, end)`` of each window of document i."""
        o = self.window_offsets
        if self.spans is None:
            return [[0, len(self.texts[i])] for _ in range(o[i], o[i + 1])]
        return [[int(a), int(b)] for a, b in self.spans[o[i] : o[i + 1]]]

    def recorded_spans(self, i: int) -> list[list[int]] | None:
        """The window spans storage keeps for document i: every window's when there are several, the one
        window's when it is not the whole text (cut at ``max_windows=1``); None when it is the whole text
        (what a record without spans means, :attr:`Record.window_spans`)."""
        spans = self.doc_spans(i)
        return spans if len(spans) > 1 or spans != [[0, len(self.texts[i])]] else None

    def validate(self, schema: Schema | None = None) -> None:
        """Check lengths, shapes and dtypes (raises ValueError naming the mismatch)."""
        n = len(self.ids)
        if len(self.texts) != n or len(self.metadata) != n:
            raise ValueError(f"batch has {n} ids, {len(self.texts)} texts, {len(self.metadata)} metadata")
        if len(set(self.ids)) != n:
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise ValueError(f"duplicate ids in one batch: {dup[:10]}")
        w = self.window_offsets
        if w.shape != (n + 1,) or w[0] != 0 or np.any(np.diff(w) < 1):
            raise ValueError("windows must be (n + 1,), start at 0 and give every document at least one window")
        if self.spans is not None and np.shape(self.spans) != (int(w[-1]), 2):
            raise ValueError(f"spans must be ({int(w[-1])}, 2), got {np.shape(self.spans)}")
        if not self.has_vectors:
            return
        n = int(w[-1])  # rows are windows
        if self.sparse is None or self.colbert is None or self.colbert_offsets is None:
            raise ValueError("a batch with vectors needs dense, sparse, colbert and colbert_offsets")
        if self.dense.ndim != 2 or self.dense.shape[0] != n:
            raise ValueError(f"dense must be (windows={n}, d), got {self.dense.shape}")
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

    def sparse_row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices int64, values float32)`` of window row j."""
        s = self.sparse
        a, b = s.indptr[j], s.indptr[j + 1]
        return s.indices[a:b].astype(np.int64), s.data[a:b].astype(np.float32)

    def colbert_rows(self, j: int) -> np.ndarray:
        """Token vectors of window row j (document j when every document is one window)."""
        o = self.colbert_offsets
        return self.colbert[o[j] : o[j + 1]]

    @classmethod
    def join(cls, batches: Sequence[PointBatch], *, one_document: bool = False) -> PointBatch:
        """Batches with vectors as one: their documents in order, or (``one_document``) the pieces
        of ONE document (one-document batches of its consecutive windows, as :meth:`Engine.upsert_long` gets)."""
        if not batches:
            raise ValueError("no batches to join")
        rows = np.cumsum([0] + [int(b.window_offsets[-1]) for b in batches])
        tokens = np.cumsum([0] + [len(b.colbert) for b in batches])
        offsets = np.concatenate([[0], *[b.colbert_offsets[1:] + t for b, t in zip(batches, tokens)]])
        if one_document:
            ids, texts, meta, windows = batches[0].ids, batches[0].texts, batches[0].metadata, [0, rows[-1]]
        else:
            ids = [i for b in batches for i in b.ids]
            texts = [t for b in batches for t in b.texts]
            meta = [m for b in batches for m in b.metadata]
            windows = np.concatenate([[0], *[b.window_offsets[1:] + r for b, r in zip(batches, rows)]])
        spans = [
            b.spans if b.spans is not None else [s for i in range(len(b)) for s in b.doc_spans(i)] for b in batches
        ]
        return cls(
            ids,
            texts,
            meta,
            np.concatenate([b.dense for b in batches]),
            sp.vstack([b.sparse for b in batches], format="csr"),
            np.concatenate([b.colbert for b in batches]),
            offsets.astype(np.int64),
            np.asarray(windows, dtype=np.int64),
            np.concatenate(spans).astype(np.int64).reshape(-1, 2),
        )

    @classmethod
    def from_records(cls, records: Sequence[Record], vocab_size: int) -> PointBatch:
        """Stack window records back into a batch (engines' ``iter_batches``): records come
        document by document, each document's window 0 first (it carries text and metadata)."""
        starts = [j for j, r in enumerate(records) if r.window == 0]
        docs = [records[j] for j in starts]
        windows = np.asarray(starts + [len(records)], dtype=np.int64)
        spans = np.asarray([s for d in docs for s in d.window_spans], dtype=np.int64).reshape(-1, 2)
        ids = [r.id for r in docs]
        texts = [r.text for r in docs]
        meta = [r.metadata for r in docs]
        if not records or records[0].dense is None:
            return cls(ids, texts, meta, windows=windows, spans=spans)
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
        return cls(ids, texts, meta, dense, sparse, colbert, offs, windows, spans)


@dataclass
class Record:
    """One stored document (``window`` 0), or one window of it when read for its vectors.

    Vectors only when asked for (``get(..., with_vectors=True)``: window 0's). ``spans``:
    character ``[start, end)`` of each of the document's windows (None: one window, the
    whole text).
    """

    id: str
    text: str
    metadata: dict = field(default_factory=dict)
    dense: np.ndarray | None = None
    sparse: tuple[np.ndarray, np.ndarray] | None = None  # (indices int64, values float32)
    colbert: np.ndarray | None = None
    spans: list[list[int]] | None = None
    window: int = 0

    @property
    def windows(self) -> int:
        """How many windows the document is stored as."""
        return len(self.spans) if self.spans else 1

    @property
    def window_spans(self) -> list[list[int]]:
        return self.spans if self.spans else [[0, len(self.text)]]


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
    """One query's re-ranking candidates (documents): the union of its dense and sparse top-C lists.

    ``known``: exact document scores already in hand (``{mode: {id: score}}``, the
    first-stage hits' own scores: a document's best window in a list is its best window
    in that mode, so these are exact maxima); ``colbert``: exact M3 ColBERT document
    scores aligned with ``ids`` when the engine computed them while gathering the pool
    (NaN where it could not, None when it did not try); ``found_by``: which first-stage
    list held each id (None when the engine did not report it).
    """

    ids: list[str]
    known: dict[str, dict[str, float]] = field(default_factory=dict)
    colbert: np.ndarray | None = None
    found_by: dict[str, set[str]] | None = None


@dataclass
class WindowScores:
    """Exact per-window scores of candidate documents for one query.

    ``windows`` int64 ``(n + 1,)``: document i's windows are entries ``windows[i]:windows[i+1]``
    of every array in ``scores`` (``{mode: float64 (w,)}``, NaN for a document that is not
    stored). :meth:`doc_max` is the per-mode document score.
    """

    windows: np.ndarray
    scores: dict[str, np.ndarray]

    def doc_max(self) -> dict[str, np.ndarray]:
        """Per mode, each document's best window score (NaN only when all its windows are NaN)."""
        w = self.windows
        if len(w) - 1 == w[-1]:  # one window each
            return {m: s.copy() for m, s in self.scores.items()}
        out = {}
        for m, s in self.scores.items():
            filled = np.where(np.isnan(s), -np.inf, s)
            best = np.maximum.reduceat(filled, w[:-1]) if len(s) else np.zeros(0)
            out[m] = np.where(np.isneginf(best), np.nan, best)
        return out


def score_records(
    records: Sequence[Record | None], query: QueryVectors, modes: Iterable[str] = MODES
) -> dict[str, np.ndarray]:
    """Exact per-mode scores of fetched window records (with vectors) for one query; NaN for None records.

    The reference semantics of :meth:`Engine.score`, and the fallback for engines that
    cannot score candidates where the vectors live.
    """
    modes = tuple(modes)
    out = {m: np.full(len(records), np.nan, dtype=np.float64) for m in modes}
    present = [i for i, r in enumerate(records) if r is not None]
    got = [records[i] for i in present]
    if not got:
        return out
    if "dense" in modes:
        out["dense"][present] = np.stack([r.dense for r in got]).astype(np.float32) @ query.dense.astype(np.float32)
    if "sparse" in modes:
        indptr = np.concatenate([[0], np.cumsum([len(r.sparse[0]) for r in got])]).astype(np.int64)
        ind = np.concatenate([np.zeros(0, np.int64)] + [r.sparse[0] for r in got]).astype(np.int64)
        val = np.concatenate([np.zeros(0)] + [r.sparse[1] for r in got]).astype(np.float64)
        qi = np.asarray(query.sparse_indices if query.sparse_indices is not None else [], dtype=np.int64)
        width = int(max(ind.max(initial=-1), qi.max(initial=-1)) + 1)
        q = np.zeros(width)
        q[qi] = np.asarray(query.sparse_values if query.sparse_values is not None else [], dtype=np.float64)
        out["sparse"][present] = sp.csr_matrix((val, ind, indptr), shape=(len(got), width)) @ q
    if "colbert" in modes:
        q = np.asarray(query.colbert, dtype=np.float32)
        offsets = np.concatenate([[0], np.cumsum([len(r.colbert) for r in got])]).astype(np.int64)
        tokens = np.concatenate([r.colbert for r in got]).astype(np.float32, copy=False)
        out["colbert"][present] = colbert_scores(q, np.array([0, len(q)]), tokens, offsets)[0]
    return out


def allocated_bytes(path: Path) -> int:
    """Bytes allocated on disk for a file or everything under a folder (sparse files count as stored)."""
    files = [path] if path.is_file() else (Path(d) / f for d, _, names in os.walk(path) for f in names)
    total = 0
    for f in files:
        try:
            st = f.stat()
        except OSError:  # removed while walking
            continue
        total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


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

    location: str
    schema: Schema
    #: Most storage rows any stored document has had (the manifest's ``max_windows_stored``, kept
    #: by the Collection from :meth:`stored_units`). 1 lets engines skip all window work.
    max_windows: int = 1

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
        """The manifest dict last written, or None."""

    @abstractmethod
    def write_manifest(self, manifest: dict) -> None:
        """Replace the manifest atomically (JSON-able dict)."""

    # --- writes ----------------------------------------------------------------------
    @abstractmethod
    def upsert(self, batch: PointBatch) -> None:
        """Insert or REPLACE every document of ``batch`` (all its windows) in ONE atomic, durable write.

        A document stored before with more windows than now must not keep any of them visible.
        """

    def upsert_long(self, pieces: Iterable[PointBatch]) -> None:
        """Insert or replace ONE document whose windows arrive in pieces (one-document batches of
        consecutive windows, window 0 in the first), so memory is bounded by a piece, not the text.

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

    def get_windows(self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = True) -> list[list[Record]]:
        """All window records of each document, in window order ([] for unknown ids). Default
        for one-window engines: the document's own record."""
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
