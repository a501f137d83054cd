"""KV-cache capacity: bytes per token, and the tokens and sequences that fit beside the weights.

``capacity("deepseek-v2", bits=6, weight_dtype="fp8", memory="80GB", num_gpus=8, tp=8, context=1024,
vs="llama-3-70b")`` models, from the presets alone, what each GPU holds:

- weights: ``num_params * bytes_per_param / tp`` per GPU (split evenly over the TP ranks; the few
  layers an engine replicates, such as embeddings, are ignored);
- KV cache: under tensor parallelism the KV heads are split over the ranks, but a rank always holds
  at least one head, so with more ranks than KV heads each head is stored ``tp / Hkv`` times. An MLA
  latent is one KV head: every rank stores every token's full latent row (``tp`` copies; the vLLM
  context-parallel docs: "-tp 8 causes 8x KV cache duplication"). The report also gives the
  sequences if that replication were removed (decode context parallelism or DP-attention shard the
  latent along tokens or requests);
- ``tokens per replica group = (memory * (1 - reserve) - weights per GPU) / KV bytes per token per
  GPU``; ``sequences = floor(tokens per group / context) * (num_gpus / tp)``.

Activations, CUDA graphs, workspace and fragmentation are not modelled beyond ``reserve``
(facts §3.3 reproduces "DeepSeek-V2 batches about 16K sequences where Llama-3-70B batches about
1.5K" only under these ideal assumptions, with 1K-token sequences and the latent not replicated).

``bits`` is the DeepSeek-V2 paper's idealised measure (elements x bits / 8, no scales); ``kv_dtype``
is hal's own byte layout (``hal.kv_formats.row_bytes``, scales included).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any

from hal.dtypes import normalize_kv_dtype
from hal.errors import InvalidInput
from hal.models import ModelPreset, preset, split_kv_dtype

__all__ = ["capacity", "CapacityReport", "format_report", "parse_memory", "WEIGHT_BYTES"]

_OP = "hal.capacity"

#: bytes per parameter of each weight precision
WEIGHT_BYTES: dict[str, Fraction] = {"fp32": Fraction(4), "bf16": Fraction(2), "fp16": Fraction(2),
                                     "fp8": Fraction(1), "int8": Fraction(1), "int4": Fraction(1, 2)}

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: str | int) -> int:
    """Bytes of ``"80GiB"`` (2^30), ``"80GB"`` (1e9), ``"1.5TB"``, ``"640 GB"``, or an int of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)\s*", value, re.IGNORECASE)
        if m:
            n = int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])
            if n > 0:
                return n
    raise InvalidInput(f"[{_OP}] memory (--memory) must be a positive size with a unit, such as 80GiB "
                       f"(2^30 bytes), 80GB (1e9 bytes) or 1.5TB; got {value!r}")


@dataclass(frozen=True)
class CapacityReport:
    """What one model fits. Byte counts are exact (``Fraction`` where ``bits`` makes them fractional,
    shown as int when whole); ``sequences*`` are floors. ``baseline`` is the ``vs`` model's report
    under the same hardware, parallelism, context and reserve."""

    model: str
    kv_format: str                      # "bf16", "int6", "6 bits/element (paper, no scales)", ...
    kv_bytes_per_token: int | Fraction  # all layers, K+V (MLA: latent+RoPE row)
    kv_elements_per_token: int
    memory_per_gpu: int                 # bytes
    num_gpus: int
    tp: int
    context: int
    reserve: float
    weight_dtype: str
    num_params: int
    weight_bytes: int | Fraction        # all parameters
    kv_copies: int                      # how many TP ranks store each KV byte (1 = no replication)
    kv_bytes_per_token_per_gpu: int | Fraction
    weight_bytes_per_gpu: int | Fraction
    free_bytes_per_gpu: int | Fraction  # after reserve and weights (negative: weights do not fit)
    tokens_per_group: int
    num_groups: int
    sequences: int
    sequences_without_replication: int  # the same, each KV byte stored once (DCP / DP-attention)
    assumptions: tuple[str, ...] = ()
    baseline: CapacityReport | None = field(default=None, compare=False)

    @property
    def tokens(self) -> int:
        """KV tokens that fit over all replica groups."""
        return self.tokens_per_group * self.num_groups

    @property
    def kv_reduction(self) -> float | None:
        """``1 - kv_bytes_per_token / baseline.kv_bytes_per_token`` (None without a baseline)."""
        if self.baseline is None:
            return None
        return float(1 - Fraction(self.kv_bytes_per_token) / Fraction(self.baseline.kv_bytes_per_token))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (fractional bytes become floats)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Fraction):
                v = float(v)
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, CapacityReport):
                v = v.to_dict()
            d[f.name] = v
        d["tokens"] = self.tokens
        d["kv_reduction"] = self.kv_reduction
        return d


def _whole(x: Fraction) -> int | Fraction:
    return int(x) if x.denominator == 1 else x


def _kv_bytes(p: ModelPreset, kv_dtype: str | None, bits: float | None, dtype: str) -> tuple[Fraction, str]:
    if bits is not None:
        if kv_dtype is not None:
            raise InvalidInput(f"[{_OP}] give kv_dtype (--kv-dtype) or bits (--bits), not both")
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 32:
            raise InvalidInput(f"[{_OP}] bits (--bits) must be a number of bits per element in (0, 32], "
                               f"got {bits!r}")
        return Fraction(p.kv_elements_per_token) * Fraction(bits) / 8, \
            f"{bits:g} bits/element (paper's measure, no scales)"
    kv, dt = split_kv_dtype(kv_dtype if kv_dtype is not None else "auto", dtype)
    kv = normalize_kv_dtype(_OP, kv)
    spec = p.kv_cache_spec(dtype=dt, kv_dtype=kv)
    return Fraction(spec.bytes_per_token), (dt if kv == "auto" else f"{kv} (hal layout, scales included)")


def _kv_copies(p: ModelPreset, tp: int) -> int:
    """How many TP ranks store each KV byte: MLA's one latent head is on every rank; GQA/MHA heads
    are split, one head per rank at least."""
    if p.num_attention_heads % tp:
        raise InvalidInput(f"[{_OP}] tp={tp} must divide {p.name}'s {p.num_attention_heads} attention heads")
    if p.is_mla:
        return tp
    hkv = p.num_key_value_heads
    if hkv % tp and tp % hkv:
        raise InvalidInput(f"[{_OP}] tp={tp} must divide {p.name}'s {hkv} KV heads or be a multiple of them")
    return max(1, tp // hkv)


def _one(model: str | ModelPreset, kv_dtype: str | None, bits: float | None, weight_dtype: str, dtype: str,
         memory: int, num_gpus: int, tp: int, context: int, reserve: float) -> CapacityReport:
    p = preset(model)
    kv_total, kv_format = _kv_bytes(p, kv_dtype, bits, dtype)
    copies = _kv_copies(p, tp)
    kv_gpu = kv_total * copies / tp
    weights = p.num_params * WEIGHT_BYTES[weight_dtype]
    weights_gpu = weights / tp
    free = Fraction(memory) * (1 - Fraction(str(reserve))) - weights_gpu
    tokens = max(0, math.floor(free / kv_gpu))
    groups = num_gpus // tp
    tokens_unrep = max(0, math.floor(free / (kv_total / tp)))
    return CapacityReport(
        model=p.name, kv_format=kv_format, kv_bytes_per_token=_whole(kv_total),
        kv_elements_per_token=p.kv_elements_per_token, memory_per_gpu=memory, num_gpus=num_gpus, tp=tp,
        context=context, reserve=reserve, weight_dtype=weight_dtype, num_params=p.num_params,
        weight_bytes=_whole(weights),
        kv_copies=copies, kv_bytes_per_token_per_gpu=_whole(kv_gpu), weight_bytes_per_gpu=_whole(weights_gpu),
        free_bytes_per_gpu=_whole(free), tokens_per_group=tokens, num_groups=groups,
        sequences=tokens // context * groups, sequences_without_replication=tokens_unrep // context * groups)


def capacity(model: str | ModelPreset, *, kv_dtype: str | None = None, bits: float | None = None,
             memory: str | int = "80GiB", num_gpus: int = 1, tp: int = 1, context: int = 4096,
             weight_dtype: str = "bf16", reserve: float = 0.0, dtype: str = "bf16",
             vs: str | ModelPreset | None = None, vs_kv_dtype: str | None = None, vs_bits: float | None = None,
             vs_weight_dtype: str = "bf16") -> CapacityReport:
    """Bytes per token, and the KV tokens and sequences of ``context`` tokens that fit on ``num_gpus``
    GPUs of ``memory`` each, in replica groups of ``tp`` tensor-parallel ranks, after the weights.

    ``kv_dtype``: a hal KV format (default "auto": the model dtype ``dtype``; "bf16"/"fp16"/"fp32"
    and "fp8" are accepted) or ``bits``: the paper's idealised bits per element. ``weight_dtype``:
    one of :data:`WEIGHT_BYTES`. ``reserve``: the fraction of each GPU's memory held back for
    activations and workspace. ``vs``: a second preset, reported as ``baseline`` with its own
    ``vs_kv_dtype``/``vs_bits``/``vs_weight_dtype`` (default: bf16 KV and weights), for the KV
    reduction ``1 - bytes / baseline bytes``.
    """
    memory_b = parse_memory(memory)
    for name, v in (("num_gpus", num_gpus), ("tp", tp), ("context", context)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidInput(f"[{_OP}] {name} must be an int >= 1, got {v!r}")
    if num_gpus % tp:
        raise InvalidInput(f"[{_OP}] num_gpus={num_gpus} must be a multiple of tp={tp} (whole replica groups)")
    if isinstance(reserve, bool) or not isinstance(reserve, (int, float)) or not 0 <= reserve < 1:
        raise InvalidInput(f"[{_OP}] reserve must be a fraction in [0, 1), got {reserve!r}")
    for name, w in (("weight_dtype", weight_dtype), ("vs_weight_dtype", vs_weight_dtype)):
        if w not in WEIGHT_BYTES:
            raise InvalidInput(f"[{_OP}] {name} must be one of {list(WEIGHT_BYTES)}, got {w!r}")
    hw = (memory_b, num_gpus, tp, context, reserve)
    base = None if vs is None else _one(vs, vs_kv_dtype, vs_bits, vs_weight_dtype, dtype, *hw)
    rep = _one(model, kv_dtype, bits, weight_dtype, dtype, *hw)
    return replace(rep, assumptions=_assumptions(rep, base, memory), baseline=base)


def _gb(x: int | Fraction) -> str:
    return f"{float(x) / 1e9:,.1f} GB"


def _n(x: int | Fraction) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{float(x):,.1f}"


def _assumptions(r: CapacityReport, base: CapacityReport | None, memory: str | int) -> tuple[str, ...]:
    mem = memory if isinstance(memory, str) else f"{memory} B"
    out = [f"hardware: {r.num_gpus} x {mem.strip()} ({r.memory_per_gpu:,} B per GPU), "
           f"{r.reserve:.0%} reserved for activations/workspace; fragmentation not modelled",
           f"parallelism: TP{r.tp}, {r.num_groups} replica group{'s' if r.num_groups > 1 else ''}; weights "
           f"split evenly over the TP ranks (replicated embeddings ignored); a sequence lives in one group",
           f"context: {r.context:,} tokens per sequence"]
    for x in (r, base):
        if x is not None:
            out.append(f"{x.model}: weights {x.weight_dtype} ({WEIGHT_BYTES[x.weight_dtype]} B/param x "
                       f"{x.num_params / 1e9:.1f}B params = {_gb(x.weight_bytes)}); KV {x.kv_format}")
    return tuple(out)


def format_report(r: CapacityReport) -> str:
    """A short table: the assumptions first, then one column per model, then the comparison."""
    cols = [r] if r.baseline is None else [r, r.baseline]
    lines = ["assumptions:"] + [f"  {a}" for a in r.assumptions] + [""]
    rows: list[tuple[str, list[str]]] = [
        ("", [c.model for c in cols]),
        ("KV bytes per token", [_n(c.kv_bytes_per_token) for c in cols]),
        ("KV copies over the TP ranks", [f"{c.kv_copies}" for c in cols]),
        ("KV bytes per token per GPU", [_n(c.kv_bytes_per_token_per_gpu) for c in cols]),
        ("weights per GPU", [_gb(c.weight_bytes_per_gpu) for c in cols]),
        ("KV tokens per replica group", [f"{c.tokens_per_group:,}" for c in cols]),
        (f"sequences of {r.context:,} tokens", [f"{c.sequences:,}" for c in cols]),
    ]
    replicated = any(c.kv_copies > 1 for c in cols)
    if replicated:
        rows.append(("  if no KV were replicated", [f"{c.sequences_without_replication:,}" for c in cols]))
    w0 = max(len(k) for k, _ in rows)
    w = [max(len(v[i]) for _, v in rows) for i in range(len(cols))]
    for k, vals in rows:
        lines.append(f"{k:<{w0}}  " + "  ".join(f"{v:>{w[i]}}" for i, v in enumerate(vals)))
    if replicated:
        lines += [f"(TP{r.tp} splits GQA/MHA KV heads over the ranks, at least one head each; an MLA latent is",
                  " one KV head, so every rank stores it. Decode context parallelism or DP-attention store",
                  " each KV byte once.)"]
    for c in cols:
        if c.free_bytes_per_gpu <= 0:
            usable = c.memory_per_gpu * (1 - Fraction(str(c.reserve)))
            lines.append(f"note: {c.model}'s weights need {_gb(c.weight_bytes_per_gpu)} per GPU, more than the "
                         f"{_gb(usable)} available: raise --tp or lower --weights")
    if r.baseline is not None:
        b = r.baseline
        lines += ["", f"KV reduction {r.model} vs {b.model}: {r.kv_reduction:.1%} "
                      f"(1 - {_n(r.kv_bytes_per_token)} / {_n(b.kv_bytes_per_token)} = {r.kv_reduction:.6f})"]
        if b.sequences:
            line = f"sequences {r.model} / {b.model}: {r.sequences / b.sequences:.1f}x"
            if replicated and b.sequences_without_replication:
                ratio = r.sequences_without_replication / b.sequences_without_replication
                line += f" as TP{r.tp} stores the KV; {ratio:.1f}x if no KV were replicated"
            lines.append(line)
    return "\n".join(lines)
