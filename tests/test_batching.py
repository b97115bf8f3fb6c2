"""The batching worker: rows back to the right caller, priorities, bounds, cancellation, failures.

Each test compares against a direct ``encode`` of the same texts on the tiny fp32 model, so
batching must not change a single number (beyond float rounding of different padding).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from m3search.batching import (
    BACKGROUND,
    INTERACTIVE,
    Batcher,
    ClientGone,
    QueueFull,
    RequestTimeout,
    concat_embeddings,
)

TEXTS = [
    "short query",
    "a somewhat longer passage about boundary layers on flat plates in supersonic flow",
    "x",
    "heat transfer " * 30,
    "another query here",
]


class SlowEncoder:
    """Wraps the tiny encoder: records every forward call, optionally slow or failing on a marker text."""

    def __init__(self, enc, delay: float = 0.0, poison: str | None = None):
        self.enc, self.delay, self.poison = enc, delay, poison
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode(self, texts, **kw):
        self.gate.wait(10)
        self.calls.append(list(texts))
        if self.delay:
            time.sleep(self.delay)
        if self.poison is not None and self.poison in texts:
            raise ValueError(f"poisoned input {self.poison!r}")
        return self.enc.encode(texts, **kw)


def _same(a, b) -> None:
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
    np.testing.assert_allclose(a.sparse.toarray(), b.sparse.toarray(), atol=1e-5)
    np.testing.assert_allclose(a.colbert, b.colbert, atol=1e-5)
    np.testing.assert_array_equal(a.colbert_offsets, b.colbert_offsets)
    np.testing.assert_array_equal(a.n_tokens, b.n_tokens)


def test_concurrent_callers_get_their_own_rows_in_shared_rounds(tiny_encoder):
    slow = SlowEncoder(tiny_encoder, delay=0.05)
    with Batcher(slow) as b:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(b.encode, [TEXTS[i % 5], TEXTS[(i + 1) % 5]]) for i in range(16)]
            results = [f.result(30) for f in futures]
    for i, got in enumerate(results):
        _same(got, tiny_encoder.encode([TEXTS[i % 5], TEXTS[(i + 1) % 5]]))
    assert len(slow.calls) < 16, "16 concurrent requests were not batched together"
    assert max(len(c) for c in slow.calls) > 2


def test_only_requested_outputs_and_own_truncation_count(tiny_encoder):
    with Batcher(tiny_encoder) as b:
        dense = b.submit(["hello world"], dense=True, sparse=False, colbert=False)
        cut = b.submit([TEXTS[3], "tiny"], max_length=8)
        d, c = dense.future.result(10), cut.future.result(10)
    assert d.sparse is None and d.colbert is None and d.colbert_offsets is None and d.truncated == 0
    ref = tiny_encoder.encode([TEXTS[3], "tiny"], max_length=8, warn_truncation=False)
    assert c.truncated == 1 == ref.truncated
    _same(c, ref)


def test_large_request_split_over_rounds_is_reassembled_in_order(tiny_encoder):
    texts = [f"document number {i} " + "word " * (i % 7) for i in range(40)]
    slow = SlowEncoder(tiny_encoder)
    with Batcher(slow, background_tokens=40) as b:
        got = b.encode(texts, priority=BACKGROUND)
    assert len(slow.calls) > 3  # many small rounds
    _same(got, tiny_encoder.encode(texts))


def test_queries_overtake_a_waiting_ingest(tiny_encoder):
    slow = SlowEncoder(tiny_encoder, delay=0.02)
    slow.gate.clear()  # hold the worker until both are queued
    with Batcher(slow, background_tokens=30) as b:
        ingest = b.submit([f"passage {i} about something" for i in range(30)], priority=BACKGROUND)
        time.sleep(0.05)
        query = b.submit(["the query"], priority=INTERACTIVE)
        slow.gate.set()
        query.future.result(10)
        assert not ingest.future.done()
        ingest.future.result(30)
    first_query_call = next(i for i, c in enumerate(slow.calls) if "the query" in c)
    assert first_query_call <= 1  # at most the one background round already started


def test_full_queue_refuses_with_a_retry_hint(tiny_encoder):
    slow = SlowEncoder(tiny_encoder)
    slow.gate.clear()
    with Batcher(slow, max_queue=5) as b:
        first = b.submit(["a", "b", "c"])
        with pytest.raises(QueueFull) as err:
            b.submit(["d", "e", "f"])
        assert err.value.retry_after >= 1
        second = b.submit(["d", "e"])  # exactly fills the bound
        slow.gate.set()
        first.future.result(10), second.future.result(10)
        assert b.depth == 0
        b.submit(["x"] * 50).future.result(10)  # an empty queue takes any size


def test_cancelled_and_expired_requests_cost_no_work(tiny_encoder):
    slow = SlowEncoder(tiny_encoder)
    slow.gate.clear()
    with Batcher(slow) as b:
        blocker = b.submit(["blocker"])
        time.sleep(0.05)  # the worker holds 'blocker' at the gate
        gone = b.submit(["cancelled text"])
        late = b.submit(["expired text"], timeout=0.01)
        gone.cancel()
        time.sleep(0.05)
        slow.gate.set()
        blocker.future.result(10)
        with pytest.raises(CancelledError):
            gone.future.result(10)
        with pytest.raises(RequestTimeout):
            late.future.result(10)
        assert b.depth == 0
    assert not any("cancelled text" in c or "expired text" in c for c in slow.calls)


def test_async_waiter_cancels_when_the_client_goes(tiny_encoder):
    slow = SlowEncoder(tiny_encoder)
    slow.gate.clear()

    async def scenario(b):
        blocker = b.submit(["blocker"])
        await asyncio.sleep(0.05)
        with pytest.raises(ClientGone):
            await b.encode_async(["abandoned"], gone=lambda: asyncio.sleep(0.01))
        slow.gate.set()
        await asyncio.wrap_future(blocker.future)
        got = await b.encode_async(["kept"], gone=lambda: asyncio.sleep(60))
        slow.gate.clear()
        holder = b.submit(["holder"])
        await asyncio.sleep(0.05)  # the worker holds 'holder' at the gate: 'too slow' cannot start
        with pytest.raises(RequestTimeout, match="not started"):
            await b.encode_async(["too slow"], timeout=0.05)
        slow.gate.set()
        await asyncio.wrap_future(holder.future)
        return got

    with Batcher(slow) as b:
        got = asyncio.run(scenario(b))
        _same(got, tiny_encoder.encode(["kept"]))
        time.sleep(0.1)
        assert b.depth == 0
    assert not any("abandoned" in c or "too slow" in c for c in slow.calls)


def test_a_started_request_is_not_cut_off_by_its_timeout(tiny_encoder):
    slow = SlowEncoder(tiny_encoder, delay=0.3)
    with Batcher(slow, background_tokens=8) as b:
        texts = [f"passage {i}" for i in range(5)]  # a round each: 1.5 s in all, starts at once (idle worker)
        _same(b.encode(texts, priority=BACKGROUND, timeout=0.6), tiny_encoder.encode(texts))
    assert len(slow.calls) == 5


def test_a_failing_request_fails_alone_and_the_worker_goes_on(tiny_encoder):
    slow = SlowEncoder(tiny_encoder, poison="POISON")
    slow.gate.clear()
    with Batcher(slow) as b:
        good = [b.submit([f"good {i}"]) for i in range(3)]
        bad = b.submit(["POISON", "fine"])
        slow.gate.set()
        with pytest.raises(ValueError, match="poisoned"):
            bad.future.result(10)
        for i, g in enumerate(good):
            _same(g.future.result(10), tiny_encoder.encode([f"good {i}"]))
        _same(b.encode(["after"]), tiny_encoder.encode(["after"]))  # the worker lives on
        assert b.depth == 0


def test_lone_client_pays_no_coalescing_wait(tiny_encoder):
    with Batcher(tiny_encoder, max_wait=0.5) as b:
        b.encode(["warm up"])
        t0 = time.perf_counter()
        for _ in range(5):
            b.encode(["one text"])
        assert (time.perf_counter() - t0) / 5 < 0.25  # a wait of max_wait would show


def test_close_fails_waiting_requests(tiny_encoder):
    slow = SlowEncoder(tiny_encoder)
    slow.gate.clear()
    b = Batcher(slow)
    first = b.submit(["first"])
    time.sleep(0.05)
    second = b.submit(["second"])
    threading.Timer(0.1, slow.gate.set).start()
    b.close()
    first.future.result(1)
    with pytest.raises(RuntimeError, match="shutting down"):
        second.future.result(1)
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(["late"])


def test_bad_arguments_are_refused_before_queueing(tiny_encoder):
    with Batcher(tiny_encoder) as b:
        for kwargs in ({"dense": False, "sparse": False, "colbert": False}, {"max_length": 1}, {"priority": 7}):
            with pytest.raises(ValueError):
                b.submit(["x"], **kwargs)
        with pytest.raises(TypeError):
            b.submit([])
        assert b.depth == 0


def test_concat_embeddings_matches_one_encode(tiny_encoder):
    whole = tiny_encoder.encode(TEXTS)
    _same(concat_embeddings([whole[0:2], whole[2:3], whole[3:5]]), whole)
