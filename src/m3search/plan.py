"""Search modes as named presets, and the validated plan of one search call.

Why a separate module: the CLI, the HTTP server and :meth:`Collection.search` all take
the same ``mode`` / ``fusion`` / ``weights`` / ``k`` / ``candidates`` / ``filter``
arguments; validating them once here gives every front end the same errors.

Modes (the scenario table of BGE-M3's paper, as presets):

=================  ===============================================  ========================
mode               when                                             candidates
=================  ===============================================  ========================
``dense``          general semantic search, cross-lingual           dense top-k
``sparse``         keywords, product names, model numbers           sparse top-k
``colbert``        ColBERT MaxSim re-ranking                        union of dense and sparse
``dense+sparse``   semantic + keyword                               union of dense and sparse
``dense+colbert``  legal / precise clause matching                  union of dense and sparse
``all``            the default: all three                           union of dense and sparse
=================  ===============================================  ========================

Any ``+``-joined subset of ``dense``, ``sparse``, ``colbert`` is accepted (order does
not matter, so FlagEmbedding's ``"colbert+sparse+dense"`` works). Re-ranking modes
(all but ``dense`` and ``sparse``) take the union of the dense and sparse top-
``candidates`` lists and compute every score of every candidate exactly.

``weights`` is always the 3-tuple (dense, sparse, colbert); entries for modes not in
``mode`` are ignored.
"""

from __future__ import annotations

import math
import numbers
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from m3search.filters import Filter, parse_filter, python_value

__all__ = [
    "MODES",
    "PRESETS",
    "FUSIONS",
    "GROUPS",
    "DEFAULT_WEIGHTS",
    "DEFAULT_CANDIDATES",
    "MAX_K",
    "MAX_CANDIDATES",
    "LimitExceededError",
    "DeadlineExceeded",
    "DEFAULT_SEARCH_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "MAX_TIMEOUT",
    "check_timeout",
    "timeout_fault",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_QUEUE",
    "ENCODER_DTYPES",
    "check_device",
    "check_dtype",
    "deadline",
    "check_deadline",
    "SearchPlan",
    "parse_mode",
    "mode_name",
    "check_fusion",
    "check_api_key",
    "check_weights",
    "check_mode_total",
    "check_query",
    "check_queries",
    "check_group",
    "check_bool",
    "check_text",
    "check_texts",
    "repeated",
]

#: The three representations, in the order weights are given (engines name their vectors so).
MODES: tuple[str, str, str] = ("dense", "sparse", "colbert")

#: Named modes and what they are for (shown by the CLI).
PRESETS: dict[str, str] = {
    "dense": "general semantic search, cross-lingual",
    "sparse": "keywords, product names and model numbers",
    "colbert": "ColBERT MaxSim re-ranking of dense+sparse candidates",
    "dense+sparse": "semantic and keyword evidence together",
    "dense+colbert": "legal / precise clause matching",
    "all": "dense + sparse + ColBERT (the default)",
}

#: Fusion methods (:mod:`m3search.fusion`): BGE-M3's weighted sum, reciprocal rank, distribution-based.
FUSIONS: tuple[str, ...] = ("weighted", "rrf", "dbsf")

#: What a search returns: documents, each at its best window, or the best windows themselves (passages).
GROUPS: tuple[str, ...] = ("document", "passage")

#: BGE-M3's paper weights (dense, sparse, colbert); FlagEmbedding's ``compute_score`` defaults to (1, 1, 1).
DEFAULT_WEIGHTS = (0.4, 0.2, 0.4)

#: Candidates per first-stage list (dense top-C ∪ sparse top-C). Measured on the proxy
#: model (cranfield, time, xquad-r/en; <= 300 queries each; fp16 ColBERT storage),
#: recall@10 of `all` against an exhaustive oracle, mean (worst collection):
#: C=50 0.982 (0.962), C=100 0.996 (0.988), C=200 0.9986 (0.9957); nDCG@10 equals the
#: oracle's from C=50 on. 200 is the smallest tried that keeps recall >= 0.99 on every
#: collection (also the paper's choice); query time grows about linearly with C.
DEFAULT_CANDIDATES = 200

#: Seconds one HTTP search may take before it stops at its next stage (``serve --timeout``).
DEFAULT_SEARCH_TIMEOUT = 30.0
#: Seconds an HTTP request may wait for its encoding to start (``serve --request-timeout``; beyond it: 503).
DEFAULT_REQUEST_TIMEOUT = 60.0
#: The longest time limit, in seconds: ``threading.TIMEOUT_MAX`` (~292 years), the longest wait a request can make
#: (a longer or infinite one failed in the wait with an OverflowError).
MAX_TIMEOUT = threading.TIMEOUT_MAX
#: An HTTP server's limits where none is set (``serve --max-batch`` / ``--max-body-mb`` / ``--max-queue``, their
#: ``M3SEARCH_*`` variables): texts (or queries, documents, ids) per request, bytes of a request body, texts waiting
#: for the encoder; and the largest ``k`` one HTTP search may ask for (below :data:`MAX_K`). Here, not in the
#: server, so that the CLI's help and the client show them without loading it.
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_QUEUE = 2048
DEFAULT_SERVER_MAX_K = 1000

#: The encoder's dtypes by each name it takes (besides ``"auto"``, its own pick), with torch's name for it: the one
#: list of the encoder, the CLI's ``--dtype`` choices and the server's ``M3SEARCH_DTYPE``.
ENCODER_DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def check_dtype(dtype: Any) -> str:
    """``dtype``'s torch name (``"auto"`` kept), by any name in :data:`ENCODER_DTYPES`; ValueError naming them."""
    if dtype == "auto" or (isinstance(dtype, str) and dtype in ENCODER_DTYPES):
        return ENCODER_DTYPES.get(dtype, dtype)
    raise ValueError(f"dtype must be one of auto, {', '.join(ENCODER_DTYPES)}; not {dtype!r}")


#: The devices the encoder runs on, by name (torch names more: meta, mps, xla).
_DEVICE = re.compile(r"auto|(cpu|cuda)(:(0|[1-9]\d*))?")  # torch refuses "cuda:00"


def check_device(device: Any) -> str:
    """``device`` if the encoder can run on a device of that name, else ValueError naming the choices. Why here:
    ``--device`` / ``M3SEARCH_DEVICE`` are checked where they are set (a bad one was found only when the model
    loaded) without importing torch; whether this machine has that CUDA device is the encoder's to check."""
    if isinstance(device, str) and _DEVICE.fullmatch(device):
        return device
    raise ValueError(f"device {device!r} is not supported: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("m3search_deadline", default=None)


class DeadlineExceeded(TimeoutError):
    """A search ran past its time limit. Raised by :func:`check_deadline` at the next stage
    boundary (encoding, each engine request, scoring, fusion): the work ends there, not only
    the wait. One engine request is not interrupted (Qdrant Edge holds the interpreter for it)."""


@contextmanager
def deadline(seconds: float | None, *, since: float | None = None) -> Iterator[None]:
    """Searches run inside this block (this thread or context) stop ``seconds`` after ``since``
    (a ``time.monotonic()`` value; default: now)."""
    start = time.monotonic() if since is None else since
    token = _DEADLINE.set(None if seconds is None else (start + seconds, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline(stage: str) -> None:
    """Raise :class:`DeadlineExceeded` if the current :func:`deadline` has passed (else nothing)."""
    d = _DEADLINE.get()
    if d is not None and time.monotonic() > d[0]:
        raise DeadlineExceeded(f"search stopped before {stage}: it ran over its time limit of {d[1]:g} s")


#: Most hits one search may ask for (library, CLI and HTTP; a server may set a lower limit).
MAX_K = 10_000
#: Most candidates per first-stage list.
MAX_CANDIDATES = 100_000


class LimitExceededError(ValueError):
    """``k`` or ``candidates`` above its limit (HTTP answers 413, like any other size limit; ``M3SearchClient``
    raises this for a 413 too)."""


def parse_mode(mode: Any) -> tuple[str, ...]:
    """``"dense+colbert"`` -> ``("dense", "colbert")`` (canonical order); ValueError if unknown."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string such as 'all' or 'dense+sparse', not {type(mode).__name__}")
    name = mode.strip().lower()
    if name == "all":
        return MODES
    parts = [p.strip() for p in name.split("+")]
    bad = [p for p in parts if p not in MODES]
    twice = sorted({p for p in parts if parts.count(p) > 1})
    if twice and not bad:
        raise ValueError(f"mode {mode!r} names {', '.join(twice)} more than once: name each mode once")
    if bad or not parts:
        raise ValueError(
            f"unknown mode {mode!r}: use one of {', '.join(PRESETS)} (or a '+'-joined subset of dense, sparse, colbert)"
        )
    return tuple(m for m in MODES if m in parts)


def mode_name(modes: Sequence[str]) -> str:
    """The name a mode is stored and shown by: ``"all"`` for all three, else its modes ``+``-joined in the order
    given (:func:`parse_mode`'s canonical one), which :func:`parse_mode` reads back."""
    return "all" if tuple(modes) == MODES else "+".join(modes)


def timeout_fault(seconds: Any) -> str | None:
    """What makes ``seconds`` no time limit, or None: the one rule of the server's time limits and the batcher's
    (``Settings(request_timeout=1e12)`` passed the server's and was refused by the batcher, naming ``timeout``). A
    negative, zero or NaN one timed every request out before it could start (a request never starts at its
    submission), a longer or infinite one failed in the wait, a string in the sum; a bool is no number of seconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 < seconds <= MAX_TIMEOUT:
        return f"is not a number of seconds > 0 and at most {MAX_TIMEOUT:g}"
    return None


def check_timeout(name: str, seconds: Any) -> float:
    """``seconds`` as a float if it is a time limit (:func:`timeout_fault`), else ValueError naming ``name``."""
    if wrong := timeout_fault(seconds):
        raise ValueError(f"{name} {wrong}: {seconds!r}"[:200])
    return float(seconds)


def check_fusion(fusion: Any) -> str:
    """``fusion``'s name as stored and compared, lower-case: one of :data:`FUSIONS` in any case, as a mode's
    name is (``"RRF"`` was refused while ``mode="Dense"`` was taken); ValueError naming them otherwise."""
    if not isinstance(fusion, str) or fusion.lower() not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r} (choose from {', '.join(FUSIONS)})")
    return fusion.lower()


def check_api_key(key: Any) -> str:
    """``key`` as a key a server can require and a client send: ValueError unless it is printable ASCII and not
    blank (HTTP header values are bytes clients send as ASCII: a blank key was sent as ``Bearer  ``, another one
    could never be matched); TypeError for another type (``.strip`` of an int was an AttributeError)."""
    if not isinstance(key, str):
        raise TypeError(f"the API key must be a string, not {type(key).__name__}")
    if not key.strip():
        raise ValueError("the API key must not be empty")
    if not (key.isascii() and key.isprintable()):
        raise ValueError("the API key must be printable ASCII (clients send it in an HTTP header)")
    return key


def check_weights(weights: Any) -> tuple[float, float, float]:
    """Validate the (dense, sparse, colbert) weights: three finite, non-negative numbers, not all zero.

    All-zero weights are refused here (they fuse nothing, in any mode); whether the modes
    of one search get a positive total is :func:`check_mode_total`'s. NumPy's arrays and scalars count as the
    Python values they hold (weights computed with NumPy were refused as "must be a finite number").
    """
    if weights is None:
        return DEFAULT_WEIGHTS
    weights = python_value(weights)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be three numbers (dense, sparse, colbert), got {weights!r}"[:200])
    if len(weights) != 3:
        raise ValueError(
            f"weights must be three numbers (dense, sparse, colbert), got {len(weights)}: {list(weights)!r}"
        )
    out = []
    for name, w in zip(MODES, map(python_value, weights)):
        try:
            ok = not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w)
        except OverflowError:  # an int too large for a float
            ok = False
        if not ok:
            raise ValueError(f"weight for {name} must be a finite number, got {w!r}"[:200])
        if w < 0:
            raise ValueError(f"weight for {name} must not be negative, got {w!r}")
        out.append(float(w))
    if not any(out):
        raise ValueError(f"weights must not all be zero, got {list(weights)!r}")
    if not math.isfinite(sum(out)):  # fusion divides by the sum: inf would make every score 0
        raise ValueError(f"weights are relative and their sum must be a finite number: scale {out!r} down")
    return tuple(out)  # type: ignore[return-value]


def repeated(ids: Sequence[str]) -> list[str]:
    """The ids that occur more than once, in first-seen order (one pass: batches hold thousands)."""
    return [i for i, n in Counter(ids).items() if n > 1]


def check_mode_total(weights: tuple[float, float, float], mode: str, hint: str = "") -> None:
    """Refuse checked ``weights`` that give every mode of ``mode`` zero weight: their weighted mean is 0/0."""
    if sum(weights[MODES.index(m)] for m in parse_mode(mode)) <= 0:
        raise ValueError(f"weights {weights} give zero total weight to the modes of {mode!r}{hint}")


def check_query(query: Any) -> str:
    """A query is a non-blank string."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, not {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty")
    check_text(query, "query")
    return query


def check_queries(queries: Any) -> list[str]:
    """A list of queries (any sequence but a string: one query is ``search``'s), each a :func:`check_query`."""
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise TypeError("queries must be a list of strings (use search() for one)")
    return [check_query(q) for q in queries]


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool if it is a bool or NumPy's (a flag computed with NumPy; the Python one is what
    goes on: ``json.dumps`` refuses NumPy's), else TypeError: a string such as ``"no"`` would be true, and 0 / 1
    are refused too. The type is named in full: NumPy's types are called ``bool``, ``int`` too."""
    plain = python_value(value)
    if not isinstance(plain, bool):
        raise TypeError(f"{name} must be true or false (a Python bool), not {_type_name(value)}")
    return plain


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_group(group: Any, explain: Any) -> None:
    """``group`` is one of :data:`GROUPS`; ``explain`` is given for documents only."""
    if group not in GROUPS:
        raise ValueError(f"group must be {' or '.join(map(repr, GROUPS))}, got {group!r}")
    if group == "passage" and explain:
        raise ValueError("explain is given for documents only (group='document')")


def check_texts(texts: Any, *, unicode: bool = True) -> list[str]:
    """A string or an iterable of strings, as a non-empty list (encoder and collection alike).
    ``unicode=False``: the caller checks each text itself (a collection names the document's id).

    An empty list is an error, not a no-op: it almost always means the caller read the
    wrong field or file, and the encoder could not give it a shape anyway. The empty
    *string* is a valid text (a document without lexical weights).
    """
    if isinstance(texts, str):
        return [texts]
    if texts is None or isinstance(texts, (bytes, dict)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a string or a list of strings, not {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: pass at least one string")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(
            f"texts must all be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    for i, t in enumerate(texts if unicode else ()):  # a lone surrogate: the tokenizer's own error names no text
        check_text(t, f"texts[{i}]")
    return texts


def check_text(text: str, what: str) -> str:
    """``text`` if UTF-8 can encode it; a lone surrogate (JSON ``"\\ud800"``) is a ValueError naming ``what``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what}: not valid Unicode text (lone surrogate {text[exc.start]!r} at character {exc.start})"
        ) from None
    return text


def check_int(name: str, v: Any, minimum: int = 1) -> int:
    """``v`` as an ``int`` when it is an integer (NumPy's too; not a bool, not a float) of at least
    ``minimum``, else ValueError naming ``name``: the one check for every count and size argument."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {_shown(v)}"[:200])
    return int(v)


def _shown(v: Any) -> str:
    """``v`` as a refused number shows it: a string says it is one ("got '30'" read as if 30 were refused)."""
    return f"the string {v!r} (a number is needed, not text)" if isinstance(v, str) else repr(v)


#: The largest number an engine option may be, an int32's: every client takes it (gRPC's message size, a deadline's
#: seconds). Beyond, ``hnsw_ef=2**64`` failed at the first search (OverflowError) and a Milvus ``connect_timeout`` of
#: 1e30 at connect ("timestamp out of range"), a Qdrant ``timeout`` of 10**30 as "cannot reach Qdrant".
OPTION_MOST = 2**31 - 1


def check_options(options: dict[str, Any], rules: dict[str, dict[str, bool]]) -> dict[str, Any]:
    """``options`` with each one that ``rules`` names checked, else ValueError (TypeError for a switch or a text)
    naming it: with ``bool`` a Python bool (:func:`check_bool`: ``bool("false")`` is true); with ``text`` a string
    (a secret: a number was the client's error, after connecting); otherwise a number above 0 (at least 0 with
    ``zero``) and at most :data:`OPTION_MOST`, an integer with ``integer`` (:func:`check_int`), else a finite int or
    float; never a bool; None too with ``none`` (where None means something), else refused: None is "no limit"
    to some clients and "the default" to others, so the default is had by leaving the option out. NumPy scalars
    count as the Python values they hold (a config read with NumPy) and reach the clients as those. The one
    check of the engines' options (their ``_OPTION_RULES``): ``int()`` cut a Qdrant timeout of 2.5 to 2, 0, -1 or
    nan went on to the client, and ``engine_options={"https": "false"}`` turned https on."""
    out = dict(options)
    for key in sorted(rules.keys() & out.keys()):
        v, rule, name = out[key], rules[key], f"engine option {key!r}"
        least = 0 if rule.get("zero") else 1
        out[key] = v = python_value(v)
        if v is None:
            if rule.get("none"):
                continue
            error = TypeError if rule.get("bool") or rule.get("text") else ValueError
            raise error(f"{name} may not be None: leave it out for its default")
        if rule.get("bool"):
            out[key] = check_bool(name, v)
            continue
        if rule.get("text"):
            if not isinstance(v, str):
                raise TypeError(f"{name} must be a string, not {_type_name(v)}")
            continue
        if rule.get("integer"):
            out[key] = check_limit(name, check_int(name, v, least), OPTION_MOST)
            continue
        try:
            ok = (
                isinstance(v, numbers.Real)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and (v > 0 if least else v >= 0)
            )
        except OverflowError:  # an int too large for a float
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a finite number {'> 0' if least else '>= 0'}, got {_shown(v)}"[:200])
        out[key] = check_limit(name, float(v), OPTION_MOST)
    return out


def _positive_int(name: str, v: Any, limit: int) -> int:
    return check_limit(name, check_int(name, v), limit)


def check_limit(name: str, v: int, limit: int) -> int:
    """``v`` if it is at most ``limit``, else :class:`LimitExceededError` (the message stays short)."""
    if v > limit:
        shown = str(v) if v < 10**30 else "a number with more than 30 digits"
        raise LimitExceededError(f"{name}={shown} exceeds the limit of {limit}")
    return v


@dataclass(frozen=True)
class SearchPlan:
    """A validated search request (everything but the query text)."""

    modes: tuple[str, ...]
    fusion: str
    weights: tuple[float, float, float]
    k: int
    candidates: int
    filter: Filter | None
    explain: bool = False

    @classmethod
    def build(
        cls,
        *,
        k: Any = 10,
        mode: Any = "all",
        fusion: Any = "weighted",
        weights: Any = None,
        candidates: Any = None,
        filter: Any = None,
        explain: bool = False,
        default_candidates: int = DEFAULT_CANDIDATES,
        default_weights: Sequence[float] = DEFAULT_WEIGHTS,
    ) -> SearchPlan:
        modes = parse_mode(mode)
        explain = check_bool("explain", explain)
        fusion = check_fusion(fusion)
        w = check_weights(default_weights if weights is None else weights)
        check_mode_total(w, mode)
        k = _positive_int("k", k, MAX_K)
        c = default_candidates if candidates is None else _positive_int("candidates", candidates, MAX_CANDIDATES)
        return cls(modes, fusion, w, k, max(c, k), parse_filter(filter), explain)

    @property
    def reranks(self) -> bool:
        """True when candidates come from the union of dense and sparse lists."""
        return self.modes not in (("dense",), ("sparse",))

    def weight_map(self) -> dict[str, float]:
        return dict(zip(MODES, self.weights))
