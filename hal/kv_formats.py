"""KV-cache storage formats: the one byte layout of each ``kv_dtype``, shared by every backend.

A cache stores, per layer, token and KV head, one *row*: the ``dim`` values of a key (or value,
or an MLA latent+RoPE row) in the cache's format. ``encode`` turns model-dtype values into rows,
``decode`` turns rows back into values; a backend may fuse these into its kernels but must
produce and accept exactly these bytes, so a cache written by one backend is read by any. How a
block arranges its rows (token-major or head-major) is the backend's; a row's bytes are not.
Multi-byte numbers are little-endian. ``x_i`` is value ``i`` of the row (channel ``i``).

auto
    ``dim`` elements of the model dtype (fp32 / fp16 / bf16) and nothing else.

fp8_e4m3, fp8_e5m2 (``dim`` bytes, no per-token scale)
    Byte ``i`` is the OCP FP8 bit pattern (``torch.float8_e4m3fn``: sign, 4 exponent bits bias 7,
    3 mantissa bits, no infinities, max 448; ``torch.float8_e5m2``: sign, 5 exponent bits bias 15,
    2 mantissa bits, max 57344) of ``clamp(fp32(x_i) / scale, -fmax, +fmax)`` rounded to nearest
    even. The clamp comes first, so nothing becomes NaN or Inf: larger values saturate to +-fmax.
    ``scale`` is one fp32 per layer, KV head and component (K, V; an MLA cache has one), kept beside
    the cache, not in the rows: given at cache creation (``k_scale``/``v_scale``) or taken from the
    layer's first write by ``fp8_scales`` (that head's absmax / fmax; 1.0 for a head of zeros) and
    frozen. Decode: ``fp32(fp8) * scale`` in fp32, then rounded to the model dtype.

int8 (``dim + 2`` bytes)
    Bytes ``0 .. dim-1``: ``q_i`` as an int8 (two's complement). Bytes ``dim, dim+1``: the fp16
    scale of the row.

int6 (``ceil(3 dim / 4) + 2`` bytes)
    The ``q_i`` as 6-bit two's complement fields of a little-endian bit stream: ``q_i`` occupies
    stream bits ``6i .. 6i+5``, stream bit ``b`` being bit ``b % 8`` (LSB = 0) of byte ``b // 8``.
    Equivalently, each four values ``v0..v3`` (channels ``4j .. 4j+3``) form the 24-bit word
    ``v0 | v1 << 6 | v2 << 12 | v3 << 18`` stored as three bytes, least significant first. When
    ``dim`` is not a multiple of 4 the missing values are 0 and the row keeps only
    ``ceil(3 dim / 4)`` value bytes. Then the row's fp16 scale (2 bytes).

int4 (``ceil(dim / 2) + 2 ceil(dim / 32)`` bytes)
    Byte ``j`` holds ``q_{2j}`` in its low nibble (bits 0-3) and ``q_{2j+1}`` in its high nibble,
    each 4-bit two's complement (the high nibble of the last byte is 0 when ``dim`` is odd). Then
    ``ceil(dim / 32)`` fp16 scales, group 0 first: group ``g`` covers channels
    ``32g .. min(32g + 32, dim) - 1`` (the last group is shorter when 32 does not divide ``dim``).

Integer quantization (symmetric; ``qmax`` = 127 / 31 / 7 for int8 / int6 / int4; a group is the
whole row for int8 and int6, 32 channels for int4):

    absmax = max |x_i| over the group, in fp32 (exact for every model dtype)
    scale  = absmax / qmax (fp32), rounded UP to the nearest fp16 >= it, then min(that, 65504)
    q_i    = clamp(round_half_even(fp32(x_i) / scale), -qmax, qmax)     (0 when scale == 0)
    decode = fp32(q_i) * fp32(scale), clamped to the model dtype's finite range, in the model dtype

Rounding the scale up (not to nearest) keeps ``|x_i| / scale <= qmax`` for every group, including
groups so small that their scale is an fp16 subnormal, so no value is clipped and every value reads
back within half a step. An all-zero group stores scale 0 and reads back zeros. Only a group with
``absmax > qmax * 65504`` (possible in fp32 and bf16 models) has its scale clamped to the fp16 max;
its values beyond ``qmax * 65504`` saturate to ``+-qmax * 65504`` (never Inf).

``error_bound`` gives the per-element bound these rules guarantee; ``saturation`` the elements they
do not bound (saturated) and the value those read back as.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hal.errors import InvalidInput

__all__ = ["row_bytes", "row_width", "storage_dtype", "num_groups", "encode", "decode", "fp8_scales",
           "error_bound", "saturation", "FP8_MAX", "INT_QMAX", "FP16_MAX"]

FP16_MAX = 65504.0


@dataclass(frozen=True)
class _Fp8:
    torch_dtype: torch.dtype
    fmax: float  # largest finite value
    half_ulp_rel: float  # half an ulp relative to the value (normal range): 2^-(mantissa bits + 1)
    half_min_sub: float  # half the smallest subnormal: the absolute rounding error near 0


@dataclass(frozen=True)
class _Int:
    bits: int
    qmax: int
    group: int | None  # channels per scale; None = the whole row


_FP8 = {
    "fp8_e4m3": _Fp8(torch.float8_e4m3fn, 448.0, 2.0**-4, 2.0**-10),
    "fp8_e5m2": _Fp8(torch.float8_e5m2, 57344.0, 2.0**-3, 2.0**-17),
}
_INT = {"int8": _Int(8, 127, None), "int6": _Int(6, 31, None), "int4": _Int(4, 7, 32)}

#: largest finite value of each fp8 format (what a saturated value reads back as, times the scale)
FP8_MAX = {k: f.fmax for k, f in _FP8.items()}
#: largest |q| of each integer format
INT_QMAX = {k: f.qmax for k, f in _INT.items()}


def _known(kv_dtype: str) -> None:
    if kv_dtype != "auto" and kv_dtype not in _FP8 and kv_dtype not in _INT:
        raise InvalidInput(f"[hal] unknown kv_dtype {kv_dtype!r}")


def row_bytes(kv_dtype: str, dim: int, itemsize: int) -> int:
    """Bytes stored for one token's vector of ``dim`` values of one head, scales included.

    auto: dim * itemsize; fp8: dim (scales are per layer and head, not per token); int8: dim + 2
    (one fp16 scale); int6: ceil(3 dim / 4) + 2 (four values in three bytes); int4: ceil(dim / 2)
    + 2 * ceil(dim / 32) (two values per byte, one fp16 scale per group of 32 channels).
    """
    _known(kv_dtype)
    if kv_dtype == "auto":
        return dim * itemsize
    if kv_dtype in _FP8:
        return dim
    return _value_bytes(kv_dtype, dim) + 2 * num_groups(kv_dtype, dim)


def _value_bytes(kv_dtype: str, dim: int) -> int:
    return math.ceil(_INT[kv_dtype].bits * dim / 8)


def num_groups(kv_dtype: str, dim: int) -> int:
    """Scales per row: ceil(dim / 32) for int4, 1 for int8 and int6, 0 for auto and fp8."""
    _known(kv_dtype)
    if kv_dtype not in _INT:
        return 0
    g = _INT[kv_dtype].group
    return 1 if g is None else math.ceil(dim / g)


def storage_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of stored rows: the model dtype for "auto", bytes (uint8) otherwise."""
    return model_dtype if kv_dtype == "auto" else torch.uint8


def row_width(kv_dtype: str, dim: int, model_dtype: torch.dtype) -> int:
    """Elements of ``storage_dtype`` per row."""
    if kv_dtype == "auto":
        return dim
    return row_bytes(kv_dtype, dim, model_dtype.itemsize)


# ---- helpers shared by encode, decode and the bounds ------------------------------------------

def _group_size(kv_dtype: str, dim: int) -> int:
    g = _INT[kv_dtype].group
    return dim if g is None else g


def _grouped(x: torch.Tensor, gs: int, groups: int) -> torch.Tensor:
    """[..., dim] -> [..., groups, gs], zero-padded at the end."""
    pad = groups * gs - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (groups, gs))


def _int_scales(x32: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """The stored scales of rows ``x32 [..., dim]`` (fp32): fp16 ``[..., groups]``."""
    dim = x32.shape[-1]
    spec = _INT[kv_dtype]
    groups = num_groups(kv_dtype, dim)
    absmax = _grouped(x32.abs(), _group_size(kv_dtype, dim), groups).amax(-1)  # [..., G]
    s32 = absmax / spec.qmax
    s16 = s32.clamp(max=FP16_MAX).to(torch.float16)  # round to nearest ...
    low = (s16.float() < s32) & (s16 < FP16_MAX)  # ... and where that went down, one fp16 up
    return torch.where(low, (s16.view(torch.int16) + 1).view(torch.float16), s16)


def _le_bytes(s16: torch.Tensor) -> torch.Tensor:
    """fp16 ``[..., n]`` -> its little-endian bytes, uint8 ``[..., 2n]`` (independent of the host's order)."""
    bits = s16.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack([bits & 255, bits >> 8], dim=-1).flatten(-2).to(torch.uint8)


def _from_le_fp16(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 2n]`` little-endian -> fp16 ``[..., n]``."""
    b = b.to(torch.int32)
    bits = b[..., 0::2] | (b[..., 1::2] << 8)
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(torch.float16)


def _pack(q: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    """Signed ``q [..., n]`` (int32, |q| < 2^(bits-1)) -> the little-endian bit stream, uint8 ``[..., nbytes]``."""
    if bits == 8:
        return q.to(torch.int8).view(torch.uint8)
    u = q & ((1 << bits) - 1)  # two's complement field
    per = 4 if bits == 6 else 2  # values per packed unit (3 bytes for int6, 1 byte for int4)
    n = u.shape[-1]
    if n % per:
        u = torch.nn.functional.pad(u, (0, per - n % per))
    u = u.unflatten(-1, (-1, per))  # [..., units, per]
    word = u[..., 0]
    for t in range(1, per):
        word = word | (u[..., t] << (bits * t))
    if bits == 4:
        out = word.to(torch.uint8)
    else:  # three bytes of the 24-bit word, least significant first
        out = torch.stack([word & 255, (word >> 8) & 255, word >> 16], dim=-1).flatten(-2).to(torch.uint8)
    return out[..., :nbytes]


def _unpack(b: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 bit stream ``[..., nbytes]`` -> signed values int8 ``[..., n]`` (inverse of ``_pack``).
    Fields are moved to the top of a byte and shifted back arithmetically, which sign-extends them."""
    if bits == 8:
        return b.view(torch.int8)
    if bits == 4:
        lo = (b << 4).view(torch.int8) >> 4
        hi = b.view(torch.int8) >> 4
        return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :n]
    full = 3 * math.ceil(n / 4)
    if b.shape[-1] < full:
        b = torch.nn.functional.pad(b, (0, full - b.shape[-1]))
    b0, b1, b2 = b[..., 0::3], b[..., 1::3], b[..., 2::3]  # [..., units] each
    top = torch.stack([b0 << 2, (b1 << 4) | ((b0 >> 4) & 12), (b2 << 6) | ((b1 >> 2) & 60), b2 & 252], dim=-1)
    return (top.view(torch.int8) >> 2).flatten(-2)[..., :n]


def _to_model(v32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 (fp64 for an fp64 read) -> the model dtype, clamped to its finite range (a rounded-up
    scale may pass fp16's max)."""
    if dtype == torch.float16:
        v32 = v32.clamp(-FP16_MAX, FP16_MAX)
    return v32 if dtype == v32.dtype else v32.to(dtype)


def _need_scale(kv_dtype: str, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        raise InvalidInput(f"[hal.kv_formats] {kv_dtype} needs its fp32 scale (per layer and head)")
    return scale


# ---- the codec ----------------------------------------------------------------------------------

def encode(kv_dtype: str, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x [..., dim]`` (model dtype, finite: callers reject NaN/Inf first) in format
    ``kv_dtype``: ``[..., row_width]`` of ``storage_dtype``. ``scale`` (fp8 formats only): fp32,
    broadcastable to ``x[..., :1]`` (per layer and head)."""
    _known(kv_dtype)
    if kv_dtype == "auto":
        return x
    x32 = x.float()
    if kv_dtype in _FP8:
        f = _FP8[kv_dtype]
        xs = (x32 / _need_scale(kv_dtype, scale)).clamp(-f.fmax, f.fmax)  # saturate before the cast
        return xs.to(f.torch_dtype).view(torch.uint8)
    spec = _INT[kv_dtype]
    dim = x.shape[-1]
    groups = num_groups(kv_dtype, dim)
    s16 = _int_scales(x32, kv_dtype)  # [..., G]
    s32 = s16.float().unsqueeze(-1)  # [..., G, 1]
    xg = _grouped(x32, _group_size(kv_dtype, dim), groups)  # [..., G, gs]
    q = torch.where(s32 > 0, xg / torch.where(s32 > 0, s32, torch.ones_like(s32)), torch.zeros_like(xg))
    q = torch.round(q).clamp(-spec.qmax, spec.qmax).to(torch.int32).flatten(-2)[..., :dim]
    return torch.cat([_pack(q, spec.bits, _value_bytes(kv_dtype, dim)), _le_bytes(s16)], dim=-1)


def decode(kv_dtype: str, rows: torch.Tensor, dim: int, dtype: torch.dtype,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """Values ``[..., dim]`` in ``dtype`` of rows ``[..., row_width]`` (the inverse of ``encode``).
    With ``dtype=torch.float64`` the values are exact: stored value times scale, unrounded (fp32
    is exact too for the integer formats: 8 bits times an fp16 scale fit its 24)."""
    _known(kv_dtype)
    if kv_dtype == "auto":
        return rows if rows.dtype == dtype else rows.to(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if kv_dtype in _FP8:
        v = rows.view(_FP8[kv_dtype].torch_dtype).to(work) * _need_scale(kv_dtype, scale).to(work)
        return _to_model(v, dtype)
    spec = _INT[kv_dtype]
    nv = _value_bytes(kv_dtype, dim)
    q = _unpack(rows[..., :nv], spec.bits, dim).to(work)  # [..., dim]
    s = _from_le_fp16(rows[..., nv:]).to(work)  # [..., G]
    if spec.group is None:
        v = q * s
    else:
        v = (_grouped(q, spec.group, s.shape[-1]) * s.unsqueeze(-1)).flatten(-2)[..., :dim]
    return _to_model(v, dtype)


def fp8_scales(kv_dtype: str, x: torch.Tensor) -> torch.Tensor:
    """The per-head fp8 scale of a layer's first write ``x [N, H, dim]``: fp32 ``[H]`` = absmax over
    the head's tokens and channels / fmax; 1.0 for a head of zeros (or of no tokens)."""
    fmax = _FP8[kv_dtype].fmax
    if x.numel() == 0:
        return torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    s = x.float().abs().amax(dim=(0, 2)) / fmax
    return torch.where(s > 0, s, torch.ones_like(s))


# ---- what a round trip guarantees -----------------------------------------------------------------

def _model_rounding(dtype: torch.dtype) -> tuple[float, float]:
    """(half an ulp relative, half the smallest subnormal) of rounding to the model dtype."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidInput(f"[hal.kv_formats] x must be fp32, fp16 or bf16, got {dtype}")
    fi = torch.finfo(dtype)
    return fi.eps / 2, fi.smallest_normal * fi.eps / 2


def _expanded_int_scales(x: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """The stored scale of each element's group, float64 ``[..., dim]``."""
    dim = x.shape[-1]
    s = _int_scales(x.float(), kv_dtype).double()  # [..., G]
    gs = _group_size(kv_dtype, dim)
    return s.repeat_interleave(gs, dim=-1)[..., :dim]


def saturation(kv_dtype: str, x: torch.Tensor, scale: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which elements of ``x [..., dim]`` saturate, and what every element would read back as if it
    did: ``(mask bool [..., dim], value [..., dim] in x's dtype)``.

    fp8: ``|x| / scale > fmax`` reads back ``sign(x) * fmax * scale``. Integer formats: only in a
    group whose scale was clamped to 65504, ``|x| / 65504 > qmax + 1/2`` reads back
    ``sign(x) * qmax * 65504``. auto never saturates.
    """
    _known(kv_dtype)
    ax = x.double().abs()
    if kv_dtype == "auto":
        return torch.zeros_like(x, dtype=torch.bool), x
    if kv_dtype in _FP8:
        f = _FP8[kv_dtype]
        s = _need_scale(kv_dtype, scale).float()
        mask = ax > f.fmax * s.double()
        limit = torch.full_like(x, f.fmax, dtype=torch.float32) * s
    else:
        qmax = _INT[kv_dtype].qmax
        s = _expanded_int_scales(x, kv_dtype)
        mask = ax > (qmax + 0.5) * s
        limit = torch.full_like(x, qmax * FP16_MAX, dtype=torch.float32)
    return mask, _to_model(torch.sign(x.float()) * limit, x.dtype)


def error_bound(kv_dtype: str, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element bound of ``|decode(encode(x)) - x|``: float64 ``[..., dim]``, ``inf`` where the
    element saturates (see ``saturation``; such elements are checked against their saturated value).

    With ``u`` = half an ulp of x's dtype relative (2^-24 fp32, 2^-11 fp16, 2^-8 bf16) and ``t`` =
    half its smallest subnormal (the rounding of the decoded value to the model dtype):

    - auto: 0.
    - int8/int6/int4, ``s`` the group's stored fp16 scale (as ``encode`` computes it from ``x``):
      half a step, ``0.5 s``, plus ``2^-16 s`` of fp32 slack, plus the model rounding
      ``u (|x| + s) + t``.
    - fp8, ``S`` the fp32 ``scale`` (required), ``r`` = half an fp8 ulp relative (2^-4 e4m3,
      2^-3 e5m2), ``a`` = half the smallest fp8 subnormal (2^-10 e4m3, 2^-17 e5m2): the fp8
      rounding ``e = r |x| + a S``, plus the model rounding and fp32 slack
      ``(u + 2^-20)(|x| + e) + t``.
    """
    _known(kv_dtype)
    u, t = _model_rounding(x.dtype)
    ax = x.double().abs()
    if kv_dtype == "auto":
        return torch.zeros_like(ax)
    if kv_dtype in _FP8:
        f = _FP8[kv_dtype]
        s = _need_scale(kv_dtype, scale).double()
        e = f.half_ulp_rel * ax + f.half_min_sub * s
        bound = e + (u + 2.0**-20) * (ax + e) + t
    else:
        s = _expanded_int_scales(x, kv_dtype)
        bound = (0.5 + 2.0**-16) * s + u * (ax + s) + t
    mask, _ = saturation(kv_dtype, x, scale)
    return torch.where(mask, torch.full_like(bound, math.inf), bound)
