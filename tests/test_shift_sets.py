from __future__ import annotations

import torch

from probssl.data.catalog import DatasetError
from probssl.data.shift_sets import conform, load_shift_set, smooth_noise


def test_conform_area_downsamples_and_converts_channels():
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    images[:, :, :14, :14] = 255  # top-left quadrant white
    small = conform(images, 1, 8)
    assert small.shape == (2, 1, 8, 8) and small.dtype == torch.uint8
    assert small[0, 0, :3, :3].min() == 255 and small[0, 0, 5:, 5:].max() == 0
    rgb = conform(images, 3, 28)
    assert rgb.shape == (2, 3, 28, 28) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = conform(rgb, 1, 28)
    assert torch.equal(back, images)


def test_noise_set_is_deterministic_and_shaped_like_the_dataset():
    a = load_shift_set("noise", "digits", None, max_items=10, seed=3)
    b = load_shift_set("noise", "digits", None, max_items=10, seed=3)
    assert a.images.shape == (10, 1, 8, 8) and torch.equal(a.images, b.images)
    assert not torch.equal(smooth_noise(4, 1, 8, seed=0), smooth_noise(4, 1, 8, seed=1))


def test_shift_suite_averages_each_severity_over_corruptions():
    """shift/severity<k>/<metric> is the mean over corruptions of the per-(corruption, k) values."""
    import pytest

    from probssl.eval.features import FeatureBank
    from probssl.eval.suite import shift_suite

    class FixedProbe:
        def sample_probs(self, draws):
            return torch.nn.functional.one_hot(draws[0, :, 0].long() % 2, 2).float()[None]

    labels = torch.tensor([0, 1, 0, 1])
    offsets = {"a": 0.0, "b": 1.0}  # corruption b flips every prediction

    def corrupt(images, name, severity):
        return images + offsets[name] + 10 * severity  # the severity is read back as the uncertainty

    def embed(images):
        u = images[:, 0, 0, 0].float()
        draws = (images[:, 0, 0, 0] % 10).float()[None, :, None]
        return FeatureBank(draws=draws, mean=draws[0], uncertainty=u, labels=labels)

    def embed_all(image_sets):
        return [embed(images) for images in image_sets]

    images = labels.view(4, 1, 1, 1).float()
    out, _ = shift_suite(FixedProbe(), embed_all, images, labels, ["a", "b"], corrupt, severities=(1, 2))
    for s in (1, 2):
        assert out[f"shift/severity{s}/acc"] == (out[f"shift/a/{s}/acc"] + out[f"shift/b/{s}/acc"]) / 2 == 0.5
        expected = (out[f"shift/a/{s}/emb_uncertainty"] + out[f"shift/b/{s}/emb_uncertainty"]) / 2
        assert out[f"shift/severity{s}/emb_uncertainty"] == pytest.approx(expected)
    assert out["shift/severity2/emb_uncertainty"] > out["shift/severity1/emb_uncertainty"]
    # A method without an uncertainty of its own gets no emb_uncertainty keys, not zeros.
    plain, details = shift_suite(
        FixedProbe(), embed_all, images, labels, ["a"], corrupt, severities=(1, 2), own_uncertainty=False
    )
    assert not [k for k in plain if "emb_uncertainty" in k] and "emb_uncertainty" not in details["a"]
    assert plain["shift/a/1/acc"] == out["shift/a/1/acc"]


# ------------------------------------------------------------------ configurable OOD / transfer sets


def test_set_names_default_per_dataset_and_follow_the_config():
    from probssl.data.shift_sets import ood_set_names, transfer_set_names

    assert ood_set_names("cifar10_jpeg") == ("tiny_imagenet_val", "mnist", "noise")
    assert transfer_set_names("cifar10_jpeg") == ("eurosat_test",)
    assert ood_set_names("fashion_mnist") == ("mnist", "noise")  # the other defaults are unchanged
    assert ood_set_names("/my/folder") == ("noise",) and transfer_set_names("/my/folder") == ()
    assert ood_set_names("cifar10_jpeg", ["/a/b.tar", "noise"]) == ("/a/b.tar", "noise")
    assert transfer_set_names("mnist", "x, y") == ("x", "y")
    assert ood_set_names("mnist", ()) == ()


def test_conform_turns_rgb_into_luminance_and_grey_into_three_equal_channels():
    red = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    red[:, 0] = 255
    assert conform(red, 1, 4).unique().tolist() == [round(0.299 * 255)]
    grey = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    assert torch.equal(conform(grey, 3, 4), grey.expand(1, 3, 4, 4))


def _folder(root, count, labelled, size=(20, 24)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / (f"c{i % 2}" if labelled else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


def test_a_path_is_an_ood_set_at_the_runs_size_and_channels(tmp_path, monkeypatch):
    import numpy as np

    from probssl.data import DatasetInfo, open_source

    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "ood", 12, labelled=False)
    grey_run = DatasetInfo("run", 1, 8, 10, ("train", "test"), (0.5,), (0.5,))
    ood = load_shift_set(str(root), grey_run, None)
    assert ood.images.shape == (12, 1, 8, 8) and ood.labels.tolist() == [-1] * 12
    rgb = np.stack([open_source(str(root), "all", image_size=8).read(i) for i in range(12)]).astype(float)
    luminance = np.einsum("nchw,c->nhw", rgb, [0.299, 0.587, 0.114])
    assert np.abs(ood.images[:, 0].numpy() - luminance).max() <= 0.5 + 1e-6
    subset = load_shift_set(str(root), grey_run, None, max_items=5, seed=3)
    keep = torch.randperm(12, generator=torch.Generator().manual_seed(3))[:5].sort().values
    assert torch.equal(subset.images, ood.images[keep])
    import pytest

    with pytest.raises(DatasetError, match="no class labels"):
        load_shift_set(str(root), grey_run, None, need_labels=True)
    labelled = load_shift_set(
        str(_folder(tmp_path / "t", 6, labelled=True)), grey_run, None, need_labels=True
    )
    assert labelled.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_grey_array_set_is_conformed_to_an_rgb_run():
    from probssl.data import DatasetInfo

    rgb_run = DatasetInfo("run", 3, 16, 10, ("train", "test"), (0.5,) * 3, (0.5,) * 3)
    far = load_shift_set("digits", rgb_run, None, max_items=7)
    assert far.images.shape == (7, 3, 16, 16)
    assert torch.equal(far.images[:, 0], far.images[:, 1]) and torch.equal(far.images[:, 1], far.images[:, 2])
