"""Write an ImageFolder tree from the shared CIFAR-10 archive: what a user's own folder of images looks like.

``python experiments/imagefolder/make_folder.py [--out DIR] [--size 64] [--train-per-class 500]``
writes ``DIR/train/<class>/<i>.jpg`` and ``DIR/test/<class>/<i>.jpg``, upscaled to ``size`` px (bicubic, JPEG
quality 90); the default ``DIR`` is ``experiments/imagefolder/data`` (the run configs read it; git ignores it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_kd.data.cifar import CIFAR10_CLASSES, load_cifar10

HERE = Path(__file__).resolve().parent


def write_split(images: np.ndarray, labels: np.ndarray, out: Path, size: int, per_class: int) -> int:
    """The first ``per_class`` images of each class, as ``out/<class>/<archive row>.jpg``; returns the count."""
    n = 0
    for c, name in enumerate(CIFAR10_CLASSES):
        (out / name).mkdir(parents=True, exist_ok=True)
        for row in np.flatnonzero(labels == c)[:per_class]:
            image = Image.fromarray(images[row]).resize((size, size), Image.BICUBIC)
            image.save(out / name / f"{row:05d}.jpg", quality=90)
            n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "data")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: remove it first (a changed folder is a new dataset for the cache)")
    t0 = time.perf_counter()
    a = load_cifar10()
    n_train = write_split(a["train_x"], a["train_y"], args.out / "train", args.size, args.train_per_class)
    n_test = write_split(a["test_x"], a["test_y"], args.out / "test", args.size, args.test_per_class)
    print(f"wrote {n_train} training and {n_test} test images ({args.size}x{args.size} JPEG) under {args.out} "
          f"in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
