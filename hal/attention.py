"""The public attention ops: validate once, then hand the call to a backend.

Semantics are SPEC section 2: token-major tensors, bottom-right aligned causal masks, optional
sliding window, soft-cap, ALiBi and sinks, fp32 natural-log LSE. Nothing here touches tensor
data on a device: shape, dtype and device checks only (data-dependent checks live in ``plan``
and ``KVCache.write``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hal import validate as V
from hal.arrays import array_kind, from_torch, to_torch
from hal.backend import AttentionParams, Backend
from hal.errors import InvalidInput, Unsupported
from hal.kv_cache import KVCache
from hal.plan import Plan, varlen_batch

__all__ = ["attention", "paged_attention", "mla_attention", "merge_attention_states"]


def _head_vector(op: str, name: str, x: Any, hq: int) -> torch.Tensor | None:
    if x is None:
        return None
    t = to_torch(op, name, x)
    if t.dim() != 1 or t.shape[0] != hq or t.dtype != torch.float32:
        raise InvalidInput(f"[{op}] {name} must be fp32 [Hq] = [{hq}], got "
                           f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}")
    return t


def _params(op: str, hq: int, d: int, *, causal: Any, scale: Any, window_left: Any, softcap: Any,
            alibi_slopes: Any, sinks: Any, return_lse: Any) -> tuple[AttentionParams, list[str]]:
    """Resolve the scalar options; return them and the features they need."""
    if not isinstance(causal, bool):
        raise InvalidInput(f"[{op}] causal must be True or False, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise InvalidInput(f"[{op}] return_lse must be True or False, got {return_lse!r}")
    scale_ = V.check_scalar(op, "scale", scale)
    window = V.check_int(op, "window_left", window_left, lo=0, allow_none=True)
    cap = V.check_scalar(op, "softcap", softcap, positive=True)
    params = AttentionParams(
        scale=1.0 / math.sqrt(d) if scale_ is None else scale_, causal=causal, window_left=window,
        softcap=cap, alibi_slopes=_head_vector(op, "alibi_slopes", alibi_slopes, hq),
        sinks=_head_vector(op, "sinks", sinks, hq))
    features = ["causal" if causal else "non_causal"]
    features += [f for f, on in (("window", window is not None), ("softcap", cap is not None),
                                 ("alibi", params.alibi_slopes is not None),
                                 ("sinks", params.sinks is not None), ("lse", return_lse)) if on]
    return params, features


def _require(op: str, backend: Backend, **request: Any) -> None:
    reasons = backend.capabilities().why_not(**request)
    if reasons:
        raise Unsupported(f"[{op}] backend {backend.name!r} does not declare this call", reasons)


def _heads(op: str, q: torch.Tensor, q_name: str, hkv: int, kv_name: str) -> None:
    hq = q.shape[1]
    if hq == 0 or hkv == 0 or hq % hkv:
        raise InvalidInput(f"[{op}] {q_name} has {hq} heads and {kv_name} has {hkv}: the query heads must be "
                           f"a positive multiple of the KV heads (MHA, GQA, MQA)")


def attention(q: Any, k: Any, v: Any, *, cu_seqlens_q: Any = None, cu_seqlens_k: Any = None,
              causal: bool = False, scale: float | None = None, window_left: int | None = None,
              softcap: float | None = None, alibi_slopes: Any = None, sinks: Any = None,
              return_lse: bool = False, backend: str | Backend | None = None) -> Any:
    """Attention over contiguous (varlen) tensors.

    q ``[T, Hq, D]``, k ``[S, Hkv, D]``, v ``[S, Hkv, Dv]``; ``cu_seqlens_q``/``cu_seqlens_k`` int32
    ``[B+1]`` split them into B sequences (both None: one sequence). Returns out ``[T, Hq, Dv]`` in
    q's dtype, and with ``return_lse`` also lse ``[T, Hq]`` fp32. A query whose sequence has fewer
    keys than queries is aligned bottom-right (SPEC section 2).
    """
    op = "hal.attention"
    like = array_kind(q)
    q, k, v = (to_torch(op, n, x) for n, x in (("q", q), ("k", k), ("v", v)))
    be = V.check_backend(op, backend)
    V.check_ndim(op, "q", q, 3, "[T, Hq, D] (token-major)")
    V.check_ndim(op, "k", k, 3, "[S, Hkv, D] (token-major)")
    V.check_ndim(op, "v", v, 3, "[S, Hkv, Dv] (token-major)")
    dt = V.check_float(op, "q", q)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InvalidInput(f"[{op}] {name} is {str(t.dtype).replace('torch.', '')} but q is "
                               f"{str(q.dtype).replace('torch.', '')}: q, k and v must share one dtype")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
        raise InvalidInput(f"[{op}] k {list(k.shape)} and v {list(v.shape)} must agree on tokens and heads")
    if q.shape[2] != k.shape[2]:
        raise InvalidInput(f"[{op}] q has head_dim {q.shape[2]} but k has {k.shape[2]}")
    _heads(op, q, "q", k.shape[1], "k")
    params, features = _params(op, q.shape[1], q.shape[2], causal=causal, scale=scale,
                               window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes,
                               sinks=sinks, return_lse=return_lse)
    device = V.check_devices(op, be, {"q": q, "k": k, "v": v, "alibi_slopes": params.alibi_slopes,
                                      "sinks": params.sinks, "cu_seqlens_q": None, "cu_seqlens_k": None})
    batch = varlen_batch(op, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], device)
    if q.shape[1] != k.shape[1]:
        features.append("gqa")
    _require(op, be, dtype=dt, head_dim=q.shape[2], v_head_dim=v.shape[2], features=["dense", *features])
    out, lse = be.attention(q, k, v, batch, params, return_lse)
    if return_lse:
        return from_torch(out, like), from_torch(lse, like)
    return from_torch(out, like)


# Per-call cost. The checks of q's heads, the scalar options, devices and the backend's capabilities
# depend on nothing but the cache, q's shape, dtype and device, and the options: a call that matches
# one the cache has already passed skips them (the per-layer calls of a decode step all match). Keys
# hold each option's type beside its value (True == 1 == 1.0 as dict keys) and only plain Python
# scalars (mla_attention also keys q_rope's shape, dtype and device); calls with alibi_slopes or sinks
# tensors always run every check.
_KEYABLE = frozenset((type(None), bool, int, float, torch.Size, torch.dtype, torch.device))
_MAX_CHECKED = 64  # remembered call kinds per cache; more forget them all and start again


def _call_key(q: torch.Tensor, alibi_slopes: Any, sinks: Any, *options: Any) -> tuple[Any, ...] | None:
    """The key of a call: q's shape, dtype and device, and ``options`` (plain scalars, or the shape,
    dtype and device of a second query tensor), or None when the call must not be remembered."""
    if alibi_slopes is not None or sinks is not None:
        return None
    types = tuple(map(type, options))
    if not _KEYABLE.issuperset(types):
        return None
    return q.shape, q.dtype, q.device, options, types


def _remember(memo: dict[Any, Any], key: tuple[Any, ...] | None, value: Any) -> None:
    if key is None:
        return
    if len(memo) >= _MAX_CHECKED:
        memo.clear()
    memo[key] = value


def _check_plan(op: str, plan: Any, cache: KVCache) -> Plan:
    if not isinstance(plan, Plan):
        raise InvalidInput(f"[{op}] plan must come from hal.plan(...), got {type(plan).__name__}")
    if (plan.backend_name, plan.block_size, plan.num_blocks) != (cache.backend.name, cache.block_size,
                                                                 cache.num_blocks):
        raise InvalidInput(f"[{op}] plan was made for backend {plan.backend_name!r} with {plan.num_blocks} "
                           f"blocks of {plan.block_size}, but the cache is {cache.backend.name!r} with "
                           f"{cache.num_blocks} blocks of {cache.block_size}: call hal.plan with this cache")
    return plan


def paged_attention(q: Any, cache: KVCache, layer: int, plan: Plan, *, causal: bool = True,
                    scale: float | None = None, window_left: int | None = None,
                    softcap: float | None = None, alibi_slopes: Any = None, sinks: Any = None,
                    return_lse: bool = False) -> Any:
    """Attention of q ``[T, Hq, D]`` over ``cache`` layer ``layer`` through ``plan``.

    One call serves a batch mixing prefill chunks, single-token and multi-token decodes: the
    queries of sequence b are its last ``q_len_b`` tokens. Returns out ``[T, Hq, Dv]`` (q's dtype)
    and, with ``return_lse``, lse ``[T, Hq]`` fp32.
    """
    op = "hal.paged_attention"
    if not isinstance(cache, KVCache) or cache.spec.is_mla:
        raise InvalidInput(f"[{op}] cache must be a hal.KVCache of a hal.KVCacheSpec (for MLA caches use "
                           f"hal.mla_attention), got {cache!r}")
    like = array_kind(q)
    q = to_torch(op, "q", q)
    p = _check_plan(op, plan, cache)
    layer = cache._check_layer(op, layer)
    spec = cache.spec
    V.check_ndim(op, "q", q, 3, "[T, Hq, D] (token-major)")
    if q.shape[0] != p.num_tokens:
        raise InvalidInput(f"[{op}] q has {q.shape[0]} tokens but the plan's cu_seqlens_q[-1]={p.num_tokens}")
    if q.shape[2] != spec.head_dim:
        raise InvalidInput(f"[{op}] q has head_dim {q.shape[2]} but the cache holds keys of {spec.head_dim}")
    if q.dtype != spec.torch_dtype:
        raise InvalidInput(f"[{op}] q is {str(q.dtype).replace('torch.', '')} but the cache's model dtype is "
                           f"{spec.dtype}")
    key = _call_key(q, alibi_slopes, sinks, causal, scale, window_left, softcap, return_lse)
    params = cache._checked.get(key) if key is not None else None
    if params is None:
        _heads(op, q, "q", spec.num_kv_heads, "the cache")
        params, features = _params(op, q.shape[1], q.shape[2], causal=causal, scale=scale,
                                   window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes,
                                   sinks=sinks, return_lse=return_lse)
        V.check_devices(op, cache.backend, {"q": q, "alibi_slopes": params.alibi_slopes, "sinks": params.sinks})
        if q.device != cache.device:
            raise InvalidInput(f"[{op}] q is on {q.device} but the cache is on {cache.device}")
        if q.shape[1] != spec.num_kv_heads:
            features.append("gqa")
        _require(op, cache.backend, dtype=spec.dtype, kv_dtype=spec.kv_dtype, head_dim=spec.head_dim,
                 v_head_dim=spec.v_head_dim, block_size=spec.block_size, features=["paged", *features])
        _remember(cache._checked, key, params)
    out, lse = cache.backend.paged_attention(q, cache.storage, layer, p, params, return_lse)
    if return_lse:
        return from_torch(out, like), from_torch(lse, like)
    return from_torch(out, like)


def mla_attention(q_latent: Any, q_rope: Any, cache: KVCache, layer: int, plan: Plan, *, scale: float,
                  causal: bool = True, return_lse: bool = False) -> Any:
    """Absorbed-form MLA (DeepSeek-V2) over a latent cache.

    q_latent ``[T, H, R]`` (queries with W_UK absorbed), q_rope ``[T, H, P]``; scores are
    ``scale * (q_latent . c_kv + q_rope . k_pe)``; the output is the attention-weighted latent
    ``[T, H, R]`` (apply W_UV afterwards), with lse ``[T, H]`` fp32 when asked.
    """
    op = "hal.mla_attention"
    if not isinstance(cache, KVCache) or not cache.spec.is_mla:
        raise InvalidInput(f"[{op}] cache must be a hal.KVCache of a hal.MLACacheSpec, got {cache!r}")
    like = array_kind(q_latent)
    ql = to_torch(op, "q_latent", q_latent)
    qr = to_torch(op, "q_rope", q_rope)
    p = _check_plan(op, plan, cache)
    layer = cache._check_layer(op, layer)
    spec = cache.spec
    V.check_ndim(op, "q_latent", ql, 3, "[T, H, kv_lora_rank]")
    V.check_ndim(op, "q_rope", qr, 3, "[T, H, rope_dim]")
    if ql.shape[0] != p.num_tokens or qr.shape[0] != p.num_tokens:
        raise InvalidInput(f"[{op}] q_latent has {ql.shape[0]} and q_rope {qr.shape[0]} tokens but the plan has "
                           f"{p.num_tokens}")
    key = _call_key(ql, None, None, qr.shape, qr.dtype, qr.device, causal, scale, return_lse)
    scale_ = cache._checked.get(key) if key is not None else None
    if scale_ is None:
        if ql.shape[1] != qr.shape[1] or ql.shape[1] == 0:
            raise InvalidInput(f"[{op}] q_latent has {ql.shape[1]} heads and q_rope {qr.shape[1]}: they must agree")
        if ql.shape[2] != spec.kv_lora_rank or qr.shape[2] != spec.rope_dim:
            raise InvalidInput(f"[{op}] q_latent must be [T, H, {spec.kv_lora_rank}] and q_rope "
                               f"[T, H, {spec.rope_dim}], got {list(ql.shape)} and {list(qr.shape)}")
        for name, t in (("q_latent", ql), ("q_rope", qr)):
            if t.dtype != spec.torch_dtype:
                raise InvalidInput(f"[{op}] {name} is {str(t.dtype).replace('torch.', '')} but the cache's model "
                                   f"dtype is {spec.dtype}")
        if not isinstance(causal, bool) or not isinstance(return_lse, bool):
            raise InvalidInput(f"[{op}] causal and return_lse must be True or False")
        scale_ = V.check_scalar(op, "scale", scale, allow_none=False)
        V.check_devices(op, cache.backend, {"q_latent": ql, "q_rope": qr})
        if ql.device != cache.device:
            raise InvalidInput(f"[{op}] q_latent is on {ql.device} but the cache is on {cache.device}")
        features = ["mla", "causal" if causal else "non_causal"] + (["lse"] if return_lse else [])
        _require(op, cache.backend, dtype=spec.dtype, kv_dtype=spec.kv_dtype, block_size=spec.block_size,
                 features=features)
        _remember(cache._checked, key, scale_)
    out, lse = cache.backend.mla_attention(ql, qr, cache.storage, layer, p, scale_, causal, return_lse)
    if return_lse:
        return from_torch(out, like), from_torch(lse, like)
    return from_torch(out, like)


def merge_attention_states(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any, *,
                           backend: str | Backend | None = None) -> Any:
    """Combine two partial attention results over disjoint key sets, exactly.

    o ``[T, H, Dv]`` (one dtype), lse ``[T, H]`` fp32 natural log. Returns ``(o, lse)``; a ``-inf``
    partial contributes nothing and two ``-inf`` partials give output 0 and ``-inf``.
    """
    op = "hal.merge_attention_states"
    like = array_kind(o_a)
    ts = {n: to_torch(op, n, x) for n, x in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b))}
    be = V.check_backend(op, backend)
    V.check_ndim(op, "o_a", ts["o_a"], 3, "[T, H, Dv]")
    dt = V.check_float(op, "o_a", ts["o_a"])
    if ts["o_b"].shape != ts["o_a"].shape or ts["o_b"].dtype != ts["o_a"].dtype:
        raise InvalidInput(f"[{op}] o_b {list(ts['o_b'].shape)} {ts['o_b'].dtype} must match o_a "
                           f"{list(ts['o_a'].shape)} {ts['o_a'].dtype}")
    want = list(ts["o_a"].shape[:2])
    for name in ("lse_a", "lse_b"):
        t = ts[name]
        if list(t.shape) != want or t.dtype != torch.float32:
            raise InvalidInput(f"[{op}] {name} must be fp32 [T, H] = {want}, got "
                               f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}")
    V.check_devices(op, be, ts)
    _require(op, be, dtype=dt, features=["merge"])
    o, lse = be.merge_attention_states(ts["o_a"], ts["lse_a"], ts["o_b"], ts["lse_b"])
    return from_torch(o, like), from_torch(lse, like)
