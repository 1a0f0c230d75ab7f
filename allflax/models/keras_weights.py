"""Pretrained weights: Keras HDF5 import, and Orbax parameter checkpoints to start training from.

`load_keras` copies a Keras weight file into a model through its `keras_layers()`:
Keras 3 `.weights.h5` files, and the legacy `.h5` files of the official ImageNet
weights, as TF-Keras 2 (or, for VGG, Keras 1) wrote them. `save_params` keeps the
result as an Orbax checkpoint and `init_from` restores it into a model whose head
may differ. The sidecar records the input convention the weights were trained on
(`--input_convention`; by default that of Keras's ImageNet weights for the model).

  python -m allflax.models.keras_weights --model=resnet101 \\
      --keras=resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5 --output=weights/resnet101
"""
import dataclasses
import json
import os
import re

import h5py
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx, traverse_util

from allflax import models
from allflax.data import input_convention as conventions
from allflax.models import weight_files

SIDECAR = 'allflax_params.json'
SIDECAR_FORMAT = 'allflax.params/1'
STATE_DIR = 'state'
# Keras 3 names a layer's group after its class, numbered in model order: `conv2d_12`.
_KERAS3_GROUP = re.compile(r'(?P<cls>.+?)(?:_(?P<index>\d+))?')
# Axis permutations between Keras and NNX layouts (each its own inverse): Keras stores a
# depthwise kernel as (k, k, C, 1), NNX's grouped convolution as (k, k, 1, C).
_KERAS_AXES = {'depthwise_kernel': (0, 1, 3, 2)}
# Keras 1 (still the official VGG16/VGG19 files) names weights `<layer>_W_1:0`, `<layer>_b_1:0`.
_KERAS1_WEIGHT = re.compile(r'(?P<layer>.+)_(?P<weight>W|b)(?:_\d+)?')
_KERAS1_NAMES = {'W': 'kernel', 'b': 'bias'}


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load copied, by Keras layer name (`load_keras`) or variable path (`init_from`).

    `missing`: in the model but not in the source, so left as initialised (e.g. a new head).
    `unexpected`: in the source but not used by the model.
    """
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]

    def __str__(self) -> str:
        lines = [f'loaded {len(self.loaded)}']
        for label, names in (('missing (left as initialised)', self.missing),
                             ('unexpected (ignored)', self.unexpected)):
            if names:
                lines.append(f'{label}: {", ".join(names)}')
        return '\n'.join(lines)


def load_keras(model: nnx.Module, path: str) -> LoadReport:
    """Copies a Keras HDF5 weight file into `model` in place, matching `model.keras_layers()`.

    Every shape is checked before anything is copied, so a failed load leaves the
    model untouched. Values are cast to each variable's dtype.
    """
    model_layers = model.keras_layers()
    stored = _read_keras_file(path, model_layers)
    assignments, loaded, missing = [], [], []
    for layer_name, module in model_layers:
        if layer_name not in stored:
            missing.append(layer_name)
            continue
        _, expected = _keras_weights(module)
        found = stored[layer_name]
        if 'depthwise_kernel' in expected and 'kernel' in found:  # Keras 3's name for it.
            found = {'depthwise_kernel' if name == 'kernel' else name: array for name, array in found.items()}
        if set(found) != set(expected):
            raise ValueError(f'{path}: layer {layer_name!r} holds weights {sorted(found)}, '
                             f'the model expects {list(expected)}')
        for weight_name, variable in expected.items():
            axes = _KERAS_AXES.get(weight_name, tuple(range(len(variable.shape))))
            keras_shape = tuple(variable.shape[axis] for axis in axes)
            if found[weight_name].shape != keras_shape:
                raise ValueError(f'{path}: layer {layer_name!r} weight {weight_name!r}: model expects shape '
                                 f'{keras_shape}, file has {found[weight_name].shape}')
            assignments.append((variable, np.transpose(found[weight_name], axes)))
        loaded.append(layer_name)
    model_names = {name for name, _ in model_layers}
    unexpected = [name for name in stored if name not in model_names]
    if not loaded:
        raise ValueError(f'{path}: no layer matches the model: the file holds {_preview(stored)}, '
                         f'the model expects {_preview(model_names)}')
    for variable, array in assignments:
        variable.set_value(jnp.asarray(array, dtype=variable.dtype))
    return LoadReport(loaded, missing, unexpected)


def _keras_weights(module: nnx.Module) -> tuple[str, dict[str, nnx.Variable]]:
    """The Keras layer class (snake case) and its weights by name, in Keras's storage order."""
    if isinstance(module, nnx.Conv):
        if 1 < module.feature_group_count == module.in_features:
            return 'depthwise_conv2d', _present({'depthwise_kernel': module.kernel, 'bias': module.bias})
        return 'conv2d', _present({'kernel': module.kernel, 'bias': module.bias})
    if isinstance(module, nnx.Linear):
        return 'dense', _present({'kernel': module.kernel, 'bias': module.bias})
    if isinstance(module, nnx.BatchNorm):
        return 'batch_normalization', _present({'gamma': module.scale, 'beta': module.bias,
                                                'moving_mean': module.mean, 'moving_variance': module.var})
    raise TypeError(f'no Keras weight mapping for {type(module).__name__}')


def _present(weights: dict) -> dict:
    return {name: variable for name, variable in weights.items() if variable is not None}


def _read_keras_file(path: str, model_layers) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {weight name: array}} for every layer of the file that holds weights."""
    expected = ('a Keras weight file (Keras 3 .weights.h5, or a legacy .h5 with a '
                '"model_weights" group or a "layer_names" attribute)')
    try:
        file = h5py.File(path, 'r')
    except OSError as error:
        raise ValueError(f'{path} is not an HDF5 file ({error}); expected {expected}') from None
    with file:
        if 'layers' in file and 'vars' in file:
            return _read_keras3(path, file['layers'], model_layers)
        group = file['model_weights'] if 'model_weights' in file else file
        if _string_list(group, 'layer_names'):
            return _read_legacy(path, group)
        raise ValueError(f'{path} is an HDF5 file but not {expected}; '
                         f'it holds {_preview(file.keys())} and attributes {_preview(file.attrs.keys())}')


def _read_keras3(path: str, layers: h5py.Group, model_layers) -> dict[str, dict[str, np.ndarray]]:
    """Keras 3 stores no layer names: the i-th layer of each class is the model's i-th of that class.

    Groups are `layers/<class>[_<i>]/vars/<j>`, numbered in the model's (functional)
    layer order and, within a layer, in the order `_keras_weights` lists.
    """
    by_class = {}
    for group_name, group in layers.items():
        if 'layers' in group:
            raise ValueError(f'{path}: layer {group_name!r} is a nested model, which cannot be matched '
                             f'by name; save the weights of the inner model itself')
        values = [np.asarray(group['vars'][str(i)]) for i in range(len(group.get('vars', ())))]
        if values:
            match = _KERAS3_GROUP.fullmatch(group_name)
            by_class.setdefault(match['cls'], []).append((int(match['index'] or 0), group_name, values))
    for entries in by_class.values():
        entries.sort()
    stored = {}
    for layer_name, module in model_layers:
        keras_class, expected = _keras_weights(module)
        if by_class.get(keras_class):
            _, _, values = by_class[keras_class].pop(0)
            # A count mismatch keeps the stored positions, for load_keras to report.
            names = list(expected) if len(values) == len(expected) else [f'vars/{i}' for i in range(len(values))]
            stored[layer_name] = dict(zip(names, values))
    for entries in by_class.values():
        stored.update((group_name, {f'vars/{i}': value for i, value in enumerate(values)})
                      for _, group_name, values in entries)
    return stored


def _read_legacy(path: str, group: h5py.Group) -> dict[str, dict[str, np.ndarray]]:
    """TF-Keras 2 layout: `<layer>/<layer>/kernel:0` datasets listed by `weight_names`.

    A weight's layer is the last scope of its name, so the layers of a nested
    model (stored as one group) keep their own names.
    """
    stored = {}
    for group_name in _string_list(group, 'layer_names'):
        layer_group = group[group_name]
        for full_name in _string_list(layer_group, 'weight_names'):
            scope, _, weight = full_name.rpartition('/')
            layer_name, weight_name = scope.rpartition('/')[2], weight.split(':')[0]
            keras1 = None if scope else _KERAS1_WEIGHT.fullmatch(weight_name)
            if keras1:
                layer_name, weight_name = keras1['layer'], _KERAS1_NAMES[keras1['weight']]
            layer_name = layer_name or group_name
            weights = stored.setdefault(layer_name, {})
            if weight_name in weights:
                raise ValueError(f'{path}: weight {weight_name!r} of layer {layer_name!r} is stored twice')
            weights[weight_name] = np.asarray(layer_group[full_name])
    return stored


def _string_list(group: h5py.Group, name: str) -> list[str]:
    """An attribute of strings, which Keras splits into `name0`, `name1`, ... when large."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks = []
        while f'{name}{len(chunks)}' in group.attrs:
            chunks.append(group.attrs[f'{name}{len(chunks)}'])
    return [item.decode('utf8') if isinstance(item, bytes) else str(item) for chunk in chunks for item in chunk]


def _preview(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f' and {len(names) - limit} more' if len(names) > limit else ''
    return f'[{", ".join(names[:limit])}{more}]' if names else 'nothing'


def save_params(model: nnx.Module, directory: str, *, model_name: str, input_convention: str):
    """Writes params and batch statistics as an Orbax checkpoint, plus a sidecar naming the model and
    the input convention its weights were trained on (allflax.data.input_convention)."""
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, SIDECAR)):
        raise FileExistsError(f'{directory} already holds saved params; choose a new directory')
    if input_convention not in conventions.NAMES:
        raise ValueError(f'input_convention={input_convention!r} is not a convention: use one of '
                         f'{", ".join(conventions.NAMES)}')
    state = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, STATE_DIR), state)
    # Written last: its presence means the checkpoint is complete.
    with open(os.path.join(directory, SIDECAR), 'w') as f:
        json.dump({'format': SIDECAR_FORMAT, 'model': model_name, 'params': models.count_params(model),
                   'input_convention': input_convention}, f, indent=2)


def read_sidecar(directory: str) -> dict:
    """The sidecar `save_params` wrote in `directory` (format checked); its `input_convention` is
    absent in params converted before allflax recorded it."""
    sidecar_path = os.path.join(os.path.abspath(directory), SIDECAR)
    try:
        with open(sidecar_path) as f:
            sidecar = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f'{os.path.abspath(directory)} is not a params checkpoint written by save_params '
                         f'(cannot read {SIDECAR}: {error})') from None
    if not isinstance(sidecar, dict) or sidecar.get('format') != SIDECAR_FORMAT:
        found = sidecar.get('format') if isinstance(sidecar, dict) else sidecar
        raise ValueError(f'{sidecar_path}: format {found!r}, expected {SIDECAR_FORMAT!r}')
    return sidecar


def init_from(model: nnx.Module, directory: str) -> LoadReport:
    """Restores into `model` every variable whose path and shape match those `save_params` wrote.

    The rest (e.g. a head for another number of classes) keeps its fresh
    initialisation and is reported missing; the checkpoint's unused entries are
    reported unexpected.
    """
    directory = os.path.abspath(directory)
    read_sidecar(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = traverse_util.flatten_dict(checkpointer.restore(os.path.join(directory, STATE_DIR)), sep='/')
    variables = {'/'.join(map(str, path)): node for path, node in nnx.iter_graph(model)
                 if isinstance(node, (nnx.Param, nnx.BatchStat))}
    loaded = [path for path, variable in variables.items()
              if path in stored and stored[path].shape == variable.shape]
    for path in loaded:
        variables[path].set_value(jnp.asarray(stored[path], dtype=variables[path].dtype))
    loaded_paths = set(loaded)
    return LoadReport(loaded, missing=[path for path in variables if path not in loaded_paths],
                      unexpected=[path for path in stored if path not in loaded_paths])


def _define_flags():
    flags.DEFINE_string('model', None, 'Registered model name.', required=True)
    flags.DEFINE_string('keras', None, 'Keras weight file (.weights.h5 or legacy .h5).', required=True)
    flags.DEFINE_string('output', None, 'New directory for the Orbax params checkpoint.', required=True)
    flags.DEFINE_boolean('include_top', None, 'Build the classifier head (default: false for *_notop.h5 files).')
    flags.DEFINE_integer('num_classes', 1000, 'Classes of the head.')
    flags.DEFINE_integer('image_size', 224, 'Input size the model is built for.')
    flags.DEFINE_enum('input_convention', None, list(conventions.NAMES),
                      'The input convention the weights were trained on, recorded with them (default: that of '
                      'Keras\'s ImageNet weights for the model, allflax.models.weight_files.KERAS_WEIGHTS).')


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    options = flags.FLAGS
    include_top = options.include_top
    if include_top is None:
        include_top = not options.keras.endswith('_notop.h5')
    convention = options.input_convention
    if convention is None:
        try:
            convention = weight_files.KERAS_WEIGHTS[weight_files.backbone_of(options.model)].input_convention
        except ValueError:
            raise app.UsageError(f'--model={options.model} has no Keras ImageNet weights whose input convention '
                                 f'allflax knows: pass --input_convention ({", ".join(conventions.NAMES)}), the '
                                 f'one the weights in {options.keras} were trained on') from None
    model = models.create(options.model, options.num_classes, include_top=include_top,
                          image_size=options.image_size)
    print(load_keras(model, options.keras))
    save_params(model, options.output, model_name=options.model, input_convention=convention)
    print(f'saved {models.count_params(model):,} weights of {options.model} to {options.output}, recorded as '
          f'trained on input convention {convention}')


if __name__ == '__main__':
    _define_flags()
    app.run(_main)
