"""Helpers for the bad-input tests: state fingerprints, error checks, generated wrong inputs."""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st

import nnfast as nf

#: Exception types the public API documents for bad input (DESIGN §5).
DOCUMENTED = (ValueError, TypeError, nf.BackendError, FileNotFoundError)


class FakeCupyArray:
    """Stands in for a ``cupy.ndarray`` (nnfast recognises CuPy arrays by their module)."""

    __module__ = "cupy._core.core"

    def __init__(self, a: np.ndarray) -> None:
        self._a = np.asarray(a)
        self.shape, self.dtype, self.ndim, self.size = self._a.shape, self._a.dtype, self._a.ndim, self._a.size

    def get(self) -> np.ndarray:
        return self._a.copy()


FakeCupyArray.__name__ = FakeCupyArray.__qualname__ = "ndarray"


def fingerprint(value: Any, _seen: set[int] | None = None) -> Any:
    """A comparable, byte-exact picture of ``value``: arrays by dtype, shape and bytes."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("cupy"):
        a = nf.to_numpy(value)
        return ("array", a.dtype.str, a.shape, a.tobytes())
    if isinstance(value, (tuple, list)):
        return tuple(fingerprint(v, _seen) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, fingerprint(v, _seen)) for k, v in value.items()))
    return repr(value)


def module_state(model: nf.Module) -> Any:
    """Parameters (data and grad) and the forward cache of ``model`` and every layer in it."""
    parts = [(name, fingerprint(p.data), fingerprint(p.grad)) for name, p in model.named_parameters()]
    stack, caches = [model], []
    while stack:
        m = stack.pop()
        if "_cache" in m.__dict__:
            cache = m.__dict__["_cache"]
            caches.append((type(m).__name__, fingerprint(cache), tuple(id(c) for c in cache or ())))
        stack.extend(getattr(m, "layers", ()))
    return parts, caches


def optimizer_state(opt: nf.Optimizer) -> Any:
    return (opt.step_count, fingerprint(opt.state_dict()), fingerprint(opt.hyperparameters()),
            [fingerprint(p.data) for p in opt.params], [fingerprint(p.grad) for p in opt.params])


def expect_error(call: Callable[[], Any], names: str | tuple[str, ...], *, types: tuple[type, ...] = DOCUMENTED,
                 states: tuple[Callable[[], Any], ...] = ()) -> BaseException:
    """Run ``call``; it must raise one of ``types`` naming one of ``names``, and change no state."""
    names = (names,) if isinstance(names, str) else names
    before = [s() for s in states]
    try:
        call()
    except types as err:
        message = str(err)
        assert any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) for n in names), (
            f"{type(err).__name__} does not name {names}: {message!r}")
        after = [s() for s in states]
        for i, (b, a) in enumerate(zip(before, after)):
            assert a == b, f"state {i} changed by a failed call ({type(err).__name__}: {message})"
        return err
    except BaseException as err:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"undocumented {type(err).__name__}: {err}") from err
    raise AssertionError(f"no error for a bad input naming {names}")


# ----------------------------------------------------------------- generated wrong inputs
BAD_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_, np.complex64, np.complex128, object,
              "U3", "S3", "datetime64[s]", "timedelta64[s]"]


def array_of(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    """An array of ``shape`` and any ``dtype`` with small values."""
    values = np.random.default_rng(seed).integers(0, 3, size=shape)
    dtype = np.dtype(dtype)
    if dtype.kind == "O":
        a = np.empty(shape, dtype=object)
        a[...] = 1.0
        return a
    if dtype.kind in "US":
        return values.astype(str).astype(dtype)
    if dtype.kind in "Mm":
        return values.astype(dtype)
    return values.astype(dtype)


@st.composite
def wrong_arrays(draw, good_shape: tuple[int | None, ...], allow_any_shape: bool = False):
    """A wrong input for an argument that wants a float array of ``good_shape`` (None: any size).

    Returns ``(value, expected exception type, what is wrong)``.
    """
    kinds = ["dtype", "empty", "not an array"]
    if not allow_any_shape:
        kinds += ["rank", "shape"]
    kind = draw(st.sampled_from(kinds))
    fill = lambda: draw(st.integers(1, 5))  # noqa: E731
    shape = tuple(fill() if s is None else s for s in good_shape)
    if kind == "dtype":
        return array_of(shape, draw(st.sampled_from(BAD_DTYPES)), draw(st.integers(0, 9))), TypeError, kind
    if kind == "empty":
        shape = list(shape) or [0]
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        return np.zeros(tuple(shape), np.float32), ValueError, kind
    if kind == "not an array":
        value = draw(st.sampled_from(["abc", b"abc", None, {"a": 1}, object(), [[1.0, 2.0], [3.0]],
                                      [["a", "b"]], 1 + 2j, FakeCupyArray(np.ones(shape, np.float32))]))
        if isinstance(value, FakeCupyArray):
            return value, nf.BackendError, kind
        return value, TypeError, kind
    if kind == "rank":
        ndim = draw(st.sampled_from([n for n in (0, 1, 2, 3) if n != len(good_shape)]))
        return np.ones(tuple(fill() for _ in range(ndim)), np.float32), ValueError, kind
    # wrong shape, right rank: change one fixed dimension.
    fixed = [i for i, s in enumerate(good_shape) if s is not None]
    i = draw(st.sampled_from(fixed))
    bad = list(shape)
    bad[i] = draw(st.integers(1, 9).filter(lambda n: n != good_shape[i]))
    return np.ones(tuple(bad), np.float32), ValueError, kind


@st.composite
def views_of(draw, a: np.ndarray):
    """``a``'s values as a non-contiguous view: Fortran order, negative strides or a stride-2 slice."""
    kind = draw(st.sampled_from(["f", "reversed", "strided", "transposed"]))
    if a.ndim == 0:
        return a
    if kind == "f":
        return np.asfortranarray(a)
    if kind == "reversed":
        return np.ascontiguousarray(a[::-1])[::-1]
    if kind == "transposed":
        return np.ascontiguousarray(a.T).T
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    big[..., ::2] = a
    return big[..., ::2]
