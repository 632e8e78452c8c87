"""Classification transfer of a checkpoint: linear probe or fine-tuning on one dataset, one record in the store.

Protocols (the MixedAE paper follows Kornblith et al. 2019 / Ericsson et al. 2021 for the transfer sets and MAE
for ImageNet):

- ``linear``: frozen backbone; features (a ViT's class token, or global average pool + norm; a hierarchical
  backbone's global average pool of its last stage) of train / val / test are extracted once and cached; L2
  logistic regression by L-BFGS with the regulariser chosen on val from 45 values, refit on train+val, scored on
  test (``transfer/logistic.py``).
- ``finetune``: end to end (``transfer/finetune.py``); on the transfer sets every (lr, weight decay) of a small grid
  trains on train and is scored on val, the best pair retrains on train+val and is scored on test. ImageNet uses
  the MAE recipe on the whole official train split and reports the official val (no grid).
- ``linear-lars``: MAE's linear probe (BatchNorm + linear head, LARS, 90 epochs), for ImageNet.

A run's configuration is a :class:`ClassificationConfig`: the shared :class:`~mimbench.core.config.RunSpec`, the
dataset and protocol, and either the probe's options (``probe``, linear) or the fine-tuning recipe (``recipe``, a
preset of ``transfer/finetune.py``; by default ``embedded`` for digits, ``imagenet`` for ImageNet,
``imagenet-linear`` for linear-lars, ``transfer`` otherwise).

The run directory (``--out``; by default ``runs/transfer/<dataset>/<protocol>/<checkpoint>-<sha8>/seed<seed>``,
``-per_class<N>`` appended for a slice) holds ``config.yaml`` (replayable with ``--config``), fine-tuning's
``grid/<lr, wd>/`` and ``final/`` runs, and ``record.json`` once the record is in the store. It follows the one
resume rule of :mod:`mimbench.core.rundir`: a folder holding a run (a record or a fine-tuning checkpoint) is
continued with ``--resume`` only, and only with the same configuration, up to the fields in :data:`HARMLESS`. A
finished run resumed reports its record again, neither recomputed nor appended to the store a second time.
"""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mimbench.backbones.checkpoint import backbone_from_checkpoint
from mimbench.backbones.cli import backbone_size
from mimbench.core.config import (
    RunSpec,
    config_parser,
    parse_config,
    protocol_id,
    record_tags,
    to_dict,
    wants_printed_config,
    with_overrides,
)
from mimbench.core.errors import ConfigError
from mimbench.core.io import atomic_write, file_sha256
from mimbench.core.rundir import RunLock, start_run_on_rank0
from mimbench.core.runtime import (
    PRECISIONS,
    Distributed,
    autocast_dtype,
    init_distributed,
    loader_workers,
    precision_name,
    resolve_device,
)
from mimbench.results import Result, append_result, build_result
from mimbench.transfer.datasets import (
    DATASETS,
    DatasetError,
    DatasetSpec,
    LabelledImages,
    build_dataset,
    collate_readable,
    concatenate,
    first_per_class,
)
from mimbench.transfer.features import FeatureCache, check_pool, extract_features, probe_transform
from mimbench.transfer.finetune import (
    PRESETS,
    FinetuneRecipe,
    FinetuneRun,
    build_classifier,
    eval_transform,
    input_size,
    train_transform,
)
from mimbench.transfer.logistic import REGULARISATION_GRID, select_and_evaluate
from mimbench.transfer.recipes import vit_width

PROG = "transfer/run.py"
PROTOCOLS = ("linear", "finetune", "linear-lars")
RECORD = "record.json"  # in the run directory once the record is in the store: the run is finished
# Fields a resumed run may change: they decide no number (loader workers, where records and features are kept,
# the record's labels, the resume flag itself, and --out, which names the same folder either way).
HARMLESS = ("num_workers", "results", "cache_dir", "tags", "resume", "out")
# Leaves of both the probe and the recipe: one flag sets the protocol's own.
SHARED_FLAGS = ("batch_size", "num_workers")


@dataclass(frozen=True)
class LinearProbe:
    """The linear probe's options (``--protocol linear``); the classifier is ``transfer/logistic.py``'s."""

    pool: str = "avg"  # "avg" (global average pool, + norm for a ViT) or "token" (a ViT's class token)
    batch_size: int = 128  # feature extraction
    # Loader processes: this machine's CPUs (core.runtime.loader_workers); features are computed without random
    # augmentation and in order, so the count changes no number.
    num_workers: int = loader_workers()


@dataclass
class ClassificationConfig:
    dataset: str | None = None  # a key of transfer.datasets.DATASETS (the command line's first argument)
    protocol: str = "linear"
    run: RunSpec = field(default_factory=RunSpec)
    preset: str | None = None  # the recipe's name (fine-tuning protocols)
    recipe: FinetuneRecipe | None = None  # fine-tuning protocols: how the model trains
    probe: LinearProbe | None = field(default_factory=LinearProbe)  # the linear protocol's options
    # Keep the first N images of each class in every split (train, val, test), in the split's own order: a fixed,
    # documented slice of a real dataset for quick checks. Multi-label VOC2007 counts an image under its first
    # class present (see datasets.first_per_class); trainval is the train slice followed by the val slice. The
    # record is tagged subset=per_class<N>, so it is never mistaken for the full benchmark.
    per_class: int | None = None
    cache_dir: str = "runs/feature_cache"  # the linear probe's features, shared by every run


# The protocol each fine-tuning preset measures under (a record's protocol_id; tables/reference/ rows name the same
# ids), and the linear probe's (transfer/logistic.py: L-BFGS on the pooled features, lambda chosen on val).
PRESET_PROTOCOLS = {"imagenet": "mae-finetune", "imagenet-vitl": "mae-finetune", "imagenet-vith": "mae-finetune",
                    "imagenet-rcmae-vitl": "rcmae-release-vitl-finetune", "imagenet-linear": "mae-linprobe",
                    "imagenet-linear-50ep": "mae-linprobe-50ep", "transfer": "transfer-grid",
                    "ericsson": "ericsson-finetune", "embedded": "digits-embedded"}
LINEAR_PROTOCOL = "lbfgs-linear"


def run_protocol(config: ClassificationConfig) -> str:
    """The protocol the run measures under (`mimbench.core.config.protocol_id`): the probe's id (plus ``+pool``
    for the class token), or the fine-tuning preset's when the recipe is the preset's, else the id and what
    changed."""
    if config.protocol == "linear":
        probe = config.probe or LinearProbe()
        return protocol_id({}, LINEAR_PROTOCOL, replace(LinearProbe(), pool=probe.pool), LinearProbe())
    return protocol_id(PRESET_PROTOCOLS, config.preset, config.recipe, PRESETS.get(config.preset or ""),
                       bookkeeping=("num_workers", "batch_size"))  # per process: the total is the recipe's


def default_protocol(dataset: str | None) -> str:
    """The protocol unless told: on ImageNet MAE's LARS probe (the papers' linear numbers), else our linear probe."""
    return "linear-lars" if dataset == "imagenet" else "linear"


# MAE's ImageNet recipes per ViT width (FINETUNE.md): ViT-B's for any other backbone.
IMAGENET_BY_WIDTH = {"finetune": {1024: "imagenet-vitl", 1280: "imagenet-vith"},
                     "linear-lars": {1024: "imagenet-linear-50ep", 1280: "imagenet-linear-50ep"}}


def default_preset(dataset: str | None, protocol: str, width: int | None = None) -> str | None:
    """The recipe a protocol trains with unless told: none for the linear probe; on ImageNet MAE's for the
    checkpoint's ViT size."""
    if protocol == "linear":
        return None
    if protocol == "linear-lars":
        return IMAGENET_BY_WIDTH[protocol].get(width, "imagenet-linear")
    if dataset == "imagenet":
        return IMAGENET_BY_WIDTH[protocol].get(width, "imagenet")
    return {"digits": "embedded"}.get(dataset, "transfer")


# ------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None, description: str | None = None) -> ClassificationConfig:
    """The resolved configuration of a command line (``mimbench.core.config.parse_config``'s order: defaults <
    ``--config FILE`` < ``--preset`` (``--recipe``) < flags)."""
    parser = config_parser(ClassificationConfig, PROG, description, PRESETS,
                           skip={"dataset", "protocol", *SHARED_FLAGS})
    parser.add_argument("dataset", nargs="?", help=f"one of: {', '.join(DATASETS)} (default: --config's)")
    parser.add_argument("--protocol", choices=PROTOCOLS,
                        help="default: --config's, else linear-lars on imagenet (MAE's probe), linear elsewhere")
    parser.add_argument("--recipe", dest="preset", choices=list(PRESETS), help="the same as --preset")
    for name in SHARED_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            help="the protocol's (fine-tuning: the recipe's, per process; linear: feature extraction)")
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "protocol" not in flags and "config" not in flags:
        flags["protocol"] = default_protocol(flags.get("dataset"))
    width = vit_width(argv) if flags.get("dataset") == "imagenet" else None
    config = parse_config(ClassificationConfig, argv, prog=PROG, presets=PRESETS, parser=parser,
                          default_preset=default_preset(flags.get("dataset"), flags.get("protocol", "linear"), width))
    config = replace(config, protocol=flags.get("protocol", config.protocol))
    if config.dataset is None:
        parser.error(f"name a dataset ({', '.join(DATASETS)}), or pass a --config that does")
    if config.run.ckpt is None and not wants_printed_config(argv):
        parser.error("--ckpt is required (a checkpoint file: ours, official MAE / RC-MAE, timm, MMPretrain, ...)")
    try:
        return protocol_options(config, flags)
    except ConfigError as error:
        parser.error(str(error))


def protocol_options(config: ClassificationConfig, flags: dict[str, Any]) -> ClassificationConfig:
    """Keep the options of the protocol that runs (the probe's or the recipe), refuse flags of the other one, and
    read an explicit --base-lr / --weight-decay as that one value (no grid over it)."""
    recipe_flags = {f.name for f in fields(FinetuneRecipe)} - set(SHARED_FLAGS)
    probe_flags = {f.name for f in fields(LinearProbe)} - set(SHARED_FLAGS)
    if config.protocol == "linear":
        unused = sorted(recipe_flags & set(flags)) + (["preset"] if "preset" in flags else [])
        if unused:
            raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: fine-tuning options, "
                              "not used by --protocol linear")
        return replace(config, preset=None, recipe=None, probe=config.probe or with_overrides(LinearProbe(), flags))
    unused = sorted(probe_flags & set(flags))
    if unused:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: linear-probe options, not "
                          f"used by --protocol {config.protocol}")
    preset, recipe = config.preset, config.recipe
    if recipe is None:  # a linear run's config.yaml replayed as fine-tuning: the protocol's default recipe
        preset = default_preset(config.dataset, config.protocol)
        recipe = with_overrides(PRESETS[preset], flags)
    for value, grid in (("base_lr", "lr_grid"), ("weight_decay", "wd_grid")):
        if value in flags:
            if grid in flags:
                raise ConfigError(f"--{value.replace('_', '-')} and --{grid.replace('_', '-')}: pass one")
            recipe = replace(recipe, **{grid: ()})
    return replace(config, preset=preset, recipe=recipe, probe=None)


# ------------------------------------------------------------------------------------------------- a run


def check_config(config: ClassificationConfig) -> DatasetSpec:
    """Stop on a configuration that cannot run, before any work; the dataset's spec otherwise."""
    if config.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {config.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if config.dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}")
    if config.per_class is not None and config.per_class < 1:
        raise ConfigError(f"--per-class {config.per_class}: give a positive number of images per class")
    if config.run.precision not in PRECISIONS:
        raise ConfigError(f"--precision {config.run.precision}: choose one of {', '.join(PRECISIONS)}")
    if config.run.which not in ("teacher", "student"):
        raise ConfigError(f"--which {config.run.which}: choose teacher or student")
    return DATASETS[config.dataset]


def run_directory(config: ClassificationConfig, checkpoint_sha256: str) -> Path:
    if config.run.out:
        return Path(config.run.out)
    # A subset run gets its own folder: it must never resume (or be resumed by) the full run's checkpoints.
    subset = f"-per_class{config.per_class}" if config.per_class is not None else ""
    return (Path("runs/transfer") / config.dataset / config.protocol
            / f"{Path(config.run.ckpt).stem}-{checkpoint_sha256[:8]}" / f"seed{config.run.seed}{subset}")


def holds_run(out: Path) -> bool:
    """A finished record, or a fine-tuning checkpoint of the grid or the final run."""
    checkpoints = [*out.glob("grid/*/checkpoint.pth"), out / "final" / "checkpoint.pth"]
    return (out / RECORD).is_file() or any(path.is_file() for path in checkpoints)


def claim_run_directory(out: Path, config: ClassificationConfig, distributed: Distributed) -> RunLock | None:
    """The resume rule, checked and locked by rank 0; the other ranks stop with it when it refuses."""
    return start_run_on_rank0(distributed.world_size, distributed.rank, out, to_dict(config),
                              resume=config.run.resume, holds_run=holds_run(out), harmless=HARMLESS)


def split_reader(config: ClassificationConfig, spec: DatasetSpec) -> Callable[[str], LabelledImages]:
    """The run's splits by name: the dataset's, or its per-class slices."""

    @functools.cache  # each split is read (its folders scanned) once, whatever the grid
    def split(name: str) -> LabelledImages:
        data_root, seed = config.run.data_root, config.run.seed
        if config.per_class is None:
            return build_dataset(spec.name, data_root, name, seed=seed)
        if name == "trainval":  # the two slices, so train and val still partition trainval
            return concatenate(split("train"), split("val"))
        return first_per_class(build_dataset(spec.name, data_root, name, seed=seed), config.per_class)

    return split


def run_classification(config: ClassificationConfig) -> Result:
    """Evaluate ``config.run.ckpt`` on ``config.dataset`` with ``config.protocol``; append and return the record."""
    spec = check_config(config)
    config = protocol_options(config, {})  # a config built in code: the protocol's default recipe if it has none
    run = config.run
    linear = config.protocol == "linear"
    distributed = Distributed(device=resolve_device(run.device)) if linear else init_distributed(run.device)
    # A bad checkpoint stops here with the loader's one line, before anything is hashed, read or written.
    backbone, report = backbone_from_checkpoint(run.ckpt, arch=run.arch, which=run.which)
    if linear:
        check_pool(backbone, config.probe.pool)
    if distributed.is_main:
        print(report.summary(), flush=True)
    split = split_reader(config, spec)
    split("test")  # a missing dataset stops here, before any work
    tags = record_tags(run, subset=None if config.per_class is None else f"per_class{config.per_class}")
    started = time.perf_counter()
    checkpoint_sha256 = file_sha256(run.ckpt)
    out = run_directory(config, checkpoint_sha256)
    lock = claim_run_directory(out, config, distributed)
    try:
        if (out / RECORD).is_file():
            return report_finished(out, spec, config.protocol, distributed)
        dtype = autocast_dtype(distributed.device, run.precision)
        if linear:
            metrics, details = linear_probe(config, spec, split, backbone, checkpoint_sha256, distributed.device,
                                            dtype)
        else:
            del backbone  # each run of the grid loads its own classifier
            metrics, details = finetune(config, spec, split, out, distributed, dtype)
        result = build_result(task="classification", dataset=spec.name, protocol=config.protocol,
                              protocol_id=run_protocol(config), metric=spec.metric,
                              metrics=metrics, checkpoint=run.ckpt, metadata=report.metadata,
                              sha256=checkpoint_sha256, method=run.method, arch=run.arch or details.get("arch"),
                              seed=run.seed, config={**to_dict(config), **details}, started=started,
                              device=distributed.device, dtype=dtype, tags=tags, **backbone_size(details["arch"]))
        if distributed.is_main:
            store = append_result(result, run.results)
            atomic_write(out / RECORD, lambda tmp: tmp.write_text(result.to_json() + "\n"))
            print(f"{spec.title} {config.protocol}: {spec.metric} {result.value:.2f} ({result.precision}) -> {store}",
                  flush=True)
        return result
    finally:
        if lock is not None:
            lock.release()


def report_finished(out: Path, spec: DatasetSpec, protocol: str, distributed: Distributed) -> Result:
    result = Result.from_dict(json.loads((out / RECORD).read_text()))
    if distributed.is_main:
        print(f"{spec.title} {protocol}: {spec.metric} {result.value:.2f}, finished before in {out} (its record is "
              "in the store already)", flush=True)
    return result


# ----------------------------------------------------------------------------------------------- linear


def with_transform(dataset: LabelledImages, transform: Callable) -> LabelledImages:
    """The split with ``transform`` applied to its images (a split keeps one role: train or evaluation)."""
    dataset.transform = transform
    return dataset


def linear_probe(config: ClassificationConfig, spec: DatasetSpec, split: Callable[[str], LabelledImages],
                 model: nn.Module, checkpoint_sha256: str, device: torch.device, dtype: torch.dtype | None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
    probe, run = config.probe, config.run
    image_size = input_size(model)
    transform = probe_transform(image_size)
    cache = FeatureCache(config.cache_dir)
    splits, hits = {}, []
    for name in ("train", "val", "test"):
        dataset = with_transform(split(name), transform)
        description = dict(checkpoint_sha256=checkpoint_sha256, which=run.which, dataset=spec.name,
                           data_root=str(Path(run.data_root).resolve()) if run.data_root else None,
                           split=name, split_seed=run.seed, images=len(dataset), transform=repr(transform),
                           pool=probe.pool, precision=precision_name(dtype))
        if config.per_class is not None:  # only then: the full splits keep their existing cache keys
            description["per_class"] = config.per_class
        features, targets, hit = cache.get_or_extract(description, lambda dataset=dataset: extract_features(
            model, dataset, probe.pool, probe.batch_size, device, probe.num_workers, collate_readable, dtype=dtype))
        splits[name] = (features.to(device), targets.to(device))
        hits.append(hit)
    print(f"features: {'cache' if all(hits) else 'extracted'} ({config.cache_dir}); "
          f"train {len(splits['train'][0])}, val {len(splits['val'][0])}, test {len(splits['test'][0])}", flush=True)
    result = select_and_evaluate(splits["train"], splits["val"], splits["test"], spec.metric,
                                 multilabel=spec.multilabel)
    metrics = {spec.metric: result.test_score, f"val_{spec.metric}": result.val_scores[result.regularisation]}
    details = {"arch": model.arch, "image_size": image_size, "regularisation": result.regularisation,
               "regularisation_grid": [REGULARISATION_GRID[0], REGULARISATION_GRID[-1], len(REGULARISATION_GRID)],
               "images": {split: len(f) for split, (f, _) in splits.items()}}
    return metrics, details


# --------------------------------------------------------------------------------------------- finetune


def finetune(config: ClassificationConfig, spec: DatasetSpec, split: Callable[[str], LabelledImages], out: Path,
             distributed: Distributed, dtype: torch.dtype | None) -> tuple[dict[str, float], dict[str, Any]]:
    run = config.run

    def build(recipe: FinetuneRecipe, train_split: str, eval_split: str, run_out: Path) -> FinetuneRun:
        model, _ = build_classifier(run.ckpt, spec.num_classes, recipe, run.seed, arch=run.arch, which=run.which)
        size = recipe.image_size or input_size(model)
        train_set = with_transform(split(train_split), train_transform(recipe, size))
        eval_set = with_transform(split(eval_split), eval_transform(recipe, size))
        return FinetuneRun(recipe, model, train_set, eval_set, spec.metric, spec.multilabel, run_out, distributed,
                           num_classes=spec.num_classes, seed=run.seed, dtype=dtype, collate_fn=collate_readable)

    # Grid on the transfer sets (train -> val), unless the recipe is ImageNet's or the grid has one point.
    base = config.recipe
    grid = list(itertools.product(base.lr_grid or (base.base_lr,), base.wd_grid or (base.weight_decay,)))
    if base.wd_over_lr and base.wd_grid:  # Ericsson et al.'s grid: weight decay w / lr
        grid = [(lr, wd / lr) for lr, wd in grid]
    use_grid = len(grid) > 1 and spec.name != "imagenet"
    val_scores: dict[str, float] = {}
    if use_grid:
        for lr, wd in grid:
            name = f"lr{lr:g}_wd{wd:g}"
            if distributed.is_main:
                print(f"grid {name}: train -> val", flush=True)
            val_scores[name] = build(replace(base, base_lr=lr, weight_decay=wd), "train", "val",
                                     out / "grid" / name).train()["score"]
        best_name = max(val_scores, key=lambda name: val_scores[name])  # first of equals: the smaller lr
        best_lr, best_wd = grid[list(val_scores).index(best_name)]
    else:
        best_lr, best_wd = grid[0]
    best = replace(base, base_lr=best_lr, weight_decay=best_wd)
    if distributed.is_main:
        print(f"final: trainval -> test (base lr {best.base_lr:g}, wd {best.weight_decay:g})", flush=True)
    final_run = build(best, "trainval", "test", out / "final")  # ImageNet: trainval is the official train
    final = final_run.train()
    metrics = {spec.metric: final["score"]}
    if val_scores:
        metrics[f"val_{spec.metric}"] = max(val_scores.values())
    details = {"arch": final_run.model.arch, "finetune": asdict(best), "grid_val_scores": val_scores,
               "history": final["history"], "effective_batch": final["effective_batch"],
               "processes": distributed.world_size, "out": str(out),
               "images": {name: len(split(name)) for name in ("trainval", "test")}}
    return metrics, details
