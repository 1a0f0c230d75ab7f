"""Images/s of the host input pipeline (the Grain path train.py uses: tiles from the prepared
cache, shuffled and batched) with 0 and with N worker processes, and the cost per batch of
the augmentation in the compiled step. Prints one JSON line.

  python -m benchmarks.input_pipeline --config=configs/vgg19_mhsa.py --config.data.name=cnmc2019

cnmc2019 without data.dir reads a fake C-NMC tree of 600 450-px cells, built once into
--fake_tree_dir; a synthetic data.name reads the generated set.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from allflax import runtime, sharding
from allflax.data import pipeline
from benchmarks import common, records

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/vgg19_mhsa.py.', lock_config=True)
flags.DEFINE_integer('steps', 100, 'Batches timed per repeat.')
flags.DEFINE_integer('repeats', 3, 'Repeats of each measurement, for the spread.')
flags.DEFINE_list('workers', ['0', '2'], 'data.num_workers values to measure.')
flags.DEFINE_string('fake_tree_dir', '/tmp/allflax_bench', 'Where the fake C-NMC tree is built once.')
flags.mark_flag_as_required('config')


def pipeline_images_per_second(split, local_batch_size: int, seed: int, num_workers: int) -> list[float]:
    """Steady state: after the workers have started and the prefetch buffers have filled."""
    iterator = iter(pipeline.train_dataset(split, local_batch_size=local_batch_size, seed=seed,
                                           num_workers=num_workers))
    try:
        for _ in range(2 * pipeline.PREFETCH_BATCHES + num_workers):
            next(iterator)
        times = common.seconds(lambda _: [next(iterator) for _ in range(FLAGS.steps)], FLAGS.repeats)
    finally:
        iterator.close()
    return [FLAGS.steps * local_batch_size / time for time in times]


def main(argv):
    del argv
    runtime.quiet_library_logs()
    config = common.with_data(FLAGS.config, FLAGS.fake_tree_dir)
    local_batch_size = sharding.check_batch_size(config.batch_size, sharding.make_mesh())
    split = pipeline.load(config).splits['train']
    result = {'data': config.data.name, 'image_size': config.data.image_size, 'batch_size': local_batch_size,
              'train_images': len(split)}
    for workers in map(int, FLAGS.workers):
        rates = pipeline_images_per_second(split, local_batch_size, config.seed, workers)
        result[f'images_per_s_{workers}_workers'] = records.summary(rates, 0)
    batch = next(iter(pipeline.train_dataset(split, local_batch_size=local_batch_size, seed=config.seed,
                                             num_workers=0)))
    result['augment'] = list(config.data.augment)
    result['device_augment_s_per_batch'] = records.summary(
        common.device_augment_seconds(batch['image'], config, FLAGS.repeats))
    result.update(common.machine())
    print(json.dumps(result))


if __name__ == '__main__':
    app.run(main)
