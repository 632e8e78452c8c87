"""Each linear-probe dataset's standard metric, in percent.

The datasets of the transfer protocol (Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?";
Ericsson et al. 2021, "How Well Do Self-Supervised Models Transfer?") are scored three ways: top-1 accuracy;
mean per-class accuracy (FGVC Aircraft, Oxford-IIIT Pets, Caltech-101, Oxford 102 Flowers), so that small
classes weigh as much as large ones; and for the multi-label PASCAL VOC2007 the 11-point interpolated mean
average precision of the VOC devkit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DIFFICULT = -1  # VOC's label for an object that is present but "difficult": neither a hit nor a miss


def _predictions(logits_or_pred: torch.Tensor) -> torch.Tensor:
    """(N, C) scores → argmax class; (N,) class indices pass through."""
    if logits_or_pred.ndim == 2:
        return logits_or_pred.argmax(dim=1)
    if logits_or_pred.ndim == 1:
        return logits_or_pred.long()
    raise ValueError(f"expected (N, C) scores or (N,) predictions, got shape {tuple(logits_or_pred.shape)}")


def _check_same_length(predictions: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.ndim != 1 or len(labels) != len(predictions):
        raise ValueError(
            f"labels must be (N,) with N = {len(predictions)} like the scores, got shape {tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("cannot score an empty set")


def top1_accuracy(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of samples whose highest-scoring class (or given prediction) is the label."""
    predictions = _predictions(logits_or_pred)
    _check_same_length(predictions, labels)
    return 100.0 * (predictions == labels.to(predictions.device)).double().mean().item()


def mean_per_class_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> float:
    """Mean over the classes present in ``labels`` of each class's recall, in percent.

    Classes absent from ``labels`` are left out rather than counted as 0, as scikit-learn's
    ``balanced_accuracy_score`` does; ``num_classes`` (default: the score columns) only guards the labels' range.
    """
    predictions = _predictions(scores)
    _check_same_length(predictions, labels)
    labels = labels.to(predictions.device).long()
    if num_classes is None and scores.ndim == 2:
        num_classes = scores.shape[1]
    upper = num_classes if num_classes is not None else float("inf")
    if labels.min() < 0 or labels.max() >= upper:
        raise ValueError(f"labels must lie in [0, {upper}), got [{labels.min()}, {labels.max()}]")
    length = int(max(labels.max(), predictions.max())) + 1
    per_class_total = torch.bincount(labels, minlength=length)
    per_class_correct = torch.bincount(labels[predictions == labels], minlength=length)
    present = per_class_total > 0
    recall = per_class_correct[present].double() / per_class_total[present].double()
    return 100.0 * recall.mean().item()


def voc11_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[float]]:
    """VOC2007 11-point interpolated average precision per class and its mean, in percent.

    ``scores`` and ``targets`` are (N, C); targets are 1 (present), 0 (absent) or -1 (difficult). As in the
    VOC devkit's ``VOCevalcls``, a difficult image counts as neither a true nor a false positive for that class.
    Per class, AP = mean over recall thresholds t = 0, 0.1, ..., 1 of the highest precision reached at a
    recall ≥ t (0 when none is). Thresholds are exactly k/10 and recall is computed in float64, so a recall
    of exactly 0.3 reaches the 0.3 threshold (a ``0:0.1:1`` range would put it at 0.30000000000000004).
    Images with equal scores keep their input order.
    """
    if scores.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(
            f"scores and targets must both be (N, C); got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    targets = targets.to(scores.device)
    if not torch.isin(targets, torch.tensor([DIFFICULT, 0, 1], device=scores.device, dtype=targets.dtype)).all():
        raise ValueError("targets must be 1 (present), 0 (absent) or -1 (difficult)")
    positives = (targets == 1).sum(dim=0)
    if (positives == 0).any():
        missing = torch.nonzero(positives == 0).flatten().tolist()
        raise ValueError(f"AP is undefined for classes without a positive example: {missing}")

    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    ranked = targets.gather(0, order)
    # A difficult image keeps its rank but adds nothing to either count, so precision and recall carry over it.
    true_positives = (ranked == 1).double().cumsum(dim=0)
    false_positives = (ranked == 0).double().cumsum(dim=0)
    recall = true_positives / positives.double()
    retrieved = true_positives + false_positives
    precision = torch.where(retrieved > 0, true_positives / retrieved.clamp(min=1), 0.0)

    thresholds = torch.arange(11, dtype=torch.float64, device=scores.device) / 10
    interpolated = torch.stack(
        [torch.where(recall >= threshold, precision, 0.0).amax(dim=0) for threshold in thresholds]
    )
    per_class = (100.0 * interpolated.mean(dim=0)).tolist()
    return sum(per_class) / len(per_class), per_class


def voc11_mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean over classes of :func:`voc11_average_precision`, in percent."""
    return voc11_average_precision(scores, targets)[0]


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "top1": top1_accuracy,
    "mean_per_class_accuracy": mean_per_class_accuracy,
    "map11": voc11_mean_average_precision,
}


def score(metric: str, scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Score with the metric named ``metric`` (a key of :data:`METRICS`), in percent."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {sorted(METRICS)}")
    return METRICS[metric](scores, targets)
