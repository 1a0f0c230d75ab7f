"""The compiled steps: pure functions of (state, batch), jitted over the mesh.

Two factories: the train step, and the inference step that every other compiled function is
(eval logits, Grad-CAM explanations), each passing its body in.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from allflax import sharding
from allflax.data import augment, input_convention
from allflax.training import loss_scale as loss_scaling, losses
from allflax.training.state import Setup, TrainState


def make_train_step(built: Setup, mesh: Mesh, *, data: ml_collections.ConfigDict,
                    loss: ml_collections.ConfigDict, dtype: str, seed: int,
                    accumulation_steps: int = 1) -> Callable:
    """Returns jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.

    On device: augmentation (`data.augment`, `data.augment_params`) and normalisation
    (`data.input_convention`), the model in `dtype`, the focal loss (the `loss` section), the
    optimiser update. Augmentation and dropout keys derive from `seed` and the step.

    With `accumulation_steps` k > 1 the batch's gradient is the mean of k micro-batches' (each
    device takes every k-th of its rows), computed one after another, for a batch too large for
    the memory of the devices present: the whole batch's update without batch norm or dropout
    (tests/test_accumulation.py). Batch norm normalises by each micro-batch's statistics and
    updates its running averages once per micro-batch; dropout draws per micro-batch.

    A float16 state (`state.ScaledTrainState`) trains with dynamic loss scaling (`loss_scale`): a
    step whose gradients overflow leaves params, optimiser state (its schedule's counts included)
    and batch statistics as they were, and only halves the scale. Other states carry no scaling.
    """
    dtype = jnp.dtype(dtype)
    base_key = jax.random.key(seed)
    alpha = tuple(loss.alpha) if isinstance(loss.alpha, (tuple, list)) else loss.alpha
    parts, tx, schedule = built.parts, built.tx, built.schedule
    split_rows = NamedSharding(mesh, PartitionSpec(None, 'data'))

    def loss_fn(params, batch_stats, images, labels, dropout_key, scale):
        # Fresh variables in this trace: the forward pass updates batch statistics and
        # reseeding sets keys, and NNX refuses to mutate variables of an outer trace.
        batch_stats, rng_state = jax.tree.map(jnp.asarray, (batch_stats, parts.rng_state))
        model = nnx.merge(parts.train_graph, params, batch_stats, rng_state)
        nnx.reseed(model, default=dropout_key)
        logits = model(images)
        value = losses.focal_loss(logits, labels, alpha=alpha, gamma=loss.gamma)
        return value if scale is None else value * scale, (logits, nnx.state(model, nnx.BatchStat))

    gradient_fn = jax.value_and_grad(loss_fn, has_aux=True)

    names = tuple(data.augment)

    def model_input(images, draws):
        images = augment.apply(images, draws, names, data.augment_params)
        return input_convention.normalize(images, data, dtype)

    def whole(params, batch_stats, images, draws, labels, dropout_key, scale):
        return gradient_fn(params, batch_stats, model_input(images, draws), labels, dropout_key, scale)

    def accumulated(params, batch_stats, images, draws, labels, dropout_key, scale):
        """gradient_fn's results over the batch, as the mean over its k micro-batches, each
        augmented in its turn (with its rows of the batch's draws): the augmented batch is never
        in memory at once."""
        def micro_batches(x):  # (B, ...) -> (k, B / k, ...), micro-batch i = rows i, i + k, ...
            x = x.reshape(x.shape[0] // accumulation_steps, accumulation_steps, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, split_rows)

        def add(carry, micro):
            total_value, total_grads, batch_stats = carry
            index, micro_images, micro_draws, micro_labels = micro
            (value, (logits, batch_stats)), grads = gradient_fn(
                params, batch_stats, model_input(micro_images, micro_draws), micro_labels,
                jax.random.fold_in(dropout_key, index), scale)
            return (total_value + value, jax.tree.map(jnp.add, total_grads, grads), batch_stats), logits

        zeros = jax.tree.map(jnp.zeros_like, params)
        (value, grads, batch_stats), logits = jax.lax.scan(
            add, (jnp.zeros((), jnp.float32), zeros, batch_stats),
            (jnp.arange(accumulation_steps), micro_batches(images), jax.tree.map(micro_batches, draws),
             micro_batches(labels)))
        logits = logits.swapaxes(0, 1).reshape(-1, logits.shape[-1])  # Back in the batch's row order.
        scale = 1.0 / accumulation_steps
        return (value * scale, (logits, batch_stats)), jax.tree.map(lambda g: g * scale, grads)

    def train_step(state: TrainState, batch):
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        images = batch['image']
        draws = augment.draw(augment_key, images.shape, names, data.augment_params)
        gradients = whole if accumulation_steps == 1 else accumulated
        loss_scale = getattr(state, 'loss_scale', None)
        (value, (logits, batch_stats)), grads = gradients(state.params, state.batch_stats, images, draws,
                                                          batch['label'], dropout_key,
                                                          None if loss_scale is None else loss_scale.scale)
        if loss_scale is not None:
            value = value / loss_scale.scale  # Exact: the scale is a power of two.
            grads, applied = loss_scaling.unscale(grads, loss_scale)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {'loss': value, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}
        if loss_scale is None:
            metrics['learning_rate'] = schedule(state.step)
            # The loop stops at a non-finite step (train.py) before saving its state.
            metrics['finite'] = jnp.isfinite(value) & jnp.isfinite(optax.global_norm(grads))
            return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                 opt_state=opt_state), metrics
        # Overflowed gradients: the step changes nothing but the scale (and the step, the batch's).
        params, opt_state, batch_stats = jax.tree.map(
            lambda new, old: jnp.where(applied, new, old), (params, opt_state, batch_stats),
            (state.params, state.opt_state, state.batch_stats))
        new_scale = loss_scaling.adjust(loss_scale, applied)
        # The schedule counts the updates made: the steps less those skipped.
        metrics['learning_rate'] = schedule(state.step - loss_scale.skipped_steps)
        # A non-finite loss, or gradients that overflow float16 even unscaled (at a scale <= 1), stop the loop.
        metrics['finite'] = jnp.isfinite(value) & (applied | (loss_scale.scale > 1))
        metrics['loss_scale'], metrics['skipped_steps'] = new_scale.scale, new_scale.skipped_steps
        return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                             loss_scale=new_scale), metrics

    batch = sharding.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(built.state_sharding, batch),
                   out_shardings=(built.state_sharding, sharding.replicated(mesh)), donate_argnums=0)


def make_inference_step(body: Callable, built: Setup, mesh: Mesh, *, data: ml_collections.ConfigDict,
                        dtype: str) -> Callable:
    """Returns jitted `step(state, uint8 images) -> body(model, normalised images)`, the model in
    inference mode; every output has the batch axis first and is sharded along it."""
    dtype = jnp.dtype(dtype)
    parts = built.parts

    def step(state: TrainState, images):
        model = nnx.merge(parts.eval_graph, state.params, state.batch_stats, parts.rng_state)
        return body(model, input_convention.normalize(images, data, dtype))

    batch = sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(built.state_sharding, batch), out_shardings=batch)


def logits(model: nnx.Module, images: jax.Array) -> jax.Array:
    """The eval step's body."""
    return model(images)
