"""The `dinserve` command line as a user meets it: every subcommand's --help renders, says what
the command does, documents every flag, and mentions the flags a user needs first; --help never
imports torch; the console script and `python -m dinserve` both work. And the options behind it
(dinserve/options.py): one definition per flag, for `python -m service` too; defaults that are the
same parsed or constructed; a refused value reported as argparse reports a bad flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from dinserve.cli import build_parser, main
from dinserve.options import flat, read_options

ROOT = Path(__file__).resolve().parents[1]

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


# What no --help may import: torch (model_export's training and export code) and the load tools'
# heavy dependencies, 0.1 s or more each; and bench/ and model_export/ themselves, which the
# service image does not ship (Dockerfile) although it runs `dinserve serve`.
NOT_FOR_HELP = ("torch", "numpy", "onnxruntime", "matplotlib", "hdrh", "bench", "model_export")


@pytest.mark.parametrize("command", ["", *sorted(COMMANDS)])
def test_every_help_exits_0_without_importing_torch(command: str) -> None:
    """In a fresh interpreter; the commands come from the parser, so a new one is covered."""
    argv = [*command.split(), "--help"]
    code = (
        "import sys\n"
        "from dinserve.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, f'exit status {exc.code}'\n"
        "else:\n"
        "    raise AssertionError('--help returned instead of exiting')\n"
        f"imported = sorted({{m for m in sys.modules if m.split('.')[0] in {NOT_FOR_HELP!r}}})\n"
        "assert not imported, f'--help imported {imported}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: dinserve {command}".rstrip())


def _actions(parser: argparse.ArgumentParser) -> list[tuple[Any, ...]]:
    return [(a.option_strings, a.dest, a.default, a.type, a.choices, a.help)
            for a in parser._actions if a.dest != "help"]


def test_python_m_service_takes_exactly_the_serve_flags() -> None:
    from service.__main__ import build_parser as service_parser

    assert _actions(service_parser()) == _actions(COMMANDS["serve"])
    assert service_parser().description == COMMANDS["serve"].description


def _required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Some value for each required argument, e.g. ceiling's --model-dir, compare's URLs."""
    argv: list[str] = []
    for action in parser._actions:
        if action.required:
            argv += [*action.option_strings[:1], "x"]
    return argv


def _defaults(cls: type[Any]) -> dict[str, Any]:
    """Each option's default as the dataclass declares it, the groups' included."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values.update(_defaults(hints[f.name]))
        elif f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_flag_left_out_takes_the_options_class_default(command: str) -> None:
    """Parsed or constructed in code (LoadSettings() in the tests), the defaults are the same."""
    parser = COMMANDS[command]
    namespace = build_parser().parse_args([*command.split(), *_required_argv(parser)])
    options = read_options(namespace._command.options, namespace)
    parsed = flat(options)
    for name, default in _defaults(type(options)).items():
        assert parsed[name] == default, (command, name)


@pytest.mark.parametrize(("argv", "flag"), [
    (["loadtest", "--fractions", "0.5,half"], "--fractions"),
    (["loadtest", "--track-ratio", "1.5"], "--track-ratio"),
    (["loadtest", "--duration", "0"], "--duration"),
    (["compare", "http://127.0.0.1:9/score", "--warmup-rounds", "-1"], "--warmup-rounds"),
    (["soak", "--model-dir", "m", "--fraction", "0"], "--fraction"),
    (["soak", "--model-dir", "m", "--window", "700"], "--window"),
    (["soak", "--model-dir", "m", "--service-env", "CTR_NO_EQUALS_SIGN"], "--service-env"),
    (["train", "--seeds", "0"], "--seeds"),
    (["train", "--negatives", "0"], "--negatives"),
])
def test_a_refused_value_is_a_usage_error_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checks in the options classes surface as argparse's own errors do, not as tracebacks."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: dinserve {argv[0]}")
    message = err.splitlines()[-1]
    assert message.startswith(f"dinserve {argv[0]}: error: ") and flag in message, message


def test_choices_match_what_the_handlers_accept() -> None:
    """The option modules cannot import the torch code that defines these lists."""
    from bench.graph import WORKLOADS
    from dinserve.bench_commands import BenchOptions
    from dinserve.commands import Preset
    from model_export.din import PRESETS

    assert set(typing.get_args(Preset)) == set(PRESETS)
    workload = typing.get_args(typing.get_type_hints(BenchOptions)["workload"])[0]  # tuple[W, ...]
    assert set(typing.get_args(workload)) == set(WORKLOADS)


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [(["train", "--epochs", "1"], "torch", "export"),
     (["loadtest", "--duration", "1"], "hdrh", "load")],
)
def test_a_command_whose_extra_is_missing_says_which_to_install(
    argv: list[str], blocked: str, extra: str
) -> None:
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"from dinserve.cli import main; sys.exit(main({argv!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    assert f"needs the '{extra}' extra" in done.stderr
    assert f"pip install 'dinserve[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_history_load_refuses_a_zero_cap(capsys: pytest.CaptureFixture[str]) -> None:
    # 0 used to fall back silently to the bundle's length; a cap of nothing is a mistake.
    assert main(["history", "load", "--max-length", "0"]) == 2
    assert "--max-length must be at least 1, got 0" in capsys.readouterr().err


def test_the_load_reports_hide_the_redis_password() -> None:
    from bench.loadtest import report_config

    namespace = build_parser().parse_args(
        ["loadtest", "--redis-url", "redis://user:s3cret@127.0.0.1:6399/2"])
    options = read_options(namespace._command.options, namespace)
    config = report_config(options, options.load)
    assert config["redis_url"] == "redis://127.0.0.1:6399/2"
    assert "s3cret" not in str(config)
