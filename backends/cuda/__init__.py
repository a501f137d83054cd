"""The cuda backend: Triton kernels on NVIDIA GPUs (and under Triton's interpreter on a CPU).

Registered now so that it can be named, listed and selected; its kernels land with their own
issue. Until then its probe says so, and naming it raises ``hal.BackendUnavailable``.
"""

from __future__ import annotations

import importlib.util

from hal import config
from hal.backend import Backend, Probe


class CudaBackend(Backend):
    """Triton kernels on NVIDIA GPUs (and under Triton's interpreter on a CPU)."""

    name = "cuda"

    @classmethod
    def probe(cls) -> Probe:
        reasons = []
        import torch

        if not torch.cuda.is_available() or torch.version.hip is not None:
            hint = ("" if config.get("HAL_EMULATE") else
                    "; set HAL_EMULATE=1 to run the Triton kernels on the CPU under TRITON_INTERPRET")
            reasons.append(f"no NVIDIA GPU found (torch.cuda.is_available() is False){hint}")
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed: pip install 'hal-attention[cuda]'")
        reasons.append("not implemented yet: the cuda kernels (Triton) land with their own issue")
        return Probe(available=False, reasons=tuple(reasons))
