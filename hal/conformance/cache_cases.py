"""Families ``kv-cache`` and ``capabilities``.

- kv-cache: write then read is exact for "auto"; a -1 slot is skipped; slots and layers not
  written keep their contents; ``copy_blocks`` copies every layer; each declared memory kind works.
- capabilities: every declared head dim, block size and dtype runs and is right; a sample of
  undeclared ones and every undeclared feature raises ``hal.Unsupported`` before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from hal.backend import Backend
from hal.conformance.case import Case, CheckFailed, dense_check, paged_check
from hal.conformance.scenarios import Batch, Shape, generator, randn
from hal.conformance.tolerances import Comparison

TINY = Batch("tiny", ((1, 9), (3, 3), (2, 20)))


def _exact(what: str, got: torch.Tensor, want: torch.Tensor) -> Comparison:
    got = got.cpu()
    same = got.shape == want.shape and got.dtype == want.dtype and bool(
        torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0)))
    if not same:
        raise CheckFailed(f"{what}: not bit-exact (shape {list(got.shape)} vs {list(want.shape)}, "
                          f"dtype {got.dtype} vs {want.dtype})")
    return Comparison(what + " (exact)", 0.0, 0.0, 0.0)


def _write_read(name: str, dtype: str, memory: str, backend: Backend) -> list[Comparison]:
    import hal

    gen = generator(name)
    bs, nb, hkv, d, dv = 16, 6, 2, 64, 32
    spec = hal.KVCacheSpec(3, hkv, d, v_head_dim=dv, block_size=bs, dtype=dtype)
    cache = hal.KVCache(spec, nb, backend=backend, memory=memory)
    if cache.memory != memory:
        raise CheckFailed(f"cache.memory is {cache.memory!r}, asked {memory!r}")
    dev = cache.device
    n = nb * bs
    base_k, base_v = randn(gen, n, hkv, d, dtype=dtype), randn(gen, n, hkv, dv, dtype=dtype)
    for layer in range(3):  # every slot of every layer holds known values
        cache.write(layer, base_k.to(dev), base_v.to(dev), torch.arange(n).to(dev))
    # scattered write to layer 1: 20 tokens, two of them skipped with -1
    slots = torch.randperm(n, generator=gen)[:20]
    slots[[3, 11]] = -1
    new_k, new_v = randn(gen, 20, hkv, d, dtype=dtype), randn(gen, 20, hkv, dv, dtype=dtype)
    cache.write(1, new_k.to(dev), new_v.to(dev), slots.to(dev))
    want_k, want_v = base_k.clone(), base_v.clone()
    keep = slots >= 0
    want_k[slots[keep]], want_v[slots[keep]] = new_k[keep], new_v[keep]
    ids = torch.randperm(nb, generator=gen)
    comps = []
    for layer, (wk, wv) in ((0, (base_k, base_v)), (1, (want_k, want_v)), (2, (base_k, base_v))):
        k, v = cache.read(layer, ids)
        comps.append(_exact(f"layer {layer} k", k, wk.view(nb, bs, hkv, d)[ids]))
        comps.append(_exact(f"layer {layer} v", v, wv.view(nb, bs, hkv, dv)[ids]))
    # copy_blocks: (src, dst) pairs in every layer
    cache.copy_blocks([(int(ids[0]), int(ids[1])), (int(ids[2]), int(ids[3]))])
    for layer, (wk, wv) in ((0, (base_k, base_v)), (1, (want_k, want_v))):
        blocks_k = wk.view(nb, bs, hkv, d).clone()
        blocks_v = wv.view(nb, bs, hkv, dv).clone()
        blocks_k[ids[[1, 3]]], blocks_v[ids[[1, 3]]] = blocks_k[ids[[0, 2]]], blocks_v[ids[[0, 2]]]
        k, v = cache.read(layer, list(range(nb)))
        comps.append(_exact(f"layer {layer} k after copy_blocks", k, blocks_k))
        comps.append(_exact(f"layer {layer} v after copy_blocks", v, blocks_v))
    return comps


def kv_cache_cases() -> Iterator[Case]:
    for memory in ("device", "unified"):
        for dtype in ("fp32", "fp16", "bf16"):
            yield Case("kv-cache", f"write-read-copy/{dtype}/{memory}", "quick",
                       dict(dtype=dtype, kv_dtype="auto", head_dim=64, v_head_dim=32, block_size=16,
                            memory=memory, features=["paged", "copy_blocks"]),
                       partial(_write_read, f"kv-cache/{dtype}/{memory}", dtype, memory))


# ---- capabilities --------------------------------------------------------------------------------

def _declared_head_dims(backend: Backend) -> list[Comparison]:
    caps = backend.capabilities()
    dtype = "fp32" if "fp32" in caps.dtypes else sorted(caps.dtypes)[0]
    comps = []
    hq = 4 if "gqa" in caps.features else 2
    for d in sorted(caps.head_dims):
        shape = Shape(f"d{d}", hq, 2, d, d)
        if not caps.why_not(features=["dense", "causal"]):
            comps += dense_check(backend, f"capabilities/head-dim/{d}/dense", shape, TINY, dtype, {"causal": True})
        if not caps.why_not(features=["paged", "causal"]):
            bs = sorted(caps.block_sizes)[0]
            comps += paged_check(backend, f"capabilities/head-dim/{d}/paged", shape, TINY, dtype, bs, {})
    return comps


def _declared_block_sizes(backend: Backend) -> list[Comparison]:
    caps = backend.capabilities()
    dtype = "fp32" if "fp32" in caps.dtypes else sorted(caps.dtypes)[0]
    d = 64 if 64 in caps.head_dims else sorted(caps.head_dims)[0]
    shape = Shape(f"d{d}", 4 if "gqa" in caps.features else 2, 2, d, d)
    comps = []
    for bs in sorted(caps.block_sizes):
        comps += paged_check(backend, f"capabilities/block-size/{bs}", shape, TINY, dtype, bs, {})
    return comps


def _declared_dtypes(backend: Backend) -> list[Comparison]:
    caps = backend.capabilities()
    d = 64 if 64 in caps.head_dims else sorted(caps.head_dims)[0]
    comps = []
    for dtype in sorted(caps.dtypes):
        comps += dense_check(backend, f"capabilities/dtype/{dtype}", Shape(f"d{d}", 4, 4, d, d), TINY, dtype,
                             {"causal": True})
    return comps


def _expect_unsupported(what: str, call: Callable[[], Any]) -> Comparison:
    import hal

    try:
        call()
    except hal.Unsupported:
        return Comparison(f"{what} raises Unsupported", 0.0, 0.0, 0.0)
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"{what}: expected hal.Unsupported, got {type(e).__name__}: {e}") from e
    raise CheckFailed(f"{what}: undeclared but accepted (expected hal.Unsupported)")


def _undeclared(backend: Backend) -> list[Comparison]:
    """Undeclared head dims, block sizes, dtypes, memory kinds and features are refused."""
    import hal

    caps = backend.capabilities()
    dtype = "fp32" if "fp32" in caps.dtypes else sorted(caps.dtypes)[0]
    d = 64 if 64 in caps.head_dims else sorted(caps.head_dims)[0]
    bs = 16 if 16 in caps.block_sizes else sorted(caps.block_sizes)[0]
    gen = generator("capabilities/undeclared")
    dev = backend.default_device()
    comps = []

    def dense(hd: int = d, dt: str = dtype, hq: int = 2, **opts: Any) -> Any:
        q = randn(gen, 3, hq, hd, dtype=dt).to(dev)
        k = randn(gen, 5, 2, hd, dtype=dt).to(dev)
        return hal.attention(q, k, k.clone(), backend=backend, **opts)

    def cache(hd: int = d, block: int = bs, dt: str = dtype, memory: str = "device") -> Any:
        return hal.KVCache(hal.KVCacheSpec(1, 2, hd, block_size=block, dtype=dt), 4, backend=backend, memory=memory)

    hd = next(x for x in (72, 100, 40, 48, 24, 12, 8, 4, 2) if x not in caps.head_dims)
    comps.append(_expect_unsupported(f"dense head_dim {hd}", lambda: dense(hd=hd)))
    comps.append(_expect_unsupported(f"KVCache head_dim {hd}", lambda: cache(hd=hd)))
    block = next(x for x in (3, 5, 7, 24, 48) if x not in caps.block_sizes)
    comps.append(_expect_unsupported(f"KVCache block_size {block}", lambda: cache(block=block)))
    for dt in sorted({"fp32", "fp16", "bf16"} - set(caps.dtypes)):
        comps.append(_expect_unsupported(f"dense dtype {dt}", lambda dt=dt: dense(dt=dt)))
    for mem in sorted({"device", "unified"} - set(caps.memory)):
        comps.append(_expect_unsupported(f"memory {mem!r}", lambda mem=mem: cache(memory=mem)))
    feature_calls: dict[str, Callable[[], Any]] = {
        "window": lambda: dense(causal=True, window_left=2),
        "softcap": lambda: dense(softcap=3.0),
        "alibi": lambda: dense(alibi_slopes=torch.ones(2).to(dev)),
        "sinks": lambda: dense(sinks=torch.zeros(2).to(dev)),
        "lse": lambda: dense(return_lse=True),
        "non_causal": lambda: dense(causal=False),
        "gqa": lambda: dense(hq=4),
        "paged": lambda: cache(),
    }
    for feat, call in feature_calls.items():
        if feat not in caps.features:
            comps.append(_expect_unsupported(f"undeclared feature {feat!r}", call))
    return comps


def capability_cases() -> Iterator[Case]:
    yield Case("capabilities", "declared-head-dims", "quick", {}, _declared_head_dims)
    yield Case("capabilities", "declared-block-sizes", "quick", {"features": ["paged", "causal"]},
               _declared_block_sizes)
    yield Case("capabilities", "declared-dtypes", "quick", {"features": ["dense"]}, _declared_dtypes)
    yield Case("capabilities", "undeclared-refused", "quick", {}, _undeclared)
