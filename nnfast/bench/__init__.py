"""``nnfast bench``: per-kernel timings against NumPy, PyTorch and the machine's limits.

For every kernel (an op of the backend contract, or a whole training step),
shape and dtype, each backend is timed side by side in one run: the samples
of the NumPy reference, the fast backends, PyTorch (when it imports) and the
machine-limit yardstick of that kernel are taken in turn, round after round,
so that a shared, noisy machine slows them all alike and their ratios stay
meaningful. A figure is the median of the samples taken after warm-up; a
sample is the mean of enough calls to last ``min_time``.

The cases come from the op table (:mod:`nnfast.ops`): every op row with a
``bench`` declaration is a case family (its shapes, work model, inputs and
PyTorch equivalent), plus the training of an MLP (:mod:`.cases`): one step
at three sizes and one epoch of an MNIST-sized data set, each through
``nf.TrainStep`` and through the eager loop of layer calls.

Work models
-----------
Each kernel states the work it is credited with (its row's ``model``),
counted on the ideal algorithm, not on what an implementation happens to do:

* ``linear_forward``  ``y = act(x @ W + b)``, x (B, I), W (I, O):
  ``2·B·I·O`` flop (the GEMM; bias and activation epilogue not counted).
* ``linear_backward`` ``dW = xᵀ·dz``, ``dx = dz·Wᵀ``, ``db = Σ dz``:
  ``4·B·I·O`` flop (two GEMMs).
* ``activation_forward``  reads x, writes y: ``2·n·s`` bytes
  (n elements, s bytes per element).
* ``activation_backward`` reads dy and the saved tensor, writes dx: ``3·n·s`` bytes.
* ``softmax`` / ``log_softmax`` (B, C): reads x, writes y: ``2·B·C·s`` bytes.
* ``softmax_cross_entropy`` (B, C): reads logits and int64 labels, writes
  dlogits: ``2·B·C·s + 8·B`` bytes (the loss itself is negligible).
* ``sgd_update`` (momentum): reads p, g, v, writes p, v: ``5·n·s`` bytes.
* ``adam_update``: reads p, g, m, v, writes p, m, v: ``7·n·s`` bytes.
* ``train_step`` (MLP forward, softmax-CE, backward, SGD step):
  ``6·B·Σ(in·out)`` flop (2 forward + 4 backward per weight and sample; B
  the samples of one call: the batch of a step, the data set of an epoch).

Machine limits, measured in the same run
----------------------------------------
* CPU GEMM: NumPy's ``matmul`` (its BLAS, e.g. OpenBLAS) at the kernel's own
  shape for the linear kernels, at 1024³ for the training step; ``2·M·N·K``
  flop.
* CPU memory (:mod:`.stream`): a loop that moves exactly the op's traffic
  (its ``streams``: arrays read, written, updated in place) over arrays of
  the case's length and dtype, so the working set is the kernel's and sits in
  the same cache level or in DRAM; on every thread and on one, the faster of
  the two. Credited the same bytes as the kernel, it is a roofline: a kernel
  at 100 % does nothing but move its bytes.
* GPU (CuPy backend): ``cupy.matmul`` (cuBLAS) at the same shapes (4096³
  for the training step), and a device-to-device ``cupy.copyto`` of 256 MiB.
* GPU, matmul precision "high": the float32 GEMM-bound rows (linear layers,
  training step) run twice on the GPU, as ``cupy`` at "highest" and as
  ``cupy-tf32`` at "high" (TF32 tensor cores), PyTorch beside each at its
  matching ``torch.set_float32_matmul_precision`` (``torch-cuda``,
  ``torch-cuda-tf32``); the "high" rows' limit is ``cupy.matmul`` with CuPy's
  float32 compute type set to TF32: the measured tensor-core rate.

Each row's limit is sampled in the same rounds as the row's kernels; the
report's run-level limits (GEMM 1024³, a 64 MiB copy on every thread) are
measured once, first. The fraction of the limit is the kernel's rate (at its
median) divided by the limit's peak rate (at its best sample).

Contention
----------
``--contended`` (:mod:`.contention`) measures every implementation of every
case again, in the same rounds, while a busy-looping process keeps one core
busy, and reports the contended median and the speed kept.

GPU-sized runs (``--size large``)
--------------------------------
Shapes several times a large GPU's 60 MB L2 (:data:`.cases.LARGE_SHAPES`):
GEMM + bias + activation at 4096³ and 8192³ and the layers of an MLP
784→4096→4096→10 at batch 8192, activations on 1 GiB, softmax and
cross-entropy over 32000 and 128256 classes, SGD and Adam over 100M
parameters, and that MLP's training step. GPU backends only (a CPU backend
is refused before anything is allocated), no NumPy reference; PyTorch's GEMM
cases run twice, in float32 and with TF32 tensor cores; inputs are made on
the device, rotate through several sets where one set would stay in the L2,
and a case the device cannot hold is skipped (:mod:`.device`). The JSON
report is rewritten after every case.

Modules: :mod:`.cases` (what is measured), :mod:`.timing` (clocks and
sampling), :mod:`.machine` (machine info and limits), :mod:`.stream` (the
memory limit's loops), :mod:`.contention` (the competing process),
:mod:`.report` (tables), :mod:`.plot` (charts), :mod:`.device` (the GPU side
of large runs), :mod:`.command` (the options and the run).
"""

from __future__ import annotations

from .cases import DTYPES, GEMM_REF, OP_GROUPS, OPS, LayerAPIMissing, OpSpec, make_nnfast, make_torch, work
from .command import SCHEMA, add_arguments, main, run
from .report import render_markdown, render_text

__all__ = ["DTYPES", "GEMM_REF", "LayerAPIMissing", "OPS", "OP_GROUPS", "OpSpec", "SCHEMA", "add_arguments", "main",
           "make_nnfast", "make_torch", "render_markdown", "render_text", "run", "work"]
