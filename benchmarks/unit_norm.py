"""How far from norm 1 real BGE-M3-layout vectors are: the evidence behind ``collection.UNIT_NORM_TOLERANCE``,
the bound ``add(embeddings=)`` and ``search(query_embeddings=)`` hold given dense and ColBERT vectors to.

Prints max |L2 norm - 1| over the dense and ColBERT vectors of a corpus's passages encoded by a model in fp32
and bf16, the same vectors rounded to float16 and bfloat16 (how callers store them), and random 1024-wide vectors
normalized in float16 / bfloat16 arithmetic (a half-precision pipeline such as FlagEmbedding's fp16), beside the
tolerance.

    PYTHONPATH=src python benchmarks/unit_norm.py --model ../shared/models/bge-m3-proxy \
        --corpus ../shared/data/cranfield/corpus.jsonl --passages 64
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def worst(x: np.ndarray) -> float:
    """max |L2 norm - 1| over the rows of ``x``, computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.abs(np.linalg.norm(x, axis=1) - 1).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "bge-m3-proxy"))
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "cranfield" / "corpus.jsonl"))
    ap.add_argument("--passages", type=int, default=64)
    args = ap.parse_args()

    import torch

    from m3search import M3Encoder
    from m3search.collection import UNIT_NORM_TOLERANCE

    with open(args.corpus, encoding="utf-8") as f:
        texts = [(d.get("title", "") + " " + d["text"]).strip() for d in map(json.loads, f)][: args.passages]
    print(f"machine: {platform.processor() or platform.machine()}; model {args.model}; {len(texts)} passages")
    print("| vectors | dense max abs(norm - 1) | ColBERT max abs(norm - 1) |\n|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        emb = M3Encoder.from_pretrained(args.model, device="cpu", dtype=dtype).encode(texts)
        print(f"| encoder output, model in {dtype} | {worst(emb.dense):.2e} | {worst(emb.colbert):.2e} |")
        for store in (torch.float16, torch.bfloat16):
            d, c = (torch.from_numpy(x).to(store).float().numpy() for x in (emb.dense, emb.colbert))
            print(f"| that, stored as {str(store)[6:]} | {worst(d):.2e} | {worst(c):.2e} |")
    rng = np.random.default_rng(0)
    for half in (torch.float16, torch.bfloat16):
        x = torch.from_numpy(rng.standard_normal((4096, 1024)).astype(np.float32)).to(half)
        x = x / x.norm(dim=1, keepdim=True)  # normalized in half precision
        print(f"| 4,096 random 1024-wide, normalized in {str(half)[6:]} | {worst(x.float().numpy()):.2e} | - |")
    print(f"\nUNIT_NORM_TOLERANCE = {UNIT_NORM_TOLERANCE}")


if __name__ == "__main__":
    main()
