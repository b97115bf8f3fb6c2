"""m3search.tuning: cached-array settings equal real searches and pytrec_eval; honest choice; stored defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m3search.eval import compute_metrics
from m3search.fusion import fuse, order
from m3search.plan import MODES
from m3search.tuning import (
    DEFAULT_SETTING,
    ScoreCache,
    Setting,
    choose,
    cross_validate,
    evaluate_settings,
    paired_bootstrap,
    parse_metric,
    settings_grid,
    tune,
)

# ---------------------------------------------------------------------------------------------- synthetic pools


def _synthetic(seed: int, n_queries: int = 12, pool: int = 60, ties: bool = False):
    """Random pools with exact per-mode scores, graded qrels (some judged docs outside the pool)."""
    rng = np.random.default_rng(seed)
    qids = [f"q{i}" for i in range(n_queries)]
    pools, qrels = [], {}
    for q in qids:
        n = int(rng.integers(pool // 2, pool + 1))
        ids = [f"d{j}" for j in rng.choice(10 * pool, size=n, replace=False)]
        s = {m: rng.normal(size=n) for m in MODES}
        s["sparse"] = np.maximum(s["sparse"], 0)  # many zeros: no shared token
        if ties:
            s = {m: np.round(v, 1) for m, v in s.items()}
        pools.append((ids, s))
        judged = rng.choice(n, size=12, replace=False)  # more than k=10: the ideal list is cut
        qrels[q] = {ids[j]: int(rng.integers(0, 4)) for j in judged}
        qrels[q][f"x{q}"] = 2  # relevant, never retrieved
    return qids, pools, qrels


def _reference_run(ids, s, setting: Setting, k: int, depth: int) -> dict[str, float]:
    """What Collection.search does, in plain Python: pool at depth, fuse, order by score then id."""
    if setting.mode in ("dense", "sparse"):
        live = [j for j in range(len(ids)) if setting.mode == "dense" or s["sparse"][j] > 0]
        sc = np.array([s[setting.mode][j] for j in live])
        top = order([ids[j] for j in live], sc)[:k]
        return {ids[live[t]]: float(sc[t]) for t in top}
    c = max(setting.candidates, k)
    dense = order(ids, s["dense"])[:c]
    live = [j for j in range(len(ids)) if s["sparse"][j] > 0]
    sparse = [live[t] for t in order([ids[j] for j in live], s["sparse"][live])[:c]]
    members = sorted(set(dense.tolist()) | set(sparse))
    cand = [ids[j] for j in members]
    used = [m for m, w in zip(MODES, setting.weights) if w > 0]
    fused = fuse(setting.fusion, {m: s[m][members] for m in used}, dict(zip(MODES, setting.weights)), cand)
    return {cand[t]: float(fused[t]) for t in order(cand, fused)[:k]}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("metric", ["ndcg@10", "recall@20", "mrr@10"])
def test_cached_settings_equal_fusion_and_pytrec_eval(ties, metric):
    qids, pools, qrels = _synthetic(3 + ties, ties=ties)
    cache = ScoreCache.from_pools(qids, pools, qrels, depth=40)
    rng = np.random.default_rng(0)
    grid = [
        s for s in settings_grid(0.25, candidates=(5, 20, 40)) if s.mode in ("dense", "sparse") or s.candidates <= 40
    ]
    picked = [grid[i] for i in rng.choice(len(grid), size=40, replace=False)] + grid[:3]
    got = evaluate_settings(cache, picked, metric)
    name, k = parse_metric(metric)
    key = {"ndcg": f"ndcg@{k}", "recall": f"recall@{k}", "mrr": f"mrr@{k}"}[name]
    for i, setting in enumerate(picked):
        run = {q: _reference_run(ids, s, setting, k, 40) for q, (ids, s) in zip(qids, pools)}
        want = compute_metrics(run, qrels, k=k, recall_at=k)["per_query"]
        np.testing.assert_allclose(got[i], [want[q][key] for q in qids], atol=1e-12, err_msg=str(setting))


def test_grid_holds_defaults_first_presets_and_no_duplicates():
    grid = settings_grid()
    assert grid[0] == DEFAULT_SETTING and len(set(grid)) == len(grid)
    modes = {s.mode for s in grid}
    assert modes == {"dense", "sparse", "colbert", "dense+sparse", "dense+colbert", "sparse+colbert", "all"}
    assert all(abs(sum(s.weights) - 1) < 1e-12 for s in grid)
    assert {s.fusion for s in grid if s.mode == "all"} == {"weighted", "rrf", "dbsf"}
    assert {s.candidates for s in grid if s.mode == "all"} == {50, 100, 200, 400}
    assert sum(s.mode == "dense" for s in grid) == 1  # no re-ranking: one setting whatever fusion / depth
    with pytest.raises(ValueError, match="divide 1"):
        settings_grid(0.3)


def test_parse_metric_errors():
    assert parse_metric("NDCG@10") == ("ndcg", 10)
    for bad in ("ndcg", "map@10", "ndcg@0", "ndcg@00", "recall@x", "ndcg@²", "ndcg@١٠"):  # no int() of "²"
        with pytest.raises(ValueError, match="unknown metric"):
            parse_metric(bad)
    with pytest.raises(ValueError, match=r"^metric 'ndcg@100000000000': K must be at most 100000"):
        parse_metric("ndcg@100000000000")  # said "candidates=100000000000 exceeds the limit", after indexing
    with pytest.raises(ValueError, match=r"K must be at most 100000"):
        parse_metric("ndcg@" + "9" * 5000)  # int() refused it: "Exceeds the limit (4300 digits)"


def test_choice_is_cross_validated_deterministic_and_adopted_only_beyond_noise():
    rng = np.random.default_rng(1)
    grid = settings_grid(0.5, candidates=(50,))
    base = rng.uniform(0.2, 0.6, size=60)
    e = rng.normal(0, 0.05, size=(len(grid), 60))
    noise = base + e - e.mean(1, keepdims=True)  # no setting better than the defaults over all queries
    noise[0] = base
    out = choose(noise, grid, folds=5)
    assert out == choose(noise, grid, folds=5)  # fixed seeds
    # each fold's winner on the other folds was lucky there: held out, the choice does not beat the defaults
    assert not out["adopted"] and out["setting"] == DEFAULT_SETTING
    lo, hi = out["cv"]["interval"]
    assert lo <= out["cv"]["gain"] <= hi and lo <= 0
    assert any(c != DEFAULT_SETTING.to_dict() for c in out["cv"]["fold_choices"])

    better = noise.copy()
    better[4] = base + 0.1 + rng.normal(0, 0.01, size=60)
    out = choose(better, grid, folds=5)
    assert out["adopted"] and out["setting"] == grid[4] and out["cv"]["interval"][0] > 0
    assert all(c == grid[4].to_dict() for c in out["cv"]["fold_choices"])
    assert out["cv"]["tuned"] == pytest.approx(better[4].mean())


def test_cross_validation_scores_each_fold_with_the_other_folds_choice():
    # setting 1 wins on queries 0-4, setting 2 on 5-9: held-out scores must not use the fold's own winner
    per_query = np.zeros((3, 10))
    per_query[1, :5] = 1.0
    per_query[2, 5:] = 1.0
    per_query[2, 5] = 5.0  # setting 2 best overall, but not when query 5's fold is held out? (it still is)
    cv = cross_validate(per_query, folds=10, seed=0)
    # leave-one-out: the held-out query is scored by the winner of the other nine
    for q in range(10):
        others = np.delete(per_query, q, axis=1).mean(1)
        assert cv["per_query"][q] == per_query[int(np.argmax(others)), q]
    with pytest.raises(ValueError, match="fewer than the 11 folds"):
        cross_validate(per_query, folds=11)


def test_paired_bootstrap():
    a = np.array([0.5, 0.6, 0.7, 0.8])
    lo, hi = paired_bootstrap(a, a - 0.1)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    lo, hi = paired_bootstrap(np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0, 1.0]))
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="no queries"):
        paired_bootstrap(np.array([]), np.array([]))


# ---------------------------------------------------------------------------------------------- on a collection

N_DOCS = 60


@pytest.fixture(scope="module")
def beir(tmp_path_factory, shared_data) -> Path:
    """cranfield's first 60 documents and the queries judged on them (a BEIR folder)."""
    src = shared_data / "cranfield"
    out = tmp_path_factory.mktemp("tune-beir") / "cran60"
    (out / "qrels").mkdir(parents=True)
    lines = (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:N_DOCS]
    (out / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    keep = {json.loads(ln)["_id"] for ln in lines}
    qrels = (src / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    rows = [r for r in qrels[1:] if r.split("\t")[1] in keep]
    (out / "qrels" / "test.tsv").write_text("\n".join([qrels[0], *rows]) + "\n", encoding="utf-8")
    qids = {r.split("\t")[0] for r in rows}
    queries = [ln for ln in (src / "queries.jsonl").read_text().splitlines() if json.loads(ln)["_id"] in qids]
    (out / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, beir, tiny_encoder) -> Path:
    from m3search import Collection
    from m3search.eval import load_beir

    data = load_beir(beir)
    path = tmp_path_factory.mktemp("tune-col") / "col"
    with Collection.create(path, model=tiny_encoder) as col:
        col.add(data.doc_texts, ids=data.doc_ids, show_progress=False)
    return path


def test_cached_settings_equal_real_searches(indexed, beir, tiny_encoder):
    """The per-query metric of a setting from the cached pool equals searching with it (then pytrec_eval)."""
    from m3search import Collection
    from m3search.eval import load_beir

    data = load_beir(beir)
    qids = list(data.queries)
    texts = [data.queries[q] for q in qids]
    grid = settings_grid(0.25, candidates=(5, 20, 50))
    picked = grid[:3] + [  # defaults, dense, sparse; then every fusion, mode mix and depth at least once
        Setting("all", "rrf", (0.25, 0.25, 0.5), 20),
        Setting("all", "dbsf", (0.5, 0.25, 0.25), 5),
        Setting("all", "weighted", (0.25, 0.5, 0.25), 50),
        Setting("colbert", "weighted", (0.0, 0.0, 1.0), 20),
        Setting("dense+sparse", "weighted", (0.75, 0.25, 0.0), 5),
        Setting("dense+colbert", "dbsf", (0.5, 0.0, 0.5), 50),
        Setting("sparse+colbert", "rrf", (0.0, 0.25, 0.75), 20),
    ]
    assert all(p in grid for p in picked)
    with Collection.open(indexed, model=tiny_encoder) as col:
        emb = col.encoder.encode(texts, max_length=col.settings["query_max_length"])
        cache = ScoreCache.build(col, dict(zip(qids, texts)), data.qrels, depth=200, query_embeddings=emb)
        got = evaluate_settings(cache, picked, "ndcg@10")
        for i, s in enumerate(picked):
            hits = col.search_batch(
                texts,
                k=10,
                mode=s.mode,
                fusion=s.fusion,
                weights=s.weights,
                candidates=s.candidates,
                query_embeddings=emb,
            )
            run = {q: {h.id: h.score for h in hs} for q, hs in zip(qids, hits)}
            want = compute_metrics(run, data.qrels)["per_query"]
            np.testing.assert_allclose(got[i], [want[q]["ndcg@10"] for q in qids], atol=1e-9, err_msg=str(s))


def test_a_setting_holds_its_fusion_by_the_lower_case_name():
    """Setting("all", "RRF", ...) was scored as dbsf (the branch no other name took), and any unknown name too."""
    cache = ScoreCache.from_pools(*_synthetic(3), depth=40)
    w = (0.4, 0.2, 0.4)
    for method in ("weighted", "rrf", "dbsf"):
        loud = Setting("all", method.upper(), w, 20)
        assert loud == Setting("all", method, w, 20) and loud.to_dict()["fusion"] == method
        np.testing.assert_array_equal(
            evaluate_settings(cache, [loud]), evaluate_settings(cache, [Setting("all", method, w, 20)])
        )
    with pytest.raises(ValueError, match="unknown fusion 'max' \\(choose from weighted, rrf, dbsf\\)"):
        Setting("all", "max", w, 20)


def test_a_setting_holds_its_mode_by_the_stored_name():
    """Setting("Dense", ...) went down the re-ranking branch of evaluate_settings ("dense" takes the top k of the
    dense list: refused below as needing lists deeper than the cache's), and was stored and shown as given: a mode
    is held by the name set_search_defaults stores."""
    cache = ScoreCache.from_pools(*_synthetic(3), depth=40)
    np.testing.assert_array_equal(
        evaluate_settings(cache, [Setting("Dense", "weighted", (1.0, 0.0, 0.0), 50)]),
        evaluate_settings(cache, [Setting("dense", "weighted", (1.0, 0.0, 0.0), 50)]),
    )
    for given, name, w in (
        ("Dense", "dense", (1.0, 0.0, 0.0)),
        (" SPARSE ", "sparse", (0.0, 1.0, 0.0)),
        ("colbert+Dense", "dense+colbert", (0.5, 0.0, 0.5)),
        ("dense+sparse+colbert", "all", (0.4, 0.2, 0.4)),
        ("ALL", "all", (0.4, 0.2, 0.4)),
    ):
        loud = Setting(given, "weighted", w, 20)
        assert (
            loud == Setting(name, "weighted", w, 20)
            and loud.to_dict()["mode"] == name
            and str(loud).startswith(name + " ")
        )
        np.testing.assert_array_equal(
            evaluate_settings(cache, [loud]), evaluate_settings(cache, [Setting(name, "weighted", w, 20)])
        )
    for bad, exc in (("max", ValueError), ("dense+dense", ValueError), (None, TypeError)):
        with pytest.raises(exc, match="mode"):
            Setting(bad, "weighted", (1.0, 0.0, 0.0), 20)


# ---------------------------------------------------------------------------------------------- stored defaults

TUNED = {"mode": "dense+colbert", "fusion": "rrf", "weights": [0.7, 0.0, 0.3], "candidates": 30}


@pytest.fixture()
def small(tmp_path, tiny_encoder) -> Path:
    from m3search import Collection

    texts = [f"document {i} about {w}" for i, w in enumerate(["wings", "flow", "heat", "boundary layers"] * 10)]
    path = tmp_path / "small"
    with Collection.create(path, model=tiny_encoder) as col:
        col.add(texts, ids=[f"d{i}" for i in range(len(texts))], show_progress=False)
    return path


def _ranked(hits) -> list[tuple[str, float]]:
    return [
        (h.id if hasattr(h, "id") else h["id"], round(h.score if hasattr(h, "score") else h["score"], 9)) for h in hits
    ]


def test_search_defaults_stored_used_reset_and_atomic(small, tiny_encoder):
    from m3search import Collection

    with Collection.open(small, model=tiny_encoder) as col:
        before_docs = [(r.id, r.text) for r in col.get([f"d{i}" for i in range(40)])]
        builtin = col.search_defaults()
        assert builtin == {"mode": "all", "fusion": "weighted", "weights": [0.4, 0.2, 0.4], "candidates": 200}
        plain = _ranked(col.search("heat flow", k=8))
        col.set_search_defaults(TUNED, tuning={"metric": "ndcg@10"})
    with Collection.open(small, model=tiny_encoder) as col:  # stored: another process sees it
        assert col.search_defaults() == TUNED and col.manifest["tuning"] == {"metric": "ndcg@10"}
        tuned = _ranked(col.search("heat flow", k=8))
        explicit = dict(TUNED, weights=tuple(TUNED["weights"]))
        assert tuned == _ranked(col.search("heat flow", k=8, **explicit)) and tuned != plain
        # a request's own arguments win; another mode gets the built-in fusion and weights, not the tuned ones
        assert _ranked(col.search("heat flow", k=8, mode="all", fusion="weighted", weights=(0.4, 0.2, 0.4))) == plain
        assert _ranked(col.search("heat flow", k=8, mode="sparse")) == _ranked(
            col.search("heat flow", k=8, mode="sparse", fusion="weighted", weights=(0.4, 0.2, 0.4))
        )
        # an interrupted write leaves the manifest (file and memory) as it was
        manifest_file = small / "manifest.json"
        raw = manifest_file.read_bytes()

        def crash(manifest):
            raise KeyboardInterrupt

        original, col.engine.write_manifest = col.engine.write_manifest, crash
        with pytest.raises(KeyboardInterrupt):
            col.set_search_defaults(None)
        col.engine.write_manifest = original
        assert manifest_file.read_bytes() == raw and col.search_defaults() == TUNED
        with pytest.raises(ValueError, match="unknown mode"):
            col.set_search_defaults(dict(TUNED, mode="bogus"))
        with pytest.raises(ValueError, match="exactly the keys"):
            col.set_search_defaults({"mode": "all"})
        assert manifest_file.read_bytes() == raw
        col.set_search_defaults(None)
        assert col.search_defaults() == builtin and "tuning" not in col.manifest
        assert _ranked(col.search("heat flow", k=8)) == plain
        assert [(r.id, r.text) for r in col.get([f"d{i}" for i in range(40)])] == before_docs


def test_a_fusion_in_any_case_searches_and_is_stored_by_its_lower_case_name(small, tiny_encoder):
    """Collection.search(fusion="RRF") and set_search_defaults with it were refused ("unknown fusion"), while
    mode="Dense" is taken; the manifest (what another process and `info` read) keeps the lower-case name, and
    the rule integrations read a search's fusion by (LangChain's relevance) gives it too."""
    from m3search import Collection
    from m3search.collection import request_defaults

    with Collection.open(small, model=tiny_encoder) as col:
        for method in ("weighted", "rrf", "dbsf"):
            want = _ranked(col.search("heat flow", k=8, mode="dense+sparse", fusion=method))
            assert _ranked(col.search("heat flow", k=8, mode="Dense+Sparse", fusion=method.upper())) == want
            assert (
                request_defaults(col.search_defaults(), col.search_defaults, "dense", method.title(), None)[1] == method
            )
        assert col.set_search_defaults(dict(TUNED, fusion="RRF")) == TUNED
    with Collection.open(small, model=tiny_encoder) as col:
        assert col.search_defaults() == TUNED and col.manifest["settings"]["fusion"] == "rrf"
        with pytest.raises(ValueError, match="unknown fusion 'max' \\(choose from weighted, rrf, dbsf\\)"):
            col.search("heat flow", fusion="max")


def test_http_search_falls_through_to_the_collection_defaults(small, tiny_encoder, tiny_model_path):
    from fastapi.testclient import TestClient

    from m3search import Collection
    from m3search.server import Settings, create_app

    with Collection.open(small, model=tiny_encoder) as col:
        col.set_search_defaults(TUNED, tuning={})
        want = _ranked(col.search("heat flow", k=5))
        builtin = _ranked(col.search("heat flow", k=5, mode="all", fusion="weighted", weights=(0.4, 0.2, 0.4)))
    app = create_app(Settings(collection=str(small), model=str(tiny_model_path), dtype="float32", device="cpu"))
    with TestClient(app) as client:
        r = client.post("/search", json={"query": "heat flow", "k": 5})
        assert r.status_code == 200 and _ranked(r.json()["hits"]) == want
        r = client.post("/search", json={"query": "heat flow", "k": 5, "mode": "all"})
        assert _ranked(r.json()["hits"]) == builtin  # a request's own mode: built-in fusion and weights
        info = client.get("/info").json()
        assert info["collection"]["settings"]["mode"] == "dense+colbert"


# ---------------------------------------------------------------------------------------------- CLI and bad input


def _run(*args: str):
    from click.testing import CliRunner

    from m3search.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_tune_that_adopts_nothing_does_not_say_stored(indexed, beir, monkeypatch):
    """A tune that kept the defaults printed its best setting '(stored as the search defaults of C)'."""
    from m3search import tuning

    monkeypatch.setattr(tuning, "paired_bootstrap", lambda *a, **kw: (-1.0, 1.0))  # nothing beats the defaults
    try:
        out = _run("tune", str(beir), "--collection", str(indexed), "--folds", "3")
        assert out.exit_code == 0, out.output
        assert f"(not adopted: {indexed} keeps its search defaults" in out.output, out.output
        assert "stored as the search defaults" not in out.output
    finally:
        assert _run("tune", "--reset", "--collection", str(indexed)).exit_code == 0


def test_cli_tune_stores_shows_and_resets(indexed, beir, tiny_model_path, tmp_path, monkeypatch):
    out = _run("tune", str(beir), "--collection", str(indexed), "--folds", "3", "--json")
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert {"mode", "fusion", "weights", "candidates", "cv", "adopted", "best"} <= set(res)
    cv = res["cv"]
    assert cv["folds"] == 3 and len(cv["fold_choices"]) == 3 and cv["interval"][0] <= cv["gain"] <= cv["interval"][1]
    assert res["adopted"] == (cv["interval"][0] > 0 and res["best"] != DEFAULT_SETTING.to_dict())
    # fixed seeds: the same input gives the same choice and the same CV numbers
    again = json.loads(_run("tune", str(beir), "--collection", str(indexed), "--folds", "3", "--json").output)
    assert {k: again[k] for k in ("mode", "fusion", "weights", "candidates", "cv")} == {
        k: res[k] for k in ("mode", "fusion", "weights", "candidates", "cv")
    }
    info = json.loads(_run("info", "--collection", str(indexed), "--json").output)
    assert {k: info["settings"][k] for k in ("mode", "fusion", "weights", "candidates")} == {
        k: res[k] for k in ("mode", "fusion", "weights", "candidates")
    }
    assert info["tuning"]["cv"] == res["cv"]
    monkeypatch.delenv("M3SEARCH_MODEL", raising=False)  # no --model: the collection's own (its defaults are for it)
    ev = _run(
        "eval",
        str(beir),
        "--dtype",
        "float32",
        "--modes",
        "all",
        "--collection",
        str(indexed),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "ev"),
    )
    assert ev.exit_code == 0, ev.output
    assert "tuned" in ev.output and f"mode {res['mode']}" in ev.output
    assert "IN-SAMPLE: tuned on these judged queries" in ev.output  # tuned on what it is scored on: said
    out = _run("tune", "--reset", "--collection", str(indexed), "--json")
    assert out.exit_code == 0 and json.loads(out.output)["mode"] == "all"
    info = json.loads(_run("info", "--collection", str(indexed), "--json").output)
    assert info["tuning"] is None and info["settings"]["weights"] == [0.4, 0.2, 0.4]


def _beir(root: Path, queries: dict[str, str], qrels: list[str], docs=("d1", "d2", "d3")) -> Path:
    root.mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": f"text {d}"}) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in qrels))
    return root


@pytest.mark.parametrize(
    "queries, qrels, folds, message",
    [
        ({"q1": "a", "q2": "b"}, ["q1\td1\t1", "q2\td2\t1"], 5, "2 judged queries are fewer than the 5 folds"),
        ({"q1": "a"}, [], 2, "test.tsv is empty"),
        ({"q1": "a"}, ["q1\tnope\t1"], 2, r"judges 1 document id\(s\) absent from the corpus: \['nope'\]"),
        ({"q9": "a"}, ["q1\td1\t1"], 2, "no judged query of qrels/test.tsv is in"),
        ({"q1": "a", "q2": "b"}, ["q1\td1\t0", "q2\td2\t0"], 2, "has a relevant"),
        ({"q1": "a", "q2": "b"}, ["q1\td1\t1", "q2\td2\t0"], 2, "has 1 query with a relevant .* at least 2$"),
    ],
)
def test_tune_bad_input_names_the_problem(tmp_path, small, tiny_encoder, queries, qrels, folds, message):
    from m3search.tuning import tune

    data = _beir(tmp_path / "beir", queries, qrels)
    with pytest.raises(ValueError, match=message):
        tune(data, collection=small, model=tiny_encoder, folds=folds)
    out = _run("tune", str(data), "--collection", str(small), "--folds", str(folds))
    assert out.exit_code == 1 and "Traceback" not in out.output


def test_tune_split_takes_another_qrels_file(tmp_path, small, tiny_encoder):
    """A BEIR set with only qrels/dev.tsv could not be tuned on (load_beir's split was not exposed)."""
    from m3search.tuning import tune

    data = _beir(tmp_path / "beir", {"q1": "a", "q2": "b"}, ["q1\td1\t1", "q2\td2\t1"])
    (data / "qrels" / "test.tsv").rename(data / "qrels" / "dev.tsv")
    with pytest.raises(ValueError, match="no qrels/test.tsv"):
        tune(data, collection=small, model=tiny_encoder, folds=2, progress=False)
    out = tune(data, collection=small, model=tiny_encoder, folds=2, split="dev", progress=False)
    assert out["split"] == "dev" and out["n_queries"] == 2
    got = _run("tune", str(data), "--collection", str(small), "--folds", "2", "--split", "dev", "--json")
    assert got.exit_code == 0 and json.loads(got.output)["split"] == "dev"


def test_tune_says_it_left_out_queries_without_a_relevant_document(tmp_path, small, tiny_encoder):
    """eval scores a judged query whose grades are all 0 as 0 in its means (BEIR's way); tune leaves it out, and
    said nothing about it: its means were over fewer queries than eval's, silently."""
    from m3search.tuning import tune

    qrels = ["q1\td1\t1", "q2\td2\t1", "q3\td3\t0", "q4\td1\t-1"]
    data = _beir(tmp_path / "beir", {"q1": "a", "q2": "b", "q3": "c", "q4": "d"}, qrels)
    out = tune(data, collection=small, model=tiny_encoder, folds=2, progress=False)
    assert out["n_queries"] == 2 and out["n_queries_without_relevant"] == 2
    assert "over 2 queries" in out["summary"]
    assert "2 judged queries without a relevant document (no grade > 0) left out" in out["summary"]
    assert "m3search eval counts them as 0" in out["summary"]


def test_tune_says_it_left_out_judged_queries_without_a_text(tmp_path, small, tiny_encoder):
    """Judged query ids absent from queries.jsonl were left out of tune's means without a word."""
    from m3search.tuning import tune

    qrels = ["q1\td1\t1", "q2\td2\t1", "q3\td3\t1"]
    data = _beir(tmp_path / "beir", {"q1": "a", "q2": "b"}, qrels)
    out = tune(data, collection=small, model=tiny_encoder, folds=2, progress=False)
    assert out["n_queries"] == 2 and out["n_unqueried"] == 1
    assert "1 judged query id(s) of qrels/test.tsv are not in the queries file ('q3'): left out" in out["summary"]


def test_tune_judged_ids_absent_from_the_collection(tmp_path, small, tiny_encoder):
    from m3search.tuning import tune

    data = _beir(tmp_path / "beir", {"q1": "a", "q2": "b"}, ["q1\tx1\t1", "q2\td2\t1"], docs=("x1", "d2"))
    with pytest.raises(ValueError, match=r"1 of 2 judged document id\(s\) are not in the collection .*\['x1'\]"):
        tune(data, collection=small, model=tiny_encoder, folds=2)


def test_library_entry_point():
    import m3search
    import m3search.tuning

    assert m3search.tune is m3search.tuning.tune and callable(m3search.tune)


def test_tune_measures_against_and_keeps_the_collections_own_defaults(indexed, beir, tiny_encoder, tmp_path):
    """A tune that kept "the defaults" reset a collection's own (tuned or chosen) defaults to the built-in
    ones, and compared the grid with the built-in setting, not with what the collection's searches used."""
    import shutil

    from m3search import Collection
    from m3search.eval import load_beir

    path = tmp_path / "own"
    shutil.copytree(indexed, path)
    own = {"mode": "sparse+colbert", "fusion": "dbsf", "weights": [0.0, 0.3, 0.7], "candidates": 5}
    with Collection.open(path, model=tiny_encoder) as col:
        col.set_search_defaults(own, tuning=None)
        assert col.search_defaults() == own  # a depth below k = 10 is kept as given (it was raised to 10)
        data = load_beir(beir)
        qids = [q for q, rel in data.qrels.items() if any(g > 0 for g in rel.values())]
        hits = col.search_batch([data.queries[q] for q in qids], k=10)
        real = compute_metrics({q: {h.id: h.score for h in hs} for q, hs in zip(qids, hits)}, data.qrels)
    out = tune(beir, collection=path, model=tiny_encoder, save=True, folds=3, progress=False, candidates=(5, 20))
    assert out["default"] == {**own, "weights": [0.0, 0.3, 0.7]}
    assert out["cv"]["default"] == pytest.approx(np.mean([real["per_query"][q]["ndcg@10"] for q in qids]), abs=1e-12)
    with Collection.open(path, model=tiny_encoder) as col:
        kept = {k: out[k] for k in ("mode", "fusion", "weights", "candidates")}
        assert col.search_defaults() == kept
        if not out["adopted"]:
            assert kept == own


def test_pools_are_as_deep_as_the_metric_cuts(indexed, beir, tiny_encoder, monkeypatch):
    """recall@1000 was scored on 400-deep pools while a search returns 1000 per list: every setting
    scored wrong, silently. The pool now covers the cutoff, and a too-shallow cache is an error."""
    from m3search import Collection, tuning
    from m3search.eval import load_beir

    depths = []
    build = tuning.ScoreCache.build.__func__

    def spy(cls, *args, **kwargs):
        depths.append(kwargs["depth"])
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(tuning.ScoreCache, "build", classmethod(spy))
    tune(beir, collection=indexed, model=tiny_encoder, metric="recall@700", folds=3, progress=False)
    assert depths == [700]
    data = load_beir(beir)
    with Collection.open(indexed, model=tiny_encoder) as col:
        qs = dict(list(data.queries.items())[:3])
        cache = ScoreCache.build(col, qs, data.qrels, depth=20)
    with pytest.raises(ValueError, match="recall@30 needs lists of 20 or fewer"):
        evaluate_settings(cache, [Setting("dense", "weighted", (1.0, 0.0, 0.0), 5)], "recall@30")


def test_a_kept_tuning_changes_no_search_and_other_modes_keep_the_creation_defaults(
    beir, tiny_encoder, tmp_path, monkeypatch
):
    """A tune that kept the defaults still wrote a tuning record, after which a request in another mode than the
    stored one got the built-in weights (0.4, 0.2, 0.4) instead of those the collection was created with. Now a
    kept tune changes no search; an adopted one leaves other modes the creation-time fusion and weights; --reset
    restores the creation-time defaults."""
    from m3search import Collection, tuning
    from m3search.eval import load_beir

    data = load_beir(beir)
    path = tmp_path / "own"
    own = {"mode": "all", "fusion": "weighted", "weights": [0.1, 0.9, 0.0], "candidates": 200}
    with Collection.create(path, model=tiny_encoder, weights=own["weights"]) as col:
        col.add(data.doc_texts, ids=data.doc_ids, show_progress=False)
    queries = list(data.queries.values())[:5]

    def searches() -> list:
        with Collection.open(path, model=tiny_encoder) as col:
            return [_ranked(col.search(q, k=8, mode=m)) for q in queries for m in ("dense+sparse", "all", "sparse")]

    before = searches()
    with Collection.open(path, model=tiny_encoder) as col:  # the creation weights are what a request gets
        assert before[0] == _ranked(col.search(queries[0], k=8, mode="dense+sparse", weights=(0.1, 0.9, 0.0)))
        assert before[0] != _ranked(col.search(queries[0], k=8, mode="dense+sparse", weights=(0.4, 0.2, 0.4)))
    monkeypatch.setattr(tuning, "paired_bootstrap", lambda *a, **kw: (-1.0, 1.0))  # nothing beats the defaults
    out = tune(beir, collection=path, model=tiny_encoder, save=True, folds=3, progress=False, candidates=(5, 20))
    assert not out["adopted"] and out["saved"]
    assert searches() == before
    with Collection.open(path, model=tiny_encoder) as col:
        assert col.search_defaults() == own and col.manifest["tuning"]["adopted"] is False
        col.set_search_defaults(TUNED, tuning={"adopted": True})  # as an adopted tune stores it
    with Collection.open(path, model=tiny_encoder) as col:
        assert _ranked(col.search(queries[0], k=8, mode="dense+sparse")) == before[0]
    assert _run("tune", "--reset", "--collection", str(path), "--json").exit_code == 0
    with Collection.open(path, model=tiny_encoder) as col:
        assert col.search_defaults() == own and "tuning" not in col.manifest
    assert searches() == before


@pytest.mark.parametrize(
    "arg, message",
    [
        ({"folds": 1}, "folds must be an integer >= 2, got 1"),
        ({"folds": 2.5}, "folds must be an integer >= 2, got 2.5"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"step": 0}, r"step must be a number in \[0.01, 1\] that divides 1, got 0"),
        ({"step": 1e-300}, r"step must be a number in \[0.01, 1\]"),  # a grid of 1e600 points: it never ended
        ({"step": float("nan")}, "step must be a number"),
        ({"candidates": (0, 50)}, "candidates must be a positive integer, got 0"),
        ({"candidates": (10**6,)}, "candidates=1000000 exceeds the limit of 100000"),
        ({"candidates": 50}, r"candidates must be a list of depths"),  # was "'int' object is not iterable"
    ],
)
def test_tune_refuses_bad_arguments_before_any_work(tmp_path, small, tiny_encoder, monkeypatch, arg, message):
    """Library arguments the CLI does not take were not checked: folds=1 failed after the queries were encoded and
    every pool scored, step=0 as a ZeroDivisionError, a depth of 0 was tuned (and refused only when stored)."""
    import m3search.tuning as tuning

    def opened(*a, **k):
        raise AssertionError("the collection was opened")

    monkeypatch.setattr(tuning, "_open", opened)
    data = _beir(tmp_path / "beir", {"q1": "a", "q2": "b"}, ["q1\td1\t1", "q2\td2\t1"])
    with pytest.raises(ValueError, match=message):
        tuning.tune(data, collection=small, model=tiny_encoder, **{"folds": 2, **arg})


def test_tuning_breaks_ties_by_id_as_the_search_does():
    """The score cache ranked ids as a NumPy string array: "a" and "a\\x00" were equal there (trailing NULs
    dropped), while the search orders them by Python's sort; a tuned tie-break then differed from the search's."""
    ids = ["a\x00", "b", "a"]
    s = {m: np.zeros(3) for m in ("dense", "sparse", "colbert")}
    cache = ScoreCache.from_pools(["q"], [(ids, s)], {"q": {}}, depth=3)
    assert cache.idrank[0].tolist() == np.argsort(order(ids, np.zeros(3))).tolist() == [1, 2, 0]


def test_numpy_depths_tune_as_the_ints_they_hold():
    """Depths checked as integers stayed NumPy's in the grid: a tuned setting then failed json.dumps when stored."""
    grid = settings_grid(0.5, candidates=np.array([50, 100]))
    assert {s.candidates for s in grid} >= {50, 100} and all(type(s.candidates) is int for s in grid)
    json.dumps([s.to_dict() for s in grid])
