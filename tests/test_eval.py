"""Evaluation: trec_eval metrics checked by hand, BEIR loading, and the full `m3search eval` on cranfield."""

from __future__ import annotations

import json
import math
import os
import re
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


def test_a_query_judged_without_a_relevant_document_counts_as_0_as_in_beir():
    """BEIR's mean is over trec_eval's per-query values, which include judged queries with no grade > 0 (each 0);
    eval's means are the same numbers (tune leaves such queries out, and both say so)."""
    import pytrec_eval

    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "c": 1}, "q3": {"c": 0}, "q4": {"a": -1}}
    run = {"q1": {"a": 0.9, "b": 0.5}, "q2": {"c": 0.8, "a": 0.7, "b": 0.6}, "q3": {"c": 0.9}, "q4": {"a": 0.9}}
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert set(scores) == set(qrels)  # trec_eval scores q3 and q4 too
    beir_ndcg = sum(v["ndcg_cut_10"] for v in scores.values()) / len(scores)
    beir_recall = sum(v["recall_100"] for v in scores.values()) / len(scores)
    m = compute_metrics(run, qrels)
    assert m["ndcg@10"] == pytest.approx(beir_ndcg, abs=1e-12) and m["recall@100"] == pytest.approx(beir_recall)
    assert m["per_query"]["q3"] == m["per_query"]["q4"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}


def test_mrr_cuts_in_trec_eval_order():
    # trec_eval holds scores as C floats: these two tie, and 'b' (doc id descending) ranks first for every metric
    run = {"q": {"b": 0.5, "a": 0.5 + 1e-10, "c": 0.25}}
    pq = compute_metrics(run, {"q": {"a": 1}}, k=1)["per_query"]["q"]
    assert pq["ndcg@1"] == pq["mrr@1"] == 0.0
    pq = compute_metrics(run, {"q": {"a": 1}}, k=2)["per_query"]["q"]
    assert pq["mrr@2"] == 0.5 and pq["ndcg@2"] == pytest.approx(1 / math.log2(3))


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="qrels are empty"):
        compute_metrics({"q": {"d": 1.0}}, {})
    with pytest.raises(ValueError, match="cutoffs"):
        compute_metrics({"q": {"d": 1.0}}, {"q": {"d": 1}}, k=0)


def test_grades_outside_the_bound_are_refused_naming_where(tmp_path):
    """Grades reached trec_eval unchecked: 2**32 wrapped to 0 (a relevant document at rank 1 scored 0), 10**8 took
    800 MB and 2**31 was killed for memory. Now |grade| <= MAX_GRADE, checked in load_beir (file and line, before
    any indexing) and compute_metrics (query and document)."""
    from m3search.eval import MAX_GRADE

    run = {"q": {"a": 1.0, "b": 2.0}}
    for grade in (MAX_GRADE, -MAX_GRADE):
        compute_metrics(run, {"q": {"a": grade, "b": 1}})
    for grade in (2**32, MAX_GRADE + 1, -MAX_GRADE - 1):
        with pytest.raises(ValueError, match=rf"query 'q', document 'a': relevance {grade} is outside -1000 .. 1000"):
            compute_metrics(run, {"q": {"a": grade, "b": 1}})
    qrels = _beir_folder(tmp_path) / "qrels" / "test.tsv"
    qrels.write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t{MAX_GRADE + 1}\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(qrels))}:3: relevance 1001 is outside"):
        load_beir(tmp_path)


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


def _beir_folder(folder: Path, queries: str = '{"_id": "q1", "text": "x"}\n') -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "x"}\n')
    (folder / "queries.jsonl").write_text(queries)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return folder


def test_load_beir_qrels_bom_and_bad_bytes(tmp_path):
    qrels = _beir_folder(tmp_path) / "qrels" / "test.tsv"
    qrels.write_bytes(b"\xef\xbb\xbf" + qrels.read_bytes().replace(b"\n", b"\r\n"))  # as Windows tools save it
    assert load_beir(tmp_path).qrels == {"q1": {"d1": 1}}
    qrels.write_bytes(b"query-id\tcorpus-id\tscore\nq1\td\xe9\t1\n")  # Latin-1
    with pytest.raises(ValueError, match=rf"{re.escape(str(qrels))}:2: not UTF-8 text"):
        load_beir(tmp_path)


def test_load_beir_ignores_metadata_it_never_stores(tmp_path):
    """A corpus whose metadata held a value no collection stores (an integer beyond int64) was refused, though
    eval indexes no metadata."""
    corpus = _beir_folder(tmp_path) / "corpus.jsonl"
    corpus.write_text('{"_id": "d1", "title": "", "text": "x", "metadata": {"doi": 123456789012345678901234}}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x", "n": 1e999}\n')
    data = load_beir(tmp_path)
    assert data.doc_texts == ["x"] and data.queries == {"q1": "x"}


def test_load_beir_refuses_an_empty_judged_query(tmp_path):
    queries = '{"_id": "q0", "text": ""}\n\n{"_id": "q1", "text": " \\t "}\n'  # q0 is not judged: not used
    queries_path = _beir_folder(tmp_path, queries) / "queries.jsonl"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(queries_path))}:3: query 'q1': query is empty$"):
        load_beir(tmp_path)
    queries_path.write_text('{"_id": "q0", "text": ""}\n{"_id": "q1", "text": "x"}\n')
    assert load_beir(tmp_path).queries == {"q1": "x"}


def test_load_beir_refuses_what_it_would_read_two_ways(tmp_path):
    """A query id given twice (two texts) or a pair judged twice with two grades: the later one was used,
    silently, so a run scored other queries or grades than the file shows."""
    queries_path = _beir_folder(tmp_path, '{"_id": "q1", "text": "x"}\n{"_id": "q1", "text": "y"}\n') / "queries.jsonl"
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(queries_path))}: 1 query id\(s\) occur more than once: \['q1'\]"
    ):
        load_beir(tmp_path)
    queries_path.write_text('{"_id": "q1", "text": "x"}\n')
    qrels = tmp_path / "qrels" / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td1\t2\n")  # the same judgement twice: one
    assert load_beir(tmp_path).qrels == {"q1": {"d1": 2}}
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td1\t0\n")
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(qrels))}:3: query 'q1', document 'd1': grade 0 here, 2 on an earlier line"
    ):
        load_beir(tmp_path)
    qrels.write_text("qid\tdocid\trel\nq1\td1\t1\n")  # a header of other names
    with pytest.raises(ValueError, match=r":1: relevance 'rel' is not an integer \(a header row reads query-id"):
        load_beir(tmp_path)


def test_reference_table_parses_proxy_readme(proxy_model_path):
    ref = reference_table(proxy_model_path / "README.md")
    assert set(ref) == {"cranfield", "time", "xquad-r/en"}
    assert ref["cranfield"]["ndcg@10"]["all"] == 0.3864
    assert set(ref["time"]["recall@100"]) == set(MODES)


# ---------------------------------------------------------------------------------------------- reports


def _results(ndcg: float, **extra) -> dict:
    """A minimal ``evaluate`` result: what the three reports are made from."""
    metrics = ["ndcg@10", "recall@100", "mrr@10"]
    return {
        "dataset": "toy", "model": "tiny", "model_identity": "0" * 16, "dtype": "float32", "fusion": "weighted",
        "weights": None, "candidates": 200, "k": 10, "n_docs": 3, "n_queries": 2, "split": "test",
        "metrics": metrics, "modes": {"dense": dict.fromkeys(metrics, ndcg), "all": dict.fromkeys(metrics, ndcg)},
        **extra,
    }  # fmt: skip


def _report_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_evaluate_reports_the_judged_queries_without_a_relevant_document(tmp_path, tiny_encoder):
    """They count as 0 in every mean (BEIR's way) while tune leaves them out: the reports said neither."""
    from m3search.eval import evaluate, format_table, to_markdown

    data = _word_beir(tmp_path / "data", n_docs=20, n_queries=4)
    rows = (data / "qrels" / "test.tsv").read_text().splitlines()
    rows = [r if not r.startswith("q0\t") else r.rsplit("\t", 1)[0] + "\t0" for r in rows]  # q0: grades 0
    (data / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    res = evaluate(data, model=tiny_encoder, modes=["dense"], cache_dir=tmp_path / "c", progress=False)
    assert res["n_queries"] == 4 and res["n_queries_without_relevant"] == 1
    note = "1 of the 4 judged queries have no relevant document (no grade > 0): they score 0 and count in every mean"
    assert note in format_table(res) and f"- {note}" in to_markdown(res)
    assert "no relevant document" not in format_table({**res, "n_queries_without_relevant": 0})


def test_evaluate_reports_judged_queries_the_queries_file_lacks(tmp_path, tiny_encoder):
    """A judged query id absent from queries.jsonl was dropped from every mean without a word (BEIR's loader
    fails on it): a cut-down queries file is fine, but the reports must say the means are over fewer queries."""
    from m3search.eval import evaluate, format_table, load_beir, to_markdown

    data = _word_beir(tmp_path / "data", n_docs=20, n_queries=4)
    lines = (data / "queries.jsonl").read_text().splitlines()
    (data / "queries.jsonl").write_text("\n".join(lines[:2]) + "\n")  # q2 and q3 judged, without a text
    assert load_beir(data).unqueried == ["q2", "q3"]
    res = evaluate(data, model=tiny_encoder, modes=["dense"], cache_dir=tmp_path / "c", progress=False)
    assert res["n_queries"] == 2 and res["n_unqueried"] == 2
    note = "2 judged query id(s) of qrels/test.tsv are not in the queries file ('q2', 'q3'): left out of every mean"
    assert note in format_table(res) and f"- {note}" in to_markdown(res)
    (data / "queries.jsonl").write_text("\n".join(lines) + "\n")
    assert load_beir(data).unqueried == [] and "queries file" not in format_table({**res, "n_unqueried": 0})


def test_reports_interrupted_while_drawing_are_left_as_they_were(tmp_path, monkeypatch):
    """Ctrl-C while the chart was drawn left results.json and results.md new beside the old results.png."""
    from matplotlib.figure import Figure

    from m3search.eval import write_reports

    out = tmp_path / "reports"
    write_reports(_results(0.25), out)
    before = _report_bytes(out)
    assert set(before) == {"results.json", "results.md", "results.png"}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_reports(_results(0.75), out)
    assert _report_bytes(out) == before  # the old three, and no temporary left


def test_reports_on_a_full_disk_are_left_as_they_were(tmp_path):
    """A write cut short by the file-size limit (a full disk as a process sees it) truncated results.json."""
    from m3search.eval import write_reports

    out = tmp_path / "reports"
    write_reports(_results(0.25), out)
    before = _report_bytes(out)
    big = tmp_path / "big.json"  # results.json past the limit, the chart and results.md within it
    big.write_text(json.dumps(_results(0.75, note="x" * 400_000)))
    script = f"""
import errno, json, resource, signal, sys
import matplotlib.pyplot  # its font cache, before the limit
from m3search.eval import write_reports
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    write_reports(json.load(open({str(big)!r})), {str(out)!r})
except OSError as e:
    sys.exit(3 if e.errno == errno.EFBIG else 4)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert _report_bytes(out) == before  # the old three, and no temporary left


def test_two_writers_of_one_report_each_land_whole(tmp_path, monkeypatch):
    """Two evals given one ``--out``: the second's write ran while the first's temporaries waited for their
    rename, and both used ``<file>.tmp``: the first then renamed the second's file, or found none to rename."""
    import threading

    from m3search.engines import files

    out = tmp_path / "reports"
    first, second = _results(0.25, note="first"), _results(0.75, note="second")
    real_fsync, ran = files.os.fsync, []

    def second_writer_meanwhile(fd):  # after the first writer's first temporary is written
        real_fsync(fd)
        if not ran:
            ran.append(1)
            t = threading.Thread(target=write_reports_of, args=(second,))  # another writer (thread: its own names)
            t.start()
            t.join()

    def write_reports_of(results):
        from m3search.eval import write_reports

        write_reports(results, out)

    monkeypatch.setattr(files.os, "fsync", second_writer_meanwhile)
    write_reports_of(first)
    assert json.loads((out / "results.json").read_text())["note"] == first["note"]  # the last rename wins, whole
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    """kill -9 between a temporary and its rename leaves ``results.json.tmp-<pid>-<thread>``; per-writer names are
    never written over, so the next write removes those of processes that are gone (and only those)."""
    from m3search.eval import write_reports

    out = tmp_path / "reports"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone, alive = out / f"results.json.tmp-{int(dead.stdout)}-7", out / f"results.md.tmp-{os.getpid()}-1"
    others = [out / f"results.png.tmp-{name}" for name in ("9" * 30 + "-1", "x-1", "-1-2", "0-1")]  # not a pid
    for f in (gone, alive, *others):
        f.write_text("")
    write_reports(_results(0.25), out)
    assert not gone.exists() and alive.exists()  # a live process's temporary may still be renamed
    assert all(f.exists() for f in others)  # not ours to judge: left, and no error


# ---------------------------------------------------------------------------------------------- end to end

BIN = Path(sys.executable).with_name("m3search")
N_SUBSET = 200


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "m3search"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cran_subset(tmp_path_factory, shared_data) -> Path:
    """A BEIR folder: cranfield's first 200 documents and the queries judged on them."""
    src = shared_data / "cranfield"
    out = tmp_path_factory.mktemp("cran-subset") / "cranfield-200"
    (out / "qrels").mkdir(parents=True)
    lines = (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:N_SUBSET]
    (out / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    keep = {json.loads(ln)["_id"] for ln in lines}
    qrels = (src / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    rows = [r for r in qrels[1:] if r.split("\t")[1] in keep]
    (out / "qrels" / "test.tsv").write_text("\n".join([qrels[0], *rows]) + "\n", encoding="utf-8")
    qids = {r.split("\t")[0] for r in rows}
    queries = [
        ln for ln in (src / "queries.jsonl").read_text(encoding="utf-8").splitlines() if json.loads(ln)["_id"] in qids
    ]
    (out / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    return out


def _check_reports(out: Path, results: dict, modes=MODES) -> None:
    assert json.loads((out / "results.json").read_text()) == results
    md = (out / "results.md").read_text()
    for mode in modes:
        assert f"| {mode} | " in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(results["modes"]) == list(modes)
    for m in results["modes"].values():
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            assert 0.0 <= m[metric] <= 1.0


def test_eval_cli_outputs_cache_and_dense_oracle(cran_subset, tmp_path, tiny_model_path, tiny_encoder):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "eval",
        str(cran_subset),
        "--model",
        str(tiny_model_path),
        "--dtype",
        "float32",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    first = _cli(*args, "--json")
    results = json.loads(first.stdout)
    results.pop("reports")
    _check_reports(out, results)
    assert results["n_docs"] == N_SUBSET and results["index"]["cached"] is False
    assert results["model_identity"] == tiny_encoder.identity and results["dtype"] == "float32"

    # the dense run equals an exhaustive oracle scored by the same trec_eval code
    from helpers import dense_doc_scores

    data = load_beir(cran_subset)
    qids = list(data.queries)
    s = dense_doc_scores(tiny_encoder, [data.queries[q] for q in qids], data.doc_texts)  # best window per document
    run = {}
    for i, q in enumerate(qids):
        top = sorted(range(len(data.doc_ids)), key=lambda j: (-s[i, j], data.doc_ids[j]))[:100]
        run[q] = {data.doc_ids[j]: float(s[i, j]) for j in top}
    oracle = compute_metrics(run, data.qrels)
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        assert results["modes"]["dense"][metric] == pytest.approx(oracle[metric], abs=1e-6)

    # second run: the cached index is reused, the table goes to stdout, same numbers
    second = _cli(*args, "--modes", "sparse,all")
    assert "sparse" in second.stdout and "ndcg@10" in second.stdout and "dense+colbert" not in second.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["index"]["cached"] is True and list(again["modes"]) == ["sparse", "all"]
    for mode in ("sparse", "all"):
        assert again["modes"][mode]["ndcg@10"] == results["modes"][mode]["ndcg@10"]


def test_evaluate_zero_weights(tmp_path, tiny_encoder):
    from m3search.eval import evaluate
    from m3search.testing import BUILTIN_TEXTS

    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(BUILTIN_TEXTS)]
    (data / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (data / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": t[:24]}) + "\n" for i, t in enumerate(BUILTIN_TEXTS[:4]))
    )
    (data / "qrels" / "test.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    cache = tmp_path / "cache"
    # every mode of dense+sparse has zero weight: refused before the corpus is indexed
    with pytest.raises(ValueError, match=r"weights \(0.0, 0.0, 1.0\) give every mode of 'dense\+sparse' zero weight"):
        evaluate(data, model=tiny_encoder, weights=(0, 0, 1), cache_dir=cache, progress=False)
    assert not cache.exists()
    # tune's weights (1, 0, 1): sparse alone ranks as with any positive weight (rrf would rank by id at weight 0)
    single = ["dense", "sparse", "colbert"]
    run = dict(model=tiny_encoder, fusion="rrf", cache_dir=cache, progress=False)
    zero = evaluate(data, modes=[*single, "dense+colbert"], weights=(1, 0, 1), **run)
    one = evaluate(data, modes=single, weights=(1, 1, 1), **{**run, "fusion": "RRF"})  # any case, as search takes it
    for mode in single:
        assert zero["modes"][mode]["ndcg@10"] == one["modes"][mode]["ndcg@10"]
    assert zero["modes"]["sparse"]["mrr@10"] > 0.5 and zero["weights"] == [1, 0, 1]
    assert one["fusion"] == "rrf"  # recorded by the name it searched with, not as given


@pytest.mark.heavy
def test_eval_cli_full_cranfield_tiny(shared_data, tmp_path, tiny_model_path):
    out = tmp_path / "out"
    proc = _cli(
        "eval",
        str(shared_data / "cranfield"),
        "--model",
        str(tiny_model_path),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    results = json.loads((out / "results.json").read_text())
    _check_reports(out, results)
    assert results["n_docs"] == 1400 and results["n_queries"] == 225
    assert all(mode in proc.stdout for mode in MODES)


# ---------------------------------------------------------------------------------------------- proxy model

PROXY_SETS = ["cranfield", "time", "xquad-r/en"]


@pytest.fixture(scope="module")
def proxy_encoder(proxy_model_path):
    from m3search import M3Encoder

    return M3Encoder.from_pretrained(str(proxy_model_path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def proxy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("proxy-cache")


@pytest.mark.heavy
@pytest.mark.parametrize("name", PROXY_SETS)
def test_proxy_exhaustive_reproduces_reference_table(
    name, shared_data, proxy_model_path, proxy_encoder, proxy_cache, tmp_path
):
    """candidates >= corpus size: every mode within 0.002 of the README's exhaustive table (nDCG@10, Recall@100)."""
    from m3search.eval import evaluate, write_reports

    ref = reference_table(proxy_model_path / "README.md")[name]
    # the reference table cuts documents at 512 tokens: one window each (max_windows=1); it scores float32
    # token vectors, so the lossless float16 storage (the default turbo8 is measured by the next test)
    settings = {"max_windows": 1, "colbert_dtype": "float16"}
    results = evaluate(
        shared_data / name, model=proxy_encoder, candidates=5000, cache_dir=proxy_cache, settings=settings
    )
    write_reports(results, tmp_path)
    assert results["n_docs"] <= 5000
    for mode in MODES:
        for metric in ("ndcg@10", "recall@100"):
            got, want = results["modes"][mode][metric], ref[metric][mode]
            assert abs(got - want) <= 0.002, f"{name} {mode} {metric}: {got:.4f} vs reference {want:.4f}"


@pytest.mark.heavy
@pytest.mark.parametrize("name", PROXY_SETS)
def test_proxy_default_settings_loss(name, shared_data, proxy_model_path, proxy_encoder, proxy_cache):
    """Default candidates (200): each mode's loss against the exhaustive table; nDCG@10 loss < 0.005."""
    from m3search.eval import evaluate

    ref = reference_table(proxy_model_path / "README.md")[name]
    results = evaluate(shared_data / name, model=proxy_encoder, cache_dir=proxy_cache, settings={"max_windows": 1})
    lines = []
    for mode in MODES:
        loss = {m: ref[m][mode] - results["modes"][mode][m] for m in ("ndcg@10", "recall@100")}
        lines.append(f"{name} {mode}: nDCG@10 loss {loss['ndcg@10']:+.4f}, Recall@100 loss {loss['recall@100']:+.4f}")
        assert loss["ndcg@10"] < 0.005, lines[-1]
    print("\n".join(lines))


def _word_beir(folder: Path, n_docs: int = 60, n_queries: int = 12) -> Path:
    """A BEIR folder of seeded random word documents; query i takes words of document i, judging it and the next."""
    import random

    from m3search.testing import BUILTIN_TEXTS

    rng = random.Random(7)
    words = sorted({w for t in BUILTIN_TEXTS for w in re.findall(r"[a-z]+", t.lower())})
    texts = [" ".join(rng.choices(words, k=12)) for _ in range(n_docs)]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": " ".join(texts[i].split()[:4])}) + "\n" for i in range(n_queries))
    )
    rows = [f"q{i}\td{j}\t{2 if j == i else 1}\n" for i in range(n_queries) for j in (i, i + 1)]
    (folder / "qrels" / "test.tsv").write_text("".join(rows))
    return folder


def test_evaluate_small_candidates_scores_the_search_a_user_runs(tmp_path, tiny_encoder):
    """candidates=1 and k=2: nDCG@2 / MRR@2 are those of search(k=2, candidates=1) (a pool of 2 per list), not of
    the depth-100 search (a pool of 100 per list); Recall@100 is search(k=100, candidates=1)'s, and says so."""
    from m3search import Collection
    from m3search.eval import evaluate, to_markdown

    data = _word_beir(tmp_path / "data")
    modes = ["dense", "colbert", "dense+sparse", "all"]
    res = evaluate(data, model=tiny_encoder, modes=modes, candidates=1, k=2, cache_dir=tmp_path / "c", progress=False)
    beir = load_beir(data)
    qids = list(beir.queries)
    with Collection.open(res["index"]["path"], model=tiny_encoder) as col:
        differs = False
        for mode in modes:

            def run(k, mode=mode):
                hits = col.search_batch([beir.queries[q] for q in qids], k=k, mode=mode, candidates=1)
                return {q: {h.id: h.score for h in hs} for q, hs in zip(qids, hits)}

            user, deep = compute_metrics(run(2), beir.qrels, k=2), compute_metrics(run(100), beir.qrels, k=2)
            differs |= user["ndcg@2"] != deep["ndcg@2"]
            assert res["modes"][mode]["ndcg@2"] == pytest.approx(user["ndcg@2"], abs=1e-12), mode
            assert res["modes"][mode]["mrr@2"] == pytest.approx(user["mrr@2"], abs=1e-12), mode
            assert res["modes"][mode]["recall@100"] == pytest.approx(deep["recall@100"], abs=1e-12), mode
    assert differs  # the fixture tells the two searches apart
    assert "recall_candidates" not in res["modes"]["dense"] and res["modes"]["all"]["recall_candidates"] == 100
    assert "recall@100 comes from search(k=100)" in to_markdown(res)


def test_cache_build_waits_for_another_and_deletes_nothing(tmp_path, tiny_encoder):
    """A second eval of a dataset whose index another process was building took the folder for an interrupted
    build and deleted it (both runs then failed). Now builds hold a lock beside the cache entry: the second waits,
    then uses the finished index."""
    import fcntl
    import threading

    from m3search.eval import _cached_index

    data = load_beir(_word_beir(tmp_path / "data", n_docs=12, n_queries=2))
    cache = tmp_path / "cache"
    col, info = _cached_index(data, tiny_encoder, cache, batch_size=None, progress=False)
    col.close()
    path = Path(info["path"])
    done = path.with_name(path.name + ".done.json")
    done.unlink()  # as another process sees it while building: its folder, no .done.json yet
    marker = path / "still-building"
    marker.write_text("")
    with open(path.with_name(path.name + ".lock"), "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # the other process's lock (flock: per open file, also in-process)
        got: dict = {}
        second = threading.Thread(
            target=lambda: got.update(r=_cached_index(data, tiny_encoder, cache, batch_size=None, progress=False))
        )
        second.start()
        second.join(3)
        assert second.is_alive() and marker.exists()  # waiting; the other build untouched
        done.write_text(json.dumps(info))  # the other build finishes
    second.join(120)
    col, again = got["r"]
    col.close()
    assert again["cached"] is True and marker.exists()


def test_cached_index_in_use_by_another_eval_is_waited_for(tmp_path, tiny_encoder, capfd):
    """A second eval of a corpus, started while the first was searching its cached index, failed "in use"
    (the build lock is let go once the index is open; the index's own lock is held for the searches). Now it
    waits for the first to close it, saying so, as it waits for a build. This process holding it: still the
    error (waiting would never end)."""
    import threading

    from m3search.errors import CollectionInUseError
    from m3search.eval import _cached_index

    data = load_beir(_word_beir(tmp_path / "data", n_docs=12, n_queries=2))
    cache = tmp_path / "cache"
    col, info = _cached_index(data, tiny_encoder, cache, batch_size=None, progress=False)
    with pytest.raises(CollectionInUseError, match="in use by process"):
        _cached_index(data, tiny_encoder, cache, batch_size=None, progress=True)
    col.close()
    # the first eval, searching in another process until told to stop
    code = (
        "import sys; from m3search import Collection\n"
        f"col = Collection.open({info['path']!r})\n"
        "print('HELD', flush=True); sys.stdin.readline(); col.close(); print('CLOSED', flush=True)\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "HELD", first.stderr.read()[-2000:]
        got: dict = {}

        def second() -> None:
            try:
                got["r"] = _cached_index(data, tiny_encoder, cache, batch_size=None, progress=True)
            except Exception as exc:  # the old code: CollectionInUseError at once
                got["error"] = exc

        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(3)
        assert waiter.is_alive() and not got, got  # waiting for the first
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "CLOSED"
        waiter.join(60)
    finally:
        first.kill()
        first.wait(10)
    assert "r" in got, got
    col, again = got["r"]
    with col:
        assert again["cached"] is True and col.count() == 12
    assert f"waiting for another process using {Path(info['path']).name} ..." in capfd.readouterr().err


def test_cache_unreadable_done_record_is_rebuilt(tmp_path, tiny_encoder):
    """A truncated <key>.done.json (a build killed while writing it) failed every later run with "Expecting
    value: line 1 column 1 (char 0)", naming no file. Now it counts as an unfinished build: rebuilt."""
    from m3search.eval import _cached_index

    data = load_beir(_word_beir(tmp_path / "data", n_docs=12, n_queries=2))
    cache = tmp_path / "cache"
    col, info = _cached_index(data, tiny_encoder, cache, batch_size=None, progress=False)
    col.close()
    done = Path(info["path"] + ".done.json")
    done.write_text("")
    col, again = _cached_index(data, tiny_encoder, cache, batch_size=None, progress=False)
    with col:
        assert again["cached"] is False and col.count() == 12
    assert json.loads(done.read_text())["key"] == info["key"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [Path(info["path"]).name, done.name, done.name[:-9] + "lock"]
    )


def test_a_moved_cache_reports_where_its_index_is_now(tmp_path, tiny_encoder):
    """A cache moved to another folder (another $M3SEARCH_CACHE_DIR) is used where it is, but the index path
    reported (results["index"]["path"], tune's "collection") was read from its .done.json: the old folder."""
    from m3search.eval import _cached_index

    data = load_beir(_word_beir(tmp_path / "data", n_docs=12, n_queries=2))
    col, info = _cached_index(data, tiny_encoder, tmp_path / "old", batch_size=None, progress=False)
    col.close()
    (tmp_path / "old").rename(tmp_path / "new")
    col, again = _cached_index(data, tiny_encoder, tmp_path / "new", batch_size=None, progress=False)
    with col:
        assert again["cached"] is True and again["key"] == info["key"]
        assert again["path"] == str(tmp_path / "new" / Path(info["path"]).name) == str(col.location)


def test_eval_checks_out_before_any_work(tmp_path, tiny_model_path):
    """An --out that cannot be written was found only after indexing and searching every mode."""
    from click.testing import CliRunner

    from m3search.cli import main

    data = _word_beir(tmp_path / "data", n_docs=12, n_queries=2)
    (tmp_path / "file").write_text("")
    cache = tmp_path / "cache"
    args = ["eval", str(data), "-m", str(tiny_model_path), "--modes", "dense", "--cache-dir", str(cache)]
    got = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "file" / "reports")])
    assert got.exit_code == 1 and "cannot write reports into" in got.output and "is not a folder" in got.output
    assert not cache.exists()  # refused before the corpus was indexed
    got = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "new" / "reports"), "--json"])
    assert got.exit_code == 0, got.output
    assert (tmp_path / "new" / "reports" / "results.json").is_file()


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_a_cache_dir_that_cannot_be_made_is_named_as_the_cache(tmp_path, tiny_model_path, monkeypatch, command):
    """A --cache-dir under a file (or $M3SEARCH_CACHE_DIR naming a file) failed with only
    "[Errno 20] Not a directory: '.../file/c'", once the model was loaded, not saying that it was the cache."""
    from click.testing import CliRunner

    from m3search.cli import main

    data = _word_beir(tmp_path / "data", n_docs=12, n_queries=3)
    (tmp_path / "file").write_text("")
    args = [command, str(data), "-m", str(tmp_path / "no-model")]  # refused before the model is looked for
    args += ["--modes", "dense", "--out", str(tmp_path / "o")] if command == "eval" else ["--folds", "2"]
    got = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "file" / "c")])
    assert got.exit_code == 1
    assert f"cannot make the index cache folder '{tmp_path / 'file' / 'c'}' (--cache-dir" in got.output
    assert "Not a directory" in got.output
    monkeypatch.setenv("M3SEARCH_CACHE_DIR", str(tmp_path / "file"))
    got = CliRunner().invoke(main, args)
    assert got.exit_code == 1 and f"index cache folder '{tmp_path / 'file' / 'eval'}'" in got.output
    assert "$M3SEARCH_CACHE_DIR/eval" in got.output


def test_a_report_folder_through_a_symlink_to_nothing_is_refused_before_any_work(tmp_path):
    """--out naming a link made ahead of its folder passed the check, and the reports' mkdir failed with
    "[Errno 17] File exists: 'out'" once the corpus was indexed and every mode searched."""
    from m3search.eval import report_dir

    link, target = tmp_path / "out", tmp_path / "big" / "reports"
    link.symlink_to(target, target_is_directory=True)
    for out in (link, link / "cran"):
        with pytest.raises(ValueError, match=rf"'{link}' is a symlink to {target}, which does not exist"):
            report_dir(out, tmp_path)
    target.mkdir(parents=True)  # as the error says to
    assert report_dir(link / "cran", tmp_path) == link / "cran"


def test_eval_split_scores_another_qrels_file(tmp_path, tiny_model_path):
    """load_beir(split=) was not exposed: a BEIR set with only qrels/dev.tsv could not be evaluated."""
    from click.testing import CliRunner

    from m3search.cli import main

    data = _word_beir(tmp_path / "data", n_docs=12, n_queries=3)
    (data / "qrels" / "test.tsv").rename(data / "qrels" / "dev.tsv")
    args = ["eval", str(data), "-m", str(tiny_model_path), "--modes", "dense", "--cache-dir", str(tmp_path / "c")]
    got = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o1")])
    assert got.exit_code == 1 and "no qrels/test.tsv" in got.output
    got = CliRunner().invoke(main, [*args, "--split", "dev", "--out", str(tmp_path / "o2"), "--json"])
    assert got.exit_code == 0, got.output
    res = json.loads(got.output)
    assert res["split"] == "dev" and res["n_queries"] == 3
    assert "(qrels/dev.tsv)" in (tmp_path / "o2" / "results.md").read_text()
    with pytest.raises(ValueError, match="split must be a qrels file name"):
        load_beir(data, split="../qrels/dev")


def _gzip_files(folder: Path, *names: str) -> None:
    """Replace each ``folder/name`` by its gzip-compressed ``name.gz``."""
    import gzip

    for name in names:
        (folder / f"{name}.gz").write_bytes(gzip.compress((folder / name).read_bytes()))
        (folder / name).unlink()


def test_eval_on_a_gzipped_beir_folder_gives_the_plain_folders_metrics(tmp_path, tiny_encoder):
    """The BEIR loader read only corpus.jsonl / queries.jsonl / qrels/test.tsv: a folder that ships them as .gz
    (as MTEB's BEIR sets do) was 'not a BEIR folder'."""
    import shutil

    from m3search.eval import evaluate

    plain = _word_beir(tmp_path / "plain", n_docs=24, n_queries=6)
    packed = tmp_path / "packed"
    shutil.copytree(plain, packed)
    _gzip_files(packed, "corpus.jsonl", "queries.jsonl", "qrels/test.tsv")
    a, b = load_beir(plain), load_beir(packed)
    assert (a.doc_ids, a.doc_texts, a.queries, a.qrels) == (b.doc_ids, b.doc_texts, b.queries, b.qrels)
    assert a.corpus_sha256 == b.corpus_sha256  # the content's: one cache entry for both
    run = dict(model=tiny_encoder, modes=["dense", "sparse", "all"], progress=False)
    want, got = (evaluate(d, cache_dir=tmp_path / d.name, **run)["modes"] for d in (plain, packed))
    metrics = ("ndcg@10", "recall@100", "mrr@10")
    assert {m: [got[m][x] for x in metrics] for m in got} == {m: [want[m][x] for x in metrics] for m in want}
    assert want["sparse"]["ndcg@10"] > 0


def test_a_gzipped_beir_file_reads_as_the_plain_one_errors_included(tmp_path):
    """Same line numbers in errors; a plain and a .gz copy side by side are refused (which one is scored must not
    be a guess); a truncated .gz is an error naming it, not a raw EOFError."""
    import gzip

    from m3search.errors import SourceError

    folder = _beir_folder(tmp_path)
    qrels = folder / "qrels" / "test.tsv"
    qrels.write_bytes(b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\td\xe9\t1\r\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(qrels))}:3: not UTF-8 text"):
        load_beir(folder)
    _gzip_files(folder, "qrels/test.tsv")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(qrels))}.gz:3: not UTF-8 text"):
        load_beir(folder)
    (folder / "qrels" / "test.tsv.gz").write_bytes(gzip.compress(b"q1\td1\t1\n"))
    assert load_beir(folder).qrels == {"q1": {"d1": 1}}
    queries = folder / "queries.jsonl"
    queries.write_text('{"_id": "q0", "text": "x"}\n\n{"_id": "q1", "text": ""}\n')
    _gzip_files(folder, "queries.jsonl")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(queries))}.gz:3: query 'q1': query is empty$"):
        load_beir(folder)
    queries.write_text('{"_id": "q1", "text": "x"}\n')
    with pytest.raises(SourceError, match="holds both queries.jsonl and queries.jsonl.gz: remove one"):
        load_beir(folder)
    queries.unlink()
    corpus = folder / "corpus.jsonl"
    corpus.write_bytes(gzip.compress(corpus.read_bytes() * 200)[:-30])
    corpus.rename(folder / "corpus.jsonl.gz")
    with pytest.raises(SourceError, match=r"^corpus.jsonl.gz: not a valid gzip file \("):
        load_beir(folder)


def test_load_beir_reads_the_variants_real_sets_have(tmp_path):
    """Checked while adding .gz: JSON number ids judged by string ids in qrels, a null title, a query with a
    metadata object, qrels without the header row (BEIR's own loader skips line 1 unconditionally: it would drop
    the first judgement) and with Windows line endings all read as BEIR means them. A pin: no bug found here."""
    folder = _beir_folder(tmp_path)
    (folder / "corpus.jsonl").write_text(
        '{"_id": 123, "title": null, "text": "x"}\n{"_id": "d2", "title": "T", "text": "y", "metadata": {}}\n'
    )
    (folder / "queries.jsonl").write_text('{"_id": 7, "text": "q", "metadata": {"lang": "en", "n": 1e999}}\n')
    (folder / "qrels" / "test.tsv").write_bytes(b"7\t123\t2\r\n7\td2\t0\r\n")
    data = load_beir(folder)
    assert (data.doc_ids, data.doc_texts, data.queries) == (["123", "d2"], ["x", "T y"], {"7": "q"})
    assert data.qrels == {"7": {"123": 2, "d2": 0}}


def test_a_backbone_only_fine_tune_does_not_reuse_its_base_models_cached_index(tmp_path, tiny_model_path, tiny_encoder):
    """The cache key's model identity hashes config, heads and tokenizer, not model.safetensors: a fine-tune of the
    backbone alone made elsewhere (same config, heads, tokenizer) opened its base model's index, silently searching
    with the base model's document vectors. Here even size and mtime are the base's: only the weights differ."""
    import shutil

    from safetensors.torch import load_file, save_file

    from m3search import M3Encoder
    from m3search.eval import _cached_index

    data = load_beir(_word_beir(tmp_path / "data", n_docs=12, n_queries=2))
    cache = tmp_path / "cache"
    col, info = _cached_index(data, tiny_encoder, cache, batch_size=None, progress=False)
    col.close()
    tuned = shutil.copytree(tiny_model_path, tmp_path / "tuned")
    weights, base = tuned / "model.safetensors", tiny_model_path / "model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(base.stat().st_atime_ns, base.stat().st_mtime_ns))
    assert weights.stat().st_size == base.stat().st_size and weights.read_bytes() != base.read_bytes()
    encoder = M3Encoder.from_pretrained(str(tuned), device="cpu", dtype="float32")
    assert encoder.identity == tiny_encoder.identity  # what the key had to tell them apart by
    col, again = _cached_index(data, encoder, cache, batch_size=None, progress=False)
    with col:
        assert again["cached"] is False and again["key"] != info["key"] and col.count() == 12
    copy = shutil.copytree(tiny_model_path, tmp_path / "copy")  # the base model elsewhere, other mtimes: the same
    os.utime(copy / "model.safetensors", ns=(1_000_000_000, 1_000_000_000))
    encoder = M3Encoder.from_pretrained(str(copy), device="cpu", dtype="float32")
    col, same = _cached_index(data, encoder, cache, batch_size=None, progress=False)
    with col:
        assert same["cached"] is True and same["path"] == info["path"]


def test_a_cache_folder_checked_before_making_it_says_what_is_in_the_way(tmp_path, monkeypatch):
    """cache_folder(make=False) (finetune's early check) walked up and checked the folder itself, beside the
    collections' own check (engines.files.refuse_uncreatable); it now uses that one, with the cache's words: these
    are the messages as they were. Nothing is made, and an existing folder passes as mkdir(exist_ok) would."""
    from helpers import deny_opening

    from m3search.eval import cache_folder

    monkeypatch.chdir(tmp_path)
    Path("file").write_text("")
    Path("link").symlink_to("nowhere")
    Path("ro").mkdir()
    said = "cannot make the index cache folder {!r} (--cache-dir, default $M3SEARCH_CACHE_DIR/eval): {}"
    cases = {
        "file/c": "Not a directory: 'file'",  # as given: a relative folder is named relative
        "file": "Not a directory: 'file'",
        "link/c": "link is a link to nothing",
        "link": "link is a link to nothing",
        "ro/c/d": "Permission denied: 'ro'",
    }
    deny_opening(monkeypatch, "ro", writing=True)  # as for another user's folder (these tests run as root too)
    for cache, reason in cases.items():
        with pytest.raises(ValueError) as raised:
            cache_folder(cache, make=False)
        assert str(raised.value) == said.format(cache, reason)
    with pytest.raises(ValueError) as raised:
        cache_folder(tmp_path / "file" / "c", make=False)
    assert str(raised.value) == said.format(
        str(tmp_path / "file" / "c"), f"Not a directory: {str(tmp_path / 'file')!r}"
    )
    assert cache_folder("ro", make=False) == Path("ro")  # there already: mkdir(exist_ok=True) would pass too
    assert cache_folder("new/c", make=False) == Path("new/c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "ro"]
