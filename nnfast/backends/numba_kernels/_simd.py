"""Explicit 256-bit SIMD values for Numba kernels (AVX2/FMA), plus bit casts.

LLVM's auto-vectoriser does not keep a GEMM accumulator tile in registers
when it is written as a local array or as scalars (measured: it spills the
tile to the stack every iteration, ~5 GFLOP/s per core). So the GEMM
micro-kernel uses an LLVM vector type directly: :class:`SimdType` is a Numba
type whose machine representation is ``<8 x float>`` / ``<4 x double>``, and
the intrinsics below lower to one instruction each (``vmovups``,
``vbroadcastss``, ``vfmadd231ps``). Numba keeps local variables of this type
in SSA registers, so a 6x16 tile of twelve ``ymm`` accumulators stays in
registers for the whole K loop.

The memory intrinsics take a C-contiguous 1-D array or a data pointer
(:func:`addr`); callers guarantee ``0 <= i`` and ``i + lanes <= len(arr)``
(these intrinsics do not check).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

#: Register width in bits: AVX2 ``ymm``.
SIMD_BITS = 256


class SimdType(types.Type):
    """A vector of ``lanes`` floats of ``dtype`` held in one SIMD register."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"simd<{dtype}x{lanes}>")


@register_model(SimdType)
class _SimdModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        be_type = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.lanes)
        super().__init__(dmm, fe_type, be_type)


def _simd_of(dtype):
    return SimdType(dtype, SIMD_BITS // dtype.bitwidth)


def _element_ptr(context, builder, aryty, ary, idx):
    if isinstance(aryty, types.CPointer):
        return builder.gep(ary, [idx])
    arr = context.make_array(aryty)(context, builder, ary)
    return builder.gep(arr.data, [idx])


@intrinsic
def addr(typingctx, arr):
    """The data pointer of ``arr`` (no reference count: the caller keeps ``arr`` alive).

    Hot helpers take pointers rather than arrays so that calling them costs
    no atomic reference-count updates (and no register spills around them).
    """

    def codegen(context, builder, sig, args):
        return context.make_array(sig.args[0])(context, builder, args[0]).data

    return types.CPointer(arr.dtype)(arr), codegen


@intrinsic
def vlanes(typingctx, arr):
    """Lanes of a SIMD vector of ``arr``'s dtype, as a compile-time constant."""
    lanes = SIMD_BITS // arr.dtype.bitwidth

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), lanes)

    return types.int64(arr), codegen


@intrinsic
def vload(typingctx, arr, idx):
    """``arr[idx : idx + lanes]`` as a vector (unaligned load)."""
    vt = _simd_of(arr.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        llvt = context.get_value_type(vt)
        vptr = builder.bitcast(ptr, llvt.as_pointer())
        return builder.load(vptr, align=vt.dtype.bitwidth // 8)

    return vt(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """``arr[idx : idx + lanes] = v`` (unaligned store)."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        vptr = builder.bitcast(ptr, args[2].type.as_pointer())
        builder.store(args[2], vptr, align=sig.args[2].dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


def _splat(builder, scalar, vec_type):
    undef = ir.Constant(vec_type, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(ir.IntType(32), 0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vec_type.count), [0] * vec_type.count)
    return builder.shuffle_vector(one, undef, mask)


@intrinsic
def vbroadcast(typingctx, arr, idx):
    """A vector with every lane ``arr[idx]`` (``vbroadcastss``)."""
    vt = _simd_of(arr.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        return _splat(builder, builder.load(ptr), context.get_value_type(vt))

    return vt(arr, idx), codegen


@intrinsic
def vzero(typingctx, arr):
    """A zero vector of ``arr``'s dtype."""
    vt = _simd_of(arr.dtype)

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(arr), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` per lane, one rounding (``vfmadd231ps``)."""

    def codegen(context, builder, sig, args):
        vty = args[0].type
        suffix = f"v{vty.count}f{sig.args[0].dtype.bitwidth}"
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, vty]), f"llvm.fma.{suffix}")
        return builder.call(fn, list(args))

    return a(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    """``a + b`` per lane."""

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vsub(typingctx, a, b):
    """``a - b`` per lane."""

    def codegen(context, builder, sig, args):
        return builder.fsub(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vmul(typingctx, a, b):
    """``a * b`` per lane (never contracted with an add: the same rounding as scalar code)."""

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vdiv(typingctx, a, b):
    """``a / b`` per lane."""

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vsqrt(typingctx, a):
    """``sqrt(a)`` per lane (correctly rounded, as ``np.sqrt``)."""

    def codegen(context, builder, sig, args):
        vty = args[0].type
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty]), f"llvm.sqrt.v{vty.count}f{sig.args[0].dtype.bitwidth}")
        return builder.call(fn, [args[0]])

    return a(a), codegen


@intrinsic
def vsplat(typingctx, arr, value):
    """A vector of ``arr``'s dtype with every lane ``value`` (already of that dtype)."""
    vt = _simd_of(arr.dtype)

    def codegen(context, builder, sig, args):
        return _splat(builder, args[1], context.get_value_type(vt))

    return vt(arr, value), codegen


@intrinsic
def vselect_gt(typingctx, a, b, x, y):
    """``x if a > b else y`` per lane (ordered: a NaN ``a`` picks ``y``, as the scalar ``if``)."""

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[2], args[3])

    return x(a, b, x, y), codegen


@intrinsic
def vrelu(typingctx, a):
    """``0 if a < 0 else a`` per lane (NaN passes through, like ``np.maximum``)."""

    def codegen(context, builder, sig, args):
        zero = ir.Constant(args[0].type, None)
        return builder.select(builder.fcmp_ordered("<", args[0], zero), zero, args[0])

    return a(a), codegen


@intrinsic
def vmax(typingctx, a, b):
    """``a if a > b else b`` per lane (``vmaxps``)."""

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vlane(typingctx, v, i):
    """Lane ``i`` of ``v`` as a scalar."""

    def codegen(context, builder, sig, args):
        idx = builder.trunc(args[1], ir.IntType(32)) if args[1].type.width > 32 else args[1]
        return builder.extract_element(args[0], idx)

    return v.dtype(v, i), codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the cache line holding ``arr[idx]`` into L1 for writing (``prefetchw``)."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 1), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, idx), codegen


# ------------------------------------------------------------- bit casts
@intrinsic
def f32_from_bits(typingctx, i):
    """Reinterpret the low 32 bits of an integer as a float32."""

    def codegen(context, builder, sig, args):
        v = builder.trunc(args[0], ir.IntType(32)) if args[0].type.width > 32 else args[0]
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


__all__ = ["SimdType", "addr", "f32_from_bits", "prefetch", "vadd", "vbroadcast", "vdiv", "vfma", "vlane",
           "vlanes", "vload", "vmax", "vmul", "vrelu", "vselect_gt", "vsplat", "vsqrt", "vstore", "vsub", "vzero"]
