"""The two oracles every output is compared with.

- golden: ``hal.reference`` in float64 on the dtype-rounded inputs;
- same-dtype reference: the numerics of a plain low-precision kernel (scores from the dtype's
  values accumulated in fp32, fp32 softmax, probabilities rounded to the dtype before P.V, fp32
  accumulation, output rounded to the dtype). Its distance from golden is what the dtype costs;
  tolerances are multiples of it (see ``tolerances.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hal.reference import attention_reference, visible_keys_reference

__all__ = ["golden_attention", "same_dtype_attention"]


def golden_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Sequence[int],
                     cu_k: Sequence[int], **opts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 out [T, Hq, Dv], lse [T, Hq]."""
    return attention_reference(q, k, v, cu_seqlens_q=list(cu_q), cu_seqlens_k=list(cu_k), **opts)


def same_dtype_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Sequence[int],
                         cu_k: Sequence[int], *, causal: bool = False, scale: float | None = None,
                         window_left: int | None = None, softcap: float | None = None,
                         alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """out [T, Hq, Dv] in q's dtype, lse [T, Hq] fp32, with a plain low-precision kernel's rounding."""
    dt = q.dtype
    hq, d = q.shape[1], q.shape[2]
    g = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(q.shape[0], hq, v.shape[2], dtype=dt)
    lse = torch.full((q.shape[0], hq), float("-inf"))
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk == 0:  # nothing to see: output 0, lse -inf (or the sink)
            if sinks is not None:
                lse[q0:q1] = sinks.float()[None, :]
            continue
        qs = q[q0:q1].float()  # [Lq, Hq, D]
        ks = k[k0:k1].float().repeat_interleave(g, 1)  # [Lk, Hq, D]
        vs = v[k0:k1].repeat_interleave(g, 1)  # [Lk, Hq, Dv], the dtype
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale  # [Hq, Lq, Lk] fp32
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        pos = torch.arange(lq)[:, None] + (lk - lq)
        if alibi_slopes is not None:
            s = s - alibi_slopes.float()[:, None, None] * (pos - torch.arange(lk)[None, :]).abs()
        s = s.masked_fill(~visible_keys_reference(lq, lk, causal=causal, window_left=window_left), float("-inf"))
        if sinks is not None:
            s = torch.cat([s, sinks.float()[:, None, None].expand(hq, lq, 1)], dim=-1)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        den = e.sum(-1, keepdim=True)
        p = torch.where(den > 0, e / den.clamp_min(1e-38), torch.zeros_like(e))[..., :lk]  # drop the sink column
        o = torch.einsum("hqk,khd->qhd", p.to(dt).float(), vs.float())  # P rounded, fp32 accumulation
        out[q0:q1] = o.to(dt)
        lse[q0:q1] = torch.where(den[..., 0] > 0, m[..., 0] + torch.log(den[..., 0]),
                                 torch.full_like(m[..., 0], float("-inf"))).T
    return out, lse
