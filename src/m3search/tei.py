"""Hugging Face text-embeddings-inference (TEI) routes, mounted under ``/tei``.

Why a prefix: m3search's own ``/embed`` and ``/info`` answer other bodies than TEI's
routes of the same names, and both are in use. Under ``/tei`` every TEI route keeps its
exact name and shape, so a TEI client only needs its base URL set to
``http://HOST:PORT/tei`` (``POST /tei`` itself is TEI's root route, which embeds, as
huggingface_hub's ``InferenceClient(model=URL).feature_extraction`` calls it).

What each route returns with BGE-M3: ``/embed`` the dense [CLS] vectors; ``/embed_sparse``
the lexical weights as ``{index, value}`` pairs (index = token id); ``/embed_all`` each
text's ColBERT token vectors; ``/tokenize`` tokens with UTF-8 byte offsets, as TEI's (the Rust
tokenizers' ``encode`` gives byte offsets; Python's, character offsets); ``/info`` TEI's
model description. Differences, refused with 400 rather than ignored: ``normalize: false``
(vectors are always normalized), ``truncation_direction: "Left"``, ``prompt_name``, a
``dimensions`` other than the model's. As in TEI, an input over the model's token limit is
refused (413) unless ``truncate: true``. Errors keep this server's one error shape.
"""

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException

__all__ = ["make_router", "PREFIX", "TextOrTexts"]

PREFIX = "/tei"


def _no_token_ids(value: Any) -> Any:
    """Token-id arrays (OpenAI's and TEI's other input form) name ids of another tokenizer: refused with a
    message saying so, since OpenAI clients send them unasked (LangChain's ``OpenAIEmbeddings`` tokenizes
    with tiktoken unless ``check_embedding_ctx_length=False``)."""
    items = value if isinstance(value, list) else ()
    if any(_is_id(x) or (isinstance(x, list) and any(_is_id(y) for y in x)) for x in items):
        raise ValueError(
            "token-id arrays are not supported: send texts (for LangChain's OpenAIEmbeddings, set "
            "check_embedding_ctx_length=False)"
        )
    return value


def _is_id(x: Any) -> bool:
    """A token id: an integer that is not a JSON ``true`` / ``false`` (Python's bool is an int)."""
    return isinstance(x, int) and not isinstance(x, bool)


#: A request's text input: one text or a list of texts.
TextOrTexts = Annotated[str | list[str], BeforeValidator(_no_token_ids)]


class TeiRequest(BaseModel):
    """TEI's common body. Unknown fields (e.g. huggingface_hub's ``parameters``) are ignored, as TEI does."""

    model_config = ConfigDict(extra="ignore")
    inputs: TextOrTexts = Field(description="A text or a list of texts (token-id arrays are not supported).")
    truncate: bool | None = Field(None, description="Cut inputs over the token limit instead of refusing them.")
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: str | None = None


class TeiEmbedRequest(TeiRequest):
    normalize: bool = True
    dimensions: int | None = None


class TeiTokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: TextOrTexts
    add_special_tokens: bool = True
    prompt_name: str | None = None


class SparseValue(BaseModel):
    index: int
    value: float


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = Field(description="UTF-8 byte offset in the input where the token starts (TEI's unit).")
    stop: int | None = Field(description="UTF-8 byte offset in the input where the token ends.")


def _byte_offsets(text: str) -> np.ndarray:
    """The UTF-8 byte offset of each character offset of ``text`` (``len(text) + 1`` of them)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate(([0], np.cumsum(sizes)))


def make_router(
    *, encode, texts_of, resources_dep, settings_dep, dependencies, responses, encoding_responses
) -> APIRouter:
    """The TEI routes over the server's own helpers (passed in: this module imports nothing of the server).
    ``responses``: every route's error statuses in the OpenAPI schema; ``encoding_responses``: those of the routes
    that encode (their texts wait in the server's queue)."""
    router = APIRouter(prefix=PREFIX, tags=["tei"], dependencies=dependencies, responses=responses)

    def no_prompt(body: TeiRequest | TeiTokenizeRequest) -> None:
        if body.prompt_name is not None:  # refused, not ignored: the caller expects the prompt applied
            raise HTTPException(400, "prompt_name is not supported: BGE-M3 uses no prompts")

    async def prepared(body: TeiRequest, res, settings) -> tuple[list[str], int]:
        texts = texts_of(body.inputs, settings)
        no_prompt(body)
        if body.truncation_direction.lower() == "left":
            raise HTTPException(400, 'truncation_direction "Left" is not supported (inputs are cut at the end)')
        enc = res.encoder
        if not body.truncate:
            _, cut = await run_in_threadpool(enc.tokenize, texts, enc.max_length)
            if cut:  # (how long they are is not known: tokenize stops at the limit)
                raise HTTPException(
                    413,
                    f"{cut} input(s) exceed the limit of {enc.max_length} tokens (send truncate: true to cut them)",
                )
        return texts, enc.max_length

    async def embed(body: TeiEmbedRequest, request: Request, res: resources_dep, settings: settings_dep):
        if not body.normalize:
            raise HTTPException(400, "normalize: false is not supported: BGE-M3's dense vectors are normalized")
        enc = res.encoder
        if body.dimensions is not None and body.dimensions != enc.hidden_size:
            raise HTTPException(
                400, f"dimensions={body.dimensions} is not supported: this model returns {enc.hidden_size}"
            )
        texts, _ = await prepared(body, res, settings)
        emb = await encode(request, texts, dense=True, sparse=False, colbert=False)
        return emb.dense.tolist()

    embed_doc = "TEI `/embed`: one dense vector per input."
    for path, summary in (("", "TEI root"), ("/embed", None)):
        router.add_api_route(
            path,
            embed,
            methods=["POST"],
            response_model=list[list[float]],
            summary=summary,
            description=embed_doc,
            responses=encoding_responses,
        )

    @router.post("/embed_sparse", response_model=list[list[SparseValue]], responses=encoding_responses)
    async def embed_sparse(body: TeiRequest, request: Request, res: resources_dep, settings: settings_dep) -> Any:
        """TEI `/embed_sparse`: lexical weights as `{index: token id, value: weight}` pairs per input."""
        texts, _ = await prepared(body, res, settings)
        emb = await encode(request, texts, dense=False, sparse=True, colbert=False)
        csr = emb.sparse
        return [
            [{"index": i, "value": v} for i, v in zip(csr.indices[a:b].tolist(), csr.data[a:b].tolist())]
            for a, b in zip(csr.indptr[:-1].tolist(), csr.indptr[1:].tolist())
        ]

    @router.post("/embed_all", response_model=list[list[list[float]]], responses=encoding_responses)
    async def embed_all(body: TeiRequest, request: Request, res: resources_dep, settings: settings_dep) -> Any:
        """TEI `/embed_all`: each input's token vectors (BGE-M3's ColBERT vectors, every token after [CLS])."""
        texts, _ = await prepared(body, res, settings)
        emb = await encode(request, texts, dense=False, sparse=False, colbert=True)
        return [v.tolist() for v in emb.colbert_vecs]

    @router.post("/tokenize", response_model=list[list[SimpleToken]])
    async def tokenize(body: TeiTokenizeRequest, res: resources_dep, settings: settings_dep) -> Any:
        """TEI `/tokenize`: tokens with their UTF-8 byte offsets in the input, as TEI (specials have none)."""
        texts = texts_of(body.inputs, settings)
        no_prompt(body)
        enc = res.encoder

        def run() -> list[list[dict]]:
            with enc._tok_lock:  # the tokenizer's truncation setting is shared state
                encodings = enc.tokenizer.encode_batch(texts, add_special_tokens=body.add_special_tokens)
            out = []
            for text, e in zip(texts, encodings):
                tokens = []
                at = _byte_offsets(text).tolist()  # the tokenizer's offsets are characters
                # the tokenizer's own mask, as TEI: <unk> stands for text (its offsets kept), not a special
                for tid, tok, (a, b), mask in zip(e.ids, e.tokens, e.offsets, e.special_tokens_mask):
                    is_special = bool(mask)
                    tokens.append(
                        {
                            "id": tid,
                            "text": tok if is_special else text[a:b],
                            "special": is_special,
                            "start": None if is_special else at[a],
                            "stop": None if is_special else at[b],
                        }
                    )
                out.append(tokens)
            return out

        return await run_in_threadpool(run)

    @router.get("/info")
    def info(res: resources_dep, settings: settings_dep) -> dict[str, Any]:
        """TEI `/info`: the model and this server's limits, in TEI's field names."""
        from . import __version__

        enc = res.encoder
        return {
            "model_id": str(enc.name_or_path),
            "model_sha": enc.identity,
            "model_dtype": str(enc.dtype).replace("torch.", ""),
            "model_type": {"embedding": {"pooling": "cls"}},
            "max_concurrent_requests": settings.max_queue,
            "max_input_length": enc.max_length,
            "max_batch_tokens": enc.token_budget,
            "max_batch_requests": None,
            "max_client_batch_size": settings.max_batch,
            "auto_truncate": False,
            "tokenization_workers": 1,
            "version": f"m3search {__version__}",
            "sha": None,
            "docker_label": None,
        }

    return router
