"""Input conventions: how uint8 RGB tiles become a model's float input.

A pretrained backbone's weights were trained on one convention, and only that one gives their
features (`allflax.models.imagenet` records which, with the converted weights); a run records its
own in `data.input_convention`. Every convention is one formula with its own constants,

    y = (x[..., channel_order] * scale - mean) / std   per channel, in float32,

and `normalize` is the one function that applies it: in the train step, the inference step (eval,
predict, Grad-CAM) and the exported bundle's graph alike.
"""
import dataclasses

import jax
import jax.numpy as jnp

IMAGENET_MEAN_STD = 'imagenet_mean_std'
CAFFE = 'caffe'
MINUS_ONE_TO_ONE = 'minus_one_to_one'
# Runs trained before data.input_convention existed were all normalised this way.
PREDATING = IMAGENET_MEAN_STD
# Keras's imagenet_utils.preprocess_input(mode='caffe'): the ImageNet channel means of 0-255
# values, in BGR order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclasses.dataclass(frozen=True)
class Convention:
    name: str
    channel_order: str  # 'RGB' or 'BGR': the order the model's input channels are in.
    scale: float
    mean: tuple[float, float, float]  # In channel_order, after scaling.
    std: tuple[float, float, float]
    meaning: str

    def describe(self) -> dict:
        """Its constants and formula, as a bundle's metadata.json states them."""
        return {'convention': self.name, 'channel_order': self.channel_order, 'scale': self.scale,
                'mean': list(self.mean), 'std': list(self.std),
                'formula': f'({"x[..., ::-1]" if self.channel_order == "BGR" else "x"} * scale - mean) / std per '
                           f'channel, in float32: {self.meaning}'}


_MEANINGS = {
    IMAGENET_MEAN_STD: ('RGB / 255, minus data.mean, divided by data.std (ImageNet\'s by default): the Keras '
                        'EfficientNetV2 B0-B3 weights\' own preprocessing, and the from-scratch default'),
    CAFFE: ('RGB reversed to BGR, minus the ImageNet BGR means of 0-255 values, no scaling: Keras\'s '
            '"caffe" preprocess_input of its VGG16/VGG19/ResNet weights'),
    MINUS_ONE_TO_ONE: 'RGB / 128 - 1: the Keras EfficientNetV2-S weights\' own preprocessing',
}
NAMES = tuple(_MEANINGS)


def convention(name: str, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> Convention:
    """The convention `name`; `mean` and `std` (data.mean, data.std) are imagenet_mean_std's only."""
    if name not in _MEANINGS:
        raise ValueError(f'data.input_convention={name!r} is not a convention: use one of {", ".join(NAMES)}')
    if name == CAFFE:
        return Convention(name, 'BGR', 1.0, CAFFE_MEAN_BGR, (1.0, 1.0, 1.0), _MEANINGS[name])
    if name == MINUS_ONE_TO_ONE:
        return Convention(name, 'RGB', 1 / 128, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), _MEANINGS[name])
    return Convention(name, 'RGB', 1 / 255, tuple(mean), tuple(std), _MEANINGS[name])


def of(data) -> Convention:
    """The convention of a run's `data` section: its data.input_convention, resolved when training
    started (allflax.training.loop.resolve_input_convention); absent in runs that predate it."""
    name = data.get('input_convention', PREDATING)
    if not name:
        raise ValueError("data.input_convention is '' (to be chosen from model.init_from's weights): resolve it "
                         "with allflax.training.loop.resolve_input_convention(config) before building steps")
    return convention(name, data.mean, data.std)


def normalize(images: jax.Array, data, dtype) -> jax.Array:
    """uint8 (or float 0-255) RGB N×H×W×3 tiles → the model's input under the convention of the
    `data` section (`of`), in `dtype`."""
    used = of(data)
    # One subtraction and one division in 0-255 units: (x - mean / scale) / (std / scale), with
    # 1 / scale a whole 255, 128 or 1 (imagenet_mean_std's program is the one allflax always ran).
    to_bytes = float(round(1 / used.scale))
    offset = jnp.asarray(used.mean, jnp.float32) * to_bytes
    divisor = jnp.asarray(used.std, jnp.float32) * to_bytes
    images = images.astype(jnp.float32)
    if used.channel_order == 'BGR':
        images = images[..., ::-1]
    return ((images - offset) / divisor).astype(dtype)
