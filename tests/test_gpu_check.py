"""`python -m allflax.aot_check --topology=<gpu>` compiles a recipe for NVIDIA GPUs on this CPU host
(JAX's CUDA plugin and ptxas, no driver) from target descriptions written from published facts."""
import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import platform_deps
import pytest

from allflax import aot_check, sharding, train
from allflax.gpu import targets
from configs import vgg19_mhsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the CUDA plugin needs to compile here: the plugin, and ptxas (nvidia-cuda-nvcc-cu12).
PLUGIN = importlib.util.find_spec('jax_plugins.xla_cuda12') is not None and (
    importlib.util.find_spec('nvidia.cuda_nvcc') is not None or shutil.which('ptxas') is not None)


@pytest.fixture
def cuda_plugin():
    if not PLUGIN:
        platform_deps.missing('no CUDA plugin and ptxas here (requirements-test.txt installs them on Linux x86-64 '
                              'only): GPU compiles are not checked')


def test_demo_train_step_compiles_for_a_gpu(cuda_plugin):
    """The VGG19+MHSA demo's bfloat16 train step at 32 px, compiled for one H100 on this host with
    the check's flags: XLA's operations only, memory that is the weights, AdamW's moments and a
    small batch's activations, and the same FLOPs per image as XLA counts for a TPU."""
    config = vgg19_mhsa.get_config('demo')
    with config.unlocked():
        config.data.image_size, config.batch_size, config.dtype = 32, 8, 'bfloat16'
    found = aot_check.target('h100', config.dtype)
    assert [d.device_kind for d in found.devices] == ['NVIDIA H100 80GB HBM3']
    mesh = sharding.make_mesh(found.devices)
    built = train.build(config, 4, 10, mesh, load_pretrained=False, abstract=True)
    batch = sharding.batch_sharding(mesh)
    images = {'image': jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8, sharding=batch),
              'label': jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch)}
    lowered, compiled, _, _ = aot_check._compile(train.make_train_step(config, built, mesh),
                                                 (built.state, images), found.compiler_options)
    assert 'allflax_' not in lowered.as_text() and 'allflax_' not in compiled.as_text()
    assert '__cudnn$conv' in compiled.as_text()  # The convolutions are cuDNN's, as on a GPU.
    memory = compiled.memory_analysis()
    weights = sum(x.size for x in jax.tree.leaves(built.state.params))
    assert 12 * weights < memory.argument_size_in_bytes < 12 * weights + 2 ** 20  # float32 weights + 2 moments.
    assert 0 < memory.temp_size_in_bytes < 2 ** 30
    report = aot_check._report(lowered, compiled, found, per_chip_batch=8)
    assert report['fits'] and 0 < report['hbm_per_chip_gib']['total'] < 1
    # tests/test_tpu_check.py: 1.9 GFLOP per image for the same step on a v5e.
    assert 1.8e9 < report['flops_per_image'] < 2.0e9
    assert report['bytes_accessed_per_chip'] > 12 * weights  # At least the optimiser's reads.


@pytest.mark.parametrize('name', targets.GPUS)
def test_every_target_description_is_accepted(name, cuda_plugin):
    gpu, devices = targets.devices(f'2x{name}')
    assert [d.device_kind for d in devices] == [gpu.device_kind] * 2


@pytest.mark.parametrize('topology', ['v100', 'h100x8', '0xh100', 'H100', 'a100'])
def test_unknown_gpu_is_refused_naming_the_known_ones(topology):
    with pytest.raises(ValueError, match=f"unknown GPU target '{topology}'.*t4, l4, a100-40gb, a100-80gb, h100"):
        targets.parse(topology)


def test_a_t4_is_refused_bfloat16():
    with pytest.raises(ValueError, match=r"t4 has no bfloat16 tensor cores .*:gpu,t4"):
        aot_check.target('t4', 'bfloat16')


def test_target_config_says_what_the_driver_would():
    text = targets.target_config(targets.GPUS['t4'])
    assert 'cuda_compute_capability { major: 7 minor: 5 }' in text
    assert 'core_count: 40\n' in text and f'device_memory_size: {15360 * 2 ** 20}\n' in text
    assert 'device_description_str: "Tesla T4"' in text


def test_table_rows_name_the_config_and_say_what_does_not_fit():
    def report(gpu, gpus, per_gpu, micro, total, fits, arg='gpu', dtype='bfloat16'):
        return {'platform': 'gpu', 'model': 'm', 'config': f'configs/m.py:{arg}', 'chip': gpu, 'chips': gpus,
                'dtype': dtype, 'per_chip_batch': per_gpu, 'chip_spec': {'hbm_gib': 80},
                'train': {'micro_batches': micro, 'hbm_per_chip_gib': {'total': total}, 'hbm_capacity_gib': 15,
                          'fits': fits, 'flops_per_image': 2e10,
                          'roofline': {'images_per_second_per_chip': 99.6, 'bound': 'compute'}}}

    rows = aot_check.table([report('h100', 8, 16, 1, 70.0, False),
                            report('t4', 1, 128, 2, 3.94, True, 'gpu,t4', 'float32')]).splitlines()[2:]
    assert rows == ['| m `gpu,t4` | t4 (Colab) | 1 | float32 | 128 (2 × 64) | 3.9 / 15.0 | yes | 20 | 100 (compute) |',
                    '| m `gpu` | h100 | 8 | bfloat16 | 16 | 70.0 / 15.0 | **no** | 20 | 100 (compute) |']
    with pytest.raises(ValueError, match='two folders'):
        aot_check.table([report('h100', 1, 128, 1, 1.0, True), {**report('h100', 1, 128, 1, 1.0, True),
                                                                 'platform': 'tpu'}])


def test_the_readme_table_is_the_reports_table():
    """README.md's GPU table is `python -m allflax.aot_check --table=benchmarks/gpu_check`, row for
    row, and every recipe's `:gpu` fits each of Colab's GPUs and a lab's."""
    reports = aot_check.read_reports(os.path.join(ROOT, 'benchmarks', 'gpu_check'))
    with open(os.path.join(ROOT, 'README.md')) as f:
        assert aot_check.table(reports) in f.read(), \
            'README.md: paste the output of python -m allflax.aot_check --table=benchmarks/gpu_check'
    assert all(report['train']['fits'] and report['config'].rpartition(':')[2] in ('gpu', 'gpu,t4')
               for report in reports)
    assert {(report['model'], report['topology']) for report in reports} == {
        (model, topology) for model in ('vgg19_mhsa', 'efficientnetv2_b3_se')
        for topology in ('t4', 'l4', 'a100-40gb', 'a100-80gb', 'h100', '8xh100')}
