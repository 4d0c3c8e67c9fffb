"""Reading ``.npz`` archives safely: shared by checkpoints and data sets."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

# What reading a damaged .npz can raise (zlib.error: a compressed member;
# MemoryError: a header that claims a huge array; NotImplementedError: an
# unknown zip compression method).
_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, MemoryError,
                NotImplementedError, zlib.error, struct.error)


def read_npz(path: Path, arg: str, problem: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path``, never unpickling anything.

    Anything unreadable (not a zip, a lone ``.npy``, truncated, a bad CRC, an
    object array that would need pickle, a header claiming more memory than
    exists) raises ``ValueError``: ``"{arg}: '{path}' {problem} ({why})"``.
    """
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            reason = "a single .npy array, not an .npz archive"
        else:
            with f:
                return {key: f[key] for key in f.files}
    except _READ_ERRORS as err:
        reason = f"{type(err).__name__}: {err}"
    raise ValueError(f"{arg}: {str(path)!r} {problem} ({reason})")
