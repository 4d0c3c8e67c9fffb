"""The Numba backend: hand-written ``@njit`` CPU kernels behind the backend contract.

Every op is a thin delegation to a kernel module in :mod:`.numba_kernels`
(GEMM with fused epilogue, element-wise activations, fused softmax
cross-entropy, fused optimizer updates). The public methods of
:class:`~nnfast.backends.base.Backend` have already validated the arguments
and made them C-contiguous when these run. Kernels are compiled on first use
and cached on disk (``cache=True``), so a second process starts warm.

``NNFAST_NUM_THREADS`` caps the kernel threads (``numba.set_num_threads``).
"""

from __future__ import annotations

import numba
import numpy as np

from . import apply_num_threads
from .base import ACTIVATION_CODES, Backend, bad_label_error, saves_input
from .numba_kernels import activations, linear, optim, softmax_ce


class NumbaBackend(Backend):
    """CPU backend of fused, multithreaded Numba kernels (float32 and float64)."""

    name = "numba"
    xp = np

    def __init__(self) -> None:
        #: Threads the parallel kernels use.
        self.num_threads = apply_num_threads(numba.set_num_threads, numba.config.NUMBA_NUM_THREADS)

    def _linear_forward(self, x, W, b, activation, alpha):
        return linear.linear_forward(x, W, b, ACTIVATION_CODES[activation], alpha, saves_input(activation))

    def _linear_backward(self, dy, x, W, saved, activation, alpha, has_bias, need_dx):
        return linear.linear_backward(dy, x, W, saved, ACTIVATION_CODES[activation], alpha, has_bias, need_dx)

    def _activation_forward(self, x, activation, alpha):
        return activations.forward(x, ACTIVATION_CODES[activation], alpha)

    def _activation_backward(self, dy, saved, activation, alpha):
        return activations.backward(dy, saved, ACTIVATION_CODES[activation], alpha)

    def _softmax(self, x):
        return softmax_ce.softmax(x)

    def _log_softmax(self, x):
        return softmax_ce.softmax(x, log=True)

    def _softmax_cross_entropy(self, logits, labels, label_smoothing, ignore_index, reduction):
        return softmax_ce.softmax_cross_entropy(logits, labels, label_smoothing, ignore_index, reduction,
                                                bad_label_error)

    def _sgd_update(self, params, grads, velocities, lr, momentum, nesterov, weight_decay):
        optim.sgd_update(params, grads, velocities, lr, momentum, nesterov, weight_decay)

    def _adam_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                     weight_decay, decoupled):
        optim.adam_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                          weight_decay, decoupled)
