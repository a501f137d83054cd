"""KV capacity (hal.capacity, ``hal capacity``): the 93.3% claim and the batch comparison of the facts
file (§2.1 and §3.3), the TP model, input checks and the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import hal
from hal.capacity import capacity, format_report, parse_memory
from hal.cli import main

GB, GIB = 10**9, 2**30

# facts §3.3: 8 GPUs, V2 with FP8 weights and 6-bit KV, Llama-3-70B with BF16 weights and KV
NODE = dict(num_gpus=8, tp=8, context=1024)
V2 = dict(bits=6, weight_dtype="fp8")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAL_")}
    return subprocess.run([sys.executable, "-m", "hal", "capacity", *args], capture_output=True, text=True,
                          timeout=300, env=env)


# ---- memory strings ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [("80GiB", 80 * GIB), ("80GB", 80 * GB), ("640GB", 640 * GB),
                                        ("80 gib", 80 * GIB), ("1.5TB", 1_500 * GB), ("512MiB", 512 * 2**20),
                                        (12345, 12345)])
def test_parse_memory(text: str | int, want: int) -> None:
    assert parse_memory(text) == want


@pytest.mark.parametrize("bad", ["80", "eighty GB", "80XB", "", "GB", "-80GB", "0GB", "80 GB GB", 0, -1, 80.0,
                                 None, True])
def test_parse_memory_rejects_garbage_naming_the_option(bad: object) -> None:
    with pytest.raises(hal.InvalidInput, match="--memory"):
        parse_memory(bad)  # type: ignore[arg-type]


# ---- the 93.3% claim (facts §2.1, C5-C7) -------------------------------------------------------
def test_93_3_percent_from_the_papers_6_bits() -> None:
    r = capacity("deepseek-v2", bits=6, vs="deepseek-67b")
    assert (r.kv_bytes_per_token, r.baseline.kv_bytes_per_token) == (25_920, 389_120)  # type: ignore[union-attr]
    assert abs(r.kv_reduction - 0.933388) < 1e-6  # type: ignore[operator]
    assert f"{r.kv_reduction:.1%}" == "93.3%"
    assert "93.3% (1 - 25,920 / 389,120 = 0.933388)" in format_report(r)


def test_93_3_percent_from_hals_int6_layout() -> None:
    r = capacity("deepseek-v2", kv_dtype="int6", vs="deepseek-67b")
    assert r.kv_bytes_per_token == 26_040  # 60 x 434: 432 B of packed values + a 2 B scale per row
    assert abs(r.kv_reduction - (1 - 26_040 / 389_120)) < 1e-12  # type: ignore[operator]
    assert f"{r.kv_reduction:.1%}" == "93.3%"


@pytest.mark.parametrize("kw, want", [(dict(kv_dtype="auto"), 0.822), (dict(kv_dtype="bf16"), 0.822),
                                      (dict(bits=8), 0.911), (dict(bits=4), 0.956)])
def test_reduction_needs_the_6_bit_kv(kw: dict, want: float) -> None:
    # facts §2.1: V2 in BF16 gives 82.2%, FP8 91.1%, 4-bit 95.6%
    assert round(capacity("deepseek-v2", vs="deepseek-67b", **kw).kv_reduction, 3) == want  # type: ignore[arg-type]


def test_reduction_against_llama_3_70b() -> None:
    assert round(capacity("deepseek-v2", bits=6, vs="llama-3-70b").kv_reduction, 3) == 0.921  # type: ignore[arg-type]


# ---- the batch comparison (facts §3.3) ---------------------------------------------------------
def test_16k_vs_1_5k_sequences_without_replication() -> None:
    r = capacity("deepseek-v2", memory="80GB", vs="llama-3-70b", **V2, **NODE)
    b = r.baseline
    assert b is not None
    # (8 x 80e9 - 236e9) / (25,920 x 1024) = 15,221.2
    assert r.sequences_without_replication == 15_221
    # (8 x 80e9 - 141.1e9) / (327,680 x 1024) = 1,486.8 (facts: 1,487 from 141.2 GB, rounded)
    assert b.sequences == b.sequences_without_replication == 1_486
    assert r.sequences_without_replication > 10 * b.sequences
    # the same node as one 640 GB pool gives the same numbers
    pool = capacity("deepseek-v2", memory="640GB", context=1024, vs="llama-3-70b", **V2)
    assert (pool.sequences, pool.baseline.sequences) == (15_221, 1_486)  # type: ignore[union-attr]


def test_tp8_replication_of_the_latent_erases_most_of_the_gap() -> None:
    r = capacity("deepseek-v2", memory="80GB", vs="llama-3-70b", **V2, **NODE)
    b = r.baseline
    assert b is not None
    assert (r.kv_copies, b.kv_copies) == (8, 1)
    assert r.kv_bytes_per_token_per_gpu == 25_920 and b.kv_bytes_per_token_per_gpu == 327_680 // 8
    # facts: (80e9 - 236e9/8) / 25,920 = 1.95 M tokens = 1.9K sequences of 1K
    assert r.tokens_per_group == 1_948_302 and r.sequences == 1_902
    # the ratio drops by the replication factor: V2's tokens are exactly 8x fewer, Llama's unchanged
    unrep = capacity("deepseek-v2", memory="640GB", context=1024, **V2)
    assert unrep.tokens_per_group // 8 == r.tokens_per_group
    assert r.sequences / b.sequences < 1.5


@pytest.mark.parametrize("memory, context, v2, llama", [("80GB", 2048, 7_610, 743), ("80GB", 4096, 3_805, 371),
                                                        ("80GiB", 1024, 16_999, 1_627)])
def test_facts_concurrency_table(memory: str, context: int, v2: int, llama: int) -> None:
    # facts §3.3 (which round 7,610.6 to 7,611 and 371.7 to 372; hal floors whole sequences)
    r = capacity("deepseek-v2", memory=memory, num_gpus=8, tp=8, context=context, vs="llama-3-70b", **V2)
    assert (r.sequences_without_replication, r.baseline.sequences) == (v2, llama)  # type: ignore[union-attr]


def test_equal_precision_gap_is_about_4_5x() -> None:
    r = capacity("deepseek-v2", memory="80GB", vs="llama-3-70b", vs_kv_dtype="fp8", vs_weight_dtype="fp8",
                 **V2, **NODE)
    assert r.baseline.sequences == 3_394  # type: ignore[union-attr]
    assert 4.4 < r.sequences_without_replication / r.baseline.sequences < 4.6  # type: ignore[union-attr]


# ---- the TP model ------------------------------------------------------------------------------
def test_gqa_heads_split_until_each_rank_holds_one() -> None:
    per_head = 32 * 2 * 128 * 2  # llama-3-8b: 32 layers, K+V of 128 bf16 values
    for tp, copies, heads_per_rank in ((1, 1, 8), (2, 1, 4), (8, 1, 1), (16, 2, 1), (32, 4, 1)):
        r = capacity("llama-3-8b", memory="80GB", num_gpus=32, tp=tp)
        assert r.kv_copies == copies and r.kv_bytes_per_token_per_gpu == heads_per_rank * per_head
        assert r.num_groups == 32 // tp
    r = capacity("baichuan-7b", num_gpus=8, tp=8)
    assert r.kv_copies == 1 and r.kv_bytes_per_token_per_gpu == 524_288 // 8
    assert capacity("deepseek-v2-lite", num_gpus=4, tp=4).kv_copies == 4


def test_tokens_sequences_reserve_and_groups() -> None:
    r = capacity("llama-3-8b", memory="80GB", num_gpus=8, tp=2, context=8192, reserve=0.1)
    weights = 8_030_261_248 * 2
    assert r.weight_bytes == weights and r.weight_bytes_per_gpu == weights // 2
    assert r.free_bytes_per_gpu == 72 * GB - weights // 2
    assert r.tokens_per_group == (72 * GB - weights // 2) // (131_072 // 2)
    assert r.num_groups == 4 and r.tokens == 4 * r.tokens_per_group
    assert r.sequences == r.tokens_per_group // 8192 * 4
    assert r.kv_reduction is None and r.baseline is None


def test_weights_that_do_not_fit_give_zero_and_say_so() -> None:
    r = capacity("deepseek-v2", memory="80GiB", num_gpus=8)
    assert r.free_bytes_per_gpu < 0 and r.tokens == 0 and r.sequences == 0
    assert "raise --tp" in format_report(r)


@pytest.mark.parametrize("kw, match", [
    (dict(num_gpus=8, tp=3), "multiple of tp"),
    (dict(num_gpus=6, tp=6), "attention heads"),
    (dict(tp=0), "tp must be"),
    (dict(context=0), "context"),
    (dict(reserve=1.0), "reserve"),
    (dict(bits=6, kv_dtype="int6"), "not both"),
    (dict(bits=0), "bits"),
    (dict(kv_dtype="int3"), "kv_dtype"),
    (dict(weight_dtype="int2"), "weight_dtype"),
    (dict(memory="lots"), "--memory"),
    (dict(vs="gpt-5"), "valid: "),
])
def test_bad_arguments_raise_invalid_input(kw: dict, match: str) -> None:
    with pytest.raises(hal.InvalidInput, match=match):
        capacity("llama-3-8b", **kw)


def test_gqa_kv_heads_must_split_evenly() -> None:
    odd = dataclasses.replace(hal.models.preset("llama-3-8b"), name="odd", num_key_value_heads=6)
    with pytest.raises(hal.InvalidInput, match="6 KV heads"):
        capacity(odd, num_gpus=4, tp=4)
    assert capacity(odd, num_gpus=2, tp=2).kv_copies == 1


def test_report_prints_its_assumptions() -> None:
    text = format_report(capacity("deepseek-v2", memory="80GB", vs="llama-3-70b", **V2, **NODE))
    for want in ("assumptions:", "8 x 80GB", "TP8", "1,024 tokens per sequence", "weights fp8", "weights bf16",
                 "6 bits/element", "0% reserved", "replicated embeddings ignored", "15,221", "1,902", "1,486",
                 "92.1%", "if no KV were replicated"):
        assert want in text, want


# ---- the command line --------------------------------------------------------------------------
def test_cli_reproduces_93_3_percent_both_ways() -> None:
    paper = _run("--model", "deepseek-v2", "--bits", "6", "--vs", "deepseek-67b")
    assert paper.returncode == 0, paper.stderr
    assert "KV reduction deepseek-v2 vs deepseek-67b: 93.3% (1 - 25,920 / 389,120 = 0.933388)" in paper.stdout
    layout = _run("--model", "deepseek-v2", "--kv-dtype", "int6", "--vs", "deepseek-67b", "--json")
    assert layout.returncode == 0, layout.stderr
    doc = json.loads(layout.stdout)
    assert doc["kv_bytes_per_token"] == 26_040 and doc["baseline"]["kv_bytes_per_token"] == 389_120
    assert round(doc["kv_reduction"], 3) == 0.933


def test_cli_batch_comparison() -> None:
    p = _run("--model", "deepseek-v2", "--bits", "6", "--weights", "fp8", "--memory", "80GB", "--gpus", "8",
             "--tp", "8", "--context", "1024", "--vs", "llama-3-70b")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any(line.split()[-2:] == ["1,902", "1,486"] for line in lines if line.startswith("sequences of"))
    assert any(line.split()[-2:] == ["15,221", "1,486"] for line in lines if "no KV were replicated" in line)
    assert p.stdout.index("assumptions:") < p.stdout.index("KV bytes per token")


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "--model", "llama-3-8b"]) == 0
    capsys.readouterr()
    assert main(["capacity", "--model", "llama-4"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'llama-4'" in err and "deepseek-v2-lite" in err
    assert main(["capacity", "--model", "llama-3-8b", "--memory", "80"]) == 2
    assert "--memory" in capsys.readouterr().err
    assert main(["capacity", "--model", "llama-3-8b", "--vs", "nope"]) == 2
    with pytest.raises(SystemExit) as e:  # argparse: --kv-dtype and --bits are exclusive
        main(["capacity", "--model", "llama-3-8b", "--kv-dtype", "int6", "--bits", "6"])
    assert e.value.code == 2
    unknown = _run("--model", "nope")
    assert unknown.returncode == 2 and "valid: baichuan-7b" in unknown.stderr and unknown.stdout == ""


def test_cli_json_is_parseable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "--model", "deepseek-v2-lite", "--kv-dtype", "fp8", "--gpus", "2", "--tp", "2",
                 "--reserve", "0.1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "deepseek-v2-lite" and doc["kv_bytes_per_token"] == 15_552
    assert doc["kv_copies"] == 2 and doc["baseline"] is None and doc["assumptions"]
    assert doc["tokens"] == doc["tokens_per_group"] * doc["num_groups"]
