"""cpu_conv: XLA:CPU's slow convolutions rewritten (shifted depthwise, 1×1 dot, Winograd) give
lax.conv_general_dilated's values and gradients, and the models route their layers through it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from allflax import models
from allflax.models import cpu_conv

# nnx.Conv's dimension numbers for NHWC inputs and HWIO kernels.
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
# Max error over max |output| against a float64 reference, measured on VGG19's layer shapes at
# batch 4 (forward, input and kernel gradients; XLA's float32 convolution: 3e-7–5e-6):
# F(2, 3) 3e-7–1e-6, F(4, 3) 3e-6–2.1e-5. The tests compare with XLA's float32 convolution,
# so both errors add up; ~5× headroom over the sum.
TOLERANCE = {2: 1e-5, 4: 1e-4}


def value_and_grads(convolve, images, kernel, cotangent):
    """The output and the input and kernel gradients for `cotangent`, compiled (one compile, not one per op)."""
    def run(x, k, c):
        out, pullback = jax.vjp(convolve, x, k)
        return (out, *pullback(c))
    return jax.jit(run)(images, kernel, cotangent)


def assert_close(actual, expected, tolerance):
    """Each array's max error is within `tolerance` × its expected max magnitude (numpy: eager jnp
    ops would compile one program per op and shape)."""
    for got, want in zip(actual, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        error = np.abs(got - want).max()
        assert error <= tolerance * np.abs(want).max(), error


def random_case(batch, height, width, in_channels, kernel_shape, strides, dtype=jnp.float32):
    rng = np.random.default_rng(height * width + in_channels)
    images = rng.standard_normal((batch, height, width, in_channels), np.float32)
    kernel = rng.standard_normal(kernel_shape, np.float32)
    cotangent = rng.standard_normal((batch, -(-height // strides), -(-width // strides), kernel_shape[3]), np.float32)
    return (jnp.asarray(array, dtype) for array in (images, kernel, cotangent))


@pytest.mark.parametrize('tile', [2, 4])
@pytest.mark.parametrize('height, width', [(7, 9), (8, 8), (5, 6), (13, 4)])
def test_winograd_is_xla_conv(tile, height, width):
    """Stride-1 SAME 3×3 by F(2, 3) and F(4, 3): values and both gradients, sizes that are and are
    not multiples of the tile."""
    images, kernel, cotangent = random_case(2, height, width, 5, (3, 3, 5, 6), 1)

    def xla(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=NHWC)

    def winograd(x, k):
        return cpu_conv.winograd_conv(x, k, tile)

    assert_close(value_and_grads(winograd, images, kernel, cotangent),
                 value_and_grads(xla, images, kernel, cotangent), TOLERANCE[tile])


@pytest.mark.parametrize('size, strides', [(9, 1), (8, 1), (9, 2), (8, 2), (7, 1), (7, 2)])
def test_shifted_depthwise_conv_is_xla_grouped_conv(size, strides):
    """CPU's depthwise formulation: XLA's values and gradients, SAME padding, odd and even sizes."""
    images, kernel, cotangent = random_case(2, size, size + 1, 6, (3, 3, 1, 6), strides)

    def grouped(x, k):
        return lax.conv_general_dilated(x, k, (strides, strides), 'SAME', feature_group_count=6,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def shifted(x, k):
        return cpu_conv.shifted_depthwise_conv(x, k, (strides, strides))

    assert_close(value_and_grads(shifted, images, kernel, cotangent),
                 value_and_grads(grouped, images, kernel, cotangent), 1e-6)


# (input size, channels, kernel, strides, groups, padding, the primitive the dispatcher should use)
CASES = [
    ((16, 16), 48, (3, 3, 48, 8), 1, 1, 'SAME', 'custom_vjp_call'),  # F(4, 3)
    ((9, 11), 256, (3, 3, 256, 4), 1, 1, 'SAME', 'custom_vjp_call'),  # F(2, 3), odd sizes
    ((9, 11), 256, (3, 3, 256, 4), 1, 1, [(1, 1), (1, 1)], 'custom_vjp_call'),
    ((7, 9), 6, (1, 1, 6, 5), 1, 1, 'SAME', 'dot_general'),
    ((7, 9), 6, (1, 1, 6, 5), 1, 1, 'VALID', 'dot_general'),
    ((9, 8), 6, (3, 3, 1, 6), 2, 6, 'SAME', 'slice'),  # depthwise, shifted
    ((9, 8), 6, (3, 3, 1, 6), 2, 6, [(1, 1), (1, 1)], 'conv_general_dilated'),  # not SAME's padding
    ((9, 8), 6, (3, 3, 6, 4), 2, 1, 'SAME', 'conv_general_dilated'),  # dense, stride 2
    ((9, 8), 6, (1, 1, 6, 4), 2, 1, 'SAME', 'conv_general_dilated'),  # 1×1, stride 2
    ((7, 7), 8, (3, 3, 8, 4), 1, 1, 'SAME', 'conv_general_dilated'),  # 3×3, too few channels
    ((8, 8), 8, (3, 3, 4, 4), 1, 2, 'SAME', 'conv_general_dilated'),  # grouped, not depthwise
]


@pytest.mark.parametrize('size, channels, kernel_shape, strides, groups, padding, primitive', CASES)
def test_dispatcher_is_lax_conv(size, channels, kernel_shape, strides, groups, padding, primitive):
    """Called as nnx.Conv calls it; the case's primitive appears, values and gradients are XLA's."""
    images, kernel, cotangent = random_case(2, *size, channels, kernel_shape, strides)

    def convolve(function):
        return lambda x, k: function(x, k, (strides, strides), padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                                     dimension_numbers=NHWC, feature_group_count=groups, precision=None,
                                     out_sharding=None)

    jaxpr = jax.make_jaxpr(convolve(cpu_conv.conv_general_dilated))(images, kernel)
    assert primitive in {eqn.primitive.name for eqn in jaxpr.eqns}
    assert_close(value_and_grads(convolve(cpu_conv.conv_general_dilated), images, kernel, cotangent),
                 value_and_grads(convolve(lax.conv_general_dilated), images, kernel, cotangent), TOLERANCE[4])


@pytest.mark.parametrize('size, channels', [((9, 11), 256), ((16, 16), 48), ((7, 9), 6)])
def test_bfloat16_inputs_stay_bfloat16_and_close(size, channels):
    """bfloat16 in, bfloat16 out; F(2, 3) multiplies in bfloat16, F(4, 3) in float32."""
    kernel_shape = (1, 1, channels, 4) if channels == 6 else (3, 3, channels, 4)
    images, kernel, _ = random_case(2, *size, channels, kernel_shape, 1)
    out = jax.jit(lambda x, k: cpu_conv.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=NHWC))(
        images.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    expected = lax.conv_general_dilated(images, kernel, (1, 1), 'SAME', dimension_numbers=NHWC)
    assert out.dtype == jnp.bfloat16
    # bfloat16 inputs alone (rounded, then convolved in float32) are ~3e-3 of the max away.
    assert_close([out.astype(jnp.float32)], [expected], 2e-2)


def test_vgg_layers_go_through_the_dispatcher():
    """VGG19 at 64 px, batch 16, on CPU: Winograd where it measured faster (benchmarks/RESULTS.md)."""
    vgg = nnx.eval_shape(lambda: models.create('vgg19', 4, include_top=False, image_size=64))
    assert all(getattr(vgg, name).conv_general_dilated is cpu_conv.conv_general_dilated
               for name in vgg.layer_names if not name.endswith('_pool'))
    tiles = {(size, width): cpu_conv._winograd_tile(size, size, width)
             for size, width in [(64, 64), (32, 64), (32, 128), (16, 128), (16, 256), (8, 256), (8, 512), (4, 512)]}
    assert tiles == {(64, 64): 0, (32, 64): 0, (32, 128): 4, (16, 128): 4, (16, 256): 4, (8, 256): 2, (8, 512): 2,
                     (4, 512): 0}
