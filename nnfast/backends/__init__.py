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
from typing import Callable, Iterator

from ..errors import BackendError
from .base import Backend

logger = logging.getLogger("nnfast")

#: Names accepted by ``NNFAST_BACKEND``, :func:`set_backend` and :func:`use_backend`.
BACKEND_NAMES = ("numpy", "numba", "cupy")
_CHOICES = BACKEND_NAMES + ("auto",)

# name -> (module, class). Modules are imported on first use only.
_IMPLEMENTATIONS = {
    "numpy": ("nnfast.backends.numpy_backend", "NumpyBackend"),
    "numba": ("nnfast.backends.numba_backend", "NumbaBackend"),
    "cupy": ("nnfast.backends.cupy_backend", "CupyBackend"),
}

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


def _unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name == "numpy":
        return None
    if importlib.util.find_spec(_IMPLEMENTATIONS[name][0]) is None:
        return f"this build of nnfast has no {name} backend"
    if name == "numba":
        try:
            import numba  # noqa: F401
        except ImportError as err:
            return f"Numba is not installed ({err}); install it with: pip install numba"
        return None
    from .cupy_backend import cupy_unavailable_reason

    return cupy_unavailable_reason()


def _instantiate(name: str) -> Backend:
    """The one instance of backend ``name``, created on first use."""
    with _lock:
        backend = _instances.get(name)
        if backend is None:
            reason = _unavailable_reason(name)
            if reason is not None:
                raise BackendError(f"backend {name!r} cannot run here: {reason}")
            module_name, class_name = _IMPLEMENTATIONS[name]
            backend = getattr(importlib.import_module(module_name), class_name)()
            _instances[name] = backend
        return backend


def _resolve_auto() -> Backend:
    for name in ("cupy", "numba", "numpy"):
        reason = _unavailable_reason(name)
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
    return [name for name in BACKEND_NAMES if _unavailable_reason(name) is None]


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


def apply_num_threads(setter: Callable[[int], None], maximum: int) -> int:
    """Apply ``NNFAST_NUM_THREADS`` (capped at ``maximum``) through ``setter``; return the count."""
    raw = os.environ.get("NNFAST_NUM_THREADS", "").strip()
    if not raw:
        return maximum
    try:
        count = int(raw)
    except ValueError:
        raise BackendError(f"NNFAST_NUM_THREADS: expected a positive integer, got {raw!r}") from None
    if count < 1:
        raise BackendError(f"NNFAST_NUM_THREADS: expected a positive integer, got {raw!r}")
    count = min(count, maximum)
    setter(count)
    return count


__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendError",
    "apply_num_threads",
    "available_backends",
    "backend_for",
    "get_backend",
    "set_backend",
    "use_backend",
]
