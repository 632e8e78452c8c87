"""Evaluate a checkpoint downstream; every run appends one record to the results store.

    python transfer/run.py cifar100 --ckpt mixedae.pth --protocol linear --data-root /data/cifar
    python transfer/run.py flowers --ckpt mixedae.pth --protocol finetune --data-root /data/flowers
    torchrun --nproc_per_node 8 transfer/run.py imagenet --ckpt mixedae.pth --protocol finetune --data-root /imagenet
    python transfer/run.py digits --ckpt runs/demo/mae/encoder.safetensors      # bundled digits, CPU, a minute
    python transfer/run.py coco --ckpt mixedae.pth --data-root /datasets/coco --num-gpus 8   # Mask R-CNN
    python transfer/run.py ade20k --ckpt mixedae.pth --data-root /datasets/ADEChallengeData2016   # UperNet

Classification datasets: aircraft caltech101 cars cifar10 cifar100 dtd flowers food pets sun397 voc2007 imagenet,
and the embedded digits. Any checkpoint the loader reads works: ours, official MAE / RC-MAE, timm, MMPretrain, ...
Fine-tuning options (epochs, batch size, layer decay, ...) are flags too; ``--protocol finetune --help`` lists them.
Results go to results/results.jsonl (or --results / $MIMBENCH_RESULTS); ``make tables`` reads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any

from mimbench.core.config import add_dataclass_flags, exit_status

# Tasks served by the other adapters; each parses its own flags (``transfer/run.py coco --help``).
ADAPTERS = {"coco": "mimbench.transfer.coco", "ade20k": "mimbench.transfer.ade20k"}


def parse_args(argv: list[str] | None) -> tuple[Any, dict[str, Any]]:
    from mimbench.transfer.classification import PROTOCOLS, ClassificationConfig
    from mimbench.transfer.datasets import DATASETS
    from mimbench.transfer.finetune import FinetuneConfig

    parser = argparse.ArgumentParser(prog="transfer/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", metavar="task", help=f"one of: {', '.join([*DATASETS, *ADAPTERS])}")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="linear")
    add_dataclass_flags(parser, ClassificationConfig, skip={"dataset", "protocol", "batch_size", "num_workers"})
    options = parser.add_argument_group("fine-tuning options (defaults come from --recipe)")
    add_dataclass_flags(options, FinetuneConfig, skip={"seed", "device"})
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "ckpt" not in args:
        parser.error("--ckpt is required (a checkpoint file: ours, official MAE / RC-MAE, timm, MMPretrain, ...)")
    finetune_fields = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"seed", "device"}
    finetune = {k: v for k, v in args.items() if k in finetune_fields}
    run = {k: v for k, v in args.items() if k not in finetune_fields}
    if args["protocol"] == "linear":  # the probe's extraction shares --batch-size / --num-workers
        run.update({k: finetune.pop(k) for k in ("batch_size", "num_workers") if k in finetune})
        if finetune:
            parser.error(f"{', '.join('--' + k.replace('_', '-') for k in finetune)}: fine-tuning options, "
                         "not used by --protocol linear")
    return ClassificationConfig(**run), finetune


def main(argv: list[str] | None = None) -> int:
    from mimbench.transfer.classification import run_classification

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ADAPTERS:  # detection and segmentation: imported only when asked for
        return importlib.import_module(ADAPTERS[argv[0]]).main(argv[1:])
    config, finetune = parse_args(argv)
    return exit_status(lambda: run_classification(config, finetune))


if __name__ == "__main__":
    sys.exit(main())
