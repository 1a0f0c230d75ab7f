"""How much slower is the real training loop (Grain, device prefetch, logging) than the bare
compiled train step fed one batch already on the device? Prints one JSON line.

  python -m benchmarks.loop_overhead --config=configs/vgg19_mhsa.py:demo --steps=40

The loop is `loop.train_and_evaluate` itself, its throughput read from the images_per_sec it
logs every --log_every steps (the first interval, with compilation, left out; evaluation and
checkpoints only at the end, outside the intervals). The bare step runs as many steps in
intervals of the same length. Runs alternate, --repeats times each, for the spread.
"""
import json
import os
import tempfile

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from allflax import runtime, sharding
from allflax.data import pipeline
from allflax.training import loop
from benchmarks import common, records

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/vgg19_mhsa.py:demo.', lock_config=True)
flags.DEFINE_integer('steps', 40, 'Train steps per run, the first log interval included.')
flags.DEFINE_integer('log_every', 8, 'Steps per timed interval.')
flags.DEFINE_integer('repeats', 2, 'Runs of each, alternating.')
flags.DEFINE_string('fake_tree_dir', '/tmp/allflax_bench', 'Where the fake C-NMC tree is built once.')
flags.mark_flag_as_required('config')


def loop_images_per_second(config) -> list[float]:
    with tempfile.TemporaryDirectory() as workdir:
        loop.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            records = [json.loads(line) for line in f]
    return [record['images_per_sec'] for record in records
            if 'images_per_sec' in record and record['step'] > FLAGS.log_every]


def bare_images_per_second(config, batch, num_classes: int) -> list[float]:
    run = common.BareSteps(config, batch, num_classes).train
    intervals = FLAGS.steps // FLAGS.log_every - 1

    def interval(_):
        for _ in range(FLAGS.log_every - 1):
            run(0)
        return run(0)

    return [FLAGS.log_every * config.batch_size / time for time in common.seconds(interval, intervals)]


def main(argv):
    del argv
    runtime.initialize()
    config = common.with_data(FLAGS.config, FLAGS.fake_tree_dir)
    with config.unlocked():
        config.total_steps = FLAGS.steps
        config.log_every_steps = FLAGS.log_every
        config.eval_every_steps = config.checkpoint_every_steps = FLAGS.steps
    dataset = pipeline.load(config)
    local_batch_size = sharding.check_batch_size(config.batch_size, sharding.make_mesh())
    batch = next(iter(pipeline.train_dataset(dataset.splits['train'], local_batch_size=local_batch_size,
                                             seed=config.seed, num_workers=0)))
    loop, bare = [], []
    for _ in range(FLAGS.repeats):
        loop += loop_images_per_second(config)
        bare += bare_images_per_second(config, batch, len(dataset.class_names))
    print(json.dumps({
        'model': config.model.name, 'image_size': config.data.image_size, 'batch_size': config.batch_size,
        'data': config.data.name, 'num_workers': config.data.num_workers, 'augment': list(config.data.augment),
        'loop_images_per_s': records.summary(loop, 2), 'bare_step_images_per_s': records.summary(bare, 2),
        'slowdown': round(float(np.median(bare) / np.median(loop)), 4), **common.machine()}))


if __name__ == '__main__':
    app.run(main)
