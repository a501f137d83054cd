"""pytest entry point of the conformance suite:

    HAL_BACKEND=rocm pytest --pyargs hal.conformance          # level from HAL_CONFORMANCE_LEVEL

runs the same cases as ``hal conformance --backend rocm`` on the backend that ``HAL_BACKEND``
selects: undeclared cases are skipped with their reasons, declared ones that do not hold fail.
"""

from __future__ import annotations

import pytest

import hal
from hal import config
from hal.conformance import Case, cases_for_level
from hal.conformance.runner import run_case

_CASES = cases_for_level(str(config.get("HAL_CONFORMANCE_LEVEL")))


@pytest.fixture(scope="session")
def hal_backend() -> hal.Backend:
    return hal.get_backend()  # an explicitly named backend that is unavailable raises here


@pytest.mark.parametrize("case", _CASES, ids=[c.id for c in _CASES])
def test_conformance(hal_backend: hal.Backend, case: Case) -> None:
    outcome = run_case(hal_backend, case)
    if outcome.status == "skip":
        pytest.skip(f"{hal_backend.name}: {outcome.message}")
    assert outcome.status == "pass", f"{hal_backend.name} {case.id}: {outcome.message}"
