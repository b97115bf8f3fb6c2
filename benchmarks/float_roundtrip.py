"""How many float64 metadata values Qdrant Edge returns changed (issue 12's campaign finding).

Stores 5,000 floats per group as payload values of one shard, scrolls them back and counts
the values that differ and by how many units in the last place.

    PYTHONPATH=src python benchmarks/float_roundtrip.py
"""

from __future__ import annotations

import tempfile
import uuid
from collections import Counter

import numpy as np
import qdrant_edge as qe


def main() -> None:
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
        offset = None
        while True:
            records, offset = shard.scroll(qe.ScrollRequest(limit=5000, offset=offset, with_payload=True))
            for r in records:
                group, v = values[r.payload["i"]]
                if r.payload["v"] != v:
                    changed[group] += 1
                    ulps[group] = max(ulps[group], _ulps(v, r.payload["v"]))
            if offset is None:
                break
        shard.close()
    print(f"{'values':22} {'changed':>14} {'max ULPs':>8}")
    for group, vs in groups.items():
        print(f"{group:22} {changed[group]:>6} / {len(vs)} {ulps[group]:>8}")


def _ulps(a: float, b: float) -> int:
    """Distance in units in the last place (same sign assumed: the store never flips it)."""
    ia, ib = np.array([a, b], dtype=np.float64).view(np.int64)
    return abs(int(ia) - int(ib))


if __name__ == "__main__":
    main()
