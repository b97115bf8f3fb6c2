"""Engine benchmark: the same synthetic corpus in every engine, ingest rate and search latency.

What it measures, and why this way:

* Data: ``benchmarks/search.py``'s synthetic vectors of bge-m3's shapes (1024-d dense,
  60-150 Zipf-drawn sparse terms over a 250k vocabulary, 16-256 ColBERT tokens per
  document) and its planted queries, generated once and written to each engine, so
  every engine stores and answers exactly the same data.
* Engines: embedded Qdrant Edge (a folder), qdrant-client local mode
  (``qdrant+local://``, the stand-in for a Qdrant server, which cannot be installed
  here), Milvus Lite 2.5 (a ``.db`` file, the real Milvus C++ engine in a subprocess).
  Each collection uses the defaults (float16 ColBERT storage, 128 documents per write).
* Ingest: :meth:`Collection.add` with precomputed embeddings; the time spent generating
  ColBERT vectors is subtracted; ``optimize`` (index build) is included.
* Latency: one query per call (``search_batch([q], query_embeddings=...)``, no
  encoding), ``k=10``, default ``candidates``; p50 (and p95) per mode after a warm-up.
* Agreement: top-10 overlap of each engine's ``all`` results with Qdrant Edge's.

Milvus Lite and qdrant-client local mode are development stand-ins, not servers:
local mode keeps every vector in Python memory and scores with NumPy; Milvus Lite
returns query results in time superlinear in their size (see
``m3search.engines.milvus``), which dominates its ColBERT re-ranking. Their numbers
say what the tests and a laptop see, not what a Qdrant or Milvus cluster does.

Usage (repository root, project venv; run nothing else heavy meanwhile)::

    nice -n 10 python benchmarks/engines.py                     # 2000 docs, 30 queries
    python benchmarks/engines.py --docs 200 --queries 5 --no-write   # smoke run

Writes its section of ``benchmarks/RESULTS.md`` (between ``engines.py`` markers).
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
REPO = HERE.parent
from results import publish, run_or_replay  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

MODES = ("dense", "sparse", "colbert", "dense+sparse", "dense+colbert", "all")
ENGINES = {
    "qdrant-edge": lambda d: str(d / "edge"),
    "qdrant-local": lambda d: f"qdrant+local://{d}/qlocal/docs",
    "milvus-lite": lambda d: str(d / "milvus.db"),
}

sys.path.insert(0, str(HERE))
import search as S  # noqa: E402  (the synthetic data of benchmarks/search.py)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def run_engine(name: str, location: str, model: Path, args, qemb) -> dict[str, Any]:
    from m3search.collection import Collection

    col = Collection.create(location, model=str(model), device="cpu", dtype="float32")
    try:
        corpus = S.SyntheticCorpus(args.seed, 0, args.docs)
        tokens = int(corpus.lengths.sum())
        t = time.perf_counter()
        col.add([""] * args.docs, ids=[f"d{i}" for i in range(args.docs)], embeddings=corpus, show_progress=False)
        ingest = time.perf_counter() - t - corpus.gen_s
        del corpus
        out: dict[str, Any] = {
            "location": location,
            "ingest_s": ingest,
            "docs_per_s": args.docs / ingest,
            "tokens_per_s": tokens / ingest,
            "modes": {},
        }
        print(f"[engines.py] {name}: ingest {out['docs_per_s']:.0f} docs/s ({ingest:.1f} s)", flush=True)
        for i in range(min(args.warmup, len(qemb))):
            col.search_batch(["q"], mode="all", query_embeddings=qemb[i])
        for mode in MODES:
            times = []
            for i in range(len(qemb)):
                t = time.perf_counter()
                col.search_batch(["q"], mode=mode, query_embeddings=qemb[i])
                times.append((time.perf_counter() - t) * 1000)
            out["modes"][mode] = {"p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95)}
            print(
                f"    {mode:14s} p50 {out['modes'][mode]['p50_ms']:9.1f} ms   p95 {out['modes'][mode]['p95_ms']:9.1f} ms",
                flush=True,
            )
        out["top10_all"] = [
            [h.id for h in hits] for hits in col.search_batch(["q"] * len(qemb), mode="all", query_embeddings=qemb)
        ]
    finally:
        col.close()
    return out


def run(args) -> dict[str, Any]:
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="m3-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    model = S.build_model(work / "model")
    qemb, _ = S.planted_queries(S.SyntheticCorpus(args.seed, 0, args.docs), min(args.queries, args.docs), args.seed)
    from m3search.plan import DEFAULT_CANDIDATES

    res: dict[str, Any] = {
        "docs": args.docs,
        "queries": len(qemb),
        "engines": {},
        "candidates": DEFAULT_CANDIDATES,
        "started": _dt.datetime.now().astimezone().isoformat(timespec="minutes"),
        "loadavg_start": list(os.getloadavg()),
    }
    for name in args.engines:
        folder = work / name
        folder.mkdir(exist_ok=True)
        res["engines"][name] = run_engine(name, ENGINES[name](folder), model, args, qemb)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    ref = res["engines"].get("qdrant-edge")
    if ref is not None:
        for e in res["engines"].values():
            pairs = zip(ref["top10_all"], e["top10_all"])
            e["top10_overlap_with_edge"] = float(np.mean([len(set(a) & set(b)) / max(len(a), 1) for a, b in pairs]))
    for e in res["engines"].values():
        del e["top10_all"]
    res["loadavg_end"] = list(os.getloadavg())
    res["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="minutes")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(res: dict[str, Any], argv: list[str]) -> str:
    engines = res["engines"]
    lines = [
        f"Same synthetic corpus in each engine: {res['docs']} documents of bge-m3's shapes (1024-d dense, 60-150 sparse "
        f"terms, 16-256 ColBERT tokens, float16 ColBERT storage), {res['queries']} planted queries, one query per call, "
        f"k=10, default candidates ({res.get('candidates', 200)} per first-stage list). "
        f"`python benchmarks/engines.py {' '.join(argv)}`, {res['started']}, "
        f"load average {res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f} on 2 shared cores.",
        "",
        "| engine | ingest docs/s | " + " | ".join(f"{m} p50 ms" for m in MODES) + " | `all` top-10 = Edge's |",
        "|---|---:|" + "---:|" * len(MODES) + "---:|",
    ]
    for name, e in engines.items():
        cells = [f"{e['modes'][m]['p50_ms']:.1f}" for m in MODES]
        overlap = e.get("top10_overlap_with_edge")
        lines.append(
            f"| {name} | {e['docs_per_s']:.0f} | "
            + " | ".join(cells)
            + f" | {'' if overlap is None else f'{overlap:.3f}'} |"
        )
    lines += [
        "",
        "p95 ms: "
        + "; ".join(
            f"{n}: " + ", ".join(f"{m} {e['modes'][m]['p95_ms']:.0f}" for m in MODES) for n, e in engines.items()
        )
        + ".",
        "",
        "qdrant-local is qdrant-client's local mode standing in for a Qdrant server (none can be installed here). "
        "It returns stored vectors as Python lists, so re-ranking the candidate union (up to 400 documents of ~136 "
        "tokens; here most of the corpus) pulls tens of millions of floats through Python per query (and its "
        "filtered queries score every point, so the server path is no faster there); a server scores the "
        "candidates itself. milvus-lite is Milvus Lite 2.5: the candidates' token vectors (~0.28 MB of float16 per "
        "document) come back at its ~15-50 MB/s. Both are development stand-ins; neither predicts a server "
        "cluster's latency. All engines return the same top 10.",
        "",
    ]
    return "\n".join(lines)


TITLE = "Engines (`benchmarks/engines.py`)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    ap.add_argument("--report-from", default=None, help="rebuild the report from a --json file instead of running")
    args = ap.parse_args(argv)
    res = run_or_replay(args, argv, run)
    publish("engines.py", TITLE, report(res, res["argv"]), no_write=args.no_write)


if __name__ == "__main__":
    main()
