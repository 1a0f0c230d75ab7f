"""oneDNN convolutions for XLA:CPU, called through XLA's FFI (the kernels: onednn_conv.cc, in the
library cpu_kernels.py loads). allflax/cpu/conv.py decides where they are used.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from allflax.cpu import kernels as cpu_kernels


def _call(name, operands, results, strides, padding, groups):
    """The kernel `name` on `operands`; its results (a list), shaped as the arrays `results`."""
    return cpu_kernels.call(
        f'allflax_onednn_conv_{name}', [jax.ShapeDtypeStruct(result.shape, result.dtype) for result in results],
        *operands, strides=np.asarray(strides, np.int64), padding_low=np.asarray([low for low, _ in padding], np.int64),
        padding_high=np.asarray([high for _, high in padding], np.int64), groups=np.int64(groups))


def _check(inputs, kernel, bias=None):
    if (inputs.dtype not in (np.float32, jnp.bfloat16) or kernel.dtype not in (inputs.dtype, np.float32)
            or (bias is not None and bias.dtype != inputs.dtype)):
        raise TypeError(f'oneDNN convolution takes float32 or bfloat16 inputs, a kernel of their dtype or '
                        f'float32 and a bias of their dtype, got '
                        f'{", ".join(str(array.dtype) for array in (inputs, kernel, bias) if array is not None)}')


def _output(inputs, kernel, strides, padding):
    sizes = [(size + low + high - taps) // stride + 1
             for size, (low, high), taps, stride in zip(inputs.shape[1:3], padding, kernel.shape[:2], strides)]
    return jax.ShapeDtypeStruct((inputs.shape[0], *sizes, kernel.shape[3]), inputs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(inputs: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
         groups: int = 1) -> jax.Array:
    """A 2-D convolution of NHWC inputs, float32 or bfloat16, with an HWIO kernel ((kh, kw, C / groups, F))
    of their dtype or float32 (rounded to theirs inside oneDNN; its gradient comes back in float32),
    with explicit (low, high) padding per spatial axis; no dilation."""
    _check(inputs, kernel)
    return _call('Forward', (inputs, kernel), [_output(inputs, kernel, strides, padding)], strides, padding,
                 groups)[0]


def _conv_fwd(inputs, kernel, strides, padding, groups):
    return conv(inputs, kernel, strides, padding, groups), (inputs, kernel)


def _conv_bwd(strides, padding, groups, residuals, cotangent):
    inputs, kernel = residuals
    cotangent = cotangent.astype(inputs.dtype)
    if inputs.dtype == jnp.bfloat16 and groups > 1 and tuple(strides) != (1, 1):
        # oneDNN 3.2 has no bfloat16 kernel for a strided grouped input gradient; its fallback
        # (brgconv_strided) takes 20-30 ms on B3's layers, its float32 kernel 1-2 ms.
        d_inputs, = _call('InputGradient', (cotangent.astype(jnp.float32), kernel.astype(jnp.float32)),
                          [jax.ShapeDtypeStruct(inputs.shape, jnp.float32)], strides, padding, groups)
        d_inputs = d_inputs.astype(inputs.dtype)
    else:
        d_inputs, = _call('InputGradient', (cotangent, kernel), [inputs], strides, padding, groups)
    d_kernel, = _call('KernelGradient', (inputs, cotangent), [kernel], strides, padding, groups)
    return d_inputs, d_kernel


conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_bias_relu(inputs: jax.Array, kernel: jax.Array, bias: jax.Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """relu(conv(inputs, kernel) + bias) in one oneDNN pass (dense, as `conv`; the bias of the inputs'
    dtype); the gradient's bias part comes out of the kernel-gradient pass."""
    _check(inputs, kernel, bias)
    return _call('ForwardBiasRelu', (inputs, kernel, bias), [_output(inputs, kernel, strides, padding)],
                 strides, padding, 1)[0]


def _conv_bias_relu_fwd(inputs, kernel, bias, strides, padding):
    out = conv_bias_relu(inputs, kernel, bias, strides, padding)
    return out, (inputs, kernel, bias, out)


def _conv_bias_relu_bwd(strides, padding, residuals, cotangent):
    inputs, kernel, bias, out = residuals
    # ReLU's gradient, 0 at 0 as jax.nn.relu's.
    cotangent = jnp.where(out > 0, cotangent, 0).astype(inputs.dtype)
    d_inputs, = _call('InputGradient', (cotangent, kernel), [inputs], strides, padding, 1)
    d_kernel, d_bias = _call('KernelBiasGradient', (inputs, cotangent), [kernel, bias], strides, padding, 1)
    return d_inputs, d_kernel, d_bias


conv_bias_relu.defvjp(_conv_bias_relu_fwd, _conv_bias_relu_bwd)
