"""The rocm backend: OpenCL kernels on shared virtual memory (AMD ROCm; PoCL on a CPU).

Registered now so that it can be named, listed and selected; its kernels land with their own
issue. Until then its probe says so, and naming it raises ``hal.BackendUnavailable``.
"""

from __future__ import annotations

import importlib.util

from hal import config
from hal.backend import Backend, Probe


class RocmBackend(Backend):
    """OpenCL kernels on shared virtual memory (AMD ROCm; PoCL on a CPU)."""

    name = "rocm"

    @classmethod
    def probe(cls) -> Probe:
        reasons = []
        if importlib.util.find_spec("pyopencl") is None:
            reasons.append("pyopencl is not installed: pip install 'hal-attention[rocm]' (brings PoCL for "
                           "HAL_EMULATE=1 on a CPU)")
        elif not config.get("HAL_EMULATE"):
            reasons.append("no AMD GPU checked (the probe lands with the kernels); set HAL_EMULATE=1 to run "
                           "the OpenCL kernels on PoCL")
        reasons.append("not implemented yet: the rocm kernels (OpenCL) land with their own issue")
        return Probe(available=False, reasons=tuple(reasons))
