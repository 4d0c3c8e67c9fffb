"""Data sets for ``nnfast train``: scikit-learn's bundled digits, MNIST-style IDX and ``.npz`` files.

Every loader returns a :class:`Dataset` of float32 features scaled to
``[0, 1]`` and int64 labels, with a held-out test split. Nothing is ever
downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .paths import as_path


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays: ``x_*`` float32 ``(n, features)``, ``y_*`` int64 ``(n,)``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise ValueError(f"data: {split} split has features {x.shape} and labels {y.shape}; "
                                 "expected (n, features) and (n,) with n > 0")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"data: train has {self.x_train.shape[1]} features, test {self.x_test.shape[1]}")
        if min(self.y_train.min(), self.y_test.min()) < 0:
            raise ValueError("data: labels must be non-negative class indices")


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes), a fixed held-out split."""
    data, target = _digits()
    x = (data / 16.0).astype(np.float32)
    y = target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits' pixels (float64, 0..16) and labels, as ``sklearn.datasets.load_digits`` gives them.

    Read from the CSV file scikit-learn bundles, as its loader does: importing
    ``sklearn.datasets`` (and SciPy with it) costs most of a second of every
    ``nnfast train``. Where the file is not where scikit-learn keeps it, its
    loader is used.
    """
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.data, bunch.target


#: What ``--data`` accepts, for error messages.
DATA_FORMATS = ("an .npz file with arrays x_train, y_train, x_test, y_test, or a directory of MNIST-style "
                "IDX files (train-images-idx3-ubyte[.gz], ...)")

# IDX file names of MNIST and Fashion-MNIST, optionally gzip-compressed.
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or ``.gz``) of unsigned bytes into an array."""
    path = as_path(path, "data")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"data: cannot read {str(path)!r}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"data: {str(path)!r} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"data: {str(path)!r} holds IDX type 0x{raw[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"data: {str(path)!r} has a truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)  # exact: np.prod would wrap around in int64
    if len(raw) != expected:
        raise ValueError(f"data: {str(path)!r} has {len(raw)} bytes, its header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    # Some copies use "train-images.idx3-ubyte".
    for candidate in directory.glob(stem.replace("-idx", ".idx") + "*"):
        return candidate
    raise ValueError(f"data: {str(directory)!r} has no {stem} or {stem}.gz (an MNIST-style IDX directory)")


def _as_dataset(name: str, x_train, y_train, x_test, y_test) -> Dataset:
    def features(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "uif":
            raise ValueError(f"data: features have dtype {x.dtype}; expected numbers")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"data: features have shape {x.shape}; expected (n, ...) with n > 0")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError("data: features contain NaN or Inf")
        scale = 255.0 if x.dtype == np.uint8 or (x.size and x.max() > 1.0) else 1.0
        return (x.reshape(x.shape[0], -1) / scale).astype(np.float32)

    def labels(y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        if y.dtype.kind not in "ui":
            raise ValueError(f"data: labels have dtype {y.dtype}; expected integers")
        return y.reshape(-1).astype(np.int64)

    return Dataset(name, features(x_train), labels(y_train), features(x_test), labels(y_test))


def load_path(path: str | os.PathLike) -> Dataset:
    """Load MNIST / Fashion-MNIST from an IDX directory or an ``.npz`` file.

    An ``.npz`` must hold ``x_train``, ``y_train``, ``x_test``, ``y_test`` (the
    layout of Keras' ``mnist.npz``). Pixel values are scaled to ``[0, 1]``.
    """
    path = as_path(path, "data")
    if not path.exists():
        raise ValueError(f"data: {str(path)!r} does not exist; expected {DATA_FORMATS}")
    if path.is_dir():
        parts = {key: read_idx(_find_idx(path, stem)) for key, stem in _IDX_FILES.items()}
        return _as_dataset(path.name, **parts)
    from .npz import read_npz

    arrays = read_npz(path, "data", f"is not a data file nnfast reads (expected {DATA_FORMATS})")
    parts = {k: arrays[k] for k in _IDX_FILES if k in arrays}
    missing = [k for k in _IDX_FILES if k not in parts]
    if missing:
        raise ValueError(f"data: {str(path)!r} lacks arrays {missing}; expected x_train, y_train, x_test, y_test")
    return _as_dataset(path.stem, **parts)


def load_dataset(path: str | os.PathLike | None = None) -> Dataset:
    """The default digits set when ``path`` is None, else :func:`load_path`."""
    return load_digits() if path is None else load_path(path)
