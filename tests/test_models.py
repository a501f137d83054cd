"""Model presets (hal.models) and hal.kv_bytes_per_token against the facts file.

Expected numbers are those of /work/shared/facts/mla-kv-facts.md: §1.1 (DeepSeek-V2 configs), §3.1
(other configs), §3.2 (KV bytes per token) and the checkable claims C1-C5, C9, C10, C12, C14.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest

import hal
from hal.models import ModelPreset, kv_bytes_per_token, list_presets, preset

NAMES = ("llama-3-8b", "llama-3-70b", "baichuan-7b", "deepseek-67b", "deepseek-v2", "deepseek-v2-lite")

# name: (layers, heads, kv heads, head_dim, hidden, max_position, rope_theta, architecture)
CONFIGS = {
    "llama-3-8b": (32, 32, 8, 128, 4096, 8192, 500000.0, "gqa"),
    "llama-3-70b": (80, 64, 8, 128, 8192, 8192, 500000.0, "gqa"),
    "baichuan-7b": (32, 32, 32, 128, 4096, 4096, 10000.0, "mha"),
    "deepseek-67b": (95, 64, 8, 128, 8192, 4096, 10000.0, "gqa"),
    "deepseek-v2": (60, 128, 128, 192, 5120, 163840, 10000.0, "mla"),
    "deepseek-v2-lite": (27, 16, 16, 192, 2048, 163840, 10000.0, "mla"),
}

# facts §3.2: KV elements per token and bytes at BF16 (C1, C2, C5, C14)
KV_ELEMENTS = {"llama-3-8b": 65_536, "llama-3-70b": 163_840, "baichuan-7b": 262_144,
               "deepseek-67b": 194_560, "deepseek-v2": 34_560, "deepseek-v2-lite": 15_552}

MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")


def test_every_required_preset_is_listed() -> None:
    assert set(NAMES) <= set(list_presets())
    assert list_presets() == sorted(list_presets())
    assert hal.models is importlib.import_module("hal.models")
    assert hal.kv_bytes_per_token is kv_bytes_per_token


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_match_the_facts(name: str) -> None:
    p = preset(name)
    layers, heads, kv_heads, head_dim, hidden, max_pos, theta, arch = CONFIGS[name]
    assert (p.num_hidden_layers, p.num_attention_heads, p.num_key_value_heads, p.head_dim) == \
        (layers, heads, kv_heads, head_dim)
    assert (p.hidden_size, p.max_position_embeddings, p.rope_theta, p.architecture) == (hidden, max_pos, theta, arch)
    assert p.name == name and p.is_mla == (arch == "mla")
    if arch != "mla":
        assert p.head_dim * p.num_attention_heads == p.hidden_size
        assert p.v_head_dim == p.head_dim
        assert all(getattr(p, f) is None for f in MLA_FIELDS)
        assert p.rope_scaling is None and p.rope_style == "neox"


def test_deepseek_v2_mla_fields() -> None:
    v2, lite = preset("deepseek-v2"), preset("deepseek-v2-lite")
    for p in (v2, lite):
        assert (p.kv_lora_rank, p.qk_nope_head_dim, p.qk_rope_head_dim, p.v_head_dim) == (512, 128, 64, 128)
        assert p.head_dim == p.qk_nope_head_dim + p.qk_rope_head_dim == 192
        assert p.vocab_size == 102400 and p.rope_style == "gptj"
        # C12: 4096 x 40
        assert p.max_position_embeddings == 163_840 == 4096 * p.rope_scaling["factor"]
        assert dict(p.rope_scaling) == {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert v2.q_lora_rank == 1536
    assert lite.q_lora_rank is None  # V2-Lite does not compress its queries
    assert (v2.intermediate_size, lite.intermediate_size) == (12288, 10944)


def test_parameter_counts() -> None:
    assert (preset("deepseek-v2").num_params, preset("deepseek-v2").num_active_params) == (236e9, 21e9)
    assert (preset("deepseek-v2-lite").num_params, preset("deepseek-v2-lite").num_active_params) == (15.7e9, 2.4e9)
    assert preset("llama-3-8b").num_params == 8_030_261_248
    assert preset("llama-3-70b").num_params == 70_553_706_496
    # facts §6.3 round the BF16 weights of Llama-3-70B to 141.2 GB
    assert abs(preset("llama-3-70b").num_params * 2 / 1e9 - 141.2) < 0.1
    assert abs(preset("baichuan-7b").num_params / 1e9 - 7.0) < 0.01
    assert abs(preset("deepseek-67b").num_params / 1e9 - 67) < 0.5
    assert preset("llama-3-70b").num_active_params is None


@pytest.mark.parametrize("name", NAMES)
def test_kv_elements_and_bf16_bytes(name: str) -> None:
    p = preset(name)
    assert p.kv_elements_per_token == KV_ELEMENTS[name]
    assert kv_bytes_per_token(name) == kv_bytes_per_token(p, "auto") == 2 * KV_ELEMENTS[name]
    assert kv_bytes_per_token(name, "fp8_e4m3") == KV_ELEMENTS[name]  # facts §3.2, 8-bit column


def test_checkable_claims_c1_to_c5_and_c14() -> None:
    assert preset("deepseek-v2").kv_elements_per_token == (512 + 64) * 60 == 34_560          # C1
    assert preset("deepseek-v2-lite").kv_elements_per_token == 576 * 27 == 15_552            # C2
    mha_lite = hal.KVCacheSpec(27, 16, 128)                                                  # C3
    assert kv_bytes_per_token(mha_lite) // 2 == 110_592
    v2 = preset("deepseek-v2")
    assert (v2.kv_lora_rank + v2.qk_rope_head_dim) / (2 * v2.qk_nope_head_dim) == 2.25         # C4
    assert kv_bytes_per_token("deepseek-67b", "auto") == 389_120                             # C5
    assert kv_bytes_per_token("llama-3-70b") == 327_680                                      # C14
    assert kv_bytes_per_token("llama-3-8b") == 131_072


def test_mla_row_is_one_quantization_group() -> None:
    # latent (512) + RoPE key (64) per layer is one row; quantized formats cover the whole row
    assert kv_bytes_per_token("deepseek-v2", "int6") == 60 * (math.ceil(3 * 576 / 4) + 2) == 26_040
    assert kv_bytes_per_token("deepseek-v2", "int8") == 60 * (576 + 2)
    assert kv_bytes_per_token("deepseek-v2", "int4") == 60 * (576 // 2 + 2 * 18)
    assert kv_bytes_per_token("deepseek-v2-lite", "int6") == 27 * 434
    # a GQA model quantizes each K and V head row on its own
    assert kv_bytes_per_token("llama-3-70b", "int8") == 80 * 8 * 2 * (128 + 2)


def test_kv_bytes_per_token_accepts_specs_and_dtype_names() -> None:
    spec = preset("deepseek-v2").kv_cache_spec()
    assert isinstance(spec, hal.MLACacheSpec)
    assert (spec.num_layers, spec.kv_lora_rank, spec.rope_dim, spec.block_size) == (60, 512, 64, 64)
    assert kv_bytes_per_token(spec) == 69_120
    assert kv_bytes_per_token(spec, "int6") == 26_040           # kv_dtype overrides the spec's
    assert kv_bytes_per_token(preset("deepseek-v2").kv_cache_spec(kv_dtype="int6")) == 26_040
    assert kv_bytes_per_token("deepseek-v2", "fp32") == kv_bytes_per_token("deepseek-v2", dtype="fp32") == 138_240
    assert kv_bytes_per_token("deepseek-v2", "fp8") == 34_560    # fp8 = fp8_e4m3
    gqa = preset("llama-3-70b").kv_cache_spec(block_size=32, kv_dtype="fp8_e5m2")
    assert isinstance(gqa, hal.KVCacheSpec) and not isinstance(gqa, hal.MLACacheSpec)
    assert (gqa.num_layers, gqa.num_kv_heads, gqa.head_dim, gqa.v_head_dim, gqa.block_size) == (80, 8, 128, 128, 32)
    assert kv_bytes_per_token(gqa) == 163_840
    with pytest.raises(hal.InvalidInput, match="kv_dtype"):
        kv_bytes_per_token("deepseek-v2", "int3")
    with pytest.raises(hal.InvalidInput, match="preset name"):
        kv_bytes_per_token(42)  # type: ignore[arg-type]


def test_softmax_scale() -> None:
    # C10: 192^-0.5 x mscale(40, 0.707)^2
    m = 0.1 * 0.707 * math.log(40) + 1
    assert abs(m - 1.260804) < 1e-6
    assert abs(preset("deepseek-v2").softmax_scale - 0.114721) < 1e-6
    assert preset("deepseek-v2-lite").softmax_scale == preset("deepseek-v2").softmax_scale
    for name in ("llama-3-8b", "llama-3-70b", "baichuan-7b", "deepseek-67b"):
        assert preset(name).softmax_scale == 128 ** -0.5


def test_rope_raw_parameters_and_spec() -> None:
    assert preset("llama-3-70b").rope_dim == 128 and preset("deepseek-v2").rope_dim == 64
    if importlib.util.find_spec("hal.rope") is None:
        pytest.skip("hal.rope (RopeSpec) is not in the tree yet; raw parameters checked above")
    from hal.rope import RopeSpec

    assert preset("llama-3-8b").rope == RopeSpec(128, theta=500000.0, style="neox")
    assert preset("baichuan-7b").rope == RopeSpec(128, theta=10000.0, style="neox")
    assert preset("deepseek-67b").rope == RopeSpec(128, theta=10000.0, style="neox")
    want = RopeSpec(64, theta=10000.0, style="gptj", scaling="yarn", factor=40.0, original_max_position=4096,
                    beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
    for name in ("deepseek-v2", "deepseek-v2-lite"):
        p = preset(name)
        assert p.rope == want
        assert abs(p.rope.softmax_scale(p.head_dim) - p.softmax_scale) < 1e-12
    if hasattr(want, "yarn_correction_range"):
        assert want.yarn_correction_range() == (10, 23)  # C9


def test_unknown_preset_lists_the_valid_names() -> None:
    with pytest.raises(hal.InvalidInput) as e:
        preset("llama-4-1t")
    for name in NAMES:
        assert name in str(e.value)
    with pytest.raises(hal.InvalidInput):
        preset(None)  # type: ignore[arg-type]


def test_lookup_is_case_insensitive_and_takes_hf_ids() -> None:
    assert preset("DeepSeek-V2") is preset("deepseek-v2")
    assert preset("deepseek-ai/DeepSeek-V2-Lite") is preset("deepseek-v2-lite")
    assert preset("meta-llama/Meta-Llama-3-70B") is preset("llama-3-70b")
    p = preset("llama-3-8b")
    assert preset(p) is p


def test_presets_are_immutable_and_serialisable() -> None:
    p = preset("deepseek-v2")
    assert isinstance(p, ModelPreset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.num_hidden_layers = 61  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.rope_scaling["factor"] = 2  # type: ignore[index]
    hash(p)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["kv_lora_rank"] == 512 and d["rope_scaling"]["type"] == "yarn" and d["q_lora_rank"] == 1536
    assert json.loads(json.dumps(preset("deepseek-v2-lite").to_dict()))["q_lora_rank"] is None
