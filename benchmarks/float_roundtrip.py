"""How many float64 metadata values Qdrant Edge returns changed (issue 12's campaign finding).

Stores 5,000 floats per group as payload values of one shard, scrolls them back and counts
the values that differ and by how many units in the last place; checks that every value
read back is what serde_json's best-effort float parser (no ``float_roundtrip`` feature:
the significand as f64 times / divided by a power of ten) makes of the shortest decimal
form, and counts, for the first ``--filter-sample`` values of each group, the equality
filters (``range [v, v]``, as m3search sends them) that miss their own point: filters see the
parsed value. (m3search returns stored metadata exactly since schema 3: from a JSON text copy.)

    PYTHONPATH=src python benchmarks/float_roundtrip.py
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections import Counter

import numpy as np
import qdrant_edge as qe

POW10 = [float(f"1e{k}") for k in range(309)]


def best_effort_parse(v: float) -> float:
    """serde_json's default parse of ``repr(v)`` (serde_json ``f64_from_parts``)."""
    mantissa, _, exp = repr(abs(v)).lower().partition("e")
    whole, _, frac = mantissa.partition(".")
    f, e = float(int(whole + frac)), int(exp or 0) - len(frac)
    while True:
        if abs(e) < len(POW10):
            f = f * POW10[e] if e >= 0 else f / POW10[-e]
            break
        if f == 0.0:
            break
        f, e = f / 1e308, e + 308
    return -f if str(v).startswith("-") else f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter-sample", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**63, size=5000, dtype=np.int64).view(np.float64)
    finite = [float(v) for v in bits if np.isfinite(v)]
    groups = {
        "uniform[0,1)": [float(x) for x in rng.random(5000)],
        "uniform*1000": [float(x) for x in rng.random(5000) * 1000],
        "0.1*i + 0.2": [0.1 * i + 0.2 for i in range(5000)],
        "bits, 15 sig digits": [float(f"{v:.14e}") for v in finite],
        "bits, 17 sig digits": finite,
    }
    values = [(g, v) for g, vs in groups.items() for v in vs]
    with tempfile.TemporaryDirectory() as tmp:
        shard = qe.EdgeShard.create(
            tmp + "/s", qe.EdgeConfig(vectors={"dense": qe.EdgeVectorParams(2, qe.Distance.Dot)})
        )
        points = [
            qe.Point(str(uuid.uuid5(uuid.NAMESPACE_URL, str(i))), {"dense": [1.0, 0.0]}, {"i": i, "v": v})
            for i, (_, v) in enumerate(values)
        ]
        for a in range(0, len(points), 2000):
            shard.update(qe.UpdateOperation.upsert_points(points[a : a + 2000]))
        changed: Counter = Counter()
        ulps: Counter = Counter()
        unpredicted: Counter = Counter()
        misses: Counter = Counter()
        offset = None
        while True:
            records, offset = shard.scroll(qe.ScrollRequest(limit=5000, offset=offset, with_payload=True))
            for r in records:
                group, v = values[r.payload["i"]]
                unpredicted[group] += r.payload["v"] != best_effort_parse(v)
                if r.payload["v"] != v:
                    changed[group] += 1
                    ulps[group] = max(ulps[group], _ulps(v, r.payload["v"]))
            if offset is None:
                break
        start = 0
        for group, vs in groups.items():
            for i in range(start, start + min(args.filter_sample, len(vs))):
                v = values[i][1]
                only = qe.HasIdCondition({str(uuid.uuid5(uuid.NAMESPACE_URL, str(i)))})
                eq = qe.FieldCondition("v", range=qe.RangeFloat(gte=v, lte=v))
                misses[group] += shard.count(qe.CountRequest(exact=True, filter=qe.Filter(must=[only, eq]))) != 1
            start += len(vs)
        shard.close()
    print(f"{'values':22} {'changed':>14} {'max ULPs':>8} {'not as emulated':>15} {'eq filter misses':>16}")
    for group, vs in groups.items():
        n = min(args.filter_sample, len(vs))
        print(
            f"{group:22} {changed[group]:>6} / {len(vs)} {ulps[group]:>8} {unpredicted[group]:>15} "
            f"{misses[group]:>10} / {n}"
        )


def _ulps(a: float, b: float) -> int:
    """Distance in units in the last place (same sign assumed: the store never flips it)."""
    ia, ib = np.array([a, b], dtype=np.float64).view(np.int64)
    return abs(int(ia) - int(ib))


if __name__ == "__main__":
    main()
