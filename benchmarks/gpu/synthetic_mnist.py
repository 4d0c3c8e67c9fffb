"""Write an MNIST-sized synthetic data set: 28x28 uint8 images of 10 classes, as ``nnfast train --data`` reads.

Each class is three Gaussian blobs out of a pool of twelve places (a set of
its own), so classes share parts; an image is its class's blobs, each moved
by up to 2.5 pixels, of random brightness, one in twenty left out, on noise, and one label
in twenty is replaced by a random one. Learnable (a small MLP passes 85% in
an epoch) and not trivial; 60000 training and 10000 test images by default,
the arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` of Keras'
``mnist.npz``. No download: the device machine reaches nothing.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

SIDE = 28
CLASSES = 10
PLACES = 12
BLOBS = 3
CHUNK = 5000


def _images(labels: np.ndarray, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    n = labels.size
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    images = rng.normal(0.1, 0.12, size=(n, SIDE, SIDE)).astype(np.float32)
    for blob in range(centers.shape[1]):
        at = centers[labels, blob] + rng.uniform(-2.5, 2.5, size=(n, 2))
        bright = rng.uniform(0.5, 1.2, size=n) * (rng.random(n) > 0.05)
        d2 = (yy[None] - at[:, 0, None, None]) ** 2 + (xx[None] - at[:, 1, None, None]) ** 2
        images += (bright[:, None, None] * np.exp(-d2 / 8.0)).astype(np.float32)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8)


def make(n: int, rng: np.random.Generator, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images and their labels; ``centers`` (classes, blobs, 2) are the classes' blob positions."""
    labels = rng.integers(0, CLASSES, size=n)
    images = np.concatenate([_images(labels[i:i + CHUNK], rng, centers) for i in range(0, n, CHUNK)])
    noisy = rng.random(n) < 0.05
    labels[noisy] = rng.integers(0, CLASSES, size=int(noisy.sum()))
    return images, labels.astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the .npz file to write")
    parser.add_argument("--train", type=int, default=60000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    places = rng.uniform(5, SIDE - 5, size=(PLACES, 2))
    subsets: list[tuple[int, ...]] = []
    while len(subsets) < CLASSES:  # every class its own set of places
        pick = tuple(sorted(rng.choice(PLACES, BLOBS, replace=False)))
        if pick not in subsets:
            subsets.append(pick)
    centers = places[np.array(subsets)]
    x_train, y_train = make(args.train, rng, centers)
    x_test, y_test = make(args.test, rng, centers)
    np.savez(args.out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    print(f"wrote {args.out}: {args.train} train and {args.test} test images of {SIDE}x{SIDE}, {CLASSES} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
