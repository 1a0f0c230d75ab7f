"""Classification metrics from labels and class probabilities, computed from the confusion matrix.

Every score is written for a stack of confusion matrices as well as for one, and the
ROC-AUC for a stack of example weights, so that bootstrap resamples (weights: how often
each example was drawn) are scored by the same code as the point estimate.
"""
import numpy as np

from allflax.evaluation import calibration


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """Rows are true classes, columns predicted classes (scikit-learn's convention).

    With `weights` (resamples × examples), one weighted matrix per resample: (R, K, K).
    """
    cells = num_classes * np.asarray(labels) + np.asarray(predictions)
    if weights is None:
        return np.bincount(cells, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return (weights @ np.eye(num_classes ** 2)[cells]).reshape(-1, num_classes, num_classes)


def _ratio(numerator, denominator, empty=0.0):
    """Elementwise ratio where an empty denominator gives `empty` (0 as scikit-learn's zero_division=0)."""
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, np.float64), denominator)
    return np.divide(numerator, denominator, out=np.full(numerator.shape, empty), where=denominator > 0)


def scores_from_confusion(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of a (K, K) matrix, or of each matrix of an (R, K, K) stack; per-class values last."""
    matrix = np.asarray(matrix, np.float64)
    total = matrix.sum(axis=(-2, -1))
    true_pos = np.diagonal(matrix, axis1=-2, axis2=-1)
    support = matrix.sum(axis=-1)
    predicted = matrix.sum(axis=-2)
    negatives = total[..., None] - support
    precision = _ratio(true_pos, predicted)
    recall = _ratio(true_pos, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    specificity = _ratio(negatives - (predicted - true_pos), negatives)
    present = support > 0
    # Cohen's kappa: agreement beyond what the two marginals give by chance; undefined (NaN)
    # when chance agreement is already perfect.
    observed = true_pos.sum(axis=-1) / total
    chance = (support * predicted).sum(axis=-1) / total ** 2
    return {
        'accuracy': observed,
        # scikit-learn's: the mean recall over the classes that occur.
        'balanced_accuracy': _ratio((recall * present).sum(axis=-1), present.sum(axis=-1), empty=np.nan),
        'f1_weighted': (f1 * support).sum(axis=-1) / total,
        'f1_macro': f1.mean(axis=-1),
        'precision_macro': precision.mean(axis=-1),
        'recall_macro': recall.mean(axis=-1),
        'specificity_macro': specificity.mean(axis=-1),
        'cohen_kappa': _ratio(observed - chance, 1 - chance, empty=np.nan),
        'precision': precision, 'recall': recall, 'f1': f1, 'specificity': specificity,
        'support': support,
    }


def roc_auc_one_vs_rest(labels: np.ndarray, probabilities: np.ndarray,
                        weights: np.ndarray | None = None) -> np.ndarray:
    """Per-class ROC-AUC by the Mann–Whitney statistic (ties count half); NaN for a class with
    no positives or no negatives, where AUC is undefined.

    With `weights` (R × examples), one row of per-class AUCs per resample: (R, K).
    """
    labels = np.asarray(labels)
    stacked = np.ones((1, len(labels))) if weights is None else np.asarray(weights, np.float64)
    num_rows, num_classes = len(stacked), probabilities.shape[1]
    aucs = np.full((num_rows, num_classes), np.nan)
    for k in range(num_classes):
        values, inverse = np.unique(probabilities[:, k], return_inverse=True)
        cells = (np.arange(num_rows)[:, None] * len(values) + inverse).ravel()

        def weight_per_value(mask):  # (R, distinct scores): the weight of `mask`'s examples at each.
            return np.bincount(cells, weights=(stacked * mask).ravel(),
                               minlength=num_rows * len(values)).reshape(num_rows, len(values))

        positive, negative = weight_per_value(labels == k), weight_per_value(labels != k)
        negatives_below = np.cumsum(negative, axis=1) - negative
        wins = (positive * (negatives_below + 0.5 * negative)).sum(axis=1)
        aucs[:, k] = _ratio(wins, positive.sum(axis=1) * negative.sum(axis=1), empty=np.nan)
    return aucs[0] if weights is None else aucs


def mean_over_classes(aucs: np.ndarray) -> np.ndarray:
    """The macro ROC-AUC over the classes where it is defined; NaN where it is defined for none."""
    defined = ~np.isnan(aucs)
    return _ratio(np.where(defined, aucs, 0).sum(axis=-1), defined.sum(axis=-1), empty=np.nan)


def _number(value) -> float | None:
    """JSON-safe: NaN (undefined) becomes None."""
    return None if np.isnan(value) else float(value)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           class_names: tuple[str, ...]) -> dict:
    """The metrics every evaluation writes; macro averages weigh each class equally."""
    labels = np.asarray(labels, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    num_classes = len(class_names)
    if probabilities.shape != (len(labels), num_classes):
        raise ValueError(f'probabilities have shape {probabilities.shape}, expected '
                         f'({len(labels)}, {num_classes}) for classes {class_names}')
    matrix = confusion_matrix(labels, probabilities.argmax(axis=1), num_classes)
    scores = scores_from_confusion(matrix)
    auc = roc_auc_one_vs_rest(labels, probabilities)
    summary = {name: _number(scores[name]) for name in (
        'accuracy', 'balanced_accuracy', 'f1_weighted', 'f1_macro', 'precision_macro',
        'recall_macro', 'specificity_macro', 'cohen_kappa')}
    return {
        **summary,
        'roc_auc': _number(mean_over_classes(auc)),
        'ece': calibration.expected_calibration_error(labels, probabilities),
        'nll': calibration.negative_log_likelihood(labels, probabilities),
        'per_class': {name: {'precision': float(p), 'recall': float(r), 'f1': float(f),
                             'specificity': float(s), 'roc_auc': _number(a), 'support': int(n)}
                      for name, p, r, f, s, a, n in zip(
                          class_names, scores['precision'], scores['recall'], scores['f1'],
                          scores['specificity'], auc, scores['support'])},
        'confusion_matrix': matrix.tolist(),
        'class_names': list(class_names),
        'num_examples': int(len(labels)),
    }


def patient_level(labels: np.ndarray, probabilities: np.ndarray,
                  patients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per patient: the mean of its cells' probabilities and its most frequent cell label
    (a patient has one diagnosis; ties go to the lower class index). Returns (labels,
    probabilities, patient ids), patients sorted."""
    ids, index = np.unique(np.asarray(patients), return_inverse=True)
    num_classes = probabilities.shape[1]
    counts = np.bincount(index, minlength=len(ids))
    sums = np.zeros((len(ids), num_classes))
    np.add.at(sums, index, probabilities)
    label_counts = np.bincount(index * num_classes + np.asarray(labels),
                               minlength=len(ids) * num_classes).reshape(len(ids), num_classes)
    return label_counts.argmax(axis=1), sums / counts[:, None], ids
