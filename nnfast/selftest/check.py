"""What a self-test check is, and the context it runs in.

A :class:`Check` is one line of ``nnfast selftest``: a name, the shape it
runs at, the ops of the op table it exercises, and a function that runs them
on the backend under test and on the reference and returns the outputs side
by side (:class:`~nnfast.selftest.compare.Pair`). A check that finds
something wrong other than a numeric difference (an error that should have
been raised, a CUDA launch that took another path than the one forced) raises
:class:`CheckFailed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .compare import Pair


class CheckFailed(Exception):
    """A check found its backend wrong in a way that is not a numeric error."""


@dataclass
class Context:
    """The backend under test, the reference, the dtype and the random inputs of one check."""

    backend: Any
    reference: Any  # the NumPy backend, run in float64
    dtype: np.dtype
    rng: np.random.Generator
    #: What the check launched, for the report (the CUDA kernels of a forced GEMM path).
    notes: list[str] = field(default_factory=list)

    @property
    def on_cuda(self) -> bool:
        """True when the backend under test launches the CUDA kernels of ``kernels/``."""
        return self.backend.name == "cupy"

    def normal(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        """Fresh normal values in the check's dtype (never zeros: they hide unwritten outputs)."""
        return (self.rng.standard_normal(shape) * scale).astype(self.dtype)

    def put(self, a: np.ndarray, offset: int = 0) -> Any:
        """``a`` on the backend, starting ``offset`` elements into a larger buffer (misaligned for 1)."""
        if offset == 0:
            return self.backend.asarray(a)
        buf = self.backend.xp.empty(a.size + offset, a.dtype)
        buf[offset:] = self.backend.asarray(a.ravel())
        return buf[offset:].reshape(a.shape)

    def get(self, a: Any) -> np.ndarray:
        """A backend array as NumPy (a device-to-host copy on the GPU)."""
        return np.asarray(self.backend.to_numpy(a))

    @staticmethod
    def wide(a: Any) -> Any:
        """``a`` widened to float64 for the reference (exactly: every float32 is a float64)."""
        return np.asarray(a, dtype=np.float64) if a is not None else None


@dataclass(frozen=True)
class Check:
    """One line of the self-test."""

    #: The group it belongs to: "activation", "linear", "gemm", "softmax", "cross_entropy", "optimizer", "train".
    family: str
    name: str
    shape: str
    #: The rows of the op table (:data:`nnfast.ops.OPS`) it runs.
    ops: tuple[str, ...]
    run: Callable[[Context], list[Pair]]
    #: Terms of the longest sum behind an output, and the check's own tolerance factor.
    length: int = 1
    factor: float = 1.0
    #: It runs GEMMs: repeated under every matrix precision (:data:`nnfast.selftest.runner.PRECISIONS`).
    gemm: bool = False
    #: The activations (rows of :data:`nnfast.activations.TABLE`) it runs.
    activations: tuple[str, ...] = ()


def dims(*sizes: int, arrow: bool = False) -> str:
    """A shape as the report prints it: ``33×1000``, or ``50×68→36`` for a layer (batch×in→out)."""
    if arrow:
        return f"{sizes[0]}×{sizes[1]}→{sizes[2]}"
    return "×".join(str(s) for s in sizes)


__all__ = ["Check", "CheckFailed", "Context", "dims"]
