"""A metadata filter's cost with and without large stored texts, point layout of schema 2 vs 3.

Issue 12 found that a filter's cost grew with the size of the stored texts (500 ``or``
clauses on 50 documents: 0.68 s; with one 5 MB document: 6.5 s): Qdrant Edge deserializes a
point's whole payload, text included, once per condition. Schema 3
(:mod:`m3search.engines.qdrant_common`) sends every filter as ``HasVector("dense")`` + ONE
nested condition and keeps texts over 16,384 characters on vector-less text points.

This script builds, per layout and big-document size, a collection of ``--docs`` short
documents plus one big one (tiny random model; the big one's vectors come from a short
text, so the build is fast; the schema-2 collection is written by the engine's schema-2
writer, which stores exactly what a8eac53 stored), then times through the library, best
of ``--reps``:

* ``count`` with the costliest filter the limits allow (``MAX_FILTER_CONDITIONS`` equality
  conditions over fields no document has: every condition is evaluated on every point);
* ``search`` (mode dense, exact) with the same filter, and the engine's part of it alone
  (``search_dense`` with the query vector ready: the library's search also encodes the query);
* the GIL: a pure-Python loop's rate while that count runs in a thread, vs alone.

    PYTHONPATH=src python benchmarks/filter_cost.py [--docs 50] [--big-mb 0 5 15]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def build(root: Path, model: str, docs: int, big_mb: float, layout: int):
    from m3search import Collection

    short = [f"document {i} about pumps, valves and flow" for i in range(docs + 1)]
    col = Collection.create(root, model=model, device="cpu", dtype="float32")
    col.engine.layout = layout  # 2: the schema-2 writer (payload {"id", "text", "metadata"})
    emb = col.encoder.encode(short)
    texts = short[:docs] + (["flow " * int(big_mb * (1 << 20) / 5)] if big_mb else [short[docs]])
    col.add(texts, ids=[str(i) for i in range(docs + 1)], metadata=[{"n": i} for i in range(docs + 1)], embeddings=emb)
    return col


def best(fn, reps: int) -> float:
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def gil(fn) -> tuple[float, float]:
    """(loop iterations per second alone, while ``fn`` runs in a thread)."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        n += 1
    alone = n / 0.5
    done = threading.Event()
    th = threading.Thread(target=lambda: (fn(), done.set()))
    t0, n = time.perf_counter(), 0
    th.start()
    while not done.is_set():
        n += 1
    during = n / (time.perf_counter() - t0)
    th.join()
    return alone, during


def measure(col, flt: dict, reps: int) -> dict:
    from m3search.filters import parse_filter

    assert col.count(flt) == 0 and col.count({"n": 3}) == 1
    alone, during = gil(lambda: col.count(flt))
    q, ast = col.encoder.encode(["pumps"]).dense, parse_filter(flt)
    return {
        "count_s": round(best(lambda: col.count(flt), reps), 4),
        "search_s": round(best(lambda: col.search("pumps", k=10, mode="dense", filter=flt, exact=True), reps), 4),
        "engine_search_s": round(best(lambda: col.engine.search_dense(q, 10, ast, exact=True), reps), 4),
        "loop_alone_per_s": round(alone),
        "loop_during_count_per_s": round(during),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--big-mb", type=float, nargs="+", default=[0.0, 5.0, 15.0])
    ap.add_argument("--layouts", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from m3search.filters import MAX_FILTER_CONDITIONS
    from m3search.testing import build_random_model

    flt = {"or": [{f"absent{i}": i} for i in range(MAX_FILTER_CONDITIONS)]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_random_model(Path(tmp) / "model", seed=0))
        for big in args.big_mb:
            for layout in args.layouts:
                col = build(Path(tmp) / f"c{layout}-{big}", model, args.docs, big, layout)
                try:
                    row = {"layout": layout, "big_mb": big, "conditions": MAX_FILTER_CONDITIONS}
                    row.update(measure(col, flt, args.reps))
                finally:
                    col.close()
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.docs} short documents + one big one; filter: {MAX_FILTER_CONDITIONS} equality conditions")
    print(
        f"{'layout':>6} {'big MB':>6} {'count s':>8} {'search s':>8} {'engine s':>8} "
        f"{'loop/s alone':>13} {'loop/s during':>13}"
    )
    for r in rows:
        print(
            f"{r['layout']:>6} {r['big_mb']:>6} {r['count_s']:>8.4f} {r['search_s']:>8.4f} {r['engine_search_s']:>8.4f} "
            f"{r['loop_alone_per_s']:>13} {r['loop_during_count_per_s']:>13}"
        )


if __name__ == "__main__":
    main()
