"""The activation table: every activation nnfast knows, one row each.

Everything that needs the list of activations reads it from here: the
activation layers (one class per row's ``layer``: ``nf.ReLU``, ``nf.GELU``,
...), ``Linear(activation=...)`` and ``MLP``, ``nnfast train --activation``,
the weight initialisation, the kernels' integer codes (a row's position) and
the CUDA instantiation lists, the tests and the benchmarks. Besides its row,
an activation exists in exactly three places, its formulas (forward and
derivative) in each backend:

* the NumPy reference, ``nnfast/backends/reference_activations.py``;
* the Numba kernels, ``nnfast/backends/numba_kernels/activation_math.py``;
* the CUDA functors, ``kernels/common.cuh`` (``ActCode`` and ``Act<T, CODE>``).

Two activations take a parameter, passed to the ops as ``alpha``: the
negative slope of ``"leaky_relu"`` (default 0.01) and the ``alpha`` of
``"elu"`` (default 1.0); both must be ``>= 0``, so that their derivatives
follow from their outputs. The backward pass of an activation needs either
its input or its output (``derivative_from``); ops that run an activation
forward return that tensor as ``saved`` and take it back in the backward op,
so a model keeps exactly one tensor per activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from . import checks


@dataclass(frozen=True)
class Parameter:
    """The one parameter of an activation (the ops' ``alpha``)."""

    name: str  # its keyword in the layer: LeakyReLU(negative_slope=...), ELU(alpha=...)
    default: float
    minimum: float  # inclusive


@dataclass(frozen=True)
class Activation:
    """One row of the table."""

    name: str
    #: The layer class (rows that share one are told apart by ``layer_option``).
    layer: str
    #: The definition, one line of reStructuredText: the layer's docstring.
    formula: str
    #: ``"input"`` or ``"output"``: what the derivative is computed from.
    derivative_from: str
    #: ``"kaiming"`` (He: the ReLU family) or ``"glorot"`` weight initialisation of a Linear layer.
    init: str
    #: PyTorch's forward, ``(F, x, alpha) -> y`` with ``F = torch.nn.functional``.
    torch_forward: Callable[[Any, Any, float], Any]
    #: PyTorch's backward primitive, ``(aten, dy, saved, alpha) -> dx`` with ``aten = torch.ops.aten``
    #: and ``saved`` the input or the output as ``derivative_from`` says.
    torch_backward: Callable[[Any, Any, Any, float], Any]
    parameter: Parameter | None = None
    #: ``(keyword, value)`` choosing this row in a layer shared by several rows: GELU(approximate=...).
    layer_option: tuple[str, str] | None = None
    #: Kaiming gain as a function of the parameter (default sqrt(2), the ReLU gain).
    gain: Callable[[float], float] | None = None
    #: Inputs where the derivative jumps (tests keep finite differences away from them).
    kinks: tuple[float, ...] = ()
    #: Measured by ``nnfast bench``.
    benchmark: bool = False

    @property
    def code(self) -> int:
        """The integer code of the kernels: the row's position in the table."""
        return CODES[self.name]

    @property
    def saves_input(self) -> bool:
        return self.derivative_from == "input"

    def init_bound(self, fan_in: int, fan_out: int, alpha: float) -> float:
        """Bound of the uniform weight initialisation of a Linear layer followed by this activation.

        Kaiming: ``gain * sqrt(3 / fan_in)``; Glorot: ``sqrt(6 / (fan_in + fan_out))``.
        """
        if self.init == "kaiming":
            gain = self.gain(alpha) if self.gain is not None else math.sqrt(2.0)
            return gain * math.sqrt(3.0 / fan_in)
        return math.sqrt(6.0 / (fan_in + fan_out))


def _leaky_relu_gain(slope: float) -> float:
    return math.sqrt(2.0 / (1.0 + slope**2))


#: Every activation, in the order of the kernels' integer codes.
TABLE: tuple[Activation, ...] = (
    Activation(
        "identity", "Identity", "``y = x``.", "output", "glorot",
        torch_forward=lambda F, x, a: x,
        torch_backward=lambda aten, dy, y, a: dy),
    Activation(
        "relu", "ReLU", "``y = max(x, 0)``.", "output", "kaiming",
        torch_forward=lambda F, x, a: F.relu(x),
        torch_backward=lambda aten, dy, y, a: aten.threshold_backward(dy, y, 0.0),
        kinks=(0.0,), benchmark=True),
    Activation(
        "leaky_relu", "LeakyReLU", "``y = x if x > 0 else negative_slope * x`` (``negative_slope >= 0``).",
        "output", "kaiming",
        torch_forward=lambda F, x, a: F.leaky_relu(x, a),
        torch_backward=lambda aten, dy, y, a: aten.leaky_relu_backward(dy, y, a, True),
        parameter=Parameter("negative_slope", 0.01, 0.0), gain=_leaky_relu_gain, kinks=(0.0,)),
    Activation(
        "sigmoid", "Sigmoid", "``y = 1 / (1 + exp(-x))``.", "output", "glorot",
        torch_forward=lambda F, x, a: x.sigmoid(),
        torch_backward=lambda aten, dy, y, a: aten.sigmoid_backward(dy, y)),
    Activation(
        "tanh", "Tanh", "``y = tanh(x)``.", "output", "glorot",
        torch_forward=lambda F, x, a: x.tanh(),
        torch_backward=lambda aten, dy, y, a: aten.tanh_backward(dy, y),
        benchmark=True),
    Activation(
        "gelu", "GELU", "``y = x * Phi(x)``, Phi the standard normal CDF", "input", "kaiming",
        torch_forward=lambda F, x, a: F.gelu(x),
        torch_backward=lambda aten, dy, x, a: aten.gelu_backward(dy, x),
        layer_option=("approximate", "none"), benchmark=True),
    Activation(
        "gelu_tanh", "GELU", "``y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``", "input", "kaiming",
        torch_forward=lambda F, x, a: F.gelu(x, approximate="tanh"),
        torch_backward=lambda aten, dy, x, a: aten.gelu_backward(dy, x, approximate="tanh"),
        layer_option=("approximate", "tanh")),
    Activation(
        "silu", "SiLU", "``y = x * sigmoid(x)`` (swish).", "input", "kaiming",
        torch_forward=lambda F, x, a: F.silu(x),
        torch_backward=lambda aten, dy, x, a: aten.silu_backward(dy, x)),
    Activation(
        "softplus", "Softplus", "``y = log(1 + exp(x))``, and ``x`` above 20 (PyTorch's beta 1, threshold 20).",
        "input", "glorot",
        torch_forward=lambda F, x, a: F.softplus(x),
        torch_backward=lambda aten, dy, x, a: aten.softplus_backward(dy, x, 1.0, 20.0),
        kinks=(20.0,)),
    Activation(
        "elu", "ELU", "``y = x if x > 0 else alpha * (exp(x) - 1)`` (``alpha >= 0``).", "output", "kaiming",
        torch_forward=lambda F, x, a: F.elu(x, a),
        torch_backward=lambda aten, dy, y, a: aten.elu_backward(dy, a, 1.0, 1.0, True, y),
        parameter=Parameter("alpha", 1.0, 0.0), kinks=(0.0,)),
    Activation(
        "mish", "Mish", "``y = x * tanh(softplus(x))``.", "input", "kaiming",
        torch_forward=lambda F, x, a: F.mish(x),
        torch_backward=lambda aten, dy, x, a: aten.mish_backward(dy, x),
        benchmark=True),
    Activation(
        "hardswish", "HardSwish", "``y = x * min(max(x + 3, 0), 6) / 6``.", "input", "kaiming",
        torch_forward=lambda F, x, a: F.hardswish(x),
        torch_backward=lambda aten, dy, x, a: aten.hardswish_backward(dy, x),
        kinks=(-3.0, 3.0), benchmark=True),
)

#: Every activation name, in the order of the kernels' integer codes.
ACTIVATIONS: tuple[str, ...] = tuple(row.name for row in TABLE)
#: Integer code of each activation, shared by the Numba and CUDA kernels.
CODES: dict[str, int] = {name: code for code, name in enumerate(ACTIVATIONS)}
BY_NAME: dict[str, Activation] = {row.name: row for row in TABLE}


def resolve(activation: str | None, alpha: float | None = None) -> tuple[str, float]:
    """Check an activation name (None means ``"identity"``) and its ``alpha``; fill in the default.

    Returns ``(name, alpha)``; ``alpha`` is 0.0 for activations without a parameter.
    """
    name = checks.choice(activation, "activation", ACTIVATIONS + (None,)) or "identity"
    param = BY_NAME[name].parameter
    if alpha is None:
        alpha = param.default if param is not None else 0.0
    value = checks.real(alpha, "alpha")
    if param is not None and value < param.minimum:
        raise ValueError(f"alpha: {name} needs alpha >= {param.minimum:g}, got {alpha!r}")
    return name, value


def formulas(namespace: dict[str, Any], suffix: str, where: str) -> dict[str, Callable[..., Any]]:
    """``{name: namespace["<name>_<suffix>"]}`` for every row: a formula site's functions, by activation.

    Raises ``ImportError`` naming the activations ``where`` (a formula site) has no formula for.
    """
    missing = [row.name for row in TABLE if f"{row.name}_{suffix}" not in namespace]
    if missing:
        raise ImportError(f"{where}: no {suffix} formula for {', '.join(missing)} (see nnfast/activations.py)")
    return {row.name: namespace[f"{row.name}_{suffix}"] for row in TABLE}


def saves_input(activation: str) -> bool:
    """True when ``activation``'s backward needs its input, False when its output."""
    return BY_NAME[activation].saves_input


class Resolved(checks.Check):
    """The op table's check of an ``activation`` argument and the ``alpha`` after it (:func:`resolve`)."""

    def __init__(self, part: str) -> None:
        self.part = part  # "name" or "alpha"

    def __call__(self, value: Any, arg: str, ctx: checks.Context) -> Any:
        if self.part == "name":
            return checks.choice(value, arg, ACTIVATIONS + (None,)) or "identity"
        return resolve(ctx.values["activation"], value)[1]


__all__ = ["ACTIVATIONS", "Activation", "BY_NAME", "CODES", "Parameter", "TABLE", "formulas", "resolve", "saves_input"]
