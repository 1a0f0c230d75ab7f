"""EfficientNetV2: Keras parameter counts, logit parity with Keras, train/eval behaviour."""
from keras_reference import assert_matches_keras, forward, keras, weighted_keras_layers  # noqa: I001

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from allflax import models  # noqa: E402
from allflax.models import ops  # noqa: E402

NUM_CLASSES = 5
KERAS_MODELS = {'efficientnetv2_b0': keras.applications.EfficientNetV2B0,
                'efficientnetv2_b3': keras.applications.EfficientNetV2B3}


@pytest.mark.parametrize('name, num_classes, include_top, expected', [
    ('efficientnetv2_b0', 1000, True, 7_200_312),
    ('efficientnetv2_b1', 1000, True, 8_212_124),
    ('efficientnetv2_b2', 1000, True, 10_178_374),
    ('efficientnetv2_b3', 1000, True, 14_467_622),
    ('efficientnetv2_s', 1000, True, 21_612_360),
    ('efficientnetv2_b3', 1000, False, 12_930_622),
    ('efficientnetv2_b3_se', 2, True, 15_200_928),
])
def test_parameter_count_matches_keras(name, num_classes, include_top, expected):
    model = nnx.eval_shape(lambda: models.create(name, num_classes, include_top=include_top))
    assert models.count_params(model) == expected


features = nnx.jit(lambda model, images: model.features(images))


def _keras_model(name, size, **options):
    return KERAS_MODELS[name](weights=None, include_preprocessing=False, input_shape=(size, size, 3), **options)


@pytest.fixture(scope='module')
def b0():
    return models.create('efficientnetv2_b0', NUM_CLASSES)


def test_b0_logits_match_keras(b0, tmp_path):
    keras_model = _keras_model('efficientnetv2_b0', 96, classes=NUM_CLASSES, classifier_activation=None)
    assert_matches_keras(b0, keras_model, 96, 96, tmp_path)


def test_b3_logits_match_keras_at_odd_size(tmp_path):
    """75 → 38 → 19 → 10 → 5: TF 'SAME' pads odd and even sizes differently under stride 2."""
    keras_model = _keras_model('efficientnetv2_b3', 75, classes=NUM_CLASSES, classifier_activation=None)
    # Abstract: every weight comes from the Keras file, and initialising them costs more than the comparison.
    assert_matches_keras(nnx.eval_shape(lambda: models.create('efficientnetv2_b3', NUM_CLASSES)), keras_model, 75, 75,
                         tmp_path)


def test_b3_se_has_the_keras_b3_backbone_and_a_two_class_head():
    """Built abstractly: B3's numerics are covered above, and SE's by the blocks' SE layers."""
    keras_model = _keras_model('efficientnetv2_b3', 64, include_top=False)
    model = nnx.eval_shape(lambda: models.create('efficientnetv2_b3_se', 2))
    assert [layer for layer, _ in model.keras_layers()] == weighted_keras_layers(keras_model)
    logits = nnx.eval_shape(lambda model, images: model(images), model, jnp.zeros((2, 64, 64, 3)))
    assert logits.shape == (2, 2) and logits.dtype == jnp.float32


def test_drop_connect_follows_keras_schedule():
    """Keras's rate is 0.2·b/blocks with b over B3's 32 scaled blocks but blocks = 21 unscaled."""
    model = nnx.eval_shape(lambda: models.create('efficientnetv2_b3', NUM_CLASSES))
    assert len(model.block_names) == 32
    assert not hasattr(model.block1a, 'drop')  # 40 → 16 filters: no residual
    assert model.block1b.drop.rate == pytest.approx(0.2 * 1 / 21)
    assert model.block6l.drop.rate == pytest.approx(0.2 * 31 / 21)
    assert model.block6l.drop.broadcast_dims == (1, 2, 3)  # one draw per sample


def test_eval_is_deterministic_and_train_is_stochastic(b0):
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    b0.train()
    first, second = forward(b0, images), forward(b0, images)
    assert first.shape == (2, NUM_CLASSES) and first.dtype == jnp.float32
    assert not np.allclose(first, second)  # drop-connect and head dropout draw fresh masks
    b0.eval()
    np.testing.assert_array_equal(forward(b0, images), forward(b0, images))


def test_head_of_features_is_the_forward_pass(b0):
    b0.eval()
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    feature_map = features(b0, images)
    assert feature_map.shape == (2, 2, 2, 1280)
    np.testing.assert_allclose(b0.head(feature_map), forward(b0, images), rtol=1e-5, atol=1e-6)


def test_depthwise_layers_use_the_shifted_formulation_on_cpu(b0, kernels_built):
    """The switch happens inside nnx.Conv (ops, then allflax.cpu.conv where lowered for CPU), so the kernel keeps its (k, k, 1, C) layout;
    1×1 convolutions run through oneDNN (its custom VJP) where the library is built, else as dots.
    Fresh lambdas: make_jaxpr reuses a function's trace, and the route is chosen while tracing."""
    assert b0.block4a.dwconv2.conv_general_dilated is ops.conv_general_dilated
    assert b0.block4a.dwconv2.kernel.shape == (3, 3, 1, 192)

    def primitives(layer, channels):
        """Of the program lowered for CPU: the `cpu` branch (the first) of the hook's platform_dependent."""
        jaxpr = jax.make_jaxpr(lambda x: layer(x))(jnp.ones((1, 8, 8, channels)))
        (choice,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == 'cond']
        return {eqn.primitive.name for eqn in choice.params['branches'][0].jaxpr.eqns}

    assert 'conv_general_dilated' not in primitives(b0.block4a.dwconv2, 192)
    pointwise = primitives(b0.block4a.expand_conv, 48)
    assert ('custom_vjp_call' if kernels_built else 'dot_general') in pointwise
    assert 'conv_general_dilated' not in pointwise
