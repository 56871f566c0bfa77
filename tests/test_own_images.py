"""Own images: folders and tars as sources, their layout rules, the decode cache, bad and malicious input.

Every image here is written by the test (PNG, JPEG, grey and RGB, labelled and flat, in folders,
plain tars and gzip tars); nothing touches the network, and the cache lives in ``tmp_path``.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from probssl.data import (
    DatasetError,
    _formats,
    decoded_nbytes,
    load_dataset,
    open_source,
    resolve_dataset_info,
    skipped_items,
)
from probssl.data import decode_cache as decode_cache_module
from probssl.data.image_folder import LayoutError, plan_layout
from probssl.data.sources import ArraySource, ImageSource


@pytest.fixture(autouse=True)
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("PROBSSL_CACHE", str(folder))
    return folder


def save(path: Path, arr: np.ndarray, fmt: str | None = None, **kwargs: object) -> np.ndarray:
    """Write ``arr`` ([H, W] grey or [H, W, 3]) as an image; returns the pixels a decoder will see."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kwargs)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB" if arr.ndim == 3 else "L"))


def make_labelled(root: Path, counts: dict[str, int], size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """RGB PNGs under root/<class>/; returns {relative name: [H, W, 3] pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for cls, count in counts.items():
        for i in range(count):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[f"{cls}/img{i:03d}.png"] = save(root / cls / f"img{i:03d}.png", arr)
    return pixels


def make_tar(folder: Path, out: Path, mode: str = "w") -> Path:
    with tarfile.open(out, mode) as tar:
        tar.add(folder, arcname=folder.name)
    return out


def tree(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


# ------------------------------------------------------------------------------------ layout rules


def test_stratified_split_is_fixed_ten_percent_of_each_class() -> None:
    counts = {"a": 30, "b": 7, "c": 1, "d": 15}
    files = sorted(f"{c}/{i:03d}.png" for c, n in counts.items() for i in range(n))
    layout = plan_layout(files, [], "ROOT")
    assert layout.classes == ["a", "b", "c", "d"]
    train_idx, train_y = layout.splits["train"]
    test_idx, test_y = layout.splits["test"]
    all_idx, all_y = layout.splits["all"]
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(len(files)))
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    expected = {"a": 3, "b": 1, "c": 0, "d": 2}  # round(10%), at least one of a class with >= 2 images
    for k, cls in enumerate(layout.classes):
        assert int((test_y == k).sum()) == expected[cls]
        assert all(files[i].startswith(cls + "/") for i, y in zip(test_idx, test_y, strict=True) if y == k)
    again = plan_layout(list(files), [], "ROOT")
    assert np.array_equal(again.splits["test"][0], test_idx)  # fixed: same on every call
    assert len(all_idx) == len(files) and all_y.tolist() == [layout.classes.index(f[0]) for f in files]


def test_flat_layout_is_unlabelled_with_a_random_tenth_held_out() -> None:
    files = [f"{i:03d}.jpg" for i in range(50)]
    layout = plan_layout(files, [], "ROOT")
    assert layout.classes == [] and not layout.labelled
    assert len(layout.splits["test"][0]) == 5 and len(layout.splits["train"][0]) == 45
    assert set(layout.splits["all"][1].tolist()) == {-1}
    assert layout.splits["test"][0].tolist() != list(range(45, 50))  # random, not the last 10%


def test_split_folders_are_the_splits_and_share_the_train_classes() -> None:
    files = ["train/cat/1.png", "train/cat/2.png", "train/dog/1.png", "val/dog/9.png", "notes/readme.png"]
    layout = plan_layout(sorted(files), [], "ROOT")
    assert layout.classes == ["cat", "dog"]
    sorted_files = sorted(files)
    train_idx, train_y = layout.splits["train"]
    test_idx, test_y = layout.splits["test"]
    assert [sorted_files[i] for i in test_idx] == ["val/dog/9.png"] and test_y.tolist() == [1]
    assert [sorted_files[i] for i in train_idx] == ["train/cat/1.png", "train/cat/2.png", "train/dog/1.png"]
    assert len(layout.splits["all"][0]) == 4
    with pytest.raises(LayoutError, match="class folder.*bird.*lacks.*add ROOT/train/bird/ with images"):
        plan_layout(["test/bird/1.png", "train/cat/1.png"], [], "ROOT")


def test_layout_errors_say_what_to_change() -> None:
    with pytest.raises(LayoutError, match="mixes loose images and class folders"):
        plan_layout(["a.png", "cat/b.png"], [], "ROOT")
    with pytest.raises(LayoutError, match="class folder ROOT/dog has no images.*remove the folder"):
        plan_layout(["cat/b.png"], ["cat", "dog"], "ROOT")
    with pytest.raises(LayoutError, match="no images in ROOT"):
        plan_layout([], ["cat"], "ROOT")


def test_folder_errors_reach_the_user_as_dataset_errors(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_labelled(root, {"cat": 2})
    (root / "dog").mkdir()
    with pytest.raises(DatasetError, match="dog has no images"):
        open_source(str(root), "train")
    (root / "dog").rmdir()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images in"):
        open_source(str(tmp_path / "empty"), "train")
    with pytest.raises(DatasetError, match="no file or folder"):
        open_source(str(tmp_path / "missing"), "train")
    with pytest.raises(DatasetError, match="unknown split 'extra'"):
        open_source(str(root), "extra")


# ------------------------------------------------------------------------------- formats and tars


def test_png_jpeg_grey_and_rgb_mix_to_rgb_same_from_folder_tar_and_gzip_tar(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    rng = np.random.default_rng(1)
    expected = {}
    for cls in ("ants", "bees"):
        for i in range(5):
            if i % 2:
                arr = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                seen = save(root / cls / f"{i}.png", arr)
                expected[f"{cls}/{i}"] = np.repeat(seen[None], 3, axis=0)  # grey -> RGB by repeating
            else:
                arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                seen = save(root / cls / f"{i}.jpg", arr, quality=90)
                expected[f"{cls}/{i}"] = seen.transpose(2, 0, 1)
    plain = make_tar(root, tmp_path / "mixed.tar")
    gz = make_tar(root, tmp_path / "mixed.tar.gz", "w:gz")
    results = []
    for where in (root, plain, gz):
        src = open_source(str(where), "all")
        assert isinstance(src, ImageSource)
        assert src.classes == ["ants", "bees"] and src.channels == 3 and src.image_size == 8
        assert src.labels.tolist() == [0] * 5 + [1] * 5
        got = {}
        for i in range(len(src)):
            item = src.item_id(i)
            key = item.split("mixed/")[-1] if "mixed/" in item else item.split(":")[-1]
            got[key.rsplit(".", 1)[0]] = src.read(i)
        assert got.keys() == expected.keys()
        for k, image in got.items():
            assert image.dtype == np.uint8 and np.array_equal(image, expected[k]), k
        results.append(load_dataset(str(where), "all").images)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_all_grey_folder_keeps_one_channel_and_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for i in range(20):
        save(tmp_path / "flat" / f"{i:02d}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    src = open_source(str(tmp_path / "flat"), "train")
    assert src.channels == 1 and src.classes == [] and set(src.labels.tolist()) == {-1}
    assert len(src) == 18 and len(open_source(str(tmp_path / "flat"), "test")) == 2
    info = resolve_dataset_info(str(tmp_path / "flat"))
    assert info.channels == 1 and info.num_classes == 0 and info.image_size == 6


def test_class_folders_are_the_sorted_names_other_files_are_ignored_and_pixels_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pictures = {}
    for cls, count in (("class_b", 2), ("class_a", 3)):  # created out of order: classes must be sorted
        for i in range(count):
            arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            pictures[(cls, i)] = save(tmp_path / "pics" / cls / f"img{i}.png", arr)
    (tmp_path / "pics" / "class_a" / "notes.txt").write_text("ignored")
    ds = load_dataset(str(tmp_path / "pics"), "all")
    assert ds.classes == ["class_a", "class_b"] and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.images.shape == (5, 3, 6, 6) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images[3].numpy().transpose(1, 2, 0), pictures[("class_b", 0)])
    # A labelled folder of grey images keeps one channel, its pixels unchanged.
    grey = save(tmp_path / "grey" / "only" / "a.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    one = load_dataset(str(tmp_path / "grey"), "all")
    assert one.images.shape == (1, 1, 8, 8) and np.array_equal(one.images[0, 0].numpy(), grey)


def test_single_image_file_is_a_source_with_split_all(tmp_path: Path) -> None:
    seen = save(tmp_path / "one.png", np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    src = open_source(str(tmp_path / "one.png"), "all")
    assert len(src) == 1 and np.array_equal(src.read(0), seen.transpose(2, 0, 1))
    with pytest.raises(DatasetError, match="valid splits: all"):
        open_source(str(tmp_path / "one.png"), "train")
    assert resolve_dataset_info(str(tmp_path / "one.png")).splits == ("all",)


def test_source_pickles_and_reads_the_same_after_a_read(tmp_path: Path) -> None:
    make_labelled(tmp_path / "pics", {"a": 3, "b": 3})
    src = open_source(str(make_tar(tmp_path / "pics", tmp_path / "pics.tar")), "all")
    first = src.read(4)  # opens the tar
    clone = pickle.loads(pickle.dumps(src))
    assert np.array_equal(clone.read(4), first) and clone.labels.tolist() == src.labels.tolist()
    assert decoded_nbytes(src) == 6 * 3 * 8 * 8


# ----------------------------------------------------------------------------------------- resize


def test_shorter_side_resize_and_centre_crop_match_a_hand_computation(tmp_path: Path) -> None:
    # A horizontal ramp 4*x, 20 rows x 40 columns; image_size 10 halves it to 10 x 20, then keeps
    # columns 5..14. An antialiased (triangle) filter maps a linear ramp to its value at the output
    # pixel's centre, input x = 2j + 0.5, i.e. 8j + 2 — exact away from the image border.
    ramp = np.tile((4 * np.arange(40)).astype(np.uint8), (20, 1))
    save(tmp_path / "r" / "ramp.png", ramp)
    image = open_source(str(tmp_path / "r" / "ramp.png"), "all", image_size=10).read(0)
    assert image.shape == (1, 10, 10)
    cols = np.arange(5, 15)
    assert np.all(np.abs(image[0].astype(int) - (8 * cols + 2)[None, :]) <= 1)
    assert np.all(image[0] == image[0, :1])  # every row the same: no vertical mixing
    # The crop alone, without resizing: 10 x 16 -> centre 10 x 10 = columns 3..12.
    tall = np.arange(160, dtype=np.uint8).reshape(10, 16)
    save(tmp_path / "c" / "crop.png", tall)
    cropped = open_source(str(tmp_path / "c" / "crop.png"), "all", image_size=10).read(0)
    assert np.array_equal(cropped[0], tall[:, 3:13])
    # Portrait images crop rows: 16 x 10 -> rows 3..12.
    save(tmp_path / "p" / "crop.png", tall.T.copy())
    assert np.array_equal(
        open_source(str(tmp_path / "p" / "crop.png"), "all", image_size=10).read(0)[0], tall.T[3:13]
    )


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    save(tmp_path / "m" / "a" / "small.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "m" / "a" / "big.png", np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"different sizes.*--image-size N"):
        open_source(str(tmp_path / "m"), "all")
    src = open_source(str(tmp_path / "m"), "all", image_size=6)
    assert [src.read(i).shape for i in range(len(src))] == [(3, 6, 6)] * 2
    save(tmp_path / "n" / "wide.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(DatasetError, match="not square; pass --image-size"):
        open_source(str(tmp_path / "n"), "all")


# ---------------------------------------------------------------------------------- decode cache


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = _formats.decode_image

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_formats, "decode_image", counting)
    return calls


def test_cache_is_reused_and_rebuilt_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    pixels = make_labelled(tmp_path / "pics", {"a": 4, "b": 4})
    calls = count_decodes(monkeypatch)
    first = load_dataset(str(tmp_path / "pics"), "all")
    assert calls[0] == 8
    assert np.array_equal(first.images[5].numpy(), pixels["b/img001.png"].transpose(2, 0, 1))
    second = load_dataset(str(tmp_path / "pics"), "all")
    assert calls[0] == 8  # memory-mapped from the cache: no decode at all
    assert torch.equal(first.images, second.images) and first.classes == second.classes == ["a", "b"]
    assert len(list((cache / "decoded").glob("*.npy"))) == 1

    new = save(tmp_path / "pics" / "b" / "img001.png", np.full((8, 8, 3), 7, np.uint8))
    st = (tmp_path / "pics" / "b" / "img001.png").stat()
    os.utime(tmp_path / "pics" / "b" / "img001.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = load_dataset(str(tmp_path / "pics"), "all")
    assert calls[0] == 16  # rebuilt
    assert np.array_equal(third.images[5].numpy(), new.transpose(2, 0, 1))
    assert len(list((cache / "decoded").glob("*.npy"))) == 1  # the stale entry is gone
    save(tmp_path / "pics" / "b" / "img100.png", np.zeros((8, 8, 3), np.uint8))
    assert len(load_dataset(str(tmp_path / "pics"), "all")) == 9 and calls[0] == 25


def test_a_killed_decode_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    make_labelled(tmp_path / "pics", {"a": 3, "b": 3})
    real = _formats.decode_image
    seen = [0]

    def dies_on_the_fourth(*args: object, **kwargs: object) -> np.ndarray:
        seen[0] += 1
        if seen[0] == 4:
            raise KeyboardInterrupt  # what a kill looks like to the code that was running
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_formats, "decode_image", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(str(tmp_path / "pics"), "all")
    assert not list((cache / "decoded").glob("*.npy"))
    monkeypatch.setattr(_formats, "decode_image", real)
    assert len(load_dataset(str(tmp_path / "pics"), "all")) == 6


def test_cache_dir_argument_wins_over_the_environment(tmp_path: Path, cache: Path) -> None:
    make_labelled(tmp_path / "pics", {"a": 2})
    load_dataset(str(tmp_path / "pics"), "all", cache_dir=tmp_path / "mine")
    assert list((tmp_path / "mine" / "decoded").glob("*.npy")) and not (cache / "decoded").exists()
    assert decode_cache_module.cache_root(None) == cache


def test_mean_std_match_numpy_on_the_decoded_training_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for cls in ("x", "y"):
        for i in range(10):
            save(tmp_path / "s" / cls / f"{i}.png", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    info = resolve_dataset_info(str(tmp_path / "s"), image_size=8)
    train = load_dataset(str(tmp_path / "s"), "train", image_size=8)
    x = train.images.numpy().astype(np.float64) / 255.0
    assert info.image_size == 8 and info.channels == 3 and info.num_classes == 2
    assert info.splits == ("train", "test", "all") and len(train) == 18
    np.testing.assert_allclose(info.mean, x.mean(axis=(0, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(info.std, x.std(axis=(0, 2, 3)), atol=1e-12)
    again = resolve_dataset_info(str(tmp_path / "s"), image_size=8)  # from the stats cache
    assert again == info


# -------------------------------------------------------------------------------------- bad input


def test_corrupt_image_is_named_or_skipped_and_listed(tmp_path: Path) -> None:
    make_labelled(tmp_path / "pics", {"a": 5, "b": 5})
    bad = tmp_path / "pics" / "b" / "img002.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*img002\.png.*skip_corrupt=true"):
        load_dataset(str(tmp_path / "pics"), "all")
    ds = load_dataset(str(tmp_path / "pics"), "all", skip_corrupt=True)
    assert len(ds) == 9 and ds.labels.tolist() == [0] * 5 + [1] * 4
    src = open_source(str(tmp_path / "pics"), "all", skip_corrupt=True)
    assert skipped_items(src) == [str(bad)] and len(src) == 9
    with pytest.raises(DatasetError, match=r"img002\.png"):
        resolve_dataset_info(str(tmp_path / "pics"))
    assert resolve_dataset_info(str(tmp_path / "pics"), skip_corrupt=True).num_classes == 2


def test_truncated_jpeg_fails_when_decoded_and_is_found_by_skip_corrupt(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for i in range(4):
        save(tmp_path / "j" / f"{i}.jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), quality=90)
    path = tmp_path / "j" / "2.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 30])  # headers intact, pixel data cut
    tar = make_tar(tmp_path / "j", tmp_path / "j.tar")
    with pytest.raises(DatasetError, match=r"cannot read image .*j\.tar:j/2\.jpg"):
        load_dataset(str(tar), "all")
    src = open_source(str(tar), "all", skip_corrupt=True)
    assert skipped_items(src) == [f"{tar}:j/2.jpg"] and len(src) == 3


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


@pytest.mark.parametrize(
    ("name", "attrs", "message"),
    [
        ("/tmp/evil.png", {}, "absolute path or '..'"),
        ("pics/../../evil.png", {}, "absolute path or '..'"),
        ("pics/link.png", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "is a link"),
        ("pics/hard.png", {"type": tarfile.LNKTYPE, "linkname": "pics/a/ok.png"}, "is a link"),
        ("pics/fifo.png", {"type": tarfile.FIFOTYPE}, "device, FIFO"),
    ],
)
def test_malicious_tar_is_refused_and_writes_nothing_outside_the_cache(
    tmp_path: Path, cache: Path, name: str, attrs: dict, message: str
) -> None:
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        add_member(tar, "pics/a/ok.png", png.getvalue())
        add_member(tar, name, png.getvalue() if not attrs else b"", **attrs)
    before = tree(tmp_path, cache)
    with pytest.raises(DatasetError, match=f"refusing {evil}: member .*{message}"):
        open_source(str(evil), "all")
    assert tree(tmp_path, cache) == before
    assert not Path("/tmp/evil.png").exists() and not (tmp_path.parent / "evil.png").exists()


# ------------------------------------------------------------------------------ other sources


def test_array_sets_open_as_array_sources_and_resize(tmp_path: Path) -> None:
    src = open_source("digits", "test")
    assert isinstance(src, ArraySource) and src.image_size == 8 and len(src) == 540
    big = load_dataset("digits", "test", image_size=16)
    assert big.images.shape[1:] == (1, 16, 16)
    assert resolve_dataset_info("digits", image_size=16).image_size == 16
    assert resolve_dataset_info("digits").image_size == 8


def test_cli_image_size_flag_maps_to_data_image_size() -> None:
    from probssl.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--dataset", "/some/folder", "--image-size", "48"])
    cfg = config_from_args(args)
    assert cfg.data.image_size == 48 and cfg.data.dataset == "/some/folder"


def test_tar_made_with_dot_prefix_and_macos_junk_reads_like_the_folder(tmp_path: Path) -> None:
    pixels = make_labelled(tmp_path / "pics", {"a": 2, "b": 3})
    (tmp_path / "pics" / "__MACOSX" / "a").mkdir(parents=True)
    (tmp_path / "pics" / "__MACOSX" / "a" / "._img000.png").write_bytes(b"resource fork")
    (tmp_path / "pics" / ".DS_Store").write_bytes(b"junk")
    tar_path = tmp_path / "dot.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(tmp_path / "pics", arcname=".")  # members ./a/img000.png, ..., and the folder '.'
    src = open_source(str(tar_path), "all")
    assert src.classes == ["a", "b"] and len(src) == 5
    assert np.array_equal(src.read(2), pixels["b/img000.png"].transpose(2, 0, 1))
    assert open_source(str(tmp_path / "pics"), "all").classes == ["a", "b"]


def test_symlink_loop_in_a_folder_is_listed_once(tmp_path: Path) -> None:
    make_labelled(tmp_path / "pics", {"a": 2, "b": 2})
    (tmp_path / "pics" / "a" / "loop").symlink_to(tmp_path / "pics" / "a")
    assert len(open_source(str(tmp_path / "pics"), "all")) == 4


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    arr = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "r").mkdir()
    Image.fromarray(arr).save(tmp_path / "r" / "turned.png", exif=exif)
    upright = np.rot90(arr, k=-1)  # 10 x 6
    src = open_source(str(tmp_path / "r" / "turned.png"), "all", image_size=6)
    assert np.array_equal(src.read(0), upright[2:8].transpose(2, 0, 1))  # portrait: centre rows 2..7


def test_damaged_tars_and_empty_names_are_clear_errors(tmp_path: Path) -> None:
    make_labelled(tmp_path / "pics", {"a": 3})
    gz = make_tar(tmp_path / "pics", tmp_path / "pics.tar.gz", "w:gz")
    gz.write_bytes(gz.read_bytes()[:-40])  # cut the gzip trailer and some data
    with pytest.raises(
        DatasetError, match=r"cannot read .*pics\.tar\.gz as a tar: it is damaged or truncated"
    ):
        open_source(str(gz), "all")
    (tmp_path / "fake.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DatasetError, match="damaged or truncated"):
        open_source(str(tmp_path / "fake.tar"), "all")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="neither a folder, a tar nor an image file"):
        open_source(str(tmp_path / "notes.txt"), "all")
    with pytest.raises(DatasetError, match="empty"):
        open_source("  ", "train")


def test_an_unwritable_cache_is_a_clear_error_only_where_the_cache_is_needed(tmp_path: Path) -> None:
    make_labelled(tmp_path / "pics", {"a": 2})
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    src = open_source(str(tmp_path / "pics"), "all", cache_dir=blocked)  # the scan memo is optional
    assert len(src) == 2 and src.read(0).shape == (3, 8, 8)
    with pytest.raises(DatasetError, match=r"cannot write .*a_file.*data\.cache_dir"):
        load_dataset(str(tmp_path / "pics"), "all", cache_dir=blocked)


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow cannot read WebP")
def test_webp_is_read(tmp_path: Path) -> None:
    arr = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    seen = save(tmp_path / "w" / "x.webp", arr, lossless=True)
    assert np.array_equal(open_source(str(tmp_path / "w"), "all").read(0), seen.transpose(2, 0, 1))
    assert np.array_equal(seen, arr)


def test_quick_header_agrees_with_pillow_and_defers_when_unsure(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (7, 11), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {  # name: (image, save options, must the quick path answer?)
        "L.png": (Image.fromarray(grey), {}, True),
        "LA.png": (Image.fromarray(grey).convert("LA"), {}, True),
        "I16.png": (Image.fromarray(grey.astype(np.uint16) * 200), {}, True),
        "1.png": (Image.fromarray(grey > 128), {}, True),
        "RGB.png": (Image.fromarray(rgb), {}, True),
        "RGBA.png": (Image.fromarray(rgb).convert("RGBA"), {}, True),
        "P.png": (Image.fromarray(rgb).convert("P"), {}, True),
        "L.jpg": (Image.fromarray(grey), {}, True),
        "RGB.jpg": (Image.fromarray(rgb), {"quality": 75}, True),
        "progressive.jpg": (Image.fromarray(rgb), {"progressive": True}, True),
        "CMYK.jpg": (Image.fromarray(rgb).convert("CMYK"), {}, False),
        "exif.jpg": (Image.fromarray(rgb), {"exif": exif}, False),
        "exif.png": (Image.fromarray(rgb), {"exif": exif}, False),
    }
    for name, (im, options, quick_expected) in cases.items():
        path = tmp_path / name
        im.save(path, **options)
        with Image.open(path) as ref:
            ref_size = ref.size[::-1] if name.startswith("exif") else ref.size  # rotated by its EXIF
            expected = (*ref_size, ref.mode in _formats._GRAY_MODES)
        quick = _formats.quick_header(path.read_bytes())
        assert (quick is not None) == quick_expected, name
        assert quick is None or quick == expected, name
        assert _formats.image_header(path) == expected == _formats.image_header(path.read_bytes()), name


def test_two_image_sizes_of_one_folder_are_cached_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    make_labelled(tmp_path / "pics", {"a": 3})
    calls = count_decodes(monkeypatch)
    for size in (4, 6, 4, 6):
        assert load_dataset(str(tmp_path / "pics"), "all", image_size=size).images.shape[-1] == size
    assert calls[0] == 6 and len(list((cache / "decoded").glob("*.npy"))) == 2


def test_two_processes_meeting_a_new_source_decode_it_once(tmp_path: Path) -> None:
    """DDP ranks open a new folder at the same moment: one decodes while the other waits for the
    lock, then reads the finished entry (flock conflicts between separate opens, so threads show it)."""
    import threading
    import time

    import numpy as np

    from probssl.data import decode_cache

    class SlowSource:
        channels, image_size = 1, 4

        def __init__(self) -> None:
            self.reads = 0

        def __len__(self) -> int:
            return 6

        def read(self, index: int) -> np.ndarray:
            self.reads += 1
            time.sleep(0.02)
            return np.full((1, 4, 4), index, dtype=np.uint8)

    source = SlowSource()
    results = []

    def open_it() -> None:
        results.append(decode_cache.decoded_array(source, "slow", "place", "content", tmp_path))

    workers = [threading.Thread(target=open_it) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert source.reads == 6  # once, not once per process
    assert len(results) == 2 and all(np.array_equal(r[:, 0, 0, 0], np.arange(6)) for r in results)


# --------------------------------------------------------------------- formats beyond 8-bit PNG/JPEG


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped(tmp_path: Path, suffix: str) -> None:
    # Pillow's convert("L") clips 16-bit values at 255: a ramp over 0..65535 came out 99.6% white.
    ramp = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / f"ramp{suffix}")
    expected = np.rint(ramp / 257.0).astype(np.uint8)  # the uint16 -> uint8 map: 65535 -> 255, 257 -> 1
    for channels in (1, 3):
        got = _formats.decode_image(tmp_path / f"ramp{suffix}", channels, None)
        assert got.shape == (channels, 24, 24)
        assert all(np.array_equal(got[c], expected) for c in range(channels))


def test_floating_point_grey_in_the_unit_interval_is_scaled_and_other_ranges_are_refused(
    tmp_path: Path,
) -> None:
    values = np.linspace(0.0, 1.0, 100).reshape(10, 10).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "unit.tif")
    got = _formats.decode_image(tmp_path / "unit.tif", 1, None)
    assert np.array_equal(got[0], np.rint(values.astype(np.float64) * 255).astype(np.uint8))
    Image.fromarray(values * 4000).save(tmp_path / "raw.tif")
    with pytest.raises(_formats.FormatError, match=r"values in \[0, 4000\].*8- or 16-bit"):
        _formats.decode_image(tmp_path / "raw.tif", 1, None)


def test_bmp_gif_and_tiff_are_images_of_a_folder_with_the_pixels_of_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)  # ≤ 256 colours: GIF stores them exactly
    arr = palette[rng.integers(0, 16, (8, 8))]
    for name in ("a.png", "b.BMP", "c.gif", "d.tif", "e.tiff"):
        save(tmp_path / "pics" / "only" / name, arr)
    ds = load_dataset(str(tmp_path / "pics"), "all")
    assert len(ds) == 5
    assert all(np.array_equal(ds.images[i].numpy().transpose(1, 2, 0), arr) for i in range(5))


def test_decoded_image_caches_are_keyed_by_the_decoder_version(tmp_path: Path, cache: Path) -> None:
    make_labelled(tmp_path / "pics", {"a": 2})
    load_dataset(str(tmp_path / "pics"), "all")
    (entry,) = (cache / "decoded").glob("*.npy")
    assert entry.stem.endswith(f"d{_formats.DECODER_VERSION}")
