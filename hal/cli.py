"""The ``hal`` command: ``hal info``, ``hal conformance``, ``hal capacity`` and ``hal bench``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    import hal
    from hal import config

    infos = hal.list_backends()
    unknown = config.unknown_variables()
    if args.json:
        print(json.dumps({"hal_version": hal.__version__, "backends": [i.to_dict() for i in infos],
                          "unknown_hal_variables": unknown}, indent=1))
        return 0
    print(f"hal {hal.__version__}")
    for i in infos:
        state = "available" + (" (emulated)" if i.emulated else "") if i.available else "unavailable"
        print(f"\n{i.name}: {state}  [{i.source}: {i.target}]")
        if i.device:
            print(f"  device:   {i.device}")
        if i.versions:
            print("  versions: " + ", ".join(f"{k} {v}" for k, v in i.versions.items()))
        for r in i.reasons:
            print(f"  why not:  {r}")
        if i.capabilities:
            c = i.capabilities
            print(f"  dtypes {', '.join(sorted(c.dtypes))}; kv_dtypes {', '.join(sorted(c.kv_dtypes))}; "
                  f"memory {', '.join(sorted(c.memory))}; layout {c.kv_layout}")
            print(f"  head_dims {', '.join(map(str, sorted(c.head_dims)))}; "
                  f"block_sizes {', '.join(map(str, sorted(c.block_sizes)))}")
            print(f"  features {', '.join(sorted(c.features))}")
            for note in c.notes:
                print(f"  {note}")
    if unknown:
        print(f"\nwarning: unknown HAL_* variables set (typos?): {', '.join(unknown)}")
    return 0


class _Progress:
    """One progress line on stderr: rewritten in place on a terminal, a line per family otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last_family: tuple[str, str] | None = None

    def __call__(self, backend: str, i: int, n: int, case: Any) -> None:
        elapsed = time.perf_counter() - self.t0
        if case is None:
            msg = f"[{backend}] {n}/{n} done in {elapsed:.0f}s"
            print(("\r" + msg.ljust(100)) if self.tty else msg, file=sys.stderr, flush=True)
            return
        msg = f"[{backend}] {i + 1}/{n} {case.family}/{case.name} ({elapsed:.0f}s)"
        if self.tty:
            print("\r" + msg[:100].ljust(100), end="", file=sys.stderr, flush=True)
        elif (backend, case.family) != self.last_family:
            print(msg, file=sys.stderr, flush=True)
        self.last_family = (backend, case.family)


def _conformance(args: argparse.Namespace) -> int:
    import hal
    from hal.conformance import cases_for_level
    from hal.conformance.runner import families_of, print_matrix, run_backend, write_report

    if args.all:
        names = [i.name for i in hal.list_backends()]
    elif args.backend:
        names = [n for b in args.backend for n in b.split(",") if n]
    else:
        names = [hal.get_backend().name]
    from hal.registry import registered_backends

    known = registered_backends()
    for n in names:
        if n not in known:
            print(f"hal conformance: unknown backend {n!r}; valid: {', '.join(known)}", file=sys.stderr)
            return 2
    cases = cases_for_level(args.level)
    if args.family:
        wanted = {f for fam in args.family for f in fam.split(",") if f}
        unknown = wanted - set(families_of(cases))
        if unknown:
            print(f"hal conformance: unknown family {sorted(unknown)}; valid: {', '.join(families_of(cases))}",
                  file=sys.stderr)
            return 2
        cases = [c for c in cases if c.family in wanted]
    families = families_of(cases)
    progress = _Progress()
    t0 = time.perf_counter()
    reports = [run_backend(n, cases, progress) for n in names]
    seconds = time.perf_counter() - t0
    print_matrix(reports, families, args.level)
    print(f"\n{len(cases)} cases per backend, {seconds:.0f}s")
    if args.report:
        write_report(args.report, reports, families, args.level, seconds)
        print(f"report written to {args.report}")
    failed = any(r.failed for r in reports)
    explicit_missing = [r.name for r in reports if not r.available and not args.all]
    if explicit_missing:
        print(f"hal conformance: backend(s) named but not available: {', '.join(explicit_missing)}",
              file=sys.stderr)
    return 1 if failed or explicit_missing else 0


def _capacity(args: argparse.Namespace) -> int:
    from hal.capacity import capacity, format_report
    from hal.errors import InvalidInput

    try:
        report = capacity(args.model, kv_dtype=args.kv_dtype, bits=args.bits, memory=args.memory,
                          num_gpus=args.gpus, tp=args.tp, context=args.context, weight_dtype=args.weights,
                          reserve=args.reserve, vs=args.vs, vs_kv_dtype=args.vs_kv_dtype,
                          vs_weight_dtype=args.vs_weights)
    except InvalidInput as e:
        print(f"hal capacity: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hal", description="hal: one attention and KV-cache API across backends")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="every registered backend: available or not and why, device, "
                                         "versions, capabilities")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_conf = sub.add_parser("conformance", help="run the conformance suite and print the backends x families matrix")
    who = p_conf.add_mutually_exclusive_group()
    who.add_argument("--backend", action="append", metavar="NAME",
                     help="backend to test (repeatable, or a comma-separated list); default: the current selection")
    who.add_argument("--all", action="store_true", help="every registered backend (unavailable ones show why)")
    p_conf.add_argument("--level", choices=("quick", "full"), default="quick")
    p_conf.add_argument("--family", action="append", metavar="NAME",
                        help="run only these families (repeatable or comma-separated); default: all")
    p_conf.add_argument("--report", metavar="FILE.json", help="also write the results as JSON")
    p_cap = sub.add_parser("capacity", help="KV bytes per token, and the tokens and sequences that fit "
                                            "beside the weights (per GPU under tensor parallelism)")
    p_cap.add_argument("--model", required=True, metavar="NAME",
                       help="model preset, e.g. deepseek-v2 or llama-3-70b (an unknown name lists them all)")
    kv = p_cap.add_mutually_exclusive_group()
    kv.add_argument("--kv-dtype", metavar="X", help="hal KV format: auto (default), bf16, fp16, fp8 (= fp8_e4m3), "
                                                    "fp8_e5m2, int8, int6, int4; scales included")
    kv.add_argument("--bits", type=float, metavar="N", help="idealised bits per cached element, no scales "
                                                            "(the DeepSeek-V2 paper's measure)")
    p_cap.add_argument("--memory", default="80GiB", metavar="SIZE",
                       help="memory per GPU: 80GiB (2^30 B), 80GB (1e9 B), ... (default 80GiB)")
    p_cap.add_argument("--gpus", type=int, default=1, metavar="N", help="number of GPUs (default 1)")
    p_cap.add_argument("--tp", type=int, default=1, metavar="N",
                       help="tensor-parallel ranks per replica group (default 1)")
    p_cap.add_argument("--context", type=int, default=4096, metavar="N", help="tokens per sequence (default 4096)")
    p_cap.add_argument("--weights", default="bf16", metavar="DTYPE",
                       help="weight precision: bf16 (default), fp16, fp32, fp8, int8, int4")
    p_cap.add_argument("--reserve", type=float, default=0.0, metavar="F",
                       help="fraction of each GPU's memory kept for activations and workspace (default 0)")
    p_cap.add_argument("--vs", metavar="NAME", help="compare with this preset (same hardware and context)")
    p_cap.add_argument("--vs-kv-dtype", metavar="X", help="KV format of --vs (default auto: bf16)")
    p_cap.add_argument("--vs-weights", default="bf16", metavar="DTYPE", help="weight precision of --vs (default bf16)")
    p_cap.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_bench = sub.add_parser("bench", help="attention speed against the machine's bandwidth and matmul peak, and "
                                           "against torch SDPA baselines measured in the same run")
    who_b = p_bench.add_mutually_exclusive_group()
    who_b.add_argument("--backend", action="append", metavar="NAME",
                       help="backend to measure (repeatable, or comma-separated); default: the current selection")
    who_b.add_argument("--all", action="store_true",
                       help="every registered backend; unavailable and emulated ones are skipped with their reasons")
    p_bench.add_argument("--quick", action="store_true",
                         help="a few small cases (decode 8x4096 and 1x1024, prefill 2048, MLA 1x4096)")
    p_bench.add_argument("--kind", action="append", metavar="KIND",
                         help="only these kinds of case (repeatable or comma-separated): decode, prefill, mla")
    p_bench.add_argument("--kv-dtypes", metavar="LIST",
                         help="decode and MLA cases for these kv_dtypes (comma-separated, or 'all': every one the "
                              "backend declares); default: the size's own (quick: auto, int8)")
    p_bench.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                         help="the model dtype of every case (default bf16)")
    p_bench.add_argument("--json", metavar="FILE", help="write everything measured as JSON")
    p_bench.add_argument("--plot", metavar="FILE.png", help="write the roofline plot (needs matplotlib)")
    p_bench.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests: tiny sizes
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "capacity":
        return _capacity(args)
    if args.command == "bench":
        from hal.bench.command import command as _bench

        return _bench(args)
    return _conformance(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
