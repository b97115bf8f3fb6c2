"""One inference worker for many callers: dynamic batching with priorities and a bounded queue.

Why: an encoder called from many threads at once runs many small forward passes that
fight over the same cores (each with all of torch's threads), while one forward pass over
the same texts batched together costs little more than one alone. So every caller
submits its texts here and waits on a future; one worker thread turns what is waiting into
rounds and encodes each round with :meth:`M3Encoder.encode` (which sorts by length and
splits by token budget), then hands each caller its own rows.

* **Priorities.** ``INTERACTIVE`` work (queries, embedding requests) always goes before
  ``BACKGROUND`` work (document ingest). Background rounds are sized by time: as many tokens
  as the worker encodes in ``background_round`` seconds (measured as it goes, capped by
  ``background_tokens``), so a query that arrives during an ingest waits for at most about
  that long, on a fast machine or a slow one.
* **Rounds.** Within a priority, requests are served oldest first; a round takes texts in
  that order (a large request may be split over several rounds) up to a token budget, and
  only requests with the same ``max_length`` share a round. The outputs computed are the
  union of what the round's requests asked for; each request gets only its own.
* **Queries first, end to end.** A query is more than its encoding: the server marks its
  whole handling (encoding, engine search, fusion) with :meth:`Batcher.foreground`, and no
  background round or job starts while one is in flight (nor does :class:`BatchedEncoder`
  hand an ingest its next batch to write), so an ingest runs in the gaps between queries
  instead of sharing the cores with their searches. A query then waits for at most the one
  background round (or write) already running. Background work deferred for longer than
  ``max_defer`` seconds runs one round anyway, so a steady stream of queries slows an
  ingest down but never stops it.
* **Adaptive coalescing.** When the worker is idle and recent rounds served one request,
  a new request starts at once (no added latency for a lone client). When they served
  several, the worker waits until as many are waiting (the estimate jumps up with a big
  round and decays over about a dozen), but never longer than ``max_wait`` and half of
  the last round's duration. All of them, not half: waiting for half split closed-loop
  clients into two groups of half-size rounds (16 clients on 2 cores: 8.8 texts per round),
  and a forward pass over 8 short texts costs 1.2x per text what one over 16 does; waiting
  for all of them leaves the worker idle ~20 % of the time while answers and next requests
  cross the event loop, and still serves more (16 clients: 78 % -> 82 % of one client sending
  16 texts per request; 4 clients +40 %; benchmarks/RESULTS.md, serving round 7).
* **Backpressure.** At most ``max_queue`` texts are in the system; beyond it ``submit``
  raises :class:`QueueFull` with a retry hint. A request must start within its timeout (a
  large ingest that started is not cut off); one cancelled (its client left) or too late
  to start is dropped before it is encoded, and a cancelled one is dropped between rounds.
* **Failures stay local.** If a round fails, each of its requests is encoded again on its
  own, so only the request that fails alone gets the error; the worker goes on.
* **Jobs.** :meth:`Batcher.submit_job` runs a callable on the worker as a round of its own,
  at its priority: how a long document's windows go through the one worker, one piece of
  about a round's tokens per job (:class:`BatchedEncoder`, which the server gives its
  collection, so ``/documents`` is scheduled behind queries like any other ingest).

Torch: the worker is the only thread that runs the model, with torch's intra-op threads
(one per core by default), so concurrent requests never oversubscribe the cores. The thread
that builds the batcher (the one that loaded the model) gives its idle OpenMP threads back
(:func:`release_openmp_pool`), or every forward pass on the worker runs at half speed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from .encoder import MIN_MAX_LENGTH, M3Embeddings, TruncationWarning, WindowedEmbeddings
from .plan import DEFAULT_REQUEST_TIMEOUT, check_int, check_texts, check_timeout

__all__ = [
    "Batcher",
    "BatchedEncoder",
    "QueueFull",
    "RequestTimeout",
    "ClientGone",
    "INTERACTIVE",
    "BACKGROUND",
    "concat_embeddings",
    "concat_windows",
]

log = logging.getLogger("m3search.batching")

INTERACTIVE, BACKGROUND = 0, 1
_PRIORITIES = (INTERACTIVE, BACKGROUND)


def release_openmp_pool() -> bool:
    """Let the calling thread's idle OpenMP worker threads exit (libgomp only; a no-op elsewhere).

    Why: libgomp counts the worker threads of every thread that ever ran a parallel region, and
    once they outnumber the cores it stops spin-waiting between regions (about a hundred spins
    instead of ~300,000), so each of a forward pass's hundreds of short regions sleeps and wakes
    its threads. A model loaded in one thread (torch's parallel copies) and run in another is
    exactly that case: one proxy query took 4.0 ms in the loading thread, 10.1 ms on the worker,
    and 4.0 ms on the worker once the loading thread had released its pool (2 cores;
    benchmarks/thread_forward.py). Call it outside any parallel region; the calling thread gets a
    new pool if it runs torch again. Returns whether a libgomp was found and called.
    """
    import ctypes

    try:
        with open("/proc/self/maps") as f:  # the libgomp torch loaded (its file name varies by wheel)
            paths = {line.split(None, 5)[-1].strip() for line in f if "libgomp" in line}
        lib = ctypes.CDLL(min(paths)) if paths else None
        if lib is None or not hasattr(lib, "omp_pause_resource_all"):
            return False
        return lib.omp_pause_resource_all(1) == 0  # omp_pause_soft: frees this thread's idle pool
    except OSError:
        return False


class QueueFull(Exception):
    """The queue holds ``max_queue`` texts already; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(TimeoutError):
    """The request's encoding did not start within its timeout (once started, it runs to the end)."""


class ClientGone(Exception):
    """The caller stopped waiting (its HTTP client disconnected); its work was cancelled."""


class BatchObserver(Protocol):
    """What the batcher reports (``m3search.metrics`` implements it for Prometheus)."""

    def queue_depth(self, texts: int) -> None: ...

    def round_done(self, priority: int, requests: int, texts: int, tokens: int, seconds: float) -> None: ...


@dataclass(eq=False)
class _Request:
    texts: list[str]
    outputs: tuple[bool, bool, bool]  # dense, sparse, colbert
    max_length: int
    priority: int
    timeout: float  # seconds it may wait to start (its error says so)
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    lengths: np.ndarray | None = None  # token counts, set by the worker
    truncated: int = 0
    taken: int = 0  # texts handed to rounds so far (always a prefix)
    parts: list[M3Embeddings] = field(default_factory=list)
    done: int = 0  # texts encoded so far
    finished: bool = False  # its texts no longer count against max_queue
    job: Callable[[], tuple[Any, int, int]] | None = None  # a job instead of texts (see Batcher.submit_job)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    @property
    def size(self) -> int:
        """What it counts against ``max_queue``: its texts (a job: 1)."""
        return len(self.texts) or 1

    def cancel(self) -> None:
        """Stop this request costing work: dropped before (or between) its rounds."""
        self.cancelled = True
        self.future.cancel()

    def timed_out(self) -> RequestTimeout:
        """Its own timeout in the error, not the batcher's default (a 0.05 s request said "not started within 60 s")."""
        return RequestTimeout(f"not started within {self.timeout:g} s: the server is busy")


class Batcher:
    """Dynamic batching over one :class:`~m3search.M3Encoder` (see the module docstring).

    ``max_queue``: most texts waiting or in flight. ``timeout``: default seconds a request
    may wait for its encoding to start. ``max_wait``: longest coalescing wait, seconds. ``interactive_tokens``
    / ``background_tokens``: most real tokens per round (default: the encoder's token budget /
    1024). ``background_round``: target seconds of one background round. ``max_defer``: longest
    seconds background work waits for in-flight :meth:`foreground` requests before one round runs anyway.
    """

    def __init__(
        self,
        encoder: Any,
        *,
        max_queue: int = 2048,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_wait: float = 0.05,
        interactive_tokens: int | None = None,
        background_tokens: int = 1024,
        background_round: float = 0.02,
        max_defer: float = 1.0,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_queue < 1 or max_wait < 0 or background_tokens < 1 or background_round <= 0:
            raise ValueError("max_queue and background_tokens must be >= 1, background_round > 0, max_wait >= 0")
        if max_defer < 0:
            raise ValueError("max_defer must be >= 0")
        self.encoder = encoder
        self.max_queue = int(max_queue)
        self.timeout = check_timeout("timeout", timeout)
        self.max_wait = float(max_wait)
        self.budgets = {
            INTERACTIVE: int(interactive_tokens or encoder.token_budget),
            BACKGROUND: int(background_tokens),
        }
        self.observer = observer
        self._cond = threading.Condition()
        self._inbox: list[_Request] = []  # shared with submitters (under _cond)
        self._load = 0  # texts submitted and not finished (under _cond)
        self._closed = False
        self._ready: dict[int, deque[_Request]] = {p: deque() for p in _PRIORITIES}  # worker-private
        self._expect = 1  # recent requests per round: how many to wait for when idle
        self._last_round = 0.0  # seconds the last round took
        self._rate = 0.0  # texts per second, moving average (for Retry-After)
        self.background_round = float(background_round)
        self.max_defer = float(max_defer)
        self._foreground = 0  # interactive requests in flight, encoding to response (under _cond)
        self._deferred_since: float | None = None  # when background work first waited for them (under _cond)
        self._token_rate = 0.0  # tokens per second, moving average (sizes background rounds)
        release_openmp_pool()  # this thread loaded the model: its idle OpenMP threads would slow the worker's
        self._thread = threading.Thread(target=self._run, name="m3search-batcher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- callers
    def submit(
        self,
        texts: str | Sequence[str],
        *,
        dense: bool = True,
        sparse: bool = True,
        colbert: bool = True,
        max_length: int | None = None,
        priority: int = INTERACTIVE,
        timeout: float | None = None,
    ) -> _Request:
        """Queue texts (a single string is one text, as in :meth:`M3Encoder.encode`); the returned ticket's
        ``future`` gives their :class:`M3Embeddings`.

        Raises :class:`QueueFull` when the queue is full (an empty queue takes any size).
        """
        texts = check_texts(texts, unicode=False)
        if not (dense or sparse or colbert):
            raise ValueError("request at least one of dense, sparse, colbert")
        if priority not in _PRIORITIES:
            raise ValueError(f"priority must be one of {_PRIORITIES}, not {priority!r}")
        limit = self.encoder.max_length
        if max_length is not None:
            check_int("max_length", max_length, MIN_MAX_LENGTH)
        return self._enqueue(
            _Request(
                texts=texts,
                outputs=(bool(dense), bool(sparse), bool(colbert)),
                max_length=limit if max_length is None else min(int(max_length), limit),
                priority=priority,
                timeout=self.timeout if timeout is None else check_timeout("timeout", timeout),
            )
        )

    def submit_job(
        self, job: Callable[[], tuple[Any, int, int]], *, priority: int = BACKGROUND, timeout: float | None = None
    ) -> _Request:
        """Queue ``job`` to run on the worker as a round of its own (nothing else in its forward
        passes), after all waiting work of a higher priority. ``job()`` returns ``(value, rows,
        tokens)``: the ticket's result and what it encoded (metrics, background round sizing).
        Keep a job to about one round (:meth:`round_tokens`): queries wait for it to end."""
        if priority not in _PRIORITIES:
            raise ValueError(f"priority must be one of {_PRIORITIES}, not {priority!r}")
        return self._enqueue(
            _Request(
                texts=[],
                outputs=(True, True, True),
                max_length=0,
                priority=priority,
                timeout=self.timeout if timeout is None else check_timeout("timeout", timeout),
                job=job,
            )
        )

    def _enqueue(self, req: _Request) -> _Request:
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._load and self._load + req.size > self.max_queue:
                raise QueueFull(
                    f"the server is busy: {self._load} texts are queued (limit {self.max_queue}); retry later",
                    retry_after=self._retry_after(),
                )
            self._load += req.size
            self._inbox.append(req)
            self._cond.notify_all()  # the worker, wherever it waits (ingest threads may wait too)
            load = self._load
        if self.observer is not None:
            self.observer.queue_depth(load)
        return req

    @contextmanager
    def foreground(self) -> Iterator[None]:
        """Mark an interactive request in flight for its whole handling (not only its encoding):
        background rounds, jobs and ingest writes wait until none is (see the module docstring)."""
        with self._cond:
            self._foreground += 1
        try:
            yield
        finally:
            with self._cond:
                self._foreground -= 1
                if not self._foreground:
                    self._cond.notify_all()

    def wait_background_turn(self) -> None:
        """Block until no :meth:`foreground` request is in flight, or background work has waited
        ``max_defer`` seconds (then it takes its turn and the clock restarts). Ingest writes call it."""
        self._wait_turn(yield_to_inbox=False)

    def _wait_turn(self, *, yield_to_inbox: bool) -> bool:
        """Wait for in-flight foreground requests, at most ``max_defer`` counted from when background
        work first waited; False (and the clock kept) if ``yield_to_inbox`` and new work came in."""
        with self._cond:
            while self._foreground and not self._closed and not (yield_to_inbox and self._inbox):
                now = time.monotonic()
                if self._deferred_since is None:
                    self._deferred_since = now
                left = self._deferred_since + self.max_defer - now
                if left <= 0:
                    break
                self._cond.wait(left)
            if yield_to_inbox and self._inbox and not self._closed:
                return False
            self._deferred_since = None
            return True

    def round_tokens(self, priority: int) -> int:
        """Most real tokens in one round at ``priority`` now (background: about ``background_round``
        seconds of the worker's measured rate, at most ``background_tokens``)."""
        budget = self.budgets[priority]
        if priority == BACKGROUND and self._token_rate > 0:
            budget = max(1, min(budget, int(self._token_rate * self.background_round)))
        return budget

    def encode(self, texts: str | Sequence[str], **kwargs: Any) -> M3Embeddings:
        """Blocking :meth:`submit` + wait (``timeout`` as in submit)."""
        return self.result(self.submit(texts, **kwargs))

    def result(self, req: _Request) -> Any:
        """Wait for a ticket: :class:`RequestTimeout` if it did not start within its timeout."""
        try:
            req.future.result(timeout=max(0.0, req.deadline - time.monotonic()))
        except TimeoutError:
            if not req.taken:
                req.cancel()
                raise req.timed_out() from None
        return req.future.result()

    async def encode_async(
        self, texts: str | Sequence[str], *, gone: Callable[[], Awaitable[Any]] | None = None, **kwargs: Any
    ) -> M3Embeddings:
        """:meth:`submit` + await. ``gone()`` is awaited alongside: when it returns first (the
        client disconnected), the request is cancelled and :class:`ClientGone` raised."""
        req = self.submit(texts, **kwargs)
        result = asyncio.wrap_future(req.future)
        watch = asyncio.ensure_future(gone()) if gone is not None else None
        waits = {result} if watch is None else {result, watch}
        try:
            done, _ = await asyncio.wait(
                waits, timeout=max(0.0, req.deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done and req.taken:  # started in time: it runs to the end
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            req.cancel()
            raise
        finally:
            if watch is not None:
                watch.cancel()
        if result in done:
            return result.result()
        req.cancel()
        if watch is not None and watch in done:
            raise ClientGone("the client disconnected")
        raise req.timed_out()

    @property
    def depth(self) -> int:
        """Texts submitted and not yet finished."""
        with self._cond:
            return self._load

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still waiting fail with RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._load / self._rate)) if self._rate > 0 else 1

    # ---------------------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            new, closing = self._collect()
            if closing:
                break
            try:
                self._admit(new)
                self._serve_one_round()
            except Exception:  # pragma: no cover - a bug in the bookkeeping: keep serving
                log.exception("batching worker error")
        leftover = [r for q in self._ready.values() for r in q] + self._inbox
        for req in leftover:
            self._fail(req, RuntimeError("the server is shutting down"))

    def _collect(self) -> tuple[list[_Request], bool]:
        """Wait for work (coalescing when the last round served several requests); take the inbox."""
        busy = any(self._ready.values())
        with self._cond:
            while not self._inbox and not busy and not self._closed:
                self._cond.wait()
            if self._closed:
                return [], True
            if not busy and self._expect > 1:
                end = time.monotonic() + min(self.max_wait, self._last_round / 2)
                while len(self._inbox) < self._expect and not self._closed:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            new, self._inbox = self._inbox, []
        return new, False

    def _admit(self, new: list[_Request]) -> None:
        """Tokenize new requests (lengths for the token budget, truncation counts) and queue them."""
        for req in new:
            if req.job is not None:
                self._ready[req.priority].append(req)
                continue
            try:
                ids, req.truncated = self.encoder.tokenize(req.texts, req.max_length)
                req.lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
            except Exception as exc:
                self._fail(req, exc)
                continue
            self._ready[req.priority].append(req)

    def _serve_one_round(self) -> None:
        now = time.monotonic()
        for queue in self._ready.values():  # drop cancelled and expired requests before they cost work
            for req in [r for r in queue if r.cancelled or (r.deadline <= now and not r.taken)]:
                queue.remove(req)
                self._fail(req, None if req.cancelled else req.timed_out())
        priority = next((p for p in _PRIORITIES if self._ready[p]), None)
        if priority is None:
            return
        if priority == BACKGROUND and not self._wait_turn(yield_to_inbox=True):
            return  # interactive work arrived while waiting: collect it first
        queue = self._ready[priority]
        if queue[0].job is not None:
            self._run_job(queue.popleft())
            return
        max_length = queue[0].max_length
        budget = self.round_tokens(priority)
        round_: list[tuple[_Request, int, int]] = []
        tokens = 0
        for req in queue:
            if req.max_length != max_length or req.job is not None:
                continue
            a = b = req.taken
            while b < len(req.texts) and (tokens == 0 or tokens + req.lengths[b] <= budget):
                tokens += int(req.lengths[b])
                b += 1
            if b > a:
                round_.append((req, a, b))
                req.taken = b
            if tokens >= budget:
                break
        for req, _, _ in round_:
            if req.taken == len(req.texts):
                queue.remove(req)
        started = time.monotonic()
        self._encode_round(round_)
        self._round_done(priority, len(round_), sum(b - a for _, a, b in round_), tokens, time.monotonic() - started)

    def _run_job(self, req: _Request) -> None:
        req.taken = 1
        started = time.monotonic()
        try:
            value, n_texts, tokens = req.job()
        except Exception as exc:
            self._fail(req, exc)
            return
        self._round_done(req.priority, 1, n_texts, tokens, time.monotonic() - started)
        self._finish(req)
        if req.future.set_running_or_notify_cancel():
            req.future.set_result(value)

    def _round_done(self, priority: int, requests: int, n_texts: int, tokens: int, seconds: float) -> None:
        """Update the estimates that size the next rounds, and report the round."""
        self._last_round = seconds
        if priority == INTERACTIVE:  # concurrency estimate: jumps up at once, decays over ~a dozen rounds
            self._expect = max(requests, int(self._expect * 0.9))
        if seconds > 0:
            rate = n_texts / seconds
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
            token_rate = tokens / seconds
            self._token_rate = token_rate if self._token_rate == 0 else 0.8 * self._token_rate + 0.2 * token_rate
        if self.observer is not None:
            self.observer.round_done(priority, requests, n_texts, tokens, seconds)

    def _encode_round(self, round_: list[tuple[_Request, int, int]]) -> None:
        texts = [t for req, a, b in round_ for t in req.texts[a:b]]
        outputs = [any(req.outputs[i] for req, _, _ in round_) for i in range(3)]
        try:
            emb = self._forward(texts, outputs, round_[0][0].max_length)
        except Exception as exc:
            if len(round_) == 1:
                self._fail(round_[0][0], exc)
                return
            # Isolate the failure: each request again on its own, so only a failing one fails.
            for piece in round_:
                self._encode_round([piece])
            return
        start = 0
        for req, a, b in round_:
            try:
                self._deliver(req, emb[start : start + b - a])  # a new object per request (slices)
            except Exception as exc:  # a bookkeeping bug fails its request, never leaves it waiting
                log.exception("batching worker error")
                self._fail(req, exc)
            start += b - a

    def _forward(self, texts: list[str], outputs: list[bool], max_length: int) -> M3Embeddings:
        dense, sparse, colbert = outputs
        return self.encoder.encode(
            texts, dense=dense, sparse=sparse, colbert=colbert, max_length=max_length, warn_truncation=False
        )

    def _deliver(self, req: _Request, part: M3Embeddings) -> None:
        if req.future.done():  # cancelled (or failed) while its round ran
            self._finish(req)
            return
        # A round computes every output any of its requests asked for: keep this request's own, so
        # that the parts of a request split over rounds that others shared differently still concatenate.
        dense, sparse, colbert = req.outputs
        if not dense:
            part.dense = None
        if not sparse:
            part.sparse = None
        if not colbert:
            part.colbert = part.colbert_offsets = None
        req.parts.append(part)
        req.done += len(part)
        if req.done < len(req.texts):
            return
        emb = concat_embeddings(req.parts)
        req.parts = []
        emb.truncated = req.truncated
        self._finish(req)
        if req.future.set_running_or_notify_cancel():
            req.future.set_result(emb)

    def _fail(self, req: _Request, exc: BaseException | None) -> None:
        """Finish ``req`` with ``exc`` (None: it was cancelled) and drop its remaining texts."""
        req.taken = len(req.texts)
        req.parts = []
        for queue in self._ready.values():
            if req in queue:
                queue.remove(req)
        self._finish(req)
        if exc is None:
            req.future.cancel()
        elif not req.future.done() and req.future.set_running_or_notify_cancel():
            req.future.set_exception(exc)

    def _finish(self, req: _Request) -> None:
        """Release the request's share of the queue bound (exactly once)."""
        if req.finished:
            return
        req.finished = True
        with self._cond:
            self._load -= req.size
            load = self._load
        if self.observer is not None:
            self.observer.queue_depth(load)


def concat_embeddings(parts: Sequence[M3Embeddings]) -> M3Embeddings:
    """Rows of several :class:`M3Embeddings` (same outputs) as one, in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    colbert = offsets = None
    if first.colbert is not None:
        colbert = np.concatenate([p.colbert for p in parts])
        counts = np.concatenate([np.diff(p.colbert_offsets) for p in parts])
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
    return M3Embeddings(
        dense=None if first.dense is None else np.concatenate([p.dense for p in parts]),
        sparse=None if first.sparse is None else sp.vstack([p.sparse for p in parts], format="csr"),
        colbert=colbert,
        colbert_offsets=offsets,
        n_tokens=np.concatenate([p.n_tokens for p in parts]),
        truncated=sum(p.truncated for p in parts),
        id_to_token=first._id_to_token,
    )


def concat_windows(parts: Sequence[WindowedEmbeddings]) -> WindowedEmbeddings:
    """Consecutive pieces of one :meth:`~m3search.M3Encoder.iter_windows` call as one."""
    if len(parts) == 1:
        return parts[0]
    return WindowedEmbeddings(
        concat_embeddings([p.embeddings for p in parts]),
        np.concatenate([p.doc for p in parts]),
        np.concatenate([p.spans for p in parts]),
        sum(p.cut for p in parts),
        None if parts[0].index is None else np.concatenate([p.index for p in parts]),
        parts[0].count,  # per text of the whole call, the same array in every piece
    )


class BatchedEncoder:
    """An encoder whose forward passes all run on a :class:`Batcher`'s worker, at one priority.

    Why: a :class:`~m3search.Collection` encodes the documents it adds itself (windows
    included); given this encoder (``Collection.use_encoder``), its ingest is scheduled
    behind queries in token-budget rounds instead of competing with them for the cores, and
    what it stores is what it would store with the encoder itself. ``encode`` is an ordinary
    batched request; the windows of ``iter_windows``/``encode_windows`` are tokenized in the
    calling thread, then encoded one piece of :meth:`Batcher.round_tokens` tokens per worker
    job (the next piece queued while the caller stores the last), so a long document holds
    the worker for one round at a time. Everything else is the wrapped encoder's.

    At background priority, what it returns is handed over only when no query is in flight
    (:meth:`Batcher.wait_background_turn`): the caller's engine write is background work too.

    An ingest in progress is a write its caller waits for: rather than fail half-way (some
    batches stored), its requests wait for room when the queue is full and may wait up to
    ``timeout`` seconds to start.
    """

    def __init__(self, batcher: Batcher, priority: int = BACKGROUND, timeout: float = 24 * 3600.0) -> None:
        self.batcher, self.priority, self.timeout = batcher, priority, timeout

    def _submit(self, submit: Callable[..., _Request], *args: Any, **kwargs: Any) -> _Request:
        while True:
            try:
                return submit(*args, priority=self.priority, timeout=self.timeout, **kwargs)
            except QueueFull as exc:
                time.sleep(min(exc.retry_after, 1.0))

    def _turn(self) -> None:
        if self.priority == BACKGROUND:
            self.batcher.wait_background_turn()

    def __getattr__(self, name: str) -> Any:  # identity, max_length, tokenizer, ...: the model's
        return getattr(self.batcher.encoder, name)

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        dense: bool = True,
        sparse: bool = True,
        colbert: bool = True,
        max_length: int | None = None,
        warn_truncation: bool = True,
    ) -> M3Embeddings:
        """:meth:`M3Encoder.encode <m3search.M3Encoder.encode>` through the worker."""
        texts = check_texts(texts)
        emb = self.batcher.result(
            self._submit(self.batcher.submit, texts, dense=dense, sparse=sparse, colbert=colbert, max_length=max_length)
        )
        self._turn()  # the caller writes what it gets: not while a query is in flight
        if emb.truncated and warn_truncation:
            limit = min(max_length or self.max_length, self.max_length)
            warnings.warn(
                TruncationWarning(
                    f"{emb.truncated} of {len(texts)} input(s) exceeded max_length={limit} tokens and were truncated",
                    emb.truncated,
                    len(texts),
                    limit,
                ),
                stacklevel=2,
            )
        return emb

    def iter_windows(
        self, texts: str | Sequence[str], *, chunk_tokens: int | None = 1 << 18, **options: Any
    ) -> Iterator[WindowedEmbeddings]:
        """:meth:`M3Encoder.iter_windows <m3search.M3Encoder.iter_windows>` through the worker:
        the same pieces of about ``chunk_tokens`` tokens (None: one), encoded a round at a time."""
        if chunk_tokens is not None:
            check_int("chunk_tokens", chunk_tokens)
        rounds = self.batcher.encoder.iter_windows(
            texts, chunk_tokens=self.batcher.round_tokens(self.priority), **options
        )  # tokenizes and checks the arguments here, in the caller's thread
        return self._regroup(rounds, chunk_tokens)

    def encode_windows(self, texts: str | Sequence[str], **options: Any) -> WindowedEmbeddings:
        """:meth:`M3Encoder.encode_windows <m3search.M3Encoder.encode_windows>` through the worker."""
        (whole,) = self.iter_windows(texts, chunk_tokens=None, **options)
        return whole

    def _regroup(self, rounds: Iterator[WindowedEmbeddings], chunk_tokens: int | None) -> Iterator[WindowedEmbeddings]:
        def step() -> tuple[WindowedEmbeddings | None, int, int]:
            piece = next(rounds, None)
            if piece is None:
                return None, 0, 0
            return piece, len(piece.doc), int(piece.embeddings.n_tokens.sum())

        ticket = self._submit(self.batcher.submit_job, step)
        held: list[WindowedEmbeddings] = []
        tokens = 0
        try:
            while True:
                piece = self.batcher.result(ticket)
                if piece is None:
                    break
                ticket = self._submit(self.batcher.submit_job, step)  # encoded while the caller stores
                held.append(piece)
                tokens += int(piece.embeddings.n_tokens.sum())
                if chunk_tokens is not None and tokens >= chunk_tokens:
                    self._turn()
                    yield concat_windows(held)
                    held, tokens = [], 0
            if held:
                self._turn()
                yield concat_windows(held)
        finally:
            ticket.cancel()  # the caller stopped early: the next piece costs no work
