"""The running-server record: ``<collection>/server.json`` (``<file>.db.server.json`` beside a Milvus Lite file).

Why a file: one process owns an embedded collection (a folder, or a Milvus Lite file).
While ``m3search serve`` holds one, it writes its address here, so the other CLI commands
send their work to that server instead of failing on the lock. A server location
(``qdrant://``, ``milvus://``, ...) has no record: no process owns it, every command opens
it itself. The server writes and removes the record (:mod:`m3search.server`); the CLI reads
it (:mod:`m3search.cli`). Neither imports the other: both import this module.

Record: ``{"pid", "host", "port", "url", "api_key_required", "started"}``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .engines import lite_file, location_scheme

__all__ = ["SERVER_FILE", "record_path", "read", "live", "write", "remove"]

#: File name beside the collection's lock.
SERVER_FILE = "server.json"


def record_path(collection: str | os.PathLike) -> Path | None:
    """Where ``collection``'s record lives; None for a server location (no process owns it)."""
    loc = os.fspath(collection)
    scheme = location_scheme(loc)
    if scheme == "":
        return Path(loc) / SERVER_FILE
    if scheme == ".db":
        return Path(f"{lite_file(loc)}.{SERVER_FILE}")
    return None


def read(collection: str | os.PathLike) -> dict[str, Any] | None:
    """The record as written, or None when absent, unreadable or not kept for this location."""
    path = record_path(collection)
    if path is None:
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def live(collection: str | os.PathLike) -> dict[str, Any] | None:
    """The record of ANOTHER process that is still running; None otherwise (stale or ours)."""
    record = read(collection)
    if record is None or record.get("pid") == os.getpid() or not _pid_alive(record.get("pid")):
        return None
    return record


def write(collection: str | os.PathLike, *, host: str, port: int, url: str, api_key_required: bool) -> Path | None:
    """Record this process as the collection's server (atomically: tmp + rename); returns the path
    (None: a server location, nothing written)."""
    path = record_path(collection)
    if path is None:
        return None
    record = {
        "pid": os.getpid(),
        "host": host,
        "port": port,
        "url": url,
        "api_key_required": api_key_required,
        "started": time.time(),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def remove(collection: str | os.PathLike) -> None:
    """Delete the record if this process wrote it (a successor's record is left alone)."""
    record = read(collection)
    path = record_path(collection)
    if record is not None and path is not None and record.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def _pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
