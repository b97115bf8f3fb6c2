"""Shared fixtures: tiny random-weight models in bge-m3's layout, built once per run.

Why session-scoped: building the tokenizer and model takes seconds; every test that
needs "a model" shares these folders read-only (tests must not write into them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("M3SEARCH_SHARED", REPO.parent / "shared"))
PROXY_MODEL = SHARED / "models" / "bge-m3-proxy"
DATA = SHARED / "data"
#: Shipped with the repository (data/README.md): tests that only need "a real corpus" use it,
#: so they run on a fresh clone without ../shared.
DEMO_DATA = REPO / "data" / "cranfield-demo"


def tokenizer_texts() -> list[str]:
    """What the tiny models' tokenizers are trained on: ``DATA``'s corpora when present (~4k pieces, six
    languages), else only ``m3search.testing.BUILTIN_TEXTS`` (~200 pieces, no digits). Chosen here, from the
    same ``M3SEARCH_SHARED`` as the skips, so ``M3SEARCH_SHARED=/nowhere pytest`` runs as a fresh clone does.
    A test must hold with either tokenizer: count tokens with ``tiny_encoder.tokenize``, never by hand."""
    from m3search.testing import BUILTIN_TEXTS, default_training_texts

    return default_training_texts(DATA) if (DATA / "xquad-r").is_dir() else list(BUILTIN_TEXTS)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """Random XLM-R (hidden 64, 2 layers, 514 positions, vocab: :func:`tokenizer_texts`), initializer_range 0.2."""
    from m3search.testing import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-m3"), seed=0, texts=tokenizer_texts())


@pytest.fixture(scope="session")
def tiny_alt_model_path(tmp_path_factory) -> Path:
    """Same shape, but a tokenizer.json whose pipeline transformers 5 does not rebuild."""
    from m3search.testing import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-m3-alt"), seed=1, variant="alt", texts=tokenizer_texts())


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_path):
    """fp32 encoder on the tiny model: exact results, shared by all tests (do not mutate)."""
    from m3search import M3Encoder

    return M3Encoder.from_pretrained(str(tiny_model_path), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def proxy_model_path() -> Path:
    if not (PROXY_MODEL / "config.json").is_file():
        pytest.skip(f"real-semantics proxy model not found at {PROXY_MODEL} (set M3SEARCH_SHARED; CI has it)")
    return PROXY_MODEL


@pytest.fixture(scope="session")
def demo_data() -> Path:
    """The 300-document Cranfield subset in data/cranfield-demo (BEIR format, always present)."""
    assert (DEMO_DATA / "corpus.jsonl").is_file(), f"the shipped demo corpus is missing: {DEMO_DATA}"
    return DEMO_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (DATA / "cranfield" / "corpus.jsonl").is_file():
        pytest.skip(f"evaluation data not found at {DATA} (set M3SEARCH_SHARED; CI has it)")
    return DATA
