"""Loss landscapes of pretrained models: each method's own pretraining loss, a common linear-probe loss and a
common reconstruction loss.

    python landscape/run.py --ckpt runs/mae/ runs/rcmae/ runs/sup/ --loss pretrain linear recon --out runs/landscape
    torchrun --nproc_per_node 8 landscape/run.py --ckpt runs/mae/ runs/rcmae/ --out runs/landscape   # sharded
    python landscape/run.py --embedded --ckpt runs/demo-mae runs/demo-rcmae --out runs/landscape-demo    # CPU
    python landscape/run.py --line runs/mae/checkpoints/step_00000100.pth runs/mae/checkpoints/step_00000200.pth
    python landscape/run.py --line runs/rcmae teacher --out runs/line-teacher   # RC-MAE's student to its teacher

Each --ckpt is a pretraining run folder (its newest ``checkpoints/step_*.pth``) or one such file: the pretraining
loss needs the whole model (encoder, decoder, RC-MAE's teacher), not the exported encoder; a supervised run's
(``pretrain/run.py --method supervised``) is its classifier. Losses (see landscape/losses.py): ``pretrain``, each
method's own (a supervised ViT's: the cross-entropy of its head on its labelled images); ``linear``, a logistic
probe fitted at the centre; ``recon``, MAE's reconstruction loss of every encoder through a fresh decoder fitted at
the centre (``--decoder-steps`` AdamW steps at ``--decoder-lr`` on the frozen encoder, on the landscape's images
and masks: --data-root's images, else the first MAE-style model's own). Per model and loss,
``<out>/<model>/<loss>/`` holds the saved directions, the finished points (a killed run continues with --resume)
and ``surface.npz`` (coordinates, directions' seed, losses, eigenvalues); ``<out>/figures`` the figures; the
results store one record per model and loss (width, sharpness, convex share, λmax at the centre).

``--line A B``: the loss along θ_A + α(θ_B − θ_A) over ``--line-range`` (α = 0 is A, α = 1 is B; every parameter
moves, RC-MAE's teacher too, so both ends are the checkpoints' own models; the probe's head and the decoder of
``recon`` are fitted at A). ``B = teacher`` moves an RC-MAE checkpoint's student onto its own teacher (pretraining
loss only). Written to ``<out>/lines/<A>_to_<B>/<loss>/`` (``line.npz``) and ``<out>/figures/line_*``.

The landscape is computed in fp32 whatever --precision says: Hessian-vector products are double backward, and a
surface that should be smooth must not carry bf16 rounding noise.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mimbench.backbones.vit import ARCHS
from mimbench.core.config import (
    Embedded,
    RunSpec,
    config_parser,
    exit_status,
    parse_config,
    print_config,
    protocol_id,
    record_tags,
    to_dict,
    wants_printed_config,
)
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
from mimbench.landscape.directions import (
    Direction,
    line_direction,
    load_directions,
    random_directions,
    save_directions,
)
from mimbench.landscape.figures import curve_figure, side_by_side, surface_figures
from mimbench.landscape.losses import (
    Batch,
    LossFn,
    Pretrained,
    fit_decoder,
    linear_probe_loss,
    loss_measure,
    photo_batches,
    pretraining_batches,
    pretraining_loss,
    probe_encoder,
    read_pretraining_model,
)
from mimbench.landscape.metrics import sharpness, width
from mimbench.landscape.surface import Grid, centre_of, evaluate
from mimbench.pretrain.data import write_embedded_photos
from mimbench.pretrain.engine import PretrainConfig
from mimbench.pretrain.mae import DECODERS
from mimbench.results import append_result, build_result
from mimbench.transfer.datasets import build_dataset
from mimbench.transfer.features import probe_transform

PROG = "landscape/run.py"
LOSSES = ("pretrain", "linear", "recon")
TEACHER = "teacher"  # --line A teacher: RC-MAE's student onto its own teacher
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
    # Loss recon: the fresh decoder's fit at the centre (ours: enough steps for the loss to level off on the tiny
    # ViT's embedded photos; AdamW at MAE's betas, no weight decay, full batch).
    decoder_steps: int = 500
    decoder_lr: float = 1e-3
    line_points: int = 41  # --line: 41 points on [-0.5, 1.5] put α = 0 and α = 1 on the grid
    line_range: tuple[float, ...] = (-0.5, 1.5)


BASE = LandscapeRecipe()
PRESETS = {
    "vit_b": BASE,
    # 2 CPU cores in minutes: a 9 x 9 surface and a 3 x 3 curvature grid (4 Lanczos steps) on 8 images, the
    # digits probe; a curvature point costs ~4 x 2 backward passes of the double-backward graph.
    "embedded_cpu": dataclasses.replace(BASE, grid=9, curvature_grid=3, lanczos_steps=4, images=8, batch_size=8,
                                        probe_dataset="digits", decoder_steps=100, line_points=9),
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
    loss: tuple[str, ...] = ("pretrain", "linear")
    line: tuple[str, ...] = ()  # --line A B: the 1D line from checkpoint A to B (B "teacher": A's RC-MAE teacher)


def parse_args(argv: list[str] | None = None) -> LandscapeConfig:
    parser = config_parser(LandscapeConfig, PROG, __doc__, PRESETS, EMBEDDED, skip={"ckpt", "which", "checkpoints"})
    parser.add_argument("--ckpt", dest="checkpoints", nargs="+", help="pretraining run folders or .pth files")
    config = parse_config(LandscapeConfig, argv, prog=PROG, presets=PRESETS, default_preset=DEFAULT_PRESET,
                          embedded=EMBEDDED, parser=parser)
    if wants_printed_config(argv):
        return config
    if not config.checkpoints and not config.line:
        raise ConfigError("say which models: --ckpt RUN_FOLDER_OR_FILE [...], or --line A B")
    if config.line and len(config.line) != 2:
        raise ConfigError(f"--line takes two checkpoints (A B, or A teacher), not {len(config.line)}")
    if config.line[1:] == (TEACHER,) and set(config.loss) != {"pretrain"}:
        raise ConfigError("--line A teacher draws --loss pretrain only: linear and recon read RC-MAE's exported "
                          "encoder, which is the teacher itself")
    unknown = sorted(set(config.loss) - set(LOSSES))
    if unknown or not config.loss:
        raise ConfigError(f"unknown --loss {' '.join(unknown)}; choose from: {', '.join(LOSSES)}")
    recipe = config.recipe
    ranges = (recipe.x_range, recipe.y_range, recipe.line_range)
    if any(len(r) != 2 for r in ranges) or min(recipe.grid, recipe.curvature_grid, recipe.line_points) < 2:
        raise ConfigError("--x-range, --y-range and --line-range take two numbers (low high); --grid, "
                          "--curvature-grid and --line-points ≥ 2")
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


def to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def recon_images(config: LandscapeConfig, models: list[Pretrained]) -> str:
    """Loss recon's images, the same for every model: --data-root, else the first MAE-style model's own."""
    roots = [pretrain_config.run.data_root for _, pretrain_config, _ in models
             if isinstance(pretrain_config, PretrainConfig)]
    if config.run.data_root or roots:
        return config.run.data_root or roots[0]
    raise ConfigError("--loss recon of supervised models alone: say which unlabelled images, --data-root DIR "
                      "(or --embedded for the bundled photos)")


def loss_target(config: LandscapeConfig, kind: str, model: torch.nn.Module, pretrain_config, device: torch.device,
                images_root: str | None) -> tuple[torch.nn.Module, LossFn, str]:
    """The module whose weights move, its loss, and the data's name, for one loss kind."""
    recipe, seed = config.recipe, config.run.seed
    arch = pretrain_config.recipe.arch
    if kind == "pretrain":
        batches = [to_device(b, device) for b in pretraining_batches(pretrain_config, recipe.images,
                                                                     recipe.batch_size, config.run.data_root)]
        return model, pretraining_loss(batches, seed), "pretraining data"
    encoder = probe_encoder(model).to(device)
    if kind == "recon":
        if arch not in DECODERS:
            raise ConfigError(f"--loss recon fits an MAE decoder of the arch's table (pretrain/mae.py DECODERS); "
                              f"{arch} has none")
        batches = [b.to(device) for b in photo_batches(images_root, ARCHS[arch]["img_size"], seed, recipe.images,
                                                       recipe.batch_size)]
        target, loss, _ = fit_decoder(encoder, arch, batches, seed, recipe.decoder_steps, recipe.decoder_lr)
        return target, loss, "pretraining photos"
    dataset = build_dataset(recipe.probe_dataset, recipe.probe_root, "train",
                            transform=probe_transform(ARCHS[arch]["img_size"]), seed=seed)
    samples = [dataset[i] for i in range(min(recipe.images, len(dataset)))]
    images = torch.stack([image for image, _ in samples]).to(device)
    targets = torch.as_tensor([target for _, target in samples]).to(device)
    loss, _ = linear_probe_loss(encoder, images, targets, recipe.pool, recipe.probe_regularisation, recipe.batch_size)
    return encoder, loss, recipe.probe_dataset


def saved_directions(folder: Path, dist: Distributed, draw, description: dict) -> list[Direction]:
    """The directions saved in ``folder`` (a resumed or extended surface), else ``draw()``'s, saved with
    ``description``; on the run's device."""
    path = folder / "directions.pt"
    if path.exists():
        directions = load_directions(path)[0]
    else:
        directions = draw()  # every rank computes the same (a seeded CPU generator, or two checkpoints)
        if dist.is_main:
            save_directions(path, directions, description)
    return [{name: d.to(dist.device) for name, d in direction.items()} for direction in directions]


def write_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary file's name
        np.savez(f, **arrays)


FOUND = ("surface", "curve", "curvature_lambda_min", "curvature_lambda_max", "centre_loss", "centre_lambda_min",
         "centre_lambda_max")


def landscape(config: LandscapeConfig, kind: str, model, pretrain_config, folder: Path, dist: Distributed,
              images_root: str | None) -> dict[str, np.ndarray | float]:
    """Surface, curve and curvature of one model on one loss; writes ``surface.npz``, or reads it where a run
    finished it before (``finished_before``: its record is in the store then)."""
    if (folder / "surface.npz").exists():
        with np.load(folder / "surface.npz") as saved:
            found = {name: saved[name] if saved[name].ndim else float(saved[name]) for name in FOUND}
            return {**found, "data": str(saved["data"]), "finished_before": True}
    recipe, seed = config.recipe, config.run.seed
    target, loss_fn, data = loss_target(config, kind, model, pretrain_config, dist.device, images_root)
    math_attention(target)
    directions = saved_directions(folder, dist, lambda: random_directions(target, seed, 2),
                                  {"seed": seed, "kind": "filter-normalised gaussian"})
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
    centre = shapes["curvature"].index_of(0.0, 0.0)  # a grid through the centre has its eigenvalues already
    if centre is None:
        centre_min, centre_max = hessian_extremes(loss_fn, target, recipe.lanczos_steps, seed)
    else:
        centre_min, centre_max = (float(found[f"curvature_lambda_{end}"].flat[centre]) for end in ("min", "max"))
    found.update(centre_loss=measure(target)["loss"], centre_lambda_min=centre_min, centre_lambda_max=centre_max)
    if dist.is_main:
        arrays = {**found, **{f"{name}_{axis}": np.asarray(getattr(grid, axis))
                              for name, grid in shapes.items() for axis in ("x", "y") if getattr(grid, axis)}}
        atomic_write(folder / "surface.npz", lambda tmp: write_npz(tmp, seed=seed, data=data, **arrays))
    return {**found, "data": data, "finished_before": False}


# --------------------------------------------------------------------------- the line between two checkpoints


def teacher_end(model: torch.nn.Module) -> torch.nn.Module:
    """An RC-MAE model whose student is its teacher: the far end of ``--line A teacher``."""
    if not hasattr(model, "teacher"):
        raise ConfigError("--line A teacher: A is not an RC-MAE checkpoint (it has no teacher)")
    end = copy.deepcopy(model)
    end.student.load_state_dict(end.teacher.state_dict())
    return end


def line_end(kind: str, target: torch.nn.Module, model_b: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The line's far end in the target's parameters: B's weights where B has them, the centre's elsewhere (the
    probe's head is outside the target; the decoder of recon stays the one fitted at A)."""
    if kind == "pretrain":
        weights = dict(model_b.named_parameters())
    else:
        encoder = dict(probe_encoder(model_b).named_parameters())
        weights = encoder if kind == "linear" else {f"encoder.{name}": p for name, p in encoder.items()}
    start = centre_of(target)
    if not set(weights) <= set(start) or any(weights[name].shape != start[name].shape for name in weights):
        raise ConfigError("--line A B: the two checkpoints are not the same model (method, arch and options)")
    return {name: weights.get(name, value).detach().to(value.device) for name, value in start.items()}


def line(config: LandscapeConfig, kind: str, start: Pretrained, end: tuple[torch.nn.Module, str], folder: Path,
         dist: Distributed, images_root: str | None) -> np.ndarray:
    """The loss along θ_A + α(θ_B − θ_A) on the line grid; writes ``line.npz``."""
    (model, pretrain_config, path), (model_b, end_name) = start, end
    target, loss_fn, data = loss_target(config, kind, model, pretrain_config, dist.device, images_root)
    direction = saved_directions(folder, dist, lambda: [line_direction(
        centre_of(target), line_end(kind, target, model_b), target, frozen=True)],
        {"kind": "line", "start": str(path), "end": end_name})
    grid = Grid.rectangle(tuple(config.recipe.line_range), config.recipe.line_points)
    values = evaluate(target, loss_measure(loss_fn), direction, grid, folder / "line", dist.rank, dist.world_size,
                      f"{folder.parent.name} {kind} line")["loss"]
    if dist.is_main:
        atomic_write(folder / "line.npz", lambda tmp: write_npz(tmp, line_x=np.asarray(grid.x), loss=values,
                                                              start=str(path), end=end_name, data=data))
    return values


def run_line(config: LandscapeConfig, out: Path, dist: Distributed) -> None:
    """Every --loss along --line A B, each with its figure; prints the two ends' losses."""
    start = read_pretraining_model(config.line[0])
    if config.line[1] == TEACHER:
        end, end_name = teacher_end(start[0]), TEACHER
    else:
        end_model, end_config, end_path = read_pretraining_model(config.line[1])
        if (end_config.run.method, end_config.recipe.arch) != (start[1].run.method, start[1].recipe.arch):
            raise ConfigError(f"--line A B: A is {start[1].run.method} {start[1].recipe.arch}, B is "
                              f"{end_config.run.method} {end_config.recipe.arch}; a line joins two checkpoints of "
                              "one model")
        end, end_name = end_model, str(end_path)
    start[0].to(dist.device)
    end.to(dist.device)
    name = "_to_".join(model_names(tuple(config.line)))
    x = np.linspace(*config.recipe.line_range, config.recipe.line_points)
    for kind in config.loss:
        values = line(config, kind, start, (end, end_name), out / "lines" / name / kind, dist,
                      recon_images(config, [start]) if kind == "recon" else None)
        if dist.is_main:
            curve_figure({name: (x, values)}, f"{kind} loss from A (α = 0) to B (α = 1)",
                         out / "figures" / f"line_{name}_{kind}")
            ends = {a: values[int(np.argmin(np.abs(x - a)))] for a in (0.0, 1.0)}
            print(f"line {name} {kind}: loss {ends[0.0]:.4f} at A, {ends[1.0]:.4f} at B", flush=True)


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


def record(config: LandscapeConfig, kind: str, name: str, model: Pretrained, found: dict, metrics: dict,
           started: float, device: torch.device) -> None:
    _, pretrain_config, path = model
    result = build_result(task="landscape", dataset=found["data"], protocol=kind,
                          protocol_id=protocol_id({}, config.preset, config.recipe, PRESETS.get(config.preset)),
                          metric="width", metrics=metrics,
                          checkpoint=path, metadata=None, sha256=file_sha256(path), method=pretrain_config.run.method,
                          arch=pretrain_config.recipe.arch, seed=config.run.seed, config=to_dict(config),
                          started=started, device=device, dtype=None,
                          tags=record_tags(config.run, model=name))
    store = append_result(result, config.run.results)
    print(f"{name} {kind}: width {metrics['width']:.3f}, sharpness {metrics['sharpness']:.4f}, convex share "
          f"{metrics['convex_share']:.2f}, λmax {metrics['lambda_max_centre']:.3g} -> {store}", flush=True)


def run_landscapes(config: LandscapeConfig) -> dict[str, dict[str, dict[str, float]]]:
    """Every model's landscape on every loss, and the --line; returns ``{loss: {model: summary}}``."""
    started = time.perf_counter()
    run = config.run
    out = Path(run.out)
    dist = init_distributed(run.device)
    holds_run = any(out.glob("*/*/directions.pt")) or any(out.glob("lines/*/*/directions.pt"))
    lock = start_run_on_rank0(dist.world_size, dist.rank, out, to_dict(config), resume=run.resume,
                              holds_run=holds_run, harmless=HARMLESS_ON_RESUME)
    try:
        models = {name: read_pretraining_model(path)
                  for name, path in zip(model_names(config.checkpoints), config.checkpoints)}
        summaries: dict[str, dict[str, dict[str, float]]] = {}
        for kind in config.loss if models else ():
            images_root = recon_images(config, list(models.values())) if kind == "recon" else None
            results = {}
            for name, (model, pretrain_config, _) in models.items():
                model.to(dist.device)
                results[name] = landscape(config, kind, model, pretrain_config, out / name / kind, dist, images_root)
            summaries[kind] = {name: summary(found, config.recipe) for name, found in results.items()}
            if not dist.is_main:
                continue
            draw(out, kind, results, config.recipe)
            for name, found in results.items():
                if not found["finished_before"]:  # a resumed run that had finished: recorded already
                    record(config, kind, name, models[name], found, summaries[kind][name], started, dist.device)
        if dist.is_main and summaries:
            write_table(out / "landscape.md", summaries)
        if config.line:
            run_line(config, out, dist)
        return summaries
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    if wants_printed_config(argv):
        return exit_status(lambda: print_config(parse_args(argv)))
    return exit_status(lambda: run_landscapes(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
