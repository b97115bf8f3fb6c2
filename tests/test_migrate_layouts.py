"""Migration to another ColBERT layout: from the stored vectors, nothing re-encoded, nothing lost.

* the destination stores the source's vectors under the new layout (a turbo codec: close to
  the source's scores; a pool factor: exactly ``pool_tokens`` of the stored vectors), its
  manifest records the new layout and where it came from, and the source is unchanged;
* bad layouts, a layout the destination engine cannot honour, a change in place and a pool
  factor that a pooled source cannot give fail BEFORE anything is written;
* an interrupted migration (a write fails half-way) leaves no collection at the destination,
  and a rerun completes it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import fail_second_upsert

from m3search.collection import Collection
from m3search.errors import CollectionNotFoundError
from m3search.migrate import migrate
from m3search.pooling import pool_tokens
from m3search.testing import BUILTIN_TEXTS

IDS = [f"d{i}" for i in range(40)]


@pytest.fixture
def source(tmp_path, tiny_encoder):
    rng = np.random.default_rng(11)
    words = " ".join(BUILTIN_TEXTS).split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in IDS]
    path = tmp_path / "src"
    with Collection.create(path, model=tiny_encoder, colbert_dtype="float16") as col:  # the lossless layout, unpooled
        col.add(texts, ids=IDS, metadata=[{"i": i} for i in range(len(IDS))], batch_size=16)
    return path


def stored_colbert(path, tiny_encoder) -> dict[str, np.ndarray]:
    with Collection.open(path, model=tiny_encoder) as col:
        return {i: r.colbert for i, r in zip(IDS, col.engine.get(IDS, with_vectors=["colbert"]))}


def colbert_scores(path, tiny_encoder, query: str = "the quick brown fox") -> dict[str, float]:
    with Collection.open(path, model=tiny_encoder) as col:
        return {h.id: h.scores["colbert"] for h in col.search(query, k=len(IDS), mode="colbert")}


def test_pooling_from_stored_vectors(tmp_path, tiny_encoder, source):
    before = stored_colbert(source, tiny_encoder)
    out = migrate(source, tmp_path / "p2", batch_size=16, layout={"colbert_pool_factor": 2})
    assert out["copied"] == len(IDS) and out["layout"]["colbert_pool_factor"] == 2
    after = stored_colbert(tmp_path / "p2", tiny_encoder)
    for i in IDS:
        want, _ = pool_tokens(before[i], np.array([0, len(before[i])]), 2)
        assert len(after[i]) == math.ceil(len(before[i]) / 2)
        # the destination stores float16 like the source: the pooled means, rounded to float16
        np.testing.assert_array_equal(after[i], want.astype(np.float16).astype(np.float32))
    manifest = json.loads((tmp_path / "p2" / "manifest.json").read_text())
    assert manifest["schema"]["colbert_pool_factor"] == 2
    assert manifest["migrated_from"]["layout"]["colbert_pool_factor"] == 1
    again = stored_colbert(source, tiny_encoder)  # the source is untouched
    for i in IDS:
        np.testing.assert_array_equal(again[i], before[i])


def test_codec_from_stored_vectors_keeps_the_ranking_close(tmp_path, tiny_encoder, source):
    want = colbert_scores(source, tiny_encoder)
    out = migrate(source, tmp_path / "t8", layout={"colbert_dtype": "turbo8"})
    assert out["layout"]["colbert_dtype"] == "turbo8"
    cfg = json.loads((tmp_path / "t8" / "shard" / "edge_config.json").read_text())["vectors"]["colbert"]
    assert cfg["datatype"] == "turbo8"
    got = colbert_scores(tmp_path / "t8", tiny_encoder)
    assert set(got) == set(want)
    err = max(abs(got[i] - want[i]) for i in IDS)
    assert 1e-7 < err < 2e-2, err  # the codec was applied (lossy), and stays close
    with Collection.open(tmp_path / "t8", model=tiny_encoder) as col:
        assert col.info()["schema"]["colbert_dtype"] == "turbo8"
        assert col.count() == len(IDS)


def test_float16_to_float32_is_exact(tmp_path, tiny_encoder, source):
    migrate(source, tmp_path / "f32", layout={"colbert_dtype": "float32"})
    before, after = stored_colbert(source, tiny_encoder), stored_colbert(tmp_path / "f32", tiny_encoder)
    for i in IDS:
        np.testing.assert_array_equal(after[i], before[i])


@pytest.mark.parametrize(
    "dst,layout,match",
    [
        ("new", {"colbert_dtype": "bfloat16"}, "colbert_dtype must be one of"),
        ("new", {"colbert_quantization": "binary3"}, "colbert_quantization must be None or one of"),
        ("new", {"colbert_pool_factor": 0}, "colbert_pool_factor must be an integer >= 1"),
        ("new", {"colbert_dim": 4}, "unknown layout setting"),
        ("new.db", {"colbert_dtype": "turbo4"}, "Milvus stores ColBERT token vectors as float16 or float32 only"),
        ("new.db", {"colbert_quantization": "binary1"}, "cannot be honoured"),
        ("new.db", {"colbert_on_disk": False}, "colbert_on_disk=False cannot be honoured"),  # was recorded, no effect
        ("src", {"colbert_dtype": "turbo4"}, "cannot change in place"),
    ],
)
def test_bad_layouts_write_nothing(tmp_path, tiny_encoder, source, dst, layout, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=match):
        migrate(source, tmp_path / dst, layout=layout)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no destination folder or file appeared
    assert len(colbert_scores(source, tiny_encoder)) == len(IDS)


def test_an_in_memory_source_to_milvus_is_told_the_flag(tmp_path, tiny_encoder):
    """Milvus recorded colbert_on_disk=False (and info showed it) though it changes nothing there; it is
    refused like a quantization, and migrate names the flag that converts it."""
    pytest.importorskip("pymilvus")
    src = tmp_path / "ram"
    with Collection.create(src, model=tiny_encoder, colbert_dtype="float16", colbert_on_disk=False) as col:
        col.add(["alpha beta", "gamma delta"], ids=["a", "b"])
    with pytest.raises(ValueError, match=r"in memory: convert it .*\(CLI: --colbert-on-disk\)"):
        migrate(src, tmp_path / "m.db")
    assert migrate(src, tmp_path / "m.db", layout={"colbert_on_disk": True})["copied"] == 2


def test_the_refusal_names_the_sources_layout_not_the_one_asked(tmp_path, tiny_encoder):
    """With the dtype converted but the in-memory flag left, the message said the source 'stores ColBERT as
    float16' (the destination's dtype) when it stores turbo8."""
    pytest.importorskip("pymilvus")
    src = tmp_path / "ram"
    with Collection.create(src, model=tiny_encoder, colbert_dtype="turbo8", colbert_on_disk=False) as col:
        col.add(["alpha beta", "gamma delta"], ids=["a", "b"])
    with pytest.raises(ValueError, match=r"stores ColBERT as 'turbo8' in memory: .*\(CLI: --colbert-on-disk\)"):
        migrate(src, tmp_path / "m.db", layout={"colbert_dtype": "float16"})


def test_pooled_source_cannot_be_repooled(tmp_path, tiny_encoder, source):
    migrate(source, tmp_path / "p2", layout={"colbert_pool_factor": 2})
    with pytest.raises(ValueError, match="re-index the texts"):
        migrate(tmp_path / "p2", tmp_path / "p3", layout={"colbert_pool_factor": 3})
    with pytest.raises(ValueError, match="re-index the texts"):
        migrate(tmp_path / "p2", tmp_path / "p1", layout={"colbert_pool_factor": 1})
    assert not (tmp_path / "p3").exists() and not (tmp_path / "p1").exists()
    # same factor, other codec: fine (the pooled vectors are copied as they are)
    migrate(tmp_path / "p2", tmp_path / "p2t", layout={"colbert_dtype": "turbo16"})
    want = {i: len(v) for i, v in stored_colbert(tmp_path / "p2", tiny_encoder).items()}
    assert {i: len(v) for i, v in stored_colbert(tmp_path / "p2t", tiny_encoder).items()} == want


def test_interrupted_layout_migration_leaves_no_collection(tmp_path, tiny_encoder, source, monkeypatch):
    fail_second_upsert(monkeypatch)
    layout = {"colbert_dtype": "turbo4", "colbert_pool_factor": 2}
    with pytest.raises(OSError, match="simulated"):
        migrate(source, tmp_path / "dst", batch_size=16, layout=layout)
    with pytest.raises(CollectionNotFoundError):
        Collection.open(tmp_path / "dst", model=tiny_encoder)
    assert len(colbert_scores(source, tiny_encoder)) == len(IDS)  # the source is intact
    monkeypatch.undo()  # the real upsert again
    assert migrate(source, tmp_path / "dst", batch_size=16, layout=layout)["copied"] == len(IDS)
    with Collection.open(tmp_path / "dst", model=tiny_encoder) as col:
        assert col.count() == len(IDS) and col.schema.colbert_dtype == "turbo4"
