"""oneDNN convolutions for XLA:CPU, called through XLA's FFI (the kernels: onednn_conv.cc).

`make` builds `_onednn_conv.so` next to this file against the pinned oneDNN wheel
(onednn-devel-cpu-gomp, Linux x86-64). Where it is not built, `available()` is False and
allflax/models/cpu_conv.py keeps XLA's own convolutions: the models run the same, slower.
"""
import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = pathlib.Path(__file__).with_name('_onednn_conv.so')
_KERNELS = ('Forward', 'InputGradient', 'KernelGradient', 'ForwardBiasRelu', 'KernelBiasGradient')


@functools.cache
def available() -> bool:
    """Whether the kernels are built; registers them with XLA:CPU on the first call."""
    if not LIBRARY.exists():
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as error:
        raise RuntimeError(f'{LIBRARY} is built but does not load ({error}); rebuild it with `make` '
                           f'(or delete it to run without oneDNN)') from error
    try:
        handlers = {name: getattr(library, f'AllflaxOnednnConv{name}') for name in _KERNELS}
    except AttributeError as error:
        raise RuntimeError(f'{LIBRARY} is older than onednn_conv.cc ({error}); rebuild it with `make`') from error
    for name, handler in handlers.items():
        jax.ffi.register_ffi_target(f'allflax_onednn_conv_{name}', jax.ffi.pycapsule(handler), platform='cpu')
    return True


def _call(name, operands, result_shapes, strides, padding, groups):
    """The kernel `name` on `operands`; its results (a list), of the first operand's dtype."""
    # 'sequential': under vmap, one call per element; nothing in allflax maps over convolutions.
    return jax.ffi.ffi_call(f'allflax_onednn_conv_{name}',
                            [jax.ShapeDtypeStruct(shape, operands[0].dtype) for shape in result_shapes],
                            vmap_method='sequential')(
        *operands, strides=np.asarray(strides, np.int64),
        padding_low=np.asarray([low for low, _ in padding], np.int64),
        padding_high=np.asarray([high for _, high in padding], np.int64), groups=np.int64(groups))


def _check(inputs, *others):
    if inputs.dtype not in (np.float32, jnp.bfloat16) or any(other.dtype != inputs.dtype for other in others):
        raise TypeError(f'oneDNN convolution takes float32 or bfloat16 operands of one dtype, got '
                        f'{", ".join(str(array.dtype) for array in (inputs, *others))}')


def _output_shape(inputs, kernel, strides, padding):
    sizes = [(size + low + high - taps) // stride + 1
             for size, (low, high), taps, stride in zip(inputs.shape[1:3], padding, kernel.shape[:2], strides)]
    return (inputs.shape[0], *sizes, kernel.shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(inputs: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
         groups: int = 1) -> jax.Array:
    """A 2-D convolution, NHWC inputs and an HWIO kernel ((kh, kw, C / groups, F)) of one dtype,
    float32 or bfloat16, with explicit (low, high) padding per spatial axis; no dilation."""
    _check(inputs, kernel)
    return _call('Forward', (inputs, kernel), [_output_shape(inputs, kernel, strides, padding)], strides, padding,
                 groups)[0]


def _conv_fwd(inputs, kernel, strides, padding, groups):
    return conv(inputs, kernel, strides, padding, groups), (inputs, kernel)


def _conv_bwd(strides, padding, groups, residuals, cotangent):
    inputs, kernel = residuals
    cotangent = cotangent.astype(inputs.dtype)
    d_inputs, = _call('InputGradient', (cotangent, kernel), [inputs.shape], strides, padding, groups)
    d_kernel, = _call('KernelGradient', (inputs, cotangent), [kernel.shape], strides, padding, groups)
    return d_inputs, d_kernel


conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_bias_relu(inputs: jax.Array, kernel: jax.Array, bias: jax.Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """relu(conv(inputs, kernel) + bias) in one oneDNN pass (dense, as `conv`); the gradient's
    bias part comes out of the kernel-gradient pass."""
    _check(inputs, kernel, bias)
    return _call('ForwardBiasRelu', (inputs, kernel, bias), [_output_shape(inputs, kernel, strides, padding)],
                 strides, padding, 1)[0]


def _conv_bias_relu_fwd(inputs, kernel, bias, strides, padding):
    out = conv_bias_relu(inputs, kernel, bias, strides, padding)
    return out, (inputs, kernel, out)


def _conv_bias_relu_bwd(strides, padding, residuals, cotangent):
    inputs, kernel, out = residuals
    # ReLU's gradient, 0 at 0 as jax.nn.relu's.
    cotangent = jnp.where(out > 0, cotangent, 0).astype(inputs.dtype)
    d_inputs, = _call('InputGradient', (cotangent, kernel), [inputs.shape], strides, padding, 1)
    d_kernel, d_bias = _call('KernelBiasGradient', (inputs, cotangent), [kernel.shape, (kernel.shape[3],)], strides,
                             padding, 1)
    return d_inputs, d_kernel, d_bias


conv_bias_relu.defvjp(_conv_bias_relu_fwd, _conv_bias_relu_bwd)
