"""BGE-M3's three representations from one forward pass.

:class:`M3Encoder` loads a checkpoint in BAAI/bge-m3's layout (``config.json``, weights,
``colbert_linear.pt``, ``sparse_linear.pt``, ``tokenizer.json``) and turns texts into an
:class:`M3Embeddings`: dense vectors, lexical weights as one CSR matrix, and every
ColBERT token vector in one array with row offsets.

Where it departs from FlagEmbedding's ``BGEM3FlagModel`` on purpose:

* tokenization runs the checkpoint's own ``tokenizer.json`` through the ``tokenizers``
  library, whatever transformers rebuilds;
* batches are formed by a token budget over length-sorted inputs, not a fixed count;
* the default ``max_length`` is the model's position limit (8192 for bge-m3), and every
  truncation is reported with a :class:`TruncationWarning`;
* on CPUs with AMX / AVX512-BF16 the forward pass runs in bfloat16 (heads in float32);
  ``dtype="float32"`` gives results equal to FlagEmbedding's within float rounding;
* pooling is whole-batch tensor maths: no Python loop per token;
* a text longer than the model reads can be encoded whole as overlapping token windows
  (:meth:`M3Encoder.encode_windows`, planned in :mod:`m3search.windows`), each with the
  model's own specials, instead of being cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .fusion import weighted
from .plan import (
    DEFAULT_WEIGHTS,
    MODES,
    check_device,
    check_dtype,
    check_int,
    check_mode_total,
    check_texts,
    check_weights,
)
from .scoring import pair_colbert_scores, pair_dense_scores, pair_lexical_scores
from .windows import check_windows, plan_windows

__all__ = [
    "M3Encoder",
    "M3Embeddings",
    "WindowedEmbeddings",
    "TruncationWarning",
    "ModelLoadError",
    "DEFAULT_WEIGHTS",
]

_HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TruncationWarning(UserWarning):
    """Some inputs were longer than ``max_length`` tokens (or ``max_windows`` windows) and were cut.

    Carries the numbers too (``count`` cut of ``total``, at ``max_length``), so a caller
    that encodes in chunks (the CLI indexing a file) can add them up into one report.
    """

    def __init__(
        self,
        message: str,
        count: int = 0,
        total: int = 0,
        max_length: int = 0,
        unit: str = "tokens",
        setting: str | None = None,
    ) -> None:
        super().__init__(message)
        self.count, self.total, self.max_length = count, total, max_length
        #: "tokens": cut at ``max_length`` tokens; "windows": capped at ``max_length`` windows (``max_windows``).
        self.unit = unit
        #: The setting whose value cut them (a collection of one window cuts at ``window`` when it is shorter).
        self.setting = setting or ("max_length" if unit == "tokens" else "max_windows")


class DeviceError(ValueError):
    """The device asked for does not exist here (a setting of this process, not of the model)."""


class ModelLoadError(OSError):
    """The model could not be found, downloaded, or is not in BGE-M3's layout."""


class M3Embeddings:
    """The three representations of ``n`` texts, as plain arrays.

    * ``dense``: float32 ``(n, hidden)``, L2-normalized [CLS] vectors, or None;
    * ``sparse``: CSR ``(n, vocab_size)`` float32 lexical weights (special ids and zeros
      dropped), or None;
    * ``colbert``: float32 ``(total_tokens, hidden)`` normalized token vectors of every
      position after [CLS] (``</s>`` included, as FlagEmbedding does), rows of text ``i``
      at ``colbert[colbert_offsets[i]:colbert_offsets[i + 1]]``, or None;
    * ``n_tokens``: tokens per text including ``<s>`` and ``</s>``;
    * ``truncated``: how many texts were cut at ``max_length``.
    """

    __slots__ = ("dense", "sparse", "colbert", "colbert_offsets", "n_tokens", "truncated", "_id_to_token")

    def __init__(
        self,
        dense: np.ndarray | None,
        sparse: sp.csr_matrix | None,
        colbert: np.ndarray | None,
        colbert_offsets: np.ndarray | None,
        n_tokens: np.ndarray,
        truncated: int = 0,
        id_to_token=None,
    ) -> None:
        self.dense = dense
        self.sparse = sparse
        self.colbert = colbert
        self.colbert_offsets = colbert_offsets
        self.n_tokens = n_tokens
        self.truncated = truncated
        self._id_to_token = id_to_token

    def __len__(self) -> int:
        return len(self.n_tokens)

    def __repr__(self) -> str:
        parts = [f"n={len(self)}"]
        if self.dense is not None:
            parts.append(f"dense={self.dense.shape}")
        if self.sparse is not None:
            parts.append(f"sparse nnz={self.sparse.nnz}")
        if self.colbert is not None:
            parts.append(f"colbert={self.colbert.shape}")
        return f"M3Embeddings({', '.join(parts)})"

    def __getitem__(self, key) -> M3Embeddings:
        """Select texts by int, slice, or index array; returns a new M3Embeddings."""
        idx = np.arange(len(self))[key]
        idx = np.atleast_1d(idx).astype(np.int64)
        if len(idx) and (np.diff(idx) == 1).all():
            return self._rows(int(idx[0]), int(idx[-1]) + 1)  # one row or a run: plain slices
        colbert = offsets = None
        if self.colbert is not None:
            starts, ends = self.colbert_offsets[idx], self.colbert_offsets[idx + 1]
            lengths = ends - starts
            offsets = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
            colbert = self.colbert[gather]
        return M3Embeddings(
            dense=None if self.dense is None else self.dense[idx],
            sparse=None if self.sparse is None else self.sparse[idx],
            colbert=colbert,
            colbert_offsets=offsets,
            n_tokens=self.n_tokens[idx],
            truncated=0,
            id_to_token=self._id_to_token,
        )

    def _rows(self, a: int, b: int) -> M3Embeddings:
        """Rows a..b-1 by slicing (no copies of the fancy-indexing kind; scipy's row indexing
        costs ~0.3 ms, which a per-query search pays)."""
        sparse = None
        if self.sparse is not None:
            s, (p, q) = self.sparse, (self.sparse.indptr[a], self.sparse.indptr[b])
            sparse = sp.csr_matrix((s.data[p:q], s.indices[p:q], s.indptr[a : b + 1] - p), shape=(b - a, s.shape[1]))
        colbert = offsets = None
        if self.colbert is not None:
            o = self.colbert_offsets
            colbert, offsets = self.colbert[o[a] : o[b]], o[a : b + 1] - o[a]
        return M3Embeddings(
            dense=None if self.dense is None else self.dense[a:b],
            sparse=sparse,
            colbert=colbert,
            colbert_offsets=offsets,
            n_tokens=self.n_tokens[a:b],
            truncated=0,
            id_to_token=self._id_to_token,
        )

    @property
    def lexical_weights(self) -> list[dict[str, float]]:
        """FlagEmbedding's view: one ``{str(token_id): weight}`` dict per text."""
        if self.sparse is None:
            raise ValueError("sparse output was not requested (encode(..., sparse=True))")
        csr = self.sparse
        return [
            dict(zip(map(str, csr.indices[a:b].tolist()), csr.data[a:b].tolist()))
            for a, b in zip(csr.indptr[:-1], csr.indptr[1:])
        ]

    @property
    def colbert_vecs(self) -> list[np.ndarray]:
        """FlagEmbedding's view: one ``(tokens, hidden)`` array per text (views, no copy)."""
        if self.colbert is None:
            raise ValueError("colbert output was not requested (encode(..., colbert=True))")
        o = self.colbert_offsets.tolist()
        return [self.colbert[a:b] for a, b in zip(o[:-1], o[1:])]  # np.split of no texts gave one array


@dataclass(frozen=True)
class WindowedEmbeddings:
    """Embeddings of texts split into token windows (:meth:`M3Encoder.encode_windows`).

    * ``embeddings``: one row per window, all windows of all texts, in text order;
    * ``doc``: int64 ``(n_windows,)`` index of the text each window belongs to;
    * ``spans``: int64 ``(n_windows, 2)`` character ``[start, end)`` of each window in its
      text, from the tokenizer's offsets (first token's start to last token's end;
      ``[0, 0)`` for a text without tokens);
    * ``cut``: how many texts lost windows to ``max_windows``;
    * ``index``: int64 ``(n_windows,)`` each window's number within its text, and ``count``:
      int64 ``(n_texts,)`` how many windows each text has in all, so a consumer of
      :meth:`M3Encoder.iter_windows` knows where a text's windows begin and end across pieces.
    """

    embeddings: M3Embeddings
    doc: np.ndarray
    spans: np.ndarray
    cut: int
    index: np.ndarray | None = None
    count: np.ndarray | None = None


def _cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16 makes bf16 matmuls several times faster than fp32 on CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def stderr_is_terminal() -> bool:
    """Whether progress bars are shown by default: stderr is a terminal. Why a function: a process started without
    one (pythonw, a daemon with fd 2 closed) has ``sys.stderr`` None, and ``isatty()`` on it failed every encode."""
    return sys.stderr is not None and sys.stderr.isatty()


def resolve_device_dtype(device: str = "auto", dtype: str = "auto"):
    """Pick ``(torch.device, torch.dtype)``: CUDA -> fp16; CPU with bf16 units -> bf16; else fp32."""
    import torch

    try:
        device = check_device(device if isinstance(device, str) else str(device))  # a torch.device by its name
    except ValueError as exc:
        raise DeviceError(str(exc)) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: this torch has no CUDA device (use 'cpu' or 'auto')")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():  # else torch's "invalid device ordinal"
        raise DeviceError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), from cuda:0"
        )
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif (name := check_dtype(dtype)) != "auto":
        dt = getattr(torch, name)
    elif dev.type == "cuda":
        dt = torch.float16
    elif dev.type == "cpu" and _cpu_has_bf16():
        dt = torch.bfloat16
    else:
        dt = torch.float32
    return dev, dt


def _resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a Hugging Face Hub id, downloaded (with a progress bar)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            (f"model {name!r} is not a folder" if path.exists() else f"model folder {name!r} does not exist")
            + " (expected a local folder in BAAI/bge-m3's layout or a Hugging Face Hub id such as 'BAAI/bge-m3')"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                name, allow_patterns=list(_TOKENIZER_FILES) + list(_HEAD_FILES) + ["config.json", "model.safetensors"]
            )
        )
        if not (folder / "model.safetensors").is_file():
            folder = Path(snapshot_download(name, allow_patterns=["pytorch_model.bin"]))
        return folder
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        reason = " ".join(str(exc).split())  # hub errors span several lines
        raise ModelLoadError(
            f"could not download model {name!r} from the Hugging Face Hub ({type(exc).__name__}: {reason[:300]}). "
            "Offline? Use a local folder in BAAI/bge-m3's layout: set M3SEARCH_MODEL=/path/to/bge-m3 "
            "(or pass --model /path/to/bge-m3 to the CLI, MODEL=/path/to/bge-m3 to make, "
            "M3Encoder.from_pretrained('/path/to/bge-m3') in Python)"
        ) from None


def _check_checkpoint(folder: Path) -> Path:
    """``folder`` if it has BAAI/bge-m3's files, else ModelLoadError naming the missing ones (not the
    OSError of the first file read: a collection's ``--model`` check reads them before any load)."""
    missing = [f for f in ("config.json",) + _HEAD_FILES + ("tokenizer.json",) if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    if missing:
        raise ModelLoadError(
            f"{folder} is not a BGE-M3 checkpoint: missing {', '.join(missing)}. "
            "m3search needs BAAI/bge-m3's layout (config.json, weights, colbert_linear.pt, sparse_linear.pt, "
            "tokenizer.json); it never falls back to random heads."
        )
    return folder


def _read_head(path: Path) -> dict:
    """A head's state dict. A file torch cannot read is a ModelLoadError naming it: torch's own message
    ("PytorchStreamReader failed reading zip archive ...") names no file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not read {path} (truncated or not a torch state dict): {exc}") from None


def model_identity(folder: str | os.PathLike) -> str:
    """sha256 over config.json, both heads' tensors and tokenizer.json (not the path)."""
    import torch

    folder = _check_checkpoint(Path(folder))
    h = hashlib.sha256()
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:  # bad JSON or not UTF-8: json's message names no file
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name in _HEAD_FILES:
        state = _read_head(folder / name)
        for key in sorted(state):
            h.update(key.encode())
            h.update(state[key].detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update((folder / "tokenizer.json").read_bytes())
    return h.hexdigest()


#: :func:`weights_fingerprint`'s sample: this many bytes at each end of every tensor of a model.safetensors (its
#: header gives where each lies), or of each of ``_SAMPLE_CHUNKS + 1`` evenly spaced chunks of another weights file.
_SAMPLE_BYTES = 1 << 12
_SAMPLE_CHUNKS = 1024
#: The largest safetensors header read (the safetensors library's own limit).
_MAX_HEADER = 100 << 20


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of the transformer weights file transformers loads (model.safetensors before pytorch_model.bin):
    its name, size and a bounded sample, where hashing all of bge-m3's 2.3 GB costs ~1 s a GB (the proxy's 87 MiB,
    page cache warm: 62x the sample's time, ``benchmarks/check_cost.py``). In a model.safetensors the sample is its
    header (every tensor's name, dtype, shape and place) and the first and last
    4 KiB of every tensor (~3 MiB for bge-m3's ~390 tensors), so a fine-tune that changed any one tensor, a LoRA
    merged into a few matrices included, is seen; in another file, 1,025 evenly spaced chunks of 4 KiB. Why:
    :func:`model_identity` leaves the backbone out, so a backbone-only fine-tune made elsewhere passed for its
    base model (eval's index cache, collection manifests). Not the path nor the mtime: a copied or re-downloaded
    model is the same model; the same weights in the other file format are not (a tensor changed only between its
    sampled ends passes too). :class:`ModelLoadError` names a file that cannot be read or whose header is damaged."""
    folder = _check_checkpoint(Path(folder))
    path = next(folder / f for f in _WEIGHT_FILES if (folder / f).is_file())
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if path.suffix == ".safetensors":
                places = _safetensors_places(f, size, path)
            else:
                step = max(size - _SAMPLE_BYTES, 0) / _SAMPLE_CHUNKS
                places = [(int(i * step), _SAMPLE_BYTES) for i in range(_SAMPLE_CHUNKS + 1)]
            h = hashlib.sha256(f"{path.name}:{size}:".encode())
            for start, n in places:
                f.seek(start)
                h.update(f.read(n))
    except OSError as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    return h.hexdigest()


def _safetensors_places(f: Any, size: int, path: Path) -> list[tuple[int, int]]:
    """(offset, bytes) to hash in an open model.safetensors: its header, then both ends of each tensor's data."""
    n = int.from_bytes(f.read(8), "little")
    damaged = ModelLoadError(f"{path} is not a readable safetensors file (its header is damaged or cut short)")
    if not 0 < n <= min(size - 8, _MAX_HEADER):
        raise damaged
    places = [(0, 8 + n)]
    try:
        tensors = [t for k, t in json.loads(f.read(n)).items() if k != "__metadata__"]
        for a, b in sorted((int(t["data_offsets"][0]), int(t["data_offsets"][1])) for t in tensors):
            if not 0 <= a <= b <= size - 8 - n:
                raise ValueError(a, b)
            tail = max(8 + n + a, 8 + n + b - _SAMPLE_BYTES)
            places += [(8 + n + a, min(_SAMPLE_BYTES, b - a)), (tail, 8 + n + b - tail)]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError):
        raise damaged from None
    return places


#: What one more forward pass costs, in padded tokens (the batch planner's exchange rate):
#: proxy model, bf16, 2 cores: a query alone 27 ms of CPU vs 9.8 ms in a batch of 32 (~17 ms
#: a pass), one padded token ~0.29 ms (passages of ~190 tokens batched: 55 ms each).
FORWARD_TOKENS = 64

#: Every batch is padded to a multiple of this many tokens (capped at ``max_length``). Why: on
#: CPUs torch's bf16 matmuls (oneDNN) build and keep kernels for each new input shape, so a
#: server that meets every width from 1 to ``max_length`` grows without end (proxy model,
#: bf16, 600 batches of 1-16 queries: resident memory 331 -> 742 MB and still growing; padded
#: to multiples of 16: 443 MB, flat). Masked positions change no output (fp32: within 5e-7;
#: bf16: within its rounding, as a different batch would); AMX computes 16-row tiles anyway.
PAD_MULTIPLE = 16

#: The least ``max_length`` (``encode``, ``tokenize``, the batcher): a text's two specials; below it tokenizers
#: cuts nothing (0 and 1 read as no limit) or fails (-1, OverflowError).
MIN_MAX_LENGTH = 2


class M3Encoder:
    """BGE-M3 encoder: dense, lexical and ColBERT outputs from one forward pass.

    Build with :meth:`from_pretrained`. ``encode`` does not change the model's state,
    so one encoder can serve several threads (tokenization is serialized by a lock).
    """

    def __init__(
        self,
        model,
        colbert_linear,
        sparse_linear,
        tokenizer,
        *,
        folder: Path,
        name_or_path: str,
        device,
        dtype,
        token_budget: int | None = None,
    ) -> None:
        self.model = model
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear
        self.tokenizer = tokenizer
        self.folder = folder
        self.name_or_path = name_or_path
        self.device = device
        self.dtype = dtype
        cfg = model.config
        self.hidden_size: int = int(cfg.hidden_size)
        self.vocab_size: int = int(cfg.vocab_size)
        # XLM-R positions start after the padding index, so 8194 positions hold 8192 tokens.
        self.max_length: int = int(cfg.max_position_embeddings) - int(cfg.pad_token_id) - 1
        self.colbert_dim: int = int(colbert_linear.out_features)
        self.pad_id: int = int(cfg.pad_token_id)
        self.special_ids = np.array(
            sorted({self._token_id(t) for t in ("<s>", "</s>", "<pad>", "<unk>")} - {None}), dtype=np.int64
        )
        default_budget = 32768 if device.type == "cuda" else 8192
        self.token_budget = default_budget if token_budget is None else check_int("token_budget", token_budget)
        self._prefix, self._suffix = _template_specials(tokenizer)
        self._tok_lock = threading.Lock()
        self._identity: str | None = None
        self._weights_fingerprint: str | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str = "auto",
        dtype: str = "auto",
        *,
        token_budget: int | None = None,
    ) -> M3Encoder:
        """Load a BGE-M3 checkpoint from a local folder or a Hugging Face Hub id.

        ``dtype="auto"`` picks float16 on CUDA, bfloat16 on CPUs with AMX/AVX512-BF16,
        else float32. ``token_budget`` caps padded tokens per forward batch.
        """
        import torch
        import transformers
        from tokenizers import Tokenizer
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        folder = _check_checkpoint(_resolve_folder(name_or_path))
        dev, dt = resolve_device_dtype(device, dtype)
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            # Load straight into the target dtype: no transient fp32 copy of a bf16/fp16 model.
            dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            model, info = AutoModel.from_pretrained(
                str(folder), add_pooling_layer=False, output_loading_info=True, **{dtype_kw: dt}
            )
        except Exception as exc:
            raise ModelLoadError(f"could not load the transformer weights in {folder}: {exc}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if info["missing_keys"]:  # transformers fills them with random values (its warning is silenced above)
            missing = sorted(info["missing_keys"])
            weights = next(folder / f for f in _WEIGHT_FILES if (folder / f).is_file())
            raise ModelLoadError(
                f"{weights} lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): they would be random, and so every vector"
            )
        model = model.to(device=dev, dtype=dt).eval()

        hidden = int(model.config.hidden_size)
        heads = []
        # The sparse head gives one weight per token: checking it also catches the two files swapped.
        for name, outputs in (("colbert_linear.pt", None), ("sparse_linear.pt", 1)):
            state = _read_head(folder / name)
            shape = tuple(getattr(state.get("weight") if isinstance(state, dict) else None, "shape", ()))
            if len(shape) != 2 or shape[1] != hidden or outputs not in (None, shape[0]):
                swapped = outputs and shape[1:] == (hidden,)
                raise ModelLoadError(
                    f"{folder / name} is not a Linear({hidden}, {outputs or 'n'}) state dict (weight shape {shape})"
                    + (": are colbert_linear.pt and sparse_linear.pt swapped?" if swapped else "")
                )
            layer = torch.nn.Linear(hidden, shape[0], bias="bias" in state)
            layer.load_state_dict(state)
            heads.append(layer.to(dev).eval())  # heads stay float32: cheap, and keeps weights exact
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers' own message ("EOF while parsing ...") names no file
            raise ModelLoadError(f"could not read {folder / 'tokenizer.json'} (not a tokenizers file): {exc}") from None
        vocab = int(model.config.vocab_size)
        if tokenizer.get_vocab_size() > vocab:  # its later ids would index past the embeddings, deep in torch
            raise ModelLoadError(
                f"{folder / 'tokenizer.json'} has {tokenizer.get_vocab_size()} tokens, more than the model's "
                f"vocab_size {vocab} (config.json): the tokenizer is another model's"
            )
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(
            model,
            heads[0],
            heads[1],
            tokenizer,
            folder=folder,
            name_or_path=str(name_or_path),
            device=dev,
            dtype=dt,
            token_budget=token_budget,
        )

    def _token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def identity(self) -> str:
        """Stable model identity (hash of config, heads and tokenizer.json) for manifests."""
        if self._identity is None:
            self._identity = model_identity(self.folder)
        return self._identity

    @property
    def weights_fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the transformer weights (what :attr:`identity` leaves out), computed once."""
        if self._weights_fingerprint is None:
            self._weights_fingerprint = weights_fingerprint(self.folder)
        return self._weights_fingerprint

    def __repr__(self) -> str:
        return (
            f"M3Encoder({self.name_or_path!r}, device={self.device.type}, dtype={str(self.dtype).replace('torch.', '')}, "
            f"hidden={self.hidden_size}, max_length={self.max_length})"
        )

    # ------------------------------------------------------------ tokenization
    def tokenize(self, texts: str | Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
        """Token ids of each text (specials included), cut at ``max_length``; and how many were cut.
        A single string is one text, as in :meth:`encode` (it was split into characters). ``max_length`` is
        checked as :meth:`encode`'s (0 and 1 cut nothing, -1 failed in tokenizers) but not capped at the model's."""
        texts = check_texts(texts, unicode=False)
        return self._token_ids(texts, check_int("max_length", max_length, MIN_MAX_LENGTH))

    def _token_ids(self, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
        """:meth:`tokenize` of texts and ``max_length`` already checked: :meth:`encode` checks them itself (also
        each text's Unicode), so checking them again here was a second pass over the same list."""
        with self._tok_lock:
            self.tokenizer.enable_truncation(max_length)
            try:
                encodings = self.tokenizer.encode_batch(texts)
            finally:
                self.tokenizer.no_truncation()
        truncated = sum(1 for e in encodings if e.overflowing)
        return [e.ids for e in encodings], truncated

    def padded_width(self, longest):
        """The width a batch whose longest row has ``longest`` tokens is padded to (:data:`PAD_MULTIPLE`)."""
        return np.minimum(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, np.maximum(longest, self.max_length))

    def plan_batches(self, lengths: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
        """Length-sorted batches whose padded size stays within the token budget, cut where
        padding would cost more than another forward pass.

        Why not just fill each batch to the budget: a batch is padded to its longest text, so
        a batch of mixed passages (cranfield: 50-480 tokens) computes ~2x its real tokens, and
        measured on the proxy model 16 such passages in one batch cost 144 ms CPU each against
        72 ms one by one. The cut points minimise (padded tokens + ``FORWARD_TOKENS`` per
        batch) by dynamic programming over the sorted lengths (exact, one vectorised step
        per text). Longest first, so the first batch shows the peak memory at once.
        ``batch_size`` additionally caps the number of texts per batch.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        n = len(order)
        if n == 0:
            return []
        width = self.padded_width(np.maximum(lengths[order], 1))
        cap = np.minimum(np.maximum(self.token_budget // width, 1), batch_size or n)
        best = np.full(n + 1, np.inf)  # best[j]: least cost of batching the first j texts
        best[0] = 0.0
        cut = np.zeros(n + 1, np.int64)  # cut[j]: where the last batch of that plan starts
        for i in range(n):  # batches [i, i + m): padded to width[i], the longest of them
            m = int(min(cap[i], n - i))
            cost = best[i] + FORWARD_TOKENS + width[i] * np.arange(1, m + 1)
            better = cost < best[i + 1 : i + m + 1]
            best[i + 1 : i + m + 1][better] = cost[better]
            cut[i + 1 : i + m + 1][better] = i
        ends = [n]
        while ends[-1] > 0:
            ends.append(int(cut[ends[-1]]))
        ends.reverse()
        return [order[a:b] for a, b in zip(ends[:-1], ends[1:])]

    # ---------------------------------------------------------------- encoding
    def encode(
        self,
        texts: str | Iterable[str],
        *,
        dense: bool = True,
        sparse: bool = True,
        colbert: bool = True,
        max_length: int | None = 8192,
        batch_size: int | None = None,
        show_progress: bool = False,
        warn_truncation: bool = True,
    ) -> M3Embeddings:
        """Encode texts into the requested representations (a single string = a list of one).

        ``max_length`` is capped at the model's position limit; longer inputs are cut and
        counted in one :class:`TruncationWarning` (``warn_truncation=False``: only in the
        result's ``truncated``, for callers that encode in chunks and report once).
        ``batch_size`` caps texts per forward batch on top of the token budget.
        """

        texts = check_texts(texts)
        _check_request(dense, sparse, colbert, batch_size)
        max_length = self._check_max_length(max_length)

        ids, truncated = self._token_ids(texts, max_length)
        if truncated and warn_truncation:
            warnings.warn(
                TruncationWarning(
                    f"{truncated} of {len(texts)} input(s) exceeded max_length={max_length} tokens and were truncated",
                    truncated,
                    len(texts),
                    max_length,
                ),
                stacklevel=2,
            )
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="encoding", unit="text", leave=False)
        try:
            emb = self._encode_rows(
                lengths,
                lambda batch, width: self._pad(ids, batch, width),
                dense=dense,
                sparse=sparse,
                colbert=colbert,
                batch_size=batch_size,
                bar=bar,
            )
        finally:
            if bar is not None:
                bar.close()
        emb.truncated = truncated
        return emb

    def encode_windows(
        self,
        texts: str | Iterable[str],
        *,
        window: int,
        stride: int,
        max_windows: int | None = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
        dense: bool = True,
        sparse: bool = True,
        colbert: bool = True,
    ) -> WindowedEmbeddings:
        """Encode every text as overlapping token windows, each with the model's own specials.

        ``window`` counts tokens *including* the specials (``<s>`` and ``</s>``), at most the
        model's ``max_length``; so a window holds ``window - 2`` content tokens. Window ``k``
        of a text starts at content token ``k * stride``; the windows of a text end with the
        first one that reaches its last token, so consecutive windows share
        ``overlap = window - 2 - stride`` content tokens (``stride = window - 2``: no overlap;
        the last window may be shorter). A text of at most ``window - 2`` tokens is one
        window, whose embeddings are exactly what :meth:`encode` gives for it. ``max_windows``
        keeps the first windows of each text (None: all); how many texts lost windows is
        ``cut`` (no warning: the caller asked for the cap and reports it).

        Each text is tokenised once; all windows of all texts share the length-sorted,
        token-budget batching of :meth:`encode`, so the forward pass's memory is bounded by
        ``token_budget`` however long a text is (the outputs are not: see
        :meth:`iter_windows`). ``show_progress=None`` shows a bar when stderr is a terminal
        and the windows hold more than one batch's token budget.
        """
        (whole,) = self.iter_windows(
            texts,
            window=window,
            stride=stride,
            max_windows=max_windows,
            chunk_tokens=None,
            batch_size=batch_size,
            show_progress=show_progress,
            dense=dense,
            sparse=sparse,
            colbert=colbert,
        )
        return whole

    def iter_windows(
        self,
        texts: str | Iterable[str],
        *,
        window: int,
        stride: int,
        max_windows: int | None = None,
        chunk_tokens: int | None = 1 << 18,
        batch_size: int | None = None,
        show_progress: bool | None = None,
        dense: bool = True,
        sparse: bool = True,
        colbert: bool = True,
    ) -> Iterator[WindowedEmbeddings]:
        """:meth:`encode_windows` in pieces of consecutive windows of about ``chunk_tokens``
        tokens each (None: one piece), so a caller can store a huge text's windows with
        memory bounded by the piece, not the text (ColBERT keeps a vector per token: a
        10 MB text is gigabytes of them). ``doc`` and ``spans`` refer to the whole input;
        ``cut`` is counted once, in the first piece.
        """
        texts = check_texts(texts)
        _check_request(dense, sparse, colbert, batch_size)
        n_specials = len(self._prefix) + len(self._suffix)
        check_windows(window, stride, max_windows, max_length=self.max_length, n_specials=n_specials)
        if chunk_tokens is not None:
            check_int("chunk_tokens", chunk_tokens)
        content, bounds, spans_of = self._tokenize_content(texts)
        plan = plan_windows(np.diff(bounds), int(window) - n_specials, int(stride), max_windows)
        spans = spans_of(plan.doc, plan.start, plan.length)
        del spans_of  # holds the tokenizer's encodings: the largest object for a huge text
        lengths = plan.length + n_specials
        source = bounds[plan.doc] + plan.start  # each window's first content token in ``content``
        total = int(lengths.sum())
        edges = [0, len(lengths)]
        if chunk_tokens is not None and total > chunk_tokens:
            ends = np.searchsorted(np.cumsum(lengths), np.arange(chunk_tokens, total, chunk_tokens), side="left") + 1
            edges = [0, *np.unique(ends[ends < len(lengths)]).tolist(), len(lengths)]
        show = show_progress or (show_progress is None and stderr_is_terminal() and total > self.token_budget)
        count = np.bincount(plan.doc, minlength=len(texts)).astype(np.int64)
        index = np.arange(len(plan.doc), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        return self._window_chunks(
            content, source, lengths, plan, (spans, index, count), edges, show, dense, sparse, colbert, batch_size
        )

    def _window_chunks(self, content, source, lengths, plan, where, edges, show, dense, sparse, colbert, batch_size):
        """The generator behind :meth:`iter_windows` (apart, so bad arguments fail at the call)."""
        bar = None
        spans, index, count = where
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(lengths), desc="encoding", unit="window", leave=False)
        try:
            for a, b in zip(edges[:-1], edges[1:]):
                emb = self._encode_rows(
                    lengths[a:b],
                    lambda batch, width, a=a: self._pad_windows(
                        content, source[a + batch], plan.length[a + batch], width
                    ),
                    dense=dense,
                    sparse=sparse,
                    colbert=colbert,
                    batch_size=batch_size,
                    bar=bar,
                )
                cut = plan.cut if a == 0 else 0
                yield WindowedEmbeddings(emb, plan.doc[a:b], spans[a:b], cut, index[a:b], count)
        finally:
            if bar is not None:
                bar.close()

    def _encode_rows(
        self,
        lengths: np.ndarray,
        fill: Callable,
        *,
        dense: bool,
        sparse: bool,
        colbert: bool,
        batch_size: int | None,
        bar=None,
    ) -> M3Embeddings:
        """Run rows of ``lengths`` tokens through the model in token-budget batches.

        ``fill(batch, width)`` gives the padded ``(input_ids, attention_mask)`` of the rows in
        ``batch``; outputs land at each row's place, so the result is in row order. ``bar``: a
        tqdm bar advanced by rows.
        """
        import torch

        n = len(lengths)
        dense_out = np.zeros((n, self.hidden_size), np.float32) if dense else None
        col_offsets = None
        col_out = None
        if colbert:
            col_offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths - 1, out=col_offsets[1:])
            col_out = np.empty((int(col_offsets[-1]), self.colbert_dim), np.float32)
        sp_rows, sp_cols, sp_vals = [], [], []

        batches = self.plan_batches(lengths, batch_size)
        with torch.inference_mode():
            for batch in batches:
                input_ids, mask = fill(batch, int(self.padded_width(lengths[batch].max())))
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
                if dense:
                    cls = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
                    dense_out[batch] = cls.cpu().numpy()
                if sparse:
                    r, c, v = self._lexical(hidden, input_ids, mask, batch)
                    sp_rows.append(r), sp_cols.append(c), sp_vals.append(v)
                if colbert:
                    self._colbert_into(col_out, col_offsets, hidden, mask, batch, lengths)
                if bar is not None:
                    bar.update(len(batch))

        sparse_out = None
        if sparse:
            rows = np.concatenate(sp_rows) if sp_rows else np.zeros(0, np.int64)
            cols = np.concatenate(sp_cols) if sp_cols else np.zeros(0, np.int64)
            vals = np.concatenate(sp_vals) if sp_vals else np.zeros(0, np.float32)
            sparse_out = sp.csr_matrix((vals, (rows, cols)), shape=(n, self.vocab_size), dtype=np.float32)
            sparse_out.sort_indices()
        return M3Embeddings(
            dense_out, sparse_out, col_out, col_offsets, lengths, 0, id_to_token=self.convert_id_to_token
        )

    def _tokenize_content(self, texts: list[str]):
        """Content token ids of every text (no specials, no truncation), concatenated.

        Returns ``(content, bounds, spans_of)``: text ``i``'s ids are
        ``content[bounds[i]:bounds[i + 1]]``; ``spans_of(doc, start, length)`` gives the
        character spans of token ranges from the tokenizer's offsets (two lookups per range,
        so no per-token offsets list is built, which matters for a 10 MB text).
        """
        with self._tok_lock:
            self.tokenizer.no_truncation()
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        bounds = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=bounds[1:])
        content = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        del ids

        def spans_of(doc: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
            spans = np.zeros((len(doc), 2), dtype=np.int64)
            for row in np.flatnonzero(length > 0).tolist():
                e, a = encodings[doc[row]], int(start[row])
                spans[row] = e.token_to_chars(a)[0], e.token_to_chars(a + int(length[row]) - 1)[1]
            return spans

        return content, bounds, spans_of

    def _check_max_length(self, max_length: int | None) -> int:
        if max_length is None:
            return self.max_length
        return min(check_int("max_length", max_length, MIN_MAX_LENGTH), self.max_length)

    def _pad(self, ids: list[list[int]], batch: np.ndarray, width: int):
        import torch

        lens = np.fromiter((len(ids[i]) for i in batch), np.int64, len(batch))
        arr = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.arange(width)[None, :] < lens[:, None]
        arr[mask] = np.fromiter((t for i in batch for t in ids[i]), np.int64, int(lens.sum()))
        return (torch.from_numpy(arr).to(self.device), torch.from_numpy(mask.astype(np.int64)).to(self.device))

    def _pad_windows(self, content: np.ndarray, source: np.ndarray, length: np.ndarray, width: int):
        """Padded ids of windows: specials around ``content[source[i]:source[i] + length[i]]``."""
        import torch

        n_rows, p = len(source), len(self._prefix)
        arr = np.full((n_rows, width), self.pad_id, dtype=np.int64)
        arr[:, :p] = self._prefix
        first = np.cumsum(length) - length  # each row's first slot in the flat gather
        within = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(first, length)
        arr[np.repeat(np.arange(n_rows), length), p + within] = content[np.repeat(source, length) + within]
        for j, tok in enumerate(self._suffix):
            arr[np.arange(n_rows), p + length + j] = tok
        mask = np.arange(width)[None, :] < (length + p + len(self._suffix))[:, None]
        return torch.from_numpy(arr).to(self.device), torch.from_numpy(mask.astype(np.int64)).to(self.device)

    def _lexical(self, hidden, input_ids, mask, batch):
        """relu(sparse_linear(h)), max-pooled per (text, token id), specials and zeros dropped."""
        import torch

        weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)  # (B, L)
        keep = mask.bool() & ~torch.isin(input_ids, torch.from_numpy(self.special_ids).to(input_ids.device))
        keep &= weights > 0
        w = weights[keep].cpu().numpy()
        tok = input_ids[keep].cpu().numpy()
        row = np.broadcast_to(np.asarray(batch)[:, None], keep.shape)[keep.cpu().numpy()]
        if len(w) == 0:
            return row.astype(np.int64), tok, w
        key = row.astype(np.int64) * (self.vocab_size + 1) + tok
        order = np.lexsort((-w, key))  # within each (row, token) the largest weight first
        key, w, tok, row = key[order], w[order], tok[order], row[order]
        first = np.ones(len(key), bool)
        first[1:] = key[1:] != key[:-1]
        return row[first].astype(np.int64), tok[first], w[first]

    def _colbert_into(self, out, offsets, hidden, mask, batch, lengths) -> None:
        """Normalized colbert_linear(h) of every real token after [CLS], written at each text's offset."""
        import torch

        vecs = self.colbert_linear(hidden[:, 1:])
        vecs = torch.nn.functional.normalize(vecs, dim=-1)
        real = mask[:, 1:].bool()
        flat = vecs[real].cpu().numpy()
        counts = lengths[batch] - 1
        dest = np.repeat(offsets[batch] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(len(flat))
        out[dest] = flat

    # -------------------------------------------------------------- utilities
    def convert_id_to_token(self, items):
        """Readable tokens for token ids or lexical weights.

        An int gives a str; a list of ints a list of str; a ``{id: weight}`` dict gives
        ``{token: weight}``; a list of dicts a list of dicts (FlagEmbedding's behaviour).
        """
        if isinstance(items, dict):
            return {self._token_text(k): v for k, v in items.items()}
        if isinstance(items, (int, np.integer)):
            return self._token_text(items)
        items = list(items)
        if items and isinstance(items[0], dict):
            return [self.convert_id_to_token(d) for d in items]
        return [self._token_text(i) for i in items]

    def _token_text(self, token_id: Any) -> str:
        i = int(token_id)
        if not 0 <= i < self.vocab_size:  # the tokenizer overflows below 0 and answers '' above
            raise ValueError(f"token id {i} is outside the vocabulary (0 to {self.vocab_size - 1})")
        return self.tokenizer.decode([i])

    def compute_score(
        self,
        pairs: Sequence[tuple[str, str]] | tuple[str, str] | list[str],
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        *,
        max_query_length: int = 512,
        max_passage_length: int | None = 8192,
        batch_size: int | None = None,
    ) -> dict[str, list[float] | float]:
        """Scores of (query, passage) pairs with FlagEmbedding's keys and formulas.

        Keys: ``dense``, ``sparse``, ``colbert``, ``sparse+dense`` =
        (w_d·dense + w_s·sparse)/(w_d + w_s), ``colbert+sparse+dense`` = weighted mean of all
        three. ``weights`` = (dense, sparse, colbert), default (0.4, 0.2, 0.4) as in BGE-M3's
        paper; FlagEmbedding's ``compute_score`` defaults to (1, 1, 1). ColBERT counts only the
        passage's real tokens (FlagEmbedding's batched version floors at 0 through padding).
        Weights that give a returned mean zero total (all zero, or zero dense and sparse weight:
        ``sparse+dense`` would be 0/0, NaN in FlagEmbedding) are refused with ValueError, as a search
        in those modes is. A single pair gives floats, a list of pairs lists of floats.
        """
        # one pair as a tuple or, as FlagEmbedding takes it, a list of two strings (a list of pairs holds none)
        single = isinstance(pairs, (tuple, list)) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs)
        pairs = [pairs] if single else list(pairs)
        if not pairs:
            raise ValueError("pairs is empty")
        for p in pairs:
            if not (isinstance(p, (tuple, list)) and len(p) == 2):
                raise TypeError(f"each pair must be (query, passage), got {p!r}")
        w = check_weights(weights)
        hint = ": compute_score returns their weighted mean 'sparse+dense'; give dense or sparse a weight"
        check_mode_total(w, "dense+sparse", hint=f"{hint} (the 'colbert' key is ColBERT alone)")
        q = self.encode([p[0] for p in pairs], max_length=max_query_length, batch_size=batch_size)
        d = self.encode([p[1] for p in pairs], max_length=max_passage_length, batch_size=batch_size)
        s_dense = pair_dense_scores(q.dense, d.dense)
        s_sparse = pair_lexical_scores(q.sparse, d.sparse)
        s_colbert = pair_colbert_scores(q.colbert, q.colbert_offsets, d.colbert, d.colbert_offsets)
        out = {
            "colbert": s_colbert,
            "sparse": s_sparse,
            "dense": s_dense,
            # fusion.weighted, as a search's: the weights divided by their sum first (5e-324 each was NaN here)
            "sparse+dense": weighted({"dense": s_dense, "sparse": s_sparse}, {"dense": w[0], "sparse": w[1]}),
            "colbert+sparse+dense": weighted(
                {"dense": s_dense, "sparse": s_sparse, "colbert": s_colbert}, dict(zip(MODES, w))
            ),
        }
        if single:
            return {k: float(v[0]) for k, v in out.items()}
        return {k: [float(x) for x in v] for k, v in out.items()}


def _template_specials(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text (``<s>``, ``</s>``)."""
    probe = tokenizer.encode("a")
    mask = probe.special_tokens_mask
    content = [i for i, m in enumerate(mask) if not m]
    if not content:
        raise ModelLoadError("the tokenizer gives no content token for the text 'a'; cannot place its special tokens")
    if not content[0]:  # BGE-M3's dense vector is the first position's, and its ColBERT vectors follow it
        raise ModelLoadError(
            "the tokenizer adds no special token before a text (tokenizer.json lacks BAAI/bge-m3's post_processor "
            "<s> ... </s>): the dense vector would be the first word's, not [CLS]'s"
        )
    return probe.ids[: content[0]], probe.ids[content[-1] + 1 :]


def _check_request(dense: bool, sparse: bool, colbert: bool, batch_size: int | None) -> None:
    if not (dense or sparse or colbert):
        raise ValueError("request at least one of dense, sparse, colbert")
    if batch_size is not None:
        check_int("batch_size", batch_size)
