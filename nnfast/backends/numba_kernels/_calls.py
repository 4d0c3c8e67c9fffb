"""Calling a compiled activation loop through its address, from compiled code.

The GEMM epilogue and the fused ``dz`` pass of the linear backward apply an
activation to a tile or a row at a time. If they called the activation's
loop directly, Numba would compile a copy of the whole GEMM for every
activation (a call links the callee into the caller's machine code). They
take the loop's address instead (an ``int64``, 0 for none) and call it
through these intrinsics, so the GEMM is compiled once per dtype and each
activation's loop once per dtype, when first used. An indirect call costs a
few nanoseconds per tile or row.

The loops are the C-callable kernels of :mod:`.activations`:
``forward(x, y, n, alpha)`` and ``backward(dy, saved, dx, n, alpha)`` on raw
pointers (``void(T*, T*, int64, T)`` / ``void(T*, T*, T*, int64, T)``). The
GEMM's fused optimizer epilogue calls the updates of :mod:`.optim` the same
way: ``update(p, grad, state1, state2, n, coefficients)``.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def ptr_at(typingctx, ptr, index):
    """``ptr + index`` (elements) for a data pointer (:func:`._simd.addr`)."""

    def codegen(context, builder, sig, args):
        return builder.gep(args[0], [args[1]])

    return ptr(ptr, index), codegen


def _call(builder, fn, args):
    fnty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    target = builder.inttoptr(fn, fnty.as_pointer())
    builder.call(target, args)


@intrinsic
def call_forward(typingctx, fn, x, y, n, alpha):
    """``fn(x, y, n, alpha)``: an activation's forward loop at address ``fn`` over ``n`` values."""

    def codegen(context, builder, sig, args):
        _call(builder, args[0], list(args[1:]))
        return context.get_dummy_value()

    return types.none(fn, x, y, n, alpha), codegen


@intrinsic
def call_backward(typingctx, fn, dy, saved, dx, n, alpha):
    """``fn(dy, saved, dx, n, alpha)``: an activation's backward loop at address ``fn``."""

    def codegen(context, builder, sig, args):
        _call(builder, args[0], list(args[1:]))
        return context.get_dummy_value()

    return types.none(fn, dy, saved, dx, n, alpha), codegen


@intrinsic
def call_update(typingctx, fn, p, g, s1, s2, n, coef):
    """``fn(p, g, s1, s2, n, coef)``: an optimizer update (:func:`.optim.update_kernel`) at address ``fn``."""

    def codegen(context, builder, sig, args):
        _call(builder, args[0], list(args[1:]))
        return context.get_dummy_value()

    return types.none(fn, p, g, s1, s2, n, coef), codegen
