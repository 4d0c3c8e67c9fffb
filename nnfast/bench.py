"""``nnfast bench``: per-kernel timings against NumPy, PyTorch and the machine's limits.

For every kernel (an op of the backend contract, or a whole training step),
shape and dtype, each backend is timed side by side in one run: the samples
of the NumPy reference, the fast backends, PyTorch (when it imports) and the
machine-limit yardstick of that kernel are taken in turn, round after round,
so that a shared, noisy machine slows them all alike and their ratios stay
meaningful. A figure is the median of the samples taken after warm-up; a
sample is the mean of enough calls to last ``min_time``.

Work models
-----------
Each kernel states the work it is credited with (:data:`OPS`), counted on the
ideal algorithm, not on what an implementation happens to do:

* ``linear_forward``  ``y = act(x @ W + b)``, x (B, I), W (I, O):
  ``2·B·I·O`` flop (the GEMM; bias and activation epilogue not counted).
* ``linear_backward`` ``dW = xᵀ·dz``, ``dx = dz·Wᵀ``, ``db = Σ dz``:
  ``4·B·I·O`` flop (two GEMMs).
* ``activation_forward``  reads x, writes y: ``2·n·s`` bytes
  (n elements, s bytes per element).
* ``activation_backward`` reads dy and the saved tensor, writes dx: ``3·n·s`` bytes.
* ``softmax`` / ``log_softmax`` (B, C): reads x, writes y: ``2·B·C·s`` bytes.
* ``softmax_cross_entropy`` (B, C): reads logits and int64 labels, writes
  dlogits: ``2·B·C·s + 8·B`` bytes (the loss itself is negligible).
* ``sgd_update`` (momentum): reads p, g, v, writes p, v: ``5·n·s`` bytes.
* ``adam_update``: reads p, g, m, v, writes p, m, v: ``7·n·s`` bytes.
* ``train_step`` (MLP forward, softmax-CE, backward, SGD step):
  ``6·B·Σ(in·out)`` flop (2 forward + 4 backward per weight and sample).

Machine limits, measured in the same run
----------------------------------------
* CPU GEMM: NumPy's ``matmul`` (its BLAS, e.g. OpenBLAS) at the kernel's own
  shape for the linear kernels, at 1024³ for the training step; ``2·M·N·K``
  flop.
* CPU memory: ``numpy.copyto`` of a 64 MiB array, credited ``2·size`` bytes
  (read + write), the same way the kernels' byte models count.
* GPU (CuPy backend): ``cupy.matmul`` (cuBLAS) at the same shapes (4096³
  for the training step), and a device-to-device ``cupy.copyto`` of 256 MiB.

Each row's limit is sampled in the same rounds as the row's kernels; the
report's run-level limits (GEMM 1024³, memory copy) are measured once, first.
The fraction of the limit is the kernel's rate divided by the limit's rate.
Memory-bound kernels on small shapes run from cache, so their fraction of
the DRAM copy rate can exceed 1; that is a property of the shape, not an
error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .paths import check_output_path

#: Schema tag of the JSON report.
SCHEMA = "nnfast-bench/1"

#: Activations the element-wise kernels are measured with.
BENCH_ACTIVATIONS = ("relu", "gelu", "tanh")

#: MLPs of the training-step section: (size tag, layer sizes, batch).
TRAIN_MLPS = (
    ("small", (64, 128, 10), 64),
    ("medium", (784, 512, 512, 10), 1024),
    ("large", (784, 1024, 1024, 10), 256),
)

#: Optimizer parameter sets: the parameters of these MLPs.
OPTIM_MLPS = (
    ("small", (64, 128, 10)),
    ("medium", (784, 512, 512, 10)),
    ("large", (784, 1024, 1024, 10)),
)

#: Hyper-parameters of the training step and the optimizer kernels.
SGD_LR, SGD_MOMENTUM = 1e-3, 0.9
ADAM_LR, ADAM_STEP = 1e-4, 10

CPU_COPY_BYTES = 64 * 2**20
GPU_COPY_BYTES = 256 * 2**20
#: The reference GEMM (M, K, N) of each device: the machine's GEMM rate.
GEMM_REF = {"cpu": (1024, 1024, 1024), "gpu": (4096, 4096, 4096)}

DTYPES = ("float32", "float64")


# ---------------------------------------------------------------- kernel table
@dataclass(frozen=True)
class Shape:
    """One benchmark shape: a size tag (small/medium/large/mlp), dims and a label."""

    size: str
    dims: tuple[Any, ...]
    label: str


@dataclass(frozen=True)
class OpSpec:
    """One kernel family: how to build its callables and how much work one call is."""

    name: str
    group: str
    metric: str  # "GFLOP/s" or "GB/s"
    limit: str  # "gemm" (at the shape), "gemm_ref" (1024³) or "copy"
    model: str  # the work model, as text
    shapes: tuple[Shape, ...]
    variants: tuple[str, ...] = ("",)


def _mlp_label(sizes: Sequence[int]) -> str:
    return "[" + ",".join(str(s) for s in sizes) + "]"


def _mlp_param_shapes(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        shapes += [(a, b), (b,)]
    return shapes


def _count(shapes: Sequence[tuple[int, ...]]) -> int:
    return int(sum(math.prod(s) for s in shapes))


def _human_count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


_LINEAR_SHAPES = tuple(
    Shape(size, (b, i, o), f"{b}×{i}→{o}")
    for size, (b, i, o) in (
        ("small", (64, 64, 128)),
        ("medium", (256, 784, 1024)),
        ("mlp", (1024, 784, 512)),
        ("large", (1024, 1024, 1024)),
    )
)
_ELEMENTWISE_SHAPES = tuple(
    Shape(size, (r, c), f"{r}×{c}") for size, (r, c) in (
        ("small", (64, 128)), ("medium", (256, 1024)), ("large", (1024, 4096)))
)
_ROW_SHAPES = tuple(
    Shape(size, (r, c), f"{r}×{c}") for size, (r, c) in (
        ("small", (64, 10)), ("medium", (256, 1000)), ("large", (4096, 1000)))
)
_OPTIM_SHAPES = tuple(
    Shape(size, tuple(sizes), f"{_mlp_label(sizes)} {_human_count(_count(_mlp_param_shapes(sizes)))} params")
    for size, sizes in OPTIM_MLPS
)
_TRAIN_SHAPES = tuple(
    Shape(size, (tuple(sizes), batch), f"{_mlp_label(sizes)} b{batch}") for size, sizes, batch in TRAIN_MLPS
)

#: Every kernel family, in report order.
OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("linear_forward", "linear", "GFLOP/s", "gemm", "2·B·I·O flop", _LINEAR_SHAPES, ("relu",)),
        OpSpec("linear_backward", "linear", "GFLOP/s", "gemm", "4·B·I·O flop", _LINEAR_SHAPES, ("relu",)),
        OpSpec("activation_forward", "activation", "GB/s", "copy", "2·n·s bytes", _ELEMENTWISE_SHAPES,
               BENCH_ACTIVATIONS),
        OpSpec("activation_backward", "activation", "GB/s", "copy", "3·n·s bytes", _ELEMENTWISE_SHAPES,
               BENCH_ACTIVATIONS),
        OpSpec("softmax", "softmax_ce", "GB/s", "copy", "2·B·C·s bytes", _ROW_SHAPES),
        OpSpec("log_softmax", "softmax_ce", "GB/s", "copy", "2·B·C·s bytes", _ROW_SHAPES),
        OpSpec("softmax_cross_entropy", "softmax_ce", "GB/s", "copy", "2·B·C·s + 8·B bytes", _ROW_SHAPES),
        OpSpec("sgd_update", "optim", "GB/s", "copy", "5·n·s bytes", _OPTIM_SHAPES),
        OpSpec("adam_update", "optim", "GB/s", "copy", "7·n·s bytes", _OPTIM_SHAPES),
        OpSpec("train_step", "train", "GFLOP/s", "gemm_ref", "6·B·Σ(in·out) flop", _TRAIN_SHAPES),
    )
}

#: Names accepted by ``--ops``: op names, their groups, and ``all``.
OP_GROUPS = tuple(dict.fromkeys(spec.group for spec in OPS.values()))


def work(spec: OpSpec, shape: Shape, itemsize: int) -> float:
    """Work of one call: flop for GFLOP/s kernels, bytes for GB/s kernels (see module docstring)."""
    name, d, s = spec.name, shape.dims, itemsize
    if name == "linear_forward":
        b, i, o = d
        return 2.0 * b * i * o
    if name == "linear_backward":
        b, i, o = d
        return 4.0 * b * i * o
    if name == "train_step":
        sizes, batch = d
        return 6.0 * batch * sum(a * c for a, c in zip(sizes[:-1], sizes[1:]))
    if name == "activation_forward":
        return 2.0 * math.prod(d) * s
    if name == "activation_backward":
        return 3.0 * math.prod(d) * s
    if name in ("softmax", "log_softmax"):
        return 2.0 * math.prod(d) * s
    if name == "softmax_cross_entropy":
        return 2.0 * math.prod(d) * s + 8.0 * d[0]
    if name == "sgd_update":
        return 5.0 * _count(_mlp_param_shapes(d)) * s
    if name == "adam_update":
        return 7.0 * _count(_mlp_param_shapes(d)) * s
    raise ValueError(f"op: unknown {name!r}")  # pragma: no cover


def gemm_dims(spec: OpSpec, shape: Shape, device: str = "cpu") -> tuple[int, int, int]:
    """(M, K, N) of the GEMM that is the limit of a GFLOP/s kernel."""
    if spec.limit == "gemm":
        return tuple(shape.dims)  # type: ignore[return-value]
    return GEMM_REF[device]


# ---------------------------------------------------------------- inputs
def _inputs(spec: OpSpec, variant: str, shape: Shape, dtype: str) -> dict[str, Any]:
    """NumPy inputs of one case, the same for every implementation."""
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)

    def normal(*dims: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(dims) * scale).astype(dt)

    name, d = spec.name, shape.dims
    if spec.group == "linear":
        b, i, o = d
        return {"x": normal(b, i), "W": normal(i, o, scale=1 / math.sqrt(i)), "b": normal(o, scale=0.1),
                "dy": normal(b, o)}
    if spec.group == "activation":
        return {"x": normal(*d), "dy": normal(*d)}
    if spec.group == "softmax_ce":
        b, c = d
        return {"x": normal(b, c, scale=3.0), "labels": rng.integers(0, c, size=b).astype(np.int64)}
    if spec.group == "optim":
        shapes = _mlp_param_shapes(d)
        return {"params": [normal(*s, scale=0.1) for s in shapes],
                "grads": [normal(*s, scale=0.01) for s in shapes],
                "state1": [np.zeros(s, dt) for s in shapes],
                "state2": [np.zeros(s, dt) for s in shapes]}
    if name == "train_step":
        sizes, batch = d
        return {"x": normal(batch, sizes[0]), "labels": rng.integers(0, sizes[-1], size=batch).astype(np.int64)}
    raise ValueError(f"op: unknown {name!r}")  # pragma: no cover


# ---------------------------------------------------------------- nnfast callables
def make_nnfast(backend: Any, spec: OpSpec, variant: str, shape: Shape, dtype: str) -> Callable[[], Any]:
    """A zero-argument callable running one case on an nnfast backend.

    Inputs are converted to the backend's arrays once, here; the callable
    only launches the op (on a GPU it does not wait: the timer synchronises).
    """
    data = _inputs(spec, variant, shape, dtype)
    be = backend
    conv = be.asarray
    name = spec.name
    if name == "linear_forward":
        x, W, b = conv(data["x"]), conv(data["W"]), conv(data["b"])
        return lambda: be.linear_forward(x, W, b, variant)
    if name == "linear_backward":
        x, W, b, dy = conv(data["x"]), conv(data["W"]), conv(data["b"]), conv(data["dy"])
        _, saved = be.linear_forward(x, W, b, variant)
        return lambda: be.linear_backward(dy, x, W, saved, variant, has_bias=True, need_dx=True)
    if name == "activation_forward":
        x = conv(data["x"])
        return lambda: be.activation_forward(x, variant)
    if name == "activation_backward":
        from .backends.base import saves_input

        x, dy = conv(data["x"]), conv(data["dy"])
        saved = x if saves_input(variant) else be.activation_forward(x, variant)
        return lambda: be.activation_backward(dy, saved, variant)
    if name == "softmax":
        x = conv(data["x"])
        return lambda: be.softmax(x)
    if name == "log_softmax":
        x = conv(data["x"])
        return lambda: be.log_softmax(x)
    if name == "softmax_cross_entropy":
        x, labels = conv(data["x"]), conv(data["labels"])
        return lambda: be.softmax_cross_entropy(x, labels)
    if name == "sgd_update":
        p, g, v = ([conv(a) for a in data[k]] for k in ("params", "grads", "state1"))
        return lambda: be.sgd_update(p, g, v, lr=SGD_LR, momentum=SGD_MOMENTUM)
    if name == "adam_update":
        p, g, m, v = ([conv(a) for a in data[k]] for k in ("params", "grads", "state1", "state2"))
        return lambda: be.adam_update(p, g, m, v, step=ADAM_STEP, lr=ADAM_LR)
    if name == "train_step":
        return _make_nnfast_train_step(be, shape, dtype, data)
    raise ValueError(f"op: unknown {name!r}")  # pragma: no cover


class LayerAPIMissing(RuntimeError):
    """The layer API (``nnfast.MLP``, ``SGD``, ...) is not in this build."""


def _make_nnfast_train_step(backend: Any, shape: Shape, dtype: str, data: dict[str, Any]) -> Callable[[], Any]:
    import nnfast as nf

    missing = [n for n in ("MLP", "SoftmaxCrossEntropy", "SGD", "use_backend") if not hasattr(nf, n)]
    if missing:
        raise LayerAPIMissing(f"nnfast has no {', '.join(missing)}")
    sizes, _ = shape.dims
    with nf.use_backend(backend.name):
        model = nf.MLP(list(sizes), activation="relu", dtype=dtype, seed=0)
        loss_fn = nf.SoftmaxCrossEntropy()
        opt = nf.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
        x, labels = backend.asarray(data["x"]), backend.asarray(data["labels"])

    def step() -> Any:  # layers keep the backend they were built on
        opt.zero_grad()
        logits = model.forward(x)
        loss, dlogits = loss_fn(logits, labels)
        model.backward(dlogits)
        opt.step()
        return loss

    return step


# ---------------------------------------------------------------- PyTorch callables
_TORCH_DTYPES = {"float32": "float32", "float64": "float64"}


def make_torch(torch: Any, device: str, spec: OpSpec, variant: str, shape: Shape,
               dtype: str) -> Callable[[], Any]:
    """The PyTorch equivalent of one case (eager mode, the primitives autograd itself calls)."""
    import torch.nn.functional as F

    data = _inputs(spec, variant, shape, dtype)
    tdt = getattr(torch, _TORCH_DTYPES[dtype])

    def conv(a: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    aten = torch.ops.aten
    forward = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh, "identity": lambda t: t}
    # backward primitives: (function, takes the input (True) or the output (False))
    backward = {
        "relu": (lambda dy, y: aten.threshold_backward(dy, y, 0.0), False),
        "gelu": (lambda dy, x: aten.gelu_backward(dy, x), True),
        "tanh": (lambda dy, y: aten.tanh_backward(dy, y), False),
        "identity": (lambda dy, y: dy, False),
    }
    name = spec.name
    if name == "linear_forward":
        x, W, b = conv(data["x"]), conv(data["W"]), conv(data["b"])
        act = forward[variant]
        return lambda: act(torch.addmm(b, x, W))
    if name == "linear_backward":
        x, W, b, dy = conv(data["x"]), conv(data["W"]), conv(data["b"]), conv(data["dy"])
        z = torch.addmm(b, x, W)
        bwd, takes_input = backward[variant]
        saved = z if takes_input else forward[variant](z)

        def linear_backward() -> Any:
            dz = bwd(dy, saved)
            return dz @ W.t(), x.t() @ dz, dz.sum(0)

        return linear_backward
    if name == "activation_forward":
        x = conv(data["x"])
        act = forward[variant]
        return lambda: act(x)
    if name == "activation_backward":
        x, dy = conv(data["x"]), conv(data["dy"])
        bwd, takes_input = backward[variant]
        saved = x if takes_input else forward[variant](x)
        return lambda: bwd(dy, saved)
    if name == "softmax":
        x = conv(data["x"])
        return lambda: torch.softmax(x, dim=-1)
    if name == "log_softmax":
        x = conv(data["x"])
        return lambda: torch.log_softmax(x, dim=-1)
    if name == "softmax_cross_entropy":
        x, labels = conv(data["x"]).requires_grad_(True), conv(data["labels"])

        def cross_entropy() -> Any:
            loss = F.cross_entropy(x, labels)
            (grad,) = torch.autograd.grad(loss, x)
            return loss, grad

        return cross_entropy
    if name in ("sgd_update", "adam_update"):
        params = [torch.nn.Parameter(conv(a)) for a in data["params"]]
        for p, g in zip(params, data["grads"]):
            p.grad = conv(g)
        if name == "sgd_update":
            opt = torch.optim.SGD(params, lr=SGD_LR, momentum=SGD_MOMENTUM)
        else:
            opt = torch.optim.Adam(params, lr=ADAM_LR)
        opt.step()  # creates the state, as nnfast's kernels are handed theirs
        return opt.step
    if name == "train_step":
        sizes, _ = shape.dims
        torch.manual_seed(0)
        layers: list[Any] = []
        for i, (a, c) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, c))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*layers).to(device=device, dtype=tdt)
        opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
        x, labels = conv(data["x"]), conv(data["labels"])

        def train_step() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            return loss

        return train_step
    raise ValueError(f"op: unknown {name!r}")  # pragma: no cover


# ---------------------------------------------------------------- limits
def make_gemm(xp: Any, dims: tuple[int, int, int], dtype: str) -> Callable[[], Any]:
    """``A @ B`` with A (M, K), B (K, N) in the array module ``xp`` (NumPy/BLAS or CuPy/cuBLAS)."""
    m, k, n = dims
    rng = np.random.default_rng(1)
    a = xp.asarray(rng.standard_normal((m, k)).astype(dtype))
    b = xp.asarray(rng.standard_normal((k, n)).astype(dtype))
    out = xp.empty((m, n), dtype=dtype)
    return lambda: xp.matmul(a, b, out=out)


def make_copy(xp: Any, nbytes: int) -> Callable[[], Any]:
    """A large copy between two preallocated arrays (host memory, or device memory on a GPU)."""
    src = xp.ones(nbytes // 4, dtype=np.float32)
    dst = xp.empty_like(src)
    return lambda: xp.copyto(dst, src)


# ---------------------------------------------------------------- timing
class Clock:
    """Times calls of a callable: wall clock on the CPU."""

    device = "cpu"

    def sync(self) -> None:
        """Wait for queued work (nothing to wait for on the CPU)."""

    def time(self, fn: Callable[[], Any], number: int) -> float:
        """Seconds per call, averaged over ``number`` back-to-back calls."""
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number


class CupyClock(Clock):
    """Times GPU work with CUDA events on the current stream."""

    device = "gpu"

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy

    def sync(self) -> None:
        self.cupy.cuda.runtime.deviceSynchronize()

    def time(self, fn: Callable[[], Any], number: int) -> float:
        cp = self.cupy
        start, end = cp.cuda.Event(), cp.cuda.Event()
        self.sync()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3 / number


class TorchCudaClock(Clock):
    """Times PyTorch CUDA work with CUDA events."""

    device = "gpu"

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any], number: int) -> float:
        cuda = self.torch.cuda
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        self.sync()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number


@dataclass
class Settings:
    """How long to measure: warm-up, samples, rounds and the minimum duration of a sample."""

    repeat: int = 10  # samples per implementation and case
    rounds: int = 5  # the samples are taken in this many rounds over the implementations
    min_time: float = 0.02  # seconds per sample, at least
    warmup_time: float = 0.1  # seconds of warm-up after the first call
    switch_time: float = 0.05  # seconds of untimed calls before each implementation's block of samples
    max_time: float = 3.0  # seconds of samples per implementation and case, at most (>= 3 samples)


QUICK = Settings(repeat=3, rounds=1, min_time=0.002, warmup_time=0.001, switch_time=0.002, max_time=0.5)
FULL = Settings()


@dataclass
class Timed:
    """One implementation of a case, being measured."""

    key: str
    fn: Callable[[], Any]
    clock: Clock
    number: int = 1
    repeat: int = 1
    samples: list[float] = field(default_factory=list)


def _warm(t: Timed, seconds: float, calls: int) -> float:
    """Untimed calls (at least ``calls``, for at least ``seconds``); the last call's duration."""
    t0 = time.perf_counter()
    done = 0
    single = 0.0
    while True:
        single = t.clock.time(t.fn, 1)
        done += 1
        if done >= calls and time.perf_counter() - t0 >= seconds:
            return single


def _prepare(t: Timed, settings: Settings) -> None:
    """First call (compilation, allocation), warm-up, then calibrate the calls per sample."""
    t.fn()
    t.clock.sync()
    # at least 3 calls: libraries initialise lazily, and that is not kernel time
    single = max(_warm(t, settings.warmup_time, 3), 1e-7)
    t.number = max(1, int(math.ceil(settings.min_time / single)))
    per_sample = single * t.number
    t.repeat = max(3, min(settings.repeat, int(settings.max_time / per_sample)))


def measure(timed: list[Timed], settings: Settings) -> None:
    """Sample every implementation side by side.

    The samples are taken in ``rounds`` rounds; in each round every
    implementation gets a block of samples, the order reversing from one
    round to the next, so that a load that comes and goes on a shared machine
    falls on all of them alike. Each block starts with untimed calls: thread
    pools of different libraries (BLAS, OpenMP, Numba's) spin for a while
    after their work, and the first calls after a switch of library pay for
    that, which is not the kernel's time.
    """
    for t in timed:
        _prepare(t, settings)
    rounds = max(1, settings.rounds)
    order = list(timed)
    for r in range(rounds):
        for t in order:
            quota = math.ceil(t.repeat * (r + 1) / rounds) - math.ceil(t.repeat * r / rounds)
            if quota <= 0:
                continue
            if r or len(timed) > 1:
                _warm(t, settings.switch_time, 1)
            for _ in range(quota):
                t.samples.append(t.clock.time(t.fn, t.number))
        order.reverse()


def _figures(t: Timed, amount: float) -> dict[str, Any]:
    median = statistics.median(t.samples)
    return {
        "median_s": median,
        "min_s": min(t.samples),
        "samples": len(t.samples),
        "calls_per_sample": t.number,
        "rate": amount / median / 1e9,
    }


# ---------------------------------------------------------------- machine info
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    try:
        cores = set()
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
            if core is not None:
                cores.add((phys, core))
        return len(cores) or None
    except OSError:
        return None


def _load_average() -> float | None:
    """The 1-minute load average, where the OS reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info(torch: Any = None, gpu: bool = False) -> dict[str, Any]:
    """CPU, cores, threads, GPU and library versions of this run."""
    import nnfast

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"nnfast": getattr(nnfast, "__version__", None), "numpy": np.__version__},
        "threads": {},
        "env": {k: os.environ[k] for k in ("NNFAST_NUM_THREADS", "NNFAST_BACKEND", "OMP_NUM_THREADS",
                                            "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
                if k in os.environ},
        "gpu": None,
    }
    load = _load_average()
    if load is not None:
        info["load_average_1min"] = round(load, 2)
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}".strip()
    except Exception:
        info["blas"] = None
    try:
        from threadpoolctl import threadpool_info

        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            info["threads"]["blas"] = pools[0].get("num_threads")
    except Exception:
        pass
    if "numba" in sys.modules:
        import numba

        info["versions"]["numba"] = numba.__version__
        info["threads"]["numba"] = numba.get_num_threads()
    elif _version("numba"):
        info["versions"]["numba"] = _version("numba")
    if torch is not None:
        info["versions"]["torch"] = torch.__version__
        info["threads"]["torch"] = torch.get_num_threads()
    if "cupy" in sys.modules:
        import cupy

        info["versions"]["cupy"] = cupy.__version__
        if gpu:
            try:
                props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
                name = props["name"]
                info["gpu"] = {
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                    "multiprocessors": props.get("multiProcessorCount"),
                    "compute_capability": f"{props.get('major')}.{props.get('minor')}",
                    "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                    "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
                }
            except Exception as err:  # pragma: no cover - GPU only
                info["gpu"] = {"name": f"unknown ({err})"}
    return info


# ---------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nnfast bench`` options to ``parser`` (destinations are prefixed ``bench_``)."""
    ops = ", ".join(list(OPS) + list(OP_GROUPS))
    parser.add_argument("--backend", dest="bench_backend", action="append", metavar="NAME",
                        help="backend(s) to measure, repeatable or comma-separated (default: every "
                             "available one); numpy, the reference, is always measured")
    parser.add_argument("--ops", dest="bench_ops", action="append", metavar="OPS",
                        help=f"kernels to measure, comma-separated op or group names (default: all): {ops}")
    parser.add_argument("--dtype", dest="bench_dtype", default="float32", metavar="DTYPE",
                        help="float32 (default), float64, or both (comma-separated or 'all')")
    parser.add_argument("--quick", dest="bench_quick", action="store_true",
                        help="small shapes and few samples: a run of seconds (a smoke check, not a measurement)")
    parser.add_argument("--repeat", dest="bench_repeat", type=int, default=None, metavar="N",
                        help=f"samples per implementation and case (default {FULL.repeat}, "
                             f"{QUICK.repeat} with --quick)")
    parser.add_argument("--threads", dest="bench_threads", type=int, default=None, metavar="N",
                        help="run every library (BLAS, Numba, PyTorch) on N threads (default: as configured); "
                             "on a busy shared machine, 1 gives steadier ratios")
    parser.add_argument("--no-torch", dest="bench_no_torch", action="store_true",
                        help="leave PyTorch out even when it imports")
    parser.add_argument("--json", dest="bench_json", metavar="PATH", help="write the full report as JSON")
    parser.add_argument("--markdown", dest="bench_markdown", metavar="PATH", help="write the tables as Markdown")
    parser.add_argument("--plot", dest="bench_plot", metavar="PATH",
                        help="write PNG charts of speedup and fraction of the limit (needs matplotlib)")
    parser.add_argument("--no-progress", dest="bench_no_progress", action="store_true",
                        help="no progress bar")


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [p.strip().lower() for p in v.split(",") if p.strip()]
    return out


def _select_ops(tokens: list[str]) -> list[OpSpec]:
    if not tokens or "all" in tokens:
        return list(OPS.values())
    unknown = [t for t in tokens if t not in OPS and t not in OP_GROUPS]
    if unknown:
        raise ValueError(f"--ops: unknown {', '.join(map(repr, unknown))}; valid choices are "
                         f"{', '.join(list(OPS) + list(OP_GROUPS))}, all")
    return [spec for spec in OPS.values() if spec.name in tokens or spec.group in tokens]


def _select_dtypes(value: str) -> list[str]:
    tokens = _split([value])
    if "all" in tokens or "both" in tokens:
        return list(DTYPES)
    bad = [t for t in tokens if t not in DTYPES]
    if bad or not tokens:
        raise ValueError(f"--dtype: expected float32, float64 or all, got {value!r}")
    return list(dict.fromkeys(tokens))


def _import_torch() -> Any:
    try:
        import torch
    except Exception:
        return None
    return torch


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed; install it with "
                           "'pip install matplotlib' (or the 'bench' extra), or leave --plot out") from None


# ---------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from :func:`add_arguments`); return an exit code."""
    from .backends import BACKEND_NAMES, available_backends, backend_for
    from .errors import BackendError

    try:
        specs = _select_ops(_split(getattr(args, "bench_ops", None)))
        dtypes = _select_dtypes(getattr(args, "bench_dtype", "float32") or "float32")
        requested = _split(getattr(args, "bench_backend", None))
        bad = [b for b in requested if b not in BACKEND_NAMES]
        if bad:
            raise ValueError(f"--backend: unknown {', '.join(map(repr, bad))}; valid choices are "
                             f"{', '.join(BACKEND_NAMES)}")
        repeat = getattr(args, "bench_repeat", None)
        if repeat is not None and repeat < 1:
            raise ValueError(f"--repeat: expected a positive integer, got {repeat}")
        threads = getattr(args, "bench_threads", None)
        if threads is not None and threads < 1:
            raise ValueError(f"--threads: expected a positive integer, got {threads}")
        _outputs(args)
        if getattr(args, "bench_plot", None):
            _check_matplotlib()
    except (ValueError, RuntimeError, OSError) as err:
        print(f"nnfast bench: error: {err}", file=sys.stderr)
        return 2

    quick = bool(getattr(args, "bench_quick", False))
    settings = Settings(**vars(QUICK if quick else FULL))
    if repeat is not None:
        settings.repeat = repeat
    notes: list[str] = []

    # Backends: numpy (the reference) always, then what was asked for or is available.
    names = ["numpy"] + [b for b in (requested or available_backends()) if b != "numpy"]
    names = list(dict.fromkeys(names))
    backends: dict[str, Any] = {}
    for name in names:
        try:
            backends[name] = backend_for(name)
        except BackendError as err:
            notes.append(f"backend {name} skipped: {err}")
    gpu = any(getattr(be, "xp", np) is not np for be in backends.values())

    torch = None if getattr(args, "bench_no_torch", False) else _import_torch()
    torch_devices: list[str] = []
    if torch is not None:
        if any(getattr(be, "xp", np) is np for be in backends.values()):
            torch_devices.append("cpu")
        if gpu and torch.cuda.is_available():
            torch_devices.append("cuda")
    elif not getattr(args, "bench_no_torch", False):
        notes.append("PyTorch does not import here: no torch column")

    cases = [(spec, variant, shape)
             for spec in specs for variant in spec.variants for shape in spec.shapes
             if not quick or shape.size == "small"]

    load = _load_average()
    cpus = os.cpu_count() or 1
    if load is not None and load > 0.5 * cpus:
        hint = "" if threads == 1 else ", multi-threaded ones most; --threads 1 gives steadier ratios"
        notes.append(f"the machine is busy (load average {load:.1f} on {cpus} CPUs): figures will be noisy{hint}")

    restore = ThreadLimits(threads, torch, notes) if threads is not None else None
    try:
        return _run_cases(args, cases, specs, dtypes, quick, settings, backends, gpu, torch, torch_devices, notes)
    finally:
        if restore is not None:
            restore.undo()


def _run_cases(args: argparse.Namespace, cases: list[tuple[OpSpec, str, Shape]], specs: list[OpSpec],
               dtypes: list[str], quick: bool, settings: Settings, backends: dict[str, Any], gpu: bool,
               torch: Any, torch_devices: list[str], notes: list[str]) -> int:
    from tqdm.auto import tqdm

    progress = tqdm(total=len(cases) * len(dtypes) + 1, desc="nnfast bench", unit="case",
                    disable=True if getattr(args, "bench_no_progress", False) else None,
                    file=sys.stderr, dynamic_ncols=True)
    progress.set_postfix_str("machine limits")
    limits = measure_limits(dtypes, gpu, settings)
    progress.update(1)

    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    errors: list[dict[str, str]] = []
    for dtype in dtypes:
        for spec, variant, shape in cases:
            progress.set_postfix_str(f"{dtype} {spec.name} {variant} {shape.label}".replace("  ", " "))
            row = measure_case(spec, variant, shape, dtype, backends, torch, torch_devices, settings,
                               limits, skipped, errors)
            if row is not None:
                results.append(row)
            progress.update(1)
    progress.close()

    report = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": " ".join(["nnfast bench", *_argv_of(args)]),
        "machine": machine_info(torch, gpu),
        "settings": {"quick": quick, "threads": getattr(args, "bench_threads", None) or "default",
                     "dtypes": dtypes, "backends": list(backends), "torch": torch_devices,
                     "ops": [s.name for s in specs], "repeat": settings.repeat, "min_time_s": settings.min_time,
                     "warmup_s": settings.warmup_time, "statistic": "median"},
        "models": {spec.name: {"metric": spec.metric, "work": spec.model, "limit": spec.limit} for spec in specs},
        "limits": limits,
        "results": results,
        "skipped": skipped,
        "errors": errors,
        "notes": notes,
    }

    print(render_text(report))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for s in skipped:
        print(f"skipped: {s['impl']} {s['case']}: {s['reason']}", file=sys.stderr)
    for e in errors:
        print(f"error: {e['impl']} {e['case']}: {e['reason']}", file=sys.stderr)

    try:
        for what, path, write in _outputs(args):  # checked before measuring, and again now
            write(report, path)
            print(f"wrote the {what} to {path.resolve()}")
    except OSError as err:
        print(f"nnfast bench: error: {f'cannot write {err.filename}: {err.strerror}' if err.filename else err}",
              file=sys.stderr)
        return 2
    return 1 if errors else 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` as command-line words, for the report."""
    out: list[str] = []
    for flag, dest in (("--backend", "bench_backend"), ("--ops", "bench_ops")):
        values = _split(getattr(args, dest, None))
        if values:
            out += [flag, ",".join(values)]
    if getattr(args, "bench_dtype", "float32") not in (None, "float32"):
        out += ["--dtype", args.bench_dtype]
    for flag, dest in (("--quick", "bench_quick"), ("--no-torch", "bench_no_torch")):
        if getattr(args, dest, False):
            out.append(flag)
    for flag, dest in (("--repeat", "bench_repeat"), ("--threads", "bench_threads")):
        if getattr(args, dest, None):
            out += [flag, str(getattr(args, dest))]
    return out


class ThreadLimits:
    """``--threads N``: cap BLAS (threadpoolctl), Numba and PyTorch at N threads; ``undo`` restores."""

    def __init__(self, n: int, torch: Any, notes: list[str]) -> None:
        self._undo: list[Callable[[], None]] = []
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=n, user_api="blas")
            self._undo.append(limiter.restore_original_limits)
        except ImportError:
            notes.append("--threads: threadpoolctl is not installed, BLAS threads left as they are")
        if "numba" in sys.modules or _version("numba"):
            try:
                import numba

                before = numba.get_num_threads()
                numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
                self._undo.append(lambda: numba.set_num_threads(before))
            except Exception as err:  # pragma: no cover - a broken Numba install
                notes.append(f"--threads: Numba threads left as they are ({err})")
        if torch is not None:
            before_torch = torch.get_num_threads()
            torch.set_num_threads(n)
            self._undo.append(lambda: torch.set_num_threads(before_torch))

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()


def _outputs(args: argparse.Namespace) -> list[tuple[str, Path, Callable[[dict[str, Any], Path], None]]]:
    """``(what, path, writer)`` of each file asked for; raises (naming the flag) where one cannot be written."""
    asked = (("JSON report", "--json", "bench_json",
              lambda report, path: _write(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")),
             ("Markdown tables", "--markdown", "bench_markdown",
              lambda report, path: _write(path, render_markdown(report))),
             ("plot", "--plot", "bench_plot", plot))
    return [(what, check_output_path(getattr(args, dest), flag), write) for what, flag, dest, write in asked
            if getattr(args, dest, None)]


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def measure_limits(dtypes: Sequence[str], gpu: bool, settings: Settings) -> dict[str, Any]:
    """The machine's GEMM (1024³, per dtype) and memory-copy rates, measured now."""
    limits: dict[str, Any] = {}
    devices = [("cpu", np, Clock(), CPU_COPY_BYTES)]
    if gpu:
        import cupy

        devices.append(("gpu", cupy, CupyClock(), GPU_COPY_BYTES))
    for device, xp, clock, nbytes in devices:
        copy = Timed("copy", make_copy(xp, nbytes), clock)
        ref = GEMM_REF[device]
        gemms = {dt: Timed(f"gemm {dt}", make_gemm(xp, ref, dt), clock) for dt in dtypes}
        measure([copy, *gemms.values()], settings)
        what = "numpy.copyto" if device == "cpu" else "cupy.copyto (device to device)"
        limits[device] = {
            "copy": {"what": f"{what}, {nbytes // 2**20} MiB, read + write", "bytes": 2 * nbytes,
                     **_figures(copy, 2.0 * nbytes)},
            "gemm": {dt: {"what": f"{'numpy' if device == 'cpu' else 'cupy'}.matmul "
                                  f"{'×'.join(map(str, ref))} {dt}",
                          "flop": 2.0 * math.prod(ref), **_figures(t, 2.0 * math.prod(ref))}
                     for dt, t in gemms.items()},
        }
    return limits


def _case_name(spec: OpSpec, variant: str, shape: Shape, dtype: str) -> str:
    return f"{spec.name}{'[' + variant + ']' if variant else ''} {shape.label} {dtype}"


def measure_case(spec: OpSpec, variant: str, shape: Shape, dtype: str, backends: dict[str, Any],
                 torch: Any, torch_devices: list[str], settings: Settings, limits: dict[str, Any],
                 skipped: list[dict[str, str]], errors: list[dict[str, str]]) -> dict[str, Any] | None:
    """Measure one case on every implementation side by side; the report row, or None."""
    case = _case_name(spec, variant, shape, dtype)
    timed: list[Timed] = []
    kinds: dict[str, tuple[str, str]] = {}  # key -> (kind, device)

    def add(key: str, kind: str, device: str, build: Callable[[], Callable[[], Any]], clock: Clock) -> None:
        try:
            fn = build()
            fn()
            clock.sync()
        except (NotImplementedError, LayerAPIMissing) as err:
            skipped.append({"impl": key, "case": case, "reason": f"not implemented: {err}".rstrip(": ")})
            return
        except Exception as err:
            errors.append({"impl": key, "case": case, "reason": f"{type(err).__name__}: {err}"})
            return
        timed.append(Timed(key, fn, clock))
        kinds[key] = (kind, device)

    gpu_clock = None
    for name, be in backends.items():
        on_gpu = getattr(be, "xp", np) is not np
        if on_gpu and gpu_clock is None:
            gpu_clock = CupyClock()
        add(name, "nnfast", "gpu" if on_gpu else "cpu",
            lambda be=be: make_nnfast(be, spec, variant, shape, dtype), gpu_clock if on_gpu else Clock())
    for device in torch_devices:
        key = "torch" if device == "cpu" else "torch-cuda"
        add(key, "torch", "gpu" if device == "cuda" else "cpu",
            lambda device=device: make_torch(torch, device, spec, variant, shape, dtype),
            TorchCudaClock(torch) if device == "cuda" else Clock())
    if not any(kinds[t.key][0] == "nnfast" for t in timed):
        return None
    # The machine limit of this kernel, measured side by side with it on each device in the row.
    limit_keys: dict[str, tuple[str, str, float]] = {}  # device -> (key, what, work of one call)
    for device in sorted({kinds[t.key][1] for t in timed}):
        if device == "gpu":
            import cupy

            xp, clock, lib, nbytes = cupy, gpu_clock or CupyClock(), "cupy", GPU_COPY_BYTES
        else:
            xp, clock, lib, nbytes = np, Clock(), "numpy", CPU_COPY_BYTES
        key = f"limit-{device}"
        if spec.metric == "GFLOP/s":
            m, k, n = gemm_dims(spec, shape, device)
            limit_keys[device] = (key, f"{lib}.matmul {m}×{k}×{n} {dtype}", 2.0 * m * k * n)
            add(key, "limit", device, lambda xp=xp, dims=(m, k, n): make_gemm(xp, dims, dtype), clock)
        else:
            where = "" if device == "cpu" else ", device to device"
            limit_keys[device] = (key, f"{lib}.copyto {nbytes // 2**20} MiB{where}, read + write", 2.0 * nbytes)
            add(key, "limit", device, lambda xp=xp, nbytes=nbytes: make_copy(xp, nbytes), clock)

    try:
        measure(timed, settings)
    except Exception as err:  # a kernel that fails after its first call
        errors.append({"impl": "?", "case": case, "reason": f"{type(err).__name__}: {err}"})
        return None

    itemsize = np.dtype(dtype).itemsize
    amount = work(spec, shape, itemsize)
    by_key = {t.key: t for t in timed}

    row_limits: dict[str, Any] = {}
    for device, (key, what, limit_work) in limit_keys.items():
        if key in by_key:
            row_limits[device] = {"what": what, **_figures(by_key[key], limit_work)}
        elif device in limits:  # the limit's own measurement failed: the run-level figure
            ref = limits[device]["copy"] if spec.metric == "GB/s" else limits[device]["gemm"][dtype]
            row_limits[device] = {"what": ref["what"], "rate": ref["rate"]}

    impls: dict[str, Any] = {}
    for t in timed:
        kind, device = kinds[t.key]
        if kind == "limit":
            continue
        fig = {"kind": kind, "device": device, **_figures(t, amount)}
        if device in row_limits:
            fig["limit_fraction"] = fig["rate"] / row_limits[device]["rate"]
        impls[t.key] = fig
    ref = impls.get("numpy")
    for fig in impls.values():
        if ref is not None:
            fig["speedup_vs_numpy"] = ref["median_s"] / fig["median_s"]
        torch_key = "torch" if fig["device"] == "cpu" else "torch-cuda"
        if torch_key in impls and fig["kind"] == "nnfast":
            fig["speedup_vs_torch"] = impls[torch_key]["median_s"] / fig["median_s"]

    if spec.name == "train_step":
        dims: Any = {"sizes": list(shape.dims[0]), "batch": shape.dims[1]}
    elif spec.group == "optim":
        dims = {"sizes": list(shape.dims), "params": _count(_mlp_param_shapes(shape.dims))}
    else:
        dims = list(shape.dims)
    return {
        "op": spec.name,
        "group": spec.group,
        "variant": variant,
        "size": shape.size,
        "shape": dims,
        "label": shape.label,
        "dtype": dtype,
        "metric": spec.metric,
        "work": amount,
        "model": spec.model,
        "limits": row_limits,
        "impls": impls,
    }


# ---------------------------------------------------------------- rendering
def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt_rate(rate: float, metric: str) -> str:
    unit = "GF/s" if metric == "GFLOP/s" else "GB/s"
    if rate >= 100:
        return f"{rate:.0f} {unit}"
    if rate >= 10:
        return f"{rate:.1f} {unit}"
    return f"{rate:.2f} {unit}"


def _fmt_percent(fraction: float) -> str:
    percent = fraction * 100
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


def _limit_cell(device: str, limit: dict[str, Any]) -> str:
    """Short text of a row's limit: 'GEMM 132 GF/s' or 'copy 26.2 GB/s' (GPU prefixed)."""
    prefix = "GPU " if device == "gpu" else ""
    if "matmul" in limit["what"]:
        return f"{prefix}GEMM {_fmt_rate(limit['rate'], 'GFLOP/s')}"
    return f"{prefix}copy {_fmt_rate(limit['rate'], 'GB/s')}"


def _impl_order(report: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for row in report["results"]:
        for key in row["impls"]:
            seen.setdefault(key, None)
    nnfast_keys = [k for k in report["settings"]["backends"] if k in seen]
    others = [k for k in seen if k not in nnfast_keys]
    return nnfast_keys + others


def table(report: dict[str, Any], rows: list[dict[str, Any]], train: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one table (kernel rows or training-step rows)."""
    order = [k for k in _impl_order(report) if any(k in r["impls"] for r in rows)]
    fast = [k for k in order if k != "numpy" and any(r["impls"].get(k, {}).get("kind") == "nnfast" for r in rows)]
    has_torch = [k for k in order if k.startswith("torch")]
    nnfast_keys = [k for k in order if not k.startswith("torch")]
    header = ["MLP (SGD)" if train else "kernel", "shape" if not train else "batch", "dtype"]
    header += [f"{k} ms/step" if train else k for k in order]
    header += [f"{k} vs numpy" for k in fast]
    if has_torch:
        header += [f"{k} vs torch" for k in fast]
    header += [f"{k} % limit" for k in nnfast_keys]
    header.append("limit")
    cells: list[list[str]] = []
    for r in rows:
        if train:
            line = [_mlp_label(r["shape"]["sizes"]), str(r["shape"]["batch"]), r["dtype"]]
        else:
            name = r["op"] + (f" {r['variant']}" if r["variant"] else "")
            line = [name, r["label"], r["dtype"]]
        for k in order:
            f = r["impls"].get(k)
            if f is None:
                line.append("–")
            elif train:
                line.append(f"{f['median_s'] * 1e3:.3g}")
            else:
                line.append(f"{_fmt_time(f['median_s'])} · {_fmt_rate(f['rate'], r['metric'])}")
        for k in fast:
            f = r["impls"].get(k, {})
            line.append(f"{f['speedup_vs_numpy']:.2f}×" if "speedup_vs_numpy" in f else "–")
        if has_torch:
            for k in fast:
                f = r["impls"].get(k, {})
                line.append(f"{f['speedup_vs_torch']:.2f}×" if "speedup_vs_torch" in f else "–")
        for k in nnfast_keys:
            f = r["impls"].get(k, {})
            line.append(_fmt_percent(f["limit_fraction"]) if "limit_fraction" in f else "–")
        line.append("; ".join(_limit_cell(device, v) for device, v in r["limits"].items()) or "–")
        cells.append(line)
    return header, cells


def _sections(report: dict[str, Any], rows: list[dict[str, Any]] | None = None,
              ) -> list[tuple[str, bool, list[dict[str, Any]]]]:
    rows = report["results"] if rows is None else rows
    kernels = [r for r in rows if r["op"] != "train_step"]
    train = [r for r in rows if r["op"] == "train_step"]
    out = []
    if kernels:
        out.append(("Kernels", False, kernels))
    if train:
        out.append((f"Training step: MLP, ReLU, softmax-CE, SGD (lr {SGD_LR}, momentum {SGD_MOMENTUM})",
                    True, train))
    return out


def machine_line(report: dict[str, Any]) -> str:
    """One line naming the machine, threads and versions of a report."""
    m = report["machine"]
    threads = ", ".join(f"{k} {v}" for k, v in m.get("threads", {}).items())
    cores = m.get("physical_cores") or m.get("logical_cpus")
    parts = [f"{m['cpu']} ({cores} cores, {m.get('logical_cpus')} logical)"]
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu'].get('name')}")
    if threads:
        parts.append(f"threads: {threads}")
    parts.append(", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v))
    return " · ".join(parts)


def limits_line(report: dict[str, Any]) -> str:
    """One line with the machine limits measured in the run."""
    parts = []
    for device, lim in report["limits"].items():
        gemm = "; ".join(f"{v['what']} {v['rate']:.0f} GFLOP/s" for v in lim["gemm"].values())
        parts.append(f"{device.upper()}: {gemm}; {lim['copy']['what']} {lim['copy']['rate']:.1f} GB/s")
    return " · ".join(parts)


def render_text(report: dict[str, Any]) -> str:
    """The report as aligned plain-text tables."""
    out = [f"nnfast bench · {report['created']}", machine_line(report), "limits: " + limits_line(report),
           "times are medians; 'vs' columns are speedups measured side by side in this run"]
    for title, train, rows in _sections(report):
        header, cells = table(report, rows, train)
        widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(len(header))]
        out += ["", title, "  ".join(h.ljust(w) for h, w in zip(header, widths)),
                "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(out)


def render_markdown(report: dict[str, Any], heading_level: int = 3,
                    rows: list[dict[str, Any]] | None = None) -> str:
    """The report (or the given ``rows`` of it) as Markdown tables, with machine, limits and work models."""
    h = "#" * heading_level
    load = report["machine"].get("load_average_1min")
    busy = f" (1-minute load average at the start: {load:.1f})" if load is not None else ""
    out = [f"Measured {report['created'][:10]} on {machine_line(report)}{busy}.", "",
           f"Machine limits measured in the same run: {limits_line(report)}.", "",
           "Times are medians after warm-up; speedups are measured side by side in the same run; "
           "'% limit' is the rate over the GEMM (GFLOP/s kernels) or memory-copy (GB/s kernels) rate.", ""]
    for title, train, section_rows in _sections(report, rows):
        header, cells = table(report, section_rows, train)
        out += [f"{h} {title}", "", "| " + " | ".join(header) + " |",
                "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in cells]
        out.append("")
    models = report.get("models", {})
    if models:
        out.append("Work models: " + "; ".join(f"{k} {v['work']}" for k, v in models.items())
                   + " (s = bytes per element).")
        out.append("")
    out.append(f"Reproduce: `{report['command']}`")
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """PNG charts, one bar per case and implementation: speedup over NumPy, fraction of the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['op']}{' ' + r['variant'] if r['variant'] else ''} {r['label']} {r['dtype']}" for r in rows]
    keys = _impl_order(report)
    fast = [k for k in keys if k != "numpy"]
    height = max(4.0, 0.16 * len(rows) * max(1, len(keys)) + 1.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, height), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, chart_keys, field_name in ((left, fast, "speedup_vs_numpy"), (right, keys, "limit_fraction")):
        width = 0.8 / max(1, len(chart_keys))
        for j, key in enumerate(chart_keys):
            ys = [i + (j - (len(chart_keys) - 1) / 2) * width for i in range(len(rows))]
            values = [r["impls"].get(key, {}).get(field_name, 0.0) for r in rows]
            ax.barh(ys, values, width, label=key, color=colors[keys.index(key) % len(colors)])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right")
    left.set_xscale("log")
    left.set_xlabel("speedup over the NumPy reference (×, log scale)")
    right.set_xlabel("fraction of the machine limit (GEMM or memory copy)")
    left.set_yticks(range(len(rows)))
    left.set_yticklabels(labels, fontsize=7)
    left.invert_yaxis()
    fig.suptitle(f"nnfast bench · {report['created'][:10]} · {machine_line(report)}", fontsize=8)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.4 / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nnfast.bench``: the same as ``nnfast bench``."""
    parser = argparse.ArgumentParser(prog="nnfast bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
