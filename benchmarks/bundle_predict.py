"""Images/s of a bundle in ONNX Runtime against --mode=predict's JAX path, on the same tiles, at
batch 1 and batch 32. Prints one JSON line.

  python -m benchmarks.bundle_predict --workdir=runs/vgg19_mhsa_demo --bundle=bundles/demo [--images=128]

The tiles are the run's test split (already preprocessed: both paths share that code). Each path
is loaded once (restore and compile, session creation: reported apart), warmed up on one batch,
then predicts all the tiles; runs alternate, --repeats times each: the best (fastest) run, for a
shared machine, with the median and the slowest. The bundle's model is run as its predictor runs
it (`bundle.Predictor`); with --no_spinning, also with ONNX Runtime's threads resting between
operations; a bundle exported with --int8 also runs its int8 model, with its test accuracy and
|Δp| against the float32 model. Also the bundle's accuracy on the whole test split, beside the one
in the run's eval/test/metrics.json.
"""
import json
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import ConfigDict

from allflax import runtime
from allflax.data import pipeline
from allflax.data.dataset import Split
from allflax.deploy import bundle, predictor
from allflax.evaluation import calibration, inference
from allflax.training import restore
from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A trained run (its config.json and checkpoints).')
flags.DEFINE_string('bundle', None, 'Its bundle (python main.py --mode=export).')
flags.DEFINE_integer('images', 128, 'Test tiles predicted per run.')
flags.DEFINE_list('batch_sizes', ['1', '32'], 'Batch sizes to measure.')
flags.DEFINE_integer('repeats', 3, 'Runs of each path at each batch size, alternating.')
flags.DEFINE_bool('no_spinning', True, "Also the bundle's model with ONNX Runtime's threads not spinning "
                  'between operations (session.intra_op.allow_spinning=0).')
flags.mark_flags_as_required(['workdir', 'bundle'])


def main(argv):
    del argv
    runtime.initialize()
    with open(os.path.join(FLAGS.workdir, 'config.json')) as f:
        config = ConfigDict(json.load(f))
    test = pipeline.load(config, recorded=restore.run_summary(FLAGS.workdir)['splits'], run=FLAGS.workdir,
                         needed=['test'], action='benchmark').splits['test']
    tiles = test.images[:FLAGS.images]

    start = time.perf_counter()
    restored = restore.restore(FLAGS.workdir, model=config.model, data=config.data, dtype=config.dtype,
                               seed=config.seed, num_classes=len(restore.run_summary(FLAGS.workdir)['class_names']))
    temperature = calibration.saved_temperature(FLAGS.workdir, restored.step, scaling=config.eval.temperature_scaling)
    load = {'jax_restore_s': time.perf_counter() - start}
    start = time.perf_counter()
    bundled = bundle.Predictor(FLAGS.bundle)
    load['onnx_session_s'] = time.perf_counter() - start

    def jax_predict(images, batch_size):
        split = Split(images, np.zeros(len(images), np.int32), np.full(len(images), '', str))
        return calibration.probabilities(inference.predict_logits(
            restored.eval_step, restored.state, split, batch_size, restored.mesh, tta=config.eval.tta), temperature)

    paths = {'jax_predict': jax_predict, 'bundle_onnx': lambda images, b: bundled.probabilities(images, b)}
    import onnxruntime
    if FLAGS.no_spinning:
        resting = bundle.Predictor(FLAGS.bundle)
        options = predictor.session_options(onnxruntime)
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        resting.session = onnxruntime.InferenceSession(os.path.join(FLAGS.bundle, bundle.ONNX), options,
                                                       providers=['CPUExecutionProvider'])
        paths['bundle_onnx_no_spinning'] = lambda images, b: resting.probabilities(images, b)
    if 'onnx_int8' in bundled.metadata['formats']:  # Exported with --int8: its float32 model beside it.
        int8 = bundled
        bundled = bundle.Predictor(FLAGS.bundle, precision='float32')
        paths['bundle_onnx'] = lambda images, b: bundled.probabilities(images, b)
        paths['bundle_int8'] = lambda images, b: int8.probabilities(images, b)
    results = {}
    for batch_size in map(int, FLAGS.batch_sizes):
        for predict in paths.values():
            predict(tiles[:batch_size], batch_size)  # Compile (JAX) or plan (ONNX Runtime) this batch size.
        rates = {name: [] for name in paths}
        for _ in range(FLAGS.repeats):
            for name, predict in paths.items():
                start = time.perf_counter()
                predict(tiles, batch_size)
                rates[name].append(len(tiles) / (time.perf_counter() - start))
        results[f'batch_{batch_size}'] = {
            name: {'best_images_per_s': round(max(r), 1), 'median': round(float(np.median(r)), 1),
                   'slowest': round(min(r), 1)} for name, r in rates.items()}
        for name in paths:
            if name != 'jax_predict':
                results[f'batch_{batch_size}'][f'{name}_over_jax'] = round(max(rates[name]) /
                                                                           max(rates['jax_predict']), 2)
    with open(os.path.join(FLAGS.workdir, 'eval', 'test', 'metrics.json')) as f:
        evaluated = json.load(f)
    float32 = bundled.probabilities(test.images)
    accuracy = {'test_images': len(test), 'evaluated_step': evaluated['checkpoint_step'],
                'bundle_step': bundled.metadata['source']['checkpoint_step'],
                'eval_accuracy': evaluated['accuracy'],
                'bundle_accuracy': float(np.mean(float32.argmax(1) == test.labels))}
    if 'bundle_int8' in paths:
        quantized = int8.probabilities(test.images)
        accuracy.update(int8_accuracy=float(np.mean(quantized.argmax(1) == test.labels)),
                        int8_max_abs_dp=float(np.abs(quantized - float32).max()),
                        int8_mean_abs_dp=float(np.abs(quantized - float32).mean()),
                        int8_same_class=float(np.mean(quantized.argmax(1) == float32.argmax(1))))
        accuracy['int8_change_points'] = round(100 * (accuracy['int8_accuracy'] - accuracy['bundle_accuracy']), 2)
    print(json.dumps({'model': config.model.name, 'accuracy': accuracy, 'image_size': config.data.image_size,
                      'tta': config.eval.tta, 'images': len(tiles), 'repeats': FLAGS.repeats, **results,
                      **{k: round(v, 1) for k, v in load.items()}, 'machine': common.machine()}))


if __name__ == '__main__':
    app.run(main)
