"""`python -m allflax.aot.check --topology=<gpu>` compiles a recipe for NVIDIA GPUs on this CPU host
(JAX's CUDA plugin and ptxas, no driver) from target descriptions written from published facts."""
import importlib.util
import os
import re
import shutil

import jax
import jax.numpy as jnp
import platform_deps
import pytest

from allflax import sharding
from allflax.aot import check as aot_check, gpu as targets
from allflax.training import loop
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
    built = loop.build(config, 4, 10, mesh, load_pretrained=False, abstract=True)
    batch = sharding.batch_sharding(mesh)
    images = {'image': jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8, sharding=batch),
              'label': jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch)}
    lowered, compiled, _, _ = aot_check._compile(loop.make_train_step(config, built, mesh),
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


@pytest.mark.parametrize('name', ['t4', 'p100'])
def test_a_gpu_without_bfloat16_is_refused_it_naming_its_arg(name):
    with pytest.raises(ValueError, match=rf"{name} has no bfloat16 arithmetic .*:gpu,{name}"):
        aot_check.target(name, 'bfloat16')


# XLA's own target configs for four of these GPUs, as their drivers reported them (openxla/xla,
# xla/backends/gpu/target_config/specs/{a100_sxm_40,a100_sxm_80,h100_sxm,h200}.txtpb): a record
# independent of the datasheets that allflax/aot/gpu.py is written from.
_XLA_SPECS = {
    'a100-40gb': dict(compute_capability=(8, 0), core_count=108, fpus_per_core=64, threads_per_core_limit=2048,
                      shared_memory_per_core=167936, shared_memory_per_block_optin=166912, l2_cache_size=41943040,
                      clock_rate_ghz=1.41, memory_bandwidth=1555200000000, device_memory_size=42331013120),
    'a100-80gb': dict(compute_capability=(8, 0), core_count=108, fpus_per_core=64, threads_per_core_limit=2048,
                      shared_memory_per_core=167936, shared_memory_per_block_optin=166912, l2_cache_size=41943040,
                      clock_rate_ghz=1.41, memory_bandwidth=2039040000000, device_memory_size=85100068864),
    'h100': dict(compute_capability=(9, 0), core_count=132, fpus_per_core=128, threads_per_core_limit=2048,
                 shared_memory_per_core=233472, shared_memory_per_block_optin=232448, l2_cache_size=52428800,
                 clock_rate_ghz=1.98, memory_bandwidth=3352320000000, device_memory_size=84942979072),
    'h200': dict(compute_capability=(9, 0), core_count=132, fpus_per_core=128, threads_per_core_limit=2048,
                 shared_memory_per_core=233472, shared_memory_per_block_optin=232448, l2_cache_size=52428800,
                 clock_rate_ghz=1.98, memory_bandwidth=4800000000000, device_memory_size=151397597184),
}


def _target_fields(text: str) -> dict:
    """The scalar fields of a GpuTargetConfigProto in text form, and its compute capability."""
    fields = {name: float(value) for name, value in re.findall(r'^ *(\w+): ([-+.\de]+)$', text, re.M)}
    major, minor = re.search(r'cuda_compute_capability \{ major: (\d+) minor: (\d+) \}', text).groups()
    return {**fields, 'compute_capability': (int(major), int(minor))}


@pytest.mark.parametrize('name', sorted(_XLA_SPECS))
def test_target_config_says_what_the_driver_said_to_xla(name):
    """What targets.target_config writes for a GPU, field by field, against XLA's record of the
    same GPU. Memory is nvidia-smi's total, which is within 2 % of what the driver gives CUDA."""
    ours, xla = _target_fields(targets.target_config(targets.GPUS[name])), _XLA_SPECS[name]
    for field, value in xla.items():
        tolerance = {'device_memory_size': 0.02, 'memory_bandwidth': 1e-3}.get(field, 0)
        assert ours[field] == (value if field == 'compute_capability' else pytest.approx(value, rel=tolerance)), field


# Dense FLOPs per SM per clock, from NVIDIA's architecture whitepapers: tensor cores per SM ×
# multiply-adds per tensor core per clock × 2. Pascal GP100 (6.0) has none: each of its 64 FP32 lanes
# does one float32 FMA or two float16 ones (half2) per clock. Turing TU104 (7.5): 8 × 64 float16; its float32 runs
# on the FP32 lanes, an FMA each (2 FLOPs). Ampere GA100 (8.0): 4 × 256 float16/bfloat16, TF32
# half that. Ada AD104 (8.9): 4 × 128 float16/bfloat16 accumulating in float32, TF32 half. Hopper
# GH100 (9.0): 4 × 512, TF32 half.
_TENSOR_FLOPS_PER_SM_PER_CLOCK = {
    (6, 0): {'float16': 64 * 2 * 2},
    (7, 5): {'float16': 1024},
    (8, 0): {'bfloat16': 2048, 'float16': 2048, 'float32': 1024},
    (8, 9): {'bfloat16': 1024, 'float16': 1024, 'float32': 512},
    (9, 0): {'bfloat16': 4096, 'float16': 4096, 'float32': 2048},
}
# Hopper's tensor cores are rated at 1,830 MHz, below the 1,980 MHz boost of its other units (the
# H100 whitepaper's Table 3; XLA's h100_sxm target config rates its matrix units at 1.83 GHz).
_TENSOR_CLOCK_GHZ = {(9, 0): 1.83}


@pytest.mark.parametrize('name', targets.GPUS)
def test_peak_flops_are_the_sms_at_their_clock(name):
    """Each datasheet peak that the roofline divides by, recomputed from the GPU's SMs, their clock
    and what an SM of its architecture does per clock; datasheets round to 2-3 digits."""
    gpu = targets.GPUS[name]
    per_sm = dict(_TENSOR_FLOPS_PER_SM_PER_CLOCK[gpu.compute_capability])
    per_sm.setdefault('float32', 2 * gpu.fp32_lanes_per_sm)  # No TF32 before Ampere.
    assert set(gpu.peak_flops) <= set(per_sm)
    for dtype, peak in gpu.peak_flops.items():
        clock = gpu.boost_clock_ghz if dtype == 'float32' and gpu.compute_capability < (8, 0) else \
            _TENSOR_CLOCK_GHZ.get(gpu.compute_capability, gpu.boost_clock_ghz)
        assert peak == pytest.approx(gpu.sms * per_sm[dtype] * clock * 1e9, rel=0.015), dtype


def test_the_reports_are_their_rooflines_on_todays_targets():
    """Each GPU report against allflax/aot/gpu.py as it is now and the roofline's definition,
    max(FLOPs / peak, bytes / bandwidth): a target changed since the reports were compiled, or a
    roofline computed otherwise, fails here (rerun `python -m allflax.aot.check`)."""
    for report in aot_check.read_reports(os.path.join(ROOT, 'benchmarks', 'gpu_check')):
        gpu, where = targets.GPUS[report['chip']], report['topology']
        peak = gpu.peak_flops[report['dtype']]
        assert report['device_kind'] == gpu.device_kind and report['chip_spec'] == pytest.approx(
            {'hbm_gib': gpu.memory_mib / 1024, 'hbm_gb_per_second': gpu.memory_bytes_per_second / 1e9,
             'peak_tflops': peak / 1e12, 'jax_memory_fraction': 0.75}), where
        assert report['global_batch'] == report['per_chip_batch'] * report['chips'], where
        for step in ('train', 'eval'):
            result, hbm = report[step], report[step]['hbm_per_chip_gib']
            assert result['flops_per_chip'] == pytest.approx(result['flops_per_image'] * report['per_chip_batch'])
            assert hbm['total'] == pytest.approx(hbm['arguments'] + hbm['outputs'] - hbm['aliased']
                                                 + hbm['temporaries'] + hbm['generated_code'])
            pool = 0.75 * gpu.memory_mib / 1024  # JAX's share of the GPU at start; 10 % of it left free.
            assert result['fits'] == (hbm['total'] <= 0.9 * pool), (where, step)
            compute, memory = result['flops_per_chip'] / peak, result['bytes_accessed_per_chip'] / \
                gpu.memory_bytes_per_second
            assert result['roofline'] == pytest.approx({
                'step_seconds': max(compute, memory), 'bound': 'compute' if compute >= memory else 'memory',
                'images_per_second_per_chip': report['per_chip_batch'] / max(compute, memory)}), (where, step)


# Multiply-adds per image of the Keras backbones as published (tests/test_summary.py): VGG19 at
# 224 px, EfficientNetV2-B3 at 300. XLA counts no products with padding (~3 % of VGG19's at 224);
# the recipes' heads add under 1 %. A train step is a forward and a backward of about twice its FLOPs.
_MULTIPLY_ADDS = {'vgg19_mhsa': 19.63e9, 'efficientnetv2_b3_se': 3.01e9}


def test_the_reports_count_the_published_multiply_adds():
    for report in aot_check.read_reports(os.path.join(ROOT, 'benchmarks', 'gpu_check')):
        forward, train_step = report['eval']['flops_per_image'], report['train']['flops_per_image']
        assert 0.95 < forward / (2 * _MULTIPLY_ADDS[report['model']]) < 1.03, report['topology']
        assert 2.9 < train_step / forward < 3.2, report['topology']


def test_table_rows_name_the_config_and_say_what_does_not_fit():
    def report(gpu, gpus, per_gpu, micro, total, fits, arg='gpu', dtype='bfloat16'):
        return {'platform': 'gpu', 'model': 'm', 'config': f'configs/m.py:{arg}', 'chip': gpu, 'chips': gpus,
                'topology': f'{gpus}x{gpu}' if gpus > 1 else gpu,
                'dtype': dtype, 'per_chip_batch': per_gpu, 'chip_spec': {'hbm_gib': 80},
                'train': {'micro_batches': micro, 'hbm_per_chip_gib': {'total': total}, 'hbm_capacity_gib': 15,
                          'fits': fits, 'flops_per_image': 2e10,
                          'roofline': {'images_per_second_per_chip': 99.6, 'bound': 'compute'}}}

    rows = aot_check.table([report('h100', 8, 16, 1, 70.0, False), report('t4', 2, 64, 1, 3.0, True, 'gpu,t4', 'float16'),
                            report('p100', 1, 128, 2, 3.94, True, 'gpu,p100', 'float32'),
                            report('t4', 1, 128, 1, 5.0, True, 'gpu,t4', 'float16')]).splitlines()[2:]
    assert rows == ['| m `gpu,p100` | p100 (Kaggle, free) | 1 | float32 | 128 (2 × 64) | 3.9 / 15.0 | yes | 20 | 100 (compute) |',
                    '| m `gpu,t4` | t4 (Colab, free) | 1 | float16 | 128 | 5.0 / 15.0 | yes | 20 | 100 (compute) |',
                    '| m `gpu,t4` | t4 (Kaggle, free) | 2 | float16 | 64 | 3.0 / 15.0 | yes | 20 | 100 (compute) |',
                    '| m `gpu` | h100 | 8 | bfloat16 | 16 | 70.0 / 15.0 | **no** | 20 | 100 (compute) |']
    with pytest.raises(ValueError, match='two folders'):
        aot_check.table([report('h100', 1, 128, 1, 1.0, True), {**report('h100', 1, 128, 1, 1.0, True),
                                                                 'platform': 'tpu'}])


def test_the_readme_table_is_the_reports_table():
    """README.md's GPU table is `python -m allflax.aot.check --table=benchmarks/gpu_check`, row for
    row, and every recipe's `:gpu` (`:gpu,t4`, `:gpu,p100`) fits each of Colab's and Kaggle's GPUs and a lab's."""
    reports = aot_check.read_reports(os.path.join(ROOT, 'benchmarks', 'gpu_check'))
    with open(os.path.join(ROOT, 'README.md')) as f:
        assert aot_check.table(reports) in f.read(), \
            'README.md: paste the output of python -m allflax.aot.check --table=benchmarks/gpu_check'
    assert all(report['train']['fits'] and report['config'].rpartition(':')[2] in ('gpu', 'gpu,t4', 'gpu,p100')
               for report in reports)
    assert {(report['model'], report['topology']) for report in reports} == {
        (model, topology) for model in ('vgg19_mhsa', 'efficientnetv2_b3_se')
        for topology in ('t4', '2xt4', 'p100', 'l4', 'a100-40gb', 'a100-80gb', 'h100', '8xh100')}
