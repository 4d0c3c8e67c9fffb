"""The training loop behind ``nnfast train``: an MLP, softmax cross-entropy, SGD or Adam.

The data set is copied to the backend once; each step gathers a shuffled
batch there, runs forward / loss / backward / update as one
:class:`~nnfast.train_step.TrainStep` call (the backend's fastest plan: a
fused CPU step, a replayed CUDA graph), and adds the loss to a running sum
that stays on the device. A step whose loss is NaN/Inf changes nothing. The
step's plans are made (on numba: its kernels compiled or loaded) before the
first epoch, so that epoch times leave that out. The
host reads one number per epoch (the loss sum and the test accuracy), so a
GPU is never stalled by a per-step synchronisation. On the CPU backends the
loss of each step is read to stop (or count a skipped step) at once; on the
GPU that happens once per epoch unless ``on_nonfinite="skip"`` asks for it
per step.

Checkpoints record the model, the optimizer, and the trainer's exact
position (epoch, batch, shuffling RNG state at the start of the epoch, the
partial loss sum), so ``resume`` continues on the very same loss trajectory
as an uninterrupted run: after Ctrl-C in the middle of an epoch, and also
when a finished run is extended with a larger ``epochs`` (the learning rate
is constant and the state saved after the last epoch is the one the next
epoch starts from).
"""

from __future__ import annotations

import json
import math
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import get_backend, use_backend
from .data import Dataset, load_dataset
from .distributed.hook import SingleProcess
from .layers import MLP
from .losses import SoftmaxCrossEntropy
from .optim import SGD, Adam, Optimizer
from .paths import check_output_path
from .precision import get_matmul_precision
from .serialization import load, save
from .train_step import TrainStep

#: Learning rate used when none is given, per optimizer.
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}

# Settings that must match between a checkpoint and the run that resumes it.
_RESUME_KEYS = ("data", "hidden", "activation", "optimizer", "lr", "momentum", "weight_decay",
                "batch_size", "seed", "label_smoothing", "dtype")


@dataclass
class TrainConfig:
    """Everything ``nnfast train`` can be told; the defaults reach >= 97% on digits."""

    data: str | None = None
    backend: str | None = None
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    seed: int = 0
    label_smoothing: float = 0.0
    dtype: str = "float32"
    checkpoint: str | None = None
    resume: bool = False
    overwrite: bool = False  # a new run may replace an existing checkpoint file
    on_nonfinite: str = "stop"
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"optimizer: expected 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden: expected positive layer sizes, got {self.hidden!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite: expected 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume: needs a checkpoint path to resume from")
        if self.resume and self.overwrite:
            raise ValueError("overwrite: cannot be combined with resume (resume continues the checkpoint, "
                             "overwrite starts a new run over it)")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; raised before the offending update is applied."""


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C); the checkpoint, if any, is saved."""

    def __init__(self, epoch: int, batch: int, checkpoint: str) -> None:
        self.epoch, self.batch, self.checkpoint = epoch, batch, checkpoint
        super().__init__(f"interrupted in epoch {epoch + 1} after batch {batch}; checkpoint saved to {checkpoint}")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    test_accuracy: float
    seconds: float
    samples_per_second: float
    skipped_steps: int = 0


@dataclass
class TrainResult:
    model: MLP
    history: list[EpochStats] = field(default_factory=list)
    #: Test accuracy of the returned model: the last epoch's, or the stored model's when a resumed
    #: run had nothing left to train.
    test_accuracy: float = float("nan")


def build_model(cfg: TrainConfig, data: Dataset) -> tuple[MLP, Optimizer]:
    """The MLP and optimizer a config describes, on the current backend."""
    model = MLP([data.features, *cfg.hidden, data.classes], activation=cfg.activation,
                dtype=cfg.dtype, seed=cfg.seed)
    if cfg.optimizer == "sgd":
        opt: Optimizer = SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay)
    else:
        opt = Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, opt


def evaluate(model: MLP, x: Any, y: Any, batch_size: int = 4096) -> float:
    """Accuracy of ``model`` on backend arrays ``x``, ``y`` (one host read)."""
    xp = model.backend.xp
    correct = xp.zeros((), dtype=xp.int64)
    for start in range(0, x.shape[0], batch_size):
        logits = model.forward(x[start:start + batch_size])
        correct = correct + (xp.argmax(logits, axis=1) == y[start:start + batch_size]).sum()
    return int(model.backend.to_numpy(correct)) / x.shape[0]


def train(cfg: TrainConfig, log: Callable[[str], None] = print, stop: threading.Event | None = None,
          on_step: Callable[[int, int], None] | None = None, data: Dataset | None = None,
          parallel: SingleProcess | None = None) -> TrainResult:
    """Train an MLP as ``cfg`` says; returns the model and per-epoch statistics.

    ``stop`` (set by the CLI's Ctrl-C handler) ends training after the current
    step, saves the checkpoint and raises :class:`Interrupted`. ``on_step(epoch,
    batch)`` is called after every completed step. ``parallel``: the hook of a
    data-parallel run (``nnfast.distributed.init()``); ``cfg.batch_size`` is
    then the global batch, and only rank 0 logs and writes checkpoints.
    """
    if cfg.backend is not None:
        with use_backend(cfg.backend):
            return _train(cfg, log, stop or threading.Event(), on_step, data, parallel)
    return _train(cfg, log, stop or threading.Event(), on_step, data, parallel)


def _train(cfg: TrainConfig, log: Callable[[str], None], stop: threading.Event,
           on_step: Callable[[int, int], None] | None, data: Dataset | None,
           parallel: SingleProcess | None) -> TrainResult:
    dist = parallel if parallel is not None else SingleProcess()
    if not dist.is_main:
        log, cfg = (lambda line: None), replace(cfg, progress=False)
    if cfg.checkpoint:  # before any work: a bad path must not surface after the first epoch
        _check_checkpoint_path(cfg)
    backend = get_backend()
    xp = backend.xp
    data = data if data is not None else load_dataset(cfg.data)
    model, opt = build_model(cfg, data)
    loss_fn = SoftmaxCrossEntropy(label_smoothing=cfg.label_smoothing)
    shuffle_rng = np.random.default_rng([cfg.seed, 1])

    start_epoch, start_batch, epoch_rng_state = 0, 0, None
    loss_sum = xp.zeros((), dtype=xp.float64)
    if cfg.resume:
        _check_resume_settings(cfg)
        extra = load(cfg.checkpoint, model, opt)
        start_epoch, start_batch, epoch_rng_state, partial = _restore_position(cfg, extra)
        loss_sum = backend.asarray(partial)
        if epoch_rng_state is None:  # an epoch boundary written without the RNG state: replay the shuffles
            for _ in range(start_epoch):
                shuffle_rng.permutation(data.x_train.shape[0])
        if start_epoch < cfg.epochs:
            log(f"resumed from {cfg.checkpoint}: epoch {start_epoch + 1}, batch {start_batch}")
    dist.attach(model, opt, stop)

    x_train, y_train = backend.asarray(data.x_train), backend.asarray(data.y_train)
    x_test, y_test = backend.asarray(data.x_test), backend.asarray(data.y_test)
    n = data.x_train.shape[0]
    batches = math.ceil(n / cfg.batch_size)
    result = TrainResult(model)
    if start_epoch >= cfg.epochs:
        done = f"{start_epoch} epoch{'s' if start_epoch != 1 else ''}" + (f" and {start_batch} batches"
                                                                         if start_batch else "")
        log(f"nothing left to train: {cfg.checkpoint} has done {done}, and {cfg.epochs} epochs were asked for "
            "(a larger --epochs continues it); evaluating the stored model")
        result.test_accuracy = evaluate(model, x_test, y_test)
        return result
    check_each_step = xp is np or cfg.on_nonfinite == "skip"
    step, train_step = _step_function(model, loss_fn, opt, x_train, y_train, dist)
    log(f"training {model.sizes} ({cfg.activation}) on {data.name}: {n} train / {data.x_test.shape[0]} test, "
        f"backend {backend.name}, {cfg.optimizer} lr {cfg.lr}, {cfg.epochs} epochs"
        + (f", matmul precision {get_matmul_precision()}" if get_matmul_precision() != "highest" else "")
        + (f", {dist.describe()}, global batch {cfg.batch_size}" if dist.world_size > 1 else ""))

    if train_step is not None:  # plans made, kernels compiled or loaded: epoch times are the training's alone
        _prepare(train_step, backend.name, (min(cfg.batch_size, n), n % cfg.batch_size), log)

    for epoch in range(start_epoch, cfg.epochs):
        if epoch_rng_state is not None:
            shuffle_rng.bit_generator.state = epoch_rng_state
        epoch_rng_state = shuffle_rng.bit_generator.state
        order = backend.asarray(shuffle_rng.permutation(n))
        first = start_batch if epoch == start_epoch else 0
        skipped = skipped_samples = 0
        began = time.perf_counter()
        with _progress(cfg, batches, first, f"epoch {epoch + 1}/{cfg.epochs}") as bar:
            for batch in range(first, batches):
                idx = order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size]
                loss = step(idx)  # a step whose loss is not finite changes nothing
                if check_each_step and not math.isfinite(value := float(backend.to_numpy(loss))):
                    if cfg.on_nonfinite == "stop":
                        raise NonFiniteLossError(
                            f"loss is {value} at epoch {epoch + 1}, batch {batch} "
                            f"(step {epoch * batches + batch + 1}); parameters are left as they were "
                            "before this step" + (f" and {cfg.checkpoint} is untouched" if cfg.checkpoint else ""))
                    skipped += 1
                    skipped_samples += int(idx.shape[0])
                else:
                    loss_sum = loss_sum + loss.astype(xp.float64) * idx.shape[0]
                bar.update(1)
                if on_step is not None:
                    on_step(epoch, batch)
                if dist.stop_requested():
                    path = cfg.checkpoint or default_checkpoint_path(cfg.data)
                    if dist.is_main:
                        _save(path, cfg, model, opt, epoch, batch + 1, epoch_rng_state, loss_sum, dist.world_size)
                    raise Interrupted(epoch, batch + 1, path)
        epoch_rng_state = None
        mean_loss = float(backend.to_numpy(loss_sum)) / max(n - skipped_samples, 1)
        if not math.isfinite(mean_loss) and cfg.on_nonfinite == "stop":
            raise NonFiniteLossError(f"loss is {mean_loss} in epoch {epoch + 1}; "
                                     + (f"{cfg.checkpoint} holds the last good epoch" if cfg.checkpoint else
                                        "no checkpoint was asked for"))
        accuracy = evaluate(model, x_test, y_test)
        seconds = time.perf_counter() - began
        stats = EpochStats(epoch + 1, mean_loss, accuracy, seconds, (batches - first) * cfg.batch_size / seconds,
                           skipped)
        result.history.append(stats)
        result.test_accuracy = accuracy
        log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {mean_loss:.4f}  test acc {100 * accuracy:6.2f}%  "
            f"{seconds:6.2f} s  {stats.samples_per_second:9.0f} samples/s"
            + (f"  ({skipped} steps skipped: non-finite loss)" if skipped else ""))
        loss_sum = xp.zeros((), dtype=xp.float64)
        if cfg.checkpoint and dist.is_main:
            # The shuffling RNG as the next epoch will find it: resuming this checkpoint with a larger
            # `epochs` continues the run exactly as if it had been asked for that many from the start.
            _save(cfg.checkpoint, cfg, model, opt, epoch + 1, 0, shuffle_rng.bit_generator.state, loss_sum,
                  dist.world_size)
    return result


def _step_function(model: MLP, loss_fn: SoftmaxCrossEntropy, opt: Optimizer, x: Any, y: Any,
                   dist: SingleProcess) -> tuple[Callable[[Any], Any], TrainStep | None]:
    """``(step, train_step)``: ``step(idx)`` is one guarded training step on the rows ``idx`` of
    ``(x, y)`` and returns the loss; ``train_step`` the TrainStep it calls (None: data parallel).

    One process runs :class:`~nnfast.train_step.TrainStep` (the backend's fastest
    plan); a data-parallel run calls the layers itself, with the hook's
    sharding, loss and gradient reduction in between, and the same guard: a
    step whose (global) loss is not finite changes nothing on any rank.
    """
    if dist.world_size == 1:
        train_step = TrainStep(model, loss_fn, opt)
        return (lambda idx: train_step(x[idx], y[idx])), train_step
    backend = model.backend

    def data_parallel_step(idx: Any) -> Any:
        rows = dist.shard(idx)
        opt.zero_grad()
        loss, dlogits = dist.global_loss(*loss_fn(model.forward(x[rows]), y[rows]))
        if not math.isfinite(float(backend.to_numpy(loss))):  # the same value on every rank
            return loss
        try:
            model.backward(dlogits, need_input_grad=False, after_layer=dist.after_layer)
            dist.reduce_gradients()
            opt.step()
        finally:
            opt.zero_grad()
        return loss

    return data_parallel_step, None


def _check_checkpoint_path(cfg: TrainConfig) -> None:
    """The checkpoint can be written, and a new run does not silently replace an old one."""
    try:
        check_output_path(cfg.checkpoint, "checkpoint", overwrite=cfg.resume or cfg.overwrite)
    except FileExistsError:
        raise FileExistsError(f"checkpoint: {cfg.checkpoint!r} already exists; continue that run with --resume "
                              "(resume=True), or start a new one over it with --overwrite (overwrite=True)") from None


def _prepare(step: TrainStep, backend_name: str, batch_sizes: tuple[int, ...], log: Callable[[str], None]) -> None:
    """Make the step's plans; on numba compile (or load) its kernels, saying so when that takes long."""
    sizes = tuple(b for b in batch_sizes if b > 0)
    if backend_name != "numba":
        step.prepare(*sizes)
        return
    from .backends.numba_backend import warm_up

    seconds = warm_up(step, sizes, announce=log)
    if seconds >= 1.0:
        log(f"CPU kernels ready in {seconds:.1f} s (not counted in the epoch times)")


def _resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    settings = asdict(cfg)
    settings["hidden"] = list(cfg.hidden)
    return {k: settings[k] for k in _RESUME_KEYS}


def _save(path: str, cfg: TrainConfig, model: MLP, opt: Optimizer, epoch: int, batch: int,
          rng_state: dict | None, loss_sum: Any, world_size: int) -> None:
    save(path, model, opt, extra={
        "config": json.dumps(_resume_settings(cfg)),
        "epoch": epoch,
        "batch": batch,
        "rng_state": json.dumps(rng_state) if rng_state is not None else "",
        "loss_sum": model.backend.to_numpy(loss_sum).astype(np.float64),
        # Informational: a run resumes on any number of ranks with the same global batch.
        "world_size": world_size,
        "global_batch": cfg.batch_size,
    })


def _check_resume_settings(cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint written with other model or data settings."""
    try:
        with np.load(cfg.checkpoint, allow_pickle=False) as f:
            saved = json.loads(str(f["extra/config"])) if "extra/config" in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError, AttributeError):
        return  # unreadable (TypeError, AttributeError: a lone .npy): load() reports it
    if not isinstance(saved, dict):
        raise ValueError(f"resume: {cfg.checkpoint} was not written by nnfast train (no training position)")
    now = _resume_settings(cfg)
    diff = [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"resume: {cfg.checkpoint} was trained with other settings: {', '.join(diff)}")


def _restore_position(cfg: TrainConfig, extra: dict[str, np.ndarray]) -> tuple[int, int, dict | None, np.ndarray]:
    if any(k not in extra for k in ("epoch", "batch", "rng_state", "loss_sum")):
        raise ValueError(f"resume: {cfg.checkpoint} was not written by nnfast train (no training position)")
    state = str(extra["rng_state"])
    return int(extra["epoch"]), int(extra["batch"]), (json.loads(state) if state else None), extra["loss_sum"]


class _progress:
    """A tqdm bar per epoch on a terminal; nothing otherwise."""

    def __init__(self, cfg: TrainConfig, total: int, initial: int, desc: str) -> None:
        from tqdm.auto import tqdm

        disable = None if cfg.progress is None else not cfg.progress
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, disable=disable)

    def __enter__(self) -> Any:
        return self.bar

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def default_checkpoint_path(data: str | None) -> str:
    """Where training saves on Ctrl-C when no checkpoint path was given: a new file in the working directory.

    ``nnfast-<data>.npz``, or ``nnfast-<data>-2.npz``, ... when that exists (an
    earlier run's checkpoint is never replaced).
    """
    stem = f"nnfast-{Path(data).stem if data else 'digits'}"
    path, n = Path.cwd() / f"{stem}.npz", 1
    while path.exists():
        n += 1
        path = Path.cwd() / f"{stem}-{n}.npz"
    return str(path)
