"""Gradient buckets: parameters grouped into flat buffers, each all-reduced as one message.

One message per parameter would pay the collective's latency dozens of
times per step; one message for the whole model could start only after the
last layer's backward. Buckets sit in between: parameters are taken in
backward order (the reverse of ``model.parameters()``: the last layer's
gradients are final first) and packed into buffers of at most
``bucket_bytes`` (a larger parameter gets a bucket of its own). A bucket's
reduction starts as soon as its last parameter's gradient is final, while
the backward pass of the layers before it goes on.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

#: Default bucket size: small enough that the first bucket of a mid-sized MLP
#: starts well before the backward pass ends, large enough to amortise latency.
DEFAULT_BUCKET_BYTES = 1 << 20


class Bucket:
    """Parameters reduced together; ``buffer`` holds their gradients back to back."""

    __slots__ = ("index", "names", "params", "offsets", "sizes", "size", "buffer", "waiting", "work")

    def __init__(self, index: int, named: Sequence[tuple[str, Any]], backend: Any) -> None:
        self.index = index
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.sizes = [math.prod(p.shape) for p in self.params]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.size = sum(self.sizes)
        self.buffer = backend.zeros(self.size, dtype=self.params[0].data.dtype)
        self.waiting = len(self.params)  # parameters whose gradient is not final yet in this step
        self.work: Any = None

    @property
    def nbytes(self) -> int:
        return self.size * self.buffer.dtype.itemsize

    def describe(self) -> str:
        return f"gradient bucket {self.index} ({', '.join(self.names)}; {self.nbytes} bytes)"


def plan_buckets(named: Sequence[tuple[str, Any]], bucket_bytes: int) -> list[list[tuple[str, Any]]]:
    """Group ``(name, parameter)`` pairs, given in forward order, into buckets in backward order.

    A bucket never mixes dtypes and holds at most ``bucket_bytes`` unless a
    single parameter is larger.
    """
    groups: list[list[tuple[str, Any]]] = []
    used = 0
    for name, p in reversed(list(named)):
        nbytes = math.prod(p.shape) * p.data.dtype.itemsize
        current = groups[-1] if groups else None
        if current is None or used + nbytes > bucket_bytes or current[0][1].data.dtype != p.data.dtype:
            groups.append([])
            used = 0
        groups[-1].append((name, p))
        used += nbytes
    return groups
