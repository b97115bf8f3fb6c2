"""The layout change that makes a filter's cost independent of its number of conditions (issue 12).

Qdrant Edge reads a point's whole payload (text included) once per filter condition
(benchmarks/filter_cost.py). A ``NestedCondition`` reads it once and evaluates the whole
inner filter on the nested object, but only over an *array* of objects. So: the same 51
points (one holds 5 MB of text) stored twice, as m3search stores them today
(``"metadata": {...}``) and with the metadata as a one-element array (``"m": [{...}]``),
and the same ``or`` of 1 / 101 equality conditions as flat conditions vs one nested one.

    PYTHONPATH=src python benchmarks/filter_nested.py [--big-mb 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import qdrant_edge as qe


def shard(root: str, big_mb: float, wrap: bool) -> qe.EdgeShard:
    s = qe.EdgeShard.create(root, qe.EdgeConfig(vectors={"dense": qe.EdgeVectorParams(2, qe.Distance.Dot)}))
    pts = []
    for i in range(51):
        text = "x" * int(big_mb * (1 << 20)) if i == 50 else f"doc {i}"
        meta = {"f": i % 7, "g": "a"}
        payload = {"id": str(i), "text": text, **({"m": [meta]} if wrap else {"metadata": meta})}
        pts.append(qe.Point(str(uuid.uuid4()), {"dense": [1.0, 0.0]}, payload))
    s.update(qe.UpdateOperation.upsert_points(pts))
    return s


def timed(s: qe.EdgeShard, flt: qe.Filter) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = s.count(qe.CountRequest(exact=True, filter=flt))
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-mb", type=float, default=5.0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        today, wrapped = shard(tmp + "/a", args.big_mb, False), shard(tmp + "/b", args.big_mb, True)
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
        today.close()
        wrapped.close()
    print(f"51 points, one with {args.big_mb} MB of text; 7 points match")
    print(f"{'layout':16} {'filter':7} {'conditions':>10} {'matched':>7} {'seconds':>8}")
    for layout, shape, n, matched, sec in rows:
        print(f"{layout:16} {shape:7} {n:>10} {matched:>7} {sec:>8.3f}")


if __name__ == "__main__":
    main()
