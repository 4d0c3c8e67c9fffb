"""``nnfast bench``: the options, the run over every case, and the report files."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..op_spec import Shape
from ..paths import check_output_path
from . import device as gpu_run
from .cases import (DTYPES, LARGE_SHAPES, OP_GROUPS, OPS, LayerAPIMissing, OpSpec, at_precision, footprint, make_nnfast,
                    make_torch, rotations, shape_record, torch_at_precision, work)
from .contention import Spinner
from .machine import ThreadLimits, limit_candidates, load_average, machine_info, measure_limits
from .plot import plot
from .report import render_markdown, render_text
from .timing import FULL, QUICK, Clock, CupyClock, Settings, Timed, TorchCudaClock, figures, measure

#: Schema tag of the JSON report.
SCHEMA = "nnfast-bench/1"
#: Suffix of the key of an implementation's contended measurement.
CONTENDED = "@contended"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nnfast bench`` options to ``parser`` (destinations are prefixed ``bench_``)."""
    ops = ", ".join(list(OPS) + list(OP_GROUPS))
    parser.add_argument("--backend", dest="bench_backend", action="append", metavar="NAME",
                        help="backend(s) to measure, repeatable or comma-separated (default: every "
                             "available one); numpy, the reference, is always measured (but at --size large)")
    parser.add_argument("--ops", dest="bench_ops", action="append", metavar="OPS",
                        help=f"kernels to measure, comma-separated op or group names (default: all): {ops}")
    parser.add_argument("--dtype", dest="bench_dtype", default="float32", metavar="DTYPE",
                        help="float32 (default), float64, or both (comma-separated or 'all')")
    parser.add_argument("--quick", dest="bench_quick", action="store_true",
                        help="small shapes and few samples: a run of seconds (a smoke check, not a measurement); "
                             "with --size large, the large shapes and few samples")
    parser.add_argument("--size", dest="bench_size", choices=("default", "large"), default="default",
                        help="default: shapes for a CPU (and a first look at a GPU); large: GPU-sized shapes, "
                             "several times a 60 MB L2 (GEMMs of 4096³ and 8192³, 1 GiB element-wise, a 128k "
                             "vocabulary, Adam over 100M parameters), GPU backends only, with PyTorch TF32 "
                             "columns and no NumPy reference")
    parser.add_argument("--repeat", dest="bench_repeat", type=int, default=None, metavar="N",
                        help=f"samples per implementation and case (default {FULL.repeat}, "
                             f"{QUICK.repeat} with --quick)")
    parser.add_argument("--threads", dest="bench_threads", type=int, default=None, metavar="N",
                        help="run every library (BLAS, Numba, PyTorch) on N threads (default: as configured); "
                             "on a busy shared machine, 1 gives steadier ratios")
    parser.add_argument("--contended", dest="bench_contended", action="store_true",
                        help="also measure every case with a busy-looping process on one core, side by side "
                             "with the quiet samples, and report the speed each implementation keeps")
    parser.add_argument("--no-torch", dest="bench_no_torch", action="store_true",
                        help="leave PyTorch out even when it imports")
    parser.add_argument("--json", dest="bench_json", metavar="PATH", help="write the full report as JSON")
    parser.add_argument("--markdown", dest="bench_markdown", metavar="PATH", help="write the tables as Markdown")
    parser.add_argument("--plot", dest="bench_plot", metavar="PATH",
                        help="write PNG charts of speedup and fraction of the limit (needs matplotlib)")
    parser.add_argument("--no-progress", dest="bench_no_progress", action="store_true",
                        help="no progress bar")


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [p.strip().lower() for p in v.split(",") if p.strip()]
    return out


def _select_ops(tokens: list[str]) -> list[OpSpec]:
    if not tokens or "all" in tokens:
        return list(OPS.values())
    unknown = [t for t in tokens if t not in OPS and t not in OP_GROUPS]
    if unknown:
        raise ValueError(f"--ops: unknown {', '.join(map(repr, unknown))}; valid choices are "
                         f"{', '.join(list(OPS) + list(OP_GROUPS))}, all")
    return [spec for spec in OPS.values() if spec.name in tokens or spec.group in tokens]


def _select_dtypes(value: str) -> list[str]:
    tokens = _split([value])
    if "all" in tokens or "both" in tokens:
        return list(DTYPES)
    bad = [t for t in tokens if t not in DTYPES]
    if bad or not tokens:
        raise ValueError(f"--dtype: expected float32, float64 or all, got {value!r}")
    return list(dict.fromkeys(tokens))


def _import_torch() -> Any:
    try:
        import torch
    except Exception:
        return None
    return torch


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed; install it with "
                           "'pip install matplotlib' (or the 'bench' extra), or leave --plot out") from None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from :func:`add_arguments`); return an exit code."""
    from ..backends import BACKEND_NAMES, available_backends, backend_for
    from ..errors import BackendError

    try:
        specs = _select_ops(_split(getattr(args, "bench_ops", None)))
        dtypes = _select_dtypes(getattr(args, "bench_dtype", "float32") or "float32")
        requested = _split(getattr(args, "bench_backend", None))
        bad = [b for b in requested if b not in BACKEND_NAMES]
        if bad:
            raise ValueError(f"--backend: unknown {', '.join(map(repr, bad))}; valid choices are "
                             f"{', '.join(BACKEND_NAMES)}")
        repeat = getattr(args, "bench_repeat", None)
        if repeat is not None and repeat < 1:
            raise ValueError(f"--repeat: expected a positive integer, got {repeat}")
        threads = getattr(args, "bench_threads", None)
        if threads is not None and threads < 1:
            raise ValueError(f"--threads: expected a positive integer, got {threads}")
        _outputs(args)
        if getattr(args, "bench_plot", None):
            _check_matplotlib()
    except (ValueError, RuntimeError, OSError) as err:
        print(f"nnfast bench: error: {err}", file=sys.stderr)
        return 2

    quick = bool(getattr(args, "bench_quick", False))
    large = getattr(args, "bench_size", "default") == "large"
    settings = Settings(**vars(QUICK if quick else gpu_run.LARGE_SETTINGS if large else FULL))
    if repeat is not None:
        settings.repeat = repeat
    notes: list[str] = []

    # Backends: numpy (the reference) always, then what was asked for or is available; at --size large
    # the GPU backends alone.
    names = [] if large else ["numpy"]
    names = list(dict.fromkeys(names + [b for b in (requested or available_backends()) if b != "numpy" or large]))
    backends: dict[str, Any] = {}
    for name in names:
        try:
            backends[name] = backend_for(name)
        except BackendError as err:
            notes.append(f"backend {name} skipped: {err}")
    if large:
        try:
            backends = gpu_run.gpu_backends(backends, requested, specs, dtypes, notes)
        except ValueError as err:
            print(f"nnfast bench: error: {err}", file=sys.stderr)
            return 2
    gpu = any(getattr(be, "xp", np) is not np for be in backends.values())

    torch = None if getattr(args, "bench_no_torch", False) else _import_torch()
    torch_devices: list[str] = []
    if torch is not None:
        if any(getattr(be, "xp", np) is np for be in backends.values()):
            torch_devices.append("cpu")
        if gpu and torch.cuda.is_available():
            torch_devices.append("cuda")
    elif not getattr(args, "bench_no_torch", False):
        notes.append("PyTorch does not import here: no torch column")

    if large:
        cases = [(spec, variant, shape) for spec in specs for variant in spec.variants
                 for shape in LARGE_SHAPES[spec.name]]
    else:
        cases = [(spec, variant, shape)
                 for spec in specs for variant in spec.variants for shape in spec.shapes
                 if not quick or shape.size == "small"]

    load = load_average()
    cpus = os.cpu_count() or 1
    if load is not None and load > 0.5 * cpus:
        hint = "" if threads == 1 else ", multi-threaded ones most; --threads 1 gives steadier ratios"
        notes.append(f"the machine is busy (load average {load:.1f} on {cpus} CPUs): figures will be noisy{hint}")

    spinner = None
    if getattr(args, "bench_contended", False):
        try:
            spinner = Spinner()
        except (RuntimeError, OSError) as err:
            print(f"nnfast bench: error: --contended: {err}", file=sys.stderr)
            return 2
    restore = ThreadLimits(threads, torch, notes) if threads is not None else None
    try:
        return _run_cases(args, cases, specs, dtypes, quick, settings, backends, gpu, torch, torch_devices, notes,
                          spinner)
    finally:
        if spinner is not None:
            spinner.close()
        if restore is not None:
            restore.undo()


def _run_cases(args: argparse.Namespace, cases: list[tuple[OpSpec, str, Shape]], specs: list[OpSpec],
               dtypes: list[str], quick: bool, settings: Settings, backends: dict[str, Any], gpu: bool,
               torch: Any, torch_devices: list[str], notes: list[str], spinner: Spinner | None = None) -> int:
    from tqdm.auto import tqdm

    progress = tqdm(total=len(cases) * len(dtypes) + 1, desc="nnfast bench", unit="case",
                    disable=True if getattr(args, "bench_no_progress", False) else None,
                    file=sys.stderr, dynamic_ncols=True)
    progress.set_postfix_str("machine limits")
    start_load = load_average()
    limits = measure_limits(dtypes, gpu, settings)
    progress.update(1)

    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    errors: list[dict[str, str]] = []
    info = machine_info(torch, gpu)
    if start_load is not None and "load_average_1min" in info:
        info["load_average_1min"] = round(start_load, 2)
    report = {  # its lists fill in as the cases are measured
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": " ".join(["nnfast bench", *_argv_of(args)]),
        "machine": info,
        "settings": {"quick": quick, "size": getattr(args, "bench_size", "default"),
                     "threads": getattr(args, "bench_threads", None) or "default",
                     "dtypes": dtypes, "backends": list(backends), "torch": torch_devices,
                     "ops": [s.name for s in specs], "repeat": settings.repeat, "min_time_s": settings.min_time,
                     "warmup_s": settings.warmup_time, "statistic": "median",
                     "contended": spinner is not None,
                     **({"spinner": spinner.describe()} if spinner is not None else {})},
        "models": {spec.name: {"metric": spec.metric, "work": spec.model, "limit": spec.limit} for spec in specs},
        "limits": limits,
        "results": results,
        "skipped": skipped,
        "errors": errors,
        "notes": notes,
    }
    large = getattr(args, "bench_size", "default") == "large"
    device = next((be for be in backends.values() if getattr(be, "xp", np) is not np), None) if large else None
    json_path = next((path for what, path, _ in _outputs(args) if what == "JSON report"), None)
    for dtype in dtypes:
        for spec, variant, shape in cases:
            progress.set_postfix_str(f"{dtype} {spec.name} {variant} {shape.label}".replace("  ", " "))
            row = measure_case(spec, variant, shape, dtype, backends, torch, torch_devices, settings,
                               limits, skipped, errors, spinner, device=device)
            if row is not None:
                results.append(row)
            progress.update(1)
            if json_path is not None:  # a run stopped by a time limit still leaves what it measured
                _write(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    progress.close()
    end_load = load_average()
    if end_load is not None and "load_average_1min" in report["machine"]:
        report["machine"]["load_average_1min_end"] = round(end_load, 2)

    print(render_text(report))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for s in skipped:
        print(f"skipped: {s['impl']} {s['case']}: {s['reason']}", file=sys.stderr)
    for e in errors:
        print(f"error: {e['impl']} {e['case']}: {e['reason']}", file=sys.stderr)

    try:
        for what, path, write in _outputs(args):  # checked before measuring, and again now
            write(report, path)
            print(f"wrote the {what} to {path.resolve()}")
    except OSError as err:
        print(f"nnfast bench: error: {f'cannot write {err.filename}: {err.strerror}' if err.filename else err}",
              file=sys.stderr)
        return 2
    return 1 if errors else 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` as command-line words, for the report."""
    out: list[str] = []
    for flag, dest in (("--backend", "bench_backend"), ("--ops", "bench_ops")):
        values = _split(getattr(args, dest, None))
        if values:
            out += [flag, ",".join(values)]
    if getattr(args, "bench_dtype", "float32") not in (None, "float32"):
        out += ["--dtype", args.bench_dtype]
    for flag, dest in (("--quick", "bench_quick"), ("--contended", "bench_contended"), ("--no-torch", "bench_no_torch")):
        if getattr(args, dest, False):
            out.append(flag)
    for flag, dest in (("--repeat", "bench_repeat"), ("--threads", "bench_threads")):
        if getattr(args, dest, None):
            out += [flag, str(getattr(args, dest))]
    if getattr(args, "bench_size", "default") != "default":
        out += ["--size", args.bench_size]
    return out


def _outputs(args: argparse.Namespace) -> list[tuple[str, Path, Callable[[dict[str, Any], Path], None]]]:
    """``(what, path, writer)`` of each file asked for; raises (naming the flag) where one cannot be written."""
    asked = (("JSON report", "--json", "bench_json",
              lambda report, path: _write(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")),
             ("Markdown tables", "--markdown", "bench_markdown",
              lambda report, path: _write(path, render_markdown(report))),
             ("plot", "--plot", "bench_plot", plot))
    return [(what, check_output_path(getattr(args, dest), flag), write) for what, flag, dest, write in asked
            if getattr(args, dest, None)]


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _case_name(spec: OpSpec, variant: str, shape: Shape, dtype: str) -> str:
    return f"{spec.name}{'[' + variant + ']' if variant else ''} {shape.label} {dtype}"


def measure_case(spec: OpSpec, variant: str, shape: Shape, dtype: str, backends: dict[str, Any],
                 torch: Any, torch_devices: list[str], settings: Settings, limits: dict[str, Any],
                 skipped: list[dict[str, str]], errors: list[dict[str, str]],
                 spinner: Spinner | None = None, device: Any = None) -> dict[str, Any] | None:
    """Measure one case on every implementation side by side; the report row, or None.

    With a ``spinner`` (``--contended``), every implementation is also
    measured with it running, in the same rounds. ``device``: the GPU backend
    of a GPU-sized run (``--size large``), which makes every implementation's
    inputs on the device, in rotating sets when one set fits in the L2 cache
    (:mod:`.device`); the case is skipped when the device cannot hold them.
    """
    case = _case_name(spec, variant, shape, dtype)
    timed: list[Timed] = []
    kinds: dict[str, tuple[str, str]] = {}  # key -> (kind, device)
    sets = 1
    if device is not None:
        read, held = footprint(spec, shape, np.dtype(dtype).itemsize)
        sets = rotations(read, gpu_run.l2_bytes(device.xp))
        too_big = gpu_run.too_big(device.xp, sets * held * (len(backends) + 3 * len(torch_devices) + 1))
        if too_big:
            skipped.append({"impl": "all", "case": case, "reason": too_big})
            return None

    def add(key: str, kind: str, where: str, build: Callable[[int], Callable[[], Any]], clock: Clock) -> None:
        try:
            fn = gpu_run.rotating(build, sets)
            fn()
            clock.sync()
        except (NotImplementedError, LayerAPIMissing) as err:
            skipped.append({"impl": key, "case": case, "reason": f"not implemented: {err}".rstrip(": ")})
            return
        except Exception as err:
            errors.append({"impl": key, "case": case, "reason": f"{type(err).__name__}: {err}"})
            return
        timed.append(Timed(key, fn, clock))
        kinds[key] = (kind, where)

    # A float32 GEMM-bound case on the GPU runs at both matmul precisions, PyTorch at the matching setting:
    # "highest" on the "gpu" device, "high" (TF32 tensor cores) on "gpu-tf32", each with its own GEMM limit.
    precisions = (("", "gpu", "highest"), ("-tf32", "gpu-tf32", "high")) if (
        dtype == "float32" and spec.metric == "GFLOP/s") else (("", "gpu", None),)
    gpu_clock = None
    for name, be in backends.items():
        on_gpu = getattr(be, "xp", np) is not np
        if on_gpu and gpu_clock is None:
            gpu_clock = CupyClock()
        for suffix, where, precision in (precisions if on_gpu else (("", "cpu", None),)):
            add(name + suffix, "nnfast", where,
                lambda seed, be=be, p=precision: _at(at_precision,
                                                     make_nnfast(be, spec, variant, shape, dtype, seed, device), p),
                gpu_clock if on_gpu else Clock())
    for where in torch_devices:
        if where == "cpu":
            add("torch", "torch", "cpu", lambda seed: make_torch(torch, "cpu", spec, variant, shape, dtype, seed, device),
                Clock())
            continue
        for suffix, row_device, precision in precisions:
            add("torch-cuda" + suffix, "torch", row_device,
                lambda seed, p=precision: _at(lambda fn, q: torch_at_precision(torch, fn, q),
                                              make_torch(torch, "cuda", spec, variant, shape, dtype, seed, device), p),
                TorchCudaClock(torch))
    if not any(kinds[t.key][0] == "nnfast" for t in timed):
        return None
    # The machine limit of this kernel, measured side by side with it on each device in the row.
    limit_keys: dict[str, list[tuple[str, str, float]]] = {}  # device -> [(key, what, work of one call)]
    for where in sorted({kinds[t.key][1] for t in timed}):
        clock = (gpu_clock or CupyClock()) if where != "cpu" else Clock()
        for key, what, amount, build in limit_candidates(spec, shape, dtype, where):
            limit_keys.setdefault(where, []).append((key, what, amount))
            add(key, "limit", where, build, clock)
    if spinner is not None:  # every implementation again, beside a busy core; the limits quiet only
        for t in list(timed):
            t.before = spinner.off
            if kinds[t.key][0] != "limit":
                timed.append(Timed(t.key + CONTENDED, t.fn, t.clock, before=spinner.on))

    try:
        measure(timed, settings)
    except Exception as err:  # a kernel that fails after its first call
        errors.append({"impl": "?", "case": case, "reason": f"{type(err).__name__}: {err}"})
        return None
    finally:
        if device is not None:
            for t in timed:
                t.fn = None  # the inputs go with the callables, then the pools give their memory back
            gpu_run.release(device.xp, torch)

    itemsize = np.dtype(dtype).itemsize
    amount = work(spec, shape, itemsize)
    by_key = {t.key: t for t in timed}

    row_limits: dict[str, Any] = {}
    for where, candidates in limit_keys.items():
        # A limit is the machine's peak for that work: its best sample (its
        # median is kept as median_rate), the fastest way of the candidates.
        measured = [{"what": what, **figures(by_key[key], w)} for key, what, w in candidates if key in by_key]
        for f, (_, _, w) in zip(measured, [c for c in candidates if c[0] in by_key]):
            f["median_rate"], f["rate"] = f["rate"], w / f["min_s"] / 1e9
        if measured:
            row_limits[where] = max(measured, key=lambda f: f["rate"])
        elif where in limits:  # the limit's own measurement failed: the run-level figure
            ref = limits[where]["copy"] if spec.metric == "GB/s" else limits[where]["gemm"][dtype]
            row_limits[where] = {"what": ref["what"], "rate": ref["rate"]}

    impls: dict[str, Any] = {}
    for t in timed:
        if t.key.endswith(CONTENDED):
            continue
        kind, where = kinds[t.key]
        if kind == "limit":
            continue
        fig = {"kind": kind, "device": where, **figures(t, amount)}
        if where in row_limits:
            fig["limit_fraction"] = fig["rate"] / row_limits[where]["rate"]
        busy = by_key.get(t.key + CONTENDED)
        if busy is not None:
            fig["contended"] = figures(busy, amount)
            fig["kept"] = fig["median_s"] / fig["contended"]["median_s"]
        impls[t.key] = fig
    ref = impls.get("numpy")
    for fig in impls.values():
        if ref is not None:
            fig["speedup_vs_numpy"] = ref["median_s"] / fig["median_s"]
        torch_key = {"cpu": "torch", "gpu": "torch-cuda", "gpu-tf32": "torch-cuda-tf32"}[fig["device"]]
        if torch_key in impls and fig["kind"] == "nnfast":
            fig["speedup_vs_torch"] = impls[torch_key]["median_s"] / fig["median_s"]
            if "contended" in fig and "contended" in impls[torch_key]:
                fig["contended"]["speedup_vs_torch"] = (impls[torch_key]["contended"]["median_s"]
                                                        / fig["contended"]["median_s"])

    return {
        "op": spec.name,
        "group": spec.group,
        "variant": variant,
        "size": shape.size,
        "shape": shape_record(spec, shape),
        "label": shape.label,
        "dtype": dtype,
        "metric": spec.metric,
        "work": amount,
        "model": spec.model,
        "limits": row_limits,
        "impls": impls,
    }


def _at(wrap: Callable[[Callable[[], Any], str], Callable[[], Any]], fn: Callable[[], Any],
        precision: str | None) -> Callable[[], Any]:
    """``fn`` wrapped to run at ``precision`` (None: as it is)."""
    return fn if precision is None else wrap(fn, precision)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nnfast.bench``: the same as ``nnfast bench``."""
    parser = argparse.ArgumentParser(prog="nnfast bench", description="Per-kernel timings against NumPy, "
                                     "PyTorch and the machine's limits.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
