"""Command-line options declared once, as dataclass fields: name, type, default, unit and help.

Every ``fedswarm`` command has a small dataclass of its options; ``add_arguments`` turns each
field into an argparse option (``--kebab-case``, typed from the annotation, the default and unit
in its help), so an option is never declared twice. Options that several commands share (the
model, the data, the token length, the swarm registries, the coordinator's certificate...) are
the field factories at the end of this module. Only the standard library is imported here, so
building the CLI stays light.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any, TypeVar

from fedswarm.common.model import DEFAULT_MODEL

T = TypeVar("T")

GIVEN = "_given_options"  # Namespace attribute: the dests of the options given on the command line
OPTION_CLASSES = "_option_classes"  # parser default: the dataclasses its options were generated from
MODELS = "smollm2-135m, tiny, or a local HF folder"
DATA = "sarcasm, diabetes, or a .jsonl/.csv file"


def option(default: Any, help: str, unit: str = "", **argparse_extras: Any) -> Any:
    """A dataclass field that ``add_arguments`` turns into a documented ``--kebab-case`` option.

    ``unit`` goes into the help beside the default; ``argparse_extras`` are ``metavar``,
    ``nargs`` ("+"), ``repeat`` (the option may be given several times: a list) and ``group``
    (options of one group exclude each other).
    """
    return field(default=default, metadata={"help": help, "unit": unit, **argparse_extras})


def required(help: str, unit: str = "", **argparse_extras: Any) -> Any:
    """A field without a default: a required ``--option``."""
    return field(metadata={"help": help, "unit": unit, "required": True, **argparse_extras})


def positional(help: str, metavar: str | None = None) -> Any:
    """A field without a default, given as a positional argument."""
    return field(metadata={"help": help, "positional": True, "metavar": metavar})


def flag(help: str) -> Any:
    """A ``--flag`` that is off unless given (no ``--no-flag``)."""
    return field(default=False, metadata={"help": help, "flag": True})


def _mark_given(namespace: argparse.Namespace, dest: str) -> None:
    vars(namespace).setdefault(GIVEN, set()).add(dest)


class _Store(argparse.Action):
    """``store``, remembering that the option was given (a default cannot tell that apart)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, *_: Any) -> None:
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest)


class _Append(argparse.Action):
    """``append`` onto a fresh list (never onto the default), remembering that it was given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, *_: Any) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        _mark_given(namespace, self.dest)


class _Flag(argparse.Action):
    """``store_true``, remembering that it was given."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = False, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any) -> None:
        setattr(namespace, self.dest, True)
        _mark_given(namespace, self.dest)


class _Toggle(argparse.BooleanOptionalAction):
    """``--flag/--no-flag``, remembering that it was given."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        super().__call__(parser, namespace, values, option_string)
        _mark_given(namespace, self.dest)


def given_options(args: argparse.Namespace, cls: type | None = None) -> set[str]:
    """Field names of the options given on the command line (``add_arguments`` options only; of ``cls``'s fields)."""
    given = set(vars(args).get(GIVEN, ()))
    return given if cls is None else given & {f.name for f in fields(cls)}


def flag_name(name: str) -> str:
    """``local_steps`` -> ``--local-steps``."""
    return f"--{name.replace('_', '-')}"


def value_type(cls: type, f: Field) -> type:
    """The type argparse converts a field's value to: its annotation, less ``| None`` and the list around it."""
    hint = typing.get_type_hints(cls).get(f.name, str)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
    elif typing.get_origin(hint) in (list, tuple):
        hint = args[0]
    return hint if isinstance(hint, type) else str


def help_text(f: Field) -> str:
    """The field's help, with its unit and default where it has them."""
    text, unit = f.metadata.get("help", ""), f.metadata.get("unit", "")
    if f.metadata.get("flag") or isinstance(f.default, bool):
        return text
    if f.default is MISSING or f.default is None:
        return f"{text} ({unit})" if unit else text
    shown = "''" if f.default == "" else f.default
    return f"{text} ({unit}; default: {shown})" if unit else f"{text} (default: {shown})"


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per dataclass field, typed and documented from it; the parser remembers ``cls``."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(cls):
        meta = f.metadata
        target: Any = parser
        if group := meta.get("group"):
            if group not in groups:
                groups[group] = parser.add_mutually_exclusive_group()
            target = groups[group]
        kwargs: dict[str, Any] = {"help": help_text(f)}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("positional"):
            target.add_argument(f.name, type=value_type(cls, f), **kwargs)
            continue
        name = flag_name(f.name)
        default = None if f.default is MISSING else f.default
        if meta.get("flag"):
            target.add_argument(name, action=_Flag, default=default, **kwargs)
        elif isinstance(default, bool):
            target.add_argument(name, action=_Toggle, default=default, **kwargs)
        else:
            if meta.get("required"):
                kwargs["required"] = True
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
            action = _Append if meta.get("repeat") else _Store
            target.add_argument(name, type=value_type(cls, f), action=action, default=default, **kwargs)
    parser.set_defaults(**{OPTION_CLASSES: (*(parser.get_default(OPTION_CLASSES) or ()), cls)})


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` from the parsed options (other attributes of ``args`` are ignored)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# Options several commands share: declared here once.


def model_option(default: str | None = DEFAULT_MODEL, help: str = f"base model: {MODELS}") -> Any:
    return option(default, help)


def data_option(default: str | None = "sarcasm", help: str = f"data: {DATA}") -> Any:
    return required(help) if default is None else option(default, help)


def max_seq_len_option(default: int = 128) -> Any:
    return option(default, "tokens per example (prompt cut from the left)")


def threads_option(help: str = "torch threads (0: torch's default)") -> Any:
    return option(0, help)


def host_option(default: str = "127.0.0.1") -> Any:
    return option(default, "interface to listen on")


def registry_option() -> Any:
    return required("HOST:PORT; repeat for several registries", repeat=True)


def root_cert_option(help: str = "the coordinator's ca.crt (from `fedswarm certs`)") -> Any:
    return option(None, help)
