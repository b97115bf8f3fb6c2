"""Qdrant Edge's segment settings against repeated optimizes (issue 13: the post-ingest build stalls a server).

Why: the server builds indexes after each ingest pause, and that build grows with the collection (Qdrant
merges segments). Bounding segments (``EdgeOptimizersConfig(max_segment_size=...)``) or keeping more of them
(``default_segment_number``) should make each build smaller, at the cost of searching more segments. This
measures both sides in one process per setting: ``--batches`` adds of ``--per`` synthetic bge-m3-shaped
documents (benchmarks/search.py's), each followed by ``optimize()`` as the server does, then warm ``all`` and
``dense+sparse`` latency (k = 10). Prints one JSON line per setting; compare settings of ONE run only.

Usage (repository root, project venv)::

    python benchmarks/segments.py default '{"max_segment_size": 65536}' '{"default_segment_number": 8}'
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import qdrant_edge as qe

sys.path.insert(0, str(Path(__file__).parent))
import search as S  # noqa: E402

from m3search import Collection, M3Encoder  # noqa: E402
from m3search.engines import qdrant_edge as edge  # noqa: E402


def with_optimizers(opts: dict | None) -> None:
    """Make the embedded engine build its EdgeConfig with ``opts`` as its optimizer settings (None: Qdrant's)."""
    config = qe.EdgeConfig

    class Qe:
        def __getattr__(self, name: str):
            return getattr(qe, name)

        @staticmethod
        def EdgeConfig(**kw):  # noqa: N802 - qdrant_edge's name
            if opts:
                kw["optimizers"] = qe.EdgeOptimizersConfig(**opts)
            return config(**kw)

    edge.qe = Qe()


def run(setting: str, batches: int, per: int, queries: int, cache: Path) -> dict:
    with_optimizers(None if setting == "default" else json.loads(setting))
    enc = M3Encoder.from_pretrained(str(S.build_model(cache / "bge-m3-shape-model")), device="cpu", dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="m3-segments-"))
    try:
        col = Collection.create(work / "c", model=enc)
        adds, builds = [], []
        for b in range(batches):
            corpus = S.SyntheticCorpus(17, b * per, per)
            t = time.perf_counter()
            ids = [f"d{b * per + i}" for i in range(per)]
            col.add([""] * per, ids=ids, embeddings=corpus, show_progress=False, optimize=False)
            adds.append(time.perf_counter() - t - corpus.gen_s)
            t = time.perf_counter()
            col.optimize()
            builds.append(time.perf_counter() - t)
        n = batches * per
        qemb, _ = S.planted_queries(S.SyntheticCorpus(17, 0, n), queries, 17)
        for i in range(queries):  # warm: each query's candidates touched once
            col.search_batch(["q"], mode="all", query_embeddings=qemb[i])
        lat = {}
        for mode, depth in (("all", 200), ("all", 50), ("dense+sparse", 200)):
            ms = []
            for i in range(queries):
                t = time.perf_counter()
                col.search_batch(["q"], mode=mode, candidates=depth, query_embeddings=qemb[i])
                ms.append((time.perf_counter() - t) * 1000)
            lat[f"{mode}@{depth}"] = [round(float(np.percentile(ms, p)), 1) for p in (50, 95)]
        segments = len(list((work / "c" / "shard" / "segments").iterdir()))
        col.close()
        return {
            "setting": setting,
            "docs": n,
            "segments": segments,
            "add_s": round(sum(adds), 1),
            "optimize_s": [round(x, 2) for x in builds],
            "optimize_total_s": round(sum(builds), 1),
            "p50_p95_ms": lat,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help='"default" or EdgeOptimizersConfig keywords as JSON')
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--per", type=int, default=500)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "m3-segments-cache"))
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for setting in args.settings:
        print(json.dumps(run(setting, args.batches, args.per, args.queries, cache)), flush=True)


if __name__ == "__main__":
    main()
