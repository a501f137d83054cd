"""Families ``dense``, ``paged`` and ``options``: attention values against the float64 golden on
named model shapes and generated ragged batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from hal.conformance.case import Case, compare_paged, dense_check, paged_check, requires_for
from hal.conformance.scenarios import BATCHES, HEAD_DIM_SHAPES, MODELS, Batch, Shape, generator, make_paged, randn
from hal.conformance.tolerances import Comparison

DTYPES_QUICK = ("bf16", "fp32")
DTYPES_FULL = ("fp32", "fp16", "bf16")
BLOCK_SIZES = (1, 16, 32)

# dense sequences whose early queries see no key (causal with more queries than keys) and empty ones
NO_KEY_ROWS = Batch("no-key-rows", ((5, 2), (3, 0), (2, 6), (0, 0), (4, 4)))


def _model(name: str) -> Shape:
    return next(s for s in MODELS + HEAD_DIM_SHAPES if s.name == name)


def _causal_feature(causal: bool) -> str:
    return "causal" if causal else "non_causal"


def dense_cases() -> Iterator[Case]:
    for shape in MODELS:
        for dtype in DTYPES_FULL:
            for batch in ("mixed", "prefill", "long"):
                for causal in (True, False):
                    quick = (shape.name in ("llama-3-8b", "starcoder-mqa") and dtype in DTYPES_QUICK
                             and batch == "mixed")
                    name = f"{shape.name}/{dtype}/{batch}/{_causal_feature(causal)}"
                    yield Case("dense", name, "quick" if quick else "full",
                               requires_for(shape, dtype, ["dense", _causal_feature(causal)]),
                               partial(_dense, name, shape, BATCHES[batch], dtype, {"causal": causal}))
    for shape in HEAD_DIM_SHAPES:
        for dtype in DTYPES_FULL:
            quick = dtype == "bf16"
            name = f"{shape.name}/{dtype}/mixed/causal"
            yield Case("dense", name, "quick" if quick else "full",
                       requires_for(shape, dtype, ["dense", "causal"]),
                       partial(_dense, name, shape, BATCHES["mixed"], dtype, {"causal": True}))
    shape = _model("llama-3-8b")
    for dtype in DTYPES_FULL:
        name = f"{shape.name}/{dtype}/no-key-rows/causal"
        yield Case("dense", name, "quick", requires_for(shape, dtype, ["dense", "causal"]),
                   partial(_dense, name, shape, NO_KEY_ROWS, dtype, {"causal": True}))


def _dense(name: str, shape: Shape, batch: Batch, dtype: str, opts: dict[str, Any], backend: Any) -> list:
    return dense_check(backend, "dense/" + name, shape, batch, dtype, opts)


def _paged(name: str, shape: Shape, batch: Batch, dtype: str, bs: int, opts: dict[str, Any], backend: Any) -> list:
    return paged_check(backend, "paged/" + name, shape, batch, dtype, bs, opts)


def _paged_shared_blocks(name: str, shape: Shape, dtype: str, bs: int, backend: Any) -> list[Comparison]:
    """Block tables that share physical blocks: every sequence's whole blocks but its last are drawn
    from one pool of the batch's whole blocks, so that sequences share blocks (as forked sequences
    and prefix caches do), and a sequence of three or more blocks reads its first block twice. The
    sequences' keys are what their tables address, against the golden on those keys."""
    batch = BATCHES["mixed"]
    setup = make_paged(backend, "paged/" + name, shape, batch, dtype, bs)
    rows_k, rows_v, start = {}, {}, 0  # block id -> its bs tokens (whole blocks only)
    for blocks, kv in zip(setup.blocks, setup.seq_lens):
        for i, blk in enumerate(blocks):
            if (i + 1) * bs <= kv:
                rows_k[blk] = setup.k[start + i * bs:start + (i + 1) * bs]
                rows_v[blk] = setup.v[start + i * bs:start + (i + 1) * bs]
        start += kv
    pool = sorted(rows_k)
    assert len(pool) >= 2, "the batch must have whole blocks to share"
    table = setup.block_table.clone()
    ks, vs, turn = [], [], 0
    for b, (blocks, kv) in enumerate(zip(setup.blocks, setup.seq_lens)):
        ids = list(blocks)
        for i in range(len(ids) - 1):  # every whole block but the last: from the pool, in turn
            ids[i] = pool[turn % len(pool)]
            turn += 1
        if len(ids) >= 3:
            ids[1] = ids[0]  # the same block twice in one sequence
        table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        own = dict(zip(blocks, range(len(blocks))))  # its own last block: partial, from setup.k
        seq_start = sum(setup.seq_lens[:b])
        parts_k = [rows_k[i] if i in rows_k else setup.k[seq_start + own[i] * bs:seq_start + kv] for i in ids]
        parts_v = [rows_v[i] if i in rows_v else setup.v[seq_start + own[i] * bs:seq_start + kv] for i in ids]
        ks.append(torch.cat(parts_k)[:kv] if ids else setup.k[:0])
        vs.append(torch.cat(parts_v)[:kv] if ids else setup.v[:0])
    shared = replace(setup, block_table=table, k=torch.cat(ks), v=torch.cat(vs))  # cu_k: the lengths are the same
    q = randn(generator("paged/" + name + "/q"), batch.cu_q[-1], shape.hq, shape.d, dtype=dtype)
    return compare_paged(backend, shared, q, dtype, {})


def paged_cases() -> Iterator[Case]:
    for shape in MODELS:
        for dtype in DTYPES_FULL:
            for bs in BLOCK_SIZES:
                for batch in ("mixed", "decode", "long"):
                    quick = ((shape.name == "llama-3-8b" and dtype == "bf16" and batch == "mixed")
                             or (shape.name == "llama-3-70b" and dtype == "fp32" and bs == 16 and batch == "decode")
                             or (shape.name == "baichuan-7b" and dtype == "fp16" and bs == 32 and batch == "mixed"))
                    name = f"{shape.name}/{dtype}/bs{bs}/{batch}"
                    yield Case("paged", name, "quick" if quick else "full",
                               requires_for(shape, dtype, ["paged", "causal"], block_size=bs),
                               partial(_paged, name, shape, BATCHES[batch], dtype, bs, {}))
    for shape in HEAD_DIM_SHAPES:
        for dtype in DTYPES_FULL:
            name = f"{shape.name}/{dtype}/bs16/mixed"
            yield Case("paged", name, "quick" if dtype == "bf16" else "full",
                       requires_for(shape, dtype, ["paged", "causal"], block_size=16),
                       partial(_paged, name, shape, BATCHES["mixed"], dtype, 16, {}))
    shape = _model("llama-3-8b")
    for dtype in DTYPES_FULL:
        for bs in (1, 16):
            name = f"{shape.name}/{dtype}/bs{bs}/shared_blocks"
            yield Case("paged", name, "quick" if dtype == "bf16" and bs == 16 else "full",
                       requires_for(shape, dtype, ["paged", "causal"], block_size=bs),
                       partial(_paged_shared_blocks, name, shape, dtype, bs))
    for dtype in DTYPES_FULL:
        name = f"{shape.name}/{dtype}/bs16/mixed/non_causal"
        yield Case("paged", name, "quick" if dtype == "bf16" else "full",
                   requires_for(shape, dtype, ["paged", "non_causal"], block_size=16),
                   partial(_paged, name, shape, BATCHES["mixed"], dtype, 16, {"causal": False}))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes (Press et al., 2022): a geometric sequence from 2^(-8/n)."""
    n = 2 ** math.floor(math.log2(num_heads))
    base = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    extra = [2.0 ** (-4.0 * (2 * i + 1) / n) for i in range(num_heads - n)]
    return torch.tensor(base + extra, dtype=torch.float32)


def _option_sets(hq: int) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """name -> (options, features). Values are chosen so that ignoring the option changes the output
    far beyond any tolerance (softcap bites on scores scaled to std ~5)."""
    sinks = (torch.linspace(-2.0, 3.0, hq)).float()
    return {
        "window0": ({"causal": True, "window_left": 0}, ["causal", "window"]),
        "window5": ({"causal": True, "window_left": 5}, ["causal", "window"]),
        "window40-noncausal": ({"causal": False, "window_left": 40}, ["non_causal", "window"]),
        "softcap": ({"causal": True, "scale": 0.5, "softcap": 5.0}, ["causal", "softcap"]),
        "alibi": ({"causal": True, "alibi_slopes": alibi_slopes(hq)}, ["causal", "alibi"]),
        "sinks": ({"causal": True, "sinks": sinks}, ["causal", "sinks"]),
        "all": ({"causal": True, "window_left": 20, "scale": 0.5, "softcap": 5.0,
                 "alibi_slopes": alibi_slopes(hq), "sinks": sinks},
                ["causal", "window", "softcap", "alibi", "sinks"]),
    }


def option_cases() -> Iterator[Case]:
    shape = _model("llama-3-8b")
    for opt, (opts, feats) in _option_sets(shape.hq).items():
        for dtype in DTYPES_FULL:
            quick = dtype == "bf16"
            name = f"{opt}/{shape.name}/{dtype}/dense/mixed"
            yield Case("options", name, "quick" if quick else "full", requires_for(shape, dtype, ["dense", *feats]),
                       partial(_dense, "options/" + name, shape, BATCHES["mixed"], dtype, opts))
            name = f"{opt}/{shape.name}/{dtype}/paged-bs16/mixed"
            yield Case("options", name, "quick" if quick else "full",
                       requires_for(shape, dtype, ["paged", *feats], block_size=16),
                       partial(_paged, "options/" + name, shape, BATCHES["mixed"], dtype, 16, opts))
        name = f"{opt}/{shape.name}/fp32/paged-bs1/long"
        yield Case("options", name, "full", requires_for(shape, "fp32", ["paged", *feats], block_size=1),
                   partial(_paged, "options/" + name, shape, BATCHES["long"], "fp32", 1, opts))
