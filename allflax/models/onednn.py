"""oneDNN convolutions for XLA:CPU, called through XLA's FFI (the kernels: onednn_conv.cc).

`make` builds `_onednn_conv.so` next to this file against the pinned oneDNN wheel
(onednn-devel-cpu-gomp, Linux x86-64). Where it is not built, `available()` is False and
allflax/models/cpu_conv.py keeps XLA's own convolutions: the models run the same, slower.
"""
import ctypes
import functools
import pathlib

import jax
import numpy as np

LIBRARY = pathlib.Path(__file__).with_name('_onednn_conv.so')
_PASSES = ('Forward', 'InputGradient', 'KernelGradient')


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
    for name in _PASSES:
        jax.ffi.register_ffi_target(f'allflax_onednn_conv_{name}', jax.ffi.pycapsule(getattr(library, f'AllflaxOnednnConv{name}')),
                                    platform='cpu')
    return True


def _call(name, first, second, result_shape, strides, padding, groups):
    # 'sequential': under vmap, one call per element; nothing in allflax maps over convolutions.
    return jax.ffi.ffi_call(f'allflax_onednn_conv_{name}', jax.ShapeDtypeStruct(result_shape, first.dtype),
                            vmap_method='sequential')(
        first, second, strides=np.asarray(strides, np.int64),
        padding_low=np.asarray([low for low, _ in padding], np.int64),
        padding_high=np.asarray([high for _, high in padding], np.int64), groups=np.int64(groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(inputs: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
         groups: int = 1) -> jax.Array:
    """A 2-D convolution, NHWC inputs and an HWIO kernel ((kh, kw, C / groups, F)) of one dtype,
    float32 or bfloat16, with explicit (low, high) padding per spatial axis; no dilation."""
    if inputs.dtype != kernel.dtype or inputs.dtype not in (np.float32, jax.numpy.bfloat16):
        raise TypeError(f'oneDNN convolution takes float32 or bfloat16 operands of one dtype, got {inputs.dtype} '
                        f'inputs and a {kernel.dtype} kernel')
    out_sizes = [(size + low + high - taps) // stride + 1
                 for size, (low, high), taps, stride in zip(inputs.shape[1:3], padding, kernel.shape[:2], strides)]
    return _call('Forward', inputs, kernel, (inputs.shape[0], *out_sizes, kernel.shape[3]), strides, padding,
                 groups)


def _conv_fwd(inputs, kernel, strides, padding, groups):
    return conv(inputs, kernel, strides, padding, groups), (inputs, kernel)


def _conv_bwd(strides, padding, groups, residuals, cotangent):
    inputs, kernel = residuals
    cotangent = cotangent.astype(inputs.dtype)
    d_inputs = _call('InputGradient', cotangent, kernel, inputs.shape, strides, padding, groups)
    d_kernel = _call('KernelGradient', inputs, cotangent, kernel.shape, strides, padding, groups)
    return d_inputs, d_kernel


conv.defvjp(_conv_fwd, _conv_bwd)
