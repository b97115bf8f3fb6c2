"""``/health`` latency while the worst search the limits allow runs (issue 12).

Builds a collection with the tiny random model: ``--docs`` short documents plus one of
``--big-mb`` MB (under the 16 MB body limit; its vectors come from a short text so the
build is fast), serves it with ``m3search serve`` on a loopback port, then sends the
most expensive filter :mod:`m3search.filters` accepts (``MAX_FILTER_CONDITIONS`` equality
conditions over distinct fields that no document has, so every condition is checked
against every point) and, while that search runs, ``GET /health`` back to back.
Prints the search's time and the /health latencies (a Qdrant Edge call holds the GIL,
see benchmarks/filter_cost.py, so /health waits for the engine call in progress), once per
point layout: ``--layouts 2 3`` builds the same collection with the schema-2 writer (what
a8eac53 stored: the text in the payload every filter condition reads) and the schema-3 one.

    PYTHONPATH=src python benchmarks/health_under_load.py [--big-mb 15] [--conditions 64] [--layouts 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def build(root: Path, docs: int, big_mb: float, layout: int) -> Path:
    from m3search import Collection
    from m3search.testing import build_random_model

    model = build_random_model(root / "model", seed=0)
    short = [f"document {i} about pumps, valves and flow" for i in range(docs + 1)]
    col = Collection.create(root / "coll", model=str(model), device="cpu", dtype="float32")
    col.engine.layout = layout  # opened again by the server, the stored layout is detected
    emb = col.encoder.encode(short)
    texts = short[:docs] + ["flow " * int(big_mb * (1 << 20) / 5)]
    col.add(texts, ids=[str(i) for i in range(docs + 1)], metadata=[{"n": i} for i in range(docs + 1)], embeddings=emb)
    col.close()
    return root / "coll"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--big-mb", type=float, default=15.0)
    ap.add_argument("--conditions", type=int, default=None, help="default: MAX_FILTER_CONDITIONS")
    ap.add_argument("--mode", default="all")
    ap.add_argument("--layouts", type=int, nargs="+", default=[2, 3])
    args = ap.parse_args()
    from m3search.filters import MAX_FILTER_CONDITIONS

    n_cond = args.conditions or MAX_FILTER_CONDITIONS
    print(f"collection: {args.docs} docs + one {args.big_mb} MB doc; filter: {n_cond} conditions; mode {args.mode}")
    for layout in args.layouts:
        run(args, n_cond, layout)


def run(args: argparse.Namespace, n_cond: int, layout: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        coll = build(Path(tmp), args.docs, args.big_mb, layout)
        env = {**os.environ, "M3SEARCH_DTYPE": "float32", "M3SEARCH_DEVICE": "cpu"}
        log = open(Path(tmp) / "server.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "m3search", "serve", "-c", str(coll), "--port", "0", "--log-level", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            url = None
            for _ in range(600):
                try:
                    url = json.loads((coll / "server.json").read_text())["url"]
                    if httpx.get(url + "/health", timeout=60).status_code == 200:
                        break
                except (OSError, ValueError, KeyError, httpx.HTTPError):
                    pass
                time.sleep(0.2)
            flt = {"or": [{f"absent{i}": i} for i in range(n_cond)]}
            body = {"query": "pumps", "k": 10, "mode": args.mode, "filter": flt}
            httpx.post(url + "/search", json={"query": "warm up", "k": 10, "mode": args.mode}, timeout=600)
            baseline = []
            for _ in range(20):
                t = time.perf_counter()
                httpx.get(url + "/health", timeout=600)
                baseline.append(time.perf_counter() - t)
            out: dict = {}

            def search() -> None:
                t = time.perf_counter()
                r = httpx.post(url + "/search", json=body, timeout=600)
                out["status"], out["seconds"] = r.status_code, time.perf_counter() - t

            th = threading.Thread(target=search)
            th.start()
            time.sleep(0.05)
            lat = []
            while th.is_alive():
                t = time.perf_counter()
                httpx.get(url + "/health", timeout=600)
                lat.append(time.perf_counter() - t)
            th.join()
        finally:
            proc.terminate()
            proc.wait(30)
    ms = [x * 1000 for x in lat] or [float("nan")]
    print(f"layout of schema {layout}")
    print(f"search: HTTP {out.get('status')} in {out.get('seconds', float('nan')):.2f} s")
    print(f"/health idle: median {statistics.median(baseline) * 1000:.1f} ms, max {max(baseline) * 1000:.1f} ms")
    print(f"/health during the search: n={len(lat)}, median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms")


if __name__ == "__main__":
    main()
