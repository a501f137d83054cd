"""Launcher of ``paged_decode.c``: paged attention for decode and multi-token decode batches."""

from __future__ import annotations

import ctypes
import functools
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from hal.backend import AttentionParams
from hal.plan import Plan

from . import generation as kernels_generation
from . import amx_macros, load

_FMT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_KV_FMT = {"int8": 3, "fp8_e4m3": 4, "fp8_e5m2": 5, "int6": 6, "int4": 7}  # quantized rows the kernel decodes (hal/kv_formats.py)
MAX_Q_LEN = 16  # longer query runs (prefill chunks) go to the tiled torch kernel
MAX_ROWS, MAX_DIM = 256, 1024  # as in paged_decode.c
# int8, int6 and fp8 MLA caches run a build of their own: HAL_STAGED16 gives their 16+ rows (heads) the
# staged rows-in-lanes scoring. Compiled in, it slows the code of the other paths through code
# generation alone (C harness: bf16 GQA 5-9%, bf16 MLA 8%), so they keep the plain build. Chosen by the
# cache, never by the batch, so a sequence's arithmetic never depends on its neighbours.
MLA_BUILD = ("HAL_STAGED16",)  # the macros of that build (kernels.load)
_STAGED_KV = ("int8", "int6", "fp8_e4m3", "fp8_e5m2")


def build(staged: bool = False) -> tuple[str, ...]:
    """The macros of the paged_decode build: the quantized MLA build's (``staged``) and HAL_CPU_AMX's
    (bf16 rows in 16-row groups, int8 and fp8 rows in 4-row groups, on AMX tiles)."""
    return (MLA_BUILD if staged else ()) + amx_macros()


class _Args(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p), ("seq_lens", ctypes.c_void_p), ("cu_q", ctypes.c_void_p),
        ("active", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("alibi", ctypes.c_void_p), ("sinks", ctypes.c_void_p),
        ("bt_stride", ctypes.c_int64),
        ("B", ctypes.c_int), ("Hq", ctypes.c_int), ("Hkv", ctypes.c_int), ("D", ctypes.c_int),
        ("Dv", ctypes.c_int), ("bs", ctypes.c_int),
        ("dtype", ctypes.c_int), ("kfmt", ctypes.c_int), ("vfmt", ctypes.c_int),
        ("k_width", ctypes.c_int64), ("v_width", ctypes.c_int64),
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
        ("causal", ctypes.c_int), ("window", ctypes.c_int), ("rows_read", ctypes.c_void_p),
        ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p),
        ("q2", ctypes.c_void_p), ("d2", ctypes.c_int),
    ]


# per plan (built once per step, reused by every layer): its host arrays as the kernel takes them, and
# which sequences the kernel computes
_plan_arrays: weakref.WeakKeyDictionary[Plan, dict[object, Any]] = weakref.WeakKeyDictionary()


def _plan_cache(plan: Plan) -> dict[object, Any]:
    got = _plan_arrays.get(plan)
    if got is None:
        got = _plan_arrays[plan] = {}
    return got


def _arrays(plan: Plan, active: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    got = _plan_cache(plan)
    if "seq_lens" not in got:
        got["seq_lens"] = torch.tensor(plan.seq_lens_host, dtype=torch.int32)
        got["cu_q"] = torch.tensor(plan.cu_seqlens_q_host, dtype=torch.int32)
    key = tuple(active)
    if key not in got:
        got[key] = torch.tensor(active, dtype=torch.uint8)
    return got["seq_lens"], got["cu_q"], got[key]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_counters: list[torch.Tensor] = []  # active count_rows() blocks


@contextmanager
def count_rows() -> Iterator[dict[str, int]]:
    """Count the K rows the kernel loads while the block runs (one row = one token of one KV head):
    ``{"rows": n}``. For tests and ``hal bench``: it shows a row is read once, not once per query head."""
    counter = torch.zeros(1, dtype=torch.int64)
    _counters.append(counter)
    counts = {"rows": 0}
    try:
        yield counts
    finally:
        _counters.remove(counter)
        counts["rows"] = int(counter[0])


def _row_format(spec: object, q: torch.Tensor) -> int | None:
    kv = spec.kv_dtype  # type: ignore[attr-defined]
    return _FMT.get(q.dtype) if kv == "auto" else _KV_FMT.get(kv)


def applies(storage: object, q: torch.Tensor) -> bool:
    """Whether the native kernel serves this cache: auto rows of q's dtype, or int8/int6/int4/fp8 rows with
    a bf16 model (the AVX-512 BF16 build; int6/int4, and fp8 by table, need AVX512-VBMI). An MLA cache is
    MQA over its [c_kv; k_pe] rows whose value is their first kv_lora_rank channels."""
    spec = storage.spec  # type: ignore[attr-defined]
    fmt = _row_format(spec, q)
    if fmt is None or q.dtype not in _FMT or spec.head_dim > MAX_DIM or spec.v_head_dim > MAX_DIM:
        return False
    lib = _library(spec)
    return lib is not None and _supports(lib, _FMT[q.dtype], fmt, spec.head_dim, spec.v_head_dim)


def _library(spec: object) -> ctypes.CDLL | None:
    staged = spec.is_mla and spec.kv_dtype in _STAGED_KV  # type: ignore[attr-defined]
    return load("paged_decode", build(staged))


@functools.lru_cache(maxsize=256)
def _supports(lib: ctypes.CDLL, qfmt: int, fmt: int, d: int, dv: int) -> bool:
    return bool(lib.hal_decode_supports(qfmt, fmt, fmt, d, dv))


def eligible(plan: Plan, group: int) -> tuple[bool, ...]:
    """Per sequence: whether the kernel computes it (short query runs). Decided per sequence, never
    per batch, so a sequence takes the same path whatever else is in the batch (batch invariance).
    The plan's own tuple, computed once per plan (every layer asks)."""
    got = _plan_cache(plan)
    key = ("eligible", group)
    if key not in got:
        got[key] = tuple(0 < q <= MAX_Q_LEN and q * group <= MAX_ROWS for q in plan.q_lens())
    return got[key]


# per cache storage (its row tensors never move): what the kernel needs of it, addresses per layer
_storage_layouts: weakref.WeakKeyDictionary[object, tuple[int, ...]] = weakref.WeakKeyDictionary()


def _layout(storage: object) -> tuple[int, ...]:
    got = _storage_layouts.get(storage)
    if got is None:
        rows, scales = storage.rows, storage.scales  # type: ignore[attr-defined]
        k, v = rows[0], rows[-1]  # [L, blocks, bs, H, width]; MLA: one component, K and V share the rows
        ks, vs = (None, None) if scales is None else (scales[0], scales[-1])  # fp8: fp32 [L, H], one per head
        if ks is not None and vs is not None and (ks.stride(1) != 1 or vs.stride(1) != 1):
            raise AssertionError("fp8 scales must be stored [L, H] with heads contiguous")
        got = (k.data_ptr(), k.stride(0) * k.element_size(), v.data_ptr(), v.stride(0) * v.element_size(),
               k.shape[3], storage.spec.v_head_dim,  # type: ignore[attr-defined]
               k.shape[-1] * k.element_size(), v.shape[-1] * v.element_size(),
               0 if ks is None else ks.data_ptr(), 0 if ks is None else ks.stride(0) * 4,
               0 if vs is None else vs.data_ptr(), 0 if vs is None else vs.stride(0) * 4)
        _storage_layouts[storage] = got
    return got


def _template(storage: object, plan: Plan, q: torch.Tensor, p: AttentionParams, active: Sequence[bool],
              alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None, d2: int = 0) -> _Args:
    """The kernel's arguments but the per-call addresses :func:`_run` sets. ``alibi`` and ``sinks``: p's
    tensors made contiguous, which the caller keeps alive through the call. ``d2``: the width of a second
    query tensor whose rows the kernel appends to q's (MLA's q_rope), or 0."""
    _, _, _, _, hkv, dv, k_width, v_width, _, _, _, _ = _layout(storage)
    fmt = _row_format(storage.spec, q)  # type: ignore[attr-defined]
    table = plan.block_table_host
    seq_lens, cu_q, act = _arrays(plan, active)
    return _Args(
        block_table=table.data_ptr(), seq_lens=seq_lens.data_ptr(), cu_q=cu_q.data_ptr(), active=act.data_ptr(),
        alibi=_ptr(alibi), sinks=_ptr(sinks),
        bt_stride=table.shape[1], B=plan.num_seqs, Hq=q.shape[1], Hkv=hkv, D=q.shape[2] + d2, Dv=dv, bs=plan.block_size,
        dtype=_FMT[q.dtype], kfmt=fmt, vfmt=fmt, k_width=k_width, v_width=v_width,
        scale=p.scale, softcap=p.softcap or 0.0, causal=int(p.causal),
        window=-1 if p.window_left is None else p.window_left, d2=d2)


def _run(lib: ctypes.CDLL, args: _Args, storage: object, layer: int, q: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor | None, q2: torch.Tensor | None = None) -> None:
    """Sets the per-call addresses of ``args`` (q and q2, out, lse, the layer's rows and scales) and calls
    the kernel."""
    k_base, k_layer, v_base, v_layer, _, _, _, _, ks_base, ks_layer, vs_base, vs_layer = _layout(storage)
    args.q, args.out, args.lse, args.q2 = q.data_ptr(), out.data_ptr(), _ptr(lse), _ptr(q2)
    args.k, args.v = k_base + layer * k_layer, v_base + layer * v_layer
    if ks_base:
        args.k_scale, args.v_scale = ks_base + layer * ks_layer, vs_base + layer * vs_layer
    args.rows_read = _ptr(_counters[-1]) if _counters else None
    rc = lib.hal_paged_decode(ctypes.byref(args), ctypes.c_int(torch.get_num_threads()))
    assert rc == 0, "paged_decode.c refused the call: sequences that eligible() accepted, or q2 and d2 disagree"


def paged_decode(q: torch.Tensor, storage: object, layer: int, plan: Plan, p: AttentionParams,
                 out: torch.Tensor, lse: torch.Tensor | None, active: Sequence[bool]) -> None:
    """Write out [T, Hq, Dv] (and lse [T, Hq]) rows of the ``active`` sequences."""
    lib = _library(storage.spec)  # type: ignore[attr-defined]
    q = q.contiguous()
    alibi = None if p.alibi_slopes is None else p.alibi_slopes.contiguous()
    sinks = None if p.sinks is None else p.sinks.contiguous()
    _run(lib, _template(storage, plan, q, p, active, alibi, sinks), storage, layer, q, out, lse)  # type: ignore[arg-type]


class Launch:
    """A decode step's call, prepared once for every layer: the plan's sequences all run on the kernel.

    The per-layer calls of a decode step differ only in the layer and in q; the rest of the kernel's
    arguments (built in ~5 us of Python) are kept as bytes and copied per call."""

    __slots__ = ("owner", "lib", "template", "out_shape", "with_lse")

    def __init__(self, storage: object, lib: ctypes.CDLL, template: _Args, out_shape: tuple[int, ...],
                 with_lse: bool) -> None:
        self.owner = weakref.ref(storage)
        self.lib, self.template, self.out_shape, self.with_lse = lib, bytes(template), out_shape, with_lse

    def __call__(self, q: torch.Tensor, storage: object, layer: int,
                 q2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = q.contiguous()
        if q2 is not None:
            q2 = q2.contiguous()
        out = torch.empty(*self.out_shape, dtype=q.dtype)  # unpacked: half the cost of passing the tuple
        lse = torch.empty(*self.out_shape[:2], dtype=torch.float32) if self.with_lse else None
        _run(self.lib, _Args.from_buffer_copy(self.template), storage, layer, q, out, lse, q2)
        return out, lse


def launch(storage: object, plan: Plan, q: torch.Tensor, p: AttentionParams, return_lse: bool,
           q2: torch.Tensor | None = None) -> Launch | None:
    """The prepared call when the kernel computes every sequence of ``plan`` with these options (a decode
    step), or None (some sequence runs elsewhere, ALiBi or sinks tensors, or no kernel). Kept per plan;
    a hit still checks that the cache is the same object, and the key holds ``applies`` itself and the
    kernels' generation, so patching the rule or reloading the kernels is never served a stale call.
    ``q2`` (MLA's q_rope, q's dtype): each query row's last values, which the kernel appends to q's; the
    call then takes it beside q."""
    if p.alibi_slopes is not None or p.sinks is not None:
        return None
    got = _plan_cache(plan)
    d2 = 0 if q2 is None else q2.shape[-1]
    key = ("launch", id(storage), q.shape, q.dtype, d2, p.scale, p.softcap, p.causal, p.window_left, return_lse,
           applies, kernels_generation())
    hit = got.get(key)
    if hit is not None and hit.owner() is storage:
        return hit if hit.lib is not None else None
    made = Launch(storage, None, _Args(), (), False)  # type: ignore[arg-type]  # the "not here" answer
    if applies(storage, q):
        active = eligible(plan, q.shape[1] // storage.num_heads)  # type: ignore[attr-defined]
        if all(active):
            spec = storage.spec  # type: ignore[attr-defined]
            made = Launch(storage, _library(spec), _template(storage, plan, q, p, active, d2=d2),  # type: ignore[arg-type]
                          (q.shape[0], q.shape[1], spec.v_head_dim), return_lse)
    got[key] = made
    return made if made.lib is not None else None
