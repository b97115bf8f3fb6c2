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
    ap.add_argument("--no-truncation", action="store_true", help="leave the truncation row out")
    ap.add_argument("--modes", nargs="+", default=MODES, help="modes to evaluate (default: dense sparse colbert all)")
    ap.add_argument(
        "--fetch-checks",
        type=int,
        default=3,
        help="first N whole-document MaxSim calls: also computed from fetched token vectors (time, difference)",
    )
    args = ap.parse_args()

    import m3search.collection as collection
    from m3search import M3Encoder
    from m3search.eval import evaluate, load_beir

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
    encoder = M3Encoder.from_pretrained(args.model, device="cpu", dtype="float32")
    modes = args.modes
    print(
        "| data | docs cut at 512 | index | ColBERT rule | "
        + " | ".join(f"{m} nDCG@10 / R@100" for m in modes)
        + " | search s/query ("
        + ", ".join(modes)
        + ") | whole-doc MaxSim s/query |"
    )
    print("|---|---|---|---|" + "---|" * (len(modes) + 2), flush=True)
    for k, folder in enumerate(args.data):
        data = load_beir(folder)
        lengths = np.array([len(x) for x in encoder.tokenize(data.doc_texts, 10**9)[0]])
        cut = int((lengths > encoder.max_length).sum())
        runs = [] if args.no_truncation else [("truncation", {"max_windows": 1}, "max", "window")]
        for stride in [None, *args.stride]:
            label, settings = ("windows", {}) if stride is None else (f"windows, stride {stride}", {"stride": stride})
            runs += [(label, settings, "max", rule) for rule in args.rules]
            if k == 0 and args.fuse and stride is None:
                runs.append(("windows, fuse then max", settings, "fuse", "window"))
        for label, settings, rule, colbert_rule in runs:
            collection.WINDOW_RULE, collection.COLBERT_RULE = rule, colbert_rule
            spent.update(s=0.0, calls=0, checks=0.0)
            t0 = time.perf_counter()
            res = evaluate(
                folder, model=encoder, modes=modes, cache_dir=args.cache_dir, settings=settings, progress=False
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
                + f" | {per_q} | {doc} |",
                flush=True,
            )  # row by row
    (collection.WINDOW_RULE, collection.COLBERT_RULE), collection._document_maxsim = rules, maxsim
    for n, engine_s, fetch_s, diff in checks:
        print(
            f"whole-document MaxSim of {n} documents: engine (one-token queries) {engine_s:.3f} s, "
            f"fetched token vectors + NumPy {fetch_s:.3f} s ({fetch_s / engine_s:.0f}x), max |difference| {diff:.2e}"
        )


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
