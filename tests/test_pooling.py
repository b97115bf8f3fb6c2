"""Token pooling (:mod:`m3search.pooling`): counts, cluster means, determinism, bad input.

The reference behaviour (Clavié et al. 2024): Ward clustering of one document's token
vectors into ``ceil(n / pool_factor)`` groups, each replaced by its plain mean; queries and
``pool_factor=1`` untouched.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3search.pooling import check_pool_factor, pool_tokens, pooled_length


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _batch(lengths, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((int(sum(lengths)), d)))
    return x, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def test_factor_one_is_identity():
    x, o = _batch([5, 1, 9])
    px, po = pool_tokens(x, o, 1)
    assert px is x
    np.testing.assert_array_equal(po, o)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_each_document_keeps_ceil_n_over_factor_vectors(factor):
    lengths = [1, 2, 3, 7, 16, 33, 136]
    x, o = _batch(lengths)
    px, po = pool_tokens(x, o, factor)
    assert po[0] == 0 and po[-1] == len(px) and px.shape[1] == x.shape[1] and px.dtype == np.float32
    np.testing.assert_array_equal(np.diff(po), [math.ceil(n / factor) for n in lengths])
    np.testing.assert_array_equal(np.diff(po), [pooled_length(n, factor) for n in lengths])


def test_planted_groups_become_their_means():
    """Tokens in tight, well separated groups: the pooled vectors are exactly the group means
    (not re-normalized), in order of each group's first token."""
    rng = np.random.default_rng(1)
    centers = _unit(rng.standard_normal((4, 64)))
    member = np.array([2, 0, 2, 1, 3, 0, 1, 3])  # 8 tokens, 4 groups of 2
    x = (centers[member] + 0.01 * rng.standard_normal((8, 64))).astype(np.float32)
    px, po = pool_tokens(x, np.array([0, 8]), 2)
    np.testing.assert_array_equal(po, [0, 4])
    want = np.stack([x[member == g].mean(axis=0) for g in (2, 0, 1, 3)])  # first appearance order
    np.testing.assert_allclose(px, want, rtol=1e-6, atol=1e-6)


def test_means_are_not_renormalized():
    x, o = _batch([40], d=16)
    px, _ = pool_tokens(x, o, 4)
    norms = np.linalg.norm(px, axis=1)
    assert np.all(norms <= 1 + 1e-6) and norms.min() < 0.99  # a spread cluster's mean is shorter than 1


@pytest.mark.parametrize("n,factor", [(50, 5), (136, 2), (137, 3)])
def test_matches_scipy_ward_on_the_raw_vectors(n, factor):
    """Reference: scipy's Ward linkage on the observation vectors, cut with fcluster(maxclust),
    cluster means; same clusters (as sets of means) as our Gram-matrix distances + merge cut."""
    from scipy.cluster.hierarchy import fcluster, linkage

    x, o = _batch([n], d=24, seed=n)
    px, _ = pool_tokens(x, o, factor)
    k = math.ceil(n / factor)
    labels = fcluster(linkage(x.astype(np.float64), method="ward"), t=k, criterion="maxclust")
    want = np.stack([x[labels == c].mean(axis=0) for c in np.unique(labels)])
    assert len(want) == k == len(px)
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  (row order independent comparison)
    np.testing.assert_allclose(key(px), key(want.astype(np.float32)), atol=1e-5)


def test_batch_equals_document_by_document_and_is_deterministic():
    lengths = [12, 30, 7, 64]
    x, o = _batch(lengths, d=48, seed=7)
    px, po = pool_tokens(x, o, 3)
    again, po2 = pool_tokens(x.copy(), o.copy(), 3)
    np.testing.assert_array_equal(px, again)
    np.testing.assert_array_equal(po, po2)
    for i in range(len(lengths)):
        one, _ = pool_tokens(x[o[i] : o[i + 1]], np.array([0, lengths[i]]), 3)
        np.testing.assert_array_equal(px[po[i] : po[i + 1]], one)


def test_empty_batch():
    x = np.zeros((0, 8), np.float32)
    px, po = pool_tokens(x, np.array([0]), 2)
    assert px.shape == (0, 8) and po.tolist() == [0]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors_are_refused_naming_the_document(value):
    """SciPy's "The condensed distance matrix must contain only finite values" was the whole message."""
    x, o = _batch([3, 1, 5, 4])
    x[6, 2] = value  # document 2 (rows 4:9)
    with pytest.raises(ValueError, match="ColBERT vectors of document 2 hold NaN or infinite values"):
        pool_tokens(x, o, 2)
    with pytest.raises(ValueError, match="ColBERT vectors of document 'c' hold NaN or infinite"):
        pool_tokens(x, o, 2, names=["a", "b", "c", "d"])
    assert pool_tokens(x, o, 1)[0] is x  # no pooling: nothing to refuse


def test_huge_finite_vectors_are_pooled_as_their_scaled_down_copies():
    """Values ~1e20 (vectors a caller gave) overflowed float32's squares: SciPy's "condensed distance matrix must
    contain only finite values". Ward is scale-free, so they pool as the unit vectors do, scaled (2**66: exact)."""
    x, o = _batch([3, 1, 9, 40], d=64)
    px, po = pool_tokens(x, o, 2)
    big_x, big_o = pool_tokens(x * np.float32(2.0**66), o, 2)
    assert np.array_equal(big_o, po) and np.array_equal(big_x, px * np.float32(2.0**66))
    assert np.isfinite(pool_tokens(np.full((4, 8), 3e38, np.float32), np.array([0, 4]), 2)[0]).all()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_pool_factor(bad):
    with pytest.raises(ValueError, match="colbert_pool_factor must be an integer >= 1"):
        check_pool_factor(bad)
    with pytest.raises(ValueError, match="colbert_pool_factor"):
        pool_tokens(np.zeros((2, 4), np.float32), np.array([0, 2]), bad)


@pytest.mark.parametrize("max_windows", [1, None])  # one window per text / windowed ingest
def test_a_collection_names_the_document_and_writes_nothing(tmp_path, tiny_encoder, monkeypatch, max_windows):
    """A model whose ColBERT output holds NaN (fp16 overflow) failed a pooled ingest with SciPy's message."""
    from m3search import Collection, M3Encoder

    encode_rows = M3Encoder._encode_rows

    def overflowing(self, *args, **kwargs):
        emb = encode_rows(self, *args, **kwargs)
        emb.colbert[:] = np.nan
        return emb

    with Collection.create(tmp_path / "c", model=tiny_encoder, colbert_pool_factor=2, max_windows=max_windows) as col:
        col.add(["a document stored before"], ids=["kept"])
        monkeypatch.setattr(M3Encoder, "_encode_rows", overflowing)
        with pytest.raises(ValueError, match="ColBERT vectors of document 'x' hold NaN or infinite values"):
            col.add(["pumps and valves", "heat flow"], ids=["x", "y"])
        assert col.count() == 1 and col.get(["x", "y"]) == [None, None]


def test_migrate_names_the_stored_document_whose_vectors_cannot_be_pooled():
    """Stored vectors (rows are windows) pooled by a migration: the error names the document owning the window."""
    from m3search.engines.shapes import PointBatch
    from m3search.migrate import _pooled

    x, o = _batch([2, 3, 4])  # windows 0:2, 2:5, 5:9
    x[5, 0] = np.nan  # window 2: document "b"'s second
    batch = PointBatch(["a", "b"], ["", ""], [{}, {}], colbert=x, colbert_offsets=o, windows=np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="ColBERT vectors of document 'b' hold NaN or infinite values"):
        _pooled(batch, 2)
