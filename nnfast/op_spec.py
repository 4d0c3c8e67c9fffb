"""What a row of the op table (:mod:`nnfast.ops`) declares.

An :class:`Op` holds everything about one op of the backend contract: its
arguments and their checks (:class:`Arg`, from :mod:`nnfast.checks`), its
docstring, how the benchmark measures it (:class:`Benchmark`: work model,
shapes, inputs, the PyTorch equivalent) and the CUDA kernels it launches
(:class:`Cuda`). The public ``Backend`` methods, the tests' op drivers, the
``nnfast bench`` cases and the CUDA instantiation lists are all derived from
these rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np

from .checks import Check, Context

#: Marks an argument without a default.
REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    """One argument of an op: its name, its check, its default, keyword-only or not."""

    name: str
    check: Check
    default: Any = REQUIRED
    keyword_only: bool = False


#: A step of an op's checks: an argument name (its :class:`Arg` check) or a
#: check of several arguments together, ``relation(ctx)``.
Step = Union[str, Callable[[Context], None]]


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: a size tag (small / medium / large / mlp), the dims and a label."""

    size: str
    dims: tuple[Any, ...]
    label: str


@dataclass(frozen=True)
class Benchmark:
    """How ``nnfast bench`` measures an op.

    ``inputs(rng, dims, dtype, variant, reference)`` returns the op's
    arguments for one call (NumPy arrays, lists of them, and plain values;
    tensors an op computes from others, like ``saved``, come from the NumPy
    ``reference`` backend). ``torch(torch, args)`` returns a zero-argument
    callable doing the same work in PyTorch, ``args`` being the same
    arguments as tensors on the device. ``work(dims, itemsize)`` is the
    flop or bytes one call is credited with, ``model`` that formula as text.
    ``streams`` is the memory traffic of a GB/s op as whole arrays of ``n``
    elements: how many it reads, writes, and updates in place (read and
    written back); its work is ``(reads + writes + 2 updates) n s`` bytes,
    and its machine limit streams the same arrays at the same size.
    """

    group: str  # the --ops group: "linear", "activation", "softmax_ce", "optim"
    metric: str  # "GFLOP/s" or "GB/s"
    limit: str  # the machine limit it is compared with: "gemm" (at its shape) or "copy"
    model: str
    work: Callable[[tuple[Any, ...], int], float]
    shapes: tuple[Shape, ...]
    inputs: Callable[[np.random.Generator, tuple[Any, ...], np.dtype, str, Any], dict[str, Any]]
    torch: Callable[[Any, dict[str, Any]], Callable[[], Any]]
    variants: tuple[str, ...] = ("",)  # e.g. the activations measured
    streams: tuple[int, int, int] = (1, 1, 0)  # GB/s ops: arrays read, written, updated in place


@dataclass(frozen=True)
class Kernel:
    """A CUDA kernel template and the placeholders this op fixes.

    ``template`` is a name expression with ``{PLACEHOLDERS}``
    (``"act_forward<{T}, {ACT}>"``); the placeholders not in ``fixed`` range
    over every value :mod:`nnfast.backends.cuda_launch` knows for them (every
    C type, every activation code, every tile, ...).
    """

    template: str
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cuda:
    """The kernel file of an op and the templates it instantiates."""

    file: str
    kernels: tuple[Kernel, ...]


@dataclass(frozen=True)
class Op:
    """One row of the op table."""

    name: str
    doc: str
    args: tuple[Arg, ...]
    #: Order of the checks (argument names and relations); default: the arguments in order.
    order: tuple[Step, ...] = ()
    bench: Benchmark | None = None
    #: The kernels of the op: one file's, or a tuple of several files' (a file compiled only for
    #: some settings, like the tensor-core GEMMs of matmul precision "high").
    cuda: Cuda | tuple[Cuda, ...] | None = None

    @property
    def kernel_files(self) -> tuple[Cuda, ...]:
        """The op's :class:`Cuda` entries, one per kernel file (none for an op without kernels)."""
        if self.cuda is None:
            return ()
        return self.cuda if isinstance(self.cuda, tuple) else (self.cuda,)

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.order or tuple(a.name for a in self.args)

    def arg(self, name: str) -> Arg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no argument {name!r}")

    def check(self, name: str, value: Any, label: str | None = None) -> Any:
        """Check one scalar argument on its own, as the op would (``label``: the name in the message).

        Used where a value is validated once and kept: a loss's
        ``label_smoothing``, an optimizer's ``lr``.
        """
        return self.arg(name).check(value, label or name, None)
