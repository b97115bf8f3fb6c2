"""Does ``m3search finetune`` help on held-out queries, and what does one epoch cost?

Protocol, per case (proxy model /work/shared/models/bge-m3-proxy, one ``m3search finetune`` process each,
so peak memory is that run's own):

* the judged queries are split in two fixed halves by query id (``--holdout 0.5``, seed 0); the model is
  trained on one half (hard negatives mined with the base model's dense ranks 2-200 over the corpus, judged
  positives excluded) for one epoch, and nDCG@10 / Recall@100 of the other half are measured per search
  mode before and after, through m3search's own index (eval's code path);
* cross-lingual cases ("xquad-r de->en"): xquad-r's de/zh/es questions against the English sentences and
  the English qrels (the query ids are shared across languages, so every xquad-r case has the same halves);
* every training query is used (no cap): on an idle 2-core CPU no case needs more than a few minutes.

Usage (repository root; cases run one after another, each in its own process under ``--timeout``; the
RESULTS.md section is rewritten after each case, the raw reports go to ``--raw``)::

    nice -n 5 python benchmarks/finetune.py
    python benchmarks/finetune.py --report-from benchmarks/raw/finetune     # rebuild the report only
    python benchmarks/finetune.py --cases time --lr 2e-5 --no-write --raw /tmp/ft
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this worktree's m3search, as the finetune processes get (PYTHONPATH)
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHARED = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "bge-m3-proxy"
TITLE = "Fine-tuning (m3search finetune): held-out nDCG@10 before/after, time and memory per epoch"
#: name -> (corpus + qrels folder, queries folder or None), in the order they run: the issue's cases first
CASES = {
    "cranfield": ("cranfield", None),
    "xquad-r/en": ("xquad-r/en", None),
    "xquad-r de->en": ("xquad-r/en", "xquad-r/de"),
    "xquad-r zh->en": ("xquad-r/en", "xquad-r/zh"),
    "xquad-r es->en": ("xquad-r/en", "xquad-r/es"),
    "time": ("time", None),
    "xquad-r/de": ("xquad-r/de", None),
    "xquad-r/zh": ("xquad-r/zh", None),
    "xquad-r/es": ("xquad-r/es", None),
    "xquad-r/ar": ("xquad-r/ar", None),
    "xquad-r/ru": ("xquad-r/ru", None),
}
MODES = ("dense", "sparse", "colbert", "all")
LOSS_WINDOW = 10  # steps averaged at each end of the loss curve (one step's loss is one batch's: noisy)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def shared_positives(corpus: str, queries: str | None) -> float:
    """Share of held-out queries whose judged positive is also a training query's (same split as the run).

    Why: the split is by query, so a passage can be a positive on both sides (xquad-r asks several questions
    about one sentence); a gain on such queries is partly the passage having been trained on.
    """
    from m3search.finetune import read_beir_examples

    split = read_beir_examples(
        SHARED / "data" / corpus, queries_dir=SHARED / "data" / queries if queries else None, holdout=0.5
    )
    trained = {d for rel in split.data.qrels.values() for d, s in rel.items() if s > 0}
    held = split.heldout.qrels
    return sum(any(s > 0 and d in trained for d, s in rel.items()) for rel in held.values()) / len(held)


def case_command(name: str, args: argparse.Namespace) -> tuple[list[str], Path]:
    """The ``m3search finetune`` command line of one case and its output folder."""
    corpus, queries = CASES[name]
    work = Path(args.work)
    out = work / f"model-{_slug(name)}"
    cmd = [sys.executable, "-m", "m3search.cli", "finetune", str(SHARED / "data" / corpus), "--model", args.model]
    cmd += ["--out", str(out), "--holdout", "0.5", "--epochs", "1", "--lr", str(args.lr), "--json"]
    cmd += ["--negatives", str(args.negatives), "--batch-size", str(args.batch_size)]
    cmd += ["--cache-dir", str(work / "cache")] + (["--queries", str(SHARED / "data" / queries)] if queries else [])
    return cmd, out


def finish(name: str, report: dict[str, Any], out: Path) -> dict[str, Any]:
    """Add what the table needs beyond the CLI's report: loss-curve ends and the shared-positive share."""
    totals = [h["total"] for h in json.loads((out / "report.json").read_text())["history"]]
    n = min(LOSS_WINDOW, len(totals))
    report["loss_ends"] = {"steps": n, "first": sum(totals[:n]) / n, "last": sum(totals[-n:]) / n}
    report["heldout_positive_trained_share"] = shared_positives(*CASES[name])
    return report


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``m3search finetune`` process; a case that runs past ``--timeout`` is reported as such."""
    cmd, out = case_command(name, args)
    shutil.rmtree(out, ignore_errors=True)  # this script's own earlier output (a killed run's .partial resumes)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    measured: dict[str, Any] = {"start": _now(), "machine": _machine(), "load_start": round(os.getloadavg()[0], 1)}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    base = {"case": name, "command": shlex.join(["m3search", *cmd[3:]]), "measured": measured}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        measured.update(load_end=round(os.getloadavg()[0], 1), wall_seconds=round(time.perf_counter() - t0, 1))
        return {**base, "timed_out": args.timeout}
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    measured.update(
        load_end=round(os.getloadavg()[0], 1),
        wall_seconds=round(time.perf_counter() - t0, 1),
        cpu_seconds=round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
    )
    if proc.returncode != 0:  # e.g. the sparse-collapse guard: a result to report, not a reason to stop the others
        print(f"{name}: finetune failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        try:
            message = json.loads(proc.stdout)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # a rerun starts over, not resumes
        return {**base, "failed": message}
    return finish(name, {**json.loads(proc.stdout), **base}, out)


def adopt_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """A case whose finetune process finished but was not collected by this script (its driver was stopped so
    that ``--timeout`` would not kill a run slowed by other jobs): the report from the model folder, start time
    derived from it; the whole command's CPU seconds and load average were not recorded."""
    cmd, out = case_command(name, args)
    report = {k: v for k, v in json.loads((out / "report.json").read_text()).items() if k != "history"}
    start = _dt.datetime.fromtimestamp(
        (out / "report.json").stat().st_mtime - report["total_seconds"], _dt.timezone.utc
    )
    measured = {"start": start.strftime("%Y-%m-%d %H:%M UTC"), "wall_seconds": report["total_seconds"], "adopted": True}
    base = {"case": name, "command": shlex.join(["m3search", *cmd[3:]]), "measured": measured, "out": str(out)}
    return finish(name, {**report, **base}, out)


def _arrow(a: float, b: float, fmt: str) -> str:
    return f"{a:{fmt}} -> {b:{fmt}}"


def _runs(meta: dict[str, Any]) -> list[str]:
    """The command lines that measured into a raw folder (older folders hold one, as a string)."""
    argv = meta.get("argv") or []
    return [argv] if isinstance(argv, str) else list(argv)


def _machine() -> str:
    """The CPU, as ``lscpu`` names it: cases may be measured on different machines (times compare within one)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def to_markdown(reports: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    done = [r for r in reports if "timed_out" not in r and "failed" not in r]
    lines = [
        f"Machine: {meta['cpu']} unless the second table names another (per case), **shared with other jobs** "
        "(load average per case in the second table: "
        "times are noisy, CPU seconds less so, metrics not at all). **No GPU was lent to this task**, so the GPU run "
        f"of the same command is not measured. Base model {meta['model']} (the proxy: all-MiniLM-L6-v2 in bge-m3's "
        "layout, English only, 384-d), bf16 "
        f"autocast (the CPU has AVX512-BF16), one epoch, lr {meta['lr']}, {meta['negatives']} hard negatives per "
        f"query, at most {meta['batch_size']} queries per batch under the default token budget (8,192 padded tokens), "
        "temperature 0.02, all three modes + self-distillation, every training query used (no cap). Held-out = the "
        "half of the judged queries not trained on (`--holdout 0.5`, seed 0, split by query id).",
        "",
        "Runs: "
        + ", then ".join(f"`PYTHONPATH=src nice -n 5 python benchmarks/finetune.py {a}`" for a in _runs(meta))
        + f"; raw reports in "
        f"`{meta['raw']}`. The command of each case:",
        "",
        *[f"* {r['case']}: `{r['command']}`" for r in reports],
        "",
        "| case | train / held-out queries | mode | nDCG@10 before | after | change | Recall@100 before | after | change |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in done:
        for mode in MODES:
            b, a = r["heldout_before"][mode], r["heldout_after"][mode]
            lines.append(
                f"| {r['case']} | {r['n_train_queries']} / {r['n_heldout_queries']} | {mode} | {b['ndcg@10']:.4f} | "
                f"{a['ndcg@10']:.4f} | {a['ndcg@10'] - b['ndcg@10']:+.4f} | {b['recall@100']:.4f} | "
                f"{a['recall@100']:.4f} | {a['recall@100'] - b['recall@100']:+.4f} |"
            )
    lines += [
        "",
        "| case | started | machine | load avg start -> end | steps | queries / step | epoch wall s | epoch CPU s | "
        "peak RSS MiB | mining s | whole command wall s (CPU s) | mean loss, first -> last steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        m = r.get("measured", {})
        machine = m.get("machine", meta["cpu"].replace(" (`lscpu`)", ""))
        head = f"| {r['case']} | {m.get('start', '?')} | {machine} | {m.get('load_start', '?')} -> {m.get('load_end', '?')} |"
        if "timed_out" in r or "failed" in r:
            why = (
                f"timed out after {r['timed_out']} s"
                if "timed_out" in r
                else "failed: " + r["failed"].replace("|", "/")
            )
            lines.append(f"{head} {why} (no result) | | | | | | | |")
            continue
        e, ends = r["epochs"][-1], r["loss_ends"]
        lines.append(
            f"{head} {r['steps']} | {r['queries_per_batch']} | {e['seconds']:.0f} | {e.get('cpu_seconds', '?')} | "
            f"{e['peak_memory_mib']:.0f} | {r['mining_seconds']:.0f} | {m['wall_seconds']:.0f} ({m.get('cpu_seconds', '?')}) "
            f"| {_arrow(ends['first'], ends['last'], '.3f')} ({ends['steps']} step{'s' * (ends['steps'] > 1)} each) |"
        )
    lines += [
        "",
        "Sparse head (collapse guard: probe passages' token weights, before training -> after the epoch) and the "
        "share of held-out queries whose judged passage is also a training query's positive:",
        "",
        "| case | nonzero weights | mean weight | max weight | held-out positives also trained on |",
        "|---|---|---|---|---|",
    ]
    for r in done:
        b, a = r["sparse_weights_before"], r["epochs"][-1]["sparse_weights"]
        lines.append(
            f"| {r['case']} | {b['nonzero']:.1%} -> {a['nonzero']:.1%} | {_arrow(b['mean'], a['mean'], '.4f')} | "
            f"{_arrow(b['max'], a['max'], '.3f')} | {r['heldout_positive_trained_share']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    parser.add_argument("--model", default=str(MODEL), help="base model folder (default: the proxy)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--negatives", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case (its row then says so)")
    parser.add_argument("--raw", default=str(REPO / "benchmarks" / "raw" / "finetune"), help="reports (JSON) folder")
    parser.add_argument("--work", default="/tmp/m3s-finetune-bench", help="models and index cache (large)")
    parser.add_argument("--report-from", default=None, help="a --raw folder of an earlier run: report only")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--rerun", action="store_true", help="measure cases whose report is already in --raw")
    parser.add_argument("--adopt", action="store_true", help="collect finished model folders in --work, no runs")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    raw = Path(args.report_from or args.raw)
    raw.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    meta_path = raw / "meta.json"
    settings = {"model": args.model, "lr": args.lr, "negatives": args.negatives, "batch_size": args.batch_size}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())  # the first run's settings; cases already measured are kept
        if not args.report_from and any(meta[k] != v for k, v in settings.items()):
            parser.error(f"{raw} holds runs with other settings ({meta}); use another --raw")
    else:
        meta = {"cpu": f"{_machine()} (`lscpu`)", **settings}
    meta["raw"] = str(raw.resolve().relative_to(REPO)) if raw.resolve().is_relative_to(REPO) else str(raw)
    if not args.report_from:  # every invocation that measured into this folder, in order
        this = shlex.join(sys.argv[1:] if argv is None else argv)
        meta["argv"] = [*(a for a in _runs(meta) if a != this), this]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    reports = []
    for name in names:
        path = raw / f"{_slug(name)}.json"
        if args.adopt:
            if (Path(args.work) / f"model-{_slug(name)}" / "report.json").is_file():
                path.write_text(json.dumps(adopt_case(name, args), indent=2) + "\n")
        elif not args.report_from and (args.rerun or not path.is_file()):
            print(f"[finetune] {name} ... ({_now()})", file=sys.stderr, flush=True)
            path.write_text(json.dumps(run_case(name, args), indent=2) + "\n")
        if path.is_file():
            reports.append(json.loads(path.read_text()))
            publish("finetune", TITLE, to_markdown(reports, meta), no_write=args.no_write)


if __name__ == "__main__":
    main()
