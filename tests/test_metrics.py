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
