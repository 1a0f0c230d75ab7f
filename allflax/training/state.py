"""The train state and how it is built from a model: the NNX functional split, the optimiser, the
initial state placed on the mesh.

The model is split once into static graphs and its variables (NNX's functional pattern): the
compiled steps merge them, run, and return new variables, so nothing is traced twice and the
state can be donated.
"""
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from allflax import models, sharding
from allflax.models import imagenet, keras_weights
from allflax.training import loss_scale as loss_scaling, optim


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds to continue training exactly."""
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState


@flax.struct.dataclass
class ScaledTrainState(TrainState):
    """A float16 run's state: also its loss scale. A class of its own, so that the states of the
    other runs, and their checkpoints, keep the tree they had."""
    loss_scale: loss_scaling.LossScale


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


def init_state(params, batch_stats, tx: optax.GradientTransformation, dtype: str = 'float32') -> TrainState:
    """The state at step 0; with dynamic loss scaling where `dtype` is float16."""
    fields = dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params))
    if jnp.dtype(dtype) == jnp.float16:
        return ScaledTrainState(**fields, loss_scale=loss_scaling.initial())
    return TrainState(**fields)


@flax.struct.dataclass
class Setup:
    """What training and evaluation build the same way from a config."""
    parts: ModelParts
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    schedule: optax.Schedule = flax.struct.field(pytree_node=False)
    state: TrainState  # Freshly initialised, replicated over the mesh.
    state_sharding: TrainState = flax.struct.field(pytree_node=False)


def total_train_steps(*, total_steps: int, num_epochs: int, batch_size: int, num_train_examples: int) -> int:
    """`total_steps` where set (> 0), else `num_epochs` epochs of whole batches."""
    if total_steps > 0:
        return total_steps
    steps_per_epoch = num_train_examples // batch_size
    if steps_per_epoch < 1 or num_epochs < 1:
        raise ValueError(f'no training steps: {num_train_examples} train images, batch_size='
                         f'{batch_size}, num_epochs={num_epochs}; set total_steps > 0')
    return num_epochs * steps_per_epoch


def setup(model_config: ml_collections.ConfigDict, optimizer: ml_collections.ConfigDict, mesh: Mesh, *,
          num_classes: int, image_size: int, dtype: str, seed: int, total_steps: int, cache_dir: str,
          load_pretrained: bool = True, abstract: bool = False) -> Setup:
    """Builds the model (the `model` section; from `init_from` where set and `load_pretrained`),
    the optimiser (the `optimizer` section) and the initial state, placed on the mesh. `init_from`
    'imagenet' fetches and converts Keras's ImageNet weights once, into `cache_dir`. With
    `abstract`, the state's shapes, dtypes and shardings only (to compile for devices this host
    does not have)."""
    model = models.create(model_config.name, num_classes, dtype=dtype, seed=seed, image_size=image_size,
                          **model_config.options)
    pretrained_paths = frozenset()
    if model_config.init_from and load_pretrained:
        directory = imagenet.resolve_init_from(model_config.init_from, model_config.name, cache_dir)
        report = keras_weights.init_from(model, directory)
        if not report.loaded:
            raise ValueError(f'model.init_from={model_config.init_from!r} shares no weights with '
                             f'{model_config.name}: was it written for another model?')
        logging.info('Initialised from %s: %s', model_config.init_from, report)
        pretrained_paths = frozenset(report.loaded)
    parts, params, batch_stats = split_model(model)
    schedule = optim.learning_rate_schedule(optimizer, total_steps)
    tx = optim.make_optimizer(optimizer, schedule, pretrained_paths, model_config.freeze_backbone_steps)
    abstract_state = jax.eval_shape(lambda: init_state(params, batch_stats, tx, dtype))
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_state)
    if abstract:
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding)
    else:
        state = jax.jit(lambda p, b: init_state(p, b, tx, dtype), out_shardings=state_sharding)(params, batch_stats)
    return Setup(parts, tx, schedule, state, state_sharding)
