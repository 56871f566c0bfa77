"""``embed``'s fitted OOD reference: calibration slice, p-values against brute force, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.neighbors import NearestNeighbors

from probssl.data import DatasetError
from probssl.eval import ood_reference
from probssl.eval.conformal import FEATURE_MEMBERS
from probssl.eval.features import FeatureBank
from probssl.eval.knn import knn_predict_many
from probssl.eval.ood_reference import (
    CALIBRATION_MAX_ITEMS,
    MIN_CALIBRATION_ITEMS,
    OODReference,
    calibration_slice,
    fitted_reference,
    reference_key,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _bank(n: int, labelled: bool = True, own: bool = False, seed: int = 0) -> FeatureBank:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    centres = 3 * torch.randn(4, 12, generator=g)
    mean = centres[labels] + torch.randn(n, 12, generator=g)
    uncertainty = torch.rand(n, generator=g) if own else torch.zeros(n)
    return FeatureBank(mean[None], mean, uncertainty, labels if labelled else torch.full((n,), -1))


def _cosine_distance(reference: np.ndarray, query: np.ndarray) -> np.ndarray:
    nn = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(reference)
    return nn.kneighbors(query)[0][:, 0]


def test_calibration_slice_size_and_cap() -> None:
    small = calibration_slice(torch.arange(1000) % 10, seed=0)
    assert small.fold_a.numel() + small.fold_b.numel() == 100 and small.rest.numel() == 900
    large = calibration_slice(torch.arange(60_000) % 10, seed=0)
    assert large.fold_a.numel() + large.fold_b.numel() == CALIBRATION_MAX_ITEMS
    # A small training split sets aside at least MIN_CALIBRATION_ITEMS (folds of 20 reach α = 0.05) ...
    few = calibration_slice(torch.arange(200) % 4, seed=0)
    assert few.fold_a.numel() + few.fold_b.numel() == MIN_CALIBRATION_ITEMS and few.rest.numel() == 160
    # ... and at most half of it (22 photos of two classes: the case that once could not be embedded).
    tiny = calibration_slice(torch.arange(22) % 2, seed=0)
    assert tiny.fold_a.numel() >= 1 and tiny.fold_b.numel() >= 1 and tiny.rest.numel() >= 10
    with pytest.raises(DatasetError, match="too few to set a calibration slice aside"):
        calibration_slice(torch.zeros(2, dtype=torch.long), seed=0)


def test_pvalues_against_brute_force_on_the_reference_the_slice_left_out() -> None:
    bank = _bank(800, own=True)
    fitted = OODReference.fit(bank, seed=3, temperature=0.07)
    split = calibration_slice(bank.labels, 3)
    assert fitted.reference.shape[0] == split.rest.numel() == 720
    assert fitted.members == (*FEATURE_MEMBERS, "emb")
    query = torch.cat([_bank(30, seed=9).mean, 5 * torch.randn(10, 12)])
    own = torch.rand(40)
    found = fitted.apply(query, own)
    reference = bank.mean[split.rest].numpy()
    distance = _cosine_distance(reference, query.numpy())
    np.testing.assert_allclose(found["ood_score"].numpy(), distance, atol=1e-5)
    # pvalue/knn1: the query's distance against those of the whole calibration slice (A ∪ B).
    calibration = _cosine_distance(reference, bank.mean[split.calibration].numpy())
    expected = [(1 + np.sum(calibration >= d - 1e-6)) / (len(calibration) + 1) for d in distance]
    np.testing.assert_allclose(found["pvalue/knn1"].numpy(), expected)
    u_cal = bank.uncertainty[split.calibration].double().numpy()
    expected_emb = [(1 + np.sum(u_cal >= u)) / (len(u_cal) + 1) for u in own.double().numpy()]
    np.testing.assert_allclose(found["pvalue/emb"].numpy(), expected_emb)
    # The combined p-value lives on the grid k / (|B| + 1) and flags the far-away rows first.
    grid = found["ood_pvalue"].numpy() * (split.fold_b.numel() + 1)
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-9)
    assert found["ood_pvalue"][30:].max() <= found["ood_pvalue"][:30].median()
    # reliability: scikit-learn's isotonic fit of kNN-correct on the slice's top vote share.
    votes = knn_predict_many(
        bank.mean[split.rest], bank.labels[split.rest], bank.mean[split.calibration], 4, (20,), 0.07
    )[20]
    share, prediction = votes.max(1)
    correct = (prediction == bank.labels[split.calibration]).numpy()
    isotonic = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(share.numpy(), correct)
    query_votes = knn_predict_many(bank.mean[split.rest], bank.labels[split.rest], query, 4, (20,), 0.07)[20]
    np.testing.assert_allclose(
        found["reliability"].numpy(), isotonic.predict(query_votes.max(1).values.numpy()), atol=1e-6
    )
    assert torch.equal(found["knn_prediction"], query_votes.argmax(1))  # fmt: skip


def test_unlabelled_training_data_one_gaussian_and_no_reliability() -> None:
    bank = _bank(400, labelled=False)
    fitted = OODReference.fit(bank, seed=0, temperature=0.07)
    assert fitted.reliability is None and fitted.members == FEATURE_MEMBERS
    assert fitted.gaussians["mahalanobis_raw"].means.shape[0] == 1
    found = fitted.apply(bank.mean[:5], torch.zeros(5))
    assert "reliability" not in found and "pvalue/emb" not in found and found["ood_pvalue"].shape == (5,)


def test_fitted_reference_is_cached_and_refitted_when_the_key_changes(tmp_path, monkeypatch) -> None:
    bank = _bank(500)
    path = tmp_path / "features" / "ood_reference_S1.safetensors"
    key = reference_key("bank-key", 0, 0.07)
    first = fitted_reference(path, key, bank, 0, 0.07)
    query = torch.randn(25, 12)
    expected = first.apply(query, torch.zeros(25), k=3)
    calls = []
    real_fit = OODReference.fit
    monkeypatch.setattr(OODReference, "fit", classmethod(lambda cls, *a: calls.append(a) or real_fit(*a)))
    again = fitted_reference(path, key, bank, 0, 0.07)
    assert calls == []  # read, not refitted
    got = again.apply(query, torch.zeros(25), k=3)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value)
    fitted_reference(path, reference_key("other-weights", 0, 0.07), bank, 0, 0.07)
    assert len(calls) == 1  # a different bank key: refitted
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="ignoring unreadable OOD reference"):
        fitted_reference(path, key, bank, 0, 0.07)
    assert ood_reference.RANK_TOLERANCE.__repr__() in key  # the rule's constants are part of the key
