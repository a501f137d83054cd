"""Family ``quant``: the KV-cache formats of ``hal.kv_formats`` (SPEC section 3), one set of cases per
``kv_dtype``. Each case requires its ``kv_dtype``, so a backend skips undeclared formats with the reason.

- roundtrip: write then read returns every element within ``kv_formats.error_bound`` ("auto":
  bit-exact): head dims 80 and 48 (int4's last group of 16), all-zero tokens, tiny and large
  values, an outlier channel; fp8 scales from each layer's first write (``kv_formats.fp8_scales``),
  frozen for the second. An MLA cache (one 576-value row per token) when ``mla`` is declared.
- saturation: a second write 10x larger than the first reads back finite; fp8 (scales frozen at the
  first write) saturates to exactly ``+-fmax * scale``; integer formats scale per token, and values
  beyond ``qmax * 65504`` saturate; fp16 values near 65504 read back finite.
- attention: paged attention on a quantized cache (Llama-3-8B, the mixed batch, permuted pages)
  against the float64 golden computed on the exact values the cache holds (``cache.read(...,
  dtype="fp64")``: stored value x scale, unrounded), at the tolerance of a same-dtype reference that
  reads the cache back in the model dtype. A kernel may dequantize into the model dtype (that
  reference's rounding) or keep the stored values exact and apply the scales to scores and weights
  (FlashInfer's way, and more accurate); a dequantization bug inside a kernel fails either way. Quantized writes reject NaN, so unused slots are
  poisoned with +-1e4 instead (fp8: saturated to +-fmax * scale, about the data's absmax): a read past
  ``seq_lens`` still blows the result. fp8 scales are calibrated (absmax / fmax per KV head of the
  batch, given at creation). Reported, not gated: the output's max error against the golden on the
  *unquantized* K/V, and how often each query row's most probable key (argmax of q.k) is the same
  with quantized keys as with the originals.
- block-sizes (full): every declared block size and dtype on a tiny batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from hal import kv_formats
from hal.backend import Backend
from hal.conformance.case import Case, CheckFailed, requires_for
from hal.conformance.oracles import golden_attention, same_dtype_attention
from hal.conformance.runner import Reported
from hal.conformance.scenarios import BATCHES, MODELS, Batch, Shape, generator, randn
from hal.conformance.tolerances import Comparison, compare
from hal.dtypes import DTYPES, KV_DTYPES
from hal.reference import paged_attention_reference, visible_keys_reference

FORMATS = KV_DTYPES  # "auto" first: the baseline row of the reported table
FP8 = ("fp8_e4m3", "fp8_e5m2")
DTYPES_ALL = ("fp32", "fp16", "bf16")
SENTINEL = 1e4  # what unused slots of a quantized cache hold (NaN cannot be written)
_LLAMA = next(s for s in MODELS if s.name == "llama-3-8b")
_SMALL = Shape("small", 4, 2, 64, 64)
_TINY = Batch("tiny", ((1, 9), (3, 3), (2, 20)))


# ---- element-wise checks ----------------------------------------------------------------------

def _within(what: str, kv_dtype: str, x: torch.Tensor, got: torch.Tensor,
            scale: torch.Tensor | None = None) -> Comparison:
    """Every element of ``got`` (read back) within ``error_bound`` of ``x`` (written); saturated
    elements equal to their saturated value. The worst |got - x| / bound goes into the description
    (rounding reaches its bound, so it is close to 1 by design)."""
    got = got.cpu()
    if got.shape != x.shape or got.dtype != x.dtype:
        raise CheckFailed(f"{what}: read {got.dtype} {list(got.shape)}, wrote {x.dtype} {list(x.shape)}")
    if not bool(torch.isfinite(got).all()):
        raise CheckFailed(f"{what}: read back NaN/Inf from finite values")
    if kv_dtype == "auto":
        if not torch.equal(got, x):
            raise CheckFailed(f"{what}: 'auto' must read back bit-exact")
        return Comparison(what + " (exact)", 0.0, 0.0, 0.0)
    bound = kv_formats.error_bound(kv_dtype, x, scale)
    sat, sat_value = kv_formats.saturation(kv_dtype, x, scale)
    err = (got.double() - x.double()).abs()
    if bool(sat.any()) and not torch.equal(got[sat], sat_value[sat]):
        i = int((sat & (got != sat_value)).flatten().nonzero()[0, 0])
        raise CheckFailed(f"{what}: element {i} = {float(x.flatten()[i]):.6g} saturates and should read "
                          f"{float(sat_value.flatten()[i]):.6g}, read {float(got.flatten()[i]):.6g}")
    ratio = torch.where(sat, torch.zeros_like(err), err / bound)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if worst > 1.0:
        i = int(ratio.flatten().argmax())
        raise CheckFailed(f"{what}: element {i} = {float(x.flatten()[i]):.6g} read back as "
                          f"{float(got.flatten()[i]):.6g}, error {float(err.flatten()[i]):.3g} > its "
                          f"{kv_dtype} bound {float(bound.flatten()[i]):.3g}")
    # passed element-wise: an exact-style comparison, so the matrix's ratio speaks of attention only
    return Comparison(f"{what} within error_bound (worst element at {worst:.3f} of its bound)", 0.0, 0.0, 0.0)


def _values(gen: torch.Generator, n: int, heads: int, dim: int, dtype: str) -> torch.Tensor:
    """Unit-normal tokens [n, heads, dim] with every 4th token scaled by 0, 1e-6, 1 or 100 (in turn)
    and one outlier channel (x 30) in token 2."""
    x = torch.randn(n, heads, dim, generator=gen)
    mult = torch.tensor([0.0, 1e-6, 1.0, 100.0]).repeat((n + 3) // 4)[:n]
    x = x * mult[:, None, None]
    if n > 2:
        x[2, :, dim // 3] *= 30.0
    return x.to(DTYPES[dtype])


def _tokens(cache: Any, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``cache.read`` returns for ``slots`` (every block read, then the slots picked): [n, ...] each."""
    a, b = cache.read(layer, list(range(cache.num_blocks)))
    return a.flatten(0, 1)[slots].cpu(), b.flatten(0, 1)[slots].cpu()


def _fp8_scale(kv_dtype: str, x: torch.Tensor) -> torch.Tensor | None:
    """The scale ``[H, 1]`` the documented rule takes from a first write ``x [N, H, dim]`` (fp8 only)."""
    return kv_formats.fp8_scales(kv_dtype, x)[:, None] if kv_dtype in FP8 else None


# ---- roundtrip ----------------------------------------------------------------------------------

def _roundtrip(name: str, kv_dtype: str, dtype: str, backend: Backend) -> list[Comparison]:
    import hal

    gen = generator(name)
    hkv, d, dv, bs, nb = 2, 80, 48, 16, 5
    cache = hal.KVCache(hal.KVCacheSpec(2, hkv, d, v_head_dim=dv, block_size=bs, dtype=dtype,
                                        kv_dtype=kv_dtype), nb, backend=backend)
    dev = cache.device
    n = 56
    k, v = _values(gen, n, hkv, d, dtype), _values(gen, n, hkv, dv, dtype)
    slots = torch.randperm(nb * bs, generator=gen)[:n]
    comps = []
    # layer 0: one write (fp8 scales from all of it); layer 1: two writes, scales from the first
    for layer, parts in ((0, [slice(0, n)]), (1, [slice(0, 20), slice(20, n)])):
        for p in parts:
            cache.write(layer, k[p].to(dev), v[p].to(dev), slots[p].to(dev))
        first = parts[0]
        ks, vs = _fp8_scale(kv_dtype, k[first]), _fp8_scale(kv_dtype, v[first])
        got_k, got_v = _tokens(cache, layer, slots)
        comps.append(_within(f"layer {layer} k", kv_dtype, k, got_k, ks))
        comps.append(_within(f"layer {layer} v", kv_dtype, v, got_v, vs))
    return comps


def _roundtrip_mla(name: str, kv_dtype: str, dtype: str, backend: Backend) -> list[Comparison]:
    """An MLA row is c_kv ++ k_pe (576 values, one quantization row; int4: 18 groups)."""
    import hal

    gen = generator(name)
    spec = hal.MLACacheSpec(1, kv_lora_rank=512, rope_dim=64, block_size=16, dtype=dtype, kv_dtype=kv_dtype)
    cache = hal.KVCache(spec, 3, backend=backend)
    n = 40
    row = _values(gen, n, 1, 576, dtype)[:, 0]  # [n, 576]
    slots = torch.randperm(48, generator=gen)[:n]
    cache.write(0, row[:, :512].contiguous().to(cache.device), row[:, 512:].contiguous().to(cache.device),
                slots.to(cache.device))
    c_kv, k_pe = _tokens(cache, 0, slots)
    scale = _fp8_scale(kv_dtype, row[:, None])
    return [_within("c_kv ++ k_pe", kv_dtype, row[:, None], torch.cat([c_kv, k_pe], -1)[:, None], scale)]


# ---- saturation ---------------------------------------------------------------------------------

def _saturation(name: str, kv_dtype: str, dtype: str, backend: Backend) -> list[Comparison]:
    import hal

    gen = generator(name)
    hkv, d, bs, nb = 2, 64, 16, 4
    cache = hal.KVCache(hal.KVCacheSpec(1, hkv, d, block_size=bs, dtype=dtype, kv_dtype=kv_dtype), nb,
                        backend=backend)
    dev = cache.device
    first = randn(gen, 16, hkv, d, dtype=dtype)
    later = randn(gen, 16, hkv, d, dtype=dtype, scale=10.0)  # 10x larger: beyond fp8's frozen range
    big = torch.finfo(DTYPES[dtype]).max if dtype == "fp16" else 1e30  # int: scale clamped to 65504
    huge = (torch.randn(16, hkv, d, generator=gen).sign() * big).to(DTYPES[dtype])
    huge[:, :, ::2] = randn(gen, 16, hkv, d // 2, dtype=dtype)
    slots = torch.randperm(nb * bs, generator=gen)
    comps = []
    k_scale, v_scale = _fp8_scale(kv_dtype, first), _fp8_scale(kv_dtype, first.flip(0))
    for i, x in enumerate((first, later, huge)):
        s = slots[16 * i:16 * (i + 1)]
        cache.write(0, x.to(dev), x.flip(0).to(dev), s.to(dev))
        got_k, got_v = _tokens(cache, 0, s)
        what = ("first write", "10x write", "huge write")[i]
        comps.append(_within(f"{what} k", kv_dtype, x, got_k, k_scale))
        comps.append(_within(f"{what} v", kv_dtype, x.flip(0), got_v, v_scale))
        if kv_dtype in FP8 and i == 1:
            sat, _ = kv_formats.saturation(kv_dtype, x, k_scale)
            if not bool(sat.any()):
                raise CheckFailed("the 10x write should saturate against the first write's fp8 scale")
    return comps


# ---- attention on a quantized cache ---------------------------------------------------------------

def _poison_cache(cache: Any, num_layers: int) -> None:
    """Fill every slot of every layer with a loud value: NaN for "auto", +-SENTINEL otherwise."""
    spec = cache.spec
    (a, b) = spec.shapes()
    n, dev, dt = cache.num_slots, cache.device, spec.torch_dtype
    if spec.kv_dtype == "auto":
        fill_a = torch.full((n, *a), float("nan"), dtype=dt)
        fill_b = torch.full((n, *b), float("nan"), dtype=dt)
    else:  # alternating signs along the channels, so some query of every head scores it high
        fill_a = (SENTINEL * (1 - 2 * (torch.arange(a[-1]) % 2))).expand(n, *a).to(dt)
        fill_b = (SENTINEL * (1 - 2 * (torch.arange(b[-1]) % 2))).expand(n, *b).to(dt)
    for layer in range(num_layers):
        cache.write(layer, fill_a.to(dev), fill_b.to(dev), torch.arange(n, dtype=torch.int64, device=dev))


def _quant_paged(backend: Backend, case: str, shape: Shape, batch: Batch, dtype: str, bs: int,
                 kv_dtype: str) -> dict[str, Any]:
    """A poisoned 2-layer cache in ``kv_dtype`` holding ``batch``'s K/V in permuted blocks of layer 1
    (block 0 the null block padding the table, 3 spare blocks), written in two shuffled calls per
    sequence, as ``scenarios.make_paged`` does for "auto"."""
    import hal

    gen = generator(case + "/paged")
    need = [-(-kv // bs) for _, kv in batch.seqs]
    num_blocks = 1 + sum(need) + 3
    s_total = sum(kv for _, kv in batch.seqs)
    k = randn(gen, s_total, shape.hkv, shape.d, dtype=dtype)
    v = randn(gen, s_total, shape.hkv, shape.dv, dtype=dtype)
    scales: dict[str, Any] = {}
    if kv_dtype in FP8:  # calibrated: absmax / fmax of each KV head over the batch, both layers
        scales = {"k_scale": kv_formats.fp8_scales(kv_dtype, k).repeat(2, 1),
                  "v_scale": kv_formats.fp8_scales(kv_dtype, v).repeat(2, 1)}
    spec = hal.KVCacheSpec(2, shape.hkv, shape.d, v_head_dim=shape.dv, block_size=bs, dtype=dtype,
                           kv_dtype=kv_dtype)
    cache = hal.KVCache(spec, num_blocks, backend=backend, **scales)
    _poison_cache(cache, 2)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(batch.seqs), max(need, default=0) + 1, dtype=torch.int32)
    blocks, start, dev = [], 0, cache.device
    for b, (_, kv) in enumerate(batch.seqs):
        ids = [order.pop() for _ in range(need[b])]
        blocks.append(ids)
        table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots = torch.tensor(ids, dtype=torch.int64).repeat_interleave(bs)[:kv] * bs + torch.arange(kv) % bs
        for part in torch.randperm(kv, generator=gen).chunk(2) if kv else ():
            cache.write(1, k[start + part].to(dev), v[start + part].to(dev), slots[part].to(dev))
        start += kv
    return {"cache": cache, "k": k, "v": v, "table": table, "blocks": blocks,
            "seq_lens": [kv for _, kv in batch.seqs]}


def _argmax_agreement(q: torch.Tensor, k: torch.Tensor, k_quant: torch.Tensor, batch: Batch) -> float:
    """Fraction of causal query rows (token, head) with >= 2 visible keys whose highest-scoring key
    is the same with ``k_quant`` as with ``k`` (scores in float64)."""
    g = q.shape[1] // k.shape[1]
    same = total = 0
    for b, (lq, lk) in enumerate(batch.seqs):
        if lq == 0 or lk < 2:
            continue
        q0, k0 = batch.cu_q[b], batch.cu_k[b]
        qs = q[q0:q0 + lq].double()
        vis = visible_keys_reference(lq, lk, causal=True, window_left=None)  # [Lq, Lk]
        best = []
        for kk in (k, k_quant):
            s = torch.einsum("qhd,khd->hqk", qs, kk[k0:k0 + lk].double().repeat_interleave(g, 1))
            best.append(s.masked_fill(~vis, float("-inf")).argmax(-1))  # [Hq, Lq]
        rows = (vis.sum(-1) >= 2).expand_as(best[0])
        same += int((best[0] == best[1])[rows].sum())
        total += int(rows.sum())
    return same / total if total else 1.0


def _attention_check(backend: Backend, case: str, shape: Shape, batch: Batch, dtype: str, bs: int,
                     kv_dtype: str) -> tuple[list[Comparison], dict[str, float]]:
    import hal

    setup = _quant_paged(backend, case, shape, batch, dtype, bs, kv_dtype)
    cache = setup["cache"]
    q = randn(generator(case + "/q"), batch.cu_q[-1], shape.hq, shape.d, dtype=dtype)
    lse = "lse" in backend.capabilities().features
    plan = hal.plan(torch.tensor(batch.cu_q, dtype=torch.int32), torch.tensor(setup["seq_lens"], dtype=torch.int32),
                    setup["table"], cache)
    res = hal.paged_attention(q.to(cache.device), cache, 1, plan, return_lse=lse)
    out, got_lse = res if lse else (res, None)
    out = out.cpu()
    # golden on the exact values the cache holds (stored value x scale, fp64); the same-dtype reference
    # reads them back in the model dtype, as a plain kernel that dequantizes into the dtype would
    everything = list(range(cache.num_blocks))
    kc, vc = (t.cpu() for t in cache.read(1, everything, dtype="fp64"))
    g_out, g_lse = paged_attention_reference(q, kc, vc, batch.cu_q, setup["seq_lens"], setup["table"])
    kr, vr = (t.cpu() for t in cache.read(1, everything))
    kq = torch.cat([kr[ids].flatten(0, 1)[:kv] for ids, kv in zip(setup["blocks"], setup["seq_lens"])])
    vq = torch.cat([vr[ids].flatten(0, 1)[:kv] for ids, kv in zip(setup["blocks"], setup["seq_lens"])])
    r_out, r_lse = same_dtype_attention(q, kq, vq, batch.cu_q, batch.cu_k, causal=True)
    comps = [compare("out vs golden on the cache's exact values", dtype, out, g_out, r_out)]
    if lse:
        comps.append(compare("lse vs golden on the cache's exact values", dtype, got_lse.cpu(), g_lse, r_lse, lse=True))
    # reported: what the format costs against the unquantized K/V
    u_out, _ = golden_attention(q, setup["k"], setup["v"], batch.cu_q, batch.cu_k, causal=True)
    info = {"max |out - unquantized|": float((out.double() - u_out).abs().max()),
            "argmax agreement": _argmax_agreement(q, setup["k"], kq, batch)}
    return comps, info


def _attention(name: str, kv_dtype: str, dtype: str, bs: int, backend: Backend) -> Reported:
    import hal

    comps, info = _attention_check(backend, name, _LLAMA, BATCHES["mixed"], dtype, bs, kv_dtype)
    per_head = hal.KVCacheSpec(1, 1, 128, dtype="bf16", kv_dtype=kv_dtype).bytes_per_token
    return Reported(comps, {"bytes/token/head (D=128, bf16 model)": float(per_head), **info}, row=kv_dtype)


def _block_sizes(name: str, kv_dtype: str, backend: Backend) -> list[Comparison]:
    caps = backend.capabilities()
    comps = []
    for dtype in sorted(caps.dtypes):
        for bs in sorted(caps.block_sizes):
            c, _ = _attention_check(backend, f"{name}/{dtype}/bs{bs}", _SMALL, _TINY, dtype, bs, kv_dtype)
            comps += c
    return comps


def quant_cases() -> Iterator[Case]:
    for fmt in FORMATS:
        for dtype in DTYPES_ALL:
            yield Case("quant", f"roundtrip/{fmt}/from-{dtype}", "quick",
                       dict(dtype=dtype, kv_dtype=fmt, head_dim=80, v_head_dim=48, block_size=16,
                            features=["paged"]),
                       partial(_roundtrip, f"quant/roundtrip/{fmt}/{dtype}", fmt, dtype))
            yield Case("quant", f"saturation/{fmt}/from-{dtype}", "quick",
                       dict(dtype=dtype, kv_dtype=fmt, head_dim=64, v_head_dim=64, block_size=16,
                            features=["paged"]),
                       partial(_saturation, f"quant/saturation/{fmt}/{dtype}", fmt, dtype))
            yield Case("quant", f"roundtrip-mla/{fmt}/from-{dtype}", "quick" if dtype == "bf16" else "full",
                       dict(dtype=dtype, kv_dtype=fmt, block_size=16, features=["mla"]),
                       partial(_roundtrip_mla, f"quant/roundtrip-mla/{fmt}/{dtype}", fmt, dtype))
            for bs in (16, 1, 32):
                name = f"attention/{fmt}/{dtype}/bs{bs}"
                yield Case("quant", name, "quick" if (dtype == "bf16" and bs == 16) else "full",
                           requires_for(_LLAMA, dtype, ["paged", "causal"], block_size=bs, kv_dtype=fmt),
                           partial(_attention, "quant/" + name, fmt, dtype, bs))
        yield Case("quant", f"block-sizes/{fmt}", "full",
                   dict(kv_dtype=fmt, head_dim=_SMALL.d, features=["paged", "causal", "gqa"]),
                   partial(_block_sizes, f"quant/block-sizes/{fmt}", fmt))
