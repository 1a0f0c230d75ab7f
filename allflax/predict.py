"""Predictions for new image files from a trained run: the training preprocessing, the eval
prediction path (with its test-time augmentation and temperature), one CSV row per image.

Unreadable files are reported (stderr and `<output stem>.errors.csv`) and the rest predicted.
"""
import glob
import json
import os
import sys

import cv2
import ml_collections
import numpy as np
from absl import logging

from allflax import evaluate, files
from allflax.data import preprocess
from allflax.data.dataset import Split
from allflax.evaluation import calibration, inference, interpret

IMAGE_EXTENSIONS = ('.bmp', '.jpg', '.jpeg', '.png', '.tif', '.tiff')


def list_inputs(pattern: str) -> list[str]:
    """A file; a folder (its image files, recursively, by extension); or a glob pattern."""
    if os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        paths = [os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        paths = [path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path)]
    if not paths:
        raise FileNotFoundError(f'no images found at {pattern!r} (a file, a folder of '
                                f'{"/".join(IMAGE_EXTENSIONS)} files, or a glob pattern)')
    return sorted(paths)


def read_tiles(paths: list[str], config: ml_collections.ConfigDict):
    """Tiles preprocessed as the training cache is (`data.preprocess`, `data.image_size`).
    Returns (tiles, their paths, [(path, reason)] of the files that could not be read)."""
    tiles, readable, errors = [], [], []
    for path in paths:
        try:
            image = preprocess.read_image(path)
            tiles.append(preprocess.preprocess(image, config.data.preprocess, config.data.image_size))
            readable.append(path)
        except preprocess.UnreadableImageError as error:
            errors.append((path, error.reason))
        except (cv2.error, ValueError) as error:  # Decodable but unprocessable, e.g. 1×0 pixels.
            errors.append((path, f'preprocessing failed: {error}'))
    return tiles, readable, errors


def saved_temperature(config: ml_collections.ConfigDict, workdir: str, checkpoint_step: int) -> float:
    """The temperature --mode=eval fitted for this checkpoint, when config.eval asks for scaling."""
    if not config.eval.temperature_scaling:
        return 1.0
    path = os.path.join(workdir, 'eval', 'temperature.json')
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved['checkpoint_step'] == checkpoint_step:
            return saved['temperature']
    logging.warning('eval.temperature_scaling is on but %s holds no temperature for step %d: '
                    'run --mode=eval first; predicting without scaling', path, checkpoint_step)
    return 1.0


def predict(config: ml_collections.ConfigDict, workdir: str, input_pattern: str, output: str, *,
            gradcam: bool = False, checkpoint_step: int | None = None) -> dict:
    """Writes `output` (path, predicted_class, one probability column per class) and
    `<output stem>.errors.csv`; with `gradcam`, panels into `<output stem>_gradcam/`."""
    run = evaluate.run_summary(workdir)
    class_names = run['class_names']
    restored = evaluate.restore(config, workdir, num_classes=len(class_names),
                                num_train_examples=run['num_train_examples'], checkpoint_step=checkpoint_step)
    tiles, readable, errors = read_tiles(list_inputs(input_pattern), config)
    stem = os.path.splitext(output)[0]
    for path, reason in errors:
        print(f'unreadable: {path}: {reason}', file=sys.stderr)
    errors_path = files.write_csv(stem + '.errors.csv', ['path', 'reason'], errors)
    summary = {'output': output, 'predicted': len(readable), 'unreadable': len(errors), 'errors': errors_path,
               'checkpoint_step': restored.step}
    if not tiles:
        files.write_csv(output, ['path', 'predicted_class', *class_names], [])
        return summary
    split = Split(np.stack(tiles), np.full(len(tiles), -1, np.int32), np.full(len(tiles), '', str), tuple(readable))
    logits = inference.predict_logits(restored.eval_step, restored.state, split, config.batch_size,
                                      restored.mesh, tta=config.eval.tta)
    probabilities = calibration.probabilities(logits, saved_temperature(config, workdir, restored.step))
    predicted = probabilities.argmax(axis=1)
    files.write_csv(output, ['path', 'predicted_class', *class_names],
                       ([path, class_names[p], *map(repr, row)]
                        for path, p, row in zip(readable, predicted, probabilities.tolist())))
    if gradcam:
        explanation = evaluate.explainer(config, restored)(split)
        names = [f'{i:04d}_{interpret.slug(os.path.splitext(os.path.basename(path))[0])}'
                 f'_pred-{interpret.slug(class_names[p])}' for i, (path, p) in enumerate(zip(readable, predicted))]
        images = [interpret.display_rgb(tile, config.data.preprocess) for tile in tiles]
        interpret.write_panels(stem + '_gradcam', images, explanation, names)
        summary['gradcam'] = stem + '_gradcam'
    return summary
