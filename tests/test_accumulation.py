"""Gradient accumulation: without batch norm, a batch taken as micro-batches gives the full batch's
update; with it, the batch that batch norm normalises over is recorded."""
import jax
import numpy as np
import pytest

from allflax import sharding
from allflax.training import loop, steps


@pytest.mark.parametrize('max_device_batch, expected', [(0, 1), (8, 1), (4, 2), (3, 4), (1, 8)])
def test_accumulation_steps_divide_the_device_share(tiny_config, max_device_batch, expected):
    with tiny_config.unlocked():
        tiny_config.max_device_batch = max_device_batch
    assert loop.accumulation_steps(tiny_config, num_devices=1) == expected  # 8 images on one device.


@pytest.mark.parametrize('devices, batch_norm, expected', [
    (1, True, {'devices': 1, 'device_batch': 256, 'micro_batches': 4, 'batch_norm_batch': 64}),  # One v5e chip.
    (8, True, {'devices': 8, 'device_batch': 32, 'micro_batches': 1, 'batch_norm_batch': 256}),  # A v5e-8 host.
    (2, True, {'devices': 2, 'device_batch': 128, 'micro_batches': 2, 'batch_norm_batch': 128}),
    (1, False, {'devices': 1, 'device_batch': 256, 'micro_batches': 4, 'batch_norm_batch': None})])
def test_the_batch_norm_batch_is_one_micro_batch_over_all_devices(tiny_config, devices, batch_norm, expected):
    """`:tpu`'s batch 256 with at most 64 images per device per pass."""
    with tiny_config.unlocked():
        tiny_config.batch_size, tiny_config.max_device_batch = 256, 64
    assert loop.derived_batches(tiny_config, devices, batch_norm) == expected


# Each micro-batch is augmented in its turn, with its rows of the batch's draws. Every op but
# `color` gives the same images for 2 rows as for 8 (its per-image mean luma rounds apart by
# ~1e-4 of a grey level: test_augment), and Adam's first, sign-like step would amplify that.
# The sums run in another order (and the convolution kernels pick their algorithms by batch size),
# so the two updates agree to float32 noise, which differs by CPU: measured, the first moments
# within 0.7 % of each layer's largest element (AMD Zen 3, AVX2) and the parameter updates within
# 0.2 % on average per layer; a micro-batch dropped or averaged wrongly moves them by 25 % or more.
def test_micro_batches_give_the_full_batch_update(tiny_config):
    """VGG19+MHSA without dropout (no batch norm): the first moment is the gradient's; loss,
    accuracy and the updated state match the one-batch step."""
    with tiny_config.unlocked():
        tiny_config.model.options.dropout_rate = 0.0
        tiny_config.data.augment = ('flip', 'rot90', 'rotate', 'crop', 'blur', 'hed')
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             'label': rng.integers(0, 4, 8).astype(np.int32)}
    results = {}
    for k in (1, 4):
        built = loop.build(tiny_config, 4, 10, mesh, load_pretrained=False)
        initial = jax.device_get(built.state.params)
        data = loop.resolve_input_convention(tiny_config).data
        step = steps.make_train_step(built, mesh, data=data, loss=tiny_config.loss,
                                     dtype=tiny_config.dtype, seed=tiny_config.seed, accumulation_steps=k)
        state, metrics = step(built.state, sharding.put_batch(batch, sharding.batch_sharding(mesh)))
        state, _ = step(state, sharding.put_batch(batch, sharding.batch_sharding(mesh)))
        results[k] = jax.device_get((state, metrics))
    (full, full_metrics), (micro, micro_metrics) = results[1], results[4]
    np.testing.assert_allclose(micro_metrics['loss'], full_metrics['loss'], rtol=1e-5)
    assert micro_metrics['accuracy'] == full_metrics['accuracy']
    first_moments = [jax.tree.leaves(s.opt_state[1][0].mu) for s in (full, micro)]
    for a, b in zip(*first_moments):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * np.abs(a).max())
    for start, a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(full.params), jax.tree.leaves(micro.params)):
        assert np.abs(b - a).mean() <= 1e-2 * np.abs(a - start).mean(), a.shape
