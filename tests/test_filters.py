"""The shared filter grammar: parsing, errors, reference semantics, and Qdrant Edge congruence."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.sparse as sp

from m3search.filters import And, Eq, In, Not, Or, Range, matches, parse_filter, to_json


def test_shorthand_and_operators():
    assert parse_filter({"lang": "en"}) == Eq("lang", "en")
    assert parse_filter({"lang": {"eq": "en"}}) == Eq("lang", "en")
    assert parse_filter({"n": {"in": [1, 2]}}) == In("n", (1, 2))
    assert parse_filter({"y": {"gte": 1990, "lt": 2000}}) == Range("y", gte=1990, lt=2000)
    assert parse_filter({"a": 1, "b": True}) == And((Eq("a", 1), Eq("b", True)))
    assert parse_filter({"or": [{"a": 1}, {"not": {"b": "x"}}]}) == Or((Eq("a", 1), Not(Eq("b", "x"))))
    assert parse_filter({"and": [{"a": 1}]}) == Eq("a", 1)
    assert parse_filter({"x": {"eq": 2, "lt": 5}}) == And((Eq("x", 2), Range("x", lt=5)))
    assert parse_filter({"author.name": "Ada"}) == Eq("author.name", "Ada")


def test_no_filter_and_json_string():
    assert parse_filter(None) is None
    assert parse_filter({}) is None
    assert parse_filter("") is None
    assert parse_filter('{"lang": "en"}') == Eq("lang", "en")
    f = Eq("a", 1)
    assert parse_filter(f) == f


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"x": {"foo": 1}}, "unknown operator 'foo'"),
        ({"x": {"gt": "a"}}, "finite number"),
        ({"x": {"gt": True}}, "finite number"),
        ({"x": {"gt": float("nan")}}, "finite number"),
        ({"x": {"gt": 1, "gte": 2}}, "at most one lower bound"),
        ({"x": {"in": []}}, "non-empty"),
        ({"x": {"in": "ab"}}, "needs a list"),
        ({"x": {"in": [1, "a"]}}, "all strings or all integers"),
        ({"x": {"in": [1.5]}}, "all strings or all integers"),
        ({"x": [1, 2]}, "use {'in'"),
        ({"x": None}, "string, number or boolean"),
        ({"x": {}}, "empty operator"),
        ({"or": []}, "non-empty list"),
        ({"and": {"a": 1}}, "non-empty list"),
        ({"not": [{"a": 1}]}, "expected a JSON object"),
        ({"": 1}, "invalid field name"),
        ({"a..b": 1}, "invalid field name"),
        ({"a[]": 1}, "invalid field name"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_filters_name_the_problem(bad, words):
    with pytest.raises(ValueError) as exc:
        parse_filter(bad)
    assert words in str(exc.value)


@pytest.mark.parametrize(
    "bad, words",
    [
        (Eq("x", float("nan")), "filter.x.eq: value must be finite"),
        (Eq("x", None), "string, number or boolean"),
        (Eq("x", [1]), "use {'in'"),
        (Eq("x", 2**70), "integer out of range"),
        (Eq("", 1), "invalid field name"),
        (Eq('a"b', 1), "invalid field name"),
        (Range("x"), "empty operator"),
        (Range("x", gt="a"), "finite number"),
        (Range("x", gt=1, gte=2), "at most one lower bound"),
        (Or(()), "non-empty list"),
        (And(()), "non-empty list"),
        (Not(None), "empty object"),
        (Not(Eq("x", "\ud800")), "not valid Unicode"),
    ],
)
def test_a_filter_built_in_python_is_checked_as_its_json_is(bad, words):
    """An AST built in Python was checked for its limits only: Or(()) matched nothing on Qdrant Edge, everything in
    qdrant-client's local mode and failed inside Milvus; Eq("x", nan) was a Milvus parse error, Range("x") one too."""
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_filter(bad)
    assert parse_filter(Or((Eq("a", 1), In("b", (1, 2)), Range("c", lt=3.5)))) == parse_filter(
        {"or": [{"a": 1}, {"b": {"in": [1, 2]}}, {"c": {"lt": 3.5}}]}
    )


def test_non_object_is_type_error():
    with pytest.raises(TypeError):
        parse_filter([{"a": 1}])
    with pytest.raises(TypeError):
        parse_filter(3)


def test_json_round_trip():
    f = parse_filter({"lang": "en", "y": {"gte": 1, "lt": 3.5}, "or": [{"t": {"in": ["a", "b"]}}, {"not": {"n": 2.5}}]})
    assert parse_filter(json.loads(json.dumps(to_json(f)))) == f


def test_reference_semantics():
    meta = {"lang": "en", "year": 1995, "tags": ["a", "b"], "author": {"name": "Ada"}, "flag": True, "score": 0.5}
    assert matches(parse_filter({"lang": "en"}), meta)
    assert matches(parse_filter({"tags": "b"}), meta)  # any element of a list
    assert matches(parse_filter({"author.name": "Ada"}), meta)
    assert not matches(parse_filter({"missing": 1}), meta)
    assert matches(parse_filter({"not": {"missing": 1}}), meta)  # missing field never matches, so not() keeps it
    assert not matches(parse_filter({"flag": 1}), meta)  # bools are not integers
    assert matches(parse_filter({"score": 0.5}), meta)
    assert matches(parse_filter({"year": {"gt": 1990, "lte": 1995}}), meta)
    assert not matches(parse_filter({"lang": {"gt": 1}}), meta)


# ---------------------------------------------------------------- engine congruence
LANGS = ["en", "de", "fr", "zh"]


def random_meta(rng, i):
    m = {
        "lang": str(rng.choice(LANGS)),
        "year": int(rng.integers(1980, 2020)),
        "score": float(np.round(rng.random(), 2)),
    }
    if rng.random() < 0.5:
        m["tags"] = [str(t) for t in rng.choice(["x", "y", "z"], size=int(rng.integers(1, 3)), replace=False)]
    if rng.random() < 0.3:
        m["author"] = {"name": str(rng.choice(["Ada", "Alan"]))}
    if rng.random() < 0.2:
        m["flag"] = bool(rng.random() < 0.5)
    m["n"] = i % 5 if i % 2 else float(i % 5)  # integral values stored as int and as float
    if i % 17 == 0:
        m = {}  # documents without metadata
    return m


FILTERS = [
    {"lang": "en"},
    {"lang": {"in": ["de", "fr"]}},
    {"year": {"gte": 2000}},
    {"year": {"gt": 1990, "lt": 2000}},
    {"score": {"lte": 0.25}},
    {"score": 0.5},
    {"lang": "zh", "year": {"lt": 2005}},
    {"or": [{"lang": "en"}, {"year": {"gte": 2015}}]},
    {"not": {"lang": "en"}},
    {"not": {"or": [{"lang": "en"}, {"lang": "de"}]}},
    {"tags": "x"},
    {"tags": {"in": ["y", "z"]}},
    {"author.name": "Ada"},
    {"flag": True},
    {"flag": False},
    {"year": 2001.0},
    {"and": [{"year": {"gte": 1985}}, {"or": [{"tags": "z"}, {"not": {"author.name": "Alan"}}]}]},
    {"year": {"in": [1990, 1991, 1992]}},
    {"n": 2},  # matches the stored 2 and 2.0
    {"n": {"in": [1, 3]}},  # likewise for membership
    {"not": {"n": {"in": [2]}}},
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from m3search.engines.qdrant_edge import QdrantEdgeEngine
    from m3search.engines.shapes import PointBatch, Schema

    rng = np.random.default_rng(0)
    n, d, vocab = 200, 8, 50
    schema = Schema(dense_dim=d, colbert_dim=d, vocab_size=vocab)
    eng = QdrantEdgeEngine.create(str(tmp_path_factory.mktemp("flt") / "c"), schema)
    eng.write_manifest({"schema": schema.to_dict()})
    dense = rng.normal(size=(n, d)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    sparse = sp.random(n, vocab, density=0.2, format="csr", random_state=1, dtype=np.float32)
    offs = np.arange(n + 1, dtype=np.int64) * 2
    colbert = rng.normal(size=(2 * n, d)).astype(np.float32)
    metas = [random_meta(rng, i) for i in range(n)]
    ids = [f"p{i}" for i in range(n)]
    eng.upsert(PointBatch(ids, [""] * n, metas, dense, sparse, colbert, offs))
    yield eng, ids, metas, dense
    eng.close()


@pytest.mark.parametrize("flt", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_qdrant_edge_filter_matches_reference(engine, flt):
    eng, ids, metas, dense = engine
    f = parse_filter(flt)
    want = {i for i, m in zip(ids, metas) if matches(f, m)}
    assert eng.count(f) == len(want)
    # Applied inside the query: k hits come back when at least k documents match.
    hits = eng.search_dense(dense[:1], k=len(ids), filter=f, exact=True)[0]
    assert {h for h, _ in hits} == want
    k = min(5, len(want))
    assert len(eng.search_dense(dense[:1], k=k, filter=f)[0]) == k


def test_field_names_qdrant_cannot_address_are_refused():
    """Found by the heavy hypothesis campaign: a backslash in a field name reached Qdrant Edge as an
    unparsable JSON path (ValueError from deep inside the engine); it is refused at parse time now."""
    for bad in ("a\\", "x.\\y", 'q"', "a[0]"):
        with pytest.raises(ValueError, match="invalid field name"):
            parse_filter({bad: 1})


def test_integers_at_2_to_the_53_match_only_themselves(tmp_path, tiny_model_path):
    """2**53 + 1 rounds to 2**53 in float64: an integer equality sent as the range [2**53, 2**53]
    matched a stored 2**53 + 1 (found by the heavy filter campaign, 2026-12-03). From 2**53 on an
    integer equals only integers, in the oracle and on the engine alike."""
    from m3search import Collection

    vals = [2**53 - 1, 2**53, 2**53 + 1, -(2**53), -(2**53) - 1]
    with Collection.create(tmp_path / "c", model=str(tiny_model_path)) as c:
        c.add(
            [f"t{i}" for i in range(len(vals))],
            ids=[str(i) for i in range(len(vals))],
            metadata=[{"n": v} for v in vals],
        )
        for v in vals:  # a FLOAT 2**53 still matches both (float equality is approximate: docs/usage.md)
            want = sum(matches(parse_filter({"n": v}), {"n": x}) for x in vals)
            assert c.count({"n": v}) == want == 1, v
            assert c.count({"n": {"in": [v]}}) == want, v


def test_a_python_built_filter_on_a_field_named_like_a_logical_key_is_checked_as_a_field():
    """f49cd35 checked an AST through its JSON form, where a field named "and", "or" or "not" reads as the logical
    key: Eq("and", 1) was refused ("'and' needs a non-empty list of filters"), and Eq("not", x) checked as the
    filter Not(Eq("eq", x)). Each leaf is checked as a field now (accepted before f49cd35 too)."""
    for node in (Eq("and", 1), In("or", (1, 2)), Range("not", gte=0), Not(Eq("and", "x"))):
        assert parse_filter(node) == node
    with pytest.raises(ValueError, match=re.escape("filter.not.eq: value must be finite")):
        parse_filter(Eq("not", float("nan")))


def test_numpy_values_are_the_numbers_they_hold():
    """Values from NumPy or pandas (a row's np.int64 year) were refused as "value must be a string, number or
    boolean, got int64", although k, candidates and weights take them; a Python-built node kept them, and the
    engines then got NumPy values."""
    np = pytest.importorskip("numpy")
    want = parse_filter({"year": 2020, "price": {"gte": 1.5, "lt": 9}, "tag": {"in": [1, 2]}, "ok": True})
    got = parse_filter(
        {
            "year": np.int64(2020),
            "price": {"gte": np.float64(1.5), "lt": np.int32(9)},
            "tag": {"in": np.array([1, 2])},
            "ok": np.bool_(True),
        }
    )
    assert got == want and to_json(got) == to_json(want)
    built = parse_filter(And((Eq("year", np.int64(2020)), Not(In("tag", (np.int64(1), 2))))))
    assert built == And((Eq("year", 2020), Not(In("tag", (1, 2)))))
    assert type(built.items[0].value) is int and all(type(v) is int for v in built.items[1].item.values)
    with pytest.raises(ValueError, match="value must be finite"):
        parse_filter({"x": np.float64("nan")})
