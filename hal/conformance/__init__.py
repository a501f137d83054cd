"""hal's conformance suite: one set of named scenarios and properties that every backend,
in-tree or third-party, is held to (SPEC section 5).

    hal conformance [--backend NAME ... | --all] [--level quick|full] [--report FILE.json]
    HAL_BACKEND=NAME pytest --pyargs hal.conformance

Cases whose requirements a backend does not declare are skipped with the reasons; declared
ones that do not hold FAIL. Families: dense, paged, options, merge, gqa, batch, kv-cache,
quant, capabilities, mla, rope.
"""

from __future__ import annotations

from hal.conformance.case import LEVELS, Case, CheckFailed

__all__ = ["Case", "CheckFailed", "LEVELS", "all_cases", "cases_for_level"]


def all_cases() -> list[Case]:
    """Every case of every family, in family order."""
    from hal.conformance import attention_cases, cache_cases, mla_cases, property_cases, quant_cases, rope_cases

    cases: list[Case] = []
    for make in (attention_cases.dense_cases, attention_cases.paged_cases, attention_cases.option_cases,
                 property_cases.merge_cases, property_cases.gqa_cases, property_cases.batch_cases,
                 cache_cases.kv_cache_cases, quant_cases.quant_cases, cache_cases.capability_cases,
                 mla_cases.mla_cases, rope_cases.rope_cases):
        cases.extend(make())
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "conformance case ids must be unique"
    return cases


def cases_for_level(level: str) -> list[Case]:
    """The cases of ``level``: quick is a subset of full."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return [c for c in all_cases() if level == "full" or c.level == "quick"]
