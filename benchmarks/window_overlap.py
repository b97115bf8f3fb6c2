"""Long documents as token windows: which overlap, and how a document's score comes from its windows.

What it measures, and why this way:

* Each configuration encodes the corpus with :meth:`M3Encoder.encode_windows` (one
  window = truncation, as today; then windows of the model's full length with 0, 64, 128,
  256 content tokens of overlap, unless ``--overlaps`` says otherwise).
* No store: every query is scored exactly against every window (``m3search.scoring``:
  dense, lexical, ColBERT), so the numbers measure the windows, not an index.
* Two rules turn window scores into a document score, both measured:
  ``max``: per mode, the document's score is its best window's; fused modes fuse those
  maxima. ``fuse-max``: fuse per window, then take the best window. Single modes are the
  same under both rules. Fusion is BGE-M3's weighted sum with m3search's default weights.
* Metrics are trec_eval's (``m3search.eval.compute_metrics``): nDCG@10 and Recall@100.
  The truncation row in fp32 reproduces the proxy model's reference table.

Usage (from the repository root, with the project venv)::

    nice -n 5 python benchmarks/window_overlap.py                       # time, writes RESULTS.md
    python benchmarks/window_overlap.py --data ../shared/data/cranfield --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

RULES = ("max", "fuse-max")


def _mode_scores(q, w) -> dict[str, np.ndarray]:
    """``(n_queries, n_windows)`` exact scores per single mode."""
    from m3search.scoring import colbert_scores, dense_scores, lexical_scores

    return {
        "dense": dense_scores(q.dense, w.dense),
        "sparse": lexical_scores(q.sparse, w.sparse),
        "colbert": colbert_scores(q.colbert, q.colbert_offsets, w.colbert, w.colbert_offsets),
    }


def doc_scores(per_window: dict[str, np.ndarray], doc_bounds: np.ndarray, rule: str) -> dict[str, np.ndarray]:
    """Document scores of every mode of ``m3search.eval.MODES`` under ``rule``."""
    from m3search.eval import MODES
    from m3search.fusion import weighted
    from m3search.plan import DEFAULT_WEIGHTS, parse_mode
    from m3search.plan import MODES as SINGLE
    from m3search.scoring import segment_max

    weights = dict(zip(SINGLE, DEFAULT_WEIGHTS))
    per_doc = {m: segment_max(s, doc_bounds) for m, s in per_window.items()}
    out = {}
    for mode in MODES:
        parts = parse_mode(mode)
        if len(parts) == 1:
            out[mode] = per_doc[mode]
        elif rule == "max":
            out[mode] = weighted({m: per_doc[m] for m in parts}, weights)
        else:
            fused = weighted({m: per_window[m] for m in parts}, weights).astype(np.float32)
            out[mode] = segment_max(fused, doc_bounds)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from m3search import M3Encoder
    from m3search.eval import compute_metrics, load_beir

    data = load_beir(args.data)
    enc = M3Encoder.from_pretrained(args.model, device="cpu", dtype=args.dtype)
    window = args.window or enc.max_length
    qids = list(data.queries)
    q = enc.encode([data.queries[i] for i in qids], max_length=512)
    n_content = np.array(
        [len(e.ids) for e in enc.tokenizer.encode_batch(data.doc_texts, add_special_tokens=False)], np.int64
    )
    # A document that fits one window is that same window in every configuration: encoded once, with truncation.
    long_docs = np.flatnonzero(n_content > window - 2)
    res: dict[str, Any] = {
        "dataset": data.name,
        "n_docs": len(data.doc_ids),
        "n_queries": len(qids),
        "longer_than_window": len(long_docs),
        "model": str(args.model),
        "dtype": str(enc.dtype).replace("torch.", ""),
        "rows": [],
    }
    configs = [("truncation (1 window)", window - 2, 1)] + [
        (f"overlap {o}", window - 2 - o, None) for o in args.overlaps
    ]
    base_scores = None
    if args.no_truncation:  # only the documents that fit one window, as the base of the other rows
        configs = configs[1:]
        short = np.flatnonzero(n_content <= window - 2)
        w = enc.encode_windows([data.doc_texts[i] for i in short], window=window, stride=window - 2, max_windows=1)
        per_doc = doc_scores(_mode_scores(q, w.embeddings), np.arange(len(short) + 1), "max")
        zeros = np.zeros((len(qids), len(data.doc_ids)), np.float32)
        base_scores = {m: _put(zeros, short, s) for m, s in per_doc.items()}
    for name, stride, max_windows in configs:
        texts = data.doc_texts if max_windows == 1 else [data.doc_texts[i] for i in long_docs]
        t0 = time.perf_counter()
        w = enc.encode_windows(texts, window=window, stride=stride, max_windows=max_windows)
        encode_s = time.perf_counter() - t0
        bounds = np.searchsorted(w.doc, np.arange(len(texts) + 1))
        per_window = _mode_scores(q, w.embeddings)
        row = {
            "config": name,
            "window": window,
            "stride": stride,
            "windows": len(w.doc) + (0 if max_windows == 1 else len(data.doc_ids) - len(long_docs)),
            "encoded_tokens": int(w.embeddings.n_tokens.sum()),
            "cut": w.cut,
            "encode_s": encode_s,
            "metrics": {},
        }
        for rule in RULES if max_windows is None else RULES[:1]:
            scores = doc_scores(per_window, bounds, rule)
            if base_scores is None:
                base_scores = scores
            else:  # long documents from their windows, the others as encoded once
                scores = {m: _put(base_scores[m], long_docs, s) for m, s in scores.items()}
            for mode, sc in scores.items():
                if rule != "max" and "+" not in mode and mode != "all":
                    continue
                run_ = {qid: dict(zip(data.doc_ids, sc[i].tolist())) for i, qid in enumerate(qids)}
                m = compute_metrics(run_, data.qrels, k=10, recall_at=100)
                row["metrics"][f"{rule}:{mode}"] = (m["ndcg@10"], m["recall@100"])
        res["rows"].append(row)
        if args.json:  # after every configuration: a long run stopped early keeps what it measured
            Path(args.json).write_text(json.dumps(res, indent=2))
        print(
            f"[window_overlap.py] {name}: {len(w.doc)} windows encoded, {encode_s:.0f} s", file=sys.stderr, flush=True
        )
    return res


def _put(base: np.ndarray, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = base.copy()
    out[:, cols] = values
    return out


def render(res: dict[str, Any], argv: list[str], date: str, uptime: str) -> str:
    from m3search.eval import MODES

    base = res["rows"][0]["metrics"]
    head = (
        f"{date}, {_lscpu()}, machine shared with other jobs (timings noisy). Command: "
        f"`nice -n 5 python benchmarks/window_overlap.py {' '.join(argv)}`. Model `{res['model']}` ({res['dtype']}), "
        f"{res['dataset']}: {res['n_docs']} documents ({res['longer_than_window']} longer than one window), "
        f"{res['n_queries']} queries; every query scored exactly against every window; nDCG@10 / Recall@100, "
        "in brackets the change against truncation.\n"
    )
    lines = [head, "| configuration | rule | " + " | ".join(MODES) + " | windows | tokens encoded | encode s |"]
    lines.append("|---" * (len(MODES) + 5) + "|")
    for row in res["rows"]:
        for rule in RULES:
            cells = []
            for mode in MODES:
                key = f"{rule}:{mode}"
                if key not in row["metrics"]:
                    cells.append("=" if rule != "max" and f"max:{mode}" in row["metrics"] else "")
                    continue
                nd, rc = row["metrics"][key]
                b_nd, b_rc = base[f"max:{mode}"]
                delta = f" ({nd - b_nd:+.4f} / {rc - b_rc:+.4f})" if row is not res["rows"][0] else ""
                cells.append(f"{nd:.4f} / {rc:.4f}{delta}")
            if not any(c not in ("", "=") for c in cells):
                continue
            lines.append(
                f"| {row['config']} (stride {row['stride']}) | {rule} | " + " | ".join(cells) + " | "
                f"{row['windows']} | {row['encoded_tokens']:,} | {row['encode_s']:.0f} |"
            )
    lines += [
        "",
        "`max`: per mode, a document scores as its best window, fused modes fuse those maxima; `fuse-max`: fuse each "
        "window's scores, then the best window (`=`: single modes are the same under both rules). Documents that "
        "fit one window are encoded once (with truncation) and reused by every configuration; 'tokens encoded' and "
        "'encode s' count only what each configuration encoded itself. "
        f"Load: `{uptime}`.",
        "",
    ]
    return "\n".join(lines)


def _lscpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "time"), help="BEIR folder (time)")
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "bge-m3-proxy"))
    ap.add_argument("--dtype", default="auto", help="encoder dtype (float32 reproduces the reference table; slower)")
    ap.add_argument("--window", type=int, default=None, help="tokens per window incl. specials (default: model's)")
    ap.add_argument("--overlaps", type=int, nargs="+", default=[0, 128, 64, 256], help="overlaps in tokens")
    ap.add_argument(
        "--no-truncation", action="store_true", help="skip the truncation row (encode only documents that fit once)"
    )
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--report-from", help="rebuild the report from a --json file instead of measuring")
    ap.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    args = ap.parse_args(argv)
    from results import run_or_replay

    res = run_or_replay(args, argv, run)
    res.setdefault("date", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    res.setdefault("uptime", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if args.json and not args.report_from:
        Path(args.json).write_text(json.dumps(res, indent=2))
    text = render(res, res["argv"], res["date"], res["uptime"])
    publish(
        "window_overlap.py",
        "Long documents as windows: overlap and score rule (`benchmarks/window_overlap.py`)",
        text,
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()
