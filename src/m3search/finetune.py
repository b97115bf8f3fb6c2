"""Fine-tune BGE-M3's encoder and its three heads on your own judged queries.

The data flow, top to bottom of this module:

1. **data**: a BEIR folder (queries + qrels + corpus; hard negatives mined with the base
   model through m3search's own index, judged positives excluded) or FlagEmbedding's JSONL
   (``{"query", "pos": [...], "neg": [...]}``), checked before any training;
2. **batches**: each query with one positive and ``negatives`` hard negatives, grouped
   under a token budget (every passage of a batch is also a negative of the other queries);
3. **losses**: BGE-M3's unified objective (arXiv 2402.03216, section 3.3): InfoNCE over
   in-batch + hard negatives for each mode, the same for the ensemble score, and
   self-knowledge distillation from the ensemble into each mode;
4. **trainer**: AdamW, linear warmup then decay, mixed precision, checkpoints to resume;
   sparse weight statistics per epoch with a stop when they collapse;
5. **export**: a folder in bge-m3's own layout, written atomically, with ``report.json``
   and ``loss.png`` beside the weights.

Where it follows FlagEmbedding 1.4.2's ``EncoderOnlyEmbedderM3Model`` (the reference for
what each term computes): [CLS] dense vectors and normalized ColBERT vectors (as its M3
recipe with ``normalize_embeddings``), ``relu(sparse_linear(h))`` max-pooled per token id
with special ids dropped, scores divided by one temperature, ensemble
``dense + 0.3 sparse + colbert``, loss ``(dense + ensemble + 0.1 sparse + colbert) / 4``
plus ``(KL dense + 0.1 KL sparse + KL colbert) / 3`` from the detached ensemble, halved.
Where it differs, on purpose:

* ColBERT's max runs over the passage's real tokens only (FlagEmbedding's zero-padded
  vectors floor every best match at 0), as :mod:`m3search.scoring` does at search time;
* a passage that is a judged positive of a query is never that query's negative (it is
  masked out of the query's softmax), so two queries sharing a positive in one batch do
  not push each other's answers away; a query text on several lines (one per positive)
  counts as one query;
* the lexical weights are pooled with ``scatter_reduce`` into ``(batch, vocab)``, not a
  ``(batch, tokens, vocab)`` tensor (bge-m3's vocabulary is 250,002 ids);
* self-distillation is on by default (the paper's recipe; FlagEmbedding's flag is off);
* ``modes`` trains a subset: one mode is its plain InfoNCE; two or more keep the
  ensemble and distillation terms over those modes, weights renormalized by count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import M3SearchError
from .plan import MODES, check_int

__all__ = [
    "MODES",
    "ENSEMBLE_WEIGHTS",
    "LOSS_WEIGHTS",
    "Example",
    "FinetuneInputError",
    "SparseCollapseError",
    "OutputTakenError",
    "read_jsonl_examples",
    "read_beir_examples",
    "M3Trainable",
    "score_matrices",
    "unified_loss",
    "finetune",
]

#: FlagEmbedding's ``ensemble_score``: the teacher of self-distillation (paper: w1, w2, w3).
ENSEMBLE_WEIGHTS = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}
#: Weight of each mode's contrastive and distillation terms (paper: lambda1..3; sparse learns slowly).
LOSS_WEIGHTS = {"dense": 1.0, "sparse": 0.1, "colbert": 1.0}
#: FlagEmbedding's M3 fine-tuning temperature.
DEFAULT_TEMPERATURE = 0.02
#: Hard negatives are drawn from these dense ranks of the base model (FlagEmbedding's ``hn_mine`` range 2-200):
#: skipping the very top keeps most unjudged relevant passages out of the negatives.
MINE_RANKS = (2, 200)
#: Sparse head collapse: the fraction of tokens with a nonzero weight fell below this share of its value
#: before training (FlagEmbedding issue 982: all weights zero after unified fine-tuning).
COLLAPSE_RATIO = 0.1
_PROBE_PASSAGES = 64
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")


class FinetuneInputError(M3SearchError, ValueError):
    """The training data, base model or output folder cannot be used (found before training starts)."""


class SparseCollapseError(M3SearchError, RuntimeError):
    """The sparse head's weights are (nearly) all zero after an epoch: collapsed in training, or zero before it
    (the message says which)."""


class OutputTakenError(M3SearchError, FileExistsError):
    """The output folder appeared while training ran: it was left as it is, the trained model kept (the message
    says where)."""


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Example:
    """One training query: its judged positives and its negatives (hard ones, mined or given)."""

    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    qid: str | None = None


def read_jsonl_examples(path: str | os.PathLike) -> list[Example]:
    """FlagEmbedding's training format: one ``{"query": str, "pos": [str], "neg": [str]}`` per line.

    Read as ``m3search index`` reads JSONL (``sources``): a UTF-8 BOM is skipped, and every error (a byte
    that is not UTF-8, JSON the parser refuses, a text UTF-8 cannot encode) names its line.
    """
    path = Path(path)
    teacher: list[str] = []  # the first line with teacher scores, if any
    try:
        examples = list(_jsonl_examples(path, teacher))
    except ValueError as e:
        raise FinetuneInputError(str(e)) from None
    if not examples:
        raise FinetuneInputError(f"{path}: no training examples")
    if teacher:  # FlagEmbedding's knowledge distillation from them; ours distils from the model's own ensemble
        warnings.warn(
            f'{teacher[0]}: "pos_scores" / "neg_scores" (a teacher\'s scores) are not used: m3search trains with '
            "BGE-M3's self-knowledge distillation from its own ensemble score",
            stacklevel=2,
        )
    return examples


def _jsonl_examples(path: Path, teacher: list[str]) -> Iterator[Example]:
    """The examples of ``path``; each error a ValueError naming its line. ``teacher`` gets the place of the first
    line with teacher scores (read, not used)."""
    from .plan import check_text
    from .sources import _utf8_lines, json_object

    first = True
    for lineno, line in _utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path.name}:{lineno}"
        obj = json_object(line, where, first=first)
        first = False
        if not isinstance(obj.get("query"), str) or not obj["query"].strip():
            raise ValueError(f'{where}: expected an object with a non-empty string "query"')
        if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():  # refused, not dropped: as TEI's prompt_name
            raise ValueError(f'{where}: "prompt" is not supported: BGE-M3 uses no prompts (queries train as written)')
        if not teacher and ("pos_scores" in obj or "neg_scores" in obj):
            teacher.append(where)
        pos, neg = obj.get("pos", []), obj.get("neg", [])
        for name, texts in (("pos", pos), ("neg", neg)):
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f'{where}: "{name}" must be a list of strings')
        named = [("query", obj["query"])] + [
            (f"{k}[{i}]", t) for k, ts in (("pos", pos), ("neg", neg)) for i, t in enumerate(ts)
        ]
        for name, text in named:
            check_text(text, f"{where}: {name}")  # the tokenizer's own error named neither line nor text
        pos = [t for t in pos if t.strip()]
        if not pos:
            raise ValueError(f"{where}: query {obj['query'][:60]!r} has no positive passage")
        yield Example(obj["query"], pos, [t for t in neg if t.strip()], qid=str(lineno))


@dataclass
class BeirSplit:
    """A BEIR folder split by query: examples to train on, judged queries held out for evaluation."""

    data: Any  # eval.BeirData of the training queries
    heldout: Any | None  # eval.BeirData of the held-out queries (same corpus), or None
    examples: list[Example]
    empty_positives_dropped: int = 0  # judged positives with no text, left out as JSONL's are
    qrels_split: str = "test"  # the qrels/<split>.tsv read


def split_queries(qids: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """A fixed split: the same ids, fraction and seed always give the same halves. A holdout that rounds to no
    query is refused: the run went on with nothing held out, and its report had no held-out metrics, unsaid."""
    if not 0.0 <= holdout < 1.0:
        raise FinetuneInputError(f"holdout must be in [0, 1), got {holdout}")
    order = sorted(qids)
    np.random.default_rng(seed).shuffle(order)
    n_out = int(round(len(order) * holdout))
    if holdout and not n_out:
        raise FinetuneInputError(
            f"holdout {holdout} of {len(order)} judged queries holds out none (it rounds to 0): give more than "
            f"{0.5 / max(len(order), 1):.3g}, or 0 for no held-out evaluation"
        )
    return sorted(order[n_out:]), sorted(order[:n_out])


def read_beir_examples(
    data_dir: str | os.PathLike,
    *,
    queries_dir: str | os.PathLike | None = None,
    holdout: float = 0.0,
    seed: int = 0,
    split: str | None = None,
) -> BeirSplit:
    """Load a BEIR folder's ``qrels/<split>.tsv``; every training query needs a positive (qrels score > 0) in the
    corpus. ``split=None``: ``train`` where the folders have a ``qrels/train.tsv`` this corpus and queries can use,
    else ``test`` (with a warning naming why where a ``train.tsv`` is there but not usable: the run is what it was
    before this default). Why: always ``test`` trained on the judgements a later eval measures with (scifact,
    fiqa, nfcorpus ship a train split), inflating its scores unsaid.

    Negatives are left empty: :func:`mine_negatives` fills them with the base model.
    """
    from .eval import BeirData, _check_split, _read_beir_texts
    from .sources import locate

    folders = [Path(data_dir)] + ([Path(queries_dir)] if queries_dir is not None else [])
    auto = split is None and any(locate(f / "qrels", "train.tsv") for f in folders)
    split = "train" if auto else split or "test"
    try:
        _check_split(split)
        texts = _read_beir_texts(Path(data_dir), queries_dir)  # read once, for either split
    except ValueError as e:
        raise FinetuneInputError(str(e)) from None
    try:
        data = texts.judged(split)
    except ValueError as e:
        if not auto:
            raise FinetuneInputError(str(e)) from None
        try:
            data, split = texts.judged("test"), "test"
        except ValueError:
            raise FinetuneInputError(str(e)) from None  # neither: the train split's reason
        warnings.warn(f"training on qrels/test.tsv: qrels/train.tsv is not usable here ({e})", stacklevel=2)
    no_positive = sorted(q for q, rel in data.qrels.items() if not any(s > 0 for s in rel.values()))
    if no_positive:
        raise FinetuneInputError(
            f"{len(no_positive)} judged quer{'y has' if len(no_positive) == 1 else 'ies have'} no positive "
            f"(qrels score > 0): {no_positive[:5]}; remove them from qrels/{split}.tsv"
        )
    train_ids, held_ids = split_queries(list(data.queries), holdout, seed)
    if not train_ids:
        raise FinetuneInputError("no training query left after the holdout split")

    def subset(ids: list[str]) -> BeirData:
        return BeirData(
            name=data.name,
            doc_ids=data.doc_ids,
            doc_texts=data.doc_texts,
            queries={q: data.queries[q] for q in ids},
            qrels={q: data.qrels[q] for q in ids},
            corpus_sha256=data.corpus_sha256,
        )

    text_of = dict(zip(data.doc_ids, data.doc_texts))
    judged = {q: [text_of[d] for d, s in sorted(data.qrels[q].items()) if s > 0] for q in train_ids}
    examples = [Example(data.queries[q], [t for t in judged[q] if t.strip()], qid=q) for q in train_ids]
    only_empty = [e.qid for e in examples if not e.positives]
    if only_empty:
        raise FinetuneInputError(
            f"{len(only_empty)} judged quer{'y has' if len(only_empty) == 1 else 'ies have'} only positives with "
            f"no text in corpus.jsonl: {only_empty[:5]}"
        )
    dropped = sum(len(judged[q]) for q in train_ids) - sum(len(e.positives) for e in examples)
    return BeirSplit(subset(train_ids), subset(held_ids) if held_ids else None, examples, dropped, split)


def mine_negatives(
    split: BeirSplit, encoder: Any, negatives: int, *, cache_dir: Path, seed: int = 0, progress: bool = True
) -> None:
    """Fill each example's negatives: ``negatives`` documents drawn from the base model's dense ranks
    :data:`MINE_RANKS` over the corpus (m3search's own index, eval's cache), judged positives excluded."""
    from .eval import _cached_index

    if negatives == 0:
        return
    index, _ = _cached_index(split.data, encoder, cache_dir, batch_size=None, progress=progress)
    try:
        texts = [e.query for e in split.examples]
        hits = index.search_batch(texts, k=min(MINE_RANKS[1], len(split.data.doc_ids)), mode="dense")
    finally:
        index.close()
    text_of = dict(zip(split.data.doc_ids, split.data.doc_texts))
    rng = np.random.default_rng(seed)
    for example, ranked in zip(split.examples, hits):
        judged_pos = {d for d, s in split.data.qrels[example.qid].items() if s > 0}
        pool = [h.id for h in ranked[MINE_RANKS[0] :] if h.id not in judged_pos]
        if len(pool) < negatives:  # a small corpus: take the top ranks too
            pool = [h.id for h in ranked if h.id not in judged_pos]
        picked = rng.choice(len(pool), size=min(negatives, len(pool)), replace=False) if pool else []
        example.negatives = [text_of[pool[i]] for i in sorted(picked)]


def _data_sha256(examples: Sequence[Example], corpus_sha256: str | None) -> str:
    """The training data's content: every example as read and the corpus that negatives are mined from.
    Why: a resume checks it, so the same path holding other data is a different run, not a continuation."""
    h = hashlib.sha256((corpus_sha256 or "").encode())
    for e in examples:
        h.update(json.dumps(asdict(e), ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- model


class M3Trainable(torch.nn.Module):
    """The transformer and both heads of an :class:`~m3search.M3Encoder` as one trainable module.

    :meth:`encode` gives, for the modes asked: ``dense`` (B, H) normalized [CLS]; ``sparse``
    (B, V) lexical weights, max per token id, special ids 0; ``colbert`` (B, L-1, C) normalized
    vectors of every position after [CLS], with ``colbert_mask`` (B, L-1) of the real ones.
    The encoder's modules are shared, not copied.
    """

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.model = encoder.model
        self.colbert_linear = encoder.colbert_linear
        self.sparse_linear = encoder.sparse_linear
        self.vocab_size = encoder.vocab_size
        self.register_buffer("special_ids", torch.from_numpy(encoder.special_ids), persistent=False)

    def token_weights(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) relu(sparse_linear(h)), 0 at padding and special ids."""
        with torch.autocast(hidden.device.type, enabled=False):
            w = torch.relu(self.sparse_linear(hidden.float())).squeeze(-1)
        return w * (mask.bool() & ~torch.isin(ids, self.special_ids))

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        with torch.autocast(hidden.device.type, enabled=False):  # heads and scores in float32, as M3Encoder does
            return self._heads(hidden.float(), ids, mask, modes)

    def _heads(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]):
        out: dict[str, torch.Tensor] = {}
        if "dense" in modes:
            out["dense"] = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
        if "sparse" in modes:
            w = self.token_weights(hidden, ids, mask)
            base = torch.zeros(ids.shape[0], self.vocab_size, dtype=w.dtype, device=w.device)
            out["sparse"] = base.scatter_reduce(1, ids, w, reduce="amax", include_self=True)
        if "colbert" in modes:
            vecs = self.colbert_linear(hidden[:, 1:])
            out["colbert"] = torch.nn.functional.normalize(vecs, dim=-1)
            out["colbert_mask"] = mask[:, 1:].bool()
        return out


def score_matrices(q: Mapping[str, Any], p: Mapping[str, Any], modes: Sequence[str]) -> dict[str, Any]:
    """Raw (Bq, P) relevance scores of every query against every passage in each mode.

    ColBERT: mean over the query's real vectors of the max dot product over the passage's real vectors.
    """
    out = {}
    if "dense" in modes:
        out["dense"] = q["dense"] @ p["dense"].T
    if "sparse" in modes:
        out["sparse"] = q["sparse"] @ p["sparse"].T
    if "colbert" in modes:
        sims = torch.einsum("qid,pjd->qpij", q["colbert"], p["colbert"])  # (Bq, P, Lq, Lp)
        sims = sims.masked_fill(~p["colbert_mask"][None, :, None, :], torch.finfo(sims.dtype).min)
        best = sims.max(dim=-1).values * q["colbert_mask"][:, None, :]  # padded query positions count 0
        out["colbert"] = best.sum(-1) / q["colbert_mask"].sum(-1, keepdim=True).clamp(min=1)
    return out


def unified_loss(
    scores: Mapping[str, Any],
    targets: Any,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    exclude: Any = None,
    self_distill: bool = True,
) -> dict[str, Any]:
    """BGE-M3's unified objective over raw (Bq, P) scores; ``targets[i]`` is query i's positive column.

    ``exclude``: a bool (Bq, P) mask of passages that must not count as query i's negatives (its other
    judged positives). Returns every term (one scalar tensor each) and ``total``, the one to minimize.
    """
    F = torch.nn.functional

    modes = [m for m in MODES if m in scores]
    logits = {m: scores[m] / temperature for m in modes}
    if len(modes) > 1:
        logits["ensemble"] = sum(ENSEMBLE_WEIGHTS[m] * logits[m] for m in modes)
    if exclude is not None:
        low = torch.finfo(next(iter(logits.values())).dtype).min
        logits = {k: v.masked_fill(exclude, low) for k, v in logits.items()}
    terms = {k: F.cross_entropy(v, targets) for k, v in logits.items()}
    if len(modes) == 1:
        terms["total"] = terms[modes[0]]
        return terms
    contrastive = (sum(LOSS_WEIGHTS[m] * terms[m] for m in modes) + terms["ensemble"]) / (len(modes) + 1)
    if not self_distill:
        terms["total"] = contrastive
        return terms
    teacher = torch.softmax(logits["ensemble"].detach(), dim=-1)
    for m in modes:
        terms[f"distill_{m}"] = -(teacher * torch.log_softmax(logits[m], dim=-1)).sum(-1).mean()
    distill = sum(LOSS_WEIGHTS[m] * terms[f"distill_{m}"] for m in modes) / len(modes)
    terms["total"] = (contrastive + distill) / 2
    return terms


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class _Tokenized:
    """Every distinct text once: ids (specials included, cut at its side's max length) by text index."""

    ids: list[list[int]]
    lengths: np.ndarray


def _tokenize(encoder: Any, texts: list[str], max_length: int) -> _Tokenized:
    ids, _ = encoder.tokenize(texts, min(max_length, encoder.max_length))
    return _Tokenized(ids, np.fromiter((len(x) for x in ids), np.int64, len(ids)))


@dataclass
class _Plan:
    """The training data as indices: query i's positives and negatives are indices into ``passages``.

    ``judged[i]``: every positive of query i's text, over all its examples (FlagEmbedding data often has one
    line per positive): none of them is ever query i's negative.
    """

    queries: _Tokenized
    passages: _Tokenized
    positives: list[list[int]]
    negatives: list[list[int]]
    judged: list[set[int]]


def _plan(encoder: Any, examples: list[Example], query_max_length: int, passage_max_length: int) -> _Plan:
    index: dict[str, int] = {}
    texts: list[str] = []

    def idx(text: str) -> int:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    positives = [[idx(t) for t in e.positives] for e in examples]
    negatives = [[idx(t) for t in e.negatives] for e in examples]
    judged: dict[str, set[int]] = {}
    for e, pos in zip(examples, positives):
        judged.setdefault(e.query, set()).update(pos)
    return _Plan(
        _tokenize(encoder, [e.query for e in examples], query_max_length),
        _tokenize(encoder, texts, passage_max_length),
        positives,
        negatives,
        [judged[e.query] for e in examples],
    )


def _epoch_batches(
    plan: _Plan, negatives: int, batch_size: int, token_budget: int, seed: int, epoch: int, strict: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch's batches: (query indices, passage indices as (B, 1 + negatives)), column 0 the positive.

    Deterministic in (seed, epoch), so a resumed run rebuilds the same batches. A query with fewer
    negatives than asked repeats them; one with none takes random passages of the data (as FlagEmbedding
    repeats, and as in-batch negatives are random passages anyway). A query whose group alone is over the
    budget is refused when the budget was asked for (``strict``), else it makes a batch of its own: the
    device's default budget must not refuse BGE-M3's own long-passage settings (1,024 tokens x 8 passages).
    """
    rng = np.random.default_rng([seed, epoch])
    n_passages = len(plan.passages.ids)
    groups = []
    for i in rng.permutation(len(plan.positives)):
        pos = plan.positives[i][rng.integers(len(plan.positives[i]))]
        negs = plan.negatives[i]
        if negatives == 0:
            chosen: list[int] = []
        elif not negs:
            others = np.setdiff1d(np.arange(n_passages), sorted(plan.judged[i]))
            chosen = rng.choice(others, size=negatives, replace=len(others) < negatives).tolist() if len(others) else []
            chosen = chosen or [pos] * negatives  # a one-passage data set: nothing else to contrast with
        else:
            reps = math.ceil(negatives / len(negs))
            chosen = rng.permutation(np.array(negs * reps))[:negatives].tolist()
        groups.append((int(i), [pos, *chosen]))
    batches, current = [], []
    q_len = p_len = 0
    for i, group in groups:
        alone = int(plan.queries.lengths[i]) + len(group) * int(plan.passages.lengths[group].max())
        if alone > token_budget and strict:  # run alone, over the budget the user set (--negatives 100000: 22 GB)
            raise FinetuneInputError(
                f"one query with its positive and {negatives} negatives is {alone} padded tokens, more than the "
                f"token budget of {token_budget} per batch: lower --negatives or raise --token-budget"
            )
        new_q = max(q_len, int(plan.queries.lengths[i]))
        new_p = max(p_len, int(plan.passages.lengths[group].max()))
        size = len(current) + 1
        if current and (size > batch_size or size * (new_q + len(group) * new_p) > token_budget):
            batches.append(current)
            current, new_q, new_p = [], int(plan.queries.lengths[i]), int(plan.passages.lengths[group].max())
        current.append((i, group))
        q_len, p_len = new_q, new_p
    if current:
        batches.append(current)
    return [(np.array([i for i, _ in b]), np.array([g for _, g in b])) for b in batches]


def _contrasting_batches(
    encoder: Any, examples: list[Example], cfg: FinetuneConfig, token_budget: int
) -> tuple[_Plan, list[list[tuple[np.ndarray, np.ndarray]]]]:
    """The data as indices and every epoch's batches (each epoch packs a new order under the token budget, so
    their counts differ); refused when no batch has anything to contrast (:func:`_has_contrast`)."""
    plan = _plan(encoder, examples, cfg.query_max_length, cfg.passage_max_length)
    strict = cfg.token_budget is not None
    schedule = [
        _epoch_batches(plan, cfg.negatives, cfg.batch_size, token_budget, cfg.seed, e, strict)
        for e in range(cfg.epochs)
    ]
    padded = max(  # a batch over the budget is one query's, run alone (not strict)
        (
            len(q) * (int(plan.queries.lengths[q].max()) + p.shape[1] * int(plan.passages.lengths[p].max()))
            for batches in schedule
            for q, p in batches
        ),
        default=0,
    )
    if padded > token_budget:
        warnings.warn(
            f"one query with its positive and {cfg.negatives} negatives is up to {padded} padded tokens, over this "
            f"device's default token budget of {token_budget} per batch: such queries train one to a batch, "
            "with memory to match (give --token-budget to refuse them instead)",
            stacklevel=2,
        )
    if not _has_contrast(plan, schedule):
        raise FinetuneInputError(
            "nothing to contrast: no batch holds a passage besides its queries' judged positives (one query and "
            "no other passage, or --negatives 0 with one query per batch), so every loss would be 0 and training "
            "would change nothing; give more queries, hard negatives (--negatives) or a larger --batch-size"
        )
    return plan, schedule


def _mining_adds_nothing(split: BeirSplit, negatives: int) -> bool:
    """Whether :func:`mine_negatives` leaves every example as read: no negatives asked, or no training query has a
    corpus document besides its judged positives. Then the data to train on is known before mining (which encodes
    the whole corpus), and so is whether it has anything to contrast."""
    n_docs = len(split.data.doc_ids)  # load_beir refuses judged ids absent from the corpus
    return negatives == 0 or all(sum(s > 0 for s in split.data.qrels[e.qid].values()) >= n_docs for e in split.examples)


def _has_contrast(plan: _Plan, schedule: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]) -> bool:
    """Whether some query of some batch has a passage that is not its judged positive to score against.
    Why: with none, every loss is exactly 0 and a run would write its base model back as "fine-tuned"."""
    return any(
        any(int(p) not in plan.judged[i] for i in queries for p in groups.reshape(-1))
        for batches in schedule
        for queries, groups in batches
    )


def _batch_tensors(encoder: Any, plan: _Plan, queries: np.ndarray, groups: np.ndarray):
    """Padded tensors of one batch, the positive column of each query and its exclusion mask."""
    flat = groups.reshape(-1)
    q_ids, q_mask = encoder._pad(plan.queries.ids, queries, int(plan.queries.lengths[queries].max()))
    p_ids, p_mask = encoder._pad(plan.passages.ids, flat, int(plan.passages.lengths[flat].max()))
    width = groups.shape[1]
    targets = torch.arange(len(queries), device=q_ids.device) * width
    # Query i's judged positives are not its negatives, wherever they sit in the batch (the target stays).
    exclude = np.array([[int(p) in plan.judged[i] for p in flat] for i in queries])
    exclude[np.arange(len(queries)), np.arange(len(queries)) * width] = False
    return q_ids, q_mask, p_ids, p_mask, targets, torch.from_numpy(exclude).to(q_ids.device)


def training_step(
    net: Any, batch: tuple, modes: Sequence[str], *, temperature: float, self_distill: bool, autocast: Any = None
) -> dict[str, Any]:
    """Forward both sides, score, and return every loss term (``total`` carries the graph)."""
    q_ids, q_mask, p_ids, p_mask, targets, exclude = batch
    with autocast or contextlib.nullcontext():
        q = net.encode(q_ids, q_mask, modes)
        p = net.encode(p_ids, p_mask, modes)
    scores = score_matrices(q, p, modes)
    return unified_loss(scores, targets, temperature=temperature, exclude=exclude, self_distill=self_distill)


# ---------------------------------------------------------------------------------------------- trainer


def _sparse_stats(net: Any, encoder: Any, probe: _Tokenized, autocast: Any) -> dict[str, float]:
    """Mean, max and nonzero fraction of the sparse head's weights over the probe passages' real tokens."""
    was_training = net.training
    net.eval()
    weights = []
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for batch in encoder.plan_batches(probe.lengths):
            ids, mask = encoder._pad(probe.ids, batch, int(probe.lengths[batch].max()))
            hidden = net.model(input_ids=ids, attention_mask=mask).last_hidden_state
            keep = mask.bool() & ~torch.isin(ids, net.special_ids)
            weights.append(net.token_weights(hidden, ids, mask)[keep].cpu())
    net.train(was_training)
    w = torch.cat(weights) if weights else torch.zeros(1)
    return {"mean": float(w.mean()), "max": float(w.max()), "nonzero": float((w > 0).float().mean())}


def _mean_loss(history: Sequence[Mapping[str, float]], epoch: int) -> dict[str, float]:
    """Each loss term's mean over the epoch's steps, from the checkpointed history: a resumed epoch
    counts the steps run before the interruption too."""
    rows = [h for h in history if h["epoch"] == epoch]
    keys = [k for k in rows[0] if k not in ("step", "epoch")] if rows else []
    return {k: sum(h[k] for h in rows) / len(rows) for k in keys}


def _collapsed(stats: Mapping[str, float], before: Mapping[str, float]) -> bool:
    return stats["max"] == 0.0 or stats["nonzero"] < COLLAPSE_RATIO * before["nonzero"]


def _collapse_message(
    stats: Mapping[str, float], before: Mapping[str, float], epoch: int, out: Path, work: Path
) -> str:
    """Why the run stopped, against the probe's weights before training. Why two wordings: a head that gave
    every probe token weight 0 before the first step was not collapsed by training, and no lower ``--lr``
    revives it (its ReLU passes no gradient to weights at 0)."""
    end = f"nothing was written to {out}. Delete {work} and "
    if before["max"] == 0.0:
        return (
            f"the sparse head gives every probe token weight 0 after epoch {epoch}, as the base model's did before "
            "training: training did not collapse it, and a lower --lr cannot revive it (its ReLU passes no gradient "
            f"to weights at 0); {end}leave sparse out with --modes dense,colbert, or start from a model whose "
            "sparse head weighs these passages"
        )
    return (
        f"the sparse head collapsed in epoch {epoch}: {stats['nonzero']:.1%} of probe tokens keep a nonzero weight "
        f"(before training {before['nonzero']:.1%}), max {stats['max']:.4g} (before {before['max']:.4g}); "
        f"{end}lower --lr, or leave sparse out with --modes dense,colbert"
    )


def _peak_memory_mib(device: Any) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


#: What ``<out>.partial`` may hold: the checkpoint, its temporary copy while one is written, and
#: ``export/``, the model being written (renamed to ``<out>`` when complete).
_WORK_FILES = ("checkpoint.pt", "checkpoint.pt.tmp")
_EXPORT_DIR = "export"
#: What ``<out>.partial/export`` may hold: the files :func:`export_model` and :func:`write_report` write.
_EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "colbert_linear.pt",
    "sparse_linear.pt",
    *_COPIED_FILES,
    "report.json",
    "loss.png",
)


def _is_work_folder(work: Path) -> bool:
    """Whether ``work`` holds only what this command writes there, so it may be reused and deleted.
    Why by name: a folder of the user's that happens to be called ``<out>.partial`` must never be deleted."""
    if not work.is_dir():
        return False
    for p in work.iterdir():
        if p.name == _EXPORT_DIR and p.is_dir() and not p.is_symlink():
            if any(q.name not in _EXPORT_FILES for q in p.iterdir()):
                return False
        elif p.name not in _WORK_FILES:
            return False
    return True


def _publish(folder: Path, out: Path) -> None:
    """Rename the finished model ``folder`` to ``out``, never over anything there. Why ``mkdir`` first: a POSIX
    rename silently replaces an empty directory, so one created at ``out`` meanwhile would be taken over;
    ``mkdir`` claims the name atomically, and the rename then replaces only the empty folder made here."""
    try:
        out.mkdir()
    except FileExistsError:
        raise OutputTakenError(
            f"output folder {str(out)!r} appeared while training ran and was left as it is; the trained model is "
            f"in {str(folder)!r}: move it where you want it (or move {str(out)!r} away and run the same command "
            "again: it exports the model again from the checkpoint)"
        ) from None
    try:
        os.rename(folder, out)
    except BaseException:
        with contextlib.suppress(OSError):
            out.rmdir()  # only while it is still the empty folder made here
        raise


def _set_rng_states(saved: Mapping[str, Any], device: torch.device) -> None:
    """Restore the checkpoint's random generators. ``.cpu()``: loading with ``map_location`` moved the saved
    states to ``device``, and the setters take CPU byte tensors only (a resume on CUDA failed there)."""
    torch.set_rng_state(saved["torch_rng"].cpu())
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class FinetuneConfig:
    """Every setting that shapes training; a resumed run must be given the same ones."""

    modes: tuple[str, ...] = MODES
    epochs: int = 1
    lr: float = 1e-5
    batch_size: int = 8
    negatives: int = 7
    temperature: float = DEFAULT_TEMPERATURE
    warmup: float = 0.1
    weight_decay: float = 0.01
    query_max_length: int = 64
    passage_max_length: int = 256
    token_budget: int | None = None
    self_distill: bool = True
    gradient_checkpointing: bool = False
    holdout: float = 0.0
    seed: int = 0
    max_steps: int | None = None


def _check_config(cfg: FinetuneConfig, checkpoint_every: int) -> None:
    """Refuse settings that cannot train, before any model is loaded. Why every one: an unchecked one failed
    deep inside (a negative seed in NumPy, a float epoch count in ``range``), trained a model of NaN weights
    (lr=inf) or exported the base model untrained (max_steps=0)."""
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise FinetuneInputError(f"unknown mode(s) {bad}; choose a subset of {', '.join(MODES)}")
    counts = [
        ("epochs", cfg.epochs, 1),
        ("batch_size", cfg.batch_size, 1),
        ("negatives", cfg.negatives, 0),
        ("query_max_length", cfg.query_max_length, 2),  # [CLS] and [SEP]
        ("passage_max_length", cfg.passage_max_length, 2),
        ("seed", cfg.seed, 0),
        ("checkpoint_every", checkpoint_every, 0),
        *(
            (name, v, 1)
            for name, v in (("token_budget", cfg.token_budget), ("max_steps", cfg.max_steps))
            if v is not None
        ),
    ]
    try:
        for name, value, least in counts:
            check_int(name, value, least)
    except ValueError as e:
        raise FinetuneInputError(str(e)) from None
    reals = {"lr": cfg.lr, "temperature": cfg.temperature, "warmup": cfg.warmup, "weight_decay": cfg.weight_decay}
    if not_numbers := [f"{k}={v!r}" for k, v in reals.items() if isinstance(v, bool) or not isinstance(v, Real)]:
        raise FinetuneInputError(f"{', '.join(not_numbers)}: must be a number")  # (not "'<' not supported ...")
    if not (0 < cfg.lr < math.inf and 0 < cfg.temperature < math.inf and 0 <= cfg.warmup < 1):
        raise FinetuneInputError(
            f"lr and temperature must be finite and > 0, warmup in [0, 1); got lr={cfg.lr}, "
            f"temperature={cfg.temperature}, warmup={cfg.warmup}"
        )
    if not 0 <= cfg.weight_decay < math.inf:
        raise FinetuneInputError(f"weight_decay must be finite and >= 0, got {cfg.weight_decay}")


def _check_installed() -> None:
    """Fail before training when the ``finetune`` extra is missing (loss.png and held-out metrics need it)."""
    import importlib.util

    missing = [m for m in ("matplotlib", "pytrec_eval") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"fine-tuning needs {', '.join(missing)}: pip install 'm3search[finetune]'")


def finetune(
    data: str | os.PathLike,
    *,
    model: str | os.PathLike,
    out: str | os.PathLike,
    queries_dir: str | os.PathLike | None = None,
    modes: Sequence[str] | str = MODES,
    epochs: int = 1,
    lr: float = 1e-5,
    batch_size: int = 8,
    negatives: int = 7,
    temperature: float = DEFAULT_TEMPERATURE,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    query_max_length: int = 64,
    passage_max_length: int = 256,
    token_budget: int | None = None,
    self_distill: bool = True,
    gradient_checkpointing: bool = False,
    holdout: float = 0.0,
    split: str | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    checkpoint_every: int = 200,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` and write the result to ``out`` (bge-m3's layout) with its report.

    ``data``: a BEIR folder (``queries_dir`` takes the queries from another one: cross-lingual) or a
    FlagEmbedding JSONL file. ``holdout`` (BEIR only): this fraction of the judged queries (a fixed split by
    ``seed``) is never trained on; nDCG@10 per mode on it, before and after, goes into the report. ``split``
    (BEIR only): the judgements trained on, ``qrels/<split>.tsv``; None: ``train`` where there is one, else
    ``test`` (the report says which).
    ``dtype="auto"``: bf16 autocast on CPUs with bf16 units, fp16 on CUDA (bf16 where supported); master
    weights stay float32. ``token_budget``: padded tokens per batch (queries + passages).
    Interrupted? Run the same call again: it continues from ``<out>.partial/checkpoint.pt``.
    Returns the report (also ``out/report.json``).
    """
    from .encoder import M3Encoder, ModelLoadError
    from .eval import cache_folder, default_cache_dir

    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    cfg = FinetuneConfig(
        modes=tuple(m for m in MODES if m in modes) + tuple(m for m in modes if m not in MODES),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        negatives=negatives,
        temperature=temperature,
        warmup=warmup,
        weight_decay=weight_decay,
        query_max_length=query_max_length,
        passage_max_length=passage_max_length,
        token_budget=token_budget,
        self_distill=self_distill,
        gradient_checkpointing=gradient_checkpointing,
        holdout=holdout,
        seed=seed,
        max_steps=max_steps,
    )
    _check_config(cfg, checkpoint_every)
    _check_installed()
    out = Path(out)
    if out.exists():
        raise FinetuneInputError(f"output folder {str(out)!r} exists; choose a new --out (nothing is overwritten)")
    above = next(a for a in out.parents if a.exists())  # missing folders are made when training starts
    if not above.is_dir():
        raise FinetuneInputError(f"the output folder's parent {str(above)!r} is a file, not a folder")
    work = out.with_name(out.name + ".partial")
    if work.exists() and not _is_work_folder(work):
        raise FinetuneInputError(
            f"{str(work)!r} exists and is not this command's checkpoint folder (it holds other files; it is removed "
            "when training ends): move it away, or choose another --out"
        )
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    data = Path(data)

    # ---- data and base model, all checked before any training
    beir = None
    if data.is_dir():
        beir = read_beir_examples(data, queries_dir=queries_dir, holdout=holdout, seed=seed, split=split)
        examples = beir.examples
        if negatives or beir.heldout is not None:  # mining and held-out metrics index the corpus in the cache:
            try:  # a folder that cannot be made is said before the model loads, as eval and tune say it
                cache_folder(cache, make=False)  # made when used: a run refused below leaves nothing
            except ValueError as e:
                raise FinetuneInputError(str(e)) from None
    elif data.is_file():
        if queries_dir is not None or holdout or split is not None:
            raise FinetuneInputError("queries_dir, holdout and split apply to a BEIR folder, not a JSONL file")
        examples = read_jsonl_examples(data)
    else:
        raise FinetuneInputError(f"training data {str(data)!r} does not exist")
    try:
        base = M3Encoder.from_pretrained(model, device=device, dtype=dtype)
    except ModelLoadError as e:
        raise FinetuneInputError(f"base model: {e}") from None
    dev, amp_dtype = base.device, base.dtype
    # Data that cannot train is refused before mining when mining cannot change it (JSONL is never mined). The
    # trainee below tokenizes alike (same checkpoint) and has this budget: the same device's default unless given.
    known = None
    if beir is None or _mining_adds_nothing(beir, negatives):
        known = _contrasting_batches(base, examples, cfg, token_budget or base.token_budget)

    report: dict[str, Any] = {
        "base_model": str(model),
        "base_identity": base.identity,
        "data": str(data.resolve()),
        "data_sha256": _data_sha256(examples, beir.data.corpus_sha256 if beir else None),  # before mining
        "queries_dir": str(Path(queries_dir).resolve()) if queries_dir else None,
        "config": asdict(cfg),
        "device": str(dev),
        "autocast": str(amp_dtype).replace("torch.", ""),
        "n_train_queries": len(examples),
    }
    started = time.perf_counter()
    if beir is not None:
        mine_t0 = time.perf_counter()
        mine_negatives(beir, base, negatives, cache_dir=cache, seed=seed, progress=progress)
        report["mining_seconds"] = round(time.perf_counter() - mine_t0, 2)
        report["empty_positives_dropped"] = beir.empty_positives_dropped
        report["split"] = beir.qrels_split
        if beir.heldout is not None:
            report["n_heldout_queries"] = len(beir.heldout.queries)
            report["heldout_before"] = _heldout_metrics(beir.heldout, base, cache, progress)
    del base

    # ---- training (fp32 master weights; autocast in amp_dtype)
    trainee = M3Encoder.from_pretrained(model, device=str(dev), dtype="float32", token_budget=token_budget)
    budget = trainee.token_budget
    net = M3Trainable(trainee)
    if gradient_checkpointing:
        net.model.gradient_checkpointing_enable()
    plan, schedule = known or _contrasting_batches(trainee, examples, cfg, budget)
    probe_ids = sorted({p[0] for p in plan.positives})[:_PROBE_PASSAGES]
    probe = _Tokenized([plan.passages.ids[i] for i in probe_ids], plan.passages.lengths[probe_ids])
    autocast = None
    if amp_dtype != torch.float32:
        if dev.type == "cuda" and amp_dtype == torch.float16 and torch.cuda.is_bf16_supported():
            amp_dtype = torch.bfloat16  # same speed, no loss scaling needed
        autocast = torch.autocast(device_type=dev.type, dtype=amp_dtype)
        report["autocast"] = str(amp_dtype).replace("torch.", "")
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda" and amp_dtype == torch.float16)

    n_batches = sum(len(b) for b in schedule)
    report["queries_per_batch"] = round(len(examples) * epochs / n_batches, 2)  # the token budget may cap batch_size
    report["token_budget"] = budget
    total_steps = n_batches if max_steps is None else min(max_steps, n_batches)
    warm = max(1, int(total_steps * warmup)) if warmup else 0
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm))
    )

    fingerprint = {"config": asdict(cfg), "base": report["base_identity"], "data": report["data"]}
    fingerprint["data_sha256"] = report["data_sha256"]
    state: dict[str, Any] = dict(step=0, epoch=0, batch=0, history=[], epochs=[], seconds=0.0, cpu_seconds=0.0)
    checkpoint = work / _WORK_FILES[0]
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=dev, weights_only=False)
        if "data_sha256" not in saved["fingerprint"]:  # written before checkpoints recorded the data
            raise FinetuneInputError(
                f"{work} holds a checkpoint written by an earlier m3search, which cannot be resumed by this one; "
                "delete that folder to start over"
            )
        if saved["fingerprint"] != fingerprint:
            split = report.get("split")  # (BEIR's default judgements became train.tsv where there is one)
            raise FinetuneInputError(
                f"{work} holds a checkpoint of a different run (other settings, data or base model); "
                "run the same command as before to resume it, or delete that folder to start over"
                + (f" (this run trains on qrels/{split}.tsv: --split picks the judgements)" if split else "")
            )
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_states(saved, dev)
        state = {"cpu_seconds": 0.0, **saved["state"]}  # (a checkpoint written before cpu_seconds)
        report["resumed_at_step"] = state["step"]
    work.mkdir(parents=True, exist_ok=True)  # and --out's missing parents, as index makes a collection's

    def save_checkpoint() -> None:
        payload = {
            "fingerprint": fingerprint,
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,  # dropout on the GPU
            "state": state,
        }
        _save_atomic(payload, checkpoint)

    if not state["epochs"] and state["step"] == 0:
        state["sparse_before"] = _sparse_stats(net, trainee, probe, autocast)
    from tqdm.auto import tqdm

    net.train()
    if state["step"] == 0:
        torch.manual_seed(seed)  # dropout; a resumed run restores the saved generator instead
    while state["epoch"] < epochs and state["step"] < total_steps:
        epoch = state["epoch"]
        batches = schedule[epoch]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        bar = tqdm(
            total=len(batches), initial=state["batch"], desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
            file=sys.stderr, disable=None if progress else True,
        )  # fmt: skip
        try:
            for b in range(state["batch"], len(batches)):
                if state["step"] >= total_steps:
                    break
                batch = _batch_tensors(trainee, plan, *batches[b])
                terms = training_step(
                    net, batch, cfg.modes, temperature=temperature, self_distill=self_distill, autocast=autocast
                )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(terms["total"]).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                values = {k: float(v.detach()) for k, v in terms.items()}
                if not math.isfinite(values["total"]):
                    raise RuntimeError(f"the loss is {values['total']} at step {state['step']}: lower --lr")
                state["history"].append({"step": state["step"], "epoch": epoch, **values})
                state["step"] += 1
                state["batch"] = b + 1
                bar.update(1)
                bar.set_postfix(loss=f"{values['total']:.4f}")
                if checkpoint_every and state["step"] % checkpoint_every == 0:
                    state["seconds"] += time.perf_counter() - t0
                    state["cpu_seconds"] += time.process_time() - c0
                    t0, c0 = time.perf_counter(), time.process_time()
                    save_checkpoint()
        finally:
            bar.close()
        state["seconds"] += time.perf_counter() - t0
        state["cpu_seconds"] += time.process_time() - c0
        done = state["batch"]
        stats = _sparse_stats(net, trainee, probe, autocast)
        state["epochs"].append(
            {
                "epoch": epoch + 1,
                "steps": done,
                "seconds": round(state["seconds"], 2),
                "cpu_seconds": round(state["cpu_seconds"], 2),  # all threads: the cost on a shared machine
                "peak_memory_mib": round(_peak_memory_mib(dev), 1),
                "mean_loss": _mean_loss(state["history"], epoch),
                "sparse_weights": stats,
            }
        )
        state.update(epoch=epoch + 1, batch=0, seconds=0.0, cpu_seconds=0.0)
        if "sparse" in cfg.modes and _collapsed(stats, state["sparse_before"]):
            raise SparseCollapseError(_collapse_message(stats, state["sparse_before"], epoch + 1, out, work))
        save_checkpoint()

    report.update(
        steps=state["step"],
        epochs=state["epochs"],
        sparse_weights_before=state["sparse_before"],
        history=state["history"],
        train_seconds=round(sum(e["seconds"] for e in state["epochs"]), 2),
    )

    # ---- export (atomic), then held-out metrics of what was written
    net.eval()
    if gradient_checkpointing:
        net.model.gradient_checkpointing_disable()
    # In the checkpoint folder, under a fixed name: a run killed while exporting leaves its copy there, and the
    # next run of the command (or deleting that folder) removes it.
    export = work / _EXPORT_DIR
    shutil.rmtree(export, ignore_errors=True)  # a killed export's (checked as this command's at the start)
    try:
        export_model(net, trainee.folder, export)
        if beir is not None and beir.heldout is not None:
            tuned = M3Encoder.from_pretrained(export, device=device, dtype=dtype)
            report["heldout_after"] = _heldout_metrics(beir.heldout, tuned, cache, progress)
            del tuned
        report["total_seconds"] = round(time.perf_counter() - started, 2)
        write_report(report, export)
    except BaseException:
        shutil.rmtree(export, ignore_errors=True)
        raise
    _publish(export, out)
    shutil.rmtree(work, ignore_errors=True)
    report["out"] = str(out)
    return report


#: config.json key holding the sha256 of the exported transformer weights. Why: a model's identity (eval's index
#: cache, collection manifests) hashes config, heads and tokenizer but not the transformer body, so a dense-only
#: fine-tune (heads untouched) would otherwise pass for its base model and reuse the base model's indexes.
WEIGHTS_KEY = "m3search_weights_sha256"


def export_model(net: Any, base_folder: Path, folder: Path) -> Path:
    """Write ``net`` in bge-m3's layout: config.json + model.safetensors, both heads, the tokenizer files."""
    folder.mkdir(parents=True)
    net.model.save_pretrained(str(folder), safe_serialization=True)
    with open(folder / "model.safetensors", "rb") as fh:
        weights_sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, WEIGHTS_KEY: weights_sha256}, indent=2) + "\n")
    torch.save({k: v.detach().cpu() for k, v in net.colbert_linear.state_dict().items()}, folder / "colbert_linear.pt")
    torch.save({k: v.detach().cpu() for k, v in net.sparse_linear.state_dict().items()}, folder / "sparse_linear.pt")
    for name in _COPIED_FILES:
        if (base_folder / name).is_file():
            shutil.copy2(base_folder / name, folder / name)
    return folder


def _heldout_metrics(data: Any, encoder: Any, cache: Path, progress: bool) -> dict[str, dict[str, float]]:
    """nDCG@10, Recall@100 and MRR@10 of the held-out queries in each search mode (eval's index and metrics)."""
    from .eval import RECALL_AT, _cached_index, compute_metrics

    index, _ = _cached_index(data, encoder, cache, batch_size=None, progress=progress)
    try:
        qids = list(data.queries)
        texts = [data.queries[q] for q in qids]
        emb = index.encoder.encode(texts, max_length=index.settings["query_max_length"])
        out = {}
        for mode in (*MODES, "all"):
            hits = index.search_batch(texts, k=RECALL_AT, mode=mode, query_embeddings=emb)
            run = {q: {h.id: float(h.score) for h in hs} for q, hs in zip(qids, hits)}
            m = compute_metrics(run, data.qrels, k=10, recall_at=RECALL_AT)
            m.pop("per_query")
            out[mode] = {k: round(v, 4) for k, v in m.items()}
        return out
    finally:
        index.close()


# ---------------------------------------------------------------------------------------------- report


def write_report(report: Mapping[str, Any], folder: Path) -> None:
    """``report.json`` and ``loss.png`` (one curve per loss term) into ``folder``."""
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    history = report.get("history") or []
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("step", "epoch")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 2.8), squeeze=False)
    try:
        steps = [h["step"] for h in history]
        for ax, key in zip(axes[0], keys):
            ax.plot(steps, [h[key] for h in history], lw=1)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(folder / "loss.png", dpi=100)
    finally:
        plt.close(fig)


def summary(report: Mapping[str, Any]) -> Iterator[str]:
    """Human-readable lines of a report (the CLI prints them)."""
    yield f"{report['out']}: {report['steps']} steps in {report['train_seconds']} s on {report['device']}"
    if "split" in report:
        yield f"  trained on qrels/{report['split']}.tsv ({report['n_train_queries']} queries)"
    for e in report["epochs"]:
        s = e["sparse_weights"]
        yield (
            f"  epoch {e['epoch']}: loss {e['mean_loss'].get('total', float('nan')):.4f}, {e['seconds']} s, "
            f"peak memory {e['peak_memory_mib']:.0f} MiB, sparse weights mean {s['mean']:.4f} max {s['max']:.4f} "
            f"nonzero {s['nonzero']:.1%}"
        )
    if "heldout_after" in report:
        yield f"  held-out nDCG@10 ({report['n_heldout_queries']} queries), before -> after:"
        for mode, after in report["heldout_after"].items():
            yield f"    {mode:8s} {report['heldout_before'][mode]['ndcg@10']:.4f} -> {after['ndcg@10']:.4f}"
