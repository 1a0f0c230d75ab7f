"""Calibration: whether the cells called 90 % likely are right 9 times in 10, and temperature
scaling, which makes them so without changing any prediction."""
import json
import os

import numpy as np
import scipy.optimize
import scipy.special
from absl import logging

NUM_BINS = 15
# log T is searched in [log 0.05, log 20]: wide enough for any network worth calibrating.
_LOG_TEMPERATURE_BOUNDS = (np.log(0.05), np.log(20.0))


def probabilities(view_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from logits of shape (examples, views, classes), averaged over the views
    (one view, or the eight of test-time augmentation). The models are trained with a sigmoid per
    class (focal loss), so each view's probabilities are its logits / temperature through the
    sigmoid, normalised to sum to 1."""
    scores = scipy.special.expit(np.asarray(view_logits, np.float32) / np.float32(temperature))
    return (scores / scores.sum(axis=-1, keepdims=True)).astype(np.float64).mean(axis=1)


def reliability(labels: np.ndarray, probabilities: np.ndarray, num_bins: int = NUM_BINS) -> dict:
    """Per confidence bin ((i/B, (i+1)/B], on the top-class probability): the number of
    examples, their mean confidence and their accuracy (0 for empty bins)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)

    def mean_per_bin(values):
        return np.divide(np.bincount(bins, weights=values, minlength=num_bins), count,
                         out=np.zeros(num_bins), where=count > 0)

    return {'edges': np.linspace(0.0, 1.0, num_bins + 1), 'count': count,
            'confidence': mean_per_bin(confidence), 'accuracy': mean_per_bin(correct.astype(np.float64))}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray,
                               num_bins: int = NUM_BINS) -> float:
    """Σ_bins (examples in bin / examples) · |accuracy − mean confidence| (Guo et al., 2017)."""
    bins = reliability(labels, probabilities, num_bins)
    gaps = np.abs(bins['accuracy'] - bins['confidence'])
    return float((bins['count'] * gaps).sum() / bins['count'].sum())


def negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean −log p(true class), p floored at 1e-12 so one certain mistake stays finite."""
    true_class = np.take_along_axis(probabilities, np.asarray(labels)[:, None], axis=1)[:, 0]
    return float(-np.log(np.maximum(true_class, 1e-12)).mean())


def fit_temperature(view_logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the NLL of `probabilities(view_logits, T)`: on held-out (validation)
    logits, never on the split it is then evaluated on."""
    def nll(log_temperature):
        return negative_log_likelihood(labels, probabilities(view_logits, np.exp(log_temperature)))

    result = scipy.optimize.minimize_scalar(nll, bounds=_LOG_TEMPERATURE_BOUNDS, method='bounded')
    return float(np.exp(result.x))


def saved_temperature(workdir: str, checkpoint_step: int, *, scaling: bool) -> float:
    """The temperature --mode=eval fitted for this checkpoint (`eval/temperature.json`) when
    `scaling` (`eval.temperature_scaling`) asks for one, else 1."""
    if not scaling:
        return 1.0
    path = os.path.join(workdir, 'eval', 'temperature.json')
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved['checkpoint_step'] == checkpoint_step:
            return saved['temperature']
    logging.warning('eval.temperature_scaling is on but %s holds no temperature for step %d: '
                    'run --mode=eval first; predicting without scaling', path, checkpoint_step)
    return 1.0
