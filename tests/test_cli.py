"""The hal command: info (text and JSON) and conformance (matrix, report, exit codes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hal.cli import main


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, **env)
    e.pop("HAL_BACKEND", None) if "HAL_BACKEND" not in env else None
    return subprocess.run([sys.executable, "-m", "hal", *args], env=e, capture_output=True, text=True, timeout=600)


def test_info_lists_every_backend_with_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu: available" in out
    for name in ("cuda", "rocm", "tpu"):
        assert f"{name}: unavailable" in out
    assert "why not:  not implemented yet" in out
    assert "features " in out and "head_dims " in out


def test_info_json_is_machine_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {b["name"]: b for b in doc["backends"]}
    assert by_name["cpu"]["available"] is True
    assert "paged" in by_name["cpu"]["capabilities"]["features"]
    assert by_name["cuda"]["available"] is False and by_name["cuda"]["reasons"]
    assert by_name["cuda"]["capabilities"] is None


def test_conformance_writes_report_and_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    rc = main(["conformance", "--backend", "cpu", "--family", "kv-cache,batch", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.splitlines()[1].split() == ["backend", "batch", "kv-cache"]
    doc = json.loads(report.read_text())
    assert doc["passed"] is True and doc["level"] == "quick" and doc["families"] == ["batch", "kv-cache"]
    cpu = doc["backends"][0]
    assert cpu["name"] == "cpu" and cpu["available"] and not cpu["emulated"]
    assert {o["status"] for o in cpu["outcomes"]} == {"pass"}
    assert all(o["family"] in ("batch", "kv-cache") for o in cpu["outcomes"])


def test_conformance_all_shows_unavailable_backends_as_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["conformance", "--all", "--family", "kv-cache"])
    out = capsys.readouterr().out
    assert rc == 0  # unavailable backends are not failures under --all
    assert "cuda: not run: no NVIDIA GPU found" in out
    assert "cpu " in out and "pass 6" in out


def test_conformance_on_a_named_unavailable_backend_exits_nonzero() -> None:
    res = _run("conformance", "--backend", "cuda", "--family", "kv-cache")
    assert res.returncode == 1
    assert "cuda: not run" in res.stdout and "HAL_EMULATE=1" in res.stdout


def test_conformance_rejects_unknown_names() -> None:
    res = _run("conformance", "--backend", "nonsense")
    assert res.returncode == 2 and "unknown backend 'nonsense'" in res.stderr
    res = _run("conformance", "--family", "nope")
    assert res.returncode == 2 and "unknown family" in res.stderr


def test_conformance_progress_goes_to_stderr() -> None:
    res = _run("conformance", "--backend", "cpu", "--family", "batch")
    assert res.returncode == 0
    assert re.search(r"\[cpu\] 1/(\d+) batch/", res.stderr) and re.search(r"\[cpu\] (\d+)/\1 done", res.stderr)
    assert "[cpu]" not in res.stdout


def test_hal_backend_env_selects_the_backend_for_conformance() -> None:
    res = _run("conformance", "--family", "batch", HAL_BACKEND="cuda")
    assert res.returncode != 0
    assert "BackendUnavailable" in res.stderr and "HAL_EMULATE=1" in res.stderr
