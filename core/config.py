"""Configurations as data: one shared :class:`RunSpec`, a task's own fields and a recipe from named presets.

A task's config is a dataclass with a ``run: RunSpec`` field, a ``preset: str`` name and a ``recipe`` dataclass
taken from the task's presets (each derived from a base with ``dataclasses.replace``, Detectron2's "import the
base, change what differs"). On the command line (:func:`parse_config`) every leaf field of that tree is a
``--flag`` of its own name, and the configuration is resolved in this order:

    the dataclass defaults  <  --config FILE.yaml  <  --preset NAME (else the file's, else the default)  <  flags

``--embedded`` is the one shortcut to the generated data: write the task's embedded set if it is absent (at its
default root, or at ``--data-root`` when one is given), then run on that root with the set's preset. The resolved
configuration goes to the run directory as ``config.yaml``; passing that file back with ``--config`` replays the
run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimbench.core.errors import ConfigError, UserError


@dataclass
class RunSpec:
    """The fields every run has, whatever its task."""

    ckpt: str | None = None  # the checkpoint to evaluate (any format the loader reads)
    which: str = "teacher"  # RC-MAE / DINO files hold student and teacher
    arch: str | None = None  # None: from the checkpoint's metadata or shapes
    method: str | None = None  # for foreign checkpoints without metadata (e.g. "mae")
    data_root: str | None = None
    out: str | None = None  # the run directory; None: a name derived from task, preset and checkpoint
    resume: bool = False  # continue the run in --out (see mimbench.core.rundir)
    seed: int = 0
    device: str | None = None  # None: cuda when available
    precision: str = "auto"  # auto | fp32 | bf16 (mimbench.core.runtime)
    results: str | None = None  # the results store; None: $MIMBENCH_RESULTS or results/results.jsonl
    # key=value labels of the run's records (e.g. ablation=objective variant=L_recon): the tables group rows by them
    tags: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        parse_tags(self.tags)  # a malformed tag stops the run before any work


def parse_tags(tags: list[str]) -> dict[str, str]:
    """``RunSpec.tags`` as the record's mapping; a tag without ``=`` is a :class:`ConfigError`."""
    parsed = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ConfigError(f"tag {tag!r} is not key=value")
        parsed[key] = value
    return parsed


def record_tags(run: RunSpec, **task_tags: str | None) -> dict[str, str]:
    """A record's tags: the run's ``--tags`` and the task's own labels (those that are None left out)."""
    return {**parse_tags(run.tags), **{key: value for key, value in task_tags.items() if value is not None}}


@dataclass(frozen=True)
class Embedded:
    """A task's generated data set: where it is written, the preset it runs with, and how to write it."""

    root: str
    preset: str
    make: Callable[[Path], object]  # writes the set under the root if it is absent; reuses it otherwise


# ------------------------------------------------------------------------------------------- protocols

def protocol_id(protocols: Mapping[str, str], preset: str | None, recipe: Any, preset_recipe: Any,
                bookkeeping: tuple[str, ...] = ()) -> str:
    """The protocol a run measured under: the id its preset names (``protocols[preset]``, e.g. ``vitdet-100ep``)
    when the run's resolved recipe equals the preset's, field for field (``bookkeeping`` fields, such as how often
    it logs or checkpoints, aside); a run that changed any other field measured under a protocol of its own,
    ``<id>+<field>,<field>`` (e.g. ``vitdet-100ep+iterations,lr_steps,warmup_iters`` after ``--max-iter``), which
    the tables never put beside a number measured under the preset's."""
    named = protocols.get(preset or "", preset or "custom")
    if preset_recipe is None:
        return named
    changed = [f.name for f in dataclasses.fields(recipe) if f.name not in bookkeeping
               and getattr(recipe, f.name) != getattr(preset_recipe, f.name)]
    return f"{named}+{','.join(changed)}" if changed else named


# ---------------------------------------------------------------------------------------- the dataclass tree


def _leaf_type(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(kind) is typing.Union or type(kind).__name__ == "UnionType":
        return next(t for t in typing.get_args(kind) if t is not type(None))
    return kind


def leaves(config_class: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, type) of every non-dataclass field of a dataclass tree."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = _leaf_type(hints[field.name])
        if dataclasses.is_dataclass(kind):
            yield from leaves(kind, (*prefix, field.name))
        else:
            yield (*prefix, field.name), hints[field.name]


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_class: type,
                        skip: set[str] = frozenset()) -> None:
    """One ``--flag`` per leaf field (default None, so a caller sees what was given): ``bool`` → ``--x/--no-x``,
    ``list``/``tuple`` of int, float or str → several values, ``X | None`` → ``X``."""
    for path, hint in leaves(config_class):
        if path[-1] in skip:
            continue
        flag = "--" + path[-1].replace("_", "-")
        kind = _leaf_type(hint)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(kind) in (list, tuple):
            element = typing.get_args(kind)[0] if typing.get_args(kind) else int
            parser.add_argument(flag, type=element if element in (int, float, str) else str, nargs="*", default=None)
        elif typing.get_origin(kind) is dict or kind is dict:
            continue  # free-form mappings come from --config files only
        else:
            parser.add_argument(flag, type=kind if kind in (int, float, str) else str, default=None)


def from_dict(config_class: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build a dataclass tree from plain data (a parsed ``config.yaml``): unknown fields are an error, lists
    become tuples where the field is a tuple."""
    hints = typing.get_type_hints(config_class)
    names = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {config_class.__name__}")
    values = {}
    for name, value in data.items():
        kind = _leaf_type(hints[name])
        if dataclasses.is_dataclass(kind) and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {name} is a {type(value).__name__}, not a mapping of its fields")
            value = from_dict(kind, value, f"{where}.{name}")
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def with_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of a dataclass tree with leaf fields replaced by name (the flag's name, wherever the leaf is)."""
    changes: dict[str, Any] = {}
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            changes[field.name] = with_overrides(value, overrides)
        elif field.name in overrides:
            given = overrides[field.name]
            if typing.get_origin(_leaf_type(hints[field.name])) is tuple and isinstance(given, list):
                given = tuple(given)
            changes[field.name] = given
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------------------- the command line


def config_parser(config_class: type, prog: str, description: str | None,
                  presets: Mapping[str, Any] | None = None, embedded: Embedded | None = None,
                  skip: set[str] = frozenset()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a config.yaml (e.g. a run directory's): replays that run; flags override")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (YAML, as config.yaml records it) and exit")
    if presets:
        parser.add_argument("--preset", choices=list(presets), help="the recipe (default: the task's own)")
    if embedded is not None:
        parser.add_argument("--embedded", action="store_true",
                            help=f"the generated data set: written to --data-root (default {embedded.root}) if "
                                 f"absent, run with the {embedded.preset!r} preset")
    add_dataclass_flags(parser, config_class, skip={"preset", *skip})
    return parser


def parse_config(config_class: type, argv: list[str] | None, *, prog: str, description: str | None = None,
                 presets: Mapping[str, Any] | None = None, default_preset: str | None = None,
                 embedded: Embedded | None = None, parser: argparse.ArgumentParser | None = None,
                 before_data: Callable[[Any], object] | None = None) -> Any:
    """The resolved configuration of one run (see the module docstring for the order).

    ``before_data(config)`` runs before ``--embedded`` writes its set: the checks that must fail first (a bad
    checkpoint is reported before anything is written)."""
    parser = parser or config_parser(config_class, prog, description, presets, embedded)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    config_file, preset, use_embedded = args.pop("config", None), args.pop("preset", None), args.pop("embedded", False)
    args.pop("print_config", None)  # the entry point's (`wants_printed_config`)
    config = from_dict(config_class, _read(config_file), config_file) if config_file else config_class()
    if use_embedded:
        args["data_root"] = args.get("data_root") or embedded.root
        preset = preset or embedded.preset
    if presets:
        preset = preset or (None if config_file else default_preset)
        if preset is not None:
            if preset not in presets:
                raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(presets)}")
            config = dataclasses.replace(config, preset=preset, recipe=presets[preset])
    config = with_overrides(config, args)
    if use_embedded:
        if before_data is not None:
            before_data(config)
        embedded.make(Path(args["data_root"]))
    return config


def wants_printed_config(argv: list[str] | None) -> bool:
    """``--print-config`` among ``argv`` (``sys.argv`` when None): print the resolved configuration, run nothing."""
    return "--print-config" in (sys.argv[1:] if argv is None else argv)


def print_config(config: Any, protocol: str | None = None) -> None:
    """The resolved configuration as ``config.yaml`` records it (`mimbench.core.rundir.write_config`'s format),
    after a comment naming the protocol its records will carry, where the task has one."""
    from mimbench.core.rundir import config_yaml

    print((f"# protocol: {protocol}\n" if protocol else "") + config_yaml(to_dict(config)), end="")


def _read(path: str) -> dict[str, Any]:
    from mimbench.core.rundir import read_config

    return read_config(path)


def exit_status(action: Callable[[], object]) -> int:
    """Run ``action``: 0, or 1 after one ``error:`` line on stderr for a :class:`UserError` (bad input, a
    diverged run, a busy run directory); anything else is a bug and keeps its traceback. Either way the process
    leaves the process group the action joined (under torchrun) before it returns."""
    try:
        action()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        from mimbench.core.runtime import leave_process_group  # torch: imported by the runs, not by this module

        leave_process_group()
    return 0
