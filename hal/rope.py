"""Rotary position embeddings (RoFormer, arXiv:2104.09864) and their length-extension variants.

``hal.RopeSpec`` describes one model's RoPE; ``hal.rope(x, positions, spec)`` rotates ``x``.
Frequencies and angles are computed in float64 on the host side of the math (the position times
frequency product is where float32 loses digits at 100K+ positions), then the rotation runs in
fp32 and the result is rounded to ``x``'s dtype.

Pairing (``style``):
- ``"neox"``: channel ``i`` pairs with ``i + dim/2`` (GPT-NeoX, Llama, Hugging Face ``rotate_half``);
- ``"gptj"``: channel ``2i`` pairs with ``2i + 1`` (GPT-J, Meta's Llama ``view_as_complex``, DeepSeek-V2).
Pair ``i`` turns by ``position * inv_freq[i]`` in both styles; only the channel layout differs.

Scaling (``scaling``), with ``theta_i = theta ** (-2i / dim)``:
- ``None``: ``theta_i``;
- ``"linear"`` (position interpolation, arXiv:2306.15595): ``theta_i / factor``;
- ``"ntk"`` (static NTK-aware): base ``theta * factor ** (dim / (dim - 2))``;
- ``"yarn"`` (arXiv:2309.00071, as DeepSeek-V2 and Hugging Face compute it): pairs below the
  correction range keep ``theta_i``, pairs above it use ``theta_i / factor``, a linear ramp in
  between. ``cos``/``sin`` are multiplied by ``yarn_mscale(factor, mscale) /
  yarn_mscale(factor, mscale_all_dim)`` (``attention_factor``) and the softmax scale by
  ``yarn_mscale(factor, mscale_all_dim) ** 2`` (``softmax_scale_multiplier``), where
  ``yarn_mscale(s, m) = 0.1 * m * ln(s) + 1`` (1 for ``s <= 1``). With the defaults ``mscale=1``,
  ``mscale_all_dim=0`` this is the paper's generic YaRN (``attention_factor = 0.1 ln s + 1``, softmax
  unchanged); DeepSeek-V2 sets both to 0.707 (cos/sin factor 1.0, softmax x 1.589626). hal follows
  DeepSeek's reference code and the paper, including where Hugging Face differs (see
  ``attention_factor``). YaRN is applied at every position, as Hugging Face does (DeepSeek's
  reference code switches it on only when the run's max length exceeds ``original_max_position``:
  a runtime decides that by choosing the spec);
- ``"llama3"`` (Meta's ``apply_scaling``): wavelengths shorter than ``original_max_position /
  high_freq_factor`` keep their frequency, longer than ``original_max_position / low_freq_factor``
  are divided by ``factor``, a smooth blend in between.

Partial rotary: when ``spec.dim`` is smaller than ``x``'s last dim, only the first ``spec.dim``
channels rotate and the rest pass through unchanged (GPT-NeoX ``rotary_pct``, Phi, ChatGLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from hal.arrays import array_kind, from_torch, to_torch
from hal.errors import InvalidInput

__all__ = ["RopeSpec", "rope", "yarn_mscale", "STYLES", "SCALINGS"]

STYLES = ("neox", "gptj")
SCALINGS = (None, "linear", "ntk", "yarn", "llama3")

_OP = "hal.RopeSpec"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1.0 when ``factor <= 1``)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _real(name: str, value: Any, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InvalidInput(f"[{_OP}] {name} must be a finite number, got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise InvalidInput(f"[{_OP}] {name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise InvalidInput(f"[{_OP}] {name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class RopeSpec:
    """One model's rotary embedding: ``dim`` rotated channels (even), base ``theta``, pairing
    ``style`` ("neox" | "gptj") and optional length-extension ``scaling`` (None | "linear" | "ntk" |
    "yarn" | "llama3") with its parameters. Field names follow SPEC section 3; presets build it from
    Hugging Face configs with exactly these keywords."""

    dim: int
    theta: float = 10000.0
    style: str = field(default="neox", kw_only=True)
    scaling: str | None = field(default=None, kw_only=True)
    factor: float = field(default=1.0, kw_only=True)
    original_max_position: int | None = field(default=None, kw_only=True)
    low_freq_factor: float = field(default=1.0, kw_only=True)
    high_freq_factor: float = field(default=4.0, kw_only=True)
    beta_fast: float = field(default=32, kw_only=True)
    beta_slow: float = field(default=1, kw_only=True)
    mscale: float = field(default=1.0, kw_only=True)
    mscale_all_dim: float = field(default=0.0, kw_only=True)

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 2 or self.dim % 2:
            raise InvalidInput(f"[{_OP}] dim must be an even int >= 2 (the rotated channels), got {self.dim!r}")
        object.__setattr__(self, "theta", _real("theta", self.theta, positive=True))
        if self.style not in STYLES:
            raise InvalidInput(f"[{_OP}] style must be 'neox' (halves) or 'gptj' (interleaved pairs), "
                               f"got {self.style!r}")
        if self.scaling not in SCALINGS:
            raise InvalidInput(f"[{_OP}] scaling must be one of {list(SCALINGS)}, got {self.scaling!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            object.__setattr__(self, name, _real(name, getattr(self, name), positive=True))
        for name in ("mscale", "mscale_all_dim"):
            object.__setattr__(self, name, _real(name, getattr(self, name), non_negative=True))
        omp = self.original_max_position
        if omp is not None and (isinstance(omp, bool) or not isinstance(omp, int) or omp < 1):
            raise InvalidInput(f"[{_OP}] original_max_position must be an int >= 1 or None, got {omp!r}")
        if self.scaling in ("yarn", "llama3") and omp is None:
            raise InvalidInput(f"[{_OP}] scaling={self.scaling!r} needs original_max_position (the trained "
                               f"context length, Hugging Face original_max_position_embeddings)")
        if self.scaling == "ntk" and self.dim < 4:
            raise InvalidInput(f"[{_OP}] scaling='ntk' needs dim >= 4, got {self.dim}")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise InvalidInput(f"[{_OP}] llama3 scaling needs high_freq_factor > low_freq_factor, got "
                               f"{self.high_freq_factor} and {self.low_freq_factor}")
        if self.scaling == "yarn" and not self.beta_fast > self.beta_slow:
            raise InvalidInput(f"[{_OP}] yarn scaling needs beta_fast > beta_slow, got {self.beta_fast} and "
                               f"{self.beta_slow}")

    # ---- frequencies -------------------------------------------------------------------------
    def base_inv_freq(self) -> torch.Tensor:
        """Unscaled frequencies ``theta ** (-2i / dim)``: float64 ``[dim/2]``."""
        i = torch.arange(0, self.dim, 2, dtype=torch.float64)
        return self.theta ** (-i / self.dim)

    def yarn_correction_range(self) -> tuple[int, int]:
        """YaRN's ``(low, high)`` pair indices: below ``low`` frequencies are kept, above ``high``
        divided by ``factor`` (DeepSeek-V2: 10, 23)."""
        d, b, omp = self.dim, self.theta, self.original_max_position or 1

        def correction_dim(rotations: float) -> float:  # the pair that turns `rotations` times in omp
            return d * math.log(omp / (rotations * 2 * math.pi)) / (2 * math.log(b))

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), d - 1)
        return low, high

    def inv_freq(self) -> torch.Tensor:
        """The frequency of each rotated pair after scaling: float64 ``[dim/2]``."""
        f = self.base_inv_freq()
        if self.scaling is None:
            return f
        if self.scaling == "linear":
            return f / self.factor
        if self.scaling == "ntk":
            theta = self.theta * self.factor ** (self.dim / (self.dim - 2))
            return theta ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
        if self.scaling == "yarn":
            low, high = self.yarn_correction_range()
            span = (high - low) if high != low else 0.001
            ramp = ((torch.arange(self.dim // 2, dtype=torch.float64) - low) / span).clamp(0.0, 1.0)
            return f / self.factor * ramp + f * (1.0 - ramp)
        # llama3
        omp = float(self.original_max_position)  # type: ignore[arg-type]
        wavelen = 2 * math.pi / f
        smooth = (omp / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * f / self.factor + smooth * f
        out = torch.where(wavelen > omp / self.low_freq_factor, f / self.factor, blended)
        return torch.where(wavelen < omp / self.high_freq_factor, f, out)

    # ---- magnitudes --------------------------------------------------------------------------
    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by: ``yarn_mscale(factor, mscale) / yarn_mscale(factor,
        mscale_all_dim)`` for YaRN (DeepSeek's reference code; 1.0 for DeepSeek-V2), 1.0 otherwise.

        Hugging Face's ``_compute_yarn_parameters`` uses this ratio only when both ``mscale`` and
        ``mscale_all_dim`` are non-zero and ``0.1 ln(factor) + 1`` otherwise, so for ``mscale != 1``
        with ``mscale_all_dim = 0`` it ignores ``mscale``; hal keeps DeepSeek's formula."""
        if self.scaling != "yarn":
            return 1.0
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)

    @property
    def softmax_scale_multiplier(self) -> float:
        """What the softmax scale ``head_dim ** -0.5`` is multiplied by: ``yarn_mscale(factor,
        mscale_all_dim) ** 2`` for YaRN (DeepSeek-V2: 1.589626), 1.0 otherwise."""
        if self.scaling != "yarn":
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2

    def softmax_scale(self, qk_head_dim: int) -> float:
        """``qk_head_dim ** -0.5 * softmax_scale_multiplier`` (DeepSeek-V2, qk_head_dim 192: 0.114721)."""
        return qk_head_dim ** -0.5 * self.softmax_scale_multiplier

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 ``cos, sin [T, dim/2]`` of ``positions [T]``, times ``attention_factor``."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq().to(positions.device)[None, :]
        a = self.attention_factor
        return torch.cos(angles) * a, torch.sin(angles) * a


def rope(x: Any, positions: Any, spec: RopeSpec) -> Any:
    """Rotate ``x [T, H, D]`` (fp32/fp16/bf16/fp64) by ``positions [T]`` (int32/int64) under ``spec``.

    The first ``spec.dim`` channels of the last dim rotate (``spec.dim <= D``; the rest pass through:
    partial rotary). Angles are float64, the rotation fp32 (float64 for float64 input); returns a
    new tensor of ``x``'s shape and dtype. Pairing follows ``spec.style``.
    """
    op = "hal.rope"
    if not isinstance(spec, RopeSpec):
        raise InvalidInput(f"[{op}] spec must be a hal.RopeSpec, got {type(spec).__name__}")
    like = array_kind(x)
    x = to_torch(op, "x", x)
    pos = to_torch(op, "positions", positions)
    if x.dim() != 3:
        raise InvalidInput(f"[{op}] x must be 3-D [T, H, D] (token-major), got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise InvalidInput(f"[{op}] x must be fp32, fp16, bf16 or fp64, got {x.dtype}")
    if spec.dim > x.shape[2]:
        raise InvalidInput(f"[{op}] spec.dim={spec.dim} rotates more channels than x has (D={x.shape[2]})")
    if pos.dim() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise InvalidInput(f"[{op}] positions must be int32/int64 [T], got "
                           f"{str(pos.dtype).replace('torch.', '')} {list(pos.shape)}")
    if pos.shape[0] != x.shape[0]:
        raise InvalidInput(f"[{op}] positions has {pos.shape[0]} entries but x has {x.shape[0]} tokens")
    if pos.device != x.device:
        raise InvalidInput(f"[{op}] positions is on {pos.device} but x is on {x.device}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = spec.cos_sin(pos)  # [T, dim/2] float64
    cos, sin = cos.to(work)[:, None, :], sin.to(work)[:, None, :]  # [T, 1, dim/2]
    rot = x[..., :spec.dim].to(work)  # [T, H, dim]
    half = spec.dim // 2
    if spec.style == "neox":  # pairs (i, i + dim/2)
        a, b = rot[..., :half], rot[..., half:]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:  # gptj: pairs (2i, 2i + 1)
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    out = torch.cat([rotated.to(x.dtype), x[..., spec.dim:]], dim=-1) if spec.dim < x.shape[2] \
        else rotated.to(x.dtype)
    return from_torch(out, like)
