"""The batching worker: rows back to the right caller, priorities, bounds, cancellation, failures.

Each test compares against a direct ``encode`` of the same texts on the tiny fp32 model, so
batching must not change a single number (beyond float rounding of different padding).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from m3search.batching import (
    BACKGROUND,
    INTERACTIVE,
    BatchedEncoder,
    Batcher,
    ClientGone,
    QueueFull,
    RequestTimeout,
    concat_embeddings,
    release_openmp_pool,
)

TEXTS = [
    "short query",
    "a somewhat longer passage about boundary layers on flat plates in supersonic flow",
    "x",
    "heat transfer " * 30,
    "another query here",
]


WINDOWS = "<windows>"


class SlowEncoder:
    """Wraps the tiny encoder: records every forward call, optionally slow or failing on a marker text."""

    def __init__(self, enc, delay: float = 0.0, poison: str | None = None):
        self.enc, self.delay, self.poison = enc, delay, poison
        self.calls: list[list] = []
        self.threads: list[str] = []  # the thread of each call
        self.piece_started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode(self, texts, **kw):
        self.gate.wait(10)
        self.calls.append(list(texts))
        self.threads.append(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if self.poison is not None and self.poison in texts:
            raise ValueError(f"poisoned input {self.poison!r}")
        return self.enc.encode(texts, **kw)

    def iter_windows(self, texts, **kw):
        """Each piece's forward pass is recorded as one call ``[WINDOWS, tokens]``, gated and slowed."""
        pieces = self.enc.iter_windows(texts, **kw)

        def slowed():
            for piece in pieces:
                self.piece_started.set()
                self.gate.wait(10)
                self.calls.append([WINDOWS, int(piece.embeddings.n_tokens.sum())])
                self.threads.append(threading.current_thread().name)
                if self.delay:
                    time.sleep(self.delay)
                yield piece

        return slowed()

    def encode_windows(self, texts, **kw):
        (whole,) = self.iter_windows(texts, chunk_tokens=None, **kw)
        return whole


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
        with pytest.raises(RequestTimeout, match=r"not started within 0\.01 s"):  # its own timeout, not 60 s
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
        with pytest.raises(RequestTimeout, match=r"not started within 0\.05 s"):
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


def test_a_timeout_that_could_never_be_met_is_refused(tiny_encoder):
    """A negative, zero or NaN timeout timed the request out before it could start ("not started within 60 s",
    the default's), inf failed in the wait (OverflowError), "5" in a sum (TypeError): each is refused at submit,
    and at construction; None is the batcher's default."""
    bad = (-1.0, 0, 0.0, float("nan"), float("inf"), 1e300, "5", True, None)
    with Batcher(tiny_encoder) as b:
        for timeout in bad[:-1]:
            with pytest.raises(ValueError, match="timeout is not a number of seconds > 0"):
                b.submit(["x"], timeout=timeout)
            with pytest.raises(ValueError, match="timeout is not a number of seconds > 0"):
                b.submit_job(lambda: (None, 0, 0), timeout=timeout)
        assert b.depth == 0
        _same(b.encode(["x"], timeout=None), tiny_encoder.encode(["x"]))
        _same(b.encode(["x"], timeout=5), tiny_encoder.encode(["x"]))
    for timeout in bad:
        with pytest.raises(ValueError, match="timeout is not a number of seconds > 0"):
            Batcher(tiny_encoder, timeout=timeout).close()


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
    """A lone request is encoded at once, not after ``max_wait``. max_wait is long (5 s) so that a wait shows on a
    loaded machine too: 0.5 s with a 0.25 s bound failed once beside three test suites, where encoding alone was
    slow."""
    with Batcher(tiny_encoder, max_wait=5.0) as b:
        b.encode(["warm up"])
        t0 = time.perf_counter()
        for _ in range(3):
            b.encode(["one text"])
        assert (time.perf_counter() - t0) / 3 < 2.5  # a wait of max_wait would show


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
        for bad, exc in (([], ValueError), (None, TypeError), (["a", 3], TypeError)):  # encode's own check
            with pytest.raises(exc, match="texts"):
                b.submit(bad)
        assert b.depth == 0


def test_a_string_is_one_text_as_in_encode(tiny_encoder):
    """A bare string was queued as one text per character (nine rows for "some text")."""
    with Batcher(tiny_encoder) as b:
        _same(b.encode("some text"), tiny_encoder.encode("some text"))


def test_concat_embeddings_matches_one_encode(tiny_encoder):
    whole = tiny_encoder.encode(TEXTS)
    _same(concat_embeddings([whole[0:2], whole[2:3], whole[3:5]]), whole)


# ------------------------------------------------------------------ a collection's ingest through the worker

#: Letters, not digits, tell the documents (and the repeats within one) apart: the tiny model's
#: tokenizer has no digits when it is trained without ../shared, so "boundary0" and "boundary4" were
#: the same tokens there, the documents tied, and which of them came first was float noise.
_TAG = "abcdefgh"
LONG = [
    " ".join(
        f"{w}{_TAG[i]}{_TAG[r]}"
        for r in range(3 + i % 4)
        for w in ("boundary", "layer", "shock", "wave", "heat", "flux")
    )
    for i in range(8)
]
QUERIES = ["boundary layer", "shock wave heat", "flux"]


def _collection(path, encoder, **settings):
    from m3search import Collection

    return Collection.create(path, model=encoder, colbert_dtype="float32", window=16, stride=12, **settings)


def test_a_query_overtakes_a_queued_windowed_ingest_and_the_ingest_stores_what_add_stores(tiny_encoder, tmp_path):
    # rankings are compared in order, so no two documents (nor two windows of one) may be the same tokens:
    # LONG's words are all different, and none is <unk>
    (tokens,), _ = tiny_encoder.tokenize([" ".join(LONG)], 100_000)
    assert tiny_encoder.tokenizer.token_to_id("<unk>") not in tokens, "the tiny tokenizer cannot spell LONG"
    with _collection(tmp_path / "ref", tiny_encoder) as ref:
        ref.add(LONG, ids=[f"d{i}" for i in range(len(LONG))])
        expected = {(q, m): ref.search(q, mode=m, k=5) for q in QUERIES for m in ("all", "dense", "sparse", "colbert")}
        ref_windows = [len(ref.engine.get_windows([f"d{i}"])[0]) for i in range(len(LONG))]
    assert max(ref_windows) > 3  # long documents: several windows, so several pieces

    slow = SlowEncoder(tiny_encoder, delay=0.02)
    slow.gate.clear()
    with _collection(tmp_path / "served", tiny_encoder) as coll, Batcher(slow, background_tokens=40) as b:
        coll.use_encoder(BatchedEncoder(b))
        ingest = threading.Thread(target=coll.add, args=(LONG,), kwargs={"ids": [f"d{i}" for i in range(len(LONG))]})
        ingest.start()
        assert slow.piece_started.wait(10)  # the worker holds the ingest's first piece at the gate
        query = b.submit(["the query"], priority=INTERACTIVE)
        slow.gate.set()
        query.future.result(10)
        assert ingest.is_alive(), "the ingest finished before the query was answered"
        ingest.join(60)
        assert not ingest.is_alive()
        pieces = [c[1] for c in slow.calls if c[0] == WINDOWS]
        assert len(pieces) > 4 and max(pieces) <= 40 + 16  # round-sized pieces (a window may overhang the budget)
        assert slow.calls.index(["the query"]) == 1  # right after the piece that had started
        assert set(slow.threads) == {"m3search-batcher"}  # every forward pass on the one worker
        assert [len(coll.engine.get_windows([f"d{i}"])[0]) for i in range(len(LONG))] == ref_windows
        for (q, m), want in expected.items():
            got = coll.search(q, mode=m, k=5)
            assert [h.id for h in got] == [h.id for h in want], (q, m)
            assert [h.window for h in got] == [h.window for h in want], (q, m)
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
        assert b.depth == 0


def test_one_window_collections_ingest_through_the_worker_too(tiny_encoder, tmp_path):
    texts = ["document on flow", "second document " * 40]
    lengths = [len(ids) for ids in tiny_encoder.tokenize(texts, 100_000)[0]]
    assert lengths[0] <= 16 < lengths[1], lengths  # one text fits max_length, the other is cut
    with _collection(tmp_path / "ref", tiny_encoder, max_windows=1, max_length=16) as ref:
        with pytest.warns(UserWarning, match="1 of 2 document"):
            ref.add(texts, ids=["a", "b"])
        want = ref.search("document flow", k=2)
    slow = SlowEncoder(tiny_encoder)
    with _collection(tmp_path / "served", tiny_encoder, max_windows=1, max_length=16) as coll, Batcher(slow) as b:
        coll.use_encoder(BatchedEncoder(b))
        with pytest.warns(UserWarning, match="1 of 2 document"):  # the cut is still reported once
            coll.add(texts, ids=["a", "b"])
        got = coll.search("document flow", k=2)
    assert slow.calls[0] == texts and slow.threads[0] == "m3search-batcher"
    assert [h.id for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


def test_an_ingest_waits_for_room_instead_of_failing_half_way(tiny_encoder):
    slow = SlowEncoder(tiny_encoder)
    slow.gate.clear()
    with Batcher(slow, max_queue=2) as b:
        held = b.submit(["one", "two"])  # fills the queue
        with pytest.raises(QueueFull):
            b.submit(["three"], priority=BACKGROUND)
        out = []
        t = threading.Thread(target=lambda: out.append(BatchedEncoder(b).encode(["three"])))
        t.start()
        time.sleep(0.1)
        assert not out  # waiting for room, not failed
        slow.gate.set()
        held.future.result(10)
        t.join(10)
    _same(out[0], tiny_encoder.encode(["three"]))


def test_batched_encoder_is_refused_by_a_collection_of_another_model(tiny_alt_model_path, tiny_encoder, tmp_path):
    from m3search import M3Encoder
    from m3search.errors import ModelMismatchError

    other = M3Encoder.from_pretrained(str(tiny_alt_model_path), dtype="float32")
    with _collection(tmp_path / "c", tiny_encoder) as coll, Batcher(other) as b:
        with pytest.raises(ModelMismatchError):
            coll.use_encoder(BatchedEncoder(b))


def test_a_failing_job_fails_alone_and_the_worker_goes_on(tiny_encoder):
    with Batcher(tiny_encoder) as b:
        with pytest.raises(ZeroDivisionError):
            b.result(b.submit_job(lambda: 1 / 0))
        assert b.result(b.submit_job(lambda: ("ok", 0, 0), priority=INTERACTIVE)) == "ok"
        _same(b.encode(["after"]), tiny_encoder.encode(["after"]))
        assert b.depth == 0


def test_no_background_round_starts_while_a_query_is_in_flight(tiny_encoder):
    """A query's whole handling (its search too, not only its encoding) keeps ingest rounds off the cores."""
    slow = SlowEncoder(tiny_encoder)
    with Batcher(slow, max_defer=30) as b:
        with b.foreground():
            ingest = b.submit(["a passage to ingest"], priority=BACKGROUND)
            query = b.encode(["the query"])  # interactive work still runs
            time.sleep(0.3)
            assert not ingest.future.done()
            assert [c for c in slow.calls if "a passage to ingest" in c] == []
        ingest.future.result(10)  # released: it runs at once
    _same(query, tiny_encoder.encode(["the query"]))


def test_background_work_waits_at_most_max_defer(tiny_encoder):
    """A steady stream of queries slows an ingest down but never stops it."""
    with Batcher(SlowEncoder(tiny_encoder), max_defer=0.2) as b:
        with b.foreground():
            t0 = time.monotonic()
            b.encode(["a passage"], priority=BACKGROUND)
            waited = time.monotonic() - t0
            assert 0.15 < waited < 5
            t0 = time.monotonic()
            b.wait_background_turn()  # the clock restarted: a full max_defer again
            assert 0.15 < time.monotonic() - t0 < 5


def test_batched_encoder_hands_over_ingest_batches_between_queries(tiny_encoder):
    """The caller of a background BatchedEncoder writes what it gets: not while a query is in flight."""
    with Batcher(SlowEncoder(tiny_encoder), max_defer=30) as b:
        enc = BatchedEncoder(b)
        got: list = []
        with b.foreground():
            t = threading.Thread(target=lambda: got.append(enc.encode(["a passage"])))
            t.start()
            time.sleep(0.3)
            assert got == []
        t.join(10)
        assert len(got) == 1


def _threads_named(name: str) -> set[str]:
    """This process's OS threads (ids) called ``name``: a new thread inherits its creator's name."""
    found = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    found.add(tid)
        except OSError:  # exited meanwhile
            pass
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see libgomp and threads")
def test_release_openmp_pool_lets_the_callers_idle_openmp_threads_exit():
    """Its why (a loading thread's idle pool halves the worker's speed) is measured in
    benchmarks/thread_forward.py; here: the pool it frees is really gone. The pool's threads
    are told apart from other tests' threads by name (they inherit the name of the thread
    that started them, which names itself first)."""
    import ctypes

    import torch

    if "libgomp" not in open("/proc/self/maps").read() or torch.get_num_threads() < 2:
        pytest.skip("torch here does not run a libgomp pool of 2+ threads")
    name = "m3s-omp-test"
    seen: dict[str, object] = {}

    def in_a_fresh_thread() -> None:  # its own pool: the test's main thread keeps its own
        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME, this thread only
        me = str(threading.get_native_id())
        x = torch.randn(256, 512)
        for _ in range(3):
            x @ torch.randn(512, 512)  # a parallel region: this thread's pool of workers starts
        pool = _threads_named(name) - {me}
        seen["pool"] = len(pool)
        seen["released"] = release_openmp_pool()
        deadline = time.monotonic() + 5.0  # the freed threads exit on their own schedule
        while _threads_named(name) & pool and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["left"] = len(_threads_named(name) & pool)

    t = threading.Thread(target=in_a_fresh_thread)
    t.start()
    t.join()
    assert seen["pool"] >= 1, seen
    assert seen["released"] is True
    assert seen["left"] == 0, seen


@pytest.mark.parametrize(
    "first, second",
    [
        ((True, False, True), (True, False, False)),  # /embed with colbert, then a dense-only /v1/embeddings
        ((True, True, False), (False, True, False)),  # TEI /embed, then /embed_sparse
    ],
)
def test_a_request_split_over_rounds_shared_with_other_outputs_gets_its_own(tiny_encoder, first, second):
    """The long request shares its first round with one that asked for an output it did not: that round
    computes it, its later rounds do not, and its parts must still join (it used to hang, counted)."""
    texts = [f"the flow of air over the wing {i} " * 20 for i in range(12)]
    slow = SlowEncoder(tiny_encoder)
    slow.gate.clear()  # hold the worker until both are queued
    with Batcher(slow, interactive_tokens=256, max_wait=0) as b:
        short = b.submit(["short text"], dense=first[0], sparse=first[1], colbert=first[2])
        long = b.submit(texts, dense=second[0], sparse=second[1], colbert=second[2])
        slow.gate.set()
        short.future.result(30)
        got = long.future.result(30)
        assert b.depth == 0
    assert len(slow.calls) > 2, "the long request was not split over several rounds"
    want = tiny_encoder.encode(texts, dense=second[0], sparse=second[1], colbert=second[2])
    assert (got.dense is None) == (not second[0]) and (got.sparse is None) == (not second[1])
    assert got.colbert is None and got.colbert_offsets is None
    if second[0]:
        np.testing.assert_allclose(got.dense, want.dense, atol=1e-5)
    if second[1]:
        np.testing.assert_allclose(got.sparse.toarray(), want.sparse.toarray(), atol=1e-5)


def test_the_servers_time_limits_follow_the_batchers_rule():
    """``Settings(request_timeout=1e12)`` passed the server's check (a finite number above 0) and was then refused
    by the batcher as the model loaded, naming ``timeout``, a name the user never set; ``True`` passed too. One rule
    now (:func:`m3search.plan.timeout_fault`): a value is refused when the settings are checked, before any batcher,
    naming the setting, exactly when the batcher would refuse it."""
    pytest.importorskip("fastapi")
    from types import SimpleNamespace

    from m3search.server import Settings, create_app

    def batcher_takes(seconds) -> bool:
        try:
            Batcher(SimpleNamespace(token_budget=64), timeout=seconds).close()
        except ValueError:
            return False
        return True

    for seconds in (1e12, threading.TIMEOUT_MAX * 2, math.inf, math.nan, 0, -1, True, 0.001, 60, threading.TIMEOUT_MAX):
        for name in ("request_timeout", "search_timeout"):
            try:
                Settings(**{name: seconds}).check()
                settings_take = True
            except ValueError as exc:
                assert str(exc).startswith(f"{name} is not a number of seconds > 0 and at most"), exc
                settings_take = False
            assert settings_take == batcher_takes(seconds), (name, seconds)
    with pytest.raises(ValueError, match="^request_timeout is not a number of seconds > 0 and at most"):
        create_app(Settings(request_timeout=1e12))
