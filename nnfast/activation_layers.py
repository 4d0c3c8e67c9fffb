"""The activation layers, one class per ``layer`` of the activation table.

``nf.ReLU()``, ``nf.LeakyReLU(negative_slope=0.01)``, ``nf.GELU(approximate="tanh")``,
... are made here from the rows of :mod:`nnfast.activations`: a row's
parameter becomes the layer's keyword (with its default), rows that share a
layer are chosen by its option keyword, and the row's formula is the class
docstring. A new row in the table is a new layer, with nothing to add here.
"""

from __future__ import annotations

import inspect
from typing import Any

from . import checks
from .activations import BY_NAME, TABLE, Activation, resolve
from .module import Module


class ActivationLayer(Module):
    """An element-wise activation layer: ``y = act(x)``, any shape."""

    #: The rows this layer class stands for (set on each generated class).
    rows: tuple[Activation, ...] = ()
    _signature = inspect.Signature()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        row, alpha = self._pick(bound.arguments)
        super().__init__()
        self.activation, self.alpha = resolve(row.name, alpha)
        self._cache: tuple[Any, Any] | None = None

    @classmethod
    def _pick(cls, arguments: dict[str, Any]) -> tuple[Activation, float | None]:
        row = cls.rows[0]
        if row.layer_option is not None:
            keyword = row.layer_option[0]
            options = tuple(r.layer_option[1] for r in cls.rows)
            value = checks.choice(arguments[keyword], keyword, options)
            row = cls.rows[options.index(value)]
        alpha = arguments[row.parameter.name] if row.parameter is not None else None
        return row, alpha

    def __repr__(self) -> str:
        row = BY_NAME[self.activation]
        if row.parameter is not None:
            return f"{type(self).__name__}({self.alpha})"
        if row.layer_option is not None and row is not self.rows[0]:
            return f"{type(self).__name__}({row.layer_option[0]}={row.layer_option[1]!r})"
        return f"{type(self).__name__}()"

    def forward(self, x: Any) -> Any:
        x = self._as_input(x, "x")
        if x.size == 0:
            raise ValueError(f"x: expected a non-empty array, got shape {tuple(x.shape)}")
        y = self.backend._activation_forward(x, self.activation, self.alpha)
        self._cache = (x if BY_NAME[self.activation].saves_input else y, y)
        return y

    def backward(self, dy: Any) -> Any:
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first")
        saved, y = self._cache
        dy = self._grad_input(dy, "dy", y)
        return self.backend._activation_backward(dy, saved, self.activation, self.alpha)


def _layer_class(name: str, rows: tuple[Activation, ...]) -> type[ActivationLayer]:
    """The layer class of the rows whose ``layer`` is ``name``."""
    params = []
    first = rows[0]
    if first.layer_option is not None:
        params.append(inspect.Parameter(first.layer_option[0], inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=first.layer_option[1]))
    for row in rows:
        if row.parameter is not None and all(p.name != row.parameter.name for p in params):
            params.append(inspect.Parameter(row.parameter.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=row.parameter.default))
    if len(rows) == 1:
        doc = first.formula
    else:
        doc = "; ".join(f"``{r.layer_option[0]}={r.layer_option[1]!r}``: {r.formula}" for r in rows) + "."
    cls = type(name, (ActivationLayer,), {"__doc__": doc, "__module__": __name__, "rows": rows,
                                          "_signature": inspect.Signature(params)})
    cls.__signature__ = inspect.Signature(params)  # what help() and inspect.signature() show
    return cls


def _layer_classes() -> dict[str, type[ActivationLayer]]:
    names = list(dict.fromkeys(row.layer for row in TABLE))
    return {name: _layer_class(name, tuple(r for r in TABLE if r.layer == name)) for name in names}


#: Every activation layer class by name: ``{"ReLU": nf.ReLU, ...}``.
LAYERS: dict[str, type[ActivationLayer]] = _layer_classes()
globals().update(LAYERS)


def activation_layer(name: str | None) -> ActivationLayer:
    """The activation layer for an activation name (``"relu"``, ``"gelu_tanh"``, ...)."""
    name, _ = resolve(name)
    row = BY_NAME[name]
    option = {row.layer_option[0]: row.layer_option[1]} if row.layer_option is not None else {}
    return LAYERS[row.layer](**option)


__all__ = ["ActivationLayer", "LAYERS", "activation_layer", *LAYERS]
