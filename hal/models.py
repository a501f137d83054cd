"""Model presets: the attention and KV-cache shape of a few public models, with Hugging Face field names.

``hal.models.preset("deepseek-v2")`` returns an immutable :class:`ModelPreset` whose attributes are
named as in the model's HF ``config.json`` (``num_hidden_layers``, ``num_key_value_heads``,
``kv_lora_rank``, ...), plus what hal derives from them: ``rope`` (a ``hal.RopeSpec``),
``softmax_scale``, ``kv_cache_spec()`` and ``num_params`` (for weight memory).
``hal.kv_bytes_per_token(model, kv_dtype)`` gives the cache bytes a token costs over all layers.

Every number comes from /work/shared/facts/mla-kv-facts.md (cited below by section, which in turn
cites the HF configs, the DeepSeek-V2 paper and the reference code); the few fields the facts do
not give say where they come from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from hal.dtypes import DTYPES
from hal.errors import InvalidInput
from hal.kv_cache import KVCacheSpec, MLACacheSpec

if TYPE_CHECKING:
    from hal.rope import RopeSpec

__all__ = ["ModelPreset", "preset", "list_presets", "kv_bytes_per_token"]


def _yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention-temperature factor: ``0.1 * mscale * ln(factor) + 1`` for factor > 1, else 1
    (``yarn_get_mscale`` in DeepSeek's and HF's code; facts §1.4)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class ModelPreset:
    """One model's attention-relevant config, HF field names. MLA-only fields are None elsewhere.

    ``architecture``: "mha" | "gqa" | "mla". ``head_dim``: the q/k head dim attention uses (for MLA
    ``qk_nope_head_dim + qk_rope_head_dim`` = 192, the dim the softmax scale is computed from).
    ``num_params``: total parameters (MoE: all experts), for weight memory; ``num_active_params``:
    per token (MoE only). ``rope_style``: "neox" (rotate halves, the HF Llama layout) or "gptj"
    (interleaved pairs, the DeepSeek-V2 weights' layout).
    """

    name: str
    hf_id: str
    architecture: str
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int | None
    max_position_embeddings: int
    num_params: int
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None = field(default=None, hash=False)
    rope_style: str = "neox"
    v_head_dim: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    num_active_params: int | None = None

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", MappingProxyType(dict(self.rope_scaling)))
        if self.v_head_dim is None and self.architecture != "mla":
            object.__setattr__(self, "v_head_dim", self.head_dim)

    @property
    def is_mla(self) -> bool:
        return self.architecture == "mla"

    @property
    def rope_dim(self) -> int:
        """Channels RoPE rotates per head: ``qk_rope_head_dim`` for MLA, ``head_dim`` otherwise."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim  # type: ignore[return-value]

    @property
    def rope(self) -> RopeSpec:
        """The ``hal.RopeSpec`` this model's RoPE uses (built on each access from the raw fields)."""
        from hal.rope import RopeSpec

        s = self.rope_scaling or {}
        kind = s.get("rope_type", s.get("type"))
        if kind is None:
            return RopeSpec(self.rope_dim, theta=self.rope_theta, style=self.rope_style)
        if kind != "yarn":  # pragma: no cover - every preset today is unscaled or YaRN
            raise InvalidInput(f"[hal.models] preset {self.name!r}: rope_scaling type {kind!r} not mapped")
        return RopeSpec(self.rope_dim, theta=self.rope_theta, style=self.rope_style, scaling="yarn",
                        factor=float(s["factor"]),
                        original_max_position=int(s["original_max_position_embeddings"]),
                        beta_fast=s["beta_fast"], beta_slow=s["beta_slow"],
                        mscale=float(s["mscale"]), mscale_all_dim=float(s["mscale_all_dim"]))

    @property
    def softmax_scale(self) -> float:
        """The multiplier of q.k in the softmax: ``head_dim ** -0.5``; for MLA under YaRN also times
        ``yarn_mscale(factor, mscale_all_dim) ** 2`` (DeepSeek's reference code, facts §1.4)."""
        scale = self.head_dim ** -0.5
        s = self.rope_scaling
        if self.is_mla and s is not None and s.get("rope_type", s.get("type")) == "yarn":
            m = _yarn_mscale(float(s["factor"]), float(s.get("mscale_all_dim", 0.0)))
            scale *= m * m
        return scale

    @property
    def kv_elements_per_token(self) -> int:
        """Elements cached per token over all layers, at any precision (the DeepSeek-V2 paper's
        Table 1 measure): K+V heads for MHA/GQA, one latent+RoPE-key row per layer for MLA."""
        if self.is_mla:
            row = self.kv_lora_rank + self.qk_rope_head_dim  # type: ignore[operator]
        else:
            row = self.num_key_value_heads * (self.head_dim + self.v_head_dim)  # type: ignore[operator]
        return row * self.num_hidden_layers

    def kv_cache_spec(self, *, block_size: int | None = None, dtype: str = "bf16",
                      kv_dtype: str = "auto") -> KVCacheSpec | MLACacheSpec:
        """The cache this model needs: ``hal.MLACacheSpec`` for MLA, ``hal.KVCacheSpec`` otherwise
        (``block_size`` None keeps the spec's default: 64 for MLA, 16 otherwise)."""
        extra = {} if block_size is None else {"block_size": block_size}
        if self.is_mla:
            return MLACacheSpec(self.num_hidden_layers, kv_lora_rank=self.kv_lora_rank,  # type: ignore[arg-type]
                                rope_dim=self.qk_rope_head_dim,  # type: ignore[arg-type]
                                dtype=dtype, kv_dtype=kv_dtype, **extra)
        return KVCacheSpec(self.num_hidden_layers, self.num_key_value_heads, self.head_dim,
                           v_head_dim=self.v_head_dim, dtype=dtype, kv_dtype=kv_dtype, **extra)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (HF names; ``rope_scaling`` a plain dict), for JSON."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return d


def _dense_params(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                  intermediate: int, vocab: int) -> int:
    """Parameters of a Llama-style dense decoder from its config: token embedding and an untied LM
    head (vocab x hidden each), per layer q/k/v/o projections (no biases), a SwiGLU MLP (three
    hidden x intermediate matrices) and two RMSNorm weights, and the final norm."""
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attn + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


# DeepSeek-V2 / V2-Lite YaRN (facts §1.1, from the HF config.json copies; paper p.13 s = 40, alpha 1,
# beta 32; mscale = mscale_all_dim = 0.707 as in the HF config and the paper's 0.0707 ln s + 1).
_DEEPSEEK_V2_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

_PRESETS: dict[str, ModelPreset] = {p.name: p for p in (
    # facts §3.1: llama-models sku_list.py (dim 4096, 32 layers, 32 heads, 8 KV heads, theta 5e5,
    # no scaled rope), trained on 8,192 tokens. intermediate_size 14336 (ffn_dim_multiplier 1.3,
    # multiple_of 1024) and vocab_size 128256 from the HF config.json of meta-llama/Meta-Llama-3-8B
    # (not in the facts); num_params = 8,030,261,248 by _dense_params. HF layout: rotate-half (neox).
    ModelPreset(name="llama-3-8b", hf_id="meta-llama/Meta-Llama-3-8B", architecture="gqa",
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                hidden_size=4096, intermediate_size=14336, vocab_size=128256,
                max_position_embeddings=8192, rope_theta=500000.0,
                num_params=_dense_params(4096, 32, 32, 8, 128, 14336, 128256)),
    # facts §3.1: dim 8192, 80 layers, 64 heads, 8 KV heads, ffn_dim_multiplier 1.3, multiple_of
    # 4096 -> intermediate 28672; vocab as 8B. num_params = 70,553,706,496 (the facts round the BF16
    # weights to 141.2 GB, i.e. 70.6e9 params; this exact count gives 141.1 GB).
    ModelPreset(name="llama-3-70b", hf_id="meta-llama/Meta-Llama-3-70B", architecture="gqa",
                num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                hidden_size=8192, intermediate_size=28672, vocab_size=128256,
                max_position_embeddings=8192, rope_theta=500000.0,
                num_params=_dense_params(8192, 80, 64, 8, 128, 28672, 128256)),
    # facts §3.1: baichuan-inc/Baichuan-7B configuration_baichuan.py + README: 32 layers, 32 heads
    # (MHA), head_dim 128, RoPE theta 10000, context 4096, FFN 11008, vocab 64000. Its fused W_pack
    # q/k/v has the same parameter count as separate projections; untied LM head.
    ModelPreset(name="baichuan-7b", hf_id="baichuan-inc/Baichuan-7B", architecture="mha",
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                hidden_size=4096, intermediate_size=11008, vocab_size=64000,
                max_position_embeddings=4096, rope_theta=10000.0,
                num_params=_dense_params(4096, 32, 32, 32, 128, 11008, 64000)),
    # facts §2.1 / §3.1: 95 layers, 64 heads, 8 KV heads (GQA), head_dim 128, theta 10000, context
    # 4096 (HF config as quoted in copies [M]; README "GQA", 4096). Not in the facts, from copies of
    # the HF config.json of deepseek-ai/deepseek-llm-67b-base [M]: intermediate_size 22016, vocab
    # 102400 -> num_params 67,425,001,472 ("67 billion parameters" in the README).
    ModelPreset(name="deepseek-67b", hf_id="deepseek-ai/deepseek-llm-67b-base", architecture="gqa",
                num_hidden_layers=95, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                hidden_size=8192, intermediate_size=22016, vocab_size=102400,
                max_position_embeddings=4096, rope_theta=10000.0,
                num_params=_dense_params(8192, 95, 64, 8, 128, 22016, 102400)),
    # facts §1.1: DeepSeek-V2 236B total / 21B active. num_key_value_heads 128 is the HF field and
    # means nothing for MLA (the cache holds one latent "KV head"). RoPE on the 64 rope dims only,
    # interleaved pairs (facts §1.2: vLLM is_neox_style=False). intermediate_size is the dense FFN of
    # layer 0.
    ModelPreset(name="deepseek-v2", hf_id="deepseek-ai/DeepSeek-V2", architecture="mla",
                num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128, head_dim=128 + 64,
                hidden_size=5120, intermediate_size=12288, vocab_size=102400,
                max_position_embeddings=163840, rope_theta=10000.0, rope_scaling=_DEEPSEEK_V2_YARN,
                rope_style="gptj", v_head_dim=128, q_lora_rank=1536, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64,
                num_params=236_000_000_000, num_active_params=21_000_000_000),
    # facts §1.1: DeepSeek-V2-Lite 15.7B total / 2.4B active; no query compression (q_lora_rank
    # None: a plain q_proj); same latent, RoPE and YaRN as V2.
    ModelPreset(name="deepseek-v2-lite", hf_id="deepseek-ai/DeepSeek-V2-Lite", architecture="mla",
                num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, head_dim=128 + 64,
                hidden_size=2048, intermediate_size=10944, vocab_size=102400,
                max_position_embeddings=163840, rope_theta=10000.0, rope_scaling=_DEEPSEEK_V2_YARN,
                rope_style="gptj", v_head_dim=128, q_lora_rank=None, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64,
                num_params=15_700_000_000, num_active_params=2_400_000_000),
)}


def list_presets() -> list[str]:
    """The preset names, sorted."""
    return sorted(_PRESETS)


def preset(name: str | ModelPreset) -> ModelPreset:
    """The preset called ``name`` (case-insensitive; the HF id works too). Raises ``hal.InvalidInput``
    listing the valid names for an unknown one."""
    if isinstance(name, ModelPreset):
        return name
    if isinstance(name, str):
        key = name.strip().lower()
        for p in _PRESETS.values():
            if key in (p.name, p.hf_id.lower()):
                return p
    raise InvalidInput(f"[hal.models.preset] unknown model {name!r}; valid: {', '.join(list_presets())}")


def split_kv_dtype(kv_dtype: str, dtype: str) -> tuple[str, str]:
    """Accept a model dtype name as a KV dtype ("bf16" -> ("auto", "bf16")) and "fp8" for
    "fp8_e4m3"; return ``(kv_dtype, dtype)``. Anything else passes through to be checked by the spec."""
    if isinstance(kv_dtype, str):
        low = kv_dtype.lower()
        if low in DTYPES or low in ("bfloat16", "float16", "float32"):
            return "auto", low
        if low == "fp8":
            return "fp8_e4m3", dtype
    return kv_dtype, dtype


def kv_bytes_per_token(model: str | ModelPreset | KVCacheSpec | MLACacheSpec, kv_dtype: str | None = None,
                       *, dtype: str | None = None) -> int:
    """Bytes the KV cache stores per token over all layers, K and V (MLA: the latent+RoPE row), scales
    included, in the byte layout of ``hal.kv_formats.row_bytes``.

    ``model``: a preset name, a :class:`ModelPreset` or a cache spec. ``kv_dtype``: a ``hal`` KV
    format ("auto", "fp8_e4m3", "fp8_e5m2", "int8", "int6", "int4"; "bf16"/"fp16"/"fp32" mean "auto"
    in that dtype, "fp8" means "fp8_e4m3"); None keeps the spec's own ("auto" for a preset).
    ``dtype``: the model dtype "auto" stores (None: the spec's own, "bf16" for a preset).
    """
    if isinstance(model, (KVCacheSpec, MLACacheSpec)):
        kv, dt = split_kv_dtype(kv_dtype if kv_dtype is not None else model.kv_dtype, dtype or model.dtype)
        if (kv, dt) != (model.kv_dtype, model.dtype):
            model = dataclasses.replace(model, kv_dtype=kv, dtype=dt)
        return model.bytes_per_token
    if not isinstance(model, (str, ModelPreset)):
        raise InvalidInput(f"[hal.kv_bytes_per_token] model must be a preset name, a hal.models.ModelPreset "
                           f"or a hal.KVCacheSpec/MLACacheSpec, got {type(model).__name__}")
    kv, dt = split_kv_dtype(kv_dtype if kv_dtype is not None else "auto", dtype or "bf16")
    return preset(model).kv_cache_spec(dtype=dt, kv_dtype=kv).bytes_per_token
