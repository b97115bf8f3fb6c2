"""Does ``m3search tune`` help on held-out queries, and what does it cost next to one ``m3search eval``?

Protocol, per collection (proxy model, eval's cached index at the collection defaults):

* the judged queries (at most ``--max-queries``, a fixed-seed sample) are split in two halves A and B
  (fixed seed); the pool of every query is scored once (:class:`m3search.tuning.ScoreCache`) and
  every setting of the grid evaluated on it (nDCG@10 and Recall@100 per query);
* tune on A exactly as ``m3search tune`` does (5-fold CV inside A, paired bootstrap, adopt only if
  the interval's lower bound > 0, else keep the defaults), then score the adopted setting and the
  defaults (``all``, weighted, (0.4, 0.2, 0.4), 200 candidates) on B; then the reverse (B -> A);
* the held-out difference gets its own paired bootstrap interval (95 %, 2000 resamples): the
  tuned setting must never be worse than the defaults beyond that noise.

Cases: cranfield, time, xquad-r/en, and cross-lingual xquad-r/en documents with de and zh queries.
``--timing``: one ``evaluate`` (all six modes) and one ``tune`` of cranfield, side by side, wall and
CPU time (the process's, all threads), for the "< 2x one eval" target.
``--corpus-union``: the same side-by-side timing at the issue's scale: one BEIR folder (under /tmp) with
the documents of every collection in ../shared/data (cranfield, time, xquad-r's six languages: 9,131)
and 300 judged queries (cranfield's 225 + a fixed-seed 75 of xquad-r/en's, with their qrels); the
index is built once cold (timed), then eval and tune both use eval's cache.

Usage (repository root; ~15 min on 2 shared cores when the indexes are cached)::

    nice -n 5 python benchmarks/tune.py --timing --json /tmp/tune.json
    python benchmarks/tune.py --report-from /tmp/tune.json        # rebuild the report without re-measuring
    python benchmarks/tune.py --cases time --max-queries 40 --no-write
    nice -n 5 python benchmarks/tune.py --corpus-union --json /tmp/tune-union.json   # ~10k docs, 300 queries
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHARED = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared"))
TITLE = "Tuning fusion per collection (m3search tune): held-out gains and cost"
#: name -> (corpus folder, queries folder or None)
CASES = {
    "cranfield": ("cranfield", None),
    "time": ("time", None),
    "xquad-r/en": ("xquad-r/en", None),
    "xquad-r de->en": ("xquad-r/en", "xquad-r/de"),
    "xquad-r zh->en": ("xquad-r/en", "xquad-r/zh"),
}
SEED = 0


def measure_case(name: str, enc: Any, args: argparse.Namespace) -> dict[str, Any]:
    from m3search.eval import _cached_index, default_cache_dir, load_beir
    from m3search.tuning import ScoreCache, choose, evaluate_settings, paired_bootstrap, settings_grid

    corpus, queries = CASES[name]
    data = load_beir(SHARED / "data" / corpus, queries_dir=SHARED / "data" / queries if queries else None)
    qids = [q for q, rel in data.qrels.items() if any(g > 0 for g in rel.values())]
    rng = np.random.default_rng(SEED)
    if len(qids) > args.max_queries:
        keep = set(rng.choice(len(qids), args.max_queries, replace=False).tolist())
        qids = [q for i, q in enumerate(qids) if i in keep]
    t0 = time.perf_counter()
    col, info = _cached_index(data, enc, default_cache_dir(), batch_size=None, progress=False)
    t_index = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        cache = ScoreCache.build(col, {q: data.queries[q] for q in qids}, data.qrels)
        t_pool = time.perf_counter() - t0
    finally:
        col.close()
    grid = settings_grid()
    t0 = time.perf_counter()
    per = {m: evaluate_settings(cache, grid, m) for m in ("ndcg@10", "recall@100")}
    t_grid = time.perf_counter() - t0
    halves = np.array_split(np.random.default_rng(SEED).permutation(len(qids)), 2)
    rows = []
    for label, train, test in (("A->B", halves[0], halves[1]), ("B->A", halves[1], halves[0])):
        res = choose(per["ndcg@10"][:, train], grid)
        i = grid.index(res["setting"])
        row: dict[str, Any] = {
            "case": name,
            "split": label,
            "train": len(train),
            "test": len(test),
            "setting": str(res["setting"]),
            "best": str(res["best"]),
            "adopted": res["adopted"],
            "cv_gain": res["cv"]["gain"],
            "cv_interval": res["cv"]["interval"],
        }
        for m, p in per.items():
            lo, hi = paired_bootstrap(p[i, test], p[0, test])
            row[m] = {"tuned": float(p[i, test].mean()), "default": float(p[0, test].mean()), "interval": [lo, hi]}
        rows.append(row)
    return {
        "case": name,
        "queries": len(qids),
        "index_cached": info.get("cached"),
        "seconds": {"index": round(t_index, 1), "pools": round(t_pool, 1), "grid": round(t_grid, 1)},
        "settings": len(grid),
        "rows": rows,
    }


def timing(enc: Any, data: Path | None = None) -> dict[str, Any]:
    """One eval (six modes) and one tune of ``data`` (default cranfield), side by side (index cached for both)."""
    from m3search.eval import evaluate
    from m3search.tuning import tune

    data = data or SHARED / "data" / "cranfield"
    out = {}
    for what, run in (
        ("eval", lambda: evaluate(data, model=enc, progress=False)),
        ("tune", lambda: tune(data, model=enc, progress=False)),
    ):
        w0, c0 = time.perf_counter(), time.process_time()
        res = run()
        out[what] = {"wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(time.process_time() - c0, 1)}
        print(f"[tune.py] {what} of {data}: {out[what]}", file=sys.stderr, flush=True)
        if what == "tune":
            out[what]["parts"] = res["seconds"]
    out["ratio_wall"] = round(out["tune"]["wall_s"] / out["eval"]["wall_s"], 2)
    out["ratio_cpu"] = round(out["tune"]["cpu_s"] / out["eval"]["cpu_s"], 2)
    return out


UNION_CORPORA = ["cranfield", "time", *(f"xquad-r/{lang}" for lang in ("ar", "de", "en", "es", "ru", "zh"))]
#: judged-query sources of the union: (folder, how many; None = all)
UNION_QUERIES = [("cranfield", None), ("xquad-r/en", 75)]


def build_union(out: Path) -> dict[str, int]:
    """Write the union BEIR folder to ``out`` (ids prefixed by their collection: cranfield and time
    both number theirs from 1); returns its document and query counts."""
    from m3search.eval import load_beir

    out.mkdir(parents=True, exist_ok=True)
    n_docs = 0
    with open(out / "corpus.jsonl", "w") as f:
        for name in UNION_CORPORA:
            for line in (SHARED / "data" / name / "corpus.jsonl").read_text().splitlines():
                if line.strip():
                    doc = json.loads(line)
                    doc["_id"] = f"{name}:{doc['_id']}"
                    f.write(json.dumps(doc) + "\n")
                    n_docs += 1
    queries, qrels = [], []
    rng = np.random.default_rng(SEED)
    for name, n in UNION_QUERIES:
        data = load_beir(SHARED / "data" / name)
        qids = sorted(q for q, rel in data.qrels.items() if any(g > 0 for g in rel.values()))
        if n is not None and len(qids) > n:
            qids = sorted(rng.choice(qids, n, replace=False).tolist())
        for q in qids:
            queries.append({"_id": f"{name}:{q}", "text": data.queries[q]})
            qrels += [(f"{name}:{q}", f"{name}:{d}", g) for d, g in data.qrels[q].items()]
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (out / "qrels").mkdir(exist_ok=True)
    (out / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels)
    )
    return {"documents": n_docs, "queries": len(queries)}


def union_timing(enc: Any, folder: Path) -> dict[str, Any]:
    """The union folder built; its index built cold once (eval's cache, timed); then one eval and
    one tune of it side by side, both on that cached index."""
    from m3search.eval import _cached_index, default_cache_dir, load_beir

    out: dict[str, Any] = build_union(folder)
    w0, c0 = time.perf_counter(), time.process_time()
    col, info = _cached_index(load_beir(folder), enc, default_cache_dir(), batch_size=None, progress=False)
    col.close()
    out["index"] = {
        "wall_s": round(time.perf_counter() - w0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "cached": bool(info.get("cached")),
    }
    print(f"[tune.py] union index: {out['index']}", file=sys.stderr, flush=True)
    out.update(timing(enc, folder))
    return out


def _lscpu() -> str:
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def report(res: dict[str, Any]) -> str:
    lines = [
        f"Run {res['started']} to {res['finished']} (UTC); command `{res['command']}`; {res['cpu']}; "
        f"machine shared with other jobs (load average at end `{' '.join(f'{x:.1f}' for x in res['loadavg_end'])}`). "
        f"Proxy model ({res['dtype']}), eval's cached index per collection (collection defaults, float16 ColBERT), "
        f"{res['settings']} settings (weights on a 0.1 simplex grid incl. zero weights x weighted/rrf/dbsf x "
        "candidates 50/100/200/400), chosen on nDCG@10. Defaults = `all`, weighted, (0.4, 0.2, 0.4), 200 candidates. "
        "Held-out Δ = tuned − defaults on the other half with its 95 % paired bootstrap interval; "
        "'worse?' = the interval lies below 0.\n",
        "| case | split | queries train/test | adopted setting (CV gain, 95 % interval on train) | nDCG@10 tuned / default | "
        "Δ [interval] | Recall@100 tuned / default | Δ [interval] | worse? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in res["cases"]:
        for r in case["rows"]:
            n, rc = r["ndcg@10"], r["recall@100"]
            lo, hi = r["cv_interval"]
            what = r["setting"] if r["adopted"] else f"defaults (best {r['best']})"
            worse = n["interval"][1] < 0 or rc["interval"][1] < 0
            lines.append(
                f"| {r['case']} | {r['split']} | {r['train']}/{r['test']} | {what} ({r['cv_gain']:+.4f} "
                f"[{lo:+.4f}, {hi:+.4f}]) | {n['tuned']:.4f} / {n['default']:.4f} | {n['tuned'] - n['default']:+.4f} "
                f"[{n['interval'][0]:+.4f}, {n['interval'][1]:+.4f}] | {rc['tuned']:.4f} / {rc['default']:.4f} | "
                f"{rc['tuned'] - rc['default']:+.4f} [{rc['interval'][0]:+.4f}, {rc['interval'][1]:+.4f}] | "
                f"{'yes' if worse else 'no'} |"
            )
    rows = [r for case in res["cases"] for r in case["rows"]]
    adopted = [r for r in rows if r["adopted"]]
    gained = [f"{r['case']} {r['split']}" for r in adopted if r["ndcg@10"]["interval"][0] > 0]
    worse = [r for r in rows if r["ndcg@10"]["interval"][1] < 0 or r["recall@100"]["interval"][1] < 0]
    lines.append(
        f"\nSummary: tuned setting adopted in {len(adopted)} of {len(rows)} splits (elsewhere the CV interval did "
        f"not clear 0 and the defaults were kept, so held-out Δ is 0 by construction); held-out nDCG@10 gain with "
        f"its interval above 0 in {len(gained)} ({', '.join(gained) or 'none'}); worse than the defaults beyond the "
        f"bootstrap's noise (nDCG@10 or Recall@100) in {len(worse)} of {len(rows)}."
    )
    lines.append("\nCost per case (s, wall; pools = encode the queries and score every pool once at 400 candidates):\n")
    lines.append("| case | queries | index | pools | all settings x 2 metrics |")
    lines.append("|---|---|---|---|---|")
    for case in res["cases"]:
        s = case["seconds"]
        cached = " (cached)" if case["index_cached"] else ""
        lines.append(f"| {case['case']} | {case['queries']} | {s['index']}{cached} | {s['pools']} | {s['grid']} |")
    t = res.get("timing")
    if t:
        lines.append(
            f"\nTune vs one eval of cranfield (1,400 docs, 225 queries, index cached), side by side in this run: "
            f"eval (6 modes) {t['eval']['wall_s']} s wall / {t['eval']['cpu_s']} s CPU; tune "
            f"{t['tune']['wall_s']} s wall / {t['tune']['cpu_s']} s CPU (parts: {json.dumps(t['tune']['parts'])}); "
            f"ratio tune/eval **{t['ratio_wall']}x wall, {t['ratio_cpu']}x CPU** (target < 2x)."
        )
    return "\n".join(lines) + "\n"


UNION_TITLE = "Tuning at ~10k documents: one tune vs one eval (`benchmarks/tune.py --corpus-union`)"


def report_union(res: dict[str, Any]) -> str:
    u = res["union"]
    start, end = (" ".join(f"{x:.1f}" for x in res[key]) for key in ("loadavg_start", "loadavg_end"))
    return (
        f"Run {res['started']} to {res['finished']} (UTC); command `{res['command']}`; {res['cpu']}; machine shared "
        f"with other jobs (load average `{start}` at start, `{end}` at end). Proxy model ({res['dtype']}). One BEIR folder under /tmp "
        f"with every document of ../shared/data ({u['documents']:,}: cranfield, time, xquad-r ar/de/en/es/ru/zh; ids "
        f"prefixed by collection) and {u['queries']} judged queries (cranfield's 225 + 75 of xquad-r/en, fixed seed). "
        "Index built once cold into eval's cache, then one `evaluate` (six modes) and one `tune` (default grid, "
        "5 folds), both on that cached index, side by side in the same process.\n\n"
        "| step | wall s | CPU s (process, all threads) |\n|---|---|---|\n"
        f"| index, cold{' (was cached!)' if u['index']['cached'] else ''} | {u['index']['wall_s']} | "
        f"{u['index']['cpu_s']} |\n"
        f"| eval (6 modes) | {u['eval']['wall_s']} | {u['eval']['cpu_s']} |\n"
        f"| tune | {u['tune']['wall_s']} | {u['tune']['cpu_s']} |\n\n"
        f"Tune parts (s): {json.dumps(u['tune']['parts'])}. Ratio tune/eval **{u['ratio_wall']}x wall, "
        f"{u['ratio_cpu']}x CPU** (target < 2x).\n"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "bge-m3-proxy"))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--max-queries", type=int, default=300, help="fixed-seed sample of judged queries per case")
    ap.add_argument("--timing", action="store_true", help="also time one eval and one tune of cranfield")
    ap.add_argument(
        "--corpus-union",
        nargs="?",
        const="/tmp/m3search-tune-union",
        default=None,
        metavar="DIR",
        help="only time one eval and one tune of every shared corpus as one ~10k-document folder (written to DIR)",
    )
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    ap.add_argument("--report-from", default=None, help="rebuild the report from a saved --json run")
    args = ap.parse_args(argv)
    if args.report_from:
        res = json.loads(Path(args.report_from).read_text())
        if "union" in res:
            publish("tune.py union", UNION_TITLE, report_union(res), no_write=args.no_write)
        else:
            publish("tune.py", TITLE, report(res), no_write=args.no_write)
        return

    from m3search import M3Encoder

    now = lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
    started = now()
    enc = M3Encoder.from_pretrained(args.model)
    if args.corpus_union:
        res = {
            "started": started,
            "loadavg_start": list(os.getloadavg()),
            "cpu": _lscpu(),
            "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/tune.py", *argv]),
            "dtype": str(enc.dtype).replace("torch.", ""),
            "union": union_timing(enc, Path(args.corpus_union)),
            "finished": now(),
            "loadavg_end": list(os.getloadavg()),
        }
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        publish("tune.py union", UNION_TITLE, report_union(res), no_write=args.no_write)
        return
    cases = []
    for name in args.cases:
        t = time.perf_counter()
        cases.append(measure_case(name, enc, args))
        print(f"[tune.py] {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    res = {
        "started": started,
        "cpu": _lscpu(),
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/tune.py", *argv]),
        "dtype": str(enc.dtype).replace("torch.", ""),
        "settings": cases[0]["settings"] if cases else 0,
        "cases": cases,
        "timing": timing(enc) if args.timing else None,
    }
    res["finished"] = now()
    res["loadavg_end"] = list(os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    publish("tune.py", TITLE, report(res), no_write=args.no_write)


if __name__ == "__main__":
    main()
