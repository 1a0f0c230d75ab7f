"""From a named data set to device batches: load, split by patient, stream with Grain.

Tiles stay uint8 all the way to the device; augmentation and normalisation run
inside the compiled step (see `allflax.data.augment`).
"""
import collections
from collections.abc import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from allflax import sharding
from allflax.data import membership, prepared, splits
from allflax.data.dataset import Dataset, default_cache_dir, Split, write_splits_json
from allflax.data.sources import synthetic

# Batches each reading process keeps ready. Grain's default read-ahead of 500 elements (here
# batches) grew to 2.6 GiB per process at 224 px and batch 32, in the main process and in each
# worker; with 2 threads and 4 batches the pipeline reads as fast (benchmarks/RESULTS.md).
PREFETCH_BATCHES = 4
_READ_THREADS = 2


def load(config: ml_collections.ConfigDict, workdir: str | None = None, *, recorded: dict | None = None,
         run: str = '', needed: Sequence[str] | None = None, action: str = 'use it') -> Dataset:
    """Loads `config.data.name`, splits it patient-wise and records the split and its members in
    `workdir/splits.json`.

    With `recorded`, the splits.json of run `run`: the splits `needed` (default: all) with exactly the
    run's members and classes, refusing in one line (membership.SplitsChanged) to `action` where the
    data no longer holds them; nothing is written. A splits.json written before members were
    recorded: the split is recomputed and refused where its patients or class counts differ."""
    data = config.data
    if recorded is not None:
        needed = list(needed or membership.split_names(recorded))
        if recorded.get('members', {}).get('kind') == 'files':
            return prepared.load_recorded(config, recorded, run=run, needed=needed, action=action)
        if recorded.get('members', {}).get('kind') == 'generated':
            return _load_recorded_generated(config, recorded, run=run, needed=needed, action=action)
        dataset = load(config)
        membership.check_unrecorded(recorded, membership.summary_of(dataset.splits, dataset.class_names),
                                    dataset.class_names, where=f'data.dir={data.dir}' if data.dir else data.name,
                                    run=run, needed=needed, action=action)
        return Dataset({name: dataset.splits[name] for name in needed}, dataset.class_names)
    if data.name not in synthetic.CLASS_NAMES:
        return prepared.load_real(config, workdir)  # Raises for unknown names, listing every one.
    generated = _generate(config)
    indices = splits.make_splits(generated.labels, generated.patients, method=data.split,
                                 fractions=dict(data.split_fractions), seed=config.seed,
                                 fold=data.fold, num_folds=data.num_folds)
    dataset = Dataset(
        splits={name: Split(generated.images[idx], generated.labels[idx], generated.patients[idx])
                for name, idx in indices.items()},
        class_names=tuple(generated.class_names))
    if workdir is not None:
        summary = splits.describe(indices, generated.labels, generated.patients, generated.class_names)
        summary['class_names'] = list(generated.class_names)
        summary['members'] = membership.generated_members(indices, _generation(config))
        write_splits_json(workdir, summary)
    return dataset


def _generation(config: ml_collections.ConfigDict) -> dict:
    """What identifies a generated set: its name, its settings and the generator's version."""
    data = config.data
    return {'name': data.name, 'num_images': data.num_images, 'image_size': data.image_size,
            'num_patients': data.num_patients, 'seed': config.seed, 'generator_version': synthetic.GENERATOR_VERSION}


def _generate(config: ml_collections.ConfigDict) -> synthetic.SyntheticData:
    data = config.data
    return synthetic.load(data.name, num_images=data.num_images, image_size=data.image_size,
                          num_patients=data.num_patients, seed=config.seed, cache_dir=default_cache_dir(config))


def _load_recorded_generated(config: ml_collections.ConfigDict, recorded: dict, *, run: str, needed: Sequence[str],
                             action: str) -> Dataset:
    """The splits `needed` of a run on a synthetic set: the recorded indices into the set that the
    run's settings generate, refused where this config generates another."""
    membership.check_generated(recorded, _generation(config), run=run, action=action)
    generated = _generate(config)
    members = recorded['members']['splits']
    return Dataset(
        splits={name: Split(generated.images[idx], generated.labels[idx], generated.patients[idx])
                for name, idx in ((name, np.array(members[name], np.int64)) for name in members if name in needed)},
        class_names=membership.class_names(recorded))


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
