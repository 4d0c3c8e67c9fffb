"""Checkpoints: ``save`` and ``load`` a model (and optimizer) as one ``.npz`` file.

The file holds only plain arrays (no pickle; it is read with
``allow_pickle=False``, so loading never runs code from the file):

* ``nnfast/format_version`` — :data:`FORMAT_VERSION`;
* ``param/<name>`` — every parameter, by its name in ``model.named_parameters()``;
* ``optim/class``, ``optim/hyper/<name>``, ``optim/<state>`` — the optimizer, when given;
* ``extra/<key>`` — whatever the caller adds (the trainer stores its position and RNG state).

Writes are atomic: the file is written and fsynced under a temporary name in
the same directory, then renamed over the target with ``os.replace``; a crash
at any point leaves either the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .layers import Module
from .npz import read_npz
from .optim import Optimizer
from .paths import as_path, check_output_path

#: Version of the checkpoint layout; bumped on any incompatible change.
FORMAT_VERSION = 1


def save(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None,
         extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically; returns the path.

    ``extra`` maps names to array-likes (numbers, strings, arrays) stored next
    to the parameters and returned by :func:`load`.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model: expected an nnfast Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected an nnfast Optimizer or None, got {type(optimizer).__name__}")
    path = check_output_path(path, "path")
    arrays: dict[str, np.ndarray] = {"nnfast/format_version": np.asarray(FORMAT_VERSION)}
    for name, p in model.named_parameters():
        arrays[f"param/{name}"] = model.backend.to_numpy(p.data)
    if optimizer is not None:
        arrays["optim/class"] = np.asarray(type(optimizer).__name__)
        for key, value in optimizer.hyperparameters().items():
            arrays[f"optim/hyper/{key}"] = np.asarray(value)
        for key, value in optimizer.state_dict().items():
            arrays[f"optim/{key}"] = value
    for key, value in (extra or {}).items():
        value = np.asarray(value)
        if value.dtype == object:
            raise TypeError(f"extra[{key!r}]: expected numbers, strings or arrays, got an object array")
        arrays[f"extra/{key}"] = value

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)
    return path


def load(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None) -> dict[str, np.ndarray]:
    """Restore ``model`` (and ``optimizer``) from a file written by :func:`save`.

    Everything is checked before anything is changed: a missing, truncated,
    corrupted, wrong-version or wrong-architecture file raises ``ValueError``
    (``FileNotFoundError`` when absent) and leaves the model untouched.
    Returns the ``extra`` entries that were saved.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model: expected an nnfast Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected an nnfast Optimizer or None, got {type(optimizer).__name__}")
    path = as_path(path, "path")
    if not path.exists():
        raise FileNotFoundError(f"path: no checkpoint at {str(path)!r}")
    arrays = read_npz(path, "path", f"is not an nnfast checkpoint (expected {CHECKPOINT_FORMAT})")

    version = arrays.get("nnfast/format_version")
    if version is None:
        raise ValueError(f"path: {str(path)!r} is not an nnfast checkpoint (no format version)")
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
        raise ValueError(f"path: checkpoint format version {version} is not supported "
                         f"(this nnfast reads version {FORMAT_VERSION})")

    params = dict(model.named_parameters())
    saved = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    if set(saved) != set(params):
        raise ValueError(f"model: checkpoint parameters {sorted(saved)} do not match the model's "
                         f"{sorted(params)} (a different architecture?)")
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise ValueError(f"model: parameter {name!r} has shape {saved[name].shape} in the checkpoint, "
                             f"{p.shape} in the model (a different architecture?)")
        if saved[name].dtype != p.data.dtype:
            raise ValueError(f"model: parameter {name!r} is {saved[name].dtype} in the checkpoint, "
                             f"{p.data.dtype} in the model")

    optim_state = None
    if optimizer is not None:
        cls = arrays.get("optim/class")
        if cls is None:
            raise ValueError(f"optimizer: {str(path)!r} holds no optimizer state")
        if str(cls) != type(optimizer).__name__:
            raise ValueError(f"optimizer: checkpoint holds {cls} state, got a {type(optimizer).__name__}")
        optim_state = {k[len("optim/"):]: v for k, v in arrays.items()
                       if k.startswith("optim/") and k != "optim/class" and not k.startswith("optim/hyper/")}
        optimizer.check_state_dict(optim_state)

    # Convert everything first, then assign: a failed conversion changes nothing.
    converted = {name: model.backend.asarray(saved[name]) for name in params}
    for name, p in params.items():
        p.data = converted[name]
        p.grad = None
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    return {k[len("extra/"):]: v for k, v in arrays.items() if k.startswith("extra/")}


#: What :func:`load` accepts, for error messages.
CHECKPOINT_FORMAT = "an .npz file written by nnfast.save or `nnfast train --checkpoint`"


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); harmless where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
