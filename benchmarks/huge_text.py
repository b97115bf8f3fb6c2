"""One huge text (10 MB by default) through the windowed encoder: memory stays bounded.

What it measures, and why this way:

* The model is the tiny random test model (``m3search.testing.build_random_model``:
  2 layers, hidden 64, 512 positions), so the run is about the pipeline's memory, not
  the transformer's speed. The text is cranfield abstracts repeated up to the size.
* :meth:`M3Encoder.iter_windows` tokenises the text once, plans its windows, and
  yields the windows' embeddings in pieces of ``--chunk-tokens`` tokens; each piece is
  dropped after its sizes are counted, as a store that writes piece by piece would.
* Memory: ``VmRSS`` from ``/proc/self/status`` after loading, after tokenising (the
  first piece's arrival), and after every piece; the peak is ``getrusage``'s
  ``ru_maxrss`` for the whole process (this script runs alone in its process). What the
  same input would take if held whole (``encode_windows``) is computed from the counts.

Usage: ``nice -n 5 python benchmarks/huge_text.py [--mb 10] [--no-write]``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=10.0, help="text size in MB of UTF-8 (default 10)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=446, help="content tokens between window starts (default 446)")
    ap.add_argument("--chunk-tokens", type=int, default=1 << 18, help="tokens per yielded piece (default 262144)")
    ap.add_argument(
        "--max-pieces", type=int, help="stop after this many pieces (memory is measured; time is then partial)"
    )
    ap.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    args = ap.parse_args(argv)

    import numpy as np

    from m3search import M3Encoder
    from m3search.testing import build_random_model
    from m3search.windows import plan_windows

    corpus = REPO.parent / "shared" / "data" / "cranfield" / "corpus.jsonl"
    docs = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    target = int(args.mb * 1e6)
    parts, size, i = [], 0, 0
    while size < target:
        parts.append(docs[i % len(docs)])
        size += len(parts[-1].encode()) + 1
        i += 1
    text = " ".join(parts)
    del parts
    with tempfile.TemporaryDirectory() as tmp:
        enc = M3Encoder.from_pretrained(
            str(build_random_model(Path(tmp) / "tiny", seed=0)), device="cpu", dtype="float32"
        )
        enc.encode(["warm-up"])
        rss_loaded = _rss_mib()
        t0 = time.perf_counter()
        pieces = enc.iter_windows(
            [text], window=args.window, stride=args.stride, chunk_tokens=args.chunk_tokens, show_progress=True
        )
        tokenised_s, rss_tokenised = time.perf_counter() - t0, _rss_mib()
        windows = tokens = colbert_bytes = sparse_bytes = n_pieces = 0
        rss_pieces = []
        for piece in pieces:
            e = piece.embeddings
            windows += len(piece.doc)
            tokens += int(e.n_tokens.sum())
            colbert_bytes += e.colbert.nbytes
            sparse_bytes += e.sparse.data.nbytes + e.sparse.indices.nbytes + e.sparse.indptr.nbytes
            n_pieces += 1
            del piece, e
            rss_pieces.append(_rss_mib())
            if args.max_pieces and n_pieces >= args.max_pieces:
                break
        total_s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        measured = dict(windows=windows, tokens=tokens, pieces=n_pieces, rss_loaded=rss_loaded, peak=peak)
        measured.update(rss_tokenised=rss_tokenised, rss_pieces=rss_pieces, tokenised_s=tokenised_s, total_s=total_s)
        print(json.dumps(measured), flush=True)  # before the re-tokenisation below, which a shared machine may kill
        n_content = len(enc.tokenizer.encode(text, add_special_tokens=False).ids)  # after the peak is read
    planned = len(plan_windows(np.array([n_content]), args.window - 2, args.stride).doc)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    whole = (colbert_bytes + sparse_bytes + windows * enc.hidden_size * 4) / 2**20 * planned / windows
    lines = [
        f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, 2 shared CPUs (load `{uptime}`). "
        f"Command: `nice -n 5 python benchmarks/huge_text.py {' '.join(argv)}`. One text of {len(text):,} characters "
        f"({len(text.encode()) / 1e6:.1f} MB UTF-8, cranfield abstracts repeated), tiny random model (2 layers, "
        f"hidden 64), window {args.window}, stride {args.stride}, token budget {enc.token_budget}, pieces of "
        f"{args.chunk_tokens:,} tokens; all three outputs. RSS = VmRSS; peak = getrusage ru_maxrss of the process.",
        "",
        "| windows encoded (of planned) | tokens encoded | pieces | tokenise + plan s | total s | RSS loaded | RSS after tokenising | "
        "max RSS between pieces | peak RSS | all outputs if held whole (estimated) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {windows:,} (of {planned:,}) | {tokens:,} | {n_pieces} | {tokenised_s:.0f} | {total_s:.0f} | {rss_loaded:.0f} MiB | "
        f"{rss_tokenised:.0f} MiB | {max(rss_pieces):.0f} MiB | {peak:.0f} MiB | {whole:.0f} MiB |",
        "",
    ]
    publish(
        "huge_text.py", "One 10 MB text, windowed (`benchmarks/huge_text.py`)", "\n".join(lines), no_write=args.no_write
    )


if __name__ == "__main__":
    main()
