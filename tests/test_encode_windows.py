"""Token windows: the plan (text -> windows), argument checks, and M3Encoder.encode_windows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from m3search import M3Encoder
from m3search.windows import check_windows, plan_windows

TEXTS = [
    "Aerodynamic heating of a slender body in hypersonic flow.",
    "",
    "Die schnelle braune Katze springt über den faulen Hund am Fluss, und der Hund schläft weiter.",
    "敏捷的棕色狐狸跳过了河边的懒狗。" * 9,
    "short",
    "الثعلب البني السريع يقفز فوق الكلب الكسول بجانب النهر. " * 12,
    "the the the the boundary boundary layer " * 20,
]


def _reference_plan(n: int, span: int, stride: int, max_windows: int | None) -> list[tuple[int, int]]:
    """(start, length) of each window, written the obvious way."""
    out, start = [], 0
    while True:
        out.append((start, min(start + span, n) - start))
        if start + span >= n:
            break
        start += stride
    return out if max_windows is None else out[:max_windows]


@pytest.mark.parametrize("span,stride,max_windows", [(1, 1, None), (5, 5, None), (5, 2, None), (8, 3, 2), (6, 6, 1)])
def test_plan_matches_reference(span, stride, max_windows):
    lengths = np.array([0, 1, 4, 5, 6, 7, 12, 13, 40])
    plan = plan_windows(lengths, span, stride, max_windows)
    want = [(d, s, n) for d, L in enumerate(lengths) for s, n in _reference_plan(int(L), span, stride, max_windows)]
    assert list(zip(plan.doc.tolist(), plan.start.tolist(), plan.length.tolist())) == want
    full = [len(_reference_plan(int(L), span, stride, None)) for L in lengths]
    assert plan.cut == sum(c > (max_windows or c) for c in full)


def test_plan_covers_every_token_with_the_stated_overlap():
    span, stride = 10, 7
    lengths = np.array([3, 10, 11, 17, 18, 100])
    plan = plan_windows(lengths, span, stride)
    for d, n in enumerate(lengths):
        rows = plan.doc == d
        starts, lens = plan.start[rows], plan.length[rows]
        covered = np.zeros(n, bool)
        for s, m in zip(starts, lens):
            covered[s : s + m] = True
        assert covered.all()
        assert (np.diff(starts) == stride).all()
        assert (lens[:-1] == span).all() and starts[-1] + lens[-1] == n
        if len(starts) > 1:  # the overlap stated in the docs: span - stride, the last pair may share more
            assert starts[0] + lens[0] - starts[1] == span - stride


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=2, stride=1), "window=2"),
        (dict(window=600, stride=10), "window=600.*512 positions"),
        (dict(window=64, stride=0), "stride=0"),
        (dict(window=64, stride=63), "stride=63"),
        (dict(window=64, stride=8, max_windows=0), "max_windows"),
        (dict(window=64.0, stride=8), "window"),
        (dict(window=64, stride=True), "stride"),
    ],
)
def test_bad_window_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_windows(**kwargs, max_length=512)


def test_overlap_zero_is_allowed():
    check_windows(64, 62, max_length=512)  # windows abut: no token skipped, none shared


def test_encode_windows_rejects_bad_arguments(tiny_encoder):
    with pytest.raises(ValueError, match="window=513"):
        tiny_encoder.encode_windows(["x"], window=513, stride=8)
    with pytest.raises(ValueError, match="stride=100"):
        tiny_encoder.encode_windows(["x"], window=64, stride=100)


def test_one_window_texts_equal_encode_bit_for_bit(tiny_encoder):
    """A text that fits in one window gives exactly what encode() gives (same ids, same batches)."""
    want = tiny_encoder.encode(TEXTS)
    got = tiny_encoder.encode_windows(TEXTS, window=tiny_encoder.max_length, stride=16)
    assert np.array_equal(got.doc, np.arange(len(TEXTS))) and got.cut == 0
    e = got.embeddings
    assert np.array_equal(e.n_tokens, want.n_tokens)
    assert np.array_equal(e.dense, want.dense)
    assert np.array_equal(e.colbert_offsets, want.colbert_offsets) and np.array_equal(e.colbert, want.colbert)
    assert np.array_equal(e.sparse.indptr, want.sparse.indptr)
    assert np.array_equal(e.sparse.indices, want.sparse.indices) and np.array_equal(e.sparse.data, want.sparse.data)


def _content(encoder: M3Encoder, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = encoder.tokenizer.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets


@pytest.fixture(scope="module")
def windowed(tiny_encoder):
    return tiny_encoder.encode_windows(TEXTS, window=24, stride=15)


def test_windows_hold_the_text_tokens_with_the_model_specials(tiny_encoder, windowed):
    """Each window row is the model's output for <s> + its slice of content ids + </s>."""
    import torch

    span, stride = 22, 15
    for d, text in enumerate(TEXTS):
        ids, _ = _content(tiny_encoder, text)
        rows = np.flatnonzero(windowed.doc == d)
        ref = _reference_plan(len(ids), span, stride, None)
        assert len(rows) == len(ref)
        for row, (s, n) in zip(rows, ref):
            window_ids = [0] + ids[s : s + n] + [2]
            assert windowed.embeddings.n_tokens[row] == len(window_ids)
            t = torch.tensor([window_ids])
            with torch.inference_mode():
                h = tiny_encoder.model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state.float()
            cls = torch.nn.functional.normalize(h[0, 0], dim=-1).numpy()
            assert np.allclose(windowed.embeddings.dense[row], cls, atol=1e-5)
    assert len(windowed.embeddings) > len(TEXTS)  # the fixture does split texts


def test_spans_are_character_offsets_of_the_window_tokens(tiny_encoder, windowed):
    span, stride = 22, 15
    for d, text in enumerate(TEXTS):
        ids, offsets = _content(tiny_encoder, text)
        rows = np.flatnonzero(windowed.doc == d)
        for row, (s, n) in zip(rows, _reference_plan(len(ids), span, stride, None)):
            want = (offsets[s][0], offsets[s + n - 1][1]) if n else (0, 0)
            assert tuple(windowed.spans[row]) == want
            assert 0 <= want[0] <= want[1] <= len(text)  # characters, not bytes (Chinese, Arabic)
    assert windowed.spans.dtype == np.int64 and windowed.spans.shape == (len(windowed.doc), 2)
    assert windowed.doc.dtype == np.int64


def test_max_windows_keeps_the_first_windows_and_counts_cut_texts(tiny_encoder, windowed):
    capped = tiny_encoder.encode_windows(TEXTS, window=24, stride=15, max_windows=2)
    per_doc = np.bincount(windowed.doc, minlength=len(TEXTS))
    assert capped.cut == int((per_doc > 2).sum()) > 0
    keep = np.concatenate([np.flatnonzero(windowed.doc == d)[:2] for d in range(len(TEXTS))])
    assert np.array_equal(capped.doc, windowed.doc[keep])
    assert np.array_equal(capped.spans, windowed.spans[keep])
    assert np.allclose(capped.embeddings.dense, windowed.embeddings.dense[keep], atol=1e-5)


def test_windows_batch_within_the_token_budget(tiny_encoder, windowed):
    """Small budget: many batches, same rows in text order."""
    small = M3Encoder(
        tiny_encoder.model,
        tiny_encoder.colbert_linear,
        tiny_encoder.sparse_linear,
        tiny_encoder.tokenizer,
        folder=tiny_encoder.folder,
        name_or_path="x",
        device=tiny_encoder.device,
        dtype=tiny_encoder.dtype,
        token_budget=48,
    )
    shapes = []
    hook = small.model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        got = small.encode_windows(TEXTS, window=24, stride=15, show_progress=False)
    finally:
        hook.remove()
    assert len(shapes) > 3 and all(b * w <= 48 for b, w in shapes)
    e, w = got.embeddings, windowed.embeddings
    assert np.allclose(e.dense, w.dense, atol=1e-5)
    assert np.array_equal(e.colbert_offsets, w.colbert_offsets) and np.allclose(e.colbert, w.colbert, atol=1e-5)
    assert np.array_equal(e.sparse.indices, w.sparse.indices) and np.allclose(e.sparse.data, w.sparse.data, atol=1e-5)


def test_iter_windows_pieces_add_up_to_encode_windows(tiny_encoder, windowed):
    pieces = list(tiny_encoder.iter_windows(TEXTS, window=24, stride=15, max_windows=3, chunk_tokens=50))
    whole = tiny_encoder.encode_windows(TEXTS, window=24, stride=15, max_windows=3)
    assert len(pieces) > 3
    assert all(int(p.embeddings.n_tokens.sum()) < 50 + 24 for p in pieces)
    assert [p.cut for p in pieces] == [whole.cut] + [0] * (len(pieces) - 1) and whole.cut > 0
    assert np.array_equal(np.concatenate([p.doc for p in pieces]), whole.doc)
    assert np.array_equal(np.concatenate([p.spans for p in pieces]), whole.spans)
    assert np.allclose(np.concatenate([p.embeddings.dense for p in pieces]), whole.embeddings.dense, atol=1e-5)
    assert np.allclose(np.concatenate([p.embeddings.colbert for p in pieces]), whole.embeddings.colbert, atol=1e-5)
    with pytest.raises(ValueError, match="stride=0"):  # at the call, not at the first piece
        tiny_encoder.iter_windows(TEXTS, window=24, stride=0)


def test_encoder_entry_points_name_bad_text_and_arguments(tiny_encoder):
    """Lone surrogates reached the tokenizer ("TextEncodeInput must be Union[...]"); chunk_tokens=0 divided by zero."""
    for call in (
        lambda: tiny_encoder.encode(["ok", "ab\ud800cd"]),
        lambda: tiny_encoder.encode_windows(["ok", "ab\ud800cd"], window=16, stride=10),
        lambda: list(tiny_encoder.iter_windows(["ok", "ab\ud800cd"], window=16, stride=10)),
    ):
        with pytest.raises(ValueError, match=r"texts\[1\]: not valid Unicode"):
            call()
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        tiny_encoder.iter_windows(["word " * 100], window=16, stride=10, chunk_tokens=0)


@pytest.mark.parametrize("settings", [{"window": 6}, {"max_length": 6}, {"max_length": 6, "max_windows": 1}])
def test_small_windows_get_a_default_stride_that_fits(tmp_path, tiny_encoder, settings):
    """The default stride took its overlap from the window, specials included: window < 8 was refused."""
    from m3search import Collection

    with Collection.create(tmp_path / "c", model=tiny_encoder, **settings) as col:
        assert col.settings["stride"] <= col.settings["window"] - 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # max_windows=1 cuts the text: warned, as it should be
            col.add(["word " * 40], ids=["a"])
        assert col.count() == 1


def test_numpy_integers_as_window_settings(tmp_path, tiny_encoder):
    """np.int64 window: 'stride must be an integer, not None'; np.int64 stride: the manifest write failed
    (not JSON) after the shard was made."""
    from m3search import Collection

    for settings in ({"window": np.int64(64)}, {"window": 64, "stride": np.int64(40), "max_windows": np.int64(2)}):
        path = tmp_path / f"c{len(settings)}"
        with Collection.create(path, model=tiny_encoder, **settings) as col:
            assert type(col.settings["window"]) is int and type(col.settings["stride"]) is int
        with Collection.open(path, model=tiny_encoder) as col:
            assert col.settings["window"] == 64
