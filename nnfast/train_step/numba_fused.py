"""The Numba backend's plan: the whole training step of an MLP in one compiled call.

:func:`build` lays out, once per input shape, every buffer the step needs
(activations, their gradients, partial bias gradients, loss rows, packing
workspaces) and a descriptor for each of the step's GEMMs, then each call is
one call of :func:`~nnfast.backends.numba_kernels.train_step.step_serial` or
``step_parallel`` (see there for the fusions): no per-op Python, no
allocation but the returned loss, no check beyond the ones ``TrainStep`` has
made. The kernels are compiled once per dtype for every model, activation,
optimizer and loss setting.

It takes models that are a ``Linear`` or a ``Sequential`` of ``Linear``
layers, each optionally followed by an activation layer (``MLP``), with
C-contiguous float parameters and optimizer state of the input's dtype, and
an ``SGD`` or ``Adam`` optimizer; for anything else -- a subclass that has
its own forward, backward, loss or update included -- it returns None and
the eager plan runs.

Threads: a step whose work is below :data:`PARALLEL_MIN_MACS` runs on the
calling thread as one call: a step of L layers has 3L - 1 GEMMs, and waking
the other threads for each costs more than it saves on small ones. Measured
on the 2-core machine (TBB layer, serial and parallel plans of the same
model side by side, 8 rounds): the parallel step 0.8x the serial one at 3.2M
multiply-adds per forward ([784,128,10] batch 32), 1.1x at 4.2M
([256,256,10] batch 64), 1.35x at 8.6M and 12.9M, 1.5x at 17M and more.
Above it, each GEMM big enough to split (:data:`.gemm.PARALLEL_MIN_MACS`)
runs on every thread with dynamic scheduling.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from ..activations import BY_NAME
from ..backends.base import bad_label_error
from ..checks import FLOAT_DTYPES
from ..backends.numba_kernels import gemm, optim as optim_kernels
from ..backends.numba_kernels import train_step as ts
from ..backends.numba_kernels.activations import backward_kernel, forward_kernel
from ..backends.numba_kernels.linear import MAX_BLOCKS
from ..activation_layers import ActivationLayer
from ..layers import Linear, Sequential
from ..losses import SoftmaxCrossEntropy
from ..optim import SGD, Adam
from .plan import PlanKey

#: Below this many multiply-adds per step (forward; the backward is twice that) a step runs on one thread.
PARALLEL_MIN_MACS = 1 << 22


def build(model: Any, loss_fn: Any, optimizer: Any, key: PlanKey) -> FusedPlan | None:
    """The fused plan of ``(model, loss_fn, optimizer)`` for ``key``, or None for a model it does not take."""
    layers = _linear_layers(model)
    dtype = np.dtype(key.dtype)
    if layers is None or dtype not in FLOAT_DTYPES or _rule(optimizer) is None:
        return None
    if not _stock(loss_fn, SoftmaxCrossEntropy, "__call__"):
        return None
    for layer, _, _ in layers:
        if layer.dtype != dtype or layer.W.shape != (layer.in_features, layer.out_features) or (
                layer.b is not None and layer.b.shape != (layer.out_features,)):
            return None  # the eager plan reports what is wrong
    arrays = [p.data for p in optimizer.params] + [a for name in optimizer.state_names for a in optimizer.state[name]]
    if not all(_usable(a, dtype) for a in arrays):
        return None
    return FusedPlan(layers, loss_fn, optimizer, key)


def _linear_layers(model: Any) -> list[tuple[Linear, str, float]] | None:
    """``(layer, activation, alpha)`` for each Linear of ``model``, or None when it is not such a chain."""
    if _stock(model, Linear, *_LINEAR):
        entries = [(model, model.activation, model.alpha)]
    elif _stock(model, Sequential, "forward", "backward") and len(model):
        entries = []
        for layer, act in model._plan:
            if not _stock(layer, Linear, *_LINEAR) or (
                    act is not None and not _stock(act, ActivationLayer, "forward", "backward")):
                return None
            entries.append((layer, act.activation, act.alpha) if act is not None
                           else (layer, layer.activation, layer.alpha))
    else:
        return None
    for (a, _, _), (b, _, _) in zip(entries, entries[1:]):
        if a.out_features != b.in_features:
            return None
    return entries


_LINEAR = ("forward", "backward", "forward_with", "backward_with")


def _parallel(layers: list[tuple[Linear, str, float]], batch: int) -> bool:
    """Whether the step of ``layers`` on ``batch`` rows runs its large GEMMs on every thread."""
    macs = batch * sum(layer.in_features * layer.out_features for layer, _, _ in layers)
    return numba.get_num_threads() > 1 and macs >= PARALLEL_MIN_MACS


def step_types(dtype: Any) -> tuple[Any, ...]:
    """The Numba types of a step kernel's arguments for ``dtype`` (the same for every plan of that dtype)."""
    f, i = np.empty((1, 1), dtype), np.empty((1, 1), np.int64)
    return tuple(numba.typeof(a) for a in (f, i[0], i, f, i[0], np.empty(1), i, f[0], i[0], i[0]))


def kernels(model: Any, optimizer: Any, dtype: Any, batch_sizes: tuple[int, ...]) -> tuple[list[Any], list[str]]:
    """What the fused plans of ``model`` on these batch sizes run: ``(callables, steps)``.

    ``callables`` are thunks that compile (or load) the C-callable kernels the
    plans take the addresses of (the GEMM task, the activations' loops, the
    update); ``steps`` the names of the step kernels of :mod:`.train_step`
    they call. Both empty for a model the fused plan does not take.
    """
    layers = _linear_layers(model)
    dtype = np.dtype(dtype)
    rule = _rule(optimizer)
    if layers is None or dtype not in FLOAT_DTYPES or rule is None:
        return [], []
    made = [lambda: gemm.task_kernel(dtype), lambda: optim_kernels.update_kernel(rule, dtype)]
    for act in dict.fromkeys(act for _, act, _ in layers if act != "identity"):
        made += [lambda a=act: forward_kernel(a, dtype), lambda a=act: backward_kernel(a, dtype)]
    steps = sorted({"step_parallel" if _parallel(layers, b) else "step_serial" for b in batch_sizes})
    return made, steps


def _rule(optimizer: Any) -> str | None:
    """The update rule of the fused plan for ``optimizer`` (``"sgd"``, ``"adam"``), or None when it takes none."""
    if _stock(optimizer, SGD, "step", "_update"):
        return "sgd"
    if _stock(optimizer, Adam, "step", "_update"):
        return "adam"
    return None


def _stock(obj: Any, cls: type, *methods: str) -> bool:
    """Whether ``obj`` is a ``cls`` whose ``methods`` are ``cls``'s own: the plan replaces them, so a
    subclass with its own (a patched loss, a custom layer) runs the eager plan, which calls them."""
    return isinstance(obj, cls) and all(getattr(type(obj), m) is getattr(cls, m) for m in methods)


def _usable(a: Any, dtype: np.dtype) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable


class FusedPlan:
    """The buffers, descriptors and compiled step for one ``(model, loss_fn, optimizer, batch)``."""

    name = "fused"

    def __init__(self, layers: list[tuple[Linear, str, float]], loss_fn: Any, optimizer: Any, key: PlanKey) -> None:
        dtype = np.dtype(key.dtype)
        batch = key.batch
        self.key, self.loss_fn, self.optimizer = key, loss_fn, optimizer
        self.params = list(optimizer.params)
        self.backend = layers[0][0].backend
        self.dtype = dtype
        n = len(layers)
        threads = numba.get_num_threads()
        parallel = _parallel(layers, batch)
        self.parallel = parallel
        self._kernel = ts.step_parallel if parallel else ts.step_serial
        self.workspace = gemm.Workspace(dtype, numba.config.NUMBA_NUM_THREADS)
        ws = self.workspace.slots()

        def workers(m: int, k: int, nn: int) -> int:
            return threads if parallel and m * k * nn >= gemm.PARALLEL_MIN_MACS else 1

        # Optimizer: the C-callable rule, its coefficients, and the state of each parameter.
        index = {id(p): i for i, p in enumerate(self.params)}
        states = [optimizer.state[name] for name in optimizer.state_names]

        def state_of(p: Any) -> tuple[int, int]:
            """The addresses of ``p``'s optimizer state (0 where it has none)."""
            addresses = [s[index[id(p)]].ctypes.data for s in states] + [0, 0]
            return addresses[0], addresses[1]

        rule = _rule(optimizer)
        if rule == "sgd":
            self.coef = optim_kernels.sgd_coefficients(dtype, optimizer.lr, optimizer.momentum, optimizer.nesterov,
                                                       optimizer.weight_decay)
        else:
            self.coef = np.zeros(optim_kernels.ADAM_SIZE, dtype)
        self._adam = rule == "adam"
        update = optim_kernels.update_kernel(rule, dtype).address

        # Activations and their gradients, one buffer each; z where the derivative needs the input.
        rows = max(16, -(-batch // MAX_BLOCKS))  # the row blocks of the eager db (linear.dz_db)
        blocks = -(-batch // rows)
        keep = []  # every buffer whose address is in a descriptor
        ys, saved, dzs, partials = [], [], [], []
        for layer, act, _ in layers:
            y = np.zeros((batch, layer.out_features), dtype)
            z = np.zeros_like(y) if act != "identity" and BY_NAME[act].saves_input else None
            ys.append(y)
            saved.append(z if z is not None else y)
            dzs.append(np.zeros_like(y))
            partials.append(np.zeros((blocks, layer.out_features), dtype) if layer.b is not None else None)
            keep += [y, z]
        self.loss_rows = np.zeros(batch, np.float64)
        descs = np.zeros((3 * n, gemm.DESC), np.int64)
        fps = np.zeros((3 * n, 1), dtype)
        table = np.zeros((n, ts.L_SIZE), np.int64)
        task = gemm.task_kernel(dtype).address
        for l, (layer, act, alpha) in enumerate(layers):
            W, b = layer.W.data, (layer.b.data if layer.b is not None else None)
            k_in, k_out = layer.in_features, layer.out_features
            x_addr = ys[l - 1].ctypes.data if l else 0  # layer 0's input is patched in per call
            fwd_act = 0 if act == "identity" else forward_kernel(act, dtype).address
            z = saved[l] if saved[l] is not ys[l] else None
            descs[3 * l + ts.FWD] = gemm.describe(
                batch, k_out, k_in, workers(batch, k_in, k_out), A=x_addr, B=W.ctypes.data, C=ys[l].ctypes.data,
                EPI=gemm.FORWARD, BIAS=b.ctypes.data if b is not None else 0, ACT=fwd_act, RELU=act == "relu",
                Z=z.ctypes.data if z is not None else 0, **ws)
            fps[3 * l + ts.FWD, 0] = alpha
            if l:
                below_act, below_alpha = layers[l - 1][1], layers[l - 1][2]
                part = partials[l - 1]
                descs[3 * l + ts.DXR] = gemm.describe(
                    batch, k_in, k_out, workers(batch, k_out, k_in), A=dzs[l].ctypes.data, B=W.ctypes.data, TB=1,
                    C=dzs[l - 1].ctypes.data, EPI=gemm.DX, SAVED=saved[l - 1].ctypes.data, RELU=below_act == "relu",
                    BWD=0 if below_act == "identity" else backward_kernel(below_act, dtype).address,
                    PART=part.ctypes.data if part is not None else 0, PROWS=rows, **ws)
                fps[3 * l + ts.DXR, 0] = below_alpha
            scratch = np.zeros_like(W)  # dW of the earlier K blocks when the batch spans several
            keep.append(scratch)
            s1, s2 = state_of(layer.W)
            descs[3 * l + ts.DWR] = gemm.describe(
                k_in, k_out, batch, workers(k_in, batch, k_out), A=x_addr, TA=1, B=dzs[l].ctypes.data,
                C=scratch.ctypes.data, EPI=gemm.UPDATE, UPD=update, P=W.ctypes.data, S1=s1, S2=s2,
                COEF=self.coef.ctypes.data, **ws)
            if b is not None:
                db = np.zeros(k_out, dtype)
                keep.append(db)
                bs1, bs2 = state_of(layer.b)
                table[l, [ts.L_BIAS, ts.L_DB, ts.L_PARTIAL, ts.L_S1, ts.L_S2]] = (
                    b.ctypes.data, db.ctypes.data, partials[l].ctypes.data, bs1, bs2)
            table[l, ts.L_OUT] = k_out
            table[l, ts.L_BLOCKS] = blocks
        last_layer, last_act, _ = layers[-1]
        loss = loss_fn
        use_ignore = -(2**63) <= loss.ignore_index < 2**63
        info = np.zeros(ts.I_INFO, np.int64)
        info[[ts.I_TASK, ts.I_LAYERS, ts.I_BATCH, ts.I_CLASSES, ts.I_IGNORE, ts.I_USE_IGNORE, ts.I_REDUCTION,
              ts.I_LOGITS, ts.I_DLOGITS, ts.I_LOSS_ROWS, ts.I_LAST_BWD, ts.I_LAST_SAVED, ts.I_PROWS, ts.I_UPDATE,
              ts.I_COEF]] = (
            task, n, batch, last_layer.out_features, loss.ignore_index if use_ignore else 0, use_ignore,
            {"mean": ts.MEAN, "sum": ts.SUM, "none": ts.NONE}[loss.reduction], ys[-1].ctypes.data,
            dzs[-1].ctypes.data, self.loss_rows.ctypes.data,
            0 if last_act == "identity" else backward_kernel(last_act, dtype).address, saved[-1].ctypes.data,
            rows, update, self.coef.ctypes.data)
        finfo = np.zeros(ts.F_SIZE, np.float64)
        finfo[ts.F_EPS] = loss.label_smoothing
        self._args = (descs, fps, info, finfo, table)
        self._keep = (keep, ys, saved, dzs, partials)
        self._status = np.zeros(1, np.int64)
        self._loss_shape = (batch,) if loss.reduction == "none" else ()

    def prepare(self) -> None:
        """Compile (or load from the cache) the step kernel for this plan's argument types, without running it."""
        self._kernel.compile(step_types(self.dtype))

    def __call__(self, x: Any, labels: Any) -> Any:
        self.backend._threads()
        opt = self.optimizer
        if self._adam:
            optim_kernels.adam_coefficients(self.dtype, opt.step_count + 1, opt.lr, opt.beta1, opt.beta2, opt.eps,
                                            opt.weight_decay, opt.decoupled, out=self.coef)
        for p in self.params:
            p.grad = None
        out = np.empty(self._loss_shape, self.dtype)
        code = self._kernel(x, labels, *self._args, out.reshape(-1), self._status, self.workspace.counter)
        if code == ts.DONE:
            opt.step_count += 1
        elif code == ts.BAD_LABEL:
            row = int(self._status[0])
            raise bad_label_error(int(labels[row]), row, self._args[2][ts.I_CLASSES], self.loss_fn.ignore_index)
        return out


__all__ = ["FusedPlan", "PARALLEL_MIN_MACS", "build", "kernels", "step_types"]
