"""The GPU side of ``nnfast bench --size large``: the device's cache and memory, rotating inputs, TF32.

GPU-sized cases (:data:`nnfast.bench.cases.LARGE_SHAPES`) make their inputs on
the device, rotate through several input sets when one set would stay in the
L2 cache between calls (so that a call reads device memory, as it would in a
model), are skipped when the device cannot hold every implementation's arrays
at once, and leave the memory pools empty for the next case. (PyTorch's
float32 GEMM-based cases are measured twice, at both matmul precisions, as
every GPU run does: :func:`nnfast.bench.cases.torch_at_precision`.)
"""

from __future__ import annotations

import gc
import itertools
from typing import Any, Callable, Sequence

import numpy as np

from .cases import DEFAULT_L2_BYTES, LARGE_SHAPES, OpSpec, footprint
from .timing import Settings

#: The share of the device's free memory a case may plan to use.
MEMORY_SHARE = 0.85
#: Sampling of a GPU-sized run: each call lasts milliseconds, so fewer samples give a steady median.
LARGE_SETTINGS = Settings(repeat=7, rounds=2, min_time=0.01, warmup_time=0.05, switch_time=0.02, max_time=1.5)


def largest_case(specs: Sequence[OpSpec], dtypes: Sequence[str]) -> tuple[int, str]:
    """Bytes of the largest GPU-sized case of ``specs`` (one implementation's arrays) and its name."""
    return max((footprint(spec, shape, np.dtype(dtype).itemsize)[1], f"{spec.name} {shape.label} {dtype}")
               for spec in specs for shape in LARGE_SHAPES[spec.name] for dtype in dtypes)


def gpu_backends(backends: dict[str, Any], requested: Sequence[str], specs: Sequence[OpSpec],
                 dtypes: Sequence[str], notes: list[str]) -> dict[str, Any]:
    """The GPU backends of ``backends``; ``ValueError`` (the run is refused) for a CPU one asked for, or none.

    The large cases hold gigabytes of arrays and teraflops of work each: on a
    CPU they would take hours and could exhaust its memory, so they are never
    started there.
    """
    nbytes, name = largest_case(specs, dtypes)
    why = (f"--size large is sized for a GPU: its largest case ({name}) holds {nbytes / 2**30:.1f} GiB of "
           "arrays per implementation")
    cpu = [n for n, be in backends.items() if getattr(be, "xp", np) is np]
    if cpu and requested:
        raise ValueError(f"{why}; {', '.join(cpu)} {'runs' if len(cpu) == 1 else 'run'} on the CPU "
                         "(use --backend cupy)")
    gpu = {n: be for n, be in backends.items() if n not in cpu}
    if not gpu:
        reasons = "; ".join(notes) or "no GPU backend is available"
        raise ValueError(f"{why}, and no GPU backend can run here ({reasons})")
    if cpu:
        notes.append(f"--size large: CPU backends left out ({', '.join(cpu)})")
    return gpu


def too_big(xp: Any, nbytes: int) -> str | None:
    """Why ``nbytes`` of arrays cannot be held on the device now, or None (also when the device does not say)."""
    free = free_bytes(xp)
    if free is None or nbytes <= MEMORY_SHARE * free:
        return None
    return f"needs {_amount(nbytes)} of device memory, {_amount(free)} free"


def _amount(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def l2_bytes(xp: Any) -> int:
    """The L2 cache of the current device of array module ``xp`` (CuPy), else :data:`DEFAULT_L2_BYTES`."""
    try:
        return int(xp.cuda.Device().attributes["L2CacheSize"]) or DEFAULT_L2_BYTES
    except Exception:
        return DEFAULT_L2_BYTES


def free_bytes(xp: Any) -> int | None:
    """Free memory of the current device (None where the device does not say)."""
    try:
        return int(xp.cuda.runtime.memGetInfo()[0])
    except Exception:
        return None


def release(xp: Any, torch: Any = None) -> None:
    """Give the memory cached by CuPy's and PyTorch's pools back to the device (between cases)."""
    gc.collect()  # arrays held only by reference cycles (a model and its optimizer) go first
    try:
        xp.get_default_memory_pool().free_all_blocks()
    except Exception:
        pass
    if torch is not None:
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass


def rotating(build: Callable[[int], Callable[[], Any]], sets: int) -> Callable[[], Any]:
    """A callable that runs ``build(0)``, ``build(1)``, ... ``build(sets - 1)`` in turn, one per call."""
    if sets <= 1:
        return build(0)
    calls = itertools.cycle([build(seed) for seed in range(sets)])
    return lambda: next(calls)()


__all__ = ["LARGE_SETTINGS", "MEMORY_SHARE", "free_bytes", "gpu_backends", "l2_bytes", "largest_case", "release",
           "rotating", "too_big"]
