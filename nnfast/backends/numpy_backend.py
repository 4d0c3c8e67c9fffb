"""The NumPy reference backend: the reference ops of :mod:`.reference` on NumPy arrays.

Nothing here is tuned: every op is the textbook formula of
:mod:`.reference` and :mod:`.reference_activations`, the oracle every fast
kernel is checked against (and which is itself checked against finite
differences).
"""

from __future__ import annotations

import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    """Reference backend: every op in plain NumPy."""

    name = "numpy"
    xp = np
