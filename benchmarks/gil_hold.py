"""Whether Qdrant Edge's calls let other Python threads run (issues 13 and 17: the server's stalls, ingest).

Why: a server thread that writes or builds indexes stalls every other request if the engine call holds the
GIL; and ingest could use both cores with two writer threads only if ``EdgeShard.update`` released it. A
ticker thread sleeps 1 ms in a loop while ``Collection.add`` (one ``shard.update`` per write batch) and then
``optimize()`` run on synthetic bge-m3-shaped documents (benchmarks/search.py's). If a call released the
GIL, the ticker would tick ~once per ms during it; the table gives, per call kind, its total seconds, the
ticks seen inside those calls, the ticks expected had the thread run freely, and the longest gap between
ticks.

Usage (repository root, project venv)::

    OPENBLAS_NUM_THREADS=1 python benchmarks/gil_hold.py --docs 1024
"""

from __future__ import annotations

import argparse
import bisect
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import search as S  # noqa: E402

from m3search import Collection, M3Encoder  # noqa: E402


class Ticker(threading.Thread):
    """Records a timestamp, then sleeps 1 ms, until stopped: the times this thread got the GIL."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ticks: list[float] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            self.ticks.append(time.perf_counter())
            time.sleep(0.001)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=1024, help="synthetic documents written, then optimized")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="m3search-gil-"))
    enc = M3Encoder.from_pretrained(str(S.build_model(work / "model")), device="cpu", dtype="float32")
    col = Collection.create(work / "collection", model=enc)
    engine, spans = col.engine, {"update": [], "optimize": []}
    shard = engine.shard

    class Timed:  # the shard, with its update timed
        def __getattr__(self, name: str):
            return getattr(shard, name)

        def update(self, op):
            t = time.perf_counter()
            try:
                return shard.update(op)
            finally:
                spans["update"].append((t, time.perf_counter()))

    engine._shard = Timed()
    corpus = S.SyntheticCorpus(1, 0, args.docs)
    ticker = Ticker()
    ticker.start()
    col.add(["synthetic"] * args.docs, ids=[str(i) for i in range(args.docs)], embeddings=corpus, optimize=False)
    t = time.perf_counter()
    engine.optimize()
    spans["optimize"].append((t, time.perf_counter()))
    ticker.running = False
    ticker.join()
    col.close()
    ticks = ticker.ticks
    period = float(np.median(np.diff(ticks)))  # a tick's period when the thread runs freely
    print(f"{args.docs} documents; the ticker's median period: {period * 1000:.2f} ms\n")
    print("| call | calls | seconds | ticks inside | ticks if the GIL were free | longest gap ms |")
    print("|---|---|---|---|---|---|")
    for name, sp in spans.items():
        seconds = sum(b - a for a, b in sp)
        inside = sum(bisect.bisect(ticks, b) - bisect.bisect(ticks, a) for a, b in sp)
        gaps = np.diff(ticks)
        gap = max((gaps[max(0, bisect.bisect(ticks, a) - 1) : bisect.bisect(ticks, b)].max(initial=0) for a, b in sp))
        print(f"| {name} | {len(sp)} | {seconds:.2f} | {inside} | ~{seconds / period:.0f} | {gap * 1000:.0f} |")


if __name__ == "__main__":
    main()
