"""Attention on the CPU in PyTorch: FlashAttention's online softmax (Dao et al., 2022), tiled.

Each sequence is processed on its own: its queries in tiles of ``Q_TILE`` tokens, its keys in
chunks of ``KV_CHUNK`` tokens, keeping a running max ``m``, denominator ``l`` and accumulator per
query row, so no ``[T, S]`` score matrix is ever built and a paged sequence's keys are read straight
out of its blocks. Scores, softmax and accumulation are fp32 whatever the input dtype. Because a
sequence's computation never depends on the rest of the batch, results are batch-invariant
bitwise. Long plain query runs (no soft-cap, ALiBi, sink or window) that the native prefill does not
take (fp16/fp32 models, or native kernels off) run on torch's own CPU flash kernel instead, which
returns the LSE as well: see ``_flash_applies``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hal.backend import AttentionParams
from hal.plan import Plan, VarlenBatch

from .kernels import flash_prefill as native_prefill
from .kernels import paged_decode as native_decode
from .kv_cache import CpuKVStorage

Q_TILE = 128  # query tokens per tile
KV_CHUNK = 512  # keys per chunk (whole blocks for paged caches)

# [c0, c1) -> k [n, Hkv, D], v [n, Hkv, Dv]; v None: the value is k[..., :Dv] (MLA's latent, fetched once)
FetchKV = Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]]


def _attend_tile(
    q: torch.Tensor,  # [n, Hq, D] one tile of one sequence's queries
    pos: torch.Tensor,  # [n] int64 absolute positions of those queries
    kv_len: int,
    fetch: FetchKV,
    chunk: int,
    p: AttentionParams,
    num_kv_heads: int,
    v_head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [n, Hq, Dv] fp32, lse [n, Hq] fp32
    n, hq, d = q.shape
    g = hq // num_kv_heads
    # the keys any query of the tile can see: [lo, hi)
    hi = min(kv_len, int(pos[-1]) + 1) if p.causal else kv_len
    lo = max(0, int(pos[0]) - p.window_left) if p.window_left is not None else 0
    # queries as [Hkv, G*n, D], rows ordered (group member, token); pre-scaled in fp32
    qt = (q.float() * p.scale).view(n, num_kv_heads, g, d).permute(1, 2, 0, 3).reshape(num_kv_heads, g * n, d)
    m = torch.full((num_kv_heads, g, n), float("-inf"))  # running max of the scores
    l = torch.zeros(num_kv_heads, g, n)  # running softmax denominator
    if p.sinks is not None:  # a sink is one more logit with no value: start the row from it
        m = p.sinks.view(num_kv_heads, g, 1).expand(num_kv_heads, g, n).clone()
        l = torch.ones(num_kv_heads, g, n)
    acc = torch.zeros(num_kv_heads, g * n, v_head_dim)  # running sum of p * v
    slopes = None if p.alibi_slopes is None else p.alibi_slopes.view(num_kv_heads, g, 1, 1)
    start = (lo // chunk) * chunk
    for c0 in range(start, hi, chunk):
        c0, c1 = max(c0, lo), min(c0 + chunk, hi)
        k, v = fetch(c0, c1)  # [nk, Hkv, D], [nk, Hkv, Dv] (or None)
        kf = k.float()
        vf = kf[..., :v_head_dim] if v is None else v.float()
        s = torch.bmm(qt, kf.permute(1, 2, 0)).view(num_kv_heads, g, n, c1 - c0)  # [Hkv, G, n, nk]
        if p.softcap is not None:
            s = torch.tanh(s / p.softcap) * p.softcap
        j = torch.arange(c0, c1)
        if slopes is not None:
            s = s - slopes * (pos[:, None] - j[None, :]).abs()
        visible = torch.ones(n, c1 - c0, dtype=torch.bool)
        if p.causal:
            visible &= j[None, :] <= pos[:, None]
        if p.window_left is not None:
            visible &= j[None, :] >= pos[:, None] - p.window_left
        s = s.masked_fill(~visible, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # -inf: nothing seen yet
        alpha = torch.exp(m - m_safe)  # rescales what was accumulated under the old max
        pr = torch.exp(s - m_safe[..., None])  # [Hkv, G, n, nk], masked keys give 0
        l = l * alpha + pr.sum(-1)
        acc = acc * alpha.view(num_kv_heads, g * n, 1) + torch.bmm(
            pr.view(num_kv_heads, g * n, c1 - c0), vf.permute(1, 0, 2))
        m = m_new
    seen = l > 0
    out = torch.where(seen.view(num_kv_heads, g * n, 1), acc / l.clamp_min(1e-38).view(num_kv_heads, g * n, 1),
                      torch.zeros(()))
    lse = torch.where(seen, m + torch.log(l), torch.full((), float("-inf")))
    out = out.view(num_kv_heads, g, n, v_head_dim).permute(2, 0, 1, 3).reshape(n, hq, v_head_dim)
    lse = lse.permute(2, 0, 1).reshape(n, hq)
    return out, lse


def _attend_sequence(q: torch.Tensor, kv_len: int, fetch: FetchKV, chunk: int, p: AttentionParams,
                     num_kv_heads: int, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Queries q [Lq, Hq, D] are the last Lq positions of a sequence of kv_len keys (bottom-right)."""
    lq = q.shape[0]
    first = kv_len - lq
    for t0 in range(0, lq, Q_TILE):
        t1 = min(lq, t0 + Q_TILE)
        pos = torch.arange(first + t0, first + t1)
        o, s = _attend_tile(q[t0:t1], pos, kv_len, fetch, chunk, p, num_kv_heads, out.shape[-1])
        out[t0:t1] = o.to(out.dtype)
        if lse is not None:
            lse[t0:t1] = s


FLASH_MIN_Q = 17  # query runs at least this long (prefill, chunked prefill) may take torch's flash kernel
_FLASH_MAX_MASK = 1 << 24  # query x key elements of an explicit causal mask, at most
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_applies(lq: int, lk: int, d: int, dv: int, p: AttentionParams) -> bool:
    """Whether torch's own CPU flash kernel computes exactly hal's semantics for a sequence of ``lq``
    queries over ``lk`` keys: no soft-cap, ALiBi, sink or window, D == Dv, Lq <= Lk (and a bounded
    explicit mask for bottom-right causal). Decided from the sequence alone (batch invariance)."""
    return (_flash is not None and FLASH_MIN_Q <= lq <= lk and p.softcap is None and p.alibi_slopes is None
            and p.sinks is None and p.window_left is None and dv == d
            and not (p.causal and lq != lk and lq * lk > _FLASH_MAX_MASK))


def _flash_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: AttentionParams, out: torch.Tensor,
                    lse: torch.Tensor | None) -> None:
    """One sequence (q [Lq, Hq, D], the last Lq positions of k/v [Lk, Hkv, D], all in q's dtype) on
    torch's own CPU flash kernel, which returns the natural-log LSE too. Only where _flash_applies."""
    lq, hq, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    qt = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
    kt = k.transpose(0, 1).repeat_interleave(g, 0).unsqueeze(0)  # [1, Hq, Lk, D]
    vt = v.transpose(0, 1).repeat_interleave(g, 0).unsqueeze(0)
    mask = None
    if p.causal and lq != lk:  # bottom-right: query i sees keys j <= (Lk - Lq) + i
        seen = torch.arange(lk)[None, :] <= (lk - lq) + torch.arange(lq)[:, None]  # additive, in q's dtype
        mask = torch.zeros(lq, lk, dtype=q.dtype).masked_fill_(~seen, float("-inf"))
    o, l = _flash(qt, kt, vt, 0.0, p.causal and lq == lk, attn_mask=mask, scale=p.scale)
    out.copy_(o[0].transpose(0, 1))
    if lse is not None:
        lse.copy_(l[0].transpose(0, 1))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch,
                     p: AttentionParams, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] -> out [T, Hq, Dv], lse [T, Hq]."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32) if return_lse else None
    cq, ck = batch.cu_seqlens_q_host, batch.cu_seqlens_k_host
    native = [False] * batch.num_seqs
    if native_prefill.applies(q.dtype, q.shape[1], k.shape[1], q.shape[2], v.shape[2]):
        native = native_prefill.eligible([cq[b + 1] - cq[b] for b in range(batch.num_seqs)])
        if any(native):
            native_prefill.dense(q, k, v, batch, p, out, lse, native)
    for b in range(batch.num_seqs):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or native[b]:
            continue
        if k.dtype == v.dtype == q.dtype and _flash_applies(q1 - q0, k1 - k0, q.shape[2], v.shape[2], p):
            _flash_sequence(q[q0:q1], k[k0:k1], v[k0:k1], p, out[q0:q1], None if lse is None else lse[q0:q1])
            continue

        def fetch(c0: int, c1: int, k0: int = k0) -> tuple[torch.Tensor, torch.Tensor]:
            return k[k0 + c0:k0 + c1], v[k0 + c0:k0 + c1]

        _attend_sequence(q[q0:q1], k1 - k0, fetch, KV_CHUNK, p, k.shape[1], out[q0:q1],
                         None if lse is None else lse[q0:q1])
    return out, lse


def paged_attention(q: torch.Tensor, cache: CpuKVStorage, layer: int, plan: Plan, p: AttentionParams,
                    return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [T, Hq, D] over the blocks of ``layer`` -> out [T, Hq, Dv], lse [T, Hq]. An MLA cache (one
    component, the row [c_kv; k_pe]) serves as MQA whose value is the row's first Dv = R channels.
    Decode-shaped and long query runs go to the native kernels when they apply (per sequence)."""
    launch = native_decode.launch(cache, plan, q, p, return_lse)
    if launch is not None:  # every sequence on the native kernel (a decode step): prepared once per plan
        return launch(q, cache, layer)
    bs = cache.block_size
    chunk = max(bs, (KV_CHUNK // bs) * bs)
    out = torch.empty(q.shape[0], q.shape[1], cache.spec.v_head_dim, dtype=q.dtype)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32) if return_lse else None
    native: Sequence[bool] = [False] * plan.num_seqs
    if native_decode.applies(cache, q):
        native = native_decode.eligible(plan, q.shape[1] // cache.num_heads)
        if any(native):
            native_decode.paged_decode(q, cache, layer, plan, p, out, lse, native)
    if all(native):
        return out, lse
    if (cache.spec.kv_dtype == "auto" and not cache.spec.is_mla
            and native_prefill.applies(q.dtype, q.shape[1], cache.num_heads, q.shape[2], cache.dims[1])):
        long_runs = native_prefill.eligible(plan.q_lens())
        if any(long_runs):
            native_prefill.paged(q, cache, layer, plan, p, out, lse, long_runs)
            native = [a or b for a, b in zip(native, long_runs)]
    cq = plan.cu_seqlens_q_host
    fetch_dtype = None if cache.spec.kv_dtype == "auto" else torch.float32
    for b, kv_len in enumerate(plan.seq_lens_host):
        q0, q1 = cq[b], cq[b + 1]
        if q1 == q0 or native[b]:
            continue
        table = plan.block_table_host[b].to(torch.int64)

        def fetch(c0: int, c1: int, table: torch.Tensor = table) -> tuple[torch.Tensor, torch.Tensor | None]:
            # the blocks covering [c0, c1), decoded, then exactly those tokens (never a slot past seq_len);
            # quantized rows decode to fp32 (value x scale, unrounded), which is what the math runs in
            b0, b1 = c0 // bs, -(-c1 // bs)
            comps = cache.fetch(layer, table[b0:b1], c0 - b0 * bs, c1 - b0 * bs, fetch_dtype)
            return comps[0], (comps[1] if len(comps) > 1 else None)  # MLA: one component, no separate v

        o_b, l_b = out[q0:q1], None if lse is None else lse[q0:q1]
        if (cache.spec.kv_dtype == "auto" and not cache.spec.is_mla and cache.spec.torch_dtype == q.dtype
                and _flash_applies(q1 - q0, kv_len, q.shape[2], cache.spec.v_head_dim, p)):
            k_b, v_b = fetch(0, kv_len)  # the whole sequence, for torch's flash kernel
            assert v_b is not None  # not MLA: K and V are separate components
            _flash_sequence(q[q0:q1], k_b, v_b, p, o_b, l_b)
            continue
        _attend_sequence(q[q0:q1], kv_len, fetch, chunk, p, cache.num_heads, o_b, l_b)
    return out, lse


def merge_attention_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partials over disjoint keys: o [T, H, Dv], lse [T, H] fp32."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # both -inf: nothing to merge
    w_a, w_b = torch.exp(lse_a - m_safe), torch.exp(lse_b - m_safe)  # a -inf partial weighs 0
    total = w_a + w_b
    seen = total > 0
    denom = torch.where(seen, total, torch.ones_like(total))
    o = (o_a.float() * (w_a / denom)[..., None] + o_b.float() * (w_b / denom)[..., None]).to(o_a.dtype)
    lse = torch.where(seen, m_safe + torch.log(denom), torch.full_like(m, float("-inf")))
    return o, lse
