"""Writing one benchmark's section of RESULTS.md without touching the others' sections."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(script: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace the ``<!-- script:start -->`` … ``<!-- script:end -->`` block (append it if absent)."""
    start, end = f"<!-- {script}:start -->", f"<!-- {script}:end -->"
    section = f"{start}\n## {title}\n\n{body}{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        after = after.lstrip("\n")
        text = before + section + ("\n" + after if after else "")  # keep one blank line before the next section
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def run_or_replay(args: Any, argv: list[str], run: Callable[[Any], dict]) -> dict:
    """Measure (``run(args)``, raw numbers saved to ``--json``) or reload a saved ``--report-from`` run.

    Why: a long measurement is run once; its report can be rebuilt later without re-measuring.
    """
    if getattr(args, "report_from", None):
        res = json.loads(Path(args.report_from).read_text())
        res.setdefault("argv", argv)
        return res
    res = run(args)
    res["argv"] = argv
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


def publish(script: str, title: str, text: str, *, no_write: bool, path: Path = RESULTS) -> None:
    """Print the report; unless ``no_write``, put it in this script's section of RESULTS.md."""
    print("\n" + text)
    if not no_write:
        write_section(script, title, text, path)
        print(f"[{script}] wrote {path.name}", file=sys.stderr)
