"""``hal bench``: attention speed measured honestly, against the machine and against the baselines.

Decode attention reads the whole KV cache once per token, so its limit is memory bandwidth;
prefill is bound by matrix throughput. One run, in one process, per backend:

1. measures the machine (``machine.py``): copy and read bandwidth over buffers well above the
   last-level cache, bf16 and fp32 matmul peak;
2. runs every case (``cases.py``): paged decode on Llama-3-8B shapes for every declared kv_dtype,
   causal prefill, absorbed MLA decode on DeepSeek-V2-Lite shapes, decode and MLA cycling through
   enough layers that a measurement reads more than the cache holds;
3. against the baselines a user would otherwise run, interleaved in the same rounds (``runner.py``):
   torch SDPA on contiguous KV, and gathering the pages then SDPA;
4. and reports achieved GB/s and fraction of bandwidth, TFLOP/s and fraction of matmul peak, and
   hal's speedup over each baseline (``report.py``, ``plot.py`` for the roofline).

How bytes and FLOPs are counted is in ``accounting.py``. Benchmarks are not tests: nothing here
asserts a speed. ``from hal.bench import run; report = run(["cpu"], sizes=QUICK)``.
"""

from __future__ import annotations

from hal.bench.cases import FULL, QUICK, TINY, CaseSpec, Sizes
from hal.bench.runner import BenchReport, run

__all__ = ["run", "Sizes", "FULL", "QUICK", "TINY", "CaseSpec", "BenchReport"]
