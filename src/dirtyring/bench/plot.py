"""PNG plots of bench records. matplotlib is optional (``pip install 'dirtyring[plot]'``): it is
imported only here, lazily, and when it is missing we say so in one line and draw nothing."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .records import Record, find

MISSING = "matplotlib is not installed: no PNG written (pip install 'dirtyring[plot]')"
_TRACKER_STYLE = {"ring": ("tab:blue", "o"), "bitmap": ("tab:red", "s"),
                  "bitmap-clear": ("tab:orange", "^")}


def pyplot(*, quiet: bool = False) -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None (saying so unless ``quiet``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not quiet:
            print(MISSING, file=sys.stderr)
        return None
    return plt


def save(plt: Any, fig: Any, path: Path, *, dpi: int = 110) -> Path:
    """Lay out, write ``fig`` to ``path`` (making its directory) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_harvest(records: Sequence[Record], path: Path) -> Path | None:
    """Harvest p50 (bar to p90) vs slot size, one panel per (layout, dirty pages)."""
    plt = pyplot()
    if plt is None:
        return None
    times = [r for r in records if r.metric == "harvest_time"]
    if not times:
        return None
    layouts = sorted({str(r.dims["layout"]) for r in times}, key=("contiguous", "scattered").index)
    pages = sorted({int(r.dims["dirty_pages"]) for r in times})
    trackers = [t for t in _TRACKER_STYLE if any(r.dims["tracker"] == t for r in times)]
    fig, axes = plt.subplots(len(layouts), len(pages), figsize=(4.2 * len(pages),
                             3.4 * len(layouts)), squeeze=False, sharex=True)
    for i, lay in enumerate(layouts):
        for j, n in enumerate(pages):
            ax = axes[i][j]
            for t in trackers:
                pts = sorted((float(r.dims["slot_gib"]), r.value, int(r.dims["requested_gib"]))
                             for r in times if r.stat == "p50"
                             and r.matches(tracker=t, layout=lay, dirty_pages=n))
                if not pts:
                    continue
                xs = [x for x, _, _ in pts]
                ys = [y for _, y, _ in pts]
                hi = []
                for x, y, req in pts:
                    q = find(records, "harvest_time", "p90", tracker=t, layout=lay,
                             dirty_pages=n, requested_gib=req)
                    hi.append(max(0.0, (q.value if q else y) - y))
                color, marker = _TRACKER_STYLE[t]
                ax.errorbar(xs, ys, yerr=[[0.0] * len(ys), hi], color=color, marker=marker,
                            capsize=3, label=t)
            ax.set_xscale("log", base=2)
            sizes = sorted({float(r.dims["slot_gib"]) for r in times})
            ax.set_xticks(sizes)
            ax.set_xticklabels([f"{x:g}" for x in sizes])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_title(f"{n} {lay} dirty pages", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(layouts) - 1:
                ax.set_xlabel("guest memory slot (GiB)")
            if j == 0:
                ax.set_ylabel("harvest + re-arm (µs)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("dirty-page harvest cost, median (bar to p90)")
    return save(plt, fig, path)


def plot_exits(records: Sequence[Record], path: Path) -> Path | None:
    """Left: pause_all/resume_all p50/p90/p99 per vCPU count. Right: round trip vs dispatch."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    vcpus = sorted({int(r.dims["vcpus"]) for r in records if r.metric == "pause_all"})
    stats = ("p50", "p90", "p99")
    width = 0.8 / (2 * len(stats))
    for k, metric in enumerate(("pause_all", "resume_all")):
        for s_i, s in enumerate(stats):
            ys = []
            for v in vcpus:
                r = find(records, metric, s, vcpus=v)
                ys.append(r.value if r else 0.0)
            off = (k * len(stats) + s_i) * width - 0.4 + width / 2
            ax1.bar([v + off for v in vcpus], ys, width, label=f"{metric} {s}",
                    color=("tab:blue", "tab:green")[k], alpha=(1.0, 0.65, 0.35)[s_i])
    ax1.set_xticks(vcpus)
    ax1.set_xlabel("vCPUs")
    ax1.set_ylabel("µs")
    ax1.set_yscale("log")
    ax1.set_title("pause_all / resume_all (guest running)", fontsize=10)
    ax1.legend(fontsize=7, ncol=2)
    rt = find(records, "round_trip", "p50")
    disp = find(records, "python_exit_dispatch", "p50")
    rate = find(records, "exit_rate", "p50")
    names, vals = [], []
    if rt is not None:
        names.append("round trip")
        vals.append(rt.value)
    if disp is not None:
        names.append("Python dispatch")
        vals.append(disp.value)
    ax2.bar(names, vals, color=["tab:purple", "tab:gray"][:len(vals)])
    ax2.set_ylabel("µs per exit")
    title = "KVM_RUN round trip, 1 vCPU"
    if rate is not None:
        title += f" ({rate.value:,.0f} exits/s)"
    ax2.set_title(title, fontsize=10)
    return save(plt, fig, path)
