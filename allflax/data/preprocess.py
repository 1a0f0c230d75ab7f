"""From a source image file to the uint8 tile the cache stores, done once per data set.

`read_image` accepts what real folders hold (grayscale, RGBA, 16-bit, palette images) and
refuses what would silently poison training (empty, truncated, undecodable files). The
`data.preprocess` steps then run in order; the tile is always image_size×image_size×3 uint8.
"""
import cv2
import numpy as np

# In the order they may appear: roi_crop before resize_pad (it crops the source image), lab last
# (the other steps expect RGB). resize_pad is implied, before lab, when not listed.
STEPS = ('roi_crop', 'clahe', 'resize_pad', 'lab')
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILE_GRID = (8, 8)
_JPEG_START = b'\xff\xd8'
_JPEG_START_OF_SCAN = b'\xff\xda'
_JPEG_END = b'\xff\xd9'


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded as a whole."""

    def __init__(self, path: str, reason: str):
        super().__init__(f'{path}: {reason}')
        self.path = path
        self.reason = reason


def _is_truncated_jpeg(data: bytes) -> bool:
    """OpenCV decodes a truncated JPEG without error, filling the rest grey: a complete one has
    an end marker after its last scan (markers cannot occur inside entropy-coded data)."""
    return data.startswith(_JPEG_START) and data.rfind(_JPEG_END) < data.rfind(_JPEG_START_OF_SCAN)


def _to_uint8(image: np.ndarray, path: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:  # Full 16-bit range → 8 bits, rounded.
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.dtype == np.float32:  # Floating-point images hold [0, 1].
        return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    raise UnreadableImageError(path, f'unsupported pixel type {image.dtype}')


def read_image(path: str) -> np.ndarray:
    """H×W×3 uint8 RGB; raises UnreadableImageError for an unreadable, empty, truncated or corrupt file."""
    return decode_image(read_bytes(path), path)


def read_bytes(path: str) -> bytes:
    """The file's bytes; raises UnreadableImageError where it cannot be read."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as error:
        raise UnreadableImageError(path, f'cannot be read ({error.strerror})') from error


def decode_image(data: bytes, path: str) -> np.ndarray:
    """`read_image` of bytes already read from `path` (named in errors)."""
    if not data:
        raise UnreadableImageError(path, 'empty file (0 bytes)')
    if _is_truncated_jpeg(data):
        raise UnreadableImageError(path, 'truncated JPEG (no end marker after the image data)')
    # Colour at native depth: grey is replicated, alpha dropped, palettes expanded.
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise UnreadableImageError(path, 'not a decodable image (truncated, corrupt or not an image)')
    return cv2.cvtColor(_to_uint8(image, path), cv2.COLOR_BGR2RGB)


def check_steps(steps) -> tuple[str, ...]:
    """The steps to run, in order, with resize_pad implied before lab (or last) when not listed."""
    steps = tuple(steps)
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        raise ValueError(f'unknown data.preprocess step(s) {", ".join(map(repr, unknown))}; '
                         f'known: {", ".join(STEPS)}')
    if len(set(steps)) != len(steps):
        raise ValueError(f'data.preprocess={steps} repeats a step; list each at most once')
    if 'resize_pad' not in steps:
        position = steps.index('lab') if 'lab' in steps else len(steps)
        steps = (*steps[:position], 'resize_pad', *steps[position:])
    if 'roi_crop' in steps and steps.index('roi_crop') > steps.index('resize_pad'):
        raise ValueError(f'data.preprocess={steps}: roi_crop must come before resize_pad (it crops the source image)')
    if 'lab' in steps and steps[-1] != 'lab':
        raise ValueError(f'data.preprocess={steps}: lab must be the last step (the others expect RGB)')
    return steps


def resize_pad(image: np.ndarray, image_size: int) -> np.ndarray:
    """Scales the longer side to image_size, keeping the aspect ratio, and centres the result on black."""
    height, width = image.shape[:2]
    scale = image_size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (new_width, new_height), interpolation=interpolation)
    tile = np.zeros((image_size, image_size, 3), np.uint8)
    top, left = (image_size - new_height) // 2, (image_size - new_width) // 2
    tile[top:top + new_height, left:left + new_width] = resized
    return tile


def clahe(image: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of lightness only, so stain hues stay put."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    equaliser = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILE_GRID)
    lab[..., 0] = equaliser.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def roi_crop(image: np.ndarray) -> np.ndarray:
    """Crops to the largest region unlike the background (the border's median colour), split off by
    Otsu's threshold, with a 5 % margin: the cell, for single cells on a plain background."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    distance = np.abs(image.astype(np.int16) - np.median(border, axis=0)).max(axis=2).astype(np.uint8)
    _, mask = cv2.threshold(distance, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    if count < 2:  # Nothing stands out: keep the whole image.
        return image
    x, y, width, height = stats[1 + np.argmax(stats[1:, cv2.CC_STAT_AREA]), :4]
    margin = round(0.05 * max(width, height))
    return image[max(0, y - margin):y + height + margin, max(0, x - margin):x + width + margin]


def to_lab(image: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit CIELAB: L scaled to 0-255, a and b offset by 128."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2LAB)


_SIZE_FREE_STEPS = {'roi_crop': roi_crop, 'clahe': clahe, 'lab': to_lab}


def preprocess(image: np.ndarray, steps, image_size: int) -> np.ndarray:
    """Runs the `data.preprocess` steps on an RGB image: an image_size×image_size×3 uint8 tile."""
    for step in check_steps(steps):
        image = resize_pad(image, image_size) if step == 'resize_pad' else _SIZE_FREE_STEPS[step](image)
    return image


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT hash: whether each of the 8×8 lowest frequencies of the 32×32 grey image is above
    their median. Re-encoded, rescaled or slightly shifted copies stay within a few bits."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    low_frequencies = cv2.dct(cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA))[:8, :8].ravel()
    bits = low_frequencies > np.median(low_frequencies[1:])
    return int(np.packbits(bits).view('>u8')[0])


READ_IMAGE = ('decoded with OpenCV at native depth to RGB: grey replicated to 3 channels, alpha dropped, palettes '
              'expanded, 16-bit scaled to 8 (rounded), float [0, 1] to 0-255; empty, truncated or undecodable files '
              'refused')


def describe(steps, image_size: int) -> list[dict]:
    """What `preprocess(image, steps, image_size)` does, step by step with its parameters: a
    bundle's record of it, and what a bundle is checked against before this code preprocesses for it."""
    described = {
        'roi_crop': ({'background': 'median colour of the border', 'threshold': 'otsu', 'margin': 0.05},
                     'crops to the largest region unlike the background, with a margin'),
        'clahe': ({'clip_limit': CLAHE_CLIP_LIMIT, 'tile_grid': list(CLAHE_TILE_GRID), 'channel': 'CIELAB L'},
                  'contrast-limited adaptive histogram equalisation of lightness'),
        'resize_pad': ({'size': image_size, 'keep_aspect_ratio': True, 'shrink': 'INTER_AREA', 'enlarge': 'INTER_CUBIC',
                        'pad': 'black, centred'},
                       'scales the longer side to size and centres the result on a black square'),
        'lab': ({'color_space': 'OpenCV 8-bit CIELAB', 'L': '0-255', 'a_b_offset': 128},
                'converts RGB to CIELAB'),
    }
    return [{'name': step, 'params': described[step][0], 'does': described[step][1]} for step in check_steps(steps)]
