"""A binary task's decision rule at a stated sensitivity (C-NMC's ALL vs hem, ALL-IDB2's blast vs
normal): the threshold on the positive class's probability is chosen on the validation split, so
that at least `target` of its positive images reach it, and the test split is scored at it.

A screening use wants few missed blasts: argmax (a threshold near 0.5) fixes no sensitivity, and
a threshold read off the test split would report an optimistic one. Numpy only.
"""
import json
import os

import numpy as np
from absl import logging

from allflax.evaluation import stats

RATES = ('sensitivity', 'specificity', 'ppv', 'npv')


def positive_index(class_names, positive_class: str = '') -> int:
    """The positive class: `positive_class` by name, else the second class (the malignant one in
    every binary set allflax reads: hem/all, normal/blast)."""
    if len(class_names) != 2:
        raise ValueError(f'an operating point needs two classes, not {len(class_names)}: {list(class_names)}')
    if not positive_class:
        return 1
    if positive_class not in class_names:
        raise ValueError(f'eval.positive_class={positive_class!r} is not one of the classes {list(class_names)}')
    return list(class_names).index(positive_class)


def threshold_at_sensitivity(labels: np.ndarray, scores: np.ndarray, positive: int, target: float) -> float:
    """The highest threshold t at which at least `target` of the positive examples score >= t."""
    positives = np.sort(np.asarray(scores, np.float64)[np.asarray(labels) == positive])
    if not len(positives):
        raise ValueError('no positive example to choose a threshold on')
    # Up to floor(n (1 - target)) positives may fall below t: t is the next one's score.
    allowed_misses = int(np.floor(len(positives) * (1 - target) + 1e-9))
    return float(positives[min(allowed_misses, len(positives) - 1)])


def _rates(positive_labels: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> dict:
    """Each rate over `weights` rows (a resample's draw counts, or ones): arrays, NaN where undefined."""
    def count(truth, call):
        return weights @ (truth & call).astype(np.float64)

    tp, fn = count(positive_labels, predicted), count(positive_labels, ~predicted)
    tn, fp = count(~positive_labels, ~predicted), count(~positive_labels, predicted)
    with np.errstate(invalid='ignore', divide='ignore'):
        return {'sensitivity': tp / (tp + fn), 'specificity': tn / (tn + fp),
                'ppv': tp / (tp + fp), 'npv': tn / (tn + fn)}


def operating_point(val_labels: np.ndarray, val_scores: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    patients, *, class_names, positive: int, target: float, samples: int, seed: int) -> dict:
    """The threshold chosen on val for `target` sensitivity, and sensitivity, specificity, PPV and
    NPV at it on the scored split with 95 % intervals: the within-class patient bootstrap where
    patient ids are known (images of a patient are not independent), else exact intervals over
    images. `*_scores` are the positive class's probabilities."""
    labels = np.asarray(labels)
    threshold = threshold_at_sensitivity(val_labels, val_scores, positive, target)
    is_positive = labels == positive
    predicted = np.asarray(scores) >= threshold
    point = {name: float(value[0]) for name, value in _rates(is_positive, predicted, np.ones((1, len(labels)))).items()}
    tp, fn = int(np.sum(is_positive & predicted)), int(np.sum(is_positive & ~predicted))
    tn, fp = int(np.sum(~is_positive & ~predicted)), int(np.sum(~is_positive & predicted))
    clusters = stats.known_patients(patients)
    if clusters is not None:
        weights = stats.bootstrap_weights(labels, clusters, samples=samples, seed=seed)
        resampled = _rates(is_positive, predicted, weights)
        intervals = {name: stats.percentile_interval(values[np.isfinite(values)]) for name, values in resampled.items()}
        method = stats.bootstrap_method(labels, clusters, samples=samples)
    else:
        intervals = {'sensitivity': stats.exact_interval(tp, tp + fn), 'specificity': stats.exact_interval(tn, tn + fp),
                     'ppv': stats.exact_interval(tp, tp + fp), 'npv': stats.exact_interval(tn, tn + fn)}
        method = stats.exact_method(len(labels), 'images')
    val_sensitivity = float(np.mean(np.asarray(val_scores)[np.asarray(val_labels) == positive] >= threshold))
    return {
        'positive_class': class_names[positive], 'target_sensitivity': target, 'threshold': threshold,
        'chosen_on': 'val', 'val_sensitivity': val_sensitivity,
        **{name: (None if np.isnan(point[name]) else point[name]) for name in RATES},
        'ci95': intervals, 'ci95_method': method,
        'counts': {'true_positive': tp, 'false_negative': fn, 'true_negative': tn, 'false_positive': fp},
    }


def rule_of(point: dict) -> dict:
    """The bundle's decision rule for an operating point (`decision_rule` in metadata.json)."""
    return {'kind': 'threshold', 'threshold': point['threshold'], 'positive_class': point['positive_class'],
            'description': (f'{point["positive_class"]} where its probability is at least {point["threshold"]:.6g}, '
                            f'chosen on the validation split for sensitivity >= {point["target_sensitivity"]:g} '
                            f'(reached {point["val_sensitivity"]:.3f} there)')}


def saved_rule(workdir: str, checkpoint_step: int) -> dict | None:
    """The decision rule of `workdir/eval/test/metrics.json`'s operating point when it is of
    `checkpoint_step`, else None (argmax): what --mode=predict applies, as the bundle does."""
    path = os.path.join(workdir, 'eval', 'test', 'metrics.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        values = json.load(f)
    if not values.get('operating_point'):
        return None
    if values.get('checkpoint_step') != checkpoint_step:
        logging.warning('%s holds the operating point of step %s, not of step %d: predicting by argmax',
                        path, values.get('checkpoint_step'), checkpoint_step)
        return None
    return rule_of(values['operating_point'])


def roc_band(labels: np.ndarray, scores: np.ndarray, positive: int, patients, *, samples: int, seed: int,
             grid: np.ndarray = np.linspace(0, 1, 101)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive-rate grid, 2.5th and 97.5th percentiles of the true-positive rate there) over
    the resamples of `stats.bootstrap_weights`: patients within their class where known, else images."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    weights = stats.bootstrap_weights(labels, stats.known_patients(patients), samples=samples, seed=seed)
    order = np.argsort(-scores, kind='stable')
    is_positive = (labels == positive)[order]
    curves = []
    for row in weights[:, order]:
        true_positives = np.cumsum(row * is_positive)
        false_positives = np.cumsum(row * ~is_positive)
        tpr = np.r_[0.0, true_positives / true_positives[-1]]
        fpr = np.r_[0.0, false_positives / false_positives[-1]]
        curves.append(np.interp(grid, fpr, tpr))
    low, high = np.percentile(np.array(curves), [2.5, 97.5], axis=0)
    return grid, low, high
