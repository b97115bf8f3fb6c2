"""Documents of several windows, on every engine: Qdrant Edge, qdrant-client local mode, Milvus Lite.

The corpus holds documents of 1, 2 and 3 windows of 16 tokens (stride 12) of the tiny
model. A document's score in each mode must be the maximum of the oracle scores of its
windows (each window encoded on its own), every write that changes a document's number of
windows must leave no orphan window (the raw point count and exact searches prove it),
and a kill -9 during such a write leaves the old or the new document whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from helpers import ENGINES, EXACT_TOL, exact, location

from m3search.collection import Collection
from m3search.engines.shapes import PointBatch
from m3search.plan import MODES
from m3search.scoring import colbert_scores, dense_scores, lexical_scores
from m3search.testing import BUILTIN_TEXTS

WINDOW, STRIDE = 16, 12


def n_windows(encoder, text: str) -> int:
    return len(encoder.encode_windows([text], window=WINDOW, stride=STRIDE).doc)


@pytest.fixture(scope="module")
def corpus(tiny_encoder):
    """30 documents: 10 each of 1, 2 and 3 windows; 4 queries."""
    rng = np.random.default_rng(3)
    words = " ".join(BUILTIN_TEXTS).split()
    buckets: dict[int, list[str]] = {1: [], 2: [], 3: []}
    while any(len(b) < 10 for b in buckets.values()):
        t = " ".join(rng.choice(words, size=int(rng.integers(3, 36))))
        b = buckets.get(n_windows(tiny_encoder, t))
        if b is not None and len(b) < 10:
            b.append(t)
    texts = buckets[1] + buckets[2] + buckets[3]  # documents 0-9: one window, 10-19: two, 20-29: three
    ids = [f"d{i:02d}" for i in range(len(texts))]
    meta = [{"i": i, "even": i % 2 == 0} for i in range(len(texts))]
    queries = [" ".join(rng.choice(words, size=int(rng.integers(2, 7)))) for _ in range(4)]
    win = tiny_encoder.encode_windows(texts, window=WINDOW, stride=STRIDE)
    qemb = tiny_encoder.encode(queries, max_length=512)
    e = win.embeddings
    per_window = {
        "dense": dense_scores(qemb.dense, e.dense),
        "sparse": lexical_scores(qemb.sparse, e.sparse),
        "colbert": colbert_scores(qemb.colbert, qemb.colbert_offsets, e.colbert, e.colbert_offsets),
    }
    oracle = {
        m: np.stack([s[:, win.doc == d].max(axis=1) for d in range(len(texts))], 1) for m, s in per_window.items()
    }
    # ColBERT over the whole document: MaxSim against the tokens of all its windows at once
    tokens = [
        np.concatenate(
            [e.colbert[e.colbert_offsets[r] : e.colbert_offsets[r + 1]] for r in np.flatnonzero(win.doc == d)]
        )
        for d in range(len(texts))
    ]
    doc_offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
    oracle["colbert_document"] = colbert_scores(qemb.colbert, qemb.colbert_offsets, np.concatenate(tokens), doc_offsets)
    return texts, ids, meta, queries, qemb, win, per_window, oracle


def create(engine, folder, encoder, **settings):
    return Collection.create(
        location(engine, folder), model=encoder, colbert_dtype="float32", window=WINDOW, stride=STRIDE, **settings
    )


def raw_points(col) -> int:
    """Every stored point, or Milvus row (windows and tombstones alike)."""
    eng = col.engine
    if eng.name == "milvus":
        return int(eng.client.query(eng.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])
    return eng._count(None, docs_only=False)


def pending(col) -> list[str]:
    """The ids of the long writes the stored manifest records as under way."""
    return [m["id"] for m in col.engine.read_manifest()["pending"]]


def vector_points(col, doc_id: str) -> int:
    """Points (Milvus: rows) of ``doc_id`` that a vector query can return (an exact scan over everything)."""
    probe = np.ones(col.schema.dense_dim, np.float32)
    eng = col.engine
    if eng.name == "milvus":  # the engine's own search restriction, without its grouping by document
        hits = eng.client.search(
            eng.collection,
            data=[probe],
            anns_field="dense",
            limit=10_000,
            filter=eng._where("", "live"),
            output_fields=["doc_id"],
            search_params={"metric_type": "IP"},
        )[0]
        return sum(1 for h in hits if h["entity"]["doc_id"] == doc_id)
    hits = eng._nearest("dense", [probe], 10_000, None, True)[0]
    return sum(1 for p in hits if p.payload["id"] == doc_id)


@contextlib.contextmanager
def two_clients(engine, folder, encoder, texts):
    """``[A, B]``: A made the collection and wrote two one-window documents (s1, s2), then B opened it. A test
    may append more clients; all are closed at the end."""
    opened = [create(engine, folder, encoder)]
    try:
        opened[0].add(texts[:2], ids=["s1", "s2"])
        opened.append(Collection.open(location(engine, folder), model=encoder))
        yield opened
    finally:
        for col in opened:
            col.close()


def one_window_pieces(monkeypatch, encoder) -> None:
    """Long writes in pieces of ~one window (20 tokens of ColBERT output): a few windows make many pieces."""
    monkeypatch.setattr("m3search.collection.PIECE_BYTES", 20 * 4 * encoder.colbert_dim)


def stop_long_writes(monkeypatch, col, pieces: int = 2, error: BaseException | None = None):
    """``col``'s long writes stop after ``pieces`` pieces (2: window 1 written, the head, last, not), raising
    ``error`` (default KeyboardInterrupt: a crash, as far as the write can tell). Returns the real method."""
    real = col.engine.upsert_long

    def stops(parts, **kw):
        def some():
            it = iter(parts)
            for _ in range(pieces):
                yield next(it)
            raise error or KeyboardInterrupt("stopped")

        real(some(), **kw)

    monkeypatch.setattr(col.engine, "upsert_long", stops)
    return real


@contextlib.contextmanager
def a_stopped_long_write(engine, folder, encoder, texts, monkeypatch, aged: bool = False):
    """``(B, C)``: A made the collection, wrote s and stopped its long write of L with two pieces written (window 1;
    the head, last, not); B and C opened, then A closed (its mark is a dead writer's). ``aged``: A's mark is also
    older than the lease. Pieces are ~one window; all are closed at the end."""
    import m3search.collection as collection

    one_window_pieces(monkeypatch, encoder)
    opened = [create(engine, folder, encoder)]
    try:
        a = opened[0]
        a.add([texts[0]], ids=["s"])
        stop_long_writes(monkeypatch, a)
        with pytest.raises(KeyboardInterrupt):
            a.add([texts[29]], ids=["L"])
        if aged:
            manifest = a.engine.read_manifest()
            manifest["pending"] = [{**m, "at": m["at"] - collection.PENDING_LEASE_S - 1} for m in manifest["pending"]]
            a.engine.write_manifest(manifest)
        opened += [Collection.open(location(engine, folder), model=encoder) for _ in range(2)]
        a.close()
        yield opened[1], opened[2]
    finally:
        for col in opened:
            col.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_long_documents_score_as_their_best_window(tmp_path, tiny_encoder, corpus, engine):
    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    col = create(engine, tmp_path, tiny_encoder)
    try:
        col.add(texts, ids=ids, metadata=meta, batch_size=7)
        counts = np.bincount(win.doc)
        assert col.settings["max_windows"] is None  # every window, on every engine
        assert col.count() == len(texts) and raw_points(col) == counts.sum()
        assert col.count({"even": True}) == 15
        assert col.engine.window_counts(ids).tolist() == counts.tolist()
        recs = col.get(ids)
        assert [r.text for r in recs] == texts and [r.metadata for r in recs] == meta
        for mode in ("dense", "sparse", "colbert", "all"):
            hits = col.search_batch(
                queries, k=len(texts), mode=mode, candidates=len(texts), exact=True, query_embeddings=qemb
            )
            for qi, hs in enumerate(hits):
                if mode != "sparse":
                    assert len(hs) == len(texts)  # every document once, however many windows it has
                assert len({h.id for h in hs}) == len(hs)
                for h in hs:
                    j = ids.index(h.id)
                    for m in MODES:
                        assert h.scores[m] == exact(oracle[m][qi, j]), (mode, m, h.id)
                    # the best window: the one whose (weighted) scores are highest, with its span
                    rows = np.flatnonzero(win.doc == j)
                    if mode == "all":
                        w = col.settings["weights"]
                        total = sum(wt * per_window[m][qi, rows] for wt, m in zip(w, MODES))
                    else:
                        total = per_window[mode][qi, rows]
                    best = rows[int(np.argmax(total))]
                    assert (h.window["start"], h.window["end"]) == tuple(win.spans[best]), (mode, h.id)
                    assert h.passage == texts[j][win.spans[best][0] : win.spans[best][1]]
                scores = [h.score for h in hs]
                assert scores == sorted(scores, reverse=True)
        # k documents come back even when the first windows listed belong to few documents
        assert len(col.search(queries[0], k=25, mode="dense")) == 25
        # the metadata filter acts on every window inside the first stage: k matching documents
        for mode in ("dense", "sparse", "all"):
            hs = col.search(queries[0], k=5, mode=mode, filter={"even": True}, exact=True)
            assert (len(hs) == 5 or mode == "sparse") and all(h.metadata["even"] for h in hs), mode
    finally:
        col.close()


def test_a_hit_s_best_window_depends_on_the_weights_ratios_only(tmp_path, tiny_encoder, corpus):
    """Weights of the smallest subnormal float (valid, and fused as their ratios: fusion divides them by their sum
    first) picked window 0 as every document's best: each score times 5e-324 rounded to a few steps of it, so the
    windows tied. The best window shown (``window``, ``explain["window"]``) is the one equal unit weights pick."""
    texts, ids, _, queries, qemb, *_ = corpus
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        col.add(texts, ids=ids)
        args = {"k": len(texts), "candidates": len(texts), "explain": True, "query_embeddings": qemb}
        unit = col.search_batch(queries, weights=(1, 1, 1), **args)
        scaled = col.search_batch(queries, weights=(5e-324,) * 3, **args)
        assert any(h.explain["window"] for hs in unit for h in hs)  # (a window past the first is best somewhere)
        for want, got in zip(unit, scaled):
            assert [(h.id, h.window, h.explain["window"]) for h in got] == [
                (h.id, h.window, h.explain["window"]) for h in want
            ]


@pytest.mark.parametrize("engine", ENGINES)
def test_rewrites_that_change_the_window_count_leave_no_orphan(tmp_path, tiny_encoder, corpus, engine):
    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    three = texts[20]  # 3 windows
    one = texts[0]  # 1 window
    assert n_windows(tiny_encoder, three) == 3 and n_windows(tiny_encoder, one) == 1
    col = create(engine, tmp_path, tiny_encoder)
    try:
        col.add([three, texts[10]], ids=["x", "y"])  # 3 + 2 windows
        assert raw_points(col) == 5 and vector_points(col, "x") == 3
        col.upsert([one], ids=["x"])  # 3 -> 1: two windows must go
        assert col.count() == 2 and raw_points(col) == 3 and vector_points(col, "x") == 1
        assert col.get("x")[0].text == one and col.get("x")[0].windows == 1
        col.update_metadata("y", {"tag": "t"})
        assert col.count({"tag": "t"}) == 1
        hit = {h.id: h for h in col.search(one, k=2, mode="all", exact=True)}["x"]
        want = tiny_encoder.encode([one])
        assert hit.scores["dense"] == exact(
            float(dense_scores(tiny_encoder.encode([one], max_length=512).dense, want.dense)[0, 0])
        )
        col.upsert([three], ids=["x"])  # 1 -> 3
        assert raw_points(col) == 5 and vector_points(col, "x") == 3 and col.get("x")[0].windows == 3
        col.delete(["x"])
        assert col.count() == 1 and raw_points(col) == 2 and vector_points(col, "x") == 0
        assert col.get("x") == [None]
        assert [h.id for h in col.search(three, k=5, mode="all")] == ["y"]
        assert col.get("y")[0].metadata == {"tag": "t"}
    finally:
        col.close()


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_second_client_sees_the_long_documents_of_another(tmp_path, tiny_encoder, corpus, engine):
    """Two clients of one server collection: A opened while every document was one window, B then stores
    a 3-window document. A's metadata update reaches every window, A scores it as B does, and A's
    delete leaves none of its windows (A used to trust the window bound it read at open: 1)."""
    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    a = create(engine, tmp_path, tiny_encoder)
    b = None
    try:
        a.add(texts[:2], ids=["s1", "s2"], metadata=[{"lang": "en"}] * 2)
        b = Collection.open(location(engine, tmp_path), model=tiny_encoder)
        b.add([texts[20]], ids=["x"], metadata=[{"lang": "en"}])
        a.set_search_defaults({"mode": "all", "fusion": "weighted", "weights": [1, 1, 1], "candidates": 50})
        assert a.engine.read_manifest()["max_windows_stored"] == 3  # not written back as the 1 A opened with
        q = texts[20]
        assert a.search(q, k=1)[0].scores == exact(b.search(q, k=1)[0].scores)
        assert a.search(q, k=1)[0].window == b.search(q, k=1)[0].window
        a.update_metadata(["x"], {"lang": "de"})
        assert b.count({"lang": "en"}) == 2 and [h.id for h in b.search(q, k=3, filter={"lang": "de"})] == ["x"]
        a.delete(["x"])
        assert vector_points(b, "x") == 0 and raw_points(b) == 2
        assert sorted(h.id for h in b.search(q, k=3, mode="dense")) == ["s1", "s2"]
    finally:
        a.close()
        if b is not None:
            b.close()


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_client_writes_only_its_own_manifest_keys(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """Two clients of one server collection. B, opened before A tuned the search defaults, raises the window
    bound: A's defaults and tuning record stay (B wrote its whole older copy back). A's long write stops
    part-way: B's long writes keep A's pending mark, and so does a client opened later while A's mark is
    within its lease (A may still be writing); once it is older, that client's next write clears A's stray
    windows."""
    import m3search.collection as collection

    texts, *_ = corpus
    with two_clients(engine, tmp_path, tiny_encoder, texts) as opened:
        a, b = opened
        tuned = {"mode": "dense", "fusion": "rrf", "weights": [1, 1, 1], "candidates": 50}
        a.set_search_defaults(tuned, tuning={"by": "a"})
        b.add([texts[20]], ids=["x"])  # b's first long document: b records the bound
        stored = a.engine.read_manifest()
        assert stored["settings"]["mode"] == "dense" and stored["tuning"] == {"by": "a"}
        assert stored["max_windows_stored"] == 3

        one_window_pieces(monkeypatch, tiny_encoder)
        real = stop_long_writes(monkeypatch, a, pieces=1)  # the first piece written, then killed
        with pytest.raises(KeyboardInterrupt):
            a.add([texts[29]], ids=["L"])
        monkeypatch.setattr(a.engine, "upsert_long", real)
        b.add([texts[28]], ids=["M"])  # another long write, by b
        assert pending(a) == ["L"]  # b kept a's mark
        assert vector_points(b, "L") > 0 and b.get("L") == [None]  # stray windows, no document
        c = Collection.open(location(engine, tmp_path), model=tiny_encoder)
        opened.append(c)
        with monkeypatch.context() as server:  # as on a server, where other processes write: the lease decides
            server.setattr(type(c.engine), "process_store", None)
            c.add([texts[0]], ids=["z"])
            assert pending(a) == ["L"] and vector_points(c, "L") > 0
            server.setattr(collection, "PENDING_LEASE_S", 0)  # a's mark is older than the lease now
            c.add([texts[1]], ids=["z2"])
            assert pending(a) == [] and vector_points(c, "L") == 0


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_info_shows_what_another_client_stored(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """Two clients of one server collection: after A tunes the search defaults and stores a 3-window document,
    B's info shows A's defaults and tuning, counts A's document and B holds the raised window bound, all from
    one manifest read (B's info showed the copy B read at open: the built-in defaults, no tuning)."""
    texts, *_ = corpus
    with two_clients(engine, tmp_path, tiny_encoder, texts) as (a, b):
        tuned = {"mode": "dense", "fusion": "rrf", "weights": [1.0, 1.0, 1.0], "candidates": 50}
        a.set_search_defaults(tuned, tuning={"by": "a"})
        a.add([texts[20]], ids=["x"])
        reads = []
        real = b.engine.read_manifest
        monkeypatch.setattr(b.engine, "read_manifest", lambda: reads.append(1) or real())
        info = b.info()
        assert {k: info["settings"].get(k) for k in tuned} == tuned and info["tuning"] == {"by": "a"}, info
        assert info["count"] == 3 and b.engine.max_windows == 3 and len(reads) == 1


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_raise_of_the_window_bound_survives_another_client_s_manifest_write(
    tmp_path, tiny_encoder, corpus, engine, monkeypatch
):
    """A reads the manifest (window bound 1) to change its search defaults; before A writes its copy back, B
    stores a 3-window document (bound 3). A's write puts the manifest's bound back to 1, yet a third client
    still reads 3: its hit names the window that matched best, and its delete of B's document leaves none of
    its windows (it used to name window 0, and on Qdrant delete window 0 only: search still found the others)."""
    texts, *_ = corpus
    with two_clients(engine, tmp_path, tiny_encoder, texts) as opened:
        a, b = opened
        real, raced = a.engine.write_manifest, []

        def late(manifest):  # A's copy was read before B's raise; it lands after it
            if not raced:
                raced.append(manifest["max_windows_stored"])
                b.add([texts[20]], ids=["x"])
            real(manifest)

        monkeypatch.setattr(a.engine, "write_manifest", late)
        a.set_search_defaults({"mode": "all", "fusion": "weighted", "weights": [1, 1, 1], "candidates": 50})
        assert raced == [1] and vector_points(b, "x") == 3
        c = Collection.open(location(engine, tmp_path), model=tiny_encoder)
        opened.append(c)
        q = " ".join(texts[20].split()[-8:])  # the end of x: its last window matches best
        best = b.search(q, k=1)[0]
        assert best.id == "x" and best.window["start"] > 0 and c.search(q, k=1)[0].window == best.window
        c.delete(["x"])
        assert c.count() == 2 and raw_points(c) == 2 and vector_points(c, "x") == 0
        assert sorted(h.id for h in c.search(texts[20], k=3, mode="dense", exact=True)) == ["s1", "s2"]
        assert c.settings["candidates"] == 50 and c.manifest["max_windows_stored"] == 3  # A's edit landed


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_window_bound_records_keep_the_largest(tmp_path, tiny_encoder, engine):
    """Raisers at once may land in any order: a raiser removes only the records below its own, so the largest
    stays; the manifest's own key is the floor, and a client opened later holds the largest bound."""
    from m3search.engines.base import bound_records

    col = create(engine, tmp_path, tiny_encoder)
    try:
        eng = col.engine
        for most in (2, 5, 3):  # 3: a raiser that read 2, landing after another's raise to 5
            eng.record_window_bound(most)
        names = (
            eng._metadata()
            if engine == "qdrant-local"
            else eng._manifest_rows(eng.client, eng.meta_collection, eng.timeout)
        )
        assert sorted(bound_records(names)) == [3, 5] and col.manifest["max_windows_stored"] == 1
        assert eng.read_manifest()["max_windows_stored"] == 5
        with Collection.open(location(engine, tmp_path), model=tiny_encoder) as other:
            assert other.engine.max_windows == 5
        eng.write_manifest({**col.manifest, "max_windows_stored": 7})
        assert eng.read_manifest()["max_windows_stored"] == 7
    finally:
        col.close()


def test_a_reader_never_finds_a_milvus_lite_manifest_missing(tmp_path, tiny_encoder, corpus, monkeypatch):
    """Milvus Lite applies an upsert as a delete, then an insert: a read by another handle of the process between
    the two found no manifest (its Collection then saw no pending marks, an edit wrote its whole held copy back,
    an open said "no m3search manifest"). Here the gap is held open until a read has run in it, or 2 s."""
    pytest.importorskip("pymilvus")
    texts, *_ = corpus
    with two_clients("milvus-lite", tmp_path, tiny_encoder, texts) as (a, b):
        client, real, seen, read, readers = a.engine.client, a.engine.client.upsert, [], threading.Event(), []

        def lite_upsert(coll, rows, **kw):  # Lite's two transactions, a reader let in between
            if coll != a.engine.meta_collection or readers:  # (the first manifest write only)
                return real(coll, rows, **kw)
            client.delete(coll, ids=[r["key"] for r in rows], **kw)
            readers.append(threading.Thread(target=lambda: (seen.append(b.engine.read_manifest()), read.set())))
            readers[0].start()
            read.wait(2)  # (the fixed code holds the reader until the insert is done)
            real(coll, rows, **kw)

        monkeypatch.setattr(client, "upsert", lite_upsert)
        a.set_search_defaults({"mode": "dense", "fusion": "weighted", "weights": [1, 1, 1], "candidates": 50})
        readers[0].join(60)
        assert seen and seen[0] is not None and seen[0]["settings"]["candidates"] == 50


_KILLED_DURING_A_LONG_WRITE = """
import os, signal, sys
import m3search.collection as collection
from m3search.collection import Collection

location, model, text = sys.argv[1:]
col = Collection.open(location, model=model, dtype="float32")
collection.PIECE_BYTES = 20 * 4 * col.schema.colbert_dim  # ~one window a piece
real = col.engine.upsert_long

def killed(pieces, **kw):
    def two():  # two pieces written (window 1; the head comes last), then kill -9
        it = iter(pieces)
        yield next(it)
        yield next(it)
        os.kill(os.getpid(), signal.SIGKILL)

    real(two(), **kw)

col.engine.upsert_long = killed
col.add([text], ids=["L"])
"""


@pytest.mark.parametrize("engine", ["qdrant-local", pytest.param("milvus-lite", marks=pytest.mark.heavy)])  # ~22 s
def test_a_long_write_killed_in_another_process_is_cleared_by_the_next_write(
    tmp_path, tiny_model_path, tiny_encoder, corpus, engine
):
    """Milvus Lite and local mode lock their storage against other processes, so a pending mark whose client
    is no open handle of this process is a dead writer's. A child killed (-9) part-way through a long write
    left windows without a head and its mark: the next open and write cleared them at once, not 6 hours
    (``PENDING_LEASE_S``) later, as on a server."""
    texts, *_ = corpus
    with create(engine, tmp_path, tiny_encoder) as a:
        a.add([texts[0]], ids=["s"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [location(engine, tmp_path), str(tiny_model_path), texts[29]]
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_DURING_A_LONG_WRITE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    with Collection.open(location(engine, tmp_path), model=tiny_encoder) as c:
        assert pending(c) == ["L"] and vector_points(c, "L") > 0 and c.get("L") == [None]  # the killed write's
        c.add([texts[1]], ids=["z"])
        assert pending(c) == [] and vector_points(c, "L") == 0
        assert c.count() == 2 and raw_points(c) == 2
        assert {h.id for h in c.search(texts[29], k=10, mode="all", exact=True)} == {"s", "z"}


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_live_handle_s_long_write_is_left_alone_in_its_process(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """Two handles of one Milvus Lite file or local-mode folder in one process: A's long write stopped part-way
    (A may yet write again, as if still under way). B's writes keep A's mark and windows however old the mark
    is; once A is closed, B's next write clears them."""
    import m3search.collection as collection

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    monkeypatch.setattr(collection, "PENDING_LEASE_S", 0)  # every mark older than the lease
    a = create(engine, tmp_path, tiny_encoder)
    b = None
    try:
        a.add([texts[0]], ids=["s"])
        stop_long_writes(monkeypatch, a)
        with pytest.raises(KeyboardInterrupt):
            a.add([texts[29]], ids=["L"])
        b = Collection.open(location(engine, tmp_path), model=tiny_encoder)
        left = vector_points(b, "L")
        b.add([texts[1]], ids=["t"])
        assert pending(b) == ["L"] and vector_points(b, "L") == left > 0
        a.close()
        b.add([texts[2]], ids=["u"])
        assert pending(b) == [] and vector_points(b, "L") == 0 and b.count() == 3
    finally:
        for col in (a, b):
            if col is not None:
                col.close()


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_client_opened_during_a_long_write_leaves_it_alone(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """Two clients of one server collection: B opens while A's long write is under way (its windows written
    so far have no head yet) and writes. B took A's pending mark for a crashed run's and removed those
    windows: A's document lost them. A's mark is live (its lease renewed): B leaves it alone."""

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    a = create(engine, tmp_path, tiny_encoder)
    b = None
    try:
        a.add([texts[0]], ids=["s"])
        real = a.engine.upsert_long

        def meanwhile(pieces, **kw):
            def two_then_b():  # a's first two pieces written (window 1; the head comes last), then b
                nonlocal b
                it = iter(pieces)
                yield next(it)
                yield next(it)
                b = Collection.open(location(engine, tmp_path), model=tiny_encoder)
                b.add([texts[1]], ids=["t"])
                yield from it

            real(two_then_b(), **kw)

        monkeypatch.setattr(a.engine, "upsert_long", meanwhile)
        a.add([texts[29]], ids=["L"])
        assert b is not None and a.get("L")[0].windows == 3
        assert [r.window for r in a.engine.get_windows(["L"])[0]] == [0, 1, 2] and vector_points(a, "L") == 3
        assert b.count() == 3 and pending(a) == []
    finally:
        for col in (a, b):
            if col is not None:
                col.close()


def test_each_pending_mark_is_judged_once_per_write(tmp_path, tiny_encoder, corpus, monkeypatch):
    """A write's recovery (``_clear_pending``) asked ``_stale`` twice about every pending mark, once to find
    the live ones and again for the stopped ones: once is enough, and one answer cannot disagree with itself."""

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    with create("qdrant-local", tmp_path, tiny_encoder) as a:
        stop_long_writes(monkeypatch, a)
        with pytest.raises(KeyboardInterrupt):
            a.add([texts[29]], ids=["L"])  # a's mark, live: a is open
        with Collection.open(location("qdrant-local", tmp_path), model=tiny_encoder) as b:
            asked, real = [], Collection._stale

            def counted(self, mark, now):
                asked.append(mark["id"])
                return real(self, mark, now)

            monkeypatch.setattr(Collection, "_stale", counted)
            b.add([texts[0]], ids=["s"])
            assert asked == ["L"] and pending(b) == ["L"]


@pytest.mark.parametrize("engine, server", [("qdrant-local", False), ("milvus-lite", False), ("qdrant-local", True)])
def test_a_long_write_begun_during_another_client_s_recovery_is_left_alone(
    tmp_path, tiny_encoder, corpus, engine, server, monkeypatch
):
    """A's long write of L stopped long ago (A is closed). C's next write clears what it left; meanwhile, after
    C read the marks and before it purged, B begins writing L anew (B's mark, then its first windows). C took
    L for a stray still and removed B's windows: B's document would have lacked them. Re-reading the marks
    right before purging, C sees B's live mark and leaves L to it. ``server``: as on a server (the lease
    rule)."""
    texts, *_ = corpus
    with a_stopped_long_write(engine, tmp_path, tiny_encoder, texts, monkeypatch, aged=True) as (b, c):
        if server:
            monkeypatch.setattr(type(c.engine), "process_store", None)
        stop_long_writes(monkeypatch, b)
        real, began = c.engine.existing, []

        def b_begins(ids):  # C's recovery asks whether L is stored: B begins its long write of L first
            if "L" in ids and not began:
                with pytest.raises(KeyboardInterrupt):  # (stopped with two pieces written: as if still under way)
                    b.add([texts[28]], ids=["L"])
                began.append(vector_points(b, "L"))
            return real(ids)

        monkeypatch.setattr(c.engine, "existing", b_begins)
        c.add([texts[1]], ids=["t"])
        assert began[0] > 0 and vector_points(c, "L") == began[0]  # B's windows, whole
        assert [m["client"] for m in c.engine.read_manifest()["pending"]] == [b._client]


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_document_another_client_is_writing_is_not_written_or_deleted(
    tmp_path, tiny_encoder, corpus, engine, monkeypatch
):
    """Two clients of one server collection: while A's long write of X is under way (its mark live), B's
    write and B's delete of X are refused with WriteConflictError, changing nothing. Both used to go
    through: on Qdrant the two writes shared a generation's point ids (X's text A's, its windows partly
    B's), on Milvus a slot, and every later search failed ("ColBERT blocks missing"); a delete meanwhile
    left the head naming windows that were gone. X ends as A's version, whole, and B writes it after."""
    from m3search.errors import WriteConflictError

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    a = create(engine, tmp_path, tiny_encoder)
    b = None
    refused = []
    try:
        a.add([texts[25]], ids=["X"])
        b = Collection.open(location(engine, tmp_path), model=tiny_encoder)
        real = a.engine.upsert_long

        def meanwhile(pieces, **kw):
            def two_then_b():  # a's first two pieces written, then b
                it = iter(pieces)
                yield next(it)
                yield next(it)
                for attempt in (lambda: b.upsert([texts[28]], ids=["X"]), lambda: b.delete(["X"])):
                    with pytest.raises(WriteConflictError, match="being written by another client") as err:
                        attempt()
                    refused.append(err.value.ids)
                b.add([texts[1]], ids=["t"])  # other ids are written as before
                yield from it

            real(two_then_b(), **kw)

        monkeypatch.setattr(a.engine, "upsert_long", meanwhile)
        a.upsert([texts[29]], ids=["X"])
        assert refused == [["X"], ["X"]]
        doc = b.get("X")[0]
        assert doc.text == texts[29] and doc.windows == 3 and vector_points(b, "X") == 3
        for mode in MODES + ("all",):
            assert b.search(texts[29], k=5, mode=mode)[0].id == "X"
        b.upsert([texts[28]], ids=["X"])  # the write has ended: no conflict
        assert b.get("X")[0].text == texts[28] and vector_points(b, "X") == n_windows(tiny_encoder, texts[28])
        assert b.delete(["X"])["deleted"] == ["X"] and b.count() == 1
    finally:
        for col in (a, b):
            if col is not None:
                col.close()


def test_a_long_writer_that_finds_another_writers_mark_withdraws(tmp_path, tiny_encoder, corpus, monkeypatch):
    """Two clients of one server collection start long writes of X at once: B's mark lands after A checked
    the marks and before A's own. A finds it beside its own, removes its mark and raises WriteConflictError
    without writing a window (both used to write X's next generation, over each other's points)."""
    from m3search.errors import WriteConflictError

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    with create("qdrant-local", tmp_path, tiny_encoder) as a:
        a.add([texts[25]], ids=["X"])
        with Collection.open(location("qdrant-local", tmp_path), model=tiny_encoder) as b:
            real = a._clear_pending

            def then_b_marks() -> None:  # right after a's marks were read for this call
                real()
                b._mark_pending("X", True)

            monkeypatch.setattr(a, "_clear_pending", then_b_marks)
            before = raw_points(a)
            with pytest.raises(WriteConflictError):
                a.upsert([texts[29]], ids=["X"])
            assert [m["client"] for m in a.engine.read_manifest()["pending"]] == [b._client]
            assert raw_points(a) == before and a.get("X")[0].text == texts[25]


def test_a_mark_lost_to_another_writers_at_the_same_moment_withdraws_the_write(
    tmp_path, tiny_encoder, corpus, monkeypatch
):
    """B's and A's marks of X written at the same moment: A writes its mark from a manifest read before B's
    mark, so the stored marks keep only A's. B's check after its mark read its own copy, so both went on
    writing X (B's windows then had no mark: never cleared if B crashed). B now reads the stored marks, finds
    its own gone and withdraws without writing a window."""
    from m3search.errors import WriteConflictError

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    with create("qdrant-local", tmp_path, tiny_encoder) as a:
        a.add([texts[25]], ids=["X"])
        with Collection.open(location("qdrant-local", tmp_path), model=tiny_encoder) as b:
            older = a.engine.read_manifest()  # a's copy, read before b's mark
            real = b.engine.write_manifest

            def then_a_writes_its_mark(manifest):
                real(manifest)
                if any(m["client"] == b._client for m in manifest.get("pending") or []) and not hasattr(b, "lost"):
                    b.lost = True
                    real({**older, "pending": [{"id": "X", "client": a._client, "at": time.time()}]})

            monkeypatch.setattr(b.engine, "write_manifest", then_a_writes_its_mark)
            before = raw_points(b)
            with pytest.raises(WriteConflictError, match="at the same moment; 'X' was not written"):
                b.upsert([texts[29]], ids=["X"])
            assert [m["client"] for m in b.engine.read_manifest()["pending"]] == [a._client]
            assert raw_points(b) == before and b.get("X")[0].text == texts[25]


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_long_write_that_failed_blocks_no_other_client(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """A's long overwrite of X fails part-way with an error (not a crash) and A stays open: its mark stayed
    live, so every other client's write or delete of X was refused (on a server for the 6 h lease). A marks
    its write stopped: B writes X, and the leftovers are cleared."""

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    a = create(engine, tmp_path, tiny_encoder)
    b = None
    try:
        a.add([texts[25]], ids=["X"])
        real = stop_long_writes(monkeypatch, a, pieces=1, error=RuntimeError("the encoder failed"))
        with pytest.raises(RuntimeError, match="the encoder failed"):
            a.upsert([texts[29]], ids=["X"])
        monkeypatch.setattr(a.engine, "upsert_long", real)
        b = Collection.open(location(engine, tmp_path), model=tiny_encoder)
        b.upsert([texts[28]], ids=["X"])
        assert b.get("X")[0].text == texts[28] and b.engine.read_manifest()["pending"] == []
        assert b.delete(["X"]) and b.count() == 0 and raw_points(b) == 0
    finally:
        for col in (a, b):
            if col is not None:
                col.close()


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_crashed_writer_s_mark_is_cleared_on_demand(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """A's long overwrite of X stopped part-way as a crash does (no error to mark it stopped) while A's handle
    stays open, as a crashed writer on a server stays within its lease: B's write of X is refused, for up to
    PENDING_LEASE_S on a server, and the error names the way out. ``recover`` lists the mark and keeps it (it may
    be a live write's); forced, it clears it and what A wrote: B's write goes through and X ends whole."""
    from m3search.errors import WriteConflictError

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    a = create(engine, tmp_path, tiny_encoder)
    b = None
    try:
        a.add([texts[25], texts[0]], ids=["X", "s"])
        stop_long_writes(monkeypatch, a)
        with pytest.raises(KeyboardInterrupt):
            a.upsert([texts[29]], ids=["X"])
        b = Collection.open(location(engine, tmp_path), model=tiny_encoder)
        with pytest.raises(WriteConflictError, match=r"m3search recover --collection \S+ --id ID --force"):
            b.upsert([texts[28]], ids=["X"])
        [mark] = b.recover()
        assert (mark["id"], mark["client"], mark["live"], mark["cleared"]) == ("X", a._client, True, False)
        assert 0 <= mark["age_s"] < 600 and pending(b) == ["X"] and b.recover("s") == []
        [forced] = b.recover(["X"], force=True)
        assert (forced["id"], forced["client"], forced["live"], forced["cleared"]) == ("X", a._client, True, True)
        assert pending(b) == [] and vector_points(b, "X") == n_windows(tiny_encoder, texts[25])  # A's windows gone
        one_version(b, tiny_encoder, "X", [texts[25]])
        b.upsert([texts[28]], ids=["X"])
        assert b.get("X")[0].text == texts[28] and b.count() == 2
        one_version(b, tiny_encoder, "X", [texts[25], texts[29], texts[28]])
    finally:
        for col in (a, b):
            if col is not None:
                col.close()


def one_version(col, encoder, doc_id: str, texts: list[str]) -> None:
    """``doc_id`` is one of ``texts`` whole: that text, as many windows as it has, each with that text's vectors
    (ColBERT's too: Milvus keeps them in rows of their own), and a search scores it by those windows alone: probed
    with every window of every text in ``texts``, its dense score is the best of its stored version's (exact; a
    stray window of another version scores 1)."""
    doc = col.get(doc_id)[0]
    assert doc is not None and doc.text in texts
    encoded = {t: encoder.encode_windows([t], window=WINDOW, stride=STRIDE).embeddings for t in texts}
    dense = {t: e.dense for t, e in encoded.items()}
    want = dense[doc.text]
    got = col.engine.get_windows([doc_id], with_vectors=["dense", "colbert"])[0]
    assert doc.windows == len(got) == len(want)
    np.testing.assert_allclose(np.stack([r.dense for r in got]), want, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([r.colbert for r in got]), encoded[doc.text].colbert, atol=1e-5)
    for probe in np.concatenate(list(dense.values())):
        score = dict(col.engine.search_dense(probe[None], k=col.count() + 1, exact=True)[0])[
            doc_id
        ]  # (more than stored)
        assert score == pytest.approx(float((want @ probe).max()), abs=1e-5)


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_write_checked_before_another_client_s_long_write_leaves_one_version(
    tmp_path, tiny_encoder, corpus, engine, monkeypatch
):
    """B checked the marks of X (none) and encoded its new version; A then marked X and wrote its long version
    up to the switch; B's one write landed; A switched. Qdrant: B's windows (generation 0, which a search took
    without asking the head) stayed searchable beside A's head; a search on a server collection now asks the
    head about every window past it. Milvus: B's write removed the rows of slots 1 and 2 (A's windows so far),
    so A's head named windows that were gone; A's rows are now its generation's, which B's write does not
    touch, and A's switch tombstones the version stored then (B's), whose windows a search also checks against
    the head."""

    texts, *_ = corpus
    with two_clients(engine, tmp_path, tiny_encoder, texts) as (a, b):
        a.add([texts[0]], ids=["X"])
        real_b, real_a, held, landed = b.engine.upsert, a.engine.upsert_long, [], []

        def b_lands_before_a_s_switch(pieces):
            yield from pieces
            real_b(held.pop())
            landed.append(True)

        def a_begins(batch):  # B has checked the marks: A marks X and writes it long
            held.append(batch)
            one_window_pieces(monkeypatch, tiny_encoder)
            monkeypatch.setattr(
                a.engine, "upsert_long", lambda pieces, **kw: real_a(b_lands_before_a_s_switch(pieces), **kw)
            )
            a.upsert([texts[28]], ids=["X"])

        monkeypatch.setattr(b.engine, "upsert", a_begins)
        b.upsert([texts[29]], ids=["X"])
        assert landed
        one_version(b, tiny_encoder, "X", [texts[28], texts[29]])


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_two_long_writes_whose_marks_crossed_leave_one_version(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """A checked the marks of X (none) and wrote its mark over a manifest read before B's (a manifest write has no
    compare-and-set: B's mark was lost), after B had checked its own. Both wrote X's next generation (Milvus: its
    free slot): A's start removed B's windows so far, B's later windows overwrote A's, and B's head then named
    windows of both versions. Each long write now has a generation of its own (drawn at random, recorded in its
    mark): B's switch, the last, names B's version whole; A's points are hidden leftovers (Milvus: B's switch
    tombstones A's version, the one stored then)."""
    import json

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    with two_clients(engine, tmp_path, tiny_encoder, texts) as (a, b):
        a.add([texts[0]], ids=["X"])
        older, real_read, real_write = a.engine.read_manifest(), a.engine.read_manifest, a.engine.write_manifest
        marked = []

        def a_s_write(manifest):
            real_write(manifest)
            marked.append(True)

        def read():  # until A's mark is written, A reads the manifest as it was before B's mark
            return real_read() if marked else json.loads(json.dumps(older))

        real_b = b.engine.upsert_long

        def a_meanwhile(pieces):
            it = iter(pieces)
            yield next(it)
            yield next(it)  # B's window 1 written
            monkeypatch.setattr(a.engine, "read_manifest", read)
            monkeypatch.setattr(a.engine, "write_manifest", a_s_write)
            a.upsert([texts[28]], ids=["X"])
            yield from it

        monkeypatch.setattr(b.engine, "upsert_long", lambda pieces, **kw: real_b(a_meanwhile(pieces), **kw))
        b.upsert([texts[20]], ids=["X"])
        assert marked
        one_version(b, tiny_encoder, "X", [texts[28], texts[20]])


def test_a_milvus_write_landing_between_a_long_write_s_switch_and_its_removal_is_kept(
    tmp_path, tiny_encoder, corpus, monkeypatch
):
    """X is stored by one write (slot 0). B checked the marks of X (none); A then marked X and wrote it long up to
    its switch; B's one write landed after A's switch, before A removed the version it replaced. That removal
    deleted every row of slot 0, B's head and windows with them: X, which B's write had stored last, was gone.
    A now removes only the rows of the version it replaced (by key and generation): X is B's version whole."""
    texts, *_ = corpus
    with two_clients("milvus-lite", tmp_path, tiny_encoder, texts) as (a, b):
        a.add([texts[20]], ids=["X"])  # 3 windows, in slot 0
        real_b, client = b.engine.upsert, a.engine.client
        real_a, held = client.upsert, []

        def b_lands_after_a_s_switch(coll, rows, **kw):
            out = real_a(coll, rows, **kw)
            if coll == a.engine.collection and any(r["doc_id"] == "X" and r["win"] == 0 for r in rows) and held:
                real_b(held.pop())
            return out

        def a_begins(batch):  # B has checked the marks: A marks X and writes it long
            held.append(batch)
            one_window_pieces(monkeypatch, tiny_encoder)
            monkeypatch.setattr(client, "upsert", b_lands_after_a_s_switch)
            a.upsert([texts[28]], ids=["X"])

        monkeypatch.setattr(b.engine, "upsert", a_begins)
        b.upsert([texts[10]], ids=["X"])  # 2 windows
        assert not held
        one_version(b, tiny_encoder, "X", [texts[10], texts[28]])
        assert b.get("X")[0].text == texts[10] and vector_points(b, "X") == 2 and b.count() == 3


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_write_landing_during_another_client_s_purge_is_kept(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """A's long write of L stopped (A closed: its mark is a dead writer's). C's next write clears it: C finds L
    not stored and purges it; between that finding and the purge, B (which cleared L itself) writes L whole in
    one write. C's purge removed every point of L, B's acknowledged document with them. A purge now removes only
    what long writes leave (points, or Milvus rows, of a generation)."""
    import m3search.collection as collection

    texts, *_ = corpus
    with a_stopped_long_write(engine, tmp_path, tiny_encoder, texts, monkeypatch) as (b, c):
        assert pending(c) == ["L"] and vector_points(c, "L") > 0
        monkeypatch.setattr(collection, "PIECE_BYTES", 256 << 20)  # B's write of L is one write
        real = c.engine.purge

        def b_writes_first(ids, *gens):
            if "L" in ids:
                b.upsert([texts[25]], ids=["L"])
            return real(ids, *gens)

        monkeypatch.setattr(c.engine, "purge", b_writes_first)
        c.add([texts[1]], ids=["t"])
        one_version(c, tiny_encoder, "L", [texts[25]])
        assert c.count() == 3 and pending(c) == []


@pytest.mark.parametrize("engine", ["qdrant-local", "milvus-lite"])
def test_a_long_write_begun_during_another_client_s_purge_is_kept(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """As above, but B's write of L is long and its purge lands after B's window 1: C's purge removed every
    point of L with a generation, B's window 1 with them, and B's head then named a window that was gone. A
    purge now removes only the generations of the stopped writes' marks (each long write has its own)."""
    texts, *_ = corpus
    with a_stopped_long_write(engine, tmp_path, tiny_encoder, texts, monkeypatch) as (b, c):
        real_purge, real_long, landed = c.engine.purge, b.engine.upsert_long, []

        def c_s_purge_lands(pieces, purged):
            it = iter(pieces)
            yield next(it)
            yield next(it)  # B's window 1 written
            real_purge(*purged)
            landed.append(True)
            yield from it

        def b_writes_first(*purged):
            monkeypatch.setattr(
                b.engine, "upsert_long", lambda pieces, **kw: real_long(c_s_purge_lands(pieces, purged), **kw)
            )
            b.upsert([texts[25]], ids=["L"])

        monkeypatch.setattr(c.engine, "purge", b_writes_first)
        c.add([texts[1]], ids=["t"])
        assert landed
        one_version(c, tiny_encoder, "L", [texts[25]])


#: Per engine, the hooks of the race reproductions: a write's one request, its read of the stored version, and a
#: delete's removal (the engine call made after every read).
RACE_HOOKS = {
    "qdrant-local": {"write": "_write", "read": "_stored", "removal": "_delete_where"},
    "milvus-lite": {"write": "_upsert_docs", "read": "_stored_rows", "removal": "_drop"},
}


@pytest.mark.parametrize("engine", list(RACE_HOOKS))
@pytest.mark.parametrize(
    "stored, shorter, lands",
    [(20, 0, "before A's tombstones are deleted"), (1, 10, "between A's read and its write")],
)
def test_two_writes_in_one_request_of_one_document_leave_one_version(
    tmp_path, tiny_encoder, corpus, monkeypatch, engine, stored, shorter, lands
):
    """Two clients of one server collection write X at once, each in one request: A a shorter version than B's
    three windows. ``before A's tombstones are deleted``: B's write landed after A's (A's head, tombstones over
    the old windows 1-2) and before A deleted those tombstones, by point id: B's fresh windows 1-2 with them, so
    B's head named windows that were gone. A now deletes only points that are tombstones still. ``between A's
    read and its write``: A read X as one window and so tombstoned nothing; B's window 2 stayed beside A's head
    of two, and searches found X by it. A search now drops a window past its head's count (Milvus: and asks
    again without it, as it hid the document's other windows). Milvus: A then deleted the token rows of every
    generation of X but its own, B's with them (B's version had no ColBERT vectors when B's write landed last);
    it now deletes those of the rows it wrote over only."""
    texts, *_ = corpus
    with two_clients(engine, tmp_path, tiny_encoder, texts) as (a, b):
        a.add([texts[stored]], ids=["X"])
        hook = RACE_HOOKS[engine]["write" if lands.startswith("before") else "read"]
        real, landed = getattr(a.engine, hook), []

        def then_b(*args):
            out = real(*args)
            if not landed:
                landed.append(True)
                b.upsert([texts[28]], ids=["X"])
            return out

        monkeypatch.setattr(a.engine, hook, then_b)
        a.upsert([texts[shorter]], ids=["X"])
        assert landed
        one_version(b, tiny_encoder, "X", [texts[shorter], texts[28]])


def stale_read(eng, batch):
    """What ``eng.upsert(batch)`` reads of the stored documents (:data:`RACE_HOOKS`), read now, and the hook's name."""
    name = RACE_HOOKS["milvus-lite" if eng.name == "milvus" else "qdrant-local"]["read"]
    if eng.name != "milvus":
        return getattr(eng, name)(batch.ids), name
    from m3search.engines.milvus import _pk, _wpk

    counts = np.diff(batch.window_offsets).tolist()
    keys = {_wpk(i, w): i for i, c in zip(batch.ids, counts) for w in range(c)}
    return getattr(eng, name)(batch.ids, [_pk(i) for i in batch.ids], keys), name


def is_switch(eng, args) -> bool:
    """Whether a row write (Qdrant: ``_write``'s points; Milvus: ``client.upsert``'s arguments) holds X's head."""
    if eng.name == "milvus":
        return args[0] == eng.collection and any(r["doc_id"] == "X" and r["win"] == 0 for r in args[1])
    from m3search.engines.base import point_uuid

    return any(uid == point_uuid("X") for uid, _, _ in args[0])


@pytest.mark.parametrize("engine", list(RACE_HOOKS))
def test_a_write_landing_between_a_long_write_s_switch_and_its_tombstones_delete_is_kept(
    tmp_path, tiny_encoder, corpus, monkeypatch, engine
):
    """B checked the marks of X (none) and read X's stored version; A then wrote X long up to its switch (its head
    and tombstones over the old version's windows 1-2); B's write of X in one request landed over them (it read
    generation 0: the same point ids); A deleted its tombstones by point id, B's fresh windows with them, so B's
    head named windows that were gone. A now deletes only points that are tombstones still. (Milvus: A's removal
    deletes rows of the old version by key and generation, which B's rows are not.)"""
    texts, *_ = corpus
    with two_clients(engine, tmp_path, tiny_encoder, texts) as (a, b):
        a.add([texts[20]], ids=["X"])
        target, name = (a.engine.client, "upsert") if engine == "milvus-lite" else (a.engine, "_write")
        real_b, real_write, landed = b.engine.upsert, getattr(target, name), []

        def a_begins(batch):  # B has checked the marks and read X: A marks X and writes it long
            seen, read = stale_read(b.engine, batch)

            def b_lands_after_a_s_switch(*args, **kw):
                out = real_write(*args, **kw)
                if not landed and is_switch(a.engine, args):
                    monkeypatch.setattr(b.engine, read, lambda *_: seen)
                    real_b(batch)
                    landed.append(True)
                return out

            one_window_pieces(monkeypatch, tiny_encoder)
            monkeypatch.setattr(target, name, b_lands_after_a_s_switch)
            a.upsert([texts[28]], ids=["X"])

        monkeypatch.setattr(b.engine, "upsert", a_begins)
        b.upsert([texts[29]], ids=["X"])
        assert landed
        one_version(a, tiny_encoder, "X", [texts[28], texts[29]])


@pytest.mark.parametrize("engine", list(RACE_HOOKS))
@pytest.mark.parametrize("lands", ["between its pieces", "after its switch"])
def test_a_delete_checked_before_another_client_s_long_write_leaves_it_whole(
    tmp_path, tiny_encoder, corpus, monkeypatch, engine, lands
):
    """A's delete of X passed the pending-mark check (none) and read X; B then began writing X long, and A's delete
    landed ``between its pieces``: it removed every point of X, B's window 1 with them, and B's switch then made
    B's write acknowledged with a head naming a window that was gone. A delete now removes only the points of the
    generation it read in X's head (and those without one): B's long write, of its own generation, ends whole.
    ``after its switch``: X ends B's version whole, or absent with no point left. (Milvus: a delete removes the
    rows of the version the head named when read, and of slot 0: never a long write's under way.)"""
    texts, *_ = corpus
    with two_clients(engine, tmp_path, tiny_encoder, texts) as (a, b):
        a.add([texts[20]], ids=["X"])
        removal = RACE_HOOKS[engine]["removal"]
        real_delete, real_long, landed = getattr(a.engine, removal), b.engine.upsert_long, []

        def a_lands(pieces, built):
            it = iter(pieces)
            yield next(it)
            if lands == "between its pieces":
                yield next(it)  # B's window 1 written
                real_delete(*built[0], **built[1])
                landed.append(True)
            yield from it

        def b_writes_long(*args, **kw):  # A's delete is built: B begins its long write of X before it lands
            one_window_pieces(monkeypatch, tiny_encoder)
            monkeypatch.setattr(
                b.engine, "upsert_long", lambda pieces, **o: real_long(a_lands(pieces, (args, kw)), **o)
            )
            b.upsert([texts[28]], ids=["X"])
            if not landed:
                real_delete(*args, **kw)
                landed.append(True)

        monkeypatch.setattr(a.engine, removal, b_writes_long)
        assert a.delete(["X"]) == {"deleted": ["X"], "missing": []}
        assert landed
        if lands == "between its pieces" or a.get("X")[0] is not None:
            one_version(a, tiny_encoder, "X", [texts[28]])
        else:
            assert raw_points(a) == 2  # s1 and s2 alone


@pytest.mark.parametrize("engine", list(RACE_HOOKS))
def test_a_delete_landing_inside_another_client_s_write_in_one_request_leaves_it_whole(
    tmp_path, tiny_encoder, corpus, monkeypatch, engine
):
    """A's delete of X passed its checks and read X; B's write of X in one request began, and A's delete landed
    before B's request of rows. Milvus: B had inserted its token rows first, and the delete removed every token
    row of X's slot 0, B's with them: B's acknowledged version had no ColBERT vectors. It now removes those of
    the generations it read."""
    texts, *_ = corpus
    with two_clients(engine, tmp_path, tiny_encoder, texts) as (a, b):
        a.add([texts[20]], ids=["X"])
        removal, write = RACE_HOOKS[engine]["removal"], RACE_HOOKS[engine]["write"]
        real_delete, real_write, landed = getattr(a.engine, removal), getattr(b.engine, write), []

        def b_writes(*args, **kw):  # A's delete is built: B's write begins before it lands
            def a_lands_first(*rows, **o):
                real_delete(*args, **kw)
                landed.append(True)
                return real_write(*rows, **o)

            monkeypatch.setattr(b.engine, write, a_lands_first)
            b.upsert([texts[28]], ids=["X"])

        monkeypatch.setattr(a.engine, removal, b_writes)
        assert a.delete(["X"]) == {"deleted": ["X"], "missing": []}
        assert landed
        one_version(a, tiny_encoder, "X", [texts[28]])


def test_pending_marks_of_an_older_version_count_as_expired(tmp_path, tiny_encoder, corpus, monkeypatch):
    """A manifest whose pending list holds plain ids (written before marks had a client and a lease) opens,
    and the next write, on a server collection too, clears those long writes' stray windows."""

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    with create("qdrant-local", tmp_path, tiny_encoder) as a:
        stop_long_writes(monkeypatch, a)  # two pieces written (window 1; the head comes last), then killed
        with pytest.raises(KeyboardInterrupt):
            a.add([texts[29]], ids=["L"])
        manifest = a.engine.read_manifest()
        manifest["pending"] = ["L"]  # as an older version recorded it
        a.engine.write_manifest(manifest)
    with Collection.open(location("qdrant-local", tmp_path), model=tiny_encoder) as c:
        assert vector_points(c, "L") > 0
        c.add([texts[0]], ids=["z"])
        assert c.engine.read_manifest()["pending"] == [] and vector_points(c, "L") == 0 and c.count() == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_iter_batches_and_migration_keep_windows(tmp_path, tiny_encoder, corpus, engine):
    from m3search.migrate import migrate

    texts, ids, meta, *_ = corpus
    src = create(engine, tmp_path / "a", tiny_encoder)
    try:
        src.add(texts, ids=ids, metadata=meta)
        batches = list(src.engine.iter_batches(8))
        assert sum(len(b) for b in batches) == len(texts)
        for b in batches:
            b.validate(src.schema)
            for i, doc_id in enumerate(b.ids):
                j = ids.index(doc_id)
                assert b.doc_spans(i) == [list(s) for s in corpus[5].spans[corpus[5].doc == j]]
        before = src.search(texts[25], k=10, mode="all", exact=True)
    finally:
        src.close()
    dst = location("qdrant-edge" if engine != "qdrant-edge" else "qdrant-local", tmp_path / "b")
    migrate(location(engine, tmp_path / "a"), dst)
    with Collection.open(dst, model=tiny_encoder) as col:
        assert col.count() == len(texts) and raw_points(col) == len(corpus[5].doc)
        after = col.search(texts[25], k=10, mode="all", exact=True)
        assert [(h.id, h.window) for h in after] == [(h.id, h.window) for h in before]
        assert [h.score for h in after] == exact([h.score for h in before])


def test_fuse_then_max_rule(tmp_path, tiny_encoder, corpus, monkeypatch):
    """The private switch: weighted fusion per window, then each document's best window."""
    import m3search.collection as collection

    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    monkeypatch.setattr(collection, "WINDOW_RULE", "fuse")
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        col.add(texts, ids=ids)
        w = dict(zip(MODES, col.settings["weights"]))
        hits = col.search_batch(queries, k=10, mode="all", candidates=30, exact=True, query_embeddings=qemb)
        for qi, hs in enumerate(hits):
            fused_w = sum(w[m] * per_window[m][qi] for m in MODES) / sum(w.values())
            for h in hs:
                assert h.score == exact(fused_w[win.doc == ids.index(h.id)].max())


@pytest.mark.parametrize("engine", ENGINES)
def test_whole_document_colbert_rule(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """A windowed document's ColBERT score is MaxSim over the tokens of ALL its windows, in every
    mode's hits and in the fusion, computed where the vectors live (no token vector is fetched)."""
    import m3search.collection as collection

    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    monkeypatch.setattr(collection, "COLBERT_RULE", "document")
    doc = oracle["colbert_document"]
    assert (doc - oracle["colbert"] > 1e-3).any()  # the rule matters on this corpus
    with create(engine, tmp_path, tiny_encoder) as col:
        col.add(texts, ids=ids)
        col.engine.server_scoring = True  # qdrant-local: the server's path (queries, not fetched vectors)
        fetch = col.engine.get_windows

        def no_token_vectors(doc_ids, *, with_vectors=True):
            assert with_vectors is not True and "colbert" not in (with_vectors or ()), "token vectors fetched"
            return fetch(doc_ids, with_vectors=with_vectors)

        monkeypatch.setattr(col.engine, "get_windows", no_token_vectors)
        w = dict(zip(MODES, col.settings["weights"]))
        for mode in ("colbert", "all", "dense"):
            hits = col.search_batch(queries, k=30, mode=mode, candidates=30, exact=True, query_embeddings=qemb)
            for qi, hs in enumerate(hits):
                assert len(hs) == 30
                for h in hs:
                    j = ids.index(h.id)
                    assert h.scores["colbert"] == exact(doc[qi, j]), (mode, h.id)
                    assert h.scores["colbert"] >= oracle["colbert"][qi, j] - EXACT_TOL  # never below the best window
                    if mode == "all":
                        parts = (w["dense"] * oracle["dense"][qi, j], w["sparse"] * oracle["sparse"][qi, j])
                        fused = (sum(parts) + w["colbert"] * doc[qi, j]) / sum(w.values())
                        assert h.score == exact(fused)
                if mode == "colbert":
                    assert [h.id for h in hs] == [ids[j] for j in np.lexsort((ids, -doc[qi]))]


def test_best_window_colbert_rule(tmp_path, tiny_encoder, corpus, monkeypatch):
    """The private switch COLBERT_RULE = "window": a document's ColBERT score is its best window's."""
    import m3search.collection as collection

    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    monkeypatch.setattr(collection, "COLBERT_RULE", "window")
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        col.add(texts, ids=ids)
        hits = col.search_batch(queries, k=30, mode="colbert", candidates=30, exact=True, query_embeddings=qemb)
        for qi, hs in enumerate(hits):
            assert len(hs) == 30
            for h in hs:
                assert h.scores["colbert"] == exact(oracle["colbert"][qi, ids.index(h.id)])


def test_settings_are_checked_at_creation(tmp_path, tiny_encoder):
    with pytest.raises(ValueError, match="stride=64 is larger than window - 2 specials"):
        Collection.create(tmp_path / "a", model=tiny_encoder, window=64, stride=64)
    with pytest.raises(ValueError, match="window=1024 is larger than the model's 512 positions"):
        Collection.create(tmp_path / "b", model=tiny_encoder, window=1024)
    with pytest.raises(ValueError, match="stride=0 must be at least 1 token"):
        Collection.create(tmp_path / "c", model=tiny_encoder, stride=0)
    # a window past max_length was one read of max_length tokens at max_windows=1, of window tokens with more
    with pytest.raises(ValueError, match="window=32 is larger than max_length=16, the tokens the model reads"):
        Collection.create(tmp_path / "b2", model=tiny_encoder, window=32, max_length=16, max_windows=2)
    with pytest.raises(ValueError, match="window must be an integer"):
        Collection.create(tmp_path / "c2", model=tiny_encoder, window="64")
    with pytest.raises(ValueError, match="max_windows must be a positive integer"):
        Collection.create(tmp_path / "d", model=tiny_encoder, max_windows=0)
    with Collection.create(tmp_path / "e", model=tiny_encoder) as col:
        assert (col.settings["window"], col.settings["stride"], col.settings["max_windows"]) == (512, 384, None)
        assert col.manifest["settings"]["window"] == 512


def test_max_windows_caps_and_warns(tmp_path, tiny_encoder, corpus):
    from m3search import TruncationWarning

    texts, ids, *_ = corpus
    with create("qdrant-edge", tmp_path, tiny_encoder, max_windows=2) as col:
        with pytest.warns(TruncationWarning, match="10 of 30 document.s. exceeded max_windows=2"):
            col.add(texts, ids=ids)
        assert col.engine.window_counts(ids).max() == 2 and col.count() == 30


def test_one_window_is_the_window_asked_for(tmp_path, tiny_encoder, corpus):
    """max_windows=1 cuts each text at ``window`` tokens (not at max_length: the window was once ignored)."""
    from m3search import TruncationWarning

    texts, ids, *_ = corpus
    with Collection.create(tmp_path / "one", model=tiny_encoder, window=32, max_windows=1) as col:
        with pytest.warns(TruncationWarning, match="exceeded window=32 tokens"):
            col.add(texts, ids=ids)
        stored = col.engine.get(ids, with_vectors=True)
        assert max(len(r.colbert) for r in stored) == 31  # 32 positions, minus [CLS]


def test_milvus_rewrite_stopped_at_each_step_shows_one_version(tmp_path, tiny_encoder, corpus, monkeypatch):
    """The Milvus write order (engines/milvus.py, "Writes"): a 3-window document rewritten as one
    window, stopped before its rows request (the old version whole) and after it, before the
    leftovers' removal (the new version whole: the tombstones are invisible to count, get and
    search); the document's next delete removes them."""
    texts = corpus[0]
    three, one = texts[20], texts[0]
    col = create("milvus-lite", tmp_path, tiny_encoder)
    eng = col.engine
    try:
        col.add([three, texts[10]], ids=["x", "y"])
        upsert, delete = eng.client.upsert, eng.client.delete

        def no_rows(coll, *a, **kw):
            if coll == eng.collection:
                raise KeyboardInterrupt("killed before the rows request")
            return upsert(coll, *a, **kw)

        monkeypatch.setattr(eng.client, "upsert", no_rows)
        with pytest.raises(KeyboardInterrupt):
            col.upsert([one], ids=["x"])
        monkeypatch.setattr(eng.client, "upsert", upsert)
        rec = col.get("x")[0]
        assert (rec.text, rec.windows, vector_points(col, "x"), col.count()) == (three, 3, 3, 2)

        def stop(*a, **kw):
            raise KeyboardInterrupt("killed before the leftovers' removal")

        monkeypatch.setattr(eng.client, "delete", stop)
        with pytest.raises(KeyboardInterrupt):
            col.upsert([one], ids=["x"])
        monkeypatch.setattr(eng.client, "delete", delete)
        rec = col.get("x")[0]
        assert (rec.text, rec.windows, vector_points(col, "x"), col.count()) == (one, 1, 1, 2)
        assert raw_points(col) == 1 + 2 + 2  # x's window, y's two windows, two tombstones
        assert [len(w) for w in eng.get_windows(["x", "y"])] == [1, 2]
        want = tiny_encoder.encode([one], max_length=WINDOW)
        q = tiny_encoder.encode([three], max_length=512)
        hit = {h.id: h for h in col.search(three, k=5, mode="dense", exact=True)}["x"]
        assert hit.score == exact(float(dense_scores(q.dense, want.dense)[0, 0]))
        col.delete(["x"])
        assert raw_points(col) == 2 and col.count() == 1 and col.get("x") == [None]
    finally:
        col.close()


def test_milvus_texts_over_the_varchar_limit_are_stored_whole(tmp_path, tiny_encoder, corpus):
    """A text over Milvus's 65,535-byte VARCHAR is kept in NAME_text rows (cut between characters) and
    comes back whole from get, search and iter_batches; rewrites, metadata updates and deletes keep no
    stale text row."""
    from m3search import TruncationWarning
    from m3search.engines.milvus import _text_parts

    parts = _text_parts("aé😀b" * 10, limit=5)
    assert "".join(parts) == "aé😀b" * 10 and max(len(t.encode()) for t in parts) <= 5
    texts = corpus[0]
    unit = " ".join(texts[20:23]) + " é😀 "
    long = unit * (70_000 // len(unit.encode()) + 1)
    assert len(long.encode()) > 65_535
    with create("milvus-lite", tmp_path, tiny_encoder, max_windows=2) as col:
        eng = col.engine

        def text_rows() -> int:
            return int(eng.client.query(eng.texts, filter="", output_fields=["count(*)"])[0]["count(*)"])

        with pytest.warns(TruncationWarning):
            col.add([long, texts[0]], ids=["long", "short"])
        assert col.get("long")[0].text == long and text_rows() == 2
        hit = col.search(texts[20], k=1, mode="all", exact=True)[0]
        assert hit.id == "long" and hit.text == long and hit.window["end"] < 200  # one of its two windows
        assert {t for b in eng.iter_batches(8) for t in b.texts} == {long, texts[0]}
        col.update_metadata("long", {"a": 1})
        assert col.get("long")[0].text == long and text_rows() == 2
        col.upsert([texts[1]], ids=["long"])
        assert col.get("long")[0].text == texts[1] and text_rows() == 0
        with pytest.warns(TruncationWarning):
            col.upsert([long], ids=["long"])
        col.delete(["long"])
        assert text_rows() == 0 and col.count() == 1


def test_milvus_collection_made_before_windows_keeps_its_layout(tmp_path, tiny_encoder, corpus):
    """A Milvus collection written before windows (one row per document, no doc/win/spans fields, manifest
    max_windows 1) opens, reads and writes as it is; a multi-window write is refused clearly."""
    from pymilvus import DataType, MilvusClient

    texts, ids, *_ = corpus
    loc = location("milvus-lite", tmp_path)
    with create("milvus-lite", tmp_path, tiny_encoder, max_windows=1) as col:
        eng, dim = col.engine, col.schema.dense_dim
        eng.client.drop_collection(eng.collection)  # the main collection as the previous version made it
        old = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        old.add_field("pk", DataType.INT64, is_primary=True)
        old.add_field("doc_id", DataType.VARCHAR, max_length=4096)
        old.add_field("text", DataType.VARCHAR, max_length=65535)
        for name in ("meta", "kinds"):
            old.add_field(name, DataType.JSON)
        old.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        old.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        old.add_field("gen", DataType.INT64)
        old.add_field("ntok", DataType.INT32)
        idx = eng.client.prepare_index_params()
        idx.add_index("dense", index_type="FLAT", metric_type="IP")
        idx.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP", params={"drop_ratio_build": 0.0})
        eng.client.create_collection(eng.collection, schema=old, index_params=idx, consistency_level="Strong")
    with Collection.open(loc, model=tiny_encoder) as col:
        assert not col.engine.window_rows and col.settings["max_windows"] == 1
        col.add(texts[18:23], ids=ids[18:23])  # long ones cut to one window, as before
        col.upsert(texts[:2], ids=ids[19:21])
        col.update_metadata(ids[20], {"tag": "t"})
        col.delete(ids[22])
        assert col.count() == 4 == raw_points(col) and col.count({"tag": "t"}) == 1
        assert col.get(ids[19])[0].text == texts[0] and col.get(ids[19])[0].windows == 1
        assert col.search(texts[1], k=1, mode="all", exact=True)[0].id == ids[20]
        assert [len(w) for w in col.engine.get_windows(ids[18:23])] == [1, 1, 1, 1, 0]
        win = tiny_encoder.encode_windows([texts[25]], window=WINDOW, stride=STRIDE)
        e = win.embeddings
        batch = PointBatch(["z"], [texts[25]], [{}], e.dense, e.sparse, e.colbert, e.colbert_offsets,
                           np.array([0, len(e.dense)]), win.spans)  # fmt: skip
        with pytest.raises(ValueError, match="created before documents could have several windows"):
            col.engine.upsert(batch)
        assert col.count() == 4


def as_slot(eng, doc_id: str, key: int, slot: int) -> None:
    """The rows of ``doc_id``'s version ``key`` (its ``doc``; token rows too) moved to ``slot`` 1 or 2, where
    schema 4 kept long writes (its ``doc`` values and window keys, pinned by test_engines.py)."""
    import hashlib

    from m3search.engines.milvus import _SLOT_SALT, _legacy_keys, _pk

    def wpk(w: int) -> int:
        digest = hashlib.sha1(_SLOT_SALT + f"w{slot}\x00{w}\x00{doc_id}".encode()).digest()
        return _pk(doc_id) if w == 0 else int.from_bytes(digest[:8], "big", signed=True)

    c, doc = eng.client, _legacy_keys(doc_id)[slot - 1]
    rows = c.query(eng.collection, filter=f"doc == {key}", output_fields=["*"])
    tokens = c.query(eng.tokens, filter=f"doc == {key}", output_fields=["gen", "blk", "vec"])
    assert rows and tokens
    for coll in (eng.collection, eng.tokens):
        c.delete(coll, filter=f"doc == {key}")
    c.upsert(eng.collection, [{**r, "pk": wpk(r["win"]), "doc": doc} for r in rows])
    c.insert(eng.tokens, [{**t, "doc": doc} for t in tokens])


def test_a_milvus_collection_of_schema_4_reads_recovers_and_rewrites(tmp_path, tiny_encoder, corpus, monkeypatch):
    """Schema 4 kept a long write's rows in slot 1 or 2 (``doc`` a hash of slot and id), told apart by slot, not
    by write. Such a collection (X long-written in slot 1, a long rewrite of X stopped in slot 2 with its pending
    mark) reads X whole, clears the stopped write's rows on the next write, rewrites X long and short, and a
    delete leaves no row, token or text row behind (as a reference collection written anew)."""
    from m3search.engines.milvus import _doc_key

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    with create("milvus-lite", tmp_path / "col", tiny_encoder) as a:
        a.add([texts[0]], ids=["s"])
        a.add([texts[20]], ids=["X"])
        eng = a.engine
        as_slot(eng, "X", eng._heads(["X"], ["doc_id"])["X"]["doc"], 1)
        stop_long_writes(monkeypatch, a)
        with pytest.raises(KeyboardInterrupt):
            a.upsert([texts[29]], ids=["X"])
        (mark,) = eng.read_manifest()["pending"]
        as_slot(eng, "X", _doc_key("X", mark["gen"]), 2)
        eng.write_manifest({**eng.read_manifest(), "schema_version": 4})
    with (
        Collection.open(location("milvus-lite", tmp_path / "col"), model=tiny_encoder) as b,
        create("milvus-lite", tmp_path / "ref", tiny_encoder) as ref,
    ):
        one_version(b, tiny_encoder, "X", [texts[20], texts[29]])
        assert b.get("X")[0].text == texts[20] and b.count() == 2
        b.add([texts[1]], ids=["t"])  # clears the stopped write: its rows in slot 2 go
        ref.add([texts[0], texts[20], texts[1]], ids=["s", "X", "t"])
        assert stored_rows(b) == stored_rows(ref) and pending(b) == []
        for text, long in ((texts[28], True), (texts[10], False), (texts[21], True)):
            monkeypatch.setattr(
                "m3search.collection.PIECE_BYTES", 20 * 4 * tiny_encoder.colbert_dim if long else 1 << 28
            )
            b.upsert([text], ids=["X"])
            ref.upsert([text], ids=["X"])
            one_version(b, tiny_encoder, "X", [text, texts[20]])
            assert stored_rows(b) == stored_rows(ref)
        assert b.engine.read_manifest()["schema_version"] == 5
        b.delete(["X"])
        ref.delete(["X"])
        assert stored_rows(b) == stored_rows(ref) and b.count() == 2


def test_collection_made_before_windows_opens_and_cuts(tmp_path, tiny_encoder, corpus):
    """A schema-1 collection (no window settings, points without window keys) keeps cutting long texts."""
    import json

    texts, ids, *_ = corpus
    path = tmp_path / "old"
    with Collection.create(path, model=tiny_encoder, max_length=16) as col:
        col.add(texts[:3], ids=ids[:3])
    m = json.loads((path / "manifest.json").read_text())
    for key in ("window", "stride", "max_windows"):
        del m["settings"][key]
    del m["max_windows_stored"]
    m["schema_version"] = 1
    (path / "manifest.json").write_text(json.dumps(m))
    with Collection.open(path, model=tiny_encoder) as col:
        assert col.settings["max_windows"] == 1
        shown = col.info()["settings"]  # what `m3search info` shows: the settings in force
        assert (shown["max_windows"], shown["window"], shown["stride"]) == (1, None, None)
        col.add(texts[20:23], ids=ids[20:23])  # long ones: cut, one window each
        assert col.count() == 6 and raw_points(col) == 6
        assert col.search(texts[1], k=1, mode="all", exact=True)[0].id == ids[1]


# ------------------------------------------------------------------ crash safety
CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np, scipy.sparse as sp
    from m3search.engines import resolve_engine
    from m3search.engines.shapes import PointBatch

    path, f, long = sys.argv[1], sys.argv[2], sys.argv[3] == "long"
    z = np.load(f, allow_pickle=True)
    versions = list(z["versions"])
    eng = resolve_engine(path).open(path)
    try:  # Milvus Lite's server processes: the parent waits for them to exit after the kill
        from milvus_lite.server_manager import server_manager_instance as lite
        pids = [s._p.pid for s in lite._servers.values() if s._p is not None]
    except ImportError:
        pids = []
    print("ready", *pids, flush=True)
    i = 0
    while True:
        v = versions[i % len(versions)]
        sparse = sp.csr_matrix((v["sp_data"], v["sp_indices"], v["sp_indptr"]), shape=tuple(v["sp_shape"]))
        o, n = v["offsets"], len(v["dense"])
        if long:  # one window a piece, as the Collection streams a document longer than a piece
            eng.upsert_long(
                PointBatch(["x"], [v["text"]], [{"v": i}], v["dense"][j : j + 1], sparse[j : j + 1],
                           v["colbert"][o[j] : o[j + 1]], o[j : j + 2] - o[j], np.array([0, 1]), v["spans"][j : j + 1])
                for j in range(n)
            )
        else:
            eng.upsert(PointBatch(["x"], [v["text"]], [{"v": i}], v["dense"], sparse, v["colbert"], o,
                                  np.array([0, n]), v["spans"]))
        print("done", i, flush=True)
        i += 1
    """
)


def test_the_kill_loops_child_script_compiles():
    """The kill -9 loop below is heavy (``make test-heavy`` only), so a child script that stopped compiling
    (an import pasted into it unindented) failed there alone, every run, as "not enough values to unpack"."""
    compile(CHILD, "CHILD", "exec")


def gone(pids: list[str], deadline: float = 30.0) -> None:
    """Wait until the processes ``pids`` have exited (Milvus Lite's server finishes its calls, then exits)."""
    end = time.monotonic() + deadline
    for pid in pids:
        while time.monotonic() < end:
            try:
                state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
            except OSError:
                break
            if state == "Z":
                break
            time.sleep(0.05)


def reopen(loc: str, deadline: float = 30.0) -> Collection:
    """Open after a kill -9: Milvus Lite's server process lets the file go a moment after its owner died."""
    from m3search.errors import CollectionInUseError

    end = time.monotonic() + deadline
    while True:
        try:
            return Collection.open(loc)
        except CollectionInUseError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


@pytest.mark.heavy
@pytest.mark.parametrize(
    "engine,write",
    [("qdrant-edge", "batch"), ("milvus-lite", "batch"), ("qdrant-edge", "long"), ("milvus-lite", "long")],
)
def test_kill_during_multi_window_upsert_leaves_a_whole_document(tmp_path, tiny_encoder, corpus, engine, write):
    """A child rewrites one document alternately as 3, 1 and 2 windows (in one upsert, or streamed
    through upsert_long one window a piece); kill -9 at random moments; the reopened document is one
    version whole (text, window count, window vectors, what a query finds)."""
    texts = [corpus[0][20], corpus[0][0], corpus[0][10]]  # 3, 1, 2 windows
    versions = []
    for t in texts:
        w = tiny_encoder.encode_windows([t], window=WINDOW, stride=STRIDE)
        e = w.embeddings
        versions.append(
            {
                "text": t,
                "dense": e.dense,
                "sp_data": e.sparse.data,
                "sp_indices": e.sparse.indices,
                "sp_indptr": e.sparse.indptr,
                "sp_shape": np.array(e.sparse.shape),
                "colbert": e.colbert,
                "offsets": e.colbert_offsets,
                "spans": w.spans,
            }
        )
    f = tmp_path / "versions.npz"
    np.savez(f, versions=np.array(versions, dtype=object))
    loc = location(engine, tmp_path)
    with create(engine, tmp_path, tiny_encoder) as col:
        col.add([texts[0], corpus[0][11]], ids=["x", "y"])  # max_windows_stored = 3
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    seen = set()
    pause = (0.05, 0.6) if engine != "milvus-lite" else (0.3, 4.0)  # a Milvus Lite rewrite takes longer
    for _ in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, loc, str(f), write], stdout=subprocess.PIPE, text=True, env=env
        )
        ready, *servers = child.stdout.readline().split()
        assert ready == "ready"
        time.sleep(float(rng.uniform(*pause)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        gone(servers)
        with reopen(loc) as col:
            rec = col.get("x")[0]
            v = next(v for v in versions if v["text"] == rec.text)
            n = len(v["dense"])
            seen.add(n)
            assert rec.windows == n and col.count() == 2
            got = col.engine.get_windows(["x"])[0]
            np.testing.assert_allclose(np.stack([r.dense for r in got]), v["dense"], atol=1e-6)
            if write == "batch":
                assert vector_points(col, "x") == n  # no window of another version answers a query
            for probe in v["dense"]:  # a query finds x at its best window of THIS version (a long write's
                hits = dict(col.engine.search_dense(probe[None], 2, exact=True)[0])  # strays are ignored)
                assert hits["x"] == pytest.approx(float((v["dense"] @ probe).max()), abs=1e-5)
            assert {r.metadata["v"] for r in got} == {rec.metadata["v"]} if "v" in rec.metadata else True
    assert len(seen) >= 2  # the kills landed on different versions


def test_cli_and_http_show_the_best_window(tmp_path, tiny_encoder, corpus):
    from click.testing import CliRunner

    from m3search.cli import main
    from m3search.server import HitOut

    texts, ids, *_ = corpus
    path = tmp_path / "col"
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        col.add(texts[20:], ids=ids[20:])  # three windows each
        hit = col.search(texts[21][-40:], k=1, mode="sparse")[0]
        out = HitOut(**hit.to_dict())
        assert out.window == hit.window and 0 <= hit.window["start"] < hit.window["end"] <= len(hit.text)
    r = CliRunner().invoke(main, ["search", texts[21][-40:], "--collection", str(path), "-k", "1", "--mode", "sparse"])
    assert r.exit_code == 0, r.output
    span = " ".join(hit.passage.split())
    assert f"[{span[:40]}" in r.output and f"chars {hit.window['start']}-{hit.window['end']} of" in r.output


# ------------------------------------------------------------ Qdrant server limit
LIMIT = 64 * 6  # floats per multivector: six 64-d token vectors (the tiny model's 1,048,576)


def enforce_server_limit(engine, limit: int) -> None:
    """Make qdrant-client local mode reject a long multivector as a Qdrant server does
    (HTTP 400, validation error; release builds check MAX_MULTIVECTOR_FLATTENED_LEN)."""
    import httpx
    from qdrant_client.http.exceptions import UnexpectedResponse

    real = engine.client.upsert

    def upsert(collection_name, points, **kw):
        for p in points:
            for name, v in (p.vector or {}).items():
                if isinstance(v, list) and v and isinstance(v[0], list) and len(v) * len(v[0]) > limit:
                    msg = f"Validation error in JSON body: [points[].vector.{name}: multivector too large ({len(v) * len(v[0])} > {limit})]"
                    raise UnexpectedResponse(400, "Bad Request", msg.encode(), httpx.Headers())
        return real(collection_name, points, **kw)

    engine.client.upsert = upsert


def test_windows_over_the_server_limit_are_stored_in_parts(tmp_path, tiny_encoder, corpus):
    """Windows of up to 15 tokens against a limit of 6 tokens: 1-3 parts each. Scores equal
    the embedded engine's (whole-window MaxSim), and rewrites and deletes leave no part behind."""
    from qdrant_client.http.exceptions import UnexpectedResponse

    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    loc = location("qdrant-local", tmp_path / "q")
    # without parts, the stand-in refuses the write as a server would
    col = Collection.create(loc, model=tiny_encoder, colbert_dtype="float32", window=WINDOW, stride=STRIDE)
    col.engine.multivector_limit = None
    enforce_server_limit(col.engine, LIMIT)
    with pytest.raises(UnexpectedResponse, match="multivector too large"):
        col.add(texts[:2], ids=ids[:2])
    col.close()
    col = Collection.open(loc, model=tiny_encoder, engine_options={"multivector_limit": LIMIT})
    ref = create("qdrant-edge", tmp_path / "e", tiny_encoder)
    try:
        enforce_server_limit(col.engine, LIMIT)
        col.add(texts, ids=ids, metadata=meta, batch_size=8)
        ref.add(texts, ids=ids, metadata=meta, batch_size=8)
        assert col.count() == len(texts) and col.engine._layout([ids[25]])[0][0][0] > 1
        for server_scoring in (False, True):
            col.engine.server_scoring = server_scoring
            for mode in ("colbert", "all"):
                a = col.search_batch(queries, k=10, mode=mode, candidates=30, exact=True, query_embeddings=qemb)
                b = ref.search_batch(queries, k=10, mode=mode, candidates=30, exact=True, query_embeddings=qemb)
                for qi, (ha, hb) in enumerate(zip(a, b)):
                    assert [h.id for h in ha] == [h.id for h in hb]
                    for x, y in zip(ha, hb):
                        assert x.window == y.window
                        for m in MODES:
                            assert x.scores[m] == exact(y.scores[m])
                            assert x.scores[m] == exact(oracle[m][qi, ids.index(x.id)])
        # migration out of parts gives the windows back whole
        got = col.engine.get_windows([ids[25]])[0]
        rows = np.flatnonzero(win.doc == 25)
        e = win.embeddings
        for r, j in zip(got, rows):
            np.testing.assert_allclose(r.colbert, e.colbert[e.colbert_offsets[j] : e.colbert_offsets[j + 1]], atol=1e-6)
        points, before = raw_points(col), col.engine._layout([ids[25]])[0][0]
        col.upsert([texts[0]], ids=[ids[25]])  # 3 windows in parts -> 1 window
        after = col.engine._layout([ids[25]])[0][0]
        assert len(before) == 3 and len(after) == 1
        assert col.count() == len(texts) and raw_points(col) == points - sum(before) + sum(after)
        col.delete(ids[20:])
        col.delete(ids[:20])
        assert col.count() == 0 and raw_points(col) == 0
    finally:
        col.close()
        ref.close()


def test_a_window_in_parts_scores_exactly_as_the_window_stored_whole(tmp_path, tiny_encoder, corpus):
    """The server engine scored a window stored in parts with a MaxSim formula of its own (a float32 mean: ~1e-7
    off, and NaN for a query with no token vectors); it is scoring's one definition (``score_records``), so a
    document in parts scores bit for bit as the same document stored whole, and the embedded engine agrees."""
    from m3search.engines.shapes import QueryVectors

    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    opts = {"parts": {"multivector_limit": LIMIT}, "whole": {"multivector_limit": None}}
    cols = {
        k: Collection.create(
            location("qdrant-local", tmp_path / k),
            model=tiny_encoder,
            colbert_dtype="float32",
            window=WINDOW,
            stride=STRIDE,
            engine_options=o,
        )
        for k, o in opts.items()
    }
    ref = create("qdrant-edge", tmp_path / "e", tiny_encoder)
    try:
        for col in [*cols.values(), ref]:
            col.add(texts, ids=ids, metadata=meta, batch_size=8)
        parts, whole = cols["parts"].engine, cols["whole"].engine
        whole.server_scoring = False  # NumPy over the fetched vectors: scoring's definition
        split = [i for i, (ps, _) in zip(ids, parts._layout(ids)) if min(ps) > 1]  # every window in parts
        assert len(split) >= 10 and max(len(p) for p, _ in parts._layout(split)) == 3
        o = qemb.colbert_offsets
        empty = QueryVectors(colbert=np.zeros((0, tiny_encoder.colbert_dim), np.float32))
        for q in [QueryVectors(colbert=qemb.colbert[o[i] : o[i + 1]]) for i in range(len(queries))] + [empty]:
            want = whole.score_windows(split, q, ["colbert"])
            for server_scoring in (False, True):
                parts.server_scoring = server_scoring
                got = parts.score_windows(split, q, ["colbert"])
                np.testing.assert_array_equal(got.windows, want.windows)
                np.testing.assert_array_equal(got.scores["colbert"], want.scores["colbert"])
            if len(q.colbert):
                edge = ref.engine.score_windows(split, q, ["colbert"]).scores["colbert"]
                np.testing.assert_allclose(got.scores["colbert"], edge, rtol=0, atol=1e-6)
            else:
                assert not got.scores["colbert"].any()  # no token vectors: 0, as everywhere in scoring
    finally:
        for col in [*cols.values(), ref]:
            col.close()


def test_passage_search_returns_windows(tmp_path, tiny_encoder, corpus):
    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        col.add(texts, ids=ids, metadata=meta)
        w = dict(zip(MODES, col.settings["weights"]))
        for mode in ("dense", "all"):
            hits = col.search_batch(
                queries, k=10, mode=mode, candidates=30, exact=True, query_embeddings=qemb, group="passage"
            )
            for qi, hs in enumerate(hits):
                if mode == "dense":
                    fused = per_window["dense"][qi]
                else:
                    fused = sum(w[m] * per_window[m][qi] for m in MODES) / sum(w.values())
                best = np.sort(fused)[::-1][:10]
                assert [h.score for h in hs] == exact(best)  # the 10 best windows of all
                for h in hs:
                    j = ids.index(h.id)
                    row = next(
                        r
                        for r in np.flatnonzero(win.doc == j)
                        if tuple(win.spans[r]) == (h.window["start"], h.window["end"])
                    )
                    assert h.text == texts[j][win.spans[row][0] : win.spans[row][1]] and h.metadata == meta[j]
                    assert h.passage == h.text  # the passage hit's text is its window already
                    assert h.score == exact(fused[row])
                    for m in MODES:
                        assert h.scores[m] == exact(per_window[m][qi, row])
        with pytest.raises(ValueError, match="group must be"):
            col.search(queries[0], group="chapter")


@pytest.mark.parametrize("engine", ENGINES)
def test_documents_longer_than_a_piece_are_streamed_and_stored_whole(
    tmp_path, tiny_encoder, corpus, engine, monkeypatch
):
    """With pieces of ~one window, three-window documents go through Engine.upsert_long: stored
    exactly as a one-write batch stores them (windows, spans, vectors, counts, scores)."""

    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    ref = create(engine, tmp_path / "ref", tiny_encoder)
    ref.add(texts, ids=ids, metadata=meta)
    one_window_pieces(monkeypatch, tiny_encoder)
    calls = []
    col = create(engine, tmp_path / "col", tiny_encoder)
    monkeypatch.setattr(
        col.engine, "upsert_long", lambda pieces, f=col.engine.upsert_long, **kw: calls.append(1) or f(pieces, **kw)
    )
    try:
        col.add(texts, ids=ids, metadata=meta, batch_size=12)
        assert len(calls) >= 10  # every document of more than one window spans pieces
        assert col.count() == ref.count() == len(texts) and raw_points(col) == raw_points(ref)
        assert col.manifest["max_windows_stored"] == 3
        for a, b in zip(col.engine.get_windows(ids), ref.engine.get_windows(ids)):
            assert [(r.window, r.spans, r.metadata) for r in a] == [(r.window, r.spans, r.metadata) for r in b]
            # the same windows encoded in other batches (other padding): equal to float32 rounding
            np.testing.assert_allclose(np.stack([r.dense for r in a]), np.stack([r.dense for r in b]), atol=1e-5)
            np.testing.assert_allclose(
                np.concatenate([r.colbert for r in a]), np.concatenate([r.colbert for r in b]), atol=1e-5
            )
        got = col.search_batch(queries, k=10, mode="all", exact=True, query_embeddings=qemb)
        want = ref.search_batch(queries, k=10, mode="all", exact=True, query_embeddings=qemb)
        assert [[(h.id, h.window) for h in hs] for hs in got] == [[(h.id, h.window) for h in hs] for hs in want]
        col.upsert([texts[20], texts[0]], ids=[ids[0], ids[20]])  # 1 -> 3 windows streamed, 3 -> 1 in a batch
        assert col.count() == len(texts) and raw_points(col) == raw_points(ref)
        assert [r.windows for r in col.get([ids[0], ids[20]])] == [3, 1]
    finally:
        col.close()
        ref.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_crash_before_the_head_window_leaves_the_document_absent(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """upsert_long writes window 0 last: stopped before it, the document is absent to count, get
    and every search (its stray windows take no place among the k hits), and writing it again
    leaves no stray window."""

    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    col = create(engine, tmp_path, tiny_encoder)
    try:
        col.add([texts[10], texts[1], texts[2]], ids=["y", "y1", "y2"])
        before = raw_points(col)
        eng = col.engine
        hook = "upsert" if eng.name == "milvus" else "_write"
        target = eng.client if eng.name == "milvus" else eng
        real = getattr(target, hook)

        def is_head(p):  # x's window 0: a Qdrant point (uuid, vectors, payload) or a Milvus row
            if isinstance(p, dict):
                return p.get("doc_id") == "x" and p.get("win") == 0
            return p[2].get("window", 0) == 0 and "part" not in p[2] and p[2]["id"] == "x"

        def crash(*a, **kw):
            if any(is_head(p) for p in a[1 if eng.name == "milvus" else 0]):
                raise KeyboardInterrupt("killed")
            return real(*a, **kw)

        monkeypatch.setattr(target, hook, crash)
        with pytest.raises(KeyboardInterrupt):
            col.add([texts[20]], ids=["x"])
        assert vector_points(col, "x") == 2  # windows 1 and 2 were written
        assert col.count() == 3 and col.get("x") == [None] and col.engine.existing(["x"]) == set()
        for mode in ("dense", "sparse", "colbert", "all"):
            for exact in (True, False):
                got = sorted(h.id for h in col.search(texts[20], k=3, mode=mode, exact=exact))
                if mode == "sparse":  # only documents sharing a token with the query
                    assert set(got) <= {"y", "y1", "y2"}, got
                else:
                    assert got == ["y", "y1", "y2"], (mode, exact)
        monkeypatch.setattr(target, hook, real)
        assert [m["id"] for m in col.manifest["pending"]] == ["x"]
        col.add([texts[0]], ids=["x"])  # one window now: the two stray windows go
        assert vector_points(col, "x") == 1 and raw_points(col) == before + 1 and col.count() == 4
    finally:
        col.close()


@pytest.mark.parametrize("engine", ["qdrant-edge", "qdrant-local"])
def test_an_interrupted_long_write_leaves_nothing_once_cleared(tmp_path, tiny_encoder, corpus, engine, monkeypatch):
    """A long write of a long text stopped after its first piece: its windows AND its text points (which no
    head names) go when the next write clears it, so deleting the document then leaves no point behind."""
    import m3search.engines.qdrant_common as qc

    texts, *_ = corpus
    one_window_pieces(monkeypatch, tiny_encoder)
    monkeypatch.setattr(qc, "TEXT_CHUNK", 40)  # the text is kept on text points
    col = create(engine, tmp_path, tiny_encoder)
    try:
        col.add([texts[1]], ids=["y"])
        before = raw_points(col)
        real, calls = col.engine._write, []

        def stops_at_second(*a, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")
            return real(*a, **kw)

        monkeypatch.setattr(col.engine, "_write", stops_at_second)
        with pytest.raises(KeyboardInterrupt):
            col.add([texts[29]], ids=["x"])
        monkeypatch.setattr(col.engine, "_write", real)
        col.add([texts[0]], ids=["x"])
        col.delete(["x"])
        assert col.count() == 1 and raw_points(col) == before
    finally:
        col.close()


def test_a_failed_manifest_write_is_written_again(tmp_path, tiny_encoder, corpus, monkeypatch):
    """Disk full while recording the window bound: the add fails, and its retry records the bound (it was held
    in memory as if stored, so after a reopen a delete left the long document's windows searchable)."""
    texts, *_ = corpus
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        loc = col.location
        col.add(texts[:2], ids=["a", "b"])
        real = col.engine.write_manifest

        def disk_full(manifest):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(col.engine, "write_manifest", disk_full)
        with pytest.raises(OSError, match="No space"):
            col.add([texts[20]], ids=["x"])
        monkeypatch.setattr(col.engine, "write_manifest", real)
        col.add([texts[20]], ids=["x"])
    with Collection.open(loc, model=tiny_encoder) as col:
        assert col.manifest["max_windows_stored"] == 3
        col.delete(["x"])
        assert raw_points(col) == 2 and vector_points(col, "x") == 0


def test_one_metadata_dict_is_one_operation_per_document(tmp_path, tiny_encoder, corpus, monkeypatch):
    """Qdrant Edge writes each payload operation on its own: the head's and the other windows' payloads as two
    operations let a kill between them leave a document half updated (filters matched its old metadata)."""
    texts, *_ = corpus
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        col.add([texts[20], texts[0]], ids=["x", "y"], metadata=[{"lang": "en"}] * 2)
        ops = []
        real = col.engine._set_payload
        monkeypatch.setattr(col.engine, "_set_payload", lambda o: (ops.append(len(o)), real(o))[1])
        col.update_metadata(["x", "y"], {"lang": "de"})
        assert ops == [1]
        assert col.count({"lang": "en"}) == 0 and {h.id for h in col.search(texts[20], filter={"lang": "de"})} == {
            "x",
            "y",
        }


def long_write_hook(eng, stop):
    """``(target, name, real, hook, writes)``: ``hook`` replaces for the engine's row writes (Qdrant: ``_write``;
    Milvus: ``client.upsert`` into the main collection) that records, per write holding rows of "x",
    whether x's head is among them, and raises KeyboardInterrupt (a kill) when ``stop(writes)``."""
    from m3search.engines.qdrant_common import is_head

    milvus = eng.name == "milvus"
    target, name = (eng.client, "upsert") if milvus else (eng, "_write")
    real, writes = getattr(target, name), []

    def hook(*a, **kw):
        if milvus and a[0] != eng.collection:
            return real(*a, **kw)
        if milvus:
            mine = [r for r in a[1] if r["doc_id"] == "x"]
            head = any(r["win"] == 0 for r in mine)
        else:
            mine = [p for p in a[0] if p[2]["id"] == "x"]
            head = any(is_head(p[2]) for p in mine)
        if mine:
            writes.append(head)
            if stop(writes):
                raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    return target, name, real, hook, writes


@pytest.mark.parametrize(
    "engine,old_write",  # how the old version was written: one batch, or streamed (upsert_long)
    [("qdrant-edge", "long"), ("qdrant-local", "long"), ("milvus-lite", "batch"), ("milvus-lite", "long")],
)
@pytest.mark.parametrize("stop", ["between pieces", "at the switch"])
def test_an_interrupted_long_overwrite_keeps_the_old_document_whole(
    tmp_path, tiny_encoder, corpus, engine, old_write, stop, monkeypatch
):
    """Over a stored document, upsert_long writes the new windows apart from the old ones (Qdrant:
    under the next generation; Milvus: in the other slot) and switches with one write of the head:
    stopped before it, count, get, get_windows and every search give the OLD document whole; the
    next write leaves no stray point."""

    texts, ids, meta, queries, qemb, *_ = corpus
    old, new = texts[20], " ".join(texts[21:24])  # 3 windows, then more
    probes = [queries[0], new, old, new]
    col = create(engine, tmp_path / "col", tiny_encoder)
    try:
        if old_write == "batch":  # Milvus: slot 0, whose old windows the switch tombstones
            col.add([texts[10], old], ids=["y", "x"], metadata=[{"v": 0}, {"v": 1}])
        one_window_pieces(monkeypatch, tiny_encoder)
        if old_write == "long":  # Milvus: slot 1, the new version goes to slot 2
            col.add([texts[10], old], ids=["y", "x"], metadata=[{"v": 0}, {"v": 1}])
        eng = col.engine

        def snapshot(c):
            ws = c.engine.get_windows(["x"])[0]
            hits = [
                [(h.id, h.window, round(h.score, 5)) for h in c.search(q, k=k, mode=m, exact=True)]
                for q, k in zip(probes, (5, 5, 5, 1))  # k=1: a dropped hit must not leave the answer empty
                for m in ("dense", "sparse", "colbert", "all")
            ]
            stored = sorted(  # what a migration reads: windows per id
                (i, int(n)) for b in c.engine.iter_batches(4) for i, n in zip(b.ids, np.diff(b.window_offsets))
            )
            return c.count(), c.count({"v": 1}), c.get("x")[0], np.stack([r.dense for r in ws]), hits, stored

        before = snapshot(col)
        assert before[2].windows == 3
        target, name, real, crash, writes = long_write_hook(
            eng, lambda w: w[-1] if stop == "at the switch" else len(w) == 2
        )
        monkeypatch.setattr(target, name, crash)
        with pytest.raises(KeyboardInterrupt):
            col.upsert([new], ids=["x"], metadata=[{"v": 2}])
        monkeypatch.setattr(target, name, real)
        assert not any(writes[:-1]) and writes[-1] == (stop == "at the switch")  # stopped where meant, head unwritten
        assert vector_points(col, "x") > 3  # new windows were written, and a query ignores them
        col.close()
        col = Collection.open(location(engine, tmp_path / "col"), model=tiny_encoder)
        after = snapshot(col)
        assert after[:2] == before[:2] and after[4:] == before[4:]
        assert (after[2].text, after[2].metadata, after[2].windows) == (old, {"v": 1}, 3)
        np.testing.assert_array_equal(after[3], before[3])
        col.upsert([new], ids=["x"], metadata=[{"v": 2}])  # again, to the end: the new version whole
        ref = create(engine, tmp_path / "ref", tiny_encoder)
        try:
            ref.add([texts[10], new], ids=["y", "x"], metadata=[{"v": 0}, {"v": 2}])
            got, want = snapshot(col), snapshot(ref)
            assert got[:2] == want[:2] and got[4:] == want[4:] and got[2].text == new
            np.testing.assert_allclose(got[3], want[3], atol=1e-5)
            assert raw_points(col) == raw_points(ref)  # no old, stray or tombstone point left
            col.update_metadata("x", {"v": 3})  # every window of the version the head names
            assert col.count({"v": 3}) == 1 and raw_points(col) == raw_points(ref)
            assert [r.metadata for r in col.engine.get_windows(["x"])[0]] == [{"v": 3}] * got[2].windows
            col.delete("x")
            ref.delete("x")
            assert raw_points(col) == raw_points(ref) == 2 and col.count() == 1  # y's two windows
        finally:
            ref.close()
    finally:
        col.close()


def stored_rows(col) -> tuple[int, ...]:
    """:func:`raw_points`, and on Milvus the token and text rows too."""
    eng = col.engine
    if eng.name != "milvus":
        return (raw_points(col),)
    count = [eng.client.query(c, filter="", output_fields=["count(*)"])[0]["count(*)"] for c in (eng.tokens, eng.texts)]
    return (raw_points(col), *count)


@pytest.mark.parametrize(
    "engine,old_write",  # how the old version was written: one batch, or streamed (upsert_long)
    [("qdrant-edge", "long"), ("qdrant-local", "long"), ("milvus-lite", "batch"), ("milvus-lite", "long")],
)
def test_a_long_overwrite_stopped_after_its_switch_leaves_nothing_once_cleared(
    tmp_path, tiny_encoder, corpus, engine, old_write, monkeypatch
):
    """Stopped after its switch, before the old version's leftovers are deleted (Qdrant: the tombstones over
    the old generation, which no later write or delete of the document names; Milvus: the tombstones over
    slot 0, or the old slot's rows): the new version is whole, and the next write, of another document,
    removes the leftovers as it clears the pending long write (Qdrant: the texts on text points, tombstoned
    too, and the new version's kept)."""
    import m3search.engines.qdrant_common as qc

    texts = corpus[0]
    old, new = texts[20], " ".join(texts[21:24])  # 3 windows, then more
    monkeypatch.setattr(qc, "TEXT_CHUNK", 40)
    col = create(engine, tmp_path / "col", tiny_encoder)
    ref = create(engine, tmp_path / "ref", tiny_encoder)
    try:
        if old_write == "batch":  # Milvus: slot 0, whose old windows the switch tombstones
            col.add([texts[10], old], ids=["y", "x"])
        one_window_pieces(monkeypatch, tiny_encoder)
        if old_write == "long":
            col.add([texts[10], old], ids=["y", "x"])
        eng = col.engine
        target, name, real, hook, writes = long_write_hook(eng, lambda w: False)
        removal = "_drop" if eng.name == "milvus" else "_delete_where"
        real_removal = getattr(eng, removal)

        def stops(*a, **kw):  # the removal after the switch (x's head written) is killed
            if writes and writes[-1]:
                raise KeyboardInterrupt("killed")
            return real_removal(*a, **kw)

        monkeypatch.setattr(target, name, hook)
        monkeypatch.setattr(eng, removal, stops)
        with pytest.raises(KeyboardInterrupt):
            col.upsert([new], ids=["x"])
        monkeypatch.setattr(eng, removal, real_removal)
        monkeypatch.setattr(target, name, real)
        ref.add([texts[10], new], ids=["y", "x"])
        assert col.get("x")[0].text == new and col.count() == 2  # switched: the new version
        assert raw_points(col) > raw_points(ref)  # and the old version's leftovers
        col.add([texts[0]], ids=["z"])
        ref.add([texts[0]], ids=["z"])
        assert stored_rows(col) == stored_rows(ref) and col.count() == 3
        assert col.manifest["pending"] == [] and col.get("x")[0].text == new
    finally:
        col.close()
        ref.close()


def test_milvus_switch_over_the_request_limit_deletes_the_old_version_first(
    tmp_path, tiny_encoder, corpus, monkeypatch
):
    """A long overwrite of a document stored in slot 0 whose switch (head + tombstones over the old
    windows) exceeds ``max_request_bytes`` deletes the old version first: stopped at the switch, the
    document is ABSENT (never a mix; its new windows hidden), and the next write leaves no stray row."""

    texts = corpus[0]
    old, new = texts[20], " ".join(texts[21:24])  # 3 windows, then more
    col = create("milvus-lite", tmp_path, tiny_encoder)
    try:
        col.add([texts[10], old], ids=["y", "x"])  # one batch: slot 0
        one_window_pieces(monkeypatch, tiny_encoder)
        eng = col.engine
        eng.max_request_bytes = 1  # no switch fits (window rows go one a request)
        target, name, real, crash, writes = long_write_hook(eng, lambda w: w[-1])
        monkeypatch.setattr(target, name, crash)
        with pytest.raises(KeyboardInterrupt):
            col.upsert([new], ids=["x"])
        monkeypatch.setattr(target, name, real)
        assert writes[-1] and not any(writes[:-1]) and vector_points(col, "x") == len(writes) - 1
        assert col.count() == 1 and col.get("x") == [None] and eng.get_windows(["x"]) == [[]]
        for mode in ("dense", "sparse", "colbert", "all"):  # y is found (sparse: when they share a token), x is not
            hits = [h.id for h in col.search(new, k=5, mode=mode, exact=True)]
            assert hits == ["y"] or (mode == "sparse" and hits == []), (mode, hits)
        col.upsert([new], ids=["x"])
        n = col.get("x")[0].windows
        assert n > 3 and col.count() == 2 and vector_points(col, "x") == n and raw_points(col) == 2 + n
    finally:
        col.close()


def test_a_long_text_shows_window_progress(tmp_path, tiny_encoder, corpus, capsys):
    texts = corpus[0]
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        col.add([" ".join(texts)], ids=["long"], show_progress=True)
        assert "window" in capsys.readouterr().err
        assert col.get("long")[0].windows > 3


@pytest.mark.parametrize("engine", ["qdrant-edge", "qdrant-local", "milvus-lite"])
def test_a_write_in_pieces_raises_the_schema_version_older_releases_read(
    tmp_path, tiny_encoder, corpus, engine, monkeypatch
):
    """A document written in pieces leaves points with a generation and pending marks with a lease, which an
    m3search reading up to schema 3 misread (wrong hits, a delete that left the document; a TypeError on its
    next write), and on Milvus rows keyed by its generation, which one reading up to 4 misreads (it looks in
    slots 1 and 2). That write raises the collection to schema 5, which they refuse; a collection without one
    stays at 3, readable by them, and so does its migrated copy."""
    import m3search.collection as collection
    import m3search.engines.shapes as shapes
    from m3search.migrate import migrate

    texts, *_ = corpus
    with create(engine, tmp_path, tiny_encoder) as col:
        col.add(texts[:2], ids=["s1", "s2"])
        assert col.engine.read_manifest()["schema_version"] == 3
        one_window_pieces(monkeypatch, tiny_encoder)
        col.add([texts[29]], ids=["L"])
        stored = col.engine.read_manifest()
        assert stored["schema_version"] == 5 and stored["pending"] == [] and col.count() == 3
    with monkeypatch.context() as older:  # an m3search that reads up to 4 refuses it with its own clear error
        older.setattr(shapes, "SCHEMA_VERSION", 4)
        with pytest.raises(ValueError, match="schema version 5; this m3search reads up to 4"):
            shapes.check_manifest(stored, "col")
    with Collection.open(location(engine, tmp_path), model=tiny_encoder) as col:  # this one reads it
        assert col.get("L")[0].text == texts[29]
    monkeypatch.setattr(collection, "PIECE_BYTES", 256 << 20)
    assert migrate(location(engine, tmp_path), str(tmp_path / "copy"))["copied"] == 3  # whole documents only
    with Collection.open(tmp_path / "copy", model=tiny_encoder) as copy:
        assert copy.engine.read_manifest()["schema_version"] == 3 and copy.get("L")[0].text == texts[29]


def test_a_window_in_parts_is_scored_with_its_own_tokens_when_another_window_is_missing(tmp_path, tiny_encoder, corpus):
    """Whole-window MaxSim on the server engine matched token vectors to windows by their position in
    ``get_windows``' answer, which skips a window whose point is not there (a write not yet applied on every
    shard): the windows after it were scored with the next window's tokens, and the hit named the wrong span."""
    from m3search.engines.qdrant_common import window_uuid
    from m3search.engines.shapes import QueryVectors

    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    loc = location("qdrant-local", tmp_path / "q")
    col = Collection.create(
        loc,
        model=tiny_encoder,
        colbert_dtype="float32",
        window=WINDOW,
        stride=STRIDE,
        engine_options={"multivector_limit": LIMIT},
    )
    try:
        enforce_server_limit(col.engine, LIMIT)
        col.add(texts, ids=ids, metadata=meta, batch_size=8)
        eng = col.engine
        doc = next(i for i in ids if len(eng._layout([i])[0][0]) == 3 and eng._layout([i])[0][0][2] > 1)
        ((parts, gen),) = eng._layout([doc])
        whole = eng.get_windows([doc], with_vectors=["colbert"])[0]
        eng.client.delete(eng.collection, points_selector=[window_uuid(doc, 1, gen)])  # window 1 goes missing
        q = QueryVectors(colbert=qemb.colbert[qemb.colbert_offsets[0] : qemb.colbert_offsets[1]])
        got = eng.score_windows([doc], q, ["colbert"]).scores["colbert"]
        expect = float((q.colbert @ whole[2].colbert.T).max(axis=1).mean())
        assert got[2] == pytest.approx(expect, abs=1e-6)  # window 2 with its own tokens
        assert np.isnan(got[1])  # window 1: not there, not scored
    finally:
        col.close()


def test_sparse_passages_are_the_windows_that_match(tmp_path, tiny_encoder, corpus):
    """A sparse passage search returned, after the matching windows, the other windows of their documents with
    sparse score 0 (no query token in them), where the document search returns only documents that match; and
    passage hits of one document shared one metadata dict (editing one hit's changed the others')."""
    texts, ids, meta, queries, qemb, win, per_window, oracle = corpus
    with create("qdrant-edge", tmp_path, tiny_encoder) as col:
        col.add(texts, ids=ids, metadata=meta)
        hits = col.search_batch(
            queries, k=1000, mode="sparse", candidates=1000, exact=True, query_embeddings=qemb, group="passage"
        )
        for qi, hs in enumerate(hits):
            want = np.sort(per_window["sparse"][qi][per_window["sparse"][qi] > 0])[::-1]
            assert [h.score for h in hs] == exact(want), qi
        hs = next(hs for hs in hits if len({h.id for h in hs}) < len(hs))  # one query's, a document twice in it
        twice = next(h.id for h in hs if [g.id for g in hs].count(h.id) > 1)
        first, other = [h for h in hs if h.id == twice][:2]
        first.metadata["edited"] = True
        assert "edited" not in other.metadata
