"""Sigmoid focal loss on one-hot labels (Lin et al., 2017), through optax."""
import jax
import jax.numpy as jnp
import optax


def focal_loss(logits: jax.Array, labels: jax.Array, *, alpha, gamma: float) -> jax.Array:
    """Mean over examples of the per-class sigmoid focal loss summed over classes.

    `alpha` weighs positives against negatives: a float for every class, or one
    value per class (a sequence as long as the logits' last axis). alpha[c] weighs
    class c's positives, 1 - alpha[c] its negatives (all other classes' images).
    """
    num_classes = logits.shape[-1]
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.ndim and alpha.shape != (num_classes,):
        raise ValueError(f'loss.alpha has {alpha.shape[0]} values but the model has {num_classes} classes')
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    per_class = optax.sigmoid_focal_loss(logits.astype(jnp.float32), one_hot, alpha=alpha, gamma=gamma)
    return per_class.sum(axis=-1).mean()
