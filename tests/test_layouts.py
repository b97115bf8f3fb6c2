"""ColBERT layouts: storage types, quantized copies and token pooling as collection settings.

* bad names, pool factor < 1 and options an engine cannot honour fail BEFORE anything is
  written; a version-1 manifest (no layout keys) still opens as float16, unpooled;
* the settings reach the engine: the manifest records them, Qdrant Edge's config carries
  them, and after ``add`` (which optimizes) a binary or TurboQuant copy exists on disk, so what
  is searched is the layout asked for (Qdrant builds int8 and product-quantized copies only for
  segments it indexes, so small collections and new writes are scored on the stored vectors);
* scores: a lossy storage type stays close to exact MaxSim; a quantized copy without
  rescoring changes the scores, with rescoring it returns the stored vectors' scores;
  a pooled collection stores ceil(n / factor) vectors per document and its ColBERT scores
  are MaxSim over exactly those vectors.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from m3search import Collection
from m3search.engines.shapes import COLBERT_DTYPES, COLBERT_QUANTIZATIONS, CREATED_SCHEMA_VERSION, Schema
from m3search.pooling import pool_tokens

TEXTS = [
    "token pooling clusters the vectors of one document",
    "quantized copies are built when segments are optimized",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "storage codecs trade bytes for fidelity in late interaction retrieval",
    "a short one",
    "hierarchical clustering with ward linkage merges the closest tokens first and keeps their mean",
]
IDS = [f"d{i}" for i in range(len(TEXTS))]
QUERY = "clustering token vectors"


def _schema(**kw) -> Schema:
    return Schema(dense_dim=8, colbert_dim=8, vocab_size=10, **kw)


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"colbert_dtype": "bfloat16"}, "colbert_dtype must be one of"),
        ({"colbert_dtype": "uint8"}, "turns unit-length token vectors into zeros"),
        ({"colbert_quantization": "binary3"}, "colbert_quantization must be None or one of"),
        ({"colbert_quantization": ""}, "colbert_quantization must be None or one of"),
        ({"colbert_pool_factor": 0}, "colbert_pool_factor must be an integer >= 1"),
        ({"colbert_pool_factor": 2.0}, "colbert_pool_factor must be an integer >= 1"),
        ({"colbert_rescore": "yes"}, "colbert_rescore must be True or False"),
    ],
)
def test_schema_rejects_bad_layouts(kw, match):
    with pytest.raises(ValueError, match=match):
        _schema(**kw)


def test_every_named_layout_is_accepted():
    for dtype in COLBERT_DTYPES:
        for quant in (None, *COLBERT_QUANTIZATIONS):
            s = _schema(colbert_dtype=dtype, colbert_quantization=quant, colbert_pool_factor=2)
            assert Schema.from_dict(s.to_dict()) == s


def test_lossless_means_todays_layouts():
    assert _schema().colbert_lossless and _schema(colbert_dtype="float32").colbert_lossless
    assert _schema(colbert_quantization="binary1", colbert_rescore=True).colbert_lossless
    assert not _schema(colbert_quantization="binary1", colbert_rescore=False).colbert_lossless
    assert not _schema(colbert_dtype="turbo8").colbert_lossless
    assert not _schema(colbert_pool_factor=2).colbert_lossless


@pytest.mark.parametrize(
    "settings", [{"colbert_dtype": "uint8"}, {"colbert_pool_factor": 0}, {"colbert_quantization": "pq3"}]
)
def test_collection_create_writes_nothing_on_bad_layout(tmp_path, tiny_encoder, settings):
    with pytest.raises(ValueError):
        Collection.create(tmp_path / "col", model=tiny_encoder, **settings)
    assert not (tmp_path / "col").exists()


def test_milvus_refuses_lossy_codecs_before_writing(tmp_path, tiny_encoder):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    for settings in ({"colbert_dtype": "turbo4"}, {"colbert_quantization": "binary2"}):
        with pytest.raises(ValueError, match="Milvus stores ColBERT token vectors as float16 or float32 only"):
            Collection.create(tmp_path / "col.db", model=tiny_encoder, **settings)
        assert not (tmp_path / "col.db").exists()


def test_qdrant_local_mode_refuses_lossy_codecs_before_writing(tmp_path, tiny_encoder):
    pytest.importorskip("qdrant_client")
    with pytest.raises(ValueError, match="local mode .* cannot honour"):
        Collection.create(f"qdrant+local://{tmp_path}/store/col", model=tiny_encoder, colbert_dtype="turbo8")
    assert not (tmp_path / "store").exists()


def test_default_layout_per_engine(tmp_path, tiny_encoder):
    """A new collection that names no storage type gets its engine's: turbo8 embedded (measured:
    benchmarks/RESULTS.md, "ColBERT layouts"), float16 where the engine (or qdrant local mode) stores
    no turbo codec; an explicit one always wins."""
    pytest.importorskip("qdrant_client")
    pytest.importorskip("pymilvus")
    with Collection.create(tmp_path / "edge", model=tiny_encoder) as col:
        assert col.schema.colbert_dtype == "turbo8" and not col.schema.colbert_lossless
    with Collection.create(tmp_path / "edge16", model=tiny_encoder, colbert_dtype="float16") as col:
        assert col.schema.colbert_dtype == "float16" and col.schema.colbert_lossless
    with Collection.create(f"qdrant+local://{tmp_path}/store/col", model=tiny_encoder) as col:
        assert col.schema.colbert_dtype == "float16"
    with Collection.create(tmp_path / "m.db", model=tiny_encoder) as col:
        assert col.schema.colbert_dtype == "float16"


def test_pool_factor_works_on_every_engine(tmp_path, tiny_encoder):
    """Pooling happens in the Collection, so an engine without codecs (qdrant local mode) honours it."""
    pytest.importorskip("qdrant_client")
    with Collection.create(f"qdrant+local://{tmp_path}/store/col", model=tiny_encoder, colbert_pool_factor=2) as col:
        col.add(TEXTS, ids=IDS)
        emb = tiny_encoder.encode(TEXTS)
        stored = col.engine.get(IDS, with_vectors=["colbert"])
        assert [len(r.colbert) for r in stored] == [math.ceil(n / 2) for n in np.diff(emb.colbert_offsets)]


# ------------------------------------------------------------------------ manifests
def test_version_1_manifest_opens_as_float16_unpooled(tmp_path, tiny_encoder):
    path = tmp_path / "col"
    with Collection.create(path, model=tiny_encoder, colbert_dtype="float16") as col:  # version 1 stored float16
        col.add(TEXTS, ids=IDS)
        before = [(h.id, h.scores["colbert"]) for h in col.search(QUERY, k=3, mode="colbert")]
    m = json.loads((path / "manifest.json").read_text())
    assert m["schema_version"] == CREATED_SCHEMA_VERSION == 3
    m["schema_version"] = 1
    for key in ("colbert_quantization", "colbert_rescore", "colbert_pool_factor"):
        del m["schema"][key]
    (path / "manifest.json").write_text(json.dumps(m))
    with Collection.open(path, model=tiny_encoder) as col:
        assert col.schema.colbert_dtype == "float16" and col.schema.colbert_pool_factor == 1
        assert col.schema.colbert_quantization is None and col.schema.colbert_lossless
        assert [(h.id, h.scores["colbert"]) for h in col.search(QUERY, k=3, mode="colbert")] == before
        col.add(["one more"], ids=["x"])  # and it still takes writes, unpooled
        assert (
            len(col.engine.get(["x"], with_vectors=["colbert"])[0].colbert)
            == tiny_encoder.encode(["one more"]).n_tokens[0] - 1
        )


def test_layout_values_earlier_versions_stored_are_read(tmp_path, tiny_encoder):
    """Before the schema's type checks, create stored flags and counts as given (0 for False, 100.0 for 100):
    such a collection opens and searches as before, while create refuses those values."""
    path = tmp_path / "col"
    with Collection.create(path, model=tiny_encoder) as col:
        col.add(TEXTS, ids=IDS)
        before = [h.id for h in col.search(QUERY, k=3)]
    m = json.loads((path / "manifest.json").read_text())
    m["schema"].update(colbert_on_disk=1, dense_on_disk=None, colbert_rescore=1, hnsw_ef_construct=100.0)
    (path / "manifest.json").write_text(json.dumps(m))
    with Collection.open(path, model=tiny_encoder) as col:
        assert col.schema.colbert_on_disk is True and col.schema.dense_on_disk is False  # None: read as falsy then
        assert col.schema.hnsw_ef_construct == 100 and type(col.schema.hnsw_ef_construct) is int
        assert [h.id for h in col.search(QUERY, k=3)] == before
    assert Schema.from_dict({"dense_dim": 4, "colbert_dim": 4, "vocab_size": 10}).colbert_on_disk is True  # default
    with pytest.raises(ValueError, match="dense_on_disk must be True or False"):
        Schema(dense_dim=4, colbert_dim=4, vocab_size=10, dense_on_disk=0)
    with pytest.raises(ValueError, match="colbert_on_disk must be True or False"):
        Schema.from_dict({"dense_dim": 4, "colbert_dim": 4, "vocab_size": 10, "colbert_on_disk": "no"})


@pytest.mark.parametrize("quantization", ["binary1.5", "binary2"])
def test_unrescored_multi_bit_binary_is_refused_for_new_collections(tmp_path, tiny_encoder, quantization):
    """Qdrant Edge 0.9 scores these on a data-dependent scale once a segment is optimized, and as binary1
    in the segment that takes new writes: the last written documents ranked first. Rescored they are fine."""
    with pytest.raises(ValueError, match="needs colbert_rescore=True"):
        Collection.create(tmp_path / "c", model=tiny_encoder, colbert_quantization=quantization, colbert_rescore=False)
    assert not (tmp_path / "c").exists()
    Collection.create(tmp_path / "c", model=tiny_encoder, colbert_quantization=quantization).close()
    s = Schema(dense_dim=4, colbert_dim=4, vocab_size=10, colbert_quantization=quantization, colbert_rescore=False)
    assert Schema.from_dict(s.to_dict()) == s  # a collection made so before still opens


def test_a_numpy_pool_factor_is_an_int(tmp_path, tiny_encoder):
    """It used to pass the check and then fail writing the manifest, after the storage was made."""
    with Collection.create(tmp_path / "c", model=tiny_encoder, colbert_pool_factor=np.int64(2)) as col:
        assert type(col.schema.colbert_pool_factor) is int and col.schema.colbert_pool_factor == 2
        col.add(TEXTS, ids=IDS)
        assert col.search(QUERY, k=1)


# ------------------------------------------------------------------- engine behaviour
def _exact_colbert(q: np.ndarray, d: np.ndarray) -> float:
    return float((q @ d.T).max(axis=1).mean())


@pytest.fixture(scope="module")
def embeddings(tiny_encoder):
    return tiny_encoder.encode(TEXTS), tiny_encoder.encode([QUERY], max_length=512)


def _colbert_scores(col: Collection, qemb) -> dict[str, float]:
    hits = col.search_batch([QUERY], k=len(TEXTS), mode="colbert", query_embeddings=qemb)[0]
    return {h.id: h.scores["colbert"] for h in hits}


def _exact(emb, qemb) -> dict[str, float]:
    q = qemb.colbert[: qemb.colbert_offsets[1]]
    o = emb.colbert_offsets
    return {i: _exact_colbert(q, emb.colbert[o[j] : o[j + 1]]) for j, i in enumerate(IDS)}


def _colbert_config(path) -> dict:
    """The ColBERT vector config Qdrant Edge recorded for the collection at ``path``."""
    return json.loads((path / "shard" / "edge_config.json").read_text())["vectors"]["colbert"]


def _quantized_files(path) -> list:
    return list((path / "shard" / "segments").glob("*/vector_storage-colbert/quantized*"))


def test_edge_config_and_manifest_record_the_layout(tmp_path, tiny_encoder, embeddings):
    emb, _ = embeddings
    path = tmp_path / "col"
    settings = {"colbert_dtype": "turbo8", "colbert_quantization": "binary2", "colbert_rescore": True}
    with Collection.create(path, model=tiny_encoder, colbert_pool_factor=2, **settings) as col:
        col.add(TEXTS, ids=IDS, embeddings=emb)
        # the quantized copy is on disk after add (which optimizes; appendable segments keep one too)
        assert any(f.name.startswith("quantized") and "data" in f.name for f in _quantized_files(path))
    cfg = _colbert_config(path)
    assert cfg["datatype"] == "turbo8" and cfg["quantization_config"]["binary"]["encoding"] == "two_bits"
    m = json.loads((path / "manifest.json").read_text())["schema"]
    assert {k: m[k] for k in settings} == settings and m["colbert_pool_factor"] == 2
    with Collection.open(path, model=tiny_encoder) as col:
        assert col.schema.colbert_dtype == "turbo8" and col.schema.colbert_pool_factor == 2


def test_lossy_storage_stays_close_to_exact(tmp_path, tiny_encoder, embeddings):
    emb, qemb = embeddings
    want = _exact(emb, qemb)
    # measured: turbo16 5.6e-7, turbo8 2.8e-4; these bounds also hold float16 (4.5e-5) and turbo4 (5.5e-3),
    # so which codec Qdrant Edge applies is read from its config
    for dtype, tol in (("turbo16", 1e-3), ("turbo8", 2e-2)):
        with Collection.create(tmp_path / dtype, model=tiny_encoder, colbert_dtype=dtype) as col:
            col.add(TEXTS, ids=IDS, embeddings=emb)
            got = _colbert_scores(col, qemb)
        assert _colbert_config(tmp_path / dtype)["datatype"] == dtype
        assert set(got) == set(IDS)
        err = max(abs(got[i] - want[i]) for i in IDS)
        assert 1e-7 < err < tol, (dtype, err)  # lossy (the codec is applied), but close


def test_quantized_copy_is_scored_unless_rescored(tmp_path, tiny_encoder, embeddings):
    emb, qemb = embeddings
    want = _exact(emb, qemb)
    got = {}
    for rescore in (False, True):
        path = tmp_path / f"rescore-{rescore}"
        with Collection.create(
            path, model=tiny_encoder, colbert_quantization="binary1", colbert_rescore=rescore
        ) as col:
            col.add(TEXTS, ids=IDS, embeddings=emb)
            got[rescore] = _colbert_scores(col, qemb)
            # the pool request (one Qdrant query with prefetches) and score() agree
            s = col.engine.score(IDS, col_query(qemb), ["colbert"])["colbert"]
            np.testing.assert_allclose(s, [got[rescore][i] for i in IDS], atol=1e-5)
    assert max(abs(got[True][i] - want[i]) for i in IDS) < 2e-3  # float16 storage, rescored
    assert max(abs(got[False][i] - want[i]) for i in IDS) > 1e-2  # 1-bit codes: visibly different
    # ... but on the other modes' [-1, 1] scale (fraction of agreeing signs), not Qdrant's raw d - 2 * hamming
    assert all(-1.0 <= got[False][i] <= 1.0 for i in IDS) and max(got[False].values()) > 0.1


def col_query(qemb):
    from m3search.engines.shapes import QueryVectors

    return QueryVectors.from_embeddings(qemb, 0)


def test_pooled_collection_scores_the_pooled_vectors(tmp_path, tiny_encoder, embeddings):
    emb, qemb = embeddings
    pooled, offs = pool_tokens(emb.colbert, emb.colbert_offsets, 3)
    q = qemb.colbert[: qemb.colbert_offsets[1]]
    want = {i: _exact_colbert(q, pooled[offs[j] : offs[j + 1]]) for j, i in enumerate(IDS)}
    with Collection.create(tmp_path / "col", model=tiny_encoder, colbert_dtype="float32", colbert_pool_factor=3) as col:
        col.add(TEXTS, ids=IDS, embeddings=emb)
        stored = col.engine.get(IDS, with_vectors=["colbert"])
        assert [len(r.colbert) for r in stored] == [math.ceil(n / 3) for n in np.diff(emb.colbert_offsets)]
        np.testing.assert_allclose(np.concatenate([r.colbert for r in stored]), pooled, atol=1e-6)
        got = _colbert_scores(col, qemb)
    assert max(abs(got[i] - want[i]) for i in IDS) < 1e-5
