"""What a user sees for a mistake: one line that says what to do, not a traceback or flag help."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from allflax import sharding, train
from allflax.data.dataset import Dataset, Split
from allflax.evaluation import results
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('args, message, code', [
    (['--mode=eval', '--workdir={empty}'], 'config.json not found: pass --config, or train into', 1),
    (['--mode=eval'], '--workdir is required for --mode=eval', 2),
])
def test_usage_errors_print_the_line_that_matters(tmp_path, args, message, code):
    empty = tmp_path / 'empty'
    empty.mkdir()
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *(a.format(empty=empty) for a in args)],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                         timeout=120)
    assert run.returncode == code
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], run.stderr


def test_eval_refuses_non_finite_probabilities(tmp_path):
    """A diverged checkpoint's NaN logits are an error naming the step, not a crash in plotting."""
    images = np.zeros((4, 8, 8, 3), np.uint8)
    split = Split(images, np.array([0, 1, 0, 1]), np.array(['a', 'b', 'c', 'd']))
    dataset = Dataset({'test': split, 'val': split}, ('x', 'y'))
    with pytest.raises(ValueError, match='step 7 predicts non-finite probabilities for 4 of 4 images of test'):
        results.evaluate_state(lambda state, x: jnp.full((x.shape[0], 2), jnp.nan), None, dataset, 'test',
                               sharding.make_mesh(), str(tmp_path), options=common.eval_config(), batch_size=4,
                               seed=0, checkpoint_step=7)


@pytest.mark.parametrize('name, code', [('SIGTERM', 143), ('SIGINT', 130)])
def test_an_interrupted_run_exits_as_the_signal_would_have(name, code):
    assert train.Interrupted(name, 'saved').exit_code == code
