"""Compute stand-in on the GPU: ``spin_kernel(ns)`` keeps one thread busy for ``ns``
nanoseconds of the GPU's global timer, on the stream it is launched on. The cuda
device's ``compute`` launches it behind the commits queued before (so a layer's compute
starts once its weights landed, as on the emulated device's timeline)."""

from __future__ import annotations

from llvmlite import ir
from numba import cuda, types
from numba.core.extending import intrinsic


@intrinsic
def _globaltimer(typingctx):
    """The GPU's nanosecond global timer (PTX ``%globaltimer``)."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        read = ir.InlineAsm(ir.FunctionType(ir.IntType(64), []), "mov.u64 $0, %globaltimer;", "=l",
                            side_effect=True)
        return builder.call(read, [])
    return sig, codegen


@cuda.jit(cache=True)
def spin_kernel(ns):
    start = _globaltimer()
    while _globaltimer() - start < ns:
        pass
