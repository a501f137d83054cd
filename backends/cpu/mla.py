"""Absorbed-form MLA (DeepSeek-V2, arXiv:2405.04434 Appendix C) on the CPU.

With W_UK absorbed into the query and W_UV applied after attention, MLA decode is multi-query
attention over the latent cache: one key per token shared by every head, the row ``[c_kv; k_pe]``
(R + P = 512 + 64 = 576 wide), whose value is its first R channels (the latent itself); H query
heads ``[q_latent; q_rope]`` of the same width. FlashMLA calls this "MQA mode"; vLLM's MLA
backends run decode the same way.

So this file is a thin launcher of the tiled online-softmax kernel in ``attention.py`` with one KV
head: each chunk of a sequence's cache is fetched (and decoded, whatever the ``kv_dtype``) once
per query tile and scored against all H heads of all the tile's queries in one matmul. A decode
step therefore reads every cached token once per layer, ``R + P`` values, whatever H is; never once
per head. The value is a view of the fetched row, not a second read. Scores, softmax and
accumulation are fp32; the output is the attention-weighted latent ``[T, H, R]`` in q's dtype.
A decode step (every sequence on the native decode kernel, ``kernels/paged_decode.c``) hands it
q_latent and q_rope as they are, and the kernel joins each head's two parts; other batches join them
with ``torch.cat`` first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hal.backend import AttentionParams
from hal.plan import Plan

from .attention import paged_attention
from .kernels import paged_decode as native_decode
from .kv_cache import CpuKVStorage


def mla_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: CpuKVStorage, layer: int, plan: Plan,
                  scale: float, causal: bool, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q_latent [T, H, R], q_rope [T, H, P] over the latent cache -> out [T, H, R], lse [T, H] fp32."""
    p = _params(scale, causal)
    launch = native_decode.launch(cache, plan, q_latent, p, return_lse, q2=q_rope)
    if launch is not None:  # a decode step on the native kernel, which joins each head's two query parts
        return launch(q_latent, cache, layer, q_rope)
    q = torch.cat([q_latent, q_rope], dim=-1)  # [T, H, R + P]: one query row per head against [c_kv; k_pe]
    return paged_attention(q, cache, layer, plan, p, return_lse)


@functools.lru_cache(maxsize=64)
def _params(scale: float, causal: bool) -> AttentionParams:
    """The options of an MLA call, one object per (scale, causal): every layer's call asks."""
    return AttentionParams(scale=scale, causal=causal)


@contextmanager
def count_fetched_bytes(cache: CpuKVStorage) -> Iterator[dict[str, int]]:
    """Count what attention reads from ``cache`` while the block runs (for tests and ``hal bench``),
    whichever path runs: the tiled torch kernel's fetches, or the rows the native decode kernel loads.

    Yields a dict whose ``"bytes"`` is the stored bytes of every token fetched (row bytes, scales
    included, per fetched token), ``"tokens"`` the number of token rows fetched and ``"calls"`` the
    number of fetches. Whole blocks are gathered before slicing, so the copy in memory may be up to
    ``block_size - 1`` tokens longer per call than what is counted here.
    """
    counts = {"bytes": 0, "tokens": 0, "calls": 0}
    fetch = cache.fetch
    row_bytes = sum(r.shape[-1] * r.shape[-2] * r.element_size() for r in cache.rows)  # per token, all heads

    def counting_fetch(layer: int, block_ids: torch.Tensor, start: int, stop: int,
                       dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        counts["calls"] += 1
        counts["tokens"] += stop - start
        counts["bytes"] += (stop - start) * row_bytes
        return fetch(layer, block_ids, start, stop, dtype)

    cache.fetch = counting_fetch  # type: ignore[method-assign]
    try:
        with native_decode.count_rows() as native:  # rows the native decode kernel loads
            yield counts
    finally:
        del cache.fetch  # back to the class's method
    counts["tokens"] += native["rows"]
    counts["bytes"] += native["rows"] * row_bytes
