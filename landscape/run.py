"""Loss landscapes of pretrained models: each method's own pretraining loss and a common linear-probe loss.

    python landscape/run.py --ckpt runs/mae/ runs/rcmae/ --loss pretrain linear --grid 51 --out runs/landscape
    torchrun --nproc_per_node 8 landscape/run.py --ckpt runs/mae/ runs/rcmae/ --out runs/landscape   # sharded
    python landscape/run.py --embedded --ckpt runs/demo-mae runs/demo-rcmae --out runs/landscape-demo    # CPU

Each --ckpt is a pretraining run folder (its newest ``checkpoints/step_*.pth``) or one such file: the pretraining
loss needs the whole model (encoder, decoder, RC-MAE's teacher), not the exported encoder. Per model and loss,
``<out>/<model>/<loss>/`` holds the saved directions, the finished points (a killed run continues with --resume)
and ``surface.npz`` (coordinates, directions' seed, losses, eigenvalues); ``<out>/figures`` the figures; the
results store one record per model and loss (width, sharpness, convex share, λmax at the centre).

The landscape is computed in fp32 whatever --precision says: Hessian-vector products are double backward, and a
surface that should be smooth must not carry bf16 rounding noise.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mimbench.backbones.vit import ARCHS
from mimbench.core.config import Embedded, RunSpec, config_parser, exit_status, parse_config, record_tags, to_dict
from mimbench.core.errors import ConfigError
from mimbench.core.io import atomic_write, file_sha256
from mimbench.core.rundir import start_run_on_rank0
from mimbench.core.runtime import Distributed, init_distributed
from mimbench.landscape.curvature import (
    convex_share,
    convexity_ratio,
    curvature_measure,
    hessian_extremes,
    math_attention,
)
from mimbench.landscape.directions import load_directions, random_directions, save_directions
from mimbench.landscape.figures import curve_figure, side_by_side, surface_figures
from mimbench.landscape.losses import (
    LossFn,
    linear_probe_loss,
    loss_measure,
    pretraining_batches,
    pretraining_loss,
    probe_encoder,
    read_pretraining_model,
)
from mimbench.landscape.metrics import sharpness, width
from mimbench.landscape.surface import Grid, evaluate
from mimbench.pretrain.data import write_embedded_photos
from mimbench.results import append_result, build_result
from mimbench.transfer.datasets import build_dataset
from mimbench.transfer.features import probe_transform

PROG = "landscape/run.py"
LOSSES = ("pretrain", "linear")
EMBEDDED = Embedded(root="runs/datasets/photos-embedded", preset="embedded_cpu", make=write_embedded_photos)


@dataclass(frozen=True)
class LandscapeRecipe:
    """What a landscape computes. The defaults are the seed paper's and Li et al.'s: 51 x 51 points on [-1, 1]²."""

    grid: int = 51  # points along α (x)
    y_grid: int | None = None  # points along β (y); None: as many as along α
    x_range: tuple[float, ...] = (-1.0, 1.0)
    y_range: tuple[float, ...] = (-1.0, 1.0)
    curvature_grid: int = 11  # points per axis of the coarser curvature grid: each costs lanczos_steps products
    lanczos_steps: int = 20  # enough for the extreme Ritz values to settle on ViTs (our choice, not a paper's)
    images: int = 256  # the fixed image subset of every point (pretraining data and probe data alike)
    batch_size: int = 64
    probe_dataset: str = "imagenet"  # the linear probe's labelled set (transfer/datasets.py names)
    probe_root: str | None = None
    probe_regularisation: float = 1e-2  # λ of the logistic probe fitted at the centre (ours; not tuned per model)
    pool: str = "token"  # MAE's linear probe reads the class token
    width_epsilon: float = 0.1  # width: radius where the loss first exceeds centre + ε
    sharpness_radius: float = 0.5  # sharpness: the loss rise within this radius
    convex_epsilon: float = 0.1  # convex where λmin ≥ −ε·λmax


BASE = LandscapeRecipe()
PRESETS = {
    "vit_b": BASE,
    # 2 CPU cores in minutes: a 9 x 9 surface and a 3 x 3 curvature grid (4 Lanczos steps) on 8 images, the
    # digits probe; a curvature point costs ~4 x 2 backward passes of the double-backward graph.
    "embedded_cpu": dataclasses.replace(BASE, grid=9, curvature_grid=3, lanczos_steps=4, images=8, batch_size=8,
                                        probe_dataset="digits"),
}
DEFAULT_PRESET = "vit_b"
HARMLESS_ON_RESUME = ("device", "out", "resume", "results", "preset", "tags")


@dataclass
class LandscapeConfig:
    # run.seed draws the directions and the masks; run.data_root, when set, replaces the checkpoints' own data.
    run: RunSpec = field(default_factory=lambda: RunSpec(out="runs/landscape"))
    preset: str = DEFAULT_PRESET
    recipe: LandscapeRecipe = BASE
    checkpoints: tuple[str, ...] = ()  # --ckpt: pretraining run folders or resumable checkpoint files
    loss: tuple[str, ...] = LOSSES


def parse_args(argv: list[str] | None = None) -> LandscapeConfig:
    parser = config_parser(LandscapeConfig, PROG, __doc__, PRESETS, EMBEDDED, skip={"ckpt", "which", "checkpoints"})
    parser.add_argument("--ckpt", dest="checkpoints", nargs="+", help="pretraining run folders or .pth files")
    config = parse_config(LandscapeConfig, argv, prog=PROG, presets=PRESETS, default_preset=DEFAULT_PRESET,
                          embedded=EMBEDDED, parser=parser)
    if not config.checkpoints:
        raise ConfigError("say which models: --ckpt RUN_FOLDER_OR_FILE [...]")
    unknown = sorted(set(config.loss) - set(LOSSES))
    if unknown or not config.loss:
        raise ConfigError(f"unknown --loss {' '.join(unknown)}; choose from: {', '.join(LOSSES)}")
    recipe = config.recipe
    if len(recipe.x_range) != 2 or len(recipe.y_range) != 2 or min(recipe.grid, recipe.curvature_grid) < 2:
        raise ConfigError("--x-range and --y-range take two numbers (low high); --grid and --curvature-grid ≥ 2")
    return config


def model_names(paths: tuple[str, ...]) -> list[str]:
    """A folder name per model (its run folder's, or the file's stem), numbered where two are the same."""
    names = [Path(p).name if Path(p).is_dir() else Path(p).stem for p in paths]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def grids(recipe: LandscapeRecipe) -> dict[str, Grid]:
    x_range, y_range = tuple(recipe.x_range), tuple(recipe.y_range)
    return {"surface": Grid.rectangle(x_range, recipe.grid, y_range, recipe.y_grid or recipe.grid),
            "curve": Grid.rectangle(x_range, recipe.grid),
            "curvature": Grid.rectangle(x_range, recipe.curvature_grid, y_range, recipe.curvature_grid)}


def loss_target(config: LandscapeConfig, kind: str, model: torch.nn.Module, pretrain_config, device: torch.device
                ) -> tuple[torch.nn.Module, LossFn, str]:
    """The module whose weights move, its loss, and the data's name, for one loss kind."""
    recipe, seed = config.recipe, config.run.seed
    if kind == "pretrain":
        batches = [b.to(device) for b in pretraining_batches(pretrain_config, recipe.images, recipe.batch_size,
                                                             config.run.data_root)]
        return model, pretraining_loss(batches, seed), "pretraining data"
    encoder = probe_encoder(model).to(device)
    dataset = build_dataset(recipe.probe_dataset, recipe.probe_root, "train",
                            transform=probe_transform(ARCHS[pretrain_config.recipe.arch]["img_size"]), seed=seed)
    samples = [dataset[i] for i in range(min(recipe.images, len(dataset)))]
    images = torch.stack([image for image, _ in samples]).to(device)
    targets = torch.as_tensor([target for _, target in samples]).to(device)
    loss, _ = linear_probe_loss(encoder, images, targets, recipe.pool, recipe.probe_regularisation, recipe.batch_size)
    return encoder, loss, recipe.probe_dataset


def directions_for(target: torch.nn.Module, folder: Path, seed: int, count: int, dist: Distributed):
    """The saved directions of ``folder`` (a resumed or extended surface), else fresh ones from ``seed``."""
    path = folder / "directions.pt"
    if path.exists():
        return load_directions(path)[0]
    directions = random_directions(target, seed, count)  # every rank draws the same from the same CPU generator
    if dist.is_main:
        save_directions(path, directions, {"seed": seed, "kind": "filter-normalised gaussian"})
    return directions


def write_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary file's name
        np.savez(f, **arrays)


def landscape(config: LandscapeConfig, kind: str, model, pretrain_config, folder: Path, dist: Distributed
              ) -> dict[str, np.ndarray | float]:
    """Surface, curve and curvature of one model on one loss; writes ``surface.npz`` (``finished_before``: it
    was there already, so its record is in the store)."""
    recipe, seed = config.recipe, config.run.seed
    finished_before = (folder / "surface.npz").exists()
    target, loss_fn, data = loss_target(config, kind, model, pretrain_config, dist.device)
    math_attention(target)
    directions = directions_for(target, folder, seed, 2, dist)
    directions = [{name: d.to(dist.device) for name, d in direction.items()} for direction in directions]
    measure, curvature = loss_measure(loss_fn), curvature_measure(loss_fn, recipe.lanczos_steps, seed)
    shapes = grids(recipe)
    found = {
        "surface": evaluate(target, measure, directions, shapes["surface"], folder / "surface", dist.rank,
                            dist.world_size, f"{folder.parent.name} {kind} surface")["loss"],
        "curve": evaluate(target, measure, directions[:1], shapes["curve"], folder / "curve", dist.rank,
                          dist.world_size, f"{folder.parent.name} {kind} curve")["loss"],
        **{f"curvature_{name}": values for name, values in evaluate(
            target, curvature, directions, shapes["curvature"], folder / "curvature", dist.rank, dist.world_size,
            f"{folder.parent.name} {kind} curvature").items()},
    }
    centre_min, centre_max = hessian_extremes(loss_fn, target, recipe.lanczos_steps, seed)
    found.update(centre_loss=measure(target)["loss"], centre_lambda_min=centre_min, centre_lambda_max=centre_max)
    if dist.is_main:
        arrays = {**found, **{f"{name}_{axis}": np.asarray(getattr(grid, axis))
                              for name, grid in shapes.items() for axis in ("x", "y") if getattr(grid, axis)}}
        atomic_write(folder / "surface.npz", lambda tmp: write_npz(tmp, seed=seed, data=data, **arrays))
    return {**found, "data": data, "finished_before": finished_before}


def summary(found: dict, recipe: LandscapeRecipe) -> dict[str, float]:
    shapes = grids(recipe)
    return {
        "width": width(found["surface"], shapes["surface"], found["centre_loss"], recipe.width_epsilon),
        "sharpness": sharpness(found["surface"], shapes["surface"], found["centre_loss"], recipe.sharpness_radius),
        "convex_share": convex_share(found["curvature_lambda_min"], found["curvature_lambda_max"],
                                     recipe.convex_epsilon),
        "lambda_max_centre": found["centre_lambda_max"],
        "lambda_min_centre": found["centre_lambda_min"],
        "loss_centre": found["centre_loss"],
    }


def draw(out: Path, kind: str, results: dict[str, dict], recipe: LandscapeRecipe) -> None:
    shapes = grids(recipe)
    figures = out / "figures"
    for name, found in results.items():
        surface_figures(found["surface"], shapes["surface"], f"{name}: {kind} loss", figures / f"{name}_{kind}")
    curve_figure({name: (np.asarray(shapes["curve"].x), found["curve"]) for name, found in results.items()},
                 f"{kind} loss along δ", figures / f"curves_{kind}")
    side_by_side({name: (found["surface"], shapes["surface"]) for name, found in results.items()},
                 f"{kind} loss, one colour scale", figures / f"side_by_side_{kind}")
    side_by_side({name: (convexity_ratio(found["curvature_lambda_min"], found["curvature_lambda_max"]),
                         shapes["curvature"]) for name, found in results.items()},
                 f"|λmin/λmax|, {kind} loss", figures / f"convexity_{kind}", colour="magma", label="|λmin/λmax|",
                 heat_map=True)


TABLE_COLUMNS = ("width", "sharpness", "convex_share", "lambda_max_centre", "lambda_min_centre", "loss_centre")


def write_table(path: Path, summaries: dict[str, dict[str, dict[str, float]]]) -> None:
    """The landscape table (Markdown): one row per loss and model."""
    lines = ["| loss | model | " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * (2 + len(TABLE_COLUMNS))]
    lines += [f"| {kind} | {name} | " + " | ".join(f"{metrics[c]:.4g}" for c in TABLE_COLUMNS) + " |"
              for kind, models in summaries.items() for name, metrics in models.items()]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def run_landscapes(config: LandscapeConfig) -> dict[str, dict[str, dict[str, float]]]:
    """Every model's landscape on every loss; returns ``{loss: {model: summary}}``."""
    started = time.perf_counter()
    run = config.run
    out = Path(run.out)
    dist = init_distributed(run.device)
    holds_run = any(out.glob("*/*/directions.pt"))
    lock = start_run_on_rank0(dist.world_size, dist.rank, out, to_dict(config), resume=run.resume,
                              holds_run=holds_run, harmless=HARMLESS_ON_RESUME)
    try:
        models = {name: read_pretraining_model(path)
                  for name, path in zip(model_names(config.checkpoints), config.checkpoints)}
        summaries: dict[str, dict[str, dict[str, float]]] = {}
        for kind in config.loss:
            results = {}
            for name, (model, pretrain_config, _) in models.items():
                model.to(dist.device)
                results[name] = landscape(config, kind, model, pretrain_config, out / name / kind, dist)
            summaries[kind] = {name: summary(found, config.recipe) for name, found in results.items()}
            if not dist.is_main:
                continue
            draw(out, kind, results, config.recipe)
            for name, (_, pretrain_config, path) in models.items():
                if results[name]["finished_before"]:  # a resumed run that had finished: recorded already
                    continue
                metrics = summaries[kind][name]
                result = build_result(task="landscape", dataset=results[name]["data"], protocol=kind,
                                      metric="width", metrics=metrics, checkpoint=path, metadata=None,
                                      sha256=file_sha256(path), method=pretrain_config.run.method,
                                      arch=pretrain_config.recipe.arch, seed=run.seed, config=to_dict(config),
                                      started=started, device=dist.device, dtype=None,
                                      tags=record_tags(run, model=name))
                store = append_result(result, run.results)
                print(f"{name} {kind}: width {metrics['width']:.3f}, sharpness {metrics['sharpness']:.4f}, "
                      f"convex share {metrics['convex_share']:.2f}, λmax {metrics['lambda_max_centre']:.3g} -> "
                      f"{store}", flush=True)
        if dist.is_main:
            write_table(out / "landscape.md", summaries)
        return summaries
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    return exit_status(lambda: run_landscapes(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
