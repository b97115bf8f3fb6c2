"""m3search: BGE-M3 hybrid retrieval (dense + sparse + ColBERT from one forward pass).

Public names are imported lazily so that ``import m3search`` (and ``m3search --help``)
does not pull in torch, transformers or a storage engine until they are used.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "M3Encoder": "m3search.encoder",
    "M3Embeddings": "m3search.encoder",
    "TruncationWarning": "m3search.encoder",
    "ModelLoadError": "m3search.encoder",
    "Collection": "m3search.collection",
    "Hit": "m3search.collection",
    "tune": "m3search.tuning",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'm3search' has no attribute {name!r}")


def __dir__():
    return __all__
