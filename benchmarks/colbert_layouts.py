"""ColBERT storage layouts measured side by side: bytes, ingest, MaxSim latency, fidelity.

What it measures, and why this way:

* Layout = storage type (``Schema.colbert_dtype``) x quantized copy (``colbert_quantization``,
  scored without rescoring unless the name ends in ``+rescore``) x token pooling
  (``colbert_pool_factor`` 1/2/3). Each layout is a fresh Qdrant Edge collection written
  through :class:`m3search.engines.qdrant_edge.QdrantEdgeEngine` (the Collection's own
  writer; dense and sparse are 4-d / 1-term stubs so only ColBERT costs).
* Data (1024-d): synthetic clustered token vectors, not white noise: 64 topics of 256 "word"
  vectors; a document picks a topic and 24 of its words and draws 96-176 tokens (mean 136)
  from them (Zipf-weighted), each token = its word + noise, normalized. Tokens of one word
  form a cluster, as real ColBERT tokens do, which is what pooling exploits. A query = 16
  noisy tokens of one document's words + 16 tokens of random words; its 400 candidates =
  its source, 199 documents of the same topic and 200 others.
* Pooling (:func:`m3search.pooling.pool_tokens`, the function ``Collection.add`` calls) is
  timed once per pool factor over the whole corpus; ``ingest docs/s`` is the engine write
  alone (``upsert`` of 128-document batches, WAL flushes included), ``optimize s`` the
  segment optimization that builds quantized copies.
* Bytes on disk: every file the engine keeps for the ColBERT vector (``du`` of
  ``vector_storage-colbert`` and ``vector_index-colbert`` in every segment, after optimize
  and flush, the WAL truncated), divided by the ORIGINAL number of tokens; ``RAM`` = the
  quantized copy (``quantized*`` files, held in RAM).
* MaxSim: ONE Qdrant query per query, filtered to the 400 candidate ids (``engine.score``:
  ``exact=True``, quantization params as the schema says), run once untimed, then timed;
  p50 over queries. Top-10 agreement: |top 10 ∩ float32 top 10| / 10, against MaxSim on the
  original float32 vectors in NumPy (the oracle).
* MaxSim in NumPy: the candidates' stored vectors (pooled as the layout says) held in a
  memory-mapped float16 or int8 (per-vector scale) array, gathered and scored with ONE matrix
  product per query (``Q @ D.T`` then a max per document) — the alternative to the engine's
  per-point loop.
* Fidelity (``--fidelity``): the proxy model (384-d) on ``../shared/data`` collections, each
  layout a real :class:`m3search.Collection`; nDCG@10 per mode and recall@10 against the
  float32 layout's ranking (same embeddings, same run).

Usage (repository root, project venv; each call < 10 min on 2 shared cores)::

    nice -n 10 python benchmarks/colbert_layouts.py --docs 3000 --layouts float16 turbo8 turbo4 --json raw.json
    nice -n 10 python benchmarks/colbert_layouts.py --docs 3000 --layouts float16/binary2 --append raw.json
    nice -n 10 python benchmarks/colbert_layouts.py --fidelity cranfield --append raw.json
    python benchmarks/colbert_layouts.py --report-from raw.json          # table -> RESULTS.md

A layout name is ``DTYPE[/QUANTIZATION[+rescore]]``; every layout is run at each ``--pool``.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHARED = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared"))
DIM = 1024
TOPICS, WORDS_PER_TOPIC, DOC_WORDS = 64, 256, 24
DOC_LEN = (96, 176)
QUERY_TOKENS, CANDIDATES = 32, 400
RUN_STARTED = time.strftime("%H:%M", time.gmtime())  # rows of one run share it: compare times within a run
WORD_NOISE = 0.6  # token = word + noise of this norm, normalized (cosine to its word ~0.86)


# --------------------------------------------------------------------------- synthetic data


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Corpus:
    """Clustered 1024-d token vectors, reproducible from the seed (float32, memory-mapped under ``cache``)."""

    def __init__(self, n: int, seed: int, cache: Path) -> None:
        rng = np.random.default_rng([seed, 0])
        self.words = _normalize(rng.standard_normal((TOPICS * WORDS_PER_TOPIC, DIM), dtype=np.float32))
        self.topic = rng.integers(0, TOPICS, n)
        self.lengths = rng.integers(DOC_LEN[0], DOC_LEN[1] + 1, n)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.doc_words = [
            self.topic[i] * WORDS_PER_TOPIC + rng.choice(WORDS_PER_TOPIC, DOC_WORDS, replace=False) for i in range(n)
        ]
        f = cache / f"orig-{n}-{seed}.f32"
        shape = (int(self.offsets[-1]), DIM)
        if not f.is_file() or f.stat().st_size != shape[0] * DIM * 4:
            out = np.lib.format.open_memmap(str(f) + ".tmp.npy", "w+", np.float32, shape)
            zipf = 1.0 / np.arange(1, DOC_WORDS + 1)
            zipf /= zipf.sum()
            for i in range(n):
                r = np.random.default_rng([seed, 1, i])
                w = self.doc_words[i][r.choice(DOC_WORDS, self.lengths[i], p=zipf)]
                noise = r.standard_normal((len(w), DIM), dtype=np.float32) * (WORD_NOISE / np.sqrt(DIM))
                out[self.offsets[i] : self.offsets[i + 1]] = _normalize(self.words[w] + noise)
            out.flush()
            del out
            os.replace(str(f) + ".tmp.npy", f)
        self.vectors = np.load(f, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, i: int) -> np.ndarray:
        return self.vectors[self.offsets[i] : self.offsets[i + 1]]

    def queries(self, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(query tokens (32, d), candidate doc indices (400,))`` per query."""
        rng = np.random.default_rng([seed, 2])
        out = []
        for src in rng.choice(len(self), n, replace=False):
            half = QUERY_TOKENS // 2
            own = self.doc_words[src][rng.integers(0, DOC_WORDS, half)]
            other = rng.integers(0, len(self.words), QUERY_TOKENS - half)
            noise = rng.standard_normal((QUERY_TOKENS, DIM), dtype=np.float32) * (WORD_NOISE / np.sqrt(DIM))
            q = _normalize(self.words[np.concatenate([own, other])] + noise).astype(np.float32)
            same = np.flatnonzero((self.topic == self.topic[src]) & (np.arange(len(self)) != src))
            rest = np.flatnonzero(self.topic != self.topic[src])
            same = rng.choice(same, min(len(same), CANDIDATES // 2 - 1), replace=False)
            rest = rng.choice(rest, min(len(rest), CANDIDATES - 1 - len(same)), replace=False)
            out.append((q, np.concatenate([[src], same, rest])))
        return out


def maxsim(q: np.ndarray, d: np.ndarray) -> float:
    """M3's ColBERT score: mean over query tokens of the best document token."""
    return float((q @ d.T).max(axis=1).mean())


def top10(scores: np.ndarray) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:10].tolist())


# --------------------------------------------------------------------------- results file


class Sink:
    """The raw JSON file, updated after every measured row (a run stopped by its time limit keeps its rows)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path and self.path.is_file() else {}

    def add(self, key: str, value: Any) -> None:
        if self.path is None:
            return
        res = self.load()
        if isinstance(value, dict) and not {"layout", "kind", "collection"} & set(value):
            res[key] = {**res.get(key, {}), **value}
        elif isinstance(value, dict):
            res.setdefault(key, []).append(value)
        else:
            res[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- layouts


def parse_layout(name: str) -> dict[str, Any]:
    """``DTYPE[/QUANTIZATION[+rescore]][:ram]``; ``:ram`` keeps the token vectors in memory
    (``colbert_on_disk=False``: Qdrant reads them in when the collection opens)."""
    name, ram = name.removesuffix(":ram"), name.endswith(":ram")
    dtype, _, quant = name.partition("/")
    rescore = quant.endswith("+rescore")
    quant = quant.removesuffix("+rescore") or None
    out = {"colbert_dtype": dtype, "colbert_quantization": quant, "colbert_rescore": rescore}
    return out | ({"colbert_on_disk": False} if ram else {})


def _du(paths: list[Path]) -> int:
    paths = [p for p in paths if p.exists()]
    if not paths:
        return 0
    out = subprocess.run(["du", "-skc", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0]) * 1024


def colbert_bytes(root: Path) -> tuple[int, int]:
    """(bytes on disk of everything kept for the colbert vector, bytes of its quantized copies)."""
    segs = [p for p in (root / "shard" / "segments").iterdir() if p.is_dir()]
    disk = _du([s / n for s in segs for n in ("vector_storage-colbert", "vector_index-colbert")])
    quant = _du([f for s in segs for f in (s / "vector_storage-colbert").glob("quantized*")])
    return disk, quant


class Pooled:
    """One pool factor's stored token vectors: float32, float16 and int8 (+ per-vector scale) memmaps."""

    def __init__(self, corpus: Corpus, pf: int, cache: Path) -> None:
        from m3search.pooling import pool_tokens

        n = len(corpus)
        stem = cache / f"pool{pf}-{n}"
        self.pool_s = None
        if not Path(f"{stem}.offsets.npy").is_file():
            t = time.perf_counter()
            parts, offs = [], [np.zeros(1, np.int64)]
            for a in range(0, n, 128):
                b = min(n, a + 128)
                o = corpus.offsets[a : b + 1] - corpus.offsets[a]
                x, po = pool_tokens(np.asarray(corpus.vectors[corpus.offsets[a] : corpus.offsets[b]]), o, pf)
                parts.append(np.asarray(x, np.float32))
                offs.append(po[1:] + offs[-1][-1])
            self.pool_s = time.perf_counter() - t
            x = np.concatenate(parts)
            np.save(f"{stem}.f32.npy", x)
            np.save(f"{stem}.f16.npy", x.astype(np.float16))
            scale = np.abs(x).max(axis=1) / 127.0
            np.save(f"{stem}.i8.npy", np.round(x / scale[:, None]).astype(np.int8))
            np.save(f"{stem}.scale.npy", scale.astype(np.float32))
            np.save(f"{stem}.offsets.npy", np.concatenate(offs))
            Path(f"{stem}.pool_s").write_text(str(self.pool_s))
        else:
            self.pool_s = float(Path(f"{stem}.pool_s").read_text())
        self.f32 = np.load(f"{stem}.f32.npy", mmap_mode="r")
        self.f16 = np.load(f"{stem}.f16.npy", mmap_mode="r")
        self.i8 = np.load(f"{stem}.i8.npy", mmap_mode="r")
        self.scale = np.load(f"{stem}.scale.npy")
        self.offsets = np.load(f"{stem}.offsets.npy")

    def rows(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row indices of ``docs``' vectors and each doc's start within them."""
        a, b = self.offsets[docs], self.offsets[docs + 1]
        lens = b - a
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        idx = np.repeat(a - starts, lens) + np.arange(lens.sum())
        return idx, starts


def numpy_maxsim(p: Pooled, q: np.ndarray, docs: np.ndarray, kind: str) -> np.ndarray:
    """M3 ColBERT scores of ``docs`` by ONE matrix product over their gathered stored vectors."""
    idx, starts = p.rows(docs)
    if kind == "f16":
        s = q @ p.f16[idx].astype(np.float32).T
    else:
        s = (q @ p.i8[idx].astype(np.float32).T) * p.scale[idx]
    return np.maximum.reduceat(s, starts, axis=1).mean(axis=0)


def _uuid_ids(n: int) -> list[str]:
    return [f"d{i}" for i in range(n)]


def run_layout(name: str, pf: int, corpus: Corpus, pooled: Pooled, queries, oracle_top, work: Path) -> dict[str, Any]:
    from m3search.engines.qdrant_edge import QdrantEdgeEngine
    from m3search.engines.shapes import PointBatch, QueryVectors, Schema

    schema = Schema(dense_dim=4, colbert_dim=DIM, vocab_size=16, colbert_pool_factor=pf, **parse_layout(name))
    root = work / f"{name.replace('/', '_')}-p{pf}"
    shutil.rmtree(root, ignore_errors=True)
    eng = QdrantEdgeEngine.create(str(root), schema)
    n = len(corpus)
    ids = _uuid_ids(n)
    rng = np.random.default_rng(5)
    dense = _normalize(rng.standard_normal((n, 4), dtype=np.float32))
    sparse = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), rng.integers(0, 16, n))), shape=(n, 16))
    try:
        t_write = 0.0
        for a in range(0, n, 128):
            b = min(n, a + 128)
            o = pooled.offsets[a : b + 1]
            col = np.asarray(pooled.f32[o[0] : o[-1]])
            batch = PointBatch(ids[a:b], [""] * (b - a), [{}] * (b - a), dense[a:b], sparse[a:b], col, o - o[0])
            t = time.perf_counter()
            eng.upsert(batch)
            t_write += time.perf_counter() - t
        t = time.perf_counter()
        eng.optimize()
        eng.flush()
        t_opt = time.perf_counter() - t
        disk, quant = colbert_bytes(root)
        lat, agree = [], []
        for (q, cand), otop in zip(queries, oracle_top):
            qv = QueryVectors(colbert=q)
            cid = [ids[j] for j in cand]
            eng.score(cid, qv, ["colbert"])  # warm: the candidates' pages
            t = time.perf_counter()
            s = eng.score(cid, qv, ["colbert"])["colbert"]
            lat.append((time.perf_counter() - t) * 1000)
            agree.append(len(top10(s) & otop) / 10)
    finally:
        eng.close()
        shutil.rmtree(root, ignore_errors=True)
    tokens = int(corpus.offsets[-1])
    row = {
        "run": RUN_STARTED,
        "layout": name,
        "pool": pf,
        "stored_tokens_per_doc": float(pooled.offsets[-1] / n),
        "bytes_per_token": disk / tokens,
        "bits_per_dim": 8 * disk / tokens / DIM,
        "ram_bytes_per_token": quant / tokens,
        "ingest_docs_s": n / t_write,
        "optimize_s": t_opt,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "top10_agreement": float(np.mean(agree)),
    }
    print(
        f"  {name:24s} pool {pf}: {row['bytes_per_token']:7.0f} B/token ({row['bits_per_dim']:.2f} bits/dim), "
        f"RAM {row['ram_bytes_per_token']:5.0f} B/token, ingest {row['ingest_docs_s']:6.1f} docs/s, "
        f"optimize {t_opt:5.1f} s, MaxSim p50 {row['p50_ms']:6.1f} ms, top-10 {row['top10_agreement']:.3f}",
        flush=True,
    )
    return row


def run_synthetic(args, sink: Sink) -> dict[str, Any]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sink.add("docs", args.docs)
    sink.add("queries", args.queries)
    t = time.perf_counter()
    corpus = Corpus(args.docs, args.seed, cache)
    print(f"corpus: {len(corpus)} docs, {corpus.offsets[-1]} tokens ({time.perf_counter() - t:.0f} s)", flush=True)
    queries = corpus.queries(args.queries, args.seed)
    oracle = [np.array([maxsim(q, np.asarray(corpus.doc(j))) for j in cand]) for q, cand in queries]
    oracle_top = [top10(s) for s in oracle]
    rows, numpy_rows, pooling = [], [], {}
    work = Path(tempfile.mkdtemp(prefix="m3-layouts-", dir=args.work))
    try:
        for pf in args.pool:
            pooled = Pooled(corpus, pf, cache)
            pooling[pf] = {"docs_per_s": len(corpus) / pooled.pool_s if pooled.pool_s else None}
            sink.add("pooling", {str(pf): pooling[pf]})
            for kind in ("f16", "i8") if args.numpy else ():
                lat, agree = [], []
                for (q, cand), otop in zip(queries, oracle_top):
                    numpy_maxsim(pooled, q, cand, kind)  # warm
                    t = time.perf_counter()
                    s = numpy_maxsim(pooled, q, cand, kind)
                    lat.append((time.perf_counter() - t) * 1000)
                    agree.append(len(top10(s) & otop) / 10)
                numpy_rows.append(
                    {
                        "kind": kind,
                        "pool": pf,
                        "p50_ms": float(np.percentile(lat, 50)),
                        "top10_agreement": float(np.mean(agree)),
                    }
                )
                sink.add("numpy", numpy_rows[-1])
                print(f"  numpy {kind} pool {pf}: p50 {numpy_rows[-1]['p50_ms']:.1f} ms, top-10 {np.mean(agree):.3f}")
            for name in args.layouts:
                rows.append(run_layout(name, pf, corpus, pooled, queries, oracle_top, work))
                sink.add("synthetic", rows[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"synthetic": rows, "numpy": numpy_rows, "pooling": pooling, "docs": args.docs, "queries": args.queries}


# --------------------------------------------------------------------------- `all` through the Collection


def run_search(args, sink: Sink) -> dict[str, Any]:
    """``all`` p50/p95 warm per layout and candidate depth, through :meth:`Collection.search_batch`.

    Data: benchmarks/search.py's synthetic bge-m3 shapes (1024-d dense, Zipf sparse, 16-256
    random unit token vectors) and its planted queries; each layout is a fresh embedded
    collection written by ``Collection.add`` (pooling included), the time to generate the
    vectors subtracted. Agreement: top-10 of ``all`` against the float32 layout's, same depth.
    ``numpy``: MaxSim of the same candidates as ONE matrix product over their token vectors
    fetched from the engine once (``engine.get``), against the engine's own MaxSim
    (``engine.score``) of the same ids; the fetch is timed apart from the product.
    """
    import search as S

    from m3search import Collection, M3Encoder

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    enc = M3Encoder.from_pretrained(str(S.build_model(cache / "bge-m3-shape-model")), device="cpu", dtype="float32")
    n = args.docs
    qemb, _ = S.planted_queries(S.SyntheticCorpus(args.seed, 0, n), args.queries, args.seed)
    queries = [qemb[i] for i in range(args.queries)]
    sink.add("search_docs", n)
    rows, numpy_rows, cold_rows, ref = [], [], [], {}
    work = Path(tempfile.mkdtemp(prefix="m3-layouts-search-", dir=args.work))
    try:
        for layout in args.search:
            base, _, pf = layout.partition("@")
            path = work / layout.replace("/", "_")
            col = Collection.create(path, model=enc, colbert_pool_factor=int(pf or 1), **parse_layout(base))
            try:
                corpus = S.SyntheticCorpus(args.seed, 0, n)
                t = time.perf_counter()
                col.add(
                    [""] * n, ids=[f"d{i}" for i in range(n)], embeddings=corpus, show_progress=False, optimize=False
                )
                ingest = n / (time.perf_counter() - t - corpus.gen_s)
                del corpus
                t = time.perf_counter()
                col.optimize()  # builds the quantized copies and the dense graph: what is searched below
                optimize_s = time.perf_counter() - t
                disk = col.info().get("disk_bytes", {})
                for q in queries:  # warm: every timed query's candidates touched once (first touch: --cold)
                    col.search_batch(["q"], mode="all", candidates=max(args.depths), query_embeddings=q)
                for depth in args.depths:
                    lat, cpu, tops = [], [], []
                    for q in queries:
                        t, c = time.perf_counter(), time.process_time()
                        hits = col.search_batch(["q"], mode="all", candidates=depth, query_embeddings=q)[0]
                        lat.append((time.perf_counter() - t) * 1000)
                        cpu.append((time.process_time() - c) * 1000)  # all threads; other jobs inflate it less
                        tops.append({h.id for h in hits})
                    if base == "float32" and int(pf or 1) == 1:
                        ref[depth] = tops
                    agree = (
                        float(np.mean([len(a & b) / 10 for a, b in zip(tops, ref[depth])])) if depth in ref else None
                    )
                    ds = []
                    for q in queries:
                        t = time.perf_counter()
                        col.search_batch(["q"], mode="dense+sparse", candidates=depth, query_embeddings=q)
                        ds.append((time.perf_counter() - t) * 1000)
                    rows.append(
                        {
                            "layout": layout,
                            "depth": depth,
                            "docs": n,
                            "ingest_docs_s": ingest,
                            "optimize_s": optimize_s,
                            "colbert_bytes_per_doc": disk.get("colbert", 0) / n,
                            "p50_ms": float(np.percentile(lat, 50)),
                            "p95_ms": float(np.percentile(lat, 95)),
                            "cpu_p50_ms": float(np.percentile(cpu, 50)),
                            "dense_sparse_p50_ms": float(np.percentile(ds, 50)),
                            "top10_vs_float32": agree,
                            "run": RUN_STARTED,
                        }
                    )
                    sink.add("search", rows[-1])
                    print(
                        f"  {layout:14s} depth {depth:4d}: all p50 {rows[-1]['p50_ms']:7.1f} ms p95 "
                        f"{rows[-1]['p95_ms']:7.1f} ms, dense+sparse p50 {rows[-1]['dense_sparse_p50_ms']:6.1f} ms, "
                        f"top-10 vs float32 {agree}, ingest {ingest:.0f} docs/s",
                        flush=True,
                    )
                if layout in args.numpy_layouts:
                    numpy_rows += numpy_versus_engine(col, queries[: args.numpy_queries], args.depths, layout, sink)
                if args.cold:
                    col.close()
                    col = None
                    for depth in args.depths:
                        cold = {"layout": layout, "depth": depth, "docs": n, "run": RUN_STARTED}
                        cold.update(cold_queries(path, enc, queries[-args.cold :], depth))
                        sink.add("search_cold", cold)
                        cold_rows.append(cold)
                        print(f"  {layout:14s} depth {depth:4d}: cold {cold}", flush=True)
            finally:
                if col is not None:
                    col.close()
                shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"search": rows, "search_numpy": numpy_rows, "search_cold": cold_rows}


def evict_page_cache(folder: Path) -> int:
    """Drop ``folder``'s files from the page cache (``posix_fadvise(DONTNEED)``; no root needed). Pages
    still mapped by a process are kept, so call it with the collection closed. Returns the bytes advised."""
    n = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            f = os.path.join(dirpath, name)
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return n


def cold_queries(path: Path, enc, queries, depth: int) -> dict[str, float]:
    """``all`` on a cold page cache: per query, the collection closed, its files evicted, re-opened
    (timed apart), then ONE query timed: what the first query after a restart, or one whose
    candidates were pushed out of memory, costs. (Qdrant Edge's close evicts them too: the
    eviction keeps this measurement independent of that.)"""
    from m3search import Collection

    lat, opened = [], []
    for q in queries:
        evict_page_cache(path)
        t = time.perf_counter()
        col = Collection.open(path, model=enc)
        opened.append((time.perf_counter() - t) * 1000)
        try:
            t = time.perf_counter()
            col.search_batch(["q"], mode="all", candidates=depth, query_embeddings=q)
            lat.append((time.perf_counter() - t) * 1000)
        finally:
            col.close()
    return {
        "cold_queries": len(queries),
        "cold_p50_ms": float(np.percentile(lat, 50)),
        "cold_p95_ms": float(np.percentile(lat, 95)),
        "cold_open_p50_ms": float(np.percentile(opened, 50)),
    }


def numpy_versus_engine(col, queries, depths, layout: str, sink: Sink) -> list[dict[str, Any]]:
    """The same candidates' MaxSim by the engine and by one NumPy matrix product over fetched vectors."""
    from m3search.engines.shapes import QueryVectors

    out = []
    for depth in depths:
        eng_ms, fetch_ms, mm_ms, err = [], [], [], []
        for q in queries:
            qv = QueryVectors.from_embeddings(q, 0)
            pool = col.engine.candidates_batch(q.dense, q.sparse, [qv], depth)[0]
            t = time.perf_counter()
            want = col.engine.score(pool.ids, qv, ["colbert"])["colbert"]
            eng_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            recs = col.engine.get(pool.ids, with_vectors=["colbert"])
            mats = [r.colbert for r in recs]
            fetch_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            lens = np.array([len(m) for m in mats])
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            qc = np.asarray(qv.colbert, dtype=np.float32)
            got = np.maximum.reduceat(qc @ np.concatenate(mats).T, starts, axis=1).mean(axis=0)
            mm_ms.append((time.perf_counter() - t) * 1000)
            err.append(float(np.max(np.abs(got - want))))
        out.append(
            {
                "layout": layout,
                "depth": depth,
                "candidates": len(pool.ids),
                "engine_p50_ms": float(np.percentile(eng_ms, 50)),
                "fetch_p50_ms": float(np.percentile(fetch_ms, 50)),
                "matmul_p50_ms": float(np.percentile(mm_ms, 50)),
                "max_abs_diff": max(err),
            }
        )
        sink.add("search_numpy", out[-1])
        r = out[-1]
        print(
            f"  numpy vs engine {layout} depth {depth}: engine {r['engine_p50_ms']:.1f} ms; fetch "
            f"{r['fetch_p50_ms']:.1f} ms + product {r['matmul_p50_ms']:.1f} ms; max |diff| {r['max_abs_diff']:.2e}",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- ingest: how vectors reach Rust


def run_ingest_ab(args, sink: Sink) -> dict[str, Any]:
    """Engine writes (``QdrantEdgeEngine.upsert``, 128-document batches of search.py's synthetic bge-m3
    shapes, float16 ColBERT) with the vectors handed to ``qe.Point`` as NumPy arrays (the code before
    2026-12-03) or as ``tolist()`` lists (now), alternating rounds; docs per wall second and per CPU
    second of the process (all threads: the steadier number on a shared machine)."""
    import qdrant_edge as qe
    import search as S

    from m3search.engines import qdrant_edge as QE
    from m3search.engines.shapes import PointBatch, Schema

    def write_numpy(self, points, sizes) -> None:
        out = []
        for uid, vec, payload in points:
            if vec is not None and "sparse" in vec:
                ind, val = vec["sparse"]
                vec = {**vec, "sparse": qe.SparseVector(ind.tolist(), val.tolist())}
            out.append(qe.Point(uid, vec or {}, payload))
        self.shard.update(qe.UpdateOperation.upsert_points(out))
        self._unflushed += sum(sizes) // 3
        if self._unflushed >= QE.WAL_FLUSH_BYTES:
            self.flush()

    n, bs = args.ingest_ab, 128
    corpus = S.SyntheticCorpus(args.seed, 0, n)
    batches = []
    for a in range(0, n, bs):
        e = corpus[a : a + bs]
        ids = [f"d{i}" for i in range(a, a + len(e))]
        batches.append(PointBatch(ids, [""] * len(e), [{}] * len(e), e.dense, e.sparse, e.colbert, e.colbert_offsets))
    schema = Schema(dense_dim=S.DIM, colbert_dim=S.DIM, vocab_size=S.VOCAB)
    variants = {"numpy arrays (before)": write_numpy, "tolist (now)": QE.QdrantEdgeEngine._write}
    rows = {name: [] for name in variants}
    work = Path(tempfile.mkdtemp(prefix="m3-ingest-ab-", dir=args.work))
    try:
        for _ in range(args.rounds):
            for name, write in variants.items():
                root = work / "col"
                with _patched(QE.QdrantEdgeEngine, "_write", write):
                    eng = QE.QdrantEdgeEngine.create(str(root), schema)
                    t, c = time.perf_counter(), time.process_time()
                    for b in batches:
                        eng.upsert(b)
                    wall, cpu = time.perf_counter() - t, time.process_time() - c
                    eng.close()
                shutil.rmtree(root, ignore_errors=True)
                rows[name].append((n / wall, n / cpu))
                print(f"  {name:22s} {n / wall:6.1f} docs/s, {n / cpu:6.1f} docs per CPU-second", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = [
        {
            "variant": name,
            "docs": n,
            "rounds": len(v),
            "docs_s": float(np.median([a for a, _ in v])),
            "docs_cpu_s": float(np.median([b for _, b in v])),
        }
        for name, v in rows.items()
    ]
    for r in out:
        sink.add("ingest_ab", r | {"kind": "ingest"})
    return {"ingest_ab": out}


class _patched:
    """``setattr`` for a ``with`` block."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name, self.value, self.old = obj, name, value, getattr(obj, name)

    def __enter__(self) -> None:
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc: Any) -> None:
        setattr(self.obj, self.name, self.old)


# --------------------------------------------------------------------------- fidelity (proxy model)

FIDELITY_MODES = ("colbert", "all")


def run_fidelity(args, sink: Sink) -> dict[str, Any]:
    from candidates import encode_cached

    from m3search import Collection, M3Encoder
    from m3search.eval import compute_metrics, load_beir

    enc = M3Encoder.from_pretrained(str(SHARED / "models" / "bge-m3-proxy"), device="cpu", dtype="float32")
    out = []
    for name in args.fidelity:
        if args.encode_only:  # fill the embedding cache (its own run: encoding is the slow part on a busy machine)
            _fidelity_data(name, args, enc, encode_cached, load_beir)
            continue
        data, qids, qtexts, qrels, emb, qemb = _fidelity_data(name, args, enc, encode_cached, load_beir)
        # The float32 layout's top 10 per query: measured once per (collection, queries), kept in the raw file.
        key = f"{name}:{len(qids)}"
        ref = {m: [set(t) for t in tops] for m, tops in sink.load().get("fidelity_ref", {}).get(key, {}).items()}
        todo = [] if set(ref) >= set(FIDELITY_MODES) else ["float32"]
        for layout in todo + [x for x in args.fidelity_layouts if x != "float32"]:
            base, _, pf = layout.partition("@")
            path = Path(tempfile.mkdtemp(prefix="m3-fid-", dir=args.work)) / "col"
            col = Collection.create(path, model=enc, colbert_pool_factor=int(pf or 1), **parse_layout(base))
            try:
                col.add(data.doc_texts, ids=data.doc_ids, embeddings=emb, show_progress=False)
                for mode in FIDELITY_MODES:
                    res = col.search_batch(qtexts, k=100, mode=mode, query_embeddings=qemb)
                    run = {q: {h.id: h.score for h in hits} for q, hits in zip(qids, res)}
                    tops = [{h.id for h in hits[:10]} for hits in res]
                    if layout == "float32":
                        ref[mode] = tops
                        sink.add(
                            "fidelity_ref",
                            {
                                key: {
                                    **sink.load().get("fidelity_ref", {}).get(key, {}),
                                    mode: [sorted(t) for t in tops],
                                }
                            },
                        )
                    metrics = compute_metrics(run, qrels, recall_at=100)
                    ndcg, recall100 = metrics["ndcg@10"], metrics["recall@100"]
                    recall = float(np.mean([len(a & b) / max(len(b), 1) for a, b in zip(tops, ref[mode])]))
                    out.append(
                        {
                            "collection": name,
                            "layout": layout,
                            "mode": mode,
                            "ndcg": ndcg,
                            "recall100": recall100,
                            "recall": recall,
                            "queries": len(qids),
                        }
                    )
                    sink.add("fidelity", out[-1])
                    print(
                        f"  {name} {layout:24s} {mode:13s} nDCG@10 {ndcg:.4f} Recall@100 {recall100:.4f} "
                        f"recall@10 vs float32 {recall:.4f}",
                        flush=True,
                    )
            finally:
                col.close()
                shutil.rmtree(path.parent, ignore_errors=True)
    return {"fidelity": out}


def _fidelity_data(name: str, args, enc, encode_cached, load_beir):
    """``(data, qids, qtexts, qrels, doc embeddings, query embeddings)`` of one fidelity collection."""
    # "xquad-r/en>de": the English questions against the German corpus (cross-lingual; query ids are shared)
    corpus_name, _, other = name.partition(">")
    if other:
        corpus_name = f"{corpus_name.rsplit('/', 1)[0]}/{other}"
        data = load_beir(SHARED / "data" / corpus_name, queries_dir=SHARED / "data" / name.partition(">")[0])
    else:
        data = load_beir(SHARED / "data" / corpus_name)
    qids = [q for q in data.queries if data.qrels.get(q)][: args.max_queries]
    qtexts = [data.queries[q] for q in qids]
    qrels = {q: data.qrels[q] for q in qids}
    cache = Path(args.cache)
    emb = encode_cached(enc, f"{corpus_name}-docs", data.doc_texts, cache)
    qemb = encode_cached(enc, f"{name.partition('>')[0]}-queries-{len(qids)}", qtexts, cache, max_length=512)
    return data, qids, qtexts, qrels, emb, qemb


# --------------------------------------------------------------------------- report


def _lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    kv = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{kv.get('Model name', '?').strip()}, {kv.get('CPU(s)', '?').strip()} CPUs"


def report(res: dict[str, Any]) -> str:
    lines = [
        f"{', '.join(res.get('dates', []))}; {res.get('machine', '')}; machine shared with other jobs "
        f"(load average during the runs: {', '.join(res.get('loads', []))}), so times are noisy.",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in res.get("commands", [])),
        "",
    ]
    syn = res.get("synthetic", [])
    if syn:
        lines += [
            f"### Synthetic 1024-d clustered token vectors ({res.get('docs')} documents, ~136 tokens, "
            f"{res.get('queries')} queries of 32 tokens over 400 candidates)",
            "",
            "Bytes are everything the engine keeps for the colbert vector, per ORIGINAL token; RAM = the quantized "
            "copy. A quantization without `+rescore` returns scores of the quantized copy.",
            "",
            "| run (UTC) | layout | pool | vectors/doc | B/token disk | bits/dim | RAM B/token | ingest docs/s | optimize s "
            "| MaxSim p50 ms | p95 ms | top-10 vs float32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in syn:
            lines.append(
                f"| {r.get('run', '')} | {r['layout']} | {r['pool']} | {r['stored_tokens_per_doc']:.0f} | {r['bytes_per_token']:.0f} "
                f"| {r['bits_per_dim']:.2f} | {r['ram_bytes_per_token']:.0f} | {r['ingest_docs_s']:.0f} "
                f"| {r['optimize_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['top10_agreement']:.3f} |"
            )
        lines.append("")
    if res.get("pooling"):
        lines.append(
            "Token pooling speed (`pool_tokens`, 128-document batches): "
            + ", ".join(
                f"factor {pf}: {v['docs_per_s']:.0f} docs/s"
                for pf, v in res["pooling"].items()
                if v["docs_per_s"] and str(pf) != "1"
            )
            + "."
        )
        lines.append("")
    if res.get("numpy"):
        lines += [
            "MaxSim as ONE matrix product in NumPy over the candidates' memory-mapped stored vectors "
            "(same queries and candidates):",
            "",
            "| array | pool | p50 ms | top-10 vs float32 |",
            "|---|---|---|---|",
        ]
        for r in res["numpy"]:
            lines.append(f"| {r['kind']} | {r['pool']} | {r['p50_ms']:.1f} | {r['top10_agreement']:.3f} |")
        lines.append("")
    if res.get("search"):
        lines += [
            "### `all` through the Collection (synthetic bge-m3-shaped documents, k = 10, warm)",
            "",
            "Depth = candidates per first-stage list (the union is re-ranked); ColBERT B/doc from `info()`'s "
            "disk_bytes; top-10 = agreement of `all` with the float32 layout at the same depth (random token "
            "vectors: a timing set, fidelity is measured on the proxy below).",
            "",
            "| run (UTC) | docs | layout | depth | all p50 ms | all p95 ms | all CPU p50 ms | dense+sparse p50 ms "
            "| cold all p50 / p95 ms | cold open ms | top-10 vs float32 | ColBERT B/doc | ingest docs/s | optimize s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        colds = {(c["run"], c["docs"], c["layout"], c["depth"]): c for c in res.get("search_cold", [])}
        for r in res["search"]:
            agree = "" if r.get("top10_vs_float32") is None else f"{r['top10_vs_float32']:.3f}"
            c = colds.get((r.get("run"), r["docs"], r["layout"], r["depth"]))
            cold = f"{c['cold_p50_ms']:.1f} / {c['cold_p95_ms']:.1f}" if c else ""
            opened = f"{c['cold_open_p50_ms']:.0f}" if c else ""
            opt = f"{r['optimize_s']:.1f}" if "optimize_s" in r else ""
            lines.append(
                f"| {r.get('run', '')} | {r['docs']} | {r['layout']} | {r['depth']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
                f"| {r.get('cpu_p50_ms', float('nan')):.1f} | {r['dense_sparse_p50_ms']:.1f} | {cold} | {opened} | {agree} "
                f"| {r['colbert_bytes_per_doc']:,.0f} | {r['ingest_docs_s']:.0f} | {opt} |"
            )
        lines.append("")
    if res.get("ingest_ab"):
        lines += [
            "Ingest, engine writes only (128-document batches, float16 ColBERT, medians of alternating rounds):",
            "",
            "| vectors handed to qe.Point as | documents | rounds | docs/s (wall) | docs per CPU-second |",
            "|---|---|---|---|---|",
        ]
        for r in res["ingest_ab"]:
            lines.append(
                f"| {r['variant']} | {r['docs']} | {r['rounds']} | {r['docs_s']:.1f} | {r['docs_cpu_s']:.1f} |"
            )
        lines.append("")
    if res.get("search_numpy"):
        lines += [
            "MaxSim of the same candidates: the engine's (`engine.score`, one query) vs ONE NumPy matrix product "
            "over the token vectors fetched from the engine (`engine.get`):",
            "",
            "| layout | depth | candidates | engine p50 ms | fetch p50 ms | product p50 ms | max abs score diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["search_numpy"]:
            lines.append(
                f"| {r['layout']} | {r['depth']} | {r['candidates']} | {r['engine_p50_ms']:.1f} "
                f"| {r['fetch_p50_ms']:.1f} | {r['matmul_p50_ms']:.1f} | {r['max_abs_diff']:.1e} |"
            )
        lines.append("")
    fid = res.get("fidelity", [])
    if fid:
        lines += fidelity_report(fid)
    if res.get("notes"):
        lines += [res["notes"], ""]
    return "\n".join(lines)


#: The fidelity targets of a default layout (issue 17): per collection and mode, nDCG@10 within this of the
#: float32 layout, and recall@10 against the float32 layout's top 10 at least this.
NDCG_TOLERANCE, RECALL10_MIN = 0.005, 0.98


def fidelity_report(fid: list[dict[str, Any]]) -> list[str]:
    """Per layout: the verdict against the targets; then every (collection, mode, layout) row."""
    base = {(f["collection"], f["mode"]): f for f in fid if f["layout"] == "float32"}
    rows = [f for f in fid if (f["collection"], f["mode"]) in base]
    lines = [
        "### Fidelity on the proxy model (384-d), default candidates, k = 100",
        "",
        f"Targets: nDCG@10 within {NDCG_TOLERANCE} of the float32 layout and recall@10 against its top 10 >= "
        f"{RECALL10_MIN}, on every collection and mode. `a>b`: queries of `a` against the corpus of `b`.",
        "",
        "| layout | collections x modes | worst nDCG@10 diff | worst Recall@100 diff | lowest recall@10 | targets met |",
        "|---|---|---|---|---|---|",
    ]
    for layout in dict.fromkeys(f["layout"] for f in rows if f["layout"] != "float32"):
        mine = [f for f in rows if f["layout"] == layout]
        d_ndcg = [f["ndcg"] - base[(f["collection"], f["mode"])]["ndcg"] for f in mine]
        d_r100 = [
            f["recall100"] - base[(f["collection"], f["mode"])]["recall100"]
            for f in mine
            if "recall100" in f and "recall100" in base[(f["collection"], f["mode"])]
        ]
        low = min(f["recall"] for f in mine)
        worst = max(d_ndcg, key=abs)
        ok = all(abs(d) <= NDCG_TOLERANCE for d in d_ndcg) and low >= RECALL10_MIN
        lines.append(
            f"| {layout} | {len(mine)} | {worst:+.4f} | {(max(d_r100, key=abs) if d_r100 else float('nan')):+.4f} "
            f"| {low:.3f} | {'yes' if ok else 'no'} |"
        )
    lines += [
        "",
        "| collection | mode | layout | queries | nDCG@10 | diff | Recall@100 | diff | recall@10 vs float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in sorted(rows, key=lambda f: (f["collection"], f["mode"])):
        b = base[(f["collection"], f["mode"])]
        r100, b100 = f.get("recall100"), b.get("recall100")
        lines.append(
            f"| {f['collection']} | {f['mode']} | {f['layout']} | {f.get('queries', '')} | {f['ndcg']:.4f} "
            f"| {f['ndcg'] - b['ndcg']:+.4f} | {'' if r100 is None else f'{r100:.4f}'} "
            f"| {'' if r100 is None or b100 is None else f'{r100 - b100:+.4f}'} | {f['recall']:.3f} |"
        )
    lines.append("")
    return lines


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(old)
    for k, v in new.items():
        if isinstance(v, list) and k in out:
            out[k] = out[k] + v
        elif isinstance(v, dict) and k in out:
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--layouts", nargs="*", default=[], help="DTYPE[/QUANTIZATION[+rescore]] ...")
    ap.add_argument("--pool", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--numpy", action="store_true", help="also time MaxSim as one NumPy matrix product")
    ap.add_argument("--search", nargs="*", default=[], help="layouts (DTYPE[/Q][@POOL]) timed for `all`")
    ap.add_argument("--depths", type=int, nargs="+", default=[50, 100, 200], help="candidates per first-stage list")
    ap.add_argument("--numpy-layouts", nargs="*", default=["float16"], help="--search layouts also timed in NumPy")
    ap.add_argument("--numpy-queries", type=int, default=5)
    ap.add_argument("--cold", type=int, default=0, help="--search: cold-cache queries per depth (0: skip)")
    ap.add_argument("--ingest-ab", type=int, default=0, help="documents for the ingest A/B (0: skip)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the ingest A/B")
    ap.add_argument("--fidelity", nargs="*", default=[], help="proxy-model collections under ../shared/data")
    ap.add_argument("--fidelity-layouts", nargs="*", default=["float16", "turbo8", "turbo4@2", "turbo8@2"])
    ap.add_argument("--max-queries", type=int, default=1000)
    ap.add_argument("--encode-only", action="store_true", help="only fill the --cache with --fidelity embeddings")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "m3-layouts-cache"))
    ap.add_argument("--work", default=None, help="folder for the collections (default: system temp)")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--append", help="merge the raw numbers into this JSON file")
    ap.add_argument("--report-from", help="only render the report of this raw JSON file")
    ap.add_argument("--notes", help="a paragraph appended to the report (the recommendation)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--section", default="colbert_layouts.py", help="RESULTS.md section key (one per round)")
    ap.add_argument("--title", default="ColBERT layouts: storage x quantization x pooling")
    args = ap.parse_args(argv)
    if args.report_from:
        res = json.loads(Path(args.report_from).read_text())
        if args.notes:
            res["notes"] = args.notes
        publish(args.section, args.title, report(res), no_write=args.no_write)
        return
    sink = Sink(args.append or args.json)
    if args.json and not args.append and sink.path.is_file():
        sink.path.unlink()
    started = {
        "dates": [_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
        "loads": [" ".join(f"{x:.1f}" for x in os.getloadavg())],
        "commands": ["python benchmarks/colbert_layouts.py " + shlex.join(argv)],
    }
    old = sink.load()
    for k, v in started.items():
        sink.add(k, old.get(k, []) + v)
    sink.add("machine", _lscpu())
    res: dict[str, Any] = {}
    if args.layouts or args.numpy:
        res = merge(res, run_synthetic(args, sink))
    if args.search:
        res = merge(res, run_search(args, sink))
    if args.ingest_ab:
        res = merge(res, run_ingest_ab(args, sink))
    if args.fidelity:
        res = merge(res, run_fidelity(args, sink))
    if sink.path is not None:
        res = sink.load()
    print("\n" + report(res))


if __name__ == "__main__":
    main()
