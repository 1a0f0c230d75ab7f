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
`rot90`), which alone just move pixels; on TPU the resampling is `allflax.tpu.resample`'s. The
photometric ops then run in the order named. All draws come from the step's key, one sub-key per
op, so a run is reproducible and naming another op leaves the others' draws unchanged. `draw`
makes them for the whole batch and `apply` uses them, so that the train step can augment each
micro-batch in its turn and get the whole batch's images.
"""
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from allflax.tpu import resample as tpu_resample

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
    return apply(images, draw(key, images.shape, names, params), names, params)


def draw(key: jax.Array, shape: tuple[int, ...], names: tuple[str, ...], params: Mapping) -> dict:
    """The random parameters of `names` for a batch of `shape` (N×H×W×3): a dict of arrays with
    the batch axis first, so that any subset of rows (a micro-batch, a device's share) takes
    `apply` with its rows of the draws and gets its rows of the whole batch's result."""
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f'unknown data.augment {unknown}; known: {", ".join(AUGMENTATIONS)}')
    keys = dict(zip(AUGMENTATIONS, jax.random.split(key, len(AUGMENTATIONS))))
    draws = _symmetry(keys['flip'], keys['rot90'], names, shape)
    if 'rotate' in names or 'crop' in names:
        draws.update(_geometry(keys['rotate'], keys['crop'], names, params, shape[0]))
    for name in names:
        if name in _PHOTOMETRIC:
            draws[name] = _PHOTOMETRIC_DRAWS[name](keys[name], params, shape[0])
    return draws


def apply(images: jax.Array, draws: Mapping, names: tuple[str, ...], params: Mapping) -> jax.Array:
    """`names` with `draws` (from `draw`) on uint8 N×H×W×3 tiles → float32 in [0, 255]."""
    if 'rotate' in names or 'crop' in names:
        # The symmetry rides along in the resampling's coordinates, at no cost.
        rows, cols = _source_coordinates(images.shape, draws)
        max_degrees = params['rotation_degrees'] if 'rotate' in names else 0.0
        images = _resample(images.astype(jnp.float32), rows, cols, max_degrees)
    else:
        images = _apply_symmetry(images, draws).astype(jnp.float32)
    for name in names:
        if name in _PHOTOMETRIC:
            images = jnp.clip(_PHOTOMETRIC[name](images, draws[name], params), 0.0, 255.0)
    return images


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


def _symmetry(flip_key, rot90_key, names, shape) -> dict:
    """Cells have no up or left: `flip` mirrors rows and columns, `rot90` also transposes, which
    with the mirrors gives all eight symmetries of a square. Per image flip_rows, flip_cols and
    transpose, each drawn only where asked for; the transpose comes first."""
    batch, height, width, _ = shape
    draws = {}
    if 'rot90' in names:
        if height != width:
            raise ValueError(f'rot90 needs square images, got {height}×{width}')
        draws['transpose'] = jax.random.bernoulli(rot90_key, 0.5, (batch,))
    if 'flip' in names or 'rot90' in names:
        draws['flip_rows'], draws['flip_cols'] = jax.random.bernoulli(flip_key, 0.5, (2, batch))
    return draws


def _apply_symmetry(images, draws):
    """Exact: moves the uint8 pixels."""
    if 'transpose' in draws:
        images = jnp.where(_per_image(draws['transpose']), images.transpose(0, 2, 1, 3), images)
    if 'flip_rows' in draws:
        images = jnp.where(_per_image(draws['flip_rows']), images[:, ::-1], images)
        images = jnp.where(_per_image(draws['flip_cols']), images[:, :, ::-1], images)
    return images


def _uniform(key, batch: int, low: float, high: float) -> jax.Array:
    return jax.random.uniform(key, (batch,), minval=low, maxval=high)


def _geometry(rotate_key, crop_key, names, params, batch) -> dict:
    """The turn (radians) and the box: a fraction of the area at an aspect ratio (`crop`), its
    sides as fractions of the image's (at most 1: the box never zooms out) and its centre's
    offset from the image's, in pixels of the output."""
    draws = {'angle': jnp.zeros((batch,)), 'box_height': jnp.ones((batch,)), 'box_width': jnp.ones((batch,)),
             'centre_row': jnp.zeros((batch,)), 'centre_col': jnp.zeros((batch,))}
    if 'rotate' in names:
        degrees = params['rotation_degrees']
        draws['angle'] = jnp.deg2rad(_uniform(rotate_key, batch, -degrees, degrees))
    if 'crop' in names:
        area_key, ratio_key, row_key, col_key = jax.random.split(crop_key, 4)
        area = _uniform(area_key, batch, *params['crop_scale'])
        ratio = jnp.exp(_uniform(ratio_key, batch, *np.log(params['crop_ratio'])))  # width / height
        draws['box_height'] = jnp.minimum(jnp.sqrt(area / ratio), 1.0)
        draws['box_width'] = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
        # Fractions of the room the box leaves, scaled by the size in `_source_coordinates`.
        draws['centre_row'] = _uniform(row_key, batch, -0.5, 0.5) * (1.0 - draws['box_height'])
        draws['centre_col'] = _uniform(col_key, batch, -0.5, 0.5) * (1.0 - draws['box_width'])
    return draws


def _source_coordinates(shape, draws):
    """Where each output pixel samples its input: the box of the image turned about its centre
    after the symmetry."""
    _, height, width, _ = shape

    def per_image(name):
        return draws[name][:, None, None]

    # Pixel offsets from the image centre, in the turned image, then turned back.
    row_offsets = (jnp.arange(height) - (height - 1) / 2)[None, :, None]
    col_offsets = (jnp.arange(width) - (width - 1) / 2)[None, None, :]
    rows = per_image('centre_row') * height + row_offsets * per_image('box_height')
    cols = per_image('centre_col') * width + col_offsets * per_image('box_width')
    cos, sin = jnp.cos(per_image('angle')), jnp.sin(per_image('angle'))
    rows, cols = cos * rows - sin * cols, sin * rows + cos * cols
    if 'flip_rows' in draws:
        rows = jnp.where(per_image('flip_rows'), -rows, rows)
        cols = jnp.where(per_image('flip_cols'), -cols, cols)
    if 'transpose' in draws:
        rows, cols = jnp.where(per_image('transpose'), cols, rows), jnp.where(per_image('transpose'), rows, cols)
    return rows + (height - 1) / 2, cols + (width - 1) / 2


def _resample(images, rows, cols, max_degrees: float):
    """Bilinear samples of each N×H×W×C image at its fractional (rows, cols), black outside:
    a gather per pixel, except in a program lowered for TPU, where gathers of single pixels are
    slow and `allflax.tpu.resample` reads windows and weighs them on the matrix unit
    (benchmarks/RESULTS.md, "Augmentation on TPU"). The box never zooms out (steps of at most
    one source pixel per output pixel), and turns reach at most `max_degrees`."""
    def on_tpu(images, rows, cols):
        return tpu_resample.bilinear(images, rows, cols, max_step=1.0, max_degrees=max_degrees)

    return jax.lax.platform_dependent(images, rows, cols, tpu=on_tpu, default=jax.vmap(_bilinear))


def _bilinear(image, rows, cols):
    """image (H×W×C) at fractional pixel positions rows, cols (H'×W'); black outside.

    Each tap weighs the pixel it read by that pixel's own position, read along with it: XLA
    computes the positions anew in each fused consumer, and where two such copies round to
    either side of a whole pixel, weights computed from the positions alone weigh a pixel the
    gather did not read (6 of 2.16 M values came from a neighbouring row: benchmarks/RESULTS.md,
    "Augmentation on TPU"). A ring of black around the image stands for everything outside.
    """
    height, width, channels = image.shape
    positions = jnp.stack(jnp.meshgrid(jnp.arange(-1, height + 1), jnp.arange(-1, width + 1), indexing='ij'), -1)
    table = jnp.concatenate([jnp.pad(image, ((1, 1), (1, 1), (0, 0))), positions.astype(image.dtype)], -1)
    table = table.reshape((height + 2) * (width + 2), channels + 2)
    # Taps top and top + 1 in -1..height (the ring included); beyond, the tent weighs them 0.
    top = jnp.clip(jnp.floor(rows), -1, height - 1).astype(jnp.int32) + 1
    left = jnp.clip(jnp.floor(cols), -1, width - 1).astype(jnp.int32) + 1
    result = 0.0
    for row in (top, top + 1):
        for col in (left, left + 1):
            read = jnp.take(table, row * (width + 2) + col, axis=0)
            weight = (jnp.maximum(0.0, 1.0 - jnp.abs(rows - read[..., channels]))
                      * jnp.maximum(0.0, 1.0 - jnp.abs(cols - read[..., channels + 1])))
            result = result + weight[..., None] * read[..., :channels]
    return result


def _per_image(values: jax.Array) -> jax.Array:
    return values[:, None, None, None]


def _grey(images):
    return _mix_channels(images, _GREY[:, None])


def _draw_color(key, params, batch) -> jax.Array:
    """Per image (brightness, contrast, saturation, hue turn in radians)."""
    brightness_key, contrast_key, saturation_key, hue_key = jax.random.split(key, 4)

    def factor(factor_key, amount):
        return _uniform(factor_key, batch, 1.0 - amount, 1.0 + amount)

    return jnp.stack([factor(brightness_key, params['brightness']), factor(contrast_key, params['contrast']),
                      factor(saturation_key, params['saturation']),
                      2 * np.pi * _uniform(hue_key, batch, -params['hue'], params['hue'])], -1)


def _color(images, draws, params):
    """Brightness, contrast, saturation and hue jitter (torchvision's ColorJitter) as one affine
    map of each image's colours. In YIQ, luma Y → b·(m + c·(Y − m)), m the image's mean luma, and
    chroma (I, Q) → b·c·s·(I, Q) turned by h: factors b, c, s uniform in 1 ± brightness, contrast,
    saturation, h in ± hue of a full turn. The four commute, so one map does them all, clipped
    once. (ColorJitter clips after each and shifts hue in HSV; a turn in YIQ keeps luma.)"""
    brightness, contrast, saturation, turn = (draws[:, index] for index in range(4))
    chroma = brightness * contrast * saturation
    cos, sin, zero = chroma * jnp.cos(turn), chroma * jnp.sin(turn), jnp.zeros_like(turn)
    yiq_map = jnp.stack([jnp.stack([brightness * contrast, zero, zero], -1),
                         jnp.stack([zero, cos, sin], -1),
                         jnp.stack([zero, -sin, cos], -1)], -2)  # Row vectors: yiq @ yiq_map.
    matrices = jnp.asarray(_RGB_TO_YIQ.T, jnp.float32) @ yiq_map @ jnp.asarray(_YIQ_TO_RGB.T, jnp.float32)
    mean_luma = _grey(images).mean(axis=(1, 2, 3))
    # Luma offset b·(1 − c)·m; luma alone is grey, equal in R, G and B.
    return _mix_channels(images, matrices) + _per_image(brightness * (1.0 - contrast) * mean_luma)


def _draw_blur(key, params, batch) -> jax.Array:
    """Per image the Gaussian's sigma, in pixels."""
    return _uniform(key, batch, *params['blur_sigma'])


def _blur(images, sigma, params):
    """Gaussian blur with a random sigma (pixels) per image, edges mirrored (flat regions stay
    flat): per image a banded matrix, applied to the rows and then to the columns. As matrix
    products, each pass reads its input once, where shifted sums get fused and recomputed."""
    high = params['blur_sigma'][1]
    radius = int(np.ceil(3 * high))
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


def _draw_hed(key, params, batch) -> jax.Array:
    """Per image the (scale, shift) of each stain's density: batch × 2 × 3."""
    scale_key, shift_key = jax.random.split(key)
    scale = jax.random.uniform(scale_key, (batch, 1, 1, 3), minval=1 - params['hed_scale'],
                               maxval=1 + params['hed_scale'])
    shift = jax.random.uniform(shift_key, (batch, 1, 1, 3), minval=-params['hed_shift'],
                               maxval=params['hed_shift'])
    return jnp.concatenate([scale, shift], axis=1)[:, :, 0]


def _hed(images, draws, params):
    """Stain jitter (Tellez et al. 2018): each image's haematoxylin, eosin and DAB densities
    scaled by 1 ± hed_scale and shifted by ± hed_shift (skimage's units)."""
    scale, shift = draws[:, None, None, 0], draws[:, None, None, 1]
    return 255.0 * hed_to_rgb(rgb_to_hed(images / 255.0) * scale + shift)


_PHOTOMETRIC = {'color': _color, 'blur': _blur, 'hed': _hed}
_PHOTOMETRIC_DRAWS = {'color': _draw_color, 'blur': _draw_blur, 'hed': _draw_hed}
