"""m3search's fp32 outputs equal FlagEmbedding 1.4.2's (``BGEM3FlagModel``, fp32, CPU).

FlagEmbedding runs in its own interpreter (``.venv-flag``: transformers 4.57; it cannot
import under transformers 5) through ``tests/flag_reference.py``; the tests skip with
the reason if that interpreter is missing. Both sides get the same ``max_length``
(FlagEmbedding cuts at 512 by default) and batch sizes that force several batches,
composed differently on each side, so results must not depend on batching.

Where the two differ by design: FlagEmbedding's *batched* ``compute_score`` pads the
shorter documents of a batch with zero ColBERT vectors, so a query token whose best real
match is negative scores 0 instead. m3search counts real tokens only.
``test_compute_score_batched_colbert_floor`` measures where that happens.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from flag_reference import SCORE_KEYS, flag_python, lexical_dicts, mixed_texts, run_reference

TOL = 1e-5
MAX_LENGTH = 512  # the tiny model's position limit; also FlagEmbedding's default cut
FLAG_BATCH, OUR_BATCH = 4, 5  # several batches on both sides, composed differently
SCORE_BATCH = 4
Q_LEN, P_LEN = 64, 512
WEIGHTS = (0.4, 0.2, 0.4)
N_DEFAULT = 8


def _need_flag() -> Path:
    python = flag_python()
    if python is None:
        pytest.skip(
            "FlagEmbedding reference interpreter not found: create it with `python -m venv .venv-flag && "
            ".venv-flag/bin/pip install torch==2.13.0 FlagEmbedding==1.4.2 'transformers<5'` "
            "or set M3SEARCH_FLAG_PYTHON"
        )
    return python


def _pairs(texts: list[str]) -> list[list[str]]:
    """Queries of every length against documents of every length, the empty string on both sides.

    Consecutive pairs mix very short and very long documents so FlagEmbedding's batches
    pad some documents heavily.
    """
    by_len = sorted(texts, key=len)
    short, long_ = by_len[: len(by_len) // 2], by_len[len(by_len) // 2 :]
    pairs = [[short[i % len(short)], long_[(3 * i) % len(long_)]] for i in range(len(long_))]
    pairs += [[long_[i], short[(5 * i) % len(short)]] for i in range(0, len(long_), 2)]
    pairs += [["", texts[1]], [texts[2], ""], ["", ""]]
    return pairs


@pytest.fixture(scope="module")
def texts(shared_data) -> list[str]:
    return mixed_texts(shared_data)


@pytest.fixture(scope="module")
def pairs(texts) -> list[list[str]]:
    return _pairs(texts)


@pytest.fixture(scope="module")
def centered_model_path(tiny_model_path, tmp_path_factory, texts) -> Path:
    """The tiny model with its ColBERT head re-biased so token vectors are centred.

    On the tiny model every pair of ColBERT vectors has a dot product >= 0.5 (its hidden
    states share a common direction), so FlagEmbedding's zero floor never bites there.
    Subtracting the mean output makes about half the dot products negative, which is what
    a model with spread-out token vectors looks like.
    """
    import shutil

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    path = tmp_path_factory.mktemp("tiny-m3-centered")
    for f in tiny_model_path.iterdir():
        shutil.copy(f, path / f.name)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(MAX_LENGTH)
    model = AutoModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    with torch.inference_mode():
        states = [
            model(input_ids=torch.tensor([e.ids])).last_hidden_state[0, 1:]
            for e in tok.encode_batch([t for t in texts if t])
        ]
    mean_h = torch.cat(states).mean(0)
    head = torch.load(path / "colbert_linear.pt", weights_only=True)
    head["bias"] = -(head["weight"] @ mean_h)
    torch.save(head, path / "colbert_linear.pt")
    return path


@pytest.fixture(scope="module")
def flag(tiny_model_path, centered_model_path, texts, pairs) -> dict:
    """FlagEmbedding's encode and compute_score runs on the tiny model (and one on the
    centred model, keys prefixed ``centered_``), in one subprocess."""
    python = _need_flag()
    jobs = [
        # batch 1: nothing is padded, so every key must match exactly
        dict(name="b1", batch_size=1, weights=list(WEIGHTS)),
        # FlagEmbedding's default weights; a few pairs are enough (batch 1 is slow there)
        dict(name="b1_default", batch_size=1, weights=None, pairs=pairs[:N_DEFAULT]),
        dict(name="batched", batch_size=SCORE_BATCH, weights=list(WEIGHTS)),
    ]
    for job in jobs:
        job.setdefault("pairs", pairs)
        job.update(max_query_length=Q_LEN, max_passage_length=P_LEN)
    centered = {"prefix": "centered_", "model": str(centered_model_path), "scores": [dict(jobs[-1], name="batched")]}
    return run_reference(
        {
            "model": str(tiny_model_path),
            "texts": texts,
            "batch_size": FLAG_BATCH,
            "max_length": MAX_LENGTH,
            "scores": jobs,
            "also": [centered],
        },
        python=python,
    )


@pytest.fixture(scope="module")
def ours(tiny_encoder, texts):
    with pytest.warns(UserWarning, match="truncated"):
        return tiny_encoder.encode(texts, max_length=MAX_LENGTH, batch_size=OUR_BATCH)


def test_inputs_span_lengths_and_batches(flag, ours, tiny_encoder):
    """The comparison is not vacuous: several batches per side, truncation, an empty text."""
    assert ours.n_tokens.min() == 2  # the empty string: <s> </s>
    assert ours.truncated >= 2 and ours.n_tokens.max() == MAX_LENGTH
    assert len(flag["meta"]["encode_calls"]) >= 5
    assert len(tiny_encoder.plan_batches(ours.n_tokens, OUR_BATCH)) >= 5
    # same tokenization and truncation on both sides: ColBERT keeps every token after [CLS]
    np.testing.assert_array_equal(flag["colbert_offsets"], ours.colbert_offsets)


def test_dense_parity(flag, ours):
    diff = np.abs(flag["dense"] - ours.dense).max()
    assert diff <= TOL, f"dense max |diff| {diff:.2e}"


def test_lexical_weights_parity(flag, ours):
    ref = lexical_dicts(flag)
    got = ours.lexical_weights
    assert sum(len(d) for d in ref) > 100  # the random sparse head does produce weights
    worst = 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        assert set(g) == {str(k) for k in r}, f"text {i}: token ids differ"
        if r:
            worst = max(worst, max(abs(v - g[str(k)]) for k, v in r.items()))
    assert worst <= TOL, f"lexical max |diff| {worst:.2e}"
    # the CSR matrix holds the same numbers as the compatibility view
    rows = np.repeat(np.arange(len(ref)), np.diff(flag["lex_offsets"]))
    np.testing.assert_allclose(ours.sparse[rows, flag["lex_ids"]].A1, flag["lex_values"], atol=TOL, rtol=0)
    assert ours.sparse.nnz == len(flag["lex_ids"])


def test_colbert_parity(flag, ours):
    assert flag["colbert"].shape == ours.colbert.shape
    diff = np.abs(flag["colbert"] - ours.colbert).max()
    assert diff <= TOL, f"colbert max |diff| {diff:.2e}"
    for ref, got in zip(np.split(flag["colbert"], flag["colbert_offsets"][1:-1]), ours.colbert_vecs):
        assert ref.shape == got.shape


def test_empty_string_parity(flag, ours, texts):
    """ "" is a valid text (<s> </s>): the same dense vector, one ColBERT vector (</s>), no lexical weights."""
    i = texts.index("")
    assert ours.n_tokens[i] == 2 and len(ours.colbert_vecs[i]) == 1
    o = flag["colbert_offsets"]
    assert o[i + 1] - o[i] == 1
    assert np.abs(ours.colbert_vecs[i] - flag["colbert"][o[i] : o[i + 1]]).max() <= TOL
    assert np.abs(ours.dense[i] - flag["dense"][i]).max() <= TOL
    assert ours.lexical_weights[i] == {} == lexical_dicts(flag)[i]


def _scores(flag: dict, name: str) -> dict[str, np.ndarray]:
    return {k: flag[f"score_{name}_{k}"] for k in SCORE_KEYS}


def test_compute_score_parity_unpadded(flag, tiny_encoder, pairs):
    """FlagEmbedding with batch_size=1 pads nothing: every key matches, same weights on both sides."""
    with pytest.warns(UserWarning, match="truncated"):
        ours = tiny_encoder.compute_score(
            [tuple(p) for p in pairs], weights=WEIGHTS, max_query_length=Q_LEN, max_passage_length=P_LEN
        )
    ref = _scores(flag, "b1")
    assert set(ours) == set(SCORE_KEYS)
    for key in SCORE_KEYS:
        diff = np.abs(np.asarray(ours[key]) - ref[key]).max()
        assert diff <= TOL, f"{key}: max |diff| {diff:.2e}"


def test_compute_score_default_weights_differ(flag, tiny_encoder, pairs):
    """FlagEmbedding's default weights are (1, 1, 1); ours are (0.4, 0.2, 0.4)."""
    ref = _scores(flag, "b1_default")
    kw = dict(max_query_length=Q_LEN, max_passage_length=P_LEN)
    some = [tuple(p) for p in pairs[:N_DEFAULT]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is counted elsewhere
        ones = tiny_encoder.compute_score(some, weights=(1, 1, 1), **kw)
        default = tiny_encoder.compute_score(some, **kw)
    for key in SCORE_KEYS:
        assert np.abs(np.asarray(ones[key]) - ref[key]).max() <= TOL, key
    assert np.abs(np.asarray(default["colbert+sparse+dense"]) - ref["colbert+sparse+dense"]).max() > 1e-3


@pytest.mark.parametrize("model", ["tiny", "centered"])
def test_compute_score_batched_colbert_floor(model, request, pairs):
    """Batched FlagEmbedding: dense and sparse keys match; ColBERT matches a zero-floored recomputation.

    In a batch of SCORE_BATCH pairs, every document shorter than the batch's longest is
    padded with zero vectors, so each query vector's best match is max(best real match, 0).
    The test rebuilds that from our own vectors and requires FlagEmbedding to equal it,
    and counts the pairs where the floor changes the score (m3search: real tokens only).
    Measured: 0 of 38 pairs differ on the tiny model (all its ColBERT dot products are
    >= 0.5); many differ once the vectors are centred.
    """
    from m3search import M3Encoder

    flag = request.getfixturevalue("flag")
    if model == "tiny":
        enc = request.getfixturevalue("tiny_encoder")
    else:
        flag = {k[len("centered_") :]: v for k, v in flag.items() if k.startswith("centered_")}
        enc = M3Encoder.from_pretrained(
            str(request.getfixturevalue("centered_model_path")), device="cpu", dtype="float32"
        )
    qs, ds = [p[0] for p in pairs], [p[1] for p in pairs]
    with pytest.warns(UserWarning, match="truncated"):
        q = enc.encode(qs, max_length=Q_LEN)
        d = enc.encode(ds, max_length=P_LEN)
        ours = enc.compute_score(
            [tuple(p) for p in pairs], weights=WEIGHTS, max_query_length=Q_LEN, max_passage_length=P_LEN
        )
    ref = _scores(flag, "batched")
    for key in ("dense", "sparse", "sparse+dense"):
        assert np.abs(np.asarray(ours[key]) - ref[key]).max() <= TOL, key

    n = len(pairs)
    batch_max = np.array(
        [d.n_tokens[(i // SCORE_BATCH) * SCORE_BATCH : (i // SCORE_BATCH + 1) * SCORE_BATCH].max() for i in range(n)]
    )
    padded = d.n_tokens < batch_max
    exact, floored = np.empty(n), np.empty(n)
    negative = 0
    for i in range(n):  # a few dozen pairs: clarity over speed
        best = (q.colbert_vecs[i] @ d.colbert_vecs[i].T).max(axis=1)
        negative += int((best < 0).any())
        exact[i] = best.mean()
        floored[i] = np.maximum(best, 0).mean() if padded[i] else exact[i]
    assert np.abs(np.asarray(ours["colbert"]) - exact).max() <= TOL
    assert np.abs(ref["colbert"] - floored).max() <= TOL
    w = np.asarray(WEIGHTS)
    fused_ref = (w[0] * ref["dense"] + w[1] * ref["sparse"] + w[2] * floored) / w.sum()
    assert np.abs(ref["colbert+sparse+dense"] - fused_ref).max() <= TOL

    differ = np.abs(np.asarray(ours["colbert"]) - ref["colbert"]) > TOL
    print(
        f"\n[{model}] ColBERT, FlagEmbedding batched (batch {SCORE_BATCH}) vs m3search: {differ.sum()} of {n} "
        f"pairs differ; {padded.sum()} documents padded, {negative} pairs with a negative best match; "
        f"max |diff| {np.abs(exact - floored).max():.4f}"
    )
    # Every difference is a padded document whose best real match was negative somewhere.
    assert not (differ & ~padded).any()
    if model == "centered":
        assert differ.any(), "expected the zero floor to change some scores once vectors are centred"


def test_tokenizer_follows_tokenizer_json(tiny_alt_model_path, tiny_model_path, shared_data):
    """Our ids equal ``tokenizers.Tokenizer.from_file(tokenizer.json)``, not transformers' rebuild.

    On the "alt" fixture (NFKC + lower-casing + punctuation splitting in tokenizer.json)
    transformers 5's ``AutoTokenizer`` rebuilds XLM-R's own pipeline and gives other ids,
    so this test would catch an encoder that tokenized through transformers.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from m3search import M3Encoder

    texts = mixed_texts(shared_data) + ["ÀÉÎ Straße ﬁne  ＡＢＣ!?", "«Hello», world—(test)."]
    enc = M3Encoder.from_pretrained(str(tiny_alt_model_path), device="cpu", dtype="float32")
    ours, _ = enc.tokenize(texts, MAX_LENGTH)
    file_tok = Tokenizer.from_file(str(tiny_alt_model_path / "tokenizer.json"))
    file_tok.enable_truncation(MAX_LENGTH)
    expected = [e.ids for e in file_tok.encode_batch(texts)]
    assert ours == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some of these texts pass 512 tokens
        emb = enc.encode(texts[:12], dense=True, sparse=False, colbert=False, max_length=MAX_LENGTH)
    assert emb.n_tokens.tolist() == [len(x) for x in expected[:12]]

    hf = AutoTokenizer.from_pretrained(str(tiny_alt_model_path))
    hf_ids = hf(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    differ = [t for t, a, b in zip(texts, hf_ids, expected) if a != b]
    assert differ, "transformers now tokenizes the alt fixture like its file: the test could not fail"

    # Control: on the XLM-R-pipeline fixture transformers and the file agree.
    hf_x = AutoTokenizer.from_pretrained(str(tiny_model_path))
    file_x = Tokenizer.from_file(str(tiny_model_path / "tokenizer.json"))
    file_x.enable_truncation(MAX_LENGTH)
    assert hf_x(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"] == [
        e.ids for e in file_x.encode_batch(texts)
    ]


@pytest.mark.heavy
def test_proxy_model_parity(proxy_model_path, shared_data):
    """The real-semantics proxy (384-d, 512 positions): fp32 outputs and scores equal FlagEmbedding's."""
    import json

    from m3search import M3Encoder

    python = _need_flag()
    with (shared_data / "cranfield" / "corpus.jsonl").open(encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs[::4][:300]]
    with (shared_data / "cranfield" / "queries.jsonl").open(encoding="utf-8") as fh:
        queries = [json.loads(line)["text"] for line in fh][:40]
    pairs = [[q, texts[(7 * i) % len(texts)]] for i, q in enumerate(queries)]
    flag = run_reference(
        {
            "model": str(proxy_model_path),
            "texts": texts,
            "batch_size": 16,
            "max_length": MAX_LENGTH,
            "scores": [
                dict(
                    name="b1",
                    pairs=pairs,
                    batch_size=1,
                    weights=list(WEIGHTS),
                    max_query_length=Q_LEN,
                    max_passage_length=P_LEN,
                )
            ],
        },
        python=python,
    )
    enc = M3Encoder.from_pretrained(str(proxy_model_path), device="cpu", dtype="float32")
    with pytest.warns(UserWarning, match="truncated"):  # a few abstracts pass 512 tokens
        ours = enc.encode(texts, max_length=MAX_LENGTH)
    assert np.abs(flag["dense"] - ours.dense).max() <= TOL
    np.testing.assert_array_equal(flag["colbert_offsets"], ours.colbert_offsets)
    assert np.abs(flag["colbert"] - ours.colbert).max() <= TOL
    ref = lexical_dicts(flag)
    for r, g in zip(ref, ours.lexical_weights):
        assert set(g) == {str(k) for k in r}
        assert all(abs(v - g[str(k)]) <= TOL for k, v in r.items())
    scores = enc.compute_score(
        [tuple(p) for p in pairs], weights=WEIGHTS, max_query_length=Q_LEN, max_passage_length=P_LEN
    )
    for key in SCORE_KEYS:
        assert np.abs(np.asarray(scores[key]) - flag[f"score_b1_{key}"]).max() <= TOL, key
