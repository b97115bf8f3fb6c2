"""Peak memory of two paths that padded every input to the longest one (fixed 2026-12-06, stop 42).

* ``fusion.order`` over 400 candidates, one with an id of 1,000,000 characters: the ids were a NumPy string array
  (every id padded to the longest: 400 x 4 MB); now Python's sort of the ids.
* ``scoring.pair_colbert_scores`` (``compute_score``'s ColBERT) of 400 pairs, 32-token queries, 64-token passages
  and one of 8,192, at 64-d: every pair was padded to the longest passage; now blocks of similar length.

Each case runs in a fresh process; it prints the process's peak RSS (``ru_maxrss``) over its RSS just before the
call, and the call's wall time, for this tree and, with ``--baseline REV``, for ``git archive REV src``::

    python benchmarks/peak_memory.py [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("order", "pair_colbert")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _case(name: str) -> dict:
    """One measurement, in this process (run by ``--case``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    if name == "order":
        from m3search.fusion import order

        ids = [f"doc{i}" for i in range(399)] + ["x" * 1_000_000]
        fused = np.zeros(len(ids))
        call = lambda: order(ids, fused)  # noqa: E731
    else:
        from m3search.scoring import pair_colbert_scores

        lengths = [64] * 399 + [8192]
        q_off = np.arange(0, 32 * 401, 32)
        d_off = np.concatenate(([0], np.cumsum(lengths)))
        q = rng.standard_normal((int(q_off[-1]), 64)).astype(np.float32)
        d = rng.standard_normal((int(d_off[-1]), 64)).astype(np.float32)
        call = lambda: pair_colbert_scores(q, q_off, d, d_off)  # noqa: E731
    before = _rss_mib()
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": name, "peak_over_before_mib": round(peak - before, 1), "seconds": round(seconds, 3)}


def _run(src: Path, case: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", case],
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="a git revision to measure beside this tree")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(_case(args.case)))
        return
    trees = [("this tree", REPO / "src")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", args.baseline, "src"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            trees.append((f"baseline {args.baseline}", Path(tmp) / "src"))
        print("| case | tree | peak RSS over before, MiB | wall s |")
        print("|---|---|---|---|")
        for case in CASES:
            for label, src in trees:
                r = _run(src, case)
                print(f"| {case} | {label} | {r['peak_over_before_mib']:,.1f} | {r['seconds']:.3f} |")


if __name__ == "__main__":
    main()
