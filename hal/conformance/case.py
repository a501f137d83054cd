"""What a conformance case is, and the shared checks the families are built from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hal.backend import Backend
from hal.conformance.oracles import golden_attention, same_dtype_attention
from hal.conformance.scenarios import Batch, PagedSetup, Shape, generator, make_paged, randn
from hal.conformance.tolerances import Comparison, compare
from hal.reference import paged_attention_reference

__all__ = ["Case", "CheckFailed", "LEVELS", "dense_check", "paged_check", "requires_for"]

LEVELS = ("quick", "full")


class CheckFailed(AssertionError):
    """A property that is not a tolerance comparison did not hold."""


@dataclass(frozen=True)
class Case:
    """One conformance case: declared requirements (skip reasons come from them) and a check."""

    family: str
    name: str
    level: str  # "quick" (also in full) or "full"
    requires: dict[str, Any]  # keyword arguments of Capabilities.why_not
    check: Callable[[Backend], list[Comparison]] = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"


def requires_for(shape: Shape, dtype: str, features: list[str], **extra: Any) -> dict[str, Any]:
    feats = list(features)
    if shape.hq != shape.hkv:
        feats.append("gqa")
    return dict(dtype=dtype, head_dim=shape.d, v_head_dim=shape.dv, features=feats, **extra)


def lse_declared(backend: Backend) -> bool:
    return "lse" in backend.capabilities().features


def _on(backend: Backend, opts: dict[str, Any]) -> dict[str, Any]:
    dev = backend.default_device()
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}


def dense_inputs(case: str, shape: Shape, batch: Batch, dtype: str) -> tuple[torch.Tensor, ...]:
    gen = generator(case)
    t, s = batch.cu_q[-1], batch.cu_k[-1]
    return (randn(gen, t, shape.hq, shape.d, dtype=dtype), randn(gen, s, shape.hkv, shape.d, dtype=dtype),
            randn(gen, s, shape.hkv, shape.dv, dtype=dtype))


def run_dense(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int],
              cu_k: list[int], opts: dict[str, Any], lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    import hal

    dev = backend.default_device()
    res = hal.attention(q.to(dev), k.to(dev), v.to(dev), cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
                        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32), return_lse=lse, backend=backend,
                        **_on(backend, opts))
    out, l = res if lse else (res, None)
    return out.cpu(), (l.cpu() if l is not None else None)


def dense_check(backend: Backend, case: str, shape: Shape, batch: Batch, dtype: str,
                opts: dict[str, Any]) -> list[Comparison]:
    """hal.attention on ``batch`` against golden (out, and lse when declared)."""
    q, k, v = dense_inputs(case, shape, batch, dtype)
    lse = lse_declared(backend)
    out, got_lse = run_dense(backend, q, k, v, batch.cu_q, batch.cu_k, opts, lse)
    g_out, g_lse = golden_attention(q, k, v, batch.cu_q, batch.cu_k, **opts)
    r_out, r_lse = same_dtype_attention(q, k, v, batch.cu_q, batch.cu_k, **opts)
    comps = [compare("out", dtype, out, g_out, r_out)]
    if lse:
        comps.append(compare("lse", dtype, got_lse, g_lse, r_lse, lse=True))
    return comps


def paged_check(backend: Backend, case: str, shape: Shape, batch: Batch, dtype: str, block_size: int,
                opts: dict[str, Any]) -> list[Comparison]:
    """hal.paged_attention on ``batch`` (permuted pages, NaN poison) against golden computed on what
    ``cache.read`` returns."""
    setup = make_paged(backend, case, shape, batch, dtype, block_size)
    q = randn(generator(case + "/q"), batch.cu_q[-1], shape.hq, shape.d, dtype=dtype)
    return compare_paged(backend, setup, q, dtype, opts)


def compare_paged(backend: Backend, setup: PagedSetup, q: torch.Tensor, dtype: str,
                  opts: dict[str, Any]) -> list[Comparison]:
    """hal.paged_attention over ``setup``'s block table against the golden on what ``cache.read`` returns
    through that table, with the same-dtype reference on ``setup.k`` / ``setup.v`` (the keys the table
    addresses) for the tolerance."""
    import hal

    lse = lse_declared(backend)
    res = hal.paged_attention(q.to(setup.cache.device), setup.cache, setup.layer, setup.plan(),
                              return_lse=lse, **_on(backend, opts))
    out, got_lse = res if lse else (res, None)
    kc, vc = setup.cache.read(setup.layer, list(range(setup.cache.num_blocks)))
    ref_opts = dict(opts)
    g_out, g_lse = paged_attention_reference(q, kc.cpu(), vc.cpu(), setup.cu_q, setup.seq_lens,
                                             setup.block_table, **ref_opts)
    ref_opts.setdefault("causal", True)
    r_out, r_lse = same_dtype_attention(q, setup.k, setup.v, setup.cu_q, setup.cu_k, **ref_opts)
    comps = [compare("out", dtype, out.cpu(), g_out, r_out)]
    if lse:
        comps.append(compare("lse", dtype, got_lse.cpu(), g_lse, r_lse, lse=True))
    return comps
