"""The printed tables and the JSON file of a benchmark run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from hal.bench import accounting as A
from hal.bench.cases import BASELINES, DSV2_LITE, LLAMA3_8B
from hal.bench.runner import BackendBench, BenchReport, CaseResult, ImplResult

__all__ = ["format_report", "write_json"]

_TITLES = {
    "decode": (f"decode: {LLAMA3_8B.name}, {LLAMA3_8B.hq}/{LLAMA3_8B.hkv} heads, d{LLAMA3_8B.d}, "
               f"block {LLAMA3_8B.block_size}, pages permuted; one token per sequence; one hal.plan per step "
               f"reused by every layer"),
    "prefill": f"prefill: {LLAMA3_8B.name}, {LLAMA3_8B.hq}/{LLAMA3_8B.hkv} heads, d{LLAMA3_8B.d}, causal, one sequence",
    "mla": (f"mla: {DSV2_LITE.name} absorbed decode, {DSV2_LITE.heads} heads, latent {DSV2_LITE.kv_lora_rank} + "
            f"rope {DSV2_LITE.rope_dim}, block {DSV2_LITE.block_size}, pages permuted"),
}


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _g(x: float | None) -> str:
    """Three significant digits, no exponent for everyday magnitudes."""
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 100:.1f}%" if x < 0.1 else f"{x * 100:.0f}%"


def _size(b: int | None) -> str:
    if b is None:
        return "?"
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _machine_lines(bb: BackendBench, report: BenchReport) -> list[str]:
    m = bb.machine
    assert m is not None
    host = "" if m.device_type == "cpu" else f"; host cpu {m.cpu_model}, {m.cores} cores"
    out = [f"  device:  {bb.device or m.device}{host}; torch {m.torch_version}" + ("; EMULATED" if bb.emulated else "")]
    out.append(f"  machine: copy {m.copy_gbps:.1f} GB/s (bytes copied per second; STREAM would print 2x), read {m.read_gbps:.1f} GB/s, "
               f"{_size(m.buffer_bytes)} buffers; matmul n={m.matmul_n}: bf16 {m.matmul_tflops.get('bf16', 0):.3g} "
               f"TFLOP/s, fp32 {m.matmul_tflops.get('fp32', 0):.3g} TFLOP/s (best of {len(m.samples.get('copy', []))})")
    ridge = {k: v * 1e3 / m.copy_gbps for k, v in m.matmul_tflops.items()} if m.copy_gbps else {}
    out.append("           ridge point (matmul peak / copy bandwidth): "
               + ", ".join(f"{k} {v:.3g} FLOP/B" for k, v in ridge.items())
               + f"; last-level cache {m.llc_text}; memory {_size(m.memory_bytes)}"
               + (f"; transparent huge pages {m.huge_pages}" if m.huge_pages else ""))
    out += [f"  backend: {n}" for n in bb.notes]
    out.append(f"  timing:  {report.timing}; decode/MLA cycle layers until one measurement reads "
               f">= {_size(bb.working_set_target)} of KV")
    return out


def _impl_row(r: ImplResult, kind: str) -> list[str]:
    if r.status != "ok":
        return [r.name, "error: " + r.message]
    cells = [r.name]
    if kind == "prefill":
        cells += [_t(r.median_s), _g(r.tflops), _pct(r.frac_bf16_peak), _pct(r.frac_fp32_peak)]
    else:
        cells += [str(r.layers), _t(r.per_layer_s), _g(r.gbps), _pct(r.frac_copy_bw), _pct(r.frac_read_bw)]
        if kind == "mla":
            cells += [_g(r.tflops), _pct(r.frac_bf16_peak)]
    cells += [_pct(r.spread), "" if r.speedup is None else f"{r.speedup:.2f}x"]
    return cells


_HEADERS = {
    "decode": ["case", "impl", "layers", "time/layer", "GB/s", "%copy", "%read", "spread", "hal speedup"],
    "prefill": ["case", "impl", "time", "TFLOP/s", "%bf16pk", "%fp32pk", "spread", "hal speedup"],
    "mla": ["case", "impl", "layers", "time/layer", "GB/s", "%copy", "%read", "TFLOP/s", "%bf16pk", "spread",
            "hal speedup"],
}


def _table(kind: str, cases: list[CaseResult]) -> list[str]:
    rows: list[list[str]] = [_HEADERS[kind]]
    notes: list[str] = []
    for c in cases:
        label = c.label.split(" ", 1)[1]
        if c.status == "skip":
            rows.append([label, "skip: " + c.reason])
            continue
        if c.status == "error" and not c.impls:
            rows.append([label, "ERROR: " + c.reason])
            continue
        for j, impl in enumerate(c.impls):
            rows.append([label if j == 0 else ""] + _impl_row(impl, kind))
        if c.status == "error":
            rows.append(["", "ERROR: " + c.reason])
        if c.exceeds_llc is False:
            notes.append(f"  note: {c.label} reads only {_size(c.working_set_bytes)} per measurement, not more than "
                         f"the last-level cache: its GB/s is the cache's")
        notes += [f"  note: {c.label}: {n}" for n in c.notes]
    full = [r for r in rows if len(r) == len(_HEADERS[kind])]
    widths = [max(len(r[i]) for r in full) for i in range(len(_HEADERS[kind]))]
    out = []
    for r in rows:
        if len(r) == len(widths):
            out.append("  " + "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                        for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
        else:  # a case or implementation that did not run: its reason across the row
            out.append("  " + r[0].ljust(widths[0]) + "  " + "  ".join(r[1:]))
    legend = textwrap.wrap("baselines: " + BASELINES[kind], 108, initial_indent="  ", subsequent_indent="    ")
    return out + notes + legend


def _mla_roofline(bb: BackendBench) -> str:
    m, d = bb.machine, DSV2_LITE
    assert m is not None
    row = A.mla_row_bytes(d.kv_lora_rank, d.rope_dim, "auto", 2)
    flops = A.mla_flops_per_token(d.heads, d.kv_lora_rank, d.rope_dim)
    ridge = m.matmul_tflops.get("bf16", 0) * 1e3 / m.copy_gbps if m.copy_gbps else float("nan")
    bound = "bandwidth" if flops / row < ridge else "compute"
    return (f"  per cached token, layer and query token: {row} B (bf16) read once for all heads, {flops} FLOP "
            f"= {flops / row:.3g} FLOP/B; bf16 ridge {ridge:.3g} FLOP/B: {bound}-bound here")


def format_report(report: BenchReport) -> str:
    """The tables of a run, one block per backend."""
    lines = [f"hal bench ({report.sizes.name}), hal {report.hal_version}, {report.date}"]
    for bb in report.backends:
        lines.append("")
        if not bb.available:
            lines.append(f"{bb.name}: not run: {'; '.join(bb.reasons) or 'unavailable'}")
            continue
        lines.append(f"{bb.name}:")
        lines += _machine_lines(bb, report)
        for kind in ("decode", "prefill", "mla"):
            cases = [c for c in bb.cases if c.kind == kind]
            if not cases:
                continue
            lines += ["", "  " + _TITLES[kind]]
            if kind == "mla":
                lines.append(_mla_roofline(bb))
            lines += _table(kind, cases)
        n_ok = sum(c.status == "ok" for c in bb.cases)
        n_skip = sum(c.status == "skip" for c in bb.cases)
        lines.append("")
        lines.append(f"  {len(bb.cases)} case{'s' if len(bb.cases) != 1 else ''}: {n_ok} measured, {n_skip} skipped, {len(bb.errors)} errors; "
                     f"{bb.seconds:.1f}s. hal speedup and %copy: medians of the ratios within each round (measured back to back).")
    return "\n".join(lines)


def write_json(path: str | Path, report: BenchReport) -> None:
    doc: dict[str, Any] = report.to_dict()
    doc["conventions"] = {
        "copy_gbps": "buffer bytes per dst.copy_(src) per second (bytes copied; STREAM counts 2x), best of N",
        "read_gbps": "buffer bytes per reduction, best of N over fp32 sum and int32 amax",
        "matmul_tflops": "2 n^3 per square matmul, best of N",
        "decode_bytes": "KV bytes as stored (kv_dtype, scales included) of every cached token, per layer",
        "attention_flops": "2 (D + Dv) per query, head and visible key; causal prefill sees N^2/2 pairs",
        "mla": "one 576-wide latent row per cached token and layer; 2H(R+P) + 2HR FLOPs per cached token",
        "time": "median of interleaved rounds; spread = (max - min) / median",
        "speedup": "baseline median / hal median (> 1: hal is faster)",
        "baselines": BASELINES,
    }
    Path(path).write_text(json.dumps(doc, indent=1, default=str) + "\n")
