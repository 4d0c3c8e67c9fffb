"""Loss functions."""

from __future__ import annotations

from typing import Any

from . import checks
from .backends import get_backend
from .ops import OPS

_CE = OPS["softmax_cross_entropy"]


class SoftmaxCrossEntropy:
    """Softmax cross-entropy over class indices, loss and gradient in one fused pass.

    Matches ``torch.nn.functional.cross_entropy(logits, labels,
    label_smoothing=..., ignore_index=..., reduction=...)``, except that a
    ``"mean"`` over a batch whose every row is ignored is 0 rather than NaN.

    Calling it returns ``(loss, dlogits)``: ``loss`` is a 0-d array of the
    backend (shape ``(batch,)`` for ``reduction="none"``) and ``dlogits`` is
    d(loss)/d(logits), already scaled for the reduction, ready for
    ``model.backward``. For ``"none"`` the gradient is that of the sum of the
    per-row losses.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean") -> None:
        # Checked here, once, as the op checks them (nnfast.ops).
        self.label_smoothing = _CE.check("label_smoothing", label_smoothing)
        self.ignore_index = _CE.check("ignore_index", ignore_index)
        self.reduction = _CE.check("reduction", reduction)
        self.backend = get_backend()

    def __repr__(self) -> str:
        return (f"SoftmaxCrossEntropy(label_smoothing={self.label_smoothing}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r})")

    def __call__(self, logits: Any, labels: Any) -> tuple[Any, Any]:
        backend = self.backend
        if not backend.is_native(logits):
            logits = backend.asarray(logits, arg="logits")
        if logits.dtype.kind != "f":
            raise TypeError(f"logits: expected floating-point data, got dtype {logits.dtype}")
        logits = checks.array(backend, logits, "logits", ndim=2)
        labels = self.as_labels(labels, logits.shape[0])
        return backend._softmax_cross_entropy(logits, labels, self.label_smoothing, self.ignore_index,
                                              self.reduction)

    def as_labels(self, labels: Any, rows: int) -> Any:
        """``labels`` as the kernels take them: a contiguous int64 array of the backend, one per row.

        Lists and arrays of another backend are converted; non-integer data
        and a wrong length raise. The range of each label is checked by the
        kernel that reads it.
        """
        backend = self.backend
        if not backend.is_native(labels):
            labels = backend.asarray(labels, arg="labels")
        if labels.dtype.kind == "b" or (labels.dtype.kind not in "iu" and labels.size):
            raise TypeError(f"labels: expected integer class indices, got dtype {labels.dtype}")
        if labels.dtype.kind not in "iu":  # an empty list comes in as float64
            labels = labels.astype("int64")
        return checks.labels(backend, labels, rows)
