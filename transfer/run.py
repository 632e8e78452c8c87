"""Evaluate a checkpoint downstream; every run appends one record to the results store.

    python transfer/run.py cifar100 --ckpt mixedae.pth --protocol linear --data-root /data/cifar
    python transfer/run.py flowers --ckpt mixedae.pth --protocol finetune --data-root /data/flowers
    torchrun --nproc_per_node 8 transfer/run.py imagenet --ckpt mixedae.pth --protocol finetune --data-root /imagenet
    python transfer/run.py digits --ckpt runs/demo/mae/encoder.safetensors      # bundled digits, CPU, a minute
    python transfer/run.py digits --config runs/transfer/digits/linear/x/seed0/config.yaml --out runs/replay
    python transfer/run.py coco --ckpt mixedae.pth --data-root /datasets/coco --num-gpus 8   # Mask R-CNN
    python transfer/run.py ade20k --ckpt mixedae.pth --data-root /datasets/ADEChallengeData2016   # UperNet

Classification datasets: aircraft caltech101 cars cifar10 cifar100 dtd flowers food pets sun397 voc2007 imagenet,
and digits (the 1797 8x8 digits scikit-learn ships). Any checkpoint the loader reads works: ours, official MAE /
RC-MAE, timm, MMPretrain, ..., a ViT or a hierarchical backbone. Fine-tuning follows a recipe: --preset NAME (or
--recipe NAME; default by dataset and protocol), then any of its fields as a flag (--epochs, --base-lr, ...).
--precision auto|fp32|bf16 chooses the arithmetic. The run directory (--out) keeps config.yaml: --config FILE
replays that run; a folder that holds a run is continued with --resume only, and only with the same settings.
Results go to results/results.jsonl (or --results / $MIMBENCH_RESULTS); ``make tables`` reads them.
"""

from __future__ import annotations

import importlib
import sys

from mimbench.core.config import exit_status, print_config, wants_printed_config

# Tasks served by the other adapters; each parses its own flags (``transfer/run.py coco --help``).
ADAPTERS = {"coco": "mimbench.transfer.coco", "ade20k": "mimbench.transfer.ade20k"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ADAPTERS:  # detection and segmentation: imported only when asked for
        return importlib.import_module(ADAPTERS[argv[0]]).main(argv[1:])
    from mimbench.transfer.classification import parse_args, protocol_options, run_classification, run_protocol

    if wants_printed_config(argv):  # the protocol's own options, as the run would resolve them
        return exit_status(lambda: print_config(config := protocol_options(parse_args(argv, description=__doc__), {}),
                                                run_protocol(config)))
    return exit_status(lambda: run_classification(parse_args(argv, description=__doc__)))


if __name__ == "__main__":
    sys.exit(main())
