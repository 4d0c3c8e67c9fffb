"""The backend contract: every op a backend must provide, with its checks.

A backend is a subclass of :class:`Backend`. The public methods here
(``linear_forward``, ``softmax_cross_entropy``, ...) are the contract: they
validate their arguments once, for every backend alike (DESIGN §5), make the
arrays C-contiguous, and then call the private ``_op`` method that a backend
implements (``_linear_forward``, ``_softmax_cross_entropy``, ...). Kernels
therefore only ever see well-formed, contiguous arrays of one float dtype.

Activations
-----------
Activations are named by strings (:data:`ACTIVATIONS`). Two of them take a
parameter, ``alpha``: the negative slope of ``"leaky_relu"`` (default 0.01)
and the ``alpha`` of ``"elu"`` (default 1.0); both must be ``>= 0``. The
backward pass of an activation needs either its input ``x`` or its output
``y``; :func:`saves_input` says which. Ops that run an activation forward
return that tensor as ``saved`` and take it back in the backward op, so a
model keeps exactly one tensor per activation.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Sequence

import numpy as np

from .. import checks
from ..activations import resolve as resolve_activation
from ..activations import saves_input
from ..errors import BackendError

#: ``reduction`` values of the cross-entropy loss.
REDUCTIONS = ("mean", "sum", "none")

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - non-POSIX
        return None


def check_allocation(nbytes: int, what: str, limit: int | None = None) -> None:
    """Raise ``ValueError`` naming ``what`` when ``nbytes`` exceed ``limit`` (default: the RAM).

    Called before an allocation whose size comes from user input, so that an
    impossible request fails at once with a message, instead of with a bare
    ``MemoryError`` or by driving the machine out of memory.
    """
    limit = physical_memory() if limit is None else limit
    if limit is not None and nbytes > limit:
        raise ValueError(f"{what}: needs {_gib(nbytes)} of memory, more than the {_gib(limit)} available")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _type_name(a: Any) -> str:
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


class Backend:
    """Base class of every backend: array handling, argument checks, op contract.

    Subclasses set :attr:`name` and :attr:`xp` (the array module, ``numpy`` or
    ``cupy``) and implement the private ``_op`` methods. Public op methods must
    not be overridden: they hold the checks that make every backend reject
    the same bad input with the same message.
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
        if _is_cupy_array(x) and self.xp is np:
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
            raise TypeError(f"{arg}: cannot convert a {_type_name(x)} to an array: {err}") from None
        except MemoryError as err:
            raise MemoryError(f"{arg}: a {_type_name(x)} too large to convert to an array ({err})") from None
        if a.dtype.kind in "OUSV":
            raise TypeError(f"{arg}: cannot convert a {_type_name(x)} to a numeric array (got dtype {a.dtype})")
        return a

    def memory_limit(self) -> int | None:
        """Bytes a single array of this backend may take at most (None: unknown).

        Sizes computed from user input are checked against it before anything
        is allocated (:func:`check_allocation`). The CPU backends use the RAM.
        """
        return physical_memory()

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

    # ------------------------------------------------------------------ checks
    def _check_array(self, a: Any, arg: str, ndim: int | None = None, dtype: Any = None) -> Any:
        """Check ``a`` is a float32/float64 array of this backend; make it contiguous."""
        if not self.is_native(a):
            if _is_cupy_array(a) or isinstance(a, np.ndarray):
                raise BackendError(
                    f"{arg}: got a {_type_name(a)} but the {self.name!r} backend works on "
                    f"{self.xp.__name__}.ndarray; convert it with nnfast.asarray() first"
                )
            raise TypeError(f"{arg}: expected an array, got {_type_name(a)}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{arg}: expected dtype float32 or float64, got {a.dtype}")
        if dtype is not None and a.dtype != dtype:
            raise TypeError(f"{arg}: expected dtype {np.dtype(dtype)} (as the other operands), got {a.dtype}")
        if ndim is not None and a.ndim != ndim:
            raise ValueError(f"{arg}: expected a {ndim}-D array, got shape {tuple(a.shape)}")
        if a.size == 0:
            raise ValueError(f"{arg}: expected a non-empty array, got shape {tuple(a.shape)}")
        return _contiguous(self.xp, a)

    def _check_same_shape(self, a: Any, arg: str, shape: tuple[int, ...]) -> None:
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{arg}: expected shape {tuple(shape)}, got {tuple(a.shape)}")

    def _check_linear(self, x: Any, W: Any, b: Any) -> tuple[Any, Any, Any]:
        x = self._check_array(x, "x", ndim=2)
        W = self._check_array(W, "W", ndim=2, dtype=x.dtype)
        if x.shape[1] != W.shape[0]:
            raise ValueError(
                f"x: expected shape (batch, {W.shape[0]}) to match W of shape {tuple(W.shape)}, "
                f"got {tuple(x.shape)}"
            )
        if b is not None:
            b = self._check_array(b, "b", ndim=1, dtype=x.dtype)
            self._check_same_shape(b, "b", (W.shape[1],))
        return x, W, b

    def _check_labels(self, labels: Any, batch: int) -> Any:
        if not self.is_native(labels):
            raise TypeError(
                f"labels: expected an integer {self.xp.__name__}.ndarray, got {_type_name(labels)}"
            )
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels: expected integer class indices, got dtype {labels.dtype}")
        if labels.ndim != 1 or labels.shape[0] != batch:
            raise ValueError(f"labels: expected shape ({batch},), got {tuple(labels.shape)}")
        if labels.dtype.kind == "u" and labels.dtype.itemsize == 8:
            # uint64 -> int64 would wrap labels >= 2**63 to negative values.
            big = labels > np.iinfo(np.int64).max
            if bool(big.any()):
                row = int(self.xp.argmax(big))
                raise ValueError(f"labels: expected class indices, got {int(labels[row])} at row {row}")
        return self.xp.ascontiguousarray(labels, dtype=self.xp.int64)

    @staticmethod
    def _check_scalar(value: Any, arg: str, low: float | None = None, high: float | None = None,
                      low_open: bool = False, high_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
            raise TypeError(f"{arg}: expected a finite real number, got {value!r}")
        value = float(value)
        if low is not None and (value < low or (low_open and value == low)):
            raise ValueError(f"{arg}: expected a value {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and (value > high or (high_open and value == high)):
            raise ValueError(f"{arg}: expected a value {'<' if high_open else '<='} {high}, got {value!r}")
        return value

    def _check_param_lists(self, arg_lists: dict[str, Sequence[Any]]) -> list[Any]:
        """Check parallel lists of parameters / gradients / optimizer states.

        Returns the lists (C-contiguous) followed by a callable to run after
        the kernel: it copies updates of strided arrays back into them.
        """
        names = list(arg_lists)
        lists = [list(arg_lists[n]) for n in names]
        count = len(lists[0])
        for name, items in zip(names, lists):
            if len(items) != count:
                raise ValueError(f"{name}: expected {count} arrays (one per parameter), got {len(items)}")
        for i in range(count):
            ref = lists[0][i]
            for name, items in zip(names, lists):
                a = items[i]
                if not self.is_native(a):
                    raise TypeError(
                        f"{name}[{i}]: expected a {self.xp.__name__}.ndarray, got {_type_name(a)}"
                    )
                if a.dtype not in FLOAT_DTYPES or a.dtype != ref.dtype:
                    raise TypeError(f"{name}[{i}]: expected dtype {ref.dtype}, got {a.dtype}")
                if a.shape != ref.shape:
                    raise ValueError(f"{name}[{i}]: expected shape {tuple(ref.shape)}, got {tuple(a.shape)}")
                if a.size == 0:
                    raise ValueError(f"{name}[{i}]: expected a non-empty array, got shape {tuple(a.shape)}")
                if name != names[1] and not a.flags.writeable:
                    raise ValueError(f"{name}[{i}]: expected a writeable array (it is updated in place)")
        # Kernels see C-contiguous arrays only. An array updated in place that
        # is not contiguous (a strided view) is updated through a contiguous
        # copy, written back by the returned callable once the kernel is done.
        write_back: list[tuple[Any, Any]] = []
        for k, items in enumerate(lists):
            for i, a in enumerate(items):
                if not a.flags.c_contiguous:
                    items[i] = self.xp.ascontiguousarray(a)
                    if k != 1:
                        write_back.append((a, items[i]))

        def finish() -> None:
            for view, copy in write_back:
                view[...] = copy

        return lists + [finish]

    # ------------------------------------------------------------------ ops
    def linear_forward(self, x: Any, W: Any, b: Any = None, activation: str | None = "identity",
                       alpha: float | None = None) -> tuple[Any, Any]:
        """``y = act(x @ W + b)``, fused.

        Parameters
        ----------
        x : (batch, in_features) array
        W : (in_features, out_features) array, same dtype as ``x``
        b : (out_features,) array or None
        activation, alpha : see :data:`ACTIVATIONS`

        Returns
        -------
        y : (batch, out_features) array
        saved : the tensor the backward op needs: the pre-activation
            ``x @ W + b`` when :func:`saves_input` is true, else ``y`` itself.
        """
        activation, alpha = resolve_activation(activation, alpha)
        x, W, b = self._check_linear(x, W, b)
        check_allocation(x.shape[0] * W.shape[1] * x.dtype.itemsize,
                         f"x: a batch of {x.shape[0]} rows times W's {W.shape[1]} outputs",
                         self.memory_limit())
        return self._linear_forward(x, W, b, activation, alpha)

    def linear_backward(self, dy: Any, x: Any, W: Any, saved: Any, activation: str | None = "identity",
                        alpha: float | None = None, *, has_bias: bool = True,
                        need_dx: bool = True) -> tuple[Any, Any, Any]:
        """Backward of :meth:`linear_forward`.

        Computes ``dz = dy * act'(.)`` (from ``saved``), ``dW = x.T @ dz``,
        ``db = dz.sum(0)`` (None unless ``has_bias``) and ``dx = dz @ W.T``
        (None unless ``need_dx``). Returns ``(dx, dW, db)``.
        """
        activation, alpha = resolve_activation(activation, alpha)
        x, W, _ = self._check_linear(x, W, None)
        out_shape = (x.shape[0], W.shape[1])
        dy = self._check_array(dy, "dy", ndim=2, dtype=x.dtype)
        self._check_same_shape(dy, "dy", out_shape)
        if activation != "identity":
            saved = self._check_array(saved, "saved", ndim=2, dtype=x.dtype)
            self._check_same_shape(saved, "saved", out_shape)
        return self._linear_backward(dy, x, W, saved, activation, alpha, bool(has_bias), bool(need_dx))

    def activation_forward(self, x: Any, activation: str | None, alpha: float | None = None) -> Any:
        """Apply an activation element-wise; returns a new array."""
        activation, alpha = resolve_activation(activation, alpha)
        x = self._check_array(x, "x")
        if x.ndim == 0:  # kernels see arrays of rank >= 1; a 0-d input gives a 0-d output
            return self._activation_forward(x.reshape(1), activation, alpha).reshape(())
        return self._activation_forward(x, activation, alpha)

    def activation_backward(self, dy: Any, saved: Any, activation: str | None,
                            alpha: float | None = None) -> Any:
        """``dx = dy * act'(.)``; ``saved`` is the input or output, see :func:`saves_input`."""
        activation, alpha = resolve_activation(activation, alpha)
        dy = self._check_array(dy, "dy")
        saved = self._check_array(saved, "saved", dtype=dy.dtype)
        self._check_same_shape(saved, "saved", dy.shape)
        if dy.ndim == 0:
            return self._activation_backward(dy.reshape(1), saved.reshape(1), activation, alpha).reshape(())
        return self._activation_backward(dy, saved, activation, alpha)

    def softmax(self, x: Any) -> Any:
        """Softmax over the last axis of a 2-D array."""
        return self._softmax(self._check_array(x, "x", ndim=2))

    def log_softmax(self, x: Any) -> Any:
        """Log-softmax over the last axis of a 2-D array."""
        return self._log_softmax(self._check_array(x, "x", ndim=2))

    def softmax_cross_entropy(self, logits: Any, labels: Any, *, label_smoothing: float = 0.0,
                              ignore_index: int = -100, reduction: str = "mean") -> tuple[Any, Any]:
        """Fused softmax cross-entropy: the loss and d(loss)/d(logits) in one pass.

        Semantics of ``torch.nn.functional.cross_entropy`` with class-index
        targets: the loss of row ``i`` is
        ``(1 - s) * -log p[i, y_i] + s * mean_j(-log p[i, j])`` for smoothing
        ``s``; rows whose label equals ``ignore_index`` contribute 0 loss and 0
        gradient. ``"mean"`` divides by the number of rows not ignored (and is
        0, not NaN, when every row is ignored); ``"sum"`` adds;
        ``"none"`` returns one loss per row. The gradient is scaled to match.

        Returns ``(loss, dlogits)``: ``loss`` is a 0-d array (shape (batch,)
        for ``"none"``), ``dlogits`` has the shape of ``logits``. A label
        outside ``[0, classes)`` that is not ``ignore_index`` raises
        ``ValueError`` naming it (on the GPU, no later than when the loss
        is read).
        """
        logits = self._check_array(logits, "logits", ndim=2)
        labels = self._check_labels(labels, logits.shape[0])
        label_smoothing = self._check_scalar(label_smoothing, "label_smoothing", 0.0, 1.0)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        return self._softmax_cross_entropy(logits, labels, label_smoothing, int(ignore_index), reduction)

    def sgd_update(self, params: Sequence[Any], grads: Sequence[Any], velocities: Sequence[Any], *,
                   lr: float, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0) -> None:
        """One SGD step, in place, on every parameter (``torch.optim.SGD``, dampening 0).

        ``g = grad + weight_decay * p``; ``v = momentum * v + g``;
        ``p -= lr * (g + momentum * v if nesterov else v)`` (``v`` unused
        when ``momentum == 0``; ``velocities`` may then be an empty list).
        """
        lr = self._check_scalar(lr, "lr", 0.0)
        momentum = self._check_scalar(momentum, "momentum", 0.0)
        weight_decay = self._check_scalar(weight_decay, "weight_decay", 0.0)
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        if momentum == 0.0 and len(velocities) == 0:
            params, grads, finish = self._check_param_lists({"params": params, "grads": grads})
            velocities = [None] * len(params)
        else:
            params, grads, velocities, finish = self._check_param_lists(
                {"params": params, "grads": grads, "velocities": velocities})
        self._sgd_update(params, grads, velocities, lr, momentum, bool(nesterov), weight_decay)
        finish()

    def adam_update(self, params: Sequence[Any], grads: Sequence[Any], exp_avgs: Sequence[Any],
                    exp_avg_sqs: Sequence[Any], *, step: int, lr: float, beta1: float = 0.9,
                    beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                    decoupled: bool = True) -> None:
        """One Adam / AdamW step, in place (``torch.optim.Adam`` / ``AdamW``).

        ``step`` counts from 1 and drives the bias corrections. With
        ``decoupled`` the weight decay is AdamW's ``p *= 1 - lr * wd``; without,
        it is Adam's ``g += wd * p``.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
            raise ValueError(f"step: expected an int >= 1, got {step!r}")
        lr = self._check_scalar(lr, "lr", 0.0)
        beta1 = self._check_scalar(beta1, "beta1", 0.0, 1.0, high_open=True)
        beta2 = self._check_scalar(beta2, "beta2", 0.0, 1.0, high_open=True)
        eps = self._check_scalar(eps, "eps", 0.0)
        weight_decay = self._check_scalar(weight_decay, "weight_decay", 0.0)
        params, grads, exp_avgs, exp_avg_sqs, finish = self._check_param_lists(
            {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs})
        self._adam_update(params, grads, exp_avgs, exp_avg_sqs, int(step), lr, beta1, beta2, eps,
                          weight_decay, bool(decoupled))
        finish()

    # --------------------------------------------- what a backend implements
    def _linear_forward(self, x, W, b, activation, alpha):  # pragma: no cover - contract
        raise NotImplementedError

    def _linear_backward(self, dy, x, W, saved, activation, alpha, has_bias, need_dx):  # pragma: no cover
        raise NotImplementedError

    def _activation_forward(self, x, activation, alpha):  # pragma: no cover
        raise NotImplementedError

    def _activation_backward(self, dy, saved, activation, alpha):  # pragma: no cover
        raise NotImplementedError

    def _softmax(self, x):  # pragma: no cover
        raise NotImplementedError

    def _log_softmax(self, x):  # pragma: no cover
        raise NotImplementedError

    def _softmax_cross_entropy(self, logits, labels, label_smoothing, ignore_index, reduction):  # pragma: no cover
        raise NotImplementedError

    def _sgd_update(self, params, grads, velocities, lr, momentum, nesterov, weight_decay):  # pragma: no cover
        raise NotImplementedError

    def _adam_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                     weight_decay, decoupled):  # pragma: no cover
        raise NotImplementedError


def _contiguous(xp: Any, a: Any) -> Any:
    """``a`` itself when C-contiguous, else a C-contiguous copy (0-d stays 0-d)."""
    return a if a.flags.c_contiguous else xp.ascontiguousarray(a)


def _is_cupy_array(a: Any) -> bool:
    """True for a CuPy array, without importing CuPy."""
    return type(a).__module__.startswith("cupy")


def bad_label_error(label: int, row: int, classes: int, ignore_index: int) -> ValueError:
    """The error every backend raises for a label outside ``[0, classes)``."""
    return ValueError(
        f"labels: expected class indices in [0, {classes}) or ignore_index={ignore_index}, "
        f"got {label} at row {row}"
    )
