"""The README stays true to the code: its variables table lists every knob, with its default, and
its opening commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

from hal import config

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_knob_is_in_the_readme_table() -> None:
    for knob in config.KNOBS.values():
        row = f"| `{knob.name}` | {knob.kind.__name__} | `{knob.default}` | {knob.help} |"
        assert row in README, f"README variables table lacks or misstates {knob.name}: expected {row}"


def test_readme_opens_with_the_two_commands_ci_runs() -> None:
    blocks = README.split("```bash\n")[1:3]
    commands = [b.split("\n", 1)[0] for b in blocks]
    assert "hal conformance --all" in commands[0] and commands[0].startswith("pip install torch==2.13.0")
    assert "python -m pytest tests" in commands[1] and commands[1].startswith("pip install torch==2.13.0")
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "python -m pytest tests" in ci and "hal conformance" in ci


def test_the_readme_example_runs() -> None:
    code = README.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    hal, torch = scope["hal"], scope["torch"]
    whole = hal.attention(scope["q"], scope["k"], scope["v"])
    assert (scope["o"].float() - whole.float()).abs().max() < 3e-2  # the merge equals the whole, as it says
    assert scope["out"].shape == (8, 32, 128) and scope["lse"].dtype == torch.float32
    assert abs(scope["cfg"].softmax_scale - 0.114721) < 1e-6
