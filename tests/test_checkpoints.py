"""Checkpoints that stay trustworthy: the best survives a resume, an unreadable one is reported
and passed over, a failed save stops the run in one line."""
import glob
import json
import os
import subprocess

import jax
import numpy as np
import platform_deps
import pytest

from allflax.modes import evaluate
from allflax.training import checkpoints, loop


def _save(checkpointer, step, accuracy):
    state = {'w': np.full((2, 3), step, np.float32), 'step': np.int32(step)}
    checkpointer.save(step, state, {'next_index': step}, metrics=None if accuracy is None else {'accuracy': accuracy})
    return state


def test_the_best_checkpoint_survives_a_resume(tmp_path):
    directory = str(tmp_path / 'checkpoints')
    first = checkpoints.Checkpointer(directory, keep=2)
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.6)]:
        _save(first, step, accuracy)
    first.wait_until_finished()
    first.close()
    resumed = checkpoints.Checkpointer(directory, keep=2)  # What a rerun builds.
    assert resumed.metrics(2) == {'accuracy': 0.9}
    for step, accuracy in [(4, 0.7), (5, 0.65)]:
        _save(resumed, step, accuracy)
    resumed.wait_until_finished()
    assert resumed.all_steps() == [2, 4, 5]
    resumed.close()


def _corrupt(step_directory):
    """Truncates every data file of a checkpoint's state, as a disk or a copy cut short would."""
    files = [path for path in glob.glob(os.path.join(step_directory, 'state', '**', '*'), recursive=True)
             if os.path.isfile(path) and os.path.getsize(path) > 0]
    for path in files:
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
    assert files


def test_an_unreadable_latest_checkpoint_is_reported_and_passed_over(tmp_path, caplog):
    directory = str(tmp_path / 'checkpoints')
    checkpointer = checkpoints.Checkpointer(directory, keep=3)
    states = {step: _save(checkpointer, step, None) for step in (1, 2)}
    checkpointer.wait_until_finished()
    _corrupt(os.path.join(directory, '2'))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = checkpoints.abstract_with_sharding(states[1], jax.tree.map(lambda _: sharding, states[1]))
    with caplog.at_level('WARNING'):
        step, (state, data) = checkpointer.restore_newest_readable(lambda s: checkpointer.restore(s, abstract),
                                                                   set_aside=True)
    assert step == 1 and data == {'next_index': 1}
    np.testing.assert_array_equal(state['w'], states[1]['w'])
    warnings = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
    assert len(warnings) == 1 and f'checkpoint step 2 in {directory} is unreadable' in warnings[0]
    assert 'falling back to step 1' in warnings[0]
    assert checkpointer.all_steps() == [1] and os.path.isdir(f'{directory}.unreadable/2')
    # Step 2 written and found unreadable again: the copy set aside before is kept beside the new one.
    before = sorted(os.listdir(f'{directory}.unreadable/2/state'))
    _save(checkpointer, 2, None)
    checkpointer.wait_until_finished()
    _corrupt(os.path.join(directory, '2'))
    assert checkpointer.restore_newest_readable(lambda s: checkpointer.restore(s, abstract), set_aside=True)[0] == 1
    assert sorted(os.listdir(f'{directory}.unreadable')) == ['2', '2.1']
    assert sorted(os.listdir(f'{directory}.unreadable/2/state')) == before
    checkpointer.close()


def test_training_and_eval_fall_back_from_an_unreadable_checkpoint(tiny_config, tmp_path, at_batch):
    straight = str(tmp_path / 'straight')
    expected = loop.train_and_evaluate(tiny_config, straight)
    workdir = str(tmp_path / 'run')
    at_batch(5)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(tiny_config, workdir)
    at_batch.restore()
    _corrupt(os.path.join(workdir, 'checkpoints', '4'))
    # Eval of the unfinished run reads step 3 (eval_every_steps); training resumes from it and ends as the straight run.
    assert evaluate.evaluate(tiny_config, workdir, with_report=False)['checkpoint_step'] == 3
    assert loop.train_and_evaluate(tiny_config, workdir) == expected


def test_a_full_disk_stops_the_run_in_one_line(tiny_config, tmp_path):
    workdir = str(tmp_path / 'small_disk')
    os.makedirs(workdir)
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', workdir], capture_output=True).returncode:
        platform_deps.missing('cannot mount a small tmpfs here (needs root)')
    try:
        with tiny_config.unlocked():
            tiny_config.total_steps = 12
        with pytest.raises(checkpoints.CheckpointError, match=r'checkpoint.*failed.*is the disk full') as raised:
            loop.train_and_evaluate(tiny_config, workdir)
        assert len(str(raised.value).splitlines()) == 1
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            logged = [json.loads(line)['step'] for line in f if 'train_loss' in line]
        assert max(logged) <= 4  # The first save (step 2) failed; the run stopped at the next check.
    finally:
        subprocess.run(['umount', '-l', workdir])
