"""Runs the first 3 train steps of a tiny recipe (argv: cache dir, config module, the schedule's
total steps) on however many devices JAX sees; prints JSON.

Used by test_sharding.py in subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""
import importlib
import json
import sys

import jax
import numpy as np

from allflax import runtime, sharding
from allflax.data.sources import synthetic
from allflax.training import loop


def main(cache_dir: str, config_name: str, total_steps: str):
    runtime.use_compilation_cache()  # The test session's (tests/conftest.py), as main.py uses it.
    config = importlib.import_module(f'configs.{config_name}').get_config('demo')
    with config.unlocked():
        config.data.image_size = 32
        config.batch_size = 8
        config.total_steps = int(total_steps)
    data = synthetic.load(config.data.name, num_images=24, image_size=32, num_patients=8, seed=0,
                          cache_dir=cache_dir)
    mesh = sharding.make_mesh()
    built = loop.build(config, len(data.class_names), config.total_steps, mesh)
    train_step = loop.make_train_step(config, built, mesh)
    state, losses = built.state, []
    for step in range(3):
        rows = slice(8 * step, 8 * step + 8)
        batch = sharding.put_batch({'image': data.images[rows], 'label': data.labels[rows]},
                                   sharding.batch_sharding(mesh))
        state, metrics = train_step(state, batch)
        losses.append(float(metrics['loss']))
    kernels = [np.asarray(leaf) for leaf in jax.tree.leaves(state.params) if np.ndim(leaf) == 4]
    print(json.dumps({'devices': jax.device_count(), 'losses': losses,
                      'kernel_checksum': float(sum(np.abs(kernel).sum() for kernel in kernels))}))


if __name__ == '__main__':
    main(*sys.argv[1:])
