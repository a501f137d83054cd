"""The cpu backend's paged cache: token-major blocks of rows in the format of ``hal.kv_formats``.

A standard cache has two components, K and V; an MLA cache one, the latent ``c_kv`` and RoPE key
``k_pe`` concatenated into one row per token (one quantization group, as FlashMLA and vLLM store
it). Component ``i`` is ``rows[i][layer, block, offset, head, :]`` for token
``block * block_size + offset``, so attention reads a sequence's rows straight out of its blocks and
decodes them chunk by chunk: never a dequantized copy of the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hal import hostmem, kv_formats
from hal.kv_cache import KVCacheSpec, MLACacheSpec

_FP8 = ("fp8_e4m3", "fp8_e5m2")


@dataclass(eq=False)
class CpuKVStorage:
    spec: KVCacheSpec | MLACacheSpec
    rows: list[torch.Tensor]  # per component: [L, num_blocks, block_size, H, width], kv_formats.storage_dtype
    dims: list[int]  # per component: values per row (K: D, V: Dv; MLA: R + P)
    scales: list[torch.Tensor] | None  # fp8 only: per component fp32 [L, H]
    scale_frozen: torch.Tensor | None  # fp8 only: bool [L], set by the layer's first write
    scale_given: tuple[bool, ...] = ()  # fp8 only: per component, scale given at creation (never recomputed)

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_heads(self) -> int:
        return self.rows[0].shape[3]

    def _components(self, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        # standard: [k [N, H, D], v [N, H, Dv]]; MLA: [cat(c_kv, k_pe) [N, 1, R + P]]
        if self.spec.is_mla:
            return [torch.cat([a, b], dim=-1).unsqueeze(1)]
        return [a, b]

    def write(self, layer: int, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> None:
        keep = slots >= 0
        if not bool(keep.all()):
            a, b, slots = a[keep], b[keep], slots[keep]
        comps = self._components(a, b)
        kv_dtype = self.spec.kv_dtype
        if self.scales is not None and self.scale_frozen is not None and not bool(self.scale_frozen[layer]):
            if slots.numel() == 0:
                return  # nothing to compute a scale from yet
            for i, x in enumerate(comps):  # the layer's first write fixes the scales not given
                if not self.scale_given[i]:
                    self.scales[i][layer] = kv_formats.fp8_scales(kv_dtype, x)
            self.scale_frozen[layer] = True
        for i, x in enumerate(comps):
            scale = None if self.scales is None else self.scales[i][layer][:, None]
            self.rows[i][layer].flatten(0, 1).index_copy_(0, slots, kv_formats.encode(kv_dtype, x, scale))

    def fetch(self, layer: int, block_ids: torch.Tensor, start: int, stop: int,
              dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Tokens [start, stop) of the blocks ``block_ids`` (in order), decoded to ``dtype`` (default
        the model dtype): one ``[stop - start, H, dim]`` tensor per component."""
        dtype = self.spec.torch_dtype if dtype is None else dtype
        out = []
        for i, rows in enumerate(self.rows):
            raw = rows[layer].index_select(0, block_ids).flatten(0, 1)[start:stop]
            scale = None if self.scales is None else self.scales[i][layer][:, None]
            out.append(kv_formats.decode(self.spec.kv_dtype, raw, self.dims[i], dtype, scale))
        return out

    def read(self, layer: int, block_ids: torch.Tensor, dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        n, bs = block_ids.numel(), self.block_size
        comps = [c.view(n, bs, *c.shape[1:]) for c in self.fetch(layer, block_ids, 0, n * bs, dtype)]
        if self.spec.is_mla:  # [n, bs, 1, R + P] -> c_kv [n, bs, R], k_pe [n, bs, P]
            row = comps[0][:, :, 0]
            return row[..., :self.spec.kv_lora_rank], row[..., self.spec.kv_lora_rank:]
        return comps[0], comps[1]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for rows in self.rows:
            rows[:, dst] = rows[:, src]


def create(spec: KVCacheSpec | MLACacheSpec, num_blocks: int, device: torch.device,
           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> CpuKVStorage:
    dims = [spec.head_dim] if spec.is_mla else [spec.head_dim, spec.v_head_dim]
    heads = spec.num_kv_heads
    dt = kv_formats.storage_dtype(spec.kv_dtype, spec.torch_dtype)
    rows = [hostmem.zeros(spec.num_layers, num_blocks, spec.block_size, heads,  # 2 MiB pages: see hal.hostmem
                          kv_formats.row_width(spec.kv_dtype, d, spec.torch_dtype), dtype=dt, device=device)
            for d in dims]
    scales = frozen = None
    given: tuple[bool, ...] = ()
    if spec.kv_dtype in _FP8:
        passed = [k_scale, v_scale][:len(dims)]
        given = tuple(s is not None for s in passed)
        scales = [s.clone() if s is not None else torch.ones(spec.num_layers, heads) for s in passed]
        frozen = torch.full((spec.num_layers,), all(given))
    return CpuKVStorage(spec=spec, rows=rows, dims=dims, scales=scales, scale_frozen=frozen, scale_given=given)
