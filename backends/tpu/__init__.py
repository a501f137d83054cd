"""The tpu backend: JAX + Pallas kernels on TPUs (and JAX's CPU with Pallas interpret mode).

Registered now so that it can be named, listed and selected; its kernels land with their own
issue. Until then its probe says so, and naming it raises ``hal.BackendUnavailable``.
"""

from __future__ import annotations

import importlib.util

from hal import config
from hal.backend import Backend, Probe


class TpuBackend(Backend):
    """JAX + Pallas kernels on TPUs (and JAX's CPU with Pallas interpret mode)."""

    name = "tpu"

    @classmethod
    def probe(cls) -> Probe:
        reasons = []
        if importlib.util.find_spec("jax") is None:
            reasons.append("jax is not installed: pip install 'hal-attention[tpu]'")
        elif not config.get("HAL_EMULATE"):
            reasons.append("no TPU checked (the probe lands with the kernels); set HAL_EMULATE=1 to run the "
                           "Pallas kernels with interpret=True on JAX's CPU")
        reasons.append("not implemented yet: the tpu kernels (Pallas) land with their own issue")
        return Probe(available=False, reasons=tuple(reasons))
