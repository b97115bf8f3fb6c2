"""Time to create an m3search collection on Milvus Lite: waiting for each index (pymilvus's default) or not.

Why: ``MilvusClient.create_collection(index_params=...)`` and ``create_index`` wait for each index with a
0.5 s sleep before the first check, and an m3search collection has 11 indexes over four Milvus
collections, though the indexes of an empty collection are built at once. The engine now creates each
index with ``sync=False`` and lets ``load_collection`` wait; the peer here is the same code with
``create_index``'s default wait put back (what ``create_collection(index_params=...)`` did). Runs
alternate, each on a new ``.db`` file, tiny random model (the schema, not the model, sets the cost).

Usage (repository root, project venv)::

    python benchmarks/milvus_create.py --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pymilvus import MilvusClient

sys.path.insert(0, str(Path(__file__).parent))
from encode import _lscpu  # noqa: E402

from m3search import Collection, M3Encoder  # noqa: E402
from m3search.testing import build_random_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="creates per variant (alternating)")
    args = ap.parse_args()
    print(f"# {_lscpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        enc = M3Encoder.from_pretrained(str(build_random_model(Path(tmp) / "m", seed=0)), device="cpu")
        no_wait = MilvusClient.create_index

        def waiting(self, name, index_params, timeout=None, **kw):  # pymilvus's default: wait for each index
            kw.pop("sync", None)
            return no_wait(self, name, index_params, timeout=timeout, **kw)

        times: dict[str, list[float]] = {"wait for each index (before)": [], "sync=False, load waits (now)": []}
        for run in range(args.runs):
            for variant in times:
                MilvusClient.create_index = waiting if variant.startswith("wait") else no_wait
                try:
                    start = time.perf_counter()
                    Collection.create(f"{tmp}/{run}-{len(times[variant])}-{variant[:4]}.db", model=enc).close()
                    times[variant].append(time.perf_counter() - start)
                finally:
                    MilvusClient.create_index = no_wait
    print("| variant | create median s | min s | max s | runs |")
    print("|---|---|---|---|---|")
    for variant, ts in times.items():
        print(f"| {variant} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} | {len(ts)} |")
    before, now = (statistics.median(ts) for ts in times.values())
    print(f"\nratio before / now: {before / now:.1f}x")


if __name__ == "__main__":
    main()
