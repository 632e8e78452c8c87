"""Curvature: the largest and smallest Hessian eigenvalues of a loss at a point, from Hessian-vector products.

Lanczos with full reorthogonalisation, not power iteration with deflation: one Krylov space of k products gives
BOTH ends of the spectrum at once (the Ritz values of its tridiagonal matrix), and the extreme eigenvalues
converge in far fewer products than power iteration needs, especially for λmin, which power iteration only
reaches through a shifted second run that converges at the rate of the spectrum's gap ratio. With k ≥ the number
of parameters it is exact (the quadratic test). Its cost is k Lanczos vectors in memory (k × parameters floats).
Products are double backward through autograd (``torch.autograd.grad`` with ``create_graph``), so fused
attention kernels, which may lack a double backward, are switched to timm's math path first (`math_attention`).
The start vector is drawn from a fixed seed, so every grid point runs the same algorithm on its own Hessian.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from mimbench.landscape.losses import LossFn


def math_attention(model: nn.Module) -> nn.Module:
    """Every attention module of ``model`` (timm's and MixedAE's, which follow timm's ``fused_attn`` flag) on the
    explicit softmax(QKᵀ)V path, which has a double backward."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def lanczos_extremes(hvp: Callable[[torch.Tensor], torch.Tensor], dim: int, iterations: int, seed: int,
                     like: torch.Tensor) -> tuple[float, float]:
    """(λmin, λmax) of the symmetric operator ``hvp`` on R^dim after ``iterations`` Lanczos steps."""
    generator = torch.Generator().manual_seed(seed)
    steps = min(iterations, dim)
    basis = torch.empty(steps + 1, dim, dtype=torch.float64, device=like.device)  # the Lanczos vectors as rows
    vector = torch.randn(dim, generator=generator, dtype=torch.float64).to(like.device)
    basis[0] = vector / vector.norm()
    alphas, betas = [], []
    for k in range(steps):
        w = hvp(basis[k].to(like.dtype)).to(torch.float64)
        alphas.append(float(w @ basis[k]))
        for _ in range(2):  # full reorthogonalisation (classical Gram-Schmidt), twice: "twice is enough"
            w = w - basis[: k + 1].T @ (basis[: k + 1] @ w)
        beta = float(w.norm())
        if beta < 1e-10 * max(1.0, max(abs(a) for a in alphas)):  # the Krylov space is invariant: exact
            break
        betas.append(beta)
        basis[k + 1] = w / beta
    tridiagonal = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    ritz = np.linalg.eigvalsh(tridiagonal)
    return float(ritz[0]), float(ritz[-1])


def hessian_extremes(loss_fn: LossFn, model: nn.Module, iterations: int, seed: int = 0) -> tuple[float, float]:
    """(λmin, λmax) of the Hessian of ``loss_fn`` over the model's trainable parameters at their current values."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model), params, create_graph=True, allow_unused=True)
    # A gradient that is constant (no graph) has a zero Hessian block: its product is zero.
    curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in params]

    def hvp(vector: torch.Tensor) -> torch.Tensor:
        pieces = [piece.view_as(p) for piece, p in zip(vector.split(sizes), params)]
        products = [torch.zeros_like(p) for p in params]
        if not curved:  # a loss linear in every parameter
            return torch.cat([h.flatten() for h in products])
        found = torch.autograd.grad([grads[i] for i in curved], params, grad_outputs=[pieces[i] for i in curved],
                                    retain_graph=True, allow_unused=True)
        products = [p if h is None else h for p, h in zip(products, found)]
        return torch.cat([h.flatten() for h in products])

    return lanczos_extremes(hvp, sum(sizes), iterations, seed, params[0].detach())


def curvature_measure(loss_fn: LossFn, iterations: int, seed: int = 0) -> Callable[[nn.Module], dict[str, float]]:
    """The surface measure ``{"lambda_min", "lambda_max"}`` at each point."""
    def measure(model: nn.Module) -> dict[str, float]:
        lambda_min, lambda_max = hessian_extremes(loss_fn, model, iterations, seed)
        return {"lambda_min": lambda_min, "lambda_max": lambda_max}
    return measure


def convexity_ratio(lambda_min: np.ndarray, lambda_max: np.ndarray) -> np.ndarray:
    """|λmin / λmax| at each point: small where the loss is locally near convex (Li et al. 2018, Fig. 7)."""
    return np.abs(lambda_min / np.where(lambda_max == 0, np.finfo(float).tiny, lambda_max))


def convex_share(lambda_min: np.ndarray, lambda_max: np.ndarray, epsilon: float) -> float:
    """The share of grid points where λmin ≥ −ε·λmax: the region of (near) convexity."""
    return float(np.mean(lambda_min >= -epsilon * np.abs(lambda_max)))
