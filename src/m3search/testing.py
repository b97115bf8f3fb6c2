"""Random-weight models in BAAI/bge-m3's exact checkpoint layout, built offline.

The real weights cannot be downloaded in CI, yet tests and benchmarks need a folder
that both :class:`m3search.M3Encoder` and FlagEmbedding's ``BGEM3FlagModel`` load the
same way. This module writes one: ``config.json`` + ``model.safetensors`` (an
``XLMRobertaModel``), ``colbert_linear.pt``, ``sparse_linear.pt`` and tokenizer files
with XLM-R's special ids (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=last).

Traps handled here (each one broke parity once):

* transformers 5 rebuilds the XLM-R tokenizer pipeline itself (no normalizer,
  WhitespaceSplit + Metaspace) and ignores the file's; the ``"xlmr"`` variant writes
  exactly that pipeline so transformers 4.x and 5.x tokenize alike.
* the Unigram trainer's piece order is not reproducible, so pieces are sorted.
* a random sparse head can be all-zero after ReLU, so it gets a positive bias.
* XLM-R's default ``initializer_range`` 0.02 makes [CLS] nearly input-independent;
  0.2 makes rankings meaningful.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"

#: Built-in multilingual sentences, used when ``../shared/data`` is absent.
BUILTIN_TEXTS = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Retrieval systems combine dense, sparse and multi-vector representations.",
    "Die schnelle braune Katze springt über den faulen Hund am Fluss.",
    "El rápido zorro marrón salta sobre el perro perezoso junto al río.",
    "Быстрая коричневая лиса прыгает через ленивую собаку у реки.",
    "敏捷的棕色狐狸跳过了河边的懒狗。检索系统结合了稠密和稀疏表示。",
    "الثعلب البني السريع يقفز فوق الكلب الكسول بجانب النهر.",
    "Aerodynamic heating of a slender body in hypersonic flow at high Mach number.",
    "The boundary layer transition depends on the Reynolds number and pressure gradient.",
    "Prime minister announced new elections after the parliament vote in the capital.",
)

#: Full BAAI/bge-m3 encoder shape (XLM-RoBERTa-large, 8192 positions).
BGE_M3_SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    vocab_size=250002,
    max_position_embeddings=8194,
)


def default_training_texts(shared_data: str | os.PathLike | None = None, per_language: int = 400) -> list[str]:
    """Mixed-language text for training a test tokenizer.

    Reads the first ``per_language`` documents of each xquad-r language (and cranfield)
    from ``../shared/data`` when present, so the vocabulary covers six scripts.
    """
    texts = list(BUILTIN_TEXTS)
    root = Path(shared_data) if shared_data else _find_shared_data()
    if root is None:
        return texts
    folders = [root / "cranfield"] + sorted((root / "xquad-r").glob("*"))
    for folder in folders:
        corpus = folder / "corpus.jsonl"
        if not corpus.is_file():
            continue
        with corpus.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i >= per_language:
                    break
                doc = json.loads(line)
                texts.append((doc.get("title", "") + " " + doc.get("text", "")).strip())
    return texts


def _find_shared_data() -> Path | None:
    env = os.environ.get("M3SEARCH_SHARED_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" for p in here.parents] + [Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if (c / "xquad-r").is_dir():
            return c
    return None


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4000,
    *,
    pad_to: int | None = None,
    variant: Literal["xlmr", "alt"] = "xlmr",
):
    """Train a Unigram tokenizer laid out like XLM-R's.

    ``variant="xlmr"`` gives the exact pipeline transformers 5 rebuilds for XLM-R.
    ``variant="alt"`` adds a lower-casing NFKC normalizer and punctuation splitting:
    a tokenizer.json whose pipeline transformers 5 would *not* reproduce, so tests can
    tell "tokenized as the file says" from "tokenized as transformers rebuilds it".
    ``pad_to`` pads the vocabulary with never-matching pieces up to that size
    (the full bge-m3 vocabulary is 250,002).
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import Unigram

    pre = [pre_tokenizers.WhitespaceSplit()]
    if variant == "alt":
        pre.append(pre_tokenizers.Punctuation())
    pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"))

    trainee = Tokenizer(Unigram())
    if variant == "alt":
        trainee.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    trainee.pre_tokenizer = pre_tokenizers.Sequence(pre)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
    )
    trainee.train_from_iterator(list(texts), trainer=trainer)
    learned = json.loads(trainee.to_str())["model"]["vocab"]
    pieces = sorted((p, s) for p, s in learned if p not in SPECIAL_TOKENS and p != MASK_TOKEN)
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + pieces
    if pad_to is not None:
        # Private-use code points never occur in real text, so these pieces never match.
        vocab += [(f"▁\U000f0000{i}", -100.0) for i in range(pad_to - 1 - len(vocab))]
    vocab.append((MASK_TOKEN, 0.0))

    tok = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = trainee.normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS) + [MASK_TOKEN])
    return tok


def build_random_model(
    path: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 514,
    vocab_size: int | None = None,
    tokenizer_vocab: int = 4000,
    initializer_range: float = 0.2,
    seed: int = 0,
    variant: Literal["xlmr", "alt"] = "xlmr",
    texts: Iterable[str] | None = None,
) -> Path:
    """Write a random-weight model in BAAI/bge-m3's exact layout to ``path``.

    ``vocab_size`` defaults to the tokenizer's size; a larger value pads the tokenizer
    (used for the full 250,002-id benchmark model). Returns ``path``.
    """
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(
        texts if texts is not None else default_training_texts(), tokenizer_vocab, pad_to=vocab_size, variant=variant
    )
    n_vocab = tok.get_vocab_size()
    tok.save(str(path / "tokenizer.json"))
    model_max = max_position_embeddings - 2
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": MASK_TOKEN,
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": model_max, **special}, indent=2)
    )

    config = XLMRobertaConfig(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = XLMRobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(str(path), safe_serialization=True)

    colbert = torch.nn.Linear(hidden_size, hidden_size)
    sparse = torch.nn.Linear(hidden_size, 1)
    with torch.no_grad():
        sparse.bias.fill_(0.3)  # keep some ReLU outputs positive
    torch.save(colbert.state_dict(), path / "colbert_linear.pt")
    torch.save(sparse.state_dict(), path / "sparse_linear.pt")
    return path
