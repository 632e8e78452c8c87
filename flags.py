"""Command-line helpers: flags generated from config dataclasses (configs stay data, the command line follows
them), and one way for an entry point to report an expected failure."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_class: type,
                        skip: set[str] = frozenset()) -> None:
    """One ``--flag`` per field (default None, so a caller sees what was given): ``bool`` → ``--x/--no-x``,
    ``list``/``tuple`` of int or float → several values, ``X | None`` → ``X``."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if typing.get_origin(kind) is typing.Union or type(kind).__name__ == "UnionType":  # X | None -> X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(kind) in (list, tuple):
            element = typing.get_args(kind)[0] if typing.get_args(kind) else int
            parser.add_argument(flag, type=element, nargs="*", default=None)
        else:
            parser.add_argument(flag, type=kind if kind in (int, float, str) else str, default=None)


def exit_status(action: Callable[[], object], expected: tuple[type[BaseException], ...]) -> int:
    """Run ``action``: 0, or 1 after one ``error:`` line on stderr for an expected failure (bad input, a
    diverged run); anything else is a bug and keeps its traceback."""
    try:
        action()
    except expected as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
