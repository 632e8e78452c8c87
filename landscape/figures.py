"""Figures of surfaces (matplotlib, PNG and PDF): contour, filled contour, 3D surface, 1D curve, the |λmin/λmax|
heat map, and models side by side on one colour scale."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mimbench.landscape.surface import Grid  # noqa: E402


def save(figure: plt.Figure, path: Path) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path.with_suffix(suffix) for suffix in (".png", ".pdf")]
    for target in written:
        figure.savefig(target, dpi=150, bbox_inches="tight")
    plt.close(figure)
    return written


def surface_figures(values: np.ndarray, grid: Grid, title: str, stem: Path) -> list[Path]:
    """Contour, filled contour and 3D surface of a 2D surface (α along x, β along y)."""
    x, y = np.meshgrid(grid.x, grid.y)
    written = []
    for kind in ("contour", "contourf"):
        figure, axes = plt.subplots(figsize=(4.5, 4))
        drawn = getattr(axes, kind)(x, y, values, levels=20, cmap="viridis")
        if kind == "contour":
            axes.clabel(drawn, fontsize=6)
        else:
            figure.colorbar(drawn, ax=axes)
        axes.set(xlabel="α (δ)", ylabel="β (η)", title=title)
        written += save(figure, stem.with_name(f"{stem.name}_{kind}"))
    figure = plt.figure(figsize=(5, 4))
    axes = figure.add_subplot(projection="3d")
    axes.plot_surface(x, y, values, cmap="viridis", linewidth=0)
    axes.set(xlabel="α", ylabel="β", zlabel="loss", title=title)
    return written + save(figure, stem.with_name(f"{stem.name}_3d"))


def curve_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path) -> list[Path]:
    """1D curves ``{label: (α, loss)}`` on one axis."""
    figure, axes = plt.subplots(figsize=(4.5, 3.5))
    for label, (alpha, loss) in curves.items():
        axes.plot(alpha, loss, label=label)
    axes.set(xlabel="α", ylabel="loss", title=title)
    axes.legend()
    return save(figure, path)


def side_by_side(panels: dict[str, tuple[np.ndarray, Grid]], title: str, path: Path, colour: str = "viridis",
                 label: str = "loss", heat_map: bool = False) -> list[Path]:
    """Filled contours (or, for a coarse grid, a heat map of cells) of several models on ONE colour scale, so
    they compare by eye."""
    low = min(float(np.nanmin(values)) for values, _ in panels.values())
    high = max(float(np.nanmax(values)) for values, _ in panels.values())
    levels = np.linspace(low, high if high > low else low + 1e-12, 21)
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False, sharey=True,
                                constrained_layout=True)
    for ax, (name, (values, grid)) in zip(axes[0], panels.items()):
        if heat_map:
            drawn = ax.pcolormesh(grid.x, grid.y, values, shading="nearest", cmap=colour, vmin=low, vmax=high)
        else:
            drawn = ax.contourf(*np.meshgrid(grid.x, grid.y), values, levels=levels, cmap=colour, extend="both")
        ax.set(xlabel="α (δ)", title=name)
    axes[0][0].set_ylabel("β (η)")
    figure.colorbar(drawn, ax=axes[0].tolist(), label=label)
    figure.suptitle(title)
    return save(figure, path)
