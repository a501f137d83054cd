"""DeepSeek-V2's Multi-head Latent Attention block in plain PyTorch: a reference for runtimes.

Paper: DeepSeek-V2 (arXiv:2405.04434) section 2.1 and Appendix C; code: DeepSeek's
``inference/model.py`` (``naive`` and ``absorb`` paths) and Hugging Face's ``DeepseekV2Attention``.
Per token t with hidden state h_t (``H`` heads, latent rank ``R``, RoPE dims ``P``):

    query    c_q = RMSNorm(W_DQ h)  ;  [q_nope; q_pe] = W_UQ c_q    (V2: q_lora_rank 1536)
             [q_nope; q_pe] = W_Q h                                  (V2-Lite: no query compression)
    kv       [c_kv; k_pe] = W_DKV h    (one fused matrix: W_DKV and W_KR, "kv_a_proj_with_mqa")
             c_kv = RMSNorm(c_kv)      -> cached, R values shared by all heads
             k_pe = RoPE(k_pe)         -> cached, P values shared by all heads (decoupled RoPE)
             q_pe = RoPE(q_pe)         per head
    naive    k_h = [W_UK_h c_kv; k_pe],  v_h = W_UV_h c_kv  (decompressed per head: MHA, D 192, Dv 128)
    absorbed q_latent_h = W_UK_h^T q_nope_h (R wide);  scores = q_latent . c_kv + q_pe . k_pe;
             o_latent_h = softmax . c_kv (MQA over the 576-wide cache, hal.mla_attention);
             o_h = W_UV_h o_latent_h
    out      W_O [o_1; ...; o_H]

Both forms use the softmax scale ``(qk_nope + qk_rope) ** -0.5`` (1/sqrt(192), not 1/sqrt(576)),
times ``yarn_mscale(factor, mscale_all_dim) ** 2`` under YaRN (``config.softmax_scale``). RoPE pairs
interleaved channels (style "gptj"), as DeepSeek's weights expect. Weights are stored as
``torch.nn.Linear`` stores them: ``[out_features, in_features]``, applied as ``x @ W.T``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from hal.errors import InvalidInput
from hal.kv_cache import KVCache, MLACacheSpec
from hal.kv_formats import row_bytes
from hal.plan import Plan
from hal.rope import RopeSpec, rope

__all__ = ["MLAConfig", "MLAWeights", "DEEPSEEK_V2", "DEEPSEEK_V2_LITE", "rms_norm", "project_queries",
           "project_latents", "mla_forward_naive", "mla_forward_absorbed", "absorbed_decode_bytes"]


def _int(op: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"[{op}] {name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class MLAConfig:
    """The attention shape of an MLA model (Hugging Face field names).

    ``q_lora_rank`` None means no query compression (V2-Lite); ``rope`` None means plain RoPE on
    ``qk_rope_head_dim`` channels, theta 10000, interleaved pairs. ``rms_norm_eps`` is the eps of the
    two latent norms (q_a_layernorm, kv_a_layernorm): 1e-6 in DeepSeek's and Hugging Face's code,
    whatever the model config's ``rms_norm_eps`` (which sets the decoder-layer norms) says.
    """

    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope: RopeSpec | None = field(default=None)

    def __post_init__(self) -> None:
        op = "hal.mla.MLAConfig"
        for name in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim"):
            _int(op, name, getattr(self, name))
        _int(op, "q_lora_rank", self.q_lora_rank, allow_none=True)
        if self.rope is None:
            object.__setattr__(self, "rope", RopeSpec(self.qk_rope_head_dim, style="gptj"))
        if not isinstance(self.rope, RopeSpec) or self.rope.dim != self.qk_rope_head_dim:
            raise InvalidInput(f"[{op}] rope must be a hal.RopeSpec of dim qk_rope_head_dim="
                               f"{self.qk_rope_head_dim}, got {self.rope!r}")

    @property
    def qk_head_dim(self) -> int:
        """Width of a decompressed query/key head: qk_nope + qk_rope (192 for DeepSeek-V2)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5`` times the YaRN multiplier (DeepSeek-V2: 0.114721), in both forms."""
        return self.rope.softmax_scale(self.qk_head_dim)  # type: ignore[union-attr]

    def cache_spec(self, num_layers: int, **kwargs: Any) -> MLACacheSpec:
        """``hal.MLACacheSpec(num_layers, kv_lora_rank, rope_dim=qk_rope_head_dim, **kwargs)``."""
        return MLACacheSpec(num_layers, kv_lora_rank=self.kv_lora_rank, rope_dim=self.qk_rope_head_dim, **kwargs)

    @classmethod
    def from_hf(cls, config: Any, *, style: str | None = None) -> MLAConfig:
        """From a Hugging Face ``DeepseekV2Config``/``DeepseekV3Config``, its ``config.json`` dict, or
        a ``hal.models`` preset. RoPE comes from the preset's ``rope`` when it has one, else from
        ``rope_theta`` and ``rope_scaling`` (or transformers 5's ``rope_parameters``); ``style``
        defaults to the preset's ``rope_style``, else "gptj" (DeepSeek's weights)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else \
            (lambda k, d=None: getattr(config, k, d))
        q_lora = get("q_lora_rank")
        common = dict(hidden_size=get("hidden_size"), num_attention_heads=get("num_attention_heads"),
                      q_lora_rank=q_lora or None, kv_lora_rank=get("kv_lora_rank"),
                      qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
                      v_head_dim=get("v_head_dim"))  # rms_norm_eps: the latent norms' 1e-6, see the class
        spec = get("rope")
        if isinstance(spec, RopeSpec):
            return cls(rope=spec, **common)
        style = style or get("rope_style") or "gptj"
        return cls(rope=_rope_from_hf(get, common["qk_rope_head_dim"], style), **common)


def _rope_from_hf(get: Any, dim: int, style: str) -> RopeSpec:
    """A RopeSpec from HF ``rope_theta`` + ``rope_scaling`` or ``rope_parameters`` (transformers 5)."""
    params = dict(get("rope_parameters") or {})
    scaling = dict(get("rope_scaling") or {}) or params
    theta = float(params.get("rope_theta", get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return RopeSpec(dim, theta, style=style)
    if kind == "linear":
        return RopeSpec(dim, theta, style=style, scaling="linear", factor=float(scaling["factor"]))
    omp = int(scaling["original_max_position_embeddings"])
    if kind == "yarn":
        return RopeSpec(dim, theta, style=style, scaling="yarn", factor=float(scaling["factor"]),
                        original_max_position=omp, beta_fast=scaling.get("beta_fast") or 32,
                        beta_slow=scaling.get("beta_slow") or 1, mscale=float(scaling.get("mscale") or 1.0),
                        mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0))
    if kind == "llama3":
        return RopeSpec(dim, theta, style=style, scaling="llama3", factor=float(scaling["factor"]),
                        original_max_position=omp, low_freq_factor=float(scaling["low_freq_factor"]),
                        high_freq_factor=float(scaling["high_freq_factor"]))
    raise InvalidInput(f"[hal.mla.MLAConfig] rope scaling type {kind!r} has no hal.RopeSpec mapping "
                       f"(known: default, linear, yarn, llama3)")


# DeepSeek-V2 and V2-Lite attention (facts §1.1: HF config.json, DeepSeek-V3 repo config_236B/16B):
# YaRN factor 40 over 4096 trained positions, beta 32/1, mscale = mscale_all_dim = 0.707.
_DEEPSEEK_YARN = RopeSpec(64, 10000.0, style="gptj", scaling="yarn", factor=40.0, original_max_position=4096,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
DEEPSEEK_V2 = MLAConfig(hidden_size=5120, num_attention_heads=128, q_lora_rank=1536, rope=_DEEPSEEK_YARN)
DEEPSEEK_V2_LITE = MLAConfig(hidden_size=2048, num_attention_heads=16, q_lora_rank=None, rope=_DEEPSEEK_YARN)


@dataclass(frozen=True, eq=False)
class MLAWeights:
    """The weights of one MLA block, ``[out_features, in_features]`` (HF module names in brackets).

    V2 (q_lora_rank set): ``w_dq [q_lora, hidden]`` (q_a_proj), ``q_norm [q_lora]`` (q_a_layernorm),
    ``w_uq [H * (nope + rope), q_lora]`` (q_b_proj). V2-Lite: ``w_q [H * (nope + rope), hidden]``
    (q_proj). Both: ``w_dkv [R + P, hidden]`` (kv_a_proj_with_mqa: W_DKV then W_KR), ``kv_norm [R]``
    (kv_a_layernorm), ``w_ukv [H * (nope + v), R]`` (kv_b_proj: per head W_UK rows then W_UV rows),
    ``w_o [hidden, H * v]`` (o_proj).
    """

    w_dkv: torch.Tensor
    kv_norm: torch.Tensor
    w_ukv: torch.Tensor
    w_o: torch.Tensor
    w_dq: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    w_uq: torch.Tensor | None = None
    w_q: torch.Tensor | None = None

    _HF_NAMES = {"w_dq": "q_a_proj", "q_norm": "q_a_layernorm", "w_uq": "q_b_proj", "w_q": "q_proj",
                 "w_dkv": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "w_ukv": "kv_b_proj",
                 "w_o": "o_proj"}

    @staticmethod
    def shapes(config: MLAConfig) -> dict[str, tuple[int, ...]]:
        """The shape of each weight this config uses."""
        c, h = config, config.num_attention_heads
        out: dict[str, tuple[int, ...]] = {
            "w_dkv": (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size), "kv_norm": (c.kv_lora_rank,),
            "w_ukv": (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
            "w_o": (c.hidden_size, h * c.v_head_dim)}
        if c.q_lora_rank is None:
            out["w_q"] = (h * c.qk_head_dim, c.hidden_size)
        else:
            out.update(w_dq=(c.q_lora_rank, c.hidden_size), q_norm=(c.q_lora_rank,),
                       w_uq=(h * c.qk_head_dim, c.q_lora_rank))
        return out

    def check(self, config: MLAConfig) -> MLAWeights:
        """Raise ``hal.InvalidInput`` unless every weight the config needs is here with its shape."""
        want = self.shapes(config)
        for f in fields(self):
            t = getattr(self, f.name)
            if f.name not in want:
                if t is not None:
                    raise InvalidInput(f"[hal.mla.MLAWeights] {f.name} is given but q_lora_rank="
                                       f"{config.q_lora_rank} does not use it")
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want[f.name]:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidInput(f"[hal.mla.MLAWeights] {f.name} must be {list(want[f.name])}, got {got}")
        return self

    @classmethod
    def random(cls, config: MLAConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> MLAWeights:
        """Random weights scaled by ``1/sqrt(fan_in)`` (unit-variance activations), norms near 1."""
        gen = torch.Generator().manual_seed(seed)
        ws = {}
        for name, shape in cls.shapes(config).items():
            x = torch.randn(*shape, generator=gen)  # fp32 draws: the same values for every dtype
            ws[name] = (1.0 + 0.1 * x) if name.endswith("norm") else x / math.sqrt(shape[1])
        return cls(**{k: v.to(dtype) for k, v in ws.items()})

    @classmethod
    def from_hf_state_dict(cls, state_dict: Mapping[str, torch.Tensor], config: MLAConfig,
                           prefix: str = "") -> MLAWeights:
        """From a ``DeepseekV2Attention`` state dict (keys ``q_a_proj.weight`` ..., after ``prefix``,
        e.g. ``"model.layers.0.self_attn."``). Attention biases (``attention_bias=True``) are refused."""
        ws = {}
        for name in cls.shapes(config):
            key = prefix + cls._HF_NAMES[name] + ".weight"
            if key not in state_dict:
                raise InvalidInput(f"[hal.mla.MLAWeights] the state dict has no {key!r}")
            ws[name] = state_dict[key]
        biases = [k for k in state_dict if k.startswith(prefix) and k.endswith(".bias")
                  and k[len(prefix):].split(".")[0] in cls._HF_NAMES.values()]
        if biases:
            raise InvalidInput(f"[hal.mla.MLAWeights] attention biases are not supported, found {biases}")
        return cls(**ws).check(config)

    def to(self, dtype: torch.dtype) -> MLAWeights:
        return MLAWeights(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(dtype))
                             for f in fields(self)})

    def w_uk(self, config: MLAConfig) -> torch.Tensor:
        """W_UK per head: ``[H, qk_nope, R]`` (k_nope_h = W_UK_h c_kv)."""
        c = config
        return self.w_ukv.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)[
            :, :c.qk_nope_head_dim]

    def w_uv(self, config: MLAConfig) -> torch.Tensor:
        """W_UV per head: ``[H, v_head, R]`` (v_h = W_UV_h c_kv)."""
        c = config
        return self.w_ukv.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)[
            :, c.qk_nope_head_dim:]


# ---- the block, step by step ------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in fp32 (HF's RMSNorm)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work)
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def project_queries(h: torch.Tensor, positions: torch.Tensor, w: MLAWeights, config: MLAConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``h [T, hidden]`` -> ``q_nope [T, H, qk_nope]``, ``q_pe [T, H, qk_rope]`` (rotated)."""
    c = config
    if c.q_lora_rank is None:
        q = h @ w.w_q.T  # type: ignore[union-attr]  # [T, H * qk_head_dim]
    else:
        c_q = rms_norm(h @ w.w_dq.T, w.q_norm, c.rms_norm_eps)  # type: ignore[union-attr,arg-type]  # [T, q_lora]
        q = c_q @ w.w_uq.T  # type: ignore[union-attr]  # [T, H * qk_head_dim]
    q = q.view(h.shape[0], c.num_attention_heads, c.qk_head_dim)  # [T, H, nope + rope]
    q_nope, q_pe = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    return q_nope, rope(q_pe, positions, c.rope)  # type: ignore[arg-type]


def project_latents(h: torch.Tensor, positions: torch.Tensor, w: MLAWeights, config: MLAConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``h [T, hidden]`` -> what the cache stores: ``c_kv [T, R]`` (after its norm) and
    ``k_pe [T, P]`` (after RoPE), both from ``h`` through the one fused down-projection."""
    c = config
    kv = h @ w.w_dkv.T  # [T, R + P]
    c_kv = rms_norm(kv[:, :c.kv_lora_rank], w.kv_norm, c.rms_norm_eps)  # [T, R]
    k_pe = rope(kv[:, None, c.kv_lora_rank:], positions, c.rope)[:, 0]  # type: ignore[arg-type]  # [T, P]
    return c_kv, k_pe


def _check_tokens(op: str, h: Any, positions: Any, config: MLAConfig) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] != config.hidden_size:
        got = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise InvalidInput(f"[{op}] h must be [T, hidden_size={config.hidden_size}], got {got}")
    if not isinstance(positions, torch.Tensor) or positions.shape != (h.shape[0],):
        got = list(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise InvalidInput(f"[{op}] positions must be int [T] = [{h.shape[0]}], got {got}")


def mla_forward_naive(h: torch.Tensor, positions: torch.Tensor, weights: MLAWeights, config: MLAConfig,
                      past_kv: tuple[torch.Tensor, torch.Tensor] | None = None, *, scale: float | None = None
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The naive (decompressed) form for one sequence: per-head keys and values, then MHA.

    ``h [T, hidden]`` are the sequence's newest T tokens at ``positions [T]``; ``past_kv`` the
    latents of the tokens before them, ``(c_kv [S0, R], k_pe [S0, P])`` (None: none). Causal,
    bottom-right: token i sees keys 0..S0+i. Softmax in fp32 (float64 for float64 inputs), scale
    ``config.softmax_scale`` unless ``scale`` is given. Returns ``out [T, hidden]`` and the updated
    ``(c_kv [S0 + T, R], k_pe [S0 + T, P])``.
    """
    _check_tokens("hal.mla.mla_forward_naive", h, positions, config)
    c, w = config, weights
    T, H = h.shape[0], c.num_attention_heads
    q_nope, q_pe = project_queries(h, positions, w, c)  # [T, H, nope], [T, H, rope]
    c_kv, k_pe = project_latents(h, positions, w, c)  # [T, R], [T, P]
    if past_kv is not None:
        c_kv, k_pe = torch.cat([past_kv[0], c_kv]), torch.cat([past_kv[1], k_pe])  # [S, R], [S, P]
    S = c_kv.shape[0]
    # decompress: per-head keys [k_nope_h; k_pe] and values
    k_nope = torch.einsum("sr,hnr->shn", c_kv, w.w_uk(c))  # [S, H, nope]
    v = torch.einsum("sr,hvr->shv", c_kv, w.w_uv(c))  # [S, H, v]
    k = torch.cat([k_nope, k_pe[:, None, :].expand(S, H, c.qk_rope_head_dim)], dim=-1)  # [S, H, 192]
    q = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, 192]
    # causal MHA, queries aligned to the last T keys
    work = torch.float64 if h.dtype == torch.float64 else torch.float32
    scale = c.softmax_scale if scale is None else scale
    s = torch.einsum("thd,shd->hts", q.to(work), k.to(work)) * scale  # [H, T, S]
    visible = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]  # [T, S]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)  # [H, T, S]
    o = torch.einsum("hts,shv->thv", p, v.to(work)).to(h.dtype)  # [T, H, v]
    return o.reshape(T, H * c.v_head_dim) @ w.w_o.T, (c_kv, k_pe)


def mla_forward_absorbed(h: torch.Tensor, positions: torch.Tensor, weights: MLAWeights, config: MLAConfig,
                         cache: KVCache, layer: int, plan: Plan, slot_mapping: torch.Tensor, *,
                         scale: float | None = None) -> torch.Tensor:
    """The absorbed form over a paged latent cache, for a whole batch (prefill chunks and decodes mixed).

    ``h [T, hidden]`` and ``positions [T]`` are the batch's new tokens, sequences concatenated as in
    ``plan`` (each sequence's new tokens are its last ones); ``slot_mapping [T]`` int64 says where
    each token's ``c_kv``/``k_pe`` go in ``cache`` (a ``hal.MLACacheSpec`` cache of h's dtype).
    Writes the cache, then ``hal.mla_attention`` on ``[T, H, R]`` absorbed queries with
    ``config.softmax_scale`` (or ``scale``). Returns ``out [T, hidden]``.
    """
    import hal

    _check_tokens("hal.mla.mla_forward_absorbed", h, positions, config)
    c, w = config, weights
    T, H = h.shape[0], c.num_attention_heads
    q_nope, q_pe = project_queries(h, positions, w, c)  # [T, H, nope], [T, H, rope]
    c_kv, k_pe = project_latents(h, positions, w, c)  # [T, R], [T, P]
    cache.write(layer, c_kv, k_pe, slot_mapping)
    q_latent = torch.einsum("thn,hnr->thr", q_nope, w.w_uk(c))  # [T, H, R]: W_UK absorbed into the query
    o_latent = hal.mla_attention(q_latent, q_pe.contiguous(), cache, layer, plan,
                                 scale=c.softmax_scale if scale is None else scale)  # [T, H, R]
    o = torch.einsum("thr,hvr->thv", o_latent, w.w_uv(c))  # [T, H, v]: W_UV applied after attention
    return o.reshape(T, H * c.v_head_dim) @ w.w_o.T


def absorbed_decode_bytes(spec: MLACacheSpec, seq_len: int) -> int:
    """Bytes an absorbed decode step reads from one layer's latent cache for one sequence of
    ``seq_len`` cached tokens: every token's ``[c_kv; k_pe]`` row once, whatever the number of
    heads (``seq_len * 576 * 2`` for DeepSeek-V2 in bf16). Reading it once per head would cost H
    times this."""
    return seq_len * row_bytes(spec.kv_dtype, spec.head_dim, spec.torch_dtype.itemsize)
