"""PNG charts of a report (needs matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from typing import Any

from .report import impl_order, machine_line


def plot(report: dict[str, Any], path: str) -> None:
    """PNG charts, one bar per case and implementation: speedup over NumPy, fraction of the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['op']}{' ' + r['variant'] if r['variant'] else ''} {r['label']} {r['dtype']}" for r in rows]
    keys = impl_order(report)
    fast = [k for k in keys if k != "numpy"]
    height = max(4.0, 0.16 * len(rows) * max(1, len(keys)) + 1.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, height), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, chart_keys, field_name in ((left, fast, "speedup_vs_numpy"), (right, keys, "limit_fraction")):
        width = 0.8 / max(1, len(chart_keys))
        for j, key in enumerate(chart_keys):
            ys = [i + (j - (len(chart_keys) - 1) / 2) * width for i in range(len(rows))]
            values = [r["impls"].get(key, {}).get(field_name, 0.0) for r in rows]
            ax.barh(ys, values, width, label=key, color=colors[keys.index(key) % len(colors)])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right")
    left.set_xscale("log")
    left.set_xlabel("speedup over the NumPy reference (×, log scale)")
    right.set_xlabel("fraction of the machine limit (GEMM or memory copy)")
    left.set_yticks(range(len(rows)))
    left.set_yticklabels(labels, fontsize=7)
    left.invert_yaxis()
    fig.suptitle(f"nnfast bench · {report['created'][:10]} · {machine_line(report)}", fontsize=8)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.4 / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)
