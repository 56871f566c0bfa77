"""Methods that wrap another registered method (probssl.methods.wrapper): cSGHMC's objective and the
deep ensemble's members get their own defaults, the backbone is registered once, and the refusals are
the same for both."""

from __future__ import annotations

import pytest
import torch

from probssl.cli import main
from probssl.config import ConfigError, load_yaml
from probssl.methods import METHODS, build_method
from probssl.methods.wrapper import WrappingMethod
from probssl.nn import build_backbone

pytestmark = pytest.mark.usefixtures("single_thread")


def _own_defaults(name: str) -> dict:
    return METHODS.get(name).resolved_args({}, name)


def test_an_ensemble_of_any_member_starts_from_the_members_own_defaults(tmp_path, capsys):
    """`probssl train --method ensemble method.member=simclr` was refused: the ensemble's default
    member_args were LAM's ``posterior: none``, which SimCLR does not have."""
    out = tmp_path / "ens"
    argv = ["train", "--method", "ensemble", "method.member=simclr", "method.size=2", "--dataset", "digits"]
    argv += ["--subset", "64", "--batch-size", "32", "train.max_steps=1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    stored = load_yaml(out / "config.yaml")["method_args"]
    assert stored["member"] == "simclr" and stored["member_args"] == _own_defaults("simclr")


def test_a_lam_member_stays_deterministic_unless_told_otherwise():
    ensemble = METHODS.get("ensemble")
    lam = ensemble.resolved_args({}, "ensemble")["member_args"]
    assert lam == {**_own_defaults("lam"), "posterior": "none"}
    given = ensemble.resolved_args({"member_args": {"embed_dim": 3}}, "ensemble")["member_args"]
    assert given["posterior"] == "none" and given["embed_dim"] == 3  # the user's keys go on top
    online = ensemble.resolved_args({"member_args": {"posterior": "online"}}, "ensemble")["member_args"]
    assert online["posterior"] == "online"
    method = build_method("ensemble", build_backbone("convnet", 1, 8), {"size": 2})  # unresolved args too
    assert all(member.cfg.posterior == "none" for member in method.members)


@pytest.mark.parametrize(
    "name, args, inner",
    [
        ("csghmc", {"objective": "simclr"}, "objective"),
        ("ensemble", {"member": "byol", "size": 2}, "members"),
    ],
)
def test_the_backbone_is_registered_once_inside_the_wrapped_method(name, args, inner):
    torch.manual_seed(0)
    method = build_method(name, build_backbone("convnet", 1, 8), args)
    assert isinstance(method, WrappingMethod)
    keys = list(method.state_dict())
    assert keys and all(key.startswith(f"{inner}.") for key in keys)  # no second copy under backbone.*
    assert method.backbone is method.wrapped_methods()[0].backbone
    assert method.num_views == method.wrapped_methods()[0].num_views


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("csghmc", {"objective": "csghmc"}, "method.objective cannot be csghmc itself; use byol or simclr"),
        ("ensemble", {"member": "ensemble"}, "method.member cannot be ensemble itself"),
        ("csghmc", {"objective": "pixels"}, "method.objective 'pixels' has nothing to train"),
        ("ensemble", {"member": "pixels"}, "method.member 'pixels' has nothing to train"),
        ("ensemble", {"member": "csghmc"}, "method.member 'csghmc' brings its own optimizer; not wrapped"),
    ],
)
def test_refusals_are_the_same_for_both(name, args, message, tmp_path):
    from probssl.methods import TrainContext

    ctx = TrainContext(
        tmp_path, is_main=False, num_data=64, steps_per_epoch=4, total_steps=40, lr=0.1, seed=0
    )
    with pytest.raises(ConfigError, match=message):
        method = build_method(name, build_backbone("convnet", 1, 8), args)
        method.configure_optimizer(ctx)  # the member's own optimizer is found when training starts


def test_the_wrapped_loss_is_the_objectives():
    """cSGHMC's potential is its objective's loss, unchanged; an ensemble's is the members' sum."""
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    views = [x + 0.1, x - 0.1]
    torch.manual_seed(0)
    csghmc = build_method("csghmc", build_backbone("convnet", 1, 8), {"objective": "simclr"})
    assert torch.equal(csghmc.loss(views), csghmc.objective.loss(views))
    ensemble = build_method("ensemble", build_backbone("convnet", 1, 8), {"member": "simclr", "size": 3})
    separate = sum(member.loss(views) for member in ensemble.members)
    assert torch.allclose(ensemble.loss(views), separate)
