"""The machine of a device run: GPU, driver, clocks, versions, and which source tree ran.

Prints ``nvidia-smi``'s view of the GPU (where it is installed), CuPy's
(multiprocessors, L2, memory, clocks), the versions of everything nnfast and
the device script use, and the commit: ``NNFAST_COMMIT`` if set, else
``git rev-parse HEAD`` where the tree is a git checkout; a copy of a tree
without ``.git`` is named by a digest of its sources (``nnfast/``,
``kernels/``, ``tests/``, ``benchmarks/``), which the same digest of a
commit's files reproduces. ``--json FILE`` writes it all.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: The directories whose files the source digest covers.
SOURCES = ("nnfast", "kernels", "tests", "benchmarks")
PACKAGES = ("numpy", "numba", "cupy-cuda13x", "cupy-cuda12x", "torch", "pytest", "hypothesis", "tqdm",
            "scikit-learn")
SMI_QUERY = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
             "temperature.gpu,power.draw,power.limit,persistence_mode")


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the paths and bytes of every ``.py``, ``.cu``, ``.cuh``, ``.h`` and ``.sh`` file of :data:`SOURCES`."""
    h = hashlib.sha256()
    files = sorted(p for d in SOURCES for p in (root / d).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".cu", ".cuh", ".h", ".sh") and "__pycache__" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def commit(root: Path = ROOT) -> str:
    given = os.environ.get("NNFAST_COMMIT", "").strip()
    if given:
        return given
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (no .git here; set NNFAST_COMMIT)"


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{argv[0]} failed: {err}"


def gpu() -> dict[str, Any]:
    """CuPy's view of device 0, or why there is none."""
    from nnfast.backends.cupy_backend import cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    if reason is not None:
        return {"error": reason}
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    attrs = cupy.cuda.Device(0).attributes
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    info = {"name": name, "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": props["multiProcessorCount"], "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "l2_mib": round(attrs.get("L2CacheSize", 0) / 2**20, 1),
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(), "cuda_driver": cupy.cuda.runtime.driverGetVersion()}
    for key, attr in (("sm_clock_mhz", "ClockRate"), ("memory_clock_mhz", "MemoryClockRate")):
        if attr in attrs:
            info[key] = attrs[attr] // 1000
    if "MemoryClockRate" in attrs and "GlobalMemoryBusWidth" in attrs:  # double data rate
        info["memory_bandwidth_gbs"] = round(2 * attrs["MemoryClockRate"] * 1e3 * attrs["GlobalMemoryBusWidth"] / 8 / 1e9)
    return info


def collect() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    import nnfast

    versions["nnfast"] = nnfast.__version__
    sanitizer = shutil.which("compute-sanitizer")
    return {"date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "commit": commit(), "source_digest": source_digest(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "versions": versions, "gpu": gpu(),
            "nvidia_smi": _run(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv"]),
            "compute_sanitizer": _run([sanitizer, "--version"]) if sanitizer else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    info = collect()
    full_smi = _run(["nvidia-smi"])
    print(full_smi if full_smi is not None else "nvidia-smi: not found")
    for key, value in info.items():
        if key != "nvidia_smi":
            print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    print(f"nvidia_smi --query-gpu:\n{info['nvidia_smi']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
