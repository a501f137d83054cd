"""The cpu backend's own mechanics: tiling over queries and key chunks (forced small here so that
every boundary is crossed) must not change results, and paged reads touch only a sequence's
slots."""

from __future__ import annotations

import pytest
import torch

import hal
from hal.reference import attention_reference, paged_attention_reference

cpu_attention = pytest.importorskip("hal.backends.cpu.attention")


@pytest.fixture
def tiny_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_attention, "Q_TILE", 3)
    monkeypatch.setattr(cpu_attention, "KV_CHUNK", 5)


OPTION_SETS = [
    {"causal": True},
    {"causal": False},
    {"causal": True, "window_left": 4},
    {"causal": False, "window_left": 7},
    {"causal": True, "softcap": 2.0, "scale": 0.7},
    {"causal": True, "alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])},
    {"causal": True, "sinks": torch.tensor([0.0, 1.0, -1.0, 3.0])},
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(sorted(o)))
def test_tiled_dense_equals_reference(tiny_tiles: None, opts: dict) -> None:
    gen = torch.Generator().manual_seed(3)
    q_lens, k_lens = [1, 11, 4, 0, 9], [23, 11, 2, 3, 0]
    q = torch.randn(sum(q_lens), 4, 16, generator=gen)
    k = torch.randn(sum(k_lens), 2, 16, generator=gen)
    v = torch.randn(sum(k_lens), 2, 8, generator=gen)
    cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lens).cumsum(0).to(torch.int32)
    out, lse = hal.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **opts)
    want, want_lse = attention_reference(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)
    assert (out.double() - want).abs().max() < 1e-5
    assert torch.allclose(lse.double(), want_lse, atol=1e-5)  # -inf rows equal too
    assert not out.isnan().any()


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(sorted(o)))
def test_tiled_paged_equals_reference(tiny_tiles: None, block_size: int, opts: dict) -> None:
    gen = torch.Generator().manual_seed(block_size)
    seq_lens, q_lens = [23, 11, 2, 16], [1, 11, 2, 5]
    nb = sum(-(-s // block_size) for s in seq_lens) + 2
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, 16, v_head_dim=8, block_size=block_size, dtype="fp32"), nb)
    nan_k = torch.full((nb * block_size, 2, 16), float("nan"))
    cache.write(0, nan_k, nan_k[..., :8], torch.arange(nb * block_size))
    perm = (torch.randperm(nb - 1, generator=gen) + 1).tolist()
    width = max(-(-s // block_size) for s in seq_lens) + 1
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, s in enumerate(seq_lens):
        ids = [perm.pop() for _ in range(-(-s // block_size))]
        table[b, :len(ids)] = torch.tensor(ids)
        slots = torch.tensor(ids).repeat_interleave(block_size)[:s] * block_size + torch.arange(s) % block_size
        cache.write(0, torch.randn(s, 2, 16, generator=gen), torch.randn(s, 2, 8, generator=gen), slots)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    plan = hal.plan(cu, torch.tensor(seq_lens, dtype=torch.int32), table, cache)
    q = torch.randn(int(cu[-1]), 4, 16, generator=gen)
    out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True, **opts)
    kc, vc = cache.read(0, range(nb))
    want, want_lse = paged_attention_reference(q, kc, vc, cu, seq_lens, table, **opts)
    assert not out.isnan().any()
    assert (out.double() - want).abs().max() < 1e-5
    assert torch.allclose(lse.double(), want_lse, atol=1e-5)


def test_long_prefill_runs_in_tiles_without_a_full_score_matrix() -> None:
    # 4k x 4k x 8 heads of fp32 scores would be 512 MiB; the tiled kernel never builds it
    torch.manual_seed(0)
    q = torch.randn(4096, 8, 64, dtype=torch.bfloat16)
    k = torch.randn(4096, 2, 64, dtype=torch.bfloat16)
    out = hal.attention(q, k, k, causal=True)
    assert out.shape == (4096, 8, 64) and not out.isnan().any()
    # spot-check a few rows against the reference on their visible prefix
    for row in (0, 1777, 4095):
        want, _ = attention_reference(q[row:row + 1], k[:row + 1], k[:row + 1], causal=True)
        assert (out[row:row + 1].double() - want).abs().max() < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(sorted(o)))
def test_native_decode_and_torch_paths_both_match_the_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                                 opts: dict) -> None:
    native = pytest.importorskip("hal.backends.cpu.kernels.paged_decode")
    gen = torch.Generator().manual_seed(7)
    seq_lens, q_lens = [40, 17, 1, 64, 33], [1, 3, 1, 20, 16]  # 20 > MAX_Q_LEN: torch beside native
    bs = 16
    nb = sum(-(-s // bs) for s in seq_lens) + 1
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, 64, block_size=bs, dtype=dtype), nb)
    cache.write(0, torch.randn(nb * bs, 2, 64, generator=gen).to(dtype), torch.randn(nb * bs, 2, 64, generator=gen).to(dtype),
                torch.arange(nb * bs))
    table = torch.randperm(nb, generator=gen)[:nb - 1].to(torch.int32)
    rows, start = [], 0
    for s in seq_lens:
        n = -(-s // bs)
        rows.append(torch.cat([table[start:start + n], torch.zeros(8 - n, dtype=torch.int32)]))
        start += n
    bt = torch.stack(rows)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    plan = hal.plan(cu, torch.tensor(seq_lens, dtype=torch.int32), bt, cache)
    q = torch.randn(int(cu[-1]), 4, 64, generator=gen).to(dtype)
    kc, vc = cache.read(0, range(nb))
    want, want_lse = paged_attention_reference(q, kc, vc, cu, seq_lens, bt, **opts)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    results = {}
    for path in ("native", "torch"):
        if path == "torch":
            monkeypatch.setattr(native, "applies", lambda *a: False)
        elif not native.applies(cache.storage, q):
            pytest.skip("native kernels unavailable: " + hal.backends.cpu.kernels.status("paged_decode"))
        out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True, **opts)
        assert (out.double() - want).abs().max() < tol, path
        assert torch.allclose(lse.double(), want_lse, atol=1e-4), path
        results[path] = out
    assert (results["native"].double() - results["torch"].double()).abs().max() < tol


# the native prefill's builds: the one HAL_CPU_AMX selects (tiles where the CPU has them), and its AVX-512
# path with the 64-key tiles of an AMX build, which runs where Linux refuses the tiles
PREFILL_BUILDS = {"selected": None, "avx512-kt64": ("HAL_AMX_OFF", "HAL_PREFILL_KT=64")}


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("build", list(PREFILL_BUILDS))
def test_native_prefill_and_torch_paths_both_match_the_reference(monkeypatch: pytest.MonkeyPatch, opts: dict,
                                                                 paged: bool, build: str) -> None:
    prefill = pytest.importorskip("hal.backends.cpu.kernels.flash_prefill")
    if PREFILL_BUILDS[build] is not None:
        monkeypatch.setattr(prefill, "amx_macros", lambda: PREFILL_BUILDS[build])
    gen = torch.Generator().manual_seed(11)
    q_lens, kv_lens = [40, 17, 70, 1], [40, 90, 70, 30]  # 1: decode-shaped, beside the long runs
    bs, hq, hkv, d = 16, 4, 2, 64
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(torch.bfloat16)
    k = torch.randn(sum(kv_lens), hkv, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(sum(kv_lens), hkv, d, generator=gen).to(torch.bfloat16)
    cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + kv_lens).cumsum(0).to(torch.int32)
    want, want_lse = attention_reference(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        if not paged:
            return hal.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **opts)
        nb = sum(-(-s // bs) for s in kv_lens) + 1
        cache = hal.KVCache(hal.KVCacheSpec(1, hkv, d, block_size=bs, dtype="bf16"), nb)
        ids = (torch.randperm(nb - 1, generator=gen) + 1).tolist()
        table = torch.zeros(len(kv_lens), 8, dtype=torch.int32)
        for b, s in enumerate(kv_lens):
            blocks = [ids.pop() for _ in range(-(-s // bs))]
            table[b, :len(blocks)] = torch.tensor(blocks)
            slots = torch.tensor(blocks).repeat_interleave(bs)[:s] * bs + torch.arange(s) % bs
            cache.write(0, k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]], slots)
        plan = hal.plan(cu_q, torch.tensor(kv_lens, dtype=torch.int32), table, cache)
        return hal.paged_attention(q, cache, 0, plan, return_lse=True, **opts)

    results = {}
    for path in ("native", "torch"):
        if path == "torch":
            monkeypatch.setattr(prefill, "applies", lambda *a: False)
        elif not prefill.applies(torch.bfloat16, hq, hkv, d, d):
            pytest.skip("native prefill unavailable on this CPU: " + hal.backends.cpu.kernels.status("flash_prefill"))
        out, lse = run()
        assert (out.double() - want).abs().max() < 3e-2, path
        assert torch.allclose(lse.double(), want_lse, atol=1e-4), path
        results[path] = out
    assert (results["native"].double() - results["torch"].double()).abs().max() < 3e-2


def _random_paged(gen: torch.Generator, seq_lens: list[int], q_lens: list[int], bs: int, width: int,
                  kv_dtype: str = "auto") -> tuple[hal.KVCache, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A bf16 cache (2 KV heads of 64, one spare block) of random K/V whose sequences take randomly
    permuted blocks; 4 query heads. Returns cache, block table [B, width], cu_seqlens_q, q, num_blocks."""
    nb = sum(-(-s // bs) for s in seq_lens) + 1
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, 64, block_size=bs, dtype="bf16", kv_dtype=kv_dtype), nb)
    cache.write(0, torch.randn(nb * bs, 2, 64, generator=gen).bfloat16(), torch.randn(nb * bs, 2, 64, generator=gen).bfloat16(),
                torch.arange(nb * bs))
    ids = torch.randperm(nb, generator=gen).to(torch.int32).tolist()
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, s in enumerate(seq_lens):
        n = -(-s // bs)
        table[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 4, 64, generator=gen).bfloat16()
    return cache, table, cu, q, nb


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(sorted(o)))
def test_native_decode_splits_long_sequences_exactly(opts: dict) -> None:
    """Sequences longer than the kernel's split (512 keys) are computed in splits merged in order:
    the result matches the reference, the sink counts once, and a sequence alone == in a batch."""
    native = pytest.importorskip("hal.backends.cpu.kernels.paged_decode")
    seq_lens, q_lens, bs = [1300, 600, 5, 513], [1, 2, 1, 3], 16
    cache, table, cu, q, nb = _random_paged(torch.Generator().manual_seed(5), seq_lens, q_lens, bs, 90)
    if not native.applies(cache.storage, q):
        pytest.skip("native kernels unavailable")
    plan = hal.plan(cu, torch.tensor(seq_lens, dtype=torch.int32), table, cache)
    out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True, **opts)
    kc, vc = cache.read(0, range(nb))
    want, want_lse = paged_attention_reference(q, kc, vc, cu, seq_lens, table, **opts)
    assert (out.double() - want).abs().max() < 3e-2
    assert torch.allclose(lse.double(), want_lse, atol=1e-4)
    alone = hal.paged_attention(q[:1], cache, 0, hal.plan(torch.tensor([0, 1], dtype=torch.int32),
                                                          torch.tensor(seq_lens[:1], dtype=torch.int32), table[:1], cache),
                                **opts)
    assert torch.equal(alone, out[:1])  # batch invariance with splits


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_decode_call_prepared_once_per_plan_serves_each_layer_option_and_cache(monkeypatch: pytest.MonkeyPatch,
                                                                              kv_dtype: str) -> None:
    """A decode step's kernel arguments are built once per plan, cache and option set and reused by every
    layer: each layer, option set and cache sharing the plan still gets its own result."""
    native = pytest.importorskip("hal.backends.cpu.kernels.paged_decode")
    seq_lens, q_lens, bs = [70, 9, 33], [1, 2, 1], 16
    gen = torch.Generator().manual_seed(21)
    caches = []
    for _ in range(2):  # two caches of one geometry, different contents: one plan serves both
        cache, table, cu, q, nb = _random_paged(torch.Generator().manual_seed(len(caches)), seq_lens, q_lens, bs, 8,
                                                kv_dtype)
        caches.append(cache)
    if not native.applies(caches[0].storage, q):
        pytest.skip("native kernels unavailable: " + hal.backends.cpu.kernels.status("paged_decode"))
    q = torch.randn(q.shape, generator=gen).bfloat16()
    plan = hal.plan(cu, torch.tensor(seq_lens, dtype=torch.int32), table, caches[0])
    built = []
    template = native._template
    monkeypatch.setattr(native, "_template", lambda *a, **k: built.append(1) or template(*a, **k))
    option_sets = [{"causal": True}, {"causal": True, "window_left": 4}, {"causal": True, "softcap": 2.0, "scale": 0.7}]
    for _ in range(2):  # the second pass builds nothing
        for cache in caches:
            for opts in option_sets:
                for with_lse in (False, True):
                    kc, vc = cache.read(0, range(nb), dtype="fp64")
                    want, want_lse = paged_attention_reference(q, kc, vc, cu, seq_lens, table, **opts)
                    out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True, **opts)
                    assert (out.double() - want).abs().max() < 3e-2
                    assert (lse.double() - want_lse).abs().max() < 1e-4
                    plain = hal.paged_attention(q, cache, 0, plan, **opts)
                    assert torch.equal(plain, out)
    assert len(built) == len(caches) * len(option_sets) * 2  # per cache, option set and return_lse
    cache2 = hal.KVCache(hal.KVCacheSpec(2, 2, 64, block_size=bs, dtype="bf16", kv_dtype=kv_dtype), nb)
    for layer in range(2):
        cache2.write(layer, torch.randn(nb * bs, 2, 64, generator=gen).bfloat16(),
                     torch.randn(nb * bs, 2, 64, generator=gen).bfloat16(), torch.arange(nb * bs))
    outs = []
    for layer in (0, 1, 0):
        kc, vc = cache2.read(layer, range(nb), dtype="fp64")
        want, _ = paged_attention_reference(q, kc, vc, cu, seq_lens, table)
        outs.append(hal.paged_attention(q, cache2, layer, plan))
        assert (outs[-1].double() - want).abs().max() < 3e-2
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_native_decode_is_the_same_bitwise_for_any_number_of_threads(kv_dtype: str) -> None:
    """The kernel splits a call into (sequence, KV-head group, 512-key split) items by the thread count;
    the groups and which thread runs an item never change a head's arithmetic, so out and LSE are
    identical bitwise with 1-4 threads, for one sequence of 1, 2, 3 or 5 splits and for a batch."""
    native = pytest.importorskip("hal.backends.cpu.kernels.paged_decode")
    seq_lens, bs = [300, 1000, 1300, 2100], 16
    cache, table, cu, q, _ = _random_paged(torch.Generator().manual_seed(17), seq_lens, [1] * len(seq_lens), bs,
                                           140, kv_dtype)
    if not native.applies(cache.storage, q):
        pytest.skip("native kernels unavailable: " + hal.backends.cpu.kernels.status("paged_decode"))
    plans = [(hal.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([s], dtype=torch.int32), table[b:b + 1],
                       cache), q[b:b + 1]) for b, s in enumerate(seq_lens)]
    plans.append((hal.plan(cu, torch.tensor(seq_lens, dtype=torch.int32), table, cache), q))
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results[n] = [hal.paged_attention(qp, cache, 0, plan, return_lse=True) for plan, qp in plans]
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3, 4):
        for (out, lse), (out1, lse1) in zip(results[n], results[1]):
            assert torch.equal(out, out1) and torch.equal(lse, lse1), n
    for b in range(len(seq_lens)):  # and a sequence alone == in the batch
        assert torch.equal(results[2][b][0], results[2][-1][0][b:b + 1])


@pytest.mark.parametrize("kv_dtype", ["int8", "int6", "int4", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("opts", OPTION_SETS[:3] + OPTION_SETS[-1:], ids=lambda o: "-".join(sorted(o)))
def test_native_decode_of_quantized_rows_matches_torch_and_reference(monkeypatch: pytest.MonkeyPatch, kv_dtype: str,
                                                                     opts: dict) -> None:
    """int8/int6/int4/fp8 rows decoded inside the native kernel equal attention on the cache's exact values
    (stored value x scale), as the torch path does."""
    native = pytest.importorskip("hal.backends.cpu.kernels.paged_decode")
    seq_lens, q_lens, bs = [700, 40, 9], [1, 3, 1], 16
    cache, table, cu, q, nb = _random_paged(torch.Generator().manual_seed(13), seq_lens, q_lens, bs, 50, kv_dtype)
    plan = hal.plan(cu, torch.tensor(seq_lens, dtype=torch.int32), table, cache)
    kc, vc = cache.read(0, range(nb), dtype="fp64")  # the cache's exact values
    want, want_lse = paged_attention_reference(q, kc, vc, cu, seq_lens, table, **opts)
    if not native.applies(cache.storage, q):
        pytest.skip("native quantized decode needs AVX-512 BF16")
    results = {}
    for path in ("native", "torch"):
        if path == "torch":
            monkeypatch.setattr(native, "applies", lambda *a: False)
        out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True, **opts)
        assert (out.double() - want).abs().max() < 3e-2, path
        assert (lse.double() - want_lse).abs().max() < 1e-4, path
        results[path] = out
    assert (results["native"].double() - results["torch"].double()).abs().max() < 3e-2


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_decode_matches_the_reference_at_every_tail_of_a_tile(kv_dtype: str) -> None:
    """fp8 decode on tiles takes 64 keys at a time, in halves of 32 for the scores and one or two
    weight tiles for P.V: sequences ending anywhere in a tile (one key, a half, just past it) on
    permuted pages, in one call, match the reference."""
    g = torch.Generator().manual_seed(5)
    d, bs = 128, 16
    lens = [1, 15, 17, 31, 32, 33, 47, 63, 64, 65, 96, 127, 129]
    nbs = [-(-n // bs) for n in lens]
    nb = sum(nbs)
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, d, block_size=bs, dtype="bf16", kv_dtype=kv_dtype), nb, backend="cpu")
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), max(nbs), dtype=torch.int32)
    first = 0
    for b, n in enumerate(lens):
        blocks = perm[first:first + nbs[b]]
        first += nbs[b]
        table[b, :nbs[b]] = blocks
        slots = (blocks.repeat_interleave(bs) * bs + torch.arange(bs).repeat(nbs[b]))[:n]
        cache.write(0, torch.randn(n, 2, d, generator=g).bfloat16(), torch.randn(n, 2, d, generator=g).bfloat16(), slots)
    cu = list(range(len(lens) + 1))
    plan = hal.plan(torch.tensor(cu, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), table, cache)
    q = torch.randn(len(lens), 8, d, generator=g).bfloat16()
    out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True)
    kc, vc = cache.read(0, range(nb), dtype="fp64")
    want, want_lse = paged_attention_reference(q, kc, vc, cu, lens, table)
    err = (out.double() - want).abs().amax(dim=(1, 2))
    assert (err < 2e-2).all(), dict(zip(lens, err.tolist()))
    assert (lse.double() - want_lse).abs().max() < 1e-3


def test_fp8_e4m3_decode_sums_a_tile_of_the_largest_values_without_overflow() -> None:
    """fp8_e4m3's P.V runs in fp16 where the CPU has AMX (pv4_fp16): a tile's sums of weight times
    value stay in fp16's range only while the products are at most 448, so equal scores (every weight
    1) over whole 64-key tiles of +-448 must come out +-448 exactly, not inf, and a mix of the largest
    and the smallest (subnormal) values must match the reference."""
    d, bs = 128, 16
    ones = torch.ones(1, 2)
    sign = torch.where(torch.arange(d) % 3 == 0, -1.0, 1.0)
    for n in (64, 130):
        nb = -(-n // bs)
        cache = hal.KVCache(hal.KVCacheSpec(1, 2, d, block_size=bs, dtype="bf16", kv_dtype="fp8_e4m3"), nb,
                            backend="cpu", k_scale=ones, v_scale=ones)
        k = torch.ones(n, 2, d)
        v = (448.0 * sign).expand(n, 2, d).clone()
        cache.write(0, k.bfloat16(), v.bfloat16(), torch.arange(n))
        table = torch.arange(nb, dtype=torch.int32).view(1, nb)
        plan = hal.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([n], dtype=torch.int32), table, cache)
        q = torch.randn(1, 8, d, generator=torch.Generator().manual_seed(n)).bfloat16()
        out = hal.paged_attention(q, cache, 0, plan).float()
        assert torch.equal(out, (448.0 * sign).expand(1, 8, d)), out.abs().max()
        g = torch.Generator().manual_seed(n + 1)
        big = torch.rand(n, 2, d, generator=g) < 0.5
        v = torch.where(big, 448.0, 2.0 ** -9) * (torch.randint(0, 2, (n, 2, d), generator=g) * 2 - 1)
        cache.write(0, (torch.randn(n, 2, d, generator=g) * 0.1).bfloat16(), v.bfloat16(), torch.arange(n))
        kc, vc = cache.read(0, range(nb), dtype="fp64")
        out = hal.paged_attention(q, cache, 0, plan).double()
        want, _ = paged_attention_reference(q, kc, vc, [0, 1], [n], table)
        assert (out - want).abs().max() <= 4e-3 * want.abs().max(), (out - want).abs().max()


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_decode_reads_subnormals_as_themselves_or_zero_and_takes_any_query(kv_dtype: str) -> None:
    """Attention may read fp8 subnormals as zero (the README's "Decisions the SPEC leaves open": the
    tile path widens fp8 rows by shifts, and the tile unit reads bf16 subnormals as zero), never as
    anything else: with every value of V subnormal the output is either the reference's or exactly
    zero. Queries of 2^64 and more (the shifts' queries are scaled by 2^64) take the exact route;
    2^60 still the shifts: both match, and so do scales of 2^80."""
    g = torch.Generator().manual_seed(11)
    d, bs, n = 128, 16, 200
    nb = -(-n // bs)
    ones = torch.ones(1, 2)
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, d, block_size=bs, dtype="bf16", kv_dtype=kv_dtype), nb, backend="cpu",
                        k_scale=ones, v_scale=ones)
    step = 2.0 ** -9 if kv_dtype == "fp8_e4m3" else 2.0 ** -16  # the smallest subnormal at scale 1
    k = torch.randn(n, 2, d, generator=g)
    v = torch.randint(1, 3, (n, 2, d), generator=g) * step * (torch.randint(0, 2, (n, 2, d), generator=g) * 2 - 1)
    cache.write(0, k.bfloat16(), v.bfloat16(), torch.arange(n))
    table = torch.arange(nb, dtype=torch.int32).view(1, nb)
    plan = hal.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([n], dtype=torch.int32), table, cache)
    kc, vc = cache.read(0, range(nb), dtype="fp64")
    stored = vc.flatten(0, 1)[:n].abs()
    assert stored.max() == 2 * step and stored.min() == step  # stored exactly, all subnormal
    q = torch.randn(1, 8, d, generator=g).bfloat16()
    out = hal.paged_attention(q, cache, 0, plan).double()
    want, _ = paged_attention_reference(q, kc, vc, [0, 1], [n], table)
    assert want.abs().max() > step / 8
    assert (out == 0).all() or (out - want).abs().max() <= 2e-2 * want.abs().max(), (out - want).abs().max()
    # normal values, queries with an element of 2^60 (one head) and 2^70 (another)
    cache.write(0, k.bfloat16(), torch.randn(n, 2, d, generator=g).bfloat16(), torch.arange(n))
    kc, vc = cache.read(0, range(nb), dtype="fp64")
    for big in (2.0 ** 60, 2.0 ** 70):
        qb = q.clone()
        qb[0, 1, 5] = big
        qb[0, 6, 9] = -big / 4
        out, lse = hal.paged_attention(qb, cache, 0, plan, return_lse=True)
        want, want_lse = paged_attention_reference(qb, kc, vc, [0, 1], [n], table)
        assert torch.isfinite(out).all() and (out.double() - want).abs().max() < 3e-2, big
        assert ((lse.double() - want_lse).abs() / want_lse.abs().clamp(min=1)).max() < 1e-4, big
    # scales of 2^80 (values near 2^88): the shifts' 2^56 must not overflow what the scales carry
    big_scale = torch.full((1, 2), 2.0 ** 80)
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, d, block_size=bs, dtype="bf16", kv_dtype=kv_dtype), nb, backend="cpu",
                        k_scale=big_scale, v_scale=big_scale)
    cache.write(0, (k * 2.0 ** 88).bfloat16(), (torch.randn(n, 2, d, generator=g) * 2.0 ** 88).bfloat16(), torch.arange(n))
    kc, vc = cache.read(0, range(nb), dtype="fp64")
    qs = q * 2.0 ** -88
    out, lse = hal.paged_attention(qs, cache, 0, plan, return_lse=True)
    want, want_lse = paged_attention_reference(qs, kc, vc, [0, 1], [n], table)
    assert torch.isfinite(out).all() and ((out.double() - want).abs() / want.abs().max()).max() < 3e-2
    assert (lse.double() - want_lse).abs().max() < 1e-3


def _denormals_survive() -> bool:
    """Whether fp32 arithmetic in this thread still gives denormals (no FTZ left set)."""
    return (torch.tensor([1e-38], dtype=torch.float32) / 8).item() > 0


@pytest.mark.parametrize("kind", ["auto", "int8", "fp8_e4m3", "prefill"])
def test_scores_spread_past_fp32_range_stay_exact_and_leave_the_callers_fp_mode(kind: str) -> None:
    """Scores 200 apart give softmax weights far below fp32's normal range (the native kernels flush
    them to zero, FTZ/DAZ, for the call's duration: denormal steps take microcode assists on Intel).
    Out and LSE still match the reference, and the calling thread gets its own MXCSR back."""
    torch.set_flush_denormal(False)  # whatever ran before in this thread
    if not _denormals_survive():
        pytest.skip("this CPU flushes denormals in this thread regardless")
    g = torch.Generator().manual_seed(5)
    bs, hkv, d, n = 16, 2, 64, 200
    k = torch.randn(n, hkv, d, generator=g) * 0.1
    k[:, :, 0] = torch.linspace(-30.0, 30.0, n)[torch.randperm(n, generator=g)].unsqueeze(1)  # scores +-106
    v = torch.randn(n, hkv, d, generator=g)
    q_lens = [1] if kind != "prefill" else [40]
    q = torch.randn(sum(q_lens), 4, d, generator=g) * 0.1
    q[:, :, 0] = 28.0
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    nb = -(-n // bs)
    cache = hal.KVCache(hal.KVCacheSpec(1, hkv, d, block_size=bs, dtype="bf16",
                                        kv_dtype="auto" if kind == "prefill" else kind), nb)
    table = torch.randperm(nb, generator=g).to(torch.int32).view(1, nb)
    slots = (table[0].long().repeat_interleave(bs) * bs + torch.arange(nb * bs) % bs)[:n]
    cache.write(0, k, v, slots)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    plan = hal.plan(cu, torch.tensor([n], dtype=torch.int32), table, cache)
    out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True)
    kc, vc = cache.read(0, range(nb), dtype="fp64")
    want, want_lse = paged_attention_reference(q, kc, vc, cu, [n], table)
    assert (out.double() - want).abs().max() < 3e-2
    assert (lse.double() - want_lse).abs().max() < 1e-3
    assert _denormals_survive(), "a native kernel left FTZ/DAZ set in the calling thread"


@pytest.mark.parametrize("kind", ["auto", "int8", "fp8_e4m3", "prefill"])
def test_scores_of_2_to_the_40_keep_the_max_keys_weight(kind: str) -> None:
    """Scores near 2^40: the softmax's exponents are taken as (x - m) log2 e, so the largest score's
    weight is exactly 1 (as x log2 e - m log2 e it was 2^(the rounding of m log2 e): inf or 0 past
    2^31, NaN out), and the output is the value row of the key with the largest score."""
    g = torch.Generator().manual_seed(23)
    bs, hkv, d, n = 16, 2, 64, 150
    k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    k[:, :, 3] *= 0.1
    k[torch.randint(0, n, (hkv,), generator=g), torch.arange(hkv), 3] = 3.0  # one key per head stands out
    q_lens = [1] if kind != "prefill" else [40]
    q = torch.randn(sum(q_lens), 4 * hkv, d, generator=g) * 0.1
    q[:, :, 3] = 2.0 ** 40
    nb = -(-n // bs)
    cache = hal.KVCache(hal.KVCacheSpec(1, hkv, d, block_size=bs, dtype="bf16",
                                        kv_dtype="auto" if kind == "prefill" else kind), nb, backend="cpu")
    table = torch.randperm(nb, generator=g).to(torch.int32).view(1, nb)
    slots = (table[0].long().repeat_interleave(bs) * bs + torch.arange(nb * bs) % bs)[:n]
    cache.write(0, k.bfloat16(), v.bfloat16(), slots)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    plan = hal.plan(cu, torch.tensor([n], dtype=torch.int32), table, cache)
    out, lse = hal.paged_attention(q.bfloat16(), cache, 0, plan, return_lse=True)
    kc, vc = cache.read(0, range(nb), dtype="fp64")
    want, want_lse = paged_attention_reference(q.bfloat16(), kc, vc, cu, [n], table)
    assert torch.isfinite(out).all() and (out.double() - want).abs().max() < 3e-2
    assert ((lse.double() - want_lse).abs() / want_lse.abs()).max() < 1e-6


@pytest.mark.parametrize("kv_dtype", ["int8", "int6", "int4", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("d", [96, 64, 160])
def test_quantized_decode_on_head_dims_either_path_takes(kv_dtype: str, d: int) -> None:
    """Head dims the native kernel declines for quantized rows (Dv % 64 != 0) go to the torch path;
    whichever runs, out and LSE match the reference on the cache's exact values."""
    g = torch.Generator().manual_seed(d)
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, d, block_size=16, dtype="bf16", kv_dtype=kv_dtype), 8, backend="cpu")
    cache.write(0, torch.randn(128, 2, d, generator=g).bfloat16(), torch.randn(128, 2, d, generator=g).bfloat16(),
                torch.arange(128))
    table = torch.randperm(8, generator=g).view(1, 8).to(torch.int32)
    plan = hal.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([100], dtype=torch.int32), table, cache)
    q = torch.randn(1, 4, d, generator=g).bfloat16()
    out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True)
    kc, vc = cache.read(0, range(8), dtype="fp64")
    want, want_lse = paged_attention_reference(q, kc, vc, [0, 1], [100], table)
    assert (out.double() - want).abs().max() < 1e-2
    assert (lse.double() - want_lse).abs().max() < 1e-4


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int6", "int4", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_decode_of_fp16_and_fp32_models_keeps_their_tolerance(dtype: str, kv_dtype: str) -> None:
    """fp16/fp32 models on every format, native where the kernel takes them (fp32 FMAs for their own
    rows and fp8; int16 products for integer rows of fp16 models), within the conformance table's
    tolerance of the golden on the cache's exact values (the same-dtype reference reads it back)."""
    from hal.conformance.oracles import same_dtype_attention
    from hal.conformance.tolerances import compare

    tdt = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(7)
    d, bs, seq_lens, q_lens = 128, 16, [601, 37], [3, 1]
    nb = sum(-(-s // bs) for s in seq_lens)
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, d, block_size=bs, dtype=dtype, kv_dtype=kv_dtype), nb, backend="cpu")
    cache.write(0, torch.randn(nb * bs, 2, d, generator=g).to(tdt), torch.randn(nb * bs, 2, d, generator=g).to(tdt),
                torch.arange(nb * bs))
    ids = torch.randperm(nb, generator=g).to(torch.int32)
    table = torch.zeros(2, 40, dtype=torch.int32)
    table[0, :38], table[1, :3] = ids[:38], ids[38:41]
    cu = [0, 3, 4]
    plan = hal.plan(torch.tensor(cu, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), table, cache)
    q = torch.randn(4, 4, d, generator=g).to(tdt)
    out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True)
    kc, vc = cache.read(0, range(nb), dtype="fp64")
    want, want_lse = paged_attention_reference(q, kc, vc, cu, seq_lens, table)
    kr, vr = cache.read(0, range(nb))
    kq = torch.cat([kr[table[b, :-(-s // bs)].long()].flatten(0, 1)[:s] for b, s in enumerate(seq_lens)])
    vq = torch.cat([vr[table[b, :-(-s // bs)].long()].flatten(0, 1)[:s] for b, s in enumerate(seq_lens)])
    r_out, r_lse = same_dtype_attention(q, kq, vq, cu, [0, 601, 638], causal=True)
    for c in (compare("out", dtype, out, want, r_out), compare("lse", dtype, lse, want_lse, r_lse, lse=True)):
        assert c.ok, c.describe()


@pytest.mark.parametrize("q_len", [4, 8, 16])
def test_multi_token_decode_with_16_or_more_rows_matches_reference(q_len: int) -> None:
    """q_len x 4 query heads per KV head = 16+ rows: the kernel scores with rows in the vector lanes."""
    g = torch.Generator().manual_seed(q_len)
    d, bs, seq_lens = 128, 16, [300, q_len + 5]
    nb = sum(-(-s // bs) for s in seq_lens)
    cache = hal.KVCache(hal.KVCacheSpec(1, 2, d, block_size=bs, dtype="bf16"), nb, backend="cpu")
    cache.write(0, torch.randn(nb * bs, 2, d, generator=g).bfloat16(), torch.randn(nb * bs, 2, d, generator=g).bfloat16(),
                torch.arange(nb * bs))
    ids = torch.randperm(nb, generator=g).to(torch.int32)
    n0 = -(-seq_lens[0] // bs)
    table = torch.zeros(2, n0, dtype=torch.int32)
    table[0], table[1, :nb - n0] = ids[:n0], ids[n0:]
    cu = [0, q_len, 2 * q_len]
    plan = hal.plan(torch.tensor(cu, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), table, cache)
    q = torch.randn(2 * q_len, 8, d, generator=g).bfloat16()
    out, lse = hal.paged_attention(q, cache, 0, plan, return_lse=True)
    kc, vc = cache.read(0, range(nb))
    want, want_lse = paged_attention_reference(q, kc, vc, cu, seq_lens, table)
    assert (out.double() - want).abs().max() < 2e-2
    assert (lse.double() - want_lse).abs().max() < 1e-4


def test_hal_cpu_amx_takes_auto_off_or_emulate_and_names_itself_otherwise() -> None:
    from hal.backends.cpu.kernels.paged_decode import MLA_BUILD, build

    with hal.config.override(HAL_CPU_AMX="emulate"):
        assert build() == ("HAL_AMX_EMULATE",)
        assert build(staged=True) == (*MLA_BUILD, "HAL_AMX_EMULATE")
    with hal.config.override(HAL_CPU_AMX="off"):
        assert build() == ("HAL_AMX_OFF",)
    with hal.config.override(HAL_CPU_AMX="auto"):
        assert build() == ()
    with hal.config.override(HAL_CPU_AMX="tiles"), pytest.raises(hal.InvalidInput, match="HAL_CPU_AMX.*emulate"):
        build()
