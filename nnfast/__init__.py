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

from .backends import available_backends, get_backend, set_backend, use_backend
from .backends.base import ACTIVATIONS, Backend
from .errors import BackendError
from .layers import (
    ELU,
    GELU,
    MLP,
    Identity,
    LeakyReLU,
    Linear,
    Module,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
    activation_layer,
)
from .losses import SoftmaxCrossEntropy
from .optim import SGD, Adam, Optimizer
from .serialization import load, save

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


__all__ = [
    "ACTIVATIONS",
    "Adam",
    "Backend",
    "BackendError",
    "ELU",
    "GELU",
    "Identity",
    "LeakyReLU",
    "Linear",
    "MLP",
    "Module",
    "Optimizer",
    "Parameter",
    "ReLU",
    "SGD",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "SoftmaxCrossEntropy",
    "Tanh",
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
