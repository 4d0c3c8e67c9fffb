"""Backend registry and selection: ``NNFAST_BACKEND``, ``set_backend``, ``use_backend``.

Selection rules (DESIGN §4):

* ``NNFAST_BACKEND=numpy|numba|cupy|auto`` is read once, when nnfast is
  imported; unset means ``auto``. An unknown value raises :class:`BackendError`
  at import. Whether the named backend can run is checked when it is first
  used, so importing nnfast stays cheap.
* ``auto`` resolves to ``cupy`` when CuPy imports and a GPU answers, else
  ``numba`` when Numba imports, else ``numpy``; the pick is logged at DEBUG.
* :func:`set_backend` changes the process-wide default; :func:`use_backend`
  overrides it inside a ``with`` block for the current thread / async task
  (a :class:`contextvars.ContextVar`), nests, and restores in ``finally``.
* Asking for a backend that cannot run never falls back silently: it raises
  :class:`BackendError` naming what is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterator

from ..errors import BackendError
from .base import Backend
from .threads import apply_num_threads

logger = logging.getLogger("nnfast")


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives and how to tell whether it can run here, without importing it."""

    module: str  # imported on first use only
    cls: str
    #: ``"module:function"`` returning why the backend cannot run here, or None when it can
    #: (called without raising); None: it always runs.
    probe: str | None = None


#: Every backend, from the reference to the fastest (``auto`` picks the last one that can run).
BACKENDS: dict[str, BackendEntry] = {
    "numpy": BackendEntry("nnfast.backends.numpy_backend", "NumpyBackend"),
    "numba": BackendEntry("nnfast.backends.numba_backend", "NumbaBackend",
                          "nnfast.backends.probes:numba_unavailable_reason"),
    "cupy": BackendEntry("nnfast.backends.cupy_backend", "CupyBackend",
                         "nnfast.backends.cupy_backend:cupy_unavailable_reason"),
}

#: Names accepted by ``NNFAST_BACKEND``, :func:`set_backend` and :func:`use_backend`.
BACKEND_NAMES = tuple(BACKENDS)
_CHOICES = BACKEND_NAMES + ("auto",)

_instances: dict[str, Backend] = {}
_lock = threading.Lock()


def _unknown(value: object, what: str) -> BackendError:
    return BackendError(f"{what}: unknown backend {value!r}; valid choices are {', '.join(_CHOICES)}")


def _read_env() -> str:
    value = os.environ.get("NNFAST_BACKEND", "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise _unknown(os.environ["NNFAST_BACKEND"], "NNFAST_BACKEND")
    return value


_default_name: str = _read_env()  # "auto" until first resolved
_default: Backend | None = None
_scoped: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("nnfast_backend", default=None)


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` (one of :data:`BACKEND_NAMES`) cannot run here, or None when it can."""
    entry = BACKENDS[name]
    if entry.probe is None:
        return None
    if importlib.util.find_spec(entry.module) is None:
        return f"this build of nnfast has no {name} backend"
    module, function = entry.probe.split(":")
    return getattr(importlib.import_module(module), function)()


def _instantiate(name: str) -> Backend:
    """The one instance of backend ``name``, created on first use."""
    with _lock:
        backend = _instances.get(name)
        if backend is None:
            reason = unavailable_reason(name)
            if reason is not None:
                raise BackendError(f"backend {name!r} cannot run here: {reason}")
            entry = BACKENDS[name]
            backend = getattr(importlib.import_module(entry.module), entry.cls)()
            _instances[name] = backend
        return backend


def _resolve_auto() -> Backend:
    for name in reversed(BACKEND_NAMES):
        reason = unavailable_reason(name)
        if reason is None:
            logger.debug("nnfast: NNFAST_BACKEND=auto picked %r", name)
            return _instantiate(name)
        logger.debug("nnfast: auto skips %r: %s", name, reason)
    raise AssertionError("unreachable: the numpy backend is always available")  # pragma: no cover


def backend_for(name: str | Backend) -> Backend:
    """The backend instance for a name (``"auto"`` resolved) or a backend itself."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise _unknown(name, "backend")
    name = name.lower()
    return _resolve_auto() if name == "auto" else _instantiate(name)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, e.g. ``["numpy", "numba"]``."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name) is None]


def get_backend() -> Backend:
    """The backend in force: the innermost :func:`use_backend`, else the process default."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    global _default
    if _default is None:
        _default = backend_for(_default_name)
    return _default


def set_backend(name: str | Backend) -> Backend:
    """Set the process-wide default backend and return it."""
    global _default, _default_name
    backend = backend_for(name)
    _default, _default_name = backend, backend.name
    return backend


@contextlib.contextmanager
def use_backend(name: str | Backend) -> Iterator[Backend]:
    """Use a backend inside a ``with`` block (this thread / task only); nests."""
    token = _scoped.set(backend_for(name))
    try:
        yield _scoped.get()
    finally:
        _scoped.reset(token)


__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "Backend",
    "BackendEntry",
    "BackendError",
    "apply_num_threads",
    "available_backends",
    "backend_for",
    "get_backend",
    "set_backend",
    "unavailable_reason",
    "use_backend",
]
