"""The on-device augmentation: each op against what it should do, numpy and scipy references."""
import functools

import jax
import numpy as np
import pytest
import scipy.ndimage

from allflax.data import augment
from allflax.tpu import resample as tpu_resample
from configs import efficientnetv2_b3_se

DEFAULTS = efficientnetv2_b3_se.get_config().data.augment_params.to_dict()


def _params(**overrides):
    return {**DEFAULTS, **overrides}


def _tiles(count=4, size=17, low=0, high=256, seed=0):
    return np.random.default_rng(seed).integers(low, high, (count, size, size, 3), dtype=np.uint8)


def _augment(images, names, seed=0, **overrides):
    return np.asarray(augment.augment(images, jax.random.key(seed), names, _params(**overrides)))


def _dihedral_views(image):
    return [np.rot90(flipped, turns) for flipped in (image, image[:, ::-1]) for turns in range(4)]


def test_the_same_key_gives_the_same_batch_and_another_key_another():
    images, names = _tiles(), augment.AUGMENTATIONS
    np.testing.assert_array_equal(_augment(images, names, seed=1), _augment(images, names, seed=1))
    assert not np.allclose(_augment(images, names, seed=1), _augment(images, names, seed=2))


def test_naming_another_op_leaves_the_others_draws_unchanged():
    images = _tiles()
    turned = _augment(images, ('rotate',))
    np.testing.assert_allclose(_augment(images, ('rotate', 'color'), brightness=0.0, contrast=0.0,
                                        saturation=0.0, hue=0.0), turned, atol=1e-3)


@pytest.mark.parametrize('name', augment.AUGMENTATIONS)
def test_every_op_returns_float_pixels_in_the_uint8_range(name):
    images = _tiles(count=8, size=16)
    out = augment.augment(images, jax.random.key(0), (name,), _params())
    assert out.shape == images.shape and out.dtype == np.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 255.0
    assert not np.array_equal(np.asarray(out), images.astype(np.float32))  # It did something.


def test_flips_and_rot90_move_pixels_to_one_of_the_eight_symmetries():
    images = _tiles(count=32, size=8)
    flipped = _augment(images, ('flip',))
    seen = set()
    for image, out in zip(images, _augment(images, ('flip', 'rot90'))):
        views = _dihedral_views(image)
        matches = [index for index, view in enumerate(views) if np.array_equal(out, view)]
        assert matches, 'not a symmetry of the input'
        seen.add(matches[0])
    assert len(seen) >= 6  # 32 draws of 8 equally likely symmetries.
    for image, out in zip(images, flipped):  # Mirrors alone: the identity or a half turn, or a mirror.
        assert any(np.array_equal(out, view) for view in (image, image[::-1], image[:, ::-1], image[::-1, ::-1]))


def test_symmetries_ride_along_in_the_resampling_exactly():
    images = _tiles(count=16, size=12)
    np.testing.assert_allclose(_augment(images, ('flip', 'rot90', 'rotate'), rotation_degrees=0.0),
                               _augment(images, ('flip', 'rot90')), atol=1e-4)


def test_no_turn_and_the_whole_box_are_the_identity():
    images = _tiles()
    expected = images.astype(np.float32)
    np.testing.assert_allclose(_augment(images, ('rotate',), rotation_degrees=0.0), expected, atol=1e-3)
    np.testing.assert_allclose(_augment(images, ('crop',), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)),
                               expected, atol=1e-3)


def test_rotation_turns_about_the_centre():
    size = 33
    rows, cols = np.mgrid[:size, :size] - (size - 1) / 2
    disc = np.where(np.hypot(rows, cols) < 10, 200, 30).astype(np.uint8)
    images = np.repeat(np.stack([disc] * 4)[..., None], 3, axis=-1)
    out = _augment(images, ('rotate',), rotation_degrees=45.0)
    np.testing.assert_allclose(out[:, 16, 16], 200.0, atol=1e-3)  # The centre stays put.
    inner = np.hypot(rows, cols) < 8  # A disc turned is the same disc, away from its rim.
    np.testing.assert_allclose(out[:, inner], 200.0, atol=1e-3)
    corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.all(corners < 30)  # Turned corners sample outside the tile: black comes in.


def test_crop_of_a_quarter_of_the_area_zooms_twice():
    size = 32
    ramp = np.broadcast_to((np.arange(size) * 4)[None, :, None], (size, size, 3)).astype(np.uint8)
    out = _augment(np.stack([ramp] * 4), ('crop',), crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    np.testing.assert_allclose(np.diff(out, axis=2), 2.0, atol=1e-3)  # Slope 4 per pixel, halved.
    np.testing.assert_allclose(np.diff(out, axis=1), 0.0, atol=1e-3)


def _colour_only(**amounts):
    return _params(**{'brightness': 0.0, 'contrast': 0.0, 'saturation': 0.0, 'hue': 0.0, **amounts})


def _luma(pixels):
    return pixels @ np.array([0.299, 0.587, 0.114])


def test_brightness_scales_the_light_by_one_factor_per_image():
    images = _tiles(count=8, low=60, high=190).astype(np.float32)
    out = np.asarray(augment.augment(images.astype(np.uint8), jax.random.key(3), ('color',),
                                     _colour_only(brightness=0.2)))
    factors = out / images
    np.testing.assert_allclose(factors, factors[:, :1, :1, :1] * np.ones_like(factors), rtol=1e-5)
    assert np.all((factors > 0.8) & (factors < 1.2)) and np.ptp(factors[:, 0, 0, 0]) > 0.05


def test_contrast_moves_pixels_about_the_mean_grey_by_one_factor_per_image():
    images = _tiles(count=8, low=60, high=190)
    out = np.asarray(augment.augment(images, jax.random.key(3), ('color',), _colour_only(contrast=0.2)))
    pixels = images.astype(np.float64)
    mean = _luma(pixels).mean(axis=(1, 2))[:, None, None, None]
    factors = (out - mean) / (pixels - mean)
    factor = np.median(factors.reshape(8, -1), axis=1)[:, None, None, None]
    np.testing.assert_allclose(out, mean + factor * (pixels - mean), atol=1e-2)
    assert np.all((factor > 0.8) & (factor < 1.2))


def test_saturation_and_hue_keep_each_pixels_luma_and_grey_pixels():
    images = _tiles(count=8, low=100, high=156)  # Muted colours: turned and saturated, none clip.
    images[:, 0, 0] = 128  # A grey pixel: no chroma to scale or turn.
    out = np.asarray(augment.augment(images, jax.random.key(3), ('color',),
                                     _colour_only(saturation=0.3, hue=0.1)))
    np.testing.assert_allclose(_luma(out), _luma(images.astype(np.float64)), atol=1e-2)
    np.testing.assert_allclose(out[:, 0, 0], 128.0, atol=1e-3)
    assert np.abs(out - images).max() > 5


# Ruifrok & Johnston's optical densities of haematoxylin, eosin and DAB, from their paper.
HED_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def test_rgb_to_hed_is_the_ruifrok_johnston_deconvolution():
    rgb = np.random.default_rng(0).uniform(0.0, 1.0, (64, 3)).astype(np.float32)
    expected = np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6) @ np.linalg.inv(HED_VECTORS)
    np.testing.assert_allclose(augment.rgb_to_hed(rgb), expected, rtol=1e-4, atol=1e-5)
    # Light through haematoxylin alone deconvolves to haematoxylin alone.
    haematoxylin_only = np.exp(-0.8 * HED_VECTORS[0])[None].astype(np.float32)
    np.testing.assert_allclose(augment.rgb_to_hed(haematoxylin_only), [[0.8 / np.log(1e6), 0, 0]], atol=1e-5)


def test_hed_round_trip_and_no_jitter_are_the_identity():
    rgb = np.random.default_rng(0).uniform(0.01, 1.0, (64, 3)).astype(np.float32)
    np.testing.assert_allclose(augment.hed_to_rgb(augment.rgb_to_hed(rgb)), rgb, rtol=1e-4)
    images = _tiles(low=1)
    np.testing.assert_allclose(_augment(images, ('hed',), hed_scale=0.0, hed_shift=0.0), images, atol=0.05)


def test_blur_keeps_flat_images_flat_and_matches_scipy():
    flat = np.full((2, 16, 16, 3), 97, np.uint8)
    np.testing.assert_allclose(_augment(flat, ('blur',)), 97.0, atol=1e-3)
    images = _tiles(count=2, size=16)
    out = _augment(images, ('blur',), blur_sigma=(1.0, 1.0))
    expected = scipy.ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, 1.0, 1.0, 0), mode='reflect',
                                             truncate=3.0)
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown data.augment \\['sharpen'\\]; known: flip, rot90, rotate"):
        augment.augment(_tiles(), jax.random.key(0), ('flip', 'sharpen'), _params())


def _turned_and_cropped_positions(images, seed=0):
    """Source positions of real draws: any symmetry, turns up to 45°, boxes down to a quarter."""
    names = ('flip', 'rot90', 'rotate', 'crop')
    draws = augment.draw(jax.random.key(seed), images.shape, names,
                         _params(rotation_degrees=45.0, crop_scale=(0.25, 1.0)))
    return augment._source_coordinates(images.shape, draws)


def _bilinear_reference(images, rows, cols):
    """scipy's linear interpolation, black beyond the edges ('grid-constant': interpolated towards
    black within a pixel of them)."""
    return np.stack([np.stack([scipy.ndimage.map_coordinates(image[..., channel].astype(np.float64), [r, c],
                                                             order=1, mode='grid-constant', cval=0.0)
                               for channel in range(image.shape[-1])], -1)
                     for image, r, c in zip(images, np.asarray(rows), np.asarray(cols))])


def test_both_resamplers_are_scipys_bilinear_interpolation_with_black_outside():
    """The portable one (a gather per pixel) and the TPU's (windows weighed on the matrix unit),
    both run here, at the positions of real draws, edges and outside included."""
    images = _tiles(count=6, size=40)
    rows, cols = _turned_and_cropped_positions(images)
    expected = _bilinear_reference(images, rows, cols)
    assert (expected == 0).any() and (expected > 0).mean() > 0.5  # Black came in; most did not.
    floats = images.astype(np.float32)
    np.testing.assert_allclose(jax.jit(jax.vmap(augment._bilinear))(floats, rows, cols), expected, atol=2e-3)
    tpu = jax.jit(functools.partial(tpu_resample.bilinear, max_step=1.0, max_degrees=45.0))(floats, rows, cols)
    np.testing.assert_allclose(tpu, expected, atol=2e-3)


def test_a_tiles_window_holds_every_pixel_it_reads():
    """Turned by 45° and not zoomed, a tile's sources span its window to the last row."""
    for degrees in (0.0, 15.0, 45.0, 90.0):
        window = tpu_resample.window_size(1.0, degrees)
        turn = np.radians(min(degrees, 45.0))
        span = (tpu_resample.TILE - 1) * (np.cos(turn) + np.sin(turn))
        assert span + 2 <= window < span + 3  # The span, the bilinear neighbour, rounding up.


def test_draws_taken_by_rows_give_those_rows_of_the_batch():
    """A micro-batch (every 4th image) augmented with its rows of the draws is those rows of the
    whole batch augmented."""
    images, names = _tiles(count=8, size=24), augment.AUGMENTATIONS
    draws = augment.draw(jax.random.key(5), images.shape, names, _params())
    apply = jax.jit(lambda images, draws: augment.apply(images, draws, names, _params()))
    whole = np.asarray(apply(images, draws))
    for first in range(4):
        rows = jax.tree.map(lambda x: x[first::4], draws)
        np.testing.assert_allclose(apply(images[first::4], rows), whole[first::4], atol=1e-3)


def test_compiled_and_op_by_op_agree_where_a_position_falls_on_a_whole_pixel():
    """Image 1's output pixel (88, 159) samples source row 200.99998. Compiled, XLA computed the
    position in two fused copies that rounded to either side of row 201, and the gather and its
    weights disagreed: that pixel read row 202 (0 where 236 is right, on a 2-core AMD EPYC)."""
    names = ('flip', 'rot90', 'rotate', 'crop', 'color')
    images, key = _tiles(count=8, size=300), jax.random.key(3)
    compiled = jax.jit(lambda images, key: augment.augment(images, key, names, _params()))(images, key)
    np.testing.assert_allclose(compiled, augment.augment(images, key, names, _params()), atol=0.05)
