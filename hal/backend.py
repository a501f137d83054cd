"""The interface every backend implements.

hal validates every argument before it reaches a backend, so a backend method receives torch
tensors of the declared dtypes, on its device, with consistent shapes. A backend does the work and
nothing else: no validation, no fallback to another backend. An op a backend does not have raises
``Unsupported("<op> has no <backend> implementation")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from hal.errors import Unsupported

if TYPE_CHECKING:
    from hal.capabilities import Capabilities
    from hal.kv_cache import KVCacheSpec, MLACacheSpec
    from hal.plan import Plan, VarlenBatch

__all__ = ["AttentionParams", "Backend", "Probe"]


@dataclass(frozen=True)
class Probe:
    """Whether a backend can run here, and what it found. Cheap: no kernels, no allocations."""

    available: bool
    reasons: tuple[str, ...] = ()  # why it is not available (empty when available)
    device: str = ""  # what it runs on, in words
    emulated: bool = False  # True when its kernels run on the CPU standing in for the hardware
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AttentionParams:
    """Scalar options of an attention call, resolved and validated by hal."""

    scale: float  # softmax scale (1/sqrt(D) when the caller gave None)
    causal: bool = False
    window_left: int | None = None  # keys j >= p - window_left are visible
    softcap: float | None = None  # s = softcap * tanh(s / softcap)
    alibi_slopes: torch.Tensor | None = None  # [Hq] fp32: s -= slope[h] * |p - j|
    sinks: torch.Tensor | None = None  # [Hq] fp32 logits added to the softmax denominator


class Backend:
    """Base class of a backend. Subclasses set ``name`` and implement ``probe`` and
    ``capabilities``, then the ops they declare."""

    name: ClassVar[str] = ""

    # ---- discovery -----------------------------------------------------------------------
    @classmethod
    def probe(cls) -> Probe:
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def default_device(self) -> torch.device:
        """The torch device that tensors passed to this backend live on by default."""
        return torch.device("cpu")

    def accepts_device(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` can be given to this backend."""
        return device.type == self.default_device().type

    def __repr__(self) -> str:
        return f"<hal backend {self.name}>"

    def _missing(self, op: str) -> Unsupported:
        return Unsupported(f"{op} has no {self.name} implementation")

    # ---- dense attention ---------------------------------------------------------------
    def attention(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [S, Hkv, D]
        v: torch.Tensor,  # [S, Hkv, Dv]
        batch: VarlenBatch,  # cu_seqlens of q and k, on the device and on the host
        params: AttentionParams,
        return_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # out [T, Hq, Dv], lse [T, Hq] fp32
        raise self._missing("attention")

    def merge_attention_states(
        self,
        o_a: torch.Tensor,  # [T, H, Dv]
        lse_a: torch.Tensor,  # [T, H] fp32
        o_b: torch.Tensor,
        lse_b: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise self._missing("merge_attention_states")

    # ---- KV cache --------------------------------------------------------------------------
    def kv_create(self, spec: KVCacheSpec | MLACacheSpec, num_blocks: int, memory: str,
                  device: torch.device, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> Any:
        """Allocate the storage of a cache; hal keeps the returned object and hands it back."""
        raise self._missing("KVCache")

    def kv_write(self, storage: Any, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """k [N, Hkv, D], v [N, Hkv, Dv] (MLA: c_kv [N, R], k_pe [N, P]); slot_mapping int64 [N],
        -1 = skip, valid slots distinct."""
        raise self._missing("KVCache.write")

    def kv_read(self, storage: Any, layer: int, block_ids: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids int64 [n] -> (k [n, bs, Hkv, D], v [n, bs, Hkv, Dv]) in ``dtype``: the model
        dtype, or fp32/fp64 (the stored values times their scales, exactly for fp64)."""
        raise self._missing("KVCache.read")

    def kv_copy_blocks(self, storage: Any, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy blocks src[i] -> dst[i] in every layer (int64 [n] each, dst distinct)."""
        raise self._missing("KVCache.copy_blocks")

    # ---- paged attention ---------------------------------------------------------------------
    def plan(self, plan: Plan) -> Any:
        """Host-side per-step work for paged attention; the result is stored as plan.backend_data."""
        return None

    def paged_attention(self, q: torch.Tensor, storage: Any, layer: int, plan: Plan,
                        params: AttentionParams, return_lse: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [T, Hq, D] -> out [T, Hq, Dv], lse [T, Hq] fp32."""
        raise self._missing("paged_attention")

    def mla_attention(self, q_latent: torch.Tensor, q_rope: torch.Tensor, storage: Any, layer: int,
                      plan: Plan, scale: float, causal: bool, return_lse: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q_latent [T, H, R], q_rope [T, H, P] -> out [T, H, R], lse [T, H] fp32."""
        raise self._missing("mla_attention")
