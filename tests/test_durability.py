"""Crash safety: a real subprocess ingesting in batches is killed with SIGKILL at random moments.

After each kill the collection must open, every batch whose ``add`` returned (the child
prints a line after each) must be fully present and searchable, and no batch may be
partially written. The child writes precomputed embeddings (no model load), so each
round costs one interpreter start plus the random time before the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict

import numpy as np
import pytest

from m3search.collection import Collection
from m3search.testing import BUILTIN_TEXTS

BATCH = 16
POOL = 64
ROUNDS = 50  # issue 12: 50 kill -9 rounds in the heavy suite

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, scipy.sparse as sp
    from m3search.collection import Collection
    from m3search.encoder import M3Embeddings

    path, pool_file, start, batch, optimize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    z = np.load(pool_file)
    texts = json.loads(str(z["texts"]))
    emb = M3Embeddings(z["dense"], sp.csr_matrix((z["sp_data"], z["sp_indices"], z["sp_indptr"]), shape=tuple(z["sp_shape"])),
                       z["colbert"], z["offsets"], z["n_tokens"])
    col = Collection.open(path)
    print("ready", flush=True)
    b = start
    while True:
        rows = [(b * batch + j) % len(texts) for j in range(batch)]
        col.add([texts[r] for r in rows], ids=[f"b{b}-{j}" for j in range(batch)],
                metadata=[{"batch": b, "row": r} for r in rows], embeddings=emb[np.array(rows)], optimize=optimize)
        print(f"done {b}", flush=True)
        b += 1
    """
)


@pytest.fixture(scope="module")
def pool(tiny_encoder, tmp_path_factory):
    rng = np.random.default_rng(0)
    words = " ".join(BUILTIN_TEXTS).split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 80)))) for _ in range(POOL)]
    emb = tiny_encoder.encode(texts)
    f = tmp_path_factory.mktemp("pool") / "pool.npz"
    s = emb.sparse
    np.savez(
        f,
        texts=json.dumps(texts),
        dense=emb.dense,
        sp_data=s.data,
        sp_indices=s.indices,
        sp_indptr=s.indptr,
        sp_shape=np.array(s.shape),
        colbert=emb.colbert,
        offsets=emb.colbert_offsets,
        n_tokens=emb.n_tokens,
    )
    return texts, emb, f


def _check(path, texts, emb, acknowledged: set[int]) -> int:
    """Open after a crash; verify batches; return the next batch number to write."""
    with Collection.open(path) as col:
        present = defaultdict(list)
        for batch in col.engine.iter_batches(256, with_vectors=False):
            for doc_id, meta in zip(batch.ids, batch.metadata):
                b, j = map(int, doc_id[1:].split("-"))
                assert meta["batch"] == b
                present[b].append(j)
        for b, js in present.items():
            assert sorted(js) == list(range(BATCH)), f"batch {b} is partial: {sorted(js)}"
        assert acknowledged <= set(present), f"acknowledged batches lost: {sorted(acknowledged - set(present))}"
        assert col.count() == BATCH * len(present)
        if present:  # the newest batch is searchable in every first-stage index
            b = max(present)
            rows = [(b * BATCH + j) % len(texts) for j in range(BATCH)]
            r = rows[0]
            # k = everything: the pool's texts repeat every POOL // BATCH batches, so after ~130 batches
            # more than 2 x BATCH stored documents tie at score 1.0 with this one.
            hits = col.search_batch(
                ["q"], k=col.count(), mode="dense", query_embeddings=emb[np.array([r])], exact=True
            )[0]
            mine = {h.id: h.score for h in hits}
            assert mine[f"b{b}-0"] == pytest.approx(hits[0].score, abs=1e-5)  # its own vector: a top score
            hits = col.search_batch(["q"], k=col.count(), mode="sparse", query_embeddings=emb[np.array([r])])[0]
            if emb.sparse[r].nnz:
                assert f"b{b}-0" in {h.id for h in hits}
            rec = col.get([f"b{b}-0"])[0]
            assert rec.text == texts[r]
        return max(present, default=-1) + 1


def _kill_rounds(path, encoder, pool, rounds: int, optimize: bool = True) -> None:
    texts, emb, pool_file = pool
    Collection.create(path, model=encoder).close()
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    acknowledged: set[int] = set()
    start = 0
    for r in range(rounds + 5):  # a few more kills when a loaded machine let no batch finish before them
        if r >= rounds and acknowledged:
            break
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(pool_file), str(start), str(BATCH), str(int(optimize))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = child.stdout.readline()
        assert line.strip() == "ready", child.stderr.read()
        time.sleep(float(rng.uniform(0.0, 0.4)) + 0.5 * max(0, r - rounds + 1))  # extra kills: later ones
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL
        acknowledged |= {int(x.split()[1]) for x in out.splitlines() if x.startswith("done ")}
        start = _check(path, texts, emb, acknowledged)
    assert acknowledged  # the child got real work done between kills
    print(f"\n{r + 1} kills, {len(acknowledged)} batches acknowledged, {start} batches stored")


def test_kill_9_smoke(tmp_path, tiny_encoder, pool):
    """Three kills: the default suite's quick version of the heavy test below."""
    _kill_rounds(tmp_path / "col", tiny_encoder, pool, rounds=3)


def test_kill_9_keeps_writes_acknowledged_without_optimize_or_flush(tmp_path, tiny_encoder, pool):
    """``add(optimize=False)`` (the server's ingest) neither optimizes nor flushes: what it acknowledged
    lives only in the write-ahead log, which must survive the kill."""
    _kill_rounds(tmp_path / "col", tiny_encoder, pool, rounds=5, optimize=False)


@pytest.mark.heavy
def test_kill_9_during_ingest_loses_nothing_acknowledged(tmp_path, tiny_encoder, pool):
    _kill_rounds(tmp_path / "col", tiny_encoder, pool, rounds=ROUNDS)
