"""Running the suite: cases x backends -> outcomes, the printed matrix and the JSON report."""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from hal import config
from hal.backend import Backend
from hal.conformance.case import Case, CheckFailed
from hal.errors import HALError, Unsupported

__all__ = ["Outcome", "Reported", "BackendReport", "run_case", "run_backend", "print_matrix", "write_report"]

SPEC_VERSION = "1"


@dataclass
class Outcome:
    family: str
    case: str
    status: str  # "pass" | "FAIL" | "skip"
    err: float | None = None  # worst max-abs error among the case's comparisons
    tol: float | None = None  # its tolerance
    ratio: float | None = None  # worst err / tol (0 for exact checks)
    message: str = ""
    seconds: float = 0.0
    info: dict[str, float] = field(default_factory=dict)  # measured and reported, never gated
    info_row: str = ""  # the row of the reported-numbers table these belong to


class Reported(list):  # type: ignore[type-arg]
    """What a check returns when it also measures numbers that are reported, not gated: its
    comparisons, plus ``info`` ({name: value}) tabulated after the matrix under ``row``. Across the
    cases of one row the table shows each name's worst value: the largest, or the smallest for
    names ending in "agreement"."""

    def __init__(self, comparisons: Iterable[Any], info: dict[str, float], row: str) -> None:
        super().__init__(comparisons)
        self.info = dict(info)
        self.row = row


@dataclass
class BackendReport:
    name: str
    available: bool
    emulated: bool = False
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    capabilities: dict[str, Any] | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def families(self) -> dict[str, list[Outcome]]:
        out: dict[str, list[Outcome]] = {}
        for o in self.outcomes:
            out.setdefault(o.family, []).append(o)
        return out

    @property
    def failed(self) -> bool:
        return any(o.status == "FAIL" for o in self.outcomes)


def run_case(backend: Backend, case: Case) -> Outcome:
    """Run one case: skip (with the capability reasons), pass or FAIL (with what went wrong)."""
    reasons = backend.capabilities().why_not(**case.requires)
    if reasons:
        return Outcome(case.family, case.name, "skip", message="; ".join(reasons))
    t0 = time.perf_counter()
    try:
        comps = case.check(backend)
    except CheckFailed as e:
        return Outcome(case.family, case.name, "FAIL", message=str(e), seconds=time.perf_counter() - t0)
    except Unsupported as e:
        return Outcome(case.family, case.name, "FAIL", seconds=time.perf_counter() - t0,
                       message=f"declared but raised hal.Unsupported: {e}")
    except Exception as e:  # noqa: BLE001 - any crash of a declared case is a FAIL with its story
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        where = "".join(traceback.format_tb(e.__traceback__)[-1:]).strip().splitlines()[0]
        return Outcome(case.family, case.name, "FAIL", seconds=time.perf_counter() - t0,
                       message=f"raised {tb} ({where})")
    worst = max(comps, key=lambda c: c.ratio if c.tol > 0 else (0.0 if c.err == 0 else float("inf")),
                default=None)
    bad = [c for c in comps if not c.ok]
    seconds = time.perf_counter() - t0
    info = dict(comps.info) if isinstance(comps, Reported) else {}
    row = comps.row if isinstance(comps, Reported) else ""
    if worst is None:
        return Outcome(case.family, case.name, "pass", seconds=seconds, info=info, info_row=row)
    ratio = worst.ratio if worst.tol > 0 else (0.0 if worst.err == 0 else float("inf"))
    if bad:
        return Outcome(case.family, case.name, "FAIL", worst.err, worst.tol, ratio,
                       "; ".join(c.describe() for c in bad), seconds, info, row)
    return Outcome(case.family, case.name, "pass", worst.err, worst.tol, ratio, worst.describe(), seconds,
                   info, row)


def run_backend(name: str, cases: list[Case], progress: Callable[[str, int, int, Case], None] | None = None
                ) -> BackendReport:
    """Every case on backend ``name``; an unavailable backend gives a report with its reasons only."""
    from hal.registry import _probe, resolve_backend

    probe, _ = _probe(name)
    rep = BackendReport(name=name, available=probe.available, emulated=probe.emulated, device=probe.device,
                        versions=dict(probe.versions), reasons=list(probe.reasons))
    if not probe.available:
        return rep
    try:
        backend = resolve_backend(name)
        caps = backend.capabilities()
    except HALError as e:
        rep.available, rep.reasons = False, [str(e)]
        return rep
    rep.capabilities = caps.to_dict()
    rep.emulated = rep.emulated or caps.emulated
    for i, case in enumerate(cases):
        if progress:
            progress(name, i, len(cases), case)
        rep.outcomes.append(run_case(backend, case))
    if progress:
        progress(name, len(cases), len(cases), None)  # type: ignore[arg-type]
    return rep


def _cell(outs: list[Outcome]) -> str:
    n_fail = sum(o.status == "FAIL" for o in outs)
    n_pass = sum(o.status == "pass" for o in outs)
    n_skip = sum(o.status == "skip" for o in outs)
    ratios = [o.ratio for o in outs if o.status != "skip" and o.ratio is not None]
    worst = f" r{max(ratios):.2f}" if ratios and max(ratios) != float("inf") else ""
    if n_fail:
        return f"FAIL {n_fail}/{n_fail + n_pass}"
    if n_pass:
        return f"pass {n_pass}{worst}" + (f" +{n_skip}s" if n_skip else "")
    return f"skip {n_skip}" if n_skip else "-"


def print_matrix(reports: list[BackendReport], families: list[str], level: str, out: TextIO | None = None) -> None:
    """The backends x families matrix, then every FAIL and every skip reason."""
    out = out or sys.stdout
    head = ["backend"] + families
    rows = []
    for r in reports:
        label = r.name + (" (emulated)" if r.emulated else "")
        if not r.available:
            rows.append([label] + ["skip"] * len(families))
            continue
        fam = r.families()
        rows.append([label] + [_cell(fam.get(f, [])) for f in families])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print(f"hal conformance, level {level}: backends x families "
          f"(pass N rX: N cases passed, worst error X times its tolerance; +Ns: N skipped)", file=out)
    for line in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip(), file=out)
    for r in reports:
        if not r.available:
            print(f"\n{r.name}: not run: " + "; ".join(r.reasons), file=out)
            continue
        fails = [o for o in r.outcomes if o.status == "FAIL"]
        for o in fails:
            print(f"\nFAIL {r.name} {o.family}/{o.case}: {o.message}", file=out)
        skips: dict[str, int] = {}
        for o in r.outcomes:
            if o.status == "skip":
                skips[f"{o.family}: {o.message}"] = skips.get(f"{o.family}: {o.message}", 0) + 1
        for reason, n in sorted(skips.items()):
            print(f"skip {r.name} ({n} case{'s' if n > 1 else ''}) {reason}", file=out)
    errs = _max_errors(reports)
    if errs:
        print("\nmax abs error by dtype (all passing comparisons):", file=out)
        for name, by_dtype in errs.items():
            print(f"  {name}: " + ", ".join(f"{dt} {e:.2g}" for dt, e in sorted(by_dtype.items())), file=out)
    _print_reported(reports, out)


def reported_table(report: BackendReport) -> dict[str, dict[str, float]]:
    """{family/row: {name: worst value over the row's cases}} of the numbers cases report (``Reported``)."""
    table: dict[str, dict[str, float]] = {}
    for o in report.outcomes:
        if not o.info:
            continue
        row = table.setdefault(f"{o.family}/{o.info_row or o.case}", {})
        for name, value in o.info.items():
            pick = min if name.endswith("agreement") else max
            row[name] = pick(row[name], value) if name in row else value
    return table


def _print_reported(reports: list[BackendReport], out: TextIO) -> None:
    for r in reports:
        table = reported_table(r)
        if not table:
            continue
        names = list(dict.fromkeys(n for row in table.values() for n in row))
        head = [f"{r.name}: reported, not gated"] + names
        rows = [[label] + [f"{row[n]:.4g}" if n in row else "-" for n in names] for label, row in table.items()]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        print("", file=out)
        for line in [head] + rows:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=out)


def _max_errors(reports: list[BackendReport]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in reports:
        for o in r.outcomes:
            if o.status != "pass" or o.err is None:
                continue
            dt = next((p for p in o.case.split("/") if p in ("fp32", "fp16", "bf16")), None)
            if dt:
                d = out.setdefault(r.name, {})
                d[dt] = max(d.get(dt, 0.0), o.err)
    return out


def write_report(path: str, reports: list[BackendReport], families: list[str], level: str,
                 seconds: float) -> None:
    import hal

    def clean(x: Any) -> Any:
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    doc = {
        "hal_version": hal.__version__, "spec_version": SPEC_VERSION, "level": level,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "hal_env": {k: str(config.get(k)) for k in config.KNOBS},
        "seconds": round(seconds, 1), "families": families,
        "passed": not any(r.failed for r in reports),
        "backends": [clean(asdict(r)) for r in reports],
        "reported": {r.name: clean(reported_table(r)) for r in reports},
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def families_of(cases: Iterable[Case]) -> list[str]:
    seen: list[str] = []
    for c in cases:
        if c.family not in seen:
            seen.append(c.family)
    return seen
