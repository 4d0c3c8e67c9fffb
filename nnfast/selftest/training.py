"""Self-test checks of the optimizers and of whole training runs.

* ``sgd_update`` / ``adam_update``: three steps over a list of parameters of
  mixed sizes (a scalar-sized one, odd ones, ones spanning several chunks of
  the CUDA multi-tensor kernels), with every setting of :data:`OPTIMIZER_SETTINGS`:
  SGD plain, with momentum, Nesterov momentum and weight decay; Adam, AdamW
  and Adam with coupled weight decay and other betas. The state starts
  non-zero, as it is after a few steps.
* ``train_step``: 20 steps of :class:`nnfast.TrainStep` (an MLP, label-smoothed
  cross-entropy, SGD with Nesterov momentum or AdamW) against the same run
  on the reference in float64, from the same initial weights: every step's
  loss and the final parameters.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .check import Check, Context, dims
from .compare import Pair

#: The settings each optimizer op is run with (every flag of the rows both ways).
OPTIMIZER_SETTINGS = {
    "sgd_update": [dict(lr=0.1, momentum=0.0), dict(lr=0.05, momentum=0.9),
                   dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                   dict(lr=0.2, momentum=0.5, weight_decay=0.1)],
    "adam_update": [dict(lr=1e-3), dict(lr=1e-2, weight_decay=0.1, decoupled=True),
                    dict(lr=1e-2, weight_decay=0.1, decoupled=False, beta1=0.5, beta2=0.9, eps=1e-6)],
}
#: Parameter shapes of the optimizer checks: tiny, odd, and over several 4096-element chunks.
PARAM_SHAPES = ((3, 5), (5,), (1, 1), (4097,), (3, 4096), (64, 33))
#: Steps of each optimizer check.
STEPS = 3

#: The training runs: MLP sizes, batch, steps, and the optimizer with its settings.
TRAIN_SIZES = (32, 64, 48, 10)
TRAIN_BATCH = 16
TRAIN_STEPS = 20
TRAIN_RUNS = {"sgd nesterov": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
              "adamw": ("Adam", dict(lr=1e-2, weight_decay=0.01, decoupled=True))}
#: A trajectory compounds the rounding of every step: its allowance over one step's.
TRAJECTORY_FACTOR = 10.0


def _setting_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if not isinstance(v, bool) else (k if v else f"no {k}")
                     for k, v in settings.items())


def _optimizer_run(op: str, settings: dict[str, Any]):
    def run(ctx: Context) -> list[Pair]:
        be, ref = ctx.backend, ctx.reference
        params = [ctx.normal(*s) for s in PARAM_SHAPES]
        grads = [ctx.normal(*s) for s in PARAM_SHAPES]
        states = [[ctx.normal(*s, scale=0.1) for s in PARAM_SHAPES]]
        if op == "adam_update":
            states.append([np.abs(ctx.normal(*s, scale=0.01)) for s in PARAM_SHAPES])
        elif not settings.get("momentum"):
            states = [[]]  # plain SGD keeps no velocity
        on_backend = [[be.asarray(a) for a in group] for group in [params, grads, *states]]
        on_reference = [[ctx.wide(a) for a in group] for group in [params, grads, *states]]
        for step in range(1, STEPS + 1):
            for which, lists in ((be, on_backend), (ref, on_reference)):
                if op == "sgd_update":
                    which.sgd_update(*lists, **settings)
                else:
                    which.adam_update(*lists, step=step, **settings)
        names = ["p"] + [f"state{i}" for i in range(len(states))]
        return [Pair(f"{name}[{i}]", ctx.get(g), e)
                for name, got_group, ref_group in zip(names, on_backend[:1] + on_backend[2:],
                                                      on_reference[:1] + on_reference[2:])
                for i, (g, e) in enumerate(zip(got_group, ref_group))]
    return run


def optimizer_checks() -> Iterator[Check]:
    shapes = ", ".join(dims(*s) for s in PARAM_SHAPES)
    for op, settings_list in OPTIMIZER_SETTINGS.items():
        for settings in settings_list:
            yield Check("optimizer", f"{op}[{_setting_text(settings)}] {STEPS} steps", f"[{shapes}]", (op,),
                        _optimizer_run(op, settings))


def _model(nf: Any, dtype: Any) -> Any:
    return nf.MLP(list(TRAIN_SIZES), activation="silu", dtype=dtype, seed=0)


def _trajectory(nf: Any, backend: Any, dtype: Any, weights: list[np.ndarray] | None, optimizer: str,
                settings: dict[str, Any], batches: list[tuple[np.ndarray, np.ndarray]],
                ) -> tuple[list[Any], list[Any], list[np.ndarray]]:
    """Train on ``backend``; returns the losses (backend arrays), the parameters and the initial weights."""
    with nf.use_backend(backend):
        model = _model(nf, dtype)
        params = model.parameters()
        if weights is not None:
            for p, w in zip(params, weights):
                p.data = backend.asarray(w.astype(dtype))
        initial = [np.array(backend.to_numpy(p.data), copy=True) for p in params]  # the update is in place
        opt = getattr(nf, optimizer)(params, **settings)
        step = nf.TrainStep(model, nf.SoftmaxCrossEntropy(label_smoothing=0.1), opt)
        losses = [step(backend.asarray(x.astype(dtype)), backend.asarray(labels)) for x, labels in batches]
    return losses, [p.data for p in params], initial


def _train_run(optimizer: str, settings: dict[str, Any]):
    def run(ctx: Context) -> list[Pair]:
        import nnfast as nf

        be = ctx.backend
        batches = [(ctx.normal(TRAIN_BATCH, TRAIN_SIZES[0]), ctx.rng.integers(0, TRAIN_SIZES[-1], TRAIN_BATCH))
                   for _ in range(TRAIN_STEPS)]
        losses, params, initial = _trajectory(nf, be, ctx.dtype, None, optimizer, settings, batches)
        ref_losses, ref_params, _ = _trajectory(nf, ctx.reference, np.float64, initial, optimizer, settings, batches)
        got = np.array([float(be.to_numpy(loss)) for loss in losses], dtype=ctx.dtype)
        result = [Pair("losses", got, np.array([float(loss) for loss in ref_losses]))]
        return result + [Pair(f"param[{i}]", ctx.get(p), np.asarray(e)) for i, (p, e) in enumerate(zip(params,
                                                                                                     ref_params))]
    return run


def train_checks() -> Iterator[Check]:
    for what, (optimizer, settings) in TRAIN_RUNS.items():
        yield Check("train", f"train_step[{what}] {TRAIN_STEPS} steps vs the reference trajectory",
                    f"MLP {list(TRAIN_SIZES)} b{TRAIN_BATCH}",
                    ("linear_forward", "linear_backward", "softmax_cross_entropy",
                     "sgd_update" if optimizer == "SGD" else "adam_update"),
                    _train_run(optimizer, settings), length=max(TRAIN_SIZES), factor=TRAJECTORY_FACTOR,
                    gemm=True, activations=("silu", "identity"))


__all__ = ["OPTIMIZER_SETTINGS", "PARAM_SHAPES", "STEPS", "TRAIN_RUNS", "optimizer_checks", "train_checks"]
