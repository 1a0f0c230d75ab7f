"""What a user sees for a mistake: one line that says what to do, not a traceback or flag help."""
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from allflax import sharding
from allflax.data.dataset import Dataset, Split
from allflax.evaluation import results
from allflax.training import loop
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A few images on CPU: what a run with a mistake reaches before it is refused (nothing, below).
_TINY = ['--config=configs/vgg19_mhsa.py:demo', '--config.data.num_images=96', '--config.data.num_patients=8',
         '--config.data.cache_dir={tmp}/cache', '--workdir={tmp}/run']


@pytest.mark.parametrize('args, message, code', [
    (['--mode=eval', '--workdir={tmp}/empty'], 'config.json not found: pass --config, or train into', 1),
    (['--mode=eval'], '--workdir is required for --mode=eval', 2),
    (['--mode=eval', '--workdir={tmp}/broken'], 'broken/config.json is not valid JSON (', 1),
    ([*_TINY, '--config.data.image_size=8'], 'data.image_size=8 must be >= 32 pixels', 1),
    ([*_TINY, '--config.model.name=vgg99'], "model.name='vgg99' is not a model: use one of efficientnetv2_b0,", 1),
    ([*_TINY, "--config.data.augment=('flip','bogus')"], "names an unknown op: use some of flip, rot90,", 1),
    ([*_TINY, '--config.model.init_from=weights/nowhere'], "model.init_from='weights/nowhere' must be ''", 1),
], ids=['no_config_json', 'no_workdir', 'config_json_not_json', 'image_size', 'model_name', 'augment_op',
        'init_from_directory'])
def test_usage_errors_print_the_line_that_matters(tmp_path, args, message, code):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'config.json').write_text('{"seed": 0,')
    run = _main(tmp_path, args)
    assert run.returncode == code
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], run.stderr
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()  # Refused before any write.


def test_imagenet_weights_offline_are_refused_before_the_run_starts(tmp_path):
    """Offline, `init_from=imagenet` says where the weights are and how to convert them, without a
    traceback, before the workdir or the data cache is written."""
    with socket.socket() as probe:  # A loopback port with nothing listening: the fetch is refused.
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    run = _main(tmp_path, [*_TINY, '--config.model.init_from=imagenet', f'--config.data.cache_dir={tmp_path}/weights'],
                ALLFLAX_KERAS_WEIGHTS_URL=f'http://127.0.0.1:{port}')
    assert run.returncode == 1
    assert 'Traceback' not in run.stderr
    error = run.stderr[run.stderr.index('error: '):]
    assert error.startswith(f'error: cannot fetch the ImageNet weights http://127.0.0.1:{port}/vgg19_weights')
    assert 'python -m allflax.models.keras_weights --model=vgg19' in error
    assert not (tmp_path / 'run').exists()


def _main(tmp_path, args, **environment):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *(a.format(tmp=tmp_path) for a in args)],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu', **environment),
                          timeout=120)


def test_eval_refuses_non_finite_probabilities(tmp_path):
    """A diverged checkpoint's NaN logits are an error naming the step, not a crash in plotting."""
    images = np.zeros((4, 8, 8, 3), np.uint8)
    split = Split(images, np.array([0, 1, 0, 1]), np.array(['a', 'b', 'c', 'd']))
    dataset = Dataset({'test': split, 'val': split}, ('x', 'y'))
    with pytest.raises(ValueError, match='step 7 predicts non-finite probabilities for 4 of 4 images of test'):
        results.evaluate_state(lambda state, x: jnp.full((x.shape[0], 2), jnp.nan), None, dataset, 'test',
                               sharding.make_mesh(), str(tmp_path), options=common.eval_config(), batch_size=4,
                               seed=0, split_method='patient', checkpoint_step=7,
                               input_convention='imagenet_mean_std')


@pytest.mark.parametrize('name, code', [('SIGTERM', 143), ('SIGINT', 130)])
def test_an_interrupted_run_exits_as_the_signal_would_have(name, code):
    assert loop.Interrupted(name, 'saved').exit_code == code
