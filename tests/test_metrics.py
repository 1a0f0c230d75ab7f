import contextlib
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from allflax.evaluation import metrics

NAMES = ('Benign', 'Early Pre-B', 'Pre-B', 'Pro-B')


def _random_predictions(seed, n=300, k=4, skill=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    scores = rng.normal(size=(n, k)) + skill * np.eye(k)[labels]
    probabilities = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    return labels, probabilities


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_against_scikit_learn(seed):
    labels, probabilities = _random_predictions(seed)
    predicted = probabilities.argmax(1)
    values = metrics.classification_metrics(labels, probabilities, NAMES)
    assert values['accuracy'] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert values['f1_weighted'] == pytest.approx(skm.f1_score(labels, predicted, average='weighted'))
    assert values['f1_macro'] == pytest.approx(skm.f1_score(labels, predicted, average='macro'))
    assert values['precision_macro'] == pytest.approx(skm.precision_score(labels, predicted, average='macro'))
    assert values['recall_macro'] == pytest.approx(skm.recall_score(labels, predicted, average='macro'))
    assert values['roc_auc'] == pytest.approx(skm.roc_auc_score(labels, probabilities, multi_class='ovr'))
    np.testing.assert_array_equal(values['confusion_matrix'], skm.confusion_matrix(labels, predicted))
    # Specificity of class k is the recall of "not k".
    specificity = [skm.recall_score(labels != k, predicted != k) for k in range(4)]
    assert values['specificity_macro'] == pytest.approx(np.mean(specificity))
    assert values['num_examples'] == 300 and values['class_names'] == list(NAMES)


def test_binary_auc_and_ties():
    labels = np.array([0, 0, 1, 1, 1, 0])
    p_all = np.array([0.1, 0.5, 0.5, 0.9, 0.7, 0.3])
    probabilities = np.stack([1 - p_all, p_all], 1)
    values = metrics.classification_metrics(labels, probabilities, ('hem', 'all'))
    assert values['roc_auc'] == pytest.approx(skm.roc_auc_score(labels, p_all))


def test_class_never_predicted_counts_zero_precision():
    labels = np.array([0, 1, 2, 3, 3])
    probabilities = np.eye(4)[[0, 1, 1, 3, 3]]
    values = metrics.classification_metrics(labels, probabilities, NAMES)
    assert values['precision_macro'] == pytest.approx(
        skm.precision_score(labels, probabilities.argmax(1), average='macro', zero_division=0))
    assert values['per_class']['Pre-B']['recall'] == 0.0


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match='expected'):
        metrics.classification_metrics(np.zeros(3, int), np.zeros((3, 2)), NAMES)


def _from_confusion(matrix):
    """Labels and predictions that give `matrix`."""
    pairs = [(i, j) for (i, j), n in np.ndenumerate(np.asarray(matrix)) for _ in range(n)]
    return np.array([i for i, _ in pairs]), np.array([j for _, j in pairs])


def test_per_class_scores_against_scikit_learn():
    labels, probabilities = _random_predictions(3)
    predicted = probabilities.argmax(1)
    values = metrics.classification_metrics(labels, probabilities, NAMES)
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted)
    for k, name in enumerate(NAMES):
        entry = values['per_class'][name]
        assert entry['precision'] == pytest.approx(precision[k]) and entry['recall'] == pytest.approx(recall[k])
        assert entry['f1'] == pytest.approx(f1[k]) and entry['support'] == support[k]
        assert entry['specificity'] == pytest.approx(skm.recall_score(labels != k, predicted != k))
        assert entry['roc_auc'] == pytest.approx(skm.roc_auc_score(labels == k, probabilities[:, k]))
    assert json.loads(json.dumps(values)) == values


def test_undefined_scores_are_none():
    # Pro-B absent from the labels: its ROC-AUC is undefined (scikit-learn refuses a single label value)
    # and the macro AUC is the mean over the other three.
    labels, probabilities = _random_predictions(4, n=200)
    labels, probabilities = labels[labels != 3], probabilities[labels != 3]
    values = metrics.classification_metrics(labels, probabilities, NAMES)
    assert values['per_class']['Pro-B']['roc_auc'] is None
    assert values['roc_auc'] == pytest.approx(np.mean([skm.roc_auc_score(labels == k, probabilities[:, k])
                                                       for k in range(3)]))
    # One class in the labels and the predictions: no AUC at all, and chance agreement is already
    # perfect, so kappa is undefined too (scikit-learn: NaN).
    values = metrics.classification_metrics(np.zeros(5, int), np.tile([0.7, 0.1, 0.1, 0.1], (5, 1)), NAMES)
    assert values['roc_auc'] is None and all(entry['roc_auc'] is None for entry in values['per_class'].values())
    with pytest.warns(UserWarning):
        assert np.isnan(skm.cohen_kappa_score(np.zeros(5), np.zeros(5)))
    assert values['cohen_kappa'] is None


def test_labels_read_as_floats_and_half_precision_probabilities():
    # Labels as a CSV reader returns them; float16 probabilities, one of them a certain mistake.
    labels, probabilities = _random_predictions(5, n=100)
    probabilities = probabilities.astype(np.float16)
    probabilities[0] = 0
    probabilities[0, (labels[0] + 1) % 4] = 1
    values = metrics.classification_metrics(labels.astype(np.float64), probabilities, NAMES)
    predicted = probabilities.argmax(1)
    assert values['accuracy'] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert values['f1_macro'] == pytest.approx(skm.f1_score(labels, predicted, average='macro'))
    others = -np.log(probabilities[np.arange(1, 100), labels[1:]].astype(np.float64)).sum()
    assert 20 < 100 * values['nll'] - others < 50  # The certain mistake costs a lot, not infinitely much.


def test_confusion_matrix_keeps_classes_that_never_occur():
    labels, predicted = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    np.testing.assert_array_equal(metrics.confusion_matrix(labels, predicted, 3),
                                  skm.confusion_matrix(labels, predicted, labels=[0, 1, 2]))


def test_a_stack_of_confusion_matrices_is_scored_matrix_by_matrix():
    stack = np.random.default_rng(0).integers(0, 20, size=(3, 4, 4))
    stack[1, 2] = 0  # Class 2 absent from the labels (predicted, though).
    stack[2, 3] = [0, 0, 0, 1]  # A class of one example.
    scores = metrics.scores_from_confusion(stack)
    every = dict(labels=range(4), zero_division=0)
    for r, matrix in enumerate(stack):
        labels, predicted = _from_confusion(matrix)
        assert scores['accuracy'][r] == pytest.approx(skm.accuracy_score(labels, predicted))
        with pytest.warns(UserWarning) if r == 1 else contextlib.nullcontext():
            balanced = skm.balanced_accuracy_score(labels, predicted)
        assert scores['balanced_accuracy'][r] == pytest.approx(balanced)
        assert scores['cohen_kappa'][r] == pytest.approx(skm.cohen_kappa_score(labels, predicted))
        assert scores['f1_weighted'][r] == pytest.approx(skm.f1_score(labels, predicted, average='weighted', **every))
        for name, score in [('f1', skm.f1_score), ('precision', skm.precision_score), ('recall', skm.recall_score)]:
            assert scores[f'{name}_macro'][r] == pytest.approx(score(labels, predicted, average='macro', **every))
            np.testing.assert_allclose(scores[name][r], score(labels, predicted, average=None, **every))
        specificity = [skm.recall_score(labels != k, predicted != k) for k in range(4)]
        np.testing.assert_allclose(scores['specificity'][r], specificity)
        assert scores['specificity_macro'][r] == pytest.approx(np.mean(specificity))
        np.testing.assert_array_equal(scores['support'][r], np.bincount(labels, minlength=4))


def test_patient_level_against_a_plain_loop():
    rng = np.random.default_rng(1)
    patients = rng.choice(['P3', 'P1', 'P2', 'P0'], 40)
    labels = rng.integers(0, 3, 40)
    labels[patients == 'P3'] = rng.integers(0, 2, (patients == 'P3').sum())  # The last patient: no class 2.
    probabilities = rng.dirichlet(np.ones(3), 40)
    patient_labels, patient_probabilities, ids = metrics.patient_level(labels, probabilities, patients)
    assert ids.tolist() == ['P0', 'P1', 'P2', 'P3']
    for row, patient in enumerate(ids):
        cells = [i for i in range(40) if patients[i] == patient]
        votes = [sum(labels[i] == k for i in cells) for k in range(3)]
        assert patient_labels[row] == votes.index(max(votes))  # Ties: the first (lowest) class.
        np.testing.assert_allclose(patient_probabilities[row], sum(probabilities[i] for i in cells) / len(cells))
