"""batch_norm.norm: flax's nnx.BatchNorm (then nnx.swish) in values, gradients and running
statistics, through its hand-derived gradient in training mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from allflax.models import batch_norm


def relative_error(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize('dtype, tolerance', [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize('swish', [False, True])
@pytest.mark.parametrize('shape', [(4, 5, 7, 6), (16, 6)])
def test_norm_is_flax_batch_norm(shape, swish, dtype, tolerance):
    bn = nnx.BatchNorm(shape[-1], momentum=0.9, epsilon=1e-3, dtype=dtype, rngs=nnx.Rngs(0),
                       scale_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.normal(1.0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    graphdef, state = nnx.split(bn)

    def ours(state, x):
        module = nnx.merge(graphdef, state)
        return batch_norm.norm(module, x.astype(dtype), swish), nnx.state(module, nnx.BatchStat)

    def flax(state, x):
        module = nnx.merge(graphdef, state)
        y = module(x.astype(dtype))
        return (nnx.swish(y) if swish else y), nnx.state(module, nnx.BatchStat)

    def loss_grads(function):
        return jax.jit(jax.grad(lambda s, x: jnp.sum(function(s, x)[0].astype(jnp.float32) * cotangent), (0, 1)))(
            state, images)

    (got, got_stats), (want, want_stats) = jax.jit(ours)(state, images), jax.jit(flax)(state, images)
    assert got.dtype == want.dtype == dtype
    assert relative_error(got, want) <= tolerance
    for name in ('mean', 'var'):  # Running statistics moved by the same step.
        assert relative_error(got_stats[name][...], want_stats[name][...]) <= 1e-6
    (got_params, got_images), (want_params, want_images) = loss_grads(ours), loss_grads(flax)
    assert relative_error(got_images, want_images) <= tolerance
    for name in ('scale', 'bias'):
        assert relative_error(got_params[name][...], want_params[name][...]) <= tolerance


def test_eval_mode_uses_running_statistics():
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    bn.mean[...] = jnp.array([1.0, 2.0, 3.0])
    bn.eval()
    x = jnp.ones((2, 4, 4, 3))
    np.testing.assert_allclose(batch_norm.norm(bn, x, swish=True), nnx.swish(bn(x)), rtol=1e-6)
