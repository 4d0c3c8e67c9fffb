"""The ``nnfast`` command: ``train``, ``info``, ``bench`` and ``selftest``."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import threading
from typing import Sequence

from . import _command, precision
from .activations import ACTIVATIONS
from .errors import BackendError
from .precision import PRECISIONS, matmul_precision


def _sizes(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if any(not part.strip() for part in parts):  # "64,,32", "64,", "": a size left out, not a shorter list
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes like 256,256, got {text!r} "
                                         "(an empty size)")
    try:
        sizes = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes like 256,256, got {text!r}")
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected positive layer sizes like 256,256, got {text!r}")
    return sizes


def _int_at_least(low: int, expected: str):
    """An argparse type: an integer >= ``low``, with ``expected`` in the error message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", metavar="PATH",
                   help="MNIST/Fashion-MNIST IDX directory (.gz or raw) or .npz with x_train, y_train, "
                        "x_test, y_test (default: scikit-learn's bundled 8x8 digits)")
    p.add_argument("--backend", choices=["numpy", "numba", "cupy", "auto"],
                   help="backend to train on (default: NNFAST_BACKEND, else auto)")
    p.add_argument("--hidden", type=_sizes, default=",".join(map(str, d.hidden)), metavar="SIZES",
                   help="hidden layer sizes, comma-separated (default: %(default)s)")
    p.add_argument("--activation", choices=[a for a in ACTIVATIONS if a != "identity"], default=d.activation,
                   help="hidden-layer activation (default: %(default)s)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer,
                   help="optimizer (default: %(default)s)")
    p.add_argument("--lr", type=_non_negative_float, default=None,
                   help="learning rate (default: 0.05 for sgd, 0.001 for adam)")
    p.add_argument("--momentum", type=_non_negative_float, default=d.momentum,
                   help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=d.weight_decay,
                   help="weight decay; decoupled (AdamW) for adam (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help="epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="batch size (default: %(default)s)")
    p.add_argument("--seed", type=_non_negative_int, default=d.seed, help="random seed (default: %(default)s)")
    p.add_argument("--label-smoothing", type=_fraction, default=d.label_smoothing,
                   help="label smoothing in [0, 1] (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype,
                   help="floating-point type of the parameters and activations; float64 is slower "
                        "(default: %(default)s)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="save model and optimizer here after every epoch (and on Ctrl-C); its directory must "
                        "exist, and an existing file is replaced only with --resume or --overwrite")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint exactly where it stopped; with a larger --epochs, extend a "
                        "finished run as if it had been asked for that many epochs from the start")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --checkpoint exists, replacing that file")
    p.add_argument("--on-nonfinite", choices=["stop", "skip"], default=d.on_nonfinite,
                   help="on a NaN/Inf loss: stop with an error, or skip that step (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--matmul-precision", choices=PRECISIONS, default=None,
                   help="'high': float32 matmuls on the GPU run on TF32 tensor cores (about 3e-4 relative error, "
                        "like torch.set_float32_matmul_precision('high')); no effect on the CPU backends "
                        "(default: NNFAST_MATMUL_PRECISION, else highest)")
    p.add_argument("--distributed", action="store_true",
                   help="data parallel over the ranks of an MPI job: mpiexec -n N nnfast train --distributed "
                        "(MPI for numpy/numba, NCCL for cupy; --batch-size is the global batch; needs nnfast[mpi])")


def _run_train(args: argparse.Namespace) -> int:
    from .train import Interrupted, NonFiniteLossError, TrainConfig, train

    cfg = TrainConfig(
        data=args.data, backend=args.backend, hidden=args.hidden, activation=args.activation,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, label_smoothing=args.label_smoothing,
        dtype=args.dtype, checkpoint=args.checkpoint, resume=args.resume, overwrite=args.overwrite,
        on_nonfinite=args.on_nonfinite, progress=False if args.no_progress else None)
    parallel = None
    if args.distributed:
        from . import distributed

        parallel = distributed.init(args.backend)
    speaks = parallel is None or parallel.is_main  # in a distributed run only rank 0 prints
    stop = threading.Event()

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step and save; second: abort
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nnnfast: stopping after this step (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    # In a distributed run a rank that fails for any other reason ends the whole job.
    guard = parallel.abort_on_error((Interrupted, NonFiniteLossError)) if parallel else contextlib.nullcontext()
    precision = (contextlib.nullcontext() if args.matmul_precision is None
                 else matmul_precision(args.matmul_precision))
    try:
        with guard, precision:
            result = train(cfg, log=lambda line: print(line, flush=True), stop=stop, parallel=parallel)
    except Interrupted as err:
        if speaks:
            print(f"nnfast: {err}", file=sys.stderr)
            print(f"nnfast: continue with: nnfast train --checkpoint {err.checkpoint} --resume "
                  "(and the same other options)", file=sys.stderr)
        return 130
    except NonFiniteLossError as err:
        if speaks:
            print(f"nnfast: error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        if parallel is not None:
            parallel.close()
    if speaks:
        print(f"final test accuracy: {100 * result.test_accuracy:.2f}%")
    return 0


def info_lines() -> list[str]:
    """What ``nnfast info`` prints: versions, backends, threads, GPU."""
    import numpy as np

    from . import __version__
    from .backends import BACKEND_NAMES, get_backend, unavailable_reason as _unavailable_reason

    lines = [f"nnfast {__version__}", f"python {platform.python_version()} ({platform.machine()})",
             f"numpy {np.__version__}"]
    for module in ("numba", "cupy", "sklearn", "tqdm", "mpi4py"):
        try:
            lines.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            lines.append(f"{module} not installed")
        except Exception as err:  # a broken CuPy install must not break `info`
            lines.append(f"{module} unusable: {err}")
    lines.append(f"cpu cores: {os.cpu_count()}")
    lines.append(f"NNFAST_BACKEND={os.environ.get('NNFAST_BACKEND', '(unset: auto)')}")
    lines.append(f"NNFAST_NUM_THREADS={os.environ.get('NNFAST_NUM_THREADS', '(unset: all cores)')}")
    lines.append(f"matmul precision: {precision.get_matmul_precision()} "
                 f"(NNFAST_MATMUL_PRECISION={os.environ.get(precision.ENV, '(unset: highest)')})")
    for name in BACKEND_NAMES:
        reason = _unavailable_reason(name)
        lines.append(f"backend {name}: " + ("available" if reason is None else f"unavailable: {reason}"))
    try:
        lines.append(f"default backend: {get_backend().name}")
    except BackendError as err:
        lines.append(f"default backend: error: {err}")
    try:
        import numba

        lines.append(f"numba threads: {numba.get_num_threads()} (layer {numba.threading_layer() if _numba_ran() else 'not started'})")
        from .backends.numba_backend import kernel_cache_status

        try:
            warm, folder = kernel_cache_status()
            state = "warm" if warm else "cold (the first training run compiles the CPU kernels)"
            lines.append(f"numba kernel cache: {state} in {folder}")
        except (AttributeError, ValueError, OSError) as err:  # Numba's cache internals are not public API
            lines.append(f"numba kernel cache: unknown ({type(err).__name__}: {err})")
    except ImportError:
        pass
    if _unavailable_reason("cupy") is None:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        lines.append(f"gpu: {name}, compute capability {props['major']}.{props['minor']}, "
                     f"{props['totalGlobalMem'] / 2**30:.1f} GiB, {props['multiProcessorCount']} SMs")
    else:
        lines.append("gpu: none usable")
    return lines


def _numba_ran() -> bool:
    import numba

    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False


def _on_command_line(argv: Sequence[str], option: str, shortest: int) -> bool:
    """``option`` or an abbreviation argparse accepts (at least ``shortest`` characters: ``--bac`` for
    ``--backend``, as ``--ba`` may be ``--batch-size``; ``--ma`` for ``--matmul-precision``, as ``--m`` may be
    ``--momentum``)."""
    return any(len(flag) >= shortest and option.startswith(flag)
               for flag in (arg.split("=", 1)[0] for arg in argv if arg.startswith("--")))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A bad NNFAST_BACKEND / NNFAST_MATMUL_PRECISION that nothing on the command line overrides: one line,
    # whatever the command (--help too).
    for error, option, shortest in ((_command.deferred_error, "--backend", 5),
                                    (precision.deferred_error, "--matmul-precision", 4)):
        if error is not None and not _on_command_line(argv, option, shortest):
            print(f"nnfast: error: {error}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="nnfast", description="Train and benchmark small neural networks "
                                     "on NumPy, Numba (CPU) or CUDA (CuPy) kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_arguments(sub.add_parser("train", help="train an MLP (default: digits)",
                                        description="Train an MLP classifier with softmax cross-entropy."))
    sub.add_parser("info", help="versions, backends, threads, GPU")
    bench = sub.add_parser("bench", help="benchmark the kernels against NumPy and the machine's limits")
    try:
        from . import bench as bench_module
    except ImportError:  # pragma: no cover - the bench module ships with nnfast
        bench_module = None
    if bench_module is not None:
        bench_module.add_arguments(bench)
    from . import selftest

    selftest.add_arguments(sub.add_parser(
        "selftest", help="check every op of a backend against the NumPy reference (exit 1 on any mismatch)",
        description="Check every op of a backend against the NumPy reference on this machine: one line per "
                    "check, a summary, exit status 1 if any check failed. The first thing to run on a new GPU."))

    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _run_train(args)
        if args.command == "info":
            print("\n".join(info_lines()))
            return 0
        if args.command == "bench":
            return bench_module.run(args)
        if args.command == "selftest":
            return selftest.command(args)
    except (BackendError, ValueError, TypeError, OSError) as err:  # OSError: FileNotFoundError, a full disk, ...
        print(f"nnfast: error: {err}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
