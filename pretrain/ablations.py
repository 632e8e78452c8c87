"""The MixedAE poster's ablations at CPU scale, as a plan of pretraining runs for the chain to execute.

Each entry is one pretraining run of ``--method mixedae`` on the embedded data with the same small ViT and budget
(the ``embedded_cpu`` preset), differing only in the method options listed; its records are tagged
``ablation=<name>`` and ``variant=<variant>`` so ``make tables`` prints them next to the poster's reference rows
(``tables/reference/mixedae_cvpr2023_ablations.csv``, whose variant names the objective rows use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AblationRun:
    ablation: str  # the table's ablation name ("objective" is the poster's (b))
    variant: str  # the row within it
    options: dict[str, Any] = field(default_factory=dict)  # MixedAEConfig fields that differ from the defaults

    @property
    def tags(self) -> dict[str, str]:
        return {"ablation": self.ablation, "variant": self.variant}

    def flags(self) -> list[str]:
        """The pretrain/run.py flags of this run's options (a boolean as --name / --no-name)."""
        flags = []
        for name, value in self.options.items():
            flag = name.replace("_", "-")
            flags += [f"--{'' if value else 'no-'}{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
        return flags


def ablation_plan() -> list[AblationRun]:
    """The poster's ablation (b) (L_recon only / L_HomoCon only / both) and segment embeddings and homologous
    attention on/off (ours: the poster shows these components without a table row for each)."""
    return [
        AblationRun("objective", "L_recon", dict(contrastive_weight=0.0)),
        AblationRun("objective", "L_HomoCon", dict(reconstruction_weight=0.0)),
        AblationRun("objective", "L_recon + L_HomoCon"),
        AblationRun("segment embedding", "on"),
        AblationRun("segment embedding", "off", dict(segment_embedding=False)),
        AblationRun("homologous attention", "on"),
        AblationRun("homologous attention", "off", dict(homologous_last_blocks=0)),  # in no block
    ]
