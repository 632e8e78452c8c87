"""Numbers that summarise a surface for the results store: sharpness and width around the centre."""

from __future__ import annotations

import numpy as np

from mimbench.landscape.surface import Grid


def radii(grid: Grid) -> np.ndarray:
    """Distance of each grid point from the centre in the (α, β) plane, in the surface's shape."""
    x = np.asarray(grid.x)
    if grid.y is None:
        return np.abs(x)
    return np.hypot(*np.meshgrid(x, np.asarray(grid.y)))


def sharpness(values: np.ndarray, grid: Grid, centre: float, radius: float) -> float:
    """The largest loss rise over the centre among grid points within ``radius`` (Keskar et al.'s ε-sharpness,
    restricted to the plotted plane)."""
    inside = radii(grid) <= radius + 1e-12
    return float(values[inside].max() - centre)


def width(values: np.ndarray, grid: Grid, centre: float, epsilon: float) -> float:
    """The radius of the largest disc around the centre where the loss stays within ``centre + epsilon``: the
    distance to the nearest grid point above it (the grid's largest radius when none is: a lower bound)."""
    distance = radii(grid)
    above = values > centre + epsilon
    return float(distance[above].min() if above.any() else distance.max())
