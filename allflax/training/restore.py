"""A trained run restored for inference: what --mode=eval, --mode=predict and --mode=export share,
so that no mode imports another. Takes config sections, as every library module does."""
import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from allflax import models, sharding
from allflax.data import membership
from allflax.data.dataset import read_splits_json, Split
from allflax.evaluation import inference, interpret
from allflax.training import checkpoints, state, steps


def run_summary(workdir: str) -> dict:
    """splits.json as training wrote it: class names (in the run's class order), the train split's
    size and the whole file (split sizes, patients, members), which restoring a model needs without
    reading the data."""
    summary = read_splits_json(workdir)
    if summary is None:
        raise FileNotFoundError(f'{os.path.join(workdir, "splits.json")} not found: train into {workdir} first')
    return {'class_names': membership.class_names(summary),
            'num_train_examples': summary['train']['num_examples'], 'splits': summary}


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint restored onto the mesh, with the model parts to run it."""
    built: state.Setup
    state: state.TrainState
    step: int
    eval_step: Callable  # `eval_step(state, uint8 images)` → logits.
    mesh: object


def restore(workdir: str, *, model: ml_collections.ConfigDict, data: ml_collections.ConfigDict, dtype: str,
            seed: int, num_classes: int, checkpoint_step: int | None = None) -> Restored:
    """Restores the params and batch statistics of a checkpoint of `workdir` (the latest by default)
    into the model of the `model` section. The model is built abstractly (initialising it would take
    14 s for VGG19, 31 s for EfficientNetV2-B3 on 2 cores, all replaced by the checkpoint) and
    without an optimiser: inference reads no optimiser state."""
    mesh = sharding.make_mesh()
    abstract_model = nnx.eval_shape(lambda: models.create(model.name, num_classes, dtype=dtype, seed=seed,
                                                          image_size=data.image_size, **model.options))
    parts, params, batch_stats = state.split_model(abstract_model)
    parts = parts.replace(rng_state=jax.tree.map(_concrete_rng, parts.rng_state))
    tx = optax.identity()
    abstract_state = jax.eval_shape(lambda: state.init_state(params, batch_stats, tx))
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_state)
    abstract = checkpoints.abstract_with_sharding(abstract_state, state_sharding)
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
    restored_state = state.TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), state_sharding.step),
                                      params=restored['params'], batch_stats=restored['batch_stats'],
                                      opt_state=tx.init(restored['params']))
    built = state.Setup(parts, tx, optax.constant_schedule(0.0), restored_state, state_sharding)
    eval_step = steps.make_inference_step(steps.logits, built, mesh, data=data, dtype=dtype)
    return Restored(built, restored_state, int(step), eval_step, mesh)


def _concrete_rng(leaf):
    """An RNG variable of the abstract model, made concrete: keys and counts that the eval graph
    (no dropout) never draws from, but nnx.merge needs as arrays."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
    return jnp.zeros(leaf.shape, leaf.dtype)


def explainer(restored: Restored, *, data: ml_collections.ConfigDict, dtype: str,
              batch_size: int) -> Callable[[Split], dict]:
    """`explain(split)`: `interpret.explain` of every image of a split, batched over the mesh, and
    `gradcam_layer`, the layer its Grad-CAM maps are taken at."""
    explain_step = steps.make_inference_step(interpret.explain, restored.built, restored.mesh, data=data,
                                             dtype=dtype)
    parts = restored.built.parts
    layer = interpret.gradcam_layer(nnx.merge(parts.eval_graph, restored.state.params,
                                              restored.state.batch_stats, parts.rng_state))

    def explain(split):
        return {**inference.map_batches(lambda images, put: explain_step(restored.state, put(images)),
                                        split, batch_size, restored.mesh), 'gradcam_layer': layer}
    return explain
