"""The `dinserve` command line: one entry point, one subcommand per job.

Only the table of commands and the parsing live here. Each command's flags are declared once, by
its options class (dinserve/commands.py, dinserve/bench_commands.py), and its handler receives
that typed object. Handlers are imported when their command runs, so `dinserve serve` and
`dinserve --help` never import torch (only train/export/bench need it), nor bench/ or
model_export/, which the service image does not ship.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dinserve.bench_commands import (
    BenchOptions,
    CeilingOptions,
    CompareOptions,
    LoadtestOptions,
    SoakOptions,
)
from dinserve.commands import (
    DemoOptions,
    ExportOptions,
    HistoryLoadOptions,
    OpenapiOptions,
    ServeOptions,
    TrainOptions,
)
from dinserve.options import OptionError, add_options, description, read_options, usage_error


@dataclass(frozen=True)
class Command:
    """A subcommand: the options class that declares its flags and the handler that runs it."""

    name: str
    options: type[Any]
    handler: str  # "module:function", taking an instance of `options`, returning the exit status
    help: str  # its line in the parent command's --help
    extra: str | None = None  # the pyproject extra its handler's imports come from, if any

    def add_to(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        parser = commands.add_parser(self.name, help=self.help,
                                     description=description(self.options))
        add_options(parser, self.options)
        parser.set_defaults(_command=self, _parser=parser)

    def run(self, options: Any) -> int:
        module_name, _, func_name = self.handler.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # An install without the command's extra (the service image has none, nor the
            # offline and load-tool packages): say which.
            if self.extra is None:
                raise
            print(f"dinserve {self.name}: needs the '{self.extra}' extra (no module "
                  f"{exc.name!r}): pip install 'dinserve[{self.extra}]'", file=sys.stderr)
            return 1
        return int(getattr(module, func_name)(options) or 0)


@dataclass(frozen=True)
class CommandGroup:
    """A subcommand that only holds subcommands, e.g. `dinserve history load`."""

    name: str
    help: str
    commands: tuple[Command, ...]

    def add_to(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        parser = commands.add_parser(self.name, help=self.help)
        names = ",".join(command.name for command in self.commands)
        sub = parser.add_subparsers(dest=f"{self.name}_command", required=True,
                                    metavar=f"{{{names}}}")
        for command in self.commands:
            command.add_to(sub)


COMMANDS: tuple[Command | CommandGroup, ...] = (
    Command("train", TrainOptions, "model_export.train:run",
            "train a DIN and its BaseModel on an interaction log",
            extra="export"),
    Command("export", ExportOptions, "model_export.export:run",
            "export a trained checkpoint to a self-checking ONNX bundle",
            extra="export"),
    Command("serve", ServeOptions, "service.__main__:run_cli",
            "run the scoring service (flags override CTR_* environment settings)"),
    CommandGroup("history", "manage behaviour histories in Redis", (
        Command("load", HistoryLoadOptions, "service.history_loader:run",
                "bulk-load users' histories from an interaction log"),
    )),
    Command("demo", DemoOptions, "dinserve.demo:run",
            "train, export, load histories and serve the MovieLens demo; prints a curl"),
    Command("openapi", OpenapiOptions, "dinserve.openapi:run",
            "write the service's OpenAPI document (docs/openapi.json)"),
    Command("loadtest", LoadtestOptions, "bench.loadtest:run",
            "open-loop load test of a scoring URL (staging), or find its saturation rate",
            extra="load"),
    Command("compare", CompareOptions, "bench.compare:run",
            "endpoints side by side, one request at a time, the same bodies to each",
            extra="load"),
    Command("bench", BenchOptions, "bench.graph:run",
            "time the serving graph against the tiled graph and PyTorch (same weights)",
            extra="export"),
    Command("ceiling", CeilingOptions, "bench.ceiling:run",
            "the graph's own ceiling: calls/s of a bundle's serving graph, nothing else running",
            extra="load"),
    Command("soak", SoakOptions, "bench.soak:run",
            "run the service under steady load for a long time; report errors, p99 drift, RSS",
            extra="load"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinserve",
        description="Deep Interest Network CTR scoring: train, export, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    command: Command = namespace._command
    try:
        options = read_options(command.options, namespace)
    except OptionError as exc:
        return usage_error(namespace._parser, exc)
    return command.run(options)


if __name__ == "__main__":
    sys.exit(main())
