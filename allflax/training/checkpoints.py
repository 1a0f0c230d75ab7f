"""Orbax checkpoints of the train state and the data iterator's position, saved together.

A checkpoint is written asynchronously into a temporary directory and renamed when complete, so
an interrupted save is never restored. Validation metrics are saved with it, so the best one
survives resumes. A checkpoint that cannot be read is reported and the next older one is used;
a save that fails stops the run at once, in one line.
"""
import contextlib
import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy

from allflax import files


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none could be read."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


@contextlib.contextmanager
def _save_failures(what: str):
    """Turns any error of a save (Orbax raises many kinds, often long) into one CheckpointError line."""
    try:
        yield
    except Exception as error:
        raise CheckpointError(f'{what} failed ({_first_line(error)}); the run stopped (is the disk full?)') from error


class Checkpointer:
    """Keeps the latest `keep` checkpoints plus the best by validation `best_metric`."""

    def __init__(self, directory: str, *, keep: int = 2, best_metric: str = 'accuracy',
                 read_only: bool = False):
        policy = preservation_policy.AnyPreservationPolicy([
            preservation_policy.LatestN(keep),
            preservation_policy.BestN(get_metric_fn=lambda metrics: metrics[best_metric], n=1,
                                      keep_checkpoints_without_metrics=False)])
        # best_fn also makes Orbax write each checkpoint's metrics next to it (else "best" is
        # forgotten when the manager is recreated on resume).
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, read_only=read_only,
                                               create=not read_only, best_fn=lambda m: m[best_metric],
                                               best_mode='max')
        self.directory = os.path.abspath(directory)  # Orbax accepts absolute paths only.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def metrics(self, step: int) -> dict | None:
        return self._manager.metrics(step)

    def save(self, step: int, state, data_state: dict, metrics: dict | None = None):
        with _save_failures(f'saving the checkpoint of step {step} in {self.directory}'):
            self._manager.check_for_errors()
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             data=ocp.args.JsonSave(data_state)),
                               metrics=metrics)

    def check_for_errors(self):
        """Raises CheckpointError if a background save has failed since the last call."""
        with _save_failures(f'a checkpoint save in {self.directory}'):
            self._manager.check_for_errors()

    def restore(self, step: int, abstract_state):
        """Restores onto `abstract_state`'s shapes, dtypes and shardings; returns (state, data_state)."""
        if step not in self.all_steps():
            raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; '
                                    f'available steps: {self.all_steps() or "none"}')
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored['state'], restored['data']

    def restore_weights(self, step: int, abstract_weights: dict) -> dict:
        """Only the entries of `abstract_weights` (e.g. {'params': ..., 'batch_stats': ...}) of the
        saved state: evaluation needs no optimiser state, so a run stays evaluable after the
        optimiser changes."""
        if step not in self.all_steps():
            raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; '
                                    f'available steps: {self.all_steps() or "none"}')
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_weights)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_weights, restore_args=restore_args, partial_restore=True)))
        return restored['state']

    def restore_newest_readable(self, restore, *, set_aside: bool):
        """`restore(step)` of the newest checkpoint it succeeds on; returns (step, its result), or
        (None, None) when there is no checkpoint. Each unreadable one is reported in one line and,
        with `set_aside` (training, which will write that step again), moved to
        `<directory>.unreadable/<step>`."""
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                return step, restore(step)
            except Exception as error:  # A truncated, missing or garbled file: any Orbax/TensorStore error.
                older = [s for s in steps if s < step]
                logging.warning('checkpoint step %d in %s is unreadable (%s); %s', step, self.directory,
                                _first_line(error), f'falling back to step {older[0]}' if older else
                                'no older checkpoint')
                if set_aside and files.is_writer():
                    aside = os.path.join(f'{self.directory}.unreadable', str(step))
                    copies = 0
                    while os.path.lexists(aside):  # Set aside before: kept, as every copy is.
                        copies += 1
                        aside = os.path.join(f'{self.directory}.unreadable', f'{step}.{copies}')
                    os.makedirs(os.path.dirname(aside), exist_ok=True)
                    os.replace(os.path.join(self.directory, str(step)), aside)
                    self._manager.reload()
        if steps:
            raise CheckpointError(f'no readable checkpoint in {self.directory} (steps {steps} all failed, '
                                  f'see the lines above)')
        return None, None

    def wait_until_finished(self):
        with _save_failures(f'a checkpoint save in {self.directory}'):
            self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def abstract_with_sharding(tree, shardings):
    """Shape/dtype/sharding stand-ins for `tree`, the target Orbax restores onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
