"""Hand-written Numba CPU kernels of the ``numba`` backend.

Modules:

* :mod:`.gemm` -- packed, cache-blocked GEMM with a 6x16 (float32) / 6x8
  (float64) register-tile micro-kernel and a fused bias + activation
  epilogue; transposed operands read in place.
* :mod:`.linear` -- linear forward / backward on top of the GEMM, with the
  ``dz`` / ``db`` pass fused.
* :mod:`.activations` -- element-wise forward / backward of every activation.
* :mod:`.softmax_ce` -- online-softmax row kernels: fused cross-entropy,
  softmax, log-softmax.
* :mod:`.optim` -- one-pass SGD and Adam / AdamW updates.
* :mod:`._simd`, :mod:`._math` -- SIMD register values and dtype-specialised
  scalar math (polynomial float32 exp / erf) shared by the kernels.

``fastmath`` is used in one place only, the sum of exponentials in
:mod:`.softmax_ce` (``reassoc`` + ``contract``; see there). Everything is
compiled with ``cache=True`` and ``error_model="numpy"`` (a float division
by zero gives inf/NaN instead of raising, which lets LLVM vectorise loops
that divide).
"""
