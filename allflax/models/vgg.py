"""VGG16/VGG19 (Keras and torchvision layer configuration) and paper 1's VGG19 + MHSA.

Layer attributes carry the Keras layer names (`block1_conv1`, `fc1`, ...) so that
weight import maps names one to one.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from allflax.models import head_dtype, ops, register
from allflax.models.attention import MultiHeadSelfAttention

# Convolutions per block; every block ends in a 2×2 max-pool.
DEPTHS = {'vgg16': (2, 2, 3, 3, 3), 'vgg19': (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)
TOP_WIDTH = 4096
# He-normal over fan-out, as torchvision initialises VGG: trains from scratch without batch norm.
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
DENSE_INIT = jax.nn.initializers.normal(0.01)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pool, stride 2, of an NHWC map with even sides, as a reshape and a max: the values
    of nnx.max_pool, and a gradient of fused elementwise ops where reduce_window's
    select-and-scatter gradient took XLA:CPU a fifth of VGG19's bf16 step (benchmarks/RESULTS.md).
    Where a window holds equal maxima, the gradient is shared among them instead of given to one."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class VGG(nnx.Module):
    """VGG convolutions, an optional self-attention block, and a classifier head.

    head='flatten' is Keras's top (flatten → fc1 → fc2 → predictions, sized for
    `image_size`); head='gap' pools globally, then an optional hidden layer, dropout
    and the predictions layer.
    """

    def __init__(self, depths, num_classes: int, *, include_top: bool, image_size: int,
                 head: str, head_hidden: int, dropout_rate: float, attention_after: str | None,
                 attention_heads: int, attention_dropout: float, dtype, param_dtype, rngs: nnx.Rngs):
        if image_size % 32:
            raise ValueError(f'VGG needs an image size divisible by 32 (five 2×2 pools), got {image_size}')
        # In programs lowered for CPU, ops picks each convolution's kernel (Winograd or oneDNN); see conv_relu below.
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding='SAME', kernel_init=CONV_INIT,
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 conv_general_dilated=ops.conv_general_dilated,
                                 promote_dtype=ops.promote_keeping_kernel)
        dense = functools.partial(nnx.Linear, kernel_init=DENSE_INIT, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.include_top = include_top
        self.head_type = head
        layer_names = []
        channels, size = 3, image_size
        for block, (depth, width) in enumerate(zip(depths, WIDTHS), start=1):
            for index in range(1, depth + 1):
                name = f'block{block}_conv{index}'
                setattr(self, name, conv(channels, width))
                channels = width
                layer_names.append(name)
                if name == attention_after:
                    self.attention = self._attention(channels, size, attention_heads, attention_dropout,
                                                     dtype, param_dtype, rngs)
            size //= 2
            layer_names.append(f'block{block}_pool')
            if layer_names[-1] == attention_after:
                self.attention = self._attention(channels, size, attention_heads, attention_dropout,
                                                 dtype, param_dtype, rngs)
        if attention_after is not None and attention_after not in layer_names:
            raise ValueError(f'attention_after={attention_after!r} names no layer; '
                             f'choose one of {", ".join(layer_names)}')
        self.layer_names = tuple(layer_names)
        self.attention_after = attention_after
        # The forward pass in order, the attention block as a step of its own.
        self.steps = sum(((name, 'attention') if name == attention_after else (name,) for name in layer_names), ())
        # Grad-CAM's layer (Selvaraju et al. take VGG's last convolution): a map at H/16 whose
        # positions are still the image's, unmixed by the attention and its position embedding.
        self.gradcam_layer = [name for name in layer_names if not name.endswith('_pool')][-1]
        if not include_top:
            return
        if head == 'flatten':
            self.fc1 = dense(size * size * channels, TOP_WIDTH)
            self.fc2 = dense(TOP_WIDTH, TOP_WIDTH)
            channels = TOP_WIDTH
        elif head == 'gap':
            if head_hidden:
                self.head_fc = dense(channels, head_hidden)
                channels = head_hidden
        else:
            raise ValueError(f"VGG head must be 'flatten' or 'gap', got {head!r}")
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.predictions = dense(channels, num_classes, dtype=head_dtype(dtype))

    @staticmethod
    def _attention(channels, size, heads, dropout, dtype, param_dtype, rngs):
        return MultiHeadSelfAttention(channels, size * size, num_heads=heads, dropout_rate=dropout,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _run(self, x: jax.Array, steps) -> jax.Array:
        for name in steps:
            if name == 'attention':
                x = self.attention(x)
            elif name.endswith('_pool'):
                x = max_pool_2x2(x)
            else:
                x = ops.conv_relu(getattr(self, name), x)
        return x

    def features(self, images: jax.Array) -> jax.Array:
        """The last feature map (after the attention block, where there is one)."""
        return self._run(images.astype(self.dtype), self.steps)

    def to_gradcam_layer(self, images: jax.Array) -> jax.Array:
        """The output of `gradcam_layer` (after its ReLU, as Keras's layer of that name)."""
        return self._run(images.astype(self.dtype), self.steps[:self.steps.index(self.gradcam_layer) + 1])

    def from_gradcam_layer(self, x: jax.Array) -> jax.Array:
        """The logits from the output of `gradcam_layer`."""
        return self.head(self._run(x, self.steps[self.steps.index(self.gradcam_layer) + 1:]))

    def head(self, features: jax.Array) -> jax.Array:
        x = features
        if self.head_type == 'flatten':
            x = x.reshape(x.shape[0], -1)  # H, W, C order, as Keras flattens.
            x = self.dropout(nnx.relu(self.fc1(x)))
            x = self.dropout(nnx.relu(self.fc2(x)))
        else:
            x = x.astype(head_dtype(self.dtype)).mean(axis=(1, 2))
            if hasattr(self, 'head_fc'):
                x = nnx.relu(self.head_fc(x))
            x = self.dropout(x)
        return self.predictions(x).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        features = self.features(images)
        return self.head(features) if self.include_top else features

    def keras_layers(self) -> list[tuple[str, nnx.Module]]:
        """(Keras layer name, module) for every layer a Keras VGG weight file holds."""
        names = [n for n in self.layer_names if not n.endswith('_pool')]
        if self.include_top and self.head_type == 'flatten':
            names += ['fc1', 'fc2', 'predictions']
        return [(name, getattr(self, name)) for name in names]


def _builder(depths, *, head, head_hidden=0, dropout_rate=0.0, attention_after=None,
             attention_heads=8, attention_dropout=0.0):
    def build(num_classes, *, include_top, dtype, param_dtype, rngs, image_size,
              head=head, head_hidden=head_hidden, dropout_rate=dropout_rate,
              attention_after=attention_after, attention_heads=attention_heads,
              attention_dropout=attention_dropout):
        return VGG(depths, num_classes, include_top=include_top, image_size=image_size, head=head,
                   head_hidden=head_hidden, dropout_rate=dropout_rate, attention_after=attention_after,
                   attention_heads=attention_heads, attention_dropout=attention_dropout,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return build


register('vgg16', sized_by_input=True)(_builder(DEPTHS['vgg16'], head='flatten'))
register('vgg19', sized_by_input=True)(_builder(DEPTHS['vgg19'], head='flatten'))

# Paper 1: MHSA over VGG19's last feature map, then a pooled head with dropout.
register('vgg19_mhsa', sized_by_input=True)(_builder(
    DEPTHS['vgg19'], head='gap', head_hidden=256, dropout_rate=0.5,
    attention_after='block5_pool', attention_heads=8))
