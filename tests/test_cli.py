"""The real ``m3search`` console script in subprocesses: index -> search -> delete -> search on cranfield.

Rankings are checked against an exhaustive oracle from the same fp32 tiny model
(dense mode: HNSW is exact below Qdrant's full-scan threshold), so these tests fail
if the CLI mixes up ids, scores, order or deletions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).with_name("m3search")
N_DOCS = 200


def cli(
    *args: str,
    env: dict | None = None,
    timeout: float = 300,
    check: bool = True,
    cwd: Path | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    """Run the installed console script (``python -m m3search`` if it is not installed), ``stdin`` piped in."""
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "m3search"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    full_env.update({"M3SEARCH_DTYPE": "float32", **(env or {})})  # fp32: scores comparable to the oracle
    proc = subprocess.run(
        cmd + list(args), input=stdin, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"m3search {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def one_json(proc: subprocess.CompletedProcess) -> dict:
    """--json promises exactly one JSON object on stdout."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout[:2000]
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_data) -> Path:
    src = demo_data / "corpus.jsonl"
    out = tmp_path_factory.mktemp("cli-corpus") / "corpus.jsonl"
    with open(src, encoding="utf-8") as f:
        out.write_text("".join(next(f) for _ in range(N_DOCS)), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def corpus_texts(corpus) -> tuple[list[str], list[str]]:
    docs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    return [d["_id"] for d in docs], [(d["title"] + " " + d["text"]).strip() for d in docs]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, corpus, tiny_model_path) -> Path:
    """A collection indexed by the CLI (module-shared; tests that change it restore it)."""
    coll = tmp_path_factory.mktemp("cli-coll") / "coll"
    out = one_json(cli("index", str(corpus), "--collection", str(coll), "--model", str(tiny_model_path), "--json"))
    assert out["indexed"] == N_DOCS and out["count"] == N_DOCS and out["via"] == "local"
    return coll


def _dense_oracle(tiny_encoder, corpus_texts, query, collection):
    """Exact dense ranking: each document scores its best window, windows as the collection made them."""
    from helpers import dense_doc_scores

    ids, texts = corpus_texts
    settings = json.loads((Path(collection) / "manifest.json").read_text())["settings"]
    s = dense_doc_scores(tiny_encoder, [query], texts, settings["window"], settings["stride"])[0]
    order = sorted(range(len(ids)), key=lambda i: (-s[i], ids[i]))
    return [ids[i] for i in order], {ids[i]: float(s[i]) for i in order}


def test_index_search_delete_search(indexed, corpus, corpus_texts, tiny_encoder, tiny_model_path):
    query = "pressure distribution on a wing in supersonic flow"
    order, score = _dense_oracle(tiny_encoder, corpus_texts, query, indexed)

    res = one_json(cli("search", query, "--collection", str(indexed), "--mode", "dense", "--k", "5", "--json"))
    hits = res["hits"]
    assert [h["id"] for h in hits] == order[:5]
    for h in hits:
        assert set(h) >= {"id", "score", "scores", "text", "metadata"}
        assert h["score"] == pytest.approx(score[h["id"]], abs=1e-4)
        assert h["scores"]["dense"] == pytest.approx(score[h["id"]], abs=1e-4)
        assert set(h["scores"]) == {"dense", "sparse", "colbert"}
    assert hits[0]["text"] == corpus_texts[1][corpus_texts[0].index(hits[0]["id"])]

    gone = order[:2]
    out = one_json(cli("delete", *gone, "does-not-exist", "--collection", str(indexed), "--json"))
    assert out == {"deleted": gone, "missing": ["does-not-exist"]}
    res = one_json(cli("search", query, "--collection", str(indexed), "--mode", "dense", "--k", "5", "--json"))
    assert [h["id"] for h in res["hits"]] == order[2:7]
    info = one_json(cli("info", "--collection", str(indexed), "--json"))
    assert info["count"] == N_DOCS - 2
    assert info["model"]["identity"] == tiny_encoder.identity
    assert info["served_by"] is None
    disk = info["disk_bytes"]
    assert disk["total"] == sum(v for k, v in disk.items() if k != "total")
    assert disk["colbert"] > disk["dense"] > 0 and disk["sparse"] > 0
    text = cli("info", "-c", str(indexed)).stdout
    assert "identity:" in text and "disk_bytes:" in text

    # restore the two documents from a source holding them (index upserts into the existing collection)
    lines = corpus.read_text(encoding="utf-8").splitlines()
    back = corpus.parent / "back.jsonl"
    back.write_text("\n".join(ln for ln in lines if json.loads(ln)["_id"] in gone) + "\n", encoding="utf-8")
    out = one_json(cli("index", str(back), "--collection", str(indexed), "--json"))
    assert out["indexed"] == 2 and out["count"] == N_DOCS


def test_search_exact_reaches_the_collection(indexed, corpus_texts, tiny_encoder, monkeypatch):
    """`m3search search` had no --exact, which Collection.search has (a full scan for the dense candidates)."""
    from click.testing import CliRunner
    from integration_helpers import exact_seen

    from m3search import Collection
    from m3search.cli import main

    seen = exact_seen(monkeypatch, Collection)
    query = "pressure distribution on a wing in supersonic flow"
    order, _ = _dense_oracle(tiny_encoder, corpus_texts, query, indexed)
    for flag in (["--exact"], []):
        args = ["search", query, "-c", str(indexed), "--mode", "dense", "-k", "5", "--json", *flag]
        result = CliRunner().invoke(main, args, env={"M3SEARCH_DTYPE": "float32"})
        assert result.exit_code == 0, result.output
        assert [h["id"] for h in json.loads(result.stdout)["hits"]] == order[:5]
    assert seen == [True, False]


def test_search_fusion_in_any_case_as_the_library_takes_it(tmp_path, tiny_encoder, tiny_model_path):
    """`search --fusion RRF` was a usage error (click's case-sensitive choice) while `--mode Dense` is taken."""
    from click.testing import CliRunner

    from m3search import Collection
    from m3search.cli import main

    path = tmp_path / "c"
    with Collection.create(path, model=tiny_encoder) as col:
        col.add([f"document {i} about pumps and {w}" for i, w in enumerate(["valves", "flow", "heat"] * 3)])
    base = ["search", "pumps and heat", "-c", str(path), "-m", str(tiny_model_path), "-k", "4", "--json"]

    def hits(*args: str) -> list:
        result = CliRunner().invoke(main, [*base, *args], env={"M3SEARCH_DTYPE": "float32"})
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["hits"]

    for fusion in ("rrf", "dbsf"):
        assert hits("--fusion", fusion.upper()) == hits("--fusion", fusion) != hits()
    result = CliRunner().invoke(main, [*base, "--fusion", "max"])
    assert result.exit_code == 2 and all(name in result.output for name in ("weighted", "rrf", "dbsf"))


def test_search_group_passage(tmp_path, corpus, tiny_encoder, tiny_model_path):
    """``--group passage`` returns the library's passage hits (the CLI had no way to ask for them); the terminal
    shows each passage with its characters in the document (it printed a long document's window slice of the
    passage's own text instead)."""
    from m3search import Collection

    coll = tmp_path / "coll"
    cli("index", str(corpus), "-c", str(coll), "-m", str(tiny_model_path), "--window", "32", "--stride", "24")
    query = "pressure distribution on a wing in supersonic flow"
    args = ("search", query, "-c", str(coll), "--mode", "dense", "-k", "6", "--group", "passage")
    got = one_json(cli(*args, "--json"))["hits"]
    with Collection.open(coll, model=tiny_encoder) as col:
        want = [h.to_dict() for h in col.search(query, k=6, mode="dense", group="passage")]
        docs = {r.id: r.text for r in col.get([h["id"] for h in want])}
    assert [(h["id"], h["window"]) for h in got] == [(h["id"], h["window"]) for h in want]
    assert [h["text"] for h in got] == [h["text"] for h in want]
    assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-5)
    assert len({h["id"] for h in want}) < len(want) or any(h["window"]["start"] > 0 for h in want)  # windows, really
    text = cli(*args).stdout
    for h in want:
        w = h["window"]
        assert h["text"] == docs[h["id"]][w["start"] : w["end"]]
        assert f"(chars {w['start']}-{w['end']})" in text
        assert "[" + " ".join(h["text"].split())[:20] in text


@pytest.mark.heavy
def test_reindex_upserts_and_text_output(indexed, corpus, corpus_texts, tiny_encoder):
    query = "pressure distribution on a wing in supersonic flow"
    order, _ = _dense_oracle(tiny_encoder, corpus_texts, query, indexed)
    cli("delete", *order[:2], "-c", str(indexed))
    # re-running index on the same source upserts: deleted documents come back, nothing doubles
    out = one_json(cli("index", str(corpus), "--collection", str(indexed), "--json"))
    assert out["indexed"] == N_DOCS and out["count"] == N_DOCS
    res = one_json(cli("search", query, "--collection", str(indexed), "--mode", "dense", "--k", "5", "--json"))
    assert [h["id"] for h in res["hits"]] == order[:5]
    # default mode `all`, weighted: score = 0.4 d + 0.2 s + 0.4 c of the reported per-mode scores
    res_all = one_json(cli("search", query, "-c", str(indexed), "--json"))["hits"]
    assert len(res_all) == 10
    for h in res_all:
        s = h["scores"]
        assert h["score"] == pytest.approx(0.4 * s["dense"] + 0.2 * s["sparse"] + 0.4 * s["colbert"], abs=1e-5)
    assert [h["score"] for h in res_all] == sorted((h["score"] for h in res_all), reverse=True)
    proc = cli("search", "boundary layer", "-c", str(indexed), "-k", "3")
    lines = proc.stdout.splitlines()
    assert lines[0].lstrip().startswith("1.") and "dense" in lines[0] and "colbert" in lines[0]
    assert sum(1 for ln in lines if ln.lstrip()[:2] in ("1.", "2.", "3.")) == 3


def test_explain_is_an_aligned_table_at_100_columns(indexed):
    """The terminal form of --explain carries the same numbers as --json, laid out for people."""
    query = "boundary layer transition on a flat plate"
    args = ("search", query, "-c", str(indexed), "-k", "3", "--explain")
    full = one_json(cli(*args, "--json"))["hits"]
    lines = cli(*args).stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 100
    assert not any(ln.lstrip().startswith(("{", "explain:")) for ln in lines)  # no raw JSON
    heads = [i for i, ln in enumerate(lines) if ln[:5].strip().rstrip(".").isdigit()]
    assert len(heads) == 3
    for n, (hit, start) in enumerate(zip(full, heads)):
        block = lines[start : heads[n + 1] if n + 1 < len(heads) else len(lines)]
        assert str(hit["id"]) in block[0] and f"{hit['score']:.4f}" in block[0]
        ex = hit["explain"]
        header = next(i for i, ln in enumerate(block) if ln.split()[:2] == ["mode", "score"])
        ends = [m.end() for m in re.finditer(r"\S+", block[header])][1:]  # right edges of the columns
        for row, mode in zip(block[header + 1 :], ex["modes"]):
            assert row.split() == [
                mode,
                f"{hit['scores'][mode]:.4f}",
                f"{ex['weights'][mode]:.2f}",
                f"{ex['contributions'][mode]:.4f}",
                str(ex["ranks"][mode]),
            ]
            assert [m.end() for m in re.finditer(r"\S+", row)][1:] == ends  # right-aligned under the headers
        assert block[header + 1 + len(ex["modes"])].split() == ["fused", f"{hit['score']:.4f}"]
        tokens = ex["matched_tokens"]
        if tokens:
            n = min(len(tokens), 8)  # the block ends with n token rows, then "... more" if any
            rows = block[len(block) - n - (len(tokens) > 8) :][:n]
            shown = [ln.split()[-3:] for ln in rows]
            want = [[f"{t['query_weight']:.4f}", f"{t['doc_weight']:.4f}", f"{t['product']:.4f}"] for t in tokens]
            assert shown == want[:8]
            assert any(f"{len(tokens) - 8} more" in ln for ln in block) == (len(tokens) > 8)
        else:
            assert any("no lexical" in ln for ln in block)


def test_format_hit_clips_long_fields_to_the_width():
    from m3search.cli import format_hit

    hit = {
        "id": "x" * 150,
        "score": 0.5,
        "scores": {"dense": 0.5, "sparse": 0.0, "colbert": 0.5},
        "text": "word " * 100,
        "metadata": {"k": "v" * 200},
        "explain": {
            "fusion": "rrf",
            "modes": ["dense", "colbert"],
            "weights": {"dense": 1.0, "colbert": 1.0},
            "contributions": {"dense": 1 / 61, "colbert": 1 / 62},
            "ranks": {"dense": 1, "colbert": 2},
            "candidates": 400,
            "found_by": ["dense"],
            "matched_tokens": [
                {"token": "▁" + "t" * 40, "token_id": 5, "query_weight": 0.1, "doc_weight": 0.2, "product": 0.02}
            ]
            * 10,
        },
    }
    lines = format_hit(12, hit)
    assert max(map(len, lines)) <= 100
    assert lines[0].startswith(" 12. 0.5000  xxx") and lines[0].endswith(
        "...  dense 0.5000  sparse 0.0000  colbert 0.5000"
    )
    assert (
        len(lines[1]) == 100
        and lines[1].endswith("...")
        and lines[2].startswith("     metadata: ")
        and lines[2].endswith("vvv...")
    )
    assert any("2 more (--json lists all)" in ln for ln in lines)
    assert max(map(len, format_hit(1, hit, width=80))) <= 80


def test_offline_without_a_model_says_what_to_set(tmp_path, corpus):
    """No hub and no local model: one line that names M3SEARCH_MODEL; nothing is created."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = cli("index", str(corpus), "-c", str(tmp_path / "coll"), env=env, check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "BAAI/bge-m3" in proc.stderr and "set M3SEARCH_MODEL=/path/to/bge-m3" in proc.stderr
    assert not (tmp_path / "coll").exists()


@pytest.mark.heavy
def test_explain_and_filters_from_csv(tmp_path, tiny_model_path):
    src = tmp_path / "products.csv"
    src.write_text(
        "id,text,brand,price\n"
        "p1,Stainless steel water pump model X200,acme,120\n"
        "p2,Cast iron water pump model X200 for wells,bolt,80\n"
        "p3,Garden hose with brass fittings,acme,25\n",
        encoding="utf-8",
    )
    coll = tmp_path / "coll"
    cli("index", str(src), "-c", str(coll), "-m", str(tiny_model_path))
    res = one_json(cli("search", "water pump X200", "-c", str(coll), "--filter", '{"brand": "acme"}', "--json"))
    assert {h["id"] for h in res["hits"]} == {"p1", "p3"}
    assert all(h["metadata"]["brand"] == "acme" for h in res["hits"])
    res = one_json(cli("search", "pump", "-c", str(coll), "--filter", '{"price": {"lt": 100}}', "--json"))
    assert {h["id"] for h in res["hits"]} == {"p2", "p3"}
    fpath = tmp_path / "f.json"
    fpath.write_text('{"or": [{"brand": "bolt"}, {"price": {"gte": 100}}]}')
    res = one_json(cli("search", "pump", "-c", str(coll), "--filter", f"@{fpath}", "--explain", "--json"))
    assert {h["id"] for h in res["hits"]} == {"p1", "p2"}
    ex = res["hits"][0]["explain"]
    assert set(ex["contributions"]) == {"dense", "sparse", "colbert"}
    assert sum(ex["contributions"].values()) == pytest.approx(res["hits"][0]["score"], abs=1e-5)
    assert any(t["token"].strip() for t in ex["matched_tokens"])
    # rrf with explicit weights and candidates
    res = one_json(
        cli(
            "search",
            "pump",
            "-c",
            str(coll),
            "--fusion",
            "rrf",
            "--weights",
            "1,1,0",
            "--candidates",
            "50",
            "--mode",
            "dense+sparse",
            "--json",
        )
    )
    assert len(res["hits"]) == 3


@pytest.mark.heavy
def test_folder_source_ids_are_paths(tmp_path, tiny_model_path):
    docs = tmp_path / "docs"
    (docs / "guides").mkdir(parents=True)
    (docs / "readme.md").write_text("# Intro\nHybrid retrieval with dense and sparse vectors.")
    (docs / "guides" / "install.txt").write_text("Install the package with pip.")
    coll = tmp_path / "coll"
    out = one_json(cli("index", str(docs), "-c", str(coll), "-m", str(tiny_model_path), "--json"))
    assert out["count"] == 2
    hits = one_json(cli("search", "Install the package with pip.", "-c", str(coll), "--mode", "sparse", "--json"))[
        "hits"
    ]
    assert hits[0]["id"] == "guides/install.txt"
    assert {h["id"] for h in hits} <= {"guides/install.txt", "readme.md"}


def test_truncation_is_one_warning_line_per_file(tmp_path, tiny_model_path):
    """Long documents across several write batches: one summary line, no Python warning form."""
    src = tmp_path / "long.jsonl"
    lines = [json.dumps({"id": str(i), "text": "hypersonic flow " * (2000 if i % 2 else 3)}) for i in range(5)]
    src.write_text("\n".join(lines) + "\n")
    for cap, line in (
        ("1", "Warning: 2 of 5 documents exceeded max_length=512 tokens; only their first tokens are indexed"),
        ("3", "Warning: 2 of 5 documents exceeded max_windows=3 windows; only their first windows are indexed"),
    ):
        coll = tmp_path / f"coll-{cap}"
        args = ("-c", str(coll), "-m", str(tiny_model_path), "--batch-size", "2", "--max-windows", cap, "--json")
        proc = cli("index", str(src), *args)
        assert one_json(proc)["count"] == 5
        warned = [ln for ln in proc.stderr.splitlines() if "exceeded max_" in ln]
        assert warned == [line]
        assert "TruncationWarning" not in proc.stderr
    proc = cli(
        "index", str(src), "-c", str(tmp_path / "coll-1"), "-m", str(tiny_model_path), "--max-windows", "2", check=False
    )
    assert proc.returncode == 2 and "exists with max_windows=1" in proc.stderr
    # one window shorter than max_length: the window cut them, and the line says so (it said max_length=64)
    args = ("-c", str(tmp_path / "coll-w"), "-m", str(tiny_model_path), "--window", "64", "--max-windows", "1")
    proc = cli("index", str(src), *args)
    assert "Warning: 2 of 5 documents exceeded window=64 tokens; only their first tokens are indexed" in proc.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["search", "x", "-c", "<missing>"], 1, "no collection at"),
        (["search", "x", "-c", "<coll>", "--weights", "1,2"], 2, "Invalid value for '--weights'"),
        (["search", "x", "-c", "<coll>", "--filter", "{bad"], 2, "Invalid value for '--filter'"),
        (
            ["search", "x", "-c", "<coll>", "--filter", '{"a": {"near": 1}}'],
            2,
            "'--filter': filter.a: unknown operator",
        ),
        (["search", "x", "-c", "<coll>", "--mode", "fuzzy"], 2, "Invalid value for '--mode'"),
        (["search", "x", "-c", "<coll>", "--filter", "@<latin1>"], 2, "is not UTF-8 text"),
        (["search", "   ", "-c", "<coll>"], 1, "query is empty"),
        (["search", "x", "-c", "<coll>", "--k", "0"], 2, "Invalid value for '--k'"),
        (["search", "x", "-c", "<coll>", "--k", "20000"], 2, "'--k' / '-k': k=20000 exceeds the limit of 10000"),
        (["search", "x", "-c", "<coll>", "--candidates", "200000"], 2, "'--candidates': candidates=200000 exceeds"),
        (["eval", "<empty>", "--modes", "dense,foo"], 2, "Invalid value for '--modes': unknown mode(s) ['foo']"),
        (["eval", "<empty>", "--k", "20000"], 2, "Invalid value for '--k' / '-k': k=20000 exceeds the limit"),
        (["tune", "<empty>", "--metric", "foo"], 2, "Invalid value for '--metric': unknown metric 'foo'"),
        (["index", "<empty>/nope.parquet", "-c", "<coll>"], 2, "does not exist"),
        (["index", "<bad_jsonl>", "-c", "<coll>"], 1, "bad.jsonl:2: invalid JSON"),
        (["search", "x", "-c", "<coll>", "-m", "<other_model>"], 1, "identity"),
        (["eval", "<empty>", "-m", "<model>"], 1, "not a BEIR folder"),
    ],
)
def test_errors_are_one_line_without_traceback(
    args, code, message, indexed, tmp_path, tiny_model_path, tiny_alt_model_path
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "1", "text": "a"}\n{"_id": \n')
    (tmp_path / "f.json").write_bytes(b'{"a": "caf\xe9"}')
    (tmp_path / "empty").mkdir()
    fill = {
        "<missing>": tmp_path / "none",
        "<coll>": indexed,
        "<empty>": tmp_path / "empty",
        "<bad_jsonl>": bad,
        "<other_model>": tiny_alt_model_path,
        "<model>": tiny_model_path,
        "<latin1>": tmp_path / "f.json",
    }
    for key, value in fill.items():
        args = [a.replace(key, str(value)) for a in args]
    proc = cli(*args, check=False)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_gzipped_source_indexes_as_the_plain_one_and_a_truncated_one_writes_nothing(
    tmp_path, corpus, corpus_texts, tiny_model_path
):
    """`m3search index corpus.jsonl.gz` said "unknown file type '.gz'"; a damaged .gz must fail in the check pass,
    naming the file, before the first write (gzip meets truncation only when a read reaches it)."""
    import gzip

    n = 20
    packed = tmp_path / "corpus.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(corpus.read_text(encoding="utf-8").splitlines(True)[:n]).encode()))
    coll = tmp_path / "coll"
    out = one_json(cli("index", str(packed), "-c", str(coll), "-m", str(tiny_model_path), "--json"))
    assert out["indexed"] == n == out["count"]
    hits = one_json(cli("search", "wing", "-c", str(coll), "--mode", "dense", "-k", str(n), "--json"))["hits"]
    assert {h["id"]: h["text"] for h in hits} == dict(zip(corpus_texts[0][:n], corpus_texts[1][:n]))
    # other ids, cut half-way: refused before any write, into the existing collection and into a new one
    other = "".join(json.dumps({"_id": f"new{i}", "text": f"text {i}"}) + "\n" for i in range(2000)).encode()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(other)[:-100])
    for target in (coll, tmp_path / "fresh"):
        proc = cli("index", str(cut), "-c", str(target), "-m", str(tiny_model_path), check=False)
        assert proc.returncode == 1 and "Error: cut.jsonl.gz: not a valid gzip file (" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert one_json(cli("info", "-c", str(coll), "--json"))["count"] == n
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(("debug", "traceback"), [("0", False), ("false", False), ("", False), ("1", True)])
def test_m3search_debug_0_keeps_the_one_line_error(tmp_path, debug, traceback):
    """``M3SEARCH_DEBUG=1`` shows the traceback; ``=0`` (or false) did too: any non-empty value counted."""
    proc = cli("info", "-c", str(tmp_path / "none"), env={"M3SEARCH_DEBUG": debug}, check=False)
    assert proc.returncode == 1 and ("Traceback" in proc.stderr) == traceback, proc.stderr
    assert traceback or proc.stderr.splitlines() == [f"Error: no collection at {tmp_path / 'none'} (no manifest.json)"]


def test_a_model_mismatch_from_the_environment_names_it(indexed, tiny_alt_model_path):
    """Another model given by M3SEARCH_MODEL (the --model option's variable) was refused saying to open the
    collection with "no --model", which the command had not passed."""
    proc = cli("search", "x", "-c", str(indexed), env={"M3SEARCH_MODEL": str(tiny_alt_model_path)}, check=False)
    assert proc.returncode == 1 and "identity" in proc.stderr and "M3SEARCH_MODEL" in proc.stderr, proc.stderr


def test_serve_help_shows_the_servers_defaults():
    """``serve --max-queue``'s help said "[default: the server's, shown under limits by GET /info]", not the number,
    and the other limits' defaults were the server's numbers written again in the CLI. Every serve option with a
    default shows it, and it is the one the server takes (``Settings``: one definition of each, in ``plan``)."""
    pytest.importorskip("fastapi")
    from click.testing import CliRunner

    from m3search.cli import main
    from m3search.server import Settings

    options = {p.opts[-1]: p for p in main.commands["serve"].params if p.name != "help"}
    settings = Settings()
    assert options["--max-batch"].default == settings.max_batch
    assert options["--max-body-mb"].default * 2**20 == settings.max_body_bytes
    assert options["--max-queue"].default == settings.max_queue
    assert options["--timeout"].default == settings.search_timeout
    assert [n for n, p in options.items() if p.default is not None and not p.show_default] == []
    shown = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    assert f"default: {settings.max_queue};" in shown and "the server's" not in shown


def test_serve_settings_are_the_factorys_flag_over_variable_over_default(tmp_path, monkeypatch):
    """``serve`` read its variables itself (click's ``envvar``, ``M3SEARCH_MAX_BODY_BYTES`` by hand) beside
    ``Settings.from_env``, which ``uvicorn --factory`` serves: one reading of them now, the order kept. For every
    setting ``serve`` takes, a flag given wins over its variable and a variable over the default; with variables
    alone ``serve`` serves the factory's settings; a variable its setting cannot take is a usage error naming it
    (exit code 2), and is not read where the flag is given."""
    pytest.importorskip("fastapi")
    from click.testing import CliRunner

    import m3search.collection
    import m3search.server
    from m3search.cli import main
    from m3search.server import Settings

    served: list = []
    monkeypatch.setattr(m3search.server, "serve", lambda settings, **kwargs: served.append(settings) or True)
    monkeypatch.setattr(m3search.collection.Collection, "exists", classmethod(lambda cls, path: True))
    names = ("collection", "model", "device", "dtype", "api_key", "max_batch", "max_body_bytes", "max_queue")
    env = dict(zip([f"M3SEARCH_{n.upper()}" for n in names], [str(tmp_path / "e"), "em", "cpu", "float32", "ek"]))
    env |= {"M3SEARCH_MAX_BATCH": "7", "M3SEARCH_MAX_BODY_BYTES": "12345", "M3SEARCH_MAX_QUEUE": "99"}
    flags = ["-c", str(tmp_path / "f"), "-m", "fm", "--device", "cuda:1", "--dtype", "bfloat16", "--api-key", "fk"]
    flags += ["--max-batch", "8", "--max-body-mb", "0.5", "--max-queue", "100", "--timeout", "5"]
    unset = dict.fromkeys(env)

    def serve(args: list[str], variables: dict) -> Settings:
        result = CliRunner().invoke(main, ["serve", *args], env={**unset, **variables})
        assert result.exit_code == 0, result.output
        return served[-1]

    assert serve([], {}) == Settings(model="BAAI/bge-m3")
    from_variables = serve([], env)
    with monkeypatch.context() as variables:
        for name, value in env.items():
            variables.setenv(name, value)
        assert from_variables == Settings.from_env()
    assert [getattr(from_variables, n) for n in names] == [*list(env.values())[:5], 7, 12345, 99]
    from_flags = serve(flags, env)
    assert [getattr(from_flags, n) for n in (*names, "search_timeout")] == [
        *flags[1:10:2],
        8,
        2**19,
        100,
        5,
    ]
    for name in ("M3SEARCH_MAX_BATCH", "M3SEARCH_MAX_BODY_BYTES", "M3SEARCH_MAX_QUEUE"):
        for bad in ("0", "0.5", "x"):
            result = CliRunner().invoke(main, ["serve", "-m", "m"], env={**unset, name: bad})
            assert result.exit_code == 2 and f"{name}: {bad!r} is not a positive integer" in result.output
    assert serve(flags, {**env, "M3SEARCH_MAX_BATCH": "x", "M3SEARCH_MAX_BODY_BYTES": "x"}) == from_flags


def test_serve_max_k_is_an_option_and_a_variable(monkeypatch):
    """The server's largest k (``Settings.max_k``) could be set only in code: ``serve`` had no option for it and
    ``uvicorn --factory`` no variable. ``--max-k`` wins over ``M3SEARCH_MAX_K``, which wins over the default; a
    value that is not from 1 to ``MAX_K`` (above it no search asks: 400 before the server's 413) is refused,
    naming the option or the variable."""
    pytest.importorskip("fastapi")
    from click.testing import CliRunner

    import m3search.server
    from m3search.cli import main
    from m3search.plan import DEFAULT_SERVER_MAX_K, MAX_K
    from m3search.server import Settings

    for name in ("M3SEARCH_COLLECTION", "M3SEARCH_MAX_K"):
        monkeypatch.delenv(name, raising=False)
    served: list = []
    monkeypatch.setattr(m3search.server, "serve", lambda settings, **kwargs: served.append(settings) or True)
    for args, env, want in (([], {}, DEFAULT_SERVER_MAX_K), ([], {"M3SEARCH_MAX_K": "50"}, 50)):
        assert CliRunner().invoke(main, ["serve", "-m", "m", *args], env=env).exit_code == 0
        assert served[-1].max_k == want
    result = CliRunner().invoke(main, ["serve", "-m", "m", "--max-k", "60"], env={"M3SEARCH_MAX_K": "50"})
    assert result.exit_code == 0 and served[-1].max_k == 60
    monkeypatch.setenv("M3SEARCH_MAX_K", "70")
    assert Settings.from_env().max_k == 70  # what `uvicorn --factory` serves
    monkeypatch.delenv("M3SEARCH_MAX_K")
    for bad in ("0", "-1", str(MAX_K + 1), "x"):
        result = CliRunner().invoke(main, ["serve", "-m", "m", "--max-k", bad])
        assert result.exit_code == 2 and "Invalid value for '--max-k'" in result.output, result.output
        result = CliRunner().invoke(main, ["serve", "-m", "m"], env={"M3SEARCH_MAX_K": bad})
        assert result.exit_code == 2 and f"M3SEARCH_MAX_K: {bad!r} is " in result.output, result.output
    with pytest.raises(ValueError, match=f"max_k is over {MAX_K}"):
        Settings(max_k=MAX_K + 1).check()
    assert len(served) == 3


@pytest.fixture
def serve_settings(monkeypatch) -> list:
    """``m3search serve``'s settings, one per run, none served; no ``M3SEARCH_*`` variable of serve's set."""
    pytest.importorskip("fastapi")
    import m3search.server

    for name in ("COLLECTION", "API_KEY", "DTYPE", "DEVICE", "SEARCH_TIMEOUT", "REQUEST_TIMEOUT"):
        monkeypatch.delenv(f"M3SEARCH_{name}", raising=False)
    served: list = []
    monkeypatch.setattr(m3search.server, "serve", lambda settings, **kwargs: served.append(settings) or True)
    return served


def _serve(*args: str, env: dict | None = None) -> Any:
    from click.testing import CliRunner

    from m3search.cli import main

    return CliRunner().invoke(main, ["serve", "-m", "m", *args], env=env)


@pytest.mark.parametrize(
    "option, variable, name",
    [
        ("--timeout", "M3SEARCH_SEARCH_TIMEOUT", "search_timeout"),
        ("--request-timeout", "M3SEARCH_REQUEST_TIMEOUT", "request_timeout"),
    ],
)
def test_serve_time_limits_are_options_and_variables(serve_settings, monkeypatch, option, variable, name):
    """``serve --timeout`` (``Settings.search_timeout``) had no variable, so ``uvicorn --factory`` could not set it;
    ``Settings.request_timeout`` (seconds a request may wait for its encoding to start) could be set in code only.
    Each time limit is read as the other limits are: the flag over the variable (a bad one unread there), the
    variable over the default; a value the server cannot take is a usage error naming the option or the variable.
    The time limits given in code follow that rule too (an infinite one passed ``check``)."""
    import math

    from m3search.server import EnvironmentSettingError, Settings

    assert _serve().exit_code == 0 and getattr(serve_settings[-1], name) == getattr(Settings(), name)
    assert _serve(env={variable: "2.5"}).exit_code == 0
    assert getattr(serve_settings[-1], name) == 2.5
    assert _serve(option, "4", env={variable: "x"}).exit_code == 0
    assert getattr(serve_settings[-1], name) == 4
    monkeypatch.setenv(variable, "7")
    assert getattr(Settings.from_env(), name) == 7  # what `uvicorn --factory` serves
    for bad in ("0", "-1", "nan", "inf", "1e999", "1e12", "x"):
        monkeypatch.setenv(variable, bad)
        said = f"{variable}: {bad!r} is not a number of seconds > 0"
        with pytest.raises(EnvironmentSettingError, match=re.escape(said)):
            Settings.from_env()
        result = _serve()
        assert result.exit_code == 2 and said in result.output, result.output
        monkeypatch.delenv(variable)
        result = _serve(option, bad)
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    with pytest.raises(ValueError, match=f"{name} is not a number of seconds > 0"):
        Settings(**{name: math.inf}).check()
    assert len(serve_settings) == 3


def test_serve_time_limits_over_the_batchers_bound_are_usage_errors(serve_settings):
    """The options take what the server's settings take (one rule, the batcher's): a time limit over its bound is a
    usage error naming the option, not a ValueError of the settings naming ``search_timeout`` (exit code 1)."""
    for option in ("--timeout", "--request-timeout"):
        result = _serve(option, "1e12")
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{option}': 1e+12 is not a number of seconds > 0 and at most" in result.output
    assert serve_settings == []


def test_dtype_names_are_the_encoders_everywhere(serve_settings, monkeypatch):
    """``--dtype`` refused ``fp32``, ``bf16`` and ``fp16``, which the encoder takes, and ``Settings.from_env`` did not
    check ``M3SEARCH_DTYPE``: a bad one under ``uvicorn --factory`` failed only as the model loaded. One list now
    (``plan.ENCODER_DTYPES``): the CLI takes exactly the names the encoder takes; ``from_env`` refuses any other
    naming the variable; a short name goes on as torch's (the name a server reports, which the CLI compares)."""
    pytest.importorskip("torch")
    from m3search.cli import main
    from m3search.encoder import resolve_device_dtype
    from m3search.server import EnvironmentSettingError, Settings

    choices = {name: p.type.choices for name, c in main.commands.items() for p in c.params if p.name == "dtype"}
    assert len(choices) >= 5
    tried = {"auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half", "float64", "FP32", "float", ""}
    for name in tried:
        try:
            resolve_device_dtype("cpu", name)
            takes = True
        except ValueError:
            takes = False
        assert {command: name in names for command, names in choices.items()} == dict.fromkeys(choices, takes), name
    assert _serve("--dtype", "bf16").exit_code == 0 and serve_settings[-1].dtype == "bfloat16"
    monkeypatch.setenv("M3SEARCH_DTYPE", "fp16")
    assert Settings.from_env().dtype == "float16"
    monkeypatch.setenv("M3SEARCH_DTYPE", "half")
    with pytest.raises(EnvironmentSettingError, match="M3SEARCH_DTYPE: dtype must be one of auto, float32, fp32"):
        Settings.from_env()


def test_device_names_are_checked_where_they_are_set(serve_settings, monkeypatch, tmp_path):
    """``--device gpu`` / ``M3SEARCH_DEVICE=gpu`` was found only when the model loaded (``serve``: exit 1 after
    start-up; ``search``: "no collection" first, the device never named; ``uvicorn --factory``: at load). One rule
    (``plan.check_device``, no torch import) refuses it where it is set, naming the option or the variable, and
    takes exactly the names the encoder takes (whether this machine has that CUDA device stays the encoder's)."""
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from m3search.cli import main
    from m3search.encoder import DeviceError, resolve_device_dtype
    from m3search.plan import check_device
    from m3search.server import EnvironmentSettingError, Settings

    names = ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "cpu:0", "cuda:00", "cuda:-1", "gpu", "cuda:x", "meta", "mps")
    for name in (*names, "CUDA", "", " cpu"):
        try:  # the encoder runs on torch's CPU and CUDA devices
            torch_takes = name == "auto" or torch.device(name).type in ("cpu", "cuda")
        except (RuntimeError, TypeError):
            torch_takes = False
        try:
            check_device(name)
            takes = True
        except ValueError:
            takes = False
        assert takes == torch_takes, name
        if not takes:
            with pytest.raises(DeviceError, match=f"device {name!r} is not supported"):
                resolve_device_dtype(name, "float32")
    said = "Invalid value for '--device' (env var: 'M3SEARCH_DEVICE'): device 'gpu' is not supported"
    result = CliRunner().invoke(main, ["search", "x", "-c", str(tmp_path / "none")], env={"M3SEARCH_DEVICE": "gpu"})
    assert result.exit_code == 2 and said in result.output, result.output
    result = _serve("--device", "cuda:x")
    assert result.exit_code == 2 and "Invalid value for '--device'" in result.output, result.output
    assert serve_settings == []
    monkeypatch.setenv("M3SEARCH_DEVICE", "gpu")
    with pytest.raises(EnvironmentSettingError, match="M3SEARCH_DEVICE: device 'gpu' is not supported"):
        Settings.from_env()
    with pytest.raises(ValueError, match="device 'cuda:00' is not supported"):
        Settings(device="cuda:00").check()  # create_app's check, for settings made in code


def test_serve_api_key_no_client_can_send_is_a_usage_error(serve_settings):
    """``serve --api-key ""`` exited 1 (the server's check of its settings, after click's), where a bad option value
    is a usage error naming the option (exit 2); a blank key or one no HTTP header carries alike. The same value of
    ``M3SEARCH_API_KEY`` exited 1 naming nothing: now a usage error naming it (the key not written out), unread where
    the flag is given. An empty variable is no key, as before."""
    for bad in ("", " ", "sécret", "a\nb"):
        result = _serve("--api-key", bad)
        assert result.exit_code == 2 and "Invalid value for '--api-key'" in result.output, bad
        assert "): the API key must" in result.output, result.output
    for bad in (" ", "sécret"):
        result = _serve(env={"M3SEARCH_API_KEY": bad})
        said = "Invalid value for '--api-key' (env var: 'M3SEARCH_API_KEY'): the API key must"
        assert result.exit_code == 2 and said in result.output, result.output
        assert "sécret" not in result.output
    assert _serve("--api-key", "k", env={"M3SEARCH_API_KEY": " "}).exit_code == 0
    assert _serve(env={"M3SEARCH_API_KEY": ""}).exit_code == 0
    assert [s.api_key for s in serve_settings] == ["k", None]


def test_a_client_commands_api_key_no_server_can_take_is_a_usage_error(tmp_path):
    """``search`` / ``info`` / ``delete`` / ``index --api-key " "`` (or the variable) sent ``Authorization: Bearer  ``
    to a served collection, and a key no HTTP header carries failed inside httpx: refused as ``serve`` refuses it
    (exit 2, naming the option or its variable; the key not written out), before anything is opened. The Python
    client refuses it too."""
    from click.testing import CliRunner

    from m3search.cli import main
    from m3search.client import M3SearchClient

    where = str(tmp_path / "c")
    (tmp_path / "docs.jsonl").write_text('{"id": "a", "text": "t"}\n')
    commands = (["search", "q"], ["info"], ["delete", "x"], ["index", str(tmp_path / "docs.jsonl")])
    for command in commands:
        for bad in (" ", "sécret"):
            for args, env in (
                ([*command, "-c", where, "--api-key", bad], {}),
                ([*command, "-c", where], {"M3SEARCH_API_KEY": bad}),
            ):
                result = CliRunner().invoke(main, args, env=env)
                assert result.exit_code == 2 and "Invalid value for '--api-key'" in result.output, (args, result.output)
                assert "the API key must" in result.output and "sécret" not in result.output
    assert CliRunner().invoke(main, ["info", "-c", where], env={"M3SEARCH_API_KEY": ""}).exit_code == 1  # no key
    with pytest.raises(ValueError, match="the API key must not be empty"):
        M3SearchClient("http://127.0.0.1:9", api_key=" ")


def test_help_is_fast_and_lazy():
    code = (
        "import sys; from click.testing import CliRunner; from m3search.cli import main\n"
        "for cmd in ([], ['index'], ['search'], ['serve'], ['eval'], ['info'], ['delete'], ['migrate']):\n"
        "    r = CliRunner().invoke(main, cmd + ['--help']); assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'qdrant_edge', 'pytrec_eval', 'matplotlib') if m in sys.modules]\n"
        "print(heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    t0 = time.perf_counter()
    proc = cli("--help")
    assert time.perf_counter() - t0 < 5
    for command in ("index", "search", "serve", "eval", "info", "delete"):
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "m3search", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "0.1.0" in proc.stdout


HOLD = """
import sys, time
from m3search import Collection
c = Collection.open(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def _holding(collection: Path):
    """Another process holds ``collection`` (opened, its lock taken) while the block runs; yields that process."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(collection)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait(10)


def test_collection_in_use_by_another_process(indexed, corpus):
    with _holding(indexed) as holder:
        for args in (["search", "x"], ["info"], ["delete", "1"], ["index", str(corpus)]):
            proc = cli(*args, "-c", str(indexed), check=False)
            assert proc.returncode == 1
            assert f"in use by process {holder.pid}" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr


def _start_server(
    args: list[str], coll: Path, env: dict | None = None, timeout: float = 120, argv: list[str] | None = None
) -> tuple[subprocess.Popen, dict]:
    """Start ``m3search serve -c COLL ... ARGS`` (or ``argv``); return it and its server.json once it answers."""
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "m3search"]
    log = open(coll.parent / "server.log", "w")
    proc = subprocess.Popen(
        argv or cmd + ["serve", "-c", str(coll), "--port", "0", "--log-level", "warning", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout
    import httpx

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("server exited: " + (coll.parent / "server.log").read_text()[-3000:])
        try:
            record = json.loads((coll / "server.json").read_text())
            if httpx.get(record["url"] + "/health", timeout=30).status_code == 200:
                return proc, record
        except (OSError, ValueError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up")


def _wait_indexed(url: str, api_key: str, timeout: float = 120) -> None:
    """Until the server reports no unindexed documents: its deferred index build (2 s after the last write)
    has run, so the collection's files stay as they are while nothing is written."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {api_key}"}, timeout=30).text
        if any(line.split() == ["m3search_unindexed_documents", "0.0"] for line in text.splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError("the server's index build did not end")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_commands_route_through_running_server(
    indexed, corpus_texts, tiny_encoder, tmp_path, tiny_model_path, tiny_alt_model_path
):
    proc, record = _start_server(["--api-key", "s3cret", "--dtype", "float32", "--max-body-mb", "1"], indexed)
    try:
        assert record["pid"] == proc.pid and record["api_key_required"] is True
        # without the key: a clear message naming the server
        p = cli("search", "x", "-c", str(indexed), check=False)
        assert p.returncode == 1 and f"served by process {proc.pid}" in p.stderr and "API key" in p.stderr
        env = {"M3SEARCH_API_KEY": "s3cret"}
        query = "heat transfer in laminar flow"
        order, score = _dense_oracle(tiny_encoder, corpus_texts, query, indexed)
        hits = one_json(cli("search", query, "-c", str(indexed), "--mode", "dense", "-k", "3", "--json", env=env))[
            "hits"
        ]
        assert [h["id"] for h in hits] == order[:3]
        assert hits[0]["score"] == pytest.approx(score[order[0]], abs=1e-4)
        info = one_json(cli("info", "-c", str(indexed), "--json", env=env))
        assert info["count"] == N_DOCS and str(proc.pid) in info["served_by"]
        # how THIS process would encode does not apply through the server: an error, not silently ignored
        same = one_json(cli("search", query, "-c", str(indexed), "-m", str(tiny_model_path), "--json", env=env))
        assert same["hits"]
        for opts, says in (
            (["-m", str(tiny_alt_model_path)], "stop the server to use another model"),
            (["--dtype", "bfloat16"], "--dtype bfloat16 applies to a collection opened here"),
        ):
            p = cli("search", query, "-c", str(indexed), *opts, env=env, check=False)
            assert p.returncode == 1 and says in p.stderr and "Traceback" not in p.stderr, p.stderr
        src = tmp_path / "extra.jsonl"
        src.write_text('{"_id": "extra-1", "text": "a note on hypersonic heat transfer", "year": 2024}\n')
        out = one_json(cli("index", str(src), "-c", str(indexed), "--json", env=env))
        assert out["count"] == N_DOCS + 1 and "server" in out["via"]
        # a batch over the server's body limit (1 MB here) is sent in parts: it got 413 (cli's own writer)
        big = tmp_path / "big.jsonl"
        big.write_text("".join(json.dumps({"_id": f"big-{i}", "text": f"wing {i} " * 40_000}) + "\n" for i in range(4)))
        out = one_json(cli("index", str(big), "-c", str(indexed), "--json", env=env))
        assert out["indexed"] == 4 and out["count"] == N_DOCS + 5, out
        cli("delete", *[f"big-{i}" for i in range(4)], "-c", str(indexed), env=env)
        # one document over the body limit can never be sent: "run the same command again to finish" never would
        huge = tmp_path / "huge.jsonl"
        huge.write_text(json.dumps({"_id": "huge", "text": "wing " * 250_000}) + "\n")
        p = cli("index", str(huge), "-c", str(indexed), env=env, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert "document 'huge' is" in p.stderr and "nothing was written" in p.stderr, p.stderr
        assert "serve with a larger --max-body-mb" in p.stderr, p.stderr
        # more ids than the server's --max-batch (256) in one delete: sent in parts (it got 413 too)
        many = [f"absent-{i}" for i in range(300)]
        assert one_json(cli("delete", *many, "-c", str(indexed), "--json", env=env)) == {"deleted": [], "missing": many}
        assert one_json(cli("delete", "extra-1", "-c", str(indexed), "--json", env=env)) == {
            "deleted": ["extra-1"],
            "missing": [],
        }
        # a copy of the served folder (cp -r, a backup) carries server.json along: its commands, this delete
        # among them, went to the ORIGINAL's server
        backup = tmp_path / "backup"
        _wait_indexed(record["url"], "s3cret")  # (a copy during the build found segment files gone: shutil.Error)
        shutil.copytree(indexed, backup)
        first = corpus_texts[0][0]
        assert one_json(cli("delete", first, "-c", str(backup), "--json", env=env))["deleted"] == [first]
        copy = one_json(cli("info", "-c", str(backup), "--json", env=env))
        assert copy["served_by"] is None and copy["count"] == N_DOCS - 1
        assert one_json(cli("info", "-c", str(indexed), "--json", env=env))["count"] == N_DOCS
        # wrong key: the server's 401 message comes through
        p = cli("info", "-c", str(indexed), env={"M3SEARCH_API_KEY": "nope"}, check=False)
        assert p.returncode == 1 and "wrong API key" in p.stderr
        # a second server on the same collection is refused with the first one's address
        p = cli("serve", "-c", str(indexed), "--port", "0", check=False)
        assert p.returncode == 1 and f"already served by process {proc.pid} at {record['url']}" in p.stderr
    finally:
        _stop(proc)
    assert not (indexed / "server.json").exists()  # removed on shutdown
    assert one_json(cli("info", "-c", str(indexed), "--json"))["served_by"] is None


def test_the_app_started_by_uvicorn_is_found_by_the_cli(indexed):
    """`uvicorn --factory m3search.server:create_app` (the documented app, settings from M3SEARCH_*) wrote no
    server.json, so the CLI's commands on its collection failed with "in use by process N". It records its address
    once uvicorn listens, as `m3search serve` does, the CLI goes through it, and the record goes at shutdown."""
    pytest.importorskip("uvicorn")
    argv = [sys.executable, "-m", "uvicorn", "--factory", "m3search.server:create_app", "--port", "0"]
    env = {"M3SEARCH_COLLECTION": str(indexed), "M3SEARCH_DTYPE": "float32"}
    proc, record = _start_server([], indexed, env=env, argv=[*argv, "--log-level", "warning"])
    try:
        assert record["pid"] == proc.pid and record["api_key_required"] is False
        info = one_json(cli("info", "-c", str(indexed), "--json"))
        assert info["count"] == N_DOCS and info["served_by"] == f"server {record['url']} (pid {proc.pid})"
    finally:
        _stop(proc)
    assert not (indexed / "server.json").exists()  # (uvicorn itself dies by the SIGTERM it stopped for)


def test_search_through_a_server_prints_the_servers_hits(indexed, tmp_path):
    """Every search option and the text output through a server: the CLI shows the server's own hits,
    unchanged (JSON) and laid out as a local search's (text); a request the server refuses is one line
    naming it. A mode written as --mode takes it locally ("Dense + Sparse") failed through the server."""
    import httpx

    from m3search.cli import format_hit

    proc, record = _start_server(["--dtype", "float32"], indexed)
    try:
        src = tmp_path / "extra.jsonl"
        src.write_text('{"_id": "extra-1", "text": "a note on hypersonic heat transfer", "year": 2024}\n')
        cli("index", str(src), "-c", str(indexed))
        query = "heat transfer in laminar flow"
        for body, opts in (
            (
                {"k": 3, "mode": "all", "fusion": "rrf", "weights": [0.5, 0.2, 0.3], "candidates": 20, "explain": True},
                ["-k", "3", "--mode", "all", "--fusion", "rrf", "--weights", "0.5,0.2,0.3", "--candidates", "20"]
                + ["--explain"],
            ),
            ({"k": 5, "filter": {"year": 2024}}, ["-k", "5", "--filter", '{"year": 2024}']),
            # a mode as the library spells it, which --mode takes: the server refused it (422, its own pattern)
            ({"k": 3, "mode": "dense+sparse"}, ["-k", "3", "--mode", "Dense + Sparse"]),
            ({"k": 3, "mode": "dense", "exact": True}, ["-k", "3", "--mode", "dense", "--exact"]),  # neither had it
        ):
            served = httpx.post(record["url"] + "/search", json={"query": query, **body}, timeout=60).json()["hits"]
            assert served
            hits = one_json(cli("search", query, "-c", str(indexed), *opts, "--json"))["hits"]
            assert hits == served
            text = cli("search", query, "-c", str(indexed), *opts).stdout
            assert text == "".join(line + "\n" for rank, h in enumerate(served, 1) for line in format_hit(rank, h))
        # --queries goes through the server too (POST /search/batch): the server's hits for every query
        body = {"queries": RUN_QUERIES, "k": 3, "fusion": "rrf", "filter": {"not": {"year": 2024}}}
        served = httpx.post(record["url"] + "/search/batch", json=body, timeout=60).json()["hits"]
        opts = ["-k", "3", "--fusion", "rrf", "--filter", '{"not": {"year": 2024}}', "--json"]
        got = one_json(cli("search", "--queries", str(_queries_file(tmp_path)), "-c", str(indexed), *opts))["results"]
        assert [(r["id"], r["hits"]) for r in got] == list(zip(RUN_IDS, served)) and all(served)
        # the server refuses k above its max_k (1,000): its message, on one line, naming it
        p = cli("search", query, "-c", str(indexed), "-k", "5000", check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert (
            record["url"] in p.stderr
            and "exceeds the limit of 1000" in p.stderr
            and len(p.stderr.strip().splitlines()) == 1
        )
        cli("delete", "extra-1", "-c", str(indexed))
    finally:
        _stop(proc)


def test_migrate_copies_without_reencoding(indexed, tmp_path):
    dst = tmp_path / "copy"
    out = one_json(cli("migrate", str(indexed), str(dst), "--batch-size", "64", "--json"))
    assert out["copied"] == N_DOCS
    src_info = one_json(cli("info", "-c", str(indexed), "--json"))
    dst_info = one_json(cli("info", "-c", str(dst), "--json"))
    assert dst_info["count"] == N_DOCS and dst_info["model"] == src_info["model"]
    p = cli("migrate", str(indexed), str(dst), check=False)  # destination exists: refused, one line
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.startswith("Error:")


def test_stale_server_record_is_ignored(indexed, tmp_path):
    """A server killed with -9 leaves server.json behind; its pid is dead, so commands open the folder."""
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        (indexed / "server.json").write_text(json.dumps({"pid": dead.pid, "url": url, "port": port}))
        assert one_json(cli("info", "-c", str(indexed), "--json"))["served_by"] is None
        # pid alive but nothing listening (pid reused after a kill -9): the free lock decides
        (indexed / "server.json").write_text(json.dumps({"pid": os.getpid(), "url": url, "port": port}))
        assert one_json(cli("info", "-c", str(indexed), "--json"))["served_by"] is None
        # migrate (and serve) believed such a record: "served by process N" for good (pid 1 in a container)
        out = one_json(cli("migrate", str(indexed), str(tmp_path / "copy"), "--json"))
        assert out["copied"] == one_json(cli("info", "-c", str(indexed), "--json"))["count"]
    finally:
        (indexed / "server.json").unlink()


class _FakeServer:
    """An HTTP server at a record's address that answers /health and /info as an m3search serve of the
    collection ``identity`` names (``api_key``: /info needs it, as a server started with one), and notes every
    request it gets (``keys``: the key each /info was sent with)."""

    def __init__(self, identity, api_key=None):
        import http.server
        import threading

        self.identity, self.requests, self.keys = identity, [], []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                fake.requests.append((self.command, self.path))
                if self.path == "/info":
                    fake.keys.append(self.headers.get("Authorization"))
                if api_key and self.path == "/info" and self.headers.get("Authorization") != f"Bearer {api_key}":
                    data, code = b'{"error": {"type": "unauthorized", "message": "missing or wrong API key"}}', 401
                elif self.command == "GET" and self.path in ("/health", "/info"):
                    body = {"status": "ok"}
                    if self.path == "/info":
                        body = {"model": {}, "limits": {}, "collection": {"count": 999}}
                        if fake.identity is not None:  # an older server's /info names no collection
                            body["collection_identity"] = fake.identity
                    data, code = json.dumps(body).encode(), 200
                else:
                    data, code = b'{"error": {"message": "not for this test"}}', 500
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = _answer

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_server_record_is_believed_for_its_own_collection_only(indexed, tmp_path):
    """A record names the folder it was written for, and the server at its address must serve that folder:
    after a kill -9, the record's pid and its port can both be reused (the port by another m3search serve),
    and every command, deletes included, went to that other server."""
    from m3search import serverfile

    st = os.stat(indexed)
    here = [st.st_dev, st.st_ino]  # what names a collection: its folder's inode
    fake = _FakeServer(identity=here)
    try:
        # this test process's pid: alive; written as a server writes it
        serverfile.write(str(indexed), host="127.0.0.1", port=fake.port, url=fake.url, api_key_required=False)
        assert fake.url in one_json(cli("info", "-c", str(indexed), "--json"))["served_by"]  # its own: believed
        fake.identity = [here[0], here[1] + 1]  # the address now answers for another collection
        fake.requests.clear()
        info = one_json(cli("info", "-c", str(indexed), "--json"))
        assert info["served_by"] is None and info["count"] == N_DOCS
        out = one_json(cli("delete", "no-such-id", "-c", str(indexed), "--json"))
        assert out == {"deleted": [], "missing": ["no-such-id"]}
        assert one_json(cli("migrate", str(indexed), str(tmp_path / "copy"), "--json"))["copied"] == N_DOCS
        assert all(method == "GET" and path in ("/health", "/info") for method, path in fake.requests), fake.requests
    finally:
        (indexed / "server.json").unlink()
        fake.close()


def test_tune_and_eval_on_a_served_collection_say_to_stop_the_server(indexed, demo_data):
    """tune -c and eval -c open the collection themselves: they failed with the lock's "in use by process N
    ... send requests to it, e.g. through `m3search serve`", where process N is that server."""
    from m3search import serverfile

    st = os.stat(indexed)
    fake = _FakeServer(identity=[st.st_dev, st.st_ino])
    try:
        serverfile.write(str(indexed), host="127.0.0.1", port=fake.port, url=fake.url, api_key_required=False)
        with _holding(indexed):  # as the server holds it
            for args in (["tune", str(demo_data)], ["tune", "--reset"], ["eval", str(demo_data)]):
                p = cli(*args, "-c", str(indexed), check=False)
                assert p.returncode == 1 and "opens the collection itself: stop that server" in p.stderr, p.stderr
        assert all(method == "GET" for method, _ in fake.requests), fake.requests
    finally:
        (indexed / "server.json").unlink()
        fake.close()


def test_an_older_record_is_believed_only_while_the_collection_is_held(indexed, tmp_path):
    """A record from before records named their collection (a server started by an older m3search): a copy of
    its folder is held by nobody, so the copy's commands stay here; while the folder is held, its server is
    believed (ignoring it would turn that server's users away with "in use")."""
    fake = _FakeServer(identity=None)
    backup = tmp_path / "backup"
    shutil.copytree(indexed, backup)
    record = {"pid": os.getpid(), "host": "127.0.0.1", "port": fake.port, "url": fake.url, "api_key_required": False}
    try:
        for coll in (indexed, backup):
            (coll / "server.json").write_text(json.dumps(record))
        info = one_json(cli("info", "-c", str(backup), "--json"))
        assert info["served_by"] is None and info["count"] == N_DOCS
        with _holding(indexed):
            assert fake.url in one_json(cli("info", "-c", str(indexed), "--json"))["served_by"]
    finally:
        (indexed / "server.json").unlink()
        fake.close()


def test_a_keyed_servers_record_is_checked_with_the_key_or_by_the_lock(indexed, tmp_path):
    """The check of a record's server (serve, migrate) asked GET /info without a key: a server started with one
    answered 401 and was believed unchecked, so a stale record whose port another keyed m3search serve had
    taken (after a kill -9) kept migrate and serve out of a free collection for good. The key the command has
    is sent now; without it, the collection's lock tells whether a process serves it."""
    from m3search import serverfile

    st = os.stat(indexed)
    here = [st.st_dev, st.st_ino]
    fake = _FakeServer(identity=[here[0], here[1] + 1], api_key="k")  # serves another collection
    try:
        serverfile.write(str(indexed), host="127.0.0.1", port=fake.port, url=fake.url, api_key_required=True)
        out = one_json(cli("migrate", str(indexed), str(tmp_path / "copy"), "--json"))  # no key: the lock is free
        assert out["copied"] == N_DOCS and fake.keys == [None]
        fake.identity = here  # the record's own server, asked with the key serve was given
        p = cli("serve", "-c", str(indexed), "--api-key", "k", "--port", "0", check=False)
        assert p.returncode == 1 and f"already served by process {os.getpid()}" in p.stderr, p.stderr
        assert fake.keys[-1] == "Bearer k"
        with _holding(indexed):  # without the key, a held collection is served: migrate is refused, naming it
            p = cli("migrate", str(indexed), str(tmp_path / "copy2"), check=False)
            assert p.returncode == 1 and f"is served by process {os.getpid()}" in p.stderr, p.stderr
    finally:
        (indexed / "server.json").unlink()
        fake.close()


def test_a_stale_keyed_record_does_not_ask_search_info_delete_for_a_key(indexed):
    """search, info and delete without a key stopped at a keyed server's record with "needs an API key" even
    when nobody held the collection (a stale record after a kill -9, its port taken by another keyed server);
    with a key, at that other server's "missing or wrong API key"."""
    from m3search import serverfile

    fake = _FakeServer(identity=None, api_key="k")
    try:
        serverfile.write(str(indexed), host="127.0.0.1", port=fake.port, url=fake.url, api_key_required=True)
        info = one_json(cli("info", "-c", str(indexed), "--json"))
        assert info["served_by"] is None and info["count"] == N_DOCS
        # with a key that server refuses (the dead server's own): it answered 401, "missing or wrong API key"
        info = one_json(cli("info", "-c", str(indexed), "--api-key", "mine", "--json"))
        assert info["served_by"] is None and info["count"] == N_DOCS
        assert one_json(cli("delete", "no-such-id", "-c", str(indexed), "--json"))["missing"] == ["no-such-id"]
        with _holding(indexed):  # held: it is served, and the key is what is missing
            p = cli("info", "-c", str(indexed), check=False)
            assert p.returncode == 1 and "needs an API key" in p.stderr, p.stderr
    finally:
        (indexed / "server.json").unlink()
        fake.close()


@pytest.mark.parametrize("kind", ["qdrant+local", "milvus-lite"])
def test_collection_locations_reach_their_engine(tmp_path, corpus, tiny_model_path, kind):
    """``-c`` is a location, not only a folder. Once it went through path handling, which turned
    ``qdrant+local://PATH/x`` into an embedded collection in a folder ``qdrant+local:`` (indexing
    "succeeded" into the wrong engine) and refused to reopen an existing Milvus Lite ``file.db``."""
    if kind == "qdrant+local":
        pytest.importorskip("qdrant_client")
        location, engine = f"qdrant+local://{tmp_path / 'store'}/docs", "qdrant"
    else:
        pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
        location, engine = "col.db", "milvus"
    head = tmp_path / "head.jsonl"
    head.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:20]), encoding="utf-8")
    work = tmp_path / "cwd"
    work.mkdir()
    first = one_json(cli("index", str(head), "-c", location, "-m", str(tiny_model_path), "--json", cwd=work))
    again = one_json(cli("index", str(head), "-c", location, "--json", cwd=work))  # opens what the first made
    assert first["count"] == again["count"] == 20 and again["collection"] == location
    info = one_json(cli("info", "-c", location, "--json", cwd=work))
    assert info["engine"] == engine and info["count"] == 20 and info["served_by"] is None
    hits = one_json(cli("search", "wing", "-c", location, "--mode", "dense", "--json", cwd=work))["hits"]
    assert len(hits) == 10
    made = {p.name for p in work.iterdir()}
    lite = {"col.db", ".col.db.m3search-lock"}  # the file and its holder's lock (kept: docs/usage.md)
    assert made == (lite if kind == "milvus-lite" else set()), made  # no folder named after the scheme
    none = location.replace("docs", "nothing").replace("col.db", "none.db")
    p, said = cli("serve", "-c", none, check=False, cwd=work), cli("info", "-c", none, check=False, cwd=work)
    assert p.returncode == 1 and p.stderr == said.stderr and "Traceback" not in p.stderr  # the one message for it


def test_a_server_location_carries_engine_options_in_its_query():
    """The CLI has no engine_options: a server location's URL query gives them (https for a cloud cluster,
    timeouts); before, `-c qdrant://host/x?https=true` named a collection 'x?https=true'."""
    pytest.importorskip("qdrant_client")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = cli("info", "-c", f"qdrant://127.0.0.1:{port}/docs?https=true&timeout=2", check=False)
    assert p.returncode == 1 and p.stderr.startswith(f"Error: cannot reach Qdrant at https://127.0.0.1:{port}")
    p = cli("info", "-c", f"qdrant://127.0.0.1:{port}/docs?api_key=s3cret", check=False)
    assert p.returncode == 1 and "set QDRANT_API_KEY in the environment" in p.stderr and "Traceback" not in p.stderr


def test_server_records_live_where_a_process_owns_the_collection(tmp_path):
    """A folder keeps its record inside, a Milvus Lite file beside it; a server location has none (no process
    owns it, so nothing is written for it and every command opens it itself)."""
    from m3search import serverfile

    assert serverfile.record_path(tmp_path / "coll") == tmp_path / "coll" / "server.json"
    assert serverfile.record_path(str(tmp_path / "a.db")) == tmp_path / "a.db.server.json"
    for remote in ("qdrant://localhost:6333/x", "qdrant+local:///tmp/q/x", "milvus://h:19530/x"):
        assert serverfile.record_path(remote) is None
        assert serverfile.write(remote, host="h", port=1, url="u", api_key_required=False) is None
        assert serverfile.read(remote) is None
    written = serverfile.write(str(tmp_path / "a.db"), host="h", port=1, url="u", api_key_required=False)
    assert written == tmp_path / "a.db.server.json" and serverfile.read(str(tmp_path / "a.db"))["url"] == "u"
    serverfile.remove(str(tmp_path / "a.db"))
    assert not written.exists()


def test_search_takes_every_mode_tune_may_store(indexed):
    """--mode took only the presets: 'sparse+colbert', which tune may choose and store, was refused."""
    for mode in ("sparse+colbert", "colbert+dense", "all"):
        hits = one_json(cli("search", "pump", "-c", str(indexed), "--mode", mode, "--json"))
        assert hits, mode


def test_a_hub_id_matches_the_model_its_collection_recorded():
    """A server loads a Hub model from its snapshot folder, so its name_or_path is that folder: the Hub id a
    user sets (M3SEARCH_MODEL=BAAI/bge-m3) was refused as another model. The collection's record counts too."""
    import click

    from m3search.cli import _check_served_model

    served = {"name_or_path": "/cache/hub/models--BAAI--bge-m3/snapshots/5617", "identity": "abc"}
    _check_served_model(served, "BAAI/bge-m3", "auto", "auto", "served", recorded="BAAI/bge-m3")
    with pytest.raises(click.ClickException, match="not other/model"):
        _check_served_model(served, "other/model", "auto", "auto", "served", recorded="BAAI/bge-m3")


def test_a_served_model_with_other_weights_is_not_taken_for_the_one_asked(tiny_model_path, tmp_path):
    """A server's /info identity leaves the transformer weights out: `--model <backbone-only fine-tune>` through a
    server of its base model searched with the base model, silently. Compared by weights fingerprint as well."""
    import click
    from safetensors.torch import load_file, save_file

    from m3search.cli import _check_served_model
    from m3search.encoder import model_identity, weights_fingerprint

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_path, tuned)
    state = load_file(tuned / "model.safetensors")
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}, tuned / "model.safetensors")
    served = {
        "name_or_path": str(tiny_model_path),
        "identity": model_identity(tiny_model_path),
        "weights_fingerprint": weights_fingerprint(tiny_model_path),
    }
    assert model_identity(tuned) == served["identity"]
    _check_served_model(served, str(tiny_model_path), "auto", "auto", "served")
    with pytest.raises(click.ClickException, match="stop the server to use another model"):
        _check_served_model(served, str(tuned), "auto", "auto", "served")
    _check_served_model({**served, "weights_fingerprint": None}, str(tuned), "auto", "auto", "served")  # older server


def test_finetune_creates_the_parent_folders_of_out(tmp_path, tiny_model_path):
    """`index` creates a new collection's parent folders; `finetune --out runs/cran-ft` stopped with "the parent of
    the output folder, 'runs', does not exist" in a fresh clone. Here it goes on to check the data (which is bad, so
    nothing is trained)."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "pos": []}\n', encoding="utf-8")
    p = cli("finetune", str(data), "-m", str(tiny_model_path), "--out", "runs/deeper/ft", check=False, cwd=tmp_path)
    assert "parent of the output folder" not in p.stderr, p.stderr
    assert p.returncode == 2 and "positive" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()  # made when training starts, not for bad input


def test_ctrl_c_keeps_the_json_error_and_the_resume_hint(tmp_path, corpus, tiny_model_path):
    """Ctrl-C printed click's bare 'Aborted!': no JSON object under --json (only ClickException was turned
    into one) and, during index, not the resume hint every other failure gets."""

    def run(patch: str, *args: str) -> subprocess.CompletedProcess:
        """The CLI with ``patch`` applied first (KeyboardInterrupt where Ctrl-C would land)."""
        code = (
            "import sys\nfrom m3search.collection import Collection\nfrom m3search.cli import main\n"
            f"{patch}\nmain(sys.argv[1:], prog_name='m3search')\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)

    col = tmp_path / "col"
    second_upsert = (
        "calls = []\norig = Collection.upsert\n"
        "def upsert(self, *a, **k):\n    calls.append(1)\n    if len(calls) == 2:\n        raise KeyboardInterrupt\n"
        "    return orig(self, *a, **k)\nCollection.upsert = upsert"
    )
    args = ("index", str(corpus), "-c", str(col), "--model", str(tiny_model_path), "--batch-size", "50")
    proc = run(second_upsert, *args, "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    message = one_json(proc)["error"]["message"]
    assert message.startswith("interrupted; the first 50 records of") and "run the same command again" in message
    assert "run the same command again" in proc.stderr.splitlines()[-1]
    opening = "def stop(*a, **k):\n    raise KeyboardInterrupt\nCollection.open = stop"
    proc = run(opening, "info", "-c", str(col), "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert one_json(proc) == {"error": {"type": "error", "message": "interrupted", "exit_code": 1}}


def test_recover_lists_and_clears_a_crashed_writer_s_mark(tmp_path, tiny_encoder, monkeypatch):
    """`m3search recover` on a collection whose long write of L stopped as a crash does, its writer's handle still
    open (live, as a crashed server client is within its lease): it prints the mark (id, client, age) and keeps
    it; with --force it clears it and the write's leftovers, so another client's write of L goes through."""
    from click.testing import CliRunner
    from helpers import location
    from test_windows import create, one_window_pieces, stop_long_writes

    from m3search import Collection
    from m3search.cli import main
    from m3search.testing import BUILTIN_TEXTS

    one_window_pieces(monkeypatch, tiny_encoder)
    loc, long = location("qdrant-local", tmp_path), " ".join(BUILTIN_TEXTS)
    with create("qdrant-local", tmp_path, tiny_encoder) as a:
        stop_long_writes(monkeypatch, a)
        with pytest.raises(KeyboardInterrupt):
            a.add([long], ids=["L"])

        def recover(*args: str):
            result = CliRunner().invoke(main, ["recover", "--collection", loc, *args])
            assert result.exit_code == 0, result.output
            return result.stdout

        kept = recover()
        assert kept.startswith(f"L  client {a._client}  age ") and kept.rstrip().endswith("(--force clears it)")
        assert recover("--id", "other") == "no pending writes\n"
        [mark] = json.loads(recover("--id", "L", "--force", "--json"))["marks"]
        assert (mark["id"], mark["client"], mark["live"], mark["cleared"]) == ("L", a._client, True, True)
        assert a.engine.read_manifest()["pending"] == []
        with Collection.open(loc, model=tiny_encoder) as b:
            b.add([long], ids=["L"])
            assert b.get("L")[0].text == long and b.count() == 1


def _short_corpus(n: int) -> bytes:
    """``n`` one-line JSONL records with ids d0, d1, ... (fast to encode)."""
    return "".join(json.dumps({"_id": f"d{i}", "text": f"note {i} on wings"}) + "\n" for i in range(n)).encode()


def _invoke(*args: str, stdin: bytes | None = None):
    """The CLI in this process (monkeypatches apply), standard input given."""
    from click.testing import CliRunner

    from m3search.cli import main

    return CliRunner().invoke(main, list(args), input=stdin)


def _stored_ids(location: Path) -> set[str]:
    from m3search import Collection

    with Collection.open(location) as col:
        return {r.id for r in col.get([f"d{i}" for i in range(100)]) if r is not None}


def test_delete_refuses_an_empty_id_before_deleting_anything(tmp_path, tiny_encoder):
    """No document has an empty id (add refuses one): `delete d0 ""` printed "deleted 1; not found: " with a blank
    name and exit 0. It is a usage error naming the argument, and nothing is deleted."""
    from m3search import Collection

    with Collection.create(tmp_path / "c", model=tiny_encoder) as col:
        col.add(["one", "two"], ids=["d0", "d1"])
    got = _invoke("delete", "d0", "", "-c", str(tmp_path / "c"))
    assert got.exit_code == 2 and "Invalid value for 'IDS...': an id is never empty" in got.stderr, got.output
    assert _stored_ids(tmp_path / "c") == {"d0", "d1"}


def test_index_opens_a_collection_another_process_created_since_it_looked(tmp_path, tiny_model_path, monkeypatch):
    """Two `index` runs started together into a new folder: one found no collection, the other then created it,
    and the first's create failed "a collection already exists at ..." (exit 1), though `index` writes into an
    existing collection. It now opens the one created meanwhile (in use, said so, while its creator holds it)."""
    from m3search import Collection
    from m3search.errors import CollectionNotFoundError

    location = tmp_path / "coll"
    real_open = Collection.open.__func__

    def open_as_another_creates(cls, path, *args, **kwargs):
        if not location.exists():  # the other `index`, between this one's open and its create
            Collection.create(location, model=str(tiny_model_path)).close()
            raise CollectionNotFoundError(f"no collection at {path}")
        return real_open(cls, path, *args, **kwargs)

    monkeypatch.setattr(Collection, "open", classmethod(open_as_another_creates))
    args = ("-c", str(location), "-m", str(tiny_model_path), "--format", "jsonl")
    got = _invoke("index", "-", *args, stdin=_short_corpus(3))
    assert got.exit_code == 0, got.output
    assert _stored_ids(location) == {"d0", "d1", "d2"}


def test_index_over_what_an_interrupted_create_left_keeps_creates_message(tmp_path, tiny_model_path, monkeypatch):
    """On a server engine, what an interrupted create or migrate left (the engine's collection, no manifest) exists
    to ``Collection.exists`` but is not found by open: create says so and how to remove it. Opening it again (as a
    collection another `index` created meanwhile) replaced that with "has no m3search manifest"."""
    from m3search import Collection
    from m3search.errors import CollectionExistsError, CollectionNotFoundError

    location = tmp_path / "coll"
    said = f"{location} holds what an interrupted create or migrate left: remove it, then run again"

    def no_manifest(cls, path, *args, **kwargs):
        raise CollectionNotFoundError(f"{path} has no m3search manifest")

    def left(cls, path, *args, **kwargs):
        raise CollectionExistsError(said)

    monkeypatch.setattr(Collection, "open", classmethod(no_manifest))
    monkeypatch.setattr(Collection, "create", classmethod(left))
    monkeypatch.setattr(Collection, "exists", classmethod(lambda cls, path, **kwargs: True))
    got = _invoke("index", "-", "-c", str(location), "-m", str(tiny_model_path), "--format", "jsonl", stdin=b"")
    assert got.exit_code == 1 and said in got.output, got.output


def test_index_reads_standard_input_in_the_format_given(tmp_path, tiny_model_path, monkeypatch):
    """`cat corpus.jsonl | m3search index - -c ...` failed ("Path '-' does not exist"): the source is read twice,
    so standard input is spooled to a temporary file, plain or gzip (told by its first bytes), then removed."""
    import gzip

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    data = _short_corpus(12)
    args = ("-m", str(tiny_model_path), "--json")
    for name, piped in (("plain", data), ("gz", gzip.compress(data))):
        got = _invoke("index", "-", "--format", "jsonl", "-c", str(tmp_path / name), *args, stdin=piped)
        assert got.exit_code == 0, got.output
        assert json.loads(got.stdout)["indexed"] == 12 and _stored_ids(tmp_path / name) == {f"d{i}" for i in range(12)}
    tsv = b"id\ttext\tyear\nt1\tfirst row\t1990\n"
    got = _invoke("index", "-", "--format", "tsv", "-c", str(tmp_path / "tsv"), *args, stdin=tsv)
    assert got.exit_code == 0 and json.loads(got.stdout)["indexed"] == 1, got.output
    # a bad record: named in the copy, nothing written (not even a collection); the copy removed, as always
    bad = data + b'{"_id": \n'
    got = _invoke("index", "-", "--format", "jsonl", "-c", str(tmp_path / "bad"), "-m", str(tiny_model_path), stdin=bad)
    assert got.exit_code == 1 and "Error: stdin.jsonl:13: invalid JSON" in got.output, got.output
    assert not (tmp_path / "bad").exists() and list((tmp_path / "tmp").iterdir()) == []
    # --format: needed for standard input, refused for a file (its suffix says)
    got = _invoke("index", "-", "-c", str(tmp_path / "none"), stdin=data)
    assert got.exit_code == 2 and "SOURCE - (standard input) needs --format jsonl|csv|tsv" in got.output, got.output
    (tmp_path / "c.jsonl").write_bytes(data)
    got = _invoke("index", str(tmp_path / "c.jsonl"), "--format", "csv", "-c", str(tmp_path / "none"))
    assert got.exit_code == 2 and "--format applies to standard input (-) only" in got.output, got.output
    assert not (tmp_path / "none").exists()
    # Ctrl-C during the writes: the copy is removed too
    _interrupt_after_upsert(monkeypatch, 1)
    got = _invoke("index", "-", "--format", "jsonl", "-c", str(tmp_path / "cut"), *args, stdin=data)
    assert got.exit_code == 1 and "perhaps some of the first 12 records of standard input" in got.output, got.output
    assert list((tmp_path / "tmp").iterdir()) == []
    # a real pipe, into a process of its own
    env = {"TMPDIR": str(tmp_path / "tmp")}
    proc = cli("index", "-", "--format", "jsonl", "-c", str(tmp_path / "piped"), *args, stdin=data.decode(), env=env)
    assert one_json(proc)["indexed"] == 12 and list((tmp_path / "tmp").iterdir()) == []


def test_standard_input_from_a_terminal_or_closed(indexed, tmp_path):
    """`m3search search --queries - --format txt` typed in a terminal seemed to hang, and one Ctrl-D did not end
    it (a second one did): a line on stderr says it reads the terminal, and one Ctrl-D ends it. A closed standard
    input (`<&-`) said click's "Was not able to determine binary stream for sys.stdin"."""
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "m3search"]
    search = [*cmd, "search", "--queries", "-", "--format", "txt", "-c", str(indexed), "-k", "1", "--trec", "r"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    # one line, then Ctrl-D (before: no end without a second Ctrl-D)
    code, out, err = _typed_in_a_terminal(search, b"boundary layer\n\x04", env, subprocess.PIPE)
    assert code == 0 and out.decode().startswith("1 Q0 "), err.decode()
    assert "reading txt from the terminal (--queries -); end it with Ctrl-D" in err.decode()
    for args in (search, [*cmd, "index", "-", "--format", "jsonl", "-c", str(tmp_path / "new")]):
        closed = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, preexec_fn=_close_stdin)
        assert closed.returncode == 1 and closed.stderr.endswith("standard input, which is closed\n"), closed.stderr
    assert not (tmp_path / "new").exists()


def _typed_in_a_terminal(argv: list[str], typed: bytes, env: dict, stderr) -> tuple[int, bytes, bytes | None]:
    """Run ``argv`` with a pseudo-terminal as standard input and ``typed`` typed into it: (exit code, stdout,
    stderr when ``stderr`` is a pipe). Skips where there is no pseudo-terminal."""
    import pty

    try:
        master, terminal = pty.openpty()
    except OSError as exc:  # a container without /dev/pts
        pytest.skip(f"no pseudo-terminal here: {exc}")
    try:
        with subprocess.Popen(argv, stdin=terminal, stdout=subprocess.PIPE, stderr=stderr, env=env) as proc:
            os.write(master, typed)
            try:
                out, err = proc.communicate(timeout=120)
            finally:
                proc.kill()
    finally:
        os.close(terminal)
        os.close(master)
    return proc.returncode, out, err


def test_a_terminal_standard_input_with_a_full_stderr_is_read(tmp_path, tiny_model_path):
    """The "reading ... from the terminal" line on a full standard error (``2>/dev/full``) ended `index -` with
    exit 1 before it read anything; it is a note (:func:`m3search.cli._note`): the documents are indexed."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (a device whose writes fail with ENOSPC) here")
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "m3search"]
    args = ["index", "-", "--format", "jsonl", "-c", str(tmp_path / "c"), "--model", str(tiny_model_path), "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    with open("/dev/full", "w") as full:  # one record, then Ctrl-D
        code, out, _ = _typed_in_a_terminal(cmd + args, b'{"_id": "a", "text": "wings"}\n\x04', env, full)
    assert code == 0 and json.loads(out)["count"] == 1, out


@pytest.mark.parametrize("command", ["index", "search --queries"])
def test_sigterm_while_reading_standard_input_cleans_up(tmp_path, tiny_model_path, request, command):
    """A plain `kill` (SIGTERM) ended `index -` (and `search --queries -`) at once: its copy of standard input stayed
    in $TMPDIR. It now stops as Ctrl-C does: the copy removed, no collection created, exit 1, no traceback."""
    import signal

    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "m3search"]
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")} | {"TMPDIR": str(tmp_path / "tmp")}
    fmt = "jsonl"
    args = [*cmd, "index", "-", "--format", fmt, "-c", str(tmp_path / "c"), "-m", str(tiny_model_path)]
    if command == "search --queries":
        fmt = "txt"
        args = [*cmd, "search", "--queries", "-", "--format", fmt, "-c", str(request.getfixturevalue("indexed"))]
    # SIGTERM at its default in the child, as from a shell (this test run may have it set otherwise)
    with subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
    ) as proc:
        try:
            proc.stdin.write(_short_corpus(3))  # standard input left open: the copy waits for its end
            proc.stdin.flush()
            deadline = time.monotonic() + 120
            while not list((tmp_path / "tmp").glob(f"m3search-stdin-*/stdin.{fmt}")):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.05)
            proc.terminate()
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err.decode(), (proc.returncode, err.decode())
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "c").exists()


def _close_stdin() -> None:
    """In a child process before it runs: standard input closed, as by the shell's `<&-`."""
    os.close(0)


def _interrupt_after_upsert(monkeypatch, call: int) -> None:
    """Ctrl-C landing as the CLI's ``call``-th ``Collection.upsert`` returns: its documents are stored."""
    from m3search import Collection

    calls: list[int] = []
    upsert = Collection.upsert

    def interrupted(self, *args, **kwargs):
        out = upsert(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Collection, "upsert", interrupted)


@pytest.mark.parametrize("call", [1, 2])
def test_an_interrupted_index_claims_no_fewer_records_than_are_stored(tmp_path, tiny_model_path, monkeypatch, call):
    """Ctrl-C said "the first 32 records ... were written" with 40 stored: the batch the engine had written when
    the interrupt landed was not counted. The message now bounds what is stored: the first N whole, perhaps some
    of the next batch."""
    _interrupt_after_upsert(monkeypatch, call)
    (tmp_path / "c.jsonl").write_bytes(_short_corpus(30))
    coll = tmp_path / "coll"
    got = _invoke("index", str(tmp_path / "c.jsonl"), "-c", str(coll), "-m", str(tiny_model_path), "--batch-size", "10")
    assert got.exit_code == 1, got.output
    whole = re.search(r"; the first (\d+) records of \S+ were written", got.output)
    perhaps = re.search(r"perhaps some of the (?:first|next) (\d+)", got.output)
    n, more = int(whole[1]) if whole else 0, int(perhaps[1]) if perhaps else 0
    stored = _stored_ids(coll)
    assert {f"d{i}" for i in range(n)} <= stored <= {f"d{i}" for i in range(n + more)}, got.output
    assert len(stored) == 10 * call and "run the same command again to finish" in got.output


def test_ctrl_c_swallowed_inside_a_del_still_stops_index(tmp_path, tiny_model_path, monkeypatch, request):
    """Ctrl-C landing in a ``__del__`` is swallowed by Python ("Exception ignored in ..."): `m3search index` ran on
    to the end and exited 0. The interrupt is recorded; the next batch stops, with the usual message, exit 1."""
    import signal

    from m3search import Collection

    # Python's own handler, as in a terminal (a background job's Python inherits SIGINT ignored; index keeps that)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    swallowed: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_value))

    class Ctrl:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    upsert = Collection.upsert

    def upsert_then_ctrl_c_in_a_del(self, *args, **kwargs):
        out = upsert(self, *args, **kwargs)
        if not swallowed:
            Ctrl()  # collected at once: the interrupt is raised inside its __del__
        return out

    monkeypatch.setattr(Collection, "upsert", upsert_then_ctrl_c_in_a_del)
    (tmp_path / "c.jsonl").write_bytes(_short_corpus(30))
    coll = tmp_path / "coll"
    got = _invoke("index", str(tmp_path / "c.jsonl"), "-c", str(coll), "-m", str(tiny_model_path), "--batch-size", "10")
    assert [type(e) for e in swallowed] == [KeyboardInterrupt]
    assert got.exit_code == 1, got.output
    assert f"Error: interrupted; the first 10 records of {tmp_path / 'c.jsonl'} were written; run the" in got.output
    assert _stored_ids(coll) == {f"d{i}" for i in range(10)}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_file_given_as_collection_is_said_to_be_one_by_every_command(tmp_path):
    """`serve -c notes.txt` said the collection "does not exist", search and info "no collection at ... (no
    manifest.json)": every command now says it is a file, in the one message the engine gives."""
    plain = tmp_path / "notes.txt"
    plain.write_text("not a collection\n")
    for args in (["serve", "-c", str(plain)], ["search", "q", "-c", str(plain)], ["info", "-c", str(plain)]):
        got = _invoke(*args)
        assert got.exit_code == 1 and got.output == f"Error: {plain} is a file, not a collection folder\n", args


@pytest.mark.parametrize(
    "args, option",
    [
        (["index", "<src>", "-c", ""], "'--collection' / '-c'"),
        (["index", "<src>", "-c", "coll", "-m", ""], "'--model' / '-m'"),
        (["search", "q", "-c", ""], "'--collection' / '-c'"),
        (["delete", "a", "-c", ""], "'--collection' / '-c'"),
        (["info", "-c", ""], "'--collection' / '-c'"),
        (["recover", "-c", ""], "'--collection' / '-c'"),
        (["serve", "-c", ""], "'--collection' / '-c'"),
        (["eval", "<dir>", "--out", ""], "'--out'"),
        (["eval", "<dir>", "--cache-dir", ""], "'--cache-dir'"),
        (["eval", "<dir>", "-c", ""], "'--collection' / '-c'"),
        (["tune", "<dir>", "-c", ""], "'--collection' / '-c'"),
        (["finetune", "<src>", "--out", ""], "'--out' / '-o'"),
        (["finetune", "<src>", "--out", "ft", "-m", ""], "'--model' / '-m'"),
        (["finetune", "<src>", "--out", "ft", "--cache-dir", ""], "'--cache-dir'"),
        (["migrate", "", "dst"], "'SRC'"),
        (["migrate", "coll", ""], "'DST'"),
    ],
)
def test_an_empty_path_is_a_usage_error_naming_its_option(tmp_path, monkeypatch, args, option):
    """An empty location, folder or model is refused before anything runs: Path("") is the current folder, so
    `index -c ""` created a collection in it, `eval --out ""` and `finetune --out ""` wrote there."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "src.jsonl").write_text('{"_id": "a", "text": "t"}\n')
    monkeypatch.chdir(work)
    fill = {"<src>": str(tmp_path / "src.jsonl"), "<dir>": str(tmp_path / "data")}
    got = _invoke(*(fill.get(a, a) for a in args))
    assert got.exit_code == 2, got.output
    assert f"Invalid value for {option}" in got.stderr and "must not be empty" in got.stderr, got.stderr
    assert list(work.iterdir()) == []


def test_a_damaged_collection_is_said_to_be_by_every_command(tmp_path, tiny_model_path):
    """A collection whose manifest is damaged is CollectionDamagedError (a library error): every command, serve
    included (it opens the collection before serving), prints its one line, no traceback, and serves nothing."""
    from m3search import Collection

    coll = tmp_path / "coll"
    Collection.create(coll, model=str(tiny_model_path)).close()
    (coll / "manifest.json").write_text('{"schema": ')
    why = "Expecting value: line 1 column 12 (char 11)"
    said = f"Error: manifest.json of the collection at {coll} is damaged ({why}); restore it from a copy\n"
    for args in (
        ["serve", "-c", str(coll), "--port", "0"],
        ["search", "q", "-c", str(coll)],
        ["info", "-c", str(coll)],
    ):
        got = _invoke(*args)
        assert got.exit_code == 1 and got.output.endswith(said), (args, got.output)
        assert "Traceback" not in got.output


def test_a_db_folder_given_as_collection_is_said_to_be_one_by_every_command(tmp_path, corpus, tiny_model_path):
    """`index -c adir.db` on a folder said "in use by another process" (milvus-lite's failed start), search and info
    "no Milvus Lite file": every command now says it is a folder, and nothing is made in it or beside it."""
    pytest.importorskip("milvus_lite")
    folder = tmp_path / "adir.db"
    folder.mkdir()
    said = f"Error: {folder} is a folder, not a Milvus Lite file\n"
    for args in (
        ["index", str(corpus), "-c", str(folder), "-m", str(tiny_model_path)],
        ["search", "q", "-c", str(folder)],
        ["info", "-c", str(folder)],
    ):
        got = _invoke(*args)
        assert got.exit_code == 1 and got.output.endswith(said), (args, got.output)
    assert [p.name for p in tmp_path.rglob("*")] == ["adir.db"]


def test_a_collection_this_process_may_not_read_is_said_to_be_so_by_every_command(indexed, corpus, monkeypatch):
    """A collection folder this process may not look into was "no collection at ... (no manifest.json)" (Python
    3.13) or a bare "[Errno 13]" (3.11), and `index` would create one there when told there was none: every command
    now says it cannot be read, naming the path, and nothing is created or changed."""
    from helpers import deny_inside

    said = f"Error: collection at {indexed} cannot be read: Permission denied ({indexed / 'manifest.json'}); "
    commands = (["search", "q"], ["info"], ["delete", "x"], ["serve", "--port", "0"], ["index", str(corpus)])
    with monkeypatch.context() as patched:
        deny_inside(patched, indexed)
        for args in commands:
            got = _invoke(*args, "-c", str(indexed))
            assert got.exit_code == 1 and got.output.startswith(said), (args, got.output)
    assert one_json(cli("info", "--collection", str(indexed), "--json"))["count"] == N_DOCS


def test_index_and_migrate_into_a_folder_this_process_may_not_write_say_so(
    indexed, corpus, tmp_path, tiny_model_path, monkeypatch
):
    """`index` and `migrate` to a new collection in a folder this process may not write said "Error: [Errno 13]
    Permission denied: 'DIR/c'" (Qdrant Edge), or that the collection "cannot be opened ... copy the file" (Milvus
    Lite): now one line naming the folder, saying nothing was created, exit 1; the folder stays empty (simulated:
    these tests may run as root, whom permissions do not stop; tests/test_engines.py has the real denial)."""
    import importlib.util

    from helpers import deny_opening

    parent = tmp_path / "parent"
    parent.mkdir()
    runs = [["index", str(corpus), "-m", str(tiny_model_path), "-c"], ["migrate", str(indexed)]]
    ends = [parent / "c"] + ([parent / "c.db"] if importlib.util.find_spec("milvus_lite") else [])
    with monkeypatch.context() as patched:
        deny_opening(patched, parent, writing=True)
        for args, end in ((args, end) for args in runs for end in ends):
            extra = ["--colbert-dtype", "float16"] if args[0] == "migrate" and end.suffix else []  # Lite's layout
            got = _invoke(*args, str(end), *extra)
            said = f"Error: cannot create a collection at {end}: this process may not write in the folder {parent} "
            assert got.exit_code == 1 and got.output.startswith(said), (args, got.output)
            assert "nothing was created" in got.output and got.output.count("\n") == 1, got.output
    assert list(parent.iterdir()) == []


def _run_into(stdout, *args: str, env: dict | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """The console script with its standard output on ``stdout`` (a file object or descriptor), stderr captured."""
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "m3search"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")} | (env or {})
    return subprocess.run(
        cmd + list(args), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300, env=env, **kwargs
    )


def _output_commands(indexed: Path, tmp_path: Path, tiny_model_path: Path) -> dict[str, list[str]]:
    queries = tmp_path / "q.txt"
    queries.write_text("boundary layer\nheat transfer\n", encoding="utf-8")
    source = tmp_path / "one.jsonl"
    source.write_text('{"_id": "n1", "text": "a new note"}\n', encoding="utf-8")
    new = ["-c", str(tmp_path / "new"), "--model", str(tiny_model_path)]
    return {
        "search": ["search", "boundary layer", "-c", str(indexed)],
        "search --queries --json": ["search", "--queries", str(queries), "-c", str(indexed), "--json"],
        "search --queries": ["search", "--queries", str(queries), "-c", str(indexed)],
        "info": ["info", "-c", str(indexed)],
        "index --json": ["index", str(source), *new, "--json"],
        "--help": ["--help"],
    }


def test_output_to_a_full_disk_is_one_clear_line(indexed, tmp_path, tiny_model_path):
    """`m3search search ... > /dev/full` ended in a traceback (OSError: [Errno 28]), with --json two, chained.
    Every command now says it in one line and exits 1; what the command did (index: the documents) stays done."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (a device whose writes fail with ENOSPC) here")
    for name, args in _output_commands(indexed, tmp_path, tiny_model_path).items():
        with open("/dev/full", "w") as full:
            got = _run_into(full, *args)
        assert (got.returncode, got.stderr) == (1, "Error: cannot write the output: No space left on device\n"), name
    assert one_json(cli("info", "-c", str(tmp_path / "new"), "--json"))["count"] == 1


def test_a_note_on_a_full_stderr_ends_nothing(tmp_path, tiny_model_path, demo_data):
    """Standard error on a full disk, standard output fine: index, its documents all written, failed on its truncation
    warning (exit 1: "the first 1 records ... were written; run the same command again", which failed alike), and
    eval exited 1 on its "reports:" line (a traceback no one could read) once its reports were written."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (a device whose writes fail with ENOSPC) here")
    source = tmp_path / "long.jsonl"
    source.write_text(json.dumps({"_id": "long", "text": "wing " * 3000}) + "\n", encoding="utf-8")
    model = ["--model", str(tiny_model_path)]
    commands = {
        "index": ["index", str(source), "-c", str(tmp_path / "coll"), *model, "--max-windows", "1", "--json"],
        "eval": ["eval", str(demo_data), *model, "--modes", "dense", "--out", str(tmp_path / "out")]
        + ["--cache-dir", str(tmp_path / "cache")],
    }
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "m3search"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    for name, args in commands.items():
        with open("/dev/full", "w") as full:
            got = subprocess.run(cmd + args, stdout=subprocess.PIPE, stderr=full, text=True, timeout=300, env=env)
        assert got.returncode == 0, (name, got.stdout[-2000:])
    assert one_json(cli("info", "-c", str(tmp_path / "coll"), "--json"))["count"] == 1
    assert (tmp_path / "out" / "results.json").is_file()


def test_output_to_a_closed_pipe_ends_quietly(indexed, tmp_path, tiny_model_path):
    """`m3search search --queries ... | head -1` said "Error: [Errno 32] Broken pipe" once the reader had gone. A
    reader that has what it wanted is no error to report: every command ends with status 1 (click's, and Python's
    advice for SIGPIPE), nothing on stderr."""
    commands = _output_commands(indexed, tmp_path, tiny_model_path)
    for name in ("search", "search --queries", "search --queries --json", "info"):  # (index: the same handler)
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first write
        try:
            got = _run_into(write, *commands[name])
        finally:
            os.close(write)
        assert (got.returncode, got.stderr) == (1, ""), name


def test_output_to_a_full_disk_through_an_ascii_stdout_is_said_too(indexed, tmp_path, tiny_model_path):
    """Where standard output's encoding is ASCII (PYTHONIOENCODING=ascii, a C locale), click writes UTF-8 to its
    binary buffer, which went past the output guard: `search ... > /dev/full` exited 0 having written nothing
    (unbuffered) or ended in a traceback with exit 120. The buffer is guarded too: one line, exit 1."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (a device whose writes fail with ENOSPC) here")
    commands = _output_commands(indexed, tmp_path, tiny_model_path)
    for name in ("search", "search --queries --json", "--help"):
        for unbuffered in ("1", ""):
            with open("/dev/full", "w") as full:
                got = _run_into(
                    full, *commands[name], env={"PYTHONIOENCODING": "ascii", "PYTHONUNBUFFERED": unbuffered}
                )
            said = (got.returncode, got.stderr)
            assert said == (1, "Error: cannot write the output: No space left on device\n"), (name, unbuffered)


def test_a_closed_stdout_is_no_traceback(indexed):
    """With standard output closed (`>&-`, Python's sys.stdout None), the guard wrapped None: every command ended
    in an AttributeError traceback. Nothing is written there, as click does without the guard, and the command
    runs (exit 0; an error still exits 1 with its line on stderr)."""
    closed = {"preexec_fn": lambda: os.close(1)}
    got = _run_into(subprocess.DEVNULL, "search", "boundary layer", "-c", str(indexed), **closed)
    assert (got.returncode, got.stderr) == (0, "")
    got = _run_into(subprocess.DEVNULL, "info", "-c", str(indexed / "nowhere"), "--json", **closed)
    assert (got.returncode, got.stderr) == (1, f"Error: no collection at {indexed / 'nowhere'} (no manifest.json)\n")


def test_nothing_holds_the_output_guard_once_main_returns(monkeypatch):
    """Called in-process (a library user, a test), main puts sys.stdout back, and no reference to its wrapper is
    left: click's stream cache (a WeakKeyDictionary whose value was the wrapper itself) kept every one, and with it
    a failed write's traceback, the command's frames."""
    import gc
    import io

    from m3search import cli as cli_module

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    cli_module.main(["--version"], standalone_mode=False)
    assert sys.stdout is out and out.getvalue().startswith("m3search, version ")
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is cli_module._Stdout]


# ---------------------------------------------------------------------------------------------- search --queries

RUN_QUERIES = [
    "pressure distribution on a wing in supersonic flow",
    "heat transfer in laminar flow",
    "boundary layer transition",
    "buckling of thin cylindrical shells",
    "flutter of panels",
]
#: Their ids in run_queries.txt: line numbers (line 2 is blank).
RUN_IDS = ["1", "3", "4", "5", "6"]
RUN_OPTS = ["-k", "4", "--mode", "all", "--weights", "0.5,0.2,0.3", "--candidates", "30", "--dtype", "float32"]


def _queries_file(folder: Path) -> Path:
    path = folder / "run_queries.txt"
    path.write_text(RUN_QUERIES[0] + "\n\n" + "\n".join(RUN_QUERIES[1:]) + "\n", encoding="utf-8")
    return path


def test_search_queries_gives_each_query_its_own_search(indexed, tiny_encoder, tmp_path, monkeypatch):
    """`m3search search` took one QUERY: a query set had no command giving its hits or a TREC run. --queries
    searches every query of a file in batches (three here, the last one short), each as Collection.search
    would with the same options; --json is one object, --trec a run trec_eval reads."""
    from helpers import exact

    from m3search import Collection
    from m3search.cli import format_hit

    monkeypatch.setattr("m3search.cli.QUERY_BATCH", 2)
    queries = _queries_file(tmp_path)
    run = _invoke("search", "--queries", str(queries), "-c", str(indexed), *RUN_OPTS, "--json")
    assert run.exit_code == 0, run.output
    got = json.loads(run.stdout)["results"]
    assert [(r["id"], r["query"]) for r in got] == list(zip(RUN_IDS, RUN_QUERIES))
    with Collection.open(indexed, model=tiny_encoder) as col:
        options = {"k": 4, "mode": "all", "weights": (0.5, 0.2, 0.3), "candidates": 30}
        want = [[h.to_dict() for h in col.search(q, **options)] for q in RUN_QUERIES]
    for r, w in zip(got, want):
        assert [h["id"] for h in r["hits"]] == [h["id"] for h in w] and len(w) == 4
        assert [h["score"] for h in r["hits"]] == exact([h["score"] for h in w])
        assert [h["text"] for h in r["hits"]] == [h["text"] for h in w]

    text = _invoke("search", "--queries", str(queries), "-c", str(indexed), *RUN_OPTS)
    assert text.exit_code == 0, text.output
    blocks = text.stdout.split("\n\n")
    assert len(blocks) == len(RUN_IDS) + 1 and blocks[-1] == ""
    for block, r in zip(blocks, got):
        lines = [line for rank, h in enumerate(r["hits"], 1) for line in format_hit(rank, h)]
        assert block.splitlines() == [f"query {r['id']}: {r['query']}", *lines]

    trec = _invoke("search", "--queries", str(queries), "-c", str(indexed), *RUN_OPTS, "--trec", "m3-all")
    assert trec.exit_code == 0, trec.output
    rows = [line.split(" ") for line in trec.stdout.splitlines()]
    assert all(len(row) == 6 and row[1] == "Q0" and row[5] == "m3-all" for row in rows)
    for r in got:
        mine = [row for row in rows if row[0] == r["id"]]
        assert [row[2] for row in mine] == [h["id"] for h in r["hits"]]
        assert [int(row[3]) for row in mine] == list(range(1, len(r["hits"]) + 1))
        scores = [float(row[4]) for row in mine]
        assert scores == [h["score"] for h in r["hits"]] and scores == sorted(scores, reverse=True)
    assert [row[0] for row in rows] == [q for q in RUN_IDS for _ in range(4)]


def test_search_queries_reads_standard_input_in_the_format_given(indexed, tmp_path):
    """`--queries -` reads standard input as `index -` does (spooled; --format txt or jsonl, plain or gzip)."""
    import gzip

    plain = _queries_file(tmp_path).read_bytes()
    want = _invoke("search", "--queries", str(tmp_path / "run_queries.txt"), "-c", str(indexed), *RUN_OPTS, "--json")
    assert want.exit_code == 0, want.output
    for piped in (plain, gzip.compress(plain)):
        got = _invoke(
            "search", "--queries", "-", "--format", "txt", "-c", str(indexed), *RUN_OPTS, "--json", stdin=piped
        )
        assert got.exit_code == 0, got.output
        assert got.stdout == want.stdout
    beir = "".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, q in zip(RUN_IDS, RUN_QUERIES)).encode()
    got = _invoke("search", "--queries", "-", "--format", "jsonl", "-c", str(indexed), *RUN_OPTS, "--json", stdin=beir)
    assert got.exit_code == 0, got.output
    results = json.loads(got.stdout)["results"]
    assert [r["id"] for r in results] == [f"q{i}" for i in RUN_IDS]
    assert [r["hits"] for r in results] == [r["hits"] for r in json.loads(want.stdout)["results"]]


#: Queries whose id repeats: the error names the file (it said "duplicate ids in source", index's wording).
_DUP = b'{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n'


@pytest.mark.parametrize(
    "args, stdin, code, message",
    [
        (["x", "--queries", "<txt>"], None, 2, "give QUERY or --queries FILE, not both"),
        ([], None, 2, "missing QUERY (or --queries FILE)"),
        (["--queries", "<txt>", "--trec", "r", "--json"], None, 2, "--trec and --json are two outputs"),
        (["--queries", "<txt>", "--trec", "r", "--group", "passage"], None, 2, "--group passage gives passages"),
        (["--queries", "<txt>", "--trec", "r", "--explain"], None, 2, "no place for --explain"),
        (["--queries", "<txt>", "--trec", "my run"], None, 2, "run name 'my run' cannot be a column of a TREC"),
        (["x", "--trec", "r"], None, 2, "--trec writes the run of --queries FILE"),
        (["x", "--format", "txt"], None, 2, "--format applies to standard input (--queries -) only"),
        (["x", "--mode", "dense", "--weights", "0,1,0"], None, 2, "give zero total weight to the modes of 'dense'"),
        (["x", "--group", "passage", "--explain"], None, 2, "explain is given for documents only"),
        (["--queries", "<txt>", "--format", "txt"], None, 2, "--format applies to standard input (-) only"),
        (["--queries", "-"], b"a\n", 2, "--queries - (standard input) needs --format txt|jsonl"),
        (["--queries", "<missing>"], None, 2, "does not exist"),
        (["--queries", "<dup>"], None, 1, "dup.jsonl: ['q1']"),
        (["--queries", "-", "--format", "jsonl"], _DUP, 1, "duplicate ids in standard input: ['q1']"),
        (["--queries", "<empty_query>"], None, 1, "bad.jsonl:2: query 'q2': query is empty"),
        (["--queries", "<spaced>", "--trec", "r"], None, 1, "query id 'q 2' cannot be a column of a TREC run"),
        (["--queries", "-", "--format", "txt"], b"\n \n", 1, "standard input holds no query"),
    ],
)
def test_search_queries_errors_are_clear(tmp_path, args, stdin, code, message):
    """Usage errors exit 2, a bad query file 1, each naming the problem, without a traceback and before any
    collection opens (there is none here: a query id that no TREC column can hold said "no collection at ..."
    first, and was found only after the queries before it were searched); with --json, the error is the one JSON
    object on stdout."""
    (tmp_path / "dup.jsonl").write_bytes(_DUP)
    (tmp_path / "bad.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": ""}\n')
    (tmp_path / "spaced.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"_id": "q 2", "text": "b"}\n')
    fill = {"<txt>": _queries_file(tmp_path), "<missing>": tmp_path / "none.txt"}
    fill |= {
        "<dup>": tmp_path / "dup.jsonl",
        "<empty_query>": tmp_path / "bad.jsonl",
        "<spaced>": tmp_path / "spaced.jsonl",
    }
    argv = ["search", *(str(fill.get(a, a)) for a in args), "-c", str(tmp_path / "no-collection")]
    got = _invoke(*argv, stdin=stdin)
    assert got.exit_code == code and isinstance(got.exception, SystemExit), got.output
    assert message in " ".join(got.stderr.split()), got.stderr
    assert got.stdout == "" or "--json" in argv
    if "--trec" in argv and "--json" not in argv:
        return  # (with --json, another usage error: the case above)
    as_json = got if "--json" in argv else _invoke(*argv, "--json", stdin=stdin)
    error = json.loads(as_json.stdout)["error"]
    assert error["exit_code"] == code and message in " ".join(error["message"].split())


def test_search_queries_prints_nothing_but_the_error_when_a_batch_fails(indexed, tmp_path, monkeypatch):
    """A failure after some batches were searched leaves no partial output: a run file that looks whole, or a
    --json that is not the one object promised (a part of the results followed by the error object)."""
    from m3search.cli import _Local

    monkeypatch.setattr("m3search.cli.QUERY_BATCH", 2)
    search_batch, calls = _Local.search_batch, []

    def failing(self, queries, **kwargs):
        calls.append(len(queries))
        if len(calls) == 2:
            raise RuntimeError("the engine went away")
        return search_batch(self, queries, **kwargs)

    monkeypatch.setattr(_Local, "search_batch", failing)
    for output in (["--json"], ["--trec", "r"], []):
        calls.clear()
        got = _invoke("search", "--queries", str(_queries_file(tmp_path)), "-c", str(indexed), *output)
        assert got.exit_code == 1 and calls == [2, 2] and "the engine went away" in got.stderr, got.output
        if output == ["--json"]:
            assert list(json.loads(got.stdout)) == ["error"]
        else:
            assert got.stdout == ""


def test_a_trec_column_holds_no_whitespace():
    """trec_eval splits a run's lines at whitespace: an id holding some would shift every column after it."""
    from m3search.cli import trec_lines

    hits = [{"id": "d1", "score": 0.5}, {"id": "notes/a b.txt", "score": 0.25}]
    assert trec_lines("q1", hits[:1], "run") == ["q1 Q0 d1 1 0.5 run"]
    with pytest.raises(ValueError, match="document id 'notes/a b.txt' cannot be a column of a TREC run"):
        trec_lines("q1", hits, "run")
    with pytest.raises(ValueError, match="query id 'q 1' cannot"):
        trec_lines("q 1", hits[:1], "run")
