"""Is a forward pass slower in a thread other than the one that loaded the model? (issue 13)

Found while measuring the server's one-client latency (2026-12-03): the proxy's forward pass for one query
took ~6-8 ms wall in the main thread (and in a thread that had itself loaded the model) but ~11-15 ms in any
other thread, with the same CPU time (~13 ms: the second core idles). The server's batching worker is such
another thread. Cause (found 2026-12-03, per-thread CPU ticks): libgomp stops spin-waiting between parallel
regions once the OpenMP threads of all pools outnumber the cores, and the loading thread's idle pool counts;
the calling thread's OpenMP worker then sleeps and wakes at each of the forward's short regions
(OMP_WAIT_POLICY=PASSIVE does the same to every thread). The last rows release the loading thread's pool
(m3search.batching.release_openmp_pool, what Batcher does) and call from another thread again.

Prints wall and CPU ms per forward pass of one query (proxy model), per calling thread, then the
latency of one query through a Batcher with and without the release::

    python benchmarks/thread_forward.py [--model PATH] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SHARED = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "bge-m3-proxy"))
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    import torch

    from m3search import M3Encoder

    query = json.loads((SHARED / "data" / "cranfield" / "queries.jsonl").open().readline())["text"]
    models: dict[str, M3Encoder] = {}

    def timed(label: str, enc: M3Encoder) -> None:
        ids = torch.tensor([enc.tokenize([query], 64)[0][0]])
        mask = torch.ones_like(ids)
        t0, c0, k = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - t0 < args.seconds:
            with torch.inference_mode():
                enc.model(input_ids=ids, attention_mask=mask)
            k += 1
        wall, cpu = (time.perf_counter() - t0) / k * 1000, (time.process_time() - c0) / k * 1000
        print(f"| {label} | {wall:.2f} | {cpu:.2f} |", flush=True)

    def in_thread(fn) -> None:
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    print("| model loaded by -> forward called from | wall ms | CPU ms |\n|---|---|---|")
    models["main"] = M3Encoder.from_pretrained(args.model)
    timed("main -> main", models["main"])
    in_thread(lambda: timed("main -> another thread", models["main"]))

    def load_here() -> None:
        models["thread"] = M3Encoder.from_pretrained(args.model)
        timed("a thread -> the same thread", models["thread"])

    in_thread(load_here)
    timed("a thread -> main", models["thread"])
    in_thread(lambda: timed("a thread -> a third thread", models["thread"]))

    from m3search.batching import release_openmp_pool

    released = release_openmp_pool()  # main's pool (it ran forwards above)
    in_thread(lambda: timed(f"main -> another thread, main's pool released ({released})", models["main"]))

    # The server's case: one query at a time through a Batcher built in main, without and with its release.
    import m3search.batching as batching

    queries = [json.loads(line)["text"] for line in (SHARED / "data" / "cranfield" / "queries.jsonl").open()][:200]
    print("\n| through a Batcher built in main (200 queries, one at a time) | p50 ms | p95 ms |\n|---|---|---|")
    for label, release in (("pool kept (release patched out)", lambda: False), ("pool released", release_openmp_pool)):
        models["main"].encode(queries[:4])  # main runs torch again: its pool is back
        batching.release_openmp_pool = release
        with batching.Batcher(models["main"]) as b:
            lat = []
            for q in queries:
                t0 = time.perf_counter()
                b.submit([q]).future.result()
                lat.append((time.perf_counter() - t0) * 1000)
        batching.release_openmp_pool = release_openmp_pool
        lat.sort()
        print(f"| {label} | {lat[len(lat) // 2]:.2f} | {lat[int(len(lat) * 0.95)]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
