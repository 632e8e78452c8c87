"""Directions in weight space for loss landscapes (Li et al., "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018, Sec. 4).

A direction is a dict ``{parameter name: tensor}`` over EVERY named parameter of the model, in
``named_parameters()`` order. A random direction is Gaussian and filter-normalised: for each tensor of two or
more dims, each slice along dim 0 (a filter, or a row of a linear layer) is rescaled to the norm of the same
slice of the weights, so that the landscape does not depend on the scale invariance of normalised layers.
Tensors of one dim or fewer (biases, norms) and frozen parameters (the fixed sin-cos position embeddings, an EMA
teacher) stay at zero, as in the paper's default ("ignore biasbn"). Directions are saved with their seed, so a
surface can be recomputed or extended exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mimbench.core.io import atomic_write

Direction = dict[str, torch.Tensor]


def perturbed(parameter: nn.Parameter) -> bool:
    """Whether the landscape moves this parameter: trainable tensors of two or more dims."""
    return parameter.requires_grad and parameter.ndim >= 2


def filter_normalise(direction: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``direction`` with each dim-0 slice rescaled to the norm of the same slice of ``weights``."""
    d = direction.reshape(len(direction), -1)
    w = weights.detach().reshape(len(weights), -1).to(d)
    scale = w.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + 1e-10)  # 1e-10: the reference's guard
    return (d * scale).reshape(direction.shape)


def random_directions(model: nn.Module, seed: int, count: int = 2) -> list[Direction]:
    """``count`` filter-normalised Gaussian directions, drawn in order from one CPU generator seeded ``seed``
    (the draw does not depend on the device), only for the perturbed parameters."""
    generator = torch.Generator().manual_seed(seed)
    directions: list[Direction] = []
    for _ in range(count):
        direction = {}
        for name, parameter in model.named_parameters():
            if perturbed(parameter):
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                direction[name] = filter_normalise(noise, parameter.cpu())
            else:
                direction[name] = torch.zeros(parameter.shape, dtype=torch.float32)
        directions.append(direction)
    return directions


def line_direction(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], model: nn.Module,
                   frozen: bool = False) -> Direction:
    """``end − start`` over the model's trainable parameters (``frozen``: over every parameter; zero elsewhere):
    with the centre at ``start``, α = 0 is ``start`` and α = 1 is ``end`` (e.g. two checkpoints of one run, or
    student and teacher). Between two RC-MAE checkpoints the frozen teacher moves too, so both ends are the
    checkpoints' own models."""
    return {name: (end[name].float() - start[name].float()) if parameter.requires_grad or frozen
            else torch.zeros(parameter.shape, dtype=torch.float32)
            for name, parameter in model.named_parameters()}


def save_directions(path: Path, directions: list[Direction], description: dict) -> None:
    """Write the directions with what produced them (seed, kind, checkpoint) atomically."""
    atomic_write(Path(path), lambda tmp: torch.save({"directions": directions, **description}, tmp))


def load_directions(path: Path) -> tuple[list[Direction], dict]:
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    directions = saved.pop("directions")
    return directions, saved
