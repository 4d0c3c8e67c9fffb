"""The Numba backend: hand-written ``@njit`` CPU kernels behind the backend contract.

Every op is a thin delegation to a kernel module in :mod:`.numba_kernels`
(GEMM with fused epilogue, element-wise activations, fused softmax
cross-entropy, fused optimizer updates). The public methods of
:class:`~nnfast.backends.base.Backend` have already validated the arguments
and made them C-contiguous when these run. Kernels are compiled on first use
and cached on disk (``cache=True``), so a second process starts warm.

The first run on a machine compiles the kernels it uses (seconds, split
between two processes where a second core is free: :mod:`.numba_compile`);
later runs load them. :func:`warm_up` does that before training starts (and
says so when it takes long); :func:`kernel_cache_status` tells whether it
will be needed.

``NNFAST_NUM_THREADS`` caps the kernel threads (``numba.set_num_threads``).
Numba keeps that setting per calling thread, so each op re-applies the cap
when it runs on a thread that has not seen it yet (one cheap query per op).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numba
import numpy as np

from .threads import apply_num_threads
from ..activations import saves_input
from .base import Backend, bad_label_error
from .numba_kernels import activations, linear, optim, softmax_ce


class NumbaBackend(Backend):
    """CPU backend of fused, multithreaded Numba kernels (float32 and float64)."""

    name = "numba"
    xp = np

    def __init__(self) -> None:
        #: Threads the parallel kernels use.
        self.num_threads = apply_num_threads(numba.set_num_threads, numba.config.NUMBA_NUM_THREADS)
        # Only an explicit NNFAST_NUM_THREADS is enforced on other threads.
        self._cap = self.num_threads if os.environ.get("NNFAST_NUM_THREADS", "").strip() else None

    def _threads(self) -> None:
        if self._cap is not None and numba.get_num_threads() != self._cap:
            numba.set_num_threads(self._cap)

    def _linear_forward(self, x, W, b, activation, alpha):
        self._threads()
        return linear.linear_forward(x, W, b, activation, alpha, saves_input(activation))

    def _linear_backward(self, dy, x, W, saved, activation, alpha, has_bias, need_dx):
        self._threads()
        return linear.linear_backward(dy, x, W, saved, activation, alpha, has_bias, need_dx)

    def _activation_forward(self, x, activation, alpha):
        self._threads()
        return activations.forward(x, activation, alpha)

    def _activation_backward(self, dy, saved, activation, alpha):
        self._threads()
        return activations.backward(dy, saved, activation, alpha)

    def _softmax(self, x):
        self._threads()
        return softmax_ce.softmax(x)

    def _log_softmax(self, x):
        self._threads()
        return softmax_ce.softmax(x, log=True)

    def _softmax_cross_entropy(self, logits, labels, label_smoothing, ignore_index, reduction):
        self._threads()
        return softmax_ce.softmax_cross_entropy(logits, labels, label_smoothing, ignore_index, reduction,
                                                bad_label_error)

    def _sgd_update(self, params, grads, velocities, lr, momentum, nesterov, weight_decay):
        self._threads()
        optim.sgd_update(params, grads, velocities, lr, momentum, nesterov, weight_decay)

    def _adam_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                     weight_decay, decoupled):
        self._threads()
        optim.adam_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                          weight_decay, decoupled)


#: What :func:`warm_up` announces when the kernels are compiled rather than loaded.
COMPILING = "compiling CPU kernels (first run only) ..."


def warm_up(step: Any, batch_sizes: tuple[int, ...], announce: Callable[[str], None] | None = None,
            after: float = 1.0) -> float:
    """Compile (or load from the disk cache) every kernel a training run on this backend uses.

    ``step`` is the run's ``nf.TrainStep`` and ``batch_sizes`` the batch sizes
    it will see (the batch size and that of the last, partial batch). Its
    plans are made and their kernels compiled, and so are the forward GEMM and
    the model's activations (evaluation uses ``model.forward``). Nothing is
    trained and nothing the model keeps for a backward pass changes.

    ``announce(COMPILING)`` is called once: at once when
    :func:`kernel_cache_status` finds the cache cold, else when the work is
    still going on after ``after`` seconds (from a timer thread: a kernel for
    another dtype or activation may still have to be compiled), so that a
    first run says why it is slow. On a cold cache, a second process compiles
    the kernels that call the others through their addresses (the step
    kernels, the GEMM driver) while this one compiles those
    (:mod:`.numba_compile`). Returns the seconds spent.
    """
    from ..train_step import _first_linear
    from ..train_step.numba_fused import kernels
    from . import numba_compile

    began = time.perf_counter()
    timer = None
    cold = not kernel_cache_status()[0]
    if announce is not None:
        if cold:
            announce(COMPILING)
        else:
            timer = threading.Timer(after, announce, (COMPILING,))
            timer.daemon = True
            timer.start()
    try:
        step.backend._threads()
        dtype = _first_linear(step.model).dtype
        callables, steps = kernels(step.model, step.optimizer, dtype, batch_sizes)
        # on a cold cache the step kernels and evaluation's GEMM driver compile in a second process meanwhile
        with (numba_compile.beside(dtype, steps) if cold and callables else contextlib.nullcontext()):
            for make in callables:
                make()
        step.prepare(*batch_sizes)
        _warm_forward(step.model)
    finally:
        if timer is not None:
            timer.cancel()
    return time.perf_counter() - began


def _warm_forward(model: Any) -> None:
    """Run the model's forward pass on one row of zeros: compiles what evaluation runs."""
    from ..layers import _caches, _restore_caches
    from ..train_step import _first_linear

    first = _first_linear(model)
    caches = _caches(model)
    try:
        model.forward(np.zeros((1, first.in_features), first.dtype))
    finally:  # the forward of a dummy row must not become what a later backward reads
        _restore_caches(caches)


def kernel_cache_status() -> tuple[bool, str]:
    """``(warm, where)``: whether the training kernels are in the disk cache, and the cache folder.

    Warm means the disk cache has entries for the kernels every fused
    training step uses -- the GEMM task, the step itself and the forward GEMM
    of evaluation -- for this Python version; a run then loads them in about
    a second. It does not look at the signatures inside: a first run in the
    other dtype, or with an activation not used before, still compiles those
    (:func:`warm_up` says so when it takes long). The folder is
    ``NUMBA_CACHE_DIR`` when set, else Numba's choice (``__pycache__`` next
    to the kernels when it is writable).
    """
    from .numba_kernels import gemm, train_step

    folder = Path(gemm._gemm_op._cache._cache_path)
    name = gemm._gemm_op._cache._cache_file._index_name
    suffix = name[name.index(".py"):]  # the Python version and the index extension
    steps = [d._cache._cache_file._index_name for d in (train_step.step_serial, train_step.step_parallel)]
    warm = ((folder / name).exists() and any((folder / step).exists() for step in steps)
            and any(folder.glob(f"gemm._task_cfunc.locals.task-*{suffix}")))
    return warm, str(folder)
