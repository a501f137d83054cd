"""Named model shapes, generated ragged batches, and the paged-cache fixture.

Inputs are unit-normal, generated from a seed derived from the case name (and ``HAL_SEED``), so
every run of a case sees the same numbers on every backend. The paged fixture follows vLLM's and
FlashMLA's tests: pages randomly permuted, one block never used (block 0, the null block, which
also pads the block table), every slot that holds no token of the batch filled with NaN so an
out-of-bounds read poisons the output.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from hal import config
from hal.backend import Backend
from hal.dtypes import DTYPES

__all__ = ["Shape", "MODELS", "HEAD_DIM_SHAPES", "Batch", "BATCHES", "generator", "randn",
           "PagedSetup", "make_paged"]


@dataclass(frozen=True)
class Shape:
    """Attention heads and dims of a model (from its Hugging Face config)."""

    name: str
    hq: int  # query heads
    hkv: int  # KV heads
    d: int  # head dim of q and k
    dv: int  # head dim of v


MODELS: tuple[Shape, ...] = (
    Shape("llama-3-8b", 32, 8, 128, 128),  # GQA 4
    Shape("llama-3-70b", 64, 8, 128, 128),  # GQA 8
    Shape("baichuan-7b", 32, 32, 128, 128),  # MHA
    Shape("starcoder-mqa", 48, 1, 128, 128),  # MQA
)

HEAD_DIM_SHAPES: tuple[Shape, ...] = (
    Shape("tinyllama-1.1b-d64", 32, 4, 64, 64),
    Shape("phi-2-d80", 32, 32, 80, 80),
    Shape("phi-3-mini-d96", 32, 32, 96, 96),
    Shape("llama-3-8b-d128", 32, 8, 128, 128),
    Shape("gemma-7b-d256", 16, 16, 256, 256),
)


@dataclass(frozen=True)
class Batch:
    """A ragged batch: (q_len, kv_len) per sequence; queries are each sequence's last q_len tokens."""

    name: str
    seqs: tuple[tuple[int, int], ...]

    @property
    def cu_q(self) -> list[int]:
        out = [0]
        for q, _ in self.seqs:
            out.append(out[-1] + q)
        return out

    @property
    def cu_k(self) -> list[int]:
        out = [0]
        for _, k in self.seqs:
            out.append(out[-1] + k)
        return out


BATCHES: dict[str, Batch] = {b.name: b for b in (
    # decode, full prefill, chunked prefill, multi-token decode, a 1-token sequence, an idle one,
    # one ending exactly on a 16-block boundary
    Batch("mixed", ((1, 37), (7, 7), (24, 80), (3, 48), (1, 1), (0, 5), (4, 64))),
    Batch("decode", ((1, 1), (1, 17), (1, 130), (1, 255), (1, 64))),
    Batch("prefill", ((33, 33), (64, 64), (5, 5))),
    Batch("long", ((1, 700), (48, 520), (130, 130), (2, 1025))),
)}


def generator(case: str) -> torch.Generator:
    """A generator seeded from the case name and HAL_SEED, identical on every run and backend."""
    return torch.Generator().manual_seed(zlib.crc32(case.encode()) + 7919 * int(config.get("HAL_SEED")))


def randn(gen: torch.Generator, *shape: int, dtype: str = "fp32", scale: float = 1.0) -> torch.Tensor:
    """Unit-normal values (times ``scale``) rounded to ``dtype``, on the CPU."""
    return (torch.randn(*shape, generator=gen) * scale).to(DTYPES[dtype])


@dataclass
class PagedSetup:
    """A cache holding a batch's K/V in permuted pages, and the plan inputs that address it."""

    cache: Any  # hal.KVCache
    k: torch.Tensor  # [S_total, Hkv, D] the batch's keys, concatenated (CPU, the dtype)
    v: torch.Tensor  # [S_total, Hkv, Dv]
    cu_q: list[int]
    cu_k: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor  # [B, max_blocks] int32 (CPU), tail entries = the null block 0
    layer: int
    blocks: list[list[int]] = field(default_factory=list)  # each sequence's blocks in order

    def plan(self, seqs: list[int] | None = None) -> Any:
        """hal.plan for all sequences, or for a subset given by index."""
        import hal

        idx = list(range(len(self.seq_lens))) if seqs is None else seqs
        cu = [0]
        for i in idx:
            cu.append(cu[-1] + self.cu_q[i + 1] - self.cu_q[i])
        return hal.plan(torch.tensor(cu, dtype=torch.int32),
                        torch.tensor([self.seq_lens[i] for i in idx], dtype=torch.int32),
                        self.block_table[idx].contiguous(), self.cache)


def _nan_fill(cache: Any, layer: int) -> None:
    """Write NaN into every slot of ``layer`` (an "auto" cache does not check values)."""
    spec = cache.spec
    (a, b) = spec.shapes()
    n = cache.num_slots
    dev = cache.device
    nan_a = torch.full((n, *a), float("nan"), dtype=spec.torch_dtype, device=dev)
    nan_b = torch.full((n, *b), float("nan"), dtype=spec.torch_dtype, device=dev)
    cache.write(layer, nan_a, nan_b, torch.arange(n, dtype=torch.int64, device=dev))


def make_paged(backend: Backend, case: str, shape: Shape, batch: Batch, dtype: str, block_size: int, *,
               num_layers: int = 2, layer: int = 1, spare_blocks: int = 3, poison: bool = True,
               memory: str = "device", write_chunks: int = 2) -> PagedSetup:
    """Build a cache on ``backend`` holding ``batch``'s K/V in randomly permuted blocks of layer ``layer``.

    Block 0 is never used (the null block, NaN-filled, padding every block-table row); ``spare_blocks``
    more blocks are left unused; the other layers stay NaN too. K/V are written in ``write_chunks``
    calls per sequence, in shuffled token order, to exercise scattered slot mappings.
    """
    import hal

    gen = generator(case + "/paged")
    need = [-(-kv // block_size) for _, kv in batch.seqs]
    num_blocks = 1 + sum(need) + spare_blocks
    spec = hal.KVCacheSpec(num_layers, shape.hkv, shape.d, v_head_dim=shape.dv, block_size=block_size,
                           dtype=dtype)
    cache = hal.KVCache(spec, num_blocks, backend=backend, memory=memory)
    if poison:
        for layer_ in range(num_layers):
            _nan_fill(cache, layer_)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # never block 0
    s_total = sum(kv for _, kv in batch.seqs)
    k = randn(gen, s_total, shape.hkv, shape.d, dtype=dtype)
    v = randn(gen, s_total, shape.hkv, shape.dv, dtype=dtype)
    max_blocks = max(need, default=0) + 1  # one padding column of null blocks
    table = torch.zeros(len(batch.seqs), max(max_blocks, 1), dtype=torch.int32)
    blocks: list[list[int]] = []
    start = 0
    for b, (_, kv) in enumerate(batch.seqs):
        ids = [order.pop() for _ in range(need[b])]
        blocks.append(ids)
        table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        tok = torch.arange(kv)
        slots = torch.tensor(ids, dtype=torch.int64).repeat_interleave(block_size)[:kv] * block_size \
            + tok % block_size
        perm = torch.randperm(kv, generator=gen)
        for part in perm.chunk(max(1, write_chunks)) if kv else ():
            dev = cache.device
            cache.write(layer, k[start + part].to(dev), v[start + part].to(dev), slots[part].to(dev))
        start += kv
    return PagedSetup(cache=cache, k=k, v=v, cu_q=batch.cu_q, cu_k=batch.cu_k,
                      seq_lens=[kv for _, kv in batch.seqs], block_table=table, layer=layer, blocks=blocks)
