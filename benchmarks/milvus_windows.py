"""Milvus windows: one windowed synthetic corpus on Qdrant Edge and on Milvus Lite, side by side.

What it measures, and why this way:

* Data: ``benchmarks/search.py``'s synthetic rows of bge-m3's shapes (1024-d dense, 60-150 Zipf
  sparse terms, 16-256 ColBERT tokens), ``--windows`` consecutive rows making ONE document of that
  many windows, written in batches of 64 documents through the Collection's own write path (so
  the manifest records the window count as an ingest does); the planted queries of search.py.
* Ingest: documents/s (generating the token vectors is subtracted).
* Latency: one query per call, ``k=10``, default candidates; p50 per mode after a warm-up.
* Agreement: Milvus's top 10 of every mode vs Qdrant Edge's (ids in order, and the largest
  score difference), i.e. documents at their best window on both engines.
* Rewrite: every document rewritten with ONE window; the stored rows (points) must drop to one
  per document and the count stay (no orphan window), with the time it took.

Milvus Lite is a development stand-in (its reads run at ~15-50 MB/s; see engines.py), not a server.

Usage (repository root; run nothing else heavy meanwhile)::

    python benchmarks/milvus_windows.py --docs 200 --windows 3 --queries 10
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import search as S  # noqa: E402  (the synthetic data of benchmarks/search.py)
from results import publish, run_or_replay  # noqa: E402

MODES = ("dense", "sparse", "colbert", "all")
ENGINES = {"qdrant-edge": lambda d: str(d / "edge"), "milvus-lite": lambda d: str(d / "milvus.db")}
BATCH = 64


def stored_rows(col) -> int:
    """Every stored point (Qdrant) or row (Milvus): windows, tombstones, text points."""
    eng = col.engine
    if eng.name == "milvus":
        return int(eng.client.query(eng.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])
    return eng._count(None, docs_only=False)


def write(col, corpus: S.SyntheticCorpus, docs: int, windows: int) -> float:
    """All documents, ``windows`` rows each; returns seconds spent writing (not generating)."""
    from m3search.engines.shapes import PointBatch

    spent = 0.0
    for a in range(0, docs, BATCH):
        n = min(BATCH, docs - a)
        gen = corpus.gen_s
        e = corpus[a * windows : (a + n) * windows]
        t = time.perf_counter()
        batch = PointBatch(
            [f"d{i}" for i in range(a, a + n)],
            [f"document {i}" for i in range(a, a + n)],
            [{"g": i % 2} for i in range(a, a + n)],
            e.dense,
            e.sparse,
            e.colbert,
            e.colbert_offsets,
            np.arange(0, n * windows + 1, windows, dtype=np.int64),
        )
        col._write(batch)  # the Collection's write: notes the window count in the manifest, then one upsert
        spent += time.perf_counter() - t - (corpus.gen_s - gen)
    return spent


def run_engine(name: str, location: str, model: Path, args, qemb) -> dict[str, Any]:
    from m3search.collection import Collection

    # float16 on both: Milvus stores nothing else, and Qdrant Edge's default (turbo8) would make the
    # agreement check compare codecs instead of engines
    col = Collection.create(location, model=str(model), device="cpu", dtype="float32", colbert_dtype="float16")
    try:
        corpus = S.SyntheticCorpus(args.seed, 0, args.docs * args.windows)
        ingest = write(col, corpus, args.docs, args.windows)
        out: dict[str, Any] = {"docs_per_s": args.docs / ingest, "count": col.count(), "rows": stored_rows(col)}
        for i in range(min(args.warmup, len(qemb))):
            col.search_batch(["q"], mode="all", query_embeddings=qemb[i])
        out["modes"], out["hits"] = {}, {}
        for mode in MODES:
            times = []
            for i in range(len(qemb)):
                t = time.perf_counter()
                col.search_batch(["q"], mode=mode, query_embeddings=qemb[i])
                times.append((time.perf_counter() - t) * 1000)
            out["modes"][mode] = float(np.percentile(times, 50))
            hits = col.search_batch(["q"] * len(qemb), mode=mode, query_embeddings=qemb)
            out["hits"][mode] = [[(h.id, h.score) for h in hs] for hs in hits]
        one = S.SyntheticCorpus(args.seed + 1, 0, args.docs)  # every document rewritten as one window
        out["rewrite_s"] = write(col, one, args.docs, 1)
        out["after"] = {"count": col.count(), "rows": stored_rows(col)}
        print(f"[milvus_windows.py] {name}: {out['docs_per_s']:.1f} docs/s, p50 {out['modes']}", flush=True)
    finally:
        col.close()
    return out


def run(args) -> dict[str, Any]:
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="m3-mwin-"))
    work.mkdir(parents=True, exist_ok=True)
    model = S.build_model(work / "model")
    # queries planted in rows of the windowed corpus: each matches one window of one document
    qemb, _ = S.planted_queries(S.SyntheticCorpus(args.seed, 0, args.docs * args.windows), args.queries, args.seed)
    res: dict[str, Any] = {
        "docs": args.docs,
        "windows": args.windows,
        "queries": len(qemb),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
        "loadavg_start": list(os.getloadavg()),
        "engines": {},
    }
    for name, loc in ENGINES.items():
        folder = work / name
        folder.mkdir(exist_ok=True)
        res["engines"][name] = run_engine(name, loc(folder), model, args, qemb)
        shutil.rmtree(folder, ignore_errors=True)
    res["loadavg_end"] = list(os.getloadavg())
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(res: dict[str, Any], argv: list[str]) -> str:
    e, m = res["engines"]["qdrant-edge"], res["engines"]["milvus-lite"]
    lines = [
        f"{res['docs']} synthetic documents of {res['windows']} windows each (bge-m3's shapes, float16 ColBERT), "
        f"{res['queries']} planted queries, one query per call, k=10, default candidates. "
        f"`python benchmarks/milvus_windows.py {' '.join(argv)}`, {res['started']} UTC, load average "
        f"{res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f} on 2 cores shared with other jobs.",
        "",
        "| engine | ingest docs/s | "
        + " | ".join(f"{x} p50 ms" for x in MODES)
        + " | stored rows | after 1-window rewrite |",
        "|---|---:|" + "---:|" * len(MODES) + "---:|---:|",
    ]
    for name, r in res["engines"].items():
        lines.append(
            f"| {name} | {r['docs_per_s']:.1f} | "
            + " | ".join(f"{r['modes'][x]:.1f}" for x in MODES)
            + f" | {r['rows']} for {r['count']} docs | {r['after']['rows']} for {r['after']['count']} docs |"
        )
    lines += ["", "Milvus Lite vs Qdrant Edge, same queries: "]
    parts = []
    for x in MODES:
        same = np.mean([[a[0] for a in p] == [b[0] for b in q] for p, q in zip(e["hits"][x], m["hits"][x])])
        diff = max(
            (abs(a[1] - b[1]) for p, q in zip(e["hits"][x], m["hits"][x]) for a, b in zip(p, q) if a[0] == b[0]),
            default=0.0,
        )
        parts.append(f"{x}: same top-10 ids in order for {same:.0%} of queries, largest score difference {diff:.1e}")
    lines[-1] += "; ".join(parts) + "."
    lines.append("")
    return "\n".join(lines)


TITLE = "Milvus: documents as windows (`benchmarks/milvus_windows.py`, issue 11)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    ap.add_argument("--report-from", default=None, help="rebuild the report from a --json file instead of running")
    args = ap.parse_args(argv)
    res = run_or_replay(args, argv, run)
    publish("milvus_windows.py", TITLE, report(res, res["argv"]), no_write=args.no_write)


if __name__ == "__main__":
    main()
