"""Vision Transformers: shapes, patch sizes, attention, position-embedding resampling, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from probssl.config import ConfigError
from probssl.nn import build_backbone
from probssl.nn.vit import Attention, default_patch_size, resample_position_embeddings

pytestmark = pytest.mark.usefixtures("single_thread")


def _vit_params_by_hand(dim: int, depth: int, patch: int, channels: int, grid: int) -> int:
    """Counted layer by layer: patch conv (p²·C·D + D), CLS (D), positions ((1 + g²)·D), per block two
    LayerNorms (4D), qkv (3D² + 3D), proj (D² + D), MLP (4D² + 4D + 4D² + D); the final norm (2D)."""
    per_block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (8 * dim * dim + 5 * dim)
    return patch * patch * channels * dim + dim + dim + (1 + grid * grid) * dim + depth * per_block + 2 * dim


@pytest.mark.parametrize(("name", "dim", "heads"), [("vit_tiny", 192, 3), ("vit_small", 384, 6)])
def test_published_sizes(name: str, dim: int, heads: int) -> None:
    net = build_backbone(name, 3, 224)
    assert net.out_dim == dim and net.options["patch_size"] == 16
    assert len(net.blocks) == 12 and net.blocks[0].attn.num_heads == heads
    assert sum(p.numel() for p in net.parameters()) == _vit_params_by_hand(dim, 12, 16, 3, 14)
    if name == "vit_small":  # timm's vit_small_patch16_224 without its 1000-class head: 22,050,664 - 385,000
        assert _vit_params_by_hand(dim, 12, 16, 3, 14) == 21_665_664


@pytest.mark.parametrize(("size", "patch"), [(224, 16), (96, 8), (64, 8), (32, 4), (28, 4), (8, 1), (30, 2)])
def test_default_patch_size_from_the_image_size(size: int, patch: int) -> None:
    assert default_patch_size(size) == patch


@pytest.mark.parametrize(("size", "channels", "pool"), [(32, 3, "cls"), (28, 1, "mean"), (64, 3, "cls")])
def test_shapes_and_pooling(size: int, channels: int, pool: str) -> None:
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", channels, size, pool=pool)
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 192) and torch.isfinite(out).all()
    assert isinstance(net.norm, nn.LayerNorm) == (pool == "cls")
    assert isinstance(net.fc_norm, nn.LayerNorm) == (pool == "mean")


def test_attention_matches_the_formula() -> None:
    """softmax(q kᵀ / √d_head) v per head, written out with einsum."""
    torch.manual_seed(0)
    attn = Attention(12, 3)
    x = torch.randn(2, 5, 12)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(4), dim=-1)
    expected = attn.proj(torch.einsum("bhij,bhjd->bhid", weights, v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_each_sample_is_independent_of_the_batch() -> None:
    net = build_backbone("vit_tiny", 3, 16).eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(net(x[:1]), net(x)[:1], atol=1e-5, rtol=1e-4)


def test_position_embeddings_resample_over_the_grid() -> None:
    """A field linear in the patch position stays linear away from the borders; a constant stays constant;
    the CLS position is kept; the same grid is returned as it is."""
    side = 8
    rows, cols = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    field = torch.stack([torch.ones_like(rows), rows, cols], dim=-1).reshape(1, side * side, 3)
    pos = torch.cat([torch.full((1, 1, 3), 7.0), field], dim=1)
    assert resample_position_embeddings(pos, (side, side)) is pos
    up = resample_position_embeddings(pos, (16, 16))
    assert up.shape == (1, 1 + 256, 3) and torch.equal(up[:, 0], pos[:, 0])
    grid = up[0, 1:].reshape(16, 16, 3)
    torch.testing.assert_close(grid[..., 0], torch.ones(16, 16))
    # output pixel i of 16 sits at input coordinate (i + 0.5) / 2 - 0.5 (half-pixel centres)
    inner = slice(4, 12)
    expected_rows = (torch.arange(16).float() + 0.5) / 2 - 0.5
    torch.testing.assert_close(
        grid[inner, inner, 1], expected_rows[inner, None].expand(8, 8), atol=1e-4, rtol=0
    )


def test_other_input_sizes_use_resampled_positions() -> None:
    """A local view (16 px at 4-px patches) runs through a net built for 32 px; its positions are the
    built ones resampled, the same as a net built for 16 px with those resampled positions loaded."""
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", 3, 32).eval()
    small = build_backbone("vit_tiny", 3, 16, patch_size=4).eval()
    state = net.state_dict()
    state["pos_embed"] = resample_position_embeddings(state["pos_embed"], (4, 4))
    small.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), small(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not split into 4-px patches"):
        net(torch.randn(1, 3, 18, 18))


def test_drop_path_only_while_training() -> None:
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", 3, 16, drop_path=0.5)
    rates = [block.drop_path for block in net.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    net.train()
    assert not torch.allclose(net(x), net(x))


def test_bad_patch_size_is_one_clear_error() -> None:
    with pytest.raises(
        ConfigError, match=r"patch_size=16 does not divide the image size 40; use one of 1, 2"
    ):
        build_backbone("vit_small", 3, 40, patch_size=16)


def test_backward_reaches_every_parameter() -> None:
    net = build_backbone("vit_tiny", 3, 8, patch_size=4)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_vit_small_folder_is_dinos_recipe_and_the_weight_decay_follows_its_cosine(tmp_path) -> None:
    import json

    import numpy as np

    from probssl.config import build_config
    from probssl.optim import warmup_cosine
    from probssl.train import train

    cfg = build_config("vit_small_folder")
    assert (cfg.backbone, cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_epochs) == (
        "vit_small",
        "adamw",
        5e-4,
        10,
    )
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.backbone_args["drop_path"]) == (
        0.04,
        0.4,
        0.1,
    )
    # cosine from 0.04 to 0.4 with no warm-up: 0.04 at the start, their mean half-way (closed form:
    # final + (base - final)(1 + cos(pi k / K)) / 2 at k = K / 2), as DINO's cosine_scheduler
    schedule = warmup_cosine(0.04, 100, 0, 0.4)
    np.testing.assert_allclose(schedule[[0, 50]], [0.04, 0.22], atol=1e-12)
    # the loop applies it to the decaying group only (biases and norms stay at 0)
    small = build_config(
        backbone="convnet",
        backbone_args={"width": 4},
        data={"dataset": "digits", "subset": 128},
        optim={"name": "adamw", "weight_decay": 0.04, "weight_decay_end": 0.4},
        train={"epochs": 2, "batch_size": 64, "progress": False, "tensorboard": False},
    )
    run = train(small, tmp_path / "run")
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    decays = sorted((g["decay"], g["weight_decay"]) for g in meta["optimizer"]["param_groups"])
    expected = warmup_cosine(0.04, 4, 0, 0.4)[3]  # the value set before the last (4th) step
    assert decays[0] == (False, 0.0) and decays[1][0] is True
    assert decays[1][1] == pytest.approx(expected)
