"""One process of a training run on CPU (argv: JSON of the run), for test_multiprocess.py.

With `num_processes` > 1 it joins a `jax.distributed` run over localhost with the CPU
collectives; `preempt_at` sends this process SIGTERM while it fetches that step's batch.
Prints JSON: the process, its devices, and the test metrics or the error.
"""
import json
import os
import signal
import sys

import jax
import numpy as np

import tiny_configs
from allflax import runtime
from allflax.data import pipeline
from allflax.training import loop, restore


def main(run: dict):
    # The test session's compile cache: the resumed two-process run reuses the first one's programs.
    runtime.use_compilation_cache()
    if run['num_processes'] > 1:
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(coordinator_address=f'localhost:{run["port"]}',
                                   num_processes=run['num_processes'], process_id=run['process_id'])
    config = tiny_configs.vgg19_mhsa_config(run['cache_dir'], total_steps=8, eval_every_steps=4,
                                            checkpoint_every_steps=4, bootstrap_samples=20)
    if run.get('preempt_at'):
        original, calls = pipeline.DevicePrefetcher.__next__, {'n': 0}

        def next_batch(self):
            calls['n'] += 1
            if calls['n'] == run['preempt_at']:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self)

        pipeline.DevicePrefetcher.__next__ = next_batch
    out = {'process': jax.process_index(), 'processes': jax.process_count(), 'devices': jax.device_count()}
    try:
        out['test'] = loop.train_and_evaluate(config, run['workdir'])
    except loop.Interrupted as error:
        out['interrupted'] = str(error)
    else:
        # The final parameters (replicated: every process holds them whole), for the test to compare.
        restored = restore.restore(run['workdir'], model=config.model, data=config.data,
                                   dtype=config.dtype, seed=config.seed, num_classes=4)
        leaves = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree.leaves(restored.state.params)]
        np.savez(os.path.join(run['workdir'], f'params_{jax.process_index()}.npz'), *leaves)
    print(json.dumps(out, default=str))


if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
