"""M3Encoder's structure: batching restores order, pooling semantics, views, errors."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from m3search import M3Encoder, ModelLoadError, TruncationWarning
from m3search.encoder import FORWARD_TOKENS, PAD_MULTIPLE, DeviceError
from m3search.scoring import (
    colbert_score,
    colbert_scores,
    dense_scores,
    lexical_scores,
    pair_colbert_scores,
    pair_dense_scores,
    pair_lexical_scores,
)

TEXTS = [
    "Aerodynamic heating of a slender body in hypersonic flow.",
    "",
    "Die schnelle braune Katze springt über den faulen Hund am Fluss, und der Hund schläft weiter.",
    "敏捷的棕色狐狸跳过了河边的懒狗。",
    "short",
    "الثعلب البني السريع يقفز فوق الكلب الكسول بجانب النهر. " * 12,
    "the the the the boundary boundary layer",
]


@pytest.fixture(scope="module")
def embedded(tiny_encoder):
    return tiny_encoder.encode(TEXTS)


def test_shapes_and_offsets(tiny_encoder, embedded):
    n = len(TEXTS)
    assert embedded.dense.shape == (n, tiny_encoder.hidden_size)
    assert embedded.dense.dtype == np.float32
    assert np.allclose(np.linalg.norm(embedded.dense, axis=1), 1, atol=1e-5)
    assert embedded.sparse.shape == (n, tiny_encoder.vocab_size)
    assert embedded.colbert_offsets.shape == (n + 1,)
    # every position after [CLS] is a ColBERT vector, </s> included
    assert np.array_equal(np.diff(embedded.colbert_offsets), embedded.n_tokens - 1)
    assert np.allclose(np.linalg.norm(embedded.colbert, axis=1), 1, atol=1e-5)
    assert embedded.truncated == 0


def _plan_cost(enc, lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return sum(FORWARD_TOKENS + len(b) * int(enc.padded_width(lengths[b].max())) for b in batches)


def test_batch_plan_is_the_cheapest_within_the_budget(tiny_encoder):
    """Every text once, each batch within the token budget, and no cheaper split of the sorted
    lengths exists (brute force over every cut of small random inputs; widths as padded)."""
    from itertools import combinations

    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        lengths = rng.integers(1, 600, n)
        budget = int(rng.integers(600, 3000))
        tiny_encoder.token_budget, saved = budget, tiny_encoder.token_budget
        try:
            batches = tiny_encoder.plan_batches(lengths)
        finally:
            tiny_encoder.token_budget = saved
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))
        width = tiny_encoder.padded_width
        assert all(len(b) * width(lengths[b].max()) <= budget or len(b) == 1 for b in batches)
        order = np.argsort(-lengths, kind="stable")
        best = min(
            _plan_cost(tiny_encoder, lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, n))])
            for r in range(n)
            for cuts in combinations(range(1, n), r)
            if all((b - a) * width(lengths[order[a]]) <= budget or b - a == 1 for a, b in zip((0, *cuts), (*cuts, n)))
        )
        assert _plan_cost(tiny_encoder, lengths, batches) == best


def test_forward_widths_come_from_a_few_shapes(tiny_encoder, monkeypatch):
    """Every forward pass is padded to a multiple of PAD_MULTIPLE (or the model's length): the
    CPU kernels torch keeps per input shape must not grow with every text length a server meets."""
    widths = []
    forward = tiny_encoder.model.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_encoder.model, "forward", spy)
    texts = [" ".join(["word"] * n) for n in (1, 5, 17, 18, 40, 90)]
    out = tiny_encoder.encode(texts)
    assert widths and all(w % PAD_MULTIPLE == 0 or w == tiny_encoder.max_length for w in widths)
    assert len(set(widths)) < len(set(out.n_tokens.tolist()))  # texts of different lengths share a shape
    alone = [tiny_encoder.encode([t]) for t in texts]  # padding changes no output
    assert np.allclose(out.dense, np.concatenate([a.dense for a in alone]), atol=1e-5)
    assert np.allclose(out.colbert, np.concatenate([a.colbert for a in alone]), atol=1e-5)


def test_batch_plan_does_not_pad_short_texts_to_a_long_one(tiny_encoder):
    """One 480-token passage and fifteen of 100 tokens: filling the budget would pad all sixteen to
    480 (7,680 tokens for 1,980 real ones); the plan encodes the long one apart."""
    lengths = np.array([100] * 7 + [480] + [100] * 8)
    batches = tiny_encoder.plan_batches(lengths)
    assert [len(b) for b in batches] == [1, 15] and batches[0].tolist() == [7]
    assert [len(b) for b in tiny_encoder.plan_batches(np.full(16, 20))] == [16]  # short queries: one pass


def test_batching_restores_input_order(tiny_encoder, embedded):
    """Length-sorted, budget-limited batches must give each text what it gets alone."""
    small_budget = M3Encoder(
        tiny_encoder.model,
        tiny_encoder.colbert_linear,
        tiny_encoder.sparse_linear,
        tiny_encoder.tokenizer,
        folder=tiny_encoder.folder,
        name_or_path="x",
        device=tiny_encoder.device,
        dtype=tiny_encoder.dtype,
        token_budget=64,
    )
    assert len(small_budget.plan_batches(embedded.n_tokens)) > 2
    batched = small_budget.encode(TEXTS, batch_size=2)
    for i, text in enumerate(TEXTS):
        alone = tiny_encoder.encode(text)
        assert np.allclose(batched.dense[i], alone.dense[0], atol=1e-5)
        assert np.allclose(batched.colbert_vecs[i], alone.colbert_vecs[0], atol=1e-5)
        a, b = batched.sparse[i], alone.sparse[0]
        assert np.array_equal(a.indices, b.indices)
        assert np.allclose(a.data, b.data, atol=1e-5)


def test_lexical_weights_are_max_pooled_without_specials(tiny_encoder, embedded):
    import torch

    text = TEXTS[-1]  # repeated tokens
    ids = tiny_encoder.tokenizer.encode(text).ids
    t = torch.tensor([ids])
    with torch.inference_mode():
        h = tiny_encoder.model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state.float()
        w = torch.relu(tiny_encoder.sparse_linear(h)).squeeze(-1)[0].numpy()
    expected: dict[int, float] = {}
    for tok, weight in zip(ids, w):
        if tok in (0, 1, 2, 3) or weight <= 0:
            continue
        expected[tok] = max(expected.get(tok, 0.0), float(weight))
    got = embedded.lexical_weights[-1]
    assert set(got) == {str(k) for k in expected}
    for k, v in expected.items():
        assert got[str(k)] == pytest.approx(v, abs=1e-6)
    assert len(set(ids)) < len(ids), "fixture text should repeat a token"
    assert embedded.sparse[1].nnz == 0  # the empty string has no lexical weights


def test_subset_views(embedded):
    sub = embedded[[5, 0]]
    assert len(sub) == 2
    assert np.array_equal(sub.dense[0], embedded.dense[5])
    assert np.array_equal(sub.colbert_vecs[1], embedded.colbert_vecs[0])
    assert (sub.sparse[0] != embedded.sparse[5]).nnz == 0
    assert len(embedded[2:4]) == 2 and len(embedded[3]) == 1


@pytest.mark.parametrize("key", [0, 1, 3, -1, slice(2, 5), slice(0, None), [2, 3, 4], slice(1, 6, 2), [4, 2]])
def test_subsets_by_slice_equal_fancy_indexing(embedded, key):
    """Runs of rows take a slicing shortcut; every field must equal the general gather."""
    want_rows = np.atleast_1d(np.arange(len(embedded))[key])
    got = embedded[key]
    assert np.array_equal(got.n_tokens, embedded.n_tokens[want_rows])
    assert np.array_equal(got.dense, embedded.dense[want_rows])
    assert (got.sparse != embedded.sparse[want_rows]).nnz == 0 and got.sparse.shape == (
        len(want_rows),
        embedded.sparse.shape[1],
    )
    assert len(got.colbert_vecs) == len(want_rows)
    for a, r in zip(got.colbert_vecs, want_rows):
        assert np.array_equal(a, embedded.colbert_vecs[r])


@pytest.mark.parametrize("key", [[], slice(2, 2), np.zeros(0, np.int64)])
def test_an_empty_selection_has_no_colbert_vectors(embedded, key):
    """colbert_vecs of no texts was a list of one empty array (np.split of nothing), unlike lexical_weights."""
    empty = embedded[key]
    assert len(empty) == 0 and empty.colbert_vecs == [] and empty.lexical_weights == []


def test_convert_id_to_token(tiny_encoder, embedded):
    weights = embedded.lexical_weights[0]
    readable = tiny_encoder.convert_id_to_token(weights)
    # FlagEmbedding's rule: each id decodes on its own (two ids may decode alike, e.g. "▁" -> "")
    expected = {tiny_encoder.tokenizer.decode([int(i)]): w for i, w in weights.items()}
    assert readable == expected
    ids = [int(i) for i in weights]
    assert tiny_encoder.convert_id_to_token(ids) == [tiny_encoder.tokenizer.decode([i]) for i in ids]
    assert tiny_encoder.convert_id_to_token(ids[0]) == tiny_encoder.tokenizer.decode([ids[0]])


def test_scoring_matches_brute_force(embedded):
    q, d = embedded[[0, 2]], embedded
    assert np.allclose(dense_scores(q.dense, d.dense), q.dense @ d.dense.T, atol=1e-6)
    lw_q, lw_d = q.lexical_weights, d.lexical_weights
    brute = np.array([[sum(w * b.get(t, 0.0) for t, w in a.items()) for b in lw_d] for a in lw_q])
    assert np.allclose(lexical_scores(q.sparse, d.sparse), brute, atol=1e-6)
    cb = colbert_scores(q.colbert, q.colbert_offsets, d.colbert, d.colbert_offsets)
    brute = np.array([[colbert_score(a, b) for b in d.colbert_vecs] for a in q.colbert_vecs])
    assert np.allclose(cb, brute, atol=1e-6)
    # row-wise variants agree with the diagonal of the full matrices
    p = embedded[[1, 3, 5]]
    assert np.allclose(
        pair_dense_scores(q.dense[[0, 1, 1]], p.dense), np.diag(dense_scores(q.dense[[0, 1, 1]], p.dense))
    )
    assert np.allclose(
        pair_lexical_scores(q.sparse[[0, 1, 1]], p.sparse), np.diag(lexical_scores(q.sparse[[0, 1, 1]], p.sparse))
    )
    qq = q[[0, 1, 1]]
    full = colbert_scores(qq.colbert, qq.colbert_offsets, p.colbert, p.colbert_offsets)
    assert np.allclose(
        pair_colbert_scores(qq.colbert, qq.colbert_offsets, p.colbert, p.colbert_offsets), np.diag(full), atol=1e-6
    )


def test_compute_score_keys_and_weights(tiny_encoder):
    pairs = [(TEXTS[0], TEXTS[2]), (TEXTS[4], TEXTS[5])]
    s = tiny_encoder.compute_score(pairs, weights=(1, 2, 3))
    assert set(s) == {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    for i in range(2):
        # float32 arithmetic: relative tolerance (sparse scores of random heads can be ~20)
        assert s["sparse+dense"][i] == pytest.approx((s["dense"][i] + 2 * s["sparse"][i]) / 3, rel=1e-6, abs=1e-6)
        assert s["colbert+sparse+dense"][i] == pytest.approx(
            (s["dense"][i] + 2 * s["sparse"][i] + 3 * s["colbert"][i]) / 6, rel=1e-6, abs=1e-6
        )
    one = tiny_encoder.compute_score(pairs[0], weights=(1, 2, 3))
    assert one["dense"] == pytest.approx(s["dense"][0], rel=1e-6, abs=1e-6)
    # FlagEmbedding takes a list of two strings as one pair too (it was a TypeError here: "each pair must be")
    assert tiny_encoder.compute_score(list(pairs[0]), weights=(1, 2, 3)) == one
    with pytest.raises(ValueError):
        tiny_encoder.compute_score(pairs, weights=(1, 2))
    with pytest.raises(ValueError):
        tiny_encoder.compute_score(pairs, weights=(1, -1, 1))


def test_compute_score_weights_near_floats_limits_are_their_ratios(tiny_encoder):
    """compute_score multiplied the scores by the weights before dividing by their sum, as searches did until
    7ab7ba3: weights of 5e-324 each (valid: positive, finite) gave NaN means, 1e308 each inf. Now the one weighted
    formula of fusion.weighted: the same means as weights (1, 1, 1)."""
    pairs = [(TEXTS[0], TEXTS[2])]
    plain = tiny_encoder.compute_score(pairs, weights=(1, 1, 1))
    for tiny in ((5e-324,) * 3, (1e307,) * 3):
        s = tiny_encoder.compute_score(pairs, weights=tiny)
        for key in ("sparse+dense", "colbert+sparse+dense"):
            assert s[key][0] == pytest.approx(plain[key][0], rel=1e-6, abs=1e-6), (tiny, key, s[key])


def test_compute_score_refuses_a_mean_without_weight(tiny_encoder):
    """Weights (0, 0, 1) gave 'sparse+dense' = 0/0 = NaN (FlagEmbedding's formula); refused as a search in those
    modes is, naming the key. Zero weight on one of its modes is a plain mean."""
    pairs = [(TEXTS[0], TEXTS[2])]
    with pytest.raises(ValueError, match=r"zero total weight to the modes of 'dense\+sparse'.*'sparse\+dense'"):
        tiny_encoder.compute_score(pairs, weights=(0, 0, 1))
    s = tiny_encoder.compute_score(pairs, weights=(0, 1, 1))
    assert s["sparse+dense"][0] == pytest.approx(s["sparse"][0], rel=1e-6, abs=1e-6)
    assert s["colbert+sparse+dense"][0] == pytest.approx((s["sparse"][0] + s["colbert"][0]) / 2, rel=1e-6, abs=1e-6)


def test_truncation_warns_with_count(tiny_encoder):
    long = "word " * 5000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tiny_encoder.encode([long, "short", long], max_length=8192)
    msgs = [w for w in caught if issubclass(w.category, TruncationWarning)]
    assert len(msgs) == 1 and "2 of 3" in str(msgs[0].message)
    assert out.n_tokens.max() == tiny_encoder.max_length == 512
    assert out.truncated == 2


@pytest.mark.parametrize(
    "bad,exc", [(None, TypeError), ([], ValueError), (["a", 3], TypeError), (b"x", TypeError), (5, TypeError)]
)
def test_bad_texts(tiny_encoder, bad, exc):
    with pytest.raises(exc):
        tiny_encoder.encode(bad)


def test_tokenize_takes_a_string_as_one_text_as_encode_does(tiny_encoder):
    """A bare string was tokenized as a list of its characters: nine rows for "some text"."""
    assert tiny_encoder.tokenize("some text", 64) == tiny_encoder.tokenize(["some text"], 64)
    for bad, exc in ((None, TypeError), ([], ValueError), (["a", 3], TypeError), (b"x", TypeError)):
        with pytest.raises(exc, match="texts"):
            tiny_encoder.tokenize(bad, 64)


def test_tokenize_checks_max_length_as_encode_does(tiny_encoder):
    """0 and 1 cut nothing (a 202-token text came back whole), -1 was an OverflowError from tokenizers, True read
    as 1 and 3.5 a TypeError: each is the ValueError encode gives. Not capped at the model's limit (counting)."""
    long = "word " * 50
    for bad in (0, 1, -1, True, 3.5, "64"):
        with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
            tiny_encoder.tokenize([long], bad)
        with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
            tiny_encoder.encode([long], max_length=bad)
    (ids,), cut = tiny_encoder.tokenize([long], 2)
    assert len(ids) == 2 and cut == 1
    assert tiny_encoder.tokenize([long], 10**6)[1] == 0


def test_bad_arguments(tiny_encoder):
    with pytest.raises(ValueError):
        tiny_encoder.encode("x", dense=False, sparse=False, colbert=False)
    with pytest.raises(ValueError):
        tiny_encoder.encode("x", max_length=0)
    with pytest.raises(ValueError):
        tiny_encoder.encode("x", batch_size=0)


def test_counts_and_sizes_share_one_check(tiny_encoder, tiny_model_path):
    """NumPy integers were refused as batch_size but taken as max_length, True the reverse; token_budget 0
    became the default, -1 one text per pass, "x" a NumPy error at the first encode (a review's finds)."""
    ref = tiny_encoder.encode(["a b c", "d"], max_length=8)
    got = tiny_encoder.encode(["a b c", "d"], max_length=np.int64(8), batch_size=np.int64(1))
    np.testing.assert_allclose(got.dense, ref.dense, atol=1e-5)
    for kwargs in ({"batch_size": True}, {"max_length": True}, {"max_length": 3.7}, {"batch_size": 2.0}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be"):
            tiny_encoder.encode("x", **kwargs)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        next(tiny_encoder.iter_windows(["x"], window=16, stride=8, chunk_tokens=0))
    for budget in (0, -1, "x", 1.5):
        with pytest.raises(ValueError, match="token_budget must be a positive integer"):
            M3Encoder.from_pretrained(tiny_model_path, device="cpu", dtype="float32", token_budget=budget)


@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_devices_torch_names_but_the_encoder_cannot_use_are_refused(tiny_model_path, device):
    """'meta' was taken and failed at the first encode (Tensor.item() on meta tensors); mps and xla gave
    a bare RuntimeError from torch."""
    with pytest.raises(DeviceError, match="not supported"):
        M3Encoder.from_pretrained(tiny_model_path, device=device, dtype="float32")


def test_a_cuda_device_number_this_machine_lacks_is_refused(monkeypatch):
    """device='cuda:1' on a one-GPU machine was taken, and loading failed in model.to() with torch's
    "CUDA error: invalid device ordinal" traceback."""
    import torch

    from m3search.encoder import resolve_device_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device_dtype("cuda:0", "float32")[0] == torch.device("cuda:0")
    for device in ("cuda:1", "cuda:7"):
        with pytest.raises(DeviceError, match=f"device {device!r}: this machine has 1 CUDA device\\(s\\), from cuda:0"):
            resolve_device_dtype(device, "float32")


def test_token_ids_outside_the_vocabulary_are_refused(tiny_encoder):
    """-1 raised OverflowError inside tokenizers; an id past the vocabulary decoded to ''."""
    for bad in (-1, tiny_encoder.vocab_size, [3, -2], {tiny_encoder.vocab_size + 5: 0.5}):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tiny_encoder.convert_id_to_token(bad)


def test_the_batcher_checks_max_length_and_chunk_tokens_as_the_encoder_does(tiny_encoder):
    """max_length=3.7 encoded at 3 tokens, "5" failed in the truncation warning; chunk_tokens=0 was taken."""
    from m3search.batching import BatchedEncoder, Batcher

    with Batcher(tiny_encoder) as b:
        for bad in (3.7, "5", float("nan")):
            with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
                b.submit(["x"], max_length=bad)
        with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
            BatchedEncoder(b).iter_windows(["x"], window=16, stride=8, chunk_tokens=0)


def test_missing_heads_is_a_clear_error(tiny_model_path, tmp_path):
    broken = tmp_path / "no-heads"
    shutil.copytree(tiny_model_path, broken)
    (broken / "sparse_linear.pt").unlink()
    with pytest.raises(ModelLoadError, match="sparse_linear.pt"):
        M3Encoder.from_pretrained(str(broken), dtype="float32")


def test_missing_local_folder_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        M3Encoder.from_pretrained(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="local folder"):
        M3Encoder.from_pretrained("someone/not-cached-model")


def test_identity_is_stable_and_path_independent(tiny_encoder, tiny_model_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    os.utime(copy / "model.safetensors", ns=(1_000_000_000, 1_000_000_000))
    other = M3Encoder.from_pretrained(str(copy), dtype="float32")
    assert other.identity == tiny_encoder.identity
    assert other.weights_fingerprint == tiny_encoder.weights_fingerprint  # not the path, nor the mtime
    sp_state = __import__("torch").load(copy / "sparse_linear.pt")
    sp_state["bias"] += 1
    __import__("torch").save(sp_state, copy / "sparse_linear.pt")
    assert M3Encoder.from_pretrained(str(copy), dtype="float32").identity != tiny_encoder.identity


def test_weights_fingerprint_sees_one_small_tensor_changed_in_a_large_file(tiny_model_path, tmp_path):
    """A fine-tune that changed one small tensor (a LoRA merged into a few matrices, a bias) between large ones:
    chunks sampled evenly over the file (65 of 64 KiB) missed it, so the collection opened with the other model;
    every tensor's ends are hashed (the safetensors header says where each lies)."""
    from safetensors.torch import load_file, save_file

    from m3search.encoder import weights_fingerprint

    def folder(name: str, bump: bool):
        out = tmp_path / name
        shutil.copytree(tiny_model_path, out)
        state = load_file(out / "model.safetensors")
        for pad in ("a.pad", "zz.pad"):  # 32 MB before and after the model's own tensors
            state[pad] = __import__("torch").zeros(8_000_000)
        if bump:
            key = next(k for k in sorted(state) if k.endswith("LayerNorm.bias"))
            state[key] = state[key] + 1e-3
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return out

    base, tuned = folder("base", False), folder("tuned", True)
    assert (base / "model.safetensors").stat().st_size == (tuned / "model.safetensors").stat().st_size
    assert weights_fingerprint(base) != weights_fingerprint(tuned)
    assert weights_fingerprint(base) == weights_fingerprint(folder("copy", False))


def test_weights_fingerprint_names_a_damaged_safetensors_file(tiny_model_path, tmp_path):
    """A model.safetensors whose header does not read (an offset of 1e400, a length past the file, JSON that is
    no table of tensors, nested past Python's recursion limit) was an OverflowError or RecursionError from the
    fingerprint, or hashed as a file of another format; the error names the file."""
    from m3search.encoder import weights_fingerprint

    bodies = {
        "inf": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [1e400, 2]}}',
        "list": b"[1, 2]",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "reversed": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
    }
    for name, header in [*bodies.items(), ("long", None), ("short", b"")]:
        model = tmp_path / name
        shutil.copytree(tiny_model_path, model)
        blob = (
            (10**9).to_bytes(8, "little") + b"{}"
            if header is None
            else b"\x01\x02"
            if not header
            else len(header).to_bytes(8, "little") + header + b"\0" * 8
        )
        (model / "model.safetensors").write_bytes(blob)
        with pytest.raises(ModelLoadError, match=r"model\.safetensors is not a readable safetensors file"):
            weights_fingerprint(model)


def test_encode_does_not_change_model_state(tiny_encoder):
    before = (tiny_encoder.model.training, next(tiny_encoder.model.parameters()).dtype)
    tiny_encoder.encode(["a", "b"])
    assert (tiny_encoder.model.training, next(tiny_encoder.model.parameters()).dtype) == before
    assert isinstance(tiny_encoder.encode("x").sparse, sp.csr_matrix)


def test_swapped_head_files_are_refused_at_loading(tiny_model_path, tmp_path):
    """colbert_linear.pt and sparse_linear.pt swapped (both are Linear(hidden, n)): the folder loaded, a dense +
    ColBERT encode gave 1-dimensional ColBERT vectors, and any sparse encode failed deep in torch ("The size of
    tensor a (32) must match the size of tensor b (64)")."""
    model = tmp_path / "swapped"
    shutil.copytree(tiny_model_path, model)
    (model / "colbert_linear.pt").rename(model / "tmp.pt")
    (model / "sparse_linear.pt").rename(model / "colbert_linear.pt")
    (model / "tmp.pt").rename(model / "sparse_linear.pt")
    with pytest.raises(ModelLoadError, match=r"sparse_linear\.pt is not a Linear\(64, 1\) state dict"):
        M3Encoder.from_pretrained(str(model), device="cpu", dtype="float32")


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_at_loading(
    tiny_model_path, proxy_model_path, tmp_path
):
    """Another model's tokenizer.json in the folder (the proxy's 30522 tokens over the tiny model's embeddings):
    it loaded, and the first text with a token id past the embeddings failed in torch ("index out of range in
    self")."""
    model = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_path, model)
    shutil.copy(proxy_model_path / "tokenizer.json", model / "tokenizer.json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json has 30522 tokens, more than the model's vocab_size"):
        M3Encoder.from_pretrained(str(model), device="cpu", dtype="float32")


def test_a_tokenizer_that_adds_no_leading_special_is_refused_at_loading(tiny_model_path, tmp_path):
    """A tokenizer.json without its post-processor (no <s> ... </s>): it loaded, the dense vector was the first
    word's hidden state instead of [CLS]'s, ColBERT dropped the first word, and the empty text failed deep in
    NumPy ("repeats may not contain negative values")."""
    model = tmp_path / "no-specials"
    shutil.copytree(tiny_model_path, model)
    config = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    config["post_processor"] = None
    (model / "tokenizer.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="adds no special token before a text"):
        M3Encoder.from_pretrained(str(model), device="cpu", dtype="float32")


def test_pair_colbert_scores_do_not_pad_every_pair_to_the_longest_document():
    """compute_score over many pairs, one passage long: every pair was padded to that passage (400 pairs, one of
    8192 tokens, 64 dims: 840 MB of zeros for 0.3 MB of vectors; bge-m3's 1024 dims: 13 GB). Scores stay exact."""
    import tracemalloc

    rng = np.random.default_rng(0)
    d_len = rng.integers(0, 12, 400)
    d_len[7] = 8192
    q_len = rng.integers(0, 9, 400)
    d_off, q_off = (np.concatenate([[0], np.cumsum(n)]) for n in (d_len, q_len))
    d = rng.normal(size=(int(d_off[-1]), 64)).astype(np.float32)
    q = rng.normal(size=(int(q_off[-1]), 64)).astype(np.float32)
    tracemalloc.start()
    try:
        got = pair_colbert_scores(q, q_off, d, d_off)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 300e6
    pairs = zip(np.split(q, q_off[1:-1]), np.split(d, d_off[1:-1]))
    assert np.allclose(got, [colbert_score(a, b) for a, b in pairs], atol=1e-5)


@pytest.mark.parametrize("damage", ["prefixed", "one_missing"])
def test_weights_that_miss_the_models_tensors_are_refused_at_loading(tiny_model_path, tmp_path, damage):
    """model.safetensors whose names carry another prefix ("model.embeddings...", as a training wrapper saves
    them), or that lacks a tensor: transformers filled what it did not find with random values, and its warning
    was silenced by the loader, so every vector was random (dense 0.88 off) without a word."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / damage
    shutil.copytree(tiny_model_path, model)
    weights = load_file(model / "model.safetensors")
    if damage == "prefixed":
        weights = {f"model.{k}": v for k, v in weights.items()}
    else:
        del weights["encoder.layer.1.output.dense.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.safetensors lacks .* of the model's tensors"):
        M3Encoder.from_pretrained(str(model), device="cpu", dtype="float32")


def test_no_stderr_is_no_progress_bar(tiny_encoder, tmp_path, monkeypatch):
    """A process without stderr (pythonw, a daemon with fd 2 closed) has sys.stderr None: encode_windows and
    Collection.add asked it isatty() whether to show progress, an AttributeError from deep inside."""
    import sys

    from m3search import Collection

    monkeypatch.setattr(sys, "stderr", None)
    out = tiny_encoder.encode_windows(["word " * 100], window=16, stride=10)
    assert len(out.spans) > 1
    with Collection.create(tmp_path / "c", model=tiny_encoder, batch_size=1) as col:
        col.add(["one text", "another text"], ids=["a", "b"])
        assert col.count() == 2
