import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from allflax import models


def test_keras_parameter_counts():
    # Keras count_params() with top and 1000 classes at 224 px.
    for name, expected in [('vgg16', 138_357_544), ('vgg19', 143_667_240)]:
        assert models.count_params(nnx.eval_shape(lambda: models.create(name, 1000))) == expected
    assert models.count_params(nnx.eval_shape(
        lambda: models.create('vgg19', 0, include_top=False))) == 20_024_384


def test_vgg19_mhsa_shapes_and_count():
    model = nnx.eval_shape(lambda: models.create('vgg19_mhsa', 4, image_size=64))
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    logits = nnx.eval_shape(lambda model, images: model(images), model, images)
    assert logits.shape == (2, 4) and logits.dtype == jnp.float32
    tokens, width, heads_hidden = 2 * 2, 512, 256
    attention = tokens * width + 2 * width + 4 * (width * width + width)  # position, LayerNorm, q/k/v/out
    head = width * heads_hidden + heads_hidden + heads_hidden * 4 + 4
    assert models.count_params(model) == 20_024_384 + attention + head


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    model = models.create('vgg19_mhsa', 4, image_size=32)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    forward = nnx.jit(lambda model, images: model(images))  # One program, not one per op.
    train_outputs = forward(model, images), forward(model, images)
    assert not np.allclose(*train_outputs)
    model.eval()
    np.testing.assert_array_equal(forward(model, images), forward(model, images))


def test_bfloat16_compute_keeps_float32_params():
    model = nnx.eval_shape(lambda: models.create('vgg19_mhsa', 4, image_size=32, dtype='bfloat16'))
    assert model.block1_conv1.kernel.value.dtype == jnp.float32
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    logits = nnx.eval_shape(lambda model, images: model(images), model, images)
    assert logits.dtype == jnp.float32


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match='divisible by 32'):
        models.create('vgg19', 4, image_size=100)
    with pytest.raises(ValueError, match='attention_after'):
        models.create('vgg19_mhsa', 4, image_size=64, attention_after='block9_pool')
    with pytest.raises(ValueError, match='unknown model name'):
        models.create('vgg20', 4)
