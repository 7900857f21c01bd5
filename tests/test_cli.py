"""The `dinserve` command line as a user meets it: every subcommand's --help renders, says what
the command does, documents every flag, and mentions the flags a user needs first; --help never
imports torch; the console script and `python -m dinserve` both work.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from dinserve.cli import build_parser

# The flags a user reaches for first; each must appear in the command's --help.
KEY_FLAGS: dict[str, tuple[str, ...]] = {
    "train": ("--data", "--out", "--format", "--preset", "--epochs", "--max-users",
              "--user-columns", "--context-columns"),
    "export": ("--checkpoint", "--out", "--name", "--version", "--naive", "--tolerance"),
    "serve": ("--model-dir", "--redis-url", "--host", "--port"),
    "history load": ("--data", "--redis-url", "--prefix", "--model-dir", "--max-length"),
    "demo": ("--data", "--workdir", "--retrain", "--port", "--redis-url", "--max-users",
             "--epochs", "--setup-only"),
    "openapi": ("--out", "--check"),
    "loadtest": ("--url", "--rate", "--duration", "--find-saturation"),
    "bench": ("--out",),
}
REQUIRED_COMMANDS = ("train", "export", "serve", "history load", "demo")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every leaf command by its full name, e.g. 'history load'."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = subparsers(sub)
                if nested:
                    found.update({f"{name} {k}": v for k, v in nested.items()})
                else:
                    found[name] = sub
    return found


COMMANDS = subparsers(build_parser())


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command.split(), "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_required_commands_exist() -> None:
    for command in REQUIRED_COMMANDS:
        assert command in COMMANDS


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("", capsys)
    for command in COMMANDS:
        assert command.split()[0] in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_renders_and_mentions_key_flags(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys)
    assert text.startswith(f"usage: dinserve {command}")
    for flag in KEY_FLAGS.get(command, ()):
        assert flag in text, f"`dinserve {command} --help` does not mention {flag}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_and_flag_is_described(command: str) -> None:
    parser = COMMANDS[command]
    assert parser.description and len(parser.description) >= 30, (
        f"`dinserve {command}` needs a description a user can follow")
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"`dinserve {command}` flag {action.option_strings[0]} has no help"


def test_help_does_not_import_torch() -> None:
    """`dinserve serve` runs in the torch-free image: its CLI path must not touch torch."""
    code = (
        "import sys\n"
        "from dinserve.cli import main\n"
        "for argv in (['--help'], ['serve', '--help'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_console_script_and_module_entry_points() -> None:
    script = Path(sys.executable).with_name("dinserve")
    assert script.exists(), "the `dinserve` console script is installed with the package"
    for argv in ([str(script), "--help"], [sys.executable, "-m", "dinserve", "--help"]):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "demo" in result.stdout and "serve" in result.stdout


def test_unknown_command_fails_with_usage() -> None:
    result = subprocess.run([sys.executable, "-m", "dinserve", "no-such-command"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "usage: dinserve" in result.stderr
