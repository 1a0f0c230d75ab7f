"""What the benchmarks share: a data set to read, the machine's state, timing of the compiled
augmentation and of the bare train and eval steps."""
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from allflax import runtime, sharding
from allflax.data import augment, input_convention
from allflax.data.sources import fake_trees
from allflax.models import ops
from allflax.training import loop

# The fake C-NMC tree the benchmarks read when no data.dir is given: 600 cells of 450 px,
# the real set's image size, of 12 patients.
FAKE_CNMC = dict(patients_per_class=5, images_per_patient=50, size=450, test_patients_per_class=1,
                 num_unlabeled=0)


def with_data(config: ml_collections.ConfigDict, fake_tree_dir: str) -> ml_collections.ConfigDict:
    """The config, reading a fake C-NMC tree (built once into fake_tree_dir) where it names
    cnmc2019 without a data.dir. Synthetic sets need nothing; other real sets need data.dir."""
    if config.data.name != 'cnmc2019' or config.data.dir:
        return config
    top = os.path.join(fake_tree_dir, 'C-NMC_Leukemia')
    if not os.path.isdir(top):
        top = fake_trees.make_cnmc_tree(fake_tree_dir, **FAKE_CNMC)
    with config.unlocked():
        config.data.dir = top
        config.data.cache_dir = config.data.cache_dir or os.path.join(fake_tree_dir, 'cache')
    return config


def machine() -> dict:
    """What the numbers depend on: the device, and how busy the shared CPU was."""
    return {'device': jax.devices()[0].device_kind, 'cpus': os.cpu_count(),
            'load_average_1min': round(os.getloadavg()[0], 1)}


def seconds(run: Callable[[int], object], repeats: int) -> list[float]:
    """Wall seconds of `run(i)` for i in 0..repeats-1, each after `run` has finished (blocked)."""
    times = []
    with runtime.setup_objects_frozen():  # As main.py's loop.
        for index in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(run(index))
            times.append(time.perf_counter() - start)
    return times


def device_augment_seconds(images: np.ndarray, config: ml_collections.ConfigDict, repeats: int) -> list[float]:
    """Seconds per batch of the compiled augmentation and normalisation of the train step."""
    names, params = tuple(config.data.augment), config.data.augment_params
    data = loop.resolve_input_convention(config).data

    @jax.jit
    def augment_batch(batch, key):
        return input_convention.normalize(augment.augment(batch, key, names, params), data, config.dtype)

    images = jax.device_put(images)
    augment_batch(images, jax.random.key(0)).block_until_ready()  # Compiles.
    return seconds(lambda index: augment_batch(images, jax.random.key(index + 1)), repeats)


class BareSteps:
    """The compiled train and eval steps of `steps`, fed one in-memory batch already on the
    device: what the model costs, without the input pipeline."""

    def __init__(self, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray], num_classes: int):
        mesh = sharding.make_mesh()
        built = loop.build(config, num_classes, config.total_steps, mesh)
        self.state = built.state
        self.batch = sharding.put_batch(batch, sharding.batch_sharding(mesh))

        def lower_train_step():
            return loop.make_train_step(config, built, mesh).lower(self.state, self.batch)

        start = time.perf_counter()
        self._train = lower_train_step().compile()
        self.compile_seconds = time.perf_counter() - start
        # The nominal FLOPs, every convolution counted as a direct one: XLA's cost analysis sees
        # neither the oneDNN custom calls nor what Winograd saves.
        with ops.portable_only():
            self.train_flops = lower_train_step().cost_analysis()['flops']
        self._eval = loop.make_eval_step(config, built, mesh)
        jax.block_until_ready((self.train(0), self.eval(0)))  # Warm-up; compiles the eval step.

    def train(self, _):
        """One train step; the next one starts from its state."""
        self.state, metrics = self._train(self.state, self.batch)
        return metrics

    def eval(self, _):
        return self._eval(self.state, self.batch['image'])
