"""Names of the model dtypes and KV-cache formats, and their torch counterparts."""

from __future__ import annotations

import torch

from hal.errors import InvalidInput

__all__ = ["DTYPES", "KV_DTYPES", "dtype_name", "torch_dtype", "normalize_dtype", "normalize_kv_dtype"]

#: model dtypes: name -> torch dtype
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: KV-cache storage formats. "auto" stores the model dtype itself.
KV_DTYPES: tuple[str, ...] = ("auto", "fp8_e4m3", "fp8_e5m2", "int8", "int6", "int4")

_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    """'fp32' | 'fp16' | 'bf16' for a torch dtype, or its torch name for anything else."""
    for name, td in DTYPES.items():
        if td == dtype:
            return name
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def normalize_dtype(op: str, arg: str, value: object) -> str:
    """Accept 'bf16', 'bfloat16' or torch.bfloat16; return the short name or raise InvalidInput."""
    if isinstance(value, torch.dtype):
        name = dtype_name(value)
    elif isinstance(value, str):
        name = _ALIASES.get(value.lower(), value.lower())
    else:
        name = repr(value)
    if name not in DTYPES:
        raise InvalidInput(f"[{op}] {arg} must be one of {list(DTYPES)} (or the torch dtype), got {value!r}")
    return name


def normalize_kv_dtype(op: str, value: object) -> str:
    if not isinstance(value, str) or value not in KV_DTYPES:
        raise InvalidInput(f"[{op}] kv_dtype must be one of {list(KV_DTYPES)}, got {value!r}")
    return value
