"""The stored hybrid collection: BGE-M3's three outputs in one engine, every search mode.

Why one facade: like ``QdrantClient``, one class serves every backend; the location
string picks the engine (:mod:`m3search.engines`): a plain folder is the embedded Qdrant
Edge engine, ``qdrant://``, ``qdrant+local://``, ``milvus://`` and ``*.db`` go to the
optional remote engines. The collection owns ids, the manifest, encoding, the search
plan, fusion and explanations; engines only store points and answer queries.

Guarantees:

* Each ingest batch is one engine write: after a crash (kill -9) a batch is either fully
  present or absent. ``add`` rejects a call whose ids already exist before writing anything.
* Re-ranking modes take the union of the dense and sparse top-``candidates`` lists and
  compute every score of every candidate exactly (no "missing = 0").
* The manifest records the model identity (hash of config, heads and tokenizer.json),
  dimensions, schema version and settings; opening with another model is an error.
* ONE PROCESS PER EMBEDDED COLLECTION: a second process opening the folder gets
  :class:`CollectionInUseError` ("collection at X is in use by process N"). Within a
  process, searches may run concurrently; writes are serialized by a lock.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from m3search.engines import resolve_engine
from m3search.engines.base import (
    MODES,
    SCHEMA_VERSION,
    CollectionExistsError,
    CollectionInUseError,
    CollectionNotFoundError,
    Engine,
    PointBatch,
    Pool,
    QueryVectors,
    Record,
    Schema,
)
from m3search.filters import parse_filter
from m3search.fusion import contributions, order, ranks
from m3search.plan import DEFAULT_CANDIDATES, DEFAULT_WEIGHTS, SearchPlan, check_query, check_weights
from m3search.pooling import pool_tokens

__all__ = [
    "Collection",
    "Hit",
    "Record",
    "ModelMismatchError",
    "CollectionInUseError",
    "CollectionNotFoundError",
    "CollectionExistsError",
]

MANIFEST_FORMAT = "m3search-collection"
_SETTINGS_DEFAULTS = {
    "max_length": 8192,  # document tokens (capped at the model's position limit)
    "query_max_length": 512,  # FlagEmbedding's default for queries
    "batch_size": 128,  # documents per encode + engine write
    "candidates": DEFAULT_CANDIDATES,
    "weights": list(DEFAULT_WEIGHTS),
}
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


class ModelMismatchError(ValueError):
    """The model given does not match the one the collection was built with."""


@dataclass
class Hit:
    """One search result.

    ``score`` is the fused score; ``scores`` holds the exact ``dense``, ``sparse`` and
    ``colbert`` scores of this document for the query (whatever the mode); ``explain``
    is filled when ``search(..., explain=True)``.
    """

    id: str
    score: float
    text: str
    metadata: dict
    scores: dict[str, float]
    explain: dict | None = None

    def to_dict(self) -> dict:
        d = {"id": self.id, "score": self.score, "text": self.text, "metadata": self.metadata, "scores": self.scores}
        if self.explain is not None:
            d["explain"] = self.explain
        return d


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _as_id_list(ids: Any, name: str = "ids") -> list[str]:
    if isinstance(ids, str):
        return [ids]
    if ids is None or isinstance(ids, (bytes, dict)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a string or a list of strings, not {type(ids).__name__}")
    ids = list(ids)
    bad = [i for i in ids if not isinstance(i, str)]
    if bad:
        raise TypeError(f"{name} must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
    return ids


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if texts is None or isinstance(texts, (bytes, dict)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a string or a list of strings, not {type(texts).__name__}")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


def _check_metadata(metadata: Any, n: int) -> list[dict]:
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, dict):
        raise TypeError("metadata must be a list with one dict per text (or None)")
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"{n} texts but {len(metadata)} metadata entries")
    out = []
    for i, m in enumerate(metadata):
        if m is None:
            m = {}
        if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):
            raise TypeError(f"metadata[{i}] must be a dict with string keys, got {m!r}")
        try:
            out.append(json.loads(json.dumps(m, allow_nan=False)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata[{i}] is not JSON-serializable: {exc}") from None
    return out


class Collection:
    """A BGE-M3 hybrid collection. Build with :meth:`create` or :meth:`open`.

    >>> col = Collection.create("docs.m3", model="BAAI/bge-m3")      # doctest: +SKIP
    >>> col.add(["first text", "second text"], ids=["a", "b"])       # doctest: +SKIP
    >>> [h.id for h in col.search("text", k=2)]                      # doctest: +SKIP
    """

    def __init__(self, engine: Engine, manifest: dict, model: Any = None) -> None:
        self._engine = engine
        self._manifest = manifest
        self._model_spec = model
        self._encoder = None
        self._lock = threading.RLock()
        self.schema: Schema = engine.schema
        self.settings: dict = {**_SETTINGS_DEFAULTS, **manifest.get("settings", {})}

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def exists(cls, path: str | os.PathLike, **engine_options: Any) -> bool:
        return resolve_engine(path).exists(os.fspath(path), **engine_options)

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
        ``colbert_dtype`` ("float16" default, "float32" for exact ColBERT scores, or a lossy
        "turbo16" / "turbo8" / "turbo4" codec), ``colbert_quantization`` (None, or a quantized
        copy scored in RAM, see :data:`~m3search.engines.base.COLBERT_QUANTIZATIONS`),
        ``colbert_rescore`` (True: rescore on the stored vectors), ``colbert_pool_factor``
        (1; k keeps ``ceil(n / k)`` token vectors per document, :mod:`m3search.pooling`),
        ``colbert_on_disk`` (True), ``dense_on_disk`` (False), ``hnsw_m`` (16),
        ``hnsw_ef_construct`` (100), ``max_length`` (8192), ``query_max_length`` (512),
        ``batch_size`` (128 documents per write), ``candidates`` (search default),
        ``weights`` (search default).
        """
        unknown = set(settings) - set(_SCHEMA_SETTINGS) - set(_SETTINGS_DEFAULTS)
        if unknown:
            allowed = ", ".join(sorted(set(_SCHEMA_SETTINGS) | set(_SETTINGS_DEFAULTS)))
            raise TypeError(f"unknown collection setting(s) {sorted(unknown)}; allowed: {allowed}")
        engine_cls = resolve_engine(path)
        location = os.fspath(path)
        engine_options = dict(engine_options or {})
        for key, value in (("shards", shards), ("replicas", replicas)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{key} must be a positive integer, got {value!r}")
                engine_options[key] = value
        if engine_cls.exists(location, **(engine_options or {})):
            raise CollectionExistsError(f"a collection already exists at {location}; use Collection.open")
        encoder = cls._load_encoder(model, device, dtype)
        run = {**_SETTINGS_DEFAULTS, **{k: v for k, v in settings.items() if k in _SETTINGS_DEFAULTS}}
        run["weights"] = list(check_weights(run["weights"]))
        for key in ("max_length", "query_max_length", "batch_size", "candidates"):
            v = run[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        schema = Schema(
            dense_dim=encoder.hidden_size,
            colbert_dim=encoder.colbert_dim,
            vocab_size=encoder.vocab_size,
            **{k: v for k, v in settings.items() if k in _SCHEMA_SETTINGS},
        )
        manifest = {
            "format": MANIFEST_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "engine": engine_cls.name,
            "created": _now(),
            "m3search_version": _version(),
            "model": {
                "identity": encoder.identity,
                "name_or_path": str(encoder.name_or_path),
                "folder": str(Path(encoder.folder).resolve()),
                "hidden_size": encoder.hidden_size,
                "colbert_dim": encoder.colbert_dim,
                "vocab_size": encoder.vocab_size,
                "max_length": encoder.max_length,
            },
            "schema": schema.to_dict(),
            "settings": run,
        }
        engine = engine_cls.create(location, schema, **(engine_options or {}))
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
        location = os.fspath(path)
        engine = resolve_engine(location).open(location, **(engine_options or {}))
        try:
            manifest = engine.read_manifest()
            if not manifest or manifest.get("format") != MANIFEST_FORMAT:
                raise CollectionNotFoundError(f"{location} has no m3search manifest")
            if int(manifest.get("schema_version", 0)) > SCHEMA_VERSION:
                raise ValueError(
                    f"collection at {location} has schema version {manifest['schema_version']}; "
                    f"this m3search reads up to {SCHEMA_VERSION} (upgrade m3search)"
                )
            col = cls(engine, manifest, model)
            col._device, col._dtype = device, dtype
            if model is not None:
                col._check_model(model)
        except BaseException:
            engine.close()
            raise
        return col

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Collection({self.location!r}, engine={self._engine.name}, model={self._manifest['model']['name_or_path']!r})"

    @property
    def location(self) -> str:
        return self._engine.location

    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))

    @property
    def engine(self) -> Engine:
        return self._engine

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

    def _mismatch(self, what: str, identity: str) -> ModelMismatchError:
        rec = self._manifest["model"]
        return ModelMismatchError(
            f"collection at {self.location} was built with model {rec['name_or_path']!r} "
            f"(identity {rec['identity'][:12]}); {what} has identity {identity[:12]}. "
            "Open it with the same model (or model=None to use the recorded one)."
        )

    def _check_model(self, model: Any) -> None:
        from m3search.encoder import M3Encoder, _resolve_folder, model_identity

        want = self._manifest["model"]["identity"]
        if isinstance(model, M3Encoder):
            if model.identity != want:
                raise self._mismatch(f"the encoder {model.name_or_path!r}", model.identity)
            self._encoder = model
            return
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a name, a path or an M3Encoder, not {type(model).__name__}")
        ident = model_identity(_resolve_folder(os.fspath(model)))
        if ident != want:
            raise self._mismatch(f"model {os.fspath(model)!r}", ident)

    @property
    def encoder(self):
        """The M3Encoder (loaded on first use for collections opened with ``model=None``)."""
        if self._encoder is not None:
            return self._encoder
        with self._lock:
            if self._encoder is not None:
                return self._encoder
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
                except Exception as exc:  # try the next recorded location
                    errors.append(f"{cand!r}: {exc}")
                    continue
                if enc.identity != rec["identity"]:
                    if spec is not None:
                        raise self._mismatch(f"model {cand!r}", enc.identity)
                    errors.append(f"{cand!r}: different model (identity {enc.identity[:12]})")
                    continue
                self._encoder = enc
                return enc
            raise ModelMismatchError(
                f"cannot load the model of collection {self.location} ({rec['name_or_path']!r}, identity "
                f"{rec['identity'][:12]}): " + "; ".join(errors) + ". Pass model=<path> to Collection.open."
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
    ) -> list[str]:
        """Encode and store new documents; returns their ids (generated when ``ids`` is None).

        Raises ValueError, writing nothing, if any id already exists. Each batch of
        ``batch_size`` documents is encoded and written as one atomic unit.
        ``embeddings``: precomputed :class:`~m3search.M3Embeddings` of ``texts`` (skips encoding).
        """
        return self._ingest(texts, ids, metadata, embeddings, batch_size, show_progress, overwrite=False)

    def upsert(
        self,
        texts: str | Sequence[str],
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        embeddings: Any = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> list[str]:
        """Like :meth:`add`, but documents with existing ids are overwritten."""
        return self._ingest(texts, ids, metadata, embeddings, batch_size, show_progress, overwrite=True)

    def _ingest(self, texts, ids, metadata, embeddings, batch_size, show_progress, *, overwrite: bool) -> list[str]:
        texts = _check_texts(texts)
        n = len(texts)
        if ids is None:
            ids = [uuid.uuid4().hex for _ in range(n)]
        else:
            ids = _as_id_list(ids)
            if len(ids) != n:
                raise ValueError(f"{n} texts but {len(ids)} ids")
            empty = [i for i, x in enumerate(ids) if not x]
            if empty:
                raise ValueError(f"ids must be non-empty strings; item {empty[0]} is empty")
            if len(set(ids)) != n:
                seen, dup = set(), []
                for x in ids:
                    if x in seen and x not in dup:
                        dup.append(x)
                    seen.add(x)
                raise ValueError(f"duplicate ids in one call: {dup[:10]}")
        meta = _check_metadata(metadata, n)
        if embeddings is not None:
            if len(embeddings) != n:
                raise ValueError(f"{n} texts but embeddings for {len(embeddings)}")
            if embeddings.dense is None or embeddings.sparse is None or embeddings.colbert is None:
                raise ValueError("embeddings must hold dense, sparse and colbert outputs")
        bs = self.settings["batch_size"] if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {bs!r}")
        if n == 0:
            return []
        with self._lock:
            if not overwrite:
                present = self._existing(ids)
                taken = [i for i in ids if i in present]
                if taken:
                    raise ValueError(
                        f"{len(taken)} id(s) already exist: {taken[:10]}{' ...' if len(taken) > 10 else ''}; "
                        "nothing was written (use upsert to overwrite)"
                    )
            progress = None
            if show_progress is None:
                show_progress = n > bs and sys.stderr.isatty()
            if show_progress:
                from tqdm.auto import tqdm

                progress = tqdm(total=n, desc="indexing", unit="doc", file=sys.stderr)
            truncated = 0
            try:
                for start in range(0, n, bs):
                    end = min(start + bs, n)
                    if embeddings is not None:
                        emb = embeddings[start:end]
                    else:
                        emb = self.encoder.encode(
                            texts[start:end], max_length=self.settings["max_length"], warn_truncation=False
                        )
                        truncated += emb.truncated
                    # Token pooling happens here, once per document, before the write (queries are untouched).
                    colbert, offsets = pool_tokens(emb.colbert, emb.colbert_offsets, self.schema.colbert_pool_factor)
                    batch = PointBatch(
                        ids[start:end], texts[start:end], meta[start:end], emb.dense, emb.sparse, colbert, offsets
                    )
                    self._engine.upsert(batch)  # one atomic, durable write per batch
                    if progress is not None:
                        progress.update(end - start)
            finally:
                if progress is not None:
                    progress.close()
                if truncated:  # one line for the whole call, not one per batch
                    from m3search.encoder import TruncationWarning

                    limit = min(self.settings["max_length"], self.encoder.max_length)
                    warnings.warn(
                        TruncationWarning(
                            f"{truncated} of {n} document(s) exceeded max_length={limit} tokens; "
                            "only their first tokens are indexed",
                            truncated,
                            n,
                            limit,
                        ),
                        stacklevel=3,
                    )
            self._engine.optimize()
            self._engine.flush()
        return ids

    def _existing(self, ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for a in range(0, len(ids), 1000):
            out |= self._engine.existing(ids[a : a + 1000])
        return out

    def update_metadata(self, ids: str | Sequence[str], metadata: dict | Sequence[dict]) -> None:
        """Replace the metadata of existing documents without re-encoding.

        ``metadata``: one dict for all ``ids``, or a list of dicts. Unknown ids raise
        ValueError and nothing is changed. Atomicity: one dict for all ids is one durable
        engine write; with a list, each distinct dict is one write (Qdrant's payload update
        takes one value per call), so a crash part-way leaves some documents updated.
        """
        ids = list(dict.fromkeys(_as_id_list(ids)))
        meta = _check_metadata([metadata] * len(ids) if isinstance(metadata, dict) else metadata, len(ids))
        with self._lock:
            present = self._existing(ids)
            missing = [i for i in ids if i not in present]
            if missing:
                raise ValueError(f"unknown id(s): {missing[:10]}; no metadata was changed")
            self._engine.set_metadata(ids, meta)

    def delete(self, ids: str | Sequence[str]) -> dict[str, list[str]]:
        """Delete documents; returns ``{"deleted": [...], "missing": [...]}`` in input order."""
        ids = list(dict.fromkeys(_as_id_list(ids)))
        with self._lock:
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
        return self._engine.count(parse_filter(filter))

    def __len__(self) -> int:
        return self.count()

    # ------------------------------------------------------------------- search
    def search(
        self,
        query: str,
        *,
        k: int = 10,
        mode: str = "all",
        fusion: str = "weighted",
        weights: Sequence[float] | None = None,
        candidates: int | None = None,
        filter: Any = None,
        explain: bool = False,
        exact: bool = False,
    ) -> list[Hit]:
        """Search one query; hits ordered by fused score descending, then id.

        ``mode``: dense, sparse, colbert, dense+sparse, dense+colbert or all (see
        :mod:`m3search.plan`). ``fusion``: weighted (BGE-M3's formula), rrf (k = 60) or
        dbsf. ``weights``: (dense, sparse, colbert). ``candidates``: per first-stage list
        in re-ranking modes. ``filter``: :mod:`m3search.filters` grammar. ``exact``:
        full scan instead of HNSW for the dense list.
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
        )[0]

    def search_batch(
        self,
        queries: Sequence[str],
        *,
        k: int = 10,
        mode: str = "all",
        fusion: str = "weighted",
        weights: Sequence[float] | None = None,
        candidates: int | None = None,
        filter: Any = None,
        explain: bool = False,
        exact: bool = False,
        query_embeddings: Any = None,
    ) -> list[list[Hit]]:
        """:meth:`search` for several queries (one encoder pass, batched first-stage queries).

        ``query_embeddings``: precomputed M3Embeddings of ``queries`` (skips encoding).
        """
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError("queries must be a list of strings (use search() for one)")
        queries = [check_query(q) for q in queries]
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
            if len(query_embeddings) != len(queries):
                raise ValueError(f"{len(queries)} queries but embeddings for {len(query_embeddings)}")
            emb = query_embeddings
        else:
            emb = self.encoder.encode(queries, max_length=self.settings["query_max_length"])
        qvs = [QueryVectors.from_embeddings(emb, i) for i in range(len(queries))]
        if plan.reranks:
            pools = self._engine.candidates_batch(
                emb.dense, emb.sparse, qvs, plan.candidates, plan.filter, exact=exact, colbert="colbert" in plan.modes
            )
            return [self._finish(plan, qv, pool) for qv, pool in zip(qvs, pools)]
        if plan.modes == ("dense",):
            lists = self._engine.search_dense(emb.dense, plan.k, plan.filter, exact=exact)
        else:
            lists = self._engine.search_sparse(emb.sparse, plan.k, plan.filter, exact=exact)
        return [
            self._finish(plan, qv, Pool([i for i, _ in hits], {plan.modes[0]: dict(hits)}))
            for qv, hits in zip(qvs, lists)
        ]

    def _finish(self, plan: SearchPlan, qv: QueryVectors, pool: Pool) -> list[Hit]:
        """Score candidates exactly, fuse, take the top k, fill in all scores and payloads."""
        weights = plan.weight_map()
        cand, keys, colbert = pool.ids, pool.keys, pool.colbert
        if cand is None and (plan.fusion == "rrf" or plan.explain):
            # rrf's per-mode ranks and explain's found_by break ties by id over the whole pool
            found = [r.id if r is not None else None for r in self._engine.get_by_keys(keys)]
            alive = [j for j, i in enumerate(found) if i is not None]  # None: deleted meanwhile
            cand, keys = [found[j] for j in alive], [keys[j] for j in alive]
            colbert = None if colbert is None else np.asarray(colbert)[alive]
        if plan.reranks:
            # Scores the pool already carries are exact: only the rest is computed.
            have_colbert = colbert is not None and "colbert" in plan.modes
            need = [m for m in plan.modes if not (m == "colbert" and have_colbert)]
            scores = self._engine.score(cand, qv, need, known=pool.known, keys=keys) if need else {}
            if have_colbert:
                scores["colbert"] = np.asarray(colbert, dtype=np.float64)
            scores = {m: scores[m] for m in plan.modes}
            keep = np.all([np.isfinite(s) for s in scores.values()], axis=0) if (cand or keys) else np.zeros(0, bool)
            if not keep.all():  # a candidate vanished between the two queries (concurrent delete)
                cand = None if cand is None else [c for c, ok in zip(cand, keep) if ok]
                keys = None if keys is None else [c for c, ok in zip(keys, keep) if ok]
                scores = {m: s[keep] for m, s in scores.items()}
        else:
            m = plan.modes[0]
            scores = {m: np.array([pool.known[m][i] for i in cand], dtype=np.float64)}
        if not (cand or keys):
            return []
        parts = contributions(plan.fusion, scores, weights, cand)
        fused = np.sum(list(parts.values()), axis=0)
        vectors = ["sparse"] if plan.explain else False
        if cand is None:
            top, top_ids, records = self._top_by_key(fused, keys, plan.k, vectors)
        else:
            top = order(cand, fused)[: plan.k]
            top_ids = [cand[j] for j in top]
            records = self._engine.get(top_ids, with_vectors=vectors)
        rest = [m for m in MODES if m not in scores]
        extra = self._engine.score(top_ids, qv, rest) if rest else {}
        all_scores = {m: (scores[m][top] if m in scores else extra[m]) for m in MODES}
        if plan.explain:
            found_by = self._found_by(plan, qv, pool, cand, scores)
            mode_ranks = {m: ranks(cand, s)[top] for m, s in scores.items()}
        hits = []
        for r, (j, doc_id) in enumerate(zip(top, top_ids)):
            rec = records[r]
            if rec is None:  # deleted concurrently
                continue
            hit = Hit(
                id=doc_id,
                score=float(fused[j]),
                text=rec.text,
                metadata=rec.metadata,
                scores={m: float(all_scores[m][r]) for m in MODES},
            )
            if plan.explain:
                sources = [name for name in ("dense", "sparse") if doc_id in found_by[name]]
                hit.explain = {
                    "fusion": plan.fusion,
                    "modes": list(plan.modes),
                    "weights": {m: weights[m] for m in plan.modes},
                    "contributions": {m: float(parts[m][j]) for m in plan.modes},
                    "ranks": {m: int(mode_ranks[m][r]) for m in plan.modes},
                    "candidates": len(cand),
                    "found_by": sources,
                    "matched_tokens": self._matched_tokens(qv, rec),
                }
            hits.append(hit)
        return hits

    def _top_by_key(
        self, fused: np.ndarray, keys: list[Any], k: int, vectors: bool | list[str]
    ) -> tuple[np.ndarray, list[str], list[Record]]:
        """The k best of a keyed pool, ids read only for them: the records of every candidate
        scoring at least the k-th best score (ties at the cut included, so the "then id"
        order is exact), then ordered by score and id."""
        n = len(keys)
        sel = np.flatnonzero(fused >= np.partition(fused, n - k)[n - k]) if n > k else np.arange(n)
        recs = self._engine.get_by_keys([keys[j] for j in sel], with_vectors=vectors)
        live = [(j, r) for j, r in zip(sel.tolist(), recs) if r is not None]  # None: deleted meanwhile
        if not live:
            return np.zeros(0, np.int64), [], []
        ids = [r.id for _, r in live]
        best = order(ids, fused[[j for j, _ in live]])[:k]
        return np.array([live[b][0] for b in best]), [ids[b] for b in best], [live[b][1] for b in best]

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


def _version() -> str:
    from m3search import __version__

    return __version__
