"""Reduced precision, length limits and bad input.

* bf16 (what ``dtype="auto"`` picks on AMX / AVX512-BF16 CPUs) vs fp32 on the same model:
  cosine >= 0.999 for every dense vector and every ColBERT token vector; lexical weights
  within 5% of each text's largest weight, no weight above 5% of it lost, lexical scores
  within 3%; min and mean are printed (``-s``) and recorded as test properties.
* ``max_length`` is capped at the model's position table, and over-long input is cut
  with one warning that counts the cut texts, never an error.
* bad input raises TypeError / ValueError naming the problem; the empty string is a
  valid text (its equality with FlagEmbedding's output is in ``test_parity.py``).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from flag_reference import mixed_texts

MIN_COSINE = 0.999
#: Lexical weights, bf16 vs fp32 (measured 2026-12-02 on 45 mixed-language texts, tiny model / 120 cranfield
#: texts, proxy model): largest |difference| per text 3.1% / 2.0% of that text's largest weight; lexical score
#: of text pairs 1.4% / 0.4% of the largest score; no weight above 5% of its text's largest lost.
MAX_LEXICAL_REL_DIFF = 0.05
MAX_LEXICAL_SCORE_REL_DIFF = 0.03


def _bf16_vs_fp32(path, texts, max_length, record_property, label):
    from m3search import M3Encoder

    fp32 = M3Encoder.from_pretrained(str(path), device="cpu", dtype="float32")
    bf16 = M3Encoder.from_pretrained(str(path), device="cpu", dtype="bfloat16")
    assert str(bf16.dtype) == "torch.bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is tested below
        a = fp32.encode(texts, max_length=max_length)
        b = bf16.encode(texts, max_length=max_length)
    np.testing.assert_array_equal(a.colbert_offsets, b.colbert_offsets)
    dense = np.einsum("ij,ij->i", a.dense, b.dense)  # both L2-normalized
    colbert = np.einsum("ij,ij->i", a.colbert, b.colbert)
    # lexical weights are not unit vectors: compare each text's weights with its largest fp32 weight
    wa, wb = a.sparse.toarray(), b.sparse.toarray()
    row_max = np.maximum(wa.max(axis=1), 1e-12)
    lex = np.abs(wa - wb).max(axis=1) / row_max
    lost = int(((wa > 0.05 * row_max[:, None]) & (wb == 0)).sum())
    from m3search.scoring import lexical_scores

    pair_a, pair_b = lexical_scores(a.sparse, a.sparse), lexical_scores(b.sparse, b.sparse)
    lex_score = float(np.abs(pair_a - pair_b).max() / np.abs(pair_a).max())
    stats = {
        "dense_min": float(dense.min()),
        "dense_mean": float(dense.mean()),
        "colbert_min": float(colbert.min()),
        "colbert_mean": float(colbert.mean()),
        "lexical_max_rel_diff": float(lex.max()),
        "lexical_score_max_rel_diff": lex_score,
        "lexical_weights_lost": lost,
        "texts": len(texts),
        "tokens": int(len(colbert)),
    }
    print(f"\n[{label}] bf16 vs fp32 cosine: " + json.dumps({k: round(v, 6) for k, v in stats.items()}))
    for k, v in stats.items():
        record_property(f"{label}_{k}", v)
    assert dense.min() >= MIN_COSINE, f"dense cosine min {dense.min():.6f}"
    assert colbert.min() >= MIN_COSINE, f"ColBERT token cosine min {colbert.min():.6f}"
    assert lex.max() <= MAX_LEXICAL_REL_DIFF, f"lexical weight moved {lex.max():.4f} of its text's largest"
    assert lost == 0, f"{lost} lexical weights above 5% of their text's largest vanished in bf16"
    assert lex_score <= MAX_LEXICAL_SCORE_REL_DIFF, f"lexical scores moved {lex_score:.4f} of the largest"


def test_bf16_close_to_fp32_tiny(tiny_model_path, shared_data, record_property):
    _bf16_vs_fp32(tiny_model_path, mixed_texts(shared_data), 512, record_property, "tiny")


@pytest.mark.heavy
def test_bf16_close_to_fp32_proxy(proxy_model_path, shared_data, record_property):
    """The real-semantics proxy (MiniLM weights through the same pooling path), 300 cranfield texts."""
    with (shared_data / "cranfield" / "corpus.jsonl").open(encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs[::4][:300]]
    _bf16_vs_fp32(proxy_model_path, texts, 512, record_property, "proxy")


def test_100k_character_text_is_truncated_with_warning(tiny_encoder):
    from m3search import TruncationWarning

    long_text = ("Aerodynamic heating of a slender body in hypersonic flow. " * 1800)[:100_000]
    assert len(long_text) == 100_000
    with pytest.warns(TruncationWarning, match=r"\b1 of 2 input"):
        emb = tiny_encoder.encode([long_text, "short text"])  # default max_length 8192, capped at 512
    assert emb.truncated == 1
    assert emb.n_tokens.tolist()[0] == tiny_encoder.max_length == 512
    assert np.isfinite(emb.dense).all() and np.isfinite(emb.colbert).all()


@pytest.mark.parametrize("model", ["tiny", "proxy"])
def test_max_length_capped_at_position_table(model, request):
    """Asking for 8192 tokens on a 512-position model cuts at 512 with the warning."""
    from m3search import M3Encoder, TruncationWarning

    if model == "tiny":
        enc = request.getfixturevalue("tiny_encoder")
    else:
        enc = M3Encoder.from_pretrained(str(request.getfixturevalue("proxy_model_path")), device="cpu", dtype="float32")
    assert enc.max_length == 512
    texts = ["the boundary layer " * 1500, "the boundary layer " * 300, "short"]
    with pytest.warns(TruncationWarning, match=r"\b2 of 3 input.*max_length=512"):
        emb = enc.encode(texts, max_length=8192)
    assert emb.n_tokens.tolist()[:2] == [512, 512] and emb.truncated == 2
    with pytest.warns(TruncationWarning, match=r"\b1 of 1 input"):
        scores = enc.compute_score([("boundary layer", texts[0])], max_passage_length=8192)
    assert np.isfinite(scores["colbert+sparse+dense"])


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (None, TypeError, "None"),
        ([None], TypeError, "item 0 is NoneType"),
        (["ok", 3], TypeError, "item 1 is int"),
        (["ok", b"bytes"], TypeError, "item 1 is bytes"),
        (b"bytes", TypeError, "bytes"),
        (42, TypeError, "int"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_input_raises_clear_error(tiny_encoder, bad, error, message):
    with pytest.raises(error, match=message):
        tiny_encoder.encode(bad)


def test_bad_max_length_raises(tiny_encoder):
    for bad in (0, -5, 1.5, "512", True):
        with pytest.raises(ValueError, match="max_length"):
            tiny_encoder.encode("text", max_length=bad)


def test_empty_string_is_valid(tiny_encoder):
    """ "" encodes as <s> </s>: one ColBERT vector (</s>), no lexical weights, a unit dense vector.
    Equality with FlagEmbedding's output: ``test_parity.py::test_empty_string_parity``."""
    emb = tiny_encoder.encode(["", "a short sentence", ""])
    assert emb.n_tokens[[0, 2]].tolist() == [2, 2]
    assert [len(v) for v in emb.colbert_vecs][::2] == [1, 1]
    assert emb.lexical_weights[0] == {} == emb.lexical_weights[2]
    assert emb.sparse[0].nnz == 0
    np.testing.assert_allclose(np.linalg.norm(emb.dense, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb.dense[0], emb.dense[2])
    assert tiny_encoder.encode("").n_tokens.tolist() == [2]
