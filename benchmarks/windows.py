"""Long documents: windows vs truncation (max_windows=1), and the ColBERT rules for windowed documents.

For each BEIR folder, cached indexes of the same corpus with the proxy model (512 positions):
one window (max_windows=1, truncation as before windows) and every window (the collection
default: window 512, stride 384; ``--stride N`` adds indexes with other strides). Every mode
is searched on each in the same run, the windowed indexes under each ColBERT rule of
``--rules`` (the module switch ``m3search.collection.COLBERT_RULE``): ``window`` (a document's
ColBERT score is its best window's MaxSim) and ``document`` (MaxSim over the tokens of all its
windows: per query token the best match in the whole document). ``--fuse`` adds "fuse per
window, then max" (``WINDOW_RULE``) on the first folder. Prints one Markdown table: nDCG@10 /
Recall@100 per mode, then search seconds per query per mode and, for the ``document`` rule,
the part of it spent in the whole-document MaxSim.

    PYTHONPATH=src python benchmarks/windows.py ../shared/data/time ../shared/data/cranfield \
        ../shared/data/xquad-r/en --cache-dir /tmp/m3s-windows

"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ["dense", "sparse", "colbert", "all"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+")
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "bge-m3-proxy"))
    ap.add_argument("--cache-dir", default="/tmp/m3s-windows")
    ap.add_argument("--rules", nargs="+", default=["window", "document"], choices=["window", "document"])
    ap.add_argument("--stride", type=int, action="append", default=[], help="also windows with this stride")
    ap.add_argument("--fuse", action="store_true", help="first folder: also fuse per window, then max")
    ap.add_argument("--candidates", type=int, default=200, help="re-ranking pool depth per first-stage list")
    ap.add_argument("--no-truncation", action="store_true", help="leave the truncation row out")
    ap.add_argument("--no-default", action="store_true", help="leave the default-stride windows row out")
    ap.add_argument("--modes", nargs="+", default=MODES, help="modes to evaluate (default: dense sparse colbert all)")
    ap.add_argument(
        "--diagnose",
        metavar="MODE",
        help="first folder: per query, truncation vs windows (every --stride too) in MODE, and paired tests in every mode",
    )
    ap.add_argument("--no-table", action="store_true", help="only --diagnose (indexes from the cache)")
    ap.add_argument(
        "--last-window",
        choices=["rest", "end"],
        default="rest",
        help="rest: a text's last window holds what is left (m3search's layout); end: it is a full window ending "
        "at the text's end (an experiment: indexes cached under <cache-dir>/last-window-end)",
    )
    ap.add_argument(
        "--fetch-checks",
        type=int,
        default=3,
        help="first N whole-document MaxSim calls: also computed from fetched token vectors (time, difference)",
    )
    args = ap.parse_args()

    import m3search.collection as collection
    from m3search import M3Encoder
    from m3search.eval import _cached_index, evaluate, load_beir
    from m3search.windows import plan_windows

    spent = {"s": 0.0, "calls": 0, "checks": 0.0}
    maxsim, rules = collection._document_maxsim, (collection.WINDOW_RULE, collection.COLBERT_RULE)
    checks: list[tuple[int, float, float, float]] = []  # (documents, engine s, fetch s, max |difference|)

    def timed(engine, ids, qv):  # the whole-document MaxSim's share of the search time
        t0 = time.perf_counter()
        out = maxsim(engine, ids, qv)
        spent["s"] += time.perf_counter() - t0
        spent["calls"] += 1
        if len(checks) < args.fetch_checks:  # side by side: the same scores from fetched token vectors
            t1 = time.perf_counter()
            ref = fetched_maxsim(engine, ids, qv)
            checks.append((len(ids), t1 - t0, time.perf_counter() - t1, float(np.nanmax(np.abs(out - ref)))))
            spent["checks"] += time.perf_counter() - t1
        return out

    collection._document_maxsim = timed
    if args.last_window == "end":
        import m3search.encoder

        m3search.encoder.plan_windows = plan_windows_end
        args.cache_dir = str(Path(args.cache_dir) / "last-window-end")  # the cache's key does not see the layout
    encoder = M3Encoder.from_pretrained(args.model, device="cpu", dtype="float32")
    modes = args.modes
    if args.diagnose:
        strides = [{}] + [{"stride": s} for s in args.stride]
        diagnose(args.data[0], encoder, Path(args.cache_dir), modes, args.diagnose, strides, args.candidates)
    if args.no_table:
        return
    print(
        "| data | docs cut at 512 | index | ColBERT rule | "
        + " | ".join(f"{m} nDCG@10 / R@100" for m in modes)
        + " | search s/query ("
        + ", ".join(modes)
        + ") | whole-doc MaxSim s/query | windows stored | index s (CPU s) |"
    )
    print("|---|---|---|---|" + "---|" * (len(modes) + 4), flush=True)
    for k, folder in enumerate(args.data):
        data = load_beir(folder)
        lengths = np.array([len(x) for x in encoder.tokenize(data.doc_texts, 10**9)[0]])
        cut = int((lengths > encoder.max_length).sum())
        runs = [] if args.no_truncation else [("truncation", {"max_windows": 1}, "max", "window")]
        for stride in ([] if args.no_default else [None]) + args.stride:
            label, settings = ("windows", {}) if stride is None else (f"windows, stride {stride}", {"stride": stride})
            label += ", last window at the end" if args.last_window == "end" else ""
            runs += [(label, settings, "max", rule) for rule in args.rules]
            if k == 0 and args.fuse and stride is None:
                runs.append(("windows, fuse then max", settings, "fuse", "window"))
        for label, settings, rule, colbert_rule in runs:
            collection.WINDOW_RULE, collection.COLBERT_RULE = rule, colbert_rule
            spent.update(s=0.0, calls=0, checks=0.0)
            cost = index_cost(_cached_index, load_beir(folder), encoder, Path(args.cache_dir), settings)
            plan = plan_windows(lengths - 2, encoder.max_length - 2, settings.get("stride", encoder.max_length - 128))
            n_windows = len(lengths) if settings.get("max_windows") == 1 else len(plan.doc)
            t0 = time.perf_counter()
            res = evaluate(
                folder,
                model=encoder,
                modes=modes,
                cache_dir=args.cache_dir,
                settings=settings,
                progress=False,
                candidates=args.candidates,
            )
            n_q = res["n_queries"]
            print(f"{folder} {label} ({colbert_rule}): {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            name = Path(folder).name if "xquad" not in folder else "xquad-r/en"
            cells = [f"{res['modes'][m]['ndcg@10']:.4f} / {res['modes'][m]['recall@100']:.4f}" for m in modes]
            res["modes"][modes[0]]["search_seconds"] -= spent["checks"]  # the checks ran in the first mode's searches
            per_q = ", ".join(f"{res['modes'][m]['search_seconds'] / n_q:.3f}" for m in modes)
            doc = f"{spent['s'] / n_q:.3f} ({spent['calls']} calls)" if colbert_rule == "document" else "-"
            rule_name = "-" if settings.get("max_windows") == 1 else colbert_rule
            print(
                f"| {name} | {cut}/{len(lengths)} | {label} | {rule_name} | "
                + " | ".join(cells)
                + f" | {per_q} | {doc} | {n_windows:,} | {cost} |",
                flush=True,
            )  # row by row
    (collection.WINDOW_RULE, collection.COLBERT_RULE), collection._document_maxsim = rules, maxsim
    for n, engine_s, fetch_s, diff in checks:
        print(
            f"whole-document MaxSim of {n} documents: engine (one-token queries) {engine_s:.3f} s, "
            f"fetched token vectors + NumPy {fetch_s:.3f} s ({fetch_s / engine_s:.0f}x), max |difference| {diff:.2e}"
        )


def plan_windows_end(n_content, span: int, stride: int, max_windows: int | None = None):
    """``--last-window end``: m3search's windows, but a text's last window (where ``max_windows`` did not cap it)
    moved back to end at the text's end, so that it holds ``span`` tokens instead of what is left."""
    from m3search.windows import WindowPlan, plan_windows

    p = plan_windows(n_content, span, stride, max_windows)
    n = np.asarray(n_content, dtype=np.int64)[p.doc]
    last = np.r_[p.doc[1:] != p.doc[:-1], True] & (p.start + p.length == n)  # the text's own end: not capped
    start = np.where(last, np.maximum(n - span, 0), p.start)
    return WindowPlan(p.doc, start, np.minimum(start + span, n) - start, p.cut)


def per_query_runs(col, qtexts: list[str], qids: list[str], emb, mode: str, candidates: int) -> dict[str, dict]:
    """What eval scores for one mode: each query's top-100 documents with their scores."""
    hits = col.search_batch(qtexts, k=100, mode=mode, fusion="weighted", candidates=candidates, query_embeddings=emb)
    return {q: {h.id: float(h.score) for h in hs} for q, hs in zip(qids, hits)}


def paired(a: dict[str, dict], b: dict[str, dict], metric: str, rng: np.random.Generator) -> str:
    """Per-query differences b - a of ``metric``: how many queries move, which way, and two paired
    tests (sign test on the queries that move; randomisation test of the mean, 20,000 sign flips)."""
    from scipy.stats import binomtest

    d = np.array([b[q][metric] - a[q][metric] for q in a])
    up, down = int((d > 1e-12).sum()), int((d < -1e-12).sum())
    sign_p = binomtest(up, up + down).pvalue if up + down else 1.0
    flips = rng.choice([-1.0, 1.0], size=(20_000, len(d)))
    rand_p = float((np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-15).mean())
    return f"{d.mean():+.4f} | {up + down} ({up} up, {down} down) | {sign_p:.2f} | {rand_p:.2f}"


def diagnose(folder, encoder, cache_dir: Path, modes, mode: str, window_settings: list[dict], candidates: int) -> None:
    """Truncation vs windows, query by query (issue 11: why one cell moves, and whether it is noise).

    For each windowed index: (1) per mode, paired per-query differences of nDCG@10 and Recall@100
    against truncation; (2) in ``mode``, every judged document that enters or leaves a query's
    top 100, with the reason: ``pool`` (not in the windowed pool dense top-N ∪ sparse top-N, so
    never scored), ``long`` (a multi-window document whose best window outranks or is outranked),
    ``short`` (a one-window document: same score under both, moved only by the others), and the
    reverse ``pool`` for a document the truncation pool missed; (3) Recall@100 with every document
    in the pool (exhaustive re-ranking), which separates the pool from the score rule.
    """
    from m3search.eval import _cached_index, compute_metrics, load_beir

    data = load_beir(folder)
    qids = list(data.queries)
    qtexts = [data.queries[q] for q in qids]
    n_docs = len(data.doc_ids)
    lengths = np.array([len(x) for x in encoder.tokenize(data.doc_texts, 10**9)[0]])
    long_docs = {i for i, n in zip(data.doc_ids, lengths) if n > encoder.max_length}
    rng = np.random.default_rng(0)
    base, _ = _cached_index(data, encoder, cache_dir, batch_size=None, progress=False, settings={"max_windows": 1})
    emb = base.encoder.encode(qtexts, max_length=base.settings["query_max_length"])
    runs = {m: per_query_runs(base, qtexts, qids, emb, m, candidates) for m in modes}
    base_pool = {
        q: set(ids)
        for q, (ids, _) in zip(qids, base.candidate_scores(qtexts, candidates=candidates, query_embeddings=emb))
    }
    full_base = per_query_runs(base, qtexts, qids, emb, mode, n_docs)
    base.close()
    pq = {m: compute_metrics(r, data.qrels)["per_query"] for m, r in runs.items()}
    for settings in window_settings:
        col, _ = _cached_index(data, encoder, cache_dir, batch_size=None, progress=False, settings=settings)
        name = f"windows (stride {col.settings['stride']})"
        print(f"\n### {Path(folder).name}: truncation vs {name}, {len(qids)} queries, pool {candidates}\n")
        print("| mode | metric | mean difference | queries that move | sign test p | randomisation p |")
        print("|---|---|---|---|---|---|")
        wruns = {m: per_query_runs(col, qtexts, qids, emb, m, candidates) for m in modes}
        wpq = {m: compute_metrics(r, data.qrels)["per_query"] for m, r in wruns.items()}
        for m in modes:
            for metric in ("ndcg@10", "recall@100"):
                print(f"| {m} | {metric} | {paired(pq[m], wpq[m], metric, rng)} |")
        pools = col.candidate_scores(qtexts, candidates=candidates, query_embeddings=emb)
        pool = {q: set(ids) for q, (ids, _) in zip(qids, pools)}
        print(f"\n{mode}: judged documents that enter (+) or leave (-) the top 100, truncation -> {name}\n")
        print("| query | judged | document | long | change | reason | rank truncation -> windows |")
        print("|---|---|---|---|---|---|---|")
        reasons: dict[str, int] = {}
        for q in qids:
            judged = {d for d, g in data.qrels.get(q, {}).items() if g > 0}
            a, b = runs[mode][q], wruns[mode][q]
            ra = {d: r for r, d in enumerate(sorted(a, key=a.get, reverse=True), 1)}
            rb = {d: r for r, d in enumerate(sorted(b, key=b.get, reverse=True), 1)}
            for d in sorted(judged & (set(a) ^ set(b))):
                lost = d in a
                if lost:
                    why = "pool" if d not in pool[q] else ("long" if d in long_docs else "short")
                else:
                    why = "pool" if d not in base_pool[q] else ("long" if d in long_docs else "short")
                key = f"{'-' if lost else '+'}{why}"
                reasons[key] = reasons.get(key, 0) + 1
                print(
                    f"| {q} | {len(judged)} | {d} | {'yes' if d in long_docs else 'no'} | {'-' if lost else '+'} "
                    f"| {why} | {ra.get(d, '>100')} -> {rb.get(d, '>100')} |"
                )
        print("\ncounts: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
        full = per_query_runs(col, qtexts, qids, emb, mode, n_docs)
        col.close()
        r_base = compute_metrics(full_base, data.qrels)["recall@100"]
        r_win = compute_metrics(full, data.qrels)["recall@100"]
        r_pool = (
            compute_metrics(runs[mode], data.qrels)["recall@100"],
            compute_metrics(wruns[mode], data.qrels)["recall@100"],
        )
        print(
            f"{mode} Recall@100, pool {candidates}: truncation {r_pool[0]:.4f}, windows {r_pool[1]:.4f}; "
            f"every document re-ranked (pool {n_docs}): truncation {r_base:.4f}, windows {r_win:.4f}",
            flush=True,
        )


def index_cost(cached_index, data, encoder, cache_dir: Path, settings: dict) -> str:
    """Build (or open) the eval cache's index of these settings; its wall and CPU seconds, kept
    beside the cache's ``.done.json`` so that a later run that finds the index cached still reports them."""
    t0, c0 = time.perf_counter(), time.process_time()
    col, info = cached_index(data, encoder, cache_dir, batch_size=None, progress=False, settings=dict(settings))
    col.close()
    side = Path(info["path"] + ".cost.json")
    if not info.get("cached"):
        side.write_text(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
    if not side.is_file():
        return f"{info.get('index_seconds', 0):.0f} (cached, CPU not recorded)"
    cost = json.loads(side.read_text())
    return f"{cost['wall_s']:.0f} ({cost['cpu_s']:.0f})"


def fetched_maxsim(engine, ids: list[str], qv) -> np.ndarray:
    """The reference: every window's token vectors fetched from the engine, MaxSim in NumPy."""
    from m3search.scoring import colbert_scores

    recs = engine.get_windows(ids, with_vectors=["colbert"])
    mats = [np.concatenate([r.colbert for r in rs]) for rs in recs]
    offsets = np.concatenate([[0], np.cumsum([len(m) for m in mats])]).astype(np.int64)
    q = np.asarray(qv.colbert, dtype=np.float32)
    return colbert_scores(q, np.array([0, len(q)]), np.concatenate(mats).astype(np.float32), offsets)[0]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
