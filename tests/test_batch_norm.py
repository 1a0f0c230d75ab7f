"""batch_norm.norm: flax's nnx.BatchNorm (then nnx.swish) in values, gradients and running
statistics, through its hand-derived gradient in training mode: with the CPU kernels
(activation_kernels.cc) and in JAX."""
import jax
import jax.numpy as jnp
import numpy as np
import platform_deps
import pytest
from flax import nnx

from allflax.cpu import kernels as cpu_kernels
from allflax.models import batch_norm


def relative_error(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize('dtype, tolerance', [(jnp.float32, 2e-6), (jnp.bfloat16, 5e-3)])
@pytest.mark.parametrize('swish', [False, True])
# Shapes: a few rows; many rows over the kernels' threads, not a whole number of their blocks;
# more channels than a block holds; a dense layer's (batch, features).
@pytest.mark.parametrize('shape', [(4, 5, 7, 6), (4, 37, 41, 24), (2, 3, 5, 600), (16, 6)])
def test_norm_is_flax_batch_norm(shape, swish, dtype, tolerance, kernels_built):
    """Against flax's layer in float32 on the same (rounded) inputs: flax's own bfloat16 layer is
    further from it (1.2e-2 of the input gradient's max at (4, 37, 41, 24), ours 2.8e-3)."""
    def layer(dtype):
        return nnx.BatchNorm(shape[-1], momentum=0.9, epsilon=1e-3, dtype=dtype, rngs=nnx.Rngs(0),
                             scale_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.normal(1.0))

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal(shape) * 3 + 1, dtype).astype(jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(shape), dtype).astype(jnp.float32)
    graphdef, state = nnx.split(layer(dtype))
    flax_graphdef, flax_state = nnx.split(layer(jnp.float32))

    def ours(state, x):
        module = nnx.merge(graphdef, state)
        return batch_norm.norm(module, x.astype(dtype), swish), nnx.state(module, nnx.BatchStat)

    def flax(state, x):
        module = nnx.merge(flax_graphdef, state)
        y = module(x)
        return (nnx.swish(y) if swish else y), nnx.state(module, nnx.BatchStat)

    def loss_grads(function, state):
        return jax.jit(jax.grad(lambda s, x: jnp.sum(function(s, x)[0].astype(jnp.float32) * cotangent), (0, 1)))(
            state, images)

    assert ('allflax_batch_norm_Forward' in str(jax.make_jaxpr(ours)(state, images))) == kernels_built
    (got, got_stats), (want, want_stats) = jax.jit(ours)(state, images), jax.jit(flax)(flax_state, images)
    assert got.dtype == dtype
    assert relative_error(got, want) <= tolerance
    for name in ('mean', 'var'):  # Running statistics moved by the same step.
        assert relative_error(got_stats[name][...], want_stats[name][...]) <= 1e-6
    (got_params, got_images), (want_params, want_images) = loss_grads(ours, state), loss_grads(flax, flax_state)
    assert got_images.dtype == jnp.float32
    assert relative_error(got_images, want_images) <= tolerance
    for name in ('scale', 'bias'):
        assert relative_error(got_params[name][...], want_params[name][...]) <= tolerance


def test_zero_scale_passes_no_gradient_to_the_input(kernels_built):
    """A residual block's last batch norm starts with scale 0: its input gradient is exactly 0 and
    its scale gradient is Σ d_y·normalised, as flax's."""
    bn = nnx.BatchNorm(8, epsilon=1e-3, rngs=nnx.Rngs(0), scale_init=nnx.initializers.zeros)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((2, 6, 6, 8)) * 2 - 1, jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((2, 6, 6, 8)), jnp.float32)
    graphdef, state = nnx.split(bn)

    def loss(state, x, function):
        return jnp.sum(function(nnx.merge(graphdef, state), x) * cotangent)

    ours = jax.jit(jax.grad(lambda s, x: loss(s, x, lambda m, x: batch_norm.norm(m, x)), (0, 1)))(state, images)
    flax = jax.jit(jax.grad(lambda s, x: loss(s, x, lambda m, x: m(x)), (0, 1)))(state, images)
    assert not np.any(np.asarray(ours[1]))
    normalised = (images - images.mean((0, 1, 2))) / np.sqrt(images.var((0, 1, 2)) + 1e-3)
    np.testing.assert_allclose(ours[0]['scale'][...], (cotangent * normalised).sum((0, 1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[0]['scale'][...], flax[0]['scale'][...], rtol=1e-5, atol=1e-5)


def test_eval_mode_uses_running_statistics():
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    bn.mean[...] = jnp.array([1.0, 2.0, 3.0])
    bn.eval()
    x = jnp.ones((2, 4, 4, 3))
    np.testing.assert_allclose(batch_norm.norm(bn, x, swish=True), nnx.swish(bn(x)), rtol=1e-6)


def test_kernels_reject_mismatched_operands():
    """The FFI kernels check what they are handed and say what is wrong, not read past a buffer."""
    if not cpu_kernels.available():
        platform_deps.missing('no CPU kernels built here (make test builds allflax/cpu/_cpu_kernels.so)')
    x = jnp.ones((2, 3, 3, 8))
    vector = jax.ShapeDtypeStruct((8,), jnp.float32)
    with pytest.raises(Exception, match="batch norm: every per-channel vector must have the last axis's size"):
        cpu_kernels.call('allflax_batch_norm_Forward', (jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector),
                         x, jnp.ones(7), jnp.zeros(8), epsilon=np.float32(1e-3), swish=True)
    with pytest.raises(Exception, match=r'squeeze-excitation: gates and channel means must be \(samples, channels\)'):
        cpu_kernels.call('allflax_ScaleChannels', jax.ShapeDtypeStruct(x.shape, x.dtype), x, jnp.ones((2, 7)))
    with pytest.raises(Exception, match='squeeze-excitation: the activations must be float32 or bfloat16'):
        cpu_kernels.call('allflax_ChannelMean', jax.ShapeDtypeStruct((2, 8), jnp.float32), x.astype(jnp.float16))
