"""What the Qdrant Edge probe (``files.Probed`` over the shard: every shard call wrapped so that a failure caused by a
part this process may not read or write is named) costs: one shard call raw vs through ``engine.shard``, side by side in
one process; shard calls per ``all`` search; and the walk a failed call runs. Tiny random model, offline.

    PYTHONPATH=src python benchmarks/probe_cost.py [--docs 3000]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import timeit

from m3search import Collection, M3Encoder
from m3search.engines.files import refuse_unreadable
from m3search.engines.qdrant_edge import SHARD, QdrantEdgeEngine
from m3search.testing import build_random_model


def best(fn, number: int) -> float:
    """Seconds per call: the fastest of five rounds of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=3000)
    args = ap.parse_args()
    d = tempfile.mkdtemp()
    enc = M3Encoder.from_pretrained(build_random_model(d + "/m", seed=0), dtype="float32")
    texts = [f"document {i} about wings, flow and pressure number {i % 97}" for i in range(args.docs)]
    col = Collection.create(d + "/c", model=enc)
    col.add(texts, ids=[str(i) for i in range(args.docs)])
    eng = col.engine
    accesses = []
    prop = QdrantEdgeEngine.shard
    QdrantEdgeEngine.shard = property(lambda self: accesses.append(1) or prop.fget(self))
    col.search("wings and pressure", k=10, mode="all")
    QdrantEdgeEngine.shard = prop
    raw = eng._shard
    print(f"CPU: {platform.processor() or platform.machine()}; {args.docs} documents")
    print("| what | time |\n|---|---|")
    print(f"| raw `shard.info()` | {best(raw.info, 20000) * 1e6:.2f} us |")
    print(f"| probed `engine.shard.info()` | {best(lambda: eng.shard.info(), 20000) * 1e6:.2f} us |")
    print(f"| shard accesses per `all` search | {len(accesses)} |")
    print(
        f"| `all` search, k=10 | {best(lambda: col.search('wings and pressure', k=10, mode='all'), 20) * 1e3:.2f} ms |"
    )
    walk = best(lambda: refuse_unreadable(eng.root, eng.root / SHARD), 20)
    print(f"| probe walk after a failed call (`refuse_unreadable` over the shard) | {walk * 1e3:.2f} ms |")
    col.close()


if __name__ == "__main__":
    main()
