"""Every ``HAL_*`` environment variable, in one place.

Each knob is typed, has a default and a one-line description, and is read when asked for
(never at import), so a test can set the variable or call :func:`override`. No other hal module
reads ``os.environ``. The README's variables table is generated from :data:`KNOBS`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hal.errors import InvalidInput

__all__ = ["Knob", "KNOBS", "get", "is_set", "override", "unknown_variables"]


@dataclass(frozen=True)
class Knob:
    name: str
    kind: type
    default: Any
    help: str

    def parse(self, raw: str) -> Any:
        if self.kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise InvalidInput(f"[hal.config] {self.name}={raw!r}: expected 0 or 1 (or true/false)")
        if self.kind is int:
            try:
                return int(raw)
            except ValueError:
                raise InvalidInput(f"[hal.config] {self.name}={raw!r}: expected an integer") from None
        return raw.strip()


KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("HAL_BACKEND", str, "auto",
             "Backend to use: a name (cpu, cuda, rocm, tpu, a plugin), an ordered list (cuda,cpu) or auto"),
        Knob("HAL_EMULATE", bool, False,
             "Let cuda, rocm and tpu run their own kernels on the CPU (Triton interpreter, PoCL, Pallas interpret)"),
        Knob("HAL_LOG_LEVEL", str, "WARNING",
             "Level of hal's logger: DEBUG, INFO (shows what auto picked and why), WARNING, ERROR"),
        Knob("HAL_PLUGINS", str, "",
             "Comma-separated allowlist of third-party backends to load from the hal.backends entry points (empty: all)"),
        Knob("HAL_CONFORMANCE_LEVEL", str, "quick",
             "Level of `pytest --pyargs hal.conformance`: quick or full"),
        Knob("HAL_SEED", int, 0,
             "Seed of the conformance suite's generated inputs"),
        Knob("HAL_CPU_KERNELS", str, "auto",
             "cpu backend kernels: auto (native C built on first use, torch where it does not apply) or torch"),
        Knob("HAL_CACHE_DIR", str, "~/.cache/hal",
             "Where hal keeps what it builds (the cpu backend's compiled kernels)"),
        Knob("HAL_CC", str, "",
             "C compiler for the cpu backend's kernels (default: gcc, then cc)"),
        Knob("HAL_CPU_AMX", str, "auto",
             "AMX tiles for the cpu kernels (MLA, int8/fp8 GQA decode, bf16 prefill): auto, off, or emulate (a C model, for testing)"),
        Knob("HAL_CPU_MARCH", str, "native",
             "-march the cpu backend's kernels are built for (x86-64-v3: the plain AVX2 paths, for testing)"),
    )
}

_overrides: dict[str, Any] = {}


def get(name: str) -> Any:
    """The value of knob ``name``: an override if one is active, else the environment, else the default."""
    knob = KNOBS[name]
    if name in _overrides:
        return _overrides[name]
    raw = os.environ.get(name)
    if raw is None:
        return knob.default
    return knob.parse(raw)


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set knobs for the duration of a ``with`` block: ``with override(HAL_BACKEND="cpu"): ...``."""
    for name, value in values.items():
        knob = KNOBS.get(name)
        if knob is None:
            raise InvalidInput(f"[hal.config] unknown knob {name!r}; known: {sorted(KNOBS)}")
        if isinstance(value, str):  # spelled as in the environment: "0" means False, "7" means 7
            values[name] = knob.parse(value)
        elif not isinstance(value, knob.kind) or (knob.kind is int and isinstance(value, bool)):
            raise InvalidInput(f"[hal.config] override {name}={value!r}: expected a {knob.kind.__name__} "
                               f"or a string as in the environment")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def is_set(name: str) -> bool:
    """Whether knob ``name`` was given (environment or override) rather than left at its default."""
    if name not in KNOBS:
        raise InvalidInput(f"[hal.config] unknown knob {name!r}; known: {sorted(KNOBS)}")
    return name in _overrides or name in os.environ


def unknown_variables() -> list[str]:
    """``HAL_*`` variables set in the environment that hal does not know (likely typos)."""
    return sorted(k for k in os.environ if k.startswith("HAL_") and k not in KNOBS)
