"""Fusion functions: BGE-M3's weighted formula, RRF (k = 60) and DBSF, checked by hand and against qdrant-client."""

from __future__ import annotations

import numpy as np
import pytest

from m3search.fusion import RRF_K, contributions, dbsf, fuse, order, ranks, rrf, total, weighted

W = {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}


def test_weighted_is_bge_m3_formula():
    s = {"dense": [0.5, 0.7], "sparse": [0.1, 0.0], "colbert": [0.6, 0.2]}
    np.testing.assert_allclose(
        weighted(s, W), [(0.4 * 0.5 + 0.2 * 0.1 + 0.4 * 0.6) / 1.0, (0.4 * 0.7 + 0.4 * 0.2) / 1.0]
    )
    # Only the modes present count in the denominator.
    np.testing.assert_allclose(weighted({"dense": [0.5], "sparse": [0.1]}, W), [(0.4 * 0.5 + 0.2 * 0.1) / 0.6])
    with pytest.raises(ValueError, match="sum to 0"):
        weighted({"sparse": [1.0]}, {"sparse": 0.0})


def test_rrf_constant_is_60_and_ranks_are_one_based():
    assert RRF_K == 60
    ids = ["a", "b", "c"]
    s = {"dense": [0.9, 0.8, 0.1], "sparse": [0.0, 0.5, 0.7]}
    got = rrf(s, {"dense": 1.0, "sparse": 2.0}, ids)
    want = [1 / 61 + 2 / 63, 1 / 62 + 2 / 62, 1 / 63 + 2 / 61]
    np.testing.assert_allclose(got, want)


def test_ties_break_by_id():
    ids = ["b", "a", "c", "aa"]
    fused = np.array([1.0, 1.0, 2.0, 1.0])
    assert [ids[i] for i in order(ids, fused)] == ["c", "a", "aa", "b"]
    assert ranks(ids, fused).tolist() == [4, 2, 1, 3]


def test_ties_break_by_the_ids_as_python_orders_them():
    """NumPy's string array drops trailing NULs, so "a" and "a\x00" (two documents) tied, and the order among
    them was the engine's; ties go by id as Python's ``sorted`` (and the search's first stage) orders them."""
    ids = ["a\x00", "b", "a"]
    assert [ids[i] for i in order(ids, np.zeros(3))] == ["a", "a\x00", "b"]
    assert ranks(ids, np.zeros(3)).tolist() == [2, 3, 1]
    keys = [("d", 1), ("c", 10), ("d", 0)]  # a passage's (id, window)
    assert [keys[i] for i in order(keys, np.zeros(3))] == [("c", 10), ("d", 0), ("d", 1)]


def test_a_long_id_costs_its_own_length_only():
    """Ordering held every candidate's id padded to the longest one's length (NumPy's fixed-width strings): one
    document with an id of a million characters made each search that found it hold gigabytes."""
    import tracemalloc

    ids = ["x" * 100_000] + [f"d{i}" for i in range(400)]
    tracemalloc.start()
    try:
        order(ids, np.zeros(len(ids)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the padded array: 401 x 100,000 x 4 bytes = 160 MB


def test_contributions_sum_to_fused():
    rng = np.random.default_rng(0)
    ids = [f"d{i}" for i in range(30)]
    s = {m: rng.random(30) for m in W}
    for method in ("weighted", "rrf", "dbsf"):
        parts = contributions(method, s, W, ids)
        np.testing.assert_allclose(sum(parts.values()), fuse(method, s, W, ids), atol=1e-12)
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse("max", s, W, ids)


def test_fusion_names_are_taken_in_any_case_as_mode_names_are():
    """fusion="RRF" was refused while mode="Dense" is a mode: every fusion name is now read by one check
    (plan.check_fusion) in any case, and anything else is still refused naming the choices."""
    from m3search.plan import SearchPlan

    rng = np.random.default_rng(1)
    ids = [f"d{i}" for i in range(12)]
    s = {m: rng.random(12) for m in W}
    for method in ("weighted", "rrf", "dbsf"):
        for spelled in (method.upper(), method.capitalize()):
            assert SearchPlan.build(fusion=spelled).fusion == method
            np.testing.assert_array_equal(fuse(spelled, s, W, ids), fuse(method, s, W, ids))
            for m, part in contributions(spelled, s, W, ids).items():
                np.testing.assert_array_equal(part, contributions(method, s, W, ids)[m])
    for bad in ("max", " rrf", "", None, 3, ["rrf"]):
        with pytest.raises(ValueError, match=r"unknown fusion .* \(choose from weighted, rrf, dbsf\)"):
            SearchPlan.build(fusion=bad)
        with pytest.raises(ValueError, match=r"unknown fusion .* \(choose from weighted, rrf, dbsf\)"):
            fuse(bad, s, W, ids)


def test_dbsf_degenerate_lists():
    assert dbsf({"dense": [0.3]}, {"dense": 1.0}).tolist() == [0.5]
    assert dbsf({"dense": [0.3, 0.3]}, {"dense": 1.0}).tolist() == [0.5, 0.5]


def _scored(models, ids, scores):
    return [
        models.ScoredPoint(id=i, version=0, score=float(s)) for i, s in sorted(zip(ids, scores), key=lambda t: -t[1])
    ]


def test_congruent_with_qdrant_client():
    """Same numbers as qdrant-client's own fusion (their RRF constant k' = ours + 1: 0-based positions)."""
    qc = pytest.importorskip("qdrant_client.hybrid.fusion")
    from qdrant_client.http import models

    rng = np.random.default_rng(1)
    n = 40
    ids = list(range(n))
    s = {"dense": rng.normal(size=n), "sparse": rng.random(n)}
    ones = {"dense": 1.0, "sparse": 1.0}
    sids = [str(i) for i in ids]
    lists = [_scored(models, ids, s[m]) for m in s]
    ref = {p.id: p.score for p in qc.reciprocal_rank_fusion(lists, limit=n, ranking_constant_k=RRF_K + 1)}
    np.testing.assert_allclose(rrf(s, ones, sids), [ref[i] for i in ids], rtol=1e-12)
    lists = [_scored(models, ids, s[m]) for m in s]
    ref = {p.id: p.score for p in qc.distribution_based_score_fusion(lists, limit=n)}
    np.testing.assert_allclose(dbsf(s, ones), [ref[i] for i in ids], rtol=1e-9)


def test_weights_that_overflow_a_fused_score_are_a_clear_error():
    """DBSF's scores grow with its weights (a candidate far past 3 sigma maps above 2): a weight near float's largest
    (their sum finite, which the plan checks) made that score inf, which the HTTP answer's model then refused (a 400
    quoting pydantic's "1 validation error for HitOut"). Now the fused total's own ValueError naming the weights."""
    ids = [f"d{i:03d}" for i in range(100)]
    scores = {"dense": [0.0] * 99 + [1.0]}  # the outlier maps to (1 - (0.01 - 0.3)) / 0.6 = 2.15
    fine = contributions("dbsf", scores, {"dense": 1e307}, ids)
    assert np.array_equal(total("dbsf", fine, {"dense": 1e307}), fuse("dbsf", scores, {"dense": 1e307}, ids))
    parts = contributions("dbsf", scores, {"dense": 1e308}, ids)
    with pytest.raises(ValueError, match=r"^weights \(dense=1e\+308\) are too large: dbsf scores overflow"):
        total("dbsf", parts, {"dense": 1e308})
