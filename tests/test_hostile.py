"""Hostile and careless input (issue 12): every probe of the issue as a regression test.

Library, the HTTP app in-process (FastAPI TestClient, no sockets) and the CLI in a
subprocess. Each test sends what a hostile client or a careless user sent and checks the
answer: a 4xx / exit code that names the problem, never a 5xx or a traceback, and
nothing written when a write is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from m3search import Collection
from m3search.filters import (
    MAX_FILTER_CONDITIONS,
    MAX_FILTER_DEPTH,
    MAX_IN_VALUES,
    FilterTooComplexError,
    matches,
    parse_filter,
)
from m3search.plan import MAX_K, LimitExceededError

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from m3search.server import Resources, Settings, create_app  # noqa: E402

JSON = {"content-type": "application/json"}
DOCS = [f"document number {i} about pumps and valves" for i in range(12)]


@pytest.fixture(scope="module")
def col(tmp_path_factory, tiny_encoder):
    c = Collection.create(tmp_path_factory.mktemp("hostile") / "c", model=tiny_encoder)
    c.add(DOCS, ids=[f"d{i}" for i in range(len(DOCS))], metadata=[{"n": i, "lang": "en"} for i in range(len(DOCS))])
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(col):
    app = create_app(Settings(max_k=100), resources=Resources(collection=col))
    app.state.resources = Resources(collection=col)  # lifespan would close the shared collection
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


#: Each route that takes a filter, and the rest of a request to it.
FILTERED = {"/search": {"query": "pumps"}, "/search/batch": {"queries": ["pumps"]}, "/count": {}}


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


# ---------------------------------------------------------------- filters: values and limits


@pytest.mark.parametrize(
    "flt, words",
    [
        ({"n": {"gte": 10**400}}, "filter.n.gte: integer out of range"),
        ({"n": 10**30}, "filter.n: integer out of range"),
        ({"n": {"in": [1, 2**63]}}, "filter.n.in: integer out of range"),
        ({"n": -(2**63) - 1}, "integer out of range"),
        ({"n": "\ud800"}, "lone surrogate"),
        ({"n\udc00": 1}, "invalid field name"),
    ],
)
def test_unrepresentable_filter_values_are_400_naming_the_place(client, col, flt, words):
    with pytest.raises(ValueError, match=words):
        parse_filter(flt)
    with pytest.raises(ValueError, match=words):
        col.search("pumps", filter=flt)
    for path, rest in FILTERED.items():
        body = json.dumps({**rest, "filter": flt})
        assert words in _error(client.post(path, content=body, headers=JSON), 400)


def test_int64_edges_filter_exactly(col):
    assert col.count({"n": 2**63 - 1}) == 0 and col.count({"n": {"gte": -(2**63)}}) == len(DOCS)
    assert col.count({"n": {"in": [3, 2**62]}}) == 1


@pytest.mark.parametrize(
    "flt, words",
    [
        ({"or": [{f"f{i}": i} for i in range(MAX_FILTER_CONDITIONS + 1)]}, "at most 64 field conditions"),
        ({"n": {"in": [str(i) for i in range(MAX_IN_VALUES + 1)]}}, f"at most {MAX_IN_VALUES} values"),
        ({"n": {"in": list(range(MAX_FILTER_CONDITIONS + 1))}}, "one per value"),
        ({"n": {"in": list(range(MAX_FILTER_CONDITIONS))}, "m": 1}, "at most 64 field conditions"),
        ({"x": {"eq": 1, "gt": 0}, "and": [{"y": 1}] * (MAX_FILTER_CONDITIONS - 1)}, "at most 64"),
    ],
)
def test_filter_limits(client, flt, words):
    with pytest.raises(FilterTooComplexError, match=words):
        parse_filter(flt)
    for path, rest in FILTERED.items():
        assert words in _error(client.post(path, json={**rest, "filter": flt}), 413)


def test_filter_depth_limit_and_the_largest_allowed_filter(client, col):
    deep: dict = {"n": 1}
    for _ in range(MAX_FILTER_DEPTH - 1):
        deep = {"not": deep}
    assert parse_filter(deep) is not None  # exactly at the limit
    with pytest.raises(FilterTooComplexError, match=f"at most {MAX_FILTER_DEPTH} levels"):
        parse_filter({"not": deep})
    very_deep = '{"query": "q", "filter": ' + '{"not": ' * 100_000 + '{"n": 1}' + "}" * 100_001  # the issue's
    assert "nested too deeply" in _error(client.post("/search", content=very_deep, headers=JSON), 400)
    widest = {"or": [{"n": i} for i in range(MAX_FILTER_CONDITIONS)]}
    assert col.count(widest) == len(DOCS)  # the limit itself is accepted and correct
    assert col.count({"lang": {"in": [str(i) for i in range(MAX_IN_VALUES - 1)] + ["en"]}}) == len(DOCS)
    assert col.count({"n": {"in": list(range(MAX_FILTER_CONDITIONS))}}) == len(DOCS)
    # An AST built in Python is held to the same limits.
    from m3search.filters import Eq, Or

    with pytest.raises(FilterTooComplexError):
        parse_filter(Or(tuple(Eq("n", i) for i in range(MAX_FILTER_CONDITIONS + 1))))


# ---------------------------------------------------------------- strict request types


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"query": "q", "k": True}, 422, "k: Input should be a valid integer"),
        ({"query": "q", "k": 1.0}, 422, "k: Input should be a valid integer"),
        ({"query": "q", "k": "3"}, 422, "k: Input should be a valid integer"),
        ({"query": "q", "explain": "yes"}, 422, "explain: Input should be a valid boolean"),
        ({"query": "q", "explain": 1}, 422, "explain: Input should be a valid boolean"),
        ({"query": "q", "candidates": False}, 422, "candidates"),
        ({"query": 5}, 422, "query"),
        ({"query": "q", "k": 101}, 413, "k=101 exceeds the limit of 100"),
        ({"query": "q", "k": MAX_K + 1}, 413, "exceeds the limit of 100"),
        ({"query": "q", "k": 10**400}, 413, "more than 30 digits"),
        ({"query": "q", "candidates": 10**9}, 413, "candidates=1000000000 exceeds"),
        ({"query": "q", "weights": [-1, 1, 1]}, 422, "greater than or equal to 0"),
        ({"query": "\ud800"}, 422, "query: Input should be a valid string"),
    ],
)
def test_search_request_types_and_limits(client, body, status, words):
    assert words in _error(client.post("/search", content=json.dumps(body), headers=JSON), status)


def test_nan_weight_is_not_called_negative(client):
    msg = _error(client.post("/search", content='{"query": "q", "weights": [NaN, 1, 1]}', headers=JSON), 422)
    assert "finite number" in msg and ">= 0" not in msg


@pytest.mark.parametrize("raw", ['{"query": "q", ', '{"query": "q",}', "[1, 2", "\x00"])
def test_malformed_json_body_says_so(client, raw):
    msg = _error(client.post("/search", content=raw, headers=JSON), 422)
    assert msg.startswith("body is not valid JSON:") and "at character" in msg


@pytest.mark.parametrize(
    "headers, sent",
    [({"content-type": "application/x-www-form-urlencoded"}, "not 'application/x-www-form-urlencoded'"), ({}, "none")],
)
def test_a_json_body_sent_as_another_type_is_told_its_content_type(client, headers, sent):
    """``curl -d '{"query": "q"}'`` (sent as a form) or no Content-Type: FastAPI does not read the body as JSON, and
    the 422 said "body: Input should be a valid dictionary", of a body that is one."""
    msg = _error(client.post("/search", content='{"query": "pumps"}', headers=headers), 422)
    assert msg.startswith(f"body: send it as JSON, with 'Content-Type: application/json' ({sent}"), msg


def test_embed_requests_are_strict(client):
    assert "dense" in _error(client.post("/embed", json={"input": "x", "dense": "yes"}), 422)
    assert "max_length" in _error(client.post("/embed", json={"input": "x", "max_length": True}), 422)
    assert "dimensions" in _error(client.post("/v1/embeddings", json={"input": "x", "dimensions": True}), 422)


def test_embedding_routes_name_a_lone_surrogate(client):
    """Every route that encodes says which input is not text, not the tokenizer's type error."""
    body = '{"input": ["ok", "\\ud800"]}'
    for route in ("/embed", "/v1/embeddings"):
        msg = _error(client.post(route, content=body, headers=JSON), 400)
        assert msg.startswith("input[1]: not valid Unicode text (lone surrogate"), msg
    for route in ("/tei/embed", "/tei/tokenize"):
        msg = _error(client.post(route, content='{"inputs": ["ok", "\\ud800"]}', headers=JSON), 400)
        assert "input[1]: not valid Unicode text" in msg, msg


def test_an_openai_model_name_with_a_lone_surrogate_is_named_before_encoding(client):
    """``model`` (any string, echoed in the answer) was taken with a lone surrogate: the texts were encoded, then
    the answer failed to serialize, a 400 saying "Error serializing to JSON: UnicodeEncodeError"."""
    msg = _error(client.post("/v1/embeddings", content='{"input": "x", "model": "m\\ud800"}', headers=JSON), 400)
    assert msg.startswith("model: not valid Unicode text (lone surrogate"), msg


def test_weights_whose_sum_overflows_are_refused(client):
    """Fusion divides by the weights' sum: 3 x 1e308 is inf, which once made every score 0 (hits in id order)."""
    msg = _error(client.post("/search", json={"query": "q", "weights": [1e308, 1e308, 1e308]}), 400)
    assert "sum must be a finite number" in msg


@pytest.mark.parametrize(
    "extreme, plain",
    [([1.0, 1e308, 1.0], [0, 1, 0]), ([5e-324, 0, 0], [1, 0, 0])],
)
def test_weights_near_floats_limits_rank_as_their_ratios(client, col, extreme, plain):
    """Weighted fusion multiplied the scores by the weights before dividing by their sum: 1e308 made every score
    inf (the library's hits all tied; over HTTP a 400 quoting pydantic's "1 validation error for HitOut"), and
    5e-324 rounded every score to one value. Weights are relative: these rank as their ratios do."""
    want = [(h.id, h.score) for h in col.search("pumps", k=5, weights=plain)]
    assert [(h.id, h.score) for h in col.search("pumps", k=5, weights=extreme)] == want
    r = client.post("/search", json={"query": "pumps", "k": 5, "weights": extreme, "explain": True})
    assert r.status_code == 200, r.text
    assert [(h["id"], h["score"]) for h in r.json()["hits"]] == want


def test_invented_methods_cannot_grow_the_metrics(client):
    """Each method a client made up (a server takes any token: 405, or 404 off the routes) became a series of its
    own in /metrics, with no key needed: a scanner grew the server's memory and every scrape without bound."""
    for i in range(3):
        assert client.request(f"SCAN{i}", "/search").status_code == 405
        assert client.request(f"SCAN{i}", "/nowhere").status_code == 404
    lines = [x for x in client.get("/metrics").text.splitlines() if x.startswith("m3search_requests_total")]
    assert not [x for x in lines if "SCAN" in x]
    assert 'm3search_requests_total{method="other",route="/search",status="405"} 3.0' in lines


def test_an_api_key_no_client_can_send_is_refused_at_start():
    with pytest.raises(ValueError, match="printable ASCII"):
        Settings(api_key="sécret").check()
    with pytest.raises(ValueError, match="printable ASCII"):
        Settings(api_key="a\nb").check()
    Settings(api_key="s3cret-Key_1").check()


def test_an_api_key_that_is_no_string_is_a_type_error():
    """``api_key=123`` failed in ``check_api_key`` with "'int' object has no attribute 'strip'" (the server's
    settings, and the client since it checks its key too): a TypeError naming what a key must be."""
    from m3search.client import M3SearchClient

    with pytest.raises(TypeError, match="the API key must be a string, not int"):
        Settings(api_key=123).check()
    with pytest.raises(TypeError, match="the API key must be a string, not bytes"):
        M3SearchClient("http://127.0.0.1:9", api_key=b"key")


def test_library_is_as_strict(col):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        col.search("q", k=True)
    with pytest.raises(TypeError, match="explain must be true or false"):
        col.search("q", explain="yes")
    with pytest.raises(ValueError, match="weight for dense must be a finite number"):
        col.search("q", weights=(float("nan"), 1, 1))
    with pytest.raises(ValueError, match="weight for dense must be a finite number"):
        col.search("q", weights=(10**400, 1, 1))
    with pytest.raises(LimitExceededError, match=f"exceeds the limit of {MAX_K}"):
        col.search("q", k=10**9)


# ---------------------------------------------------------------- writes: refused whole, values exact


@pytest.mark.parametrize(
    "meta, words",
    [
        ({"big": 18446744073709551616}, "metadata of document 'new1'.big: integer out of range"),
        ({"deep": {"a": [1, {"b": -(2**63) - 1}]}}, "'new1'.deep.a[1].b: integer out of range"),
        ({"s": "\udfff"}, "'new1'.s: not valid Unicode"),
        ({"x": float("inf")}, "not a JSON number"),
        ({"x": {"\ud800": 1}}, "not valid Unicode"),
        ({"x": {1: 2}}, "keys must be strings"),
        ({"x": {1, 2}}, "set is not a JSON value"),
    ],
)
def test_unstorable_metadata_is_refused_and_nothing_written(col, meta, words):
    before = col.count()
    with pytest.raises((ValueError, TypeError), match=re.escape(words)):
        col.upsert(["fine", "also fine"], ids=["new0", "new1"], metadata=[{}, meta])
    assert col.count() == before and col.get(["new0", "new1"]) == [None, None]


def test_metadata_depth_limit(col):
    from m3search.collection import MAX_METADATA_DEPTH

    ok: dict = {"leaf": 1}
    for _ in range(MAX_METADATA_DEPTH - 1):
        ok = {"x": ok}
    col.upsert(["deep"], ids=["deep"], metadata=[ok])
    assert col.get(["deep"])[0].metadata == ok
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_METADATA_DEPTH} levels"):
        col.upsert(["deeper"], ids=["deeper"], metadata=[{"x": ok}])
    assert col.get(["deeper"]) == [None]
    col.delete(["deep"])
    assert col.count() == len(DOCS)  # the collection still reads every payload


def test_extreme_values_round_trip(col):
    meta = {
        "lo": -(2**63),
        "hi": 2**63 - 1,
        "tiny": 5e-324,
        "huge": 1.7976931348623157e308,
        "neg0": -0.0,
        "u": "é\U0001f600",
    }
    col.upsert(["edge"], ids=["edge"], metadata=[meta])
    got = col.get(["edge"])[0].metadata
    assert got == meta and all(type(got[k]) is type(v) for k, v in meta.items())
    col.delete(["edge"])


def test_http_batch_is_validated_whole(client, col):
    before = col.count()

    def post(docs):
        return client.post("/documents", content=json.dumps({"documents": docs}), headers=JSON)

    docs = [{"id": "h0", "text": "fine"}, {"id": "h1", "text": "x", "metadata": {"n": 2**64}}]
    assert "'h1'.n: integer out of range" in _error(post(docs), 400)
    docs = [{"id": "h0", "text": "fine"}, {"id": "h1", "text": "bad \ud800 text"}]
    assert "text of document 'h1': not valid Unicode text (lone surrogate" in _error(post(docs), 400)
    assert "documents.0.id" in _error(post([{"id": "\ud800", "text": "x"}]), 422)
    assert col.count() == before and col.get(["h0"]) == [None]


def test_lone_surrogate_text_names_the_document(col):
    with pytest.raises(
        ValueError, match=r"text of document 'b': not valid Unicode text \(lone surrogate '\\ud800' at character 1"
    ):
        col.add(["fine", "x\ud800"], ids=["a", "b"])
    with pytest.raises(ValueError, match=r"texts\[1\]: not valid Unicode"):
        col.add(["fine", "x\ud800"])
    assert col.get(["a"]) == [None]


# ---------------------------------------------------------------- CLI


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3SEARCH_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "m3search", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_index_validates_whole_source_before_writing(tmp_path, tiny_model_path):
    src = tmp_path / "c.jsonl"
    lines = [json.dumps({"_id": str(i), "text": f"text {i}"}) for i in range(1, 301)]
    lines[279] = '{"_id": "280", "text": '
    src.write_text("\n".join(lines) + "\n")
    coll = tmp_path / "coll"
    proc = cli("index", str(src), "-c", str(coll), "-m", str(tiny_model_path), "--batch-size", "100")
    assert proc.returncode == 1
    assert "c.jsonl:280: invalid JSON" in _one_error_line(proc)
    assert not coll.exists()  # not even created: nothing was written
    # A non-UTF-8 byte names line and offset; --json adds an error object on stdout.
    raw = "\n".join(json.dumps({"_id": str(i), "text": "t"}) for i in range(1, 280)).encode() + b"\n"
    src.write_bytes(raw + b'{"_id": "280", "text": "caf\xe9"}\n')
    proc = cli("index", str(src), "-c", str(coll), "-m", str(tiny_model_path), "--json")
    assert proc.returncode == 1 and "c.jsonl:280: not UTF-8 text" in _one_error_line(proc)
    err = json.loads(proc.stdout)["error"]
    assert (
        err["exit_code"] == 1
        and err["message"].startswith("c.jsonl:280: not UTF-8")
        and f"byte {len(raw) + 27}" in err["message"]
    )
    assert not coll.exists()


def test_index_from_a_pipe_says_it_needs_a_file(tmp_path):
    """``index /dev/stdin`` fed by a pipe, or a named pipe: "does not exist" sent the operator looking for a
    missing file; index reads its source twice, so it needs a file."""
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)
    proc = cli("index", str(fifo), "-c", str(tmp_path / "coll"))
    assert proc.returncode == 1 and "is not a regular file (a pipe or a device)" in _one_error_line(proc)
    assert not (tmp_path / "coll").exists()


def test_cli_usage_errors_exit_2_with_json_error(tmp_path):
    proc = cli("search", "q", "-c", str(tmp_path), "--weights", "-1,0.5,0.5", "--json")
    assert proc.returncode == 2, proc.stderr
    assert "weight for dense must not be negative" in _one_error_line(proc)
    assert json.loads(proc.stdout)["error"]["type"] == "usage"
    proc = cli("search", "q", "-c", str(tmp_path), "--weights", "nan,1,1")
    assert proc.returncode == 2 and "finite number" in _one_error_line(proc) and proc.stdout == ""


@pytest.mark.parametrize("option", ["--timeout", "--max-body-mb"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_serve_refuses_a_number_that_is_not_finite_as_a_usage_error(tmp_path, option, value):
    """click's float range let nan through (every comparison with it is false) and inf too: --timeout nan failed
    later without naming the option, --max-body-mb inf in an OverflowError."""
    proc = cli("serve", "--model", str(tmp_path / "no-model"), "--port", "0", option, value)
    assert proc.returncode == 2, proc.stderr
    assert f"Invalid value for '{option}': '{value}' is not a finite number" in _one_error_line(proc)


def _indexed_by_cli(tmp_path: Path, model: Path, record: str = '{"_id": "a", "text": "t"}') -> Path:
    """A collection of one document, made by ``m3search index``."""
    src = tmp_path / "c.jsonl"
    src.write_text(record + "\n")
    coll = tmp_path / "coll"
    assert cli("index", str(src), "-c", str(coll), "-m", str(model)).returncode == 0
    return coll


def test_cli_library_errors_are_one_line(tmp_path, tiny_model_path):
    coll = _indexed_by_cli(tmp_path, tiny_model_path, '{"_id": "a", "text": "t", "n": 5}')
    for flt, words in [
        ('{"n": 1000000000000000000000000000000}', "filter.n: integer out of range"),
        ('{"n": {"gte": ' + "9" * 400 + "}}", "filter.n.gte: integer out of range"),
    ]:
        proc = cli("search", "q", "-c", str(coll), "--filter", flt, "--json")  # a bad option value: usage, exit 2
        assert proc.returncode == 2 and words in _one_error_line(proc)
        assert (
            json.loads(proc.stdout)["error"]["type"] == "usage" and words in json.loads(proc.stdout)["error"]["message"]
        )
    proc = cli("search", "q", "-c", str(coll), "-k", "1000000000")
    assert proc.returncode == 2 and f"exceeds the limit of {MAX_K}" in _one_error_line(proc)


def test_a_corrupt_model_file_is_named(tmp_path, tiny_model_path):
    """A model folder whose config.json is not JSON or whose head file is cut short: the error names the file
    (json's and torch's own messages named none: "Expecting value: line 1 column 1 (char 0)"), and does not
    ask to pass the model that was passed."""
    coll = _indexed_by_cli(tmp_path, tiny_model_path)
    for name, words in [
        ("config.json", " is not valid JSON: "),
        ("sparse_linear.pt", " (truncated or not a torch state dict): "),
        # read for its weights fingerprint before loading: named as damaged, not as another model's weights
        ("model.safetensors", " is not a readable safetensors file (its header is damaged or cut short)"),
    ]:
        model = tmp_path / f"bad-{name}"
        shutil.copytree(tiny_model_path, model)
        with open(model / name, "r+b") as f:
            f.truncate(20)
        proc = cli("search", "q", "-c", str(coll), "-m", str(model))
        assert proc.returncode == 1 and f"{model / name}{words}" in _one_error_line(proc)
        assert "Pass model=" not in proc.stderr  # it was passed


def test_a_model_whose_tokenizer_json_is_damaged_is_named(tmp_path, tiny_model_path):
    """tokenizer.json cut short or not UTF-8: "Error: Exception: EOF while parsing an object at line 2 column 18"
    named no file (tokenizers' message); it names the file now, and no collection is created."""
    src = tmp_path / "c.jsonl"
    src.write_text('{"_id": "a", "text": "t"}\n')
    model = tmp_path / "bad-tokenizer"
    shutil.copytree(tiny_model_path, model)
    for damage in (b'{"version": "1.0", "tr', b"\xff\xfe"):
        (model / "tokenizer.json").write_bytes(damage)
        proc = cli("index", str(src), "-c", str(tmp_path / "coll"), "-m", str(model))
        line = _one_error_line(proc)
        assert proc.returncode == 1 and f"could not read {model / 'tokenizer.json'} (not a tokenizers file): " in line
        assert not (tmp_path / "coll").exists()


def test_a_model_given_as_a_file_is_said_to_be_one(tmp_path):
    """``--model`` naming a file (a weights file, say) said "model folder ... does not exist" of a file that exists."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not a folder")
    src = tmp_path / "c.jsonl"
    src.write_text('{"_id": "a", "text": "t"}\n')
    proc = cli("index", str(src), "-c", str(tmp_path / "coll"), "-m", str(model))
    assert proc.returncode == 1 and f"Error: model {str(model)!r} is not a folder (expected " in _one_error_line(proc)
    assert not (tmp_path / "coll").exists()


def test_migrate_of_a_served_collection_says_to_stop_the_server(tmp_path):
    import http.server
    import threading

    from m3search import serverfile

    class Health(http.server.BaseHTTPRequestHandler):  # a server that answers: the record is believed
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        served = tmp_path / "served"
        served.mkdir()
        port = httpd.server_address[1]
        record = {"pid": os.getpid(), "url": f"http://127.0.0.1:{port}", "host": "127.0.0.1", "port": port}
        record["identity"] = serverfile.identity(served)  # the record names the folder it was written for
        (served / "server.json").write_text(json.dumps(record))  # a live pid: this test process
        proc = cli("migrate", str(served), str(tmp_path / "copy"), "--json")
    finally:
        httpd.shutdown()
    line = _one_error_line(proc)
    assert proc.returncode == 1 and f"served by process {os.getpid()}" in line and "stop that server" in line
    assert "m3search serve" not in line and json.loads(proc.stdout)["error"]["exit_code"] == 1


def test_index_failing_mid_write_says_what_was_written(tmp_path, tiny_model_path, monkeypatch):
    """A write that fails after pass 1 (disk, engine, server) reports the records written; a rerun finishes."""
    from click.testing import CliRunner

    from m3search import cli as cli_module

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"_id": str(i), "text": f"text {i}"}) + "\n" for i in range(1, 301)))
    coll = tmp_path / "coll"
    real, calls = cli_module._Local.upsert, []

    def failing(self, records):
        calls.append(len(records))
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real(self, records)

    monkeypatch.setattr(cli_module._Local, "upsert", failing)
    args = ["index", str(src), "-c", str(coll), "-m", str(tiny_model_path), "--batch-size", "100", "--dtype", "float32"]
    out = CliRunner().invoke(cli_module.main, args)
    assert out.exit_code == 1
    # the failing batch may be stored in part (an engine write of it may have ended before the error): said so
    said = f"No space left on device; the first 200 records of {src} were written, and perhaps some of the next 100;"
    assert f"{said} run the same command" in out.output
    with Collection.open(coll) as c:
        assert c.count() == 200
    monkeypatch.setattr(cli_module._Local, "upsert", real)
    assert CliRunner().invoke(cli_module.main, args).exit_code == 0
    with Collection.open(coll) as c:
        assert c.count() == 300


def test_index_on_a_nearly_full_disk_says_so_and_what_was_written(tmp_path, tiny_model_path, monkeypatch):
    """The embedded engine's refusal of a write on a nearly full disk (it died by SIGBUS) ends `index` with its
    message and the records written before; a rerun with room finishes (free space simulated)."""
    from click.testing import CliRunner

    import m3search.engines.qdrant_edge as qe_mod
    from m3search import cli as cli_module

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"_id": str(i), "text": f"text {i}"}) + "\n" for i in range(1, 301)))
    coll = tmp_path / "coll"
    free, real, calls = {"bytes": 1 << 40}, cli_module._Local.upsert, []

    def filling(self, records):
        calls.append(len(records))
        if len(calls) == 3:
            free["bytes"] = 1 << 20
        return real(self, records)

    monkeypatch.setattr(qe_mod, "free_bytes", lambda path: free["bytes"])
    monkeypatch.setattr(cli_module._Local, "upsert", filling)
    args = ["index", str(src), "-c", str(coll), "-m", str(tiny_model_path), "--batch-size", "100", "--dtype", "float32"]
    out = CliRunner().invoke(cli_module.main, [*args, "--json"])
    assert out.exit_code == 1
    error = json.loads(out.stdout.splitlines()[0])["error"]
    assert error["message"].startswith(f"not enough free disk for writing 100 points at {coll}: 1.0 MiB free")
    assert (
        f"stored documents are intact: free some space and try again; the first 200 records of {src}"
        in error["message"]
    )
    free["bytes"] = 1 << 40
    with Collection.open(coll) as c:
        assert c.count() == 200
    assert CliRunner().invoke(cli_module.main, args).exit_code == 0
    with Collection.open(coll) as c:
        assert c.count() == 300


def test_filter_fields_qdrant_cannot_parse_unquoted(col):
    col.upsert(["odd"], ids=["odd"], metadata=[{":": 1, "x y": "q", "m": {"k:1": 2}, "é": 3}])
    try:
        assert col.count({":": 1}) == col.count({"x y": "q"}) == col.count({"m.k:1": 2}) == col.count({"é": 3}) == 1
    finally:
        col.delete(["odd"])


def test_float_metadata_round_trips_exactly(col):
    """Qdrant Edge's payload storage parses floats back with a best-effort parser (~10-25 % of
    values 1-2 ULP off, benchmarks/float_roundtrip.py); get() returns the exact JSON copy."""
    import numpy as np

    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**63, size=400, dtype=np.int64).view(np.float64)
    values = [float(x) for x in rng.random(200)] + [0.1 * i + 0.2 for i in range(50)]
    values += [float(x) for x in bits if np.isfinite(x)]
    col.upsert(["floats"], ids=["floats"], metadata=[{"v": values}])
    try:
        assert col.get(["floats"])[0].metadata["v"] == values
        col.update_metadata(["floats"], [{"v": values[::-1]}])
        assert col.get(["floats"])[0].metadata["v"] == values[::-1]
    finally:
        col.delete(["floats"])


# ------------------------------------------------------- schema 3: texts out of the filtered payload
def _raw(col) -> int:
    """Every stored point: windows, text points and tombstones."""
    return col.engine._count(None, docs_only=False)


@pytest.mark.parametrize("engine", ["edge", "local"])
def test_long_text_is_stored_beside_the_filtered_payload(tmp_path, tiny_encoder, engine):
    """A text over TEXT_CHUNK characters lives on vector-less text points: get() joins it back
    exactly; count, filters and searches never see those points; a shorter rewrite and a delete
    leave none behind."""
    from m3search.engines.qdrant_common import TEXT_CHUNK

    loc = tmp_path / "c" if engine == "edge" else f"qdrant+local://{tmp_path}/q/c"
    big = "é€😀 pumps " * (TEXT_CHUNK // 3)  # multi-byte characters across chunk borders
    with Collection.create(loc, model=tiny_encoder) as c:
        c.add(["short pumps", big], ids=["s", "big"], metadata=[{"k": 1}, {"k": 2}])
        windows = int(c.engine.window_counts(["big"])[0])
        assert windows > 1 and _raw(c) == 1 + windows + -(-len(big) // TEXT_CHUNK)
        assert c.get(["big"])[0].text == big and c.get(["s"])[0].text == "short pumps"
        assert c.count() == 2 and c.count({"k": 2}) == 1 and c.count({"not": {"k": 1}}) == 1
        assert {h.id for h in c.search("pumps", k=10, mode="all", exact=True)} == {"s", "big"}
        assert [h.id for h in c.search("pumps", k=10, filter={"k": 2}, exact=True)] == ["big"]
        c.upsert([big[: TEXT_CHUNK + 5]], ids=["big"], metadata=[{"k": 3}])
        windows = int(c.engine.window_counts(["big"])[0])
        assert c.get(["big"])[0].text == big[: TEXT_CHUNK + 5] and _raw(c) == 1 + windows + 2
        assert c.get(["big"])[0].metadata == {"k": 3} and c.count({"k": 2}) == 0
        c.delete(["big"])
        assert _raw(c) == 1 and c.count() == 1


def test_filters_are_one_nested_condition_after_has_vector(col):
    """The cost rule (benchmarks/RESULTS.md, Hostile input): whatever the filter, the engine gets
    HasVector("dense") (no payload read, false for text points) then ONE nested condition."""
    import qdrant_edge as qe

    flt = parse_filter({"or": [{f"f{i}": i} for i in range(MAX_FILTER_CONDITIONS)]})
    sent = col.engine._filter(flt)
    assert [type(c) for c in sent.must] == [qe.HasVectorCondition, qe.NestedCondition]
    assert sent.should is None and sent.must_not is None


def test_schema_2_collection_opens_searches_and_takes_writes(tmp_path, tiny_encoder):
    """A collection written by a8eac53 (payload {"id", "text", "metadata"}, schema 2) keeps its
    layout: the points are rewritten here through Qdrant Edge directly, as that version wrote them."""
    import qdrant_edge as qe

    from m3search.engines.base import point_uuid

    path = tmp_path / "old"
    metas = [{"n": i, "lang": "en" if i % 2 else "de", "tags": ["a", i]} for i in range(len(DOCS))]
    ids = [f"d{i}" for i in range(len(DOCS))]
    with Collection.create(path, model=tiny_encoder) as c:
        c.add(DOCS, ids=ids, metadata=metas)
        for i, text, meta in zip(ids, DOCS, metas):
            op = qe.UpdateOperation.overwrite_payload([point_uuid(i)], {"id": i, "text": text, "metadata": meta})
            c.engine.shard.update(op)
    m = json.loads((path / "manifest.json").read_text())
    m["schema_version"] = 2
    (path / "manifest.json").write_text(json.dumps(m))
    filters = [{"lang": "en"}, {"n": {"gte": 3, "lt": 9}}, {"not": {"lang": "en"}}, {"tags": "a"}, {"tags": 4}]
    with Collection.open(path, model=tiny_encoder) as c:
        assert c.engine.layout == 2
        for f in filters:
            want = {i for i, meta in zip(ids, metas) if matches(parse_filter(f), meta)}
            assert c.count(f) == len(want), f
            assert {h.id for h in c.search("pumps", k=20, filter=f, exact=True)} == want, f
        assert c.get(["d3"])[0].text == DOCS[3] and c.get(["d3"])[0].metadata == metas[3]
        c.add(["one more pumps"], ids=["x"], metadata=[{"lang": "en"}])  # written in the old layout
        c.update_metadata(["d0"], [{"lang": "en"}])
        payload = c.engine.shard.retrieve([point_uuid("x")], with_payload=True, with_vector=False)[0].payload
        assert set(payload) == {"id", "text", "metadata"}
        assert c.count({"lang": "en"}) == len(DOCS) // 2 + 2 and c.count() == len(DOCS) + 1
        counts = [c.count(f) for f in filters]
    from m3search.migrate import migrate

    migrate(path, tmp_path / "new")  # the way to the schema-3 layout
    with Collection.open(tmp_path / "new", model=tiny_encoder) as c:
        assert c.engine.layout == 3 and c.manifest["schema_version"] == 3
        assert [c.count(f) for f in filters] == counts and c.get(["d3"])[0].metadata == metas[3]


# ------------------------------------------------------------------------------ time limit
def test_search_over_its_time_limit_stops_at_the_next_stage_with_504(col, monkeypatch):
    """The first-stage search takes longer than the limit: the request answers 504 in the one
    error shape and no engine request after it (scoring, reading the hits) is made."""
    import time

    first_stage = col.engine.candidates_batch
    after: list[str] = []  # Qdrant Edge requests made once the first stage is over

    class Recording:
        def __init__(self, shard):
            self.shard = shard

        def __getattr__(self, name):
            after.append(name)
            return getattr(self.shard, name)

    def slow(*args, **kwargs):
        out = first_stage(*args, **kwargs)
        time.sleep(0.6)
        monkeypatch.setattr(col.engine, "_shard", Recording(col.engine._shard))
        return out

    monkeypatch.setattr(col.engine, "candidates_batch", slow)

    class Shared(Resources):
        def close(self) -> None:  # the module's collection outlives this app
            pass

    app = create_app(Settings(max_k=100, search_timeout=0.5), resources=Shared(collection=col))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/search", json={"query": "pumps", "k": 3, "mode": "all"})
        assert r.status_code == 504, r.text
        assert r.json() == {"error": {"type": "timeout", "message": ANY_MESSAGE}}
        assert "time limit of 0.5 s" in r.json()["error"]["message"]
        assert after == []
        monkeypatch.undo()
        assert c.get("/health").status_code == 200


def test_library_searches_take_the_same_deadline(col):
    from m3search.plan import DeadlineExceeded, deadline

    with deadline(0), pytest.raises(DeadlineExceeded, match="time limit of 0 s"):
        col.search("pumps", k=3)
    with deadline(30):
        assert len(col.search("pumps", k=3)) == 3


class _Any:
    def __eq__(self, other):
        return isinstance(other, str) and bool(other)


ANY_MESSAGE = _Any()


_TEXT_CHILD = """
import sys
import numpy as np
from m3search.engines import resolve_engine
from m3search.engines.shapes import PointBatch

path, f = sys.argv[1], sys.argv[2]
z = np.load(f, allow_pickle=True)
texts, dense, colbert, sparse = list(z["texts"]), z["dense"], z["colbert"], z["sparse"].item()
eng = resolve_engine(path).open(path)
print("ready", flush=True)
i = 0
while True:
    t = texts[i % len(texts)]
    eng.upsert(PointBatch(["x"], [t], [{"v": i}], dense, sparse, colbert, np.array([0, len(colbert)])))
    print("done", i, flush=True)
    i += 1
"""


@pytest.mark.heavy
def test_kill_during_rewrites_of_a_long_text_leaves_it_whole(tmp_path, tiny_encoder):
    """A child rewrites one document alternately with 4 text points, 2 and none (inline);
    kill -9 at random moments: the reopened text is one version whole, and no text point of
    another version is counted or read."""
    import signal
    import time

    import numpy as np

    from m3search.engines.qdrant_common import TEXT_CHUNK

    texts = ["é" * (3 * TEXT_CHUNK + 7), "ab" * (TEXT_CHUNK // 2 + 9), "short text"]
    emb = tiny_encoder.encode(["pumps and valves"])
    f = tmp_path / "v.npz"
    sparse = np.array(emb.sparse, dtype=object)
    np.savez(f, texts=np.array(texts, dtype=object), dense=emb.dense, colbert=emb.colbert, sparse=sparse)
    path = tmp_path / "c"
    with Collection.create(path, model=tiny_encoder) as c:
        c.add([texts[0], "another"], ids=["x", "y"])
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    seen = set()
    for _ in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", _TEXT_CHILD, str(path), str(f)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.8)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        with Collection.open(path) as c:
            text = c.get(["x"])[0].text
            assert text in texts
            seen.add(texts.index(text))
            assert c.count() == 2 and c.get(["y"])[0].text == "another"
            assert sorted(t for b in c.engine.iter_batches(with_vectors=False) for t in b.texts) == sorted(
                [text, "another"]
            )
    assert len(seen) >= 2  # the kills landed on different versions


def test_nested_filters_follow_the_grammar_on_odd_metadata(tmp_path, tiny_encoder):
    """Where one nested condition could differ from flat ones: arrays of objects, nested arrays,
    nulls inside arrays, empty lists and objects, ``not`` over each (filters.matches decides)."""
    metas = [
        {"authors": [{"name": "Ada"}]},
        {"authors": {"name": "Ada"}},
        {"a": [[1, 2]]},
        {"a": [1, [2]]},
        {"x": None},
        {"x": [None, 1]},
        {},
        {"e": []},
        {"o": {}},
    ]
    flts = [{"authors.name": "Ada"}, {"a": 2}, {"a": 1}, {"x": 1}, {"x": {"gte": 0}}, {"e": {"in": [1]}}, {"o.k": 1}]
    with Collection.create(tmp_path / "c", model=tiny_encoder) as c:
        c.add([f"t{i}" for i in range(len(metas))], ids=[str(i) for i in range(len(metas))], metadata=metas)
        for f in flts + [{"not": f} for f in flts]:
            assert c.count(f) == sum(matches(parse_filter(f), m) for m in metas), f


@pytest.mark.parametrize("max_windows", [1, None])  # one window per text / windowed ingest
@pytest.mark.parametrize("output", ["dense", "sparse", "colbert"])
def test_nan_out_of_the_model_is_refused_naming_the_document(tmp_path, tiny_encoder, monkeypatch, output, max_windows):
    """A model's NaN / inf (a float16 overflow) was written silently (only given ``embeddings=`` were checked): a
    NaN dense vector dropped its document from every list. Refused naming it, nothing of its batch written."""
    import numpy as np

    from m3search import M3Encoder

    encode_rows = M3Encoder._encode_rows

    def overflowing(self, *args, **kwargs):
        emb = encode_rows(self, *args, **kwargs)
        values = emb.sparse.data if output == "sparse" else getattr(emb, output)
        values[:] = np.inf if output == "sparse" else np.nan
        return emb

    label = {"dense": "dense vectors", "sparse": "sparse weights", "colbert": "ColBERT vectors"}[output]
    with Collection.create(tmp_path / "c", model=tiny_encoder, max_windows=max_windows) as col:
        col.add(["a document stored before"], ids=["kept"])
        given = tiny_encoder.encode(["pumps and valves", "heat flow"])
        monkeypatch.setattr(M3Encoder, "_encode_rows", overflowing)
        with pytest.raises(ValueError, match=f"the {label} of document 'x' hold NaN or infinite values"):
            col.add(["pumps and valves", "heat flow"], ids=["x", "y"])
        assert col.count() == 1 and col.get(["x", "y"]) == [None, None]
        values = given.sparse.data if output == "sparse" else getattr(given, output)
        values[-1] = np.nan  # the last row's: document "y"
        with pytest.raises(ValueError, match=f"embeddings.{output} holds NaN or infinite values \\(document 'y'\\)"):
            col.add(["pumps and valves", "heat flow"], ids=["x", "y"], embeddings=given)
        assert col.count() == 1
