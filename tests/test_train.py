"""End to end on a tiny recipe: train, checkpoint, resume after an interruption, evaluate."""
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from allflax.modes import evaluate
from allflax.training import checkpoints, loop


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _final_params(workdir, step):
    """The saved parameters as plain arrays, read without a target."""
    path = os.path.join(workdir, 'checkpoints', str(step), 'state')
    return ocp.StandardCheckpointer().restore(path)['params']


def test_interrupted_run_resumes_to_the_same_result(tiny_config, tmp_path, at_batch):
    straight = str(tmp_path / 'straight')
    expected = loop.train_and_evaluate(tiny_config, straight)

    resumed = str(tmp_path / 'resumed')
    at_batch(5)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(tiny_config, resumed)
    at_batch.restore()
    assert checkpoints.Checkpointer(os.path.join(resumed, 'checkpoints')).latest_step() == 4
    assert not os.path.exists(os.path.join(resumed, 'eval'))

    result = loop.train_and_evaluate(tiny_config, resumed)
    assert result == expected
    jax.tree.map(np.testing.assert_array_equal, _final_params(resumed, 6), _final_params(straight, 6))
    losses = {r['step']: r['train_loss'] for r in _read_jsonl(os.path.join(straight, 'metrics.jsonl'))
              if 'train_loss' in r}
    resumed_losses = {r['step']: r['train_loss'] for r in _read_jsonl(os.path.join(resumed, 'metrics.jsonl'))
                      if 'train_loss' in r}
    assert resumed_losses == losses

    # A separate evaluation, configured from config.json, restores the last checkpoint.
    with open(os.path.join(straight, 'config.json')) as f:
        saved_config = ml_collections.ConfigDict(json.load(f))
    values = evaluate.evaluate(saved_config, straight, with_report=False)
    assert values == expected and values['checkpoint_step'] == 6
    with open(os.path.join(straight, 'eval', 'test', 'metrics.json')) as f:
        assert json.load(f)['accuracy'] == expected['accuracy']
    with open(os.path.join(straight, 'splits.json')) as f:
        splits = json.load(f)
    assert sum(splits[name]['num_examples'] for name in ('train', 'val', 'test')) == 192
    assert expected['num_examples'] == splits['test']['num_examples']


def test_checkpoint_round_trip_keeps_latest_and_best(tmp_path):
    directory = str(tmp_path / 'checkpoints')
    checkpointer = checkpoints.Checkpointer(directory, keep=2)
    state = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'step': np.int32(0)}
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.6), (4, None), (5, 0.7)]:
        state = {'w': state['w'] + 1, 'step': np.int32(step)}
        checkpointer.save(step, state, {'next_index': step * 10},
                          metrics=None if accuracy is None else {'accuracy': accuracy})
    checkpointer.wait_until_finished()
    assert checkpointer.all_steps() == [2, 4, 5]  # The two latest and the best (0.9 at step 2).
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = checkpoints.abstract_with_sharding(state, jax.tree.map(lambda _: sharding, state))
    restored, data_state = checkpointer.restore(2, abstract)
    np.testing.assert_array_equal(restored['w'], np.arange(6).reshape(2, 3) + 2)
    assert data_state == {'next_index': 20}
    with pytest.raises(FileNotFoundError, match='available steps'):
        checkpointer.restore(3, abstract)
    checkpointer.close()


def test_eval_without_checkpoint_says_train_first(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'train into .* first'):
        evaluate.evaluate(tiny_config, str(tmp_path / 'empty'), with_report=False)
