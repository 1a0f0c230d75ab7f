"""The XLA:CPU kernels allflax builds itself, one library called through XLA's FFI.

`make` compiles `_cpu_kernels.so` next to this file from onednn_conv.cc (oneDNN convolutions,
against the pinned oneDNN wheel: onednn-devel-cpu-gomp, Linux x86-64) and activation_kernels.cc
(batch norm + swish, squeeze-excitation). Where it is not built, `available()` is False and the
models keep XLA's own operations: they run the same, slower.
"""
import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp

LIBRARY = pathlib.Path(__file__).with_name('_cpu_kernels.so')
SOURCES = ('onednn_conv.cc', 'activation_kernels.cc')
# FFI target name: the handler symbol the library exports.
TARGETS = {
    **{f'allflax_onednn_conv_{name}': f'AllflaxOnednnConv{name}'
       for name in ('Forward', 'InputGradient', 'KernelGradient', 'ForwardBiasRelu', 'KernelBiasGradient')},
    **{f'allflax_batch_norm_{name}': f'AllflaxBatchNorm{name}' for name in ('Forward', 'Backward')},
    **{f'allflax_{name}': f'Allflax{name}' for name in ('ChannelMean', 'ScaleChannels', 'GateGradient',
                                                           'ScaledInputGradient')},
}


@functools.cache
def available() -> bool:
    """Whether the library is built; registers its kernels with XLA:CPU on the first call."""
    if not LIBRARY.exists():
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as error:
        raise RuntimeError(f'{LIBRARY} is built but does not load ({error}); rebuild it with `make` '
                           f'(or delete it to run without these kernels)') from error
    try:
        handlers = {target: getattr(library, symbol) for target, symbol in TARGETS.items()}
        library.AllflaxOnednnBfloat16Convolutions
    except AttributeError as error:
        raise RuntimeError(f'{LIBRARY} is older than its sources ({", ".join(SOURCES)}: {error}); '
                           f'rebuild it with `make`') from error
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform='cpu')
    return True


def bfloat16_convolutions() -> bool:
    """Whether the library is built and oneDNN has bfloat16 convolutions for this CPU: AVX-512 or
    AVX2-VNNI-2 (on AVX2 alone it has none; bfloat16 convolutions then compute in float32)."""
    return available() and _probe_bfloat16_convolutions()


@functools.cache
def _probe_bfloat16_convolutions() -> bool:
    return bool(ctypes.cdll.LoadLibrary(str(LIBRARY)).AllflaxOnednnBfloat16Convolutions())


def fits(x: jax.Array) -> bool:
    """Whether the kernels take `x`: float32 or bfloat16, library built. Whether they run is the
    lowering platform's choice (`allflax.models.ops`)."""
    return x.dtype in (jnp.float32, jnp.bfloat16) and available()


def call(target: str, results, *operands, **attributes):
    """The kernel `target` (a TARGETS name) on `operands`; its results (shapes and dtypes as `results`)."""
    # 'sequential': under vmap, one call per element; nothing in allflax maps over its layers.
    return jax.ffi.ffi_call(target, results, vmap_method='sequential')(*operands, **attributes)
