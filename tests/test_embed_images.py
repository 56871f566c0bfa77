"""``probssl embed`` / ``probssl.embed_images``: a trained run applied to images it has never seen."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

import probssl
from probssl.apply_run import knn_cosine_distance, write_embeddings
from probssl.cli import main
from probssl.config import build_config
from probssl.data import load_dataset, to_float
from probssl.data.sources import ArraySource
from probssl.eval.features import FeatureBank
from probssl.eval.ood_reference import calibration_slice
from probssl.runs import load_run
from probssl.train import train

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(tmp_path_factory, method: str):
    cfg = build_config(
        method=method,
        backbone="convnet",
        backbone_args={"width": 8},
        data={"dataset": "digits", "subset": 128},
        train={"epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False},
    )
    return train(cfg, tmp_path_factory.mktemp(method) / "run")


@pytest.fixture(scope="module")
def scl_run(tmp_path_factory):
    return _run(tmp_path_factory, "scl")


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    return _run(tmp_path_factory, "simclr")


def _test_images(n: int = 20) -> ArraySource:
    test = load_dataset("digits", "test")
    return ArraySource(test.images[:n], test.labels[:n], test.classes, "digits", "test")


def test_embed_images_matches_the_method_on_normalised_images(scl_run):
    source = _test_images()
    found = probssl.embed_images(scl_run, source, samples=3)
    assert found["embedding"].shape[0] == found["uncertainty"].shape[0] == found["path"].shape[0] == 20
    assert found["samples"].shape == (3, 20, found["embedding"].shape[1])
    assert list(found["path"][:2]) == ["digits/test[0]", "digits/test[1]"]

    run = load_run(scl_run)  # the independent path: the run's own normalisation, by hand
    x = to_float(load_dataset("digits", "test").images[:20], run.info.mean, run.info.std)
    direct = run.method.embed(x)
    torch.testing.assert_close(torch.from_numpy(found["embedding"]), direct.mean)
    torch.testing.assert_close(torch.from_numpy(found["uncertainty"]), direct.uncertainty)
    assert found["uncertainty"].std() > 0

    train_bank, _ = FeatureBank.load(scl_run / "features" / "train_S1.safetensors")  # cached on the way
    # The OOD reference: the training features less the calibration slice (docs/methods.md §5).
    reference = train_bank.mean[calibration_slice(train_bank.labels, run.config.train.seed).rest]
    nn = NearestNeighbors(n_neighbors=1, metric="cosine").fit(reference.numpy())
    distance, _ = nn.kneighbors(found["embedding"])
    np.testing.assert_allclose(found["ood_score"], distance[:, 0], atol=1e-5)
    assert (scl_run / "features" / "ood_reference_S1.safetensors").is_file()  # cached for the next call
    members = ("knn1", "mahalanobis_raw", "mahalanobis", "ssd", "emb")  # scl has an own uncertainty
    assert all(found[f"pvalue/{m}"].shape == (20,) for m in members)
    assert ((found["ood_pvalue"] > 0) & (found["ood_pvalue"] <= 1)).all()
    np.testing.assert_array_equal(found["ood_flag"], found["ood_pvalue"] < 0.05)
    assert (
        found["reliability"].shape == (20,)
        and ((found["reliability"] >= 0) & (found["reliability"] <= 1)).all()
    )
    assert list(found["classes"]) == [str(c) for c in range(10)] and found["knn_prediction"].max() < 10


def test_knn_cosine_distance_against_sklearn():
    g = torch.Generator().manual_seed(0)
    queries, reference = torch.randn(50, 6, generator=g), torch.randn(300, 6, generator=g)
    for k in (1, 4):
        distance, _ = (
            NearestNeighbors(n_neighbors=k, metric="cosine").fit(reference.numpy()).kneighbors(queries)
        )
        got = knn_cosine_distance(queries, reference, k=k, chunk=7)
        np.testing.assert_allclose(got.numpy(), distance[:, k - 1], atol=1e-5)
    with pytest.raises(ValueError, match="k=301"):
        knn_cosine_distance(queries, reference, k=301)


def test_written_npz_and_csv_ranked_by_ood_pvalue(tmp_path):
    rng = np.random.default_rng(0)
    pvalue = np.array([0.5, 0.01, 0.2, 0.01, 0.9, 0.01])
    result = {
        "embedding": rng.normal(size=(6, 3)).astype(np.float32),
        "uncertainty": np.array([0.2, 0.9, 0.1, 0.9, 0.5, 0.0], dtype=np.float32),
        "ood_score": np.array([0.3, 0.1, 0.5, 0.1, 0.2, 0.4], dtype=np.float32),
        "ood_pvalue": pvalue,
        "ood_flag": pvalue < 0.05,
        "pvalue/knn1": pvalue,
        "reliability": np.linspace(0.2, 0.9, 6),
        "knn_prediction": np.array([0, 1, 1, 0, 1, 0]),
        "classes": np.array(["cat", "dog"]),
        "path": np.array([f"img{i}.png" for i in range(6)]),
    }
    npz, table = write_embeddings(result, tmp_path / "out" / "found.npz")
    assert table == tmp_path / "out" / "found.csv"
    with np.load(npz) as saved:  # no pickled objects: paths are a unicode array
        for key, value in result.items():
            np.testing.assert_array_equal(saved[key], value)
    rows = list(csv.DictReader(table.open()))
    o, u = result["ood_score"], result["uncertainty"]
    expected = sorted(
        range(6), key=lambda i: (pvalue[i], -o[i], -u[i])
    )  # p-value up, then score, uncertainty down
    assert [r["path"] for r in rows] == [f"img{i}.png" for i in expected]
    assert expected[:3] == [5, 1, 3]  # the three at p = 0.01: highest ood_score first, then uncertainty
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["ood_flag"] for r in rows] == ["true"] * 3 + ["false"] * 3
    assert rows[0]["knn_prediction"] == "cat" and float(rows[0]["reliability"]) == pytest.approx(0.9)


def test_samples_on_a_deterministic_method_warn_once(simclr_run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = probssl.embed_images(simclr_run, _test_images(12), samples=4, batch_size=5)
    relevant = [w for w in caught if "no posterior draws" in str(w.message)]
    assert len(relevant) == 1 and "samples" not in found
    assert np.all(found["uncertainty"] == 0) and found["embedding"].shape[0] == 12


def test_one_image_file_of_another_size_and_colour(simclr_run, tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    found = probssl.embed_images(simclr_run, tmp_path / "photo.png")
    assert found["embedding"].shape == (1, 32) and found["path"][0].endswith("photo.png")
    assert np.isfinite(found["ood_score"]).all()


def test_images_in_memory_embed_as_the_same_images_in_a_folder(simclr_run, tmp_path, monkeypatch):
    # before: a tensor, an array or a list went to pathlib ("expected str, bytes or os.PathLike")
    from PIL import Image

    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    small = load_dataset("digits", "test").images[:5]  # uint8 [5, 1, 8, 8]: the run's size
    wide = rng.integers(0, 256, (3, 3, 12, 20), dtype=np.uint8)  # other size, aspect and colour
    for name, images in (("small", small.numpy()), ("wide", wide)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
            pil.save(tmp_path / name / f"{i}.png")
        from_files = probssl.embed_images(simclr_run, tmp_path / name)
        paths = sorted((tmp_path / name).glob("*.png"))
        given = {
            "tensor": torch.from_numpy(images),
            "array": images,
            "pillow": [Image.open(path) for path in paths],
            "paths": [str(path) for path in paths],
        }
        for kind, source in given.items():
            found = probssl.embed_images(simclr_run, source)
            np.testing.assert_allclose(found["embedding"], from_files["embedding"], atol=1e-6, err_msg=kind)
            np.testing.assert_allclose(found["ood_pvalue"], from_files["ood_pvalue"], err_msg=kind)
        assert list(found["path"]) == [str(path) for path in paths]
    assert list(probssl.embed_images(simclr_run, small)["path"][:2]) == ["images[0]", "images[1]"]


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 1, 8, 8), np.float32), r"must be uint8 pixels \(0-255\), got float32"),
        (np.zeros((1, 8, 8), np.uint8), r"one image: add its batch axis, images\[None\]"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"or 3 \(RGB\), got \[2, 8, 8, 3\] \(channels last"),
        ([], "no images given"),
        ([3], "images\\[0\\] is a int; a list must hold Pillow images or image paths"),
        (42, "cannot read images from a int; pass an image folder"),
    ],
)
def test_images_in_memory_of_the_wrong_kind_say_what_to_pass(simclr_run, images, message):
    with pytest.raises((probssl.data.DatasetError, TypeError), match=message):
        probssl.embed_images(simclr_run, images)


def test_embed_refuses_uint8_input_and_says_what_it_expects(simclr_run):
    method = load_run(simclr_run).method
    with pytest.raises(TypeError, match="expects normalised float images.*to_float"):
        method.embed(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_embed_refuses_one_image_without_its_batch_axis_and_float64(simclr_run):
    method = load_run(simclr_run).method  # before: "expected 4D input (got 3D input)" from a BatchNorm
    one_image = r"batch of images \[N, C, H, W\], got shape \[1, 8, 8\] \(one image: x.unsqueeze\(0\)\)"
    with pytest.raises(ValueError, match=one_image):
        method.embed(torch.zeros(1, 8, 8))
    # before: "expected scalar type Double but found Float"
    with pytest.raises(TypeError, match=r"float64 images: pass x.float\(\)"):
        method.embed(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    assert method.embed(torch.zeros(2, 1, 8, 8)).mean.shape[0] == 2


def test_cli_embed_on_a_flat_folder_of_other_sized_rgb_images(scl_run, tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(7):  # a flat folder: unlabelled, 12x12 RGB for an 8x8 grey run
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    out = tmp_path / "found.npz"
    assert (
        main(["embed", str(scl_run), str(folder), "--out", str(out), "--samples", "2", "--no-progress"]) == 0
    )
    out_text = capsys.readouterr().out
    assert (
        "embedded 7 images" in out_text and "ranked by OOD p-value" in out_text and "of 7 flagged" in out_text
    )
    with np.load(out) as found:
        n, d = found["embedding"].shape
        assert n == 7 and found["uncertainty"].shape == (7,) and found["ood_score"].shape == (7,)
        assert found["samples"].shape == (2, 7, d)
        assert sorted(Path(p).name for p in found["path"]) == [f"p{i}.png" for i in range(7)]
        by_path = {str(p): float(u) for p, u in zip(found["path"], found["uncertainty"], strict=True)}
        assert "reliability" not in found or found["reliability"].shape == (7,)
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    pvalues = [float(r["ood_pvalue"]) for r in rows]
    assert len(rows) == 7 and pvalues == sorted(pvalues)
    assert all(by_path[r["path"]] == pytest.approx(float(r["uncertainty"])) for r in rows)


def test_cli_embed_alpha_outside_zero_one_is_one_line_error(simclr_run, tmp_path, capsys):
    for alpha in ("0", "1", "-0.1", "5"):
        argv = ["embed", str(simclr_run), str(tmp_path), "--out", str(tmp_path / "x.npz"), "--alpha", alpha]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --alpha must lie strictly between 0 and 1") and err.count("\n") == 1


def test_a_calibration_slice_too_small_for_alpha_warns_with_the_smallest_p_value(simclr_run):
    # digits' 1,257 training images: a calibration slice of 126, 60 of them in fold B, so the combined
    # p-value cannot go below 1/61 and nothing can be flagged at α = 0.01.
    with pytest.warns(
        UserWarning, match=r"calibrated on 60 images: the smallest reachable p-value is 1/61 = 0\.01639"
    ):
        found = probssl.embed_images(simclr_run, _test_images(5), alpha=0.01)
    assert not found["ood_flag"].any() and found["ood_pvalue"].min() >= 1 / 61
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # α = 0.05 is reachable: no warning
        probssl.embed_images(simclr_run, _test_images(5), alpha=0.05)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        probssl.embed_images(simclr_run, _test_images(5), alpha=1.5)


def test_a_run_trained_on_unlabelled_images_has_no_reliability_and_says_why(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "flat"
    folder.mkdir()
    digits = load_dataset("digits", "train").images[:80, 0].numpy()
    for i, image in enumerate(digits):  # a flat folder: no class folders, labels -1
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    cfg = build_config(
        method="simclr",
        backbone="convnet",
        backbone_args={"width": 8},
        data={"dataset": str(folder)},
        train={"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False},
    )
    run = train(cfg, tmp_path / "run")
    with pytest.warns(UserWarning, match="no `reliability`: the run's training images have no labels"):
        found = probssl.embed_images(run, _test_images(6), alpha=0.5)
    assert "reliability" not in found and "knn_prediction" not in found
    assert found["ood_pvalue"].shape == (6,) and "pvalue/mahalanobis_raw" in found
    npz, table = write_embeddings(found, tmp_path / "found.npz")
    assert "reliability" not in table.read_text().splitlines()[0]


def test_the_embed_calibration_script_counts_flags_on_the_test_split(simclr_run, tmp_path):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "embed_calibration.py"
    out = tmp_path / "m.json"
    done = subprocess.run(
        [sys.executable, str(script), str(simclr_run), "--json", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())
    assert row["test_items"] == 540 and "alpha=0.05  flagged" in done.stdout
    found = probssl.embed_images(simclr_run, _test_images(540))
    assert row["fpr@0.05"] == pytest.approx(float((found["ood_pvalue"] < 0.05).mean()))
    low, high = row["fpr@0.05/ci95"]
    assert low <= row["fpr@0.05"] <= high
    refused = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: not a finished run")
