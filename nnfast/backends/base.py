"""The backend contract: array handling, the public op methods, and the kernel entries.

A backend is a subclass of :class:`Backend` that sets :attr:`~Backend.name`
and :attr:`~Backend.xp` (its array module). Every op of the contract is a
row of the op table (:mod:`nnfast.ops`), and comes in two methods:

* the public method (``linear_forward``, ``softmax_cross_entropy``, ...),
  made here from the row: it checks every argument as the row declares, the
  same way for every backend (DESIGN §5), makes the arrays C-contiguous, and
  calls the kernel entry. A backend never overrides it.
* the kernel entry ``_op`` (``_linear_forward``, ...): the computation, on
  arguments that are already checked. :class:`Backend` inherits a working
  one for every op from :mod:`.reference` (plain array code against
  ``self.xp``), so a new backend runs from its first line and overrides only
  the ops it makes faster. Layers, losses and optimizers, which check their
  inputs at their own boundary, call the kernel entries directly: an input is
  checked once per call, not once per layer it passes through.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import numpy as np

from .. import checks
from ..errors import BackendError
from ..op_spec import REQUIRED, Op
from ..ops import OPS
from .reference import ReferenceOps, bad_label_error

__all__ = ["Backend", "bad_label_error"]


@functools.lru_cache(maxsize=1)
def _physical_memory() -> int | None:
    return checks.physical_memory()


class Backend(ReferenceOps):
    """Base class of every backend: arrays, the checked public ops, the reference kernel entries.

    Subclasses set :attr:`name` and :attr:`xp` and override the ``_op``
    kernel entries they implement. Public op methods must not be
    overridden: they hold the checks that make every backend reject the same
    bad input with the same message.
    """

    #: Backend name: ``"numpy"``, ``"numba"`` or ``"cupy"``.
    name: str = "base"
    #: The array module of this backend's arrays.
    xp: Any = np

    def __repr__(self) -> str:
        return f"<nnfast backend {self.name!r}>"

    # ------------------------------------------------------------------ arrays
    def is_native(self, a: Any) -> bool:
        """True when ``a`` is an array of this backend's array type."""
        return isinstance(a, self.xp.ndarray)

    def asarray(self, x: Any, dtype: Any = None, *, arg: str = "x") -> Any:
        """Convert ``x`` (array, list, scalar) to this backend's array type.

        Arrays of another backend are converted when that is a copy between
        host and device (NumPy -> CuPy); the NumPy-based backends refuse device
        arrays with :class:`BackendError` rather than copy them silently.
        Errors name ``arg`` (the caller's name for ``x``) or ``dtype``.
        """
        if checks.is_cupy_array(x) and self.xp is np:
            raise BackendError(
                f"{arg}: got a CuPy (GPU) array but the current backend is {self.name!r}; "
                "copy it to the host first with nnfast.to_numpy()"
            )
        if dtype is not None:
            try:
                dtype = np.dtype(dtype)
            except (TypeError, ValueError) as err:
                raise TypeError(f"dtype: expected a NumPy dtype, got {dtype!r} ({err})") from None
        try:
            a = self.xp.asarray(x, dtype=dtype)
        except (TypeError, ValueError, OverflowError) as err:
            raise TypeError(f"{arg}: cannot convert a {checks.type_name(x)} to an array: {err}") from None
        except MemoryError as err:
            raise MemoryError(f"{arg}: a {checks.type_name(x)} too large to convert to an array ({err})") from None
        if a.dtype.kind in "OUSV":
            raise TypeError(f"{arg}: cannot convert a {checks.type_name(x)} to a numeric array (got dtype {a.dtype})")
        return a

    def memory_limit(self) -> int | None:
        """Bytes a single array of this backend may take at most (None: unknown).

        Sizes computed from user input are checked against it before anything
        is allocated (:func:`nnfast.checks.fits_in_memory`). The CPU backends
        use the RAM, asked of the OS once per process.
        """
        return _physical_memory()

    def to_numpy(self, a: Any) -> np.ndarray:
        """Return ``a`` as a ``numpy.ndarray`` (a copy from the device for CuPy)."""
        return np.asarray(a)

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = "float32") -> Any:
        """A new array of zeros of this backend."""
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape: int | tuple[int, ...], dtype: Any = "float32") -> Any:
        """A new uninitialised array of this backend."""
        return self.xp.empty(shape, dtype=dtype)

    def synchronize(self) -> None:
        """Wait until every queued kernel has finished (a no-op on the CPU)."""

    def launch_settings(self) -> tuple[Any, ...]:
        """Settings besides the shapes that decide what an op computes with (a device, a pinned
        kernel path): a step recorded under other settings is made anew. Empty on the CPU."""
        return ()

    # ------------------------------------------------------------------ ops
    def _call(self, op: Op, values: dict[str, Any]) -> Any:
        """Check ``values`` (every argument of ``op``, by name) as the row declares, then run the op."""
        ctx = checks.Context(self, values)
        for step in _STEPS[op.name]:
            if isinstance(step, tuple):
                name, check = step
                values[name] = check(values[name], name, ctx)
            else:
                step(ctx)
        result = getattr(self, "_" + op.name)(*values.values())
        for after in ctx.after:
            after()
        return result


def _steps(op: Op) -> list[Any]:
    """The checks of ``op`` in order: ``(name, check)`` for an argument, the function for a relation."""
    args = {a.name: a for a in op.args}
    return [(step, args[step].check) if isinstance(step, str) else step for step in op.steps]


_STEPS = {name: _steps(op) for name, op in OPS.items()}


def _public_method(op: Op) -> Callable[..., Any]:
    """The public method of ``op``: binds the call to the row's signature and runs :meth:`Backend._call`."""
    names = [a.name for a in op.args]
    known = frozenset(names)
    positional = [a.name for a in op.args if not a.keyword_only]
    defaults = {a.name: a.default for a in op.args if a.default is not REQUIRED}

    def method(self: Backend, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise TypeError(f"{op.name}() takes {len(positional)} positional arguments but {len(args)} were given")
        given = dict(zip(positional, args))
        for key, value in kwargs.items():
            if key not in known:
                raise TypeError(f"{op.name}() got an unexpected keyword argument {key!r}")
            if key in given:
                raise TypeError(f"{op.name}() got multiple values for argument {key!r}")
            given[key] = value
        values = {}  # every argument, in the order of the signature (the kernel entry's order)
        for name in names:
            if name in given:
                values[name] = given[name]
            elif name in defaults:
                values[name] = defaults[name]
            else:
                raise TypeError(f"{op.name}() missing required argument: {name!r}")
        return self._call(op, values)

    kind = {False: inspect.Parameter.POSITIONAL_OR_KEYWORD, True: inspect.Parameter.KEYWORD_ONLY}
    method.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(a.name, kind[a.keyword_only],
                             default=inspect.Parameter.empty if a.default is REQUIRED else a.default)
           for a in op.args])
    method.__name__ = op.name
    method.__qualname__ = f"Backend.{op.name}"
    method.__doc__ = op.doc
    return method


for _op in OPS.values():
    setattr(Backend, _op.name, _public_method(_op))
