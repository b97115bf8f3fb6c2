"""Does ``m3search finetune`` help on held-out queries, and what does one epoch cost?

Protocol, per case (proxy model /work/shared/models/bge-m3-proxy, one ``m3search finetune`` process each,
so peak memory is that run's own):

* the judged queries are split in two fixed halves (``--holdout 0.5``, seed 0); the model is trained on
  one half (hard negatives mined with the base model's dense ranks 2-200 over the corpus, judged
  positives excluded) for one epoch, and nDCG@10 / Recall@100 of the other half are measured per
  search mode before and after, through m3search's own index (eval's code path);
* cross-lingual cases take xquad-r's de/zh/es questions against the English sentences.

Usage (repository root; cheapest case first, the RESULTS.md section is rewritten after each case)::

    nice -n 5 python benchmarks/finetune.py --json-dir /tmp/ft-bench
    python benchmarks/finetune.py --report-from /tmp/ft-bench       # rebuild the report without re-measuring
    python benchmarks/finetune.py --cases time --lr 2e-5 --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHARED = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "bge-m3-proxy"
TITLE = "Fine-tuning (m3search finetune): held-out nDCG@10 before/after, time and memory per epoch"
#: name -> (corpus folder, queries folder or None), cheapest first
CASES = {
    "time": ("time", None),
    "cranfield": ("cranfield", None),
    "xquad-r/en": ("xquad-r/en", None),
    "xquad-r de->en": ("xquad-r/en", "xquad-r/de"),
    "xquad-r zh->en": ("xquad-r/en", "xquad-r/zh"),
    "xquad-r es->en": ("xquad-r/en", "xquad-r/es"),
}
MODES = ("dense", "sparse", "colbert", "all")


def run_case(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    corpus, queries = CASES[name]
    out = work / ("model-" + "".join(c if c.isalnum() else "-" for c in name))
    shutil.rmtree(out, ignore_errors=True)  # this script's own earlier output (a killed run's .partial resumes)
    cmd = [sys.executable, "-m", "m3search.cli", "finetune", str(SHARED / "data" / corpus), "--model", str(MODEL)]
    cmd += ["--out", str(out), "--holdout", "0.5", "--epochs", "1", "--lr", str(args.lr), "--json"]
    cmd += [
        "--negatives",
        str(args.negatives),
        "--batch-size",
        str(args.batch_size),
        "--cache-dir",
        str(work / "cache"),
    ]
    if queries:
        cmd += ["--queries", str(SHARED / "data" / queries)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name}: finetune failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    report = json.loads(proc.stdout)
    report["case"] = name
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report["command"] = shlex.join(["m3search", *cmd[3:]])
    return report


def to_markdown(reports: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"**Measured {meta['date']}** on {meta['cpu']}, **machine shared with other jobs** (load average "
        f"{meta['load']} on 2 cores at the start: times are noisy, metrics are not). Proxy model "
        f"(all-MiniLM-L6-v2 in bge-m3's layout, English only), bf16 autocast (the CPU has AVX512-BF16), one epoch, "
        f"lr {meta['lr']}, {meta['negatives']} hard negatives per query, at most {meta['batch_size']} queries per "
        "batch, temperature 0.02, all three modes + self-distillation. Held-out = the half of the judged queries "
        "not trained on (`--holdout 0.5`, seed 0). Command per case (repository root):",
        "",
        f"`PYTHONPATH=src nice -n 5 python benchmarks/finetune.py {meta['argv']}`, i.e. for each case e.g. "
        f"`{reports[0]['command'] if reports else ''}`",
        "",
        "| case | train / held-out queries | mode | nDCG@10 before | after | change | Recall@100 before | after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        for mode in MODES:
            b, a = r["heldout_before"][mode], r["heldout_after"][mode]
            lines.append(
                f"| {r['case']} | {r['n_train_queries']} / {r['n_heldout_queries']} | {mode} | {b['ndcg@10']:.4f} | "
                f"{a['ndcg@10']:.4f} | {a['ndcg@10'] - b['ndcg@10']:+.4f} | {b['recall@100']:.4f} | "
                f"{a['recall@100']:.4f} |"
            )
    lines += [
        "",
        "| case | steps | epoch time (s) | peak memory (MiB, process RSS) | mining (s) | whole command (s) | "
        "loss first -> last step | sparse weights nonzero before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        e, h = r["epochs"][-1], r.get("history_ends", {})
        lines.append(
            f"| {r['case']} | {r['steps']} | {e['seconds']} | {e['peak_memory_mib']:.0f} | {r.get('mining_seconds')} | "
            f"{r['wall_seconds']} | {h.get('first', float('nan')):.3f} -> {h.get('last', float('nan')):.3f} | "
            f"{r['sparse_weights_before']['nonzero']:.1%} -> {e['sparse_weights']['nonzero']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--negatives", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per case")
    parser.add_argument("--json-dir", default="/tmp/m3s-finetune-bench", help="work folder: models, cache, reports")
    parser.add_argument("--report-from", default=None, help="a --json-dir of an earlier run: report only")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--rerun", action="store_true", help="measure cases whose report is already in --json-dir")
    args = parser.parse_args(argv)
    work = Path(args.report_from or args.json_dir)
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "meta.json"
    if args.report_from or (meta_path.is_file() and not args.rerun):
        meta = json.loads(meta_path.read_text())  # the first run's settings; cases already measured are kept
        asked = {"lr": args.lr, "negatives": args.negatives, "batch_size": args.batch_size}
        if not args.report_from and any(meta[k] != v for k, v in asked.items()):
            parser.error(f"{work} holds runs with other settings ({meta}); use --rerun or another --json-dir")
    else:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in cpu.splitlines() if ":" in line)
        meta = {
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs",
            "load": f"{os.getloadavg()[0]:.1f}",
            "lr": args.lr,
            "negatives": args.negatives,
            "batch_size": args.batch_size,
            "argv": shlex.join(sys.argv[1:] if argv is None else argv),
        }
        meta_path.write_text(json.dumps(meta, indent=2))
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    reports = []
    for name in names:
        path = work / f"report-{''.join(c if c.isalnum() else '-' for c in name)}.json"
        if not args.report_from and (args.rerun or not path.is_file()):
            print(f"[finetune] {name} ...", file=sys.stderr, flush=True)
            report = run_case(name, args, work)
            hist = json.loads((Path(report["out"]) / "report.json").read_text())["history"]
            report["history_ends"] = {"first": hist[0]["total"], "last": hist[-1]["total"]}
            path.write_text(json.dumps(report, indent=2))
        if path.is_file():
            reports.append(json.loads(path.read_text()))
            publish("finetune", TITLE, to_markdown(reports, meta), no_write=args.no_write)


if __name__ == "__main__":
    main()
