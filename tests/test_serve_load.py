"""The server under concurrent load, over real HTTP: batching, backpressure, failures, metrics, TEI routes.

Why an in-process uvicorn (a thread, a loopback port the OS picks): the encoder can be
wrapped to be slow, held at a gate or poisoned, which a subprocess would not allow, while
requests, disconnects and status codes still go through a real HTTP stack.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from test_batching import WINDOWS, SlowEncoder  # noqa: E402

from m3search.server import Resources, Settings, _bind, create_app  # noqa: E402


@contextmanager
def serving(resources: Resources, **settings):
    app = create_app(Settings(**settings), resources=resources)
    sock = _bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) - {"ids", "code"} == {"type", "message"}, (
        body
    )  # ids, code: id errors
    return body["error"]


def _accepted_nodelay(listener: socket.socket) -> int:
    """TCP_NODELAY of the connection asyncio accepts on ``listener`` (as uvicorn serves it)."""
    import asyncio

    async def main() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    return asyncio.run(main())


def test_served_connections_do_not_wait_for_delayed_acks():
    """Nagle's algorithm off on every accepted connection: uvicorn writes a response's headers
    and body separately, and with Nagle on the body waits for the client's delayed ACK (+40 ms
    on every small response, measured: /health 44 ms -> 1.6 ms, /v1/embeddings 64 -> 22 ms)."""
    plain = socket.socket()  # what the server used to bind: proto 0, so asyncio left Nagle on
    plain.bind(("127.0.0.1", 0))
    plain.listen(8)
    assert _accepted_nodelay(plain) == 0
    assert _accepted_nodelay(_bind("127.0.0.1", 0)) != 0


def test_concurrent_clients_are_batched_and_get_their_own_rows(tiny_encoder):
    slow = SlowEncoder(tiny_encoder, delay=0.03)
    texts = [f"query number {i} about wings" for i in range(16)]
    with serving(Resources(encoder=slow)) as (url, _):

        def one(text):
            return httpx.post(url + "/v1/embeddings", json={"input": text}, timeout=60).json()["data"][0]["embedding"]

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(one, texts))
        metrics = httpx.get(url + "/metrics", timeout=10).text
    np.testing.assert_allclose(np.array(got), tiny_encoder.encode(texts).dense, atol=1e-5)
    assert len(slow.calls) < 16 and max(len(c) for c in slow.calls) > 1
    assert 'm3search_requests_total{method="POST",route="/v1/embeddings",status="200"} 16.0' in metrics
    for name in ("m3search_request_seconds_bucket", "m3search_queue_texts", "m3search_batch_texts_sum"):
        assert name in metrics
    assert 'm3search_texts_total{priority="interactive"} 16.0' in metrics


def test_full_queue_is_429_with_retry_after_and_timeout_is_503(tiny_encoder):
    slow = SlowEncoder(tiny_encoder)
    slow.gate.clear()
    with serving(Resources(encoder=slow), max_queue=3, request_timeout=1.5) as (url, _):
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(httpx.post, url + "/v1/embeddings", json={"input": ["a", "b"]}, timeout=30)
            time.sleep(0.3)  # the worker holds it at the gate
            r = httpx.post(url + "/v1/embeddings", json={"input": ["c", "d"]}, timeout=30)
            assert "queued" in _error(r, 429)["message"] and int(r.headers["Retry-After"]) >= 1
            r = httpx.post(url + "/v1/embeddings", json={"input": "c"}, timeout=30)  # fits, but cannot start
            assert "not started within" in _error(r, 503)["message"] and r.headers["Retry-After"] == "1"
            slow.gate.set()
            assert held.result().status_code == 200  # started before its timeout: not cut off
        assert httpx.post(url + "/v1/embeddings", json={"input": "after"}, timeout=30).status_code == 200
        metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'route="/v1/embeddings",status="429"} 1.0' in metrics
    assert 'route="/v1/embeddings",status="503"} 1.0' in metrics


def test_a_failing_request_fails_alone(tiny_encoder):
    slow = SlowEncoder(tiny_encoder, poison="POISON")
    slow.gate.clear()
    with serving(Resources(encoder=slow)) as (url, _):
        with ThreadPoolExecutor(5) as pool:
            good = [pool.submit(httpx.post, url + "/embed", json={"input": f"good {i}"}, timeout=30) for i in range(4)]
            bad = pool.submit(httpx.post, url + "/embed", json={"input": ["fine", "POISON"]}, timeout=30)
            time.sleep(0.3)
            slow.gate.set()
            assert "poisoned" in _error(bad.result(), 400)["message"]
            assert [g.result().status_code for g in good] == [200] * 4
        assert httpx.post(url + "/embed", json={"input": "later"}, timeout=30).status_code == 200


def test_a_client_that_leaves_costs_no_work(tiny_encoder):
    slow = SlowEncoder(tiny_encoder)
    slow.gate.clear()
    with serving(Resources(encoder=slow)) as (url, app):
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, url + "/v1/embeddings", json={"input": "holder"}, timeout=30)
            time.sleep(0.3)  # the worker is inside encode('holder'), at the gate
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/embeddings", json={"input": "abandoned"}, timeout=0.5)
            time.sleep(0.3)
            slow.gate.set()
            assert held.result().status_code == 200
        deadline = time.monotonic() + 5
        while app.state.batcher.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.batcher.depth == 0
    assert not any("abandoned" in c for c in slow.calls)


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_model_path):
    from m3search import Collection

    path = tmp_path_factory.mktemp("load") / "coll"
    texts = [f"document {i} on {w} flow" for i, w in enumerate(["laminar", "turbulent", "supersonic", "heated"] * 5)]
    with Collection.create(path, model=str(tiny_model_path), dtype="float32") as c:
        c.add(texts, ids=[f"d{i}" for i in range(len(texts))])
    return path


def test_search_and_documents_through_the_batcher(collection, tiny_encoder):
    from m3search import Collection

    coll = Collection.open(collection, dtype="float32")
    expected = [h.id for h in coll.search("turbulent flow", k=5)]
    slow = SlowEncoder(coll.encoder)
    coll._encoder = slow
    bad = [
        ({"query": "x", "filter": {"year": {"near": 3}}}, 400),
        ({"query": "x", "filter": {"year": {"gte": "x"}}}, 400),
        ({"query": "   "}, 400),
        ({"query": "x", "k": 0}, 422),
    ]
    with serving(Resources(collection=coll)) as (url, _):
        r = httpx.post(url + "/search", json={"query": "turbulent flow", "k": 5}, timeout=30)
        assert [h["id"] for h in r.json()["hits"]] == expected
        calls = len(slow.calls)
        for payload, status in bad:
            _error(httpx.post(url + "/search", json=payload, timeout=30), status)
        r = httpx.post(url + "/documents", json={"documents": [{"id": "d1", "text": "taken"}]}, timeout=30)
        _error(r, 409)
        assert len(slow.calls) == calls, "a refused request reached the encoder"
        r = httpx.post(url + "/documents", json={"documents": [{"id": "new", "text": "brand new text"}]}, timeout=30)
        assert r.status_code == 200 and r.json()["count"] == 21
        assert slow.calls[-1][0] == WINDOWS and slow.threads[-1] == "m3search-batcher"  # ingest on the worker
        stored = httpx.get(url + "/documents/new", timeout=30).json()
        assert stored["text"] == "brand new text"
    assert coll.encoder is slow  # the app gave the collection its own encoder back


def test_embed_colbert_as_base64(tiny_encoder):
    with serving(Resources(encoder=tiny_encoder)) as (url, _):
        body = {"input": ["one text", "and another one"], "dense": False, "sparse": False, "colbert": True}
        floats = httpx.post(url + "/embed", json=body, timeout=30).json()["data"]
        packed = httpx.post(url + "/embed", json={**body, "colbert_format": "base64"}, timeout=30).json()["data"]
    for f, p in zip(floats, packed):
        rows = np.frombuffer(base64.b64decode(p["colbert"]), "<f4").reshape(-1, tiny_encoder.colbert_dim)
        np.testing.assert_allclose(rows, np.array(f["colbert"]), atol=1e-6)


def test_tei_routes_with_huggingface_hub_client(tiny_encoder):
    hub = pytest.importorskip("huggingface_hub")
    texts = ["hello world", "a second, longer text about heat transfer"]
    ref = tiny_encoder.encode(texts)
    with serving(Resources(encoder=tiny_encoder), api_key="k") as (url, _):
        client = hub.InferenceClient(model=url + "/tei", token="k")
        vec = client.feature_extraction(texts[0])
        np.testing.assert_allclose(np.asarray(vec)[0], ref.dense[0], atol=1e-5)
        h = {"Authorization": "Bearer k"}
        dense = httpx.post(url + "/tei/embed", json={"inputs": texts}, headers=h, timeout=30).json()
        np.testing.assert_allclose(np.array(dense), ref.dense, atol=1e-5)
        sparse = httpx.post(url + "/tei/embed_sparse", json={"inputs": texts}, headers=h, timeout=30).json()
        for i, pairs in enumerate(sparse):
            row = ref.sparse[i]
            assert [p["index"] for p in pairs] == row.indices.tolist()
            np.testing.assert_allclose([p["value"] for p in pairs], row.data, atol=1e-5)
        tokens = httpx.post(url + "/tei/embed_all", json={"inputs": texts[1]}, headers=h, timeout=30).json()
        np.testing.assert_allclose(np.array(tokens[0]), ref.colbert_vecs[1], atol=1e-5)
        tok = httpx.post(url + "/tei/tokenize", json={"inputs": "hello world"}, headers=h, timeout=30).json()[0]
        assert [t["special"] for t in tok][0] and tok[-1]["special"]
        # Each token's text is its span of the input, spans in order, every non-space character covered (a
        # tokenizer may give a lone word-start piece the same span as the letter after it, so no equality of joins).
        words = [t for t in tok if not t["special"]]
        assert all(t["text"] == "hello world"[t["start"] : t["stop"]] for t in words)
        assert [t["start"] for t in words] == sorted(t["start"] for t in words)
        covered = {i for t in words for i in range(t["start"], t["stop"])}
        assert covered >= {i for i, c in enumerate("hello world") if c != " "}
        assert [t["id"] for t in tok] == tiny_encoder.tokenize(["hello world"], 512)[0][0]
        info = httpx.get(url + "/tei/info", headers=h, timeout=30).json()
        assert info["max_input_length"] == tiny_encoder.max_length and "embedding" in info["model_type"]
        long = "word " * (tiny_encoder.max_length + 10)
        _error(httpx.post(url + "/tei/embed", json={"inputs": long}, headers=h, timeout=30), 413)
        ok = httpx.post(url + "/tei/embed", json={"inputs": long, "truncate": True}, headers=h, timeout=30)
        assert ok.status_code == 200
        for payload in ({"inputs": "x", "normalize": False}, {"inputs": "x", "truncation_direction": "Left"}):
            _error(httpx.post(url + "/tei/embed", json=payload, headers=h, timeout=30), 400)
        _error(httpx.post(url + "/tei/embed", json={"inputs": []}, headers=h, timeout=30), 422)
        _error(httpx.post(url + "/tei/embed", json={"inputs": "x"}, timeout=30), 401)
