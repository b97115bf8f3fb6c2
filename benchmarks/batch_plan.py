"""The encoder's batch plan: fill-to-budget (before) vs the cheapest cut (now), same texts, same run.

Why: a batch is padded to its longest text, so filling each batch to the token budget pads
mixed-length passages to ~2x their real tokens. ``M3Encoder.plan_batches`` now cuts the
length-sorted texts where padding costs more than a forward pass. This measures CPU ms per
text for cranfield passages and queries under both plans, in groups of 16 and 32 (what the
server's rounds and a small ``Collection.add`` see), on the proxy model by default.

Usage (repository root; run nothing else heavy meanwhile)::

    python benchmarks/batch_plan.py [--model PATH] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("M3SEARCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def fill_to_budget(enc, lengths: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
    """The plan before 2026-12-03: longest first, each batch filled up to the token budget."""
    order = np.argsort(-lengths, kind="stable")
    batches, start, n = [], 0, len(order)
    while start < n:
        longest = int(lengths[order[start]])
        size = max(1, min(batch_size or n, enc.token_budget // max(longest, 1), n - start))
        batches.append(order[start : start + size])
        start += size
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "bge-m3-proxy"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from m3search import M3Encoder

    enc = M3Encoder.from_pretrained(args.model)
    data = SHARED / "data" / "cranfield"
    docs = [(d["title"] + " " + d["text"]).strip() for d in map(json.loads, (data / "corpus.jsonl").open())][:64]
    queries = [json.loads(line)["text"] for line in (data / "queries.jsonl").open()][:64]
    now = enc.plan_batches
    print(f"model {args.model}, dtype {enc.dtype}, torch threads per encode: default, CPU ms per text (process time)")
    print("| texts | group | plan | batches | padded / real tokens | CPU ms per text |")
    print("|---|---|---|---|---|---|")
    enc.encode(docs[:4])
    for name, texts in (("passages", docs), ("queries", queries)):
        ids, _ = enc.tokenize(texts, enc.max_length)
        lengths = np.array([len(x) for x in ids])
        for group in (16, 32):
            for plan_name, plan in (
                ("fill to budget", lambda ls, bs=None: fill_to_budget(enc, ls, bs)),
                ("cheapest cut", now),
            ):
                enc.plan_batches = plan
                batches = [plan(lengths[a : a + group]) for a in range(0, len(texts), group)]
                padded = sum(
                    len(b) * lengths[a : a + group][b].max()
                    for a, bs in zip(range(0, len(texts), group), batches)
                    for b in bs
                )
                c0 = time.process_time()
                for _ in range(args.repeats):
                    for a in range(0, len(texts), group):
                        enc.encode(texts[a : a + group], warn_truncation=False)
                ms = 1000 * (time.process_time() - c0) / (args.repeats * len(texts))
                nb = sum(len(b) for b in batches)
                print(
                    f"| {name} | {group} | {plan_name} | {nb} | {padded / lengths.sum():.2f} | {ms:.1f} |", flush=True
                )
    enc.plan_batches = now


if __name__ == "__main__":
    main()
