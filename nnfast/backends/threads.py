"""``NNFAST_NUM_THREADS``: the cap on the CPU kernels' threads."""

from __future__ import annotations

import os
from typing import Callable

from ..errors import BackendError


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
