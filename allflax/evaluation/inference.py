"""Predictions of a train state on a split, batched over the mesh and gathered on the host: the
one prediction path of validation, eval, predict and the Grad-CAM report."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from allflax import sharding
from allflax.data import pipeline
from allflax.data.dataset import Dataset, Split
from allflax.evaluation import calibration, metrics


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The eight symmetries of square tiles (N, H, W, C): identity, flips, transposes, rotations."""
    views = []
    for oriented in (images, images.swapaxes(1, 2)):
        for flipped in (oriented, oriented[:, ::-1]):
            views += [flipped, flipped[:, :, ::-1]]
    return views


def map_batches(fn, split: Split, batch_size: int, mesh):
    """`fn(host uint8 images, put)` → a pytree of device arrays with a batch axis, for every image
    of `split` in order, gathered on the host; `put` places a host batch on the mesh."""
    batch_sharding = sharding.batch_sharding(mesh)

    def put(images):
        return sharding.put_batch({'image': np.ascontiguousarray(images)}, batch_sharding)['image']

    def gather(x, valid):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))[:valid]

    outputs = [jax.tree.map(lambda x: gather(x, valid), fn(batch['image'], put))
               for batch, valid in pipeline.eval_batches(split, batch_size)]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def predict_logits(eval_step, state, split: Split, batch_size: int, mesh, *,
                   tta: bool = False) -> np.ndarray:
    """Logits (examples, views, classes) for every image of `split`, in order: one view, or the
    eight dihedral views with test-time augmentation."""
    def logits(images, put):
        views = dihedral_views(images) if tta else [images]
        return jnp.stack([eval_step(state, put(view)) for view in views], axis=1)

    return map_batches(logits, split, batch_size, mesh)


def evaluate_split(eval_step, state, dataset: Dataset, split_name: str, batch_size: int,
                   mesh) -> dict:
    """The plain metrics of one split (no intervals, no augmentation): validation during training."""
    split = dataset.splits[split_name]
    probabilities = calibration.probabilities(predict_logits(eval_step, state, split, batch_size, mesh))
    return metrics.classification_metrics(split.labels, probabilities, dataset.class_names)
