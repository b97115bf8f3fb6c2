"""Does memory grow with the shapes the encoder meets? Padded widths vs exact widths (issue 13).

Found while measuring a server's RSS under 64 clients (2026-12-03): anonymous memory grew with
every request, Python's own allocations (tracemalloc) stayed flat, and one thread calling
``M3Encoder.encode`` on batches of 1-16 queries grew just as much, in bf16 (oneDNN kernels kept
per input shape) and far less in fp32. The encoder now pads each batch to a multiple of
``PAD_MULTIPLE`` tokens; this script measures both side by side, each in a fresh process:
the same ``--calls`` encode calls (random batches of 1-16 cranfield queries, seeded), and the
process's anonymous memory (``/proc/self/smaps_rollup``) every ``--calls / 6`` calls::

    python benchmarks/encode_memory.py [--model PATH] [--dtype auto] [--calls 600]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared"))


def _anonymous_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(model: str, dtype: str, calls: int, pad: int) -> None:
    """One measured process: prints a JSON line of (calls, anonymous MB, seconds) points."""
    import random

    import m3search.encoder as enc_mod
    from m3search import M3Encoder

    enc_mod.PAD_MULTIPLE = pad
    enc = M3Encoder.from_pretrained(model, dtype=dtype)
    queries = [json.loads(x)["text"] for x in (SHARED / "data" / "cranfield" / "queries.jsonl").open()]
    rnd = random.Random(0)
    points, t0, step = [(0, _anonymous_mb(), 0.0)], time.perf_counter(), max(1, calls // 6)
    for i in range(1, calls + 1):
        start = rnd.randrange(len(queries))
        enc.encode([queries[(start + j) % len(queries)] for j in range(rnd.randint(1, 16))], max_length=64)
        if i % step == 0:
            points.append((i, _anonymous_mb(), time.perf_counter() - t0))
    print(json.dumps({"pad": pad, "dtype": str(enc.dtype), "points": points}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "bge-m3-proxy"))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--calls", type=int, default=600)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(args.model, args.dtype, args.calls, args.child)
    from m3search.encoder import PAD_MULTIPLE

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    rows = []
    for pad in (PAD_MULTIPLE, 1):
        cmd = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--calls", str(args.calls)]
        out = subprocess.run(cmd + ["--child", str(pad)], check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.calls} calls of 1-16 queries, {args.model}")
    print("| widths padded to | dtype | anonymous MB after 0 / ... calls | growth over the last half | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        pts = r["points"]
        mb = " / ".join(f"{m:.0f}" for _, m, _ in pts)
        half = pts[len(pts) // 2]
        print(f"| {r['pad']} | {r['dtype']} | {mb} | {pts[-1][1] - half[1]:+.0f} MB | {pts[-1][2]:.1f} |")


if __name__ == "__main__":
    main()
