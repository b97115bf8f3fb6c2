"""Shared by the LangChain and LlamaIndex integration tests: a small corpus and an in-process server."""

from __future__ import annotations

from contextlib import contextmanager

MODES = ("dense", "sparse", "colbert", "dense+sparse", "dense+colbert", "all")
#: every mode with BGE-M3's weighted fusion, and the rank-based fusions on re-ranking modes
RANKING_CASES = [(m, "weighted") for m in MODES] + [("all", "rrf"), ("dense+sparse", "rrf"), ("all", "dbsf")]

TEXTS = [
    "the boundary layer of a wing at high speed",
    "transition from laminar to turbulent flow",
    "heat transfer in supersonic flow over a flat plate",
    "aeroelastic models of heated high speed aircraft",
    "pressure distribution on a cone in hypersonic flow",
    "buckling of thin cylindrical shells under axial load",
    "vortex shedding behind a circular cylinder",
    "skin friction measurements in a wind tunnel",
]
IDS = [f"d{i}" for i in range(len(TEXTS))]
META = [
    {"year": 1950 + 3 * i, "topic": ["flow", "structures"][i % 2], "tags": ["a", "b"] if i % 3 == 0 else ["c"]}
    for i in range(len(TEXTS))
]
QUERIES = ["boundary layer transition", "supersonic heat transfer", "shells buckling load"]


def make_collection(path, encoder, *, docs: bool = True):
    from m3search import Collection

    col = Collection.create(path, model=encoder, colbert_dtype="float32")
    if docs:
        col.add(TEXTS, ids=IDS, metadata=META)
    return col


@contextmanager
def served(collection, *, api_key: str | None = None, **settings):
    """An :class:`M3SearchClient` talking to the real app (in-process ASGI, no socket) over ``collection``;
    ``settings``: server :class:`~m3search.server.Settings` such as ``max_batch``."""
    from fastapi.testclient import TestClient

    from m3search.client import M3SearchClient
    from m3search.server import Resources, Settings, create_app

    class Borrowed(Resources):
        def close(self) -> None:  # the test owns the collection: the app must not close it
            pass

    app = create_app(
        Settings(collection=str(collection.location), api_key=api_key, **settings),
        resources=Borrowed(collection=collection),
    )
    with TestClient(app, base_url="http://m3search.test") as http:
        yield M3SearchClient("http://m3search.test", api_key=api_key, http_client=http)


def exact_seen(monkeypatch, owner) -> list[bool]:
    """The ``exact`` of every search with queries that reaches ``owner``'s ``search_batch`` (a Collection, or the
    class: every one), in order; a server's check of a search's options (no query) is not counted."""
    seen, real = [], owner.search_batch

    def spy(*args, **kwargs):
        if args[-1]:  # the queries
            seen.append(kwargs.get("exact", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, "search_batch", spy)
    return seen


def told_apart(a: list, b: list) -> bool:
    """Whether two hit lists differ clearly: other ids, or a score off by more than 1e-6 relative (1000x the
    tolerance of :func:`same_hits`, so float noise between two runs of one ranking never counts).

    Ids alone may not do: without ../shared, the tiny model's tokenizer (trained on a few built-in
    sentences) makes sparse dominate the fused score, so "all" and "sparse" rank alike there."""
    return [h.id for h in a] != [h.id for h in b] or any(
        abs(x.score - y.score) > 1e-6 * max(1.0, abs(y.score)) for x, y in zip(a, b)
    )


def same_hits(got: list[tuple[str, float]], want: list) -> None:
    """Ids in the same order, fused scores equal (float32 round trip over JSON is exact for Python floats)."""
    assert [i for i, _ in got] == [h.id for h in want]
    for (_, s), h in zip(got, want):
        assert abs(s - h.score) <= 1e-9 * max(1.0, abs(h.score))
