"""AdamW with linear warmup and cosine decay, the default optimiser of both recipes."""
import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(optimizer: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup over `optimizer.warmup_fraction` of the steps, then cosine decay to 0."""
    warmup_steps = max(1, int(optimizer.warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optimizer.learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1))


def make_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule,
                   pretrained_paths: frozenset[str] = frozenset(), freeze_steps: int = 0) -> optax.GradientTransformation:
    """AdamW (the `optimizer` section) after clipping the global gradient norm (VGG without batch
    norm spikes early on); pretrained variables stay frozen for `freeze_steps` steps."""
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity(),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay),
        freeze_for_steps(pretrained_paths, freeze_steps))


def variable_path(tree_path) -> str:
    """'block1_conv1/kernel' for the pytree path of a variable's value inside an nnx.State."""
    names = [str(getattr(key, 'key', getattr(key, 'name', key))) for key in tree_path]
    return '/'.join(names[:-1] if names and names[-1] == 'value' else names)


def freeze_for_steps(frozen_paths: frozenset[str], num_steps: int) -> optax.GradientTransformation:
    """Zeroes the updates of `frozen_paths` (e.g. a pretrained backbone) for the first `num_steps`
    steps, so a fresh head settles before it back-propagates into pretrained weights."""

    def update(updates, state, params=None):
        del params
        frozen_now = state.count < num_steps
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u: jnp.where(frozen_now, jnp.zeros_like(u), u)
            if variable_path(path) in frozen_paths else u, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(
        lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), update)
