"""Squeeze-and-excitation's passes over the feature map as kernels of activation_kernels.cc.

Each way, two passes over the feature map (channel mean, then scaling; gate gradient, then input
gradient) run vectorised instead of as XLA:CPU's reductions and bfloat16 conversions (about a
tenth of a B3 step, benchmarks/RESULTS.md); the gate network in between stays the model's own
layers, differentiated by JAX.
"""
import functools

import jax
import jax.numpy as jnp

from allflax.cpu import kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def squeeze_excite(gates_of_means, features, params):
    """`features · gates` for NHWC `features`, where `gates_of_means(params, channel means)` maps
    the (N, C) channel means (in the features' dtype) to the (N, C) gates."""
    return _forward(gates_of_means, features, params)[0]


def _gates(gates_of_means, params, mean, dtype):
    return gates_of_means(params, mean.astype(dtype)).astype(jnp.float32)


def _forward(gates_of_means, features, params):
    channels = jax.ShapeDtypeStruct((features.shape[0], features.shape[3]), jnp.float32)
    mean = kernels.call('allflax_ChannelMean', channels, features)
    gates = _gates(gates_of_means, params, mean, features.dtype)
    out = kernels.call('allflax_ScaleChannels', jax.ShapeDtypeStruct(features.shape, features.dtype), features, gates)
    return out, (features, params, mean)


def _backward(gates_of_means, residuals, cotangent):
    features, params, mean = residuals
    cotangent = cotangent.astype(features.dtype)
    # The gate network is tiny: its forward pass is redone here rather than kept.
    gates, pullback = jax.vjp(lambda params, mean: _gates(gates_of_means, params, mean, features.dtype), params, mean)
    d_gates = kernels.call('allflax_GateGradient', jax.ShapeDtypeStruct(gates.shape, jnp.float32), cotangent, features)
    d_params, d_mean = pullback(d_gates)
    d_features = kernels.call('allflax_ScaledInputGradient', jax.ShapeDtypeStruct(features.shape, features.dtype),
                              cotangent, gates, d_mean)
    return d_features, d_params


squeeze_excite.defvjp(_forward, _backward)
