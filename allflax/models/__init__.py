"""Model zoo: every network is registered by name and built with `create`.

Models are Flax NNX modules that take normalized NHWC float input and return
logits (or features when `include_top=False`); `model.eval()` switches
dropout and batch norm to inference.
"""
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Modules whose import registers model families.
_FAMILIES = ('allflax.models.vgg',)
_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str):
    """Registers `builder(num_classes, *, include_top, dtype, param_dtype, rngs, **options)`."""
    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f'model {name!r} is registered twice')
        _REGISTRY[name] = builder
        return builder
    return decorator


def names() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def create(name: str, num_classes: int, *, include_top: bool = True,
           dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0,
           **options) -> nnx.Module:
    """Builds the model registered as `name` with freshly initialised weights."""
    _import_families()
    if name not in _REGISTRY:
        raise ValueError(f'unknown model name {name!r}; registered: {", ".join(sorted(_REGISTRY))}')
    if include_top and num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    return _REGISTRY[name](num_classes, include_top=include_top, dtype=jnp.dtype(dtype),
                           param_dtype=jnp.dtype(param_dtype), rngs=nnx.Rngs(seed), **options)


def count_params(model: nnx.Module) -> int:
    """Counts every weight Keras counts: parameters and batch-norm statistics."""
    state = nnx.state(model, nnx.Param, nnx.BatchStat)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(state)))


def _import_families():
    for module in _FAMILIES:
        importlib.import_module(module)
