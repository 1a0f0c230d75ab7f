"""Programs lowered for an accelerator hold XLA's operations only, whatever the host: the CPU
backend's custom calls (`allflax.cpu`) appear only where the program is lowered for CPU. And the
checkpoint tree (state paths, shapes, dtypes) is the one the layout before `allflax.cpu` wrote."""
import json
import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies

from allflax import sharding
from allflax.cpu import kernels as cpu_kernels
from allflax.data import augment
from allflax.training import loop
from configs import efficientnetv2_b3_se, vgg19_mhsa

RECIPES = {'vgg19_mhsa': vgg19_mhsa, 'efficientnetv2_b3_se': efficientnetv2_b3_se}
CPU_TARGET_PREFIX = 'allflax_'  # Every FFI target of allflax/cpu/kernels.py.


def _config(name, **changes):
    config = RECIPES[name].get_config('demo')
    with config.unlocked():
        config.data.image_size = 32
        config.batch_size = 8
        for key, value in changes.items():
            config[key] = value
    return config


def _abstract_batch(mesh, config):
    batch = sharding.batch_sharding(mesh)
    size = config.data.image_size
    return {'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8, sharding=batch),
            'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch)}


def _lowered_train_step(config, mesh, **lower_options):
    built = loop.build(config, 4, 10, mesh, load_pretrained=False, abstract=True)
    step = loop.make_train_step(config, built, mesh)
    return step.trace(built.state, _abstract_batch(mesh, config)).lower(**lower_options)


def _custom_call_targets(lowered) -> set[str]:
    text = lowered.as_text()
    return {line.split('@')[1].split('(')[0] for line in text.splitlines() if 'stablehlo.custom_call @' in line}


@pytest.mark.parametrize('name', RECIPES)
def test_cuda_and_cpu_programs_from_one_host(name):
    """Lowered for CUDA on this CPU host: no CPU kernel. Lowered for CPU: the kernels where built."""
    config = _config(name)
    mesh = sharding.make_mesh()
    cuda = _custom_call_targets(_lowered_train_step(config, mesh, lowering_platforms=('cuda',)))
    assert not {t for t in cuda if t.startswith(CPU_TARGET_PREFIX)}, cuda
    cpu = _custom_call_targets(_lowered_train_step(config, mesh, lowering_platforms=('cpu',)))
    assert any(t.startswith(CPU_TARGET_PREFIX) for t in cpu) == cpu_kernels.available(), cpu


def test_tpu_program_compiles_on_this_host_without_cpu_kernels():
    """The demo-sized VGG19+MHSA train step, compiled for a single-chip v5e on this CPU host."""
    topology = topologies.get_topology_desc(topology_name='v5e:1x1', platform='tpu',
                                            chips_per_host_bounds=(1, 1, 1))
    mesh = sharding.make_mesh(topology.devices)
    config = _config('vgg19_mhsa', dtype='bfloat16')
    lowered = _lowered_train_step(config, mesh)
    targets = _custom_call_targets(lowered)
    assert not {t for t in targets if t.startswith(CPU_TARGET_PREFIX)}, targets
    memory = lowered.compile().memory_analysis()
    # The float32 weights (VGG19's 20.0 M convolution weights and 1.2 M more) and AdamW's two
    # moments are the arguments: 12 bytes per weight, and the small batch.
    weights = sum(x.size for x in jax.tree.leaves(loop.build(config, 4, 10, mesh, abstract=True).state.params))
    assert 21_000_000 < weights < 21_500_000
    assert 12 * weights < memory.argument_size_in_bytes < 12 * weights + 2 ** 20
    assert 0 < memory.temp_size_in_bytes < 2 ** 30


def test_tpu_augmentation_reads_windows_not_pixels():
    """Rotate and crop compiled for v5e: the TPU resampler moves 25× fewer bytes than the portable
    one, a gather per pixel (XLA's cost analysis, 8 images of 64 px)."""
    topology = topologies.get_topology_desc(topology_name='v5e:1x1', platform='tpu',
                                            chips_per_host_bounds=(1, 1, 1))
    mesh = sharding.make_mesh(topology.devices)
    names, params = ('flip', 'rot90', 'rotate', 'crop'), efficientnetv2_b3_se.get_config().data.augment_params
    images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.uint8, sharding=sharding.batch_sharding(mesh))

    def portable(images, key):
        draws = augment.draw(key, images.shape, names, params)
        rows, cols = augment._source_coordinates(images.shape, draws)
        return jax.vmap(augment._bilinear)(images.astype(jnp.float32), rows, cols)

    def tpu(images, key):
        return augment.augment(images, key, names, params)

    moved = {f.__name__: jax.jit(f).trace(images, jax.random.key(0)).lower().compile().cost_analysis()
             ['bytes accessed'] for f in (portable, tpu)}
    assert moved['tpu'] * 10 < moved['portable'], moved


def test_checkpoint_tree_is_the_one_written_before_the_cpu_package():
    """Checkpoints restore by state path: the tree (path, shape, dtype) of both recipes' train state
    equals the one recorded at 6782d75, the last commit of the old layout."""
    with open(os.path.join(os.path.dirname(__file__), 'data', 'checkpoint_tree_6782d75.json')) as f:
        recorded = json.load(f)
    mesh = sharding.make_mesh()
    for name in RECIPES:
        built = loop.build(_config(name), 4, 10, mesh, load_pretrained=False, abstract=True)
        leaves = jax.tree_util.tree_flatten_with_path(built.state)[0]
        assert [[jax.tree_util.keystr(path), list(x.shape), str(x.dtype)] for path, x in leaves] == recorded[name]
