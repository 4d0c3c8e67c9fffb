"""Every argument check the op table declares, fuzzed: each op's arguments, one at a time, made wrong.

For every row of :data:`nnfast.ops.OPS` and every argument, the wrong values
come from the kind of check the row declares (a string or NaN for a number,
a number below its range, a float for an int, a list or an integer array for
an array, an array of another backend, a wrong shape, ...). The call must
raise the exception of that kind of mistake (``TypeError`` for a wrong type,
``ValueError`` for a bad value, ``BackendError`` for another backend's
array), name the argument, and change nothing. A new op or a new argument is
covered without a line here, as long as its checks are the primitives of
:mod:`nnfast.checks`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import pytest

import nnfast as nf
from nnfast import activations, checks
from nnfast.backends import backend_for
from nnfast.ops import OPS

from fuzz_helpers import FakeCupyArray, expect_error, fingerprint
from op_table import AVAILABLE

Bad = tuple[str, Any, type]  # (what, value, exception)


def _numbers(check: checks.Real) -> Iterator[Bad]:
    yield "a string", "0.5", TypeError
    yield "NaN", float("nan"), TypeError
    yield "a bool", True, TypeError
    if check.low is not None:
        yield "below the range", check.low - 1.0, ValueError
    if check.high is not None:
        yield "above the range", check.high + 1.0, ValueError
        if check.high_open:
            yield "the open end", check.high, ValueError


def _ints(check: checks.Integer) -> Iterator[Bad]:
    yield "a float", 1.5, TypeError
    yield "a bool", True, TypeError
    if check.low is not None:
        yield "below the range", check.low - 1, ValueError


def _arrays(check: checks.Array, good: Any, backend: Any) -> Iterator[Bad]:
    host = np.asarray(backend.to_numpy(good))
    yield "a list", host.tolist(), TypeError
    yield "an integer array", backend.asarray(host.astype(np.int64)), TypeError
    if check.like is not None:
        other = np.float64 if host.dtype == np.float32 else np.float32
        yield "another dtype", backend.asarray(host.astype(other)), TypeError
    if check.ndim is not None:
        yield "another rank", backend.asarray(host[..., None]), ValueError
    yield "an empty array", backend.asarray(host[:0]), ValueError
    if check.shape is not None:
        yield "another shape", backend.asarray(np.concatenate([host, host], axis=-1)), ValueError
    if backend.xp is np:
        yield "another backend's array", FakeCupyArray(host), nf.BackendError


def _bad_values(arg: Any, good: Any, backend: Any) -> Iterator[Bad]:
    check = arg.check
    if isinstance(check, checks.Real):
        yield from _numbers(check)
    elif isinstance(check, checks.Integer):
        yield from _ints(check)
    elif isinstance(check, checks.Choice):
        yield "not a choice", "no-such-choice", ValueError
    elif isinstance(check, checks.Array):
        yield from _arrays(check, good, backend)
    elif isinstance(check, checks.Labels):
        host = np.asarray(backend.to_numpy(good))
        yield "float labels", backend.asarray(host.astype(np.float32)), TypeError
        yield "one label too few", backend.asarray(host[1:]), ValueError
    elif isinstance(check, checks.ArrayList):
        yield "None", None, TypeError
        yield "a wrong dtype", [backend.asarray(np.asarray(backend.to_numpy(a)).astype(np.int64)) for a in good], TypeError
    elif isinstance(check, activations.Resolved):
        if check.part == "name":
            yield "an unknown activation", "swish", ValueError
        else:
            yield "a string", "0.1", TypeError
    elif not isinstance(check, checks.Flag):  # a flag takes any value
        raise AssertionError(f"{type(check).__name__}: no wrong values known for this check")


def _valid_args(op: Any, backend: Any) -> dict[str, Any]:
    """Good arguments for one call: the row's benchmark inputs at its smallest shape, on ``backend``."""
    bench = op.bench
    data = bench.inputs(np.random.default_rng(0), bench.shapes[0].dims, np.dtype(np.float32), bench.variants[0],
                        backend_for("numpy"))

    def convert(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return backend.asarray(v)
        if isinstance(v, list):
            return [backend.asarray(a) for a in v]
        return v

    return {k: convert(v) for k, v in data.items()}


def _cases() -> list[Any]:
    return [pytest.param(op.name, arg.name, id=f"{op.name}-{arg.name}") for op in OPS.values() for arg in op.args]


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("op_name,arg_name", _cases())
def test_every_declared_check_rejects_wrong_values(name: str, op_name: str, arg_name: str) -> None:
    backend, op = backend_for(name), OPS[op_name]
    arg = op.arg(arg_name)
    good = _valid_args(op, backend)
    call: Callable[..., Any] = getattr(backend, op_name)
    call(**good)  # the good arguments are good
    state = lambda: fingerprint(good)  # noqa: E731 - a failed call changes none of the arguments
    tried = 0
    for what, value, error in _bad_values(arg, good.get(arg_name, arg.default), backend):
        args = dict(good, **{arg_name: value})
        err = expect_error(lambda: call(**args), arg_name, types=(error,), states=(state,))
        assert type(err) is error or isinstance(err, error), f"{op_name}({arg_name}={what}): {err!r}"
        tried += 1
    if not isinstance(arg.check, checks.Flag):
        assert tried, f"{op_name}: no wrong value tried for {arg_name}"
