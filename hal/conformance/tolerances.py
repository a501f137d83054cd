"""The one tolerance table of the conformance suite, and the comparison it drives.

A backend's output is compared with the float64 golden computed on the same dtype-rounded inputs.
Its allowance is relative to what the dtype itself costs: ``FACTOR`` times the error of a plain
same-dtype reference (q.k in the dtype, fp32 softmax, P rounded to the dtype, P.V in the dtype,
as a naive kernel would do), never less than a few ulps of the output's magnitude, and never more
than SPEC section 5's absolute ceilings. The same rule, with its own floor and ceiling, holds for
the LSE. No test loosens this table; a change here is a change of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tolerance", "TOLERANCES", "EPS", "Comparison", "compare"]

#: machine epsilon (spacing of numbers at 1) of each dtype
EPS = {"fp32": 2.0**-23, "fp16": 2.0**-10, "bf16": 2.0**-7}


@dataclass(frozen=True)
class Tolerance:
    factor: float  # allowed multiple of the same-dtype reference's max error
    floor_ulps: float  # at least this many eps, times max(1, max |golden|)
    ceiling: float  # SPEC section 5: absolute cap on any output error with unit-normal inputs
    lse_floor: float  # at least this much LSE error, times max(1, max |golden lse|)
    lse_ceiling: float  # SPEC section 5: absolute cap on any LSE error


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(factor=2.0, floor_ulps=32.0, ceiling=2e-4, lse_floor=2e-6, lse_ceiling=2e-3),
    "fp16": Tolerance(factor=2.0, floor_ulps=1.0, ceiling=4e-3, lse_floor=2e-5, lse_ceiling=2e-3),
    "bf16": Tolerance(factor=2.0, floor_ulps=1.0, ceiling=3e-2, lse_floor=2e-5, lse_ceiling=2e-3),
}


@dataclass(frozen=True)
class Comparison:
    what: str
    err: float  # max |backend - golden| (inf when the backend produced NaN/Inf where golden is finite)
    tol: float
    ref_err: float  # max |same-dtype reference - golden|

    @property
    def ok(self) -> bool:
        return self.err <= self.tol

    @property
    def ratio(self) -> float:
        return self.err / self.tol if self.tol > 0 else float("inf")

    def describe(self) -> str:
        return (f"{self.what}: max err {self.err:.3g} vs tol {self.tol:.3g} "
                f"(same-dtype reference err {self.ref_err:.3g})")


def _max_err(x: torch.Tensor, golden: torch.Tensor) -> float:
    """Max abs difference; -inf == -inf counts as equal; NaN or a wrong infinity counts as inf."""
    x = x.detach().to("cpu", torch.float64)
    g = golden.detach().to("cpu", torch.float64)
    if x.shape != g.shape:
        return float("inf")
    if x.numel() == 0:
        return 0.0
    same_inf = torch.isinf(x) & torch.isinf(g) & (torch.sign(x) == torch.sign(g))
    bad = (~torch.isfinite(x) | ~torch.isfinite(g)) & ~same_inf
    if bool(bad.any()):
        return float("inf")
    d = torch.where(same_inf, torch.zeros_like(x), (x - g).abs())
    return float(d.max())


def _finite_max(g: torch.Tensor) -> float:
    g = g.detach().double()
    fin = g[torch.isfinite(g)]
    return float(fin.abs().max()) if fin.numel() else 0.0


def compare(what: str, dtype: str, out: torch.Tensor, golden: torch.Tensor, ref: torch.Tensor | None,
            *, lse: bool = False) -> Comparison:
    """Compare ``out`` with ``golden`` under the table's rule for ``dtype`` (``lse=True``: the LSE rule).
    ``ref`` is the same-dtype reference's result (None: only the floor applies)."""
    t = TOLERANCES[dtype]
    ref_err = _max_err(ref, golden) if ref is not None else 0.0
    mag = max(1.0, _finite_max(golden))
    if lse:
        tol = min(t.lse_ceiling, max(t.factor * ref_err, t.lse_floor * mag))
    else:
        tol = min(t.ceiling, max(t.factor * ref_err, t.floor_ulps * EPS[dtype] * mag))
    return Comparison(what=what, err=_max_err(out, golden), tol=tol, ref_err=ref_err)
