"""A binary task's operating point against brute force, scikit-learn and scipy."""
import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import confusion_matrix

from allflax.evaluation import operating_point, stats


def brute_force_threshold(labels, scores, positive, target):
    """The highest candidate threshold (each positive's score) whose sensitivity reaches target."""
    positives = scores[labels == positive]
    return max(t for t in positives if np.mean(positives >= t) >= target - 1e-12)


@pytest.mark.parametrize('target', [0.5, 0.8, 0.9, 0.95, 1.0])
def test_the_threshold_is_the_highest_that_reaches_the_target(target):
    rng = np.random.default_rng(0)
    for n in (1, 7, 20, 41):
        labels = np.r_[np.ones(n, int), np.zeros(30, int)]
        scores = rng.random(len(labels))
        threshold = operating_point.threshold_at_sensitivity(labels, scores, 1, target)
        assert threshold == brute_force_threshold(labels, scores, 1, target), (n, target)
        assert np.mean(scores[labels == 1] >= threshold) >= target - 1e-12


def test_rates_at_the_threshold_with_exact_intervals_over_images():
    rng = np.random.default_rng(1)
    val_labels, test_labels = rng.integers(0, 2, 200), rng.integers(0, 2, 90)
    val_scores = np.clip(val_labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    test_scores = np.clip(test_labels * 0.3 + rng.random(90) * 0.7, 0, 1)
    point = operating_point.operating_point(val_labels, val_scores, test_labels, test_scores, [''] * 90,
                                            class_names=('hem', 'all'), positive=1, target=0.95, samples=200, seed=0)
    threshold = brute_force_threshold(val_labels, val_scores, 1, 0.95)
    assert point['threshold'] == threshold and point['positive_class'] == 'all' and point['chosen_on'] == 'val'
    assert point['val_sensitivity'] == np.mean(val_scores[val_labels == 1] >= threshold)
    tn, fp, fn, tp = confusion_matrix(test_labels, (test_scores >= threshold).astype(int)).ravel()
    expected = {'sensitivity': (tp, tp + fn), 'specificity': (tn, tn + fp), 'ppv': (tp, tp + fp), 'npv': (tn, tn + fn)}
    for name, (k, n) in expected.items():
        assert point[name] == pytest.approx(k / n), name
        ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(0.95, method='exact')
        np.testing.assert_allclose(point['ci95'][name], [ci.low, ci.high], atol=1e-12)
    assert point['counts'] == {'true_positive': tp, 'false_negative': fn, 'true_negative': tn, 'false_positive': fp}


def test_patients_are_resampled_within_their_class():
    """With patient ids the intervals come from resampling patients: a plain loop over the same
    resamples' draw counts gives the same percentiles."""
    rng = np.random.default_rng(2)
    patients = np.repeat([f'P{i}' for i in range(8)], 10)
    labels = np.repeat([0, 0, 0, 0, 1, 1, 1, 1], 10)
    scores = np.clip(labels * 0.4 + rng.random(80) * 0.6, 0, 1)
    point = operating_point.operating_point(labels, scores, labels, scores, patients, class_names=('normal', 'blast'),
                                            positive=1, target=0.9, samples=300, seed=3)
    weights = stats.bootstrap_weights(labels, patients, samples=300, seed=3)
    called = scores >= point['threshold']
    sensitivities = []
    for row in weights:
        positives = row * (labels == 1)
        sensitivities.append(np.sum(positives * called) / np.sum(positives))
    np.testing.assert_allclose(point['ci95']['sensitivity'], np.percentile(sensitivities, [2.5, 97.5]), atol=1e-12)
    assert 'patients' in point['ci95_method']


def test_the_positive_class_is_named_or_the_second():
    assert operating_point.positive_index(('hem', 'all')) == 1
    assert operating_point.positive_index(('hem', 'all'), 'hem') == 0
    with pytest.raises(ValueError, match="eval.positive_class='blast' is not one of the classes"):
        operating_point.positive_index(('hem', 'all'), 'blast')
    with pytest.raises(ValueError, match='an operating point needs two classes, not 3'):
        operating_point.positive_index(('a', 'b', 'c'))


def test_the_roc_band_is_the_percentiles_of_resampled_roc_curves(tmp_path):
    """Each resample's ROC is that of its drawn images repeated as often as drawn (scikit-learn on
    the expanded data), read on the grid; the band is their 2.5th and 97.5th percentiles."""
    from sklearn.metrics import roc_curve
    from allflax.evaluation import plots
    rng = np.random.default_rng(4)
    patients = np.repeat([f'P{i}' for i in range(6)], 12)
    labels = np.repeat([0, 0, 0, 1, 1, 1], 12)
    scores = np.clip(labels * 0.3 + rng.random(72) * 0.7, 0, 1)  # Continuous: no ties.
    grid, low, high = operating_point.roc_band(labels, scores, 1, patients, samples=40, seed=5)
    curves = []
    for row in stats.bootstrap_weights(labels, patients, samples=40, seed=5):
        drawn = np.repeat(np.arange(72), row.astype(int))
        fpr, tpr, _ = roc_curve(labels[drawn] == 1, scores[drawn], drop_intermediate=False)
        curves.append(np.interp(grid, fpr, tpr))
    np.testing.assert_allclose(low, np.percentile(curves, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(high, np.percentile(curves, 97.5, axis=0), atol=1e-12)
    assert (low <= high).all() and low[0] >= 0 and high[-1] == 1
    point = operating_point.operating_point(labels, scores, labels, scores, patients, class_names=('hem', 'all'),
                                            positive=1, target=0.9, samples=40, seed=5)
    path = plots.plot_operating_point(labels, scores, 1, (grid, low, high), point, str(tmp_path / 'roc.png'))
    assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
