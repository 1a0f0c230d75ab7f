"""Intervals at a few patients, each against an independent computation: exact ones against
scipy's binomtest, bootstrap ones against a plain loop over resamples that draws patients within
their class (the seed rule of stats.bootstrap_weights) and scores each by the scores' definitions."""
import json

import jsonschema
import numpy as np
import pytest
import scipy.stats

from allflax.data import input_convention
from allflax.deploy import bundle, model_card
from allflax.evaluation import stats

SAMPLES = 100  # Enough to compare percentiles value for value.


def _cohort(patients_per_class, seed, cells=6, skill=1.2):
    """Patients P00, P01, ... of the given numbers per class, each with `cells` cells of its class;
    each patient's cells share a patient effect, so some patients are mostly wrong."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(len(patients_per_class)), patients_per_class)
    patients = np.repeat([f'P{i:02d}' for i in range(len(classes))], cells)
    labels = np.repeat(classes, cells)
    effect = np.repeat(rng.normal(size=(len(classes), len(patients_per_class))), cells, axis=0)
    logits = rng.normal(size=effect.shape) + effect + skill * np.eye(len(patients_per_class))[labels]
    return labels, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), patients


def _names(num_classes):
    return tuple(f'c{k}' for k in range(num_classes))


def _loop_resamples(labels, patients, samples, seed):
    """The cell indices of each resample: per stratum (the sorted tuple of a patient's classes),
    in sorted order, one generator's `samples` multinomial rows over its patients (sorted)."""
    ids = sorted(set(patients))
    stratum = {p: tuple(sorted(set(labels[patients == p].tolist()))) for p in ids}
    rng = np.random.default_rng(seed)
    drawn = [[] for _ in range(samples)]
    for key in sorted(set(stratum.values())):
        members = [p for p in ids if stratum[p] == key]
        counts = rng.multinomial(len(members), [1 / len(members)] * len(members), size=samples)
        for r in range(samples):
            for patient, count in zip(members, counts[r]):
                drawn[r] += [patient] * count
    return [np.concatenate([np.flatnonzero(patients == p) for p in sorted(d)]) for d in drawn]


def _loop_scores(labels, probabilities, cells):
    """A resample's scores by their definitions: F1 from counts, ROC-AUC as the share of
    (positive, negative) pairs ranked right, ties half (scikit-learn's agree: test_metrics)."""
    y, p = labels[cells], probabilities[cells]
    predicted = p.argmax(1)
    f1, aucs = [], []
    for k in range(probabilities.shape[1]):
        tp, fp, fn = (np.sum((predicted == k) & (y == k)), np.sum((predicted == k) & (y != k)),
                      np.sum((predicted != k) & (y == k)))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        positive, negative = p[y == k, k], p[y != k, k]
        if len(positive) and len(negative):
            aucs.append(np.mean((positive[:, None] > negative) + 0.5 * (positive[:, None] == negative)))
    support = np.bincount(y, minlength=probabilities.shape[1])
    return {'accuracy': np.mean(predicted == y), 'f1_weighted': np.dot(f1, support) / len(y),
            'f1_macro': np.mean(f1), 'roc_auc': np.mean(aucs) if aucs else np.nan}


def _loop_intervals(labels, probabilities, patients, samples, seed):
    scores = [_loop_scores(labels, probabilities, cells)
              for cells in _loop_resamples(labels, patients, samples, seed)]
    return {name: list(np.percentile([s[name] for s in scores if not np.isnan(s[name])], [2.5, 97.5]))
            for name in stats.INTERVAL_METRICS}


def _loop_patients(labels, probabilities, patients):
    """Per patient (sorted): its class and the mean of its cells' probabilities."""
    ids = sorted(set(patients))
    return (np.array([labels[patients == p][0] for p in ids]),
            np.array([probabilities[patients == p].mean(0) for p in ids]), ids)


def _exact(successes, trials):
    interval = scipy.stats.binomtest(int(successes), int(trials)).proportion_ci(0.95, method='exact')
    return [interval.low, interval.high]


COHORTS = {3: (2, 1), 7: (2, 2, 2, 1), 40: (3, 12, 16, 9)}  # 40: a class at the limit, not small.


@pytest.mark.parametrize('num_patients', sorted(COHORTS))
def test_intervals_against_binomtest_and_a_loop_over_resamples(num_patients):
    labels, probabilities, patients = _cohort(COHORTS[num_patients], seed=num_patients)
    names = _names(len(COHORTS[num_patients]))
    values = stats.metrics_with_intervals(labels, probabilities, patients, names, samples=SAMPLES, seed=3)
    bootstrap = f'stratified patient bootstrap (patients drawn within their class), {SAMPLES} resamples'

    expected = _loop_intervals(labels, probabilities, patients, SAMPLES, 3)
    for name in stats.INTERVAL_METRICS:
        assert values['ci95'][name] == pytest.approx(expected[name], abs=1e-12), name
        assert values['ci95_method'][name] == bootstrap

    # Per patient: accuracy, sensitivity and specificity exact over patients; the rest a bootstrap
    # over patients, drawn within their class.
    patient_labels, patient_probabilities, ids = _loop_patients(labels, probabilities, patients)
    level = values['patient_level']
    predicted = patient_probabilities.argmax(1)
    assert level['ci95']['accuracy'] == pytest.approx(_exact(np.sum(predicted == patient_labels), num_patients))
    assert level['ci95_method']['accuracy'] == f'Clopper-Pearson exact, {num_patients} patients'
    for k, name in enumerate(names):
        positive = patient_labels == k
        c = level['per_class'][name]
        assert c['ci95']['recall'] == pytest.approx(_exact(np.sum(predicted[positive] == k), positive.sum()))
        assert c['ci95']['specificity'] == pytest.approx(_exact(np.sum(predicted[~positive] != k), (~positive).sum()))
        for interval, n in (('recall', positive.sum()), ('specificity', (~positive).sum())):
            assert c['ci95_method'][interval] == f'Clopper-Pearson exact, {n} patient{"" if n == 1 else "s"}'
    expected = _loop_intervals(patient_labels, patient_probabilities, np.array(ids), SAMPLES, 3)
    for name in ('f1_weighted', 'f1_macro', 'roc_auc'):
        assert level['ci95'][name] == pytest.approx(expected[name], abs=1e-12), name
        assert level['ci95_method'][name] == bootstrap
    assert values['small_classes'] == {name: n for name, n in zip(names, COHORTS[num_patients]) if n < 3}
    assert values['bootstrap'] == {'samples': SAMPLES, 'seed': 3, 'resampled': 'patients', 'within': 'class'}


def test_paired_differences_against_a_loop_over_resamples():
    labels, probabilities_a, patients = _cohort(COHORTS[7], seed=1)
    _, probabilities_b, _ = _cohort(COHORTS[7], seed=2, skill=0.6)
    result = stats.paired_bootstrap_difference(labels, probabilities_a, probabilities_b, patients,
                                               samples=SAMPLES, seed=5)
    differences = {'accuracy': [], 'f1_macro': []}
    for cells in _loop_resamples(labels, patients, SAMPLES, 5):
        a, b = (_loop_scores(labels, p, cells) for p in (probabilities_a, probabilities_b))
        for name in differences:
            differences[name].append(a[name] - b[name])
    for name, values in differences.items():
        assert result[name]['ci95'] == pytest.approx(np.percentile(values, [2.5, 97.5]), abs=1e-12), name
        assert result[name]['ci95_method'] == ('paired stratified patient bootstrap (patients drawn within '
                                               f'their class), {SAMPLES} resamples')


def test_seven_patients_all_right_have_the_exact_interval_not_one_point():
    labels, probabilities, patients = _cohort(COHORTS[7], seed=0, skill=20)
    values = stats.metrics_with_intervals(labels, probabilities, patients, _names(4), samples=200, seed=0)
    assert values['patient_level']['accuracy'] == 1
    assert values['patient_level']['ci95']['accuracy'] == pytest.approx([0.590, 1.0], abs=5e-4)
    assert values['patient_level']['per_class']['c3']['ci95']['recall'] == pytest.approx([0.025, 1.0])
    assert values['small_classes'] == {'c0': 2, 'c1': 2, 'c2': 2, 'c3': 1}


def test_macro_f1_interval_holds_the_estimate_when_a_class_has_one_patient():
    # The only c3 patient is kept in every resample: no resample scores c3's F1 as 0.
    labels, probabilities, patients = _cohort(COHORTS[7], seed=4, skill=2.5)
    values = stats.metrics_with_intervals(labels, probabilities, patients, _names(4), samples=1000, seed=0)
    low, high = values['ci95']['f1_macro']
    assert low <= values['f1_macro'] <= high
    weights = stats.bootstrap_weights(labels, patients, samples=1000, seed=0)
    per_class = np.stack([weights[:, labels == k].sum(1) for k in range(4)], 1)
    assert np.all(per_class == np.bincount(labels))  # Every class, as many cells as the data, in every resample.
    # Drawing the 7 patients without regard to class loses c3 in (6/7)^7 = 34 % of the resamples.
    unstratified = stats.bootstrap_weights(np.zeros_like(labels), patients, samples=1000, seed=0)
    assert np.mean(unstratified[:, labels == 3].sum(1) == 0) == pytest.approx((6 / 7) ** 7, abs=0.05)


def test_mixed_label_patients_are_drawn_among_patients_of_the_same_classes():
    # D holds the only cells of class 2 (with some of class 1): drawn within {1, 2}, it is in every
    # resample; drawn within its majority class (1), it would be replaced by C in half of them.
    patients = np.array(['A'] * 4 + ['B'] * 4 + ['C'] * 4 + ['D'] * 5)
    labels = np.array([0] * 8 + [1] * 4 + [1, 1, 1, 2, 2])
    probabilities = np.eye(3)[np.array([0, 1, 0, 0] + [0] * 4 + [1, 1, 2, 1] + [1, 2, 1, 2, 0])] * 0.7 + 0.1
    assert stats.strata(labels, patients)[1].keys() == {(0,), (1,), (1, 2)}
    weights = stats.bootstrap_weights(labels, patients, samples=SAMPLES, seed=0)
    assert np.all(weights[:, patients == 'D'] == 1)
    values = stats.metrics_with_intervals(labels, probabilities, patients, _names(3), samples=SAMPLES, seed=0)
    expected = _loop_intervals(labels, probabilities, patients, SAMPLES, 0)
    for name in stats.INTERVAL_METRICS:
        assert values['ci95'][name] == pytest.approx(expected[name], abs=1e-12), name
    assert values['ci95_method']['f1_macro'] == (
        'stratified patient bootstrap (patients drawn within their class; one with several classes among the '
        f'patients with the same classes), {SAMPLES} resamples')
    assert values['small_classes'] == {'c0': 2, 'c1': 2, 'c2': 1}  # C and D have cells of class 1.
    # A class without test patients is named too.
    assert stats.patients_per_class(labels, patients, 4).tolist() == [2, 2, 1, 0]


def test_without_patient_ids_proportions_are_exact_over_images():
    labels, probabilities, _ = _cohort((10, 14), seed=6)
    values = stats.metrics_with_intervals(labels, probabilities, np.array([''] * len(labels)), _names(2),
                                          samples=SAMPLES, seed=1)
    predicted = probabilities.argmax(1)
    assert values['ci95']['accuracy'] == pytest.approx(_exact(np.sum(predicted == labels), len(labels)))
    assert values['ci95_method']['accuracy'] == f'Clopper-Pearson exact, {len(labels)} images'
    for k in range(2):
        c = values['per_class'][f'c{k}']
        assert c['ci95']['recall'] == pytest.approx(_exact(np.sum(predicted[labels == k] == k), np.sum(labels == k)))
        assert c['ci95']['specificity'] == pytest.approx(_exact(np.sum(predicted[labels != k] != k),
                                                                np.sum(labels != k)))
    # Images drawn within their class: the loop with each image its own patient.
    expected = _loop_intervals(labels, probabilities, np.array([f'{i:03d}' for i in range(len(labels))]), SAMPLES, 1)
    assert values['ci95']['f1_macro'] == pytest.approx(expected['f1_macro'], abs=1e-12)
    assert values['ci95_method']['f1_macro'] == ('stratified image bootstrap (images drawn within their class), '
                                                 f'{SAMPLES} resamples')
    assert values['bootstrap'] == {'samples': SAMPLES, 'seed': 1, 'resampled': 'images', 'within': 'class'}
    assert 'patient_level' not in values and 'small_classes' not in values
    assert stats.exact_interval(0, 0) is None


def test_card_states_methods_and_small_classes_and_the_schema_takes_them():
    labels, probabilities, patients = _cohort(COHORTS[7], seed=0)
    values = json.loads(json.dumps(stats.metrics_with_intervals(
        labels, probabilities, patients, _names(4), samples=SAMPLES, seed=0)))
    cell = {k: v for k, v in values.items() if k not in ('patient_level', 'small_classes')}
    evaluation = {'split': 'test', 'checkpoint_step': 3, 'cell_level': cell, 'patient_level': values['patient_level'],
                  'calibration': {'ece': values['ece']}, 'small_classes': values['small_classes']}
    schema = bundle._schema()
    jsonschema.validate(evaluation, {**schema['properties']['evaluation'], '$defs': schema['$defs']})
    metadata = {
        'model': 'tiny', 'classes': list(_names(4)), 'intended_use': 'tests',
        'source': {'workdir': 'run', 'checkpoint_step': 3},
        'versions': {'allflax': 'test', 'jax': '-', 'flax': '-'},
        'input': {'dtype': 'uint8', 'size': 8, 'channels': 3, 'color': 'RGB', 'value_range': [0, 255], 'name': 'image'},
        'output': {'meaning': 'p'}, 'formats': {'stablehlo': {'platforms': ['cpu']}},
        'preprocessing': {'normalization': input_convention.convention('imagenet_mean_std').describe()},
        'probability_rule': {'description': 'softmax.', 'temperature': 1.0, 'temperature_source': 'none'},
        'data': {'name': 'synthetic_all4', 'synthetic': True, 'split': 'patient',
                 'splits': {'test': {'images': len(labels), 'patients': 7, 'class_counts': {}}}},
        'evaluation': evaluation}
    card = model_card.render(metadata)
    assert '| F1 (macro) | ' in card and f'| stratified patient bootstrap (patients drawn within their class), ' \
                                         f'{SAMPLES} resamples |' in card
    assert '| Clopper-Pearson exact, 7 patients |' in card
    assert 'Clopper-Pearson exact, 1 patient; Clopper-Pearson exact, 6 patients |' in card  # c3's row.
    assert ('Classes with fewer than 3 test patients: c0 (2 patients), c1 (2 patients), c2 (2 patients), '
            'c3 (1 patient).') in card
