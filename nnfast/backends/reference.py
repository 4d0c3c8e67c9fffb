"""The reference implementation of every op: plain array code against ``self.xp``.

These are the ``_op`` kernel entries of :class:`~nnfast.backends.base.Backend`,
so every backend runs from its first line: a new backend sets ``xp`` and
overrides only the ops it makes faster. With ``xp = numpy`` they are the
NumPy reference backend, the oracle every fast kernel is checked against.

Nothing here is tuned. Each op is the textbook formula, written so that it is
numerically stable (max-subtraction in softmax, the sign-split sigmoid,
softplus's threshold) and exact in float64. Arguments arrive checked and
C-contiguous (see :mod:`nnfast.ops`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..activations import saves_input
from .reference_activations import DERIVATIVE, FORWARD


def bad_label_error(label: int, row: int, classes: int, ignore_index: int) -> ValueError:
    """The error every backend raises for a label outside ``[0, classes)``."""
    return ValueError(
        f"labels: expected class indices in [0, {classes}) or ignore_index={ignore_index}, "
        f"got {label} at row {row}"
    )


def log_softmax(xp: Any, x: Any) -> Any:
    """log(softmax(x)) over the last axis, stable for any finite logits."""
    with np.errstate(over="ignore"):  # x - max may round to -inf: exp gives the right 0
        shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(xp: Any, x: Any) -> Any:
    """softmax over the last axis, with the row maximum subtracted first."""
    with np.errstate(over="ignore"):
        e = xp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class ReferenceOps:
    """The ops of the backend contract, as readable array code against ``self.xp``."""

    xp: Any = np

    def _linear_forward(self, x, W, b, activation, alpha):
        z = x @ W
        if b is not None:
            z += b
        if activation == "identity":
            return z, z
        y = self._activation_forward(z, activation, alpha)
        return y, (z if saves_input(activation) else y)

    def _linear_backward(self, dy, x, W, saved, activation, alpha, has_bias, need_dx):
        dz = dy if activation == "identity" else self._activation_backward(dy, saved, activation, alpha)
        dW = x.T @ dz
        db = dz.sum(axis=0) if has_bias else None
        dx = dz @ W.T if need_dx else None
        return dx, dW, db

    def _activation_forward(self, x, activation, alpha):
        if x.ndim == 0:  # NumPy's ufuncs turn a 0-d array into a scalar: work on one element
            return self._activation_forward(x.reshape(1), activation, alpha).reshape(())
        return FORWARD[activation](self.xp, x, alpha)

    def _activation_backward(self, dy, saved, activation, alpha):
        if dy.ndim == 0:
            return self._activation_backward(dy.reshape(1), saved.reshape(1), activation, alpha).reshape(())
        return dy * DERIVATIVE[activation](self.xp, saved, alpha)

    def _softmax(self, x):
        return softmax(self.xp, x)

    def _log_softmax(self, x):
        return log_softmax(self.xp, x)

    def _softmax_cross_entropy(self, logits, labels, label_smoothing, ignore_index, reduction):
        xp = self.xp
        batch, classes = logits.shape
        ignored = labels == ignore_index
        bad = ~ignored & ((labels < 0) | (labels >= classes))
        if bad.any():
            row = int(xp.argmax(bad))
            raise bad_label_error(int(labels[row]), row, classes, ignore_index)
        kept = ~ignored
        target = xp.where(kept, labels, 0)

        logp = log_softmax(xp, logits)
        rows = xp.arange(batch)
        nll = -logp[rows, target]
        # The mean of the log-probabilities adds scaled terms: a plain sum of
        # logits near the float maximum would overflow.
        smooth = -(logp / classes).sum(axis=1)
        # Without smoothing (or smoothing that rounds to 0 in this dtype) the
        # smooth term is left out, not multiplied by 0: a logit spread beyond
        # the float range makes it inf, and 0 * inf is NaN.
        if logits.dtype.type(label_smoothing) == 0:
            loss_rows = nll
        elif logits.dtype.type(1.0 - label_smoothing) == 0:  # likewise nll under full smoothing
            loss_rows = smooth
        else:
            loss_rows = (1.0 - label_smoothing) * nll + label_smoothing * smooth
        loss_rows = xp.where(kept, loss_rows, 0).astype(logits.dtype)

        # d loss_i / d logits_i = softmax_i - ((1 - s) * onehot(y_i) + s / classes)
        grad = xp.exp(logp)
        grad -= label_smoothing / classes
        grad[rows, target] -= 1.0 - label_smoothing
        grad[ignored] = 0

        if reduction == "none":
            return loss_rows, grad
        if reduction == "sum":
            return loss_rows.sum(dtype=logits.dtype), grad
        count = int(kept.sum())
        scale = 1.0 / count if count else 0.0
        grad *= scale
        return (loss_rows.sum() * scale).astype(logits.dtype), grad

    def _sgd_update(self, params, grads, velocities, lr, momentum, nesterov, weight_decay):
        for p, g, v in zip(params, grads, velocities):
            d = g + weight_decay * p if weight_decay else g
            if momentum:
                v *= momentum
                v += d
                d = d + momentum * v if nesterov else v
            p -= lr * d

    def _adam_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                     weight_decay, decoupled):
        xp = self.xp
        bias1 = 1.0 - beta1**step
        bias2 = 1.0 - beta2**step
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            if weight_decay and decoupled:
                p *= 1.0 - lr * weight_decay
            elif weight_decay:
                g = g + weight_decay * p
            m *= beta1
            m += (1.0 - beta1) * g
            v *= beta2
            v += (1.0 - beta2) * g * g
            denom = xp.sqrt(v) / math.sqrt(bias2) + eps
            p -= (lr / bias1) * m / denom
