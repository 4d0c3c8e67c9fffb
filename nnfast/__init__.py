"""nnfast: a compact neural-network array backend with NumPy, Numba and CUDA kernels.

One layer API over three interchangeable backends, chosen with the
``NNFAST_BACKEND`` environment variable (``numpy``, ``numba``, ``cupy`` or
``auto``) or at run time with :func:`set_backend` / :func:`use_backend`.

Importing nnfast is cheap: Numba and CuPy are imported only when their
backend is first used.
"""

from __future__ import annotations

from typing import Any

import numpy as _np

from ._command import import_registry as _import_registry

_import_registry()  # raises BackendError for a bad NNFAST_BACKEND (the nnfast command reports it itself)

from .activation_layers import LAYERS as _ACTIVATION_LAYERS
from .activation_layers import ActivationLayer, activation_layer
from .activations import ACTIVATIONS
from .backends import available_backends, get_backend, set_backend, use_backend
from .backends.base import Backend
from .errors import BackendError
from .layers import MLP, Linear, Module, Parameter, Sequential
from .losses import SoftmaxCrossEntropy
from .optim import SGD, Adam, Optimizer
from .serialization import load, save
from .train_step import TrainStep

__version__ = "0.1.0"


def asarray(x: Any, dtype: Any = None) -> Any:
    """Convert ``x`` to the current backend's array type (``numpy`` or ``cupy``)."""
    return get_backend().asarray(x, dtype=dtype)


def to_numpy(a: Any) -> _np.ndarray:
    """Return ``a`` (an array of any backend) as a ``numpy.ndarray``."""
    if isinstance(a, _np.ndarray):
        return a
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return _np.asarray(a)


# The activation layers (nf.ReLU, nf.GELU, ...): one per layer of the activation table.
globals().update(_ACTIVATION_LAYERS)

__all__ = [
    "ACTIVATIONS",
    "ActivationLayer",
    "Adam",
    "Backend",
    "BackendError",
    "Linear",
    "MLP",
    "Module",
    "Optimizer",
    "Parameter",
    "SGD",
    "Sequential",
    "SoftmaxCrossEntropy",
    "TrainStep",
    *_ACTIVATION_LAYERS,
    "__version__",
    "activation_layer",
    "asarray",
    "available_backends",
    "get_backend",
    "load",
    "save",
    "set_backend",
    "to_numpy",
    "use_backend",
]
