"""Every registered method's ``Embedding`` against its documented definition (docs/methods.md).

One test per registered method, found through the registry: a method added later fails here until
its definition is written down — below, or as ``documented_embedding(tmp_path)`` in the method's own
test file ``tests/test_<name>.py`` (docs/adding_a_method.md) — and its section is in docs/methods.md.
Each definition is recomputed independently in float64 numpy from the method's documented
ingredients (the backbone's features, the posterior's weight samples, the latent's parameters), never
by calling ``embed`` a second way.

The methods are checked after one optimizer step (and a target update), so that an EMA target
differs from the online network and every head has moved off its initialisation.
"""

from __future__ import annotations

import copy
import importlib
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from probssl.embedding import Embedding
from probssl.methods import METHODS, SSLMethod, build_method
from probssl.nn import build_backbone
from probssl.posteriors.sample_bank import SampleBank

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _trained(name: str, args: dict | None = None) -> SSLMethod:
    """The method after one SGD step and a target update, in eval mode."""
    torch.manual_seed(0)
    return _after_one_step(build_method(name, build_backbone("convnet", 1, 8), args))


def _after_one_step(method: SSLMethod) -> SSLMethod:
    if method.trainable:
        x = torch.randn(8, 1, 8, 8)
        params = [p for p in method.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        method.loss([x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)]).backward()
        opt.step()
        method.update_targets(0.5)
    return method.eval()


def _embed(method: SSLMethod, x: torch.Tensor, samples: int | None = None) -> Embedding:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*has no samples to draw")  # tests/test_methods.py checks it
        return method.embed(x, samples=samples)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _features(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return _np(module(x))


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(_np(actual), expected, **TOL, err_msg=what)


def _point(emb: Embedding, mean: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
    """A point embedding: no draws, the given mean and uncertainty (0 when not given)."""
    assert emb.samples is None
    _close(emb.mean, mean, "mean")
    _close(emb.uncertainty, np.zeros(len(mean)) if uncertainty is None else uncertainty, "uncertainty")


def _summed_std(draws: np.ndarray) -> np.ndarray:
    """Σ_d of the sample standard deviation over draws (S − 1 in the denominator), [N]."""
    return draws.std(axis=0, ddof=1).sum(axis=-1)


# ---- the documented definitions, one per registered method -----------------------------------------


def _backbone_features(name: str) -> Callable[[Path], None]:
    """docs/methods.md §2: "Their embed is the backbone's features; uncertainty is 0"."""

    def check(tmp_path: Path) -> None:
        method, x = _trained(name), _images()
        for samples in (None, 4):
            _point(_embed(method, x, samples), _features(method.backbone, x))

    return check


def _pixels(tmp_path: Path) -> None:
    """The raw image (normalisation undone) as the embedding."""
    method, x = _trained("pixels"), _images()
    method.set_input_normalisation((0.25,), (0.5,))
    _point(_embed(method, x), _np(x).reshape(len(x), -1) * 0.5 + 0.25)


def _csghmc(tmp_path: Path) -> None:
    """One embedding per stored weight sample; mean = their average; uncertainty = 1 − ‖(1/S) Σ_s ẑ_s‖²."""
    method, x = _trained("csghmc"), _images()
    backbone = method.backbone
    _point(_embed(method, x), _features(backbone, x))  # no sample stored yet: the current weights

    bank = SampleBank(tmp_path / "samples")
    states = []
    for scale in (0.0, 0.05, 0.2):  # three weight samples, further and further from the current weights
        state = {
            k: v + scale * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in backbone.state_dict().items()
        }
        bank.add(state, {"step": len(states) + 1})
        states.append(state)
    method.attach_run(tmp_path)
    per_sample = []
    for state in states:
        network = copy.deepcopy(backbone)
        network.load_state_dict(state)
        per_sample.append(_features(network.eval(), x))
    for samples, chosen in ((None, per_sample), (2, per_sample[-2:])):
        draws = np.stack(chosen)
        emb = _embed(method, x, samples)
        _close(emb.samples, draws, "samples: one embedding per weight sample (the last S)")
        _close(emb.mean, draws.mean(axis=0), "mean: the average over the weight samples")
        _close(emb.uncertainty, 1.0 - np.square(_unit(draws).mean(axis=0)).sum(-1), "1 − ‖mean direction‖²")
    assert float(emb.uncertainty.min()) > 0.0 and float(emb.uncertainty.max()) <= 1.0


def _prosmin(tmp_path: Path) -> None:
    """Mean = the target backbone's features; uncertainty = mean σ of the online head; no draws."""
    method, x = _trained("prosmin"), _images()
    target = _features(method.target["backbone"], x)
    assert not np.allclose(target, _features(method.backbone, x)), "target and online must differ here"
    with torch.no_grad():
        _, logvar = method.predictive(x)
    for samples in (None, 4):
        _point(_embed(method, x, samples), target, np.sqrt(np.exp(_np(logvar))).mean(axis=-1))


def _vi_simsiam(tmp_path: Path) -> None:
    """Mean = backbone features; uncertainty = 1/κ of the power-spherical posterior; no draws."""
    method, x = _trained("vi_simsiam"), _images()
    features = _features(method.backbone, x)
    with torch.no_grad():
        kappa = _np(method.kappa(method.backbone(x)))
    assert (kappa >= method.cfg.kappa_min).all()
    for samples in (None, 4):
        _point(_embed(method, x, samples), features, 1.0 / kappa)


def _scl(tmp_path: Path) -> None:
    """Gaussian code: mean μ, draws N(μ, σ²), uncertainty mean σ. Bernoulli code: mean = the bit
    probabilities, draws are bits, uncertainty = mean per-bit entropy in bits."""
    x, many = _images(), 4000
    method = _trained("scl")
    with torch.no_grad():
        stats = method.latent.stats(method.backbone(x))
    mu, sigma = _np(stats.mu), np.exp(0.5 * _np(stats.logvar))
    emb = _embed(method, x)
    assert emb.samples is None  # draws only when asked for
    _close(emb.mean, mu, "mean = μ")
    _close(emb.uncertainty, sigma.mean(axis=-1), "mean σ")
    torch.manual_seed(2)
    draws = _np(_embed(method, x, many).samples)
    assert draws.shape == (many, *mu.shape)
    bound = 6 * sigma / np.sqrt(many)  # six standard errors of the sample mean
    assert (np.abs(draws.mean(axis=0) - mu) < bound).all()
    assert (np.abs(draws.std(axis=0) / sigma - 1.0) < 6 / np.sqrt(2 * many)).all()

    method = _trained("scl", {"latent": "bernoulli", "latent_dim": 16})
    with torch.no_grad():
        logits = _np(method.latent.stats(method.backbone(x)).logits)
    p = 1.0 / (1.0 + np.exp(-logits))
    entropy_bits = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    emb = _embed(method, x)
    _close(emb.mean, p, "mean = bit probabilities")
    _close(emb.uncertainty, entropy_bits.mean(axis=-1), "mean per-bit entropy in bits")
    torch.manual_seed(3)
    bits = _np(_embed(method, x, many).samples)
    assert set(np.unique(bits)) <= {0.0, 1.0}
    assert (np.abs(bits.mean(axis=0) - p) < 6 * np.sqrt(p * (1 - p) / many) + 1e-9).all()


def _lam(tmp_path: Path) -> None:
    """S weight draws of the embedding layer, each normalised; mean = the normalised mean of the
    normalised draws; uncertainty = Σ_d std over the draws. ``posterior=none``: a point."""
    x = _images()
    for posterior in ("online", "mc_dropout"):
        method = _trained("lam", {"posterior": posterior, "eval_samples": 9})
        for samples, count in ((None, 9), (5, 5)):
            emb = _embed(method, x, samples)
            draws = _np(emb.samples)
            assert draws.shape[0] == count, f"{posterior}: {count} draws"
            np.testing.assert_allclose(np.linalg.norm(draws, axis=-1), 1.0, atol=1e-5)
            assert draws.std(axis=0).max() > 1e-3, f"{posterior}: the draws must differ"
            _close(emb.mean, _unit(draws.mean(axis=0)), f"{posterior}: normalised mean of the draws")
            _close(emb.uncertainty, _summed_std(draws), f"{posterior}: Σ_d std over the draws")
    method = _trained("lam", {"posterior": "none"})
    with torch.no_grad():
        expected = _unit(_np(method.embedding(method.backbone(x))))
    _point(_embed(method, x, 4), expected)


def _ensemble(tmp_path: Path) -> None:
    """One draw per member (its own mean); mean = their average, normalised when the members' embeddings
    are unit vectors; uncertainty = Σ_d std over members."""
    x = _images()
    for member, on_sphere in (("lam", True), ("simclr", False)):
        method = _trained("ensemble", {"member": member, "size": 3})  # each member at its own defaults
        draws = np.stack([_np(_embed(m, x).mean) for m in method.members])
        emb = _embed(method, x, 7)  # the ensemble's size fixes the draws, whatever is asked for
        _close(emb.samples, draws, f"{member}: one draw per member")
        mean = draws.mean(axis=0)
        _close(emb.mean, _unit(mean) if on_sphere else mean, f"{member}: the members' mean")
        _close(emb.uncertainty, _summed_std(draws), f"{member}: Σ_d std over members")


DOCUMENTED: dict[str, Callable[[Path], None]] = {
    "simclr": _backbone_features("simclr"),
    "byol": _backbone_features("byol"),
    "simsiam": _backbone_features("simsiam"),
    "pixels": _pixels,
    "csghmc": _csghmc,
    "prosmin": _prosmin,
    "vi_simsiam": _vi_simsiam,
    "scl": _scl,
    "lam": _lam,
    "ensemble": _ensemble,
}


def documented_definition(name: str, tests: Path = ROOT / "tests") -> Callable[[Path], None]:
    """The check of method ``name``'s documented embedding: from ``DOCUMENTED``, else the
    ``documented_embedding`` function of its own test file, ``tests/test_<name>.py``."""
    if name in DOCUMENTED:
        return DOCUMENTED[name]
    path = tests / f"test_{name}.py"
    module = importlib.import_module(path.stem) if path.is_file() else None  # tests/ is on sys.path
    definition = getattr(module, "documented_embedding", None)
    assert definition is not None, (
        f"method '{name}' is registered but its Embedding (mean, samples, uncertainty) has no documented "
        "definition checked here: write it in docs/methods.md and as documented_embedding(tmp_path) in "
        f"{path}"
    )
    return definition


@pytest.mark.parametrize("name", METHODS.names())
def test_embedding_matches_its_documented_definition(name, tmp_path):
    documented_definition(name)(tmp_path)


def check_documented(name: str, methods_md: str, readme: str) -> None:
    """``name`` has a section or entry in docs/methods.md's methods part and a row in README's table."""
    sections = methods_md.split("## 4.")[0]  # the methods part, before the evaluation
    assert re.search(rf"`--method {name}`|\*\*{name}\*\*", sections, re.IGNORECASE), (
        f"docs/methods.md names no section or entry for '{name}'"
    )
    table = readme.split("## What each method's uncertainty means")[1].split("\n## ")[0]
    rows = [row.split("|")[1] for row in table.splitlines() if row.startswith("| ")]
    listed = {n.strip() for row in rows for n in row.split(",")}
    assert name in listed, f"README's uncertainty table has no row for '{name}' (probssl list --update)"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_is_documented_in_methods_md_and_the_readme(name):
    check_documented(name, (ROOT / "docs" / "methods.md").read_text(), (ROOT / "README.md").read_text())
