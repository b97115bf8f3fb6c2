"""A local stand-in for ``M3Encoder.encode_windows`` (issue 11 part B builds the real one).

Installed by :func:`install` only when the encoder lacks the method, so after the merge
the tests run against the real encoder. Same interface: ``encode_windows(texts, *, window,
stride, max_windows, max_length) -> WindowedEmbeddings`` with one row per window.

How: tokenize each text without truncation (with character offsets); a text whose content
tokens fit ``window - specials`` is one window encoded exactly as ``encode`` encodes it;
a longer one is cut into content-token windows starting every ``stride`` tokens, each
encoded from its character span (the text between its first and last token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class WindowedEmbeddings:
    embeddings: object  # M3Embeddings, one row per window
    doc: np.ndarray  # int64 (n_windows,)
    spans: np.ndarray  # int64 (n_windows, 2)
    cut: int


def encode_windows(self, texts, *, window: int, stride: int, max_windows: int | None = None, max_length=None):
    texts = [texts] if isinstance(texts, str) else list(texts)
    with self._tok_lock:
        self.tokenizer.no_truncation()
        encs = self.tokenizer.encode_batch(texts)
    pieces, doc, spans, cut = [], [], [], 0
    for i, (text, e) in enumerate(zip(texts, encs)):
        content = [o for o, special in zip(e.offsets, e.special_tokens_mask) if not special]
        room = window - (len(e.ids) - len(content))
        if len(content) <= room:
            starts = [0]
        else:
            starts = list(range(0, max(len(content) - room, 0) + stride, stride))
            starts = [s for s in starts if s < len(content)]
            while len(starts) > 1 and starts[-2] + room >= len(content):
                starts.pop()  # the previous window already reaches the end
        if max_windows is not None and len(starts) > max_windows:
            starts, cut = starts[:max_windows], cut + 1
        for s in starts:
            if len(starts) == 1 and s == 0 and len(content) <= room:
                a, b = 0, len(text)
                pieces.append(text)
            else:
                last = min(s + room, len(content)) - 1
                a, b = content[s][0], content[last][1]
                pieces.append(text[a:b])
            doc.append(i)
            spans.append((a, b))
    emb = self.encode(pieces, max_length=window, warn_truncation=False)
    return WindowedEmbeddings(
        emb, np.asarray(doc, dtype=np.int64), np.asarray(spans, dtype=np.int64).reshape(-1, 2), cut
    )


def install() -> None:
    """Give M3Encoder the stand-in unless it already has the real method."""
    from m3search.encoder import M3Encoder

    if not hasattr(M3Encoder, "encode_windows"):
        M3Encoder.encode_windows = encode_windows
