"""Host memory for large buffers read at memory speed: on 2 MiB pages where Linux allows it.

A paged KV cache is read a block at a time, in an order the block tables choose: with 4 KiB pages
every block of a large cache costs page walks (the CPU's TLB covers a few MiB), and the hardware
prefetchers stop at every 4 KiB boundary. Linux backs an anonymous range with 2 MiB pages when
transparent huge pages are enabled ("always", or "madvise" and the range asks with MADV_HUGEPAGE).
:func:`zeros` asks before the first touch, so the zeroing faults the pages in as huge ones.

Measured on the development VM (THP "madvise"): the cpu decode kernel over a 1 GiB cache, batch 8,
4096 tokens, ran 5-12% faster, and a plain 512 MiB copy 6% faster. Advice only: where the kernel
declines (THP "never", no free huge pages, not Linux), the memory is ordinary pages and nothing
else changes; :func:`status` says which.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

__all__ = ["HUGE_PAGE", "zeros", "advise", "status", "huge_bytes"]

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <linux/mman.h>
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=1)
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=1)
def status() -> str:
    """The machine's transparent-huge-page mode as Linux reports it ("always", "madvise", "never"),
    or why it is unknown."""
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return "unavailable (not Linux, or no transparent huge pages)"
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()
    return mode if _madvise() is not None else f"{mode} (madvise not callable)"


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) addresses of the memory behind ``t`` (its whole storage, whatever view t is)."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def advise(t: torch.Tensor) -> bool:
    """Ask for 2 MiB pages over the whole 2 MiB pages inside ``t``'s storage (a CPU tensor, before its
    first touch: pages already faulted in stay as they are). Returns whether the kernel accepted."""
    fn = _madvise()
    if fn is None or t.device.type != "cpu":
        return False
    start, end = _span(t)
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    return hi > lo and fn(lo, hi - lo, _MADV_HUGEPAGE) == 0


def zeros(*shape: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.zeros(shape)``; on the CPU, asks for huge pages before zeroing (see the module note)."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and t.numel() * t.element_size() >= 2 * HUGE_PAGE:
        advise(t)
    return t.zero_()


def huge_bytes(t: torch.Tensor) -> int | None:
    """Bytes on huge pages of the mappings that overlap ``t``'s memory (a CPU tensor; madvise splits
    a mapping where its advice changes), from /proc/self/smaps; None where that is not readable."""
    start, end = _span(t)
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo < end and start < hi
                elif inside and head == "AnonHugePages:":
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return total
