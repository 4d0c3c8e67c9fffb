"""Reading ``.npz`` archives safely: shared by checkpoints and data sets."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

# A zip archive (.npz) starts with a local file header or, when empty, the end-of-directory record.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"

# What reading a damaged .npz can raise (zlib.error: a compressed member;
# MemoryError: a header that claims a huge array; NotImplementedError: an
# unknown zip compression method).
_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, MemoryError,
                NotImplementedError, zlib.error, struct.error)


def read_npz(path: Path, arg: str, problem: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path``, never unpickling anything.

    Anything else (not a zip archive, a lone ``.npy``, truncated, a bad CRC,
    an object array that would need pickle, a header claiming more memory than
    exists) raises ``ValueError``: ``"{arg}: '{path}' {problem}: {why}"``.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as err:  # a directory, no permission, ...
        raise ValueError(f"{arg}: {str(path)!r} cannot be read ({type(err).__name__}: {err.strerror})") from None
    if magic.startswith(_ZIP_MAGIC):
        try:
            with np.load(path, allow_pickle=False) as f:
                return {key: f[key] for key in f.files}
        except _READ_ERRORS as err:
            # NumPy's advice to pass allow_pickle=True is wrong here: nnfast never unpickles.
            reason = ("it holds an array of Python objects (pickled), which nnfast never loads"
                      if "allow_pickle" in str(err) else f"it is a damaged .npz archive ({type(err).__name__}: {err})")
    elif magic == _NPY_MAGIC:
        reason = "it is a single .npy array, not an .npz archive"
    else:
        reason = "it is not an .npz (zip) archive"
    raise ValueError(f"{arg}: {str(path)!r} {problem}: {reason}")
