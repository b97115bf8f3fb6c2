"""Hybrid evaluation on BEIR-format folders: index once, search every mode, score with trec_eval.

Why a module of its own: the same numbers feed the CLI (``m3search eval``), the
benchmarks and the tests, so loading, running and scoring are plain library
functions; the CLI only formats. Metrics come from ``pytrec_eval`` (trec_eval's C
code: linear-gain nDCG, ties broken by document id descending), not from our own
formulas. MRR@k is trec_eval's ``recip_rank`` over each ranking cut at ``k`` in
trec_eval's own order.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
(``_id``, ``text``) and ``qrels/test.tsv`` (``query-id``, ``corpus-id``, ``score``); each file may be
gzip-compressed instead (``corpus.jsonl.gz``, ...). Each document is ``(title + " " + text).strip()``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3search.engines.files import (
    lock_exclusive,
    nearest_existing,
    refuse_uncreatable,
    write_durably,
    write_files_durably,
)
from m3search.plan import DEFAULT_CANDIDATES as PLAN_DEFAULT_CANDIDATES
from m3search.plan import DEFAULT_WEIGHTS, PRESETS, SearchPlan, check_fusion, check_weights, parse_mode
from m3search.plan import MODES as REPRESENTATIONS

__all__ = [
    "MODES",
    "BeirData",
    "load_beir",
    "has_relevant",
    "compute_metrics",
    "evaluate",
    "format_table",
    "to_markdown",
    "plot_results",
    "write_reports",
    "default_cache_dir",
    "reference_table",
]

#: Every named search mode (:data:`m3search.plan.PRESETS`), in report order.
MODES = tuple(PRESETS)
#: Recall is reported at this depth (and every mode retrieves at least this many hits).
RECALL_AT = 100
#: Default candidates per first-stage list for eval: the collection's default (BGE-M3's paper re-ranks the
#: dense top-200). Measured with the proxy model on cranfield against the exhaustive table: nDCG@10 loses
#: 0.0000 in every mode at 200 (0.0008 at 100), Recall@100 at most 0.009 (0.024 at 100, where the re-ranked
#: pool is barely larger than the 100 hits that recall is computed on).
DEFAULT_CANDIDATES = PLAN_DEFAULT_CANDIDATES
#: Largest relevance grade accepted (and smallest: ``-MAX_GRADE``). Why a bound: trec_eval sizes arrays by the
#: grade (10**8 took 800 MB, 2**31 was killed for memory) and keeps it as a C int (2**32 wrapped to 0); graded
#: judgements in use stay within single digits.
MAX_GRADE = 1000
_CACHE_VERSION = 1


@dataclass
class BeirData:
    """A loaded BEIR folder: corpus in file order, queries that have judgments, graded qrels."""

    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    corpus_sha256: str
    #: Judged query ids that the queries file lacks: left out of every mean, and said so in the reports.
    unqueried: list[str] = field(default_factory=list)


def _require_pytrec_eval():
    try:
        import pytrec_eval
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("evaluation needs pytrec-eval-terrier: pip install 'm3search[eval]'") from None
    return pytrec_eval


def check_installed() -> None:
    """Fail before any encoding when the ``eval`` extra is missing (metrics and the PNG chart need it)."""
    import importlib.util

    _require_pytrec_eval()
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the PNG chart needs matplotlib: pip install 'm3search[eval]'")


# ---------------------------------------------------------------------------------------------- loading


def load_beir(data_dir: str | Path, *, queries_dir: str | Path | None = None, split: str = "test") -> BeirData:
    """Load a BEIR folder. ``queries_dir`` takes the queries from another folder (cross-lingual runs).

    Queries ids must be shared between the folders. The qrels used are those that point
    into this corpus: ``queries_dir``'s own if its corpus ids are ours (e.g. a folder that
    holds only translated queries and the original qrels), else ``data_dir``'s.
    """
    _check_split(split)
    return _read_beir_texts(Path(data_dir), queries_dir).judged(split)


def _check_split(split: Any) -> None:
    """Refuse a split that is no qrels file name (``qrels/<split>.tsv``)."""
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", split):
        raise ValueError(f"split must be a qrels file name such as 'test' or 'dev' (qrels/<split>.tsv), got {split!r}")


@dataclass
class _BeirTexts:
    """A BEIR folder's corpus and queries, read once for any of its splits (:meth:`judged`). Why: finetune's
    fallback from an unusable ``train.tsv`` to ``test.tsv`` read the whole corpus a second time."""

    data_dir: Path
    queries_dir: str | Path | None
    corpus_path: Path
    doc_ids: list[str]
    doc_texts: list[str]
    queries_path: Path
    all_queries: dict[str, str]

    def judged(self, split: str) -> BeirData:
        """The corpus with the queries and qrels of ``qrels/<split>.tsv`` (see :func:`load_beir`)."""
        from .sources import locate

        qdir = Path(self.queries_dir) if self.queries_dir is not None else self.data_dir
        corpus_set = set(self.doc_ids)
        folders = [qdir, self.data_dir] if self.queries_dir is not None else [self.data_dir]
        qrels: dict[str, dict[str, int]] | None = None
        problems = []  # why each qrels file was not used, for the error
        for folder in folders:
            path = locate(folder / "qrels", f"{split}.tsv")
            if path is None:
                problems.append(f"{folder / 'qrels' / split}.tsv does not exist")
                continue
            loaded = _read_qrels(path)
            docs = {d for rel in loaded.values() for d in rel}
            if docs and docs <= corpus_set:
                qrels = loaded
                break
            absent = sorted(docs - corpus_set)
            problems.append(
                f"{path} is empty"
                if not docs
                else f"{path} judges {len(absent)} document id(s) absent from the corpus: {absent[:5]}"
                + (" ..." if len(absent) > 5 else "")
            )
        if qrels is None:
            raise ValueError(f"no qrels/{split}.tsv whose corpus ids are in {self.corpus_path}: " + "; ".join(problems))
        queries = {qid: self.all_queries[qid] for qid in qrels if qid in self.all_queries}
        if not queries:
            raise ValueError(
                f"no judged query of qrels/{split}.tsv is in {self.queries_path} (are the query ids shared?)"
            )
        unqueried = [qid for qid in qrels if qid not in self.all_queries]  # a queries file cut down, or a mistake
        qrels = {qid: qrels[qid] for qid in queries}
        _check_queries(self.queries_path, queries)
        return BeirData(
            name=_dataset_name(self.data_dir, self.queries_dir),
            doc_ids=self.doc_ids,
            doc_texts=self.doc_texts,
            queries=queries,
            qrels=qrels,
            corpus_sha256=self.corpus_sha256,
            unqueried=unqueried,
        )

    @functools.cached_property
    def corpus_sha256(self) -> str:
        """Hashed when a split is first judged usable, once."""
        return _file_sha256(self.corpus_path)


def _read_beir_texts(data_dir: Path, queries_dir: str | Path | None) -> _BeirTexts:
    """Read ``data_dir``'s corpus and the queries (from ``queries_dir`` where given), refusing repeated ids."""
    from .sources import locate, read_jsonl

    corpus_path = locate(data_dir, "corpus.jsonl")
    if corpus_path is None:
        raise ValueError(f"{str(data_dir)!r} is not a BEIR folder: corpus.jsonl missing (and no corpus.jsonl.gz)")

    doc_ids: list[str] = []
    doc_texts: list[str] = []
    for rec in read_jsonl(corpus_path, id_field="_id", metadata=False):  # eval stores no metadata
        doc_ids.append(rec.id)
        doc_texts.append(rec.text)  # (title + " " + text).strip(), by sources' default text fields
    _refuse_repeated(doc_ids, corpus_path, "document")

    qdir = Path(queries_dir) if queries_dir is not None else data_dir
    queries_path = locate(qdir, "queries.jsonl")
    if queries_path is None:
        raise ValueError(f"{str(qdir)!r}: queries.jsonl missing (and no queries.jsonl.gz)")
    read = [
        (rec.id, rec.text) for rec in read_jsonl(queries_path, id_field="_id", text_fields=["text"], metadata=False)
    ]
    _refuse_repeated([q for q, _ in read], queries_path, "query")  # else the last text of an id was judged, silently
    return _BeirTexts(data_dir, queries_dir, corpus_path, doc_ids, doc_texts, queries_path, dict(read))


def _refuse_repeated(ids: Sequence[str], path: Path, what: str) -> None:
    """A ``what`` id that occurs twice in ``path`` is an error naming the first few."""
    from .plan import repeated

    if dup := repeated(ids):
        raise ValueError(f"{path}: {len(dup)} {what} id(s) occur more than once: {dup[:5]}; each id must be unique")


def _check_queries(path: Path, queries: Mapping[str, str]) -> None:
    """Refuse a judged query that no search accepts (an empty text) now, naming it, not after indexing the corpus."""
    from .plan import check_query

    for qid, text in queries.items():
        try:
            check_query(text)
        except ValueError as e:
            from .sources import _utf8_lines

            # the line of the record that holds it (ids are unique)
            lineno = next(n for n, line in _utf8_lines(path) if line.strip() and str(json.loads(line)["_id"]) == qid)
            raise ValueError(f"{path}:{lineno}: query {qid!r}: {e}") from None


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Read as corpus and queries are (``sources._utf8_lines``): a BOM is skipped, a bad byte names its line."""
    from .sources import _utf8_lines

    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _utf8_lines(path, name=str(path)):
        parts = line.rstrip("\r\n").split("\t")
        if lineno == 1 and parts[:1] == ["query-id"]:
            continue
        if not line.strip():
            continue
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(parts)}")
        try:
            score = int(parts[2])
        except ValueError:
            header = " (a header row reads query-id, corpus-id, score)" if lineno == 1 else ""
            raise ValueError(f"{path}:{lineno}: relevance {parts[2]!r} is not an integer{header}") from None
        _check_grade(score, f"{path}:{lineno}")
        judged = qrels.setdefault(parts[0], {})
        if judged.setdefault(parts[1], score) != score:  # else the later line's grade was used, silently
            raise ValueError(
                f"{path}:{lineno}: query {parts[0]!r}, document {parts[1]!r}: grade {score} here, "
                f"{judged[parts[1]]} on an earlier line; keep one judgement per pair"
            )
    return qrels


def has_relevant(grades: Mapping[str, int]) -> bool:
    """Whether a query's judgements hold a relevant document (grade > 0, trec_eval's relevance level 1).

    Why it matters: a judged query without one scores 0 in every metric; eval's means count it, as BEIR's
    do (the mean of trec_eval's per-query values), while tune leaves it out (it scores 0 under every setting,
    so it cannot tell settings apart). Both report how many there were.
    """
    return any(g > 0 for g in grades.values())


def _check_grade(grade: int, where: str) -> None:
    """Refuse a relevance grade outside ``[-MAX_GRADE, MAX_GRADE]`` (see :data:`MAX_GRADE`), naming ``where``."""
    if not -MAX_GRADE <= grade <= MAX_GRADE:
        raise ValueError(f"{where}: relevance {grade} is outside -{MAX_GRADE} .. {MAX_GRADE}")


def _dataset_name(data_dir: Path, queries_dir: str | Path | None) -> str:
    def short(p: Path) -> str:
        p = p.resolve()
        return f"{p.parent.name}/{p.name}" if p.parent.name and p.parent.name != "data" else p.name

    name = short(data_dir)
    if queries_dir is not None and Path(queries_dir).resolve() != data_dir.resolve():
        name = f"{short(Path(queries_dir))} -> {name}"
    return name


def _file_sha256(path: Path) -> str:
    """Of the content (a .gz's decompressed): a compressed copy of a corpus is the same corpus to the cache."""
    from .sources import open_bytes

    h = hashlib.sha256()
    with open_bytes(path, str(path)) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- metrics


def compute_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    k: int = 10,
    recall_at: int = RECALL_AT,
) -> dict[str, Any]:
    """Mean nDCG@k, Recall@recall_at and MRR@k over every judged query (a query without results scores 0).

    ``run`` maps query id -> {doc id: score}; trec_eval re-sorts by score as float32 (ties: doc id descending).
    Returns ``{"ndcg@k": float, "recall@N": float, "mrr@k": float, "per_query": {qid: {...}}}``.
    """
    pytrec_eval = _require_pytrec_eval()
    if k < 1 or recall_at < 1:
        raise ValueError(f"cutoffs must be >= 1, got k={k}, recall_at={recall_at}")
    qrels = {q: {d: int(s) for d, s in rel.items()} for q, rel in qrels.items() if rel}
    for q, rel in qrels.items():
        for d, grade in rel.items():
            _check_grade(grade, f"query {q!r}, document {d!r}")
    if not qrels:
        raise ValueError("qrels are empty")
    run = {q: {d: float(s) for d, s in hits.items()} for q, hits in run.items() if q in qrels and hits}
    names = (f"ndcg@{k}", f"recall@{recall_at}", f"mrr@{k}")
    per_query = {q: dict.fromkeys(names, 0.0) for q in qrels}
    if run:
        full = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{k}", f"recall.{recall_at}"}).evaluate(run)
        cut = {q: dict(_trec_order(hits)[:k]) for q, hits in run.items()}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        for q, m in full.items():
            per_query[q][names[0]] = m[f"ndcg_cut_{k}"]
            per_query[q][names[1]] = m[f"recall_{recall_at}"]
        for q, m in rr.items():
            per_query[q][names[2]] = m["recip_rank"]
    n = len(per_query)
    out: dict[str, Any] = {name: math.fsum(pq[name] for pq in per_query.values()) / n for name in names}
    out["per_query"] = per_query
    return out


def _trec_order(hits: Mapping[str, float]) -> list[tuple[str, float]]:
    """trec_eval's ranking: score descending, ties by document id descending.

    trec_eval keeps scores as C floats, so scores equal in float32 tie (as ``tuning`` models it):
    cutting in float64 order would give MRR@k another top k than nDCG@k's.
    """
    import numpy as np

    return sorted(hits.items(), key=lambda kv: (np.float32(kv[1]), kv[0]), reverse=True)


# ---------------------------------------------------------------------------------------------- running


def default_cache_dir() -> Path:
    """Where eval keeps its indexes: ``$M3SEARCH_CACHE_DIR/eval`` or ``~/.cache/m3search/eval``."""
    base = os.environ.get("M3SEARCH_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "m3search") / "eval"


def cache_folder(cache_dir: str | Path | None, *, make: bool = True) -> Path:
    """The index cache folder (``cache_dir``, else :func:`default_cache_dir`), created (``make=False``: only
    checked that it can be, for a run that may still be refused and then leaves nothing); a ValueError naming it
    when it cannot be. Why: a cache under a file failed with only "[Errno 20] Not a directory: 'afile/c'", after
    the model was loaded, not saying that the folder was the cache."""
    path = Path(cache_dir) if cache_dir else default_cache_dir()

    def refused(reason: str) -> ValueError:
        return ValueError(
            f"cannot make the index cache folder {str(path)!r} (--cache-dir, default $M3SEARCH_CACHE_DIR/eval): "
            f"{reason}"
        )

    if make:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise refused(e.strerror or str(e)) from None
    elif not path.is_dir():  # what mkdir(parents=True) would meet: a file or a link to nothing, or no right to write
        refuse_uncreatable(
            path,
            path,
            lambda why, where, detail: refused(
                f"{where} is a link to nothing" if why == "link" else f"{detail}: {str(where)!r}"
            ),
        )
    return path


def evaluate(
    data_dir: str | Path,
    *,
    model: Any = None,
    modes: Sequence[str] = MODES,
    fusion: str = "weighted",
    weights: Sequence[float] | None = None,
    candidates: int | None = DEFAULT_CANDIDATES,
    dtype: str = "auto",
    device: str = "auto",
    queries_dir: str | Path | None = None,
    k: int = 10,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
    collection: str | Path | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Index ``data_dir``'s corpus (cached), search every judged query in each mode, score the runs.

    ``split``: the judgements scored, ``qrels/<split>.tsv`` (e.g. ``dev`` where a set has no test split).

    ``settings``: collection settings of the index (e.g. ``{"max_windows": 1}`` to cut long
    texts instead of windowing them); part of the cache key.
    ``collection``: also evaluate that collection's search defaults (what ``m3search tune``
    stored) as the row ``tuned``, beside the fixed presets.

    ``model`` is a name/path or a loaded ``M3Encoder`` (default: ``collection``'s model when one is
    given, else ``$M3SEARCH_MODEL``, else BAAI/bge-m3). ``candidates``: per first-stage list in re-ranking modes (default 200, see
    ``DEFAULT_CANDIDATES``; None = the collection's own default). The index is cached under
    ``cache_dir`` keyed by model identity and weights fingerprint, corpus bytes and encoder dtype, so re-runs with
    other modes/fusion/candidates only search.
    Returns a JSON-ready dict (see ``write_reports``), with ``modes[mode]`` holding the means.
    """
    _require_pytrec_eval()  # before encoding a corpus whose runs could not be scored
    modes, fusion = check_modes(modes), check_fusion(fusion)  # recorded as searched: "RRF" as rrf
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    depth = max(k, RECALL_AT)
    default_weights = dict(settings or {}).get("weights", DEFAULT_WEIGHTS)
    runs: list[tuple[str, dict[str, Any]]] = [
        (mode, _mode_setting(mode, fusion, weights, candidates, depth, default_weights)) for mode in modes
    ]
    data = load_beir(data_dir, queries_dir=queries_dir, split=split)
    cache = cache_folder(cache_dir)  # before a model is loaded
    tuned = encoder = None
    if collection is not None:  # its defaults were tuned for its own model: that model unless one is named
        tuned, encoder = _search_defaults_of(collection, load_model=model is None, device=device, dtype=dtype)
    if encoder is None:
        encoder = load_encoder(model, device=device, dtype=dtype)
    index, index_info = _cached_index(
        data,
        encoder,
        cache,
        batch_size=batch_size,
        progress=progress,
        settings=dict(settings or {}),
    )
    qids = list(data.queries)
    qtexts = [data.queries[q] for q in qids]
    results: dict[str, Any] = {
        "dataset": data.name,
        "data_dir": str(Path(data_dir).resolve()),
        "queries_dir": str(Path(queries_dir).resolve()) if queries_dir is not None else None,
        "model": str(getattr(encoder, "name_or_path", model)),
        "model_identity": getattr(encoder, "identity", None),
        "dtype": str(getattr(encoder, "dtype", dtype)).replace("torch.", ""),
        "device": str(getattr(encoder, "device", device)),
        "fusion": fusion,
        "weights": list(weights) if weights is not None else None,
        "candidates": candidates if candidates is not None else index.settings.get("candidates"),
        "candidates_default": candidates is None,
        "k": k,
        "recall_at": RECALL_AT,
        "n_docs": len(data.doc_ids),
        "n_queries": len(qids),
        "n_queries_without_relevant": sum(not has_relevant(rel) for rel in data.qrels.values()),
        **unqueried_fields(data),
        "split": split,
        "index": index_info,
        "metrics": [f"ndcg@{k}", f"recall@{RECALL_AT}", f"mrr@{k}"],
        "modes": {},
    }
    if tuned is not None:
        tuned["in_sample"] = _in_sample(tuned.get("tuning"), results)
        results["tuned"] = tuned
        runs.append(("tuned", tuned["setting"]))
    try:
        # Encode the queries once for every mode (as search_batch would, with the collection's query length).
        t0 = time.perf_counter()
        query_emb = index.encoder.encode(qtexts, max_length=index.settings["query_max_length"])
        results["query_encode_seconds"] = round(time.perf_counter() - t0, 3)
        from tqdm import tqdm

        def _run(hit_lists: list) -> dict[str, dict[str, float]]:
            return {q: {h.id: float(h.score) for h in hits} for q, hits in zip(qids, hit_lists)}

        for mode, setting in tqdm(
            runs, desc="search", unit="mode", file=sys.stderr, disable=None if progress else True
        ):
            t0 = time.perf_counter()
            pools = _pool_sizes(setting["mode"], setting["candidates"], index.settings["candidates"], k)
            if pools is None:  # one search at depth max(k, RECALL_AT) ranks as both would
                top = recall = _run(index.search_batch(qtexts, k=depth, query_embeddings=query_emb, **setting))
            else:
                top = _run(index.search_batch(qtexts, k=k, query_embeddings=query_emb, **setting))
                recall = _run(index.search_batch(qtexts, k=RECALL_AT, query_embeddings=query_emb, **setting))
            seconds = time.perf_counter() - t0
            m = compute_metrics(top, data.qrels, k=k, recall_at=RECALL_AT)
            m.pop("per_query")
            if pools is not None:  # Recall@100 as search(k=100) gives it: its pool is max(candidates, 100)
                m[f"recall@{RECALL_AT}"] = compute_metrics(recall, data.qrels, k=k)[f"recall@{RECALL_AT}"]
                m["recall_candidates"] = pools[1]
            m["search_seconds"] = round(seconds, 3)
            m["queries_per_second"] = round(len(qids) / seconds, 2) if seconds > 0 else None
            results["modes"][mode] = m
    finally:
        index.close()
    return results


def _pool_sizes(mode: str, candidates: int | None, default_candidates: int, k: int) -> tuple[int, int] | None:
    """The re-ranking pools (per first-stage list) of ``search(k=k)`` and ``search(k=RECALL_AT)`` in ``mode``,
    when they differ; None when one search at depth ``max(k, RECALL_AT)`` ranks as both.

    Why: a search re-ranks ``max(candidates, k)`` per list, so a depth-100 search with ``candidates=10``
    re-ranks 100; nDCG@k taken from it would not be what ``search(k=k, candidates=10)`` returns.
    """
    if parse_mode(mode) in (("dense",), ("sparse",)):  # no pool: a top-k list whose head does not depend on k
        return None
    c = default_candidates if candidates is None else candidates
    top, recall = max(c, k), max(c, RECALL_AT)
    return None if top == recall == max(c, k, RECALL_AT) else (top, recall)


def _mode_setting(
    mode: str,
    fusion: str,
    weights: Sequence[float] | None,
    candidates: int | None,
    k: int,
    default_weights: Sequence[float],
) -> dict[str, Any]:
    """One mode's search arguments, checked as its search will check them: before the corpus is indexed.

    Zero weights are legitimate (tune chooses them). A single mode ranks alike under any positive weight,
    so a zero one is taken as 1 there; a preset whose modes all have zero weight fuses nothing: an error.
    """
    w = check_weights(default_weights if weights is None else weights)
    used = [REPRESENTATIONS.index(m) for m in parse_mode(mode)]
    if len(used) == 1 and w[used[0]] == 0:
        weights = w = tuple(1.0 if i == used[0] else x for i, x in enumerate(w))
    if not any(w[i] for i in used):
        raise ValueError(
            f"weights {w} give every mode of {mode!r} zero weight: leave {mode!r} out of the modes evaluated "
            f"(--modes) or give one of its modes a weight"
        )
    SearchPlan.build(k=k, mode=mode, fusion=fusion, weights=w, candidates=candidates)
    return {"mode": mode, "fusion": fusion, "weights": weights, "candidates": candidates}


def load_encoder(model: Any, *, device: str = "auto", dtype: str = "auto") -> Any:
    """``model`` as an encoder: a loaded one as it is, a name or folder loaded (None: ``$M3SEARCH_MODEL``,
    else BAAI/bge-m3). What eval and tune index with when no collection names its model."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model
    from . import M3Encoder

    name = str(model) if model is not None else os.environ.get("M3SEARCH_MODEL") or "BAAI/bge-m3"
    return M3Encoder.from_pretrained(name, device=device, dtype=dtype)


def _search_defaults_of(
    location: str | Path, *, load_model: bool = False, device: str = "auto", dtype: str = "auto"
) -> tuple[dict[str, Any], Any]:
    """A collection's search defaults and how they were chosen (``m3search tune``), for the ``tuned`` row;
    and, with ``load_model``, its encoder (None without)."""
    from . import Collection

    with Collection.open(location, device=device, dtype=dtype) as col:
        tuned = {"collection": str(location), "setting": col.search_defaults(), "tuning": col.manifest.get("tuning")}
        return tuned, (col.encoder if load_model else None)


def _in_sample(tuning: Mapping[str, Any] | None, results: Mapping[str, Any]) -> bool:
    """Whether the collection's defaults were tuned on the judged queries being evaluated (the row then
    overstates what they give on other queries). A tuning recorded before folders were kept is compared by
    dataset name (and taken as the test split)."""
    if not tuning:
        return False
    if tuning.get("split", "test") != results["split"]:
        return False
    if "data_dir" in tuning:
        return tuning["data_dir"] == results["data_dir"] and tuning.get("queries_dir") == results["queries_dir"]
    return tuning.get("dataset") == results["dataset"]


def check_modes(modes: Sequence[str] | str) -> list[str]:
    """The modes to evaluate (a list, or a comma-separated string), each a preset, once each; else ValueError."""
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    modes = list(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    return modes


def _cached_index(
    data: BeirData,
    encoder: Any,
    cache_dir: Path,
    *,
    batch_size: int | None,
    progress: bool,
    settings: Mapping[str, Any] | None = None,
):
    """Open the cached index for (model identity and weights, corpus, dtype, settings), building it when absent
    or incomplete."""
    from . import Collection

    settings = dict(settings or {})
    dtype = str(getattr(encoder, "dtype", "")).replace("torch.", "")
    key_src = json.dumps(
        {
            "v": _CACHE_VERSION,
            "model": encoder.identity,
            "weights": encoder.weights_fingerprint,
            "corpus": data.corpus_sha256,
            "dtype": dtype,
            "settings": settings,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in data.name.split(" -> ")[-1]).strip("-")
    path = cache_dir / f"{slug}-{key}"
    done = path.with_name(path.name + ".done.json")
    cache_folder(cache_dir)
    with _locked(path.with_name(path.name + ".lock"), progress=progress):
        info = _read_done(done) if path.exists() else None
        if info is not None:  # (where it is now: a cache may have been moved since it was built)
            info.update(path=str(path), cached=True)
            return _open_cached(path, encoder, progress=progress), info
        # absent, or a build that stopped part-way (no readable .done.json): start over. Nobody else is
        # building it (the lock), so its folder and any temporary one left by a killed build can go.
        done.unlink(missing_ok=True)
        for old in [path, *cache_dir.glob(f"{path.name}.tmp-*")]:
            shutil.rmtree(old, ignore_errors=True)
        building = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        t0 = time.perf_counter()
        try:
            with Collection.create(building, model=encoder, **settings) as collection:
                kwargs: dict[str, Any] = {}
                if batch_size is not None:
                    kwargs["batch_size"] = batch_size
                collection.add(data.doc_texts, ids=data.doc_ids, show_progress=None if progress else False, **kwargs)
            os.replace(building, path)  # complete or absent under its final name
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        info = {"path": str(path), "key": key, "index_seconds": round(time.perf_counter() - t0, 3), "cached": False}
        write_durably(done, json.dumps(info, indent=2))
        return Collection.open(path, model=encoder), info


def _open_cached(path: Path, encoder: Any, *, progress: bool) -> Any:
    """The finished cached index at ``path``, opened; while another process (an eval, tune or finetune of the
    same corpus) is searching it, waited for, saying so, as for a build. Why: a second eval started during
    the first one's searches failed "in use" (the build lock is let go once the index is open). Called with
    the build lock held, so no other eval takes the index between the wait and the open."""
    from . import Collection
    from .engines.qdrant_edge import wait_until_free
    from .errors import CollectionInUseError

    while True:
        try:
            return Collection.open(path, model=encoder)
        except CollectionInUseError:
            wait_until_free(path, f"waiting for another process using {path.name} ..." if progress else None)


@contextlib.contextmanager
def _locked(lock_path: Path, *, progress: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (waiting for it, saying so). Why: two evals (or eval and
    tune) of one dataset deleted each other's index being built; the second now waits for the first."""
    waiting = f"waiting for another process building or opening {lock_path.stem} ..." if progress else None
    fd = lock_exclusive(lock_path, wait=True, waiting=waiting)
    try:
        yield
    finally:
        os.close(fd)


def _read_done(done: Path) -> dict[str, Any] | None:
    """A finished build's record, or None when there is none or it cannot be read (a build cut short while
    writing it: rebuilt, rather than failing every later run with the JSON parser's words)."""
    try:
        info = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


# ---------------------------------------------------------------------------------------------- reports


def format_table(results: Mapping[str, Any]) -> str:
    """Plain-text table for the terminal: one row per mode, one column per metric."""
    metrics = results["metrics"]
    rows = [["mode", *metrics, "q/s (search)"]]
    for mode, m in results["modes"].items():
        qps = m.get("queries_per_second")
        rows.append([mode, *(f"{m[x]:.4f}" for x in metrics), f"{qps:.1f}" if qps else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [_title(results)]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + _notes(results))


def _notes(results: Mapping[str, Any]) -> list[str]:
    """The lines under the table (terminal and Markdown): the tuned row's setting, where Recall@N came from, the
    judged queries without a relevant document and those without a text."""
    notes = [_tuned_line(results["tuned"])] if results.get("tuned") else []
    notes += [_recall_note(results), _without_relevant_note(results), unqueried_note(results)]
    return [note for note in notes if note]


def unqueried_fields(data: BeirData) -> dict[str, Any]:
    """What eval's and tune's results keep of :attr:`BeirData.unqueried`: the count and the first few ids."""
    return {"n_unqueried": len(data.unqueried), "unqueried": data.unqueried[:5]}


def unqueried_note(results: Mapping[str, Any]) -> str | None:
    """How many judged queries have no text in the queries file (left out of every mean), where there are some."""
    n, ids = results.get("n_unqueried"), results.get("unqueried", [])
    if not n:
        return None
    return (
        f"{n} judged query id(s) of qrels/{results.get('split', 'test')}.tsv are not in the queries file "
        f"({', '.join(map(repr, ids))}{' ...' if n > len(ids) else ''}): left out of every mean"
    )


def _without_relevant_note(results: Mapping[str, Any]) -> str | None:
    """How many judged queries have no relevant document, where there are some (see :func:`has_relevant`)."""
    n = results.get("n_queries_without_relevant")
    if not n:
        return None
    return (
        f"{n} of the {results['n_queries']} judged queries have no relevant document (no grade > 0): they score 0 "
        "and count in every mean, as in BEIR (m3search tune leaves them out)"
    )


def _recall_note(results: Mapping[str, Any]) -> str | None:
    """Which search Recall@N came from, where it is not the one nDCG@k and MRR@k came from."""
    deeper = {mode: m["recall_candidates"] for mode, m in results["modes"].items() if m.get("recall_candidates")}
    if not deeper:
        return None
    at = results.get("recall_at", RECALL_AT)
    pools = ", ".join(f"{mode} {c}" for mode, c in deeper.items())
    return (
        f"recall@{at} comes from search(k={at}), which re-ranks max(candidates, {at}) per list ({pools}); "
        f"ndcg and mrr from search(k={results['k']}) with the candidates stated"
    )


def _tuned_line(tuned: Mapping[str, Any]) -> str:
    s = tuned["setting"]
    how = "tuned by m3search tune" if tuned.get("tuning") else "built-in, not tuned"
    line = (
        f"tuned = {tuned['collection']}'s search defaults ({how}): mode {s['mode']}, fusion {s['fusion']}, "
        f"weights {s['weights']}, candidates {s['candidates']}"
    )
    if tuned.get("in_sample"):
        line += "; IN-SAMPLE: tuned on these judged queries, so the row overstates what it gives on others"
    return line


def to_markdown(results: Mapping[str, Any]) -> str:
    """Markdown report: settings, then a mode x metric table."""
    metrics = results["metrics"]
    cand = f"{results['candidates']}" + (" (collection default)" if results.get("candidates_default") else "")
    lines = [
        f"# m3search eval: {results['dataset']}",
        "",
        f"- model: `{results['model']}` (identity `{str(results['model_identity'])[:16]}`), dtype {results['dtype']}",
        f"- {results['n_docs']} documents, {results['n_queries']} judged queries "
        f"(qrels/{results.get('split', 'test')}.tsv)",
        f"- fusion: {results['fusion']}, weights: {results['weights'] or 'default'}, candidates: {cand}",
        "",
        "| mode | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for mode, m in results["modes"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{m[x]:.4f}" for x in metrics) + " |")
    for note in _notes(results):
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def plot_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bar chart (modes on x, one bar per metric) as PNG at ``path``, written atomically."""
    path = Path(path)
    write_durably(path, _chart_png(results))
    return path


def _chart_png(results: Mapping[str, Any]) -> bytes:
    """:func:`plot_results`' chart as PNG bytes, drawn with matplotlib's Agg backend. Why bytes: the chart is
    drawn before any report is written (a failure while drawing leaves the old reports as they were)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        raise ImportError("the PNG chart needs matplotlib: pip install 'm3search[eval]'") from None
    import io

    import numpy as np

    modes = list(results["modes"])
    metrics = results["metrics"]
    x = np.arange(len(modes))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(modes) + 2), 4.2))
    try:
        for i, metric in enumerate(metrics):
            vals = [results["modes"][m][metric] for m in modes]
            bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, vals, width, label=metric)
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
        ax.set_xticks(x, modes)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("score")
        ax.set_title(_title(results), fontsize=9)
        ax.legend(loc="upper center", ncols=len(metrics), fontsize=8, frameon=False)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    return png.getvalue()


def report_dir(out_dir: str | Path | None, data_dir: str | Path, queries_dir: str | Path | None = None) -> Path:
    """The report folder (default ``m3search-eval/<dataset>``), checked to be creatable and writable; nothing
    is created (:func:`write_reports` does that).

    Why before :func:`evaluate`: an unwritable or odd ``--out`` was found only after indexing and searching.
    The check makes (and removes) a temporary folder in the nearest existing one.
    """
    if out_dir is None:
        name = _dataset_name(Path(data_dir), queries_dir)
        out_dir = Path("m3search-eval") / "".join(
            c if c.isalnum() or c in "-_" else "-" for c in name.replace(" -> ", "--")
        )
    out = Path(out_dir)
    there = nearest_existing(  # the reports' mkdir through a dangling link failed only after the work
        out,
        lambda link, target: ValueError(
            f"cannot write reports into {str(out)!r}: {str(link)!r} is a symlink to {target}, which does not exist "
            "(make that folder, or remove the link)"
        ),
    )
    if not there.is_dir():
        raise ValueError(f"cannot write reports into {str(out)!r}: {str(there)!r} is not a folder")
    try:
        with tempfile.TemporaryDirectory(dir=there):
            pass
    except OSError as e:
        raise ValueError(f"cannot write reports into {str(out)!r} ({there}: {e.strerror or e})") from None
    return out


def write_reports(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``; return their paths.

    Why all three at once (:func:`~m3search.engines.files.write_files_durably`): an interrupted run (Ctrl-C, a full
    disk) left a truncated report or new ones beside old ones; now each is old or new, and all three new
    unless a crash falls between two renames. ``results.json`` is renamed last: when it is new, so are the others.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "results.png"}
    write_files_durably(
        {
            paths["markdown"]: to_markdown(results),
            paths["png"]: _chart_png(results),
            paths["json"]: json.dumps(results, indent=2) + "\n",
        }
    )
    return paths


def _title(results: Mapping[str, Any]) -> str:
    model = Path(str(results["model"])).name or str(results["model"])
    cand = f"{results['candidates']}" + (" (collection default)" if results.get("candidates_default") else "")
    return (
        f"{results['dataset']} | {model} ({results['dtype']}) | fusion {results['fusion']}, candidates {cand}"
        f" | {results['n_docs']} docs, {results['n_queries']} queries"
    )


def reference_table(readme: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """Parse a model README's reference table: ``{collection: {metric: {mode: value}}}`` (used by checks)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    header: list[str] | None = None
    for line in Path(readme).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not line.lstrip().startswith("|"):
            header = None if not line.strip() else header
            continue
        if cells[:2] == ["collection", "metric"]:
            header = cells[2:]
            continue
        if header is None or set(cells[0]) <= {"-"}:
            continue
        try:
            values = [float(c) for c in cells[2:]]
        except ValueError:
            continue
        metric = cells[1].lower()
        table.setdefault(cells[0], {})[metric] = dict(zip(header, values))
    return table
