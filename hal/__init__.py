"""hal: one attention and KV-cache API for LLM inference, on cpu, cuda, rocm and tpu backends,
with a conformance suite that holds every backend to the same numbers.

``import hal`` imports torch and numpy only: each backend's stack (triton, pyopencl, jax) is
imported when that backend is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from hal import models
from hal.attention import attention, merge_attention_states, mla_attention, paged_attention
from hal.backend import AttentionParams, Backend, Probe
from hal.block_manager import BlockManager
from hal.capabilities import Capabilities
from hal.errors import BackendUnavailable, HALError, InvalidInput, OutOfBlocks, Unsupported
from hal.kv_cache import KVCache, KVCacheSpec, MLACacheSpec
from hal.models import kv_bytes_per_token
from hal.plan import Plan, plan
from hal.registry import BackendInfo, get_backend, list_backends, register_backend, use_backend
from hal.rope import RopeSpec, rope

__version__ = "0.1.0"

# names served from modules that are loaded on first use
_LAZY = {
    "reference": "hal.reference",
    "conformance": "hal.conformance",
    "mla": "hal.mla",
    "capacity": "hal.capacity",
}

__all__ = [
    "attention", "paged_attention", "mla_attention", "merge_attention_states", "plan", "Plan",
    "KVCache", "KVCacheSpec", "MLACacheSpec", "BlockManager", "RopeSpec", "rope",
    "models", "kv_bytes_per_token",
    "get_backend", "list_backends", "use_backend", "register_backend", "Backend", "BackendInfo",
    "Capabilities", "Probe", "AttentionParams",
    "HALError", "BackendUnavailable", "Unsupported", "InvalidInput", "OutOfBlocks",
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'hal' has no attribute {name!r}")
    module = importlib.import_module(target)
    value = module if target.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
