"""Batch metadata, built once per step on the host.

``hal.plan`` validates the paged metadata (the data-dependent checks: monotone ``cu_seqlens_q``,
``q_len <= seq_len``, block ids in range, ``seq_lens`` covered by the block table) on host-side
copies, moves it to the cache's device and lets the backend precompute what it needs. The plan is
then reused by every layer's ``paged_attention`` call, which checks only shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from hal import validate as V
from hal.arrays import to_torch
from hal.errors import InvalidInput

__all__ = ["Plan", "VarlenBatch", "plan"]


@dataclass(frozen=True, eq=False)
class VarlenBatch:
    """Sequence boundaries of a dense (varlen) attention call."""

    cu_seqlens_q: torch.Tensor  # [B+1] int32 on the backend's device
    cu_seqlens_k: torch.Tensor  # [B+1] int32 on the backend's device
    cu_seqlens_q_host: tuple[int, ...]  # the same, as host ints
    cu_seqlens_k_host: tuple[int, ...]
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens_q_host) - 1


@dataclass(frozen=True, eq=False)
class Plan:
    """Paged-attention metadata for one step, validated against a cache's geometry."""

    cu_seqlens_q: torch.Tensor  # [B+1] int32, on the cache's device
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]
    block_table_host: torch.Tensor  # [B, max_blocks] int32 on the CPU
    num_tokens: int  # T = cu_seqlens_q[-1]
    max_q_len: int
    max_seq_len: int
    block_size: int
    num_blocks: int
    backend_name: str
    backend_data: Any = None  # what the backend's plan() returned

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    def q_lens(self) -> list[int]:
        c = self.cu_seqlens_q_host
        return [c[i + 1] - c[i] for i in range(len(c) - 1)]


def plan(cu_seqlens_q: Any, seq_lens: Any, block_table: Any, cache: Any) -> Plan:
    """Validate one step's paged metadata and prepare it for ``cache``'s backend.

    ``cu_seqlens_q`` int32 ``[B+1]`` (prefix sums of query lengths), ``seq_lens`` int32 ``[B]`` (KV
    length of each sequence including this step's tokens), ``block_table`` int32 ``[B, max_blocks]``.
    The queries of sequence b are its last ``q_len_b`` tokens. Unused block-table entries are ignored.
    """
    from hal.kv_cache import KVCache

    op = "hal.plan"
    if not isinstance(cache, KVCache):
        raise InvalidInput(f"[{op}] cache must be a hal.KVCache, got {type(cache).__name__}")
    cu = to_torch(op, "cu_seqlens_q", cu_seqlens_q)
    sl = to_torch(op, "seq_lens", seq_lens)
    bt = to_torch(op, "block_table", block_table)
    V.check_index(op, "cu_seqlens_q", cu, torch.int32, 1, "[B+1]")
    V.check_index(op, "seq_lens", sl, torch.int32, 1, "[B]")
    V.check_index(op, "block_table", bt, torch.int32, 2, "[B, max_blocks]")
    B = sl.shape[0]
    if cu.shape[0] != B + 1:
        raise InvalidInput(f"[{op}] cu_seqlens_q has {cu.shape[0]} entries but seq_lens has {B}: expected B+1={B + 1}")
    if bt.shape[0] != B:
        raise InvalidInput(f"[{op}] block_table has {bt.shape[0]} rows but seq_lens has {B} sequences")
    cu_h = V.host_ints(cu)
    sl_h = V.host_ints(sl)
    V.check_cu_seqlens(op, "cu_seqlens_q", cu_h, None, "")
    bs, nb = cache.block_size, cache.num_blocks
    bt_h = bt.detach().cpu()
    for b in range(B):
        q_len, s = cu_h[b + 1] - cu_h[b], sl_h[b]
        if s < 0:
            raise InvalidInput(f"[{op}] seq_lens[{b}]={s} must be >= 0")
        if q_len > s:
            raise InvalidInput(f"[{op}] sequence {b} has {q_len} query tokens but seq_lens[{b}]={s}: the "
                               f"queries are the last tokens of the sequence, so q_len <= seq_len")
        need = -(-s // bs)
        if need > bt.shape[1]:
            raise InvalidInput(f"[{op}] block_table has {bt.shape[1]} columns but seq_lens[{b}]={s} needs "
                               f"{need} blocks of {bs}")
        row = bt_h[b, :need]
        bad = (row < 0) | (row >= nb)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise InvalidInput(f"[{op}] block_table[{b}, {j}]={int(row[j])} is out of range: the cache has "
                               f"blocks 0..{nb - 1}")
    dev = cache.device
    p = Plan(
        cu_seqlens_q=cu.to(dev), seq_lens=sl.to(dev), block_table=bt.to(dev),
        cu_seqlens_q_host=tuple(cu_h), seq_lens_host=tuple(sl_h), block_table_host=bt_h,
        num_tokens=cu_h[-1], max_q_len=max((cu_h[i + 1] - cu_h[i] for i in range(B)), default=0),
        max_seq_len=max(sl_h, default=0), block_size=bs, num_blocks=nb, backend_name=cache.backend.name,
    )
    return replace(p, backend_data=cache.backend.plan(p))


def varlen_batch(op: str, cu_q: Any, cu_k: Any, T: int, S: int, device: torch.device) -> VarlenBatch:
    """Check the dense API's cu_seqlens (both or neither) and read them on the host."""
    if (cu_q is None) != (cu_k is None):
        raise InvalidInput(f"[{op}] give both cu_seqlens_q and cu_seqlens_k (varlen) or neither (one sequence)")
    if cu_q is None:
        cq, ck = [0, T], [0, S]
    else:
        tq = to_torch(op, "cu_seqlens_q", cu_q)
        tk = to_torch(op, "cu_seqlens_k", cu_k)
        V.check_index(op, "cu_seqlens_q", tq, torch.int32, 1, "[B+1]")
        V.check_index(op, "cu_seqlens_k", tk, torch.int32, 1, "[B+1]")
        if tq.shape[0] != tk.shape[0]:
            raise InvalidInput(f"[{op}] cu_seqlens_q has {tq.shape[0]} entries but cu_seqlens_k has "
                               f"{tk.shape[0]}: both are [B+1]")
        cq, ck = V.host_ints(tq), V.host_ints(tk)
        V.check_cu_seqlens(op, "cu_seqlens_q", cq, T, "q.shape[0]")
        V.check_cu_seqlens(op, "cu_seqlens_k", ck, S, "k.shape[0]")
    B = len(cq) - 1
    return VarlenBatch(
        cu_seqlens_q=torch.tensor(cq, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(ck, dtype=torch.int32, device=device),
        cu_seqlens_q_host=tuple(cq), cu_seqlens_k_host=tuple(ck),
        max_seqlen_q=max((cq[i + 1] - cq[i] for i in range(B)), default=0),
        max_seqlen_k=max((ck[i + 1] - ck[i] for i in range(B)), default=0),
    )
