"""Training starts from converted Keras weights: a legacy EfficientNetV2B3 notop file under paper 2's model."""
from keras_reference import keras, keras_layers_of, randomize_keras_weights, write_tf_keras2_h5  # noqa: I001

import jax  # noqa: E402
import numpy as np  # noqa: E402

from allflax import models, sharding  # noqa: E402
from allflax.data.sources import synthetic  # noqa: E402
from allflax.models import keras_weights  # noqa: E402
from allflax.training import loop  # noqa: E402
from configs import efficientnetv2_b3_se  # noqa: E402

SIZE = 32


def test_b3_notop_file_initialises_b3_se_and_freezes_the_backbone_first(tmp_path, synthetic_cache):
    keras_model = keras.applications.EfficientNetV2B3(weights=None, include_top=False, include_preprocessing=False,
                                                      input_shape=(SIZE, SIZE, 3))
    randomize_keras_weights(keras_model)
    keras_file = str(tmp_path / 'efficientnetv2-b3_notop.h5')
    write_tf_keras2_h5(keras_file, keras_layers_of(keras_model))
    # What `python -m allflax.models.keras_weights --model=efficientnetv2_b3 --keras=... --output=...` does.
    backbone = models.create('efficientnetv2_b3', 0, include_top=False)
    assert keras_weights.load_keras(backbone, keras_file).missing == []
    keras_weights.save_params(backbone, str(tmp_path / 'params'), model_name='efficientnetv2_b3',
                              input_convention='imagenet_mean_std')

    config = efficientnetv2_b3_se.get_config('demo')
    with config.unlocked():
        config.data.image_size = SIZE
        config.batch_size = 4
        config.model.init_from = str(tmp_path / 'params')
        config.model.freeze_backbone_steps = 2
    mesh = sharding.make_mesh()
    built = loop.build(config, 2, 4, mesh)
    stem = keras_model.get_layer('stem_conv').weights[0].numpy()
    np.testing.assert_array_equal(built.state.params['stem_conv']['kernel'][...], stem)

    data = synthetic.load('synthetic_cnmc', num_images=8, image_size=SIZE, num_patients=4, seed=0,
                          cache_dir=synthetic_cache)
    batch = sharding.put_batch({'image': data.images[:4], 'label': data.labels[:4]}, sharding.batch_sharding(mesh))
    train_step = loop.make_train_step(config, built, mesh)
    head_before = np.asarray(built.state.params['predictions']['kernel'][...])
    state = built.state
    for _ in range(2):  # The warm-up's first learning rate is 0: the head moves in step 2.
        state, metrics = train_step(state, batch)
        assert np.isfinite(metrics['loss'])
    np.testing.assert_array_equal(state.params['stem_conv']['kernel'][...], stem)  # frozen for 2 steps
    assert not np.array_equal(state.params['predictions']['kernel'][...], head_before)
    state, _ = train_step(state, batch)
    assert not np.array_equal(np.asarray(jax.device_get(state.params['stem_conv']['kernel'][...])), stem)
