"""The linear probe's logistic regression: equal to scikit-learn's, and the λ selection behaves as it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mimbench.transfer.logistic import REGULARISATION_GRID, fit_logistic, select_and_evaluate

TIGHT = dict(max_iter=10_000, tolerance=1e-10, dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def linear_data(seed: int, n: int = 200, dim: int = 10, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from a softmax of a random linear map: overlapping classes, a finite optimum at every λ."""
    generator = torch.Generator().manual_seed(seed)
    features = 3 * torch.randn(n, dim, generator=generator) + 5  # off-centre and scaled: standardisation matters
    logits = (features - 5) @ torch.randn(dim, classes, generator=generator) / 3
    return features, torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)


@pytest.mark.parametrize("regularisation", [0.1, 10.0])
def test_multinomial_equals_sklearn(regularisation):
    features, labels = linear_data(0)
    ours = fit_logistic(features, labels, regularisation, **TIGHT)
    reference = LogisticRegression(C=1 / regularisation, solver="lbfgs", tol=1e-12, max_iter=100_000)
    reference.fit(ours.standardise(features).numpy(), labels.numpy())
    expected = reference.predict_proba(ours.standardise(features).numpy())
    assert np.abs(ours.scores(features).softmax(1).numpy() - expected).max() < 1e-5
    # standardised with the population statistics of the fitting set
    assert torch.allclose(ours.mean, features.double().mean(0))
    assert torch.allclose(ours.std, features.double().std(0, correction=0))


def test_float32_default_is_close_to_sklearn():
    features, labels = linear_data(1)
    ours = fit_logistic(features, labels, 1.0)
    assert ours.weight.dtype == torch.float32
    reference = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000)
    reference.fit(ours.standardise(features).double().numpy(), labels.numpy())
    expected = reference.predict_proba(ours.standardise(features).double().numpy())
    assert np.abs(ours.scores(features).softmax(1).numpy() - expected).max() < 1e-3


def multilabel_data(seed: int, n: int = 200, dim: int = 8, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets in {1, 0, -1}: each class a noisy linear rule, about 15% of entries difficult."""
    generator = torch.Generator().manual_seed(seed)
    features = 2 * torch.randn(n, dim, generator=generator) - 1
    logits = (features + 1) @ torch.randn(dim, classes, generator=generator) / 2
    targets = torch.bernoulli(logits.sigmoid(), generator=generator)
    targets[torch.rand(n, classes, generator=generator) < 0.15] = -1
    return features, targets


@pytest.mark.parametrize("regularisation", [0.3, 30.0])
def test_multilabel_equals_one_sklearn_binary_regression_per_class(regularisation):
    features, targets = multilabel_data(0)
    ours = fit_logistic(features, targets, regularisation, multilabel=True, **TIGHT)
    standardised = ours.standardise(features).numpy()
    probabilities = ours.scores(features).sigmoid().numpy()
    for c in range(targets.shape[1]):
        kept = (targets[:, c] != -1).numpy()  # sklearn sees only the non-difficult rows of this class
        reference = LogisticRegression(C=1 / regularisation, tol=1e-12, max_iter=100_000)
        reference.fit(standardised[kept], targets[kept, c].numpy())
        assert np.abs(probabilities[:, c] - reference.predict_proba(standardised)[:, 1]).max() < 1e-5


def test_difficult_targets_do_not_touch_their_class():
    """Shuffling the features among the rows where class 0 is difficult leaves class 0's fit unchanged.

    A shuffle keeps the feature statistics, hence the standardisation; classes 1 and 2 do change.
    """
    features, targets = multilabel_data(1)
    difficult = torch.nonzero(targets[:, 0] == -1).flatten()
    shuffled = features.clone()
    shuffled[difficult] = features[difficult.flip(0)]
    before = fit_logistic(features, targets, 1.0, multilabel=True, **TIGHT)
    after = fit_logistic(shuffled, targets, 1.0, multilabel=True, **TIGHT)
    assert torch.allclose(before.weight[:, 0], after.weight[:, 0], atol=1e-7)
    assert torch.allclose(before.bias[0], after.bias[0], atol=1e-7)
    assert (before.weight[:, 1:] - after.weight[:, 1:]).abs().max() > 1e-2


def test_grid_is_45_log_spaced_values_from_1e_minus_6_to_1e5():
    assert len(REGULARISATION_GRID) == 45
    assert REGULARISATION_GRID[0] == pytest.approx(1e-6) and REGULARISATION_GRID[-1] == pytest.approx(1e5)
    assert np.allclose(np.diff(np.log10(REGULARISATION_GRID)), 11 / 44)


def test_warm_start_reaches_the_cold_start_solution():
    features, labels = linear_data(2)
    cold = fit_logistic(features, labels, 1.0, **TIGHT)
    from_stronger = fit_logistic(features, labels, 1.0, init=fit_logistic(features, labels, 100.0, **TIGHT), **TIGHT)
    # a warm start standardised on other data (as the refit on train+val is) is re-expressed, not misread
    other_data = fit_logistic(features[:120] * 2 - 3, labels[:120], 1.0, **TIGHT)
    from_other = fit_logistic(features, labels, 1.0, init=other_data, **TIGHT)
    for warm in (from_stronger, from_other):
        assert torch.allclose(warm.scores(features), cold.scores(features), atol=1e-6)


def separable_data(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes separable only along a direction the class means do not point to.

    Features (signal + nuisance, nuisance): the nuisance (std 10) hides the signal (class corners, std 0.05)
    from the class means, which is all a strongly regularised classifier sees; their difference separates
    the classes perfectly, which only a weakly regularised one finds.
    """
    corners = torch.tensor([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])
    labels = torch.randint(3, (n,), generator=generator)
    nuisance = 10 * torch.randn(n, 2, generator=generator)
    signal = corners[labels] + 0.05 * torch.randn(n, 2, generator=generator)
    return torch.cat([signal + nuisance, nuisance], dim=1), labels


def test_separable_features_choose_weak_regularisation_and_score_100():
    generator = torch.Generator().manual_seed(0)
    train, val, test = (separable_data(generator, n) for n in (300, 150, 150))
    result = select_and_evaluate(train, val, test, "top1")
    assert result.val_scores[REGULARISATION_GRID[-1]] < 40  # the most regularised fit is near chance
    assert result.regularisation <= 1.0
    assert result.val_scores[result.regularisation] == 100.0
    assert result.test_score == 100.0
    assert set(result.val_scores) == set(REGULARISATION_GRID)


def test_noise_labels_choose_strong_regularisation_and_predict_the_prior():
    """Labels independent of the features: the best a classifier can do is predict the majority class,
    which only a strongly regularised fit does (weak ones fit the noise)."""
    generator = torch.Generator().manual_seed(0)
    prior = torch.tensor([0.6, 0.25, 0.15])

    def noise(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 30, generator=generator), torch.multinomial(prior, n, True, generator=generator)

    train, val, test = noise(200), noise(300), noise(1000)
    result = select_and_evaluate(train, val, test, "top1")
    assert result.regularisation >= 100.0
    assert result.val_scores[result.regularisation] > result.val_scores[REGULARISATION_GRID[0]] + 5
    majority_share = 100.0 * (test[1] == 0).double().mean().item()
    assert result.test_score == pytest.approx(majority_share, abs=2.0)


def test_ties_go_to_the_larger_regularisation():
    generator = torch.Generator().manual_seed(3)
    centres = 10 * torch.eye(3)

    def clusters(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(3, (n,), generator=generator)
        return centres[labels] + torch.randn(n, 3, generator=generator), labels

    result = select_and_evaluate(clusters(60), clusters(60), clusters(60), "top1", grid=[1e-2, 1.0, 10.0])
    assert result.val_scores == {10.0: 100.0, 1.0: 100.0, 1e-2: 100.0}  # swept from the largest λ
    assert list(result.val_scores) == [10.0, 1.0, 1e-2]
    assert result.regularisation == 10.0


def test_multilabel_probe_with_map11():
    features, targets = multilabel_data(2, n=600)
    train, val, test = ((features[s], targets[s]) for s in (slice(0, 300), slice(300, 450), slice(450, 600)))
    result = select_and_evaluate(train, val, test, "map11", multilabel=True, grid=REGULARISATION_GRID[::4])
    assert result.classifier.multilabel and result.classifier.weight.shape == (8, 3)
    assert 70.0 < result.test_score <= 100.0


def test_errors_name_the_bad_input():
    features, labels = linear_data(0, n=30)
    with pytest.raises(ValueError, match="unknown metric 'top5'"):
        select_and_evaluate((features, labels), (features, labels), (features, labels), "top5")
    with pytest.raises(ValueError, match=r"classes \[2\] appear in val/test but have no training example"):
        train = (features[labels < 2], labels[labels < 2])
        select_and_evaluate(train, (features, labels), (features, labels), "top1")
    with pytest.raises(ValueError, match="integer class indices"):
        fit_logistic(features, labels.float(), 1.0)
    with pytest.raises(ValueError, match="1 \\(present\\), 0 \\(absent\\) or -1"):
        fit_logistic(features, torch.full((30, 2), 2.0), 1.0, multilabel=True)
