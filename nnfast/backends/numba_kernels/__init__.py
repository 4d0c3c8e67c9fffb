"""Hand-written Numba CPU kernels of the ``numba`` backend.

Modules:

* :mod:`.gemm` -- packed, cache-blocked GEMM with a 6x16 (float32) / 6x8
  (float64) register-tile micro-kernel and a fused bias + activation
  epilogue; transposed operands read in place.
* :mod:`.linear` -- linear forward / backward on top of the GEMM, with the
  ``dz`` / ``db`` pass fused.
* :mod:`.activation_math` -- the scalar formulas of every activation of the
  activation table (the Numba backend's one place for them).
* :mod:`.activations` -- one compiled forward / backward loop per activation
  and dtype, made from those formulas on first use; :mod:`._calls` calls a
  loop through its address (the GEMM epilogue, the linear backward).
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

from __future__ import annotations

import hashlib
from pathlib import Path

from ...activations import ACTIVATIONS


def _drop_stale_cache() -> None:
    """Delete cached machine code compiled from other versions of these sources.

    Numba re-validates a cached kernel against the file that defines it, not
    against the files of the kernels it calls and inlines (``_math.py``,
    ``_simd.py``, ...), so after an edit of a callee a caller would keep running
    stale code. A digest of every kernel source (and of the activation codes)
    is kept next to the cache; when it changes, the cache is dropped and the
    kernels recompile on first use. A cache moved elsewhere with
    ``NUMBA_CACHE_DIR`` is not managed here.
    """
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(repr(ACTIVATIONS).encode())
    for source in sorted(here.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    cache = here / "__pycache__"
    stamp = cache / "numba-kernels.sha256"
    try:
        if stamp.read_text() == digest.hexdigest():
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for stale in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            stale.unlink(missing_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # a read-only install: Numba keeps its cache elsewhere
        pass


_drop_stale_cache()
