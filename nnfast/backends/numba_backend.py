"""The Numba backend: hand-written ``@njit`` CPU kernels behind the backend contract.

Every op is a thin delegation to a kernel module in :mod:`.numba_kernels`
(GEMM with fused epilogue, element-wise activations, fused softmax
cross-entropy, fused optimizer updates). The public methods of
:class:`~nnfast.backends.base.Backend` have already validated the arguments
and made them C-contiguous when these run. Kernels are compiled on first use
and cached on disk (``cache=True``), so a second process starts warm.

``NNFAST_NUM_THREADS`` caps the kernel threads (``numba.set_num_threads``).
Numba keeps that setting per calling thread, so each op re-applies the cap
when it runs on a thread that has not seen it yet (one cheap query per op).
"""

from __future__ import annotations

import os

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
