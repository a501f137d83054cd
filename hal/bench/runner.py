"""Running the benchmark: machine probes, then every case against its baselines, in one process.

Timing: each implementation is warmed up on one layer, then the implementations of a case run in
interleaved rounds (hal, sdpa, ..., hal, sdpa, ...), so that a machine that drifts (other jobs,
clocks) drifts for all of them alike; rounds continue from ``min_reps`` up to ``max_reps`` while
the case has taken less than ``budget_s`` (never past ``case_limit_s``). The reported time is the
median of the rounds, the spread ``(max - min) / median``; the machine probes are best-of (see
``hal.bench.machine``). A very slow implementation cycles fewer layers (see :func:`measure`).
Ratios between implementations of a case (hal's speedup, ``%copy`` against the in-round memcpy) are
medians of the ratios within each round, whose measurements ran back to back: a minute when the
machine's memory is slow then slows both sides of a ratio, instead of one side's median. Each timed
run starts after a short pause (``Sizes.settle_s``), and a quantized case's hal and hal-<dtype> swap
places every other round: run right after gather+sdpa, int8 hal measured 4.16 ms per layer at B8 x
4096 against 3.63 ms run second, in alternated rounds of one process (hal-bf16: 5.10 against 5.12);
with a 50 ms pause, 4.24 against 4.11.
"""

from __future__ import annotations

import datetime
import gc
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from hal.bench.build import CACHED, MEMCPY, Impl, build
from hal.bench.cases import QUICK, CaseSpec, Sizes, case_list
from hal.bench.machine import MachineInfo, probe_machine, sync_for

__all__ = ["ImplResult", "CaseResult", "BackendBench", "BenchReport", "Progress", "run", "measure", "metrics",
           "paired_ratio"]


@dataclass
class ImplResult:
    """One implementation of one case: its timings and what they mean against the roofline."""

    name: str  # "hal", "sdpa", "gather+sdpa"
    status: str = "ok"  # "ok" | "error"
    message: str = ""
    layers: int = 1  # layers one measurement cycles through (fewer than the case's when it is slow)
    seconds: list[float] = field(default_factory=list)  # one measurement (each of its layers once) per round
    median_s: float | None = None
    min_s: float | None = None
    spread: float | None = None  # (max - min) / median
    per_layer_s: float | None = None  # median / layers
    bytes: int = 0  # per measurement
    flops: int = 0  # per measurement
    intensity: float | None = None  # FLOP per byte
    gbps: float | None = None  # bytes / median
    frac_copy_bw: float | None = None  # gbps / machine copy bandwidth
    frac_read_bw: float | None = None
    tflops: float | None = None
    frac_bf16_peak: float | None = None  # tflops / machine bf16 matmul peak
    frac_fp32_peak: float | None = None
    speedup: float | None = None  # for a baseline: its time per layer / hal's (hal's speedup over it)


@dataclass
class CaseResult:
    kind: str
    label: str
    status: str  # "ok" | "skip" | "error"
    reason: str = ""
    shape: dict[str, Any] = field(default_factory=dict)
    layers: int = 0
    working_set_bytes: int = 0  # KV bytes hal reads per measurement
    exceeds_llc: bool | None = None  # whether that is larger than the last-level cache
    memory_needed_bytes: int = 0
    plan_s: float | None = None
    build_s: float | None = None
    rounds: int = 0
    impls: list[ImplResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gain_ceiling: float | None = None  # quantized decode: hal-<dtype> / hal-cached, the most the format can gain

    def impl(self, name: str) -> ImplResult | None:
        return next((i for i in self.impls if i.name == name), None)


@dataclass
class BackendBench:
    name: str
    available: bool
    reasons: list[str] = field(default_factory=list)
    emulated: bool = False
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    machine: MachineInfo | None = None
    working_set_target: int = 0
    memory_budget: int | None = None
    cases: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # the backend's own (cpu: which native kernels ran, AMX tiles)

    @property
    def errors(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == "error"]


@dataclass
class BenchReport:
    hal_version: str
    date: str
    sizes: Sizes
    timing: str
    backends: list[BackendBench] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sizes"] = self.sizes.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchReport:
        """The report that ``to_dict`` (``hal bench --json``) wrote, e.g. to plot it again."""
        sizes = Sizes(**{k: tuple(map(tuple, v)) if k in ("decode", "mla") else tuple(v) if isinstance(v, list) else v
                         for k, v in d["sizes"].items()})
        backends = []
        for b in d["backends"]:
            cases = [CaseResult(**{**c, "impls": [ImplResult(**i) for i in c["impls"]]}) for c in b["cases"]]
            machine = MachineInfo(**b["machine"]) if b.get("machine") else None
            backends.append(BackendBench(**{**b, "cases": cases, "machine": machine}))
        return cls(hal_version=d["hal_version"], date=d["date"], sizes=sizes, timing=d["timing"],
                   backends=backends, seconds=d.get("seconds", 0.0))


class Progress:
    """A progress bar on stderr: one line redrawn on a terminal, a line per case otherwise."""

    WIDTH = 20

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.head = ""

    def _draw(self, text: str) -> None:
        if self.tty:
            print("\r" + text[:110].ljust(110), end="", file=self.stream, flush=True)

    def case(self, backend: str, i: int, n: int, label: str) -> None:
        filled = self.WIDTH * i // max(n, 1)
        self.head = f"[{backend}] [{'#' * filled}{'-' * (self.WIDTH - filled)}] {i + 1}/{n} {label}"
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            self._draw(f"{self.head} ({elapsed:.0f}s)")
        else:
            print(f"{self.head} ({elapsed:.0f}s)", file=self.stream, flush=True)

    def stage(self, text: str) -> None:
        self._draw(f"{self.head}: {text} ({time.perf_counter() - self.t0:.0f}s)")

    def note(self, backend: str, text: str) -> None:
        msg = f"[{backend}] {text} ({time.perf_counter() - self.t0:.0f}s)"
        if self.tty:
            self._draw(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def done(self, backend: str, n: int) -> None:
        msg = f"[{backend}] [{'#' * self.WIDTH}] {n}/{n} done in {time.perf_counter() - self.t0:.0f}s"
        print(("\r" + msg.ljust(110)) if self.tty else msg, file=self.stream, flush=True)


def cached_pool_budget(machine: MachineInfo) -> tuple[int, str] | None:
    """Bytes of KV that ``hal-cached``'s pool may hold and stay in cache, and where it stays (None: unknown).

    Half of one core's L2 where it is known: every thread reads the whole pool, and the L2 is the core's
    own. The last-level cache a VM reports need not be there for it: on the AMX VM (L3 300 MiB by /sys) a
    pointer chase read 1 MiB at 10 ns a line, 4 MiB at 45 and 8 MiB at 137, as from memory (2026-11-30),
    so a pool of a quarter of that L3 (64 MiB at B8 x 4096) came from memory and its "compute alone" was
    not. Otherwise a quarter of the last-level cache, which other cores use too. The pool's first call after
    the round's other runs reloads it from memory, which can only raise the floor (lower the ceiling)."""
    if machine.l2_bytes:
        return machine.l2_bytes // 2, "half of each core's L2"
    if machine.llc_bytes:
        return machine.llc_bytes // 4, "a quarter of the last-level cache"
    return None


def round_order(names: list[str], r: int) -> list[str]:
    """The order of round ``r``: as given, but hal and hal-<dtype> (a quantized case's two hal
    measurements, whose ratio is the format's gain) swap places every other round, so that neither
    always runs first, right after the previous round's slowest baseline."""
    if r % 2 and len(names) > 1 and names[0] == "hal" and names[1].startswith("hal-"):
        return [names[1], names[0]] + names[2:]
    return names


def measure(impls: dict[str, Impl], layers: int, sync: Callable[[], None], sizes: Sizes,
            stage: Callable[[str], None] = lambda _: None
            ) -> tuple[dict[str, list[float]], dict[str, str], dict[str, int]]:
    """Warm each implementation up, then time them in interleaved rounds over ``layers`` layers.

    An implementation so slow that ``min_reps`` rounds over every layer would take longer than
    ``sizes.impl_budget_s`` cycles fewer layers (timed on one layer after its warm-up): far from any
    roofline, it gains nothing from a larger working set. Returns the seconds of every round, the
    error of each implementation that raised, and the layers each one cycled.
    """
    errors: dict[str, str] = {}
    used: dict[str, int] = {}
    for name, impl in impls.items():
        stage(f"warm-up {name}")
        try:
            impl.warm()
            sync()
            used[name] = layers
            if layers > 1 and sizes.impl_budget_s and not impl.whole:
                t0 = time.perf_counter()
                impl.run(1)
                sync()
                one = max(time.perf_counter() - t0, 1e-9)
                used[name] = max(1, min(layers, int(sizes.impl_budget_s / (one * sizes.min_reps))))
        except Exception as e:  # noqa: BLE001 - recorded and shown; the other implementations go on
            errors[name] = f"{type(e).__name__}: {e}"
    samples: dict[str, list[float]] = {n: [] for n in impls if n not in errors}
    t_start = time.perf_counter()
    for r in range(sizes.max_reps):
        for name in round_order(list(samples), r):
            stage(f"round {r + 1} {name}")
            if sizes.settle_s:
                time.sleep(sizes.settle_s)
            try:
                t0 = time.perf_counter()
                impls[name].run(used[name])
                sync()
                samples[name].append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"
                del samples[name]
        elapsed = time.perf_counter() - t_start
        if (r + 1 >= sizes.min_reps and elapsed >= sizes.budget_s) or elapsed >= sizes.case_limit_s:
            break
    return samples, errors, used


def paired_ratio(num: list[float], den: list[float], num_scale: float = 1.0, den_scale: float = 1.0) -> float | None:
    """The median over rounds of ``(num[i] * num_scale) / (den[i] * den_scale)``: measurements of the
    same round, taken back to back (None unless both have every round)."""
    if not num or len(num) != len(den) or min(den) <= 0:
        return None
    return statistics.median(a * num_scale / (b * den_scale) for a, b in zip(num, den))


def metrics(r: ImplResult, machine: MachineInfo, hal_per_layer: float | None,
            hal_rounds: tuple[list[float], int] | None = None) -> ImplResult:
    """Fill in the derived numbers of ``r`` from its seconds, layers, bytes and flops; ``hal_per_layer``
    is hal's median seconds per layer in the same case (for a baseline's speedup), ``hal_rounds`` hal's
    seconds per round and layers: with them the speedup is the median of the rounds' ratios."""
    if not r.seconds:
        return r
    med = statistics.median(r.seconds)
    r.median_s, r.min_s = med, min(r.seconds)
    r.spread = (max(r.seconds) - min(r.seconds)) / med if med > 0 else None
    r.per_layer_s = med / max(r.layers, 1)
    if med > 0:
        r.gbps = r.bytes / med / 1e9
        r.tflops = r.flops / med / 1e12
        r.frac_copy_bw = r.gbps / machine.copy_gbps if machine.copy_gbps else None
        r.frac_read_bw = r.gbps / machine.read_gbps if machine.read_gbps else None
        peak16, peak32 = machine.matmul_tflops.get("bf16"), machine.matmul_tflops.get("fp32")
        r.frac_bf16_peak = r.tflops / peak16 if peak16 else None
        r.frac_fp32_peak = r.tflops / peak32 if peak32 else None
    r.intensity = r.flops / r.bytes if r.bytes else None
    if r.name != "hal" and hal_per_layer:
        paired = None if hal_rounds is None else paired_ratio(r.seconds, hal_rounds[0], 1 / max(r.layers, 1),
                                                              1 / max(hal_rounds[1], 1))
        r.speedup = paired if paired is not None else r.per_layer_s / hal_per_layer
    return r


def _run_case(c: CaseSpec, backend: Any, machine: MachineInfo, sizes: Sizes, ws: int, mem_budget: int | None,
              progress: Progress) -> CaseResult:
    from hal.errors import HALError

    res = CaseResult(kind=c.kind, label=c.label, status="ok")
    reasons = backend.capabilities().why_not(**c.requires())
    if reasons:
        res.status, res.reason = "skip", "; ".join(reasons)
        return res
    layers = c.layers(ws, sizes.max_layers)
    res.layers = layers
    res.working_set_bytes = layers * c.stored_bytes_per_layer()
    if c.kind != "prefill":
        res.exceeds_llc = None if machine.llc_bytes is None else res.working_set_bytes > machine.llc_bytes
    res.memory_needed_bytes = c.memory_needed(layers)
    if mem_budget is not None and res.memory_needed_bytes > mem_budget:
        res.status = "skip"
        res.reason = (f"needs ~{res.memory_needed_bytes / 2**30:.1f} GiB, more than {sizes.memory_fraction:.0%} of "
                      f"the {(machine.memory_bytes or 0) / 2**30:.0f} GiB memory")
        return res
    device = backend.default_device()
    sync = sync_for(device)
    setup = None
    try:
        progress.stage("building")
        t0 = time.perf_counter()
        budget = cached_pool_budget(machine) if device.type == "cpu" else None
        setup = build(c, backend, device, layers, seed=zlib.crc32(c.label.encode()), cache_budget=budget)
        sync()
        res.build_s = time.perf_counter() - t0
        res.shape, res.plan_s, res.notes = setup.shape, setup.plan_s, list(setup.notes)
        samples, errors, used = measure(setup.impls, layers, sync, sizes, progress.stage)
        res.rounds = max((len(s) for s in samples.values()), default=0)
        hal_s, hal_n = samples.get("hal"), used.get("hal", layers)
        hal_per_layer = statistics.median(hal_s) / hal_n if hal_s else None
        for name, impl in setup.impls.items():
            n = used.get(name, layers)
            r = ImplResult(name=name, layers=n, bytes=n * impl.bytes_per_layer, flops=n * impl.flops_per_layer)
            if name in errors:
                r.status, r.message = "error", errors[name]
            else:
                r.seconds = samples[name]
            res.impls.append(metrics(r, machine, hal_per_layer, (hal_s, hal_n) if hal_s else None))
            if n < layers:
                cached = machine.llc_bytes is not None and r.bytes <= machine.llc_bytes
                res.notes.append(f"{name} cycled {n} of {layers} layers to fit the time budget "
                                 f"({r.bytes / 2**20:.0f} MiB per measurement"
                                 + (", no more than the last-level cache the system reports)" if cached else ")"))
        copy = res.impl(MEMCPY)
        if copy is not None and copy.gbps:  # "% of copy" against the copy measured in the same rounds
            for r in res.impls:
                paired = paired_ratio(copy.seconds, r.seconds, 1 / copy.bytes, 1 / r.bytes) if r.bytes else None
                r.frac_copy_bw = paired if paired is not None else (r.gbps / copy.gbps if r.gbps is not None else None)
            copy.speedup = None
            res.notes.append(f"%copy is against the memcpy timed in this case's rounds ({copy.gbps:.3g} GB/s; "
                             f"the probe at the start measured {machine.copy_gbps:.3g})")
        unq, cached = res.impl(f"hal-{c.dtype}"), res.impl(CACHED)
        if unq is not None and cached is not None and unq.seconds and cached.seconds:
            res.gain_ceiling = paired_ratio(unq.seconds, cached.seconds, 1 / unq.layers, 1 / cached.layers)
            if res.gain_ceiling is not None:
                res.notes.append(f"the format's gain over {unq.name} is at most {unq.name} / {CACHED} = "
                                 f"{res.gain_ceiling:.2f}x in these rounds"
                                 + ("" if unq.speedup is None else f" (hal's rows from memory: {unq.speedup:.2f}x)")
                                 + ": hal's compute alone against the unquantized hal at this memory speed")
        if "hal" in errors:
            res.status, res.reason = "error", f"hal raised {errors['hal']}"
    except HALError as e:  # declared, yet refused or failed
        res.status, res.reason = "error", f"declared, but raised {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a crash of a case is reported, the run goes on
        res.status, res.reason = "error", f"{type(e).__name__}: {e}"
    finally:
        del setup
        gc.collect()
    return res


def _infos() -> dict[str, Any]:
    import hal

    return {i.name: i for i in hal.list_backends()}


def run(names: list[str] | None = None, *, sizes: Sizes = QUICK, kinds: set[str] | None = None,
        explicit: bool = True, progress: Progress | None = None, dtype: str = "bf16") -> BenchReport:
    """Benchmark backends ``names`` (None: the current selection) with ``sizes``, models in ``dtype``.

    ``kinds`` limits the cases to some of "decode", "prefill", "mla". ``explicit=False`` (``--all``)
    also skips emulated backends, whose timings would measure an interpreter.
    """
    import hal

    progress = progress or Progress()
    t_run = time.perf_counter()
    infos = _infos()
    if names is None:
        names = [hal.get_backend().name]
    report = BenchReport(hal_version=hal.__version__,
                         date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                         sizes=sizes, timing=(f"warm-up on one layer, then {sizes.min_reps}-{sizes.max_reps} "
                                              f"interleaved rounds (a {sizes.settle_s * 1e3:.0f} ms pause before "
                                              f"each timed run; hal and hal-<dtype> alternate first); median, "
                                              f"spread = (max-min)/median"))
    for name in names:
        info = infos.get(name)
        if info is None:
            report.backends.append(BackendBench(name, False, [f"unknown backend; valid: {', '.join(infos)}"]))
            continue
        bb = BackendBench(name, info.available, list(info.reasons), info.emulated, info.device, dict(info.versions))
        report.backends.append(bb)
        if not info.available:
            continue
        if info.emulated and not explicit:
            bb.available = False
            bb.reasons = ["emulated: its timings would measure an interpreter; name it with --backend to run it"]
            continue
        t_backend = time.perf_counter()
        backend = hal.get_backend(name)
        device = backend.default_device()
        bb.notes = list(backend.capabilities().notes)
        if any("AMX tiles emulated" in n for n in bb.notes):  # HAL_CPU_AMX=emulate: the tiles are a C model
            bb.emulated = True
        progress.note(name, "measuring the machine: copy and read bandwidth, bf16 and fp32 matmul")
        bb.machine = m = probe_machine(device, info.device, buffer_bytes=sizes.probe_buffer,
                                       matmul_n=sizes.matmul_n, reps=sizes.probe_reps)
        bb.working_set_target = ws = sizes.working_set(m.llc_bytes)
        bb.memory_budget = None if m.memory_bytes is None else int(sizes.memory_fraction * m.memory_bytes)
        cases = case_list(sizes, backend.capabilities().kv_dtypes, kinds, dtype)
        for i, c in enumerate(cases):
            progress.case(name, i, len(cases), c.label)
            bb.cases.append(_run_case(c, backend, m, sizes, ws, bb.memory_budget, progress))
        progress.done(name, len(cases))
        bb.seconds = time.perf_counter() - t_backend
    report.seconds = time.perf_counter() - t_run
    return report
