"""Family ``rope``: ``hal.rope`` and ``hal.RopeSpec`` against the papers' formulas and figures.

RoPE runs in ``hal`` itself (plain torch, no backend kernel), so these cases require nothing of a
backend and hold on every one:

- reference: ``hal.rope`` against ``hal.reference.rope_reference`` (complex multiplication, float64)
  and ``RopeSpec.inv_freq`` against ``rope_inv_freq_reference`` (pair by pair) for every scaling
  (none, linear, static NTK, YaRN, llama3) and both pairings;
- properties: norms are kept (times YaRN's cos/sin factor), ``q_m . k_n`` depends only on ``m - n``;
  partial rotary leaves the last channels alone; "gptj" pairs channels (2i, 2i+1), "neox" (i, i+d/2);
- figures (facts §5.2, §7 C9-C11, C15): the Llama-3.1 band split 29 / 6 / 29 (head dim 128, theta
  5e5); DeepSeek-V2's YaRN correction range 10..23, mscale 1.260804, softmax scale 0.114721, cos/sin
  factor 1.0 and inv_freq values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import torch

from hal.backend import Backend
from hal.conformance.case import Case, CheckFailed
from hal.conformance.scenarios import generator, randn
from hal.conformance.tolerances import Comparison, compare
from hal.dtypes import DTYPES
from hal.reference import rope_inv_freq_reference, rope_reference
from hal.rope import RopeSpec

# name -> (dim, theta, native style, scaling keywords)
SPECS: dict[str, tuple[int, float, str, dict]] = {
    "llama-3-8b": (128, 500000.0, "neox", {}),
    "linear-x4": (128, 10000.0, "neox", {"scaling": "linear", "factor": 4.0}),
    "ntk-x4": (128, 10000.0, "neox", {"scaling": "ntk", "factor": 4.0}),
    "llama-3.1": (128, 500000.0, "neox", {"scaling": "llama3", "factor": 8.0, "original_max_position": 8192}),
    "yarn-x4": (128, 1000000.0, "neox", {"scaling": "yarn", "factor": 4.0, "original_max_position": 32768}),
    "deepseek-v2": (64, 10000.0, "gptj", {"scaling": "yarn", "factor": 40.0, "original_max_position": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                          "mscale_all_dim": 0.707}),
}


def _spec(name: str, style: str | None = None) -> RopeSpec:
    dim, theta, native, kw = SPECS[name]
    return RopeSpec(dim, theta, style=style or native, **kw)


def _figure(what: str, got: float, want: float, tol: float) -> Comparison:
    c = Comparison(what, abs(got - want), tol, 0.0)
    if not c.ok:
        raise CheckFailed(f"{what}: got {got!r}, expected {want!r} (within {tol:g})")
    return c


def _positions(gen: torch.Generator, n: int) -> torch.Tensor:
    # short, trained-range and far (YaRN's 160K) positions
    return torch.cat([torch.arange(4), torch.randint(0, 200_000, (n - 4,), generator=gen)]).to(torch.int64)


def _reference(name: str, spec_name: str, style: str, dtype: str, backend: Backend) -> list[Comparison]:
    import hal

    spec = _spec(spec_name, style)
    want_freq = rope_inv_freq_reference(spec)
    freq_err = float(((spec.inv_freq() - want_freq).abs() / want_freq).max())
    comps = [_figure("inv_freq relative error", freq_err, 0.0, 1e-12)]
    gen = generator(name)
    x = randn(gen, 33, 4, spec.dim, dtype=dtype)
    pos = _positions(gen, 33)
    dev = backend.default_device()
    out = hal.rope(x.to(dev), pos.to(dev), spec).cpu()
    if out.dtype != x.dtype or out.shape != x.shape:
        raise CheckFailed(f"hal.rope returned {out.dtype} {list(out.shape)} for {x.dtype} {list(x.shape)}")
    golden = rope_reference(x, pos, want_freq, style=style, attention_factor=spec.attention_factor)
    comps.append(compare("rope", dtype, out, golden, golden.to(DTYPES[dtype])))
    return comps


def _norms_kept(name: str, spec_name: str, backend: Backend) -> list[Comparison]:
    """Each rotated pair keeps its length (times the cos/sin factor): float64 in, float64 out."""
    import hal

    spec = _spec(spec_name)
    gen = generator(name)
    x = torch.randn(64, 2, spec.dim, generator=gen, dtype=torch.float64)
    y = hal.rope(x, _positions(gen, 64), spec)

    def pair_norms(t: torch.Tensor) -> torch.Tensor:
        if spec.style == "neox":
            a, b = t[..., :spec.dim // 2], t[..., spec.dim // 2:]
        else:
            a, b = t[..., 0::2], t[..., 1::2]
        return torch.sqrt(a * a + b * b)

    err = float((pair_norms(y) - spec.attention_factor * pair_norms(x)).abs().max())
    return [_figure("pair norms kept", err, 0.0, 1e-12 * max(1.0, float(pair_norms(x).max())))]


def _relative(name: str, spec_name: str, backend: Backend) -> list[Comparison]:
    """q_m . k_n == q_(m+s) . k_(n+s) for every shift s; and it does change with m - n."""
    import hal

    spec = _spec(spec_name)
    gen = generator(name)
    q = torch.randn(1, 1, spec.dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, spec.dim, generator=gen, dtype=torch.float64)
    m = torch.randint(0, 100_000, (32,), generator=gen)
    n = torch.randint(0, 100_000, (32,), generator=gen)
    shift = torch.randint(-50_000, 50_000, (32,), generator=gen)
    shift = torch.maximum(shift, -torch.minimum(m, n))  # positions stay >= 0

    def dots(pm: torch.Tensor, pn: torch.Tensor) -> torch.Tensor:
        qm = hal.rope(q.expand(len(pm), 1, spec.dim), pm, spec)
        kn = hal.rope(k.expand(len(pn), 1, spec.dim), pn, spec)
        return (qm * kn).sum(-1).flatten()

    base = dots(m, n)
    moved = dots(m + shift, n + shift)
    # the angles themselves are float64 products of positions up to 1.5e5: ~1e-11 relative
    tol = 1e-9 * spec.dim * spec.attention_factor ** 2
    comps = [_figure("q_m.k_n - q_(m+s).k_(n+s)", float((base - moved).abs().max()), 0.0, tol)]
    if float(base.max() - base.min()) < 1e-3:
        raise CheckFailed("q_m . k_n does not depend on m - n at all: no rotation happened")
    return comps


def _partial_rotary(name: str, backend: Backend) -> list[Comparison]:
    """spec.dim 32 of D 64: the first 32 channels rotate as a 32-dim x would, the rest are untouched."""
    import hal

    spec = RopeSpec(32, 10000.0, style="neox")
    gen = generator(name)
    x = torch.randn(9, 3, 64, generator=gen)
    pos = torch.arange(9, dtype=torch.int32) * 7
    y = hal.rope(x, pos, spec)
    if not torch.equal(y[..., 32:], x[..., 32:]):
        raise CheckFailed("partial rotary changed channels past spec.dim")
    head = hal.rope(x[..., :32].contiguous(), pos, spec)
    return [_figure("rotated part vs a 32-dim rope", float((y[..., :32] - head).abs().max()), 0.0, 0.0)]


def _pairing(name: str, backend: Backend) -> list[Comparison]:
    """A unit vector on channel 0 turns into channel 1 under "gptj" and into channel dim/2 under "neox"."""
    import hal

    d, p = 8, 3
    x = torch.zeros(1, 1, d, dtype=torch.float64)
    x[..., 0] = 1.0
    pos = torch.tensor([p])
    c, s = math.cos(p * 1.0), math.sin(p * 1.0)  # pair 0 turns at inv_freq 1
    gptj = torch.zeros(d, dtype=torch.float64)
    gptj[0], gptj[1] = c, s
    neox = torch.zeros(d, dtype=torch.float64)
    neox[0], neox[d // 2] = c, s
    comps = []
    for style, want in (("gptj", gptj), ("neox", neox)):
        got = hal.rope(x, pos, RopeSpec(d, style=style))[0, 0]
        comps.append(_figure(f"{style} rotates channel 0 into its pair", float((got - want).abs().max()), 0.0, 1e-15))
    return comps


def _llama3_bands(name: str, backend: Backend) -> list[Comparison]:
    """Llama-3.1 (head dim 128, theta 5e5, factor 8, 1 / 4, 8192): 29 kept, 6 smoothed, 29 divided."""
    spec = _spec("llama-3.1")
    ratio = spec.inv_freq() / spec.base_inv_freq()
    kept = int((ratio == 1.0).sum())
    divided = int(torch.isclose(ratio, torch.full_like(ratio, 1 / 8), rtol=1e-14, atol=0).sum())
    smoothed = int(((ratio < 1.0) & (ratio > 1 / 8 * (1 + 1e-12))).sum())
    return [_figure("frequencies kept", kept, 29, 0), _figure("frequencies smoothed", smoothed, 6, 0),
            _figure("frequencies divided by 8", divided, 29, 0)]


def _deepseek_v2_yarn(name: str, backend: Backend) -> list[Comparison]:
    """facts §1.4, §5.2 item 3, C9-C11: the numbers DeepSeek-V2's YaRN must produce."""
    from hal.rope import yarn_mscale

    spec = _spec("deepseek-v2")
    low, high = spec.yarn_correction_range()
    comps = [_figure("correction range low", low, 10, 0), _figure("correction range high", high, 23, 0),
             _figure("mscale(40, 0.707)", yarn_mscale(40.0, 0.707), 1.260804, 5e-7),
             _figure("softmax scale 192^-0.5 * mscale^2", spec.softmax_scale(192), 0.114721, 5e-7),
             _figure("cos/sin factor", spec.attention_factor, 1.0, 0.0)]
    inv = spec.inv_freq()
    for i, want in ((0, 1.0), (10, 5.6234e-2), (16, 5.5000e-3), (23, 3.3338e-5), (31, 3.3338e-6)):
        comps.append(_figure(f"inv_freq[{i}] relative", float(inv[i]) / want - 1.0, 0.0, 5e-5))
    return comps


def rope_cases() -> Iterator[Case]:
    for spec_name, (_, _, native, _) in SPECS.items():
        for style in ("neox", "gptj"):
            for dtype in ("fp32", "bf16", "fp16"):
                quick = dtype == "fp32" or (dtype == "bf16" and style == native)
                name = f"reference/{spec_name}/{style}/{dtype}"
                yield Case("rope", name, "quick" if quick else "full", {},
                           partial(_reference, "rope/" + name, spec_name, style, dtype))
        yield Case("rope", f"norms-kept/{spec_name}", "quick", {},
                   partial(_norms_kept, f"rope/norms-kept/{spec_name}", spec_name))
        yield Case("rope", f"relative-position/{spec_name}", "quick", {},
                   partial(_relative, f"rope/relative-position/{spec_name}", spec_name))
    yield Case("rope", "partial-rotary", "quick", {}, partial(_partial_rotary, "rope/partial-rotary"))
    yield Case("rope", "gptj-vs-neox-pairing", "quick", {}, partial(_pairing, "rope/pairing"))
    yield Case("rope", "llama3-band-split-29-6-29", "quick", {}, partial(_llama3_bands, "rope/llama3"))
    yield Case("rope", "deepseek-v2-yarn-figures", "quick", {}, partial(_deepseek_v2_yarn, "rope/deepseek-v2"))
