"""The operations the models hand to the platform: convolutions, conv + bias + ReLU, batch norm in
training, squeeze-and-excitation.

Each hook computes XLA's portable operation, except in a program lowered for CPU, where
allflax's XLA:CPU backend (`allflax.cpu`) takes over the cases XLA:CPU runs slowly. The choice
is `lax.platform_dependent`'s, made when the program is lowered, not by the host's default
backend: a program lowered for TPU or GPU on a CPU host holds no CPU custom call.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax import lax

from allflax.cpu import batch_norm as cpu_batch_norm
from allflax.cpu import conv as cpu_conv
from allflax.cpu import kernels as cpu_kernels
from allflax.cpu import squeeze_excite as cpu_squeeze_excite

_portable_only = False


@contextlib.contextmanager
def portable_only():
    """Within it, the hooks trace XLA's portable operations whatever the platform (e.g. to count a
    model's nominal multiply-adds). It acts when a function is traced: a jitted function traced
    before keeps its cached trace."""
    global _portable_only
    previous, _portable_only = _portable_only, True
    try:
        yield
    finally:
        _portable_only = previous


def _per_platform(on_cpu, portable, *args):
    """`on_cpu(*args)` where the program is lowered for CPU, `portable(*args)` elsewhere."""
    if _portable_only:
        return portable(*args)
    return lax.platform_dependent(*args, cpu=on_cpu, default=portable)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, **kwargs):
    """`lax.conv_general_dilated`, for nnx.Conv's `conv_general_dilated=`; on CPU, `allflax.cpu.conv`'s
    routes. The kernel may come in float32 with bfloat16 inputs (`promote_keeping_kernel`)."""
    options = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                   rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                   feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                   precision=precision, preferred_element_type=preferred_element_type, **kwargs)

    def portable(lhs, rhs):
        return lax.conv_general_dilated(lhs, rhs.astype(lhs.dtype), **options)

    return _per_platform(lambda lhs, rhs: cpu_conv.conv_general_dilated(lhs, rhs, **options), portable, lhs, rhs)


def promote_keeping_kernel(args, /, *, dtype=None, inexact=True):
    """nnx.Conv's `promote_dtype` for `conv_general_dilated`: inputs and bias cast to `dtype` as flax's,
    a float32 kernel kept in float32 (the convolution rounds it as flax would have)."""
    inputs, kernel, bias = args
    if dtype is None or kernel.dtype != jnp.float32:
        return dtypes.promote_dtype(args, dtype=dtype, inexact=inexact)
    inputs, bias = dtypes.promote_dtype((inputs, bias), dtype=dtype, inexact=inexact)
    return inputs, kernel, bias


def conv_relu(conv: nnx.Conv, inputs: jax.Array) -> jax.Array:
    """`nnx.relu(conv(inputs))`; on CPU, with the bias and the ReLU inside oneDNN's convolution where
    it runs one (`allflax.cpu.conv.conv_bias_relu`)."""
    fused = (conv.conv_general_dilated is conv_general_dilated and conv.use_bias and conv.mask is None
             and isinstance(conv.padding, str) and inputs.ndim == 4 and conv.feature_group_count == 1
             and conv.preferred_element_type is None
             and all(d == 1 for d in (*_pair(conv.input_dilation), *_pair(conv.kernel_dilation))))
    if not fused:
        return nnx.relu(conv(inputs))
    inputs, kernel, bias = conv.promote_dtype((inputs, conv.kernel[...], conv.bias[...]), dtype=conv.dtype)
    strides, padding = _pair(conv.strides), conv.padding

    def portable(inputs, kernel, bias):
        out = lax.conv_general_dilated(inputs, kernel.astype(inputs.dtype), strides, padding,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return nnx.relu(out + bias)

    return _per_platform(lambda *args: cpu_conv.conv_bias_relu(*args, strides, padding), portable, inputs, kernel, bias)


def _pair(value):
    """nnx.Conv's per-axis setting (None, an int, or one per axis) as a pair."""
    value = 1 if value is None else value
    return (value, value) if isinstance(value, int) else tuple(value)


def batch_norm_forward(portable, x, scale, bias, epsilon: float, swish: bool):
    """`portable(x, scale, bias, epsilon, swish)` → (y, mean, var); on CPU, one kernel pass."""
    if not cpu_kernels.fits(x):
        return portable(x, scale, bias, epsilon, swish)
    return _per_platform(lambda *args: cpu_batch_norm.forward(*args, epsilon, swish),
                         lambda *args: portable(*args, epsilon, swish), x, scale, bias)


def batch_norm_backward(portable, x, d_y, mean, var, scale, bias, epsilon: float, swish: bool):
    """`portable(x, d_y, mean, var, scale, bias, epsilon, swish)` → (d_x, d_scale, d_bias); on CPU,
    one kernel pass."""
    if not cpu_kernels.fits(x):
        return portable(x, d_y, mean, var, scale, bias, epsilon, swish)
    return _per_platform(lambda *args: cpu_batch_norm.backward(*args, epsilon, swish),
                         lambda *args: portable(*args, epsilon, swish), x, d_y, mean, var, scale, bias)


def squeeze_excite(module, features: jax.Array) -> jax.Array:
    """`features · module.gates(features)` for a module with `gates` and `gates_of_context`; on CPU,
    the passes over the feature map as kernels (`allflax.cpu.squeeze_excite`)."""
    if features.ndim != 4 or not cpu_kernels.fits(features):
        return features * module.gates(features)
    graphdef, params = nnx.split(module)

    def portable(features, params):
        return features * nnx.merge(graphdef, params).gates(features)

    def on_cpu(features, params):
        return cpu_squeeze_excite.squeeze_excite(functools.partial(_gates_of_means, graphdef), features, params)

    return _per_platform(on_cpu, portable, features, params)


def _gates_of_means(graphdef, params, means):
    """(N, C) gates of (N, C) channel means, as the module computes them from its context."""
    return nnx.merge(graphdef, params).gates_of_context(means[:, None, None, :])[:, 0, 0, :]
