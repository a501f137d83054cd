"""The public API end to end, the way a runtime uses it: a BlockManager hands out slots, the cache
stores K/V, one plan per step drives paged attention for every layer, forks copy blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hal
from hal.reference import attention_reference, paged_attention_reference

HQ, HKV, D, BS = 8, 2, 64, 16


def _step_plan(bm: hal.BlockManager, cache: hal.KVCache, seqs: list[int], q_lens: list[int]) -> hal.Plan:
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([bm.seq_len(s) for s in seqs], dtype=torch.int32)
    return hal.plan(cu, seq_lens, bm.block_table(seqs), cache)


def test_runtime_loop_prefill_decode_fork_matches_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    spec = hal.KVCacheSpec(2, HKV, D, block_size=BS, dtype="fp32")
    cache = hal.KVCache(spec, 32, backend="cpu")
    bm = hal.BlockManager(32, BS)
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # all K/V written per sequence (layer 1)

    def write(seq: int, slots: torch.Tensor) -> None:
        n = slots.shape[0]
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        for layer in range(2):
            cache.write(layer, k + layer, v - layer, slots)
        hk, hv = history.get(seq, (torch.empty(0, HKV, D), torch.empty(0, HKV, D)))
        history[seq] = (torch.cat([hk, k + 1]), torch.cat([hv, v - 1]))

    write(0, bm.allocate(0, 40))  # prefill of two sequences
    write(1, bm.allocate(1, 7))
    for step in range(3):  # mixed steps: a decode, a 3-token decode (speculative), and a fork
        if step == 1:
            copies = bm.fork(0, 2)
            cache.copy_blocks(copies)
            history[2] = tuple(t.clone() for t in history[0])  # type: ignore[assignment]
        seqs = [0, 1] + ([2] if step >= 1 else [])
        q_lens = [1, 3] + ([2] if step >= 1 else [])
        for s, n in zip(seqs, q_lens):
            write(s, bm.append(s, n))
        plan = _step_plan(bm, cache, seqs, q_lens)
        q = torch.randn(sum(q_lens), HQ, D, generator=gen)
        out, lse = hal.paged_attention(q, cache, 1, plan, return_lse=True)
        cu_k = torch.tensor([0] + [history[s][0].shape[0] for s in seqs]).cumsum(0)
        want, want_lse = attention_reference(q, torch.cat([history[s][0] for s in seqs]),
                                             torch.cat([history[s][1] for s in seqs]),
                                             cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=cu_k, causal=True)
        assert (out.double() - want).abs().max() < 1e-5
        assert (lse.double() - want_lse).abs().max() < 1e-5
    for s in (0, 1, 2):
        bm.free(s)
    assert bm.num_free_blocks == 32


def test_outputs_have_the_promised_dtypes_and_shapes() -> None:
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = torch.randn(5, 4, 64, dtype=dt), torch.randn(9, 2, 64, dtype=dt), torch.randn(9, 2, 32, dtype=dt)
        out, lse = hal.attention(q, k, v, causal=True, return_lse=True)
        assert out.dtype == dt and out.shape == (5, 4, 32)
        assert lse.dtype == torch.float32 and lse.shape == (5, 4)
        assert isinstance(hal.attention(q, k, v), torch.Tensor)


def test_numpy_in_numpy_out() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 4, 32), dtype=np.float32)
    k = rng.standard_normal((6, 2, 32), dtype=np.float32)
    v = rng.standard_normal((6, 2, 32), dtype=np.float32)
    out, lse = hal.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray) and out.dtype == np.float32
    want, want_lse = attention_reference(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), causal=True)
    np.testing.assert_allclose(out, want.numpy(), atol=1e-5)
    np.testing.assert_allclose(lse, want_lse.numpy(), atol=1e-5)
    o, l = hal.merge_attention_states(out, lse, out, lse)
    assert isinstance(o, np.ndarray)
    np.testing.assert_allclose(l, lse + np.log(2.0), atol=1e-5)


def test_merge_is_exact_on_split_keys_and_handles_empty_partials() -> None:
    q, k, v = torch.randn(3, 4, 16), torch.randn(10, 4, 16), torch.randn(10, 4, 16)
    o1, l1 = hal.attention(q, k[:4], v[:4], return_lse=True)
    o2, l2 = hal.attention(q, k[4:], v[4:], return_lse=True)
    o, l = hal.merge_attention_states(o1, l1, o2, l2)
    w, wl = hal.attention(q, k, v, return_lse=True)
    assert (o - w).abs().max() < 1e-6 and (l - wl).abs().max() < 1e-6
    empty_o, empty_l = hal.attention(q, k[:0], v[:0], return_lse=True)
    assert torch.equal(empty_o, torch.zeros_like(empty_o)) and torch.isneginf(empty_l).all()
    o, l = hal.merge_attention_states(o1, l1, empty_o, empty_l)
    assert torch.equal(o, o1) and torch.equal(l, l1)
    o, l = hal.merge_attention_states(empty_o, empty_l, empty_o, empty_l)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(l).all() and not o.isnan().any()


def test_bytes_per_token_of_a_cache() -> None:
    llama70 = hal.KVCacheSpec(80, 8, 128, dtype="bf16")
    assert llama70.bytes_per_token == 327_680  # 2 * 8 * 128 * 80 * 2 (facts C14)
    cache = hal.KVCache(hal.KVCacheSpec(2, 2, 64, dtype="fp16"), 4)
    assert cache.bytes_per_token == 2 * 2 * 2 * 64 * 2
    assert (cache.num_blocks, cache.block_size, cache.memory, cache.backend.name) == (4, 16, "device", "cpu")
    assert hal.MLACacheSpec(60, kv_dtype="int6").bytes_per_token == 60 * 434  # 576 * 3/4 + 2 per layer


def test_unified_memory_cache_on_cpu() -> None:
    cache = hal.KVCache(hal.KVCacheSpec(1, 1, 32, dtype="fp32", block_size=4), 3, memory="unified")
    k = torch.randn(5, 1, 32)
    cache.write(0, k, -k, torch.arange(5, dtype=torch.int64))
    rk, rv = cache.read(0, [0, 1])
    assert torch.equal(rk.flatten(0, 1)[:5], k) and torch.equal(rv.flatten(0, 1)[:5], -k)
    assert cache.memory == "unified"


def test_plan_is_reused_across_layers_and_reads_only_its_blocks() -> None:
    spec = hal.KVCacheSpec(3, HKV, D, block_size=4, dtype="bf16")
    cache = hal.KVCache(spec, 10)
    nan = torch.full((40, HKV, D), float("nan"), dtype=torch.bfloat16)
    for layer in range(3):
        cache.write(layer, nan, nan, torch.arange(40))
    k = torch.randn(6, HKV, D, dtype=torch.bfloat16)
    slots = torch.tensor([28, 29, 30, 31, 8, 9])  # blocks 7 then 2
    for layer in range(3):
        cache.write(layer, k * (layer + 1), k, slots)
    plan = hal.plan(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([6], dtype=torch.int32),
                    torch.tensor([[7, 2, 0]], dtype=torch.int32), cache)
    q = torch.randn(2, HQ, D, dtype=torch.bfloat16)
    for layer in range(3):
        out = hal.paged_attention(q, cache, layer, plan)
        kc, vc = cache.read(layer, range(10))
        want, _ = paged_attention_reference(q, kc, vc, [0, 2], [6], [[7, 2, 0]])
        assert not out.isnan().any()
        assert (out.double() - want).abs().max() < 3e-2


@pytest.mark.parametrize("backend", ["cpu", hal.get_backend("cpu")])
def test_backend_argument_accepts_names_and_instances(backend: object) -> None:
    q = torch.randn(2, 2, 32)
    assert hal.attention(q, q, q, backend=backend).shape == (2, 2, 32)  # type: ignore[arg-type]
