"""Launch configuration of every CUDA kernel in ``kernels/``, in pure Python.

This module decides, from shapes and dtype alone, everything a kernel launch
needs: which template instantiation (its name expression), the grid, the
block and the bytes of dynamic shared memory. It also expands the op table's
kernel templates (``Op.cuda`` in :mod:`nnfast.ops`) into the one list of
every instantiation of every ``kernels/*.cu`` file (:func:`name_expressions`),
from which the CuPy backend compiles the ones it launches, the NVRTC test
compiles all, and a CPU emulation of the kernels can instantiate them. It
imports neither CuPy nor any CUDA library, so it works on any machine.

Every kernel keeps all of its shared memory dynamic
(``extern __shared__ float4 smem[]``), so :attr:`Launch.shared_mem` is the
whole of it.
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..activations import CODES as ACTIVATION_CODES
from ..op_spec import Kernel
from ..ops import GEMM, GEMM_TF32, OPS
from ..precision import PRECISIONS
from . import cuda_headers, gemm_plan
from .gemm_plan import GEMM_TILES, GemmTile

#: The kernel sources, one CuPy ``RawModule`` each: every file of the op table.
KERNEL_FILES = tuple(dict.fromkeys(cuda.file for op in OPS.values() for cuda in op.kernel_files))

#: NVRTC options used for every file (the test adds ``-arch``); see :func:`compile_options`.
COMPILE_OPTIONS = ("--std=c++17",)

#: Kernel files that include a CUDA header NVRTC does not bring (``<mma.h>``): compiled only
#: when used (matmul precision "high"), with the include directories of
#: :func:`nnfast.backends.cuda_headers.mma_include_dirs`.
MMA_FILES = ("linear_tf32.cu",)

#: Dynamic shared memory a block may use without raising its kernel's limit, and the most
#: assumed when the caller does not pass the device's opt-in limit (sm_90: 227 KiB).
DEFAULT_SHARED_MEM = 48 * 1024
DEFAULT_MAX_SHARED_MEM = 232448


#: Streaming multiprocessors assumed when the caller does not pass the device's
#: count (an H100 SXM has 132). Only grid sizes of grid-stride kernels and the
#: choice between tile sizes depend on it, never correctness.
DEFAULT_SM_COUNT = 132

#: ``reduction`` of the cross-entropy as the kernels' integer code.
REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}

_CTYPES = {"float32": "float", "float64": "double"}
_ITEMSIZE = {"float": 4, "double": 8}
#: Elements per 128-bit vector.
_VEC_WIDTH = {"float": 4, "double": 2}

#: Threads per row of the softmax / cross-entropy kernels (32: one warp per row,
#: eight rows per block; more: one block per row), by the longest row each serves.
ROW_THREADS = ((1024, 32), (4096, 128), (16384, 256), (None, 512))

#: Elements per chunk of the multi-tensor optimizer kernels.
OPTIM_CHUNK = 4096

_ELEMENTWISE_THREADS = 256
_PREPARE_THREADS = 512


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the instantiation, its file and its configuration."""

    file: str
    kernel: str  # the name expression, e.g. "act_forward<float, 1>"
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0


# ------------------------------------------------------------------ helpers
def ctype(dtype: Any) -> str:
    """The C type of a NumPy dtype: ``"float"`` or ``"double"``."""
    name = np.dtype(dtype).name
    try:
        return _CTYPES[name]
    except KeyError:
        raise TypeError(f"dtype: expected float32 or float64, got {name}") from None


def vec_width(dtype: Any) -> int:
    """Elements of ``dtype`` per 128-bit vector."""
    return _VEC_WIDTH[ctype(dtype)]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _act_code(activation: str) -> int:
    return ACTIVATION_CODES[activation]


def row_threads(cols: int) -> int:
    """Threads per row for a row of ``cols`` values."""
    for limit, threads in ROW_THREADS:
        if limit is None or cols <= limit:
            return threads
    raise AssertionError("unreachable")  # pragma: no cover


def _rows_per_block(rt: int) -> int:
    return 8 if rt == 32 else 1


def _row_scratch(rt: int, c: str) -> int:
    return 3 * (rt // 32) * _ITEMSIZE[c] if rt > 32 else 0


# ------------------------------------------------------------------ the instantiations
def _gemm_name(c: str, t: GemmTile, ta: bool, tb: bool, act: int, vec: bool) -> str:
    if c == "tf32":
        return _format(GEMM_TF32, TF32_TILE=t, TA=ta, TB=tb, ACT=act, VEC=vec)  # = GEMM_TF32_SCALAR's
    return _format(GEMM, T=c, TILE=t, TA=ta, TB=tb, ACT=act, VEC=vec)


def _format(template: str, **values: Any) -> str:
    """A name expression: ``template`` with its placeholders filled (bools as C++ literals,
    activations by code, tiles as their comma-separated sizes)."""
    def text(v: Any) -> str:
        if isinstance(v, bool):
            return _bool(v)
        if isinstance(v, str) and v in ACTIVATION_CODES:
            return str(ACTIVATION_CODES[v])
        if isinstance(v, GemmTile):
            return f"{v.bm}, {v.bn}, {v.bk}, {v.wm}, {v.wn}, {v.stages}"
        if isinstance(v, (tuple, list)):
            return ", ".join(map(str, v))
        return str(v)

    return template.format(**{k: text(v) for k, v in values.items()})


#: Every value a template placeholder ranges over, per C type, unless the op fixes it.
AXES: dict[str, Callable[[str], Sequence[Any]]] = {
    "TILE": lambda c: list(GEMM_TILES[c].values()),
    "TF32_TILE": lambda c: list(GEMM_TILES["tf32"].values()),
    "TF32_SCALAR_TILE": lambda c: [t for t in GEMM_TILES["tf32"].values() if t.scalar],
    "ACT": lambda c: list(ACTIVATION_CODES.values()),
    "VEC": lambda c: (False, True),
    "ROWS": lambda c: [rt for _, rt in ROW_THREADS],
}


def expand(kernel: Kernel) -> list[str]:
    """Every name expression of one kernel template: its free placeholders over their :data:`AXES`.

    ``T`` ranges over float and double; a template without ``T`` (a kernel
    that is not a template over the float type) is one instantiation.
    """
    fields = [f for _, f, _, _ in string.Formatter().parse(kernel.template) if f]
    free = [f for f in fields if f != "T" and f not in kernel.fixed]
    unknown = [f for f in free if f not in AXES]
    if unknown:
        raise ValueError(f"{kernel.template}: no values for {', '.join(unknown)}; fix them in the op table")
    names = []
    for c in (("float", "double") if "T" in fields else (None,)):
        for combo in itertools.product(*(AXES[f](c) for f in free)):
            names.append(_format(kernel.template, **({"T": c} if c else {}), **kernel.fixed,
                                 **dict(zip(free, combo))))
    return names


def name_expressions(file: str) -> list[str]:
    """Every template instantiation compiled from ``kernels/<file>``: the kernels of the op table's rows."""
    if file not in KERNEL_FILES:
        raise ValueError(f"file: expected one of {KERNEL_FILES}, got {file!r}")
    names = [name for op in OPS.values() for cuda in op.kernel_files if cuda.file == file
             for kernel in cuda.kernels for name in expand(kernel)]
    return list(dict.fromkeys(names))


def compile_options(file: str) -> tuple[str, ...]:
    """NVRTC options of ``kernels/<file>`` (the architecture aside): the include directories of
    ``<mma.h>`` for :data:`MMA_FILES` (``BackendError`` when they are missing)."""
    if file in MMA_FILES:
        return COMPILE_OPTIONS + tuple(f"-I{d}" for d in cuda_headers.mma_include_dirs())
    return COMPILE_OPTIONS


def all_name_expressions() -> dict[str, list[str]]:
    """``{file: name_expressions(file)}`` for every kernel file."""
    return {f: name_expressions(f) for f in KERNEL_FILES}


# ------------------------------------------------------------------ sources
def kernel_dir() -> Path:
    """The directory holding the ``*.cu`` / ``*.cuh`` sources.

    Installed wheels ship them as ``nnfast/kernels/``; a source checkout keeps
    them in ``kernels/`` at the repository root.
    """
    pkg = Path(__file__).resolve().parents[1]  # the nnfast package
    for candidate in (pkg / "kernels", pkg.parent / "kernels"):
        if (candidate / KERNEL_FILES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"nnfast CUDA kernel sources not found in {pkg / 'kernels'} or {pkg.parent / 'kernels'}"
    )


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def load_source(file: str, directory: Path | None = None) -> str:
    """The text of ``kernels/<file>`` with its local ``#include "x.cuh"`` inlined.

    Inlining makes the source self-contained, so a compile cache keyed on the
    source text (CuPy's) also sees changes to the headers. Each header is
    inlined once (the headers have include guards as well).
    """
    directory = kernel_dir() if directory is None else Path(directory)
    seen: set[str] = set()

    def expand(name: str) -> str:
        text = (directory / name).read_text(encoding="utf-8")

        def repl(match: re.Match[str]) -> str:
            inc = match.group(1)
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            return f"// ---- begin {inc}\n{expand(inc)}\n// ---- end {inc}"

        return _INCLUDE.sub(repl, text)

    return expand(file)


# ------------------------------------------------------------------ launches
def activation_launch(n: int, dtype: Any, activation: str, *, backward: bool, aligned: bool,
                      sm_count: int = DEFAULT_SM_COUNT) -> tuple[Launch, bool]:
    """Element-wise activation over ``n`` values; returns ``(launch, vec)``.

    ``aligned``: every pointer the kernel touches is 16-byte aligned, so the
    body can move 128-bit vectors (``vec`` argument of the kernel).
    """
    c = ctype(dtype)
    kind = "act_backward" if backward else "act_forward"
    items = n // _VEC_WIDTH[c] if aligned else n
    blocks = max(1, min(_cdiv(max(items, 1), _ELEMENTWISE_THREADS), sm_count * 8))
    return (Launch("activations.cu", f"{kind}<{c}, {_act_code(activation)}>", (blocks, 1, 1),
                   (_ELEMENTWISE_THREADS, 1, 1)), bool(aligned))


@dataclass(frozen=True)
class GemmPlan(Launch):
    """A GEMM: the ``gemm`` launch itself (this object's fields) and, with split K, its second pass.

    With ``splits`` > 1 the ``gemm`` launch takes a workspace of
    ``workspace_shape`` in place of C, no Z and no bias (its epilogue is the
    identity), and ``reduce`` (``gemm_splitk_reduce``) then adds the partial
    products and applies bias and activation: arguments ``(C, Z, workspace,
    bias, M, N, splits, alpha)``.
    """

    splits: int = 1
    reduce: Launch | None = None
    workspace_shape: tuple[int, int, int] | None = None


#: Pin the GEMM tile and / or split-K factor inside a ``with`` block (see :func:`gemm_plan.forced`).
forced_gemm = gemm_plan.forced


def gemm_launch(M: int, N: int, K: int, dtype: Any, *, trans_a: bool = False, trans_b: bool = False,
                activation: str = "identity", aligned: bool = False, precision: str = "highest",
                sm_count: int = DEFAULT_SM_COUNT, max_shared: int = DEFAULT_MAX_SHARED_MEM) -> GemmPlan:
    """``C[M, N] = act(op(A) @ op(B) + bias)`` (see ``kernels/linear.cu``).

    ``aligned``: every pointer (A, B, C and Z) is 16-byte aligned. Vector
    copies and stores are used when that holds and every leading dimension is
    a multiple of the vector width. Transposed operands take the identity
    epilogue only. ``precision`` "high" runs a float32 GEMM on the tensor cores
    in TF32 (``kernels/linear_tf32.cu``); float64 ignores it. The tile and the
    split-K factor come from :func:`gemm_plan.choose` (or :func:`forced_gemm`),
    among the tiles whose shared memory fits ``max_shared`` bytes (the device's
    opt-in limit per block); a launch above :data:`DEFAULT_SHARED_MEM` needs
    its kernel's limit raised first.
    """
    c = ctype(dtype)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if (trans_a or trans_b) and activation != "identity":
        raise ValueError("gemm: transposed-operand variants have the identity epilogue only")
    if trans_a and trans_b:
        raise ValueError("gemm: at most one operand is transposed")
    if min(M, N, K) < 1:
        raise ValueError(f"gemm: M, N and K must be positive, got {M}, {N}, {K}")
    w = _VEC_WIDTH[c]
    lda = M if trans_a else K
    ldb = K if trans_b else N
    vec = bool(aligned) and lda % w == 0 and ldb % w == 0 and N % w == 0
    kind = "tf32" if precision == "high" and c == "float" else c

    def shared(tile: GemmTile) -> int:
        return tile.shared_mem(_ITEMSIZE[c], w, trans_a=trans_a, trans_b=trans_b)

    def unusable(tile: GemmTile) -> str | None:
        if shared(tile) > max_shared:
            return f"{shared(tile)} bytes of shared memory, the device gives a block {max_shared}"
        if kind == "tf32" and not vec and not tile.scalar:
            return "no scalar-path instantiation (operands misaligned or sizes not multiples of 4)"
        return None

    name, splits = gemm_plan.choose(M, N, K, kind, _ITEMSIZE[c], sm_count, unusable)
    tile = GEMM_TILES[kind][name]
    if _cdiv(N, tile.bn) > 65535:
        raise ValueError(f"gemm: {N} output columns exceed the {65535 * tile.bn} one launch covers")
    act = _act_code(activation)
    grid = (_cdiv(M, tile.bm), _cdiv(N, tile.bn), splits)
    main = dict(file="linear_tf32.cu" if kind == "tf32" else "linear.cu", grid=grid, block=(tile.threads, 1, 1),
                shared_mem=shared(tile))
    if splits == 1:
        return GemmPlan(kernel=_gemm_name(kind, tile, trans_a, trans_b, act, vec), **main)
    # Second pass: threads along the columns of a row, rows grid-striding along y.
    gx = _cdiv(N, _ELEMENTWISE_THREADS)
    gy = max(1, min(M, 65535, _cdiv(sm_count * 8, gx)))
    reduce = Launch("linear.cu", f"gemm_splitk_reduce<{c}, {act}>", (gx, gy, 1), (_ELEMENTWISE_THREADS, 1, 1))
    return GemmPlan(kernel=_gemm_name(kind, tile, trans_a, trans_b, 0, vec), **main, splits=splits, reduce=reduce,
                    workspace_shape=(splits, M, N))


@dataclass(frozen=True)
class BiasActBackward:
    """dz = dy * act'(saved) and the bias gradient: one or two launches."""

    main: Launch
    rows_per_split: int
    splits: int
    reduce: Launch | None  # column_sum over the splits, when there is more than one


def bias_act_backward_launch(M: int, N: int, dtype: Any, activation: str, *, has_bias: bool,
                             sm_count: int = DEFAULT_SM_COUNT) -> BiasActBackward:
    """Launches of the fused ``dz`` / bias-gradient kernel for an ``M x N`` gradient.

    Blocks cover 32 columns by ``rows_per_split`` rows, enough of them to fill
    the device. With a bias and more than one split, each split writes partial
    column sums that ``column_sum`` adds in a fixed order.
    """
    c = ctype(dtype)
    by = 8
    gx = _cdiv(N, 32)
    splits = max(1, min(_cdiv(4 * sm_count, gx), _cdiv(M, 32)))
    rows_per_split = _cdiv(M, splits)
    splits = _cdiv(M, rows_per_split)
    main = Launch("linear.cu", f"bias_act_backward<{c}, {_act_code(activation)}>", (gx, splits, 1),
                  (32, by, 1), by * 32 * _ITEMSIZE[c])
    reduce = None
    if has_bias and splits > 1:
        reduce = Launch("linear.cu", f"column_sum<{c}>", (max(1, min(_cdiv(N, 256), sm_count * 8)), 1, 1),
                        (256, 1, 1))
    return BiasActBackward(main, rows_per_split, splits, reduce)


def softmax_launch(rows: int, cols: int, dtype: Any, *, log: bool) -> Launch:
    """Softmax (or log-softmax) over the rows of a ``rows x cols`` matrix."""
    c = ctype(dtype)
    rt = row_threads(cols)
    rpb = _rows_per_block(rt)
    return Launch("softmax.cu", f"softmax_rows<{c}, {rt}, {_bool(log)}>", (_cdiv(rows, rpb), 1, 1),
                  (rt * rpb, 1, 1), _row_scratch(rt, c))


@dataclass(frozen=True)
class CrossEntropyLaunches:
    """The launches of the fused softmax cross-entropy (see ``kernels/cross_entropy.cu``)."""

    prepare: Launch
    rows: Launch
    reduce: Launch | None  # None for reduction "none"
    reduction_code: int


def cross_entropy_launches(rows: int, classes: int, dtype: Any, reduction: str) -> CrossEntropyLaunches:
    """Launches of the fused softmax cross-entropy over ``rows x classes`` logits."""
    c = ctype(dtype)
    rt = row_threads(classes)
    rpb = _rows_per_block(rt)
    prepare = Launch("cross_entropy.cu", "ce_prepare", (1, 1, 1), (_PREPARE_THREADS, 1, 1),
                     2 * (_PREPARE_THREADS // 32) * 4)
    main = Launch("cross_entropy.cu", f"ce_rows<{c}, {rt}>", (_cdiv(rows, rpb), 1, 1), (rt * rpb, 1, 1),
                  _row_scratch(rt, c))
    reduce = None
    if reduction != "none":
        reduce = Launch("cross_entropy.cu", f"ce_reduce<{c}>", (1, 1, 1), (_PREPARE_THREADS, 1, 1),
                        (_PREPARE_THREADS // 32) * 8)
    return CrossEntropyLaunches(prepare, main, reduce, REDUCTION_CODES[reduction])


def multi_tensor_chunks(sizes: Iterable[int], chunk: int = OPTIM_CHUNK) -> list[tuple[int, int]]:
    """``(tensor, start)`` of every chunk of ``chunk`` elements over tensors of ``sizes``."""
    return [(t, start) for t, size in enumerate(sizes) for start in range(0, int(size), chunk)]


def optimizer_launch(kind: str, num_chunks: int, dtype: Any, *, sm_count: int = DEFAULT_SM_COUNT) -> Launch:
    """The one launch updating every parameter: ``kind`` is ``"sgd"`` or ``"adam"``."""
    c = ctype(dtype)
    if kind not in ("sgd", "adam"):
        raise ValueError(f"kind: expected 'sgd' or 'adam', got {kind!r}")
    blocks = max(1, min(num_chunks, sm_count * 16))
    return Launch("optim.cu", f"{kind}_multi<{c}>", (blocks, 1, 1), (256, 1, 1))


#: The control block of a guarded training step (``kernels/optim.cu``, ``enum StepControl``):
#: float64 slots ``skip`` (1 when the step's update is skipped), ``step`` (updates applied so
#: far), ``step_size`` and ``sqrt_bias2`` (Adam's bias corrections of the current step).
STEP_CONTROL = {"skip": 0, "step": 1, "step_size": 2, "sqrt_bias2": 3}
STEP_CONTROL_SIZE = 4


def step_guard_launch(dtype: Any) -> Launch:
    """The guard of a guarded training step: one block, an int of shared memory."""
    return Launch("optim.cu", f"step_guard<{ctype(dtype)}>", (1, 1, 1), (_ELEMENTWISE_THREADS, 1, 1), 4)


def is_aligned(*ptrs: int) -> bool:
    """True when every address is a multiple of 16 bytes."""
    return all(p % 16 == 0 for p in ptrs)


def total_instantiations() -> int:
    """How many kernels :func:`name_expressions` lists over all files."""
    return sum(len(v) for v in all_name_expressions().values())


__all__ = [
    "COMPILE_OPTIONS",
    "DEFAULT_MAX_SHARED_MEM",
    "DEFAULT_SHARED_MEM",
    "DEFAULT_SM_COUNT",
    "GEMM_TILES",
    "GemmPlan",
    "KERNEL_FILES",
    "Launch",
    "MMA_FILES",
    "OPTIM_CHUNK",
    "REDUCTION_CODES",
    "ROW_THREADS",
    "STEP_CONTROL",
    "STEP_CONTROL_SIZE",
    "activation_launch",
    "all_name_expressions",
    "bias_act_backward_launch",
    "compile_options",
    "cross_entropy_launches",
    "ctype",
    "forced_gemm",
    "gemm_launch",
    "is_aligned",
    "kernel_dir",
    "load_source",
    "multi_tensor_chunks",
    "name_expressions",
    "optimizer_launch",
    "row_threads",
    "softmax_launch",
    "step_guard_launch",
    "total_instantiations",
]

