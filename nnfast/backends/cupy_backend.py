"""The CuPy backend: every op a hand-written CUDA kernel from ``kernels/*.cu``.

Each kernel instantiation (a name expression of
:func:`nnfast.backends.cuda_launch.name_expressions`) is compiled by NVRTC the
first time a launch needs it, on its own, and kept in a disk cache
(:mod:`~nnfast.backends.cuda_compile`); :func:`warm_up` compiles a list of
them (or all) ahead of time in parallel processes. Compiled functions are
kept per device. The op methods below are thin: they allocate the outputs,
ask :mod:`~nnfast.backends.cuda_launch` for the instantiation and launch
configuration, and launch. Arguments were already validated by
:class:`~nnfast.backends.base.Backend`.

Importing this module never imports CuPy; :func:`cupy_unavailable_reason`
says, without raising, why the backend cannot run on this machine.

Bad labels in the cross-entropy are detected on the device (a flag written by
the kernel, never a device-side assert, so the CUDA context stays usable),
copied to pinned host memory asynchronously, and raised as ``ValueError``
when a result is read: when the returned loss is converted to a host value,
by :meth:`CupyBackend.to_numpy` or :meth:`CupyBackend.synchronize`, or by a
later cross-entropy call once the earlier one has finished
(:mod:`~nnfast.backends.cuda_label_checks`). No call waits for the device.

A guarded training step (:mod:`nnfast.train_step.cuda_graph`) records the
launches of one step with :meth:`CupyBackend.recording` and replays them, or
captures them in a CUDA graph.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from typing import Any, ContextManager, NamedTuple

import numpy as np

from . import cuda_compile, cuda_launch, cuda_recording
from ..activations import saves_input
from ..precision import get_matmul_precision
from .base import Backend
from .cuda_label_checks import INFO_SIZE, LabelChecks, checked_array_class
from .cuda_recording import RecordedLaunch, Recording

_INSTALL_HINT = 'pip install "nnfast[cuda12]" (CUDA 12 driver) or pip install "nnfast[cuda13]" (CUDA 13 driver)'


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


@functools.lru_cache(maxsize=1)
def cupy_unavailable_reason() -> str | None:
    """Why the CuPy backend cannot run here (CuPy missing, no driver, no device...), or None.

    Never raises. Imports CuPy on first call only.
    """
    try:
        import cupy
    except ImportError as err:
        return f"CuPy is not installed ({err}); install it with: {_INSTALL_HINT}"
    except Exception as err:  # a broken installation raises anything
        return f"CuPy failed to import ({type(err).__name__}: {err}); reinstall it with: {_INSTALL_HINT}"
    try:
        runtime = cupy.cuda.runtime
        try:
            driver = runtime.driverGetVersion()
        except Exception:
            driver = 0
        if driver == 0:
            return ("no NVIDIA driver found (the CUDA driver library could not be loaded); "
                    "this machine needs an NVIDIA GPU with its driver installed")
        built = runtime.runtimeGetVersion()
        try:
            count = runtime.getDeviceCount()
        except runtime.CUDARuntimeError as err:
            text = str(err)
            if "InsufficientDriver" in text:
                return (f"the NVIDIA driver is too old: it supports CUDA {_cuda_version(driver)} but this "
                        f"CuPy needs CUDA {_cuda_version(built)}; update the driver or install the CuPy "
                        f"build for your CUDA version: {_INSTALL_HINT}")
            if "NoDevice" in text:
                return "no CUDA device found (CuPy and the driver are installed, but no GPU answers)"
            return f"CUDA is not usable: {text}"
        if count < 1:
            return "no CUDA device found (CuPy and the driver are installed, but no GPU answers)"
        try:
            from cupy_backends.cuda.libs import nvrtc

            nvrtc.getVersion()
        except Exception as err:
            return (f"the NVRTC runtime compiler is missing ({err}); install it with: "
                    "pip install nvidia-cuda-nvrtc-cu12 (or nvidia-cuda-nvrtc for CUDA 13)")
        cupy.cuda.Device(0).compute_capability  # the device answers
    except Exception as err:
        return f"CUDA is not usable: {type(err).__name__}: {err}"
    return None


# --------------------------------------------------------------------- kernels
_functions: dict[tuple[int, str, str], Any] = {}
_arch: dict[int, str] = {}
_functions_lock = threading.Lock()

#: Compile instantiations into the disk cache ahead of their first launch (see cuda_compile.warm_up).
warm_up = cuda_compile.warm_up


def _current_device() -> int:
    import cupy

    return int(cupy.cuda.runtime.getDevice())


def _function(file: str, kernel: str) -> Any:
    """The compiled kernel ``kernel`` (a name expression) of ``kernels/<file>``, on the current device."""
    device = _current_device()
    fn = _functions.get((device, file, kernel))
    if fn is not None:
        return fn
    with _functions_lock:
        fn = _functions.get((device, file, kernel))
        if fn is None:
            import cupy

            arch = _arch.get(device)
            if arch is None:
                arch = _arch[device] = cuda_compile.arch_for(cupy.cuda.Device(device).compute_capability)
            compiled = cuda_compile.compile_kernel(file, kernel, arch)
            fn = cupy.RawModule(path=str(compiled.path)).get_function(compiled.lowered)
            _functions[(device, file, kernel)] = fn
    return fn


def _launch(launch: cuda_launch.Launch, *args: Any) -> None:
    # Listed before the launch, so a launch that raises (a compile error, a bad configuration) is still named.
    for seen in cuda_recording.listeners:
        seen.append(launch)
    fn = _function(launch.file, launch.kernel)
    if launch.shared_mem > cuda_launch.DEFAULT_SHARED_MEM and fn.max_dynamic_shared_size_bytes < launch.shared_mem:
        fn.max_dynamic_shared_size_bytes = launch.shared_mem  # a block above 48 KiB must be allowed first
    recording = cuda_recording.current()
    if recording is None:
        fn(launch.grid, launch.block, args, shared_mem=launch.shared_mem)
    else:
        recording.launches.append(RecordedLaunch(fn, launch.grid, launch.block, args, launch.shared_mem))


_NULL = np.uint64(0)


def _ptr(a: Any) -> int:
    return 0 if a is None else a.data.ptr


def _arg(a: Any) -> Any:
    """An array argument, or a null pointer for None."""
    return _NULL if a is None else a


def _aligned(*arrays: Any) -> bool:
    return cuda_launch.is_aligned(*(_ptr(a) for a in arrays if a is not None))


class _DeviceInfo(NamedTuple):
    sm_count: int
    memory: int | None
    max_shared: int  # shared memory a block may have once its kernel's limit is raised
    tf32: bool  # TF32 tensor cores (and cp.async): compute capability 8.0 on


class CupyBackend(Backend):
    """Every op a hand-written CUDA kernel (``kernels/*.cu``) launched through CuPy."""

    name = "cupy"
    xp: Any = None  # set to the cupy module when the backend is created

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._cupy = cupy
        self._labels = LabelChecks(cupy)
        self._tables: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self._devices: dict[int, _DeviceInfo] = {}

    # ------------------------------------------------------------------ device
    def _device(self) -> _DeviceInfo:
        """SM count and memory size of the current device, asked of the driver once per device."""
        device = int(self._cupy.cuda.runtime.getDevice())
        info = self._devices.get(device)
        if info is None:
            d = self._cupy.cuda.Device(device)
            try:
                sm_count = int(d.attributes["MultiProcessorCount"])
            except Exception:
                sm_count = cuda_launch.DEFAULT_SM_COUNT
            try:
                memory: int | None = int(d.mem_info[1])
            except Exception:
                memory = None
            try:
                max_shared = int(d.attributes["MaxSharedMemoryPerBlockOptin"])
            except Exception:
                max_shared = cuda_launch.DEFAULT_SHARED_MEM
            try:
                tf32 = int(d.compute_capability) >= 80
            except Exception:
                tf32 = False
            info = self._devices[device] = _DeviceInfo(sm_count, memory, max_shared, tf32)
        return info

    @property
    def _sm_count(self) -> int:
        return self._device().sm_count

    def memory_limit(self) -> int | None:
        """Bytes of memory of the current device."""
        return self._device().memory

    def launch_settings(self) -> tuple[Any, ...]:
        """The current device and the GEMM path pinned by ``cuda_launch.forced_gemm``, if any."""
        return (int(self._cupy.cuda.runtime.getDevice()), cuda_launch.gemm_plan.forced_now())

    # ------------------------------------------------------------------ arrays
    def to_numpy(self, a: Any) -> np.ndarray:
        """Copy ``a`` to the host, after raising any pending bad-label error."""
        self._check_pending()
        if isinstance(a, self._cupy.ndarray):
            return self._cupy.ndarray.get(a)
        return np.asarray(a)

    def synchronize(self) -> None:
        """Wait for every queued kernel, then raise any pending bad-label error."""
        self._cupy.cuda.get_current_stream().synchronize()
        self._check_pending()

    def _check_pending(self) -> None:
        """Wait for every pending cross-entropy flag and read it (oldest first); raise on the first bad label."""
        self._labels.check_all()

    def _poll_pending(self) -> None:
        """Read the flags of finished calls without waiting."""
        self._labels.poll()

    def recording(self) -> ContextManager[Recording]:
        """Record, in this thread, the launches the ops would make, instead of making them
        (:func:`nnfast.backends.cuda_recording.recording`)."""
        return cuda_recording.recording()

    def _copy_into(self, dst: Any, src: Any, stream: Any = None) -> None:
        """``dst[...] = src`` for two C-contiguous device arrays of one size, as one asynchronous
        copy on ``stream`` (default: the current one)."""
        cuda = self._cupy.cuda
        stream = cuda.get_current_stream() if stream is None else stream
        cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, cuda.runtime.memcpyDeviceToDevice,
                                 stream.ptr)

    def _scalar(self, dtype: Any, value: float) -> Any:
        return np.dtype(dtype).type(value)

    # ------------------------------------------------------------------ linear
    def _linear_forward(self, x, W, b, activation, alpha):
        cp = self._cupy
        M, K = x.shape
        N = W.shape[1]
        y = cp.empty((M, N), dtype=x.dtype)
        z = cp.empty((M, N), dtype=x.dtype) if saves_input(activation) else None
        plan = self._gemm_plan(M, N, K, x.dtype, activation=activation, aligned=_aligned(x, W, y, z))
        self._gemm(plan, y, z, x, W, b, M, N, K, alpha)
        return y, (z if z is not None else y)

    def _gemm_plan(self, M: int, N: int, K: int, dtype: Any, **kwargs: Any) -> cuda_launch.GemmPlan:
        """The GEMM's launch plan on this device, at the matmul precision in force: TF32 tensor cores for
        float32 under "high", on a device that has them (before compute capability 8.0 "high" allows
        what the device does not offer, and float32 runs, as in PyTorch)."""
        device = self._device()
        precision = get_matmul_precision() if device.tf32 else "highest"
        return cuda_launch.gemm_launch(M, N, K, dtype, precision=precision, sm_count=device.sm_count,
                                       max_shared=device.max_shared, **kwargs)

    def _gemm(self, plan, C, Z, A, B, bias, M, N, K, alpha=0.0):
        """Run a :class:`cuda_launch.GemmPlan`: one launch, or with split K the partial products then their sum."""
        t = self._scalar(C.dtype, alpha)
        dims = (np.int32(M), np.int32(N), np.int32(K))
        if plan.splits == 1:
            _launch(plan, C, _arg(Z), A, B, _arg(bias), *dims, t)
            return
        workspace = self._cupy.empty(plan.workspace_shape, dtype=C.dtype)
        _launch(plan, workspace, _NULL, A, B, _NULL, *dims, t)
        _launch(plan.reduce, C, _arg(Z), workspace, _arg(bias), np.int32(M), np.int32(N), np.int32(plan.splits), t)

    def _linear_backward(self, dy, x, W, saved, activation, alpha, has_bias, need_dx):
        cp = self._cupy
        M, N = dy.shape
        K = x.shape[1]
        dtype = x.dtype
        identity = activation == "identity"
        dz = dy if identity else cp.empty((M, N), dtype=dtype)
        db = cp.empty((N,), dtype=dtype) if has_bias else None
        if has_bias or not identity:
            plan = cuda_launch.bias_act_backward_launch(M, N, dtype, activation, has_bias=has_bias,
                                                        sm_count=self._sm_count)
            partial = None
            if has_bias:
                partial = db if plan.reduce is None else cp.empty((plan.splits, N), dtype=dtype)
            _launch(plan.main, _NULL if identity else dz, _arg(partial), dy, _NULL if identity else saved,
                    np.int32(M), np.int32(N), np.int32(plan.rows_per_split), self._scalar(dtype, alpha))
            if plan.reduce is not None:
                _launch(plan.reduce, db, partial, np.int32(plan.splits), np.int32(N))
        # dW[K, N] = x^T @ dz: x is read as the transposed operand in place.
        dW = cp.empty((K, N), dtype=dtype)
        plan = self._gemm_plan(K, N, M, dtype, trans_a=True, aligned=_aligned(x, dz, dW))
        self._gemm(plan, dW, None, x, dz, None, K, N, M)
        dx = None
        if need_dx:
            # dx[M, K] = dz @ W^T: W is read as the transposed operand in place.
            dx = cp.empty((M, K), dtype=dtype)
            plan = self._gemm_plan(M, K, N, dtype, trans_b=True, aligned=_aligned(dz, W, dx))
            self._gemm(plan, dx, None, dz, W, None, M, K, N)
        return dx, dW, db

    # ------------------------------------------------------------------ activations
    def _activation_forward(self, x, activation, alpha):
        if activation == "identity":
            cuda_recording.refuse_inside("an identity activation (a copy)")
            return x.copy()
        y = self._cupy.empty_like(x)
        launch, vec = cuda_launch.activation_launch(x.size, x.dtype, activation, backward=False,
                                                    aligned=_aligned(x, y), sm_count=self._sm_count)
        _launch(launch, y, x, np.int64(x.size), self._scalar(x.dtype, alpha), np.int32(vec))
        return y

    def _activation_backward(self, dy, saved, activation, alpha):
        if activation == "identity":
            cuda_recording.refuse_inside("an identity activation (a copy)")
            return dy.copy()
        dx = self._cupy.empty_like(dy)
        launch, vec = cuda_launch.activation_launch(dy.size, dy.dtype, activation, backward=True,
                                                    aligned=_aligned(dx, dy, saved), sm_count=self._sm_count)
        _launch(launch, dx, dy, saved, np.int64(dy.size), self._scalar(dy.dtype, alpha), np.int32(vec))
        return dx

    # ------------------------------------------------------------------ rows
    def _aligned_rows(self, x: Any) -> Any:
        # The row kernels need input and output to share their address modulo 16.
        if _aligned(x):
            return x
        cuda_recording.refuse_inside("a misaligned row view (copied)")
        return x.copy()

    def _softmax_rows(self, x, log):
        x = self._aligned_rows(x)
        y = self._cupy.empty_like(x)
        rows, cols = x.shape
        _launch(cuda_launch.softmax_launch(rows, cols, x.dtype, log=log), y, x, np.int32(rows), np.int32(cols))
        return y

    def _softmax(self, x):
        return self._softmax_rows(x, False)

    def _log_softmax(self, x):
        return self._softmax_rows(x, True)

    def _softmax_cross_entropy(self, logits, labels, label_smoothing, ignore_index, reduction):
        cp = self._cupy
        self._poll_pending()
        logits = self._aligned_rows(logits)
        rows, classes = logits.shape
        dtype = logits.dtype
        plan = cuda_launch.cross_entropy_launches(rows, classes, dtype, reduction)
        # Labels are int64: an ignore_index outside that range matches no label.
        ignore = np.int64(min(max(ignore_index, -(2**63)), 2**63 - 1))
        grad = cp.empty_like(logits)
        row_loss = cp.empty((rows,), dtype=dtype)
        info = cp.empty((INFO_SIZE,), dtype=np.int64)
        scale = cp.empty((1,), dtype=np.float64)
        _launch(plan.prepare, info, scale, labels, np.int32(rows), np.int32(classes), ignore,
                np.int32(plan.reduction_code))
        _launch(plan.rows, grad, row_loss, logits, labels, scale, np.int32(rows), np.int32(classes),
                self._scalar(dtype, label_smoothing), self._scalar(dtype, 1.0 / classes), ignore)
        if plan.reduce is not None:
            loss = cp.empty((), dtype=dtype)
            _launch(plan.reduce, loss, row_loss, scale, np.int32(rows))
        else:
            loss = row_loss
        recording = cuda_recording.current()
        if recording is None:
            self._labels.track(info, rows, classes, ignore_index)
        else:
            recording.label_checks.append((info, rows, classes, ignore_index))
        return self._checked(loss), grad

    def _checked(self, loss: Any) -> Any:
        """``loss`` as an array whose host reads raise a pending bad-label error first."""
        try:
            checked = loss.view(type=checked_array_class(self._cupy))
            checked._nnfast_backend = self
            return checked
        except Exception:  # pragma: no cover - an older CuPy without ndarray subclasses
            return loss

    # ------------------------------------------------------------------ optimizers
    def _multi_tensor_table(self, kind: str, dtype: Any, tensors: list[list[Any]]) -> tuple[Any, Any, Any, int]:
        """Device tables (pointers, sizes, chunks) of one multi-tensor launch, cached by address."""
        ptrs = tuple(_ptr(t) for group in tensors for t in group)
        sizes = tuple(int(group[0].size) for group in tensors)
        key = (kind, np.dtype(dtype).str, ptrs, sizes)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        cp = self._cupy
        chunks = cuda_launch.multi_tensor_chunks(sizes)
        dev_ptrs = cp.asarray(np.array(ptrs, dtype=np.int64))
        dev_sizes = cp.asarray(np.array(sizes, dtype=np.int64))
        dev_chunks = cp.asarray(np.array(chunks, dtype=np.int64).reshape(-1, 2) if chunks
                                else np.zeros((0, 2), dtype=np.int64))
        table = (dev_ptrs, dev_sizes, dev_chunks, len(chunks))
        self._tables[key] = table
        while len(self._tables) > 16:
            self._tables.popitem(last=False)
        return table

    @staticmethod
    def _by_dtype(*lists: list[Any]) -> dict[Any, list[list[Any]]]:
        groups: dict[Any, list[list[Any]]] = {}
        for items in zip(*lists):
            if items[0].size:
                groups.setdefault(items[0].dtype, []).append(list(items))
        return groups

    # ``control``: the control block of a guarded step (cuda_launch.STEP_CONTROL), read by the kernels
    # in place of host values; None for an eager step.
    def _sgd_update(self, params, grads, velocities, lr, momentum, nesterov, weight_decay, control=None):
        if momentum == 0.0:
            velocities = [None] * len(params)
        for dtype, tensors in self._by_dtype(params, grads, velocities).items():
            ptrs, sizes, chunks, count = self._multi_tensor_table("sgd", dtype, tensors)
            if count == 0:
                continue
            t = np.dtype(dtype).type
            launch = cuda_launch.optimizer_launch("sgd", count, dtype, sm_count=self._sm_count)
            _launch(launch, ptrs, sizes, chunks, np.int32(count), np.int32(cuda_launch.OPTIM_CHUNK),
                    t(lr), t(momentum), t(weight_decay), np.int32(bool(nesterov)), _arg(control))

    def _adam_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                     weight_decay, decoupled, control=None):
        step_size = lr / (1.0 - beta1**step)
        sqrt_bias2 = math.sqrt(1.0 - beta2**step)
        for dtype, tensors in self._by_dtype(params, grads, exp_avgs, exp_avg_sqs).items():
            ptrs, sizes, chunks, count = self._multi_tensor_table("adam", dtype, tensors)
            if count == 0:
                continue
            t = np.dtype(dtype).type
            launch = cuda_launch.optimizer_launch("adam", count, dtype, sm_count=self._sm_count)
            # 1 - beta and 1 - lr * wd in double here: on the device, from float betas, they cancel.
            _launch(launch, ptrs, sizes, chunks, np.int32(count), np.int32(cuda_launch.OPTIM_CHUNK),
                    t(1.0 - lr * weight_decay), t(1.0 - beta1), t(1.0 - beta2), t(eps), t(weight_decay),
                    np.int32(bool(decoupled)), t(step_size), t(sqrt_bias2), _arg(control))

    def _step_guard(self, control: Any, loss: Any, info: Any, rows: int, lr: float, beta1: float = 0.0,
                    beta2: float = 0.0) -> None:
        """The guard of a guarded step: skip its update when ``loss`` is not finite or ``info`` (of
        the step's cross-entropy) holds a bad label; else advance the step count in ``control``
        and form Adam's bias corrections (``beta1``, ``beta2``) for it."""
        _launch(cuda_launch.step_guard_launch(loss.dtype), control, loss, np.int64(loss.size), info,
                np.int32(rows), np.float64(lr), np.float64(beta1), np.float64(beta2))


__all__ = ["CupyBackend", "cupy_unavailable_reason", "warm_up"]
