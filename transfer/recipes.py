"""What the dense-task recipes share without a framework: settings a paper gives per backbone size."""

from __future__ import annotations

from collections.abc import Mapping

from mimbench.core.errors import ConfigError


def per_arch(value: float | None, by_arch: Mapping[str, float], arch: str, flag: str) -> float:
    """``value`` where the recipe (or its flag) sets one, else the recipe's value for ``arch``; a recipe without
    one for ``arch`` stops with a line naming ``flag``."""
    if value is not None:
        return value
    if arch not in by_arch:
        raise ConfigError(f"this preset sets {flag.lstrip('-')} per backbone ({dict(by_arch)}), not for {arch}; "
                          f"give {flag}")
    return by_arch[arch]
