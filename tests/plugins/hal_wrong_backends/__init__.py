"""Deliberately wrong backends, registered through the ``hal.backends`` entry point, that the
conformance suite must catch. Each is the cpu backend with one classic bug."""

from __future__ import annotations

import dataclasses
import math

from hal.backends.cpu import CpuBackend


class IgnoresSoftcap(CpuBackend):
    """Drops ``softcap`` (the gemma-2 bug class: a backend that silently ignores an option)."""

    name = "ignores-softcap"

    def attention(self, q, k, v, batch, params, return_lse):  # type: ignore[no-untyped-def]
        return super().attention(q, k, v, batch, dataclasses.replace(params, softcap=None), return_lse)

    def paged_attention(self, q, storage, layer, plan, params, return_lse):  # type: ignore[no-untyped-def]
        return super().paged_attention(q, storage, layer, plan, dataclasses.replace(params, softcap=None),
                                       return_lse)


class ReadsPastSeqLen(CpuBackend):
    """Reads one token past each sequence's end (an off-by-one in the KV length)."""

    name = "reads-past-seq-len"

    def paged_attention(self, q, storage, layer, plan, params, return_lse):  # type: ignore[no-untyped-def]
        longer = dataclasses.replace(plan, seq_lens_host=tuple(s + 1 for s in plan.seq_lens_host))
        return super().paged_attention(q, storage, layer, longer, params, return_lse)


class LseBase2(CpuBackend):
    """Returns a base-2 log-sum-exp (FlashInfer's default) where hal promises natural log."""

    name = "lse-base-2"

    def attention(self, q, k, v, batch, params, return_lse):  # type: ignore[no-untyped-def]
        out, lse = super().attention(q, k, v, batch, params, return_lse)
        return out, (None if lse is None else lse / math.log(2.0))

    def paged_attention(self, q, storage, layer, plan, params, return_lse):  # type: ignore[no-untyped-def]
        out, lse = super().paged_attention(q, storage, layer, plan, params, return_lse)
        return out, (None if lse is None else lse / math.log(2.0))
