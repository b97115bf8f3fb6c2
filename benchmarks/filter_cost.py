"""Where a metadata filter's time goes in Qdrant Edge, and whether an engine call holds the GIL.

Issue 12 found that a filter's cost grows with the size of the stored texts (500 ``or``
clauses on 50 documents: 0.68 s; with one 5 MB document: 6.5 s). This script isolates
the engine: a shard with m3search's point layout (payload ``{"id", "text", "metadata"}``),
50 short documents plus optionally one large one, then ``count(filter)`` (the filter
alone, no vectors) timed for

* payload storage: ``Cold`` (the default, what m3search creates) vs ``Cached`` (in RAM);
* filter shape: the grammar's int equality (``should[match, range]`` per clause, what
  :mod:`m3search.engines.qdrant_filter` emits), plain ``match`` per clause (string
  equality), one ``match_any`` over all values (an ``in``);
* a payload index on the filtered field (only possible for a known field).

The GIL check runs the slowest filter in a thread and counts how many iterations a
pure-Python loop makes meanwhile (compared with the same loop alone).

    PYTHONPATH=src python benchmarks/filter_cost.py [--clauses 500] [--big-mb 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid

import numpy as np
import qdrant_edge as qe


def build(root: str, n: int, big_mb: float, memory: qe.Memory, index: bool) -> qe.EdgeShard:
    cfg = qe.EdgeConfig(vectors={"dense": qe.EdgeVectorParams(8, qe.Distance.Dot)}, payload_memory=memory)
    shard = qe.EdgeShard.create(root, cfg)
    rng = np.random.default_rng(0)
    points = []
    for i in range(n + (1 if big_mb else 0)):
        text = "x" * int(big_mb * (1 << 20)) if i == n else f"document {i} " * 20
        meta = {"f": i % 7, "lang": ["en", "de", "fr"][i % 3]}
        points.append(
            qe.Point(
                str(uuid.uuid5(uuid.NAMESPACE_URL, str(i))),
                {"dense": rng.standard_normal(8).astype(np.float32).tolist()},
                {"id": str(i), "text": text, "metadata": meta},
            )
        )
    shard.update(qe.UpdateOperation.upsert_points(points))
    if index:
        shard.update(qe.UpdateOperation.create_field_index("metadata.f", qe.PayloadSchemaType.Integer))
        shard.update(qe.UpdateOperation.create_field_index("metadata.lang", qe.PayloadSchemaType.Keyword))
    shard.optimize()
    return shard


def filters(clauses: int) -> dict[str, qe.Filter]:
    key = "metadata.f"

    def int_eq(v):  # what qdrant_filter emits for {"f": v}
        return qe.Filter(
            should=[
                qe.FieldCondition(key, match=qe.MatchValue(v)),
                qe.FieldCondition(key, range=qe.RangeFloat(gte=float(v), lte=float(v))),
            ]
        )

    vals = list(range(100, 100 + clauses))  # no document matches: every clause is evaluated
    return {
        "or of int eq (current)": qe.Filter(should=[int_eq(v) for v in vals]),
        "or of match only": qe.Filter(should=[qe.FieldCondition(key, match=qe.MatchValue(v)) for v in vals]),
        "or over distinct fields": qe.Filter(
            should=[qe.FieldCondition(f"metadata.g{v}", match=qe.MatchValue(v)) for v in vals]
        ),
        "one match_any (in)": qe.Filter(must=[qe.FieldCondition(key, match=qe.MatchAny(vals))]),
    }


def timed(shard: qe.EdgeShard, flt: qe.Filter, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        shard.count(qe.CountRequest(exact=True, filter=flt))
        best = min(best, time.perf_counter() - t)
    return best


def gil_check(shard: qe.EdgeShard, flt: qe.Filter) -> tuple[float, float]:
    """(loop iterations per second alone, while the engine call runs in a thread)."""

    def spin(seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += 1
        return n / seconds

    alone = spin(0.5)
    done = threading.Event()
    th = threading.Thread(target=lambda: (timed(shard, flt, reps=1), done.set()))
    t0 = time.perf_counter()
    th.start()
    n = 0
    while not done.is_set():
        n += 1
    during = n / (time.perf_counter() - t0)
    th.join()
    return alone, during


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--clauses", type=int, default=500)
    ap.add_argument("--big-mb", type=float, default=5.0)
    args = ap.parse_args()
    rows = []
    for memory in (qe.Memory.Cold, qe.Memory.Cached):
        for index in (False, True):
            for big in (0.0, args.big_mb):
                with tempfile.TemporaryDirectory() as tmp:
                    shard = build(tmp + "/s", args.docs, big, memory, index)
                    for name, flt in filters(args.clauses).items():
                        rows.append(
                            {
                                "payload": memory.name if hasattr(memory, "name") else str(memory),
                                "index": index,
                                "big_mb": big,
                                "filter": name,
                                "seconds": round(timed(shard, flt), 4),
                            }
                        )
                        print(json.dumps(rows[-1]), flush=True)
                    if memory == qe.Memory.Cold and not index and big:
                        alone, during = gil_check(shard, filters(args.clauses)["or of int eq (current)"])
                        print(json.dumps({"gil": {"loop_per_s_alone": round(alone), "during_engine": round(during)}}))
                    shard.close()
    print(f"\n{'payload':8} {'index':6} {'big MB':>6}  {'filter':28} {'seconds':>8}")
    for r in rows:
        print(f"{r['payload']:8} {r['index']!s:6} {r['big_mb']:>6}  {r['filter']:28} {r['seconds']:>8.4f}")


if __name__ == "__main__":
    main()
