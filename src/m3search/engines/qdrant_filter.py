"""The filter AST (:mod:`m3search.filters`) in Qdrant's condition language, for both clients.

Qdrant Edge (``qdrant_edge``) and a Qdrant server (``qdrant_client.models``) speak the same
filter language with different Python classes and keyword spellings. What the grammar
means in Qdrant terms is decided once, here; each engine supplies a :class:`Dialect` that
only builds its client's objects. The mapping:

* ``and`` / ``or`` / ``not`` -> ``Filter(must=...)`` / ``Filter(should=...)`` / ``Filter(must_not=...)``.
* A float equality -> the closed range ``[v, v]`` (Qdrant matches keywords, integers and
  bools, not floats).
* An integer equality -> the range ``[v, v]`` alone, which holds for a stored ``2`` and
  ``2.0`` alike (the grammar counts them equal, see :func:`m3search.filters.matches`):
  one condition, so one payload read per point, not two. From 2**53 on, where float64
  is not exact (a stored 2**53 + 1 would fall in the range [2**53, 2**53]), the integer match alone.
* ``in`` over integers -> the match OR one ``[v, v]`` range per value exact in float64.
* Strings and bools -> plain matches.

Cost: Qdrant Edge reads a point's whole payload once per condition that no payload index
answers (benchmarks/RESULTS.md, "Hostile input"). So in the schema-3 layout
(:mod:`~m3search.engines.qdrant_common`) every filter is sent as ONE condition,
``NestedCondition("m", <the filter over bare field names>)`` over the metadata stored as a
one-element array: one payload read per point, whatever the number of conditions (a nested
filter is evaluated per array element; with exactly one element that is the filter on the
metadata object, ``not`` and missing fields included). It comes after ``HasVector("dense")``,
which Qdrant answers without reading the payload, so the vector-less points that hold long
texts are never read by a filter. Collections of the schema-1/2 layout (``"metadata": {...}``)
get the flat conditions over ``metadata.<field>`` they always got.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from m3search.filters import FLOAT_EXACT_INT, And, Eq, Filter, In, Not, Or, Range

__all__ = ["Dialect", "to_qdrant", "engine_filter"]

_PLAIN = re.compile(r"[A-Za-z0-9_]+")


class Dialect(Protocol):
    """Builds one client library's filter objects."""

    def filter(self, *, must: list | None = None, should: list | None = None, must_not: list | None = None) -> Any: ...

    def is_filter(self, node: Any) -> bool: ...

    def match(self, key: str, value: Any) -> Any: ...

    def has_vector(self, name: str) -> Any: ...

    def is_empty(self, key: str) -> Any: ...

    def nested(self, key: str, filter: Any) -> Any: ...

    def match_any(self, key: str, values: Sequence[Any]) -> Any: ...

    def range(
        self,
        key: str,
        *,
        gt: float | None = None,
        gte: float | None = None,
        lt: float | None = None,
        lte: float | None = None,
    ) -> Any: ...


def to_qdrant(f: Filter | None, dialect: Dialect, prefix: str = "metadata.") -> Any:
    """``f`` as the dialect's top-level ``Filter`` over ``prefix + field`` (None for no filter)."""
    if f is None:
        return None
    node = _condition(f, dialect, prefix)
    return node if dialect.is_filter(node) else dialect.filter(must=[node])


def engine_filter(f: Filter | None, dialect: Dialect, *, nested: bool, docs_only: bool = False) -> Any:
    """The filter a query, count or scroll sends (None: none needed).

    ``nested``: the schema-3 layout (``has_vector("dense")`` first, then one nested condition);
    otherwise flat conditions over ``metadata.*``. ``docs_only``: one point per document (window 0:
    no ``window`` / ``part`` key >= 1; in schema 3 also not a text point, which has no vectors).
    """
    if not nested:
        flt = to_qdrant(f, dialect)
        if not docs_only:
            return flt
        later = [dialect.range(key, gte=1) for key in ("window", "part")]
        return dialect.filter(must=[flt] if flt is not None else None, must_not=later)
    if f is None and not docs_only:
        return None
    inner = [] if f is None else [dialect.nested("m", to_qdrant(f, dialect, prefix=""))]
    if docs_only:  # part points have no dense vector: has_vector excludes them too
        inner = [dialect.filter(must=inner or None, must_not=[dialect.range("window", gte=1)])]
    return dialect.filter(must=[dialect.has_vector("dense"), *inner])


def _json_path(field: str) -> str:
    """``field`` as a Qdrant JSON path: segments other than plain names are quoted (``a."x:y"``), since
    Qdrant's path parser refuses ``:``, spaces and the like unquoted (the grammar excludes ``"``)."""
    return ".".join(seg if _PLAIN.fullmatch(seg) else f'"{seg}"' for seg in field.split("."))


def _condition(f: Filter, d: Dialect, prefix: str) -> Any:
    if isinstance(f, And):
        return d.filter(must=[_condition(x, d, prefix) for x in f.items])
    if isinstance(f, Or):
        return d.filter(should=[_condition(x, d, prefix) for x in f.items])
    if isinstance(f, Not):
        return d.filter(must_not=[_condition(f.item, d, prefix)])
    key = prefix + _json_path(f.field)
    if isinstance(f, Eq):
        v = f.value
        if isinstance(v, float):
            return d.range(key, gte=v, lte=v)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) < FLOAT_EXACT_INT:
            return d.range(key, gte=float(v), lte=float(v))
        return d.match(key, v)
    if isinstance(f, In):
        cond = d.match_any(key, list(f.values))
        exact = [v for v in f.values if isinstance(v, int) and abs(v) < FLOAT_EXACT_INT]
        if isinstance(f.values[0], str) or not exact:
            return cond
        return d.filter(should=[cond] + [d.range(key, gte=float(v), lte=float(v)) for v in exact])
    if isinstance(f, Range):
        return d.range(key, gt=f.gt, gte=f.gte, lt=f.lt, lte=f.lte)
    raise TypeError(f"not a filter node: {f!r}")
