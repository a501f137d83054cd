"""Bytes and FLOPs of each benchmark case: the numerators of every GB/s and TFLOP/s that hal bench
prints. Pure integer arithmetic, no torch, tested by hand-computed values.

Conventions (the same for hal and for every baseline):

- *Copy bandwidth* is bytes copied per second: one ``dst.copy_(src)`` of n bytes counts ``n``. This
  is the convention of the issue's "about 20 GB/s copy bandwidth" on this machine kind; STREAM's Copy
  counts the read and the write and prints twice this figure. *Read bandwidth* counts the n bytes a
  reduction reads: decode attention only reads, so its fraction of read bandwidth is the stricter one.
- *Decode attention bytes* are the bytes of KV the attention must read, as stored (its kv_dtype,
  scales included): ``bytes_per_token_per_layer * batch * context``. Queries and outputs
  (``batch * Hq * D`` elements) are negligible and not counted. A baseline that copies (gather +
  SDPA) is credited with the same bytes: what it moves beyond them is its cost.
- *Attention FLOPs* count two per multiply-add of the two matmuls, ``QK^T`` and ``PV``: per query,
  head and visible key ``2 (D + Dv)``. Causal prefill of N tokens sees ``N^2 / 2`` (query, key)
  pairs (FlashAttention's convention), so ``4 * N^2 / 2 * Hq * D`` when ``D == Dv``.
- *Absorbed MLA* (DeepSeek-V2) reads one latent + RoPE row (``R + P`` values) per cached token and
  layer, shared by every head, and does ``2 H (R + P)`` (scores) + ``2 H R`` (latent output)
  FLOPs per cached token and query token.
"""

from __future__ import annotations

from hal.kv_formats import row_bytes

__all__ = ["KiB", "MiB", "GiB", "copy_bytes", "read_bytes", "matmul_flops", "kv_bytes_per_token_layer",
           "decode_bytes", "decode_flops", "prefill_flops", "prefill_bytes", "mla_row_bytes", "mla_bytes",
           "mla_flops_per_token", "mla_flops", "layers_for"]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def copy_bytes(buffer_bytes: int) -> int:
    """Bytes counted for one copy of a buffer: the bytes copied (STREAM would count twice this)."""
    return buffer_bytes


def read_bytes(buffer_bytes: int) -> int:
    """Bytes moved by one reduction over a buffer: read only."""
    return buffer_bytes


def matmul_flops(n: int) -> int:
    """FLOPs of one ``[n, n] @ [n, n]`` matmul."""
    return 2 * n ** 3


def kv_bytes_per_token_layer(num_kv_heads: int, head_dim: int, v_head_dim: int, kv_dtype: str,
                             itemsize: int) -> int:
    """Bytes stored per token and layer of a standard K/V cache, scales included
    (``KVCacheSpec.bytes_per_token / num_layers``)."""
    return num_kv_heads * (row_bytes(kv_dtype, head_dim, itemsize) + row_bytes(kv_dtype, v_head_dim, itemsize))


def decode_bytes(bytes_per_token_layer: int, batch: int, context: int) -> int:
    """KV bytes one decode step reads in one layer: every cached token of every sequence, once."""
    return bytes_per_token_layer * batch * context


def decode_flops(batch: int, context: int, hq: int, head_dim: int, v_head_dim: int) -> int:
    """FLOPs of one decode step (one query token per sequence) in one layer."""
    return 2 * batch * hq * context * (head_dim + v_head_dim)


def prefill_flops(n: int, hq: int, head_dim: int, v_head_dim: int) -> int:
    """FLOPs of causal attention over one sequence of n tokens (``n^2 / 2`` query-key pairs)."""
    return hq * (head_dim + v_head_dim) * n * n  # = 2 (D + Dv) Hq n^2 / 2


def prefill_bytes(n: int, hq: int, hkv: int, head_dim: int, v_head_dim: int, itemsize: int) -> int:
    """The least memory traffic of causal prefill: read q, k, v once and write the output once."""
    return itemsize * n * (hq * head_dim + hkv * (head_dim + v_head_dim) + hq * v_head_dim)


def mla_row_bytes(kv_lora_rank: int, rope_dim: int, kv_dtype: str, itemsize: int) -> int:
    """Bytes stored per token and layer of an MLA latent cache: one ``R + P`` row."""
    return row_bytes(kv_dtype, kv_lora_rank + rope_dim, itemsize)


def mla_bytes(row: int, batch: int, context: int) -> int:
    """Latent bytes one absorbed-MLA decode step reads in one layer (once for all heads)."""
    return row * batch * context


def mla_flops_per_token(heads: int, kv_lora_rank: int, rope_dim: int) -> int:
    """FLOPs per cached token and query token of absorbed MLA: scores over R + P, output over R."""
    return 2 * heads * (kv_lora_rank + rope_dim) + 2 * heads * kv_lora_rank


def mla_flops(batch: int, context: int, heads: int, kv_lora_rank: int, rope_dim: int) -> int:
    """FLOPs of one absorbed-MLA decode step (one query token per sequence) in one layer."""
    return batch * context * mla_flops_per_token(heads, kv_lora_rank, rope_dim)


def layers_for(target_bytes: int, bytes_per_layer: int, max_layers: int = 2048) -> int:
    """How many layers to cycle so that one measurement reads at least ``target_bytes``
    (at least 1, at most ``max_layers``)."""
    if bytes_per_layer <= 0:
        return 1
    return max(1, min(max_layers, -(-target_bytes // bytes_per_layer)))
