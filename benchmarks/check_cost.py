"""What this round's two new checks cost, beside the work they guard (issue 11 / hostile input).

* ``collection._non_finite``: the NaN / infinity check on a batch's encoder output before it is written, timed
  beside the encode of the same batch (passages of a BEIR corpus, the proxy model by default).
* ``encoder.weights_fingerprint``: the sampled hash of the weights file that every model check reads once per
  process, beside hashing the whole file (what it avoids).

    PYTHONPATH=src python benchmarks/check_cost.py --model ../shared/models/bge-m3-proxy \
        --corpus ../shared/data/cranfield/corpus.jsonl --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "bge-m3-proxy"))
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "cranfield" / "corpus.jsonl"))
    ap.add_argument("--batch", type=int, default=32, help="passages per encode")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from m3search import M3Encoder
    from m3search.collection import _non_finite
    from m3search.encoder import _WEIGHT_FILES, weights_fingerprint

    enc = M3Encoder.from_pretrained(args.model, device="cpu")
    with open(args.corpus, encoding="utf-8") as f:
        texts = [(d.get("title", "") + " " + d["text"]).strip() for d in map(json.loads, f)][: args.batch]
    enc.encode(texts)  # warm-up
    encode_s, check_s = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        emb = enc.encode(texts)
        t1 = time.perf_counter()
        assert _non_finite(emb) is None
        t2 = time.perf_counter()
        encode_s.append(t1 - t0)
        check_s.append(t2 - t1)
    tokens = int(emb.colbert.shape[0])
    print(f"{platform.processor() or platform.machine()}; model {args.model} ({enc.dtype}), {len(texts)} passages")
    print("| what | median s | share |")
    print("|---|---|---|")
    e, c = sorted(encode_s)[len(encode_s) // 2], sorted(check_s)[len(check_s) // 2]
    print(f"| encode {len(texts)} passages ({tokens:,} ColBERT vectors) | {e:.4f} | 100 % |")
    print(f"| `_non_finite` on its output | {c:.6f} | {100 * c / e:.3f} % |")

    weights = next(Path(args.model) / n for n in _WEIGHT_FILES if (Path(args.model) / n).is_file())
    fp_s, full_s = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        weights_fingerprint(args.model)
        t1 = time.perf_counter()
        h = hashlib.sha256()
        with open(weights, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        t2 = time.perf_counter()
        fp_s.append(t1 - t0)
        full_s.append(t2 - t1)
    fp, full = sorted(fp_s)[len(fp_s) // 2], sorted(full_s)[len(full_s) // 2]
    size = weights.stat().st_size / 2**20
    print(f"| `weights_fingerprint` of {weights.name} ({size:,.0f} MiB, page cache warm) | {fp:.4f} | - |")
    print(f"| sha256 of the whole file (what it avoids) | {full:.4f} | {full / fp:.0f}x the fingerprint |")


if __name__ == "__main__":
    main()
