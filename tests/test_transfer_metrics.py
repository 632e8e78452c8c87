"""Linear-probe metrics: equal to scikit-learn, and VOC2007 11-point AP equal to a loop-by-loop devkit reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from mimbench.transfer.metrics import (
    METRICS,
    mean_per_class_accuracy,
    score,
    top1_accuracy,
    voc11_average_precision,
)


def reference_voc07_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """One class's AP as the VOC2007 devkit computes it (``VOCevalcls`` + 11-point ``VOCap``), with loops.

    targets: 1 positive, 0 negative, -1 difficult (neither a true nor a false positive).
    """
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable, as ours
    num_positives = sum(1 for t in targets if t == 1)
    true_positives = false_positives = 0
    recalls, precisions = [], []
    for i in order:
        if targets[i] == 1:
            true_positives += 1
        elif targets[i] == 0:
            false_positives += 1
        recalls.append(true_positives / num_positives)
        retrieved = true_positives + false_positives
        precisions.append(true_positives / retrieved if retrieved else float("nan"))
    average_precision = 0.0
    for k in range(11):
        threshold = k / 10
        reached = [p for r, p in zip(recalls, precisions) if r >= threshold and not np.isnan(p)]
        average_precision += (max(reached) if reached else 0.0) / 11
    return 100.0 * average_precision


def test_top1_equals_sklearn_for_scores_and_predictions():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 7, generator=generator)
    labels = torch.randint(7, (500,), generator=generator)
    expected = 100.0 * accuracy_score(labels.numpy(), scores.argmax(1).numpy())
    assert top1_accuracy(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert top1_accuracy(scores.argmax(1), labels) == pytest.approx(expected, abs=1e-12)
    assert top1_accuracy(torch.nn.functional.one_hot(labels, 7).float(), labels) == 100.0


def test_mean_per_class_accuracy_equals_balanced_accuracy():
    generator = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([5, 40, 200, 11])])  # imbalanced
    scores = torch.randn(len(labels), 4, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    expected = 100.0 * balanced_accuracy_score(labels.numpy(), scores.argmax(1).numpy())
    assert mean_per_class_accuracy(scores, labels) == pytest.approx(expected, abs=1e-12)
    # differs from top-1 because the classes are imbalanced
    assert abs(mean_per_class_accuracy(scores, labels) - top1_accuracy(scores, labels)) > 1.0


def test_mean_per_class_accuracy_averages_only_classes_present():
    labels = torch.tensor([0, 0, 2, 2, 2, 2])
    predictions = torch.tensor([0, 1, 2, 2, 1, 1])  # class 1 predicted but never a label
    # (1/2 + 2/4) / 2 classes present
    assert mean_per_class_accuracy(predictions, labels) == pytest.approx(50.0)
    with pytest.warns(UserWarning):  # scikit-learn warns about the predicted-only class, then agrees
        expected = 100.0 * balanced_accuracy_score(labels.numpy(), predictions.numpy())
    assert mean_per_class_accuracy(predictions, labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        mean_per_class_accuracy(predictions, labels, num_classes=2)


def test_voc11_ap_hand_computed():
    # Ranked P N P N P with 3 positives: precision 1, 1/2, 2/3, 1/2, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1.
    # Thresholds 0-0.3 → 1; 0.4-0.6 → 2/3; 0.7-1.0 → 3/5.
    scores = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    targets = torch.tensor([[1], [0], [1], [0], [1]])
    mean_ap, per_class = voc11_average_precision(scores, targets)
    assert per_class == [pytest.approx(100 * (4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11)]  # 76.36
    assert mean_ap == pytest.approx(76.3636, abs=1e-4)


def test_voc11_ap_difficult_images_are_ignored():
    scores = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    # the high-ranked false positive made difficult: ranked P P N P → thresholds 0-0.6 → 1, 0.7-1.0 → 3/4
    no_false_positive = torch.tensor([[1], [-1], [1], [0], [1]])
    assert voc11_average_precision(scores, no_false_positive)[0] == pytest.approx(100 * (7 + 4 * 3 / 4) / 11)
    # the last positive made difficult: 2 positives, ranked P N P N → thresholds 0-0.5 → 1, 0.6-1.0 → 2/3
    easier_recall = torch.tensor([[1], [0], [1], [0], [-1]])
    assert voc11_average_precision(scores, easier_recall)[0] == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)


def test_voc11_ap_recall_of_exactly_three_tenths_reaches_that_threshold():
    # 10 positives: P P P, then 7 negatives, then 7 positives. Recall 3/10 has precision 1 at threshold 0.3
    # (a floating 0:0.1:1 range would put that threshold at 0.30000000000000004 and give 3 + 8 * 10/17).
    ranked = [1] * 3 + [0] * 7 + [1] * 7
    scores = torch.arange(len(ranked), 0, -1, dtype=torch.float32)[:, None]
    mean_ap, _ = voc11_average_precision(scores, torch.tensor(ranked)[:, None])
    assert mean_ap == pytest.approx(100 * (4 + 7 * 10 / 17) / 11)


def test_voc11_ap_equals_devkit_reference_on_random_multilabel_data():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(300, 6)).astype(np.float32)
    targets = (rng.random((300, 6)) < 0.2).astype(np.int64)
    targets[rng.random((300, 6)) < 0.1] = -1  # difficult
    scores[:, 2] += 1.5 * (targets[:, 2] == 1)  # one class far better than chance
    scores[:50, 4] = 0.0  # ties
    mean_ap, per_class = voc11_average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    expected = [reference_voc07_ap(scores[:, c], targets[:, c]) for c in range(6)]
    assert per_class == pytest.approx(expected, abs=1e-9)
    assert mean_ap == pytest.approx(float(np.mean(expected)), abs=1e-9)
    assert per_class[2] > per_class[0] + 20


def test_perfect_scores_give_100():
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 3])
    perfect = torch.nn.functional.one_hot(labels, 4).float()
    assert top1_accuracy(perfect, labels) == 100.0
    assert mean_per_class_accuracy(perfect, labels) == 100.0
    multilabel_targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, -1], [-1, 0]])
    mean_ap, per_class = voc11_average_precision(multilabel_targets.float(), multilabel_targets)
    assert mean_ap == 100.0 and per_class == [100.0, 100.0]


def test_metrics_registry_and_errors():
    assert set(METRICS) == {"top1", "mean_per_class_accuracy", "map11"}
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert score("top1", scores, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)
    assert score("mean_per_class_accuracy", scores, torch.tensor([0, 1, 1])) == pytest.approx(75.0)
    assert score("map11", scores, torch.tensor([[1, 0], [0, 1], [1, 0]])) == 100.0
    with pytest.raises(ValueError, match="unknown metric 'top5'"):
        score("top5", scores, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="without a positive example: \\[1\\]"):
        voc11_average_precision(scores, torch.tensor([[1, 0], [0, 0], [1, -1]]))
    with pytest.raises(ValueError, match="1 \\(present\\), 0 \\(absent\\) or -1"):
        voc11_average_precision(scores, torch.tensor([[1, 2], [0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="N = 3"):
        top1_accuracy(scores, torch.tensor([0, 1]))
