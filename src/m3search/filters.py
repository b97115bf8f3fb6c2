"""Metadata filters: one JSON grammar for Python, the CLI and HTTP, parsed into a small AST.

Why an AST of our own: every engine (Qdrant Edge, a Qdrant server, Milvus) has its own
filter language, and the filter must run *inside* the engine's candidate queries (not
after them) so that ``k`` hits still come back. So the grammar is parsed and validated
once, here, and each engine translates the frozen dataclasses below itself.

Grammar (a JSON object; fields address the document's ``metadata``, dotted paths allowed)::

    {"lang": "en"}                              equality (str, int, float or bool)
    {"lang": {"eq": "en"}}                      the same, spelled out
    {"lang": {"in": ["en", "de"]}}              membership (non-empty list of str, or of int)
    {"year": {"gte": 1990, "lt": 2000}}         numeric range: gt / gte / lt / lte, combinable
    {"lang": "en", "year": {"gt": 2000}}        several keys in one object = AND
    {"and": [f, ...]}  {"or": [f, ...]}  {"not": f}
    {"author.name": "Ada"}                      dotted path into nested metadata

``"and"``, ``"or"`` and ``"not"`` are reserved keys: a metadata field of that name cannot
be filtered on. ``{}`` and ``None`` mean "no filter" (:func:`parse_filter` returns None).

Limits (checked here, before any engine sees a filter; :class:`FilterTooComplexError`):
at most :data:`MAX_FILTER_CONDITIONS` field conditions (an ``in`` over strings is one, over
integers one per value), :data:`MAX_IN_VALUES` values per ``in`` and :data:`MAX_FILTER_DEPTH`
levels of ``and``/``or``/``not``. Why: an engine may check
each condition against each candidate's stored payload (Qdrant collections made before
schema 3 do), so a filter's cost may be conditions times stored bytes
(benchmarks/RESULTS.md, "Hostile input"); the limits bound the work one request can ask for. Integers must fit in int64 (what engines store, see
:func:`m3search.collection._check_metadata`); a 400-digit bound is refused, not an overflow.

Semantics (what :func:`matches` implements and engines follow): a missing field never
satisfies ``eq``/``in``/range, so ``{"not": {"f": 1}}`` keeps documents without ``f``;
when the stored value is a list, a condition holds if any element satisfies it. Numbers
compare by value (a stored ``2.0`` equals ``2``), except that an integer from 2**53 on (where
float64 stops telling neighbours apart: 2**53 + 1 rounds to 2**53) equals only integers; ranges
compare in float64, as engines do.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_FILTER_CONDITIONS",
    "MAX_FILTER_DEPTH",
    "MAX_IN_VALUES",
    "INT64_MIN",
    "INT64_MAX",
    "FilterTooComplexError",
    "Eq",
    "In",
    "Range",
    "And",
    "Or",
    "Not",
    "Filter",
    "parse_filter",
    "to_json",
    "matches",
]

Scalar = str | int | float | bool

RANGE_OPS = ("gt", "gte", "lt", "lte")
FIELD_OPS = ("eq", "in") + RANGE_OPS
LOGICAL_KEYS = ("and", "or", "not")
_SEGMENT = re.compile(r'^[^.\[\]"\\]+$')  # Qdrant's JSON paths cannot address '[', ']', '"' or '\'

#: Most field conditions (eq / in / range leaves) in one filter.
MAX_FILTER_CONDITIONS = 64
#: Most values in one ``in`` list.
MAX_IN_VALUES = 1024
#: Deepest nesting of ``and`` / ``or`` / ``not`` objects.
MAX_FILTER_DEPTH = 16
#: Integers a filter (and stored metadata) may hold: what the engines store exactly.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Integers up to this magnitude are exact in float64: equal to a stored float of the same value.
FLOAT_EXACT_INT = 2**53


class FilterTooComplexError(ValueError):
    """A filter over :data:`MAX_FILTER_CONDITIONS`, :data:`MAX_IN_VALUES` or :data:`MAX_FILTER_DEPTH`."""


@dataclass(frozen=True)
class Eq:
    """``field == value``. A float value is compared numerically (engines may map it to a range)."""

    field: str
    value: Scalar


@dataclass(frozen=True)
class In:
    """``field`` equals one of ``values`` (a non-empty tuple, all str or all int)."""

    field: str
    values: tuple


@dataclass(frozen=True)
class Range:
    """Numeric range; unset bounds are None, at least one is set."""

    field: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class And:
    items: tuple


@dataclass(frozen=True)
class Or:
    items: tuple


@dataclass(frozen=True)
class Not:
    item: Filter


Filter = Eq | In | Range | And | Or | Not
_NODES = (Eq, In, Range, And, Or, Not)


def parse_filter(obj: Any) -> Filter | None:
    """Validate a filter (dict, JSON string, parsed AST or None) and return its AST.

    Returns None for "no filter" (``None``, ``{}``, ``""``). Raises ValueError (or
    TypeError for a non-object) whose message names the offending part;
    :class:`FilterTooComplexError` (a ValueError) when a limit is exceeded.
    """
    if obj is None:
        return None
    if isinstance(obj, _NODES):  # built in Python: checked as its JSON form is (names, values, bounds, limits)
        return _Parser().ast(obj, "filter", 1)
    if isinstance(obj, str):
        if not obj.strip():
            return None
        try:
            obj = json.loads(obj)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"filter is not valid JSON: {exc}") from None
    if not isinstance(obj, Mapping):
        raise TypeError(f"filter must be a JSON object (dict), got {type(obj).__name__}")
    if not obj:
        return None
    return _Parser().object(obj, "filter", 1)


class _Parser:
    """One parse: counts field conditions against the limits as it goes (no recursion past them)."""

    def __init__(self) -> None:
        self.conditions = 0

    def _count(self, where: str, n: int = 1) -> None:
        self.conditions += n
        if self.conditions > MAX_FILTER_CONDITIONS:
            raise FilterTooComplexError(
                f"{where}: a filter may hold at most {MAX_FILTER_CONDITIONS} field conditions "
                "(an 'in' over integers counts one per value)"
            )

    @staticmethod
    def _depth(depth: int, where: str) -> None:
        if depth > MAX_FILTER_DEPTH:
            raise FilterTooComplexError(f"{where}: a filter may nest at most {MAX_FILTER_DEPTH} levels")

    def object(self, obj: Any, where: str, depth: int) -> Filter:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}: {_short(obj)}")
        if not obj:
            raise ValueError(f"{where}: empty object inside a filter")
        self._depth(depth, where)
        parts: list[Filter] = []
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            if key in ("and", "or"):
                if not isinstance(value, (list, tuple)) or not value:
                    raise ValueError(f"{where}: '{key}' needs a non-empty list of filters, got {_short(value)}")
                items = tuple(self.object(v, f"{where}.{key}[{i}]", depth + 1) for i, v in enumerate(value))
                parts.append(items[0] if len(items) == 1 else (And(items) if key == "and" else Or(items)))
            elif key == "not":
                parts.append(Not(self.object(value, f"{where}.not", depth + 1)))
            else:
                parts.append(self.field(key, value, where))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def ast(self, f: Any, where: str, depth: int) -> Filter:
        """Check an AST built in Python as :meth:`object` checks its JSON form, node by node: each leaf's JSON
        through :meth:`field`, so a field named like a logical key (``Eq("and", 1)``) is still a field. Returns
        the tree rebuilt of the checked leaves (NumPy values as the Python ones they hold)."""
        self._depth(depth, where)
        if f is None:
            raise ValueError(f"{where}: empty object inside a filter")
        if isinstance(f, (And, Or)):
            key = "and" if isinstance(f, And) else "or"
            if not f.items:
                raise ValueError(f"{where}: '{key}' needs a non-empty list of filters, got {_short(f.items)}")
            return type(f)(tuple(self.ast(x, f"{where}.{key}[{i}]", depth + 1) for i, x in enumerate(f.items)))
        if isinstance(f, Not):
            return Not(self.ast(f.item, f"{where}.not", depth + 1))
        return self.field(f.field, to_json(f)[f.field], where)  # to_json: TypeError for what is no filter node

    def field(self, field: str, spec: Any, where: str) -> Filter:
        _check_field(field, where)
        at = f"{where}.{field}"
        if not isinstance(spec, Mapping):
            self._count(at)
            return Eq(field, _check_scalar(spec, at))
        if not spec:
            raise ValueError(f"{at}: empty operator object (use one of {', '.join(FIELD_OPS)})")
        unknown = [op for op in spec if op not in FIELD_OPS]
        if unknown:
            raise ValueError(f"{at}: unknown operator {_short(unknown[0])} (allowed: {', '.join(FIELD_OPS)})")
        parts: list[Filter] = []
        if "eq" in spec:
            self._count(at)
            parts.append(Eq(field, _check_scalar(spec["eq"], f"{at}.eq")))
        if "in" in spec:
            node = In(field, _check_in(spec["in"], f"{at}.in"))
            self._count(at, _weight(node))
            parts.append(node)
        bounds = {}
        for op in RANGE_OPS:
            if op in spec:
                bounds[op] = _check_bound(spec[op], f"{at}.{op}")
        if "gt" in bounds and "gte" in bounds or "lt" in bounds and "lte" in bounds:
            raise ValueError(f"{at}: give at most one lower bound (gt/gte) and one upper bound (lt/lte)")
        if bounds:
            self._count(at)
            parts.append(Range(field, **bounds))
        return parts[0] if len(parts) == 1 else And(tuple(parts))


def _weight(f: Filter) -> int:
    """Conditions a leaf costs: an ``in`` over integers is checked value by value (a stored 2.0
    equals 2, so engines add a numeric range per value), any other leaf is one condition."""
    return len(f.values) if isinstance(f, In) and not isinstance(f.values[0], str) else 1


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: messages stay one readable line whatever was sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_field(field: str, where: str) -> str:
    segments = field.split(".")
    if not field or not all(_SEGMENT.match(s) for s in segments) or not _encodable(field):
        raise ValueError(
            f"{where}: invalid field name {_short(field)} (dotted path of non-empty names without '[', ']', '\"' or '\\\\')"
        )
    return field


def _encodable(text: str) -> bool:
    """False for strings UTF-8 cannot encode (lone surrogates from JSON's ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_int(value: int, where: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{where}: integer out of range (must fit in 64 bits: -2**63 .. 2**63-1), got {_short(value)}")
    return value


def python_value(v: Any) -> Any:
    """The Python value a NumPy scalar holds (a list for an array), else ``v``: values computed with NumPy or read
    with pandas are numbers to the caller. NumPy is not imported here: whoever made one loaded it."""
    numpy = sys.modules.get("numpy")
    return v.tolist() if numpy is not None and isinstance(v, (numpy.generic, numpy.ndarray)) else v


def _check_scalar(value: Any, where: str) -> Scalar:
    value = python_value(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _check_int(value, where)
    if isinstance(value, str):
        if not _encodable(value):
            raise ValueError(f"{where}: string is not valid Unicode (lone surrogate): {_short(value)}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: value must be finite, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: a list is not a value; use {{'in': [...]}} for membership")
    raise ValueError(f"{where}: value must be a string, number or boolean, got {type(value).__name__}: {_short(value)}")


def _check_bound(b: Any, where: str) -> int | float:
    b = python_value(b)
    if isinstance(b, bool) or not isinstance(b, (int, float)):
        raise ValueError(f"{where}: range bound must be a finite number, got {_short(b)}")
    if isinstance(b, int):
        return _check_int(b, where)
    if not math.isfinite(b):
        raise ValueError(f"{where}: range bound must be a finite number, got {b!r}")
    return b


def _check_in(values: Any, where: str) -> tuple:
    values = python_value(values)
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{where}: 'in' needs a list, got {type(values).__name__}: {_short(values)}")
    values = [python_value(v) for v in values]
    if not values:
        raise ValueError(f"{where}: 'in' needs a non-empty list")
    if len(values) > MAX_IN_VALUES:
        raise FilterTooComplexError(f"{where}: 'in' may list at most {MAX_IN_VALUES} values, got {len(values)}")
    if all(isinstance(v, str) for v in values):
        return tuple(_check_scalar(v, where) for v in values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tuple(_check_int(v, where) for v in values)
    raise ValueError(f"{where}: 'in' values must be all strings or all integers, got {_short(list(values))}")


def to_json(f: Filter | None) -> dict:
    """The canonical JSON form of an AST (``parse_filter(to_json(f)) == f``)."""
    if f is None:
        return {}
    if isinstance(f, Eq):
        return {f.field: {"eq": f.value}}
    if isinstance(f, In):
        return {f.field: {"in": list(f.values)}}
    if isinstance(f, Range):
        return {f.field: {op: getattr(f, op) for op in RANGE_OPS if getattr(f, op) is not None}}
    if isinstance(f, And):
        return {"and": [to_json(x) for x in f.items]}
    if isinstance(f, Or):
        return {"or": [to_json(x) for x in f.items]}
    if isinstance(f, Not):
        return {"not": to_json(f.item)}
    raise TypeError(f"not a filter node: {f!r}")


_MISSING = object()


def _lookup(metadata: Mapping, field: str) -> Any:
    cur: Any = metadata
    for seg in field.split("."):
        if not isinstance(cur, Mapping) or seg not in cur:
            return _MISSING
        cur = cur[seg]
    return cur


def _values(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _eq(a: Any, b: Scalar) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(b, str) or isinstance(a, str):
        return a == b
    if not isinstance(a, (int, float)):
        return False
    if isinstance(b, float):  # a float filter value compares in float64, as engines' ranges do
        return float(a) == b
    if isinstance(a, float) and abs(b) >= FLOAT_EXACT_INT:  # from 2**53 on an integer equals only integers
        return False
    return a == b


def _in_range(a: Any, r: Range) -> bool:
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return False
    a = float(a)
    return (
        (r.gt is None or a > float(r.gt))
        and (r.gte is None or a >= float(r.gte))
        and (r.lt is None or a < float(r.lt))
        and (r.lte is None or a <= float(r.lte))
    )


def matches(f: Filter | None, metadata: Mapping | None) -> bool:
    """Reference evaluation of a filter on one metadata dict (used by tests and in-memory paths)."""
    if f is None:
        return True
    metadata = metadata or {}
    if isinstance(f, And):
        return all(matches(x, metadata) for x in f.items)
    if isinstance(f, Or):
        return any(matches(x, metadata) for x in f.items)
    if isinstance(f, Not):
        return not matches(f.item, metadata)
    v = _lookup(metadata, f.field)
    if v is _MISSING or v is None:
        return False
    if isinstance(f, Eq):
        return any(_eq(x, f.value) for x in _values(v))
    if isinstance(f, In):
        return any(_eq(x, y) for x in _values(v) for y in f.values)
    if isinstance(f, Range):
        return any(_in_range(x, f) for x in _values(v))
    raise TypeError(f"not a filter node: {f!r}")
