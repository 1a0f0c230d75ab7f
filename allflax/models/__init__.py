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
_FAMILIES = ('allflax.models.vgg', 'allflax.models.resnet', 'allflax.models.efficientnet_v2')
_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}
# Models whose layers are sized by the input (a flatten head, position embeddings).
_SIZED_BY_INPUT: set[str] = set()


def register(name: str, *, sized_by_input: bool = False):
    """Registers `builder(num_classes, *, include_top, dtype, param_dtype, rngs, **options)`;
    `sized_by_input` builders also receive `image_size`."""
    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f'model {name!r} is registered twice')
        _REGISTRY[name] = builder
        if sized_by_input:
            _SIZED_BY_INPUT.add(name)
        return builder
    return decorator


def head_dtype(dtype) -> jnp.dtype:
    """The dtype of a head's global pooling and logits: float32 where the compute dtype is float16,
    whose range (to 65,504) the logits and the loss need more than its speed; else the compute dtype
    (bfloat16 has float32's range)."""
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def names() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def create(name: str, num_classes: int, *, include_top: bool = True, image_size: int = 224,
           dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0,
           **options) -> nnx.Module:
    """Builds the model registered as `name` with freshly initialised weights for
    `image_size`-pixel square inputs (fully convolutional models take any size)."""
    _import_families()
    if name not in _REGISTRY:
        raise ValueError(f'unknown model name {name!r}; registered: {", ".join(sorted(_REGISTRY))}')
    if include_top and num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    if name in _SIZED_BY_INPUT:
        options['image_size'] = image_size
    return _REGISTRY[name](num_classes, include_top=include_top, dtype=jnp.dtype(dtype),
                           param_dtype=jnp.dtype(param_dtype), rngs=nnx.Rngs(seed), **options)


def count_params(model: nnx.Module) -> int:
    """Counts every weight Keras counts: parameters and batch-norm statistics."""
    state = nnx.state(model, nnx.Param, nnx.BatchStat)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(state)))


def _import_families():
    for module in _FAMILIES:
        importlib.import_module(module)
