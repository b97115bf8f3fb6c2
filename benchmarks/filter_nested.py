"""The layout change that makes a filter's cost independent of its number of conditions (issue 12).

Qdrant Edge reads a point's whole payload (text included) once per filter condition
(benchmarks/filter_cost.py). A ``NestedCondition`` reads it once and evaluates the whole
inner filter on the nested object, but only over an *array* of objects. So: the same 51
points (one holds 5 MB of text) stored twice, as m3search stores them today
(``"metadata": {...}``) and with the metadata as a one-element array (``"m": [{...}]``),
and the same ``or`` of 1 / 101 equality conditions as flat conditions vs one nested one.
A third shard is m3search's schema-3 layout: ``m: [{...}]`` and the text on vector-less text
points of 64 KiB, filtered by ``HasVector("dense")`` then the nested condition (HasVector is
answered without reading payloads, so the text points' payloads are never read).

    PYTHONPATH=src python benchmarks/filter_nested.py [--big-mb 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import qdrant_edge as qe


def shard(root: str, big_mb: float, wrap: bool, text_points: bool = False) -> qe.EdgeShard:
    s = qe.EdgeShard.create(root, qe.EdgeConfig(vectors={"dense": qe.EdgeVectorParams(2, qe.Distance.Dot)}))
    pts = []
    for i in range(51):
        text = "x" * int(big_mb * (1 << 20)) if i == 50 else f"doc {i}"
        meta = {"f": i % 7, "g": "a"}
        payload = {"id": str(i), **({"m": [meta]} if wrap else {"metadata": meta})}
        if text_points:
            for c in range(0, len(text), 1 << 16):
                pts.append(qe.Point(str(uuid.uuid4()), {}, {"id": str(i), "chunk": c, "text": text[c : c + (1 << 16)]}))
        else:
            payload["text"] = text
        pts.append(qe.Point(str(uuid.uuid4()), {"dense": [1.0, 0.0]}, payload))
    s.update(qe.UpdateOperation.upsert_points(pts))
    return s


def timed(s: qe.EdgeShard, flt: qe.Filter, reps: int = 3) -> tuple[int, float]:
    """(matched, best of ``reps`` seconds)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        n = s.count(qe.CountRequest(exact=True, filter=flt))
        best = min(best, time.perf_counter() - t0)
    return n, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-mb", type=float, default=5.0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        today, wrapped = shard(tmp + "/a", args.big_mb, False), shard(tmp + "/b", args.big_mb, True)
        split = shard(tmp + "/c", args.big_mb, True, text_points=True)
        for n in (1, 101):
            values = [3] + list(range(100, 99 + n))

            def conds(prefix: str, values=values) -> list:
                return [qe.FieldCondition(prefix + "f", match=qe.MatchValue(v)) for v in values]

            rows.append(("metadata: {...}", "flat", n, *timed(today, qe.Filter(should=conds("metadata.")))))
            rows.append(
                (
                    "metadata: {...}",
                    "nested",
                    n,
                    *timed(today, qe.Filter(must=[qe.NestedCondition("metadata", qe.Filter(should=conds("")))])),
                )
            )
            rows.append(("m: [{...}]", "flat", n, *timed(wrapped, qe.Filter(should=conds("m[].")))))
            rows.append(
                (
                    "m: [{...}]",
                    "nested",
                    n,
                    *timed(wrapped, qe.Filter(must=[qe.NestedCondition("m", qe.Filter(should=conds("")))])),
                )
            )
            nested = qe.NestedCondition("m", qe.Filter(should=conds("")))
            rows.append(("m + text points", "nested", n, *timed(split, qe.Filter(must=[nested]))))
            rows.append(
                (
                    "m + text points",
                    "hasvec+nested",
                    n,
                    *timed(split, qe.Filter(must=[qe.HasVectorCondition("dense"), nested])),
                )
            )
        today.close()
        wrapped.close()
        split.close()
    print(f"51 points, one with {args.big_mb} MB of text; 7 points match")
    print(f"{'layout':16} {'filter':13} {'conditions':>10} {'matched':>7} {'seconds':>8}")
    for layout, shape, n, matched, sec in rows:
        print(f"{layout:16} {shape:13} {n:>10} {matched:>7} {sec:>8.4f}")


if __name__ == "__main__":
    main()
