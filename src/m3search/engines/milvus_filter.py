"""The filter AST (:mod:`m3search.filters`) in Milvus's expression language.

A filter becomes a Milvus boolean expression over the ``meta`` JSON field (``{"a.b": 1}`` -> ``meta["a"]["b"] == 1 or json_contains(...)``).
Milvus Lite 2.5 has no ``not`` operator ("unsupported expr proto node"), so negations
are pushed down to the leaves (De Morgan) and each negated leaf is written positively
with the help of ``kinds`` (``kinds["f"] != "n"`` is true when ``f`` is missing or not a
number). Two things cannot be expressed that way and raise ValueError instead of
returning wrong hits: a negated condition on a field that holds a list in some document
(Milvus Lite; a server gets ``not (...)``), and a numeric range over list elements
(any Milvus: JSON range comparisons ignore arrays). Filter strings cannot contain
control characters (Milvus Lite's expression parser has no escapes for them).

Why a module of its own: as :mod:`~m3search.engines.qdrant_filter` for Qdrant, what the grammar means in Milvus
terms is decided in one place; :mod:`~m3search.engines.milvus` only sends the expression, and writes ``kinds``
(:func:`metadata_kinds`) beside each row's metadata.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from m3search.filters import FLOAT_EXACT_INT, INT64_MIN, And, Eq, Filter, In, Not, Or, Range

__all__ = ["to_milvus_expr", "metadata_kinds", "kinds_path"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A JSON-pointer array index (RFC 6901): Milvus reads such a path segment as one where the value is a list.
_INDEX = re.compile(r"0|[1-9][0-9]*")


def _lit(s: str, what: str = "string") -> str:
    """A Milvus expression string literal (only ``\\\\`` and ``\\"`` escapes exist)."""
    if _CONTROL.search(s):
        raise ValueError(f"Milvus filters cannot contain control characters; {what} {s!r} has one")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _num(v: float | int, *, bound: bool = False) -> str:
    """A number literal; ``bound``: a range bound, sent as a float so that Milvus compares in float64 as
    the rule says (an integer bound it compares exactly: {lt: 2**53 + 1} matched 2**53 there alone)."""
    if isinstance(v, int) and not bound:
        if v == INT64_MIN:  # Milvus's parser reads it as -(2**63 - 1): it would match its neighbour
            raise ValueError(f"Milvus filters cannot match the integer {v} (-2**63): Milvus reads it as {v + 1}")
        return str(v)
    return repr(float(v))


def _element(v: Any) -> str:
    """``v`` as a json_contains literal: that compares list elements, and a float literal matches 1 and 1.0
    alike (in float64), an integer literal only integers, exactly. So integers below 2**53 go as floats,
    integers from 2**53 on (where float64 merges neighbours) as themselves (:func:`m3search.filters.matches`)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) < FLOAT_EXACT_INT:
        return _num(float(v))
    return _scalar(v)


def _wide(v: Any) -> bool:
    """An integer float64 cannot tell from its neighbours: Milvus's ``in`` compares it exactly, its ``==`` does not."""
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) >= FLOAT_EXACT_INT


def _check_field(field: str) -> None:
    if "/" in field:  # Milvus turns a JSON key into a JSON-pointer path, where "/" separates keys
        raise ValueError(f"Milvus filters cannot address metadata field names with '/': {field!r}")


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return _lit(v, "value")
    return _num(v)


def _kind(v: Any) -> str:
    for kind, types in (("z", type(None)), ("b", bool), ("n", (int, float)), ("s", str), ("l", (list, tuple))):
        if isinstance(v, types):
            return kind
    return "o"


def metadata_kinds(meta: dict, prefix: str = "") -> dict[str, str]:
    """``{dotted path: type code}`` for every path a filter can address (z null, b bool,
    n number, s string, l list, o object). A key holding a dot is no such path (a filter's
    ``"a.b"`` means key b inside a): recorded, it would pass for the nested one."""
    out: dict[str, str] = {}
    for key, value in meta.items():
        if "." in key:
            continue
        path = prefix + key
        out[path] = _kind(value)
        if isinstance(value, dict):
            out.update(metadata_kinds(value, path + "."))
    return out


class _ExprBuilder:
    """Negation-normal-form translation of a filter AST (see the module docstring)."""

    def __init__(self, has_lists: Callable[[str], bool], allow_not: bool) -> None:
        self.has_lists = has_lists
        self.allow_not = allow_not

    @staticmethod
    def path(field: str) -> str:
        _check_field(field)
        return "meta" + "".join(f"[{_lit(seg, 'field name')}]" for seg in field.split("."))

    def build(self, f: Filter, neg: bool = False) -> str:
        if isinstance(f, Not):
            return self.build(f.item, not neg)
        if isinstance(f, (And, Or)):
            joiner = " and " if isinstance(f, And) != neg else " or "
            return "(" + joiner.join(self.build(x, neg) for x in f.items) + ")"
        leaf = self._range(f, neg) if isinstance(f, Range) else self._leaf(f, neg)
        return _in_objects(f.field, leaf, neg)

    def _leaf(self, f: Eq | In, neg: bool) -> str:
        pos = self._positive(f)
        if not neg:
            return pos
        if self.has_lists(f.field):
            if self.allow_not:
                return f"(not {pos})"
            raise ValueError(
                f"Milvus Lite cannot negate a condition on metadata field {f.field!r}: some documents hold a list "
                "there and Milvus Lite has no NOT operator (use a Milvus server, or a positive filter)"
            )
        p, k = self.path(f.field), kinds_path(f.field)
        if isinstance(f, Eq) and not _wide(f.value):
            return f'({k} != "l" and {p} != {_scalar(f.value)})'
        values = [f.value] if isinstance(f, Eq) else f.values
        return f'({k} != "l" and {p} not in [{", ".join(_scalar(v) for v in values)}])'

    def _positive(self, f: Filter) -> str:
        p = self.path(f.field)
        if isinstance(f, Eq):
            v = f.value
            test = f"{p} in [{_scalar(v)}]" if _wide(v) else f"{p} == {_scalar(v)}"  # `==` compares in float64
            return f"({test} or json_contains({p}, {_element(v)}))"
        if isinstance(f, In):
            vals = ", ".join(_scalar(v) for v in f.values)
            return f"({p} in [{vals}] or json_contains_any({p}, [{', '.join(_element(v) for v in f.values)}]))"
        raise TypeError(f"not a filter node: {f!r}")

    def _range(self, f: Range, neg: bool) -> str:
        if self.has_lists(f.field):
            raise ValueError(
                f"Milvus cannot range-filter metadata field {f.field!r}: some documents hold a list there and "
                "Milvus range comparisons ignore JSON arrays"
            )
        p = self.path(f.field)
        ops = [(f.gt, ">", "<="), (f.gte, ">=", "<"), (f.lt, "<", ">="), (f.lte, "<=", ">")]
        if not neg:
            return "(" + " and ".join(f"{p} {op} {_num(b, bound=True)}" for b, op, _ in ops if b is not None) + ")"
        alts = [f'{kinds_path(f.field)} != "n"']
        alts += [f"{p} {nop} {_num(b, bound=True)}" for b, _, nop in ops if b is not None]
        return "(" + " or ".join(alts) + ")"


def _in_objects(field: str, leaf: str, neg: bool) -> str:
    """``leaf`` (negated: ``neg``) holding only where each index-like segment of ``field`` is a key of an object.
    Why: Milvus reads ``meta["a"]["0"]`` as the JSON pointer /a/0, where "0" indexes a list, so {"a.0": 6} matched
    {"a": [6]}; in the grammar "a.0" is key "0" inside object a (:func:`m3search.filters.matches`)."""
    segments = field.split(".")
    parents = [".".join(segments[:j]) for j in range(1, len(segments)) if _INDEX.fullmatch(segments[j])]
    if not parents:
        return leaf
    # (negated: a missing kind differs from "o", so the negation holds there, as for a missing field)
    op, join = ("!=", " or ") if neg else ("==", " and ")
    return "(" + join.join([*(f'{kinds_path(p)} {op} "o"' for p in parents), leaf]) + ")"


def to_milvus_expr(
    f: Filter | None, has_lists: Callable[[str], bool] = lambda field: False, *, allow_not: bool = False
) -> str:
    """Milvus boolean expression for a filter AST ("" for no filter).

    ``has_lists(field)`` says whether some stored document holds a list at ``field``;
    ``allow_not`` lets negations of such fields use Milvus's ``not`` (servers only).
    """
    if f is None:
        return ""
    return _ExprBuilder(has_lists, allow_not).build(f)


def kinds_path(field: str) -> str:
    """The expression of ``field``'s type code in the ``kinds`` JSON field (see :func:`metadata_kinds`)."""
    _check_field(field)
    return f"kinds[{_lit(field, 'field name')}]"
