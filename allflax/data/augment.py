"""Augmentation and normalisation inside the compiled train step: uint8 tiles go to the device
as they are, and every random transform runs there, per image, vectorised over the batch.

On the device rather than in Grain's host workers, by measurement (benchmarks/RESULTS.md,
"Input pipeline and augmentation"). On the 2-core CPU, all ops on a batch of 32 224-px tiles
cost 0.27 s inside jit, under 1 % of the VGG19+MHSA train step they feed (~30 s); the same ops
in OpenCV/numpy take 0.08 core-seconds per batch in a host worker: no gain worth a second code
path. On a GPU the step takes milliseconds, and host workers would need several cores for
augmentation alone where the accelerator spends a few memory-bound passes; the tiles also
travel as uint8, and the draws depend only on (seed, step), not on the worker count.

`data.augment` names the ops; `data.augment_params` sizes them. The geometric ops come first,
as one bilinear resampling (`rotate`, `crop`) that also does the exact symmetries (`flip`,
`rot90`), which alone just move pixels. The photometric ops then run in the order named. All draws come from the
step's key, one sub-key per op, so a run is reproducible and naming another op leaves the
others' draws unchanged.
"""
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

AUGMENTATIONS = ('flip', 'rot90', 'rotate', 'crop', 'color', 'blur', 'hed')

# Ruifrok & Johnston (2001): optical density of haematoxylin, eosin and DAB (rows) in R, G, B,
# as skimage's rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_MIN_LIGHT = 1e-6  # skimage's floor on transmitted light; log(1/_MIN_LIGHT) is its unit of density.

_GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as torchvision's colour jitter.
_RGB_TO_YIQ = np.array([_GREY, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def augment(images: jax.Array, key: jax.Array, names: tuple[str, ...], params: Mapping) -> jax.Array:
    """Random `names` ops on a batch of uint8 N×H×W×3 tiles → float32 in [0, 255]."""
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f'unknown data.augment {unknown}; known: {", ".join(AUGMENTATIONS)}')
    keys = dict(zip(AUGMENTATIONS, jax.random.split(key, len(AUGMENTATIONS))))
    symmetry = _symmetry(keys['flip'], keys['rot90'], names, images.shape)
    if 'rotate' in names or 'crop' in names:
        # The symmetry rides along in the resampling's coordinates, at no cost.
        rows, cols = _source_coordinates(images.shape, symmetry, keys['rotate'], keys['crop'], names, params)
        images = jax.vmap(_bilinear)(images.astype(jnp.float32), rows, cols)
    else:
        images = _apply_symmetry(images, symmetry).astype(jnp.float32)
    for name in names:
        if name in _PHOTOMETRIC:
            images = jnp.clip(_PHOTOMETRIC[name](images, keys[name], params), 0.0, 255.0)
    return images


def normalize(images: jax.Array, mean, std, dtype) -> jax.Array:
    """RGB in [0, 255] (uint8 or float) → (x/255 − mean)/std in the compute dtype."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def rgb_to_hed(rgb: jax.Array) -> jax.Array:
    """RGB in [0, 1] → stain densities (skimage's rgb2hed without its clipping of negative
    densities, so that hed_to_rgb inverts it exactly)."""
    return _mix_channels(jnp.log(jnp.maximum(rgb, _MIN_LIGHT)) / np.log(_MIN_LIGHT), HED_FROM_RGB)


def hed_to_rgb(hed: jax.Array) -> jax.Array:
    """Stain densities → RGB (skimage's hed2rgb, unclipped)."""
    return jnp.exp(_mix_channels(hed, RGB_FROM_HED) * np.log(_MIN_LIGHT))


def _mix_channels(pixels: jax.Array, matrix) -> jax.Array:
    """pixels (…×C) @ matrix (C×D), or (N×C×D) for one matrix per image of an N×H×W×C batch,
    written out as products of channels: XLA fuses them with their neighbours, where a dot
    with three-long rows is a separate, slow kernel on CPU."""
    matrix = jnp.asarray(matrix, pixels.dtype)
    if matrix.ndim == 3:
        matrix = matrix[:, None, None]
    return sum(pixels[..., channel, None] * matrix[..., channel, :] for channel in range(pixels.shape[-1]))


def _symmetry(flip_key, rot90_key, names, shape):
    """Cells have no up or left: `flip` mirrors rows and columns, `rot90` also transposes, which
    with the mirrors gives all eight symmetries of a square. Per image (flip_rows, flip_cols,
    transpose), each None where not asked for; the transpose comes first."""
    batch, height, width, _ = shape
    transpose = flip_rows = flip_cols = None
    if 'rot90' in names:
        if height != width:
            raise ValueError(f'rot90 needs square images, got {height}×{width}')
        transpose = jax.random.bernoulli(rot90_key, 0.5, (batch,))
    if 'flip' in names or 'rot90' in names:
        flip_rows, flip_cols = jax.random.bernoulli(flip_key, 0.5, (2, batch))
    return flip_rows, flip_cols, transpose


def _apply_symmetry(images, symmetry):
    """Exact: moves the uint8 pixels."""
    flip_rows, flip_cols, transpose = symmetry
    if transpose is not None:
        images = jnp.where(_per_image(transpose), images.transpose(0, 2, 1, 3), images)
    if flip_rows is not None:
        images = jnp.where(_per_image(flip_rows), images[:, ::-1], images)
        images = jnp.where(_per_image(flip_cols), images[:, :, ::-1], images)
    return images


def _uniform(key, batch: int, low: float, high: float) -> jax.Array:
    return jax.random.uniform(key, (batch,), minval=low, maxval=high)


def _source_coordinates(shape, symmetry, rotate_key, crop_key, names, params):
    """Where each output pixel samples its input: a box (`crop`: a fraction of the area at an
    aspect ratio, anywhere inside) of the image turned about its centre (`rotate`) after the
    symmetry."""
    batch, height, width, _ = shape
    angle = jnp.zeros((batch,))
    if 'rotate' in names:
        degrees = params['rotation_degrees']
        angle = jnp.deg2rad(_uniform(rotate_key, batch, -degrees, degrees))
    box_height = box_width = jnp.ones((batch,))
    centre_row = centre_col = jnp.zeros((batch,))
    if 'crop' in names:
        area_key, ratio_key, row_key, col_key = jax.random.split(crop_key, 4)
        area = _uniform(area_key, batch, *params['crop_scale'])
        ratio = jnp.exp(_uniform(ratio_key, batch, *np.log(params['crop_ratio'])))  # width / height
        box_height = jnp.minimum(jnp.sqrt(area / ratio), 1.0)  # Fractions of the image's sides.
        box_width = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
        centre_row = _uniform(row_key, batch, -0.5, 0.5) * (1.0 - box_height) * height
        centre_col = _uniform(col_key, batch, -0.5, 0.5) * (1.0 - box_width) * width
    # Pixel offsets from the image centre, in the turned image, then turned back.
    row_offsets = (jnp.arange(height) - (height - 1) / 2)[None, :, None]
    col_offsets = (jnp.arange(width) - (width - 1) / 2)[None, None, :]
    rows = centre_row[:, None, None] + row_offsets * box_height[:, None, None]
    cols = centre_col[:, None, None] + col_offsets * box_width[:, None, None]
    cos, sin = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
    rows, cols = cos * rows - sin * cols, sin * rows + cos * cols
    flip_rows, flip_cols, transpose = (None if draw is None else draw[:, None, None] for draw in symmetry)
    if flip_rows is not None:
        rows, cols = jnp.where(flip_rows, -rows, rows), jnp.where(flip_cols, -cols, cols)
    if transpose is not None:
        rows, cols = jnp.where(transpose, cols, rows), jnp.where(transpose, rows, cols)
    return rows + (height - 1) / 2, cols + (width - 1) / 2


def _bilinear(image, rows, cols):
    """image (H×W×C) at fractional pixel positions rows, cols (H'×W'); black outside."""
    height, width, channels = image.shape
    flat = image.reshape(height * width, channels)
    top, left = jnp.floor(rows), jnp.floor(cols)
    result = 0.0
    for row, row_weight in ((top, 1.0 - (rows - top)), (top + 1, rows - top)):
        for col, col_weight in ((left, 1.0 - (cols - left)), (left + 1, cols - left)):
            inside = (row >= 0) & (row <= height - 1) & (col >= 0) & (col <= width - 1)
            index = (jnp.clip(row, 0, height - 1).astype(jnp.int32) * width
                     + jnp.clip(col, 0, width - 1).astype(jnp.int32))
            result = result + (row_weight * col_weight * inside)[..., None] * jnp.take(flat, index, axis=0)
    return result


def _per_image(values: jax.Array) -> jax.Array:
    return values[:, None, None, None]


def _grey(images):
    return _mix_channels(images, _GREY[:, None])


def _color(images, key, params):
    """Brightness, contrast, saturation and hue jitter (torchvision's ColorJitter) as one affine
    map of each image's colours. In YIQ, luma Y → b·(m + c·(Y − m)), m the image's mean luma, and
    chroma (I, Q) → b·c·s·(I, Q) turned by h: factors b, c, s uniform in 1 ± brightness, contrast,
    saturation, h in ± hue of a full turn. The four commute, so one map does them all, clipped
    once. (ColorJitter clips after each and shifts hue in HSV; a turn in YIQ keeps luma.)"""
    brightness_key, contrast_key, saturation_key, hue_key = jax.random.split(key, 4)
    batch = images.shape[0]

    def factor(factor_key, amount):
        return _uniform(factor_key, batch, 1.0 - amount, 1.0 + amount)

    brightness, contrast = factor(brightness_key, params['brightness']), factor(contrast_key, params['contrast'])
    chroma = brightness * contrast * factor(saturation_key, params['saturation'])
    turn = 2 * np.pi * _uniform(hue_key, batch, -params['hue'], params['hue'])
    cos, sin, zero = chroma * jnp.cos(turn), chroma * jnp.sin(turn), jnp.zeros((batch,))
    yiq_map = jnp.stack([jnp.stack([brightness * contrast, zero, zero], -1),
                         jnp.stack([zero, cos, sin], -1),
                         jnp.stack([zero, -sin, cos], -1)], -2)  # Row vectors: yiq @ yiq_map.
    matrices = jnp.asarray(_RGB_TO_YIQ.T, jnp.float32) @ yiq_map @ jnp.asarray(_YIQ_TO_RGB.T, jnp.float32)
    mean_luma = _grey(images).mean(axis=(1, 2, 3))
    # Luma offset b·(1 − c)·m; luma alone is grey, equal in R, G and B.
    return _mix_channels(images, matrices) + _per_image(brightness * (1.0 - contrast) * mean_luma)


def _blur(images, key, params):
    """Gaussian blur with a random sigma (pixels) per image, edges mirrored (flat regions stay
    flat): per image a banded matrix, applied to the rows and then to the columns. As matrix
    products, each pass reads its input once, where shifted sums get fused and recomputed."""
    low, high = params['blur_sigma']
    radius = int(np.ceil(3 * high))
    sigma = _uniform(key, images.shape[0], low, high)
    taps = np.arange(-radius, radius + 1)
    weights = jnp.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    weights = weights / weights.sum(-1, keepdims=True)
    height, width = images.shape[1:3]
    if radius >= min(height, width):
        raise ValueError(f'blur_sigma up to {high} needs images over {radius} px, got {height}×{width}')
    rows = jnp.einsum('nt,tij->nij', weights, _mirrored_shifts(height, taps))
    cols = jnp.einsum('nt,tij->nij', weights, _mirrored_shifts(width, taps))
    images = jnp.einsum('nij,njwc->niwc', rows, images)
    return jnp.einsum('nij,nhjc->nhic', cols, images)


def _mirrored_shifts(size: int, taps: np.ndarray) -> np.ndarray:
    """[t, i, j] = 1 where tap t of output i reads input j, mirrored at the edges (scipy's 'reflect')."""
    source = np.arange(size)[None, :] + taps[:, None]
    source = np.where(source < 0, -source - 1, source)
    source = np.where(source >= size, 2 * size - 1 - source, source)
    return (source[:, :, None] == np.arange(size)).astype(np.float32)


def _hed(images, key, params):
    """Stain jitter (Tellez et al. 2018): each image's haematoxylin, eosin and DAB densities
    scaled by 1 ± hed_scale and shifted by ± hed_shift (skimage's units)."""
    scale_key, shift_key = jax.random.split(key)
    batch = images.shape[0]
    scale = jax.random.uniform(scale_key, (batch, 1, 1, 3), minval=1 - params['hed_scale'],
                               maxval=1 + params['hed_scale'])
    shift = jax.random.uniform(shift_key, (batch, 1, 1, 3), minval=-params['hed_shift'],
                               maxval=params['hed_shift'])
    return 255.0 * hed_to_rgb(rgb_to_hed(images / 255.0) * scale + shift)


_PHOTOMETRIC = {'color': _color, 'blur': _blur, 'hed': _hed}
