"""The real HTTP server (uvicorn in a subprocess on a loopback port the OS picks), called over HTTP.

Covers the OpenAI route through the ``openai`` client, ``/embed`` against the library's
own outputs, the document lifecycle, search against an exhaustive oracle, the API key,
the limits, the one error shape, and a schemathesis fuzz run with zero 5xx responses.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

KEY = "test-key-123"
N_DOCS = 60
MAX_BATCH = 16
MAX_BODY_MB = 0.25
MAX_QUEUE = 1000  # not the default (2048): serve --max-queue reaches the server


def _start(
    args: list[str], workdir: Path, collection: Path | None = None, timeout: float = 180, stdout=None, stderr=None
):
    """Start `python -m m3search serve ... --port 0`; return (process, base url) once /health answers. Its output
    goes to ``workdir/server.log`` unless ``stdout`` / ``stderr`` say otherwise."""
    log_path = workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "m3search", "serve", "--port", "0", "--log-level", "warning", *args],
        stdout=open(log_path, "w") if stdout is None else stdout,
        stderr=subprocess.STDOUT if stderr is None else stderr,
        env=env,
    )
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n" + _tail(log_path))
        if url is None:
            if collection is not None:
                try:
                    url = json.loads((collection / "server.json").read_text())["url"]
                except (OSError, ValueError, KeyError):
                    pass
            else:
                for line in log_path.read_text().splitlines():
                    if "m3search: serving" in line:
                        url = line.split(" at ")[1].split()[0]
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=30).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up:\n" + _tail(log_path))


def _tail(log_path: Path) -> str:
    return log_path.read_text()[-3000:] if log_path.exists() else "(its output went elsewhere)"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def docs(demo_data) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    with open(demo_data / "corpus.jsonl", encoding="utf-8") as f:
        for _, line in zip(range(N_DOCS), f):
            d = json.loads(line)
            ids.append(d["_id"])
            texts.append((d["title"] + " " + d["text"]).strip())
    return ids, texts


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_path, docs):
    """A served collection (fp32 tiny model, API key, small limits)."""
    from m3search import Collection

    work = tmp_path_factory.mktemp("server")
    coll = work / "coll"
    with Collection.create(coll, model=str(tiny_model_path), dtype="float32") as c:
        c.add(docs[1], ids=docs[0], metadata=[{"n": i, "half": "a" if i < N_DOCS // 2 else "b"} for i in range(N_DOCS)])
    proc, url = _start(
        [
            "-c",
            str(coll),
            "--dtype",
            "float32",
            "--api-key",
            KEY,
            "--max-batch",
            str(MAX_BATCH),
            "--max-body-mb",
            str(MAX_BODY_MB),
            "--max-queue",
            str(MAX_QUEUE),
        ],
        work,
        collection=coll,
    )
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    try:
        yield client
    finally:
        client.close()
        _stop(proc)


def _is_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) - {"ids", "code"} == {"type", "message"}, (
        body
    )  # ids, code: id errors
    assert body["error"]["message"] and "Traceback" not in r.text
    return body["error"]


def test_health_open_everything_else_needs_the_key(server):
    bare = httpx.Client(base_url=str(server.base_url), timeout=30)
    assert bare.get("/health").json() == {"status": "ok"}
    for method, path in [
        ("GET", "/info"),
        ("POST", "/v1/embeddings"),
        ("POST", "/embed"),
        ("POST", "/search"),
        ("POST", "/documents"),
        ("DELETE", "/documents"),
        ("GET", "/documents/1"),
    ]:
        err = _is_error(bare.request(method, path, json={}), 401)
        assert err["type"] == "unauthorized"
    _is_error(bare.get("/info", headers={"Authorization": "Bearer wrong"}), 401)
    assert bare.get("/info", headers={"X-API-Key": KEY}).status_code == 200
    info = server.get("/info").json()
    assert info["api_key_required"] is True and info["collection"]["count"] == N_DOCS
    assert info["limits"]["max_batch"] == MAX_BATCH and info["model"]["dtype"] == "float32"
    assert info["limits"]["max_queue"] == MAX_QUEUE
    assert server.get("/docs").status_code == 200 and "/v1/embeddings" in server.get("/openapi.json").json()["paths"]


def test_openai_client_gets_our_dense_vectors(server, tiny_encoder):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=str(server.base_url).rstrip("/") + "/v1", api_key=KEY, max_retries=0)
    texts = ["The boundary layer separates.", "Die Grenzschicht löst sich ab.", ""]
    ref = tiny_encoder.encode(texts, sparse=False, colbert=False)
    out = client.embeddings.create(model="text-embedding-3-small", input=texts)  # the client asks for base64
    assert out.model == "text-embedding-3-small"
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    np.testing.assert_allclose(got, ref.dense, atol=1e-6)
    assert [d.index for d in out.data] == [0, 1, 2]
    assert out.usage.prompt_tokens == out.usage.total_tokens == int(ref.n_tokens.sum())
    single = client.embeddings.create(model="x", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, ref.dense[0], atol=1e-6)


def test_openai_wire_format(server, tiny_encoder):
    r = server.post("/v1/embeddings", json={"input": ["a b c"], "model": "bge-m3", "encoding_format": "base64"})
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, tiny_encoder.encode(["a b c"], sparse=False, colbert=False).dense[0], atol=1e-6)
    _is_error(server.post("/v1/embeddings", json={"input": [[1, 2, 3]]}), 422)  # token arrays: not supported
    err = _is_error(server.post("/v1/embeddings", json={"input": "x", "dimensions": 8}), 400)
    assert "dimensions" in err["message"]


def test_embed_returns_all_three_outputs(server, tiny_encoder):
    texts = ["hybrid retrieval with sparse weights", "ColBERT late interaction"]
    ref = tiny_encoder.encode(texts)
    body = server.post("/embed", json={"input": texts, "colbert": True, "tokens": True}).json()
    assert body["usage"]["prompt_tokens"] == int(ref.n_tokens.sum()) and body["truncated"] == 0
    for i, item in enumerate(body["data"]):
        assert item["index"] == i and item["n_tokens"] == int(ref.n_tokens[i])
        np.testing.assert_allclose(item["dense"], ref.dense[i], atol=1e-6)
        row = ref.sparse[i]
        assert item["sparse"]["indices"] == row.indices.tolist()
        np.testing.assert_allclose(item["sparse"]["values"], row.data, atol=1e-6)
        assert item["sparse"]["tokens"] == tiny_encoder.convert_id_to_token(row.indices.tolist())
        o = ref.colbert_offsets
        np.testing.assert_allclose(np.array(item["colbert"]), ref.colbert[o[i] : o[i + 1]], atol=1e-6)
    only = server.post("/embed", json={"input": "x", "dense": False, "sparse": True}).json()["data"][0]
    assert set(only) == {"index", "n_tokens", "sparse"} and "tokens" not in only["sparse"]
    _is_error(server.post("/embed", json={"input": "x", "dense": False, "sparse": False}), 400)


def test_documents_lifecycle_and_search(server, tiny_encoder, docs):
    new = [
        {"id": "new-1", "text": "Wie funktioniert die Grenzschicht?", "metadata": {"lang": "de", "n": 1000}},
        {"id": "new/2", "text": "boundary layer control by suction", "metadata": {"lang": "en", "n": 1001}},
    ]
    r = server.post("/documents", json={"documents": new})
    assert r.status_code == 200 and r.json() == {"ids": ["new-1", "new/2"], "count": N_DOCS + 2}
    err = _is_error(server.post("/documents", json={"documents": new[:1]}), 409)
    assert "new-1" in err["message"]
    changed = {**new[0], "text": "Grenzschicht und Absaugung", "metadata": {"lang": "de", "n": 7}}
    assert server.post("/documents", json={"documents": [changed], "upsert": True}).json()["count"] == N_DOCS + 2
    got = server.get("/documents/new-1").json()
    assert got == {"id": "new-1", "text": "Grenzschicht und Absaugung", "metadata": {"lang": "de", "n": 7}}
    assert server.get("/documents/new/2").json()["text"] == new[1]["text"]  # ids with slashes
    _is_error(server.get("/documents/nope"), 404)

    # search: dense mode equals the exhaustive oracle over the stored texts
    from helpers import dense_doc_scores

    ids = docs[0] + ["new-1", "new/2"]
    texts = docs[1] + [changed["text"], new[1]["text"]]
    query = "suction control of the boundary layer"
    s = dense_doc_scores(tiny_encoder, [query], texts)[0]  # each document's best window
    order = sorted(range(len(ids)), key=lambda i: (-s[i], ids[i]))
    hits = server.post("/search", json={"query": query, "mode": "dense", "k": 5}).json()["hits"]
    assert [h["id"] for h in hits] == [ids[i] for i in order[:5]]
    np.testing.assert_allclose([h["score"] for h in hits], [s[i] for i in order[:5]], atol=1e-4)

    # every Collection.search argument passes through
    body = {
        "query": query,
        "k": 3,
        "mode": "dense+sparse",
        "fusion": "rrf",
        "weights": [1, 1, 0],
        "candidates": 20,
        "filter": {"lang": {"in": ["de", "en"]}},
        "explain": True,
    }
    hits = server.post("/search", json=body).json()["hits"]
    assert {h["id"] for h in hits} == {"new-1", "new/2"}
    assert hits[0]["explain"]["fusion"] == "rrf" and set(hits[0]["explain"]["contributions"]) == {"dense", "sparse"}
    hits = server.post("/search", json={"query": query, "filter": {"half": "b", "n": {"gte": 50}}}).json()["hits"]
    assert sorted(h["metadata"]["n"] for h in hits) == list(range(50, N_DOCS))

    out = server.request("DELETE", "/documents", json={"ids": ["new-1", "new/2", "ghost"]}).json()
    assert out == {"deleted": ["new-1", "new/2"], "missing": ["ghost"]}
    assert server.get("/info").json()["collection"]["count"] == N_DOCS


@pytest.mark.parametrize(
    "method, path, payload, status",
    [
        ("POST", "/search", {"query": "x", "k": 0}, 422),
        ("POST", "/search", {"query": "x", "mode": "fuzzy"}, 400),  # the library's check, as dense+dense
        ("POST", "/search", {"query": "x", "mode": "dense+dense"}, 400),
        ("POST", "/search", {"query": "x", "weights": [1, 2]}, 422),
        ("POST", "/search", {"query": "x", "weights": [-1, 0, 0]}, 422),
        ("POST", "/search", {"query": "x", "weights": [0, 0, 0]}, 400),
        ("POST", "/search", {"query": "  "}, 400),
        ("POST", "/search", {"query": "x", "fusion": "max"}, 422),
        ("POST", "/search", {"query": "x", "filter": {"a": {"near": 1}}}, 400),
        ("POST", "/search", {"query": "x", "k": 10**6}, 413),  # over a limit: 413 (issue 12, docs/usage.md)
        ("POST", "/search", {"query": "x", "k": 5000}, 413),
        ("POST", "/search", {"query": "x", "surprise": 1}, 422),
        ("POST", "/search", [1, 2], 422),
        ("POST", "/embed", {"input": []}, 422),
        ("POST", "/embed", {"input": ["x"] * (MAX_BATCH + 1)}, 413),
        ("POST", "/embed", {"input": "x", "max_length": 1}, 422),
        ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422),
        ("POST", "/v1/embeddings", {"input": "x" * int(MAX_BODY_MB * 2**20)}, 413),
        ("POST", "/documents", {"documents": []}, 422),
        ("POST", "/documents", {"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, 422),
        ("POST", "/documents", {"documents": [{"id": "", "text": "x"}]}, 422),
        ("POST", "/documents", {"documents": [{"id": "a", "text": "x"}, {"text": "y"}]}, 422),
        ("POST", "/documents", {"documents": [{"text": "x", "metadata": [1]}]}, 422),
        ("DELETE", "/documents", {"ids": []}, 422),
        ("GET", "/nowhere", None, 404),
        ("PUT", "/search", {}, 405),
    ],
)
def test_bad_requests_get_4xx_with_one_error_shape(server, method, path, payload, status):
    _is_error(server.request(method, path, json=payload), status)


def test_malformed_and_oversized_bodies(server):
    _is_error(server.post("/search", content=b'{"query": ', headers={"Content-Type": "application/json"}), 422)
    _is_error(server.post("/search", content=b"query=x", headers={"Content-Type": "text/plain"}), 422)

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(40):
            yield b" " * 10_000

    _is_error(server.post("/search", content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_embeddings_only_server_and_refusals(tmp_path, tiny_model_path):
    proc, url = _start(["--model", str(tiny_model_path), "--dtype", "float32"], tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:")
        c = httpx.Client(base_url=url, timeout=60)
        assert c.get("/info").json()["collection"] is None  # no key configured: open
        assert len(c.post("/v1/embeddings", json={"input": "x"}).json()["data"][0]["embedding"]) == 64
        err = _is_error(c.post("/search", json={"query": "x"}), 409)
        assert "no collection" in err["message"]
    finally:
        _stop(proc)


def _schemathesis(url: str, max_examples: int, phases: str, extra: list[str] = ()) -> subprocess.CompletedProcess:
    st = Path(sys.executable).with_name("schemathesis")
    if not st.exists():
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    return subprocess.run(
        [
            str(st),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-n",
            str(max_examples),
            "--phases",
            phases,
            "-H",
            f"Authorization: Bearer {KEY}",
            "--no-color",
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--request-timeout",
            "60",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _check_fuzz(proc: subprocess.CompletedProcess) -> None:
    import re

    assert proc.returncode == 0, proc.stdout[-6000:]
    m = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 100, proc.stdout[-3000:]
    assert "Server error" not in proc.stdout and "not_a_server_error" not in proc.stdout


@pytest.fixture()
def fuzz_server(tmp_path, tiny_model_path, docs):
    from m3search import Collection

    coll = tmp_path / "coll"
    with Collection.create(coll, model=str(tiny_model_path), dtype="float32") as c:
        c.add(docs[1][:20], ids=docs[0][:20])
    proc, url = _start(
        ["-c", str(coll), "--dtype", "float32", "--api-key", KEY, "--max-batch", "8"], tmp_path, collection=coll
    )
    try:
        yield url
    finally:
        _stop(proc)


def test_schemathesis_finds_no_server_error(fuzz_server):
    """Schema-driven fuzzing of every operation (coverage + fuzzing phases, 10 examples each): zero 5xx."""
    proc = _schemathesis(fuzz_server, 10, "coverage,fuzzing")
    _check_fuzz(proc)


@pytest.mark.heavy
def test_schemathesis_long_run(fuzz_server):
    """Longer run with the stateful phase (links between operations), 100 examples per operation."""
    proc = _schemathesis(fuzz_server, 100, "examples,coverage,fuzzing,stateful")
    _check_fuzz(proc)


class _Stoppable:
    """`serve`'s uvicorn Server class in a thread, in process (so a test can slow the collection down), with a
    short graceful-shutdown period; :meth:`stop` is SIGTERM."""

    def __init__(self, coll, grace: float = 0.3) -> None:
        import threading

        uvicorn = pytest.importorskip("uvicorn")
        from m3search.server import Resources, Settings, _bind, _uvicorn_server, create_app

        self.app = create_app(Settings(), resources=Resources(collection=coll))
        self.sock = _bind("127.0.0.1", 0)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=grace)
        self.server = _uvicorn_server()(config, self.app.state.stopping)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answers: dict = {}
        self.clients: list = []

    def __enter__(self) -> _Stoppable:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.01)
        return self

    def send(self, name: str, method: str, path: str, body: dict) -> None:
        """``method path`` with the JSON ``body`` in a thread of its own; its response lands in ``answers[name]``."""
        import threading

        def request() -> None:
            self.answers[name] = httpx.request(method, self.url + path, json=body, timeout=60)

        self.clients.append(threading.Thread(target=request))
        self.clients[-1].start()

    def stop(self) -> None:
        import signal

        self.server.handle_exit(signal.SIGTERM, None)
        for client in self.clients:
            client.join(60)
        self.thread.join(60)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.sock.close()


def _slow_long_write(coll, monkeypatch, encoder):
    """Make ``coll`` write a long document in pieces of about a window, each 0.3 s; returns the event set when
    it writes and a text long enough to be written for several seconds (the server's ingest rounds of 1,024
    tokens are its pieces)."""
    import threading

    from m3search.testing import BUILTIN_TEXTS

    monkeypatch.setattr("m3search.collection.PIECE_BYTES", 20 * 4 * encoder.colbert_dim)
    real, writing = coll.engine.upsert_long, threading.Event()

    def slowly(pieces, **kw):
        def each():
            for piece in pieces:
                writing.set()
                time.sleep(0.3)
                yield piece

        real(each(), **kw)

    monkeypatch.setattr(coll.engine, "upsert_long", slowly)
    return writing, " ".join(BUILTIN_TEXTS * 10)


def test_a_write_longer_than_the_grace_period_is_answered_at_shutdown(tmp_path, tiny_encoder, monkeypatch):
    """SIGTERM while one document is written in pieces for longer than uvicorn's graceful-shutdown period (5 s in
    `serve`; 0.3 s here, the write at least 0.9 s): uvicorn cancelled the request, so its client got uvicorn's plain-text
    500 while the write went on and ended whole. Now the client gets the write's own answer, the server stops
    after it, and the document is stored whole."""
    from m3search import Collection

    coll = Collection.create(tmp_path / "coll", model=tiny_encoder, window=16, stride=12)
    writing, text = _slow_long_write(coll, monkeypatch, tiny_encoder)
    with _Stoppable(coll) as served:
        served.send("long", "POST", "/documents", {"documents": [{"id": "L", "text": text}]})
        assert writing.wait(30), served.answers
        served.stop()
    r = served.answers["long"]
    assert r.status_code == 200 and r.json() == {"ids": ["L"], "count": 1}, (r.status_code, r.text)
    assert not served.thread.is_alive()
    with Collection.open(tmp_path / "coll") as c:
        [doc] = c.get(["L"])
        assert doc.text == text and doc.windows > 20 and c.count() == 1


@pytest.mark.parametrize(
    "method, body",
    [("POST", {"documents": [{"id": "Q", "text": "queued behind the long write"}]}), ("DELETE", {"ids": ["A"]})],
)
def test_a_write_queued_behind_a_long_write_is_refused_cleanly_at_shutdown(
    tmp_path, tiny_encoder, monkeypatch, method, body
):
    """SIGTERM while a long write is in progress and another write (a POST or a DELETE /documents) waits for its
    turn: uvicorn cancelled the waiting one after its grace period, and its client got uvicorn's plain-text 500.
    Now it gets our 503 with ``Retry-After``, saying nothing of it was done, and nothing of it was; the long write
    is answered and stored whole."""
    import asyncio
    import threading

    from m3search import Collection

    coll = Collection.create(tmp_path / "coll", model=tiny_encoder, window=16, stride=12)
    coll.add(["a short document"], ids=["A"])
    writing, text = _slow_long_write(coll, monkeypatch, tiny_encoder)

    class Gate(asyncio.Lock):  # the server's write gate, telling when a write waits for its turn
        queued = threading.Event()

        async def acquire(self) -> bool:
            if self.locked():
                self.queued.set()
            return await super().acquire()

    with _Stoppable(coll) as served:
        served.app.state.write_gate = gate = Gate()
        served.send("long", "POST", "/documents", {"documents": [{"id": "L", "text": text}]})
        assert writing.wait(30), served.answers
        served.send("queued", method, "/documents", body)
        assert gate.queued.wait(30), served.answers
        served.stop()
    r = served.answers["queued"]
    assert r.status_code == 503 and r.headers.get("Retry-After"), (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "unavailable", error
    assert "shutting down" in error["message"] and "nothing of it was" in error["message"], error
    assert served.answers["long"].status_code == 200, served.answers["long"].text
    with Collection.open(tmp_path / "coll") as c:
        long, short, queued = c.get(["L", "A", "Q"])
        assert long.text == text and short is not None and queued is None and c.count() == 2


def test_a_delete_in_progress_at_shutdown_is_answered_whole(tmp_path, tiny_encoder, monkeypatch):
    """SIGTERM while a DELETE /documents takes longer than the grace period: uvicorn cancelled it (plain-text 500)
    and the server closed the collection under the delete still running in its thread. Now the delete ends whole,
    its client gets its answer, and the collection closes after it."""
    import threading

    from m3search import Collection

    coll = Collection.create(tmp_path / "coll", model=tiny_encoder)
    coll.add(["one", "two", "three"], ids=["a", "b", "c"])
    real, deleting = coll.engine.delete, threading.Event()

    def slowly(ids):
        deleting.set()
        time.sleep(1.0)
        return real(ids)

    monkeypatch.setattr(coll.engine, "delete", slowly)
    with _Stoppable(coll) as served:
        served.send("delete", "DELETE", "/documents", {"ids": ["a", "c", "x"]})
        assert deleting.wait(30), served.answers
        served.stop()
    r = served.answers["delete"]
    assert r.status_code == 200 and r.json() == {"deleted": ["a", "c"], "missing": ["x"]}, (r.status_code, r.text)
    with Collection.open(tmp_path / "coll") as c:
        assert [d is not None for d in c.get(["a", "b", "c"])] == [False, True, False] and c.count() == 1


def test_a_write_after_the_shutdown_began_is_refused_before_it_starts(tmp_path, tiny_encoder):
    """A DELETE or POST /documents that comes to its turn once the shutdown began (``stopping``) is refused whole
    with our 503 and ``Retry-After`` (the delete used to run, on a collection about to close under it)."""
    from fastapi.testclient import TestClient

    from m3search import Collection
    from m3search.server import Resources, Settings, create_app

    coll = Collection.create(tmp_path / "coll", model=tiny_encoder)
    coll.add(["one"], ids=["a"])
    app = create_app(Settings(), resources=Resources(collection=coll))
    with TestClient(app) as client:
        app.state.stopping.set()
        answers = [
            client.request("DELETE", "/documents", json={"ids": ["a"]}),
            client.post("/documents", json={"documents": [{"id": "b", "text": "two"}]}),
        ]
    for r in answers:
        assert r.status_code == 503 and r.headers.get("Retry-After"), (r.status_code, r.text)
        assert "shutting down; nothing of it was" in r.json()["error"]["message"], r.text
    with Collection.open(tmp_path / "coll") as c:
        assert [d is not None for d in c.get(["a", "b"])] == [True, False]


def test_a_write_stopped_by_the_shutdown_carries_its_library_code(tmp_path, tiny_encoder, monkeypatch):
    """The 503 of a write stopped between its batches (the library's IngestInterrupted) had no error.code, unlike
    every other library error: now "IngestInterrupted". A write refused before it started (the server's own
    ShuttingDown, no library error) still has none. M3SearchClient raises it as the library's IngestInterrupted."""
    from fastapi.testclient import TestClient

    from m3search import Collection
    from m3search.client import M3SearchClient
    from m3search.errors import IngestInterrupted
    from m3search.server import INGEST_WRITE_BATCH, Resources, Settings, create_app

    coll = Collection.create(tmp_path / "coll", model=tiny_encoder)
    app = create_app(Settings(), resources=Resources(collection=coll))
    real = coll.engine.upsert

    def then_stop(*args, **kwargs):  # the shutdown begins during the first batch's write
        out = real(*args, **kwargs)
        app.state.stopping.set()
        return out

    monkeypatch.setattr(coll.engine, "upsert", then_stop)
    docs = [{"id": f"d{i}", "text": f"note {i}"} for i in range(INGEST_WRITE_BATCH + 2)]
    with TestClient(app) as client:
        r = client.post("/documents", json={"documents": docs})
        refused = client.post("/documents", json={"documents": docs[:1]})
        app.state.stopping.clear()
        with pytest.raises(RuntimeError, match="shutting down; the first 4 of 5 documents were written") as raised:
            M3SearchClient("http://testserver", http_client=client).add(["a", "b", "c", "d", "e"])
    assert type(raised.value) is IngestInterrupted and (len(raised.value.ids), raised.value.total) == (4, 5)
    assert r.status_code == 503 and r.headers.get("Retry-After"), (r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == "IngestInterrupted" and error["ids"] == [d["id"] for d in docs[:INGEST_WRITE_BATCH]], error
    assert refused.status_code == 503 and "code" not in refused.json()["error"], refused.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise():
    """``serve`` caps glibc's arenas (memory flat under load) but never overrides MALLOC_ARENA_MAX."""
    code = "from m3search.server import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    capped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    kept = subprocess.run(
        [sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True, text=True, check=True
    )
    assert (capped.stdout.strip(), kept.stdout.strip()) == ("True", "False")


def test_sigterm_during_a_long_write_answers_what_was_written_and_stops_cleanly(tmp_path, tiny_model_path, docs):
    """SIGTERM to `m3search serve` in the middle of a long POST /documents: the write stops between two of its
    engine writes, the request gets our 503 naming the documents written, the process exits 0 without a
    traceback, and after reopening exactly those documents are stored, whole."""
    import signal
    import threading

    from m3search import Collection

    coll = tmp_path / "coll"
    Collection.create(coll, model=str(tiny_model_path), dtype="float32").close()
    proc, url = _start(["-c", str(coll), "--dtype", "float32"], tmp_path, collection=coll)
    n = 256  # the default max_batch: 64 engine writes of 4 documents
    texts = [docs[1][i % N_DOCS] for i in range(n)]
    payload = {"documents": [{"id": f"d{i}", "text": t, "metadata": {"i": i}} for i, t in enumerate(texts)]}
    answer: dict = {}

    def post() -> None:
        try:
            answer["response"] = httpx.post(url + "/documents", json=payload, timeout=120)
        except httpx.HTTPError as exc:
            answer["error"] = exc

    def encoded() -> float:  # windows encoded so far; 8: past the first batch (4 documents), the slowest
        lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith('m3search_texts_total{priority="background"}'))

    client = threading.Thread(target=post)
    client.start()
    deadline = time.monotonic() + 60
    while encoded() < 8 and client.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.is_alive(), "the request ended before the signal: make it longer"
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    client.join(60)
    answered = time.monotonic() - signalled
    returncode = proc.wait(60)
    log = (tmp_path / "server.log").read_text()
    print(f"answered {answered:.2f} s after SIGTERM, exited {time.monotonic() - signalled:.2f} s after it")
    assert "error" not in answer, answer.get("error")
    r = answer["response"]
    assert r.status_code == 503, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "unavailable" and "shutting down" in error["message"], error
    written = error["ids"]
    assert written == [f"d{i}" for i in range(len(written))] and 0 < len(written) < n, written
    assert returncode == 0 and "Traceback" not in log, (returncode, log[-3000:])
    with Collection.open(coll) as c:
        assert c.count() == len(written)
        stored = c.get([f"d{i}" for i in range(n)])
        assert [d is not None for d in stored] == [i < len(written) for i in range(n)]
        for i, d in enumerate(stored[: len(written)]):
            assert (d.text, d.metadata) == (texts[i], {"i": i})


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_model_loads_stops_cleanly(tmp_path, tiny_model_path, sig):
    """SIGTERM (or Ctrl-C) to `m3search serve` before it serves, while it loads its model: the collection closes,
    its server.json goes, exit 0 with one line (SIGTERM killed the process there: exit 143, server.json left)."""
    from m3search import Collection

    coll = tmp_path / "coll"
    Collection.create(coll, model=str(tiny_model_path), dtype="float32").close()
    script = f"""
import os, signal, sys, time
from m3search import encoder
from m3search.cli import main

def loading(*args, **kwargs):  # the signal comes while the model loads
    assert os.path.exists(sys.argv[1] + "/server.json")
    os.kill(os.getpid(), signal.{sig})
    time.sleep(60)

encoder.M3Encoder.from_pretrained = loading
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
main(["serve", "-c", sys.argv[1], "--port", "0"])
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(coll)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.strip().splitlines() == [f"m3search: stopped before serving collection {coll}"], proc.stderr
    assert not (coll / "server.json").exists()
    with Collection.open(coll) as c:  # the lock is free, the collection whole
        assert c.count() == 0


@pytest.mark.parametrize("unwritable", ["stdout full", "stdout closed pipe", "stderr full"])
def test_a_server_whose_output_cannot_be_written_serves_and_stops_cleanly(tmp_path, tiny_model_path, unwritable):
    """`m3search serve > /dev/full` (or into a pipe whose reader has gone) served, but each request's access line
    failed and logging printed a traceback for it, some 100 lines on stderr per request; `2>/dev/full` exited 1
    before serving (its "serving at" line could not be written). Now the access log says once that it cannot be
    written and is dropped, and a server whose stderr is full serves all the same; both stop with exit 0."""
    from m3search import Collection

    if "full" in unwritable and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (a device whose writes fail with ENOSPC) here")
    coll = tmp_path / "coll"
    Collection.create(coll, model=str(tiny_model_path), dtype="float32").close()
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    bad = write if "pipe" in unwritable else open("/dev/full", "w")
    log = open(tmp_path / "log", "w")
    streams = {"stderr": bad, "stdout": log} if unwritable.startswith("stderr") else {"stdout": bad, "stderr": log}
    try:
        proc, url = _start(["-c", str(coll), "--log-level", "info"], tmp_path, collection=coll, **streams)
    finally:
        os.close(write)
    try:
        assert [httpx.get(url + "/health", timeout=30).status_code for _ in range(3)] == [200] * 3
    finally:
        _stop(proc)
    said = (tmp_path / "log").read_text()
    assert proc.returncode == 0, said[-3000:]
    if unwritable.startswith("stderr"):
        assert said.count('"GET /health HTTP/1.1" 200') >= 3, said  # the access log, on stdout
    else:
        assert "Logging error" not in said and "Traceback" not in said, said[-3000:]
        assert said.count("the access log cannot be written to standard output") == 1, said
