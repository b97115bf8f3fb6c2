"""Typed errors of the m3search library.

Why typed: callers (the CLI, the HTTP service, your code) tell "this id is taken" from
"this id does not exist" from "someone else holds the collection" by class, not by
parsing messages. Each one also subclasses the built-in error it used to be
(``ValueError``, ``LookupError``, ``FileNotFoundError``, ...), so ``except ValueError``
code keeps working. The HTTP service maps them to statuses in one place
(``m3search.server._ERROR_STATUS``: 409 duplicate or write conflict, 404 unknown, 507 insufficient storage,
500 the server's own files: unreadable, read-only, damaged).

This module imports nothing, so every layer (engines included) can raise these.
"""

from __future__ import annotations

__all__ = [
    "M3SearchError",
    "DuplicateIdError",
    "UnknownIdError",
    "CollectionInUseError",
    "CollectionNotFoundError",
    "CollectionExistsError",
    "CollectionReadOnlyError",
    "CollectionUnreadableError",
    "CollectionDamagedError",
    "EngineUnreachableError",
    "ModelMismatchError",
    "InsufficientStorageError",
    "WriteConflictError",
    "IdCollisionError",
    "IngestInterrupted",
    "RequestTooLargeError",
    "SourceError",
]


class M3SearchError(Exception):
    """Base class of the errors m3search raises on purpose."""


class DuplicateIdError(M3SearchError, ValueError):
    """``add`` was given ids that are already stored (nothing was written; use ``upsert``)."""

    def __init__(self, message: str, ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.ids = list(ids or [])


class UnknownIdError(M3SearchError, ValueError, LookupError):
    """An operation needs ids that are not stored (nothing was changed)."""

    def __init__(self, message: str, ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.ids = list(ids or [])

    __str__ = ValueError.__str__  # LookupError/KeyError-style quoting of the message is not wanted


class CollectionInUseError(M3SearchError, RuntimeError):
    """Another process holds the collection's storage (one process per embedded collection)."""


class CollectionNotFoundError(M3SearchError, FileNotFoundError):
    """No collection at this location."""


class CollectionExistsError(M3SearchError, FileExistsError):
    """``create`` was asked for a location that already holds a collection."""


class CollectionReadOnlyError(M3SearchError, PermissionError):
    """An embedded collection's folder cannot be written by this process (a read-only mount, another user's folder,
    ``chmod a-w``), and its engine must write there to open it: Qdrant Edge (qdrant-edge-py 0.9) has no read-only
    mode (it maps its segments for writing even to search), Milvus Lite's lock files sit beside its file. Nothing was
    changed; copy the folder (or the Milvus Lite file) to a writable place and open the copy. Also raised by a create
    in a folder this process cannot write (before anything is written: nothing was created), and by a call on an open
    embedded collection that fails on a part made read-only since (the message names it and says what was stored)."""


class CollectionUnreadableError(M3SearchError, PermissionError):
    """This process may not read a collection's folder or files (another user's folder, ``chmod``): whether a
    collection is there cannot be told, so it is neither opened nor created over, and nothing was changed. The
    message names the path; run as a user who may read it, or give this one read access. Also raised by a call on an
    open embedded collection that fails on a part made unreadable since (it says so; what it wrote may be stored)."""


class CollectionDamagedError(M3SearchError, ValueError, RuntimeError):
    """A collection's stored files are damaged (a hand edit, a truncated copy, a disk fault): its manifest cannot be
    read as one, or SQLite finds its Milvus Lite file malformed. Nothing was read from it or written to it; the
    message names the file: restore it from a copy. Not the caller's input, so the HTTP service answers 500 (the
    operator's to fix, in its log). It is both the ``ValueError`` (a damaged manifest) and the ``RuntimeError`` (a
    damaged Milvus Lite file) that these were raised as before it existed."""


class EngineUnreachableError(M3SearchError, ConnectionError):
    """The server behind a collection location (Qdrant, Milvus) refused the connection or did not answer in time:
    nothing was read or written. The message names its address."""


class ModelMismatchError(M3SearchError, ValueError):
    """The model given does not match the one the collection was built with."""


class InsufficientStorageError(M3SearchError, OSError):
    """Too little free disk for a write: refused before it started, so nothing of it was stored and what was
    stored before stays whole. Raised by the embedded engine, which would otherwise die by SIGBUS (it writes
    through memory-mapped files); free some space and try again."""


class WriteConflictError(M3SearchError, RuntimeError):
    """A write or delete of ids that another client of the same server collection is writing now (its long
    write's pending mark is live): refused before anything was changed, because two clients writing one
    document at once could leave it mixed. Retry once that write has ended."""

    def __init__(self, message: str, ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.ids = list(ids or [])


class IdCollisionError(M3SearchError, ValueError):
    """An id whose 64-bit row key (a hash of it: Milvus keys rows by integers) is held by another stored document,
    or by another id written with it: refused before anything was changed, so the stored one stays whole; ``ids``
    are the new id and the other one. Another id is needed (one pair in about 2**64)."""

    def __init__(self, message: str, ids: list[str]) -> None:
        super().__init__(message)
        self.ids = list(ids)


class IngestInterrupted(M3SearchError, RuntimeError):
    """An ``add`` / ``upsert`` asked to stop (its ``stop`` callable, e.g. a server shutting down) stopped between
    two of its batches: ``ids`` (the first of the call's ids, in order) were written whole, the others not at all."""

    def __init__(self, message: str, ids: list[str], total: int) -> None:
        super().__init__(message)
        self.ids = list(ids)
        self.total = total


#: The errors about given ids, which carry them (``ids``; the HTTP service's ``error.ids``).
ID_ERRORS = (DuplicateIdError, UnknownIdError, WriteConflictError, IdCollisionError)


class RequestTooLargeError(M3SearchError, ValueError):
    """One document (or text) is larger as JSON than a server accepts in one request (``max_body_bytes``): it
    can never be sent to that server as it is, so trying again cannot help; nothing of it was sent. Raised by
    :class:`m3search.client.M3SearchClient` before the request."""


class SourceError(M3SearchError, ValueError):
    """A source file cannot be read as given (a damaged .gz, or both ``NAME`` and ``NAME.gz`` where one is
    looked for): the message names the file; nothing was written from it."""
