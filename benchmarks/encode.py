"""Encoding throughput: m3search vs FlagEmbedding 1.4.2 on the full bge-m3 shape, CPU.

What it measures, and why this way:

* The model is a random-weight XLM-R with BAAI/bge-m3's full configuration
  (``m3search.testing.BGE_M3_SHAPE``: 24 layers, hidden 1024, 16 heads, FFN 4096,
  vocab 250,002, 8,194 positions), built here (no download); its tokenizer is a test
  tokenizer padded to 250,002 ids. Speed depends on shapes, not on weight values.
* The corpus is real text of very different lengths: cranfield abstracts, xquad-r
  sentences in six languages and short queries, ``max_length`` 8192 on both sides.
* Every side runs in its **own process** (peak RSS from ``resource.getrusage`` there;
  timing measured inside it), one after the other: m3search ``dtype="auto"`` (bf16 on a
  CPU with AMX/avx512_bf16), m3search ``float32``, FlagEmbedding
  (``BGEM3FlagModel(path, use_fp16=False, devices="cpu")``, run with the ``.venv-flag``
  interpreter). All three outputs (dense, sparse, ColBERT) on every side.
* Steady state only. FlagEmbedding's ``encode`` first runs its *probe batch* (the first
  ``batch_size`` length-sorted inputs, i.e. the longest ones, padded together) to pick a
  batch size that does not raise, then encodes everything, that batch again included.
  The probe's forward is timed by hooks and reported on its own line, not counted.
  m3search gets one small untimed warm-up call, also reported.
* Fraction of peak: useful FLOPs (real tokens only, attention over each text's own
  length) per second, divided by this machine's bf16 matmul peak measured in the same
  run with a ``torch.mm`` loop.

Usage (from the repository root, with the project venv)::

    nice -n 5 python benchmarks/encode.py                    # full run, writes benchmarks/RESULTS.md
    python benchmarks/encode.py --cranfield 20 --xquad 10 --queries 10 --no-write   # smoke run

This file is also each worker's entry point (``--worker build|peak|m3search|flag``);
the FlagEmbedding worker imports only the standard library, NumPy and FlagEmbedding.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
from results import publish  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

XQUAD_LANGS = ("en", "de", "es", "ru", "zh", "ar")


# --------------------------------------------------------------------------- small helpers


def _rss_now_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _usage() -> dict[str, float]:
    """Totals taken when a worker finishes (peak RSS since the last :func:`_reset_peak_rss`)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"process_cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_kib": ru.ru_maxrss}


def _reset_peak_rss() -> int:
    """Return the peak RSS so far (KiB) and restart peak tracking (Linux ``clear_refs`` 5),
    so the next ``getrusage`` peak covers only what follows (encoding, not model loading)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return before


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _flag_python() -> Path:
    return Path(os.environ.get("M3SEARCH_FLAG_PYTHON", REPO / ".venv-flag" / "bin" / "python"))


def _shared_data() -> Path:
    env = os.environ.get("M3SEARCH_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _read_jsonl(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    return [(d.get("title", "") + " " + d.get("text", "")).strip() for d in docs]


def _spread(items: list[str], n: int) -> list[str]:
    """``n`` items evenly spaced over the list (not just its head)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def load_corpus(data: Path, n_cranfield: int, n_xquad: int, n_queries: int) -> list[str]:
    """Mixed-length real text: cranfield abstracts, xquad-r sentences (6 languages), queries."""
    texts = _spread(_read_jsonl(data / "cranfield" / "corpus.jsonl"), n_cranfield)
    queries = _spread(_read_jsonl(data / "cranfield" / "queries.jsonl"), n_queries // 2)
    per_lang_q = max(1, (n_queries - len(queries)) // len(XQUAD_LANGS)) if n_queries else 0
    for lang in XQUAD_LANGS:
        texts += _spread(_read_jsonl(data / "xquad-r" / lang / "corpus.jsonl"), n_xquad)
        if per_lang_q:
            queries += _spread(_read_jsonl(data / "xquad-r" / lang / "queries.jsonl"), per_lang_q)
    texts += queries
    # Interleave deterministically so input order is not already length-sorted.
    order = sorted(range(len(texts)), key=lambda i: (i * 7919) % len(texts))
    return [texts[i] for i in order]


# --------------------------------------------------------------------------- workers


def worker_build(args: argparse.Namespace) -> dict[str, Any]:
    from m3search.testing import BGE_M3_SHAPE, build_random_model

    t0 = time.perf_counter()
    shape = {**BGE_M3_SHAPE, **({"num_hidden_layers": args.layers} if args.layers else {})}
    build_random_model(args.model, **shape, seed=0)
    return {"build_s": time.perf_counter() - t0, **_usage()}


def worker_peak(args: argparse.Namespace) -> dict[str, Any]:
    """Best sustained ``torch.mm`` throughput (FLOP/s) per dtype over a few GEMM shapes."""
    import torch

    shapes = [(2048, 1024, 4096), (2048, 4096, 1024), (1024, 1024, 1024), (4096, 4096, 4096)]
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        best = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            c = torch.empty(m, n, dtype=dtype)
            torch.mm(a, b, out=c)  # warm-up (oneDNN kernel selection)
            for _ in range(3):  # best of 3 windows: other processes share the cores
                it, t0 = 0, time.perf_counter()
                while (el := time.perf_counter() - t0) < args.peak_window:
                    torch.mm(a, b, out=c)
                    it += 1
                best = max(best, 2.0 * m * k * n * it / el)
        out[f"{name}_flops"] = best
    return out


def _read_texts(path: str) -> list[str]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def worker_m3search(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from m3search import M3Encoder

    texts = _read_texts(args.corpus)
    t0 = time.perf_counter()
    enc = M3Encoder.from_pretrained(args.model, device="cpu", dtype=args.dtype)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_now_kib()

    # Padded shape of every transformer forward call, from a hook on the backbone.
    calls: list[list[int]] = []
    backbone = _find_backbone(enc)
    if backbone is not None:

        def _hook(_module, fargs, kwargs):
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", fargs[0] if fargs else None)
            if mask is not None and mask.dim() == 2:
                calls.append([int(mask.shape[0]), int(mask.shape[1]), int(mask.sum())])
            elif ids is not None and ids.dim() == 2:
                calls.append([int(ids.shape[0]), int(ids.shape[1]), -1])

        backbone.register_forward_pre_hook(_hook, with_kwargs=True)

    t0 = time.perf_counter()
    enc.encode(texts[:8], max_length=args.max_length)
    warmup_s = time.perf_counter() - t0
    calls.clear()

    peak_load = _reset_peak_rss()
    load0 = _loadavg()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    emb = enc.encode(
        texts, dense=True, sparse=True, colbert=True, max_length=args.max_length, batch_size=args.batch_size
    )
    encode_s = time.perf_counter() - t0
    cpu_s = _cpu_s() - cpu0
    lengths = np.asarray(emb.n_tokens, np.int64)
    return {
        "side": "m3search",
        "dtype": str(enc.dtype).replace("torch.", ""),
        "requested_dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "encode_s": encode_s,
        "cpu_s": cpu_s,
        "cpu_per_wall": cpu_s / encode_s,
        "tokens": int(lengths.sum()),
        "lengths": lengths.tolist(),
        "truncated": int(emb.truncated),
        "calls": calls,
        "rss_loaded_kib": rss_loaded,
        "peak_rss_load_kib": peak_load,
        "loadavg_before": load0,
        "loadavg_after": _loadavg(),
        **_usage(),
    }


def _find_backbone(enc: Any):
    """The transformer module inside the encoder (the first attribute with a HF ``config``)."""
    import torch

    seen: set[int] = set()
    stack = [enc]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module) and hasattr(obj, "config") and hasattr(obj, "embeddings"):
            return obj
        if isinstance(obj, torch.nn.Module):
            stack.extend(obj.children())
        elif hasattr(obj, "__dict__"):
            stack.extend(v for v in vars(obj).values() if hasattr(v, "__dict__"))
    return None


def worker_flag(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from FlagEmbedding import BGEM3FlagModel

    texts = _read_texts(args.corpus)
    t0 = time.perf_counter()
    model = BGEM3FlagModel(args.model, use_fp16=False, devices="cpu")
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_now_kib()

    calls: list[dict[str, Any]] = []
    backbone = model.model.model  # the XLMRobertaModel inside the M3 wrapper

    def _pre(_module, _args, kwargs):
        mask = kwargs["attention_mask"]
        calls.append(
            {
                "shape": [int(mask.shape[0]), int(mask.shape[1])],
                "tokens": int(mask.sum()),
                "t0": time.perf_counter(),
                "c0": _cpu_s(),
            }
        )

    def _post(_module, _args, _kwargs, _output):
        calls[-1]["t1"] = time.perf_counter()
        calls[-1]["c1"] = _cpu_s()

    backbone.register_forward_pre_hook(_pre, with_kwargs=True)
    backbone.register_forward_hook(_post, with_kwargs=True)

    peak_load = _reset_peak_rss()
    load0 = _loadavg()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    out = model.encode(
        texts,
        batch_size=args.flag_batch_size,
        max_length=args.max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    total_s = time.perf_counter() - t0
    cpu_s = _cpu_s() - cpu0
    # The first forward is the probe; everything after it is the steady-state pass.
    probe, steady = calls[0], calls[1:]
    probe_s = probe["t1"] - probe["t0"]
    lengths = [len(c) + 1 for c in out["colbert_vecs"]]  # ColBERT drops [CLS]: n_tokens - 1 vectors
    return {
        "side": "FlagEmbedding",
        "dtype": str(next(backbone.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "probe_s": probe_s,
        "probe_shape": probe["shape"],
        "probe_tokens": probe["tokens"],
        "total_s": total_s,
        "encode_s": total_s - probe_s,
        "cpu_s": cpu_s - (probe["c1"] - probe["c0"]),  # steady state, like encode_s
        "cpu_per_wall": cpu_s / total_s,
        "tokens": int(np.sum(lengths)),
        "lengths": lengths,
        "calls": [[c["shape"][0], c["shape"][1], c["tokens"]] for c in steady],
        "rss_loaded_kib": rss_loaded,
        "peak_rss_load_kib": peak_load,
        "loadavg_before": load0,
        "loadavg_after": _loadavg(),
        **_usage(),
    }


def worker_long_m3search(args: argparse.Namespace) -> dict[str, Any]:
    """One long text, one ``encode`` call; peak RSS over it (the model's own memory excluded by the reset)."""
    from m3search import M3Encoder

    texts = _read_texts(args.corpus)
    enc = M3Encoder.from_pretrained(args.model, device="cpu", dtype=args.dtype)
    enc.encode(["a short warm-up text"])
    rss_loaded = _rss_now_kib()
    peak_load = _reset_peak_rss()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    emb = enc.encode(texts, max_length=args.max_length, warn_truncation=False)
    encode_s = time.perf_counter() - t0
    return {
        "side": "m3search",
        "dtype": str(enc.dtype).replace("torch.", ""),
        "attention": enc.model.config._attn_implementation,
        "token_budget": enc.token_budget,
        "encode_s": encode_s,
        "cpu_s": _cpu_s() - cpu0,
        "tokens": int(emb.n_tokens.sum()),
        "forwards": 1,
        "rss_loaded_kib": rss_loaded,
        "peak_rss_load_kib": peak_load,
        **_usage(),
    }


def worker_long_flag(args: argparse.Namespace) -> dict[str, Any]:
    """FlagEmbedding on the same text; its probe forward (same shape) is timed apart by hooks."""
    from FlagEmbedding import BGEM3FlagModel

    texts = _read_texts(args.corpus)
    model = BGEM3FlagModel(args.model, use_fp16=False, devices="cpu")
    model.encode(["a short warm-up text"], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    backbone = model.model.model
    calls: list[list[float]] = []
    backbone.register_forward_pre_hook(lambda *_: calls.append([time.perf_counter()]))
    backbone.register_forward_hook(lambda *_: calls[-1].append(time.perf_counter()))
    rss_loaded = _rss_now_kib()
    peak_load = _reset_peak_rss()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    out = model.encode(
        texts,
        batch_size=1,
        max_length=args.max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    total_s = time.perf_counter() - t0
    forward_s = [b - a for a, b in calls]
    return {
        "side": "FlagEmbedding",
        "dtype": str(next(backbone.parameters()).dtype).replace("torch.", ""),
        "attention": backbone.config._attn_implementation,
        "total_s": total_s,
        # the first forward is the batch-size probe when there is a second one
        "encode_s": total_s - (forward_s[0] if len(forward_s) > 1 else 0.0),
        "forward_s": forward_s,
        "cpu_s": _cpu_s() - cpu0,
        "tokens": sum(len(c) + 1 for c in out["colbert_vecs"]),
        "forwards": len(calls),
        "rss_loaded_kib": rss_loaded,
        "peak_rss_load_kib": peak_load,
        **_usage(),
    }


WORKERS = {
    "build": worker_build,
    "peak": worker_peak,
    "m3search": worker_m3search,
    "flag": worker_flag,
    "long-m3search": worker_long_m3search,
    "long-flag": worker_long_flag,
}


# --------------------------------------------------------------------------- orchestration


def _run_worker(python: Path, name: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    cmd = [
        str(python),
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--worker-out",
        str(out),
        "--model",
        str(args.model),
        "--max-length",
        str(args.max_length),
        *extra,
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"[encode.py] running {name} {' '.join(extra)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    result["process_s"] = time.perf_counter() - t0
    return result


def useful_flops(lengths: list[int], cfg: dict[str, Any]) -> float:
    """Forward FLOPs over real tokens: 24h² per token per layer (QKV, O, FFN with 4h),
    4hL per token per layer for attention over the text's own length L, plus the ColBERT
    (2h²) and sparse (2h) heads."""
    h, layers, ffn = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    per_token = layers * (8 * h * h + 4 * h * ffn) + 2 * h * h + 2 * h
    return float(sum(n * per_token + layers * 4 * h * n * n for n in lengths))


def padding_fraction(calls: list[list[int]]) -> float | None:
    padded = sum(b * s for b, s, _ in calls)
    real = sum(t for _, _, t in calls)
    if not calls or any(t < 0 for *_, t in calls):
        return None
    return 1.0 - real / padded


def _lscpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    fields = dict(re.findall(r"^([^:]+):\s+(.*)$", text, re.M))
    flags = fields.get("Flags", "").split()
    isa = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2") if f in flags]
    return (
        f"{fields.get('Model name', '?')}, {fields.get('CPU(s)', '?')} CPUs "
        f"({fields.get('Hypervisor vendor', 'bare metal')} VM), {', '.join(isa)}"
    )


def long_text(data: Path, tokenizer_json: Path, n_tokens: int) -> str:
    """Cranfield abstracts joined until the model's tokenizer gives more than ``n_tokens`` tokens
    (both sides then cut at ``max_length``, so both encode exactly the same ids)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    docs, text = _read_jsonl(data / "cranfield" / "corpus.jsonl"), ""
    for i in range(0, len(docs), 16):
        text = " ".join(docs[: i + 16])
        if len(tok.encode(text).ids) > n_tokens:
            return text
    raise SystemExit(f"cranfield holds fewer than {n_tokens} tokens")


def run_long(args: argparse.Namespace) -> dict[str, Any]:
    """``--long N``: time and peak RSS of one N-token document, m3search vs FlagEmbedding (issue 11, point 5)."""
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="m3long-"))
    args.model = Path(args.model) if args.model else tmp / "bge-m3-random"
    args.max_length = args.long
    me, rows, build, res = Path(sys.executable), [], None, {}
    try:
        if not (args.model / "config.json").is_file():
            build = _run_worker(me, "build", args, ["--layers", str(args.layers)] if args.layers else [])
        cfg = json.loads((args.model / "config.json").read_text())
        corpus = tmp / "long.json"
        corpus.write_text(json.dumps([long_text(_shared_data(), args.model / "tokenizer.json", args.long)]))
        common = ["--corpus", str(corpus)]
        sides = [(me, "long-m3search", ["--dtype", "auto"]), (_flag_python(), "long-flag", [])]
        sides.append((me, "long-m3search", ["--dtype", "float32"]))
        for python, worker, extra in sides:
            if (extra[1] if extra else "flag") in args.skip:
                continue
            rows.append(_run_worker(python, worker, args, common + extra))
            res = {"cfg": cfg, "build": build, "rows": rows, "uptime_before": uptime_before, "argv": sys.argv[1:]}
            res["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            if args.json:  # after every side: a run stopped early keeps what it measured
                Path(args.json).write_text(json.dumps(res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the model lives there only when --model was not given
    res["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if args.json:
        Path(args.json).write_text(json.dumps(res))
    return res


def render_long(res: dict[str, Any], n_tokens: int) -> str:
    cfg, build, gib = res["cfg"], res["build"], 2**20
    layers = cfg["num_hidden_layers"]
    lines = [
        f"Date: {res.get('date', '?')}. Machine: {_lscpu()}, shared with other jobs (load below; wall times are noisy, "
        "CPU seconds steadier).",
        f"Command: `nice -n 5 python benchmarks/encode.py {' '.join(shlex.quote(a) for a in res.get('argv', []))}`.",
        f"Model: random weights, bge-m3's shape with {layers} layers (hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads, FFN {cfg['intermediate_size']}, vocab {cfg['vocab_size']:,}, "
        f"positions {cfg['max_position_embeddings']:,})"
        + (f", built in {build['build_s']:.0f} s" if build else "")
        + f". Input: one document of cranfield text cut at max_length {n_tokens} on both sides; dense + sparse + "
        "ColBERT. Each side in its own process, after loading and a short warm-up; peak RSS from getrusage after "
        "resetting the peak (clear_refs), so it is the largest RSS during the encode call, model included; "
        "'working memory' = that peak minus RSS before the call.",
        "",
        "| side | dtype | attention | tokens | forward passes | encode s | CPU s | peak RSS | working memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        passes = r["forwards"]
        note = f"{passes}" + (f" (probe {r['forward_s'][0]:.0f} s, not counted)" if passes > 1 else "")
        lines.append(
            f"| {r['side']} | {r['dtype']} | {r['attention']} | {r['tokens']:,} | {note} | {r['encode_s']:.0f} | "
            f"{r['cpu_s']:.0f}{' (all passes)' if passes > 1 else ''} | {r['peak_rss_kib'] / gib:.2f} GiB | "
            f"{(r['peak_rss_kib'] - r['rss_loaded_kib']) / gib:.2f} GiB |"
        )
    if layers != 24:
        lines += [
            "",
            f"Only {layers} of bge-m3's 24 layers (machine time): in inference each layer's activations are freed "
            "before the next, so the 24-layer model's working memory should be about the same (not measured), "
            f"and its time about {24 / layers:.0f}× the encode s and CPU s above. RSS counts only the touched "
            "pages of memory-mapped weights, so 'RSS loaded' differs between the sides by how they load.",
        ]
    lines += ["", f"Load: before `{res.get('uptime_before', '?')}`; after `{res.get('uptime_after', '?')}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="model folder to reuse (built there if missing; default: a temp dir)")
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--cranfield", type=int, default=80, help="cranfield abstracts (default 80)")
    ap.add_argument("--xquad", type=int, default=50, help="xquad-r sentences per language, 6 languages (default 50)")
    ap.add_argument("--queries", type=int, default=40, help="short queries, cranfield + xquad-r (default 40)")
    ap.add_argument("--max-length", type=int, default=8192, help="same cut on both sides (default 8192)")
    ap.add_argument("--batch-size", type=int, default=None, help="m3search batch_size (default: its token budget)")
    ap.add_argument(
        "--flag-batch-size",
        type=int,
        default=32,
        help="FlagEmbedding batch_size (default 32; its own default 256 pads 256 of the longest "
        "texts into its probe batch, which needs > 20 GB of attention scores here)",
    )
    ap.add_argument("--peak-window", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument(
        "--skip", action="append", default=[], choices=["flag", "float32", "auto"], help="leave a side out (repeatable)"
    )
    ap.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    ap.add_argument("--json", help="--long: also write the raw numbers here, after every side")
    ap.add_argument("--report-from", help="--long: rebuild the report from a --json file instead of measuring")
    ap.add_argument(
        "--layers",
        type=int,
        help="build the model with this many layers instead of 24 (inference frees each layer's activations, so "
        "peak memory is per layer and time scales with the layers)",
    )
    ap.add_argument(
        "--long", type=int, metavar="TOKENS", help="instead: time and peak RSS of ONE document of TOKENS tokens"
    )
    args = ap.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        return
    if args.long:
        res = json.loads(Path(args.report_from).read_text()) if args.report_from else run_long(args)
        publish(
            "encode.py long",
            f"Long input: one {args.long:,}-token document (`benchmarks/encode.py --long`)",
            render_long(res, args.long),
            no_write=args.no_write,
        )
        return

    load_before = _loadavg()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    flag_py = _flag_python()
    if "flag" not in args.skip and not flag_py.is_file():
        raise SystemExit(f"FlagEmbedding interpreter not found at {flag_py} (set M3SEARCH_FLAG_PYTHON or --skip flag)")

    texts = load_corpus(_shared_data(), args.cranfield, args.xquad, args.queries)
    tmp = Path(tempfile.mkdtemp(prefix="m3bench-"))
    corpus = tmp / "corpus.json"
    corpus.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    own_model = args.model is None
    args.model = Path(args.model) if args.model else tmp / "bge-m3-random"
    me = Path(sys.executable)
    try:
        build = None
        if not (args.model / "config.json").is_file():
            build = _run_worker(me, "build", args, [])
        cfg = json.loads((args.model / "config.json").read_text())
        peak = _run_worker(me, "peak", args, [])
        rows: list[dict[str, Any]] = []
        common = ["--corpus", str(corpus)] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
        if "auto" not in args.skip:
            rows.append(_run_worker(me, "m3search", args, common + ["--dtype", "auto"]))
        if "float32" not in args.skip:
            rows.append(_run_worker(me, "m3search", args, common + ["--dtype", "float32"]))
        if "flag" not in args.skip:
            rows.append(_run_worker(flag_py, "flag", args, common + ["--flag-batch-size", str(args.flag_batch_size)]))
    finally:
        if own_model:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            corpus.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)

    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report = render(args, texts, cfg, build, peak, rows, uptime_before, uptime_after, load_before)
    publish("encode.py", "Encode throughput (`benchmarks/encode.py`)", report, no_write=args.no_write)


def render(args, texts, cfg, build, peak, rows, uptime_before, uptime_after, load_before) -> str:
    flag = next((r for r in rows if r["side"] == "FlagEmbedding"), None)
    flag_tps = flag["tokens"] / flag["encode_s"] if flag else None
    lengths = rows[0]["lengths"] if rows else []
    lines = [
        "| side | dtype | texts | tokens | steady s | tokens/s | × FlagEmbedding | padding | peak RSS encode (load) | "
        "useful GFLOP/s | % of bf16 mm peak | cpu/wall | tokens/CPU-s | × FlagEmbedding per CPU-s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    flag_tpc = flag["tokens"] / flag["cpu_s"] if flag else None
    for r in rows:
        tps = r["tokens"] / r["encode_s"]
        tpc = r["tokens"] / r["cpu_s"]  # CPU time spent in the same interval as encode_s
        flops = useful_flops(r["lengths"], cfg) / r["encode_s"]
        pad = padding_fraction(r["calls"])
        lines.append(
            f"| {r['side']} | {r['dtype']} | {len(r['lengths'])} | {r['tokens']:,} | {r['encode_s']:.1f} | "
            f"{tps:,.0f} | {f'{tps / flag_tps:.2f}×' if flag_tps else 'n/a'} | "
            f"{f'{pad:.1%}' if pad is not None else 'n/a'} | {r['peak_rss_kib'] / 2**20:.2f} ({r.get('peak_rss_load_kib', 0) / 2**20:.2f}) GiB | "
            f"{flops / 1e9:,.0f} | {flops / peak['bfloat16_flops']:.1%} | {r['cpu_per_wall']:.2f} | "
            f"{tpc:,.0f} | {f'{tpc / flag_tpc:.2f}×' if flag_tpc else 'n/a'} |"
        )
    notes = []
    for r in rows:
        extra = (
            f"probe batch {r['probe_shape'][0]}×{r['probe_shape'][1]} ({r['probe_tokens']:,} real tokens) "
            f"{r['probe_s']:.1f} s, not counted"
            if r["side"] == "FlagEmbedding"
            else f"untimed warm-up (8 texts) {r['warmup_s']:.1f} s"
        )
        notes.append(
            f"- {r['side']} {r['dtype']}: load {r['load_s']:.1f} s, RSS after load {r['rss_loaded_kib'] / 2**20:.2f} GiB; "
            f"{extra}; {len(r['calls'])} forward calls; load average during encode "
            f"{r['loadavg_before'][0]:.2f} → {r['loadavg_after'][0]:.2f}"
        )
    if len({r["tokens"] for r in rows}) > 1:
        notes.append(
            "- WARNING: the sides counted different token totals: "
            + ", ".join(f"{r['side']} {r['dtype']} {r['tokens']}" for r in rows)
        )
    cmd = "python benchmarks/encode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    qs = sorted(lengths)
    pct = (lambda p: qs[min(len(qs) - 1, int(p * len(qs)))]) if qs else (lambda p: 0)
    head = [
        f"Date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}. Machine: {_lscpu()}; "
        f"torch threads {peak['threads']}, torch {peak['torch']}.",
        f"Command: `nice -n 5 {cmd.strip()}`.",
        f"Model: random weights, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads, FFN {cfg['intermediate_size']}, vocab {cfg['vocab_size']:,}, "
        f"positions {cfg['max_position_embeddings']:,})"
        + (f", built in {build['build_s']:.0f} s" if build else "")
        + ".",
        f"Corpus: {len(texts)} texts ({args.cranfield} cranfield abstracts, {args.xquad} xquad-r sentences × "
        f"{len(XQUAD_LANGS)} languages, {args.queries} queries); tokens per text min {qs[0] if qs else 0}, "
        f"median {pct(0.5)}, p95 {pct(0.95)}, max {qs[-1] if qs else 0}; max_length {args.max_length} on both sides; "
        f"dense + sparse + ColBERT on every side. FlagEmbedding batch_size {args.flag_batch_size}; "
        f"m3search batch_size {args.batch_size or 'default (token budget)'}.",
        f"Measured matmul peak (best `torch.mm`, {peak['threads']} threads): bf16 "
        f"{peak['bfloat16_flops'] / 1e12:.2f} TFLOP/s, fp32 {peak['float32_flops'] / 1e12:.2f} TFLOP/s.",
        "Columns: tokens/s over the steady-state encode (tokenization, forward, pooling, output arrays); "
        "padding = padded positions / all positions fed to the transformer; peak RSS during the encode call "
        "(in brackets: during model load and warm-up, which includes the memory-mapped fp32 checkpoint); "
        "useful GFLOP/s counts real tokens only; tokens/CPU-s divides by the CPU time the process got, "
        "which is steadier than wall time when other jobs share the cores.",
        f"Load: before `{uptime_before}`; after `{uptime_after}` (2 cores shared with other jobs; "
        "cpu/wall near 2.0 means the side had both cores).",
        "",
    ]
    return "\n".join(head + lines + [""] + notes) + "\n"


if __name__ == "__main__":
    main()
