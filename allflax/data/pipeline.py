"""From a named data set to device batches: load, split by patient, stream with Grain.

Tiles stay uint8 all the way to the device; augmentation and normalisation run
inside the compiled step (see `allflax.data.augment`).
"""
import collections
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np

from allflax import sharding
from allflax.data import prepared, splits
from allflax.data.dataset import Dataset, Split, default_cache_dir, write_splits_json
from allflax.data.sources import synthetic

# Batches each reading process keeps ready. Grain's default read-ahead of 500 elements (here
# batches) grew to 2.6 GiB per process at 224 px and batch 32, in the main process and in each
# worker; with 2 threads and 4 batches the pipeline reads as fast (benchmarks/RESULTS.md).
PREFETCH_BATCHES = 4
_READ_THREADS = 2


def load(config: ml_collections.ConfigDict, workdir: str | None = None) -> Dataset:
    """Loads `config.data.name`, splits it patient-wise and records the split in `workdir/splits.json`."""
    data = config.data
    if data.name not in synthetic.CLASS_NAMES:
        return prepared.load_real(config, workdir)  # Raises for unknown names, listing every one.
    generated = synthetic.load(data.name, num_images=data.num_images, image_size=data.image_size,
                               num_patients=data.num_patients, seed=config.seed,
                               cache_dir=default_cache_dir(config))
    indices = splits.make_splits(generated.labels, generated.patients, method=data.split,
                                 fractions=dict(data.split_fractions), seed=config.seed,
                                 fold=data.fold, num_folds=data.num_folds)
    dataset = Dataset(
        splits={name: Split(generated.images[idx], generated.labels[idx], generated.patients[idx])
                for name, idx in indices.items()},
        class_names=tuple(generated.class_names))
    if workdir is not None:
        write_splits_json(workdir, splits.describe(indices, generated.labels, generated.patients,
                                                   generated.class_names))
    return dataset


class _ArraySource:
    """Random access to one split's examples, as Grain reads them."""

    def __init__(self, split: Split):
        self._split = split

    def __len__(self):
        return len(self._split)

    def __getitem__(self, index):
        return {'image': self._split.images[index], 'label': self._split.labels[index]}


def train_dataset(split: Split, *, local_batch_size: int, seed: int, num_workers: int) -> grain.IterDataset:
    """Endless shuffled batches, reshuffled every epoch by seed: this process's rows of each global
    batch. The global batches are the same whatever the number of processes: every process
    shuffles the whole split alike and takes its own `local_batch_size` rows of each batch."""
    if len(split) < local_batch_size * jax.process_count():
        raise ValueError(f'the train split has {len(split)} images, fewer than one batch '
                         f'({local_batch_size * jax.process_count()}): lower batch_size or add data')
    dataset = grain.MapDataset.source(_ArraySource(split)).shuffle(seed=seed).repeat(None)
    dataset = dataset.batch(local_batch_size, drop_remainder=True)[jax.process_index()::jax.process_count()]
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                                        prefetch_buffer_size=PREFETCH_BATCHES))
    if num_workers:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return dataset


class DevicePrefetcher:
    """Keeps the next batches on their way to the devices while the current step runs.

    Each batch travels with the iterator state *after* it, so a checkpoint records
    exactly the batches the model has consumed, not the ones prefetched.
    """

    def __init__(self, iterator: grain.DatasetIterator, batch_sharding, depth: int = 2):
        self._iterator = iterator
        self._sharding = batch_sharding
        self._depth = depth
        self._queue = collections.deque()
        self.consumed_state = iterator.get_state()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._queue) < self._depth:
            batch = next(self._iterator)
            self._queue.append((sharding.put_batch(batch, self._sharding), self._iterator.get_state()))
        batch, self.consumed_state = self._queue.popleft()
        return batch


def eval_batches(split: Split, global_batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """This process's rows of each global batch, in order; the last batch is padded.

    Yields (local batch, number of real examples in the global batch).
    """
    local = global_batch_size // jax.process_count()
    start = jax.process_index() * local
    for offset in range(0, len(split), global_batch_size):
        images = np.stack([split.images[i] for i in range(offset, min(offset + global_batch_size, len(split)))])
        valid = len(images)
        if valid < global_batch_size:
            padding = np.zeros((global_batch_size - valid, *images.shape[1:]), images.dtype)
            images = np.concatenate([images, padding])
        yield {'image': images[start:start + local]}, valid
