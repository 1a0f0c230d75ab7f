"""New image files to predict, shared by `--mode=predict` and the bundle's `python -m allflax.deploy.bundle`:
finding them, preprocessing them as the training cache does (`preprocess`), and the CSVs their
predictions go to. Imports no JAX, so a bundle predicts without it.
"""
import glob
import os
import sys

import cv2
import numpy as np

from allflax import files
from allflax.data import preprocess

# Lower-case extensions read as images; other files (notes, Thumbs.db) are ignored.
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


def read_tiles(paths: list[str], steps, image_size: int):
    """Tiles preprocessed as the training cache is (`data.preprocess` steps, `data.image_size`).
    Returns (tiles, their paths, [(path, reason)] of the files that could not be read)."""
    tiles, readable, errors = [], [], []
    for path in paths:
        try:
            image = preprocess.read_image(path)
            tiles.append(preprocess.preprocess(image, steps, image_size))
            readable.append(path)
        except preprocess.UnreadableImageError as error:
            errors.append((path, error.reason))
        except (cv2.error, ValueError) as error:  # Decodable but unprocessable, e.g. 1×0 pixels.
            errors.append((path, f'preprocessing failed: {error}'))
    return tiles, readable, errors


PREDICTIONS_COLUMNS = ('path', 'predicted_class')
ERRORS_COLUMNS = ('path', 'reason')


def check_outputs(output: str):
    """Refuses, before any image is read, an `output` (or its errors CSV) that exists and is not
    a CSV of predictions (or errors) that allflax wrote: predicting replaces only its own files."""
    files.refuse_unless_replaceable(output, 'predictions CSV', files.csv_with_header(*PREDICTIONS_COLUMNS))
    files.refuse_unless_replaceable(errors_path(output), 'predict errors CSV', files.csv_with_header(*ERRORS_COLUMNS))


def errors_path(output: str) -> str:
    return os.path.splitext(output)[0] + '.errors.csv'


def write_errors(output: str, errors: list[tuple[str, str]]) -> str:
    """`<output stem>.errors.csv` (path, reason), each also said on stderr; returns its path."""
    for path, reason in errors:
        print(f'unreadable: {path}: {reason}', file=sys.stderr)
    return files.write_csv(errors_path(output), list(ERRORS_COLUMNS), errors)


def predicted_classes(probabilities: np.ndarray, class_names, rule: dict | None) -> np.ndarray:
    """Each row's class index under a bundle's `decision_rule`: argmax (also for None), or for a
    threshold rule the positive class where its probability reaches the threshold, else the other."""
    probabilities = np.asarray(probabilities)
    if not len(probabilities):
        return np.zeros(0, np.int64)
    if rule is None or rule['kind'] == 'argmax':
        return probabilities.argmax(axis=1)
    positive = list(class_names).index(rule['positive_class'])
    return np.where(probabilities[:, positive] >= rule['threshold'], positive, 1 - positive)


def rule_name(rule: dict | None) -> str:
    """The rule as the predictions CSV names it in its last column."""
    if rule is None or rule['kind'] == 'argmax':
        return 'argmax'
    return f'threshold {rule["threshold"]:.6g} on {rule["positive_class"]}'


def write_predictions(output: str, paths: list[str], class_names, probabilities: np.ndarray,
                      rule: dict | None = None) -> np.ndarray:
    """`output`: path, predicted_class (by `rule`), one probability column per class, and the rule
    applied (decision_rule); returns the predicted classes."""
    predicted = predicted_classes(probabilities, class_names, rule)
    files.write_csv(output, [*PREDICTIONS_COLUMNS, *class_names, 'decision_rule'],
                    ([path, class_names[p], *map(repr, row), rule_name(rule)]
                     for path, p, row in zip(paths, predicted, np.asarray(probabilities).tolist())))
    return predicted
