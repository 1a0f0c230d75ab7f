import numpy as np
import pytest

from allflax.training import losses


def numpy_focal_loss(logits, labels, alpha, gamma):
    """Lin et al.'s sigmoid focal loss written out: -α_t (1 − p_t)^γ log p_t."""
    one_hot = np.eye(logits.shape[1])[labels]
    p = 1 / (1 + np.exp(-logits))
    p_t = np.where(one_hot == 1, p, 1 - p)
    alpha_t = np.where(one_hot == 1, alpha, 1 - alpha)
    return np.mean(np.sum(-alpha_t * (1 - p_t) ** gamma * np.log(p_t), axis=1))


@pytest.mark.parametrize('alpha', [0.25, 0.5, (0.1, 0.4, 0.3, 0.9)])
@pytest.mark.parametrize('gamma', [0.0, 2.0])
def test_focal_loss_matches_formula(alpha, gamma):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (32, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 32)
    expected = numpy_focal_loss(logits.astype(np.float64), labels, np.asarray(alpha), gamma)
    actual = losses.focal_loss(logits, labels, alpha=alpha, gamma=gamma)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_gamma_zero_alpha_half_is_half_binary_cross_entropy():
    logits = np.array([[2.0, -1.0], [0.5, 0.5]], np.float32)
    labels = np.array([0, 1])
    bce = np.mean([np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0)),
                   np.log1p(np.exp(0.5)) + np.log1p(np.exp(-0.5))])
    np.testing.assert_allclose(losses.focal_loss(logits, labels, alpha=0.5, gamma=0.0), bce / 2, rtol=1e-6)


def test_per_class_alpha_must_match_classes():
    with pytest.raises(ValueError, match='3 values but the model has 4 classes'):
        losses.focal_loss(np.zeros((2, 4), np.float32), np.array([0, 1]), alpha=(0.1, 0.2, 0.3), gamma=2.0)
