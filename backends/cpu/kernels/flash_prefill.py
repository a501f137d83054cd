"""Launcher of ``flash_prefill.c``: bf16 attention for long query runs, dense or paged."""

from __future__ import annotations

import ctypes

import torch

from hal.backend import AttentionParams
from hal.plan import Plan, VarlenBatch

from . import amx_macros, load

MIN_Q_LEN = 17  # shorter query runs are decode-shaped (paged_decode.c, or the torch tiles)
MAX_DIM, MAX_GROUP = 256, 64  # as in flash_prefill.c


class _Args(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("cu_q", ctypes.c_void_p), ("cu_k", ctypes.c_void_p), ("seq_lens", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p), ("active", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("alibi", ctypes.c_void_p), ("sinks", ctypes.c_void_p),
        ("bt_stride", ctypes.c_int64),
        ("B", ctypes.c_int), ("Hq", ctypes.c_int), ("Hkv", ctypes.c_int), ("D", ctypes.c_int),
        ("Dv", ctypes.c_int), ("bs", ctypes.c_int),
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("causal", ctypes.c_int), ("window", ctypes.c_int),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def applies(dtype: torch.dtype, hq: int, hkv: int, d: int, dv: int) -> bool:
    """bf16, head dims the kernel tiles, and a compiled AVX-512 BF16 build."""
    if dtype != torch.bfloat16 or d % 32 or dv % 16 or d > MAX_DIM or dv > MAX_DIM or hq // hkv > MAX_GROUP:
        return False
    lib = load("flash_prefill", amx_macros())
    return lib is not None and bool(lib.hal_flash_prefill_available())


def eligible(q_lens: list[int]) -> list[bool]:
    """Per sequence (never per batch, for batch invariance): long query runs."""
    return [q >= MIN_Q_LEN for q in q_lens]


def _run(args: _Args) -> None:
    rc = load("flash_prefill", amx_macros()).hal_flash_prefill(ctypes.byref(args), ctypes.c_int(torch.get_num_threads()))  # type: ignore[union-attr]
    assert rc == 0, "flash_prefill.c refused a call that applies() accepted"


def _common(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None, p: AttentionParams) -> dict:
    return dict(q=_ptr(q), out=_ptr(out), lse=_ptr(lse),
                alibi=_ptr(None if p.alibi_slopes is None else p.alibi_slopes.contiguous()),
                sinks=_ptr(None if p.sinks is None else p.sinks.contiguous()),
                Hq=q.shape[1], D=q.shape[2], Dv=out.shape[2], scale=p.scale, softcap=p.softcap or 0.0,
                causal=int(p.causal), window=-1 if p.window_left is None else p.window_left)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch, p: AttentionParams,
          out: torch.Tensor, lse: torch.Tensor | None, active: list[bool]) -> None:
    """Rows of the ``active`` sequences of contiguous q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv]."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu_q = torch.tensor(batch.cu_seqlens_q_host, dtype=torch.int32)
    cu_k = torch.tensor(batch.cu_seqlens_k_host, dtype=torch.int32)
    act = torch.tensor(active, dtype=torch.uint8)
    _run(_Args(k=_ptr(k), v=_ptr(v), cu_q=_ptr(cu_q), cu_k=_ptr(cu_k), active=_ptr(act), bt_stride=0,
               B=batch.num_seqs, Hkv=k.shape[1], bs=1, **_common(q, out, lse, p)))


def paged(q: torch.Tensor, storage: object, layer: int, plan: Plan, p: AttentionParams, out: torch.Tensor,
          lse: torch.Tensor | None, active: list[bool]) -> None:
    """Rows of the ``active`` sequences of q [T, Hq, D] over bf16 ("auto") blocks of ``layer``."""
    q = q.contiguous()
    k_rows, v_rows = storage.rows[0][layer], storage.rows[1][layer]  # type: ignore[attr-defined]
    cu_q = torch.tensor(plan.cu_seqlens_q_host, dtype=torch.int32)
    seq_lens = torch.tensor(plan.seq_lens_host, dtype=torch.int32)
    act = torch.tensor(active, dtype=torch.uint8)
    table = plan.block_table_host
    _run(_Args(k=_ptr(k_rows), v=_ptr(v_rows), cu_q=_ptr(cu_q), seq_lens=_ptr(seq_lens), block_table=_ptr(table),
               active=_ptr(act), bt_stride=table.shape[1], B=plan.num_seqs, Hkv=k_rows.shape[2],
               bs=plan.block_size, **_common(q, out, lse, p)))
