"""Compile the CUDA kernels before the stages that launch them, and time it.

On a GPU this is :func:`nnfast.backends.cupy_backend.warm_up`: every
instantiation of every ``kernels/*.cu`` file compiled by NVRTC in parallel
worker processes into nnfast's kernel cache, so the stages after this one
load them instead of compiling. ``--dry-run`` (no GPU) compiles one
instantiation per file to PTX, one process per file, with each file's own
options, to keep this script honest in CI.

Prints one line per file (dry run) and the wall time; ``--json FILE`` writes them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def _compile_dry(file: str) -> dict[str, Any]:
    from cupy_backends.cuda.libs import nvrtc

    from nnfast.backends import cuda_compile, cuda_launch

    began = time.perf_counter()
    name = cuda_launch.name_expressions(file)[0]
    prog = nvrtc.createProgram(cuda_launch.load_source(file), file, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        nvrtc.compileProgram(prog, ["-arch=compute_80", *cuda_compile.options(file)])
    finally:
        nvrtc.destroyProgram(prog)
    return {"file": file, "instantiations": 1, "seconds": time.perf_counter() - began}


def warm_up(dry_run: bool = False, jobs: int | None = None) -> dict[str, Any]:
    """Compile the kernels in parallel processes; returns the times (per file on a dry run)."""
    from nnfast.backends import cuda_launch, cupy_backend

    began = time.perf_counter()
    if not dry_run:
        result = cupy_backend.warm_up()
        return {"how": "nnfast.backends.cupy_backend.warm_up", "files": [], "wall_s": time.perf_counter() - began,
                "backend": result if isinstance(result, dict) else repr(result)}
    files = list(cuda_launch.KERNEL_FILES)
    with ProcessPoolExecutor(jobs or len(files), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_dry, files))
    return {"how": "NVRTC, one process per file (dry run: one instantiation each, to PTX)",
            "files": results, "wall_s": time.perf_counter() - began,
            "serial_s": sum(r["seconds"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: one instantiation per file, to PTX")
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: one per file)")
    parser.add_argument("--json", metavar="FILE", help="write the times as JSON")
    args = parser.parse_args(argv)
    report = warm_up(args.dry_run, args.jobs)
    for r in report["files"]:
        print(f"{r['file']:<20} {r['instantiations']:4d} instantiations  {r['seconds']:6.1f} s")
    serial = f" (the files one after another: {report['serial_s']:.1f} s)" if "serial_s" in report else ""
    print(f"warm-up: {report['how']}: {report['wall_s']:.1f} s wall{serial}")
    if "backend" in report:
        print(f"warm-up: {report['backend']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
