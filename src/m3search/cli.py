"""The ``m3search`` command: index, search, serve, eval, info, delete (and migrate).

A thin shell over the library (datasette's rule): options are parsed here, the work is
done by :mod:`m3search.collection`, :mod:`m3search.server` and :mod:`m3search.eval`, each
imported only when its command runs, so ``m3search --help`` starts fast.

Output: human-readable text on stdout, progress bars on stderr, and with ``--json``
exactly one JSON object on stdout. Errors end the command with one ``Error: ...`` line on
stderr (exit code 1; 2 for a bad option) instead of a traceback, and with ``--json`` also
``{"error": {"type", "message", "exit_code"}}`` on stdout; set ``M3SEARCH_DEBUG=1`` to see the
traceback.

One process owns an embedded collection. While ``m3search serve`` holds one, it records
its address in ``<collection>/server.json``; ``search``, ``index``, ``delete`` and ``info``
then go through that server over HTTP, or say which process holds the collection.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

MODES = ("dense", "sparse", "colbert", "dense+sparse", "dense+colbert", "all")
FUSIONS = ("weighted", "rrf", "dbsf")
DEFAULT_MODEL = "BAAI/bge-m3"
SERVER_FILE = "server.json"  # written by m3search.server.serve beside the collection's lock


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into a one-line ClickException (M3SEARCH_DEBUG=1 re-raises)."""
    try:
        yield
    except (click.ClickException, click.Abort, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if os.environ.get("M3SEARCH_DEBUG"):
            raise
        message = " ".join((str(exc) or type(exc).__name__).split())  # one line, whatever the library said
        if not isinstance(exc, (ValueError, TypeError, OSError, ImportError, RuntimeError, LookupError)):
            message = f"{type(exc).__name__}: {message} (set M3SEARCH_DEBUG=1 for the traceback)"
        raise click.ClickException(message) from None


class _Main(click.Group):
    """The command group; with ``--json`` among the arguments, an error is also a JSON object on stdout."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["m3search.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if ctx.meta.get("m3search.json"):
                kind = "usage" if isinstance(exc, click.UsageError) else "error"
                _emit({"error": {"type": kind, "message": exc.format_message(), "exit_code": exc.exit_code}})
            raise


def _emit(obj: dict[str, Any]) -> None:
    """The single JSON object that ``--json`` promises on stdout."""
    click.echo(json.dumps(obj, ensure_ascii=False))


def _parse_weights(ctx: Any, param: Any, value: str | None) -> tuple[float, float, float] | None:
    """click callback: '0.4,0.2,0.4' -> (0.4, 0.2, 0.4)."""
    if value is None:
        return None
    try:
        weights = tuple(float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three comma-separated numbers, got {value!r}") from None
    from .plan import check_weights  # the library's rule, as a usage error (exit 2)

    try:
        return check_weights(weights)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _divisor_at_most(size: int, limit: int) -> int:
    """The largest divisor of ``size`` not above ``limit``: batches of it nest in batches of ``size``,
    so the duplicate-id check of the first pass (over ``size``) covers every smaller write."""
    return next(d for d in range(min(size, limit), 0, -1) if size % d == 0)


def _parse_filter(ctx: Any, param: Any, value: str | None) -> dict | None:
    """click callback: a JSON object, or @file holding one."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read filter file {value[1:]!r}: {exc.strerror}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg} at char {exc.pos}): {text!r}") from None
    if not isinstance(obj, dict):
        raise click.BadParameter('a filter is a JSON object, e.g. \'{"lang": "en"}\'')
    return obj


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _server_record(collection: Path) -> dict[str, Any] | None:
    """The live server's record for ``collection``; None if absent, unreadable or its process is gone."""
    try:
        record = json.loads((collection / SERVER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not _pid_alive(record.get("pid")) or record.get("pid") == os.getpid():
        return None
    return record


def hit_to_dict(hit: Any) -> dict[str, Any]:
    """A search hit as plain JSON data: ``{"id", "score", "scores", "text", "metadata"[, "explain"]}``."""
    if isinstance(hit, dict):
        return hit
    d: dict[str, Any] = {
        "id": hit.id,
        "score": float(hit.score),
        "scores": {k: (None if v is None else float(v)) for k, v in (hit.scores or {}).items()},
        "text": hit.text,
        "metadata": hit.metadata or {},
    }
    explain = getattr(hit, "explain", None)
    if explain is not None:
        d["explain"] = _plain(explain)
    return d


def collection_info(collection: Any) -> dict[str, Any]:
    """Model, count, bytes on disk per representation and settings of an open collection.

    Uses ``Collection.info()`` when the library has one; otherwise reads the manifest and
    sizes the engine's files by the representation their folder belongs to.
    """
    if hasattr(collection, "info"):
        return _plain(collection.info())
    manifest = collection.manifest
    out: dict[str, Any] = {
        "location": str(collection.location),
        "engine": manifest.get("engine"),
        "count": int(collection.count()),
        "model": manifest.get("model"),
        "settings": manifest.get("settings"),
        "schema": manifest.get("schema"),
        "created": manifest.get("created"),
        "schema_version": manifest.get("schema_version"),
    }
    if Path(collection.location).is_dir():
        out["disk_bytes"] = disk_usage(Path(collection.location))
    return out


def disk_usage(root: Path) -> dict[str, int]:
    """Allocated bytes under ``root`` grouped as dense / sparse / colbert / payload / wal / other, plus total."""
    groups = dict.fromkeys(("dense", "sparse", "colbert", "payload", "wal", "other", "total"), 0)
    for dirpath, _, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        group = next((g for g in ("dense", "sparse", "colbert") if f"-{g}" in rel), None)
        if group is None:
            group = "payload" if "payload" in rel else "wal" if "/wal" in f"/{rel}" else "other"
        for name in files:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            size = getattr(st, "st_blocks", 0) * 512 or st.st_size
            groups[group] += size
            groups["total"] += size
    return groups


def _plain(x: Any) -> Any:
    """numpy values and dataclasses to JSON-able Python (for explain details and info dicts)."""
    import dataclasses

    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return x.tolist()
    return x


# ---------------------------------------------------------------------------------------------- targets


class _Local:
    """The collection opened in this process."""

    via = "local"

    def __init__(self, collection: Any):
        self.collection = collection

    def search(self, query: str, **kwargs: Any) -> list[dict]:
        return [hit_to_dict(h) for h in self.collection.search(query, **kwargs)]

    def upsert(self, records: Sequence[Any]) -> None:
        self.collection.upsert(
            [r.text for r in records],
            ids=[r.id for r in records],
            metadata=[r.metadata for r in records],
            show_progress=False,
        )

    def delete(self, ids: Sequence[str]) -> dict:
        out = self.collection.delete(list(ids))
        return {"deleted": list(out["deleted"]), "missing": list(out["missing"])}

    def count(self) -> int:
        return int(self.collection.count())

    def info(self) -> dict:
        return collection_info(self.collection)

    def close(self) -> None:
        self.collection.close()


class _Remote:
    """A collection held by a running ``m3search serve``, reached over HTTP."""

    def __init__(self, record: dict[str, Any], api_key: str | None):
        import httpx

        self.url = record["url"]
        self.pid = record.get("pid")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(600.0, connect=5.0))
        self.via = f"server {self.url} (pid {self.pid})"
        self.limits: dict[str, Any] = {}

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"the server at {self.url} (pid {self.pid}) failed to answer: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise click.ClickException(f"server {self.url}: {message}")
        return response.json()

    def search(self, query: str, **kwargs: Any) -> list[dict]:
        body = {"query": query, **{k: v for k, v in kwargs.items() if v is not None}}
        if "weights" in body:
            body["weights"] = list(body["weights"])
        return self._call("POST", "/search", json=body)["hits"]

    def upsert(self, records: Sequence[Any]) -> None:
        docs = [{"id": r.id, "text": r.text, "metadata": r.metadata} for r in records]
        self._call("POST", "/documents", json={"documents": docs, "upsert": True})

    def delete(self, ids: Sequence[str]) -> dict:
        return self._call("DELETE", "/documents", json={"ids": list(ids)})

    def info(self) -> dict:
        out = self._call("GET", "/info")
        self.limits = out.get("limits") or {}
        return out.get("collection") or {}

    def count(self) -> int:
        return int(self.info().get("count", 0))

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def _truncation_summary() -> Iterator[dict]:
    """One "N of M documents were truncated" line for a whole file, not one per batch
    (the caller counts M in the yielded ``{"documents": M}``)."""
    from .encoder import TruncationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        tally = {"documents": 0}
        yield tally
    cut = [w.message for w in caught if isinstance(w.message, TruncationWarning)]
    for w in caught:
        if not isinstance(w.message, TruncationWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if cut:
        click.echo(
            f"Warning: {sum(m.count for m in cut)} of {tally['documents']} documents exceeded max_length={cut[0].max_length} tokens; "
            "only their first tokens are indexed",
            err=True,
        )


def _open_target(
    collection: str,
    *,
    model: str | None,
    api_key: str | None,
    create: bool = False,
    device: str = "auto",
    dtype: str = "auto",
):
    """This collection's server if one runs, else the collection opened here (created if ``create``)."""
    path = Path(collection)
    record = _server_record(path)
    not_answering = None
    if record is not None:
        url, pid = record.get("url"), record.get("pid")
        import httpx

        try:  # a server that is still loading its model answers once loaded (the request waits in its backlog)
            httpx.get(f"{url}/health", timeout=httpx.Timeout(300.0, connect=5.0)).raise_for_status()
        except httpx.HTTPError as exc:
            # Nobody listening: a stale record whose pid was reused, or a server that is stopping.
            # Opening the folder below tells which (the lock is free, or "in use" is reported).
            not_answering = f"m3search serve at {url} (pid {pid}) does not answer: {exc}"
            record = None
    if record is not None:
        if record.get("api_key_required") and not api_key:
            raise click.ClickException(
                f"collection {collection} is served by process {pid} at {url}, which needs an API key: "
                "pass --api-key or set M3SEARCH_API_KEY"
            )
        return _Remote(record, api_key)
    from . import Collection
    from .engines.base import CollectionInUseError, CollectionNotFoundError

    try:
        return _Local(Collection.open(path, model=model, device=device, dtype=dtype))
    except CollectionNotFoundError:
        if not create:
            raise
    except CollectionInUseError as exc:
        raise click.ClickException(f"{exc}" + (f"; {not_answering}" if not_answering else "")) from None
    return _Local(Collection.create(path, model=model or DEFAULT_MODEL, device=device, dtype=dtype))


# ---------------------------------------------------------------------------------------------- commands


collection_option = click.option(
    "--collection",
    "-c",
    required=True,
    envvar="M3SEARCH_COLLECTION",
    show_envvar=True,
    type=click.Path(file_okay=False),
    help="Collection folder.",
)
model_option = click.option(
    "--model",
    "-m",
    envvar="M3SEARCH_MODEL",
    show_envvar=True,
    default=None,
    help=f"Model name or folder [default: the collection's model; for new ones {DEFAULT_MODEL}].",
)
api_key_option = click.option(
    "--api-key",
    envvar="M3SEARCH_API_KEY",
    show_envvar=True,
    default=None,
    help="API key of a running server (used when the collection is served).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
DTYPES = ["auto", "float32", "bfloat16", "float16"]
dtype_option = click.option(
    "--dtype",
    envvar="M3SEARCH_DTYPE",
    show_envvar=True,
    default="auto",
    show_default=True,
    type=click.Choice(DTYPES),
    help="Encoder dtype (auto: fp16 on CUDA, bf16 on CPUs with bf16 units, else fp32; float32 for exact scores).",
)
device_option = click.option(
    "--device",
    envvar="M3SEARCH_DEVICE",
    show_envvar=True,
    default="auto",
    show_default=True,
    help="Encoder device (auto, cpu, cuda, cuda:1, ...).",
)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="m3search", prog_name="m3search")
def main() -> None:
    """BGE-M3 hybrid retrieval: dense + sparse + ColBERT from one forward pass, indexed, searched, fused."""
    # Warnings (e.g. truncated documents) as one "Warning: ..." line each, not Python's
    # two-line file:line form, which looks like a crash in a terminal.
    warnings.formatwarning = lambda message, *_args, **_kw: f"Warning: {message}\n"


@main.command()
@click.argument("source", type=click.Path(exists=True))
@collection_option
@model_option
@click.option("--id-field", default=None, help="Id field (default: _id or id, else the record number).")
@click.option(
    "--text-field",
    "text_fields",
    multiple=True,
    help="Text field(s), joined with a space; repeat for several [default: title + text].",
)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1), help="Documents per write.")
@dtype_option
@device_option
@api_key_option
@json_option
def index(source, collection, model, id_field, text_fields, batch_size, dtype, device, api_key, as_json):
    """Index SOURCE (JSONL, CSV/TSV or a folder of .txt/.md) into the collection.

    JSONL: one object per line; a BEIR corpus.jsonl (_id, title, text) works as is. Creates the collection if needed; re-running upserts (same ids are overwritten).

    The whole source is read and checked before the first write, so a bad record leaves the collection as it was.
    """
    with _errors():
        from tqdm import tqdm

        from .sources import check_source, count_records, iter_batches, read_source

        def records():
            return read_source(source, id_field=id_field, text_fields=list(text_fields) or None)

        t0 = time.perf_counter()
        check_source(records(), batch_size)  # pass 1: every record parsed and checked, none kept
        target = _open_target(collection, model=model, api_key=api_key, create=True, device=device, dtype=dtype)
        n = 0
        try:
            if isinstance(target, _Remote):
                target.info()
                batch_size = _divisor_at_most(batch_size, int(target.limits.get("max_batch", batch_size)))
            with (
                tqdm(
                    total=count_records(source),
                    unit="doc",
                    desc="index",
                    file=sys.stderr,
                    disable=None,
                    dynamic_ncols=True,
                ) as bar,
                _truncation_summary() as tally,
            ):
                for batch in iter_batches(records(), batch_size):
                    target.upsert(batch)
                    n += len(batch)
                    tally["documents"] = n
                    bar.update(len(batch))
            total = target.count()
        except Exception as exc:  # pass 2 failed (engine, disk, server): say exactly what is in the collection
            if os.environ.get("M3SEARCH_DEBUG"):
                raise
            message = " ".join((str(exc) or type(exc).__name__).split())
            done = f"the first {n} records of {source} were written" if n else "nothing was written"
            raise click.ClickException(
                f"{message}; {done}; run the same command again to finish (it overwrites by id)"
            ) from None
        finally:
            target.close()
        seconds = time.perf_counter() - t0
    result = {
        "collection": str(collection),
        "indexed": n,
        "count": total,
        "seconds": round(seconds, 3),
        "via": target.via,
    }
    if as_json:
        _emit(result)
    else:
        click.echo(f"indexed {n} documents into {collection} ({total} in total) in {seconds:.1f} s via {target.via}")


@main.command()
@click.argument("query")
@collection_option
@model_option
@click.option("--mode", default="all", show_default=True, type=click.Choice(MODES), help="Search mode.")
@click.option("--fusion", default="weighted", show_default=True, type=click.Choice(FUSIONS), help="Fusion method.")
@click.option("--k", "-k", default=10, show_default=True, type=click.IntRange(1), help="Hits to return.")
@click.option(
    "--weights", default=None, callback=_parse_weights, help="dense,sparse,colbert weights [default: 0.4,0.2,0.4]."
)
@click.option(
    "--candidates",
    default=None,
    type=click.IntRange(1),
    help="Dense and sparse candidates per query for re-ranking modes [default: the collection's].",
)
@click.option(
    "--filter",
    "filter_",
    default=None,
    callback=_parse_filter,
    help='Metadata filter as JSON (or @file), e.g. \'{"year": {"gte": 2000}}\'.',
)
@click.option("--explain", is_flag=True, help="Show matched tokens and each mode's contribution.")
@dtype_option
@device_option
@api_key_option
@json_option
def search(
    query, collection, model, mode, fusion, k, weights, candidates, filter_, explain, dtype, device, api_key, as_json
):
    """Search the collection for QUERY."""
    with _errors():
        target = _open_target(collection, model=model, api_key=api_key, device=device, dtype=dtype)
        try:
            hits = target.search(
                query,
                k=k,
                mode=mode,
                fusion=fusion,
                weights=weights,
                candidates=candidates,
                filter=filter_,
                explain=explain,
            )
        finally:
            target.close()
    if as_json:
        _emit({"hits": hits})
        return
    if not hits:
        click.echo("no hits")
    for rank, h in enumerate(hits, 1):
        parts = " ".join(f"{m} {v:.4f}" for m, v in (h.get("scores") or {}).items() if v is not None)
        click.echo(f"{rank:>3}. {h['score']:.4f}  {h['id']}" + (f"  [{parts}]" if parts else ""))
        text = " ".join((h.get("text") or "").split())
        if text:
            click.echo(f"     {text[:200]}{'...' if len(text) > 200 else ''}")
        if h.get("metadata"):
            click.echo(f"     metadata: {json.dumps(h['metadata'], ensure_ascii=False)[:200]}")
        if explain and h.get("explain") is not None:
            click.echo(f"     explain: {json.dumps(h['explain'], ensure_ascii=False)[:600]}")


@main.command()
@click.argument("ids", nargs=-1, required=True)
@collection_option
@api_key_option
@json_option
def delete(ids, collection, api_key, as_json):
    """Delete documents by id (unknown ids are reported, not an error)."""
    with _errors():
        target = _open_target(collection, model=None, api_key=api_key)
        try:
            out = target.delete(list(ids))
        finally:
            target.close()
    if as_json:
        _emit(out)
    else:
        click.echo(
            f"deleted {len(out['deleted'])}" + (f"; not found: {', '.join(out['missing'])}" if out["missing"] else "")
        )


@main.command()
@collection_option
@api_key_option
@json_option
def info(collection, api_key, as_json):
    """Model, counts, sizes on disk per representation, settings."""
    with _errors():
        target = _open_target(collection, model=None, api_key=api_key)
        try:
            out = target.info()
        finally:
            target.close()
        out = {**out, "served_by": None if isinstance(target, _Local) else target.via}
    if as_json:
        _emit(out)
    else:
        _print_tree(out)


def _print_tree(obj: Any, indent: int = 0) -> None:
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            click.echo(" " * indent + f"{key}:")
            _print_tree(value, indent + 2)
        else:
            click.echo(
                " " * indent
                + f"{key}: {json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value}"
            )


@main.command()
@click.option(
    "--collection",
    "-c",
    envvar="M3SEARCH_COLLECTION",
    show_envvar=True,
    default=None,
    type=click.Path(file_okay=False),
    help="Collection to serve (without one: embeddings only).",
)
@model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option(
    "--api-key",
    envvar="M3SEARCH_API_KEY",
    show_envvar=True,
    default=None,
    help="Require this key (Authorization: Bearer KEY or X-API-Key) on every route but /health.",
)
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(1), help="Most texts per request.")
@click.option("--max-body-mb", default=16.0, show_default=True, type=click.FloatRange(0.001), help="Largest body.")
@dtype_option
@device_option
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(collection, model, host, port, api_key, max_batch, max_body_mb, dtype, device, log_level):
    """Serve the HTTP API (OpenAPI docs at /docs) until Ctrl-C."""
    with _errors():
        if collection is None and model is None:
            model = DEFAULT_MODEL
        if collection is not None:
            record = _server_record(Path(collection))
            if record is not None:
                raise click.ClickException(
                    f"collection {collection} is already served by process {record.get('pid')} at {record.get('url')}"
                )
            if not Path(collection).is_dir():
                raise click.ClickException(f"collection {collection} does not exist (create it with `m3search index`)")
        from .engines.base import CollectionInUseError
        from .server import Settings
        from .server import serve as run_server

        settings = Settings(
            collection=collection,
            model=model,
            device=device,
            dtype=dtype,
            api_key=api_key,
            max_batch=max_batch,
            max_body_bytes=int(max_body_mb * (1 << 20)),
        )
        what = f"collection {collection}" if collection else f"model {model}"

        def ready(url: str) -> None:
            click.echo(f"m3search: serving {what} at {url} (docs at {url}/docs)", err=True)

        try:
            run_server(settings, host=host, port=port, log_level=log_level, on_ready=ready)
        except CollectionInUseError as exc:
            raise click.ClickException(str(exc)) from None


@main.command("eval")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@model_option
@click.option("--modes", default=",".join(MODES), show_default=True, help="Comma-separated modes.")
@click.option("--fusion", default="weighted", show_default=True, type=click.Choice(FUSIONS))
@click.option(
    "--weights", default=None, callback=_parse_weights, help="dense,sparse,colbert weights [default: 0.4,0.2,0.4]."
)
@click.option(
    "--candidates",
    default=200,
    show_default=True,
    type=click.IntRange(1),
    help="Dense and sparse candidates per query in re-ranking modes (the paper re-ranks the dense top-200).",
)
@dtype_option
@device_option
@click.option(
    "--queries",
    "queries_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Take queries (and qrels) from this BEIR folder: cross-lingual runs.",
)
@click.option("--k", "-k", default=10, show_default=True, type=click.IntRange(1), help="Cutoff of nDCG and MRR.")
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Report folder [default: ./m3search-eval/<dataset>].",
)
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Index cache [default: $M3SEARCH_CACHE_DIR/eval or ~/.cache/m3search/eval].",
)
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Texts per encoder batch.")
@json_option
def eval_(
    data_dir,
    model,
    modes,
    fusion,
    weights,
    candidates,
    dtype,
    device,
    queries_dir,
    k,
    out_dir,
    cache_dir,
    batch_size,
    as_json,
):
    """Evaluate every mode on a BEIR folder: nDCG@k, Recall@100, MRR@k as table, JSON, Markdown and PNG."""
    with _errors():
        from .eval import evaluate, format_table, write_reports

        results = evaluate(
            data_dir,
            model=model,
            modes=modes,
            fusion=fusion,
            weights=weights,
            candidates=candidates,
            dtype=dtype,
            device=device,
            queries_dir=queries_dir,
            k=k,
            cache_dir=cache_dir,
            batch_size=batch_size,
        )
        if out_dir is None:
            slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in results["dataset"].replace(" -> ", "--"))
            out_dir = Path("m3search-eval") / slug
        paths = write_reports(results, out_dir)
    results["reports"] = {k_: str(v) for k_, v in paths.items()}
    if as_json:
        _emit(results)
    else:
        click.echo(format_table(results))
        click.echo(f"reports: {', '.join(str(p) for p in paths.values())}", err=True)


if (Path(__file__).with_name("migrate.py")).exists():

    @main.command()
    @click.argument("src")
    @click.argument("dst")
    @click.option(
        "--batch-size",
        default=256,
        show_default=True,
        type=click.IntRange(1),
        help="Documents per read and per atomic write.",
    )
    @json_option
    def migrate(src, dst, batch_size, as_json):
        """Copy the collection SRC to a new one at DST without re-encoding (folders or engine URLs).

        Examples: runs/cran -> qdrant://localhost:6333/cran, runs/cran -> runs/cran.db (Milvus Lite).
        """
        with _errors():
            for end in (src, dst):
                record = _server_record(Path(end))
                if record is not None:
                    raise click.ClickException(
                        f"collection {end} is served by process {record.get('pid')} at {record.get('url')}; "
                        "migrate opens the folder itself: stop that server (Ctrl-C, or kill "
                        f"{record.get('pid')}), run migrate, then serve again"
                    )
            from .migrate import migrate as run_migrate

            out = run_migrate(src, dst, batch_size=batch_size)
        out = _plain(out) if isinstance(out, dict) else {"result": _plain(out)}
        if as_json:
            _emit(out)
        else:
            _print_tree(out)


if __name__ == "__main__":  # pragma: no cover
    main()
