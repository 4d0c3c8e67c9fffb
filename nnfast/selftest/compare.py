"""How a self-test output is compared with the reference: errors, tolerances, the verdict.

The reference is the NumPy backend run in float64 on the same inputs (the
float32 inputs, widened exactly), so the error measured is the backend's own
and not the difference of two roundings. For each output:

* ``max_abs`` is ``max |got - ref|``;
* ``max_rel`` is ``max_abs / max |ref|``: the error relative to the output's
  scale (an element-wise ratio would blow up wherever the reference passes
  through zero);
* the output must have the requested dtype and shape, and be NaN or infinite
  exactly where the reference is (an unwritten output, or a read of poisoned
  memory, never passes).

The tolerance bounds ``max_rel``: ``BASE[dtype] * sqrt(n) * factor``, where
``n`` is the length of the longest sum behind an output (a GEMM's inner
dimension, a row's classes; rounding errors of a sum grow like its square
root) and ``factor`` a check's own allowance (a training trajectory compounds
twenty steps; a matrix precision other than full float32 loses mantissa bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Tolerance on ``max_rel`` per unit of ``sqrt(n)``, by dtype: 34 and 90 units in the last place. The
#: CPU backends stay under a tenth of it for float32 and a fifth for float64 (transcendental functions).
BASE = {np.dtype(np.float32): 4e-6, np.dtype(np.float64): 2e-14}


@dataclass(frozen=True)
class Pair:
    """One output of a check and its reference value."""

    name: str
    got: Any  # numpy.ndarray
    expected: Any  # numpy.ndarray (float64 for float outputs)


@dataclass
class Measure:
    """The worst errors over a check's outputs and the verdict against ``tolerance``."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    tolerance: float = 0.0
    problems: list[str] | None = None

    @property
    def passed(self) -> bool:
        return not self.problems and self.max_rel <= self.tolerance


def tolerance(dtype: Any, length: int = 1, factor: float = 1.0) -> float:
    """The bound on ``max_rel`` for outputs of ``dtype`` behind sums of ``length`` terms."""
    return BASE[np.dtype(dtype)] * math.sqrt(max(int(length), 1)) * factor


def compare(pairs: Sequence[Pair], dtype: Any, tol: float) -> Measure:
    """The errors of every pair (outputs of ``dtype``) and what is wrong besides them."""
    measure = Measure(tolerance=tol, problems=[])
    dtype = np.dtype(dtype)
    for pair in pairs:
        got, expected = np.asarray(pair.got), np.asarray(pair.expected)
        if got.shape != expected.shape:
            measure.problems.append(f"{pair.name}: shape {got.shape}, expected {expected.shape}")
            continue
        if expected.dtype.kind == "f" and got.dtype != dtype:
            measure.problems.append(f"{pair.name}: dtype {got.dtype}, expected {dtype}")
            continue
        g, e = got.astype(np.float64), expected.astype(np.float64)
        finite = np.isfinite(e)
        # NaN where the reference is not, an infinity of the wrong sign, a finite value for an infinite one.
        special = ~(np.isfinite(g) & finite) & ~((g == e) | (np.isnan(g) & np.isnan(e)))
        if special.any():
            where = tuple(int(i) for i in np.argwhere(special)[0])
            measure.problems.append(f"{pair.name}: {g[where]} at {where}, expected {e[where]} "
                                    f"({int(special.sum())} such elements)")
            continue
        both = finite & np.isfinite(g)
        if not both.any():
            continue
        diff = np.abs(g - e)[both]
        worst = float(diff.max())
        scale = float(np.abs(e[both]).max())
        rel = worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)
        measure.max_abs = max(measure.max_abs, worst)
        if rel > measure.max_rel:
            measure.max_rel = rel
        if rel > tol:
            index = np.argwhere(both)[int(np.argmax(diff))]
            where = tuple(int(i) for i in index)
            measure.problems.append(f"{pair.name}: relative error {rel:.2e} > {tol:.1e}, worst at {where}: "
                                    f"{g[where]!r}, expected {e[where]!r}")
    return measure


__all__ = ["BASE", "Measure", "Pair", "compare", "tolerance"]
