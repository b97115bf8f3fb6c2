"""The HTTP server under concurrent load: texts/s and latency percentiles, loopback only.

What it measures, and why this way:

* A real server (``python -m m3search serve`` in a subprocess on a port the OS picks) over
  a collection of cranfield documents, encoded by the given model (default: the proxy).
  Clients are closed-loop asyncio tasks in this process, one keep-alive connection each
  (``_Conn``: a few lines of HTTP/1.1, cheaper than httpx): each sends a request,
  waits for the answer, sends the next. Every cell is bounded by ``--seconds`` and
  ``--max-requests``; responses are checked for status only (parsing them would measure
  the client).
* Cells: ``--concurrency`` clients x one text per request (query-sized: cranfield queries;
  passage-sized: cranfield abstracts) x route (``/v1/embeddings``; ``/embed`` with all
  three outputs as JSON floats; ``/search`` mode all, k 10). Texts/s and p50/p95/p99.
* The batched upper bound in the same run: one client sending ``--bound-batch`` texts per
  request to the embedding routes (the most the server can do with perfect batching;
  passages: the first batch size only, as 64 passages' ColBERT floats are ~100 MB of JSON).
* ``--baseline REV``: the same cells against the server of git revision REV (its ``src``
  extracted to a temporary folder), one server after the other on the same collection, so
  the ratios compare runs side by side.
* ``--soak S``: 64 clients on ``/search`` for S seconds in two halves: statuses, p99, server RSS
  before, half way and after.
* ``--ingest N``: query latency on ``/search`` (one client) idle, then while another client
  sends N documents to ``/documents`` in requests of 64 (ids new, so the collection grows),
  then for 10 s after it (the server builds its deferred indexes then), then idle again on the
  grown collection once ``m3search_unindexed_documents`` is 0. Each idle phase follows one uncounted
  pass over the queries (idle is a warm server's latency, not first reads from disk); the index
  builds the server ran during the ingest are counted (``m3search_index_build_seconds``). Search
  cost grows with the collection (sparse postings, the unindexed scan), so the during/idle ratio is given twice:
  against idle before (the target as written: 200 documents) and, per quarter of the ingest,
  the last quarter against idle at the final size (sizes within 25 %).

Usage (repository root, project venv)::

    nice -n 5 python benchmarks/serve.py --baseline 599efd3 --json benchmarks/raw/serve.json
    python benchmarks/serve.py --seconds 2 --concurrency 1,16 --routes v1 --docs 100 --soak 0 --ingest 0  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared")) / "data" / "cranfield"
PROXY = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared")) / "models" / "bge-m3-proxy"
ROUTES = {"v1": "/v1/embeddings", "embed": "/embed", "search": "/search"}


def _texts(n_docs: int) -> tuple[list[str], list[str], list[str]]:
    queries = [json.loads(line)["text"] for line in (DATA / "queries.jsonl").open(encoding="utf-8")]
    ids, docs = [], []
    for line in (DATA / "corpus.jsonl").open(encoding="utf-8"):
        d = json.loads(line)
        ids.append(d["_id"])
        docs.append((d["title"] + " " + d["text"]).strip())
    return queries, ids[:n_docs], docs[:n_docs] if n_docs <= len(docs) else docs


def _body(route: str, texts: list[str]) -> dict:
    if route == "v1":
        return {"input": texts, "model": "bge-m3"}
    if route == "embed":
        return {"input": texts, "dense": True, "sparse": True, "colbert": True}
    return {"query": texts[0], "k": 10, "mode": "all"}


def _start(src: Path, collection: Path, model: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    env["PYTHONPATH"] = str(src)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    (collection / "server.json").unlink(missing_ok=True)
    log = open(workdir / f"server-{src.parent.name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "m3search", "serve", "-c", str(collection), "--model", model, "--port", "0"]
        + ["--log-level", "warning", "--max-batch", "256"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(workdir / f'server-{src.parent.name}.log').read_text()[-2000:]}")
        try:
            url = json.loads((collection / "server.json").read_text())["url"]
            if httpx.get(url + "/health", timeout=60).status_code == 200:
                return proc, url
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not come up")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server process so far (less sensitive to a shared machine than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _samples(url: str) -> list:
    """The server's /metrics samples, parsed by prometheus-client ([] when it cannot be read)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return []
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _rounds(url: str) -> dict[str, float]:
    """The batching worker's totals from /metrics: interactive rounds, texts in them, seconds spent."""
    names = {
        "m3search_batch_texts_count": "rounds",
        "m3search_batch_texts_sum": "texts",
        "m3search_batch_seconds_sum": "seconds",
    }
    out = dict.fromkeys(names.values(), 0.0)
    for s in _samples(url):
        if s.labels.get("priority") == "interactive" and s.name in names:
            out[names[s.name]] = s.value
    return out


def _unindexed(url: str) -> float | None:
    """The server's ``m3search_unindexed_documents`` gauge (None: a server without it)."""
    return next((s.value for s in _samples(url) if s.name == "m3search_unindexed_documents"), None)


def _builds(url: str) -> tuple[float, float]:
    """The server's deferred index builds so far: (count, seconds); NaN for a server without the metric."""
    found = {s.name: s.value for s in _samples(url)}
    return tuple(found.get(f"m3search_index_build_seconds_{part}", np.nan) for part in ("count", "sum"))


async def _indexes_built(url: str, limit: float = 600.0) -> float:
    """Wait until the server has built the indexes it deferred; seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        left = await asyncio.to_thread(_unindexed, url)
        if left is None:  # an older server: give its deferred optimize a fixed time
            await asyncio.sleep(30)
            break
        if left == 0:
            break
        await asyncio.sleep(0.5)
    return time.perf_counter() - t0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Conn:
    """A keep-alive HTTP/1.1 connection that sends JSON POSTs and reads status + body: the
    least CPU a client can spend per request (like wrk), because the clients share the two cores
    with the server being measured. httpx cost 1.8-3 ms CPU per request here (0.2-0.35 of a core at
    16 clients, 1/16 of that for the one-client bound, so it biased the ratio); this costs ~0.1 ms."""

    def __init__(self, url: str) -> None:
        u = httpx.URL(url)
        self.host, self.port = u.host, u.port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> int:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        request = (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        headers = await self.reader.readuntil(b"\r\n\r\n")
        status = int(headers[9:12])
        lower = headers.lower()
        i = lower.find(b"content-length:")
        if i < 0:  # uvicorn always sends a length for these routes; anything else is a bug here
            raise RuntimeError(f"response without Content-Length: {headers[:200]!r}")
        await self.reader.readexactly(int(lower[i + 15 : lower.index(b"\r\n", i)]))
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _load(
    url: str,
    route: str,
    pool: list[str],
    *,
    clients: int,
    batch: int,
    seconds: float,
    max_requests: int,
    pid: int | None = None,
) -> dict[str, Any]:
    """Closed-loop clients; returns texts/s, latency percentiles (ms) and status counts."""
    lat: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    end = time.perf_counter() + seconds

    async def one(worker: int) -> None:
        # One connection per client (a shared httpx pool scanned its connections on every request:
        # ~13 ms CPU per request at 64 clients, taken from the server being measured).
        nonlocal sent
        i = worker * 7919
        conn = _Conn(url)
        try:
            while time.perf_counter() < end and sent < max_requests:
                sent += 1
                texts = [pool[(i + j) % len(pool)] for j in range(batch)]
                i += batch
                t0 = time.perf_counter()
                try:
                    status = await asyncio.wait_for(conn.post(ROUTES[route], _body(route, texts)), 300)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:  # a result, not a crash
                    status = type(exc).__name__
                    await conn.close()
                    conn = _Conn(url)
                lat.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            await conn.close()

    rounds0 = await asyncio.to_thread(_rounds, url) if pid else {}
    t0, cpu0, own0 = time.perf_counter(), _cpu_s(pid) if pid else 0.0, time.process_time()
    await asyncio.gather(*(one(w) for w in range(clients)))
    wall, cpu = time.perf_counter() - t0, (_cpu_s(pid) - cpu0) if pid else float("nan")
    rounds = {k: v - rounds0[k] for k, v in (await asyncio.to_thread(_rounds, url)).items()} if pid else {}
    own = time.process_time() - own0  # the clients' CPU: taken from the same cores as the server's
    ok = statuses.get(200, 0)
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {
        "route": route,
        "clients": clients,
        "batch": batch,
        "requests": len(lat),
        "texts_per_s": ok * batch / wall,
        "server_cpu_ms_per_text": 1000 * cpu / max(ok * batch, 1),
        "client_cpu_ms_per_request": 1000 * own / max(len(lat), 1),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "wall_s": wall,
        # the batching worker: texts per interactive round, and the share of wall time it spent in rounds
        "texts_per_round": rounds["texts"] / rounds["rounds"] if rounds.get("rounds") else float("nan"),
        "worker_busy": rounds["seconds"] / wall if rounds else float("nan"),
    }


def _cells(url: str, pid: int, args, queries: list[str], docs: list[str]) -> list[dict]:
    rows = []
    pools = {"query": queries, "passage": docs}
    for route in args.routes:
        for size in args.sizes:
            pool = pools[size]
            asyncio.run(_load(url, route, pool, clients=2, batch=1, seconds=1, max_requests=8))  # warm-up
            for c in args.concurrency:
                row = asyncio.run(
                    _load(
                        url,
                        route,
                        pool,
                        clients=c,
                        batch=1,
                        seconds=args.seconds,
                        max_requests=args.max_requests,
                        pid=pid,
                    )
                )
                rows.append({**row, "size": size, "kind": "concurrent"})
                _print_row(rows[-1])
            if route != "search":
                for b in args.bound_batch if size == "query" else args.bound_batch[:1]:
                    row = asyncio.run(
                        _load(
                            url,
                            route,
                            pool,
                            clients=1,
                            batch=b,
                            seconds=args.seconds,
                            max_requests=args.max_requests,
                            pid=pid,
                        )
                    )
                    rows.append({**row, "size": size, "kind": "bound"})
                    _print_row(rows[-1])
    return rows


def _print_row(r: dict) -> None:
    print(
        f"  {r['route']:6s} {r['size']:7s} {r['kind']:10s} clients={r['clients']:3d} batch={r['batch']:3d} "
        f"{r['texts_per_s']:8.1f} texts/s  cpu {r.get('server_cpu_ms_per_text', float('nan')):6.1f} ms/text  "
        f"client cpu {r.get('client_cpu_ms_per_request', float('nan')):5.1f} ms/req  "
        f"p50 {r['p50_ms']:7.1f}  p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms  "
        f"texts/round {r.get('texts_per_round', float('nan')):5.1f}  worker busy {r.get('worker_busy', float('nan')):4.0%}  "
        f"{r['statuses']}",
        flush=True,
    )


def _soak(url: str, pid: int, args, queries: list[str]) -> dict:
    """64 clients on /search for ``--soak`` seconds, in two halves: RSS before, between and after, so
    "flat" is the second half's growth (the first half includes warming caches and allocator pools)."""
    rss = [_rss_mb(pid)]
    halves = []
    for _ in range(2):
        halves.append(
            asyncio.run(
                _load(url, "search", queries, clients=64, batch=1, seconds=args.soak / 2, max_requests=10**9, pid=pid)
            )
        )
        rss.append(_rss_mb(pid))
    lat = halves[0]["requests"], halves[1]["requests"]
    row = {**halves[1], "first_half": halves[0], "requests_per_half": lat}
    row.update(size="query", kind="soak", rss_before_mb=rss[0], rss_mid_mb=rss[1], rss_after_mb=rss[2])
    _print_row({**halves[0], "size": "query", "kind": "soak 1/2"})
    _print_row(row)
    print(f"  soak RSS {rss[0]:.0f} -> {rss[1]:.0f} (half way) -> {rss[2]:.0f} MB", flush=True)
    return row


async def _ingest_and_query(url: str, args, queries: list[str], docs: list[str]) -> dict:
    """Query latency with one client while another client ingests ``args.ingest`` documents."""
    done = asyncio.Event()
    statuses: dict[int, int] = {}
    failed: list = []
    ingest_time = 0.0

    async def ingest(client: httpx.AsyncClient) -> None:
        nonlocal ingest_time
        t0 = time.perf_counter()
        for start in range(0, args.ingest, 64):
            batch = [
                {"id": f"ingest-{i}", "text": docs[i % len(docs)]} for i in range(start, min(start + 64, args.ingest))
            ]
            r = await client.post("/documents", json={"documents": batch, "upsert": True})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        ingest_time = time.perf_counter() - t0
        done.set()

    async def query(conn: _Conn, stop, when: list[float] | None = None) -> list[float]:
        lat, i = [], 0
        while not stop():
            t0 = time.perf_counter()
            try:
                status = await conn.post("/search", _body("search", [queries[i % len(queries)]]))
            except (OSError, asyncio.IncompleteReadError) as exc:
                status = type(exc).__name__
            lat.append(time.perf_counter() - t0)
            if when is not None:
                when.append(t0)
            if status != 200:
                failed.append(status)
            i += 1
        return lat

    async def warm() -> None:
        """One pass over every query, not counted: idle latency is a warm server's, not first reads'."""
        for q in queries:
            await conn.post("/search", _body("search", [q]))

    conn = _Conn(url)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await warm()
        t_end = time.perf_counter() + args.seconds
        idle = await query(conn, lambda: time.perf_counter() > t_end)
        builds0 = await asyncio.to_thread(_builds, url)
        task = asyncio.create_task(ingest(client))
        await asyncio.sleep(0.5)  # the ingest is under way
        started, when = time.perf_counter(), []
        busy = await query(conn, done.is_set, when)
        await task
        builds = [b - a for a, b in zip(builds0, await asyncio.to_thread(_builds, url))]
        # After the ingest: the server builds the indexes it deferred (DeferredOptimize) once ingest
        # has paused, so these queries run beside that build, then on the grown collection.
        t_end = time.perf_counter() + max(args.seconds, 10.0)
        after = await query(conn, lambda: time.perf_counter() > t_end)
        waited = await _indexes_built(url)
        await warm()
        t_end = time.perf_counter() + args.seconds
        final = await query(conn, lambda: time.perf_counter() > t_end)
    await conn.close()
    pct = lambda xs, q: float(np.percentile(np.array(xs) * 1000, q))  # noqa: E731
    span = max(when[-1] - started, 1e-9) if when else 1.0
    quarter = np.minimum(((np.array(when) - started) / span * 4).astype(int), 3)
    quarters = [pct(np.array(busy)[quarter == q], 95) if (quarter == q).any() else float("nan") for q in range(4)]
    out = {
        "docs": args.ingest,
        "ingest_s": ingest_time,
        "ingest_docs_per_s": args.ingest / ingest_time,
        "ingest_statuses": {str(k): v for k, v in statuses.items()},
        "idle_p50_ms": pct(idle, 50),
        "idle_p95_ms": pct(idle, 95),
        "busy_p50_ms": pct(busy, 50),
        "busy_p95_ms": pct(busy, 95),
        "busy_queries": len(busy),
        "index_builds_during": builds[0],
        "index_build_s_during": builds[1],
        "after_p50_ms": pct(after, 50),
        "after_p95_ms": pct(after, 95),
        "after_max_ms": pct(after, 100),
        "busy_p95_ms_by_quarter": quarters,
        "indexes_built_after_s": waited,
        "final_idle_p50_ms": pct(final, 50),
        "final_idle_p95_ms": pct(final, 95),
        "p95_during_over_idle": pct(busy, 95) / pct(idle, 95),
        "p95_last_quarter_over_final_idle": quarters[3] / pct(final, 95),
        "query_failures": [str(x) for x in failed],
    }
    print(
        f"  ingest {args.ingest} docs in {ingest_time:.1f} s ({out['ingest_docs_per_s']:.1f}/s) {out['ingest_statuses']}; "
        f"/search p50/p95 idle {out['idle_p50_ms']:.1f}/{out['idle_p95_ms']:.1f} ms, during ingest "
        f"{out['busy_p50_ms']:.1f}/{out['busy_p95_ms']:.1f} ms ({len(busy)} queries; {builds[0]:.0f} index builds "
        f"in it, {builds[1]:.1f} s), after "
        f"{out['after_p50_ms']:.1f}/{out['after_p95_ms']:.1f} ms (max {out['after_max_ms']:.0f})",
        flush=True,
    )
    print(
        f"  during-ingest p95 by quarter {' / '.join(f'{x:.1f}' for x in quarters)} ms; indexes built "
        f"{waited:.0f} s later; idle on the final collection p50/p95 {out['final_idle_p50_ms']:.1f}/"
        f"{out['final_idle_p95_ms']:.1f} ms. p95 during / idle before {out['p95_during_over_idle']:.2f}x; "
        f"last quarter / idle at the final size {out['p95_last_quarter_over_final_idle']:.2f}x",
        flush=True,
    )
    return out


def _baseline_src(rev: str, tmp: Path) -> Path:
    out = tmp / "baseline"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "src"


def _index(
    src: Path, coll: Path, model: str, ids: list[str], docs: list[str], tmp: Path, colbert_dtype: str | None = None
) -> None:
    """Index the documents with the code under ``src`` (a subprocess, that revision's package)."""
    data = tmp / "docs.json"
    data.write_text(
        json.dumps({"ids": ids, "docs": docs, "layout": {"colbert_dtype": colbert_dtype} if colbert_dtype else {}})
    )
    code = (
        "import json, sys; from m3search import Collection; d = json.load(open(sys.argv[3]));"
        "c = Collection.create(sys.argv[1], model=sys.argv[2], **d['layout']); c.add(d['docs'], ids=d['ids']); c.close()"
    )
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", code, str(coll), model, str(data)], check=True, env=env)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(PROXY))
    p.add_argument("--docs", type=int, default=1400, help="documents indexed before the run")
    p.add_argument("--seconds", type=float, default=5.0, help="per cell")
    p.add_argument("--max-requests", type=int, default=3000, help="per cell")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--routes", default="v1,embed,search")
    p.add_argument("--sizes", default="query,passage", help="text sizes: query, passage")
    p.add_argument("--bound-batch", default="16,64", help="texts per request of the one-client upper bound")
    p.add_argument("--baseline", default=None, help="git revision whose server runs the same cells first")
    p.add_argument("--soak", type=float, default=60.0, help="seconds of 64 clients on /search (0: skip)")
    p.add_argument("--ingest", type=int, default=2000, help="documents ingested during the query test (0: skip)")
    p.add_argument("--colbert-dtype", default=None, help="ColBERT storage of the collection (default: the engine's)")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.routes = args.routes.split(",")
    args.sizes = args.sizes.split(",")
    args.bound_batch = [int(x) for x in args.bound_batch.split(",")]

    queries, ids, docs = _texts(args.docs)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "model": args.model,
        "argv": sys.argv[1:] if argv is None else argv,
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="m3s-serve-") as tmp_name:
        tmp = Path(tmp_name)
        sources = []
        if args.baseline:
            sources.append((f"baseline {args.baseline}", _baseline_src(args.baseline, tmp)))
        sources.append(("this tree", REPO / "src"))
        for n, (name, src) in enumerate(sources):
            # Each server gets a collection written by its own code: an older revision
            # cannot open a newer manifest, and the ingest test grows the collection.
            coll = tmp / f"coll{n}"
            t0 = time.perf_counter()
            _index(src, coll, args.model, ids, docs, tmp, args.colbert_dtype)
            print(f"server: {name} (indexed {len(docs)} documents in {time.perf_counter() - t0:.1f} s)", flush=True)
            proc, url = _start(src, coll, args.model, tmp)
            try:
                entry: dict[str, Any] = {"cells": _cells(url, proc.pid, args, queries, docs)}
                if args.soak > 0:
                    entry["soak"] = _soak(url, proc.pid, args, queries)
                if args.ingest > 0:
                    entry["ingest"] = asyncio.run(_ingest_and_query(url, args, queries, docs))
                result["servers"][name] = entry
            finally:
                _stop(proc)
    result["load_after"] = os.getloadavg()
    _summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _summary(result: dict) -> None:
    print("\nsummary: 16 clients x one text vs the batched upper bound (texts/s), one client p50")
    for name, entry in result["servers"].items():
        cells = entry["cells"]
        for route in ("v1", "embed"):
            for size in ("query", "passage"):
                bound = max(
                    (
                        r["texts_per_s"]
                        for r in cells
                        if r["route"] == route and r["size"] == size and r["kind"] == "bound"
                    ),
                    default=None,
                )
                c16 = next(
                    (
                        r
                        for r in cells
                        if r["route"] == route
                        and r["size"] == size
                        and r["clients"] == 16
                        and r["kind"] == "concurrent"
                    ),
                    None,
                )
                c1 = next(
                    (
                        r
                        for r in cells
                        if r["route"] == route and r["size"] == size and r["clients"] == 1 and r["kind"] == "concurrent"
                    ),
                    None,
                )
                if bound and c16 and c1:
                    print(
                        f"  {name:22s} {route:6s} {size:7s} 16 clients {c16['texts_per_s']:7.1f} / bound {bound:7.1f} "
                        f"= {c16['texts_per_s'] / bound:5.0%}   1 client p50 {c1['p50_ms']:.1f} ms   server CPU ms/text: "
                        f"1 client {c1['server_cpu_ms_per_text']:.1f}, 16 clients {c16['server_cpu_ms_per_text']:.1f}"
                    )


if __name__ == "__main__":
    main()
