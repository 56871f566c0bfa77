"""Real two-process gloo runs under torchrun: DDP + our losses must reproduce the one-process gradients.

One ``torchrun --nproc_per_node 2`` launch (module-scoped fixture) runs a worker script written to
``tmp_path``; the workers write their results to files there, and the tests compare them with the
same computation done here, in one process, on the full batch. The worker script doubles as the
module defining the tiny model, so both sides are guaranteed to run the same code.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

from probssl import distributed as pd

GLOBAL_BATCH = 8
WORLD_SIZE = 2

WORKER_SRC = textwrap.dedent(
    '''
    """Worker for tests/test_distributed.py (also imported there for the one-process reference)."""
    import sys
    from pathlib import Path

    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from probssl import distributed as pd
    from probssl.losses.contrastive import byol_loss, negative_cosine_similarity, nt_xent_loss

    KINDS = ("nt_xent", "byol", "negcos")


    class Net(nn.Module):
        """Encoder + predictor, no BatchNorm (its batch statistics would differ per rank)."""

        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
            self.predictor = nn.Linear(8, 8)

        def forward(self, x1, x2, kind):
            z1, z2 = self.encoder(x1), self.encoder(x2)
            p1, p2 = self.predictor(z1), self.predictor(z2)
            if kind == "nt_xent":
                return nt_xent_loss(p1, p2, temperature=0.2)
            fn = byol_loss if kind == "byol" else negative_cosine_similarity
            return 0.5 * (fn(p1, z2) + fn(p2, z1))


    def sghmc_run(model, net, inputs, rows, steps=6):
        """A few noisy cSGHMC steps on the byol loss; returns the final parameters by name."""
        from probssl.posteriors.sghmc import CyclicalSGHMC

        net.load_state_dict(inputs["state"])
        opt = CyclicalSGHMC(net.parameters(), lr=0.05, num_data=20, temperature=1.0, steps_per_cycle=4,
                            exploration_fraction=0.25, seed=3)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(inputs["x1"][rows], inputs["x2"][rows], "byol").backward()
            opt.step()
        return {name: p.detach().clone() for name, p in net.named_parameters()}


    class FlatBackbone(nn.Module):
        """A BatchNorm-free backbone for LAM (batch statistics would differ per rank)."""

        out_dim = 8

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))

        def forward(self, x):
            return self.net(x)


    def lam_run(model, lam, inputs, rows, steps=3):
        """Online LAM steps: seeded weight noise, pair loss over the gathered batch, running Hessian."""
        from pathlib import Path as _Path

        from probssl.methods import TrainContext

        ctx = TrainContext(_Path("."), True, 100, 10, 100, 0.1, 5)
        lam.load_state_dict(inputs["lam_state"])
        lam.configure_optimizer(ctx)
        opt = torch.optim.SGD(lam.parameters(), lr=0.1)
        losses = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = model([inputs["x1"][rows], inputs["x2"][rows]])
            loss.backward()
            opt.step()
            lam.after_step(step, ctx)
            losses.append(pd.all_reduce_mean(loss))
        state = {k: v.detach().clone() for k, v in lam.state_dict().items()}
        return torch.stack(losses), state


    def build_lam():
        from probssl.methods.lam import LAM, LAMConfig

        return LAM(FlatBackbone(), LAMConfig(posterior="online", embed_dim=4, miner="all", max_pairs=20,
                                             margin=1.2, hessian_memory=0.9))


    PROBABILISTIC = ("prosmin", "vi_simsiam", "scl")


    def pseudo_noise(like, offset=0.0):
        """Noise that is a fixed function of each sample's own values: the same for a sample whether
        one process or two compute it (independent per-rank RNG streams are correct DDP behaviour,
        but not comparable bit for bit with one process)."""
        return torch.sin(like.detach() * 13.0 + offset)


    def patch_noise():
        from probssl.methods.prosmin import ProSMIN
        from probssl.nn import stochastic

        original = stochastic.gaussian_rsample
        stochastic.gaussian_rsample = lambda mu, logvar, noise=None: original(mu, logvar, pseudo_noise(mu))
        def rsample(mu, logvar, num_samples):
            eps = torch.stack([pseudo_noise(mu, i) for i in range(num_samples)])
            return mu + (0.5 * logvar).exp() * eps

        ProSMIN.rsample = staticmethod(rsample)


    def build_probabilistic(name):
        """The method on a BatchNorm-free backbone, its head BatchNorms replaced by identities."""
        from probssl.methods import build_method

        args = {"prosmin": {"out_dim": 32, "proj_hidden_dim": 16, "bottleneck_dim": 8, "pred_hidden_dim": 16,
                            "pred_dim": 8, "head_batch_norm": False},
                "vi_simsiam": {"proj_dim": 8, "pred_hidden_dim": 4, "kappa_hidden_dim": 4},
                "scl": {"proj_hidden_dim": 16, "proj_dim": 8}}[name]
        torch.manual_seed(1)
        method = build_method(name, FlatBackbone(), args)
        for parent in list(method.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.BatchNorm1d):
                    setattr(parent, child_name, nn.Identity())
        return method


    def method_run(model, method, inputs, rows, steps=3):
        """A few SGD steps with target updates; the losses (rank mean) and the final state."""
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
        losses = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = model([inputs["x1"][rows], inputs["x2"][rows]])
            loss.backward()
            opt.step()
            method.update_targets((step + 1) / 10)
            losses.append(pd.all_reduce_mean(loss))
        return torch.stack(losses), {k: v.detach().clone() for k, v in method.state_dict().items()}


    def main(out):
        torch.set_num_threads(1)
        device = pd.init_distributed()
        rank, world = pd.get_rank(), pd.get_world_size()
        inputs = torch.load(out / "inputs.pt", weights_only=True)
        b = inputs["x1"].shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)

        net = Net()
        net.load_state_dict(inputs["state"])
        model = DistributedDataParallel(net)
        result = {"device": str(device), "world": world, "is_main": pd.is_main_process()}
        for kind in KINDS:
            model.zero_grad(set_to_none=True)
            loss = model(inputs["x1"][rows], inputs["x2"][rows], kind)
            loss.backward()
            result[kind + "/loss"] = pd.all_reduce_mean(loss)
            for name, p in net.named_parameters():
                result[kind + "/grad/" + name] = p.grad.clone()

        # gather_with_grad on its own: rank r holds rows 100*r + [0..5], and its loss weights the
        # gathered tensor by (r + 1) * w, so d(sum_r L_r)/dx_q = (1 + 2) * w[slice q].
        x = (torch.arange(6.0).reshape(3, 2) + 100.0 * rank).requires_grad_(True)
        gathered = pd.gather_with_grad(x)
        ((rank + 1) * inputs["w"] * gathered).sum().backward()
        result["gather/value"] = gathered.detach().clone()
        result["gather/grad"] = x.grad.clone()

        result["mean_of_rank"] = pd.all_reduce_mean(torch.tensor(rank))
        result["broadcast"] = pd.broadcast_from_main(torch.full((3,), rank + 1.0))
        # Objects (what rank 0 alone reads from or writes to the run directory): pickled, tensors inside.
        result["object_broadcast"] = pd.broadcast_object({"t": torch.full((2,), float(rank))})["t"]
        objects = pd.gather_objects((rank, torch.arange(rank + 1)))
        gathered_objects = [t + 10 * r for r, t in objects] if objects else [torch.tensor([-1])]
        result["object_gather"] = torch.cat(gathered_objects)

        # cSGHMC under DDP: each rank sees other rows, but the all-reduced gradient and the noise
        # (same seed on every rank) are identical, so the replicas must stay bit-identical.
        for name, params in sghmc_run(model, net, inputs, rows).items():
            result["sghmc/" + name] = params
        patch_noise()
        for name in PROBABILISTIC:
            method = build_probabilistic(name)
            method.load_state_dict(inputs["state_" + name])
            losses, state = method_run(DistributedDataParallel(method), method, inputs, rows)
            result[name + "/losses"] = losses
            for key, value in state.items():
                result[name + "/" + key] = value

        lam = build_lam()
        lam_model = DistributedDataParallel(lam)
        result["lam/losses"], lam_state = lam_run(lam_model, lam, inputs, rows)
        for key, value in lam_state.items():
            result["lam/" + key] = value
        torch.save(result, out / f"rank{rank}.pt")

        del model, net, loss, gathered, x, lam, lam_model
        pd.teardown_distributed()


    if __name__ == "__main__":
        main(Path(sys.argv[1]))
    '''
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_worker_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("probssl_ddp_test_worker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModuleType, dict]:
    """Launch the 2-rank run once; return (out dir, worker module, inputs)."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "ddp_worker.py"
    script.write_text(WORKER_SRC)
    worker = _load_worker_module(script)

    torch.manual_seed(0)
    inputs = {
        "state": worker.Net().state_dict(),
        "x1": torch.randn(GLOBAL_BATCH, 6),
        "x2": torch.randn(GLOBAL_BATCH, 6),
        "w": torch.randn(WORLD_SIZE * 3, 2),
        "lam_state": worker.build_lam().state_dict(),
        **{"state_" + name: worker.build_probabilistic(name).state_dict() for name in worker.PROBABILISTIC},
    }
    torch.save(inputs, out / "inputs.pt")

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={WORLD_SIZE}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    # A non-zero code here includes a worker dying at exit (e.g. gloo's SIGABRT without a clean teardown).
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out, worker, inputs


def _rank_results(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("kind", ["nt_xent", "byol", "negcos"])
def test_ddp_matches_single_process(ddp_run, kind: str) -> None:
    out, worker, inputs = ddp_run
    net = worker.Net()
    net.load_state_dict(inputs["state"])
    ref_loss = net(inputs["x1"], inputs["x2"], kind)  # not distributed here: gather is the identity
    ref_loss.backward()

    for r, res in enumerate(_rank_results(out)):
        assert res["device"] == "cpu" and res["world"] == WORLD_SIZE and res["is_main"] == (r == 0)
        torch.testing.assert_close(res[f"{kind}/loss"], ref_loss.detach(), rtol=0, atol=1e-6)
        for name, p in net.named_parameters():
            torch.testing.assert_close(res[f"{kind}/grad/{name}"], p.grad, rtol=0, atol=1e-6, msg=name)


def test_gather_with_grad_order_and_backward(ddp_run) -> None:
    out, _, inputs = ddp_run
    blocks = [torch.arange(6.0).reshape(3, 2) + 100.0 * r for r in range(WORLD_SIZE)]
    expected_value = torch.cat(blocks)  # rank order along dim 0
    grad_scale = sum(r + 1 for r in range(WORLD_SIZE))  # backward SUMs every rank's gradient
    for r, res in enumerate(_rank_results(out)):
        torch.testing.assert_close(res["gather/value"], expected_value)
        torch.testing.assert_close(res["gather/grad"], grad_scale * inputs["w"][3 * r : 3 * r + 3])


def test_all_reduce_mean_and_broadcast(ddp_run) -> None:
    out, _, _ = ddp_run
    for res in _rank_results(out):
        assert res["mean_of_rank"].item() == pytest.approx((WORLD_SIZE - 1) / 2)
        torch.testing.assert_close(res["broadcast"], torch.ones(3))


def test_objects_are_broadcast_from_and_gathered_on_rank_0(ddp_run) -> None:
    out, _, _ = ddp_run
    results = _rank_results(out)
    for res in results:
        torch.testing.assert_close(res["object_broadcast"], torch.zeros(2))  # rank 0's, everywhere
    assert results[0]["object_gather"].tolist() == [0, 10, 11]  # rank 0: [0], rank 1: [0, 1] + 10
    assert results[1]["object_gather"].tolist() == [-1]  # nothing on the other ranks


def test_csghmc_noise_keeps_ddp_replicas_identical(ddp_run) -> None:
    out, worker, inputs = ddp_run
    ranks = _rank_results(out)
    net = worker.Net()
    reference = worker.sghmc_run(net, net, inputs, slice(None))  # one process, the global batch
    start = inputs["state"]
    for name, value in reference.items():
        assert not torch.equal(value, start[name]), name  # the sampler did move the weights
        assert torch.equal(ranks[0]["sghmc/" + name], ranks[1]["sghmc/" + name]), name  # in sync, bit for bit
        torch.testing.assert_close(ranks[0]["sghmc/" + name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["prosmin", "vi_simsiam", "scl"])
def test_probabilistic_methods_under_ddp_match_one_process(ddp_run, name: str, monkeypatch) -> None:
    """ProSMIN (centre all-reduce, EMA target), VI-SimSiam (κ head), SCL (gathered NT-Xent over
    latent samples): two ranks reproduce one process on the global batch, step by step."""
    from probssl.methods.prosmin import ProSMIN
    from probssl.nn import stochastic

    out, worker, inputs = ddp_run
    # Registered with monkeypatch first so that the worker's noise patches are undone afterwards.
    monkeypatch.setattr(stochastic, "gaussian_rsample", stochastic.gaussian_rsample)
    monkeypatch.setattr(ProSMIN, "rsample", ProSMIN.__dict__["rsample"])
    worker.patch_noise()
    method = worker.build_probabilistic(name)
    method.load_state_dict(inputs["state_" + name])
    ref_losses, ref_state = worker.method_run(method, method, inputs, slice(None))
    assert not torch.equal(ref_state[next(iter(ref_state))], inputs["state_" + name][next(iter(ref_state))])
    for res in _rank_results(out):
        torch.testing.assert_close(res[name + "/losses"], ref_losses, rtol=0, atol=1e-5)
        for key, value in ref_state.items():
            torch.testing.assert_close(res[name + "/" + key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_online_lam_under_ddp_matches_one_process(ddp_run) -> None:
    """Gathered pairs, (seed, step)-seeded weight noise and the Hessian's pair subset: two ranks
    follow the one-process run on the global batch, loss, weights and running Hessian alike."""
    out, worker, inputs = ddp_run
    lam = worker.build_lam()
    ref_losses, ref_state = worker.lam_run(lam, lam, inputs, slice(None))
    assert ref_state["laplace.hessian"].abs().sum() > 0
    for res in _rank_results(out):
        torch.testing.assert_close(res["lam/losses"], ref_losses, rtol=0, atol=1e-6)
        for key, value in ref_state.items():
            torch.testing.assert_close(res["lam/" + key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert pd.init_distributed() == expected
    assert not pd.is_distributed()
    assert (pd.get_rank(), pd.get_world_size(), pd.is_main_process()) == (0, 1, True)

    x = torch.randn(4, 3, requires_grad=True)
    assert pd.gather_with_grad(x) is x
    torch.testing.assert_close(pd.all_reduce_mean(x), x.detach())
    assert not pd.all_reduce_mean(x).requires_grad
    y = torch.randn(3)
    assert pd.broadcast_from_main(y) is y
    assert pd.broadcast_object(y) is y and pd.gather_objects(y) == [y]
    pd.teardown_distributed(torch.nn.Linear(2, 2))  # no-op, must not raise
