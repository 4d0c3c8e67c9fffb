"""Dynamic scheduling of ``prange`` loops that stays cacheable.

Numba splits a ``prange`` loop into one equal piece per thread unless a
*parallel chunk size* is set; with a chunk size of 1, each iteration is a
work item of its own, and on the TBB threading layer (see
:mod:`.threading_layer`) the free threads take them as they go, so a thread
slowed down by another process holds back one item, not half the loop. The
kernels' loops iterate over chunks or row blocks sized so that one item is
worth scheduling (:data:`.activations.CHUNK`, ...).

:func:`numba.set_parallel_chunksize` does that, but called from compiled
code it goes through a ``ctypes`` pointer, which stops Numba from caching the
kernel on disk (every process would recompile it). :func:`set_chunksize`
calls the same C function of Numba's scheduler by its symbol instead. The
symbol is registered when Numba starts its threads, which it does before
compiling or loading from the cache any function with a ``prange`` loop, the
only place this is used.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic


@intrinsic
def set_chunksize(typingctx, n):
    """Set this thread's parallel chunk size; returns the previous one (restore it after the loop)."""
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()  # registers the symbol

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(cgutils.intp_t, [cgutils.intp_t])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "set_parallel_chunksize")
        return builder.call(fn, [context.cast(builder, args[0], sig.args[0], types.intp)])

    return types.intp(n), codegen
