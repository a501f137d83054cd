"""Families ``merge``, ``gqa`` and ``batch``: properties that tie results together.

- merge: attention over two disjoint key sets merged with ``merge_attention_states`` equals
  attention over the union (sinks counted once); the prefix/suffix split of a paged sequence
  (cascade, prefix sharing) merges back to the whole; the merge op itself against the reference.
- gqa: GQA/MQA equals MHA on KV heads repeated.
- batch: a sequence's output does not depend on the rest of the batch (bitwise where the backend
  declares ``batch_invariant``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from hal.backend import Backend
from hal.conformance.case import Case, CheckFailed, dense_inputs, requires_for, run_dense
from hal.conformance.oracles import golden_attention
from hal.conformance.scenarios import BATCHES, MODELS, Batch, Shape, generator, make_paged, randn
from hal.conformance.tolerances import Comparison, compare
from hal.reference import merge_attention_states_reference

_SHAPE = next(s for s in MODELS if s.name == "llama-3-8b")
_MQA = next(s for s in MODELS if s.name == "starcoder-mqa")
# sequences long enough for a block-aligned shared prefix of at least q_len tokens
_CASCADE = Batch("cascade", ((1, 37), (16, 80), (3, 48), (4, 64), (2, 130), (0, 5)))


def _merge_dense(name: str, shape: Shape, dtype: str, with_sinks: bool, backend: Backend) -> list[Comparison]:
    """Split every sequence's keys into two random disjoint sets; merge equals whole (non-causal)."""
    import hal

    batch = BATCHES["mixed"]
    q, k, v = dense_inputs(name, shape, batch, dtype)
    gen = generator(name + "/split")
    sinks = torch.linspace(-1.0, 2.0, shape.hq) if with_sinks else None
    idx_a, idx_b, cu_a, cu_b = [], [], [0], [0]
    for b in range(len(batch.seqs)):
        k0, k1 = batch.cu_k[b], batch.cu_k[b + 1]
        in_a = torch.rand(k1 - k0, generator=gen) < 0.5
        idx_a.append(torch.arange(k0, k1)[in_a])
        idx_b.append(torch.arange(k0, k1)[~in_a])
        cu_a.append(cu_a[-1] + int(in_a.sum()))
        cu_b.append(cu_b[-1] + int((~in_a).sum()))
    ia, ib = torch.cat(idx_a), torch.cat(idx_b)
    opts_a = {"sinks": sinks} if with_sinks else {}  # the sinks go into exactly one half
    o_a, l_a = run_dense(backend, q, k[ia], v[ia], batch.cu_q, cu_a, opts_a, True)
    o_b, l_b = run_dense(backend, q, k[ib], v[ib], batch.cu_q, cu_b, {}, True)
    dev = backend.default_device()
    o, lse = hal.merge_attention_states(o_a.to(dev), l_a.to(dev), o_b.to(dev), l_b.to(dev), backend=backend)
    g_out, g_lse = golden_attention(q, k, v, batch.cu_q, batch.cu_k, **({"sinks": sinks} if with_sinks else {}))
    return [compare("merged out vs whole", dtype, o.cpu(), g_out, None),
            compare("merged lse vs whole", dtype, lse.cpu(), g_lse, None, lse=True)]


def _merge_paged_prefix(name: str, shape: Shape, dtype: str, bs: int, backend: Backend) -> list[Comparison]:
    """Cascade: a block-aligned shared prefix (non-causal for every query) merged with the suffix
    (causal, positions shifted uniformly) equals causal attention over the whole sequence."""
    import hal

    batch = _CASCADE
    setup = make_paged(backend, name, shape, batch, dtype, bs)
    q = randn(generator(name + "/q"), batch.cu_q[-1], shape.hq, shape.d, dtype=dtype)
    pre_len, suf_len, pre_tab, suf_tab = [], [], [], []
    width = setup.block_table.shape[1]
    for b, (ql, kv) in enumerate(batch.seqs):
        j = ((kv - ql) // 2 // bs) * bs  # a prefix every query sees whole, on a block boundary
        assert ql <= j or ql == 0, "the prefix must hold at least q_len tokens (plan's q_len <= seq_len)"
        blocks = setup.blocks[b]
        pre_len.append(j)
        suf_len.append(kv - j)
        pre_tab.append(blocks[:j // bs] + [0] * (width - j // bs))
        rest = blocks[j // bs:]
        suf_tab.append(rest + [0] * (width - len(rest)))
    cu = torch.tensor(batch.cu_q, dtype=torch.int32)
    dev = setup.cache.device
    plan_a = hal.plan(cu, torch.tensor(pre_len, dtype=torch.int32), torch.tensor(pre_tab, dtype=torch.int32),
                      setup.cache)
    plan_b = hal.plan(cu, torch.tensor(suf_len, dtype=torch.int32), torch.tensor(suf_tab, dtype=torch.int32),
                      setup.cache)
    o_a, l_a = hal.paged_attention(q.to(dev), setup.cache, setup.layer, plan_a, causal=False, return_lse=True)
    o_b, l_b = hal.paged_attention(q.to(dev), setup.cache, setup.layer, plan_b, causal=True, return_lse=True)
    o, lse = hal.merge_attention_states(o_a, l_a, o_b, l_b, backend=backend)
    g_out, g_lse = golden_attention(q, setup.k, setup.v, setup.cu_q, setup.cu_k, causal=True)
    return [compare("prefix+suffix out vs whole", dtype, o.cpu(), g_out, None),
            compare("prefix+suffix lse vs whole", dtype, lse.cpu(), g_lse, None, lse=True)]


def _merge_op(name: str, dtype: str, backend: Backend) -> list[Comparison]:
    """merge_attention_states against the reference, with -inf partials (one side, and both)."""
    import hal

    gen = generator(name)
    t, h, dv = 24, 8, 64
    o_a, o_b = randn(gen, t, h, dv, dtype=dtype), randn(gen, t, h, dv, dtype=dtype)
    l_a, l_b = torch.randn(t, h, generator=gen) * 3, torch.randn(t, h, generator=gen) * 3
    l_a[:4] = float("-inf")  # a saw no key
    l_b[4:8] = float("-inf")  # b saw no key
    l_a[8:10], l_b[8:10] = float("-inf"), float("-inf")  # neither did
    l_a[10:12] += 60.0  # far apart: b's weight underflows
    dev = backend.default_device()
    o, lse = hal.merge_attention_states(o_a.to(dev), l_a.to(dev), o_b.to(dev), l_b.to(dev), backend=backend)
    g_o, g_lse = merge_attention_states_reference(o_a, l_a, o_b, l_b)
    o, lse = o.cpu(), lse.cpu()
    if o.dtype != o_a.dtype or lse.dtype != torch.float32:
        raise CheckFailed(f"merge returned {o.dtype}/{lse.dtype}, expected {o_a.dtype}/float32")
    if bool(o[8:10].ne(0).any()) or not bool(torch.isneginf(lse[8:10]).all()):
        raise CheckFailed("two -inf partials must give output 0 and lse -inf")
    return [compare("merge out", dtype, o, g_o, g_o.to(o_a.dtype)),
            compare("merge lse", dtype, lse, g_lse, None, lse=True)]


def merge_cases() -> Iterator[Case]:
    for dtype in ("fp32", "fp16", "bf16"):
        quick = dtype in ("fp32", "bf16")
        lvl = "quick" if quick else "full"
        yield Case("merge", f"op/{dtype}", lvl, dict(dtype=dtype, features=["merge"]),
                   partial(_merge_op, f"merge/op/{dtype}", dtype))
        for sinks in (False, True):
            feats = ["dense", "non_causal", "lse", "merge"] + (["sinks"] if sinks else [])
            name = f"dense-split/{_SHAPE.name}/{dtype}" + ("/sinks" if sinks else "")
            yield Case("merge", name, lvl, requires_for(_SHAPE, dtype, feats),
                       partial(_merge_dense, "merge/" + name, _SHAPE, dtype, sinks))
        for bs in (16, 1):
            name = f"paged-prefix/{_SHAPE.name}/{dtype}/bs{bs}"
            yield Case("merge", name, lvl if bs == 16 else "full",
                       requires_for(_SHAPE, dtype, ["paged", "causal", "non_causal", "lse", "merge"], block_size=bs),
                       partial(_merge_paged_prefix, "merge/" + name, _SHAPE, dtype, bs))


def _gqa_dense(name: str, shape: Shape, dtype: str, backend: Backend) -> list[Comparison]:
    batch = BATCHES["mixed"]
    q, k, v = dense_inputs(name, shape, batch, dtype)
    g = shape.hq // shape.hkv
    out, _ = run_dense(backend, q, k, v, batch.cu_q, batch.cu_k, {"causal": True}, False)
    rep, _ = run_dense(backend, q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), batch.cu_q,
                       batch.cu_k, {"causal": True}, False)
    return [compare("GQA vs repeated KV", dtype, out, rep.double(), None)]


def _gqa_paged(name: str, shape: Shape, dtype: str, backend: Backend) -> list[Comparison]:
    import hal

    batch = BATCHES["mixed"]
    setup = make_paged(backend, name, shape, batch, dtype, 16)
    g = shape.hq // shape.hkv
    mha = Shape(shape.name + "-repeated", shape.hq, shape.hq, shape.d, shape.dv)
    q = randn(generator(name + "/q"), batch.cu_q[-1], shape.hq, shape.d, dtype=dtype)
    dev = setup.cache.device
    out = hal.paged_attention(q.to(dev), setup.cache, setup.layer, setup.plan())
    spec = hal.KVCacheSpec(1, mha.hkv, mha.d, v_head_dim=mha.dv, block_size=16, dtype=dtype)
    cache = hal.KVCache(spec, setup.cache.num_blocks, backend=backend)
    slots = []
    for b, kv in enumerate(setup.seq_lens):
        ids = torch.tensor(setup.blocks[b], dtype=torch.int64).repeat_interleave(16)[:kv]
        slots.append(ids * 16 + torch.arange(kv) % 16)
    cache.write(0, setup.k.repeat_interleave(g, 1).to(dev), setup.v.repeat_interleave(g, 1).to(dev),
                torch.cat(slots).to(dev))
    ref = hal.paged_attention(q.to(dev), cache, 0, hal.plan(torch.tensor(setup.cu_q, dtype=torch.int32),
                                                            torch.tensor(setup.seq_lens, dtype=torch.int32),
                                                            setup.block_table, cache))
    return [compare("paged GQA vs repeated KV", dtype, out.cpu(), ref.cpu().double(), None)]


def gqa_cases() -> Iterator[Case]:
    for shape in (_SHAPE, _MQA):
        for dtype in ("fp32", "bf16"):
            lvl = "quick" if shape is _SHAPE else "full"
            yield Case("gqa", f"dense/{shape.name}/{dtype}", lvl, requires_for(shape, dtype, ["dense", "causal"]),
                       partial(_gqa_dense, f"gqa/dense/{shape.name}/{dtype}", shape, dtype))
            yield Case("gqa", f"paged/{shape.name}/{dtype}", lvl,
                       requires_for(shape, dtype, ["paged", "causal"], block_size=16),
                       partial(_gqa_paged, f"gqa/paged/{shape.name}/{dtype}", shape, dtype))


def _same(what: str, dtype: str, alone: torch.Tensor, batched: torch.Tensor, bitwise: bool) -> Comparison:
    if bitwise:
        if not torch.equal(alone, batched):
            diff = (alone.double() - batched.double()).abs().max().item()
            raise CheckFailed(f"{what}: declared batch_invariant but differs by {diff:.3g} (expected bitwise equal)")
        return Comparison(what + " (bitwise)", 0.0, 0.0, 0.0)
    return compare(what, dtype, alone, batched.double(), None)


def _batch_dense(name: str, shape: Shape, dtype: str, backend: Backend) -> list[Comparison]:
    batch = BATCHES["mixed"]
    q, k, v = dense_inputs(name, shape, batch, dtype)
    bitwise = "batch_invariant" in backend.capabilities().features
    full, _ = run_dense(backend, q, k, v, batch.cu_q, batch.cu_k, {"causal": True}, False)
    comps = []
    for b, (ql, kv) in enumerate(batch.seqs):
        q0, k0 = batch.cu_q[b], batch.cu_k[b]
        alone, _ = run_dense(backend, q[q0:q0 + ql], k[k0:k0 + kv], v[k0:k0 + kv], [0, ql], [0, kv],
                             {"causal": True}, False)
        comps.append(_same(f"sequence {b} alone vs in batch", dtype, alone, full[q0:q0 + ql], bitwise))
    return comps


def _batch_paged(name: str, shape: Shape, dtype: str, batch_name: str, backend: Backend) -> list[Comparison]:
    import hal

    batch: Batch = BATCHES[batch_name]
    setup = make_paged(backend, name, shape, batch, dtype, 16)
    q = randn(generator(name + "/q"), batch.cu_q[-1], shape.hq, shape.d, dtype=dtype).to(setup.cache.device)
    bitwise = "batch_invariant" in backend.capabilities().features
    full = hal.paged_attention(q, setup.cache, setup.layer, setup.plan()).cpu()
    comps = []
    for b, (ql, _) in enumerate(batch.seqs):
        q0 = batch.cu_q[b]
        alone = hal.paged_attention(q[q0:q0 + ql], setup.cache, setup.layer, setup.plan([b])).cpu()
        comps.append(_same(f"sequence {b} alone vs in batch", dtype, alone, full[q0:q0 + ql], bitwise))
    # reversed order of the sequences in the batch
    order = list(reversed(range(len(batch.seqs))))
    rev = hal.paged_attention(torch.cat([q[batch.cu_q[b]:batch.cu_q[b + 1]] for b in order]), setup.cache,
                              setup.layer, setup.plan(order)).cpu()
    expect = torch.cat([full[batch.cu_q[b]:batch.cu_q[b + 1]] for b in order])
    comps.append(_same("batch in reversed order", dtype, rev, expect, bitwise))
    return comps


def batch_cases() -> Iterator[Case]:
    for dtype in ("fp32", "bf16"):
        yield Case("batch", f"dense/{_SHAPE.name}/{dtype}", "quick", requires_for(_SHAPE, dtype, ["dense", "causal"]),
                   partial(_batch_dense, f"batch/dense/{_SHAPE.name}/{dtype}", _SHAPE, dtype))
        for batch in ("mixed", "long"):  # long: prefill chunks beside decodes
            yield Case("batch", f"paged/{_SHAPE.name}/{dtype}/{batch}", "quick",
                       requires_for(_SHAPE, dtype, ["paged", "causal"], block_size=16),
                       partial(_batch_paged, f"batch/paged/{_SHAPE.name}/{dtype}/{batch}", _SHAPE, dtype, batch))


