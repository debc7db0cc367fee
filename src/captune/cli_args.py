"""argparse sub-commands generated from typed functions: a command's signature and Google-style docstring are the
only description of its arguments, so the two cannot drift apart.

    def convert(src: Path, out: Path, to: Literal["hf", "internvl"] = "hf", force: bool = False) -> None:
        '''Convert a checkpoint between layouts.          <- the command's help (then, optionally, more text)

        Args:
            src: a checkpoint folder                        <- one help line per parameter; a missing one is an error
            ...
        '''

A parameter without a default is a positional argument (a list: one or more), or a required option when it is
keyword-only (after `*`); one with a default is an option `--name-with-dashes`. Types: str, int, float, Path,
`X | None` (default None), `list[X]` (nargs), `Literal[...]` (choices), bool (`--x/--no-x`). Help ends with the
default that applies, or "(required)"; hidden aliases keep old spellings working without showing them.

A number's allowed values are part of its type: `max_tiles: Annotated[int, Range(1)] = 6` (or `AtLeast1`). The
command's parser (`Parser`) checks them once the command line is parsed, before the command runs: an invalid value is
an argparse error naming the option (`--max-tiles must be at least 1, got 0`, exit status 2), as is an unknown option,
with the command's own usage and the option it was probably meant to be.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

Aliases = Mapping[str, Iterable[str]]  # parameter name -> old option spellings, accepted but not shown


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number may take, in its parameter's annotation: `Annotated[int, Range(1)]`. `min` and `max` are
    included unless `min_open`/`max_open`; `not_above` names another parameter it may not exceed; with `sep`, the
    value is a list of whole numbers in one string ("64,128"), each checked. None (a computed default) is not."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    not_above: str | None = None
    sep: str | None = None

    def problem(self, value: float) -> str | None:
        """"must be at least 1" if `value` is out of range, else None."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        low = self.min is None or (value > self.min if self.min_open else value >= self.min)
        high = self.max is None or (value < self.max if self.max_open else value <= self.max)
        if low and high:
            return None
        parts = [f"{'greater than' if self.min_open else 'at least'} {self.min:g}"] if self.min is not None else []
        parts += [f"{'less than' if self.max_open else 'at most'} {self.max:g}"] if self.max is not None else []
        return "must be " + " and ".join(parts)


class AutoOrCount(str):
    """`auto` or a whole number at least 1, passed on as the string typed (`--gpus-per-model K`); anything else is an
    argparse error. As an annotation it is the option's type (its values a plain str) and metavar."""

    metavar = "K"

    def __new__(cls, text: str) -> str:  # type: ignore[misc]
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            raise argparse.ArgumentTypeError(f"must be auto or a whole number at least 1, got {text!r}")
        return str(text)


AtLeast0 = Annotated[int, Range(0)]  # a count that may be zero (--num-workers 0: in the main process)
AtLeast1 = Annotated[int, Range(1)]  # a count of one or more (--max-tiles, --batch-size, images)
Positive = Annotated[float, Range(0, min_open=True)]  # a quantity above zero (--epochs)


class Parser(argparse.ArgumentParser):
    """A parser whose commands check their own arguments: the ranges of numbers (`Range`), and unknown options,
    reported with the command's usage (not the top-level one) and the closest known option."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if "func" in self._defaults:  # a command, not a group of commands: everything it was given is its own
            if extras:
                self.error(unrecognized(self, extras))
            check_ranges(self, namespace)
        return namespace, extras


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's message, with the option an unknown one was probably meant to be."""
    known = [o for a in parser._actions for o in a.option_strings if o not in getattr(a, "hidden", ())]
    for extra in extras:
        close = difflib.get_close_matches(extra.split("=")[0], known, n=1) if extra.startswith("--") else []
        if close:
            return f"unrecognized arguments: {' '.join(extras)} (did you mean {close[0]}?)"
    return f"unrecognized arguments: {' '.join(extras)}"


def check_ranges(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
    """Every option with a `Range` checked; the first bad value is an argparse error (exit status 2)."""
    options = {a.dest: (a.option_strings or [a.dest])[0] for a in parser._actions}
    for action in parser._actions:
        rule: Range | None = getattr(action, "rule", None)
        value = getattr(namespace, action.dest, None)
        if rule is None or value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if rule.sep is not None:
            try:
                items = [int(v) for v in value.split(rule.sep)]
            except ValueError:
                parser.error(f"{options[action.dest]} must be whole numbers separated by {rule.sep!r}, got {value!r}")
        for item in items:
            if problem := rule.problem(item):
                parser.error(f"{options[action.dest]} {problem}, got {item}")
        other = getattr(namespace, rule.not_above, None) if rule.not_above else None
        if other is not None and value > other:
            parser.error(f"{options[action.dest]} must be at most {options[rule.not_above]} ({other}), got {value}")


class HelpFormatter(argparse.HelpFormatter):
    """Hides the old spellings of an option (hidden aliases); shows `--x [BOOL], --no-x` for FlagOrValue."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "hidden", frozenset())
        if isinstance(action, FlagOrValue):
            visible = [o for o in action.option_strings if o not in hidden]
            return ", ".join([f"{o} [BOOL]" for o in visible if o not in action.negatives] +
                             [o for o in visible if o in action.negatives])
        if hidden:
            action = copy.copy(action)
            action.option_strings = [o for o in action.option_strings if o not in hidden]
        return super()._format_action_invocation(action)


class Flag(argparse.BooleanOptionalAction):
    """`--x` / `--no-x`, its hidden aliases left out of the usage line too."""

    def format_usage(self) -> str:
        return " | ".join(o for o in self.option_strings if o not in getattr(self, "hidden", ()))


class FlagOrValue(argparse.Action):
    """`--x` (true), `--no-x` (false) or `--x VALUE` (true/false/yes/no/on/off/1/0, checked by the caller): the value
    is stored as a string, for options coerced later (as `captune train`'s overrides of a recipe)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        self.negatives = frozenset("--no-" + o[2:] for o in option_strings if o.startswith("--"))
        super().__init__([*option_strings, *sorted(self.negatives)], dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string in self.negatives and values is not None:
            parser.error(f"{option_string} takes no value")
        setattr(namespace, self.dest, "false" if option_string in self.negatives else
                "true" if values is None else values)


def option_value(argv: Sequence[str], option: str) -> str | None:
    """The value of an option on a command line, before it is parsed (`--recipe R` or `--recipe=R`)."""
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def installed_version(distribution: str) -> str:
    """A distribution's installed version, else its module's `__version__` (a source tree on sys.path)."""
    from importlib import import_module, metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return getattr(import_module(distribution), "__version__", "unknown")


def parse_docstring(func: Callable) -> tuple[str, str, dict[str, str]]:
    """(summary, further text, {parameter: help}) of a Google-style docstring."""
    doc = inspect.getdoc(func) or ""
    head, _, rest = doc.partition("\nArgs:\n")
    summary, _, details = head.strip().partition("\n\n")
    helps: dict[str, str] = {}
    name = None
    for line in rest.splitlines():
        if line.strip() and not line.startswith(" "):
            break  # the next section (Returns:, ...)
        entry = re.match(r" {1,4}(\w+)(?: \([^)]*\))?: (.*)$", line)
        if entry:
            name, helps[name] = entry[1], entry[2].strip()
        elif name and line.strip():
            helps[name] += " " + line.strip()  # a wrapped help line
    return " ".join(summary.split()), details.strip(), helps


def checked_helps(func: Callable, names: Iterable[str]) -> tuple[str, str, dict[str, str]]:
    """The docstring's parts; a parameter without a help line (or a help line without a parameter) is an error."""
    summary, details, helps = parse_docstring(func)
    names = list(names)
    missing = [n for n in names if not helps.get(n)]
    unknown = [n for n in helps if n not in names]
    if not summary or missing or unknown:
        raise TypeError(f"{func.__module__}.{func.__qualname__}: the docstring needs a summary line and one "
                        f"'name: help' line per parameter under Args: (missing {missing}, unknown {unknown})")
    return summary, details, helps


def shown(value: Any) -> str:
    """A default as the user would type it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if isinstance(value, list) else ",".join(map(str, value))
    return str(value)


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def add_argument(parser: argparse.ArgumentParser, param: inspect.Parameter, hint: Any, text: str,
                 aliases: Iterable[str] = ()) -> argparse.Action:
    """The argument of one parameter (see the module docstring)."""
    kind, aliases = _without_none(hint), tuple(aliases)
    required = param.default is inspect.Parameter.empty
    kwargs: dict[str, Any] = {}
    rules = [m for m in getattr(kind, "__metadata__", ()) if isinstance(m, Range)]  # Annotated[int, Range(1)]
    kind = typing.get_args(kind)[0] if rules else kind
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0] if typing.get_args(kind) else str
        kwargs["nargs"] = "+" if required else "*"
    if typing.get_origin(kind) is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
        kind = type(kwargs["choices"][0])
    if kind is bool:
        if required:
            raise TypeError(f"{param.name}: a bool parameter needs a default")
        kwargs["action"] = Flag
    else:
        kwargs["type"] = kind
    text = text.replace("%", "%%")
    if required and param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:  # a positional argument
        metavar = param.name.upper().removesuffix("S") if "nargs" in kwargs else param.name.upper()
        action = parser.add_argument(param.name, metavar=metavar, help=text, **kwargs)
        action.rule = rules[0] if rules else None
        return action
    if required:
        text += " (required)"
    elif param.default not in (None, "") and "(default" not in text:
        text += f" (default {shown(param.default)})"
    if kind is not bool and "choices" not in kwargs:
        kwargs["metavar"] = getattr(kind, "metavar", None) or param.name.split("_")[-1].upper()  # --max-tiles TILES
    names = ["--" + param.name.replace("_", "-"), *aliases]
    action = parser.add_argument(*names, dest=param.name, required=required,
                                 default=None if required else param.default, **kwargs)
    action.help = text  # after add_argument: BooleanOptionalAction would add a "(default: ...)" of its own
    action.hidden = frozenset([*aliases, *(("--no-" + a[2:]) for a in aliases if kind is bool)])
    action.rule = rules[0] if rules else None
    return action


def add_command(subparsers: argparse._SubParsersAction, name: str, func: Callable,
                aliases: Aliases | None = None) -> argparse.ArgumentParser:
    """`name` as a sub-command calling `func(**arguments)`: its arguments from func's signature and docstring."""
    params = inspect.signature(func).parameters
    summary, details, helps = checked_helps(func, params)
    hints = typing.get_type_hints(func, include_extras=True)
    parser = subparsers.add_parser(name, help=summary, description=f"{summary}\n\n{details}".strip(),
                                   formatter_class=HelpFormatter)
    for param in params.values():
        add_argument(parser, param, hints.get(param.name, str), helps[param.name], (aliases or {}).get(param.name, ()))
    parser.set_defaults(func=lambda args: func(**{n: getattr(args, n) for n in params}))
    return parser


def add_commands(subparsers: argparse._SubParsersAction, table: Mapping[str, Any],
                 aliases: Mapping[str, Aliases] | None = None,
                 builders: Mapping[str, Callable] | None = None, path: str = "") -> None:
    """A table of sub-commands: name -> function, or -> (help, table) for a group (`captune data coco`).
    `aliases[path]` (a command's path: "data coco"; "*" for every command) hides old spellings of its options;
    `builders[path](subparsers, name, function)` builds a command's parser itself (`captune train`)."""
    aliases, builders = aliases or {}, builders or {}
    for name, entry in table.items():
        where = f"{path}{name}"
        if where in builders:
            builders[where](subparsers, name, entry)
        elif isinstance(entry, tuple):
            text, group = entry
            parser = subparsers.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
            inner = parser.add_subparsers(dest=f"{where.replace(' ', '_')}_command", required=True,
                                          metavar="COMMAND")
            add_commands(inner, group, aliases, builders, f"{where} ")
        else:
            add_command(subparsers, name, entry, {**aliases.get("*", {}), **aliases.get(where, {})})


def add_config_options(parser: argparse.ArgumentParser, config: type, helps: Mapping[str, str], applies: Any,
                       required: Iterable[str] = (), skip: Iterable[str] = (), aliases: Aliases | None = None) -> None:
    """One option per field of a dataclass, values kept as the strings typed (the caller coerces them): `--x VALUE`,
    bools also `--x` and `--no-x`. Help: helps[field], then "(required)" or the value `applies` (an instance, with
    a `recipe` name) gives it, e.g. "(internvl2_2b_coco_lora: 16384)"."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        if not helps.get(f.name):
            raise TypeError(f"{config.__name__}.{f.name}: no help line")
        value = getattr(applies, f.name)
        suffix = ("required" if f.name in required and not value else f"{applies.recipe}: {shown(value)}"
                  if value != "" else "" if "(default" in helps[f.name] else "unset")
        names = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, ())]
        hidden = [*names[1:], *(("--no-" + a[2:]) for a in names[1:] if hints[f.name] is bool)]
        text = (f"{helps[f.name]} ({suffix})" if suffix else helps[f.name]).replace("%", "%%")
        if hints[f.name] is bool:
            action = parser.add_argument(*names, dest=f.name, action=FlagOrValue, default=None, help=text)
        else:
            action = parser.add_argument(*names, dest=f.name, default=None, metavar=f.name.split("_")[-1].upper(),
                                         help=text)
        action.hidden = frozenset(hidden)
