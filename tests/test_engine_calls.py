"""Backend calls on the common path (documents written in one request, one client): a change that adds a read
to every re-ranking search or delete shows here, not only in a benchmark."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import location

import m3search.collection
from m3search.collection import Collection
from m3search.engines.shapes import QueryVectors
from m3search.testing import BUILTIN_TEXTS

WINDOW, STRIDE = 16, 12
IDS = [f"d{i}" for i in range(6)]


@pytest.fixture
def milvus(tmp_path, tiny_encoder):
    """A Milvus Lite collection of six documents of several windows each, written by ``add`` (one request),
    and the filters of the queries on its window collection since."""
    rng = np.random.default_rng(5)
    words = " ".join(BUILTIN_TEXTS).split()
    texts = [" ".join(rng.choice(words, size=40)) for _ in IDS]
    col = Collection.create(
        location("milvus-lite", tmp_path), model=tiny_encoder, colbert_dtype="float32", window=WINDOW, stride=STRIDE
    )
    col.add(texts, ids=IDS)
    eng = col.engine
    assert min(eng.window_counts(IDS)) > 1
    real, asked = eng.client.query, []

    def query(coll, *args, **kw):
        if coll == eng.collection:
            asked.append(kw.get("filter"))
        return real(coll, *args, **kw)

    eng.client.query = query
    try:
        yield col, asked
    finally:
        eng.client.query = real
        col.close()


def test_milvus_reads_the_windows_of_documents_written_whole_in_one_query(milvus, tiny_encoder):
    """score_windows (every re-ranking search) and get_windows read the heads and the windows ``upsert`` wrote
    (slot 0, whose ``doc`` is the head's key) in one query, as before long writes had generations; the windows
    of a long write's version, which only its head names, cost a second one."""
    col, asked = milvus
    eng = col.engine
    counts = eng.window_counts(IDS).tolist()
    asked.clear()
    scores = eng.score_windows(IDS, QueryVectors.from_embeddings(tiny_encoder.encode(["wing flow"], max_length=64)))
    assert len(asked) == 1, asked
    assert np.diff(scores.windows).tolist() == counts and not np.isnan(scores.scores["colbert"]).any()
    asked.clear()
    assert [len(w) for w in eng.get_windows(IDS, with_vectors=False)] == counts
    assert len(asked) == 1, asked
    asked.clear()
    assert [[r.window for r in w] for w in eng.get_windows(IDS, with_vectors=False, windows=range(1, 2))] == [
        [1]
    ] * len(IDS)
    assert len(asked) == 1, asked


def test_milvus_reads_a_long_writes_windows_from_the_version_its_head_names(milvus, tiny_encoder, monkeypatch):
    col, asked = milvus
    monkeypatch.setattr(m3search.collection, "PIECE_BYTES", 20 * 4 * tiny_encoder.colbert_dim)
    text = " ".join(" ".join(BUILTIN_TEXTS).split()[:90])
    col.upsert([text], ids=["d2"])  # over a version written whole: its slot-0 windows are tombstoned
    eng = col.engine
    n = int(eng.window_counts(["d2"])[0])
    assert n > len(eng.get_windows(["d1"], with_vectors=False)[0]) > 1
    asked.clear()
    got = eng.get_windows(["d2", "d1"], with_vectors=False)
    assert [r.window for r in got[0]] == list(range(n)) and len(got[1]) > 1
    assert len(asked) == 2, asked
    hit = col.search(text, k=1, mode="all")[0]
    assert hit.id == "d2" and hit.text == text


def test_milvus_delete_reads_heads_and_tombstones_in_one_query(milvus):
    """A delete reads each head (the version it names) and the document's tombstones (what they replaced)
    together: one query, then the removals."""
    col, asked = milvus
    col.engine.delete(IDS[:3])
    assert len(asked) == 1, asked
    assert col.engine.existing(IDS) == set(IDS[3:])
    assert col.count() == 3
