"""--mode=eval: restore a run's checkpoint, predict a split, and write `<workdir>/eval/<split>/`:
metrics.json (with intervals), predictions.csv and the report (plots, Grad-CAM gallery)."""
import dataclasses
import json
import os
from collections.abc import Callable

import ml_collections
import numpy as np

from allflax import sharding, train
from allflax.data import pipeline
from allflax.data.dataset import Split
from allflax.evaluation import inference, interpret, report, results
from allflax.training import checkpoints, state, steps


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
    built: state.Setup
    state: state.TrainState
    step: int
    eval_step: Callable
    mesh: object


def restore(config: ml_collections.ConfigDict, workdir: str, *, num_classes: int,
            num_train_examples: int, checkpoint_step: int | None = None) -> Restored:
    """Restores a checkpoint of `workdir` (the latest by default)."""
    mesh = sharding.make_mesh()
    built = train.build(config, num_classes, train.total_steps_of(config, num_train_examples), mesh,
                        load_pretrained=False)
    abstract = checkpoints.abstract_with_sharding(built.state, built.state_sharding)
    weights = {'params': abstract.params, 'batch_stats': abstract.batch_stats}
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
    try:
        if checkpoint_step is None:
            step, restored = checkpointer.restore_newest_readable(
                lambda step: checkpointer.restore_weights(step, weights), set_aside=False)
        else:
            step, restored = checkpoint_step, checkpointer.restore_weights(checkpoint_step, weights)
    finally:
        checkpointer.close()
    if step is None:
        raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}: train first '
                                f'(python main.py --config=... --workdir={workdir})')
    # Evaluation reads params and batch statistics only; the rest stays as initialised.
    restored_state = built.state.replace(params=restored['params'], batch_stats=restored['batch_stats'])
    return Restored(built, restored_state, int(step), train.make_eval_step(config, built, mesh), mesh)


def explainer(config: ml_collections.ConfigDict, restored: Restored) -> Callable[[Split], dict[str, np.ndarray]]:
    """`explain(split)`: `interpret.explain` of every image of a split, batched over the mesh."""
    explain_step = steps.make_inference_step(interpret.explain, restored.built, restored.mesh, data=config.data,
                                             dtype=config.dtype)
    return lambda split: inference.map_batches(lambda images, put: explain_step(restored.state, put(images)),
                                               split, config.batch_size, restored.mesh)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, split_name: str = 'test',
             checkpoint_step: int | None = None, with_report: bool = True) -> dict:
    """Restores a checkpoint (the latest by default), writes `workdir/eval/<split>/` metrics.json
    and predictions.csv, and with `with_report` the report; returns the metrics."""
    dataset = pipeline.load(config, workdir=None)
    if split_name not in dataset.splits:
        raise ValueError(f'unknown split {split_name!r}; available: {", ".join(dataset.splits)}')
    restored = restore(config, workdir, num_classes=len(dataset.class_names),
                       num_train_examples=len(dataset.splits['train']), checkpoint_step=checkpoint_step)
    values, predictions = results.evaluate_state(
        restored.eval_step, restored.state, dataset, split_name, restored.mesh, workdir, options=config.eval,
        batch_size=config.batch_size, seed=config.seed, checkpoint_step=restored.step)
    if with_report:
        report.write_split_report(workdir, split_name, dataset.splits[split_name], dataset.class_names, values,
                                  predictions, explainer(config, restored), model_name=config.model.name,
                                  data_name=config.data.name, preprocess=config.data.preprocess,
                                  gradcam_examples=config.eval.gradcam_examples)
    return values
