"""Reading odd and broken image files, and the preprocessing steps."""
import cv2
import numpy as np
import pytest
from PIL import Image

from allflax.data import preprocess


@pytest.fixture
def rgb():
    """A 40×60 RGB image: a bright disc on black, plus noise."""
    image = np.zeros((40, 60, 3), np.uint8)
    cv2.circle(image, (35, 18), 9, (200, 120, 230), -1)
    return image + np.random.default_rng(0).integers(0, 20, image.shape, np.uint8)


def _write(path, rgb, **params):
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), *params.values())
    return str(path)


@pytest.mark.parametrize('suffix', ['.bmp', '.png', '.tif'])
def test_read_image_is_uint8_rgb(tmp_path, rgb, suffix):
    image = preprocess.read_image(_write(tmp_path / f'x{suffix}', rgb))
    assert image.dtype == np.uint8 and image.shape == (40, 60, 3)
    np.testing.assert_array_equal(image, rgb)


def test_grayscale_rgba_and_palette_images_become_rgb(tmp_path, rgb):
    pil = Image.fromarray(rgb)
    pil.convert('L').save(tmp_path / 'grey.png')
    pil.convert('RGBA').save(tmp_path / 'rgba.png')
    pil.convert('P').save(tmp_path / 'palette.bmp')
    grey = preprocess.read_image(str(tmp_path / 'grey.png'))
    assert grey.shape == (40, 60, 3)
    np.testing.assert_array_equal(grey[..., 0], np.asarray(pil.convert('L')))
    np.testing.assert_array_equal(preprocess.read_image(str(tmp_path / 'rgba.png')), rgb)
    np.testing.assert_array_equal(preprocess.read_image(str(tmp_path / 'palette.bmp')),
                                  np.asarray(pil.convert('P').convert('RGB')))


def test_16_bit_images_are_scaled_to_8_bits(tmp_path, rgb):
    deep = rgb.astype(np.uint16) * 257  # 8-bit values spread over the 16-bit range.
    assert cv2.imwrite(str(tmp_path / 'deep.png'), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    assert cv2.imwrite(str(tmp_path / 'deep_grey.tif'), deep[..., 0])
    np.testing.assert_array_equal(preprocess.read_image(str(tmp_path / 'deep.png')), rgb)
    np.testing.assert_array_equal(preprocess.read_image(str(tmp_path / 'deep_grey.tif'))[..., 2], rgb[..., 0])


@pytest.mark.parametrize('suffix', ['.jpg', '.png', '.bmp', '.tif'])
def test_truncated_images_are_refused(tmp_path, rgb, suffix):
    path = _write(tmp_path / f'x{suffix}', rgb)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) * 2 // 3])
    with pytest.raises(preprocess.UnreadableImageError, match=f'x{suffix}: .*truncated'):
        preprocess.read_image(path)


@pytest.mark.parametrize('content, reason', [(b'', 'empty file'), (b'not an image at all', 'not a decodable image')])
def test_empty_and_non_image_files_are_refused(tmp_path, content, reason):
    path = tmp_path / 'x.bmp'
    path.write_bytes(content)
    with pytest.raises(preprocess.UnreadableImageError, match=reason) as error:
        preprocess.read_image(str(path))
    assert error.value.path == str(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(preprocess.UnreadableImageError, match='cannot be read'):
        preprocess.read_image(str(tmp_path / 'gone.jpg'))


def test_resize_pad_keeps_the_aspect_ratio_on_black(rgb):
    tile = preprocess.preprocess(rgb, ('resize_pad',), 30)
    assert tile.shape == (30, 30, 3) and tile.dtype == np.uint8
    assert not tile[:5].any() and not tile[-5:].any()  # 40×60 → 20×30, centred: 5 black rows each side.
    np.testing.assert_array_equal(tile[5:25], cv2.resize(rgb, (30, 20), interpolation=cv2.INTER_AREA))


def test_resize_pad_is_implied(rgb):
    np.testing.assert_array_equal(preprocess.preprocess(rgb, (), 32), preprocess.preprocess(rgb, ('resize_pad',), 32))
    assert preprocess.check_steps(('clahe', 'lab')) == ('clahe', 'resize_pad', 'lab')


def test_roi_crop_crops_to_the_cell(rgb):
    crop = preprocess.roi_crop(rgb)
    assert 18 <= crop.shape[0] <= 24 and 18 <= crop.shape[1] <= 24  # The 19-px disc plus a 5 % margin.
    assert crop.mean() > 2 * rgb.mean()
    tile = preprocess.preprocess(rgb, ('roi_crop', 'resize_pad'), 32)
    assert tile.shape == (32, 32, 3) and tile[16, 16].max() > 150  # The disc now fills the tile.


def test_roi_crop_leaves_a_plain_image_alone():
    plain = np.full((20, 20, 3), 90, np.uint8)
    np.testing.assert_array_equal(preprocess.roi_crop(plain), plain)


def test_clahe_raises_contrast_and_keeps_the_shape():
    y, x = np.mgrid[:128, :128]
    dull = np.repeat((110 + 20 * np.sin(x / 9) * np.cos(y / 13)).astype(np.uint8)[..., None], 3, axis=2)
    lightness = lambda image: cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[..., 0].std()
    assert lightness(preprocess.clahe(dull)) > 1.5 * lightness(dull)
    assert preprocess.preprocess(dull, ('clahe', 'resize_pad'), 32).shape == (32, 32, 3)


def test_lab_outputs_lab_channels(rgb):
    tile = preprocess.preprocess(rgb, ('resize_pad', 'lab'), 32)
    np.testing.assert_array_equal(tile, cv2.cvtColor(preprocess.resize_pad(rgb, 32), cv2.COLOR_RGB2LAB))


@pytest.mark.parametrize('steps, message', [
    (('resize_pad', 'sharpen'), "unknown data.preprocess step.*'sharpen'.*known: roi_crop, clahe, resize_pad, lab"),
    (('clahe', 'clahe'), 'repeats a step'),
    (('resize_pad', 'roi_crop'), 'roi_crop must come before resize_pad'),
    (('lab', 'clahe'), 'lab must be the last step'),
])
def test_bad_steps_are_refused(rgb, steps, message):
    with pytest.raises(ValueError, match=message):
        preprocess.preprocess(rgb, steps, 32)


def test_perceptual_hash_finds_copies_not_other_images(rgb):
    other = np.ascontiguousarray(rgb[:, ::-1])
    encoded = cv2.imdecode(cv2.imencode('.jpg', rgb, [cv2.IMWRITE_JPEG_QUALITY, 60])[1], cv2.IMREAD_COLOR)
    distance = lambda a, b: bin(preprocess.perceptual_hash(a) ^ preprocess.perceptual_hash(b)).count('1')
    assert distance(rgb, cv2.resize(rgb, (90, 60))) <= 2
    assert distance(rgb, encoded) <= 2
    assert distance(rgb, other) > 10
