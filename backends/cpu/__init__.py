"""The cpu backend: PyTorch on the CPU, hal's embedded default.

Kernels in native dtypes with fp32 accumulation (``attention.py``; absorbed MLA in ``mla.py``), a
token-major paged cache read in place (``kv_cache.py``). This file holds the capabilities only.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

import torch

from hal.backend import Backend, Probe
from hal.capabilities import Capabilities

_CAPABILITIES = Capabilities(
    dtypes=frozenset({"fp32", "fp16", "bf16"}),
    kv_dtypes=frozenset({"auto", "fp8_e4m3", "fp8_e5m2", "int8", "int6", "int4"}),
    head_dims=frozenset(range(8, 257, 8)) | {512},  # any multiple of 8 up to 256, and 512
    block_sizes=frozenset({1, 2, 4, 8, 16, 32, 64, 128, 256}),
    features=frozenset({"dense", "paged", "causal", "non_causal", "window", "softcap", "alibi", "sinks",
                        "lse", "gqa", "merge", "copy_blocks", "batch_invariant", "mla"}),
    memory=frozenset({"device", "unified"}),  # host memory is the device's memory here
    kv_layout="token-major",
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuBackend(Backend):
    """PyTorch on the CPU."""

    name = "cpu"

    def __init__(self) -> None:
        self._capabilities: Capabilities | None = None

    @classmethod
    def probe(cls) -> Probe:
        return Probe(available=True, device=f"{_cpu_name()} ({os.cpu_count()} cores, "
                     f"{torch.get_num_threads()} torch threads)",
                     versions={"torch": torch.__version__, "python": platform.python_version()})

    def capabilities(self) -> Capabilities:
        if self._capabilities is None:  # first call: build (or load) the native kernels, say which run
            from hal import hostmem
            from hal.backends.cpu import kernels
            from hal.backends.cpu.kernels.paged_decode import build

            status = {"paged_decode": kernels.status("paged_decode", build()),
                      "flash_prefill": kernels.status("flash_prefill", kernels.amx_macros())}
            status["paged_decode (quantized MLA build)"] = kernels.status("paged_decode", build(staged=True))
            if status["paged_decode"] == "native":  # (decode and prefill share the tiles' grant)
                status["AMX tiles"] = kernels.AMX_STATES[kernels.load("paged_decode", build()).hal_amx_state()]
            prefill = kernels.load("flash_prefill", kernels.amx_macros())
            if status["flash_prefill"] == "native" and prefill is not None and not prefill.hal_flash_prefill_available():
                status["flash_prefill"] = "built without AVX-512 BF16: bf16 prefill runs in torch"
            note = "native kernels: " + "; ".join(f"{k} {v}" for k, v in status.items())
            pages = f"KV cache memory: 2 MiB pages asked for (transparent huge pages: {hostmem.status()})"
            self._capabilities = dataclasses.replace(_CAPABILITIES, notes=(note, pages))
        return self._capabilities

    # ops live in attention.py and kv_cache.py; imported on first call
    def attention(self, q, k, v, batch, params, return_lse):  # type: ignore[no-untyped-def]
        from hal.backends.cpu.attention import varlen_attention

        return varlen_attention(q, k, v, batch, params, return_lse)

    def paged_attention(self, q, storage, layer, plan, params, return_lse):  # type: ignore[no-untyped-def]
        from hal.backends.cpu.attention import paged_attention

        return paged_attention(q, storage, layer, plan, params, return_lse)

    def mla_attention(self, q_latent, q_rope, storage, layer, plan, scale, causal,  # type: ignore[no-untyped-def]
                      return_lse):
        from hal.backends.cpu.mla import mla_attention

        return mla_attention(q_latent, q_rope, storage, layer, plan, scale, causal, return_lse)

    def merge_attention_states(self, o_a, lse_a, o_b, lse_b):  # type: ignore[no-untyped-def]
        from hal.backends.cpu.attention import merge_attention_states

        return merge_attention_states(o_a, lse_a, o_b, lse_b)

    def kv_create(self, spec, num_blocks, memory, device, k_scale, v_scale) -> Any:  # type: ignore[no-untyped-def]
        from hal.backends.cpu.kv_cache import create

        return create(spec, num_blocks, device, k_scale, v_scale)

    def kv_write(self, storage, layer, k, v, slot_mapping) -> None:  # type: ignore[no-untyped-def]
        storage.write(layer, k, v, slot_mapping)

    def kv_read(self, storage, layer, block_ids, dtype):  # type: ignore[no-untyped-def]
        return storage.read(layer, block_ids, dtype)

    def kv_copy_blocks(self, storage, src, dst) -> None:  # type: ignore[no-untyped-def]
        storage.copy_blocks(src, dst)
