"""The op table: every op of the backend contract, one row each.

A row (:class:`~nnfast.op_spec.Op`) is the single place where an op's name,
arguments, checks and documentation live, with how it is benchmarked and
which CUDA kernels it instantiates. From the rows come:

* the public ``Backend`` methods (``backend.linear_forward(...)``): they check
  every argument as declared here, once, then call the backend's ``_op``
  kernel entry (:mod:`nnfast.backends.base`);
* the checks of the layers, losses and optimizers that keep a setting
  (``SoftmaxCrossEntropy(label_smoothing=...)``, ``SGD(lr=...)``: ``Op.check``);
* the cases of ``nnfast bench`` and ``benchmarks/`` (work models, shapes,
  inputs, PyTorch equivalents: :mod:`nnfast.bench.cases`);
* the CUDA instantiation lists (:func:`nnfast.backends.cuda_launch.name_expressions`);
* the op-table tests (``tests/op_table.py``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from . import activations
from .checks import Array, ArrayList, Choice, Context, Flag, Integer, Labels, ParamLists, Real, fits_in_memory
from .op_spec import REQUIRED, Arg, Benchmark, Cuda, Kernel, Op, Shape

#: ``reduction`` values of the cross-entropy.
REDUCTIONS = ("mean", "sum", "none")

#: The kernels' GEMM template (``kernels/linear.cu``), shared by the forward and backward rows.
GEMM = "gemm<{T}, {TILE}, {TA}, {TB}, {ACT}, {VEC}>"
#: The tensor-core GEMM (``kernels/linear_tf32.cu``): float32 with matmul precision "high"; its
#: scalar path (VEC false) has the tiles marked ``scalar`` only.
GEMM_TF32 = "gemm_tf32<{TF32_TILE}, {TA}, {TB}, {ACT}, {VEC}>"
GEMM_TF32_SCALAR = "gemm_tf32<{TF32_SCALAR_TILE}, {TA}, {TB}, {ACT}, {VEC}>"


def _tf32_gemms(**fixed: Any) -> tuple[Kernel, Kernel]:
    return (Kernel(GEMM_TF32, {**fixed, "VEC": True}), Kernel(GEMM_TF32_SCALAR, {**fixed, "VEC": False}))

#: Hyper-parameters of the optimizer benchmarks.
SGD_LR, SGD_MOMENTUM = 1e-3, 0.9
ADAM_LR, ADAM_STEP = 1e-4, 10


# ------------------------------------------------------------------ checks of several arguments
def _inner_dims_match(ctx: Context) -> None:
    x, W = ctx.values["x"], ctx.values["W"]
    if x.shape[1] != W.shape[0]:
        raise ValueError(f"x: expected shape (batch, {W.shape[0]}) to match W of shape {tuple(W.shape)}, "
                         f"got {tuple(x.shape)}")


def _output_fits(ctx: Context) -> None:
    x, W = ctx.values["x"], ctx.values["W"]
    fits_in_memory(x.shape[0] * W.shape[1] * x.dtype.itemsize,
                   f"x: a batch of {x.shape[0]} rows times W's {W.shape[1]} outputs", ctx.backend.memory_limit())


def _nesterov_needs_momentum(ctx: Context) -> None:
    if ctx.values["nesterov"] and ctx.values["momentum"] == 0.0:
        raise ValueError("nesterov: Nesterov momentum needs momentum > 0")


def _linear_out(v: dict[str, Any]) -> tuple[int, int]:
    return (v["x"].shape[0], v["W"].shape[1])


def _activation_args(default: Any = REQUIRED) -> tuple[Arg, Arg]:
    return (Arg("activation", activations.Resolved("name"), default),
            Arg("alpha", activations.Resolved("alpha"), None))


# ------------------------------------------------------------------ benchmark shapes and inputs
def _mlp_label(sizes: Sequence[int]) -> str:
    return "[" + ",".join(str(s) for s in sizes) + "]"


def mlp_param_shapes(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """The parameter shapes of an MLP of layer ``sizes``: (in, out) and (out,) per layer."""
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        shapes += [(a, b), (b,)]
    return shapes


def _count(sizes: Sequence[int]) -> int:
    return int(sum(math.prod(s) for s in mlp_param_shapes(sizes)))


def _human_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k" if n >= 1_000 else str(n)


LINEAR_SHAPES = tuple(Shape(size, dims, "{}×{}→{}".format(*dims)) for size, dims in (
    ("small", (64, 64, 128)), ("medium", (256, 784, 1024)), ("mlp", (1024, 784, 512)), ("large", (1024, 1024, 1024))))
ELEMENTWISE_SHAPES = tuple(Shape(size, dims, "{}×{}".format(*dims)) for size, dims in (
    ("small", (64, 128)), ("medium", (256, 1024)), ("large", (1024, 4096))))
ROW_SHAPES = tuple(Shape(size, dims, "{}×{}".format(*dims)) for size, dims in (
    ("small", (64, 10)), ("medium", (256, 1000)), ("large", (4096, 1000))))
OPTIM_SHAPES = tuple(Shape(size, sizes, f"{_mlp_label(sizes)} {_human_count(_count(sizes))} params")
                     for size, sizes in (("small", (64, 128, 10)), ("medium", (784, 512, 512, 10)),
                                         ("large", (784, 1024, 1024, 10))))


def _normal(rng: np.random.Generator, dtype: np.dtype, *dims: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(dims) * scale).astype(dtype)


def _linear_inputs(rng, dims, dtype, variant, reference, backward=False) -> dict[str, Any]:
    b, i, o = dims
    args = {"x": _normal(rng, dtype, b, i), "W": _normal(rng, dtype, i, o, scale=1 / math.sqrt(i)),
            "b": _normal(rng, dtype, o, scale=0.1), "activation": variant}
    dy = _normal(rng, dtype, b, o)
    if not backward:
        return args
    _, saved = reference.linear_forward(**args)
    return {"dy": dy, "x": args["x"], "W": args["W"], "saved": saved, "activation": variant}


def _activation_inputs(rng, dims, dtype, variant, reference, backward=False) -> dict[str, Any]:
    x, dy = _normal(rng, dtype, *dims), _normal(rng, dtype, *dims)
    if not backward:
        return {"x": x, "activation": variant}
    saved = x if activations.saves_input(variant) else reference.activation_forward(x, variant)
    return {"dy": dy, "saved": saved, "activation": variant}


def _row_inputs(rng, dims, dtype, variant, reference, labels=False) -> dict[str, Any]:
    b, c = dims
    args: dict[str, Any] = {"logits" if labels else "x": _normal(rng, dtype, b, c, scale=3.0)}
    if labels:
        args["labels"] = rng.integers(0, c, size=b).astype(np.int64)
    return args


def _optim_inputs(rng, sizes, dtype, variant, reference, adam=False) -> dict[str, Any]:
    shapes = mlp_param_shapes(sizes)
    params = [_normal(rng, dtype, *s, scale=0.1) for s in shapes]
    grads = [_normal(rng, dtype, *s, scale=0.01) for s in shapes]
    if not adam:
        return {"params": params, "grads": grads, "velocities": [np.zeros(s, dtype) for s in shapes],
                "lr": SGD_LR, "momentum": SGD_MOMENTUM}
    return {"params": params, "grads": grads, "exp_avgs": [np.zeros(s, dtype) for s in shapes],
            "exp_avg_sqs": [np.zeros(s, dtype) for s in shapes], "step": ADAM_STEP, "lr": ADAM_LR}


# ------------------------------------------------------------------ PyTorch equivalents
# Eager mode, with the primitives autograd itself calls for the backward ops.
def _torch_act(torch: Any, a: dict[str, Any]) -> tuple[Any, Any]:
    row = activations.BY_NAME[a["activation"]]
    alpha = activations.resolve(row.name)[1]
    F, aten = torch.nn.functional, torch.ops.aten
    return (lambda t: row.torch_forward(F, t, alpha)), (lambda dy, s: row.torch_backward(aten, dy, s, alpha))


def _torch_activation_forward(torch: Any, a: dict[str, Any]):
    act, _ = _torch_act(torch, a)
    return lambda: act(a["x"])


def _torch_activation_backward(torch: Any, a: dict[str, Any]):
    _, act_backward = _torch_act(torch, a)
    return lambda: act_backward(a["dy"], a["saved"])


def _torch_linear_forward(torch: Any, a: dict[str, Any]):
    act, _ = _torch_act(torch, a)
    return lambda: act(torch.addmm(a["b"], a["x"], a["W"]))


def _torch_linear_backward(torch: Any, a: dict[str, Any]):
    _, act_backward = _torch_act(torch, a)

    def linear_backward() -> Any:
        dz = act_backward(a["dy"], a["saved"])
        return dz @ a["W"].t(), a["x"].t() @ dz, dz.sum(0)

    return linear_backward


def _torch_cross_entropy(torch: Any, a: dict[str, Any]):
    logits = a["logits"].requires_grad_(True)

    def cross_entropy() -> Any:
        loss = torch.nn.functional.cross_entropy(logits, a["labels"])
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    return cross_entropy


def _torch_optimizer(torch: Any, a: dict[str, Any]):
    params = [torch.nn.Parameter(p) for p in a["params"]]
    for p, g in zip(params, a["grads"]):
        p.grad = g
    if "velocities" in a:
        opt = torch.optim.SGD(params, lr=a["lr"], momentum=a["momentum"])
    else:
        opt = torch.optim.Adam(params, lr=a["lr"])
    opt.step()  # creates the state, as nnfast's kernels are handed theirs
    return opt.step


# ------------------------------------------------------------------ the table
_LINEAR_DOC = """``y = act(x @ W + b)``, fused.

Parameters
----------
x : (batch, in_features) array
W : (in_features, out_features) array, same dtype as ``x``
b : (out_features,) array or None
activation, alpha : an activation of :data:`nnfast.ACTIVATIONS` and its parameter

Returns
-------
y : (batch, out_features) array
saved : the tensor the backward op needs: the pre-activation ``x @ W + b``
    when the activation's derivative is computed from its input, else ``y``.
"""

_CE_DOC = """Fused softmax cross-entropy: the loss and d(loss)/d(logits) in one pass.

Semantics of ``torch.nn.functional.cross_entropy`` with class-index
targets: the loss of row ``i`` is
``(1 - s) * -log p[i, y_i] + s * mean_j(-log p[i, j])`` for smoothing
``s``; rows whose label equals ``ignore_index`` contribute 0 loss and 0
gradient. ``"mean"`` divides by the number of rows not ignored (and is
0, not NaN, when every row is ignored); ``"sum"`` adds;
``"none"`` returns one loss per row. The gradient is scaled to match.

Returns ``(loss, dlogits)``: ``loss`` is a 0-d array (shape (batch,)
for ``"none"``), ``dlogits`` has the shape of ``logits``. A label
outside ``[0, classes)`` that is not ``ignore_index`` raises
``ValueError`` naming it (on the GPU, no later than when the loss
is read).
"""

_FLOP = "GFLOP/s"
_BYTES = "GB/s"

OPS: dict[str, Op] = {op.name: op for op in (
    Op("linear_forward", _LINEAR_DOC,
       args=(Arg("x", Array(ndim=2)), Arg("W", Array(ndim=2, like="x")),
             Arg("b", Array(ndim=1, like="x", shape=lambda v: (v["W"].shape[1],), optional=True), None),
             *_activation_args("identity")),
       order=("activation", "alpha", "x", "W", _inner_dims_match, "b", _output_fits),
       bench=Benchmark("linear", _FLOP, "gemm", "2·B·I·O flop", lambda d, s: 2.0 * math.prod(d), LINEAR_SHAPES,
                       _linear_inputs, _torch_linear_forward, variants=("relu",)),
       # A K dimension split over several blocks ends in one reduction pass that applies the epilogue.
       cuda=(Cuda("linear.cu", (Kernel(GEMM, {"TA": False, "TB": False}), Kernel("gemm_splitk_reduce<{T}, {ACT}>"))),
             Cuda("linear_tf32.cu", _tf32_gemms(TA=False, TB=False)))),
    Op("linear_backward", """Backward of :meth:`linear_forward`.

Computes ``dz = dy * act'(.)`` (from ``saved``), ``dW = x.T @ dz``,
``db = dz.sum(0)`` (None unless ``has_bias``) and ``dx = dz @ W.T``
(None unless ``need_dx``). Returns ``(dx, dW, db)``.
""",
       args=(Arg("dy", Array(ndim=2, like="x", shape=_linear_out)), Arg("x", Array(ndim=2)),
             Arg("W", Array(ndim=2, like="x")),
             Arg("saved", Array(ndim=2, like="x", shape=_linear_out, unless=lambda v: v["activation"] == "identity")),
             *_activation_args("identity"),
             Arg("has_bias", Flag(), True, keyword_only=True), Arg("need_dx", Flag(), True, keyword_only=True)),
       order=("activation", "alpha", "x", "W", _inner_dims_match, "dy", "saved", "has_bias", "need_dx"),
       bench=Benchmark("linear", _FLOP, "gemm", "4·B·I·O flop", lambda d, s: 4.0 * math.prod(d), LINEAR_SHAPES,
                       lambda *a: _linear_inputs(*a, backward=True), _torch_linear_backward, variants=("relu",)),
       cuda=(Cuda("linear.cu", (Kernel(GEMM, {"TA": True, "TB": False, "ACT": "identity"}),
                                Kernel(GEMM, {"TA": False, "TB": True, "ACT": "identity"}),
                                Kernel("bias_act_backward<{T}, {ACT}>"), Kernel("column_sum<{T}>"))),
             Cuda("linear_tf32.cu", (*_tf32_gemms(TA=True, TB=False, ACT="identity"),
                                     *_tf32_gemms(TA=False, TB=True, ACT="identity"))))),
    Op("activation_forward", "Apply an activation element-wise; returns a new array of the shape of ``x``.",
       args=(Arg("x", Array()), *_activation_args()),
       order=("activation", "alpha", "x"),
       bench=Benchmark("activation", _BYTES, "copy", "2·n·s bytes", lambda d, s: 2.0 * math.prod(d) * s,
                       ELEMENTWISE_SHAPES, _activation_inputs, _torch_activation_forward,
                       variants=tuple(r.name for r in activations.TABLE if r.benchmark)),
       cuda=Cuda("activations.cu", (Kernel("act_forward<{T}, {ACT}>"),))),
    Op("activation_backward", "``dx = dy * act'(.)``; ``saved`` is the activation's input or output "
                              "(its ``derivative_from`` in :mod:`nnfast.activations`).",
       args=(Arg("dy", Array()), Arg("saved", Array(like="dy", shape=lambda v: v["dy"].shape)),
             *_activation_args()),
       order=("activation", "alpha", "dy", "saved"),
       bench=Benchmark("activation", _BYTES, "copy", "3·n·s bytes", lambda d, s: 3.0 * math.prod(d) * s,
                       ELEMENTWISE_SHAPES, lambda *a: _activation_inputs(*a, backward=True),
                       _torch_activation_backward,
                       variants=tuple(r.name for r in activations.TABLE if r.benchmark), streams=(2, 1, 0)),
       cuda=Cuda("activations.cu", (Kernel("act_backward<{T}, {ACT}>"),))),
    Op("softmax", "Softmax over the last axis of a 2-D array.",
       args=(Arg("x", Array(ndim=2)),),
       bench=Benchmark("softmax_ce", _BYTES, "copy", "2·B·C·s bytes", lambda d, s: 2.0 * math.prod(d) * s,
                       ROW_SHAPES, _row_inputs, lambda torch, a: (lambda: torch.softmax(a["x"], dim=-1))),
       cuda=Cuda("softmax.cu", (Kernel("softmax_rows<{T}, {ROWS}, {LOG}>", {"LOG": False}),))),
    Op("log_softmax", "Log-softmax over the last axis of a 2-D array.",
       args=(Arg("x", Array(ndim=2)),),
       bench=Benchmark("softmax_ce", _BYTES, "copy", "2·B·C·s bytes", lambda d, s: 2.0 * math.prod(d) * s,
                       ROW_SHAPES, _row_inputs, lambda torch, a: (lambda: torch.log_softmax(a["x"], dim=-1))),
       cuda=Cuda("softmax.cu", (Kernel("softmax_rows<{T}, {ROWS}, {LOG}>", {"LOG": True}),))),
    Op("softmax_cross_entropy", _CE_DOC,
       args=(Arg("logits", Array(ndim=2)), Arg("labels", Labels(rows_of="logits")),
             Arg("label_smoothing", Real(0.0, 1.0), 0.0, keyword_only=True),
             Arg("ignore_index", Integer(), -100, keyword_only=True),
             Arg("reduction", Choice(REDUCTIONS), "mean", keyword_only=True)),
       bench=Benchmark("softmax_ce", _BYTES, "copy", "2·B·C·s + 8·B bytes",
                       lambda d, s: 2.0 * math.prod(d) * s + 8.0 * d[0], ROW_SHAPES,
                       lambda *a: _row_inputs(*a, labels=True), _torch_cross_entropy),
       cuda=Cuda("cross_entropy.cu", (Kernel("ce_prepare"), Kernel("ce_rows<{T}, {ROWS}>"), Kernel("ce_reduce<{T}>")))),
    Op("sgd_update", """One SGD step, in place, on every parameter (``torch.optim.SGD``, dampening 0).

``g = grad + weight_decay * p``; ``v = momentum * v + g``;
``p -= lr * (g + momentum * v if nesterov else v)`` (``v`` unused
when ``momentum == 0``; ``velocities`` may then be an empty list).
""",
       args=(Arg("params", ArrayList()), Arg("grads", ArrayList()), Arg("velocities", ArrayList()),
             Arg("lr", Real(0.0), keyword_only=True), Arg("momentum", Real(0.0), 0.0, keyword_only=True),
             Arg("nesterov", Flag(), False, keyword_only=True),
             Arg("weight_decay", Real(0.0), 0.0, keyword_only=True)),
       order=("lr", "momentum", "weight_decay", _nesterov_needs_momentum, "nesterov", "params", "grads",
              "velocities", ParamLists(("params", "grads", "velocities"), read_only=("grads",),
                                       empty_when=("velocities", lambda v: v["momentum"] == 0.0))),
       bench=Benchmark("optim", _BYTES, "copy", "5·n·s bytes", lambda d, s: 5.0 * _count(d) * s, OPTIM_SHAPES,
                       _optim_inputs, _torch_optimizer, streams=(1, 0, 2)),
       # step_guard: the guard of a step launched without the host (a captured TrainStep).
       cuda=Cuda("optim.cu", (Kernel("sgd_multi<{T}>"), Kernel("step_guard<{T}>")))),
    Op("adam_update", """One Adam / AdamW step, in place (``torch.optim.Adam`` / ``AdamW``).

``step`` counts from 1 and drives the bias corrections. With
``decoupled`` the weight decay is AdamW's ``p *= 1 - lr * wd``; without,
it is Adam's ``g += wd * p``.
""",
       args=(Arg("params", ArrayList()), Arg("grads", ArrayList()), Arg("exp_avgs", ArrayList()),
             Arg("exp_avg_sqs", ArrayList()), Arg("step", Integer(1), keyword_only=True),
             Arg("lr", Real(0.0), keyword_only=True),
             Arg("beta1", Real(0.0, 1.0, high_open=True), 0.9, keyword_only=True),
             Arg("beta2", Real(0.0, 1.0, high_open=True), 0.999, keyword_only=True),
             Arg("eps", Real(0.0), 1e-8, keyword_only=True), Arg("weight_decay", Real(0.0), 0.0, keyword_only=True),
             Arg("decoupled", Flag(), True, keyword_only=True)),
       order=("step", "lr", "beta1", "beta2", "eps", "weight_decay", "params", "grads", "exp_avgs", "exp_avg_sqs",
              ParamLists(("params", "grads", "exp_avgs", "exp_avg_sqs"), read_only=("grads",)), "decoupled"),
       bench=Benchmark("optim", _BYTES, "copy", "7·n·s bytes", lambda d, s: 7.0 * _count(d) * s, OPTIM_SHAPES,
                       lambda *a: _optim_inputs(*a, adam=True), _torch_optimizer, streams=(1, 0, 3)),
       cuda=Cuda("optim.cu", (Kernel("adam_multi<{T}>"), Kernel("step_guard<{T}>")))),
)}


__all__ = ["GEMM", "GEMM_TF32", "GEMM_TF32_SCALAR", "OPS", "REDUCTIONS", "mlp_param_shapes"]
