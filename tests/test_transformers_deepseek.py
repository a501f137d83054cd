"""A client hal did not write: Hugging Face transformers' DeepseekV2 attention against hal.mla.

A tiny random DeepseekV2 model (one layer, 4 heads, latent 32 + RoPE 8, YaRN) runs prefill and then
decode steps with its own cache; a forward hook records what its attention module received and
returned. hal.mla, loaded with the same weights through ``MLAWeights.from_hf_state_dict`` and
``MLAConfig.from_hf``, must give the same output: absorbed (``hal.mla_attention`` over a paged
latent cache) and naive, in fp32.

YaRN conventions (DeepSeek-V2 paper p.13, DeepSeek's reference code, facts §1.4): the softmax scale
is ``qk_head_dim ** -0.5 * yarn_mscale(factor, mscale_all_dim) ** 2`` and cos/sin are multiplied by
``yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)``. hal follows that. transformers'
native DeepseekV2 port once dropped the softmax-scale correction (restored by huggingface/transformers
PR #47435, "Fix yarn mscale_all_dim for DeepSeek v2"): ``test_yarn_softmax_correction`` reports which
convention the installed version uses and shows the difference the correction makes. A second
difference remains in transformers' generic YaRN code: with ``mscale_all_dim`` unset it ignores
``mscale`` for cos/sin (``test_yarn_cos_sin_factor_when_mscale_all_dim_is_unset``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch

import hal
from hal import mla

transformers = pytest.importorskip("transformers")
try:  # DeepseekV2 since transformers 4.55; V3 has the same MLA attention module
    from transformers import DeepseekV2Config as HFConfig
    from transformers import DeepseekV2Model as HFModel
except ImportError:  # pragma: no cover - older transformers
    from transformers import DeepseekV3Config as HFConfig  # type: ignore[no-redef]
    from transformers import DeepseekV3Model as HFModel  # type: ignore[no-redef]

YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}  # DeepSeek-V2's own rope_scaling


def _hf_model(q_lora_rank: int | None, rope_scaling: dict | None = YARN, seed: int = 0) -> Any:
    cfg = HFConfig(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                   n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, rms_norm_eps=1e-6,
                   max_position_embeddings=4096 * 40, rope_theta=10000.0, rope_scaling=rope_scaling,
                   attn_implementation="eager")
    torch.manual_seed(seed)
    model = HFModel(cfg).eval()
    with torch.no_grad():  # random weights everywhere, norms near 1 (HF initialises norms to exactly 1)
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


def _cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def _new_hf_cache(model: Any) -> Any:
    try:
        return transformers.DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older transformers
        return transformers.DynamicCache()


def _run_hf(model: Any, ids: torch.Tensor, steps: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Feed ``ids [B, S]`` in chunks of ``steps`` tokens with one cache; returns, per call, the
    attention module's input hidden states and output, each ``[B, n, hidden]``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen.append((h.detach().clone(), output[0].detach().clone()))

    attn = model.layers[0].self_attn
    handle = attn.register_forward_hook(hook, with_kwargs=True)
    cache = _new_hf_cache(model)
    try:
        start = 0
        with torch.no_grad():
            for n in steps:
                model(input_ids=ids[:, start:start + n], use_cache=True, **_cache_kwargs(model, cache))
                start += n
    finally:
        handle.remove()
    return seen


def _hal_side(model: Any, **rope_overrides: Any) -> tuple[mla.MLAConfig, mla.MLAWeights]:
    cfg = mla.MLAConfig.from_hf(model.config)
    if rope_overrides:
        import dataclasses

        cfg = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, **rope_overrides))
    return cfg, mla.MLAWeights.from_hf_state_dict(model.layers[0].self_attn.state_dict(), cfg)


def _run_hal_absorbed(cfg: mla.MLAConfig, w: mla.MLAWeights, calls: list[tuple[torch.Tensor, torch.Tensor]],
                      scale: float | None = None) -> list[torch.Tensor]:
    """The same calls through mla_forward_absorbed: the B sequences of a call form one batch."""
    bsz, bs = calls[0][0].shape[0], 4
    total = sum(h.shape[1] for h, _ in calls)
    per_seq = -(-total // bs)
    cache = hal.KVCache(cfg.cache_spec(1, block_size=bs, dtype="fp32"), 1 + bsz * per_seq, backend="cpu")
    table = (torch.arange(bsz * per_seq, dtype=torch.int32).view(bsz, per_seq) + 1).flip(0).contiguous()
    done, outs = 0, []
    for h, _ in calls:
        n = h.shape[1]
        pos = torch.arange(done, done + n)
        done += n
        plan = hal.plan(torch.arange(bsz + 1, dtype=torch.int32) * n, torch.full((bsz,), done, dtype=torch.int32),
                        table, cache)
        slots = torch.cat([table[b].long()[pos // bs] * bs + pos % bs for b in range(bsz)])
        out = mla.mla_forward_absorbed(h.reshape(bsz * n, -1), pos.repeat(bsz), w, cfg, cache, 0, plan, slots,
                                       scale=scale)
        outs.append(out.view(bsz, n, -1))
    return outs


def _run_hal_naive(cfg: mla.MLAConfig, w: mla.MLAWeights, calls: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> list[torch.Tensor]:
    bsz = calls[0][0].shape[0]
    past: list[Any] = [None] * bsz
    done, outs = 0, []
    for h, _ in calls:
        n = h.shape[1]
        pos = torch.arange(done, done + n)
        done += n
        per_seq = []
        for b in range(bsz):
            o, past[b] = mla.mla_forward_naive(h[b], pos, w, cfg, past[b])
            per_seq.append(o)
        outs.append(torch.stack(per_seq))
    return outs


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


STEPS = [7, 1, 1, 3]  # prefill 7 tokens, two single-token decodes, one 3-token decode


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["v2-q_lora", "v2-lite-no-q_lora"])
def test_hal_mla_matches_transformers_deepseek_v2(q_lora_rank: int | None) -> None:
    model = _hf_model(q_lora_rank)
    ids = torch.randint(0, 97, (2, sum(STEPS)), generator=torch.Generator().manual_seed(1))
    calls = _run_hf(model, ids, STEPS)
    cfg, w = _hal_side(model)
    assert cfg.rope.style == "gptj" and cfg.rope.scaling == "yarn" and cfg.q_lora_rank == q_lora_rank
    attn = model.layers[0].self_attn
    if not math.isclose(attn.scaling, cfg.softmax_scale, rel_tol=1e-12):  # pragma: no cover - old transformers
        attn.scaling = cfg.softmax_scale  # it dropped YaRN's mscale^2: compare the rest of the block
        calls = _run_hf(model, ids, STEPS)
    hf_out = [o for _, o in calls]
    absorbed = _run_hal_absorbed(cfg, w, calls)
    naive = _run_hal_naive(cfg, w, calls)
    d_prefill = _max_diff(absorbed[:1], hf_out[:1])
    d_decode = _max_diff(absorbed[1:], hf_out[1:])
    d_naive = _max_diff(naive, hf_out)
    mag = max(float(o.abs().max()) for o in hf_out)
    print(f"\ntransformers {transformers.__version__} DeepseekV2Attention vs hal.mla (fp32, q_lora_rank={q_lora_rank}, "
          f"|out| <= {mag:.2f}): max |diff| absorbed prefill {d_prefill:.2e}, absorbed decode {d_decode:.2e}, "
          f"naive {d_naive:.2e}")
    assert max(d_prefill, d_decode, d_naive) < 2e-5 * max(1.0, mag)


def test_deepseek_rope_pairs_interleaved_channels() -> None:
    """A NeoX (halves) RoPE on DeepSeek's weights is finite but wrong (facts §1.2)."""
    model = _hf_model(None)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    calls = _run_hf(model, ids, [9])
    cfg, w = _hal_side(model, style="neox")
    wrong = _run_hal_absorbed(cfg, w, calls)
    assert _max_diff(wrong, [o for _, o in calls]) > 1e-3


def test_yarn_softmax_correction() -> None:
    """hal follows the paper: softmax scale x yarn_mscale(40, 0.707)^2. Dropping that factor (what
    transformers' DeepseekV2 did before PR #47435) changes the output once a query sees 2+ keys."""
    model = _hf_model(32)
    attn = model.layers[0].self_attn
    cfg, w = _hal_side(model)
    paper = cfg.softmax_scale
    dropped = cfg.qk_head_dim ** -0.5
    assert paper == pytest.approx(dropped * 1.589626, rel=1e-6)
    convention = ("the paper's (mscale_all_dim^2 applied)" if math.isclose(attn.scaling, paper, rel_tol=1e-12)
                  else "without YaRN's mscale^2" if math.isclose(attn.scaling, dropped, rel_tol=1e-12)
                  else f"unknown ({attn.scaling})")
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    attn.scaling = dropped  # the convention without the correction
    calls = _run_hf(model, ids, [6, 1, 1])
    hf_dropped = [o for _, o in calls]
    hal_paper = _run_hal_absorbed(cfg, w, calls)
    hal_dropped = _run_hal_absorbed(cfg, w, calls, scale=dropped)
    diff = _max_diff(hal_paper, hf_dropped)
    print(f"\ntransformers {transformers.__version__} DeepseekV2 softmax scale: {convention}; hal: the paper's "
          f"({paper:.6f} = 24^-0.5 x 1.589626). Without the correction the output moves by {diff:.3g}")
    assert _max_diff(hal_dropped, hf_dropped) < 2e-5  # same math once the scales agree
    assert diff > 1e-3  # and the correction is visible
    assert convention.startswith(("the paper", "without"))  # one of the two known conventions


def test_yarn_cos_sin_factor_matches_when_both_mscales_are_set() -> None:
    """mscale 1.0 / mscale_all_dim 0.8: cos/sin x mscale(40, 1) / mscale(40, 0.8) in both libraries."""
    model = _hf_model(None, dict(YARN, mscale=1.0, mscale_all_dim=0.8))
    cfg, w = _hal_side(model)
    want = (0.1 * math.log(40) + 1) / (0.08 * math.log(40) + 1)
    assert cfg.rope.attention_factor == pytest.approx(want, rel=1e-12)
    assert model.rotary_emb.attention_scaling == pytest.approx(want, rel=1e-6)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    calls = _run_hf(model, ids, [5, 1])
    assert _max_diff(_run_hal_absorbed(cfg, w, calls), [o for _, o in calls]) < 2e-5


def test_yarn_cos_sin_factor_when_mscale_all_dim_is_unset() -> None:
    """DeepSeek's formula (hal): cos/sin x mscale(s, mscale) / mscale(s, mscale_all_dim = 0) =
    0.1 * mscale * ln(s) + 1. transformers' generic YaRN uses 0.1 * ln(s) + 1 unless both are set,
    ignoring mscale. The two agree only at mscale = 1 (the paper's generic YaRN)."""
    scaling = {k: v for k, v in YARN.items() if k != "mscale_all_dim"}
    model = _hf_model(None, dict(scaling, mscale=0.5))
    cfg, _ = _hal_side(model)
    hal_factor, hf_factor = cfg.rope.attention_factor, float(model.rotary_emb.attention_scaling)
    print(f"\nYaRN cos/sin factor, factor 40, mscale 0.5, no mscale_all_dim: hal (DeepSeek) {hal_factor:.6f}, "
          f"transformers {transformers.__version__} {hf_factor:.6f}")
    assert hal_factor == pytest.approx(0.05 * math.log(40) + 1, rel=1e-12)
    if hf_factor != pytest.approx(hal_factor, rel=1e-6):
        assert hf_factor == pytest.approx(0.1 * math.log(40) + 1, rel=1e-6)
    generic = _hf_model(None, dict(scaling, mscale=1.0))
    assert float(generic.rotary_emb.attention_scaling) == pytest.approx(
        mla.MLAConfig.from_hf(generic.config).rope.attention_factor, rel=1e-6)


def test_rope_frequencies_match_transformers() -> None:
    """inv_freq of yarn (DeepseekV2's rotary embedding) and llama3 (Llama-3.1) against transformers."""
    model = _hf_model(None)
    ours = mla.MLAConfig.from_hf(model.config).rope.inv_freq()
    assert torch.allclose(model.rotary_emb.inv_freq.double(), ours, rtol=1e-6, atol=0)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    llama_cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, rope_theta=500000.0,
                                         rope_scaling=llama3, max_position_embeddings=131072)
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(llama_cfg).inv_freq.double()
    spec = hal.RopeSpec(128, 500000.0, scaling="llama3", factor=8.0, original_max_position=8192)
    assert torch.allclose(hf, spec.inv_freq(), rtol=1e-6, atol=0)
