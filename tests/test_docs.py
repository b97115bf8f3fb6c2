"""The README and docs/usage.md cannot silently go stale (datasette's tests/test_docs.py habit).

Every ``m3search`` command line in their code blocks must name a real command and real
options; every "``--option`` ... default N" must be the CLI's default; the mode and fusion
lists, the paper weights, the RRF constant and the candidates default must be the code's
constants; every ``M3SEARCH_*`` variable must be read somewhere in the code; every HTTP
route in the docs must exist; the Makefile targets and the demo corpus the README
promises must be there. Across all four docs (ARCHITECTURE.md and docs/integrations.md too),
the commands and options of their inline code, the repository files they name and the dotted
code names they give (``collection.PENDING_LEASE_S``) must exist, and the README's library
example runs.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest

from m3search.cli import main
from m3search.fusion import RRF_K
from m3search.plan import DEFAULT_CANDIDATES, DEFAULT_WEIGHTS, ENCODER_DTYPES, FUSIONS, PRESETS

REPO = Path(__file__).resolve().parents[1]
DOCS = {name: (REPO / name).read_text(encoding="utf-8") for name in ("README.md", "docs/usage.md")}
ALL_DOCS = DOCS | {
    name: (REPO / name).read_text(encoding="utf-8") for name in ("ARCHITECTURE.md", "docs/integrations.md")
}


def code_blocks(text: str, langs: tuple[str, ...] = ("bash", "sh", "")) -> list[str]:
    """Fenced blocks in these languages (a line-by-line walk: a closing fence never opens one)."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                if lang in langs:
                    blocks.append("\n".join(lines) + "\n")
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def command_lines(text: str) -> list[list[str]]:
    """``m3search ...`` invocations in the bash blocks (continuations joined, comments dropped; of a pipeline,
    its last command)."""
    out = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip().rsplit(" | ", 1)[-1]
            if line.startswith("m3search "):
                out.append(shlex.split(line.rstrip("&").strip(), comments=True))
    return out


def options_of(command: click.Command) -> dict[str, click.Parameter]:
    return {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}


def check_options(words: list[str], known: Any, where: str) -> int:
    """Every option among ``words`` is in ``known``; returns how many were checked (``-`` is standard input,
    ``-1`` a value, ``--colbert-...`` and ``--colbert-*`` elided names)."""
    options = [w.split("=")[0] for w in words if w.startswith("-") and not re.fullmatch(r"-|-\d.*|.*(\.\.\.|\*)", w)]
    for option in options:
        assert option in known, f"{where} has no option {option}"
    return len(options)


def inline_code(text: str) -> list[str]:
    """The inline code spans of a document's prose (fenced blocks left out), whitespace made single spaces."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_documented_command_and_option_exists(doc):
    lines = command_lines(DOCS[doc])
    assert len(lines) >= 5, f"{doc}: expected m3search examples"
    for argv in lines:
        name = argv[1]
        if name.startswith("-"):
            assert name in ("--help", "-h", "--version"), argv
            continue
        assert name in main.commands, f"{doc}: `m3search {name}` is not a command ({' '.join(argv)})"
        known = options_of(main.commands[name]) | {"--help": None, "-h": None}
        check_options(argv[2:], known, f"{doc}: `m3search {name}`")


def test_every_command_and_option_in_the_prose_exists():
    """Inline code names commands and options too (`m3search recover -c LOCATION`, `search --explain`,
    `--colbert-in-ram/--colbert-on-disk`): each must be a command, and each option one of that command's (an
    option alone: of some command)."""
    everyone = {opt for cmd in main.commands.values() for opt in options_of(cmd)}
    checked = 0
    for doc, text in ALL_DOCS.items():
        for span in inline_code(text):
            words = span.split()
            if words[:1] == ["m3search"]:
                words = words[1:]
                assert not words or words[0] in main.commands or words[0] == "--help", f"{doc}: `{span}`"
            if words and words[0] in main.commands:
                checked += check_options(words[1:], options_of(main.commands[words[0]]), f"{doc}: `{span}`")
            elif words and words[0].startswith("--"):
                checked += check_options(re.split(r"[/ ]", span), everyone, f"{doc}: `{span}`: the CLI")
    assert checked >= 40  # the spans are still found


def test_every_option_of_every_command_is_documented():
    """usage.md said nothing of `index --batch-size` or `eval --batch-size`: an option is documented in its command's
    section (`### index`; `### delete, info` serves both), in the CLI part outside those (the options several
    commands share), or by a section's elision (`--colbert-*`)."""
    usage = DOCS["docs/usage.md"]
    cli = usage[usage.index("## CLI") : usage.index("## HTTP API")]
    parts = re.split(r"^### (.+)$", cli, flags=re.M)
    sections = {name: text for names, text in zip(parts[1::2], parts[2::2]) for name in re.split(r",\s*", names)}
    shared = parts[0] + "".join(text for name, text in sections.items() if name not in main.commands)

    def said(option: str, text: str) -> bool:
        globs = re.findall(r"(--[a-z-]+-)(?:\*|\.\.\.)", text)
        return bool(re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)) or option.startswith(tuple(globs))

    missing = [
        f"{name} {opts[0]}"
        for name, command in main.commands.items()
        for opts in ([o for o in (*p.opts, *p.secondary_opts) if o.startswith("-")] for p in command.params)
        if opts and not any(said(o, sections.get(name, "")) or said(o, shared) for o in opts)
    ]
    assert set(sections) >= set(main.commands), sorted(set(main.commands) - set(sections))
    assert not missing, f"docs/usage.md says nothing of {missing}"


def _format_default(value) -> set[str]:
    if isinstance(value, float) and value.is_integer():
        return {str(value), str(int(value))}
    return {str(value)}


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_documented_option_defaults_are_the_cli_defaults(doc):
    found = 0
    pattern = r"`(--[a-z][a-z-]*)[^`]*`[^`\n]{0,80}?\bdefaults?(?: to|:)? `?([0-9][0-9.,]*[0-9]|[0-9])`?"
    for option, stated in re.findall(pattern, DOCS[doc]):
        defaults = {
            fmt
            for cmd in main.commands.values()
            for opt, p in options_of(cmd).items()
            if opt == option and p.default is not None
            for fmt in _format_default(p.default)
        }
        if option in ("--weights",):
            defaults = {",".join(f"{w:g}" for w in DEFAULT_WEIGHTS)}
        assert stated in defaults, f"{doc}: says {option} defaults to {stated}; the CLI's default is {defaults}"
        found += 1
    if doc == "docs/usage.md":
        assert found >= 4  # the pattern still finds what it is meant to


def test_candidates_default_everywhere_is_the_plan_constant():
    for doc, text in DOCS.items():
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for sentence in re.split(r"(?<=[.])\s", prose):
            if "candidates" in sentence.lower():
                for n in re.findall(r"\bdefaults?(?: to| is|:)? \(?(\d+)\b(?![.,]\d)", sentence):
                    assert int(n) == DEFAULT_CANDIDATES, f"{doc}: {' '.join(sentence.split())!r}"
    assert f"default candidates ({DEFAULT_CANDIDATES})" in DOCS["README.md"]
    assert main.commands["eval"].params[[p.name for p in main.commands["eval"].params].index("candidates")].default == (
        DEFAULT_CANDIDATES
    )


def test_mode_and_fusion_lists_and_constants():
    usage = DOCS["docs/usage.md"]
    modes = re.search(r"`--mode ([a-z+|]+)`", usage).group(1).split("|")
    assert modes == list(PRESETS)
    fusions = re.search(r"`--fusion ([a-z|]+)`", usage).group(1).split("|")
    assert fusions == list(FUSIONS)
    readme = DOCS["README.md"]
    assert f"rrf` (k = {RRF_K}" in readme
    w = ", ".join(f"{x:g}" for x in DEFAULT_WEIGHTS)
    assert f"`({w})`" in readme and f"default `{w.replace(', ', ',')}`" in usage
    mode_option = next(p for p in main.commands["search"].params if p.name == "mode")
    assert ", ".join(PRESETS) in mode_option.help


def test_dtype_names_are_the_encoders():
    """usage.md names the ``--dtype`` values the CLI and the encoder take (one list: ``plan.ENCODER_DTYPES``)."""
    said = re.search(r"`--dtype ([a-z0-9|]+)` \(or ([^;]+);", DOCS["docs/usage.md"])
    assert sorted([*said[1].split("|"), *re.findall(r"`(\w+)`", said[2])]) == sorted(["auto", *ENCODER_DTYPES])


def test_the_factorys_variables_are_documented():
    """The variables ``uvicorn --factory`` reads (``Settings.from_env``) are the ones usage.md lists for it."""
    pytest.importorskip("fastapi")
    from m3search.server import _VARIABLES

    listed = re.search(r"`uvicorn --factory m3search.server:create_app`\s+reads (.*?);", DOCS["docs/usage.md"], re.S)
    assert sorted(re.findall(r"`(M3SEARCH_\w+)`", listed[1])) == sorted(f"M3SEARCH_{n.upper()}" for n in _VARIABLES)


def test_environment_variables_exist_in_the_code():
    code = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "src" / "m3search").rglob("*.py"))
    code += "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("*.py"))
    code += (REPO / "Makefile").read_text(encoding="utf-8")
    for doc, text in DOCS.items():
        for var in set(re.findall(r"\bM3SEARCH_[A-Z_]+\b", text)):
            # server.Settings.from_env reads M3SEARCH_<FIELD> for its integer fields by name
            by_field = 'f"M3SEARCH_{name.upper()}"' in code and f'"{var[len("M3SEARCH_") :].lower()}"' in code
            assert var in code or by_field, f"{doc} mentions {var}, which nothing reads"


def test_documented_routes_exist():
    """The routes usage.md's table and the README's prose name, the curl examples' (``-d``: POST, ``-X DELETE``)
    and every path in inline code (`/tei/embed_sparse`: any method) are served."""
    pytest.importorskip("fastapi")
    from m3search.server import Settings, create_app

    app = create_app(Settings())
    paths = app.openapi()["paths"]
    routes = {(m.upper(), path.replace("{doc_id}", "{id}")) for path, ops in paths.items() for m in ops}
    routes |= {(m, r.path) for r in app.routes for m in getattr(r, "methods", ())}  # the API's own docs
    table = re.findall(r"^\| `(GET|POST|DELETE|PUT) (/[^`]*)`", DOCS["docs/usage.md"], flags=re.M)
    assert len(table) >= 7
    said = [("docs/usage.md", method, path) for method, path in table]
    said += [
        ("README.md", m, path) for m, path in re.findall(r"\b(GET|POST|DELETE) (/[a-z0-9/{}]+)", DOCS["README.md"])
    ]
    for doc, text in ALL_DOCS.items():
        for line in text.replace("\\\n", " ").splitlines():
            if url := re.search(r"curl .*?localhost:\d+(/\S*)", line):
                said.append((doc, "DELETE" if "-X DELETE" in line else "POST" if " -d " in line else "GET", url[1]))
        said += [(doc, None, span) for span in inline_code(text) if re.fullmatch(r"/[\w{}.-][\w/{}.-]*", span)]
    assert len(said) >= 50  # the patterns still find what they are meant to
    for doc, method, path in said:
        assert any(path == p and method in (None, m) for m, p in routes), (
            f"{doc} names {method or 'any method of'} {path}: no route"
        )


def test_quick_start_needs_nothing_beside_the_clone():
    readme = DOCS["README.md"]
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test", "test-heavy"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, flags=re.M), target
    data = re.search(r"^DATA\s*\?=\s*(\S+)", makefile, flags=re.M).group(1)
    assert not data.startswith(".."), "make demo must not need a folder outside the clone"
    assert (REPO / data / "corpus.jsonl").is_file() and (REPO / data / "queries.jsonl").is_file()
    assert data in readme and (REPO / "data" / "README.md").is_file()
    assert "licen" in (REPO / "data" / "README.md").read_text(encoding="utf-8").lower()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_on_another_corpus_gets_a_collection_of_its_own(tmp_path):
    """`make demo DATA=...` (README, "Other corpora") added that corpus to the demo's collection: searches
    mixed Cranfield hits into the user's, and a shared id replaced a Cranfield document."""

    def collection(*args: str) -> str:
        run = subprocess.run(["make", "-n", "demo", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return re.search(r"m3search index .* --collection (\S+)", run.stdout).group(1)

    demo, other = collection(), collection(f"DATA={tmp_path / 'scifact'}")
    assert demo != other and other.endswith("scifact"), (demo, other)


def test_architecture_names_every_module():
    """ARCHITECTURE.md's table is the newcomer's map: each module under src/m3search is a row of it (a folder
    named with a trailing / covers its files; in a cell, `engines/a.py` / `b.py` means engines/b.py too)."""
    named = set()
    for cell in re.findall(r"^\| (`[^|]+) \|", (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8"), flags=re.M):
        folder = ""
        for name in re.findall(r"`([^`]+)`", cell):
            folder = name.rpartition("/")[0] + "/" if "/" in name else folder
            named.add(name if "/" in name else folder + name)
    package = REPO / "src" / "m3search"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    missing = {m for m in modules if m not in named and not any(n.endswith("/") and m.startswith(n) for n in named)}
    assert not missing, f"ARCHITECTURE.md names no row for {sorted(missing)}"
    assert not {n for n in named if not (package / n).exists()}, "ARCHITECTURE.md names a module that is gone"


def test_every_file_the_docs_name_exists():
    """A path into the repository (`tests/test_http.py`, `benchmarks/RESULTS.md`, `.ci/run`, a relative link) must
    be there: a renamed test or script left the docs pointing at nothing."""
    checked = 0
    for doc, text in ALL_DOCS.items():
        rooted = re.findall(r"(?<![\w./-])((?:tests|benchmarks|docs|data|src|\.ci)/[\w./-]*\w|[A-Z]+\.md)\b", text)
        linked = [(Path(doc).parent / link).as_posix() for link in re.findall(r"\]\(([^):#]+)\)", text)]
        for path in rooted + linked:
            assert (REPO / path).exists(), f"{doc} names {path}, which is not in the repository"
            checked += 1
    assert checked >= 40


def _definitions(tree: ast.AST) -> dict[str, dict]:
    """Top-level functions, classes (with their own definitions) and assigned names of a module body."""
    out: dict[str, dict] = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = _definitions(node) if isinstance(node, ast.ClassDef) else {}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {t.id: {} for t in targets if isinstance(t, ast.Name)}
    return out


def test_every_dotted_code_name_in_the_docs_exists():
    """`collection.PENDING_LEASE_S`, `engines.milvus.CONNECT_TIMEOUT_S`, `Collection.set_search_defaults`,
    ARCHITECTURE's `encoder.M3Encoder.encode_windows`: a module of the package (or one of its classes) followed
    by names each defined in the one before (read from the source: nothing is imported)."""
    package = REPO / "src" / "m3search"
    modules = {}
    for p in package.rglob("*.py"):
        name = ".".join(p.relative_to(package).with_suffix("").parts).removesuffix("__init__").rstrip(".")
        modules[name] = _definitions(ast.parse(p.read_text(encoding="utf-8")))
    classes: dict[str, dict] = {}  # a class named first: the definitions of every class of that name
    for defs in modules.values():
        for name, body in defs.items():
            if body:
                classes.setdefault(name, {name: {}})[name].update(body)
    checked = 0
    for doc, text in ALL_DOCS.items():
        text = re.sub(r"^```\w.*?^```", "", text, flags=re.S | re.M)  # (an example's own variables)
        for dotted in sorted(set(re.findall(r"(?<![\w./-])(?:m3search\.)?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)", text))):
            parts = dotted.split(".")
            if parts[-1] in ("py", "md", "json", "jsonl", "db", "tsv", "csv", "gz", "txt"):
                continue  # a file name
            i = next((i for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), 0)
            scope, names = (modules[".".join(parts[:i])], parts[i:]) if i else (classes.get(parts[0]), parts)
            if scope is None:
                continue  # not the package's (`OpenAI(...).embeddings.create`)
            for name in names:
                assert name in scope, f"{doc} names {dotted}: no {name} there"
                scope = scope[name]
            checked += 1
    assert checked >= 25


def test_the_readme_library_example_runs(tmp_path, monkeypatch, tiny_model_path):
    """The README's Python block, as written, with the tiny model in place of BAAI/bge-m3."""
    code = code_blocks(DOCS["README.md"], ("python",))[0]
    assert '"BAAI/bge-m3"' in code
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(code.replace('"BAAI/bge-m3"', repr(str(tiny_model_path))), "README.md", "exec"), scope)
    with scope["col"] as reopened:
        assert [h.id for h in scope["hits"]] == ["b"] and reopened.count() == 2  # the filter kept year 2024


def test_the_base64_colbert_size_is_the_documented_fraction(tiny_encoder):
    """The README said base64 ColBERT vectors were a fifth of the JSON size: a float32 is ~5.3 base64 characters,
    a JSON float (its shortest repr as a Python float) ~20 with its comma, so a quarter."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from m3search.server import Resources, Settings, create_app

    said = re.search(r'`"colbert_format": "base64"`, a (\w+) of the JSON size', DOCS["README.md"])[1]
    body = {"input": ["the boundary layer of a swept wing"] * 4, "dense": False, "sparse": False, "colbert": True}
    with TestClient(create_app(Settings(), resources=Resources(encoder=tiny_encoder))) as client:
        size = {f: len(client.post("/embed", json={**body, "colbert_format": f}).content) for f in ("float", "base64")}
    fraction = {"half": 1 / 2, "third": 1 / 3, "quarter": 1 / 4, "fifth": 1 / 5}[said]
    assert size["base64"] / size["float"] == pytest.approx(fraction, rel=0.1), size


def test_the_commands_said_to_read_m3search_collection_are_those_that_do():
    """usage.md said every command's -c could come from M3SEARCH_COLLECTION; eval and tune do not read it."""
    reads = {
        name
        for name, cmd in main.commands.items()
        for p in cmd.params
        if "--collection" in getattr(p, "opts", ()) and p.envvar == "M3SEARCH_COLLECTION"
    }
    for doc, pattern in (
        ("docs/usage.md", r"`--collection/-c` can come from `M3SEARCH_COLLECTION` for ([^;]+);"),
        ("README.md", r"`M3SEARCH_COLLECTION`, read by ([^)]+)\)"),
    ):
        said = set(re.findall(r"`([a-z]+)`", re.search(pattern, DOCS[doc]).group(1)))
        assert said == reads, f"{doc}: names {sorted(said)}; these read it: {sorted(reads)}"


def test_the_delete_example_is_true_of_the_demo_corpus():
    """usage.md's delete example answered 'deleted' for id 486, which the demo corpus does not hold."""
    import json

    line = next(ln for ln in DOCS["docs/usage.md"].splitlines() if ln.startswith("m3search delete "))
    command, answer = line.split("  #")
    answer = json.loads(answer)
    ids = shlex.split(command)[2:]
    ids = ids[: ids.index("-c")]
    corpus = {json.loads(ln)["_id"] for ln in (REPO / "data/cranfield-demo/corpus.jsonl").open(encoding="utf-8")}
    assert answer == {
        "deleted": [i for i in ids if i in corpus],
        "missing": [i for i in ids if i not in corpus],
    }
    assert answer["deleted"] and answer["missing"]


def test_the_filter_nesting_limit_is_stated_exactly():
    """usage.md said 16 levels of and/or/not; the limit counts the field condition too, so 15 operators nest."""
    from m3search.filters import parse_filter

    levels, operators = map(
        int,
        re.search(
            r"(\d+) levels of nesting counting the field condition itself \(so at most (\d+)\s+nested",
            DOCS["docs/usage.md"],
        ).groups(),
    )
    assert operators == levels - 1
    nested = {"year": {"gte": 1}}
    for i in range(operators):
        nested = {"not": nested} if i % 3 == 0 else {("and", "or")[i % 2]: [nested]}
    parse_filter(nested)
    with pytest.raises(ValueError, match=f"at most {levels} levels"):
        parse_filter({"not": nested})


def test_the_query_batch_is_the_documented_one():
    from m3search.cli import QUERY_BATCH

    said = re.findall(r"searched (\d+) at a time\s+\(`m3search.cli.QUERY_BATCH`", DOCS["docs/usage.md"])
    assert said == [str(QUERY_BATCH)]
