"""What both Qdrant engines share: the point layout of a document's windows, and every
engine method that does not depend on the client (Qdrant Edge in-process, or
qdrant-client for a server / local mode).

Why one module: the two engines store the same points and ask the same questions; they
differ only in the client classes that carry a request. :class:`QdrantEngine` implements
the :class:`~m3search.engines.base.Engine` protocol over small client hooks that only build
and send one client's objects (listed at the top of the class).

Point layout (schema version 3). A document of ``n`` windows is ``n`` points (plus, for a
long text, text points):

* window 0 (the HEAD): id = :func:`~m3search.engines.base.point_uuid` of the caller's id;
  payload ``{"id", "m": [metadata], "meta": <metadata as JSON text>}``, the text as
  ``"text"`` when it has at most :data:`TEXT_CHUNK` characters, else ``"chunks": c``; plus,
  when ``n > 1``, ``"windows": n`` and ``"spans"`` (character ``[start, end)`` of every window; also
  ``"spans"`` alone for one window that is not the whole text, as when ``max_windows=1`` cut it);
* window ``w > 0``: id = :func:`window_uuid`, payload ``{"id", "m": [metadata], "window": w}``
  (metadata on every window: filters run inside the vector queries; a metadata update sets the head's
  ``"m"`` and ``"meta"`` on every point, so that one dict is one operation);
* text point ``j < c``: id = :func:`text_uuid`, NO vectors, payload ``{"id", "chunk": j, "text"}`` (and
  ``"gen"`` in a generation, below) holding characters ``[j * TEXT_CHUNK, (j + 1) * TEXT_CHUNK)``:
  :meth:`QdrantEngine.get` joins them.

Why: Qdrant Edge deserializes a point's whole payload once per filter condition no payload
index answers (benchmarks/RESULTS.md, "Hostile input"). A filter is sent as ``HasVector("dense")``
(answered without reading payloads, false for text points) and then ONE nested condition over
``"m"`` (:func:`~m3search.engines.qdrant_filter.engine_filter`): one read per vector point, of
at most :data:`TEXT_CHUNK` characters of text plus the metadata, however large the documents.
``"meta"`` is what :meth:`get` returns: Qdrant's payload storage parses floats back with a
best-effort parser (serde_json without ``float_roundtrip``), which moves ~10-25 % of float64
values by 1-2 ULP; JSON text comes back exactly. Filters evaluate the parsed ``"m"`` values
(documented in docs/usage.md, "Filters").

Schema 1-2 layout (collections written before schema 3; read and written as they are, see
:meth:`QdrantEngine._opened`): window 0 ``{"id", "text", "metadata"}`` (+ ``windows`` /
``spans`` / ``parts``), window ``w > 0`` ``{"id", "metadata", "window": w}``; filters as flat
conditions over ``metadata.<field>``; a version-1 point (no ``window`` / ``windows`` keys)
reads as window 0 of 1. ``m3search migrate`` copies one into the schema-3 layout.

Parts. A Qdrant server rejects a multivector of more than 1,048,576 floats
(``MAX_MULTIVECTOR_FLATTENED_LEN`` in qdrant ``lib/common/common/src/validation.rs``: 1,023
tokens at 1024-d). An engine with a :attr:`QdrantEngine.multivector_limit` stores a longer
window as ``P`` points: the window point carries dense, sparse and the first token vectors,
part ``p >= 1`` (id :func:`part_uuid`, payload ``{"id", "m", "window": w, "part": p}``;
``"metadata"`` for ``"m"`` in schema 1-2) the next ones. Window 0 records every window's part
count (``"parts": [P0, P1, ...]``). A window's ColBERT score is then computed in NumPy over
ALL its parts' token vectors (per query token the maximum over every token of the window:
per-point MaxSim sums do not add up to it).

Crash rule (kill -9 during a multi-window upsert). Qdrant writes one request atomically
(Qdrant Edge: one WAL record; a server: one request per shard). A document re-written
with FEWER windows keeps no stale window: the same write overwrites each old window past
the new count with a TOMBSTONE, a point with no vectors (no vector query can return it)
and ``window >= 1`` (counting documents counts window-0 points only). The tombstones are
deleted by a second write; a crash before it leaves them invisible, and the document's
next delete removes them. Text points of the old version past the new chunk count are
tombstoned alike (the head's ``chunks`` names the ones that count). So every write shows the
old or the new document whole.

Long writes (:meth:`QdrantEngine.upsert_long`: a document whose windows exceed one ingest
piece, written with memory bounded by the piece). Every point but the head is written under the
write's OWN GENERATION ``g`` (drawn at random by the Collection and recorded in its pending mark; ids
:func:`part_uuid` / :func:`text_uuid` with ``g``, payload ``"gen": g``) as each piece is encoded, so
two clients' writes of one document begun at the same moment never share a point id; no read
follows those ids until the head names ``g``, and a vector query drops a hit whose ``gen`` its head
does not name (:meth:`QdrantEngine._committed`: one read of those heads, only when a hit has a
``gen`` or, on storage other clients write, is a window past the head, which another client's write
may have left beside a long write's switch). The switch is ONE write: the new head (text, metadata,
every window's span and parts, ``"gen": g``) with tombstones over every point of the old version; the
tombstones are deleted after. Of two writes begun at once, the last switch wins whole; the other's
points stay hidden (Several clients, below). A crash between the two leaves the tombstones,
invisible, under ids of the old generation that no later write or delete of the document names: the
Collection, which records the document being written in its manifest, deletes them before its next
write (:meth:`QdrantEngine.tidy`, by filter). A crash before the switch leaves the old version whole,
and its points of generation ``g`` hidden until that next write deletes them (``tidy``, by the
mark's ``g``). A document not stored is written the same way: a crash leaves it absent, its stray
points hidden from every query (no head names them) until the next write removes them
(:meth:`QdrantEngine.purge`). A write by an older release used the NEXT generation (1 for a document
not stored): its leftovers go with the document's next long write or delete.

Several clients (``shared``: a server collection). The Collection refuses to write or delete a document
that another client is writing long (its pending mark), but a call that passed that check before the mark
was written still lands, and writes in one request never wait for each other. Each write stays whole all
the same, and the last to land wins: a write deletes its tombstones by filter, only points that are
tombstones still (:meth:`QdrantEngine._delete_tombstones`), so a longer version another client wrote over
them since stays; a search drops a window past its head's window count (:meth:`QdrantEngine._committed`):
a write tombstones only the version it read, not a longer one written between its read and its write; a
delete removes only the points without a generation and those of the generation it read in the head, the
head included (:meth:`QdrantEngine._generations_read`), so a long write that began after the delete's
checks ends whole (a delete landing before its switch removes none of its points, one landing after it
removes them all). Left over: the points of a long write whose switch another long write's overwrote (their
marks written at once: the manifest has no compare-and-set) stay hidden, and no delete removes them (it
cannot tell them from a long write under way).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from m3search.engines.base import Engine, point_uuid, split_requests, wanted_modes
from m3search.engines.qdrant_filter import engine_filter
from m3search.engines.shapes import Hits, PointBatch, QueryVectors, Record, WindowScores, score_records
from m3search.filters import Filter
from m3search.plan import MODES

__all__ = ["QdrantEngine", "window_uuid", "text_uuid", "record_from_point", "TEXT_CHUNK", "LAYOUT"]

#: Namespaces of window points past the first (window 0 keeps the caller id's point_uuid) and of text points.
WINDOW_NAMESPACE = uuid.UUID("0c3e5b1d-41a7-5e2f-8d6a-9b4c2f1e7a53").bytes
TEXT_NAMESPACE = uuid.UUID("5d1f0b6e-2c4a-5b7e-9f3d-1a8c6e2b4d70").bytes
#: Namespace of the points of a generation ``g > 0`` (Long writes in the module docstring).
GEN_NAMESPACE = uuid.UUID("a4e2c7f1-9b3d-5e60-8c1a-7f2b4d6e9a15").bytes
#: Most characters of text on one point: a longer text is split into text points (see module).
TEXT_CHUNK = 16_384
#: Point layout written by this version (the schema version that introduced it); 2 = schema 1-2.
LAYOUT = 3
#: First-stage queries on a windowed collection over-fetch windows to find k documents.
OVERFETCH = 2
#: A stored document as its head names it (:meth:`QdrantEngine._stored`): its windows' part counts, its text
#: point count and its generation.
Stored = tuple[list[int], int, int]


def window_uuid(doc_id: str, window: int, gen: int = 0) -> str:
    """Point id of a document's window (UUID5; window 0 is :func:`point_uuid` of the id in every generation)."""
    return part_uuid(doc_id, window, 0, gen)


def text_uuid(doc_id: str, chunk: int, gen: int = 0) -> str:
    """Point id of text point ``chunk`` of a document (see the module docstring)."""
    if gen:
        return point_uuid(f"{gen}\x00t{chunk}\x00{doc_id}", GEN_NAMESPACE)
    return point_uuid(f"{chunk}\x00{doc_id}", TEXT_NAMESPACE)


def part_uuid(doc_id: str, window: int, part: int, gen: int = 0) -> str:
    """Point id of part ``part`` of a window (see Parts and Long writes in the module docstring)."""
    if not window and not part:
        return point_uuid(doc_id)  # the head: the one point a long write switches
    if gen:
        return point_uuid(f"{gen}\x00{window}\x00{part}\x00{doc_id}", GEN_NAMESPACE)
    if part:
        return point_uuid(f"{part}\x00{window}\x00{doc_id}", WINDOW_NAMESPACE)
    return point_uuid(f"{window}\x00{doc_id}", WINDOW_NAMESPACE)


def record_from_point(r: Any) -> Record:
    """A stored point (either client's record: ``.payload``, ``.vector``) as a :class:`Record`
    (a head with text points gets its text from :meth:`QdrantEngine._records`)."""
    p = r.payload or {}
    if "meta" in p:
        meta = json.loads(p["meta"])
    else:
        meta = p["m"][0] if "m" in p else p.get("metadata") or {}
    rec = Record(p["id"], p.get("text", ""), meta, spans=p.get("spans"), window=p.get("window", 0))
    v = r.vector if isinstance(r.vector, dict) else {}
    if "dense" in v:
        rec.dense = np.asarray(v["dense"], dtype=np.float32)
    if "sparse" in v:
        s = v["sparse"]
        rec.sparse = (np.asarray(s.indices, dtype=np.int64), np.asarray(s.values, dtype=np.float32))
    if "colbert" in v:
        rec.colbert = np.asarray(v["colbert"], dtype=np.float32)
    return rec


def is_head(payload: Mapping) -> bool:
    """True for a document's window-0 point (every other point has ``window`` or ``chunk``)."""
    return "window" not in payload and "chunk" not in payload


def collapse(points: Sequence[Any], k: int) -> Hits:
    """Scored window points (best first) as the best ``k`` documents: first window of each id."""
    out: dict[str, float] = {}
    for p in points:
        doc = p.payload["id"]
        if doc not in out:
            out[doc] = float(p.score)
            if len(out) == k:
                break
    return list(out.items())


class QdrantEngine(Engine):
    """The Engine protocol over Qdrant points (see the module docstring); subclasses supply the client hooks."""

    windowed = True
    #: Most floats of one point's multivector (None: no limit); longer windows are stored as parts.
    multivector_limit: int | None = None
    #: Point layout of this collection: :data:`LAYOUT` when created, the stored one when opened.
    layout: int = LAYOUT

    #: HNSW ``ef`` of the first-stage queries (None: Qdrant's own).
    hnsw_ef: int | None = None
    #: Requests of one write stay under this many bytes of JSON (None: no limit; see :func:`split_requests`).
    max_request_bytes: int | None = None
    #: The numeric engine options, as :func:`~m3search.plan.check_options` checks them (None: Qdrant's own ef).
    _OPTION_RULES: ClassVar[dict[str, dict[str, bool]]] = {"hnsw_ef": {"integer": True, "none": True}}
    #: The client's filter classes (:class:`~m3search.engines.qdrant_filter.Dialect`).
    _dialect: Any = None
    #: The client's sparse vector class (keywords ``indices``, ``values``).
    _sparse_vector: Any = None
    #: The client's search-param classes (keywords ``hnsw_ef``, ``exact``, ``quantization``; ``ignore``, ``rescore``).
    _search_params: Any = None
    _quantization_params: Any = None

    # ----------------------------------------------------------------- client hooks
    def _retrieve(self, uuids: list[str], payload: bool | list[str], vectors: bool | list[str]) -> list[Any]:
        """Stored points among ``uuids`` (any order): objects with ``.id``, ``.payload``, ``.vector`` (no request
        for no ``uuids``)."""
        raise NotImplementedError

    def _write(self, points: list[tuple[str, dict | None, dict]], sizes: list[int]) -> None:
        """Upsert ``(uuid, vectors or None for a tombstone, payload)`` points atomically (see module)."""
        raise NotImplementedError

    def _delete_points(self, uuids: list[str]) -> None:
        raise NotImplementedError

    def _set_payload(self, ops: list[tuple[dict, list[str]]]) -> None:
        """Set each ``payload``'s keys on its points (one request where possible)."""
        raise NotImplementedError

    def _delete_where(self, filter: Any) -> None:
        """Delete every point the client's ``filter`` matches."""
        raise NotImplementedError

    def _delete_documents(self, ids: list[str], must: Sequence[Any] = (), must_not: Sequence[Any] = ()) -> None:
        """Delete every point whose payload ``id`` is among ``ids`` and that meets ``must`` and none of ``must_not``
        (by filter: a scan where ``id`` has no index)."""
        d = self._dialect
        self._delete_where(d.filter(must=[d.match_any("id", ids), *must], must_not=list(must_not) or None))

    def purge(self, ids: Sequence[str], gens: Sequence[int] = ()) -> None:
        """The points of the documents' interrupted long writes: those of generations ``gens`` (text points
        included, which no head names), or, not given, every point with a generation. Not one of generation 0,
        which only a write in one request (``upsert``) makes, nor (given ``gens``) another long write's: another
        client may have begun writing the document since the caller found it absent."""
        if ids:
            d = self._dialect
            which = {"must": [d.match_any("gen", list(gens))]} if gens else {"must_not": [d.is_empty("gen")]}
            self._delete_documents(list(ids), **which)

    def tidy(self, ids: Sequence[str], gens: Sequence[int] = ()) -> None:
        """The tombstones of stored documents (:meth:`_delete_tombstones`): a long write stopped after its switch
        leaves those over the old generation, which no later write or delete of the document names (their ids
        are the old generation's). Deleting a tombstone is always safe: no read follows one, even mid-write. And
        the points of the stopped writes ``gens`` that no head names: a write stopped before its switch leaves
        them under its own generation, which no other write uses."""
        if ids:
            d = self._dialect
            self._delete_tombstones(d.match_any("id", list(ids)))
            if gens:  # (the heads read only when a stopped write named its generation)
                named = {g for _, _, g in self._stored(ids).values()}
                if dead := [g for g in gens if g not in named]:
                    self._delete_documents(list(ids), must=[d.match_any("gen", dead)])

    def _delete_tombstones(self, where: Any) -> None:
        """Delete the tombstones (no vector, no text: text points have no vector) among the points the client's
        condition ``where`` matches, by filter: where others write, one may have written a fresh point over a
        tombstone since (a longer version of the document, in one request), which has vectors or text and stays."""
        d = self._dialect
        self._delete_where(d.filter(must=[where, d.is_empty("text")], must_not=[d.has_vector("colbert")]))

    def _scroll(self, offset: Any, limit: int, docs_only: bool, with_vectors: bool) -> tuple[list[Any], Any]:
        raise NotImplementedError

    def _count(self, filter: Filter | None, docs_only: bool) -> int:
        raise NotImplementedError

    def _run(self, requests: list) -> list[list]:
        """Run query requests in one batch: per request, its scored points, best first."""
        raise NotImplementedError

    def _request(self, mode: str, vector: Any, limit: int, filter: Any, params: Any, with_id: bool) -> Any:
        """A nearest-point query request on the ``mode`` vector (payload: only ``"id"``, or none)."""
        raise NotImplementedError

    def _vector(self, mode: str, v: Any) -> Any:
        """A vector in the client's form (dense / colbert: float32 rows; sparse: ``(indices, values)``), as Python
        lists made by ``ndarray.tolist()`` (C): pyo3 reads a NumPy array element by element through NumPy scalars,
        ~1.8x the CPU per point (9.1 vs 5.1 ms for 136 x 1024 tokens, alternating rounds, qdrant-edge-py 0.9;
        benchmarks/RESULTS.md, ColBERT layouts)."""
        if mode == "sparse":
            ind, val = np.asarray(v[0], np.int64), np.asarray(v[1], np.float32)
            return self._sparse_vector(indices=ind.tolist(), values=val.tolist())
        return np.asarray(v, dtype=np.float32).tolist()

    def _point_vectors(self, vec: dict | None) -> dict:
        """A point's vectors (:meth:`_points`' float32 arrays; None: a tombstone's, none) in the client's form."""
        return {k: self._vector(k, v) if k == "sparse" else v.tolist() for k, v in (vec or {}).items()}

    def _has_ids(self, uuids: list[str]) -> Any:
        """A filter matching exactly the points ``uuids``."""
        raise NotImplementedError

    def _params(self, exact: bool, rescore: bool | None = None) -> Any:
        """Search params: the HNSW ``ef`` of this engine, and ``exact`` (a full scan); given ``rescore``, those that
        score on the quantized copy instead (``rescore``: again on the stored vectors)."""
        if rescore is None:
            return self._search_params(hnsw_ef=self.hnsw_ef, exact=exact)
        return self._search_params(exact=False, quantization=self._quantization_params(ignore=False, rescore=rescore))

    # ------------------------------------------------------- requests over the hooks
    def _filter(self, f: Filter | None, docs_only: bool = False) -> Any:
        """The client's filter (:func:`~m3search.engines.qdrant_filter.engine_filter` in this layout)."""
        return engine_filter(f, self._dialect, nested=self.layout >= 3, docs_only=docs_only)

    def _query_vector(self, query: QueryVectors, mode: str) -> Any:
        v = (query.sparse_indices, query.sparse_values) if mode == "sparse" else getattr(query, mode)
        return self._vector(mode, v)

    def _colbert_params(self) -> Any:
        """MaxSim search params. Without a quantized copy: ``exact``. With one: NOT ``exact``, which
        makes Qdrant ignore quantization (measured, qdrant-edge 0.9); the token vectors have no
        graph (m=0), so the query still scans every candidate, on the quantized copy, rescored on
        the stored vectors when ``colbert_rescore`` (the limit covers all candidates: all are rescored).
        """
        return self._params(True, None if self.schema.colbert_quantization is None else self.schema.colbert_rescore)

    def _maxsim_scale(self, query: QueryVectors) -> float:
        """Qdrant's MaxSim score to M3's: Qdrant sums over query vectors, M3 averages. Binary codes scored
        without rescoring give each token pair ``d - 2 * hamming`` (in [-d, d]): divided by ``d`` too, the
        fraction of agreeing signs, on the [-1, 1] scale of the other modes (not a cosine: fusion still
        weighs it like one)."""
        scale = 1.0 / max(len(query.colbert), 1)
        q = self.schema.colbert_quantization
        if q is not None and q.startswith("binary") and not self.schema.colbert_rescore:
            scale /= self.schema.colbert_dim
        return scale

    def _nearest(self, mode: str, vectors: list[Any], limit: int, filter: Filter | None, exact: bool) -> list[list]:
        """One nearest-window query per vector (``mode`` dense: float32 rows; sparse: ``(indices, values)``),
        scored points carrying ``payload["id"]``, best first."""
        flt, params = self._filter(filter), self._params(exact)
        return self._run([self._request(mode, self._vector(mode, v), limit, flt, params, True) for v in vectors])

    def _exact_scores(self, uuids: list[str], todo: dict[str, list[int]], query: QueryVectors) -> dict[str, np.ndarray]:
        """M3 scores of the points ``uuids[j]`` for ``j in todo[mode]`` (NaN: not stored), computed
        where the vectors live: per mode, one ``exact`` query filtered to those points (limit = their
        number); engines that cannot do that override this with :func:`score_records`."""
        out = {m: np.full(len(uuids), np.nan) for m in todo}
        no_tokens = query.sparse_indices is None or len(query.sparse_indices) == 0  # shares no token: all 0
        jobs = [(m, tuple(need)) for m, need in todo.items() if need and not (m == "sparse" and no_tokens)]
        exact, colbert, only, places = self._params(True), self._colbert_params(), {}, {}
        reqs = []
        for m, need in jobs:
            if need not in only:  # one filter per distinct candidate set (~0.5 ms each at 400 ids)
                only[need] = self._has_ids([uuids[j] for j in need])
                places[need] = at = {}  # every place of each point (an id may be given twice)
                for j in need:
                    at.setdefault(uuids[j], []).append(j)
            params = colbert if m == "colbert" else exact
            reqs.append(self._request(m, self._query_vector(query, m), len(need), only[need], params, False))
        for (m, need), res in zip(jobs, self._run(reqs)):
            at = places[need]
            out[m][[j for p in res for j in at[str(p.id)]]] = [p.score for p in res for _ in at[str(p.id)]]
        if "colbert" in out:
            out["colbert"] *= self._maxsim_scale(query)
        if "sparse" in out:  # a sparse query does not return points sharing no token with it: 0 if they exist
            need = [j for j in todo["sparse"] if np.isnan(out["sparse"][j])]
            proof = [out[m] for m in ("dense", "colbert") if m in out]
            unsure = [j for j in need if not any(np.isfinite(p[j]) for p in proof)]
            stored = {str(r.id) for r in self._retrieve([uuids[j] for j in unsure], False, False)}
            zero = [j for j in need if any(np.isfinite(p[j]) for p in proof) or uuids[j] in stored]
            out["sparse"][zero] = 0.0
        return out

    def _opened(self, max_windows_stored: int) -> None:
        """State read once when a collection is opened: the window count and the layout of the stored points (a
        head with ``metadata`` is schema 1-2, kept as it is: filters and writes follow it; an empty collection
        takes :data:`LAYOUT`)."""
        self.max_windows = max_windows_stored
        self.layout = LAYOUT  # the scroll's filter: heads of either layout have a dense vector
        heads, _ = self._scroll(None, 1, True, False)
        self.layout = 2 if heads and "metadata" in (heads[0].payload or {}) else LAYOUT

    # ------------------------------------------------------------------- windows
    def window_counts(self, ids: Sequence[str]) -> np.ndarray:
        """How many windows each stored document has (0: not stored); no read when no document has two."""
        return np.array([len(p) for p, _ in self._layout(ids)], dtype=np.int64)

    def _layout(self, ids: Sequence[str]) -> list[tuple[list[int], int]]:
        """Per document, the part count of each window ([] when not stored) and its generation: one
        read of window 0."""
        if self.max_windows <= 1:  # one window each: no long write happened (generation 0)
            found = self.existing(ids)
            return [([1] if i in found else [], 0) for i in ids]
        stored = self._stored(ids)
        return [stored[i][::2] if i in stored else ([], 0) for i in ids]

    def _stored(self, ids: Sequence[str]) -> dict[str, Stored]:
        """Stored documents among ``ids``: their windows' part counts, text point count and generation."""
        back = {point_uuid(i): i for i in ids}
        got = {}
        for r in self._retrieve(list(back), ["windows", "parts", "chunks", "gen"], False):
            p = r.payload or {}
            parts = p.get("parts") or [1] * int(p.get("windows", 1))
            got[back[str(r.id)]] = (parts, int(p.get("chunks", 0)), int(p.get("gen", 0)))
        return got

    @property
    def _per_point(self) -> int:
        """Most token vectors on one point (Parts in the module docstring; no limit: all)."""
        return 2**62 if self.multivector_limit is None else max(1, self.multivector_limit // self.schema.colbert_dim)

    def _parts(self, batch: PointBatch) -> list[int]:
        """How many points each window (row) of ``batch`` takes: its token vectors cut every :attr:`_per_point`."""
        return np.maximum(1, -(-np.diff(batch.colbert_offsets) // self._per_point)).tolist()

    def stored_units(self, batch: PointBatch) -> int:
        """Most points one document of ``batch`` takes (its windows, and the parts of long ones)."""
        units, wo = self._parts(batch), batch.window_offsets
        return max((sum(units[a:b]) for a, b in zip(wo[:-1], wo[1:])), default=1)

    def _meta(self, meta: dict, head: bool) -> dict:
        """The metadata keys of a point's payload in this collection's layout."""
        if self.layout < 3:
            return {"metadata": meta}
        return {"m": [meta], "meta": json.dumps(meta)} if head else {"m": [meta]}

    def _points(
        self, batch: PointBatch, old: Mapping[str, Stored], first: int = 0, gen: int | None = None
    ) -> tuple[list[tuple[str, dict | None, dict]], list[int], list[str]]:
        """Window (part and text) points of ``batch``, tombstones over every old point past the
        new layout, their approximate JSON sizes, and the tombstones' ids. ``first``: the window
        number of the batch's first window, ``gen``: the generation written (a piece of a long
        document, :meth:`upsert_long`; None: each document's stored one)."""
        sparse = batch.sparse.tocsr()
        dense = np.ascontiguousarray(batch.dense, dtype=np.float32)
        colbert = np.ascontiguousarray(batch.colbert, dtype=np.float32)
        if self.schema.colbert_dtype == "float16":
            # qdrant-client local mode keeps float32 whatever the datatype: round here so every Qdrant scores alike
            colbert = colbert.astype(np.float16).astype(np.float32)
        co, ip = batch.colbert_offsets, sparse.indptr
        wo, per, window_parts = batch.window_offsets, self._per_point, self._parts(batch)
        points, sizes, tombs = [], [], []
        for i, doc_id in enumerate(batch.ids):
            n, meta = int(wo[i + 1] - wo[i]), batch.metadata[i] or {}
            meta_bytes = len(json.dumps(meta))  # every point carries it ("m"); the head twice more ("meta", escaped)
            was_parts, was_chunks, was_gen = old.get(doc_id, ([], 0, 0))
            g_id = was_gen if gen is None else gen
            tag = {"gen": g_id} if g_id else {}  # a long write's points (search checks them against the head)
            parts = window_parts[wo[i] : wo[i + 1]]
            text, chunks = batch.texts[i], 0
            if self.layout >= 3 and len(text) > TEXT_CHUNK and first == 0:  # text points go with the head's piece
                chunks = -(-len(text) // TEXT_CHUNK)
            for w in range(n):
                j, g = wo[i] + w, first + w
                if co[j + 1] == co[j]:
                    raise ValueError(f"document {doc_id!r} has a window without ColBERT vectors")
                tokens = colbert[co[j] : co[j + 1]]
                vec = {
                    "dense": dense[j],
                    "sparse": (sparse.indices[ip[j] : ip[j + 1]], sparse.data[ip[j] : ip[j + 1]].astype(np.float32)),
                    "colbert": tokens if parts[w] == 1 else tokens[:per],
                }
                if g == 0:
                    payload = {"id": doc_id, **self._meta(meta, True), **tag}
                    payload.update({"chunks": chunks} if chunks else {"text": text})
                    payload.update(self._window_keys(parts, batch.recorded_spans(i)))
                else:
                    payload = {"id": doc_id, **self._meta(meta, False), "window": g, **tag}
                points.append((window_uuid(doc_id, g, g_id), vec, payload))
                n_floats = dense.shape[1] + 2 * (ip[j + 1] - ip[j]) + len(vec["colbert"]) * colbert.shape[1]
                text_bytes = len(text.encode("utf-8")) * 2 if g == 0 and not chunks else 0
                sizes.append(14 * int(n_floats) + text_bytes + meta_bytes * (3 if g == 0 else 1) + 512)
                for p in range(1, parts[w]):
                    chunk = tokens[p * per : (p + 1) * per]
                    part = {"id": doc_id, **self._meta(meta, False), "window": g, "part": p, **tag}
                    points.append((part_uuid(doc_id, g, p, g_id), {"colbert": chunk}, part))
                    sizes.append(14 * chunk.size + meta_bytes + 512)
            for c in range(chunks):
                piece = text[c * TEXT_CHUNK : (c + 1) * TEXT_CHUNK]
                points.append((text_uuid(doc_id, c, g_id), None, {"id": doc_id, "chunk": c, "text": piece, **tag}))
                sizes.append(2 * len(piece.encode("utf-8")) + 256)
            dead = self._tombstones(doc_id, was_parts, was_chunks, g_id, parts, chunks)  # past the new layout
            points += dead
            sizes += [256] * len(dead)
            tombs += [t[0] for t in dead]
        return points, sizes, tombs

    @staticmethod
    def _window_keys(parts: list[int], spans: list[list[int]] | None) -> dict:
        """A head's ``windows``, ``spans`` and ``parts`` keys (Point layout and Parts in the module docstring), each
        only where it says more than one whole window of one point (``spans``: None)."""
        keys = {"windows": len(parts)} if len(parts) > 1 else {}
        return keys | ({"spans": spans} if spans is not None else {}) | ({"parts": parts} if max(parts) > 1 else {})

    # -------------------------------------------------------------------- writes
    def upsert(self, batch: PointBatch) -> None:
        batch.validate(self.schema)
        if not batch.has_vectors:
            raise ValueError("upsert needs a batch with vectors")
        old = self._stored(batch.ids) if self._beside_heads else {}  # points past the new version: tombstoned
        self.max_windows = max(self.max_windows, self.stored_units(batch))
        points, sizes, tombs = self._points(batch, old)
        if points:
            self._write(points, sizes)  # old or new documents whole
        if tombs:
            self._delete_tombstones(self._has_ids(tombs))  # a crash before this leaves invisible tombstones

    def upsert_long(self, pieces: Iterable[PointBatch], gen: int = 0) -> None:
        """Long writes (module docstring): each piece's points written as it comes under the write's own
        generation ``gen`` (0: the next after the stored one), then ONE write of the head (text, metadata,
        every window's span and parts, the generation) with tombstones over the old version's points: the
        switch."""
        head, spans, parts, old = None, [], [], None
        for piece in pieces:
            piece.validate(self.schema)
            if not piece.has_vectors or len(piece) != 1:
                raise ValueError("upsert_long takes one-document pieces with vectors")
            doc_id = piece.ids[0]
            if head is None:
                old, gen = self._begin_long(doc_id, gen)
            parts += self._parts(piece)  # every window's point count so far
            self.max_windows = max(self.max_windows, sum(parts))
            points, sizes, _ = self._points(piece, {}, first=len(spans), gen=gen)
            spans += piece.doc_spans(0)
            if head is None:
                head, points, sizes = (points[0], sizes[0]), points[1:], sizes[1:]
            cut = ["part" not in payload for _, _, payload in points]  # between windows: none is read yet
            for r in split_requests(sizes, cut, self.max_request_bytes):
                self._write(points[r], sizes[r])
        if head is None:
            raise ValueError("upsert_long needs at least one piece")
        (uid, vec, first_piece), size = head  # window keys: the whole document's, not its first piece's
        payload = {k: v for k, v in first_piece.items() if k not in ("windows", "spans", "parts")}
        payload |= self._window_keys(parts, spans if len(spans) > 1 else first_piece.get("spans"))
        tombs = self._tombstones(doc_id, *old) if old else []
        self._write([(uid, vec, payload), *tombs], [size + 16 * len(spans)] + [256] * len(tombs))  # the switch
        if tombs:
            self._delete_tombstones(self._has_ids([t[0] for t in tombs]))  # a crash before this leaves them, invisible

    def _begin_long(self, doc_id: str, gen: int) -> tuple[Stored | None, int]:
        """The stored version of the document a long write begins (None: not stored) and the generation the write
        takes (``gen``; 0: the next after the stored one's), once the points of an older release's interrupted
        write are gone: beside a stored version, those of its next generation (the old version stays whole until
        the switch); else those of generations 0 and 1 (no head names them: nothing to keep)."""
        old = self._stored([doc_id]).get(doc_id)
        if old is None:
            self._delete([doc_id], {})
        else:
            self._delete_points(self._slots(doc_id, old[2] + 1))
        return old, gen or (old[2] + 1 if old else 1)

    def _slots(self, doc_id: str, gen: int) -> list[str]:
        """Every point id but the head's that a version of generation ``gen`` may have had: windows and
        parts within the most points any document had (``max_windows``): part ``p`` of window ``w``
        exists only in a document of at least ``w + p + 1`` points, so ``w + p < max_windows``."""
        n, parts = self.max_windows, self.max_windows if self.multivector_limit is not None else 1
        return [part_uuid(doc_id, w, p, gen) for w in range(n) for p in range(min(parts, n - w))][1:]

    def _tombstones(
        self, doc_id: str, parts: Sequence[int], chunks: int, gen: int, kept: Sequence[int] = (), kept_chunks: int = 0
    ) -> list[tuple[str, None, dict]]:
        """Vector-less points over the points of a stored version (its windows' ``parts``, ``chunks`` text
        points, generation ``gen``) that a new version's (``kept`` parts per window, ``kept_chunks``) do
        not overwrite; never over the head."""
        out = [
            (part_uuid(doc_id, w, p, gen), None, {"id": doc_id, "window": w, "part": p})
            for w, n in enumerate(parts)
            for p in range(kept[w] if w < len(kept) else 0, n)
            if w or p
        ]
        return out + [(text_uuid(doc_id, c, gen), None, {"id": doc_id, "chunk": c}) for c in range(kept_chunks, chunks)]

    def set_metadata(self, ids: Sequence[str], metadata: Sequence[dict]) -> None:
        if len(ids) != len(metadata):
            raise ValueError(f"{len(ids)} ids but {len(metadata)} metadata dicts")
        layout = self._layout(ids) if self.max_windows > 1 else [([1], 0)] * len(ids)
        limit = self.max_request_bytes
        groups: dict[str, tuple[dict, list[str]]] = {}  # one operation per distinct payload
        size = 0  # the request's JSON: each distinct payload once (~3 times its JSON: "m" and "meta"), ~40 B an id
        for doc_id, meta, (parts, gen) in zip(ids, metadata, layout):
            key = json.dumps(meta)  # (keys unsorted: an equal dict in another order is its document's own)
            points = [part_uuid(doc_id, w, p, gen) for w, n in enumerate(parts or [1]) for p in range(n)]
            payload = 3 * len(key) + 96  # "m", "meta" (escaped) and the operation's own JSON
            if limit is not None and groups and size + 40 * len(points) + payload > limit:
                self._set_payload(list(groups.values()))  # a document's points stay in one request
                groups, size = {}, 0
            size += 40 * len(points) + (payload if key not in groups else 0)
            # the head's payload on every point: one operation per distinct dict, so a document is never half
            # updated (Qdrant Edge writes each operation on its own)
            groups.setdefault(key, (self._meta(meta, True), []))[1].extend(points)
        if groups:
            self._set_payload(list(groups.values()))

    def delete(self, ids: Sequence[str]) -> None:
        """Every point a document may have, in one write: all windows (and parts) up to the most points
        any document had, in its generation and the next (points of an interrupted long write), and the
        text points its head names (this also removes tombstones left by a crash). Where others write
        (``shared``), only those of the generations read here (:meth:`_generations_read`)."""
        if ids:
            self._delete(ids, self._stored(ids) if self._beside_heads else {})

    def _delete(self, ids: Sequence[str], stored: Mapping[str, Stored]) -> None:
        """:meth:`delete` of the documents as read (``stored``: :meth:`_stored`)."""
        uuids = dict.fromkeys(point_uuid(i) for i in ids)
        for i in ids:
            _, chunks, gen = stored.get(i, ([], 0, 0))
            uuids.update(dict.fromkeys(self._slots(i, gen) + self._slots(i, gen + 1)))
            uuids.update(dict.fromkeys(text_uuid(i, c, gen) for c in range(chunks)))
        if self.shared:
            d = self._dialect
            self._delete_where(d.filter(must=[self._has_ids(list(uuids)), self._generations_read(stored)]))
        else:
            self._delete_points(list(uuids))

    def _generations_read(self, stored: Mapping[str, Stored]) -> Any:
        """The client's condition on the points a delete removes where others write: those without a generation
        (tombstones included) and those of the generation a head named when read (``stored``; 0 for a document
        not stored), or the next (an older release's long write), the head included. Not another: a long write
        that another client begins after the delete's checks (``Collection._refuse_others_writes``) has a
        generation of its own (one in 2**62, drawn at random), so it ends whole, switched before the delete
        lands (it then deletes nothing of it) or after."""
        d = self._dialect
        gens = sorted({0, 1} | {g + k for _, _, g in stored.values() for k in (0, 1)})
        return d.filter(should=[d.is_empty("gen"), d.match_any("gen", gens)])

    # --------------------------------------------------------------------- reads
    def existing(self, ids: Sequence[str]) -> set[str]:
        back = {point_uuid(i): i for i in ids}
        return {back[str(r.id)] for r in self._retrieve(list(back), False, False)}

    def get(self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        vec = with_vectors if isinstance(with_vectors, bool) else list(with_vectors)
        found = self._retrieve([point_uuid(i) for i in ids], True, vec)
        by_id = {r.id: r for r in self._records(found)}
        return [by_id.get(i) for i in ids]

    def _records(self, heads: Sequence[Any]) -> list[Record]:
        """Head points as records, each with its whole text (text points joined: one read)."""
        recs = [record_from_point(r) for r in heads]
        want = [
            (rec, r.payload["chunks"], r.payload.get("gen", 0))
            for rec, r in zip(recs, heads)
            if r.payload.get("chunks")
        ]
        uuids = [text_uuid(rec.id, c, g) for rec, k, g in want for c in range(k)]
        got = {str(r.id): r.payload["text"] for r in self._retrieve(uuids, True, False)}
        for rec, k, g in want:
            rec.text = "".join(got[text_uuid(rec.id, c, g)] for c in range(k))
        return recs

    def get_windows(
        self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = True, windows: range | None = None
    ) -> list[list[Record]]:
        """All window records of each document, in window order ([] for unknown ids), or those whose index
        ``windows`` holds; a window stored in parts comes back whole (its token vectors concatenated)."""
        vec = with_vectors if isinstance(with_vectors, bool) else list(with_vectors)
        layout = [
            ([(w, n) for w, n in enumerate(ps) if windows is None or w in windows], g) for ps, g in self._layout(ids)
        ]
        uuids = [part_uuid(i, w, p, g) for i, (ps, g) in zip(ids, layout) for w, n in ps for p in range(n)]
        by_uuid = {str(r.id): r for r in self._retrieve(uuids, True, vec)}
        heads = [by_uuid[u] for u in map(point_uuid, ids) if u in by_uuid]
        texts = {r.id: r.text for r in self._records(heads)}

        def whole(doc_id: str, w: int, n: int, g: int) -> Record:
            """Window ``w`` of ``n`` parts: the head's text, every part's token vectors."""
            rec = record_from_point(by_uuid[window_uuid(doc_id, w, g)])
            if w == 0:
                rec.text = texts[doc_id]
            if n > 1 and rec.colbert is not None:
                more = [record_from_point(by_uuid[part_uuid(doc_id, w, p, g)]).colbert for p in range(1, n)]
                rec.colbert = np.concatenate([rec.colbert, *more])
            return rec

        return [
            [whole(i, w, n, g) for w, n in parts if window_uuid(i, w, g) in by_uuid]
            for i, (parts, g) in zip(ids, layout)
        ]

    def count(self, filter: Filter | None = None) -> int:
        return self._count(filter, docs_only=self._beside_heads)

    @property
    def _beside_heads(self) -> bool:
        """Whether a document may have points beside its head (windows, text points): a count or scroll skips
        them, a write or delete reads the heads first (for those past the new version, or to remove)."""
        return self.max_windows > 1 or self.layout >= 3

    def iter_batches(self, batch_size: int = 256, *, with_vectors: bool = True) -> Iterator[PointBatch]:
        offset, windowed = None, self.max_windows > 1
        while True:
            raw, offset = self._scroll(offset, batch_size, self._beside_heads, with_vectors)
            if raw:
                recs = self._records(raw)
                if windowed and with_vectors and any(d.windows > 1 for d in recs):
                    recs = [w for ws in self.get_windows([d.id for d in recs], with_vectors=True) for w in ws]
                yield PointBatch.from_records(recs, self.schema.vocab_size)
            if offset is None or not raw:
                return

    # ------------------------------------------------------------------- queries
    def _search(self, mode: str, rows: list[Any], k: int, filter: Filter | None, exact: bool) -> list[Hits]:
        """Top-k documents: windows best first, each document at its best window. A windowed
        collection asks for more windows until k distinct documents (or all there are) come back."""
        limit = k if self.max_windows <= 1 else OVERFETCH * k
        out: list[Hits | None] = [None] * len(rows)
        todo = list(range(len(rows)))
        while todo:
            res = self._nearest(mode, [rows[i] for i in todo], limit, filter, exact)
            again = []
            for i, pts, raw in zip(todo, self._committed(res), res):
                out[i] = collapse(pts, k)
                if len(out[i]) < k and len(raw) == limit:
                    again.append(i)
            todo, limit = again, limit * 2
        return out

    def _committed(self, results: list[list]) -> list[list]:
        """The scored points without those their document's head does not name: of another generation (a long
        write not switched yet, or interrupted), or past its window count. One read of those heads, only when a
        hit has a generation or, where others write (``shared``), is a window past the head: another client's
        write may have stored windows that the last write does not tombstone, as it tombstones only the version
        it read (a write in one request of generation 0 just before a long write's switch; a longer version in
        one request between another write's read and its write)."""

        def unsure(p: Any) -> bool:
            return bool(p.payload.get("gen") or (self.shared and p.payload.get("window")))

        asked = {p.payload["id"] for pts in results for p in pts if unsure(p)}
        if not asked:
            return results
        live = self._stored(list(asked))

        def named(p: Any) -> bool:
            parts, _, gen = live.get(p.payload["id"], ([], 0, None))
            return p.payload.get("gen", 0) == gen and p.payload.get("window", 0) < len(parts)

        return [[p for p in pts if not unsure(p) or named(p)] for pts in results]

    def search_dense(self, q: np.ndarray, k: int, filter: Filter | None = None, *, exact: bool = False) -> list[Hits]:
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        return self._search("dense", list(q), k, filter, exact)

    def search_sparse(
        self, q: sp.csr_matrix, k: int, filter: Filter | None = None, *, exact: bool = False
    ) -> list[Hits]:
        q = sp.csr_matrix(q)
        rows = [(q.indices[a:b], q.data[a:b]) for a, b in zip(q.indptr[:-1], q.indptr[1:])]
        live = [i for i, (ind, _) in enumerate(rows) if len(ind)]  # an empty query shares no token with anything
        out: list[Hits] = [[] for _ in rows]
        for i, hits in zip(live, self._search("sparse", [rows[i] for i in live], k, filter, exact)):
            out[i] = hits
        return out

    def score(
        self,
        ids: Sequence[str],
        query: QueryVectors,
        modes: Sequence[str] = MODES,
        known: Mapping[str, Mapping[str, float]] | None = None,
    ) -> dict[str, np.ndarray]:
        return self._score(list(ids), query, modes, known).doc_max()

    def score_windows(self, ids: Sequence[str], query: QueryVectors, modes: Sequence[str] = MODES) -> WindowScores:
        return self._score(list(ids), query, modes, None)

    def _score(
        self, ids: list[str], query: QueryVectors, modes: Sequence[str], known: Mapping[str, Mapping[str, float]] | None
    ) -> WindowScores:
        """Every window of each candidate, exact; ``known`` document scores fill one-window documents."""
        modes = wanted_modes(modes)
        if known and "colbert" in known:
            raise ValueError("known scores are for dense and sparse only (ColBERT is always computed)")
        if self.max_windows <= 1:
            counts, layout, gens = np.ones(len(ids), np.int64), None, [0] * len(ids)
        else:
            layout, gens = zip(*self._layout(ids)) if ids else ((), ())
            counts = np.maximum([len(p) for p in layout], 1)  # a missing document: one NaN window
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        split = []  # (position, doc id, window) of windows stored in parts: whole-window MaxSim below
        if layout is not None and "colbert" in modes:
            split = [(offsets[d] + w, ids[d], w) for d, ps in enumerate(layout) for w, n in enumerate(ps) if n > 1]
        uuids = [window_uuid(i, w, g) for i, n, g in zip(ids, counts.tolist(), gens) for w in range(n)]
        out = {m: np.full(len(uuids), np.nan) for m in modes}
        skip = {j for j, _, _ in split}
        todo: dict[str, list[int]] = {}  # per mode, the windows to score: not known, not split (ColBERT)
        for m in modes:
            have = (known or {}).get(m) or {}
            given = {int(offsets[i]): have[d] for i, d in enumerate(ids) if counts[i] == 1 and have.get(d) is not None}
            out[m][list(given)] = list(given.values())
            todo[m] = [j for j in range(len(uuids)) if j not in given and (m != "colbert" or j not in skip)]
        if uuids and any(todo.values()):
            got = self._exact_scores(uuids, todo, query)
            for m in modes:
                if todo[m]:
                    out[m][todo[m]] = got[m][todo[m]]
        if split:  # per query token the maximum over EVERY token of the window, all parts together
            recs = self.get_windows(list(dict.fromkeys(d for _, d, _ in split)), with_vectors=["colbert"])
            whole = {(r.id, r.window): r for rs in recs for r in rs}  # a missing window is skipped there: NaN
            got = score_records([whole.get((d, w)) for _, d, w in split], query, ["colbert"])
            out["colbert"][[j for j, _, _ in split]] = got["colbert"]
        return WindowScores(offsets, out)
