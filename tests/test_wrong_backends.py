"""The conformance suite catches deliberately wrong third-party backends.

``tests/plugins`` is a package of cpu backends with one classic bug each, registered through
the ``hal.backends`` entry point exactly as a third-party backend would be. Here it is made
"installed" by a dist-info folder on PYTHONPATH; ``hal conformance`` must print FAIL in the
family that catches each bug and exit non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder holding the plugin's dist-info (entry points read from its pyproject.toml)."""
    root = tmp_path_factory.mktemp("site")
    meta = tomllib.loads((PLUGINS / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["hal.backends"]
    info = root / "hal_wrong_backends-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hal-wrong-backends\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[hal.backends]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return os.pathsep.join([str(root), str(PLUGINS)])


def _conformance(plugin_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=plugin_path)
    env.pop("HAL_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "hal", "conformance", *args], env=env, capture_output=True,
                          text=True, timeout=900)


def _matrix_row(stdout: str, backend: str) -> dict[str, str]:
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    families = lines[head].split()[1:]
    row = next(line for line in lines[head + 1:] if line.startswith(backend))
    cells = re.split(r"\s{2,}", row.strip())[1:]
    return dict(zip(families, cells))


def test_plugins_are_listed_like_in_tree_backends(plugin_path: str) -> None:
    env = dict(os.environ, PYTHONPATH=plugin_path)
    out = subprocess.run([sys.executable, "-m", "hal", "info"], env=env, capture_output=True, text=True,
                         timeout=120).stdout
    for name in ("ignores-softcap", "reads-past-seq-len", "lse-base-2"):
        assert f"{name}: available  [plugin: hal_wrong_backends:" in out


def test_reading_past_seq_len_fails_paged_families(plugin_path: str) -> None:
    res = _conformance(plugin_path, "--backend", "reads-past-seq-len", "--backend", "cpu")
    assert res.returncode == 1, res.stdout + res.stderr
    row = _matrix_row(res.stdout, "reads-past-seq-len")
    for family in ("paged", "options", "merge", "gqa", "batch"):
        assert row[family].startswith("FAIL"), (family, row)
    assert row["dense"].startswith("pass") and row["kv-cache"].startswith("pass"), row
    assert _matrix_row(res.stdout, "cpu")["paged"].startswith("pass")
    assert re.search(r"^FAIL reads-past-seq-len paged/\S+: out: max err inf", res.stdout, re.M), res.stdout


def test_ignoring_softcap_fails_options(plugin_path: str) -> None:
    res = _conformance(plugin_path, "--backend", "ignores-softcap", "--family", "options,dense")
    assert res.returncode == 1, res.stdout + res.stderr
    row = _matrix_row(res.stdout, "ignores-softcap")
    assert row["options"].startswith("FAIL") and row["dense"].startswith("pass"), row
    failed = re.findall(r"^FAIL ignores-softcap options/(\S+):", res.stdout, re.M)
    assert failed and all(name.startswith(("softcap/", "all/")) for name in failed), failed


def test_base2_lse_fails_where_lse_is_checked(plugin_path: str) -> None:
    res = _conformance(plugin_path, "--backend", "lse-base-2", "--family", "dense,merge,kv-cache",
                       "--report", os.devnull)
    assert res.returncode == 1
    row = _matrix_row(res.stdout, "lse-base-2")
    assert row["dense"].startswith("FAIL") and row["merge"].startswith("FAIL"), row
    assert row["kv-cache"].startswith("pass"), row
    assert "lse: max err" in res.stdout


def test_pytest_entry_point_fails_the_same_cases(plugin_path: str) -> None:
    env = dict(os.environ, PYTHONPATH=plugin_path, HAL_BACKEND="ignores-softcap")
    res = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "hal.conformance", "-q", "-p", "no:cacheprovider",
                          "-k", "softcap and dense"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout
    assert re.search(r"\d+ failed", res.stdout), res.stdout
