"""Import hygiene and packaging (SPEC section 1; STYLE items 2 and 3).

``import hal`` must not pull in a backend's heavy stack, the registry must hold import strings
rather than modules, and the wheel must install everything under the single ``hal`` package.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import hal
from hal import registry

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("triton", "pyopencl", "jax", "jaxlib")

_FRESH_IMPORT = f"""
import json, sys
heavy = {HEAVY!r}
def offenders():
    return sorted(m for m in sys.modules if m.split(".")[0] in heavy)
import hal
after_import = offenders()
hal.get_backend("cpu")
after_get = offenders()
infos = hal.list_backends()
after_list = offenders()
print(json.dumps({{"import": after_import, "get_backend": after_get, "list_backends": after_list,
                  "names": [i.name for i in infos], "hal_file": hal.__file__}}))
"""


def test_import_hal_leaves_heavy_stacks_unimported() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAL_")}
    proc = subprocess.run([sys.executable, "-c", _FRESH_IMPORT], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for step in ("import", "get_backend", "list_backends"):
        assert result[step] == [], f"after {step}, heavy modules in sys.modules: {result[step]}"
    assert {"cpu", "cuda", "rocm", "tpu"} <= set(result["names"])
    assert Path(result["hal_file"]).resolve() == (REPO / "hal" / "__init__.py").resolve()


def test_cpu_backend_is_importable_under_hal_backends() -> None:
    module = importlib.import_module("hal.backends.cpu")
    assert issubclass(module.CpuBackend, hal.Backend)
    assert module.CpuBackend.name == "cpu"
    assert Path(module.__file__).resolve() == (REPO / "backends" / "cpu" / "__init__.py").resolve()
    for sub in ("attention", "kv_cache"):
        importlib.import_module(f"hal.backends.cpu.{sub}")


def test_registry_holds_strings_pointing_under_hal_backends() -> None:
    assert set(registry._BUILTIN) == {"cpu", "cuda", "rocm", "tpu"}
    for name, target in registry._BUILTIN.items():
        assert isinstance(target, str), (name, target)
        module_name, sep, cls_name = target.partition(":")
        assert sep and cls_name, target
        assert module_name == f"hal.backends.{name}", target
        assert (REPO / "backends" / name / "__init__.py").is_file()
    for name, (target, source) in registry.registered_backends().items():
        assert isinstance(target, str) and source in ("builtin", "plugin", "registered"), (name, target)
        if source == "builtin":
            assert target.startswith("hal.backends."), target
    # nothing in the registry's state is a module or a class
    for value in (*registry._BUILTIN.values(), *registry._registered.values()):
        assert isinstance(value, str)


def test_no_top_level_backends_package_is_installed(tmp_path: Path) -> None:
    # `backends` is reachable only as hal.backends (SPEC section 1); run outside the repo so that
    # the working directory on sys.path does not make the folder importable
    code = ("import importlib.util, hal.backends.cpu; "
            "print(importlib.util.find_spec('backends'))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("HAL_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None", f"a top-level 'backends' is importable: {proc.stdout}"


# ---- packaging -------------------------------------------------------------------------------------

def _pip_works() -> bool:
    try:
        return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                 ".hypothesis", ".mypy_cache", ".ruff_cache", ".venv", "venv", "*.whl")


@pytest.mark.skipif(not _pip_works(), reason="pip cannot run in this interpreter")
def test_wheel_installs_everything_under_hal(tmp_path: Path) -> None:
    # build from a copy: no build/ or *.egg-info written into the working tree, no stale build/lib
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE)
    out = tmp_path / "wheels"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 60, f"building the wheel took {elapsed:.1f}s"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
        top = {n.split("/", 1)[0] for n in names}
        dist_infos = [t for t in top if t.endswith(".dist-info")]
        assert len(dist_infos) == 1, top
        assert top == {"hal", dist_infos[0]}, f"unexpected top-level entries: {sorted(top - {'hal'})}"
        # every source file of the checkout ships, under hal/ (backends/ becomes hal/backends/)
        root = Path(__file__).resolve().parent.parent
        for folder, prefix in (("hal", "hal"), ("backends", "hal/backends")):
            for f in (root / folder).rglob("*"):
                if f.suffix in (".py", ".c", ".h", ".typed") and "__pycache__" not in f.parts:
                    required = f"{prefix}/{f.relative_to(root / folder).as_posix()}"
                    assert required in names, f"{required} missing from {wheels[0].name}"
        assert "hal/conformance/test_conformance.py" in names and "hal/backends/cpu/kernels/paged_decode.c" in names
        assert not any(n.startswith("backends/") or "/tests/" in n for n in names)
        entry_points = zf.read(f"{dist_infos[0]}/entry_points.txt").decode()
        top_level = zf.read(f"{dist_infos[0]}/top_level.txt").decode().split() \
            if f"{dist_infos[0]}/top_level.txt" in names else ["hal"]
    section = entry_points.split("[console_scripts]", 1)
    assert len(section) == 2, entry_points
    scripts = {line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip()
               for line in section[1].split("[", 1)[0].splitlines() if "=" in line}
    assert scripts.get("hal") == "hal.cli:main", entry_points
    assert top_level == ["hal"], top_level
