"""Native kernels of the cpu backend: C compiled on first use for the machine that runs it.

``gcc -O3 -march=native -fopenmp`` (``HAL_CPU_MARCH`` sets -march) builds each source once per machine into hal's cache folder
(``HAL_CACHE_DIR``), keyed by the source, the flags and the CPU's feature flags, so a machine
with AVX-512 gets the AVX-512 paths and one without gets plain C loops. When no compiler is
found, or ``HAL_CPU_KERNELS=torch``, the backend runs its PyTorch implementation instead and
``hal info`` says why. A source can also be built as a variant with extra ``-D`` macros (its own
library, e.g. ``paged_decode`` with ``HAL_STAGED16`` for MLA caches).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from hal import config
from hal.errors import InvalidInput

_HERE = Path(__file__).parent
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-Wall", "-lm"]  # and -march=HAL_CPU_MARCH
_lock = threading.Lock()
_libs: dict[tuple[str, tuple[str, ...]], ctypes.CDLL | str] = {}  # (source, macros) -> library, or why not
_generation = 0  # reset() counts up: calls prepared with the libraries it forgot are stale


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _build(name: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | str:
    if config.get("HAL_CPU_KERNELS") == "torch":
        return "HAL_CPU_KERNELS=torch"
    wanted = str(config.get("HAL_CC"))
    cc = shutil.which(wanted) if wanted else (shutil.which("gcc") or shutil.which("cc"))
    if cc is None:
        return f"C compiler {wanted!r} (HAL_CC) not found" if wanted else "no C compiler found (install gcc, or set HAL_CC)"
    flags = [f"-march={config.get('HAL_CPU_MARCH')}", *_FLAGS, *(f"-D{d}" for d in defines)]
    src = (_HERE / f"{name}.c").read_bytes() + b"".join(h.read_bytes() for h in sorted(_HERE.glob("*.h")))
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out_dir = Path(str(config.get("HAL_CACHE_DIR"))).expanduser() / "kernels"
    lib_path = out_dir / f"{'-'.join([name, *defines])}-{key}.so"
    if not lib_path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tmp_lib = Path(tmp) / lib_path.name
            res = subprocess.run([cc, str(_HERE / f"{name}.c"), "-o", str(tmp_lib), *flags],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                return f"{cc} failed on {name}.c: {res.stderr.strip()[-400:]}"
            os.replace(tmp_lib, lib_path)  # atomic: concurrent builders agree
    return ctypes.CDLL(str(lib_path))


# HAL_CPU_AMX: the kernels' bf16 and int8 products on AMX tiles (amx.h): auto (where the build targets
# them and Linux grants them), off, or emulate (a C model of the tile instructions, to test their code
# on a CPU without them)
_AMX_MACROS = {"auto": (), "off": ("HAL_AMX_OFF",), "emulate": ("HAL_AMX_EMULATE",)}
AMX_STATES = {0: "not in this build", 1: "native", 2: "emulated (HAL_CPU_AMX=emulate)",
              3: "the CPU has them, Linux refused them"}  # paged_decode's hal_amx_state() (prefill shares it)


def amx_macros() -> tuple[str, ...]:
    """The macros HAL_CPU_AMX adds to a kernel's build."""
    mode = str(config.get("HAL_CPU_AMX")).lower()
    if mode not in _AMX_MACROS:
        raise InvalidInput(f"[hal.config] HAL_CPU_AMX={mode!r}: expected one of {sorted(_AMX_MACROS)}")
    return _AMX_MACROS[mode]


def load(name: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library ``name`` built with macros ``defines`` (on first use), or None when unavailable."""
    key = (name, defines)
    with _lock:
        if key not in _libs:
            _libs[key] = _build(name, defines)
        lib = _libs[key]
    return lib if isinstance(lib, ctypes.CDLL) else None


def status(name: str, defines: tuple[str, ...] = ()) -> str:
    """'native' or the reason the torch implementation runs instead."""
    lib = load(name, defines)
    return "native" if lib is not None else str(_libs[(name, defines)])


def reset() -> None:
    """Forget loaded libraries (tests that switch HAL_CPU_KERNELS)."""
    global _generation
    with _lock:
        _libs.clear()
        _generation += 1


def generation() -> int:
    """How many times :func:`reset` has run (a key for what was prepared with the loaded libraries)."""
    return _generation
