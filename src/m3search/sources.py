"""Read documents to index from the files people already have.

Three shapes cover most corpora: JSON Lines (a BEIR ``corpus.jsonl`` works as is),
CSV/TSV with a header row, and a folder of ``.txt``/``.md`` files. A JSON Lines or CSV/TSV file
may be gzip-compressed (``corpus.jsonl.gz``: read as the file named without ``.gz``). Standard input
(``m3search index -``) is copied to a temporary file first (:func:`spooled`). Every reader
yields :class:`Record` objects in file order, so ``m3search index`` can stream a
source of any size in batches, and a re-run with the same source produces the
same ids (the CLI upserts, so a re-run updates instead of duplicating). The query files that
``m3search search --queries`` reads (a .txt file, one query per line, or BEIR's queries.jsonl) are read by the
same readers (:func:`read_queries`).

Field rules (JSONL and CSV alike):

* id: ``--id-field`` if given, else ``_id`` or ``id`` when the record has one, else the
  1-based record number (stable across re-runs of the same file).
* text: the ``--text-field`` values joined with a space and stripped; by default
  ``title`` and ``text`` (BEIR's ``(title + " " + text).strip()``), or ``text`` alone.
* metadata: every other field. A ``metadata`` object (BEIR's corpus has one) is merged in.

Every record is checked as it is read, by the collection's own rules (text and metadata
values it can store exactly), and an error names the place: ``file:line`` (the physical
line, also for a byte that is not UTF-8), the field, and the document id. So reading a
source to its end, as :func:`check_source` does, proves that writing it will not fail on
its content: ``m3search index`` does that before its first write.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from m3search.errors import SourceError
from m3search.filters import INT64_MAX, INT64_MIN

__all__ = [
    "Record",
    "read_source",
    "read_jsonl",
    "read_table",
    "read_folder",
    "iter_batches",
    "count_records",
    "check_source",
    "open_bytes",
    "locate",
    "spooled",
    "read_queries",
]

#: File suffixes read from a folder source.
FOLDER_SUFFIXES = (".txt", ".md")
#: File suffixes read as JSON Lines / as CSV (comma) or TSV (tab) tables.
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABLE_SUFFIXES = (".csv", ".tsv")
#: A file whose name ends so is gzip-compressed, and read as the file named without it.
GZIP_SUFFIX = ".gz"
#: The source that names standard input, and the formats it is read as (it has no suffix to say).
STDIN = "-"
STREAM_FORMATS = tuple(suffix[1:] for suffix in (JSONL_SUFFIXES[0], *TABLE_SUFFIXES))
#: File suffixes of a query file read as one query per line (the others are JSON Lines: BEIR's queries.jsonl),
#: and the formats standard input is read as for ``m3search search --queries -``.
QUERY_LINE_SUFFIXES = (".txt",)
QUERY_FORMATS = tuple(suffix[1:] for suffix in (*QUERY_LINE_SUFFIXES, JSONL_SUFFIXES[0]))
#: The first bytes of every gzip stream (RFC 1952): how compressed standard input is told.
GZIP_MAGIC = b"\x1f\x8b"
_SPOOL_CHUNK = 1 << 20
_DEFAULT_ID_FIELDS = ("_id", "id")
_NOT_AN_ARRAY = "expected JSON Lines (one object per line), not a JSON array"
_BARE_CR = "lines end with a bare carriage return; save the file with \\n or \\r\\n line endings"
#: The key of a column the header leaves unnamed, with its 1-based position (no column name can equal it).
_UNNAMED = object()
#: What csv.DictReader puts in the columns a short row lacks (told apart from an empty cell).
_MISSING = object()
_DEFAULT_TEXT_FIELDS = ("title", "text")
_INT_RE = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT_RE = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+([eE][-+]?[0-9]+)?")
#: Longest CSV/TSV cell read (the csv module's default, 131072 characters, refused texts JSONL takes).
#: 2**31 - 1: the largest value ``csv.field_size_limit`` takes on every platform (a C long).
CSV_FIELD_LIMIT = 2**31 - 1


@dataclass
class Record:
    """One document: the caller's id, the text to encode, and payload metadata."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def read_source(
    path: str | Path,
    *,
    id_field: str | None = None,
    text_fields: Sequence[str] | None = None,
) -> Iterator[Record]:
    """Yield the records of ``path``; the reader is chosen by suffix (or folder)."""
    path = Path(path)
    if path.is_dir():
        if corpus := locate(path, "corpus.jsonl"):  # read as a folder, only its README.md was indexed
            raise ValueError(
                f"{str(path)!r} is a BEIR folder (it holds {corpus.name}): pass {str(corpus)!r}; "
                "a folder source is read as its .txt/.md files"
            )
        if id_field or text_fields:
            raise ValueError("--id-field/--text-field do not apply to a folder source (id = relative path)")
        return read_folder(path)
    if not path.exists():
        raise ValueError(f"source {str(path)!r} does not exist")
    if not path.is_file():  # a pipe (/dev/stdin, <(...)) was said not to exist
        raise ValueError(
            f"source {str(path)!r} is not a regular file (a pipe or a device): it is read twice, checked whole "
            f"before the first write; give it as standard input ({STDIN}, with --format), which is copied first"
        )
    suffix = _file_type(path)
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path, id_field=id_field, text_fields=text_fields)
    if suffix in TABLE_SUFFIXES:
        return read_table(path, id_field=id_field, text_fields=text_fields)
    raise ValueError(
        f"source {str(path)!r}: unknown file type {suffix + _gz(path)!r} "
        "(expected .jsonl, .csv, .tsv, each optionally .gz, or a folder of .txt/.md)"
    )


def count_records(path: str | Path) -> int | None:
    """Cheap record count for a progress bar total (lines or files); None if unknown."""
    path = Path(path)
    if path.is_dir():
        return sum(1 for _ in _folder_files(path))
    if not path.is_file() or _file_type(path) in TABLE_SUFFIXES:
        return None  # quoted fields may span lines; the header is not a record
    with open_bytes(path) as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _gz(path: Path) -> str:
    """``GZIP_SUFFIX`` if ``path`` is gzip-compressed, else ``""``: the one place that tells."""
    return GZIP_SUFFIX if path.name.lower().endswith(GZIP_SUFFIX) else ""


def _file_type(path: Path) -> str:
    """The suffix that says how ``path`` is read (lower case): its own, or a .gz file's inner one."""
    return Path(path.name[: len(path.name) - len(_gz(path))]).suffix.lower()


@contextlib.contextmanager
def open_bytes(path: Path, name: str | None = None) -> Iterator[BinaryIO]:
    """``path`` opened for reading bytes, a .gz decompressed on the way: the opener every reader uses.

    Why: gzip reports a damaged file only when a read reaches the damage, as ``BadGzipFile``, ``EOFError``
    or ``zlib.error``, naming no file; a read in this block raises :class:`SourceError` naming ``name``
    (default: the file name) instead.
    """
    if not _gz(path):
        with open(path, "rb") as f:
            yield f
        return
    try:
        with gzip.open(path, "rb") as f:
            yield f
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise SourceError(f"{name or path.name}: not a valid gzip file ({e}); compress or download it again") from None


@contextlib.contextmanager
def spooled(stream: BinaryIO, fmt: str, formats: Sequence[str] = STREAM_FORMATS) -> Iterator[Path]:
    """``stream`` copied, in chunks, to a temporary file read as ``fmt`` (one of ``formats``) and as
    gzip when it starts with :data:`GZIP_MAGIC`; the file is removed when the block ends, also on an error or Ctrl-C.

    Why: ``m3search index`` reads its source twice (checked whole before the first write), a pipe only once
    (``search --queries`` too, with :data:`QUERY_FORMATS`).
    The copy is named ``stdin.<fmt>`` (``.gz`` added), the name errors give for a place in it. A copy that cannot
    be written (a full disk) is a :class:`SourceError` naming its folder: the system's "No space left on device"
    alone did not say that the disk was $TMPDIR's.
    """
    if fmt not in formats:
        raise SourceError(f"standard input: unknown format {fmt!r} (expected one of {', '.join(formats)})")
    with tempfile.TemporaryDirectory(prefix="m3search-stdin-") as folder:
        chunks, head = _chunks(stream), b""
        for chunk in chunks:  # enough to tell gzip
            head += chunk
            if len(head) >= len(GZIP_MAGIC):
                break
        path = Path(folder) / f"stdin.{fmt}{GZIP_SUFFIX if head.startswith(GZIP_MAGIC) else ''}"
        try:
            with open(path, "wb") as f:
                f.write(head)
                f.writelines(chunks)
        except OSError as exc:
            raise SourceError(
                f"standard input could not be copied to {Path(folder).parent} ({exc.strerror or exc}): it is read "
                "twice, so it is copied first; set TMPDIR to a folder with room for it"
            ) from None
        yield path


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    """``stream``'s bytes as they come, to its end, one read each (``read1``). A terminal's Ctrl-D ends one read
    only: ``read(n)`` (and so ``shutil.copyfileobj``) read on after it, and a second Ctrl-D was needed."""
    read = getattr(stream, "read1", stream.read)
    while chunk := read(_SPOOL_CHUNK):
        yield chunk


def locate(folder: Path, name: str) -> Path | None:
    """``folder/name`` or its compressed ``folder/name.gz``, whichever exists; None if neither does.

    Both present is a :class:`SourceError`: they may differ (an edited or re-downloaded copy), and which one
    is read must not be a guess.
    """
    found = [p for p in (folder / name, folder / (name + GZIP_SUFFIX)) if p.is_file()]
    if len(found) == 2:
        raise SourceError(f"{folder} holds both {name} and {name}{GZIP_SUFFIX}: remove one (they may differ)")
    return found[0] if found else None


def read_jsonl(
    path: str | Path,
    *,
    id_field: str | None = None,
    text_fields: Sequence[str] | None = None,
    metadata: bool = True,
) -> Iterator[Record]:
    """JSON Lines, one object per line; blank lines are skipped.

    ``metadata=False``: records carry none, and none is checked (eval stores no metadata: a value no
    collection stores, e.g. an integer beyond int64, refused a corpus it would never write).
    """
    return (rec for _, rec in _placed_jsonl(Path(path), id_field, text_fields, metadata))


def _placed_jsonl(
    path: Path, id_field: str | None, text_fields: Sequence[str] | None, metadata: bool
) -> Iterator[tuple[str, Record]]:
    """:func:`read_jsonl`'s records, each with its place (``file:line``) for a later check to name."""
    number = 0
    for lineno, line in _utf8_lines(path):
        if not line.strip():
            continue
        number += 1
        where = f"{path.name}:{lineno}"
        obj = json_object(line, where, first=number == 1)
        yield where, _to_record(obj, number, where, id_field, text_fields, metadata=metadata)


def read_queries(path: str | Path) -> Iterator[Record]:
    """The queries of a query file, in file order, as records (id, text; no metadata), each optionally .gz:

    * ``.txt``: one query per line, stripped; blank lines are skipped; id = the line number;
    * JSON Lines (BEIR's ``queries.jsonl``): id = ``_id`` or ``id`` (else the record number), text = ``text``;
    * a BEIR folder: its ``queries.jsonl`` (or ``.gz``).

    Each query is checked as a search checks one: an empty one is a :class:`SourceError` naming its line and id.
    Ids are not checked for repeats here (:func:`check_source` does, over the whole file).
    """
    from m3search.plan import check_query

    path = Path(path)
    if path.is_dir():
        if (found := locate(path, "queries.jsonl")) is None:
            raise SourceError(
                f"{path}: a folder of queries holds queries.jsonl (or queries.jsonl.gz); this one does not"
            )
        path = found
    kind = _file_type(path)
    if kind in QUERY_LINE_SUFFIXES:
        placed = (
            (f"{path.name}:{n}", Record(id=str(n), text=line.strip())) for n, line in _utf8_lines(path) if line.strip()
        )
    elif kind in JSONL_SUFFIXES:
        placed = _placed_jsonl(path, None, ["text"], metadata=False)
    else:
        raise SourceError(
            f"queries {str(path)!r}: unknown file type {kind + _gz(path)!r} (expected .txt, one query per line, or "
            ".jsonl, BEIR's queries.jsonl; each optionally .gz)"
        )
    for where, rec in placed:
        try:
            check_query(rec.text)
        except ValueError as exc:
            raise SourceError(f"{where}: query {rec.id!r}: {exc}") from None
        yield rec


def json_object(line: str, where: str, *, first: bool = False) -> dict[str, Any]:
    """One JSON Lines record, which must be an object; every way it can fail is a ValueError naming ``where``.

    Why one function: the parser's errors name no file, and not all are ``JSONDecodeError`` (an integer of
    more than 4300 digits is a plain ValueError, deep nesting a RecursionError). ``first``: the file's first
    record, where a ``[`` means a JSON array was given instead of JSON Lines.
    """
    try:
        obj = json.loads(line.rstrip("\r\n"))  # (with its line break, an error at the line's end said column 1)
    except json.JSONDecodeError as e:
        if first and line.lstrip().startswith("["):
            raise ValueError(f"{where}: {_NOT_AN_ARRAY}") from None
        if "\r" in line.rstrip("\r\n"):  # JSON strings hold no raw CR: these are records on one \n-line
            raise ValueError(f"{where}: invalid JSON Lines ({_BARE_CR})") from None
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{where}: invalid JSON ({' '.join(str(e).split())[:200]})") from None
    if first and isinstance(obj, list):
        raise ValueError(f"{where}: {_NOT_AN_ARRAY}")
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _utf8_lines(path: Path, name: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, read as bytes so that a bad byte names its line.

    A UTF-8 BOM is skipped; line endings are kept (the csv module needs them); a .gz is read decompressed
    (:func:`open_bytes`), its lines and bytes counted as the plain file's. ``name``: the file as errors name
    it (default: its file name).
    """
    offset = 0
    with open_bytes(path, name) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, offset = raw[3:], 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{name or path.name}:{lineno}: not UTF-8 text ({e.reason}: byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}, byte {offset + e.start} of the file)"
                ) from None
            offset += len(raw)
            yield lineno, line


def read_table(
    path: str | Path, *, id_field: str | None = None, text_fields: Sequence[str] | None = None
) -> Iterator[Record]:
    """CSV (comma) or TSV (tab) with a header row. Integer/decimal metadata cells become numbers.

    Quoting is strict: an unclosed quote or a field that starts with a quote it does not close is an
    error naming the record's first line (read leniently, either swallowed every later record or
    dropped the quotes from the text).
    """
    path = Path(path)
    kind = _file_type(path)[1:].upper()
    delimiter = "\t" if kind == "TSV" else ","
    if csv.field_size_limit() < CSV_FIELD_LIMIT:  # process-wide: raised, never lowered
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.DictReader((line for _, line in _utf8_lines(path)), delimiter=delimiter, strict=True, restval=_MISSING)
    start = 1  # first line of the record being read
    try:
        if not reader.fieldnames:
            raise ValueError(f"{path.name}: empty file (a header row is required)")
        # a column with no name (a trailing delimiter, as spreadsheets export) was the metadata key "" of every
        # record: one told apart by its position, its cells required empty
        names = reader.fieldnames
        dup = sorted({c for c in names if c and names.count(c) > 1})
        if dup:
            raise ValueError(f"{path.name}:1: header names column(s) {dup} more than once")
        reader.fieldnames = [c or (_UNNAMED, i + 1) for i, c in enumerate(names)]
        unnamed = [c for c in reader.fieldnames if isinstance(c, tuple)]
        start = reader.line_num + 1
        for number, row in enumerate(reader, 1):
            where = f"{path.name}:{start} (record {number})"
            if None in row:
                raise ValueError(f"{where}: more cells than header columns")
            if _MISSING in row.values():  # as an extra cell is: a misread row, not empty cells
                n = sum(v is not _MISSING for v in row.values())
                raise ValueError(f"{where}: fewer cells than header columns ({n} of {len(row)})")
            for key in unnamed:
                if row.pop(key).strip():
                    raise ValueError(f"{where}: a value in column {key[1]}, which the header leaves unnamed")
            obj = dict(row)
            yield _to_record(obj, number, where, id_field, text_fields, cells=True)
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path.name}:{start}: invalid {kind} ({_csv_problem(str(e))})") from None


def _csv_problem(message: str) -> str:
    """The csv module's message, said in terms of the file."""
    if "unexpected end of data" in message:
        return "a quote opened in this record is never closed"
    if "expected after" in message:
        return 'a field that starts with a double quote must be quoted as a whole, inner quotes doubled ("")'
    if "new-line character seen in unquoted field" in message:
        return _BARE_CR
    return message


def read_folder(path: str | Path) -> Iterator[Record]:
    """Every .txt/.md file under ``path`` (recursive, sorted); id = POSIX path relative to ``path``."""
    path = Path(path)
    for file in _folder_files(path):
        rel = file.relative_to(path).as_posix()
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8-sig")  # a BOM is not text (as in JSONL and CSV)
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(
                f"{rel}:{line}: not UTF-8 text ({e.reason}: byte 0x{raw[e.start]:02x}, byte {e.start} of the file)"
            ) from None
        text = text.replace("\r\n", "\n").replace("\r", "\n").strip()  # as read_text's universal newlines
        yield _checked(Record(id=rel, text=text, metadata={"path": rel}), rel)


def check_source(records: Iterable[Record], batch_size: int, where: str = "source") -> int:
    """Read every record (and batch) to the end, keeping none; returns how many there are.

    The first pass of ``m3search index``: any error it raises would have stopped the
    write pass part-way, so running it first means an error leaves the collection as it was.
    Ids are checked across the whole source (the write pass sees one batch at a time, where a
    repeated id would silently replace the first document). ``where``: what the error names them in.
    """
    seen: set[str] = set()
    n = 0
    for batch in iter_batches(records, batch_size, where):
        _check_unique(batch, seen, where)
        n += len(batch)
    return n


def iter_batches(records: Iterable[Record], size: int, where: str = "source") -> Iterator[list[Record]]:
    """Group records into lists of ``size`` (the last may be shorter); duplicate ids in one batch are an error
    naming ``where``."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch: list[Record] = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            _check_unique(batch, where=where)
            yield batch
            batch = []
    if batch:
        _check_unique(batch, where=where)
        yield batch


def _check_unique(batch: list[Record], seen: set[str] | None = None, where: str = "source") -> None:
    """Duplicate ids in ``batch``, or between it and the ids in ``seen`` (which it then joins), are an error."""
    seen = set() if seen is None else seen
    dups = {r.id for r in batch if r.id in seen or seen.add(r.id)}
    if dups:
        raise ValueError(f"duplicate ids in {where}: {sorted(dups)[:10]}")


def _folder_files(path: Path) -> Iterator[Path]:
    files = (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
    yield from sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _to_record(
    obj: dict[str, Any],
    number: int,
    where: str,
    id_field: str | None,
    text_fields: Sequence[str] | None,
    cells: bool = False,
    metadata: bool = True,
) -> Record:
    # id
    if id_field is not None:
        if id_field not in obj:
            raise ValueError(f"{where}: id field {id_field!r} missing (fields: {sorted(obj)})")
        id_key: str | None = id_field
    else:
        id_key = next((k for k in _DEFAULT_ID_FIELDS if k in obj), None)
    if id_key is not None:
        raw_id = obj[id_key]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or raw_id == "":
            raise ValueError(f"{where}: id field {id_key!r} must be a non-empty string or integer, got {raw_id!r}")
        doc_id = str(raw_id)
    else:
        doc_id = str(number)
    # text
    if text_fields:
        missing = [k for k in text_fields if k not in obj]
        if missing:
            raise ValueError(f"{where}: text field(s) {missing} missing (fields: {sorted(obj)})")
        keys = list(text_fields)
    else:
        keys = [k for k in _DEFAULT_TEXT_FIELDS if k in obj]
        if "text" not in keys:
            raise ValueError(f"{where}: no 'text' field (fields: {sorted(obj)}); name one with --text-field")
    parts = []
    for k in keys:
        v = obj[k]
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise ValueError(f"{where}: text field {k!r} must be a string, got {type(v).__name__}")
        parts.append(v)
    text = " ".join(parts).strip()
    # metadata: everything else
    used = set(keys) | ({id_key} if id_key else set())
    meta: dict[str, Any] = {}
    for k, v in obj.items():
        if k in used or not metadata:
            continue
        if k == "metadata" and isinstance(v, dict):
            if twice := sorted(
                set(v) & (set(obj) - used - {"metadata"})
            ):  # else one of the two values was dropped, silently
                raise ValueError(f"{where}: field(s) {twice} given both at the top level and in 'metadata'")
            meta.update(v)
        else:
            meta[k] = _parse_number(v) if cells else v
    return _checked(Record(id=doc_id, text=text, metadata=meta), where)


def _checked(rec: Record, where: str) -> Record:
    """``rec`` if the collection will take it; else ValueError/TypeError prefixed with ``where``."""
    from m3search.collection import _check_metadata
    from m3search.plan import check_text

    try:
        check_text(rec.id, "id")
        check_text(rec.text, f"text of document {rec.id!r}")
        rec.metadata = _check_metadata([rec.metadata], 1, [rec.id])[0]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return rec


def _parse_number(value: str) -> Any:
    """'42' -> 42, '3.5' -> 3.5; anything else (incl. '007', '1e3x', integers beyond int64, decimals beyond
    float's range such as '1.0e999') stays a string."""
    if _INT_RE.fullmatch(value) and INT64_MIN <= (n := int(value)) <= INT64_MAX:  # else a code (ISBN, ...): text
        return n
    if _FLOAT_RE.fullmatch(value) and math.isfinite(x := float(value)):  # inf is not storable: text, as above
        return x
    return value
