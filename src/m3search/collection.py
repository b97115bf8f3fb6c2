"""The stored hybrid collection: BGE-M3's three outputs in one engine, every search mode.

Why one facade: like ``QdrantClient``, one class serves every backend; the location
string picks the engine (:mod:`m3search.engines`): a plain folder is the embedded Qdrant
Edge engine, ``qdrant://``, ``qdrant+local://``, ``milvus://`` and ``*.db`` go to the
engines over the optional clients (qdrant-client, pymilvus). The collection owns ids, the manifest, encoding, the search
plan, fusion and explanations; engines only store points and answer queries.

Guarantees:

* Each ingest batch is one engine write: after a crash (kill -9) a batch is either fully
  present or absent. ``add`` rejects a call whose ids already exist before writing anything.
  Memory is bounded: windows are encoded and written in pieces of :data:`PIECE_BYTES` of
  output (a batch whose windows hold more is several writes, each atomic, each document
  whole); a document longer than a piece is written piece by piece (``Engine.upsert_long``)
  and appears when complete; a crash leaves it absent (removed again before the next write; on a server,
  where other processes may be writing, once the writer's lease :data:`PENDING_LEASE_S` has run out).
* Long documents: a text longer than ``window`` tokens is stored as overlapping windows
  (``window`` tokens, one every ``stride``; at most ``max_windows``). A document's score
  in each mode is its best window's; fusion then ranks documents. A hit names the window
  that matched best (:attr:`Hit.window`, character offsets). ``max_windows=1`` is the
  one-window behaviour of m3search before windows: the rest of a long text is cut.
* Re-ranking modes take the union of the dense and sparse top-``candidates`` lists and
  compute every score of every candidate exactly (no "missing = 0").
* The manifest records the model identity (hash of config, heads and tokenizer.json) and
  its weights fingerprint (:func:`~m3search.encoder.weights_fingerprint`), dimensions, schema
  version and settings; opening with another model is an error.
* ONE PROCESS PER EMBEDDED COLLECTION: a second process opening the folder gets
  :class:`CollectionInUseError` ("collection at X is in use by process N"). Within a
  process, searches may run concurrently; writes are serialized by a lock.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import secrets
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from m3search.engines import location_options, resolve_engine, taken
from m3search.engines.base import Engine
from m3search.engines.files import readable
from m3search.engines.shapes import (
    CREATED_SCHEMA_VERSION,
    MANIFEST_FORMAT,
    MODEL_WEIGHTS_KEY,
    SCHEMA_VERSION,
    PointBatch,
    Pool,
    QueryVectors,
    Record,
    Schema,
    WindowScores,
    check_manifest,
)
from m3search.errors import (
    CollectionExistsError,
    CollectionInUseError,
    CollectionNotFoundError,
    DuplicateIdError,
    IngestInterrupted,
    ModelMismatchError,
    UnknownIdError,
    WriteConflictError,
)
from m3search.filters import INT64_MAX, INT64_MIN, parse_filter
from m3search.fusion import contributions, order, ranks, total, weighted
from m3search.plan import (
    DEFAULT_CANDIDATES,
    DEFAULT_WEIGHTS,
    MODES,
    SearchPlan,
    check_bool,
    check_deadline,
    check_fusion,
    check_group,
    check_int,
    check_queries,
    check_query,
    check_text,
    check_texts,
    check_weights,
    mode_name,
    parse_mode,
    repeated,
)
from m3search.pooling import pool_tokens
from m3search.windows import check_windows

__all__ = [
    "Collection",
    "Hit",
    "Record",
    "ModelMismatchError",
    "CollectionInUseError",
    "CollectionNotFoundError",
    "CollectionExistsError",
]

#: Hits past the k-th a list is asked for once when the (k+1)-th ties the k-th (duplicate documents): ties
#: among more documents than this keep the engine's order beyond it (bounded work, one batched request).
_TIE_LOOKAHEAD = 64

_SETTINGS_DEFAULTS = {
    "max_length": 8192,  # document tokens (capped at the model's position limit)
    "query_max_length": 512,  # FlagEmbedding's default for queries
    "batch_size": 128,  # documents per encode + engine write
    "candidates": DEFAULT_CANDIDATES,
    "weights": list(DEFAULT_WEIGHTS),
    "window": None,  # tokens per window (default: the document max_length, capped at the model's positions)
    "stride": None,  # tokens between window starts (default: window - DEFAULT_OVERLAP)
    "max_windows": None,  # windows per document at most (None: all; 1: cut like before windows)
}
#: Default tokens shared by consecutive windows (a sentence or two on both sides of a cut).
DEFAULT_OVERLAP = 128
#: How a windowed document's score is formed: "max" (per-mode maximum over windows, then fusion
#: over documents) or "fuse" (fusion per window, then the maximum); private, for measurement.
WINDOW_RULE = "max"
#: A windowed document's ColBERT score: "window" (its best window's MaxSim) or "document" (per query
#: token the maximum over the tokens of ALL its windows). Private, for measurement: on TIME "document"
#: lost nDCG@10 (colbert 0.708 -> 0.675) for +0.003 Recall@100 at ~10x the ColBERT cost (benchmarks/RESULTS.md).
COLBERT_RULE = "window"
#: Bytes of ColBERT output (float32) encoded and written at a time by an ingest call: a batch whose
#: windows hold more is written in pieces, and a longer document through ``Engine.upsert_long``.
PIECE_BYTES = 256 << 20
#: Seconds a long write's pending mark holds on storage other clients write (``Engine.shared``): the
#: writer refreshes its mark before each piece, so another client takes a mark for a crashed writer's
#: (and removes what it left) only when it is older than this. Why so long: a piece (PIECE_BYTES of
#: output) can take tens of minutes to encode on a small CPU, and clients' clocks may differ; too short
#: would remove a live writer's windows, while too long only keeps a crashed one's hidden leftovers
#: stored a while longer.
PENDING_LEASE_S = 6 * 3600
#: The client names (``Collection._client``) of this process's open handles, per storage that only this
#: process writes (``Engine.process_store``): there, a pending mark of any other client is a dead writer's.
_LIVE_CLIENTS: dict[str, set[str]] = {}
#: What a search request may leave out: the built-in values, which ``m3search tune`` may replace per collection
#: (``settings`` of the manifest; see :meth:`Collection.set_search_defaults`).
SEARCH_DEFAULTS = {
    "mode": "all",
    "fusion": "weighted",
    "weights": list(DEFAULT_WEIGHTS),
    "candidates": DEFAULT_CANDIDATES,
}


def _search_base(manifest: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The search defaults a collection had before ``m3search tune`` stored any (``manifest["search_base"]``):
    its stored ones while it was never tuned; the built-in ones for a collection tuned before the base was kept.
    ``settings``: the held settings, standing for the manifest's (which may lack keys, then built-in)."""
    if "search_base" in manifest:
        return dict(manifest["search_base"])
    if "tuning" in manifest:
        return dict(SEARCH_DEFAULTS)
    held = {**SEARCH_DEFAULTS, **manifest.get("settings", {}), **(settings or {})}
    return {key: json.loads(json.dumps(held[key])) for key in SEARCH_DEFAULTS}


def request_defaults(
    defaults: Mapping[str, Any], base: Callable[[], Mapping[str, Any]], mode: Any, fusion: Any, weights: Any
) -> tuple[Any, Any, Any]:
    """A search request's mode / fusion / weights, each None taken from ``defaults`` (the collection's search
    defaults), or from ``base()`` (those it had before tuning, :func:`_search_base`) for fusion and weights where
    the request names another mode. One rule for the search and for what integrations say of its scores
    (LangChain's relevance), so the fusion comes back by its lower-case name. Details:
    :meth:`Collection._request_defaults`."""
    mode = defaults["mode"] if mode is None else mode
    modes = parse_mode(mode)
    own = defaults if modes == parse_mode(defaults["mode"]) else base()
    if fusion is None:
        fusion = own["fusion"]
    if weights is None:
        weights = own["weights"]
        if sum(weights[MODES.index(m)] for m in modes) <= 0:
            weights = SEARCH_DEFAULTS["weights"]
    return mode, check_fusion(fusion), weights


_SCHEMA_SETTINGS = (
    "colbert_dtype",
    "colbert_on_disk",
    "dense_on_disk",
    "hnsw_m",
    "hnsw_ef_construct",
    "colbert_quantization",
    "colbert_rescore",
    "colbert_pool_factor",
)


@dataclass
class Hit:
    """One search result.

    ``score`` is the fused score; ``scores`` holds the exact ``dense``, ``sparse`` and
    ``colbert`` scores of this document for the query (whatever the mode; a long document's
    are its best window's in each mode); ``window`` is the ``{"start", "end"}`` character
    span of the best-matching window's tokens (for a one-window document, its text from the first
    token to the last: leading and trailing spaces fall outside);
    ``explain`` is filled when ``search(..., explain=True)``.
    """

    id: str
    score: float
    text: str
    metadata: dict
    scores: dict[str, float]
    explain: dict | None = None
    window: dict[str, int] | None = None

    @property
    def passage(self) -> str:
        """The text of the best window (a ``group="passage"`` hit's ``text`` is already that window's)."""
        if self.window is None or len(self.text) == self.window["end"] - self.window["start"]:
            return self.text  # a passage hit; or a document hit whose window is its whole text (start 0)
        return self.text[self.window["start"] : self.window["end"]]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what ``--json`` and the HTTP API send):
        ``{"id", "score", "scores", "text", "metadata"[, "window"][, "explain"]}``."""
        d: dict[str, Any] = {
            "id": self.id,
            "score": float(self.score),
            "scores": {m: (None if v is None else float(v)) for m, v in (self.scores or {}).items()},
            "text": self.text,
            "metadata": self.metadata or {},
        }
        if self.window is not None:
            d["window"] = self.window
        if self.explain is not None:
            d["explain"] = _plain(self.explain)
        return d


def _plain(x: Any) -> Any:
    """numpy scalars and arrays inside nested dicts/lists as plain Python (JSON-able)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return x


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_unique(ids: list[str]) -> None:
    if dup := repeated(ids):
        raise ValueError(f"duplicate ids in one call: {dup[:10]}")


def _as_id_list(ids: Any, name: str = "ids") -> list[str]:
    if isinstance(ids, str):
        return [ids]
    if ids is None or isinstance(ids, (bytes, dict)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a string or a list of strings, not {type(ids).__name__}")
    ids = list(ids)
    bad = [i for i in ids if not isinstance(i, str)]
    if bad:
        raise TypeError(f"{name} must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
    for i in ids:
        check_text(i, f"id {i!r}")
    return ids


def _check_documents(texts: Any, ids: Any, metadata: Any) -> tuple[list[str], list[str] | None, list[dict]]:
    """An add / upsert's texts, ids (None: none given) and metadata as lists, or the error naming the document
    (its id when ids are given, else its position). Why one function: ``M3SearchClient`` refuses, before it sends
    anything, what ``Collection.add`` refuses, with the same errors."""
    texts = check_texts(texts, unicode=False)  # checked below, naming each document
    n = len(texts)
    if ids is not None:
        ids = _as_id_list(ids)
        if len(ids) != n:
            raise ValueError(f"{n} texts but {len(ids)} ids")
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise ValueError(f"ids must be non-empty strings; item {empty[0]} is empty")
        _check_unique(ids)
    for i, text in enumerate(texts):  # the tokenizer's own error names neither
        check_text(text, f"text of document {ids[i]!r}" if ids is not None else f"texts[{i}]")
    return texts, ids, _check_metadata(metadata, n, ids)


#: Deepest nesting of objects and lists in one document's metadata. Qdrant stores deeper
#: values but then fails to read *any* payload back (serde_json's recursion limit, 128).
MAX_METADATA_DEPTH = 32


def _check_metadata(metadata: Any, n: int, ids: Sequence[str] | None = None, per: str = "text") -> list[dict]:
    """One plain-JSON dict per document, or an error naming the document and field.

    Only values every engine stores exactly are accepted: strings (valid Unicode), bools,
    None, finite floats, integers within int64 (larger ones came back as floats), and
    objects / lists of them up to :data:`MAX_METADATA_DEPTH` levels. Returns deep copies.
    Known gap: Qdrant Edge returns ~10 % of floats 1-2 ULP off (benchmarks/RESULTS.md, "Hostile input").
    ``per``: what the caller counts in ``n`` (texts for add, ids for update_metadata), for the messages.
    """
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, (dict, str, bytes)):  # a string is a sequence too: of characters, not dicts
        raise TypeError(f"metadata must be a list with one dict per {per} (or None), not a {type(metadata).__name__}")
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"{n} {per}s but {len(metadata)} metadata entries")
    out = []
    for i, m in enumerate(metadata):
        where = f"metadata of document {ids[i]!r}" if ids is not None else f"metadata[{i}]"
        if m is None:
            m = {}
        if not isinstance(m, dict):
            raise TypeError(f"{where} must be a dict with string keys, got {type(m).__name__}")
        out.append(_metadata_value(m, where, 0))
    return out


def _metadata_value(v: Any, where: str, depth: int) -> Any:
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str):
        return check_text(v, where)
    if isinstance(v, int):
        if not INT64_MIN <= v <= INT64_MAX:
            shown = str(v) if abs(v) < 10**30 else "an integer of more than 30 digits"
            raise ValueError(f"{where}: integer out of range (must fit in 64 bits: -2**63 .. 2**63-1), got {shown}")
        return int(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: {v!r} is not a JSON number (use a finite float or a string)")
        return float(v)
    if isinstance(v, (dict, list, tuple)):
        if depth >= MAX_METADATA_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_METADATA_DEPTH} levels")
        if isinstance(v, dict):
            bad = next((k for k in v if not isinstance(k, str)), None)
            if bad is not None:
                raise TypeError(f"{where}: keys must be strings, got {bad!r}")
            return {check_text(k, where): _metadata_value(x, f"{where}.{k}", depth + 1) for k, x in v.items()}
        return [_metadata_value(x, f"{where}[{j}]", depth + 1) for j, x in enumerate(v)]
    raise TypeError(f"{where}: {type(v).__name__} is not a JSON value (str, int, float, bool, None, dict, list)")


def _marked(mark: Any) -> str:
    """The document id of a pending mark (:meth:`Collection._mark_pending`; a plain id: one written before leases)."""
    return mark if isinstance(mark, str) else mark["id"]


def _writer(mark: Any) -> tuple[str, str | None]:
    """A pending mark's document id and client (None: a plain id, written before leases)."""
    return _marked(mark), mark.get("client") if isinstance(mark, dict) else None


class Collection:
    """A BGE-M3 hybrid collection. Build with :meth:`create` or :meth:`open`.

    >>> col = Collection.create("docs.m3", model="BAAI/bge-m3")      # doctest: +SKIP
    >>> col.add(["first text", "second text"], ids=["a", "b"])       # doctest: +SKIP
    >>> [h.id for h in col.search("text", k=2)]                      # doctest: +SKIP
    """

    def __init__(self, engine: Engine, manifest: dict, model: Any = None) -> None:
        self._engine = engine
        self._manifest = manifest
        #: This client's name on its pending marks (:meth:`_mark_pending`).
        self._client = uuid.uuid4().hex
        store = engine.process_store
        live = set() if store is None else _LIVE_CLIENTS.setdefault(store, set())  # (None: no one asks)
        live.add(self._client)
        #: Drops this client from its storage's open handles: at close, or when the handle is collected unclosed.
        self._unlive = weakref.finalize(self, live.discard, self._client)
        self._model_spec = model
        self._encoder = None
        self._lock = threading.RLock()
        self.schema: Schema = engine.schema
        stored = manifest.get("settings", {})
        self.settings: dict = {**SEARCH_DEFAULTS, **_SETTINGS_DEFAULTS, **stored}
        if "max_windows" not in stored:  # made before windows: keeps cutting long texts
            self.settings["max_windows"] = 1
        engine.max_windows = max(engine.max_windows, int(manifest.get("max_windows_stored", 1)))

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def exists(cls, path: str | os.PathLike, *, engine_options: dict | None = None) -> bool:
        """Whether a collection is stored at ``path`` (any engine's location), without opening it: no lock is
        taken and no model is loaded. ``engine_options`` as for :meth:`open` (they took ``**options`` here, so
        ``exists(loc, engine_options={...})``, written as for open, was "unknown engine option 'engine_options'").
        Where this process may not read the storage: :class:`~m3search.errors.CollectionUnreadableError` when that
        hides whether a collection is there; an embedded folder whose manifest is there answers True (open names
        the part it may not read)."""
        location, engine_options = location_options(path, engine_options)
        return resolve_engine(location).exists(location, **engine_options)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        model: Any = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        engine_options: dict | None = None,
        shards: int | None = None,
        replicas: int | None = None,
        **settings: Any,
    ) -> Collection:
        """Create an empty collection at ``path`` for ``model`` (default: ``$M3SEARCH_MODEL``).

        ``shards`` / ``replicas`` apply to distributed engines (``qdrant://`` locations); the
        embedded engine is one shard and refuses them.

        ``model`` is a name/path or an :class:`~m3search.M3Encoder`. Settings:
        ``colbert_dtype`` (default: the engine's, "turbo8" on the embedded engine and "float16"
        elsewhere; "float32" for exact ColBERT scores, "float16" for ~1e-3, or a lossy "turbo16" /
        "turbo8" / "turbo4" codec), ``colbert_quantization`` (None, or a quantized
        copy scored in RAM, see :data:`~m3search.engines.shapes.COLBERT_QUANTIZATIONS`),
        ``colbert_rescore`` (True: rescore on the stored vectors), ``colbert_pool_factor``
        (1; k keeps ``ceil(n / k)`` token vectors per document, :mod:`m3search.pooling`),
        ``colbert_on_disk`` (True), ``dense_on_disk`` (False), ``hnsw_m`` (16),
        ``hnsw_ef_construct`` (100), ``max_length`` (8192), ``query_max_length`` (512),
        ``batch_size`` (128 documents per write), ``candidates`` (search default),
        ``weights`` (search default), ``window`` (tokens per window of a long text: default
        ``max_length``, at most ``max_length`` and the model's positions), ``stride`` (tokens from one window's
        start to the next: default ``window - min(128, window // 4)``), ``max_windows`` (None: every window;
        1: one window, the rest cut as before windows existed).
        """
        unknown = set(settings) - set(_SCHEMA_SETTINGS) - set(_SETTINGS_DEFAULTS)
        if unknown:
            allowed = ", ".join(sorted(set(_SCHEMA_SETTINGS) | set(_SETTINGS_DEFAULTS)))
            raise TypeError(f"unknown collection setting(s) {sorted(unknown)}; allowed: {allowed}")
        location, engine_options = location_options(path, engine_options)
        for key, value in (("shards", shards), ("replicas", replicas)):  # checked by the engine, as its options
            if value is not None:
                if key in engine_options:  # (from the location's query too) one would be dropped
                    raise ValueError(f"{key} is given twice: {key}={value!r} and in the location or engine_options")
                engine_options[key] = value
        engine_cls = resolve_engine(location)
        if engine_cls.exists(location, **engine_options):
            raise taken(engine_cls, location, engine_options)
        encoder = cls._load_encoder(model, device, dtype)
        run = {**_SETTINGS_DEFAULTS, **{k: v for k, v in settings.items() if k in _SETTINGS_DEFAULTS}}
        run["weights"] = list(check_weights(run["weights"]))
        for key, least in (("max_length", 2), ("query_max_length", 2), ("batch_size", 1), ("candidates", 1)):
            v = run[key]  # a token limit holds [CLS] and [SEP] at least (the encoder's own check)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{key} must be an integer >= {least}, got {v!r}")
        run.update(_window_settings(run, encoder.max_length, engine_cls))
        settings.setdefault("colbert_dtype", engine_cls.default_colbert_dtype)
        schema = Schema(
            dense_dim=encoder.hidden_size,
            colbert_dim=encoder.colbert_dim,
            vocab_size=encoder.vocab_size,
            **{k: v for k, v in settings.items() if k in _SCHEMA_SETTINGS},
        ).check_new()
        manifest = {
            "format": MANIFEST_FORMAT,
            "schema_version": CREATED_SCHEMA_VERSION,
            "engine": engine_cls.name,
            "created": _now(),
            "m3search_version": _version(),
            "model": {
                "identity": encoder.identity,
                MODEL_WEIGHTS_KEY: encoder.weights_fingerprint,
                "name_or_path": str(encoder.name_or_path),
                "folder": str(Path(encoder.folder).resolve()),
                "hidden_size": encoder.hidden_size,
                "colbert_dim": encoder.colbert_dim,
                "vocab_size": encoder.vocab_size,
                "max_length": encoder.max_length,
            },
            "schema": schema.to_dict(),
            "settings": run,
            "max_windows_stored": 1,
        }
        engine = engine_cls.create(location, schema, **engine_options)
        try:
            engine.write_manifest(manifest)
        except BaseException:
            engine.close()
            raise
        col = cls(engine, manifest)
        col._encoder = encoder
        return col

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model: Any = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        engine_options: dict | None = None,
    ) -> Collection:
        """Open an existing collection.

        ``model=None`` uses the model recorded in the manifest (its folder, its name, then
        ``$M3SEARCH_MODEL``), loaded on the first encode. A model whose identity differs
        from the manifest's raises :class:`ModelMismatchError`.
        """
        location, engine_options = location_options(path, engine_options)
        engine = resolve_engine(location).open(location, **engine_options)
        try:
            manifest = engine.read_manifest()
            check_manifest(manifest, location)
            col = cls(engine, manifest, model)
            col._device, col._dtype = device, dtype
            if model is not None:
                col._check_model(model)
        except BaseException:
            engine.close()
            raise
        return col

    def close(self) -> None:
        """Write what is buffered and release the storage (an embedded collection's lock, a server's
        connection); a ``with`` block does it on the way out."""
        try:
            self._engine.close()
        finally:
            self._unlive()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Collection({self.location!r}, engine={self._engine.name}, model={self._manifest['model']['name_or_path']!r})"

    @property
    def location(self) -> str:
        """Where the collection is stored, as its engine names it."""
        return self._engine.location

    @property
    def manifest(self) -> dict:
        """A copy of the collection's settings as stored (model, schema, windows, fusion): changing it changes
        nothing stored."""
        return json.loads(json.dumps(self._manifest))

    @property
    def engine(self) -> Engine:
        """The storage backend (:class:`~m3search.engines.base.Engine`), for its own settings and tests; writes
        through it bypass the collection's checks."""
        return self._engine

    def info(self) -> dict[str, Any]:
        """What ``m3search info`` and ``GET /info`` show: location, engine, count, model,
        settings, schema, dates and, where the engine can tell, ``disk_bytes`` per part
        (dense / sparse / colbert / payload / wal / other / total). Where other clients write (a server), what
        is stored there: another client's search defaults and tuning show at once (one manifest read)."""
        m = self._sync() or self._manifest  # (_plain copies what is shown)
        out: dict[str, Any] = {
            "location": str(self.location),
            "engine": m.get("engine"),
            "count": int(self._engine.count(None)),  # (synced above)
            "model": m.get("model"),
            "settings": self._shown_settings(m.get("settings") or {}),
            "tuning": m.get("tuning"),  # how `m3search tune` chose the search defaults (None: built-in)
            "schema": self.schema.to_dict(),  # every layout key, also for manifests older than the key
            "created": m.get("created"),
            "schema_version": m.get("schema_version"),
        }
        with readable(self.location):  # made unreadable while open (a served folder chmod-ed): said, not 0 bytes
            disk = self._engine.disk_usage()
        if disk is not None:
            out["disk_bytes"] = disk
        return _plain(out)

    def _shown_settings(self, stored: dict) -> dict:
        """The manifest's settings, with the value in force for any setting it predates (a collection made
        before windows shows ``max_windows`` 1: it cuts long texts)."""
        return {**stored, **{k: self.settings[k] for k in _SETTINGS_DEFAULTS if k not in stored}}

    def optimize(self) -> bool:
        """Build pending indexes now (the dense HNSW graph); also run after every ingest call."""
        with self._lock:
            changed = self._engine.optimize()
            self._engine.flush()
            return changed

    # -------------------------------------------------------------------- model
    @staticmethod
    def _load_encoder(model: Any, device: str = "auto", dtype: str = "auto"):
        from m3search.encoder import M3Encoder

        if isinstance(model, M3Encoder):
            return model
        if model is None:
            model = os.environ.get("M3SEARCH_MODEL")
            if not model:
                raise ValueError("no model given: pass model=<name or path> or set M3SEARCH_MODEL")
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a name, a path or an M3Encoder, not {type(model).__name__}")
        return M3Encoder.from_pretrained(os.fspath(model), device=device, dtype=dtype)

    def _difference(self, identity: str, fingerprint: Callable[[], str]) -> str | None:
        """How a model (its identity and weights fingerprint) differs from the one the collection was built
        with; None: it is that model. The fingerprint is computed and compared only where the manifest records
        one (collections made before it are checked by identity alone). Why: the identity leaves the transformer
        weights out, so a backbone-only fine-tune passed and searched the vectors its base model stored."""
        rec = self._manifest["model"]
        if identity != rec["identity"]:
            return f"identity {identity[:12]}"
        want = rec.get(MODEL_WEIGHTS_KEY)
        if want is not None and (got := fingerprint()) != want:
            return (
                f"the same config, heads and tokenizer but other transformer weights (weights fingerprint "
                f"{got[:12]}, recorded {want[:12]}; the same weights in the other file format, model.safetensors "
                "or pytorch_model.bin, count as other)"
            )
        return None

    def _refuse_other(self, what: str, identity: str, fingerprint: Callable[[], str]) -> None:
        """ModelMismatchError unless ``what`` (identity, weights fingerprint) is the collection's model."""
        difference = self._difference(identity, fingerprint)
        if difference is not None:
            raise self._mismatch(what, difference)

    def _mismatch(self, what: str, difference: str) -> ModelMismatchError:
        rec = self._manifest["model"]
        return ModelMismatchError(
            f"collection at {self.location} was built with model {rec['name_or_path']!r} "
            f"(identity {rec['identity'][:12]}); {what} has {difference}. "
            "Open it with the same model, or with none to use the recorded one (model=None; on the command "
            "line, neither --model nor M3SEARCH_MODEL)."
        )

    def _check_model(self, model: Any) -> None:
        from m3search.encoder import M3Encoder, _resolve_folder, model_identity, weights_fingerprint

        if isinstance(model, M3Encoder):
            self._refuse_other(f"the encoder {model.name_or_path!r}", model.identity, lambda: model.weights_fingerprint)
            self._encoder = model
            return
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a name, a path or an M3Encoder, not {type(model).__name__}")
        folder = _resolve_folder(os.fspath(model))
        self._refuse_other(f"model {os.fspath(model)!r}", model_identity(folder), lambda: weights_fingerprint(folder))

    def use_encoder(self, encoder: Any) -> None:
        """Encode with ``encoder`` from now on: this collection's model behind another scheduler
        (the server passes a :class:`~m3search.batching.BatchedEncoder`, so ingest is batched
        behind queries on its one worker). A different model is refused."""
        self._refuse_other("the encoder", encoder.identity, lambda: encoder.weights_fingerprint)
        self._encoder = encoder

    @property
    def encoder(self):
        """The M3Encoder (loaded on first use for collections opened with ``model=None``)."""
        if self._encoder is not None:
            return self._encoder
        with self._lock:
            if self._encoder is not None:
                return self._encoder
            from m3search.encoder import DeviceError

            rec = self._manifest["model"]
            spec = self._model_spec
            tries = (
                [spec]
                if spec is not None
                else [rec.get("folder"), rec.get("name_or_path"), os.environ.get("M3SEARCH_MODEL")]
            )
            errors = []
            for cand in [t for t in dict.fromkeys(tries) if t]:
                if (
                    isinstance(cand, str)
                    and spec is None
                    and not Path(cand).expanduser().is_dir()
                    and cand.count("/") != 1
                ):
                    errors.append(f"{cand!r}: not found")
                    continue
                try:
                    enc = self._load_encoder(cand, getattr(self, "_device", "auto"), getattr(self, "_dtype", "auto"))
                except DeviceError:  # the same at every location: not the model's fault
                    raise
                except Exception as exc:  # try the next recorded location
                    errors.append(f"{cand!r}: {exc}")
                    continue
                difference = self._difference(enc.identity, lambda enc=enc: enc.weights_fingerprint)
                if difference is not None:
                    if spec is not None:
                        raise self._mismatch(f"model {cand!r}", difference)
                    errors.append(f"{cand!r}: different model ({difference})")
                    continue
                self._encoder = enc
                return enc
            raise ModelMismatchError(
                f"cannot load the model of collection {self.location} ({rec['name_or_path']!r}, identity "
                f"{rec['identity'][:12]}): "
                + "; ".join(errors)
                + ("" if spec is not None else ". Pass model=<path> to Collection.open.")  # unless it was
            )

    # ------------------------------------------------------------------- writes
    def add(
        self,
        texts: str | Sequence[str],
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        embeddings: Any = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
        optimize: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> list[str]:
        """Encode and store new documents; returns their ids (generated when ``ids`` is None).

        Raises :class:`~m3search.errors.DuplicateIdError` (a ValueError), writing nothing, if any
        id already exists; an empty list is a ValueError. Each batch of ``batch_size`` documents
        is encoded and written as one atomic unit.
        ``embeddings``: precomputed :class:`~m3search.M3Embeddings` of ``texts`` (skips encoding). Each text is
        stored as one window spanning all of it (a hit's ``window`` / ``passage``), also where the caller's encode
        cut it: the embeddings count the tokens read (``n_tokens``), not the characters they cover, and finding
        those takes the tokenizer, so the model, which this path never loads. They must be one encoding of
        ``texts`` by this collection's model, dense and ColBERT vectors L2-normalized (within
        ``UNIT_NORM_TOLERANCE``, as the model's are), all values finite: else a ValueError, nothing written.
        ``optimize=False`` leaves building indexes and flushing segments to a later :meth:`optimize`:
        for many small ingest calls, where doing both after each one costs more than the writes (the
        server defers them until ingest pauses). Search stays exact meanwhile (unindexed points are
        scanned), and what was written is in the engine's write-ahead log, so a killed process keeps it
        (tests/test_durability.py); Qdrant Edge holds the GIL while it optimizes or flushes (measured:
        2.1 s and 0.07-0.5 s at 2,000 proxy documents), which is why a server must not do it per request.
        ``stop``: asked before each batch; once it returns true the call raises
        :class:`~m3search.errors.IngestInterrupted` naming the documents written (whole) so far, the rest
        unwritten: how a server shutting down ends a long write between two batches instead of mid-way.
        """
        return self._ingest(
            texts, ids, metadata, embeddings, batch_size, show_progress, optimize, stop, overwrite=False
        )

    def upsert(
        self,
        texts: str | Sequence[str],
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        embeddings: Any = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
        optimize: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> list[str]:
        """Like :meth:`add`, but documents with existing ids are overwritten."""
        return self._ingest(texts, ids, metadata, embeddings, batch_size, show_progress, optimize, stop, overwrite=True)

    def _ingest(
        self, texts, ids, metadata, embeddings, batch_size, show_progress, optimize, stop, *, overwrite: bool
    ) -> list[str]:
        texts, ids, meta = _check_documents(texts, ids, metadata)
        n = len(texts)
        if ids is None:
            ids = [uuid.uuid4().hex for _ in range(n)]
        if embeddings is not None:
            if hasattr(embeddings, "doc"):
                raise TypeError("embeddings must be M3Embeddings with one row per text (windows are encoded here)")
            embeddings = _check_given(embeddings, n, self.schema, "embeddings", lambda row: f"document {ids[row]!r}")
        bs = self.settings["batch_size"] if batch_size is None else batch_size
        bs = check_int("batch_size", bs)
        with self._lock:
            self._sync()
            self._clear_pending()
            self._refuse_others_writes(ids, "nothing was written")
            if not overwrite:
                present = self._existing(ids)
                taken = [i for i in ids if i in present]
                if taken:
                    raise DuplicateIdError(
                        f"{len(taken)} id(s) already exist: {taken[:10]}{' ...' if len(taken) > 10 else ''}; "
                        "nothing was written (use upsert to overwrite)",
                        taken,
                    )
            progress, windows_progress = None, show_progress
            if show_progress is None:
                from m3search.encoder import stderr_is_terminal

                show_progress = n > bs and stderr_is_terminal()
            if show_progress:
                from tqdm.auto import tqdm

                progress = tqdm(total=n, desc="indexing", unit="doc", file=sys.stderr)
            truncated = cut = 0
            one = min(self.settings["max_length"], self.settings["window"] or self.settings["max_length"])
            try:
                for start in range(0, n, bs):
                    if stop is not None and stop():
                        raise IngestInterrupted(
                            f"stopped on request after {start} of {n} documents: the first {start} were written "
                            "whole, the others not at all",
                            ids[:start],
                            n,
                        )
                    end = min(start + bs, n)
                    if embeddings is None and self.settings["max_windows"] != 1:
                        cut += self._write_windows(ids[start:end], texts[start:end], meta[start:end], windows_progress)
                    else:
                        emb = embeddings[start:end] if embeddings is not None else None
                        spans = None
                        if emb is None:  # one window, the text's start, as before windows
                            emb = self.encoder.encode(texts[start:end], max_length=one, warn_truncation=False)
                            truncated += emb.truncated
                            spans = self._read_spans(texts[start:end], one, bool(emb.truncated))
                            _refuse_non_finite_output(emb, ids[start:end])
                        vectors = _vectors(emb, self.schema.colbert_pool_factor, ids[start:end])
                        batch = PointBatch(ids[start:end], texts[start:end], meta[start:end], *vectors, spans=spans)
                        self._write(batch)
                    if progress is not None:
                        progress.update(end - start)
            finally:
                if progress is not None:
                    progress.close()
                if truncated or cut:  # one line for the whole call, not one per batch
                    from m3search.encoder import TruncationWarning

                    if truncated:
                        limit, unit = min(one, self.encoder.max_length), "tokens"
                        reach = min(self.settings["max_length"], self.encoder.max_length)
                        name = "window" if limit < reach else "max_length"  # the setting that cut them
                        what = f"exceeded {name}={limit} tokens; only their first tokens are indexed"
                    else:
                        truncated, limit, unit, name = cut, self.settings["max_windows"], "windows", "max_windows"
                        what = f"exceeded max_windows={limit} windows; only their first windows are indexed"
                    warnings.warn(
                        TruncationWarning(f"{truncated} of {n} document(s) {what}", truncated, n, limit, unit, name),
                        stacklevel=3,
                    )
            if optimize:
                self._engine.optimize()
                self._engine.flush()
        return ids

    def _write(self, batch: PointBatch) -> None:
        """One atomic, durable engine write, after noting its window count."""
        self._note_windows(self._engine.stored_units(batch))
        self._engine.upsert(batch)

    def _write_windows(self, ids: list[str], texts: list[str], meta: list[dict], show: bool | None) -> int:
        """Encode texts as windows in pieces of about PIECE_BYTES of output and store them; returns
        how many texts lost windows to ``max_windows``.

        Documents whole within a piece are written with that piece (one write: the whole batch
        when it fits one piece). A document spanning pieces goes to :meth:`Engine.upsert_long`
        piece by piece, so a 10 MB text never has all its windows' vectors in memory at once.
        """
        s = self.settings
        per_token = 4 * self.schema.colbert_dim
        pieces = self.encoder.iter_windows(
            texts,
            window=s["window"],
            stride=s["stride"],
            max_windows=s["max_windows"],
            chunk_tokens=max(s["window"], PIECE_BYTES // per_token),
            show_progress=show,
        )
        slices = (
            sl for piece in pieces for sl in _doc_slices(piece, ids, texts, meta, self.schema.colbert_pool_factor)
        )
        whole: list[PointBatch] = []
        cut = 0
        for first, last, batch, piece_cut in slices:
            cut += piece_cut or 0
            if whole and (piece_cut is not None or not (first and last)):  # a new piece, or a long document
                self._write(PointBatch.join(whole))
                whole = []
            if first and last:
                whole.append(batch)
                continue

            doc = batch.ids[0]
            gen = secrets.randbits(62) + 1  # this write's own: no other write of the document names its points

            def rest(sl: PointBatch = batch, last: bool = last, gen: int = gen):  # one document's pieces, each noted
                done = 0
                while True:
                    if done and self._engine.shared:
                        self._mark_pending(sl.ids[0], True, gen=gen)  # the lease, renewed
                    done += self._engine.stored_units(sl)
                    self._note_windows(done)
                    yield sl
                    if last:
                        return
                    _, last, sl, _ = next(slices)  # (``cut`` is the first piece's: counted above)

            self._mark_pending(doc, True, gen=gen)  # a crash before the end leaves windows without a head
            try:  # another client may have begun writing it since this call's check: the STORED marks say
                self._sync()
                outcome = f"{doc!r} was not written (documents before it in this call may have been)"
                if self._engine.shared and not any(self._mine(m, doc) for m in self._manifest.get("pending") or []):
                    raise WriteConflictError(  # two marks written at once: the manifest kept the other's
                        f"another client of this collection began writing {doc!r} at the same moment; {outcome}",
                        [doc],
                    )
                self._refuse_others_writes([doc], outcome)
            except WriteConflictError:
                self._mark_pending(doc, False)
                raise
            try:
                self._engine.upsert_long(rest(), gen=gen)
            except Exception:  # failed, not crashed: other clients must not wait out a lease for it
                with contextlib.suppress(Exception):  # (the write's own error is the one to report)
                    self._mark_pending(doc, True, gen=gen, stopped=True)
                raise
            self._mark_pending(doc, False)
        if whole:
            self._write(PointBatch.join(whole))
        return cut

    def _mark_pending(self, doc_id: str, writing: bool, *, gen: int = 0, stopped: bool = False) -> None:
        """Record in the manifest that this client's long write of ``doc_id`` (its generation ``gen``) is under
        way, as of now (again: renewed), or done: if it stops part-way, the next write clears what it left
        (:meth:`_clear_pending`). ``stopped``: it failed part-way (an error, not a crash), so its mark is no live
        writer's to anyone."""
        mark = {"id": doc_id, "client": self._client, "at": time.time(), "gen": gen}
        if stopped:
            mark["stopped"] = True

        def edit(manifest: dict) -> None:
            others = [m for m in manifest.get("pending") or [] if not self._mine(m, doc_id)]
            manifest["pending"] = [*others, mark] if writing else others
            # before the first piece: older releases must refuse what they would misread (shapes.SCHEMA_VERSION)
            manifest["schema_version"] = max(int(manifest.get("schema_version") or 0), SCHEMA_VERSION)

        self._write_manifest(edit)

    def _mine(self, mark: Any, doc_id: str) -> bool:
        """Whether a pending mark is this client's for ``doc_id``."""
        return isinstance(mark, dict) and mark.get("id") == doc_id and mark.get("client") == self._client

    def _stale(self, mark: Any, now: float) -> bool:
        """Whether a pending mark is a stopped write's: any mark where no other client writes, this client's
        own (its writes hold the lock: one in the manifest stopped), one without a client (written before
        leases), on storage only this process writes (``Engine.process_store``) one of no open handle here
        (its process died), one its writer marked stopped (it failed), or another client's not renewed for
        :data:`PENDING_LEASE_S`; never a live writer's."""
        if not self._engine.shared or not isinstance(mark, dict) or mark.get("client") == self._client:
            return True
        if mark.get("stopped"):
            return True
        store = self._engine.process_store
        if store is not None:
            return mark.get("client") not in _LIVE_CLIENTS.get(store, ())
        return now - float(mark.get("at", 0)) > PENDING_LEASE_S

    def _stopped(self, marks: list) -> list:
        """The pending marks of stopped writes (:meth:`_stale`, asked once per mark), less those of a document
        that a live mark names too."""
        now = time.time()
        stale = [self._stale(m, now) for m in marks]
        live = {_marked(m) for m, s in zip(marks, stale) if not s}
        return [m for m, s in zip(marks, stale) if s and _marked(m) not in live]

    def _clear_pending(self) -> None:
        """After a crash during a long write, before anything else is written: remove that document's stray
        windows when it has no head (it is not stored), else what the write left beside the version its
        head names (``Engine.tidy``: its generation's points, or, stopped after its switch, the old version's
        tombstones).
        Not for a document another client is writing now (its mark is live): its windows are not strays, and
        a stopped write's mark of it stays for a later write. Where others write, the marks are read again
        right before removing anything: one may have begun writing such a document since (its mark comes
        before its first window)."""
        stale = self._stopped(self._manifest.get("pending") or [])
        if not stale:
            return
        pending = sorted({_marked(m) for m in stale})
        stored = self._engine.existing(pending)
        if self._engine.shared:
            self._sync()
            stale = [m for m in self._stopped(self._manifest.get("pending") or []) if _marked(m) in pending]
            pending = sorted({_marked(m) for m in stale})
            stored &= set(pending)
        stray = [i for i in pending if i not in stored]
        gens = [m["gen"] for m in stale if isinstance(m, dict) and m.get("gen")]
        if stray:  # (all generations while a mark has none: an older release's)
            self._engine.purge(stray, gens if len(gens) == len(stale) else ())
            # a plain-id mark is an older release's, whose long writes could leave windows without a generation,
            # which a purge keeps (a write in one request makes those) and a delete names
            self._engine.delete([i for i in stray if i in stale])
        if stored:
            self._engine.tidy(sorted(stored), gens)
        self._write_manifest(lambda m: m.update(pending=[x for x in m.get("pending") or [] if x not in stale]))

    def recover(self, ids: str | Sequence[str] | None = None, *, force: bool = False) -> list[dict[str, Any]]:
        """Clear other clients' pending long-write marks now (``m3search recover``), as ``terraform force-unlock``
        does: on a server collection a crashed writer's mark (kill -9, a machine lost) refuses every write and
        delete of its document (:class:`WriteConflictError`) until its lease, :data:`PENDING_LEASE_S`, runs out.

        Returns the pending marks of ``ids`` (default: all) as ``{"id", "client", "age_s", "live", "cleared"}``.
        A stopped write's mark is cleared with what it left, as the next write would; a live one (its writer may
        still be writing) only with ``force``, which takes it for a stopped write's.
        WARNING: forcing the mark of a write that IS still under way removes the windows it wrote so far, and
        its document ends broken (upsert it again to repair): force only when its writer is known to be dead."""
        wanted = None if ids is None else set(_as_id_list(ids))
        with self._lock:
            self._sync()
            now = time.time()
            marks = [m for m in self._manifest.get("pending") or [] if wanted is None or _marked(m) in wanted]
            live = [not self._stale(m, now) for m in marks]
            chosen = {_writer(m) for m, s in zip(marks, live) if s} if force else set()

            def stop(manifest: dict) -> None:  # those live marks, as their writers would mark them had they failed
                manifest["pending"] = [
                    {**m, "stopped": True} if _writer(m) in chosen else m for m in manifest.get("pending") or []
                ]

            if chosen:
                self._write_manifest(stop)
            self._clear_pending()
            left = {_writer(m) for m in self._manifest.get("pending") or []}
        return [
            {
                "id": _marked(m),
                "client": _writer(m)[1],
                "age_s": round(now - float(m["at"]), 1) if isinstance(m, dict) and "at" in m else None,
                "live": s,
                "cleared": _writer(m) not in left,
            }
            for m, s in zip(marks, live)
        ]

    def _sync(self) -> dict | None:
        """On storage other clients write (a server), their pending marks, and the window bound they may have
        raised: engines read that many points per document, and a stale 1 would treat another client's long
        documents as one window (stale metadata on their windows, windows left behind by a delete, window 0
        scored alone). Returns the manifest read there (None: none to read, the held one is what is stored)."""
        if not self._engine.shared:
            return None
        manifest = self._engine.read_manifest() or {}
        stored = int(manifest.get("max_windows_stored", 1))
        if stored > self._manifest.get("max_windows_stored", 1):
            self._manifest["max_windows_stored"] = stored
        self._engine.max_windows = max(self._engine.max_windows, stored)
        if "pending" in manifest or "pending" in self._manifest:  # other clients' long writes (_clear_pending)
            self._manifest["pending"] = manifest.get("pending") or []
        return manifest

    def _note_windows(self, most: int) -> None:
        """Record in the manifest, BEFORE the write, the most windows a stored document may have
        (engines read that many window points per document on delete; 1 skips all window work). Where
        others write the manifest too, also as a record of its own: a client that read the manifest
        before this raise and writes its copy back after it sets the manifest's key back."""
        if most > self._manifest.get("max_windows_stored", 1):
            self._engine.record_window_bound(most)
            self._write_manifest(lambda m: m.update(max_windows_stored=max(m.get("max_windows_stored", 1), most)))
        self._engine.max_windows = max(self._engine.max_windows, most)

    def _write_manifest(self, edit: Callable[[dict], Any]) -> None:
        """``edit`` applied to the manifest, written, then held. Where other clients write it too (``shared``),
        the stored manifest is edited, so only the keys this client changes are its own (a whole held copy
        wrote back another client's older settings, tuning and pending writes). A failed write (disk full)
        leaves the held manifest what is stored, so a retry writes it again."""
        base = (self._engine.read_manifest() if self._engine.shared else None) or self._manifest
        manifest = json.loads(json.dumps(base))
        edit(manifest)
        self._engine.write_manifest(manifest)
        self._manifest = manifest
        self._engine.max_windows = max(self._engine.max_windows, int(manifest.get("max_windows_stored", 1)))

    def _refuse_others_writes(self, ids: Sequence[str], outcome: str) -> None:
        """Raise :class:`WriteConflictError` when another client's live pending mark (as of the last
        :meth:`_sync`) names one of ``ids``: its long write of that document is under way, and a second write
        or a delete of it meanwhile could leave the document mixed (the other's switch over this one's
        windows). Only on storage other clients write (``Engine.shared``); elsewhere every mark is stale.
        ``outcome``: what the error says became of the call ("nothing was written")."""
        now, wanted = time.time(), set(ids)
        busy = {
            _marked(m)
            for m in self._manifest.get("pending") or []
            if _marked(m) in wanted and not self._stale(m, now)  # (this client's own marks are stale)
        }
        if busy:
            taken = [i for i in ids if i in busy]
            raise WriteConflictError(
                f"{len(taken)} id(s) are being written by another client of this collection: "
                f"{taken[:10]}{' ...' if len(taken) > 10 else ''}; {outcome} (retry when that write has "
                f"ended; a crashed writer's mark expires after {PENDING_LEASE_S} s, or, once that writer is known "
                f"to be dead, clear it now: m3search recover --collection {self.location} --id ID --force, "
                "or Collection.recover(ids, force=True))",
                taken,
            )

    def _existing(self, ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for a in range(0, len(ids), 1000):
            out |= self._engine.existing(ids[a : a + 1000])
        return out

    def update_metadata(self, ids: str | Sequence[str], metadata: dict | Sequence[dict]) -> None:
        """Replace the metadata of existing documents without re-encoding.

        ``metadata``: one dict for all ``ids``, or a list of dicts. Unknown ids raise
        :class:`~m3search.errors.UnknownIdError` and nothing is changed. Atomicity: one dict for all
        ids is one durable engine write while it fits one request (the engine's ``max_request_bytes``; each
        document is in one); with a list, each distinct dict is one write (Qdrant's payload update
        takes one value per call), so a crash part-way leaves some documents updated.
        """
        ids = _as_id_list(ids)
        if isinstance(metadata, dict):
            ids = list(dict.fromkeys(ids))
            metadata = [metadata] * len(ids)
        else:  # which of two dicts would a repeated id keep?
            _check_unique(ids)
        meta = _check_metadata(metadata, len(ids), ids, per="id")
        with self._lock:
            self._sync()
            present = self._existing(ids)
            missing = [i for i in ids if i not in present]
            if missing:
                raise UnknownIdError(f"unknown id(s): {missing[:10]}; no metadata was changed", missing)
            self._engine.set_metadata(ids, meta)

    def delete(self, ids: str | Sequence[str]) -> dict[str, list[str]]:
        """Delete documents; returns ``{"deleted": [...], "missing": [...]}`` in input order."""
        ids = list(dict.fromkeys(_as_id_list(ids)))
        with self._lock:
            self._sync()
            self._clear_pending()
            self._refuse_others_writes(ids, "nothing was deleted")
            present = self._existing(ids)
            deleted = [i for i in ids if i in present]
            self._engine.delete(deleted)
        return {"deleted": deleted, "missing": [i for i in ids if i not in present]}

    # -------------------------------------------------------------------- reads
    def get(self, ids: str | Sequence[str]) -> list[Record | None]:
        """Stored documents (id, text, metadata) in input order; None for unknown ids."""
        return self._engine.get(_as_id_list(ids))

    def count(self, filter: Any = None) -> int:
        """Number of documents (matching ``filter``)."""
        f = parse_filter(filter)
        self._sync()  # an older layout counts points unless the bound says windows exist
        return self._engine.count(f)

    def __len__(self) -> int:
        return self.count()

    # ------------------------------------------------------------------- search
    def search(
        self,
        query: str,
        *,
        k: int = 10,
        mode: str | None = None,
        fusion: str | None = None,
        weights: Sequence[float] | None = None,
        candidates: int | None = None,
        filter: Any = None,
        explain: bool = False,
        exact: bool = False,
        group: str = "document",
    ) -> list[Hit]:
        """Search one query; hits ordered by fused score descending, then id.

        ``mode``: dense, sparse, colbert, dense+sparse, dense+colbert or all (see
        :mod:`m3search.plan`). ``fusion``: weighted (BGE-M3's formula), rrf (k = 60) or
        dbsf. ``weights``: (dense, sparse, colbert). ``candidates``: per first-stage list
        in re-ranking modes. ``filter``: :mod:`m3search.filters` grammar. ``exact``:
        full scan instead of HNSW for the dense list. ``mode``, ``fusion``, ``weights`` and
        ``candidates`` left out (None) take the collection's defaults (all, weighted,
        (0.4, 0.2, 0.4), 200 unless ``m3search tune`` stored others; see :meth:`search_defaults`).
        ``group``: "document" (one hit per
        document, at its best window) or "passage" (one hit per window: ``text`` is the
        window's text, ``window`` its offsets in document ``id``; the windows of the
        candidate documents are fused and ranked).
        """
        check_query(query)
        return self.search_batch(
            [query],
            k=k,
            mode=mode,
            fusion=fusion,
            weights=weights,
            candidates=candidates,
            filter=filter,
            explain=explain,
            exact=exact,
            group=group,
        )[0]

    def search_batch(
        self,
        queries: Sequence[str],
        *,
        k: int = 10,
        mode: str | None = None,
        fusion: str | None = None,
        weights: Sequence[float] | None = None,
        candidates: int | None = None,
        filter: Any = None,
        explain: bool = False,
        exact: bool = False,
        query_embeddings: Any = None,
        group: str = "document",
    ) -> list[list[Hit]]:
        """:meth:`search` for several queries (one encoder pass, batched first-stage queries).

        ``query_embeddings``: precomputed M3Embeddings of ``queries`` (skips encoding), checked as
        :meth:`add`'s ``embeddings`` are (a ValueError naming the query, counted from 0).
        """
        queries = check_queries(queries)
        check_group(group, explain)
        exact = check_bool("exact", exact)
        mode, fusion, weights = self._request_defaults(mode, fusion, weights)
        plan = SearchPlan.build(
            k=k,
            mode=mode,
            fusion=fusion,
            weights=weights,
            candidates=candidates,
            filter=filter,
            explain=explain,
            default_candidates=self.settings["candidates"],
            default_weights=self.settings["weights"],
        )
        if not queries:
            return []
        if query_embeddings is not None:
            emb = self._check_query_embeddings(query_embeddings, len(queries))
        else:
            emb = self.encoder.encode(queries, max_length=self.settings["query_max_length"])
        check_deadline("the first-stage search")
        self._sync()
        qvs = [QueryVectors.from_embeddings(emb, i) for i in range(len(queries))]
        if plan.reranks:
            pools = self._engine.candidates_batch(
                emb.dense, emb.sparse, qvs, plan.candidates, plan.filter, exact=exact, colbert="colbert" in plan.modes
            )
            return [self._finish(plan, qv, pool, group) for qv, pool in zip(qvs, pools)]
        lists = self._one_list(plan.modes[0], emb, plan.k, plan.filter, exact)
        return [
            self._finish(plan, qv, Pool([i for i, _ in hits], {plan.modes[0]: dict(hits)}), group)
            for qv, hits in zip(qvs, lists)
        ]

    def _read_spans(self, texts: Sequence[str], limit: int, cut: bool) -> np.ndarray:
        """Character ``[start, end)`` of what a one-window write reads of each text: its first token to the last
        one kept at ``limit`` tokens, as a window's span is (spaces around the text fall outside). Why: a hit's
        ``window`` / ``passage`` of a cut document was the whole text, most of which the model never read, and
        ``max_windows=1`` gave an uncut text's spaces where windows left them out. Only the texts it may differ
        for are tokenized again: all of a batch with a ``cut`` text, else those with a space at either end (a
        text without is read whole)."""
        spans = np.array([[0, len(t)] for t in texts], dtype=np.int64).reshape(-1, 2)
        redo = [i for i, t in enumerate(texts) if cut or t[:1].isspace() or t[-1:].isspace()]
        if redo:
            _, bounds, spans_of = self.encoder._tokenize_content([texts[i] for i in redo])
            keep = min(limit, self.encoder.max_length) - 2  # content tokens: <s> and </s> take two
            n = len(redo)
            spans[redo] = spans_of(np.arange(n), np.zeros(n, np.int64), np.minimum(np.diff(bounds), keep))
        return spans

    def _one_list(self, mode: str, emb: Any, k: int, filter: Any, exact: bool) -> list[list[tuple[str, float]]]:
        """Each query's top ``k`` of the dense or sparse list, ties at the cut broken by id ascending as fusion
        orders the rest. Why: the engine's own order among equal scores (duplicate documents) made
        ``search(k=1)`` return a hit that ``search(k=2)`` ranks second. One extra hit is asked for; the queries
        whose extra hit ties the k-th are asked again, together, for ``_TIE_LOOKAHEAD`` more."""
        search, rows = (
            (self._engine.search_dense, emb.dense) if mode == "dense" else (self._engine.search_sparse, emb.sparse)
        )
        lists = search(rows, k + 1, filter, exact=exact)
        tied = [i for i, h in enumerate(lists) if len(h) == k + 1 and h[k - 1][1] == h[k][1]]
        if tied:
            again = search(rows[tied], k + _TIE_LOOKAHEAD, filter, exact=exact)
            for i, hits in zip(tied, again):
                lists[i] = hits
        return [sorted(hits, key=lambda h: (-h[1], h[0]))[:k] for hits in lists]

    def _check_query_embeddings(self, emb: Any, n: int) -> Any:
        """Precomputed query embeddings, if they can stand for this collection's encoding of ``n`` queries."""
        return _check_given(emb, n, self.schema, "query_embeddings", lambda row: f"query {row} (from 0)")

    # ------------------------------------------------------------ search defaults
    def search_defaults(self) -> dict[str, Any]:
        """What a search request falls back to: ``{"mode", "fusion", "weights", "candidates"}``."""
        return {key: json.loads(json.dumps(self.settings[key])) for key in SEARCH_DEFAULTS}

    def set_search_defaults(self, setting: dict[str, Any] | None, *, tuning: dict | None = None) -> dict[str, Any]:
        """Store the search defaults in the manifest; ``None`` restores the ones the collection had before
        its first tuning (those it was created with; the built-in ones where they were not kept).

        ``setting``: ``{"mode", "fusion", "weights", "candidates"}`` (what ``m3search tune``
        chose); ``tuning``: how it was chosen, or why the defaults were kept (kept in the
        manifest, shown by ``info``; None removes it).
        The defaults in use before the first call are kept in the manifest (``search_base``): a request in
        another mode than the stored one falls back to their fusion and weights (:meth:`_request_defaults`).
        Why one manifest write: it is atomic in every engine, so an interrupted call leaves
        the manifest as it was. Stored documents are never touched.
        """
        if setting is not None:
            if set(setting) != set(SEARCH_DEFAULTS):
                raise ValueError(
                    f"a search setting has exactly the keys {sorted(SEARCH_DEFAULTS)}, got {sorted(setting)}"
                )
            # the errors a search request with these values would get (k=1: a depth below 10 is kept as given)
            plan = SearchPlan.build(**setting, k=1)
            setting = {
                "mode": mode_name(plan.modes),
                "fusion": plan.fusion,
                "weights": list(plan.weights),
                "candidates": plan.candidates,
            }
        record = None if tuning is None else json.loads(json.dumps(tuning))
        new: dict[str, Any] = {}

        def edit(manifest: dict) -> None:
            base = _search_base(manifest)
            new.clear()
            new.update(setting if setting is not None else base)
            manifest.setdefault("settings", {}).update(new)
            manifest.pop("tuning", None)
            manifest.pop("search_base", None)
            if setting is not None:
                manifest["search_base"] = base
            if record is not None:
                manifest["tuning"] = record

        with self._lock:
            self._write_manifest(edit)  # on a server the stored manifest is edited (another client's bound kept)
            self.settings = {**self.settings, **new}
        return json.loads(json.dumps(new))

    def _request_defaults(self, mode: Any, fusion: Any, weights: Any) -> tuple[Any, Any, Any]:
        """A request's omitted mode / fusion / weights, from the collection's defaults.

        Tuned fusion and weights belong to the tuned mode: a request that names another mode
        gets those the collection had before tuning (:func:`_search_base`; weights fitted to
        dense+colbert give sparse zero weight). A default never fails a request: weights that
        give the requested modes zero total give way to the built-in ones.
        """
        return request_defaults(
            self.settings, lambda: _search_base(self._manifest, self.settings), mode, fusion, weights
        )

    def candidate_scores(
        self,
        queries: Sequence[str],
        *,
        candidates: int,
        filter: Any = None,
        query_embeddings: Any = None,
    ) -> list[tuple[list[str], dict[str, np.ndarray]]]:
        """Each query's re-ranking pool (dense top-``candidates`` ∪ sparse top-``candidates``):
        its ids and the exact ``dense`` / ``sparse`` / ``colbert`` score of every member.

        Why: every search setting of a re-ranking mode ranks a subset of this pool with these
        scores, so tuning scores the pool once and tries settings on arrays (:mod:`m3search.tuning`).
        """
        queries = check_queries(queries)  # (a string is one query's, not a list of its characters)
        plan = SearchPlan.build(k=1, candidates=candidates, filter=filter, default_weights=DEFAULT_WEIGHTS)
        if not queries:
            return []
        emb = query_embeddings
        if emb is None:
            emb = self.encoder.encode(queries, max_length=self.settings["query_max_length"])
        else:
            emb = self._check_query_embeddings(emb, len(queries))
        qvs = [QueryVectors.from_embeddings(emb, i) for i in range(len(queries))]
        self._sync()
        pools = self._engine.candidates_batch(emb.dense, emb.sparse, qvs, plan.candidates, plan.filter, colbert=True)
        out = []
        for qv, pool in zip(qvs, pools):
            cand, scores, _ = self._pool_scores(qv, pool, MODES)
            out.append((cand, scores))
        return out

    def _pool_scores(
        self, qv: QueryVectors, pool: Pool, modes: Sequence[str]
    ) -> tuple[list[str], dict[str, np.ndarray], WindowScores | None]:
        """Exact ``modes`` scores of a re-ranking pool's documents (per mode, the best window's),
        with every window's scores when documents have several windows (the best window and
        the "fuse" rule need them). Candidates deleted between the pool and the scoring
        (a concurrent delete) are dropped."""
        cand, ws = pool.ids, None
        if self._engine.max_windows > 1:
            ws = self._engine.score_windows(cand, qv, modes)
            scores = _doc_scores(self._engine, cand, qv, ws)
        else:  # scores the pool already carries are exact: only the rest is computed
            have_colbert = pool.colbert is not None and "colbert" in modes
            need = [m for m in modes if not (m == "colbert" and have_colbert)]
            scores = self._engine.score(cand, qv, need, known=pool.known) if need else {}
            if have_colbert:
                scores["colbert"] = np.asarray(pool.colbert, dtype=np.float64)
        scores = {m: np.asarray(scores[m], dtype=np.float64) for m in modes}
        keep = np.all([np.isfinite(s) for s in scores.values()], axis=0) if cand else np.zeros(0, bool)
        if not keep.all():
            cand = [c for c, ok in zip(cand, keep) if ok]
            scores = {m: s[keep] for m, s in scores.items()}
            ws = None if ws is None else _select_docs(ws, np.flatnonzero(keep))
        return cand, scores, ws

    def _finish(self, plan: SearchPlan, qv: QueryVectors, pool: Pool, group: str = "document") -> list[Hit]:
        """Score candidate documents exactly, fuse, take the top k, fill in all scores, best windows, payloads."""
        if group == "passage":
            return self._passages(plan, qv, pool.ids)
        weights = plan.weight_map()
        windowed = self._engine.max_windows > 1
        if plan.reranks:
            cand, scores, ws = self._pool_scores(qv, pool, plan.modes)
        else:
            m, cand, ws = plan.modes[0], pool.ids, None
            scores = {m: np.array([pool.known[m][i] for i in cand], dtype=np.float64)}
        if not cand:
            return []
        check_deadline("fusion")
        if ws is not None and WINDOW_RULE == "fuse":  # fusion per window, then each document's best window
            o = ws.windows
            labels = [(cand[d], w) for d in range(len(cand)) for w in range(o[d + 1] - o[d])]
            wparts = contributions(plan.fusion, {m: ws.scores[m] for m in plan.modes}, weights, labels)
            fused = np.maximum.reduceat(total(plan.fusion, wparts, weights), o[:-1])
            parts = {m: np.maximum.reduceat(p, o[:-1]) for m, p in wparts.items()}  # for explain
        else:
            parts = contributions(plan.fusion, scores, weights, cand)
            fused = total(plan.fusion, parts, weights)
        vectors = ["sparse"] if plan.explain else False
        top = order(cand, fused)[: plan.k]
        top_ids = [cand[j] for j in top]
        records = self._engine.get(top_ids, with_vectors=vectors)
        if windowed:  # the top documents' windows in every mode: all their scores and their best window
            top_ws = self._engine.score_windows(top_ids, qv, MODES)
            top_max = _doc_scores(self._engine, top_ids, qv, top_ws, skip=tuple(scores))
            all_scores = {m: (scores[m][top] if m in scores else top_max[m]) for m in MODES}
            best = _best_windows(top_ws, plan.modes, weights)
        else:
            rest = [m for m in MODES if m not in scores]
            extra = self._engine.score(top_ids, qv, rest) if rest else {}
            all_scores = {m: (scores[m][top] if m in scores else extra[m]) for m in MODES}
            best = [0] * len(top_ids)
        if plan.explain:
            found_by = self._found_by(plan, qv, pool, cand, scores)
            mode_ranks = {m: ranks(cand, s)[top] for m, s in scores.items()}
        hits = []
        for r, (j, doc_id) in enumerate(zip(top, top_ids)):
            rec = records[r]
            if rec is None:  # deleted concurrently
                continue
            spans = rec.window_spans
            start, end = spans[min(best[r], len(spans) - 1)]
            hit = Hit(
                id=doc_id,
                score=float(fused[j]),
                text=rec.text,
                metadata=rec.metadata,
                scores={m: float(all_scores[m][r]) for m in MODES},
                window={"start": int(start), "end": int(end)},
            )
            if plan.explain:
                sources = [name for name in ("dense", "sparse") if doc_id in found_by[name]]
                if best[r]:  # the lexical match shown is the best window's (if a concurrent write left it)
                    wins = self._engine.get_windows([doc_id], with_vectors=["sparse"])[0]
                    rec = wins[best[r]] if best[r] < len(wins) else rec
                hit.explain = {
                    "fusion": plan.fusion,
                    "modes": list(plan.modes),
                    "weights": {m: weights[m] for m in plan.modes},
                    "contributions": {m: float(parts[m][j]) for m in plan.modes},
                    "ranks": {m: int(mode_ranks[m][r]) for m in plan.modes},
                    "candidates": len(cand),
                    "found_by": sources,
                    "matched_tokens": self._matched_tokens(qv, rec),
                    "window": best[r],
                }
            hits.append(hit)
        return hits

    def _passages(self, plan: SearchPlan, qv: QueryVectors, cand: list[str]) -> list[Hit]:
        """Every window of the candidate documents scored exactly, fused over windows, the top k windows.

        Exact for the single-mode searches: a window among the k best belongs to a document
        among the k best (its best window scores at least as much)."""
        if not cand:
            return []
        ws = self._engine.score_windows(cand, qv, MODES)
        o = ws.windows
        where = [(d, w) for d in range(len(cand)) for w in range(o[d + 1] - o[d])]
        live = np.all([np.isfinite(ws.scores[m]) for m in plan.modes], axis=0)
        if plan.modes == ("sparse",):  # a window with no query token does not match, as no document without does
            live &= ws.scores["sparse"] > 0
        live = np.flatnonzero(live)
        if not len(live):
            return []
        labels = [(cand[where[j][0]], where[j][1]) for j in live]  # (no copy of a long id per window)
        parts = contributions(plan.fusion, {m: ws.scores[m][live] for m in plan.modes}, plan.weight_map(), labels)
        fused = total(plan.fusion, parts, plan.weight_map())
        top = order(labels, fused)[: plan.k]
        docs = list(dict.fromkeys(cand[where[live[t]][0]] for t in top))
        recs = dict(zip(docs, self._engine.get(docs)))
        hits, shown = [], set()
        for t in top:
            d, w = where[live[t]]
            rec = recs.get(cand[d])
            if rec is None:  # deleted concurrently
                continue
            start, end = rec.window_spans[min(w, rec.windows - 1)]
            first = cand[d] not in shown  # a document's later passages get copies of its metadata: one hit each
            shown.add(cand[d])
            hits.append(
                Hit(
                    id=cand[d],
                    score=float(fused[t]),
                    text=rec.text[start:end],
                    metadata=rec.metadata if first else copy.deepcopy(rec.metadata),
                    scores={m: float(ws.scores[m][live[t]]) for m in MODES},
                    window={"start": int(start), "end": int(end)},
                )
            )
        return hits

    def _found_by(
        self, plan: SearchPlan, qv: QueryVectors, pool: Pool, cand: list[str], scores: dict[str, np.ndarray]
    ) -> dict[str, set[str]]:
        """Which first-stage list (dense / sparse top-C) held each candidate (for explain).

        When the engine gathered the pool in one request it did not say; every member of
        a top-C list is in the pool, so that list is the pool's top C by that score.
        """
        if not plan.reranks:
            return {m: set(cand) if m in plan.modes else set() for m in ("dense", "sparse")}
        if pool.found_by is not None:
            return pool.found_by
        have = {m: scores[m] for m in ("dense", "sparse") if m in scores}
        rest = [m for m in ("dense", "sparse") if m not in have]
        if rest:
            have.update(self._engine.score(cand, qv, rest))
        out = {}
        for m, s in have.items():
            live = np.flatnonzero(s > 0) if m == "sparse" else np.arange(len(cand))  # sparse lists hold overlaps only
            best = order([cand[j] for j in live], s[live])[: plan.candidates]
            out[m] = {cand[live[j]] for j in best}
        return out

    def _matched_tokens(self, qv: QueryVectors, rec: Record) -> list[dict]:
        """Shared lexical tokens, readable, with query and document weights (largest product first)."""
        if rec.sparse is None or qv.sparse_indices is None:
            return []
        di, dv = rec.sparse
        common, a, b = np.intersect1d(qv.sparse_indices, di, return_indices=True)
        if not len(common):
            return []
        qw, dw = qv.sparse_values[a].astype(np.float64), dv[b].astype(np.float64)
        prod = qw * dw
        idx = np.argsort(-prod, kind="stable")
        tokens = self.encoder.convert_id_to_token([int(t) for t in common[idx]])
        raw = getattr(getattr(self.encoder, "tokenizer", None), "id_to_token", None)
        if raw is not None:  # a piece that decodes to whitespace (e.g. "▁") shows as itself
            tokens = [t if t.strip() else (raw(int(common[i])) or t) for t, i in zip(tokens, idx)]
        return [
            {
                "token": tok,
                "token_id": int(common[i]),
                "query_weight": float(qw[i]),
                "doc_weight": float(dw[i]),
                "product": float(prod[i]),
            }
            for tok, i in zip(tokens, idx)
        ]


def _non_finite(emb: Any) -> tuple[str, int] | None:
    """The first output of ``emb`` (all three given) holding NaN or an infinity, and the row it is in; None if
    none does. One pass over the values, about what one copy of them costs (0.08 % of encoding 32 cranfield
    passages with the proxy model in bf16 on CPU: ``benchmarks/check_cost.py``); only where one is not finite is
    its row looked for."""
    for name, values, starts in (
        ("dense", emb.dense, None),
        ("sparse", emb.sparse.data, emb.sparse.indptr),
        ("colbert", emb.colbert, emb.colbert_offsets),
    ):
        finite = np.isfinite(values)
        if not finite.all():
            return name, _row_of(int(np.argmin(finite.all(axis=1) if finite.ndim == 2 else finite)), starts)
    return None


#: Largest ``|L2 norm - 1|`` accepted in given dense and ColBERT vectors (``embeddings=``, ``query_embeddings=``).
#: The encoder's own output is within 2.3e-7 (fp32 and bf16 models: it normalizes in fp32), a bfloat16 round trip
#: of it within 2e-3, random 1024-wide vectors normalized in bfloat16 (FlagEmbedding's half precision) within
#: 4.4e-3 (``benchmarks/unit_norm.py``, RESULTS.md); raw [CLS] or token vectors are far off.
UNIT_NORM_TOLERANCE = 2e-2


#: The texts given embeddings stand for, as the messages of :func:`_check_given` name them (singular, plural).
_GIVEN_FOR = {"embeddings": ("document", "documents"), "query_embeddings": ("query", "queries")}


def _check_given(emb: Any, n: int, schema: Schema, what: str, text: Callable[[int], str]) -> Any:
    """``emb`` as the engines read it (arrays, CSR sparse), if it can stand for this collection's encoding of ``n``
    texts; else a ValueError naming the argument, the field and the text. Why: another model's, a partial encode's
    or a malformed one failed deep in the engine (NumPy's or Qdrant's words), matched nothing, or read other rows
    (a CSC matrix sliced by rows); non-finite values drop a document from every list; raw (unnormalized) vectors
    rank silently wrong, since every score assumes BGE-M3's unit vectors. ``what``: the argument (a key of
    ``_GIVEN_FOR``); ``text(row)``: row ``row``'s text for the message. One pass over the values (the norms find
    NaN and infinity too), before anything is written."""
    one, many = _GIVEN_FOR[what]

    def refuse(message: str) -> ValueError:
        return ValueError(message + ("; nothing was written" if what == "embeddings" else ""))

    if len(emb) != n:
        raise refuse(f"{n} {many} but {what} for {len(emb)}")
    missing = [name for name in MODES if getattr(emb, name, None) is None]
    if missing:
        raise refuse(f"{what} lack {', '.join(missing)}: every hit carries all three scores, so encode with all three")
    dense, colbert, offsets = (np.asarray(x) for x in (emb.dense, emb.colbert, emb.colbert_offsets))
    if dense.ndim != 2 or colbert.ndim != 2 or not sp.issparse(emb.sparse):
        raise refuse(
            f"{what} are not an M3Embeddings encoding: dense and colbert must be 2-D arrays (shapes {dense.shape}, "
            f"{colbert.shape}), sparse a SciPy sparse matrix (got {type(emb.sparse).__name__})"
        )
    sparse = sp.csr_matrix(emb.sparse)
    got = (dense.shape[1], colbert.shape[1], sparse.shape[1])
    if got[0] != schema.dense_dim or got[1] != schema.colbert_dim or got[2] > schema.vocab_size:
        raise refuse(
            f"{what} do not come from this collection's model (dense {got[0]}, colbert {got[1]}, vocabulary "
            f"{got[2]}; the collection: {schema.dense_dim}, {schema.colbert_dim}, {schema.vocab_size})"
        )
    if dense.shape[0] != n or sparse.shape[0] != n or offsets.shape != (n + 1,):
        raise refuse(
            f"{what} are not one encoding of {n} {many} (dense rows {dense.shape[0]}, sparse rows "
            f"{sparse.shape[0]}, colbert offsets {offsets.shape[0] if offsets.ndim == 1 else offsets.shape})"
        )
    if offsets[0] != 0 or offsets[-1] != len(colbert) or (np.diff(offsets) < 1).any():
        # a real encoding gives each text one token vector at least (</s>); none made Qdrant Edge fail deep inside
        raise refuse(
            f"{what}.colbert_offsets must run from 0 to the number of ColBERT vectors, at least one vector per {one}"
        )
    if not np.isfinite(sparse.data).all():
        row = _row_of(int(np.argmin(np.isfinite(sparse.data))), sparse.indptr)
        raise refuse(f"{what}.sparse holds NaN or infinite values ({text(row)})")
    for name, values, starts in (("dense", dense, None), ("colbert", colbert, offsets)):
        norms = np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float32, casting="same_kind"))
        off = ~(np.abs(norms - 1) <= UNIT_NORM_TOLERANCE)  # NaN and infinity too
        if off.any():
            first = int(np.argmax(off))
            row = text(_row_of(first, starts))
            if not np.isfinite(values[first]).all():
                raise refuse(f"{what}.{name} holds NaN or infinite values ({row})")
            raise refuse(
                f"{what}.{name} of {row} are not L2-normalized (a vector of norm {norms[first]:.4g}"
                f"{': a zero vector' if norms[first] == 0 else ''}): BGE-M3's dense and ColBERT vectors have norm 1 "
                "and every score assumes it; give each vector divided by its L2 norm"
            )
    out = copy.copy(emb)
    out.dense, out.sparse, out.colbert, out.colbert_offsets = dense, sparse, colbert, offsets
    return out


def _row_of(i: int, starts: Any) -> int:
    """The text (row of the embeddings) that value or vector ``i`` of an output belongs to: ``i`` itself where
    each text has one (dense), else found in the output's per-text ``starts`` (sparse ``indptr``, ColBERT offsets)."""
    return i if starts is None else int(np.searchsorted(starts, i, side="right")) - 1


def _refuse_non_finite_output(emb: Any, names: Sequence[str]) -> None:
    """The model's NaN or infinity (a float16 overflow) refused before its document's write: it would drop the
    document from every list, or pass for any score. Only the model's output: given ``embeddings`` are checked
    once, whole, in ``_ingest`` before anything is written. ``names``: each row's document id."""
    if bad := _non_finite(emb):
        doc = names[bad[1]]
        label = {"dense": "dense vectors", "sparse": "sparse weights", "colbert": "ColBERT vectors"}[bad[0]]
        raise ValueError(
            f"the {label} of document {doc!r} hold NaN or infinite values (the model's output: a float16 overflow?); "
            f"{doc!r} was not written (documents before it in this call may have been)"
        )


def _vectors(emb: Any, pool_factor: int, names: Sequence[str]) -> tuple:
    """``(dense, sparse, colbert, colbert_offsets)`` of embeddings, ColBERT pooled once per window
    before the write (queries are untouched); ``names``: each window's document id, for the errors."""
    colbert, offsets = pool_tokens(emb.colbert, emb.colbert_offsets, pool_factor, names=names)
    return emb.dense, emb.sparse, colbert, offsets


def _doc_slices(piece: Any, ids: list[str], texts: list[str], meta: list[dict], pool_factor: int):
    """A piece of :meth:`M3Encoder.iter_windows` output cut by document:
    ``(first, last, one-document PointBatch, cut)`` per document in it, ``first`` / ``last``
    saying whether the slice holds the document's first / last window (``cut``: the piece's
    on its first slice, None on the others)."""
    doc, e = piece.doc, piece.embeddings
    bounds = np.flatnonzero(np.diff(doc)) + 1
    for k, (a, b) in enumerate(zip([0, *bounds.tolist()], [*bounds.tolist(), len(doc)])):
        d = int(doc[a])
        rows = e[a:b]
        names = [ids[d]] * (b - a)
        _refuse_non_finite_output(rows, names)
        batch = PointBatch(
            [ids[d]],
            [texts[d]],
            [meta[d]],
            *_vectors(rows, pool_factor, names),
            np.array([0, b - a]),
            piece.spans[a:b],
        )
        first, last = piece.index[a] == 0, piece.index[b - 1] == piece.count[d] - 1
        yield bool(first), bool(last), batch, piece.cut if k == 0 else None


def _doc_scores(
    engine: Engine, ids: list[str], qv: QueryVectors, ws: WindowScores, skip: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Per mode, each document's score from its windows' (``ws``): the best window's, except
    ColBERT under the ``"document"`` rule, MaxSim over all the document's tokens (not for ``skip``)."""
    scores = ws.doc_max()
    if COLBERT_RULE == "document" and "colbert" in scores and "colbert" not in skip and len(qv.colbert):
        multi = np.flatnonzero(np.diff(ws.windows) > 1)
        if len(multi):
            scores["colbert"][multi] = _document_maxsim(engine, [ids[d] for d in multi], qv)
    return scores


def _document_maxsim(engine: Engine, ids: list[str], qv: QueryVectors) -> np.ndarray:
    """Whole-document ColBERT: per query token its best match over the tokens of EVERY window of the
    document, then FlagEmbedding's mean over query tokens (NaN for a document that is not stored).

    Why one-token queries: a token's best match in a document is the maximum over its windows of
    its best match in each window, and the engine's exact MaxSim of a ONE-token query is exactly
    that per-window best match. So one ``score_windows`` call per query token gives the exact score
    where the vectors live, without fetching any token vector (the engine returns them as nested
    lists: 50-100x slower, see benchmarks/RESULTS.md).
    """
    q = np.asarray(qv.colbert, dtype=np.float32)
    best = np.empty((len(q), len(ids)))
    for t in range(len(q)):
        best[t] = engine.score_windows(ids, QueryVectors(colbert=q[t : t + 1]), ["colbert"]).doc_max()["colbert"]
    return best.mean(axis=0)


def _select_docs(ws: WindowScores, docs: np.ndarray) -> WindowScores:
    """The window scores of the documents at positions ``docs`` only."""
    o = ws.windows
    rows = np.concatenate([np.arange(o[d], o[d + 1]) for d in docs]) if len(docs) else np.zeros(0, np.int64)
    counts = np.diff(o)[docs]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return WindowScores(offsets, {m: s[rows] for m, s in ws.scores.items()})


def _window_settings(run: dict, positions: int, engine_cls: type[Engine]) -> dict:
    """``window`` / ``stride`` / ``max_windows`` resolved and checked (clear errors at creation).

    Defaults: windows of the model's full length (or ``max_length``), consecutive windows sharing
    about ``DEFAULT_OVERLAP`` tokens (benchmarks/RESULTS.md, window_overlap.py: overlap 64-128 did best on TIME).
    """
    window, stride, cap = run["window"], run["stride"], run["max_windows"]
    if window is None:
        window = min(run["max_length"], positions)
    if stride is None and isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        # at most the window's content tokens (window - 2 specials): below 12 tokens the overlap is 0
        stride = min(max(1, window - min(DEFAULT_OVERLAP, window // 4)), max(1, window - 2))
    check_windows(window, stride, cap, max_length=positions)  # the encoder's own rule: no text skipped
    if window > run["max_length"]:  # a window is one read: max_windows=1 cut at max_length, more windows at window
        raise ValueError(
            f"window={window} is larger than max_length={run['max_length']}, the tokens the model reads at once "
            "(a window is one read): give a window of at most max_length, or a larger max_length"
        )
    if not engine_cls.windowed:
        if cap not in (None, 1):
            raise ValueError(f"the {engine_cls.name} engine stores one window per document: max_windows must be 1")
        cap = 1
    # plain ints: they go into the manifest (JSON), and NumPy integers are not JSON
    return {"window": int(window), "stride": int(stride), "max_windows": None if cap is None else int(cap)}


def _version() -> str:
    from m3search import __version__

    return __version__


def _best_windows(ws: WindowScores, modes: Sequence[str], weights: dict[str, float]) -> list[int]:
    """Each document's best window: the highest of the modes' per-window scores fused by the weighted formula
    (:func:`~m3search.fusion.weighted`; rank-based fusions use it too). Its shares of the weights, as the search
    fuses: raw weights of 5e-324 rounded every window's sum to a few steps of it, and window 0 won the ties."""
    total = weighted({m: np.nan_to_num(ws.scores[m], nan=-np.inf) for m in modes}, weights)
    o = ws.windows
    return [int(np.argmax(total[o[d] : o[d + 1]])) for d in range(len(o) - 1)]
