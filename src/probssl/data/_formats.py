"""Parsers for the official on-disk formats of the benchmark datasets, and the decoding of own images
(PNG / JPEG / WebP headers and pixels, shorter-side resize and centre crop).

Every parser returns numpy arrays (images uint8 [N, C, H, W], labels int64 [N]) and raises
:class:`FormatError` with a plain statement of what is wrong with the bytes; the caller adds which
file it was and what the user should do about it.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import io
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

STL_IMAGE_SIZE = 96
STL_IMAGE_BYTES = 3 * STL_IMAGE_SIZE * STL_IMAGE_SIZE


class FormatError(ValueError):
    """The bytes of a file do not match the format they are supposed to be in."""


class UnsafePickleError(FormatError):
    """A pickle asked for a global outside the small allow-list needed by the CIFAR files."""


# ----------------------------------------------------------------------------------------------- IDX


def _open_idx(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _read_exactly(f: BinaryIO, out: np.ndarray) -> int:
    """Fill ``out`` from ``f`` (decompressing straight into it: no intermediate copy); bytes read."""
    view, filled = memoryview(out).cast("B"), 0
    while filled < len(view):
        got = f.readinto(view[filled:])
        if not got:
            break
        filled += got
    return filled


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An IDX file (gzipped if its name ends in .gz) -> uint8 array of the shape its header declares.

    Checks the magic number, that the payload is exactly as long as the header promises, and (via the
    gzip module) the gzip CRC and length trailer.
    """
    header_len = 4 + 4 * ndim
    try:
        with _open_idx(path) as f:
            header = f.read(header_len)
            if len(header) < header_len:
                raise FormatError(f"only {len(header)} bytes, shorter than the {header_len}-byte IDX header")
            found, *dims = struct.unpack(f">{1 + ndim}i", header)
            if found != magic:
                raise FormatError(f"IDX magic number is {found}, expected {magic}")
            if any(d < 0 for d in dims):
                raise FormatError(f"IDX header has negative dimensions {dims}")
            out = np.empty(dims, dtype=np.uint8)
            filled = _read_exactly(f, out)
            if filled < out.size:
                raise FormatError(
                    f"truncated: the header promises {out.size} data bytes for shape {tuple(dims)}, "
                    f"the file has {filled}"
                )
            if f.read(1):
                raise FormatError(f"has trailing bytes after the {out.size} data bytes the header promises")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # truncation surfaces as EOFError
        raise FormatError(f"the gzip stream is damaged or truncated ({type(e).__name__}: {e})") from e
    return out


def read_idx_images(path: Path) -> np.ndarray:
    """IDX3 image file -> uint8 [N, 1, rows, cols]."""
    images = read_idx(path, IDX_IMAGES_MAGIC, 3)
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise FormatError(f"IDX images have an empty image size {images.shape[1]}x{images.shape[2]}")
    return images[:, None]


def read_idx_labels(path: Path) -> np.ndarray:
    """IDX1 label file -> int64 [N]."""
    return read_idx(path, IDX_LABELS_MAGIC, 1).astype(np.int64)


# -------------------------------------------------------------------------------------- CIFAR pickles


def _numpy_attr(name: str) -> Any:
    """Look a numpy internal up under its numpy 2 module name, falling back to numpy 1's."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise FormatError(f"this numpy has no multiarray.{name}")


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles written by Python 3 rebuild bytes with it.

    Only the latin-1 round trip is allowed, so a pickle cannot reach arbitrary codecs through it.
    """
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct, scalar = _numpy_attr("_reconstruct"), _numpy_attr("scalar")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    The CIFAR files are pickles; an ordinary ``pickle.load`` on a file from the internet runs any code
    the file names. Containers, strings, bytes and numbers need no global lookup, so the allow-list
    only has to cover numpy's array/dtype/scalar reconstruction.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name} from {self._source}: only numpy arrays and plain "
                "containers are allowed in dataset files, so this file is not an official dataset file "
                "and may be malicious"
            )
        return obj


def load_restricted_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (keys of the official files stay bytes)."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, str(path)).load()
        except UnsafePickleError as e:
            if str(path) in str(e):
                raise
            raise UnsafePickleError(f"refusing to unpickle {path}: {e}") from e
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise FormatError(f"not a readable pickle ({type(e).__name__}: {e})") from e


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _str_keys(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"expected a pickled dict, found {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def parse_cifar_batch(obj: Any, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR batch dict -> (uint8 [N, 3, 32, 32], int64 [N]); shapes and label range are checked."""
    batch = _str_keys(obj)
    if "data" not in batch or label_key not in batch:
        raise FormatError(f"batch dict lacks 'data' or '{label_key}' (keys: {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FormatError(f"'data' must be a uint8 array of shape [N, 3072], found {desc}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise FormatError(f"'{label_key}' is not a list of integers ({e})") from e
    if labels.shape[0] != data.shape[0]:
        raise FormatError(f"{data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise FormatError(f"labels outside 0..{num_classes - 1} (found {labels.min()}..{labels.max()})")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


def parse_cifar_meta(obj: Any, names_key: str, num_classes: int) -> list[str]:
    """Class names from a CIFAR meta dict, checked to have the expected length."""
    meta = _str_keys(obj)
    names = meta.get(names_key)
    if not isinstance(names, list | tuple) or len(names) != num_classes:
        raise FormatError(f"'{names_key}' should list {num_classes} class names")
    return [_text(n) for n in names]


# --------------------------------------------------------------------------------------------- SVHN


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN ``*_32x32.mat`` file -> (uint8 [N, 3, 32, 32], int64 [N]) with label 10 mapped to 0."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises a zoo of types (MatReadError, ValueError, OSError, ...)
        raise FormatError(f"not a readable MATLAB file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        raise FormatError("MATLAB file lacks the 'X' and 'y' variables")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise FormatError(f"'X' must be uint8 [32, 32, 3, N], found {x.dtype} {list(x.shape)}")
    labels = np.asarray(y).reshape(-1)
    if labels.shape[0] != x.shape[3]:
        raise FormatError(f"{x.shape[3]} images but {labels.shape[0]} labels")
    if labels.size and (not np.all(labels == np.round(labels)) or labels.min() < 1 or labels.max() > 10):
        raise FormatError("labels must be integers 1..10 (10 standing for digit 0)")
    labels = labels.astype(np.int64) % 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


# ------------------------------------------------------------------------------------------- STL-10


def read_stl_images(path: Path) -> np.ndarray:
    """An STL-10 ``*_X.bin`` file -> uint8 [N, 3, 96, 96].

    Each channel is stored column-major, so the raw [3, 96, 96] block is indexed [c, w, h]; the
    transpose is done in chunks into one preallocated array to keep peak memory near the file size
    (the unlabeled split is 2.7 GB).
    """
    size = path.stat().st_size
    if size % STL_IMAGE_BYTES:
        raise FormatError(f"size {size} bytes is not a multiple of one image (3*96*96 = {STL_IMAGE_BYTES})")
    n = size // STL_IMAGE_BYTES
    out = np.empty((n, 3, STL_IMAGE_SIZE, STL_IMAGE_SIZE), dtype=np.uint8)
    if n == 0:
        return out
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 3, STL_IMAGE_SIZE, STL_IMAGE_SIZE))
    try:
        step = 2048
        for start in range(0, n, step):
            out[start : start + step] = raw[start : start + step].transpose(0, 1, 3, 2)
    finally:
        del raw
    return out


def read_stl_labels(path: Path, num_classes: int = 10) -> np.ndarray:
    """An STL-10 ``*_y.bin`` file (one byte per image, 1-based) -> int64 [N], 0-based."""
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > num_classes):
        raise FormatError(f"labels must be 1..{num_classes}, found {labels.min()}..{labels.max()}")
    return labels - 1


# ------------------------------------------------------------- own images (shorter side + centre crop)

DECODER_VERSION = 2
"""Bumped whenever :func:`decode_image` gives other pixels for the same file, so caches of decoded images
(keyed by it, :mod:`probssl.data.decode_cache`) are rebuilt rather than served stale. 2: 16-bit and
floating-point grey scaled to 8 bits instead of clipped."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # modes without colour
_WIDE_INTEGER_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit grey (Pillow: "I" too)


def _open_pil(data: bytes | Path) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data)


_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def _exif_orientation(im: Any) -> int:
    """The EXIF orientation tag (1 = upright) of JPEG/WebP/PNG/TIFF files that carry one; 1 otherwise."""
    if im.format not in ("JPEG", "WEBP", "PNG", "MPO", "TIFF"):
        return 1
    try:
        return int(im.getexif().get(0x0112, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)
HEADER_BYTES = 1 << 16  # enough for the header of any PNG/JPEG without a huge EXIF block


def _png_header(head: bytes) -> tuple[int, int, bool] | None:
    if len(head) < 33 or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    grey = head[25] in (0, 4)  # colour types 0 (grey) and 4 (grey + alpha); 3 (palette) counts as colour
    pos = 8
    while pos + 8 <= len(head):  # chunks before the image data: an eXIf one may rotate the image
        kind = head[pos + 4 : pos + 8]
        if kind == b"IDAT":
            return width, height, grey
        if kind == b"eXIf":
            return None
        pos += 12 + int.from_bytes(head[pos : pos + 4], "big")
    return None


def _jpeg_header(head: bytes) -> tuple[int, int, bool] | None:
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(head[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and head[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return None  # may carry an orientation: Pillow reads it
        if marker in _JPEG_SOF:
            if pos + 10 > len(head):
                return None
            height = int.from_bytes(head[pos + 5 : pos + 7], "big")
            width = int.from_bytes(head[pos + 7 : pos + 9], "big")
            components = head[pos + 9]
            if components not in (1, 3) or width == 0 or height == 0:
                return None
            return width, height, components == 1
        if marker == 0xDA:  # image data before any frame header: leave it to Pillow
            return None
        pos += 2 + length
    return None


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_BYTES)


def quick_header(head: bytes) -> tuple[int, int, bool] | None:
    """(width, height, is_grey) of a plain PNG or JPEG from its first bytes; None when unsure.

    Why: scanning 200,000 files through Pillow costs ~0.3 ms each in Python-level header parsing;
    reading the PNG IHDR chunk or the JPEG frame header directly is ~20x cheaper. Anything unusual
    (another format, an EXIF block that may rotate the image, an odd component count, a header beyond
    ``head``) returns None, and the caller asks Pillow — so the answers are always Pillow's.
    """
    if head.startswith(_PNG_MAGIC):
        return _png_header(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_header(head)
    return None


def image_header(data: bytes | Path, decode: bool = False) -> tuple[int, int, bool]:
    """(width, height, is_grey) from an image's header alone, or with ``decode`` after decoding it.

    The header alone is what lets a collection's channel count and size be known before decoding it
    (200,000 files cost a header parse each, not a decode each); ``decode`` also finds the files whose
    pixel data is damaged (a truncated JPEG has a perfect header).
    """
    from PIL import Image

    if not decode:
        try:
            head = data[:HEADER_BYTES] if isinstance(data, bytes) else _read_head(data)
        except OSError as e:
            raise FormatError(f"cannot be read ({e.strerror or e})") from e
        quick = quick_header(bytes(head))
        if quick is not None:
            return quick
    try:
        with _open_pil(data) as im:
            if decode:
                im.load()
            width, height = int(im.size[0]), int(im.size[1])
            if _exif_orientation(im) in _QUARTER_TURNS:
                width, height = height, width
            return width, height, im.mode in _GRAY_MODES
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FormatError(f"not a readable image ({type(e).__name__}: {e})") from e


def shorter_side_crop_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resized (w, h) with the shorter side at ``size`` (aspect kept, rounded), and the crop's top-left.

    The crop offset is ``floor((resized - size) / 2)`` on each axis, the usual centre crop.
    """
    scale = size / min(width, height)
    new_w = size if width <= height else max(size, round(width * scale))
    new_h = size if height <= width else max(size, round(height * scale))
    return (new_w, new_h), ((new_w - size) // 2, (new_h - size) // 2)


def resize_crop(im: Any, size: int) -> Any:
    """A Pillow image with its shorter side resized to ``size`` (antialiased bilinear), centre-cropped."""
    from PIL import Image

    if im.size == (size, size):
        return im
    (new_w, new_h), (left, top) = shorter_side_crop_box(im.size[0], im.size[1], size)
    if (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return im.crop((left, top, left + size, top + size))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size] by :func:`resize_crop`, image by image."""
    from PIL import Image

    n, c = images.shape[:2]
    out = np.empty((n, c, size, size), np.uint8)
    for i in range(n):
        arr = images[i, 0] if c == 1 else images[i].transpose(1, 2, 0)
        resized = np.asarray(resize_crop(Image.fromarray(np.ascontiguousarray(arr)), size))
        out[i] = resized[None] if c == 1 else resized.transpose(2, 0, 1)
    return out


def _to_eight_bit(im: Any) -> Any:
    """A 16-bit or floating-point grey image as 8-bit grey ("L"); any other image unchanged.

    Why: Pillow's ``convert("L")`` / ``convert("RGB")`` *clip* wide values at 255 instead of scaling
    them, so a 16-bit PNG or TIFF (microscopy, medical, depth) came out ~all white. 16-bit integers are
    scaled by their type's range (v / 257, rounded: 65535 → 255, the usual uint16 → uint8 mapping);
    Pillow reads some 16-bit files as 32-bit "I", whose values are taken as 16-bit the same way (above
    65535: clipped). Floating-point images have no standard range: values in [0, 1] are scaled by 255
    (the float-image convention of PIL/torchvision); anything else is refused with what to do.
    """
    from PIL import Image

    if im.mode in _WIDE_INTEGER_MODES:
        wide = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8), mode="L")
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise FormatError(
                f"a floating-point image with values in [{np.nanmin(values):g}, {np.nanmax(values):g}]: only "
                "[0, 1] has a defined meaning; save it as an 8- or 16-bit image (PNG/TIFF) instead"
            )
        return Image.fromarray(np.rint(values * 255.0).astype(np.uint8), mode="L")
    return im


def decode_image(data: bytes | Path, channels: int, image_size: int | None) -> np.ndarray:
    """One encoded image -> uint8 [channels, H, W], as every own-image source delivers it.

    ``channels`` 3 turns grey (and palette/alpha) images into RGB, 1 turns colour into luminance
    (ITU-R 601, Pillow's "L"); 16-bit and floating-point grey become 8-bit first
    (:func:`_to_eight_bit`); an animated GIF or a multi-page TIFF gives its first frame. With
    ``image_size`` N the shorter side is resized to N (Pillow's antialiased bilinear filter) and the
    centre N x N is kept, so aspect ratio is never distorted; without it the image is returned at its
    own size.
    """
    from PIL import Image

    try:
        with _open_pil(data) as im:
            return image_to_array(im, channels, image_size)
    except FormatError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FormatError(f"not a readable image ({type(e).__name__}: {e})") from e


def image_to_array(im: Any, channels: int, image_size: int | None) -> np.ndarray:
    """An open Pillow image (a file's, or one given in memory) -> uint8 [channels, H, W], as decode_image."""
    from PIL import ImageOps

    if _exif_orientation(im) != 1:  # a camera's rotation flag: show the image upright
        im = ImageOps.exif_transpose(im)
    im = _to_eight_bit(im).convert("L" if channels == 1 else "RGB")
    if image_size is not None:
        im = resize_crop(im, image_size)
    arr = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
