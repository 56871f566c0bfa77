"""Dataset readers: the embedded digits set, the real IDX files under /work/shared/data when present,
and tiny files written here in each official format (including corrupt and malicious ones).

No test touches the network: ``urlopen`` is replaced for every test by a stub that records calls.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from probssl.data import _download, official_files
from probssl.data.catalog import (
    DATASETS,
    STL10_CLASSES,
    DatasetError,
    DatasetInfo,
    ImageDataset,
    dataset_names,
    default_data_dir,
    get_dataset_info,
)
from probssl.data.resolve import load_dataset

SHARED = Path("/work/shared/data")
FASHION_DIR = SHARED / "fashion_mnist"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every test runs offline; the returned list collects the URLs anything tried to open."""
    calls: list[str] = []

    def refuse(url: str, timeout: float | None = None) -> None:
        calls.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(_download, "urlopen", refuse)
    return calls


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust(monkeypatch: pytest.MonkeyPatch, dataset: str, *paths: Path) -> None:
    """Make the checksum table accept these tiny files as if they were the official ones."""
    for path in paths:
        monkeypatch.setitem(official_files._CHECKSUMS[dataset], path.name, md5_of(path))


# ------------------------------------------------------------------------------------------- writers


def idx_images_bytes(images: np.ndarray, magic: int = 2051) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">iiii", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray) -> bytes:
    return struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def write_idx_split(
    folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    out = []
    for stem, payload in (
        (f"{prefix}-images-idx3-ubyte", idx_images_bytes(images)),
        (f"{prefix}-labels-idx1-ubyte", idx_labels_bytes(labels)),
    ):
        path = folder / (stem + ".gz" if gz else stem)
        path.write_bytes(gzip.compress(payload) if gz else payload)
        out.append(path)
    return out


def tiny_idx(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"tiny batch",
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_pickle(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


def write_cifar10(folder: Path, n: int = 3) -> dict[str, dict[bytes, object]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(n, 10, b"labels", seed) for seed, name in enumerate(names)}
    for name, batch in batches.items():
        write_pickle(folder / name, batch)
    labels = [
        n.encode() for n in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    ]
    write_pickle(
        folder / "batches.meta", {b"label_names": labels, b"num_cases_per_batch": n, b"num_vis": 3072}
    )
    return batches


class Payload:
    """A pickle that runs a shell command when loaded by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class ExecPayload(Payload):
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


# ---------------------------------------------------------------------------------- registry & types


def test_registry_lists_every_dataset_with_consistent_info() -> None:
    names = dataset_names()
    assert set(names) >= {"digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "stl10"}
    for name in names:
        info = get_dataset_info(name)
        assert isinstance(info, DatasetInfo) and info is DATASETS[name]
        assert len(info.mean) == len(info.std) == info.channels
        assert "train" in info.splits or info.splits == ("test", "all")  # an evaluation-only set
    assert get_dataset_info("Fashion-MNIST").name == "fashion_mnist"
    assert DATASETS["stl10"].splits == ("train", "test", "unlabeled")
    assert DATASETS["svhn"].splits == ("train", "test", "extra")


def test_unknown_name_and_split_list_the_valid_ones() -> None:
    with pytest.raises(DatasetError, match="valid datasets: cifar10, cifar100, cifar10_jpeg, digits.*a path"):
        get_dataset_info("imagenet")
    with pytest.raises(DatasetError, match="valid splits: train, test, unlabeled"):
        load_dataset("stl10", "validation", download=False)


def test_default_data_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROBSSL_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("PROBSSL_DATA")
    assert default_data_dir() == Path.cwd() / "data"


def test_image_dataset_subset_and_validation() -> None:
    ds = ImageDataset(
        "x",
        "train",
        torch.arange(48, dtype=torch.uint8).view(3, 1, 4, 4),
        torch.tensor([0, 1, 2]),
        ["a", "b", "c"],
    )
    assert len(ds) == 3 and ds.num_classes == 3
    sub = ds.subset([2, 0])
    assert (sub.name, sub.split, sub.classes) == ("x", "train", ["a", "b", "c"])
    assert sub.labels.tolist() == [2, 0] and torch.equal(sub.images[0], ds.images[2])
    assert sub.subset(torch.tensor([True, False])).labels.tolist() == [2]
    assert "n=3" in repr(ds)
    with pytest.raises(ValueError):
        ImageDataset("x", "train", torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), ["a"])


# -------------------------------------------------------------------------------------------- digits


def test_digits_split_shapes_values_and_determinism() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1257, 1, 8, 8) and test.images.shape == (540, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous()
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert set(torch.unique(train.images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert train.classes == [str(d) for d in range(10)]
    again = load_dataset("digits", "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    total = torch.bincount(train.labels, minlength=10) + torch.bincount(test.labels, minlength=10)
    frac = torch.bincount(train.labels, minlength=10) / total
    assert torch.all((frac - 0.7).abs() < 0.02), frac  # stratified: every class split ~70/30


# ------------------------------------------------------------------------------------ real IDX files


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="no shared Fashion-MNIST copy")
def test_real_fashion_mnist() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_dataset("fashion_mnist", split, SHARED, download=False)
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert torch.bincount(ds.labels).tolist() == [n // 10] * 10
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    path = FASHION_DIR / "train-images-idx3-ubyte.gz"
    assert _download.file_md5(path) == official_files._CHECKSUMS["fashion_mnist"][path.name]


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="no shared MNIST copy")
def test_real_mnist_test_split_and_clear_error_for_missing_train_images(offline: list[str]) -> None:
    ds = load_dataset("mnist", "test", SHARED, download=False)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == MNIST_TEST_COUNTS
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", "train", SHARED, download=False)
    msg = str(err.value)
    assert "MNIST training images not found" in msg
    assert str(SHARED / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in msg
    assert offline == []  # download=False never touches the network


# ------------------------------------------------------------------------------------ tiny IDX files


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, gz: bool) -> None:
    images, labels = tiny_idx()
    trust(monkeypatch, name, *write_idx_split(tmp_path / name, "test", images, labels, gz=gz))
    ds = load_dataset(name, "test", tmp_path, download=False)
    assert ds.images.shape == (5, 1, 28, 28)
    assert np.array_equal(ds.images[:, 0].numpy(), images)
    assert ds.labels.tolist() == labels.tolist()
    assert ds.images[3, 0, 7, 21].item() == images[3, 7, 21]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda img, lbl: (img[:-100], lbl), "truncated"),
        (lambda img, lbl: (struct.pack(">i", 2049) + img[4:], lbl), "magic number is 2049, expected 2051"),
        (lambda img, lbl: (img, lbl[:-1]), "truncated"),
        (lambda img, lbl: (img[:10], lbl), "shorter than the 16-byte IDX header"),
    ],
    ids=["truncated-images", "wrong-magic", "truncated-labels", "header-cut"],
)
def test_corrupt_idx_is_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mutate, expected: str
) -> None:
    images, labels = tiny_idx()
    img, lbl = mutate(idx_images_bytes(images), idx_labels_bytes(labels))
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(img))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lbl))
    trust(monkeypatch, "mnist", *folder.iterdir())
    with pytest.raises(DatasetError, match=expected) as err:
        load_dataset("mnist", "test", tmp_path, download=False)
    assert str(folder) in str(err.value) and "Delete it" in str(err.value)


def test_idx_md5_mismatch_names_expected_and_actual(tmp_path: Path) -> None:
    images, labels = tiny_idx()
    paths = write_idx_split(tmp_path / "fashion_mnist", "train", images, labels)
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist", "train", tmp_path, download=False)
    msg = str(err.value)
    assert "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in msg and md5_of(paths[0]) in msg and str(paths[0]) in msg


def test_truncated_gzip_and_count_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    images, labels = tiny_idx()
    img_path, lbl_path = write_idx_split(tmp_path / "mnist", "test", images, labels)
    img_path.write_bytes(img_path.read_bytes()[:-20])  # cuts the CRC trailer and some data
    trust(monkeypatch, "mnist", img_path, lbl_path)
    with pytest.raises(DatasetError, match="gzip stream is damaged or truncated"):
        load_dataset("mnist", "test", tmp_path, download=False)

    img_path, lbl_path = write_idx_split(tmp_path / "mnist", "test", images, labels[:4])
    trust(monkeypatch, "mnist", img_path, lbl_path)
    with pytest.raises(DatasetError, match="5 images but .* has 4 labels"):
        load_dataset("mnist", "test", tmp_path, download=False)


def test_md5_cache_reuses_digest_until_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert _download.file_md5(path) == hashlib.md5(b"abc").hexdigest()
    key = _download._cache_key(path)
    _download._MD5_CACHE[key] = "cached"
    assert _download.file_md5(path) == "cached"  # served from the cache, not re-hashed
    path.write_bytes(b"abcd")
    assert _download.file_md5(path) == hashlib.md5(b"abcd").hexdigest()


# ------------------------------------------------------------------------------------------ download


@pytest.mark.parametrize(
    ("name", "split", "expected_path"),
    [
        ("fashion_mnist", "train", "fashion_mnist/train-images-idx3-ubyte.gz"),
        ("mnist", "test", "mnist/t10k-images-idx3-ubyte.gz"),
        ("cifar10", "train", "cifar10/cifar-10-python.tar.gz"),
        ("cifar100", "test", "cifar100/cifar-100-python.tar.gz"),
        ("svhn", "extra", "svhn/extra_32x32.mat"),
        ("stl10", "unlabeled", "stl10/stl10_binary.tar.gz"),
    ],
)
@pytest.mark.parametrize("download", [False, True])
def test_missing_files_raise_clear_error(
    tmp_path: Path, offline: list[str], name: str, split: str, expected_path: str, download: bool
) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset(name, split, tmp_path, download=download)
    msg = str(err.value)
    assert str(tmp_path / expected_path) in msg and "not found" in msg
    assert official_files._URLS[name] in msg
    if download:
        assert len(offline) == 1 and "failed" in msg and "network disabled in tests" in msg
    else:
        assert offline == [] and "download=False" in msg
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # a failed download leaves nothing behind


def test_download_writes_verified_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    images, labels = tiny_idx()
    served = {
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx_images_bytes(images)),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_labels_bytes(labels)),
    }
    for fname, payload in served.items():
        monkeypatch.setitem(official_files._CHECKSUMS["mnist"], fname, hashlib.md5(payload).hexdigest())
    opened = []

    def fake_urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        opened.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(_download, "urlopen", fake_urlopen)
    ds = load_dataset("mnist", "test", tmp_path, download=True)
    assert ds.labels.tolist() == labels.tolist()
    assert opened == [official_files._URLS["mnist"] + f for f in served]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(served)

    # A download whose md5 is wrong is deleted and reported.
    monkeypatch.setitem(official_files._CHECKSUMS["mnist"], "train-images-idx3-ubyte.gz", "0" * 32)
    served["train-images-idx3-ubyte.gz"] = b"not the real file"
    with pytest.raises(DatasetError, match="expected 0{32}; it was deleted"):
        load_dataset("mnist", "train", tmp_path, download=True)
    assert not (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").exists()
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]


# --------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    batches = write_cifar10(folder)
    trust(monkeypatch, "cifar10", *folder.iterdir())
    train = load_dataset("cifar10", "train", tmp_path, download=False)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes[:2] == ["plane", "car"]
    expected_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels
    data4 = batches["data_batch_4"][b"data"]
    i, c, h, w = 1, 2, 5, 30  # image 1 of batch 4 is row 10 of the train split
    assert train.images[3 * 3 + i, c, h, w].item() == data4[i, c * 1024 + h * 32 + w]
    test = load_dataset("cifar10", "test", tmp_path, download=False)
    assert np.array_equal(test.images.reshape(3, -1).numpy(), batches["test_batch"][b"data"])


def test_cifar100_directly_under_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    batch = cifar_batch(4, 100, b"fine_labels", seed=3)
    batch[b"coarse_labels"] = [0, 1, 2, 3]
    write_pickle(folder / "test", batch)
    fine = [f"class_{i}" for i in range(100)]  # str names: pickled by Python 3, read back as str
    write_pickle(folder / "meta", {"fine_label_names": fine, "coarse_label_names": ["c"] * 20})
    trust(monkeypatch, "cifar100", folder / "test", folder / "meta")
    ds = load_dataset("cifar100", "test", tmp_path, download=False)
    assert ds.labels.tolist() == batch[b"fine_labels"] and ds.classes == fine and ds.num_classes == 100
    assert np.array_equal(ds.images.reshape(4, -1).numpy(), batch[b"data"])


def test_cifar_from_archive_is_verified_and_extracted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    staging = tmp_path / "staging" / "cifar-10-batches-py"
    batches = write_cifar10(staging)
    trust(monkeypatch, "cifar10", *staging.iterdir())
    archive = tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging, arcname="cifar-10-batches-py")
    with pytest.raises(DatasetError, match="c58f30108f718f92721af3b95e74349a"):  # official md5 still required
        load_dataset("cifar10", "test", tmp_path / "data", download=False)
    trust(monkeypatch, "cifar10", archive)
    ds = load_dataset("cifar10", "test", tmp_path / "data", download=False)
    assert ds.labels.tolist() == batches["test_batch"][b"labels"]
    assert (archive.parent / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not any(p.name.startswith(".extract") for p in archive.parent.iterdir())


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink"])
def test_unsafe_archive_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo(
            {"traversal": "../../evil.txt", "absolute": "/tmp/evil.txt"}.get(kind, "link")
        )
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(member)
        else:
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
    trust(monkeypatch, "cifar10", archive)
    with pytest.raises(DatasetError, match="refusing to extract"):
        load_dataset("cifar10", "test", tmp_path / "data", download=False)
    assert not (tmp_path / "evil.txt").exists() and not (archive.parent / "link").exists()


@pytest.mark.parametrize("payload_cls", [Payload, ExecPayload])
@pytest.mark.parametrize("checksum", ["trusted", "no-entry"])
def test_malicious_pickle_is_refused_and_never_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, payload_cls: type[Payload], checksum: str
) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar10(folder)
    batch = cifar_batch(3, 10, b"labels", seed=9)
    batch[b"labels"] = payload_cls(marker)
    write_pickle(folder / "test_batch", batch)
    if checksum == "trusted":
        trust(monkeypatch, "cifar10", *folder.iterdir())
    else:
        monkeypatch.delitem(official_files._CHECKSUMS["cifar10"], "test_batch")
        monkeypatch.delitem(official_files._CHECKSUMS["cifar10"], "batches.meta")
    with pytest.raises(DatasetError, match=r"refusing to unpickle \S+\.(system|exec) from .*test_batch"):
        load_dataset("cifar10", "test", tmp_path, download=False)
    assert not marker.exists()


def test_py2_era_numpy_names_and_codec_abuse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The official files name numpy 1's ``numpy.core.multiarray``; only the latin-1 codec is usable."""
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    batch = cifar_batch(2, 10, b"labels", seed=4)
    batch[b"labels"] = [np.int64(v) for v in batch[b"labels"]]  # numpy scalars: multiarray.scalar
    blob = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in blob
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(blob)
    trust(monkeypatch, "cifar10", folder / "test_batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("cifar10", "test", tmp_path, download=False)
    assert ds.labels.tolist() == [int(v) for v in batch[b"labels"]]

    evil = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    (folder / "test_batch").write_bytes(evil)
    trust(monkeypatch, "cifar10", folder / "test_batch")
    with pytest.raises(DatasetError, match="refusing to unpickle .*test_batch.*'zlib' is not allowed"):
        load_dataset("cifar10", "test", tmp_path, download=False)


def test_cifar_batch_with_wrong_shape_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar10(folder)
    batch = cifar_batch(3, 10, b"labels", seed=1)
    batch[b"data"] = np.zeros((3, 1024), dtype=np.uint8)
    write_pickle(folder / "test_batch", batch)
    trust(monkeypatch, "cifar10", *folder.iterdir())
    with pytest.raises(DatasetError, match=r"uint8 array of shape \[N, 3072\]"):
        load_dataset("cifar10", "test", tmp_path, download=False)


# ---------------------------------------------------------------------------------------------- SVHN


def test_svhn_round_trip_maps_label_10_to_0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import scipy.io

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    path = tmp_path / "svhn" / "test_32x32.mat"
    path.parent.mkdir()
    scipy.io.savemat(path, {"X": x, "y": y})
    with pytest.raises(DatasetError, match="eb5a983be6a315427106f1b164d9cef3"):
        load_dataset("svhn", "test", tmp_path, download=False)
    trust(monkeypatch, "svhn", path)
    ds = load_dataset("svhn", "test", tmp_path, download=False)
    assert ds.images.shape == (4, 3, 32, 32)
    assert ds.labels.tolist() == [0, 1, 9, 0]
    assert ds.images[2, 1, 3, 17].item() == x[3, 17, 1, 2]
    assert np.array_equal(ds.images.numpy(), x.transpose(3, 2, 0, 1))


def test_svhn_garbage_file_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "svhn" / "train_32x32.mat"
    path.parent.mkdir()
    path.write_bytes(b"\x00" * 300)
    trust(monkeypatch, "svhn", path)
    with pytest.raises(DatasetError, match="not in the official format"):
        load_dataset("svhn", "train", tmp_path, download=False)


# -------------------------------------------------------------------------------------------- STL-10


def write_stl(folder: Path, split: str, images: np.ndarray, labels: np.ndarray | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())  # column-major
    if labels is not None:
        (folder / f"{split}_y.bin").write_bytes(labels.astype(np.uint8).tobytes())


def test_stl10_column_major_and_label_offset(tmp_path: Path) -> None:
    folder = tmp_path / "stl10" / "stl10_binary"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    write_stl(folder, "train", images, np.array([1, 10, 5]))
    write_stl(folder, "unlabeled", images[:2], None)
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    ds = load_dataset("stl10", "train", tmp_path, download=False)
    assert ds.images.shape == (3, 3, 96, 96) and ds.images.is_contiguous()
    assert np.array_equal(ds.images.numpy(), images)
    assert ds.labels.tolist() == [0, 9, 4] and ds.classes[-1] == "truck"
    unlabeled = load_dataset("stl10", "unlabeled", tmp_path, download=False)
    assert unlabeled.labels.tolist() == [-1, -1] and np.array_equal(unlabeled.images.numpy(), images[:2])

    raw = bytearray(96 * 96 * 3)
    raw[96] = 200  # column-major: stored byte 96 is row 0 of column 1, i.e. pixel (h=0, w=1)
    (folder / "test_X.bin").write_bytes(bytes(raw))
    (folder / "test_y.bin").write_bytes(b"\x01")
    one = load_dataset("stl10", "test", tmp_path, download=False)
    assert one.images[0, 0, 0, 1].item() == 200 and int(one.images.sum()) == 200


def test_stl10_archive_is_downloaded_verified_and_extracted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    images = np.random.default_rng(1).integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)
    write_stl(tmp_path / "staging" / "stl10_binary", "test", images, np.array([3, 7]))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "staging" / "stl10_binary", arcname="stl10_binary")
    blob = buffer.getvalue()
    md5 = hashlib.md5(blob).hexdigest()
    monkeypatch.setitem(official_files._CHECKSUMS["stl10"], "stl10_binary.tar.gz", md5)
    opened = []

    def fake_urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        opened.append(url)
        return io.BytesIO(blob)

    monkeypatch.setattr(_download, "urlopen", fake_urlopen)
    ds = load_dataset("stl10", "test", tmp_path / "data", download=True)
    assert opened == ["http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"]
    assert ds.labels.tolist() == [2, 6] and np.array_equal(ds.images.numpy(), images)
    assert (tmp_path / "data" / "stl10" / "stl10_binary" / "test_X.bin").is_file()
    load_dataset("stl10", "test", tmp_path / "data", download=True)  # now found on disk
    assert len(opened) == 1


def test_stl10_bad_sizes_are_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"  # accepted directly under data_dir too
    folder.mkdir()
    (folder / "test_X.bin").write_bytes(b"\x00" * (3 * 96 * 96 + 5))
    (folder / "test_y.bin").write_bytes(b"\x01")
    with pytest.raises(DatasetError, match="not a multiple of one image"):
        load_dataset("stl10", "test", tmp_path, download=False)
    (folder / "test_X.bin").write_bytes(b"\x00" * (3 * 96 * 96 * 2))
    with pytest.raises(DatasetError, match="2 images but .* has 1 labels"):
        load_dataset("stl10", "test", tmp_path, download=False)
