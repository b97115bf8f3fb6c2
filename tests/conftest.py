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


@pytest.fixture(scope="session", autouse=True)
def _encode_windows():
    """The encoder's windowing (issue 11 part B) through a local stand-in until it is merged."""
    from windowing import install

    install()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """Random XLM-R (hidden 64, 2 layers, 514 positions, ~4k vocab), initializer_range 0.2."""
    from m3search.testing import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-m3"), seed=0)


@pytest.fixture(scope="session")
def tiny_alt_model_path(tmp_path_factory) -> Path:
    """Same shape, but a tokenizer.json whose pipeline transformers 5 does not rebuild."""
    from m3search.testing import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-m3-alt"), seed=1, variant="alt")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_path):
    """fp32 encoder on the tiny model: exact results, shared by all tests (do not mutate)."""
    from m3search import M3Encoder

    return M3Encoder.from_pretrained(str(tiny_model_path), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def proxy_model_path() -> Path:
    if not (PROXY_MODEL / "config.json").is_file():
        pytest.skip(f"real-semantics proxy model not found at {PROXY_MODEL}")
    return PROXY_MODEL


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (DATA / "cranfield" / "corpus.jsonl").is_file():
        pytest.skip(f"evaluation data not found at {DATA}")
    return DATA
