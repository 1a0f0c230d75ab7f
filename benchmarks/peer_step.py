"""The train step of `benchmarks.throughput --head=gap` in a peer framework: one process, one
framework. Prints one JSON line; `benchmarks.peers` runs it once per framework and model.

  python -m benchmarks.peer_step --framework=torch --model=efficientnetv2_b3 --image_size=128

The same setting as ours: channels-last float images, batch 16, the model's convolutional
body → global average pool → one dense layer (4 classes), sigmoid focal loss (alpha 0.25,
gamma 2) on one-hot labels, AdamW (lr 1e-3, weight decay 1e-4) after clipping the global
gradient norm to 1. Random weights and data: nothing is downloaded. EfficientNetV2-B3 keeps
its drop-connect inside the blocks (0.2, as Keras and ours do); no dropout in the head.
Ours also flips and turns the batch inside its step (under 1 % of a step, RESULTS.md); peers
are given an already normalised float batch.

Keras: keras.applications VGG19 / EfficientNetV2B3 (include_top=False, no preprocessing
layers). PyTorch: torchvision's VGG19 features and timm's tf_efficientnetv2_b3 (TF "same"
padding, like Keras), channels-last. A framework that is not installed prints
{"skipped": "<the ImportError>"} and exits 0.
"""
import json
import os
import platform
import resource
import time

import numpy as np
from absl import app, flags

from benchmarks import records

FLAGS = flags.FLAGS
flags.DEFINE_enum('framework', None, ['keras-tensorflow', 'keras-jax', 'torch'], 'Peer framework.', required=True)
flags.DEFINE_enum('model', None, ['vgg19', 'efficientnetv2_b3'], 'Model, by our registry name.', required=True)
flags.DEFINE_integer('image_size', 224, 'Square input size in pixels.')
flags.DEFINE_integer('batch_size', 16, 'Images per step.')
flags.DEFINE_integer('num_classes', 4, 'Classes of the head.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                  'Compute dtype: Keras mixed_bfloat16 policy, torch CPU autocast (weights stay float32).')
flags.DEFINE_integer('steps', 10, 'Timed steps.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps first (the first one traces and compiles).')
flags.DEFINE_boolean('blocks_from_stdin', False, 'Time blocks of --steps, one per line read from stdin, until it '
                     'closes (how benchmarks.peers interleaves frameworks).')
flags.DEFINE_enum('keras_jit_compile', 'auto', ['auto', 'true', 'false'],
                  "Keras's compile(jit_compile=...). 'auto' is what a Keras user gets: XLA on JAX; on a "
                  'CPU-only TensorFlow, a tf.function graph without XLA (Keras turns XLA off there).')
flags.DEFINE_boolean('torch_compile', False, 'Wrap the PyTorch model in torch.compile (Inductor).')

# Ours (configs/common.py): focal loss, AdamW, gradient clipping.
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM, ALPHA, GAMMA = 1e-3, 1e-4, 1.0, 0.25, 2.0
DROP_CONNECT_RATE = 0.2


def keras_step():
    """A compiled Keras model and a step function that trains on one batch and returns when done."""
    os.environ['KERAS_BACKEND'] = FLAGS.framework.removeprefix('keras-')  # Read when keras is imported.
    import keras
    if FLAGS.dtype == 'bfloat16':
        keras.mixed_precision.set_global_policy('mixed_bfloat16')
    shape = (FLAGS.image_size, FLAGS.image_size, 3)
    if FLAGS.model == 'vgg19':
        body = keras.applications.VGG19(include_top=False, weights=None, input_shape=shape)
    else:
        body = keras.applications.EfficientNetV2B3(include_top=False, weights=None, include_preprocessing=False,
                                                   input_shape=shape)
    pooled = keras.layers.GlobalAveragePooling2D()(body.output)
    logits = keras.layers.Dense(FLAGS.num_classes, dtype='float32')(pooled)  # float32 logits, as ours.
    model = keras.Model(body.input, logits)
    # apply_class_balancing weighs positives by alpha, negatives by 1 - alpha, as optax's loss does.
    loss = keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=ALPHA, gamma=GAMMA,
                                                from_logits=True)
    jit_compile = {'auto': 'auto', 'true': True, 'false': False}[FLAGS.keras_jit_compile]
    model.compile(optimizer=keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                                   global_clipnorm=CLIP_NORM),
                  loss=loss, jit_compile=jit_compile)
    images, labels = batch(channels_last=True)
    images = keras.ops.convert_to_tensor(images)
    one_hot = keras.ops.convert_to_tensor(np.eye(FLAGS.num_classes, dtype=np.float32)[labels])

    # train_on_batch runs the same compiled train function as fit() and returns the loss as a
    # number, so each timed call ends when its step has (as ours, timed blocked per step).
    # Its extra cost over fit() (on JAX: handing the variables in and out) is Python work of
    # milliseconds against steps of a second; fit() has no per-step result to time.
    def step():
        return model.train_on_batch(images, one_hot)

    details = {'jit_compile': model.jit_compile, 'keras_backend': keras.backend.backend()}
    return step, details


def torch_step():
    """A PyTorch model, optimizer, and a step function that trains on one batch."""
    import torch
    import torchvision
    from torchvision.ops import sigmoid_focal_loss
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    if FLAGS.model == 'vgg19':
        model = torch.nn.Sequential(torchvision.models.vgg19(weights=None).features, torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(512, FLAGS.num_classes))
    else:
        import timm  # Its default head is GAP → linear; drop_rate is the head's dropout.
        model = timm.create_model('tf_efficientnetv2_b3', pretrained=False, num_classes=FLAGS.num_classes,
                                  drop_rate=0.0, drop_path_rate=DROP_CONNECT_RATE)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    forward = torch.compile(model) if FLAGS.torch_compile else model
    images, labels = batch(channels_last=False)
    images = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), FLAGS.num_classes).float()
    autocast = FLAGS.dtype == 'bfloat16'

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            logits = forward(images)
        # Summed over classes, averaged over examples, as ours (allflax/losses.py).
        loss = sigmoid_focal_loss(logits.float(), one_hot, alpha=ALPHA, gamma=GAMMA, reduction='sum')
        (loss / FLAGS.batch_size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        return loss.item()  # CPU ops run synchronously; .item() makes that explicit.

    details = {'torch_compile': FLAGS.torch_compile, 'torch_threads': torch.get_num_threads()}
    return step, details


def batch(channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Normalised random images (NHWC, or NCHW) and integer labels."""
    rng = np.random.default_rng(0)
    size = FLAGS.image_size
    shape = (FLAGS.batch_size, size, size, 3) if channels_last else (FLAGS.batch_size, 3, size, size)
    images = rng.standard_normal(shape, dtype=np.float32)
    return images, rng.integers(0, FLAGS.num_classes, FLAGS.batch_size).astype(np.int64)


def versions() -> dict:
    return records.installed_versions({'keras-tensorflow': ('keras', 'tensorflow', 'tensorflow-cpu'),
                                       'keras-jax': ('keras', 'jax', 'jaxlib'),
                                       'torch': ('torch', 'torchvision', 'timm')}[FLAGS.framework])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if FLAGS.warmup < 1 or FLAGS.steps < 1:
        raise app.UsageError('--warmup and --steps must be at least 1')
    header = {'framework': FLAGS.framework, 'model': FLAGS.model, 'image_size': FLAGS.image_size,
              'batch_size': FLAGS.batch_size, 'num_classes': FLAGS.num_classes, 'dtype': FLAGS.dtype}
    start = time.perf_counter()
    try:
        step, details = torch_step() if FLAGS.framework == 'torch' else keras_step()
    except ImportError as error:
        print(json.dumps({**header, 'skipped': f'{type(error).__name__}: {error}'}))
        return
    setup_seconds = time.perf_counter() - start

    def time_steps(count):
        times = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times

    warmup = time_steps(FLAGS.warmup)
    train = records.timed_steps(time_steps, FLAGS.steps, FLAGS.blocks_from_stdin)
    print(json.dumps({
        **header, 'steps': len(train), 'warmup': FLAGS.warmup,
        'train_images_per_sec': round(FLAGS.batch_size / float(np.median(train)), 2),
        'train_step_s': records.summary(train),
        'setup_seconds': round(setup_seconds, 2),
        'first_step_seconds': round(warmup[0], 2),  # Tracing and compilation, where there is any.
        'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **details, 'versions': versions(), 'python': platform.python_version(), 'cpus': os.cpu_count(),
        'load_average_1min': round(os.getloadavg()[0], 1)}))


if __name__ == '__main__':
    app.run(main)
