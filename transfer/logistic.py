"""The linear probe's classifier: L2-regularised logistic regression fitted by full-batch L-BFGS in torch.

Protocol of Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?"), also used by Ericsson et al.
2021 ("How Well Do Self-Supervised Models Transfer?"): multinomial logistic regression on frozen features, the
L2 strength chosen on the validation split among 45 log-spaced values in [1e-6, 1e5], then a refit on
train+val with that value, scored once on test. VOC2007 is multi-label: one binary logistic regression per
class, images marked difficult (-1) left out of that class's loss.

The regularisation ``λ`` is scikit-learn's ``LogisticRegression(C=1/λ)``: we minimise
``Σ_i CE_i + (λ/2)·‖W‖²`` with the bias unpenalised, so a fit can be checked against scikit-learn. The
optimiser sees the same objective divided by N (mean CE + λ/(2N)·‖W‖²: same minimiser, gradients of order 1
whatever N, so one tolerance fits every dataset). Features are standardised with the fitting set's per-feature
mean and standard deviation, stored in the classifier: one λ grid then suits every backbone, whatever the
scale of its features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mimbench.transfer.metrics import DIFFICULT, METRICS, score

REGULARISATION_GRID: tuple[float, ...] = tuple(float(value) for value in np.logspace(-6, 5, 45))


@dataclass
class LinearClassifier:
    """``scores(x) = ((x - mean) / std) @ weight + bias``; logits of a softmax, or of C sigmoids if multilabel."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D, C), on standardised features
    bias: torch.Tensor  # (C,)
    multilabel: bool = False
    iterations: int = 0  # L-BFGS iterations of the fit: equal to max_iter means it stopped at the cap

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.to(self.weight) - self.mean) / self.std

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) for raw (unstandardised) features (N, D)."""
        return self.standardise(features) @ self.weight + self.bias


def _check_inputs(features: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    if multilabel:
        if targets.ndim != 2 or len(targets) != len(features):
            raise ValueError(
                f"multilabel targets must be (N, C) with N = {len(features)}, got shape {tuple(targets.shape)}"
            )
        if not ((targets == 1) | (targets == 0) | (targets == DIFFICULT)).all():
            raise ValueError("multilabel targets must be 1 (present), 0 (absent) or -1 (difficult)")
    else:
        if targets.shape != (len(features),) or targets.is_floating_point():
            raise ValueError(
                f"targets must be (N,) integer class indices with N = {len(features)}, "
                f"got {targets.dtype} of shape {tuple(targets.shape)}"
            )
        if targets.min() < 0:
            raise ValueError(f"class indices must be ≥ 0, got {int(targets.min())}")


def _in_standardisation(init: LinearClassifier, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``init``'s weights re-expressed for features standardised by (mean, std): same scores on every input.

    Lets the refit on train+val start from the classifier chosen on val although their statistics differ.
    """
    weight, bias = init.weight.to(mean), init.bias.to(mean)
    old_mean, old_std = init.mean.to(mean), init.std.to(mean)
    return weight * (std / old_std)[:, None], bias + ((mean - old_mean) / old_std) @ weight


def fit_logistic(
    features: torch.Tensor,
    targets: torch.Tensor,
    regularisation: float,
    multilabel: bool = False,
    max_iter: int = 1000,
    tolerance: float = 1e-6,
    init: LinearClassifier | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearClassifier:
    """Minimise ``Σ_i loss_i + (regularisation / 2)·‖W‖²`` by full-batch L-BFGS on the features' device.

    ``targets`` are (N,) int64 class indices (softmax cross-entropy), or with ``multilabel`` (N, C) floats in
    {1, 0, -1} (per-class sigmoid cross-entropy, -1 entries excluded). ``tolerance`` bounds the largest
    gradient entry of the per-sample objective (scikit-learn's ``tol``); ``init`` warm-starts from a fitted
    classifier, even one standardised on other data.
    """
    _check_inputs(features, targets, multilabel)
    if regularisation < 0:
        raise ValueError(f"regularisation must be ≥ 0, got {regularisation}")
    features = features.to(dtype)
    mean = features.mean(dim=0)
    std = features.std(dim=0, correction=0)  # population std, as scikit-learn's StandardScaler
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature stays 0 instead of dividing by 0
    standardised = (features - mean) / std
    num_samples = len(features)
    num_classes = targets.shape[1] if multilabel else int(targets.max()) + 1
    if init is not None and not multilabel:
        num_classes = max(num_classes, init.weight.shape[1])  # the fitting set may lack init's last class
    if init is not None and init.weight.shape[1] != num_classes:
        raise ValueError(f"init has {init.weight.shape[1]} classes, the targets {num_classes}")

    targets = targets.to(features.device)
    if multilabel:
        observed = (targets != DIFFICULT).to(dtype)
        binary_targets = targets.clamp(min=0).to(dtype)

    def data_loss(logits: torch.Tensor) -> torch.Tensor:
        if multilabel:
            per_entry = F.binary_cross_entropy_with_logits(logits, binary_targets, reduction="none")
            return (per_entry * observed).sum()
        return F.cross_entropy(logits, targets, reduction="sum")

    if init is None:
        weight = torch.zeros(features.shape[1], num_classes, dtype=dtype, device=features.device)
        bias = torch.zeros(num_classes, dtype=dtype, device=features.device)
    else:
        weight, bias = _in_standardisation(init, mean, std)
    weight.requires_grad_(True)
    bias.requires_grad_(True)

    optimiser = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        # Only a step that changes nothing stops the fit early: torch compares loss changes absolutely, and a
        # warm start's first steps change a small loss by less than any fixed threshold would allow.
        tolerance_change=torch.finfo(dtype).eps ** 2,
        history_size=20,  # 2·20 copies of W: ample curvature memory for a smooth convex problem
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        penalty = 0.5 * regularisation * weight.square().sum()
        objective = (data_loss(standardised @ weight + bias) + penalty) / num_samples
        objective.backward()
        return objective

    optimiser.step(closure)
    iterations = optimiser.state[weight].get("n_iter", 0)
    return LinearClassifier(mean, std, weight.detach(), bias.detach(), multilabel, iterations)


@dataclass
class ProbeResult:
    regularisation: float  # the λ chosen on val
    val_scores: dict[float, float]  # λ -> val metric (percent), for every λ of the grid
    test_score: float  # percent, after the refit on train+val
    classifier: LinearClassifier  # the refit one


def select_and_evaluate(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    metric: str,
    multilabel: bool = False,
    grid: Sequence[float] = REGULARISATION_GRID,
    progress: bool = False,
    max_iter: int = 1000,
    dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Choose λ on val, refit on train+val, score test (Kornblith et al. 2019); each split is (features, targets).

    ``metric`` is a key of :data:`mimbench.transfer.metrics.METRICS`. The sweep runs from the largest λ to the
    smallest, each fit warm-started from the previous one: neighbouring solutions are close, so most fits take
    a few iterations. A tie goes to the larger λ, the more regularised classifier. ``max_iter`` caps each fit.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {sorted(METRICS)}")
    if len(grid) == 0:
        raise ValueError("the regularisation grid is empty")
    if not multilabel:
        trained = set(torch.unique(train[1]).tolist())
        untrained = sorted(set(torch.cat([val[1], test[1]]).unique().tolist()) - trained)
        if untrained:
            raise ValueError(f"classes {untrained} appear in val/test but have no training example")

    val_scores: dict[float, float] = {}
    chosen, chosen_classifier, classifier = None, None, None
    sweep = tqdm(sorted(grid, reverse=True), desc=f"linear probe ({metric})", disable=not progress)
    for regularisation in sweep:
        classifier = fit_logistic(
            *train, regularisation, multilabel, max_iter=max_iter, init=classifier, dtype=dtype
        )
        val_scores[regularisation] = score(metric, classifier.scores(val[0]), val[1])
        if chosen is None or val_scores[regularisation] > val_scores[chosen]:  # strict: ties keep the larger λ
            chosen, chosen_classifier = regularisation, classifier
        sweep.set_postfix(λ=f"{regularisation:.1e}", val=f"{val_scores[regularisation]:.2f}",
                          iters=classifier.iterations)

    train_val = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    final = fit_logistic(*train_val, chosen, multilabel, max_iter=max_iter, init=chosen_classifier, dtype=dtype)
    test_score = score(metric, final.scores(test[0]), test[1])
    return ProbeResult(chosen, val_scores, test_score, final)
