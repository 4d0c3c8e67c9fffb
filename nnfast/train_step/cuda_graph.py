"""The CuPy backend's plan: a training step recorded once, then replayed as a CUDA graph.

For an MLP (a ``Linear``, or a ``Sequential`` / ``MLP`` whose layers are
``Linear`` layers, each with its activation fused) and SGD or Adam, the plan
is made once per batch size:

1. **Fixed buffers.** The input and the labels are copied into buffers of
   the plan; every other array of the step is allocated when the step is
   recorded and kept (the recorded launches hold them).
2. **Recording.** The step -- forward, loss, guard, backward, update -- runs
   once through the layer API under :meth:`CupyBackend.recording
   <nnfast.backends.cupy_backend.CupyBackend.recording>`, which records the
   launches instead of making them. So the plan launches exactly what the
   eager path launches (the same kernels, tiles and split-K plans), plus the
   guard, and needs no launch logic of its own.
3. **Replay.** The first call makes the recorded launches directly (so
   every kernel is loaded before a capture); on a GPU the second captures
   them once as a CUDA graph, and from then on each call replays the graph:
   one launch for the whole step. Where graphs are unavailable (the CPU
   emulation of the kernels) or ``NNFAST_CUDA_GRAPH=0``, every call makes the
   recorded launches directly.
   Either way a call allocates nothing on the device but the returned loss,
   reads nothing back and waits for nothing.

**Nothing of a step lives on the host.** A step cannot know on the host
whether its loss is finite or its labels valid, nor, therefore, the step
count. These live in a control block in device memory
(``cuda_launch.STEP_CONTROL``): the guard kernel (``step_guard``, after the
loss) sets *skip* when a loss value is not finite or a label is bad, and
otherwise advances the *step* count and forms Adam's bias corrections for it;
the update kernels read *skip* and those corrections from the block, so a
skipped step leaves parameters, optimizer state and the count untouched.

**The step count.** The device's count is authoritative: the plan attaches it
to the optimizer (:class:`DeviceStepCount`), whose ``step_count`` then reads
it -- waiting for the queued steps -- and whose setter writes it. So
``optimizer.state_dict()`` / ``nf.save`` see the exact count (skipped steps
not counted), ``nf.load`` / ``load_state_dict`` set it, and a plan made later
continues from it. Reading it is a synchronisation; nothing in a step reads it.

**Bad labels** are reported as on the eager path: the step's label flags are
copied to pinned memory behind the replay and raised as ``ValueError``
(naming the first bad row) when the loss, or any value, is read.

The hyperparameters (learning rate, momentum, betas...) are fixed in the
recorded launches: ``TrainStep`` makes a new plan when one changes, when an
array is replaced, or when the backend's launch settings change.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from ..activation_layers import ActivationLayer
from ..backends import cuda_launch
from ..layers import Linear, Sequential
from ..optim import SGD, Adam, Optimizer
from .plan import PlanKey

_STEP = cuda_launch.STEP_CONTROL["step"]


def capture_enabled(cupy: Any) -> bool:
    """Whether plans capture CUDA graphs: the array module has them (CuPy on CUDA) and
    ``NNFAST_CUDA_GRAPH`` is not ``0``."""
    graphs = hasattr(cupy.cuda.Stream, "begin_capture") and not getattr(cupy.cuda.runtime, "is_hip", False)
    return graphs and os.environ.get("NNFAST_CUDA_GRAPH", "1").strip() != "0"


class DeviceStepCount:
    """An optimizer's step count kept in device memory, in the control block of guarded steps.

    ``read()`` waits for the last change of the block (a step, or a write)
    and reads the count; ``write(n)`` sets it, ordered on the current stream.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.device = _device(backend)
        self.control = backend.xp.zeros((cuda_launch.STEP_CONTROL_SIZE,), dtype=np.float64)
        self.last: tuple[Any, int] | None = None  # (event, stream pointer) of the last change

    @classmethod
    def of(cls, optimizer: Optimizer, backend: Any) -> "DeviceStepCount":
        """The optimizer's counter on the current device, attached to it on first use."""
        counter = optimizer._device_steps
        if not isinstance(counter, cls) or counter.backend is not backend or counter.device != _device(backend):
            counter = cls(backend)
            optimizer._keep_step_count(counter)
        return counter

    def read(self) -> int:
        if self.last is not None:
            self.last[0].synchronize()
        return int(self.control[_STEP:_STEP + 1].get()[0])

    def write(self, value: int) -> None:
        cuda = self.backend.xp.cuda
        stream = cuda.get_current_stream()
        if self.last is not None and self.last[1] != stream.ptr:
            stream.wait_event(self.last[0])  # after a step still running on another stream
        self.control[_STEP:_STEP + 1] = float(value)
        event = cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        self.last = (event, stream.ptr)


def _device(backend: Any) -> int:
    return int(backend.xp.cuda.runtime.getDevice())


def mlp_layers(model: Any) -> list[Linear] | None:
    """The ``Linear`` layers of an MLP in order, or None for any other model.

    An MLP here is a ``Linear`` or a plain ``Sequential`` (or ``MLP``) of
    ``Linear`` layers, each followed at most by an activation layer that
    :class:`Sequential` fuses into it.
    """
    if type(model) is Linear:
        return [model]
    if not isinstance(model, Sequential) or type(model).forward is not Sequential.forward \
            or type(model).backward is not Sequential.backward:
        return None
    layers = []
    for layer, act in model._plan:
        if type(layer) is not Linear or (act is not None and not isinstance(act, ActivationLayer)):
            return None
        layers.append(layer)
    return layers or None


def build(model: Any, loss_fn: Any, optimizer: Optimizer, key: PlanKey) -> "CudaGraphPlan | None":
    """The plan for ``model``, or None (the eager plan runs) for a model or optimizer it does not handle."""
    layers = mlp_layers(model)
    if layers is None or type(optimizer) not in (SGD, Adam):
        return None
    backend = model.backend
    for p in optimizer.params:
        data = p.data
        if not backend.is_native(data) or data.dtype != key.dtype or not data.flags.c_contiguous:
            return None  # strided views are updated through copies: the eager path handles them
    return CudaGraphPlan(model, loss_fn, optimizer, key, capture_enabled(backend.xp))


class CudaGraphPlan:
    """A recorded training step for one batch size, replayed as a CUDA graph or as direct launches."""

    def __init__(self, model: Any, loss_fn: Any, optimizer: Optimizer, key: PlanKey, capture: bool) -> None:
        backend = model.backend
        cp = backend.xp
        self.backend, self.model, self.loss_fn, self.optimizer, self.key = backend, model, loss_fn, optimizer, key
        self.name = "cuda graph" if capture else "cuda launches"
        self.counter = DeviceStepCount.of(optimizer, backend)
        self.x = cp.empty((key.batch, mlp_layers(model)[0].in_features), dtype=key.dtype)
        self.labels = cp.empty((key.batch,), dtype=np.int64)
        self.launches, self.label_check, self.loss = self._record()
        self.graph: Any = None
        self.capture = capture
        self.launched = False
        self.last: tuple[Any, int] | None = None  # (event, stream pointer) of the last call

    def _record(self) -> tuple[list[Any], tuple[Any, int, int, int], Any]:
        backend, model, opt = self.backend, self.model, self.optimizer
        opt.zero_grad()
        try:
            with backend.recording() as recording:
                loss, dlogits = self.loss_fn(model.forward(self.x), self.labels)
                loss = loss.view(type=backend.xp.ndarray)  # the buffer itself, without the read check
                (info, rows, _, _), = recording.label_checks
                betas = (opt.beta1, opt.beta2) if isinstance(opt, Adam) else ()
                backend._step_guard(self.counter.control, loss, info, rows, opt.lr, *betas)
                model.backward(dlogits, need_input_grad=False)
                opt._update(list(range(len(opt.params))), control=self.counter.control)
        finally:
            opt.zero_grad()
        return recording.launches, recording.label_checks[0], loss

    def _capture(self) -> Any:
        cuda = self.backend.xp.cuda
        stream = cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                for launch in self.launches:
                    launch()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            return stream.end_capture()

    def __call__(self, x: Any, labels: Any) -> Any:
        backend = self.backend
        cp = backend.xp
        backend._poll_pending()
        stream = cp.cuda.get_current_stream()
        for last in (self.last, self.counter.last):  # work of another stream on these buffers first
            if last is not None and last[1] != stream.ptr:
                stream.wait_event(last[0])
        backend._copy_into(self.x, x, stream)
        backend._copy_into(self.labels, labels, stream)
        if self.capture and self.launched:
            if self.graph is None:
                self.graph = self._capture()
            self.graph.launch(stream)
        else:  # the first call launches directly: every kernel is loaded before a capture
            for launch in self.launches:
                launch()
            self.launched = True
        loss = cp.empty(self.loss.shape, dtype=self.loss.dtype)
        backend._copy_into(loss, self.loss, stream)
        event = backend._labels.track(*self.label_check, stream)
        self.last = self.counter.last = (event, stream.ptr)
        return backend._checked(loss)


__all__ = ["CudaGraphPlan", "DeviceStepCount", "build", "capture_enabled", "mlp_layers"]
