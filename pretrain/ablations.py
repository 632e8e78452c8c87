"""The MixedAE poster's ablations and analysis at CPU scale, as plans of pretraining runs for the chain to execute
(``python -m mimbench.chain ablations``), and the analysis figure.

Each entry is one pretraining run of ``--method mixedae`` on the embedded data with the same small ViT and budget
(the ``embedded_cpu`` preset), differing only in the method options listed; its records are tagged
``ablation=<name>`` and ``variant=<variant>`` so ``make tables`` prints them next to the poster's reference rows
(``tables/reference/mixedae_cvpr2023_ablations.csv``, whose variant names the objective rows use). Entries with the
same options are one configuration (:func:`configurations`): the chain trains and probes it once.

The analysis (the poster's "Effect of Homo Recognition" figure): ``homo_acc`` of every homologous block over
training, with and without L_HomoCon (:func:`analysis_runs`), over several seeds, in one figure
(:func:`homo_acc_figure`) drawn from the per-step scalars the engine logs (``pretrain/homo_acc/block<i>``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimbench.core.io import atomic_write


@dataclass(frozen=True)
class AblationRun:
    ablation: str  # the table's ablation name ("objective" is the poster's (b))
    variant: str  # the row within it
    options: dict[str, Any] = field(default_factory=dict)  # MixedAEConfig fields that differ from the defaults

    @property
    def tags(self) -> dict[str, str]:
        return {"ablation": self.ablation, "variant": self.variant}

    @property
    def config_name(self) -> str:
        """The configuration as a folder name: its flags joined (``default`` for none)."""
        return "-".join(flag.lstrip("-") for flag in self.flags()) or "default"

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


def configurations(runs: Sequence[AblationRun]) -> list[list[AblationRun]]:
    """The runs grouped by identical options, in order of first appearance: one training per group (e.g. the
    objective's "L_recon + L_HomoCon", segment embedding "on" and homologous attention "on" are all the default)."""
    groups: dict[str, list[AblationRun]] = {}
    for run in runs:
        groups.setdefault(run.config_name, []).append(run)
    return list(groups.values())


def analysis_runs() -> list[AblationRun]:
    """The analysis figure's two configurations: MixedAE as it is, and without L_HomoCon (contrastive weight 0,
    the objective ablation's "L_recon" row)."""
    return [AblationRun("analysis", "with L_HomoCon"),
            AblationRun("analysis", "without L_HomoCon", dict(contrastive_weight=0.0))]


HOMO_ACC_TAG = re.compile(r"pretrain/homo_acc/block(\d+)$")


def homo_acc_curves(scalars: Mapping[str, Mapping[int, float]]) -> dict[int, tuple[list[int], list[float]]]:
    """Per homologous block, (steps, homo_acc) in step order, from a run's scalars by TensorBoard tag."""
    curves = {}
    for tag, by_step in scalars.items():
        if match := HOMO_ACC_TAG.match(tag):
            steps = sorted(by_step)
            curves[int(match.group(1))] = (steps, [by_step[step] for step in steps])
    return dict(sorted(curves.items()))


def homo_acc_figure(curves: Mapping[str, Sequence[Mapping[int, tuple[list[int], list[float]]]]],
                    path: Path) -> list[Path]:
    """One figure, a panel per homologous block: homo_acc over training for each configuration (a colour; one
    thin line per seed, their mean bold). ``curves``: configuration -> one :func:`homo_acc_curves` per seed.
    Written as ``path`` with .png and .pdf; returns both paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = sorted({block for runs in curves.values() for run in runs for block in run})
    columns = min(4, max(1, len(blocks)))
    rows = -(-len(blocks) // columns) if blocks else 1
    figure = Figure(figsize=(3.2 * columns, 2.4 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True).flatten()
    for axis, block in zip(axes, blocks, strict=False):
        for colour, (label, runs) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), curves.items(),
                                         strict=False):
            seeds = [run[block] for run in runs if block in run]
            for steps, values in seeds:
                axis.plot(steps, values, color=colour, linewidth=0.7, alpha=0.45)
            length = min(len(values) for _, values in seeds)
            mean = [sum(values[i] for _, values in seeds) / len(seeds) for i in range(length)]
            axis.plot(seeds[0][0][:length], mean, color=colour, linewidth=1.8, label=f"{label} (n={len(seeds)})")
        axis.set_title(f"block {block}", fontsize="medium")
        axis.grid(alpha=0.3)
    for axis in axes[len(blocks):]:
        axis.axis("off")
    axes[0].legend(fontsize="small")
    figure.supxlabel("pretraining step")
    figure.supylabel("homo_acc (share of TopK keys that are homologous)")
    figure.suptitle("Homologous recognition accuracy per homologous block, with and without L_HomoCon")
    return [atomic_write(path.with_suffix(f".{kind}"), lambda tmp, kind=kind: figure.savefig(tmp, format=kind, dpi=120))
            for kind in ("png", "pdf")]


def homo_acc_summary(curves: Mapping[str, Sequence[Mapping[int, tuple[list[int], list[float]]]]]) -> Any:
    """Per block (rows) and configuration: the last quarter's mean ("final"), the mean |change| between
    consecutive steps after the first quarter ("jitter"), and the first step at 90% of the rise from the first
    value to the final one ("t90"); each the mean over seeds. A pandas DataFrame."""
    import numpy as np
    import pandas as pd

    def measures(steps: list[int], values: list[float]) -> tuple[float, float, float]:
        values_ = np.asarray(values)
        quarter = max(1, len(values_) // 4)
        final = float(values_[-quarter:].mean())
        reached = np.flatnonzero((values_ - values_[0]) * np.sign(final - values_[0]) >= 0.9 * abs(final - values_[0]))
        return final, float(np.abs(np.diff(values_[quarter:])).mean()), float(steps[reached[0]])

    table: dict[str, dict[int, float]] = {}
    for label, runs in curves.items():
        for block in sorted({block for run in runs for block in run}):
            per_seed = np.array([measures(*run[block]) for run in runs if block in run])
            for name, value in zip(("final", "jitter", "t90"), per_seed.mean(axis=0), strict=True):
                table.setdefault(f"{label}: {name}", {})[block] = round(float(value), 4)
    frame = pd.DataFrame(table)
    frame.index.name = "block"
    return frame
