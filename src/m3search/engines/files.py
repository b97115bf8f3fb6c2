"""File rules every engine keeps: disk usage as ``du`` counts it, exclusive locks, atomic durable writes, files
this process may not read or write, a file where a collection's folder should be, a folder where its file should be.

Standard library only (:mod:`m3search.errors`, which imports nothing, only to raise one), so the CLI's
location rules and the running-server record (:mod:`m3search.serverfile`) use them without loading NumPy or an
engine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

__all__ = [
    "TEMPORARY",
    "Probed",
    "Refusal",
    "allocated_bytes",
    "has_file",
    "lock_exclusive",
    "nearest_existing",
    "readable",
    "refuse_a_file_in_the_way",
    "refuse_the_wrong_kind",
    "refuse_uncreatable",
    "refuse_unreadable",
    "refuse_unwritable",
    "temporary",
    "remove_dead_temporaries",
    "walk",
    "writable",
    "write_durably",
    "write_files_durably",
]


def allocated_bytes(path: Path) -> int:
    """Bytes allocated on disk for a file or everything under a folder: what ``du`` counts, so a sparse file
    (a preallocated segment, a mmap) counts only its written blocks, none when it has none. The apparent size
    stands in only where the platform has no ``st_blocks``. What this process may not look at raises
    PermissionError (wrap the caller in :func:`readable`), as in :func:`walk`."""
    files = [path] if has_file(path) else (Path(d) / f for d, _, names in walk(path) for f in names)
    total = 0
    for f in files:
        try:
            st = f.stat()
        except PermissionError:
            raise
        except OSError:  # removed while walking
            continue
        blocks = getattr(st, "st_blocks", None)
        total += st.st_size if blocks is None else blocks * 512
    return total


def has_file(path: Path) -> bool:
    """Whether ``path`` is a file (or a link to one), as ``Path.is_file`` says, except that a path this process
    may not look at raises PermissionError (wrap the caller in :func:`readable`): Python 3.13's ``is_file`` answers
    False there, which said "no collection" of a collection in a folder this user may not read, and let a create
    go on; 3.11's raised a bare PermissionError."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except PermissionError:
        raise
    except (OSError, ValueError):  # nothing there, a file on the way, a name the system refuses
        return False


def walk(path: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk``, except that a folder this process may not list raises PermissionError: skipped, it made the
    sizes of a collection that became unreadable while served read as 0 bytes."""

    def denied(exc: OSError) -> None:
        if isinstance(exc, PermissionError):
            raise exc

    return os.walk(path, onerror=denied)


#: What :func:`readable` says was done, by default: the path could not be read before anything was opened.
_UNTOUCHED = "nothing was opened or changed"


@contextlib.contextmanager
def readable(location: str | os.PathLike, outcome: str = _UNTOUCHED) -> Iterator[None]:
    """Reads of the collection at ``location``, where "permission denied" becomes one
    :class:`~m3search.errors.CollectionUnreadableError` naming the path and saying ``outcome``, not "no
    collection" or a bare PermissionError. (The error is imported on the way out: this module loads nothing else
    of m3search.)"""
    try:
        yield
    except PermissionError as exc:
        from m3search.errors import CollectionUnreadableError, M3SearchError

        if isinstance(exc, M3SearchError):  # said already (an inner readable, a read-only collection)
            raise
        raise CollectionUnreadableError(
            f"collection at {location} cannot be read: {exc.strerror} ({exc.filename or location}); {outcome}: "
            "run as a user who may read it, or give this one read access"
        ) from None


def _denied(path: Path, mode: int) -> Iterator[str]:
    """Each file or folder under ``path`` that ``os.access`` says this process may not use for ``mode``; a folder
    it may not list raises PermissionError naming it (:func:`walk`)."""
    for top, folders, names in walk(path):
        for entry in (os.path.join(top, name) for name in (*folders, *names)):
            if not os.access(entry, mode):
                yield entry


def refuse_unreadable(location: str | os.PathLike, path: Path, outcome: str = _UNTOUCHED) -> None:
    """:class:`~m3search.errors.CollectionUnreadableError` naming the first file or folder at or under ``path`` this
    process may not read (or list and enter), if any: for an engine's own failure that does not say so clearly
    (Qdrant Edge's Rust ``PermissionDenied`` debug text, sqlite's "unable to open database file")."""
    with readable(location, outcome):
        for entry in _denied(path, os.R_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), entry)


#: The system's "this process may not write here" (permissions, a read-only mount); an engine's Rust errors carry
#: it as "(os error N)".
_CANNOT_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _cannot_write(path: str | os.PathLike) -> str:
    """Why this process may not write ``path``, in the system's words: a read-only mount, else permissions."""
    return os.strerror(errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES)


def refuse_unwritable(location: str | os.PathLike, path: Path, outcome: str = _UNTOUCHED) -> None:
    """:class:`~m3search.errors.CollectionReadOnlyError` naming ``path`` or the first file or folder under it this
    process may not write, if any: a part of an open collection made read-only since (mode 444) fails the engine's
    next write of it (Qdrant Edge's flush) with the engine's own words ("Permission denied (os error 13)") only.
    ``outcome`` says what the failed call left stored."""
    with readable(location, outcome):
        denied = path if not os.access(path, os.W_OK) else next(_denied(path, os.W_OK), None)
    if denied is not None:
        from m3search.errors import CollectionReadOnlyError

        raise CollectionReadOnlyError(
            f"collection at {location} cannot be written: this process may not write {denied} "
            f"({_cannot_write(denied)}); {outcome}: run as a user who may write it, or give this one write access"
        )


class Probed:
    """``target``, an engine's open handle (a Qdrant Edge shard, a Milvus Lite client), whose failed calls first look
    for a part of the collection at ``location`` (``path``, or under it) this process may not read or write, and name
    it (:func:`refuse_unreadable`, :func:`refuse_unwritable`) instead of the engine's own words, saying what the call
    left stored; any other failure goes on as it was. A part made unreadable or read-only after open fails a later
    call with only the engine's text (Qdrant Edge: "Permission denied (os error 13)"; Milvus Lite: "internal error").

    ``writes``: the calls that write, each with what its failure left stored (a part this process may not write is
    looked for after those only: a read's failure is not a read-only file's). ``reads``: what any other failed call
    left (``{}`` for its name), its failure then looked into too; None: only writes are. ``errors``: the failures
    looked into."""

    def __init__(
        self,
        target: object,
        location: str | os.PathLike,
        path: Path,
        writes: Mapping[str, str],
        *,
        reads: str | None = None,
        errors: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    ) -> None:
        self._target, self._location, self._path = target, location, path
        self._writes, self._reads, self._errors = writes, reads, errors

    def __getattr__(self, name: str) -> object:
        if name.startswith("_"):  # not the target's calls: a copy (made without __init__) looked for _target here,
            raise AttributeError(name)  # and for __setstate__, for ever (RecursionError)
        call = getattr(self._target, name)
        if not callable(call) or (self._reads is None and name not in self._writes):
            return call

        def probed(*args: object, **kwargs: object) -> object:
            try:
                return call(*args, **kwargs)
            except self._errors:
                left = self._writes.get(name) or str(self._reads).format(name)
                if self._reads is not None:
                    refuse_unreadable(self._location, self._path, left)
                if name in self._writes:
                    refuse_unwritable(self._location, self._path, left)
                raise

        return probed


def nearest_existing(path: Path, dangling: Callable[[Path, str], Exception]) -> Path:
    """``path`` or the nearest path above it that is there (``.`` at last for a relative one), of whatever kind;
    ``dangling(link, target)`` raised where that is a symlink to nothing: making a folder through one failed late
    and oddly, "[Errno 17] File exists" from ``mkdir(parents=True)``. One check for every caller's own error."""
    nearest = next(p for p in (path, *path.parents) if os.path.lexists(p))  # "/" and "." are always there
    if not os.path.exists(nearest):
        raise dangling(nearest, os.readlink(nearest))
    return nearest


#: A caller's own error for what keeps a folder from being made at or in a path: ``refusal(why, where, detail)``,
#: ``why`` one of "link" (``where``, on the way, is a symlink to ``detail``, which does not exist), "file" (``where``
#: is a file; ``detail`` is "Not a directory") or "unwritable" (this process may not write in the folder ``where``;
#: ``detail`` says why, in the system's words).
Refusal = Callable[[str, Path, str], Exception]


def _refused_collection(location: str | os.PathLike) -> Refusal:
    """The collection's errors (:data:`Refusal`): no collection can be at ``location``, or none can be created."""

    def refusal(why: str, where: Path, detail: str) -> Exception:
        from m3search.errors import CollectionNotFoundError, CollectionReadOnlyError

        where = where.absolute()
        if why == "link":
            return CollectionNotFoundError(
                f"{where} is a symlink to {detail}, which does not exist: no collection can be at "
                f"{location} until the folder it points to is made (or the link removed)"
            )
        if why == "file":
            return CollectionNotFoundError(f"{where} is a file, not a folder: no collection can be at {location}")
        return CollectionReadOnlyError(
            f"cannot create a collection at {location}: this process may not write in the folder {where} "
            f"({detail}); nothing was created: choose a folder it may write, or give it write access"
        )

    return refusal


def _folder_or_above(path: Path, refusal: Refusal) -> Path:
    """``path`` or the nearest folder above it that exists, as given (relative stays relative); ``refusal``'s
    error where a symlink to nothing or a file is in the way."""
    nearest = nearest_existing(path, lambda link, target: refusal("link", link, target))
    if not os.path.isdir(nearest):
        raise refusal("file", nearest, os.strerror(errno.ENOTDIR))
    return nearest


def refuse_a_file_in_the_way(location: str | os.PathLike, path: Path) -> Path:
    """``path``, the folder a collection at ``location`` is or would be in, or else the nearest folder above it that
    exists (made absolute); :class:`~m3search.errors.CollectionNotFoundError` naming it where that is a file, not a
    folder: no collection can be there, and making its folder through a file was a bare NotADirectoryError (a
    FileExistsError for ``path`` itself) from every embedded engine's create. As for a missing folder, ``exists``
    answers False there."""
    return _folder_or_above(path, _refused_collection(location)).absolute()


def refuse_the_wrong_kind(path: Path, error: type[Exception], *, folder: bool, what: str) -> None:
    """``error`` saying ``path``, a collection's location, is not ``what`` where it is there as the other kind: a
    file where a collection folder must be (Qdrant Edge, ``folder``), a folder where a file must be (Milvus Lite).
    No collection can be there, so create and open (so every command) refuse it alike, before anything is made or
    changed: milvus-lite's failure on a folder read as "in use by another process"."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise error(f"{path} is a {'file' if folder else 'folder'}, not {what}")


def refuse_uncreatable(location: str | os.PathLike, path: Path, refusal: Refusal | None = None) -> None:
    """:class:`~m3search.errors.CollectionReadOnlyError` unless this process may write in ``path``, the folder a new
    collection at ``location`` is made in (or, where it is missing, the nearest folder above it, where it would be
    made; a file there is :func:`refuse_a_file_in_the_way`'s error). Checked before anything is written, so a
    refused create leaves nothing behind: the first write's own failure was a bare PermissionError (Qdrant Edge's
    mkdir), or said "cannot be opened ... copy the folder" of a collection not yet there (Milvus Lite's and
    qdrant-client's lock files). ``refusal``: another caller's own errors (:data:`Refusal`; eval's index cache)."""
    refusal = refusal or _refused_collection(location)
    folder = _folder_or_above(path, refusal)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise refusal("unwritable", folder, _cannot_write(folder))


@contextlib.contextmanager
def writable(location: str | os.PathLike, engine: str, copy: str, command: str) -> Iterator[None]:
    """Opening an embedded collection, which writes to its folder even to search (lock files, and the engine's:
    Qdrant Edge maps its segments for writing). Where this process cannot write, whichever write fails first becomes
    one :class:`~m3search.errors.CollectionReadOnlyError` saying what to do (copy ``copy``, "the folder", with
    ``command``), not a bare OSError about a lock file."""
    try:
        yield
    except Exception as exc:
        code = (
            exc.errno
            if isinstance(exc, OSError)
            else next((e for e in _CANNOT_WRITE if f"(os error {e})" in str(exc)), None)
        )
        if code not in _CANNOT_WRITE:
            raise
        from m3search.errors import CollectionReadOnlyError

        raise CollectionReadOnlyError(
            f"collection at {location} cannot be opened: this process cannot write to its folder "
            f"({os.strerror(code)}), and the embedded engine ({engine}) writes there even to search; copy {copy} "
            f"to a writable place ({command}) and open the copy"
        ) from exc


def lock_exclusive(path: Path, *, wait: bool = False, waiting: str | None = None) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing): its fd, or None when another open file
    description (another process, or another open in this one) holds it. With ``wait``, a held lock is waited
    for instead (``waiting``, if given, printed to stderr first, so a caller that blocks says why) and the fd
    is always returned: one helper for the collection locks that refuse at once and eval's cache lock that
    queues. The file is never deleted: unlinking a lock file lets the next process lock a new file of the
    same name while the holder still has the old one (how milvus-lite's own lock let a second process in).
    Closing the fd releases it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return None
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:  # Ctrl-C while waiting: no fd left open
        os.close(fd)
        raise
    return fd


#: What a temporary's name adds to its file's: ``<name>.tmp-<pid>-<thread>`` (:func:`temporary`).
TEMPORARY = ".tmp-"


def temporary(path: Path) -> Path:
    """``<path>.tmp-<pid>-<thread>``: where a write of ``path`` goes before its rename. Why per writer: with one
    ``<path>.tmp`` for all, two processes writing one file (two evals given one ``--out``) truncated and renamed
    each other's temporary, and a whole write could land as the other's half."""
    return path.with_name(f"{path.name}{TEMPORARY}{os.getpid()}-{threading.get_ident()}")


def remove_dead_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` whose writer process is gone (killed between its write and its rename):
    a temporary per writer is never written over again, so without this they would pile up."""
    prefix = path.name + TEMPORARY
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix) :].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, OverflowError, OSError):  # not one of ours, or a live process of another user
            continue


def write_durably(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp file, fsync, rename, fsync dir)."""
    write_files_durably({path: data})


def write_files_durably(files: Mapping[Path, str | bytes]) -> None:
    """Write each ``path: data`` of ``files`` atomically and durably: every temporary (:func:`temporary`) written
    and fsynced first, then each renamed over its path in ``files``' order, then the folders fsynced.

    Why all temporaries before the first rename: a failure while writing (a full disk, Ctrl-C) leaves every file
    as it was and no temporary behind, never a truncated file or a mix; only a crash between two renames (no
    I/O between them) leaves the files before it new and those after it old, so put last the one that vouches
    for the others.
    """
    for path in files:
        remove_dead_temporaries(path)
    tmps = {path: temporary(path) for path in files}
    try:
        for path, data in files.items():
            with open(tmps[path], "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():  # disk full: no half-written file left for the next create to refuse
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(path.parent for path in files):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
