"""Evaluation: trec_eval metrics checked by hand, BEIR loading, and the full `m3search eval` on cranfield."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m3search.eval import MODES, compute_metrics, load_beir, reference_table

REPO = Path(__file__).resolve().parents[1]


def _ndcg(gains_in_run_order, ideal_gains, k=10):
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains_in_run_order[:k]))
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(ideal_gains, reverse=True)[:k]))
    return dcg / idcg


def test_metrics_match_hand_computed_values():
    qrels = {
        "q1": {"d1": 2, "d3": 1},
        "q2": {"d4": 1, "d5": 1},
        "q3": {"d9": 1},  # judged but nothing retrieved: counts as 0 in every mean
        "q4": {"a": 1},
        "q5": {"d11": 1},
    }
    run = {
        "q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7},
        "q2": {"d2": 0.5, "d4": 0.4},
        "q4": {"a": 1.0, "b": 1.0},  # tie: trec_eval puts 'b' first (doc id descending)
        "q5": {f"d{i:02d}": 1.0 - i / 100 for i in range(11)} | {"d11": 0.5},  # relevant at rank 12
        "unjudged": {"x": 1.0},  # ignored
    }
    m = compute_metrics(run, qrels, k=10, recall_at=100)
    # q1: DCG = 2/log2(2) + 1/log2(4) = 2.5; IDCG = 2 + 1/log2(3)
    q1 = 2.5 / (2 + 1 / math.log2(3))
    q2 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    q4 = 1 / math.log2(3)
    pq = m["per_query"]
    assert pq["q1"]["ndcg@10"] == pytest.approx(q1, abs=1e-12)
    assert pq["q1"]["ndcg@10"] == pytest.approx(_ndcg([2, 0, 1], [2, 1]), abs=1e-12)
    assert pq["q2"]["ndcg@10"] == pytest.approx(q2, abs=1e-12)
    assert pq["q4"]["ndcg@10"] == pytest.approx(q4, abs=1e-12)
    assert pq["q5"]["ndcg@10"] == 0.0
    assert [pq[q]["mrr@10"] for q in ("q1", "q2", "q3", "q4", "q5")] == [1.0, 0.5, 0.0, 0.5, 0.0]
    assert [pq[q]["recall@100"] for q in ("q1", "q2", "q3", "q4", "q5")] == [1.0, 0.5, 0.0, 1.0, 1.0]
    assert set(pq) == set(qrels)
    assert m["ndcg@10"] == pytest.approx((q1 + q2 + 0 + q4 + 0) / 5, abs=1e-12)
    assert m["mrr@10"] == pytest.approx(2.0 / 5, abs=1e-12)
    assert m["recall@100"] == pytest.approx(3.5 / 5, abs=1e-12)
    # other cutoffs: MRR@12 sees q5's hit at rank 12, Recall@2 misses q1's d3
    m12 = compute_metrics(run, qrels, k=12, recall_at=2)
    assert m12["per_query"]["q5"]["mrr@12"] == pytest.approx(1 / 12)
    assert m12["per_query"]["q1"]["recall@2"] == 0.5


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="qrels are empty"):
        compute_metrics({"q": {"d": 1.0}}, {})
    with pytest.raises(ValueError, match="cutoffs"):
        compute_metrics({"q": {"d": 1.0}}, {"q": {"d": 1}}, k=0)


def test_load_beir_and_cross_lingual(shared_data):
    en = load_beir(shared_data / "xquad-r" / "en")
    assert len(en.doc_ids) == 1180 and len(en.queries) == 1190
    assert en.doc_texts[0] == en.doc_texts[0].strip() and en.doc_ids[0].startswith("en-")
    # German questions against the English corpus: German queries, English qrels
    de_en = load_beir(shared_data / "xquad-r" / "en", queries_dir=shared_data / "xquad-r" / "de")
    assert de_en.doc_ids == en.doc_ids and de_en.qrels == en.qrels
    qid = next(iter(en.queries))
    assert de_en.queries[qid] != en.queries[qid]
    assert de_en.name == "xquad-r/de -> xquad-r/en"
    cran = load_beir(shared_data / "cranfield")
    assert len(cran.doc_ids) == 1400 and len(cran.queries) == 225
    assert sum(len(r) for r in cran.qrels.values()) == 1612


def test_load_beir_errors(tmp_path):
    with pytest.raises(ValueError, match="corpus.jsonl missing"):
        load_beir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "x"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tother\t1\n")
    with pytest.raises(ValueError, match="no qrels/test.tsv whose corpus ids"):
        load_beir(tmp_path)


def test_reference_table_parses_proxy_readme(proxy_model_path):
    ref = reference_table(proxy_model_path / "README.md")
    assert set(ref) == {"cranfield", "time", "xquad-r/en"}
    assert ref["cranfield"]["ndcg@10"]["all"] == 0.3864
    assert set(ref["time"]["recall@100"]) == set(MODES)
