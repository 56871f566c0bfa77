"""Where ``report --out``, ``embed --out`` and ``table --update`` may write: never over a file they did
not write themselves.

Why: ``probssl report RUN --out RUN/model.safetensors`` once replaced a trained model with HTML and
exited 0. A command may replace its own earlier output (re-running it is the normal case), so each
one recognises what it writes — the report's footer, ``embed``'s arrays and CSV header, a text file
for a table's section — and refuses any other existing file, or any directory, with one line saying
what is there and what to do. The check runs before any work, so a refusal costs nothing.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

from probssl.config import ConfigError

#: The footer every ``probssl report`` page ends with (eval/report/page.py): how a report is recognised.
REPORT_SIGNATURE = "<footer>probssl report"
#: ``embed``'s CSV starts with these columns; its .npz holds at least these arrays.
EMBED_CSV_HEADER = "rank,path,"
EMBED_ARRAYS = ("embedding.npy", "path.npy")


def enclosing_run(path: Path) -> Path | None:
    """The run directory ``path`` lies in (a folder above it with ``config.yaml`` or ``model.json``)."""
    for parent in Path(path).absolute().parents:
        if (parent / "config.yaml").is_file() or (parent / "model.json").is_file():
            return parent
    return None


def _head(path: Path, size: int = 1 << 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _tail(path: Path, size: int = 1 << 12) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(max(path.stat().st_size - size, 0))
        return handle.read()


def is_report(path: Path) -> bool:
    """An HTML page ``probssl report`` wrote (its footer sits at the end of the file)."""
    return path.suffix.lower() in (".html", ".htm") and REPORT_SIGNATURE.encode() in _tail(path)


def is_embedding_file(path: Path) -> bool:
    """An ``embed`` output: the .npz with its arrays, or the ranked CSV beside it."""
    if path.suffix == ".csv":
        return _head(path, len(EMBED_CSV_HEADER)).decode(errors="replace") == EMBED_CSV_HEADER
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    return all(name in names for name in EMBED_ARRAYS)


def is_text_for_tables(path: Path) -> bool:
    """A text file a table section may be written into: UTF-8, and inside a run's files only if it
    already holds generated sections (a run's config.yaml or metrics.csv must not get a table)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return enclosing_run(path) is None or "<!-- bench:" in text


def refuse_foreign_output(path: str | Path, flag: str, command: str, is_ours: Callable[[Path], bool]) -> None:
    """Raise :class:`ConfigError` if ``path`` exists and ``is_ours`` does not recognise it as what
    ``probssl <command>`` writes (a directory never is)."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; name a file (inside it, if you like)")
    if is_ours(path):
        return
    run = enclosing_run(path)
    if run is not None:
        raise ConfigError(
            f"{flag} {path} is a file of the run {run}, not one `probssl {command}` wrote: refusing to "
            f"overwrite it; choose another {flag}"
        )
    raise ConfigError(
        f"{flag} {path} exists and is not a file `probssl {command}` wrote: refusing to overwrite it; "
        f"choose another {flag} (or delete the file first if you mean to replace it)"
    )
