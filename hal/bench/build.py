"""Building a case: the caches, tensors and closures that ``hal.bench.runner`` times.

Decode and MLA: one cache of ``layers`` layers on the backend, pages of every sequence drawn from one
random permutation of its blocks, every layer written through ``KVCache.write`` with the same values
(distinct memory); ``hal.plan`` once, reused by every layer. The contiguous SDPA baselines hold
their own copy of every layer in the model dtype; the gather baseline reads the same cache as hal.
All inputs come from a generator seeded by the case's name.

A quantized decode case on a cpu whose caches are known also times ``hal-cached``: the same call
(batch, context, plan shape) on a one-layer cache whose block table draws every page from a pool of
blocks small enough to stay in each core's cache (``hal.bench.runner.cached_pool_budget``), as
sequences that share a prefix do. Its rows
hardly ever come from memory, so its time is what hal's compute alone costs for the case: a floor
under hal's time, and so a ceiling on what the format can gain over hal-<dtype> at the memory
speed of the moment (``hal.bench.runner`` reports it as the case's ``gain_ceiling``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hal import hostmem
from hal.bench import accounting as A
from hal.bench.cases import DSV2_LITE, LLAMA3_8B, CaseSpec
from hal.dtypes import DTYPES

__all__ = ["Impl", "Setup", "build", "CACHED", "pool_table"]

CACHED = "hal-cached"  # hal's compute alone: its rows in each core's cache (quantized decode, cpu)


@dataclass
class Impl:
    """One implementation of a case: ``run(n)`` does one measurement over layers ``0..n-1`` (prefill: one
    call, n is 1), ``warm()`` one layer (prefill: a short prefix)."""

    run: Callable[[int], Any]
    warm: Callable[[], Any]
    bytes_per_layer: int  # bytes it must read per layer (stored format for hal and gather, model dtype for sdpa)
    flops_per_layer: int
    whole: bool = False  # run(n) always does the whole measurement (memcpy): never cycled over fewer layers


@dataclass
class Setup:
    impls: dict[str, Impl]  # "hal" first, then the baselines
    layers: int
    shape: dict[str, Any]
    plan_s: float | None = None  # seconds of one hal.plan (decode, MLA)
    notes: list[str] = field(default_factory=list)


def _over_layers(fn: Callable[[int], Any]) -> Callable[[int], None]:
    def run(layers: int) -> None:
        for layer in range(layers):
            fn(layer)
    return run


def _layer_impls(c: CaseSpec, layers: int, hal_layer: Callable[[int], Any], sdpa_layer: Callable[[int], Any],
                 packed_layer: Callable[[int], Any], gather_layer: Callable[[int], Any],
                 unquantized_layer: Callable[[int], Any] | None = None, cached: Impl | None = None) -> dict[str, Impl]:
    """hal, then (quantized decode) hal on the same KV unquantized and hal in cache, then memcpy, then the three
    baselines of a per-layer case (decode, MLA); hal and gather read the stored format, the contiguous
    SDPA baselines and the unquantized hal the model dtype. That order holds in every round: memcpy
    runs before the baselines that allocate and free large temporaries (a copy timed after gather+sdpa
    read 9 GB/s where it reads 25 alone)."""
    stored, model, flops = c.stored_bytes_per_layer(), c.model_bytes_per_layer(), c.flops_per_layer()

    def impl(fn: Callable[[int], Any], nbytes: int) -> Impl:
        return Impl(_over_layers(fn), lambda: fn(0), nbytes, flops)

    impls = {"hal": impl(hal_layer, stored)}
    if unquantized_layer is not None:  # its "hal speedup" is what the format gains over the model dtype
        impls[f"hal-{c.dtype}"] = impl(unquantized_layer, model)
    if cached is not None:
        impls[CACHED] = cached
    impls[MEMCPY] = _memcpy_impl(layers, layers * stored)
    impls.update({"sdpa": impl(sdpa_layer, model), "sdpa-packed": impl(packed_layer, model),
                  "gather+sdpa": impl(gather_layer, stored)})
    return impls


MEMCPY = "memcpy"  # the machine's copy bandwidth, measured again in every round of a case


def _memcpy_impl(layers: int, working_set: int) -> Impl:
    """``dst.copy_(src)`` over buffers far above the last-level cache, timed in the case's own rounds,
    so that "% of copy bandwidth" compares with the bandwidth the machine had at that moment (a shared
    VM's moves by a third between minutes). One run copies the whole buffer; its bytes are spread
    over the case's layers so that the per-measurement total is the buffer: as many bytes as hal reads,
    at most the machine probe's buffer."""
    from hal.bench.machine import copy_buffer_bytes, last_level_cache

    size = max(A.MiB, min(working_set, copy_buffer_bytes(last_level_cache()[0]))) // 4 * 4
    src = hostmem.zeros(size // 4, dtype=torch.float32).fill_(1.0)  # 2 MiB pages, as the probe's
    dst = hostmem.zeros(size // 4, dtype=torch.float32)
    run = (lambda _n: dst.copy_(src))
    return Impl(run, lambda: dst.copy_(src), max(1, A.copy_bytes(size) // max(layers, 1)), 0, whole=True)


def _paged_layout(batch: int, context: int, block_size: int, gen: torch.Generator
                  ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Every sequence's blocks drawn from one random permutation of the cache's blocks.
    Returns num_blocks, block_table int32 [B, need], slot_mapping int64 [B * context]."""
    need = -(-context // block_size)
    num_blocks = batch * need
    table = torch.randperm(num_blocks, generator=gen).view(batch, need).to(torch.int32)  # [B, need]
    tok = torch.arange(context)
    slots = table.to(torch.int64)[:, tok // block_size] * block_size + tok % block_size  # [B, S]
    return num_blocks, table, slots.reshape(-1)


def pool_table(batch: int, need: int, pool: int, gen: torch.Generator) -> torch.Tensor:
    """A block table [batch, need] whose ids all come from blocks ``0..pool-1``: random permutations of
    the pool, one after another, so that every block serves as often as any other, give or take one."""
    reps = -(-batch * need // pool)
    ids = torch.cat([torch.randperm(pool, generator=gen) for _ in range(reps)])[:batch * need]
    return ids.view(batch, need).to(torch.int32)


def _cached_impl(c: CaseSpec, backend: Any, device: torch.device, gen: torch.Generator, k: torch.Tensor,
                 v: torch.Tensor, q: torch.Tensor, budget: tuple[int, str]) -> tuple[Impl, str]:
    """``hal-cached`` (see the module note) and a note saying what it runs."""
    import hal

    s = LLAMA3_8B
    B, S = c.batch, c.context
    need = -(-S // s.block_size)
    block_bytes = c.stored_bytes_per_layer() // (B * S) * s.block_size
    pool = max(1, min(B * need, budget[0] // block_bytes))
    spec = hal.KVCacheSpec(1, s.hkv, s.d, v_head_dim=s.dv, block_size=s.block_size, dtype=c.dtype,
                           kv_dtype=c.kv_dtype)
    small = hal.KVCache(spec, pool, backend=backend, device=device)
    n = min(pool * s.block_size, B * S)
    small.write(0, k[:n], v[:n], torch.arange(n, dtype=torch.int64, device=device))
    table = pool_table(B, need, pool, gen)
    plan, _ = _plan(small, table, B, S)

    def one(_layer: int = 0) -> Any:
        return hal.paged_attention(q, small, 0, plan)

    note = (f"{CACHED}: hal on the same shapes with every page drawn from {pool} blocks "
            f"({pool * block_bytes / 2**20:.1f} MiB, {budget[1]}): its compute alone")
    return Impl(_over_layers(one), one, c.stored_bytes_per_layer(), c.flops_per_layer()), note


def _plan(cache: Any, table: torch.Tensor, batch: int, context: int) -> tuple[Any, float]:
    import hal

    t0 = time.perf_counter()
    p = hal.plan(torch.arange(batch + 1, dtype=torch.int32), torch.full((batch,), context, dtype=torch.int32),
                 table, cache)
    return p, time.perf_counter() - t0


def _build_decode(c: CaseSpec, backend: Any, device: torch.device, layers: int, gen: torch.Generator,
                  cache_budget: tuple[int, str] | None = None) -> Setup:
    import hal

    s = LLAMA3_8B
    B, S, dt = c.batch, c.context, DTYPES[c.dtype]
    spec = hal.KVCacheSpec(layers, s.hkv, s.d, v_head_dim=s.dv, block_size=s.block_size, dtype=c.dtype,
                           kv_dtype=c.kv_dtype)
    num_blocks, table, slots = _paged_layout(B, S, s.block_size, gen)
    cache = hal.KVCache(spec, num_blocks, backend=backend, device=device)
    k = torch.randn(B * S, s.hkv, s.d, generator=gen, dtype=dt).to(device)  # [B*S, Hkv, D]
    v = torch.randn(B * S, s.hkv, s.dv, generator=gen, dtype=dt).to(device)
    slots_dev = slots.to(device)
    for layer in range(layers):
        cache.write(layer, k, v, slots_dev)
    plan, plan_s = _plan(cache, table, B, S)
    q = torch.randn(B, s.hq, s.d, generator=gen, dtype=dt).to(device)  # [T=B, Hq, D]: one token per sequence
    q4 = q.view(B, s.hq, 1, s.d)  # [B, Hq, 1, D]
    # contiguous baseline: its own [B, Hkv, S, D] copy per layer
    kc = torch.empty(layers, B, s.hkv, S, s.d, dtype=dt, device=device)
    vc = torch.empty(layers, B, s.hkv, S, s.dv, dtype=dt, device=device)
    for layer in range(layers):
        kc[layer].copy_(k.view(B, S, s.hkv, s.d).transpose(1, 2))
        vc[layer].copy_(v.view(B, S, s.hkv, s.dv).transpose(1, 2))
    unq = None  # a quantized case also times hal on the same KV unquantized, in the same rounds
    if c.kv_dtype != "auto":
        unq = hal.KVCache(hal.KVCacheSpec(layers, s.hkv, s.d, v_head_dim=s.dv, block_size=s.block_size,
                                          dtype=c.dtype), num_blocks, backend=backend, device=device)
        for layer in range(layers):
            unq.write(layer, k, v, slots_dev)
        unq_plan, _ = _plan(unq, table, B, S)
    cached, notes = None, []
    if c.kv_dtype != "auto" and cache_budget:
        cached, note = _cached_impl(c, backend, device, gen, k, v, q, cache_budget)
        notes.append(note)
    del k, v
    ids = table.reshape(-1)
    need = table.shape[1]

    def hal_layer(layer: int) -> Any:
        return hal.paged_attention(q, cache, layer, plan)

    def unq_layer(layer: int) -> Any:
        return hal.paged_attention(q, unq, layer, unq_plan)

    def sdpa_layer(layer: int) -> Any:
        return F.scaled_dot_product_attention(q4, kc[layer], vc[layer], enable_gqa=True)

    qg = q.view(B, s.hkv, s.hq // s.hkv, s.d)  # [B, Hkv, G, D]: a KV group's query heads as query rows

    def packed_layer(layer: int) -> Any:
        return F.scaled_dot_product_attention(qg, kc[layer], vc[layer])

    def gather_layer(layer: int) -> Any:
        kg, vg = cache.read(layer, ids)  # [B * need, bs, Hkv, D], dequantized
        kg = kg.view(B, need * s.block_size, s.hkv, s.d)[:, :S].transpose(1, 2)  # [B, Hkv, S, D]
        vg = vg.view(B, need * s.block_size, s.hkv, s.dv)[:, :S].transpose(1, 2)
        return F.scaled_dot_product_attention(q4, kg, vg, enable_gqa=True)

    impls = _layer_impls(c, layers, hal_layer, sdpa_layer, packed_layer, gather_layer,
                         unq_layer if unq is not None else None, cached)
    shape = dict(model=s.name, hq=s.hq, hkv=s.hkv, head_dim=s.d, v_head_dim=s.dv, block_size=s.block_size,
                 batch=B, context=S, kv_dtype=c.kv_dtype, dtype=c.dtype, layers=layers,
                 pages="randomly permuted", bytes_per_token_layer=cache.bytes_per_token // layers)
    return Setup(impls, layers, shape, plan_s, notes)


def _build_prefill(c: CaseSpec, backend: Any, device: torch.device, gen: torch.Generator) -> Setup:
    import hal

    s = LLAMA3_8B
    N, dt = c.context, DTYPES[c.dtype]
    q = torch.randn(N, s.hq, s.d, generator=gen, dtype=dt).to(device)  # [N, Hq, D]
    k = torch.randn(N, s.hkv, s.d, generator=gen, dtype=dt).to(device)  # [N, Hkv, D]
    v = torch.randn(N, s.hkv, s.dv, generator=gen, dtype=dt).to(device)
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))  # [1, H, N, D]
    w = min(N, 256)  # warm-up on a prefix

    def hal_run(n: int = N) -> Any:
        return hal.attention(q[:n], k[:n], v[:n], causal=True, backend=backend)

    def sdpa_run(n: int = N) -> Any:
        return F.scaled_dot_product_attention(q4[:, :, :n], k4[:, :, :n], v4[:, :, :n], is_causal=True,
                                              enable_gqa=True)

    nbytes, flops = c.stored_bytes_per_layer(), c.flops_per_layer()
    impls = {"hal": Impl(lambda _: hal_run(), lambda: hal_run(w), nbytes, flops),
             "sdpa": Impl(lambda _: sdpa_run(), lambda: sdpa_run(w), nbytes, flops)}
    shape = dict(model=s.name, hq=s.hq, hkv=s.hkv, head_dim=s.d, v_head_dim=s.dv, tokens=N, causal=True,
                 dtype=c.dtype)
    return Setup(impls, 1, shape)


def _build_mla(c: CaseSpec, backend: Any, device: torch.device, layers: int, gen: torch.Generator) -> Setup:
    import hal

    m = DSV2_LITE
    B, S, dt = c.batch, c.context, DTYPES[c.dtype]
    R, P, H = m.kv_lora_rank, m.rope_dim, m.heads
    scale = 1.0 / math.sqrt(m.qk_nope_dim + m.rope_dim)
    spec = hal.MLACacheSpec(layers, kv_lora_rank=R, rope_dim=P, block_size=m.block_size, dtype=c.dtype,
                            kv_dtype=c.kv_dtype)
    num_blocks, table, slots = _paged_layout(B, S, m.block_size, gen)
    cache = hal.KVCache(spec, num_blocks, backend=backend, device=device)
    ckv = torch.randn(B * S, R, generator=gen, dtype=dt).to(device)  # [B*S, R], after its norm
    kpe = torch.randn(B * S, P, generator=gen, dtype=dt).to(device)  # [B*S, P], after RoPE
    slots_dev = slots.to(device)
    for layer in range(layers):
        cache.write(layer, ckv, kpe, slots_dev)
    plan, plan_s = _plan(cache, table, B, S)
    ql = torch.randn(B, H, R, generator=gen, dtype=dt).to(device)  # [B, H, R], W_UK absorbed
    qr = torch.randn(B, H, P, generator=gen, dtype=dt).to(device)  # [B, H, P]
    q4 = torch.cat([ql, qr], dim=-1).view(B, H, 1, R + P)  # [B, H, 1, R+P]
    # contiguous baseline: MQA over the latent row, keys = values = [B, 1, S, R+P], output sliced to R
    lat = torch.empty(layers, B, 1, S, R + P, dtype=dt, device=device)
    for layer in range(layers):
        lat[layer].copy_(torch.cat([ckv, kpe], dim=-1).view(B, 1, S, R + P))
    del ckv, kpe
    ids = table.reshape(-1)
    need = table.shape[1]

    def hal_layer(layer: int) -> Any:
        return hal.mla_attention(ql, qr, cache, layer, plan, scale=scale)

    def sdpa_layer(layer: int) -> Any:
        kv = lat[layer]
        return F.scaled_dot_product_attention(q4, kv, kv, scale=scale, enable_gqa=True)[..., :R]

    qh = q4.transpose(1, 2).contiguous()  # [B, 1, H, R+P]: the heads as query rows of the one KV head

    def packed_layer(layer: int) -> Any:
        kv = lat[layer]
        return F.scaled_dot_product_attention(qh, kv, kv, scale=scale)[..., :R]

    def gather_layer(layer: int) -> Any:
        c_kv, k_pe = cache.read(layer, ids)  # [B * need, bs, R], [B * need, bs, P]
        kv = torch.cat([c_kv, k_pe], dim=-1).view(B, 1, need * m.block_size, R + P)[:, :, :S]
        return F.scaled_dot_product_attention(q4, kv, kv, scale=scale, enable_gqa=True)[..., :R]

    impls = _layer_impls(c, layers, hal_layer, sdpa_layer, packed_layer, gather_layer)
    shape = dict(model=m.name, heads=H, kv_lora_rank=R, rope_dim=P, block_size=m.block_size, batch=B, context=S,
                 kv_dtype=c.kv_dtype, dtype=c.dtype, layers=layers, pages="randomly permuted",
                 bytes_per_token_layer=cache.bytes_per_token // layers,
                 flops_per_token=A.mla_flops_per_token(H, R, P))
    notes = []
    if getattr(cache.storage, "fetch", None) is not None and backend.name == "cpu":
        from hal.backends.cpu.mla import count_fetched_bytes  # counts the torch path's fetches and native rows

        with count_fetched_bytes(cache.storage) as counted:
            hal_layer(0)
        per_token = counted["bytes"] / max(1, B * S)
        notes.append(f"measured in one decode step: {counted['bytes']:,} B read from the cache per layer for "
                     f"{B} x {S} cached tokens = {per_token:.0f} B per cached token for all {H} heads "
                     f"(reading it once per head would be {H * counted['bytes']:,} B)")
        shape["measured_bytes_per_decode_step_layer"] = counted["bytes"]
    return Setup(impls, layers, shape, plan_s, notes)


def build(c: CaseSpec, backend: Any, device: torch.device, layers: int, seed: int = 0,
          cache_budget: tuple[int, str] | None = None) -> Setup:
    """Allocate and fill what case ``c`` needs on ``backend``; the returned impls are ready to time.
    ``cache_budget``: bytes of KV that stay in each core's cache, and where (None: no ``hal-cached``)."""
    gen = torch.Generator().manual_seed(seed)
    if c.kind == "decode":
        return _build_decode(c, backend, device, layers, gen, cache_budget)
    if c.kind == "prefill":
        return _build_prefill(c, backend, device, gen)
    if c.kind == "mla":
        return _build_mla(c, backend, device, layers, gen)
    raise ValueError(f"unknown case kind {c.kind!r}")
