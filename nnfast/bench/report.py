"""The report as text: aligned tables for the terminal, Markdown for the README."""

from __future__ import annotations

from typing import Any

from ..ops import SGD_LR, SGD_MOMENTUM


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt_rate(rate: float, metric: str) -> str:
    unit = "GF/s" if metric == "GFLOP/s" else "GB/s"
    if rate >= 100:
        return f"{rate:.0f} {unit}"
    if rate >= 10:
        return f"{rate:.1f} {unit}"
    return f"{rate:.2f} {unit}"


def _fmt_percent(fraction: float) -> str:
    percent = fraction * 100
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


def _limit_cell(device: str, limit: dict[str, Any]) -> str:
    """Short text of a row's limit: 'GEMM 132 GF/s', 'stream 2R 1W 41.2 GB/s', 'copy 26.2 GB/s' (GPU prefixed)."""
    prefix = {"gpu": "GPU ", "gpu-tf32": "GPU TF32 "}.get(device, "")
    if "matmul" in limit["what"]:
        return f"{prefix}GEMM {_fmt_rate(limit['rate'], 'GFLOP/s')}"
    if limit["what"].startswith("stream "):  # 'stream 2R 1W, 3 × 4194304 float32 (48 MiB), every thread'
        return f"{prefix}{limit['what'].split(',')[0]} {_fmt_rate(limit['rate'], 'GB/s')}"
    return f"{prefix}copy {_fmt_rate(limit['rate'], 'GB/s')}"


def impl_order(report: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for row in report["results"]:
        for key in row["impls"]:
            seen.setdefault(key, None)
    nnfast_keys = [k for k in report["settings"]["backends"] if k in seen]
    others = [k for k in seen if k not in nnfast_keys]
    return nnfast_keys + others


def _mlp(r: dict[str, Any]) -> str:
    return "[" + ",".join(map(str, r["shape"]["sizes"])) + "]"


def _is_epoch(r: dict[str, Any]) -> bool:
    return r["op"] == "train_step" and "samples" in r["shape"]


def table(report: dict[str, Any], rows: list[dict[str, Any]], train: bool = False,
          ) -> tuple[list[str], list[list[str]], int]:
    """Header, cells and number of leading label columns of one table (kernel rows, training-step rows, or
    training-epoch rows: ``train`` with rows whose shape has ``samples``)."""
    order = [k for k in impl_order(report) if any(k in r["impls"] for r in rows)]
    fast = [k for k in order if k != "numpy" and any(r["impls"].get(k, {}).get("kind") == "nnfast" for r in rows)]
    has_torch = [k for k in order if k.startswith("torch")]
    nnfast_keys = [k for k in order if not k.startswith("torch")]
    epoch = train and all(_is_epoch(r) for r in rows)
    if train:
        header = ["MLP (SGD)", "loop", "batch"] + (["samples"] if epoch else []) + ["dtype"]
    else:
        header = ["kernel", "shape", "dtype"]
    lead = len(header)
    header += [f"{k} {'s/epoch' if epoch else 'ms/step'}" if train else k for k in order]
    vs_numpy = fast if "numpy" in order else []  # a GPU-sized run has no NumPy reference
    header += [f"{k} vs numpy" for k in vs_numpy]
    if has_torch:
        header += [f"{k} vs torch" for k in fast]
    header += [f"{k} % limit" for k in nnfast_keys]
    header.append("limit")
    cells: list[list[str]] = []
    for r in rows:
        if train:
            line = [_mlp(r), r["variant"], str(r["shape"]["batch"])]
            line += ([str(r["shape"]["samples"])] if epoch else []) + [r["dtype"]]
        else:
            name = r["op"] + (f" {r['variant']}" if r["variant"] else "")
            line = [name, r["label"], r["dtype"]]
        for k in order:
            f = r["impls"].get(k)
            if f is None:
                line.append("–")
            elif train:
                line.append(f"{f['median_s']:.3g}" if epoch else f"{f['median_s'] * 1e3:.3g}")
            else:
                line.append(f"{_fmt_time(f['median_s'])} · {_fmt_rate(f['rate'], r['metric'])}")
        for k in vs_numpy:
            f = r["impls"].get(k, {})
            line.append(f"{f['speedup_vs_numpy']:.2f}×" if "speedup_vs_numpy" in f else "–")
        if has_torch:
            for k in fast:
                f = r["impls"].get(k, {})
                line.append(f"{f['speedup_vs_torch']:.2f}×" if "speedup_vs_torch" in f else "–")
        for k in nnfast_keys:
            f = r["impls"].get(k, {})
            line.append(_fmt_percent(f["limit_fraction"]) if "limit_fraction" in f else "–")
        line.append("; ".join(_limit_cell(device, v) for device, v in r["limits"].items()) or "–")
        cells.append(line)
    return header, cells, lead


def contended_table(report: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], int]:
    """Header, cells and label columns (3) of the ``--contended`` table: each implementation quiet, beside a
    busy core, and kept."""
    order = [k for k in impl_order(report) if any("contended" in r["impls"].get(k, {}) for r in rows)]
    fast = [k for k in order if k != "numpy" and not k.startswith("torch")]
    with_torch = [k for k in fast if any("speedup_vs_torch" in r["impls"].get(k, {}).get("contended", {})
                                         for r in rows)]
    header = ["case", "shape", "dtype"]
    for k in order:
        header += [f"{k} quiet", f"{k} contended", f"{k} kept"]
    header += [f"{k} vs torch contended" for k in with_torch]
    cells: list[list[str]] = []
    for r in rows:
        if r["op"] == "train_step":
            epoch = f", epoch of {r['shape']['samples']}" if _is_epoch(r) else ""
            line = [f"train_step {r['variant']}", f"{_mlp(r)} b{r['shape']['batch']}{epoch}", r["dtype"]]
        else:
            line = [r["op"] + (f" {r['variant']}" if r["variant"] else ""), r["label"], r["dtype"]]
        for k in order:
            f = r["impls"].get(k, {})
            if "contended" not in f:
                line += ["–", "–", "–"]
                continue
            line += [_fmt_time(f["median_s"]), _fmt_time(f["contended"]["median_s"]), f"{f['kept']:.2f}×"]
        for k in with_torch:
            busy = r["impls"].get(k, {}).get("contended", {})
            line.append(f"{busy['speedup_vs_torch']:.2f}×" if "speedup_vs_torch" in busy else "–")
        cells.append(line)
    return header, cells, 3


#: Title of the ``--contended`` section.
CONTENDED_TITLE = "Under contention: a busy-looping process on one core"


def _sections(report: dict[str, Any], rows: list[dict[str, Any]] | None = None,
              ) -> list[tuple[str, bool | None, list[dict[str, Any]]]]:
    """(title, train?, rows) of each table; ``train`` is None for the contended table."""
    rows = report["results"] if rows is None else rows
    kernels = [r for r in rows if r["op"] != "train_step"]
    steps = [r for r in rows if r["op"] == "train_step" and not _is_epoch(r)]
    epochs = [r for r in rows if _is_epoch(r)]
    out: list[tuple[str, bool | None, list[dict[str, Any]]]] = []
    if kernels:
        out.append(("Kernels", False, kernels))
    what = f"MLP, ReLU, softmax-CE, SGD (lr {SGD_LR}, momentum {SGD_MOMENTUM})"
    if steps:
        out.append((f"Training step: {what}", True, steps))
    if epochs:
        out.append((f"Training epoch: {what}, consecutive batches of random data", True, epochs))
    contended = [r for r in rows if any("contended" in f for f in r["impls"].values())]
    if contended:
        out.append((CONTENDED_TITLE, None, contended))
    return out


def _table(report: dict[str, Any], rows: list[dict[str, Any]], train: bool | None,
           ) -> tuple[list[str], list[list[str]], int]:
    return contended_table(report, rows) if train is None else table(report, rows, train)


def machine_line(report: dict[str, Any]) -> str:
    """One line naming the machine, threads and versions of a report."""
    m = report["machine"]
    layer = m.get("numba_threading_layer")
    threads = ", ".join(f"{k} {v}" + (f" ({layer})" if k == "numba" and layer else "")
                        for k, v in m.get("threads", {}).items())
    cores = m.get("physical_cores") or m.get("logical_cpus")
    parts = [f"{m['cpu']} ({cores} cores, {m.get('logical_cpus')} logical)"]
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu'].get('name')}")
    if threads:
        parts.append(f"threads: {threads}")
    parts.append(", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v))
    return " · ".join(parts)


def limits_line(report: dict[str, Any]) -> str:
    """One line with the machine limits measured in the run."""
    parts = []
    for device, lim in report["limits"].items():
        gemm = "; ".join(f"{v['what']} {v['rate']:.0f} GFLOP/s" for v in lim["gemm"].values())
        parts.append(f"{device.upper()}: {gemm}; {lim['copy']['what']} {lim['copy']['rate']:.1f} GB/s")
    return " · ".join(parts)


def render_text(report: dict[str, Any]) -> str:
    """The report as aligned plain-text tables."""
    out = [f"nnfast bench · {report['created']}", machine_line(report), "limits: " + limits_line(report),
           "times are medians; 'vs' columns are speedups measured side by side in this run"]
    for title, train, rows in _sections(report):
        header, cells, _ = _table(report, rows, train)
        widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(len(header))]
        out += ["", title, "  ".join(h.ljust(w) for h, w in zip(header, widths)),
                "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(out)


def render_markdown(report: dict[str, Any], heading_level: int = 3,
                    rows: list[dict[str, Any]] | None = None) -> str:
    """The report (or the given ``rows`` of it) as Markdown tables, with machine, limits and work models."""
    h = "#" * heading_level
    load = report["machine"].get("load_average_1min")
    end = report["machine"].get("load_average_1min_end")
    busy = (f" (1-minute load average at the start: {load:.1f}" + (f", at the end: {end:.1f})" if end is not None
                                                                  else ")")) if load is not None else ""
    out = [f"Measured {report['created'][:10]} on {machine_line(report)}{busy}.", "",
           f"Machine limits measured in the same run: {limits_line(report)}.", "",
           "Times are medians after warm-up; speedups are measured side by side in the same run; "
           "'% limit' is the median rate over the machine's peak (best sample) for the same work, measured "
           "beside it: the BLAS GEMM "
           "(GFLOP/s kernels), or for the memory-bound kernels a loop that only streams the same arrays at the "
           "same size ('stream 2R 1W': two arrays read, one written; 'RW': updated in place), on every thread "
           "or on one, whichever is faster.", ""]
    if report["settings"].get("contended"):
        out += ["'Under contention': every case measured again, in the same rounds, while a busy-looping "
                "process holds one core; 'kept' is the quiet median over the contended one.", ""]
    for title, train, section_rows in _sections(report, rows):
        header, cells, lead = _table(report, section_rows, train)
        out += [f"{h} {title}", "", "| " + " | ".join(header) + " |",
                "|" + "|".join("---" if i < lead else "---:" for i in range(len(header))) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in cells]
        out.append("")
    models = report.get("models", {})
    if models:
        out.append("Work models: " + "; ".join(f"{k} {v['work']}" for k, v in models.items())
                   + " (s = bytes per element).")
        out.append("")
    out.append(f"Reproduce: `{report['command']}`")
    return "\n".join(out) + "\n"
