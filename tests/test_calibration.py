"""Reliability bins, ECE at other bin counts, and the temperature --mode=predict and export read back."""
import os
import re

import numpy as np
import pytest

from allflax import files
from allflax.evaluation import calibration


def test_reliability_bins_by_hand():
    # Two bins, (0, 0.5] and (0.5, 1]: a top-class probability of exactly 0.5 is in the first.
    probabilities = np.array([[0.5, 0.5], [0.2, 0.8], [1.0, 0.0], [0.3, 0.7]])
    bins = calibration.reliability(np.array([1, 1, 0, 0]), probabilities, num_bins=2)
    np.testing.assert_allclose(bins['edges'], [0, 0.5, 1])
    np.testing.assert_array_equal(bins['count'], [1, 3])
    np.testing.assert_allclose(bins['confidence'], [0.5, (0.8 + 1.0 + 0.7) / 3])
    np.testing.assert_allclose(bins['accuracy'], [0, 2 / 3])  # [0.5, 0.5] predicts class 0.
    # Fifteen bins of 1/15: a certain prediction is in the last, 0.65 in (9/15, 10/15]; empty bins plot as 0.
    bins = calibration.reliability(np.array([0, 0]), np.array([[1.0, 0.0], [0.35, 0.65]]))
    np.testing.assert_allclose(bins['edges'], [i / 15 for i in range(16)])
    assert np.flatnonzero(bins['count']).tolist() == [9, 14]
    np.testing.assert_allclose(bins['confidence'], np.eye(15)[14] + 0.65 * np.eye(15)[9])
    np.testing.assert_allclose(bins['accuracy'], np.eye(15)[14])


@pytest.mark.parametrize('num_bins', [5, 10])
def test_expected_calibration_error_against_a_plain_loop(num_bins):
    rng = np.random.default_rng(num_bins)
    probabilities = rng.dirichlet(np.full(3, 0.5), 200)
    labels = rng.integers(0, 3, 200)
    expected = 0.0
    for i in range(num_bins):
        members = [j for j in range(200) if i / num_bins < probabilities[j].max() <= (i + 1) / num_bins]
        if members:
            accuracy = np.mean([probabilities[j].argmax() == labels[j] for j in members])
            confidence = np.mean([probabilities[j].max() for j in members])
            expected += len(members) / 200 * abs(accuracy - confidence)
    assert calibration.expected_calibration_error(labels, probabilities, num_bins) == pytest.approx(expected)


def test_saved_temperature_is_the_one_eval_fitted_for_this_checkpoint(tmp_path, caplog):
    workdir = str(tmp_path)
    path = os.path.join(workdir, 'eval', 'temperature.json')
    assert calibration.saved_temperature(workdir, 6, scaling=True) == 1.0  # Nothing fitted yet.
    # Written as --mode=eval writes it (allflax/evaluation/results.py).
    files.write_json(path, {'temperature': 1.7, 'checkpoint_step': 6})
    assert calibration.saved_temperature(workdir, 6, scaling=True) == 1.7
    assert calibration.saved_temperature(workdir, 6, scaling=False) == 1.0  # T = 1: no scaling.
    assert calibration.saved_temperature(workdir, 8, scaling=True) == 1.0  # Fitted for another checkpoint.
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    for message, step in zip(messages, ('6', '8')):
        # Names the setting, the file, the checkpoint's step and the remedy.
        assert 'eval.temperature_scaling' in message and path in message and '--mode=eval' in message
        assert re.findall(r'\d+', message.replace(path, '')) == [step]
