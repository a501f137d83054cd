"""The cpu backend's paged cache: token-major blocks, one tensor per K and V.

``k[layer, block, offset, head, :]`` holds token ``block * block_size + offset`` (likewise ``v``),
so attention reads a sequence's keys straight out of its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hal.kv_cache import KVCacheSpec


@dataclass(eq=False)
class CpuKVStorage:
    k: torch.Tensor  # [L, num_blocks, block_size, Hkv, D], the model dtype
    v: torch.Tensor  # [L, num_blocks, block_size, Hkv, Dv]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        # k [N, Hkv, D], v [N, Hkv, Dv], slots int64 [N] (-1 = skip)
        keep = slots >= 0
        if not bool(keep.all()):
            k, v, slots = k[keep], v[keep], slots[keep]
        self.k[layer].flatten(0, 1).index_copy_(0, slots, k)
        self.v[layer].flatten(0, 1).index_copy_(0, slots, v)

    def read(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # -> k [n, bs, Hkv, D], v [n, bs, Hkv, Dv]
        return self.k[layer].index_select(0, block_ids), self.v[layer].index_select(0, block_ids)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


def create(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> CpuKVStorage:
    shape = (spec.num_layers, num_blocks, spec.block_size, spec.num_kv_heads)
    return CpuKVStorage(
        k=torch.zeros(*shape, spec.head_dim, dtype=spec.torch_dtype, device=device),
        v=torch.zeros(*shape, spec.v_head_dim, dtype=spec.torch_dtype, device=device),  # type: ignore[misc]
    )
