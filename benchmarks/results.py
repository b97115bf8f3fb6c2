"""Writing one benchmark's section of RESULTS.md without touching the others' sections."""

from __future__ import annotations

from pathlib import Path

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
