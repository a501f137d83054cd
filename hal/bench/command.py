"""``hal bench``: the command-line front of :func:`hal.bench.run` (its options are in ``hal/cli.py``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

__all__ = ["command"]

KINDS = ("decode", "prefill", "mla")


def command(args: argparse.Namespace) -> int:
    """Run ``hal bench``. Exit 0; 1 when a named backend is unavailable or a declared case raised;
    2 on bad arguments."""
    import hal
    from hal.bench.cases import FULL, QUICK, TINY
    from hal.bench.report import format_report, write_json
    from hal.bench.runner import run
    from hal.errors import HALError
    from hal.registry import registered_backends

    known = registered_backends()
    if args.all:
        names = list(known)
    elif args.backend:
        names = [n.strip() for b in args.backend for n in b.split(",") if n.strip()]
    else:
        try:
            names = [hal.get_backend().name]
        except HALError as e:
            print(f"hal bench: {e}", file=sys.stderr)
            return 1
    for n in names:
        if n not in known:
            print(f"hal bench: unknown backend {n!r}; valid: {', '.join(known)}", file=sys.stderr)
            return 2
    kinds = None
    if args.kind:
        kinds = {k.strip() for kk in args.kind for k in kk.split(",") if k.strip()}
        bad = kinds - set(KINDS)
        if bad:
            print(f"hal bench: unknown kind {sorted(bad)}; valid: {', '.join(KINDS)}", file=sys.stderr)
            return 2
    if args.plot:  # fail before measuring, not after
        if importlib.util.find_spec("matplotlib") is None:
            print("hal bench: --plot needs matplotlib: pip install 'hal-attention[bench]'", file=sys.stderr)
            return 2
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    if args.kv_dtypes:
        from dataclasses import replace

        from hal.dtypes import KV_DTYPES

        wanted = None if args.kv_dtypes.strip() == "all" else tuple(
            k.strip() for k in args.kv_dtypes.split(",") if k.strip())
        bad = sorted(set(wanted or ()) - set(KV_DTYPES))
        if bad:
            print(f"hal bench: unknown kv_dtype {bad}; valid: {', '.join(KV_DTYPES)}, or all", file=sys.stderr)
            return 2
        sizes = replace(sizes, decode_kv_dtypes=wanted, mla_kv_dtypes=wanted)
    report = run(names, sizes=sizes, kinds=kinds, explicit=not args.all, dtype=args.dtype)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
        print(f"\nJSON written to {args.json}")
    if args.plot:
        from hal.bench.plot import plot_roofline

        plot_roofline(report, args.plot)
        print(f"roofline plot written to {args.plot}")
    missing = [b for b in report.backends if not b.available and not args.all]
    for b in missing:
        print(f"hal bench: backend {b.name!r} is not available: {'; '.join(b.reasons)}", file=sys.stderr)
    errors = [f"{b.name}: {c.label}: {c.reason}" for b in report.backends for c in b.errors]
    for line in errors:
        print(f"hal bench: error in {line}", file=sys.stderr)
    return 1 if missing or errors else 0
