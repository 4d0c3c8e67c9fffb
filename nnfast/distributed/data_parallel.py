"""``DataParallel``: the training-loop hook of a data-parallel run.

Every rank holds the whole model and computes a disjoint slice of each
global batch (:func:`~nnfast.distributed.hook.shard_bounds`, which also
explains the weighting). Rank 0's parameters and optimizer state are
broadcast to the others when the hook is attached, and every step sums the
weighted gradients of all ranks, bucket by bucket, so that every rank then
applies the same update to the same state: parameters and optimizer state
stay identical on every rank without ever being compared again.

Overlap: ``after_layer`` is handed to ``Sequential.backward``, which calls
it right after each layer's backward; a bucket's all-reduce starts as soon
as its last parameter is reported, while earlier layers are still being
differentiated. On NCCL the reduction then runs on its own stream alongside
the backward kernels. On MPI it advances only inside MPI calls — the test
made for every pending bucket at each later layer, and the final wait — see
:mod:`~nnfast.distributed.mpi_engine`. A model whose parameters all fit in
one bucket (the default 1 MiB holds an MLP of ~250k float32 parameters) has
nothing to overlap: its single reduction starts after the first layer's
backward. A model that is not a ``Sequential`` reports no layers; its
buckets are all reduced in :meth:`reduce_gradients`.
"""

from __future__ import annotations

import threading
from typing import Any, ContextManager

import numpy as np

from ..errors import BackendError
from .buckets import DEFAULT_BUCKET_BYTES, Bucket, plan_buckets
from .engine import Engine, Work, abort_on_error
from .hook import SingleProcess, shard_bounds


class DataParallel(SingleProcess):
    """Data-parallel training over ``engine`` (an MPI or NCCL engine of every rank).

    ``bucket_bytes`` caps a gradient bucket (see :mod:`~nnfast.distributed.buckets`).
    Use it as ``nnfast.train.train(cfg, parallel=dp)``, or call the hook
    points yourself in the order the module :mod:`~nnfast.distributed.hook`
    lists.
    """

    def __init__(self, engine: Engine, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        super().__init__()
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes: expected a positive int, got {bucket_bytes!r}")
        self.engine = engine
        self.rank, self.world_size = engine.rank, engine.size
        self.is_main = engine.rank == 0
        self.bucket_bytes = bucket_bytes
        self.after_layer = self._after_layer
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[int, Bucket] = {}
        self._ready: set[int] = set()
        self._reduced: dict[int, Any] = {}  # id(param) -> the grad view set by the last reduction
        self._xp: Any = np
        self._weight = 1.0
        self._stop_vote: tuple[Work, np.ndarray] | None = None

    def describe(self) -> str:
        return (f"data parallel over {self.world_size} ranks ({self.engine.name}), "
                f"{len(self.buckets)} gradient bucket{'s' if len(self.buckets) != 1 else ''}")

    # ------------------------------------------------------------------ set-up
    def attach(self, model: Any, optimizer: Any, stop: threading.Event) -> None:
        """Check every rank has the same model, copy rank 0's state to all, build the buckets."""
        self._stop = stop
        backend = model.backend
        if self.engine.host_memory != (backend.xp is np):
            raise BackendError(f"the {self.engine.name} engine cannot reduce arrays of the {backend.name!r} backend; "
                               "use MPI for numpy/numba and NCCL for cupy")
        self._xp = backend.xp
        named = model.named_parameters()
        ids = {id(p) for _, p in named}
        if optimizer is not None and any(id(p) not in ids for p in optimizer.params):
            raise ValueError("optimizer: updates parameters that are not the model's; their gradients "
                             "would not be reduced across ranks")
        mine = _signature(backend, named, optimizer, self.bucket_bytes)
        theirs, step = self.engine.bcast_object((mine, optimizer.step_count if optimizer is not None else 0))
        if theirs != mine:
            diff = [f"{k}: {theirs[k]!r} on rank 0, {mine[k]!r} here" for k in mine if theirs.get(k) != mine[k]]
            raise ValueError(f"{self.engine.where()}: this rank's training set-up differs from rank 0's: "
                             + "; ".join(diff))
        arrays = [p.data for _, p in named]
        if optimizer is not None:
            optimizer.step_count = int(step)
            arrays += [a for name in optimizer.state_names for a in optimizer.state[name]]
        works = [self.engine.broadcast(a, 0, "broadcast of the parameters and optimizer state from rank 0")
                 for a in arrays]
        for work in works:
            work.wait()
        self.buckets = [Bucket(i, group, backend) for i, group in enumerate(plan_buckets(named, self.bucket_bytes))]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._ready.clear()
        self._reduced.clear()

    # ------------------------------------------------------------- every step
    def shard(self, idx: Any) -> Any:
        rows = int(idx.shape[0])
        start, stop = shard_bounds(rows, self.rank, self.world_size)
        self._weight = (stop - start) / rows
        # An empty slice computes the batch's first row with weight 0 (exact zeros).
        return idx[start:stop] if stop > start else idx[:1]

    def global_loss(self, loss: Any, dlogits: Any) -> tuple[Any, Any]:
        xp = self._xp
        flag = np.array([1.0 if self._stop is not None and self._stop.is_set() else 0.0])
        self._stop_vote = (self.engine.host_allreduce(flag, "agreement on stopping"), flag)
        if self._weight != 1.0:
            dlogits *= self._weight
        total = xp.empty(1, dtype=xp.float64)
        total[0] = loss.astype(xp.float64) * self._weight
        self.engine.allreduce(total, "all-reduce of the loss").wait()
        return total.reshape(()), dlogits

    def _after_layer(self, layer: Any) -> None:
        complete = []
        for p in layer.parameters():
            bucket = self._bucket_of.get(id(p))
            if bucket is None or id(p) in self._ready:
                continue
            self._ready.add(id(p))
            bucket.waiting -= 1
            if bucket.waiting == 0:
                complete.append(bucket)
        for bucket in sorted(complete, key=lambda b: b.index):
            self._start(bucket)
        for bucket in self.buckets:  # MPI advances a request only inside MPI calls
            if bucket.work is not None:
                bucket.work.test()

    def _start(self, bucket: Bucket) -> None:
        for name, p, offset, size in zip(bucket.names, bucket.params, bucket.offsets, bucket.sizes):
            g = p.grad
            if g is None:
                raise RuntimeError(f"{self.engine.where()}: parameter {name} has no gradient after backward; "
                                   "data-parallel training reduces every parameter in every step")
            if g is self._reduced.get(id(p)):
                raise RuntimeError(f"{self.engine.where()}: parameter {name} still holds the previous step's "
                                   "reduced gradient; clear gradients after every step (optimizer.zero_grad())")
            bucket.buffer[offset:offset + size] = g.reshape(-1)
        bucket.work = self.engine.allreduce(bucket.buffer, f"all-reduce of {bucket.describe()}")

    def reduce_gradients(self) -> None:
        for bucket in self.buckets:
            if bucket.work is None:  # parameters no after_layer call reported
                self._start(bucket)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.work = None
            bucket.waiting = len(bucket.params)
            for p, offset, size in zip(bucket.params, bucket.offsets, bucket.sizes):
                p.grad = bucket.buffer[offset:offset + size].reshape(p.shape)
                self._reduced[id(p)] = p.grad
        self._ready.clear()

    def stop_requested(self) -> bool:
        if self._stop_vote is None:  # no global_loss this step: vote now
            flag = np.array([1.0 if self._stop is not None and self._stop.is_set() else 0.0])
            self._stop_vote = (self.engine.host_allreduce(flag, "agreement on stopping"), flag)
        work, flag = self._stop_vote
        self._stop_vote = None
        work.wait()
        return bool(flag[0] > 0)

    def close(self) -> None:
        """Release the engine's communicator (after the last step)."""
        self.engine.close()

    # ------------------------------------------------------------------ faults
    def abort_on_error(self, passthrough: tuple[type[BaseException], ...] = ()) -> ContextManager[None]:
        """End the whole job when this rank fails inside the block (see :func:`abort_on_error`)."""
        return abort_on_error(self.engine, passthrough)


def _signature(backend: Any, named: list[tuple[str, Any]], optimizer: Any, bucket_bytes: int) -> dict[str, Any]:
    """What must agree between ranks for their collectives to match."""
    return {
        "backend": backend.name,
        "parameters": [(name, tuple(p.shape), str(p.data.dtype)) for name, p in named],
        "optimizer": None if optimizer is None else (type(optimizer).__name__, optimizer.hyperparameters(),
                                                     tuple(optimizer.state_names)),
        "bucket_bytes": bucket_bytes,
    }
