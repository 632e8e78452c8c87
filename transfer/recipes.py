"""What the transfer recipes share without a framework: settings a paper gives per backbone size."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Mapping
from pathlib import Path

from mimbench.backbones.checkpoint import infer_arch
from mimbench.backbones.vit import ARCHS
from mimbench.core.errors import ConfigError, UserError


def per_arch(value: float | None, by_arch: Mapping[str, float], arch: str, flag: str) -> float:
    """``value`` where the recipe (or its flag) sets one, else the recipe's value for ``arch``; a recipe without
    one for ``arch`` stops with a line naming ``flag``."""
    if value is not None:
        return value
    if arch not in by_arch:
        raise ConfigError(f"this preset sets {flag.lstrip('-')} per backbone ({dict(by_arch)}), not for {arch}; "
                          f"give {flag}")
    return by_arch[arch]


def vit_width(argv: list[str] | None) -> int | None:
    """The width (embed dim) of the ViT a command line evaluates: ``--arch``'s, else the checkpoint's; None for
    another backbone or a checkpoint that cannot be read (the loader's own check reports it). The papers' recipes
    differ by ViT size (MAE's fine-tuning, ViTDet), so a task's default preset follows it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt")
    pre.add_argument("--arch")
    pre.add_argument("--which", default="teacher")
    known = pre.parse_known_args(argv)[0]
    arch = known.arch
    if arch is None and known.ckpt and Path(known.ckpt).is_file():
        with contextlib.suppress(UserError):
            arch = infer_arch(known.ckpt, known.which)
    return ARCHS.get(arch or "", {}).get("embed_dim")
