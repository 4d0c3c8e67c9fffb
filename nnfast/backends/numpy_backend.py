"""The NumPy reference backend: plain, readable NumPy; the oracle for every other backend.

Nothing here is tuned. Each op is the textbook formula, written so that it is
numerically stable (max-subtraction in softmax, the sign-split sigmoid,
softplus's threshold) and exact in float64. Every fast kernel is checked
against these functions, and these functions are checked against finite
differences.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Backend, bad_label_error, saves_input

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
_SOFTPLUS_THRESHOLD = 20.0

# NumPy has no vectorised erf; the C library's, applied element-wise, is exact.
_erf_object = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, element-wise, in the dtype of ``x``."""
    return _erf_object(x.astype(np.float64)).astype(x.dtype)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic sigmoid without overflow: exp is only taken of -|x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


def _gelu_tanh_inner(x: np.ndarray) -> np.ndarray:
    """u = sqrt(2 / pi) * (x + 0.044715 x^3), the argument of tanh in the tanh GELU."""
    with np.errstate(over="ignore"):  # x^3 overflows to +-inf for huge |x|: sigmoid(+-inf) is exact
        return _SQRT_2_OVER_PI * (x + _GELU_TANH_C * x**3)


def activation_forward(x: np.ndarray, activation: str, alpha: float) -> np.ndarray:
    """Reference forward of every activation (PyTorch's definitions)."""
    if activation == "identity":
        return x.copy()
    if activation == "relu":
        return np.maximum(x, 0)
    if activation == "leaky_relu":
        return np.where(x > 0, x, alpha * x).astype(x.dtype)
    if activation == "sigmoid":
        return sigmoid(x)
    if activation == "tanh":
        return np.tanh(x)
    if activation == "gelu":  # x * Phi(x), Phi the standard normal CDF
        return (0.5 * x * (1.0 + erf(x / _SQRT_2))).astype(x.dtype)
    if activation == "gelu_tanh":  # 0.5 x (1 + tanh(u)) = x sigmoid(2u), without cancellation
        return (x * sigmoid(2.0 * _gelu_tanh_inner(x))).astype(x.dtype)
    if activation == "silu":
        return x * sigmoid(x)
    if activation == "softplus":  # log(1 + e^x), linear above the threshold like PyTorch
        return np.where(x > _SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, _SOFTPLUS_THRESHOLD))))
    if activation == "elu":
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0))).astype(x.dtype)
    raise ValueError(f"activation: unknown {activation!r}")  # pragma: no cover - resolved before


def activation_derivative(saved: np.ndarray, activation: str, alpha: float) -> np.ndarray:
    """d act / d x, from the input (GELU, SiLU, softplus) or the output (the rest)."""
    one = saved.dtype.type(1)
    if activation == "identity":
        return np.ones_like(saved)
    if activation == "relu":  # saved = y; y > 0 exactly where x > 0
        return (saved > 0).astype(saved.dtype)
    if activation == "leaky_relu":  # saved = y; slope >= 0 keeps the sign of x
        return np.where(saved > 0, one, saved.dtype.type(alpha))
    if activation == "sigmoid":  # saved = y
        return saved * (one - saved)
    if activation == "tanh":  # saved = y
        return one - saved * saved
    if activation == "gelu":  # saved = x: Phi(x) + x * phi(x)
        x = saved
        cdf = 0.5 * (1.0 + erf(x / _SQRT_2))
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * x * x)
        return (cdf + x * pdf).astype(x.dtype)
    if activation == "gelu_tanh":  # saved = x
        # With s = sigmoid(2u) = (1 + tanh u) / 2 and sech^2 u = 4 s (1 - s):
        # d/dx = s + x * 2 s (1 - s) * du/dx, free of the cancellation in 1 + tanh u.
        # Beyond |x| = 10 the derivative is exactly 1 or 0 in both dtypes; clipping
        # keeps x * x from overflowing into inf * 0 = NaN.
        x = np.clip(saved, -10.0, 10.0)
        s = sigmoid(2.0 * _gelu_tanh_inner(x))
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x * x)
        return (s + 2.0 * x * s * (1.0 - s) * d_inner).astype(x.dtype)
    if activation == "silu":  # saved = x: s(x) * (1 + x * (1 - s(x)))
        s = sigmoid(saved)
        return s * (one + saved * (one - s))
    if activation == "softplus":  # saved = x: sigmoid(x), 1 above the threshold
        return np.where(saved > _SOFTPLUS_THRESHOLD, one, sigmoid(saved))
    if activation == "elu":  # saved = y: for x <= 0, alpha * e^x = y + alpha
        return np.where(saved > 0, one, saved + saved.dtype.type(alpha))
    raise ValueError(f"activation: unknown {activation!r}")  # pragma: no cover


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log(softmax(x)) over the last axis, stable for any finite logits."""
    with np.errstate(over="ignore"):  # x - max may round to -inf: exp gives the right 0
        shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    """softmax over the last axis, with the row maximum subtracted first."""
    with np.errstate(over="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class NumpyBackend(Backend):
    """Reference backend: every op in plain NumPy."""

    name = "numpy"
    xp = np

    def _linear_forward(self, x, W, b, activation, alpha):
        z = x @ W
        if b is not None:
            z += b
        if activation == "identity":
            return z, z
        y = activation_forward(z, activation, alpha)
        return y, (z if saves_input(activation) else y)

    def _linear_backward(self, dy, x, W, saved, activation, alpha, has_bias, need_dx):
        dz = dy if activation == "identity" else dy * activation_derivative(saved, activation, alpha)
        dW = x.T @ dz
        db = dz.sum(axis=0) if has_bias else None
        dx = dz @ W.T if need_dx else None
        return dx, dW, db

    def _activation_forward(self, x, activation, alpha):
        return activation_forward(x, activation, alpha)

    def _activation_backward(self, dy, saved, activation, alpha):
        return dy * activation_derivative(saved, activation, alpha)

    def _softmax(self, x):
        return softmax(x)

    def _log_softmax(self, x):
        return log_softmax(x)

    def _softmax_cross_entropy(self, logits, labels, label_smoothing, ignore_index, reduction):
        batch, classes = logits.shape
        ignored = labels == ignore_index
        bad = ~ignored & ((labels < 0) | (labels >= classes))
        if bad.any():
            row = int(np.argmax(bad))
            raise bad_label_error(int(labels[row]), row, classes, ignore_index)
        kept = ~ignored
        target = np.where(kept, labels, 0)

        logp = log_softmax(logits)
        nll = -logp[np.arange(batch), target]
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
        loss_rows = np.where(kept, loss_rows, 0).astype(logits.dtype)

        # d loss_i / d logits_i = softmax_i - ((1 - s) * onehot(y_i) + s / classes)
        grad = np.exp(logp)
        grad -= label_smoothing / classes
        grad[np.arange(batch), target] -= 1.0 - label_smoothing
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
            denom = np.sqrt(v) / math.sqrt(bias2) + eps
            p -= (lr / bias1) * m / denom
