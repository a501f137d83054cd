"""Family ``mla``: absorbed-form MLA (DeepSeek-V2) against the float64 reference, and absorbed == naive.

- absorbed: ``hal.mla_attention`` on DeepSeek-V2 (128 heads) and V2-Lite (16 heads) shapes, latent
  512 + RoPE 64, softmax scale 0.114721 (YaRN), over a paged latent cache with permuted pages and
  NaN in every unused slot, mixed prefill/decode batches, block sizes 64 (the MLA default) and 16,
  output and LSE against ``hal.reference.mla_attention_reference`` on the cache's exact values
  (``cache.read(..., dtype="fp64")``, as in family quant); one case per KV format of ``hal.dtypes.KV_DTYPES`` (skipped where a backend does not declare it).
- naive: the whole ``hal.mla`` block on random weights, absorbed (``hal.mla_attention`` through the
  paged cache: prefill, then multi-token and single-token decode) equals the naive decompressed
  MHA; with at least two keys per query, so a wrong softmax scale is visible (the case checks that
  it would be).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from hal.backend import Backend
from hal.conformance.case import Case, CheckFailed
from hal.conformance.oracles import same_dtype_attention
from hal.conformance.scenarios import Batch, _nan_fill, generator, randn
from hal.conformance.tolerances import Comparison, compare
from hal.dtypes import KV_DTYPES
from hal.reference import mla_attention_reference

R, P = 512, 64  # DeepSeek-V2 / V2-Lite kv_lora_rank and qk_rope_head_dim
HEADS = {"deepseek-v2": 128, "deepseek-v2-lite": 16}
BATCHES = {b.name: b for b in (
    # decode, full prefill, chunked prefill, a 1-token sequence, an idle one, one ending on a 64-block
    Batch("mixed", ((1, 37), (5, 5), (3, 70), (1, 1), (0, 4), (2, 64))),
    Batch("decode", ((1, 1), (1, 17), (1, 130), (1, 64))),
)}


def _softmax_scale() -> float:
    from hal.mla import DEEPSEEK_V2

    return DEEPSEEK_V2.softmax_scale  # 192 ** -0.5 * 1.589626 = 0.114721


@dataclass
class _LatentCache:
    cache: Any  # hal.KVCache of a hal.MLACacheSpec
    cu_q: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor  # [B, max_blocks] int32, tail entries the null block 0
    layer: int

    def plan(self) -> Any:
        import hal

        return hal.plan(torch.tensor(self.cu_q, dtype=torch.int32), torch.tensor(self.seq_lens, dtype=torch.int32),
                        self.block_table, self.cache)


def _latent_cache(backend: Backend, case: str, batch: Batch, dtype: str, kv_dtype: str, block_size: int
                  ) -> _LatentCache:
    """A 2-layer latent cache holding ``batch``'s c_kv/k_pe in layer 1, in permuted blocks (block 0
    never used), written in two shuffled chunks per sequence; every other slot NaN for "auto"
    (quantized formats refuse NaN writes)."""
    import hal

    gen = generator(case + "/paged")
    need = [-(-kv // block_size) for _, kv in batch.seqs]
    num_blocks = 1 + sum(need) + 2
    spec = hal.MLACacheSpec(2, kv_lora_rank=R, rope_dim=P, block_size=block_size, dtype=dtype, kv_dtype=kv_dtype)
    cache = hal.KVCache(spec, num_blocks, backend=backend)
    if kv_dtype == "auto":
        for layer in range(2):
            _nan_fill(cache, layer)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(batch.seqs), max(need, default=0) + 1, dtype=torch.int32)
    dev = cache.device
    for b, (_, kv) in enumerate(batch.seqs):
        ids = [order.pop() for _ in range(need[b])]
        table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        c_kv, k_pe = randn(gen, kv, R, dtype=dtype), randn(gen, kv, P, dtype=dtype)
        slots = torch.tensor(ids, dtype=torch.int64).repeat_interleave(block_size)[:kv] * block_size \
            + torch.arange(kv) % block_size
        for part in torch.randperm(kv, generator=gen).chunk(2) if kv else ():
            cache.write(1, c_kv[part].to(dev), k_pe[part].to(dev), slots[part].to(dev))
    return _LatentCache(cache, batch.cu_q, [kv for _, kv in batch.seqs], table, 1)


def _absorbed(name: str, heads: int, dtype: str, kv_dtype: str, block_size: int, batch: Batch, causal: bool,
              backend: Backend) -> list[Comparison]:
    """hal.mla_attention (out and LSE) against the float64 reference on what cache.read returns."""
    import hal

    setup = _latent_cache(backend, name, batch, dtype, kv_dtype, block_size)
    gen = generator(name + "/q")
    t = batch.cu_q[-1]
    q_latent, q_rope = randn(gen, t, heads, R, dtype=dtype), randn(gen, t, heads, P, dtype=dtype)
    scale = _softmax_scale()
    dev = setup.cache.device
    out, lse = hal.mla_attention(q_latent.to(dev), q_rope.to(dev), setup.cache, setup.layer, setup.plan(),
                                 scale=scale, causal=causal, return_lse=True)
    # golden on the exact values the cache holds (fp64); the same-dtype reference reads them back in the
    # model dtype and does the same math as MQA over [c_kv; k_pe] with value c_kv
    everything = list(range(setup.cache.num_blocks))
    c_kv, k_pe = (x.cpu() for x in setup.cache.read(setup.layer, everything, dtype="fp64"))
    g_out, g_lse = mla_attention_reference(q_latent, q_rope, c_kv, k_pe, setup.cu_q, setup.seq_lens,
                                           setup.block_table, scale=scale, causal=causal)
    c_kv, k_pe = (x.cpu() for x in setup.cache.read(setup.layer, everything))
    rows = torch.cat([c_kv, k_pe], dim=-1)  # [num_blocks, bs, R + P]
    keys = [rows[setup.block_table[b, :-(-kv // block_size)].long()].flatten(0, 1)[:kv]
            for b, kv in enumerate(setup.seq_lens)]
    k = torch.cat(keys)[:, None, :]  # [S, 1, R + P]
    cu_k = [0]
    for kv in setup.seq_lens:
        cu_k.append(cu_k[-1] + kv)
    r_out, r_lse = same_dtype_attention(torch.cat([q_latent, q_rope], -1), k, k[..., :R].contiguous(), setup.cu_q,
                                        cu_k, causal=causal, scale=scale)
    return [compare("out", dtype, out.cpu(), g_out, r_out),
            compare("lse", dtype, lse.cpu(), g_lse, r_lse, lse=True)]


def _naive_config(model: str) -> Any:
    """The model's attention shapes (heads, q_lora_rank, 512 + 64 latent, 128 nope, 128 v, YaRN) with
    the hidden size (and V2's q_lora_rank) shrunk to 256: they only feed the projections around the
    attention, and keep the random weights small."""
    from hal.mla import DEEPSEEK_V2, DEEPSEEK_V2_LITE

    if model == "deepseek-v2":
        return replace(DEEPSEEK_V2, hidden_size=256, q_lora_rank=256)
    return replace(DEEPSEEK_V2_LITE, hidden_size=256)


def _absorbed_equals_naive(name: str, model: str, block_size: int, backend: Backend) -> list[Comparison]:
    """Two sequences through two steps: A prefills 5 then decodes 2, B prefills 4 then decodes 1."""
    import hal
    from hal import mla

    cfg = _naive_config(model)
    w32 = mla.MLAWeights.random(cfg, seed=1)
    w64 = w32.to(torch.float64)
    gen = generator(name)
    steps = [(5, 4), (2, 1)]  # new tokens of (A, B) per step
    hs = [torch.randn(sum(s[0] for s in steps), cfg.hidden_size, generator=gen),
          torch.randn(sum(s[1] for s in steps), cfg.hidden_size, generator=gen)]
    bs = block_size
    cache = hal.KVCache(cfg.cache_spec(1, block_size=bs, dtype="fp32"), 8, backend=backend)
    _nan_fill(cache, 0)
    tables = [[5, 2], [7, 3]]  # blocks of A and B (permuted, never block 0)
    table = torch.tensor(tables, dtype=torch.int32)
    dev = cache.device
    done = [0, 0]
    absorbed, golden, same, wrong = [], [], [], []
    past64: list[Any] = [None, None]
    past32: list[Any] = [None, None]
    for step in steps:
        h_parts, pos_parts, slot_parts = [], [], []
        for b in range(2):
            pos = torch.arange(done[b], done[b] + step[b])
            h_parts.append(hs[b][pos])
            pos_parts.append(pos)
            slot_parts.append(torch.tensor(tables[b])[pos // bs] * bs + pos % bs)
            # naive, per sequence: float64 (golden), fp32 (what the dtype costs), float64 with 1/sqrt(192)
            o64, kv64 = mla.mla_forward_naive(hs[b][pos].double(), pos, w64, cfg, past64[b])
            o32, past32[b] = mla.mla_forward_naive(hs[b][pos], pos, w32, cfg, past32[b])
            o_wrong, _ = mla.mla_forward_naive(hs[b][pos].double(), pos, w64, cfg, past64[b],
                                               scale=cfg.qk_head_dim ** -0.5)
            past64[b] = kv64
            golden.append(o64)
            same.append(o32)
            wrong.append(o_wrong)
            done[b] += step[b]
        plan = hal.plan(torch.tensor([0, step[0], step[0] + step[1]], dtype=torch.int32),
                        torch.tensor(done, dtype=torch.int32), table, cache)
        absorbed.append(mla.mla_forward_absorbed(torch.cat(h_parts).to(dev), torch.cat(pos_parts).to(dev), w32,
                                                 cfg, cache, 0, plan, torch.cat(slot_parts).to(dev)).cpu())
    got, g, r = torch.cat(absorbed), torch.cat(golden), torch.cat(same)
    comp = compare("absorbed vs naive", "fp32", got, g, r)
    wrong_err = float((torch.cat(wrong) - g).abs().max())
    if wrong_err <= 10 * comp.tol:
        raise CheckFailed(f"the case cannot see a wrong softmax scale: 1/sqrt(192) without YaRN's mscale^2 "
                          f"moves the output by only {wrong_err:.3g} (tolerance {comp.tol:.3g})")
    return [comp]


def mla_cases() -> Iterator[Case]:
    feats = ["mla", "causal", "lse"]
    for model, heads in HEADS.items():
        for dtype in ("fp32", "bf16", "fp16"):
            for bs in (64, 16):
                for batch in BATCHES:
                    quick = ((model == "deepseek-v2-lite" and dtype == "bf16" and bs == 64 and batch == "mixed")
                             or (model == "deepseek-v2" and dtype == "fp32" and bs == 64 and batch == "decode")
                             or (model == "deepseek-v2" and dtype == "bf16" and bs == 16 and batch == "mixed")
                             or (model == "deepseek-v2-lite" and dtype == "fp32" and bs == 16 and batch == "mixed"))
                    name = f"absorbed/{model}/{dtype}/bs{bs}/{batch}"
                    yield Case("mla", name, "quick" if quick else "full",
                               dict(dtype=dtype, kv_dtype="auto", block_size=bs, features=feats),
                               partial(_absorbed, "mla/" + name, heads, dtype, "auto", bs, BATCHES[batch], True))
    name = "absorbed/deepseek-v2-lite/fp32/bs16/mixed/non_causal"
    yield Case("mla", name, "quick",
               dict(dtype="fp32", kv_dtype="auto", block_size=16, features=["mla", "non_causal", "lse"]),
               partial(_absorbed, "mla/" + name, 16, "fp32", "auto", 16, BATCHES["mixed"], False))
    # every KV format: attention on the quantized cache equals the reference on what cache.read returns
    for kv_dtype in KV_DTYPES[1:]:
        for model, dtype in (("deepseek-v2-lite", "bf16"), ("deepseek-v2", "fp32")):
            name = f"kv-dtype/{kv_dtype}/{model}/{dtype}/bs64/mixed"
            yield Case("mla", name, "quick" if model == "deepseek-v2-lite" else "full",
                       dict(dtype=dtype, kv_dtype=kv_dtype, block_size=64, features=feats),
                       partial(_absorbed, "mla/" + name, HEADS[model], dtype, kv_dtype, 64, BATCHES["mixed"], True))
    for model in HEADS:
        for bs in (4, 64):  # 4: sequences cross blocks; 64: the MLA default
            name = f"absorbed-equals-naive/{model}/fp32/bs{bs}"
            yield Case("mla", name, "quick" if bs == 4 else "full",
                       dict(dtype="fp32", kv_dtype="auto", block_size=bs, features=["mla", "causal"]),
                       partial(_absorbed_equals_naive, "mla/" + name, model, bs))
