"""Classification metrics from labels and class probabilities, computed from the confusion matrix."""
import numpy as np
import scipy.stats


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes (scikit-learn's convention)."""
    return np.bincount(num_classes * labels + predictions, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def _ratio(numerator, denominator):
    """Per-class ratios where an empty denominator counts as 0, as scikit-learn's zero_division=0."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def roc_auc_one_vs_rest(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per-class ROC-AUC by the Mann–Whitney rank statistic (ties count half); NaN for a class
    with no positives or no negatives, where AUC is undefined."""
    aucs = np.full(probabilities.shape[1], np.nan)
    for k in range(probabilities.shape[1]):
        positive = labels == k
        num_pos, num_neg = positive.sum(), (~positive).sum()
        if num_pos and num_neg:
            ranks = scipy.stats.rankdata(probabilities[:, k])
            aucs[k] = (ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)
    return aucs


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
    true_pos = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    negatives = len(labels) - support
    precision = _ratio(true_pos, predicted)
    recall = _ratio(true_pos, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    specificity = _ratio(negatives - (predicted - true_pos), negatives)
    auc = roc_auc_one_vs_rest(labels, probabilities)
    return {
        'accuracy': float(true_pos.sum() / len(labels)),
        'f1_weighted': float(np.sum(f1 * support) / len(labels)),
        'f1_macro': float(f1.mean()),
        'precision_macro': float(precision.mean()),
        'recall_macro': float(recall.mean()),
        'specificity_macro': float(specificity.mean()),
        'roc_auc': float(np.nanmean(auc)) if not np.all(np.isnan(auc)) else None,
        'per_class': {name: {'precision': float(p), 'recall': float(r), 'f1': float(f),
                             'specificity': float(s), 'roc_auc': None if np.isnan(a) else float(a),
                             'support': int(n)}
                      for name, p, r, f, s, a, n in zip(class_names, precision, recall, f1,
                                                        specificity, auc, support)},
        'confusion_matrix': matrix.tolist(),
        'class_names': list(class_names),
        'num_examples': int(len(labels)),
    }
