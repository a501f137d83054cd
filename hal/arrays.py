"""Array interop: torch is hal's native type; numpy and JAX arrays are accepted and results go
back in the caller's type (zero-copy through DLPack where the memory allows). JAX is imported only
when the caller passes a JAX array (and has therefore imported it already)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hal.errors import InvalidInput

__all__ = ["to_torch", "from_torch", "array_kind"]


def array_kind(x: Any) -> str:
    """'torch' | 'numpy' | 'jax' | 'other'."""
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__ or ""
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        return "jax"
    return "other"


def to_torch(op: str, name: str, x: Any) -> torch.Tensor:
    """``x`` as a torch tensor sharing its memory where possible."""
    kind = array_kind(x)
    if kind == "torch":
        return x
    if kind == "numpy":
        if x.dtype == np.float64 or not x.flags.writeable:
            return torch.from_numpy(np.array(x, copy=True))
        return torch.from_numpy(np.ascontiguousarray(x))
    if kind == "jax":
        return torch.from_dlpack(x)
    raise InvalidInput(f"[{op}] {name} must be a torch.Tensor, numpy.ndarray or jax.Array, "
                       f"got {type(x).__name__}")


def from_torch(t: torch.Tensor | None, like: str) -> Any:
    """``t`` converted back to the array type ``like`` ('torch' | 'numpy' | 'jax')."""
    if t is None or like == "torch":
        return t
    if like == "numpy":
        if t.dtype == torch.bfloat16:
            raise InvalidInput("[hal] numpy has no bfloat16: pass torch tensors or JAX arrays for bf16")
        return t.detach().cpu().numpy()
    if like == "jax":
        import jax.dlpack  # the caller passed a JAX array, so JAX is already imported

        return jax.dlpack.from_dlpack(t.detach().contiguous())
    return t
