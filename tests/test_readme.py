"""The README's commands parse as written and point only at files a user of the repository has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from probssl.cli import build_parser
from probssl.config import build_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith("probssl ") and "..." not in line]


def test_the_readme_has_no_links_outside_the_repository():
    assert "../shared" not in README and "design.md" not in README
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target


@pytest.mark.parametrize("command", _commands())
def test_every_readme_command_parses(command):
    argv = shlex.split(command.replace("$HOME", "/home/u").replace('"$PROBSSL_DATA"', "data"))[1:]
    args, extra = build_parser().parse_known_args(argv)
    assert all("=" in e and not e.startswith("-") for e in extra), extra
    if getattr(args, "config", None):
        build_config(args.config)  # a bundled config by name (or configs/NAME.yaml)


def test_the_uncertainty_table_is_the_registrys(tmp_path):
    """README's "What each method's uncertainty means" is each method's ``uncertainty_doc``, generated:
    a new method gets its row from ``probssl list --update README.md``, never by hand."""
    from probssl.bench.sections import read_section
    from probssl.cli import main
    from probssl.methods.uncertainty_table import README_SECTION, uncertainty_table

    assert read_section(REPO / "README.md", README_SECTION) == uncertainty_table(), (
        "README.md's uncertainty table is stale: run `probssl list --update README.md`"
    )
    copy = tmp_path / "README.md"
    copy.write_text(README.replace(uncertainty_table(), "| stale |"))
    assert main(["list", "--update", str(copy)]) == 0
    assert copy.read_text() == README
