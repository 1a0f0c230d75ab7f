"""ResNet50/ResNet101 v1, layer for layer as `keras.applications.ResNet50/ResNet101`.

Layer attributes carry the Keras layer names (`conv1_conv`, `conv2_block1_0_bn`,
`predictions`, ...) so that weight import maps names one to one.

ResNet101 is paper 1's baseline, compared on accuracy, not speed: it keeps flax's own layers and
none of `allflax.models.ops`' platform hooks, so its numerics are XLA's everywhere.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from allflax.models import head_dtype, register

# Bottleneck blocks per stage (stages conv2..conv5); every block ends 4× wider than FILTERS.
BLOCKS = {'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}
FILTERS = (64, 128, 256, 512)
EXPANSION = 4
# Keras's ResNet epsilon; the ImageNet statistics were estimated with it.
BN_EPSILON = 1.001e-5


class ResNet(nnx.Module):
    """Keras ResNet v1: 7×7/2 stem, 3×3/2 max-pool, four stages of bottleneck blocks.

    As in Keras, the first block of each stage strides in its first 1×1 convolution
    (stage conv2 does not stride) and projects its shortcut with a 1×1 convolution.
    """

    def __init__(self, blocks_per_stage, num_classes: int, *, include_top: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        # Keras defaults (Glorot-uniform kernels, zero biases) so training from scratch matches it.
        conv = functools.partial(nnx.Conv, kernel_init=nnx.initializers.glorot_uniform(),
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        batch_norm = functools.partial(nnx.BatchNorm, epsilon=BN_EPSILON, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.include_top = include_top
        self.conv1_conv = conv(3, FILTERS[0], kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3)))
        self.conv1_bn = batch_norm(FILTERS[0])
        block_names = []
        channels = FILTERS[0]
        for stage, (num_blocks, filters) in enumerate(zip(blocks_per_stage, FILTERS), start=2):
            for block in range(1, num_blocks + 1):
                name = f'conv{stage}_block{block}'
                stride = 2 if block == 1 and stage > 2 else 1
                layers = _bottleneck_layers(channels, filters, stride, projection=block == 1,
                                            conv=conv, batch_norm=batch_norm)
                for suffix, layer in layers.items():
                    setattr(self, f'{name}_{suffix}', layer)
                channels = filters * EXPANSION
                block_names.append(name)
        self.block_names = tuple(block_names)
        if include_top:
            self.predictions = nnx.Linear(channels, num_classes, kernel_init=nnx.initializers.glorot_uniform(),
                                          dtype=head_dtype(dtype), param_dtype=param_dtype, rngs=rngs)

    def _block(self, name: str, x: jax.Array) -> jax.Array:
        def layer(suffix):
            return getattr(self, f'{name}_{suffix}')

        shortcut = x
        if hasattr(self, f'{name}_0_conv'):
            shortcut = layer('0_bn')(layer('0_conv')(x))
        x = nnx.relu(layer('1_bn')(layer('1_conv')(x)))
        x = nnx.relu(layer('2_bn')(layer('2_conv')(x)))
        x = layer('3_bn')(layer('3_conv')(x))
        return nnx.relu(shortcut + x)

    def features(self, images: jax.Array) -> jax.Array:
        """The last convolutional feature map (N, H/32, W/32, 2048), e.g. for Grad-CAM."""
        x = nnx.relu(self.conv1_bn(self.conv1_conv(images.astype(self.dtype))))
        # Keras pads with zeros; after the ReLU that is the same as max-pool's -inf padding.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for name in self.block_names:
            x = self._block(name, x)
        return x

    def head(self, features: jax.Array) -> jax.Array:
        """Float32 logits from `features`, or the features unchanged without a top."""
        if not self.include_top:
            return features
        return self.predictions(features.astype(head_dtype(self.dtype)).mean(axis=(1, 2))).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images))

    def keras_layers(self) -> list[tuple[str, nnx.Module]]:
        """(Keras layer name, module) for every layer a Keras ResNet weight file holds.

        In Keras's functional (topological) order, which `.weights.h5` files follow:
        a projecting block lists its shortcut conv after the residual branch's 3×3 layers.
        """
        names = ['conv1_conv', 'conv1_bn']
        for block in self.block_names:
            names += [f'{block}_1_conv', f'{block}_1_bn', f'{block}_2_conv', f'{block}_2_bn']
            if hasattr(self, f'{block}_0_conv'):
                names += [f'{block}_0_conv', f'{block}_3_conv', f'{block}_0_bn', f'{block}_3_bn']
            else:
                names += [f'{block}_3_conv', f'{block}_3_bn']
        if self.include_top:
            names.append('predictions')
        return [(name, getattr(self, name)) for name in names]


def _bottleneck_layers(in_channels: int, filters: int, stride: int, *, projection: bool,
                       conv, batch_norm) -> dict[str, nnx.Module]:
    """One bottleneck block's layers keyed by Keras suffix (`0_conv` … `3_bn`)."""
    out_channels = filters * EXPANSION
    layers = {}
    if projection:
        layers['0_conv'] = conv(in_channels, out_channels, kernel_size=(1, 1), strides=(stride, stride),
                                padding='VALID')
        layers['0_bn'] = batch_norm(out_channels)
    layers['1_conv'] = conv(in_channels, filters, kernel_size=(1, 1), strides=(stride, stride), padding='VALID')
    layers['1_bn'] = batch_norm(filters)
    layers['2_conv'] = conv(filters, filters, kernel_size=(3, 3), padding='SAME')
    layers['2_bn'] = batch_norm(filters)
    layers['3_conv'] = conv(filters, out_channels, kernel_size=(1, 1), padding='VALID')
    layers['3_bn'] = batch_norm(out_channels)
    return layers


def _builder(blocks_per_stage):
    def build(num_classes, *, include_top, dtype, param_dtype, rngs):
        return ResNet(blocks_per_stage, num_classes, include_top=include_top, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
    return build


register('resnet50')(_builder(BLOCKS['resnet50']))
register('resnet101')(_builder(BLOCKS['resnet101']))
