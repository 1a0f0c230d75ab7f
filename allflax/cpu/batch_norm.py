"""Batch norm (+ swish) in training mode as two kernels of activation_kernels.cc: the forward pass
and the gradient, each one pass over the activations, vectorised, without XLA:CPU's scalar
bfloat16 conversions. The same maths as `allflax.models.batch_norm`'s JAX functions."""
import jax
import jax.numpy as jnp
import numpy as np

from allflax.cpu import kernels


def forward(x, scale, bias, epsilon: float, swish: bool):
    """(y, batch mean, batch variance) of float32 or bfloat16 NHWC `x`; statistics in float32."""
    statistic = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    return tuple(kernels.call('allflax_batch_norm_Forward', (jax.ShapeDtypeStruct(x.shape, x.dtype), statistic, statistic),
                              x, scale, bias, epsilon=np.float32(epsilon), swish=swish))


def backward(x, d_y, mean, var, scale, bias, epsilon: float, swish: bool):
    """(d_x, d_scale, d_bias), recomputing the normalised input from `x` and the statistics."""
    gradient = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    return tuple(kernels.call('allflax_batch_norm_Backward', (jax.ShapeDtypeStruct(x.shape, x.dtype), gradient, gradient),
                              x, d_y.astype(x.dtype), mean, var, scale, bias, epsilon=np.float32(epsilon), swish=swish))
