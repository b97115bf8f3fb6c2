"""The ColBERT layout on the command line: ``index`` creates it, ``info`` shows it, ``migrate`` converts it.

In-process (click's runner), so the model loads once: a new collection gets the layout asked
for (the manifest and ``info --json`` say so); the same options given for an existing
collection with another layout are a usage error (exit 2) that writes nothing; bad names and a
pool factor < 1 are usage errors before any folder exists; ``migrate --colbert-*`` makes a
converted copy, refuses a change in place and a layout Milvus cannot hold.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from m3search.cli import main

DOCS = [
    {"_id": f"d{i}", "title": "", "text": t}
    for i, t in enumerate(
        [
            "token pooling clusters the vectors of one document",
            "quantized copies are built when segments are optimized",
            "the quick brown fox jumps over the lazy dog near the river bank",
            "storage codecs trade bytes for fidelity in late interaction retrieval",
        ]
    )
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), env={"M3SEARCH_DTYPE": "float32"})
    return r.exit_code, r.stdout, r.stderr


def test_index_creates_the_layout_and_info_shows_it(tmp_path, corpus, tiny_model_path):
    coll = str(tmp_path / "coll")
    layout = ["--colbert-dtype", "turbo8", "--colbert-quantization", "binary2", "--colbert-pool-factor", "2"]
    code, out, err = run("index", str(corpus), "-c", coll, "-m", str(tiny_model_path), *layout, "--json")
    assert code == 0, err
    assert json.loads(out)["count"] == len(DOCS)
    code, out, err = run("info", "-c", coll, "--json")
    schema = json.loads(out)["schema"]
    assert (schema["colbert_dtype"], schema["colbert_quantization"], schema["colbert_pool_factor"]) == (
        "turbo8",
        "binary2",
        2,
    )
    assert schema["colbert_rescore"] is True
    code, out, err = run("info", "-c", coll)
    assert code == 0 and "colbert_dtype: turbo8" in out and "colbert_pool_factor: 2" in out
    # the same layout again: fine (re-running upserts); another one: a usage error, nothing written
    assert run("index", str(corpus), "-c", coll, *layout)[0] == 0
    (tmp_path / "more.jsonl").write_text(json.dumps({"_id": "new", "text": "one more"}) + "\n")
    code, out, err = run("index", str(tmp_path / "more.jsonl"), "-c", coll, "--colbert-dtype", "float16")
    assert code == 2 and "exists with colbert_dtype=turbo8" in err and "m3search migrate" in err
    code, out, err = run("index", str(tmp_path / "more.jsonl"), "-c", coll, "--colbert-quantization", "none")
    assert code == 2 and "colbert_quantization=binary2" in err
    assert json.loads(run("info", "-c", coll, "--json")[1])["count"] == len(DOCS)


@pytest.mark.parametrize(
    "option,match",
    [
        (["--colbert-dtype", "bfloat16"], "colbert_dtype must be one of"),
        (["--colbert-dtype", "uint8"], "turns unit-length token vectors into zeros"),
        (["--colbert-quantization", "binary3"], "colbert_quantization must be None or one of"),
        (["--colbert-pool-factor", "0"], "0 is not in the range x>=1"),
    ],
)
def test_bad_layout_options_are_usage_errors_before_any_write(tmp_path, corpus, tiny_model_path, option, match):
    code, out, err = run("index", str(corpus), "-c", str(tmp_path / "coll"), "-m", str(tiny_model_path), *option)
    assert code == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "coll").exists()
    code, out, err = run("migrate", str(tmp_path / "nothing"), str(tmp_path / "dst"), *option)
    assert code == 2 and match in err and not (tmp_path / "dst").exists()


def test_migrate_converts_the_layout(tmp_path, corpus, tiny_model_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert run("index", str(corpus), "-c", src, "-m", str(tiny_model_path))[0] == 0
    code, out, err = run("migrate", src, dst, "--colbert-dtype", "turbo4", "--colbert-pool-factor", "2", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["copied"] == len(DOCS) and got["layout"]["colbert_dtype"] == "turbo4"
    info = json.loads(run("info", "-c", dst, "--json")[1])
    assert info["count"] == len(DOCS) and info["schema"]["colbert_pool_factor"] == 2
    assert json.loads(run("info", "-c", src, "--json")[1])["schema"]["colbert_dtype"] == "turbo8"  # the default
    code, out, err = run("search", "quick brown fox", "-c", dst, "--json")
    assert code == 0 and json.loads(out)["hits"][0]["id"] == "d2"
    code, out, err = run("migrate", src, src, "--colbert-dtype", "turbo4")
    assert code == 1 and "cannot change in place" in err
    code, out, err = run("migrate", src, str(tmp_path / "m.db"), "--colbert-dtype", "turbo4")
    assert code == 1 and "cannot be honoured" in err and not (tmp_path / "m.db").exists()


def test_colbert_in_ram_is_a_layout_setting(tmp_path, corpus, tiny_model_path):
    """--colbert-in-ram: Qdrant keeps the token vectors in memory (read at open); fixed at creation, changed by
    migrate like the other layout settings."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert run("index", str(corpus), "-c", src, "-m", str(tiny_model_path), "--colbert-in-ram")[0] == 0

    def memory(path: str) -> str:
        return json.loads((tmp_path / path / "shard" / "edge_config.json").read_text())["vectors"]["colbert"]["memory"]

    assert memory("src") == "cached"
    assert json.loads(run("info", "-c", src, "--json")[1])["schema"]["colbert_on_disk"] is False
    code, _, err = run("index", str(corpus), "-c", src, "--colbert-on-disk")
    assert code != 0 and "colbert_on_disk" in err  # fixed at creation
    code, out, err = run("migrate", src, dst, "--colbert-on-disk", "--json")
    assert code == 0, err
    assert memory("dst") == "cold" and json.loads(out)["layout"]["colbert_on_disk"] is True
    code, out, err = run("search", "quick brown fox", "-c", dst, "--json")
    assert code == 0 and json.loads(out)["hits"][0]["id"] == "d2"
