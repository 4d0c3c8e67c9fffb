"""The benchmark cases: every op of the op table that declares a benchmark, and a whole training step.

A case family (:class:`OpSpec`) is an op's :class:`~nnfast.op_spec.Benchmark`
row under the op's name: its shapes, work model, inputs and PyTorch
equivalent come from :mod:`nnfast.ops`. Running a case on an nnfast backend
is calling the op's public method with those inputs; running it in PyTorch is
calling the row's equivalent. The one case family that is not an op, the
training of an MLP (forward, softmax cross-entropy, backward, SGD), is
declared here the same way: one step at three sizes and one epoch of an
MNIST-sized data set, each run through ``nf.TrainStep`` and through the eager
loop of layer calls (the variants ``TrainStep`` and ``eager``), PyTorch's
eager loop beside both.
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


#: The training cases: one step each at three sizes, and an epoch of an MNIST-sized data set (60,000
#: samples of 784 features, batches of 128, the last one of 96) -- ``(sizes, batch)`` or ``(sizes, batch, samples)``.
TRAIN_SHAPES = (
    Shape("small", ((64, 128, 10), 64), "[64,128,10] b64"),
    Shape("medium", ((784, 256, 256, 10), 128), "[784,256,256,10] b128"),
    Shape("large", ((784, 1024, 1024, 10), 256), "[784,1024,1024,10] b256"),
    Shape("epoch", ((784, 256, 256, 10), 128, 60000), "[784,256,256,10] b128, epoch of 60000"),
)
#: How nnfast runs a training case: ``nf.TrainStep`` (what ``nnfast train`` uses: the backend's fastest
#: plan) and the eager loop of layer calls (forward, loss, backward, ``optimizer.step``) beside it.
TRAIN_VARIANTS = ("TrainStep", "eager")


def _samples(dims: tuple[Any, ...]) -> int:
    """Rows of a training case's data: the batch for a step, the data set for an epoch."""
    return dims[2] if len(dims) > 2 else dims[1]


def _train_inputs(rng, dims, dtype, variant, reference) -> dict[str, Any]:
    sizes, batch = dims[:2]
    n = _samples(dims)
    return {"x": (rng.standard_normal((n, sizes[0]))).astype(dtype),
            "labels": rng.integers(0, sizes[-1], size=n).astype(np.int64), "sizes": sizes, "batch": batch}


def batches(x: Any, labels: Any, batch: int) -> list[tuple[Any, Any]]:
    """``(x, labels)`` of each batch of a training case: consecutive row slices (views), made once, so that
    a timed epoch is the steps alone, in nnfast and in PyTorch alike (no shuffling, no data loader)."""
    return [(x[i:i + batch], labels[i:i + batch]) for i in range(0, len(x), batch)]


def _run_batches(step: Callable[[Any, Any], Any], chunks: list[tuple[Any, Any]]) -> Callable[[], Any]:
    """A zero-argument callable running ``step`` on every batch in order; the last loss."""
    if len(chunks) == 1:
        (xb, lb), = chunks
        return lambda: step(xb, lb)

    def epoch() -> Any:
        for xb, lb in chunks:
            loss = step(xb, lb)
        return loss

    return epoch


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

    def train_step(xb: Any, labels: Any) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb), labels)
        loss.backward()
        opt.step()
        return loss

    return _run_batches(train_step, batches(x, a["labels"], a["batch"]))


TRAIN_STEP = Benchmark(
    "train", "GFLOP/s", "gemm_ref", "6·B·Σ(in·out) flop, B the samples of a call",  # 2 fwd + 4 bwd per weight, sample
    lambda d, s: 6.0 * _samples(d) * sum(a * c for a, c in zip(d[0][:-1], d[0][1:])),
    TRAIN_SHAPES, _train_inputs, _torch_train_step, TRAIN_VARIANTS)

#: Every case family, in report order: the op table's, then the training step.
OPS: dict[str, OpSpec] = {name: OpSpec(name, op.bench) for name, op in _OP_TABLE.items() if op.bench is not None}
OPS["train_step"] = OpSpec("train_step", TRAIN_STEP)

#: Names accepted by ``--ops``: op names, their groups, and ``all``.
OP_GROUPS = tuple(dict.fromkeys(spec.group for spec in OPS.values()))


# ---------------------------------------------------------------- GPU-sized cases (--size large)
#: Shape tag of the cases of ``--size large``.
LARGE = "large-gpu"
#: The L2 cache the large shapes are sized against where the device does not say (an H100 / H200: 60 MB).
DEFAULT_L2_BYTES = 60 * 10**6


def _large(*dims: Any, label: str | None = None) -> Shape:
    return Shape(LARGE, tuple(dims), label or "×".join(map(str, dims)))


def _gemm(b: int, i: int, o: int) -> Shape:
    return _large(b, i, o, label=f"{b}×{i}→{o}")


_GEMM_LARGE = (_gemm(4096, 4096, 4096), _gemm(8192, 8192, 8192),
               _gemm(8192, 784, 4096), _gemm(8192, 4096, 4096), _gemm(8192, 4096, 10))  # the last three: an MLP
_ROWS_LARGE = (_large(8192, 32000), _large(32768, 32000), _large(4096, 128256))  # a 128k vocabulary last
_ADAM_SIZES = (8192, 8192, 4096, 10)  # 100.7M parameters
_TRAIN_LARGE = ((784, 4096, 4096, 10), 8192)

#: The shapes of ``nnfast bench --size large``, per case family: inputs several times a large GPU's L2
#: (1 GiB of float32 for the element-wise ops), GEMMs of 4096³ and 8192³ and the layers of a wide MLP at
#: batch 8192, a 32000 and a 128k vocabulary, Adam over 100M parameters.
LARGE_SHAPES: dict[str, tuple[Shape, ...]] = {
    "linear_forward": _GEMM_LARGE,
    "linear_backward": _GEMM_LARGE,
    "activation_forward": (_large(16384, 16384),),
    "activation_backward": (_large(16384, 16384),),
    "softmax": _ROWS_LARGE,
    "log_softmax": _ROWS_LARGE,
    "softmax_cross_entropy": _ROWS_LARGE,
    "sgd_update": (_large(*_ADAM_SIZES, label=f"{_mlp_label(_ADAM_SIZES)} 100.7M params"),),
    "adam_update": (_large(*_ADAM_SIZES, label=f"{_mlp_label(_ADAM_SIZES)} 100.7M params"),),
    "train_step": (Shape(LARGE, _TRAIN_LARGE, f"{_mlp_label(_TRAIN_LARGE[0])} b{_TRAIN_LARGE[1]}"),),
}


def _params(sizes: Sequence[int]) -> int:
    return int(sum(math.prod(s) for s in mlp_param_shapes(sizes)))


def _linear_bytes(d: tuple[int, ...], s: int, backward: bool) -> tuple[int, int]:
    b, i, o = d
    if not backward:  # x, W, b in; y and the saved pre-activation out
        return (b * i + i * o + o) * s, (b * i + i * o + o + 2 * b * o) * s
    read = 2 * b * o + b * i + i * o  # dy, saved, x, W
    return read * s, (read + b * o + i * o + b * i + o) * s  # dz, dW, dx, db


def _rows_bytes(d: tuple[int, ...], s: int, labels: bool) -> tuple[int, int]:
    extra = 8 * d[0] if labels else 0  # int64 labels in; per-row losses out
    return math.prod(d) * s + extra, 2 * math.prod(d) * s + 2 * extra


def _train_bytes(d: tuple[Any, ...], s: int) -> tuple[int, int]:
    sizes, batch = d
    read = batch * sizes[0] * s + 8 * batch + _params(sizes) * s  # x, labels, parameters
    return read, read + (2 * _params(sizes) + 3 * batch * sum(sizes[1:])) * s  # grads, velocities, activations


def _elementwise(reads: int, holds: int) -> Callable[[tuple[Any, ...], int], tuple[int, int]]:
    return lambda d, s: (reads * math.prod(d) * s, holds * math.prod(d) * s)


def _optimizer(arrays: int) -> Callable[[tuple[Any, ...], int], tuple[int, int]]:
    return lambda d, s: (arrays * _params(d) * s, arrays * _params(d) * s)


#: Bytes of the arrays one implementation of a case holds, ``(inputs it reads, every array)``, per case
#: family, from its dims and the bytes per element.
_FOOTPRINT: dict[str, Callable[[tuple[Any, ...], int], tuple[int, int]]] = {
    "linear_forward": lambda d, s: _linear_bytes(d, s, False),
    "linear_backward": lambda d, s: _linear_bytes(d, s, True),
    "activation_forward": _elementwise(1, 2),
    "activation_backward": _elementwise(2, 4),  # dy, saved in; dx out, and the forward's input
    "softmax": lambda d, s: _rows_bytes(d, s, False),
    "log_softmax": lambda d, s: _rows_bytes(d, s, False),
    "softmax_cross_entropy": lambda d, s: _rows_bytes(d, s, True),
    "sgd_update": _optimizer(3),  # parameters, gradients, velocities
    "adam_update": _optimizer(4),  # and both moments
    "train_step": _train_bytes,
}


def footprint(spec: OpSpec, shape: Shape, itemsize: int) -> tuple[int, int]:
    """Bytes one implementation of a case holds: ``(the inputs it reads, every array of it)``."""
    return _FOOTPRINT[spec.name](shape.dims, itemsize)


def rotations(input_bytes: int, l2_bytes: int) -> int:
    """Input sets to rotate through so that a call never finds its inputs in an L2 of ``l2_bytes``.

    One when the inputs alone are three times the cache; else enough sets to
    make three caches' worth (at most 16).
    """
    if input_bytes >= 3 * l2_bytes:
        return 1
    return min(16, math.ceil(3 * l2_bytes / max(input_bytes, 1)))


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
        epoch = {"samples": shape.dims[2]} if len(shape.dims) > 2 else {}
        return {"sizes": list(shape.dims[0]), "batch": shape.dims[1], **epoch}
    if spec.group == "optim":
        return {"sizes": list(shape.dims), "params": int(sum(math.prod(s) for s in mlp_param_shapes(shape.dims)))}
    return list(shape.dims)


# ---------------------------------------------------------------- callables
#: Optimizer state arguments: given small non-zero values (zeros are never data: they can run faster).
_STATE = {"velocities": 0.01, "exp_avgs": 0.01, "exp_avg_sqs": 1e-4}


def inputs(spec: OpSpec, variant: str, shape: Shape, dtype: str, seed: int = 0, device: Any = None,
           ) -> dict[str, Any]:
    """The arguments of one case, the same for every implementation given the same ``seed``.

    NumPy arrays made by NumPy's generator; with ``device`` (a GPU backend),
    arrays of that device made by its generator, the tensors an op derives
    from others (``saved``) computed by that backend: GPU-sized inputs never
    pass through the host.
    """
    from ..backends import backend_for

    if device is None:
        xp, rng, maker = np, np.random.default_rng(seed), backend_for("numpy")
    else:
        xp, rng, maker = device.xp, device.xp.random.default_rng(seed), device
    data = spec.bench.inputs(rng, shape.dims, np.dtype(dtype), variant, maker)
    for name, scale in _STATE.items():
        if name in data:
            data[name] = [xp.abs(rng.standard_normal(a.shape) * scale).astype(dtype) for a in data[name]]
    return data


class LayerAPIMissing(RuntimeError):
    """The layer API (``nnfast.MLP``, ``SGD``, ...) is not in this build."""


def make_nnfast(backend: Any, spec: OpSpec, variant: str, shape: Shape, dtype: str, seed: int = 0,
                device: Any = None) -> Callable[[], Any]:
    """A zero-argument callable running one case on an nnfast backend.

    Inputs are converted to the backend's arrays once, here; the callable
    only launches the op (on a GPU it does not wait: the timer synchronises).
    ``seed`` and ``device``: as :func:`inputs` takes them.
    """
    data = inputs(spec, variant, shape, dtype, seed, device)
    if spec.name == "train_step":
        return _nnfast_train_step(backend, dtype, data, variant)
    args = {k: _convert(v, backend.asarray) for k, v in data.items()}
    method = getattr(backend, spec.name)
    return lambda: method(**args)


def make_torch(torch: Any, device: str, spec: OpSpec, variant: str, shape: Shape, dtype: str, seed: int = 0,
               on: Any = None) -> Callable[[], Any]:
    """The PyTorch equivalent of one case (eager mode, the primitives autograd itself calls).

    ``on``: the GPU backend that makes the inputs on the device (:func:`inputs`);
    PyTorch gets its own copy of them.
    """
    data = inputs(spec, variant, shape, dtype, seed, on)

    def tensor(a: Any) -> Any:
        if isinstance(a, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return torch.as_tensor(a, device=device).clone()  # a device array, through its CUDA array interface

    return spec.bench.torch(torch, {k: _convert(v, tensor) for k, v in data.items()})


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


def _nnfast_train_step(backend: Any, dtype: str, data: dict[str, Any], variant: str) -> Callable[[], Any]:
    import nnfast as nf

    missing = [n for n in ("MLP", "SoftmaxCrossEntropy", "SGD", "TrainStep", "use_backend") if not hasattr(nf, n)]
    if missing:
        raise LayerAPIMissing(f"nnfast has no {', '.join(missing)}")
    with nf.use_backend(backend.name):
        model = nf.MLP(list(data["sizes"]), activation="relu", dtype=dtype, seed=0)
        loss_fn = nf.SoftmaxCrossEntropy()
        opt = nf.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
        x, labels = backend.asarray(data["x"]), backend.asarray(data["labels"])
    chunks = batches(x, labels, data["batch"])
    if variant == "TrainStep":
        step = nf.TrainStep(model, loss_fn, opt)
        step.prepare(*(len(xb) for xb, _ in chunks))
        run = _run_batches(step, chunks)
        run.train_step = step  # type: ignore[attr-defined]  # which plans it made, for benchmarks/
        return run

    def eager_step(xb: Any, lb: Any) -> Any:  # layers keep the backend they were built on
        opt.zero_grad()
        loss, dlogits = loss_fn(model.forward(xb), lb)
        model.backward(dlogits, need_input_grad=False)
        opt.step()
        return loss

    return _run_batches(eager_step, chunks)
