"""Dynamic loss scaling, for training in float16.

float16 holds magnitudes from 6e-8 (subnormal) to 65,504: gradients smaller than that underflow to
zero in the backward pass. The loss is multiplied by a scale before differentiation and the
gradients divided by it after, in float32; a step whose scaled gradients overflowed (inf or NaN)
is skipped and the scale halved; after `GROWTH_INTERVAL` finite steps in a row it doubles.

The rule and its constants are PyTorch's GradScaler's, the defaults of Flax's
`flax.training.dynamic_scale.DynamicScale` too. That class is not used: its `value_and_grad`
updates the scale on every call, and a step with gradient accumulation differentiates once per
micro-batch (`lax.scan`), while the scale must change once per update, on the sum; its state has
no count of the skipped steps; it grows on the (interval + 1)-th finite step. The scale stays a
power of two, so scaling and unscaling are exact.
"""
import flax.struct
import jax
import jax.numpy as jnp

INITIAL_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5


@flax.struct.dataclass
class LossScale:
    """What a float16 run's train state holds of the scaling (checkpointed with it)."""
    scale: jax.Array  # float32: the loss is multiplied by it before differentiation.
    finite_steps: jax.Array  # int32: finite steps since the scale last changed.
    skipped_steps: jax.Array  # int32: steps skipped for non-finite gradients, in the whole run.


def initial() -> LossScale:
    return LossScale(scale=jnp.asarray(INITIAL_SCALE, jnp.float32), finite_steps=jnp.zeros((), jnp.int32),
                     skipped_steps=jnp.zeros((), jnp.int32))


def unscale(grads, loss_scale: LossScale):
    """(gradients / scale in float32, whether every one of them is finite)."""
    grads = jax.tree.map(lambda g: g.astype(jnp.float32) / loss_scale.scale, grads)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    return grads, finite


def adjust(loss_scale: LossScale, finite, *, growth_interval: int = GROWTH_INTERVAL) -> LossScale:
    """The scale after a step: halved if its gradients were not `finite` (the step is skipped),
    doubled on the `growth_interval`-th finite step in a row (below float32's largest value)."""
    finite_steps = loss_scale.finite_steps + 1
    grow = finite_steps >= growth_interval
    grown = jnp.minimum(loss_scale.scale * GROWTH_FACTOR, jnp.finfo(jnp.float32).max)
    return LossScale(
        scale=jnp.where(finite, jnp.where(grow, grown, loss_scale.scale), loss_scale.scale * BACKOFF_FACTOR),
        finite_steps=jnp.where(finite & ~grow, finite_steps, 0),
        skipped_steps=loss_scale.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32))
