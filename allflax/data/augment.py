"""Augmentation and normalisation inside the compiled step: uint8 tiles go to the device as they are."""
import jax
import jax.numpy as jnp

AUGMENTATIONS = ('flip', 'rot90')


def augment(images: jax.Array, key: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """Random dihedral transforms per image (cells have no up or left): `flip` mirrors,
    `rot90` also transposes, which with the flips gives all eight symmetries of a square."""
    unknown = set(names) - set(AUGMENTATIONS)
    if unknown:
        raise ValueError(f'unknown data.augment {sorted(unknown)}; known: {", ".join(AUGMENTATIONS)}')
    flip_rows, flip_cols, transpose = jax.random.bernoulli(key, 0.5, (3, images.shape[0], 1, 1, 1))
    if 'rot90' in names:
        if images.shape[1] != images.shape[2]:
            raise ValueError(f'rot90 needs square images, got {images.shape[1]}×{images.shape[2]}')
        images = jnp.where(transpose, images.transpose(0, 2, 1, 3), images)
    if 'flip' in names or 'rot90' in names:
        images = jnp.where(flip_rows, images[:, ::-1], images)
        images = jnp.where(flip_cols, images[:, :, ::-1], images)
    return images


def normalize(images: jax.Array, mean, std, dtype) -> jax.Array:
    """uint8 RGB → (x/255 − mean)/std in the compute dtype."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
