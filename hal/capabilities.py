"""What a backend declares it can do, as data.

One frozen record per backend. ``why_not`` turns a request into the list of reasons it is not
covered (empty = covered); hal raises :class:`hal.Unsupported` with those reasons before any kernel
runs, and the conformance suite skips undeclared cases with the same reasons.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, asdict
from typing import Any

__all__ = ["Capabilities", "FEATURES"]

#: every feature name a backend may declare, with what it covers
FEATURES: dict[str, str] = {
    "dense": "hal.attention on contiguous (varlen) q, k, v",
    "paged": "hal.paged_attention on a KVCache through a block table",
    "causal": "causal=True (bottom-right aligned)",
    "non_causal": "causal=False",
    "window": "window_left (sliding window)",
    "softcap": "logit soft-capping",
    "alibi": "ALiBi slopes",
    "sinks": "attention-sink logits",
    "lse": "return_lse=True",
    "gqa": "Hq a multiple of Hkv greater than 1 (GQA and MQA)",
    "merge": "hal.merge_attention_states",
    "copy_blocks": "KVCache.copy_blocks (fork support)",
    "batch_invariant": "a sequence's output is bitwise independent of the rest of the batch",
    "mla": "hal.mla_attention on an MLA latent cache",
}


def _fmt(values: Iterable[Any]) -> str:
    vals = list(values)
    key = (lambda v: v) if all(isinstance(v, int) for v in vals) else str
    return ", ".join(str(v) for v in sorted(vals, key=key))


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares. Anything outside it raises ``hal.Unsupported``."""

    dtypes: frozenset[str]  # model dtypes of q/k/v/out: "fp32", "fp16", "bf16"
    kv_dtypes: frozenset[str]  # KV-cache formats: "auto", "fp8_e4m3", ...
    head_dims: frozenset[int]  # head dims of q/k (and of v)
    block_sizes: frozenset[int]  # KV-cache block sizes (tokens per block)
    features: frozenset[str]  # names from FEATURES
    memory: frozenset[str]  # KV-cache memory kinds: "device", "unified"
    emulated: bool = False  # kernels run on an interpreter/emulator, not the hardware they target
    kv_layout: str = "token-major"  # how a block arranges tokens and heads: "token-major" | "head-major"
    notes: tuple[str, ...] = field(default=())  # free-form remarks shown by `hal info`

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature names {sorted(unknown)}; known: {sorted(FEATURES)}")

    def why_not(
        self,
        *,
        dtype: str | None = None,
        kv_dtype: str | None = None,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        block_size: int | None = None,
        features: Iterable[str] = (),
        memory: str | None = None,
    ) -> list[str]:
        """Reasons the request is not declared; an empty list means it is."""
        reasons = []
        if dtype is not None and dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} is not declared (declared: {_fmt(self.dtypes)})")
        if kv_dtype is not None and kv_dtype not in self.kv_dtypes:
            reasons.append(f"kv_dtype {kv_dtype} is not declared (declared: {_fmt(self.kv_dtypes)})")
        for name, d in (("head_dim", head_dim), ("v_head_dim", v_head_dim)):
            if d is not None and d not in self.head_dims:
                reasons.append(f"{name} {d} is not declared (declared: {_fmt(self.head_dims)})")
        if block_size is not None and block_size not in self.block_sizes:
            reasons.append(f"block_size {block_size} is not declared (declared: {_fmt(self.block_sizes)})")
        for f in features:
            if f not in FEATURES:
                raise ValueError(f"unknown feature {f!r}; known: {sorted(FEATURES)}")
            if f not in self.features:
                reasons.append(f"feature {f!r} ({FEATURES[f]}) is not declared")
        if memory is not None and memory not in self.memory:
            reasons.append(f"memory {memory!r} is not declared (declared: {_fmt(self.memory)})")
        return reasons

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, (frozenset, set, tuple)):
                d[k] = sorted(v, key=str) if not isinstance(v, tuple) else list(v)
        return d
