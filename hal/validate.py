"""Argument checks shared by every public op. Each failure raises ``InvalidInput`` whose message
starts with the op (``[hal.paged_attention]``), names the argument, what was expected and what
arrived. Checks here never launch device work; data-dependent checks read host-side tensors."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

from hal.dtypes import DTYPES, dtype_name
from hal.errors import InvalidInput

__all__ = [
    "check_ndim", "check_float", "check_index", "check_devices", "check_int", "check_scalar",
    "host_ints", "check_cu_seqlens", "check_backend", "index_list",
]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise InvalidInput(f"[{op}] {name} must be {ndim}-D {layout}, got shape {_shape(t)}")


def check_float(op: str, name: str, t: torch.Tensor) -> str:
    """The dtype name of a q/k/v-like tensor; raises unless fp32/fp16/bf16."""
    name_ = dtype_name(t.dtype)
    if name_ not in DTYPES:
        raise InvalidInput(f"[{op}] {name} must be fp32, fp16 or bf16, got {t.dtype}")
    return name_


def check_index(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, ndim: int, layout: str) -> None:
    check_ndim(op, name, t, ndim, layout)
    if t.dtype != dtype:
        raise InvalidInput(f"[{op}] {name} must be {str(dtype).replace('torch.', '')} {layout}, got "
                           f"{str(t.dtype).replace('torch.', '')} (convert with .to(torch."
                           f"{str(dtype).replace('torch.', '')}))")


def check_devices(op: str, backend: Any, tensors: dict[str, torch.Tensor | None],
                  host_ok: Sequence[str] = ()) -> torch.device:
    """All tensors on one device that ``backend`` accepts (names in ``host_ok`` may be on the CPU).
    Returns the device."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None or (name in host_ok and t.device.type == "cpu"):
            continue
        if device is None:
            device, first = t.device, name
            if not backend.accepts_device(device):
                raise InvalidInput(f"[{op}] {name} is on {device}, but backend {backend.name!r} runs on "
                                   f"{backend.default_device()}: move the tensors there or pick another backend")
        elif t.device != device:
            raise InvalidInput(f"[{op}] {name} is on {t.device} but {first} is on {device}: "
                               f"all tensors must be on one device")
    return device if device is not None else backend.default_device()


def check_int(op: str, name: str, value: Any, *, lo: int | None = None, hi: int | None = None,
              allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()
                and not value.is_complex() and value.dtype != torch.bool):
            value = int(value.item())
        else:
            raise InvalidInput(f"[{op}] {name} must be an int, got {type(value).__name__} {value!r}")
    if lo is not None and value < lo:
        raise InvalidInput(f"[{op}] {name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidInput(f"[{op}] {name} must be <= {hi}, got {value}")
    return value


def check_scalar(op: str, name: str, value: Any, *, positive: bool = False,
                 allow_none: bool = True) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise InvalidInput(f"[{op}] {name} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"[{op}] {name} must be a finite float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        want = "a finite float > 0" if positive else "a finite float"
        raise InvalidInput(f"[{op}] {name} must be {want}, got {value}")
    return value


def host_ints(t: torch.Tensor) -> list[int]:
    """The values of a small index tensor as Python ints (copies to the host if needed)."""
    return t.detach().to("cpu", torch.int64).tolist()


def check_cu_seqlens(op: str, name: str, values: list[int], total: int | None, total_name: str) -> None:
    """Starts at 0, never decreases, and ends at ``total`` when given."""
    if len(values) < 1:
        raise InvalidInput(f"[{op}] {name} must have B+1 >= 1 entries, got 0")
    if values[0] != 0:
        raise InvalidInput(f"[{op}] {name}[0] must be 0, got {values[0]}")
    for i in range(len(values) - 1):
        if values[i + 1] < values[i]:
            raise InvalidInput(f"[{op}] {name} must be non-decreasing (prefix sums of lengths), but "
                               f"{name}[{i + 1}]={values[i + 1]} < {name}[{i}]={values[i]}")
    if total is not None and values[-1] != total:
        raise InvalidInput(f"[{op}] {name}[-1]={values[-1]} must equal {total_name}={total}")


def index_list(op: str, name: str, values: Any) -> list[int]:
    """The ints of a Python sequence of ids; floats, bools and other non-integers raise (never truncated)."""
    out = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
            raise InvalidInput(f"[{op}] {name}[{i}] must be an int, got bool {x!r}")
        try:
            out.append(operator.index(x))
        except TypeError:
            raise InvalidInput(f"[{op}] {name}[{i}] must be an int, got {type(x).__name__} {x!r}") from None
    return out


def check_backend(op: str, backend: Any) -> Any:
    """``resolve_backend(backend)``, with a bad name reported as this op's ``backend`` argument."""
    from hal.registry import resolve_backend

    try:
        return resolve_backend(backend)
    except InvalidInput as e:
        msg = str(e)
        if not msg.startswith("[hal] "):
            raise
        raise InvalidInput(f"[{op}] backend={backend!r}: {msg[len('[hal] '):]}") from None
