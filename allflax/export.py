"""--mode=export: a run's checkpoint as a bundle that runs without the training stack (`allflax.bundle`).

The bundled function is the eval prediction path of `--mode=predict`, whole: uint8 tiles → the
model in eval mode (batch norm on its running statistics) → the probability rule (sigmoid per
class over logits / temperature, normalised; averaged over the dihedral views with test-time
augmentation), in float32. It is traced on the models' portable path (`ops.portable_only`): a
program with allflax's CPU custom calls can be neither converted to ONNX nor exported for other
platforms. ONNX by jax2onnx, StableHLO by `jax.export`, both for any batch size; the ONNX model is
checked against the checkpoint's own JAX prediction before the bundle is written.
"""
import datetime
import importlib.metadata
import json
import logging as python_logging
import os
import subprocess

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from allflax import bundle, model_card
from allflax.data import augment, preprocess, sources
from allflax.data.dataset import Split
from allflax.evaluation import calibration, inference
from allflax.models import ops
from allflax.training import restore

PLATFORMS = ('cpu', 'cuda', 'tpu')
ONNX_OPSET = 23
INTENDED_USE = ('Research on automated classification of acute lymphoblastic leukemia cell images: reproducing '
                'and improving published recipes. Not a medical device: not for diagnosis, treatment or any '
                'decision about a patient.')
# Against the checkpoint's JAX prediction, on tiles drawn for the check.
MAX_PROBABILITY_DIFFERENCE = 1e-4
CHECK_TILES = 8


def probability_function(restored: restore.Restored, *, data: ml_collections.ConfigDict, temperature: float,
                         tta: bool):
    """`probabilities(uint8 tiles (N, size, size, 3)) -> (N, classes) float32`: the eval path of
    `--mode=predict` (`inference.predict_logits`, then `calibration.probabilities`) as one function."""
    parts = restored.built.parts
    params, batch_stats = jax.device_get((restored.state.params, restored.state.batch_stats))

    def probabilities(tiles):
        model = nnx.merge(parts.eval_graph, params, batch_stats, parts.rng_state)
        images = augment.normalize(tiles, data.mean, data.std, jnp.float32)
        views = inference.dihedral_views(images) if tta else [images]
        # The views as one batch: one model in the program, not eight (eval mode: per image). Stacked, not
        # concatenated: jax2onnx 0.17.1 gives a concatenation of symbolic batches the first one's size.
        logits = model(jnp.stack(views).reshape(-1, *images.shape[1:])).astype(jnp.float32)
        scores = jax.nn.sigmoid(logits / jnp.float32(temperature))
        scores = (scores / scores.sum(axis=-1, keepdims=True)).reshape(len(views), -1, scores.shape[-1])
        return scores.mean(axis=0)

    return probabilities


def _quiet_converter_logs():
    """jax2onnx logs the example plugins it cannot import and onnx_ir each untyped constant: neither
    concerns the export."""
    for name in ('jax2onnx', 'onnx_ir'):
        python_logging.getLogger(name).setLevel(python_logging.ERROR)


def write_onnx(probabilities, image_size: int, path: str):
    """model.onnx (+ model.onnx.data, the weights) from a portable trace of `probabilities`."""
    _quiet_converter_logs()
    from jax2onnx import to_onnx  # Here: only export converts, and the import takes seconds.
    batch = jax.export.symbolic_shape('batch')[0]
    with ops.portable_only():
        to_onnx(probabilities, [jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)],
                model_name='allflax', opset=ONNX_OPSET, return_mode='file', output_path=path,
                input_names=['image'], output_names=['probabilities'])


def write_stablehlo(probabilities, image_size: int, path: str):
    """model.jax: `jax.export` of `probabilities` for PLATFORMS, with a symbolic batch size."""
    shape = jax.export.symbolic_shape(f'batch, {image_size}, {image_size}, 3')
    with ops.portable_only():
        exported = jax.export.export(jax.jit(probabilities), platforms=PLATFORMS)(
            jax.ShapeDtypeStruct(shape, jnp.uint8))
    with open(path, 'wb') as f:
        f.write(exported.serialize())


def check_onnx(path: str, reference: np.ndarray, tiles: np.ndarray) -> float:
    """max |Δp| of the ONNX model against `reference` on `tiles`; raises if beyond
    MAX_PROBABILITY_DIFFERENCE or a predicted class differs."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    converted = session.run(None, {'image': tiles})[0]
    difference = float(np.abs(converted - reference).max())
    if difference > MAX_PROBABILITY_DIFFERENCE or (converted.argmax(1) != reference.argmax(1)).any():
        raise RuntimeError(f'the ONNX model differs from the checkpoint: max |Δp| {difference:.3g} on '
                           f'{len(tiles)} tiles (at most {MAX_PROBABILITY_DIFFERENCE} allowed); no bundle written')
    return difference


def allflax_version() -> str:
    """The git commit of this checkout (`+modified` with uncommitted changes), else 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return commit + ('+modified' if dirty else '')


def data_facts(data: ml_collections.ConfigDict, splits: dict) -> dict:
    """The data set: name, whether synthetic, how split, and per split its images, patients, classes."""
    named = {name: split for name, split in splits.items() if isinstance(split, dict) and 'num_examples' in split}
    return {'name': data.name, 'synthetic': data.name in sources.synthetic.CLASS_NAMES,
            'split': data.split if data.fold < 0 else f'{data.split} (fold {data.fold} of {data.num_folds})',
            'splits': {name: {'images': split['num_examples'], 'patients': len(split.get('patients', [])),
                              'class_counts': split['class_counts']} for name, split in named.items()},
            'skipped_images': len(splits.get('skipped', []))}


def evaluation_facts(workdir: str, checkpoint_step: int) -> dict | None:
    """eval/test/metrics.json, where --mode=eval (or training's end) wrote it for this checkpoint."""
    path = os.path.join(workdir, 'eval', 'test', 'metrics.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        values = json.load(f)
    if values.get('checkpoint_step') != checkpoint_step:
        logging.warning('%s is of step %s, not the exported %d: the bundle records no test metrics',
                        path, values.get('checkpoint_step'), checkpoint_step)
        return None
    cell = {k: v for k, v in values.items()
            if k not in ('patient_level', 'small_classes', 'calibration', 'tta', 'checkpoint_step')}
    calibration_values = {'ece': values['ece'], **values.get('calibration', {})}
    return {'split': 'test', 'checkpoint_step': checkpoint_step, 'test_time_augmentation': values.get('tta', False),
            'cell_level': cell, 'patient_level': values.get('patient_level'), 'calibration': calibration_values,
            **({'small_classes': values['small_classes']} if 'small_classes' in values else {})}


def export(config: ml_collections.ConfigDict, workdir: str, output: str, *, checkpoint_step: int | None = None) -> dict:
    """Writes the bundle of a checkpoint of `workdir` (the latest by default) to `output`, whole or
    not at all; returns a summary (files and sizes, the checked max |Δp|)."""
    with bundle.writing(output, workdir) as folder:
        run = restore.run_summary(workdir)
        class_names = run['class_names']
        restored = restore.restore(workdir, model=config.model, data=config.data,
                                   dtype='float32', seed=config.seed, num_classes=len(class_names),
                                   checkpoint_step=checkpoint_step)
        temperature = calibration.saved_temperature(workdir, restored.step, scaling=config.eval.temperature_scaling)
        size = config.data.image_size
        probabilities = probability_function(restored, data=config.data, temperature=temperature,
                                             tta=config.eval.tta)
        onnx_path = os.path.join(folder, bundle.ONNX)
        write_onnx(probabilities, size, onnx_path)
        write_stablehlo(probabilities, size, os.path.join(folder, bundle.STABLEHLO))

        tiles = np.random.default_rng(config.seed).integers(0, 256, (CHECK_TILES, size, size, 3), np.uint8)
        split = Split(tiles, np.zeros(len(tiles), np.int32), np.full(len(tiles), '', str))
        reference = calibration.probabilities(
            inference.predict_logits(restored.eval_step, restored.state, split, CHECK_TILES, restored.mesh,
                                     tta=config.eval.tta), temperature)
        difference = check_onnx(onnx_path, reference, tiles)

        metadata = {
            'schema_version': bundle.SCHEMA_VERSION,
            'model': config.model.name,
            'intended_use': INTENDED_USE,
            'classes': list(class_names),
            'input': {'name': 'image', 'shape': ['batch', size, size, 3], 'layout': 'NHWC', 'dtype': 'uint8',
                      'value_range': [0, 255], 'size': size, 'channels': 3,
                      'color': 'CIELAB (OpenCV 8-bit)' if 'lab' in config.data.preprocess else 'RGB'},
            'output': {'name': 'probabilities', 'shape': ['batch', len(class_names)], 'dtype': 'float32',
                       'meaning': 'class probabilities, each row summing to 1'},
            'preprocessing': {
                'read': preprocess.READ_IMAGE,
                'steps': preprocess.describe(config.data.preprocess, size),
                'normalization': {'mean': list(config.data.mean), 'std': list(config.data.std),
                                  'formula': '(x / 255 - mean) / std per RGB channel, in float32',
                                  'applied_by': 'model'}},
            'probability_rule': {
                'description': ('sigmoid of each class logit / temperature, normalised to sum to 1 (the models are '
                                'trained with a sigmoid focal loss)'
                                + ('; averaged over the 8 dihedral views of the tile' if config.eval.tta else '')
                                + '.'),
                'temperature': float(temperature),
                'temperature_source': ('eval/temperature.json, fitted on the validation split'
                                       if config.eval.temperature_scaling and temperature != 1.0 else
                                       'none (1.0): eval.temperature_scaling off or not fitted for this step'),
                'test_time_augmentation': bool(config.eval.tta), 'compute_dtype': 'float32'},
            'source': {'workdir': os.path.abspath(workdir), 'checkpoint_step': restored.step,
                       'exported': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')},
            'formats': {
                'onnx': {'file': bundle.ONNX, 'opset': ONNX_OPSET,
                         'external_data': bundle.ONNX + '.data' if os.path.exists(onnx_path + '.data') else None,
                         'converter': f'jax2onnx {importlib.metadata.version("jax2onnx")}'},
                'stablehlo': {'file': bundle.STABLEHLO, 'platforms': list(PLATFORMS), 'batch': 'symbolic'}},
            'verification': {'onnx_vs_checkpoint_max_abs_probability_difference': difference,
                             'tiles': f'{CHECK_TILES} uniformly random uint8 tiles'},
            'config': json.loads(config.to_json_best_effort()),
            'data': data_facts(config.data, run['splits']),
            'evaluation': evaluation_facts(workdir, restored.step),
            'versions': {'allflax': allflax_version(), 'jax': jax.__version__, 'flax': flax.__version__,
                         'jax2onnx': importlib.metadata.version('jax2onnx'),
                         'onnx': importlib.metadata.version('onnx'), 'onnx_opset': ONNX_OPSET},
        }
        bundle.finish(folder, metadata, model_card.render(metadata))
        sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
    return {'output': output, 'checkpoint_step': restored.step, 'bytes': sizes,
            'onnx_max_abs_probability_difference': difference}
