"""The ``nnfast`` command takes over an unknown ``NNFAST_BACKEND`` from ``import nnfast``.

``import nnfast`` raises :class:`~nnfast.errors.BackendError` for an unknown
``NNFAST_BACKEND``: that is the library's contract. The command cannot run
code before that import (its console script and ``python -m nnfast.cli`` both
import the package first), yet it must answer with one line, and a
``--backend`` on its command line makes the variable irrelevant. So the
package imports its backend registry through :func:`import_registry`: in the
command's own process, a value the registry rejects is set aside in
:data:`deferred_error`, the registry is imported as if the variable were
unset, and the variable is put back as it was. :func:`nnfast.cli.main` then
reports the error (or ignores it for ``--backend``). In any other process the
error propagates unchanged.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from types import ModuleType

from .errors import BackendError

#: The registry's error for ``NNFAST_BACKEND``, set aside for the command to report; None when the value is good.
deferred_error: BackendError | None = None

_COMMAND_MODULES = ("nnfast.cli",)


def started_as_command() -> bool:
    """True in a process started as ``nnfast ...`` or ``python -m nnfast.cli ...``."""
    argv = sys.argv or [""]
    if argv[0] == "-m":  # python -m X: sys.argv[0] is "-m" while X's package is imported
        orig = getattr(sys, "orig_argv", [])
        token = orig[-len(argv)] if len(orig) >= len(argv) else ""
        return token.removeprefix("-m") in _COMMAND_MODULES
    # The console script pip writes (nnfast, nnfast.exe, nnfast-script.py on Windows).
    return re.sub(r"(-script\.pyw?|\.exe)?$", "", os.path.basename(argv[0])) == "nnfast"


def import_registry() -> ModuleType:
    """Import ``nnfast.backends``; in the command's process, a bad ``NNFAST_BACKEND`` is deferred."""
    global deferred_error
    try:
        return importlib.import_module("nnfast.backends")
    except BackendError as err:
        value = os.environ.get("NNFAST_BACKEND")
        if value is None or not started_as_command():
            raise
        deferred_error = err
    del os.environ["NNFAST_BACKEND"]
    try:
        return importlib.import_module("nnfast.backends")
    finally:
        os.environ["NNFAST_BACKEND"] = value
