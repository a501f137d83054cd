"""hal.RopeSpec and hal.rope: validation, hand-computed values, the reference helpers, the figures."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import hal
from hal.conformance import cases_for_level
from hal.conformance.runner import run_case
from hal.reference import rope_inv_freq_reference, rope_reference

DS_V2 = dict(scaling="yarn", factor=40.0, original_max_position=4096, beta_fast=32, beta_slow=1, mscale=0.707,
             mscale_all_dim=0.707)


# ---- RopeSpec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=7), r"dim must be an even int >= 2 \(the rotated channels\), got 7"),
    (dict(dim=True), r"dim must be an even int >= 2"),
    (dict(dim=64, theta=0.0), r"theta must be > 0, got 0.0"),
    (dict(dim=64, theta=float("nan")), r"theta must be a finite number, got nan"),
    (dict(dim=64, style="halves"), r"style must be 'neox' \(halves\) or 'gptj' \(interleaved pairs\), got 'halves'"),
    (dict(dim=64, scaling="dynamic"), r"scaling must be one of \[None, 'linear', 'ntk', 'yarn', 'llama3'\], "
                                      r"got 'dynamic'"),
    (dict(dim=64, scaling="linear", factor=-2.0), r"factor must be > 0, got -2.0"),
    (dict(dim=64, scaling="yarn", factor=40.0), r"scaling='yarn' needs original_max_position"),
    (dict(dim=64, scaling="llama3", factor=8.0, original_max_position=8192, low_freq_factor=4.0,
          high_freq_factor=1.0), r"llama3 scaling needs high_freq_factor > low_freq_factor, got 1.0 and 4.0"),
    (dict(dim=64, scaling="yarn", factor=4.0, original_max_position=4096, beta_fast=1, beta_slow=32),
     r"yarn scaling needs beta_fast > beta_slow"),
    (dict(dim=64, mscale=-0.1), r"mscale must be >= 0, got -0.1"),
    (dict(dim=64, original_max_position=4096.0), r"original_max_position must be an int >= 1 or None, got 4096.0"),
    (dict(dim=2, scaling="ntk", factor=2.0), r"scaling='ntk' needs dim >= 4, got 2"),
])
def test_rope_spec_rejects_bad_fields(kwargs: dict, message: str) -> None:
    with pytest.raises(hal.InvalidInput, match=r"^\[hal\.RopeSpec\] " + message):
        hal.RopeSpec(**kwargs)


def test_rope_spec_is_frozen_and_keeps_the_preset_keywords() -> None:
    spec = hal.RopeSpec(64, 10000.0, style="gptj", **DS_V2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dim = 32  # type: ignore[misc]
    names = [f.name for f in dataclasses.fields(hal.RopeSpec)]
    assert names == ["dim", "theta", "style", "scaling", "factor", "original_max_position", "low_freq_factor",
                     "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"]
    assert hal.RopeSpec(64) == hal.RopeSpec(64, 10000.0, style="neox", scaling=None)


def test_unscaled_frequencies_and_magnitudes() -> None:
    spec = hal.RopeSpec(8, 10000.0)
    assert spec.inv_freq().dtype == torch.float64
    assert spec.inv_freq().tolist() == pytest.approx([1.0, 0.1, 0.01, 0.001], rel=1e-15)
    assert (spec.attention_factor, spec.softmax_scale_multiplier) == (1.0, 1.0)
    assert spec.softmax_scale(64) == 0.125


def test_linear_and_ntk_scaling() -> None:
    base = hal.RopeSpec(8, 10000.0).inv_freq()
    assert torch.allclose(hal.RopeSpec(8, 10000.0, scaling="linear", factor=4.0).inv_freq(), base / 4, rtol=1e-15)
    ntk = hal.RopeSpec(8, 10000.0, scaling="ntk", factor=4.0).inv_freq()
    # static NTK: base 10000 * 4^(8/6); the highest frequency stays 1, the lowest is divided by exactly 4
    assert ntk[0] == 1.0 and float(ntk[-1] / base[-1]) == pytest.approx(1 / 4, rel=1e-12)


def test_deepseek_v2_yarn_figures() -> None:
    """facts §5.2 item 3 and C9-C11."""
    spec = hal.RopeSpec(64, 10000.0, style="gptj", **DS_V2)
    assert spec.yarn_correction_range() == (10, 23)
    from hal.rope import yarn_mscale

    assert yarn_mscale(40.0, 0.707) == pytest.approx(1.260804, abs=5e-7)
    assert spec.softmax_scale_multiplier == pytest.approx(1.589626, abs=5e-7)
    assert spec.softmax_scale(192) == pytest.approx(0.114721, abs=5e-7)
    assert spec.attention_factor == 1.0
    inv = spec.inv_freq()
    for i, want in ((0, 1.0), (10, 5.6234e-2), (16, 5.5000e-3), (23, 3.3338e-5), (31, 3.3338e-6)):
        assert float(inv[i]) == pytest.approx(want, rel=5e-5), i
    # below the range frequencies are kept, above it divided by 40
    base = spec.base_inv_freq()
    assert torch.equal(inv[:11], base[:11]) and torch.allclose(inv[23:], base[23:] / 40, rtol=1e-15)


def test_generic_yarn_defaults_are_the_papers() -> None:
    """mscale=1, mscale_all_dim=0 (the defaults): cos/sin times 0.1 ln s + 1, softmax unchanged."""
    spec = hal.RopeSpec(128, 1e6, scaling="yarn", factor=4.0, original_max_position=32768)
    assert spec.attention_factor == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-15)
    assert spec.softmax_scale_multiplier == 1.0
    # DeepSeek's ratio with mscale_all_dim = 0 keeps mscale (Hugging Face would ignore it: see attention_factor)
    assert hal.RopeSpec(64, scaling="yarn", factor=40.0, original_max_position=4096,
                        mscale=0.5).attention_factor == pytest.approx(0.05 * math.log(40.0) + 1.0, rel=1e-15)


def test_llama3_band_split_29_6_29() -> None:
    spec = hal.RopeSpec(128, 500000.0, scaling="llama3", factor=8.0, original_max_position=8192)
    ratio = spec.inv_freq() / spec.base_inv_freq()
    assert int((ratio == 1).sum()) == 29
    assert int(torch.isclose(ratio, torch.full_like(ratio, 1 / 8), rtol=1e-14, atol=0).sum()) == 29
    smoothed = ratio[29:35]
    assert bool(((smoothed < 1) & (smoothed > 1 / 8)).all()) and bool((smoothed[1:] < smoothed[:-1]).all())


@pytest.mark.parametrize("kw", [{}, dict(scaling="linear", factor=2.0), dict(scaling="ntk", factor=3.0),
                                dict(scaling="llama3", factor=8.0, original_max_position=8192),
                                dict(scaling="yarn", factor=16.0, original_max_position=2048, beta_fast=16,
                                     beta_slow=2),
                                DS_V2])
def test_inv_freq_matches_the_pair_by_pair_reference(kw: dict) -> None:
    for dim, theta in ((64, 10000.0), (128, 500000.0)):
        spec = hal.RopeSpec(dim, theta, **kw)
        assert torch.allclose(spec.inv_freq(), rope_inv_freq_reference(spec), rtol=1e-13, atol=0)


# ---- rope() --------------------------------------------------------------------------------------

def test_rope_hand_computed_pair() -> None:
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]], dtype=torch.float64)  # [T=2, H=1, 2]
    out = hal.rope(x, torch.tensor([3, 5]), hal.RopeSpec(2))
    assert torch.allclose(out[0, 0], torch.tensor([math.cos(3), math.sin(3)], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(out[1, 0], torch.tensor([-2 * math.sin(5), 2 * math.cos(5)], dtype=torch.float64),
                          atol=1e-15)
    for style in ("neox", "gptj"):  # the reference too (one pair: both pairings are the same)
        ref = rope_reference(x, [3, 5], torch.tensor([1.0], dtype=torch.float64), style=style, attention_factor=2.0)
        assert torch.allclose(ref, 2 * out, atol=1e-15)


def test_position_zero_is_the_identity_and_dtypes_are_kept() -> None:
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, 2, 16).to(dt)
        out = hal.rope(x, torch.zeros(3, dtype=torch.int32), hal.RopeSpec(16, style="gptj"))
        assert out.dtype == dt and out.shape == x.shape and torch.equal(out, x)


def test_int32_and_int64_positions_agree_and_numpy_round_trips() -> None:
    x = torch.randn(4, 3, 32)
    spec = hal.RopeSpec(32, 500000.0)
    a = hal.rope(x, torch.tensor([0, 7, 1000, 131071], dtype=torch.int32), spec)
    b = hal.rope(x, torch.tensor([0, 7, 1000, 131071], dtype=torch.int64), spec)
    assert torch.equal(a, b)
    c = hal.rope(x.numpy(), np.array([0, 7, 1000, 131071]), spec)
    assert isinstance(c, np.ndarray) and np.array_equal(c, a.numpy())


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rope_matches_complex_reference_at_far_positions(style: str) -> None:
    """Angles in float64: at 10^6 positions fp32 output stays within a few ulps of the float64 reference."""
    spec = hal.RopeSpec(128, 10000.0, style=style, scaling="yarn", factor=4.0, original_max_position=4096)
    x = torch.randn(5, 2, 128)
    pos = torch.tensor([0, 1, 4095, 163839, 1_000_000])
    ref = rope_reference(x, pos, spec.inv_freq(), style=style, attention_factor=spec.attention_factor)
    assert (hal.rope(x, pos, spec).double() - ref).abs().max() < 2e-6


def test_partial_rotary_rotates_the_first_dim_channels_only() -> None:
    x = torch.randn(6, 2, 96)
    spec = hal.RopeSpec(64, style="gptj")
    pos = torch.arange(6) * 11
    out = hal.rope(x, pos, spec)
    assert torch.equal(out[..., 64:], x[..., 64:])
    assert torch.equal(out[..., :64], hal.rope(x[..., :64].contiguous(), pos, spec))


def test_neox_and_gptj_differ_by_a_channel_permutation() -> None:
    """gptj on x equals neox on x with its channels de-interleaved (HF modeling_deepseek's trick)."""
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    pos = torch.arange(5) * 100
    perm = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])  # (0, 2, ..., 14, 1, 3, ..., 15)
    gptj = hal.rope(x, pos, hal.RopeSpec(16, style="gptj"))
    neox = hal.rope(x[..., perm], pos, hal.RopeSpec(16, style="neox"))
    assert torch.allclose(gptj[..., perm], neox, atol=1e-14)


X3 = torch.zeros(3, 1, 8)


@pytest.mark.parametrize("call, message", [
    (lambda s: hal.rope(torch.zeros(3, 8), torch.arange(3), s),
     r"x must be 3-D \[T, H, D\] \(token-major\), got shape \[3, 8\]"),
    (lambda s: hal.rope(X3.long(), torch.arange(3), s), r"x must be fp32, fp16, bf16 or fp64"),
    (lambda s: hal.rope(X3[..., :4], torch.arange(3), s), r"spec\.dim=8 rotates more channels than x has \(D=4\)"),
    (lambda s: hal.rope(X3, torch.arange(3.0), s), r"positions must be int32/int64 \[T\], got float32 \[3\]"),
    (lambda s: hal.rope(X3, torch.arange(4), s), r"positions has 4 entries but x has 3 tokens"),
    (lambda s: hal.rope(X3, torch.arange(3), {"dim": 8}), r"spec must be a hal\.RopeSpec, got dict"),
    (lambda s: hal.rope([1.0], torch.arange(1), s), r"x must be a torch\.Tensor, numpy\.ndarray or jax\.Array"),
])
def test_rope_rejects_bad_input(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(hal.InvalidInput, match=r"^\[hal\.rope\] " + message):
        call(hal.RopeSpec(8))


def test_rope_family_passes_on_cpu() -> None:
    backend = hal.get_backend("cpu")
    for case in cases_for_level("quick"):
        if case.family == "rope":
            outcome = run_case(backend, case)
            assert outcome.status == "pass", f"{case.id}: {outcome.message}"
