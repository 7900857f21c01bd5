"""Command-line options as typed dataclasses: each flag is declared once, as a field.

A command's options class (@option_class: frozen, keyword-only) declares every flag as a field:
the annotation is the value's type (`X | None`, a Literal for choices, `tuple[X, ...]` for several
values), and option() gives its default, help and argparse extras. add_options() turns the class
into argparse arguments, so defaults and help exist only here; read_options() turns what argparse
parsed back into the class. A field declared with group() nests another options class, whose
flags are added alongside (under a title, as an argparse group, when one is given): flags that
two commands share are one class, written once.

Values are checked where they are declared: a field's `convert` (the parsed text -> the value)
and the class's __post_init__ raise ValueError with a message that names the flag. read_options()
turns it into OptionError, which the caller reports as argparse reports its own errors
(usage_error(): usage line, message, exit status 2) rather than as a traceback.
Stdlib only: `dinserve --help` must stay fast and torch-free (tests/test_cli.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, dataclass_transform

T = TypeVar("T")

USAGE_ERROR = 2  # argparse's exit status for a bad command line
_OPTION = "dinserve.option"
_GROUP = "dinserve.option_group"


class OptionError(ValueError):
    """A flag's value parsed but is not acceptable; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one field appears on the command line (the arguments of option())."""

    default: Any  # as given on the command line, before `convert`; MISSING when required
    help: str
    flag: str | None
    positional: bool
    nargs: str | None
    metavar: str | None
    append: bool
    type: Callable[[str], Any] | None
    convert: Callable[[Any], Any] | None
    group: str | None


def option(
    *,
    default: Any = dataclasses.MISSING,
    help: str,
    flag: str | None = None,
    positional: bool = False,
    nargs: str | None = None,
    metavar: str | None = None,
    append: bool = False,
    type: Callable[[str], Any] | None = None,
    convert: Callable[[Any], Any] | None = None,
    group: str | None = None,
) -> Any:
    """A field that is a command-line flag.

    Args:
        default: the value when the flag is not given; none makes the flag required. A bool
            field is a switch: --name sets a False default, `flag` (e.g. --no-name) clears True.
        help: the --help text; `%(default)s` shows the default.
        flag: the flag's name, when not --field-name.
        positional: an argument without a flag (e.g. compare's URLs).
        nargs, metavar: as in argparse.
        append: repeatable flag; argparse collects the texts in a list.
        type: argparse's conversion of one word; default: the annotation's type, or str when
            `convert` is given.
        convert: the parsed value (the default included) -> the field's value, raising
            ValueError naming the flag; the field's default is convert(default).
        group: the argparse group (help section) the flag is listed in.
    """
    spec = _Spec(default, help, flag, positional, nargs, metavar, append, type, convert, group)
    metadata = {_OPTION: spec}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if convert is not None:
        return dataclasses.field(default_factory=functools.partial(convert, default),
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def group(*, factory: Callable[[], Any] | None = None, title: str | None = None) -> Any:
    """A field holding another options class; its flags join the command's, under `title`.

    `factory` makes its default (the class itself, when every flag in it has a default).
    """
    if factory is None:
        return dataclasses.field(metadata={_GROUP: title})
    return dataclasses.field(default_factory=factory, metadata={_GROUP: title})


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(option, group))
def option_class(cls: type[T]) -> type[T]:
    """A frozen, keyword-only dataclass whose fields are option()s and group()s."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def description(cls: type[Any]) -> str:
    """A command's --help description: its options class's docstring."""
    return inspect.cleandoc(cls.__doc__ or "")


def add_options(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add every flag of an options class (and of its groups) to parser."""
    sections: dict[str | None, argparse._ActionsContainer] = {None: parser}
    _add_fields(parser, cls, None, sections, set())


def _add_fields(parser: argparse.ArgumentParser, cls: type[Any], title: str | None,
                sections: dict[str | None, argparse._ActionsContainer], dests: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _GROUP in f.metadata:
            _add_fields(parser, hints[f.name], f.metadata[_GROUP] or title, sections, dests)
            continue
        # Groups flatten into one namespace: a name twice would make one flag shadow the other.
        if f.name in dests:
            raise TypeError(f"{cls.__name__}.{f.name}: a second option of that name")
        dests.add(f.name)
        spec: _Spec = f.metadata[_OPTION]
        section = spec.group or title
        if section not in sections:
            sections[section] = parser.add_argument_group(section)
        _add_argument(sections[section], f.name, hints[f.name], spec)


def _add_argument(container: argparse._ActionsContainer, name: str, annotation: Any,
                  spec: _Spec) -> None:
    value_type, choices = _word_type(annotation)
    kwargs: dict[str, Any] = {"help": spec.help}
    if spec.default is not dataclasses.MISSING:
        # A list, not a tuple: argparse appends to it, and shows it as the old flags did.
        default = spec.default
        kwargs["default"] = list(default) if isinstance(default, tuple) else default
    if value_type is bool and spec.convert is None:
        kwargs["action"] = "store_false" if spec.default else "store_true"
    else:
        kwargs["type"] = spec.type or (str if spec.convert else value_type)
        if choices is not None and spec.convert is None:
            kwargs["choices"] = list(choices)
        for key in ("nargs", "metavar"):
            if getattr(spec, key) is not None:
                kwargs[key] = getattr(spec, key)
        if spec.append:
            kwargs["action"] = "append"
    if spec.positional:
        container.add_argument(name, **kwargs)
        return
    if spec.default is dataclasses.MISSING:
        kwargs["required"] = True
    container.add_argument(spec.flag or f"--{name.replace('_', '-')}", dest=name, **kwargs)


def _word_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """What argparse converts one word to, and the allowed values when it is a Literal."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):  # X | None: None is the unset default
        (inner,) = [a for a in args if a is not type(None)]
        return _word_type(inner)
    if origin in (tuple, list):  # several words (nargs or append), each an X
        return _word_type(args[0])
    if origin is Literal:
        return type(args[0]), args
    return annotation, None


def read_options(cls: type[T], namespace: argparse.Namespace) -> T:
    """The options object from parse_args()'s namespace; OptionError for a value it refuses."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is an @option_class
        if _GROUP in f.metadata:
            values[f.name] = read_options(hints[f.name], namespace)
            continue
        spec: _Spec = f.metadata[_OPTION]
        value = getattr(namespace, f.name)
        try:
            if spec.convert is not None:
                value = spec.convert(value)
            elif isinstance(value, list):
                value = tuple(value)
        except ValueError as exc:
            raise OptionError(str(exc)) from exc
        values[f.name] = value
    try:
        return cls(**values)
    except OptionError:
        raise
    except ValueError as exc:  # __post_init__ refused a combination of values
        raise OptionError(str(exc)) from exc


def flat(options: Any) -> dict[str, Any]:
    """Every option's value by its name (the argparse dest), the groups' included."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if _GROUP in f.metadata:
            values.update(flat(value))
        else:
            values[f.name] = value
    return values


def usage_error(parser: argparse.ArgumentParser, error: OptionError) -> int:
    """Report a refused value as parser.error() would, but return its exit status."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    return USAGE_ERROR
