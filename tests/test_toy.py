"""A new method touches three files — shown with a toy one (docs/adding_a_method.md).

``Toy`` below is a whole method: a config, a loss, an embedding with an uncertainty of its own and a
declared deterministic base. It is registered for these tests only (and removed after each). Nothing
else is edited, yet everything that lists methods finds it through the registry: the command line
(``probssl list``, ``--method``), training, loading and embedding a run, the contract tests of
tests/test_methods.py and tests/test_embedding_contract.py (which read the toy's documented embedding
from ``documented_embedding`` below, as they would from any method's own test file), the README's
uncertainty table, the bench suites' arms and ``probssl bench speed``. For a real method the three
files are its module under ``src/probssl/methods/``, its test file (like this one) and its section of
docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import probssl
from probssl.cli import main
from probssl.embedding import Embedding
from probssl.methods import METHODS, MethodConfig, SSLMethod

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ToyConfig(MethodConfig):
    proj_dim: int = 16  # the head the loss sees


class Toy(SSLMethod):
    """Aligns the two views' normalised projections; its "uncertainty" is the features' norm."""

    config_class = ToyConfig
    probabilistic = True
    deterministic_base = "simclr"
    uncertainty_doc = "a toy: the L2 norm of the image's backbone features (means nothing)"

    def __init__(self, backbone: nn.Module, cfg: ToyConfig) -> None:
        super().__init__(backbone, cfg)
        self.head = nn.Linear(backbone.out_dim, cfg.proj_dim)

    def loss(self, views: list[Tensor]) -> Tensor:
        z1, z2 = (F.normalize(self.head(self.backbone(v)), dim=-1) for v in views[:2])
        return -(z1 * z2).sum(dim=-1).mean()

    @torch.no_grad()
    def embed(self, x: Tensor, samples: int | None = None) -> Embedding:
        features = self.backbone(x).float()
        return Embedding(mean=features, samples=None, uncertainty=features.norm(dim=-1))


def documented_embedding(tmp_path: Path) -> None:
    """The toy's documented embedding, recomputed in numpy: mean = the backbone's features, no draws,
    uncertainty = their L2 norm. tests/test_embedding_contract.py finds it here by the file's name."""
    from test_embedding_contract import _embed, _features, _images, _point, _trained

    method, x = _trained("toy"), _images()
    features = _features(method.backbone, x)
    _point(_embed(method, x), features, np.linalg.norm(features, axis=-1))


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> type[Toy]:
    """``toy`` in the method registry for one test (monkeypatch removes it after)."""
    monkeypatch.setitem(METHODS._entries, "toy", Toy)
    return Toy


def test_the_command_line_trains_loads_and_embeds_it(toy, tmp_path, capsys):
    assert main(["list"]) == 0 and "toy" in capsys.readouterr().out
    run = tmp_path / "toy"
    argv = ["train", "--method", "toy", "--dataset", "digits", "--subset", "64", "--batch-size", "32"]
    assert main([*argv, "train.max_steps=2", "--out", str(run), "--no-progress"]) == 0
    method = probssl.load_run(run).method
    assert isinstance(method, Toy) and method.cfg.proj_dim == 16
    x = torch.randn(4, 1, 8, 8)
    emb = method.embed(x)
    assert torch.allclose(emb.uncertainty, method.backbone(x).norm(dim=-1))
    assert main(["train", "--method", "tyo", "--out", str(tmp_path / "typo"), "--no-progress"]) == 2
    assert "toy" in capsys.readouterr().err  # the valid names the error lists are the registry's


def test_the_contract_tests_take_it(toy, tmp_path, monkeypatch):
    import test_embedding_contract as contract
    import test_methods

    test_methods.test_every_trainable_method_trains_and_embeds("toy")
    test_methods.test_every_method_explains_its_uncertainty_in_one_line("toy")
    test_methods.test_asking_for_samples_a_method_lacks_warns_once("toy", monkeypatch)
    assert contract.documented_definition("toy").__name__ == "documented_embedding"  # read from this file
    contract.test_embedding_matches_its_documented_definition("toy", tmp_path)

    from probssl.bench.sections import read_section
    from probssl.methods.uncertainty_table import README_SECTION, uncertainty_table

    readme = (ROOT / "README.md").read_text()
    regenerated = readme.replace(read_section(ROOT / "README.md", README_SECTION), uncertainty_table())
    assert f"| toy | {Toy.uncertainty_doc} |" in regenerated  # `probssl list --update README.md`
    methods_md = (ROOT / "docs" / "methods.md").read_text()
    with pytest.raises(AssertionError, match="docs/methods.md names no section or entry for 'toy'"):
        contract.check_documented("toy", methods_md, regenerated)
    section = "\n### Toy (`--method toy`)\n\nAligns two views; uncertainty = ‖f(x)‖.\n"
    contract.check_documented("toy", section + methods_md, regenerated)


def test_the_bench_arms_take_it(toy):
    from probssl.bench.catalogue import SUITES, QualityArm, resolve_arms
    from probssl.bench.speed import Arm, default_arms

    arms = resolve_arms(None, SUITES["digits"])
    assert arms[-1] == QualityArm("toy", "toy") and arms[-1].base == "simclr"  # against its declared base
    assert "toy" not in {a.name for a in resolve_arms(None, SUITES["lam_fmnist"])}  # a suite's own arms
    assert Arm("toy", "toy", (), "simclr", None) in default_arms()


def test_without_the_fixture_the_toy_is_gone():
    assert "toy" not in METHODS
