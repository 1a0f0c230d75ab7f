"""EfficientNetV2 B0–B3 and S as `keras.applications` builds them, and paper 2's B3 + SE attention.

Blocks are attributes named with Keras's block prefixes and hold their layers under
Keras's layer suffixes, so Keras layer `block4a_dwconv2` is `model.block4a.dwconv2`;
`keras_layers()` lists every weighted layer under its full Keras name.

Input is normalized NHWC float (Keras's `include_preprocessing=False`): Keras's
ImageNet weights expect ImageNet mean/std normalization for B0–B3 and [-1, 1] for S.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from allflax.models import batch_norm, head_dtype, ops, register
from allflax.models.attention import SqueezeExcitation


class Stage(NamedTuple):
    """A run of blocks; only the first one strides and changes the width."""
    fused: bool
    repeats: int
    in_filters: int
    out_filters: int
    expand_ratio: int
    strides: int
    se_ratio: float
    kernel_size: int = 3


# Keras's DEFAULT_BLOCKS_ARGS before width and depth scaling.
B_STAGES = (  # efficientnetv2-b0 … b3
    Stage(fused=True, repeats=1, in_filters=32, out_filters=16, expand_ratio=1, strides=1, se_ratio=0.0),
    Stage(fused=True, repeats=2, in_filters=16, out_filters=32, expand_ratio=4, strides=2, se_ratio=0.0),
    Stage(fused=True, repeats=2, in_filters=32, out_filters=48, expand_ratio=4, strides=2, se_ratio=0.0),
    Stage(fused=False, repeats=3, in_filters=48, out_filters=96, expand_ratio=4, strides=2, se_ratio=0.25),
    Stage(fused=False, repeats=5, in_filters=96, out_filters=112, expand_ratio=6, strides=1, se_ratio=0.25),
    Stage(fused=False, repeats=8, in_filters=112, out_filters=192, expand_ratio=6, strides=2, se_ratio=0.25),
)
S_STAGES = (  # efficientnetv2-s
    Stage(fused=True, repeats=2, in_filters=24, out_filters=24, expand_ratio=1, strides=1, se_ratio=0.0),
    Stage(fused=True, repeats=4, in_filters=24, out_filters=48, expand_ratio=4, strides=2, se_ratio=0.0),
    Stage(fused=True, repeats=4, in_filters=48, out_filters=64, expand_ratio=4, strides=2, se_ratio=0.0),
    Stage(fused=False, repeats=6, in_filters=64, out_filters=128, expand_ratio=4, strides=2, se_ratio=0.25),
    Stage(fused=False, repeats=9, in_filters=128, out_filters=160, expand_ratio=6, strides=1, se_ratio=0.25),
    Stage(fused=False, repeats=15, in_filters=160, out_filters=256, expand_ratio=6, strides=2, se_ratio=0.25),
)
# Registered name: (block table, width coefficient, depth coefficient).
VARIANTS = {
    'efficientnetv2_b0': (B_STAGES, 1.0, 1.0),
    'efficientnetv2_b1': (B_STAGES, 1.0, 1.1),
    'efficientnetv2_b2': (B_STAGES, 1.1, 1.2),
    'efficientnetv2_b3': (B_STAGES, 1.2, 1.4),
    'efficientnetv2_s': (S_STAGES, 1.0, 1.0),
}
TOP_FILTERS = 1280
BN_EPSILON = 1e-3
# Keras and flax both update running = momentum·running + (1 − momentum)·batch.
BN_MOMENTUM = 0.9
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')
# Keras's fan-out of a (k, k, C, 1) depthwise kernel is k·k, the fan-in of flax's (k, k, 1, C).
DEPTHWISE_INIT = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
# Keras scales its dense init by fan-out, which for its 1000-class top is close to fan-in; for a
# 2-class head it gives logits of std ~8 at init, which kept training from scratch at chance.
DENSE_INIT = jax.nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
    """Scales a width and rounds it to the nearest multiple of 8 (at least 8), as Keras does."""
    filters *= width_coefficient
    return int(max(divisor, int(filters + divisor / 2) // divisor * divisor))


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    return int(math.ceil(depth_coefficient * repeats))


def _conv_and_norm(dtype, param_dtype, rngs):
    """Layer factories with Keras's EfficientNet settings: TF 'SAME' padding, no conv bias.

    Convolutions go through `ops.conv_general_dilated`: on CPU, some 3×3 ones by Winograd,
    the rest through oneDNN (without it: 1×1 ones as dots, depthwise ones as shifted
    multiply-adds, XLA's elsewhere). Batch norms run through `batch_norm.norm`.
    """
    conv = functools.partial(nnx.Conv, padding='SAME', use_bias=False, kernel_init=CONV_INIT,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             conv_general_dilated=ops.conv_general_dilated,
                             promote_dtype=ops.promote_keeping_kernel)
    norm = functools.partial(nnx.BatchNorm, epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return conv, norm


class MBConv(nnx.Module):
    """Inverted-residual block: MBConv (1×1 expand, depthwise k×k) or Fused-MBConv (k×k expand).

    SE follows the spatial convolution; the residual joins when the block keeps stride
    and width, behind per-sample drop-connect (stochastic depth) in training.
    """

    def __init__(self, stage: Stage, in_filters: int, out_filters: int, strides: int,
                 drop_rate: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        conv, norm = _conv_and_norm(dtype, param_dtype, rngs)
        kernel = (stage.kernel_size, stage.kernel_size)
        filters = in_filters * stage.expand_ratio
        self.fused = stage.fused
        expands = stage.expand_ratio != 1
        if expands:
            self.expand_conv = conv(in_filters, filters, kernel if stage.fused else (1, 1),
                                    strides=strides if stage.fused else 1)
            self.expand_bn = norm(filters)
        if not stage.fused:
            self.dwconv2 = conv(filters, filters, kernel, strides=strides, feature_group_count=filters,
                                kernel_init=DEPTHWISE_INIT)
            self.bn = norm(filters)
        if 0 < stage.se_ratio <= 1:
            self.se = SqueezeExcitation(filters, max(1, int(in_filters * stage.se_ratio)),
                                        kernel_init=CONV_INIT, dtype=dtype, param_dtype=param_dtype,
                                        rngs=rngs)
        # A fused block without expansion makes its projection the spatial convolution.
        self.spatial_project = stage.fused and not expands
        self.project_conv = conv(filters, out_filters, kernel if self.spatial_project else (1, 1),
                                 strides=strides if self.spatial_project else 1)
        residual = strides == 1 and in_filters == out_filters
        # A residual block starts as the identity (its last BN scale at 0; Goyal et al., 2017), so a
        # deep stack trains from scratch: with Keras's scale of 1, B3 sat at chance for hundreds of
        # steps. Imported weights replace it.
        self.project_bn = norm(out_filters, scale_init=nnx.initializers.zeros if residual else nnx.initializers.ones)
        if residual:
            self.drop = nnx.Dropout(drop_rate, broadcast_dims=(1, 2, 3), rngs=rngs)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = inputs
        if hasattr(self, 'expand_conv'):
            x = batch_norm.norm(self.expand_bn, self.expand_conv(x), swish=True)
        if not self.fused:
            x = batch_norm.norm(self.bn, self.dwconv2(x), swish=True)
        if hasattr(self, 'se'):
            x = self.se(x)
        x = batch_norm.norm(self.project_bn, self.project_conv(x), swish=self.spatial_project)
        if hasattr(self, 'drop'):
            x = self.drop(x) + inputs
        return x

    def keras_layers(self, prefix: str) -> list[tuple[str, nnx.Module]]:
        """(Keras layer name, module) for this block's weighted layers, in Keras's order."""
        layers = [(name, getattr(self, name)) for name in ('expand_conv', 'expand_bn', 'dwconv2', 'bn')
                  if hasattr(self, name)]
        if hasattr(self, 'se'):
            layers += [('se_reduce', self.se.reduce), ('se_expand', self.se.expand)]
        layers += [('project_conv', self.project_conv), ('project_bn', self.project_bn)]
        return [(f'{prefix}_{name}', module) for name, module in layers]


class EfficientNetV2(nnx.Module):
    """Stem, (Fused-)MBConv stages and top conv; then an optional SE attention and a pooled head.

    Without `se_ratio` and `head_hidden` the head is Keras's: GAP → dropout → predictions; with
    them, SE → GAP → dense → BN → swish → dropout → predictions.
    """

    def __init__(self, stages, width_coefficient: float, depth_coefficient: float, num_classes: int, *,
                 include_top: bool, dropout_rate: float, drop_connect_rate: float, se_ratio: float,
                 head_hidden: int, dtype, param_dtype, rngs: nnx.Rngs):
        conv, norm = _conv_and_norm(dtype, param_dtype, rngs)
        dense = functools.partial(nnx.Linear, kernel_init=DENSE_INIT, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.include_top = include_top
        channels = round_filters(stages[0].in_filters, width_coefficient)
        self.stem_conv = conv(3, channels, (3, 3), strides=2)
        self.stem_bn = norm(channels)
        # Keras divides by the unscaled block count, so deeper variants pass 0.2 towards the end.
        unscaled_blocks = sum(stage.repeats for stage in stages)
        self.block_names = []
        for number, stage in enumerate(stages, start=1):
            out_filters = round_filters(stage.out_filters, width_coefficient)
            for repeat in range(round_repeats(stage.repeats, depth_coefficient)):
                name = f'block{number}{chr(ord("a") + repeat)}'
                drop_rate = drop_connect_rate * len(self.block_names) / unscaled_blocks
                setattr(self, name, MBConv(stage, channels, out_filters, stage.strides if repeat == 0 else 1,
                                           drop_rate, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
                self.block_names.append(name)
                channels = out_filters
        top_filters = round_filters(TOP_FILTERS, width_coefficient)
        self.top_conv = conv(channels, top_filters, (1, 1))
        self.top_bn = norm(top_filters)
        self.keras_top = include_top and not se_ratio and not head_hidden
        if not include_top:
            return
        channels = top_filters
        if se_ratio:
            self.attention = SqueezeExcitation(channels, max(1, int(channels * se_ratio)), kernel_init=CONV_INIT,
                                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if head_hidden:
            # Batch norm before the swish: without it training from scratch stayed at chance
            # (global gradient norm ~0.05 after 300 steps), measured on B3 at 64 px.
            self.head_fc = dense(channels, head_hidden, use_bias=False)
            self.head_bn = norm(head_hidden)
            channels = head_hidden
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.predictions = dense(channels, num_classes, dtype=head_dtype(dtype))

    def features(self, images: jax.Array) -> jax.Array:
        """The last convolutional feature map (top_conv → top_bn → swish), e.g. for Grad-CAM."""
        x = batch_norm.norm(self.stem_bn, self.stem_conv(images.astype(self.dtype)), swish=True)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return batch_norm.norm(self.top_bn, self.top_conv(x), swish=True)

    def head(self, features: jax.Array) -> jax.Array:
        """Float32 logits from the feature map `features` returns."""
        x = features
        if hasattr(self, 'attention'):
            x = self.attention(x)
        x = x.astype(head_dtype(self.dtype)).mean(axis=(1, 2))
        if hasattr(self, 'head_fc'):
            x = batch_norm.norm(self.head_bn, self.head_fc(x), swish=True)
        return self.predictions(self.dropout(x)).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        features = self.features(images)
        return self.head(features) if self.include_top else features

    def keras_layers(self) -> list[tuple[str, nnx.Module]]:
        """(Keras layer name, module) for every layer a Keras EfficientNetV2 weight file holds."""
        layers = [('stem_conv', self.stem_conv), ('stem_bn', self.stem_bn)]
        for name in self.block_names:
            layers += getattr(self, name).keras_layers(name)
        layers += [('top_conv', self.top_conv), ('top_bn', self.top_bn)]
        if self.keras_top:
            layers.append(('predictions', self.predictions))
        return layers


def _builder(variant: str, *, se_ratio: float = 0.0, head_hidden: int = 0):
    stages, width_coefficient, depth_coefficient = VARIANTS[variant]

    def build(num_classes, *, include_top, dtype, param_dtype, rngs, dropout_rate=0.2,
              drop_connect_rate=0.2, se_ratio=se_ratio, head_hidden=head_hidden):
        return EfficientNetV2(stages, width_coefficient, depth_coefficient, num_classes,
                              include_top=include_top, dropout_rate=dropout_rate,
                              drop_connect_rate=drop_connect_rate, se_ratio=se_ratio,
                              head_hidden=head_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return build


for _name in VARIANTS:
    register(_name)(_builder(_name))
# Paper 2: SE channel attention (squeeze 1536 → 96) on B3's last feature map and a
# 1280-wide hidden layer with batch norm: 15,200,928 weights with a 2-class head (the paper
# reports ≈15.2 M).
register('efficientnetv2_b3_se')(_builder('efficientnetv2_b3', se_ratio=1 / 16, head_hidden=1280))
