"""ResNet: Keras parameter counts, and logit parity with Keras (ResNet101, VGG19) through load_keras."""
from keras_reference import assert_matches_keras, keras  # noqa: I001  (sets KERAS_BACKEND first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from allflax import models  # noqa: E402


@pytest.mark.parametrize('name, include_top, expected', [
    ('resnet50', True, 25_636_712),
    ('resnet101', True, 44_707_176),
    ('resnet101', False, 42_658_176),
])
def test_parameter_count_matches_keras(name, include_top, expected):
    model = nnx.eval_shape(lambda: models.create(name, 1000, include_top=include_top))
    assert models.count_params(model) == expected


def test_resnet101_logits_match_keras(tmp_path):
    # 72 wide: odd maps (9 → 5 → 3) check Keras's padding of strided convolutions and pooling.
    keras_model = keras.applications.ResNet101(weights=None, input_shape=(64, 72, 3), classes=5,
                                               classifier_activation=None)
    # Abstract: every weight comes from the Keras file, and initialising them costs more than the comparison.
    assert_matches_keras(nnx.eval_shape(lambda: models.create('resnet101', 5)), keras_model, 64, 72, tmp_path)


def test_vgg19_logits_match_keras(tmp_path):
    keras_model = keras.applications.VGG19(weights=None, include_top=True, input_shape=(64, 64, 3),
                                           classes=5, classifier_activation=None)
    assert_matches_keras(nnx.eval_shape(lambda: models.create('vgg19', 5, image_size=64)), keras_model, 64, 64,
                         tmp_path)


def test_features_feed_head():
    model = models.create('resnet50', 3)
    model.eval()
    images = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    features = model.features(images)
    assert features.shape == (1, 1, 1, 2048)
    np.testing.assert_array_equal(model.head(features), model(images))


def test_compute_and_param_dtypes():
    model = nnx.eval_shape(lambda: models.create('resnet50', 3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    model.eval()
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    features, logits = nnx.eval_shape(lambda model, images: (model.features(images), model(images)), model, images)
    assert model.conv1_conv.kernel.dtype == jnp.bfloat16
    assert features.dtype == jnp.bfloat16 and logits.dtype == jnp.float32 and logits.shape == (1, 3)
