"""Pretrain a ViT with MAE, RC-MAE or MixedAE, or any backbone with labels (``--method supervised``).

    python pretrain/run.py --method mixedae --data-root /imagenet/train --out runs/mixedae300   # the paper's recipe
    torchrun --nproc_per_node 8 pretrain/run.py --method mae --data-root /imagenet/train --out runs/mae300
                                                        # 8 GPUs x 64 x 8 accumulation = the paper's 4096
    torchrun --nproc_per_node 8 pretrain/run.py --preset rcmae_vitb_1600 --data-root /imagenet/train --out runs/rc
    python pretrain/run.py --preset mae_vitb_1600 --print-config       # the MAE release's recipe, as YAML
    python pretrain/run.py --init mae_pretrain_vit_base_full.pth --data-root /imagenet/train --out runs/more
    python pretrain/run.py --method mae --embedded --out runs/demo-mae  # small ViT, bundled photos, CPU
    python pretrain/run.py --config runs/demo-mae/config.yaml --out runs/again   # replays a run

The recipe is a preset (--preset; in1k_vit_b by default, embedded_cpu with --embedded; mae_vit{b,l}_1600 and
rcmae_vit{b,l}_1600 are the releases' recipes and choose their method), and every field is a flag; the run
directory's config.yaml records the resolved configuration and --print-config prints it without running. Method
options (mask ratio, decoder size, mixing ratio, ...) are flags too: ``--method mixedae --help`` lists them. A run
directory that holds a run is continued from its newest checkpoint with --resume, and only with the same model
and data settings. --init starts from a full pretraining checkpoint (encoder and decoder; RC-MAE: student and
teacher).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mimbench.core.config import (
    Embedded,
    add_dataclass_flags,
    config_parser,
    exit_status,
    parse_config,
    print_config,
    wants_printed_config,
)
from mimbench.core.rundir import read_config
from mimbench.pretrain.data import write_embedded_photos
from mimbench.pretrain.engine import DEFAULT_PRESET, METHODS, PRESETS, PretrainConfig, Trainer, method_classes, resolve

PROG = "pretrain/run.py"
# --embedded: the bundled photos, written once as PNG files, with the CPU preset.
EMBEDDED = Embedded(root="runs/datasets/photos-embedded", preset="embedded_cpu", make=write_embedded_photos)


def chosen_method(argv: list[str] | None) -> str:
    """--method, else the method of a release's --preset, else the replayed config's, else the default: it decides
    which option flags exist."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=[*METHODS, "supervised"])
    pre.add_argument("--config")
    pre.add_argument("--preset")  # checked by the chosen method's own parser (supervised has its own presets)
    known = pre.parse_known_args(argv)[0]
    saved = read_config(known.config).get("run") if known.config else None
    preset_method = PRESETS[known.preset].for_method if known.preset in PRESETS else None
    method = known.method or preset_method or (saved.get("method") if isinstance(saved, dict) else None)
    return method or PretrainConfig().run.method


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    method = chosen_method(argv)
    # ckpt, which, results and tags are the evaluation runs' fields; --arch and --method are added once below (the
    # arch is both a run field and the recipe's, and the method has a fixed set of choices).
    parser = config_parser(PretrainConfig, PROG, __doc__, PRESETS, EMBEDDED,
                           skip={"ckpt", "which", "results", "tags", "arch", "method", "method_options", "for_method"})
    parser.add_argument("--method", choices=list(METHODS),
                        help=f"(default: a release preset's method, else {PretrainConfig().run.method})")
    parser.add_argument("--arch", help="the ViT to pretrain (default: the preset's)")
    options = parser.add_argument_group(f"{method} options")
    method_class = method_classes(method)[0]
    option_names = [field.name for field in dataclasses.fields(method_class) if field.name != "arch"]
    add_dataclass_flags(options, method_class, skip={"arch"})
    config = parse_config(PretrainConfig, argv, prog=PROG, presets=PRESETS, default_preset=DEFAULT_PRESET,
                          embedded=EMBEDDED, parser=parser)
    given = {name: value for name, value in vars(parser.parse_args(argv)).items()
             if name in option_names and value is not None}
    recipe = dataclasses.replace(config.recipe, method_options={**config.recipe.method_options, **given})
    run = dataclasses.replace(config.run, method=method)
    return resolve(dataclasses.replace(config, run=run, recipe=recipe))


def train(argv: list[str] | None) -> object:
    if chosen_method(argv) == "supervised":  # labels: its own config and the engine's Trainer subclass
        from mimbench.pretrain import supervised

        return supervised.SupervisedTrainer(supervised.parse_args(argv)).train()
    return Trainer(parse_args(argv)).train()


def main(argv: list[str] | None = None) -> int:
    if wants_printed_config(argv):
        if chosen_method(argv) == "supervised":
            from mimbench.pretrain import supervised

            return exit_status(lambda: print_config(supervised.parse_args(argv)))
        return exit_status(lambda: print_config(parse_args(argv)))
    return exit_status(lambda: train(argv))


if __name__ == "__main__":
    sys.exit(main())
