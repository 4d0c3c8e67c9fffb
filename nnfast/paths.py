"""Paths given to nnfast: their type, and whether a file can be written where nnfast will write one.

Outputs (checkpoints, bench reports) are checked before any work starts: a run
must not fail at its end, after minutes of training or benchmarking, because
its output directory is missing. nnfast never creates directories a user did
not ask for.
"""

from __future__ import annotations

import os
from pathlib import Path


def as_path(path: object, arg: str) -> Path:
    """``path`` (str, bytes or os.PathLike) as a :class:`~pathlib.Path`; TypeError naming ``arg`` otherwise."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def check_output_path(path: object, arg: str, *, overwrite: bool = True) -> Path:
    """``path`` as a Path if a file can be written there now; else an error naming ``arg``.

    Raises ``FileNotFoundError`` when its directory does not exist,
    ``NotADirectoryError`` when that "directory" is a file, ``IsADirectoryError``
    when ``path`` itself is a directory, ``PermissionError`` when the directory
    is not writable, and ``FileExistsError`` when the file exists and
    ``overwrite`` is false.
    """
    path = as_path(path, arg)
    if str(path) == "":
        raise ValueError(f"{arg}: expected a file name, got an empty path")
    directory = path.parent
    shown = str(directory.resolve())
    where = f"{arg}: cannot write {str(path)!r}"
    if not directory.exists():
        raise FileNotFoundError(f"{where}: directory {shown!r} does not exist (nnfast does not create it)")
    if not directory.is_dir():
        raise NotADirectoryError(f"{where}: {shown!r} is not a directory")
    if path.is_dir():
        raise IsADirectoryError(f"{where}: it is a directory, expected a file name")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{where}: directory {shown!r} is not writable")
    if not overwrite and path.exists():
        raise FileExistsError(f"{arg}: {str(path)!r} already exists")
    return path
