"""Generated sections of ``BENCHMARKS.md``: text between ``<!-- bench:NAME -->`` markers is replaced
by a benchmark's output, so tables are regenerated from results and never typed by hand, while the
prose around them stays as written."""

from __future__ import annotations

import re
from pathlib import Path

from probssl.io import atomic_write_text


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name must be letters, digits, '_', '.', '-', got {name!r}")
    return f"<!-- bench:{name} start (generated; do not edit) -->", f"<!-- bench:{name} end -->"


def replace_section(path: str | Path, name: str, body: str, heading: str | None = None) -> None:
    """Write ``body`` between the markers of section ``name`` in ``path``.

    A section that does not exist yet is appended at the end (under ``heading`` when given). The
    file is rewritten atomically, so an interrupted update never leaves half a table.
    """
    path = Path(path)
    start, end = _markers(name)
    text = path.read_text() if path.is_file() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        if end not in text.split(start, 1)[1]:
            raise ValueError(f"{path}: section {name!r} has a start marker but no end marker; fix the file")
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        prefix = f"\n{heading}\n\n" if heading else "\n"
        text = text.rstrip("\n") + "\n" + prefix + block + "\n"
    atomic_write_text(path, text)


def read_section(path: str | Path, name: str) -> str | None:
    """The body of section ``name``, or None when the file has no such section."""
    start, end = _markers(name)
    text = Path(path).read_text() if Path(path).is_file() else ""
    if start not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")
