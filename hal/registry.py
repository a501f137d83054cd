"""Backend registry and selection.

The registry maps names to import strings (``"hal.backends.cpu:CpuBackend"``); a backend's module
is imported the first time that backend is asked for, so ``import hal`` imports no heavy stack.
Third-party backends come from the entry-point group ``hal.backends`` and behave exactly like
in-tree ones.

Selection (``HAL_BACKEND``, :func:`use_backend`, or the ``backend=`` argument of an op):
- one name: that backend runs, or ``BackendUnavailable`` is raised with its reasons; never a
  substitute;
- an ordered list ``"cuda,cpu"``: the first available one; each skipped one is logged with its reason;
- ``auto``: the first available non-emulated backend in the order cuda, rocm, tpu, plugins and
  ``register_backend`` names, cpu, logged at INFO with why the others were rejected.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from hal import config
from hal.backend import Backend, Probe
from hal.capabilities import Capabilities
from hal.errors import BackendUnavailable, HALError, InvalidInput

__all__ = ["BackendInfo", "get_backend", "list_backends", "use_backend", "register_backend",
           "registered_backends", "resolve_backend"]

log = logging.getLogger("hal")
_log_level_applied: str | None = None


def _apply_log_level() -> None:
    """When HAL_LOG_LEVEL is set, give hal's logger that level and a stderr handler if it has none.
    Unset, the logger is left as the application configured it."""
    global _log_level_applied
    if not config.is_set("HAL_LOG_LEVEL"):
        return
    level = str(config.get("HAL_LOG_LEVEL")).upper()
    if level == _log_level_applied:
        return
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise InvalidInput(f"[hal.config] HAL_LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR")
    log.setLevel(level)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    _log_level_applied = level


_BUILTIN: dict[str, str] = {
    "cuda": "hal.backends.cuda:CudaBackend",
    "rocm": "hal.backends.rocm:RocmBackend",
    "tpu": "hal.backends.tpu:TpuBackend",
    "cpu": "hal.backends.cpu:CpuBackend",
}
_HARDWARE_FIRST = ("cuda", "rocm", "tpu")  # auto's preference; plugins next, cpu last

_lock = threading.Lock()
_registered: dict[str, str] = {}  # register_backend() entries (override built-ins and plugins)
_plugins: dict[str, str] | None = None  # entry points, read once
_instances: dict[str, Backend] = {}
_selected: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("hal_backend", default=None)


@dataclass(frozen=True)
class BackendInfo:
    """One registered backend as ``hal info`` shows it."""

    name: str
    target: str  # "module:Class"
    source: str  # "builtin" | "plugin" | "registered"
    available: bool
    reasons: tuple[str, ...]
    emulated: bool
    device: str
    versions: dict[str, str]
    capabilities: Capabilities | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "target": self.target, "source": self.source,
            "available": self.available, "reasons": list(self.reasons), "emulated": self.emulated,
            "device": self.device, "versions": self.versions,
            "capabilities": self.capabilities.to_dict() if self.capabilities else None,
        }


def _entry_points() -> dict[str, str]:
    global _plugins
    if _plugins is None:
        allow = {n.strip() for n in config.get("HAL_PLUGINS").split(",") if n.strip()}
        found = {}
        for ep in metadata.entry_points(group="hal.backends"):
            if allow and ep.name not in allow:
                continue
            found[ep.name] = ep.value
        _plugins = found
    return _plugins


def refresh() -> None:
    """Forget loaded plugins and backend instances (for tests that change entry points)."""
    global _plugins
    with _lock:
        _plugins = None
        _instances.clear()


def registered_backends() -> dict[str, tuple[str, str]]:
    """name -> (target, source), in auto's order of preference."""
    out: dict[str, tuple[str, str]] = {}
    for name in _HARDWARE_FIRST:
        out[name] = (_BUILTIN[name], "builtin")
    for name, target in _entry_points().items():
        out[name] = (target, "plugin")
    for name, target in _registered.items():  # new names rank with plugins; cpu stays last
        out[name] = (target, "registered")
    cpu = out.pop("cpu", None)
    out["cpu"] = cpu if cpu is not None and cpu[1] == "registered" else (_BUILTIN["cpu"], "builtin")
    return out


def register_backend(name: str, target: str, *, override: bool = False) -> None:
    """Register ``target`` ("pkg.mod:Class") under ``name``; ``override=True`` replaces an existing name."""
    if not name or "," in name or name == "auto":
        raise InvalidInput(f"[hal.register_backend] name must be a non-empty string without ',' and not "
                           f"'auto', got {name!r}")
    if ":" not in target:
        raise InvalidInput(f"[hal.register_backend] target must look like 'package.module:Class', got {target!r}")
    if name in registered_backends() and not override:
        raise InvalidInput(f"[hal.register_backend] {name!r} is already registered "
                           f"({registered_backends()[name][0]}); pass override=True to replace it")
    with _lock:
        _registered[name] = target
        _instances.pop(name, None)


def _unknown(name: str) -> InvalidInput:
    valid = ", ".join(list(registered_backends()) + ["auto"])
    return InvalidInput(f"[hal] unknown backend {name!r}; valid names: {valid} "
                        f"(or a comma-separated list of them)")


def _load_class(name: str) -> type[Backend]:
    target, _ = registered_backends()[name]
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
    except Exception as e:  # a plugin that fails to import is reported, never swallowed
        raise BackendUnavailable(f"backend {name!r} could not be loaded from {target}",
                                 [f"{type(e).__name__}: {e}"]) from e
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendUnavailable(f"backend {name!r}: {target} is not a hal.backend.Backend subclass")
    return cls


def _probe(name: str) -> tuple[Probe, type[Backend] | None]:
    try:
        cls = _load_class(name)
    except BackendUnavailable as e:
        return Probe(available=False, reasons=tuple(e.reasons) or (str(e),)), None
    try:
        return cls.probe(), cls
    except Exception as e:  # noqa: BLE001 - a crashing probe is a reason, shown to the user
        return Probe(available=False, reasons=(f"probe raised {type(e).__name__}: {e}",)), cls


def _instance(name: str) -> Backend:
    with _lock:
        inst = _instances.get(name)
    if inst is not None:
        return inst
    probe, cls = _probe(name)
    if not probe.available or cls is None:
        raise BackendUnavailable(f"[hal] backend {name!r} is not available here", probe.reasons)
    inst = cls()
    with _lock:
        _instances.setdefault(name, inst)
        return _instances[name]


def _requested() -> str:
    return config.get("HAL_BACKEND") or "auto"


def resolve_backend(spec: str | Backend | None = None) -> Backend:
    """The backend for ``spec`` (a name, a list "a,b", "auto", a Backend, or None = current selection)."""
    if isinstance(spec, Backend):
        return spec
    if spec is None and (selected := _selected.get()) is not None:
        return selected
    _apply_log_level()
    request = (spec if spec is not None else _requested()).strip()
    names = [n.strip() for n in request.split(",") if n.strip()]
    if not names:
        raise _unknown(request)
    known = registered_backends()
    for n in names:
        if n != "auto" and n not in known:
            raise _unknown(n)
    if names == ["auto"]:
        return _auto()
    if "auto" in names:
        raise InvalidInput(f"[hal] 'auto' cannot be part of a list, got {request!r}")
    if len(names) == 1:
        return _instance(names[0])
    rejected: dict[str, list[str]] = {}
    for n in names:
        try:
            inst = _instance(n)
        except BackendUnavailable as e:
            rejected[n] = e.reasons or [str(e)]
            log.warning("hal: skipping backend %r from %r: %s", n, request, "; ".join(rejected[n]))
            continue
        log.info("hal: using backend %r (from %r)", n, request)
        return inst
    raise BackendUnavailable(f"[hal] none of the backends in {request!r} is available",
                             [f"{n}: {'; '.join(r)}" for n, r in rejected.items()])


def _auto() -> Backend:
    rejected: dict[str, list[str]] = {}
    for name in registered_backends():
        probe, cls = _probe(name)
        if not probe.available or cls is None:
            rejected[name] = list(probe.reasons)
            continue
        if probe.emulated:
            rejected[name] = ["emulated (auto never picks an emulated backend; name it explicitly)"]
            continue
        inst = _instance(name)
        log.info("hal: auto picked backend %r; rejected: %s", name,
                 {n: "; ".join(r) for n, r in rejected.items()} or "none")
        return inst
    raise BackendUnavailable("[hal] auto found no available backend",
                             [f"{n}: {'; '.join(r)}" for n, r in rejected.items()])


def get_backend(name: str | None = None) -> Backend:
    """The backend named ``name`` (or the current selection: ``use_backend``, then ``HAL_BACKEND``,
    then ``auto``). Raises ``BackendUnavailable`` with reasons, or ``InvalidInput`` for unknown names."""
    return resolve_backend(name)


def list_backends() -> list[BackendInfo]:
    """Every registered backend, available or not, with reasons and capabilities."""
    out = []
    for name, (target, source) in registered_backends().items():
        probe, cls = _probe(name)
        caps = None
        if probe.available and cls is not None:
            try:
                caps = _instance(name).capabilities()
            except HALError as e:
                probe = Probe(available=False, reasons=(str(e),))
        out.append(BackendInfo(name=name, target=target, source=source, available=probe.available,
                               reasons=tuple(probe.reasons), emulated=probe.emulated,
                               device=probe.device, versions=dict(probe.versions),
                               capabilities=caps))
    return out


@contextlib.contextmanager
def use_backend(name: str | Backend) -> Iterator[Backend]:
    """Within the block, ops without ``backend=`` run on ``name``. Resolved (and checked) on entry."""
    backend = resolve_backend(name)
    token = _selected.set(backend)  # the instance: its .name need not be its registered name
    try:
        yield backend
    finally:
        _selected.reset(token)
