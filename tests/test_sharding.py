import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_steps(num_devices: int, cache_dir: str, config_name: str, total_steps: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'device_steps.py'), cache_dir, config_name,
                             str(total_steps)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


# VGG19+MHSA, and B3+SE, whose batch norms (statistics over the whole batch) and SE run as CPU
# kernels (custom calls, which XLA's partitioner does not split) where they are built. The schedule
# is that of conftest's tiny run of the recipe (other tests train it, test_export the B3 one): the
# 1-device step is then the program they compiled, read from the session's compile cache.
@pytest.mark.parametrize('config_name, tiny_config_fixture', [('vgg19_mhsa', 'make_tiny_config'),
                                                              ('efficientnetv2_b3_se', 'make_tiny_b3_config')],
                         ids=['vgg19_mhsa', 'efficientnetv2_b3_se'])
def test_one_and_eight_devices_take_the_same_steps(synthetic_cache, config_name, tiny_config_fixture, request):
    total_steps = request.getfixturevalue(tiny_config_fixture)().total_steps
    # Both at once: their compiles overlap (B3+SE on 2 AVX2 cores: 154 s one after the other, 130 s together).
    # (The synthetic data cache is written atomically, so either process may build it.)
    one, eight = [_result(process) for process in [_start_steps(count, synthetic_cache, config_name, total_steps)
                                                   for count in (1, 8)]]
    assert (one['devices'], eight['devices']) == (1, 8)
    # Same global batches, same keys: only the order of float reductions differs.
    np.testing.assert_allclose(eight['losses'], one['losses'], rtol=2e-5)
    np.testing.assert_allclose(eight['kernel_checksum'], one['kernel_checksum'], rtol=1e-5)
    assert one['losses'][2] != one['losses'][0]
