"""SampleBank persistence (round trip, fp16, resume, corruption, atomicity) and BatchNorm re-estimation
against a hand computation of each BN layer's input statistics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import probssl.posteriors.sample_bank as sample_bank_module
from probssl.posteriors import SampleBank, SampleBankError, recompute_batchnorm_stats

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    )


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in _net().state_dict().items()}


# ---- SampleBank ------------------------------------------------------------------------------------


def test_add_load_round_trip(tmp_path):
    bank = SampleBank(tmp_path / "bank")
    states = [_state(s) for s in range(3)]
    for i, st in enumerate(states):
        assert bank.add(st, {"step": 100 * i, "cycle": i}) == i
    assert len(bank) == 3
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == [
        "index.json",
        "sample_000.safetensors",
        "sample_001.safetensors",
        "sample_002.safetensors",
    ]
    for i, (loaded, meta) in enumerate(bank):
        assert meta == {"step": 100 * i, "cycle": i}
        assert loaded.keys() == states[i].keys()
        for k in loaded:
            assert loaded[k].dtype == states[i][k].dtype and torch.equal(loaded[k], states[i][k])
    net = _net()
    net.load_state_dict(bank.load(1)[0])
    assert torch.equal(net[0].weight, states[1]["0.weight"])
    with pytest.raises(IndexError):
        bank.load(3)


def test_fp16_storage(tmp_path):
    bank = SampleBank(tmp_path, dtype="float16")
    st = _state(0)
    bank.add(st, {})
    loaded, _ = bank.load(0)
    assert loaded["0.weight"].dtype == torch.float16
    assert loaded["1.num_batches_tracked"].dtype == torch.int64  # integer buffers keep their dtype
    torch.testing.assert_close(loaded["0.weight"].float(), st["0.weight"], rtol=1e-3, atol=1e-4)
    assert not torch.equal(loaded["0.weight"].float(), st["0.weight"])  # really rounded
    with pytest.raises(SampleBankError, match="overflows float16"):
        bank.add({"w": torch.tensor([1e6])}, {})
    assert len(bank) == 1
    with pytest.raises(SampleBankError, match="stores float16"):
        SampleBank(tmp_path, dtype="float32")
    assert SampleBank(tmp_path).dtype == torch.float16


def test_reopen_resumes_numbering(tmp_path):
    bank = SampleBank(tmp_path)
    bank.add(_state(0), {"step": 1})
    bank.add(_state(1), {"step": 2})
    del bank
    reopened = SampleBank(tmp_path)  # e.g. after an interrupted run
    assert len(reopened) == 2 and reopened.meta(1) == {"step": 2}
    assert reopened.add(_state(2), {"step": 3}) == 2
    assert (tmp_path / "sample_002.safetensors").is_file()
    assert torch.equal(SampleBank(tmp_path).load(0)[0]["0.weight"], _state(0)["0.weight"])


def test_corrupt_sample_is_refused(tmp_path):
    bank = SampleBank(tmp_path)
    bank.add(_state(0), {})
    bank.add(_state(1), {})
    path = tmp_path / "sample_001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(SampleBankError, match="corrupt"):
        bank.load(1)
    assert bank.load(0)[0].keys() == _state(0).keys()  # the others stay usable
    path.unlink()
    with pytest.raises(SampleBankError, match="missing"):
        SampleBank(tmp_path)


def test_failed_index_write_leaves_bank_consistent(tmp_path, monkeypatch):
    bank = SampleBank(tmp_path)
    bank.add(_state(0), {"step": 0})
    index_before = (tmp_path / "index.json").read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # A crash after the sample file is written but before the index is replaced.
    monkeypatch.setattr(sample_bank_module, "atomic_write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        bank.add(_state(1), {"step": 1})
    assert len(bank) == 1
    assert (tmp_path / "index.json").read_text() == index_before
    # A crash while writing the sample file itself: safetensors' writer fails mid-way.
    monkeypatch.undo()
    monkeypatch.setattr("probssl.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        bank.add(_state(2), {"step": 2})
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind

    reopened = SampleBank(tmp_path)
    assert len(reopened) == 1 and json.loads((tmp_path / "index.json").read_text())["samples"][0]["meta"] == {
        "step": 0
    }
    assert reopened.add(_state(3), {"step": 3}) == 1  # the unlisted file from the crash is overwritten
    assert torch.equal(reopened.load(1)[0]["0.weight"], _state(3)["0.weight"])


# ---- BatchNorm re-estimation ------------------------------------------------------------------------


def _manual_bn_input_stats(net: nn.Module, batches: list[torch.Tensor]):
    """Each BN's input over all batches, running the network by hand with train-mode (batch-stat) BN."""
    conv, bn2, lin = net[0], net[1], net[4]
    h1s, h2s = [], []
    for x in batches:
        h1 = conv(x)
        mu = h1.mean(dim=(0, 2, 3), keepdim=True)
        var = ((h1 - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as BN normalises in training
        g, b = bn2.weight.view(1, -1, 1, 1), bn2.bias.view(1, -1, 1, 1)
        h2 = lin(torch.relu((h1 - mu) / torch.sqrt(var + bn2.eps) * g + b).flatten(1))
        h1s.append(h1.transpose(0, 1).reshape(3, -1))
        h2s.append(h2.T)
    out = []
    for chunks in (h1s, h2s):
        feats = torch.cat(chunks, dim=1).double()
        out.append((feats.mean(dim=1), feats.var(dim=1, unbiased=True)))
    return out


def test_recompute_batchnorm_stats_matches_exact_feature_statistics():
    torch.manual_seed(0)
    net = _net()
    with torch.no_grad():
        for bn in (net[1], net[5]):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
            bn.running_mean.fill_(7.0)  # stale statistics from another weight sample
            bn.running_var.fill_(0.01)
    # Unequal batch sizes and shifted batch means: per-batch averaging of variances would be wrong.
    batches = [torch.randn(n, 1, 4, 4) + shift for n, shift in [(8, 0.0), (5, 1.5), (11, -0.7)]]
    net.eval()
    momenta = [net[1].momentum, net[5].momentum]
    with torch.no_grad():
        expected = _manual_bn_input_stats(net, batches)

    assert recompute_batchnorm_stats(net, batches) == 3
    for bn, (mean, var) in zip((net[1], net[5]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 3
    assert not net.training and not any(m.training for m in net.modules())  # eval mode restored
    assert [net[1].momentum, net[5].momentum] == momenta


def test_recompute_batchnorm_stats_forward_and_modes():
    torch.manual_seed(1)
    net = _net()
    net.train()
    net[5].eval()  # a mixed-mode module: each submodule's flag is restored
    batches = [(torch.randn(6, 1, 4, 4), torch.zeros(6)) for _ in range(2)]  # (x, y) pairs
    calls = []

    def forward(module, batch):
        calls.append(1)
        return module(batch[0])

    recompute_batchnorm_stats(net, batches, forward=forward)
    assert len(calls) == 2
    assert net.training and net[1].training and not net[5].training
    x = torch.cat([b[0] for b in batches])
    h1 = net[0](x).detach()
    torch.testing.assert_close(net[1].running_mean, h1.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one batch"):
        recompute_batchnorm_stats(net, [])
    assert recompute_batchnorm_stats(nn.Linear(2, 2), [torch.randn(3, 2)]) == 0  # no BN: nothing to do
