"""MLA: hal.mla_attention on the cpu backend against the reference (every declared KV format), the
hal.mla block (absorbed == naive), weights and config loading, and bytes read per decoded token."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import hal
import hal.dtypes
from hal import mla
from hal.backends.cpu import CpuBackend
from hal.backends.cpu.mla import count_fetched_bytes
from hal.conformance import cases_for_level
from hal.conformance.runner import run_case
from hal.reference import mla_attention_reference

CPU_KV_DTYPES = sorted(hal.get_backend("cpu").capabilities().kv_dtypes)


def _latent_setup(seqs: list[tuple[int, int]], *, heads: int = 4, r: int = 64, p: int = 16, bs: int = 16,
                  dtype: str = "fp32", kv_dtype: str = "auto", seed: int = 0, backend: object = "cpu"):
    """A latent cache holding random c_kv/k_pe for ``seqs`` ((q_len, kv_len) each) in permuted blocks."""
    gen = torch.Generator().manual_seed(seed)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    need = [-(-kv // bs) for _, kv in seqs]
    nb = 1 + sum(need)
    cache = hal.KVCache(hal.MLACacheSpec(2, kv_lora_rank=r, rope_dim=p, block_size=bs, dtype=dtype,
                                         kv_dtype=kv_dtype), nb, backend=backend)
    order = (torch.randperm(nb - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(seqs), max(need) + 1, dtype=torch.int32)
    for b, (_, kv) in enumerate(seqs):
        ids = [order.pop() for _ in range(need[b])]
        table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots = torch.tensor(ids).repeat_interleave(bs)[:kv] * bs + torch.arange(kv) % bs
        cache.write(1, torch.randn(kv, r, generator=gen).to(dt), torch.randn(kv, p, generator=gen).to(dt), slots)
    cu = [0]
    for q, _ in seqs:
        cu.append(cu[-1] + q)
    plan = hal.plan(torch.tensor(cu, dtype=torch.int32), torch.tensor([kv for _, kv in seqs], dtype=torch.int32),
                    table, cache)
    ql = torch.randn(cu[-1], heads, r, generator=gen).to(dt)
    qr = torch.randn(cu[-1], heads, p, generator=gen).to(dt)
    return cache, plan, ql, qr, cu, table


def _reference(cache: hal.KVCache, cu: list[int], seqs: list[tuple[int, int]], table: torch.Tensor,
               ql: torch.Tensor, qr: torch.Tensor, scale: float, causal: bool = True):
    c_kv, k_pe = cache.read(1, list(range(cache.num_blocks)), dtype="fp64")  # the cache's exact values
    return mla_attention_reference(ql, qr, c_kv, k_pe, cu, [kv for _, kv in seqs], table, scale=scale, causal=causal)


MIXED = [(1, 37), (5, 5), (3, 40), (0, 3), (2, 32), (1, 1)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bs", [1, 16, 64])
def test_mla_attention_matches_reference_fp32(causal: bool, bs: int) -> None:
    cache, plan, ql, qr, cu, table = _latent_setup(MIXED, bs=bs)
    out, lse = hal.mla_attention(ql, qr, cache, 1, plan, scale=0.11, causal=causal, return_lse=True)
    g_out, g_lse = _reference(cache, cu, MIXED, table, ql, qr, 0.11, causal)
    assert out.shape == (cu[-1], 4, 64) and out.dtype == torch.float32 and lse.dtype == torch.float32
    assert (out.double() - g_out).abs().max() < 2e-5
    assert (lse.double() - g_lse).abs().max() < 2e-5
    assert torch.equal(hal.mla_attention(ql, qr, cache, 1, plan, scale=0.11, causal=causal), out)


@pytest.mark.parametrize("kv_dtype", CPU_KV_DTYPES)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mla_attention_on_every_declared_kv_format(kv_dtype: str, dtype: str) -> None:
    """Against the reference on what cache.read returns (the decoded values the kernel sees)."""
    cache, plan, ql, qr, cu, table = _latent_setup(MIXED, dtype=dtype, kv_dtype=kv_dtype, bs=16)
    out, lse = hal.mla_attention(ql, qr, cache, 1, plan, scale=0.11, return_lse=True)
    g_out, g_lse = _reference(cache, cu, MIXED, table, ql, qr, 0.11)
    assert out.dtype == ql.dtype
    assert (out.double() - g_out).abs().max() < (3e-2 if dtype == "bf16" else 4e-3)
    assert (lse.double() - g_lse).abs().max() < 2e-3


def test_mla_attention_is_batch_invariant_and_lse_merges() -> None:
    """A sequence alone equals it in the batch (bitwise: cpu declares batch_invariant); splitting its
    keys into a prefix (non-causal) and the rest (causal) and merging by LSE gives the whole."""
    seqs = [(3, 40), (1, 37), (2, 32)]
    cache, plan, ql, qr, cu, table = _latent_setup(seqs, bs=8)
    full, lse = hal.mla_attention(ql, qr, cache, 1, plan, scale=0.2, return_lse=True)
    for b, (q, kv) in enumerate(seqs):
        one = hal.plan(torch.tensor([0, q], dtype=torch.int32), torch.tensor([kv], dtype=torch.int32),
                       table[b:b + 1].contiguous(), cache)
        alone = hal.mla_attention(ql[cu[b]:cu[b + 1]], qr[cu[b]:cu[b + 1]], cache, 1, one, scale=0.2)
        assert torch.equal(alone, full[cu[b]:cu[b + 1]])
    # prefix = first 16 tokens (2 blocks of 8), seen whole by every query; suffix = the rest, causal
    cu_t = torch.tensor(cu, dtype=torch.int32)
    pre = hal.plan(cu_t, torch.full((3,), 16, dtype=torch.int32), table[:, :2].contiguous(), cache)
    suf_lens = torch.tensor([kv - 16 for _, kv in seqs], dtype=torch.int32)
    suf = hal.plan(cu_t, suf_lens, torch.cat([table[:, 2:], torch.zeros(3, 2, dtype=torch.int32)], 1), cache)
    o_a, l_a = hal.mla_attention(ql, qr, cache, 1, pre, scale=0.2, causal=False, return_lse=True)
    o_b, l_b = hal.mla_attention(ql, qr, cache, 1, suf, scale=0.2, causal=True, return_lse=True)
    o, l = hal.merge_attention_states(o_a, l_a, o_b, l_b)
    assert (o - full).abs().max() < 1e-5 and (l - lse).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_mla_decode_step_joins_the_query_parts_in_the_kernel(dtype: str) -> None:
    """A decode step (every sequence on the native kernel) passes q_latent and q_rope to the kernel as
    they are, which joins each head's row: the result is bitwise the kernel's on the rows joined by
    torch.cat, with views that are not contiguous as well, and matches the reference."""
    from hal.backend import AttentionParams
    from hal.backends.cpu.attention import paged_attention
    from hal.backends.cpu.kernels import paged_decode as native_decode

    seqs = [(1, 37), (3, 70), (2, 5), (1, 64)]
    cache, plan, ql, qr, cu, table = _latent_setup(seqs, dtype=dtype, heads=4, r=64, p=16, bs=16)
    joined = torch.cat([ql, qr], dim=-1)
    p = AttentionParams(scale=0.13, causal=True)
    launch = native_decode.launch(cache.storage, plan, ql, p, True, q2=qr)
    assert launch is not None  # the kernel's path
    with pytest.raises(AssertionError, match="q2 and d2 disagree"):
        launch(ql, cache.storage, 1)  # a call prepared for two query parts, given one: refused, not misread
    want, want_lse = paged_attention(joined, cache.storage, 1, plan, p, True)
    out, lse = hal.mla_attention(ql, qr, cache, 1, plan, scale=0.13, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    wide = torch.cat([qr, ql, qr], dim=-1)  # views whose rows are not contiguous
    ql_v, qr_v = wide[..., 16:80], wide[..., 80:]
    assert not ql_v.is_contiguous() and not qr_v.is_contiguous()
    assert torch.equal(hal.mla_attention(ql_v, qr_v, cache, 1, plan, scale=0.13), want)
    g_out, g_lse = _reference(cache, cu, seqs, table, ql, qr, 0.13)
    assert (out.double() - g_out).abs().max() < (3e-2 if dtype == "bf16" else 2e-5)
    assert (lse.double() - g_lse).abs().max() < 2e-3


def test_mla_reference_equals_paged_mqa_reference() -> None:
    """The MLA reference is MQA over [c_kv; k_pe] with value c_kv (the identity the cpu kernel uses)."""
    cache, _, ql, qr, cu, table = _latent_setup(MIXED, bs=16)
    c_kv, k_pe = cache.read(1, list(range(cache.num_blocks)))
    lens = [kv for _, kv in MIXED]
    out, lse = mla_attention_reference(ql, qr, c_kv, k_pe, cu, lens, table, scale=0.3)
    k = torch.cat([c_kv, k_pe], -1)[:, :, None, :]
    out2, lse2 = hal.reference.paged_attention_reference(torch.cat([ql, qr], -1), k, c_kv[:, :, None, :], cu, lens,
                                                         table, scale=0.3, causal=True)
    assert torch.allclose(out, out2, atol=1e-12) and torch.allclose(lse, lse2, atol=1e-12)


def test_mla_reference_hand_computed() -> None:
    """One head, R = P = 1, two keys: scores s_j = scale * (q_l c_j + q_r k_j), softmax, value c_j."""
    c_kv = torch.tensor([[[1.0], [2.0]]])  # [1 block, bs 2, R 1]
    k_pe = torch.tensor([[[0.5], [-1.0]]])
    ql, qr = torch.tensor([[[1.0]]]), torch.tensor([[[2.0]]])
    out, lse = mla_attention_reference(ql, qr, c_kv, k_pe, [0, 1], [2], [[0]], scale=0.5)
    s = [0.5 * (1 * 1 + 2 * 0.5), 0.5 * (1 * 2 + 2 * -1.0)]  # [1.0, 0.0]
    z = math.exp(s[0]) + math.exp(s[1])
    assert float(out) == pytest.approx((math.exp(s[0]) * 1 + math.exp(s[1]) * 2) / z, rel=1e-15)
    assert float(lse) == pytest.approx(math.log(z), rel=1e-15)


def test_mla_family_covers_both_models_every_kv_format_and_the_naive_form() -> None:
    """(tests/test_conformance_suite.py runs the quick level, these cases included, on cpu)"""
    ids = [c.id for c in cases_for_level("quick") if c.family == "mla"]
    for part in ("absorbed/deepseek-v2/", "absorbed/deepseek-v2-lite/", "/bs64/", "/bs16/", "/mixed", "/decode",
                 "non_causal", "absorbed-equals-naive/deepseek-v2/", "absorbed-equals-naive/deepseek-v2-lite/"):
        assert any(part in i for i in ids), part
    for kv_dtype in hal.dtypes.KV_DTYPES[1:]:
        assert any(f"kv-dtype/{kv_dtype}/" in i for i in ids), kv_dtype


class _ScaleOfD(CpuBackend):
    """Wrong: ignores the scale it is given and uses 1/sqrt(R + P) (the 576-wide row)."""

    def mla_attention(self, q_latent, q_rope, storage, layer, plan, scale, causal,  # type: ignore[no-untyped-def]
                      return_lse):
        d = q_latent.shape[-1] + q_rope.shape[-1]
        return super().mla_attention(q_latent, q_rope, storage, layer, plan, d ** -0.5, causal, return_lse)


class _ReadsPastEnd(CpuBackend):
    """Wrong: reads one token past each sequence's end."""

    def mla_attention(self, q_latent, q_rope, storage, layer, plan, scale, causal,  # type: ignore[no-untyped-def]
                      return_lse):
        longer = dataclasses.replace(plan, seq_lens_host=tuple(s + 1 for s in plan.seq_lens_host))
        return super().mla_attention(q_latent, q_rope, storage, layer, longer, scale, causal, return_lse)


@pytest.mark.parametrize("wrong", [_ScaleOfD, _ReadsPastEnd])
def test_mla_family_catches_wrong_backends(wrong: type) -> None:
    case = next(c for c in cases_for_level("quick") if c.id == "mla/absorbed/deepseek-v2-lite/fp32/bs16/mixed")
    assert run_case(wrong(), case).status == "FAIL"


# ---- hal.mla: the block ------------------------------------------------------------------------------

TINY_YARN = hal.RopeSpec(8, 10000.0, style="gptj", scaling="yarn", factor=40.0, original_max_position=4096,
                         mscale=0.707, mscale_all_dim=0.707)
TINY_V2 = mla.MLAConfig(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, rope=TINY_YARN)
TINY_LITE = dataclasses.replace(TINY_V2, q_lora_rank=None)


def _run_absorbed(cfg: mla.MLAConfig, w: mla.MLAWeights, steps: list[list[int]], hs: list[torch.Tensor], bs: int = 4,
                  dtype: str = "fp32") -> list[torch.Tensor]:
    """Each step gives the new-token count of every sequence; returns each sequence's outputs, concatenated."""
    nseq = len(hs)
    per_seq = -(-max(h.shape[0] for h in hs) // bs)
    cache = hal.KVCache(cfg.cache_spec(1, block_size=bs, dtype=dtype), 1 + nseq * per_seq, backend="cpu")
    tables = torch.arange(1, 1 + nseq * per_seq, dtype=torch.int32).view(nseq, per_seq).flip(1).contiguous()
    done = [0] * nseq
    outs: list[list[torch.Tensor]] = [[] for _ in range(nseq)]
    for step in steps:
        pos = [torch.arange(done[b], done[b] + n) for b, n in enumerate(step)]
        cu = [0]
        for n in step:
            cu.append(cu[-1] + n)
        slots = torch.cat([tables[b].long()[p // bs] * bs + p % bs for b, p in enumerate(pos)])
        done = [d + n for d, n in zip(done, step)]
        plan = hal.plan(torch.tensor(cu, dtype=torch.int32), torch.tensor(done, dtype=torch.int32), tables, cache)
        h = torch.cat([hs[b][p] for b, p in enumerate(pos)])
        out = mla.mla_forward_absorbed(h, torch.cat(pos), w, cfg, cache, 0, plan, slots)
        for b in range(nseq):
            outs[b].append(out[cu[b]:cu[b + 1]])
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("cfg", [TINY_V2, TINY_LITE], ids=["v2", "v2-lite"])
def test_absorbed_equals_naive(cfg: mla.MLAConfig) -> None:
    w = mla.MLAWeights.random(cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    hs = [torch.randn(9, cfg.hidden_size, generator=gen), torch.randn(6, cfg.hidden_size, generator=gen)]
    got = _run_absorbed(cfg, w, [[6, 3], [1, 2], [2, 0], [0, 1]], hs)
    for b, h in enumerate(hs):
        naive, (c_kv, k_pe) = mla.mla_forward_naive(h, torch.arange(h.shape[0]), w, cfg)
        assert c_kv.shape == (h.shape[0], 32) and k_pe.shape == (h.shape[0], 8)
        assert (got[b] - naive).abs().max() < 2e-5
        # a wrong softmax scale shows: the test has more than one key per query
        wrong, _ = mla.mla_forward_naive(h, torch.arange(h.shape[0]), w, cfg, scale=cfg.qk_head_dim ** -0.5)
        assert (wrong - naive).abs().max() > 1e-3


def test_naive_with_past_kv_equals_one_pass() -> None:
    w = mla.MLAWeights.random(TINY_V2, seed=5, dtype=torch.float64)
    h = torch.randn(7, 64, dtype=torch.float64)
    whole, (c_all, k_all) = mla.mla_forward_naive(h, torch.arange(7), w, TINY_V2)
    first, past = mla.mla_forward_naive(h[:4], torch.arange(4), w, TINY_V2)
    rest, (c2, k2) = mla.mla_forward_naive(h[4:], torch.arange(4, 7), w, TINY_V2, past)
    assert torch.allclose(torch.cat([first, rest]), whole, atol=1e-12)
    assert torch.allclose(c2, c_all, atol=1e-14) and torch.allclose(k2, k_all, atol=1e-14)


def test_absorbed_in_bf16_tracks_float64() -> None:
    w = mla.MLAWeights.random(TINY_LITE, seed=6)
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    golden, _ = mla.mla_forward_naive(h.double(), torch.arange(6), w.to(torch.float64), TINY_LITE)
    got = _run_absorbed(TINY_LITE, w.to(torch.bfloat16), [[6]], [h.to(torch.bfloat16)], dtype="bf16")[0]
    assert got.dtype == torch.bfloat16 and (got.double() - golden).abs().max() < 0.05


def test_weights_from_hf_state_dict_and_checks() -> None:
    w = mla.MLAWeights.random(TINY_V2, seed=7)
    names = {"w_dq": "q_a_proj", "q_norm": "q_a_layernorm", "w_uq": "q_b_proj", "w_dkv": "kv_a_proj_with_mqa",
             "kv_norm": "kv_a_layernorm", "w_ukv": "kv_b_proj", "w_o": "o_proj"}
    sd = {f"model.layers.0.self_attn.{hf}.weight": getattr(w, ours) for ours, hf in names.items()}
    loaded = mla.MLAWeights.from_hf_state_dict(sd, TINY_V2, prefix="model.layers.0.self_attn.")
    assert all(torch.equal(getattr(loaded, k), getattr(w, k)) for k in names) and loaded.w_q is None
    assert loaded.w_uk(TINY_V2).shape == (4, 16, 32) and loaded.w_uv(TINY_V2).shape == (4, 16, 32)
    lite = {k[len("model.layers.0.self_attn."):]: v for k, v in sd.items() if ".q_" not in k}
    with pytest.raises(hal.InvalidInput, match=r"the state dict has no 'q_proj\.weight'"):
        mla.MLAWeights.from_hf_state_dict(lite, TINY_LITE)
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    with pytest.raises(hal.InvalidInput, match=r"attention biases are not supported"):
        mla.MLAWeights.from_hf_state_dict(sd, TINY_V2, prefix="model.layers.0.self_attn.")
    with pytest.raises(hal.InvalidInput, match=r"w_o must be \[64, 64\], got \[64, 63\]"):
        dataclasses.replace(w, w_o=torch.zeros(64, 63)).check(TINY_V2)
    with pytest.raises(hal.InvalidInput, match=r"w_dq is given but q_lora_rank=None does not use it"):
        w.check(TINY_LITE)


def test_config_from_hf_dict_and_presets() -> None:
    hf = {"hidden_size": 5120, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
          "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-6,
          "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                "mscale_all_dim": 0.707}}
    assert mla.MLAConfig.from_hf(hf) == mla.DEEPSEEK_V2
    assert mla.MLAConfig.from_hf(dict(hf, hidden_size=2048, num_attention_heads=16, q_lora_rank=0)) == \
        mla.DEEPSEEK_V2_LITE
    assert mla.DEEPSEEK_V2.softmax_scale == pytest.approx(0.114721, abs=5e-7)
    assert mla.DEEPSEEK_V2.cache_spec(60).bytes_per_token == 69120  # facts §3.2, BF16
    models = pytest.importorskip("hal.models")
    for name, want in (("deepseek-v2", mla.DEEPSEEK_V2), ("deepseek-v2-lite", mla.DEEPSEEK_V2_LITE)):
        cfg = mla.MLAConfig.from_hf(models.preset(name))
        assert cfg == want, name
        assert cfg.softmax_scale == pytest.approx(models.preset(name).softmax_scale, rel=1e-15)
    with pytest.raises(hal.InvalidInput, match=r"rope scaling type 'dynamic' has no hal\.RopeSpec mapping"):
        mla.MLAConfig.from_hf(dict(hf, rope_scaling={"type": "dynamic", "factor": 2.0,
                                                     "original_max_position_embeddings": 4096}))
    with pytest.raises(hal.InvalidInput, match=r"rope must be a hal\.RopeSpec of dim qk_rope_head_dim=64"):
        mla.MLAConfig(hidden_size=8, num_attention_heads=1, rope=hal.RopeSpec(32))


def test_forward_rejects_bad_shapes() -> None:
    w = mla.MLAWeights.random(TINY_LITE)
    with pytest.raises(hal.InvalidInput, match=r"\[hal\.mla\.mla_forward_naive\] h must be \[T, hidden_size=64\]"):
        mla.mla_forward_naive(torch.zeros(3, 32), torch.arange(3), w, TINY_LITE)
    with pytest.raises(hal.InvalidInput, match=r"positions must be int \[T\] = \[3\], got \[2\]"):
        mla.mla_forward_naive(torch.zeros(3, 64), torch.arange(2), w, TINY_LITE)


# ---- bytes read per decoded token ----------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3", "int4"])
def test_absorbed_decode_reads_the_cache_once_per_token_not_per_head(kv_dtype: str) -> None:
    """DeepSeek-V2-Lite shape (16 heads, 512 + 64): one decode step of a 1000-token sequence fetches
    each cached row once per layer, 1000 * 576 * 2 bytes in bf16, the same with 1 head or 128."""
    if kv_dtype not in CPU_KV_DTYPES:
        pytest.skip(f"cpu does not declare kv_dtype {kv_dtype}")
    seq_len = 1000
    spec = hal.MLACacheSpec(1, block_size=64, dtype="bf16", kv_dtype=kv_dtype)
    nb = -(-seq_len // 64)
    cache = hal.KVCache(spec, nb, backend="cpu")
    gen = torch.Generator().manual_seed(0)
    c_kv = torch.randn(seq_len, 512, generator=gen).bfloat16()
    cache.write(0, c_kv, torch.randn(seq_len, 64, generator=gen).bfloat16(), torch.arange(seq_len))
    plan = hal.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([seq_len], dtype=torch.int32),
                    torch.arange(nb, dtype=torch.int32)[None], cache)
    read = {}
    for heads in (1, 16, 128):
        q_latent = torch.randn(1, heads, 512, generator=gen).bfloat16()
        q_rope = torch.randn(1, heads, 64, generator=gen).bfloat16()
        with count_fetched_bytes(cache.storage) as counts:
            hal.mla_attention(q_latent, q_rope, cache, 0, plan, scale=mla.DEEPSEEK_V2_LITE.softmax_scale)
        assert counts["tokens"] == seq_len  # every cached token once, whatever the number of heads
        read[heads] = counts["bytes"]
    want = mla.absorbed_decode_bytes(spec, seq_len)
    print(f"\nDeepSeek-V2-Lite absorbed decode, kv_dtype {kv_dtype}, {seq_len} cached tokens: "
          f"{read[16]} bytes per decoded token per layer ({read[16] / seq_len:.0f} B per cached token; "
          f"{read[16] * 27} over 27 layers); reading it once per head would be {16 * read[16]}")
    assert read[1] == read[16] == read[128] == want
    if kv_dtype == "auto":
        assert want == seq_len * 576 * 2
    assert "fetch" not in vars(cache.storage)  # the counter is removed afterwards
