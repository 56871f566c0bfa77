"""Every method's hyper-parameters are range-checked before anything runs (``MethodConfig.validate``):
a bad value is a one-line ``ConfigError`` naming ``method.<key>`` — from a config, the CLI or
``build_method`` — and a ``ValueError`` from the Python API, never a traceback mid-training or a
silently accepted nonsense value (SimCLR trained with τ = −1 before this check existed)."""

import re

import pytest

from probssl.cli import main
from probssl.config import ConfigError
from probssl.methods import METHODS, build_method
from probssl.methods.base import MethodConfig, check_interval
from probssl.methods.simclr import SimCLR, SimCLRConfig
from probssl.nn.backbones import build_backbone

BAD_VALUES = [
    ("simclr", "temperature", -1.0),
    ("simclr", "proj_dim", 0),
    ("byol", "base_momentum", 2.0),
    ("simsiam", "pred_hidden_dim", 0),
    ("csghmc", "cycles", 0),
    ("csghmc", "temperature", -0.1),
    ("csghmc", "exploration_fraction", 1.5),
    ("csghmc", "friction", 0.0),
    ("csghmc", "beta", 1.0),
    ("csghmc", "bank_dtype", "int8"),
    ("csghmc", "variant", "euler"),
    ("scl", "temperature", 0.0),
    ("scl", "latent", "poisson"),
    ("scl", "logvar_max", -20.0),
    ("vi_simsiam", "proj_dim", 1),
    ("vi_simsiam", "kappa_activation", "relu"),
    ("ensemble", "size", 1),
    ("prosmin", "num_samples", 1),
    ("prosmin", "center_momentum", -0.5),
    ("lam", "margin", 2.5),
    ("lam", "images_per_class", 1),
]


@pytest.mark.parametrize(("method", "key", "value"), BAD_VALUES)
def test_a_value_out_of_range_is_a_config_error_naming_its_key(method, key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}\b.*\(method '{method}'\)"):
        build_method(method, build_backbone("convnet", 1, 8), {key: value})


def test_every_registered_method_accepts_its_own_defaults():
    for name in METHODS.names():
        METHODS.get(name).config_class().validate()


def test_the_python_api_checks_too():
    with pytest.raises(ValueError, match=r"method\.temperature must be > 0"):
        SimCLR(build_backbone("convnet", 1, 8), SimCLRConfig(temperature=-1.0))


def test_wrapped_methods_arguments_are_checked_by_their_own_rules():
    with pytest.raises(ConfigError, match=r"method\.temperature must be > 0"):
        build_method(
            "csghmc",
            build_backbone("convnet", 1, 8),
            {"objective": "simclr", "objective_args": {"temperature": 0}},
        )


def test_the_cli_refuses_before_writing_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--method", "simclr", "--out", str(out), "--no-progress", "method.temperature=-1"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: method.temperature must be > 0 (the logits are similarities / τ), got -1.0 (method 'simclr')"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("interval", "inside", "outside"),
    [
        ("[0, 1]", (0.0, 0.5, 1.0), (-1e-9, 1.0 + 1e-9)),
        ("(0, 1]", (1e-9, 1.0), (0.0, 2.0)),
        ("[0, 1)", (0.0,), (1.0,)),
    ],
)
def test_check_interval_reads_brackets_as_mathematics(interval, inside, outside):
    class Holder(MethodConfig):
        x: float = 0.0

    cfg = Holder()
    for value in inside:
        cfg.x = value
        check_interval(cfg, "x", interval)
    for value in outside:
        cfg.x = value
        with pytest.raises(ValueError, match="method.x must be in " + re.escape(interval)):
            check_interval(cfg, "x", interval)
