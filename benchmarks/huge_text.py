"""One huge text (10 MB by default) stored through ``Collection.add``: memory stays bounded.

What it measures, and why this way:

* The model is the tiny random test model (``m3search.testing.build_random_model``:
  2 layers, hidden 64, 512 positions), so the run is about the pipeline's memory, not
  the transformer's speed. The text is cranfield abstracts repeated up to the size.
* ``Collection.add([text])`` into an embedded (Qdrant Edge) collection: the text is
  tokenised once, its windows encoded in pieces of ``PIECE_BYTES`` of ColBERT output and
  written piece by piece (``Engine.upsert_long``: windows first, the head window last).
  ``--piece-mb`` sets the piece size; the default here, 16 MiB, is 65,536 tokens of the tiny
  model's 64-d vectors: the token count a 1024-d model (bge-m3) gets from the library's
  default of 256 MiB, so the number of pieces is bge-m3's.
* Memory: ``VmRSS`` and ``RssAnon`` (the heap, without Qdrant Edge's memory-mapped files)
  sampled every 0.2 s by a thread during the call; the peak is ``getrusage``'s ``ru_maxrss``
  of the whole process (this script runs alone in its process). What the same document would
  take held whole is computed from the stored counts.
* ``--migrate``: then ``m3search.migrate`` copies the collection to a new folder from its
  stored vectors, sampled the same way: its heap growth beside the ingest's, same document,
  same run (migrate reads a long document a range of windows at a time).

Usage: ``nice -n 5 python benchmarks/huge_text.py [--mb 10] [--migrate] [--no-write]``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def _rss_mib(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _sampled(call) -> tuple[float, float, float]:
    """Run ``call()``: (seconds, max VmRSS, max RssAnon growth over its start), sampled every 0.2 s."""
    anon0, samples, stop = _rss_mib("RssAnon"), [], threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append((_rss_mib(), _rss_mib("RssAnon")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return seconds, max((v for v, _ in samples), default=0), max((a for _, a in samples), default=anon0) - anon0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=10.0, help="text size in MB of UTF-8 (default 10)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=446, help="content tokens between window starts (default 446)")
    ap.add_argument("--piece-mb", type=float, default=16.0, help="ColBERT MiB per written piece (default 16)")
    ap.add_argument("--migrate", action="store_true", help="also migrate the collection, memory sampled alike")
    ap.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    args = ap.parse_args(argv)

    import m3search.collection as collection
    from m3search import Collection, M3Encoder
    from m3search.testing import build_random_model

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
    collection.PIECE_BYTES = int(args.piece_mb * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        enc = M3Encoder.from_pretrained(
            str(build_random_model(Path(tmp) / "tiny", seed=0)), device="cpu", dtype="float32"
        )
        enc.encode(["warm-up"])
        col = Collection.create(Path(tmp) / "col", model=enc, window=args.window, stride=args.stride)
        col.add(["warm-up"], ids=["warm-up"])
        rss_loaded = _rss_mib()
        total_s, max_rss, add_heap = _sampled(lambda: col.add([text], ids=["huge"], show_progress=True))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec = col.get("huge")[0]
        windows, stored = rec.windows, col.engine._count(None, docs_only=False)
        per_token = 4 * col.schema.colbert_dim
        piece_tokens = max(args.window, collection.PIECE_BYTES // per_token)
        first, last = rec.spans[0], rec.spans[-1]
        assert rec.text == text and first[0] == 0 and last[1] >= len(text.rstrip()) - 1, "stored text or spans wrong"
        n_tokens = len(enc.tokenizer.encode(text, add_special_tokens=False).ids)  # after the peak is read
        col.close()
        if args.migrate:
            from m3search.migrate import migrate

            moved: dict = {}
            migrate_s, migrate_rss, migrate_heap = _sampled(
                lambda: moved.update(migrate(Path(tmp) / "col", Path(tmp) / "copy"))
            )
            assert moved["copied"] == 2, moved
    tokens = n_tokens + 2 * windows  # content and specials of every window, overlap counted once per window
    tokens += (windows - 1) * (args.window - 2 - args.stride)
    whole = (tokens * per_token + windows * (enc.hidden_size * 4 + 12 * args.window)) / 2**20
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, 2 CPUs shared with other jobs "
        f"(load `{uptime}`). Command: `nice -n 5 python benchmarks/huge_text.py {' '.join(argv)}`. One text of "
        f"{len(text):,} characters ({len(text.encode()) / 1e6:.1f} MB UTF-8, cranfield abstracts repeated) "
        f"through `Collection.add` into an embedded collection; tiny random model (2 layers, hidden 64), window "
        f"{args.window}, stride {args.stride}, token budget {enc.token_budget}, pieces of {piece_tokens:,} tokens "
        "(`PIECE_BYTES` "
        f"{args.piece_mb:g} MiB); RSS = VmRSS sampled every 0.2 s; peak = getrusage ru_maxrss of the process.",
        "",
        "| windows stored | points stored | tokens encoded (approx.) | pieces | total s | windows/s | RSS loaded | "
        "max RSS during add | peak RSS | the document's outputs if held whole (estimated) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {windows:,} | {stored:,} | {tokens:,} | {-(-tokens // piece_tokens)} | {total_s:.0f} | "
        f"{windows / total_s:.1f} | {rss_loaded:.0f} MiB | {max_rss:.0f} MiB | {peak:.0f} MiB | "
        f"{whole:.0f} MiB |",
        "",
    ]
    if args.migrate:
        lines += [
            "Same document, same run: heap (`RssAnon`) growth over the call's start, sampled every 0.2 s.",
            "",
            "| call | seconds | max RSS | heap growth |",
            "|---|---|---|---|",
            f"| `Collection.add` | {total_s:.0f} | {max_rss:.0f} MiB | {add_heap:.0f} MiB |",
            f"| `migrate` to a new folder | {migrate_s:.0f} | {migrate_rss:.0f} MiB | {migrate_heap:.0f} MiB |",
            "",
        ]
    publish(
        "huge_text.py",
        "One huge text through Collection.add (`benchmarks/huge_text.py`)",
        "\n".join(lines),
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()
