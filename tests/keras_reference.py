"""Shared by the parity tests: real Keras models with every weight randomised, loaded through
`allflax.models.keras_weights.load_keras`, must give the same outputs as ours."""
import os

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

import h5py  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from allflax.models import keras_weights  # noqa: E402

# Jitted: one compile beats eager op-by-op dispatch on a 2-core machine.
forward = nnx.jit(lambda model, images: model(images))


def randomize_keras_weights(keras_model, seed: int = 0):
    """Random weights everywhere, batch-norm statistics included, so no layer can hide."""
    rng = np.random.default_rng(seed)
    for layer in keras_model.layers:
        for variable in layer.weights:
            shape = tuple(variable.shape)
            if variable.name in ('gamma', 'moving_variance'):
                value = rng.uniform(0.5, 1.5, shape)
            elif variable.name in ('beta', 'moving_mean', 'bias'):
                value = rng.normal(0.0, 0.2, shape)
            else:  # Unit gain: a depthwise (k, k, C, 1) kernel's fan-in is k·k.
                depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
                value = rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(shape[:2 if depthwise else -1]))
            variable.assign(value.astype(np.float32))


def relative_error(actual, expected) -> float:
    return float(np.linalg.norm(np.asarray(actual) - expected) / np.linalg.norm(expected))


def weighted_keras_layers(keras_model) -> list[str]:
    return [layer.name for layer in keras_model.layers if layer.weights]


def load_every_weight(model, path: str):
    """Loads the Keras file at `path` into `model`, which must take every weight from it; `model` may be
    abstract (`nnx.eval_shape`, as imagenet_params converts: initialising a large model costs more
    than the rest of a parity test), its RNG keys and counts then made concrete: inference draws
    none, but the forward pass takes them."""
    report = keras_weights.load_keras(model, path)
    assert (report.missing, report.unexpected) == ([], [])
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.RngState) and isinstance(variable.get_value(), jax.ShapeDtypeStruct):
            abstract = variable.get_value()
            variable.set_value(jax.random.key(0) if isinstance(variable, nnx.RngKey) else
                               jnp.zeros(abstract.shape, abstract.dtype))


def assert_matches_keras(model, keras_model, height: int, width: int, tmp_path):
    """Randomises `keras_model`, loads it into `model` (abstract or not) from a saved file; inference
    outputs agree."""
    randomize_keras_weights(keras_model)
    assert [name for name, _ in model.keras_layers()] == weighted_keras_layers(keras_model)
    path = str(tmp_path / 'reference.weights.h5')
    keras_model.save_weights(path)
    load_every_weight(model, path)
    images = np.random.default_rng(1).normal(size=(2, height, width, 3)).astype(np.float32)
    expected = keras_model(images, training=False).numpy()
    model.eval()
    assert relative_error(forward(model, images), expected) <= 1e-4


def tf_keras2_weight_name(layer, variable) -> str:
    """TF-Keras 2 names weights `<layer>/<weight>:0` and calls the depthwise kernel `depthwise_kernel`."""
    name = variable.name
    if isinstance(layer, keras.layers.DepthwiseConv2D) and name == 'kernel':
        name = 'depthwise_kernel'
    return f'{layer.name}/{name}:0'


def write_tf_keras2_h5(path, layers, *, full_model: bool = False):
    """`layers`: [(layer name, {weight name: array})], written as TF-Keras 2 wrote `.h5` files.

    Weights-only files (the official `*_notop.h5`) hold the layer groups at the root;
    full-model files hold them under `model_weights`.
    """
    with h5py.File(path, 'w') as file:
        root = file.create_group('model_weights') if full_model else file
        root.attrs['layer_names'] = [name.encode('utf8') for name, _ in layers]
        root.attrs['backend'] = b'tensorflow'
        root.attrs['keras_version'] = b'2.15.0'
        for layer_name, layer_weights in layers:
            group = root.create_group(layer_name)
            group.attrs['weight_names'] = [name.encode('utf8') for name in layer_weights]
            for weight_name, value in layer_weights.items():
                group.create_dataset(weight_name, data=value)


def keras_layers_of(keras_model):
    return [(layer.name, {tf_keras2_weight_name(layer, variable): variable.numpy() for variable in layer.weights})
            for layer in keras_model.layers]
