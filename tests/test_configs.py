"""Recipe arg strings: `:gpu` and `:tpu` give bfloat16 runs at accelerator batch sizes, and agree
with the compiled reports of benchmarks/tpu_check and benchmarks/gpu_check."""
import functools
import importlib
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from allflax import models
from allflax.aot import check as aot_check, gpu as targets
from configs import common, efficientnetv2_b3_se, vgg19_mhsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = (vgg19_mhsa, efficientnetv2_b3_se)
# Every accelerator arg a run may use: each must have compiled reports behind it.
VARIANTS = ('tpu', 'gpu', *(f'gpu,{name}' for name in common.GPU_VARIANTS))
# What an accelerator arg may change: the arithmetic and how a batch is cut, never the recipe.
_ACCELERATOR_KEYS = {'dtype', 'batch_size', 'max_device_batch', 'checkpoint_every_steps'}


def _flat(config, prefix=''):
    flat = {}
    for key, value in config.items():
        if hasattr(value, 'items'):
            flat.update(_flat(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def reports_with_configs():
    """(report, the config it names) for every report of both folders."""
    pairs = []
    for folder in ('tpu_check', 'gpu_check'):
        for report in aot_check.read_reports(os.path.join(ROOT, 'benchmarks', folder)):
            path, _, arg = report['config'].partition(':')
            assert report['overrides'] == {}, report['config']
            module = importlib.import_module(path.removesuffix('.py').replace('/', '.'))
            pairs.append((report, module.get_config(arg)))
    return pairs


@functools.cache
def _model_dtypes(recipe_name: str, arg: str):
    """(logits, the params' dtypes) of the recipe's model as `arg` builds it: traced once for the
    args that build the same model (`:gpu` and `:tpu` differ only in batch)."""
    config = importlib.import_module(recipe_name).get_config(arg)
    model = nnx.eval_shape(lambda: models.create(config.model.name, 2, dtype=config.dtype,
                                                 image_size=config.data.image_size, **config.model.options))
    graphdef, state = nnx.split(model)
    size = config.data.image_size
    logits = jax.eval_shape(lambda state, images: nnx.merge(graphdef, state)(images), state,
                            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    return logits, {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize('recipe', RECIPES)
@pytest.mark.parametrize('accelerator', sorted(common.ACCELERATORS))
def test_accelerator_arg_builds_a_bfloat16_model(recipe, accelerator):
    config, default = recipe.get_config(accelerator), recipe.get_config()
    assert config.dtype == 'bfloat16' and config.batch_size > default.batch_size
    changed = {key for key, value in _flat(config).items() if _flat(default)[key] != value}
    assert changed <= _ACCELERATOR_KEYS, changed
    assert _flat(config.model) == _flat(recipe.get_config('gpu').model)  # The same model for every accelerator.
    logits, param_dtypes = _model_dtypes(recipe.__name__, 'gpu')
    assert logits.shape == (2, 2) and logits.dtype == jnp.float32
    assert param_dtypes == {jnp.dtype('float32')}


def test_args_apply_in_order_and_unknown_ones_are_refused():
    gpu, demo = vgg19_mhsa.get_config('gpu'), vgg19_mhsa.get_config('demo')
    assert gpu.batch_size != demo.batch_size
    assert vgg19_mhsa.get_config('demo,gpu').batch_size == gpu.batch_size
    assert vgg19_mhsa.get_config('gpu,demo').batch_size == demo.batch_size
    with pytest.raises(ValueError, match='known: demo, gpu, tpu'):
        vgg19_mhsa.get_config('h100')


def test_demo_overrides_apply_only_to_the_demo():
    full, demo = efficientnetv2_b3_se.get_config(), efficientnetv2_b3_se.get_config('demo')
    assert 'hed' in full.data.augment and 'drop_connect_rate' not in full.model.options
    assert demo.data.augment == ('flip', 'rot90') and demo.model.options.drop_connect_rate == 0.0
    assert demo.total_steps == common.DEMO['total_steps']


def test_the_reports_are_of_the_configs_as_they_are():
    """Each report's dtype, batch and micro-batches are what its config gives today: a config
    changed since its report was compiled fails here (rerun `python -m allflax.aot.check`)."""
    for report, config in reports_with_configs():
        where = f"{report['config']} on {report['topology']}"
        assert (report['dtype'], report['global_batch'], report['image_size']) == (
            config.dtype, config.batch_size, config.data.image_size), where
        per_device = config.batch_size // report['devices']
        micro_batches = -(-per_device // config.max_device_batch)  # Whole micro-batches of at most the limit.
        assert per_device % micro_batches == 0 and report['train']['micro_batches'] == micro_batches, where


@pytest.mark.parametrize('recipe', RECIPES)
@pytest.mark.parametrize('name', sorted(common.GPU_VARIANTS))
def test_a_gpu_without_bfloat16_makes_the_gpu_update_in_a_dtype_it_has(recipe, name):
    """`:gpu,t4` and `:gpu,p100`: the update of `:gpu` (the same global batch), in a dtype that the GPU
    computes (allflax/aot/gpu.py: neither has bfloat16) and `:gpu`'s dtype on every other GPU;
    the T4's fastest (float16, its tensor cores')."""
    gpu, variant = recipe.get_config('gpu'), recipe.get_config(f'gpu,{name}')
    assert variant.batch_size == gpu.batch_size and variant.optimizer == gpu.optimizer
    assert variant.dtype in targets.GPUS[name].peak_flops and gpu.dtype not in targets.GPUS[name].peak_flops
    assert all(gpu.dtype in target.peak_flops for other, target in targets.GPUS.items()
               if other not in common.GPU_VARIANTS)
    t4 = targets.GPUS['t4'].peak_flops
    assert recipe.get_config('gpu,t4').dtype == max(t4, key=t4.get)


# A tenth of the roofline: what a real step reaches is below it (data loading, the host, the
# roofline's perfect overlap), by less than this for convolution networks on TPU; GPUs are taken
# at the same fraction.
_FRACTION_OF_ROOFLINE = 0.1
_MOST_SECONDS_LOST = 600


def test_a_disconnect_loses_at_most_ten_minutes_and_a_synthetic_run_checkpoints_before_its_half():
    """Colab can disconnect at any time: at a tenth of the roofline of every TPU and GPU that a
    config was compiled for (its reports), its checkpoints come at most 10 minutes apart; on the
    default synthetic sets the first one comes before half of the run."""
    checked = set()
    for report, config in reports_with_configs():
        images_per_second = (_FRACTION_OF_ROOFLINE * report['chips']
                             * report['train']['roofline']['images_per_second_per_chip'])
        seconds = config.checkpoint_every_steps * config.batch_size / images_per_second
        assert seconds <= _MOST_SECONDS_LOST, (
            f"{report['config']} on {report['topology']}: a checkpoint every {config.checkpoint_every_steps} steps "
            f'of {config.batch_size} is every {seconds / 60:.0f} minutes at {images_per_second:.1f} images/s')
        checked.add((config.model.name, report['config'].rpartition(':')[2]))
    assert checked == {(recipe.get_config().model.name, arg) for recipe in RECIPES for arg in VARIANTS}
    for recipe in RECIPES:
        for arg in VARIANTS:
            config = recipe.get_config(arg)
            train_images = int(config.data.split_fractions.train * config.data.num_images)
            total = config.num_epochs * (train_images // config.batch_size)
            assert config.checkpoint_every_steps < total / 2, (recipe.__name__, arg, total)
