"""Sort the Tiny-ImageNet-200 validation tar into ``OUT/<wnid>/val_N.JPEG`` class folders: a folder of
64-px photos as a user has them, for the own-images walk-through and the stem comparison (BENCHMARKS.md).

    python scripts/tiny_imagenet_folder.py DATA/tiny_imagenet_val/tiny-imagenet-200-val.tar OUT [--classes 20]

``--classes K`` keeps the first K classes in sorted order (50 images each); the default keeps all 200.
The JPEG bytes are copied as they are (no re-encoding).
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

ANNOTATIONS = "tiny-imagenet-200/val/val_annotations.txt"
IMAGES = "tiny-imagenet-200/val/images/"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tar", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=200)
    args = parser.parse_args(argv)
    with tarfile.open(args.tar) as tar:
        lines = tar.extractfile(ANNOTATIONS).read().decode().splitlines()  # type: ignore[union-attr]
        label = dict(line.split("\t")[:2] for line in lines if line.strip())
        kept = set(sorted(set(label.values()))[: args.classes])
        written = 0
        for member in tar.getmembers():
            name = member.name.removeprefix(IMAGES)
            if member.name.startswith(IMAGES) and member.isfile() and label.get(name) in kept:
                target = args.out / label[name] / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                written += 1
    print(f"wrote {written} images in {len(kept)} class folders under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
