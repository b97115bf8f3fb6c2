"""What flows between the Collection and an engine: the storage choices fixed at creation
(:class:`Schema`), documents as window rows, stored records, query vectors, candidate pools and
window scores, plus the NumPy reference scorer.

A DOCUMENT ``(id: str, text: str, metadata: dict)`` is stored as one or more WINDOWS (a text
longer than the model reads is encoded as overlapping token windows; a text that fits is one
window), each with three representations:

* ``dense``   float32 ``(dense_dim,)``, L2-normalized; similarity = dot product.
* ``sparse``  lexical weights over the vocabulary; similarity = sum over shared token ids of
  ``w_q * w_d`` (no shared token: 0).
* ``colbert`` float32 ``(n_tokens, colbert_dim)`` normalized token vectors; similarity =
  FlagEmbedding's: MEAN over query vectors of the best dot product over the window's vectors
  (Qdrant's MaxSim is a SUM, so a Qdrant engine divides by the query length).

A document's score in a mode is the MAXIMUM over its windows, so a one-window document
scores exactly as before windows existed. Documents travel as :class:`PointBatch` (whole-batch
arrays, one row per window, ``windows`` saying which rows are whose) and come back as
:class:`Record`; queries as :class:`QueryVectors`; :func:`score_records` is the reference
semantics of every engine's exact scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3search.errors import CollectionDamagedError, CollectionNotFoundError
from m3search.plan import MODES, repeated  # MODES: the three representations, in the order weights are given
from m3search.pooling import check_pool_factor
from m3search.scoring import colbert_scores

__all__ = [
    "SCHEMA_VERSION",
    "CREATED_SCHEMA_VERSION",
    "MANIFEST_FORMAT",
    "MODEL_WEIGHTS_KEY",
    "check_manifest",
    "COLBERT_DTYPES",
    "LOSSLESS_COLBERT_DTYPES",
    "COLBERT_QUANTIZATIONS",
    "Schema",
    "Hits",
    "PointBatch",
    "Record",
    "QueryVectors",
    "Pool",
    "WindowScores",
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
#: 4: a document has been written in pieces (``Engine.upsert_long``): its points carry a generation
#: (Qdrant) or a slot (Milvus) and the manifest's pending marks are ``{"id", "client", "at"}``, which
#: m3search releases reading up to 3 misread (wrong hits, a delete that leaves the document) or fail on
#: (a TypeError on their next write). Raised by the first such write, not at creation, so a collection
#: without one stays readable by them (:data:`CREATED_SCHEMA_VERSION`).
#: 5: a Milvus long write's rows are keyed by its generation (engines/milvus.py, "Long writes"), not by slot
#: 1 or 2, where releases reading up to 4 look for them (windows missing, NaN scores). Raised as 4 was, by
#: a write in pieces (on every engine: the Collection raises it before the engine is asked).
SCHEMA_VERSION = 5
#: The version a collection is created (or migrated) with, until its first write in pieces raises it to
#: :data:`SCHEMA_VERSION`.
CREATED_SCHEMA_VERSION = 3

#: The manifest's ``format``: what marks stored data as an m3search collection.
MANIFEST_FORMAT = "m3search-collection"
#: The model record's key for :func:`m3search.encoder.weights_fingerprint` (absent in collections made before it).
MODEL_WEIGHTS_KEY = "weights_fingerprint"


def check_manifest(manifest: Mapping[str, Any] | None, location: str) -> Mapping[str, Any]:
    """``manifest`` if this m3search can read the collection it describes. The one check before anything
    reads a collection (``Collection.open``, so ``info``, and ``migrate``, which would otherwise copy what
    it cannot read and relabel it with this version): CollectionNotFoundError without an m3search
    manifest, ValueError for a newer schema version (not damage: a newer m3search reads it), CollectionDamagedError
    for a damaged one (a version that is not an integer, no model record, a weights fingerprint not a string)."""
    if not manifest or manifest.get("format") != MANIFEST_FORMAT:
        raise CollectionNotFoundError(f"{location} has no m3search manifest")
    version = manifest.get("schema_version", 0)  # absent in the first manifests
    if isinstance(version, bool) or not isinstance(version, int):
        raise damaged(location, f"schema_version {version!r} is not an integer")
    if version > SCHEMA_VERSION:
        raise _newer(version, location)
    if not isinstance(manifest.get("model"), dict) or not isinstance(manifest["model"].get("identity"), str):
        raise damaged(location, "no model record")
    if not isinstance(manifest["model"].get(MODEL_WEIGHTS_KEY, ""), str):
        raise damaged(location, f"model {MODEL_WEIGHTS_KEY} {manifest['model'][MODEL_WEIGHTS_KEY]!r} is not a string")
    return manifest


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
    quantized scores (False); Qdrant Edge builds ``int8`` and ``pq*`` copies only for the segments it
    indexes (large ones), so until then, and for new writes, candidates are scored on the stored
    vectors. ``colbert_pool_factor``: documents keep ``ceil(n / factor)``
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
        least = {"dense_dim": 1, "colbert_dim": 1, "vocab_size": 1, "hnsw_m": 0, "hnsw_ef_construct": 1}
        for name, low in least.items():
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
            object.__setattr__(self, name, int(v))  # JSON and the engines' clients take Python ints
        for name in ("colbert_on_disk", "dense_on_disk", "colbert_rescore"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
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
        object.__setattr__(self, "colbert_pool_factor", check_pool_factor(self.colbert_pool_factor))

    def check_new(self) -> Schema:
        """Itself, if a NEW collection may have this layout (an existing one opens as it was made).

        Unrescored ``binary1.5`` / ``binary2`` scores are refused: Qdrant Edge 0.9 scores them on a
        data-dependent scale in optimized segments and as ``binary1`` in the segment that takes new
        writes, so the last written documents ranked first (benchmarks/RESULTS.md)."""
        if self.colbert_quantization in ("binary1.5", "binary2") and not self.colbert_rescore:
            raise ValueError(
                f"colbert_quantization={self.colbert_quantization!r} needs colbert_rescore=True: its raw scores are "
                "on no fixed scale; for unrescored binary scores use 'binary1'"
            )
        return self

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
        d = dict(d)
        for f in fields(cls):  # what earlier versions stored as given: 0 / 1 for a flag, 100.0 for a count
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name in ("colbert_on_disk", "dense_on_disk") and (v is None or type(v) in (int, float)):
                d[f.name] = bool(v)  # as the engines read them then (truthiness)
            elif f.type == "bool" and type(v) is int and v in (0, 1):
                d[f.name] = bool(v)
            elif f.type == "int" and type(v) is float and v.is_integer():
                d[f.name] = int(v)
        return cls(**d)


def read_stored(manifest: Any, location: str, name: str = "the manifest") -> tuple[Schema, int]:
    """The schema and the window bound (``max_windows_stored``) a stored manifest records, read the same way by every
    engine's open: where it records none that reads (a hand edit, a disk fault), :class:`CollectionDamagedError`
    (:func:`damaged`), not a KeyError, TypeError or AttributeError from inside; where a newer m3search wrote it, the
    ValueError of :func:`check_manifest` (upgrade m3search)."""
    if not isinstance(manifest, Mapping):
        raise damaged(location, f"a JSON {type(manifest).__name__}, not an object", name)
    raw, schema = manifest.get("schema"), None
    if raw is None:
        why = "no schema"
    elif not isinstance(raw, Mapping):
        why = f"schema: a {type(raw).__name__}, not an object"
    else:
        try:
            schema = Schema.from_dict(raw)
        except (TypeError, ValueError) as exc:
            why = f"schema: {exc}"
    if schema is None:
        version = manifest.get("schema_version")
        if type(version) is int and version > SCHEMA_VERSION:
            raise _newer(version, location)
        raise damaged(location, why, name)
    bound = manifest.get("max_windows_stored", 1)  # absent before windows: one window each
    if isinstance(bound, bool) or not (isinstance(bound, int) or (isinstance(bound, float) and bound.is_integer())):
        raise damaged(location, f"max_windows_stored {bound!r} is not a whole number", name)
    return schema, max(1, int(bound))


def damaged(location: str, why: str, name: str = "the manifest") -> CollectionDamagedError:
    """The one message of a damaged manifest: ``name`` (the manifest, as the engine calls it) of the collection at
    ``location`` is damaged (``why``)."""
    return CollectionDamagedError(f"{name} of the collection at {location} is damaged ({why}); restore it from a copy")


def _newer(version: int, location: str) -> ValueError:
    """Not damage: a newer m3search reads it."""
    return ValueError(
        f"collection at {location} has schema version {version}; "
        f"this m3search reads up to {SCHEMA_VERSION} (upgrade m3search)"
    )


#: Per-query ranked list: ``[(id, score), ...]``, best first.
Hits = list


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
        if dup := sorted(repeated(self.ids)):
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
        indptr = np.cumsum([0] + [len(r.sparse[0]) for r in records], dtype=np.int64)
        ind = np.concatenate([np.zeros(0, np.int64)] + [r.sparse[0] for r in records]).astype(np.int64)
        val = np.concatenate([np.zeros(0, np.float32)] + [r.sparse[1] for r in records]).astype(np.float32)
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
