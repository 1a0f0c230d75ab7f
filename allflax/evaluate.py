"""Evaluation: predictions of a train state on a split, metrics with intervals, and the files a
reader needs: `<workdir>/eval/<split>/` metrics.json, predictions.csv and (eval mode) the report."""
import csv
import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from allflax import calibration, checkpoints, metrics, sharding, stats, steps
from allflax.data import pipeline
from allflax.data.dataset import Dataset, Split


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The eight symmetries of square tiles (N, H, W, C): identity, flips, transposes, rotations."""
    views = []
    for oriented in (images, images.swapaxes(1, 2)):
        for flipped in (oriented, oriented[:, ::-1]):
            views += [flipped, flipped[:, :, ::-1]]
    return views


def map_batches(fn, split: Split, batch_size: int, mesh):
    """`fn(host uint8 images, put)` → a pytree of device arrays with a batch axis, for every image
    of `split` in order, gathered on the host; `put` places a host batch on the mesh."""
    batch_sharding = sharding.batch_sharding(mesh)

    def put(images):
        return sharding.put_batch({'image': np.ascontiguousarray(images)}, batch_sharding)['image']

    def gather(x, valid):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))[:valid]

    outputs = [jax.tree.map(lambda x: gather(x, valid), fn(batch['image'], put))
               for batch, valid in pipeline.eval_batches(split, batch_size)]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def predict_logits(eval_step, state, split: Split, batch_size: int, mesh, *,
                   tta: bool = False) -> np.ndarray:
    """Logits (examples, views, classes) for every image of `split`, in order: one view, or the
    eight dihedral views with test-time augmentation. The one prediction path of validation,
    eval and predict."""
    def logits(images, put):
        views = dihedral_views(images) if tta else [images]
        return jnp.stack([eval_step(state, put(view)) for view in views], axis=1)

    return map_batches(logits, split, batch_size, mesh)


def evaluate_split(eval_step, state, dataset: Dataset, split_name: str, batch_size: int,
                   mesh) -> dict:
    """The plain metrics of one split (no intervals, no augmentation): validation during training."""
    split = dataset.splits[split_name]
    probabilities = calibration.probabilities(predict_logits(eval_step, state, split, batch_size, mesh))
    return metrics.classification_metrics(split.labels, probabilities, dataset.class_names)


def detailed_metrics(split: Split, probabilities: np.ndarray, class_names: tuple[str, ...], *,
                     bootstrap_samples: int, seed: int) -> dict:
    """The metrics plus bootstrap intervals (over patients where every image has one) and the
    same per patient, each patient scored by the mean of its cells' probabilities."""
    values = metrics.classification_metrics(split.labels, probabilities, class_names)
    patients = stats.known_patients(split.patients)
    values['ci95'] = stats.bootstrap_intervals(split.labels, probabilities, patients,
                                               samples=bootstrap_samples, seed=seed)
    values['bootstrap'] = {'samples': bootstrap_samples, 'seed': seed,
                           'resampled': 'images' if patients is None else 'patients'}
    if patients is not None:
        patient_labels, patient_probabilities, _ = metrics.patient_level(split.labels, probabilities, patients)
        patient_values = metrics.classification_metrics(patient_labels, patient_probabilities, class_names)
        patient_values['ci95'] = stats.bootstrap_intervals(
            patient_labels, patient_probabilities, None, samples=bootstrap_samples, seed=seed)
        values['patient_level'] = patient_values
    return values


def image_ids(split: Split, split_name: str) -> list[str]:
    """What identifies each image across runs: its file where known, else its split position
    and a hash of its pixels (so runs on different images never match)."""
    if split.paths:
        return list(split.paths)
    return [f'{split_name}/{i}/sha1:{hashlib.sha1(np.ascontiguousarray(split.images[i]).tobytes()).hexdigest()[:16]}'
            for i in range(len(split))]


def write_csv(path: str, header: list[str], rows) -> str:
    if jax.process_index() == 0:
        with open(path + '.tmp', 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(path + '.tmp', path)
    return path


def write_predictions(directory: str, split: Split, split_name: str, probabilities: np.ndarray,
                      class_names: tuple[str, ...]) -> str:
    """predictions.csv: one row per image, what `--mode=compare` pairs runs by."""
    predicted = probabilities.argmax(axis=1)
    rows = ([i, image_id, patient, class_names[label], class_names[prediction], *map(repr, row)]
            for i, (image_id, patient, label, prediction, row) in enumerate(zip(
                image_ids(split, split_name), split.patients, split.labels, predicted,
                probabilities.tolist())))
    return write_csv(os.path.join(directory, 'predictions.csv'),
                     ['index', 'image_id', 'patient', 'label', 'predicted_class', *class_names], rows)


def split_directory(workdir: str, split_name: str) -> str:
    directory = os.path.join(workdir, 'eval', split_name)
    os.makedirs(directory, exist_ok=True)
    return directory


def write_json(path: str, values: dict) -> str:
    if jax.process_index() == 0:
        with open(path + '.tmp', 'w') as f:
            json.dump(values, f, indent=1)
        os.replace(path + '.tmp', path)
    return path


def write_metrics(workdir: str, split_name: str, values: dict) -> str:
    return write_json(os.path.join(split_directory(workdir, split_name), 'metrics.json'), values)


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
    """What the report needs beyond the metrics: raw logits for the before/after calibration plot."""
    logits: np.ndarray  # (examples, views, classes)
    probabilities: np.ndarray  # At `temperature`, averaged over the views.
    temperature: float


def evaluate_state(eval_step, state, dataset: Dataset, split_name: str,
                   config: ml_collections.ConfigDict, mesh, workdir: str,
                   checkpoint_step: int) -> tuple[dict, SplitPredictions]:
    """Predicts `split_name` (with test-time augmentation and temperature scaling if
    config.eval asks) and writes its metrics.json and predictions.csv."""
    split = dataset.splits[split_name]
    options = config.eval
    directory = split_directory(workdir, split_name)

    def logits_of(name):
        return predict_logits(eval_step, state, dataset.splits[name], config.batch_size, mesh,
                              tta=options.tta)

    logits = logits_of(split_name)
    temperature = 1.0
    if options.temperature_scaling:
        if split_name == 'val':
            logging.warning('Temperature fitted and evaluated on the same split (val): optimistic.')
        val_logits = logits if split_name == 'val' else logits_of('val')
        temperature = calibration.fit_temperature(val_logits, dataset.splits['val'].labels)
    probabilities = calibration.probabilities(logits, temperature)
    values = detailed_metrics(split, probabilities, dataset.class_names,
                              bootstrap_samples=options.bootstrap_samples, seed=config.seed)
    if options.temperature_scaling:
        uncalibrated = calibration.probabilities(logits)
        values['calibration'] = {
            'temperature': temperature, 'fitted_on': 'val',
            'ece_before': calibration.expected_calibration_error(split.labels, uncalibrated),
            'ece_after': values['ece'],
            'nll_before': calibration.negative_log_likelihood(split.labels, uncalibrated),
            'nll_after': values['nll']}
        write_json(os.path.join(workdir, 'eval', 'temperature.json'),
                   {'temperature': temperature, 'checkpoint_step': int(checkpoint_step)})
    values['tta'] = bool(options.tta)
    values['checkpoint_step'] = int(checkpoint_step)
    write_predictions(directory, split, split_name, probabilities, dataset.class_names)
    write_metrics(workdir, split_name, values)
    return values, SplitPredictions(logits, probabilities, temperature)


def run_summary(workdir: str) -> dict:
    """splits.json as training wrote it: class names (in class order) and split sizes, which
    restoring a model needs without reading the data."""
    path = os.path.join(workdir, 'splits.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: train into {workdir} first')
    with open(path) as f:
        summary = json.load(f)
    return {'class_names': tuple(summary['train']['class_counts']),
            'num_train_examples': summary['train']['num_examples']}


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint restored onto the mesh, with the model parts to run it."""
    built: steps.Setup
    state: steps.TrainState
    step: int
    eval_step: object
    mesh: object


def restore(config: ml_collections.ConfigDict, workdir: str, *, num_classes: int,
            num_train_examples: int, checkpoint_step: int | None = None) -> Restored:
    """Restores a checkpoint of `workdir` (the latest by default)."""
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
    step = checkpointer.latest_step() if checkpoint_step is None else checkpoint_step
    if step is None:
        raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}: train first '
                                f'(python main.py --config=... --workdir={workdir})')
    mesh = sharding.make_mesh()
    total_steps = steps.total_train_steps(config, num_train_examples)
    built = steps.setup(config, num_classes, total_steps, mesh, load_pretrained=False)
    abstract = checkpoints.abstract_with_sharding(built.state, built.state_sharding)
    state, _ = checkpointer.restore(step, abstract)
    checkpointer.close()
    eval_step = steps.make_eval_step(built.parts, config, mesh, built.state_sharding)
    return Restored(built, state, int(step), eval_step, mesh)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What an evaluation of a restored checkpoint produced, for the report to draw on."""
    dataset: Dataset
    split_name: str
    restored: Restored
    values: dict
    predictions: SplitPredictions


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, split_name: str = 'test',
                        checkpoint_step: int | None = None) -> Evaluation:
    """Restores a checkpoint (the latest by default) and writes `workdir/eval/<split>/`
    metrics.json and predictions.csv."""
    dataset = pipeline.load(config, workdir=None)
    if split_name not in dataset.splits:
        raise ValueError(f'unknown split {split_name!r}; available: {", ".join(dataset.splits)}')
    restored = restore(config, workdir, num_classes=len(dataset.class_names),
                       num_train_examples=len(dataset.splits['train']), checkpoint_step=checkpoint_step)
    values, predictions = evaluate_state(restored.eval_step, restored.state, dataset, split_name,
                                         config, restored.mesh, workdir, restored.step)
    return Evaluation(dataset, split_name, restored, values, predictions)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, split_name: str = 'test',
             checkpoint_step: int | None = None) -> dict:
    """The metrics of `evaluate_checkpoint`."""
    return evaluate_checkpoint(config, workdir, split_name=split_name, checkpoint_step=checkpoint_step).values
