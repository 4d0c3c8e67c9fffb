"""The verdicts and figures of a ``first_contact.sh`` run: ``summary.md`` (ready to commit as
``benchmarks/gpu/RESULTS.md``), ``train.json``, and the table printed last.

Reads what the stages left: ``stages.tsv`` (name, exit status, seconds,
limit, note per stage), each stage's log, ``environment.json`` and
``warm_up.json`` in the log directory; ``selftest.json`` and ``bench.json``
in the output directory. compute-sanitizer's findings are grouped by kind
and place (the kernel, its offset and source line) and listed in
``summary.md``; the stage table gives the counts and the most frequent one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

#: Exit status of a stage that ``timeout`` ended.
TIMED_OUT = (124, 137)
#: Exit status of a stage with nothing to run here (a tool or package missing): reported, not failed.
UNAVAILABLE = (3, 4)
#: What compute-sanitizer prints when it cannot instrument the device (seen on some virtual machines).
REFUSED = re.compile(r"Device not supported|device is not supported|cudaErrorUnknown|CUDA_ERROR_UNKNOWN|error 999")
EPOCH = re.compile(r"epoch\s+(\d+)/(\d+)\s+loss (\S+)\s+test acc\s+([\d.]+)%\s+([\d.]+) s\s+(\d+) samples/s")
PYTEST = re.compile(r"((?:\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed)(?:, )?)+) in [\d.]+s")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def stages(logs: Path) -> list[dict[str, Any]]:
    rows = []
    for line in _text(logs / "stages.tsv").splitlines():
        name, rc, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
        rows.append({"name": name, "rc": int(rc), "seconds": float(seconds), "limit": int(limit), "note": note})
    return rows


def _epochs(log: str) -> list[dict[str, Any]]:
    return [{"epoch": int(m[1]), "loss": float(m[3]), "test_accuracy": float(m[4]) / 100, "seconds": float(m[5]),
             "samples_per_second": int(m[6])} for m in EPOCH.finditer(log)]


def verdict(stage: dict[str, Any], logs: Path, out: Path) -> tuple[str, str]:
    """``(status, result)`` of one stage, from its exit status, its log and its files."""
    name, rc = stage["name"], stage["rc"]
    log = _text(logs / f"{name}.log")
    if rc == -1:
        return "not run", stage["note"] or "no time left in the budget"
    if name in ("memcheck", "racecheck"):
        return _sanitizer(rc, log, stage["note"], stage["limit"])
    if rc in TIMED_OUT:
        return "TIMED OUT", f"stopped after its {stage['limit']} s limit; {_last_line(log)}"
    if rc in UNAVAILABLE:
        return "unavailable", _last_line(log)
    status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    if name == "environment":
        env = _load(logs / "environment.json") or {}
        gpu = env.get("gpu") or {}
        return status, gpu.get("name", gpu.get("error", "?")) + (f", driver {gpu['cuda_driver']}" if "cuda_driver" in gpu
                                                                 else "")
    if name == "warm-up":
        w = _load(logs / "warm_up.json") or {}
        serial = f" (serially {w['serial_s']:.1f} s)" if "serial_s" in w else ""
        b = w.get("backend") if isinstance(w.get("backend"), dict) else {}
        counts = f"; {b['compiled']} of {b['kernels']} kernels compiled, {b['cached']} cached" if "kernels" in b else ""
        return status, f"{w.get('wall_s', float('nan')):.1f} s wall{serial}{counts}" if w else _last_line(log)
    if name == "selftest":
        s = _load(out / "selftest.json") or {}
        failed = s.get("failed", [])
        text = f"{s.get('checks', 0)} checks, {len(failed)} failed" + (f": {', '.join(failed[:4])}" if failed else "")
        return status, text if s else _last_line(log)
    if name == "pytest-gpu":
        m = list(PYTEST.finditer(log))
        return status, m[-1].group(1) if m else _last_line(log)
    if name == "bench":
        b = _load(out / "bench.json") or {}
        return status, (f"{len(b.get('results', []))} cases, {len(b.get('errors', []))} errors, "
                        f"{len(b.get('skipped', []))} skipped") if b else _last_line(log)
    if name == "train-step":
        rows = (_load(logs / "train_step.json") or {}).get("rows", [])
        if rows:
            return status, "; ".join(f"{r['mode']} {r['us_per_step']:.0f} µs/step"
                                     + (f", {r['syncs_per_step']:g} syncs" if r.get("syncs_per_step") is not None
                                        else "") for r in rows)
    if name.startswith(("train-", "torch-")):
        epochs = _epochs(log)
        if epochs:
            last = epochs[-1]
            return status, (f"test accuracy {100 * last['test_accuracy']:.2f}% after {last['epoch']} epochs, "
                            f"last epoch {last['seconds']:.2f} s ({last['samples_per_second']} samples/s)")
    return status, _last_line(log)


#: A finding of compute-sanitizer: memcheck's "Invalid __global__ read of size 4 bytes", racecheck's
#: "Error: Race reported between ...", an analysis "ERROR: Potential WAW hazard ...", a device trap.
FINDING = re.compile(r"^=+ ((?:Invalid |Misaligned |Out-of-range |Race reported|Error: |ERROR: |Warning: "
                     r"|Program hit |Barrier error|Malloc/Free error).*)$", re.M)
#: Where a finding happened: the next line's "at <kernel>+0x1b0 in file.cu:12" (or the older "at 0x1b0 in
#: <kernel>"); for a race, the other access ("and Read access at ...").
WHERE = re.compile(r"^=+\s+(at|in|and) (.*)$")
#: Lines of the sanitizer's own that are not findings (the driver's exit status is read from its summary line).
NOT_FINDINGS = ("SUMMARY", "process didn't terminate successfully", "Target application returned an error")


def sanitizer_findings(log: str, limit: int = 5) -> list[str]:
    """The distinct findings of a compute-sanitizer log, each with where it happened, most frequent first."""
    lines = log.splitlines()
    counts: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = FINDING.match(line)
        if not m or any(text in line for text in NOT_FINDINGS):
            continue
        where = WHERE.match(lines[i + 1]) if i + 1 < len(lines) else None
        text = m.group(1).strip()
        if where:
            text += f" {'and' if where.group(1) == 'and' else 'at'} {where.group(2).strip()}"
        # Device addresses differ from thread to thread: one finding, not many. (Code offsets are short.)
        text = re.sub(r"0x[0-9a-fA-F]{9,}", "0x…", text)
        counts[text[:240]] = counts.get(text[:240], 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return [f"{text} (×{n})" if n > 1 else text for text, n in ranked[:limit]]


def _sanitizer(rc: int, log: str, note: str, limit: int = 0) -> tuple[str, str]:
    """The verdict of memcheck or racecheck: a refused device and a missing tool are not failures."""
    if rc == 4:
        return "unavailable", "compute-sanitizer not found"
    refused = REFUSED.search(log)
    if refused:
        return "refused", f"compute-sanitizer could not instrument this device: {refused.group(0)}"
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", log)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", log)
    checks = re.findall(r"(\d+) checks, (\d+) passed, (\d+) failed", log)
    parts = ([f"{errors[-1]} errors"] if errors else []) + ([f"{hazards[-1]} hazards"] if hazards else [])
    if checks:
        parts.append(f"driver: {checks[-1][0]} checks, {checks[-1][2]} failed")
    else:  # stopped before its summary: how far the driver came
        ran = re.findall(r"^(PASS|FAIL)  ", log, re.M)
        if ran:
            parts.append(f"driver: {len(ran)} checks done, {ran.count('FAIL')} failed")
    findings = sanitizer_findings(log, limit=1)
    if findings:
        parts.append(f"most frequent: {findings[0]}")
    text = ", ".join(parts) or _last_line(log)
    if note:
        text += f" ({note})"
    if rc in TIMED_OUT:
        return "TIMED OUT", f"stopped after its {limit} s limit; {text}"
    return ("ok" if rc == 0 else f"FAILED (exit {rc})"), text


def _last_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:160] if lines else "(no output)"


def _rate(fig: dict[str, Any] | None, metric: str) -> str:
    """A rate in GFLOP/s or GB/s as ``52.1 TFLOP/s``, ``3.21 TB/s`` or ``8.4 GB/s``."""
    if not fig:
        return "–"
    rate = fig["rate"]
    return f"{rate / 1e3:.3g} T{metric[1:]}" if rate >= 1000 else f"{rate:.3g} {metric}"


def bench_table(bench: dict[str, Any]) -> list[str]:
    nnfast = [k for k in bench.get("settings", {}).get("backends", []) if k != "numpy"]
    rows = ["| kernel | shape | dtype | nnfast | time | limit (cuBLAS / copy) | % limit | torch fp32 | torch tf32 "
            "| vs torch fp32 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bench.get("results", []):
        impls = r["impls"]
        ours = next((impls[k] for k in nnfast if k in impls), None)
        limit = next(iter(r.get("limits", {}).values()), None)
        rows.append("| " + " | ".join([
            r["op"] + (f" {r['variant']}" if r["variant"] else ""), r["label"], r["dtype"], _rate(ours, r["metric"]),
            f"{ours['median_s'] * 1e3:.3g} ms" if ours else "–", _rate(limit, r["metric"]),
            f"{100 * ours['limit_fraction']:.0f}%" if ours and "limit_fraction" in ours else "–",
            _rate(impls.get("torch-cuda"), r["metric"]), _rate(impls.get("torch-cuda-tf32"), r["metric"]),
            f"{ours['speedup_vs_torch']:.2f}×" if ours and "speedup_vs_torch" in ours else "–"]) + " |")
    return rows


def _sanitizer_section(logs: Path, rows: list[dict[str, Any]]) -> list[str]:
    """What memcheck and racecheck found, kernel by kernel (nothing when they found nothing)."""
    md = []
    for s in rows:
        if s["name"] in ("memcheck", "racecheck") and s["rc"] != -1:
            findings = sanitizer_findings(_text(logs / f"{s['name']}.log"), limit=10)
            md += [f"- {s['name']}: {f}" for f in findings]
    return ["", "## compute-sanitizer findings", "", *md] if md else []


def training(logs: Path) -> dict[str, Any]:
    runs = {}
    for name in ("train-digits", "train-synthetic", "torch-digits", "torch-synthetic"):
        epochs = _epochs(_text(logs / f"{name}.log"))
        if epochs:
            runs[name] = epochs
    return runs


def write(logs: Path, out: Path, dry_run: bool) -> list[str]:
    """Write ``summary.md`` and ``train.json`` to ``out``; return the lines to print last."""
    env = _load(logs / "environment.json") or {}
    gpu = env.get("gpu") or {}
    rows = stages(logs)
    verdicts = [(s, *verdict(s, logs, out)) for s in rows]
    total = sum(s["seconds"] for s in rows)
    title = gpu.get("name", "no GPU") + (" (dry run on the CPU, numba backend)" if dry_run else "")
    md = [f"# nnfast on a GPU: first contact, {title}", "",
          f"- date: {env.get('date', '?')}",
          f"- GPU: {gpu.get('name', gpu.get('error', '?'))}"
          + (f", sm {gpu['compute_capability']}, {gpu['multiprocessors']} SMs, {gpu['memory_gib']} GiB, "
             f"L2 {gpu['l2_mib']} MiB; CUDA driver {gpu['cuda_driver']}, runtime {gpu['cuda_runtime']}"
             if "compute_capability" in gpu else ""),
          f"- driver (nvidia-smi): {(env.get('nvidia_smi') or 'not found').splitlines()[-1]}",
          f"- commit: {env.get('commit', '?')}; source digest {env.get('source_digest', '?')} "
          "(`python benchmarks/gpu/environment.py` prints it for a checkout)",
          f"- versions: {', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())}",
          f"- stages: {total:.0f} s in all", "", "## Stages", "",
          "| stage | status | time | limit | result |", "|---|---|---:|---:|---|"]
    md += [f"| {s['name']} | {status} | {s['seconds']:.1f} s | {s['limit']} s | {result} |"
           for s, status, result in verdicts]
    selftest = _load(out / "selftest.json") or {}
    failed = [r for r in selftest.get("results", []) if not r.get("passed")]
    md += ["", "## Selftest", "", f"{selftest.get('checks', 0)} checks on backend "
           f"{selftest.get('info', {}).get('backend', '?')} ({', '.join(selftest.get('dtypes', []))}), "
           f"{len(failed)} failed."]
    md += [f"- FAIL {r['name']} ({r['dtype']}, {r['shape']}): {'; '.join(r['problems'])[:300]}" for r in failed[:20]]
    md += _sanitizer_section(logs, rows)
    bench = _load(out / "bench.json")
    if bench:
        limits = bench.get("limits", {}).get("gpu") or bench.get("limits", {}).get("cpu") or {}
        md += ["", "## Benchmark", "", f"`{bench.get('command', '')}`; medians. Limits measured in the same run: "
               + "; ".join(f"{v['what']} {v['rate']:.0f} GFLOP/s" for v in limits.get("gemm", {}).values())
               + (f"; {limits['copy']['what']} {limits['copy']['rate']:.0f} GB/s" if "copy" in limits else ""), ""]
        md += bench_table(bench)
        md += [f"- error: {e['impl']} {e['case']}: {e['reason']}" for e in bench.get("errors", [])]
        md += [f"- skipped: {e['impl']} {e['case']}: {e['reason']}" for e in bench.get("skipped", [])]
    runs = training(logs)
    (out / "train.json").write_text(json.dumps(runs, indent=1) + "\n", encoding="utf-8")
    train_table = ["| run | epochs | final loss | test accuracy | last epoch | samples/s |",
                   "|---|---:|---:|---:|---:|---:|"]
    train_table += [f"| {name} | {e[-1]['epoch']} | {e[-1]['loss']:.4f} | {100 * e[-1]['test_accuracy']:.2f}% | "
                    f"{e[-1]['seconds']:.2f} s | {e[-1]['samples_per_second']} |" for name, e in runs.items()]
    md += ["", "## Training (nnfast train, and the same run in PyTorch eager)", "", *train_table]
    ran = [f"- {s['name']}: {status}, {result}" for s, status, result in verdicts
           if status not in ("not run", "unavailable", "refused")]
    md += ["", "## What executed in this run", "", *ran, ""]
    (out / "summary.md").write_text("\n".join(md), encoding="utf-8")
    width = max([len(s["name"]) for s in rows] + [5])
    table = [f"{'stage':<{width}}  {'status':<12} {'time':>7}  result"]
    table += [f"{s['name']:<{width}}  {status:<12} {s['seconds']:6.1f}s  {result}" for s, status, result in verdicts]
    return ["", f"first contact: {title}, commit {env.get('commit', '?')}", *(bench_table(bench) if bench else []),
            "", *train_table, "", *table, f"stages: {total:.0f} s in all; files in {out}: "
            + ", ".join(sorted({p.name for p in out.iterdir()} | {"logs.tar.gz"}))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    print("\n".join(write(args.logs, args.out, args.dry_run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
