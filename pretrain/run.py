"""Pretrain a ViT with MAE, RC-MAE or MixedAE.

    python pretrain/run.py --method mixedae --arch vit_base_patch16_224 --data-root /imagenet/train \\
        --epochs 300 --out runs/mixedae300
    torchrun --nproc_per_node 8 pretrain/run.py --method mae --data-root /imagenet/train --batch-size 64 \\
        --accum-steps 8 --out runs/mae300                # 8 GPUs x 64 x 8 = the paper's 4096
    python pretrain/run.py --method mae --embedded --out runs/demo-mae  # small ViT, bundled photos, CPU

Method options (mask ratio, decoder size, mixing ratio, ...) are flags too: ``--method mixedae --help``
lists them. Re-running the same command continues from the newest checkpoint in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from mimbench.core.config import add_dataclass_flags, exit_status

# Small ViTs for the embedded data: a matching small decoder and a CPU-sized schedule.
EMBEDDED_DEFAULTS: dict[str, Any] = dict(arch="vit_tiny_patch4_32", epochs=10, warmup_epochs=2, batch_size=64,
                                         base_lr=1.5e-4 * 4, num_workers=2, samples_per_epoch=2048,
                                         save_every_steps=100)
SMALL_DECODER: dict[str, Any] = dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)


def parse_args(argv: list[str] | None = None) -> Any:
    from mimbench.pretrain.engine import METHODS, PretrainConfig

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=list(METHODS), default="mae")
    method = pre.parse_known_args(argv)[0].method

    parser = argparse.ArgumentParser(prog="pretrain/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, PretrainConfig, skip={"method_options"})
    parser.set_defaults(method=method)
    options = parser.add_argument_group(f"{method} options")
    add_dataclass_flags(options, METHODS[method][0], skip={"arch"})
    args = vars(parser.parse_args(argv))

    run_fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    given = {k: v for k, v in args.items() if v is not None}
    run = {k: v for k, v in given.items() if k in run_fields}
    method_options = {k: v for k, v in given.items() if k not in run_fields}
    if not run.get("embedded") and not run.get("data_root"):
        sys.exit("error: say where the images are: --data-root DIR (ImageNet-style <DIR>/<class>/<image> or a "
                 "folder of images), or --embedded for the photos bundled with the install (a small CPU demo)")
    if run.get("embedded"):
        run = {**EMBEDDED_DEFAULTS, **run}
    from mimbench.backbones.vit import ARCHS

    if ARCHS[run.get("arch", "vit_base_patch16_224")]["embed_dim"] <= 192:
        method_options = {**SMALL_DECODER, **method_options}
    if method_options.get("homologous_blocks") is not None:
        method_options["homologous_blocks"] = tuple(method_options["homologous_blocks"])
    return PretrainConfig(**run, method_options=method_options)


def main(argv: list[str] | None = None) -> int:
    from mimbench.pretrain.engine import Trainer

    config = parse_args(argv)
    return exit_status(lambda: Trainer(config).train())


if __name__ == "__main__":
    sys.exit(main())
