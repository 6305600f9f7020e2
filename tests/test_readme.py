"""Every command in README.md works as written on a fresh clone after the two set-up commands (issue 18).

The README's ```bash blocks are read in order:
- the set-up block holds exactly the two set-up commands (not run here: they are what runs this suite);
- `. .venv/bin/activate` must put `qlora-kit` on the PATH;
- a command with a placeholder (`path/to/...`, or `...` as an argument) is a template: its subcommand must
  exist and its --help must list every option the template uses;
- every other command runs verbatim through bash, in README order, in a scratch folder that mirrors the
  repository (so `runs/` lands there). In the default suite the "demo" model alias points at the tiny test
  model (QLORA_KIT_DEMO_MODEL); under `-m real_model` the commands run on the real demo model.
Every `qlora-kit <subcommand>` the README names, in a block or inline, answers --help.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_warnings import WARNING_LINE

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SETUP_COMMANDS = ["bash scripts/demo.sh", "bash scripts/test.sh"]
ACTIVATE = ". .venv/bin/activate"
PLACEHOLDER = re.compile(r"path/to/|(?:^|\s)\.\.\.(?:\s|$)")
# Exit statuses that are answers, not failures: `plan` exits 1 when its verdict is "does not fit".
ANSWER_STATUS = {"plan": {0, 1}}


@dataclass
class Command:
    line: str  # the command as a user pastes it, without its trailing comment
    section: str  # the README heading above its block

    @property
    def subcommand(self) -> str | None:
        """The ``qlora-kit`` subcommand this line runs, or None for any other command."""
        words = self.line.split()
        return words[1] if len(words) > 1 and words[0] == "qlora-kit" else None

    @property
    def is_template(self) -> bool:
        return bool(PLACEHOLDER.search(self.line))


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_blocks(text: str) -> list[list[Command]]:
    """The commands of each ```bash block of ``text``, in order (continuation lines joined)."""
    blocks = []
    for match in re.finditer(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        headings = re.findall(r"^#+ (.+)$", text[:match.start()], re.MULTILINE)
        section = headings[-1] if headings else ""
        joined = re.sub(r"\\\n\s*", " ", match.group(1))
        lines = [strip_comment(raw) for raw in joined.splitlines()]
        blocks.append([Command(line, section) for line in lines if line])
    return blocks


def readme_commands() -> list[Command]:
    """Every command after the set-up block, in README order."""
    return [c for block in bash_blocks(README.read_text(encoding="utf-8"))[1:] for c in block]


def named_subcommands() -> list[str]:
    """Every ``qlora-kit <subcommand>`` in the README's code (blocks and inline `code`), sorted."""
    text = README.read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    inline = re.findall(r"`qlora-kit ([a-z][a-z0-9-]*)[^`\n]*`", prose)
    return sorted({c.subcommand for c in readme_commands() if c.subcommand} | set(inline))


def help_text(subcommand: str) -> str:
    """``qlora-kit <subcommand> --help``, run in this process; fails the test unless it exits 0."""
    from qlora_kit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main([subcommand, "--help"])
    assert stop.value.code == 0, f"qlora-kit {subcommand} --help exited {stop.value.code}"
    return out.getvalue()


def test_setup_block_is_the_two_setup_commands():
    first = bash_blocks(README.read_text(encoding="utf-8"))[0]
    assert first[0].section == "Set-up commands"
    assert [c.line for c in first] == SETUP_COMMANDS


def test_every_command_is_one_this_test_knows_how_to_check():
    commands = readme_commands()
    unknown = [c.line for c in commands if c.line != ACTIVATE and c.subcommand is None]
    assert not unknown, f"README commands test_readme.py does not know how to run: {unknown}"
    first_cli = next(i for i, c in enumerate(commands) if c.subcommand)
    assert ACTIVATE in [c.line for c in commands[:first_cli]], \
        f"the README must say `{ACTIVATE}` before its first qlora-kit command"


def test_activating_the_venv_puts_qlora_kit_on_the_path():
    if sys.prefix == sys.base_prefix:
        pytest.skip("the suite runs outside a virtual environment")
    assert "-m venv .venv" in (REPO / "scripts" / "setup_env.sh").read_text()
    assert (Path(sys.prefix) / "bin" / "activate").is_file()
    assert (Path(sys.prefix) / "bin" / "qlora-kit").is_file(), "the set-up installs the qlora-kit console script"


@pytest.mark.parametrize("subcommand", named_subcommands())
def test_every_named_subcommand_answers_help(subcommand):
    assert f"qlora-kit {subcommand}" in help_text(subcommand)


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.is_template], ids=lambda c: c.line[:60])
def test_templates_use_only_real_options(command):
    text = help_text(command.subcommand)
    options = [w.split("=")[0] for w in command.line.split() if w.startswith("--")]
    assert options, command.line
    missing = [o for o in options if o not in text]
    assert not missing, f"{command.line!r}: qlora-kit {command.subcommand} has no option {missing}"


def run_readme_commands(workdir: Path, env: dict[str, str]) -> None:
    """Run every non-template README command verbatim through bash in ``workdir``, in order."""
    for name in ("docs", "scripts", "qlora_kit", "pyproject.toml", "README.md"):
        (workdir / name).symlink_to(REPO / name)
    bin_dir = str(Path(sys.executable).parent)  # what `. .venv/bin/activate` puts first on the PATH
    env = {**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}
    for command in readme_commands():
        if command.line == ACTIVATE or command.is_template:
            continue
        proc = subprocess.run(["bash", "-c", command.line], check=False, cwd=workdir, env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=1800)
        allowed = ANSWER_STATUS.get(command.subcommand, {0})
        assert proc.returncode in allowed, (f"README ({command.section}): `{command.line}` exited "
                                            f"{proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        warning_lines = WARNING_LINE.findall(proc.stderr)
        assert not warning_lines, f"`{command.line}` printed warning lines: {warning_lines}"
    assert (workdir / "runs" / "my-run" / "loss.png").is_file()


def test_readme_commands_run_verbatim(tiny_model_dir, tmp_path):
    """All README commands, with the "demo" model alias pointed at the tiny test model."""
    run_readme_commands(tmp_path, {"QLORA_KIT_DEMO_MODEL": str(tiny_model_dir)})


@pytest.mark.real_model
def test_readme_commands_run_verbatim_on_the_demo_model(demo_model_dir, tmp_path):
    """All README commands exactly as a user runs them after the set-up commands (slow on a CPU)."""
    run_readme_commands(tmp_path, {})


def test_loss_plot_has_a_title_and_axis_units(tmp_path, monkeypatch):
    """The README's run folder holds loss.png: titled by the run, loss in nats per supervised token."""
    from qlora_kit.training import metrics

    figures = []
    monkeypatch.setattr(metrics, "save_figure", lambda fig, out: figures.append(fig) or out)
    (tmp_path / "my-run").mkdir()
    log = metrics.MetricsLog(tmp_path / "my-run" / "metrics.jsonl")
    for step, loss in [(1, 2.0), (2, 1.5)]:
        log.write({"step": step, "loss": loss})
    log.write({"step": 2, "eval_loss": 1.6})
    log.plot(tmp_path / "my-run" / "loss.png")
    ax = figures[0].axes[0]
    assert "my-run" in ax.get_title() and "loss" in ax.get_title()
    assert ax.get_xlabel() == "optimizer step"
    assert "nats per supervised token" in ax.get_ylabel()
