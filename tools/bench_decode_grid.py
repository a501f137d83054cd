"""The decode grid of ``hal bench``'s full size (contexts 1K-32K x batch 1-64) for bf16 and int8, with
the quick size's rounds and time budget: about 5 minutes here instead of the full run's hour.

    python tools/bench_decode_grid.py docs/bench-cpu-decode-grid.json
"""

from __future__ import annotations

import dataclasses
import sys

from hal.bench.cases import FULL, QUICK
from hal.bench.report import format_report, write_json
from hal.bench.runner import run


def main(out: str) -> None:
    sizes = dataclasses.replace(FULL, name="decode-grid", decode_kv_dtypes=("auto", "int8"),
                                min_reps=QUICK.min_reps, max_reps=QUICK.max_reps, budget_s=QUICK.budget_s,
                                case_limit_s=60.0, min_working_set=QUICK.min_working_set,
                                probe_reps=QUICK.probe_reps, probe_buffer=QUICK.probe_buffer, matmul_n=QUICK.matmul_n)
    report = run(["cpu"], sizes=sizes, kinds={"decode"})
    print(format_report(report))
    write_json(out, report)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-cpu-decode-grid.json")
