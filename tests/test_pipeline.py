"""The Grain train pipeline with worker processes: a saved position resumes the exact batches."""
import numpy as np
from absl import flags

from allflax import sharding
from allflax.data import pipeline
from allflax.data.dataset import Split
from allflax.data.sources import synthetic


def _batches(split, num_workers, count, state=None):
    """`count` device batches from a fresh iterator (at `state` if given), each with the
    consumed state a checkpoint after it would save."""
    iterator = iter(pipeline.train_dataset(split, local_batch_size=4, seed=0, num_workers=num_workers))
    if state is not None:
        iterator.set_state(state)
    prefetcher = pipeline.DevicePrefetcher(iterator, sharding.batch_sharding(sharding.make_mesh()))
    try:
        batches = []
        for _ in range(count):
            batch = {key: np.asarray(value) for key, value in next(prefetcher).items()}
            batches.append((batch, prefetcher.consumed_state))
        return batches
    finally:
        iterator.close()


def test_workers_resume_the_exact_batch_sequence():
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags, parsed by main.py's app.run.
        flags.FLAGS.mark_as_parsed()
    data = synthetic.generate('synthetic_cnmc', num_images=24, image_size=32, num_patients=4, seed=0)
    split = Split(data.images, data.labels, data.patients)
    straight = _batches(split, num_workers=2, count=8)
    _, saved_after_5 = straight[4]
    resumed = _batches(split, num_workers=2, count=3, state=saved_after_5)
    for (batch, _), (want, _) in zip(resumed, straight[5:], strict=True):
        np.testing.assert_array_equal(batch['image'], want['image'])
        np.testing.assert_array_equal(batch['label'], want['label'])
    # Workers change the speed, not the batches.
    for (batch, _), (want, _) in zip(_batches(split, num_workers=0, count=8), straight, strict=True):
        np.testing.assert_array_equal(batch['image'], want['image'])
