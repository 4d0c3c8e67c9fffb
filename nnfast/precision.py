"""Matmul precision: may float32 GEMMs run on TF32 tensor cores? PyTorch's meaning.

* ``"highest"`` (the default): float32 GEMMs compute in float32, as
  ``torch.set_float32_matmul_precision("highest")``;
* ``"high"``: float32 GEMMs on the GPU (the ``cupy`` backend's linear layers,
  forward and backward) run on the tensor cores in TF32: the operands are
  rounded to 10 mantissa bits (to nearest), products are accumulated in
  float32, so a dot product of length K is off by about 3e-4 sqrt(K) times
  the root mean square of its terms: for random data a relative error of
  about 3e-4, where float32 gives about 1e-7 sqrt(K) (the same as with
  ``torch.set_float32_matmul_precision("high")`` /
  ``torch.backends.cuda.matmul.allow_tf32 = True``). float64 is never affected.
  On the CPU backends (``numpy``, ``numba``) ``"high"`` is accepted and
  changes nothing.

PyTorch's ``"medium"`` (bfloat16) has no counterpart here and is refused.

:func:`set_matmul_precision` sets the process-wide value;
``with matmul_precision(...)`` overrides it for the current thread / task (a
:class:`contextvars.ContextVar`), nests, and restores in ``finally``.
``NNFAST_MATMUL_PRECISION`` is read once, at import: an unknown value raises
``ValueError`` there (the ``nnfast`` command reports it in one line itself,
unless ``--matmul-precision`` overrides it: :data:`deferred_error`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

from . import _command

#: The accepted precisions.
PRECISIONS = ("highest", "high")

#: The environment variable read at import.
ENV = "NNFAST_MATMUL_PRECISION"


def _checked(value: object, what: str) -> str:
    if isinstance(value, str) and value in PRECISIONS:
        return value
    hint = " (PyTorch's 'medium', bfloat16 matmuls, is not supported)" if value == "medium" else ""
    raise ValueError(f"{what}: expected 'highest' or 'high', got {value!r}{hint}")


def _read_env() -> str:
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return "highest"
    value = raw.strip().lower()  # as NNFAST_BACKEND: case and surrounding blanks do not matter
    return value if value in PRECISIONS else _checked(raw, ENV)


#: The error of a bad ``NNFAST_MATMUL_PRECISION``, set aside for the ``nnfast`` command to report (its
#: process only; elsewhere the import raises it). None when the value is good.
deferred_error: ValueError | None = None

try:
    _default = _read_env()
except ValueError as err:
    if not _command.started_as_command():
        raise
    deferred_error, _default = err, "highest"

_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("nnfast_matmul_precision", default=None)


def get_matmul_precision() -> str:
    """The precision in force: the innermost :func:`matmul_precision` block's, else the process-wide one."""
    scoped = _scoped.get()
    return _default if scoped is None else scoped


def set_matmul_precision(precision: str) -> None:
    """Set the process-wide matmul precision: ``"highest"`` or ``"high"`` (see the module's docstring)."""
    global _default
    _default = _checked(precision, "precision")


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[str]:
    """Use ``precision`` for the matmuls inside the ``with`` block (this thread / task only); nests."""
    token = _scoped.set(_checked(precision, "precision"))
    try:
        yield precision
    finally:
        _scoped.reset(token)


__all__ = ["ENV", "PRECISIONS", "deferred_error", "get_matmul_precision", "matmul_precision",
           "set_matmul_precision"]
