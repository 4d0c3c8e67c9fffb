"""Raw addresses and dynamic scheduling for kernels that are driven by descriptors.

The GEMM task and the fused training step are compiled once per dtype and
take their operands as addresses in an ``int64`` descriptor (see
:mod:`.gemm`), so that one compiled body serves every shape, layer, epilogue
and caller. These intrinsics turn such an address back into a typed pointer,
call a compiled task through its address, and hand out task numbers with an
atomic counter.

Dynamic scheduling: a parallel region starts one worker per thread, and each
worker takes the next task number from a shared counter until none is left
(:func:`next_task`). A thread that starts late, or shares its core with
another process, simply takes fewer tasks: the region does not wait for a
fixed share of the work to finish on the slowest thread, which is what a
static split does.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def as_ptr(typingctx, address, like):
    """The ``int64`` ``address`` as a pointer to ``like``'s dtype (``like``: an array or a pointer)."""
    dtype = like.dtype

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(dtype)))

    return types.CPointer(dtype)(address, like), codegen


@intrinsic
def address_of(typingctx, ptr):
    """A data pointer as an ``int64`` address (for a descriptor)."""

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.int64(ptr), codegen


@intrinsic
def call_task(typingctx, fn, desc, fparams, t, worker):
    """``fn(desc, fparams, t, worker)``: a compiled task (``void(int64*, T*, int64, int64)``) at address ``fn``."""

    def codegen(context, builder, sig, args):
        values = list(args[1:])
        fnty = ir.FunctionType(ir.VoidType(), [v.type for v in values])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), values)
        return context.get_dummy_value()

    return types.none(fn, desc, fparams, t, worker), codegen


@intrinsic
def next_task(typingctx, counter):
    """Atomically ``counter[0] += 1``; returns the value before (the caller's task number)."""

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        one = ir.Constant(ir.IntType(64), 1)
        return builder.atomic_rmw("add", arr.data, one, "seq_cst")

    return types.int64(counter), codegen


__all__ = ["address_of", "as_ptr", "call_task", "next_task"]
