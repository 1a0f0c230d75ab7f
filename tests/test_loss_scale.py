"""float16 training with dynamic loss scaling (`:gpu,t4`), on a tiny model with batch norm: the
scale's rule against Flax's DynamicScale and PyTorch's published defaults, a skipped step that
changes nothing, float32 where float16's range is too small, and a resume that keeps the scale."""
import functools
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import attention as nnx_attention
from flax.training import dynamic_scale

from allflax import models, sharding
from allflax.models import attention, batch_norm
from allflax.modes import evaluate
from allflax.training import checkpoints, loop, loss_scale as loss_scaling, losses, state
from configs import common

TINY = 'tiny_bn_for_loss_scale_tests'


class TinyBatchNormNet(nnx.Module):
    """A convolution, allflax's batch norm and swish, a float32 pooled head: the parts of the
    recipes that float16 touches, compiled in a second."""

    def __init__(self, num_classes, *, include_top, dtype, param_dtype, rngs):
        del include_top
        self.dtype = dtype
        self.conv = nnx.Conv(3, 8, (3, 3), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(8, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.predictions = nnx.Linear(8, num_classes, dtype=models.head_dtype(dtype), param_dtype=param_dtype,
                                      rngs=rngs)

    def __call__(self, images):
        x = batch_norm.norm(self.bn, self.conv(images.astype(self.dtype)), swish=True)
        return self.predictions(x.astype(models.head_dtype(self.dtype)).mean(axis=(1, 2))).astype(jnp.float32)


if TINY not in models._REGISTRY:
    models.register(TINY)(TinyBatchNormNet)


def _config(dtype: str, image_size: int = 16, batch_size: int = 8) -> ml_collections.ConfigDict:
    config = common.base_config(model=TINY, data='synthetic_all4', image_size=image_size, batch_size=batch_size,
                                num_epochs=1, learning_rate=1e-2)
    config.dtype, config.data.augment = dtype, ()  # No augmentation: a smaller program to compile.
    return config


@functools.cache
def _compiled(dtype: str):
    config, mesh = _config(dtype), sharding.make_mesh()
    built = loop.build(config, 4, 40, mesh)
    return built, loop.make_train_step(config, built, mesh), mesh


def _setup(dtype: str):
    """(a fresh copy of the initial state, the jitted step, the mesh): the step donates its state."""
    built, step, mesh = _compiled(dtype)
    return jax.tree.map(lambda x, where: jax.device_put(jnp.copy(x), where), built.state, built.state_sharding), \
        step, mesh


def _batches(mesh, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sharding.put_batch({'image': rng.integers(0, 256, (8, 16, 16, 3), np.uint8),
                                'label': rng.integers(0, 4, 8).astype(np.int32)}, sharding.batch_sharding(mesh))
            for _ in range(count)]


def _with_scale(train_state, scale: float, finite_steps: int = 0, skipped_steps: int = 0):
    values = loss_scaling.LossScale(scale=jnp.float32(scale), finite_steps=jnp.int32(finite_steps),
                                    skipped_steps=jnp.int32(skipped_steps))
    return train_state.replace(loss_scale=jax.device_put(values, train_state.loss_scale.scale.sharding))


def _float_leaves(tree):
    return [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]


def test_the_defaults_are_pytorchs_and_flaxs():
    """PyTorch's GradScaler documents init_scale=65536, growth_factor=2, backoff_factor=0.5,
    growth_interval=2000; Flax's DynamicScale has the same."""
    flax_scale = dynamic_scale.DynamicScale()
    assert (loss_scaling.INITIAL_SCALE, loss_scaling.GROWTH_FACTOR, loss_scaling.BACKOFF_FACTOR,
            loss_scaling.GROWTH_INTERVAL) == (65536.0, 2.0, 0.5, 2000)
    assert (flax_scale.scale, flax_scale.growth_factor, flax_scale.backoff_factor) == (65536.0, 2.0, 0.5)


def test_the_scale_follows_flaxs_dynamic_scale_over_random_steps():
    """Over 60 steps, 1 in 4 overflowing, scale and counts as Flax's DynamicScale gives them. Flax
    grows on the (interval + 1)-th finite step, PyTorch on the interval-th: Flax's with interval 2
    is PyTorch's (and allflax's) with 3."""
    finite_flags = np.random.default_rng(0).random(60) > 0.25
    reference = dynamic_scale.DynamicScale(growth_interval=2)
    gradient = jax.jit(lambda ds, p, c: ds.value_and_grad(lambda p, c: p * c)(p, c))
    ours = loss_scaling.initial()
    scales = []
    for finite in finite_flags:
        reference, reference_finite, _, _ = gradient(reference, jnp.float32(1), jnp.float32(1 if finite else jnp.inf))
        assert bool(reference_finite) == finite
        ours = loss_scaling.adjust(ours, jnp.asarray(finite), growth_interval=3)
        assert float(ours.scale) == float(reference.scale) and int(ours.finite_steps) == int(reference.fin_steps)
        scales.append(float(ours.scale))
    assert int(ours.skipped_steps) == int((~finite_flags).sum())
    assert max(scales) > loss_scaling.INITIAL_SCALE > min(scales)  # Both rules were exercised.


def test_a_gradient_of_1e_8_survives_scaling_and_underflows_without():
    """d/dw of 1e-8 · Σ float16(x · w), x = 1: the cotangent 1e-8 is below float16's smallest
    subnormal (6e-8) and flushes to zero; scaled by 2^16 it is 6.6e-4, and unscaling in float32
    gives back 1e-8 (float16 rounds the scaled value to 11 bits)."""
    x = jnp.ones(4, jnp.float16)

    def loss(w):
        return 1e-8 * jnp.sum((x * w.astype(jnp.float16)).astype(jnp.float32))

    w = jnp.full(4, 0.5, jnp.float32)
    np.testing.assert_array_equal(jax.grad(loss)(w), np.zeros(4))
    scale = loss_scaling.initial()
    grads, finite = loss_scaling.unscale(jax.grad(lambda w: loss(w) * scale.scale)(w), scale)
    assert bool(finite) and grads.dtype == jnp.float32
    np.testing.assert_allclose(grads, np.full(4, 1e-8), rtol=1e-3)


def test_an_overflowing_step_changes_nothing_but_the_scale():
    """At a scale of 2^120 the float16 backward overflows: params, optimiser state (AdamW's and the
    schedule's counts) and batch statistics stay bit for bit; the scale halves, one step is
    counted skipped, the step (the batch's position) moves on."""
    initial, step, mesh = _setup('float16')
    (batch,) = _batches(mesh, 1)
    before = _with_scale(initial, 2.0 ** 120, finite_steps=5, skipped_steps=2)
    host_before = jax.device_get(before)
    after, metrics = step(before, batch)
    host_after = jax.device_get(after)
    for name in ('params', 'opt_state', 'batch_stats'):
        jax.tree.map(np.testing.assert_array_equal, getattr(host_after, name), getattr(host_before, name))
    assert int(host_after.step) == 1
    assert (float(host_after.loss_scale.scale), int(host_after.loss_scale.finite_steps),
            int(host_after.loss_scale.skipped_steps)) == (2.0 ** 119, 0, 3)
    assert bool(metrics['finite']) and np.isfinite(float(metrics['loss']))
    assert float(metrics['loss_scale']) == 2.0 ** 119 and int(metrics['skipped_steps']) == 3
    # The schedule is at its count of updates: 1 - 3 skipped < 0 is warmup's start, 0.
    assert float(metrics['learning_rate']) == 0.0
    # The same step at 2^16 is applied (the batch does not overflow by itself): AdamW's moments and
    # counts move (the learning rate of step 0 is warmup's 0) and so do the batch statistics.
    applied = jax.device_get(step(_with_scale(_setup('float16')[0], 2.0 ** 16), batch)[0])
    assert int(applied.loss_scale.skipped_steps) == 0
    for name in ('opt_state', 'batch_stats'):
        assert all(not np.array_equal(new, old) for new, old in zip(
            _float_leaves(getattr(applied, name)), _float_leaves(getattr(host_before, name)))), name


def test_a_non_finite_loss_stops_the_run_an_overflow_of_the_scale_does_not():
    """The loop's `finite` flag: an overflow at a scale above 1 is the scale's (skipped, training
    goes on); a NaN weight (a non-finite loss) is divergence, and the step still changes nothing;
    the loop's message for a float16 run says what float16 could not hold and what to do."""
    initial, step, mesh = _setup('float16')
    (batch,) = _batches(mesh, 1)
    _, metrics = step(_with_scale(initial, 2.0 ** 120), batch)
    assert bool(metrics['finite'])
    broken = _setup('float16')[0]
    broken.params['predictions']['bias'][...] = jnp.full_like(broken.params['predictions']['bias'][...], jnp.nan)
    host_before = jax.device_get(broken)
    after, metrics = step(broken, batch)
    assert not bool(metrics['finite']) and int(after.loss_scale.skipped_steps) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.params), host_before.params)
    with pytest.raises(loop.Diverged) as error:
        loop._check_finite([True, False], 41, 40, '/runs/a/checkpoints', scaled=True)
    assert str(error.value) == (
        "non-finite loss, or gradients beyond float16's range at a loss scale of 1 or below, at step 42 (1 of the "
        'last 2 steps); the run stopped without saving that state (the last checkpoint is step 40 in '
        '/runs/a/checkpoints). Lower --config.optimizer.learning_rate, check the data, or train in float32 or '
        'bfloat16 (--config.dtype).')


def test_the_scale_doubles_after_the_interval():
    initial, step, mesh = _setup('float16')
    batch_a, batch_b = _batches(mesh, 2)
    after, _ = step(_with_scale(initial, 2.0 ** 16, finite_steps=loss_scaling.GROWTH_INTERVAL - 2), batch_a)
    assert (float(after.loss_scale.scale), int(after.loss_scale.finite_steps)) == (2.0 ** 16, 1999)
    after, _ = step(after, batch_b)
    assert (float(after.loss_scale.scale), int(after.loss_scale.finite_steps),
            int(after.loss_scale.skipped_steps)) == (2.0 ** 17, 0, 0)


def test_dtypes_float32_state_float16_compute():
    """The float16 run's params, AdamW's moments, batch statistics, scale and loss are float32;
    its convolutions run in float16; a float32 run's state holds no loss scale."""
    initial, step, mesh = _setup('float16')
    train_state = initial
    assert isinstance(train_state, state.ScaledTrainState)
    for name in ('params', 'opt_state', 'batch_stats'):
        leaves = _float_leaves(getattr(train_state, name))
        assert leaves and {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}, name
    assert train_state.loss_scale.scale.dtype == jnp.float32
    (batch,) = _batches(mesh, 1)
    _, metrics = step(train_state, batch)
    assert metrics['loss'].dtype == jnp.float32
    assert 'tensor<8x16x16x8xf16>' in step.lower(train_state, batch).as_text()  # The convolution's output.
    float32_state = _setup('float32')[0]
    assert type(float32_state) is state.TrainState and not hasattr(float32_state, 'loss_scale')


def test_float16_and_float32_training_losses_agree():
    """30 steps of the same batches: each float16 step's loss within 1 % of float32's (float16's
    11-bit mantissa rounds activations and weights to ~5e-4), and the last loss below the first."""
    batches = _batches(sharding.make_mesh(), 30, seed=1)
    curves = {}
    for dtype in ('float16', 'float32'):
        train_state, step, _ = _setup(dtype)
        curve = []
        for batch in batches:
            train_state, metrics = step(train_state, batch)
            curve.append(float(metrics['loss']))
        curves[dtype] = np.array(curve)
        if dtype == 'float16':
            assert int(train_state.loss_scale.skipped_steps) == 0
    np.testing.assert_allclose(curves['float16'], curves['float32'], rtol=0.01)
    assert curves['float32'][-5:].mean() < 0.9 * curves['float32'][:5].mean()


def test_attention_stays_finite_where_float16_logits_overflow():
    """Paper 1's attention block in float16 with query and key weights ×200: its logits (up to
    ~1e5) overflow float16, and an attention computed in float16 is NaN; the block's, in float32,
    is finite, as are its gradients, on inputs up to ±3e4."""
    def block(dtype):
        module = attention.MultiHeadSelfAttention(64, 16, num_heads=2, dropout_rate=0.0, dtype=dtype,
                                                  param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        for projection in (module.attention.query, module.attention.key):
            projection.kernel[...] = projection.kernel[...] * 200
        return module

    features = jnp.asarray(np.random.default_rng(0).uniform(-3e4, 3e4, (2, 4, 4, 64)), jnp.float16)
    graphdef, params = nnx.split(block(jnp.float16))

    @jax.jit
    def run(params):
        def loss(params):
            out = nnx.merge(graphdef, params)(features)
            return jnp.sum(out.astype(jnp.float32) * 1e-4), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        # The same query and key, attended in float16 as flax does by default.
        module = nnx.merge(graphdef, params)
        normed = module.norm(features.reshape(2, 16, 64) + module.position_embedding[...].astype(jnp.float16))
        in_float16 = nnx_attention.dot_product_attention_weights(
            module.attention.query(normed), module.attention.key(normed), dtype=jnp.float16)
        return out, grads, in_float16

    out, grads, in_float16 = run(params)
    assert out.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(out)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert not bool(jnp.all(jnp.isfinite(in_float16)))


def test_focal_loss_is_finite_on_extreme_float16_logits():
    """Logits at float16's extremes (±65,504) and 0: loss and gradient finite, the loss as the
    formula in float64 with log-sigmoid written stably (log p = -log(1 + e^-x))."""
    big = float(jnp.finfo(jnp.float16).max)
    logits = jnp.asarray([[big, -big, 0.0, big], [-big, big, -big, 0.0]], jnp.float16)
    labels = np.array([0, 2])
    value, grad = jax.jit(jax.value_and_grad(lambda x: losses.focal_loss(x, labels, alpha=0.25, gamma=2.0)))(
        logits.astype(jnp.float32))
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad)))
    x, y = np.asarray(logits, np.float64), np.eye(4)[labels]
    log_p, log_not_p = -np.logaddexp(0, -x), -np.logaddexp(0, x)
    p = np.exp(log_p)
    per_class = np.where(y == 1, -0.25 * (1 - p) ** 2 * log_p, -0.75 * p ** 2 * log_not_p)
    np.testing.assert_allclose(float(value), per_class.sum(1).mean(), rtol=1e-6)


def test_a_resumed_float16_run_keeps_its_scale_and_logs_it(make_tiny_config, tmp_path, monkeypatch):
    """Every step of a run started at a scale of 2^120 overflows and is skipped: 6 steps, then the
    same run resumed to 12, continues from the checkpoint's 2^114 and 6 skipped steps to 2^108 and
    12 (a lost scale would restart at 2^120); metrics.jsonl and TensorBoard have both; the params
    are still the initial ones; --mode=eval restores the run."""
    monkeypatch.setattr(loss_scaling, 'INITIAL_SCALE', 2.0 ** 120)
    config = make_tiny_config()
    with config.unlocked():
        config.dtype, config.model.name, config.model.options = 'float16', TINY, ml_collections.ConfigDict()
        config.total_steps = 6
    workdir = str(tmp_path / 'run')
    loop.train_and_evaluate(config, workdir)
    with config.unlocked():
        config.total_steps = 12
    loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        logged = {r['step']: (r['train_loss_scale'], r['train_skipped_steps'])
                  for r in map(json.loads, f) if 'train_loss' in r}
    assert logged == {step: (2.0 ** (120 - step), step) for step in (2, 4, 6, 8, 10, 12)}
    events = b''.join(open(path, 'rb').read() for path in glob.glob(os.path.join(workdir, 'tensorboard', '*')))
    assert b'train/loss_scale' in events and b'train/skipped_steps' in events
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
    built = loop.build(config, 4, 12, sharding.make_mesh(), abstract=True)
    saved, _ = checkpointer.restore(12, checkpoints.abstract_with_sharding(built.state, built.state_sharding))
    checkpointer.close()
    assert (float(saved.loss_scale.scale), int(saved.loss_scale.skipped_steps)) == (2.0 ** 108, 12)
    initial = loop.build(config, 4, 12, sharding.make_mesh()).state
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.params), jax.device_get(initial.params))
    assert evaluate.evaluate(config, workdir, with_report=False)['checkpoint_step'] == 12


# Paper 1's model, and paper 2's head (SE, hidden layer with batch norm) on B0's smaller trunk.
@pytest.mark.parametrize('name, options, channels', [
    ('vgg19_mhsa', dict(image_size=32), 512), ('efficientnetv2_b0', dict(se_ratio=1 / 16, head_hidden=1280), 1280)])
def test_the_recipes_heads_pool_and_classify_in_float32_under_float16(name, options, channels):
    """A recipe's head (pooling, hidden layer, classifier) on a float16 feature map of values up to
    3e4 with a classifier's weights of std 10 (the convolutions are zeros, not run): logits beyond
    float16's 65,504, finite and float32, as the float32 model's to float16's rounding."""
    def abstract(dtype):
        return nnx.split(nnx.eval_shape(lambda: models.create(name, 4, dtype=dtype, **options)))

    graphdef16, shapes = abstract(jnp.float16)
    def concrete(x):  # Zeros; dropout's keys (unused in eval mode) as keys.
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return jax.device_put(np.zeros(x.shape, x.dtype))

    model = nnx.merge(graphdef16, jax.tree.map(concrete, shapes))
    model.eval()
    rng = np.random.default_rng(0)
    model.predictions.kernel[...] = jnp.asarray(rng.normal(0, 10, model.predictions.kernel.shape), jnp.float32)
    if hasattr(model, 'head_fc'):
        model.head_fc.kernel[...] = jnp.asarray(rng.normal(0, 0.01, model.head_fc.kernel.shape), jnp.float32)
    if hasattr(model, 'head_bn'):
        model.head_bn.scale[...] = jnp.ones_like(model.head_bn.scale[...])
        model.head_bn.var[...] = jnp.ones_like(model.head_bn.var[...])
    features = jnp.asarray(rng.uniform(0, 3e4, (2, 1, 1, channels)), jnp.float16)
    graphdef16, weights = nnx.split(model)
    graphdef32 = abstract(jnp.float32)[0]

    @jax.jit
    def heads(weights):
        model16, model32 = nnx.merge(graphdef16, weights), nnx.merge(graphdef32, weights)
        model32.eval()
        return model16.head(features), model32.head(features.astype(jnp.float32))

    logits16, logits32 = heads(weights)
    assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
    assert float(jnp.abs(logits32).max()) > 65504
    np.testing.assert_allclose(logits16, logits32, rtol=1e-2, atol=1e-2 * float(jnp.abs(logits32).max()))
