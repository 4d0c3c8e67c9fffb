"""The plan every backend can run: the layer API's calls, one after the other."""

from __future__ import annotations

from typing import Any

import numpy as np

from .plan import PlanKey


class EagerPlan:
    """``zero_grad``, forward, loss, backward, ``step``, ``zero_grad`` -- with the step guarded.

    The loss is read on the host before the update (to leave a non-finite
    step undone), which on the GPU waits for the forward pass; backends with a
    plan of their own avoid that wait.
    """

    name = "eager"

    def __init__(self, model: Any, loss_fn: Any, optimizer: Any, key: PlanKey) -> None:
        self.model, self.loss_fn, self.optimizer, self.key = model, loss_fn, optimizer, key

    def __call__(self, x: Any, labels: Any) -> Any:
        model, optimizer = self.model, self.optimizer
        optimizer.zero_grad()
        loss, dlogits = self.loss_fn(model.forward(x), labels)
        # Reading the loss also raises a pending bad-label error of the GPU.
        if not np.isfinite(model.backend.to_numpy(loss)).all():
            return loss
        try:
            model.backward(dlogits, need_input_grad=False)
            optimizer.step()
        finally:
            optimizer.zero_grad()
        return loss


__all__ = ["EagerPlan"]
