"""The new metrics against scikit-learn and hand-computed cases; bootstrap, McNemar, intervals."""
import statistics

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from allflax.evaluation import calibration, metrics, stats

NAMES = ('Benign', 'Early Pre-B', 'Pre-B', 'Pro-B')


def _random_predictions(seed, n=300, k=4, skill=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    scores = rng.normal(size=(n, k)) + skill * np.eye(k)[labels]
    return labels, np.exp(scores) / np.exp(scores).sum(1, keepdims=True)


def _from_confusion(matrix):
    """Labels and one-hot probabilities that give `matrix`."""
    labels, predicted = zip(*[(i, j) for (i, j), n in np.ndenumerate(np.asarray(matrix)) for _ in range(n)])
    return np.array(labels), np.eye(len(matrix))[list(predicted)]


@pytest.mark.parametrize('seed', [0, 1])
def test_balanced_accuracy_kappa_nll_against_scikit_learn(seed):
    labels, probabilities = _random_predictions(seed)
    predicted = probabilities.argmax(1)
    values = metrics.classification_metrics(labels, probabilities, NAMES)
    assert values['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert values['cohen_kappa'] == pytest.approx(skm.cohen_kappa_score(labels, predicted))
    assert values['nll'] == pytest.approx(skm.log_loss(labels, probabilities))


def test_kappa_and_balanced_accuracy_by_hand():
    # 50 cases, 35 agreements (p_o = 0.7); marginals 25/25 and 30/20 give p_e = 0.5: kappa 0.4.
    labels, probabilities = _from_confusion([[20, 5], [10, 15]])
    values = metrics.classification_metrics(labels, probabilities, ('hem', 'all'))
    assert values['cohen_kappa'] == pytest.approx(0.4)
    assert values['balanced_accuracy'] == pytest.approx((20 / 25 + 15 / 25) / 2)
    # A class absent from the labels is left out of balanced accuracy, as scikit-learn does.
    labels, probabilities = _from_confusion([[3, 1, 0], [0, 0, 0], [1, 0, 5]])
    values = metrics.classification_metrics(labels, probabilities, ('a', 'b', 'c'))
    assert values['balanced_accuracy'] == pytest.approx((3 / 4 + 5 / 6) / 2)


def test_expected_calibration_error_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong): bin (13/15, 14/15], accuracy 0.5, gap 0.4;
    # 0.62 (right): gap 0.38; 0.75 (wrong): gap 0.75. ECE = (2·0.4 + 0.38 + 0.75) / 4.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.38, 0.62], [0.75, 0.25]])
    labels = np.array([0, 1, 1, 1])
    assert calibration.expected_calibration_error(labels, probabilities) == pytest.approx(0.4825)
    bins = calibration.reliability(labels, probabilities)
    assert bins['count'].sum() == 4 and bins['count'][13] == 2 and bins['accuracy'][13] == 0.5
    assert metrics.classification_metrics(labels, probabilities, ('a', 'b'))['ece'] == pytest.approx(0.4825)


def test_weighted_scores_equal_scores_of_repeated_examples():
    labels, probabilities = _random_predictions(3, n=60)
    counts = np.random.default_rng(0).integers(0, 4, size=(3, 60)).astype(float)
    matrices = metrics.confusion_matrix(labels, probabilities.argmax(1), 4, counts)
    aucs = metrics.roc_auc_one_vs_rest(labels, probabilities, counts)
    for row, matrix, auc in zip(counts.astype(int), matrices, aucs):
        repeated = np.repeat(np.arange(60), row)
        np.testing.assert_array_equal(matrix, skm.confusion_matrix(labels[repeated], probabilities[repeated].argmax(1)))
        expected = [skm.roc_auc_score(labels[repeated] == k, probabilities[repeated, k]) for k in range(4)]
        np.testing.assert_allclose(auc, expected)


def test_patient_level_averages_cell_probabilities():
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    labels, patient_probabilities, ids = metrics.patient_level(
        np.array([0, 0, 1, 1, 1]), probabilities, np.array(['A', 'A', 'B', 'B', 'B']))
    assert ids.tolist() == ['A', 'B'] and labels.tolist() == [0, 1]
    np.testing.assert_allclose(patient_probabilities, [[0.6, 0.4], [0.4, 0.6]])
    assert stats.known_patients(np.array(['A', ''])) is None
    assert stats.known_patients(np.array(['A', 'B'])).tolist() == ['A', 'B']


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_data():
    widths = []
    for n in (100, 1600):
        labels, probabilities = _random_predictions(4, n=n)
        values = metrics.classification_metrics(labels, probabilities, NAMES)
        intervals = stats.bootstrap_intervals(labels, probabilities, None, samples=500, seed=0)
        for name, (low, high) in intervals.items():
            assert low <= values[name] <= high, name
        widths.append(intervals['accuracy'][1] - intervals['accuracy'][0])
    assert widths[1] < widths[0] / 2.5  # Width falls as 1/sqrt(n): 4× here.
    # Seeded: the same intervals again.
    assert stats.bootstrap_intervals(labels, probabilities, None, samples=500, seed=0) == intervals


def test_patient_bootstrap_is_wider_when_patients_differ():
    """Cells of one patient succeed or fail together: resampling cells would understate the spread."""
    rng = np.random.default_rng(0)
    patients = np.repeat([f'P{i}' for i in range(20)], 30)
    labels = rng.integers(0, 2, len(patients))
    patient_is_easy = np.repeat(rng.random(20) < 0.7, 30)
    predicted = np.where(patient_is_easy, labels, 1 - labels)
    probabilities = np.eye(2)[predicted] * 0.8 + 0.1
    by_image = stats.bootstrap_intervals(labels, probabilities, None, samples=500, seed=0)['accuracy']
    by_patient = stats.bootstrap_intervals(labels, probabilities, patients, samples=500, seed=0)['accuracy']
    assert by_patient[1] - by_patient[0] > 2 * (by_image[1] - by_image[0])
    weights = stats.bootstrap_weights(labels, patients, samples=10, seed=1)
    assert np.all(weights.sum(axis=1) == len(patients))  # 20 patients drawn × 30 cells each.
    assert np.all(weights.reshape(10, 20, 30).std(axis=2) == 0)  # Whole patients.


def test_mcnemar_exact_matches_the_binomial_test():
    # b = 1 (only A right), c = 6 (only B right): 2 · P(X ≤ 1 | 7, ½) = 2 · 8/128 = 0.125.
    correct_a = np.array([True] * 10 + [True] + [False] * 6 + [False] * 3)
    correct_b = np.array([True] * 10 + [False] + [True] * 6 + [False] * 3)
    result = stats.mcnemar_exact(correct_a, correct_b)
    assert (result['only_a_correct'], result['only_b_correct']) == (1, 6)
    assert result['p_value'] == pytest.approx(0.125)
    assert result['p_value'] == pytest.approx(scipy.stats.binomtest(1, 7, 0.5).pvalue)
    assert stats.mcnemar_exact(correct_b, correct_a)['p_value'] == pytest.approx(0.125)
    assert stats.mcnemar_exact(correct_a, correct_a)['p_value'] == 1.0


def test_paired_bootstrap_difference():
    labels, probabilities = _random_predictions(5, n=400)
    same = stats.paired_bootstrap_difference(labels, probabilities, probabilities, None, samples=200, seed=0)
    assert same['accuracy'] == {
        'difference': 0.0, 'ci95': [0.0, 0.0],
        'ci95_method': 'paired stratified image bootstrap (images drawn within their class), 200 resamples'}
    _, worse = _random_predictions(5, n=400, skill=0.5)
    better_minus_worse = stats.paired_bootstrap_difference(labels, probabilities, worse, None, samples=200, seed=0)
    for name in ('accuracy', 'f1_macro'):
        low, high = better_minus_worse[name]['ci95']
        assert 0 < low <= better_minus_worse[name]['difference'] <= high


def test_summarize_repeated_runs_with_the_corrected_resampled_t_interval():
    """Nadeau and Bengio (2003) by hand: 5 runs, 3 test and 11 train patients per re-split."""
    values = [0.91, 0.93, 0.95, 0.92, 0.94]
    summary = stats.summarize(values, test_train_ratio=3 / 11)
    # mean 0.93; s² = (0.02² + 0 + 0.02² + 0.01² + 0.01²) / 4 = 0.00025;
    # half width = t(0.975, 4) · sqrt((1/5 + 3/11) · 0.00025) = 2.776445 · 0.0108711 = 0.030183.
    quantile = scipy.stats.t.ppf(0.975, 4)
    assert quantile == pytest.approx(2.776445, abs=1e-6)
    assert summary['mean'] == pytest.approx(0.93) and summary['std'] == pytest.approx(0.00025 ** 0.5)
    assert summary['corrected_t_interval_95'] == pytest.approx([0.93 - 0.030183, 0.93 + 0.030183], abs=1e-6)
    # The plain t-interval of the mean, as if the runs were independent, is narrower by sqrt(0.4727 / 0.2):
    independent = scipy.stats.t.interval(0.95, 4, loc=0.93, scale=scipy.stats.sem(values))
    assert stats.summarize(values, test_train_ratio=0.0)['corrected_t_interval_95'] == pytest.approx(independent)
    assert np.diff(independent)[0] / 2 == pytest.approx(0.030183 / 1.537412, abs=1e-6)
    # np.percentile's linear interpolation of the sorted runs: 0.91 + 0.1 · 0.01, 0.94 + 0.9 · 0.01.
    assert summary['percentile_95'] == pytest.approx([0.911, 0.949])
    assert stats.summarize([None, None], test_train_ratio=0.2)['mean'] is None
    assert stats.corrected_t_method(3, 11, 'patients').endswith('n_test/n_train = 3/11 patients per re-split')


def test_temperature_scaling_cools_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 500)
    right = rng.random(500) < 0.7
    predicted = np.where(right, labels, (labels + 1) % 4)
    logits = (12 * np.eye(4)[predicted] - 6)[:, None, :]  # One view; ~99 % confident, 70 % right.
    before = calibration.probabilities(logits)
    temperature = calibration.fit_temperature(logits, labels)
    after = calibration.probabilities(logits, temperature)
    assert temperature > 1
    assert calibration.negative_log_likelihood(labels, after) < calibration.negative_log_likelihood(labels, before) - 0.5
    assert calibration.expected_calibration_error(labels, after) < calibration.expected_calibration_error(labels, before)
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))  # Predictions unchanged.


def test_probabilities_average_the_views():
    logits = np.random.default_rng(0).normal(size=(5, 8, 3))
    sigmoid = 1 / (1 + np.exp(-logits))
    expected = (sigmoid / sigmoid.sum(-1, keepdims=True)).mean(1)
    np.testing.assert_allclose(calibration.probabilities(logits), expected, rtol=1e-6)


def test_percentile_interval_by_hand():
    # The 2.5th and 97.5th percentiles of 0, 1, ..., 1000 are 25 and 975; the 5th and 95th, 50 and 950.
    values = np.arange(1001.0)
    assert stats.percentile_interval(values) == pytest.approx([25, 975])
    assert stats.percentile_interval(values, level=0.9) == pytest.approx([50, 950])
    assert stats.percentile_interval(np.append(values, [np.nan, np.nan])) == pytest.approx([25, 975])
    assert stats.percentile_interval([np.nan]) is None


def _binary(seed, n, separation):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    positive = 1 / (1 + np.exp(-(rng.normal(size=n) + separation * (2 * labels - 1))))
    return labels, np.stack([1 - positive, positive], 1)


def test_bootstrap_interval_widths_match_the_normal_approximation():
    # 95 % normal intervals are ±1.96 standard errors: accuracy's is sqrt(p (1 − p) / n), the
    # ROC-AUC's Hanley & McNeil's (1982). (Binary: the macro AUC is the AUC.)
    labels, probabilities = _binary(6, 1000, 0.6)
    intervals = stats.bootstrap_intervals(labels, probabilities, None, samples=500, seed=0)
    accuracy = np.mean(probabilities.argmax(1) == labels)
    auc = skm.roc_auc_score(labels, probabilities[:, 1])
    n1, n2 = labels.sum(), (1 - labels).sum()
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    for name, standard_error in [
            ('accuracy', np.sqrt(accuracy * (1 - accuracy) / len(labels))),
            ('roc_auc', np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n2 - 1) * (q2 - auc ** 2)) / (n1 * n2)))]:
        low, high = intervals[name]
        assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.15), name


def test_paired_bootstrap_difference_width_and_patients():
    # A − B accuracy on the same images: its variance is (b + c − (b − c)² / n) / n², b and c McNemar's
    # discordant counts.
    labels, probabilities_a = _binary(7, 1000, 0.8)
    _, probabilities_b = _binary(8, 1000, 0.5)
    result = stats.paired_bootstrap_difference(labels, probabilities_a, probabilities_b, None, samples=500, seed=0)
    correct_a, correct_b = probabilities_a.argmax(1) == labels, probabilities_b.argmax(1) == labels
    b, c, n = np.sum(correct_a & ~correct_b), np.sum(~correct_a & correct_b), len(labels)
    assert result['accuracy']['difference'] == pytest.approx(correct_a.mean() - correct_b.mean())
    low, high = result['accuracy']['ci95']
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(b + c - (b - c) ** 2 / n) / n, rel=0.15)
    assert stats.paired_bootstrap_difference(labels, probabilities_a, probabilities_b, None, samples=500,
                                             seed=0) == result
    # A is right on all cells of some patients, B on a random half of every patient's: the difference
    # moves patient by patient, so resampling patients widens its interval several times.
    rng = np.random.default_rng(1)
    patients = np.repeat([f'P{i}' for i in range(20)], 30)
    labels = rng.integers(0, 2, len(patients))
    right_a = np.repeat(rng.random(20) < 0.6, 30)
    right_b = rng.random(len(patients)) < 0.5
    one_hot = [np.eye(2)[np.where(right, labels, 1 - labels)] * 0.8 + 0.1 for right in (right_a, right_b)]
    widths = [np.diff(stats.paired_bootstrap_difference(labels, *one_hot, clusters, samples=300, seed=0)
                      ['accuracy']['ci95'])[0] for clusters in (None, patients)]
    assert widths[1] > 2 * widths[0]


def test_summarize_one_two_and_no_runs():
    one = stats.summarize([0.9], test_train_ratio=0.25)
    assert (one['n'], one['mean'], one['std'], one['corrected_t_interval_95']) == (1, 0.9, 0.0, None)  # No spread yet.
    assert one['percentile_95'] == pytest.approx([0.9, 0.9])
    two = stats.summarize([0.9, None, 0.94], test_train_ratio=0.25)
    assert two['n'] == 2 and two['std'] == pytest.approx(statistics.stdev([0.9, 0.94]))
    # t(0.975, 1 degree of freedom) = 12.706 (tables): 0.92 ± 12.706 · sqrt((1/2 + 1/4) · 0.02² · 2).
    half = 12.706 * (0.75 * 0.0008) ** 0.5
    assert two['corrected_t_interval_95'] == pytest.approx([0.92 - half, 0.92 + half], abs=1e-4)
    assert stats.summarize([0.91, 0.93, 0.95, 0.92, 0.94], test_train_ratio=0.25)['n'] == 5
    assert stats.summarize([None], test_train_ratio=0.25) == {'n': 0, **{name: None for name in two if name != 'n'}}
