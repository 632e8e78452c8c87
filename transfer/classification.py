"""Classification transfer of a checkpoint: linear probe or fine-tuning on one dataset, one record in the store.

Protocols (the MixedAE paper follows Kornblith et al. 2019 / Ericsson et al. 2021 for the transfer sets and MAE
for ImageNet):

- ``linear``: frozen backbone; features (class token, or global average pool + norm) of train / val / test are
  extracted once and cached; L2 logistic regression by L-BFGS with the regulariser chosen on val from 45 values,
  refit on train+val, scored on test (``transfer/logistic.py``).
- ``finetune``: end to end (``transfer/finetune.py``); on the transfer sets every (lr, weight decay) of a small grid
  trains on train and is scored on val, the best pair retrains on train+val and is scored on test. ImageNet uses
  the MAE recipe on the whole official train split and reports the official val (no grid).
- ``linear-lars``: MAE's linear probe (BatchNorm + linear head, LARS, 90 epochs), for ImageNet.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mimbench.backbones.checkpoint import backbone_from_checkpoint
from mimbench.core.io import file_sha256, run_environment
from mimbench.core.runtime import init_distributed, peak_memory_gb
from mimbench.results import Result, append_result, checkpoint_fields
from mimbench.transfer.datasets import (DATASETS, DatasetError, DatasetSpec, LabelledImages, build_dataset,
                                        collate_readable, concatenate, first_per_class)
from mimbench.transfer.features import FeatureCache, extract_features, probe_transform
from mimbench.transfer.finetune import (RECIPES, FinetuneConfig, FinetuneRun, build_classifier, eval_transform,
                                        train_transform)
from mimbench.transfer.logistic import REGULARISATION_GRID, select_and_evaluate

PROTOCOLS = ("linear", "finetune", "linear-lars")
# (base lrs, weight decays) tried on val per recipe; ImageNet recipes are the papers' fixed values.
GRIDS: dict[str, tuple[list[float], list[float]]] = {
    "transfer": ([2.5e-4, 5e-4, 1e-3], [0.05, 0.3]),
    "embedded": ([3e-3, 1e-2], [0.05]),
}


@dataclass
class ClassificationConfig:
    dataset: str
    ckpt: str
    protocol: str = "linear"
    data_root: str | None = None
    out: str | None = None  # None: runs/transfer/<dataset>/<protocol>/<checkpoint>-<sha>/seed<seed>
    which: str = "teacher"  # RC-MAE checkpoints hold student and teacher
    arch: str | None = None  # None: from the checkpoint's metadata or shapes
    method: str | None = None  # for foreign checkpoints without metadata (e.g. "mae")
    seed: int = 0
    # Keep the first N images of each class in every split (train, val, test), in the split's own order: a fixed,
    # documented slice of a real dataset for quick checks. Multi-label VOC2007 counts an image under its first
    # class present (see datasets.first_per_class); trainval is the train slice followed by the val slice. The
    # record is tagged subset=per_class<N>, so it is never mistaken for the full benchmark.
    per_class: int | None = None
    # linear probe
    pool: str = "avg"  # "avg" (global average pool + norm) or "token" (class token)
    batch_size: int = 128
    num_workers: int = 2
    cache_dir: str = "runs/feature_cache"
    # fine-tuning
    recipe: str | None = None  # a key of finetune.RECIPES; None: by dataset and protocol
    lr_grid: list[float] | None = None  # base lrs tried on val; None: the recipe's (GRIDS)
    wd_grid: list[float] | None = None  # weight decays tried on val; None: the recipe's
    # store
    results: str | None = None  # None: $MIMBENCH_RESULTS or results/results.jsonl
    tags: list[str] = field(default_factory=list)  # key=value, e.g. ablation=objective variant=recon
    device: str | None = None


def default_recipe(dataset: str, protocol: str) -> str:
    if protocol == "linear-lars":
        return "imagenet-linear"
    return {"imagenet": "imagenet", "digits": "embedded"}.get(dataset, "transfer")


def parse_tags(tags: list[str]) -> dict[str, str]:
    parsed = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ValueError(f"tag {tag!r} is not key=value")
        parsed[key] = value
    return parsed


def run_directory(config: ClassificationConfig, checkpoint_sha256: str) -> Path:
    if config.out:
        return Path(config.out)
    # A subset run gets its own folder: it must never resume (or be resumed by) the full run's checkpoints.
    subset = f"-per_class{config.per_class}" if config.per_class is not None else ""
    return (Path("runs/transfer") / config.dataset / config.protocol
            / f"{Path(config.ckpt).stem}-{checkpoint_sha256[:8]}" / f"seed{config.seed}{subset}")


def run_classification(config: ClassificationConfig, finetune_overrides: dict[str, Any] | None = None) -> Result:
    """Evaluate ``config.ckpt`` on ``config.dataset`` with ``config.protocol``; append and return the record."""
    if config.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {config.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if config.dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[config.dataset]
    if config.per_class is not None and config.per_class < 1:
        raise ValueError(f"--per-class {config.per_class}: give a positive number of images per class")

    @functools.cache  # each split is read (its folders scanned) once, whatever the grid
    def split(name: str) -> LabelledImages:
        if config.per_class is None:
            return build_dataset(spec.name, config.data_root, name, seed=config.seed)
        if name == "trainval":  # the two slices, so train and val still partition trainval
            return concatenate(split("train"), split("val"))
        return first_per_class(build_dataset(spec.name, config.data_root, name, seed=config.seed), config.per_class)

    split("test")  # a missing dataset stops here, before any work
    tags = parse_tags(config.tags)
    if config.per_class is not None:
        tags["subset"] = f"per_class{config.per_class}"
    started = time.perf_counter()
    checkpoint_sha256 = file_sha256(config.ckpt)
    out = run_directory(config, checkpoint_sha256)
    if config.protocol == "linear":
        metrics, details, device, report = linear_probe(config, spec, split, checkpoint_sha256)
        is_main = True
    else:
        metrics, details, device, report, is_main = finetune(config, spec, split, out, finetune_overrides or {})
    found = checkpoint_fields(config.ckpt, report.metadata, checkpoint_sha256, method=config.method,
                              arch=config.arch or details.get("arch"))
    result = Result(task="classification", dataset=spec.name, protocol=config.protocol, metric=spec.metric,
                    value=round(metrics[spec.metric], 4), metrics=metrics, tags=tags, seed=config.seed,
                    config={**asdict(config), **details}, wall_time_s=round(time.perf_counter() - started, 1),
                    peak_memory_gb=round(peak_memory_gb(device), 3), **found, **run_environment(device))
    if is_main:
        store = append_result(result, config.results)
        print(f"{spec.title} {config.protocol}: {spec.metric} {result.value:.2f} -> {store}", flush=True)
    return result


# ----------------------------------------------------------------------------------------------- linear


def with_transform(dataset: LabelledImages, transform: Callable) -> LabelledImages:
    """The split with ``transform`` applied to its images (a split keeps one role: train or evaluation)."""
    dataset.transform = transform
    return dataset


def linear_probe(config: ClassificationConfig, spec: DatasetSpec, split: Callable[[str], LabelledImages],
                 checkpoint_sha256: str) -> tuple[dict[str, float], dict[str, Any], torch.device, Any]:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, report = backbone_from_checkpoint(config.ckpt, arch=config.arch, which=config.which)
    print(report.summary(), flush=True)
    image_size = model.patch_embed.img_size[0]
    transform = probe_transform(image_size)
    cache = FeatureCache(config.cache_dir)
    splits, hits = {}, []
    for name in ("train", "val", "test"):
        dataset = with_transform(split(name), transform)
        description = dict(checkpoint_sha256=checkpoint_sha256, which=config.which, dataset=spec.name,
                           data_root=str(Path(config.data_root).resolve()) if config.data_root else None,
                           split=name, split_seed=config.seed, images=len(dataset), transform=repr(transform),
                           pool=config.pool)
        if config.per_class is not None:  # only then: the full splits keep their existing cache keys
            description["per_class"] = config.per_class
        features, targets, hit = cache.get_or_extract(description, lambda: extract_features(
            model, dataset, config.pool, config.batch_size, device, config.num_workers, collate_readable))
        splits[name] = (features.to(device), targets.to(device))
        hits.append(hit)
    print(f"features: {'cache' if all(hits) else 'extracted'} ({config.cache_dir}); "
          f"train {len(splits['train'][0])}, val {len(splits['val'][0])}, test {len(splits['test'][0])}", flush=True)
    probe = select_and_evaluate(splits["train"], splits["val"], splits["test"], spec.metric,
                                multilabel=spec.multilabel)
    metrics = {spec.metric: probe.test_score, f"val_{spec.metric}": probe.val_scores[probe.regularisation]}
    details = {"arch": model.arch, "image_size": image_size, "regularisation": probe.regularisation,
               "regularisation_grid": [REGULARISATION_GRID[0], REGULARISATION_GRID[-1], len(REGULARISATION_GRID)],
               "images": {split: len(f) for split, (f, _) in splits.items()}}
    return metrics, details, device, report


# --------------------------------------------------------------------------------------------- finetune


def finetune(config: ClassificationConfig, spec: DatasetSpec, split: Callable[[str], LabelledImages], out: Path,
             overrides: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any], torch.device, Any, bool]:
    distributed = init_distributed(config.device)
    recipe = config.recipe or default_recipe(spec.name, config.protocol)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    base = replace(FinetuneConfig(**RECIPES[recipe]), seed=config.seed, device=config.device, **overrides)

    def build(run_config: FinetuneConfig, train_split: str, eval_split: str, run_out: Path
              ) -> tuple[FinetuneRun, Any]:
        model, report = build_classifier(config.ckpt, spec.num_classes, run_config, arch=config.arch)
        size = model.patch_embed.img_size[0]
        train_set = with_transform(split(train_split), train_transform(run_config, size))
        eval_set = with_transform(split(eval_split), eval_transform(run_config, size))
        run = FinetuneRun(run_config, model, train_set, eval_set, spec.metric, spec.multilabel, run_out,
                          distributed, collate_fn=collate_readable)
        return run, report

    # Grid on the transfer sets (train -> val), unless the recipe is ImageNet's or the grid has one point.
    recipe_lrs, recipe_wds = GRIDS.get(recipe, ([base.base_lr], [base.weight_decay]))
    lrs = [overrides["base_lr"]] if "base_lr" in overrides else config.lr_grid or recipe_lrs
    wds = [overrides["weight_decay"]] if "weight_decay" in overrides else config.wd_grid or recipe_wds
    grid = list(itertools.product(lrs, wds))
    use_grid = len(grid) > 1 and spec.name != "imagenet"
    val_scores: dict[str, float] = {}
    if use_grid:
        for lr, wd in grid:
            run_config = replace(base, base_lr=lr, weight_decay=wd)
            name = f"lr{lr:g}_wd{wd:g}"
            if distributed.is_main:
                print(f"grid {name}: train -> val", flush=True)
            val_scores[name] = build(run_config, "train", "val", out / "grid" / name)[0].train()["score"]
        best_name = max(val_scores, key=lambda name: val_scores[name])  # first of equals: the smaller lr
        best_lr, best_wd = grid[list(val_scores).index(best_name)]
    else:
        best_lr, best_wd = grid[0]
    base = replace(base, base_lr=best_lr, weight_decay=best_wd)
    if distributed.is_main:
        print(f"final: trainval -> test (base lr {base.base_lr:g}, wd {base.weight_decay:g})", flush=True)
    run, report = build(base, "trainval", "test", out / "final")  # ImageNet: trainval is the official train
    if distributed.is_main:
        print(report.summary(), flush=True)
    final = run.train()
    metrics = {spec.metric: final["score"]}
    if val_scores:
        metrics[f"val_{spec.metric}"] = max(val_scores.values())
    details = {"arch": run.model.arch, "recipe": recipe,
               "finetune": asdict(base), "grid_val_scores": val_scores, "history": final["history"],
               "effective_batch": final["effective_batch"], "processes": distributed.world_size, "out": str(out),
               "images": {name: len(split(name)) for name in ("trainval", "test")}}
    return metrics, details, distributed.device, report, distributed.is_main
