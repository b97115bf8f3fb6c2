"""M3SearchClient against the real app: the same answers as the Collection it serves, requests split
at the server's max_batch, and the library's error types."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest

pytest.importorskip("fastapi")

from integration_helpers import (  # noqa: E402
    IDS,
    META,
    MODES,
    QUERIES,
    TEXTS,
    exact_seen,
    make_collection,
    same_hits,
    served,
)

from m3search.client import M3SearchClient  # noqa: E402
from m3search.errors import DuplicateIdError, WriteConflictError  # noqa: E402


@pytest.fixture
def col(tmp_path, tiny_encoder):
    c = make_collection(tmp_path / "col", tiny_encoder)
    yield c
    c.close()


def test_reads_equal_the_collection(col, tiny_encoder):
    with served(col, max_batch=3) as client:
        assert client.max_batch == 3 and client.count() == len(TEXTS) == len(client)
        for mode in MODES:
            for fusion in ("weighted", "rrf"):
                want = col.search(QUERIES[0], k=4, mode=mode, fusion=fusion, filter={"topic": "flow"})
                got = client.search(QUERIES[0], k=4, mode=mode, fusion=fusion, filter={"topic": "flow"})
                same_hits([(h.id, h.score) for h in got], want)
                assert [(h.text, h.metadata, h.scores) for h in got] == [(h.text, h.metadata, h.scores) for h in want]
        explained = client.search(QUERIES[0], k=1, explain=True)[0]
        assert explained.explain["modes"] == ["dense", "sparse", "colbert"]
        recs = client.get([IDS[1], "nope", IDS[0]])
        assert recs[1] is None and [(r.id, r.text, r.metadata) for r in (recs[0], recs[2])] == [
            (IDS[1], TEXTS[1], META[1]),
            (IDS[0], TEXTS[0], META[0]),
        ]
        want = tiny_encoder.encode(TEXTS, sparse=False, colbert=False).dense
        np.testing.assert_allclose(client.embed(TEXTS), want, atol=1e-6)  # 8 texts in 3 requests


def test_exact_search_and_search_batch_equal_the_collection(col, monkeypatch):
    """The client had no exact (TypeError) and no search_batch (AttributeError), nor the server a way to ask for
    either: a program written against Collection failed against a server. Each now answers the library's answer
    (POST /search with exact, POST /search/batch), and batches are cut at the server's max_batch."""
    from helpers import exact

    with served(col, max_batch=2) as client:
        sent = []
        client._http.event_hooks["request"].append(lambda r: sent.append(r.url.path))
        seen = exact_seen(monkeypatch, col)
        for mode in MODES:
            want = col.search(QUERIES[0], k=4, mode=mode, filter={"topic": "flow"}, exact=True)
            got = client.search(QUERIES[0], k=4, mode=mode, filter={"topic": "flow"}, exact=True)
            same_hits([(h.id, h.score) for h in got], want)
            assert [h.scores for h in got] == [h.scores for h in want]
        assert seen == [True, True] * len(MODES)  # the library's, then the server's: exact reached the collection
        assert client.max_batch == 2  # (read once, from GET /info)
        sent.clear()
        for options in ({"k": 3}, {"k": 2, "mode": "dense", "exact": True}, {"k": 3, "group": "passage"}):
            want = col.search_batch(QUERIES, **options)
            got = client.search_batch(QUERIES, **options)
            assert [[h.id for h in hits] for hits in got] == [[h.id for h in hits] for hits in want]
            for g, w in zip(got, want):  # encoded in other batches (max_batch 2): float32 noise at most
                assert [(h.score, h.scores, h.text) for h in g] == [
                    (exact(h.score), exact(h.scores), h.text) for h in w
                ]
        assert sent == ["/search/batch"] * 6  # 3 queries at max_batch 2: 2 requests each
        assert client.search_batch([], k=3) == col.search_batch([], k=3) == [] and len(sent) == 6  # nothing sent


def test_count_with_a_filter_equals_the_collection(col):
    """client.count(filter=...) raised "counting with a filter is not available over HTTP", where Collection.count
    counts the matches. It asks POST /count; without a filter it still reads GET /info, which every server has."""
    with served(col) as client:
        sent = []
        client._http.event_hooks["request"].append(lambda r: sent.append(r.url.path))
        flowing = {"topic": "flow"}
        for flt in (flowing, {"year": {"gte": 1959}}, '{"tags": {"in": ["a"]}}', {"not": flowing}, {"year": 1}):
            assert client.count(flt) == col.count(flt)
        assert sent == ["/count"] * 5 and col.count(flowing) == len(TEXTS) // 2 and col.count({"year": 1}) == 0
        sent.clear()
        assert client.count() == client.count({}) == client.count(None) == len(TEXTS) and sent == ["/info"] * 3
        r = client._http.post("/count", json={"filter": flowing})
        assert r.json() == {"count": len(TEXTS) // 2}
        assert client._http.post("/count", json={}).json() == {"count": len(TEXTS)}


def test_count_without_a_filter_still_reads_an_older_servers_info():
    import httpx

    def older(request):  # a server from before POST /count
        if request.url.path == "/info":
            return httpx.Response(200, json={"collection": {"count": 7}})
        return httpx.Response(404, json={"error": {"type": "not_found", "message": "Not Found"}})

    client = M3SearchClient(
        "http://m3", http_client=httpx.Client(transport=httpx.MockTransport(older), base_url="http://m3")
    )
    assert client.count() == len(client) == 7
    with pytest.raises(ConnectionError, match="POST http://m3/count answered 'Not Found'.*older than this client"):
        client.count({"year": 1})


def test_writes_are_split_at_max_batch_and_land_in_the_collection(col):
    with served(col, max_batch=2) as client:
        ids = client.add([f"new text {i}" for i in range(5)], ids=[f"n{i}" for i in range(5)])
        assert ids == [f"n{i}" for i in range(5)] and col.count() == len(TEXTS) + 5
        assert client.upsert(["changed"], ids=["n0"], metadata=[{"year": 1}]) == ["n0"]
        assert col.get("n0")[0].metadata == {"year": 1}
        generated = client.add(["no id given"])
        assert len(generated) == 1 and col.get(generated)[0].text == "no id given"
        out = client.delete([f"n{i}" for i in range(5)] + ["missing"])
        assert out == {"deleted": [f"n{i}" for i in range(5)], "missing": ["missing"]}
        assert col.count() == len(TEXTS) + 1


@pytest.mark.filterwarnings("ignore:.*exceeded max_length")
def test_writes_are_split_at_the_servers_body_limit(tmp_path, tiny_encoder):
    """The client cut writes by count (max_batch) only: documents the embedded collection takes failed
    with 413, after the earlier parts of the call were stored. It now cuts by bytes too, and a
    document that fits in no request is refused, naming it, before anything is sent."""
    sent = []
    with make_collection(tmp_path / "c", tiny_encoder, docs=False) as col:
        with served(col, max_body_bytes=20_000, max_batch=8) as client:
            client._http.event_hooks["request"].append(lambda r: r.method != "GET" and sent.append(len(r.content)))
            texts = [f"short {i}" for i in range(8)] + [f"long {i} " + "wing flow " * 600 for i in range(4)]
            ids = [f"m{i}" for i in range(12)]
            assert client.upsert(texts, ids=ids) == ids and col.count() == 12
            assert len(sent) == 3 and max(sent) <= 20_000  # 8 short (max_batch), 3 x 6 KB, 1 x 6 KB
            assert [r.text for r in col.get(ids)] == texts
            sent.clear()
            with pytest.raises(ValueError, match=r"document 'big' is [\d,]+ bytes as JSON.*max_body_bytes 20,000"):
                client.add(["fine", "x" * 25_000], ids=["ok", "big"])
            with pytest.raises(ValueError, match=r"texts\[1\] is"):
                client.embed(["fine", "x" * 25_000])
            assert sent == [] and col.count() == 12  # nothing was sent, not even the first part
            texts = ["y " * 6_000, "z " * 6_000, "w"]
            want = tiny_encoder.encode(texts, sparse=False, colbert=False).dense
            np.testing.assert_allclose(client.embed(texts), want, atol=1e-6)
            assert len(sent) == 2 and max(sent) <= 20_000
            sent.clear()  # sizes are UTF-8 bytes as sent: 2 x 12 KB, not 2 x 6,000 characters in one request
            assert len(client.add(["é" * 6_000, "é" * 6_000])) == 2 and len(sent) == 2


def test_duplicate_ids_in_different_parts_are_refused_before_anything_is_sent(col):
    """Duplicates were checked per part (by the server) only: split over max_batch parts, an upsert kept the
    last text silently and an add stored the first part before its 409."""
    with served(col, max_batch=2) as client:
        for write in (client.upsert, client.add):
            with pytest.raises(ValueError, match=r"duplicate ids in one call: \['a'\]"):
                write(["first", "second", "third"], ids=["a", "b", "a"])
            assert col.get(["a", "b"]) == [None, None]


def test_errors_keep_the_library_types(col, monkeypatch):
    def conflict(ids, outcome):
        raise WriteConflictError(f"1 id(s) are being written by another client of this collection: {ids}", ids)

    with served(col) as client:
        with pytest.raises(DuplicateIdError, match="already exist") as taken:  # as Collection.add (was ValueError)
            client.add(["x"], ids=[IDS[0]])
        assert taken.value.ids == [IDS[0]]  # as Collection.add's (the client's had none)
        with monkeypatch.context() as busy:  # another client of a server collection is writing the id
            busy.setattr(col, "_refuse_others_writes", conflict)
            with pytest.raises(WriteConflictError, match="being written by another client") as err:
                client.upsert(["x"], ids=[IDS[0]])
            assert err.value.ids == [IDS[0]]
        with pytest.raises(ValueError, match="unknown operator"):  # checked before any request
            client.search("q", filter={"year": {"between": 1}})
        with pytest.raises(ValueError, match="unknown mode 'bm25'"):  # the library's error, before any request
            client.search("q", mode="bm25")
        with pytest.raises(TypeError, match="strings"):
            client.add([1, 2])
    with served(col, api_key="secret") as client:
        assert client.search("q", k=1)
        with pytest.raises(PermissionError, match="API key"):
            M3SearchClient(client.url, api_key="wrong", http_client=client._http).search("q")
        assert "authorization" not in client._http.headers  # the key goes with each request, not into a borrowed client
        with pytest.raises(PermissionError, match="API key"):
            M3SearchClient(client.url, http_client=client._http).search("q")  # so a client without one has none
    with pytest.raises(ConnectionError, match="did not answer"):
        M3SearchClient("http://127.0.0.1:9", timeout=2).search("q")


def test_a_milvus_key_collision_keeps_its_type_and_ids_over_http(col, monkeypatch):
    """A Milvus row-key collision (IdCollisionError, naming the new id and the stored one) was a 400 whose body had
    no ``error.ids``, and the client raised a bare ValueError: the ids only in the message. Now the body carries
    both ids as the other id errors' do, and the client raises IdCollisionError with them (the collision forced:
    the engine's write raises Milvus's own refusal); nothing was written."""
    pytest.importorskip("pymilvus")
    from m3search.engines import milvus
    from m3search.errors import IdCollisionError

    refusal = milvus._collision("new", IDS[0])

    def collide(batch):
        raise refusal

    monkeypatch.setattr(col.engine, "upsert", collide)
    with served(col) as client:
        answer = client._http.post("/documents", json={"documents": [{"id": "new", "text": "x"}], "upsert": True})
        assert answer.status_code == 400 and answer.json()["error"] == {
            "type": "invalid_request",
            "message": str(refusal),
            "ids": ["new", IDS[0]],
            "code": "IdCollisionError",
        }
        with pytest.raises(IdCollisionError) as err:
            client.upsert(["x"], ids=["new"])
        assert err.value.ids == ["new", IDS[0]] and str(refusal) in str(err.value)
    assert col.get(["new"]) == [None]


def test_the_client_types_library_errors_by_their_code_not_their_words(col, monkeypatch):
    """The client told a 409's DuplicateIdError from its WriteConflictError (and a 400's IdCollisionError from any
    bad value) by words of the message: reworded, the error came back a bare ValueError. The body now names the
    library error's class (``error.code``), which the client reads; an error the library did not raise on purpose
    has none."""

    def busy(ids, outcome):
        raise WriteConflictError("busy elsewhere, reworded", list(ids))

    def taken(ids):
        raise DuplicateIdError("taken, reworded", ["d"])

    with served(col) as client:
        with monkeypatch.context() as m:
            m.setattr(col, "_refuse_others_writes", busy)
            answer = client._http.post("/documents", json={"documents": [{"id": "n", "text": "x"}], "upsert": True})
            assert answer.status_code == 409 and answer.json()["error"]["code"] == "WriteConflictError"
            with pytest.raises(WriteConflictError, match="busy elsewhere, reworded") as err:
                client.upsert(["x"], ids=["n"])
            assert err.value.ids == ["n"]
        with monkeypatch.context() as m:
            m.setattr(col, "_existing", taken)
            with pytest.raises(DuplicateIdError, match="taken, reworded") as dup:
                client.add(["x"], ids=["n"])
            assert dup.value.ids == ["d"]
        bad = client._http.post("/search", json={"query": "q", "mode": "bm25"})
        assert bad.status_code == 400 and "code" not in bad.json()["error"]  # a plain ValueError: no code
    assert col.get(["n"]) == [None]


@pytest.mark.parametrize(
    "raised",
    [
        "CollectionDamagedError",
        "CollectionReadOnlyError",
        "CollectionUnreadableError",
        "InsufficientStorageError",
        "ModelMismatchError",
    ],
)
def test_the_servers_own_failures_keep_the_library_types(col, monkeypatch, raised):
    """Errors of the server's files (damaged, read-only, unreadable: 500; too little disk: 507) came back from the
    client a bare RuntimeError (a 400's ModelMismatchError a bare ValueError), though the body names the library's
    class (``error.code``): code written against Collection (``except InsufficientStorageError``) missed them. Now
    the client raises the class the body names, the server's message in it."""
    from m3search import errors

    cls = getattr(errors, raised)

    def fail(*args, **kwargs):
        raise cls(f"the server's own {raised}")

    monkeypatch.setattr(col.engine, "upsert", fail)
    with served(col) as client:
        with pytest.raises(cls, match=f"the server's own {raised}") as err:
            client.upsert(["x"], ids=["n"])
    assert type(err.value) is cls


def test_a_write_the_server_stopped_says_what_the_whole_call_wrote(tmp_path, tiny_encoder, monkeypatch):
    """A write stopped by the server's shutdown (503, ``error.code`` IngestInterrupted, ``error.ids`` the documents
    it wrote) came back a bare RuntimeError: its ids only in the body, which its message sends the caller to. Now
    IngestInterrupted (still a RuntimeError), whose ``ids`` are what the whole call wrote: the parts sent before the
    stopped one too (a call is split at the server's max_batch)."""
    from fastapi.testclient import TestClient

    from m3search import Collection
    from m3search.errors import IngestInterrupted
    from m3search.server import INGEST_WRITE_BATCH, Resources, Settings, create_app

    coll = Collection.create(tmp_path / "coll", model=tiny_encoder)
    app = create_app(Settings(max_batch=INGEST_WRITE_BATCH + 2), resources=Resources(collection=coll))
    real, writes = coll.engine.upsert, []

    def stop_in_second_part(*args, **kwargs):  # the shutdown begins during the second part's first batch
        out = real(*args, **kwargs)
        writes.append(1)
        if len(writes) == 3:
            app.state.stopping.set()
        return out

    monkeypatch.setattr(coll.engine, "upsert", stop_in_second_part)
    ids = [f"d{i}" for i in range(2 * (INGEST_WRITE_BATCH + 2))]
    with TestClient(app) as http:
        with pytest.raises(IngestInterrupted) as raised:
            M3SearchClient("http://testserver", http_client=http).add([f"note {i}" for i in ids], ids=ids)
        app.state.stopping.clear()
        stored = [r is not None for r in coll.get(ids)]  # the server closes the collection as it stops
    written = INGEST_WRITE_BATCH + 2 + INGEST_WRITE_BATCH  # the first part, then the second's first batch
    assert raised.value.ids == ids[:written] and raised.value.total == len(ids), (raised.value.ids, raised.value.total)
    assert f"of this call's {len(ids)} documents, the first {written} were written" in str(raised.value)
    assert stored == [i < written for i in range(len(ids))]


def _same_error(library, client) -> None:
    """``client()`` raises what ``library()`` raises: the same class and message."""
    with pytest.raises(Exception) as want:
        library()
    with pytest.raises(Exception) as got:
        client()
    assert (type(got.value), str(got.value)) == (type(want.value), str(want.value))


BAD_SEARCHES = [
    dict(query=""),
    dict(query=None),
    dict(query="a\ud800"),
    dict(k=0),
    dict(k=2.0),
    dict(k=True),
    dict(k=10**6),
    dict(candidates=-1),
    dict(mode="bm25"),
    dict(mode=["dense", "sparse"]),
    dict(fusion="max"),
    dict(weights=5),
    dict(weights=[1, 1]),
    dict(weights=[-1, 1, 1]),
    dict(weights=[float("nan"), 1, 1]),
    dict(weights={"dense": 1, "sparse": 1, "colbert": 1}),
    dict(mode="dense", weights=[0, 1, 1]),
    dict(explain="yes"),
    dict(exact="yes"),
    dict(exact=1),
    dict(group="chapter"),
    dict(group="passage", explain=True),
    dict(filter={"year": {"between": 1}}),
]


@pytest.mark.parametrize("bad", BAD_SEARCHES, ids=[str(b)[:40] for b in BAD_SEARCHES])
def test_a_bad_search_gets_the_librarys_error_before_any_request(col, bad):
    """Only the filter was checked before the request: a bad k, mode, fusion, explain, group or query came back as
    the server's 422 wording in a ValueError (the library raises TypeError for a wrong type), and weights=5, a NaN
    weight or a lone surrogate in the query failed inside the client (list(), json.dumps, str.encode).
    search_batch (new) checks as the library's does."""
    bad = dict(bad)
    query = bad.pop("query", QUERIES[0])
    with served(col) as client:
        sent = []
        client._http.event_hooks["request"].append(sent.append)
        _same_error(lambda: col.search(query, **bad), lambda: client.search(query, **bad))
        _same_error(
            lambda: col.search_batch([QUERIES[1], query], **bad),
            lambda: client.search_batch([QUERIES[1], query], **bad),
        )
        assert sent == []


BAD_COUNTS = [
    {"year": {"between": 1}},
    {"or": [{f"f{i}": i} for i in range(65)]},  # FilterTooComplexError
    ["year"],
    "{not json",
    {"year": 2**63},
]


@pytest.mark.parametrize("flt", BAD_COUNTS, ids=[str(f)[:30] for f in BAD_COUNTS])
def test_a_bad_count_gets_the_librarys_error_before_any_request(col, flt):
    with served(col) as client:
        sent = []
        client._http.event_hooks["request"].append(sent.append)
        _same_error(lambda: col.count(flt), lambda: client.count(flt))
        assert sent == []


def test_bad_batch_queries_get_the_librarys_error_before_any_request(col):
    with served(col) as client:
        sent = []
        client._http.event_hooks["request"].append(sent.append)
        for queries in ("one query", None, [QUERIES[0], 5], [QUERIES[0], " "], iter(QUERIES)):
            _same_error(partial(col.search_batch, queries), partial(client.search_batch, queries))
        assert sent == []


def test_numpy_counts_search_as_in_the_library(col):
    """The client put k and candidates into the JSON body as given: NumPy integers, which the library takes, failed
    in json.dumps ("Object of type int64 is not JSON serializable")."""
    with served(col) as client:
        want = col.search(QUERIES[0], k=np.int64(2), candidates=np.int32(5))
        same_hits([(h.id, h.score) for h in client.search(QUERIES[0], k=np.int64(2), candidates=np.int32(5))], want)


def test_numpy_bools_search_as_in_the_library(col, monkeypatch):
    """exact / explain given as NumPy bools (taken by the library) were refused by the client's check, and sent
    as given they fail in json.dumps ("Object of type bool is not JSON serializable"): the Python bool is sent."""
    flags = {"explain": np.bool_(True), "exact": np.bool_(True)}
    with served(col) as client:
        seen = exact_seen(monkeypatch, col)
        want = col.search(QUERIES[0], k=3, explain=True, exact=True)
        got = client.search(QUERIES[0], k=3, **flags)
        same_hits([(h.id, h.score) for h in got], want)
        assert all(h.explain for h in got)
        batch = client.search_batch(QUERIES[:2], k=3, **flags)
        assert [[h.id for h in hits] for hits in batch] == [
            [h.id for h in hits] for hits in col.search_batch(QUERIES[:2], k=3)
        ]
        assert all(h.explain for hits in batch for h in hits)
        assert seen == [True, True, True, False]  # the library's, the server's (twice), then the plain batch


def test_every_mode_spelling_the_library_takes_searches_over_http(col):
    """The server's pattern for mode took lower case without spaces only: "ALL" or "Dense + Sparse", which
    Collection.search takes (and so `m3search search --mode` on a collection opened in-process), were 422s
    through the server. Any other mode is the library's error there too (400), no longer the pattern's (422)."""
    with served(col) as client:
        for mode in ("ALL", " dense ", "Dense + Sparse", "colbert+sparse"):
            want = col.search(QUERIES[0], k=3, mode=mode)
            same_hits([(h.id, h.score) for h in client.search(QUERIES[0], k=3, mode=mode)], want)
            raw = client._http.post("/search", json={"query": QUERIES[0], "k": 3, "mode": mode})
            same_hits([(h["id"], h["score"]) for h in raw.json()["hits"]], want)
        raw = client._http.post("/search", json={"query": QUERIES[0], "mode": "fuzzy"})
        assert raw.status_code == 400 and "unknown mode 'fuzzy': use one of" in raw.json()["error"]["message"]


def test_every_fusion_spelling_the_library_takes_searches_over_http(col):
    """fusion="RRF" was refused by the library, the client and the server (pydantic's Literal: 422) while
    mode="Dense" is taken. Each now takes a fusion in any case; the client sends the lower-case name (which a
    server older than this takes too), and an unknown one is still a 422 naming the choices."""
    with served(col) as client:
        sent = []
        client._http.event_hooks["request"].append(lambda request: sent.append(json.loads(request.content)))
        for fusion in ("RRF", "Dbsf", "WEIGHTED"):
            want = col.search(QUERIES[0], k=3, mode="dense+sparse", fusion=fusion.lower())
            got = client.search(QUERIES[0], k=3, mode="dense+sparse", fusion=fusion)
            same_hits([(h.id, h.score) for h in got], want)
            assert sent.pop()["fusion"] == fusion.lower()
            for route, body in (("/search", {"query": QUERIES[0]}), ("/search/batch", {"queries": [QUERIES[0]]})):
                raw = client._http.post(route, json={**body, "k": 3, "mode": "dense+sparse", "fusion": fusion})
                hits = raw.json()["hits"] if route == "/search" else raw.json()["hits"][0]
                same_hits([(h["id"], h["score"]) for h in hits], want)
        raw = client._http.post("/search", json={"query": QUERIES[0], "fusion": "max"})
        assert raw.status_code == 422
        assert "unknown fusion 'max' (choose from weighted, rrf, dbsf)" in raw.json()["error"]["message"]


@pytest.mark.parametrize(
    "texts, ids, metadata",
    [
        (["t"], [""], None),
        (["a\ud800"], ["s1"], None),
        (["t"], ["m1"], [{"f": float("nan")}]),
        (["t", "u"], ["m1", "m2"], [{}, {"big": 2**63}]),
        (["t"], ["m1"], [{1: "x"}]),
        (["t"], ["m1"], ["nested"]),
    ],
)
def test_a_bad_write_gets_the_librarys_error_naming_the_document(col, texts, ids, metadata):
    """The client checked a write's arguments by its own copy of the library's checks: an empty id was the
    server's 422 ("documents.0.id: String should have at least 1 character"), and errors in a text or in
    metadata named texts[0] / metadata[0] where Collection.add names the document ('metadata of document 'm1'')."""
    with served(col) as client:
        sent = []
        client._http.event_hooks["request"].append(sent.append)
        for write in ("add", "upsert"):
            library, remote = (partial(getattr(c, write), texts, ids=ids, metadata=metadata) for c in (col, client))
            _same_error(library, remote)
        assert sent == [] and col.get(ids) == [None] * len(ids)


def test_a_search_over_the_servers_limit_is_a_limit_error(col):
    """A k or candidates over the server's (lower) limits came back as a plain ValueError: the library's
    LimitExceededError, which the server raised and answered with 413, was lost on the way."""
    from m3search.plan import LimitExceededError

    with served(col, max_k=3, max_candidates=5) as client:
        with pytest.raises(LimitExceededError, match=r"k=4 exceeds the limit of 3 \(HTTP 413\)"):
            client.search(QUERIES[0], k=4)
        with pytest.raises(LimitExceededError, match="candidates=6 exceeds the limit of 5"):
            client.search(QUERIES[0], k=3, candidates=6)
        with pytest.raises(LimitExceededError, match=r"k=4 exceeds the limit of 3 \(HTTP 413\)"):
            client.search_batch(QUERIES, k=4)


def test_search_batch_answers_the_search_routes_statuses(col):
    """POST /search/batch refuses what POST /search refuses, with its statuses: 413 over a limit (k, the batch, the
    body, a filter), 400 a bad value, 422 a malformed request; exact is strict in both."""
    from m3search.filters import MAX_FILTER_CONDITIONS

    wide = {"or": [{f"f{i}": i} for i in range(MAX_FILTER_CONDITIONS + 1)]}
    with served(col, max_k=10, max_batch=2, max_body_bytes=2_000) as client:
        post = client._http.post
        for path, body in (("/search", {"query": "q"}), ("/search/batch", {"queries": ["q"]})):
            for extra, status, says in (
                ({"k": 11}, 413, "k=11 exceeds the limit of 10"),
                ({"filter": wide}, 413, "at most 64 field conditions"),
                ({"filter": {"year": {"between": 1}}}, 400, "unknown operator"),
                ({"exact": "yes"}, 422, "exact: Input should be a valid boolean"),
                ({"mode": "fuzzy"}, 400, "unknown mode 'fuzzy'"),
            ):
                r = post(path, json={**body, **extra})
                assert r.status_code == status and says in r.json()["error"]["message"], (path, extra, r.text)
        r = post("/search/batch", json={"queries": ["a", "b", "c"]})
        assert r.status_code == 413 and "3 queries in one request exceed the limit of 2" in r.text
        r = post("/search/batch", json={"queries": ["q" * 3_000]})
        assert r.status_code == 413 and "exceeds the limit of 2000 bytes" in r.text
        for body, status in (({"queries": ["q", ""]}, 422), ({"queries": ["q", "  "]}, 400), ({"queries": "q"}, 422)):
            assert post("/search/batch", json=body).status_code == status, body
        assert post("/search/batch", json={"queries": [], "k": 2}).json() == {"hits": []}
        assert post("/search/batch", json={"queries": [], "k": 11}).status_code == 413  # checked with no query too
        with pytest.raises(ValueError, match=r"queries\[1\] is [\d,]+ bytes as JSON.*max_body_bytes 2,000"):
            client.search_batch(["q", "wing " * 500])  # fits in no request: refused before anything is sent
        # a filter too large for the body: the query was blamed alone ("queries[0] is 3 bytes ... more than ...")
        tags = {"tags": {"in": [f"tag number {i}" for i in range(120)]}}
        with pytest.raises(
            ValueError, match=r"queries\[0\] is 3 bytes as JSON \(2,[\d]{3} with the rest of its request"
        ):
            client.search_batch(["q"], k=2, filter=tags)


def test_count_answers_the_search_routes_filter_statuses(col):
    """POST /count refuses a filter as POST /search does: 413 over the filter's limits, 400 a bad value, 422 a
    malformed request."""
    from m3search.filters import MAX_FILTER_CONDITIONS

    wide = {"or": [{f"f{i}": i} for i in range(MAX_FILTER_CONDITIONS + 1)]}
    with served(col) as client:
        for body, status, says in (
            ({"filter": wide}, 413, "at most 64 field conditions"),
            ({"filter": {"year": {"between": 1}}}, 400, "unknown operator"),
            ({"filter": {"year": 10**30}}, 400, "integer out of range"),
            ({"filter": ["year"]}, 422, "filter"),
            ({"where": {}}, 422, "where"),
        ):
            for path in ("/count", "/search"):
                r = client._http.post(path, json={"query": "q", **body} if path == "/search" else body)
                assert r.status_code == status and says in r.json()["error"]["message"], (path, body, r.text)


def test_only_the_unknown_id_answer_reads_as_missing(col):
    """Every 404 read as "unknown id": a client at a wrong base URL (".../v1", the base OpenAI clients
    get) had get() answer None for every id, silently. Only the server's unknown-id answer (it names the
    ids) means missing; any other 404 is a ConnectionError saying what answered."""
    with served(col) as client:
        assert [r and r.id for r in client.get([IDS[0], "nope"])] == [IDS[0], None]
        client._http.base_url = "http://m3search.test/v1"
        wrong = M3SearchClient("http://m3search.test/v1", http_client=client._http)
        for call in (lambda: wrong.get(IDS[:2]), lambda: wrong.search("q")):
            with pytest.raises(
                ConnectionError, match=r"/v1/\S+ answered 'Not Found' \(HTTP 404\).* not the server's root"
            ):
                call()


def test_get_reads_many_ids_per_request_and_ids_too_long_for_a_url(col):
    """get() sent one GET /documents/{id} per id: a request per document (LangChain's get_by_ids, LlamaIndex's
    get_nodes), and an id longer than a URL may be (stored all the same) raised httpx's InvalidURL. Now POST
    /documents/get, ids in the body, in parts of the server's max_batch; a server older than the route answers
    405 and is asked one id at a time as before (test below)."""
    long_id = "é" * 30_000  # 180,000 characters once percent-encoded
    col.add(["a very long name"], ids=[long_id], metadata=[{"n": 1}])
    asked = []
    with served(col, max_batch=3) as client:
        client._http.event_hooks["request"].append(lambda request: asked.append((request.method, request.url.path)))
        recs = client.get([IDS[2], long_id, "nope", IDS[0], IDS[1]])
    assert [r and (r.id, r.text, r.metadata) for r in recs] == [
        (IDS[2], TEXTS[2], META[2]),
        (long_id, "a very long name", {"n": 1}),
        None,
        (IDS[0], TEXTS[0], META[0]),
        (IDS[1], TEXTS[1], META[1]),
    ]
    assert [a for a in asked if a[1] != "/info"] == [("POST", "/documents/get")] * 2, asked


def test_an_older_servers_unknown_id_answer_says_so():
    """A server from before the unknown-id answer named its ids (error.ids) answers an unknown id with a 404 in
    the API's error shape and no ids; get() raised "no m3search API at URL" (checked against a server of
    12f46a1^), though the URL serves the m3search API. The error now names the route and its answer, and says
    the server may be older than this client."""
    import httpx

    posted = []

    def older(request):
        if request.url.path == "/info":
            return httpx.Response(200, json={"limits": {}})
        if request.method == "POST":  # POST /documents/get: its path is GET /documents/{id}'s, so 405
            posted.append(request.url.path)
            return httpx.Response(405, json={"error": {"type": "method_not_allowed", "message": "Method Not Allowed"}})
        if request.url.path == "/documents/d0":
            return httpx.Response(200, json={"id": "d0", "text": "t", "metadata": {}})
        return httpx.Response(404, json={"error": {"type": "not_found", "message": "no document with id 'ghost'"}})

    http = httpx.Client(transport=httpx.MockTransport(older), base_url="http://m3")
    client = M3SearchClient("http://m3", http_client=http)
    assert client.get("d0")[0].text == "t"
    with pytest.raises(ConnectionError) as err:
        client.get(["d0", "ghost"])
    assert "GET http://m3/documents/ghost answered \"no document with id 'ghost'\" (HTTP 404)" in str(err.value)
    assert "the server is older than this client" in str(err.value)
    assert posted == ["/documents/get"]  # asked once: the client remembers the server has no such route


def test_hits_windows_passages_and_odd_ids_come_through(tmp_path, tiny_encoder):
    """A hit's best window and a passage search cross HTTP as the library gives them, and any stored id can
    be read back: "." and ".." (dot segments a URL would drop) and one with a line break."""
    from m3search import Collection

    long_text = " ".join(TEXTS) * 6  # several 64-token windows
    with Collection.create(tmp_path / "w", model=tiny_encoder, colbert_dtype="float32", window=64) as col:
        col.add([long_text, TEXTS[0], "x", "y", "z"], ids=["long", "short", ".", "..", "new\nline"])
        with served(col) as client:
            for group in ("document", "passage"):
                want = col.search(QUERIES[0], k=4, group=group)
                got = client.search(QUERIES[0], k=4, group=group)
                assert [(h.id, h.window, h.text, h.passage) for h in got] == [
                    (h.id, h.window, h.text, h.passage) for h in want
                ]
                assert all(h.window is not None for h in got)
            assert any(h.id == "long" and len(h.passage) < len(h.text) for h in client.search(QUERIES[0], k=5))
            assert [r.text for r in client.get([".", "..", "new\nline"])] == ["x", "y", "z"]


def test_a_busy_server_is_asked_again_after_its_retry_after():
    """429 (queue full: nothing was done) came out as ValueError, a bad value, with no retry."""
    import httpx

    answers = iter([429, 429, 200] + [429] * 10)
    seen = []

    def handler(request):
        status = next(answers)
        seen.append(status)
        if status == 429:
            return httpx.Response(
                429, headers={"Retry-After": "0"}, json={"error": {"type": "overloaded", "message": "busy"}}
            )
        return httpx.Response(200, json={"data": [{"embedding": [1.0, 0.0]}]})

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://m3")
    client = M3SearchClient("http://m3", http_client=http, retries=2)
    assert client._call("GET", "/info") == {"data": [{"embedding": [1.0, 0.0]}]} and seen == [429, 429, 200]
    with pytest.raises(RuntimeError, match=r"busy \(HTTP 429\)"):
        client._call("GET", "/info")
    assert seen[3:] == [429, 429, 429]  # the first ask and 2 retries


def test_bad_retries_and_answers_that_are_not_the_api_get_clear_errors():
    """retries=-1 failed in the first request with UnboundLocalError, 2.5 with range()'s TypeError; a 200 with
    an HTML body (a proxy's login page) with a JSONDecodeError from inside json."""
    import httpx

    def client(handler, **kwargs):
        http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://m3")
        return M3SearchClient("http://m3", http_client=http, **kwargs)

    def hits(request):
        return httpx.Response(200, json={"hits": []})

    for bad, error in [(-1, ValueError), (2.5, TypeError), (True, TypeError), ("3", TypeError)]:
        with pytest.raises(error, match="retries must be an integer >= 0"):
            client(hits, retries=bad)
    assert client(hits, retries=np.int64(0)).search("q") == []
    for answer in (httpx.Response(200, text="<html>login</html>"), httpx.Response(200, json=["not", "an object"])):
        with pytest.raises(
            ConnectionError, match=r"no m3search API at http://m3: POST http://m3/search answered HTTP 200"
        ):
            client(lambda request, answer=answer: answer).search("q")


def test_a_timed_out_read_is_asked_again_a_write_is_not():
    """503 (the encoding did not start within the server's request_timeout; Retry-After: 1) came out as
    RuntimeError with no retry. A read (search, get, embed) is asked again like a 429; a write is not:
    the server does not promise that a write timed out before storing any of its documents."""
    import httpx

    seen = []

    def handler(request):
        seen.append(request.url.path)
        if request.url.path == "/info":
            return httpx.Response(200, json={"limits": {"max_batch": 8, "max_body_bytes": 1 << 20}})
        if len(seen) % 3 != 0:  # two 503s, then an answer
            body = {"error": {"type": "unavailable", "message": "request not started within 60 s"}}
            return httpx.Response(503, headers={"Retry-After": "0"}, json=body)
        return httpx.Response(200, json={"hits": []} if request.url.path == "/search" else {"ids": ["a"]})

    client = M3SearchClient(
        "http://m3", http_client=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://m3"), retries=2
    )
    assert client.search("q") == [] and seen == ["/search"] * 3
    seen.clear()
    with pytest.raises(RuntimeError, match=r"not started within 60 s \(HTTP 503\)"):
        client.upsert(["x"], ids=["a"])
    assert seen == ["/info", "/documents"]  # one write, not resent
