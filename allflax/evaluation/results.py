"""What an evaluation writes for a reader: `<workdir>/eval/<split>/` metrics.json (with
intervals, per patient where known) and predictions.csv, which `--mode=compare` pairs runs by."""
import dataclasses
import hashlib
import os
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from allflax import files
from allflax.data import splits
from allflax.data.dataset import Dataset, Split
from allflax.evaluation import calibration, inference, operating_point, stats


def detailed_metrics(split: Split, probabilities: np.ndarray, class_names: tuple[str, ...], *,
                     bootstrap_samples: int, seed: int) -> dict:
    """The metrics with 95 % intervals and their methods, per image and (where every image has a
    patient id) per patient: `stats.metrics_with_intervals`."""
    return stats.metrics_with_intervals(split.labels, probabilities, split.patients, class_names,
                                        samples=bootstrap_samples, seed=seed)


def image_ids(split: Split, split_name: str) -> list[str]:
    """What identifies each image across runs: its file where known, else its split position
    and a hash of its pixels (so runs on different images never match)."""
    if split.paths:
        return list(split.paths)
    return [f'{split_name}/{i}/sha1:{hashlib.sha1(np.ascontiguousarray(split.images[i]).tobytes()).hexdigest()[:16]}'
            for i in range(len(split))]


def write_predictions(directory: str, split: Split, split_name: str, probabilities: np.ndarray,
                      class_names: tuple[str, ...]) -> str:
    """predictions.csv: one row per image, what `--mode=compare` pairs runs by."""
    predicted = probabilities.argmax(axis=1)
    rows = ([i, image_id, patient, class_names[label], class_names[prediction], *map(repr, row)]
            for i, (image_id, patient, label, prediction, row) in enumerate(zip(
                image_ids(split, split_name), split.patients, split.labels, predicted,
                probabilities.tolist())))
    return files.write_csv(os.path.join(directory, 'predictions.csv'),
                     ['index', 'image_id', 'patient', 'label', 'predicted_class', *class_names], rows)


def split_directory(workdir: str, split_name: str) -> str:
    directory = os.path.join(workdir, 'eval', split_name)
    os.makedirs(directory, exist_ok=True)
    return directory


def write_metrics(workdir: str, split_name: str, values: dict) -> str:
    return files.write_json(os.path.join(split_directory(workdir, split_name), 'metrics.json'), values)


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
    """What the report needs beyond the metrics: raw logits for the before/after calibration plot."""
    logits: np.ndarray  # (examples, views, classes)
    probabilities: np.ndarray  # At `temperature`, averaged over the views.
    temperature: float


def evaluate_state(eval_step, state, dataset: Dataset, split_name: str, mesh, workdir: str, *,
                   options: ml_collections.ConfigDict, batch_size: int, seed: int, split_method: str,
                   checkpoint_step: int, input_convention: str, before_write: Callable[[], None] = lambda: None
                   ) -> tuple[dict, SplitPredictions]:
    """Predicts `split_name` (with test-time augmentation and temperature scaling where the `eval`
    section `options` asks) and writes its metrics.json and predictions.csv, calling `before_write`
    first (training's check that it still holds the workdir). metrics.json's `split_independence`
    says whether the split (data.split `split_method`) is patient-independent; `input_convention`
    is the one `eval_step` applies (allflax.data.input_convention), recorded in metrics.json."""
    split = dataset.splits[split_name]
    directory = split_directory(workdir, split_name)

    def logits_of(name):
        return inference.predict_logits(eval_step, state, dataset.splits[name], batch_size, mesh, tta=options.tta)

    logits = logits_of(split_name)
    temperature = 1.0
    if options.temperature_scaling:
        if split_name == 'val':
            logging.warning('Temperature fitted and evaluated on the same split (val): optimistic.')
        val_logits = logits if split_name == 'val' else logits_of('val')
        temperature = calibration.fit_temperature(val_logits, dataset.splits['val'].labels)
    probabilities = calibration.probabilities(logits, temperature)
    if not np.isfinite(probabilities).all():
        bad = int((~np.isfinite(probabilities).all(axis=1)).sum())
        raise ValueError(f'the checkpoint of step {checkpoint_step} predicts non-finite probabilities for {bad} of '
                         f'{len(probabilities)} images of {split_name}: its weights diverged; evaluate an earlier '
                         f'checkpoint (--checkpoint_step)')
    values = detailed_metrics(split, probabilities, dataset.class_names,
                              bootstrap_samples=options.bootstrap_samples, seed=seed)
    before_write()
    if options.temperature_scaling:
        uncalibrated = calibration.probabilities(logits)
        values['calibration'] = {
            'temperature': temperature, 'fitted_on': 'val',
            'ece_before': calibration.expected_calibration_error(split.labels, uncalibrated),
            'ece_after': values['ece'],
            'nll_before': calibration.negative_log_likelihood(split.labels, uncalibrated),
            'nll_after': values['nll']}
        files.write_json(os.path.join(workdir, 'eval', 'temperature.json'),
                         {'temperature': temperature, 'checkpoint_step': int(checkpoint_step)})
    if len(dataset.class_names) == 2:
        val_probabilities = (probabilities if split_name == 'val'
                             else calibration.probabilities(val_logits if options.temperature_scaling
                                                            else logits_of('val'), temperature))
        positive = operating_point.positive_index(dataset.class_names, options.get('positive_class', ''))
        values['operating_point'] = operating_point.operating_point(
            dataset.splits['val'].labels, val_probabilities[:, positive], split.labels, probabilities[:, positive],
            split.patients, class_names=dataset.class_names, positive=positive,
            target=options.get('target_sensitivity', 0.95), samples=options.bootstrap_samples, seed=seed)
    patients = np.concatenate([s.patients for s in dataset.splits.values()])
    values['split_independence'] = {'method': split_method, **splits.split_independence(
        split_method, int(np.sum(patients == '')), len(patients))}
    values['tta'] = bool(options.tta)
    values['checkpoint_step'] = int(checkpoint_step)
    values['input_convention'] = input_convention
    write_predictions(directory, split, split_name, probabilities, dataset.class_names)
    write_metrics(workdir, split_name, values)
    return values, SplitPredictions(logits, probabilities, temperature)
