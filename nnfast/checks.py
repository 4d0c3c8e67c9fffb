"""Argument checks: the primitives every public entry point validates with.

Every check of a user-supplied value in nnfast's library core is one of these,
so the same mistake gets the same exception and the same message everywhere.
One exception type per kind of mistake (DESIGN §5):

* a value of the wrong type (a string for a number, a list for an array, a
  float for an int, an integer array for a float one) raises ``TypeError``;
* a value of the right type that is wrong (out of range, wrong shape, empty,
  not one of the choices) raises ``ValueError``;
* an array of another backend (a CuPy array for a CPU backend, a NumPy array
  for the CuPy backend) raises :class:`nnfast.BackendError`.

Messages read ``"<argument>: expected <what>, got <what came>"``.

Two forms of each check: a function that checks one value now
(``real(lr, "lr", low=0.0)``), and a declaration used in the op table
(``Real(low=0.0)``), called as ``check(value, arg, ctx)`` with the context of
the call (the backend, and the arguments checked before this one).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import BackendError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def type_name(value: Any) -> str:
    """``value``'s type as a message shows it: ``list``, ``numpy.ndarray``, ``cupy.ndarray``."""
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def is_cupy_array(value: Any) -> bool:
    """True for a CuPy array, without importing CuPy."""
    return type(value).__module__.startswith("cupy")


# ------------------------------------------------------------------ scalars
def real(value: Any, arg: str, low: float | None = None, high: float | None = None, *,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) in the range, as a float."""
    # math.isfinite, not np.isfinite: every op checks its scalars, and NumPy's ufunc on a Python float costs
    # ~0.8 us a call. An int too large for a float is not a finite real number either.
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{arg}: expected a finite real number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise TypeError(f"{arg}: expected a finite real number, got {value!r}") from None
    if not math.isfinite(value):
        raise TypeError(f"{arg}: expected a finite real number, got {value!r}")
    below = low is not None and (value < low or (low_open and value == low))
    above = high is not None and (value > high or (high_open and value == high))
    if below or above:
        raise ValueError(f"{arg}: expected a value {_range_text(low, high, low_open, high_open)}, got {value!r}")
    return value


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{float(low)}, {float(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {float(low)}"
    return f"{'<' if high_open else '<='} {float(high)}"


def integer(value: Any, arg: str, low: int | None = None) -> int:
    """An int (not a bool; NumPy integers too) of at least ``low``, as an int."""
    if low == 1:
        what = "a positive int"
    else:
        what = "an int" if low is None else f"an int >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg}: expected {what}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{arg}: expected {what}, got {value!r}")
    return int(value)


def choice(value: Any, arg: str, options: Sequence[Any]) -> Any:
    """One of ``options`` (compared by equality; ``None`` may be one of them).

    Anything else, of any type, is a bad value (``ValueError``): the message
    lists the choices.
    """
    for option in options:
        if option is None:
            if value is None:
                return None
        elif isinstance(value, type(option)) and value == option:
            return option
    raise ValueError(f"{arg}: expected {choices_text(options)}, got {value!r}")


def choices_text(options: Sequence[Any]) -> str:
    """``'a' or 'b'`` / ``one of 'a', 'b' or None``, for messages."""
    words = [repr(o) for o in options]
    if len(words) <= 2:
        return " or ".join(words)
    return "one of " + ", ".join(words[:-1]) + " or " + words[-1]


def flag(value: Any, arg: str) -> bool:
    """Anything, read as a truth value (as Python's ``if`` does)."""
    return bool(value)


def float_dtype(value: Any, arg: str = "dtype") -> np.dtype:
    """``'float32'`` or ``'float64'`` (or their NumPy dtypes) as a ``numpy.dtype``."""
    try:
        dt = np.dtype(value) if value is not None else None  # np.dtype(None) would be float64
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt not in FLOAT_DTYPES:  # dtype == None is True for float64
        raise TypeError(f"{arg}: expected 'float32' or 'float64', got {value!r}")
    return dt


# ------------------------------------------------------------------ arrays
def array(backend: Any, value: Any, arg: str, *, ndim: int | None = None, dtype: Any = None,
          shape: Sequence[int] | None = None) -> Any:
    """A non-empty float32/float64 array of ``backend``, made C-contiguous.

    ``dtype``: the dtype it must share with the other operands; ``shape``:
    the exact shape it must have (checked after ``ndim``).
    """
    if not backend.is_native(value):
        if is_cupy_array(value) or isinstance(value, np.ndarray):
            raise BackendError(
                f"{arg}: got a {type_name(value)} but the {backend.name!r} backend works on "
                f"{backend.xp.__name__}.ndarray; convert it with nnfast.asarray() first")
        raise TypeError(f"{arg}: expected an array, got {type_name(value)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{arg}: expected dtype float32 or float64, got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{arg}: expected dtype {np.dtype(dtype)} (as the other operands), got {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{arg}: expected a {ndim}-D array, got shape {tuple(value.shape)}")
    if value.size == 0:
        raise ValueError(f"{arg}: expected a non-empty array, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{arg}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    return contiguous(backend.xp, value)


def contiguous(xp: Any, a: Any) -> Any:
    """``a`` itself when C-contiguous, else a C-contiguous copy (0-d stays 0-d)."""
    return a if a.flags.c_contiguous else xp.ascontiguousarray(a)


def labels(backend: Any, value: Any, rows: int, arg: str = "labels") -> Any:
    """Integer class indices, one per row, as a contiguous int64 array of ``backend``.

    Their range (``0 <= label < classes`` or ``ignore_index``) is the kernels'
    check: it needs a pass over the labels that the kernels make anyway.
    """
    xp = backend.xp
    if not backend.is_native(value):
        raise TypeError(f"{arg}: expected an integer {xp.__name__}.ndarray, got {type_name(value)}")
    if value.dtype.kind not in "iu":
        raise TypeError(f"{arg}: expected integer class indices, got dtype {value.dtype}")
    if value.ndim != 1 or value.shape[0] != rows:
        raise ValueError(f"{arg}: expected shape ({rows},), got {tuple(value.shape)}")
    if value.dtype.kind == "u" and value.dtype.itemsize == 8:
        # uint64 -> int64 would wrap labels >= 2**63 to negative values.
        big = value > np.iinfo(np.int64).max
        if bool(big.any()):
            row = int(xp.argmax(big))
            raise ValueError(f"{arg}: expected class indices, got {int(value[row])} at row {row}")
    return xp.ascontiguousarray(value, dtype=xp.int64)


def param_lists(backend: Any, lists: dict[str, Sequence[Any]], read_only: Sequence[str] = ()
                ) -> tuple[list[list[Any]], Callable[[], None]]:
    """Parallel lists of parameters / gradients / optimizer states, one array per parameter.

    Every list has as many arrays as the first; the arrays of one parameter
    share the first one's dtype and shape; all are non-empty float arrays of
    ``backend``, writeable unless named in ``read_only``. Returns the lists
    (arrays made C-contiguous) and a function to call after the update: an
    array updated in place that was a strided view is updated through a
    contiguous copy, which that function writes back.
    """
    names = list(lists)
    out = [list(lists[n]) for n in names]
    count = len(out[0])
    for name, items in zip(names, out):
        if len(items) != count:
            raise ValueError(f"{name}: expected {count} arrays (one per parameter), got {len(items)}")
    for i in range(count):
        ref = out[0][i]
        for name, items in zip(names, out):
            a = items[i]
            if not backend.is_native(a):
                raise TypeError(f"{name}[{i}]: expected a {backend.xp.__name__}.ndarray, got {type_name(a)}")
            if a.dtype not in FLOAT_DTYPES or a.dtype != ref.dtype:
                raise TypeError(f"{name}[{i}]: expected dtype {ref.dtype}, got {a.dtype}")
            if a.shape != ref.shape:
                raise ValueError(f"{name}[{i}]: expected shape {tuple(ref.shape)}, got {tuple(a.shape)}")
            if a.size == 0:
                raise ValueError(f"{name}[{i}]: expected a non-empty array, got shape {tuple(a.shape)}")
            if name not in read_only and not a.flags.writeable:
                raise ValueError(f"{name}[{i}]: expected a writeable array (it is updated in place)")
    refuse_shared_memory(backend, dict(zip(names, out)), read_only)
    write_back: list[tuple[Any, Any]] = []
    for name, items in zip(names, out):
        for i, a in enumerate(items):
            if not a.flags.c_contiguous:
                items[i] = backend.xp.ascontiguousarray(a)
                if name not in read_only:
                    write_back.append((a, items[i]))

    def finish() -> None:
        for view, copy in write_back:
            view[...] = copy

    return out, finish


def refuse_shared_memory(backend: Any, lists: dict[str, Sequence[Any]], read_only: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` when two arrays of ``lists`` share memory, unless both are only read.

    The same array twice, two parameters viewing one buffer, a gradient or an
    optimizer state in a parameter's memory: an update in place would
    overwrite what it still reads (on a GPU, two blocks of the multi-tensor
    update would write the same memory at once and lose updates). Host
    arrays are compared only with arrays of the same base buffer; device
    arrays by their address ranges. Arrays whose byte ranges meet are then
    compared exactly (``shares_memory``), so interleaved views of one buffer
    that share no element pass.
    """
    entries: list[tuple[Any, ...]] = []  # (position, list name, index, array)
    for name, items in lists.items():
        for i, a in enumerate(items):
            if a is not None and a.size:
                entries.append((len(entries), name, i, a))
    if not entries:
        return
    if is_cupy_array(entries[0][3]):
        groups = [entries]  # one address space: compare every range
    else:
        by_buffer: dict[int, list[tuple[Any, ...]]] = {}
        for entry in entries:
            by_buffer.setdefault(id(_buffer(entry[3])), []).append(entry)
        groups = [group for group in by_buffer.values() if len(group) > 1]
    for group in groups:
        _refuse_overlaps(backend.xp, group, read_only)


def _buffer(a: Any) -> Any:
    """The object that owns a host array's memory (the end of its chain of bases)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None else a.base


def _refuse_overlaps(xp: Any, entries: list[tuple[Any, ...]], read_only: Sequence[str]) -> None:
    spans = sorted((*_byte_span(a), order, name, i, a) for order, name, i, a in entries)
    reach: list[tuple[Any, ...]] = []  # spans that begin before the current one
    for span in spans:
        reach = [r for r in reach if r[1] > span[0]]
        for other in reach:
            if (other[3] in read_only and span[3] in read_only) or not _shares(xp, other[5], span[5]):
                continue
            first, second = sorted((other, span), key=lambda s: s[2])
            raise ValueError(f"{second[3]}[{second[4]}]: shares memory with {first[3]}[{first[4]}] (the same "
                             "array, or views of one buffer); every parameter, gradient and optimizer state "
                             "needs memory of its own, or an update in place overwrites what it reads")
        reach.append(span)


def _byte_span(a: Any) -> tuple[int, int]:
    """``[first, last + 1)``: the bytes an array's elements lie within."""
    lo = hi = a.data.ptr if is_cupy_array(a) else a.__array_interface__["data"][0]
    for n, stride in zip(a.shape, a.strides):
        if stride >= 0:
            hi += (n - 1) * stride
        else:
            lo += (n - 1) * stride
    return lo, hi + a.itemsize


def _shares(xp: Any, a: Any, b: Any) -> bool:
    """Whether two arrays whose byte spans meet share an element."""
    if a.flags.c_contiguous and b.flags.c_contiguous:
        return True
    exact = getattr(xp, "shares_memory", None)
    return True if exact is None else bool(exact(a, b))


# ------------------------------------------------------------------ memory
def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - non-POSIX
        return None


def fits_in_memory(nbytes: int, what: str, limit: int | None) -> None:
    """Raise ``ValueError`` naming ``what`` when ``nbytes`` exceed ``limit`` (None: no limit known).

    Called before an allocation whose size comes from user input, so that an
    impossible request fails at once with a message, instead of with a bare
    ``MemoryError`` or by driving the machine out of memory.
    """
    if limit is not None and nbytes > limit:
        raise ValueError(f"{what}: needs {_gib(nbytes)} of memory, more than the {_gib(limit)} available")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


# ------------------------------------------------------------------ declarations (the op table)
class Context:
    """What a declared check sees besides its value: the backend and the arguments checked so far."""

    __slots__ = ("backend", "values", "after")

    def __init__(self, backend: Any, values: dict[str, Any]) -> None:
        self.backend = backend
        self.values = values  # name -> checked value (raw value for those not checked yet)
        self.after: list[Callable[[], None]] = []  # run once the op has returned


class Check:
    """A declared check: ``check(value, arg, ctx)`` returns the value the op gets, or raises."""

    def __call__(self, value: Any, arg: str, ctx: Context) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Real(Check):
    """A finite real number in a range (:func:`real`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, value: Any, arg: str, ctx: Context | None = None) -> float:
        return real(value, arg, self.low, self.high, low_open=self.low_open, high_open=self.high_open)


@dataclass(frozen=True)
class Integer(Check):
    """An int of at least ``low`` (:func:`integer`)."""

    low: int | None = None

    def __call__(self, value: Any, arg: str, ctx: Context | None = None) -> int:
        return integer(value, arg, self.low)


@dataclass(frozen=True)
class Choice(Check):
    """One of ``options`` (:func:`choice`)."""

    options: tuple[Any, ...]

    def __call__(self, value: Any, arg: str, ctx: Context | None = None) -> Any:
        return choice(value, arg, self.options)


@dataclass(frozen=True)
class Flag(Check):
    """A truth value (:func:`flag`)."""

    def __call__(self, value: Any, arg: str, ctx: Context | None = None) -> bool:
        return flag(value, arg)


@dataclass(frozen=True)
class Array(Check):
    """A float array of the call's backend (:func:`array`).

    ``like``: the argument whose dtype it shares; ``shape``: its exact shape,
    computed from the arguments checked before it; ``optional``: None is
    accepted (and passed on); ``unless``: a predicate of the checked
    arguments under which the value is passed on unchecked (the op ignores it).
    """

    ndim: int | None = None
    like: str | None = None
    shape: Callable[[dict[str, Any]], Sequence[int]] | None = None
    optional: bool = False
    unless: Callable[[dict[str, Any]], bool] | None = None

    def __call__(self, value: Any, arg: str, ctx: Context) -> Any:
        if (self.optional and value is None) or (self.unless is not None and self.unless(ctx.values)):
            return value
        dtype = ctx.values[self.like].dtype if self.like else None
        shape = self.shape(ctx.values) if self.shape else None
        return array(ctx.backend, value, arg, ndim=self.ndim, dtype=dtype, shape=shape)


@dataclass(frozen=True)
class Labels(Check):
    """Integer class indices, one per row of the argument ``rows_of`` (:func:`labels`)."""

    rows_of: str

    def __call__(self, value: Any, arg: str, ctx: Context) -> Any:
        return labels(ctx.backend, value, ctx.values[self.rows_of].shape[0], arg)


@dataclass(frozen=True)
class ArrayList(Check):
    """A sequence of arrays; checked together with its siblings by :class:`ParamLists`."""

    def __call__(self, value: Any, arg: str, ctx: Context | None = None) -> list[Any]:
        if not isinstance(value, (str, bytes)):
            try:
                return list(value)
            except TypeError:
                pass
        raise TypeError(f"{arg}: expected a sequence of arrays, got {type_name(value)}")


@dataclass(frozen=True)
class ParamLists:
    """An op-level check: the named :class:`ArrayList` arguments are parallel lists (:func:`param_lists`).

    ``read_only``: lists the op only reads (gradients); ``empty_when``: a list
    that may be empty under a condition of the checked arguments, in which
    case the op gets one None per parameter instead.
    """

    names: tuple[str, ...]
    read_only: tuple[str, ...] = ()
    empty_when: tuple[str, Callable[[dict[str, Any]], bool]] | None = None

    def __call__(self, ctx: Context) -> None:
        names = list(self.names)
        absent = None
        if self.empty_when is not None:
            name, condition = self.empty_when
            if condition(ctx.values) and len(ctx.values[name]) == 0:
                absent = name
                names.remove(name)
        lists, finish = param_lists(ctx.backend, {n: ctx.values[n] for n in names}, self.read_only)
        ctx.values.update(zip(names, lists))
        if absent is not None:
            ctx.values[absent] = [None] * len(lists[0])
        ctx.after.append(finish)
