import os
import platform
import sys

# libtpu (a test requirement, to compile for TPU topologies) would make every JAX process here
# look for a TPU first: tests run on the CPU, and compile for TPUs through topologies only.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import pytest  # noqa: E402

import platform_deps  # noqa: E402
import tiny_configs  # noqa: E402
from allflax import runtime  # noqa: E402
from allflax.cpu import kernels as cpu_kernels  # noqa: E402
from allflax.data import pipeline  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
    """One compile cache for the session, shared by pytest-xdist's workers and the processes tests
    start (main.py reads ALLFLAX_COMPILATION_CACHE), never the user's: a program any test compiled,
    down to the initialisers' small ones, is read back by the next test that needs it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # pytest-xdist gives each worker a folder under the session's.
    os.environ['ALLFLAX_COMPILATION_CACHE'] = str(root / 'xla_cache')
    runtime.use_compilation_cache()


@pytest.fixture(params=[True, False], ids=['kernels', 'no_kernels'])
def kernels_built(request, monkeypatch):
    """The test runs with allflax's CPU kernels (built by `make` on Linux x86-64) and as a machine
    without them sees it."""
    if request.param:
        if not cpu_kernels.available():
            if sys.platform == 'linux' and platform.machine() == 'x86_64':
                pytest.fail(f'{cpu_kernels.LIBRARY} is not built: run `make test` (it builds it)')
            platform_deps.missing('no oneDNN wheel for this platform: allflax/cpu/_cpu_kernels.so is not built')
    else:
        monkeypatch.setattr(cpu_kernels, 'available', lambda: False)
    return request.param


@pytest.fixture(params=[True, False], ids=['bf16_convolutions', 'no_bf16_convolutions'])
def bfloat16_convolutions(request, monkeypatch, kernels_built):
    """With the kernels built: oneDNN's bfloat16 convolutions where this CPU has them (AVX-512), and
    as a CPU without them (AVX2 alone) sees it; False without the kernels."""
    if not kernels_built:
        if not request.param:
            pytest.skip('the same case as bf16_convolutions without the kernels')
        return False
    if request.param and not cpu_kernels.bfloat16_convolutions():
        pytest.skip('oneDNN has no bfloat16 convolutions for this CPU')
    if not request.param:
        monkeypatch.setattr(cpu_kernels, 'bfloat16_convolutions', lambda: False)
    return request.param


@pytest.fixture(scope='session')
def synthetic_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('synthetic_cache'))


@pytest.fixture(scope='session')
def make_tiny_config(synthetic_cache):
    """Builds a fresh tiny config each call, for fixtures shared by several tests."""
    return lambda: tiny_configs.vgg19_mhsa_config(synthetic_cache)


@pytest.fixture(scope='session')
def make_tiny_b3_config(synthetic_cache):
    """Builds a fresh EfficientNetV2-B3+SE config at 32 px for 3 steps each call."""
    return lambda: tiny_configs.efficientnetv2_b3_se_config(synthetic_cache)


@pytest.fixture
def tiny_config(make_tiny_config):
    """The VGG19+MHSA recipe shrunk to seconds: 32-px images, a few steps."""
    return make_tiny_config()


@pytest.fixture
def at_batch(monkeypatch):
    """`at_batch(n, action)` runs `action()` when the training loop fetches its n-th batch (from 1);
    without an action it interrupts the loop there (KeyboardInterrupt). `at_batch.restore()` puts
    the plain loop back."""
    original = pipeline.DevicePrefetcher.__next__

    def interrupt():
        raise KeyboardInterrupt('simulated interruption')

    def install(n, action=interrupt):
        calls = {'n': 0}

        def next_batch(self):
            calls['n'] += 1
            if calls['n'] == n:
                action()
            return original(self)

        monkeypatch.setattr(pipeline.DevicePrefetcher, '__next__', next_batch)

    install.restore = lambda: monkeypatch.setattr(pipeline.DevicePrefetcher, '__next__', original)
    return install


def pytest_configure(config):
    # Quiet TensorFlow's C++ start-up chatter in tests that import Keras.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
