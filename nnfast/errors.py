"""Exceptions raised by nnfast."""


class BackendError(RuntimeError):
    """A backend was asked for that does not exist or cannot run here.

    Also raised when an array that lives on one backend is handed to another
    backend that cannot take it (for example a CuPy array to the NumPy backend).
    """
