"""m3search.finetune: the unified loss against the paper's formulas, data checks, resume, export.

The parity test computes BGE-M3's objective (arXiv 2402.03216, section 3.3, with FlagEmbedding's
weights) a second time from scratch: each text through the transformer alone (no padding), the
three scores as plain loops over tokens, InfoNCE and the distillation term written out. Loss
terms and the weights after one SGD step must agree with the library's batched version.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from m3search.finetune import (
    _EXPORT_FILES,
    ENSEMBLE_WEIGHTS,
    LOSS_WEIGHTS,
    MODES,
    Example,
    FinetuneInputError,
    M3Trainable,
    SparseCollapseError,
    _batch_tensors,
    _plan,
    finetune,
    read_beir_examples,
    read_jsonl_examples,
    training_step,
    unified_loss,
)
from m3search.testing import BUILTIN_TEXTS

TEMPERATURE = 0.2


# ---------------------------------------------------------------------------------------------- reference


def _reference_reps(net, token_ids: list[int], special: set[int]):
    """One text through the transformer alone: [CLS] vector, {token: weight}, ColBERT vectors."""
    ids = torch.tensor([token_ids])
    hidden = net.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    cls = hidden[0] / torch.sqrt((hidden[0] ** 2).sum())
    lexical: dict[int, torch.Tensor] = {}
    for pos, tok in enumerate(token_ids):
        if tok in special:
            continue
        w = torch.relu(net.sparse_linear.weight[0] @ hidden[pos] + net.sparse_linear.bias[0])
        lexical[tok] = w if tok not in lexical else torch.maximum(lexical[tok], w)
    vecs = []
    for pos in range(1, len(token_ids)):
        v = net.colbert_linear.weight @ hidden[pos] + net.colbert_linear.bias
        vecs.append(v / torch.sqrt((v**2).sum()))
    return cls, lexical, vecs


def _reference_scores(q, p) -> dict[str, torch.Tensor]:
    q_cls, q_lex, q_vecs = q
    p_cls, p_lex, p_vecs = p
    dense = sum(a * b for a, b in zip(q_cls, p_cls))
    sparse = sum((q_lex[t] * p_lex[t] for t in q_lex if t in p_lex), torch.zeros(()))
    colbert = sum(max((qv * pv).sum() for pv in p_vecs) for qv in q_vecs) / len(q_vecs)
    return {"dense": dense, "sparse": sparse, "colbert": colbert}


def _log_softmax(row: list[torch.Tensor]) -> list[torch.Tensor]:
    top = max(float(x.detach()) for x in row)
    log_z = top + torch.log(sum(torch.exp(x - top) for x in row))
    return [x - log_z for x in row]


def _reference_loss(net, tokenizer, queries: list[str], passages: list[str], targets: list[int], special: set[int]):
    """Every term of the unified loss, from the paper's formulas, one number at a time."""
    q_reps = [_reference_reps(net, tokenizer.encode(t).ids, special) for t in queries]
    p_reps = [_reference_reps(net, tokenizer.encode(t).ids, special) for t in passages]
    s = [[_reference_scores(q, p) for p in p_reps] for q in q_reps]
    n = len(queries)
    logits = {m: [[s[i][j][m] / TEMPERATURE for j in range(len(passages))] for i in range(n)] for m in MODES}
    logits["ensemble"] = [
        [sum(ENSEMBLE_WEIGHTS[m] * logits[m][i][j] for m in MODES) for j in range(len(passages))] for i in range(n)
    ]
    terms = {k: -sum(_log_softmax(logits[k][i])[targets[i]] for i in range(n)) / n for k in logits}
    for m in MODES:
        total = 0
        for i in range(n):
            teacher = [torch.exp(x).detach() for x in _log_softmax(logits["ensemble"][i])]
            total = total - sum(t * x for t, x in zip(teacher, _log_softmax(logits[m][i])))
        terms[f"distill_{m}"] = total / n
    contrastive = (sum(LOSS_WEIGHTS[m] * terms[m] for m in MODES) + terms["ensemble"]) / 4
    distill = sum(LOSS_WEIGHTS[m] * terms[f"distill_{m}"] for m in MODES) / 3
    terms["total"] = (contrastive + distill) / 2
    return terms


def test_one_step_matches_the_papers_formulas(tiny_model_path):
    """Loss terms and SGD-updated weights of one step equal a loop-by-loop reference (fp32, no dropout)."""
    from m3search import M3Encoder

    enc = M3Encoder.from_pretrained(str(tiny_model_path), device="cpu", dtype="float32")
    texts = list(BUILTIN_TEXTS)
    examples = [
        Example("fox and dog by the river", [texts[0]], [texts[3], texts[7]]),
        Example("hypersonic flow heating", [texts[8]], [texts[1], texts[4]]),
    ]
    plan = _plan(enc, examples, 64, 256)
    groups = np.array([[plan.positives[0][0], *plan.negatives[0]], [plan.positives[1][0], *plan.negatives[1]]])
    batch = _batch_tensors(enc, plan, np.array([0, 1]), groups)
    assert batch[2].shape[1] > min(len(plan.passages.ids[i]) for i in groups.ravel()), "no padding: a weak test"

    net = M3Trainable(enc).eval()  # eval: no dropout, so both sides see the same function
    ref_net = copy.deepcopy(net)
    ours = training_step(net, batch, MODES, temperature=TEMPERATURE, self_distill=True)
    passages = [t for e in examples for t in [*e.positives, *e.negatives]]
    special = set(enc.special_ids.tolist())
    ref = _reference_loss(ref_net, enc.tokenizer, [e.query for e in examples], passages, [0, 3], special)
    assert set(ours) == set(ref)
    for key in ref:
        assert float(ours[key].detach()) == pytest.approx(float(ref[key].detach()), rel=1e-5, abs=1e-5), key
    assert 0.05 < float(ref["total"].detach()) < 50, "a degenerate loss would make the comparison weak"

    for model, loss in ((net, ours["total"]), (ref_net, ref["total"])):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = 0.0
    before = M3Trainable(M3Encoder.from_pretrained(str(tiny_model_path), device="cpu", dtype="float32"))
    for (name, a), b, c in zip(net.named_parameters(), ref_net.parameters(), before.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=name)
        moved = max(moved, float((a - c).detach().abs().max()))
    assert moved > 1e-3, "the step did not change the weights: the comparison could not fail"


# ---------------------------------------------------------------------------------------------- loss options


def _random_scores(n_q=3, n_p=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(n_q, n_p, generator=g) for m in MODES}


def test_single_mode_is_plain_infonce():
    scores = _random_scores()
    targets = torch.tensor([0, 3, 6])
    terms = unified_loss({"dense": scores["dense"]}, targets, temperature=0.05)
    expected = torch.nn.functional.cross_entropy(scores["dense"] / 0.05, targets)
    assert set(terms) == {"dense", "total"}
    assert float(terms["total"]) == pytest.approx(float(expected))


def test_two_modes_keep_ensemble_and_distillation():
    scores = _random_scores()
    targets = torch.tensor([0, 3, 6])
    terms = unified_loss({m: scores[m] for m in ("dense", "colbert")}, targets, temperature=0.05)
    assert set(terms) == {"dense", "colbert", "ensemble", "distill_dense", "distill_colbert", "total"}
    contrastive = (terms["dense"] + terms["colbert"] + terms["ensemble"]) / 3
    assert float(terms["total"]) == pytest.approx(
        float((contrastive + (terms["distill_dense"] + terms["distill_colbert"]) / 2) / 2)
    )
    no_kd = unified_loss({m: scores[m] for m in ("dense", "colbert")}, targets, temperature=0.05, self_distill=False)
    assert float(no_kd["total"]) == pytest.approx(float(contrastive))


def test_excluded_passages_do_not_count_as_negatives():
    """Query 0's other judged positive (column 4) leaves its softmax: changing its score changes nothing."""
    scores = _random_scores()
    targets = torch.tensor([0, 3, 6])
    exclude = torch.zeros(3, 9, dtype=torch.bool)
    exclude[0, 4] = True
    a = unified_loss(scores, targets, exclude=exclude)
    bumped = {m: s.clone() for m, s in scores.items()}
    for s in bumped.values():
        s[0, 4] += 5.0
    b = unified_loss(bumped, targets, exclude=exclude)
    c = unified_loss(bumped, targets)
    assert all(math.isfinite(float(v)) for v in a.values())
    assert float(a["total"]) == pytest.approx(float(b["total"]))
    assert float(c["total"]) > float(a["total"]) + 0.1  # without the mask it would have hurt


def test_a_query_on_several_lines_never_takes_its_own_positives_as_negatives(tiny_encoder):
    """FlagEmbedding data often has one line per positive: each line's positive is a judged positive of the
    same query on the other line, so it leaves that row's softmax too (the column of another query stays)."""
    t = BUILTIN_TEXTS
    examples = [
        Example("what is a fox", [t[0]], [t[5]]),
        Example("what is a fox", [t[1]], [t[6]]),
        Example("hypersonic flow heating", [t[8]], [t[7]]),
    ]
    plan = _plan(tiny_encoder, examples, 64, 256)
    groups = np.array([[plan.positives[i][0], *plan.negatives[i]] for i in range(3)])
    exclude = _batch_tensors(tiny_encoder, plan, np.arange(3), groups)[5].numpy()
    expected = np.zeros((3, 6), dtype=bool)
    expected[0, 2] = expected[1, 0] = True  # each fox line's positive is the other line's excluded column
    np.testing.assert_array_equal(exclude, expected)


# ---------------------------------------------------------------------------------------------- data
# ---------------------------------------------------------------------------------------------- data


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train_rows(n=12):
    t = BUILTIN_TEXTS
    return [{"query": t[i % 10][:32], "pos": [t[i % 10]], "neg": [t[(i + 3) % 10], t[(i + 5) % 10]]} for i in range(n)]


def test_jsonl_errors_name_the_line(tmp_path):
    with pytest.raises(FinetuneInputError, match=r"train.jsonl:2: query 'q2' has no positive"):
        read_jsonl_examples(
            _jsonl(tmp_path / "train.jsonl", [{"query": "q1", "pos": ["a"]}, {"query": "q2", "pos": []}])
        )
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "pos": ["a"]}\n{oops\n')
    with pytest.raises(FinetuneInputError, match=r"bad.jsonl:2: invalid JSON"):
        read_jsonl_examples(tmp_path / "bad.jsonl")
    with pytest.raises(FinetuneInputError, match='"neg" must be a list of strings'):
        read_jsonl_examples(_jsonl(tmp_path / "neg.jsonl", [{"query": "q", "pos": ["a"], "neg": "b"}]))


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"query": "q", "pos": ["a"], "n": ' + "9" * 5000 + "}", r"bad.jsonl:2: invalid JSON \(Exceeds the limit"),
        ('{"query": "q", "pos": ["a"], "n": ' + "[" * 100_000 + "]" * 100_000 + "}", r"bad.jsonl:2: invalid JSON"),
        ('{"query": "q\\ud800", "pos": ["a"]}', r"bad.jsonl:2: query: not valid Unicode text \(lone surrogate"),
        ('{"query": "q", "pos": ["a"], "neg": ["b", "\\udc00"]}', r"bad.jsonl:2: neg\[1\]: not valid Unicode"),
    ],
)
def test_jsonl_any_parse_or_text_error_names_the_line(tmp_path, line, words):
    """The JSON parser's ValueError / RecursionError escaped without a line; a lone surrogate reached the
    tokenizer ("TextEncodeInput must be Union[...]")."""
    (tmp_path / "bad.jsonl").write_text('{"query": "q0", "pos": ["a"]}\n' + line + "\n")
    with pytest.raises(FinetuneInputError, match=words):
        read_jsonl_examples(tmp_path / "bad.jsonl")


def test_jsonl_bom_and_bad_bytes(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"query": "q1", "pos": ["a"]}\r\n{"query": "q2", "pos": ["b"]}\r\n')
    assert [(e.query, e.positives) for e in read_jsonl_examples(path)] == [("q1", ["a"]), ("q2", ["b"])]
    path.write_bytes(b'{"query": "q1", "pos": ["a"]}\n{"query": "caf\xe9", "pos": ["b"]}\n')  # Latin-1
    with pytest.raises(FinetuneInputError, match=r"train.jsonl:2: not UTF-8 text"):
        read_jsonl_examples(path)


def _beir(folder: Path, n_docs=24, n_queries=8, qrels=None) -> Path:
    folder.mkdir()
    t = BUILTIN_TEXTS
    docs = [{"_id": f"d{i}", "title": "", "text": f"{t[i % 10]} number {i}"} for i in range(n_docs)]
    _jsonl(folder / "corpus.jsonl", docs)
    _jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": t[i % 10][:30]} for i in range(n_queries)])
    (folder / "qrels").mkdir()
    rows = qrels or [(f"q{i}", f"d{i}", 1) for i in range(n_queries)] + [("q0", "d10", 2)]
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
    )
    return folder


def test_beir_bad_input_is_refused(tmp_path):
    with pytest.raises(FinetuneInputError, match="absent from the corpus"):
        read_beir_examples(_beir(tmp_path / "a", qrels=[("q0", "d0", 1), ("q1", "nope", 1)]))
    with pytest.raises(FinetuneInputError, match=r"1 judged query has no positive .*\['q1'\]"):
        read_beir_examples(_beir(tmp_path / "b", qrels=[("q0", "d0", 1), ("q1", "d1", 0)]))


def test_beir_positives_without_text_are_dropped_and_counted(tmp_path):
    """A judged document with no text is left out of the positives (as JSONL's empty ones are), counted for the
    report; a query left without a positive is refused, as a JSONL line would be."""
    folder = _beir(tmp_path / "beir", qrels=[("q0", "d0", 1), ("q0", "d10", 1), ("q1", "d1", 1)])
    corpus = (folder / "corpus.jsonl").read_text().splitlines(keepends=True)
    corpus[0] = json.dumps({"_id": "d0", "title": "", "text": " "}) + "\n"
    (folder / "corpus.jsonl").write_text("".join(corpus))
    split = read_beir_examples(folder)
    assert [(e.qid, e.positives) for e in split.examples] == [
        ("q0", [f"{BUILTIN_TEXTS[0]} number 10"]),
        ("q1", [f"{BUILTIN_TEXTS[1]} number 1"]),
    ]
    assert split.empty_positives_dropped == 1
    corpus[10] = json.dumps({"_id": "d10", "title": "", "text": ""}) + "\n"
    (folder / "corpus.jsonl").write_text("".join(corpus))
    with pytest.raises(FinetuneInputError, match=r"1 judged query has only positives with no text.*\['q0'\]"):
        read_beir_examples(folder)


def test_holdout_split_is_fixed_and_disjoint(tmp_path):
    folder = _beir(tmp_path / "beir", n_queries=8)
    a = read_beir_examples(folder, holdout=0.5, seed=3)
    b = read_beir_examples(folder, holdout=0.5, seed=3)
    assert list(a.data.queries) == list(b.data.queries) and len(a.data.queries) == 4
    assert not set(a.data.queries) & set(a.heldout.queries)
    assert {e.qid for e in a.examples} == set(a.data.queries)
    for e in a.examples:  # every judged positive (score > 0), in document-id order
        n = int(e.qid[1:])
        expected = [f"{BUILTIN_TEXTS[i % 10]} number {i}" for i in ([0, 10] if n == 0 else [n])]
        assert e.positives == expected and e.negatives == []


# ---------------------------------------------------------------------------------------------- end to end


def _run(tmp_path, model, data, out="out", **kw):
    kw = {"epochs": 1, "batch_size": 4, "negatives": 2, "lr": 1e-4, "dtype": "float32", "progress": False, **kw}
    return finetune(data, model=model, out=tmp_path / out, cache_dir=tmp_path / "cache", **kw)


def _killed_at(monkeypatch, name: str, call: int):
    """Make ``finetune.<name>`` raise KeyboardInterrupt at its ``call``-th call (an interrupted run); returns the
    real function, to put back."""
    from m3search import finetune as ft

    real, calls = getattr(ft, name), {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, name, dies)
    return real


def test_jsonl_run_writes_a_model_every_part_loads(tmp_path, tiny_model_path):
    from m3search import Collection, M3Encoder

    data = _jsonl(tmp_path / "train.jsonl", _train_rows())
    report = _run(tmp_path, tiny_model_path, data, epochs=2)
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "loss.png").stat().st_size > 1000
    assert {p.name for p in out.iterdir()} <= set(_EXPORT_FILES)  # what a later run may clean up as its own
    saved = json.loads((out / "report.json").read_text())
    assert saved["steps"] == report["steps"] == 6 and len(saved["epochs"]) == 2
    assert {"mean", "max", "nonzero"} <= set(saved["epochs"][0]["sparse_weights"])
    assert saved["epochs"][0]["peak_memory_mib"] > 0 and saved["epochs"][0]["cpu_seconds"] > 0
    assert not (tmp_path / "out.partial").exists()

    base = M3Encoder.from_pretrained(str(tiny_model_path), device="cpu", dtype="float32")
    tuned = M3Encoder.from_pretrained(str(out), device="cpu", dtype="float32")
    assert tuned.identity != base.identity
    a, b = base.encode(BUILTIN_TEXTS[:3]), tuned.encode(BUILTIN_TEXTS[:3])
    assert np.abs(a.dense - b.dense).max() > 1e-4
    with Collection.create(tmp_path / "col", model=tuned) as col:
        col.add(list(BUILTIN_TEXTS), ids=[f"d{i}" for i in range(10)])
        assert col.search(BUILTIN_TEXTS[0], k=1)[0].id == "d0"


def test_bad_input_is_refused_before_training(tmp_path, tiny_model_path):
    data = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FinetuneInputError, match="exists"):
        _run(tmp_path, tiny_model_path, data, out="taken")
    not_m3 = tmp_path / "not-m3"
    not_m3.mkdir()
    (not_m3 / "config.json").write_text("{}")
    with pytest.raises(FinetuneInputError, match="not a BGE-M3 checkpoint"):
        _run(tmp_path, not_m3, data)
    with pytest.raises(FinetuneInputError, match="unknown mode"):
        _run(tmp_path, tiny_model_path, data, modes="dense,lexical")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # a folder at <out>.partial that is not a checkpoint folder was reused, then deleted with its files
    (tmp_path / "mine.partial").mkdir()
    (tmp_path / "mine.partial" / "notes.txt").write_text("precious")
    with pytest.raises(FinetuneInputError, match="not this command's checkpoint folder"):
        _run(tmp_path, tiny_model_path, data, out="mine")
    assert (tmp_path / "mine.partial" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "rows, settings",
    [
        ([{"query": "q", "pos": ["only passage"]}], {}),  # one query, nothing else to draw negatives from
        (_train_rows(4), {"negatives": 0, "batch_size": 1}),  # every batch: one query and its positive
    ],
)
def test_a_run_with_nothing_to_contrast_is_refused(tmp_path, tiny_model_path, rows, settings):
    """Every loss would be exactly 0: refused before training, nothing written (it wrote the base model back)."""
    with pytest.raises(FinetuneInputError, match="nothing to contrast"):
        _run(tmp_path, tiny_model_path, _jsonl(tmp_path / "train.jsonl", rows), **settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


@pytest.mark.parametrize(
    "corpus, settings",
    [
        ({"n_docs": 1, "n_queries": 1, "qrels": [("q0", "d0", 1)]}, {}),  # the corpus is the query's positive
        ({}, {"negatives": 0, "batch_size": 1, "holdout": 0.5}),  # mining adds nothing; one query per batch
    ],
)
def test_beir_with_nothing_to_contrast_is_refused_before_mining(
    tmp_path, tiny_model_path, monkeypatch, corpus, settings
):
    """Whether a BEIR run has anything to contrast is known from the input when mining cannot add a negative:
    refused before mining and the held-out evaluation (each encodes the corpus), as JSONL is refused."""
    from m3search import finetune as ft

    calls = []
    for name in ("mine_negatives", "_heldout_metrics"):
        real = getattr(ft, name)
        monkeypatch.setattr(ft, name, lambda *a, _name=name, _real=real, **kw: calls.append(_name) or _real(*a, **kw))
    with pytest.raises(FinetuneInputError, match="nothing to contrast"):
        _run(tmp_path, tiny_model_path, _beir(tmp_path / "beir", **corpus), **settings)
    assert calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beir"]


@pytest.mark.parametrize(
    "setting, words",
    [
        ({"max_steps": 0}, "max_steps must be a positive integer"),  # exported the base model untrained
        ({"lr": math.inf}, "lr and temperature must be finite"),  # exported NaN weights
        ({"temperature": math.inf}, "lr and temperature must be finite"),
        ({"lr": "1e-5"}, r"lr='1e-5': must be a number"),  # the Python API: TypeError from a comparison
        ({"warmup": None}, r"warmup=None: must be a number"),
        ({"weight_decay": -0.1}, "weight_decay must be finite and >= 0"),
        ({"weight_decay": math.nan}, "weight_decay must be finite and >= 0"),  # "the sparse head collapsed"
        ({"seed": -1}, "seed must be an integer >= 0"),  # NumPy's "expected non-negative integer"
        ({"epochs": 1.5}, "epochs must be a positive integer"),  # "'float' object cannot be interpreted ..."
        ({"passage_max_length": -1}, "passage_max_length must be an integer >= 2"),  # OverflowError
        ({"query_max_length": 0}, "query_max_length must be an integer >= 2"),
        ({"checkpoint_every": -1}, "checkpoint_every must be an integer >= 0"),
    ],
)
def test_settings_that_cannot_train_are_refused_first(tmp_path, setting, words):
    """Checked before the data and the base model (here: neither exists), each naming the setting."""
    with pytest.raises(FinetuneInputError, match=words):
        _run(tmp_path, tmp_path / "no-model", tmp_path / "no-data.jsonl", **setting)


def test_beir_run_mines_negatives_and_reports_heldout_metrics(tmp_path, tiny_model_path, monkeypatch):
    from m3search import finetune as ft
    from m3search.eval import evaluate

    mined = {}
    real = ft.mine_negatives

    def spy(split, *args, **kwargs):
        real(split, *args, **kwargs)
        mined.update({e.qid: (e.positives, e.negatives) for e in split.examples})

    monkeypatch.setattr(ft, "mine_negatives", spy)
    folder = _beir(tmp_path / "beir")
    report = _run(tmp_path, tiny_model_path, folder, holdout=0.5, modes="dense,colbert")
    assert report["n_train_queries"] == 4 and report["n_heldout_queries"] == 4
    assert report["empty_positives_dropped"] == 0
    assert set(report["heldout_before"]) == set(report["heldout_after"]) == {"dense", "sparse", "colbert", "all"}
    assert "sparse" not in report["epochs"][0]["mean_loss"]
    text_of = {f"d{i}": f"{BUILTIN_TEXTS[i % 10]} number {i}" for i in range(24)}
    for qid, (pos, negs) in mined.items():
        assert len(negs) == 2 and not set(negs) & set(pos)
        assert text_of[f"d{qid[1:]}"] in pos
    # `m3search eval` loads the output as any model folder.
    results = evaluate(
        folder, model=str(tmp_path / "out"), modes=["dense"], cache_dir=tmp_path / "cache", progress=False
    )
    assert 0.0 <= results["modes"]["dense"]["ndcg@10"] <= 1.0


def test_dense_only_output_is_not_taken_for_its_base(tmp_path, tiny_model_path):
    """Dense-only training leaves both heads as they were; the output must still have its own identity
    (eval's index cache, manifests), and the held-out "after" must be measured with the tuned documents."""
    from m3search import M3Encoder
    from m3search.finetune import WEIGHTS_KEY, _heldout_metrics

    folder = _beir(tmp_path / "beir")
    report = _run(tmp_path, tiny_model_path, folder, holdout=0.5, modes="dense", lr=1e-3, epochs=3)
    out = tmp_path / "out"
    for head in ("sparse_linear.pt", "colbert_linear.pt"):
        a, b = (torch.load(f / head, weights_only=True) for f in (out, tiny_model_path))
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert len(json.loads((out / "config.json").read_text())[WEIGHTS_KEY]) == 64
    tuned = M3Encoder.from_pretrained(str(out), device="cpu", dtype="float32")
    assert tuned.identity != M3Encoder.from_pretrained(str(tiny_model_path), device="cpu").identity
    split = read_beir_examples(folder, holdout=0.5)
    fresh = _heldout_metrics(split.heldout, tuned, tmp_path / "fresh-cache", progress=False)
    assert report["heldout_after"] == fresh
    assert fresh["dense"] != report["heldout_before"]["dense"]  # training changed the ranking: a real check


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_model_path, monkeypatch):
    """Killed in step 3 of 4 (epoch 2; checkpoint every step): the rerun continues and ends where one run ends."""
    from safetensors.torch import load_file

    from m3search import finetune as ft

    data = _jsonl(tmp_path / "train.jsonl", _train_rows(8))
    _run(tmp_path, tiny_model_path, data, out="straight", epochs=2, checkpoint_every=1)

    real = _killed_at(monkeypatch, "training_step", 3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_model_path, data, epochs=2, checkpoint_every=1)
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "checkpoint.pt").is_file()
    monkeypatch.setattr(ft, "training_step", real)
    with pytest.raises(FinetuneInputError, match="different run"):
        _run(tmp_path, tiny_model_path, data, epochs=2, checkpoint_every=1, lr=2e-4)
    report = _run(tmp_path, tiny_model_path, data, epochs=2, checkpoint_every=1)
    assert report["resumed_at_step"] == 2 and report["steps"] == 4
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "out" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("dies_in, at_call", [("training_step", 4), ("_sparse_stats", 2)])
def test_resumed_run_reports_the_epochs_mean_loss(tmp_path, tiny_model_path, monkeypatch, dies_in, at_call):
    """Killed mid-epoch 2 (step 4), or after epoch 1's last step checkpoint but before its end: the report's
    per-epoch mean losses are those of one uninterrupted run (not the resumed part over all steps, nor empty)."""
    from m3search import finetune as ft

    data = _jsonl(tmp_path / "train.jsonl", _train_rows(8))
    straight = _run(tmp_path, tiny_model_path, data, out="straight", epochs=2, checkpoint_every=1)
    real = _killed_at(monkeypatch, dies_in, at_call)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_model_path, data, epochs=2, checkpoint_every=1)
    monkeypatch.setattr(ft, dies_in, real)
    resumed = _run(tmp_path, tiny_model_path, data, epochs=2, checkpoint_every=1)
    assert resumed["resumed_at_step"] in (2, 3)
    for a, b in zip(straight["epochs"], resumed["epochs"], strict=True):
        assert b["steps"] == a["steps"] == 2
        assert set(b["mean_loss"]) == set(a["mean_loss"]) and "total" in a["mean_loss"]
        assert b["mean_loss"] == pytest.approx(a["mean_loss"], rel=1e-5)


def test_every_epoch_runs_all_its_batches(tmp_path, tiny_model_path, tiny_encoder):
    """Each epoch packs a new order under the token budget, so epoch 2 can need more batches than epoch 1:
    it runs them all (the step count was epoch 1's times the epochs, which cut epoch 2 short)."""
    from m3search.finetune import _epoch_batches

    t = BUILTIN_TEXTS
    rows = [
        {"query": t[i % 10][:20], "pos": [" ".join([t[i % 10]] * (1 + (i * 7) % 4))], "neg": [t[(i + 3) % 10]]}
        for i in range(12)
    ]
    plan = _plan(tiny_encoder, [Example(r["query"], r["pos"], r["neg"]) for r in rows], 64, 256)

    def counts(budget: int) -> list[int]:
        return [len(_epoch_batches(plan, 1, 4, budget, 0, e)) for e in range(2)]

    alone = int(plan.queries.lengths.max() + 2 * plan.passages.lengths.max())  # every query alone fits
    budget = next((b for b in range(alone, 2000, 50) if counts(b)[1] > counts(b)[0]), None)
    assert budget is not None, "no token budget gives epoch 2 more batches: a weak test"
    report = _run(tmp_path, tiny_model_path, _jsonl(tmp_path / "train.jsonl", rows), epochs=2, negatives=1,
                  token_budget=budget)  # fmt: skip
    assert [e["steps"] for e in report["epochs"]] == counts(budget)
    assert report["steps"] == sum(counts(budget))


def test_a_query_whose_group_alone_exceeds_the_token_budget_is_refused(tmp_path, tiny_model_path):
    """Such a query made a batch of its own, over the budget: --negatives 100000 on two JSONL lines (each
    negative repeated to fill the group) trained on 22 GB for two steps, and a budget too small for any batch
    was ignored without a word."""
    data = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    with pytest.raises(FinetuneInputError, match=r"negatives is \d+ padded tokens, more than the token budget of 20"):
        _run(tmp_path, tiny_model_path, data, token_budget=20)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_default_budget_runs_an_oversized_group_alone_with_a_warning(tiny_encoder):
    """Only a budget the user asked for refuses a query whose group alone is over it: the device's default
    (8,192 tokens on a CPU) refused BGE-M3's own long-passage settings (--passage-max-length 1024 with 7
    negatives is 64 + 8 x 1024 = 8,256 tokens). With the default, such a query trains alone, as before the
    refusal, and a warning says so."""
    from m3search.finetune import FinetuneConfig, _contrasting_batches

    examples = [Example(r["query"], r["pos"], r["neg"]) for r in _train_rows(4)]
    with pytest.warns(UserWarning, match=r"up to \d+ padded tokens, over this device's default token budget of 20"):
        _, schedule = _contrasting_batches(tiny_encoder, examples, FinetuneConfig(negatives=2), 20)
    assert all(len(q) == 1 for q, _ in schedule[0]) and len(schedule[0]) == 4  # every query alone
    with pytest.raises(FinetuneInputError, match="more than the token budget of 20"):
        _contrasting_batches(tiny_encoder, examples, FinetuneConfig(negatives=2, token_budget=20), 20)


def test_resume_restores_generator_states_loaded_onto_the_device(tmp_path, tiny_model_path, monkeypatch):
    """``torch.load(map_location=device)`` puts the saved generator state on the GPU, where
    ``torch.set_rng_state`` refuses it. On a CPU-only machine: the state comes back as an object standing for
    a tensor on another device (only its ``.cpu()`` is a tensor), so the resume must use ``.cpu()``."""
    from m3search import finetune as ft

    class OnDevice:
        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

        def cpu(self) -> torch.Tensor:
            return self.tensor

    real_load = torch.load

    def load(*args, **kwargs):
        obj = real_load(*args, **kwargs)
        if isinstance(obj, dict) and "torch_rng" in obj:
            obj["torch_rng"] = OnDevice(obj["torch_rng"])
        return obj

    data = _jsonl(tmp_path / "train.jsonl", _train_rows(8))
    real_step = _killed_at(monkeypatch, "training_step", 2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_model_path, data, checkpoint_every=1)
    monkeypatch.setattr(ft, "training_step", real_step)
    monkeypatch.setattr(torch, "load", load)
    assert _run(tmp_path, tiny_model_path, data, checkpoint_every=1)["resumed_at_step"] == 1


@pytest.mark.parametrize("kind", ["jsonl", "beir"])
def test_resume_refuses_changed_data_at_the_same_path(tmp_path, tiny_model_path, monkeypatch, kind):
    """The checkpoint names the data's content, not only its path: a JSONL line edited, or a BEIR corpus
    document (not judged: it only changes the mined negatives) edited, is a different run."""

    if kind == "jsonl":
        data = _jsonl(tmp_path / "train.jsonl", _train_rows(8))
        changed = data.read_text().replace(BUILTIN_TEXTS[1], BUILTIN_TEXTS[1] + " Edited.", 1)
    else:
        data = _beir(tmp_path / "beir")
        changed = (data / "corpus.jsonl").read_text().replace("number 20", "number twenty")
    _killed_at(monkeypatch, "training_step", 2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_model_path, data, checkpoint_every=1)
    (data if kind == "jsonl" else data / "corpus.jsonl").write_text(changed)
    with pytest.raises(FinetuneInputError, match="holds a checkpoint of a different run"):
        _run(tmp_path, tiny_model_path, data, checkpoint_every=1)
    checkpoint = tmp_path / "out.partial" / "checkpoint.pt"  # as an m3search before the data hash wrote it
    saved = torch.load(checkpoint, weights_only=False)
    del saved["fingerprint"]["data_sha256"]
    torch.save(saved, checkpoint)
    with pytest.raises(FinetuneInputError, match="written by an earlier m3search.*delete that folder"):
        _run(tmp_path, tiny_model_path, data, checkpoint_every=1)


def test_sparse_collapse_stops_without_output(tmp_path, tiny_model_path, monkeypatch):
    from m3search import finetune as ft

    real, calls = ft._sparse_stats, {"n": 0}

    def collapses(*args):
        calls["n"] += 1
        stats = real(*args)
        return stats if calls["n"] == 1 else {**stats, "nonzero": 0.001, "max": 1e-3}

    monkeypatch.setattr(ft, "_sparse_stats", collapses)
    data = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    with pytest.raises(SparseCollapseError, match="sparse head collapsed in epoch 1.*--modes dense,colbert"):
        _run(tmp_path, tiny_model_path, data)
    assert not (tmp_path / "out").exists()
    # Without sparse among the trained modes, the same numbers do not stop the run.
    _run(tmp_path, tiny_model_path, data, modes="dense,colbert")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_sparse_head_zero_before_training_is_not_called_collapsed(tmp_path, tiny_model_path):
    """A base model whose sparse head gives every token weight 0 (as the tiny model did on one-word passages):
    the run stopped saying training collapsed it and to lower --lr, which cannot help. It now says so."""
    import shutil

    base = tmp_path / "dead-sparse"
    shutil.copytree(tiny_model_path, base)
    head = torch.load(base / "sparse_linear.pt")
    head["bias"] = torch.full_like(head["bias"], -1e4)  # relu(w.h - 1e4) = 0 for every token
    torch.save(head, base / "sparse_linear.pt")
    data = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    with pytest.raises(SparseCollapseError) as err:
        _run(tmp_path, base, data)
    assert "weight 0 after epoch 1, as the base model's did before training" in str(err.value)
    assert "lower --lr cannot revive it" in str(err.value) and "--modes dense,colbert" in str(err.value)
    assert "collapsed in epoch" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_no_folder(tmp_path, tiny_model_path, monkeypatch):
    from m3search import finetune as ft

    def fails(report, folder):
        raise OSError("disk full")

    monkeypatch.setattr(ft, "write_report", fails)
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, tiny_model_path, _jsonl(tmp_path / "train.jsonl", _train_rows(4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial", "train.jsonl"]


def test_missing_parents_of_out_are_made_when_training_starts(tmp_path, tiny_model_path):
    """As index makes a collection's folders: ``--out runs/deeper/ft`` in a fresh clone. Bad input leaves no
    folder behind, and a file on the way is refused as input, before anything is made."""
    data = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    _run(tmp_path, tiny_model_path, data, out="runs/deeper/ft")
    assert (tmp_path / "runs" / "deeper" / "ft" / "model.safetensors").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FinetuneInputError, match="'.*afile' is a file, not a folder"):
        _run(tmp_path, tiny_model_path, data, out="afile/ft")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"query": "q", "pos": []}])
    with pytest.raises(FinetuneInputError):
        _run(tmp_path, tiny_model_path, bad, out="other/ft")
    assert not (tmp_path / "other").exists()


def test_output_that_appears_during_training_is_left_and_the_model_kept(tmp_path, tiny_model_path, monkeypatch):
    """--out created while the model was written (here empty, which a POSIX rename would silently replace):
    that folder is left as it is, the trained model stays where the message says, and the CLI does not call it
    bad input found before training (exit 2)."""
    from click.testing import CliRunner

    from m3search import finetune as ft
    from m3search.cli import main

    data = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    real = ft.write_report

    def also_makes_out(report, folder):
        real(report, folder)
        (tmp_path / "out").mkdir()

    monkeypatch.setattr(ft, "write_report", also_makes_out)
    with pytest.raises(FileExistsError, match="appeared while training ran"):
        _run(tmp_path, tiny_model_path, data)
    assert list((tmp_path / "out").iterdir()) == []
    kept = tmp_path / "out.partial" / "export"
    assert (kept / "model.safetensors").is_file() and (kept / "report.json").is_file()

    (tmp_path / "out").rmdir()  # the same command again: the model exported anew from the checkpoint
    args = ["finetune", str(data), "--model", str(tiny_model_path), "--dtype", "float32", "--negatives", "2"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "4", "--lr", "1e-4", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "appeared while training ran" in result.output, result.output
    assert str(kept) in " ".join(result.output.split()) and (kept / "model.safetensors").is_file()


def test_a_run_killed_while_exporting_leaves_nothing_behind_once_rerun(tmp_path, tiny_model_path):
    """A hard kill during export (no cleanup runs) leaves a full model copy; the rerun removes it, then keeps
    only the output. A folder there that is not this command's is refused, not deleted."""
    import os
    import subprocess
    import sys

    import m3search

    data = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    script = (
        "import os\n"
        "from m3search import finetune as ft\n"
        "ft.write_report = lambda report, folder: os._exit(3)\n"
        f"ft.finetune({str(data)!r}, model={str(tiny_model_path)!r}, out={str(tmp_path / 'out')!r}, batch_size=4,"
        " negatives=2, lr=1e-4, dtype='float32', progress=False)\n"
    )
    src = str(Path(m3search.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial", "train.jsonl"]
    assert (tmp_path / "out.partial" / "export" / "model.safetensors").is_file()  # the killed export's copy

    (tmp_path / "out.partial" / "export" / "notes.txt").write_text("not ours")
    with pytest.raises(FinetuneInputError, match="not this command's checkpoint folder"):
        _run(tmp_path, tiny_model_path, data)
    assert (tmp_path / "out.partial" / "export" / "notes.txt").read_text() == "not ours"
    (tmp_path / "out.partial" / "export" / "notes.txt").unlink()

    _run(tmp_path, tiny_model_path, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.jsonl"]


def test_cli_finetune(tmp_path, tiny_model_path):
    from click.testing import CliRunner

    from m3search.cli import main

    data = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    args = ["finetune", str(data), "--model", str(tiny_model_path), "--dtype", "bfloat16", "--negatives", "1"]
    runner = CliRunner()
    ok = runner.invoke(main, [*args, "--out", str(tmp_path / "out"), "--json", "--epochs", "1"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["steps"] == 1 and report["out"] == str(tmp_path / "out")
    assert report["autocast"] == "bfloat16" and math.isfinite(report["epochs"][0]["mean_loss"]["total"])
    again = runner.invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert again.exit_code == 2 and "exists" in again.output and "Traceback" not in again.output
    again = runner.invoke(main, [*args, "--out", str(tmp_path / "out"), "--json"])  # the type follows the code
    assert json.loads(again.stdout)["error"]["type"] == "usage" and again.exit_code == 2, again.output
    bad = runner.invoke(main, [*args, "--out", str(tmp_path / "o2"), "--model", str(tmp_path)])
    assert bad.exit_code == 2 and "not a BGE-M3 checkpoint" in bad.output


# ---------------------------------------------------------------------------------------------- heavy


@pytest.mark.heavy
def test_flagembedding_loads_the_output(tmp_path, tiny_model_path):
    """FlagEmbedding's BGEM3FlagModel loads a fine-tuned folder and encodes exactly as M3Encoder does (fp32)."""
    from flag_reference import flag_python, lexical_dicts, run_reference

    from m3search import M3Encoder

    python = flag_python()
    if python is None:
        pytest.skip("FlagEmbedding reference interpreter not found (set M3SEARCH_FLAG_PYTHON)")
    _run(tmp_path, tiny_model_path, _jsonl(tmp_path / "train.jsonl", _train_rows(8)))
    out = tmp_path / "out"
    texts = list(BUILTIN_TEXTS)
    flag = run_reference({"model": str(out), "texts": texts, "batch_size": 4, "max_length": 512}, python=python)
    ours = M3Encoder.from_pretrained(str(out), device="cpu", dtype="float32").encode(texts, max_length=512)
    base = M3Encoder.from_pretrained(str(tiny_model_path), device="cpu", dtype="float32").encode(texts)
    assert np.abs(flag["dense"] - base.dense).max() > 1e-4, "FlagEmbedding read the base weights, not the output"
    assert np.abs(flag["dense"] - ours.dense).max() <= 1e-5
    np.testing.assert_array_equal(flag["colbert_offsets"], ours.colbert_offsets)
    assert np.abs(flag["colbert"] - ours.colbert).max() <= 1e-5
    for ref, got in zip(lexical_dicts(flag), ours.lexical_weights):
        assert set(got) == {str(k) for k in ref}
        assert all(abs(v - got[str(k)]) <= 1e-5 for k, v in ref.items())


def test_holdout_that_rounds_to_no_query_is_refused(tmp_path):
    """--holdout 0.1 of 4 judged queries held none out: the run trained on all of them and reported no held-out
    metrics, without a word."""
    folder = _beir(tmp_path / "beir", n_queries=4)
    with pytest.raises(FinetuneInputError, match=r"holdout 0.1 of 4 judged queries holds out none.*more than 0.125"):
        read_beir_examples(folder, holdout=0.1)
    assert len(read_beir_examples(folder, holdout=0.2).heldout.queries) == 1  # 0.8 rounds to 1


def test_a_beir_folder_trains_on_its_train_split_where_it_has_one(tmp_path):
    """finetune always read qrels/test.tsv: on a BEIR set that ships qrels/train.tsv (scifact, fiqa, nfcorpus) it
    trained on the judgements a later eval measures with, inflating its scores unsaid."""
    folder = _beir(tmp_path / "beir", n_queries=8)  # test.tsv judges q0..q7
    assert read_beir_examples(folder).qrels_split == "test"
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    train = read_beir_examples(folder)
    assert train.qrels_split == "train" and sorted(e.qid for e in train.examples) == ["q1", "q2"]
    test = read_beir_examples(folder, split="test")
    assert test.qrels_split == "test" and len(test.examples) == 8
    with pytest.raises(FinetuneInputError, match=r"no qrels/dev.tsv"):
        read_beir_examples(folder, split="dev")
    # a queries folder of another corpus with its own train.tsv: not this corpus's, so test.tsv, as before, said
    other = _beir(tmp_path / "other", n_queries=8)
    (other / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tx1\t1\n")
    only_test = _beir(tmp_path / "only-test", n_queries=8)
    with pytest.warns(UserWarning, match=r"training on qrels/test.tsv: qrels/train.tsv is not usable here"):
        assert read_beir_examples(only_test, queries_dir=other).qrels_split == "test"
    with pytest.raises(FinetuneInputError, match=r"no qrels/train.tsv whose corpus ids"):
        read_beir_examples(only_test, queries_dir=other, split="train")  # asked for: its error


def test_the_fallback_from_an_unusable_train_split_reads_the_corpus_once(tmp_path, monkeypatch):
    """The fallback from a qrels/train.tsv this corpus cannot use to test.tsv loaded the whole folder again:
    the corpus read and hashed twice (a large corpus: minutes). The data is what the test split gives alone."""
    import m3search.eval
    import m3search.sources

    folder = _beir(tmp_path / "beir", n_queries=8)
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tnot-in-corpus\t1\n")
    read, real_read, hashed, real_hash = [], m3search.sources.read_jsonl, [], m3search.eval._file_sha256
    monkeypatch.setattr(
        m3search.sources, "read_jsonl", lambda path, **kw: read.append(Path(path).name) or real_read(path, **kw)
    )
    monkeypatch.setattr(m3search.eval, "_file_sha256", lambda path: hashed.append(path) or real_hash(path))
    with pytest.warns(UserWarning, match=r"qrels/train.tsv is not usable here .*absent from the corpus"):
        got = read_beir_examples(folder)
    assert read.count("corpus.jsonl") == 1 and len(hashed) == 1
    monkeypatch.undo()
    want = read_beir_examples(folder, split="test")
    assert got.qrels_split == "test" and got.data == want.data and got.examples == want.examples


def test_cli_finetune_split(tmp_path, tiny_model_path):
    """--split picks the judgements; the report and the summary say which were trained on."""
    from click.testing import CliRunner

    from m3search.cli import main

    folder = _beir(tmp_path / "beir", n_queries=8)
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in (1, 2, 3, 4))
    )
    args = ["finetune", str(folder), "--model", str(tiny_model_path), "--dtype", "float32", "--negatives", "1"]
    args += ["--batch-size", "4", "--cache-dir", str(tmp_path / "cache")]
    runner = CliRunner()
    ok = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    assert "trained on qrels/train.tsv (4 queries)" in ok.output
    ok = runner.invoke(main, [*args, "--out", str(tmp_path / "b"), "--split", "test", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["split"] == "test" and report["n_train_queries"] == 8
    jsonl = _jsonl(tmp_path / "train.jsonl", _train_rows(4))
    bad = runner.invoke(main, [*args[:1], str(jsonl), *args[2:], "--out", str(tmp_path / "c"), "--split", "test"])
    assert bad.exit_code == 2 and "apply to a BEIR folder" in bad.output, bad.output


def test_a_cache_dir_that_cannot_be_made_is_said_before_the_model_loads(tmp_path):
    """finetune named a --cache-dir under a file only after loading the base model (eval and tune say it first)."""
    from click.testing import CliRunner

    from m3search.cli import main

    folder = _beir(tmp_path / "beir")
    (tmp_path / "file").write_text("")
    args = ["finetune", str(folder), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
    got = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "file" / "c")])
    assert got.exit_code == 2, got.output
    assert (
        f"cannot make the index cache folder '{tmp_path / 'file' / 'c'}'" in got.output
        and "base model" not in got.output
    )


def test_jsonl_prompts_are_refused_and_teacher_scores_said_unused(tmp_path):
    """FlagEmbedding's "prompt", "pos_scores" and "neg_scores" were dropped without a word: training went on
    without the prompt the data asks for, and without the teacher's scores (m3search distils from its own
    ensemble). A prompt is refused (as TEI's prompt_name is); teacher scores are read and said unused, once."""
    rows = [{"query": "q1", "pos": ["a"], "neg": ["b"], "pos_scores": [0.9], "neg_scores": [0.1]}]
    rows.append({"query": "q2", "pos": ["c"], "pos_scores": [0.8]})
    with pytest.warns(UserWarning, match=r'teacher.jsonl:1: "pos_scores" / "neg_scores" .* are not used') as caught:
        assert len(read_jsonl_examples(_jsonl(tmp_path / "teacher.jsonl", rows))) == 2
    assert len([w for w in caught if "pos_scores" in str(w.message)]) == 1
    rows = [{"query": "q1", "pos": ["a"], "prompt": ""}, {"query": "q2", "pos": ["b"], "prompt": "Represent: "}]
    with pytest.raises(FinetuneInputError, match=r'prompt.jsonl:2: "prompt" is not supported'):
        read_jsonl_examples(_jsonl(tmp_path / "prompt.jsonl", rows))
