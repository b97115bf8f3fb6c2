"""The ``m3search`` command: index, search, serve, eval, tune, finetune, info, delete (and migrate, recover).

A thin shell over the library (datasette's rule): options are parsed here, the work is
done by :mod:`m3search.collection`, :mod:`m3search.server` and :mod:`m3search.eval`, each
imported only when its command runs, so ``m3search --help`` starts fast.

Output: human-readable text on stdout, progress bars on stderr, and with ``--json``
exactly one JSON object on stdout. Errors end the command with one ``Error: ...`` line on
stderr (exit code 1; 2 for a bad option) instead of a traceback, and with ``--json`` also
``{"error": {"type", "message", "exit_code"}}`` on stdout; set ``M3SEARCH_DEBUG=1`` to see the
traceback. Standard output that cannot be written (a full disk, ``> /dev/full``) is one ``Error: cannot write
the output: ...`` line; a reader that went away (``| head -1``) ends the command quietly, as click does (exit 1).

One process owns an embedded collection. While ``m3search serve`` holds one, it records
its address in ``<collection>/server.json``; ``search``, ``index``, ``delete`` and ``info``
then go through that server over HTTP, or say which process holds the collection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from . import serverfile
from .filters import parse_filter
from .plan import (
    DEFAULT_CANDIDATES,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SEARCH_TIMEOUT,
    DEFAULT_SERVER_MAX_K,
    ENCODER_DTYPES,
    FUSIONS,
    GROUPS,
    MAX_CANDIDATES,
    MAX_K,
    PRESETS,
    check_api_key,
    check_device,
    check_dtype,
    check_group,
    check_limit,
    check_mode_total,
    check_weights,
    parse_mode,
    timeout_fault,
)
from .sources import QUERY_FORMATS, STDIN, STREAM_FORMATS

DEFAULT_MODEL = "BAAI/bge-m3"


# ---------------------------------------------------------------------------------------------- helpers


def _debug() -> bool:
    """Whether ``M3SEARCH_DEBUG`` asks for tracebacks: set and not 0 / false / no / off (``=0`` turned them on)."""
    return os.environ.get("M3SEARCH_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into a one-line ClickException (M3SEARCH_DEBUG=1 re-raises)."""
    try:
        yield
    except (click.ClickException, click.Abort, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if _debug():
            raise
        message = " ".join((str(exc) or type(exc).__name__).split())  # one line, whatever the library said
        if not isinstance(exc, (ValueError, TypeError, OSError, ImportError, RuntimeError, LookupError)):
            message = f"{type(exc).__name__}: {message} (set M3SEARCH_DEBUG=1 for the traceback)"
        raise click.ClickException(message) from None


class _OutputError(click.ClickException):
    """Standard output could not be written. A closed pipe (``| head -1``: the reader has what it wanted) is said
    by the exit status alone, 1, as click itself and Python's documentation (the SIGPIPE note of :mod:`signal`)
    end a command; dying by SIGPIPE as C tools do (141 in a shell) would skip closing the collection."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write the output: {exc.strerror or exc}")
        self.quiet = isinstance(exc, BrokenPipeError)

    def show(self, file: Any = None) -> None:
        if not self.quiet:
            super().show(file)


class _Stdout:
    """Standard output while a command runs: a write or flush that fails raises :class:`_OutputError` (for every
    command, here; it was a traceback, or "Error: [Errno 32] Broken pipe"), and so does every one
    after it: click's own probe of the stream (a write of "") swallows the first. The file descriptor then points
    at /dev/null, so Python's flush at exit does not meet the broken output again.

    Its ``buffer`` is guarded alike, sharing the failure: click writes the text of an ASCII standard output
    (``PYTHONIOENCODING=ascii``, a C locale) as UTF-8 to the buffer, which went past this guard (output lost with
    exit 0, or a traceback). No ``__weakref__`` slot: click caches the stream it writes to in a
    WeakKeyDictionary whose value is that stream itself, an entry that never dies, so the wrapper (with the
    failure's traceback, the command's frames) outlived the command; unreferenceable weakly, it is not cached."""

    __slots__ = ("_stream", "_failed")

    def __init__(self, stream: Any, failed: list[OSError] | None = None) -> None:
        self._stream = stream
        self._failed: list[OSError] = [] if failed is None else failed  # the first failure, shared with buffer's

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @property
    def buffer(self) -> _Stdout:
        return _Stdout(self._stream.buffer, self._failed)

    def write(self, data: Any) -> int:
        return self._guarded(self._stream.write, data)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, call: Callable[..., Any], *args: Any) -> Any:
        if not self._failed:
            try:
                return call(*args)
            except OSError as exc:
                self._failed.append(exc.with_traceback(None))
                with contextlib.suppress(OSError, ValueError):  # no descriptor (a test's stream): nothing to move
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, self._stream.fileno())
                    os.close(devnull)
        raise _OutputError(self._failed[0]) from None


class _Main(click.Group):
    """The command group; with ``--json`` among the arguments, an error is also a JSON object on stdout."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        stdout = sys.stdout
        if stdout is not None:  # closed (>&-): click writes nothing, as without the guard (it was a traceback)
            sys.stdout = _Stdout(stdout)
        try:
            return super().main(*args, **kwargs)
        finally:
            sys.stdout = stdout

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["m3search.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            kind = "usage" if exc.exit_code == 2 else "error"  # the type follows the code (finetune's bad input)
            _emit_error(ctx, {"type": kind, "message": exc.format_message(), "exit_code": exc.exit_code})
            raise
        except (click.Abort, KeyboardInterrupt):  # Ctrl-C: click says "Aborted!" and exits 1
            _emit_error(ctx, {"type": "error", "message": "interrupted", "exit_code": 1})
            raise


def _emit_error(ctx: click.Context, error: dict[str, Any]) -> None:
    """With ``--json``, the error as the one JSON object on stdout too. Where stdout cannot be written, the error
    itself (a usage error, exit 2) still ends the command, said on stderr, not the output's failure."""
    if ctx.meta.get("m3search.json"):
        with contextlib.suppress(_OutputError):
            _emit({"error": error})


def _emit(obj: dict[str, Any]) -> None:
    """The single JSON object that ``--json`` promises on stdout."""
    click.echo(json.dumps(obj, ensure_ascii=False))


def _refuse_served(command: str, *collections: str | None) -> None:
    """Commands that open a collection themselves (no HTTP route does their work) stop at a served one with
    what to do: the lock's own "in use by process N ... send requests to it" named the server as if it
    could take them."""
    for end in collections:
        record = None if end is None else _answering(end)
        if record is not None:
            raise click.ClickException(
                f"collection {end} is served by process {record.get('pid')} at {record.get('url')}; "
                f"{command} opens the collection itself: stop that server (Ctrl-C, or kill "
                f"{record.get('pid')}), run {command}, then serve again"
            )


def _checked(check: Callable[[Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """A click callback: the option's value, when given, through one of the library's own checks, whose refusal
    is a usage error naming the option (exit 2, as click's own checks are). `eval --modes foo`, `tune --metric
    foo`, `search --k 20000` and a filter's unknown operator exited 1, some once a model was loaded or a
    collection opened. The value goes on as given (the library checks it again where it is used)."""

    def callback(ctx: Any, param: Any, value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except (TypeError, ValueError) as exc:
                raise click.BadParameter(" ".join(str(exc).split())) from None
        return value

    return callback


def _not_empty(ctx: Any, param: Any, value: Any) -> Any:
    """A click callback refusing an empty location, folder or file (a usage error naming the option): ``Path("")``
    is the current folder, so ``-c ""`` created a collection in it and ``--out ""`` wrote there."""
    if value == "":
        raise click.BadParameter("must not be empty ('.' names the current folder)")
    return value


def _api_key(ctx: click.Context, param: click.Parameter, key: str | None) -> str | None:
    """``--api-key`` or its variable: a key no client can send (blank, not printable ASCII) is a usage error naming
    both (serve: it was exit code 1; the other commands sent ``Bearer  ``). :func:`~m3search.plan.check_api_key`."""
    if key is not None:
        try:
            check_api_key(key)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return key


#: ``--k`` and ``--candidates``: the library's limits (a server may set lower ones, which it says).
_k_limit = _checked(functools.partial(check_limit, "k", limit=MAX_K))
_candidates_limit = _checked(functools.partial(check_limit, "candidates", limit=MAX_CANDIDATES))


def _eval_modes(value: str) -> None:
    from .eval import check_modes  # (the command imports it anyway; --help does not)

    check_modes(value)


def _tune_metric(value: str) -> None:
    from .tuning import parse_metric

    parse_metric(value)


def _parse_weights(ctx: Any, param: Any, value: str | None) -> tuple[float, float, float] | None:
    """click callback: '0.4,0.2,0.4' -> (0.4, 0.2, 0.4), by the library's rule (:func:`~m3search.plan.check_weights`)."""
    if value is None:
        return None
    try:
        weights = tuple(float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three comma-separated numbers, got {value!r}") from None
    return _checked(check_weights)(ctx, param, weights)


class _FiniteRange(click.FloatRange):
    """click's FloatRange refusing nan and inf: every comparison with nan is false, so the range let it through
    (``serve --timeout nan`` failed later without naming the option, ``--max-body-mb inf`` with an OverflowError)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _timeout(ctx: Any, param: Any, seconds: float) -> float:
    """``serve --timeout`` / ``--request-timeout``: a usage error naming the option unless the server takes it (the
    batcher's rule, :func:`~m3search.plan.timeout_fault`; one over its bound stopped the server, exit 1)."""
    if wrong := timeout_fault(seconds):
        raise click.BadParameter(f"{seconds:g} {wrong}")
    return seconds


_MIB = 1 << 20


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
            text = Path(value[1:]).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise click.BadParameter(f"cannot read filter file {value[1:]!r}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise click.BadParameter(f"filter file {value[1:]!r} is not UTF-8 text (byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg} at char {exc.pos}): {text!r}") from None
    if not isinstance(obj, dict):
        raise click.BadParameter('a filter is a JSON object, e.g. \'{"lang": "en"}\'')
    return _checked(parse_filter)(ctx, param, obj)


# ---------------------------------------------------------------------------------------------- targets


def _check_served_model(
    served: dict[str, Any], model: str | None, dtype: str, device: str, where: str, recorded: str | None = None
) -> None:
    """``--model`` / ``--dtype`` / ``--device`` name how THIS process encodes; through a server they would be
    ignored silently (a served search in float32 "for exact scores" ran in the server's bf16), so a value the
    server does not match is an error. A folder is compared by identity; a Hub id with the name the server
    loaded or the one the collection recorded (a server loads a Hub model from its local snapshot folder), and by
    weights fingerprint where the server reports one (the identity leaves the transformer weights out)."""
    if model:
        from .encoder import model_identity, weights_fingerprint

        if Path(model).is_dir() and (Path(model) / "config.json").is_file():
            recorded_weights = served.get("weights_fingerprint")  # None: a server from before fingerprints
            same = model_identity(model) == served.get("identity") and (
                recorded_weights is None or recorded_weights == weights_fingerprint(model)
            )
        else:
            same = model in (served.get("name_or_path"), recorded)
        if not same:
            raise click.ClickException(
                f"{where} with model {served.get('name_or_path')}, not {model}: stop the server to use another model "
                "here, or leave --model out (M3SEARCH_MODEL too)"
            )
    for name, asked, actual in (("dtype", dtype, served.get("dtype")), ("device", device, served.get("device"))):
        if asked not in (None, "auto") and not str(actual).startswith(asked):
            raise click.ClickException(
                f"{where} with {name} {actual}; --{name} {asked} applies to a collection opened here: stop the "
                f"server, or leave --{name} out"
            )


def _answering(collection: str, api_key: str | None = None) -> dict[str, Any] | None:
    """The record of a server running for ``collection``, or None. A record whose pid is alive but where
    nobody listens is stale (the server was killed with -9 and its pid reused, e.g. pid 1 in a container);
    whatever opens the collection next finds out from its lock whether a process still holds it. The server's
    ``GET /info`` names the collection it serves; it is asked with ``api_key``. A server that needs another key
    answers 401 (it was believed, unchecked: a stale record whose port another keyed server had taken kept
    migrate and serve out of a free collection); then the collection's lock tells whether a process serves it."""
    record = serverfile.live(collection)
    if record is None:
        return None
    import httpx

    try:
        httpx.get(f"{record.get('url')}/health", timeout=httpx.Timeout(5.0))
    except (httpx.ConnectError, httpx.ConnectTimeout):
        return None
    except httpx.HTTPError:  # listening but slow (loading its model): a server
        return record
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{record.get('url')}/info", headers=headers, timeout=httpx.Timeout(5.0))
        served = answer.json().get("collection_identity") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return record
    if answer.status_code == 401:
        return record if serverfile.held(collection) else None
    return None if answer.status_code == 200 and _serves_another(record, served, collection) else record


def _serves_another(record: dict[str, Any], served: Any, collection: str) -> bool:
    """Whether the server at a record's address serves another collection than ``collection`` (``served``: its
    ``GET /info`` ``collection_identity``). The record matched the collection (serverfile.live), but after a
    kill -9 its pid and its port can both be reused, the port by another m3search serve. A record from before
    records named their collection (its server's /info names none) was vouched for by the held lock."""
    return "identity" in record and served != serverfile.identity(collection)


class _Local:
    """The collection opened in this process."""

    via = "local"

    def __init__(self, collection: Any):
        self.collection = collection

    def search(self, query: str, **kwargs: Any) -> list[dict]:
        return [h.to_dict() for h in self.collection.search(query, **kwargs)]

    def search_batch(self, queries: list[str], **kwargs: Any) -> list[list[dict]]:
        return [[h.to_dict() for h in hits] for hits in self.collection.search_batch(queries, **kwargs)]

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
        return self.collection.info()

    def close(self) -> None:
        self.collection.close()


class _Remote:
    """A collection held by a running ``m3search serve``, reached over HTTP through the library's
    :class:`~m3search.client.M3SearchClient` (one HTTP client in the package: its writes are cut under the
    server's count and body limits, busy answers are asked again, and its errors name the server)."""

    def __init__(self, record: dict[str, Any], api_key: str | None):
        from .client import M3SearchClient

        self.url = record["url"]
        self.pid = record.get("pid")
        self.client = M3SearchClient(self.url, api_key=api_key)
        self.via = f"server {self.url} (pid {self.pid})"
        self.limits: dict[str, Any] = {}
        self.collection_identity: Any = None

    def search(self, query: str, **kwargs: Any) -> list[dict]:
        return [h.to_dict() for h in self.client.search(query, **kwargs)]

    def search_batch(self, queries: list[str], **kwargs: Any) -> list[list[dict]]:
        return [[h.to_dict() for h in hits] for hits in self.client.search_batch(queries, **kwargs)]

    def upsert(self, records: Sequence[Any]) -> None:
        self.client.upsert(
            [r.text for r in records], ids=[r.id for r in records], metadata=[r.metadata for r in records]
        )

    def delete(self, ids: Sequence[str]) -> dict:
        return self.client.delete(list(ids))

    def info(self) -> dict:
        out = self.client.info()
        self.limits, self.model = out.get("limits") or {}, out.get("model") or {}
        self.collection_identity = out.get("collection_identity")
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
    for unit, limit, setting in dict.fromkeys((m.unit, m.max_length, m.setting) for m in cut):
        count = sum(m.count for m in cut if (m.unit, m.max_length, m.setting) == (unit, limit, setting))
        _note(
            f"Warning: {count} of {tally['documents']} documents exceeded {setting}={limit} {unit}; "
            f"only their first {unit} are indexed"
        )


@contextlib.contextmanager
def _interrupts() -> Iterator[Callable[[], None]]:
    """Ctrl-C (and a plain ``kill``, SIGTERM) in the block raise KeyboardInterrupt, and are also recorded: the
    yielded check raises it again where Python swallowed it. Raised inside a ``__del__`` ("Exception ignored in
    ..."), Ctrl-C let ``index`` run on to the end and exit 0; SIGTERM ended the process at once, leaving standard
    input's temporary copy behind and saying nothing of what was written. Only signals at their default handler
    (not ignored, not taken by the caller), in the main thread; restored after."""
    seen: list[int] = []

    def check() -> None:
        if seen:
            raise KeyboardInterrupt

    def record(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    ours = (
        [sig for sig, default in defaults.items() if signal.getsignal(sig) is default]
        if threading.current_thread() is threading.main_thread()
        else []
    )
    previous = {sig: signal.signal(sig, record) for sig in ours}
    try:
        yield check
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _source_path(
    source: str, fmt: str | None, what: str = "SOURCE", formats: Sequence[str] = STREAM_FORMATS
) -> Iterator[str | Path]:
    """``what`` (SOURCE) as a path that can be read twice: standard input (``-``, read as ``fmt``, one of
    ``formats``) spooled to a temporary file for the block (:func:`~m3search.sources.spooled`). A terminal is read
    as any pipe, to its end, after a line on stderr saying so (the command seemed to hang); a closed standard input
    (``<&-``) is said to be one (click's "Was not able to determine binary stream for sys.stdin" did not). SIGTERM
    stops the block as Ctrl-C does (:func:`_interrupts`): `search --queries -` left its copy behind."""
    if source != STDIN:
        if fmt is not None:
            raise click.UsageError(f"--format applies to standard input ({STDIN}) only: a file's suffix says its type")
        yield source
        return
    if fmt is None:
        raise click.UsageError(f"{what} {STDIN} (standard input) needs --format {'|'.join(formats)}")
    if sys.stdin is None:
        raise click.ClickException(f"{what} {STDIN} reads standard input, which is closed")
    from .sources import spooled

    with _interrupts(), click.open_file(STDIN, "rb") as stream:  # a plain `kill` too removes the copy
        if stream.isatty():
            _note(f"reading {fmt} from the terminal ({what} {STDIN}); end it with Ctrl-D")
        with spooled(stream, fmt, formats) as path:
            yield path


def _written(n: int, pending: int, source: str) -> str:
    """What a stopped write pass wrote: records 1..n whole; of the ``pending`` next ones (the batch being written
    when it stopped: the engine may have stored part of it, or all, before the error or Ctrl-C) perhaps some."""
    name = "standard input" if source == STDIN else source
    if not pending:
        return f"the first {n} records of {name} were written" if n else "nothing was written"
    if not n:
        return f"perhaps some of the first {pending} records of {name} were written"
    return f"the first {n} records of {name} were written, and perhaps some of the next {pending}"


def _open_target(
    collection: str,
    *,
    model: str | None,
    api_key: str | None,
    create: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    settings: dict[str, Any] | None = None,
):
    """This collection's server if one runs, else the collection opened here (created if ``create``,
    with ``settings``; an existing collection whose settings differ from them is an error)."""
    record = serverfile.live(collection)
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
    if record is not None and record.get("api_key_required") and not serverfile.held(collection):
        # A keyed server answers only the right key which collection it serves; nobody holding the lock
        # means the record is stale (its port reused by another keyed server), whatever key this command has.
        not_answering = f"m3search serve at {url} (pid {pid}) is not this collection's server (its lock is free)"
        record = None
    if record is not None:
        if record.get("api_key_required") and not api_key:
            raise click.ClickException(
                f"collection {collection} is served by process {pid} at {url}, which needs an API key: "
                "pass --api-key or set M3SEARCH_API_KEY"
            )
        target = _Remote(record, api_key)
        info = target.info()
        if _serves_another(record, target.collection_identity, collection):  # nothing is sent to it
            target.close()
            not_answering = f"the server at {url} (pid {pid}) serves another collection"
        else:
            recorded = (info.get("model") or {}).get("name_or_path")  # the collection's manifest record
            where = f"collection {collection} is served by process {pid}"
            _check_served_model(target.model, model, dtype, device, where, recorded)
            _check_settings(_fixed(info.get("settings"), info.get("schema")), settings, collection)
            return target
    from . import Collection
    from .errors import CollectionExistsError, CollectionInUseError, CollectionNotFoundError

    try:
        col = Collection.open(collection, model=model, device=device, dtype=dtype)
    except CollectionNotFoundError:
        if not create:
            raise
    except CollectionInUseError as exc:
        raise click.ClickException(f"{exc}" + (f"; {not_answering}" if not_answering else "")) from None
    else:
        try:
            _check_settings(_fixed(col.settings, col.schema.to_dict()), settings, collection)
        except BaseException:
            col.close()
            raise
        return _Local(col)
    try:
        col = Collection.create(
            collection, model=model or DEFAULT_MODEL, device=device, dtype=dtype, **(settings or {})
        )
    except CollectionExistsError as exists:
        if not Collection.exists(collection):  # a folder of other files: said as create says it
            raise
        # created by another process since the open above (two `index` at once): "a collection already exists"
        # failed this one; it is opened as any existing one (in use while that process holds it). What an
        # interrupted create left on a server (no manifest: "not found" to open) keeps create's message, which
        # says how to remove it.
        try:
            return _open_target(collection, model=model, api_key=api_key, device=device, dtype=dtype, settings=settings)
        except CollectionNotFoundError:
            raise exists from None
    return _Local(col)


def _fixed(settings: dict[str, Any] | None, schema: dict[str, Any] | None) -> dict[str, Any]:
    """What a collection fixed at creation: its settings and its ColBERT layout."""
    from .migrate import layout_of

    return {**(settings or {}), **layout_of(schema or {})}


def _check_settings(have: dict[str, Any], want: dict[str, Any] | None, collection: str) -> None:
    """Settings fixed at creation (window, stride, max_windows, the ColBERT layout) cannot change on an
    existing collection."""
    differ = {k: v for k, v in (want or {}).items() if have.get(k) != v}
    if differ:
        now = ", ".join(f"{k}={have.get(k)}" for k in differ)
        raise click.UsageError(
            f"collection {collection} exists with {now}; these are set when a collection is created "
            "(index into a new collection to use other values; `m3search migrate` converts a layout)"
        )


# ---------------------------------------------------------------------------------------------- commands


#: Help of every --collection: a location is a folder or an engine URL, so it is a plain string (click.Path
#: would turn qdrant://host/name into the folder qdrant:/host/name and refuse an existing Milvus Lite file).
COLLECTION_HELP = "Collection: a folder, qdrant://host:port/name, milvus://host:port/name or a Milvus Lite file.db."

collection_option = click.option(
    "--collection",
    "-c",
    required=True,
    callback=_not_empty,
    envvar="M3SEARCH_COLLECTION",
    show_envvar=True,
    metavar="LOCATION",
    help=COLLECTION_HELP,
)
model_option = click.option(
    "--model",
    "-m",
    callback=_not_empty,
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
    callback=_api_key,
    help="API key of a running server (used when the collection is served).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
split_option = click.option(
    "--split",
    default="test",
    show_default=True,
    help="Judgements used: qrels/<SPLIT>.tsv (or .tsv.gz) of the BEIR folder (e.g. dev).",
)
queries_option = click.option(
    "--queries",
    "queries_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Take queries (and qrels) from this BEIR folder: cross-lingual runs.",
)
cache_dir_option = click.option(
    "--cache-dir",
    default=None,
    callback=_not_empty,
    type=click.Path(file_okay=False),
    help="Index cache [default: $M3SEARCH_CACHE_DIR/eval or ~/.cache/m3search/eval].",
)
dtype_option = click.option(
    "--dtype",
    envvar="M3SEARCH_DTYPE",
    show_envvar=True,
    default="auto",
    show_default=True,
    type=click.Choice(["auto", *ENCODER_DTYPES]),
    callback=lambda ctx, param, dtype: check_dtype(dtype),  # torch's name on (bf16: bfloat16), as a server reports it
    help="Encoder dtype (auto: fp16 on CUDA, bf16 on CPUs with bf16 units, else fp32; float32 for exact scores).",
)
device_option = click.option(
    "--device",
    envvar="M3SEARCH_DEVICE",
    show_envvar=True,
    default="auto",
    show_default=True,
    callback=_checked(check_device),  # not first when the model loads
    help="Encoder device (auto, cpu, cuda, cuda:1, ...).",
)


def layout_options(f: Any) -> Any:
    """``--colbert-dtype``, ``--colbert-quantization``, ``--[no-]colbert-rescore``, ``--colbert-pool-factor``,
    ``--colbert-in-ram/--colbert-on-disk``, handed to the command as one ``layout`` (:func:`_layout_settings`),
    checked before the command runs."""

    @functools.wraps(f)
    def command(**params: Any) -> Any:
        given = {name: params.pop(name) for name in list(params) if name.startswith("colbert_")}
        return f(**params, layout=_layout_settings(**given))

    options = [
        click.option(
            "--colbert-dtype",
            default=None,
            help="ColBERT storage type: float32 (exact), float16 (lossless in practice) or a lossy codec turbo16 / "
            "turbo8 / turbo4 (Qdrant only) [default: turbo8 on the embedded engine, float16 on a Qdrant server and "
            "Milvus].",
        ),
        click.option(
            "--colbert-quantization",
            default=None,
            help="A quantized copy of the token vectors in RAM, scored first (Qdrant only): binary1, binary1.5, "
            "binary2, turbo1, turbo1.5, turbo2, turbo4, turbo8, int8, pq4-pq64; 'none' for no copy [default: none].",
        ),
        click.option(
            "--colbert-rescore/--no-colbert-rescore",
            default=None,
            help="With a quantized copy: rescore candidates on the stored vectors [default: rescore].",
        ),
        click.option(
            "--colbert-pool-factor",
            default=None,
            type=click.IntRange(1),
            help="Token pooling: keep ceil(n / factor) vectors per document (1: every token) [default: 1].",
        ),
        click.option(
            "--colbert-in-ram/--colbert-on-disk",
            "colbert_in_ram",
            default=None,
            help="Keep the token vectors in memory, read when the collection opens (Qdrant; first queries after a "
            "start are then not cold), or memory-map them from disk [default: on disk].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _layout_settings(colbert_in_ram: bool | None = None, **given: Any) -> dict[str, Any]:
    """The layout options that were given, checked by the library's rules (bad names: a usage error, exit 2);
    ``--colbert-in-ram/--colbert-on-disk`` is the setting ``colbert_on_disk`` said the other way round."""
    from .migrate import check_layout

    if colbert_in_ram is not None:
        given["colbert_on_disk"] = not colbert_in_ram
    layout = {k: v for k, v in given.items() if v is not None}
    if str(layout.get("colbert_quantization", "")).lower() == "none":
        layout["colbert_quantization"] = None
    try:
        return check_layout(layout)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="m3search", prog_name="m3search")
def main() -> None:
    """BGE-M3 hybrid retrieval: dense + sparse + ColBERT from one forward pass, indexed, searched, fused."""
    # Warnings (e.g. truncated documents) as one "Warning: ..." line each, not Python's
    # two-line file:line form, which looks like a crash in a terminal.
    warnings.formatwarning = lambda message, *_args, **_kw: f"Warning: {message}\n"


@main.command()
@click.argument("source", type=click.Path(exists=True, allow_dash=True))
@collection_option
@model_option
@click.option(
    "--format",
    "fmt",
    default=None,
    type=click.Choice(STREAM_FORMATS),
    help=f"Format of standard input (SOURCE {STDIN}), plain or gzip (told by its first bytes); "
    "only for standard input: a file's suffix says its type.",
)
@click.option("--id-field", default=None, help="Id field (default: _id or id, else the record number).")
@click.option(
    "--text-field",
    "text_fields",
    multiple=True,
    help="Text field(s), joined with a space; repeat for several [default: title + text].",
)
@click.option(
    "--batch-size",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Documents handed to the collection at a time (through a server: per request, fewer where its limits "
    "need); the collection, not this option, sizes each write.",
)
@click.option(
    "--window",
    default=None,
    type=click.IntRange(8),
    help="New collection: tokens per window, specials included [default: the model's positions, or the collection's max_length when set lower].",
)
@click.option(
    "--stride",
    default=None,
    type=click.IntRange(1),
    help="New collection: tokens from one window's start to the next [default: window - min(128, window // 4)].",
)
@click.option(
    "--max-windows",
    default=None,
    type=click.IntRange(1),
    help="New collection: windows per document at most; 1 cuts long texts as before windows [default: all].",
)
@layout_options
@dtype_option
@device_option
@api_key_option
@json_option
def index(
    source,
    collection,
    model,
    fmt,
    id_field,
    text_fields,
    batch_size,
    window,
    stride,
    max_windows,
    layout,
    dtype,
    device,
    api_key,
    as_json,
):
    """Index SOURCE (JSONL or CSV/TSV, plain or gzip-compressed .gz; or a folder of .txt/.md) into the collection.

    JSONL: one object per line; a BEIR corpus.jsonl (_id, title, text) works as is. Creates the collection if needed; re-running upserts (same ids are overwritten).

    SOURCE - reads standard input, in the --format given; it is copied to a temporary file (under $TMPDIR, removed
    afterwards) since the source is read twice.

    The whole source is read and checked before the first write, so a bad record leaves the collection as it was.

    The --window/--stride/--max-windows and --colbert-* options apply to a new collection; given for an existing
    one, they must match what it was created with (`m3search migrate` converts a collection to another layout).
    """
    with _errors(), _interrupts() as interrupted, _source_path(source, fmt) as path:
        from tqdm import tqdm

        from .sources import check_source, count_records, iter_batches, read_source

        def records():
            return read_source(path, id_field=id_field, text_fields=list(text_fields) or None)

        t0 = time.perf_counter()
        check_source(records(), batch_size)  # pass 1: every record parsed and checked, none kept
        interrupted()
        fixed = {
            k: v for k, v in (("window", window), ("stride", stride), ("max_windows", max_windows)) if v is not None
        }
        target = _open_target(
            collection,
            model=model,
            api_key=api_key,
            create=True,
            device=device,
            dtype=dtype,
            settings={**fixed, **layout},
        )
        n = pending = 0  # records written whole / records of the batch being written
        try:
            if isinstance(target, _Remote):
                target.info()
                batch_size = _divisor_at_most(batch_size, int(target.limits.get("max_batch", batch_size)))
            with (
                tqdm(
                    total=count_records(path),
                    unit="doc",
                    desc="index",
                    file=sys.stderr,
                    disable=None,
                    dynamic_ncols=True,
                ) as bar,
                _truncation_summary() as tally,
            ):
                for batch in iter_batches(records(), batch_size):
                    interrupted()
                    pending = len(batch)
                    target.upsert(batch)
                    n, pending = n + pending, 0
                    tally["documents"] = n
                    bar.update(len(batch))
            total = target.count()
            interrupted()
        except (Exception, KeyboardInterrupt) as exc:  # pass 2 failed or was stopped: say what is in the collection
            if _debug():
                raise
            message = (
                "interrupted"
                if isinstance(exc, KeyboardInterrupt)
                else " ".join((str(exc) or type(exc).__name__).split())
            )
            from .errors import RequestTooLargeError

            # a document over the server's body limit fails the same way every time: running again cannot finish;
            # it is refused before any of its batch is sent
            too_large = isinstance(exc, RequestTooLargeError)
            again = (
                "that document never fits in a request to this server: serve with a larger --max-body-mb (or "
                "stop the server and index here), then run the same command again to finish"
                if too_large
                else "run the same command again to finish (it overwrites by id)"
            )
            done = _written(n, 0 if too_large else pending, source)
            raise click.ClickException(f"{message}; {done}; {again}") from None
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


#: Queries read, searched (encoded together) and written out at a time by ``search --queries``: memory holds one
#: batch's hits, whatever the number of queries.
QUERY_BATCH = 64


def _trec_word(value: str, what: str) -> str:
    """``value`` if it can be a column of a TREC run (columns are split at whitespace), else a ValueError naming it."""
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} cannot be a column of a TREC run (empty, or holds whitespace)")
    return value


@main.command()
@click.argument("query", required=False)
@click.option(
    "--queries",
    "queries_file",
    default=None,
    metavar="FILE",
    type=click.Path(exists=True, allow_dash=True),
    help="Search every query of FILE instead of QUERY: .txt (one query per line, id = line number) or BEIR's "
    f"queries.jsonl (_id, text) or its folder, plain or .gz; {STDIN}: standard input, in the --format given.",
)
@click.option(
    "--format",
    "fmt",
    default=None,
    type=click.Choice(QUERY_FORMATS),
    help=f"Format of standard input (--queries {STDIN}): txt, one query per line, or jsonl; plain or gzip.",
)
@click.option(
    "--trec",
    "run_name",
    default=None,
    metavar="RUN_NAME",
    callback=_checked(functools.partial(_trec_word, what="run name")),
    help="With --queries: print a TREC run (qid Q0 docid rank score RUN_NAME) for trec_eval or ranx.",
)
@collection_option
@model_option
@click.option(
    "--mode",
    default=None,
    callback=_checked(parse_mode),
    help=f"Search mode: {', '.join(PRESETS)}, or any '+'-joined modes (sparse+colbert) [default: the collection's, all].",
)
@click.option(
    "--fusion",
    default=None,
    type=click.Choice(FUSIONS, case_sensitive=False),
    help="Fusion method [default: the collection's, weighted].",
)
@click.option(
    "--k", "-k", default=10, show_default=True, type=click.IntRange(1), callback=_k_limit, help="Hits to return."
)
@click.option(
    "--weights",
    default=None,
    callback=_parse_weights,
    help="dense,sparse,colbert weights [default: the collection's, 0.4,0.2,0.4].",
)
@click.option(
    "--candidates",
    default=None,
    type=click.IntRange(1),
    callback=_candidates_limit,
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
@click.option(
    "--exact", is_flag=True, help="Find the dense candidates by a full scan, not the HNSW index (slower, misses none)."
)
@click.option(
    "--group",
    default="document",
    show_default=True,
    type=click.Choice(GROUPS),
    help="document: documents, each at its best window; passage: the best windows themselves.",
)
@dtype_option
@device_option
@api_key_option
@json_option
def search(
    query,
    queries_file,
    fmt,
    run_name,
    collection,
    model,
    mode,
    fusion,
    k,
    weights,
    candidates,
    filter_,
    explain,
    exact,
    group,
    dtype,
    device,
    api_key,
    as_json,
):
    """Search the collection for QUERY, or for each query of --queries FILE (in batches, each query with every
    option given; printed once all are searched: with --json as {"results": [{"id", "query", "hits"}, ...]})."""
    refused = (
        (fmt is not None and queries_file is None, f"--format applies to standard input (--queries {STDIN}) only"),
        (run_name is not None and queries_file is None, "--trec writes the run of --queries FILE"),
        (run_name is not None and as_json, "--trec and --json are two outputs: give one"),
        (run_name is not None and group == "passage", "--trec lists documents: --group passage gives passages"),
        (run_name is not None and explain, "a TREC run has no place for --explain's details: leave one out"),
    )
    if (query is None) == (queries_file is None):
        raise click.UsageError(
            "give QUERY or --queries FILE, not both" if query is not None else "missing QUERY (or --queries FILE)"
        )
    for bad, message in refused:
        if bad:
            raise click.UsageError(message)
    try:  # the library's checks of what the options decide alone (it failed them once the model was loaded)
        check_group(group, explain)
        if mode is not None and weights is not None:  # (else the collection's default decides)
            check_mode_total(weights, mode)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    options = {"k": k, "mode": mode, "fusion": fusion, "weights": weights, "candidates": candidates}
    options |= {"filter": filter_, "explain": explain, "exact": exact, "group": group}
    open_target = functools.partial(_open_target, collection, model=model, api_key=api_key, device=device, dtype=dtype)
    with _errors():
        if queries_file is not None:
            return _search_queries(open_target, queries_file, fmt, options, run_name=run_name, as_json=as_json)
        target = open_target()
        try:
            hits = target.search(query, **options)
        finally:
            target.close()
    if as_json:
        _emit({"hits": hits})
    else:
        click.echo("\n".join(_hit_lines(hits, group == "passage")))


def _search_queries(
    open_target: Callable[[], Any],
    source: str,
    fmt: str | None,
    options: dict[str, Any],
    *,
    run_name: str | None,
    as_json: bool,
) -> None:
    """``search --queries``: every query is read and checked first (ids unique, none empty, with ``--trec`` none
    holding whitespace: an error before the collection opens), then searched QUERY_BATCH at a time. The output waits in a temporary file until the last query is
    searched: ``--json`` stays one JSON object, and a failure part-way prints nothing (no run that looks whole)."""
    from tqdm import tqdm

    from .sources import check_source, iter_batches, read_queries

    name = "standard input" if source == STDIN else source
    with _source_path(source, fmt, "--queries", QUERY_FORMATS) as path:
        checked = read_queries(path)
        if run_name is not None:  # (an id that no TREC column can hold was found in the run, after searching)
            checked = (rec for rec in checked if _trec_word(rec.id, "query id"))
        n = check_source(checked, QUERY_BATCH, name)  # (index's wording, "in source", named no queries file)
        if not n:
            raise click.ClickException(f"{name} holds no query")
        target = open_target()
        try:
            with tempfile.TemporaryFile("w+", encoding="utf-8", newline="") as out:
                written = 0
                progress = None if n > QUERY_BATCH else True  # (None: a bar where stderr is a terminal)
                with tqdm(total=n, unit="query", desc="search", file=sys.stderr, disable=progress) as bar:
                    for batch in iter_batches(read_queries(path), QUERY_BATCH):
                        for rec, hits in zip(batch, target.search_batch([r.text for r in batch], **options)):
                            entry = _run_entry(rec.id, rec.text, hits, run_name, as_json, options["group"])
                            out.write(("," if as_json and written else "") + entry)
                            written += 1
                        bar.update(len(batch))
                out.seek(0)
                head, tail = ('{"results": [', "]}\n") if as_json else ("", "")
                click.echo(head, nl=False)
                for chunk in iter(lambda: out.read(1 << 16), ""):
                    click.echo(chunk, nl=False)
                click.echo(tail, nl=False)
        finally:
            target.close()


def _run_entry(qid: str, text: str, hits: list[dict], run_name: str | None, as_json: bool, group: str) -> str:
    """One query's part of ``search --queries``' output: a JSON object, its TREC lines, or its id, text and hits."""
    if as_json:
        return json.dumps({"id": qid, "query": text, "hits": hits}, ensure_ascii=False)
    if run_name is not None:
        return "".join(line + "\n" for line in trec_lines(qid, hits, run_name))
    head = _clip(f"query {qid}: {' '.join(text.split())}", WIDTH)
    return "\n".join([head, *_hit_lines(hits, group == "passage"), "", ""])


def trec_lines(qid: str, hits: Sequence[dict], run_name: str) -> list[str]:
    """One query's hits (``Hit.to_dict()`` form) as TREC run lines, ``qid Q0 docid rank score run_name``: rank from 1
    in the order returned, the score in full. (trec_eval orders by score itself, ties by document id descending.)"""
    qid = _trec_word(qid, "query id")
    return [
        f"{qid} Q0 {_trec_word(h['id'], 'document id')} {rank} {float(h['score'])!r} {run_name}"
        for rank, h in enumerate(hits, 1)
    ]


def _hit_lines(hits: Sequence[dict], passage: bool) -> list[str]:
    """A search's hits as terminal lines (:func:`format_hit`), or that there are none."""
    return [line for rank, h in enumerate(hits, 1) for line in format_hit(rank, h, passage=passage)] or ["no hits"]


#: Terminal output is laid out for this many columns.
WIDTH = 100
#: Matched tokens listed per hit in the terminal (``--json`` has them all).
SHOW_TOKENS = 8


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_hit(rank: int, hit: dict[str, Any], width: int = WIDTH, *, passage: bool = False) -> list[str]:
    """One hit (``Hit.to_dict()`` form) as terminal lines no wider than ``width``.

    Rank, fused score, id and the three exact scores; the text and metadata clipped to
    one line each (a long document's best window, or with ``passage`` the hit's passage, in brackets with its
    characters in the document); with ``explain``, a table of each mode's score, weight, contribution
    to the fused score and rank among the candidates, then the matched lexical tokens
    with their query and document weights (largest product first).
    """
    pad = " " * 5
    scores = "  ".join(f"{m} {v:.4f}" for m, v in (hit.get("scores") or {}).items() if v is not None)
    head = f"{rank:>3}. {hit['score']:.4f}  "
    lines = [_clip(head + str(hit["id"]), width - len(scores) - 2) + (f"  {scores}" if scores else "")]
    full, window = hit.get("text") or "", hit.get("window")
    if window and passage:  # the text is the window's own: its span is in the document
        where = f"  (chars {window['start']}-{window['end']})"
        lines.append(pad + "[" + _clip(" ".join(full.split()), width - len(pad) - len(where) - 2) + "]" + where)
    elif window and (window["start"] > 0 or window["end"] < len(full)):  # a long document: its best window
        where = f"  (chars {window['start']}-{window['end']} of {len(full)})"
        span = " ".join(full[window["start"] : window["end"]].split())
        lines.append(pad + "[" + _clip(span, width - len(pad) - len(where) - 2) + "]" + where)
    elif text := " ".join(full.split()):
        lines.append(pad + _clip(text, width - len(pad)))
    if hit.get("metadata"):
        lines.append(pad + _clip("metadata: " + json.dumps(hit["metadata"], ensure_ascii=False), width - len(pad)))
    ex = hit.get("explain")
    if not ex:
        return lines
    modes = ex.get("modes") or list(ex.get("contributions") or {})
    found = ", ".join(ex.get("found_by") or []) or "-"
    lines.append(
        f"{pad}{ex.get('fusion')} fusion of {len(modes)} mode(s) over {ex.get('candidates')} candidates;"
        f" found by {found}"
    )
    lines.append(f"{pad}  {'mode':<8} {'score':>8} {'weight':>7} {'contribution':>13} {'rank':>6}")
    for m in modes:
        score = (hit.get("scores") or {}).get(m)
        lines.append(
            f"{pad}  {m:<8} {'-' if score is None else format(score, '.4f'):>8} "
            f"{ex['weights'][m]:>7.2f} {ex['contributions'][m]:>13.4f} {ex['ranks'][m]:>6}"
        )
    lines.append(f"{pad}  {'fused':<8} {'':>8} {'':>7} {hit['score']:>13.4f}")
    tokens = ex.get("matched_tokens") or []
    if not tokens:
        lines.append(f"{pad}no lexical (sparse) token in common with the query")
        return lines
    lines.append(f"{pad}matched tokens (query weight x document weight = sparse contribution):")
    lines.append(f"{pad}  {'token':<20} {'query':>8} {'document':>9} {'product':>9}")
    for t in tokens[:SHOW_TOKENS]:
        lines.append(
            f"{pad}  {_clip(str(t['token']), 20):<20} {t['query_weight']:>8.4f} {t['doc_weight']:>9.4f}"
            f" {t['product']:>9.4f}"
        )
    if len(tokens) > SHOW_TOKENS:
        lines.append(f"{pad}  ... {len(tokens) - SHOW_TOKENS} more (--json lists all)")
    return lines


def _no_empty_id(ctx: Any, param: Any, ids: tuple[str, ...]) -> tuple[str, ...]:
    """click callback: an empty ID is refused before the collection opens. No document has one (``add`` refuses
    it), so it was reported as not found with a blank name ("deleted 0; not found: "); it is an empty shell
    variable, not an unknown id."""
    if "" in ids:
        raise click.BadParameter("an id is never empty (no document can have one)")
    return ids


@main.command()
@click.argument("ids", nargs=-1, required=True, callback=_no_empty_id)
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
@click.option("--id", "ids", multiple=True, metavar="ID", help="Only this document's marks (repeat for more).")
@click.option(
    "--force",
    is_flag=True,
    help="Clear live marks too. Only when their writer is known to be dead: a live write's document ends broken.",
)
@json_option
def recover(collection, ids, force, as_json):
    """List other clients' pending long writes and clear the stopped ones' marks and leftovers.

    On a Qdrant server or Milvus, a long write that crashed (kill -9, a machine lost) keeps its document from
    every other client's writes and deletes (409) until its lease runs out; --force clears it now."""
    with _errors():
        _refuse_served("recover", collection)
        from . import Collection

        with Collection.open(collection) as col:
            marks = col.recover(list(ids) or None, force=force)
    if as_json:
        _emit({"marks": marks})
        return
    for m in marks:
        state = "cleared" if m["cleared"] else "kept: may be a live write (--force clears it)"
        age = "?" if m["age_s"] is None else f"{m['age_s']:.0f} s"
        click.echo(f"{m['id']}  client {m['client']}  age {age}  {state}")
    if not marks:
        click.echo("no pending writes")


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
    callback=_not_empty,
    metavar="LOCATION",
    help=f"{COLLECTION_HELP} Served (without one: embeddings only).",
)
@model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option(
    "--api-key",
    envvar="M3SEARCH_API_KEY",
    show_envvar=True,
    default=None,
    callback=_api_key,
    help="Require this key (Authorization: Bearer KEY or X-API-Key) on every route but /health and the API docs (/docs, /redoc, /openapi.json).",
)
@click.option(
    "--max-batch",
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    type=click.IntRange(1),
    help="Most texts (or queries, documents, ids) per request (env var M3SEARCH_MAX_BATCH).",
)
@click.option(
    "--max-body-mb",
    "max_body_bytes",
    default=DEFAULT_MAX_BODY_BYTES / _MIB,
    show_default=True,
    type=_FiniteRange(0.001),
    callback=lambda ctx, param, mib: int(mib * _MIB),
    help="Largest request body, in MiB (env var M3SEARCH_MAX_BODY_BYTES: in bytes).",
)
@click.option(
    "--timeout",
    "search_timeout",
    default=DEFAULT_SEARCH_TIMEOUT,
    show_default=True,
    type=_FiniteRange(),
    callback=_timeout,
    help="Seconds a search may take; past it the work stops at its next stage and the answer is 504 (env var "
    "M3SEARCH_SEARCH_TIMEOUT).",
)
@click.option(
    "--request-timeout",
    default=DEFAULT_REQUEST_TIMEOUT,
    show_default=True,
    type=_FiniteRange(),
    callback=_timeout,
    help="Seconds a request may wait for its encoding to start; past it the answer is 503 with Retry-After (env var "
    "M3SEARCH_REQUEST_TIMEOUT).",
)
@click.option(
    "--max-queue",
    default=DEFAULT_MAX_QUEUE,
    show_default=True,
    type=click.IntRange(1),
    help="Most texts waiting for the encoder, all requests together; beyond it: 429 with Retry-After "
    "(env var M3SEARCH_MAX_QUEUE).",
)
@click.option(
    "--max-k",
    default=DEFAULT_SERVER_MAX_K,
    show_default=True,
    type=click.IntRange(1, MAX_K),
    help="Largest k a search may ask for; beyond it: 413 (env var M3SEARCH_MAX_K).",
)
@dtype_option
@device_option
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="uvicorn's log level: the least severe of its lines printed.",
)
def serve(host: str, port: int, log_level: str, **options: Any) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs) until Ctrl-C. Every option but where to listen and the log level
    is a server setting of the same name."""
    with _errors():
        from .errors import CollectionInUseError
        from .server import EnvironmentSettingError, Settings
        from .server import serve as run_server

        ctx = click.get_current_context()
        given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
        # the variables as `uvicorn --factory` reads them, under the options given (the variables click reads for
        # the options serve shares with the other commands, -c, -m, --api-key, --dtype, --device, only checked here)
        try:
            settings = Settings.from_env(**given)
        except EnvironmentSettingError as exc:
            raise click.UsageError(str(exc), ctx) from None
        if settings.collection is None and settings.model is None:
            settings = dataclasses.replace(settings, model=DEFAULT_MODEL)
        collection, model = settings.collection, settings.model
        if collection is not None:
            record = _answering(collection, settings.api_key)
            if record is not None:
                raise click.ClickException(
                    f"collection {collection} is already served by process {record.get('pid')} at {record.get('url')}"
                )
            from . import Collection

            if not Collection.exists(collection):  # the error every command gives for it: no collection, or why
                Collection.open(collection).close()
        what = f"collection {collection}" if collection else f"model {model}"

        def ready(url: str) -> None:
            _note(f"m3search: serving {what} at {url} (docs at {url}/docs)")

        try:
            served = run_server(settings, host=host, port=port, log_level=log_level, on_ready=ready)
        except CollectionInUseError as exc:
            raise click.ClickException(str(exc)) from None
        if not served:
            _note(f"m3search: stopped before serving {what}")


def _note(line: str) -> None:
    """A line on stderr beside a command's work. One that cannot be written (``2>/dev/full``) ends nothing: the
    server exited 1 before serving for its "serving at" line (uvicorn's log lines to stderr are dropped alike), an
    index whose documents were all written failed on its truncation warning ("run the same command again", to fail
    alike), and eval exited 1 on its "reports:" line once the reports were written."""
    with contextlib.suppress(OSError):
        click.echo(line, err=True)


@main.command("eval")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@model_option
@click.option(
    "--modes",
    default=",".join(PRESETS),
    show_default=True,
    callback=_checked(_eval_modes),
    help="Comma-separated modes.",
)
@click.option("--fusion", default="weighted", show_default=True, type=click.Choice(FUSIONS, case_sensitive=False))
@click.option(
    "--weights", default=None, callback=_parse_weights, help="dense,sparse,colbert weights [default: 0.4,0.2,0.4]."
)
@click.option(
    "--candidates",
    default=DEFAULT_CANDIDATES,
    show_default=True,
    type=click.IntRange(1),
    callback=_candidates_limit,
    help="Dense and sparse candidates per query in re-ranking modes (the paper re-ranks the dense top-200).",
)
@dtype_option
@device_option
@queries_option
@split_option
@click.option(
    "--k",
    "-k",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    callback=_k_limit,
    help="Cutoff of nDCG and MRR.",
)
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    callback=_not_empty,
    help="Report folder [default: ./m3search-eval/<dataset>].",
)
@cache_dir_option
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(1),
    help="Documents per encode and write while the index is built [default: the collection's batch_size].",
)
@click.option(
    "--max-windows",
    default=None,
    type=click.IntRange(1),
    help="Windows per document (1: cut long texts) [default: all].",
)
@click.option(
    "--collection",
    "-c",
    "tuned_collection",
    default=None,
    callback=_not_empty,
    metavar="LOCATION",
    help="Also evaluate this collection's search defaults (set by `m3search tune`) as the row 'tuned'.",
)
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
    split,
    k,
    out_dir,
    cache_dir,
    batch_size,
    max_windows,
    tuned_collection,
    as_json,
):
    """Evaluate every mode on a BEIR folder: nDCG@k, Recall@100, MRR@k as table, JSON, Markdown and PNG."""
    with _errors():
        _refuse_served("eval --collection", tuned_collection)
        from .eval import check_installed, evaluate, format_table, report_dir, write_reports

        check_installed()
        out_dir = report_dir(out_dir, data_dir, queries_dir)
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
            settings=None if max_windows is None else {"max_windows": max_windows},
            collection=tuned_collection,
            split=split,
        )
        paths = write_reports(results, out_dir)
    results["reports"] = {k_: str(v) for k_, v in paths.items()}
    if as_json:
        _emit(results)
    else:
        click.echo(format_table(results))
        _note(f"reports: {', '.join(str(p) for p in paths.values())}")


@main.command("tune")
@click.argument("data_dir", required=False, type=click.Path(exists=True, file_okay=False))
@queries_option
@click.option(
    "--collection",
    "-c",
    default=None,
    callback=_not_empty,
    metavar="LOCATION",
    help="Tune this collection (it must hold the judged documents) and store the setting as its search defaults "
    "[default: eval's cached index of DATA_DIR, nothing stored].",
)
@model_option
@click.option(
    "--metric", default="ndcg@10", show_default=True, callback=_checked(_tune_metric), help="ndcg@K, recall@K or mrr@K."
)
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2), help="Cross-validation folds.")
@split_option
@click.option(
    "--reset", is_flag=True, help="Restore --collection's search defaults from before its first tuning (no DATA_DIR)."
)
@dtype_option
@device_option
@cache_dir_option
@json_option
def tune_(data_dir, queries_dir, collection, model, metric, folds, split, reset, dtype, device, cache_dir, as_json):
    """Choose mode, fusion, weights and candidates from DATA_DIR's judged queries (BEIR), cross-validated.

    The tuned setting is adopted only when its cross-validated gain over the defaults is positive beyond the
    paired bootstrap's 95% interval; with --collection it becomes the defaults of every search that does not
    say otherwise (library, CLI, HTTP).
    """
    with _errors():
        _refuse_served("tune", collection)
        if reset:
            if collection is None or data_dir is not None:
                raise click.UsageError("--reset takes --collection and no DATA_DIR")
            from . import Collection

            with Collection.open(collection) as col:
                out = {**col.set_search_defaults(None), "reset": True, "collection": str(collection)}
        else:
            if data_dir is None:
                raise click.UsageError("missing DATA_DIR (a BEIR folder with queries.jsonl and qrels/test.tsv)")
            from .tuning import tune

            out = tune(
                data_dir,
                queries_dir=queries_dir,
                collection=collection,
                save=collection is not None,
                model=model,
                dtype=dtype,
                device=device,
                cache_dir=cache_dir,
                metric=metric,
                folds=folds,
                split=split,
            )
    if as_json:
        _emit(out)
    elif reset:
        click.echo(
            f"{collection}: search defaults reset to mode {out['mode']}, fusion {out['fusion']}, "
            f"weights {out['weights']}, candidates {out['candidates']}"
        )
    else:
        click.echo(out["summary"])
        stored = ""
        if out.get("saved"):
            stored = f" (stored as the search defaults of {collection})"
            if not out["adopted"]:
                stored = f" (not adopted: {collection} keeps its search defaults; this tuning is recorded)"
        click.echo(
            f"setting: mode {out['mode']}, fusion {out['fusion']}, weights {out['weights']}, "
            f"candidates {out['candidates']}{stored}"
        )


@main.command("finetune")
@click.argument("data", type=click.Path(exists=True))
@click.option(
    "--model",
    "-m",
    envvar="M3SEARCH_MODEL",
    show_envvar=True,
    default=DEFAULT_MODEL,
    show_default=True,
    callback=_not_empty,
    help="Base model name or folder (bge-m3's layout).",
)
@click.option(
    "--out", "-o", required=True, type=click.Path(), callback=_not_empty, help="New folder for the fine-tuned model."
)
@click.option(
    "--queries",
    "queries_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Take queries (and qrels) from this BEIR folder: cross-lingual training.",
)
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-5, show_default=True, type=_FiniteRange(min=0, min_open=True))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Queries per batch (at most).")
@click.option("--negatives", default=7, show_default=True, type=click.IntRange(0), help="Hard negatives per query.")
@click.option("--modes", default="dense,sparse,colbert", show_default=True, help="Modes to train (a subset).")
@click.option(
    "--holdout",
    default=0.0,
    show_default=True,
    type=_FiniteRange(0, 1, max_open=True),
    help="BEIR only: fraction of judged queries held out and scored before/after.",
)
@click.option(
    "--split",
    default=None,
    help="BEIR only: judgements trained on, qrels/<SPLIT>.tsv [default: train where qrels/train.tsv exists, else test].",
)
@click.option(
    "--token-budget",
    default=None,
    type=click.IntRange(1),
    help="Padded tokens per batch; a query whose passages alone exceed it is refused [default: 8192 on CPU, 32768 on GPU; a query over the default trains alone, with a warning].",
)
@click.option(
    "--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass: less memory, more time."
)
@dtype_option
@device_option
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    callback=_not_empty,
    help="Index cache (mining, held-out).",
)
@json_option
def finetune_(
    data,
    model,
    out,
    queries_dir,
    epochs,
    lr,
    batch_size,
    negatives,
    modes,
    holdout,
    split,
    token_budget,
    gradient_checkpointing,
    dtype,
    device,
    cache_dir,
    as_json,
):
    """Fine-tune a BGE-M3 model on DATA (a BEIR folder or FlagEmbedding JSONL) into --out, bge-m3's layout.

    Rerun the same command after an interruption to continue from the last checkpoint.
    """
    with _errors():
        from .finetune import FinetuneInputError, finetune, summary

        try:
            report = finetune(
                data,
                model=model,
                out=out,
                queries_dir=queries_dir,
                modes=modes,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                negatives=negatives,
                holdout=holdout,
                split=split,
                token_budget=token_budget,
                gradient_checkpointing=gradient_checkpointing,
                dtype=dtype,
                device=device,
                cache_dir=cache_dir,
            )
        except FinetuneInputError as exc:
            error = click.ClickException(" ".join(str(exc).split()))
            error.exit_code = 2  # bad input, found before training
            raise error from None
    if as_json:
        _emit({k: v for k, v in report.items() if k != "history"})
    else:
        click.echo("\n".join(summary(report)))


@main.command()
@click.argument("src", callback=_not_empty)
@click.argument("dst", callback=_not_empty)
@click.option(
    "--batch-size",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Documents per read of ids; vectors are copied in groups of at most ~256 MiB (PIECE_BYTES).",
)
@layout_options
@json_option
def migrate(src, dst, batch_size, layout, as_json):
    """Copy the collection SRC to a new one at DST without re-encoding (folders or engine URLs).

    Examples: runs/cran -> qdrant://localhost:6333/cran; runs/cran -> runs/cran.db --colbert-dtype float16
    (Milvus Lite, which has no turbo codecs).

    The --colbert-* options give DST another ColBERT layout, made from SRC's stored vectors (a layout is
    fixed at creation: migrate, check DST, then replace SRC with it). DST's manifest is written last, so an
    interrupted migration leaves no collection at DST and SRC unchanged.
    """
    with _errors():
        _refuse_served("migrate", src, dst)
        from .migrate import migrate as run_migrate

        out = run_migrate(src, dst, batch_size=batch_size, layout=layout)
    if as_json:
        _emit(out)
    else:
        _print_tree(out)


if __name__ == "__main__":  # pragma: no cover
    main()
