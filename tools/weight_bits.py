"""How coarse can the softmax weights of int8 P.V be? A float64 model of the decode kernel's P.V on
int8 value rows, its weights (p x the row's scale) rounded per tile of 32 keys against the tile's
largest to 8 bits (0..255, what VPDPBUSD would take, halving the products) or to 15 bits (the
kernel's int16 weights), against the conformance suite's rule for bf16 outputs: at most twice the
error of a same-dtype reference (values and P rounded to bf16, output rounded), capped at 3e-2.

    python tools/weight_bits.py

Queries and keys are unit normal (128 dims, scores scaled by 1/sqrt(128)); "peak" adds to the first
key's score, as an attention sink does. Prints the largest output error of 512 query rows.
"""

from __future__ import annotations

import torch

TILE = 32


def errors(n: int, peak: float, bits: int, rows: int = 512, d: int = 128) -> tuple[float, float]:
    """(max error of the kernel's model with weights of ``bits``, max error of the bf16 reference)."""
    gen = torch.Generator().manual_seed(n * 100 + int(peak))
    q, k, v = (torch.randn(m, d, generator=gen, dtype=torch.float64) for m in (rows, n, n))
    sv = v.abs().amax(1) / 127  # int8 rows: one scale per row, as hal.kv_formats stores them
    vi = torch.round(v / sv[:, None])
    vq = vi * sv[:, None]  # the cache's exact values
    s = q @ k.T / d**0.5
    s[:, 0] += peak
    p = torch.exp(s - s.amax(1, keepdim=True))
    golden = (p @ vq) / p.sum(1, keepdim=True)
    w = p * sv[None, :]
    top = 2**bits - 1
    out = torch.zeros(rows, d, dtype=torch.float64)
    for t0 in range(0, n, TILE):
        step = w[:, t0:t0 + TILE].amax(1, keepdim=True) / top
        out += step * (torch.round(w[:, t0:t0 + TILE] / step) @ vi[t0:t0 + TILE])
    out /= p.sum(1, keepdim=True)
    ref = ((p.bfloat16().double() @ vq.bfloat16().double()) / p.sum(1, keepdim=True)).bfloat16().double()
    return float((out - golden).abs().max()), float((ref - golden).abs().max())


def main() -> None:
    print(f"{'keys':>5} {'peak':>4}  {'8-bit':>8} {'15-bit':>8}  {'tolerance':>9}  8-bit / tolerance")
    for n in (16, 100, 1024, 4096):
        for peak in (0.0, 4.0, 8.0, 12.0):
            e8, ref = errors(n, peak, 8)
            e15, _ = errors(n, peak, 15)
            tol = min(3e-2, max(2 * ref, 2.0**-7))
            print(f"{n:5d} {peak:4.0f}  {e8:8.2e} {e15:8.2e}  {tol:9.2e}  {e8 / tol:.2f}")


if __name__ == "__main__":
    main()
