"""A run survives what users and machines do to it: a signal mid-run, a resume with another
config, a diverging loss, a second run on the same workdir, values that cannot train."""
import json
import os
import random
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from allflax.modes import evaluate
from allflax.training import config_check, loop, resume_check, workdir_lock


def _params(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))['params']


def test_sigterm_saves_the_step_and_the_rerun_ends_bit_identical(tiny_config, tmp_path, at_batch):
    handler = signal.getsignal(signal.SIGTERM)
    straight = str(tmp_path / 'straight')
    expected = loop.train_and_evaluate(tiny_config, straight)
    interrupted = str(tmp_path / 'interrupted')
    step = random.Random(os.getpid()).choice([1, 3, 5])  # Off the checkpoint interval of 2.
    at_batch(step, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(loop.Interrupted, match=f'SIGTERM at step {step}: saved a checkpoint of step {step}.*rerun'):
        loop.train_and_evaluate(tiny_config, interrupted)
    at_batch.restore()
    assert str(step) in os.listdir(os.path.join(interrupted, 'checkpoints'))
    assert signal.getsignal(signal.SIGTERM) == handler  # Ours is gone with the loop.
    assert loop.train_and_evaluate(tiny_config, interrupted) == expected
    for a, b in zip(*(jax.tree.leaves(_params(w, tiny_config.total_steps)) for w in (interrupted, straight))):
        np.testing.assert_array_equal(a, b)


def test_resume_with_another_seed_is_refused_before_any_file_changes(tiny_config, tmp_path):
    workdir = str(tmp_path / 'run')
    loop.train_and_evaluate(tiny_config, workdir)
    before = {name: open(os.path.join(workdir, name), 'rb').read()
              for name in ('config.json', 'splits.json', 'metrics.jsonl', os.path.join('eval', 'test', 'metrics.json'))}
    with tiny_config.unlocked():
        tiny_config.seed = 1
        tiny_config.log_every_steps = 3
    with pytest.raises(resume_check.ResumeMismatchError, match=r'refusing to resume .*\n  seed: 0 -> 1'):
        loop.train_and_evaluate(tiny_config, workdir)
    assert {name: open(os.path.join(workdir, name), 'rb').read() for name in before} == before


def test_a_diverging_loss_stops_without_saving_that_state(tiny_config, tmp_path):
    with tiny_config.unlocked():
        tiny_config.optimizer.learning_rate = 1e30
        tiny_config.optimizer.grad_clip_norm = 0.0
    workdir = str(tmp_path / 'diverged')
    with pytest.raises(loop.Diverged, match=r'non-finite loss or gradient norm at step \d+.*without saving'):
        loop.train_and_evaluate(tiny_config, workdir)
    checkpoints = os.path.join(workdir, 'checkpoints')
    saved = [int(name) for name in os.listdir(checkpoints) if name.isdigit()] if os.path.isdir(checkpoints) else []
    for step in saved:
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_params(workdir, step)))


def test_a_second_writer_is_refused_naming_the_first(tiny_config, tmp_path):
    workdir = str(tmp_path / 'busy')
    os.makedirs(workdir)
    with open(os.path.join(workdir, workdir_lock.LOCK_NAME), 'w') as f:
        json.dump({'host': os.uname().nodename, 'pid': os.getppid(), 'started': 'earlier', 'command': 'x'}, f)
    with pytest.raises(workdir_lock.WorkdirBusyError, match=str(os.getppid())):
        loop.train_and_evaluate(tiny_config, workdir)
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]


@pytest.mark.parametrize('key, value, message', [
    ('total_steps', -5, 'total_steps=-5'),
    ('data.dir', '/somewhere', 'data.dir'),
])
def test_values_that_cannot_train_are_named(tiny_config, tmp_path, key, value, message):
    with tiny_config.unlocked():
        *parents, name = key.split('.')
        node = tiny_config
        for parent in parents:
            node = node[parent]
        node[name] = value
    with pytest.raises(config_check.ConfigError, match=message):
        loop.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run')


def test_eval_needs_no_optimizer_state(tiny_config, tmp_path):
    """Eval restores params and batch statistics only: a run stays evaluable when the optimiser's
    state no longer matches (here the clip, and with it a state entry, is gone)."""
    workdir = str(tmp_path / 'run')
    trained = loop.train_and_evaluate(tiny_config, workdir)
    with tiny_config.unlocked():
        tiny_config.optimizer.grad_clip_norm = 0.0
    values = evaluate.evaluate(tiny_config, workdir, with_report=False)
    assert values['accuracy'] == trained['accuracy'] and values['checkpoint_step'] == tiny_config.total_steps


def _files_of(workdir):
    """Every file of a workdir but its lock and checkpoints, with its bytes."""
    found = {}
    for root, dirs, names in os.walk(workdir):
        dirs[:] = [d for d in dirs if d != 'checkpoints']
        for name in names:
            if name != workdir_lock.LOCK_NAME:
                path = os.path.join(root, name)
                found[os.path.relpath(path, workdir)] = open(path, 'rb').read()
    return found


def test_after_a_takeover_the_old_holder_writes_nothing_more(tiny_config, tmp_path, at_batch):
    """Another host takes the workdir over while the run trains its third step: the run stops at its
    next write (step 3's validation metrics), and writes no metrics, checkpoint or evaluation."""
    workdir = str(tmp_path / 'run')
    seen = {}

    def take_over():
        seen['files'] = _files_of(workdir)
        with open(os.path.join(workdir, workdir_lock.LOCK_NAME), 'w') as f:
            json.dump({'host': 'host-b', 'pid': 4242, 'started': 'now', 'command': 'x', 'token': 'b' * 32,
                       'generation': 2, 'renewed': 'now', 'lease_seconds': 60.0}, f)

    at_batch(3, take_over)
    with pytest.raises(workdir_lock.WorkdirBusyError, match='taken over by process 4242 on host-b'):
        loop.train_and_evaluate(tiny_config, workdir)
    assert _files_of(workdir) == seen['files'] and 'metrics.jsonl' in seen['files']
    assert not os.path.exists(os.path.join(workdir, 'eval'))
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']  # Step 2's, saved before.
    with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
        assert json.load(f)['host'] == 'host-b'  # The new holder's lock, left as it is.
