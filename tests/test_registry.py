"""Backend selection, plugins, capabilities and config (SPEC section 4; STYLE items 2, 7, 8).

Every test starts from a clean slate (no ``HAL_*`` variables, no registrations, no loaded plugins
or instances) and leaves the registry, the environment and hal's logger as it found them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

import hal
from hal import config, registry
from hal.capabilities import FEATURES

REPO = Path(__file__).resolve().parent.parent
BUILTIN = ("cuda", "rocm", "tpu", "cpu")
UNAVAILABLE_HERE = ("cuda", "rocm", "tpu")


# ---- fake backends (imported by the registry through "<this module>:<Class>") -------------------

FAKE_CAPS = hal.Capabilities(
    dtypes=frozenset({"fp32", "bf16"}),
    kv_dtypes=frozenset({"auto"}),
    head_dims=frozenset({64, 128}),
    block_sizes=frozenset({16}),
    features=frozenset({"dense", "causal"}),
    memory=frozenset({"device"}),
)


class FakeBackend(hal.Backend):
    name = "fake"

    @classmethod
    def probe(cls) -> hal.Probe:
        return hal.Probe(available=True, device="a fake device", versions={"fake": "0.1"})

    def capabilities(self) -> hal.Capabilities:
        return FAKE_CAPS


class EmulatedBackend(FakeBackend):
    name = "emu"

    @classmethod
    def probe(cls) -> hal.Probe:
        return hal.Probe(available=True, emulated=True, device="a CPU standing in for a fake GPU")

    def capabilities(self) -> hal.Capabilities:
        return dataclasses.replace(FAKE_CAPS, emulated=True)


class UnavailableBackend(FakeBackend):
    name = "gone"

    @classmethod
    def probe(cls) -> hal.Probe:
        return hal.Probe(available=False, reasons=("no fake accelerator in this machine",))


class CrashingProbeBackend(FakeBackend):
    name = "crashy"

    @classmethod
    def probe(cls) -> hal.Probe:
        raise RuntimeError("driver exploded while probing")


class UnnamedBackend(FakeBackend):
    name = ""  # a plugin that forgot to set its name is still selectable under its registered name


class NotABackend:
    pass


def target(cls: type) -> str:
    return f"{__name__}:{cls.__name__}"


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch):
    """No HAL_* variables, no registrations, fresh plugins/instances; hal's logger restored after."""
    for key in list(os.environ):
        if key.startswith("HAL_"):
            monkeypatch.delenv(key)
    saved_registered = dict(registry._registered)
    registry._registered.clear()
    logger = logging.getLogger("hal")
    saved_log = (logger.level, list(logger.handlers), registry._log_level_applied)
    registry.refresh()
    yield
    registry._registered.clear()
    registry._registered.update(saved_registered)
    registry.refresh()
    logger.setLevel(saved_log[0])
    logger.handlers[:] = saved_log[1]
    registry._log_level_applied = saved_log[2]


@pytest.fixture
def info_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    monkeypatch.setenv("HAL_LOG_LEVEL", "INFO")
    caplog.set_level(logging.INFO, logger="hal")
    return caplog


def hal_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hal" and r.levelno == level]


# ---- unknown names -------------------------------------------------------------------------------

def _assert_lists_valid_names(err: BaseException, bad: str) -> None:
    msg = str(err)
    assert repr(bad) in msg, msg
    for name in (*BUILTIN, "auto"):
        assert re.search(rf"\b{name}\b", msg.split("valid names", 1)[-1]), f"{name!r} missing from: {msg}"


def test_unknown_backend_in_environment_lists_valid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_BACKEND", "nonsense")  # set after import: config is read lazily
    with pytest.raises(hal.InvalidInput) as info:
        hal.get_backend()
    assert isinstance(info.value, ValueError)
    _assert_lists_valid_names(info.value, "nonsense")


def test_unknown_backend_via_override_lists_valid_names() -> None:
    with config.override(HAL_BACKEND="nonsense"):
        with pytest.raises(hal.InvalidInput) as info:
            hal.get_backend()
    _assert_lists_valid_names(info.value, "nonsense")
    assert hal.get_backend().name == "cpu"  # the override is gone


@pytest.mark.parametrize("spec", ["nonsense", "cpu,nonsense", "nonsense,cpu", ",", "  "])
def test_unknown_names_in_an_argument_raise(spec: str) -> None:
    with pytest.raises(hal.InvalidInput, match="valid names"):
        hal.get_backend(spec)


# ---- explicit names: run or raise, never substitute ----------------------------------------------

def test_cuda_named_on_a_machine_without_gpu_raises_with_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_BACKEND", "cuda")
    with pytest.raises(hal.BackendUnavailable) as info:
        hal.get_backend()
    reasons = " | ".join(info.value.reasons)
    assert "no NVIDIA GPU" in reasons, reasons
    assert "HAL_EMULATE=1" in reasons, reasons
    assert "'cuda'" in str(info.value)
    for r in info.value.reasons:  # reasons are also in the message the user sees
        assert r in str(info.value)


@pytest.mark.parametrize("name", UNAVAILABLE_HERE)
def test_unavailable_backend_named_explicitly_raises(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for how in ("argument", "environment", "override"):
        with pytest.raises(hal.BackendUnavailable) as info:
            if how == "argument":
                hal.get_backend(name)
            elif how == "environment":
                monkeypatch.setenv("HAL_BACKEND", name)
                try:
                    hal.get_backend()
                finally:
                    monkeypatch.delenv("HAL_BACKEND")
            else:
                with config.override(HAL_BACKEND=name):
                    hal.get_backend()
        assert info.value.reasons, f"{name} via {how}: no reasons"
        assert all(isinstance(r, str) and r for r in info.value.reasons)
        assert f"'{name}'" in str(info.value)


def test_use_backend_with_an_unavailable_name_raises_and_changes_nothing() -> None:
    with pytest.raises(hal.BackendUnavailable):
        with hal.use_backend("cuda"):
            pytest.fail("entered the block of an unavailable backend")
    assert hal.get_backend().name == "cpu"


# ---- ordered lists -------------------------------------------------------------------------------

def test_list_skips_unavailable_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hal")
    with config.override(HAL_BACKEND="cuda,cpu"):
        backend = hal.get_backend()
    assert backend.name == "cpu"
    warnings = hal_records(caplog, logging.WARNING)
    assert any("'cuda'" in m and "no NVIDIA GPU" in m for m in warnings), warnings


def test_list_with_available_first_takes_it_without_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hal")
    assert hal.get_backend("cpu,cuda").name == "cpu"
    assert hal.get_backend(" cpu , cuda ").name == "cpu"
    assert hal_records(caplog, logging.WARNING) == []


def test_list_of_only_unavailable_backends_raises_listing_each() -> None:
    with pytest.raises(hal.BackendUnavailable) as info:
        hal.get_backend("cuda,rocm,tpu")
    reasons = info.value.reasons
    for name in UNAVAILABLE_HERE:
        assert any(r.startswith(f"{name}: ") for r in reasons), reasons
    assert any("no NVIDIA GPU" in r for r in reasons), reasons


@pytest.mark.parametrize("spec", ["auto,cpu", "cpu,auto", "cuda,auto"])
def test_auto_inside_a_list_is_rejected(spec: str) -> None:
    with pytest.raises(hal.InvalidInput, match="auto"):
        hal.get_backend(spec)


# ---- auto ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["unset", "auto", "AUTO-argument"])
def test_auto_picks_cpu_and_says_why(how: str, info_logs: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "unset":
        backend = hal.get_backend()
    elif how == "auto":
        monkeypatch.setenv("HAL_BACKEND", "auto")
        backend = hal.get_backend()
    else:
        backend = hal.get_backend("auto")
    assert backend.name == "cpu"
    infos = [m for m in hal_records(info_logs, logging.INFO) if "auto picked" in m]
    assert len(infos) == 1, hal_records(info_logs, logging.INFO)
    assert "'cpu'" in infos[0]
    for name in UNAVAILABLE_HERE:
        assert f"'{name}'" in infos[0], infos[0]  # each rejection is named ...
    assert "no NVIDIA GPU" in infos[0]  # ... with its reason


def test_hal_log_level_info_lets_auto_log_without_caplog_level(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HAL_LOG_LEVEL", "INFO")
    hal.get_backend("auto")
    assert any("auto picked" in m for m in hal_records(caplog, logging.INFO))


def test_bad_log_level_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_LOG_LEVEL", "LOUD")
    with pytest.raises(hal.InvalidInput, match="HAL_LOG_LEVEL"):
        hal.get_backend("cpu")


def test_auto_never_picks_an_emulated_backend(info_logs: pytest.LogCaptureFixture) -> None:
    hal.register_backend("emu", target(EmulatedBackend))
    names = list(registry.registered_backends())
    assert names.index("emu") < names.index("cpu"), names  # auto considers it before cpu ...
    assert names[-1] == "cpu"
    assert hal.get_backend("auto").name == "cpu"  # ... and rejects it
    picked = [m for m in hal_records(info_logs, logging.INFO) if "auto picked" in m]
    assert picked and "'emu'" in picked[-1] and "emulated" in picked[-1], picked
    # named explicitly it runs, and says it is emulated
    assert isinstance(hal.get_backend("emu"), EmulatedBackend)
    info = {i.name: i for i in hal.list_backends()}["emu"]
    assert info.available and info.emulated and info.capabilities.emulated


def test_auto_picks_a_registered_non_emulated_backend_before_cpu() -> None:
    hal.register_backend("fake", target(FakeBackend))
    assert hal.get_backend().name == "fake"  # cpu is auto's last resort (SPEC section 4)


def test_auto_with_nothing_available_raises_listing_each(monkeypatch: pytest.MonkeyPatch) -> None:
    hal.register_backend("cpu", target(UnavailableBackend), override=True)
    with pytest.raises(hal.BackendUnavailable) as info:
        hal.get_backend("auto")
    for name in BUILTIN:
        assert any(r.startswith(f"{name}: ") for r in info.value.reasons), info.value.reasons


# ---- use_backend ---------------------------------------------------------------------------------

def test_use_backend_overrides_the_environment_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_BACKEND", "nonsense")
    with hal.use_backend("cpu") as backend:
        assert backend.name == "cpu"
        assert hal.get_backend() is backend
    with pytest.raises(hal.InvalidInput):  # the environment is back in charge
        hal.get_backend()


def test_use_backend_nests_and_restores_each_level() -> None:
    hal.register_backend("fake", target(FakeBackend))
    hal.register_backend("emu", target(EmulatedBackend))
    with config.override(HAL_BACKEND="cpu"):
        with hal.use_backend("fake"):
            assert hal.get_backend().name == "fake"
            with hal.use_backend("emu"):
                assert hal.get_backend().name == "emu"
                with hal.use_backend("cuda,cpu"):
                    assert hal.get_backend().name == "cpu"
                assert hal.get_backend().name == "emu"
            assert hal.get_backend().name == "fake"
        assert hal.get_backend().name == "cpu"


def test_use_backend_restores_after_an_exception() -> None:
    hal.register_backend("emu", target(EmulatedBackend))
    with pytest.raises(KeyError):
        with hal.use_backend("emu"):
            raise KeyError("boom")
    assert hal.get_backend().name == "cpu"


def test_use_backend_rejects_unknown_names_on_entry() -> None:
    with pytest.raises(hal.InvalidInput, match="nonsense"):
        with hal.use_backend("nonsense"):
            pytest.fail("entered the block of an unknown backend")


def test_use_backend_accepts_an_instance_and_a_registered_name_unlike_the_class_name() -> None:
    hal.register_backend("my-plugin", target(UnnamedBackend))
    with hal.use_backend("my-plugin") as backend:
        assert isinstance(backend, UnnamedBackend)
        assert hal.get_backend() is backend
    instance = FakeBackend()  # never registered
    with hal.use_backend(instance):
        assert hal.get_backend() is instance


# ---- register_backend ----------------------------------------------------------------------------

def test_registered_backend_is_selectable_and_listed() -> None:
    hal.register_backend("fake", target(FakeBackend))
    backend = hal.get_backend("fake")
    assert isinstance(backend, FakeBackend)
    assert hal.get_backend("fake") is backend  # one instance per name
    info = {i.name: i for i in hal.list_backends()}["fake"]
    assert (info.source, info.target, info.available) == ("registered", target(FakeBackend), True)
    assert info.capabilities == FAKE_CAPS and info.reasons == ()
    assert info.device == "a fake device" and info.versions == {"fake": "0.1"}
    with pytest.raises(hal.InvalidInput) as err:  # and it is named among the valid ones
        hal.get_backend("nonsense")
    assert "fake" in str(err.value).split("valid names", 1)[1]


def test_registering_an_existing_name_needs_override() -> None:
    hal.register_backend("fake", target(FakeBackend))
    for name in ("fake", "cpu", "cuda"):
        with pytest.raises(hal.InvalidInput, match="override=True"):
            hal.register_backend(name, target(EmulatedBackend))
    assert isinstance(hal.get_backend("fake"), FakeBackend)
    hal.register_backend("fake", target(EmulatedBackend), override=True)
    assert isinstance(hal.get_backend("fake"), EmulatedBackend)  # the old instance is dropped


def test_overriding_a_builtin_keeps_its_place() -> None:
    hal.register_backend("cuda", target(FakeBackend), override=True)
    names = list(registry.registered_backends())
    assert names[:3] == ["cuda", "rocm", "tpu"] and names[-1] == "cpu", names
    assert registry.registered_backends()["cuda"] == (target(FakeBackend), "registered")
    assert hal.get_backend().name == "fake"  # auto now finds "cuda" available, first


@pytest.mark.parametrize("name, tgt", [
    ("", "x.y:Z"), ("a,b", "x.y:Z"), ("auto", "x.y:Z"), ("fake", "no_colon_here"), ("fake", ""),
])
def test_bad_registrations_raise_at_registration(name: str, tgt: str) -> None:
    with pytest.raises(hal.InvalidInput, match=r"\[hal.register_backend\]"):
        hal.register_backend(name, tgt)
    assert name not in registry._registered


@pytest.mark.parametrize("tgt, reason", [
    ("hal_no_such_module_xyz:Backend", "ModuleNotFoundError"),
    (f"{__name__}:NoSuchClass", "AttributeError"),
    (f"{__name__}:NotABackend", "not a hal.backend.Backend subclass"),
    (f"{__name__}:FAKE_CAPS", "not a hal.backend.Backend subclass"),
])
def test_bad_targets_raise_when_used_and_are_listed_with_the_reason(tgt: str, reason: str) -> None:
    hal.register_backend("bad", tgt)
    with pytest.raises(hal.BackendUnavailable) as info:
        hal.get_backend("bad")
    assert reason in str(info.value)
    listed = {i.name: i for i in hal.list_backends()}["bad"]
    assert not listed.available and any(reason in r for r in listed.reasons), listed.reasons
    assert hal.get_backend("bad,cpu").name == "cpu"


def test_a_crashing_probe_makes_the_backend_unavailable_with_the_exception() -> None:
    hal.register_backend("crashy", target(CrashingProbeBackend))
    with pytest.raises(hal.BackendUnavailable) as info:
        hal.get_backend("crashy")
    assert any("RuntimeError" in r and "driver exploded" in r for r in info.value.reasons), info.value.reasons
    listed = {i.name: i for i in hal.list_backends()}["crashy"]
    assert not listed.available and listed.capabilities is None
    assert any("driver exploded" in r for r in listed.reasons)
    assert hal.get_backend("auto").name == "cpu"  # auto passes over it


# ---- entry-point plugins -------------------------------------------------------------------------

PLUGIN_MODULE = '''
import hal


class FakeBackend(hal.Backend):
    name = "fake"

    @classmethod
    def probe(cls):
        return hal.Probe(available=True, device="plugin device")

    def capabilities(self):
        return hal.Capabilities(dtypes=frozenset({"fp32"}), kv_dtypes=frozenset({"auto"}),
                                head_dims=frozenset({64}), block_sizes=frozenset({16}),
                                features=frozenset({"dense"}), memory=frozenset({"device"}))
'''


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dist = tmp_path / "fakehal-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakehal\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[hal.backends]\nfake = fakehal_mod:FakeBackend\nbroken = fakehal_missing:Nope\n")
    (tmp_path / "fakehal_mod.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield tmp_path
    sys.modules.pop("fakehal_mod", None)
    registry.refresh()  # plugins are re-read lazily, after monkeypatch has restored sys.path


def test_plugins_are_listed_and_selectable(fake_distribution: Path) -> None:
    listed = {i.name: i for i in hal.list_backends()}
    names = list(listed)
    assert names.index("fake") < names.index("cpu") and names[-1] == "cpu", names
    fake = listed["fake"]
    assert (fake.source, fake.target, fake.available) == ("plugin", "fakehal_mod:FakeBackend", True)
    assert isinstance(fake.capabilities, hal.Capabilities)
    backend = hal.get_backend("fake")
    assert type(backend).__module__ == "fakehal_mod" and backend.name == "fake"
    assert hal.get_backend().name == "fake"  # auto takes an available plugin before cpu


def test_a_broken_plugin_is_listed_with_its_import_error(fake_distribution: Path) -> None:
    broken = {i.name: i for i in hal.list_backends()}["broken"]
    assert broken.source == "plugin" and not broken.available and broken.capabilities is None
    assert any("fakehal_missing" in r and "ModuleNotFoundError" in r for r in broken.reasons), broken.reasons
    with pytest.raises(hal.BackendUnavailable) as info:
        hal.get_backend("broken")
    assert any("fakehal_missing" in r for r in info.value.reasons), info.value.reasons
    assert hal.get_backend("broken,cpu").name == "cpu"


def test_hal_plugins_allowlist_hides_the_others(fake_distribution: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_PLUGINS", "fake")
    registry.refresh()
    names = [i.name for i in hal.list_backends()]
    assert "fake" in names and "broken" not in names, names
    with pytest.raises(hal.InvalidInput, match="unknown backend 'broken'"):
        hal.get_backend("broken")


def test_plugins_are_gone_after_refresh_without_the_distribution() -> None:
    # runs after the plugin tests in file order: nothing of the fake distribution is left
    names = [i.name for i in hal.list_backends()]
    assert "fake" not in names and "broken" not in names, names


# ---- list_backends -------------------------------------------------------------------------------

def test_list_backends_covers_every_registered_backend() -> None:
    hal.register_backend("fake", target(FakeBackend))
    hal.register_backend("crashy", target(CrashingProbeBackend))
    infos = hal.list_backends()
    assert [i.name for i in infos] == list(registry.registered_backends())
    by_name = {i.name: i for i in infos}
    assert set(BUILTIN) | {"fake", "crashy"} <= set(by_name)
    assert by_name["cpu"].available and isinstance(by_name["cpu"].capabilities, hal.Capabilities)
    assert by_name["cpu"].source == "builtin" and by_name["cpu"].target == "hal.backends.cpu:CpuBackend"
    assert by_name["cpu"].device and "torch" in by_name["cpu"].versions
    for info in infos:
        assert isinstance(info, hal.BackendInfo)
        if info.available:
            assert isinstance(info.capabilities, hal.Capabilities) and info.reasons == ()
        else:
            assert info.capabilities is None and info.reasons and all(info.reasons), info
    for name in UNAVAILABLE_HERE:
        assert not by_name[name].available


def test_backend_info_to_dict_is_json() -> None:
    hal.register_backend("emu", target(EmulatedBackend))
    for info in hal.list_backends():
        d = info.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert d["name"] == info.name and d["available"] == info.available
        if info.capabilities is not None:
            assert sorted(d["capabilities"]["features"]) == d["capabilities"]["features"]
            assert set(d["capabilities"]["features"]) == set(info.capabilities.features)


def test_list_backends_ignores_the_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_BACKEND", "nonsense")  # listing does not depend on the selection
    assert "cpu" in [i.name for i in hal.list_backends()]


# ---- capabilities --------------------------------------------------------------------------------

def test_why_not_is_empty_for_declared_requests() -> None:
    assert FAKE_CAPS.why_not() == []
    assert FAKE_CAPS.why_not(dtype="bf16", kv_dtype="auto", head_dim=128, v_head_dim=64, block_size=16,
                             features=["dense", "causal"], memory="device") == []


def test_why_not_gives_one_reason_per_undeclared_item() -> None:
    reasons = FAKE_CAPS.why_not(dtype="fp16", kv_dtype="int4", head_dim=80, v_head_dim=96, block_size=32,
                                features=["dense", "window", "alibi"], memory="unified")
    assert len(reasons) == 8, reasons
    expected = [("dtype fp16", {"bf16", "fp32"}), ("kv_dtype int4", {"auto"}), ("head_dim 80", {"64", "128"}),
                ("v_head_dim 96", {"64", "128"}), ("block_size 32", {"16"}), ("'window'", None),
                ("'alibi'", None), ("'unified'", {"device"})]
    for reason, (value, declared) in zip(reasons, expected):
        assert value in reason, (reason, value)
        if declared is not None:  # the declared set, in any order
            listed = re.search(r"declared: ([^)]*)\)", reason)
            assert listed and set(listed.group(1).split(", ")) == declared, reason
    one = FAKE_CAPS.why_not(head_dim=80)
    assert len(one) == 1 and "head_dim 80" in one[0] and "64" in one[0] and "128" in one[0]


def test_why_not_rejects_unknown_feature_names() -> None:
    with pytest.raises(ValueError, match="warp_speed"):
        FAKE_CAPS.why_not(features=["warp_speed"])
    with pytest.raises(ValueError, match="warp_speed"):
        dataclasses.replace(FAKE_CAPS, features=frozenset({"dense", "warp_speed"}))


def test_capabilities_are_frozen_data() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAKE_CAPS.dtypes = frozenset({"fp16"})  # type: ignore[misc]
    assert hash(FAKE_CAPS) == hash(dataclasses.replace(FAKE_CAPS))
    cpu = hal.get_backend("cpu").capabilities()
    assert isinstance(cpu, hal.Capabilities) and not cpu.emulated
    assert set(cpu.features) <= set(FEATURES)
    assert cpu.why_not(dtype="fp32", head_dim=128, block_size=16, features=["paged", "causal"]) == []


# ---- config ----------------------------------------------------------------------------------------

def test_every_knob_is_documented_and_typed() -> None:
    assert {"HAL_BACKEND", "HAL_EMULATE", "HAL_LOG_LEVEL", "HAL_PLUGINS", "HAL_SEED"} <= set(config.KNOBS)
    for key, knob in config.KNOBS.items():
        assert key == knob.name and knob.name.startswith("HAL_")
        assert knob.kind in (str, int, bool)
        assert isinstance(knob.default, knob.kind), knob
        assert isinstance(knob.help, str) and knob.help.strip() and "\n" not in knob.help
        assert config.get(key) == knob.default  # the fixture cleared the environment


def test_get_reads_the_environment_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.get("HAL_EMULATE") is False and config.get("HAL_SEED") == 0
    monkeypatch.setenv("HAL_EMULATE", "1")
    monkeypatch.setenv("HAL_SEED", "42")
    monkeypatch.setenv("HAL_BACKEND", " cpu ")
    assert config.get("HAL_EMULATE") is True
    assert config.get("HAL_SEED") == 42
    assert config.get("HAL_BACKEND") == "cpu"
    monkeypatch.setenv("HAL_EMULATE", "off")
    assert config.get("HAL_EMULATE") is False


def test_override_wins_over_the_environment_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_SEED", "5")
    with config.override(HAL_SEED=7, HAL_BACKEND="cpu"):
        assert config.get("HAL_SEED") == 7 and config.get("HAL_BACKEND") == "cpu"
        with config.override(HAL_SEED=9):
            assert config.get("HAL_SEED") == 9 and config.get("HAL_BACKEND") == "cpu"
        assert config.get("HAL_SEED") == 7
    assert config.get("HAL_SEED") == 5 and config.get("HAL_BACKEND") == "auto"
    with pytest.raises(RuntimeError):
        with config.override(HAL_SEED=1):
            raise RuntimeError
    assert config.get("HAL_SEED") == 5


def test_override_values_are_typed_like_the_environment() -> None:
    with config.override(HAL_EMULATE="0", HAL_SEED="3"):  # strings are read as the environment is
        assert config.get("HAL_EMULATE") is False and config.get("HAL_SEED") == 3
    for bad in ({"HAL_EMULATE": "maybe"}, {"HAL_SEED": "x"}, {"HAL_SEED": 1.5}, {"HAL_EMULATE": 2},
                {"HAL_SEED": True}):
        with pytest.raises(hal.InvalidInput, match=next(iter(bad))):
            with config.override(**bad):
                pytest.fail(f"override accepted {bad}")
    with pytest.raises(hal.InvalidInput, match="HAL_BAKEND"):
        with config.override(HAL_BAKEND="cpu"):
            pass
    assert config.get("HAL_EMULATE") is False and config.get("HAL_SEED") == 0


@pytest.mark.parametrize("name, raw", [("HAL_EMULATE", "maybe"), ("HAL_SEED", "x"), ("HAL_SEED", "1.5")])
def test_bad_values_raise_naming_the_variable(name: str, raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(hal.InvalidInput) as info:
        config.get(name)
    assert name in str(info.value) and repr(raw) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_emulate_value_surfaces_through_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_EMULATE", "maybe")
    with pytest.raises(hal.BackendUnavailable, match="HAL_EMULATE"):  # the cuda probe reads it
        hal.get_backend("cuda")


def test_unknown_variables_reports_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.unknown_variables() == []
    monkeypatch.setenv("HAL_BAKEND", "cpu")
    monkeypatch.setenv("HAL_BACKEND", "cpu")
    monkeypatch.setenv("NOT_HAL_THING", "1")
    assert config.unknown_variables() == ["HAL_BAKEND"]


_ENV_ACCESS = re.compile(r"\bos\.(environ|getenv|putenv|unsetenv)\b|\bfrom\s+os\s+import\b[^\n]*\b(environ|getenv)\b")


def test_only_config_reads_the_environment() -> None:
    files = sorted((REPO / "hal").rglob("*.py")) + sorted((REPO / "backends").rglob("*.py"))
    assert (REPO / "hal" / "config.py") in files and len(files) > 10
    offenders = []
    for path in files:
        if path == REPO / "hal" / "config.py":
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _ENV_ACCESS.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "read HAL_* variables through hal.config (STYLE item 8):\n" + "\n".join(offenders)
    assert _ENV_ACCESS.search((REPO / "hal" / "config.py").read_text())  # the pattern does match
