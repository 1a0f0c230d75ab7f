"""A trained run restored for inference: what --mode=eval, --mode=predict and --mode=export share,
so that no mode imports another. Takes config sections, as every library module does."""
import dataclasses
import json
import os
from collections.abc import Callable

import ml_collections
import numpy as np

from allflax import sharding
from allflax.data.dataset import Split
from allflax.evaluation import inference, interpret
from allflax.training import checkpoints, state, steps


def run_summary(workdir: str) -> dict:
    """splits.json as training wrote it: class names (in class order), the train split's size and
    the whole file (split sizes, patients), which restoring a model needs without reading the data."""
    path = os.path.join(workdir, 'splits.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: train into {workdir} first')
    with open(path) as f:
        summary = json.load(f)
    return {'class_names': tuple(summary['train']['class_counts']),
            'num_train_examples': summary['train']['num_examples'], 'splits': summary}


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint restored onto the mesh, with the model parts to run it."""
    built: state.Setup
    state: state.TrainState
    step: int
    eval_step: Callable  # `eval_step(state, uint8 images)` → logits.
    mesh: object


def restore(workdir: str, *, model: ml_collections.ConfigDict, optimizer: ml_collections.ConfigDict,
            data: ml_collections.ConfigDict, dtype: str, seed: int, num_classes: int,
            checkpoint_step: int | None = None) -> Restored:
    """Restores the params and batch statistics of a checkpoint of `workdir` (the latest by default)
    into the model of the `model` section; the optimiser state is not read, so its schedule is
    built for one step."""
    mesh = sharding.make_mesh()
    built = state.setup(model, optimizer, mesh, num_classes=num_classes, image_size=data.image_size, dtype=dtype,
                        seed=seed, total_steps=1, cache_dir='', load_pretrained=False)
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
    # Inference reads params and batch statistics only; the rest stays as initialised.
    restored_state = built.state.replace(params=restored['params'], batch_stats=restored['batch_stats'])
    eval_step = steps.make_inference_step(steps.logits, built, mesh, data=data, dtype=dtype)
    return Restored(built, restored_state, int(step), eval_step, mesh)


def explainer(restored: Restored, *, data: ml_collections.ConfigDict, dtype: str,
              batch_size: int) -> Callable[[Split], dict[str, np.ndarray]]:
    """`explain(split)`: `interpret.explain` of every image of a split, batched over the mesh."""
    explain_step = steps.make_inference_step(interpret.explain, restored.built, restored.mesh, data=data,
                                             dtype=dtype)
    return lambda split: inference.map_batches(lambda images, put: explain_step(restored.state, put(images)),
                                               split, batch_size, restored.mesh)
