"""Copy a collection between engines (embedded Qdrant Edge, Qdrant server, Milvus) without
re-encoding: stored vectors, texts, metadata and the manifest move as they are.

Why no re-encoding: encoding is the expensive part of ingest (a GPU hour for a few
million passages), and the stored vectors are all the destination needs. Batches go
through the engine protocol (:meth:`~m3search.engines.base.Engine.iter_batches` and
:meth:`~m3search.engines.base.Engine.get_windows` on the source, one atomic
:meth:`~m3search.engines.base.Engine.upsert` per batch on the destination, a document longer
than a piece through :meth:`~m3search.engines.base.Engine.upsert_long`, read a range of its
windows at a time), so any pair of engines works, in the memory ingest needs.

Order of writes: the destination's manifest is written LAST, after the point count
was checked, so an interrupted migration never looks like a complete collection
(opening it says it has no manifest). Rerun after removing the partial destination;
an embedded destination folder left without manifest is cleaned up by the rerun itself.

ColBERT vectors stored as float16 come out as float32 copies of the same values, so a
float16 -> float16 migration is exact, and float16 -> float32 keeps the rounded values.
The source must not be written to while it is copied (an embedded source is locked by
this process anyway).

Changing the ColBERT layout (``layout``: :data:`LAYOUT_SETTINGS`): a collection's layout is
fixed at creation (the engine's vector configuration), so a new layout means a new
collection: migrate into it, check it, then swap the folders. The stored token vectors are
re-stored under the new layout (the engine encodes them with its codec) and, for a pool
factor, pooled here from the stored vectors (:func:`m3search.pooling.pool_tokens`, the
function ``Collection.add`` calls), so nothing is re-encoded. What cannot be recovered is
refused: a pooled source keeps only cluster means, so another pool factor needs the texts
re-indexed. A lossy source (turbo codecs) migrated to float16/float32 keeps its lossy values.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from m3search.engines import location_options, resolve_engine, taken
from m3search.engines.shapes import (
    CREATED_SCHEMA_VERSION,
    LOSSLESS_COLBERT_DTYPES,
    SCHEMA_VERSION,
    PointBatch,
    Record,
    Schema,
    check_manifest,
)
from m3search.errors import WriteConflictError
from m3search.plan import check_int
from m3search.pooling import pool_tokens

__all__ = ["migrate", "LAYOUT_SETTINGS", "check_layout", "layout_of"]

#: The ColBERT layout settings a migration may change (see :class:`~m3search.engines.shapes.Schema`).
LAYOUT_SETTINGS = ("colbert_dtype", "colbert_quantization", "colbert_rescore", "colbert_pool_factor", "colbert_on_disk")


def layout_of(schema: Schema | dict) -> dict[str, Any]:
    """The :data:`LAYOUT_SETTINGS` of a schema (or its manifest dict; absent keys take the defaults)."""
    d = schema.to_dict() if isinstance(schema, Schema) else dict(schema)
    defaults = {f.name: f.default for f in dataclasses.fields(Schema)}
    return {k: d.get(k, defaults[k]) for k in LAYOUT_SETTINGS}


def check_layout(layout: dict[str, Any]) -> dict[str, Any]:
    """``layout`` if its keys are :data:`LAYOUT_SETTINGS` and its values valid (unknown names,
    pool factor < 1: ValueError, from :class:`Schema`'s own checks)."""
    unknown = set(layout) - set(LAYOUT_SETTINGS)
    if unknown:
        raise ValueError(f"unknown layout setting(s) {sorted(unknown)}; allowed: {', '.join(LAYOUT_SETTINGS)}")
    Schema(dense_dim=1, colbert_dim=1, vocab_size=1, **layout).check_new()
    return layout


def _target_schema(source: Schema, layout: dict[str, Any], src: str) -> Schema:
    """The destination's schema: the source's with ``layout`` applied, checked (ValueError) before any write."""
    schema = Schema(**{**source.to_dict(), **layout}).check_new()
    if source.colbert_pool_factor > 1 and schema.colbert_pool_factor != source.colbert_pool_factor:
        raise ValueError(
            f"{src} is pooled with colbert_pool_factor={source.colbert_pool_factor}: it keeps cluster means, not "
            f"its tokens' vectors, so colbert_pool_factor={schema.colbert_pool_factor} cannot be made from it; "
            "re-index the texts into a new collection instead"
        )
    return schema


def migrate(
    src_location: str | os.PathLike,
    dst_location: str | os.PathLike,
    *,
    batch_size: int = 256,
    src_options: dict | None = None,
    dst_options: dict | None = None,
    show_progress: bool | None = None,
    layout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy the collection at ``src_location`` to a new one at ``dst_location``.

    ``batch_size``: documents per read of ids; their vectors are read and written in groups of about
    ``PIECE_BYTES`` of token vectors (a larger document a range of its windows at a time, written through the
    engine's long write).
    ``src_options`` / ``dst_options``: engine options (e.g. ``{"shards": 3}`` for a new
    Qdrant collection, ``{"api_key": ...}``). ``layout``: ColBERT layout settings of the
    destination (:data:`LAYOUT_SETTINGS`, e.g. ``{"colbert_dtype": "turbo4",
    "colbert_pool_factor": 2}``); the rest is the source's. Returns ``{"copied", "seconds",
    "src", "dst", "src_engine", "dst_engine", "layout"}``. Raises CollectionExistsError if
    the destination exists, CollectionNotFoundError if the source does not, ValueError for a
    layout the destination cannot have (before anything is written).
    """
    check_int("batch_size", batch_size)
    layout = check_layout(dict(layout or {}))
    src, src_options = location_options(src_location, src_options)
    dst, dst_options = location_options(dst_location, dst_options)
    if "://" in src or "://" in dst:
        same, inside = src == dst, False
    else:  # where the engines put them: "~" expanded, symlinks followed (a link to the source is the source)
        here, there = (Path(p).expanduser().resolve() for p in (src, dst))
        same, inside = here == there, there.is_relative_to(here)
    if same:
        if layout:
            raise ValueError(
                f"the ColBERT layout of {src!r} cannot change in place (it is fixed when a collection is created): "
                "migrate into a new location, check it, then replace the old collection with it"
            )
        raise ValueError(f"source and destination are the same location: {src!r}")
    if inside:  # the copy would be in what it copies
        raise ValueError(f"the destination {dst!r} is inside the source {src!r}; choose a location outside it")
    src_cls, dst_cls = resolve_engine(src), resolve_engine(dst)
    if dst_cls.exists(dst, **dst_options):
        raise taken(dst_cls, dst, dst_options)

    started = time.perf_counter()
    source = src_cls.open(src, **src_options)
    try:
        manifest = check_manifest(source.read_manifest(), src)  # what Collection.open would refuse is not copied
        schema = _target_schema(source.schema, layout, src)
        pool = schema.colbert_pool_factor if source.schema.colbert_pool_factor == 1 else 1
        total = source.count()
        try:
            target = dst_cls.create(dst, schema, **dst_options)  # refuses a layout this engine cannot honour
        except ValueError as exc:
            change = {}  # what the destination cannot keep, and was not asked to change
            if "colbert_dtype" not in layout and schema.colbert_dtype not in LOSSLESS_COLBERT_DTYPES:
                change["colbert_dtype"] = ("float16", "--colbert-dtype float16")
            if "colbert_quantization" not in layout and schema.colbert_quantization is not None:
                change["colbert_quantization"] = (None, "--colbert-quantization none")
            if "colbert_on_disk" not in layout and not schema.colbert_on_disk:
                change["colbert_on_disk"] = (True, "--colbert-on-disk")
            if not change:
                raise
            stored = source.schema  # (``schema`` is the destination's: the source's with the layout asked)
            raise ValueError(
                f"{exc}. {src} stores ColBERT as {stored.colbert_dtype!r}"
                f"{f' with a {stored.colbert_quantization!r} copy' if stored.colbert_quantization else ''}"
                f"{' in memory' if not stored.colbert_on_disk else ''}: convert it "
                f"on the way with layout={ {k: v for k, (v, _) in change.items()} } "
                f"(CLI: {' '.join(flag for _, flag in change.values())})"
            ) from None
        try:
            copied, in_pieces = _copy(source, target, total, batch_size, show_progress, pool)
            found = target.count()
            if found != total or copied != total:
                raise RuntimeError(
                    f"migration of {src} to {dst} incomplete: source has {total} documents, {copied} were read, "
                    f"destination has {found}; the destination has no manifest (remove it and rerun, without "
                    "writing to the source meanwhile)"
                )
            target.optimize()
            out = dict(manifest)
            out["engine"] = dst_cls.name
            # the destination's points are written in this version's layout, with the layout asked for (and
            # in the one older releases cannot read only if a document was written in pieces)
            version = SCHEMA_VERSION if in_pieces else CREATED_SCHEMA_VERSION
            out["schema"], out["schema_version"], out["pending"] = schema.to_dict(), version, []
            # the destination may need more points per document (a Qdrant server stores long windows in parts)
            out["max_windows_stored"] = max(int(out.get("max_windows_stored", 1)), target.max_windows)
            out["migrated_from"] = {
                "location": src,
                "engine": src_cls.name,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "documents": total,
                "layout": layout_of(source.schema),
            }
            target.write_manifest(out)  # last: only a complete copy becomes a collection
        finally:
            target.close()
    finally:
        source.close()
    return {
        "copied": total,
        "seconds": round(time.perf_counter() - started, 3),
        "src": src,
        "dst": dst,
        "src_engine": src_cls.name,
        "dst_engine": dst_cls.name,
        "layout": layout_of(schema),
    }


def _pooled(batch: PointBatch, pool_factor: int) -> PointBatch:
    """``batch`` with each window's stored token vectors pooled (a new batch; the input is not changed)."""
    if pool_factor == 1 or batch.colbert is None:
        return batch
    names = [i for i, n in zip(batch.ids, np.diff(batch.window_offsets).tolist()) for _ in range(n)]  # per window
    colbert, offsets = pool_tokens(batch.colbert, batch.colbert_offsets, pool_factor, names=names)
    return dataclasses.replace(batch, colbert=colbert, colbert_offsets=offsets)


def _copy(
    source: Any, target: Any, total: int, batch_size: int, show_progress: bool | None, pool_factor: int = 1
) -> tuple[int, bool]:
    """Copy every document (returns how many, and whether one was written in pieces), about :data:`~m3search.collection.PIECE_BYTES` of token vectors at a time (what
    ingest holds): the ids first (a read without vectors), then the vectors of groups of documents estimated
    to fit a piece, written in groups that do. A document estimated past a piece alone is read a range of its
    windows at a time (each estimated to fit a piece); one larger than a piece is written through
    :meth:`Engine.upsert_long` in pieces of its windows, so the copy is whole or absent after a crash, as a
    long ingest is. Reading whole batches of ``batch_size`` documents with every window held ~6.6 bytes of
    memory per stored byte of the batch, without bound, and reading a long document whole held all its
    token vectors (10 GB for a text of 2.5M tokens that ingest had written a piece at a time).

    The estimate: a window's tokens are at most its characters + 3 for text the model cut into windows, but
    not for vectors given with ``add(embeddings=...)``; so it is the larger of that and the most tokens of a
    window read so far, and the first read is one document."""
    from m3search import collection  # PIECE_BYTES, read at the call (one definition, beside ingest's)

    progress = None
    if show_progress is None:
        from m3search.encoder import stderr_is_terminal

        show_progress = total > batch_size and stderr_is_terminal()
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="migrating", unit="doc", file=sys.stderr)
    piece = collection.PIECE_BYTES
    per_token = 4 * source.schema.colbert_dim  # float32, as read
    most = 0  # tokens of the longest window read so far
    in_pieces = False

    def estimate(doc: Record) -> np.ndarray:
        """Bytes of token vectors of each of ``doc``'s windows, at most (see above)."""
        spans = np.asarray(doc.window_spans, dtype=np.int64).reshape(-1, 2)
        return np.maximum(spans[:, 1] - spans[:, 0] + 3, most) * per_token

    def read(doc_ids: list[str], windows: range | None = None) -> list[list[Record]]:
        nonlocal most
        docs = source.get_windows(doc_ids, with_vectors=True, windows=windows)
        most = max([most, *(len(r.colbert) for ws in docs for r in ws)])
        return docs

    def upsert(records: list[Record]) -> None:
        target.upsert(_pooled(PointBatch.from_records(records, source.schema.vocab_size), pool_factor))

    def write(docs: Iterable[tuple[Record, Iterator[Record]]]) -> None:
        """Documents (each its head and its window records) in upserts of whole documents within a piece, one
        larger than a piece through upsert_long (its windows taken as they come)."""
        nonlocal in_pieces
        whole: list[Record] = []
        held = 0
        for head, windows in docs:
            first: list[Record] = []
            size = 0
            for rec in windows:  # up to the first window past a piece
                first.append(rec)
                size += len(rec.colbert) * per_token
                if size > piece:
                    break
            if whole and held + size > piece:
                upsert(whole)
                whole, held = [], 0
            if size > piece:
                in_pieces = True
                rest = _groups(itertools.chain(_handed_on(first), windows), piece, per_token)
                target.upsert_long(_pooled(_piece(head, ws, source.schema), pool_factor) for ws in rest)
            else:
                whole += first
                held += size
        if whole:
            upsert(whole)

    def copy_group(ids: list[str]) -> None:
        write((ws[0], iter(ws)) for ws in read(ids) if ws)  # [] for one deleted meanwhile: the count check says so

    def read_windows(doc: Record) -> Iterator[Record]:
        """``doc``'s window records, read a range estimated to fit a piece (one window at least) at a time."""
        n, start = doc.windows, 0
        while start < n:
            stop = start + max(1, int(np.searchsorted(np.cumsum(estimate(doc)[start:]), piece, side="right")))
            ws = read([doc.id], range(start, stop))[0]
            if not ws and not start:
                return  # deleted meanwhile: the count check after the copy says so
            if len(ws) != stop - start:
                raise WriteConflictError(
                    f"document {doc.id!r} changed while migrate copied it (windows {start}-{stop - 1} of {n} read "
                    f"as {len(ws)}); its copy was not written. The source must not be written to while it is "
                    "copied: remove the destination and rerun",
                    [doc.id],
                )
            yield from ws
            start = stop

    copied = 0
    try:
        for heads in source.iter_batches(batch_size, with_vectors=False):
            group: list[str] = []
            held = 0
            for doc in source.get(heads.ids):  # every window's span (a batch without vectors has heads only)
                if doc is None:
                    continue  # deleted meanwhile: the count check after the copy says so
                size = int(estimate(doc).sum())
                if group and (held + size > piece or not most):
                    copy_group(group)
                    group, held = [], 0
                if size > piece:  # alone: its windows read a range at a time
                    write([(doc, read_windows(doc))])
                    continue
                group.append(doc.id)
                held += size
            if group:
                copy_group(group)
            copied += len(heads)
            if progress is not None:
                progress.update(len(heads))
    finally:
        if progress is not None:
            progress.close()
    return copied, in_pieces


def _handed_on(records: list[Record]) -> Iterator[Record]:
    """The records of ``records``, each dropped from the list as it is handed on (the list holds none of a
    piece already written)."""
    records.reverse()
    while records:
        yield records.pop()


def _groups(windows: Iterable[Record], piece: int, per_token: int) -> Iterator[list[Record]]:
    """Consecutive window records in groups of about ``piece`` bytes of token vectors each (at least one
    window), in order: the windows of the pieces ``upsert_long`` takes."""
    group: list[Record] = []
    held = 0
    for rec in windows:
        size = len(rec.colbert) * per_token
        if group and held + size > piece:
            yield group
            group, held = [], 0
        group.append(rec)
        held += size
    if group:
        yield group


def _piece(head: Record, windows: list[Record], schema: Schema) -> PointBatch:
    """Consecutive windows of ``head``'s document as a one-document batch (its text, metadata, their spans)."""
    spans = [head.window_spans[w.window] for w in windows]
    first = dataclasses.replace(windows[0], window=0, text=head.text, metadata=head.metadata, spans=spans)
    return PointBatch.from_records([first, *windows[1:]], schema.vocab_size)
