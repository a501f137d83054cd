"""The roofline plot of a benchmark run (``hal bench --plot FILE.png``).

x: arithmetic intensity (FLOP per byte of what the case must read), y: achieved GFLOP/s, both log.
The roof is drawn from the machine probes of the same run: the copy-bandwidth slope (read bandwidth
dashed) and the bf16 and fp32 matmul ceilings. Every case is a point per implementation, hal and the
baselines with different markers, the kinds in different colours (not hal-cached, whose rows come from
the cache, not through the memory the roof is drawn for). Below it, where a run has quantized decode
cases, their gains: per case the measured gain over hal on the same KV in the model dtype (a bar),
the ceiling its compute alone allows (``gain_ceiling``) and the ratio of the bytes the two read (what
a gain bound by memory alone would reach). matplotlib is imported here only
(``pip install 'hal-attention[bench]'``), never by ``import hal``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hal.bench.build import CACHED
from hal.bench.runner import BenchReport

__all__ = ["plot_roofline"]

_MARKERS = {"hal": "o", "sdpa": "^", "sdpa-packed": "v", "gather+sdpa": "s"}
_COLORS = {"decode": "tab:blue", "prefill": "tab:orange", "mla": "tab:green"}
_MAX_LABELS = 16
_LABEL_STEP = 9  # points between the labels of cases whose points (nearly) coincide


def _label_offsets(points: list[tuple[float, float]]) -> list[int]:
    """Vertical offsets (points) for labels at these (x, y), both log-scaled: a label near one already
    placed (within 0.3 decades in x and 0.08 in y: same intensity, similar rate, as bf16 B8 and B1 decode)
    goes one step lower per such neighbour, so coinciding cases stay readable."""
    placed: list[tuple[float, float]] = []
    out = []
    for x, y in points:
        lx, ly = math.log10(x), math.log10(y)
        out.append(4 - _LABEL_STEP * sum(abs(lx - px) < 0.3 and abs(ly - py) < 0.08 for px, py in placed))
        placed.append((lx, ly))
    return out


def _axes(ax: Any, bb: Any) -> None:
    import numpy as np

    m = bb.machine
    pts = [(r.intensity, r.tflops * 1e3, c, r) for c in bb.cases for r in c.impls
           if r.status == "ok" and r.intensity and r.tflops and r.name != CACHED]
    peak16 = m.matmul_tflops.get("bf16", 0) * 1e3
    peak32 = m.matmul_tflops.get("fp32", 0) * 1e3
    top = max([peak16, peak32, 1e-3] + [p[1] for p in pts])
    ridge = peak16 / m.copy_gbps if m.copy_gbps else 100.0
    xs = [p[0] for p in pts] + [ridge]
    x = np.logspace(np.log10(min(xs) / 4), np.log10(max(xs) * 4), 200)
    ax.plot(x, np.minimum(m.copy_gbps * x, peak16), color="black", lw=2,
            label=f"roof: copy {m.copy_gbps:.1f} GB/s, bf16 {peak16 / 1e3:.3g} TFLOP/s")
    ax.plot(x, np.minimum(m.read_gbps * x, peak16), color="gray", ls="--", lw=1,
            label=f"read {m.read_gbps:.1f} GB/s")
    ax.axhline(peak32, color="gray", ls=":", lw=1, label=f"fp32 matmul {peak32 / 1e3:.3g} TFLOP/s")
    seen: set[tuple[str, str]] = set()
    label = sum(r.name == "hal" for *_, r in pts) <= _MAX_LABELS  # more: they overlap, the report has them
    if not label:
        ax.text(0.99, 0.01, "case labels left out (too many to read): see the report or its JSON",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    offsets = iter(_label_offsets([(xi, yi) for xi, yi, _, r in pts if r.name == "hal"]))
    for xi, yi, c, r in pts:
        key = (c.kind, r.name)
        marker = _MARKERS.get(r.name, "x")
        edge = {"edgecolors": "black" if r.name == "hal" else "none"} if marker != "x" else {}  # "x" has no edge
        ax.scatter([xi], [yi], marker=marker, color=_COLORS.get(c.kind, "tab:red"),
                   s=60 if r.name == "hal" else 40, alpha=0.9 if r.name == "hal" else 0.6,
                   label=f"{c.kind} {r.name}" if key not in seen else None, zorder=3, **edge)
        seen.add(key)
        dy = next(offsets) if r.name == "hal" else 0
        if r.name == "hal" and label:
            ax.annotate(c.label.split(" ", 1)[1], (xi, yi), textcoords="offset points", xytext=(5, dy), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    low = min([p[1] for p in pts] + [top]) / 4
    ax.set_ylim(low, top * 3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte read)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"{bb.name}: {m.cpu_model if m.device_type == 'cpu' else m.device}"
                 + (" (EMULATED)" if bb.emulated else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _gain_rows(bb: Any) -> list[tuple[str, float, float | None, float]]:
    """(label, gain, ceiling, byte ratio) of each quantized decode case measured against its hal-<dtype>."""
    rows = []
    for c in bb.cases:
        hal = c.impl("hal") if c.kind == "decode" else None
        unq = next((r for r in c.impls if r.name.startswith("hal-") and r.name != CACHED), None)
        if hal is None or unq is None or unq.speedup is None or not hal.bytes or not unq.bytes:
            continue
        ratio = (unq.bytes / max(unq.layers, 1)) / (hal.bytes / max(hal.layers, 1))
        rows.append((c.label.split(" ", 1)[1], unq.speedup, c.gain_ceiling, ratio))
    return rows


def _gains_axes(ax: Any, bb: Any, rows: list[tuple[str, float, float | None, float]]) -> None:
    xs = range(len(rows))
    ax.bar(xs, [g for _, g, _, _ in rows], width=0.6, color="tab:blue", alpha=0.75,
           label="gain over hal-<dtype> (measured)")
    ax.set_xlim(-0.75, max(len(rows), 6) - 0.25)  # a few cases keep narrow bars
    ceil = [(i, c) for i, (_, _, c, _) in enumerate(rows) if c is not None]
    if ceil:
        ax.scatter([i for i, _ in ceil], [c for _, c in ceil], marker="D", color="black", zorder=3, s=28,
                   label="ceiling: hal-<dtype> / hal-cached (its compute alone)")
    ax.scatter(list(xs), [r for *_, r in rows], marker="_", color="tab:gray", zorder=3, s=300, linewidths=2,
               label="bytes of hal-<dtype> / bytes of hal (memory-bound gain)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([label for label, *_ in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("times faster than the model dtype")
    ax.set_title(f"{bb.name}: what each KV format gains, in the same rounds", fontsize=10)
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def plot_roofline(report: BenchReport, path: str | Path) -> None:
    """Write the roofline plot of ``report`` to ``path`` (PNG), a column per backend that ran: its
    roofline, and below it its formats' gains when it measured any."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("hal bench --plot needs matplotlib: pip install 'hal-attention[bench]'") from e
    ran = [bb for bb in report.backends if bb.available and bb.machine is not None]
    gains = [_gain_rows(bb) for bb in ran]
    panels = 2 if any(gains) else 1
    fig = Figure(figsize=(11 * max(1, len(ran)), 6.5 + 5.0 * (panels - 1)))
    FigureCanvasAgg(fig)
    if not ran:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no backend ran", ha="center", va="center")
        ax.set_axis_off()
    for i, (bb, rows) in enumerate(zip(ran, gains)):
        _axes(fig.add_subplot(panels, len(ran), i + 1), bb)
        if rows:
            _gains_axes(fig.add_subplot(panels, len(ran), len(ran) + i + 1), bb, rows)
    fig.suptitle(f"hal bench ({report.sizes.name}), hal {report.hal_version}, {report.date}", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
