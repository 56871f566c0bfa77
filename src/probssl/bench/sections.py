"""Generated sections of ``BENCHMARKS.md``: text between ``<!-- bench:NAME -->`` markers is replaced
by a benchmark's output, so tables are regenerated from results and never typed by hand, while the
prose around them stays as written."""

from __future__ import annotations

import re
from pathlib import Path

from probssl.config import ConfigError
from probssl.io import atomic_write_text

_MARKER = re.compile(r"<!-- bench:(?P<rest>.*?)(?:-->|$)", re.MULTILINE)
_START = re.compile(r"(?P<name>[A-Za-z0-9_.-]+) start \(generated; do not edit\) ")
_END = re.compile(r"(?P<name>[A-Za-z0-9_.-]+) end ")


class SectionError(ConfigError):
    """A file whose generated-section markers do not pair up: rewriting it would mangle the prose."""


def check_markers(text: str, path: str | Path = "<text>") -> None:
    """Every ``<!-- bench:`` marker must be a well-formed start or end, and each start must be closed
    by its own end before the next section opens; otherwise the file is refused, naming the line."""
    open_name, open_line = None, 0
    for match in _MARKER.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        rest = match.group("rest")
        start, end = _START.fullmatch(rest), _END.fullmatch(rest)
        if start is None and end is None:
            raise SectionError(
                f"{path}:{line}: malformed generated-section marker {match.group(0)[:60]!r}; repair it"
            )
        if start is not None:
            if open_name is not None:
                raise SectionError(
                    f"{path}:{open_line}: section {open_name!r} has no end marker before line {line}; "
                    f"add '<!-- bench:{open_name} end -->' after its table"
                )
            open_name, open_line = start.group("name"), line
        else:
            name = end.group("name")
            if name != open_name:
                raise SectionError(
                    f"{path}:{line}: end marker of {name!r} without its start marker; repair it"
                )
            open_name = None
    if open_name is not None:
        raise SectionError(
            f"{path}:{open_line}: section {open_name!r} has no end marker; "
            f"add '<!-- bench:{open_name} end -->' after its table"
        )


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name must be letters, digits, '_', '.', '-', got {name!r}")
    return f"<!-- bench:{name} start (generated; do not edit) -->", f"<!-- bench:{name} end -->"


def replace_section(path: str | Path, name: str, body: str, heading: str | None = None) -> None:
    """Write ``body`` between the markers of section ``name`` in ``path``.

    A section that does not exist yet is appended at the end (under ``heading`` when given). A file
    whose markers do not pair up is refused (:class:`SectionError`) before anything is written. The
    file is rewritten atomically, so an interrupted update never leaves half a table.
    """
    path = Path(path)
    start, end = _markers(name)
    text = path.read_text() if path.is_file() else ""
    check_markers(text, path)
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
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
