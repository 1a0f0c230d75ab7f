"""AdamW with linear warmup and cosine decay, the default optimiser of both recipes."""
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup_steps = max(1, int(config.optimizer.warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.optimizer.learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1))


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW after clipping the global gradient norm (VGG without batch norm spikes early on)."""
    opt = config.optimizer
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity(),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
