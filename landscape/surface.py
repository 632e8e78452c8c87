"""Surfaces: a measure (the loss, or Hessian eigenvalues) at every point θ* + α·δ + β·η of a grid.

- A grid is any rectangle: ``x`` holds the α values (along δ), ``y`` the β values (along η), and a 2D surface
  is an array of shape ``(len(y), len(x))``, so ``values[j, i]`` is at (α = x[i], β = y[j]), the orientation
  matplotlib's ``contour(x, y, values)`` expects. A 1D curve has no ``y``: shape ``(len(x),)``.
- Points are numbered row-major (k = j·len(x) + i); process ``rank`` of ``world`` computes the points with
  k % world == rank. Every point sets the weights from the centre afresh and the measure reseeds itself, so a
  point's value depends on nothing but its coordinates: sharded = unsharded, bit for bit.
- Each finished point is appended at once to ``<folder>/points/rank<r>.jsonl`` (floats as exact hex), so a killed
  run resumes where it stopped, with any number of processes; a half-written last line is dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from mimbench.landscape.directions import Direction

Measure = Callable[[nn.Module], dict[str, float]]


@dataclass(frozen=True)
class Grid:
    x: tuple[float, ...]  # α, along the first direction
    y: tuple[float, ...] | None = None  # β, along the second; None: a 1D curve

    @classmethod
    def rectangle(cls, x_range: tuple[float, float], x_points: int, y_range: tuple[float, float] | None = None,
                  y_points: int | None = None) -> Grid:
        x = tuple(float(v) for v in np.linspace(*x_range, x_points))
        y = None if y_range is None else tuple(float(v) for v in np.linspace(*y_range, y_points))
        return cls(x, y)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.x),) if self.y is None else (len(self.y), len(self.x))

    def __len__(self) -> int:
        return int(np.prod(self.shape))

    def index_of(self, *point: float) -> int | None:
        """The number k of the grid point at exactly ``point`` ((α,) or (α, β)), None where there is none."""
        axes = (self.x,) if self.y is None else (self.x, self.y)
        if len(point) != len(axes) or any(value not in axis for value, axis in zip(point, axes)):
            return None
        i = self.x.index(point[0])
        return i if self.y is None else self.y.index(point[1]) * len(self.x) + i

    def coordinates(self, k: int) -> tuple[float, ...]:
        """(α,) or (α, β) of point ``k``."""
        if self.y is None:
            return (self.x[k],)
        return self.x[k % len(self.x)], self.y[k // len(self.x)]


def set_weights(model: nn.Module, centre: dict[str, torch.Tensor], directions: list[Direction],
                coefficients: Iterable[float]) -> None:
    """Parameters ← centre + Σ cᵢ·directionᵢ, summed in the same order at every point."""
    coefficients = tuple(coefficients)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            value = centre[name].clone()
            for c, direction in zip(coefficients, directions):
                value.add_(direction[name].to(value), alpha=c)
            parameter.copy_(value)


def centre_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's parameters: the centre θ* of a surface."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------- the point log


def read_points(folder: Path) -> dict[int, dict[str, float]]:
    """Every finished point in ``folder/points`` (all ranks' files), ``{k: {name: value}}``."""
    points: dict[int, dict[str, float]] = {}
    for path in sorted((Path(folder) / "points").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the half-written last line of a killed process
                continue
            points[entry["k"]] = {name: float.fromhex(value) for name, value in entry["values"].items()}
    return points


class PointLog:
    """One process's append-only file of finished points; each line is flushed and fsynced when written."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.path = Path(folder) / "points" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # cut a half-written last line, so the next line starts on its own
            text = self.path.read_bytes()
            self.path.write_bytes(text[: text.rfind(b"\n") + 1])

    def write(self, k: int, values: dict[str, float]) -> None:
        line = json.dumps({"k": k, "values": {name: float(v).hex() for name, v in values.items()}})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(model: nn.Module, measure: Measure, directions: list[Direction], grid: Grid, folder: Path,
             rank: int = 0, world_size: int = 1, description: str = "surface") -> dict[str, np.ndarray]:
    """The measure at every grid point around the model's current weights (the centre), resuming from the points
    already in ``folder``; this process computes its share. Returns ``{name: array of grid.shape}`` (float64)
    once every process has finished; the model's weights are the centre again afterwards."""
    if len(directions) != (1 if grid.y is None else 2):
        raise ValueError(f"a grid of shape {grid.shape} needs {len(grid.shape)} direction(s), got {len(directions)}")
    centre = centre_of(model)
    done = read_points(folder)
    todo = [k for k in range(rank, len(grid), world_size) if k not in done]
    log = PointLog(folder, rank)
    try:
        with tqdm(total=len(range(rank, len(grid), world_size)), initial=len(range(rank, len(grid), world_size))
                  - len(todo), desc=description, disable=rank != 0, dynamic_ncols=True) as progress:
            for k in todo:
                set_weights(model, centre, directions, grid.coordinates(k))
                log.write(k, measure(model))
                progress.update(1)
    finally:
        set_weights(model, centre, directions, [0.0] * len(directions))
    if world_size > 1:
        dist.barrier()
    points = read_points(folder)
    missing = [k for k in range(len(grid)) if k not in points]
    if missing:
        raise RuntimeError(f"{len(missing)} grid point(s) missing from {folder}/points, e.g. point {missing[0]}")
    names = points[0].keys()
    return {name: np.array([points[k][name] for k in range(len(grid))], dtype=np.float64).reshape(grid.shape)
            for name in names}
