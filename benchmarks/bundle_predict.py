"""Images/s of a bundle in ONNX Runtime against --mode=predict's JAX path, on the same tiles, at
batch 1 and batch 32. Prints one JSON line.

  python -m benchmarks.bundle_predict --workdir=runs/vgg19_mhsa_demo --bundle=bundles/demo [--images=128]

The tiles are the run's test split (already preprocessed: both paths share that code). Each path
is loaded once (restore and compile, session creation: reported apart), warmed up on one batch,
then predicts all the tiles; runs alternate, --repeats times each, for the spread. Also the
bundle's accuracy on the whole test split, beside the one in the run's eval/test/metrics.json.
"""
import json
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import ConfigDict

from allflax import bundle, runtime
from allflax.data import pipeline
from allflax.data.dataset import Split
from allflax.evaluation import calibration, inference
from allflax.training import restore
from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A trained run (its config.json and checkpoints).')
flags.DEFINE_string('bundle', None, 'Its bundle (python main.py --mode=export).')
flags.DEFINE_integer('images', 128, 'Test tiles predicted per run.')
flags.DEFINE_list('batch_sizes', ['1', '32'], 'Batch sizes to measure.')
flags.DEFINE_integer('repeats', 3, 'Runs of each path at each batch size, alternating.')
flags.mark_flags_as_required(['workdir', 'bundle'])


def main(argv):
    del argv
    runtime.initialize()
    with open(os.path.join(FLAGS.workdir, 'config.json')) as f:
        config = ConfigDict(json.load(f))
    test = pipeline.load(config).splits['test']
    tiles = test.images[:FLAGS.images]

    start = time.perf_counter()
    restored = restore.restore(FLAGS.workdir, model=config.model, data=config.data, dtype=config.dtype,
                               seed=config.seed, num_classes=len(restore.run_summary(FLAGS.workdir)['class_names']))
    temperature = calibration.saved_temperature(FLAGS.workdir, restored.step, scaling=config.eval.temperature_scaling)
    load = {'jax_restore_s': time.perf_counter() - start}
    start = time.perf_counter()
    predictor = bundle.Predictor(FLAGS.bundle)
    load['onnx_session_s'] = time.perf_counter() - start

    def jax_predict(images, batch_size):
        split = Split(images, np.zeros(len(images), np.int32), np.full(len(images), '', str))
        return calibration.probabilities(inference.predict_logits(
            restored.eval_step, restored.state, split, batch_size, restored.mesh, tta=config.eval.tta), temperature)

    paths = {'jax_predict': jax_predict, 'bundle_onnx': lambda images, b: predictor.probabilities(images, b)}
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
            name: {'images_per_s': round(float(np.median(r)), 1), 'min': round(min(r), 1), 'max': round(max(r), 1)}
            for name, r in rates.items()}
        results[f'batch_{batch_size}']['bundle_over_jax'] = round(
            results[f'batch_{batch_size}']['bundle_onnx']['images_per_s'] /
            results[f'batch_{batch_size}']['jax_predict']['images_per_s'], 2)
    with open(os.path.join(FLAGS.workdir, 'eval', 'test', 'metrics.json')) as f:
        evaluated = json.load(f)
    accuracy = {'test_images': len(test), 'evaluated_step': evaluated['checkpoint_step'],
                'bundle_step': predictor.metadata['source']['checkpoint_step'],
                'eval_accuracy': evaluated['accuracy'],
                'bundle_accuracy': float(np.mean(predictor.probabilities(test.images).argmax(1) == test.labels))}
    print(json.dumps({'model': config.model.name, 'accuracy': accuracy, 'image_size': config.data.image_size, 'tta': config.eval.tta,
                      'images': len(tiles), 'repeats': FLAGS.repeats, **results,
                      **{k: round(v, 1) for k, v in load.items()}, 'machine': common.machine()}))


if __name__ == '__main__':
    app.run(main)
