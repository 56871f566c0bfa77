"""What an installed copy offers: the wheel's contents (configs, licence, typing marker), the public API."""

from __future__ import annotations

import importlib.util
import os
import pydoc
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import probssl

REPO = Path(__file__).resolve().parents[1]


def test_public_api_is_listed_and_resolves():
    names = dir(probssl)
    for name in probssl.__all__:
        assert name in names and getattr(probssl, name) is not None
    page = pydoc.render_doc(probssl, renderer=pydoc.plaintext)
    for name in ("fit", "evaluate_run", "load_run", "list_methods", "list_configs", "Embedding"):
        assert name in page


def test_list_functions_agree_with_what_builds():
    from probssl.data import get_dataset_info
    from probssl.methods import METHODS
    from probssl.nn import BACKBONES

    methods = probssl.list_methods()
    assert "simclr" in methods and "csghmc" in methods
    assert all(METHODS.get(m) is not None for m in methods)
    assert all(get_dataset_info(d).name == d for d in probssl.list_datasets())
    assert all(BACKBONES.get(b) is not None for b in probssl.list_backbones())
    configs = probssl.list_configs()
    assert "fashion_mnist" in configs
    assert all(probssl.build_config(c).data.dataset for c in configs)


def test_package_data_covers_every_bundled_file():
    """The fast guard (the wheel build below is slow): pyproject's package-data globs match every
    file the package reads at run time, and the licence file exists."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "probssl"
    ]
    package = REPO / "src" / "probssl"
    data = [
        p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file() and p.suffix != ".py"
    ]
    data = [p for p in data if "__pycache__" not in p]
    assert data and all(any(fnmatch.fnmatch(p, pat) for pat in patterns) for p in data), data
    assert "py.typed" in data and any(p.startswith("configs/") for p in data)
    assert "MIT License" in (REPO / "LICENSE").read_text()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build")
def test_the_wheel_ships_configs_licence_and_typing_marker(tmp_path):
    source = tmp_path / "src-copy"  # build from a copy: the checkout stays free of build/ and egg-info
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in tracked:
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, source / rel)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("probssl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("digits", "fashion_mnist", "cifar10"):
        assert f"probssl/configs/{config}.yaml" in names
    assert "probssl/py.typed" in names
    assert any(n.endswith("/LICENSE") and ".dist-info/" in n for n in names)
    # The README's `--config configs/fashion_mnist.yaml` resolves inside the installed copy, from anywhere.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "from probssl.config import build_config as b; print(b('configs/fashion_mnist.yaml').data.dataset)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "fashion_mnist", run.stderr
    assert (
        str(site)
        in subprocess.run(
            [sys.executable, "-c", "import probssl; print(probssl.__file__)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    )
