"""How many first-stage candidates re-ranking needs: the measurement behind ``plan.DEFAULT_CANDIDATES``.

Re-ranking modes (``colbert``, ``dense+sparse``, ``dense+colbert``, ``all``) score the
union of the dense top-C and sparse top-C lists exactly. Too small a C misses documents
the exhaustive ranking would put in the top 10; too large a C costs query time (about
linear in C). This script measures both, per collection and mode, for a list of C:

* model: the real-semantics proxy (``../shared/models/bge-m3-proxy``), fp32 encoding by
  default (``--dtype``); documents ``(title + " " + text).strip()``, queries at 512 tokens;
* collections: cranfield, time, xquad-r/en (the first ``--max-queries`` judged queries of
  each, in file order), each indexed at the collection defaults (float16 ColBERT);
* oracle: every query scored against every document with :mod:`m3search.scoring` from
  the SAME embeddings, fused with the default weights (0.4, 0.2, 0.4);
* per (collection, mode, C): recall@10 against the oracle's top 10 (|ours ∩ oracle| / 10),
  nDCG@10 (pytrec_eval) minus the oracle's, and mean ms per query (batched search,
  no encoding).

Rule used for the default: the smallest C whose recall@10 in ``all`` is >= 0.99 on
EVERY collection. The script prints it and writes its section of ``benchmarks/RESULTS.md``.

Usage (repository root, project venv; ~15 min on 2 shared cores, most of it encoding)::

    nice -n 10 python benchmarks/candidates.py
    nice -n 10 python benchmarks/candidates.py --cache /tmp/m3-cand-cache   # reuse encodings
    python benchmarks/candidates.py --collections time --candidates 50 200 --max-queries 20 --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHARED = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared"))
RERANK_MODES = ("colbert", "dense+sparse", "dense+colbert", "all")
TARGET_RECALL = 0.99


def encode_cached(enc, name: str, texts: list[str], cache: Path | None, **kw):
    """``enc.encode(texts)``, kept as an .npz under ``cache`` (keyed by name, dtype and model identity)."""
    from m3search.encoder import M3Embeddings

    f = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        f = cache / f"{name.replace('/', '_')}-{enc.dtype}-{enc.identity[:12]}.npz".replace("torch.", "")
        if f.is_file():
            z = np.load(f)
            if int(z["count"]) == len(texts):
                s = sp.csr_matrix((z["d"], z["i"], z["p"]), shape=tuple(z["s"]))
                return M3Embeddings(z["dense"], s, z["c"], z["o"], z["n"])
    t = time.perf_counter()
    e = enc.encode(texts, **kw)
    print(f"  encoded {name}: {len(texts)} texts in {time.perf_counter() - t:.0f} s", flush=True)
    if f is not None:
        np.savez(
            f,
            dense=e.dense,
            d=e.sparse.data,
            i=e.sparse.indices,
            p=e.sparse.indptr,
            s=np.array(e.sparse.shape),
            c=e.colbert,
            o=e.colbert_offsets,
            n=e.n_tokens,
            count=len(texts),
        )
    return e


def oracle_scores(q, d) -> dict[str, np.ndarray]:
    """Exhaustive ``(n_queries, n_docs)`` float64 score matrices, one per representation."""
    from m3search.scoring import colbert_scores, dense_scores, lexical_scores

    return {
        "dense": np.asarray(dense_scores(q.dense, d.dense), np.float64),
        "sparse": np.asarray(lexical_scores(q.sparse, d.sparse), np.float64),
        "colbert": np.asarray(colbert_scores(q.colbert, q.colbert_offsets, d.colbert, d.colbert_offsets), np.float64),
    }


def fused(scores: dict[str, np.ndarray], mode: str, weights=(0.4, 0.2, 0.4)) -> np.ndarray:
    from m3search.plan import parse_mode

    w = dict(zip(("dense", "sparse", "colbert"), weights))
    parts = parse_mode(mode)
    return sum(w[m] * scores[m] for m in parts) / sum(w[m] for m in parts)


def top10(doc_ids: list[str], s: np.ndarray) -> list[dict[str, float]]:
    """Per query, the 10 best documents (score descending, then id) with their scores."""
    ids = np.asarray(doc_ids)
    out = []
    for row in s:
        o = np.lexsort((ids, -row))[:10]
        out.append({doc_ids[j]: float(row[j]) for j in o})
    return out


def measure_collection(name: str, enc, cands: list[int], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from m3search import Collection
    from m3search.eval import compute_metrics, load_beir

    data = load_beir(SHARED / "data" / name)
    qids = list(data.queries)[: args.max_queries]
    qtexts = [data.queries[q] for q in qids]
    qrels = {q: data.qrels[q] for q in qids}
    cache = Path(args.cache) if args.cache else None
    emb = encode_cached(enc, f"{name}-docs", data.doc_texts, cache)
    qemb = encode_cached(enc, f"{name}-queries", qtexts, cache, max_length=512)
    S = oracle_scores(qemb, emb)
    path = work / name.replace("/", "_")
    shutil.rmtree(path, ignore_errors=True)
    col = Collection.create(path, model=enc)
    col.add(data.doc_texts, ids=data.doc_ids, embeddings=emb, show_progress=False)
    rows = []
    try:
        for mode in RERANK_MODES:
            oracle = top10(data.doc_ids, fused(S, mode))
            base = compute_metrics(dict(zip(qids, oracle)), qrels)["ndcg@10"]
            for c in cands:
                t = time.perf_counter()
                res = col.search_batch(qtexts, k=10, mode=mode, candidates=c, query_embeddings=qemb)
                ms = (time.perf_counter() - t) / len(qids) * 1000
                run = {q: {h.id: h.score for h in hits} for q, hits in zip(qids, res)}
                recall = float(np.mean([len(set(r) & set(o)) / 10 for r, o in zip(run.values(), oracle)]))
                ndcg = compute_metrics(run, qrels)["ndcg@10"]
                rows.append(
                    {
                        "collection": name,
                        "mode": mode,
                        "C": c,
                        "recall": recall,
                        "ndcg": ndcg,
                        "oracle_ndcg": base,
                        "ndcg_diff": ndcg - base,
                        "ms_per_query": ms,
                        "queries": len(qids),
                    }
                )
                print(
                    f"  {name:11s} {mode:13s} C={c:4d} recall@10 {recall:.4f} nDCG@10 {ndcg:.4f} "
                    f"(oracle {base:.4f}, {ndcg - base:+.4f}) {ms:6.1f} ms/query",
                    flush=True,
                )
    finally:
        col.close()
        shutil.rmtree(path, ignore_errors=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | None]:
    """Per (mode, C): mean and worst recall over collections, worst nDCG difference, mean ms; and the chosen C."""
    out = []
    for mode in RERANK_MODES:
        for c in sorted({r["C"] for r in rows}):
            rs = [r for r in rows if r["mode"] == mode and r["C"] == c]
            if rs:
                out.append(
                    {
                        "mode": mode,
                        "C": c,
                        "recall_mean": float(np.mean([r["recall"] for r in rs])),
                        "recall_min": min(r["recall"] for r in rs),
                        "ndcg_diff_worst": min(r["ndcg_diff"] for r in rs),
                        "ms_per_query": float(np.mean([r["ms_per_query"] for r in rs])),
                    }
                )
    ok = [s["C"] for s in out if s["mode"] == "all" and s["recall_min"] >= TARGET_RECALL]
    return out, (min(ok) if ok else None)


def report(res: dict[str, Any]) -> str:
    from m3search.plan import DEFAULT_CANDIDATES

    rows, summary, chosen = res["rows"], res["summary"], res["chosen"]
    cols = list(dict.fromkeys(r["collection"] for r in rows))
    lines = [
        f"Run {res['started']} to {res['finished']}; command `{res['command']}`; load average at end "
        f"`{' '.join(f'{x:.1f}' for x in res['loadavg_end'])}` on 2 shared cores (ms/query are inflated by other jobs). "
        f"Proxy model, {res['dtype']} encoding, collection defaults (float16 ColBERT), k=10, first "
        f"{res['max_queries']} judged queries per collection; oracle = exhaustive scores from the same embeddings.\n",
        "Summary over collections (recall@10 against the oracle; nDCG@10 difference to the oracle, worst collection):\n",
        "| mode | C | recall@10 mean | recall@10 worst | nDCG@10 diff worst | ms/query (batched) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['mode']} | {s['C']} | {s['recall_mean']:.4f} | {s['recall_min']:.4f} | "
            f"{s['ndcg_diff_worst']:+.4f} | {s['ms_per_query']:.1f} |"
        )
    lines.append("\nPer collection, mode `all` (recall@10 / nDCG@10 diff):\n")
    lines.append("| C | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for c in sorted({r["C"] for r in rows}):
        cells = []
        for name in cols:
            r = next((r for r in rows if r["collection"] == name and r["mode"] == "all" and r["C"] == c), None)
            cells.append(f"{r['recall']:.4f} / {r['ndcg_diff']:+.4f}" if r else "")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    tried = ", ".join(str(c) for c in sorted({r["C"] for r in rows}))
    verdict = (
        f"the smallest C tried ({tried}) with recall@10 >= {TARGET_RECALL} in `all` on every collection is **{chosen}**"
        if chosen
        else f"no C reached recall@10 >= {TARGET_RECALL} in `all` on every collection"
    )
    lines.append(
        f"\nRule: {verdict}; `plan.DEFAULT_CANDIDATES` is {DEFAULT_CANDIDATES}"
        f"{' (agrees)' if chosen == DEFAULT_CANDIDATES else ' (DIFFERS: revisit the default)'}."
    )
    return "\n".join(lines) + "\n"


TITLE = "Default candidates (`benchmarks/candidates.py`)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    ap.add_argument("--collections", nargs="+", default=["cranfield", "time", "xquad-r/en"])
    ap.add_argument("--max-queries", type=int, default=300)
    ap.add_argument("--dtype", default="float32", help="encoder dtype (float32, bfloat16, auto)")
    ap.add_argument("--model", default=str(SHARED / "models" / "bge-m3-proxy"))
    ap.add_argument("--cache", default=None, help="keep encodings here as .npz and reuse them")
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = ap.parse_args(argv)

    from m3search import M3Encoder

    started = _dt.datetime.now().astimezone().isoformat(timespec="minutes")
    enc = M3Encoder.from_pretrained(args.model, device="cpu", dtype=args.dtype)
    work = Path(tempfile.mkdtemp(prefix="m3search-cand-"))
    rows: list[dict[str, Any]] = []
    try:
        for name in args.collections:
            rows += measure_collection(name, enc, sorted(args.candidates), args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary, chosen = summarize(rows)
    res = {
        "started": started,
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="minutes"),
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/candidates.py", *argv]),
        "loadavg_end": list(os.getloadavg()),
        "dtype": str(enc.dtype).replace("torch.", ""),
        "max_queries": args.max_queries,
        "rows": rows,
        "summary": summary,
        "chosen": chosen,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    publish("candidates.py", TITLE, report(res), no_write=args.no_write)


if __name__ == "__main__":
    main()
