"""Search latency as an embedded collection grows unindexed, then after its indexes are built.

Why: the serving benchmark's ingest test (serve.py --ingest) compares queries during an ingest
with idle queries on the small starting collection; this measures, without a server, how much of
that is the collection growing (the unindexed scan, longer sparse postings) and what a build
then costs the first queries (token vectors read back from disk).

Proxy model, cranfield: 200 documents indexed and optimized, then the same 200 texts added
under new ids in pieces of 64 (writes of 4, ``optimize=False``, as ``/documents`` does), with
``search(mode="all", k=10)`` over 60 queries timed at each checkpoint, after ``optimize()``, and
after a reopen.

Usage::

    python benchmarks/search_growth.py --colbert-dtype turbo8 --docs 10000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from m3search import Collection

SHARED = Path(os.environ.get("M3SEARCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def _latency(coll: Collection, queries: list[str]) -> tuple[float, float]:
    coll.search(queries[0], k=10, mode="all")
    times = []
    for q in queries:
        t0 = time.perf_counter()
        coll.search(q, k=10, mode="all")
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "models" / "bge-m3-proxy"))
    p.add_argument("--colbert-dtype", default="turbo8")
    p.add_argument("--docs", type=int, default=10_000, help="documents added unindexed")
    args = p.parse_args(argv)
    data = SHARED / "data" / "cranfield"
    queries = [json.loads(line)["text"] for line in (data / "queries.jsonl").open(encoding="utf-8")][:60]
    rows = [json.loads(line) for line in (data / "corpus.jsonl").open(encoding="utf-8")][:200]
    docs = [(d["title"] + " " + d["text"]).strip() for d in rows]

    def say(what: str, lat: tuple[float, float]) -> None:
        print(f"{args.colbert_dtype:8} {what:40} p50 {lat[0]:6.1f}  p95 {lat[1]:6.1f} ms", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c"
        coll = Collection.create(path, model=args.model, colbert_dtype=args.colbert_dtype)
        coll.add(docs, ids=[f"d{i}" for i in range(len(docs))])
        say(f"{len(docs)} documents, indexed", _latency(coll, queries))
        n = 0
        for target in sorted({min(2000, args.docs), min(5000, args.docs), args.docs}):
            t0 = time.perf_counter()
            for start in range(n, target, 64):
                end = min(start + 64, target)
                piece = [docs[i % len(docs)] for i in range(start, end)]
                coll.add(piece, ids=[f"i{i}" for i in range(start, end)], optimize=False, batch_size=4)
            n = target
            say(f"+{n} unindexed (written in {time.perf_counter() - t0:.0f} s)", _latency(coll, queries))
        t0 = time.perf_counter()
        coll.optimize()
        say(f"after optimize ({time.perf_counter() - t0:.1f} s)", _latency(coll, queries))
        say("same queries again", _latency(coll, queries))
        coll.close()
        coll = Collection.open(path, model=args.model)
        say("reopened", _latency(coll, queries))
        say("same queries again", _latency(coll, queries))
        coll.close()


if __name__ == "__main__":
    main()
