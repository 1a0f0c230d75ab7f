"""One data-parallel mesh over every device: the same code on 1 CPU, 8 fake devices or a pod."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(devices=None) -> Mesh:
    """Over `devices` (default: every device of every process), e.g. a TPU topology's to compile
    ahead of time."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Returns this process's share of the global batch, or says why it cannot be split."""
    if global_batch_size % mesh.size:
        raise ValueError(f'batch_size={global_batch_size} must be divisible by the {mesh.size} devices')
    return global_batch_size // jax.process_count()


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles a global batch from each process's local rows (asynchronous device copy)."""
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()}
