"""Migration between engines without re-encoding: embedded -> Qdrant (local mode) ->
embedded gives identical search results, and an interrupted migration never leaves a
destination that opens as a collection."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import ENGINES, fail_second_upsert, location

from m3search.collection import Collection
from m3search.errors import CollectionExistsError, CollectionNotFoundError
from m3search.migrate import migrate
from m3search.testing import BUILTIN_TEXTS

MODES = ["dense", "sparse", "colbert", "dense+sparse", "all"]


def corpus(n: int = 90):
    rng = np.random.default_rng(5)
    words = " ".join(BUILTIN_TEXTS).split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(2, 40)))) for _ in range(n - 2)] + ["", ""]
    ids = [f"m{i}" for i in range(n)]
    meta = [{"i": i, "lang": ["en", "de"][i % 2], "nested": {"k": i % 4}} for i in range(n)]
    return texts, ids, meta


def snapshot(col: Collection, queries) -> list:
    """Every mode's hits (ids, fused and per-mode scores, payloads) for the queries."""
    out = []
    for mode in MODES:
        for hits in col.search_batch(queries, k=15, mode=mode):
            out.append([(h.id, h.score, h.scores, h.text, h.metadata) for h in hits])
    hits = col.search(queries[0], k=10, filter={"lang": "de", "nested.k": {"in": [1, 2]}})
    out.append([(h.id, h.score, h.scores, h.text, h.metadata) for h in hits])
    return out


def close_to(before: list, after: list, tol: float = 1e-4) -> None:
    """Same hits in the same order (a swap only between documents the source scored near-equal: the corpus's
    identical documents tie exactly, and another engine may order them either way while its scores differ from
    the source's by more than the tie), scores within ``tol`` relative to max(1, |score|): float32 scores are
    compared, and the sparse scores of random heads reach ~30, where one ulp is 4e-6."""
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert len(a) == len(b)
        source = {h[0]: h[1] for h in a}
        for x, y in zip(a, b):
            scale = max(1.0, abs(x[1]))
            assert x[0] == y[0] or abs(x[1] - source.get(y[0], math.inf)) <= 1e-6 * scale, (x[:2], y[:2])
            assert abs(x[1] - y[1]) <= tol * scale


def identical(before: list, after: list) -> None:
    """The same hits in the same order with the same texts and metadata; scores may differ
    in the last float32 bit because Qdrant Edge's segment layout (write batches, optimizer
    runs) changes its summation order."""
    assert [[(h[0], h[3], h[4]) for h in hits] for hits in after] == [
        [(h[0], h[3], h[4]) for h in hits] for hits in before
    ]
    close_to(before, after, tol=1e-6)


def stored(col: Collection) -> dict:
    """id -> (text, metadata, dense, sparse, colbert) as bytes, for bit-exact comparison."""
    out = {}
    for batch in col.engine.iter_batches(50):
        for i, doc_id in enumerate(batch.ids):
            ind, val = batch.sparse_row(i)
            out[doc_id] = (
                batch.texts[i],
                repr(batch.metadata[i]),
                batch.dense[i].tobytes(),
                ind.tobytes(),
                val.tobytes(),
                batch.colbert_rows(i).tobytes(),
            )
    return out


def windows(col: Collection, ids: list[str], **read) -> list:
    """Per document, every window's (``read``: get_windows' options) text, metadata, spans and vectors as
    bytes (bit-exact comparison)."""
    return [
        [(r.text, repr(r.metadata), r.spans, r.dense.tobytes(), r.colbert.astype(np.float32).tobytes(), r.sparse[0].tobytes(),
          r.sparse[1].tobytes()) for r in doc]
        for doc in col.engine.get_windows(ids, with_vectors=True, **read)
    ]  # fmt: skip


@pytest.fixture
def source(tmp_path, tiny_encoder):
    texts, ids, meta = corpus()
    col = Collection.create(tmp_path / "src", model=tiny_encoder, colbert_dtype="float16")  # what every engine stores
    col.add(texts, ids=ids, metadata=meta, batch_size=32)
    queries = [" ".join(texts[i].split()[:4]) or "x" for i in (1, 7, 30)] + ["zzqx"]
    before = snapshot(col, queries)
    manifest = col.manifest
    col.close()
    return tmp_path / "src", queries, before, manifest


def test_embedded_to_qdrant_local_and_back_is_identical(tmp_path, tiny_encoder, source):
    pytest.importorskip("qdrant_client")
    src, queries, before, manifest = source
    mid = f"qdrant+local://{tmp_path}/qstore/docs"
    back = tmp_path / "back"

    info = migrate(src, mid, batch_size=25)
    assert info["copied"] == 90 and (info["src_engine"], info["dst_engine"]) == ("qdrant-edge", "qdrant")
    with Collection.open(mid, model=tiny_encoder) as col:
        assert col.count() == 90
        assert col.manifest["model"] == manifest["model"] and col.manifest["schema"] == manifest["schema"]
        assert col.manifest["engine"] == "qdrant" and col.manifest["migrated_from"]["engine"] == "qdrant-edge"
        close_to(before, snapshot(col, queries))  # another engine: its own score kernels

    # into another collection of the same local folder (one qdrant-client per folder and process: this
    # failed with "in use by another process", the lock being the source's own client)
    twin = f"qdrant+local://{tmp_path}/qstore/twin"
    assert migrate(mid, twin, batch_size=40)["copied"] == 90
    with Collection.open(twin, model=tiny_encoder) as col, Collection.open(mid, model=tiny_encoder) as first:
        assert col.count() == first.count() == 90
        close_to(before, snapshot(col, queries))

    migrate(mid, back, batch_size=40)
    with Collection.open(back, model=tiny_encoder) as col:
        assert col.manifest["engine"] == "qdrant-edge" and col.manifest["settings"] == manifest["settings"]
        after = snapshot(col, queries)
        identical(before, after)
        assert col.get(["m0", "m88"])[1].text == ""
        back_vectors = stored(col)
    with Collection.open(src, model=tiny_encoder) as col:
        assert stored(col) == back_vectors  # every stored vector came back bit for bit


def test_embedded_to_milvus_lite(tmp_path, tiny_encoder, source):
    pytest.importorskip("pymilvus")
    src, queries, before, manifest = source
    dst = str(tmp_path / "m.db")
    migrate(src, dst, batch_size=64)
    with Collection.open(dst, model=tiny_encoder) as col:
        after = snapshot(col, queries)
    close_to(before, after)  # Milvus scores in NumPy, Qdrant Edge in its own kernels


def test_default_embedded_collection_to_milvus_needs_float16(tmp_path, tiny_encoder):
    """The embedded engine's default layout (turbo8) is one Milvus cannot store: the error says how to
    convert, nothing is written, and converting works."""
    pytest.importorskip("pymilvus")
    src, dst = tmp_path / "src", tmp_path / "m.db"
    with Collection.create(src, model=tiny_encoder) as col:
        assert col.schema.colbert_dtype == "turbo8"
        col.add(["alpha beta", "gamma delta"], ids=["a", "b"])
    with pytest.raises(ValueError, match=r"stores ColBERT as 'turbo8'.*--colbert-dtype float16"):
        migrate(src, dst)
    assert not dst.exists()
    assert migrate(src, dst, layout={"colbert_dtype": "float16"})["copied"] == 2
    with Collection.open(dst, model=tiny_encoder) as col:
        assert col.schema.colbert_dtype == "float16" and col.search("gamma delta", k=1)[0].id == "b"


def test_interrupted_migration_leaves_no_collection(tmp_path, tiny_encoder, source, monkeypatch):
    src, queries, before, manifest = source
    dst = tmp_path / "partial"
    fail_second_upsert(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        migrate(src, dst, batch_size=30)
    with pytest.raises(CollectionNotFoundError):
        Collection.open(dst, model=tiny_encoder)
    monkeypatch.undo()  # the real upsert again
    assert migrate(src, dst, batch_size=30)["copied"] == 90  # the rerun replaces the partial folder
    with Collection.open(dst, model=tiny_encoder) as col:
        identical(before, snapshot(col, queries))


def test_interrupted_migration_to_a_server_says_what_to_remove(tmp_path, tiny_encoder, source, monkeypatch):
    """A server collection (here qdrant-client's local mode) cannot be cleaned up by the rerun as a folder is:
    the rerun says the collection there is incomplete and how to remove it, not merely that one exists."""
    pytest.importorskip("qdrant_client")
    from m3search.engines.qdrant_remote import QdrantRemoteEngine

    src, *_ = source
    dst = f"qdrant+local://{tmp_path}/store/col"
    fail_second_upsert(monkeypatch, QdrantRemoteEngine)
    layout = {"colbert_dtype": "float16"}
    with pytest.raises(OSError, match="simulated"):
        migrate(src, dst, batch_size=30, layout=layout)
    monkeypatch.undo()
    with pytest.raises(CollectionExistsError, match="incomplete.*interrupted create or migrate. Remove it"):
        migrate(src, dst, batch_size=30, layout=layout)
    with pytest.raises(CollectionExistsError, match="incomplete.*Remove it"):  # and not "use Collection.open"
        Collection.create(dst, model=tiny_encoder)


def test_an_existing_destination_in_use_is_still_said_to_exist(tmp_path, tiny_encoder, source):
    src, *_ = source
    with Collection.create(tmp_path / "held", model=tiny_encoder):  # open here: in use
        with pytest.raises(CollectionExistsError, match="already exists"):
            migrate(src, tmp_path / "held")


def test_a_quantized_copy_the_destination_cannot_keep_is_named_in_the_hint(tmp_path, tiny_encoder):
    pytest.importorskip("pymilvus")
    src, dst = tmp_path / "src", tmp_path / "m.db"
    with Collection.create(src, model=tiny_encoder, colbert_quantization="binary1") as col:
        col.add(["alpha beta", "gamma delta"], ids=["a", "b"])
    with pytest.raises(ValueError, match=r"--colbert-dtype float16 --colbert-quantization none"):
        migrate(src, dst)
    with pytest.raises(ValueError, match=r"\(CLI: --colbert-quantization none\)"):
        migrate(src, dst, layout={"colbert_dtype": "float16"})
    assert migrate(src, dst, layout={"colbert_dtype": "float16", "colbert_quantization": None})["copied"] == 2


def test_migrate_refuses_bad_targets(tmp_path, tiny_encoder, source):
    src, *_ = source
    Collection.create(tmp_path / "taken", model=tiny_encoder).close()
    with pytest.raises(CollectionExistsError):
        migrate(src, tmp_path / "taken")
    with pytest.raises(ValueError, match="same location"):
        migrate(src, str(src))
    for inside in (src / "sub", src / "sub" / "m.db", tmp_path / "x" / ".." / "src" / "copy"):  # nested in the source
        with pytest.raises(ValueError, match="is inside the source"):
            migrate(src, inside)
        assert not inside.exists()
    with pytest.raises(CollectionNotFoundError):
        migrate(tmp_path / "nothing", tmp_path / "dst")
    with pytest.raises(ValueError, match="batch_size"):
        migrate(src, tmp_path / "dst", batch_size=0)


def test_a_symlink_to_the_source_is_the_same_location(tmp_path, source):
    """A destination that is a symlink to the source (or the source reached through one) is the source itself:
    it was refused as "inside the source", as if the copy went into a folder of it."""
    src, *_ = source
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    for a, b in ((src, tmp_path / "link"), (tmp_path / "link", src)):
        with pytest.raises(ValueError, match="same location"):
            migrate(a, b)
    with pytest.raises(ValueError, match="cannot change in place"):
        migrate(src, tmp_path / "link", layout={"colbert_dtype": "float32"})


def test_a_home_relative_location_is_compared_where_the_engine_puts_it(tmp_path, source, monkeypatch):
    """The engines expand "~", the checks did not: migrate("~/src", "<home>/src/sub") wrote the copy inside the
    source's folder, and "~/src" to "<home>/src" was refused as an existing collection, not as the source."""
    src, *_ = source
    monkeypatch.setenv("HOME", str(tmp_path))
    for a, b in (("~/src", src / "sub"), (src, "~/src/sub")):
        with pytest.raises(ValueError, match="is inside the source"):
            migrate(a, b)
    assert not (src / "sub").exists()
    with pytest.raises(ValueError, match="same location"):
        migrate("~/src", src)


def test_a_destination_through_a_symlink_to_nothing_says_so(tmp_path, source):
    """A link made ahead to where the copy should live (ln -s /big/disk/cran dst) before that folder exists:
    migrate failed with "[Errno 17] File exists: 'dst'" (a Milvus Lite file there said its folder is missing)."""
    src, *_ = source
    link, target = tmp_path / "link", tmp_path / "big" / "cran"
    link.symlink_to(target, target_is_directory=True)
    for dst in (link, link / "sub"):
        with pytest.raises(CollectionNotFoundError, match=rf"{link} is a symlink to {target}, which does not exist"):
            migrate(src, dst)
    assert not target.exists()
    target.mkdir(parents=True)  # as the error says to
    assert migrate(src, link)["copied"] == 90


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"schema_version": 99}, ValueError, "schema version 99; this m3search reads up to"),
        ({"schema_version": "x"}, ValueError, r"damaged \(schema_version 'x' is not an integer\)"),
        ({"schema_version": None}, ValueError, r"damaged \(schema_version None is not an integer\)"),
        ({"format": "other"}, CollectionNotFoundError, "has no m3search manifest"),
        ({"model": None}, ValueError, r"damaged \(no model record\)"),
    ],
)
def test_migrate_refuses_what_open_refuses(tmp_path, source, change, error, match):
    """migrate skipped Collection.open's manifest checks: a newer schema version was copied and relabelled
    with this version's, a damaged manifest copied as it was; open's int() gave a raw message for 'x'."""
    src, *_ = source
    path = src / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(error, match=match):
        Collection.open(src)
    with pytest.raises(error, match=match):
        migrate(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def long_source(folder, encoder, engine: str = "qdrant-edge"):
    """A collection of 16-token windows holding short documents, one of ~7 windows (its characters estimate
    it past the piece :func:`piece_of` gives, its tokens fit) and one of ~70 (several pieces): its location,
    ids, queries, every window (:func:`windows`) and the hits of every mode (:func:`snapshot`)."""
    texts, ids, meta = corpus(12)
    texts += [" ".join(BUILTIN_TEXTS[:2]), " ".join(BUILTIN_TEXTS[k % len(BUILTIN_TEXTS)] for k in range(24))]
    ids += ["medium", "long"]
    meta += [{"i": 12, "lang": "de", "nested": {"k": 1}}, {"i": 13, "lang": "de", "nested": {"k": 2}}]
    loc = location(engine, folder)
    with Collection.create(loc, model=encoder, colbert_dtype="float16", window=16, stride=12) as col:
        col.add(texts, ids=ids, metadata=meta)
        queries = [BUILTIN_TEXTS[1][:30], " ".join(texts[3].split()[:4]) or "x"]
        return loc, ids, queries, windows(col, ids), snapshot(col, queries)


def piece_of(col_windows: list, encoder) -> int:
    """PIECE_BYTES for :func:`long_source`: 150 tokens, or the medium document's tokens where the tokenizer cuts
    it into more (the built-in texts' tokenizer of a clone without ../shared: 178); past the medium document's
    character estimate (so it is read in ranges) and its tokens (so it is written whole), a fraction of the long
    one's."""
    per_token = 4 * encoder.colbert_dim
    tokens = [sum(len(w[4]) // per_token for w in doc) for doc in col_windows]
    piece_tokens = max(150, sorted(tokens)[-2])
    assert sorted(tokens)[-2] <= piece_tokens < 4 * piece_tokens < tokens[-1] and len(col_windows[-1]) > 50, tokens
    return piece_tokens * per_token


@pytest.mark.parametrize("engine", ENGINES)
def test_migrate_holds_a_piece_of_vectors_at_a_time(tmp_path, tiny_encoder, monkeypatch, engine):
    """migrate read a document whole, every window's vectors at once (a 10 MB text that ingest wrote a piece
    at a time needed 10 GB); it reads a range of windows estimated to fit PIECE_BYTES at a time (get_windows'
    ``windows``, on every engine) and writes a document larger than a piece through upsert_long, a smaller one
    in one upsert as before; the copy is the same, window for window, and scores the same in every mode."""
    import m3search.collection
    from m3search.engines import resolve_engine
    from m3search.engines.qdrant_edge import QdrantEdgeEngine

    src, ids, queries, before, hits = long_source(tmp_path / "src", tiny_encoder, engine)
    piece, per_token = piece_of(before, tiny_encoder), 4 * tiny_encoder.colbert_dim
    monkeypatch.setattr(m3search.collection, "PIECE_BYTES", piece)
    seen: dict[str, list] = {"read": [], "write": [], "long": [], "whole": []}
    src_cls = resolve_engine(src)
    orig_get, orig_upsert, orig_long = src_cls.get_windows, QdrantEdgeEngine.upsert, QdrantEdgeEngine.upsert_long

    def get_windows(self, ids, **kw):
        out = orig_get(self, ids, **kw)
        seen["read"].append(sum(len(r.colbert) for ws in out for r in ws if r.colbert is not None) * per_token)
        return out

    def upsert(self, batch):
        seen["whole"] += batch.ids
        seen["write"].append(len(batch.colbert) * per_token)
        return orig_upsert(self, batch)

    def upsert_long(self, pieces):
        def note(p):
            seen["long"].append(p.ids[0])
            seen["write"].append(len(p.colbert) * per_token)
            return p

        return orig_long(self, (note(p) for p in pieces))

    monkeypatch.setattr(src_cls, "get_windows", get_windows)
    monkeypatch.setattr(QdrantEdgeEngine, "upsert", upsert)
    monkeypatch.setattr(QdrantEdgeEngine, "upsert_long", upsert_long)
    assert migrate(src, tmp_path / "dst", batch_size=256)["copied"] == len(ids)
    assert max(seen["write"]) <= piece and max(seen["read"]) <= piece, seen
    assert set(seen["long"]) == {"long"} and len(seen["long"]) >= 4 and "medium" in seen["whole"], seen
    monkeypatch.undo()
    with Collection.open(tmp_path / "dst", model=tiny_encoder) as copy:
        assert windows(copy, ids) == before
        (identical if engine == "qdrant-edge" else close_to)(hits, snapshot(copy, queries))
    with Collection.open(src, model=tiny_encoder) as col:  # a range of windows is that part of the whole
        assert windows(col, ids, windows=range(3, 9)) == [doc[3:9] for doc in before]
        assert windows(col, ids, windows=range(1, 2)) == [doc[1:2] for doc in before]


def test_an_interrupted_long_copy_leaves_no_collection(tmp_path, tiny_encoder, monkeypatch):
    """A migration stopped part-way through a long document (its upsert_long after two pieces, or its source
    document rewritten between two reads of its windows: WriteConflictError, not a copy of two versions)
    leaves a destination that does not open; the rerun copies it whole."""
    import m3search.collection
    from m3search.engines.qdrant_edge import QdrantEdgeEngine
    from m3search.errors import WriteConflictError

    src, ids, queries, before, hits = long_source(tmp_path / "src", tiny_encoder)
    monkeypatch.setattr(m3search.collection, "PIECE_BYTES", piece_of(before, tiny_encoder))
    dst = tmp_path / "dst"
    real_long, real_get = QdrantEdgeEngine.upsert_long, QdrantEdgeEngine.get_windows

    def stopped(self, pieces):
        def two_then_stop():
            it = iter(pieces)
            yield next(it)
            yield next(it)
            raise KeyboardInterrupt("stopped")

        real_long(self, two_then_stop())

    monkeypatch.setattr(QdrantEdgeEngine, "upsert_long", stopped)
    with pytest.raises(KeyboardInterrupt):
        migrate(src, dst)
    with pytest.raises(CollectionNotFoundError):
        Collection.open(dst, model=tiny_encoder)
    monkeypatch.setattr(QdrantEdgeEngine, "upsert_long", real_long)

    def rewritten_meanwhile(self, ids, *, windows=None, **kw):
        out = real_get(self, ids, windows=windows, **kw)
        return [ws[:-1] if i == "long" and windows and windows.start else ws for i, ws in zip(ids, out)]

    monkeypatch.setattr(QdrantEdgeEngine, "get_windows", rewritten_meanwhile)
    with pytest.raises(WriteConflictError, match="'long' changed while migrate copied it") as err:
        migrate(src, dst)
    assert err.value.ids == ["long"]
    with pytest.raises(CollectionNotFoundError):
        Collection.open(dst, model=tiny_encoder)
    monkeypatch.setattr(QdrantEdgeEngine, "get_windows", real_get)
    assert migrate(src, dst)["copied"] == len(ids)
    with Collection.open(dst, model=tiny_encoder) as copy:
        assert windows(copy, ids) == before
        identical(hits, snapshot(copy, queries))
