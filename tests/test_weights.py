"""Keras weight import (legacy `.h5` layouts, Keras 3 `.weights.h5`), Orbax params round trip, and the CLI."""
import os

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

import subprocess  # noqa: E402
import sys  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from allflax import models  # noqa: E402
from allflax.models import keras_weights  # noqa: E402
from keras_reference import keras_layers_of, randomize_keras_weights, relative_error, write_tf_keras2_h5  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


@pytest.fixture(scope='module')
def b0_notop(tmp_path_factory):
    """A randomised Keras EfficientNetV2B0 backbone and its weights in a legacy `_notop.h5` file."""
    keras_model = keras.applications.EfficientNetV2B0(weights=None, include_top=False, include_preprocessing=False,
                                                      input_shape=(SIZE, SIZE, 3))
    randomize_keras_weights(keras_model)
    path = str(tmp_path_factory.mktemp('keras') / 'efficientnetv2-b0_notop.h5')
    write_tf_keras2_h5(path, keras_layers_of(keras_model))
    return keras_model, path


@pytest.fixture(scope='module')
def b0_loaded(b0_notop):
    """Our EfficientNetV2-B0 with a 3-class head, and the report of loading the notop file into it."""
    model = models.create('efficientnetv2_b0', 3)
    return model, keras_weights.load_keras(model, b0_notop[1])


def fresh_b0():
    """Quick once `b0_loaded` has run: XLA has compiled the initialisers for these shapes."""
    return models.create('efficientnetv2_b0', 3, seed=1)


def test_legacy_notop_file_loads_backbone_and_reports_head_missing(b0_notop, b0_loaded):
    keras_model, path = b0_notop
    model, report = b0_loaded
    with h5py.File(path) as file:  # The layout under test: depthwise kernels by their TF-Keras 2 name.
        assert 'depthwise_kernel:0' in file['block4a_dwconv2/block4a_dwconv2']
    keras_model.load_weights(path)  # Keras itself reads the layout.
    assert report.missing == ['predictions'] and report.unexpected == []
    assert len(report.loaded) == len(model.keras_layers()) - 1
    images = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    model.eval()
    features = nnx.jit(lambda model, images: model.features(images))(model, images)
    assert relative_error(features, keras_model(images, training=False).numpy()) <= 1e-4


def test_keras3_file_loads_like_the_legacy_file(b0_notop, b0_loaded, tmp_path):
    """Keras 3 files name layers by class and position only; depthwise kernels are plain 'kernel'."""
    keras_model, _ = b0_notop
    path = str(tmp_path / 'b0_notop.weights.h5')
    keras_model.save_weights(path)
    model = fresh_b0()
    report = keras_weights.load_keras(model, path)
    assert report.missing == ['predictions'] and report.unexpected == []
    legacy = dict(nnx.to_flat_state(nnx.state(b0_loaded[0], (nnx.Param, nnx.BatchStat))))
    for path, variable in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        if path[0] != 'predictions':
            np.testing.assert_array_equal(variable[...], legacy[path][...], err_msg=str(path))


def test_params_round_trip_into_a_model_with_another_head(b0_loaded, tmp_path):
    source, _ = b0_loaded
    keras_weights.save_params(source, str(tmp_path / 'params'), model_name='efficientnetv2_b0',
                              input_convention='imagenet_mean_std')
    assert keras_weights.read_sidecar(str(tmp_path / 'params'))['input_convention'] == 'imagenet_mean_std'
    with pytest.raises(ValueError, match="input_convention='rgb' is not a convention: use one of imagenet_mean_std, "
                                         "caffe, minus_one_to_one"):
        keras_weights.save_params(source, str(tmp_path / 'other'), model_name='efficientnetv2_b0',
                                  input_convention='rgb')
    assert not os.path.exists(tmp_path / 'other')  # Refused before writing.
    target = models.create('efficientnetv2_b0', 4, seed=1)
    fresh_head = np.asarray(target.predictions.kernel[...])
    report = keras_weights.init_from(target, str(tmp_path / 'params'))
    assert sorted(report.missing) == sorted(report.unexpected) == ['predictions/bias', 'predictions/kernel']
    assert 'stem_bn/mean' in report.loaded and 'block6h/dwconv2/kernel' in report.loaded
    np.testing.assert_array_equal(target.predictions.kernel[...], fresh_head)
    source_state = nnx.to_flat_state(nnx.state(source, (nnx.Param, nnx.BatchStat)))
    target_state = dict(nnx.to_flat_state(nnx.state(target, (nnx.Param, nnx.BatchStat))))
    for path, variable in source_state:
        if path[0] != 'predictions':
            np.testing.assert_array_equal(target_state[path][...], variable[...], err_msg=str(path))


def test_shape_mismatch_names_the_weight_and_leaves_the_model_untouched(tmp_path):
    path = str(tmp_path / 'wrong.h5')
    write_tf_keras2_h5(path, [
        ('stem_conv', {'stem_conv/kernel:0': np.zeros((3, 3, 3, 32), np.float32)}),
        ('block4a_dwconv2', {'block4a_dwconv2/depthwise_kernel:0': np.zeros((3, 3, 8, 1), np.float32)})])
    model = fresh_b0()
    before = np.asarray(model.stem_conv.kernel[...])
    with pytest.raises(ValueError, match=r"'block4a_dwconv2' weight 'depthwise_kernel'.*"
                                         r"expects shape \(3, 3, 192, 1\), file has \(3, 3, 8, 1\)"):
        keras_weights.load_keras(model, path)
    np.testing.assert_array_equal(model.stem_conv.kernel[...], before)


def test_unexpected_layers_are_reported(tmp_path):
    path = str(tmp_path / 'full_model.h5')
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 32)).astype(np.float32)
    write_tf_keras2_h5(path, [('input_1', {}), ('stem_conv', {'stem_conv/kernel:0': kernel}),
                              ('aux_dense', {'aux_dense/kernel:0': np.zeros((4, 2), np.float32)})],
                       full_model=True)
    model = fresh_b0()
    report = keras_weights.load_keras(model, path)
    assert report.loaded == ['stem_conv'] and report.unexpected == ['aux_dense']
    assert 'top_bn' in report.missing
    np.testing.assert_array_equal(model.stem_conv.kernel[...], kernel)


def test_files_that_are_not_keras_weights_are_rejected(tmp_path):
    model = fresh_b0()
    other = str(tmp_path / 'other.h5')
    with h5py.File(other, 'w') as file:
        file['images'] = np.zeros((2, 2))
    with pytest.raises(ValueError, match='other.h5 is an HDF5 file but not a Keras weight file'):
        keras_weights.load_keras(model, other)
    text = tmp_path / 'notes_notop.h5'
    text.write_text('not hdf5')
    with pytest.raises(ValueError, match='notes_notop.h5 is not an HDF5 file'):
        keras_weights.load_keras(model, str(text))
    unrelated = str(tmp_path / 'unrelated.h5')
    write_tf_keras2_h5(unrelated, [('dense_7', {'dense_7/kernel:0': np.zeros((4, 2), np.float32)})])
    with pytest.raises(ValueError, match='no layer matches the model'):
        keras_weights.load_keras(model, unrelated)
    with pytest.raises(ValueError, match='not a params checkpoint written by save_params'):
        keras_weights.init_from(model, str(tmp_path))


def test_cli_converts_a_notop_file(tmp_path):
    keras_file = str(tmp_path / 'tiny_notop.h5')
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 64)).astype(np.float32)
    # Named as in the official VGG files, which Keras 1 wrote: `<layer>_W_1:0`, `<layer>_b_1:0`.
    write_tf_keras2_h5(keras_file, [('block1_conv1', {'block1_conv1_W_1:0': kernel,
                                                      'block1_conv1_b_1:0': np.ones(64, np.float32)})])
    output = str(tmp_path / 'params')
    result = subprocess.run(
        [sys.executable, '-m', 'allflax.models.keras_weights', '--model=vgg19', f'--keras={keras_file}', f'--output={output}',
         '--image_size=32'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # A `_notop.h5` file builds the model without its top: no fc layers are missing.
    assert 'loaded 1' in result.stdout and 'block5_conv4' in result.stdout and 'fc1' not in result.stdout
    # Recorded with them: the input convention of Keras's VGG19 ImageNet weights, the CLI's default for vgg19.
    assert keras_weights.read_sidecar(output)['input_convention'] == 'caffe'
    assert 'input convention caffe' in result.stdout
    # Every variable is restored, so an abstract model comes back whole (and without compiling initialisers).
    model = nnx.eval_shape(lambda: models.create('vgg19', 0, include_top=False, image_size=32))
    report = keras_weights.init_from(model, output)
    assert report.missing == [] and report.unexpected == []
    np.testing.assert_array_equal(model.block1_conv1.kernel[...], kernel)
