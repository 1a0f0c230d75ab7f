"""Batch norm (and the swish after it) in training mode with a hand-derived gradient.

`norm(bn, x, swish)` is `bn(x)` (then `nnx.swish`) for an `nnx.BatchNorm` over the last axis,
with its parameters, epsilon, momentum and running-statistics update. In training mode the
forward pass reads x twice (statistics; normalise, scale, shift, swish) and the backward pass
twice (the two parameter gradients; the input gradient), recomputing the normalised input
instead of keeping it. Autodiff of flax's batch norm and the swish makes XLA:CPU pass over
the activations several times more; EfficientNetV2's step is mostly these passes
(benchmarks/RESULTS.md). Statistics and arithmetic run in float32 whatever the input dtype;
the output has the input's dtype.

In programs lowered for CPU, where allflax's kernels are built, both passes run as one kernel
call each (allflax/cpu/batch_norm.py): the same maths. Elsewhere they are the JAX functions below.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from allflax.models import ops


def norm(bn: nnx.BatchNorm, x: jax.Array, swish: bool = False) -> jax.Array:
    """`bn(x)`, followed by `nnx.swish` if `swish`; in training mode through the custom gradient."""
    if bn.use_running_average or bn.axis not in (-1, x.ndim - 1) or bn.axis_name is not None:
        y = bn(x)
        return nnx.swish(y) if swish else y
    dtype = bn.dtype or x.dtype
    scale = bn.scale[...].astype(jnp.float32) if bn.use_scale else jnp.ones(x.shape[-1], jnp.float32)
    bias = bn.bias[...].astype(jnp.float32) if bn.use_bias else jnp.zeros(x.shape[-1], jnp.float32)
    y, mean, var = _train_norm(x.astype(dtype), scale, bias, bn.epsilon, swish)
    # As flax: running statistics move toward the batch's, outside the gradient.
    for stat, batch_value in ((bn.mean, mean), (bn.var, var)):
        stat[...] = lax.stop_gradient(bn.momentum * stat[...] + (1 - bn.momentum) * batch_value.astype(stat.dtype))
    return y


def _moments(x):
    """Per-channel mean and (biased) variance over all but the last axis, in float32 (flax's
    fast variance: E[x²] − E[x]², clipped at 0)."""
    axes = tuple(range(x.ndim - 1))
    x = x.astype(jnp.float32)
    mean = x.mean(axes)
    return mean, jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _train_norm(x, scale, bias, epsilon, swish):
    """(activation(normalised x · scale + bias), batch mean, batch variance). The statistics are
    outputs for the running averages only: their cotangents are ignored (`norm` stops them)."""
    return _train_norm_fwd(x, scale, bias, epsilon, swish)[0]


def _train_norm_fwd(x, scale, bias, epsilon, swish):
    y, mean, var = ops.batch_norm_forward(_forward, x, scale, bias, epsilon, swish)
    return (y, mean, var), (x, mean, var, scale, bias)


def _forward(x, scale, bias, epsilon, swish):
    mean, var = _moments(x)
    inverse_std = lax.rsqrt(var + epsilon)
    z = (x.astype(jnp.float32) - mean) * (inverse_std * scale) + bias
    y = z * jax.nn.sigmoid(z) if swish else z
    return y.astype(x.dtype), mean, var


def _train_norm_bwd(epsilon, swish, residuals, cotangents):
    x, mean, var, scale, bias = residuals
    return ops.batch_norm_backward(_backward, x, cotangents[0], mean, var, scale, bias, epsilon, swish)


def _backward(x, d_y, mean, var, scale, bias, epsilon, swish):
    inverse_std = lax.rsqrt(var + epsilon)
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    normalised = (x.astype(jnp.float32) - mean) * inverse_std
    d_z = d_y.astype(jnp.float32)
    if swish:
        z = normalised * scale + bias
        sigmoid = jax.nn.sigmoid(z)
        d_z = d_z * sigmoid * (1 + z * (1 - sigmoid))
    d_bias = d_z.sum(axes)
    d_scale = (d_z * normalised).sum(axes)
    # d(normalised)/dx through the batch mean and variance: the standard batch-norm gradient.
    d_x = (inverse_std * scale) * (d_z - (d_bias + normalised * d_scale) / count)
    return d_x.astype(x.dtype), d_scale, d_bias


_train_norm.defvjp(_train_norm_fwd, _train_norm_bwd)
