"""KV-cache storage formats: the one byte layout of each ``kv_dtype``, shared by every backend.

A cache stores, per layer, token and KV head, one *row*: the ``dim`` values of a key (or value,
or an MLA latent+RoPE row) in the cache's format. ``encode`` turns model-dtype values into rows,
``decode`` turns rows back into values; a backend may fuse these into its kernels but must
produce and accept exactly these bytes, so a cache written by one backend is read by any.

- ``auto``: the model dtype itself (a row is ``dim`` elements of fp32/fp16/bf16).
"""

from __future__ import annotations

import math

import torch

from hal.errors import InvalidInput, Unsupported

__all__ = ["row_bytes", "row_width", "storage_dtype", "encode", "decode"]


def row_bytes(kv_dtype: str, dim: int, itemsize: int) -> int:
    """Bytes stored for one token's vector of ``dim`` values of one head, scales included.

    auto: dim * itemsize; fp8: dim (scales are per layer and head, not per token); int8: dim + 2
    (one fp16 scale); int6: ceil(3 dim / 4) + 2 (four values in three bytes); int4: ceil(dim / 2)
    + 2 * ceil(dim / 32) (two values per byte, one fp16 scale per group of 32 channels).
    """
    if kv_dtype == "auto":
        return dim * itemsize
    if kv_dtype in ("fp8_e4m3", "fp8_e5m2"):
        return dim
    if kv_dtype == "int8":
        return dim + 2
    if kv_dtype == "int6":
        return math.ceil(3 * dim / 4) + 2
    if kv_dtype == "int4":
        return math.ceil(dim / 2) + 2 * math.ceil(dim / 32)
    raise InvalidInput(f"[hal] unknown kv_dtype {kv_dtype!r}")


def storage_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of stored rows: the model dtype for "auto", bytes (uint8) otherwise."""
    return model_dtype if kv_dtype == "auto" else torch.uint8


def row_width(kv_dtype: str, dim: int, model_dtype: torch.dtype) -> int:
    """Elements of ``storage_dtype`` per row."""
    if kv_dtype == "auto":
        return dim
    return row_bytes(kv_dtype, dim, model_dtype.itemsize)


def encode(kv_dtype: str, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x [..., dim]`` (model dtype) in format ``kv_dtype``: ``[..., row_width]``.
    ``scale`` (fp8 formats): fp32, broadcastable to ``x[..., :1]`` (per layer and head)."""
    if kv_dtype == "auto":
        return x
    raise Unsupported(f"kv_dtype {kv_dtype!r} has no codec yet")


def decode(kv_dtype: str, rows: torch.Tensor, dim: int, dtype: torch.dtype,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """Values ``[..., dim]`` in ``dtype`` of rows ``[..., row_width]`` (the inverse of ``encode``)."""
    if kv_dtype == "auto":
        return rows if rows.dtype == dtype else rows.to(dtype)
    raise Unsupported(f"kv_dtype {kv_dtype!r} has no codec yet")
