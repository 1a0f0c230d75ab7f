"""The compiled train and eval steps: pure functions of (state, batch), jitted over the mesh.

The model is split once into a static graph and its variables (NNX's functional
pattern): the step merges them, runs, and returns new variables, so nothing is
traced twice and the state can be donated.
"""
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from allflax import losses, models, optim, sharding, weights
from allflax.data import augment
from allflax.models import cpu_conv


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds to continue training exactly."""
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState


@flax.struct.dataclass
class ModelParts:
    """The model as jit sees it: static graphs for each mode and the non-trained state.

    Dropout keys are re-derived from the seed and the step inside the train step,
    so the RNG state never needs checkpointing.
    """
    train_graph: nnx.GraphDef = flax.struct.field(pytree_node=False)
    eval_graph: nnx.GraphDef = flax.struct.field(pytree_node=False)
    rng_state: nnx.State


def split_model(model: nnx.Module) -> tuple[ModelParts, nnx.State, nnx.State]:
    """Returns (parts, params, batch_stats) of a freshly built model."""
    model.train()
    train_graph, params, batch_stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graph, *_ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return ModelParts(train_graph, eval_graph, rng_state), params, batch_stats


def init_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ml_collections.ConfigDict, mesh: Mesh, state_sharding) -> Callable:
    """Returns jitted `train_step(state, batch) -> (state, metrics)`; the state is donated."""
    dtype = jnp.dtype(config.dtype)
    base_key = jax.random.key(config.seed)
    alpha = tuple(config.loss.alpha) if isinstance(config.loss.alpha, (tuple, list)) else config.loss.alpha

    def train_step(state: TrainState, batch):
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        images = augment.augment(batch['image'], augment_key, tuple(config.data.augment), config.data.augment_params)
        images = augment.normalize(images, config.data.mean, config.data.std, dtype)

        def loss_fn(params):
            # Fresh variables in this trace: the forward pass updates batch statistics and
            # reseeding sets keys, and NNX refuses to mutate variables of an outer trace.
            batch_stats, rng_state = jax.tree.map(jnp.asarray, (state.batch_stats, parts.rng_state))
            model = nnx.merge(parts.train_graph, params, batch_stats, rng_state)
            nnx.reseed(model, default=dropout_key)
            logits = model(images)
            loss = losses.focal_loss(logits, batch['label'], alpha=alpha, gamma=config.loss.gamma)
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {'loss': loss,
                   'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
                   'learning_rate': schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    batch = sharding.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(state_sharding, batch),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(parts: ModelParts, config: ml_collections.ConfigDict, mesh: Mesh,
                   state_sharding) -> Callable:
    """Returns jitted `eval_step(state, images) -> logits` in inference mode."""
    dtype = jnp.dtype(config.dtype)

    def eval_step(state: TrainState, images):
        model = nnx.merge(parts.eval_graph, state.params, state.batch_stats, parts.rng_state)
        return model(augment.normalize(images, config.data.mean, config.data.std, dtype))

    batch = sharding.batch_sharding(mesh)
    return jax.jit(eval_step, in_shardings=(state_sharding, batch), out_shardings=batch)


def probabilities(logits) -> jax.Array:
    """Class probabilities from sigmoid-trained logits: each class's sigmoid, normalised to sum to 1."""
    scores = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
    return scores / scores.sum(axis=-1, keepdims=True)


@flax.struct.dataclass
class Setup:
    """What training and evaluation build the same way from a config."""
    parts: ModelParts
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    schedule: optax.Schedule = flax.struct.field(pytree_node=False)
    state: TrainState  # Freshly initialised, replicated over the mesh.
    state_sharding: TrainState = flax.struct.field(pytree_node=False)


def total_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    if config.total_steps > 0:
        return config.total_steps
    steps_per_epoch = num_train_examples // config.batch_size
    if steps_per_epoch < 1 or config.num_epochs < 1:
        raise ValueError(f'no training steps: {num_train_examples} train images, batch_size='
                         f'{config.batch_size}, num_epochs={config.num_epochs}; set total_steps > 0')
    return config.num_epochs * steps_per_epoch


def setup(config: ml_collections.ConfigDict, num_classes: int, total_steps: int, mesh: Mesh, *,
          load_pretrained: bool = True) -> Setup:
    """Builds the model (from `model.init_from` where set and `load_pretrained`), the optimiser
    and the initial state, placed on the mesh."""
    if jnp.dtype(config.dtype) == jnp.bfloat16 and cpu_conv.bfloat16_computes_in_float32():
        logging.warning('dtype=bfloat16 on a CPU without bfloat16 arithmetic: convolutions compute in float32 and the '
                        'step is no faster than float32 (use --config.dtype=float32 here; bfloat16 pays on CPUs '
                        'with AVX-512, GPUs and TPUs)')
    model = models.create(config.model.name, num_classes, dtype=config.dtype, seed=config.seed,
                          image_size=config.data.image_size, **config.model.options)
    pretrained_paths = frozenset()
    if config.model.init_from and load_pretrained:
        report = weights.init_from(model, config.model.init_from)
        if not report.loaded:
            raise ValueError(f'model.init_from={config.model.init_from!r} shares no weights with '
                             f'{config.model.name}: was it written for another model?')
        logging.info('Initialised from %s: %s', config.model.init_from, report)
        pretrained_paths = frozenset(report.loaded)
    parts, params, batch_stats = split_model(model)
    schedule = optim.learning_rate_schedule(config, total_steps)
    tx = optim.make_optimizer(config, schedule, pretrained_paths)
    abstract = jax.eval_shape(lambda: init_state(params, batch_stats, tx))
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    state = jax.jit(lambda p, b: init_state(p, b, tx), out_shardings=state_sharding)(params, batch_stats)
    return Setup(parts, tx, schedule, state, state_sharding)
