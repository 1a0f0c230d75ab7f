"""Recipe arg strings: `:gpu` and `:tpu` give bfloat16 runs at accelerator batch sizes."""
import importlib
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from allflax import aot_check, models
from configs import common, efficientnetv2_b3_se, vgg19_mhsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = (vgg19_mhsa, efficientnetv2_b3_se)
# Every accelerator arg a run may use: each must have compiled reports behind it.
VARIANTS = ('tpu', 'gpu', *(f'gpu,{name}' for name in common.GPU_VARIANTS))


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


@pytest.mark.parametrize('recipe', RECIPES)
@pytest.mark.parametrize('accelerator', sorted(common.ACCELERATORS))
def test_accelerator_arg_builds_a_bfloat16_model(recipe, accelerator):
    config = recipe.get_config(accelerator)
    assert config.dtype == 'bfloat16'
    assert config.batch_size == common.ACCELERATORS[accelerator]['batch_size']
    assert config.data.image_size == recipe.get_config().data.image_size  # Only dtype and batch change.
    model = nnx.eval_shape(lambda: models.create(config.model.name, 2, dtype=config.dtype,
                                                 image_size=config.data.image_size, **config.model.options))
    graphdef, state = nnx.split(model)
    size = config.data.image_size
    logits = jax.eval_shape(lambda state, images: nnx.merge(graphdef, state)(images), state,
                            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    assert logits.shape == (2, 2) and logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}


def test_args_apply_in_order_and_unknown_ones_are_refused():
    assert vgg19_mhsa.get_config('demo,gpu').batch_size == common.ACCELERATORS['gpu']['batch_size']
    assert vgg19_mhsa.get_config('gpu,demo').batch_size == common.DEMO['batch_size']
    with pytest.raises(ValueError, match='known: demo, gpu, tpu'):
        vgg19_mhsa.get_config('h100')


def test_demo_overrides_apply_only_to_the_demo():
    full, demo = efficientnetv2_b3_se.get_config(), efficientnetv2_b3_se.get_config('demo')
    assert 'hed' in full.data.augment and 'drop_connect_rate' not in full.model.options
    assert demo.data.augment == ('flip', 'rot90') and demo.model.options.drop_connect_rate == 0.0
    assert demo.total_steps == common.DEMO['total_steps']


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


def test_a_t4_computes_in_float32_in_micro_batches():
    """`:gpu,t4`: a T4 has no bfloat16 tensor cores; the batch stays the recipe's `:gpu` batch."""
    config = vgg19_mhsa.get_config('gpu,t4')
    assert (config.dtype, config.batch_size, config.max_device_batch) == ('float32', 128, 64)
