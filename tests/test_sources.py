"""Source readers: JSONL (BEIR corpus as is), CSV/TSV, folders; clear errors on bad input."""

from __future__ import annotations

import io
import json
import os
import re

import pytest

from m3search.sources import Record, check_source, count_records, iter_batches, read_source


def test_beir_corpus_jsonl_reads_as_is(shared_data):
    path = shared_data / "cranfield" / "corpus.jsonl"
    records = list(read_source(path))
    assert len(records) == 1400 == count_records(path)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert records[0].id == first["_id"] == "1"
    assert records[0].text == (first["title"] + " " + first["text"]).strip()
    assert "_id" not in records[0].metadata and "title" not in records[0].metadata
    # docs 471 and 995 are empty in cranfield: still valid records with empty text
    empty = {r.id for r in records if r.text == ""}
    assert {"471", "995"} <= empty


def test_jsonl_fields_and_metadata(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text(
        '{"id": 7, "body": "hello", "year": 2020, "metadata": {"lang": "en"}}\n'
        "\n"
        '{"id": "b", "body": "  world ", "year": 2021}\n',
        encoding="utf-8",
    )
    recs = list(read_source(p, text_fields=["body"]))
    assert recs == [
        Record("7", "hello", {"year": 2020, "lang": "en"}),
        Record("b", "world", {"year": 2021}),
    ]
    # custom id field; missing text field named in the error
    with pytest.raises(ValueError, match="no 'text' field.*--text-field"):
        list(read_source(p))
    with pytest.raises(ValueError, match=r"id field 'key' missing"):
        list(read_source(p, id_field="key", text_fields=["body"]))


def test_a_field_given_twice_is_refused_not_one_value_dropped(tmp_path):
    """A top-level field also in the record's "metadata" object: the later of the two in the record was kept,
    the other dropped without a word."""
    p = tmp_path / "docs.jsonl"
    p.write_text(
        '{"id": "a", "text": "t", "metadata": {"lang": "en"}}\n{"id": "b", "text": "t", "year": 1, "metadata": {"year": 2}}\n'
    )
    with pytest.raises(
        ValueError, match=r"docs.jsonl:2: field\(s\) \['year'\] given both at the top level and in 'metadata'"
    ):
        list(read_source(p))
    p.write_text('{"id": "a", "text": "t", "metadata": {"id": "x", "text": "y", "metadata": 1}}\n')  # no clash
    assert list(read_source(p)) == [Record("a", "t", {"id": "x", "text": "y", "metadata": 1})]


def test_jsonl_without_ids_numbers_records(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [r.id for r in read_source(p)] == ["1", "2"]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "a"}\n{"text": \n', r"x.jsonl:2: invalid JSON"),
        # an error at a line's end said column 1 (the line was parsed with its line break)
        ('{"_id": "b", "text": "y"\r\n', r"x.jsonl:1: invalid JSON \(Expecting ',' delimiter at column 25\)"),
        ('{"text": "a"}\n["a"]\n', r"x.jsonl:2: expected a JSON object, got list"),
        # a pretty-printed .json array said "invalid JSON (Expecting value at column 1)"
        ('[\n  {"text": "a"}\n]\n', r"^x.jsonl:1: expected JSON Lines \(one object per line\), not a JSON array$"),
        ('[{"text": "a"}]\n', r"^x.jsonl:1: expected JSON Lines \(one object per line\), not a JSON array$"),
        ('{"id": "", "text": "a"}\n', "non-empty"),
        ('{"id": "a", "text": 5}\n', "must be a string"),
    ],
)
def test_jsonl_bad_input(tmp_path, content, match):
    p = tmp_path / "x.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        list(read_source(p))


def test_csv_and_tsv(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('id,title,text,price,zip\nA1,Pump,"a 3.50 pump, red",3.5,007\nA2,,plain,12,10\n', encoding="utf-8")
    recs = list(read_source(c))
    assert recs[0] == Record("A1", "Pump a 3.50 pump, red", {"price": 3.5, "zip": "007"})
    assert recs[1] == Record("A2", "plain", {"price": 12, "zip": 10})
    t = tmp_path / "d.tsv"
    t.write_text("doc\tcontent\nx\thello world\n", encoding="utf-8")
    assert list(read_source(t, id_field="doc", text_fields=["content"])) == [Record("x", "hello world", {})]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,a,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match="more cells"):
        list(read_source(bad))


def test_folder_ids_are_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# Title\nbody\n", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("nested text", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    recs = list(read_source(tmp_path))
    assert [r.id for r in recs] == ["b.md", "sub/a.txt"]
    assert recs[0].text == "# Title\nbody" and recs[1].metadata == {"path": "sub/a.txt"}
    assert count_records(tmp_path) == 2
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:1: not UTF-8 text .*byte 0xe9, byte 3 of the file"):
        list(read_source(tmp_path))


def test_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_source(tmp_path / "nope.jsonl")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown file type"):
        read_source(tmp_path / "x.parquet")


def test_a_beir_folder_is_refused_naming_its_corpus(tmp_path):
    """A BEIR folder given as a folder source indexed only its README.md and reported success."""
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    (tmp_path / "README.md").write_text("about this data set")
    corpus = str(tmp_path / "corpus.jsonl")
    with pytest.raises(ValueError, match=f"is a BEIR folder \\(it holds corpus.jsonl\\): pass '{corpus}'"):
        read_source(tmp_path)
    assert [r.id for r in read_source(corpus)] == ["d1"]


def test_batches_and_duplicates():
    recs = [Record(str(i), "t") for i in range(5)]
    assert [len(b) for b in iter_batches(recs, 2)] == [2, 2, 1]
    with pytest.raises(ValueError, match=r"duplicate ids.*'1'"):
        list(iter_batches([Record("1", "a"), Record("1", "b")], 10))


# ---------------------------------------------------------------- messages name the place (issue 12)


def test_bad_byte_names_file_line_and_offset(tmp_path):
    p = tmp_path / "c.jsonl"
    good = '{"_id": "%d", "text": "t"}\n'
    body = "".join(good % i for i in range(1, 280)).encode()
    p.write_bytes(body + b'{"_id": "280", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError) as exc:
        list(read_source(p))
    msg = str(exc.value)
    assert msg.startswith("c.jsonl:280: not UTF-8 text") and "0xe9" in msg
    assert f"column 28, byte {len(body) + 27} of the file" in msg


def test_bad_byte_in_csv_names_line(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(b'id,text\n1,"two\nlines"\n2,caf\xe9\n')
    with pytest.raises(ValueError, match=r"c.csv:4: not UTF-8"):
        list(read_source(p))


def test_csv_record_errors_name_the_physical_line(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('id,text\n1,"two\nlines"\n2,a,extra\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.csv:4 \(record 2\): more cells"):
        list(read_source(p))


def test_lone_surrogate_names_line_and_document(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "x\\ud800y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:2: text of document 'b': not valid Unicode.*character 1"):
        list(read_source(p))
    p.write_text('{"_id": "a", "text": "ok", "tag": "\\udfff"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:1: metadata of document 'a'.tag: not valid Unicode"):
        list(read_source(p))


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"_id": "a", "text": "t", "n": 18446744073709551616}', "metadata of document 'a'.n: integer out of range"),
        ('{"_id": "a", "text": "t", "m": {"k": [1, -9223372036854775809]}}', "'a'.m.k[1]: integer out of range"),
        ('{"_id": "a", "text": "t", "n": ' + "9" * 5000 + "}", "invalid JSON"),
        ('{"_id": "a", "text": "t", "n": NaN}', "is not a JSON number"),
        ("[" * 100000, "invalid JSON"),
    ],
)
def test_unstorable_values_are_refused_with_their_field(tmp_path, line, words):
    p = tmp_path / "c.jsonl"
    p.write_text('{"_id": "ok", "text": "t"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as exc:
        list(read_source(p))
    assert str(exc.value).startswith("c.jsonl:2: ") and words in str(exc.value)


def test_int64_edges_are_kept(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"_id": "a", "text": "t", "lo": -9223372036854775808, "hi": 9223372036854775807}\n')
    assert list(read_source(p))[0].metadata == {"lo": -(2**63), "hi": 2**63 - 1}


def test_check_source_reads_to_the_end_without_keeping(tmp_path):
    from m3search.sources import check_source

    p = tmp_path / "c.jsonl"
    p.write_text("".join(f'{{"_id": "{i}", "text": "t"}}\n' for i in range(7)))
    assert check_source(read_source(p), 3) == 7
    p.write_text(p.read_text() + '{"_id": \n')
    with pytest.raises(ValueError, match="c.jsonl:8: invalid JSON"):
        check_source(read_source(p), 3)


def test_jsonl_with_bare_carriage_returns_says_so(tmp_path):
    """Classic Mac line endings made the whole file one line: the error was 'Extra data at column 26'."""
    p = tmp_path / "f.jsonl"
    p.write_text('{"id": "x", "text": "t"}\r{"id": "y", "text": "u"}\r', newline="")
    with pytest.raises(ValueError, match=r"^f.jsonl:1: invalid JSON Lines \(lines end with a bare carriage return"):
        list(read_source(p))
    p.write_text('{"id": "x", "text": "t"}\r\n{"id": "y", "text": "u"}\r\n', newline="")  # CRLF is fine
    assert [r.id for r in read_source(p)] == ["x", "y"]


@pytest.mark.parametrize(
    "name, content, match",
    [  # read leniently, the first swallowed every later record; the second dropped the quotes from the text
        ("q.tsv", 'id\ttext\n1\t"To be or not to be\n2\tsecond\n3\tthird\n', r"q.tsv:2: .*quote .* never closed"),
        ("q.csv", 'id,text\n1,ok\n2,"To be\n3,third\n', r"q.csv:3: .*never closed"),
        ("s.tsv", 'id\ttext\n1\t"Hello," she said\n', r"s.tsv:2: .*quoted as a whole"),
        ("cr.csv", "id,text\r1,a\r2,b\r", r"cr.csv:1: .*bare carriage return"),
        ("dh.csv", "id,text,text\n1,a,b\n", r"dh.csv:1: header names column\(s\) \['text'\] more than once"),
        (
            "un.csv",
            "id,text,\n1,a,\n2,b,x\n",
            r"^un.csv:3 \(record 2\): a value in column 3, which the header leaves unnamed$",
        ),
        # a short row was padded with empty cells (a long one is an error): both are misread rows
        (
            "sh.csv",
            "id,text,price\n1,a,3\n2,b\n",
            r"^sh.csv:3 \(record 2\): fewer cells than header columns \(2 of 3\)$",
        ),
        ("sh.tsv", "id\ttext\tprice\n1\ta\n", r"^sh.tsv:2 \(record 1\): fewer cells than header columns \(2 of 3\)$"),
    ],
)
def test_tables_refuse_what_they_would_misread(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8", newline="")
    with pytest.raises(ValueError, match=match):
        list(read_source(p))


def test_well_quoted_cells_still_read(tmp_path):
    p = tmp_path / "ok.csv"
    p.write_text('id,text\n1,"a, ""quoted"" line\nand the next"\n2,plain\n', encoding="utf-8")
    assert [(r.id, r.text) for r in read_source(p)] == [("1", 'a, "quoted" line\nand the next'), ("2", "plain")]


def test_integers_beyond_int64_in_cells_stay_text(tmp_path):
    """A 24-digit code (ISBN-like) refused the whole file as an out-of-range integer."""
    p = tmp_path / "isbn.csv"
    p.write_text("id,text,code,n\n1,a,978014300723400000000000,9223372036854775807\n", encoding="utf-8")
    (rec,) = read_source(p)
    assert rec.metadata == {"code": "978014300723400000000000", "n": 9223372036854775807}


def test_decimals_beyond_float_range_in_cells_stay_text(tmp_path):
    """'1.0e999' became inf, which no collection stores: the whole source was refused."""
    p = tmp_path / "big.csv"
    p.write_text("id,text,x,y\n1,a,1.0e999,-2.5e308\n2,b,1.5e3,0.25\n", encoding="utf-8")
    assert [r.metadata for r in read_source(p)] == [{"x": "1.0e999", "y": "-2.5e308"}, {"x": 1500.0, "y": 0.25}]


def test_folder_files_lose_their_bom(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello bom")
    assert [r.text for r in read_source(tmp_path)] == ["hello bom"]


def test_check_source_finds_duplicates_across_batches(tmp_path):
    """The write pass checks one batch at a time: a repeat in a later batch silently replaced the first."""
    p = tmp_path / "dup.jsonl"
    rows = [{"id": f"d{i}", "text": "x"} for i in range(5)] + [{"id": "d0", "text": "replacement"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for size in (2, 3, 100):
        with pytest.raises(ValueError, match=r"duplicate ids in source: \['d0'\]"):
            check_source(read_source(p), size)


@pytest.mark.parametrize("name, sep", [("long.csv", ","), ("long.tsv", "\t")])
def test_table_cells_longer_than_the_csv_default_limit_are_read(tmp_path, name, sep):
    """A cell over 131072 characters (the csv module's default field limit) was refused; JSONL took the same text."""
    import csv

    default = csv.field_size_limit(131072)  # as a fresh process starts
    try:
        text = "word " * 40000  # 200,000 characters
        path = tmp_path / name
        path.write_text(f"id{sep}text\n1{sep}{text}\n")
        [rec] = list(read_source(path))
        assert rec.id == "1" and rec.text == text.strip()
    finally:
        csv.field_size_limit(max(default, csv.field_size_limit()))


# ---------------------------------------------------------------- gzip-compressed sources


def _outcome(path) -> tuple[str, object]:
    """What reading and checking ``path`` to its end gives (as `m3search index` does): its records, or the error."""
    try:
        check_source(read_source(path), 2)
        return "records", list(read_source(path))
    except ValueError as e:
        return "error", str(e)


_PLAIN_SOURCES = [
    ("x.jsonl", b'\xef\xbb\xbf{"_id": "a", "text": "t"}\r\n\n{"id": 7, "text": "u", "year": 2020}\n'),
    ("x.ndjson", b'{"text": "a"}\n{"text": "b"}\n'),
    ("x.jsonl", b'{"_id": "a", "text": "t"}\n{"_id": "b", "text": "caf\xe9"}\n'),  # not UTF-8 at line 2
    ("x.jsonl", b'{"id": "x", "text": "t"}\r{"id": "y", "text": "u"}\r'),  # bare CR
    ("x.jsonl", b'{"text": "a"}\n\n{"text": \n'),  # invalid JSON at line 3
    ("x.jsonl", b'{"_id": "a", "text": "t"}\n{"_id": "a", "text": "u"}\n'),  # a repeated id (check_source)
    ("x.csv", b'id,text,price\nA1,"two\nlines",3.5\nA2,plain,007\n'),
    ("x.csv", b'id,text\n1,"two\nlines"\n2,caf\xe9\n'),  # not UTF-8 at line 4
    ("x.csv", b'id,text\n1,ok\n2,"To be\n3,third\n'),  # a quote never closed, from line 3
    ("x.TSV", b"id\ttext\r\nx\thello world\r\n"),
    ("x.tsv", b"id\ttext\tprice\n1\ta\n"),  # fewer cells
]


@pytest.mark.parametrize("name, content", _PLAIN_SOURCES)
def test_a_gzipped_source_reads_as_the_plain_file(tmp_path, name, content):
    """`m3search index corpus.jsonl.gz` said "unknown file type '.gz'". Now a .gz reads as the file named without
    it: the same records and ids, or the same error at the same line (naming the .gz)."""
    import gzip

    plain, packed = tmp_path / name, tmp_path / f"{name}.gz"
    plain.write_bytes(content)
    packed.write_bytes(gzip.compress(content))
    want = _outcome(plain)
    got = _outcome(packed)
    if want[0] == "error":
        want = ("error", want[1].replace(name, packed.name))
    assert got == want
    assert count_records(packed) == count_records(plain)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) // 2], "Compressed file ended before the end-of-stream marker was reached"),
        (lambda b: b[:-4] + b"\0\0\0\0", "Incorrect length of data produced"),  # the trailer's length field
        (lambda b: b"not gzip at all\n", "Not a gzipped file"),
        (lambda b: b[:20] + bytes(40) + b[60:], ""),  # deflate data overwritten
    ],
)
def test_a_damaged_gzip_source_is_a_clear_error_naming_it(tmp_path, damage, reason):
    """gzip reports damage only when a read reaches it, as BadGzipFile / EOFError / zlib.error naming no file;
    check_source must meet it before `m3search index` writes anything."""
    import gzip

    from m3search.errors import SourceError

    body = "".join(f'{{"_id": "{i}", "text": "word {i}"}}\n' for i in range(400)).encode()
    p = tmp_path / "corpus.jsonl.gz"
    p.write_bytes(damage(gzip.compress(body)))
    with pytest.raises(SourceError, match=rf"^corpus.jsonl.gz: not a valid gzip file \(.*{reason}"):
        check_source(read_source(p), 50)


def test_locate_takes_the_plain_or_the_compressed_file_and_refuses_both(tmp_path):
    from m3search.errors import SourceError
    from m3search.sources import locate

    assert locate(tmp_path, "corpus.jsonl") is None
    (tmp_path / "corpus.jsonl.gz").write_bytes(b"")
    assert locate(tmp_path, "corpus.jsonl") == tmp_path / "corpus.jsonl.gz"
    (tmp_path / "corpus.jsonl").write_bytes(b"")
    with pytest.raises(SourceError, match="holds both corpus.jsonl and corpus.jsonl.gz: remove one"):
        locate(tmp_path, "corpus.jsonl")
    (tmp_path / "corpus.jsonl.gz").unlink()
    assert locate(tmp_path, "corpus.jsonl") == tmp_path / "corpus.jsonl"


def test_a_beir_folder_with_a_gzipped_corpus_is_refused_naming_it(tmp_path):
    (tmp_path / "corpus.jsonl.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a BEIR folder \(it holds corpus.jsonl.gz\): pass '.*corpus.jsonl.gz'"):
        read_source(tmp_path)
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown file type '.parquet.gz' \(expected .jsonl, .csv, .tsv, each"):
        read_source(tmp_path / "x.parquet.gz")


# ---------------------------------------------------------------- query files (search --queries)


def test_query_files_are_text_lines_or_beir_queries(tmp_path):
    """`search --queries` reads a .txt file (one query per line, id = its line number, blank lines skipped) or
    BEIR's queries.jsonl (``_id`` or ``id``, ``text``; also its folder), each optionally .gz, as the corpus readers
    do (a BOM skipped)."""
    import gzip

    from m3search.sources import read_queries

    (tmp_path / "q.txt").write_bytes(b"\xef\xbb\xbfwing flutter\n\n  heat transfer \r\nshells\n")
    assert [(r.id, r.text) for r in read_queries(tmp_path / "q.txt")] == [
        ("1", "wing flutter"),
        ("3", "heat transfer"),
        ("4", "shells"),
    ]
    (tmp_path / "q.txt.gz").write_bytes(gzip.compress(b"a\n\nb\n"))
    assert [(r.id, r.text) for r in read_queries(tmp_path / "q.txt.gz")] == [("1", "a"), ("3", "b")]
    beir = tmp_path / "beir"
    beir.mkdir()
    lines = '{"_id": "q1", "text": "wing flutter", "metadata": {"x": 1}}\n\n{"id": 7, "text": "shells"}\n'
    (beir / "queries.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    for path in (beir, beir / "queries.jsonl.gz"):
        got = list(read_queries(path))
        assert [(r.id, r.text, r.metadata) for r in got] == [("q1", "wing flutter", {}), ("7", "shells", {})]


@pytest.mark.parametrize(
    "name, content, match",
    [
        (
            "q.jsonl",
            b'{"_id": "q1", "text": "a"}\n\n{"_id": "q2", "text": " "}\n',
            "q.jsonl:3: query 'q2': query is empty",
        ),
        ("q.jsonl", b'{"_id": "q1", "text": null}\n', "q.jsonl:1: query 'q1': query is empty"),
        ("q.jsonl", b'{"_id": "q1", "title": "a"}\n', r"q.jsonl:1: text field\(s\) \['text'\] missing"),
        ("q.txt", b"a\n\xff\n", "q.txt:2: not UTF-8 text"),
        ("q.csv", b"id,text\n1,a\n", r"unknown file type '.csv' \(expected .txt"),
        ("none", None, "holds queries.jsonl"),
    ],
)
def test_query_file_errors_name_their_place(tmp_path, name, content, match):
    """An empty query is refused as a search refuses it, naming its line and id (before any search)."""
    from m3search.sources import read_queries

    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        list(read_queries(path))


class _Terminal(io.RawIOBase):
    """Standard input from a terminal: each Ctrl-D ends one read (it returns b"") and the next read waits for more
    typing (here: fails the test)."""

    def __init__(self, *lines: bytes) -> None:
        self.reads = [*lines, b""]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        assert self.reads, "read on after the Ctrl-D: the user must press it again"
        data = self.reads.pop(0)
        buffer[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("lines", [[b"wing\n"], [b"w", b"ing\n", b"flow\n"], [b"\n"], []])
def test_standard_input_from_a_terminal_ends_at_one_ctrl_d(lines):
    """spooled read standard input with read(n), which reads on after a read that returned nothing: a terminal's
    Ctrl-D ends one read only, so `m3search index -` typed into waited for a second Ctrl-D. It reads once per chunk."""
    from m3search.sources import QUERY_FORMATS, spooled

    with spooled(io.BufferedReader(_Terminal(*lines)), "txt", QUERY_FORMATS) as path:
        assert path.read_bytes() == b"".join(lines)


def test_a_full_temporary_folder_is_named(tmp_path, monkeypatch):
    """A full $TMPDIR said only "[Errno 28] No space left on device", not that standard input is copied there."""
    import builtins
    import tempfile

    from m3search import sources
    from m3search.errors import SourceError

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (a device whose writes fail with ENOSPC) here")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sources, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    why = rf"standard input could not be copied to {re.escape(str(tmp_path))} \(No space left on device\).*set TMPDIR"
    with pytest.raises(SourceError, match=why):
        with sources.spooled(io.BytesIO(b'{"_id": "a", "text": "x"}\n' * 100_000), "jsonl"):
            pass
    assert list(tmp_path.iterdir()) == []  # the copy's folder is removed


def test_columns_the_header_leaves_unnamed_are_not_metadata(tmp_path):
    """A trailing delimiter (spreadsheets export one) stored the metadata key "" in every record; two of them were
    refused as the header naming '' twice."""
    p = tmp_path / "t.csv"
    p.write_text("id,text,kind,,\n1,a,x,,\n2,b,y, ,\n", encoding="utf-8")
    assert [(r.id, r.text, r.metadata) for r in read_source(p)] == [
        ("1", "a", {"kind": "x"}),
        ("2", "b", {"kind": "y"}),
    ]
