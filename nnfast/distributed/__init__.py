"""Data-parallel training: MPI (mpi4py) for the CPU backends, NCCL (CuPy) for GPUs.

Launch every rank with ``mpiexec -n N nnfast train --distributed ...``; in
code::

    from nnfast import distributed
    from nnfast.train import TrainConfig, train

    dp = distributed.init("numba")            # this rank's hook; needs an MPI launcher
    with dp.abort_on_error():                 # a failing rank ends the job
        result = train(TrainConfig(backend="numba"), parallel=dp)

Every rank holds the whole model and a disjoint slice of each global batch
(:mod:`~nnfast.distributed.hook` says how the slices and the mean are
weighted); rank 0's parameters and optimizer state are broadcast at the
start; gradients are summed in buckets, overlapped with the backward pass
(:mod:`~nnfast.distributed.data_parallel`); only rank 0 logs and writes
checkpoints. Importing this package imports neither mpi4py nor CuPy.
"""

from __future__ import annotations

from .buckets import DEFAULT_BUCKET_BYTES, Bucket, plan_buckets
from .data_parallel import DataParallel
from .engine import DEFAULT_TIMEOUT, CollectiveTimeout, Engine, Work, abort_on_error
from .hook import SingleProcess, shard_bounds
from .launch import announced_world_size, init, install_excepthook, launched_by_mpi, mpiexec_path

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_TIMEOUT",
    "Bucket",
    "CollectiveTimeout",
    "DataParallel",
    "Engine",
    "SingleProcess",
    "Work",
    "abort_on_error",
    "announced_world_size",
    "init",
    "install_excepthook",
    "launched_by_mpi",
    "mpiexec_path",
    "plan_buckets",
    "shard_bounds",
]
