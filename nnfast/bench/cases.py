"""The benchmark cases: every op of the op table that declares a benchmark, and a whole training step.

A case family (:class:`OpSpec`) is an op's :class:`~nnfast.op_spec.Benchmark`
row under the op's name: its shapes, work model, inputs and PyTorch
equivalent come from :mod:`nnfast.ops`. Running a case on an nnfast backend
is calling the op's public method with those inputs; running it in PyTorch is
calling the row's equivalent. The one case that is not an op, a whole
training step of an MLP (forward, softmax cross-entropy, backward, SGD), is
declared here the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..op_spec import Benchmark, Shape
from ..ops import OPS as _OP_TABLE
from ..ops import SGD_LR, SGD_MOMENTUM, mlp_param_shapes

#: The reference GEMM (M, K, N) of each device: the machine's GEMM rate, and the limit of the training step.
GEMM_REF = {"cpu": (1024, 1024, 1024), "gpu": (4096, 4096, 4096)}

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class OpSpec:
    """One case family: a name and its benchmark declaration."""

    name: str
    bench: Benchmark

    group = property(lambda self: self.bench.group)
    metric = property(lambda self: self.bench.metric)
    limit = property(lambda self: self.bench.limit)  # "gemm" (at the shape), "gemm_ref" or "copy"
    model = property(lambda self: self.bench.model)
    shapes = property(lambda self: self.bench.shapes)
    variants = property(lambda self: self.bench.variants)
    streams = property(lambda self: self.bench.streams)


# ---------------------------------------------------------------- the training step
def _mlp_label(sizes: Sequence[int]) -> str:
    return "[" + ",".join(str(s) for s in sizes) + "]"


TRAIN_SHAPES = tuple(Shape(size, (sizes, batch), f"{_mlp_label(sizes)} b{batch}") for size, sizes, batch in (
    ("small", (64, 128, 10), 64), ("medium", (784, 512, 512, 10), 1024), ("large", (784, 1024, 1024, 10), 256)))


def _train_inputs(rng, dims, dtype, variant, reference) -> dict[str, Any]:
    sizes, batch = dims
    return {"x": (rng.standard_normal((batch, sizes[0]))).astype(dtype),
            "labels": rng.integers(0, sizes[-1], size=batch).astype(np.int64), "sizes": sizes}


def _torch_train_step(torch: Any, a: dict[str, Any]) -> Callable[[], Any]:
    sizes, x = a["sizes"], a["x"]
    torch.manual_seed(0)
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(device=x.device, dtype=x.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)

    def train_step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), a["labels"])
        loss.backward()
        opt.step()
        return loss

    return train_step


TRAIN_STEP = Benchmark(
    "train", "GFLOP/s", "gemm_ref", "6·B·Σ(in·out) flop",  # 2 forward + 4 backward per weight and sample
    lambda d, s: 6.0 * d[1] * sum(a * c for a, c in zip(d[0][:-1], d[0][1:])),
    TRAIN_SHAPES, _train_inputs, _torch_train_step)

#: Every case family, in report order: the op table's, then the training step.
OPS: dict[str, OpSpec] = {name: OpSpec(name, op.bench) for name, op in _OP_TABLE.items() if op.bench is not None}
OPS["train_step"] = OpSpec("train_step", TRAIN_STEP)

#: Names accepted by ``--ops``: op names, their groups, and ``all``.
OP_GROUPS = tuple(dict.fromkeys(spec.group for spec in OPS.values()))


def work(spec: OpSpec, shape: Shape, itemsize: int) -> float:
    """Work of one call: flop for GFLOP/s kernels, bytes for GB/s kernels (see the package docstring)."""
    return spec.bench.work(shape.dims, itemsize)


def gemm_dims(spec: OpSpec, shape: Shape, device: str = "cpu") -> tuple[int, int, int]:
    """(M, K, N) of the GEMM that is the limit of a GFLOP/s kernel."""
    if spec.limit == "gemm":
        return tuple(shape.dims)  # type: ignore[return-value]
    return GEMM_REF[device]


def shape_record(spec: OpSpec, shape: Shape) -> Any:
    """The shape of a case as the JSON report records it."""
    if spec.name == "train_step":
        return {"sizes": list(shape.dims[0]), "batch": shape.dims[1]}
    if spec.group == "optim":
        return {"sizes": list(shape.dims), "params": int(sum(math.prod(s) for s in mlp_param_shapes(shape.dims)))}
    return list(shape.dims)


# ---------------------------------------------------------------- callables
def inputs(spec: OpSpec, variant: str, shape: Shape, dtype: str) -> dict[str, Any]:
    """The arguments of one case as NumPy arrays, the same for every implementation."""
    from ..backends import backend_for

    return spec.bench.inputs(np.random.default_rng(0), shape.dims, np.dtype(dtype), variant, backend_for("numpy"))


class LayerAPIMissing(RuntimeError):
    """The layer API (``nnfast.MLP``, ``SGD``, ...) is not in this build."""


def make_nnfast(backend: Any, spec: OpSpec, variant: str, shape: Shape, dtype: str) -> Callable[[], Any]:
    """A zero-argument callable running one case on an nnfast backend.

    Inputs are converted to the backend's arrays once, here; the callable
    only launches the op (on a GPU it does not wait: the timer synchronises).
    """
    data = inputs(spec, variant, shape, dtype)
    if spec.name == "train_step":
        return _nnfast_train_step(backend, dtype, data)
    args = {k: _convert(v, backend.asarray) for k, v in data.items()}
    method = getattr(backend, spec.name)
    return lambda: method(**args)


def make_torch(torch: Any, device: str, spec: OpSpec, variant: str, shape: Shape,
               dtype: str) -> Callable[[], Any]:
    """The PyTorch equivalent of one case (eager mode, the primitives autograd itself calls)."""
    data = inputs(spec, variant, shape, dtype)
    args = {k: _convert(v, lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)) for k, v in data.items()}
    return spec.bench.torch(torch, args)


def at_precision(fn: Callable[[], Any], precision: str) -> Callable[[], Any]:
    """``fn`` run at nnfast's matmul precision ``precision`` ("high": float32 GEMMs on TF32 tensor cores)."""
    from ..precision import matmul_precision

    def call() -> Any:
        with matmul_precision(precision):
            return fn()

    return call


def torch_at_precision(torch: Any, fn: Callable[[], Any], precision: str) -> Callable[[], Any]:
    """``fn`` run at PyTorch's matching setting: ``torch.set_float32_matmul_precision(precision)``
    ("high" sets ``torch.backends.cuda.matmul.allow_tf32``), set before every call (it is process-wide)."""
    def call() -> Any:
        torch.set_float32_matmul_precision(precision)
        return fn()

    return call


def _convert(value: Any, to_array: Callable[[np.ndarray], Any]) -> Any:
    if isinstance(value, np.ndarray):
        return to_array(value)
    if isinstance(value, list):
        return [to_array(v) for v in value]
    return value


def _nnfast_train_step(backend: Any, dtype: str, data: dict[str, Any]) -> Callable[[], Any]:
    import nnfast as nf

    missing = [n for n in ("MLP", "SoftmaxCrossEntropy", "SGD", "use_backend") if not hasattr(nf, n)]
    if missing:
        raise LayerAPIMissing(f"nnfast has no {', '.join(missing)}")
    with nf.use_backend(backend.name):
        model = nf.MLP(list(data["sizes"]), activation="relu", dtype=dtype, seed=0)
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
