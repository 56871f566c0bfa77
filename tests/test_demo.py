"""``make demo``: one source for its budget, and a console a new user can read."""

from __future__ import annotations

import warnings
from importlib.resources import files

import pytest
import yaml

from probssl.demo import DEMO_METHODS, _report_warnings, demo_config, run_demo


def test_the_demo_trains_what_the_bundled_digits_config_says():
    shipped = yaml.safe_load(files("probssl").joinpath("configs", "digits.yaml").read_text())
    for method in DEMO_METHODS:
        cfg = demo_config(method)
        assert cfg.method == method and cfg.data.dataset == shipped["data"]["dataset"]
        assert cfg.train.epochs == shipped["train"]["epochs"]
        assert cfg.train.batch_size == shipped["train"]["batch_size"]
        assert cfg.optim.lr == shipped["optim"]["lr"]
    assert demo_config("simclr", epochs=3).train.epochs == 3


def _warnings(*messages):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for message in messages:
            warnings.warn(message, stacklevel=1)
    return caught


def test_a_set_missing_for_every_run_is_reported_once(capsys):
    said: set[str] = set()
    for _ in range(3):
        _report_warnings(_warnings("skipped ood/fashion_mnist (x)", "skipped transfer/mnist (x)"), said)
    out = capsys.readouterr().out
    assert out.count("skipped ood/fashion_mnist, transfer/mnist") == 1 and out.count("\n") == 1
    with pytest.warns(UserWarning, match="something else"):
        _report_warnings(_warnings("something else"), said)


@pytest.mark.slow
def test_the_demo_end_to_end_prints_one_line_per_stage(tmp_path, capsys):
    results = run_demo(tmp_path, epochs=1, progress=False)
    assert set(results) == set(DEMO_METHODS)
    out = capsys.readouterr().out
    assert out.count("skipped ood/fashion_mnist") <= 1 and "pixels: nothing to train" in out
    assert (tmp_path / "report.html").is_file()


def test_the_demo_runs_single_threaded_and_restores_the_count(monkeypatch):
    import torch

    import probssl.demo as demo

    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda out, epochs, progress: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_demo("unused", epochs=1)
        assert seen == [demo.DEMO_THREADS] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
