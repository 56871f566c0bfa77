"""Registered image-folder sets (cifar10_jpeg, tiny_imagenet_val, eurosat_test): tiny fake tars in the
published layout with the checksum table patched to accept them, and the real files when present."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probssl import io as probssl_io
from probssl.data import (
    DATASETS,
    DatasetError,
    dataset_names,
    load_dataset,
    open_source,
    registered_folders,
    resolve_dataset_info,
)
from probssl.data.catalog import CIFAR10_CLASSES, EUROSAT_CLASSES

ROOT = Path(__file__).resolve().parents[1]


def _real_data() -> Path | None:
    candidates = [
        os.environ.get("PROBSSL_DATA"),
        ROOT.parent / "shared" / "data",
        ROOT.parents[1] / "shared" / "data",
    ]
    for c in candidates:
        if c and (Path(c) / "cifar10_jpeg" / "test.tar").is_file():
            return Path(c)
    return None


@pytest.fixture(autouse=True)
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registered_folders, "_SHA_MEMO", {})
    return tmp_path / "cache"


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def trust(monkeypatch: pytest.MonkeyPatch, data_dir: Path, *relative: str) -> None:
    table = dict(registered_folders.SHA256)
    for rel in relative:
        table[rel] = hashlib.sha256((data_dir / rel).read_bytes()).hexdigest()
    monkeypatch.setattr(registered_folders, "SHA256", table)


def fake_cifar(data_dir: Path, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        members = {
            f"{split}/{cls}/{i:04d}.jpg": encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG")
            for cls in CIFAR10_CLASSES
            for i in range(n)
        }
        write_tar(data_dir / "cifar10_jpeg" / f"{split}.tar", members)


def test_registered_sets_are_listed_with_their_facts() -> None:
    names = dataset_names()
    assert {"cifar10_jpeg", "tiny_imagenet_val", "eurosat_test"} <= set(names)
    assert DATASETS["cifar10_jpeg"].splits == ("train", "test", "all")
    assert DATASETS["tiny_imagenet_val"].splits == ("test", "all")
    assert (DATASETS["eurosat_test"].num_classes, DATASETS["tiny_imagenet_val"].num_classes) == (10, 200)


def test_cifar10_jpeg_from_fake_tars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    fake_cifar(data, {"train": 3, "test": 1})
    trust(monkeypatch, data, "cifar10_jpeg/train.tar", "cifar10_jpeg/test.tar")
    train = load_dataset("cifar10_jpeg", "train", data)
    assert train.images.shape == (30, 3, 32, 32) and train.classes == list(CIFAR10_CLASSES)
    assert np.bincount(train.labels.numpy()).tolist() == [3] * 10
    test = open_source("cifar10_jpeg", "test", data_dir=data)
    assert len(test) == 10 and test.item_id(0).endswith("test.tar:test/airplane/0000.jpg")
    everything = open_source("cifar10_jpeg", "all", data_dir=data)
    assert len(everything) == 40
    assert np.array_equal(everything.read(35), test.read(5))  # 'all' = train then test
    assert resolve_dataset_info("cifar10_jpeg", data_dir=data) is DATASETS["cifar10_jpeg"]
    small = resolve_dataset_info("cifar10_jpeg", data_dir=data, image_size=16)
    x = load_dataset("cifar10_jpeg", "train", data, image_size=16).images.numpy() / 255.0
    assert small.image_size == 16
    np.testing.assert_allclose(small.mean, x.mean(axis=(0, 2, 3)), atol=1e-12)


def test_sha256_mismatch_names_the_file_and_the_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    fake_cifar(data, {"test": 1})
    actual = hashlib.sha256((data / "cifar10_jpeg" / "test.tar").read_bytes()).hexdigest()
    expected = registered_folders.SHA256["cifar10_jpeg/test.tar"]
    with pytest.raises(
        DatasetError, match=rf"test\.tar has sha256 {actual}.*sha256 {expected}.*data\.verify=false"
    ):
        open_source("cifar10_jpeg", "test", data_dir=data)
    assert len(open_source("cifar10_jpeg", "test", data_dir=data, verify=False)) == 10


def test_sha256_is_hashed_once_per_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    fake_cifar(data, {"test": 1})
    trust(monkeypatch, data, "cifar10_jpeg/test.tar")
    hashed: list[str] = []
    real = probssl_io.sha256_file
    monkeypatch.setattr(probssl_io, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    open_source("cifar10_jpeg", "test", data_dir=data)
    monkeypatch.setattr(registered_folders, "_SHA_MEMO", {})  # a new process: only the disk record is left
    open_source("cifar10_jpeg", "test", data_dir=data)
    assert len(hashed) == 1
    tar = data / "cifar10_jpeg" / "test.tar"
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    open_source("cifar10_jpeg", "test", data_dir=data)
    assert len(hashed) == 2


def test_missing_registered_file_says_it_is_never_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"cifar10_jpeg/train\.tar.*never downloaded.*--data-dir"):
        open_source("cifar10_jpeg", "train", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="valid splits: test, all"):
        open_source("tiny_imagenet_val", "train", data_dir=tmp_path)


def test_tiny_imagenet_val_labels_come_from_the_annotations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    wnids = ["n02", "n01", "n02", "n03", "n01"]
    members = {"tiny-imagenet-200/wnids.txt": b"n01\nn02\nn03\n"}
    lines = []
    for i, wnid in enumerate(wnids):
        shape = (64, 64) if i == 1 else (64, 64, 3)  # one grey image, as in the real set
        members[f"tiny-imagenet-200/val/images/val_{i}.JPEG"] = encode(
            rng.integers(0, 256, shape, np.uint8), "JPEG"
        )
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    members["tiny-imagenet-200/val/val_annotations.txt"] = "\n".join(lines).encode()
    write_tar(data / "tiny_imagenet_val" / "tiny-imagenet-200-val.tar", members)
    trust(monkeypatch, data, "tiny_imagenet_val/tiny-imagenet-200-val.tar")
    src = open_source("tiny_imagenet_val", "test", data_dir=data)
    assert src.classes == ["n01", "n02", "n03"] and src.labels.tolist() == [1, 0, 1, 2, 0]
    grey = src.read(1)
    assert grey.shape == (3, 64, 64) and np.array_equal(grey[0], grey[2])  # grey -> RGB
    ds = load_dataset("tiny_imagenet_val", "all", data, image_size=32)
    assert ds.images.shape == (5, 3, 32, 32)


def test_eurosat_halves_are_stratified_and_fixed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(2)
    counts = [4, 5, 2, 3, 4, 4, 6, 2, 3, 4]
    members = {
        f"test/{k}/{i}.png": encode(rng.integers(0, 256, (64, 64, 3), np.uint8), "PNG")
        for k, n in enumerate(counts)
        for i in range(n)
    }
    write_tar(data / "eurosat_test" / "eurosat-rgb-test.tar", members)
    trust(monkeypatch, data, "eurosat_test/eurosat-rgb-test.tar")
    train = open_source("eurosat_test", "train", data_dir=data)
    test = open_source("eurosat_test", "test", data_dir=data)
    everything = open_source("eurosat_test", "all", data_dir=data)
    assert train.classes == list(EUROSAT_CLASSES) and len(everything) == sum(counts)
    assert np.bincount(train.labels, minlength=10).tolist() == [n // 2 for n in counts]
    assert np.bincount(test.labels, minlength=10).tolist() == [n - n // 2 for n in counts]
    names = {train.item_id(i) for i in range(len(train))}
    assert not names & {test.item_id(i) for i in range(len(test))}
    assert names == {
        open_source("eurosat_test", "train", data_dir=data).item_id(i) for i in range(len(train))
    }


def test_real_registered_tars_have_the_published_counts() -> None:
    data = _real_data()
    if data is None:
        pytest.skip("the registered image-folder tars are not beside the checkout (../shared/data)")
    test = open_source("cifar10_jpeg", "test", data_dir=data)
    assert len(test) == 10_000 and np.bincount(test.labels).tolist() == [1000] * 10
    assert test.read(0).shape == (3, 32, 32)
    tiny = open_source("tiny_imagenet_val", "test", data_dir=data)
    assert (
        len(tiny) == 10_000 and len(tiny.classes) == 200 and np.bincount(tiny.labels).tolist() == [50] * 200
    )
    euro = open_source("eurosat_test", "all", data_dir=data)
    assert np.bincount(euro.labels).tolist() == [317, 312, 312, 244, 232, 206, 259, 263, 255, 300]


@pytest.mark.slow
def test_real_registered_sets_mean_std_match_the_table() -> None:
    from probssl.data.resolve import channel_stats

    data = _real_data()
    if data is None:
        pytest.skip("the registered image-folder tars are not beside the checkout (../shared/data)")
    for name, split in (("cifar10_jpeg", "train"), ("tiny_imagenet_val", "all"), ("eurosat_test", "train")):
        mean, std = channel_stats(open_source(name, split, data_dir=data))
        np.testing.assert_allclose(mean, DATASETS[name].mean, atol=6e-5)
        np.testing.assert_allclose(std, DATASETS[name].std, atol=6e-5)
