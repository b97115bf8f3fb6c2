"""FlagEmbedding 1.4.2 reference outputs, computed in a separate interpreter.

Why a subprocess: FlagEmbedding cannot be imported under transformers 5
(``transformers.modeling_attn_mask_utils`` is gone), and the project must not be held
below transformers 5. So the reference runs in ``.venv-flag`` (FlagEmbedding 1.4.2 +
transformers 4.57) and the two sides meet only through files.

Two halves live here:

* the **script** (``python flag_reference.py REQUEST.json OUT.npz``, run with the
  ``.venv-flag`` interpreter) loads ``BGEM3FlagModel(path, use_fp16=False, devices="cpu")``,
  encodes the request's texts and/or scores its pairs, and writes plain arrays;
* the **caller** (:func:`flag_python`, :func:`run_reference`), imported by the tests
  with only the standard library and NumPy.

Request (JSON)::

    {"model": "/path/to/model",
     "texts": [...], "batch_size": 4, "max_length": 512,            # encode (optional)
     "scores": [                                                     # compute_score jobs (optional)
        {"name": "b1", "pairs": [[q, p], ...], "batch_size": 1,
         "max_query_length": 64, "max_passage_length": 512,
         "weights": [0.4, 0.2, 0.4] | null}],                        # null = FlagEmbedding's default
     "also": [{"prefix": "other_", "model": ..., "scores": [...]}]}  # more models, one process

Output (``.npz``): ``dense`` (n, hidden); ``colbert`` (total, hidden) with
``colbert_offsets`` (n + 1); lexical weights as ``lex_ids`` / ``lex_values`` (ids sorted
within each text) with ``lex_offsets`` (n + 1); ``score_<name>_<key>`` for each job and compute_score key;
``meta`` (a JSON string: versions, the request's numbers, the model's forward-call shapes,
so a test can check that several batches really were formed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCORE_KEYS = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")


# --------------------------------------------------------------------------- caller side


def flag_python() -> Path | None:
    """The ``.venv-flag`` interpreter (env ``M3SEARCH_FLAG_PYTHON`` overrides), or None if absent."""
    path = Path(os.environ.get("M3SEARCH_FLAG_PYTHON", REPO / ".venv-flag" / "bin" / "python"))
    return path if path.is_file() and os.access(path, os.X_OK) else None


def run_reference(request: dict[str, Any], *, python: Path | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run this file under FlagEmbedding's interpreter; return its arrays plus ``meta`` (a dict).

    Raises RuntimeError with the subprocess's stderr tail if it fails.
    """
    python = python or flag_python()
    if python is None:
        raise RuntimeError("FlagEmbedding interpreter not found (set M3SEARCH_FLAG_PYTHON)")
    with tempfile.TemporaryDirectory(prefix="flagref-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "out.npz"
        req.write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [str(python), str(Path(__file__).resolve()), str(req), str(out)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"FlagEmbedding reference failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        with np.load(out, allow_pickle=False) as npz:
            result = {k: npz[k] for k in npz.files}
    result["meta"] = json.loads(str(result["meta"]))
    return result


def lexical_dicts(result: dict[str, Any]) -> list[dict[int, float]]:
    """Rebuild FlagEmbedding's per-text lexical weights as ``{token_id: weight}`` dicts."""
    o, ids, vals = result["lex_offsets"], result["lex_ids"], result["lex_values"]
    return [dict(zip(ids[o[i] : o[i + 1]].tolist(), vals[o[i] : o[i + 1]].tolist())) for i in range(len(o) - 1)]


def mixed_texts(data: Path) -> list[str]:
    """Parity inputs: very different lengths and scripts, order not sorted by length.

    Five xquad-r sentences in each of six languages, eight cranfield abstracts, three
    short queries, three long concatenations (past 512 tokens, so truncation is
    compared too; one mixes all six scripts) and an empty string.
    """

    def docs(path: Path, n: int) -> list[str]:
        with path.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        step = max(1, len(rows) // n)
        return [(r.get("title", "") + " " + r.get("text", "")).strip() for r in rows[::step][:n]]

    langs = ("en", "de", "es", "ru", "zh", "ar")
    xquad = {lang: docs(data / "xquad-r" / lang / "corpus.jsonl", 5) for lang in langs}
    cran = docs(data / "cranfield" / "corpus.jsonl", 40)
    queries = docs(data / "cranfield" / "queries.jsonl", 2) + docs(data / "xquad-r" / "ar" / "queries.jsonl", 1)
    texts = [t for lang in langs for t in xquad[lang]] + cran[:8] + queries
    texts += [
        " ".join(cran[8:12]),  # ~1,000 tokens
        " ".join(cran[12:40]),  # ~7,000 tokens
        " ".join(t for lang in langs for t in xquad[lang]),  # all six scripts in one text
        "",
    ]
    order = sorted(range(len(texts)), key=lambda i: (i * 17) % len(texts))
    return [texts[i] for i in order]


# --------------------------------------------------------------------------- script side


def _flatten_lexical(weights: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets, ids, vals = [0], [], []
    for d in weights:
        items = sorted((int(k), float(v)) for k, v in d.items())
        ids += [k for k, _ in items]
        vals += [v for _, v in items]
        offsets.append(len(ids))
    return np.asarray(ids, np.int64), np.asarray(vals, np.float32), np.asarray(offsets, np.int64)


def _run_one(request: dict[str, Any], BGEM3FlagModel) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    t0 = time.perf_counter()
    model = BGEM3FlagModel(request["model"], use_fp16=False, devices="cpu")
    meta: dict[str, Any] = {"load_s": time.perf_counter() - t0}

    # Record each transformer forward call's padded shape and real-token count.
    calls: list[list[int]] = []

    def _hook(_module, _args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None:
            calls.append([int(mask.shape[0]), int(mask.shape[1]), int(mask.sum())])

    model.model.model.register_forward_pre_hook(_hook, with_kwargs=True)

    out: dict[str, np.ndarray] = {}
    texts = request.get("texts")
    if texts is not None:
        t0 = time.perf_counter()
        enc = model.encode(
            texts,
            batch_size=int(request["batch_size"]),
            max_length=int(request["max_length"]),
            return_dense=True,
            return_sparse=True,
            return_colbert_vecs=True,
        )
        meta["encode_s"] = time.perf_counter() - t0
        meta["encode_calls"] = list(calls)
        calls.clear()
        out["dense"] = np.asarray(enc["dense_vecs"], np.float32).reshape(len(texts), -1)
        colbert = [np.asarray(c, np.float32) for c in enc["colbert_vecs"]]
        out["colbert"] = np.concatenate(colbert, axis=0)
        out["colbert_offsets"] = np.concatenate([[0], np.cumsum([len(c) for c in colbert])]).astype(np.int64)
        out["lex_ids"], out["lex_values"], out["lex_offsets"] = _flatten_lexical(enc["lexical_weights"])

    meta["score_calls"], meta["score_s"] = {}, {}
    for job in request.get("scores", []):
        weights = job.get("weights")
        t0 = time.perf_counter()
        scores = model.compute_score(
            [tuple(p) for p in job["pairs"]],
            batch_size=int(job["batch_size"]),
            max_query_length=int(job["max_query_length"]),
            max_passage_length=int(job["max_passage_length"]),
            weights_for_different_modes=list(weights) if weights is not None else None,
        )
        meta["score_s"][job["name"]] = time.perf_counter() - t0
        meta["score_calls"][job["name"]] = list(calls)
        calls.clear()
        for key in SCORE_KEYS:
            out[f"score_{job['name']}_{key}"] = np.asarray(scores[key], np.float64)
    return out, meta


def _main(request_path: str, out_path: str) -> None:
    """Run the request, then each of its ``also`` sub-requests (other models, same process:
    FlagEmbedding's import is the slow part), whose keys get the sub-request's ``prefix``."""
    import FlagEmbedding
    import torch
    import transformers
    from FlagEmbedding import BGEM3FlagModel

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    out, meta = _run_one(request, BGEM3FlagModel)
    meta.update(
        flagembedding=getattr(FlagEmbedding, "__version__", "1.4.2"),
        transformers=transformers.__version__,
        torch=torch.__version__,
    )
    for sub in request.get("also", []):
        sub_out, sub_meta = _run_one(sub, BGEM3FlagModel)
        out.update({sub["prefix"] + k: v for k, v in sub_out.items()})
        meta[sub["prefix"]] = sub_meta
    out["meta"] = np.asarray(json.dumps(meta))
    np.savez(out_path, **out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: flag_reference.py REQUEST.json OUT.npz  (run with the .venv-flag interpreter)")
    _main(sys.argv[1], sys.argv[2])
