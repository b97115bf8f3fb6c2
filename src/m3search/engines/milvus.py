"""Milvus engine: a collection on a Milvus server (``milvus://host:port/name``) or in a
Milvus Lite file (``path/to/file.db``), through pymilvus.

Why Milvus: users who already run it can keep one vector database. We pin
``pymilvus>=2.5,<2.6`` and ``milvus-lite>=2.5,<2.6`` on purpose: milvus-lite 2.5 is the
real C++ Milvus engine (segcore, the same index code as the server) started as a
subprocess per ``.db`` file; milvus-lite 3.x is a Python rewrite, so testing against it
would not test Milvus. (milvus-lite 2.5 needs ``setuptools<80`` for ``pkg_resources``.)

Layout. A collection ``NAME`` is four Milvus collections (Milvus Lite files hold one,
named ``m3search``):

``NAME`` (one row per WINDOW of a document: a document of ``n`` windows is ``n`` rows)
    ``pk`` INT64 primary key: window 0 (the HEAD) = the first 8 bytes of the id's UUID5
    (:func:`~m3search.engines.base.point_uuid`, as on Qdrant), window ``w > 0`` = a salted
    hash of ``(w, id)`` when ``upsert`` wrote it, of ``(g, w, id)`` when the long write of
    generation ``g`` did (:func:`_wpk`; "Long writes", below), so lookups never embed caller
    strings in a Milvus expression; ``doc`` INT64 (the row's VERSION key, :func:`_doc_key`:
    the head's ``pk`` for ``upsert``'s rows ("slot 0", where every row was before long
    writes), a salted hash of ``(g, id)`` for a long write's; the head's ``doc`` names the
    version that is its document; a tombstone's is the head's ``pk``) and ``win`` INT32
    (window number, -1 for a tombstone, below), both INVERTED-indexed; ``doc_id`` VARCHAR (the caller's id; a
    hash collision is detected on write and refused); ``text`` VARCHAR (the whole text on
    the head when it fits Milvus's VARCHAR limit of 65,535 UTF-8 bytes, else "" and
    ``tparts`` INT32 says how many ``NAME_text`` rows hold it; "" on other windows);
    ``spans`` JSON (on the head of a document of several windows: every window's character
    ``[start, end)``; else ``[]``); ``meta`` JSON (the metadata, on EVERY window: filters
    run inside the vector queries); ``kinds`` JSON (the type of every metadata path, used by
    filters, below); ``dense`` FLOAT_VECTOR (inner product; FLAT index on Milvus Lite, HNSW
    on a server); ``sparse`` SPARSE_FLOAT_VECTOR (SPARSE_INVERTED_INDEX, inner product, no
    pruning: ``drop_ratio_build = drop_ratio_search = 0``, so sparse top-k is exact);
    ``gen`` INT64 (the window's ColBERT generation) and ``ntok`` INT32 (its token count).
    Every query reads ``win >= 0`` (windows), counts read ``win == 0`` (documents);
    first-stage searches group by ``doc`` (Milvus's grouping search: each version once, at
    its best window; a window of a version its head does not name is dropped). A collection
    created before windows has no ``doc`` / ``win`` / ``spans`` / ``tparts`` nor
    ``NAME_text`` (one row per document, texts up to a VARCHAR): it is read and written as
    it is, one window each.
``NAME_colbert`` (ColBERT token vectors, packed: one row per block of ``B`` tokens)
    ``tid`` INT64 auto id; ``gen`` INT64 (INVERTED index); ``doc`` INT64 (its window row's);
    ``blk`` INT32 (block number); ``vec`` FLOAT_VECTOR or FLOAT16_VECTOR
    (``Schema.colbert_dtype``) of ``B * colbert_dim`` values: ``B`` consecutive token
    vectors (``B = max(1, 8 KiB // bytes per token)``: 4 for bge-m3 at float16), the
    last block zero-padded (FLAT index, never searched). Packing matters because
    Milvus's cost per row dominates small rows: Milvus Lite returned 64-d float32 rows at
    ~4 MB/s, 2 KiB rows at ~13 MB/s and 8 KiB rows at ~50 MB/s (measured here).
``NAME_text`` (texts longer than a VARCHAR)
    ``tid`` INT64 auto id; ``gen`` INT64 (the head window's generation: invisible until the
    head row points at it, like token rows); ``doc`` INT64 (the head's); ``part`` INT32;
    ``text`` VARCHAR (at most 65,535 UTF-8 bytes, cut between characters); ``v`` a 2-d vector
    Milvus requires.
``NAME_manifest``
    the manifest as a JSON string in the row ``key == "manifest"`` (Milvus Lite has
    no ``alter_collection_properties``, so collection properties cannot hold it), and a row per
    raise of the window bound, ``key == "max_windows_stored:N"``, that no manifest write touches
    (:meth:`MilvusEngine.record_window_bound`).

ColBERT representation. Milvus >= 2.6.4 can store a list of vectors per row and
compute MaxSim; Milvus Lite 2.5 (and servers before 2.6.4) cannot. Token vectors in a
companion collection, fetched for the candidates by ``gen`` and scored in NumPy
(mean over query tokens of the max dot product), work on both and give exact scores.
Dense and sparse candidate scores are also recomputed in NumPy from the fetched
vectors, so every candidate gets all three scores exactly.

What Milvus guarantees for a multi-row write. Milvus has no transactions; an upsert
request replaces rows by primary key. Milvus Lite 2.5 (its source: ``MilvusProxy::Upsert``,
``Storage::Insert`` / ``Delete``) commits an insert request as ONE SQLite transaction (every
row or none) and an upsert request as TWO: the old keys' delete, then the insert. When our
process dies, a request Lite has received still runs to its end (Lite serves its calls before
it exits on losing our file lock) and one it has not received is not applied; if the Lite
process itself dies between its two transactions, that request's rows are gone (deleted, not
re-inserted). A Milvus server writes one upsert request's deletes and inserts to the shards'
logs under one timestamp, and a Strong-consistency read sees all of them or none; Milvus
documents no atomicity across shards or for a proxy failing mid-request.

Writes (``upsert``, in slot 0), in this order: (0) read the documents' heads and slot-0 rows
(refusing a key collision); (1) insert the new windows' token rows (and long texts'
``NAME_text`` rows) under fresh ``gen`` values (no row points at them yet: invisible); (2)
upsert each document's rows in ONE request: its new windows, a TOMBSTONE over every old
slot-0 window past the new count (same ``pk``, ``win = -1``, zero vectors: no query, count
or get reads it) and, when the head named a long write's version, one over that head (below);
documents are grouped into requests under ``max_request_bytes``, never split; (3) delete the
tombstones with what goes with them and the token and text rows of the rows (2) wrote over in
place (their generations, read in (0): never another write's, under way or landed since). A
tombstone's ``doc`` is the head's key (a document's tombstones are one query) and its ``gen``
names what goes with it: the token and text rows of that generation (the row it replaced), or,
over a head that named a long write's version, every row of that version (its ``doc``;
generations are random, keys hashes: one is never the other). So, when OUR process is killed
(Milvus Lite, or a server applying each request whole), every document is its old or its new
version whole, never a mix: before (2) its old rows are untouched, after it the new ones are
complete; leftovers of (3) are invisible and removed by the document's next ``upsert`` or
delete (tests/test_windows.py stops a rewrite at each step, and kills a writer with SIGKILL in
a loop); those of (1), token and text rows no row points at, stay (invisible: nothing can tell
them from a write under way), but for a write that failed with an error: the same handle's next
``upsert`` or delete of the document removes them. Weaker, stated as it is: if the Milvus Lite process itself dies
inside request (2), that request's documents are ABSENT (old rows deleted, new not inserted),
and on Lite a reader concurrent with request (2) can see them absent for its duration. On a
server the rule rests on a request being applied whole or not at all, which Milvus does not
document: a server failing mid-request may keep part of it, and a document's rows (different
keys) are routed to different shards unless the collection has one (``shards=1``).

Long writes (:meth:`MilvusEngine.upsert_long`: a document whose windows exceed one ingest
piece, written with memory bounded by the piece). Each has a GENERATION ``g`` of its own
(drawn at random by the Collection and recorded in its pending mark): its rows' ``doc`` is
:func:`_doc_key` of ``g`` and their keys are ``g``'s, so no other write of the document
(another client's, begun at the same moment) shares a row. The head (the same ``pk`` for
every version) names the version that is its document: count, get and existing read heads;
the reads of a document's windows (get_windows, score_windows, set_metadata, iter_batches)
read its head with slot 0's windows in one query, then, when the head names a long write's
version, that version's windows (all again, when a switch replaced it between the two); a search hit past a head costs one read of its head and is dropped unless
the head names its version (a query that lost hits asks again for more). In this order: (0)
before each piece, read the rows under its keys (the first's: the head's too), refusing a key
another document holds; (1) each piece's windows ``w >= 1``, as they are
encoded (token rows first), under ``g``: hidden; (2) the SWITCH, ONE request: the new head
(text, metadata, every window's span, ``doc`` = ``g``'s) with tombstones over the version
stored THEN (read just before: a write may have landed since (0)): over its head, under a key
of its own, and, in slot 0, over each of its windows (which the head does not hide); (3)
delete the tombstones with what goes with them. No step removes rows by version but those
of a replaced version and of a stopped write's ``g``, so a write that passed the
Collection's pending-mark check beside another (a write checked before a long write began,
two marks written at the same moment, a recovery's purge) never removes the other's rows: the
last switch or ``upsert`` wins whole (tests/test_windows.py, the race reproductions). When our
process is killed (as for ``upsert``, above), a long write over a stored document leaves the
old version whole before (2) and the new one whole after it; a document not stored has no
head until (2), so a crash leaves it absent. The Collection, which records each long write
and its ``g`` in its manifest, clears a stopped one before its next write: the rows of ``g``
that no head names (:meth:`MilvusEngine.purge`, :meth:`MilvusEngine.tidy`) and the
document's tombstones with what goes with them (``tidy``). When the switch does not fit
``max_request_bytes`` (an old version in slot 0 with more windows than fit as tombstones of
``4 * dense_dim + 256`` bytes: ~11,500 at 1,024-d under the default 48 MiB), the old
version's rows, head included, are deleted in one request just before the head is written: a
crash between the two leaves the document ABSENT (never a mix). Weaker, as for ``upsert``: if
the Milvus Lite process itself dies inside request (2), the document is absent. Left hidden
for good: a version whose switch landed between another write's read of the head and that
write's own request, which so did not know to remove it. Collections of schema 4 kept long
writes in slots 1 and 2 (``doc`` = :func:`_legacy_keys`): read as any version a head names,
and removed by recoveries and deletes; a long write raises the schema version to 5, so that
releases reading up to 4, which look in those slots only, refuse the collection rather than
misread it.

Several clients. A write in one request that passed the Collection's pending-mark check beside
another write or delete of the document ends whole all the same, and the last to land wins: no
step removes token or text rows but by the generations it read (a delete: those of the version
the head names and of slot 0's rows, whose window rows it removes by ``doc``), so another write's,
inserted before its rows, stay; a write tombstones only the slot-0 windows it read, so a longer
version landed between its read and its request leaves windows past the new head's count, which
searches drop (asking again without them: they hid the document's other windows in its group)
and the document's next write or delete removes. Left hidden: the token rows of the loser of two
writes in one request (written over by the winner's rows) and of a version that a delete which
read the document before it landed removed.

Filters: the :mod:`m3search.filters` AST as a Milvus boolean expression over ``meta`` and ``kinds``
(:mod:`~m3search.engines.milvus_filter`).

Other Milvus limits: a search returns at most 16,384 hits (``k`` and ``candidates``
are capped there); ids are at most 4,096 UTF-8 bytes; ``exact=True`` only changes
anything on HNSW (a server), where it raises ``ef`` to the maximum.

Connection: ``milvus://host:port/name`` (``milvus+https://`` isn't a registered scheme:
pass ``engine_options={"secure": True}``); a token from ``engine_options["token"]`` or
the ``MILVUS_TOKEN`` environment variable (``user:password`` or an API key). Every call
has a ``timeout`` (:data:`TIMEOUT_S`) so pymilvus's own retries end; connecting to a server
waits ``connect_timeout`` (:data:`CONNECT_TIMEOUT_S`), then raises EngineUnreachableError.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from m3search.engines import lite_file, lite_lock_path
from m3search.engines.base import (
    BOUND_RECORD,
    CREATE_OPTION_RULES,
    ID_NAMESPACE,
    Engine,
    bound_records,
    split_requests,
    wanted_modes,
    with_bound,
)
from m3search.engines.files import (
    Probed,
    has_file,
    lock_exclusive,
    readable,
    refuse_a_file_in_the_way,
    refuse_the_wrong_kind,
    refuse_uncreatable,
    refuse_unwritable,
    writable,
)
from m3search.engines.milvus_filter import kinds_path, metadata_kinds, to_milvus_expr
from m3search.engines.shapes import (
    LOSSLESS_COLBERT_DTYPES,
    Hits,
    PointBatch,
    QueryVectors,
    Record,
    Schema,
    WindowScores,
    damaged,
    read_stored,
    score_records,
)
from m3search.errors import (
    CollectionDamagedError,
    CollectionExistsError,
    CollectionInUseError,
    CollectionNotFoundError,
    EngineUnreachableError,
    IdCollisionError,
)
from m3search.filters import Filter
from m3search.plan import MODES, check_int, check_options

# milvus-lite 2.5 imports pkg_resources, whose deprecation warning would end every command on a .db file
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
try:
    from pymilvus import DataType, MilvusClient, MilvusException
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the Milvus engine needs pymilvus: pip install 'm3search[milvus]' ({exc})") from exc

__all__ = ["MilvusEngine", "to_milvus_expr", "parse_milvus_location", "metadata_kinds"]

#: Milvus's cap on ``limit`` (+ offset) of one search or query.
MAX_RESULTS = 16384
TEXT_MAX_BYTES = 65535
ID_MAX_BYTES = 4096
LITE_COLLECTION = "m3search"
#: Seconds each call may take (pymilvus retries a failing call until then).
TIMEOUT_S = 60.0
#: Seconds a new connection to a server waits for it to answer. pymilvus retries until this timeout, so a port
#: nothing listens on took the whole call timeout (60 s); a server that answers does so well within it. A Milvus
#: Lite file's server, started for the call, is given :data:`TIMEOUT_S`.
CONNECT_TIMEOUT_S = 5.0
#: Milvus Lite 2.5 answers a query in time superlinear in its size (measured: 2,000
#: rows of 1024-d float32 (8 MB) in 23 s, 128 rows (0.5 MB) in 14 ms). Reads and token
#: inserts are chunked to this many bytes; the document rows of one batch still go in
#: one request (atomicity).
CHUNK_BYTES = 1 << 19
#: Keys in one delete's ``in [...]`` lists (document keys, generations, tombstones' keys). Milvus deletes by
#: expression as a query for the rows, then their removal, so this bounds the expression (~21 bytes a key as text:
#: ~260 KB a list, far under a server's 64 MB gRPC message) and, as :data:`CHUNK_BYTES` does for reads, the rows
#: Milvus Lite matches at once. 3 * 4,096: three keys per document (slots 0-2) for 4,096 documents, the size deletes
#: have had since they were first chunked; not tuned.
DELETE_KEYS = 3 * 4096
#: Bytes of token vectors per stored block row (see ``NAME_colbert`` above).
BLOCK_BYTES = 8192
#: Parallel token queries per read (Milvus Lite serves them ~1.3-2x faster together).
READ_THREADS = 4
#: Reads of a document's windows before its windows are taken as they are (each read after the first follows a
#: head that a long write's switch replaced meanwhile).
READ_TRIES = 3
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
_LITE_FILE = re.compile(r"^[A-Za-z0-9.\-_]{1,36}$")
_MANIFEST_KEY = "manifest"
#: Milvus Lite 2.5's failure (an assert in its segcore) to read the sparse vectors of a collection no row was ever
#: written to (after a row is written, even once deleted, the same read answers).
_NEVER_WRITTEN = "Growing segment loss raw data"
#: Salt of the keys of ``upsert``'s window rows past window 0.
_WINDOW_SALT = b"m3search-milvus-window\x00"
#: Namespace of the ids' UUID5 (:func:`_pk`).
_ID_NAMESPACE = ID_NAMESPACE.bytes
#: Salt of a long write's ``doc`` value and window keys (its generation's), and of a tombstone over a head.
_GEN_SALT = b"m3search-milvus-gen\x00"
#: Salt of the ``doc`` values of slots 1 and 2, where long writes went before generations (schema 4).
_SLOT_SALT = b"m3search-milvus-slot\x00"


#: Open clients per Milvus Lite file in this process: its subprocess is stopped when the last one closes (unless a
#: pymilvus client of the caller's still uses it: :func:`_lite_served_to_others`).
_LITE_USERS: dict[str, int] = {}
#: This process's fd of each open Lite file's m3search lock (:func:`m3search.engines.lite_lock_path`), closed with the last user.
_LITE_FDS: dict[str, int] = {}
_LITE_LOCK = threading.Lock()
#: Each read and write of manifest rows in this process, one at a time: Milvus Lite applies an upsert as a delete,
#: then an insert (module docstring), and another handle's read between the two found no manifest (its
#: ``Collection._sync`` then saw no pending marks, a manifest edit wrote its whole held copy back, and an open
#: said "no m3search manifest"). Lite is shared by this process's handles only; on a server, which applies an
#: upsert under one timestamp, the lock only takes this process's short manifest calls in turn.
_MANIFEST_IO = threading.Lock()


# ------------------------------------------------------------------------- helpers
#: pymilvus's logger that reports a failed connect ("Failed to create new connection using: ..." at ERROR).
_CONNECT_LOG = logging.getLogger("pymilvus.milvus_client._utils")


def _client(uri: str, **kwargs: Any) -> MilvusClient:
    """A MilvusClient on a connection of its own: pymilvus shares one per URI, and closing any client closed it
    for every other handle on the same collection in this process (``Collection.exists`` broke an open one).
    pymilvus's own report of this connect's failure is dropped (a filter on its logger for this call only,
    logging's configuration left alone): printed beside the error raised for it, which names the address and what
    to do, its ERROR line was a second, vaguer report of the same failure. Only that record, told by its level and
    this connection's alias: the logger's other records, this call's or another thread's, go on as before."""
    alias = f"m3search-{uuid.uuid4().hex}"

    def drop(record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.ERROR and record.args == (alias,))

    _CONNECT_LOG.addFilter(drop)
    try:
        return MilvusClient(uri, alias=alias, **kwargs)
    finally:
        _CONNECT_LOG.removeFilter(drop)


#: A Milvus Lite client's calls that write, with what a refused one left (a failed request stops the write as a crash
#: there would: module docstring). A file made read-only (mode 444, a read-only mount) opens and searches, and its
#: writes failed as pymilvus's bare "internal error" (milvus-lite printing "attempt to write a readonly database"):
#: probed (:class:`~m3search.engines.files.Probed`), they name the file.
_LITE_WRITES = dict.fromkeys(
    ("insert", "upsert", "delete"),
    "the write stopped at its first refused request, as a crash there would have stopped it",
)


def _read_only(uri: str, sql: str) -> list[tuple]:
    """``sql``'s rows from the SQLite file ``uri``, opened read-only: milvus-lite adds its tables to any SQLite file
    it opens, even for a read-only command. :class:`CollectionDamagedError` where SQLite finds the file damaged."""
    try:
        con = sqlite3.connect(f"{Path(uri).as_uri()}?mode=ro", uri=True)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorname", None) in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            raise damaged(uri, f"SQLite: {exc}", "the Milvus Lite file") from None
        raise


def _lite_tables(uri: str) -> bool:
    """Whether an SQLite file may be milvus-lite's: no tables yet, or its ``collection_meta`` table. A file SQLite
    finds damaged is said to be (it was "an SQLite database, not a Milvus Lite file")."""
    try:
        tables = {r[0] for r in _read_only(uri, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return False
    return not tables or "collection_meta" in tables


def _sqlite_finds_damage(uri: str) -> bool:
    """Whether SQLite's ``quick_check`` finds the file damaged (past its table list, which :func:`_lite_tables`
    read). Asked only once milvus-lite failed to start on it, so that its failure is
    :class:`CollectionDamagedError` where the file is damaged, and only there: a start may fail for other reasons."""
    try:
        return _read_only(uri, "PRAGMA quick_check") != [("ok",)]
    except CollectionDamagedError:
        return True
    except sqlite3.Error:
        return False


def _held_without_our_lock(uri: str) -> bool:
    """Whether a process holds milvus-lite's own lock on the file (``lockf`` on ``.<name>.lock`` beside it) without
    m3search's (an older m3search, pymilvus itself): the one failure of milvus-lite's start that means "in use".
    Asked before the start, not read from its failure: every failure to start (a folder's "unable to open database
    file", a damaged file's "malformed") was said to be "in use", and a start refused by the holder unlinks that
    holder's lock file on its way out. No lock file, or one this process may not open: no holder it can see, and the start says the rest.
    Not asked where this process runs milvus-lite on the file itself (a pymilvus client of the caller's; or when
    milvus-lite's list of servers cannot be read): closing the probe's descriptor would drop that server's POSIX
    lock, which stops it."""
    from milvus_lite.server_manager import server_manager_instance

    running = getattr(server_manager_instance, "_servers", None)
    if not isinstance(running, dict) or str(Path(uri).absolute().resolve()) in running:
        return False
    try:
        fd = os.open(Path(uri).with_name(f".{Path(uri).name}.lock"), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:  # held: EAGAIN or EACCES; else (no locks on this file system) no holder it can see
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # lets the probe's own lock go
    return False


def _lite_served_to_others(uri: str) -> bool:
    """Whether a pymilvus client of this process that is not m3search's is connected to milvus-lite's server of the
    file (the caller's own ``MilvusClient``, opened before or after the collection): stopping the server when the
    collection's last handle closed broke that client's next call. Such a server is left running, as pymilvus
    leaves every server it starts, until the process ends (closing that client later does not stop it: pymilvus
    tells nobody); with no such client, the collection's last handle stops it, so the file is free for another
    process. pymilvus's registry of connections is read without its lock (a dict another thread may change
    meanwhile): read again, and where it never reads whole, the server is left running, the safe side."""
    from milvus_lite.server_manager import server_manager_instance
    from pymilvus import connections

    server = getattr(server_manager_instance, "_servers", {}).get(str(Path(uri).absolute().resolve()))
    address = getattr(server, "uds_path", None)
    if address is None:
        return False
    for _ in range(READ_TRIES):
        try:
            return any(
                handler is not None and connections.get_connection_addr(alias).get("address") == address
                for alias, handler in connections.list_connections()
            )
        except RuntimeError:  # "dictionary changed size during iteration": a connection made or closed meanwhile
            continue
    return True


def _refuse_not_lite(uri: str, create_file: bool) -> None:
    """Refuse what is at a ``.db`` location but a Milvus Lite file (or, for ``create_file``, a place to make one),
    before milvus-lite starts on it: its failed start read as "in use". Something not ours there: no collection to
    open, and something already there to create over."""
    path = Path(uri)
    with readable(uri):
        present = has_file(path)
    error = CollectionExistsError if create_file else CollectionNotFoundError
    if not present:  # a folder there (or a link to one) failed milvus-lite's start: read as "in use"
        refuse_the_wrong_kind(path, error, folder=False, what="a Milvus Lite file")
        if not path.parent.is_dir():
            refuse_a_file_in_the_way(uri, path.parent)
            raise CollectionNotFoundError(f"folder {path.parent} does not exist (for Milvus Lite file {uri})")
        if not create_file:
            raise CollectionNotFoundError(f"no Milvus Lite file at {uri}")
        refuse_uncreatable(uri, path.parent)
        return
    with readable(uri), open(uri, "rb") as fh:  # milvus-lite's SQLite database, or not ours
        head = fh.read(16)
    if not head:  # milvus-lite writes its tables in; where it may not, its failed start read as in use
        refuse_unwritable(uri, path)
    elif head != b"SQLite format 3\x00":
        raise error(f"{uri} is not a Milvus Lite file (a .db location must be one)")
    elif not _lite_tables(uri):
        raise error(f"{uri} is an SQLite database, not a Milvus Lite file (a .db location must be one)")


def _lite_client(uri: str, timeout: float) -> MilvusClient:
    """A client of milvus-lite's server of the file, counted in :data:`_LITE_USERS`; this process's first takes
    m3search's lock on the file (:data:`_LITE_FDS`), refusing a file another process holds."""
    with _LITE_LOCK, writable(uri, "Milvus Lite", "the file", "cp"):  # its lock files beside it
        first = uri not in _LITE_FDS
        fd = lock_exclusive(lite_lock_path(uri)) if first else None
        if first and (fd is None or _held_without_our_lock(uri)):
            if fd is not None:
                os.close(fd)
            raise CollectionInUseError(
                f"Milvus Lite file {uri} is in use by another process (milvus-lite locks its file; "
                "open it from one process, e.g. through `m3search serve`)"
            )
        try:
            client = _client(uri, timeout=timeout)
        except Exception as exc:
            if fd is not None:  # milvus-lite may have started (a connect that failed after): not left running
                with suppress(Exception):  # the connect's error is the one to report
                    _stop_server(uri, fd)
            if "Open local milvus failed" in str(exc):  # not in use (above): milvus-lite's reason is printed
                failed = CollectionDamagedError if _sqlite_finds_damage(uri) else RuntimeError
                raise failed(
                    f"Milvus Lite could not open {uri}: milvus-lite failed to start (its reason is printed "
                    "above; 'database disk image is malformed': the file is damaged, restore it from a copy)"
                ) from None
            raise
        if fd is not None:
            _LITE_FDS[uri] = fd
        _LITE_USERS[uri] = _LITE_USERS.get(uri, 0) + 1
    return client


def _lite_release(uri: str) -> None:
    """A Milvus Lite client closed (:func:`_lite_client`): pymilvus keeps one milvus-lite subprocess per file for
    the whole process; stop it when the last client of this process lets go (so the file lock is released), not
    under another's feet."""
    with _LITE_LOCK:
        _LITE_USERS[uri] = _LITE_USERS.get(uri, 1) - 1
        if _LITE_USERS[uri] <= 0:
            del _LITE_USERS[uri]
            _stop_server(uri, _LITE_FDS.pop(uri, None))


def _stop_server(uri: str, fd: int | None) -> None:
    """Stop milvus-lite's server of the file, if one runs and no client of the caller's uses it; then close ``fd``,
    m3search's lock (after the server and its file lock are gone)."""
    from milvus_lite.server_manager import server_manager_instance

    try:
        running = getattr(server_manager_instance, "_servers", None)  # unreadable: released, as before
        started = not isinstance(running, dict) or str(Path(uri).absolute().resolve()) in running
        if started and not _lite_served_to_others(uri):
            server_manager_instance.release_server(uri)
    finally:
        if fd is not None:
            os.close(fd)


def parse_milvus_location(location: str) -> tuple[str, str, bool]:
    """``(uri, collection name, is_lite)`` for ``milvus://host:port/name`` or ``file.db``."""
    loc = os.fspath(location)
    if loc.lower().startswith("milvus://"):
        rest = loc[len("milvus://") :]
        host, _, name = rest.partition("/")
        name = name.strip("/")
        if not host or not name:
            raise ValueError(f"Milvus location must be milvus://host:port/name, got {loc!r}")
        if ":" not in host:
            host += ":19530"
        if not _NAME.match(name):
            raise ValueError(
                f"Milvus collection name {name!r} must be letters, digits and '_' (not starting with a digit)"
            )
        return f"http://{host}", name, False
    if not loc.endswith(".db"):
        raise ValueError(f"not a Milvus location: {loc!r} (milvus://host:port/name or a .db file)")
    path = lite_file(loc)  # milvus-lite opens the file itself, so its own lock is the file's too
    if not _LITE_FILE.match(path.name) or path.suffix != ".db":
        link = f" ({loc!r} links to it)" if path.name != Path(loc).name else ""
        raise ValueError(
            f"Milvus Lite file name {path.name!r}{link} must end in .db, match [A-Za-z0-9.-_] and be at most 36 "
            "characters (a milvus-lite limit)"
        )
    return str(path), LITE_COLLECTION, True


def _pk(doc_id: str) -> int:
    """Signed 64-bit primary key of a caller id: its window 0's row. The first 8 bytes of its UUID5
    (:func:`~m3search.engines.base.point_uuid`), computed without building the UUID (searches run it
    for every hit)."""
    h = bytearray(hashlib.sha1(_ID_NAMESPACE + doc_id.encode("utf-8")).digest()[:8])
    h[6] = (h[6] & 0x0F) | 0x50  # the UUID's version bits
    return int.from_bytes(h, "big", signed=True)


def _hash(salt: bytes, text: str) -> int:
    return int.from_bytes(hashlib.sha1(salt + text.encode("utf-8")).digest()[:8], "big", signed=True)


def _doc_key(doc_id: str, gen: int = 0) -> int:
    """The ``doc`` value of the rows a write of ``doc_id`` makes: ``upsert``'s (``gen`` 0) the head's key
    (:func:`_pk`), a long write's that of its generation ``gen``."""
    return _pk(doc_id) if gen == 0 else _hash(_GEN_SALT, f"d{gen}\x00{doc_id}")


def _legacy_keys(doc_id: str) -> list[int]:
    """The ``doc`` values of slots 1 and 2, where long writes went before generations: read, and removed."""
    return [_hash(_SLOT_SALT, f"d{slot}\x00{doc_id}") for slot in (1, 2)]


def _wpk(doc_id: str, window: int, gen: int = 0) -> int:
    """Primary key of a document's window row written by ``upsert`` (``gen`` 0: the keys rows had before
    generations) or by the long write of generation ``gen``; window 0 (the head): :func:`_pk` in every one."""
    if window == 0:
        return _pk(doc_id)
    if gen == 0:
        return _hash(_WINDOW_SALT, f"{window}\x00{doc_id}")
    return _hash(_GEN_SALT, f"w{gen}\x00{window}\x00{doc_id}")


def _collision(new: str, other: str, stored: bool = True) -> IdCollisionError:
    """The one refusal of a key collision (``upsert``'s, ``upsert_long``'s, ``delete``'s), before any change:
    with a row of the ``stored`` document ``other``, or (False) with a row of ``other`` in the same write."""
    held = f"held by the stored document {other!r}" if stored else f"also one of {other!r}, written with it"
    return IdCollisionError(
        f"id hash collision in Milvus: a 64-bit row key of {new!r} is {held}; "
        f"nothing was changed (store {new!r} under another id)",
        [new, other],
    )


def _batch_keys(pks: Sequence[int], owners: Sequence[str]) -> dict[int, str]:
    """The row keys of one write with their documents; refuses two documents sharing one (one would overwrite
    the other's row in the same request)."""
    keys: dict[int, str] = {}
    for k, doc_id in zip(pks, owners):
        if (held := keys.setdefault(k, doc_id)) != doc_id:
            raise _collision(doc_id, held, stored=False)
    return keys


def _head_tombstone_key(doc_id: str, gen: int) -> int:
    """Primary key of the tombstone over a replaced head whose row had generation ``gen``."""
    return _hash(_GEN_SALT, f"t{gen}\x00{doc_id}")


def _text_parts(text: str, limit: int = TEXT_MAX_BYTES) -> list[str]:
    """``text`` in pieces of at most ``limit`` UTF-8 bytes, cut between characters (one piece when it fits)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return [text]
    out, a = [], 0
    while a < len(data):
        b = min(a + limit, len(data))
        while b < len(data) and data[b] & 0xC0 == 0x80:  # not inside a character
            b -= 1
        out.append(data[a:b].decode("utf-8"))
        a = b
    return out


def _reads(gens: Sequence[int], sizes: Sequence[int], per: int, unit: str) -> list[tuple[str, int]]:
    """``(expression, limit)`` queries reading the rows of generations ``gens`` (``sizes[i]`` rows each,
    numbered by the field ``unit``), at most ``per`` rows a query: small ones grouped, a large one sliced."""
    reads: list[tuple[str, int]] = []
    a = 0
    while a < len(gens):
        b, total = a, 0
        while b < len(gens) and (b == a or total + sizes[b] <= per):
            total += sizes[b]
            b += 1
        expr = f"gen in {_ints(gens[a:b])}"
        if total <= per:
            reads.append((expr, total))
        else:  # one generation with more rows than one query returns: read it in slices
            reads += [(f"{expr} and {unit} >= {lo} and {unit} < {lo + per}", per) for lo in range(0, total, per)]
        a = b
    return reads


def _inverted(*fields: str) -> list[tuple[str, str, dict]]:
    """INVERTED indexes of ``fields``, as :meth:`MilvusEngine._create_collections` lists indexes."""
    return [(f, "INVERTED", {}) for f in fields]


def _ints(xs: Sequence[int]) -> str:
    return "[" + ",".join(str(int(x)) for x in xs) + "]"


def _sparse_dict(m: sp.csr_matrix, i: int) -> dict[int, float]:
    """Row ``i`` of a CSR matrix as pymilvus's sparse vector, ``{index: float32 value}``."""
    a, b = m.indptr[i], m.indptr[i + 1]
    return dict(zip(m.indices[a:b].tolist(), m.data[a:b].astype(np.float32).tolist()))


# -------------------------------------------------------------------------- engine
class MilvusEngine(Engine):
    """A collection in Milvus or Milvus Lite (layout and limits in the module docstring)."""

    name = "milvus"
    windowed = True
    shared = True  # other clients of the server (or handles on the file in this process)
    #: Main-collection fields written before documents could have several windows (one row per document).
    _LEGACY_FIELDS = ("pk", "doc_id", "text", "meta", "kinds", "dense", "sparse", "gen", "ntok")

    def __init__(
        self,
        client: MilvusClient,
        location: str,
        uri: str,
        collection: str,
        lite: bool,
        schema: Schema,
        *,
        timeout: float = TIMEOUT_S,
        max_request_bytes: int = 48 << 20,
    ) -> None:
        self._client: MilvusClient | None = client
        self.location = location
        self.uri = uri
        self.collection = collection
        self.tokens = f"{collection}_colbert"
        self.texts = f"{collection}_text"
        self.meta_collection = f"{collection}_manifest"
        self.lite = lite
        self.schema = schema
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self._vec_dtype = np.float16 if schema.colbert_dtype == "float16" else np.float32
        self._vec_type = DataType.FLOAT16_VECTOR if schema.colbert_dtype == "float16" else DataType.FLOAT_VECTOR
        # tokens per block row; open() checks it against the stored vector width
        self.block = max(1, BLOCK_BYTES // (schema.colbert_dim * np.dtype(self._vec_dtype).itemsize))
        #: Whether rows are windows (``doc`` / ``win`` / ``spans`` fields); False for a collection created
        #: before windows (every row a whole document), which open() detects.
        self.window_rows = True
        self._fields: tuple[str, ...] = (*self._LEGACY_FIELDS, "doc", "win", "spans", "tparts")
        #: Per head key, the generations of this handle's upserts that failed before their rows request was
        #: answered: their token and text rows go with the document's next upsert or delete here (nothing else
        #: can tell them from another write's under way).
        self._failed: dict[int, list[int]] = {}

    # ---------------------------------------------------------------- connection
    @classmethod
    def _connect(
        cls,
        location: str,
        *,
        create_file: bool,
        token: str | None = None,
        secure: bool = False,
        timeout: float,
        connect_timeout: float,
    ) -> tuple[MilvusClient, str, str, bool]:
        uri, name, lite = parse_milvus_location(location)
        if lite:
            _refuse_not_lite(uri, create_file)
            client = _lite_client(uri, timeout)
            return Probed(client, uri, Path(uri), _LITE_WRITES, errors=MilvusException), uri, name, True
        if secure:
            uri = "https://" + uri[len("http://") :]
        token = token if token is not None else os.environ.get("MILVUS_TOKEN", "")
        try:
            client = _client(uri, token=token, timeout=connect_timeout)
        except MilvusException as exc:
            raise EngineUnreachableError(
                f"cannot reach Milvus at {uri} (waited {connect_timeout:g} s; engine option connect_timeout, "
                f"e.g. ?connect_timeout=30 after the location, waits longer): {exc}"
            ) from None
        return client, uri, name, False

    _CONNECT_OPTS = ("token", "secure", "timeout", "connect_timeout")
    _ENGINE_OPTS = ("max_request_bytes",)
    _CREATE_OPTS = tuple(CREATE_OPTION_RULES)
    #: The numeric options, the switch and the token, as :func:`~m3search.plan.check_options` checks them.
    _OPTION_RULES: ClassVar[dict[str, dict[str, bool]]] = {
        **CREATE_OPTION_RULES,
        "timeout": {},
        "connect_timeout": {},
        "max_request_bytes": {"integer": True},
        "secure": {"bool": True},
        "token": {"text": True, "none": True},
    }

    @classmethod
    def _split_options(cls, options: dict) -> tuple[dict, dict, dict]:
        """``options`` checked, as the connection's, the engine's and create's (shards, replicas: 1 by default;
        read by create only, ignored elsewhere, so the location that created a collection opens it)."""
        known = cls._CONNECT_OPTS + cls._ENGINE_OPTS + cls._CREATE_OPTS
        unknown = set(options) - set(known)
        if unknown:
            raise TypeError(f"unknown Milvus engine option(s) {sorted(unknown)}; allowed: {', '.join(known)}")
        options = check_options(options, cls._OPTION_RULES)
        connect = {k: options[k] for k in ("token", "secure") if k in options}
        engine = {k: options[k] for k in cls._ENGINE_OPTS if k in options}
        connect["timeout"] = engine["timeout"] = options.get("timeout", TIMEOUT_S)
        connect["connect_timeout"] = options.get("connect_timeout", CONNECT_TIMEOUT_S)
        return connect, engine, {k: options.get(k) or 1 for k in cls._CREATE_OPTS}

    @classmethod
    def exists(cls, location: str, **options: Any) -> bool:
        connect, engine, _ = cls._split_options(options)
        uri, name, lite = parse_milvus_location(location)
        with readable(uri):
            if lite and not has_file(Path(uri)):
                return False
        try:
            client, uri, name, lite = cls._connect(location, create_file=False, **connect)
        except CollectionNotFoundError:  # another program's file at a .db location: no collection (create refuses it)
            return False
        try:
            return bool(client.has_collection(name, timeout=engine["timeout"]))
        finally:
            cls._release(client, uri, lite)

    @staticmethod
    def _release(client: MilvusClient, uri: str, lite: bool) -> None:
        client.close()
        if lite:
            _lite_release(uri)

    @classmethod
    def create(cls, location: str, schema: Schema, **options: Any) -> MilvusEngine:
        if schema.colbert_dtype not in LOSSLESS_COLBERT_DTYPES or schema.colbert_quantization is not None:
            raise ValueError(
                f"Milvus stores ColBERT token vectors as float16 or float32 only; colbert_dtype="
                f"{schema.colbert_dtype!r}, colbert_quantization={schema.colbert_quantization!r} cannot be honoured "
                "(use a Qdrant location for the turbo codecs and quantization; colbert_pool_factor works everywhere)"
            )
        if not schema.colbert_on_disk:  # recorded and shown by info, it would change nothing here
            raise ValueError(
                "Milvus keeps ColBERT token vectors where its server puts them (read per candidate); "
                "colbert_on_disk=False cannot be honoured (use a Qdrant location to keep them in memory)"
            )
        connect, opts, create_opts = cls._split_options(options)
        client, uri, name, lite = cls._connect(location, create_file=True, **connect)
        try:
            if client.has_collection(name, timeout=opts["timeout"]):
                raise CollectionExistsError(f"Milvus collection {name!r} already exists at {uri}")
            engine = cls(client, location, uri, name, lite, schema, **opts)
            engine._create_collections(**create_opts)
        except BaseException:
            cls._release(client, uri, lite)
            raise
        return engine

    def _create_collections(self, *, shards: int, replicas: int) -> None:
        c, s, t, D = self.client, self.schema, self.timeout, DataType
        strong: dict[str, Any] = {"consistency_level": "Strong"}
        extra = strong if self.lite else {**strong, "num_shards": int(shards)}

        def make(name: str, about: str, fields: list[tuple], indexes: list[tuple], **kw: Any) -> None:
            """A collection of ``fields`` (``(name, type, options)``, the primary key first: an auto id when it is
            ``tid``) and ``indexes`` (``(field, type, options)``), created without create_collection(index_params=
            ...)'s wait: pymilvus sleeps 0.5 s before it first asks whether an index is built, once per index (11
            here: 5.5 s of a ~6.1 s create; 0.7 s without, benchmarks/milvus_create.py), though an empty
            collection's are built at once; loading waits."""
            sch = MilvusClient.create_schema(
                auto_id=fields[0][0] == "tid", enable_dynamic_field=False, description=about
            )
            for field, dtype, opts in fields:
                sch.add_field(field, dtype, **opts)
            idx = c.prepare_index_params()
            for field, kind, opts in indexes:
                idx.add_index(field, index_type=kind, **opts)
            c.create_collection(name, schema=sch, timeout=t, **kw)
            c.create_index(name, idx, timeout=t, sync=False)
            c.load_collection(name, timeout=t)

        key, text = {"is_primary": True}, ("text", D.VARCHAR, {"max_length": TEXT_MAX_BYTES})
        v, flat_v = ("v", D.FLOAT_VECTOR, {"dim": 2}), ("v", "FLAT", {"metric_type": "L2"})  # Milvus needs a vector
        hnsw = not self.lite and s.hnsw_m > 0  # FLAT on Milvus Lite
        graph = {"params": {"M": s.hnsw_m, "efConstruction": s.hnsw_ef_construct}} if hnsw else {}
        dense = ("dense", "HNSW" if hnsw else "FLAT", {"metric_type": "IP", **graph})
        sparse = ("sparse", "SPARSE_INVERTED_INDEX", {"metric_type": "IP", "params": {"drop_ratio_build": 0.0}})
        main = [
            ("pk", D.INT64, key),
            ("doc", D.INT64, {}),  # the document's key (its window 0's pk)
            ("win", D.INT32, {}),  # window number; -1: tombstone
            ("spans", D.JSON, {}),  # window 0: every window's [start, end) when there are several
            ("tparts", D.INT32, {}),  # window 0: 0 = text inline, else its number of NAME_text rows
            ("doc_id", D.VARCHAR, {"max_length": ID_MAX_BYTES}),
            text,
            ("meta", D.JSON, {}),
            ("kinds", D.JSON, {}),
            ("dense", D.FLOAT_VECTOR, {"dim": s.dense_dim}),
            ("sparse", D.SPARSE_FLOAT_VECTOR, {}),
            ("gen", D.INT64, {}),
            ("ntok", D.INT32, {}),
        ]
        make(self.collection, "m3search documents", main, [dense, sparse, *_inverted("doc", "win")], **extra)
        # the companions: ``tid`` (auto id), ``gen`` and ``doc`` (INVERTED), the rest; their vector FLAT, never searched
        side, side_idx = [("tid", D.INT64, key), ("gen", D.INT64, {}), ("doc", D.INT64, {})], _inverted("gen", "doc")
        vec = ("vec", self._vec_type, {"dim": self.block * s.colbert_dim})
        tok_idx = [("vec", "FLAT", {"metric_type": "IP"}), *side_idx]
        make(self.tokens, "m3search ColBERT token vectors", [*side, ("blk", D.INT32, {}), vec], tok_idx, **extra)
        make(self.texts, "m3search long texts", [*side, ("part", D.INT32, {}), text, v], [flat_v, *side_idx], **extra)
        man = [("key", D.VARCHAR, {**key, "max_length": 64}), ("value", D.VARCHAR, {"max_length": TEXT_MAX_BYTES}), v]
        make(self.meta_collection, "m3search manifest", man, [flat_v], **strong)
        if not self.lite and replicas > 1:
            for name in (self.collection, self.tokens, self.texts):
                c.release_collection(name, timeout=t)
                c.load_collection(name, replica_number=int(replicas), timeout=t)

    @classmethod
    def open(cls, location: str, **options: Any) -> MilvusEngine:
        connect, opts, _ = cls._split_options(options)
        client, uri, name, lite = cls._connect(location, create_file=False, **connect)
        try:
            if not client.has_collection(name, timeout=opts["timeout"]):
                raise CollectionNotFoundError(f"no Milvus collection {name!r} at {uri}")
            raw = cls._read_manifest(client, f"{name}_manifest", opts["timeout"], location)
            if raw is None:
                raise CollectionNotFoundError(f"Milvus collection {name!r} at {uri} has no m3search manifest")
            schema, bound = read_stored(raw, location)
            engine = cls(client, location, uri, name, lite, schema, **opts)
            engine._check_layout()
            engine.max_windows = bound
        except BaseException:
            cls._release(client, uri, lite)
            raise
        return engine

    def _check_layout(self) -> None:
        """Refuse a collection whose fields do not match the manifest's schema."""
        want = {"dense": (DataType.FLOAT_VECTOR, self.schema.dense_dim), "sparse": (DataType.SPARSE_FLOAT_VECTOR, None)}
        for coll, fields in (
            (self.collection, want),
            (self.tokens, {"vec": (self._vec_type, self.block * self.schema.colbert_dim)}),
        ):
            self._require(coll)
            desc = {f["name"]: f for f in self.client.describe_collection(coll, timeout=self.timeout)["fields"]}
            if coll == self.collection:
                self._fields = tuple(desc)
                self.window_rows = "win" in desc
            for fname, (ftype, dim) in fields.items():
                f = desc.get(fname)
                got_dim = None if f is None else f.get("params", {}).get("dim")
                if f is None or f["type"] != ftype or (dim is not None and int(got_dim) != dim):
                    raise ValueError(
                        f"Milvus collection {coll!r} does not match the manifest's schema: field {fname!r} should be "
                        f"{ftype.name}{'' if dim is None else f'({dim})'}, found "
                        f"{'nothing' if f is None else f['type'].name + ('' if got_dim is None else f'({got_dim})')}"
                    )
        if self.window_rows:  # (none before windows)
            self._require(self.texts)

    def _require(self, coll: str) -> None:
        if not self.client.has_collection(coll, timeout=self.timeout):
            raise ValueError(
                f"Milvus collection {coll!r} is missing: {self.collection!r} is not a complete m3search collection"
            )

    @property
    def process_store(self) -> str | None:
        """Milvus Lite's file is locked against other processes (``_connect``); a server is not."""
        return f"{self.uri}/{self.collection}" if self.lite else None  # (uri: the resolved file, lite_file)

    def close(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        self._release(client, self.uri, self.lite)

    @property
    def client(self) -> MilvusClient:
        if self._client is None:
            raise RuntimeError(f"collection at {self.location} is closed")
        return self._client

    # ------------------------------------------------------------------ manifest
    @staticmethod
    def _manifest_rows(client: MilvusClient, coll: str, timeout: float) -> dict[str, str] | None:
        """``{key: value}`` of every row (the manifest and the bound records), None without the collection."""
        if not client.has_collection(coll, timeout=timeout):
            return None
        with _MANIFEST_IO:
            rows = client.query(
                coll, filter='key != ""', output_fields=["key", "value"], limit=MAX_RESULTS, timeout=timeout
            )
        return {r["key"]: r["value"] for r in rows}

    @classmethod
    def _read_manifest(cls, client: MilvusClient, coll: str, timeout: float, location: str) -> dict | None:
        rows = cls._manifest_rows(client, coll, timeout) or {}
        if _MANIFEST_KEY not in rows:
            return None
        try:
            manifest = json.loads(rows[_MANIFEST_KEY])
        except ValueError as exc:  # not JSON (a hand edit): what Qdrant Edge says of its manifest file
            raise damaged(location, f"not JSON: {exc}") from None
        return with_bound(manifest, rows)

    def read_manifest(self) -> dict | None:
        return self._read_manifest(self.client, self.meta_collection, self.timeout, self.location)

    def write_manifest(self, manifest: dict) -> None:
        value = json.dumps(manifest, sort_keys=True)
        if len(value.encode("utf-8")) > TEXT_MAX_BYTES:
            raise ValueError(f"manifest is {len(value.encode())} bytes; Milvus stores at most {TEXT_MAX_BYTES}")
        self._write_rows([{"key": _MANIFEST_KEY, "value": value, "v": [0.0, 0.0]}])

    def record_window_bound(self, most: int) -> None:
        """A row of its own; then the lower records go (written first: the largest record is never missing)."""
        self._write_rows([{"key": f"{BOUND_RECORD}{most}", "value": str(most), "v": [0.0, 0.0]}])
        rows = self._manifest_rows(self.client, self.meta_collection, self.timeout) or {}
        lower = [f"{BOUND_RECORD}{n}" for n in bound_records(rows) if n < most]
        if lower:
            self.client.delete(self.meta_collection, ids=lower, timeout=self.timeout)

    def _write_rows(self, rows: list[dict]) -> None:
        """Upsert manifest rows, no reader of this process between Lite's delete and insert (:data:`_MANIFEST_IO`)."""
        with _MANIFEST_IO:
            self.client.upsert(self.meta_collection, rows, timeout=self.timeout)

    # ------------------------------------------------------------------- rows
    def _query(self, coll: str, expr: str, fields: list[str], limit: int) -> list[dict]:
        """Every row matching ``expr``; ``limit`` is the caller's bound on their number, and a row past it
        reads on with an iterator (so a stale bound, e.g. another writer's longer documents, costs time,
        never rows)."""
        ask = min(max(1, limit) + 1, MAX_RESULTS)
        rows = self._unless_empty(coll, lambda: self.client.query(coll, expr, fields, limit=ask, timeout=self.timeout))
        if len(rows) < ask:
            return rows
        return [r for page in self._pages(coll, max(1, min(MAX_RESULTS, limit)), expr, fields) for r in page]

    def _read(self, coll: str, reads: list[tuple[str, int]], fields: list[str], threads: int = 1) -> list[dict]:
        """The rows of the ``(expression, limit)`` queries ``reads`` (:func:`_reads`), ``threads`` at a time."""
        if threads == 1 or len(reads) <= 1:
            return [r for expr, limit in reads for r in self._query(coll, expr, fields, limit)]
        with ThreadPoolExecutor(min(threads, len(reads))) as pool:
            return [r for page in pool.map(lambda q: self._query(coll, q[0], fields, q[1]), reads) for r in page]

    def _pages(self, coll: str, step: int, expr: str, fields: list[str]) -> Iterator[list[dict]]:
        """The rows matching ``expr`` in pages of at most ``step`` (pymilvus's query iterator, closed after)."""
        it = self.client.query_iterator(coll, batch_size=step, filter=expr, output_fields=fields, timeout=self.timeout)
        try:
            while page := self._unless_empty(coll, it.next):
                yield page
        finally:
            it.close()

    def _unless_empty(self, coll: str, read: Callable[[], list[dict]]) -> list[dict]:
        """``read()``'s rows; none where it failed as Milvus Lite 2.5 fails a read of the sparse vectors of a
        collection no row was ever written to (:data:`_NEVER_WRITTEN`), so that an empty collection reads as
        empty. That failure where ``coll`` has rows, and any other, is raised."""
        try:
            return list(read())
        except MilvusException as exc:
            if _NEVER_WRITTEN not in str(exc) or self._count_rows(coll, ""):
                raise
            return []

    def _rows_where(
        self, keys: Sequence[int], expr: str, fields: list[str], per_key: int = 1, row_bytes: int = 64
    ) -> list[dict]:
        """Every row matching ``expr`` with ``{0}`` a chunk of ``keys``, asked chunk by chunk (``per_key``: rows a
        key may match)."""
        per_key = max(1, per_key)
        step = max(1, min(MAX_RESULTS // per_key, CHUNK_BYTES // max(row_bytes * per_key, 1)))
        out: list[dict] = []
        for a in range(0, len(keys), step):
            chunk = keys[a : a + step]
            out += self._query(self.collection, expr.format(_ints(chunk)), fields, len(chunk) * per_key)
        return out

    def _rows_by_pk(self, pks: Sequence[int], fields: list[str], row_bytes: int = 64) -> list[dict]:
        return self._rows_where(pks, "pk in {0}", fields, 1, row_bytes)

    def _heads(self, ids: Sequence[str], fields: list[str], row_bytes: int = 64) -> dict[str, dict]:
        """The stored heads of the documents, by id (a head under a colliding key is another's: left out), each
        with ``doc`` and ``win`` (rows written before windows: their own key, 0)."""
        wanted, more = set(ids), ["doc", "win"] if self.window_rows else ["pk"]
        fields = list(dict.fromkeys([*(f for f in fields if f in self._fields), *more]))
        rows = self._rows_by_pk([_pk(i) for i in wanted], fields, row_bytes)
        if not self.window_rows:
            for r in rows:
                r["doc"], r["win"] = r["pk"], 0
        return {r["doc_id"]: r for r in rows if r["doc_id"] in wanted}

    def _where(self, expr: str, rows: str) -> str:
        """``expr`` restricted to ``rows``: "live" (windows a query may return: no tombstone) or "heads"
        (window 0: one row per document). Rows written before windows are all heads."""
        if not self.window_rows:
            return expr
        cond = "win >= 0" if rows == "live" else "win == 0"
        return f"{cond} and ({expr})" if expr else cond

    def _versions(
        self, ids: Sequence[str], fields: list[str], row_bytes: int, windows: range | None
    ) -> tuple[dict[str, dict], dict[int, dict[int, dict]]]:
        """The documents' heads (:meth:`_heads`) and the window rows past 0 that could be of the versions they
        name, by ``doc`` then window (``windows``: only those whose index it holds). Why the heads and slot 0's
        windows in one read: ``upsert`` writes slot 0, so a document written in one request costs no second
        read; only the versions of long writes, whose ``doc`` the head gives, are read after it."""
        if not self.window_rows:
            return self._heads(ids, fields, row_bytes), {}
        fields = list(dict.fromkeys([*fields, "pk", "doc", "win"]))
        cond = "" if windows is None else f" and win >= {min(windows, default=1)} and win <= {max(windows, default=0)}"
        wanted, heads, rows = set(ids), {}, {}

        def read(owner: dict[int, str], expr: str) -> None:
            for r in self._rows_where(list(owner), expr, fields, self.max_windows, row_bytes):
                if r["win"] == 0 and r["doc_id"] in wanted:  # (a head under a colliding key is another's)
                    heads[r["doc_id"]] = r
                elif r["win"] > 0 and r["doc_id"] == owner.get(r["doc"]):  # (not another's row under such a key)
                    rows.setdefault(r["doc"], {})[r["win"]] = r

        read({_pk(i): i for i in wanted}, f"pk in {{0}} or (doc in {{0}} and win > 0{cond})")
        if long := {h["doc"]: i for i, h in heads.items() if h["doc"] != h["pk"] and len(h.get("spans") or []) > 1}:
            read(long, f"doc in {{0}} and win > 0{cond}")
        return heads, rows

    def _windows_of(
        self,
        ids: Sequence[str],
        fields: list[str],
        vectors: Sequence[str] = (),
        whole_text: bool = True,
        windows: range | None = None,
    ) -> list[list[dict]]:
        """Per document, its window rows in window order (``windows``: those whose index it holds): its head,
        then the windows of the version the head names ([] when it has no head: not stored, or the windows of
        an interrupted long write), with ``colbert`` matrices if asked, and the head's whole text
        (``whole_text``; False: the stored field, "" for a text kept in ``NAME_text``). A document whose
        version was replaced between the two reads (a long write's switch) is read again."""
        more = [v for v in ("dense", "sparse") if v in vectors]  # (spans, tparts: not read from rows before windows)
        want = list(dict.fromkeys([*fields, "doc_id", "gen", "ntok", "spans", "tparts", *more]))
        row_bytes = self._row_bytes(vectors)
        found: dict[str, list[dict]] = {}
        todo = list(dict.fromkeys(ids))
        for _ in range(READ_TRIES):
            heads, rows = self._versions(todo, want, row_bytes, windows)
            again = []
            for i in todo:
                head = heads.get(i)
                if head is None:
                    found[i] = []
                    continue
                got = rows.get(head["doc"], {})
                wins = [w for w in range(1, len(head.get("spans") or [])) if windows is None or w in windows]
                found[i] = [head] * (windows is None or 0 in windows) + [got[w] for w in wins if w in got]
                if any(w not in got for w in wins):
                    again.append(i)
            if not again:
                break
            todo = again
        out = [found[i] for i in ids]
        self._complete([r for rows in out for r in rows], vectors, "text" in fields and whole_text)
        return out

    def window_counts(self, ids: Sequence[str]) -> np.ndarray:
        """How many windows each stored document has (0: not stored)."""
        heads = self._heads(ids, ["doc_id", "spans"])
        return np.array([max(1, len(heads[i].get("spans") or [])) if i in heads else 0 for i in ids], dtype=np.int64)

    def _row_bytes(self, vectors: Sequence[str]) -> int:
        return 256 + ("dense" in vectors) * (4 * self.schema.dense_dim + 64) + ("sparse" in vectors) * 2048

    # -------------------------------------------------------------------- writes
    def _insert_tokens(self, batch: PointBatch, gens: np.ndarray, docs: np.ndarray) -> None:
        """Each window's tokens (window j: generation ``gens[j]``, ``doc`` ``docs[j]``) as block rows of
        ``self.block`` tokens, zero-padded, inserted in chunks."""
        B, d, offsets = self.block, self.schema.colbert_dim, batch.colbert_offsets
        lens = np.diff(offsets)
        nblk = -(-lens // B)  # ceil
        blk_start = np.concatenate([[0], np.cumsum(nblk)])
        packed = np.zeros((int(blk_start[-1]) * B, d), dtype=self._vec_dtype)
        within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], lens)
        packed[np.repeat(blk_start[:-1] * B, lens) + within] = batch.colbert
        packed = packed.reshape(-1, B * d)
        blk = (np.arange(int(blk_start[-1])) - np.repeat(blk_start[:-1], nblk)).tolist()
        rows = [
            {"gen": g, "doc": p, "blk": b, "vec": v}
            for g, p, b, v in zip(np.repeat(gens, nblk).tolist(), np.repeat(docs, nblk).tolist(), blk, packed)
        ]
        self._insert_chunked(self.tokens, rows, self._block_bytes)

    def _insert_chunked(self, coll: str, rows: list[dict], row_bytes: int) -> None:
        per = max(1, CHUNK_BYTES // row_bytes)
        for a in range(0, len(rows), per):
            self.client.insert(coll, rows[a : a + per], timeout=self.timeout)

    def _check_batch(self, batch: PointBatch) -> None:
        """What Milvus cannot store, refused before anything is written."""
        batch.validate(self.schema)
        if not batch.has_vectors:
            raise ValueError("upsert needs a batch with vectors")
        if not self.window_rows and batch.window_offsets[-1] != len(batch):
            raise ValueError(
                f"the Milvus collection {self.collection!r} was created before documents could have several windows "
                "(one row per document): long documents are cut to one window there; `m3search migrate` it to a "
                "new location to store them as windows"
            )
        long_ids = [i for i in batch.ids if len(i.encode("utf-8")) > ID_MAX_BYTES]
        if long_ids:
            raise ValueError(f"ids longer than {ID_MAX_BYTES} UTF-8 bytes cannot be stored in Milvus: {long_ids[:3]}")
        too_long = [i for i, t in zip(batch.ids, batch.texts) if len(t.encode("utf-8")) > TEXT_MAX_BYTES]
        if too_long and not self.window_rows:
            raise ValueError(
                f"texts longer than {TEXT_MAX_BYTES} UTF-8 bytes (Milvus's VARCHAR limit) cannot be stored in a Milvus "
                f"collection created before windows (`m3search migrate` it to a new location): ids {too_long[:10]}"
            )
        empty = np.flatnonzero(np.diff(batch.colbert_offsets) == 0)
        if len(empty):
            owner = np.searchsorted(batch.window_offsets, empty, side="right") - 1
            ids = list(dict.fromkeys(batch.ids[int(o)] for o in owner))
            raise ValueError(f"documents {ids[:5]} have no ColBERT vectors (every encoded text has at least </s>)")

    def _stored_rows(self, ids: Sequence[str], heads: Sequence[int], pks: Mapping[int, str]) -> dict[int, list[dict]]:
        """Per document head, the rows ``upsert`` replaces (``pk``, ``doc``, ``win``, ``gen``): its head, its rows
        in slot 0 (windows to overwrite or tombstone, tombstones) and, when its head names a version outside slot
        0, that head (whose ``doc`` the new head hides). Refuses (before any write) a 64-bit key of the new rows
        (``pks``: each one's document) that another document's row holds."""
        fields = ["pk", "doc_id", "doc", "win", "gen"]
        if self.window_rows:
            rows = self._rows_where(list(heads), "doc in {0} or pk in {0}", fields, self.max_windows)
        else:
            rows = [{**r, "doc": r["pk"], "win": 0} for r in self._rows_by_pk(list(heads), ["pk", "doc_id", "gen"])]
        extra = sorted(set(pks) - set(heads))  # window keys past 0: another document's row could hold one
        if extra and self.window_rows:
            rows += self._rows_by_pk(extra, fields)
        # a row's owner: the document whose head key is its ``doc`` or its own key; a window key past 0 held by
        # another document's row is a collision
        want, out = {**pks, **dict(zip(heads, ids))}, {}  # out: owner -> {pk: row}
        for r in rows:
            o = r["doc"] if r["doc"] in want else r["pk"]
            if r["doc_id"] != want[o]:
                raise _collision(want[o], r["doc_id"])
            out.setdefault(o, {})[r["pk"]] = r
        return {o: list(rs.values()) for o, rs in out.items()}

    def _window_rows(
        self, batch: PointBatch, heads: np.ndarray, pks: Sequence[int], gens: np.ndarray, first: int = 0
    ) -> tuple[list[list[dict]], list[int]]:
        """Each document's window rows (window ``first + j`` for its row j, ``doc`` ``heads[i]``; text on window 0
        only, metadata on every window: filters run inside the vector queries) and their approximate sizes, after
        :attr:`max_windows` is raised to them and what they point at is INSERTED under the generations ``gens``
        (invisible until a window row points at it): their token rows, then the ``NAME_text`` rows of a text over
        Milvus's VARCHAR limit (under the head's)."""
        counts = np.diff(batch.window_offsets)
        self.max_windows = max(self.max_windows, first + int(counts.max()))
        self._insert_tokens(batch, gens, np.repeat(heads, counts))
        sparse, wo, co = batch.sparse.tocsr(), batch.window_offsets, batch.colbert_offsets
        dense = np.ascontiguousarray(batch.dense, dtype=np.float32)
        docs, sizes, text_rows = [], [], []
        for i, doc_id in enumerate(batch.ids):
            meta, lo, hi = batch.metadata[i] or {}, int(wo[i]), int(wo[i + 1])
            parts = _text_parts(batch.texts[i]) if first == 0 else [""]
            if len(parts) > 1:  # the text goes to NAME_text, under the head window's generation
                text_rows += [
                    {"gen": int(gens[wo[i]]), "doc": int(heads[i]), "part": c, "text": t, "v": [0.0, 0.0]}
                    for c, t in enumerate(parts)
                ]
            kinds, spans, rows = metadata_kinds(meta), batch.recorded_spans(i) or [], []
            for j in range(lo, hi):
                w = first + j - lo
                row = {
                    "pk": int(pks[j]),
                    "doc_id": doc_id,
                    "text": parts[0] if w == 0 and len(parts) == 1 else "",
                    "meta": meta,
                    "kinds": kinds,
                    "dense": dense[j],
                    "sparse": _sparse_dict(sparse, j),
                    "gen": int(gens[j]),
                    "ntok": int(co[j + 1] - co[j]),
                }
                if self.window_rows:
                    row.update(doc=int(heads[i]), win=w, spans=spans if w == 0 else [])
                    row["tparts"] = len(parts) if w == 0 and len(parts) > 1 else 0
                rows.append(row)
            docs.append(rows)
            sizes.append(self._bytes(rows, int(sparse.indptr[hi] - sparse.indptr[lo])) + 16 * len(spans))
        if text_rows:
            self._insert_chunked(self.texts, text_rows, TEXT_MAX_BYTES + 64)
        return docs, sizes

    def _bytes(self, rows: list[dict], nnz: int) -> int:
        """About the request bytes of window rows of one document (``nnz``: their sparse entries)."""
        per_row = 4 * self.schema.dense_dim + 2 * len(json.dumps(rows[0]["meta"])) + 256
        return sum(2 * len(r["text"]) for r in rows) + len(rows) * per_row + 12 * nnz

    def _tombstone(self, doc_id: str, pk: int, gen: int) -> dict:
        """A row over a replaced row (key ``pk``; ``gen``: what goes with it, :meth:`_drop`): no query returns it
        (``win`` -1, zero vectors), no count or get reads it, and its ``doc`` is the head's key, so a document's
        tombstones are found by one query."""
        blank = {"win": -1, "text": "", "meta": {}, "kinds": {}, "spans": [], "tparts": 0, "sparse": {}, "ntok": 0}
        dense = np.zeros(self.schema.dense_dim, dtype=np.float32)
        return {**blank, "pk": int(pk), "doc": _pk(doc_id), "doc_id": doc_id, "dense": dense, "gen": int(gen)}

    @property
    def _tombstone_bytes(self) -> int:
        return 4 * self.schema.dense_dim + 256

    def _upsert_docs(self, docs: list[list[dict]], sizes: list[int]) -> None:
        """Every row of each document in ONE request; documents grouped under ``max_request_bytes``."""
        for part in split_requests(sizes, [True] * len(docs), self.max_request_bytes):
            self.client.upsert(self.collection, [r for d in docs[part] for r in d], timeout=self.timeout)

    def _new_gens(self, n: int) -> np.ndarray:
        return np.random.default_rng().integers(1, 2**62, size=n, dtype=np.int64)

    def upsert(self, batch: PointBatch) -> None:
        """Writes (module docstring): token rows, then each document's rows and tombstones in one request,
        then the leftovers' removal."""
        self._check_batch(batch)
        if not len(batch):
            return
        heads = np.array([_pk(i) for i in batch.ids], dtype=np.int64)
        counts = np.diff(batch.window_offsets)
        pks = [_wpk(i, w) for i, c in zip(batch.ids, counts.tolist()) for w in range(c)]
        stored = self._stored_rows(batch.ids, heads.tolist(), _batch_keys(pks, np.repeat(batch.ids, counts).tolist()))
        gens = self._new_gens(len(pks))
        overwritten: dict[int, list[int]] = {}  # per head, the generations of the slot-0 rows written over in place
        try:
            # (1) token (and text) rows under fresh generations: invisible until a window row points at them
            docs, sizes = self._window_rows(batch, heads, pks, gens)
            # (2) each document's new rows, with tombstones over its old slot-0 windows past the new count, in one
            # request
            for i, rows in enumerate(docs):
                h, doc_id, new = int(heads[i]), batch.ids[i], {r["pk"] for r in rows}
                old = stored.setdefault(h, [])
                overwritten[h] = [r["gen"] for r in old if r["doc"] == h and r["win"] >= 0 and r["pk"] in new]
                tombs = [self._over_head(doc_id, r) for r in old if r["pk"] == h and r["doc"] != h]  # a long write's
                tombs += [self._tombstone(doc_id, r["pk"], r["gen"]) for r in old if r["doc"] == h and r["win"] >= 0]
                tombs = [t for t in tombs if t["pk"] not in new]
                rows += tombs
                old += tombs
                sizes[i] += len(tombs) * self._tombstone_bytes
            self._upsert_docs(docs, sizes)
        except BaseException:
            for h, mine in zip(heads.tolist(), np.split(gens, batch.window_offsets[1:-1])):
                self._failed.setdefault(h, []).extend(mine.tolist())
            raise
        # (3) the tombstones, with what goes with them, and the token and text rows of the rows written over
        dead = [g for h, gs in overwritten.items() for g in (*gs, *self._failed.pop(h, []))]
        self._drop(tombs=[r for h in heads.tolist() for r in stored[h] if r["win"] < 0], gens=dead)

    def _drop(
        self, keys: Sequence[int] = (), tombs: Sequence[dict] = (), gens: Sequence[int] = (), rows: Sequence[int] = ()
    ) -> None:
        """Every row (windows, tombstones; token and text rows) whose ``doc`` is among ``keys``; the window rows
        (not the token and text rows) whose ``doc`` is among ``rows``; the tombstones ``tombs`` (rows: ``pk``,
        ``gen``) with what goes with them: the rows whose ``gen`` (token and text rows of a replaced row) or
        ``doc`` (a replaced long write's version: :meth:`_over_head`) is a tombstone's ``gen`` (generations are
        random, keys hashes: neither is ever the other); and the token and text rows of the generations ``gens``."""
        per = DELETE_KEYS
        for a in range(0, max(len(keys), len(tombs), len(gens), len(rows), 1), per):
            t = tombs[a : a + per]
            k = [*keys[a : a + per], *(r["gen"] for r in t)]
            side = [f"doc in {_ints(k)}"] if k else []
            main = [f"doc in {_ints([*k, *rows[a : a + per]])}"] if k or rows[a : a + per] else []
            if t:
                main.append(f"(pk in {_ints([r['pk'] for r in t])} and win < 0)")
            if dead := [*(r["gen"] for r in t), *gens[a : a + per]]:
                side.append(f"gen in {_ints(dead)}")
            for coll, expr in ((self.collection, main), (self.tokens, side), (self.texts, side)):
                if expr and (self.window_rows or coll == self.tokens):
                    self.client.delete(coll, filter=" or ".join(expr), timeout=self.timeout)

    def _own_rows(self, doc_id: str, pks: Sequence[int], fields: list[str]) -> list[dict]:
        """The stored rows under keys of ``doc_id``'s rows (``fields``, ``doc_id`` among them); refuses a key
        another document's row holds."""
        rows = self._rows_by_pk(pks, fields)
        if held := [r["doc_id"] for r in rows if r["doc_id"] != doc_id]:
            raise _collision(doc_id, held[0])
        return rows

    @staticmethod
    def _stray_keys(ids: Sequence[str], gens: Sequence[int]) -> dict[str, list[int]]:
        """Per document, the ``doc`` values that the stopped long writes ``gens`` wrote, and slots 1 and 2."""
        return {i: [*(_doc_key(i, g) for g in gens if g), *_legacy_keys(i)] for i in ids}

    def purge(self, ids: Sequence[str], gens: Sequence[int] = ()) -> None:
        """The rows of the documents' interrupted long writes: those of generations ``gens`` (token and text rows
        too) and of slots 1 and 2 (an older release's). Not slot 0's, which only ``upsert`` writes, nor another
        long write's: another client may have begun writing the document since the caller found it absent."""
        if self.window_rows:  # (else a long write is one upsert: it leaves nothing)
            self._drop([k for keys in self._stray_keys(ids, gens).values() for k in keys])

    def tidy(self, ids: Sequence[str], gens: Sequence[int] = ()) -> None:
        """What long writes that stopped left beside stored documents: the rows of the generations ``gens`` (and
        slots 1 and 2) that their head does not name (stopped before the switch), and the documents' tombstones
        with the token and text rows of what they replaced (stopped after it: step 3 of ``upsert_long``)."""
        if not self.window_rows or not ids:
            return
        wanted = set(ids)
        rows = self._rows_where(  # the heads (the version each names) and tombstones, in one read
            [_pk(i) for i in wanted],
            "pk in {0} or (doc in {0} and win < 0)",
            ["pk", "doc_id", "doc", "win", "gen"],
            self.max_windows + 1,
        )
        heads = {r["doc_id"]: r for r in rows if r["win"] >= 0 and r["doc_id"] in wanted}  # (not a colliding key's)
        keys = [k for i, ks in self._stray_keys(list(heads), gens).items() for k in ks if k != heads[i]["doc"]]
        self._drop(keys, [t for t in rows if t["win"] < 0 and t["doc_id"] in heads])

    def upsert_long(self, pieces: Iterable[PointBatch], gen: int = 0) -> None:
        """Long writes, steps (0)-(3) of the module docstring, under the write's generation ``gen`` (0: one drawn
        here): each piece's windows as it comes, then the switch, then the tombstones' removal."""
        if not self.window_rows:
            return super().upsert_long(pieces)
        gen = gen or int(self._new_gens(1)[0])
        head, spans, head_size, doc_id, key = None, [], 0, "", 0
        for piece in pieces:
            self._check_batch(piece)
            if len(piece) != 1 or head is not None and piece.ids[0] != doc_id:
                raise ValueError("upsert_long takes one-document pieces with vectors")
            first = len(spans)
            if head is None:
                doc_id, key = piece.ids[0], _doc_key(piece.ids[0], gen)
            n = int(piece.window_offsets[-1])
            pks = [_wpk(doc_id, first + w, gen) for w in range(n)]
            # a key another document's row holds is refused before the piece is written (the head: the first's)
            self._own_rows(doc_id, pks, ["doc_id"])
            gens = self._new_gens(n)
            (rows,), (size,) = self._window_rows(piece, np.array([key]), pks, gens, first=first)
            if head is None:
                head, rows = rows[0], rows[1:]
                head_size = self._bytes([head], len(head["sparse"]))
            spans += piece.doc_spans(0)
            per = max(1, len(rows) * self.max_request_bytes // max(size, 1))  # windows may go in several requests
            for a in range(0, len(rows), per):
                self.client.upsert(self.collection, rows[a : a + per], timeout=self.timeout)
        if head is None:
            raise ValueError("upsert_long needs at least one piece")
        head["spans"] = spans if len(spans) > 1 else []
        tombs = self._replaced(doc_id)
        switch = [head, *tombs]
        if head_size + 16 * len(spans) + len(tombs) * self._tombstone_bytes > self.max_request_bytes:
            # too many for one request (an old version in slot 0): it is deleted first (a crash here leaves it absent)
            old = _ints([_pk(doc_id), *(t["pk"] for t in tombs)])
            self.client.delete(self.collection, filter=f"pk in {old}", timeout=self.timeout)
            switch = [head]
        self.client.upsert(self.collection, switch, timeout=self.timeout)  # the switch: the new version whole
        self._drop(tombs=tombs)  # the tombstones, with what goes with them

    def _replaced(self, doc_id: str) -> list[dict]:
        """Tombstones over the version stored now (read right before the switch: another write may have landed
        since the long write began): over its head, and, in slot 0, over each of its windows (which the new
        head does not hide)."""
        old, *_ = self._own_rows(doc_id, [_pk(doc_id)], ["pk", "doc_id", "doc", "gen"]) or [None]  # the head
        if old is None or old["doc"] != _pk(doc_id):
            return [] if old is None else [self._over_head(doc_id, old)]
        rows = self._rows_where([old["doc"]], "doc in {0} and win > 0", ["pk", "doc_id", "gen"], self.max_windows)
        return [
            *(self._tombstone(doc_id, r["pk"], r["gen"]) for r in rows if r["doc_id"] == doc_id),
            self._over_head(doc_id, old),
        ]

    def _over_head(self, doc_id: str, old: dict) -> dict:
        """The tombstone over a replaced head (``doc``, ``gen``), under a key of its own (the new head takes its
        ``pk``): its ``gen`` is the head's in slot 0, else the version's ``doc`` (what goes with it, :meth:`_drop`)."""
        gen = old["gen"] if old["doc"] == _pk(doc_id) else old["doc"]
        return self._tombstone(doc_id, _head_tombstone_key(doc_id, gen), gen)

    def set_metadata(self, ids: Sequence[str], metadata: Sequence[dict]) -> None:
        """Rewrites every window row of the documents (Milvus 2.5 has no partial update; token rows untouched),
        each document in one request, documents grouped under ``max_request_bytes`` as writes are."""
        if len(ids) != len(metadata):
            raise ValueError(f"{len(ids)} ids but {len(metadata)} metadata dicts")
        if not ids:
            return
        fields = [f for f in self._fields if f not in ("meta", "kinds")]
        docs = self._windows_of(ids, fields, ("dense", "sparse"), whole_text=False)
        out, sizes = [], []
        for doc_id, meta, rows in zip(ids, metadata, docs):
            if not rows:
                raise ValueError(f"unknown id {doc_id!r}; no metadata was changed")
            kinds, dense = metadata_kinds(meta), [np.asarray(r["dense"], dtype=np.float32) for r in rows]
            new = [{**{f: r[f] for f in fields}, "dense": d, "meta": meta, "kinds": kinds} for r, d in zip(rows, dense)]
            out.append(new)
            sizes.append(self._bytes(new, sum(len(r["sparse"]) for r in new)) + 16 * len(new[0].get("spans") or []))
        self._upsert_docs(out, sizes)

    def delete(self, ids: Sequence[str]) -> None:
        """Every row of the documents: the version each head names, slot 0 (windows, tombstones, strays), slots 1
        and 2, and the token and text rows of what the tombstones replaced; slot 0's token and text rows by the
        generations read (one read), not by ``doc``: an ``upsert`` under way inserted its own before its rows."""
        if not self.window_rows:
            per = DELETE_KEYS // 3  # documents per delete, as in a windowed collection (three keys each)
            for a in range(0, len(ids), per):
                chunk = _ints([_pk(i) for i in ids[a : a + per]])
                self.client.delete(self.collection, filter=f"pk in {chunk}", timeout=self.timeout)
                self.client.delete(self.tokens, filter=f"doc in {chunk}", timeout=self.timeout)
            return
        ids = list(dict.fromkeys(ids))
        heads = [_pk(i) for i in ids]
        rows = [r for rs in self._stored_rows(ids, heads, {}).values() for r in rs]
        own = set(heads)
        slot = [r for r in rows if r["doc"] in own]
        self._drop(
            [
                *{r["doc"] for r in rows if r["pk"] in own and r["doc"] not in own},
                *(k for i in ids for k in _legacy_keys(i)),
            ],
            tombs=[r for r in slot if r["win"] < 0],
            gens=[*(r["gen"] for r in slot if r["win"] >= 0), *(g for h in heads for g in self._failed.pop(h, []))],
            rows=heads,
        )

    # --------------------------------------------------------------------- reads
    def existing(self, ids: Sequence[str]) -> set[str]:
        return set(self._heads(ids, ["doc_id"]))

    def _complete(self, rows: list[dict], vectors: Sequence[str], texts: bool = True) -> None:
        """Rows as read, completed (a row listed twice, for a repeated id, once): each one's token matrix as
        ``row["colbert"]`` when ``vectors`` asks for it, and (``texts``) the whole text of heads whose text is in
        ``NAME_text`` rows (joined in part order)."""
        rows = list({id(r): r for r in rows}.values())
        if "colbert" in vectors:
            for r, m in zip(rows, self._colbert_of([r["gen"] for r in rows], [r["ntok"] for r in rows])):
                r["colbert"] = m
        heads = [r for r in rows if r.get("tparts")] if texts else []
        if not heads:
            return
        per = max(1, CHUNK_BYTES // TEXT_MAX_BYTES)
        reads = _reads([r["gen"] for r in heads], [r["tparts"] for r in heads], per, "part")
        parts = {(r["gen"], r["part"]): r["text"] for r in self._read(self.texts, reads, ["gen", "part", "text"])}
        for r in heads:
            r["text"] = "".join(parts[(r["gen"], c)] for c in range(r["tparts"]))

    @property
    def _block_bytes(self) -> int:
        return self.block * self.schema.colbert_dim * np.dtype(self._vec_dtype).itemsize + 48

    def _colbert_of(self, gens: Sequence[int], ntoks: Sequence[int]) -> list[np.ndarray]:
        """Token matrices (float32, in token order) of the given generations."""
        if not gens:
            return []
        B, d = self.block, self.schema.colbert_dim
        nblk = [-(-int(t) // B) for t in ntoks]
        reads = _reads(gens, nblk, max(1, min(MAX_RESULTS, CHUNK_BYTES // self._block_bytes)), "blk")
        got = self._read(self.tokens, reads, ["gen", "blk", "vec"], READ_THREADS)
        order_of = {g: j for j, g in enumerate(gens)}
        doc = np.array([order_of[r["gen"]] for r in got], dtype=np.int64)
        order = np.lexsort((np.array([r["blk"] for r in got], dtype=np.int64), doc))
        counts = np.bincount(doc, minlength=len(gens))
        if not np.array_equal(counts, np.asarray(nblk)):
            bad = [int(g) for g, c, t in zip(gens, counts, nblk) if c != t]
            raise RuntimeError(
                f"Milvus collection {self.collection!r}: ColBERT blocks missing for generations {bad[:5]}"
            )
        blocks = self._decode_vectors([got[i]["vec"] for i in order]).reshape(-1, d)  # (sum blocks * B, d)
        starts = np.concatenate([[0], np.cumsum(nblk)])[:-1] * B
        return [blocks[s : s + int(t)] for s, t in zip(starts, ntoks)]

    def _decode_vectors(self, raw: list) -> np.ndarray:
        width = self.block * self.schema.colbert_dim
        if self._vec_dtype == np.float16:
            # pymilvus returns FLOAT16_VECTOR rows as [bytes]
            buf = b"".join(r[0] if isinstance(r, list) else bytes(r) for r in raw)
            return np.frombuffer(buf, dtype=np.float16).reshape(-1, width).astype(np.float32)
        return np.asarray(raw, dtype=np.float32).reshape(-1, width)

    @staticmethod
    def _sparse_pair(s: dict) -> tuple[np.ndarray, np.ndarray]:
        idx = np.fromiter(s.keys(), dtype=np.int64, count=len(s))
        val = np.fromiter(s.values(), dtype=np.float32, count=len(s))
        order = np.argsort(idx)
        return idx[order], val[order]

    def _record(self, r: dict) -> Record:
        spans = r.get("spans") or None
        rec = Record(r["doc_id"], r.get("text", ""), r.get("meta") or {}, spans=spans, window=r.get("win", 0))
        if "dense" in r:
            rec.dense = np.asarray(r["dense"], dtype=np.float32)
        if "sparse" in r:
            rec.sparse = self._sparse_pair(r["sparse"])
        if "colbert" in r:
            rec.colbert = r["colbert"]
        return rec

    def _head_fields(self, vectors: Sequence[str]) -> list[str]:
        spans = ["spans", "tparts"] if self.window_rows else []
        return ["doc_id", "text", "meta", "gen", "ntok", *spans, *[v for v in ("dense", "sparse") if v in vectors]]

    def get(self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = False) -> list[Record | None]:
        """Documents (window 0's row: text, metadata, every window's span; vectors of window 0)."""
        if not ids:
            return []
        vectors = wanted_modes(with_vectors)
        heads = self._heads(ids, self._head_fields(vectors), self._row_bytes(vectors))
        out = [heads.get(i) for i in ids]
        self._complete([r for r in out if r is not None], vectors)
        return [None if r is None else self._record(r) for r in out]

    def get_windows(
        self, ids: Sequence[str], *, with_vectors: bool | Sequence[str] = True, windows: range | None = None
    ) -> list[list[Record]]:
        vectors = wanted_modes(with_vectors)
        docs = self._windows_of(ids, ["text", "meta"], vectors, windows=windows)
        return [[self._record(r) for r in rows] for rows in docs]

    def count(self, filter: Filter | None = None) -> int:
        return self._count_rows(self.collection, self._where(self._expr(filter), "heads"))

    def _count_rows(self, coll: str, expr: str) -> int:
        rows = self.client.query(coll, filter=expr, output_fields=["count(*)"], timeout=self.timeout)
        return int(rows[0]["count(*)"])

    def iter_batches(self, batch_size: int = 256, *, with_vectors: bool = True) -> Iterator[PointBatch]:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        vectors = MODES if with_vectors else ()
        step = max(1, min(batch_size, CHUNK_BYTES // self._row_bytes(vectors)))
        pending: list[dict] = []
        with closing(self._pages(self.collection, step, self._where("", "heads"), self._head_fields(vectors))) as pages:
            for page in pages:
                pending += page
                while len(pending) >= batch_size:
                    chunk, pending = pending[:batch_size], pending[batch_size:]
                    yield self._batch(chunk, vectors)
        if pending:
            yield self._batch(pending, vectors)

    def _batch(self, heads: list[dict], vectors: Sequence[str]) -> PointBatch:
        """Stored documents as a batch: every window when vectors are asked for, else the heads."""
        if vectors and any(len(r.get("spans") or []) > 1 for r in heads):
            docs = self._windows_of([r["doc_id"] for r in heads], ["text", "meta"], vectors)
            rows = [r for d in docs for r in d]
        else:
            rows = heads
            self._complete(rows, vectors)
        return PointBatch.from_records([self._record(r) for r in rows], self.schema.vocab_size)

    # ------------------------------------------------------------------- queries
    def _has_lists(self, field: str) -> bool:
        expr = f'{kinds_path(field)} == "l"'
        return bool(
            self.client.query(self.collection, filter=expr, output_fields=["pk"], limit=1, timeout=self.timeout)
        )

    def _expr(self, filter: Filter | None) -> str:
        return to_milvus_expr(filter, self._has_lists, allow_not=not self.lite)

    @staticmethod
    def _limit(k: int) -> int:
        return min(check_int("k", k), MAX_RESULTS)

    def _search(self, data: list, field: str, k: int, expr: str, params: dict) -> list[Hits]:
        """Top-k DOCUMENTS: Milvus's grouping search returns each group (``doc``: a document's slot) once, at
        its best window; a group its document's head does not name is dropped (:meth:`_committed`), and a
        query that lost hits so asks again for more. A hit on a window past its head's count (a concurrent
        write's, module docstring) hid the group's other windows: the query asks again without that row."""
        k = self._limit(k)
        group = {"group_by_field": "doc"} if self.window_rows else {}
        out: list[Hits] = [[] for _ in data]
        todo, limit, skip = list(range(len(data))), k, set()
        while todo:
            ef = params.get("params", {}).get("ef")
            if ef is not None and ef < limit:  # HNSW (a server) needs ef >= limit
                params = {**params, "params": {**params["params"], "ef": limit}}
            where = self._where(expr, "live")
            res = self.client.search(
                self.collection,
                data=[data[i] for i in todo],
                anns_field=field,
                limit=limit,
                filter=f"{where} and pk not in {_ints(sorted(skip))}" if skip else where,
                output_fields=["doc_id", "doc", "win"] if self.window_rows else ["doc_id"],
                search_params=params,
                timeout=self.timeout,
                **group,
            )
            again = []
            for i, (hits, strays), raw in zip(todo, self._committed(res), res):
                out[i] = hits[:k]
                skip |= strays
                if strays or (len(hits) < k and len(raw) == limit and limit < MAX_RESULTS):
                    again.append(i)
            todo, limit = again, min(2 * limit, MAX_RESULTS)
        return out

    def _committed(self, results: list) -> list[tuple[Hits, set[int]]]:
        """The hits without those of a version their document's head does not name (a long write not switched
        yet, or interrupted; a version replaced; a short write's windows that a long write's switch landed
        over) or past its window count (a longer version's, written after the last write read the document),
        with the keys of the latter: a head is its document's own; a window past it costs one read of its head
        (all of them at once)."""
        asked = sorted({h["entity"]["doc_id"] for r in results for h in r if h["entity"].get("win", 0)})
        heads = self._heads(asked, ["doc_id", "spans"])
        named = {(i, h["doc"]): max(1, len(h.get("spans") or [])) for i, h in heads.items()}
        out = []
        for r in results:
            kept, past = [], set()
            for h in r:
                e, win = h["entity"], h["entity"].get("win", 0)
                n = named.get((e["doc_id"], e.get("doc")))
                if not win or (n is not None and win < n):
                    kept.append((e["doc_id"], float(h["distance"])))
                elif n is not None:
                    past.add(h["id"])
            out.append((kept, past))
        return out

    def search_dense(self, q: np.ndarray, k: int, filter: Filter | None = None, *, exact: bool = False) -> list[Hits]:
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        params: dict[str, Any] = {"metric_type": "IP"}
        if not self.lite and self.schema.hnsw_m > 0:
            params["params"] = {"ef": 32768 if exact else max(self._limit(k), 64)}
        return self._search(list(q), "dense", k, self._expr(filter), params)

    def search_sparse(
        self, q: sp.csr_matrix, k: int, filter: Filter | None = None, *, exact: bool = False
    ) -> list[Hits]:
        q = sp.csr_matrix(q)
        rows = [i for i in range(q.shape[0]) if q.indptr[i + 1] > q.indptr[i]]  # an empty query matches nothing
        params = {"metric_type": "IP", "params": {"drop_ratio_search": 0.0}}
        asked = [_sparse_dict(q, i) for i in rows]
        hits = dict(zip(rows, self._search(asked, "sparse", k, self._expr(filter), params))) if rows else {}
        return [hits.get(i, []) for i in range(q.shape[0])]

    def score_windows(self, ids: Sequence[str], query: QueryVectors, modes: Sequence[str] = MODES) -> WindowScores:
        """Exact scores of every window of the documents, from the fetched vectors (:func:`score_records`);
        a document that is not stored is one NaN window. ``score`` is the base's (their per-document
        maximum): ``known`` is not used, as the vectors are fetched for ColBERT anyway, and the dense
        and sparse products over them cost less than splitting the fetch."""
        ids, modes = list(ids), wanted_modes(modes)
        docs = self._windows_of(ids, [], modes) if ids and modes else [[] for _ in ids]
        records = [rec for rows in docs for rec in [self._record(r) for r in rows] or [None]]
        offsets = np.cumsum([0] + [max(1, len(rows)) for rows in docs], dtype=np.int64)
        return WindowScores(offsets, score_records(records, query, modes))
