"""The HTTP surface in-process: ``TestClient(create_app(...))``, no subprocess, no port.

Beside ``test_server.py`` (the real ``m3search serve`` over loopback), these tests reach
inside the app the way FastAPI's docs say tests should: settings swapped through
``app.dependency_overrides[get_settings]``, resources handed to ``create_app``, the
lifespan entered with ``with TestClient(app)``. They check what only an in-process test
can see cheaply: the typed library errors and their one status mapping, that the
server's answers are the library's own ``Hit.to_dict()`` / ``Collection.info()``, that
concurrent adds of one id give exactly one 409 (the collection's lock, not a second one
in the server), and that the lifespan releases the collection.
"""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from m3search import Collection  # noqa: E402
from m3search.batching import INTERACTIVE, Batcher, QueueFull, RequestTimeout  # noqa: E402
from m3search.errors import (  # noqa: E402
    CollectionDamagedError,
    CollectionInUseError,
    CollectionReadOnlyError,
    CollectionUnreadableError,
    DuplicateIdError,
    IngestInterrupted,
    InsufficientStorageError,
    M3SearchError,
    ModelMismatchError,
    UnknownIdError,
    WriteConflictError,
)
from m3search.plan import DeadlineExceeded  # noqa: E402
from m3search.server import _ERROR_STATUS, DeferredOptimize, Resources, Settings, create_app, get_settings  # noqa: E402

TEXTS = [
    "The boundary layer separates at high angles of attack.",
    "Hypersonic flow heats the leading edge of a slender wing.",
    "Die Grenzschicht löst sich bei großem Anstellwinkel ab.",
    "Pressure distribution on a swept wing in supersonic flow.",
    "Aeroelastic models of heated high speed aircraft.",
]
IDS = [f"d{i}" for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_encoder):
    path = tmp_path_factory.mktemp("http") / "coll"
    with Collection.create(path, model=tiny_encoder) as col:
        col.add(TEXTS, ids=IDS, metadata=[{"n": i} for i in range(len(TEXTS))])
    return path


@pytest.fixture()
def app_and_collection(stored, tiny_encoder):
    """An app over the stored collection (restored to its 5 documents afterwards)."""
    col = Collection.open(stored, model=tiny_encoder)
    app = create_app(Settings(collection=str(stored), max_batch=8), resources=Resources(collection=col))
    with TestClient(app) as client:
        yield app, client, col
    with Collection.open(stored, model=tiny_encoder) as again:  # the lifespan closed `col`
        extra = [i for i in again.get(IDS + ["x1", "x2", "race"]) if i is not None and i.id not in IDS]
        again.delete([r.id for r in extra])


def _error(r, status: int, type_: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"]["type"] == type_ and set(body) == {"error"}
    return body["error"]["message"]


def test_typed_errors_are_mapped_in_one_place():
    assert _ERROR_STATUS == {
        DuplicateIdError: 409,
        WriteConflictError: 409,
        UnknownIdError: 404,
        InsufficientStorageError: 507,
        CollectionUnreadableError: 500,
        CollectionReadOnlyError: 500,
        CollectionDamagedError: 500,
    }
    # the typed errors stay the built-in kinds older callers catch
    assert issubclass(CollectionDamagedError, ValueError) and issubclass(CollectionDamagedError, RuntimeError)
    assert issubclass(DuplicateIdError, ValueError) and issubclass(UnknownIdError, LookupError)
    assert issubclass(UnknownIdError, ValueError) and issubclass(ModelMismatchError, ValueError)
    assert issubclass(CollectionInUseError, RuntimeError) and issubclass(DuplicateIdError, M3SearchError)
    assert str(UnknownIdError("no document with id 'x'")) == "no document with id 'x'"  # no KeyError quoting


def test_library_errors_become_409_and_404(app_and_collection):
    _, client, col = app_and_collection
    with pytest.raises(DuplicateIdError) as exc:
        col.add(["again"], ids=["d0"])
    assert exc.value.ids == ["d0"]
    msg = _error(client.post("/documents", json={"documents": [{"id": "d0", "text": "again"}]}), 409, "conflict")
    assert "d0" in msg and "nothing was written" in msg
    assert col.get("d0")[0].text == TEXTS[0]
    msg = _error(client.get("/documents/ghost"), 404, "not_found")
    assert "ghost" in msg
    # the ids tell an unknown id from an unknown route (both 404) without reading the message
    assert client.get("/documents/ghost").json()["error"]["ids"] == ["ghost"]
    assert "ids" not in client.get("/no/such/route").json()["error"]
    conflict = client.post("/documents", json={"documents": [{"id": "d0", "text": "again"}]})
    assert conflict.json()["error"]["ids"] == ["d0"]
    with pytest.raises(UnknownIdError) as exc:
        col.update_metadata(["d1", "ghost"], {"n": 9})
    assert exc.value.ids == ["ghost"] and col.get("d1")[0].metadata == {"n": 1}
    _error(client.post("/search", json={"query": "x", "weights": [0, 0, 0]}), 400, "invalid_request")


def test_a_nearly_full_disk_is_507(app_and_collection, monkeypatch):
    """The embedded engine refuses writes on a nearly full disk (it died by SIGBUS): 507, its message, nothing
    written (free space simulated, see tests/test_collection.py)."""
    import m3search.engines.qdrant_edge as qe_mod

    _, client, col = app_and_collection
    monkeypatch.setattr(qe_mod, "free_bytes", lambda path: 1 << 20)
    r = client.post("/documents", json={"documents": [{"id": "x1", "text": "no room"}]})
    assert "not enough free disk for writing" in _error(r, 507, "insufficient_storage")
    r = client.request("DELETE", "/documents", json={"ids": ["d1"]})
    assert "not enough free disk for deleting" in _error(r, 507, "insufficient_storage")
    monkeypatch.undo()
    assert col.count() == len(TEXTS) and col.get("x1") == [None] and col.get("d1")[0].text == TEXTS[1]
    spec = client.get("/openapi.json").json()["paths"]["/documents"]
    assert "507" in spec["post"]["responses"] and "507" in spec["delete"]["responses"]


def test_a_served_collection_that_becomes_unreadable_is_said_to_be_so(app_and_collection, stored, monkeypatch):
    """A served collection whose files this process may no longer read (chmod-ed while served): GET /info was a
    bare PermissionError, answered as a bug (500 "internal server error", a traceback in the log), or 200 with
    every size 0 where the folder itself could not be listed (the walk skipped it). Now 500 naming the path, said
    in the server's log too; what works from the open storage (search) still does. Permissions simulated (these
    tests may run as root)."""
    from helpers import deny_inside

    _, client, _ = app_and_collection
    with monkeypatch.context() as patched:
        deny_inside(patched, stored)
        message = _error(client.get("/info"), 500, "internal_error")
        assert message.startswith(f"collection at {stored} cannot be read: Permission denied ("), message
        assert client.post("/search", json={"query": "wing", "k": 1}).status_code == 200
    assert client.get("/info").json()["collection"]["disk_bytes"]["total"] > 0


def test_a_damaged_collection_is_500_with_its_code(app_and_collection, tmp_path, tiny_encoder, monkeypatch, caplog):
    """What opening a damaged collection raises was a ValueError: a served call raising it answered 400
    "invalid_request", blaming the client for the server's files. Now 500 with error.code CollectionDamagedError,
    in the server's log too. A damaged collection cannot be served (the server opens it before serving: see
    test_cli's serve test), so the real error of opening one is raised by a served call here."""
    _, client, col = app_and_collection
    damaged = tmp_path / "damaged"
    Collection.create(damaged, model=tiny_encoder).close()
    (damaged / "manifest.json").write_text("[]")
    with pytest.raises(ValueError) as opened:
        Collection.open(damaged)
    monkeypatch.setattr(col, "info", _raising(opened.value))
    with caplog.at_level("ERROR", logger="m3search.server"):
        r = client.get("/info")
    message = _error(r, 500, "internal_error")
    said = f"manifest.json of the collection at {damaged} is damaged (a JSON list, not an object)"
    assert message == f"{said}; restore it from a copy"
    assert r.json()["error"]["code"] == "CollectionDamagedError"
    assert message in caplog.text


#: A valid request to each route of the schema (a route added without one fails the schema test below).
REQUESTS = {
    ("GET", "/health"): ("/health", None),
    ("GET", "/info"): ("/info", None),
    ("GET", "/metrics"): ("/metrics", None),
    ("GET", "/documents/{doc_id}"): ("/documents/ghost", None),  # unknown: 404
    ("POST", "/documents/get"): ("/documents/get", {"ids": ["ghost", "x1"]}),
    ("POST", "/documents"): ("/documents", {"documents": [{"id": "x1", "text": "a new note"}]}),
    ("DELETE", "/documents"): ("/documents", {"ids": ["x2"]}),
    ("POST", "/search"): ("/search", {"query": "boundary layer", "k": 2}),
    ("POST", "/search/batch"): ("/search/batch", {"queries": ["boundary layer", "wing"], "k": 2, "exact": True}),
    ("POST", "/count"): ("/count", {"filter": {"n": {"gte": 2}}}),
    ("POST", "/v1/embeddings"): ("/v1/embeddings", {"input": ["boundary layer"]}),
    ("POST", "/embed"): ("/embed", {"input": ["boundary layer"]}),
    ("GET", "/tei/info"): ("/tei/info", None),
    **{("POST", f"/tei{r}"): (f"/tei{r}", {"inputs": "wing"}) for r in ("", "/embed", "/embed_sparse", "/embed_all")},
    ("POST", "/tei/tokenize"): ("/tei/tokenize", {"inputs": "wing"}),
}
#: What each collection method the server calls may raise (the library's typed errors, and a search's deadline).
FAULTS = {
    "add": (DuplicateIdError, WriteConflictError, IngestInterrupted, InsufficientStorageError, CollectionReadOnlyError),
    "delete": (WriteConflictError, InsufficientStorageError, CollectionReadOnlyError),
    "search_batch": (DeadlineExceeded,),
    "info": (CollectionUnreadableError,),
}


def _raising(exc: Exception):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _check_declared(client, *, body: bool = True) -> set[int]:
    """Send each route its request; every error answer's status must be declared in the route's OpenAPI entry,
    in the one error shape. Returns the error statuses seen."""
    paths = client.get("/openapi.json").json()["paths"]
    routes = {(method.upper(), path): op for path, ops in paths.items() for method, op in ops.items()}
    assert set(routes) == set(REQUESTS)
    seen = set()
    for (method, path), op in routes.items():
        url, json_body = REQUESTS[method, path]
        r = client.request(method, url, json=json_body if body else [])
        if r.status_code >= 400:
            seen.add(r.status_code)
            assert str(r.status_code) in op["responses"], (method, path, r.status_code, r.text)
            assert op["responses"][str(r.status_code)]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"
            }
            assert set(r.json()["error"]) <= {"type", "message", "ids", "code"}, r.text
    return seen


def test_every_error_a_route_returns_is_in_its_openapi_entry(app_and_collection, tiny_encoder, monkeypatch):
    """The schema listed 409 and 507 for POST /documents and 507 for DELETE: not their 409 for an id another
    client is writing, nor 503 for a write stopped by a shutdown, nor any route's 429 / 503 (queue) or /search's
    504, nor the TEI routes' 400 / 401 / 413 / 422. Each route's errors are now declared from one table."""
    app, client, col = app_and_collection
    assert _check_declared(client) == {404}
    assert _check_declared(client, body=False) == {404, 422}  # a malformed body
    for fault in (QueueFull("full", 1), RequestTimeout("timed out")):
        with monkeypatch.context() as m:
            m.setattr(app.state.batcher, "encode_async", _raising(fault))
            assert _check_declared(client) > {404}
    # (a damaged collection fails the server's start, not a served call: test_cli)
    raised = {cls for faults in FAULTS.values() for cls in faults}
    assert set(_ERROR_STATUS) - {UnknownIdError, CollectionDamagedError} <= raised
    for method, faults in FAULTS.items():
        for cls in faults:
            with monkeypatch.context() as m:
                m.setattr(
                    col, method, _raising(cls("injected", [], 1) if cls is IngestInterrupted else cls("injected"))
                )
                assert _check_declared(client) > {404}, (method, cls)
    with TestClient(create_app(Settings(api_key="k"), resources=Resources(encoder=tiny_encoder))) as bare:
        assert _check_declared(bare) == {401}
        bare.headers["Authorization"] = "Bearer k"
        assert _check_declared(bare) == {409}  # no collection served


def test_concurrent_adds_of_one_id_give_one_409(app_and_collection):
    """The collection's own lock decides; the server no longer re-checks under a second one."""
    _, client, col = app_and_collection
    statuses: list[int] = []
    barrier = threading.Barrier(4)

    def post(i: int) -> None:
        barrier.wait()
        r = client.post("/documents", json={"documents": [{"id": "race", "text": f"writer {i}"}]})
        statuses.append(r.status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [200, 409, 409, 409]
    assert col.count() == len(TEXTS) + 1


def test_writes_waiting_on_a_long_ingest_leave_health_and_search_answering(app_and_collection):
    """Deletes waiting on the collection's lock (held by a long ingest) each took a worker thread: 40 took them
    all, and /health and /search hung for the ingest's whole length (12 minutes in the review's run)."""
    _, client, col = app_and_collection
    release, waiting = threading.Event(), []
    real = col.delete

    def slow_delete(ids):  # the first delete stands in for a long ingest holding the lock
        waiting.append(ids)
        release.wait(60)
        return real(ids)

    col.delete = slow_delete
    try:
        deletes = [
            threading.Thread(target=client.request, args=("DELETE", "/documents"), kwargs={"json": {"ids": [f"n{i}"]}})
            for i in range(45)
        ]
        for t in deletes:
            t.start()
        time.sleep(1.0)
        answered: dict[str, int] = {}
        probes = [
            threading.Thread(target=lambda: answered.update(health=client.get("/health").status_code)),
            threading.Thread(
                target=lambda: answered.update(
                    search=client.post("/search", json={"query": "wing", "k": 2}).status_code
                )
            ),
        ]
        for t in probes:
            t.start()
        for t in probes:
            t.join(30)
        assert answered == {"health": 200, "search": 200} and len(waiting) == 1  # one write at a time holds a thread
    finally:
        release.set()
        for t in deletes:
            t.join(60)
        col.delete = real


def test_answers_are_the_library_objects(app_and_collection):
    _, client, col = app_and_collection
    body = {"query": "boundary layer separation", "k": 3, "explain": True}
    hits = client.post("/search", json=body).json()["hits"]
    assert hits == [h.to_dict() for h in col.search(**body)]
    assert set(hits[0]["explain"]) >= {"contributions", "weights", "ranks", "matched_tokens"}
    body = {"queries": ["boundary layer", "Grenzschicht"], "k": 2, "exact": True, "filter": {"n": {"lt": 4}}}
    lists = client.post("/search/batch", json=body).json()["hits"]
    assert lists == [[h.to_dict() for h in hits] for hits in col.search_batch(**body)] and all(lists)
    assert client.post("/count", json={"filter": body["filter"]}).json() == {"count": col.count(body["filter"])}
    assert col.count(body["filter"]) == 4
    info = client.get("/info").json()["collection"]
    assert info == col.info()
    assert info["count"] == len(TEXTS) and set(info) >= {"count", "disk_bytes", "settings", "schema", "model"}
    parts = info["disk_bytes"]
    assert set(parts) == {"dense", "sparse", "colbert", "payload", "wal", "other", "total"}
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total") and parts["colbert"] > 0


def test_settings_are_swapped_through_dependency_overrides(app_and_collection):
    """What FastAPI's docs prescribe, and what server.py says tests do."""
    app, client, _ = app_and_collection
    assert client.post("/embed", json={"input": ["a"] * 8}).status_code == 200
    app.dependency_overrides[get_settings] = lambda: Settings(api_key="k2", max_batch=2)
    try:
        _error(client.get("/info"), 401, "unauthorized")
        headers = {"Authorization": "Bearer k2"}
        assert client.get("/info", headers=headers).json()["limits"]["max_batch"] == 2
        _error(client.post("/embed", json={"input": ["a"] * 3}, headers=headers), 413, "too_large")
        assert client.get("/health").status_code == 200  # open whatever the key
    finally:
        app.dependency_overrides[get_settings] = lambda: Settings(max_batch=8)
    assert client.post("/embed", json={"input": ["a"] * 8}).status_code == 200


def test_lifespan_opens_from_settings_and_releases_the_collection(stored, tiny_model_path):
    """Without resources, the lifespan opens the collection named by the settings, and closes it."""
    app = create_app(Settings(collection=str(stored), model=str(tiny_model_path), dtype="float32"))
    with TestClient(app) as client:
        assert client.get("/info").json()["collection"]["count"] == len(TEXTS)
        with pytest.raises(CollectionInUseError):
            Collection.open(stored)
    Collection.open(stored).close()  # released on exit


def test_documents_defer_optimizing_until_ingest_pauses(app_and_collection, monkeypatch, tiny_encoder):
    """/documents neither optimizes nor flushes per request (Qdrant Edge holds the GIL for both, so every
    query would stall); the app's DeferredOptimize does it once ingest has paused, and at shutdown."""
    app, client, col = app_and_collection
    # words, not digits: the tiny tokenizer trained without ../shared has no digits ("new text 1" and
    # "new text 2" were the same tokens there: they tied, and /search answered x1)
    texts = {"x1": "new text one", "x2": "new text two"}
    one, two = tiny_encoder.tokenize(list(texts.values()), 64)[0]
    assert one != two, "the tiny tokenizer cannot tell the two documents apart"
    calls: list[str] = []
    monkeypatch.setattr(col._engine, "optimize", lambda: calls.append("optimize") or False)
    monkeypatch.setattr(col._engine, "flush", lambda: calls.append("flush"))
    indexer = app.state.indexer
    indexer.idle = 1.0

    def unindexed() -> float:
        line = next(
            x for x in client.get("/metrics").text.splitlines() if x.startswith("m3search_unindexed_documents ")
        )
        return float(line.split()[1])

    for id_, text in texts.items():
        r = client.post("/documents", json={"documents": [{"id": id_, "text": text}]})
        assert r.status_code == 200
    assert calls == []  # not per request
    assert unindexed() == 2  # the operator sees what waits for its index
    assert client.post("/search", json={"query": texts["x2"], "k": 1}).json()["hits"][0]["id"] == "x2"
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls == ["optimize", "flush"]  # once, for both requests
    time.sleep(1.2)
    assert calls == ["optimize", "flush"]  # nothing pending: nothing more
    assert unindexed() == 0
    assert "m3search_index_build_seconds_count 1.0" in client.get("/metrics").text.splitlines()


class _Optimized:
    """A collection stand-in for DeferredOptimize: counts its builds."""

    runs = 0

    def optimize(self) -> None:
        self.runs += 1


def _wait_runs(fake: _Optimized, n: int) -> None:
    """Wait (at most 10 s) for DeferredOptimize's thread to have run ``n`` builds."""
    deadline = time.monotonic() + 10
    while fake.runs < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_deferred_optimize_waits_for_ingest_requests_in_progress(tiny_encoder):
    """A request still writing is ingest, not a pause: no build while one is in progress, however
    long it takes (a build per request stalled queries and left them cold reads); one once it ended."""

    fake, built = _Optimized(), []
    with Batcher(tiny_encoder) as b:
        indexer = DeferredOptimize(fake, b, idle=0.1, on_built=built.append)
        indexer.wrote(3)  # an earlier request ended...
        with indexer.writing(5):  # ...and the next one is writing for 5 idle periods
            time.sleep(0.5)
            assert fake.runs == 0
        _wait_runs(fake, 1)
        assert fake.runs == 1 and len(built) == 1 and built[0] >= 0
        with pytest.raises(RuntimeError):  # a failed request still counts what it may have written
            with indexer.writing(2):
                raise RuntimeError("engine")
        _wait_runs(fake, 2)
        assert fake.runs == 2
        indexer.close()


def test_a_failed_deferred_optimize_waits_for_the_next_write(tiny_encoder, caplog):
    """A build refused for disk space was retried at once, in a loop that logged a traceback as fast as it
    could; now it is logged once, in one line, and tried again after the next write (and at close)."""

    class Full(_Optimized):
        def optimize(self) -> None:
            self.runs += 1
            raise InsufficientStorageError("not enough free disk for optimizing at /c: 1.0 MiB free")

    fake = Full()
    with Batcher(tiny_encoder) as b, caplog.at_level("ERROR", logger="m3search.server"):
        indexer = DeferredOptimize(fake, b, idle=0.01)
        indexer.wrote(1)
        _wait_runs(fake, 1)
        time.sleep(0.3)  # 30 idle periods
        assert fake.runs == 1
        indexer.wrote(1)
        _wait_runs(fake, 2)
        time.sleep(0.1)
        assert fake.runs == 2
        indexer.close()
        assert fake.runs == 3  # what is pending, at close
    assert [r.getMessage() for r in caplog.records] == [
        "optimizing the collection failed: not enough free disk for optimizing at /c: 1.0 MiB free"
    ] * 3
    assert all(r.exc_info is None for r in caplog.records)


def test_deferred_optimize_runs_during_long_ingest_and_at_close(tiny_encoder):
    """``every`` bounds what stays unindexed during continuous ingest; close() optimizes what is pending."""

    fake, pending = _Optimized(), []
    with Batcher(tiny_encoder) as b:
        indexer = DeferredOptimize(fake, b, idle=60, every=10, on_pending=pending.append)
        indexer.wrote(4)
        time.sleep(0.2)
        assert fake.runs == 0  # neither idle long enough nor 10 documents
        indexer.wrote(6)
        _wait_runs(fake, 1)
        assert fake.runs == 1
        indexer.wrote(1)
        indexer.close()
        assert fake.runs == 2
        assert pending == [4, 10, 0, 1, 0]  # what the m3search_unindexed_documents gauge is set to


def test_tei_tokenize_marks_specials_as_the_tokenizer_does(app_and_collection):
    """<unk> was marked special and lost its offsets: the text it stands for could not be located (TEI
    uses the tokenizer's special-tokens mask)."""
    _, client, col = app_and_collection
    unk = col.encoder.tokenizer.token_to_id("<unk>")
    tokens = client.post("/tei/tokenize", json={"inputs": "wing \U0001f600"}).json()[0]
    unknown = [t for t in tokens if t["id"] == unk]
    assert unknown and all(not t["special"] and t["text"] == "\U0001f600" and t["start"] == 5 for t in unknown)
    assert tokens[0]["special"] and tokens[-1]["special"] and tokens[0]["start"] is None  # <s> and </s>


def test_tei_tokenize_offsets_are_utf8_bytes_as_teis(app_and_collection):
    """TEI gives a token's start / stop as byte offsets into the UTF-8 input (the Rust tokenizers' encode); ours
    were the Python tokenizer's character offsets: past the first non-ASCII character, a TEI client slicing the
    bytes it sent got another span."""
    _, client, _ = app_and_collection
    text = "Übergröße café 東京 \U0001f600"
    data = text.encode("utf-8")
    tokens = [t for t in client.post("/tei/tokenize", json={"inputs": text}).json()[0] if not t["special"]]
    assert tokens and all(data[t["start"] : t["stop"]] == t["text"].encode("utf-8") for t in tokens), tokens
    assert tokens[-1]["stop"] == len(data) and tokens[-1]["text"] == "\U0001f600"


def test_tei_tokenize_refuses_prompt_name_like_embed_and_health_answers_head(app_and_collection):
    """/tei/tokenize ignored prompt_name (the docstring says refused, as /tei/embed does); HEAD /health (load
    balancers, curl -I) answered 405."""
    _, client, _ = app_and_collection
    body = {"inputs": "a", "prompt_name": "query"}
    for route in ("/tei/embed", "/tei/tokenize"):
        assert "prompt_name" in _error(client.post(route, json=body), 400, "invalid_request"), route
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""


def test_tei_truncate_false_says_which_inputs_are_over_the_limit(app_and_collection):
    """The 413 added "longest at least N tokens", N always the limit itself (tokenize stops there): a length
    that told nothing, read as the input's."""
    _, client, col = app_and_collection
    limit = col.encoder.max_length
    body = {"inputs": ["wing " * (2 * limit), "wing"], "truncate": False}
    message = _error(client.post("/tei/embed", json=body), 413, "too_large")
    assert message == f"1 input(s) exceed the limit of {limit} tokens (send truncate: true to cut them)", message
    assert client.post("/tei/embed", json={**body, "truncate": True}).status_code == 200


def test_token_id_inputs_are_refused_saying_so(app_and_collection):
    """OpenAI clients send tiktoken ids unasked (LangChain's OpenAIEmbeddings): the refusal named only
    pydantic's 'input.str: Input should be a valid string; input.list[str].0: ...'."""
    _, client, _ = app_and_collection
    for route, body in [
        ("/v1/embeddings", {"input": [[9906, 1917]], "model": "bge-m3"}),
        ("/v1/embeddings", {"input": [9906, 1917]}),
        ("/tei/embed", {"inputs": [[9906, 1917]]}),
        ("/tei/tokenize", {"inputs": [9906]}),
    ]:
        message = _error(client.post(route, json=body), 422, "invalid_request")
        assert "token-id arrays are not supported" in message and "check_embedding_ctx_length" in message, route
    assert client.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code == 200
    for body in ({"input": [True]}, {"input": [[False]]}):  # booleans are no token ids (bool is an int in Python)
        assert "token-id" not in _error(client.post("/v1/embeddings", json=body), 422, "invalid_request"), body


def test_a_search_waiting_for_the_encoder_stops_at_its_time_limit(stored, tiny_encoder):
    """The search's time limit bounds its wait for the encoder too (it used to wait for the queue's
    request_timeout, and answer 504 only after its query had been encoded anyway)."""
    col = Collection.open(stored, model=tiny_encoder)
    app = create_app(Settings(collection=str(stored), search_timeout=0.5), resources=Resources(collection=col))
    gate = threading.Event()
    with TestClient(app) as client:
        batcher = app.state.batcher
        held = batcher.submit_job(lambda: (gate.wait(30), 0, 0), priority=INTERACTIVE)  # the worker is busy
        while not held.taken:
            time.sleep(0.01)
        t = time.monotonic()
        try:
            r = client.post("/search", json={"query": "boundary layer", "k": 2})
            waited = time.monotonic() - t
        finally:
            gate.set()
        assert "0.5 s" in _error(r, 504, "timeout")
        assert waited < 5, waited
        assert client.post("/search", json={"query": "boundary layer", "k": 2}).status_code == 200
