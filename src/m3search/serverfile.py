"""The running-server record: ``<collection>/server.json`` (``<file>.db.server.json`` beside a Milvus Lite file).

Why a file: one process owns an embedded collection (a folder, or a Milvus Lite file).
While ``m3search serve`` holds one, it writes its address here, so the other CLI commands
send their work to that server instead of failing on the lock. A server location
(``qdrant://``, ``milvus://``, ...) has no record: no process owns it, every command opens
it itself. The server writes and removes the record (:mod:`m3search.server`); the CLI reads
it (:mod:`m3search.cli`). The server does not import the CLI (the CLI imports it only to serve):
the record's format is here, once.

Record: ``{"pid", "host", "port", "url", "api_key_required", "started", "path", "identity"}``.

A record names the collection it was written for: ``path`` (resolved) and ``identity``, the folder's or
file's ``(st_dev, st_ino)``. A copy of the folder (``cp -r``, a backup) carries the record along; read
there, it names another inode, so :func:`live` ignores it (it sent the copy's commands, deletes included,
to the original's server). A moved or linked folder keeps its inode, so its server is still found.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from .engines import holder_lock_path, lite_file, location_scheme
from .engines.files import write_durably

__all__ = ["SERVER_FILE", "record_path", "identity", "read", "live", "held", "write", "remove"]

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


def identity(collection: str | os.PathLike) -> list[int] | None:
    """``[st_dev, st_ino]`` of the folder or Milvus Lite file ``collection`` names (links followed); None for a
    server location or a path that is not there. What a record, and a server's ``GET /info``, name it by."""
    loc = os.fspath(collection)
    scheme = location_scheme(loc)
    if scheme not in ("", ".db"):
        return None
    try:
        st = os.stat(lite_file(loc) if scheme == ".db" else loc)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


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
    """The record of ANOTHER process that is still running and serves THIS collection; None otherwise (stale,
    ours, or carried here by a copy of the folder). A record from before records named their collection
    (no ``identity``: a server started by an older m3search) is believed only while the collection's lock
    is held: ignoring it then would turn that server's CLI users away with "in use", while a copy's lock
    is free (nobody holds the copy), so the copy's commands are not sent to the original's server."""
    record = read(collection)
    if record is None or record.get("pid") == os.getpid() or not _pid_alive(record.get("pid")):
        return None
    if "identity" not in record:
        return record if held(collection) else None
    here = identity(collection)
    return record if here is not None and record["identity"] == here else None


def write(collection: str | os.PathLike, *, host: str, port: int, url: str, api_key_required: bool) -> Path | None:
    """Record this process as the collection's server (atomically, :func:`write_durably`); returns the path
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
        "path": str(Path(os.fspath(collection)).resolve()),
        "identity": identity(collection),
    }
    write_durably(path, json.dumps(record, indent=2))
    return path


def remove(collection: str | os.PathLike) -> None:
    """Delete the record if this process wrote it (a successor's record is left alone)."""
    record = read(collection)
    path = record_path(collection)
    if record is not None and path is not None and record.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def held(collection: str | os.PathLike) -> bool:
    """Whether a process holds the collection's lock (a shared probe, so the file is neither created nor kept)."""
    path = holder_lock_path(collection)
    if path is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


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
