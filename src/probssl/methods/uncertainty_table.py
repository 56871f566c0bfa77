"""The README's table "What each method's uncertainty means", written from the registry.

Each method says what its ``Embedding.uncertainty`` is in one line (``SSLMethod.uncertainty_doc``);
the table is those lines, methods that say the same thing sharing a row (the deterministic ones). It is
a generated section of README.md (``probssl list --update README.md``), so a new method's row appears
without an edit there, and ``tests/test_readme.py`` fails while the README is stale.
"""

from __future__ import annotations

from probssl.methods.registry import METHODS

#: The README's generated section holding the table (between ``<!-- bench:`` markers).
README_SECTION = "uncertainty-table"


def uncertainty_table() -> str:
    """A Markdown table: the registered methods (those sharing a line together) and their line."""
    rows: dict[str, list[str]] = {}
    for name in METHODS.names():
        rows.setdefault(METHODS.get(name).uncertainty_doc, []).append(name)
    lines = ["| method | its uncertainty (`Embedding.uncertainty`) |", "|---|---|"]
    lines += [f"| {', '.join(names)} | {doc.replace('|', '/')} |" for doc, names in rows.items()]
    return "\n".join(lines)
