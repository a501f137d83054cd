"""hal bench: the byte/FLOP accounting (hand-computed), the case list, and smoke runs at tiny sizes.

Benchmarks are not tests: nothing here asserts how fast anything is, only that the harness runs,
counts right and writes what it says.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from hal.bench import TINY, accounting as A
from hal.bench.build import CACHED, pool_table
from hal.bench.cases import QUICK, CaseSpec, case_list
from hal.bench.machine import MachineInfo, core_l2_cache, last_level_cache
from hal.bench.runner import BenchReport, ImplResult, _run_case, cached_pool_budget, metrics, paired_ratio, run


def _hal(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HAL_BACKEND"}
    return subprocess.run([sys.executable, "-m", "hal", *args], env=env, capture_output=True, text=True,
                          timeout=600)


# ----------------------------------------------------------------------------- accounting, by hand

def test_machine_accounting() -> None:
    assert A.copy_bytes(A.GiB) == 1073741824  # bytes copied (STREAM would count 2x)
    assert A.read_bytes(A.GiB) == 1073741824
    assert A.matmul_flops(2048) == 17179869184  # 2 * 2048^3


def test_decode_accounting_llama3_8b() -> None:
    # 8 KV heads x (128 + 128) values x 2 bytes = 4096 B per token and layer
    bpt = A.kv_bytes_per_token_layer(8, 128, 128, "auto", 2)
    assert bpt == 4096
    assert A.decode_bytes(bpt, 8, 4096) == 134217728  # 128 MiB per layer for batch 8 x 4096
    # int8: a row of 128 values + one fp16 scale = 130 B; K and V, 8 heads: 2080 B
    assert A.kv_bytes_per_token_layer(8, 128, 128, "int8", 2) == 2080
    assert A.kv_bytes_per_token_layer(8, 128, 128, "fp8_e4m3", 2) == 2048
    # per query head and key: 2*128 (QK) + 2*128 (PV) = 512 FLOPs; x 32 heads x 8 x 4096
    assert A.decode_flops(8, 4096, 32, 128, 128) == 536870912
    # bf16 decode intensity: 4 FLOP per byte (4 query heads share each KV head)
    assert A.decode_flops(1, 1, 32, 128, 128) / bpt == 4.0


def test_prefill_accounting() -> None:
    # 4 * N^2/2 * Hq * D for N = 2048, Hq = 32, D = 128
    assert A.prefill_flops(2048, 32, 128, 128) == 4 * 2048 ** 2 // 2 * 32 * 128 == 34359738368
    # q + out: 2 * 2048 * 32 * 128 * 2 B; k + v: 2 * 2048 * 8 * 128 * 2 B
    assert A.prefill_bytes(2048, 32, 8, 128, 128, 2) == 33554432 + 8388608


def test_mla_accounting_deepseek_v2_lite() -> None:
    row = A.mla_row_bytes(512, 64, "auto", 2)
    assert row == 1152  # 576 bf16 values, read once for all heads
    assert A.mla_bytes(row, 1, 4096) == 4718592
    # 2*16*(512+64) scores + 2*16*512 output = 18432 + 16384
    assert A.mla_flops_per_token(16, 512, 64) == 34816
    assert A.mla_flops(2, 10, 16, 512, 64) == 696320


def test_layers_for_reaches_the_working_set() -> None:
    assert A.layers_for(A.GiB, 128 * A.MiB) == 8
    assert A.layers_for(A.GiB, 129 * A.MiB) == 8  # 8 x 129 MiB > 1 GiB
    assert A.layers_for(A.GiB, 127 * A.MiB) == 9
    assert A.layers_for(A.GiB, 4 * A.GiB) == 1
    assert A.layers_for(A.GiB, 1, max_layers=64) == 64


def test_working_set_rule() -> None:
    full = dataclasses.replace(QUICK, min_working_set=A.GiB, llc_factor=4, max_working_set=None)
    assert full.working_set(32 * A.MiB) == A.GiB
    assert full.working_set(300 * A.MiB) == 1200 * A.MiB  # 4 x a 300 MiB L3
    assert QUICK.working_set(32 * A.MiB) == 256 * A.MiB
    assert QUICK.working_set(300 * A.MiB) == A.GiB  # capped
    assert QUICK.working_set(None) == 256 * A.MiB


def test_cached_pool_stays_in_each_cores_l2() -> None:
    # hal-cached's pool: half of one core's L2 where it is known (a VM's reported L3 may read as memory),
    # else a quarter of the last-level cache, else no hal-cached at all
    def machine(l2: int | None, llc: int | None) -> MachineInfo:
        return MachineInfo(device="x", device_type="cpu", cpu_model="x", cores=2, torch_threads=2, torch_version="x",
                           llc_bytes=llc, llc_text="", memory_bytes=None, buffer_bytes=0, copy_gbps=1.0, read_gbps=1.0,
                           matmul_n=0, l2_bytes=l2)
    assert cached_pool_budget(machine(2 * A.MiB, 300 * A.MiB)) == (A.MiB, "half of each core's L2")
    assert cached_pool_budget(machine(None, 32 * A.MiB)) == (8 * A.MiB, "a quarter of the last-level cache")
    assert cached_pool_budget(machine(None, None)) is None
    l2 = core_l2_cache()  # this machine's, from /sys: a size, or unknown
    assert l2 is None or A.KiB * 64 <= l2 <= A.GiB


def test_metrics_arithmetic() -> None:
    m = MachineInfo(device="x", device_type="cpu", cpu_model="x", cores=2, torch_threads=2, torch_version="x",
                    llc_bytes=None, llc_text="", memory_bytes=None, buffer_bytes=0, copy_gbps=20.0, read_gbps=25.0,
                    matmul_n=0, matmul_tflops={"bf16": 2.0, "fp32": 0.25})
    r = metrics(ImplResult("sdpa", layers=4, seconds=[0.2, 0.1, 0.3], bytes=10**9, flops=4 * 10**9), m,
                hal_per_layer=0.05 / 4)
    assert r.median_s == 0.2 and r.min_s == 0.1 and r.per_layer_s == 0.05
    assert r.spread == pytest.approx(1.0)  # (0.3 - 0.1) / 0.2
    assert r.gbps == pytest.approx(5.0) and r.frac_copy_bw == pytest.approx(0.25)
    assert r.frac_read_bw == pytest.approx(0.2)
    assert r.tflops == pytest.approx(0.02) and r.frac_bf16_peak == pytest.approx(0.01)
    assert r.intensity == 4.0 and r.speedup == pytest.approx(4.0)  # hal 4x faster than this baseline


def test_ratios_pair_the_measurements_of_each_round() -> None:
    # a slow-memory round slows hal and the baseline alike: the ratio of each round is 2, the ratio of
    # the medians is not
    hal_s, base_s = [1.0, 1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 6.0, 6.0]
    assert paired_ratio(base_s, hal_s) == pytest.approx(2.0)
    assert statistics.median(base_s) / statistics.median(hal_s) == pytest.approx(2.0 / 3.0)
    m = MachineInfo(device="x", device_type="cpu", cpu_model="x", cores=2, torch_threads=2, torch_version="x",
                    llc_bytes=None, llc_text="", memory_bytes=None, buffer_bytes=0, copy_gbps=20.0, read_gbps=25.0,
                    matmul_n=0, matmul_tflops={})
    r = metrics(ImplResult("sdpa", layers=2, seconds=[4.0, 4.0, 4.0, 12.0, 12.0]), m, hal_per_layer=3.0,
                hal_rounds=(hal_s, 1))
    assert r.speedup == pytest.approx(2.0)  # per layer: 2 s against hal's 1 s, then 6 against 3
    assert paired_ratio([1.0, 2.0], [1.0]) is None  # rounds missing: no pairing


def test_pool_table_draws_every_page_from_the_pool_evenly() -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    t = pool_table(8, 256, 100, gen)  # 2048 pages from 100 blocks
    assert t.shape == (8, 256) and t.dtype == torch.int32
    counts = torch.bincount(t.flatten().long(), minlength=100)
    assert counts.numel() == 100 and int(counts.min()) >= 20 and int(counts.max()) <= 21  # 2048 / 100
    first = t.flatten()[:100].sort().values  # each round of the pool is a permutation of it
    assert torch.equal(first, torch.arange(100, dtype=torch.int32))
    assert torch.equal(pool_table(3, 7, 5, torch.Generator().manual_seed(1)),  # the seed decides it
                       pool_table(3, 7, 5, torch.Generator().manual_seed(1)))
    assert int(pool_table(2, 4, 1, gen).max()) == 0  # a pool of one block


def test_last_level_cache_is_found_or_unknown() -> None:
    size, text = last_level_cache()
    assert (size is None and text == "unknown") or (size > 0 and "MiB" in text)


# ----------------------------------------------------------------------------- the case list

def test_case_list_takes_declared_kv_dtypes() -> None:
    labels = [c.label for c in case_list(QUICK, frozenset({"auto"}))]
    assert labels == ["decode bf16 B8 S4096", "decode bf16 B1 S1024", "prefill bf16 N2048", "mla bf16 B1 S4096"]
    labels = [c.label for c in case_list(QUICK, frozenset({"auto", "int8", "int4"}))]
    assert "decode int8 B8 S4096" in labels and not any("int4" in x for x in labels)  # quick: bf16 + int8
    full = dataclasses.replace(QUICK, decode_kv_dtypes=None)
    assert "decode int4 B8 S4096" in [c.label for c in case_list(full, frozenset({"auto", "int8", "int4"}))]
    assert [c.kind for c in case_list(QUICK, frozenset({"auto"}), {"prefill"})] == ["prefill"]


def test_case_bytes_and_memory() -> None:
    c = CaseSpec("decode", 8, 4096)
    assert c.stored_bytes_per_layer() == 128 * A.MiB
    assert c.layers(A.GiB) == 8
    assert c.memory_needed(8) == 8 * 256 * A.MiB + 3 * 128 * A.MiB  # cache + contiguous copy + temporaries
    q = CaseSpec("decode", 8, 4096, "int8")
    assert q.stored_bytes_per_layer() == 2080 * 8 * 4096 and q.model_bytes_per_layer() == 128 * A.MiB
    assert CaseSpec("mla", 1, 4096).stored_bytes_per_layer() == 4718592
    assert CaseSpec("prefill", 1, 2048).layers(A.GiB) == 1


# ----------------------------------------------------------------------------- runs at tiny sizes

def _machine() -> MachineInfo:
    return MachineInfo(device="x", device_type="cpu", cpu_model="x", cores=2, torch_threads=2, torch_version="x",
                       llc_bytes=A.MiB // 2, llc_text="", memory_bytes=8 * A.GiB, buffer_bytes=0, copy_gbps=20.0,
                       read_gbps=25.0, matmul_n=0, matmul_tflops={"bf16": 2.0, "fp32": 0.25})


def test_undeclared_case_is_skipped_with_the_capability_reasons() -> None:
    import hal
    from hal.backends.cpu import CpuBackend

    caps = hal.get_backend("cpu").capabilities()

    class NoMla(CpuBackend):
        def capabilities(self):  # type: ignore[no-untyped-def]
            return dataclasses.replace(caps, features=caps.features - {"mla"})

    res = _run_case(CaseSpec("mla", 1, 128), NoMla(), _machine(), TINY, A.MiB, None, _Quiet())
    assert res.status == "skip" and "'mla'" in res.reason and not res.impls


def test_case_too_big_for_memory_is_skipped_with_the_reason() -> None:
    import hal

    tiny_memory = dataclasses.replace(TINY, memory_fraction=1e-9)
    res = _run_case(CaseSpec("decode", 2, 64), hal.get_backend("cpu"), _machine(), tiny_memory, A.MiB, 1, _Quiet())
    assert res.status == "skip" and "needs" in res.reason and "memory" in res.reason


class _Quiet:
    def stage(self, text: str) -> None:
        pass


def test_run_in_process_reports_every_case_and_baseline() -> None:
    import io

    from hal.bench.report import format_report
    from hal.bench.runner import Progress

    stream = io.StringIO()
    rep = run(["cpu"], sizes=TINY, progress=Progress(stream))
    (bb,) = rep.backends
    assert bb.available and bb.machine is not None and bb.machine.copy_gbps > 0
    assert not bb.errors, [c.reason for c in bb.errors]
    kinds = {c.kind for c in bb.cases}
    assert {"decode", "prefill", "mla"} <= kinds
    for c in bb.cases:
        if c.status == "skip":
            assert c.reason
            continue
        names = [r.name for r in c.impls]
        assert names[0] == "hal" and "sdpa" in names
        if c.kind != "prefill":
            assert {"sdpa-packed", "gather+sdpa"} <= set(names)
            assert c.working_set_bytes >= A.MiB and c.exceeds_llc is False  # TINY stays in cache, and says so
        for r in c.impls:
            assert r.status == "ok" and len(r.seconds) == TINY.min_reps and r.gbps
            assert (r.speedup is None) == (r.name in ("hal", "memcpy"))
            assert bool(r.tflops) == (r.name != "memcpy")
        if c.kind == "decode" and "int8" in c.label:  # the format's gain, measured in the same rounds
            unq = c.impl("hal-bf16")
            hal_r = c.impl("hal")  # the median of the rounds' ratios
            assert unq is not None and unq.speedup == pytest.approx(
                statistics.median(u / unq.layers / (h / hal_r.layers) for u, h in zip(unq.seconds, hal_r.seconds)))
            cached = c.impl(CACHED)  # the compute alone, where the core's L2 or the last-level cache is known
            assert (cached is not None) == (bb.machine.l2_bytes is not None or bb.machine.llc_bytes is not None)
            if cached is not None:
                assert names.index(CACHED) == 2 and cached.bytes == hal_r.bytes  # as many bytes as hal's call
                assert c.gain_ceiling == pytest.approx(statistics.median(
                    u / unq.layers / (k / cached.layers) for u, k in zip(unq.seconds, cached.seconds)))
                assert any(f"at most hal-bf16 / {CACHED} = {c.gain_ceiling:.2f}x" in n for n in c.notes)
        else:
            assert c.impl(CACHED) is None and c.gain_ceiling is None
        if c.kind != "prefill":  # "% of copy" is against the memcpy timed in the case's own rounds
            copy = c.impl("memcpy")
            assert copy is not None and copy.frac_copy_bw == pytest.approx(1.0)
            hal_r = c.impl("hal")
            assert hal_r.frac_copy_bw == pytest.approx(statistics.median(
                (hal_r.bytes / h) / (copy.bytes / m) for h, m in zip(hal_r.seconds, copy.seconds)))
    assert "done in" in stream.getvalue()  # the progress bar, one line per case off a terminal
    text = format_report(rep)
    assert "machine: copy" in text and "hal speedup" in text and "bf16 B2 S64" in text
    assert "  backend: native kernels: " in text  # which kernels ran, and whether on AMX tiles
    assert ("paged_decode native" in text) == any("AMX tiles" in n for n in bb.notes)
    assert not bb.emulated  # (HAL_CPU_AMX=emulate would mark the run EMULATED: its tiles are a C model)
    back = BenchReport.from_dict(json.loads(json.dumps(rep.to_dict(), default=str)))  # as --json wrote it
    assert format_report(back) == text and back.to_dict() == rep.to_dict()


def test_bench_command_quick_writes_json_and_png(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "roof.png"
    proc = _hal("bench", "--quick", "--tiny", "--backend", "cpu", "--json", str(out_json), "--plot", str(out_png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hal bench (tiny)" in proc.stdout and "decode: Llama-3-8B" in proc.stdout
    assert "1/" in proc.stderr and "done in" in proc.stderr  # progress on stderr
    doc = json.loads(out_json.read_text())
    assert doc["hal_version"] and doc["sizes"]["name"] == "tiny" and "conventions" in doc
    cpu = doc["backends"][0]
    assert cpu["name"] == "cpu" and cpu["machine"]["copy_gbps"] > 0 and cpu["machine"]["matmul_tflops"]["bf16"] > 0
    assert {c["kind"] for c in cpu["cases"]} == {"decode", "prefill", "mla"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_kv_dtypes_picks_the_formats() -> None:
    proc = _hal("bench", "--tiny", "--kind", "decode", "--kv-dtypes", "fp8_e5m2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fp8_e5m2 B2 S64" in proc.stdout and "int8 B2 S64" not in proc.stdout and "bf16 B2 S64" not in proc.stdout
    assert "hal-bf16" in proc.stdout  # the same KV in bf16, timed in the same rounds


def test_bench_dtype_sets_the_model_dtype() -> None:
    proc = _hal("bench", "--tiny", "--kind", "decode,prefill", "--dtype", "fp16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fp16 B2 S64" in proc.stdout and "fp16 N64" in proc.stdout
    assert "bf16 B2" not in proc.stdout and "bf16 N" not in proc.stdout


def test_bench_names_an_unavailable_backend_and_fails() -> None:
    proc = _hal("bench", "--tiny", "--backend", "cuda")
    assert proc.returncode == 1
    assert "cuda: not run:" in proc.stdout and "not available" in proc.stderr


def test_bench_all_skips_unavailable_backends_with_reasons() -> None:
    proc = _hal("bench", "--tiny", "--all", "--kind", "prefill")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("cuda", "rocm", "tpu"):
        assert f"{name}: not run:" in proc.stdout
    assert "prefill: Llama-3-8B" in proc.stdout


@pytest.mark.parametrize("args", [["--backend", "nope"], ["--kind", "train"], ["--kv-dtypes", "int8,int3"]])
def test_bench_rejects_bad_arguments(args: list[str]) -> None:
    from hal.cli import main

    assert main(["bench", "--tiny", *args]) == 2


def test_import_hal_imports_neither_bench_nor_matplotlib() -> None:
    code = ("import sys, hal, hal.cli; assert 'hal.bench' not in sys.modules; "
            "import hal.bench; assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_measure_cuts_layers_of_a_slow_implementation_only() -> None:
    import time

    from hal.bench.build import Impl
    from hal.bench.runner import measure

    calls: list[int] = []

    def slow(n: int) -> None:
        calls.append(n)
        time.sleep(0.01 * n)

    impls = {"fast": Impl(lambda n: None, lambda: None, 1, 1), "slow": Impl(slow, lambda: None, 1, 1)}
    sizes = dataclasses.replace(TINY, min_reps=2, max_reps=2, impl_budget_s=0.1)
    samples, errors, used = measure(impls, 100, lambda: None, sizes)
    assert not errors and used["fast"] == 100 and 1 <= used["slow"] <= 5  # 0.1 s / (2 rounds x 0.01 s)
    assert calls[0] == 1 and calls[1:] == [used["slow"]] * 2  # timed on one layer, then the rounds
    assert [len(v) for v in samples.values()] == [2, 2]


def test_measure_alternates_hal_and_its_unquantized_twin_and_settles() -> None:
    import time

    from hal.bench.build import Impl
    from hal.bench.runner import measure, round_order

    order: list[str] = []
    stamps: list[float] = []

    def rec(name: str) -> Impl:
        def run(_n: int) -> None:
            order.append(name)
            stamps.append(time.perf_counter())
        return Impl(run, lambda: None, 1, 1)

    names = ["hal", "hal-bf16", "memcpy", "sdpa"]
    impls = {n: rec(n) for n in names}
    sizes = dataclasses.replace(TINY, min_reps=4, max_reps=4, settle_s=0.02)
    samples, errors, used = measure(impls, 1, lambda: None, sizes)
    assert not errors and all(len(v) == 4 for v in samples.values())
    assert order == (names + ["hal-bf16", "hal", "memcpy", "sdpa"]) * 2
    assert min(b - a for a, b in zip(stamps, stamps[1:])) >= 0.02  # a pause before every timed run
    assert round_order(["hal", "sdpa", "memcpy"], 1) == ["hal", "sdpa", "memcpy"]  # no twin: as given


def _build_tool(tmp_path: Path, source: str, *flags: str) -> Path:
    """Compiles tools/<source> with the machine's C compiler (skips without one); returns the program."""
    import shutil

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / Path(source).stem
    build = subprocess.run([cc, "-O2", "-march=native", "-std=c11", *(f.replace("{root}", str(root)) for f in flags),
                            str(root / "tools" / source), "-o", str(exe), "-lm"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return exe


def test_vector_ports_builds_and_times_each_mix(tmp_path: Path) -> None:
    # tools/vector_ports.c: the pipe model behind docs/speed-notes.md ("Compute per row", sixth round)
    exe = _build_tool(tmp_path, "vector_ports.c")
    flags = set(re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[0].split()) \
        if Path("/proc/cpuinfo").exists() else set()
    if not {"avx512_vnni", "avx512_bf16", "avx512vbmi", "gfni"} <= flags:
        pytest.skip("the mixes need AVX512-VNNI, BF16, VBMI and GFNI")
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert re.match(r"clock \d+\.\d+ GHz", lines[0]), lines[0]
    rows = {m.group(1).strip(): float(m.group(2)) for m in (re.match(r"(.*?)\s+([\d.]+) cycles$", x) for x in lines[1:]) if m}
    assert len(rows) == len(lines) - 1 and all(v > 0 for v in rows.values())  # every mix, after the clock line
    assert "int8 scores mix: 16 VPDPWSSD + 18 others" in rows and "8 VDPBF16PS + 8 VPERMI2B" in rows


def test_decode_harness_builds_and_times_the_kernel(tmp_path: Path) -> None:
    # tools/decode_harness.c: the kernel alone, from C (docs/speed-notes.md's measurements)
    exe = _build_tool(tmp_path, "decode_harness.c", "-fopenmp", "-I", "{root}/backends/cpu/kernels")
    for args in (["gqa", "2", "64", "1", "1", "bf16", "1"], ["mla", "1", "128", "1", "1", "bf16", "1"]):
        res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert re.match(rf"{args[0]} bf16 B{args[1]} S{args[2]}, 1 threads: [0-9.]+ ms/layer, [0-9.]+ GB/s of rows",
                        res.stdout), res.stdout
    bad = subprocess.run([str(exe), "gqa", "1", "64", "1", "1", "bf17", "1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "FORMAT must be" in bad.stderr
    # it says whether the kernel ran on AMX tiles; built against their C model (tools/amx_check.sh's
    # fallback), it runs the tile paths of MLA and int8 GQA
    assert re.search(r"AMX tiles: (none in this build|native|refused by Linux)\n", res.stdout), res.stdout
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():
        (tmp_path / "emulated").mkdir()
        emu = _build_tool(tmp_path / "emulated", "decode_harness.c", "-fopenmp", "-DHAL_AMX_EMULATE",
                          "-I", "{root}/backends/cpu/kernels")
        for args in (["gqa", "1", "64", "1", "1", "int8", "1"], ["mla", "1", "64", "1", "1", "bf16", "1"]):
            res = subprocess.run([str(emu), *args], capture_output=True, text=True, timeout=120)
            assert res.returncode == 0 and "AMX tiles: emulated\n" in res.stdout, res.stdout + res.stderr


def test_decode_harness_times_two_builds_in_turn(tmp_path: Path) -> None:
    # tools/decode_harness.c -DHAL_AB: build A and a renamed build B, every pass timing both
    import shutil

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("needs a C compiler")
    root = Path(__file__).resolve().parents[1]
    kdir = root / "backends" / "cpu" / "kernels"
    common = ["-O2", "-march=native", "-std=c11", "-fopenmp", "-I", str(kdir)]
    rename = ["-Dhal_paged_decode=hal_ab_paged_decode", "-Dhal_decode_supports=hal_ab_decode_supports",
              "-Dhal_amx_state=hal_ab_amx_state"]
    obj, exe = tmp_path / "b.o", tmp_path / "ab"
    for cmd in ([cc, *common, *rename, "-c", str(kdir / "paged_decode.c"), "-o", str(obj)],
                [cc, *common, "-DHAL_AB", str(root / "tools" / "decode_harness.c"), str(obj), "-o", str(exe), "-lm"]):
        build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, build.stderr
    res = subprocess.run([str(exe), "gqa", "2", "64", "1", "1", "bf16", "4"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    m = re.match(r"gqa bf16 B2 S64, 1 threads, ms/layer: A median ([0-9.]+) best ([0-9.]+) \| B median ([0-9.]+) "
                 r"best ([0-9.]+) \| B/A median ([0-9.]+) \(quartiles ([0-9.]+), ([0-9.]+)\) over 4 passes$",
                 res.stdout.strip())
    assert m, res.stdout
    a_med, a_best, b_med, b_best, ratio, q1, q3 = map(float, m.groups())
    assert 0 < a_best <= a_med and 0 < b_best <= b_med and 0 < q1 <= ratio <= q3


def test_hot_spills_lists_a_functions_vector_stack_traffic(tmp_path: Path) -> None:
    # tools/hot_spills.sh: the speed notes' eighth round (vectors gcc left in memory inside hot loops)
    import shutil

    root = Path(__file__).resolve().parents[1]
    script = root / "tools" / "hot_spills.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "FUNCTION HARNESS-ARGS" in usage.stdout
    if shutil.which("perf") is None or shutil.which("gcc") is None:
        pytest.skip("needs perf and gcc")
    env = {**os.environ, "OUT": str(tmp_path)}
    res = subprocess.run(["bash", str(script), "item_int8.constprop.0", "gqa", "1", "512", "1", "1", "int8", "20"],
                         capture_output=True, text=True, timeout=300, env=env)
    if res.returncode != 0 and ("perf_event" in res.stderr or "Permission" in res.stderr):
        pytest.skip("perf may not record here: " + res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert re.match(r"gqa int8 B1 S512, 1 threads: [0-9.]+ ms/layer", lines[0]), lines[0]
    assert lines[1].startswith("hottest vector loads and stores on the stack or through %rip in item_int8")
    total = re.fullmatch(r"total: ([0-9.]+)%", lines[-1])
    assert total and 0 <= float(total.group(1)) <= 100, lines[-1]
    assert all(re.match(r"\s+[0-9.]+ :\s+[0-9a-f]+:\s+\S+.*(\(%r[bs]p\)|%rip)", x) for x in lines[2:-1]), lines
    bad = subprocess.run(["bash", str(script), "item_int8.constprop.0", "gqa", "1", "64", "1", "1", "bf17", "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "FORMAT must be" in bad.stderr, bad.stdout + bad.stderr
    wrong = subprocess.run(["bash", str(script), "item_nothing", "gqa", "1", "64", "1", "1", "int8", "1"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert wrong.returncode == 1 and "no samples in item_nothing" in wrong.stdout


def test_prefetch_probe_builds_and_streams(tmp_path: Path) -> None:
    # tools/prefetch_probe.c: the streaming loops behind docs/speed-notes.md's "Headroom in the memory path"
    exe = _build_tool(tmp_path, "prefetch_probe.c", "-Wall", "-Werror")
    for args in (["chunks", "65536", "4", "1", "1"], ["chunks", "16384", "-1", "0", "2"], ["tiles", "1"]):
        res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert re.fullmatch(rf"{args[0]}: [0-9]+\.[0-9] GB/s \([01]\)\n", res.stdout), res.stdout
        assert float(res.stdout.split()[1]) > 0.1
    for bad in (["chunks", "100", "4", "1", "1"], ["tiles"]):
        res = subprocess.run([str(exe), *bad], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and ("CHUNK" in res.stderr or "usage" in res.stderr), res.stderr


def test_plot_gain_rows_take_each_quantized_case_its_ceiling_and_byte_ratio() -> None:
    from hal.bench.plot import _gain_rows
    from hal.bench.runner import BackendBench, CaseResult

    def case(label: str, impls: list[ImplResult], ceiling: float | None = None) -> CaseResult:
        return CaseResult(kind="decode", label=label, status="ok", impls=impls, gain_ceiling=ceiling)

    bb = BackendBench("cpu", True, cases=[
        case("decode bf16 B8 S4096", [ImplResult("hal", bytes=4096, layers=1)]),  # no twin: not a format's gain
        case("decode int8 B8 S4096", [ImplResult("hal", bytes=2 * 2080, layers=2),
                                      ImplResult("hal-bf16", bytes=4096, layers=1, speedup=1.5),
                                      ImplResult(CACHED, bytes=2080, layers=1, speedup=0.8)], ceiling=1.9),
        case("decode fp8_e4m3 B1 S1024", [ImplResult("hal", bytes=2048, layers=1),
                                          ImplResult("hal-bf16", bytes=4096, layers=1, speedup=1.2)]),
        case("decode int8 B1 S1024", [ImplResult("hal", bytes=2080, layers=1),
                                      ImplResult("hal-bf16", status="error", bytes=4096, layers=1)]),
    ])
    rows = _gain_rows(bb)
    assert [(label, gain, ceiling) for label, gain, ceiling, _ in rows] == [
        ("int8 B8 S4096", 1.5, 1.9), ("fp8_e4m3 B1 S1024", 1.2, None)]
    assert rows[0][3] == pytest.approx(4096 / 2080) and rows[1][3] == pytest.approx(2.0)  # bytes per layer


def test_plot_labels_of_coinciding_cases_do_not_overlap() -> None:
    # bf16 B8 x 4096 and B1 x 1024 decode land on one point of the roofline: their labels step apart
    from hal.bench.plot import _LABEL_STEP, _label_offsets

    offsets = _label_offsets([(4.0, 97.0), (4.0, 96.0), (8.0, 150.0), (4.0, 98.5), (4.0, 30.0)])
    assert offsets == [4, 4 - _LABEL_STEP, 4, 4 - 2 * _LABEL_STEP, 4]
