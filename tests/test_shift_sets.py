from __future__ import annotations

import torch

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
