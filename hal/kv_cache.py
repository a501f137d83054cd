"""KV-cache specs and the paged KV cache.

A cache is ``num_blocks`` blocks of ``block_size`` token slots per layer; token slot
``block_id * block_size + offset``. Its storage belongs to the backend (which declares whether a
block is token-major or head-major); ``write`` and ``read`` always speak the canonical
token-major shapes, so a runtime never depends on a backend's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hal import validate as V
from hal.arrays import to_torch
from hal.backend import Backend
from hal.dtypes import DTYPES, normalize_dtype, normalize_kv_dtype
from hal.errors import InvalidInput, Unsupported
from hal.kv_formats import row_bytes

__all__ = ["KVCacheSpec", "MLACacheSpec", "KVCache", "row_bytes"]


def _positive(op: str, name: str, value: Any) -> int:
    return V.check_int(op, name, value, lo=1)  # type: ignore[return-value]


@dataclass(frozen=True)
class KVCacheSpec:
    """A standard K/V cache: per layer and token, ``num_kv_heads`` keys of ``head_dim`` and values of
    ``v_head_dim`` (default ``head_dim``), model dtype ``dtype``, stored as ``kv_dtype``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = field(default=None, kw_only=True)
    block_size: int = field(default=16, kw_only=True)
    dtype: str = field(default="bf16", kw_only=True)
    kv_dtype: str = field(default="auto", kw_only=True)

    is_mla = False

    def __post_init__(self) -> None:
        op = "hal.KVCacheSpec"
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _positive(op, name, getattr(self, name))
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        _positive(op, "v_head_dim", self.v_head_dim)
        object.__setattr__(self, "dtype", normalize_dtype(op, "dtype", self.dtype))
        object.__setattr__(self, "kv_dtype", normalize_kv_dtype(op, self.kv_dtype))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes stored per token over all layers, K and V, scales included."""
        item = self.torch_dtype.itemsize
        per_head = row_bytes(self.kv_dtype, self.head_dim, item) + row_bytes(self.kv_dtype, self.v_head_dim, item)
        return self.num_layers * self.num_kv_heads * per_head

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-token shapes of what ``write`` takes: ([Hkv, D], [Hkv, Dv])."""
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.v_head_dim)  # type: ignore[return-value]


@dataclass(frozen=True)
class MLACacheSpec:
    """A DeepSeek-V2 MLA latent cache: per layer and token one ``kv_lora_rank`` latent ``c_kv`` (after
    its norm) and one ``rope_dim`` RoPE key ``k_pe`` (after RoPE), shared by all heads."""

    num_layers: int
    kv_lora_rank: int = field(default=512, kw_only=True)
    rope_dim: int = field(default=64, kw_only=True)
    block_size: int = field(default=64, kw_only=True)
    dtype: str = field(default="bf16", kw_only=True)
    kv_dtype: str = field(default="auto", kw_only=True)

    is_mla = True
    num_kv_heads = 1

    def __post_init__(self) -> None:
        op = "hal.MLACacheSpec"
        for name in ("num_layers", "kv_lora_rank", "rope_dim", "block_size"):
            _positive(op, name, getattr(self, name))
        object.__setattr__(self, "dtype", normalize_dtype(op, "dtype", self.dtype))
        object.__setattr__(self, "kv_dtype", normalize_kv_dtype(op, self.kv_dtype))

    @property
    def head_dim(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def v_head_dim(self) -> int:
        return self.kv_lora_rank

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token over all layers: one latent+RoPE row per layer (one quantization group)."""
        return self.num_layers * row_bytes(self.kv_dtype, self.head_dim, self.torch_dtype.itemsize)

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-token shapes of what ``write`` takes: ([R], [P])."""
        return (self.kv_lora_rank,), (self.rope_dim,)


class KVCache:
    """A paged KV cache on one backend.

    ``KVCache(spec, num_blocks, backend=None, device=None, memory="device", k_scale=None, v_scale=None)``
    allocates ``num_blocks`` blocks of ``spec.block_size`` tokens for each of ``spec.num_layers``
    layers. ``memory="unified"`` asks for memory that host and device share. ``k_scale``/``v_scale``
    (fp8 formats only) are ``[num_layers, Hkv]`` fp32; None computes them from the first write.
    """

    def __init__(self, spec: KVCacheSpec | MLACacheSpec, num_blocks: int, *,
                 backend: str | Backend | None = None, device: str | torch.device | None = None,
                 memory: str = "device", k_scale: Any = None, v_scale: Any = None) -> None:
        op = "hal.KVCache"
        if not isinstance(spec, (KVCacheSpec, MLACacheSpec)):
            raise InvalidInput(f"[{op}] spec must be a hal.KVCacheSpec or hal.MLACacheSpec, got {type(spec).__name__}")
        num_blocks = _positive(op, "num_blocks", num_blocks)
        if memory not in ("device", "unified"):
            raise InvalidInput(f"[{op}] memory must be 'device' or 'unified', got {memory!r}")
        be = V.check_backend(op, backend)
        reasons = be.capabilities().why_not(
            dtype=spec.dtype, kv_dtype=spec.kv_dtype, block_size=spec.block_size, memory=memory,
            head_dim=None if spec.is_mla else spec.head_dim,
            v_head_dim=None if spec.is_mla else spec.v_head_dim,
            features=("mla",) if spec.is_mla else ("paged",))
        if reasons:
            raise Unsupported(f"[{op}] backend {be.name!r} cannot hold this cache", reasons)
        dev = torch.device(device) if device is not None else be.default_device()
        if not be.accepts_device(dev):
            raise InvalidInput(f"[{op}] device {dev} is not one backend {be.name!r} runs on "
                               f"({be.default_device()})")
        scales = self._check_scales(op, spec, k_scale, v_scale)
        self.spec = spec
        self.backend = be
        self.device = dev
        self.memory = memory
        self.num_blocks = num_blocks
        self._storage = be.kv_create(spec, num_blocks, memory, dev, *scales)
        self._checked: dict[Any, Any] = {}  # call kinds that passed hal.attention's checks (hal/attention.py)

    # ---- properties ------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.spec.block_size

    @property
    def bytes_per_token(self) -> int:
        return self.spec.bytes_per_token

    @property
    def storage(self) -> Any:
        """The backend's own storage object (for the backend and for tests; layout is backend-defined)."""
        return self._storage

    def __repr__(self) -> str:
        return (f"KVCache({self.spec}, num_blocks={self.num_blocks}, backend={self.backend.name!r}, "
                f"device={self.device}, memory={self.memory!r})")

    # ---- checks ----------------------------------------------------------------------------
    @staticmethod
    def _check_scales(op: str, spec: Any, k_scale: Any, v_scale: Any) -> tuple[Any, Any]:
        if k_scale is None and v_scale is None:
            return None, None
        if spec.kv_dtype not in ("fp8_e4m3", "fp8_e5m2"):
            raise InvalidInput(f"[{op}] k_scale/v_scale apply to fp8 caches only; kv_dtype is {spec.kv_dtype!r}")
        if spec.is_mla and v_scale is not None:
            raise InvalidInput(f"[{op}] an MLA cache stores one row per token (c_kv and k_pe together): give its "
                               f"scale as k_scale [num_layers, 1], not v_scale")
        out = []
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None:
                out.append(None)
                continue
            s = to_torch(op, name, s)
            want = (spec.num_layers, spec.num_kv_heads)
            if tuple(s.shape) != want or s.dtype != torch.float32:
                raise InvalidInput(f"[{op}] {name} must be fp32 [num_layers, Hkv] = {list(want)}, got "
                                   f"{str(s.dtype).replace('torch.', '')} {list(s.shape)}")
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise InvalidInput(f"[{op}] {name} must be finite and > 0")
            out.append(s.clone())
        return out[0], out[1]

    def _check_layer(self, op: str, layer: Any) -> int:
        return V.check_int(op, "layer", layer, lo=0, hi=self.spec.num_layers - 1)  # type: ignore[return-value]

    def _check_slots(self, op: str, slot_mapping: Any, n: int) -> torch.Tensor:
        slots = to_torch(op, "slot_mapping", slot_mapping)
        V.check_index(op, "slot_mapping", slots, torch.int64, 1, "[N]")
        if slots.shape[0] != n:
            raise InvalidInput(f"[{op}] slot_mapping has {slots.shape[0]} entries but {n} tokens are written")
        host = slots.detach().cpu()
        if n:
            bad = (host < -1) | (host >= self.num_slots)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise InvalidInput(f"[{op}] slot_mapping[{i}]={int(host[i])} is out of range: slots are "
                                   f"-1 (skip) or 0..{self.num_slots - 1} ({self.num_blocks} blocks of "
                                   f"{self.block_size})")
            valid = host[host >= 0]
            uniq, counts = torch.unique(valid, return_counts=True)
            if bool((counts > 1).any()):
                dup = int(uniq[counts > 1][0])
                raise InvalidInput(f"[{op}] slot_mapping writes slot {dup} more than once; each slot may "
                                   f"be written by one token per call")
        return slots

    def _check_rows(self, op: str, names: tuple[str, str], a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        a = to_torch(op, names[0], a)
        b = to_torch(op, names[1], b)
        shape_a, shape_b = self.spec.shapes()
        for name, t, shape in ((names[0], a, shape_a), (names[1], b, shape_b)):
            layout = "[N, " + ", ".join(str(s) for s in shape) + "]"
            if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
                raise InvalidInput(f"[{op}] {name} must be {layout}, got {list(t.shape)}")
            if t.dtype != self.spec.torch_dtype:
                raise InvalidInput(f"[{op}] {name} must have the cache's dtype {self.spec.dtype}, got "
                                   f"{str(t.dtype).replace('torch.', '')}")
        if a.shape[0] != b.shape[0]:
            raise InvalidInput(f"[{op}] {names[0]} has {a.shape[0]} tokens but {names[1]} has {b.shape[0]}")
        return a, b

    def _check_block_ids(self, op: str, name: str, ids: Any) -> torch.Tensor:
        if isinstance(ids, (list, tuple, range)):
            ids = torch.tensor(V.index_list(op, name, ids), dtype=torch.int64)
        ids = to_torch(op, name, ids)
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1:
            raise InvalidInput(f"[{op}] {name} must be a 1-D int32/int64 tensor or a list of ints, got "
                               f"{str(ids.dtype).replace('torch.', '')} {list(ids.shape)}")
        host = ids.detach().cpu().to(torch.int64)
        bad = (host < 0) | (host >= self.num_blocks)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise InvalidInput(f"[{op}] {name}[{i}]={int(host[i])} is out of range 0..{self.num_blocks - 1}")
        return host

    # ---- operations --------------------------------------------------------------------------
    def write(self, layer: int, k: Any, v: Any, slot_mapping: Any) -> None:
        """Store tokens: ``k [N, Hkv, D]``, ``v [N, Hkv, Dv]`` (MLA: ``c_kv [N, R]`` after its norm,
        ``k_pe [N, P]`` after RoPE) into ``slot_mapping`` int64 ``[N]`` (-1 skips a token)."""
        op = "hal.KVCache.write"
        layer = self._check_layer(op, layer)
        names = ("c_kv", "k_pe") if self.spec.is_mla else ("k", "v")
        k, v = self._check_rows(op, names, k, v)
        slots = self._check_slots(op, slot_mapping, k.shape[0])
        V.check_devices(op, self.backend, {names[0]: k, names[1]: v, "slot_mapping": slots},
                        host_ok=("slot_mapping",))
        if k.device != self.device:
            raise InvalidInput(f"[{op}] {names[0]} is on {k.device} but the cache is on {self.device}")
        if self.spec.kv_dtype != "auto":
            for name, t in ((names[0], k), (names[1], v)):
                if not bool(torch.isfinite(t).all()):
                    raise InvalidInput(f"[{op}] {name} holds NaN or Inf; a {self.spec.kv_dtype} cache "
                                       f"rejects them (they would poison a scale). Nothing was written.")
        self.backend.kv_write(self._storage, layer, k, v, slots.to(self.device))

    def read(self, layer: int, block_ids: Any, *, dtype: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``block_ids`` of ``layer``, dequantized, token-major: ``(k [n, bs, Hkv, D],
        v [n, bs, Hkv, Dv])`` (MLA: ``(c_kv [n, bs, R], k_pe [n, bs, P])``). ``dtype``: the model
        dtype (default), or ``"fp32"``/``"fp64"``: a quantized cache's values times their scales, not
        rounded to the model dtype (exact in fp64; the golden of the conformance suite)."""
        op = "hal.KVCache.read"
        layer = self._check_layer(op, layer)
        ids = self._check_block_ids(op, "block_ids", block_ids)
        out_dtype = self._check_read_dtype(op, dtype)
        return self.backend.kv_read(self._storage, layer, ids.to(self.device), out_dtype)

    def _check_read_dtype(self, op: str, dtype: Any) -> torch.dtype:
        model = self.spec.torch_dtype
        if dtype is None:
            return model
        allowed = {self.spec.dtype: model, "fp32": torch.float32, "fp64": torch.float64}
        by_torch = {t: t for t in allowed.values()}
        if isinstance(dtype, str) and dtype in allowed:
            return allowed[dtype]
        if isinstance(dtype, torch.dtype) and dtype in by_torch:
            return dtype
        names = ", ".join(repr(n) for n in dict.fromkeys([self.spec.dtype, "fp32", "fp64"]))
        raise InvalidInput(f"[{op}] dtype must be None (the model dtype, {self.spec.dtype}) or one of {names} "
                           f"(or their torch dtypes), got {dtype!r}")

    def copy_blocks(self, copies: Any) -> None:
        """Apply ``(src, dst)`` block copies (from ``BlockManager.fork``) in every layer."""
        op = "hal.KVCache.copy_blocks"
        if isinstance(copies, torch.Tensor):
            pairs = copies
        else:
            try:
                rows = [V.index_list(op, f"copies[{i}]", (s, d)) for i, (s, d) in enumerate(copies)]
            except InvalidInput:
                raise
            except (TypeError, ValueError):
                raise InvalidInput(f"[{op}] copies must be a list of (src, dst) block-id pairs or an int "
                                   f"tensor [n, 2], got {copies!r}") from None
            pairs = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
        if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype not in (torch.int32, torch.int64):
            raise InvalidInput(f"[{op}] copies must be an int tensor [n, 2], got {list(pairs.shape)} {pairs.dtype}")
        if pairs.shape[0] == 0:
            return
        src = self._check_block_ids(op, "src", pairs[:, 0].contiguous())
        dst = self._check_block_ids(op, "dst", pairs[:, 1].contiguous())
        if len(set(dst.tolist())) != dst.numel():
            raise InvalidInput(f"[{op}] a destination block appears twice in copies: {dst.tolist()}")
        if set(dst.tolist()) & set(src.tolist()):
            raise InvalidInput(f"[{op}] a block is both a source and a destination in copies; "
                               f"split the copies into two calls")
        self.backend.kv_copy_blocks(self._storage, src.to(self.device), dst.to(self.device))
