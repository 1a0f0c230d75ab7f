"""The XLA:CPU kernels allflax builds itself, one library called through XLA's FFI.

`make` compiles `_cpu_kernels.so` next to this file from onednn_conv.cc (oneDNN convolutions,
against the pinned oneDNN wheel: onednn-devel-cpu-gomp, Linux x86-64) and batch_norm_kernels.cc
(batch norm + swish). Where it is not built, `available()` is False and the models keep XLA's
own operations: they run the same, slower.
"""
import ctypes
import functools
import pathlib

import jax

LIBRARY = pathlib.Path(__file__).with_name('_cpu_kernels.so')
SOURCES = ('onednn_conv.cc', 'batch_norm_kernels.cc')
# FFI target name: the handler symbol the library exports.
TARGETS = {
    **{f'allflax_onednn_conv_{name}': f'AllflaxOnednnConv{name}'
       for name in ('Forward', 'InputGradient', 'KernelGradient', 'ForwardBiasRelu', 'KernelBiasGradient')},
    **{f'allflax_batch_norm_{name}': f'AllflaxBatchNorm{name}' for name in ('Forward', 'Backward')},
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
    except AttributeError as error:
        raise RuntimeError(f'{LIBRARY} is older than its sources ({", ".join(SOURCES)}: {error}); '
                           f'rebuild it with `make`') from error
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform='cpu')
    return True
