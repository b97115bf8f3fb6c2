"""Copy a collection between engines (embedded Qdrant Edge, Qdrant server, Milvus) without
re-encoding: stored vectors, texts, metadata and the manifest move as they are.

Why no re-encoding: encoding is the expensive part of ingest (a GPU hour for a few
million passages), and the stored vectors are all the destination needs. Batches go
through the engine protocol (:meth:`~m3search.engines.base.Engine.iter_batches` on the
source, one atomic :meth:`~m3search.engines.base.Engine.upsert` per batch on the
destination), so any pair of engines works.

Order of writes: the destination's manifest is written LAST, after the point count
was checked, so an interrupted migration never looks like a complete collection
(opening it says it has no manifest). Rerun after removing the partial destination;
an embedded destination folder left without manifest is cleaned up by the rerun itself.

ColBERT vectors stored as float16 come out as float32 copies of the same values, so a
float16 -> float16 migration is exact, and float16 -> float32 keeps the rounded values.
The source must not be written to while it is copied (an embedded source is locked by
this process anyway).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

from m3search.engines import resolve_engine
from m3search.engines.base import SCHEMA_VERSION, CollectionExistsError, CollectionNotFoundError

__all__ = ["migrate"]


def migrate(
    src_location: str | os.PathLike,
    dst_location: str | os.PathLike,
    *,
    batch_size: int = 256,
    src_options: dict | None = None,
    dst_options: dict | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Copy the collection at ``src_location`` to a new one at ``dst_location``.

    ``batch_size``: documents per read and per (atomic) destination write.
    ``src_options`` / ``dst_options``: engine options (e.g. ``{"shards": 3}`` for a new
    Qdrant collection, ``{"api_key": ...}``). Returns ``{"copied", "seconds", "src",
    "dst", "src_engine", "dst_engine"}``. Raises CollectionExistsError if the destination
    exists, CollectionNotFoundError if the source does not.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    src, dst = os.fspath(src_location), os.fspath(dst_location)
    remote = "://" in src or "://" in dst
    if (src == dst) if remote else os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"source and destination are the same location: {src!r}")
    src_cls, dst_cls = resolve_engine(src), resolve_engine(dst)
    src_options, dst_options = dict(src_options or {}), dict(dst_options or {})
    if dst_cls.exists(dst, **dst_options):
        raise CollectionExistsError(f"a collection already exists at {dst}; migrate into a new location")

    started = time.perf_counter()
    source = src_cls.open(src, **src_options)
    try:
        manifest = source.read_manifest()
        if not manifest:
            raise CollectionNotFoundError(f"{src} has no m3search manifest")
        total = source.count()
        target = dst_cls.create(dst, source.schema, **dst_options)
        try:
            copied = _copy(source, target, total, batch_size, show_progress)
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
            out["schema_version"] = SCHEMA_VERSION  # the destination's points are written in this version's layout
            # the destination may need more points per document (a Qdrant server stores long windows in parts)
            out["max_windows_stored"] = max(int(out.get("max_windows_stored", 1)), target.max_windows)
            out["migrated_from"] = {
                "location": src,
                "engine": src_cls.name,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "documents": total,
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
    }


def _copy(source: Any, target: Any, total: int, batch_size: int, show_progress: bool | None) -> int:
    progress = None
    if show_progress is None:
        show_progress = total > batch_size and sys.stderr.isatty()
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="migrating", unit="doc", file=sys.stderr)
    copied = 0
    try:
        for batch in source.iter_batches(batch_size, with_vectors=True):
            target.upsert(batch)  # one atomic write per batch
            copied += len(batch)
            if progress is not None:
                progress.update(len(batch))
    finally:
        if progress is not None:
            progress.close()
    return copied
