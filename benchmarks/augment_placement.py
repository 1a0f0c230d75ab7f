"""Where should augmentation run: in the compiled train step, or per image in Grain's host
workers? Times every op of allflax/data/augment.py both ways, beside the train step they feed.
Prints one JSON line.

  python -m benchmarks.augment_placement --config=configs/vgg19_mhsa.py

(a) device: the compiled augmentation of one batch (config batch size and image size);
(b) host: the same ops with OpenCV and numpy, one image at a time in a Grain map, in one
    process with OpenCV on one thread: the images/s of one worker;
(c) the train step of that batch, timed at --step_batch_size and scaled to the batch size.
"""
import json

import cv2
import grain
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from allflax import runtime
from allflax.cpu import memory
from allflax.data import augment
from benchmarks import common, records

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/vgg19_mhsa.py.', lock_config=True)
flags.DEFINE_integer('repeats', 3, 'Repeats of each measurement, for the spread.')
flags.DEFINE_integer('host_images', 64, 'Images per host measurement.')
flags.DEFINE_integer('step_batch_size', 8, 'Batch the train step is timed at (then scaled), to keep it short.')
flags.mark_flag_as_required('config')


def host_augment(image: np.ndarray, rng: np.random.Generator, params) -> np.ndarray:
    """Every op on one uint8 tile, as a host worker would run them: OpenCV for the resampling,
    hue and blur, numpy for the rest."""
    if rng.random() < 0.5:
        image = image.transpose(1, 0, 2)
    if rng.random() < 0.5:
        image = image[::-1]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    size, centre = image.shape[0], (image.shape[0] - 1) / 2
    angle = np.deg2rad(rng.uniform(-params.rotation_degrees, params.rotation_degrees))
    area, ratio = rng.uniform(*params.crop_scale), np.exp(rng.uniform(*np.log(params.crop_ratio)))
    box_height, box_width = min(np.sqrt(area / ratio), 1.0), min(np.sqrt(area * ratio), 1.0)
    box_row = rng.uniform(-0.5, 0.5) * (1 - box_height) * size
    box_col = rng.uniform(-0.5, 0.5) * (1 - box_width) * size
    cos, sin = np.cos(angle), np.sin(angle)
    # Output (x, y) → source (x, y): the crop box, then turned about the centre, in one warp.
    row0, col0 = box_row - centre * box_height, box_col - centre * box_width
    source_from_output = np.array([[cos * box_width, sin * box_height, sin * row0 + cos * col0 + centre],
                                   [-sin * box_width, cos * box_height, cos * row0 - sin * col0 + centre]])
    image = cv2.warpAffine(np.ascontiguousarray(image), source_from_output, (size, size),
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
    pixels = image.astype(np.float32)
    grey = np.array([0.299, 0.587, 0.114], np.float32)

    def factor(amount):
        return np.float32(rng.uniform(1 - amount, 1 + amount))

    pixels = np.clip(pixels * factor(params.brightness), 0, 255)
    mean = (pixels @ grey).mean()
    pixels = np.clip(mean + (pixels - mean) * factor(params.contrast), 0, 255)
    grey_pixels = (pixels @ grey)[..., None]
    pixels = np.clip(grey_pixels + (pixels - grey_pixels) * factor(params.saturation), 0, 255)
    hsv = cv2.cvtColor(pixels / 255, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + 360 * rng.uniform(-params.hue, params.hue)) % 360
    pixels = 255 * cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    pixels = cv2.GaussianBlur(pixels, (0, 0), rng.uniform(*params.blur_sigma), borderType=cv2.BORDER_REFLECT)
    density = np.log(np.maximum(pixels / 255, 1e-6)) / np.log(1e-6) @ augment.HED_FROM_RGB
    density = density * rng.uniform(1 - params.hed_scale, 1 + params.hed_scale, 3) + rng.uniform(
        -params.hed_shift, params.hed_shift, 3)
    return np.clip(255 * np.exp(density @ augment.RGB_FROM_HED * np.log(1e-6)), 0, 255).astype(np.float32)


def host_images_per_second(tiles: np.ndarray, params) -> list[float]:
    cv2.setNumThreads(1)  # A worker's share: workers, not OpenCV's threads, use the cores.
    dataset = grain.MapDataset.source(tiles).random_map(lambda image, rng: host_augment(image, rng, params), seed=0)
    iterator = iter(dataset.repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=0)))
    next(iterator)
    times = common.seconds(lambda _: [next(iterator) for _ in range(len(tiles))], FLAGS.repeats)
    return [len(tiles) / time for time in times]


def main(argv):
    del argv
    memory.keep_freed_memory()  # As main.py does.
    runtime.quiet_library_logs()
    config = FLAGS.config
    with config.unlocked():
        config.data.augment = augment.AUGMENTATIONS
    size, batch_size = config.data.image_size, config.batch_size
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (batch_size, size, size, 3), np.uint8)
    device = common.device_augment_seconds(tiles, config, FLAGS.repeats)
    host = host_images_per_second(tiles[:FLAGS.host_images], config.data.augment_params)
    with config.unlocked():
        config.batch_size = FLAGS.step_batch_size
    step_batch = {'image': tiles[:FLAGS.step_batch_size], 'label': np.zeros(FLAGS.step_batch_size, np.int32)}
    # The class count barely changes the step: two, as C-NMC.
    step = common.seconds(common.BareSteps(config, step_batch, num_classes=2).train, FLAGS.repeats)
    step = [time * batch_size / FLAGS.step_batch_size for time in step]
    print(json.dumps({
        'model': config.model.name, 'image_size': size, 'batch_size': batch_size,
        'augment': list(augment.AUGMENTATIONS),
        'device_augment_s_per_batch': records.summary(device),
        'train_step_s_per_batch': records.summary(step, 2),
        'device_augment_fraction_of_step': round(float(np.median(device) / np.median(step)), 4),
        'host_augment_images_per_s_per_worker': records.summary(host, 1),
        'host_augment_core_s_per_batch': round(float(batch_size / np.median(host)), 4),
        **common.machine()}))


if __name__ == '__main__':
    app.run(main)
