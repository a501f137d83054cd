"""Bad input, one table for every public op (SPEC section 4).

Each row makes one bad call against fresh state: a cpu-backend KV cache (2 layers, 2 KV heads,
head dim 64, blocks of 16, 8 blocks, fp32) filled with known values, a ``hal.BlockManager`` holding
three sequences, and a valid plan over them. The row states the exception class and a pattern that
the message must contain, naming the argument. After the failing call the cache must read back
bitwise as before (every layer, every block) and the block manager must behave exactly like a
freshly built twin (free count, block tables, and the slots/copies/OutOfBlocks of later calls):
a failed call changes nothing.

``python tests/test_validation.py`` prints the table as Markdown (for the README);
``bad_input_table()`` returns its rows as (description, exception class name, first message line).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import hal
from hal.backends.cpu import CpuBackend

L, HKV, HQ, D, BS, NB = 2, 2, 4, 64, 16, 8  # layers, KV heads, query heads, head dim, block size, blocks
DT = torch.float32
SEQS = ("a", "b", "c")  # a: 20 tokens (blocks 0, 1); b: 5 tokens (block 2); c: fork of a (0 shared, 3)


# --------------------------------------------------------------------------- fresh state per row

def make_manager() -> hal.BlockManager:
    """The block manager every row starts from (public API only), 4 of 8 blocks free."""
    bm = hal.BlockManager(NB, BS)
    bm.allocate("a", 20)
    bm.allocate("b", 5)
    assert bm.fork("a", "c") == [(1, 3)]
    return bm


@dataclasses.dataclass
class State:
    cache: hal.KVCache
    bm: hal.BlockManager
    plan: hal.Plan
    q: torch.Tensor  # [3, HQ, D]: one decode token per sequence, valid for `plan`
    dense: dict[str, torch.Tensor]  # valid q, k, v, cu_seqlens_q, cu_seqlens_k for hal.attention


def _spec(**kw: Any) -> hal.KVCacheSpec:
    return hal.KVCacheSpec(L, HKV, D, **{"block_size": BS, "dtype": "fp32", **kw})


def make_state() -> State:
    g = torch.Generator().manual_seed(1234)
    cache = hal.KVCache(_spec(), NB, backend="cpu")
    for layer in range(L):  # every slot of every layer holds a known value
        k = torch.randn(NB * BS, HKV, D, generator=g)
        v = torch.randn(NB * BS, HKV, D, generator=g)
        cache.write(layer, k, v, torch.arange(NB * BS, dtype=torch.int64))
    bm = make_manager()
    plan = hal.plan(torch.tensor([0, 1, 2, 3], dtype=torch.int32), torch.tensor([20, 5, 20], dtype=torch.int32),
                    bm.block_table(SEQS), cache)
    dense = {
        "q": torch.randn(6, HQ, D, generator=g), "k": torch.randn(6, HKV, D, generator=g),
        "v": torch.randn(6, HKV, D, generator=g),
        "cu_seqlens_q": torch.tensor([0, 2, 6], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 2, 6], dtype=torch.int32),
    }
    return State(cache, bm, plan, torch.randn(3, HQ, D, generator=g), dense)


def cache_snapshot(cache: hal.KVCache) -> list[torch.Tensor]:
    """Every block of every layer, K and V, as canonical token-major copies."""
    out = []
    for layer in range(cache.num_layers):
        out += [t.clone() for t in cache.read(layer, list(range(cache.num_blocks)))]
    return out


def assert_same_bits(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    assert len(before) == len(after)
    for i, (a, b) in enumerate(zip(before, after)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), \
            f"cache tensor {i} (layer {i // 2}, {'kv'[i % 2]}) changed after a failed call"


def manager_behaviour(bm: hal.BlockManager) -> list[Any]:
    """What bm shows through its public API, then what a series of calls returns (destructive)."""
    obs: list[Any] = [bm.num_free_blocks, bm.block_table(SEQS).tolist()]
    obs.append(bm.append("b", 12).tolist())          # fills b's partial block, then one new block
    obs.append(bm.allocate("p", BS + 1).tolist())
    obs.append(bm.fork("p", "p2"))
    obs.append(bm.num_free_blocks)
    try:
        bm.allocate("q", (bm.num_free_blocks + 1) * BS)
        obs.append("allocated")
    except hal.OutOfBlocks:
        obs.append("OutOfBlocks")
    for seq in ("p2", "p", "c", "b", "a"):
        bm.free(seq)
        obs.append(bm.num_free_blocks)
    obs.append(bm.allocate("all", NB * BS).tolist())  # every block is back
    return obs


# --------------------------------------------------------------------------- helpers for the rows

def _i32(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


def _i64(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


def _attn(s: State, **kw: Any) -> Any:
    """hal.attention on the valid dense inputs with ``kw`` replacing some of them."""
    args = {**s.dense, "causal": True, "backend": "cpu", **kw}
    return hal.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def _rows(n: int, d: int = D, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.ones(n, HKV, d, dtype=dtype)


def _write(s: State, layer: Any = 0, k: Any = None, v: Any = None, slots: Any = None) -> None:
    s.cache.write(layer, _rows(3) if k is None else k, _rows(3) if v is None else v,
                  _i64(7, 8, 9) if slots is None else slots)


def _plan(s: State, cu: Any = None, seq_lens: Any = None, table: Any = None, cache: Any = None) -> hal.Plan:
    return hal.plan(_i32(0, 1, 2, 3) if cu is None else cu, _i32(20, 5, 20) if seq_lens is None else seq_lens,
                    s.bm.block_table(SEQS) if table is None else table, s.cache if cache is None else cache)


def _paged(s: State, q: Any = None, layer: Any = 0, plan: Any = None, cache: Any = None) -> Any:
    return hal.paged_attention(s.q if q is None else q, s.cache if cache is None else cache, layer,
                               s.plan if plan is None else plan)


def _merge(o_b: Any = None, lse_a: Any = None, lse_b: Any = None) -> Any:
    o = torch.zeros(3, HQ, D)
    lse = torch.zeros(3, HQ)
    return hal.merge_attention_states(o, lse if lse_a is None else lse_a, o if o_b is None else o_b,
                                      lse if lse_b is None else lse_b, backend="cpu")


class _CpuWithMLA(CpuBackend):
    """The cpu backend also declaring 'mla', only so that an MLA cache can exist to be misused."""

    def capabilities(self) -> hal.Capabilities:
        caps = super().capabilities()
        return dataclasses.replace(caps, features=caps.features | {"mla"})


class _CpuAutoOnly(CpuBackend):
    """The cpu backend declaring only the "auto" KV format, so that a format can be undeclared."""

    def capabilities(self) -> hal.Capabilities:
        return dataclasses.replace(super().capabilities(), kv_dtypes=frozenset({"auto"}))


class _CpuWithoutMLA(CpuBackend):
    """The cpu backend without 'mla', so that an MLA cache can be undeclared."""

    def capabilities(self) -> hal.Capabilities:
        caps = super().capabilities()
        return dataclasses.replace(caps, features=caps.features - {"mla"})


def _mla_cache() -> hal.KVCache:
    spec = hal.MLACacheSpec(L, kv_lora_rank=64, rope_dim=32, block_size=BS, dtype="fp32")
    return hal.KVCache(spec, NB, backend=_CpuWithMLA())


def _other_geometry_plan(s: State) -> hal.Plan:
    other = hal.KVCache(_spec(), 4, backend="cpu")  # 4 blocks instead of 8; s.bm's ids all fit
    return _plan(s, cache=other)


# --------------------------------------------------------------------------- the table

class Row(NamedTuple):
    id: str
    description: str  # the bad input, in words
    call: Callable[[State], Any]  # makes the bad call against fresh state
    exc: type[Exception]  # the exact class expected
    match: str  # regex the message must contain; it names the argument
    op: str  # the op the message's "[...]" prefix names


IV, UN, OOB = hal.InvalidInput, hal.Unsupported, hal.OutOfBlocks
# a head dim the cpu backend does not declare (its list may grow; pick one it lacks)
UD = next(d for d in range(33, 4096) if d not in hal.get_backend("cpu").capabilities().head_dims)

ROWS: list[Row] = [
    # ---- hal.attention (dense, varlen) ----
    Row("attn-q-ndim", "q is 2-D [T, Hq*D]", lambda s: _attn(s, q=torch.zeros(6, HQ * D)),
        IV, r"q must be 3-D \[T, Hq, D\].*got shape \[6, 256\]", "hal.attention"),
    Row("attn-k-dtype", "k is fp16, q is fp32", lambda s: _attn(s, k=s.dense["k"].half()),
        IV, r"k is float16 but q is float32", "hal.attention"),
    Row("attn-q-int", "q is int32", lambda s: _attn(s, q=torch.zeros(6, HQ, D, dtype=torch.int32)),
        IV, r"q must be fp32, fp16 or bf16, got torch\.int32", "hal.attention"),
    Row("attn-head-dim", "q head_dim 64, k head_dim 32",
        lambda s: _attn(s, k=torch.zeros(6, HKV, 32), v=torch.zeros(6, HKV, 32)),
        IV, r"q has head_dim 64 but k has 32", "hal.attention"),
    Row("attn-kv-tokens", "k has 6 tokens, v has 5", lambda s: _attn(s, v=torch.zeros(5, HKV, D)),
        IV, r"k \[6, 2, 64\] and v \[5, 2, 64\] must agree on tokens", "hal.attention"),
    Row("attn-gqa-ratio", "Hq=3 is not a multiple of Hkv=2", lambda s: _attn(s, q=torch.zeros(6, 3, D)),
        IV, r"q has 3 heads and k has 2", "hal.attention"),
    Row("attn-cu-one", "cu_seqlens_q given without cu_seqlens_k", lambda s: _attn(s, cu_seqlens_k=None),
        IV, r"give both cu_seqlens_q and cu_seqlens_k", "hal.attention"),
    Row("attn-cu-int64", "cu_seqlens_q is int64", lambda s: _attn(s, cu_seqlens_q=_i64(0, 2, 6)),
        IV, r"cu_seqlens_q must be int32 \[B\+1\], got int64", "hal.attention"),
    Row("attn-cu-decreasing", "cu_seqlens_q = [0, 4, 2, 6] decreases",
        lambda s: _attn(s, cu_seqlens_q=_i32(0, 4, 2, 6), cu_seqlens_k=_i32(0, 2, 4, 6)),
        IV, r"cu_seqlens_q must be non-decreasing.*cu_seqlens_q\[2\]=2 < cu_seqlens_q\[1\]=4", "hal.attention"),
    Row("attn-cu-start", "cu_seqlens_q[0] = 1", lambda s: _attn(s, cu_seqlens_q=_i32(1, 2, 6)),
        IV, r"cu_seqlens_q\[0\] must be 0, got 1", "hal.attention"),
    Row("attn-cu-end", "cu_seqlens_k[-1] = 5 but k has 6 tokens", lambda s: _attn(s, cu_seqlens_k=_i32(0, 2, 5)),
        IV, r"cu_seqlens_k\[-1\]=5 must equal k\.shape\[0\]=6", "hal.attention"),
    Row("attn-window-neg", "window_left = -1", lambda s: _attn(s, window_left=-1),
        IV, r"window_left must be >= 0, got -1", "hal.attention"),
    Row("attn-window-float", "window_left = 4.0 (a float)", lambda s: _attn(s, window_left=4.0),
        IV, r"window_left must be an int, got float", "hal.attention"),
    Row("attn-window-bool-tensor", "window_left = torch.tensor(True)",
        lambda s: _attn(s, window_left=torch.tensor(True)),
        IV, r"window_left must be an int, got Tensor", "hal.attention"),
    Row("attn-softcap-zero", "softcap = 0", lambda s: _attn(s, softcap=0.0),
        IV, r"softcap must be a finite float > 0, got 0\.0", "hal.attention"),
    Row("attn-softcap-neg", "softcap = -30", lambda s: _attn(s, softcap=-30.0),
        IV, r"softcap must be a finite float > 0, got -30\.0", "hal.attention"),
    Row("attn-softcap-nan", "softcap = NaN", lambda s: _attn(s, softcap=math.nan),
        IV, r"softcap must be a finite float > 0, got nan", "hal.attention"),
    Row("attn-scale-nan", "scale = NaN", lambda s: _attn(s, scale=math.nan),
        IV, r"scale must be a finite float, got nan", "hal.attention"),
    Row("attn-scale-inf", "scale = inf", lambda s: _attn(s, scale=math.inf),
        IV, r"scale must be a finite float, got inf", "hal.attention"),
    Row("attn-alibi-len", "alibi_slopes has 3 entries for Hq=4", lambda s: _attn(s, alibi_slopes=torch.ones(3)),
        IV, r"alibi_slopes must be fp32 \[Hq\] = \[4\], got float32 \[3\]", "hal.attention"),
    Row("attn-alibi-fp16", "alibi_slopes is fp16", lambda s: _attn(s, alibi_slopes=torch.ones(HQ).half()),
        IV, r"alibi_slopes must be fp32 \[Hq\] = \[4\], got float16 \[4\]", "hal.attention"),
    Row("attn-sinks-shape", "sinks is [Hq, 1]", lambda s: _attn(s, sinks=torch.zeros(HQ, 1)),
        IV, r"sinks must be fp32 \[Hq\] = \[4\], got float32 \[4, 1\]", "hal.attention"),
    Row("attn-causal-int", "causal = 1 (not a bool)", lambda s: _attn(s, causal=1),
        IV, r"causal must be True or False, got 1", "hal.attention"),
    Row("attn-q-list", "q is a nested Python list", lambda s: _attn(s, q=s.dense["q"].tolist()),
        IV, r"q must be a torch\.Tensor, numpy\.ndarray or jax\.Array, got list", "hal.attention"),
    Row("attn-backend-unknown", "backend = 'no-such-backend'", lambda s: _attn(s, backend="no-such-backend"),
        IV, r"backend='no-such-backend'.*unknown backend 'no-such-backend'", "hal.attention"),
    Row("attn-head-dim-undeclared", f"head_dim {UD} (valid, not declared by cpu)",
        lambda s: _attn(s, q=torch.zeros(6, HQ, UD), k=torch.zeros(6, HKV, UD), v=torch.zeros(6, HKV, UD)),
        UN, rf"head_dim {UD} is not declared", "hal.attention"),
    # ---- hal.KVCacheSpec ----
    Row("spec-layers-0", "num_layers = 0", lambda s: hal.KVCacheSpec(0, HKV, D),
        IV, r"num_layers must be >= 1, got 0", "hal.KVCacheSpec"),
    Row("spec-head-dim-neg", "head_dim = -1", lambda s: hal.KVCacheSpec(L, HKV, -1),
        IV, r"head_dim must be >= 1, got -1", "hal.KVCacheSpec"),
    Row("spec-dtype-fp64", "dtype = 'fp64'", lambda s: hal.KVCacheSpec(L, HKV, D, dtype="fp64"),
        IV, r"dtype must be one of \['fp32', 'fp16', 'bf16'\].*got 'fp64'", "hal.KVCacheSpec"),
    Row("spec-kv-dtype-int3", "kv_dtype = 'int3'", lambda s: hal.KVCacheSpec(L, HKV, D, kv_dtype="int3"),
        IV, r"kv_dtype must be one of \[.*'int4'\], got 'int3'", "hal.KVCacheSpec"),
    # ---- hal.KVCache ----
    Row("cache-blocks-0", "num_blocks = 0", lambda s: hal.KVCache(_spec(), 0, backend="cpu"),
        IV, r"num_blocks must be >= 1, got 0", "hal.KVCache"),
    Row("cache-memory", "memory = 'managed'", lambda s: hal.KVCache(_spec(), NB, backend="cpu", memory="managed"),
        IV, r"memory must be 'device' or 'unified', got 'managed'", "hal.KVCache"),
    Row("cache-spec-type", "spec is a dict, not a spec",
        lambda s: hal.KVCache({"num_layers": L}, NB, backend="cpu"),  # type: ignore[arg-type]
        IV, r"spec must be a hal\.KVCacheSpec or hal\.MLACacheSpec, got dict", "hal.KVCache"),
    Row("cache-k-scale-auto", "k_scale given for an 'auto' cache",
        lambda s: hal.KVCache(_spec(), NB, backend="cpu", k_scale=torch.ones(L, HKV)),
        IV, r"k_scale/v_scale apply to fp8 caches only; kv_dtype is 'auto'", "hal.KVCache"),
    Row("cache-backend-unknown", "backend = 'no-such-backend'",
        lambda s: hal.KVCache(_spec(), NB, backend="no-such-backend"),
        IV, r"backend='no-such-backend'.*unknown backend 'no-such-backend'", "hal.KVCache"),
    Row("cache-fp8-undeclared", "kv_dtype 'fp8_e4m3' (valid, not declared by the backend)",
        lambda s: hal.KVCache(_spec(kv_dtype="fp8_e4m3"), NB, backend=_CpuAutoOnly()),
        UN, r"kv_dtype fp8_e4m3 is not declared", "hal.KVCache"),
    Row("cache-k-scale-shape", "k_scale [num_layers] for an fp8 cache (needs [num_layers, Hkv])",
        lambda s: hal.KVCache(_spec(kv_dtype="fp8_e4m3"), NB, backend="cpu", k_scale=torch.ones(L)),
        IV, r"k_scale must be fp32 \[num_layers, Hkv\] = \[2, 2\], got float32 \[2\]", "hal.KVCache"),
    Row("write-nan-int8", "k holds NaN, written to an int8 cache",
        lambda s: hal.KVCache(_spec(kv_dtype="int8"), NB, backend="cpu").write(
            0, _rows(3) * math.nan, _rows(3), _i64(7, 8, 9)),
        IV, r"k holds NaN or Inf; a int8 cache rejects them", "hal.KVCache.write"),
    Row("cache-mla-undeclared", "an MLA cache on a backend that does not declare 'mla'",
        lambda s: hal.KVCache(hal.MLACacheSpec(L, block_size=BS, dtype="fp32"), NB, backend=_CpuWithoutMLA()),
        UN, r"feature 'mla'.*is not declared", "hal.KVCache"),
    # ---- KVCache.write ----
    Row("write-layer", "layer = 2 of 2 layers", lambda s: _write(s, layer=2),
        IV, r"layer must be <= 1, got 2", "hal.KVCache.write"),
    Row("write-layer-bool-tensor", "layer = torch.tensor(True)", lambda s: _write(s, layer=torch.tensor(True)),
        IV, r"layer must be an int, got Tensor", "hal.KVCache.write"),
    Row("write-k-shape", "k is [N, Hkv, 32] for head_dim 64", lambda s: _write(s, k=_rows(3, 32)),
        IV, r"k must be \[N, 2, 64\], got \[3, 2, 32\]", "hal.KVCache.write"),
    Row("write-k-dtype", "k is fp16 for an fp32 cache", lambda s: _write(s, k=_rows(3, dtype=torch.float16)),
        IV, r"k must have the cache's dtype fp32, got float16", "hal.KVCache.write"),
    Row("write-slots-int32", "slot_mapping is int32", lambda s: _write(s, slots=_i32(7, 8, 9)),
        IV, r"slot_mapping must be int64 \[N\], got int32", "hal.KVCache.write"),
    Row("write-slots-len", "slot_mapping has 2 entries for 3 tokens", lambda s: _write(s, slots=_i64(7, 8)),
        IV, r"slot_mapping has 2 entries but 3 tokens are written", "hal.KVCache.write"),
    Row("write-slot-range", "slot 128 in a 128-slot cache (after valid slots)",
        lambda s: _write(s, slots=_i64(7, 8, NB * BS)),
        IV, r"slot_mapping\[2\]=128 is out of range.*0\.\.127", "hal.KVCache.write"),
    Row("write-slot-neg", "slot -2 (only -1 means skip)", lambda s: _write(s, slots=_i64(7, -2, 9)),
        IV, r"slot_mapping\[1\]=-2 is out of range", "hal.KVCache.write"),
    Row("write-slot-dup", "slot 7 written twice in one call", lambda s: _write(s, slots=_i64(7, 8, 7)),
        IV, r"slot_mapping writes slot 7 more than once", "hal.KVCache.write"),
    # ---- KVCache.read ----
    Row("read-block-range", "block id 8 of 8 blocks", lambda s: s.cache.read(0, [0, NB]),
        IV, r"block_ids\[1\]=8 is out of range 0\.\.7", "hal.KVCache.read"),
    Row("read-block-float", "block id 1.5 (a float)", lambda s: s.cache.read(0, [0, 1.5]),
        IV, r"block_ids\[1\] must be an int, got float 1\.5", "hal.KVCache.read"),
    Row("read-dtype", "dtype='int8' (only the model dtype, 'fp32' or 'fp64')", lambda s: s.cache.read(0, [0], dtype="int8"),
        IV, r"dtype must be None \(the model dtype, fp32\) or one of 'fp32', 'fp64'", "hal.KVCache.read"),
    # ---- KVCache.copy_blocks ----
    Row("copy-dst-dup", "destination block 4 appears twice", lambda s: s.cache.copy_blocks([(0, 4), (1, 4)]),
        IV, r"a destination block appears twice in copies", "hal.KVCache.copy_blocks"),
    Row("copy-overlap", "block 2 is a destination and a source", lambda s: s.cache.copy_blocks([(1, 2), (2, 3)]),
        IV, r"a block is both a source and a destination in copies", "hal.KVCache.copy_blocks"),
    Row("copy-range", "destination block 8 of 8 (after a valid pair)",
        lambda s: s.cache.copy_blocks([(0, 4), (1, NB)]),
        IV, r"dst\[1\]=8 is out of range 0\.\.7", "hal.KVCache.copy_blocks"),
    Row("copy-float", "source block 1.5 (a float)", lambda s: s.cache.copy_blocks([(0, 4), (1.5, 5)]),
        IV, r"copies\[1\]\[0\] must be an int, got float 1\.5", "hal.KVCache.copy_blocks"),
    # ---- hal.plan ----
    Row("plan-cu-len", "cu_seqlens_q has B entries, not B+1", lambda s: _plan(s, cu=_i32(0, 1, 2)),
        IV, r"cu_seqlens_q has 3 entries but seq_lens has 3: expected B\+1=4", "hal.plan"),
    Row("plan-seq-lens-int64", "seq_lens is int64", lambda s: _plan(s, seq_lens=_i64(20, 5, 20)),
        IV, r"seq_lens must be int32 \[B\], got int64", "hal.plan"),
    Row("plan-cu-decreasing", "cu_seqlens_q = [0, 2, 1, 3] decreases", lambda s: _plan(s, cu=_i32(0, 2, 1, 3)),
        IV, r"cu_seqlens_q must be non-decreasing", "hal.plan"),
    Row("plan-q-gt-seq", "7 query tokens for a sequence of 5", lambda s: _plan(s, cu=_i32(0, 1, 8, 9)),
        IV, r"sequence 1 has 7 query tokens but seq_lens\[1\]=5", "hal.plan"),
    Row("plan-table-narrow", "block_table too narrow for seq_lens[3]=130",
        lambda s: hal.plan(_i32(0, 1, 2, 3, 4), _i32(1, 1, 1, 130), torch.zeros(4, 7, dtype=torch.int32), s.cache),
        IV, re.escape("block_table has 7 columns but seq_lens[3]=130 needs 9 blocks of 16"), "hal.plan"),
    Row("plan-block-range", "block id 8 in the table of an 8-block cache",
        lambda s: _plan(s, table=_i32(0, 1, 8, 0, 0, 3).reshape(3, 2)),
        IV, r"block_table\[1, 0\]=8 is out of range: the cache has blocks 0\.\.7", "hal.plan"),
    Row("plan-seq-len-neg", "seq_lens[1] = -1", lambda s: _plan(s, cu=_i32(0, 1, 1, 2), seq_lens=_i32(20, -1, 20)),
        IV, r"seq_lens\[1\]=-1 must be >= 0", "hal.plan"),
    # ---- hal.paged_attention ----
    Row("paged-q-tokens", "q has 4 tokens, the plan 3", lambda s: _paged(s, q=torch.zeros(4, HQ, D)),
        IV, r"q has 4 tokens but the plan's cu_seqlens_q\[-1\]=3", "hal.paged_attention"),
    Row("paged-q-head-dim", "q head_dim 32, cache head_dim 64", lambda s: _paged(s, q=torch.zeros(3, HQ, 32)),
        IV, r"q has head_dim 32 but the cache holds keys of 64", "hal.paged_attention"),
    Row("paged-q-dtype", "q is fp16, the cache fp32", lambda s: _paged(s, q=s.q.half()),
        IV, r"q is float16 but the cache's model dtype is fp32", "hal.paged_attention"),
    Row("paged-plan-geometry", "plan made for a 4-block cache", lambda s: _paged(s, plan=_other_geometry_plan(s)),
        IV, r"plan was made for backend 'cpu' with 4 blocks of 16, but the cache .* 8 blocks of 16",
        "hal.paged_attention"),
    Row("paged-layer", "layer = 2 of 2 layers", lambda s: _paged(s, layer=2),
        IV, r"layer must be <= 1, got 2", "hal.paged_attention"),
    Row("paged-plan-type", "plan is a dict", lambda s: _paged(s, plan={"seq_lens": [20, 5, 20]}),
        IV, r"plan must come from hal\.plan\(\.\.\.\), got dict", "hal.paged_attention"),
    Row("paged-mla-cache", "an MLA cache", lambda s: _paged(s, cache=_mla_cache()),
        IV, r"cache must be a hal\.KVCache of a hal\.KVCacheSpec \(for MLA caches use hal\.mla_attention\)",
        "hal.paged_attention"),
    # ---- hal.mla_attention ----
    Row("mla-standard-cache", "a standard (non-MLA) cache",
        lambda s: hal.mla_attention(torch.zeros(3, HQ, 64), torch.zeros(3, HQ, 32), s.cache, 0, s.plan, scale=0.1),
        IV, r"cache must be a hal\.KVCache of a hal\.MLACacheSpec", "hal.mla_attention"),
    # ---- hal.merge_attention_states ----
    Row("merge-lse-fp16", "lse_a is fp16", lambda s: _merge(lse_a=torch.zeros(3, HQ, dtype=torch.float16)),
        IV, r"lse_a must be fp32 \[T, H\] = \[3, 4\], got float16 \[3, 4\]", "hal.merge_attention_states"),
    Row("merge-o-shape", "o_b is [3, 4, 32], o_a [3, 4, 64]", lambda s: _merge(o_b=torch.zeros(3, HQ, 32)),
        IV, r"o_b \[3, 4, 32\] .* must match o_a \[3, 4, 64\]", "hal.merge_attention_states"),
    Row("merge-lse-shape", "lse_b is [3], not [T, H]", lambda s: _merge(lse_b=torch.zeros(3)),
        IV, r"lse_b must be fp32 \[T, H\] = \[3, 4\], got float32 \[3\]", "hal.merge_attention_states"),
    # ---- hal.BlockManager ----
    Row("bm-allocate-exists", "allocate an existing seq_id", lambda s: s.bm.allocate("a", 4),
        IV, r"seq_id 'a' already exists", "hal.BlockManager.allocate"),
    Row("bm-append-unknown", "append to an unknown seq_id", lambda s: s.bm.append("zz", 1),
        IV, r"unknown seq_id 'zz'", "hal.BlockManager.append"),
    Row("bm-allocate-neg", "allocate num_tokens = -1", lambda s: s.bm.allocate("new", -1),
        IV, r"num_tokens must be an int >= 0, got -1", "hal.BlockManager.allocate"),
    Row("bm-token-ids-len", "token_ids has 3 entries for num_tokens 4",
        lambda s: s.bm.allocate("new", 4, token_ids=[1, 2, 3]),
        IV, r"token_ids has 3 entries but num_tokens is 4", "hal.BlockManager.allocate"),
    Row("bm-fork-exists", "fork onto an existing child_id", lambda s: s.bm.fork("a", "b"),
        IV, r"child_id 'b' already exists", "hal.BlockManager.fork"),
    Row("bm-free-unknown", "free an unknown seq_id", lambda s: s.bm.free("zz"),
        IV, r"unknown seq_id 'zz'", "hal.BlockManager.free"),
    Row("bm-allocate-oob", "allocate 5 blocks with 4 free", lambda s: s.bm.allocate("big", 5 * BS),
        OOB, r"seq_id 'big' needs 5 new blocks of 16 tokens, but only 4 are free", "hal.BlockManager.allocate"),
    Row("bm-append-oob", "append 100 tokens (6 new blocks) with 4 free", lambda s: s.bm.append("b", 100),
        OOB, r"seq_id 'b' needs 6 new blocks of 16 tokens, but only 4 are free", "hal.BlockManager.append"),
]

PUBLIC_OPS = {
    "hal.attention", "hal.KVCacheSpec", "hal.KVCache", "hal.KVCache.write", "hal.KVCache.read",
    "hal.KVCache.copy_blocks", "hal.plan", "hal.paged_attention", "hal.mla_attention",
    "hal.merge_attention_states", "hal.BlockManager.allocate", "hal.BlockManager.append",
    "hal.BlockManager.fork", "hal.BlockManager.free",
}


def _raise(row: Row, state: State | None = None) -> Exception:
    """Runs the row's call; returns what it raised (any exception), fails if it returned."""
    try:
        row.call(make_state() if state is None else state)
    except Exception as e:  # noqa: BLE001 - the caller checks the class
        return e
    pytest.fail(f"{row.id}: {row.description!r} did not raise (expected {row.exc.__name__})")


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_raises_and_changes_nothing(row: Row) -> None:
    state = make_state()
    before = cache_snapshot(state.cache)
    err = _raise(row, state)
    assert type(err) is row.exc, f"{row.id}: expected {row.exc.__name__}, got {type(err).__name__}: {err}"
    assert re.search(row.match, str(err)), f"{row.id}: message {str(err)!r} does not match {row.match!r}"
    assert_same_bits(before, cache_snapshot(state.cache))
    assert manager_behaviour(state.bm) == manager_behaviour(make_manager()), \
        f"{row.id}: the block manager changed after a failed call"


def test_messages_start_with_the_op() -> None:
    wrong = []
    for row in ROWS:
        msg = str(_raise(row))
        if not msg.startswith(f"[{row.op}] "):
            wrong.append(f"{row.id}: {msg.splitlines()[0]!r} should start with '[{row.op}] '")
    assert not wrong, "\n".join(wrong)


def test_invalid_input_is_a_value_error() -> None:
    assert issubclass(hal.InvalidInput, ValueError) and issubclass(hal.InvalidInput, hal.HALError)
    for cls in (hal.Unsupported, hal.OutOfBlocks, hal.BackendUnavailable):
        assert issubclass(cls, hal.HALError) and not issubclass(cls, hal.InvalidInput)
    for row in ROWS:
        if row.exc is hal.InvalidInput:
            err = _raise(row)
            assert isinstance(err, ValueError), f"{row.id}: {type(err).__name__} is not a ValueError"


def test_table_is_broad() -> None:
    assert len(ROWS) >= 30
    assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"
    assert len({r.description for r in ROWS}) >= 20
    assert PUBLIC_OPS <= {r.op for r in ROWS}, f"ops without a row: {PUBLIC_OPS - {r.op for r in ROWS}}"
    assert {hal.InvalidInput, hal.Unsupported, hal.OutOfBlocks} <= {r.exc for r in ROWS}


def test_the_valid_baseline_calls_succeed() -> None:
    """The rows differ from these calls in one argument each, so each fails for its stated reason."""
    s = make_state()
    before = cache_snapshot(s.cache)
    out, lse = _attn(s, return_lse=True)
    assert out.shape == (6, HQ, D) and lse.shape == (6, HQ)
    assert _paged(s).shape == (3, HQ, D)
    assert _plan(s).num_tokens == 3
    hal.plan(_i32(0, 1, 2, 3, 4), _i32(1, 1, 1, 100), torch.zeros(4, 7, dtype=torch.int32), s.cache)
    _merge()
    assert_same_bits(before, cache_snapshot(s.cache))  # reads and attention change nothing either
    _write(s)  # a valid write does change the cache: the snapshot can see a change
    assert not all(torch.equal(a, b) for a, b in zip(before, cache_snapshot(s.cache)))
    s.cache.copy_blocks([(0, 4), (1, 5)])
    assert torch.equal(s.cache.read(1, [4])[0], s.cache.read(1, [0])[0])
    # block ids given as numpy / 0-d tensor ints are still accepted
    s.cache.read(0, [np.int64(1), torch.tensor(2)])


# --------------------------------------------------------------------------- the README table

def bad_input_table() -> list[tuple[str, str, str]]:
    """(description, exception class name, first line of the message) for every row, in order."""
    table = []
    for row in ROWS:
        state = make_state()
        try:
            row.call(state)
        except Exception as e:  # noqa: BLE001
            table.append((row.description, type(e).__name__, str(e).splitlines()[0]))
        else:
            table.append((row.description, "(no error)", ""))
    return table


def _markdown(table: list[tuple[str, str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| bad input | raises | message (first line) |", "|---|---|---|"]
    lines += [f"| {cell(d)} | `{e}` | `{cell(m)}` |" for d, e, m in table]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(_markdown(bad_input_table()) + "\n")


def test_remembered_call_kinds_are_still_checked() -> None:
    """hal.paged_attention and hal.mla_attention remember the call kinds a cache has passed (q's shape,
    dtype and device, and plain scalar options) and skip those checks for a call that matches one: the
    per-layer calls of a decode step (hal/attention.py). Warm that memory with valid calls, then every
    call that differs in something checked must still raise, a failed call must not be remembered, and a
    remembered call must still return what it returned the first time."""
    s = make_state()
    first = _paged(s)
    _paged(s, layer=1)  # the same kind: one entry
    hal.paged_attention(s.q, s.cache, 0, s.plan, scale=1, window_left=3)  # an int scale is valid
    assert len(s.cache._checked) == 2
    bad = [
        (dict(scale=True), r"scale must be a finite float, got bool True"),  # True == 1 as a dict key
        (dict(scale=1, window_left=True), r"window_left must be an int, got bool True"),
        (dict(scale=1.0, window_left=-3), r"window_left must be >= 0, got -3"),
        (dict(scale=float("nan")), r"scale must be a finite float, got nan"),
        (dict(causal=1), r"causal must be True or False, got 1"),
        (dict(softcap=-1.0), r"softcap must be a finite float > 0, got -1\.0"),
        (dict(alibi_slopes=torch.zeros(3)), r"alibi_slopes must be fp32 \[Hq\] = \[4\]"),
        (dict(q=s.q.half()), r"q is float16 but the cache's model dtype is fp32"),
        (dict(q=s.q[:, :3]), r"q has 3 heads and the cache has 2"),
        (dict(layer=2), r"layer must be <= 1, got 2"),
    ]
    for kw, pattern in bad:
        args = {"q": s.q, "layer": 0, **kw}
        with pytest.raises(hal.InvalidInput, match=pattern):
            hal.paged_attention(args.pop("q"), s.cache, args.pop("layer"), s.plan, **args)
    assert len(s.cache._checked) == 2, "a failed call was remembered"
    assert torch.equal(_paged(s), first)

    mla = hal.KVCache(hal.MLACacheSpec(L, kv_lora_rank=64, rope_dim=32, block_size=BS, dtype="fp32"), NB,
                      backend="cpu")
    plan = _plan(s, cache=mla)
    ql, qr = torch.randn(3, HQ, 64), torch.randn(3, HQ, 32)
    hal.mla_attention(ql, qr, mla, 0, plan, scale=1)
    for kw, pattern in [(dict(scale=True), r"scale must be a finite float, got bool True"),
                        (dict(q_rope=qr[:, :, :16]), r"q_rope \[T, H, 32\]"),
                        (dict(q_rope=qr.double()), r"q_rope is float64"),
                        (dict(causal=1), r"causal and return_lse must be True or False")]:
        args = {"q_rope": qr, "scale": 1, **kw}
        with pytest.raises(hal.InvalidInput, match=pattern):
            hal.mla_attention(ql, args.pop("q_rope"), mla, 0, plan, **args)
    assert len(mla._checked) == 1
