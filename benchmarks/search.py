"""Search benchmark on synthetic vectors of bge-m3's shapes: ingest, latency, bytes, scale.

What it measures, and why this way:

* Data: bge-m3's output shapes without running bge-m3 (encoding 100k documents with
  the real model would take days on 2 CPU cores). Dense: 1024-d, L2-normalized. Sparse:
  60-150 distinct terms per document drawn from a Zipf(1.1) distribution over a 250k
  vocabulary, positive weights. ColBERT: 16-256 normalized 1024-d token vectors per
  document (mean 136). Queries are planted on a source document (a noisy copy of its
  dense vector, half of its 5-20 terms and half of its 8-32 tokens, the rest random),
  so each query has a clear best match, as real ones do.
* Ingest goes through :meth:`Collection.add` with precomputed embeddings, at the
  collection's defaults (float16 ColBERT on disk, 128 documents per write). The ColBERT
  vectors of a stage are generated lazily per written batch (they would not fit in
  RAM); generation time is measured and subtracted. ``optimize`` (HNSW build), which
  ``add`` runs at its end, is timed on its own.
* Latency: one query per call (``search_batch([q], query_embeddings=...)``, so no
  encoding), ``k=10``, default ``candidates``; p50/p95 per mode over ``--queries``
  queries after a warm-up.
* Engine-native baseline, same data, same run: ONE Qdrant Edge query that prefetches
  dense top-C and sparse top-C and re-ranks their union by MaxSim on ``colbert``
  (``QueryRequest(prefetches=[...], query=Nearest(colbert))``), payload included. Ours
  (``mode="all"``) gathers the same pool with its ColBERT scores in one request, scores
  every candidate's dense and sparse exactly and fuses with BGE-M3's weights; ours
  ``colbert`` is the native query's ranking function through our path. Each query is
  first run once natively, untimed (it reads the candidates' ColBERT pages), then each
  contender ``--rounds`` times, rotating who goes first. Wall time and the process's
  CPU time (all threads) are both reported; CPU time is the cost itself, which other
  jobs on the cores inflate far less. recall@10 of the native list against ours is
  reported (``all`` ranks differently by design: MaxSim alone vs the weighted fusion).
* Bytes per document: sizes of the engine's files per component (``du``, allocated
  blocks) after the final optimize, divided by the number of documents.
* Largest corpus: computed from those measured bytes: RAM holds everything but the
  ColBERT storage (on disk, memory-mapped); the disk holds all of it.

Corpus sizes are checkpoints of ONE growing collection (``--sizes 10000 30000 100000``):
each stage adds documents, then measures. ``--deadline-min`` stops before a stage whose
ingest, extrapolated from the rate so far, would end after the deadline.

Usage (repository root, project venv)::

    python benchmarks/search.py --sizes 10000            # ~5 min on 2 idle cores
    python benchmarks/search.py --sizes 10000 30000 100000 --deadline-min 120   # ~40 min, 47 GB of disk at peak (28.5 GB kept)
    python benchmarks/search.py --sizes 500 --queries 10 --no-write # smoke run

Writes its section of ``benchmarks/RESULTS.md`` (between ``search.py`` markers) and the
raw numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
from results import publish, run_or_replay  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

DIM = 1024
VOCAB = 250_002  # bge-m3's vocabulary (ids 0-3 are special and never weighted)
ZIPF_S = 1.1
DOC_TERMS = (60, 150)
DOC_TOKENS = (16, 256)
QUERY_TERMS = (5, 20)
QUERY_TOKENS = (8, 32)
MODES = ("dense", "sparse", "colbert", "dense+sparse", "dense+colbert", "all")


# --------------------------------------------------------------------------- synthetic data


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Zipf:
    """Term ids with Zipf-distributed frequencies over the 250k vocabulary (ranks shuffled onto ids)."""

    def __init__(self, rng: np.random.Generator, s: float = ZIPF_S) -> None:
        p = 1.0 / np.arange(1, VOCAB - 4 + 1, dtype=np.float64) ** s
        self.cdf = np.cumsum(p / p.sum())
        self.ids = rng.permutation(np.arange(4, VOCAB, dtype=np.int64))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        r = np.searchsorted(self.cdf, rng.random(n), side="right")
        return self.ids[np.minimum(r, len(self.ids) - 1)]


def sparse_rows(rng: np.random.Generator, zipf: Zipf, counts: np.ndarray) -> sp.csr_matrix:
    """CSR with ``counts[i]`` distinct Zipf-drawn terms in row i (draws twice as many, keeps the first distinct)."""
    n = len(counts)
    draws = 2 * counts + 8
    row = np.repeat(np.arange(n), draws)
    pos = np.arange(len(row)) - np.repeat(np.cumsum(draws) - draws, draws)
    term = zipf.draw(rng, len(row))
    o = np.lexsort((pos, term, row))  # first occurrence of each (row, term)
    row, term, pos = row[o], term[o], pos[o]
    first = np.ones(len(row), bool)
    first[1:] = (row[1:] != row[:-1]) | (term[1:] != term[:-1])
    row, term, pos = row[first], term[first], pos[first]
    o = np.lexsort((pos, row))  # back to draw order within each row
    row, term = row[o], term[o]
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    keep = rank < counts[row]
    row, term = row[keep], term[keep]
    weight = rng.uniform(0.01, 0.35, len(row)).astype(np.float32)
    m = sp.csr_matrix((weight, (row, term)), shape=(n, VOCAB), dtype=np.float32)
    m.sort_indices()
    return m


def doc_tokens(seed: int, i: int, n: int) -> np.ndarray:
    """Document i's ColBERT vectors, reproducible from (seed, i) alone."""
    rng = np.random.default_rng([seed, 1, i])
    return _normalize(rng.standard_normal((n, DIM), dtype=np.float32))


class SyntheticCorpus:
    """Documents ``[start, start + n)`` of the synthetic corpus, as lazy M3Embeddings.

    Dense and sparse are built up front (4 KB and ~1 KB per document); ColBERT vectors
    are generated when :meth:`Collection.add` slices a write batch (``gen_s`` sums that
    time so it can be subtracted from ingest time).
    """

    def __init__(self, seed: int, start: int, n: int) -> None:
        from m3search.encoder import M3Embeddings

        self._M3 = M3Embeddings
        rng = np.random.default_rng([seed, 0, start])
        self.seed, self.start = seed, start
        self.dense = _normalize(rng.standard_normal((n, DIM), dtype=np.float32))
        self.sparse = sparse_rows(
            rng, Zipf(np.random.default_rng([seed, 9])), rng.integers(DOC_TERMS[0], DOC_TERMS[1] + 1, n)
        )
        self.lengths = rng.integers(DOC_TOKENS[0], DOC_TOKENS[1] + 1, n)
        self.colbert_offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        # Shape-only stand-in (no memory): Collection checks that ColBERT output is present.
        self.colbert = np.broadcast_to(np.float32(0), (int(self.colbert_offsets[-1]), DIM))
        self.n_tokens = self.lengths + 1
        self.gen_s = 0.0

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, key: slice):
        t = time.perf_counter()
        idx = np.arange(len(self))[key]
        col = np.concatenate([doc_tokens(self.seed, self.start + int(i), int(self.lengths[i])) for i in idx])
        lens = self.lengths[idx]
        out = self._M3(
            self.dense[idx], self.sparse[idx], col, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), lens + 1
        )
        self.gen_s += time.perf_counter() - t
        return out


def planted_queries(corpus: SyntheticCorpus, n: int, seed: int):
    """``n`` queries, each a noisy partial copy of one document of ``corpus`` (its index is returned too)."""
    from m3search.encoder import M3Embeddings

    rng = np.random.default_rng([seed, 2])
    zipf = Zipf(np.random.default_rng([seed, 9]))
    src = rng.choice(len(corpus), n, replace=False)
    dense = _normalize(corpus.dense[src] + 0.04 * rng.standard_normal((n, DIM), dtype=np.float32))
    n_terms = rng.integers(QUERY_TERMS[0], QUERY_TERMS[1] + 1, n)
    random_terms = sparse_rows(rng, zipf, n_terms - n_terms // 2)
    rows, cols, vals = [], [], []
    for j, i in enumerate(src):
        a, b = corpus.sparse.indptr[i], corpus.sparse.indptr[i + 1]
        pick = rng.choice(b - a, min(n_terms[j] // 2, b - a), replace=False) + a
        rows += [j] * len(pick)
        cols += corpus.sparse.indices[pick].tolist()
        vals += rng.uniform(0.05, 0.35, len(pick)).tolist()
    shared = sp.csr_matrix((vals, (rows, cols)), shape=(n, VOCAB), dtype=np.float32)
    sparse = shared.maximum(random_terms).tocsr()
    sparse.sort_indices()
    lens = rng.integers(QUERY_TOKENS[0], QUERY_TOKENS[1] + 1, n)
    toks = []
    for j, i in enumerate(src):
        d = doc_tokens(corpus.seed, corpus.start + int(i), int(corpus.lengths[i]))
        half = lens[j] // 2
        copied = d[rng.integers(0, len(d), half)] + 0.3 / np.sqrt(DIM) * rng.standard_normal(
            (half, DIM), dtype=np.float32
        )
        toks.append(_normalize(np.concatenate([copied, rng.standard_normal((lens[j] - half, DIM), dtype=np.float32)])))
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return M3Embeddings(dense, sparse, np.concatenate(toks), offs, lens + 1), corpus.start + src


# --------------------------------------------------------------------------- measuring


def build_model(folder: Path) -> Path:
    """A 1-layer random model with bge-m3's hidden size and vocabulary (the manifest needs one)."""
    from m3search.testing import build_random_model

    if not (folder / "config.json").is_file():
        build_random_model(
            folder,
            hidden_size=DIM,
            num_hidden_layers=1,
            num_attention_heads=16,
            intermediate_size=64,
            vocab_size=VOCAB,
            tokenizer_vocab=2000,
        )
    return folder


def _du(path: Path) -> int:
    """Allocated bytes under ``path`` (what the files really take on disk)."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) * 1024


def storage_bytes(root: Path) -> dict[str, int]:
    """Bytes per component of a Qdrant Edge collection folder, summed over segments."""
    segs = [p for p in (root / "shard" / "segments").iterdir() if p.is_dir()]
    parts: dict[str, int] = {}
    for seg in segs:
        for p in seg.iterdir():
            name = p.name
            key = {
                "vector_storage-dense": "dense vectors",
                "vector_index-dense": "dense HNSW",
                "vector_storage-colbert": "ColBERT vectors",
                "vector_index-colbert": "ColBERT index (none: m=0)",
                "vector_storage-sparse": "sparse vectors",
                "vector_index-sparse": "sparse inverted index",
                "payload_storage": "payload (id, text, metadata)",
                "payload_index": "payload index",
                "id_tracker": "id tracker",
            }.get(name, "other segment files")
            parts[key] = parts.get(key, 0) + _du(p)
    parts["write-ahead log"] = _du(root / "shard" / "wal")
    parts["total (folder)"] = _du(root)
    return parts


def disk_read_mb_s(folder: Path, mib: int = 512) -> float:
    """Uncached read throughput of the disk holding ``folder``: dd with O_DIRECT in 256 KiB blocks
    (about one document's ColBERT vectors, 136 x 2 KiB)."""
    f = folder / "disk-probe.bin"
    try:
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={mib}", "oflag=direct"], check=True, capture_output=True
        )
        t = time.perf_counter()
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=256k", "iflag=direct"], check=True, capture_output=True)
        return mib * 2**20 / (time.perf_counter() - t) / 1e6
    finally:
        f.unlink(missing_ok=True)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def native_request(qe, qv, c: int, k: int):
    """Qdrant Edge's own hybrid query: prefetch dense top-c + sparse top-c, MaxSim re-rank on colbert."""
    pre = [qe.Prefetch(limit=c, query=qe.Query.Nearest(qv.dense.tolist(), using="dense"))]
    if len(qv.sparse_indices):
        vec = qe.SparseVector(qv.sparse_indices.tolist(), qv.sparse_values.tolist())
        pre.append(qe.Prefetch(limit=c, query=qe.Query.Nearest(vec, using="sparse")))
    return qe.QueryRequest(
        limit=k, prefetches=pre, query=qe.Query.Nearest(qv.colbert, using="colbert"), with_payload=True
    )


def _ratios(o: dict) -> str:
    """p50 ratio (ratio of means) [median of per-query ratios] {ratio of mean CPU times}; '-' where a run predates it."""
    paired = f"{o['ratio_paired_median']:.2f}x" if "ratio_paired_median" in o else "-"
    cpu = f"{o['ratio_cpu_mean']:.2f}x" if "ratio_cpu_mean" in o else "-"
    return f"{o['ratio_p50']:.2f}x ({o['ratio_mean']:.2f}x) [{paired}] {{{cpu}}}"


def _rounds(latency: dict) -> str:
    n = latency.get("rounds", 1)
    return f", {n} rounds" if n > 1 else ""


def measure_latency(col, qemb, src: np.ndarray, n_warm: int, c: int, rounds: int = 3) -> dict[str, Any]:
    """p50/p95 ms per mode, then ours-all vs the native query alternating, with recall@10."""
    import qdrant_edge as qe

    from m3search.engines.shapes import QueryVectors

    nq = len(qemb)
    # Each query's embeddings are cut out before any timing, as the native query's vectors are.
    per_query = [qemb[i] for i in range(nq)]
    out: dict[str, Any] = {"modes": {}}
    for i in range(min(n_warm, nq)):
        col.search_batch(["q"], mode="all", query_embeddings=per_query[i])
    for mode in MODES:
        times = []
        for i in range(nq):
            t = time.perf_counter()
            col.search_batch(["q"], mode=mode, candidates=c, query_embeddings=per_query[i])
            times.append((time.perf_counter() - t) * 1000)
        out["modes"][mode] = {"p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95), "mean_ms": float(np.mean(times))}
        print(
            f"    {mode:14s} p50 {out['modes'][mode]['p50_ms']:8.1f} ms   p95 {out['modes'][mode]['p95_ms']:8.1f} ms",
            flush=True,
        )
    shard = col.engine.shard
    names = ["ours_all", "ours_colbert", "native"]
    times: dict[str, list[float]] = {n: [] for n in names}
    # CPU time of this process (all its threads, Qdrant's included) per call: the cost itself,
    # which other jobs on the cores inflate far less than they inflate wall time.
    cpu: dict[str, list[float]] = {n: [] for n in names}
    rec_all, rec_colbert, native_at_1, first_touch = [], [], [], []
    for i in range(nq):
        qv = QueryVectors.from_embeddings(qemb, i)
        res = {}
        # One untimed native run first: it reads this query's candidates' ColBERT pages (which
        # all three contenders read), so the timed runs compare compute, not who paid the disk.
        t = time.perf_counter()
        shard.query(native_request(qe, qv, c, 10))
        first_touch.append((time.perf_counter() - t) * 1000)
        for r in range(rounds):  # each round rotates who runs first (what stays: CPU caches)
            for name in names[(i + r) % 3 :] + names[: (i + r) % 3]:
                t, t_cpu = time.perf_counter(), time.process_time()
                if name == "native":
                    res[name] = [p.payload["id"] for p in shard.query(native_request(qe, qv, c, 10))]
                else:
                    mode = name.split("_")[1]
                    res[name] = [
                        h.id for h in col.search_batch(["q"], mode=mode, candidates=c, query_embeddings=per_query[i])[0]
                    ]
                times[name].append((time.perf_counter() - t) * 1000)
                cpu[name].append((time.process_time() - t_cpu) * 1000)
        rec_all.append(len(set(res["ours_all"]) & set(res["native"])) / 10)
        rec_colbert.append(len(set(res["ours_colbert"]) & set(res["native"])) / 10)
        native_at_1.append(res["native"][:1] == [f"d{src[i]}"])
    for name in names:
        out[name] = {
            "p50_ms": _pct(times[name], 50),
            "p95_ms": _pct(times[name], 95),
            "mean_ms": float(np.mean(times[name])),
            "cpu_mean_ms": float(np.mean(cpu[name])),
        }
    for name in ("ours_all", "ours_colbert"):
        out[name]["ratio_cpu_mean"] = out[name]["cpu_mean_ms"] / out["native"]["cpu_mean_ms"]
        out[name]["ratio_p50"] = out[name]["p50_ms"] / out["native"]["p50_ms"]
        out[name]["ratio_mean"] = out[name]["mean_ms"] / out["native"]["mean_ms"]
        # Paired: each query against itself (query costs vary 3x with their token counts).
        per_q = np.asarray(times[name]).reshape(nq, rounds).mean(1) / np.asarray(times["native"]).reshape(
            nq, rounds
        ).mean(1)
        out[name]["ratio_paired_median"] = float(np.median(per_q))
    out["rounds"] = rounds
    out["ours_all"]["native_recall_at_10"] = float(np.mean(rec_all))
    out["ours_colbert"]["native_recall_at_10"] = float(np.mean(rec_colbert))
    out["native"]["planted_at_1"] = float(np.mean(native_at_1))
    out["first_touch"] = {
        "p50_ms": _pct(first_touch, 50),
        "p95_ms": _pct(first_touch, 95),
        "mean_ms": float(np.mean(first_touch)),
    }
    print(
        f"    first touch (native, untimed in the comparison) p50 {out['first_touch']['p50_ms']:.1f} ms "
        f"p95 {out['first_touch']['p95_ms']:.1f} ms",
        flush=True,
    )
    for name in ("ours_all", "ours_colbert"):
        o = out[name]
        print(
            f"    {name} {o['p50_ms']:.1f} ms p50 vs native {out['native']['p50_ms']:.1f} ms -> {o['ratio_p50']:.2f}x "
            f"(mean {o['ratio_mean']:.2f}x, per-query median {o['ratio_paired_median']:.2f}x, "
            f"CPU time {o['cpu_mean_ms']:.1f} vs {out['native']['cpu_mean_ms']:.1f} ms -> {o['ratio_cpu_mean']:.2f}x); "
            f"native recall@10 vs {name} {o['native_recall_at_10']:.3f}",
            flush=True,
        )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from m3search import Collection, M3Encoder

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="m3search-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work / "model")
    enc = M3Encoder.from_pretrained(str(model), device="cpu", dtype="float32")
    path = work / "collection"
    shutil.rmtree(path, ignore_errors=True)
    col = Collection.create(path, model=enc)
    col._encoder = None  # not needed any more (all embeddings are precomputed): free its ~1 GB
    del enc
    engine = col.engine
    optimize_s = [0.0]
    real_optimize = engine.optimize

    def timed_optimize() -> bool:
        t = time.perf_counter()
        try:
            return real_optimize()
        finally:
            optimize_s[0] += time.perf_counter() - t

    engine.optimize = timed_optimize  # Collection.add calls it once at its end
    c = args.candidates or col.settings["candidates"]
    results: dict[str, Any] = {
        "candidates": c,
        "stages": [],
        "started": _dt.datetime.now().astimezone().isoformat(timespec="minutes"),
    }
    if args.idle:
        results["idle"] = True
    deadline = time.monotonic() + args.deadline_min * 60
    n_done, ingest_total, rate = 0, 0.0, None
    qemb = src = None
    for size in sorted(args.sizes):
        todo = size - n_done
        if rate is not None and time.monotonic() + todo / rate > deadline:
            print(
                f"[search.py] stopping before {size}: ~{todo / rate / 60:.0f} min of ingest left exceeds the deadline",
                flush=True,
            )
            results["stopped_before"] = size
            break
        corpus = SyntheticCorpus(args.seed, n_done, todo)
        if qemb is None:
            qemb, src = planted_queries(corpus, min(args.queries, len(corpus)), args.seed)
        ids = [f"d{n_done + i}" for i in range(todo)]
        optimize_s[0] = 0.0
        print(f"[search.py] ingesting {todo} documents ({n_done} -> {size})", flush=True)
        t = time.perf_counter()
        col.add([""] * todo, ids=ids, embeddings=corpus, show_progress=False)
        wall = time.perf_counter() - t
        write_s = wall - corpus.gen_s - optimize_s[0]
        n_done = size
        ingest_total += wall - corpus.gen_s
        rate = todo / max(wall - corpus.gen_s, 1e-9)
        tokens = int(corpus.lengths.sum())
        del corpus
        stage: dict[str, Any] = {
            "documents": size,
            "added": todo,
            "tokens_added": tokens,
            "write_s": write_s,
            "optimize_s": optimize_s[0],
            "generate_s_excluded": wall - write_s - optimize_s[0],
            "docs_per_s_write": todo / write_s,
            "docs_per_s_incl_optimize": todo / (write_s + optimize_s[0]),
        }
        print(
            f"  ingest {stage['docs_per_s_write']:.0f} docs/s writing, {stage['docs_per_s_incl_optimize']:.0f} docs/s "
            f"incl. optimize ({write_s:.0f} s + {optimize_s[0]:.0f} s optimize; generation {stage['generate_s_excluded']:.0f} s excluded)",
            flush=True,
        )
        engine.shard.flush()
        stage["bytes"] = storage_bytes(path)
        stage["latency"] = measure_latency(col, qemb, src, args.warmup, c, args.rounds)
        hits = col.search_batch(["q"] * len(qemb), mode="all", candidates=c, query_embeddings=qemb)
        stage["planted_doc_at_1"] = float(np.mean([bool(h) and h[0].id == f"d{s}" for h, s in zip(hits, src)]))
        stage["rss_mib"] = _rss_mib()
        stage["loadavg"] = list(os.getloadavg())
        results["stages"].append(stage)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    col.close()
    results["ingest_s_total"] = ingest_total
    results["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="minutes")
    results["loadavg_end"] = list(os.getloadavg())
    results["disk_read_mb_s"] = disk_read_mb_s(work)
    results["disk_free_bytes"] = shutil.disk_usage(work).free
    results["disk_total_bytes"] = shutil.disk_usage(work).total
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return results


def remeasure(args: argparse.Namespace) -> dict[str, Any]:
    """Latency again on the collection a ``--keep`` run left in ``--workdir`` (no re-ingest), with the
    code checked out now; appended to that run's ``--json`` as ``remeasured``.

    Why: re-ingesting 100k documents costs ~40 min; a change to the search path needs only the
    latency table again, on the very same data.
    """
    from m3search import Collection

    res = json.loads(Path(args.json).read_text())
    work = Path(args.workdir)
    col = Collection.open(work / "collection", model=str(work / "model"))
    col._encoder = None
    try:
        first = res["stages"][0]
        corpus = SyntheticCorpus(args.seed, 0, first["added"])
        qemb, src = planted_queries(corpus, min(args.queries, len(corpus)), args.seed)
        del corpus
        started = _dt.datetime.now().astimezone().isoformat(timespec="minutes")
        latency = measure_latency(col, qemb, src, args.warmup, res["candidates"], args.rounds)
        n = col.count()
    finally:
        col.close()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()
    res.setdefault("remeasured", []).append(
        {
            "documents": n,
            "latency": latency,
            "started": started,
            "commit": commit[:120],
            "loadavg": list(os.getloadavg()),
            "argv": sys.argv[1:],
        }
    )
    Path(args.json).write_text(json.dumps(res, indent=2))
    return res


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- report


def capacity(stage: dict[str, Any], ram_bytes: int, reserve: int, disk_bytes: int) -> dict[str, float]:
    """Largest corpus from measured bytes/doc: RAM holds all but ColBERT vectors; disk holds all."""
    b, n = stage["bytes"], stage["documents"]
    colbert = b.get("ColBERT vectors", 0) / n
    disk = (b["total (folder)"] - b.get("write-ahead log", 0)) / n
    ram = disk - colbert
    return {
        "ram_bytes_per_doc": ram,
        "disk_bytes_per_doc": disk,
        "max_docs_ram": (ram_bytes - reserve) / ram,
        "max_docs_disk": disk_bytes / disk,
    }


def extrapolate(res: dict[str, Any], target: int, ram_bytes: int, reserve: int) -> list[str]:
    """EXTRAPOLATION (not a measurement) from the first and last measured sizes to ``target`` documents.

    * Ingest: writing at the mean measured rate; optimize at the last stage's seconds per
      added document (a lower bound: the HNSW build is superlinear).
    * Latency: re-ranking reads a bounded candidate set (<= 2C documents), so only the
      first-stage lists grow with the corpus: the dense and sparse p50s are extended
      linearly (slope between the two sizes, floored at 0). On top, ColBERT vectors beyond
      the page cache (RAM - reserve - RAM-resident parts) are read from disk: the missed
      fraction of <= 2C candidates x bytes/doc at the measured uncached read rate. Both our
      ``all`` and the native query pay these two costs alike.
    """
    st = res["stages"]
    a, b = st[0], st[-1]
    rate = sum(s["added"] for s in st) / sum(s["write_s"] for s in st)
    opt = b["optimize_s"] / b["added"]

    def slope(mode: str) -> float:
        if b["documents"] == a["documents"]:
            return 0.0
        return max(
            0.0,
            (b["latency"]["modes"][mode]["p50_ms"] - a["latency"]["modes"][mode]["p50_ms"])
            / (b["documents"] - a["documents"]),
        )

    grow = (slope("dense") + slope("sparse")) * (target - b["documents"])
    cap = capacity(b, ram_bytes, reserve, res["disk_total_bytes"])
    colbert_per_doc = b["bytes"]["ColBERT vectors"] / b["documents"]
    cache = max(0.0, ram_bytes - reserve - cap["ram_bytes_per_doc"] * target)
    miss = max(0.0, 1 - cache / (colbert_per_doc * target))
    io_ms = miss * 2 * res["candidates"] * colbert_per_doc / (res["disk_read_mb_s"] * 1e6) * 1000
    L = b["latency"]
    ours, native = L["ours_all"]["p50_ms"] + grow + io_ms, L["native"]["p50_ms"] + grow + io_ms
    return [
        f"\n**Extrapolated to {target:,} documents (NOT measured; the run stopped at {b['documents']:,} to stay within its time cap).** "
        f"Ingest: {target / rate / 60:.0f} min writing at the measured {rate:.0f} docs/s (flat from {a['documents']:,} to "
        f"{b['documents']:,}), plus optimize >= {target * opt / 60:.0f} min ({opt * 1000:.1f} ms per added document in the last "
        f"stage; the HNSW build is superlinear). Latency: first-stage growth +{grow:.0f} ms (dense and sparse p50 extended "
        f"linearly); ColBERT storage {colbert_per_doc * target / 1e9:.1f} GB against ~{cache / 1e9:.0f} GB of page cache "
        f"(the whole machine less the reserve and the RAM-resident parts; less when other jobs run), so "
        f"~{miss:.0%} of candidate reads miss: <= {2 * res['candidates']} candidates x {colbert_per_doc / 1e3:.0f} KB at the "
        f"measured {res['disk_read_mb_s']:.0f} MB/s uncached read{' (' + res['disk_probe'] + ')' if res.get('disk_probe') else ''} = +{io_ms:.0f} ms. Estimated p50: ours `all` ~{ours:.0f} ms, "
        f"native ~{native:.0f} ms, ratio ~{ours / native:.2f}x (the shared I/O cost pulls it towards 1).",
    ]


def _load_note(res: dict[str, Any]) -> str:
    """What the load averages can and cannot say about the times.

    The benchmark alone reaches a 1-minute load of 3-4: each measurement follows an ingest
    and optimize, and a Qdrant search runs on both cores. So the load cannot tell; ``--idle``
    (whoever runs it knows whether other jobs shared the machine) records that none did.
    """
    if res.get("idle"):
        return (
            "no other job ran on the machine during this run: load above 1 is the benchmark's own ingest, "
            "optimize and two-thread Qdrant searches."
        )
    if max(s["loadavg"][0] for s in res["stages"]) >= 2.0:
        return (
            "the cores may have been shared with other jobs, so absolute times can be inflated by contention "
            "(treat them as upper bounds; ratios measured in the same run are fairer than absolute numbers)."
        )
    return "no other job competed for the 2 cores (ratios measured in the same run are still the fairest comparison)."


def report(res: dict[str, Any], argv: list[str]) -> str:
    lines = []
    lscpu = subprocess.run("lscpu | head -20", shell=True, capture_output=True, text=True).stdout
    cpu = [ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith(("Model name", "CPU(s)"))]
    load = " / ".join(f"{s['documents']:,} docs: `{' '.join(f'{x:.1f}' for x in s['loadavg'])}`" for s in res["stages"])
    lines.append(
        f"Run {res['started']} to {res['finished']} on {cpu[1]} ({cpu[0]} CPUs), {_mem_gib():.0f} GiB RAM, "
        f"no GPU. Load average (1/5/15 min) when each size was measured: {load} — {_load_note(res)}"
    )
    lines.append(
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/search.py', *argv])}`. "
        f"Synthetic bge-m3 shapes (1024-d; sparse 60-150 Zipf terms of 250k; 16-256 ColBERT tokens), "
        f"default collection settings (float16 ColBERT on disk), k=10, candidates={res['candidates']}, "
        "one query per call, no encoding."
        + (
            f" Raw numbers: `{res['raw_file']}` (this section is rebuilt from it with `--report-from`)."
            if res.get("raw_file")
            else ""
        )
        + "\n"
    )
    lines.append("Ingest (through `Collection.add` with precomputed embeddings, 128 docs per atomic write):\n")
    lines.append("| documents (stage) | docs/s writing | optimize s | docs/s incl. optimize |")
    lines.append("|---|---|---|---|")
    for s in res["stages"]:
        lines.append(
            f"| {s['documents'] - s['added']:,} -> {s['documents']:,} | {s['docs_per_s_write']:.0f} | "
            f"{s['optimize_s']:.0f} | {s['docs_per_s_incl_optimize']:.0f} |"
        )
    lines.append("\nLatency per query (ms):\n")
    head = "| mode | " + " | ".join(f"{s['documents']:,} p50 | {s['documents']:,} p95" for s in res["stages"]) + " |"
    lines.append(head)
    lines.append("|---" * (1 + 2 * len(res["stages"])) + "|")
    for m in MODES:
        cells = " | ".join(
            f"{s['latency']['modes'][m]['p50_ms']:.1f} | {s['latency']['modes'][m]['p95_ms']:.1f}"
            for s in res["stages"]
        )
        lines.append(f"| {m} | {cells} |")
    lines.append(
        "\nEach mode is a separate pass of the same queries, minutes apart: "
        "where other jobs share the cores (see the load averages), differences of a few tens of percent between "
        "modes or sizes can be contention, not the code "
        "(the per-query comparison below interleaves its three contenders to cancel that)."
    )
    lines.append(
        "\nOurs vs Qdrant Edge's native hybrid query (ONE request: prefetch dense top-C + sparse top-C, "
        "MaxSim re-rank on `colbert`, payload returned), same data, same run, the three rotating per query "
        "(rows with N rounds: each query timed N times per contender, rotating who goes first). "
        "`all` = exact dense, sparse and ColBERT scores of every candidate + weighted fusion (the target: "
        "<= 1.2x native); `colbert` = our mode with the native query's ranking function. In braces: mean CPU "
        "time of the process per query (every thread, Qdrant's included), ours / native: the cost itself, "
        "which contention from other jobs inflates far less than wall time:\n"
    )
    lines.append(
        "| documents | native p50 / p95 ms | ours `all` p50 / p95 ms | `all` / native: p50 (mean) [per-query median] {CPU time} | "
        "ours `colbert` p50 / p95 ms | `colbert` / native: p50 (mean) [per-query median] {CPU time} | native recall@10 vs `all` / vs `colbert` | "
        "planted doc at rank 1: native / `all` |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in res["stages"]:
        L = s["latency"]
        a, cb, nv = L["ours_all"], L["ours_colbert"], L["native"]
        lines.append(
            f"| {s['documents']:,}{_rounds(L)} | {nv['p50_ms']:.1f} / {nv['p95_ms']:.1f} | {a['p50_ms']:.1f} / {a['p95_ms']:.1f} | "
            f"{_ratios(a)} | {cb['p50_ms']:.1f} / {cb['p95_ms']:.1f} | "
            f"{_ratios(cb)} | {a['native_recall_at_10']:.3f} / {cb['native_recall_at_10']:.3f} | "
            f"{nv['planted_at_1']:.2f} / {s['planted_doc_at_1']:.2f} |"
        )
    for r in res.get("remeasured", []):
        L = r["latency"]
        a, cb, nv = L["ours_all"], L["ours_colbert"], L["native"]
        lines.append(
            f"| {r['documents']:,}, re-measured{' (fresh)' if r.get('source') else ''}{_rounds(L)} {r['started']} at `{r['commit'][:7]}` (load "
            f"`{' '.join(f'{x:.1f}' for x in r['loadavg'])}`) | {nv['p50_ms']:.1f} / {nv['p95_ms']:.1f} | "
            f"{a['p50_ms']:.1f} / {a['p95_ms']:.1f} | {_ratios(a)} | "
            f"{cb['p50_ms']:.1f} / {cb['p95_ms']:.1f} | {_ratios(cb)} | "
            f"{a['native_recall_at_10']:.3f} / {cb['native_recall_at_10']:.3f} | {nv['planted_at_1']:.2f} / - |"
        )
    if res.get("remeasured"):
        fresh = sorted({r["source"] for r in res["remeasured"] if r.get("source")})
        lines.append(
            "\nRe-measured rows: the same queries, latency only, with the code of the named commit; the "
            "per-mode table above is from the original run. On the kept collection (`--remeasure`)"
            + (
                ", or, where a row says so, on a fresh collection of the same seeded data: " + "; ".join(fresh)
                if fresh
                else ""
            )
            + "."
        )
    touched = [
        (r["documents"], r["latency"]["first_touch"])
        for r in res["stages"] + res.get("remeasured", [])
        if "first_touch" in r["latency"]
    ]
    if touched:
        lines.append(
            "\nIn rows with a first-touch time, each query's timed runs follow one untimed native run "
            "that pulls the candidates' ColBERT pages into the page cache (all three read the same pages), so "
            "the ratio compares compute; rows without one (older runs) had no such warm-up, and whichever "
            "contender ran first paid the disk reads, which at 100,000 documents made the ratio swing. That "
            "first touch: "
            + "; ".join(f"{n:,} docs p50 {ft['p50_ms']:.0f} ms, p95 {ft['p95_ms']:.0f} ms" for n, ft in touched)
            + " — it is paid once per query by whichever runs first, so cold, the ratio tends to 1."
        )
    lines.append(
        "\nOn synthetic vectors only the planted document is a real match; ranks 2-10 are near-ties of random "
        "vectors, so recall@10 between two different ranking functions (`all` vs MaxSim alone) is low by "
        "construction; against our `colbert` mode (same function, same candidates) it checks equivalence."
    )
    for note in res.get("notes", []):  # observations made beside the script while it ran (who, how: in the note)
        lines.append("\n" + note)
    last = res["stages"][-1]
    n = last["documents"]
    lines.append(
        f"\nBytes per document at {n:,} documents (allocated size of the engine's files / documents; "
        f"mean {last['tokens_added'] / last['added']:.0f} ColBERT tokens per document):\n"
    )
    lines.append("| component | bytes/doc | where it lives |")
    lines.append("|---|---|---|")
    for k, v in last["bytes"].items():
        where = (
            "disk (mmap, read per candidate)"
            if k.startswith("ColBERT")
            else ("disk" if k in ("write-ahead log", "total (folder)") else "RAM (Cached) / mmap")
        )
        lines.append(f"| {k} | {v / n:,.0f} | {where} |")
    cap = capacity(last, int(_mem_gib() * 2**30), 4 * 2**30, res["disk_total_bytes"])
    cap_free = res["disk_free_bytes"] / cap["disk_bytes_per_doc"] + n
    lines.append(
        f"\nLargest corpus (COMPUTED from the measured bytes/doc above, not run): RAM-resident parts "
        f"{cap['ram_bytes_per_doc']:,.0f} B/doc -> {cap['max_docs_ram'] / 1e6:.1f} M documents in {_mem_gib():.0f} GiB "
        f"less 4 GiB for the process, model and OS; on disk {cap['disk_bytes_per_doc']:,.0f} B/doc (ColBERT dominates) -> "
        f"{cap['max_docs_disk'] / 1e3:,.0f}k documents on the whole {res['disk_total_bytes'] / 2**30:.0f} GiB disk "
        f"({cap_free / 1e3:,.0f}k with the space free at the end of this run, which other jobs share). So the disk, "
        f"not RAM, bounds this machine: at most ~{min(cap['max_docs_disk'], cap['max_docs_ram']) / 1e3:,.0f}k documents "
        f"of ~136 tokens with the whole disk, ~{min(cap_free, cap['max_docs_ram']) / 1e3:,.0f}k today. "
        "Beyond the page cache ColBERT re-ranking reads ~2 KB per candidate token from disk per query."
    )
    if res.get("stopped_before"):
        lines.append(f"\nStopped before {res['stopped_before']:,} documents (deadline).")
    if n < 100_000:
        if "disk_read_mb_s" not in res:  # results from before the probe existed: measure it now
            res["disk_read_mb_s"] = disk_read_mb_s(Path(tempfile.gettempdir()))
            res["disk_probe"] = "measured when this report was built, after the run"
        lines += extrapolate(res, 100_000, int(_mem_gib() * 2**30), 4 * 2**30)
    return "\n".join(lines) + "\n"


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


TITLE = "Search (`benchmarks/search.py`)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000], help="corpus sizes (checkpoints of one growing collection)"
    )
    ap.add_argument("--queries", type=int, default=100, help="queries per mode and size")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--rounds", type=int, default=3, help="timed runs of each contender per query in the ours-vs-native comparison"
    )
    ap.add_argument("--candidates", type=int, default=None, help="default: the collection's (plan.DEFAULT_CANDIDATES)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-min", type=float, default=30.0, help="skip a stage whose ingest would end after this")
    ap.add_argument("--workdir", default=None, help="folder for the model and collection (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the collection folder")
    ap.add_argument(
        "--idle",
        action="store_true",
        help="declare that no other job shares the machine during the run (worded so in the report)",
    )
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    ap.add_argument("--report-from", default=None, help="rebuild the report from a --json file instead of running")
    ap.add_argument(
        "--remeasure",
        action="store_true",
        help="latency only, on the collection a --keep run left in --workdir; appended to its --json",
    )
    args = ap.parse_args(argv)
    if args.remeasure:
        if not (args.workdir and args.json):
            ap.error("--remeasure needs the --workdir and --json of a --keep run")
        remeasure(args)
        args.report_from = args.json
    res = run_or_replay(args, argv, run)
    text = report(res, res["argv"])
    if args.report_from:  # keep what the report measured (the disk probe) with the results
        Path(args.report_from).write_text(json.dumps(res, indent=2))
    publish("search.py", TITLE, text, no_write=args.no_write)


if __name__ == "__main__":
    main()
