"""Long documents: windows vs truncation (max_windows=1), and the two window-scoring rules.

For each BEIR folder, two cached indexes of the same corpus with the proxy model (512
positions): every window (the collection default: window 512, stride 384) and one window
(max_windows=1, today's truncation). Every mode is searched on both in the same run; on
the first folder the windowed index is searched again with "fuse per window, then max"
(the private ``m3search.collection.WINDOW_RULE`` switch) and with ColBERT scored over all of
a document's windows (``COLBERT_RULE = "document"``: per query token the best match among
every window's tokens; ``--colbert-document`` does it on every folder). Prints one Markdown table.

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
    ap.add_argument(
        "--colbert-document", action="store_true", help="every folder: also ColBERT over all of a document's windows"
    )
    ap.add_argument("--only", action="append", help="run only the index rows whose label starts with this")
    ap.add_argument("--modes", nargs="+", default=MODES, help="modes to evaluate (default: dense sparse colbert all)")
    args = ap.parse_args()

    import m3search.collection as collection
    from m3search import M3Encoder
    from m3search.eval import evaluate, load_beir

    encoder = M3Encoder.from_pretrained(args.model, device="cpu", dtype="float32")
    modes = args.modes
    print("| data | docs cut at 512 | index | " + " | ".join(f"{m} nDCG@10 / R@100" for m in modes) + " |")
    print("|---|---|---|" + "---|" * len(modes), flush=True)
    for k, folder in enumerate(args.data):
        data = load_beir(folder)
        lengths = np.array([len(x) for x in encoder.tokenize(data.doc_texts, 10**9)[0]])
        cut = int((lengths > encoder.max_length).sum())
        runs = [("truncation", {"max_windows": 1}, "max", "window"), ("windows", {}, "max", "window")]
        if k == 0 or args.colbert_document:
            runs.append(("windows, ColBERT over the whole document", {}, "max", "document"))
        if k == 0 and not args.colbert_document:
            runs.append(("windows, fuse then max", {}, "fuse", "window"))
        for label, settings, rule, colbert_rule in runs:
            if args.only and not any(label.startswith(x) for x in args.only):
                continue
            collection.WINDOW_RULE, collection.COLBERT_RULE = rule, colbert_rule
            t0 = time.perf_counter()
            res = evaluate(
                folder, model=encoder, modes=modes, cache_dir=args.cache_dir, settings=settings, progress=False
            )
            print(f"{folder} {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            name = Path(folder).name if "xquad" not in folder else "xquad-r/en"
            cells = [f"{res['modes'][m]['ndcg@10']:.4f} / {res['modes'][m]['recall@100']:.4f}" for m in modes]
            print(f"| {name} | {cut}/{len(lengths)} | {label} | " + " | ".join(cells) + " |", flush=True)  # row by row
    collection.WINDOW_RULE, collection.COLBERT_RULE = "max", "window"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
