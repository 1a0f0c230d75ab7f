"""Attention blocks added on top of convolutional backbones."""
import jax
import jax.numpy as jnp
from flax import nnx

from allflax.models import ops


class MultiHeadSelfAttention(nnx.Module):
    """Pre-LayerNorm self-attention over the positions of a feature map, added residually.

    Tokens are the H×W spatial positions (paper 1 inserts this after VGG19's
    convolutions so distant cells and regions can inform each other); a learned
    position embedding tells the attention where each token sits.
    """

    def __init__(self, channels: int, num_tokens: int, *, num_heads: int, dropout_rate: float,
                 dtype, param_dtype, rngs: nnx.Rngs):
        if channels % num_heads:
            raise ValueError(f'attention width {channels} is not divisible by num_heads={num_heads}')
        self.num_tokens = num_tokens
        self.position_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (num_tokens, channels), param_dtype) * 0.02)
        self.norm = nnx.LayerNorm(channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads, channels, dropout_rate=dropout_rate, decode=False, attention_fn=_float32_attention,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        batch, height, width, channels = features.shape
        if height * width != self.num_tokens:
            raise ValueError(f'attention was built for {self.num_tokens} positions, got a '
                             f'{height}×{width} feature map: build the model with the image size it is fed')
        tokens = features.reshape(batch, height * width, channels) + self.position_embedding[...].astype(features.dtype)
        tokens = tokens + self.attention(self.norm(tokens))
        return tokens.reshape(batch, height, width, channels)


def _float32_attention(query, key, value, *args, dtype=None, **kwargs):
    """nnx.dot_product_attention with its logits and softmax in float32 whatever the compute
    dtype (bfloat16's 8-bit mantissa rounds the attention weights); the result in `dtype`."""
    out = nnx.dot_product_attention(query, key, value, *args, dtype=jnp.float32, **kwargs)
    return out.astype(dtype or query.dtype)


class SqueezeExcitation(nnx.Module):
    """Channel attention (Hu et al., 2018): global context rescales each channel.

    `reduce` and `expand` are 1×1 convolutions with bias, as Keras builds the
    EfficientNet SE layers, so their weights load one to one.
    """

    def __init__(self, channels: int, squeeze_channels: int, *, kernel_init, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.reduce = nnx.Conv(channels, squeeze_channels, (1, 1), kernel_init=kernel_init,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.expand = nnx.Conv(squeeze_channels, channels, (1, 1), kernel_init=kernel_init,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def gates(self, features: jax.Array) -> jax.Array:
        """The per-channel weights in (0, 1), shape (N, 1, 1, C): what interpretation reports."""
        return self.gates_of_context(features.mean(axis=(1, 2), keepdims=True))

    def gates_of_context(self, context: jax.Array) -> jax.Array:
        return nnx.sigmoid(self.expand(nnx.swish(self.reduce(context))))

    def __call__(self, features: jax.Array) -> jax.Array:
        return ops.squeeze_excite(self, features)
