"""SqueezeExcitation: through the CPU kernels (channel mean and scaling, activation_kernels.cc) and
in JAX, the values and gradients of x · sigmoid(expand(swish(reduce(mean_hw x))))."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from allflax.cpu import kernels as cpu_kernels
from allflax.models.attention import SqueezeExcitation


def numpy_squeeze_excitation(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias):
    """The block in float64 numpy: (N, H, W, C) → same shape."""
    context = x.mean(axis=(1, 2))
    hidden = context @ reduce_kernel + reduce_bias
    hidden = hidden / (1 + np.exp(-hidden))
    gates = 1 / (1 + np.exp(-(hidden @ expand_kernel + expand_bias)))
    return x * gates[:, None, None, :]


# float32: against numpy; bfloat16: against the float32 block on the same rounded inputs.
@pytest.mark.parametrize('dtype, tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('shape', [(3, 5, 7, 24), (16, 4, 4, 600), (2, 1, 1, 40)])
def test_squeeze_excitation_values_and_gradients(shape, dtype, tolerance, kernels_built, monkeypatch):
    def block(dtype):
        return SqueezeExcitation(shape[-1], max(1, shape[-1] // 16), kernel_init=nnx.initializers.lecun_normal(),
                                 dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal(shape), dtype).astype(jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(shape), dtype).astype(jnp.float32)

    def value_and_grads(module):
        graphdef, params = nnx.split(module)

        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x.astype(module.reduce.dtype)).astype(jnp.float32) * cotangent)

        out = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x.astype(module.reduce.dtype)))(params, images)
        d_params, d_images = jax.jit(jax.grad(loss, (0, 1)))(params, images)
        traced = str(jax.make_jaxpr(loss)(params, images))
        return traced, [out.astype(jnp.float32), d_images, *(d_params[layer][name][...] for layer in ('reduce', 'expand')
                                                             for name in ('kernel', 'bias'))]

    traced, got = value_and_grads(block(dtype))
    assert ('allflax_ScaleChannels' in traced) == kernels_built
    assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.float32
    reference = block(jnp.float32)
    if dtype == jnp.float32:
        weights = [np.asarray(array, np.float64) for array in (
            reference.reduce.kernel[0, 0], reference.reduce.bias[...], reference.expand.kernel[0, 0],
            reference.expand.bias[...])]
        want = numpy_squeeze_excitation(np.asarray(images, np.float64), *weights)
        np.testing.assert_allclose(got[0], want, rtol=tolerance, atol=tolerance * np.abs(want).max())
    monkeypatch.setattr(cpu_kernels, 'available', lambda: False)  # The reference is JAX's.
    _, want = value_and_grads(reference)
    for got_array, want_array in zip(got, want):
        error = np.abs(np.asarray(got_array) - np.asarray(want_array)).max()
        assert error <= tolerance * np.abs(np.asarray(want_array)).max(), error
