"""Collection lifecycle, CRUD, search arguments, bad input and the one-process lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from m3search import Collection, Hit
from m3search.collection import CollectionExistsError, CollectionInUseError, CollectionNotFoundError, ModelMismatchError
from m3search.plan import SearchPlan

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Retrieval systems combine dense, sparse and multi-vector representations.",
    "Die schnelle braune Katze springt über den faulen Hund am Fluss.",
    "Aerodynamic heating of a slender body in hypersonic flow at high Mach number.",
    "The boundary layer transition depends on the Reynolds number and pressure gradient.",
    "Prime minister announced new elections after the parliament vote in the capital.",
    "",
]
IDS = [f"d{i}" for i in range(len(TEXTS))]
META = [
    {"lang": "de" if i == 2 else "en", "n": i, "topic": "aero" if i in (3, 4) else "misc"} for i in range(len(TEXTS))
]


@pytest.fixture
def col(tmp_path, tiny_encoder):
    c = Collection.create(tmp_path / "col", model=tiny_encoder)
    c.add(TEXTS, ids=IDS, metadata=META)
    yield c
    c.close()


def test_create_add_reopen(tmp_path, tiny_encoder, tiny_model_path):
    path = tmp_path / "c"
    c = Collection.create(path, model=tiny_encoder, batch_size=2)
    assert c.add(TEXTS[:3], ids=IDS[:3]) == IDS[:3]
    generated = c.add(["no id given"])
    assert len(generated) == 1 and isinstance(generated[0], str)
    c.close()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["identity"] == tiny_encoder.identity
    assert manifest["schema"]["colbert_dtype"] == "turbo8"  # the embedded engine's default layout
    assert manifest["schema"]["dense_dim"] == tiny_encoder.hidden_size
    assert manifest["settings"]["batch_size"] == 2
    with Collection.open(path) as c2:  # model=None: the recorded model, loaded lazily
        assert c2.count() == 4
        assert c2.search("brown fox", k=1)[0].id == "d0"
    with Collection.open(path, model=str(tiny_model_path)) as c3:
        assert c3.count() == 4
    with pytest.raises(CollectionExistsError):
        Collection.create(path, model=tiny_encoder)


def test_create_never_removes_a_users_files(tmp_path, tiny_encoder):
    """A folder holding only a subfolder named "shard" was taken for a dead create's leftover and deleted."""
    user = tmp_path / "mydata"
    (user / "shard").mkdir(parents=True)
    (user / "shard" / "thesis.tex").write_text("precious")
    with pytest.raises(CollectionExistsError, match="not empty"):
        Collection.create(user, model=tiny_encoder)
    assert (user / "shard" / "thesis.tex").read_text() == "precious"
    # what a create killed before its manifest leaves (lock file, shard) is still taken over
    Collection.create(tmp_path / "dead", model=tiny_encoder).close()
    (tmp_path / "dead" / "manifest.json").unlink()
    with Collection.create(tmp_path / "dead", model=tiny_encoder) as c:
        assert c.count() == 0


def test_open_with_other_model_is_clear_error(tmp_path, tiny_encoder, tiny_alt_model_path):
    path = tmp_path / "c"
    Collection.create(path, model=tiny_encoder).close()
    with pytest.raises(ModelMismatchError, match="was built with model"):
        Collection.open(path, model=str(tiny_alt_model_path))
    # The failed open released the lock.
    Collection.open(path).close()


def _backbone_tuned(base, folder):
    """A copy of the model in ``base`` whose model.safetensors alone differs (a backbone-only fine-tune): same
    size, even the same mtime."""
    import shutil

    from safetensors.torch import load_file, save_file

    tuned = shutil.copytree(base, folder)
    weights, was = tuned / "model.safetensors", base / "model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(was.stat().st_atime_ns, was.stat().st_mtime_ns))
    assert weights.stat().st_size == was.stat().st_size and weights.read_bytes() != was.read_bytes()
    return tuned


OTHER_WEIGHTS = "has the same config, heads and tokenizer but other transformer weights"


def test_a_backbone_only_fine_tune_is_refused_and_a_copy_of_the_model_is_not(tmp_path, tiny_encoder, tiny_model_path):
    """The identity hashes config, heads and tokenizer, not model.safetensors: a backbone-only fine-tune made
    elsewhere opened its base model's collection and searched the vectors the base model stored, silently. The
    manifest records the weights fingerprint too: such a model is refused however it comes (a path, an encoder,
    a served encoder, the recorded folder overwritten), while a copy of the same model elsewhere (other path,
    other mtimes) opens."""
    import shutil

    from m3search import M3Encoder

    base = shutil.copytree(tiny_model_path, tmp_path / "base")
    path = tmp_path / "c"
    with Collection.create(path, model=str(base), device="cpu", dtype="float32") as c:
        c.add(TEXTS, ids=IDS)
    tuned = _backbone_tuned(base, tmp_path / "tuned")
    encoder = M3Encoder.from_pretrained(str(tuned), device="cpu", dtype="float32")
    assert encoder.identity == tiny_encoder.identity  # what the check had to tell them apart by
    for model in (str(tuned), encoder):
        with pytest.raises(ModelMismatchError, match=OTHER_WEIGHTS):
            Collection.open(path, model=model)
    with Collection.open(path) as c:
        with pytest.raises(ModelMismatchError, match=OTHER_WEIGHTS):
            c.use_encoder(encoder)  # as the server hands its encoder over

    copy = shutil.copytree(base, tmp_path / "copy")
    for f in copy.iterdir():
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    for model in (str(copy), M3Encoder.from_pretrained(str(copy), device="cpu", dtype="float32")):
        with Collection.open(path, model=model) as c:
            assert c.search("brown fox", k=1)[0].id == "d0"

    shutil.copy(tuned / "model.safetensors", base / "model.safetensors")  # the recorded folder overwritten
    with Collection.open(path) as c, pytest.raises(ModelMismatchError, match="different model \\(the same config"):
        c.search("brown fox", k=1)


def test_a_collection_made_before_weights_fingerprints_opens_as_before(tmp_path, tiny_encoder, tiny_model_path):
    """A manifest without the weights fingerprint (a collection made by an older m3search) is checked by identity
    alone, as it was, and opening it writes nothing; a fingerprint that is not a string is damage."""
    from m3search.errors import CollectionDamagedError

    path = tmp_path / "c"
    with Collection.create(path, model=tiny_encoder) as c:
        c.add(TEXTS, ids=IDS)
    manifest = path / "manifest.json"
    good = json.loads(manifest.read_text())
    assert good["model"]["weights_fingerprint"] == tiny_encoder.weights_fingerprint
    del good["model"]["weights_fingerprint"]
    manifest.write_text(json.dumps(good))
    before = manifest.read_bytes()
    tuned = _backbone_tuned(tiny_model_path, tmp_path / "tuned")
    with Collection.open(path, model=str(tuned), device="cpu", dtype="float32") as c:
        assert len(c.search("brown fox", k=1)) == 1
    assert manifest.read_bytes() == before
    # nor are its weights read: a model file it does not fingerprint cannot fail an open that never needed it
    import m3search.encoder

    def unread(folder):
        raise AssertionError("fingerprinted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m3search.encoder, "weights_fingerprint", unread)
        Collection.open(path, model=str(tuned)).close()
    manifest.write_text(json.dumps({**good, "model": {**good["model"], "weights_fingerprint": 5}}))
    with pytest.raises(CollectionDamagedError, match=r"damaged \(model weights_fingerprint 5 is not a string\)"):
        Collection.open(path)


def test_open_missing_and_model_from_env(tmp_path, tiny_model_path, monkeypatch):
    with pytest.raises(CollectionNotFoundError, match="no collection"):
        Collection.open(tmp_path / "nothing")
    monkeypatch.delenv("M3SEARCH_MODEL", raising=False)
    with pytest.raises(ValueError, match="M3SEARCH_MODEL"):
        Collection.create(tmp_path / "x")
    monkeypatch.setenv("M3SEARCH_MODEL", str(tiny_model_path))
    with Collection.create(tmp_path / "y", device="cpu", dtype="float32") as c:
        assert c.manifest["model"]["folder"] == str(tiny_model_path.resolve())
    with pytest.raises(TypeError, match="unknown collection setting"):
        Collection.create(tmp_path / "z", colbert_dtyp="float32")


def test_add_rejects_existing_ids_and_writes_nothing(col):
    with pytest.raises(ValueError, match=r"already exist: \['d1'\]") as exc:
        col.add(["new one", "dup"], ids=["fresh", "d1"])
    assert "nothing was written" in str(exc.value)
    assert col.get(["fresh"]) == [None]
    assert col.count() == len(TEXTS)
    with pytest.raises(ValueError, match="duplicate ids"):
        col.add(["a", "b"], ids=["x", "x"])
    with pytest.raises(ValueError, match="2 texts but 1 ids"):
        col.add(["a", "b"], ids=["x"])
    with pytest.raises(TypeError, match="strings"):
        col.add(["a", 3])
    with pytest.raises(TypeError, match=r"metadata\[0\]"):
        col.add(["a"], metadata=["not a dict"])
    with pytest.raises(ValueError, match="JSON"):
        col.add(["a"], metadata=[{"x": float("nan")}])
    with pytest.raises(ValueError, match="texts is empty"):
        col.add([])
    assert col.count() == len(TEXTS)


def test_an_ingest_asked_to_stop_stops_between_batches_and_names_what_it_wrote(tmp_path, tiny_encoder):
    """``stop`` (how a server shutting down ends a long write) is asked before each batch: the batches before it
    are stored whole, the rest not at all, and the error names the documents written."""
    from m3search.errors import IngestInterrupted

    c = Collection.create(tmp_path / "col", model=tiny_encoder)
    asked = []
    with pytest.raises(IngestInterrupted) as exc:
        c.upsert(TEXTS, ids=IDS, metadata=META, batch_size=2, stop=lambda: asked.append(1) or len(asked) > 2)
    assert exc.value.ids == IDS[:4] and exc.value.total == len(TEXTS)
    assert "after 4 of 7 documents" in str(exc.value)
    assert c.count() == 4
    assert [d.text if d else None for d in c.get(IDS)] == TEXTS[:4] + [None] * 3
    c.close()


def test_upsert_get_update_delete(col):
    col.upsert(["replaced text"], ids=["d1"], metadata=[{"lang": "xx"}])
    r = col.get(["zz", "d1", "d0"])
    assert r[0] is None and r[1].text == "replaced text" and r[1].metadata == {"lang": "xx"} and r[2].id == "d0"
    assert col.count() == len(TEXTS)
    col.update_metadata(["d0", "d2"], {"lang": "fr"})
    col.update_metadata(["d3", "d4"], [{"k": 1}, {"k": 2}])
    got = col.get(["d0", "d2", "d3", "d4"])
    assert [g.metadata for g in got] == [{"lang": "fr"}, {"lang": "fr"}, {"k": 1}, {"k": 2}]
    assert got[0].text == TEXTS[0]  # text and vectors untouched
    assert col.search("brown fox", k=1, filter={"lang": "fr"})[0].id == "d0"
    with pytest.raises(ValueError, match=r"unknown id\(s\): \['nope'\]"):
        col.update_metadata(["d0", "nope"], {"lang": "de"})
    assert col.get("d0")[0].metadata == {"lang": "fr"}
    assert col.delete(["d0", "nope", "d5", "d0"]) == {"deleted": ["d0", "d5"], "missing": ["nope"]}
    assert col.count() == len(TEXTS) - 2
    assert col.get(["d0"]) == [None]
    found = [h.id for h in col.search("brown fox", k=10)]  # every document left, the deleted ones not
    assert len(found) == min(10, col.count()) and not {"d0", "d5"} & set(found)


def test_empty_text_is_a_document(col):
    rec = col.get(["d6"])[0]
    assert rec.text == ""
    hits = col.search("anything at all", k=len(TEXTS), mode="dense")
    assert "d6" in [h.id for h in hits]
    empty = [h for h in hits if h.id == "d6"][0]
    assert empty.scores["sparse"] == 0.0


def test_search_results_shape_and_order(col):
    hits = col.search("hypersonic flow", k=3)
    assert len(hits) == 3 and all(isinstance(h, Hit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for h in hits:
        assert set(h.scores) == {"dense", "sparse", "colbert"}
        assert h.text == TEXTS[int(h.id[1:])] and h.metadata == META[int(h.id[1:])]
        assert h.explain is None
    d = hits[0].to_dict()
    assert json.loads(json.dumps(d))["id"] == hits[0].id
    batch = col.search_batch(["hypersonic flow", "brown fox"], k=3)
    assert [h.id for h in batch[0]] == [h.id for h in hits]
    assert batch[1][0].id == col.search("brown fox", k=1)[0].id


def test_candidate_scores_takes_a_list_of_queries_as_search_batch_does(col):
    """A string was taken as its characters, each one query ("brown" scored five pools, one per letter)."""
    with pytest.raises(TypeError, match="queries must be a list of strings"):
        col.candidate_scores("brown", candidates=5)
    ((ids, scores),) = col.candidate_scores(["brown fox"], candidates=5)
    assert ids and all(len(scores[m]) == len(ids) for m in ("dense", "sparse", "colbert"))


def test_weights_change_the_fusion(col):
    only_dense = col.search("brown fox", k=5, mode="all", weights=(1, 0, 0))
    for h in only_dense:
        assert h.score == pytest.approx(h.scores["dense"], abs=1e-6)
    only_colbert = col.search("brown fox", k=5, mode="dense+colbert", weights=(0, 5, 1))
    for h in only_colbert:  # the sparse weight is ignored: sparse is not in the mode
        assert h.score == pytest.approx(h.scores["colbert"], abs=1e-6)


def test_weights_computed_with_numpy_are_taken_as_their_values(col):
    """An array, or NumPy scalars that are not Python floats (float32, int64), was refused: "must be three
    numbers, got array([...])", "weight for dense must be a finite number, got np.float32(0.5)"."""
    expected = [(h.id, h.score) for h in col.search("brown fox", k=5, weights=(0.5, 0.25, 1))]
    for weights in (
        np.array([0.5, 0.25, 1.0], np.float32),
        [np.float32(0.5), np.float16(0.25), np.int64(1)],
    ):
        assert [(h.id, h.score) for h in col.search("brown fox", k=5, weights=weights)] == expected
    with pytest.raises(ValueError, match="weight for sparse must be a finite number"):
        col.search("brown fox", weights=[np.float32(1), np.bool_(True), 1])


def test_filter_inside_candidate_queries(col):
    hits = col.search("brown fox", k=2, filter={"topic": "aero"})
    assert {h.id for h in hits} == {"d3", "d4"}  # k hits even though they rank low without the filter
    hits = col.search("x", k=5, filter={"n": {"in": [1, 2]}}, mode="dense")
    assert sorted(h.id for h in hits) == ["d1", "d2"]  # every match and only matches, though k = 5
    unfiltered = {h.id: h.score for h in col.search("x", k=len(TEXTS), mode="dense")}
    assert [h.id for h in hits] == sorted(["d1", "d2"], key=lambda i: (-unfiltered[i], i))
    assert all(h.score == pytest.approx(unfiltered[h.id], abs=1e-6) for h in hits)
    assert col.count({"lang": "de"}) == 1
    assert col.search("brown fox", filter={"lang": "none"}) == []


def test_explain(col):
    hits = col.search("brown fox river", k=2, explain=True)
    ex = hits[0].explain
    assert ex["fusion"] == "weighted" and ex["modes"] == ["dense", "sparse", "colbert"]
    assert sum(ex["contributions"].values()) == pytest.approx(hits[0].score, abs=1e-9)
    toks = ex["matched_tokens"]
    assert toks and all(isinstance(t["token"], str) and t["token"] for t in toks)
    assert sum(t["product"] for t in toks) == pytest.approx(hits[0].scores["sparse"], abs=1e-5)
    assert [t["product"] for t in toks] == sorted((t["product"] for t in toks), reverse=True)
    assert set(ex["found_by"]) <= {"dense", "sparse"} and ex["found_by"]
    rrf = col.search("brown fox river", k=2, fusion="rrf", explain=True)[0].explain
    assert sum(rrf["contributions"].values()) == pytest.approx(
        col.search("brown fox river", k=1, fusion="rrf")[0].score
    )


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(mode="hybrid"), ValueError, "unknown mode 'hybrid'"),
        (dict(mode="dense+dense"), ValueError, "mode 'dense\\+dense' names dense more than once"),
        (dict(mode=3), TypeError, "mode must be a string"),
        (dict(weights=(1, 1)), ValueError, "three numbers"),
        (dict(weights=(1, -1, 1)), ValueError, "must not be negative"),
        (dict(weights=(1, float("nan"), 1)), ValueError, "finite"),
        (dict(weights="abc"), ValueError, "three numbers"),
        (dict(weights=(0, 1, 0), mode="dense+colbert"), ValueError, "zero total weight"),
        (dict(k=0), ValueError, "k must be a positive integer"),
        (dict(k=-3), ValueError, "k must be a positive integer"),
        (dict(k=2.5), ValueError, "k must be a positive integer"),
        (dict(candidates=0), ValueError, "candidates must be a positive integer"),
        (dict(fusion="max"), ValueError, "unknown fusion"),
        (dict(filter={"x": {"bad": 1}}), ValueError, "unknown operator"),
        (dict(exact=1), TypeError, "exact must be true or false"),
        (dict(explain="no"), TypeError, "explain must be true or false"),
        # NumPy's int is named int too: the message said "must be true or false, not int"
        (dict(exact=np.int64(1)), TypeError, r"exact must be true or false \(a Python bool\), not numpy\.int64"),
    ],
)
def test_bad_search_arguments(col, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        col.search("brown fox", **kwargs)


def test_numpy_bools_search_as_python_bools(col, monkeypatch):
    """``exact=np.bool_(True)`` / ``explain=np.bool_(True)`` (a flag computed with NumPy) were refused with a
    TypeError, where engine options take NumPy's bool. Each counts as the Python bool it holds, and that is what
    reaches the engine and the plan."""
    seen = []
    for name in ("search_dense", "candidates_batch"):
        real = getattr(col._engine, name)
        monkeypatch.setattr(col._engine, name, lambda *a, _real=real, **kw: seen.append(kw["exact"]) or _real(*a, **kw))
    for mode in ("dense", "all"):
        want = col.search("brown fox", k=3, mode=mode, explain=True, exact=True)
        got = col.search("brown fox", k=3, mode=mode, explain=np.bool_(True), exact=np.bool_(True))
        assert [(h.id, h.score, h.explain) for h in got] == [(h.id, h.score, h.explain) for h in want]
        assert all(h.explain for h in got)
    assert len(seen) == 4 and all(e is True for e in seen)
    assert SearchPlan.build(explain=np.bool_(True)).explain is True
    assert SearchPlan.build(explain=np.bool_(False)).explain is False


def test_bad_queries(col):
    with pytest.raises(ValueError, match="query is empty"):
        col.search("")
    with pytest.raises(ValueError, match="query is empty"):
        col.search("   ")
    with pytest.raises(TypeError, match="query must be a string"):
        col.search(None)
    with pytest.raises(TypeError, match="query must be a string"):
        col.search(["a"])
    with pytest.raises(TypeError, match="list of strings"):
        col.search_batch("one string")
    with pytest.raises(TypeError, match="query must be a string"):
        col.search_batch(["ok", 5])


def test_second_open_in_same_process_is_in_use(col):
    with pytest.raises(CollectionInUseError, match=f"in use by process {os.getpid()}"):
        Collection.open(col.location)


def _open_in_child(path):
    code = textwrap.dedent(
        f"""
        import sys
        from m3search.collection import Collection, CollectionInUseError
        try:
            Collection.open({str(path)!r}).close()
        except CollectionInUseError as exc:
            print(exc); sys.exit(3)
        print("opened")
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_second_process_gets_in_use_error(col):
    res = _open_in_child(col.location)
    assert res.returncode == 3, res.stderr
    assert f"collection at {col.location} is in use by process {os.getpid()}" in res.stdout
    # The refused process changed nothing: the holder keeps writing and reading.
    col.add(["after the refused open"], ids=["late"])
    assert col.get(["late"])[0].text == "after the refused open"
    col.close()
    res = _open_in_child(col.location)
    assert res.returncode == 0 and "opened" in res.stdout, res.stderr + res.stdout


def _open_unwritable(path, part) -> str:
    """``Collection.open(path)`` in a child process that cannot write ``part`` (the folder or a folder in it): a
    read-only bind mount in a mount namespace of its own where this runs as root (root ignores permissions, not a
    read-only mount), else ``chmod -R a-w``. Returns what the child says: "opened", or "ErrorType: message"."""
    code = textwrap.dedent(
        """
        import sys
        from m3search import Collection
        try:
            Collection.open(sys.argv[1]).close()
            print("RESULT opened")
        except Exception as exc:
            print("RESULT", f"{type(exc).__name__}: {exc}")
        """
    )
    child = [sys.executable, "-c", code, str(path)]
    if os.geteuid() == 0:
        mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        res = subprocess.run(
            ["unshare", "-m", "sh", "-c", mount, str(part), *child], capture_output=True, text=True, timeout=120
        )
        if "RESULT" not in res.stdout and ("unshare" in res.stderr or "mount" in res.stderr):
            pytest.skip(f"running as root without a read-only mount to test with: {res.stderr.strip()}")
    else:
        subprocess.run(["chmod", "-R", "a-w", str(part)], check=True)
        try:
            res = subprocess.run(child, capture_output=True, text=True, timeout=120)
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(part)], check=True)
    assert "RESULT" in res.stdout, res.stderr
    return res.stdout.split("RESULT ", 1)[1].strip()


@pytest.mark.parametrize("part", [".", "shard"])
def test_a_folder_this_process_cannot_write_is_a_clear_error(tmp_path, tiny_encoder, part):
    """Qdrant Edge has no read-only mode (it maps its segments for writing even to search), so a collection on a
    read-only mount or in another user's folder cannot be opened. Whichever write fails first (our lock file: was a
    bare OSError; Qdrant Edge's files: was "could not open the Qdrant Edge shard"), the error says why and what to
    do, and the collection is as it was."""
    path = tmp_path / "c"
    with Collection.create(path, model=tiny_encoder) as c:
        c.add(TEXTS, ids=IDS)
    said = _open_unwritable(path, path / part)
    assert said.startswith(f"CollectionReadOnlyError: collection at {path} cannot be opened"), said
    assert "copy the folder to a writable place" in said
    with Collection.open(path, model=tiny_encoder) as c:
        assert c.count() == len(TEXTS)


def test_a_qdrant_local_storage_this_process_cannot_write_is_a_clear_error(tmp_path, tiny_encoder):
    """qdrant-client local mode opens its folder's ``.lock`` to write even to search: on a read-only mount that was a
    bare "OSError: [Errno 30] Read-only file system: '.../.lock'". Now CollectionReadOnlyError, as Qdrant Edge says
    it, and the collection is as it was."""
    pytest.importorskip("qdrant_client")
    store, loc = tmp_path / "store", f"qdrant+local://{tmp_path}/store/col"
    with Collection.create(loc, model=tiny_encoder) as c:
        c.add(TEXTS, ids=IDS)
    said = _open_unwritable(loc, store)
    assert said.startswith(f"CollectionReadOnlyError: collection at {store} cannot be opened"), said
    with Collection.open(loc, model=tiny_encoder) as c:
        assert c.count() == len(TEXTS)


def test_shards_and_replicas_are_for_distributed_engines(tiny_encoder, tmp_path):
    from m3search import Collection

    with pytest.raises(ValueError, match="shards and replicas apply to qdrant://"):
        Collection.create(tmp_path / "edge", model=tiny_encoder, shards=2)
    with pytest.raises(ValueError, match="positive integer"):
        Collection.create(f"qdrant+local://{tmp_path}/q/c", model=tiny_encoder, replicas=0)
    col = Collection.create(f"qdrant+local://{tmp_path}/q/c", model=tiny_encoder, shards=2, replicas=1)
    try:
        col.add(["sharded text"], ids=["a"])
        assert col.count() == 1
    finally:
        col.close()


def test_an_embedded_open_with_a_bad_engine_option_keeps_nothing_held(tiny_encoder, tmp_path):
    """An unknown option given to open failed in the engine's constructor (a TypeError) after the lock was taken
    and the shard loaded, both left held: the next open in this process said "in use by another process". Refused
    first now, as create refuses it; ``hnsw_ef`` is a positive integer (2.5 failed only at search)."""
    path = tmp_path / "c"
    Collection.create(path, model=tiny_encoder).close()
    for options, said in (({"bogus": 1}, r"does not take \['bogus'\]"), ({"hnsw_ef": 2.5}, "'hnsw_ef' must be")):
        with pytest.raises(ValueError, match=said):
            Collection.open(path, engine_options=options)
    with Collection.open(path, engine_options={"hnsw_ef": 64}) as c:
        assert c.count() == 0


def test_truncation_is_reported_once_per_call(tmp_path, tiny_encoder):
    import warnings

    from m3search import TruncationWarning

    c = Collection.create(tmp_path / "short", model=tiny_encoder, max_length=16, batch_size=2, max_windows=1)
    try:
        texts = [TEXTS[3] * 4, "short", TEXTS[4] * 4, TEXTS[1] * 4, "tiny"]  # 3 long ones in 3 batches
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c.add(texts)
        trunc = [w for w in caught if issubclass(w.category, TruncationWarning)]
        assert len(trunc) == 1, [str(w.message) for w in trunc]
        assert "3 of 5 document(s) exceeded max_length=16" in str(trunc[0].message)
        assert trunc[0].filename == __file__  # points at the caller's line
        assert c.count() == 5
    finally:
        c.close()


def test_pool_in_one_request_equals_the_two_first_stage_lists(col):
    """Qdrant Edge gathers a re-ranking pool with its ColBERT scores in one prefetch request;
    it must equal dense top-C ∪ sparse top-C scored separately (the engine-neutral path)."""
    from m3search.engines.base import Engine
    from m3search.engines.shapes import QueryVectors

    queries = ["brown fox river", "boundary layer Reynolds number", "Katze Hund"]
    emb = col.encoder.encode(queries, max_length=512)
    qvs = [QueryVectors.from_embeddings(emb, i) for i in range(len(queries))]
    one = col.engine.candidates_batch(emb.dense, emb.sparse, qvs, 3, exact=True, colbert=True)
    two = Engine.candidates_batch(col.engine, emb.dense, emb.sparse, qvs, 3, exact=True)
    for q, a, b, qv in zip(queries, one, two, qvs):
        assert a.colbert is not None and b.colbert is None
        a_ids = a.ids
        assert sorted(a_ids) == sorted(b.ids)
        want = col.engine.score(b.ids, qv, ("colbert",))["colbert"]
        got = dict(zip(a_ids, a.colbert))
        assert [got[i] for i in b.ids] == pytest.approx(want, abs=1e-6)
        # explain's found_by, derived from the pool's scores, names the lists that held each hit
        for h in col.search_batch([q], k=3, mode="all", candidates=3, explain=True, exact=True)[0]:
            assert set(h.explain["found_by"]) == {m for m in ("dense", "sparse") if h.id in b.found_by[m]}


@pytest.mark.parametrize("mode", ["all", "colbert", "dense+sparse"])
@pytest.mark.parametrize("fusion", ["weighted", "rrf", "dbsf"])
def test_ties_at_the_cut_go_by_id(tmp_path, tiny_encoder, mode, fusion):
    """Twelve copies of one text tie exactly; k=5 must return the five smallest ids, in id
    order, whichever of the twelve the engine lists first (ids are read only for the
    hits, so the cut must keep every candidate tied with the k-th score)."""
    copies = [f"t{i:02d}" for i in (7, 3, 11, 0, 9, 5, 1, 10, 2, 8, 6, 4)]  # inserted out of order
    with Collection.create(tmp_path / "c", model=tiny_encoder) as c:
        others = [i for i in range(6) if i != 1]
        c.add([TEXTS[i] for i in others], ids=[IDS[i] for i in others])
        c.add([TEXTS[1]] * len(copies), ids=copies)
        hits = c.search(TEXTS[1], k=5, mode=mode, fusion=fusion, candidates=50)
        scores = {h.id: h.score for h in c.search(TEXTS[1], k=20, mode=mode, fusion=fusion, candidates=50)}
    if fusion != "rrf":  # rrf's per-mode ranks break ties by id, so the copies' scores differ
        assert {scores[i] for i in copies} == {max(scores.values())}
    assert [h.id for h in hits] == sorted(copies)[:5]


@pytest.mark.parametrize(
    "text", ["{}", '{"schema": ', "[]", '{"schema": {"dense_dim": 0}}', "\xff", "no model"], ids=lambda t: t[:9]
)
def test_a_damaged_manifest_says_so(tmp_path, tiny_encoder, text):
    """A hand-edited or truncated manifest gave "Error: 'schema'" or the JSON parser's words."""
    path = tmp_path / "c"
    Collection.create(path, model=tiny_encoder).close()
    manifest = path / "manifest.json"
    if text == "no model":
        good = json.loads(manifest.read_text())
        del good["model"]
        text = json.dumps(good)
    manifest.write_text(text, encoding="latin-1")
    with pytest.raises(ValueError, match="manifest.* is damaged"):
        Collection.open(path, model=tiny_encoder)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"schema": ', "(Expecting value: line 1 column 12 (char 11))"),
        ("[]", "(a JSON list, not an object)"),
        ("{}", "(no schema)"),
        ('{"schema_version": "x"}', "(schema_version 'x' is not an integer)"),
        ('{"model": null}', "(no model record)"),
    ],
)
def test_a_damaged_manifest_is_collection_damaged_error_naming_it(tmp_path, tiny_encoder, text, why):
    """A damaged manifest was a plain ValueError: over HTTP a 400 that blamed the request for the server's own
    files. Now CollectionDamagedError (still a ValueError) naming the collection; a newer schema version is not
    damage (a newer m3search reads it) and stays a plain ValueError."""
    from m3search.errors import CollectionDamagedError

    path = tmp_path / "c"
    Collection.create(path, model=tiny_encoder).close()
    manifest = path / "manifest.json"
    good = json.loads(manifest.read_text())
    if text.startswith('{"') and text.endswith("}"):  # a field of a whole manifest damaged
        text = json.dumps({**good, **json.loads(text)})
    manifest.write_text(text)
    with pytest.raises(CollectionDamagedError) as raised:
        Collection.open(path, model=tiny_encoder)
    assert str(path) in str(raised.value) and str(raised.value).split(" is damaged ")[1].startswith(why)
    manifest.write_text(json.dumps({**good, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99") as raised:
        Collection.open(path, model=tiny_encoder)
    assert not isinstance(raised.value, CollectionDamagedError)


def test_query_embeddings_are_checked_against_the_collection(col, tiny_encoder, tiny_alt_model_path):
    """A dense-only encode failed deep inside the engine ("failed to extract enum Helper"), another model's
    vectors raised Qdrant's dimension error, and in sparse mode silently matched nothing."""
    import numpy as np

    from m3search import M3Encoder

    q = ["alpha beta"]
    partial = tiny_encoder.encode(q, dense=True, sparse=False, colbert=False)
    with pytest.raises(ValueError, match="query_embeddings lack sparse, colbert"):
        col.search_batch(q, mode="dense", query_embeddings=partial)
    other = M3Encoder.from_pretrained(str(tiny_alt_model_path), dtype="float32", device="cpu")
    if other.hidden_size == tiny_encoder.hidden_size:  # same shapes: build a mismatched one by hand
        emb = tiny_encoder.encode(q)
        emb.dense = np.zeros((1, tiny_encoder.hidden_size + 1), np.float32)
    else:
        emb = other.encode(q)
    with pytest.raises(ValueError, match="do not come from this collection's model"):
        col.search_batch(q, mode="sparse", query_embeddings=emb)
    full = tiny_encoder.encode(q, max_length=col.settings["query_max_length"])
    assert [h.id for h in col.search_batch(q, query_embeddings=full)[0]] == [h.id for h in col.search(q[0])]


def test_query_embeddings_that_are_no_encoding_are_refused(col, tiny_encoder):
    """Embeddings of the right widths but not one encoding of the queries: a query without ColBERT vectors (a real
    encoding has </s> at least) failed inside Qdrant Edge ("Vector dimension error: expected dim: 64, got 0") and
    scored 0 on the other engines; rows or offsets that do not add up, or NaN, read other rows or ranked NaN."""
    import numpy as np

    from m3search.encoder import M3Embeddings

    q = ["alpha beta", "gamma"]
    e = tiny_encoder.encode(q, max_length=col.settings["query_max_length"])

    def like(**change):
        parts = {k: getattr(e, k) for k in ("dense", "sparse", "colbert", "colbert_offsets", "n_tokens")}
        return M3Embeddings(**{**parts, **change})

    cut = e.colbert_offsets[1]
    no_tokens = like(colbert=e.colbert[cut:], colbert_offsets=np.array([0, 0, len(e.colbert) - cut]))
    short = like(colbert_offsets=e.colbert_offsets[:2])
    past = like(colbert_offsets=np.array([0, cut, len(e.colbert) + 5]))
    nan = like(dense=np.where(np.arange(e.dense.shape[1]) == 0, np.nan, e.dense).astype(np.float32))
    for bad, says in [
        (no_tokens, "at least one vector per query"),
        (short, "not one encoding of 2 queries"),
        (past, "from 0 to the number of ColBERT vectors"),
        (nan, "NaN or infinite"),
    ]:
        for mode in ("dense", "colbert", "all"):
            with pytest.raises(ValueError, match=says):
                col.search_batch(q, mode=mode, query_embeddings=bad)
    assert [[h.id for h in hits] for hits in col.search_batch(q, query_embeddings=e)] == [
        [h.id for h in col.search(text)] for text in q
    ]


def test_a_device_that_is_not_here_is_named_not_blamed_on_the_model(tmp_path, tiny_encoder):
    """--device cuda on a CPU machine said "cannot load the model of collection ...: Torch not compiled with
    CUDA enabled. Pass model=<path> to Collection.open": the advice of a missing model."""
    import torch

    from m3search.encoder import DeviceError

    Collection.create(tmp_path / "c", model=tiny_encoder).close()
    bad = ["foo"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with Collection.open(tmp_path / "c", device=device) as col:
            with pytest.raises(DeviceError, match=f"device {device!r}"):
                col.search("wing")


def test_many_tied_duplicates_cost_one_more_request(tmp_path, tiny_encoder):
    """Ties at the cut are looked past once, for all tied queries together: doubling per query cost 181
    engine calls and 50x the time for 20 queries over 3,000 copies of one text."""
    with Collection.create(tmp_path / "c", model=tiny_encoder) as col:
        # 60 copies fit in the look-ahead (3 + 64): their order is the ids'; more keep the engine's past it
        col.add(["N/A"] * 60 + ["a real document"], ids=[f"d{i:04d}" for i in reversed(range(61))])
        calls = []
        real = col.engine.search_dense

        def counted(q, k, *args, **kwargs):
            calls.append((len(q), k))
            return real(q, k, *args, **kwargs)

        col.engine.search_dense = counted
        hits = col.search_batch(["N/A"] * 5, k=3, mode="dense", exact=True)
        assert calls == [(5, 4), (5, 3 + 64)]
        assert all([h.id for h in hs] == ["d0001", "d0002", "d0003"] for hs in hits)  # d0000: the real one


def test_numpy_integers_are_integers(col):
    import numpy as np

    assert [h.id for h in col.search("brown fox", k=np.int64(2), candidates=np.int32(5))] == [
        h.id for h in col.search("brown fox", k=2, candidates=5)
    ]
    col.upsert(TEXTS[:2], ids=IDS[:2], batch_size=np.int64(1))


def test_stored_weights_that_zero_a_mode_never_fail_a_request(tmp_path, tiny_encoder):
    """A default that gives the requested modes zero weight gives way to the built-in weights (a request's own
    weights are still checked): whether a tuning record is present or not."""
    with Collection.create(tmp_path / "c", model=tiny_encoder, weights=(1, 0, 1)) as c:
        c.add(TEXTS, ids=IDS)
        assert [h.id for h in c.search("brown fox", mode="sparse")][:1] == ["d0"]
        setting = {"mode": "dense+colbert", "fusion": "weighted", "weights": [1, 0, 1], "candidates": 100}
        for tuning in (None, {"how": "by hand"}):
            c.set_search_defaults(setting, tuning=tuning)
            assert c.search("brown fox", mode="sparse")[0].id == "d0"
            assert len(c.search("brown fox", mode="dense+sparse", k=3)) == 3
        with pytest.raises(ValueError, match="zero total weight"):
            c.search("brown fox", mode="sparse", weights=(1, 0, 1))


@pytest.mark.parametrize(
    "setting, words",
    [
        (dict(query_max_length=1), "query_max_length must be an integer >= 2"),
        (dict(max_length=1), "max_length must be an integer >= 2"),
        (dict(hnsw_m=1.5), "hnsw_m must be an integer >= 0"),
        (dict(hnsw_ef_construct="100"), "hnsw_ef_construct must be an integer >= 1"),
        (dict(colbert_on_disk="no"), "colbert_on_disk must be True or False"),
        (dict(dense_on_disk=1), "dense_on_disk must be True or False"),
    ],
)
def test_settings_a_collection_could_not_use_are_refused_at_creation(tmp_path, tiny_encoder, setting, words):
    with pytest.raises(ValueError, match=words):
        Collection.create(tmp_path / "c", model=tiny_encoder, **setting)
    assert not (tmp_path / "c").exists()


def test_precomputed_embeddings_must_be_finite(col, tiny_encoder):
    for part in ("dense", "sparse", "colbert"):
        emb = tiny_encoder.encode(["a new text", "another"])
        values = emb.sparse.data if part == "sparse" else getattr(emb, part)
        values[0] = float("nan")
        with pytest.raises(ValueError, match=f"embeddings.{part} holds NaN"):
            col.add(["a new text", "another"], ids=["n1", "n2"], embeddings=emb)
    assert col.get(["n1", "n2"]) == [None, None]


@pytest.mark.parametrize("part", ["dense", "colbert"])
def test_precomputed_embeddings_must_be_l2_normalized(col, tiny_encoder, part):
    """Raw (unnormalized) vectors were stored silently and ranked wrong: every score (inner product, MaxSim, their
    weighted sum) assumes BGE-M3's unit vectors. Refused naming the document and the field, nothing written, also
    where the vector is in a later batch; a bfloat16 round trip of real vectors (|norm - 1| ~ 2e-3) still passes."""
    import torch

    texts, ids = ["a new text", "another"], ["n1", "n2"]
    before = col.count()
    emb = tiny_encoder.encode(texts)
    getattr(emb, part)[-1] *= 3  # the last row's: document "n2"
    with pytest.raises(ValueError, match=f"embeddings.{part} of document 'n2' are not L2-normalized"):
        col.add(texts, ids=ids, embeddings=emb, batch_size=1)
    assert col.count() == before and col.get(ids) == [None, None]
    rounded = tiny_encoder.encode(texts)
    for name in ("dense", "colbert"):
        setattr(rounded, name, torch.from_numpy(getattr(rounded, name)).to(torch.bfloat16).float().numpy())
    assert col.add(texts, ids=ids, embeddings=rounded) == ids and col.count() == before + 2


def test_precomputed_embeddings_that_are_no_encoding_are_refused(col, tiny_encoder):
    """Given document embeddings that cannot be these texts' encoding were checked less than query embeddings: a 1-D
    dense array failed inside NumPy's einsum, offsets one short with an IndexError from the encoder module. Each is
    now the query check's ValueError (one check for both), naming ``embeddings``, and nothing is written."""
    import numpy as np

    from m3search.encoder import M3Embeddings

    texts, ids = ["a new text", "another"], ["n1", "n2"]
    e = tiny_encoder.encode(texts)

    def like(**change):
        parts = {k: getattr(e, k) for k in ("dense", "sparse", "colbert", "colbert_offsets", "n_tokens")}
        return M3Embeddings(**{**parts, **change})

    before = col.count()
    for bad, says in [
        (like(dense=e.dense[0]), "embeddings are not an M3Embeddings encoding: dense and colbert must be 2-D"),
        (like(colbert_offsets=e.colbert_offsets[:-1]), "embeddings are not one encoding of 2 documents"),
        (like(dense=np.hstack([e.dense, e.dense])), "embeddings do not come from this collection's model"),
        (like(colbert_offsets=np.array([0, 0, len(e.colbert)])), "at least one vector per document"),
    ]:
        with pytest.raises(ValueError, match=f"{says}.*; nothing was written"):
            col.add(texts, ids=ids, embeddings=bad)
    assert col.count() == before and col.get(ids) == [None, None]


def test_given_embeddings_at_the_tolerance_and_in_other_sparse_formats(col, tiny_encoder):
    """The unit-norm bound is UNIT_NORM_TOLERANCE (a norm of 1.01 is taken, 1.03 is not; a zero vector is named as
    one). A sparse matrix in another SciPy format was taken and then misread: CSC rows sliced per batch came out
    empty (wrong sparse weights written), a NaN in it named "query 2063" of 2 queries or failed with an IndexError,
    COO failed with an AttributeError. Given sparse matrices are read as CSR, rows named right."""
    import numpy as np

    from m3search.collection import UNIT_NORM_TOLERANCE

    assert 0.01 < UNIT_NORM_TOLERANCE < 0.03
    texts, ids = ["a new text", "another text here"], ["n1", "n2"]
    near = tiny_encoder.encode(texts)
    near.dense[1] *= 1.01
    far = tiny_encoder.encode(texts)
    far.dense[1] *= 1.03
    zero = tiny_encoder.encode(texts)
    zero.colbert[-1] = 0
    with pytest.raises(ValueError, match="embeddings.dense of document 'n2' are not L2-normalized"):
        col.add(texts, ids=ids, embeddings=far)
    with pytest.raises(ValueError, match=r"of document 'n2' are not L2-normalized \(a vector of norm 0: a zero vector"):
        col.add(texts, ids=ids, embeddings=zero)
    csc = tiny_encoder.encode(texts)
    csc.sparse = csc.sparse.tocsc()
    assert col.add(texts, ids=ids, embeddings=csc, batch_size=1) == ids
    want = tiny_encoder.encode(texts).sparse
    for i, rec in enumerate(col._engine.get(ids, with_vectors=["sparse"])):
        got = dict(zip(*(part.tolist() for part in rec.sparse)))
        assert got == pytest.approx(dict(zip(want[i].indices.tolist(), want[i].data.tolist())), rel=1e-6)
    assert col.add(texts, ids=["m1", "m2"], embeddings=near) == ["m1", "m2"]
    q = ["alpha beta", "gamma"]
    for fmt in ("tocsc", "tocoo"):
        emb = tiny_encoder.encode(q, max_length=col.settings["query_max_length"])
        emb.sparse = getattr(emb.sparse, fmt)()
        assert [h.id for h in col.search_batch(q, query_embeddings=emb)[1]] == [h.id for h in col.search(q[1])]
        emb.sparse = emb.sparse.tocsr()
        emb.sparse.data[-1] = np.nan  # query 1's last weight
        emb.sparse = getattr(emb.sparse, fmt)()
        with pytest.raises(
            ValueError, match=r"query_embeddings.sparse holds NaN or infinite values \(query 1 \(from 0"
        ):
            col.search_batch(q, query_embeddings=emb)


@pytest.mark.parametrize("part", ["dense", "colbert"])
def test_query_embeddings_must_be_l2_normalized(col, tiny_encoder, part):
    """Raw query vectors scaled every score of their query: refused naming the query and the field, as given
    document embeddings are (one check)."""
    q = ["alpha beta", "gamma"]
    emb = tiny_encoder.encode(q, max_length=col.settings["query_max_length"])
    getattr(emb, part)[-1] *= 0.5  # the last row's: query 1
    with pytest.raises(ValueError, match=f"query_embeddings.{part} of query 1 \\(from 0\\) are not L2-normalized"):
        col.search_batch(q, query_embeddings=emb)


def test_update_metadata_with_a_repeated_id(col):
    with pytest.raises(ValueError, match="duplicate ids in one call: \\['d1'\\]"):
        col.update_metadata(["d1", "d1"], [{"a": 1}, {"a": 2}])
    col.update_metadata(["d1", "d1"], {"a": 3})  # one dict for all: the repeat is harmless
    assert col.get("d1")[0].metadata == {"a": 3}


def test_explain_while_a_hit_loses_its_best_window(tmp_path, tiny_encoder):
    """The best window found by scoring may be gone when explain reads it (a concurrent upsert): the hit is
    explained from what is stored, not an IndexError."""
    filler = "Prime minister announced new elections after the parliament vote in the capital. " * 3
    with Collection.create(tmp_path / "w", model=tiny_encoder, window=16, stride=10) as c:
        c.add([filler + "fox river fox river dog", "gamma delta"], ids=["long", "other"])
        assert c.search("fox river", k=1, explain=True)[0].explain["window"] > 0
        read = c._engine.get_windows

        def rewritten_meanwhile(*args, **kwargs):
            c._engine.get_windows = read
            c.upsert(["fox river"], ids=["long"])
            return read(*args, **kwargs)

        c._engine.get_windows = rewritten_meanwhile
        hit = c.search("fox river", k=1, explain=True)[0]
        assert hit.id == "long" and "matched_tokens" in hit.explain


def test_a_failure_after_the_lock_releases_it(tmp_path, tiny_encoder, monkeypatch):
    """Disk full writing the owner's pid at open: the error, and this process does not keep the lock (every
    later open said 'in use by another process')."""
    from m3search.engines.qdrant_edge import QdrantEdgeEngine

    Collection.create(tmp_path / "c", model=tiny_encoder).close()
    real = QdrantEdgeEngine._write_pid

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(QdrantEdgeEngine, "_write_pid", disk_full)
    with pytest.raises(OSError, match="No space"):
        Collection.open(tmp_path / "c", model=tiny_encoder)
    monkeypatch.setattr(QdrantEdgeEngine, "_write_pid", real)
    Collection.open(tmp_path / "c", model=tiny_encoder).close()


def test_a_create_that_failed_writing_its_manifest_can_be_retried(tmp_path, tiny_encoder, monkeypatch):
    import m3search.engines.qdrant_edge as qe_mod

    real, calls = os.fsync, []

    def full_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(qe_mod.os, "fsync", full_once)
    with pytest.raises(OSError, match="No space"):
        Collection.create(tmp_path / "c", model=tiny_encoder)
    assert not list((tmp_path / "c").glob("manifest.json.tmp*"))
    monkeypatch.setattr(qe_mod.os, "fsync", real)
    Collection.create(tmp_path / "c", model=tiny_encoder).close()


def test_opening_removes_the_manifest_temporary_of_a_killed_writer(tmp_path, tiny_encoder):
    """A writer killed between its temporary and the rename leaves ``manifest.json.tmp-<pid>-<thread>``; a
    temporary per writer is never written over again, so the next holder removes it."""
    Collection.create(tmp_path / "c", model=tiny_encoder).close()
    left = tmp_path / "c" / "manifest.json.tmp-999999-1"
    left.write_text("{")
    Collection.open(tmp_path / "c", model=tiny_encoder).close()
    assert not left.exists()


def test_a_nearly_full_disk_refuses_writes_and_keeps_what_is_stored(tmp_path, tiny_encoder, monkeypatch):
    """Qdrant Edge writes through mmap: on a full disk the process died by SIGBUS. Each write (add, upsert, delete,
    update_metadata, optimize, create) now checks the free space first and refuses with InsufficientStorageError,
    writing nothing; the collection reopens with every earlier document. The free space is simulated: the check's
    one call reports what the test says."""
    import m3search.engines.qdrant_edge as qe_mod
    from m3search.errors import InsufficientStorageError, M3SearchError

    free = {"bytes": 1 << 40}
    monkeypatch.setattr(qe_mod, "free_bytes", lambda path: free["bytes"])
    c = Collection.create(tmp_path / "c", model=tiny_encoder)
    c.add(TEXTS, ids=IDS, metadata=META)
    free["bytes"] = qe_mod.DISK_RESERVE + (64 << 10)  # room for a small write, not for a large one
    c.add(["one more short text"], ids=["small"])
    many = [f"{TEXTS[i % 6]} again, copy {i}" for i in range(300)]
    with pytest.raises(
        InsufficientStorageError, match=r"not enough free disk for writing \d+ points at .*: 128\.1 MiB"
    ):
        c.add(many, ids=[f"m{i}" for i in range(300)])
    free["bytes"] = qe_mod.DISK_RESERVE - 1  # below the reserve: every kind of write is refused
    attempts = [
        lambda: c.add(["another"], ids=["x"]),
        lambda: c.upsert(["changed"], ids=["d0"]),
        lambda: c.update_metadata(["d1"], [{"lang": "fr"}]),
        lambda: c.delete(["d2"]),
        c.optimize,
        lambda: Collection.create(tmp_path / "other", model=tiny_encoder),
    ]
    for attempt in attempts:
        with pytest.raises(
            InsufficientStorageError, match=r"MiB free, about .* MiB needed .* stored documents are intact"
        ):
            attempt()
    err = pytest.raises(InsufficientStorageError, c.delete, ["d2"]).value
    assert isinstance(err, OSError) and isinstance(err, M3SearchError)
    assert c.count() == len(TEXTS) + 1 and c.search(TEXTS[0], k=1)[0].id == "d0"
    c.close()
    monkeypatch.undo()
    with Collection.open(tmp_path / "c", model=tiny_encoder) as again:
        assert again.count() == len(TEXTS) + 1
        stored = again.get([*IDS, "small", "x", "m0"])
        assert [r.text for r in stored[: len(TEXTS)]] == TEXTS and [r.metadata for r in stored[: len(TEXTS)]] == META
        assert stored[len(TEXTS)].text == "one more short text" and stored[-2:] == [None, None]
    assert not (tmp_path / "other" / "manifest.json").exists()
    Collection.create(tmp_path / "other", model=tiny_encoder).close()  # the refused create left nothing in the way


def test_qdrants_own_refusal_to_optimize_is_the_same_error(col, monkeypatch):
    """Qdrant refuses an optimize itself when the disk has less than twice the segments it rebuilds; that
    refusal (a bare Exception from Qdrant Edge, its words as measured on a full tmpfs) is the same typed error."""
    from m3search.errors import InsufficientStorageError

    engine = col._engine
    real = engine._shard

    class Full:
        def optimize(self):
            raise Exception(
                "Service runtime error: Not enough space available for optimization, needed: 9.22 MiB, "
                "available: 4.33 MiB"
            )

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(engine, "_shard", Full())
    with pytest.raises(InsufficientStorageError, match=r"needed: 9\.22 MiB, available: 4\.33 MiB.* intact"):
        col.optimize()
    monkeypatch.undo()
    assert col.count() == len(TEXTS) and col.optimize() in (True, False)


def test_a_model_folder_that_is_not_a_checkpoint_is_named_so(tmp_path, tiny_encoder):
    """Opening a collection with --model <a folder that is no model> gave "[Errno 2] ... config.json"."""
    from m3search.encoder import ModelLoadError

    Collection.create(tmp_path / "col", model=tiny_encoder).close()
    (tmp_path / "notes").mkdir()
    with pytest.raises(ModelLoadError, match="notes is not a BGE-M3 checkpoint: missing config.json"):
        Collection.open(tmp_path / "col", model=str(tmp_path / "notes"))


def test_update_metadata_refuses_a_string_and_counts_ids(tmp_path, tiny_encoder):
    """update_metadata took a str as a sequence (one "dict" per character) and spoke of texts it has none of."""
    with Collection.create(tmp_path / "col", model=tiny_encoder) as col:
        col.add(["alpha", "beta"], ids=["a", "b"])
        with pytest.raises(TypeError, match="one dict per id .*not a str"):
            col.update_metadata(["a", "b"], "ab")
        with pytest.raises(ValueError, match="^2 ids but 1 metadata entries$"):
            col.update_metadata(["a", "b"], [{"x": 1}])
        with pytest.raises(TypeError, match="one dict per text .*not a str"):
            col.add(["gamma", "delta"], ids=["c", "d"], metadata="cd")
        assert [r.metadata for r in col.get(["a", "b"])] == [{}, {}] and col.count() == 2


def test_dbsf_weights_that_overflow_a_score_are_a_clear_error(tmp_path, tiny_encoder, monkeypatch):
    """DBSF's scores grow with its weights: one candidate far past 3 sigma (here dense scores 0 but one 1, over 30
    candidates: it maps to 1 + 1.77) times a weight near float's largest (their sum finite, as the plan checks)
    was an inf score: the library's hit said inf, and HTTP answered a 400 quoting pydantic's answer model. Now a
    ValueError naming the weights; the same weights a tenth as large rank as before."""
    with Collection.create(tmp_path / "c", model=tiny_encoder) as c:
        c.add([f"note {i} on pumps" for i in range(30)], ids=[f"d{i:02d}" for i in range(30)])
        real = c.engine.score

        def outlier(ids, qv, modes, **kwargs):
            out = real(ids, qv, modes, **kwargs)
            if "dense" in out:
                out["dense"] = np.where(np.asarray(ids) == "d07", 1.0, 0.0)
            return out

        monkeypatch.setattr(c.engine, "score", outlier)
        hits = c.search("pumps", k=3, fusion="dbsf", weights=(1.7e307, 0, 0), candidates=30)
        assert hits[0].id == "d07" and np.isfinite(hits[0].score)
        with pytest.raises(ValueError, match=r"weights \(dense=1\.7e\+308, .*\) are too large: dbsf scores overflow"):
            c.search("pumps", k=3, fusion="dbsf", weights=(1.7e308, 0, 0), candidates=30)


def test_an_empty_location_is_refused_before_anything_is_written(tmp_path, tiny_encoder, monkeypatch):
    """``Collection.create("")`` made a collection in the current folder (a path of "" is "."), and open / exists /
    migrate read it there: an empty location is an unset variable, not a place. ValueError, nothing written
    ("." still names the current folder)."""
    from m3search.migrate import migrate

    monkeypatch.chdir(tmp_path)
    for call in (
        lambda: Collection.create("", model=tiny_encoder),
        lambda: Collection.open(""),
        lambda: Collection.exists(""),
        lambda: migrate("", str(tmp_path / "copy")),
    ):
        with pytest.raises(ValueError, match="collection location is empty; '.' names the current folder"):
            call()
    assert list(tmp_path.iterdir()) == []
    Collection.create(".", model=tiny_encoder).close()
    assert Collection.exists(".")
