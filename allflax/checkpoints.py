"""Orbax checkpoints of the train state and the data iterator's position, saved together.

A checkpoint is written asynchronously into a temporary directory and renamed
when complete, so an interrupted save is never restored.
"""
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy


class Checkpointer:
    """Keeps the latest `keep` checkpoints plus the best by validation `best_metric`."""

    def __init__(self, directory: str, *, keep: int = 2, best_metric: str = 'accuracy',
                 read_only: bool = False):
        policy = preservation_policy.AnyPreservationPolicy([
            preservation_policy.LatestN(keep),
            preservation_policy.BestN(get_metric_fn=lambda metrics: metrics[best_metric], n=1,
                                      keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, read_only=read_only,
                                               create=not read_only)
        self.directory = os.path.abspath(directory)  # Orbax accepts absolute paths only.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, metrics: dict | None = None):
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(data_state)),
                           metrics=metrics)

    def restore(self, step: int, abstract_state):
        """Restores onto `abstract_state`'s shapes, dtypes and shardings; returns (state, data_state)."""
        if step not in self.all_steps():
            raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; '
                                    f'available steps: {self.all_steps() or "none"}')
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored['state'], restored['data']

    def wait_until_finished(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def abstract_with_sharding(tree, shardings):
    """Shape/dtype/sharding stand-ins for `tree`, the target Orbax restores onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
