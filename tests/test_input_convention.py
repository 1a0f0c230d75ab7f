"""Each backbone's input convention: allflax's input path against Keras's documented one for the same
weights, the conventions' formulas by hand, and a run's convention chosen by the weights it starts from."""
# keras_reference first: it sets KERAS_BACKEND.
from keras_reference import keras, load_every_weight, randomize_keras_weights, relative_error  # noqa: I001

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import main  # noqa: E402
from allflax import models  # noqa: E402
from allflax.data import input_convention  # noqa: E402
from allflax.data.sources import synthetic  # noqa: E402
from allflax.models import imagenet, keras_weights  # noqa: E402
from allflax.training import loop, resume_check  # noqa: E402
from configs import common, efficientnetv2_b3_se, vgg19_mhsa  # noqa: E402

SIZE = 64
# Keras's documented input path for each backbone's ImageNet weights: the family's preprocess_input
# (caffe for VGG and ResNet; the identity for EfficientNetV2, whose model holds its preprocessing).
KERAS = {
    'vgg19': (lambda: keras.applications.VGG19(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)),
              keras.applications.vgg19.preprocess_input),
    'resnet101': (lambda: keras.applications.ResNet101(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)),
                  keras.applications.resnet.preprocess_input),
    'efficientnetv2_b3': (lambda: keras.applications.EfficientNetV2B3(weights=None, include_top=False,
                                                                      include_preprocessing=True,
                                                                      input_shape=(SIZE, SIZE, 3)),
                          keras.applications.efficientnet_v2.preprocess_input),
}
features = nnx.jit(lambda model, images: model(images))


@pytest.fixture(scope='module')
def cells():
    """Two synthetic stained-cell tiles, uint8 RGB, as a run's cache holds them."""
    images = synthetic.generate('synthetic_cnmc', num_images=4, image_size=SIZE, num_patients=4, seed=0).images[:2]
    assert images.dtype == np.uint8
    return images


def run_data(model_name: str):
    """The data section of a run of `model_name` from its ImageNet weights, its convention resolved as
    training resolves it."""
    config = common.base_config(model=model_name, data='synthetic_cnmc', image_size=SIZE, batch_size=2,
                                num_epochs=1, learning_rate=1e-3)
    config.model.init_from = 'imagenet'
    return loop.resolve_input_convention(config).data


@pytest.mark.parametrize('name', list(KERAS))
def test_backbone_features_match_keras_on_its_own_input_path(name, cells, tmp_path):
    """allflax's input path (the convention the weights choose, normalize, the converted backbone) against
    Keras's `model(preprocess_input(image))`, on uint8 cell tiles, for the same random weights."""
    build, preprocess_input = KERAS[name]
    keras_model = build()
    randomize_keras_weights(keras_model)
    path = str(tmp_path / 'backbone.weights.h5')
    keras_model.save_weights(path)
    expected = keras_model(preprocess_input(cells.copy()), training=False).numpy()

    # As imagenet_params converts a notop file: an abstract backbone, every weight from the file.
    model = nnx.eval_shape(lambda: models.create(name, 1, include_top=False, image_size=SIZE))
    load_every_weight(model, path)
    model.eval()
    data = run_data(name)
    actual = features(model, input_convention.normalize(cells, data, np.float32))
    assert relative_error(actual, expected) <= 1e-4
    # The other convention is far off: the comparison tells them apart.
    other = input_convention.CAFFE if data.input_convention != input_convention.CAFFE else \
        input_convention.IMAGENET_MEAN_STD
    with data.unlocked():
        data.input_convention = other
    assert relative_error(features(model, input_convention.normalize(cells, data, np.float32)), expected) > 0.05


def test_caffe_is_bgr_minus_the_imagenet_means_by_hand():
    """One pixel, RGB (10, 20, 30): BGR (30, 20, 10) minus Keras's BGR means (103.939, 116.779, 123.68)."""
    data = common.base_config(model='vgg19', data='synthetic_cnmc', image_size=32, batch_size=1, num_epochs=1,
                              learning_rate=1e-3).data
    pixel = np.array([[[[10, 20, 30]]]], np.uint8)
    by_hand = {'caffe': [30 - 103.939, 20 - 116.779, 10 - 123.68],
               'imagenet_mean_std': [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224,
                                     (30 / 255 - 0.406) / 0.225],
               'minus_one_to_one': [10 / 128 - 1, 20 / 128 - 1, 30 / 128 - 1]}
    for name, expected in by_hand.items():
        with data.unlocked():
            data.input_convention = name
        np.testing.assert_allclose(np.asarray(input_convention.normalize(pixel, data, np.float32))[0, 0, 0],
                                   expected, rtol=1e-6, err_msg=name)
    # EfficientNetV2-S's own preprocessing layer, as Keras builds it, for the whole byte range.
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    np.testing.assert_allclose(np.asarray(input_convention.normalize(values, data, np.float32)),
                               keras.layers.Rescaling(scale=1.0 / 128.0, offset=-1)(values.astype(np.float32)),
                               atol=1e-6)


@pytest.mark.parametrize('config_module, expected', [(vgg19_mhsa, 'caffe'),
                                                     (efficientnetv2_b3_se, 'imagenet_mean_std')])
def test_init_from_imagenet_takes_the_weights_convention_into_the_run(config_module, expected):
    config = config_module.get_config('demo')
    assert config.data.input_convention == ''
    scratch = loop.resolve_input_convention(config_module.get_config('demo'))
    assert scratch.data.input_convention == 'imagenet_mean_std'  # From scratch: the default, named.
    config.model.init_from = 'imagenet'
    assert loop.resolve_input_convention(config).data.input_convention == expected
    assert json.loads(config.to_json_best_effort())['data']['input_convention'] == expected  # As config.json holds it.
    # Set to the weights' own value: accepted.
    config.data.input_convention = expected
    assert loop.resolve_input_convention(config).data.input_convention == expected


def test_a_value_that_contradicts_the_weights_is_refused_in_one_line_before_any_write(tmp_path):
    config = vgg19_mhsa.get_config('demo')
    config.model.init_from = 'imagenet'
    config.data.input_convention = 'imagenet_mean_std'
    config.data.cache_dir = str(tmp_path / 'cache')
    with pytest.raises(imagenet.InputConventionError) as refused:
        loop.train_and_evaluate(config, str(tmp_path / 'run'))
    message = str(refused.value)
    assert message == ("data.input_convention='imagenet_mean_std' contradicts model.init_from='imagenet': Keras's "
                       "vgg19 ImageNet weights were trained on 'caffe' (RGB reversed to BGR, minus the ImageNet BGR "
                       "means of 0-255 values, no scaling: Keras's \"caffe\" preprocess_input of its VGG16/VGG19/"
                       "ResNet weights); drop --config.data.input_convention or set it to 'caffe'")
    assert os.listdir(tmp_path) == []  # Neither the run nor the weights' cache.
    assert imagenet.InputConventionError in main._ONE_LINE_ERRORS  # main prints it as one line.


def test_converted_weights_record_their_convention_and_a_run_takes_it(tmp_path):
    """The sidecar of converted weights names their convention: a run from that directory takes it, refuses
    another, and where weights converted before the record name none, asks for one."""
    def converted(name, **record):
        directory = tmp_path / name
        directory.mkdir()
        (directory / keras_weights.SIDECAR).write_text(json.dumps({'format': keras_weights.SIDECAR_FORMAT,
                                                                   'model': 'vgg19', 'params': 1, **record}))
        return str(directory)

    recorded = converted('recorded', input_convention='caffe')
    assert imagenet.input_convention_of_run(recorded, 'vgg19_mhsa', '') == 'caffe'
    with pytest.raises(imagenet.InputConventionError, match=re.escape(
            f"data.input_convention='minus_one_to_one' contradicts model.init_from='{recorded}': the weights "
            f"recorded in {recorded}/allflax_params.json were trained on 'caffe'")):
        imagenet.input_convention_of_run(recorded, 'vgg19_mhsa', 'minus_one_to_one')
    old = converted('old')
    with pytest.raises(imagenet.InputConventionError, match='records no input convention .* caffe for vgg16, vgg19, '
                                                            'resnet50, resnet101; imagenet_mean_std for '
                                                            'efficientnetv2_b0'):
        imagenet.input_convention_of_run(old, 'vgg19_mhsa', '')
    assert imagenet.input_convention_of_run(old, 'vgg19_mhsa', 'caffe') == 'caffe'  # The user says which.
    with pytest.raises(imagenet.InputConventionError, match="data.input_convention='bgr' is not a convention: use "
                                                            "one of imagenet_mean_std, caffe, minus_one_to_one"):
        imagenet.input_convention_of_run('', 'vgg19_mhsa', 'bgr')
    assert imagenet.input_convention_of_run('', 'vgg19_mhsa', 'caffe') == 'caffe'  # From scratch: any, as set.


@pytest.mark.parametrize('init_from, refused', [('', False), ('imagenet', True)], ids=['scratch', 'imagenet'])
def test_a_run_from_before_the_setting_resumes_only_on_the_input_it_was_trained_on(init_from, refused, tmp_path):
    """Runs whose config.json predates data.input_convention were fed imagenet_mean_std: one from scratch
    resumes; one from Keras's VGG weights, now fed caffe, is refused rather than trained on a mix of both."""
    config = vgg19_mhsa.get_config('demo')
    config.model.init_from = init_from
    saved = json.loads(config.to_json_best_effort())
    del saved['data']['input_convention']
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    loop.resolve_input_convention(config)
    if refused:
        with pytest.raises(resume_check.ResumeMismatchError, match="data.input_convention: absent -> 'caffe'"):
            loop.check_resume(config, str(tmp_path))
    else:
        loop.check_resume(config, str(tmp_path))
