"""What the machine can do, measured in the same process as the cases: the roofline's two lines.

- copy bandwidth: best of N ``dst.copy_(src)`` over buffers well above the last-level cache (on
  2 MiB pages where the OS allows, as hal's cpu caches are: ``hal.hostmem``), counting the bytes
  copied (STREAM counts read + write, twice this; see ``hal.bench.accounting``);
- read bandwidth: best of N reductions over the same buffer, counting the bytes read (decode
  attention mostly reads); the best of two reductions, so that a reduction that is compute-bound
  on some CPU does not pass for the memory's limit;
- matmul peak: best of N square ``torch.mm`` in bf16 and in fp32, ``2 n^3`` FLOPs each;
- and what explains the numbers: CPU model, cores, torch threads and version, last-level cache
  (from /sys, else ``lscpu``), memory size.

Best-of is used for these probes because they stand for what the hardware can do; the cases
report medians against them.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hal import hostmem
from hal.bench.accounting import GiB, MiB, copy_bytes, matmul_flops, read_bytes

__all__ = ["MachineInfo", "probe_machine", "last_level_cache", "memory_bytes", "cpu_model", "sync_for",
           "copy_buffer_bytes"]


@dataclass
class MachineInfo:
    """The measured roofline of one device and what describes it."""

    device: str  # the backend's device, in words
    device_type: str  # torch device type: "cpu", "cuda", ...
    cpu_model: str
    cores: int
    torch_threads: int
    torch_version: str
    llc_bytes: int | None  # last-level cache, all instances together (None: unknown)
    llc_text: str  # how it was found, e.g. "32 MiB (1 x 32 MiB, /sys)"
    memory_bytes: int | None  # RAM (cpu) or device memory
    buffer_bytes: int  # size of each probe buffer
    copy_gbps: float  # best of N, bytes copied per second
    read_gbps: float  # best of N reductions, bytes read
    matmul_n: int
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # "bf16", "fp32": best of N
    huge_pages: str = ""  # cpu: the transparent-huge-page mode (hal.hostmem.status)
    l2_bytes: int | None = None  # cpu: one core's unified level-2 cache (None: unknown or shared)
    samples: dict[str, list[float]] = field(default_factory=dict)  # every probe's seconds, for the spread
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sync_for(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _size(text: str) -> int | None:
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)i?B?", text, re.I)
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()])


def _sys_caches(pattern: str) -> Iterator[tuple[int, str, int | None, str]]:
    """(level, type, size, shared_cpu_list) of each cache /sys lists under the cpu directories matching
    ``pattern`` (type "" where /sys does not say); entries whose level, size or sharing it cannot read are
    left out."""
    for idx in Path("/sys/devices/system/cpu").glob(pattern):
        try:
            level, size = int((idx / "level").read_text()), _size((idx / "size").read_text())
            shared = (idx / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        try:
            kind = (idx / "type").read_text().strip()
        except OSError:
            kind = ""
        yield level, kind, size, shared


def last_level_cache() -> tuple[int | None, str]:
    """Total last-level cache in bytes (every instance, e.g. one L3 per CCX) and how it was found."""
    instances: dict[str, int] = {}
    level_found = 0
    for level, _kind, size, shared in _sys_caches("cpu[0-9]*/cache/index[0-9]*"):
        if size is None or level < level_found:
            continue
        if level > level_found:
            instances, level_found = {}, level
        instances[shared] = size
    if instances:
        total = sum(instances.values())
        each = max(instances.values())
        return total, f"L{level_found} {total / MiB:.0f} MiB ({len(instances)} x {each / MiB:.0f} MiB, /sys)"
    try:  # no sysfs: ask lscpu
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("L3 cache:"):
                size = _size(line.split(":", 1)[1])
                if size:
                    return size, f"L3 {line.split(':', 1)[1].strip()} (lscpu)"
    except (OSError, subprocess.SubprocessError):
        pass
    return None, "unknown"


def core_l2_cache() -> int | None:
    """Bytes of the unified level-2 cache that serves one CPU alone (cpu0's, from /sys), or None where it is
    unknown or shared between cores (a thread of a pair of hyperthreads counts as its core)."""
    cpu0 = Path("/sys/devices/system/cpu/cpu0")
    try:
        siblings = (cpu0 / "topology" / "thread_siblings_list").read_text().strip()
    except OSError:
        siblings = "0"
    for level, kind, size, shared in _sys_caches("cpu0/cache/index[0-9]*"):
        if level == 2 and kind == "Unified" and size and shared in ("0", siblings):
            return size
    return None


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2, then v1), if it sets one."""
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def memory_bytes(device: torch.device) -> int | None:
    """Device memory for a GPU; for the CPU the RAM (MemTotal), or the cgroup's limit when lower."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = None
    limit = _cgroup_limit()
    return min(x for x in (total, limit) if x is not None) if (total or limit) else None


def copy_buffer_bytes(llc: int | None) -> int:
    """Probe buffer size: 8 x the last-level cache, between 512 MiB and 2 GiB (1 GiB when unknown)."""
    if llc is None:
        return GiB
    return max(512 * MiB, min(2 * GiB, 8 * llc))


def _best(fn: Callable[[], Any], sync: Callable[[], None], reps: int) -> list[float]:
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def probe_machine(device: torch.device, description: str, *, buffer_bytes: int | None, matmul_n: int,
                  reps: int) -> MachineInfo:
    """Measure copy and read bandwidth and bf16/fp32 matmul peak on ``device``.

    ``buffer_bytes`` None: :func:`copy_buffer_bytes` of the last-level cache.
    """
    t_start = time.perf_counter()
    sync = sync_for(device)
    llc, llc_text = last_level_cache() if device.type == "cpu" else (None, "n/a (not a cpu)")
    size = buffer_bytes if buffer_bytes is not None else copy_buffer_bytes(llc)
    n = size // 4
    # on 2 MiB pages where the OS allows, as hal's cpu caches are (hal.hostmem): the machine's best copy
    src = hostmem.zeros(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = hostmem.zeros(n, dtype=torch.float32, device=device)
    samples: dict[str, list[float]] = {}
    samples["copy"] = _best(lambda: dst.copy_(src), sync, reps)
    samples["read_sum_fp32"] = _best(lambda: src.sum(), sync, reps)
    samples["read_max_int32"] = _best(lambda: src.view(torch.int32).amax(), sync, reps)
    src = dst = torch.empty(0)  # free the buffers before the matmuls
    best_read = min(min(samples["read_sum_fp32"]), min(samples["read_max_int32"]))
    tflops: dict[str, float] = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(matmul_n, matmul_n, device=device).to(dt)
        b = torch.randn(matmul_n, matmul_n, device=device).to(dt)
        c = torch.empty(matmul_n, matmul_n, dtype=dt, device=device)
        def mm(a: torch.Tensor = a, b: torch.Tensor = b, c: torch.Tensor = c) -> torch.Tensor:
            return torch.mm(a, b, out=c)

        samples[f"matmul_{name}"] = _best(mm, sync, reps)
        tflops[name] = matmul_flops(matmul_n) / min(samples[f"matmul_{name}"]) / 1e12
        del a, b, c
    return MachineInfo(
        device=description, device_type=device.type, cpu_model=cpu_model(), cores=os.cpu_count() or 0,
        torch_threads=torch.get_num_threads(), torch_version=torch.__version__, llc_bytes=llc,
        llc_text=llc_text, memory_bytes=memory_bytes(device), buffer_bytes=size,
        copy_gbps=copy_bytes(size) / min(samples["copy"]) / 1e9, read_gbps=read_bytes(size) / best_read / 1e9,
        matmul_n=matmul_n, matmul_tflops=tflops, huge_pages=hostmem.status() if device.type == "cpu" else "",
        l2_bytes=core_l2_cache() if device.type == "cpu" else None, samples=samples,
        seconds=time.perf_counter() - t_start)
