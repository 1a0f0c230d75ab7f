"""cpu_conv: XLA:CPU's slow convolutions rewritten (oneDNN, shifted depthwise, 1×1 dot, Winograd) give
lax.conv_general_dilated's values and gradients, and the models route their layers through it."""
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import platform_deps
import pytest
from flax import nnx
from jax import lax

from allflax import models, sharding
from allflax.cpu import conv as cpu_conv, kernels as cpu_kernels, onednn
from allflax.models import ops
from allflax.training import loop

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


def route(jaxpr) -> str:
    """Which formulation a traced convolution took."""
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    if 'allflax_onednn_conv_Forward' in str(jaxpr):
        return 'onednn'
    return ('winograd' if 'custom_vjp_call' in names else 'dot' if 'dot_general' in names
            else 'shifted' if 'slice' in names else 'xla' if 'conv_general_dilated' in names else str(names))


# (input size, channels, kernel, strides, groups, padding, the route with oneDNN built, without)
CASES = [
    ((16, 16), 48, (3, 3, 48, 8), 1, 1, 'SAME', 'winograd', 'winograd'),  # F(4, 3)
    ((9, 11), 256, (3, 3, 256, 4), 1, 1, 'SAME', 'winograd', 'winograd'),  # F(2, 3), odd sizes
    ((9, 11), 256, (3, 3, 256, 4), 1, 1, [(1, 1), (1, 1)], 'winograd', 'winograd'),
    ((7, 9), 6, (1, 1, 6, 5), 1, 1, 'SAME', 'onednn', 'dot'),
    ((7, 9), 6, (1, 1, 6, 5), 1, 1, 'VALID', 'onednn', 'dot'),
    ((9, 8), 6, (3, 3, 1, 6), 2, 6, 'SAME', 'onednn', 'shifted'),  # depthwise
    ((9, 8), 6, (3, 3, 1, 6), 2, 6, [(1, 1), (1, 1)], 'onednn', 'xla'),  # not SAME's padding
    ((9, 8), 6, (3, 3, 6, 4), 2, 1, 'SAME', 'onednn', 'xla'),  # dense, stride 2
    ((9, 8), 6, (1, 1, 6, 4), 2, 1, 'SAME', 'onednn', 'xla'),  # 1×1, stride 2
    ((7, 7), 8, (3, 3, 8, 4), 1, 1, 'SAME', 'onednn', 'xla'),  # 3×3, too few channels for Winograd
    ((8, 8), 8, (3, 3, 4, 4), 1, 2, 'SAME', 'onednn', 'xla'),  # grouped, not depthwise
    ((11, 10), 5, (5, 5, 5, 4), 2, 1, [(2, 1), (0, 3)], 'onednn', 'xla'),  # 5×5, uneven padding
]


@pytest.mark.parametrize('size, channels, kernel_shape, strides, groups, padding, with_onednn, without', CASES)
def test_dispatcher_is_lax_conv(size, channels, kernel_shape, strides, groups, padding, with_onednn, without,
                                kernels_built):
    """Called as nnx.Conv calls it; the case's route is taken, values and gradients are XLA's."""
    images, kernel, _ = random_case(2, *size, channels, kernel_shape, strides)

    def convolve(function):
        return lambda x, k: function(x, k, (strides, strides), padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                                     dimension_numbers=NHWC, feature_group_count=groups, precision=None,
                                     out_sharding=None)

    assert route(jax.make_jaxpr(convolve(cpu_conv.conv_general_dilated))(images, kernel)) == (
        with_onednn if kernels_built else without)
    expected = jax.eval_shape(convolve(lax.conv_general_dilated), images, kernel)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(expected.shape), jnp.float32)
    assert_close(value_and_grads(convolve(cpu_conv.conv_general_dilated), images, kernel, cotangent),
                 value_and_grads(convolve(lax.conv_general_dilated), images, kernel, cotangent), TOLERANCE[4])


# bfloat16: oneDNN's convolution where it has bfloat16 kernels (twice its float32 speed); where
# the library is built but the CPU has no bfloat16 arithmetic, the float32 routes; without the
# library, F(2, 3) with bfloat16 multiplications, F(4, 3) in float32, and the 1×1 dot.
@pytest.mark.parametrize('size, channels, with_onednn, in_float32, without', [
    ((9, 11), 256, 'onednn', 'winograd', 'winograd'),
    ((16, 16), 48, 'onednn', 'winograd', 'winograd'),
    ((7, 9), 6, 'onednn', 'onednn', 'dot')])
def test_bfloat16_inputs_stay_bfloat16_and_close(size, channels, with_onednn, in_float32, without, kernels_built,
                                                 bfloat16_convolutions):
    """bfloat16 in, bfloat16 out, near the float32 convolution; values and gradients."""
    kernel_shape = (1, 1, channels, 4) if channels == 6 else (3, 3, channels, 4)
    images, kernel, cotangent = random_case(2, *size, channels, kernel_shape, 1)

    def convolve(x, k):
        return cpu_conv.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=NHWC)

    halves = [array.astype(jnp.bfloat16) for array in (images, kernel, cotangent)]
    assert route(jax.make_jaxpr(convolve)(*halves[:2])) == (
        with_onednn if bfloat16_convolutions else in_float32 if kernels_built else without)
    out = value_and_grads(convolve, *halves)
    assert all(array.dtype == jnp.bfloat16 for array in out)

    def xla(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=NHWC)

    # bfloat16 inputs alone (rounded, then convolved in float32) are ~3e-3 of the max away.
    assert_close([array.astype(jnp.float32) for array in out], value_and_grads(xla, images, kernel, cotangent), 2e-2)


def test_vgg_layers_go_through_the_dispatcher():
    """VGG19 at 64 px, batch 16, on CPU: Winograd where it measured faster (benchmarks/RESULTS.md)."""
    vgg = nnx.eval_shape(lambda: models.create('vgg19', 4, include_top=False, image_size=64))
    assert all(getattr(vgg, name).conv_general_dilated is ops.conv_general_dilated
               for name in vgg.layer_names if not name.endswith('_pool'))
    tiles = {(size, width): cpu_conv._winograd_tile(size, size, width)
             for size, width in [(64, 64), (32, 64), (32, 128), (16, 128), (16, 256), (8, 256), (8, 512), (4, 512)]}
    assert tiles == {(64, 64): 0, (32, 64): 0, (32, 128): 4, (16, 128): 4, (16, 256): 4, (8, 256): 2, (8, 512): 2,
                     (4, 512): 0}


@pytest.mark.parametrize('dtype, tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('size, channels, features', [((8, 8), 3, 16), ((5, 7), 16, 8)])
def test_conv_relu_is_relu_of_the_layer(size, channels, features, dtype, tolerance, kernels_built):
    """VGG's fused layer: nnx.relu(conv(x))'s values and its gradients wrt input, kernel and bias,
    with oneDNN (bias and ReLU inside the kernel) and without it."""
    conv = nnx.Conv(channels, features, (3, 3), padding='SAME', dtype=dtype, rngs=nnx.Rngs(0),
                    bias_init=nnx.initializers.normal(0.5), conv_general_dilated=ops.conv_general_dilated)
    images, _, cotangent = random_case(2, *size, channels, (3, 3, channels, features), 1)
    graphdef, params = nnx.split(conv)

    def fused(params, x):
        return ops.conv_relu(nnx.merge(graphdef, params), x.astype(dtype))

    def linear(params, x):
        kernel, bias = params['kernel'][...], params['bias'][...]
        return lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=NHWC) + bias

    jaxpr = jax.make_jaxpr(fused)(params, images)
    assert ('allflax_onednn_conv_ForwardBiasRelu' in str(jaxpr)) == (
        kernels_built and (dtype == jnp.float32 or cpu_kernels.bfloat16_convolutions()))
    got, got_pullback = jax.vjp(fused, params, images)
    want, want_pullback = jax.vjp(linear, params, images)
    assert got.dtype == dtype
    got = got.astype(jnp.float32)
    assert_close([got], [jax.nn.relu(want)], tolerance)
    got_params, got_images = got_pullback(cotangent.astype(dtype))
    # ReLU's gate as the layer computed it: in bfloat16 outputs near 0 may fall either side.
    want_params, want_images = want_pullback(jnp.where(got > 0, cotangent, 0))
    assert_close([got_images.astype(jnp.float32)], [want_images], tolerance)
    for name in ('kernel', 'bias'):
        assert_close([got_params[name][...].astype(jnp.float32)], [want_params[name][...]], tolerance)


def test_kernel_library_problems_say_what_to_do(tmp_path, monkeypatch):
    """A library that does not load, or that lacks a kernel (built from an older source), is an
    error naming the file and `make`, not a silent fallback."""
    broken = tmp_path / '_cpu_kernels.so'
    broken.write_bytes(b'not a shared library')
    monkeypatch.setattr(cpu_kernels, 'LIBRARY', broken)
    with pytest.raises(RuntimeError, match=r'_cpu_kernels.so is built but does not load.*rebuild it with `make`'):
        cpu_kernels.available.__wrapped__()
    stale = tmp_path / 'stale.so'  # Loads, but holds none of the kernels.
    source = tmp_path / 'stale.c'
    source.write_text('int allflax_nothing_here(void) { return 0; }\n')
    if shutil.which('cc') is None:
        platform_deps.missing('no C compiler (cc) to build a stand-in library')
    subprocess.run(['cc', '-shared', '-fPIC', str(source), '-o', str(stale)], check=True)
    monkeypatch.setattr(cpu_kernels, 'LIBRARY', stale)
    with pytest.raises(RuntimeError, match=r'stale.so is older than its sources.*rebuild it with `make`'):
        cpu_kernels.available.__wrapped__()


def test_onednn_conv_says_which_dtypes_it_takes():
    if not cpu_kernels.available():
        platform_deps.missing('no CPU kernels built here (make test builds allflax/cpu/_cpu_kernels.so)')
    images, kernel, _ = random_case(1, 5, 5, 3, (3, 3, 3, 4), 1)
    with pytest.raises(TypeError, match='a kernel of their dtype or float32.*got float32, bfloat16'):
        onednn.conv(images, kernel.astype(jnp.bfloat16), (1, 1), ((1, 1), (1, 1)))


# (input size, kernel, strides, groups, the route with the kernels built, with them but no bfloat16
# convolutions on the CPU (float32 routes), without them)
@pytest.mark.parametrize('size, kernel_shape, strides, groups, with_kernels, in_float32, without', [
    ((9, 11), (3, 3, 16, 8), 1, 1, 'onednn', 'onednn', 'xla'),
    ((9, 8), (3, 3, 1, 16), 2, 16, 'onednn', 'onednn', 'shifted'),  # oneDNN's input gradient runs in float32 here
    ((7, 9), (1, 1, 16, 8), 1, 1, 'onednn', 'onednn', 'dot')])
def test_float32_kernel_with_bfloat16_inputs(size, kernel_shape, strides, groups, with_kernels, in_float32, without,
                                             kernels_built, bfloat16_convolutions):
    """The layers' call (promote_keeping_kernel): bfloat16 inputs and the float32 parameter as the
    kernel. Output and input gradient are bfloat16, the kernel gradient float32, all near the
    float32 convolution."""
    images, kernel, cotangent = random_case(2, *size, kernel_shape[2] * groups, kernel_shape, strides)

    def convolve(conv_general_dilated, dtype):
        return lambda x, k: conv_general_dilated(x.astype(dtype), k, (strides, strides), 'SAME',
                                                 dimension_numbers=NHWC, feature_group_count=groups)

    mixed = convolve(cpu_conv.conv_general_dilated, jnp.bfloat16)
    assert route(jax.make_jaxpr(mixed)(images, kernel)) == (
        with_kernels if bfloat16_convolutions else in_float32 if kernels_built else without)
    out, d_images, d_kernel = value_and_grads(mixed, images, kernel, cotangent.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and d_images.dtype == d_kernel.dtype == jnp.float32
    assert_close([out.astype(jnp.float32), d_images, d_kernel],
                 value_and_grads(convolve(lax.conv_general_dilated, jnp.float32), images, kernel, cotangent), 2e-2)


def test_promote_keeping_kernel_casts_all_but_a_float32_kernel():
    inputs, kernel, bias = jnp.ones((1, 2, 2, 3)), jnp.ones((1, 1, 3, 4)), jnp.ones(4)
    got = ops.promote_keeping_kernel((inputs, kernel, bias), dtype=jnp.bfloat16)
    assert [array.dtype for array in got] == [jnp.bfloat16, jnp.float32, jnp.bfloat16]
    got = ops.promote_keeping_kernel((inputs, kernel.astype(jnp.float16), None), dtype=jnp.bfloat16)
    assert [array.dtype for array in got[:2]] == [jnp.bfloat16, jnp.bfloat16] and got[2] is None


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_bfloat16_without_cpu_arithmetic_says_so(tiny_config, monkeypatch, caplog, dtype, kernels_built,
                                                 bfloat16_convolutions):
    """Training set up in bfloat16 where it computes in float32 warns, naming the dtype and what to use."""
    with tiny_config.unlocked():
        tiny_config.dtype = dtype
    with caplog.at_level('WARNING'):
        loop.build(tiny_config, 2, 2, sharding.make_mesh())
    warned = [record.getMessage() for record in caplog.records if 'bfloat16 arithmetic' in record.getMessage()]
    if dtype == 'bfloat16' and kernels_built and not bfloat16_convolutions:
        assert len(warned) == 1 and '--config.dtype=float32' in warned[0]
    else:
        assert not warned
