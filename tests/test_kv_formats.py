"""The KV-cache formats of ``hal.kv_formats``: exact bytes, round trips within ``error_bound``,
saturation, scales, NaN rejection, bytes per token, and the cpu backend's paged attention on each."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hal
from hal import kv_formats as F
from hal.backends.cpu import CpuBackend
from hal.conformance import all_cases
from hal.conformance.runner import BackendReport, print_matrix, run_case, write_report

QUANT = ("fp8_e4m3", "fp8_e5m2", "int8", "int6", "int4")
INTS = ("int8", "int6", "int4")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bytes(kv_dtype: str, values: list[float], scale: float | None = None) -> list[int]:
    s = None if scale is None else torch.tensor([scale])
    return F.encode(kv_dtype, torch.tensor([values]), s)[0].tolist()


def _fp16_le(x: float) -> list[int]:
    bits = int(torch.tensor([x], dtype=torch.float16).view(torch.int16)) & 0xFFFF
    return [bits & 0xFF, bits >> 8]


# ---- exact bytes, computed by hand -------------------------------------------------------------

def test_int8_bytes() -> None:
    # absmax 127 -> scale 1.0 (fp16 0x3C00, little-endian 00 3C); 0.5 rounds half to even -> 0
    assert _bytes("int8", [1, -2, 127, -127, 0.5]) == [1, 254, 127, 129, 0, 0x00, 0x3C]
    # absmax 254 -> scale 2.0 (0x4000); 3 / 2 = 1.5 -> 2 (half to even), -5 / 2 = -2.5 -> -2
    assert _bytes("int8", [254, 3, -5]) == [127, 2, 254, 0x00, 0x40]
    assert _bytes("int8", [0, 0, 0]) == [0, 0, 0, 0, 0]  # all-zero row: scale 0


def test_int6_bytes_and_bit_order() -> None:
    # q = 1, -1, 31, -31 -> fields 000001, 111111, 011111, 100001
    # word = 1 | 63 << 6 | 31 << 12 | 33 << 18 = 0x85FFC1 -> C1 FF 85
    assert _bytes("int6", [1, -1, 31, -31]) == [0xC1, 0xFF, 0x85, 0x00, 0x3C]
    # a fifth value, -2 (field 111110), in bits 24..29: byte 3 = 0x3E; ceil(15 / 4) = 4 value bytes
    assert _bytes("int6", [1, -1, 31, -31, -2]) == [0xC1, 0xFF, 0x85, 0x3E, 0x00, 0x3C]
    # a sixth, 3 (000011), in bits 30..35: its low two bits are bits 6-7 of byte 3, the rest byte 4
    assert _bytes("int6", [1, -1, 31, -31, -2, 3]) == [0xC1, 0xFF, 0x85, 0x3E | 0xC0, 0x00, 0x00, 0x3C]
    assert F.row_bytes("int6", 6, 2) == 7


def test_int4_bytes_nibble_order_and_groups() -> None:
    # q0 = 7 in the low nibble, q1 = -7 (1001) in the high nibble; q2 = 1 alone in byte 1
    assert _bytes("int4", [7, -7, 1]) == [0x97, 0x01, 0x00, 0x3C]
    # 33 channels: group 0 = channels 0..31 (absmax 7, scale 1), group 1 = channel 32 alone
    # (scale 3/7 rounded up to fp16: 0x36DC; round-to-nearest would give 0x36DB, below 3/7)
    row = _bytes("int4", [7.0, -7.0] + [0.0] * 30 + [3.0])
    assert len(row) == 17 + 2 * 2 == F.row_bytes("int4", 33, 2)
    assert row[:17] == [0x97] + [0] * 15 + [0x07]
    assert row[17:] == [0x00, 0x3C, 0xDC, 0x36]
    assert F.num_groups("int4", 33) == 2 and F.num_groups("int4", 128) == 4 and F.num_groups("int4", 80) == 3


def test_fp8_bytes_saturate_never_nan() -> None:
    # E4M3FN: 1.0 = 0x38, -2 = 0xC0, 448 = 0x7E (the max); 1000 saturates to 0x7E, not NaN (0x7F)
    assert _bytes("fp8_e4m3", [1, -2, 448, 1000, -1e9], 1.0) == [0x38, 0xC0, 0x7E, 0x7E, 0xFE]
    # stored value = x / scale
    assert _bytes("fp8_e4m3", [2.0, -4.0], 2.0) == [0x38, 0xC0]
    # E5M2: 1.0 = 0x3C, 448 = 1.75 * 2^8 = 0x5F, 1000 -> 1024 = 0x64; 1e9 -> 57344 = 0x7B, not Inf (0x7C)
    assert _bytes("fp8_e5m2", [1, -2, 448, 1000, 1e9], 1.0) == [0x3C, 0xC0, 0x5F, 0x64, 0x7B]


def test_scale_is_rounded_up_to_fp16_and_clamped() -> None:
    # 1/127 rounds to nearest fp16 *below* it; the stored scale is the next fp16 up
    row = _bytes("int8", [1.0])
    s = torch.tensor(row[-2:], dtype=torch.uint8).view(torch.float16).float().item()
    nearest = torch.tensor([1 / 127]).half()
    assert nearest.float().item() < 1 / 127 <= s
    assert torch.tensor([s]).half().view(torch.int16).item() == nearest.view(torch.int16).item() + 1
    # an fp32/bf16 group beyond 127 * 65504 clamps its scale to 65504 and saturates, finite
    for dt in (torch.float32, torch.bfloat16):
        x = torch.tensor([[1e30, -1e30, 1.0]], dtype=dt)
        r = F.encode("int8", x)
        assert r[0, -2:].tolist() == _fp16_le(65504.0)
        y = F.decode("int8", r, 3, dt)
        limit = float(torch.tensor(127 * 65504.0).to(dt))
        assert y.tolist()[0][:2] == [limit, -limit]
    # fp16 values near its max: the rounded-up scale times 127 passes 65504, decode clamps (no Inf)
    x = torch.tensor([[65504.0, -65504.0, 1.0]], dtype=torch.float16)
    for kv in INTS:
        y = F.decode(kv, F.encode(kv, x), 3, torch.float16)
        assert torch.isfinite(y).all() and y[0, 0] == 65504 and y[0, 1] == -65504


def test_tiny_values_keep_a_nonzero_scale() -> None:
    # absmax / qmax below the smallest fp16 subnormal: the scale rounds up to 2^-24, not to 0
    x = torch.tensor([[1e-9, -3e-10, 0.0]])
    for kv in INTS:
        r = F.encode(kv, x)
        assert r[0, -2:].tolist() == [1, 0]  # fp16 bits 0x0001
        assert ((F.decode(kv, r, 3, torch.float32) - x).abs() <= F.error_bound(kv, x)).all()


# ---- the documented bit stream, independently -------------------------------------------------

def _bit_stream(values: list[int], bits: int) -> list[int]:
    """The documented layout, bit by bit: value i at stream bits [bits*i, bits*(i+1)), stream bit b
    is bit b % 8 of byte b // 8, two's complement fields."""
    nbytes = math.ceil(bits * len(values) / 8)
    out = [0] * nbytes
    for i, v in enumerate(values):
        field = v & ((1 << bits) - 1)
        for t in range(bits):
            b = bits * i + t
            out[b // 8] |= ((field >> t) & 1) << (b % 8)
    return out


@settings(max_examples=60, deadline=None)
@given(kv=st.sampled_from(INTS), data=st.data())
def test_values_follow_the_documented_bit_stream(kv: str, data: Any) -> None:
    qmax, bits = F.INT_QMAX[kv], {"int8": 8, "int6": 6, "int4": 4}[kv]
    dim = data.draw(st.integers(1, 100))
    q = data.draw(st.lists(st.integers(-qmax, qmax), min_size=dim, max_size=dim))
    group = 32 if kv == "int4" else dim
    for g0 in range(0, dim, group):  # each group's absmax = qmax: scale 1.0, so q is stored as is
        q[g0] = qmax
    row = F.encode(kv, torch.tensor([q], dtype=torch.float32))[0].tolist()
    nv = math.ceil(bits * dim / 8)
    assert row[:nv] == _bit_stream(q, bits)
    assert row[nv:] == [0x00, 0x3C] * F.num_groups(kv, dim)
    assert F.decode(kv, torch.tensor([row], dtype=torch.uint8), dim, torch.float32)[0].tolist() == q


# ---- round trips within error_bound --------------------------------------------------------------

def _check_roundtrip(kv: str, x: torch.Tensor, scale: torch.Tensor | None) -> None:
    rows = F.encode(kv, x, scale)
    assert rows.dtype == torch.uint8 and rows.shape == (*x.shape[:-1], F.row_width(kv, x.shape[-1], x.dtype))
    y = F.decode(kv, rows, x.shape[-1], x.dtype, scale)
    assert y.dtype == x.dtype and y.shape == x.shape and torch.isfinite(y).all()
    bound = F.error_bound(kv, x, scale)
    sat, sat_value = F.saturation(kv, x, scale)
    err = (y.double() - x.double()).abs()
    assert (err[~sat] <= bound[~sat]).all(), float((err - bound)[~sat].max())
    assert torch.equal(y[sat], sat_value[sat])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv=st.sampled_from(QUANT), dt=st.sampled_from(list(DTYPES)), n=st.integers(1, 4), h=st.integers(1, 3),
       dim=st.integers(1, 160), exp=st.integers(-30, 30), seed=st.integers(0, 2**31 - 1),
       zero_token=st.booleans(), given_scale=st.booleans())
def test_roundtrip_within_error_bound(kv: str, dt: str, n: int, h: int, dim: int, exp: int, seed: int,
                                      zero_token: bool, given_scale: bool) -> None:
    dtype = DTYPES[dt]
    lim = math.log2(torch.finfo(dtype).max) - 4
    g = torch.Generator().manual_seed(seed)
    mag = 2.0 ** max(-lim, min(lim, exp))
    x = torch.randn(n, h, dim, generator=g) * mag * torch.rand(n, h, 1, generator=g)  # per-row magnitudes
    x[..., 0] *= 3.0  # an outlier channel
    if zero_token:
        x[0] = 0
    x = x.to(dtype)
    scale = None
    if kv.startswith("fp8"):
        # the first-write rule, or a given scale that makes some values saturate
        scale = F.fp8_scales(kv, x)[:, None] * (0.25 if given_scale else 1.0)
    _check_roundtrip(kv, x, scale)


def test_all_zero_groups_read_back_zeros() -> None:
    x = torch.zeros(2, 3, 80)
    x[1, :, 70] = 5.0  # only int4's last (short) group of row 1 is nonzero
    for kv in INTS:
        rows = F.encode(kv, x)
        y = F.decode(kv, rows, 80, torch.float32)
        assert torch.equal(y[0], x[0])
        assert (y[1, :, :64] == 0).all()
    sc = F.encode("int4", x)[..., 40:].contiguous().view(torch.float16)  # 3 scales per row
    assert sc[0].eq(0).all() and sc[1, :, :2].eq(0).all() and sc[1, :, 2].gt(0).all()
    assert F.fp8_scales("fp8_e4m3", torch.zeros(2, 3, 8)).tolist() == [1.0, 1.0, 1.0]


# ---- bytes per token ------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [64, 128])
def test_bytes_per_token_formula(d: int) -> None:
    layers, heads = 3, 4
    formula = {"fp8_e4m3": 2 * d, "fp8_e5m2": 2 * d, "int8": 2 * (d + 2), "int6": 2 * (3 * d // 4 + 2),
               "int4": 2 * (d // 2 + 2 * d // 32)}
    for dt, item in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        formula["auto"] = 2 * d * item
        for kv, per_head in formula.items():
            spec = hal.KVCacheSpec(layers, heads, d, dtype=dt, kv_dtype=kv)
            assert spec.bytes_per_token == layers * heads * per_head, (kv, dt)
            cache = hal.KVCache(spec, 2, backend="cpu")
            stored = sum(r[0, 0, 0].numel() * r.element_size() for r in cache.storage.rows)  # one token, all heads
            assert stored == heads * per_head


def test_bytes_per_token_models() -> None:
    llama70 = {kv: hal.KVCacheSpec(80, 8, 128, kv_dtype=kv).bytes_per_token for kv in hal.dtypes.KV_DTYPES}
    assert llama70 == {"auto": 327680, "fp8_e4m3": 163840, "fp8_e5m2": 163840, "int8": 166400,
                       "int6": 125440, "int4": 92160}
    dsv2 = {kv: hal.MLACacheSpec(60, kv_dtype=kv).bytes_per_token for kv in hal.dtypes.KV_DTYPES}
    assert dsv2 == {"auto": 69120, "fp8_e4m3": 34560, "fp8_e5m2": 34560, "int8": 34680,
                    "int6": 60 * 434, "int4": 19440}
    # int4 with a short last group: 80 channels = 40 value bytes + 3 scales
    assert F.row_bytes("int4", 80, 2) == 46 and F.row_bytes("int6", 576, 2) == 434


# ---- through the cache: scales, saturation, NaN rejection ---------------------------------------

def _cache(kv: str, dtype: str = "fp32", **kw: Any) -> hal.KVCache:
    return hal.KVCache(hal.KVCacheSpec(2, 2, 64, block_size=16, dtype=dtype, kv_dtype=kv), 4, backend="cpu", **kw)


def _slots(*s: int) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.int64)


def _read(cache: hal.KVCache, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = cache.read(layer, list(range(cache.num_blocks)))
    return k.flatten(0, 1)[slots], v.flatten(0, 1)[slots]


@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_scales_from_first_write_then_frozen(kv: str) -> None:
    cache = _cache(kv)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, 2, 64, generator=g)
    cache.write(0, x1, x1 * 2, _slots(0, 1, 2, 3, 4))
    s_k, s_v = F.fp8_scales(kv, x1), F.fp8_scales(kv, x1 * 2)
    assert torch.equal(cache.storage.scales[0][0], s_k) and torch.equal(cache.storage.scales[1][0], s_v)
    x2 = x1 * 10  # a later, larger write saturates against the frozen scales
    cache.write(0, x2, x2, _slots(5, 6, 7, 8, 9))
    assert torch.equal(cache.storage.scales[0][0], s_k)
    k, _ = _read(cache, 0, _slots(5, 6, 7, 8, 9))
    assert torch.isfinite(k).all()
    sat, val = F.saturation(kv, x2, s_k[:, None])
    assert sat.any() and torch.equal(k[sat], val[sat])
    assert (k.abs() <= F.FP8_MAX[kv] * s_k[:, None] * (1 + 2**-20)).all()
    # layer 1 has not been written: its scales are not frozen yet
    assert not bool(cache.storage.scale_frozen[1])


def test_fp8_scales_given_are_used_as_given() -> None:
    k_scale = torch.full((2, 2), 0.5)
    cache = _cache("fp8_e4m3", k_scale=k_scale)  # v_scale: from the first write
    x = torch.tensor([1.0, 300.0, -1000.0]).repeat(1, 2, 1).expand(1, 2, 3)
    x = torch.nn.functional.pad(x, (0, 61)).contiguous()  # [1, 2, 64]
    cache.write(0, x, x * 0.01, _slots(3))
    k, v = _read(cache, 0, _slots(3))
    # 1 -> 2 stored -> 1; 300 -> 600 saturates to 448 -> 224; -1000 -> -224
    assert k[0, :, :3].tolist() == [[1.0, 224.0, -224.0]] * 2
    assert torch.equal(cache.storage.scales[0][0], k_scale[0])
    assert torch.allclose(cache.storage.scales[1][0], torch.full((2,), 10.0 / 448))  # absmax 10 / 448
    assert torch.allclose(v, x * 0.01, rtol=2**-4, atol=0)


@pytest.mark.parametrize("kv", QUANT)
def test_nan_inf_write_rejected_and_nothing_written(kv: str) -> None:
    cache = _cache(kv)
    g = torch.Generator().manual_seed(1)
    good = torch.randn(4, 2, 64, generator=g)
    cache.write(1, good, good, _slots(0, 1, 2, 3))
    before = [r.clone() for r in cache.storage.rows]
    scales = None if cache.storage.scales is None else [s.clone() for s in cache.storage.scales]
    frozen = None if cache.storage.scale_frozen is None else cache.storage.scale_frozen.clone()
    for bad in (float("nan"), float("inf"), float("-inf")):
        for which in ("k", "v"):
            x = good.clone()
            x[2, 1, 7] = bad
            k, v = (x, good) if which == "k" else (good, x)
            with pytest.raises(hal.InvalidInput, match=rf"\[hal.KVCache.write\] {which} holds NaN or Inf"):
                cache.write(0, k, v, _slots(4, 5, 6, 7))  # layer 0: the first write would set fp8 scales
    assert all(torch.equal(a, b) for a, b in zip(before, cache.storage.rows))
    if scales is not None:
        assert all(torch.equal(a, b) for a, b in zip(scales, cache.storage.scales))
        assert torch.equal(frozen, cache.storage.scale_frozen) and not bool(frozen[0])


def test_auto_writes_are_not_checked() -> None:
    cache = _cache("auto")
    x = torch.full((1, 2, 64), float("nan"))
    cache.write(0, x, x, _slots(0))
    assert torch.isnan(_read(cache, 0, _slots(0))[0]).all()


def test_mla_rows_are_one_group_of_576() -> None:
    caps = hal.get_backend("cpu").capabilities()
    if "mla" not in caps.features:
        pytest.skip("cpu does not declare 'mla'")
    spec = hal.MLACacheSpec(2, block_size=16, dtype="bf16", kv_dtype="int6")
    cache = hal.KVCache(spec, 2, backend="cpu")
    assert cache.storage.rows[0].shape[-1] == 434 and spec.bytes_per_token == 2 * 434
    g = torch.Generator().manual_seed(2)
    c_kv, k_pe = torch.randn(3, 512, generator=g).bfloat16(), (torch.randn(3, 64, generator=g) * 9).bfloat16()
    cache.write(0, c_kv, k_pe, _slots(0, 1, 2))
    a, b = cache.read(0, [0])
    row = torch.cat([c_kv, k_pe], -1)
    got = torch.cat([a[0, :3], b[0, :3]], -1)
    assert ((got.double() - row.double()).abs() <= F.error_bound("int6", row)).all()
    # one scale for the whole row: the RoPE part's larger values set it
    s = cache.storage.rows[0][0, 0, :3, 0, -2:].contiguous().view(torch.float16).float()[:, 0]
    assert torch.equal(s, F.encode("int6", row)[:, -2:].contiguous().view(torch.float16).float()[:, 0])


@pytest.mark.parametrize("kv", ["int8", "int4", "fp8_e4m3"])
def test_exact_read_is_value_times_scale_and_the_default_read_rounds_it(kv: str) -> None:
    """read(dtype="fp64") is stored value x scale computed by hand from the bytes; the default read is
    that rounded to the model dtype; fp32 equals fp64 for the integer formats (8 bits x fp16 scale)."""
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, 32, block_size=4, dtype="bf16", kv_dtype=kv), 2, backend="cpu")
    g = torch.Generator().manual_seed(5)
    cache.write(0, torch.randn(8, 2, 32, generator=g).bfloat16(), (torch.randn(8, 2, 32, generator=g) * 3).bfloat16(),
                torch.arange(8))
    k64, v64 = cache.read(0, [0, 1], dtype="fp64")
    k32, _ = cache.read(0, [0, 1], dtype=torch.float32)
    kb, vb = cache.read(0, [0, 1])
    assert k64.dtype == torch.float64 and k32.dtype == torch.float32 and kb.dtype == torch.bfloat16
    raw = cache.storage.rows[1][0].flatten(0, 1)  # v rows [8, 2, width]
    if kv == "int8":
        vals = raw[..., :32].view(torch.int8).double()
        scale = raw[..., 32:34].contiguous().view(torch.float16).double()
        assert torch.equal(v64.flatten(0, 1), vals * scale)
    if kv == "fp8_e4m3":
        vals = raw.view(torch.float8_e4m3fn).double()
        assert torch.equal(v64.flatten(0, 1), vals * cache.storage.scales[1][0].double()[None, :, None])
    assert torch.equal(vb, v64.to(torch.bfloat16)) and torch.equal(kb, k64.to(torch.bfloat16))
    if kv != "fp8_e4m3":
        assert torch.equal(k32.double(), k64)
    for bad in ("fp16", torch.int8, "float64"):
        with pytest.raises(hal.InvalidInput, match=r"\[hal.KVCache.read\] dtype must be None"):
            cache.read(0, [0], dtype=bad)


# ---- paged attention on every format, and the suite catching a kernel's dequantization bug --------

def _quant_case(name: str) -> Any:
    return next(c for c in all_cases() if c.id == name)


@pytest.mark.parametrize("kv", hal.dtypes.KV_DTYPES)
def test_cpu_paged_attention_every_dtype_and_block_size(kv: str) -> None:
    """The suite's full-level case: every declared dtype x block size on a tiny batch."""
    out = run_case(hal.get_backend("cpu"), _quant_case(f"quant/block-sizes/{kv}"))
    assert out.status == "pass", out.message


class _WrappedStorage:
    """A cpu storage with a wrong ``fetch`` (the attention side's decode); everything else delegated."""

    def __init__(self, storage: Any) -> None:
        self._s = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)


class _SwappedNibbles(_WrappedStorage):
    """A cpu storage whose attention-side decode swaps int4 nibbles (``read`` stays right)."""

    def fetch(self, layer: int, block_ids: torch.Tensor, start: int, stop: int,
              dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        out = []
        for i, rows in enumerate(self._s.rows):
            raw = rows[layer].index_select(0, block_ids).flatten(0, 1)[start:stop].clone()
            nv = math.ceil(self._s.dims[i] / 2)
            raw[..., :nv] = (raw[..., :nv] << 4) | (raw[..., :nv] >> 4)
            out.append(F.decode("int4", raw, self._s.dims[i], dtype or self._s.spec.torch_dtype))
        return out


class _IgnoresFp8Scale(_WrappedStorage):
    """A cpu storage whose attention-side decode forgets the fp8 scale (``read`` stays right)."""

    def fetch(self, layer: int, block_ids: torch.Tensor, start: int, stop: int,
              dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        return [F.decode(self._s.spec.kv_dtype, rows[layer].index_select(0, block_ids).flatten(0, 1)[start:stop],
                         self._s.dims[i], dtype or self._s.spec.torch_dtype, torch.ones(()))
                for i, rows in enumerate(self._s.rows)]


class _WrongDequantBackend(CpuBackend):
    name = "wrong-dequant"

    def __init__(self, wrap: Any) -> None:
        super().__init__()
        self._wrap = wrap

    def paged_attention(self, q, storage, layer, plan, params, return_lse):  # type: ignore[no-untyped-def]
        return super().paged_attention(q, self._wrap(storage), layer, plan, params, return_lse)


@pytest.mark.parametrize("kv, wrap", [("int4", _SwappedNibbles), ("fp8_e4m3", _IgnoresFp8Scale)])
def test_suite_catches_a_dequantization_bug_in_the_kernel(kv: str, wrap: Any) -> None:
    be = _WrongDequantBackend(wrap)
    bad = run_case(be, _quant_case(f"quant/attention/{kv}/bf16/bs16"))
    assert bad.status == "FAIL" and "golden on the cache's exact values" in bad.message
    assert run_case(be, _quant_case(f"quant/roundtrip/{kv}/from-bf16")).status == "pass"
    assert run_case(hal.get_backend("cpu"), _quant_case(f"quant/attention/{kv}/bf16/bs16")).status == "pass"


def test_reported_numbers_reach_the_matrix_and_the_report(tmp_path: Any) -> None:
    be = hal.get_backend("cpu")
    rep = BackendReport(name="cpu", available=True)
    for kv in ("auto", "int4"):
        rep.outcomes.append(run_case(be, _quant_case(f"quant/attention/{kv}/bf16/bs16")))
    o = rep.outcomes[1]
    assert o.status == "pass" and o.info_row == "int4"
    assert o.info["bytes/token/head (D=128, bf16 model)"] == 144
    assert 0 < o.info["max |out - unquantized|"] < 2 and 0.5 < o.info["argmax agreement"] <= 1
    assert rep.outcomes[0].info["argmax agreement"] == 1.0
    buf = io.StringIO()
    print_matrix([rep], ["quant"], "quick", out=buf)
    text = buf.getvalue()
    assert "reported, not gated" in text and "quant/int4" in text and "144" in text
    path = tmp_path / "r.json"
    write_report(str(path), [rep], ["quant"], "quick", 1.0)
    doc = json.loads(path.read_text())
    assert doc["reported"]["cpu"]["quant/int4"]["bytes/token/head (D=128, bf16 model)"] == 144
