"""The float64 reference of hal: the oracle the conformance suite holds every backend to.

Plain torch, float64, ``torch.einsum``; written to be read, not to be fast. It implements
SPEC section 2 word for word:

- layouts are token-major ("NHD"): ``q [T, Hq, D]``, ``k [S, Hkv, D]``, ``v [S, Hkv, Dv]``;
- GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``;
- bottom-right alignment: query ``i`` of a sequence with ``q_len`` queries and ``kv_len`` keys
  sits at absolute position ``p = kv_len - q_len + i``; ``causal`` keeps keys ``j <= p``,
  ``window_left=W`` keeps keys ``j >= p - W`` (independent of ``causal``);
- scores ``s = scale * (q . k)``, then ``softcap * tanh(s / softcap)``, then
  ``- alibi_slopes[h] * |p - j|``;
- ``sinks[h]`` (a logit) joins the softmax denominator and the LSE without a value;
- a query that sees no key gets output 0 and ``lse = -inf`` (``sinks[h]`` with sinks), never NaN.

Every function upcasts its inputs to float64 and returns float64 tensors; ``lse`` is natural-log.
Validation is left to ``hal.validate``: here there are only asserts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "attention_reference",
    "paged_attention_reference",
    "merge_attention_states_reference",
    "visible_keys_reference",
    "mla_attention_reference",
    "rope_inv_freq_reference",
    "rope_reference",
]

IndexLike = torch.Tensor | Sequence[int]

# The score tensor of one chunk of queries holds at most this many float64 elements
# (2**24 = 128 MiB); longer prefills are processed in chunks of query rows.
_MAX_SCORE_ELEMENTS = 1 << 24


def visible_keys_reference(q_len: int, kv_len: int, *, causal: bool, window_left: int | None) -> torch.Tensor:
    """Visibility mask of one sequence: ``mask[i, j]`` is True when query ``i`` sees key ``j``.

    Bottom-right alignment: query ``i`` sits at ``p = kv_len - q_len + i`` (negative when
    ``q_len > kv_len``). Returns bool ``[q_len, kv_len]``.
    """
    assert q_len >= 0 and kv_len >= 0
    assert window_left is None or window_left >= 0
    # absolute position of each query and each key
    p = torch.arange(q_len, dtype=torch.int64)[:, None] + (kv_len - q_len)  # [Lq, 1]
    j = torch.arange(kv_len, dtype=torch.int64)[None, :]  # [1, Lk]
    # start from "every key of the sequence", then apply each condition given
    mask = torch.ones(q_len, kv_len, dtype=torch.bool)  # [Lq, Lk]
    if causal:
        mask &= j <= p
    if window_left is not None:
        mask &= j >= p - window_left
    return mask


def _as_float64_heads(x: torch.Tensor | None, num_heads: int, device: torch.device) -> torch.Tensor | None:
    """``None`` or a per-head vector ``[num_heads]`` in float64 (for ``alibi_slopes`` and ``sinks``)."""
    if x is None:
        return None
    x = torch.as_tensor(x).to(device=device, dtype=torch.float64).reshape(-1)  # [Hq]
    assert x.numel() == num_heads, f"expected {num_heads} per-head values, got {x.numel()}"
    return x


def _attention_chunk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float,
    softcap: float | None,
    alibi_slopes: torch.Tensor | None,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of some query rows of one sequence over all of that sequence's keys.

    q [Lq, Hq, D], k [Lk, Hkv, D], v [Lk, Hkv, Dv] float64; mask bool [Lq, Lk];
    positions int64 [Lq] (absolute position p of each query; key j sits at j);
    alibi_slopes, sinks float64 [Hq] or None. Returns out [Lq, Hq, Dv], lse [Lq, Hq].
    """
    Lq, Hq, _ = q.shape
    Lk, Hkv, Dv = v.shape
    G = Hq // Hkv
    # group query heads by the KV head they read: head h = kv * G + g
    qg = q.reshape(Lq, Hkv, G, -1)  # [Lq, Hkv, G, D]

    # raw scores
    s = scale * torch.einsum("qhgd,khd->hgqk", qg, k)  # [Hkv, G, Lq, Lk]
    # soft-capping
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    # ALiBi bias -slope[h] * |p - j|
    if alibi_slopes is not None:
        distance = (positions[:, None] - torch.arange(Lk, device=q.device)[None, :]).abs()  # [Lq, Lk]
        s = s - alibi_slopes.reshape(Hkv, G, 1, 1) * distance.to(torch.float64)  # [Hkv, G, Lq, Lk]

    # masked keys drop out: -inf here, so an exact 0 weight below
    s = s.masked_fill(~mask, -math.inf)  # [Hkv, G, Lq, Lk]
    # subtract the row maximum (sink logit included) so exp() never overflows
    m = s.amax(dim=-1) if Lk > 0 else q.new_full((Hkv, G, Lq), -math.inf)  # [Hkv, G, Lq]
    if sinks is not None:
        m = torch.maximum(m, sinks.reshape(Hkv, G, 1))
    # rows that see nothing (and have no sink) would give -inf - -inf = NaN: shift by 0 instead
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # [Hkv, G, Lq]
    # unnormalised probabilities; masked keys give exp(-inf - m) = 0 exactly (m is finite)
    e = torch.exp(s - m[..., None])  # [Hkv, G, Lq, Lk]
    # softmax denominator, plus the sink's share
    denom = e.sum(dim=-1)  # [Hkv, G, Lq]
    if sinks is not None:
        denom = denom + torch.exp(sinks.reshape(Hkv, G, 1) - m)
    # natural-log LSE: log(0) = -inf for rows that see nothing
    lse = m + torch.log(denom)  # [Hkv, G, Lq]
    # weighted sum of values; an empty row stays 0 (divide by 1 instead of 0)
    num = torch.einsum("hgqk,khe->hgqe", e, v)  # [Hkv, G, Lq, Dv]
    out = num / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]  # [Hkv, G, Lq, Dv]

    # back to token-major layout
    out = out.permute(2, 0, 1, 3).reshape(Lq, Hq, Dv)  # [Lq, Hq, Dv]
    lse = lse.permute(2, 0, 1).reshape(Lq, Hq)  # [Lq, Hq]
    return out, lse


def _attention_one_sequence_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    window_left: int | None,
    softcap: float | None,
    alibi_slopes: torch.Tensor | None,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence, bottom-right aligned. q [Lq, Hq, D], k [Lk, Hkv, D], v [Lk, Hkv, Dv]
    float64 -> out [Lq, Hq, Dv], lse [Lq, Hq]."""
    Lq, Hq, _ = q.shape
    Lk = k.shape[0]
    # which keys each query sees, and where each query sits
    mask = visible_keys_reference(Lq, Lk, causal=causal, window_left=window_left).to(q.device)  # [Lq, Lk]
    positions = torch.arange(Lq, device=q.device) + (Lk - Lq)  # [Lq]
    # query rows are independent: process them in chunks to bound the score tensor's size
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, Hq * Lk))
    outs, lses = [], []
    for start in range(0, Lq, rows):
        stop = min(Lq, start + rows)
        out, lse = _attention_chunk_reference(
            q[start:stop], k, v, mask[start:stop], positions[start:stop],
            scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        )
        outs.append(out)
        lses.append(lse)
    if not outs:  # no queries
        return q.new_zeros(0, Hq, v.shape[2]), q.new_zeros(0, Hq)
    return torch.cat(outs), torch.cat(lses)


def _as_int_list(x: IndexLike) -> list[int]:
    """A host-side list of ints from a tensor or a sequence."""
    return [int(a) for a in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: IndexLike | None = None,
    cu_seqlens_k: IndexLike | None = None,
    causal: bool = False,
    scale: float | None = None,
    window_left: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (varlen) attention in float64.

    q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] in any float dtype; cu_seqlens_q, cu_seqlens_k [B+1]
    (tensors or lists; both None: one sequence of T queries and S keys); alibi_slopes, sinks [Hq].
    Sequence b's queries are bottom-right aligned against its keys. Returns out float64 [T, Hq, Dv]
    and lse float64 [T, Hq] (natural log).
    """
    assert (cu_seqlens_q is None) == (cu_seqlens_k is None), "give both cu_seqlens or neither"
    # upcast everything to float64
    q, k, v = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)  # [T, Hq, D], [S, Hkv, D], [S, Hkv, Dv]
    T, Hq, D = q.shape
    S, Hkv, Dv = v.shape
    assert k.shape[:2] == (S, Hkv) and k.shape[2] == D and Hq % Hkv == 0
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    alibi = _as_float64_heads(alibi_slopes, Hq, q.device)  # [Hq]
    sink = _as_float64_heads(sinks, Hq, q.device)  # [Hq]
    # sequence boundaries
    cu_q = [0, T] if cu_seqlens_q is None else _as_int_list(cu_seqlens_q)  # [B+1]
    cu_k = [0, S] if cu_seqlens_k is None else _as_int_list(cu_seqlens_k)  # [B+1]
    assert len(cu_q) == len(cu_k) and cu_q[-1] == T and cu_k[-1] == S
    # one sequence at a time
    out = torch.zeros(T, Hq, Dv, dtype=torch.float64, device=q.device)  # [T, Hq, Dv]
    lse = torch.zeros(T, Hq, dtype=torch.float64, device=q.device)  # [T, Hq]
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        out[qs], lse[qs] = _attention_one_sequence_reference(
            q[qs], k[ks], v[ks], causal=causal, scale=scale, window_left=window_left,
            softcap=softcap, alibi_slopes=alibi, sinks=sink,
        )
    return out, lse


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: IndexLike,
    seq_lens: IndexLike,
    block_table: torch.Tensor | Sequence[Sequence[int]],
    *,
    causal: bool = True,
    scale: float | None = None,
    window_left: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged attention in float64: gather each sequence's keys through its block table, then attend densely.

    q [T, Hq, D]; k_cache [num_blocks, block_size, Hkv, D], v_cache [num_blocks, block_size, Hkv, Dv]
    (token-major, already dequantized, any float dtype); cu_seqlens_q [B+1]; seq_lens [B] (KV length
    including this step's tokens); block_table [B, max_blocks]. Only the first seq_lens[b] tokens of
    sequence b are read; unused table entries and slots past seq_lens[b] are never looked at.
    Query i of sequence b sits at p = seq_lens[b] - q_len_b + i. Returns out float64 [T, Hq, Dv] and
    lse float64 [T, Hq].
    """
    block_size = k_cache.shape[1]
    cu_q = _as_int_list(cu_seqlens_q)  # [B+1]
    lens = _as_int_list(seq_lens)  # [B]
    table = [_as_int_list(row) for row in block_table]  # [B][max_blocks]
    assert len(cu_q) == len(lens) + 1 and len(table) == len(lens)
    # build the dense keys and values of each sequence, in order
    ks, vs = [], []
    for b, kv_len in enumerate(lens):
        blocks = torch.tensor(table[b][: -(-kv_len // block_size)], dtype=torch.int64, device=k_cache.device)  # [n_blocks] used entries only
        ks.append(k_cache[blocks].flatten(0, 1)[:kv_len])  # [kv_len, Hkv, D]
        vs.append(v_cache[blocks].flatten(0, 1)[:kv_len])  # [kv_len, Hkv, Dv]
    k = torch.cat(ks) if ks else k_cache[:0].flatten(0, 1)  # [S, Hkv, D]
    v = torch.cat(vs) if vs else v_cache[:0].flatten(0, 1)  # [S, Hkv, Dv]
    cu_k = [0]
    for kv_len in lens:
        cu_k.append(cu_k[-1] + kv_len)  # [B+1]
    # the dense path already aligns queries bottom-right
    return attention_reference(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, scale=scale,
        window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
    )


def merge_attention_states_reference(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attention results over disjoint key sets.

    o_a, o_b [T, H, Dv]; lse_a, lse_b [T, H] (natural log). Returns float64 o [T, H, Dv], lse [T, H].
    A partial with lse -inf contributes nothing (even if its output is garbage); two -inf
    partials give output 0 and lse -inf. Never NaN.
    """
    # upcast to float64
    o_a, o_b = o_a.to(torch.float64), o_b.to(torch.float64)  # [T, H, Dv]
    lse_a, lse_b = lse_a.to(torch.float64), lse_b.to(torch.float64)  # [T, H]
    # shift by the larger LSE (0 when both are -inf) so exp() stays in range
    m = torch.maximum(lse_a, lse_b)  # [T, H]
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    # each partial's share of the total softmax mass
    w_a = torch.exp(lse_a - m)  # [T, H]
    w_b = torch.exp(lse_b - m)  # [T, H]
    total = w_a + w_b  # [T, H]
    # merged LSE: log(exp(lse_a) + exp(lse_b)), -inf when both are empty
    lse = m + torch.log(total)  # [T, H]
    # weighted outputs; a zero weight drops its partial entirely (0 * NaN would not)
    part_a = torch.where(w_a[..., None] > 0, w_a[..., None] * o_a, torch.zeros_like(o_a))  # [T, H, Dv]
    part_b = torch.where(w_b[..., None] > 0, w_b[..., None] * o_b, torch.zeros_like(o_b))  # [T, H, Dv]
    o = (part_a + part_b) / torch.where(total > 0, total, torch.ones_like(total))[..., None]  # [T, H, Dv]
    return o, lse


# ---- MLA (DeepSeek-V2) ----------------------------------------------------------------------------

def mla_attention_reference(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    c_kv_cache: torch.Tensor,
    k_pe_cache: torch.Tensor,
    cu_seqlens_q: IndexLike,
    seq_lens: IndexLike,
    block_table: torch.Tensor | Sequence[Sequence[int]],
    *,
    scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-form MLA over a paged latent cache in float64, as DeepSeek's reference code writes it.

    q_latent [T, H, R] (q_nope with W_UK absorbed), q_rope [T, H, P]; c_kv_cache [num_blocks,
    block_size, R] (normed latents), k_pe_cache [num_blocks, block_size, P] (rotated RoPE keys);
    cu_seqlens_q [B+1], seq_lens [B], block_table [B, max_blocks]. Score of query t, head h, key j:
    ``scale * (q_latent[t, h] . c_kv[j] + q_rope[t, h] . k_pe[j])``; the value of key j is c_kv[j].
    Bottom-right aligned as paged attention. Returns out float64 [T, H, R], lse float64 [T, H].
    """
    block_size = c_kv_cache.shape[1]
    cu_q = _as_int_list(cu_seqlens_q)  # [B+1]
    lens = _as_int_list(seq_lens)  # [B]
    table = [_as_int_list(row) for row in block_table]  # [B][max_blocks]
    assert len(cu_q) == len(lens) + 1 and len(table) == len(lens)
    ql, qr = q_latent.to(torch.float64), q_rope.to(torch.float64)  # [T, H, R], [T, H, P]
    T, H, R = ql.shape
    out = torch.zeros(T, H, R, dtype=torch.float64, device=ql.device)  # [T, H, R]
    lse = torch.full((T, H), -math.inf, dtype=torch.float64, device=ql.device)  # [T, H]
    for b, kv_len in enumerate(lens):
        q0, q1 = cu_q[b], cu_q[b + 1]
        if q1 == q0:
            continue
        # this sequence's latents and RoPE keys, gathered through its block table
        blocks = torch.tensor(table[b][: -(-kv_len // block_size)], dtype=torch.int64, device=c_kv_cache.device)
        c = c_kv_cache[blocks].flatten(0, 1)[:kv_len].to(torch.float64)  # [S, R]
        k_pe = k_pe_cache[blocks].flatten(0, 1)[:kv_len].to(torch.float64)  # [S, P]
        # scores: latent part plus decoupled RoPE part, one shared key for every head
        s = scale * (torch.einsum("qhr,kr->hqk", ql[q0:q1], c)
                     + torch.einsum("qhp,kp->hqk", qr[q0:q1], k_pe))  # [H, Lq, S]
        mask = visible_keys_reference(q1 - q0, kv_len, causal=causal, window_left=None).to(s.device)  # [Lq, S]
        s = s.masked_fill(~mask, -math.inf)
        # softmax over the keys (a row that sees nothing keeps output 0 and lse -inf)
        m = s.amax(dim=-1) if kv_len > 0 else s.new_full((H, q1 - q0), -math.inf)  # [H, Lq]
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e = torch.exp(s - m[..., None])  # [H, Lq, S]
        denom = e.sum(dim=-1)  # [H, Lq]
        lse[q0:q1] = (m + torch.log(denom)).T  # [Lq, H]
        # the value is the latent itself: out is a weighted sum of c_kv rows
        num = torch.einsum("hqk,kr->qhr", e, c)  # [Lq, H, R]
        out[q0:q1] = num / torch.where(denom > 0, denom, torch.ones_like(denom)).T[..., None]
    return out, lse


# ---- RoPE ------------------------------------------------------------------------------------------

def rope_inv_freq_reference(spec: object) -> torch.Tensor:
    """The frequency of each rotated pair of a ``hal.RopeSpec``, written pair by pair from the papers.

    Plain Python floats (double precision), one formula per scaling; returns float64 [dim/2].
    """
    d, b = spec.dim, spec.theta  # type: ignore[attr-defined]
    s, kind = spec.factor, spec.scaling  # type: ignore[attr-defined]
    omp = spec.original_max_position  # type: ignore[attr-defined]
    if kind == "ntk":  # static NTK-aware: stretch the base so the lowest frequency is interpolated by s
        b = b * s ** (d / (d - 2))
    out = []
    for i in range(d // 2):
        theta_i = b ** (-2 * i / d)  # RoFormer: pair i turns by position * theta_i
        if kind == "linear":  # position interpolation: every frequency divided by s
            theta_i = theta_i / s
        elif kind == "yarn":
            # YaRN: pairs that turn more than beta_fast times in omp positions keep theta_i, those that
            # turn fewer than beta_slow times are divided by s, a linear ramp in between
            def correction_dim(rotations: float) -> float:
                return d * math.log(omp / (rotations * 2 * math.pi)) / (2 * math.log(b))
            low = max(math.floor(correction_dim(spec.beta_fast)), 0)  # type: ignore[attr-defined]
            high = min(math.ceil(correction_dim(spec.beta_slow)), d - 1)  # type: ignore[attr-defined]
            ramp = min(1.0, max(0.0, (i - low) / ((high - low) or 0.001)))  # 0: keep, 1: divide by s
            theta_i = theta_i / s * ramp + theta_i * (1 - ramp)
        elif kind == "llama3":
            wavelen = 2 * math.pi / theta_i
            lo, hi = spec.low_freq_factor, spec.high_freq_factor  # type: ignore[attr-defined]
            if wavelen < omp / hi:  # high frequencies: unchanged
                pass
            elif wavelen > omp / lo:  # low frequencies: divided by the factor
                theta_i = theta_i / s
            else:  # in between: blend the two
                smooth = (omp / wavelen - lo) / (hi - lo)
                theta_i = (1 - smooth) * theta_i / s + smooth * theta_i
        out.append(theta_i)
    return torch.tensor(out, dtype=torch.float64)


def rope_reference(
    x: torch.Tensor,
    positions: IndexLike,
    inv_freq: torch.Tensor,
    *,
    style: str,
    attention_factor: float = 1.0,
) -> torch.Tensor:
    """RoPE as complex multiplication, in float64.

    x [T, H, D]; positions [T]; inv_freq [dim/2] (dim <= D: the first dim channels rotate, the rest
    pass through); style "neox" (pair i is channels i, i + dim/2) or "gptj" (channels 2i, 2i + 1).
    Each pair, read as a complex number, is multiplied by ``attention_factor * exp(1j * p * inv_freq[i])``.
    Returns float64 [T, H, D].
    """
    x = x.to(torch.float64)  # [T, H, D]
    half = inv_freq.numel()
    dim = 2 * half
    pos = torch.tensor(_as_int_list(positions), dtype=torch.float64, device=x.device)  # [T]
    # the rotation of each (token, pair), as a unit complex number
    angle = pos[:, None] * inv_freq.to(torch.float64).to(x.device)[None, :]  # [T, dim/2]
    turn = attention_factor * torch.polar(torch.ones_like(angle), angle)[:, None, :]  # [T, 1, dim/2]
    # each pair as (real, imag)
    if style == "neox":
        real, imag = x[..., :half], x[..., half:dim]  # [T, H, dim/2] each
    else:
        assert style == "gptj"
        real, imag = x[..., 0:dim:2], x[..., 1:dim:2]
    z = torch.complex(real, imag) * turn  # [T, H, dim/2]
    out = x.clone()
    if style == "neox":
        out[..., :half], out[..., half:dim] = z.real, z.imag
    else:
        out[..., 0:dim:2], out[..., 1:dim:2] = z.real, z.imag
    return out
