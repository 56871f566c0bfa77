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
    nn = NearestNeighbors(n_neighbors=1, metric="cosine").fit(train_bank.mean.numpy())
    distance, _ = nn.kneighbors(found["embedding"])
    np.testing.assert_allclose(found["ood_score"], distance[:, 0], atol=1e-5)


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


def test_written_npz_and_csv_ranked_by_uncertainty(tmp_path):
    rng = np.random.default_rng(0)
    result = {
        "embedding": rng.normal(size=(6, 3)).astype(np.float32),
        "uncertainty": np.array([0.2, 0.9, 0.1, 0.9, 0.5, 0.0], dtype=np.float32),
        "ood_score": np.array([0.3, 0.1, 0.5, 0.7, 0.2, 0.4], dtype=np.float32),
        "path": np.array([f"img{i}.png" for i in range(6)]),
    }
    npz, table = write_embeddings(result, tmp_path / "out" / "found.npz")
    assert table == tmp_path / "out" / "found.csv"
    with np.load(npz) as saved:  # no pickled objects: paths are a unicode array
        for key, value in result.items():
            np.testing.assert_array_equal(saved[key], value)
    rows = list(csv.DictReader(table.open()))
    u, o = result["uncertainty"], result["ood_score"]
    expected = sorted(range(6), key=lambda i: (-u[i], -o[i]))  # uncertainty, then OOD score, descending
    assert [r["path"] for r in rows] == [f"img{i}.png" for i in expected]
    assert expected == [3, 1, 4, 0, 2, 5]  # the 0.9 tie goes to the higher OOD score
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert float(rows[2]["ood_score"]) == pytest.approx(float(o[4]))


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


def test_embed_refuses_uint8_input_and_says_what_it_expects(simclr_run):
    method = load_run(simclr_run).method
    with pytest.raises(TypeError, match="expects normalised float images.*to_float"):
        method.embed(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


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
    assert "embedded 7 images" in capsys.readouterr().out
    with np.load(out) as found:
        n, d = found["embedding"].shape
        assert n == 7 and found["uncertainty"].shape == (7,) and found["ood_score"].shape == (7,)
        assert found["samples"].shape == (2, 7, d)
        assert sorted(Path(p).name for p in found["path"]) == [f"p{i}.png" for i in range(7)]
        by_path = {str(p): float(u) for p, u in zip(found["path"], found["uncertainty"], strict=True)}
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    uncertainties = [float(r["uncertainty"]) for r in rows]
    assert len(rows) == 7 and uncertainties == sorted(uncertainties, reverse=True)
    assert all(by_path[r["path"]] == pytest.approx(float(r["uncertainty"])) for r in rows)


def test_cli_embed_of_a_missing_source_is_one_clear_error(simclr_run, tmp_path, capsys):
    assert main(["embed", str(simclr_run), str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


def test_cli_embed_of_a_folder_with_a_corrupt_image(simclr_run, tmp_path, monkeypatch, capsys):
    """Without --skip-corrupt: one error naming the file and the flag; with it: the readable images,
    and the unreadable one named in the .npz."""
    from PIL import Image

    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    out = tmp_path / "found.npz"
    argv = ["embed", str(simclr_run), str(folder), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "--skip-corrupt" in err and "data.skip_corrupt" not in err
    assert not out.exists()
    assert main([*argv, "--skip-corrupt"]) == 0
    assert "skipped 1 unreadable image" in capsys.readouterr().out
    with np.load(out) as found:
        assert sorted(Path(p).name for p in found["path"]) == ["p0.png", "p1.png", "p2.png"]
        assert [Path(p).name for p in found["skipped"]] == ["broken.png"]
