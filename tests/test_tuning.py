"""tuning.Setting: what one setting may hold (the grid, scoring and choice are tests/test_tune.py's)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from m3search.tuning import DEFAULT_SETTING, ScoreCache, Setting, evaluate_settings, setting_of, settings_grid


def _cache() -> ScoreCache:
    """Three queries over one pool of four documents whose ColBERT scores reverse the dense order."""
    ids = ["a", "b", "c", "d"]
    scores = {"dense": np.array([0.9, 0.8, 0.7, 0.6]), "sparse": np.zeros(4), "colbert": np.array([0.1, 0.2, 0.3, 0.9])}
    qrels = {q: {"d": 1} for q in "xyz"}
    return ScoreCache.from_pools(list("xyz"), [(ids, scores)] * 3, qrels, depth=40)


def test_a_setting_whose_weights_fuse_a_mode_it_leaves_out_is_refused():
    """``Setting("dense+sparse", "weighted", (0.4, 0.2, 0.4), 20)`` was taken and scored with ColBERT fused (scoring
    fuses all three scores by the weights), while a search with it drops ColBERT: tune could adopt a setting for a
    score its searches never get. Refused at construction, naming the mode and the weight; ``dense`` or ``sparse``
    alone take no weight on another mode either (their weights were ignored)."""
    cache = _cache()
    fused = Setting("all", "weighted", (0.4, 0.2, 0.4), 20)
    dropped = Setting("dense+sparse", "weighted", (0.4, 0.2, 0.0), 20)
    assert evaluate_settings(cache, [fused]).tolist() != evaluate_settings(cache, [dropped]).tolist()
    for mode, weights, named in (
        ("dense+sparse", (0.4, 0.2, 0.4), "colbert"),
        ("colbert", (0.5, 0.0, 0.5), "dense"),
        ("dense", (0.4, 0.2, 0.4), "sparse, colbert"),
        ("sparse+colbert", (1.0, 0.0, 0.0), "dense"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"give weight to {named}, which mode '{mode}' leaves out")):
            Setting(mode, "weighted", weights, 20)


def test_a_setting_takes_the_weights_a_search_takes():
    """Weights are checked as a search checks them (three finite numbers >= 0, some weight on the setting's modes);
    a zero weight on a mode the setting uses is a search's too (a collection's defaults can hold one), and the
    grid's, the defaults' and the stored defaults' settings are all taken."""
    for weights, said in (
        ((0.5, 0.5), "three numbers"),
        ((-1.0, 1.0, 1.0), "must not be negative"),
        ((float("nan"), 1.0, 1.0), "finite number"),
        ((0.0, 0.0, 0.0), "must not all be zero"),
    ):
        with pytest.raises(ValueError, match=said):
            Setting("all", "weighted", weights, 20)
    assert Setting("all", "rrf", [0.5, 0, 0.5], 20).weights == (0.5, 0.0, 0.5)
    assert setting_of({"mode": "dense+sparse", "fusion": "dbsf", "weights": (1, 0, 1), "candidates": 20}).weights == (
        1.0,
        0.0,
        0.0,
    )
    assert settings_grid(0.25, candidates=(5, 20))[0] == DEFAULT_SETTING
