"""What re-reading the window bound costs a search on a server engine (``Engine.shared``).

Why: a server's collection has other clients, so ``Collection`` re-reads the manifest's
``max_windows_stored`` before each call (``Collection._sync``); without it a client that
opened while every document was one window treats another client's long documents as one
window. This prints, per engine and mode, the search p50 with the re-read and without it
(``shared`` switched off on the same open collection, same queries, alternating rounds),
and the manifest read alone.

Engines: qdrant-client's local mode (the Qdrant server engine's stand-in: its manifest read
is in-process, so a real server adds one round trip) and Milvus Lite. The model is the tiny
random test model (the encoder is not timed: queries are encoded once up front).

Usage: ``python benchmarks/shared_sync.py [--docs 300] [--rounds 5] [--queries 20]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings


def _p50_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds with and without the re-read")
    ap.add_argument("--queries", type=int, default=20, help="searches per round")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from m3search import Collection, M3Encoder
    from m3search.testing import BUILTIN_TEXTS, build_random_model

    work = tempfile.mkdtemp(prefix="m3-shared-sync-")
    build_random_model(f"{work}/model", seed=0)
    enc = M3Encoder.from_pretrained(f"{work}/model", device="cpu", dtype="float32")
    texts = [f"{BUILTIN_TEXTS[i % len(BUILTIN_TEXTS)]} {i}" for i in range(args.docs)]
    q = enc.encode(["fox river bank"])
    print(f"{args.docs} documents, {args.rounds} x {args.queries} searches per cell, k = 10")
    print(
        f"{'engine':<14}{'mode':<8}{'p50 with re-read ms':>21}{'p50 without ms':>16}{'ratio':>7}{'manifest read ms':>18}"
    )
    for name, loc in (("qdrant-local", f"qdrant+local://{work}/q/col"), ("milvus-lite", f"{work}/m.db")):
        col = Collection.create(loc, model=enc)
        col.add(texts, ids=[str(i) for i in range(args.docs)])
        eng = col.engine
        for mode in ("dense", "all"):

            def search(col=col, mode=mode):
                col.search_batch(["fox river bank"], mode=mode, query_embeddings=q)

            search()  # warm
            with_, without = [], []
            for _ in range(args.rounds):
                eng.shared = True
                with_.append(_p50_ms(search, args.queries))
                eng.shared = False
                without.append(_p50_ms(search, args.queries))
            eng.shared = True
            read = _p50_ms(eng.read_manifest, args.queries)
            a, b = statistics.median(with_), statistics.median(without)
            print(f"{name:<14}{mode:<8}{a:>21.2f}{b:>16.2f}{a / b:>7.2f}{read:>18.2f}", flush=True)
        col.close()


if __name__ == "__main__":
    main()
