"""R-AUROC, the crop test, near/far OOD groups and the reference detector vs brute force / sklearn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from probssl.eval import suite
from probssl.eval.crop_test import crop_boxes, crop_up_share, random_crops
from probssl.eval.features import FeatureBank
from probssl.eval.ood_groups import ood_group
from probssl.eval.retrieval import recall_at_k

pytestmark = pytest.mark.usefixtures("single_thread")


def _loo_1nn_errors(x: torch.Tensor, labels: torch.Tensor) -> list[bool]:
    """Plain loops: item i is an error when its most cosine-similar other item has another label."""
    rows = x.double().tolist()
    norms = [sum(v * v for v in r) ** 0.5 for r in rows]
    errors = []
    for i, a in enumerate(rows):
        best, best_j = -2.0, -1
        for j, b in enumerate(rows):
            if j != i:
                cos = sum(p * q for p, q in zip(a, b, strict=True)) / (norms[i] * norms[j])
                if cos > best:
                    best, best_j = cos, j
        errors.append(int(labels[best_j]) != int(labels[i]))
    return errors


def test_r_auroc_matches_brute_force_errors_and_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (50,), generator=g)
    x = torch.randn(3, 4, generator=g)[labels] + 1.2 * torch.randn(50, 4, generator=g)
    unc = torch.rand(50, generator=g)
    bank = FeatureBank(draws=x[None], mean=x, uncertainty=unc, labels=labels)
    scores = {"emb": unc, "entropy": torch.rand(50, generator=g)}
    out = suite.r_auroc_suite(bank, scores)
    errors = _loo_1nn_errors(x, labels)
    assert 0 < sum(errors) < 50
    assert out["ret/emb/r_auroc"] == pytest.approx(roc_auc_score(errors, unc.numpy()), abs=1e-12)
    assert out["ret/entropy/r_auroc"] == pytest.approx(
        roc_auc_score(errors, scores["entropy"].numpy()), abs=1e-12
    )
    assert out["ret/r_auroc"] == out["ret/emb/r_auroc"]  # the method's own uncertainty when it has one
    assert 1 - sum(errors) / 50 == pytest.approx(recall_at_k(x, labels, ks=(1,))["recall@1"])
    del scores["emb"]
    assert suite.r_auroc_suite(bank, scores)["ret/r_auroc"] == out["ret/entropy/r_auroc"]
    assert suite.r_auroc_suite(bank, scores, max_items=20)["ret/r_auroc_items"] == 20
    one_hot = F.one_hot(labels, 3).float()  # same label: cosine 1, other label: 0 — no retrieval errors
    separated = FeatureBank(draws=one_hot[None], mean=one_hot, uncertainty=unc, labels=labels)
    assert suite.r_auroc_suite(separated, scores) == {"ret/r_auroc_items": 50}  # no errors: undefined


def test_crop_boxes_and_crops_match_manual_resize() -> None:
    images = torch.randint(
        0, 256, (5, 2, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    boxes = crop_boxes(5, 12, 10, 0.25, seed=3)
    assert (boxes[:, 2] == 6).all() and (boxes[:, 3] == 5).all()  # half of each side = a quarter of the area
    assert ((boxes[:, 0] >= 0) & (boxes[:, 0] + 6 <= 12) & (boxes[:, 1] >= 0) & (boxes[:, 1] + 5 <= 10)).all()
    crops = random_crops(images, 0.25, seed=3)
    assert crops.shape == images.shape and crops.dtype == torch.uint8
    torch.testing.assert_close(random_crops(images, 0.25, seed=3), crops)  # seeded
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        patch = images[i : i + 1, :, top : top + h, left : left + w].float()
        manual = (
            F.interpolate(patch, size=(12, 10), mode="bilinear", align_corners=False).round().to(torch.uint8)
        )
        torch.testing.assert_close(crops[i], manual[0])
    with pytest.raises(ValueError):
        crop_boxes(1, 8, 8, 0.0, seed=0)


def test_crop_test_on_toy_uncertainties_with_known_answers() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8, generator=g)
    constant = torch.full((10, 1, 16, 16), 77, dtype=torch.uint8)

    def inverse_contrast(images: torch.Tensor) -> torch.Tensor:  # low pixel spread = "uncertain"
        return -images.float().flatten(1).std(dim=1)

    cropped_noise = random_crops(noise, 0.25, seed=0)
    # Upsampling a crop of i.i.d. noise smooths it: the spread falls for every image...
    assert crop_up_share(inverse_contrast(noise), inverse_contrast(cropped_noise)) == 1.0
    # ... so an uncertainty that rises with spread falls for every image,
    assert crop_up_share(-inverse_contrast(noise), -inverse_contrast(cropped_noise)) == 0.0
    # and a constant image is unchanged by cropping: equal is not a rise.
    cropped_constant = random_crops(constant, 0.25, seed=0)
    torch.testing.assert_close(cropped_constant, constant)
    assert crop_up_share(inverse_contrast(constant), inverse_contrast(cropped_constant)) == 0.0
    mixed = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert crop_up_share(mixed, torch.tensor([2.0, 2.0, 1.0, 5.0])) == 0.5


def test_crop_suite_absent_without_own_uncertainty() -> None:
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)

    def embed(batch: torch.Tensor) -> FeatureBank:
        x = batch.float().flatten(1)
        unc = -x.std(dim=1)
        return FeatureBank(
            draws=x[None], mean=x, uncertainty=unc, labels=torch.zeros(len(x), dtype=torch.long)
        )

    assert suite.crop_suite(embed, images, torch.zeros(6), seed=0) == {}
    out = suite.crop_suite(embed, images, embed(images).uncertainty, seed=0)
    expected = crop_up_share(embed(images).uncertainty, embed(random_crops(images, 0.25, 0)).uncertainty)
    assert out == {"sel/crop_up": expected, "sel/crop_items": 6}


def test_ood_suite_reference_detector_and_sklearn_auroc() -> None:
    g = torch.Generator().manual_seed(0)
    scores_in = {"msp": torch.rand(30, generator=g), "knn1": torch.rand(30, generator=g)}
    scores_out = {"msp": torch.rand(20, generator=g), "knn1": torch.rand(20, generator=g) + 0.3}
    out, plot = suite.ood_suite(
        "mnist", {**scores_in, "entropy": scores_in["msp"]}, {**scores_out, "entropy": scores_out["msp"]}
    )
    is_ood = [0] * 30 + [1] * 20
    knn = torch.cat([scores_in["knn1"], scores_out["knn1"]]).numpy()
    assert out["ood/mnist/knn1/auroc"] == pytest.approx(roc_auc_score(is_ood, knn), abs=1e-12)
    for key in ("auroc", "aupr_in", "aupr_out", "fpr95"):
        assert out[f"ood/mnist/best_feature/{key}"] == out[f"ood/mnist/{suite.REFERENCE_DETECTOR}/{key}"]
    assert out["ood/mnist/best_feature/detector"] == "knn1"
    assert plot["by_criterion"]["knn1"]["score_out"] == scores_out["knn1"].tolist()
    assert set(plot["by_criterion"]) == {"knn1"}  # no own uncertainty: no emb histogram
    out, _ = suite.ood_suite(
        "noise",
        {"msp": scores_in["msp"], "entropy": scores_in["msp"]},
        {"msp": scores_out["msp"], "entropy": scores_out["msp"]},
    )
    assert not any("best_feature" in key for key in out)


def test_ood_groups_and_means() -> None:
    assert ood_group("fashion_mnist", "mnist") == "near"
    assert ood_group("fashion_mnist", "noise") == "far"
    assert ood_group("cifar10", "svhn") == "far" and ood_group("cifar10", "cifar100") == "near"
    assert (
        ood_group("cifar10_jpeg", "tiny_imagenet_val") == "near"
        and ood_group("cifar10_jpeg", "mnist") == "far"
    )
    assert ood_group("fashion_mnist", "my_photos") is None
    results = {
        "ood/svhn/auroc": 0.6,
        "ood/svhn/knn1/auroc": 0.9,
        "ood/svhn/emb/auroc": 0.7,
        "ood/svhn/knn1/fpr95": 0.3,
        "ood/noise/auroc": 0.8,
        "ood/noise/knn1/auroc": 1.0,
        "ood/cifar100/knn1/auroc": 0.75,
        "ood/cifar100/positive": "ood",
        "ood/mine/knn1/auroc": 0.1,
    }
    out = suite.ood_group_means(results, "cifar10", ["svhn", "noise", "cifar100", "mine"])
    assert out == {
        "ood/near/sets": "cifar100",
        "ood/near/knn1/auroc": 0.75,
        "ood/far/sets": "svhn, noise",
        "ood/far/auroc": pytest.approx(0.7),
        "ood/far/knn1/auroc": pytest.approx(0.95),
    }  # emb only on svhn: not a mean over the group; fpr95 not averaged; "mine" in no group
    assert suite.ood_group_means({}, "cifar10", []) == {}


def test_selective_suite_without_own_uncertainty_has_no_emb_keys() -> None:
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(40, generator=g) > 0.3
    scores = {"entropy": torch.rand(40, generator=g), "knn1": torch.rand(40, generator=g)}
    out = suite.selective_suite(scores, correct)
    assert not any(key.startswith("sel/emb/") for key in out)
    assert out["sel/knn1/err_auroc"] == pytest.approx(roc_auc_score(~correct.numpy(), scores["knn1"].numpy()))
    out = suite.selective_suite({**scores, "emb": scores["knn1"]}, correct)
    assert out["sel/emb/err_auroc"] == out["sel/knn1/err_auroc"]


@pytest.mark.parametrize("all_right", [True, False])
def test_selective_suite_leaves_out_error_rankings_when_there_is_nothing_to_rank(all_right: bool) -> None:
    g = torch.Generator().manual_seed(1)
    correct = torch.full((30,), all_right)
    scores = {s: torch.rand(30, generator=g) for s in ("entropy", "emb", "knn1")}
    out = suite.selective_suite(scores, correct)
    assert not [k for k in out if k.endswith(("err_auroc", "spearman"))]  # not a measured-looking 0.5 / 0.0
    assert out["sel/aurc"] == (0.0 if all_right else 1.0) and "sel/knn1/aurc" in out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "vi_simsiam", "ensemble"])
def test_uncertainty_suite_end_to_end_writes_only_defined_metrics(method: str, tmp_path) -> None:
    import warnings

    from probssl.config import build_config
    from probssl.eval.evaluate import evaluate_run
    from probssl.train import train

    cfg = build_config(
        None,
        ["backbone.width=8"],
        method=method,
        data={"dataset": "digits", "subset": 128},
        train={"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an OOD set missing from the data dir is skipped with a warning
        results = evaluate_run(train(cfg, tmp_path / "run"), progress=False, suite_name="uncertainty")
    deterministic = method == "simclr"
    sampled = results["meta/samples"] > 1
    assert sampled == (method == "ensemble")
    for key in (
        "ood/noise/knn1/auroc",
        "ood/noise/mahalanobis_kmeans/auroc",
        "ood/noise/ssd/auroc",
        "ood/noise/energy/auroc",
        "ret/r_auroc",
    ):
        assert 0.0 <= results[key] <= 1.0
    assert results["ood/noise/best_feature/auroc"] == results["ood/noise/knn1/auroc"]
    assert results["ood/far/knn1/auroc"] == results["ood/noise/knn1/auroc"]  # noise is far-OOD
    # The combined detector (docs/methods.md §5) on the scored half of the test split.
    for key in (
        "ood/noise/combined/auroc",
        "ood/noise/combined/tpr@0.05",
        "ood/noise/combined_features/auroc",
        "ood/id/combined/fpr@0.01",
        "ood/id/combined/fpr@0.05",
        "ood/id/combined/fpr@0.1",
        "sel/reliability/ece",
    ):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["ood/id/scored_items"] + results["ood/id/calibration_items"] == 540  # digits' test split
    assert "scored half" in results["meta/ood_protocol"]
    combined_same = results["ood/noise/combined/auroc"] == results["ood/noise/combined_features/auroc"]
    assert combined_same or not deterministic  # without an own uncertainty the two are one rule
    assert ("ood/noise/emb/auroc" in results) == (not deterministic)
    assert ("sel/emb/err_auroc" in results) == (not deterministic)
    assert ("sel/crop_up" in results) == (not deterministic)
    assert ("ood/noise/mi/auroc" in results) == sampled
    assert ("ood/noise/knn1_bma/auroc" in results) == sampled


def test_conformal_and_reliability_blocks_against_numpy_and_sklearn() -> None:
    """``ood/id/.../fpr@α`` and ``sel/reliability/*`` of eval.json, recomputed by brute force."""
    import numpy as np
    from sklearn.isotonic import IsotonicRegression

    from probssl.eval.calibration import binned_ece
    from probssl.eval.conformal import CalibrationSplit, fit_combined
    from probssl.eval.ood import binary_auroc

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    shared = torch.randn(400, generator=g, dtype=torch.float64)
    scores = {m: shared + torch.randn(400, generator=g, dtype=torch.float64) for m in ("knn1", "ssd")}
    scores["entropy"] = torch.rand(400, generator=g, dtype=torch.float64)
    split = CalibrationSplit.of(labels, seed=0)
    cal, rest = split.calibration.numpy(), split.rest.numpy()
    out = suite.member_fpr_suite(scores, split)
    assert set(out) == {"ood/id/knn1/fpr@0.05", "ood/id/ssd/fpr@0.05", "ood/id/entropy/fpr@0.05"}
    for name in ("knn1", "ssd", "entropy"):
        c, s = scores[name].numpy()[cal], scores[name].numpy()[rest]
        p = np.array([(1 + (c >= x).sum()) / (len(c) + 1) for x in s])
        assert out[f"ood/id/{name}/fpr@0.05"] == pytest.approx((p < 0.05).mean())
    combined = fit_combined(scores, split)
    pvalues = {name: d.pvalue({k: v[split.rest] for k, v in scores.items()}) for name, d in combined.items()}
    block = suite.conformal_id_suite(pvalues, split)
    assert block["ood/id/scored_items"] == 200 and block["ood/id/calibration_items"] == 200
    for alpha in (0.01, 0.05, 0.1):
        assert block[f"ood/id/combined/fpr@{alpha:g}"] == pytest.approx(
            (pvalues["combined"] < alpha).double().mean().item()
        )
    # reliability: isotonic fit on the calibration half, judged on the scored half
    probs = torch.softmax(3 * torch.randn(400, 4, generator=g), dim=1)
    out = suite.reliability_suite(probs, labels, split)
    share, prediction = probs.max(1)
    correct = (prediction == labels).numpy()
    fitted = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(share.numpy()[cal], correct[cal])
    reliability = fitted.predict(share.numpy()[rest])
    expected_ece = binned_ece(torch.from_numpy(reliability), torch.from_numpy(correct[rest]))
    assert out["sel/reliability/ece"] == pytest.approx(expected_ece, abs=1e-6)  # float32 shares
    assert out["sel/reliability/err_auroc"] == pytest.approx(
        binary_auroc(1 - reliability, ~correct[rest]), abs=1e-9
    )


@pytest.mark.parametrize("draws", [1, 3])
def test_collapsed_embedding_scores_zero_on_every_retrieval_key(draws: int) -> None:
    """Issue 28's reproducer (1,000 items, 10 classes, one point): recall@1 was 0.0 but AUSC 0.106, its
    oracle 0.294 and the retrieval ECE 0.901 (lowest-index ties). One tie rule (against the query): no
    retrieval is ever right, so the curve and its oracle are 0 and every confident 1-NN vote is wrong."""
    g = torch.Generator().manual_seed(0)
    point = torch.randn(1, 16, generator=g)
    labels = torch.arange(1000) % 10
    bank = FeatureBank(
        draws=point.expand(draws, 1000, 16).contiguous(),
        mean=point.expand(1000, 16).contiguous(),
        uncertainty=torch.rand(1000, generator=g),
        labels=labels,
    )
    out, details = suite.retrieval_suite(bank, bank.uncertainty)
    assert out["ret/recall@1"] == out["ret/recall@10"] == out["ret/map@r"] == 0.0
    assert out["ret/ausc"] == out["ret/ausc_oracle"] == 0.0
    assert details["accuracy"] == details["oracle"] == [0.0] * 20
    assert out["ret/ece"] == 1.0
    assert suite.r_auroc_suite(bank, {"emb": bank.uncertainty}) == {"ret/r_auroc_items": 1000}


def test_retrieval_keys_agree_on_their_hits_with_exact_ties() -> None:
    """Exact copies of 8 directions, four of them under mixed labels: recall@1, the sparsification curve
    at 0% removed, R-AUROC's errors (brute force) and, with one draw, 1 − the retrieval ECE are one hit
    rate; one leave-one-out pass (``leave_one_out_retrieval``) serves them all with the same numbers."""
    g = torch.Generator().manual_seed(4)
    prototypes = torch.randn(8, 12, generator=g)
    groups = torch.randint(0, 8, (300,), generator=g)
    labels = torch.where(groups < 4, groups, torch.randint(0, 5, (300,), generator=g))
    x = prototypes[groups]
    bank = FeatureBank(draws=x[None], mean=x, uncertainty=torch.rand(300, generator=g), labels=labels)
    out, details = suite.retrieval_suite(bank, bank.uncertainty)
    errors = _tied_1nn_errors(prototypes, groups, labels)
    hit_rate = 1 - sum(errors) / 300
    assert 0.3 < hit_rate < 0.7
    assert out["ret/recall@1"] == pytest.approx(hit_rate, abs=1e-15)
    assert details["accuracy"][0] == pytest.approx(hit_rate, abs=1e-15)
    assert out["ret/ece"] == pytest.approx(1 - hit_rate, abs=1e-12)
    r_auroc = suite.r_auroc_suite(bank, {"emb": bank.uncertainty})
    assert r_auroc["ret/emb/r_auroc"] == pytest.approx(
        roc_auc_score(errors, bank.uncertainty.numpy()), abs=1e-12
    )
    shared = suite.leave_one_out_retrieval(bank)
    assert suite.retrieval_suite(bank, bank.uncertainty, retrieval=shared)[0] == out
    assert suite.r_auroc_suite(bank, {"emb": bank.uncertainty}, retrieval=shared) == r_auroc


def _tied_1nn_errors(prototypes: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Brute force, ties against the query: item i's retrieval is an error unless its best same-label
    item is strictly more similar than every other-label item (copies of one direction tie exactly)."""
    cos = F.normalize(prototypes.double(), dim=1) @ F.normalize(prototypes.double(), dim=1).T
    errors = []
    for i in range(len(groups)):
        others = [j for j in range(len(groups)) if j != i]
        same = [float(cos[groups[i], groups[j]]) for j in others if labels[j] == labels[i]]
        other = [float(cos[groups[i], groups[j]]) for j in others if labels[j] != labels[i]]
        errors.append(int(not same or (bool(other) and max(other) >= max(same))))
    return errors
