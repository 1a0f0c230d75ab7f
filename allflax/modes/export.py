"""--mode=export: a run's checkpoint as a bundle that runs without the training stack (`allflax.deploy.bundle`).

The bundled function is the eval prediction path of `--mode=predict`, whole: uint8 tiles → the
model in eval mode (batch norm on its running statistics) → the probability rule (sigmoid per
class over logits / temperature, normalised; averaged over the dihedral views with test-time
augmentation), in float32. It is traced on the models' portable path (`ops.portable_only`): a
program with allflax's CPU custom calls can be neither converted to ONNX nor exported for other
platforms. ONNX by jax2onnx, StableHLO by `jax.export`, both for any batch size; the ONNX model is
checked against the checkpoint's own JAX prediction before the bundle is written.
"""
import contextlib
import csv
import datetime
import importlib.metadata
import json
import logging as python_logging
import os
import subprocess

import cv2
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import onnxruntime
from absl import logging
from flax import nnx

from allflax.data import input_convention, pipeline, preprocess, sources, splits as data_splits
from allflax.data.dataset import default_cache_dir, Split
from allflax.deploy import bundle, model_card, predictor, quantize
from allflax.evaluation import calibration, inference, operating_point, plots
from allflax.models import ops
from allflax.training import checkpoints, restore

PLATFORMS = ('cpu', 'cuda', 'tpu')
ONNX_OPSET = 23
INTENDED_USE = ('Research on automated classification of acute lymphoblastic leukemia cell images: reproducing '
                'and improving published recipes. Not a medical device: not for diagnosis, treatment or any '
                'decision about a patient.')
OUT_OF_SCOPE_USES = (
    'Diagnosis, screening, triage, treatment or monitoring of any patient, or any clinical decision: it is not a '
    'medical device and has not been validated for clinical use.',
    'Images unlike those it was trained on: another specimen (bone marrow or peripheral blood), stain, '
    'magnification, microscope or camera, or multi-cell fields for a model trained on single-cell crops (and the '
    'reverse), without validating it there first.',
    'Cells or diseases outside its classes (other leukaemias, other leukocytes, debris): it assigns every image to '
    'one of its classes and cannot answer "none of these".',
    'Diagnosing a patient from its cells\' predictions, unless a patient-level evaluation of this bundle supports '
    'that use.',
    'Redistributing the training images, or weights learned from them, against the data set\'s terms (see the '
    'data licence).',
)
SYNTHETIC_OUT_OF_SCOPE = 'Any use on real cell images: it was trained on synthetic images only.'
LICENCE = 'Apache-2.0'
PAPERS = (
    'Maruf M, Haque MM, Paul B. Deep Learning with Self-Attention and Enhanced Preprocessing for Precise Diagnosis '
    'of Acute Lymphoblastic Leukemia from Bone Marrow Smears in Hemato-Oncology. arXiv:2508.17216, 2025. '
    '(VGG19 + MHSA, configs/vgg19_mhsa.py)',
    'Braga DC, Dantas DO. Enhanced Leukemic Cell Classification Using Attention-Based CNN and Data Augmentation. '
    'arXiv:2601.01026, 2026. (EfficientNetV2-B3 + SE, configs/efficientnetv2_b3_se.py)',
)
RELIABILITY_DIAGRAM = 'reliability.png'
# The most confident test errors the card lists, with a thumbnail of at most THUMBNAIL_SIZE pixels each.
CONFIDENT_ERRORS = 4
THUMBNAIL_SIZE = 96
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
        images = input_convention.normalize(tiles, data, jnp.float32)
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


@contextlib.contextmanager
def without_source_locations():
    """Traces without the Python file and line of each operation: they are paths on the exporting
    machine, and `jax.export` would serialise them into model.jax."""
    previous = jax.config.jax_traceback_in_locations_limit
    jax.config.update('jax_traceback_in_locations_limit', 0)
    try:
        yield
    finally:
        jax.config.update('jax_traceback_in_locations_limit', previous)


def write_onnx(probabilities, image_size: int, path: str):
    """model.onnx (+ model.onnx.data, the weights) from a portable trace of `probabilities`."""
    _quiet_converter_logs()
    from jax2onnx import to_onnx  # Here: only export converts, and the import takes seconds.
    batch = jax.export.symbolic_shape('batch')[0]
    with ops.portable_only(), without_source_locations():
        to_onnx(probabilities, [jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)],
                model_name='allflax', opset=ONNX_OPSET, return_mode='file', output_path=path,
                input_names=['image'], output_names=['probabilities'])


def write_stablehlo(probabilities, image_size: int, path: str):
    """model.jax: `jax.export` of `probabilities` for PLATFORMS, with a symbolic batch size."""
    shape = jax.export.symbolic_shape(f'batch, {image_size}, {image_size}, 3')
    with ops.portable_only(), without_source_locations():
        exported = jax.export.export(jax.jit(probabilities), platforms=PLATFORMS)(
            jax.ShapeDtypeStruct(shape, jnp.uint8))
    with open(path, 'wb') as f:
        f.write(exported.serialize())


def check_onnx(path: str, reference: np.ndarray, tiles: np.ndarray, temperature: float = 1.0) -> float:
    """max |Δp| of the ONNX model against `reference` on `tiles`; raises if beyond
    MAX_PROBABILITY_DIFFERENCE (divided by a temperature under 1: the converted model's float
    noise is in the logits, which the temperature divides) or a predicted class differs."""
    allowed = MAX_PROBABILITY_DIFFERENCE / min(1.0, temperature)
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    converted = session.run(None, {'image': tiles})[0]
    difference = float(np.abs(converted - reference).max())
    if difference > allowed or (converted.argmax(1) != reference.argmax(1)).any():
        raise RuntimeError(f'the ONNX model differs from the checkpoint: max |Δp| {difference:.3g} on '
                           f'{len(tiles)} tiles (at most {allowed:.3g} allowed at temperature {temperature:.3g}); '
                           f'no bundle written')
    return difference


def allflax_version() -> str:
    """The git commit of this checkout (`+modified` with uncommitted changes), else 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return commit + ('+modified' if dirty else '')


def data_facts(data: ml_collections.ConfigDict, splits: dict, *, seed: int) -> dict:
    """The data set: name, whether synthetic, what its images are and where they came from (its
    published facts), how split (and which fold is the test split), and per split its images,
    patients, classes."""
    named = {name: split for name, split in splits.items() if isinstance(split, dict) and 'num_examples' in split}
    return {'name': data.name, 'synthetic': data.name in sources.synthetic.CLASS_NAMES,
            'facts': sources.describe(data, seed=seed).as_dict(),
            **({'variant': data.variant} if data.name == 'all_aria' else {}),
            'split': data.split,
            'split_independence': split_independence(data.split, splits),
            'fold': None if data.fold < 0 else {'index': data.fold, 'count': data.num_folds},
            'splits': {name: {'images': split['num_examples'], 'patients': len(split.get('patients', [])),
                              'class_counts': split['class_counts']} for name, split in named.items()},
            'skipped_images': len(splits.get('skipped', []))}


def split_independence(method: str, splits: dict) -> dict:
    """Whether the run's split is patient-independent (`splits.split_independence`), from its
    splits.json: the images without patient ids that it grouped, or (runs split before grouping
    existed) its near-duplicate audit, which was written only for sets without patient ids."""
    images = sum(split['num_examples'] for split in splits.values()
                 if isinstance(split, dict) and 'num_examples' in split)
    joined = splits.get('near_duplicate_groups')
    if joined:
        return data_splits.split_independence(method, joined['images_without_patient_id'], images)
    return data_splits.split_independence(method, images if 'near_duplicates' in splits else 0, images, grouped=False)


def training_facts(workdir: str, batch_size: int) -> dict | None:
    """config.json's `derived` section (devices, micro-batches, the batch norm batch), where the run
    recorded one."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        derived = json.load(f).get('derived')
    if not derived:
        return None
    return {'batch_size': batch_size, 'devices': derived['devices'], 'micro_batches': derived['micro_batches'],
            'batch_norm_batch': derived['batch_norm_batch']}


# Where --mode=montecarlo puts iteration i of a run W, and its summary (allflax/modes/montecarlo.py).
MONTECARLO_ITERATIONS, MONTECARLO_SUMMARY = 'mc', 'montecarlo.json'
CARD_REPEATED_METRICS = ('accuracy', 'balanced_accuracy', 'f1_macro', 'roc_auc')


def repeated_runs_facts(workdir: str) -> dict | None:
    """For a workdir W/mc/<i> of a Monte Carlo run whose W/montecarlo.json exists: the iteration,
    the methods and the summary (mean, s.d., both intervals) of CARD_REPEATED_METRICS, per image and
    per patient where summarised."""
    iterations, name = os.path.split(os.path.abspath(workdir))
    run, folder = os.path.split(iterations)
    path = os.path.join(run, MONTECARLO_SUMMARY)
    if folder != MONTECARLO_ITERATIONS or not name.isdigit() or not os.path.isfile(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    if 'methods' not in summary:  # Written before the corrected interval: rerun --mode=montecarlo to update it.
        return None
    levels = {'cell_level': summary['metrics']}
    if 'patient_level' in summary['metrics']:
        levels['patient_level'] = summary['metrics']['patient_level']
    return {'iterations': summary['iterations'], 'iteration': int(name), 'methods': summary['methods'],
            'metrics': {level: {metric: values[metric] for metric in CARD_REPEATED_METRICS}
                        for level, values in levels.items()}}


def checkpoint_facts(workdir: str, step: int, named: bool) -> dict:
    """Which checkpoint is exported and why: the latest readable one, or the step named by
    --checkpoint_step; with the steps kept and the best of them by validation accuracy."""
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
    try:
        steps = sorted(checkpointer.all_steps())
        validation = {s: (checkpointer.metrics(s) or {}).get('accuracy') for s in steps}
    finally:
        checkpointer.close()
    scored = {s: accuracy for s, accuracy in validation.items() if accuracy is not None}
    best = max(scored, key=lambda s: (scored[s], s)) if scored else None
    if named:
        how = f'the step named by --checkpoint_step ({step})'
    elif steps and step != steps[-1]:
        how = f'the latest readable checkpoint (step {steps[-1]} could not be read)'
    else:
        how = 'the latest checkpoint of the run'
    return {'step': step, 'chosen': 'named' if named else 'latest', 'how': how, 'saved_steps': steps,
            'best_validation_step': best, 'validation_accuracy': scored.get(step)}


def decision_rule(evaluation: dict | None) -> dict:
    """The rule that turns probabilities into a class, which the bundle's CLI applies: a binary task's
    operating point (a threshold chosen on val, `operating_point.rule_of`) where the evaluation of
    the exported step has one, else argmax."""
    if evaluation and evaluation.get('operating_point'):
        return operating_point.rule_of(evaluation['operating_point'])
    return {'kind': 'argmax', 'description': 'the class of highest probability', 'threshold': None,
            'positive_class': None}


def shareable_path(path: str, data_dir: str) -> str:
    """`path` without the exporting machine's folders: relative to data.dir where it lies in it, else
    its base name; a path that is not absolute (an image id such as 'test/3/sha1:...') as it is."""
    if data_dir and (os.path.isabs(path) or path.startswith(data_dir)):
        root, full = os.path.abspath(data_dir), os.path.abspath(path)
        if full.startswith(root.rstrip(os.sep) + os.sep):
            return os.path.relpath(full, root)
    return os.path.basename(path) if os.path.isabs(path) else path


def without_machine_paths(tree):
    """A config's tree with every absolute path (data.dir, data.cache_dir, model.init_from...)
    reduced to its base name: a bundle is shared, its exporting machine's folders are not."""
    if isinstance(tree, dict):
        return {key: without_machine_paths(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [without_machine_paths(value) for value in tree]
    if isinstance(tree, str) and os.path.isabs(tree):
        return os.path.basename(tree.rstrip(os.sep)) or tree
    return tree


def read_test_predictions(workdir: str, class_names) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """eval/test/predictions.csv: its rows, their labels (class indices) and probabilities."""
    with open(os.path.join(workdir, 'eval', 'test', 'predictions.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    labels = np.array([class_names.index(row['label']) for row in rows], np.int64)
    probabilities = np.array([[float(row[name]) for name in class_names] for row in rows], np.float64)
    return rows, labels, probabilities


def _test_tiles(config: ml_collections.ConfigDict, indices: list[int], workdir: str) -> tuple[list | None, str]:
    """The test split's tiles at `indices` (the run's recorded test members), where they may be shown
    and are at hand: the synthetic sets' own images, read from their cache. Real images stay out of
    the bundle: most sets' terms forbid redistributing them."""
    data = config.data
    if data.name not in sources.synthetic.CLASS_NAMES:
        return None, ('none: the images of a real data set are not copied into a bundle (its terms may forbid '
                      'redistributing them); find them by their ids')
    cached = sources.synthetic.cache_path(data.name, num_images=data.num_images, image_size=data.image_size,
                                          num_patients=data.num_patients, seed=config.seed,
                                          cache_dir=default_cache_dir(config))
    if not os.path.exists(cached):
        return None, 'none: the generated images were not in their cache at export'
    test = pipeline.load(config, recorded=restore.run_summary(workdir)['splits'], run=workdir, needed=['test'],
                         action='export').splits['test']  # RGB: data.preprocess applies to real sets only.
    return [np.asarray(test.images[i]) for i in indices], 'the test tiles as the model saw them (synthetic images)'


def confident_errors(config: ml_collections.ConfigDict, rows: list[dict], labels: np.ndarray,
                     probabilities: np.ndarray, class_names, folder: str, workdir: str) -> dict:
    """The CONFIDENT_ERRORS test images predicted wrong with the highest probability: ids,
    classes, probability, and a thumbnail in `folder` where `_test_tiles` allows."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    chosen = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind='stable')][:CONFIDENT_ERRORS]
    tiles, thumbnails = _test_tiles(config, [int(rows[i]['index']) for i in chosen], workdir) if len(chosen) \
        else (None, '')
    shown = []
    for rank, i in enumerate(chosen):
        thumbnail = None
        if tiles is not None:
            thumbnail = f'error_{rank + 1}.png'
            tile = tiles[rank]
            scale = min(1.0, THUMBNAIL_SIZE / max(tile.shape[:2]))
            small = cv2.resize(tile, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else tile
            cv2.imwrite(os.path.join(folder, thumbnail), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        shown.append({'image_id': shareable_path(rows[i]['image_id'], config.data.dir),
                      'patient': rows[i]['patient'], 'label': class_names[labels[i]],
                      'predicted': class_names[predicted[i]],
                      'probability': float(probabilities[i, predicted[i]]), 'thumbnail': thumbnail})
    return {'errors': int(len(wrong)), 'images': int(len(labels)), 'shown': shown,
            'thumbnails': thumbnails or 'none: no errors'}


def reliability_diagram(labels: np.ndarray, probabilities: np.ndarray, temperature: float, folder: str) -> dict:
    """RELIABILITY_DIAGRAM in `folder`: the reliability of the test split's probabilities, as the
    bundle gives them (`plots.plot_calibration`)."""
    name = 'probabilities' + (f', T = {temperature:.2f}' if temperature != 1.0 else '')
    plots.plot_calibration(labels, {name: probabilities}, os.path.join(folder, RELIABILITY_DIAGRAM))
    return {'file': RELIABILITY_DIAGRAM, 'split': 'test', 'from': 'eval/test/predictions.csv',
            'temperature': float(temperature), 'bins': calibration.NUM_BINS}


def input_convention_source(init_from: str) -> str:
    """What chose the run's input convention, for the bundle's metadata and card ("chosen by ...")."""
    if init_from == 'imagenet':
        return 'the Keras ImageNet weights the run started from (model.init_from=imagenet)'
    if init_from:
        return (f'the record of the weights the run started from (model.init_from='
                f'{os.path.basename(os.path.normpath(init_from))})')
    return 'data.input_convention of a run trained from scratch (imagenet_mean_std unless set)'


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
            if k not in ('patient_level', 'small_classes', 'calibration', 'tta', 'checkpoint_step', 'operating_point',
                         'split_independence', 'input_convention')}
    calibration_values = {'ece': values['ece'], **values.get('calibration', {})}
    facts = {'split': 'test', 'checkpoint_step': checkpoint_step, 'test_time_augmentation': values.get('tta', False),
             'cell_level': cell, 'patient_level': values.get('patient_level'), 'calibration': calibration_values}
    for optional in ('small_classes', 'operating_point'):
        if values.get(optional) is not None:
            facts[optional] = values[optional]
    return facts


def int8_format(config: ml_collections.ConfigDict, workdir: str, onnx_path: str, folder: str,
                splits: dict) -> dict:
    """Writes `quantize.INT8` beside `onnx_path`, calibrated on the run's recorded training tiles, and
    returns metadata.json's `formats.onnx_int8`: what it changed on the recorded test split against
    the float32 model (`quantize.compare`, which refuses a change of accuracy of half a point)."""
    loaded = pipeline.load(config, recorded=splits, run=workdir, needed=['train', 'test'], action='export').splits
    calibration = quantize.calibration_tiles(loaded['train'].images, config.seed)
    quantize.quantize(onnx_path, calibration, os.path.join(folder, quantize.INT8))
    test = loaded['test']
    probabilities = {}
    for name, path in (('float32', onnx_path), ('int8', os.path.join(folder, quantize.INT8))):
        session = onnxruntime.InferenceSession(path, predictor.session_options(onnxruntime),
                                               providers=['CPUExecutionProvider'])
        tiles = np.asarray(test.images)
        probabilities[name] = np.concatenate(
            [session.run(None, {'image': tiles[i:i + 32]})[0] for i in range(0, len(tiles), 32)]
            or [np.zeros((0, 1), np.float32)])
    return {'file': quantize.INT8, 'quantization': quantize.DESCRIPTION.format(tiles=len(calibration)),
            'test': quantize.compare(np.asarray(test.labels), probabilities['float32'], probabilities['int8'])}


def export(config: ml_collections.ConfigDict, workdir: str, output: str, *, checkpoint_step: int | None = None,
           int8: bool = False) -> dict:
    """Writes the bundle of a checkpoint of `workdir` (the latest by default) to `output`, whole or
    not at all; returns a summary (files and sizes, the checked max |Δp|). With `int8`, the bundle
    also holds an int8 copy of its ONNX model, which its predictor runs by default (`int8_format`)."""
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
        difference = check_onnx(onnx_path, reference, tiles, temperature)
        int8_model = int8_format(config, workdir, onnx_path, folder, run['splits']) if int8 else None

        evaluation = evaluation_facts(workdir, restored.step)
        if evaluation is not None and os.path.exists(os.path.join(workdir, 'eval', 'test', 'predictions.csv')):
            rows, labels, test_probabilities = read_test_predictions(workdir, list(class_names))
            evaluation['reliability_diagram'] = reliability_diagram(labels, test_probabilities, temperature, folder)
            evaluation['confident_errors'] = confident_errors(config, rows, labels, test_probabilities,
                                                             list(class_names), folder, workdir)
        data = data_facts(config.data, run['splits'], seed=config.seed)
        metadata = {
            'schema_version': bundle.SCHEMA_VERSION,
            'model': config.model.name,
            'intended_use': INTENDED_USE,
            'out_of_scope_uses': [*([SYNTHETIC_OUT_OF_SCOPE] if data['synthetic'] else []), *OUT_OF_SCOPE_USES],
            'licence': {'code': f'{LICENCE} (allflax: LICENSE in its repository)',
                        'weights': (f'learned from {data["name"]}, whose terms are: {data["facts"]["licence"]}; '
                                    'the code\'s licence does not waive them')},
            'citation': {'software': 'allflax: CITATION.cff in its repository', 'papers': list(PAPERS),
                         'data': data['facts']['citation']},
            'classes': list(class_names),
            'input': {'name': 'image', 'shape': ['batch', size, size, 3], 'layout': 'NHWC', 'dtype': 'uint8',
                      'value_range': [0, 255], 'size': size, 'channels': 3,
                      'color': 'CIELAB (OpenCV 8-bit)' if 'lab' in config.data.preprocess else 'RGB'},
            'output': {'name': 'probabilities', 'shape': ['batch', len(class_names)], 'dtype': 'float32',
                       'meaning': 'class probabilities, each row summing to 1'},
            'preprocessing': {
                'read': preprocess.READ_IMAGE,
                'steps': preprocess.describe(config.data.preprocess, size),
                'normalization': {**input_convention.of(config.data).describe(),
                                  'chosen_by': input_convention_source(config.model.init_from), 'applied_by': 'model'}},
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
            'decision_rule': decision_rule(evaluation),
            'source': {'workdir': os.path.basename(os.path.abspath(workdir)), 'checkpoint_step': restored.step,
                       'exported': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                       'paths': 'base names (or relative to data.dir) only: the exporting machine\'s folders '
                                'are left out'},
            'checkpoint': checkpoint_facts(workdir, restored.step, named=checkpoint_step is not None),
            'formats': {
                'onnx': {'file': bundle.ONNX, 'opset': ONNX_OPSET,
                         'external_data': bundle.ONNX + '.data' if os.path.exists(onnx_path + '.data') else None,
                         'converter': f'jax2onnx {importlib.metadata.version("jax2onnx")}'},
                'stablehlo': {'file': bundle.STABLEHLO, 'platforms': list(PLATFORMS), 'batch': 'symbolic'},
                **({'onnx_int8': int8_model} if int8_model else {})},
            'verification': {'onnx_vs_checkpoint_max_abs_probability_difference': difference,
                             'tiles': f'{CHECK_TILES} uniformly random uint8 tiles'},
            'config': without_machine_paths(json.loads(config.to_json_best_effort())),
            'data': data,
            'evaluation': evaluation,
            **{key: value for key, value in (('training', training_facts(workdir, config.batch_size)),
                                             ('repeated_runs', repeated_runs_facts(workdir))) if value is not None},
            'versions': {'allflax': allflax_version(), 'jax': jax.__version__, 'flax': flax.__version__,
                         'jax2onnx': importlib.metadata.version('jax2onnx'),
                         'onnx': importlib.metadata.version('onnx'), 'onnx_opset': ONNX_OPSET},
        }
        bundle.finish(folder, metadata, model_card.render(metadata))
        sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
    return {'output': output, 'checkpoint_step': restored.step, 'bytes': sizes,
            'onnx_max_abs_probability_difference': difference,
            **({'int8_test': int8_model['test']} if int8_model else {})}
