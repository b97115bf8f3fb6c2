"""Text -> token windows: how a text longer than the model's reach is split.

A text is tokenised once, without specials, into ``n`` content tokens. A window holds at
most ``window`` tokens *including* the model's specials (``<s> ... </s>`` for bge-m3), so
``span = window - n_specials`` content tokens. Window ``k`` covers content tokens
``[k * stride, min(k * stride + span, n))``; the first window whose end reaches ``n`` is
the last one, so consecutive windows share ``overlap = span - stride`` content tokens
(the last one may be shorter and share more). A text of at most ``span`` content tokens,
the empty text included, is exactly one window: the same ids ``encode()`` feeds the model.

Everything here is whole-array maths over per-text lengths; no per-token Python.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .plan import check_int

__all__ = ["WindowPlan", "check_windows", "plan_windows"]


class WindowPlan(NamedTuple):
    """Windows of a batch of texts, in text order (one row per window).

    ``doc``: index of the text; ``start``/``length``: the window's content tokens
    ``[start, start + length)`` in its text (specials not counted); ``cut``: texts whose
    windows were capped by ``max_windows``.
    """

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    cut: int


def check_windows(window, stride, max_windows=None, *, max_length: int, n_specials: int = 2) -> None:
    """Raise ``ValueError`` naming the bad value unless the arguments give gap-free windows.

    ``window`` counts the model's ``n_specials`` specials too and may not exceed the model's
    ``max_length`` (its usable positions); ``stride`` is in content tokens, at least 1 and at
    most ``window - n_specials`` (a larger stride would skip text between windows).
    """
    for name, value in (("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, not {value!r}")
    if max_windows is not None:
        check_int("max_windows", max_windows)
    if window < n_specials + 1:
        raise ValueError(f"window={window} leaves no room for text: it counts the model's {n_specials} special tokens")
    if window > max_length:
        raise ValueError(f"window={window} is larger than the model's {max_length} positions")
    if stride < 1:
        raise ValueError(f"stride={stride} must be at least 1 token")
    if stride > window - n_specials:
        raise ValueError(
            f"stride={stride} is larger than window - {n_specials} specials = {window - n_specials} content tokens: "
            "text between windows would be skipped (overlap = window - specials - stride must be >= 0)"
        )


def plan_windows(n_content: np.ndarray, span: int, stride: int, max_windows: int | None = None) -> WindowPlan:
    """Windows of texts with ``n_content`` content tokens each, ``span`` content tokens per
    window, starts ``stride`` apart, at most ``max_windows`` per text (arguments checked by
    :func:`check_windows`)."""
    n_content = np.asarray(n_content, dtype=np.int64)
    count = 1 + -(-np.maximum(n_content - span, 0) // stride)  # ceil division
    cut = 0
    if max_windows is not None:
        over = count > max_windows
        cut = int(over.sum())
        count = np.where(over, max_windows, count)
    doc = np.repeat(np.arange(len(n_content), dtype=np.int64), count)
    first = np.cumsum(count) - count  # first window row of each text
    k = np.arange(len(doc), dtype=np.int64) - np.repeat(first, count)
    start = k * stride
    length = np.minimum(start + span, n_content[doc]) - start
    return WindowPlan(doc, start, length, cut)
