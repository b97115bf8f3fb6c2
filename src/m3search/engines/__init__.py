"""Storage engines behind :class:`m3search.Collection`, picked by the location string.

Like ``QdrantClient(":memory:" | path= | url=)``, one facade hands calls to a backend:

=============================  ==============================================================
location                       engine
=============================  ==============================================================
``/some/folder`` (plain path)  :class:`~m3search.engines.qdrant_edge.QdrantEdgeEngine` (embedded)
``qdrant://host:port/name``    ``m3search.engines.qdrant_remote.QdrantRemoteEngine``
``qdrant+local://path/name``   ``m3search.engines.qdrant_remote.QdrantRemoteEngine`` (qdrant-client local mode)
``milvus://host:port/name``    ``m3search.engines.milvus.MilvusEngine``
``something.db``               ``m3search.engines.milvus.MilvusEngine`` (Milvus Lite file)
=============================  ==============================================================

Engine modules are imported only when their location is used, so optional clients
(qdrant-client, pymilvus) stay optional, and this module needs only the standard library
(the CLI reads locations before it loads anything). :func:`register_engine` adds a scheme;
the protocol is :class:`m3search.engines.base.Engine`.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m3search.engines.base import Engine

__all__ = [
    "register_engine",
    "resolve_engine",
    "location_scheme",
    "location_options",
    "lite_file",
    "holder_lock_path",
    "lite_lock_path",
    "taken",
    "ENGINES",
    "FOLDER_LOCK",
]

#: scheme -> "module:Class". ``""`` is a plain filesystem path; ``".db"`` a file suffix.
ENGINES: dict[str, str] = {
    "": "m3search.engines.qdrant_edge:QdrantEdgeEngine",
    "qdrant": "m3search.engines.qdrant_remote:QdrantRemoteEngine",
    "qdrant+local": "m3search.engines.qdrant_remote:QdrantRemoteEngine",
    "milvus": "m3search.engines.milvus:MilvusEngine",
    ".db": "m3search.engines.milvus:MilvusEngine",
}

#: The file in an embedded collection's folder that its holder keeps flock()ed (engines.qdrant_edge).
FOLDER_LOCK = "lock"

_EXTRAS = {
    "qdrant_remote": "pip install 'm3search[qdrant]'",
    "milvus": "pip install 'm3search[milvus]'",
}


def register_engine(scheme: str, target: str) -> None:
    """Map a location scheme (``"name"`` for ``name://...``) to ``"module:Class"``."""
    if ":" not in target:
        raise ValueError(f"engine target must be 'module:Class', got {target!r}")
    ENGINES[scheme] = target


def location_scheme(location: str | os.PathLike) -> str:
    """The registry key for a location: URL scheme, ``".db"`` for a file of that suffix, or ``""``."""
    loc = os.fspath(location)
    if "://" in loc:
        return loc.split("://", 1)[0].lower()
    if loc.endswith(".db"):
        return ".db"
    return ""


#: Server locations whose URL may carry engine options as a query, the CLI's only way to give them:
#: ``qdrant://host/name?https=true&timeout=30``, ``milvus://host/name?connect_timeout=30``.
QUERY_OPTION_SCHEMES = ("qdrant", "milvus")
#: Options a URL must not carry (they would land in shell history, logs and error messages), and where they come from.
_SECRET_OPTIONS = {"api_key": "QDRANT_API_KEY", "token": "MILVUS_TOKEN"}


def location_options(location: str | os.PathLike, options: dict | None = None) -> tuple[str, dict]:
    """``location`` without its URL query, and ``options`` with the query's ``key=value`` pairs added
    (:func:`_option_value`). Only :data:`QUERY_OPTION_SCHEMES` locations carry a query (a folder may have a
    ``?`` in its name). An option given twice, or both in the URL and in ``options``, or a secret in the URL,
    is a ValueError; unknown names are the engine's to refuse. So is an empty location: as a path it is the current
    folder, where ``Collection.create("")`` made a collection (an unset variable, not a place)."""
    loc, options = os.fspath(location), dict(options or {})
    if loc == "":
        raise ValueError("collection location is empty; '.' names the current folder")
    if location_scheme(loc) not in QUERY_OPTION_SCHEMES or "?" not in loc:
        return loc, options
    from urllib.parse import parse_qsl

    loc, _, query = loc.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"the options in {os.fspath(location)!r} must be key=value pairs joined by '&'") from None
    for key, raw in pairs:
        if key in _SECRET_OPTIONS:
            raise ValueError(
                f"{key} does not go in a location (it would be kept in shell history and logs): "
                f"set {_SECRET_OPTIONS[key]} in the environment"
            )
        if key in options:  # given before, in the URL or in options
            raise ValueError(f"engine option {key!r} is given twice (in {os.fspath(location)!r})")
        if not raw:
            raise ValueError(f"engine option {key!r} in {os.fspath(location)!r} has no value")
        options[key] = _option_value(key, raw)
    return loc, options


def _option_value(key: str, raw: str) -> bool | int | float:
    """A URL option's value: ``true``/``false``, an integer or a finite decimal, as every option a URL may carry
    is. Anything else is a ValueError: kept as a string, ``https=no`` was true to the engine, and so were
    ``https=true?timeout=30`` (a second ``?``, not ``&``) and ``https=true#x``, the timeout lost."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            continue
        if not math.isfinite(value):
            raise ValueError(f"engine option {key!r} must be a finite number, got {raw!r}")
        return value
    raise ValueError(f"engine option {key!r} must be true, false or a number, got {raw!r}")


def lite_file(location: str | os.PathLike) -> Path:
    """A Milvus Lite location's file, absolute, symlinks resolved. The one-process lock, this process's
    count of the file's clients and the server record are all named after it: named after the path as
    given, a link to the file (or to its folder) was another file to them, and let a second process in."""
    return Path(os.fspath(location)).expanduser().resolve()


def holder_lock_path(location: str | os.PathLike) -> Path | None:
    """The file the process holding an embedded collection keeps flock()ed: ``<folder>/lock``, or
    ``.<name>.m3search-lock`` beside a Milvus Lite file; None for a server location (no process holds it)."""
    scheme = location_scheme(location)
    if scheme == "":
        return Path(os.fspath(location)) / FOLDER_LOCK
    if scheme == ".db":
        return lite_lock_path(location)
    return None


def lite_lock_path(location: str | os.PathLike) -> Path:
    """m3search's own lock beside a Milvus Lite file (``<dir>/.<name>.m3search-lock``). milvus-lite's lock
    alone stops only the first other process: that process's refused server, on its way out, unlinks the
    ``.<name>.lock`` it never held, and the next process then starts a second server on the same file."""
    path = lite_file(location)
    return path.with_name(f".{path.name}.m3search-lock")


def resolve_engine(location: str | os.PathLike) -> type[Engine]:
    """The engine class for ``location`` (imported lazily; a missing extra gets an install hint)."""
    scheme = location_scheme(location)
    if scheme not in ENGINES:
        known = ", ".join(f"{s}://" for s in ENGINES if s and not s.startswith("."))
        raise ValueError(
            f"unknown collection location scheme {scheme!r} in {os.fspath(location)!r} (known: {known}, or a folder path)"
        )
    module_name, cls_name = ENGINES[scheme].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        short = module_name.rsplit(".", 1)[-1]
        hint = _EXTRAS.get(short)
        if hint and exc.name and not exc.name.startswith("m3search"):
            raise ImportError(f"the {scheme!r} engine needs {exc.name}: {hint}") from exc
        raise
    return getattr(module, cls_name)


def taken(engine_cls: type[Engine], location: str, options: dict) -> Exception:
    """The error for creating a collection where ``exists`` found one. On a server (``Engine.shared``; the
    embedded engine clears what its own interrupted create left) it may be what an interrupted create or
    migrate left: that is said, with how to remove it, rather than "use it" (opening it fails)."""
    from m3search.errors import CollectionExistsError, CollectionNotFoundError

    if engine_cls.shared:
        try:
            engine_cls.open(location, **options).close()
        except CollectionNotFoundError as exc:
            return CollectionExistsError(
                f"{exc}: left by an interrupted create or migrate. Remove it (a Qdrant server: DELETE "
                "/collections/NAME; qdrant+local: its folder; a Milvus Lite file: the file), then run again"
            )
        except Exception:  # in use, or another version's: it is there, which is what to say
            pass
    return CollectionExistsError(f"a collection already exists at {location}")
