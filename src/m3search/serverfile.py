"""The running-server record: ``<collection>/server.json``.

Why a file: one process owns an embedded collection. While ``m3search serve`` holds
one, it writes its address here, so the other CLI commands send their work to that
server instead of failing on the lock. The server writes and removes the record
(:mod:`m3search.server`); the CLI reads it (:mod:`m3search.cli`). Neither imports the
other: both import this module, which needs only the standard library.

Record: ``{"pid", "host", "port", "url", "api_key_required", "started"}``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["SERVER_FILE", "read", "live", "write", "remove"]

#: File name beside the collection's lock.
SERVER_FILE = "server.json"


def read(collection: str | os.PathLike) -> dict[str, Any] | None:
    """The record as written, or None when absent or unreadable."""
    try:
        record = json.loads((Path(collection) / SERVER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def live(collection: str | os.PathLike) -> dict[str, Any] | None:
    """The record of ANOTHER process that is still running; None otherwise (stale or ours)."""
    record = read(collection)
    if record is None or record.get("pid") == os.getpid() or not _pid_alive(record.get("pid")):
        return None
    return record


def write(collection: str | os.PathLike, *, host: str, port: int, url: str, api_key_required: bool) -> Path:
    """Record this process as the collection's server (atomically: tmp + rename); returns the path."""
    path = Path(collection) / SERVER_FILE
    record = {
        "pid": os.getpid(),
        "host": host,
        "port": port,
        "url": url,
        "api_key_required": api_key_required,
        "started": time.time(),
    }
    tmp = path.with_name(SERVER_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def remove(collection: str | os.PathLike) -> None:
    """Delete the record if this process wrote it (a successor's record is left alone)."""
    record = read(collection)
    if record is not None and record.get("pid") == os.getpid():
        (Path(collection) / SERVER_FILE).unlink(missing_ok=True)


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
