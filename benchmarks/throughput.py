"""How fast is the model itself? Times the compiled train step `main.py` runs (base config:
flip + rot90 on device, focal loss, AdamW) and the eval step, on one in-memory uint8 batch
already on the device, after warm-up. Prints one JSON line.

  python -m benchmarks.throughput --model=efficientnetv2_b3 --image_size=128 --batch_size=16 --head=gap

--head=gap gives every model the head the peer frameworks' benchmarks get: global average
pooling → one dense layer (no hidden layer, no dropout, no attention). flops_per_image is XLA's
cost analysis of the train step (forward, backward, update) over the batch size, with every
convolution counted as a direct one (`ops.portable_only`): the nominal FLOPs, whichever kernels run.
memory is the device allocator's peak and limit in bytes (None where the device keeps no
statistics, as on the CPU). With --dtype=float16 the step scales its loss (`:gpu,t4`):
skipped_steps of train_steps_run overflowed and changed nothing but the scale.
"""
import json
import resource

import jax
import numpy as np
from absl import app, flags

from allflax import runtime
from allflax.cpu import memory
from benchmarks import common, records
from configs import common as configs_common

FLAGS = flags.FLAGS
flags.DEFINE_string('model', None, 'Registered model name.', required=True)
flags.DEFINE_integer('image_size', 224, 'Square input size in pixels.')
flags.DEFINE_integer('batch_size', 16, 'Images per step.')
flags.DEFINE_enum('head', 'model', ['model', 'gap'], "'model': the registered model's own head; 'gap': GAP → dense.")
flags.DEFINE_integer('num_classes', 4, 'Classes of the head.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                  'Compute dtype (parameters stay float32; float16 with dynamic loss scaling).')
flags.DEFINE_integer('steps', 10, 'Timed steps of each kind.')
flags.DEFINE_boolean('blocks_from_stdin', False, 'Time the train step in blocks of --steps, one per line read from '
                     'stdin, until it closes (how benchmarks.peers interleaves frameworks); then the eval step.')

# Model options that make each family's head GAP → dense (name prefix: options).
GAP_HEAD = {
    'vgg': dict(head='gap', head_hidden=0, dropout_rate=0.0, attention_after=None),
    'efficientnetv2': dict(se_ratio=0.0, head_hidden=0, dropout_rate=0.0),
}


def make_config():
    config = configs_common.base_config(model=FLAGS.model, data='synthetic_all4', image_size=FLAGS.image_size,
                                        batch_size=FLAGS.batch_size, num_epochs=1, learning_rate=1e-3)
    config.total_steps = FLAGS.steps + 2
    config.dtype = FLAGS.dtype
    if FLAGS.head == 'gap':
        family = next((prefix for prefix in GAP_HEAD if FLAGS.model.startswith(prefix)), None)
        if family is None:
            raise app.UsageError(f'--head=gap is defined for {", ".join(GAP_HEAD)} models, not {FLAGS.model}')
        config.model.options.update(GAP_HEAD[family])
    return config


def device_memory() -> dict | None:
    """Peak bytes in use and the limit of the first device's allocator, as far as it reports them."""
    stats = jax.devices()[0].memory_stats()
    return {key: stats[key] for key in ('peak_bytes_in_use', 'bytes_limit') if key in stats} if stats else None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    memory.keep_freed_memory()  # As main.py does.
    runtime.quiet_library_logs()  # No persistent compile cache: compile_seconds stays a real compile.
    config = make_config()
    rng = np.random.default_rng(0)
    size, batch_size = FLAGS.image_size, FLAGS.batch_size
    batch = {'image': rng.integers(0, 256, (batch_size, size, size, 3), np.uint8),
             'label': rng.integers(0, FLAGS.num_classes, batch_size).astype(np.int32)}
    bare = common.BareSteps(config, batch, FLAGS.num_classes)
    train = records.timed_steps(lambda steps: common.seconds(bare.train, steps), FLAGS.steps, FLAGS.blocks_from_stdin)
    evaluation = common.seconds(bare.eval, FLAGS.steps)
    train_images_per_sec = batch_size / float(np.median(train))
    flops_per_image = bare.train_flops / batch_size
    loss_scale = getattr(bare.state, 'loss_scale', None)
    print(json.dumps({
        'model': FLAGS.model, 'image_size': size, 'batch_size': batch_size, 'head': FLAGS.head,
        'num_classes': FLAGS.num_classes, 'dtype': FLAGS.dtype, 'steps': len(train),
        'train_images_per_sec': round(train_images_per_sec, 2),
        'eval_images_per_sec': round(batch_size / float(np.median(evaluation)), 2),
        'train_step_s': records.summary(train), 'eval_step_s': records.summary(evaluation),
        'compile_seconds': round(bare.compile_seconds, 2),
        'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        'flops_per_image': round(flops_per_image),
        'achieved_gflops': round(flops_per_image * train_images_per_sec / 1e9, 2), 'memory': device_memory(),
        'train_steps_run': int(bare.state.step),
        'skipped_steps': None if loss_scale is None else int(loss_scale.skipped_steps),
        'loss_scale': None if loss_scale is None else float(loss_scale.scale),
        **common.machine()}))


if __name__ == '__main__':
    app.run(main)
