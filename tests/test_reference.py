"""Tests of hal.reference, the float64 oracle: hand-computed values plus an independent scalar oracle."""

from __future__ import annotations

import math

import pytest
import torch

from hal import reference
from hal.reference import (
    attention_reference,
    merge_attention_states_reference,
    paged_attention_reference,
    visible_keys_reference,
)

E = math.e
NEG_INF = -math.inf


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def close(actual, expected, atol=1e-12) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), rtol=0, atol=atol)


def scalar_attention(q, k, v, *, causal=False, scale=None, window_left=None, softcap=None, alibi=None, sinks=None):
    """One sequence, written as plainly as possible with Python floats: an oracle independent of the reference.

    q [Lq, Hq, D], k [Lk, Hkv, D], v [Lk, Hkv, Dv] -> out [Lq, Hq, Dv], lse [Lq, Hq].
    """
    Lq, Hq, D = q.shape
    Lk, Hkv, Dv = v.shape
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(Lq, Hq, Dv, dtype=torch.float64)
    lse = torch.zeros(Lq, Hq, dtype=torch.float64)
    for i in range(Lq):
        p = Lk - Lq + i
        keys = [j for j in range(Lk) if (not causal or j <= p) and (window_left is None or j >= p - window_left)]
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            logits = []
            for j in keys:
                s = scale * sum(float(q[i, h, d]) * float(k[j, kh, d]) for d in range(D))
                if softcap is not None:
                    s = softcap * math.tanh(s / softcap)
                if alibi is not None:
                    s -= float(alibi[h]) * abs(p - j)
                logits.append(s)
            exps = [math.exp(s) for s in logits]
            denom = sum(exps) + (math.exp(float(sinks[h])) if sinks is not None else 0.0)
            lse[i, h] = math.log(denom) if denom > 0 else NEG_INF
            for j, w in zip(keys, exps):
                out[i, h] += w / denom * v[j, kh].double()
    return out, lse


# ----------------------------------------------------------------------------- hand-computed values

Q1 = t([[[1.0, 0.0]]])  # [1, 1, 2]
K2 = t([[[1.0, 0.0]], [[0.0, 1.0]]])  # [2, 1, 2]
V2 = t([[[1.0, 2.0]], [[3.0, 4.0]]])  # [2, 1, 2]


def test_one_query_two_keys_by_hand():
    # s = [1, 0]; weights e/(e+1), 1/(e+1)
    out, lse = attention_reference(Q1, K2, V2, scale=1.0)
    close(out, [[[(E * 1 + 3) / (E + 1), (E * 2 + 4) / (E + 1)]]])
    close(lse, [[math.log(E + 1)]])
    assert out.dtype == lse.dtype == torch.float64


def test_default_scale_is_inverse_sqrt_head_dim():
    # D = 2: s = [1/sqrt(2), 0]
    a = math.exp(1 / math.sqrt(2))
    out, lse = attention_reference(Q1, K2, V2)
    close(out, [[[(a * 1 + 3) / (a + 1), (a * 2 + 4) / (a + 1)]]])
    close(lse, [[math.log(a + 1)]])


def test_low_precision_inputs_are_upcast():
    out, lse = attention_reference(Q1.half(), K2.bfloat16(), V2.float(), scale=1.0)
    assert out.dtype == lse.dtype == torch.float64
    close(out, [[[(E + 3) / (E + 1), (2 * E + 4) / (E + 1)]]])


def zero_queries(q_len, kv_len, heads=1):
    """q = 0 makes every score 0: the output is the plain mean of the visible value rows."""
    q = torch.zeros(q_len, heads, 2, dtype=torch.float64)
    k = torch.randn(kv_len, heads, 2, dtype=torch.float64)
    v = torch.arange(kv_len * heads * 2, dtype=torch.float64).reshape(kv_len, heads, 2) ** 2
    return q, k, v


def test_causal_bottom_right_fewer_queries_than_keys():
    q, k, v = zero_queries(2, 3)
    out, lse = attention_reference(q, k, v, causal=True)
    # query 0 sits at p = 1 (keys 0, 1); query 1 at p = 2 (keys 0, 1, 2)
    close(out[0, 0], (v[0, 0] + v[1, 0]) / 2)
    close(out[1, 0], (v[0, 0] + v[1, 0] + v[2, 0]) / 3)
    close(lse[:, 0], [math.log(2), math.log(3)])


def test_causal_bottom_right_more_queries_than_keys():
    q, k, v = zero_queries(3, 2)
    out, lse = attention_reference(q, k, v, causal=True)
    # queries at p = -1, 0, 1: the first sees nothing
    close(out[0, 0], [0.0, 0.0])
    assert lse[0, 0] == NEG_INF
    close(out[1, 0], v[0, 0])
    close(out[2, 0], (v[0, 0] + v[1, 0]) / 2)
    close(lse[1:, 0], [0.0, math.log(2)])
    assert not out.isnan().any() and not lse.isnan().any()


def test_causal_window_zero_sees_only_the_diagonal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 3, dtype=torch.float64) for _ in range(3))
    out, lse = attention_reference(q, k, v, causal=True, window_left=0, scale=0.5)
    assert torch.equal(out, v)  # one key: weight exactly 1
    close(lse, 0.5 * (q * k).sum(-1))


def test_window_has_no_right_bound_of_its_own():
    q, k, v = zero_queries(4, 4)
    out, _ = attention_reference(q, k, v, window_left=1)
    # query 0 (p = 0) sees keys j >= -1: all four; query 3 (p = 3) sees keys 2, 3
    close(out[0, 0], v[:, 0].mean(0))
    close(out[3, 0], v[2:, 0].mean(0))


def test_window_and_causal():
    q, k, v = zero_queries(2, 5)
    out, lse = attention_reference(q, k, v, window_left=1, causal=True)
    # query 0 at p = 3: keys 2, 3; query 1 at p = 4: keys 3, 4
    close(out[0, 0], (v[2, 0] + v[3, 0]) / 2)
    close(out[1, 0], (v[3, 0] + v[4, 0]) / 2)
    close(lse[:, 0], [math.log(2), math.log(2)])


def test_softcap_by_hand():
    # s = [1, 0] capped at 0.5: [0.5 tanh(2), 0]
    a = math.exp(0.5 * math.tanh(2.0))
    out, lse = attention_reference(Q1, K2, V2, scale=1.0, softcap=0.5)
    close(out, [[[(a * 1 + 3) / (a + 1), (a * 2 + 4) / (a + 1)]]])
    close(lse, [[math.log(a + 1)]])


def test_alibi_by_hand():
    # two queries at p = 1, 2 over three keys, scores 0, two heads with slopes 0.5 and 2
    q, k, v = zero_queries(2, 3, heads=2)
    out, lse = attention_reference(q, k, v, alibi_slopes=t([0.5, 2.0]))
    for h, slope in enumerate([0.5, 2.0]):
        for i, p in enumerate([1, 2]):
            w = [math.exp(-slope * abs(p - j)) for j in range(3)]  # |p - j| also to the right of p
            close(out[i, h], sum(w[j] * v[j, h] for j in range(3)) / sum(w))
            close(lse[i, h], math.log(sum(w)))


def test_alibi_after_softcap():
    # one query at p = 1: key 0 has q.k = 0 at distance 1, key 1 has q.k = 1 at distance 0
    q = t([[[0.0, 1.0]]])
    a = math.exp(0.5 * math.tanh(0.0) - 0.25 * 1)  # key 0: q.k = 0, distance 1
    b = math.exp(0.5 * math.tanh(2.0) - 0.25 * 0)  # key 1: q.k = 1, distance 0
    out, lse = attention_reference(q, K2, V2, scale=1.0, softcap=0.5, alibi_slopes=t([0.25]))
    close(out, [[[(a * 1 + b * 3) / (a + b), (a * 2 + b * 4) / (a + b)]]])
    close(lse, [[math.log(a + b)]])


def test_sinks_by_hand():
    # exp(0.3) joins the denominator with no value
    z = math.exp(0.3)
    out, lse = attention_reference(Q1, K2, V2, scale=1.0, sinks=t([0.3]))
    close(out, [[[(E * 1 + 3) / (E + 1 + z), (E * 2 + 4) / (E + 1 + z)]]])
    close(lse, [[math.log(E + 1 + z)]])


def test_query_without_keys_with_sinks_gets_the_sink_as_lse():
    q, k, v = zero_queries(2, 1, heads=2)
    out, lse = attention_reference(q, k, v, causal=True, sinks=t([0.7, -1.5]))
    # query 0 sits at p = -1: no key
    close(out[0], torch.zeros(2, 2))
    close(lse[0], [0.7, -1.5])
    # query 1 sees key 0 (score 0) plus the sink
    close(out[1, 0], v[0, 0] / (1 + math.exp(0.7)))
    close(lse[1], [math.log(1 + math.exp(0.7)), math.log(1 + math.exp(-1.5))])


def test_large_scores_are_stable():
    # s = [1000, 0]: a naive exp overflows
    out, lse = attention_reference(Q1 * 1000, K2, V2, scale=1.0, sinks=t([999.0]))
    w = 1 / (1 + math.exp(-1))  # weight of key 0 against the sink, the other key is ~e^-1000
    close(out, [[[w * 1, w * 2]]])
    close(lse, [[1000 + math.log(1 + math.exp(-1))]])


def test_empty_sequences():
    k = torch.randn(3, 2, 4, dtype=torch.float64)
    v = torch.randn(3, 2, 5, dtype=torch.float64)
    q = torch.randn(2, 2, 4, dtype=torch.float64)
    # batch: (q_len 0, kv_len 3), (q_len 2, kv_len 0)
    out, lse = attention_reference(q, k, v, cu_seqlens_q=[0, 0, 2], cu_seqlens_k=[0, 3, 3])
    close(out, torch.zeros(2, 2, 5))
    assert (lse == NEG_INF).all()
    out, lse = attention_reference(q, k[:0], v[:0], sinks=t([0.1, 0.2]))
    close(out, torch.zeros(2, 2, 5))
    close(lse, [[0.1, 0.2], [0.1, 0.2]])
    out, lse = attention_reference(q[:0], k, v, causal=True)
    assert out.shape == (0, 2, 5) and lse.shape == (0, 2)


# ----------------------------------------------------------------------------- against the scalar oracle

FEATURES = [
    dict(),
    dict(causal=True),
    dict(window_left=2),
    dict(causal=True, window_left=1, softcap=2.0),
    dict(causal=True, alibi=True, sinks=True, scale=0.3),
]


def random_inputs(q_len, kv_len, hq=4, hkv=2, d=3, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(q_len, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(kv_len, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(kv_len, hkv, dv, generator=g, dtype=torch.float64)
    return q, k, v


def feature_kwargs(features, hq=4):
    kw = dict(features)
    alibi = t([0.5 / (h + 1) for h in range(hq)]) if kw.pop("alibi", False) else None
    sinks = t([0.2 * h - 0.3 for h in range(hq)]) if kw.pop("sinks", False) else None
    return kw, alibi, sinks


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("q_len, kv_len", [(1, 6), (4, 6), (6, 6), (7, 3)])
def test_matches_scalar_oracle(features, q_len, kv_len):
    q, k, v = random_inputs(q_len, kv_len)
    kw, alibi, sinks = feature_kwargs(features)
    out, lse = attention_reference(q, k, v, alibi_slopes=alibi, sinks=sinks, **kw)
    want_out, want_lse = scalar_attention(q, k, v, alibi=alibi, sinks=sinks, **kw)
    close(out, want_out)
    close(lse, want_lse)


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v = random_inputs(5, 7, hq=6, hkv=2)
    kw = dict(causal=True, window_left=3, softcap=1.5, alibi_slopes=t([0.1 * h for h in range(6)]))
    out, lse = attention_reference(q, k, v, **kw)
    # MHA with KV head h // 3 copied into place for query head h
    want_out, want_lse = attention_reference(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), **kw)
    close(out, want_out)
    close(lse, want_lse)
    close(out[:, 4], scalar_attention(q[:, 4:5], k[:, 1:2], v[:, 1:2], causal=True, window_left=3, softcap=1.5,
                                      alibi=[0.4])[0][:, 0])


@pytest.mark.parametrize("features", FEATURES)
def test_varlen_batch_equals_per_sequence_calls(features):
    q_lens, kv_lens = [3, 1, 0, 5, 2], [5, 4, 2, 5, 0]
    q, k, v = random_inputs(sum(q_lens), sum(kv_lens), seed=1)
    kw, alibi, sinks = feature_kwargs(features)
    cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + kv_lens).cumsum(0).to(torch.int32)
    out, lse = attention_reference(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, alibi_slopes=alibi, sinks=sinks, **kw)
    for b in range(len(q_lens)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want_out, want_lse = scalar_attention(q[qs], k[ks], v[ks], alibi=alibi, sinks=sinks, **kw)
        close(out[qs], want_out)
        close(lse[qs], want_lse)


def test_query_chunking_does_not_change_results(monkeypatch):
    q, k, v = random_inputs(9, 11, seed=2)
    kw = dict(causal=True, window_left=4, softcap=3.0, alibi_slopes=t([0.1, 0.2, 0.3, 0.4]), sinks=t([0, 1, 2, 3]))
    want_out, want_lse = attention_reference(q, k, v, **kw)
    monkeypatch.setattr(reference, "_MAX_SCORE_ELEMENTS", 2 * 4 * 11)  # two query rows per chunk
    out, lse = attention_reference(q, k, v, **kw)
    close(out, want_out)
    close(lse, want_lse)


# ----------------------------------------------------------------------------- paged

@pytest.mark.parametrize("features", FEATURES)
def test_paged_equals_dense_with_permuted_blocks_and_nan_poison(features):
    block_size, num_blocks, max_blocks = 4, 16, 5
    # decode, chunked prefill, full prefill on a block boundary, empty, more queries than keys
    q_lens, seq_lens = [1, 3, 8, 0, 3], [9, 6, 8, 0, 2]
    hq, hkv, d, dv = 4, 2, 3, 5
    q, k, v = random_inputs(sum(q_lens), sum(seq_lens), hq, hkv, d, dv, seed=3)
    # caches full of NaN; each sequence's tokens go to randomly chosen, shuffled blocks
    k_cache = torch.full((num_blocks, block_size, hkv, d), math.nan, dtype=torch.float32)
    v_cache = torch.full((num_blocks, block_size, hkv, dv), math.nan, dtype=torch.float32)
    free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(4)).tolist()
    block_table = torch.full((len(seq_lens), max_blocks), 10_000, dtype=torch.int32)  # unused entries: out of range
    start = 0
    for b, n in enumerate(seq_lens):
        for t_ in range(n):
            if t_ % block_size == 0:
                block_table[b, t_ // block_size] = free.pop()
            blk, off = int(block_table[b, t_ // block_size]), t_ % block_size
            k_cache[blk, off], v_cache[blk, off] = k[start + t_], v[start + t_]
        start += n
    k, v = k.float(), v.float()  # the dense data, exactly what the cache holds
    cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + seq_lens).cumsum(0).to(torch.int32)
    kw, alibi, sinks = feature_kwargs(features)
    causal = kw.pop("causal", False)
    out, lse = paged_attention_reference(q, k_cache, v_cache, cu_q, torch.tensor(seq_lens, dtype=torch.int32),
                                         block_table, causal=causal, alibi_slopes=alibi, sinks=sinks, **kw)
    assert not out.isnan().any() and not lse.isnan().any()
    for b in range(len(q_lens)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want_out, want_lse = scalar_attention(q[qs], k[ks], v[ks], causal=causal, alibi=alibi, sinks=sinks, **kw)
        close(out[qs], want_out)
        close(lse[qs], want_lse)


def test_paged_defaults_to_causal_and_accepts_lists():
    # one sequence of 3 keys in block 1 (block 0 all NaN), 2 queries at p = 1, 2; q = 0: plain means
    k_cache = torch.full((2, 4, 1, 2), math.nan)
    v_cache = torch.full((2, 4, 1, 2), math.nan)
    k_cache[1, :3] = 0.0
    v_cache[1, :3] = t([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 9.0]]]).float()
    out, lse = paged_attention_reference(torch.zeros(2, 1, 2), k_cache, v_cache, [0, 2], [3], [[1, 0]])
    close(out[:, 0], [[2.0, 3.0], [3.0, 5.0]])
    close(lse[:, 0], [math.log(2), math.log(3)])


# ----------------------------------------------------------------------------- merge

def test_merge_by_hand():
    # partial a: mass 1, output 1; partial b: mass 3, output 3
    o, lse = merge_attention_states_reference(t([[[1.0]]]), t([[0.0]]), t([[[3.0]]]), t([[math.log(3)]]))
    close(o, [[[(1 * 1 + 3 * 3) / 4]]])
    close(lse, [[math.log(4)]])


def test_merge_of_disjoint_key_sets_equals_whole():
    q, k, v = random_inputs(5, 12, seed=5)
    kw = dict(softcap=2.0, scale=0.7)
    whole_out, whole_lse = attention_reference(q, k, v, **kw)
    # keys split into two disjoint, interleaved sets
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(6))
    a, b = perm[:5], perm[5:]
    o_a, lse_a = attention_reference(q, k[a], v[a], **kw)
    o_b, lse_b = attention_reference(q, k[b], v[b], **kw)
    o, lse = merge_attention_states_reference(o_a, lse_a, o_b, lse_b)
    close(o, whole_out)
    close(lse, whole_lse)


def test_merge_with_sinks_counted_once():
    q, k, v = random_inputs(3, 8, seed=7)
    sinks = t([0.5, -0.5, 1.0, 2.0])
    whole_out, whole_lse = attention_reference(q, k, v, sinks=sinks)
    # the sink goes into exactly one of the halves
    o_a, lse_a = attention_reference(q, k[:3], v[:3], sinks=sinks)
    o_b, lse_b = attention_reference(q, k[3:], v[3:])
    o, lse = merge_attention_states_reference(o_a, lse_a, o_b, lse_b)
    close(o, whole_out)
    close(lse, whole_lse)
    # counting it twice is wrong: the check above can fail
    o2, lse2 = merge_attention_states_reference(o_a, lse_a, *attention_reference(q, k[3:], v[3:], sinks=sinks))
    assert not torch.allclose(lse2, whole_lse)
    # a half that is only the sink (no keys) is fine too
    o_s, lse_s = attention_reference(q, k[:0], v[:0], sinks=sinks)
    o, lse = merge_attention_states_reference(o_s, lse_s, *attention_reference(q, k, v))
    close(o, whole_out)
    close(lse, whole_lse)


def test_merge_with_empty_partials():
    o_a = t([[[1.0, 2.0]], [[3.0, 4.0]]])
    lse_a = t([[0.5], [NEG_INF]])
    garbage = t([[[math.nan, math.inf]], [[math.nan, 7.0]]])
    lse_b = t([[NEG_INF], [NEG_INF]])
    o, lse = merge_attention_states_reference(o_a, lse_a, garbage, lse_b)
    # row 0: b contributes nothing; row 1: both empty -> 0, -inf
    close(o, [[[1.0, 2.0]], [[0.0, 0.0]]])
    close(lse, [[0.5], [NEG_INF]])
    # and symmetrically
    o, lse = merge_attention_states_reference(garbage, lse_b, o_a, lse_a)
    close(o, [[[1.0, 2.0]], [[0.0, 0.0]]])
    assert o.dtype == lse.dtype == torch.float64


def test_merge_is_stable_for_large_lse():
    o, lse = merge_attention_states_reference(t([[[1.0]]]), t([[1000.0]]), t([[[4.0]]]), t([[1000.0]]))
    close(o, [[[2.5]]])
    close(lse, [[1000 + math.log(2)]])


# ----------------------------------------------------------------------------- masks

def mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize(
    "q_len, kv_len, causal, window_left, expected",
    [
        (2, 3, False, None, [[1, 1, 1], [1, 1, 1]]),
        (2, 3, True, None, [[1, 1, 0], [1, 1, 1]]),
        (3, 2, True, None, [[0, 0], [1, 0], [1, 1]]),
        (3, 3, False, 0, [[1, 1, 1], [0, 1, 1], [0, 0, 1]]),  # no right bound without causal
        (3, 3, True, 0, [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
        (3, 4, False, 1, [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]),
        (3, 4, True, 1, [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),
        (1, 5, True, 2, [[0, 0, 1, 1, 1]]),
        (2, 0, True, 3, [[], []]),
    ],
)
def test_visible_keys_by_hand(q_len, kv_len, causal, window_left, expected):
    got = visible_keys_reference(q_len, kv_len, causal=causal, window_left=window_left)
    assert got.dtype == torch.bool
    assert torch.equal(got, mask(expected).reshape(q_len, kv_len))


def test_visible_keys_empty_queries():
    assert visible_keys_reference(0, 4, causal=True, window_left=None).shape == (0, 4)
