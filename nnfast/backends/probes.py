"""Availability probes of the optional backends that must not import the backend itself.

A probe says, without raising, why a backend cannot run on this machine (or
None when it can); the registry (:data:`nnfast.backends.BACKENDS`) names one
per backend. The Numba backend's module imports Numba, so its probe lives
here; the CuPy backend's module imports CuPy lazily and keeps its own.
"""

from __future__ import annotations


def numba_unavailable_reason() -> str | None:
    """Why the Numba backend cannot run here (Numba missing or broken), or None."""
    try:
        import numba  # noqa: F401
    except ImportError as err:
        return f"Numba is not installed ({err}); install it with: pip install numba"
    return None
