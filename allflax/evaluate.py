"""Evaluation: predictions of a train state on a split, and metrics restored from a checkpoint."""
import json
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from allflax import checkpoints, metrics, sharding, steps
from allflax.data import pipeline
from allflax.data.dataset import Dataset, Split


def predict_probabilities(eval_step, state, split: Split, batch_size: int, mesh) -> np.ndarray:
    """Class probabilities for every image of `split`, in order."""
    batch_sharding = sharding.batch_sharding(mesh)
    outputs = []
    for batch, valid in pipeline.eval_batches(split, batch_size):
        logits = eval_step(state, sharding.put_batch(batch, batch_sharding)['image'])
        outputs.append(np.asarray(multihost_utils.process_allgather(logits, tiled=True))[:valid])
    return np.asarray(steps.probabilities(np.concatenate(outputs)))


def evaluate_split(eval_step, state, dataset: Dataset, split_name: str, batch_size: int,
                   mesh) -> dict:
    split = dataset.splits[split_name]
    probabilities = predict_probabilities(eval_step, state, split, batch_size, mesh)
    return metrics.classification_metrics(split.labels, probabilities, dataset.class_names)


def write_metrics(workdir: str, split_name: str, values: dict) -> str:
    directory = os.path.join(workdir, 'eval', split_name)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, 'metrics.json')
    if jax.process_index() == 0:
        with open(path + '.tmp', 'w') as f:
            json.dump(values, f, indent=1)
        os.replace(path + '.tmp', path)
    return path


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, split_name: str = 'test',
             checkpoint_step: int | None = None) -> dict:
    """Restores a checkpoint (the latest by default) and writes `workdir/eval/<split>/metrics.json`."""
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
    step = checkpointer.latest_step() if checkpoint_step is None else checkpoint_step
    if step is None:
        raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}: train first '
                                f'(python main.py --config=... --workdir={workdir})')
    mesh = sharding.make_mesh()
    dataset = pipeline.load(config, workdir=None)
    if split_name not in dataset.splits:
        raise ValueError(f'unknown split {split_name!r}; available: {", ".join(dataset.splits)}')
    total_steps = steps.total_train_steps(config, len(dataset.splits['train']))
    built = steps.setup(config, len(dataset.class_names), total_steps, mesh)
    abstract = checkpoints.abstract_with_sharding(built.state, built.state_sharding)
    state, _ = checkpointer.restore(step, abstract)
    checkpointer.close()
    eval_step = steps.make_eval_step(built.parts, config, mesh, built.state_sharding)
    values = evaluate_split(eval_step, state, dataset, split_name, config.batch_size, mesh)
    values['checkpoint_step'] = int(step)
    write_metrics(workdir, split_name, values)
    return values
